"""scikit-learn → ONNX: every supported model converts with parity on its own data."""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from toolchain.convert import convert
from toolchain.data import load_data
from toolchain.errors import DataError, ParityError, UnsupportedModelError
from toolchain.parity import ParityThresholds
from toolchain.runner import ModelRunner
from toolchain.sidecar import read_sidecar
from toolchain.sources import load_source


def _cases() -> list[Any]:
    from sklearn import ensemble, linear_model, neighbors, neural_network, svm, tree
    from sklearn.decomposition import PCA
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    Factory = Callable[[], Any]
    table: list[tuple[str, str, Factory]] = [
        ("LogisticRegression", "iris", lambda: linear_model.LogisticRegression(max_iter=1000)),
        ("LinearRegression", "diabetes", linear_model.LinearRegression),
        ("Ridge", "diabetes", linear_model.Ridge),
        (
            "DecisionTreeClassifier",
            "breast_cancer",
            lambda: tree.DecisionTreeClassifier(random_state=0),
        ),
        (
            "DecisionTreeRegressor",
            "diabetes",
            lambda: tree.DecisionTreeRegressor(max_depth=8, random_state=0),
        ),
        (
            "RandomForestClassifier",
            "digits",
            lambda: ensemble.RandomForestClassifier(n_estimators=30, random_state=0),
        ),
        (
            "RandomForestRegressor",
            "diabetes",
            lambda: ensemble.RandomForestRegressor(n_estimators=30, random_state=0),
        ),
        (
            "GradientBoostingClassifier",
            "wine",
            lambda: ensemble.GradientBoostingClassifier(n_estimators=30, random_state=0),
        ),
        (
            "GradientBoostingRegressor",
            "diabetes",
            lambda: ensemble.GradientBoostingRegressor(n_estimators=30, random_state=0),
        ),
        (
            "HistGradientBoostingClassifier",
            "breast_cancer",
            lambda: ensemble.HistGradientBoostingClassifier(max_iter=40, random_state=0),
        ),
        (
            "HistGradientBoostingClassifier-multiclass",
            "wine",
            lambda: ensemble.HistGradientBoostingClassifier(max_iter=20, random_state=0),
        ),
        (
            "HistGradientBoostingRegressor",
            "diabetes",
            lambda: ensemble.HistGradientBoostingRegressor(max_iter=40, random_state=0),
        ),
        ("SVC", "iris", svm.SVC),
        ("SVR", "diabetes", svm.SVR),
        ("KNeighborsClassifier", "wine", neighbors.KNeighborsClassifier),
        ("KNeighborsRegressor", "diabetes", neighbors.KNeighborsRegressor),
        (
            "MLPClassifier",
            "digits",
            lambda: neural_network.MLPClassifier((32,), max_iter=100, random_state=0),
        ),
        (
            "MLPRegressor",
            "diabetes",
            lambda: neural_network.MLPRegressor(
                hidden_layer_sizes=(16,), max_iter=200, random_state=0
            ),
        ),
        (
            "Pipeline(StandardScaler,LogisticRegression)",
            "breast_cancer",
            lambda: make_pipeline(StandardScaler(), linear_model.LogisticRegression(max_iter=1000)),
        ),
        (
            "Pipeline(StandardScaler,RandomForestClassifier)",
            "digits",
            lambda: make_pipeline(
                StandardScaler(), ensemble.RandomForestClassifier(n_estimators=20, random_state=0)
            ),
        ),
        (
            "Pipeline(StandardScaler,RandomForestRegressor)",
            "diabetes",
            lambda: make_pipeline(
                StandardScaler(), ensemble.RandomForestRegressor(n_estimators=20, random_state=0)
            ),
        ),
        (
            "Pipeline(StandardScaler,PCA,LogisticRegression)",
            "digits",
            lambda: make_pipeline(
                StandardScaler(),
                PCA(12, random_state=0),
                linear_model.LogisticRegression(max_iter=1000),
            ),
        ),
    ]
    return [pytest.param(data, factory, id=name) for name, data, factory in table]


def _is_tree(model: Any) -> bool:
    while getattr(model, "steps", None):
        model = model.steps[-1][1]
    name = type(model).__name__
    return any(k in name for k in ("Tree", "Forest", "GradientBoosting"))


