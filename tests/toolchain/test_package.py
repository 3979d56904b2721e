"""Packaging: a signed bundle whose manifest, sketch, smoke tests and card are all real."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from protocol.bundle import read_bundle, verify_bundle
from protocol.manifest import MODEL_CARD_NAME, REFERENCE_SKETCH_NAME
from protocol.profiles import load_profile
from protocol.signing import TrustStore
from protocol.sketches import SketchSet
from tests.toolchain import fixtures_pkg as fx
from toolchain.data import load_data
from toolchain.errors import ToolchainError
from toolchain.package import default_release, package, parse_fallback

iris, iris_joblib, iris_onnx, keys, iris_bundle = (
    fx.iris,
    fx.iris_joblib,
    fx.iris_onnx,
    fx.keys,
    fx.iris_bundle,
)


def test_packaged_bundle_verifies_with_the_signing_public_key(iris_bundle, keys):
    path, manifest = iris_bundle
    bundle = read_bundle(path)
    verified = verify_bundle(
        bundle, TrustStore.from_files([keys.public_path]), profile=load_profile("host")
    )
    assert verified == manifest
    assert bundle.signature.key_id == keys.key_id
    assert set(bundle.members) == {"model.onnx", REFERENCE_SKETCH_NAME, MODEL_CARD_NAME}


def test_manifest_records_lineage_targets_and_validity(iris_bundle, iris_joblib):
    _, m = iris_bundle
    from toolchain.sources import file_sha256

    assert m.lineage.source_sha256 == file_sha256(iris_joblib)
    assert m.lineage.source_kind == "sklearn"
    assert {"onnx", "onnxruntime", "skl2onnx", "scikit-learn"} <= set(m.lineage.tool_versions)
    assert m.profiles == ["host", "raspberry-pi-4"]
    for target in m.targets:
        assert target.benchmark is not None and target.benchmark.estimated
        assert target.benchmark.p50_ms > 0
    pi = m.targets[1].benchmark
    host = m.targets[0].benchmark
    # The same host timing scaled by each profile's speed factor (6.0 for a Pi 4): an estimate.
    assert pi is not None and host is not None and pi.p50_ms > host.p50_ms
    assert m.expires_at - m.created_at == timedelta(days=180)
    assert m.release == default_release(m.created_at)
    assert m.model.opset and m.model.operators and m.model.size_bytes > 0


def test_smoke_tests_hold_the_outputs_of_the_packaged_model_itself(iris_bundle, tmp_path):
    from toolchain.runner import ModelRunner

    path, m = iris_bundle
    model = tmp_path / "model.onnx"
    model.write_bytes(read_bundle(path).model_bytes())
    (smoke,) = m.smoke_tests
    assert len(smoke.rows) == 8
    pred = ModelRunner.open(model, m.input_schema, m.output_schema).predict(np.array(smoke.rows))
    assert pred.labels == smoke.expected_labels
    np.testing.assert_allclose(pred.probabilities, smoke.expected_probabilities, atol=smoke.atol)


def test_reference_sketch_summarises_every_reference_row(iris_bundle, iris):
    path, m = iris_bundle
    sketch = SketchSet.from_bytes(read_bundle(path).members[REFERENCE_SKETCH_NAME])
    assert sketch.rows == len(iris.X)
    first = m.input_schema.features[0].name
    kll = sketch.features[first].kll()
    assert kll.get_min_value() == pytest.approx(float(iris.X[:, 0].min()))


def test_model_card_describes_inputs_targets_and_parity(iris_bundle):
    path, m = iris_bundle
    card = read_bundle(path).members[MODEL_CARD_NAME].decode()
    assert card.startswith("# iris 1.0.0")
    assert "RandomForestClassifier" in card and "raspberry-pi-4" in card
    assert "label_agreement" in card and "estimate" in card
    for f in m.input_schema.features:
        assert f"| {f.name} |" in card


def test_explicit_release_fallback_and_expiry_are_recorded(iris, iris_onnx, keys, tmp_path):
    now = datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    m = package(
        iris_onnx,
        name="iris",
        version="1.1.0-rc.1",
        profiles=[load_profile("host")],
        reference=load_data(iris.npz),
        key_path=keys.private_path,
        out=tmp_path / "b.efb",
        release=42,
        expires_days=7,
        fallback=parse_fallback("constant:1"),
        now=now,
        runs=10,
    )
    assert m.release == 42 and m.fallback.kind == "constant" and m.fallback.value == 1
    assert m.created_at == now and m.expires_at == now + timedelta(days=7)
    assert [p.name for p in tmp_path.iterdir()] == ["b.efb"]  # no temp file left behind


def test_default_release_grows_with_time():
    t = datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    assert default_release(t) == 20300102030405
    assert default_release(t + timedelta(seconds=1)) > default_release(t)


@pytest.mark.parametrize(
    ("name", "version", "match"),
    [("Iris", "1.0.0", "name"), ("iris", "1.0", "semantic versioning")],
)
def test_package_refuses_bad_names_and_versions_before_any_work(
    name, version, match, iris, iris_onnx, keys, tmp_path
):
    with pytest.raises(ToolchainError, match=match):
        package(
            iris_onnx,
            name=name,
            version=version,
            profiles=[load_profile("host")],
            reference=load_data(iris.npz),
            key_path=keys.private_path,
            out=tmp_path / "b.efb",
        )
    assert not (tmp_path / "b.efb").exists()


def test_parse_fallback_refuses_unknown_kinds():
    assert parse_fallback("previous").kind == "previous"
    assert parse_fallback("constant:setosa").value == "setosa"
    with pytest.raises(ToolchainError, match="fallback"):
        parse_fallback("random")


def test_mixed_numeric_and_categorical_pipeline_packages_with_categorical_sketches(
    mixed_csv, keys, tmp_path
):
    import joblib
    import pandas as pd
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    from toolchain.convert import convert
    from toolchain.sources import load_source

    frame = pd.read_csv(mixed_csv)
    X = frame.drop(columns="species")
    columns = ColumnTransformer(
        [
            ("num", StandardScaler(), ["sepal_length", "sepal_width", "petal_width"]),
            ("cat", OneHotEncoder(handle_unknown="ignore"), ["size", "shape"]),
        ]
    )
    model = Pipeline([("cols", columns), ("lr", LogisticRegression(max_iter=500))])
    joblib.dump(model.fit(X, frame["species"]), tmp_path / "mixed.joblib")
    data = load_data(mixed_csv, target="species")
    onnx_path = convert(load_source(tmp_path / "mixed.joblib"), data, out=tmp_path / "m.onnx").path
    m = package(
        onnx_path, name="mixed", version="1.0.0", profiles=[load_profile("host")],
        reference=data, key_path=keys.private_path, out=tmp_path / "mixed.efb", runs=10,
    )  # fmt: skip
    verify_bundle(read_bundle(tmp_path / "mixed.efb"), TrustStore.from_files([keys.public_path]))
    sketch = SketchSet.from_bytes(
        read_bundle(tmp_path / "mixed.efb").members[REFERENCE_SKETCH_NAME]
    )
    assert sketch.features["size"].kind == "categorical"
    assert sketch.features["sepal_length"].kind == "numeric"
    rows = m.smoke_tests[0].rows
    assert all(isinstance(r[2], str) for r in rows)
    assert set(m.smoke_tests[0].expected_labels or []) <= {"setosa", "versicolor", "virginica"}


def test_bundle_lineage_names_the_source_file_but_not_its_local_path(tmp_path):
    """A bundle leaves the build machine: no home directories in its manifest."""
    import joblib
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    from protocol import read_bundle
    from protocol.profiles import load_profile
    from toolchain.build import build
    from toolchain.data import dataset_from_arrays
    from toolchain.keys import generate_keys

    X, y = load_iris(return_X_y=True)
    src = tmp_path / "secret-home" / "iris.joblib"
    src.parent.mkdir()
    joblib.dump(LogisticRegression(max_iter=500).fit(X, y), src)
    key = generate_keys(tmp_path / "keys", "k")
    res = build(
        src,
        dataset_from_arrays(X.astype("float32"), y),
        name="iris",
        version="1.0.0",
        profiles=[load_profile("host")],
        key_path=key.private_path,
        out_dir=tmp_path / "out",
        release=1,
        runs=20,
    )
    assert res.bundle is not None
    manifest = read_bundle(res.bundle).manifest
    assert "secret-home" not in manifest.model_dump_json()
    assert manifest.lineage.settings["source_path"] == "iris.joblib"
