"""Quantization: ONNX dynamic/static/FP16, TFLite dynamic/INT8/FP16, and the refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from toolchain.convert import convert
from toolchain.data import load_data
from toolchain.errors import QuantizationError
from toolchain.quantize import quantize
from toolchain.runner import ModelRunner
from toolchain.sidecar import read_sidecar, sidecar_path
from toolchain.sources import load_source


def _accuracy(path, data) -> float:
    side = read_sidecar(path)
    assert side is not None
    runner = ModelRunner.open(path, side.input_schema, side.output_schema)
    X = data.numeric_X()
    return float(np.mean(np.array(runner.predict(X).labels) == data.y))


@pytest.fixture(scope="module")
def onnx_variants(digits_mlp_onnx, datasets, tmp_path_factory):
    data = load_data(datasets["digits"].npz)
    d = tmp_path_factory.mktemp("quant")
    return {
        mode: quantize(digits_mlp_onnx, mode=mode, data=data, out=d / f"mlp.{mode}.onnx")
        for mode in ("dynamic", "static", "fp16")
    }


@pytest.mark.parametrize(
    ("mode", "max_size_ratio"), [("dynamic", 0.35), ("static", 0.45), ("fp16", 0.55)]
)
def test_onnx_mlp_quantizes_smaller_with_at_most_one_percent_accuracy_drop(
    mode, max_size_ratio, onnx_variants, digits_mlp_onnx, datasets
):
    data = load_data(datasets["digits"].npz)
    q = onnx_variants[mode]
    assert q.format == "onnx" and q.mode == mode
    assert q.size_bytes / digits_mlp_onnx.stat().st_size <= max_size_ratio
    drop = _accuracy(digits_mlp_onnx, data) - _accuracy(q.path, data)
    assert drop <= 0.01
    side = read_sidecar(q.path)
    assert side is not None and side.quantization.mode == mode
    assert side.parity is not None and side.parity["reference"] == "unquantized model"
    assert side.lineage.settings["quantized_from"] == str(digits_mlp_onnx.resolve())


def test_static_quantization_writes_per_channel_qdq_nodes(onnx_variants):
    import onnx

    model = onnx.load(str(onnx_variants["static"].path))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    scales = [
        i
        for i in model.graph.initializer
        if i.name.endswith("_scale") and len(i.dims) == 1 and i.dims[0] > 1
    ]
    assert scales, "per-channel weights carry one scale per output channel"
    details = read_sidecar(onnx_variants["static"].path).quantization.details
    assert details["format"] == "QDQ" and details["per_channel"] is True


def test_fp16_keeps_float32_inputs_and_outputs(onnx_variants):
    import onnx
    from onnx import TensorProto

    model = onnx.load(str(onnx_variants["fp16"].path))
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert any(i.data_type == TensorProto.FLOAT16 for i in model.graph.initializer)


def test_quantizing_a_quantized_model_points_back_to_fp32(onnx_variants, digits_mlp_onnx):
    with pytest.raises(QuantizationError, match="already quantized \\(dynamic\\)") as info:
        quantize(onnx_variants["dynamic"].path, mode="fp16")
    assert str(digits_mlp_onnx.resolve()) in str(info.value)


def test_static_quantization_needs_calibration_data(digits_mlp_onnx, tmp_path):
    with pytest.raises(QuantizationError, match="needs calibration data: pass --data"):
        quantize(digits_mlp_onnx, mode="static", out=tmp_path / "s.onnx")


def test_tree_ensembles_are_refused_because_there_is_nothing_to_quantize(
    datasets, save_model, tmp_path
):
    from sklearn.ensemble import RandomForestClassifier

    iris = datasets["iris"]
    model = RandomForestClassifier(n_estimators=5, random_state=0).fit(iris.X, iris.y)
    onnx_path = convert(
        load_source(save_model(model, "rf_q")), load_data(iris.npz), out=tmp_path / "rf.onnx"
    ).path
    with pytest.raises(QuantizationError, match="no MatMul/Gemm/Conv weights to quantize"):
        quantize(onnx_path, mode="dynamic")
    assert not (tmp_path / "rf.dynamic.onnx").exists()


def test_quantize_rejects_unknown_mode_and_file_type(digits_mlp_onnx, tmp_path):
    with pytest.raises(QuantizationError, match="unknown mode 'int4'"):
        quantize(digits_mlp_onnx, mode="int4")  # type: ignore[arg-type]
    other = tmp_path / "model.pb"
    other.write_bytes(b"x")
    with pytest.raises(QuantizationError, match=r"expected a \.onnx or \.tflite file"):
        quantize(other, mode="dynamic")


# --- TFLite -----------------------------------------------------------------------------


@pytest.mark.tflite
@pytest.mark.parametrize("mode", ["dynamic", "int8", "fp16"])
def test_tflite_mlp_quantizes_from_its_keras_source(mode, keras_tflite, keras_models, tmp_path):
    data = load_data(keras_models["data"])
    fp32 = keras_tflite["mlp"].path
    q = quantize(fp32, mode=mode, data=data, out=tmp_path / f"mlp.{mode}.tflite")
    assert q.format == "tflite" and q.mode == mode
    assert q.size_bytes < fp32.stat().st_size
    assert _accuracy(fp32, data) - _accuracy(q.path, data) <= 0.02
    side = read_sidecar(q.path)
    assert side is not None and side.quantization.mode == mode
    assert side.input_schema.features == keras_tflite["mlp"].sidecar.input_schema.features


@pytest.mark.tflite
def test_full_int8_tflite_has_int8_io_and_the_runner_scales_it(
    keras_tflite, keras_models, tmp_path
):
    from toolchain.runner import load_tflite_interpreter

    data = load_data(keras_models["data"])
    q = quantize(
        keras_tflite["cnn"].path, mode="static", data=data, out=tmp_path / "cnn.int8.tflite"
    )
    assert q.mode == "int8"  # TFLite "static" is full integer
    interp = load_tflite_interpreter(q.path)
    assert interp.get_input_details()[0]["dtype"] == np.int8
    assert interp.get_output_details()[0]["dtype"] == np.int8
    pred = ModelRunner.open(q.path, q.sidecar.input_schema, q.sidecar.output_schema).predict(
        data.numeric_X()[:50]
    )
    assert pred.probabilities is not None and np.allclose(
        pred.probabilities.sum(axis=1), 1, atol=0.05
    )


@pytest.mark.tflite
def test_tflite_int8_needs_representative_data(keras_tflite, tmp_path):
    with pytest.raises(QuantizationError, match="needs representative data"):
        quantize(keras_tflite["mlp"].path, mode="int8", out=tmp_path / "x.tflite")


@pytest.mark.tflite
def test_tflite_quantization_without_its_keras_source_says_so(keras_tflite, tmp_path):
    moved = tmp_path / "orphan.tflite"
    shutil.copyfile(keras_tflite["mlp"].path, moved)
    side = json.loads(sidecar_path(keras_tflite["mlp"].path).read_text())
    side["lineage"]["settings"]["source_path"] = str(tmp_path / "gone.keras")
    sidecar_path(moved).write_text(json.dumps(side))
    with pytest.raises(QuantizationError, match="needs its Keras source"):
        quantize(moved, mode="dynamic")