@pytest.mark.parametrize(("dataset", "factory"), _cases())
def test_sklearn_model_converts_to_onnx_with_parity(
    dataset, factory, datasets, save_model, fit, tmp_path, request
):
    data_files = datasets[dataset]
    model = fit(factory(), data_files.X, data_files.y)
    src = load_source(
        save_model(model, request.node.callspec.id.replace("(", "_").replace(")", "_"))
    )
    converted = convert(src, load_data(data_files.npz), out=tmp_path / "model.onnx")

    report = converted.parity
    assert report.passed, report.failures
    assert report.n_rows == len(data_files.X)
    schema = converted.sidecar.output_schema
    if src.task == "classification":
        assert schema.classes == [int(c) for c in model.classes_]
        if _is_tree(model):  # float/double thresholds handled: not a single row flips
            assert report.label_agreement == 1.0
        else:
            assert report.label_agreement >= 0.999
        if hasattr(model, "predict_proba"):
            assert schema.probability_output is not None
            assert report.max_abs_proba_diff is not None and report.max_abs_proba_diff <= 1e-3
    else:
        assert report.max_abs_error is not None
        tolerance = 1e-3 + 1e-3 * np.abs(model.predict(data_files.X)).max()
        assert report.max_abs_error <= tolerance
    # the converted file runs from its sidecar alone, as bench/package will use it
    side = read_sidecar(converted.path)
    assert side is not None and side.lineage.source_sha256 == src.sha256
    runner = ModelRunner.open(converted.path, side.input_schema, side.output_schema)
    assert len(runner.predict(data_files.X[:3]).scores) == 3


def test_hist_gradient_boosting_regressor_matches_sklearn_to_float32_precision(
    datasets, save_model, tmp_path
):
    """skl2onnx rounds HGB thresholds to nearest; without our round-down 30/442 rows flip."""
    from sklearn.ensemble import HistGradientBoostingRegressor

    diabetes = datasets["diabetes"]
    model = HistGradientBoostingRegressor(max_iter=50, random_state=0).fit(diabetes.X, diabetes.y)
    converted = convert(
        load_source(save_model(model, "hgb_reg")),
        load_data(diabetes.npz),
        out=tmp_path / "hgb.onnx",
    )
    assert converted.parity.max_rel_error is not None and converted.parity.max_rel_error < 1e-5


def test_protobuf_stays_below_7_because_skl2onnx_fails_on_hist_gradient_boosting():
    from google import protobuf

    major = int(protobuf.__version__.split(".")[0])
    assert major < 7, (
        f"protobuf {protobuf.__version__}: skl2onnx 1.20 fails on HistGradientBoosting* with "
        "protobuf ≥ 7 ('Expected an int, got a boolean'); see DESIGN.md 'Known version traps'"
    )


def test_column_transformer_pipeline_gets_one_input_per_column(mixed_csv, save_model, tmp_path):
    import pandas as pd
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    frame = pd.read_csv(mixed_csv)
    y = frame.pop("species")
    pipe = Pipeline(
        [
            (
                "prep",
                ColumnTransformer(
                    [
                        ("num", StandardScaler(), ["sepal_length", "sepal_width", "petal_width"]),
                        ("cat", OneHotEncoder(handle_unknown="ignore"), ["size", "shape"]),
                    ]
                ),
            ),
            ("clf", LogisticRegression(max_iter=1000)),
        ]
    ).fit(frame, y)
    source = load_source(save_model(pipe, "mixed"))
    assert source.name == "Pipeline(ColumnTransformer,LogisticRegression)"
    data = load_data(mixed_csv, target="species")
    assert data.kinds == ["numeric", "numeric", "categorical", "categorical", "numeric"]

    converted = convert(source, data, out=tmp_path / "mixed.onnx")
    assert converted.parity.passed and converted.parity.label_agreement == 1.0
    schema = converted.sidecar.input_schema
    assert [(i.name, i.dtype, i.features) for i in schema.inputs] == [
        ("sepal_length", "float32", ["sepal_length"]),
        ("sepal_width", "float32", ["sepal_width"]),
        ("size", "string", ["size"]),
        ("shape", "string", ["shape"]),
        ("petal_width", "float32", ["petal_width"]),
    ]
    size = next(f for f in schema.features if f.name == "size")
    assert size.kind == "categorical" and size.categories == ["large", "medium", "small"]
    assert converted.sidecar.output_schema.classes == ["setosa", "versicolor", "virginica"]
    runner = ModelRunner.open(converted.path, schema, converted.sidecar.output_schema)
    pred = runner.predict([[5.1, 3.5, "small", "round", 0.2]])
    assert pred.labels == ["setosa"]


