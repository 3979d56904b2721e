"""Keras → TFLite (run on LiteRT) and Keras → ONNX: an MLP and a small CNN, with parity."""

from __future__ import annotations

import numpy as np
import pytest

from toolchain.convert import convert
from toolchain.data import load_data
from toolchain.errors import ConversionError, DataError
from toolchain.runner import ModelRunner
from toolchain.sidecar import describe, read_sidecar
from toolchain.sources import load_source

pytestmark = pytest.mark.tflite


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_keras_model_converts_to_tflite_with_parity(name, keras_tflite, keras_models):
    converted = keras_tflite[name]
    assert converted.format == "tflite" and converted.path.suffix == ".tflite"
    report = converted.parity
    assert report.passed, report.failures
    assert report.label_agreement == 1.0 and report.max_abs_proba_diff < 1e-4
    side = read_sidecar(converted.path)
    assert side is not None
    assert side.lineage.source_kind == "keras"
    assert side.lineage.settings["source_path"] == str(keras_models[name].resolve())
    assert side.output_schema.classes == list(range(10))
    expected_shape = [None, 64] if name == "mlp" else [None, 8, 8, 1]
    assert side.input_schema.inputs[0].shape == expected_shape
    assert side.input_schema.n_features == 64


def test_tflite_runner_predicts_batches_of_any_size(keras_tflite, keras_models):
    converted = keras_tflite["cnn"]
    side = converted.sidecar
    runner = ModelRunner.open(converted.path, side.input_schema, side.output_schema, threads=2)
    assert runner.format == "tflite"
    X = load_data(keras_models["data"]).numeric_X()
    one, many = runner.predict(X[:1]), runner.predict(X[:37])
    assert len(one.labels) == 1 and len(many.labels) == 37
    assert one.labels[0] == many.labels[0]
    accuracy = np.mean(np.array(runner.predict(X).labels) == load_data(keras_models["data"]).y)
    assert accuracy > 0.8  # a few epochs on digits; a broken reshape would be near 0.1


def test_describe_infers_a_tflite_schema_without_sidecar(keras_tflite, tmp_path):
    bare = tmp_path / "bare.tflite"
    bare.write_bytes(keras_tflite["mlp"].path.read_bytes())
    side = describe(bare)
    assert side.output_schema.task == "classification" and side.output_schema.classes == list(
        range(10)
    )
    assert side.input_schema.n_features == 64


def test_keras_conversion_rejects_feature_count_mismatch(keras_models, datasets, tmp_path):
    with pytest.raises(DataError, match="digits_cnn expects 64 features but the data has 4"):
        convert(
            load_source(keras_models["cnn"]),
            load_data(datasets["iris"].npz),
            to="tflite",
            out=tmp_path / "x.tflite",
        )


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_keras_model_converts_to_onnx_with_parity(name, keras_models, tmp_path):
    """Keras 3 exports ONNX itself (tf2onnx underneath, in the tflite extra)."""
    pytest.importorskip("tf2onnx")
    converted = convert(
        load_source(keras_models[name]),
        load_data(keras_models["data"]),
        to="onnx",
        out=tmp_path / f"{name}.onnx",
    )
    report = converted.parity
    assert report.passed, report.failures
    assert report.label_agreement == 1.0 and report.max_abs_proba_diff < 1e-4
    side = read_sidecar(converted.path)
    assert side is not None and side.lineage.source_kind == "keras"
    assert "tf2onnx" in side.lineage.converter and "tf2onnx" in side.lineage.tool_versions
    expected_shape = [None, 64] if name == "mlp" else [None, 8, 8, 1]
    assert side.input_schema.inputs[0].shape == expected_shape
    runner = ModelRunner.open(converted.path, side.input_schema, side.output_schema)
    assert runner.format == "onnx"
    assert len(runner.predict(load_data(keras_models["data"]).X[:5]).labels) == 5


def test_keras_source_reports_its_task_and_input_size(keras_models):
    source = load_source(keras_models["cnn"])
    assert source.kind == "keras" and source.task == "classification"
    assert source.n_features == 64 and source.name == "digits_cnn"


def test_saved_model_directory_converts_to_tflite(keras_models, tmp_path):
    import contextlib
    import io

    import keras

    model = keras.models.load_model(keras_models["mlp"])
    saved = tmp_path / "digits_saved_model"
    with contextlib.redirect_stdout(io.StringIO()):  # export prints its signature summary
        model.export(str(saved), format="tf_saved_model")
    source = load_source(saved)
    assert source.kind == "keras" and source.task == "classification"
    assert source.n_features == 64
    converted = convert(source, load_data(keras_models["data"]), to="tflite")
    assert converted.path == tmp_path / "digits_saved_model.tflite"
    assert converted.parity.passed and converted.parity.label_agreement == 1.0
    # Keras → ONNX takes the Keras model itself, not its SavedModel export
    with pytest.raises(ConversionError, match=r"SavedModel directory.*use --to tflite"):
        convert(source, load_data(keras_models["data"]), to="onnx", out=tmp_path / "x.onnx")


def test_keras_regressor_converts_to_tflite_with_value_parity(datasets, tmp_path):
    import keras

    diabetes = datasets["diabetes"]
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((10,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)]
    )
    model.compile(optimizer="adam", loss="mse")
    model.fit(diabetes.X, diabetes.y, epochs=2, verbose=0)
    model.save(tmp_path / "reg.keras")
    source = load_source(tmp_path / "reg.keras")
    assert source.task == "regression"
    converted = convert(source, load_data(diabetes.npz), to="tflite")
    assert converted.parity.passed and converted.parity.max_abs_error is not None
    assert converted.sidecar.output_schema.task == "regression"
