"""Shared toolchain fixtures: scikit-learn datasets as files and tiny trained models.

Everything is trained inside the session from datasets scikit-learn ships (iris, digits,
breast_cancer, diabetes, wine) and written under pytest's tmp directories; Keras models
are built only by the tests that ask for them (marked ``tflite``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest


@dataclass
class DataFiles:
    name: str
    X: np.ndarray  # float32
    y: np.ndarray
    npz: Path
    csv: Path
    feature_names: list[str]


def _write(d: Path, name: str, X: np.ndarray, y: np.ndarray, names: list[str]) -> DataFiles:
    X = X.astype(np.float32)
    npz = d / f"{name}.npz"
    np.savez(npz, X=X, y=y, feature_names=np.array(names))
    csv = d / f"{name}.csv"
    header = ",".join([*names, "target"])
    lines = [
        ",".join([*(repr(float(v)) for v in row), str(t)]) for row, t in zip(X, y, strict=True)
    ]
    csv.write_text(header + "\n" + "\n".join(lines) + "\n")
    return DataFiles(name, X, y, npz, csv, names)


@pytest.fixture(scope="session")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, DataFiles]:
    from sklearn import datasets as ds

    d = tmp_path_factory.mktemp("data")
    out = {}
    for name, loader in {
        "iris": ds.load_iris,
        "breast_cancer": ds.load_breast_cancer,
        "digits": ds.load_digits,
        "diabetes": ds.load_diabetes,
        "wine": ds.load_wine,
    }.items():
        bunch = loader()
        names = [
            str(n).replace(" ", "_").replace("(", "").replace(")", "") for n in bunch.feature_names
        ]
        out[name] = _write(d, name, bunch.data, bunch.target, names)
    return out


@pytest.fixture(scope="session")
def mixed_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Iris with two categorical columns derived from it, as a CSV with a target column."""
    from sklearn.datasets import load_iris

    X, y = load_iris(return_X_y=True)
    size = np.where(X[:, 2] < 2.5, "small", np.where(X[:, 2] < 5.0, "medium", "large"))
    shape = np.where(X[:, 0] / X[:, 1] > 1.8, "long", "round")
    lines = ["sepal_length,sepal_width,size,shape,petal_width,species"]
    species = np.array(["setosa", "versicolor", "virginica"])[y]
    for i in range(len(X)):
        lines.append(f"{X[i, 0]},{X[i, 1]},{size[i]},{shape[i]},{X[i, 3]},{species[i]}")
    path = tmp_path_factory.mktemp("mixed") / "iris_mixed.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def fit_quietly(model: Any, X: Any, y: Any) -> Any:
    """Fit, ignoring only scikit-learn's ConvergenceWarning (tiny iteration budgets on purpose)."""
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit(X, y)


@pytest.fixture(scope="session")
def fit() -> Callable[[Any, Any, Any], Any]:
    """:func:`fit_quietly` for test modules (conftest is not importable as a module)."""
    return fit_quietly


@pytest.fixture(scope="session")
def save_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Any, str], Path]:
    """Dump a fitted estimator with joblib into the session tmp dir and return the path."""
    import joblib

    d = tmp_path_factory.mktemp("models")

    def _save(model: Any, name: str) -> Path:
        path = d / f"{name}.joblib"
        joblib.dump(model, path)
        return path

    return _save


@pytest.fixture(scope="session")
def digits_mlp_onnx(
    datasets: dict[str, DataFiles], save_model: Any, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """An sklearn MLP on digits, converted to ONNX once (quantization tests start here)."""
    from sklearn.neural_network import MLPClassifier

    from toolchain.convert import convert
    from toolchain.data import load_data
    from toolchain.sources import load_source

    digits = datasets["digits"]
    model = fit_quietly(MLPClassifier((128,), max_iter=80, random_state=0), digits.X, digits.y)
    src = save_model(model, "digits_mlp")
    out = tmp_path_factory.mktemp("mlp") / "digits_mlp.onnx"
    return convert(load_source(src), load_data(digits.npz), out=out).path


# --- Keras (tflite marker) -----------------------------------------------------------------


@pytest.fixture(scope="session")
def keras_models(
    datasets: dict[str, DataFiles], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """A Keras MLP and a small CNN (8×8×1 digits), a few epochs each, saved as .keras."""
    pytest.importorskip("tensorflow")
    import keras

    keras.utils.set_random_seed(0)
    digits = datasets["digits"]
    X = digits.X / 16.0
    d = tmp_path_factory.mktemp("keras")
    mlp = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ],
        name="digits_mlp",
    )
    cnn = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(8, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax"),
        ],
        name="digits_cnn",
    )
    out = {}
    for name, model, x in (("mlp", mlp, X), ("cnn", cnn, X.reshape(-1, 8, 8, 1))):
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        model.fit(x, digits.y, epochs=4, batch_size=64, verbose=0)
        path = d / f"digits_{name}.keras"
        model.save(path)
        out[name] = path
    np.savez(d / "digits01.npz", X=X.astype(np.float32), y=digits.y)
    out["data"] = d / "digits01.npz"
    return out


@pytest.fixture(scope="session")
def keras_tflite(
    keras_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """Both Keras models converted to float32 TFLite once."""
    from toolchain.convert import convert
    from toolchain.data import load_data
    from toolchain.sources import load_source

    data = load_data(keras_models["data"])
    d = tmp_path_factory.mktemp("tflite")
    return {
        name: convert(load_source(keras_models[name]), data, to="tflite", out=d / f"{name}.tflite")
        for name in ("mlp", "cnn")
    }
