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


# --- XGBoost, LightGBM, CatBoost, PyTorch (their extras) -----------------------------------
#
# Each library's models are trained once per session, tiny (20 trees, a few dozen epochs), and
# saved every way a user hands them over: pickled/joblib (alone and in a Pipeline behind a
# StandardScaler) and the library's native file. A missing library skips only its own tests.


@dataclass
class Source:
    """A saved source model and the .npz data it was trained on."""

    path: Path
    data: Path
    task: str  # "classification" | "regression"


def _boosting_sources(
    library: str,
    classifier: Callable[[], Any],
    regressor: Callable[[], Any],
    native: Callable[[Any, Path], None],
    suffix: str,
    datasets: dict[str, DataFiles],
    d: Path,
) -> dict[str, Source]:
    import joblib
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    out: dict[str, Source] = {}
    plan = [
        ("classifier-iris", classifier, "iris", "classification"),
        ("classifier-breast_cancer", classifier, "breast_cancer", "classification"),
        ("regressor-diabetes", regressor, "diabetes", "regression"),
    ]
    for name, factory, ds, task in plan:
        data = datasets[ds]
        model = factory().fit(data.X, data.y)
        path = d / f"{library}-{name}.joblib"
        joblib.dump(model, path)
        out[f"{name}.joblib"] = Source(path, data.npz, task)
        native_path = d / f"{library}-{name}{suffix}"
        native(model, native_path)
        out[f"{name}{suffix}"] = Source(native_path, data.npz, task)
    for ds, factory, task in (
        ("wine", classifier, "classification"),
        ("diabetes", regressor, "regression"),
    ):
        data = datasets[ds]
        pipe = make_pipeline(StandardScaler(), factory()).fit(data.X, data.y)
        path = d / f"{library}-pipeline-{ds}.joblib"
        joblib.dump(pipe, path)
        out[f"pipeline-{ds}.joblib"] = Source(path, data.npz, task)
    return out


@pytest.fixture(scope="session")
def xgboost_sources(
    datasets: dict[str, DataFiles], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Source]:
    xgb = pytest.importorskip("xgboost")
    kw = {"n_estimators": 20, "max_depth": 3, "n_jobs": 1, "random_state": 0}
    sources = _boosting_sources(
        "xgboost",
        lambda: xgb.XGBClassifier(**kw),
        lambda: xgb.XGBRegressor(**kw),
        lambda model, path: model.save_model(path),
        ".json",
        datasets,
        tmp_path_factory.mktemp("xgboost"),
    )
    # the binary format too, from a regressor
    data = datasets["diabetes"]
    ubj = tmp_path_factory.mktemp("xgboost-ubj") / "regressor.ubj"
    xgb.XGBRegressor(**kw).fit(data.X, data.y).save_model(ubj)
    sources["regressor-diabetes.ubj"] = Source(ubj, data.npz, "regression")
    return sources


@pytest.fixture(scope="session")
def lightgbm_sources(
    datasets: dict[str, DataFiles], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Source]:
    lgb = pytest.importorskip("lightgbm")
    kw = {"n_estimators": 20, "num_leaves": 15, "n_jobs": 1, "random_state": 0, "verbose": -1}
    return _boosting_sources(
        "lightgbm",
        lambda: lgb.LGBMClassifier(**kw),
        lambda: lgb.LGBMRegressor(**kw),
        lambda model, path: model.booster_.save_model(path),
        ".txt",
        datasets,
        tmp_path_factory.mktemp("lightgbm"),
    )


@pytest.fixture(scope="session")
def catboost_sources(
    datasets: dict[str, DataFiles], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Source]:
    cb = pytest.importorskip("catboost")
    kw = {
        "iterations": 20,
        "depth": 4,
        "thread_count": 1,
        "random_seed": 0,
        "verbose": False,
        "allow_writing_files": False,
    }
    return _boosting_sources(
        "catboost",
        lambda: cb.CatBoostClassifier(**kw),
        lambda: cb.CatBoostRegressor(**kw),
        lambda model, path: model.save_model(str(path)),
        ".cbm",
        datasets,
        tmp_path_factory.mktemp("catboost"),
    )


@pytest.fixture(scope="session")
def torch_sources(
    datasets: dict[str, DataFiles], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Source]:
    """An MLP classifier (digits, scaled to 0–1) saved whole and as TorchScript, an MLP
    regressor (diabetes) saved whole, and a small CNN on 1×8×8 digit images with its data
    as a 4-D .npz (the input shape comes from there)."""
    torch = pytest.importorskip("torch")
    nn = torch.nn
    torch.manual_seed(0)
    torch.set_num_threads(1)  # a shared 2-core CI machine: threads only contend
    d = tmp_path_factory.mktemp("torch")
    digits, diabetes = datasets["digits"], datasets["diabetes"]

    def train(model: Any, x: np.ndarray, y: np.ndarray, loss: Callable, steps: int) -> Any:
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        for _ in range(steps):
            opt.zero_grad()
            loss(model(xt), yt).backward()
            opt.step()
        return model.eval()

    x01 = (digits.X / 16.0).astype(np.float32)
    np.savez(d / "digits01.npz", X=x01, y=digits.y)
    np.savez(d / "digits_images.npz", X=x01.reshape(-1, 1, 8, 8), y=digits.y)
    ce = nn.functional.cross_entropy
    mlp = train(
        nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)),
        x01, digits.y.astype(np.int64), ce, 60,
    )  # fmt: skip
    torch.save(mlp, d / "mlp.pt")
    with warnings.catch_warnings():
        # torch 2.13 deprecates TorchScript; users still hand over such files
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(mlp).save(str(d / "mlp_script.pt"))
    scale = diabetes.y.std()
    reg = train(
        nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 1)),
        diabetes.X * 20, (diabetes.y / scale).astype(np.float32).reshape(-1, 1),
        nn.functional.mse_loss, 80,
    )  # fmt: skip
    torch.save(reg, d / "regressor.pt")
    np.savez(d / "diabetes20.npz", X=diabetes.X * 20, y=diabetes.y / scale)
    cnn = train(
        nn.Sequential(
            nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10),
            nn.LogSoftmax(dim=1),
        ),
        x01.reshape(-1, 1, 8, 8), digits.y.astype(np.int64), nn.functional.nll_loss, 40,
    )  # fmt: skip
    torch.save(cnn, d / "cnn.pt")
    return {
        "mlp.pt": Source(d / "mlp.pt", d / "digits01.npz", "classification"),
        "mlp_script.pt": Source(d / "mlp_script.pt", d / "digits01.npz", "classification"),
        "regressor.pt": Source(d / "regressor.pt", d / "diabetes20.npz", "regression"),
        "cnn.pt": Source(d / "cnn.pt", d / "digits_images.npz", "classification"),
    }
