"""Single-row latency: the converted model in onnxruntime against scikit-learn's ``predict``.

For each supported scikit-learn model (trained here on a dataset scikit-learn ships) the
model is converted with ``toolchain.convert`` (parity checked), then one row at a time is
predicted, after a warm-up, by

* the anchor: ``model.predict(row)`` in scikit-learn,
* ``session.run`` in onnxruntime with 1 intra-op thread (the raw call), and
* ``ModelRunner.predict(row)`` (rows → tensors → prediction, what the agent does).

DESIGN.md expects ≥ 20× for tree ensembles (about 500× was probed for a 100-tree forest).

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


def main(quick: bool = False) -> dict[str, Any]:
    import joblib
    from sklearn.exceptions import ConvergenceWarning

    from toolchain.convert import convert
    from toolchain.data import dataset_from_arrays
    from toolchain.runner import ModelRunner
    from toolchain.sources import load_source

    runs = 200 if quick else 2000
    budget = 2.0 if quick else 10.0
    models = _models()
    if quick:
        keep = {
            "LogisticRegression",
            "RandomForestClassifier",
            "HistGradientBoostingClassifier",
            "MLPClassifier",
        }
        models = [m for m in models if m[0] in keep]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, ds, model in models:
            X, y = _dataset(ds)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                model.fit(X, y)
            src = Path(tmp) / f"{len(rows)}.joblib"
            joblib.dump(model, src)
            converted = convert(
                load_source(src), dataset_from_arrays(X, y), out=src.with_suffix(".onnx")
            )
            side = converted.sidecar
            runner = ModelRunner.open(
                converted.path, side.input_schema, side.output_schema, threads=1
            )
            sk, ort, full = _measure(model, runner, X[:200], runs, budget)
            rows.append(
                {
                    "model": name,
                    "dataset": ds,
                    "sklearn_p50_ms": sk["p50_ms"],
                    "sklearn_p99_ms": sk["p99_ms"],
                    "ort_p50_ms": ort["p50_ms"],
                    "ort_p99_ms": ort["p99_ms"],
                    "runner_p50_ms": full["p50_ms"],
                    "speedup_p50": sk["p50_ms"] / ort["p50_ms"],
                    "speedup_runner_p50": sk["p50_ms"] / full["p50_ms"],
                    "label_agreement": converted.parity.label_agreement,
                    "max_abs_error": converted.parity.max_abs_error,
                    "tree_ensemble": name in TREE_ENSEMBLES,
                }
            )
    print(
        table(
            "single-row latency, onnxruntime (1 thread) vs scikit-learn predict (anchor)",
            [
                "model",
                "data",
                "sklearn p50 ms",
                "sklearn p99 ms",
                "ORT p50 ms",
                "ORT p99 ms",
                "runner p50 ms",
                "speedup ×",
                "runner speedup ×",
            ],
            [
                [
                    r["model"],
                    r["dataset"],
                    r["sklearn_p50_ms"],
                    r["sklearn_p99_ms"],
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
    trees = [r for r in rows if r["tree_ensemble"]]
    headline = [
        {
            "metric": f"{r['model']} single-row p50 speedup (ORT vs sklearn)",
            "value": f"{r['ort_p50_ms']:.3f} ms",
            "anchor": f"sklearn predict {r['sklearn_p50_ms']:.3f} ms",
            "ratio": r["speedup_p50"],
        }
        for r in rows
        if r["model"]
        in ("RandomForestClassifier", "HistGradientBoostingClassifier", "MLPClassifier")
    ]
    result = {
        "quick": quick,
        "rows": rows,
        "min_tree_ensemble_speedup": min((r["speedup_p50"] for r in trees), default=None),
        "expectation": "≥ 20× for tree ensembles (DESIGN.md)",
        "headline": headline,
    }
    if trees:
        worst = min(trees, key=lambda r: r["speedup_p50"])
        verdict = "meets" if worst["speedup_p50"] >= 20 else "MISSES"
        print(
            f"\nslowest tree-ensemble speedup: {worst['speedup_p50']:.1f}× ({worst['model']}) — "
            f"{verdict} the ≥ 20× expectation"
        )
    write_result("convert_speedup", result)
    return result


if __name__ == "__main__":
    run_cli(main, __doc__)
