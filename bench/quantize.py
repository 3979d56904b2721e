"""Size, accuracy and single-row latency of every quantized variant against fp32.

* ONNX: a scikit-learn MLP (256, 128) on digits → fp32, dynamic INT8, static INT8 (QDQ,
  per-channel, calibrated on the training split), FP16.
* TFLite: a Keras MLP of the same shape → fp32, dynamic range, full INT8, FP16.

Accuracy is measured on a held-out 20 % of digits; latency is single-row p50/p99 after a
warm-up with 1 thread. The anchor for every ratio is the fp32 model of the same format.
Expected (issue 2): INT8 ≤ 0.35× the fp32 size with ≤ 1 % accuracy drop.

    python -m bench.quantize [--quick]
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from bench._common import latency_ms, run_cli, table, write_result


def _split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    return tuple(train_test_split(X, y, test_size=0.2, random_state=0, stratify=y))  # type: ignore[return-value]


def _row(
    fmt: str, variant: str, path: Path, X_test: np.ndarray, y_test: np.ndarray, runs: int
) -> dict[str, Any]:
    from toolchain.runner import ModelRunner
    from toolchain.sidecar import describe

    side = describe(path)
    runner = ModelRunner.open(path, side.input_schema, side.output_schema, threads=1)
    accuracy = float(np.mean(np.array(runner.predict(X_test).labels) == y_test))
    feeds = [runner.feeds(X_test[i : i + 1]) for i in range(min(200, len(X_test)))]
    cursor = {"i": 0}

    def one() -> Any:
        cursor["i"] = (cursor["i"] + 1) % len(feeds)
        return runner.run_feeds(feeds[cursor["i"]])

    lat = latency_ms(one, runs=runs, budget_s=5.0)
    return {
        "format": fmt,
        "variant": variant,
        "size_bytes": path.stat().st_size,
        "accuracy": accuracy,
        "p50_ms": lat["p50_ms"],
        "p99_ms": lat["p99_ms"],
        "load_ms": runner.load_ms,
    }


def _onnx_rows(tmp: Path, split: Any, runs: int) -> list[dict[str, Any]]:
    import joblib
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    from toolchain.convert import convert
    from toolchain.data import dataset_from_arrays
    from toolchain.quantize import quantize
    from toolchain.sources import load_source

    X_train, X_test, y_train, y_test = split
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = MLPClassifier((256, 128), max_iter=200, random_state=0).fit(X_train, y_train)
    joblib.dump(model, tmp / "mlp.joblib")
    train = dataset_from_arrays(X_train, y_train)
    fp32 = convert(load_source(tmp / "mlp.joblib"), train, out=tmp / "mlp.onnx").path
    rows = [_row("onnx", "fp32", fp32, X_test, y_test, runs)]
    for mode, label in (
        ("dynamic", "dynamic INT8"),
        ("static", "static INT8 (QDQ)"),
        ("fp16", "FP16"),
    ):
        q = quantize(fp32, mode=mode, data=train)  # type: ignore[arg-type]
        rows.append(_row("onnx", label, q.path, X_test, y_test, runs))
    return rows


def _tflite_rows(tmp: Path, split: Any, runs: int, epochs: int) -> list[dict[str, Any]]:
    try:
        import keras
    except ImportError:
        return []
    from toolchain.convert import convert
    from toolchain.data import dataset_from_arrays
    from toolchain.quantize import quantize
    from toolchain.sources import load_source

    X_train, X_test, y_train, y_test = split
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(X_train, y_train, epochs=epochs, batch_size=32, verbose=0)
    model.save(tmp / "mlp.keras")
    train = dataset_from_arrays(X_train, y_train)
    fp32 = convert(load_source(tmp / "mlp.keras"), train, to="tflite", out=tmp / "mlp.tflite").path
    rows = [_row("tflite", "fp32", fp32, X_test, y_test, runs)]
    for mode, label in (("dynamic", "dynamic range"), ("int8", "full INT8"), ("fp16", "FP16")):
        q = quantize(fp32, mode=mode, data=train)  # type: ignore[arg-type]
        rows.append(_row("tflite", label, q.path, X_test, y_test, runs))
    return rows


def main(quick: bool = False) -> dict[str, Any]:
    runs = 300 if quick else 3000
    split = _split()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        rows = _onnx_rows(tmp, split, runs) + _tflite_rows(
            tmp, split, runs, epochs=5 if quick else 20
        )
    for r in rows:
        base = next(b for b in rows if b["format"] == r["format"] and b["variant"] == "fp32")
        r["size_ratio"] = r["size_bytes"] / base["size_bytes"]
        r["accuracy_drop"] = base["accuracy"] - r["accuracy"]
        r["p50_ratio"] = r["p50_ms"] / base["p50_ms"]
    print(
        table(
            "quantized variants against fp32 (digits, held-out 20 %; single row, 1 thread)",
            [
                "format",
                "variant",
                "size KiB",
                "size ×",
                "accuracy",
                "Δacc",
                "p50 ms",
                "p99 ms",
                "p50 ×",
            ],
            [
                [
                    r["format"],
                    r["variant"],
                    r["size_bytes"] / 1024,
                    r["size_ratio"],
                    r["accuracy"],
                    -r["accuracy_drop"],
                    r["p50_ms"],
                    r["p99_ms"],
                    r["p50_ratio"],
                ]
                for r in rows
            ],
        )
    )
    int8 = [r for r in rows if "INT8" in r["variant"]]
    ok = all(r["size_ratio"] <= 0.35 and r["accuracy_drop"] <= 0.01 for r in int8)
    print(
        f"\nINT8 ≤ 0.35× fp32 size with ≤ 1 % accuracy drop: {'yes' if ok else 'NO'} "
        + ", ".join(
            f"{r['format']} {r['variant']}: {r['size_ratio']:.2f}×, Δacc {-r['accuracy_drop']:+.3f}"
            for r in int8
        )
    )
    headline = [
        {
            "metric": f"{r['format']} {r['variant']} size (acc drop {r['accuracy_drop']:+.3f})",
            "value": f"{r['size_bytes'] / 1024:.1f} KiB",
            "anchor": "fp32 of the same format",
            "ratio": r["size_ratio"],
        }
        for r in int8
    ]
    result = {
        "quick": quick,
        "rows": rows,
        "int8_expectation_met": ok,
        "expectation": "INT8 ≤ 0.35× fp32 size, ≤ 1 % accuracy drop",
        "headline": headline,
    }
    write_result("quantize", result)
    return result


if __name__ == "__main__":
    run_cli(main, __doc__)
