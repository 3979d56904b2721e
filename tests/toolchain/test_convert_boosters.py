"""XGBoost, LightGBM and CatBoost → ONNX: pickles, native files and Pipelines, with parity.

The models are trained in the session (``conftest.py``) on datasets scikit-learn ships.
Trees compare float32 inputs, so every classifier must agree on every row and regressors
must stay within float32 summation error.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

import numpy as np
import pytest

from toolchain.convert import convert
from toolchain.data import load_data
from toolchain.errors import UnsupportedModelError
from toolchain.runner import ModelRunner
from toolchain.sidecar import read_sidecar
from toolchain.sources import load_source

CASES = {
    "xgboost": [
        "classifier-iris.joblib",
        "classifier-breast_cancer.json",
        "regressor-diabetes.joblib",
        "regressor-diabetes.json",
        "regressor-diabetes.ubj",
        "pipeline-wine.joblib",
        "pipeline-diabetes.joblib",
    ],
    "lightgbm": [
        "classifier-iris.joblib",
        "classifier-iris.txt",
        "classifier-breast_cancer.txt",
        "regressor-diabetes.joblib",
        "regressor-diabetes.txt",
        "pipeline-wine.joblib",
        "pipeline-diabetes.joblib",
    ],
    "catboost": [
        "classifier-iris.joblib",
        "classifier-breast_cancer.cbm",
        "regressor-diabetes.joblib",
        "regressor-diabetes.cbm",
        "pipeline-wine.joblib",
        "pipeline-diabetes.joblib",
    ],
}
PARAMS = [
    pytest.param(lib, case, id=f"{lib}-{case}") for lib, cases in CASES.items() for case in cases
]


@pytest.mark.parametrize(("library", "case"), PARAMS)
def test_boosted_trees_convert_to_onnx_with_parity(library, case, request, tmp_path):
    source = request.getfixturevalue(f"{library}_sources")[case]
    src = load_source(source.path)
    assert src.task == source.task
    assert src.kind == ("sklearn" if case.startswith("pipeline") else library)
    data = load_data(source.data)

    converted = convert(src, data, out=tmp_path / "model.onnx")

    report = converted.parity
    assert report.passed, report.failures
    assert report.n_rows == data.n_rows
    if source.task == "classification":
        assert report.label_agreement == 1.0  # float32 trees: not a single row flips
        assert report.max_abs_proba_diff is not None and report.max_abs_proba_diff < 1e-5
        assert converted.sidecar.output_schema.classes == sorted({int(v) for v in data.y})
    else:
        assert report.max_abs_error is not None and report.max_abs_error < 1e-3
    side = read_sidecar(converted.path)
    assert side is not None and side.lineage.source_sha256 == src.sha256
    assert side.lineage.source_kind == src.kind
    assert library in side.lineage.tool_versions
    expected = "CatBoost's ONNX export" if library == "catboost" else "onnxmltools"
    assert expected in side.lineage.converter
    runner = ModelRunner.open(converted.path, side.input_schema, side.output_schema)
    assert len(runner.predict(data.X[:3]).scores) == 3


def _batch_dims(path) -> dict[str, list[Any]]:
    import onnx

    graph = onnx.load(str(path)).graph
    return {
        o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]
        for o in graph.output
    }


@pytest.mark.parametrize("case", ["classifier-iris.joblib", "classifier-iris.txt"])
def test_lightgbm_classifier_declares_a_dynamic_batch_on_every_output(
    case, lightgbm_sources, tmp_path, capfd
):
    """onnxmltools' convert_lightgbm declares the label as shape [1]; onnxruntime then warns
    "Expected shape from model of {1} does not match actual shape of {150}" on every batch."""
    source = lightgbm_sources[case]
    converted = convert(load_source(source.path), load_data(source.data), out=tmp_path / "m.onnx")
    dims = _batch_dims(converted.path)
    assert all(shape and shape[0] != 1 for shape in dims.values()), dims
    capfd.readouterr()
    side = converted.sidecar
    ModelRunner.open(converted.path, side.input_schema, side.output_schema).predict(
        load_data(source.data).X
    )
    assert "does not match actual shape" not in capfd.readouterr().err


def test_catboost_export_has_no_zipmap_and_a_two_dimensional_regression_output(
    catboost_sources, tmp_path
):
    import onnx

    for case in ("classifier-iris.joblib", "regressor-diabetes.cbm"):
        source = catboost_sources[case]
        out = tmp_path / f"{case}.onnx"
        convert(load_source(source.path), load_data(source.data), out=out)
        ops = {n.op_type for n in onnx.load(str(out)).graph.node}
        assert "ZipMap" not in ops and ops & {"TreeEnsembleClassifier", "TreeEnsembleRegressor"}
    assert next(iter(_batch_dims(out).values()))[1:] == [1]


# --- bad input --------------------------------------------------------------------------


def test_a_json_file_that_is_not_an_xgboost_model_is_refused_with_the_library_named(tmp_path):
    pytest.importorskip("xgboost")
    path = tmp_path / "model.json"
    path.write_text(json.dumps({"weights": [1, 2, 3]}))
    with pytest.raises(UnsupportedModelError, match=r"reading the xgboost model of model\.json"):
        load_source(path)


def test_a_txt_file_that_is_not_a_lightgbm_booster_is_an_unknown_type(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("tr\nnot a model\n")
    with pytest.raises(UnsupportedModelError, match=r"unknown type '\.txt'.*LightGBM Booster"):
        load_source(path)


def test_a_corrupt_catboost_file_is_refused(tmp_path):
    pytest.importorskip("catboost")
    path = tmp_path / "model.cbm"
    path.write_bytes(b"CBM1 broken")
    with pytest.raises(UnsupportedModelError, match=r"reading the catboost model of model\.cbm"):
        load_source(path)


def test_unfitted_boosting_wrapper_is_refused(save_model):
    xgb = pytest.importorskip("xgboost")
    with pytest.raises(UnsupportedModelError, match="unfitted XGBClassifier"):
        load_source(save_model(xgb.XGBClassifier(), "unfitted_xgb"))


def test_boosting_converter_registration_leaves_plain_sklearn_pipelines_alone(
    datasets, save_model, tmp_path
):
    """Registering the boosting converters happens per model; a scikit-learn model after a
    booster still converts with skl2onnx alone (its lineage names no onnxmltools)."""
    pytest.importorskip("xgboost")
    from sklearn.tree import DecisionTreeClassifier

    iris = datasets["iris"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = DecisionTreeClassifier(max_depth=3, random_state=0).fit(iris.X, iris.y)
    converted = convert(
        load_source(save_model(model, "tree_after_boosters")),
        load_data(iris.npz),
        out=tmp_path / "t.onnx",
    )
    assert converted.sidecar.lineage.converter.startswith("skl2onnx")
    assert "onnxmltools" not in converted.sidecar.lineage.converter
    assert np.isclose(converted.parity.label_agreement or 0, 1.0)


def test_a_pickle_of_a_library_that_is_missing_names_the_extra(tmp_path):
    path = tmp_path / "model.pkl"
    path.write_bytes(b"clightgbm.no_such_module\nLGBMClassifier\n.")  # pickle's GLOBAL opcode
    with pytest.raises(UnsupportedModelError, match=r"pip install 'edgefleet\[lightgbm\]'"):
        load_source(path)


def test_catboost_with_categorical_features_is_refused_in_one_line(datasets, save_model, tmp_path):
    """CatBoost's own ONNX export cannot write categorical features; the README says so."""
    cb = pytest.importorskip("catboost")
    import pandas as pd

    from toolchain.data import dataset_from_arrays
    from toolchain.errors import ConversionError

    iris = datasets["iris"]
    frame = pd.DataFrame(iris.X, columns=["a", "b", "c", "d"])
    frame["a"] = (frame["a"] > 5.5).astype(int)
    model = cb.CatBoostClassifier(
        iterations=5, verbose=False, allow_writing_files=False, thread_count=1, cat_features=["a"]
    ).fit(frame, iris.y)
    with pytest.raises(ConversionError, match=r"CatBoostClassifier.*categorical features") as info:
        convert(
            load_source(save_model(model, "catboost_cat")),
            dataset_from_arrays(frame, iris.y),
            out=tmp_path / "m.onnx",
        )
    assert "\n" not in str(info.value)


