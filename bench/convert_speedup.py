"""Single-row latency: the converted model in onnxruntime against the source library's own call.

For each supported model (trained here on a dataset scikit-learn ships) the model is
converted with ``toolchain.convert`` (parity checked), then one row at a time is predicted,
after a warm-up, by

* the anchor: the source library itself, in the same run: scikit-learn's, XGBoost's,
  LightGBM's or CatBoost's ``model.predict(row)`` (their scikit-learn wrappers, one
  thread each), or the PyTorch module's forward pass under ``torch.no_grad()`` (one thread),
* ``session.run`` in onnxruntime with 1 intra-op thread (the raw call), and
* ``ModelRunner.predict(row)`` (rows → tensors → prediction, what the agent does).

DESIGN.md expects ≥ 20× for scikit-learn tree ensembles (about 500× was probed for a
100-tree forest). The boosting libraries and PyTorch have fast native paths of their own;
their rows report the ratio as measured, including where the native call is faster.

    python -m bench.convert_speedup [--quick]
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from bench._common import latency_ms, run_cli, table, write_result

TREE_ENSEMBLES = {
    "RandomForestClassifier",
    "RandomForestRegressor",
    "GradientBoostingClassifier",
    "HistGradientBoostingClassifier",
    "HistGradientBoostingRegressor",
}


# (name, dataset, factory of an unfitted model) for the XGBoost/LightGBM/CatBoost rows; a
# library that is not installed leaves its rows out (and the table says so).
def _boosting_models() -> tuple[list[tuple[str, str, Any, str]], list[str]]:
    out: list[tuple[str, str, Any, str]] = []
    missing = []
    try:
        import xgboost as xgb

        kw = {"n_estimators": 100, "max_depth": 6, "n_jobs": 1, "random_state": 0}
        out += [
            ("XGBClassifier", "digits", xgb.XGBClassifier(**kw), "xgboost"),
            ("XGBRegressor", "diabetes", xgb.XGBRegressor(**kw), "xgboost"),
        ]
    except ImportError:
        missing.append("xgboost")
    try:
        import lightgbm as lgb

        kw = {"n_estimators": 100, "n_jobs": 1, "random_state": 0, "verbose": -1}
        out += [
            ("LGBMClassifier", "digits", lgb.LGBMClassifier(**kw), "lightgbm"),
            ("LGBMRegressor", "diabetes", lgb.LGBMRegressor(**kw), "lightgbm"),
        ]
    except ImportError:
        missing.append("lightgbm")
    try:
        import catboost as cb

        kw = {
            "iterations": 100, "depth": 6, "thread_count": 1, "random_seed": 0,
            "verbose": False, "allow_writing_files": False,
        }  # fmt: skip
        out += [
            ("CatBoostClassifier", "digits", cb.CatBoostClassifier(**kw), "catboost"),
            ("CatBoostRegressor", "diabetes", cb.CatBoostRegressor(**kw), "catboost"),
        ]
    except ImportError:
        missing.append("catboost")
    return out, missing


class _TorchPredict:
    """A PyTorch module with a ``predict(row)`` that runs its forward pass, as users call it."""

    def __init__(self, module: Any) -> None:
        import torch

        self.module, self.torch = module, torch

    def predict(self, row: np.ndarray) -> Any:
        with self.torch.no_grad():
            return self.module(self.torch.from_numpy(row)).numpy()


def _torch_mlp(X: np.ndarray, y: np.ndarray) -> Any:
    """An MLP (64 → 64 → 10) trained briefly on digits, saved whole like a user would."""
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(1)
    nn = torch.nn
    model = nn.Sequential(nn.Linear(X.shape[1], 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(X / 16.0).float(), torch.from_numpy(y).long()
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    return model.eval()


def _models() -> list[tuple[str, str, Any]]:
    from sklearn import ensemble, linear_model, neighbors, neural_network, svm, tree
    from sklearn.decomposition import PCA
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return [
        ("LogisticRegression", "digits", linear_model.LogisticRegression(max_iter=2000)),
        ("Ridge", "diabetes", linear_model.Ridge()),
        ("DecisionTreeClassifier", "digits", tree.DecisionTreeClassifier(random_state=0)),
        ("RandomForestClassifier", "digits", ensemble.RandomForestClassifier(100, random_state=0)),
        ("RandomForestRegressor", "diabetes", ensemble.RandomForestRegressor(100, random_state=0)),
        (
            "GradientBoostingClassifier",
            "breast_cancer",
            ensemble.GradientBoostingClassifier(n_estimators=100, random_state=0),
        ),
        (
            "HistGradientBoostingClassifier",
            "breast_cancer",
            ensemble.HistGradientBoostingClassifier(max_iter=100, random_state=0),
        ),
        (
            "HistGradientBoostingRegressor",
            "diabetes",
            ensemble.HistGradientBoostingRegressor(max_iter=100, random_state=0),
        ),
        ("SVC", "digits", svm.SVC()),
        ("KNeighborsClassifier", "digits", neighbors.KNeighborsClassifier()),
        (
            "MLPClassifier",
            "digits",
            neural_network.MLPClassifier((64,), max_iter=300, random_state=0),
        ),
        (
            "Pipeline(StandardScaler,PCA,LogisticRegression)",
            "digits",
            make_pipeline(
                StandardScaler(),
                PCA(20, random_state=0),
                linear_model.LogisticRegression(max_iter=2000),
            ),
        ),
    ]


def _dataset(name: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn import datasets

    loader = {
        "digits": datasets.load_digits,
        "diabetes": datasets.load_diabetes,
        "breast_cancer": datasets.load_breast_cancer,
    }[name]
    X, y = loader(return_X_y=True)
    return X.astype(np.float32), y


def _measure(
    model: Any, runner: Any, sample: np.ndarray, runs: int, budget: float
) -> tuple[dict, dict, dict]:
    """Time the three paths on the same rows, cycling through ``sample`` one row per call."""
    rows = [sample[i : i + 1] for i in range(len(sample))]
    feeds = [runner.feeds(r) for r in rows]
    cursor = {"i": 0}

    def step() -> int:
        cursor["i"] = (cursor["i"] + 1) % len(rows)
        return cursor["i"]

    sk = latency_ms(lambda: model.predict(rows[step()]), runs=runs, budget_s=budget)
    ort = latency_ms(lambda: runner.run_feeds(feeds[step()]), runs=runs, budget_s=budget)
    full = latency_ms(lambda: runner.predict(rows[step()]), runs=runs, budget_s=budget)
    return sk, ort, full


def _row(
    name: str,
    ds: str,
    library: str,
    model: Any,
    converted: Any,
    runner_cls: Any,
    X: np.ndarray,
    runs: int,
    budget: float,
) -> dict[str, Any]:
    side = converted.sidecar
    runner = runner_cls.open(converted.path, side.input_schema, side.output_schema, threads=1)
    native, ort, full = _measure(model, runner, X[:200], runs, budget)
    return {
        "model": name,
        "library": library,
        "dataset": ds,
        "native_p50_ms": native["p50_ms"],
        "native_p99_ms": native["p99_ms"],
        "ort_p50_ms": ort["p50_ms"],
        "ort_p99_ms": ort["p99_ms"],
        "runner_p50_ms": full["p50_ms"],
        "speedup_p50": native["p50_ms"] / ort["p50_ms"],
        "speedup_runner_p50": native["p50_ms"] / full["p50_ms"],
        "label_agreement": converted.parity.label_agreement,
        "max_abs_error": converted.parity.max_abs_error,
        "tree_ensemble": name in TREE_ENSEMBLES,
        "exporter": side.lineage.converter,
    }


def main(quick: bool = False) -> dict[str, Any]:
    import joblib
    from sklearn.exceptions import ConvergenceWarning

    from toolchain.convert import convert
    from toolchain.data import dataset_from_arrays
    from toolchain.runner import ModelRunner
    from toolchain.sources import load_source

    runs = 200 if quick else 2000
    budget = 2.0 if quick else 10.0
    models = [(name, ds, model, "scikit-learn") for name, ds, model in _models()]
    boosting, missing = _boosting_models()
    models += boosting
    if quick:
        keep = {
            "LogisticRegression",
            "RandomForestClassifier",
            "HistGradientBoostingClassifier",
            "MLPClassifier",
            "XGBClassifier",
            "LGBMClassifier",
            "CatBoostClassifier",
        }
        models = [m for m in models if m[0] in keep]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, ds, model, library in models:
            X, y = _dataset(ds)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                model.fit(X, y)
            src = Path(tmp) / f"{len(rows)}.joblib"
            joblib.dump(model, src)
            converted = convert(
                load_source(src), dataset_from_arrays(X, y), out=src.with_suffix(".onnx")
            )
            rows.append(_row(name, ds, library, model, converted, ModelRunner, X, runs, budget))
        try:
            import torch
        except ImportError:
            missing.append("torch")
        else:
            X, y = _dataset("digits")
            module = _torch_mlp(X, y)
            src = Path(tmp) / "mlp.pt"
            torch.save(module, src)
            X01 = (X / 16.0).astype(np.float32)
            converted = convert(
                load_source(src), dataset_from_arrays(X01, y), out=src.with_suffix(".onnx")
            )
            row = _row(
                "PyTorch MLP (64-64-10)", "digits", "torch", _TorchPredict(module),
                converted, ModelRunner, X01, runs, budget,
            )  # fmt: skip
            rows.append(row)
    print(
        table(
            "single-row latency, onnxruntime (1 thread) vs the source library's own call "
            "(anchor, 1 thread)",
            [
                "model",
                "library",
                "data",
                "native p50 ms",
                "native p99 ms",
                "ORT p50 ms",
                "ORT p99 ms",
                "runner p50 ms",
                "speedup ×",
                "runner speedup ×",
            ],
            [
                [
                    r["model"],
                    r["library"],
                    r["dataset"],
                    r["native_p50_ms"],
                    r["native_p99_ms"],
                    r["ort_p50_ms"],
                    r["ort_p99_ms"],
                    r["runner_p50_ms"],
                    r["speedup_p50"],
                    r["speedup_runner_p50"],
                ]
                for r in rows
            ],
        )
    )
    if missing:
        print(f"(no rows for {', '.join(missing)}: not installed)")
    trees = [r for r in rows if r["tree_ensemble"]]
    headline_models = (
        "RandomForestClassifier", "HistGradientBoostingClassifier", "MLPClassifier",
        "XGBClassifier", "LGBMClassifier", "CatBoostClassifier", "PyTorch MLP (64-64-10)",
    )  # fmt: skip
    headline = [
        {
            "metric": f"{r['model']} single-row p50 speedup (ORT vs {r['library']})",
            "value": f"{r['ort_p50_ms']:.3f} ms",
            "anchor": f"{r['library']} {r['native_p50_ms']:.3f} ms",
            "ratio": r["speedup_p50"],
        }
        for r in rows
        if r["model"] in headline_models
    ]
    native_faster = [r["model"] for r in rows if r["speedup_p50"] < 1.0]
    native_faster_than_runner = [r["model"] for r in rows if r["speedup_runner_p50"] < 1.0]
    result = {
        "quick": quick,
        "rows": rows,
        "min_tree_ensemble_speedup": min((r["speedup_p50"] for r in trees), default=None),
        "expectation": "≥ 20× for scikit-learn tree ensembles (DESIGN.md)",
        "native_faster_than_onnxruntime": native_faster,
        "native_faster_than_runner": native_faster_than_runner,
        "headline": headline,
    }
    if trees:
        worst = min(trees, key=lambda r: r["speedup_p50"])
        verdict = "meets" if worst["speedup_p50"] >= 20 else "MISSES"
        print(
            f"\nslowest scikit-learn tree-ensemble speedup: {worst['speedup_p50']:.1f}× "
            f"({worst['model']}) — {verdict} the ≥ 20× expectation"
        )
    print(
        "native call faster than onnxruntime's session.run: "
        + (", ".join(native_faster) if native_faster else "none in this run")
    )
    print(
        "native call faster than the full runner path (rows → tensors → prediction): "
        + (", ".join(native_faster_than_runner) if native_faster_than_runner else "none")
    )
    write_result("convert_speedup", result)
    return result


if __name__ == "__main__":
    run_cli(main, __doc__)