def test_sidecar_records_feature_names_ranges_and_lineage(datasets, save_model, fit, tmp_path):
    from sklearn.tree import DecisionTreeClassifier

    wine = datasets["wine"]
    model = fit(DecisionTreeClassifier(max_depth=4, random_state=0), wine.X, wine.y)
    converted = convert(
        load_source(save_model(model, "wine_lr")),
        load_data(wine.csv, target="target"),
        out=tmp_path / "wine.onnx",
    )
    side = converted.sidecar
    assert side.input_schema.feature_names == wine.feature_names
    alcohol = side.input_schema.features[0]
    assert alcohol.min == pytest.approx(wine.X[:, 0].min()) and alcohol.max == pytest.approx(
        wine.X[:, 0].max()
    )
    assert not alcohol.allow_nan
    assert (
        side.lineage.source_kind == "sklearn"
        and side.lineage.source_name == "DecisionTreeClassifier"
    )
    assert side.lineage.settings["zipmap"] is False
    assert {"scikit-learn", "skl2onnx", "onnx", "onnxruntime"} <= set(side.lineage.tool_versions)
    assert side.parity is not None and side.parity["passed"] is True
    assert side.quantization.mode == "none"


def test_convert_raises_parity_error_with_report_when_thresholds_are_impossible(
    datasets, save_model, fit, tmp_path
):
    from sklearn.linear_model import LogisticRegression

    iris = datasets["iris"]
    model = fit(LogisticRegression(max_iter=1000), iris.X, iris.y)
    strict = ParityThresholds(max_proba_diff=0.0)
    with pytest.raises(ParityError, match=r"max \|Δprobability\|") as info:
        convert(
            load_source(save_model(model, "iris_lr")),
            load_data(iris.npz),
            out=tmp_path / "m.onnx",
            thresholds=strict,
        )
    report = info.value.report
    assert not report.passed and report.max_abs_proba_diff > 0
    assert any(row[0] == "max |Δprobability|" and row[3] == "NO" for row in report.rows())


# --- bad input --------------------------------------------------------------------------


def test_load_source_rejects_unknown_file_type(tmp_path):
    path = tmp_path / "model.txt"
    path.write_text("not a model")
    with pytest.raises(UnsupportedModelError, match=r"unknown type '\.txt'"):
        load_source(path)


def test_load_source_rejects_a_pickle_that_is_not_a_model(tmp_path):
    path = tmp_path / "weights.pkl"
    path.write_bytes(pickle.dumps({"coef": [1, 2, 3]}))
    with pytest.raises(UnsupportedModelError, match=r"holds a builtins\.dict, not a scikit-learn"):
        load_source(path)


def test_load_source_rejects_a_corrupt_pickle(tmp_path):
    path = tmp_path / "model.joblib"
    path.write_bytes(b"\x80\x05garbage")
    with pytest.raises(UnsupportedModelError, match=r"cannot unpickle model\.joblib"):
        load_source(path)


def test_load_source_rejects_an_unfitted_estimator(tmp_path, save_model):
    from sklearn.linear_model import LogisticRegression

    with pytest.raises(UnsupportedModelError, match="unfitted LogisticRegression"):
        load_source(save_model(LogisticRegression(), "unfitted"))


def test_convert_rejects_feature_count_mismatch(datasets, save_model, tmp_path):
    from sklearn.tree import DecisionTreeClassifier

    iris, wine = datasets["iris"], datasets["wine"]
    model = DecisionTreeClassifier(random_state=0).fit(iris.X, iris.y)
    with pytest.raises(DataError, match="expects 4 features but the data has 13"):
        convert(
            load_source(save_model(model, "iris_tree")),
            load_data(wine.npz),
            out=tmp_path / "m.onnx",
        )
    assert not (tmp_path / "m.onnx").exists()