def test_lightgbm_thresholds_between_adjacent_float32_values_keep_every_label(
    datasets, save_model, tmp_path
):
    """LightGBM splits at float64 midpoints; between two adjacent float32 values the nearest
    float32 sends one of them the wrong way (3 % of labels flipped before the round-down)."""
    lgb = pytest.importorskip("lightgbm")
    from toolchain.data import dataset_from_arrays

    rng = np.random.default_rng(0)
    steps = [np.float32(1.0)]
    for _ in range(40):
        steps.append(np.nextafter(steps[-1], np.float32(2.0)))
    X = np.column_stack(
        [rng.choice(np.array(steps), 400), rng.normal(size=400).astype(np.float32)]
    ).astype(np.float32)
    y = (X[:, 0] > steps[20]).astype(int)
    model = lgb.LGBMClassifier(n_estimators=5, min_child_samples=2, verbose=-1, n_jobs=1)
    model.fit(X, y)
    native = tmp_path / "adjacent.txt"
    model.booster_.save_model(native)
    for path in (save_model(model, "lgb_adjacent"), native):
        converted = convert(
            load_source(path), dataset_from_arrays(X, y), out=tmp_path / f"{path.stem}.onnx"
        )
        assert converted.parity.label_agreement == 1.0, path.name
        assert converted.parity.max_abs_proba_diff < 1e-5
