"""Session fixtures for the bench/optimize/package/CLI tests: one tiny model, converted once.

Import the fixtures a test module uses from here (``from tests.toolchain.fixtures_pkg
import iris_onnx``); everything is trained inside the session from scikit-learn's iris.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def profile_toml(
    tmp: Path, name: str, runtimes: list[dict] | None = None, **fields: object
) -> Path:
    """The host profile with ``fields`` (and optionally its runtimes) replaced, as a .toml file."""
    from protocol.profiles import load_profile

    data = load_profile("host").model_dump()
    data.update(name=name, **fields)
    rts = runtimes if runtimes is not None else data["runtimes"]
    lines = [
        f"{k} = {_toml_value(v)}" for k, v in data.items() if k != "runtimes" and v is not None
    ]
    for rt in rts:
        lines.append("[[runtimes]]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in rt.items() if v is not None]
    path = tmp / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class Iris:
    npz: Path
    csv: Path
    X: np.ndarray
    y: np.ndarray


@pytest.fixture(scope="session")
def iris(tmp_path_factory: pytest.TempPathFactory) -> Iris:
    from sklearn.datasets import load_iris

    d = tmp_path_factory.mktemp("iris")
    X, y = load_iris(return_X_y=True)
    X = X.astype(np.float32)
    np.savez(d / "iris.npz", X=X, y=y)
    header = "sepal_length,sepal_width,petal_length,petal_width,species"
    rows = [",".join(f"{v:g}" for v in x) + f",{t}" for x, t in zip(X, y, strict=True)]
    (d / "iris.csv").write_text(header + "\n" + "\n".join(rows) + "\n")
    return Iris(d / "iris.npz", d / "iris.csv", X, y)


@pytest.fixture(scope="session")
def iris_joblib(iris: Iris, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import joblib
    from sklearn.ensemble import RandomForestClassifier

    model = RandomForestClassifier(n_estimators=10, max_depth=5, random_state=0).fit(iris.X, iris.y)
    path = tmp_path_factory.mktemp("src") / "rf.joblib"
    joblib.dump(model, path)
    return path


@pytest.fixture(scope="session")
def iris_onnx(iris: Iris, iris_joblib: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from toolchain.convert import convert
    from toolchain.data import load_data
    from toolchain.sources import load_source

    out = tmp_path_factory.mktemp("onnx") / "rf.onnx"
    return Path(convert(load_source(iris_joblib), load_data(iris.npz), out=out).path)


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory):  # -> GeneratedKey
    from toolchain.keys import generate_keys

    return generate_keys(tmp_path_factory.mktemp("keys"), "release")


@pytest.fixture(scope="session")
def iris_bundle(iris: Iris, iris_onnx: Path, keys, tmp_path_factory: pytest.TempPathFactory):
    """(bundle path, manifest) packaged for host and raspberry-pi-4."""
    from protocol.profiles import load_profile
    from toolchain.data import load_data
    from toolchain.package import package

    out = tmp_path_factory.mktemp("bundle") / "iris-1.0.0.efb"
    manifest = package(
        iris_onnx,
        name="iris",
        version="1.0.0",
        profiles=[load_profile("host"), load_profile("raspberry-pi-4")],
        reference=load_data(iris.npz),
        key_path=keys.private_path,
        out=out,
        runs=20,
    )
    return out, manifest