def test_convert_rejects_data_missing_a_column_the_pipeline_was_fit_on(
    mixed_csv, save_model, tmp_path
):
    import pandas as pd
    from sklearn.linear_model import LogisticRegression

    frame = pd.read_csv(mixed_csv)[["sepal_length", "sepal_width", "petal_width", "species"]]
    y = frame.pop("species")
    model = LogisticRegression(max_iter=500).fit(frame, y)
    other = tmp_path / "other.csv"
    frame.rename(columns={"petal_width": "width"}).assign(species=y).to_csv(other, index=False)
    with pytest.raises(DataError, match=r"columns the data lacks: \['petal_width'\]"):
        convert(
            load_source(save_model(model, "named")),
            load_data(other, target="species"),
            out=tmp_path / "m.onnx",
        )


def test_convert_rejects_string_columns_for_a_numbers_only_model(mixed_csv, save_model, tmp_path):
    from sklearn.tree import DecisionTreeClassifier

    data = load_data(mixed_csv, target="species")
    model = DecisionTreeClassifier().fit(np.zeros((4, 5)), [0, 1, 0, 1])
    with pytest.raises(DataError, match="column 'size' holds strings"):
        convert(load_source(save_model(model, "numeric_only")), data, out=tmp_path / "m.onnx")


def test_convert_rejects_sklearn_to_tflite(datasets, save_model, tmp_path):
    from sklearn.tree import DecisionTreeClassifier

    from toolchain.errors import ConversionError

    iris = datasets["iris"]
    model = DecisionTreeClassifier().fit(iris.X, iris.y)
    with pytest.raises(ConversionError, match="TFLite conversion takes a Keras model"):
        convert(
            load_source(save_model(model, "t")),
            load_data(iris.npz),
            to="tflite",
            out=tmp_path / "m.tflite",
        )


# --- parity arithmetic ------------------------------------------------------------------


def test_regression_parity_uses_absolute_bound_near_zero_and_relative_bound_for_large_values():
    from protocol.feeds import Prediction
    from toolchain.parity import compare

    ref = Prediction(values=np.array([[0.0], [1000.0]]))
    close = Prediction(values=np.array([[0.0009], [1000.9]]))  # abs 9e-4; rel 9e-4
    assert compare(ref, close, "regression").passed
    far = Prediction(values=np.array([[0.0011], [1000.0]]))
    report = compare(ref, far, "regression")
    assert not report.passed and "1 of 2 values differ" in report.failures[0]
    assert report.max_abs_error == pytest.approx(0.0011)


def test_classification_parity_counts_label_flips_and_compares_string_and_int_labels():
    from protocol.feeds import Prediction
    from toolchain.parity import ParityThresholds, compare

    ref = Prediction(labels=[0, 1, 1, 2] * 250)
    cand = Prediction(labels=["0", "1", "1", "2"] * 250)
    assert compare(ref, cand, "classification").label_agreement == 1.0
    flipped = Prediction(labels=[0, 1, 1, 2] * 249 + [0, 1, 2, 2])
    report = compare(ref, flipped, "classification")
    assert report.label_agreement == pytest.approx(0.999) and report.passed
    strict = compare(ref, flipped, "classification", ParityThresholds(min_label_agreement=1.0))
    assert not strict.passed and "1 of 1000 rows differ" in strict.failures[0]


# --- the former gaps: HGB categorical features, integer column selection, SVC probabilities --


def _with_categories(X: np.ndarray, columns: dict[int, int]) -> np.ndarray:
    """X with each named column replaced by its quantile bin (k bins), coded 10·bin + 3 so
    the codes are neither 0 … k-1 nor small (the graph must compare raw values)."""
    Xc = X.copy()
    for col, k in columns.items():
        edges = np.quantile(X[:, col], np.linspace(0, 1, k + 1)[1:-1])
        Xc[:, col] = np.digitize(X[:, col], edges) * 10 + 3
    return Xc.astype(np.float32)


@pytest.mark.parametrize(
    ("dataset", "columns"),
    [("wine", {0: 4, 5: 3}), ("diabetes", {0: 12, 1: 2})],
    ids=["classifier-wine", "regressor-diabetes"],
)
def test_hist_gradient_boosting_with_native_categorical_features_keeps_parity(
    dataset, columns, datasets, save_model, tmp_path
):
    """skl2onnx ignores HGB's categorical splits and its column reordering; without our
    rewrite most rows of the regressor are far off."""
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor

    from toolchain.data import dataset_from_arrays

    data_files = datasets[dataset]
    X = _with_categories(data_files.X, columns)
    cls = HistGradientBoostingClassifier if dataset == "wine" else HistGradientBoostingRegressor
    model = cls(max_iter=20, categorical_features=list(columns), random_state=0).fit(
        X, data_files.y
    )
    converted = convert(
        load_source(save_model(model, f"hgb_cat_{dataset}")),
        dataset_from_arrays(X, data_files.y),
        out=tmp_path / "hgb.onnx",
    )
    report = converted.parity
    assert report.passed, report.failures
    side = converted.sidecar
    runner = ModelRunner.open(converted.path, side.input_schema, side.output_schema)
    # categories never seen in training follow the split's missing-value direction
    unseen = X[:40].copy()
    unseen[:, next(iter(columns))] = 999.0
    if dataset == "wine":
        assert report.label_agreement == 1.0
        got = np.asarray(runner.predict(unseen).probabilities)
        assert np.abs(got - model.predict_proba(unseen)).max() < 1e-5
    else:
        assert report.max_rel_error is not None and report.max_rel_error < 1e-5
        got = np.asarray(runner.predict(unseen).values).ravel()
        assert np.abs(got - model.predict(unseen)).max() < 1e-3


def test_hist_gradient_boosting_with_string_categories_is_refused(save_model, tmp_path):
    import pandas as pd
    from sklearn.ensemble import HistGradientBoostingClassifier

    from toolchain.data import dataset_from_arrays
    from toolchain.errors import ToolchainError

    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {"size": rng.choice(["s", "m", "l"], 120), "x": rng.normal(size=120).astype(np.float32)}
    )
    y = (frame["x"] > 0).astype(int)
    model = HistGradientBoostingClassifier(max_iter=5, categorical_features=["size"]).fit(frame, y)
    with pytest.raises(ToolchainError, match=r"column 'size' holds strings"):
        convert(
            load_source(save_model(model, "hgb_strings")),
            dataset_from_arrays(frame, y),
            out=tmp_path / "m.onnx",
        )


def test_column_transformer_selecting_columns_by_integer_index_converts(
    mixed_csv, save_model, tmp_path
):
    import pandas as pd
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    frame = pd.read_csv(mixed_csv)
    y = frame.pop("species")
    prep = ColumnTransformer(
        [
            ("num", StandardScaler(), [0, 1, 4]),
            ("cat", OneHotEncoder(handle_unknown="ignore"), [2, 3]),
        ]
    )
    for fit_on in (frame, frame.to_numpy()):  # named columns, and a bare object array
        pipe = make_pipeline(prep, LogisticRegression(max_iter=1000)).fit(fit_on, y)
        converted = convert(
            load_source(save_model(pipe, "ct_int")),
            load_data(mixed_csv, target="species"),
            out=tmp_path / "ct.onnx",
        )
        report = converted.parity
        assert report.passed and report.label_agreement == 1.0
        assert report.max_abs_proba_diff is not None and report.max_abs_proba_diff < 1e-5
        assert [i.name for i in converted.sidecar.input_schema.inputs] == list(frame.columns)


def test_svc_with_probability_true_converts_with_probabilities(datasets, save_model, tmp_path):
    from sklearn.svm import SVC

    iris = datasets["iris"]
    with warnings.catch_warnings():
        # scikit-learn 1.9 deprecates probability=True (removal in 1.11); pickles made with it
        # are what users have, so conversion keeps supporting them while scikit-learn does
        warnings.filterwarnings("ignore", message="The `probability` parameter was deprecated")
        model = SVC(probability=True, random_state=0).fit(iris.X, iris.y)
    converted = convert(
        load_source(save_model(model, "svc_proba")), load_data(iris.npz), out=tmp_path / "s.onnx"
    )
    report = converted.parity
    assert report.passed and report.label_agreement == 1.0
    assert report.max_abs_proba_diff is not None and report.max_abs_proba_diff < 1e-4
    assert converted.sidecar.output_schema.probability_output is not None
