"""Quantize a converted model: ONNX dynamic/static INT8 and FP16; TFLite dynamic/INT8/FP16.

ONNX (onnxruntime.quantization, onnxconverter-common):

* ``dynamic``: INT8 weights, activations quantized at run time (``quantize_dynamic``).
* ``static`` (alias ``int8``): QDQ format, per-channel INT8 weights, activation ranges
  calibrated on rows of ``data`` fed through :func:`protocol.feeds.make_feeds`.
* ``fp16``: float16 weights and compute, float32 inputs/outputs (``keep_io_types``);
  ai.onnx.ml operators stay float32.

A graph without MatMul/Gemm/Conv (tree ensembles, skl2onnx's ai.onnx.ml linear and SVM
operators) has no weights these tools can quantize. That is refused with
:class:`QuantizationError` instead of writing a "quantized" copy that is the same model:
callers (``optimize``) skip the variant and keep fp32.

TFLite needs the Keras source again (TensorFlow quantizes during conversion): it is found
through ``lineage.settings["source_path"]`` in the model's sidecar. ``dynamic`` is
dynamic-range quantization, ``int8`` (alias ``static``) full integer with int8 I/O calibrated
on ``data``, ``fp16`` float16 weights.

Each result gets a sidecar recording the mode; with ``data`` it also records parity against
the unquantized model. Quantization is expected to move numbers a little, so that parity is
judged by :class:`QuantizedParityThresholds` (looser than conversion's
:class:`~toolchain.parity.ParityThresholds`) when the caller passes ``thresholds``: a
quantized model outside them raises :class:`QuantizedParityError` (the file is kept for
inspection). ``optimize`` passes none: it judges variants by accuracy instead.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from protocol.feeds import make_feeds
from protocol.manifest import Quantization

from .data import Dataset
from .errors import (
    QuantizationError,
    QuantizationNotApplicable,
    QuantizedParityError,
    translate,
)
from .parity import ParityThresholds, compare
from .runner import ModelRunner
from .sidecar import Sidecar, describe, write_sidecar

Mode = Literal["dynamic", "static", "fp16", "int8"]
MODES = ("dynamic", "static", "fp16", "int8")
WEIGHT_OPS = {"MatMul", "Gemm", "Conv", "ConvTranspose", "FusedMatMul", "Attention"}
CALIBRATION_ROWS = 256
CALIBRATION_BATCH = 32


@dataclass
class Quantized:
    path: Path
    format: Literal["onnx", "tflite"]
    mode: Mode
    sidecar: Sidecar
    size_bytes: int


@dataclass(frozen=True)
class QuantizedParityThresholds:
    """How far a quantized model may move from its fp32 source (``edgefleet quantize``)."""

    min_label_agreement: float = 0.98
    max_abs_error: float = 0.05  # regressors: fail only when both errors are exceeded
    max_rel_error: float = 0.05

    def failures(self, parity: dict[str, Any]) -> list[str]:
        """Why a parity report (a sidecar ``parity`` dict) is outside these thresholds."""
        out = []
        agreement = parity.get("label_agreement")
        if agreement is not None and agreement < self.min_label_agreement:
            out.append(f"label agreement {agreement:.4f} < {self.min_label_agreement:g}")
        abs_err, rel_err = parity.get("max_abs_error"), parity.get("max_rel_error")
        if (
            abs_err is not None
            and rel_err is not None
            and abs_err > self.max_abs_error
            and rel_err > self.max_rel_error
        ):
            out.append(
                f"max abs error {abs_err:.4g} > {self.max_abs_error:g} "
                f"and max rel error {rel_err:.4g} > {self.max_rel_error:g}"
            )
        return out


def default_out(model_path: Path, mode: str) -> Path:
    return model_path.with_name(f"{model_path.stem}.{mode}{model_path.suffix}")


def quantize(
    model_path: str | Path,
    *,
    mode: Mode,
    data: Dataset | None = None,
    out: Path | None = None,
    thresholds: QuantizedParityThresholds | None = None,
) -> Quantized:
    """Write a quantized copy of ``model_path`` (and its sidecar); see the module docs.

    With ``data`` and ``thresholds``, a copy that disagrees with the input beyond them
    raises :class:`QuantizedParityError` after it was written.
    """
    path = Path(model_path)
    if mode not in MODES:
        raise QuantizationError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
    if not path.is_file():
        raise QuantizationError(f"model file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in (".onnx", ".tflite"):
        raise QuantizationError(f"cannot quantize {path.name}: expected a .onnx or .tflite file")
    sidecar = describe(path, data)
    if sidecar.quantization.mode != "none":
        raise QuantizationError(
            f"{path.name} is already quantized ({sidecar.quantization.mode}); quantize the "
            f"fp32 model it came from ({sidecar.lineage.settings.get('quantized_from', '?')})"
        )
    target = Path(out) if out is not None else default_out(path, mode)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.resolve() == path.resolve():
        raise QuantizationError("--out must differ from the input model")
    if suffix == ".onnx":
        fmt: Literal["onnx", "tflite"] = "onnx"
        details = _quantize_onnx(path, target, mode, sidecar, data)
        new_sidecar = sidecar
    else:
        fmt = "tflite"
        details, new_sidecar = _quantize_tflite(path, target, mode, sidecar, data)
    recorded = "int8" if fmt == "tflite" and mode == "static" else mode
    if fmt == "onnx" and mode == "int8":
        recorded = "static"
    lineage = new_sidecar.lineage.model_copy(
        update={"settings": {**new_sidecar.lineage.settings, "quantized_from": str(path.resolve())}}
    )
    parity = None
    if data is not None:
        parity = _parity_against(path, sidecar, target, new_sidecar, data)
    result = Sidecar(
        input_schema=new_sidecar.input_schema,
        output_schema=new_sidecar.output_schema,
        lineage=lineage,
        quantization=Quantization(mode=recorded, details=details),  # type: ignore[arg-type]
        parity=parity,
    )
    write_sidecar(target, result)
    if parity is not None and thresholds is not None:
        failures = thresholds.failures(parity)
        if failures:
            raise QuantizedParityError(
                f"{target.name} disagrees with {path.name} (kept for inspection): "
                + "; ".join(failures),
                parity,
                failures,
            )
    return Quantized(target, fmt, recorded, result, target.stat().st_size)  # type: ignore[arg-type]


def _parity_against(
    ref_path: Path, ref: Sidecar, cand_path: Path, cand: Sidecar, data: Dataset
) -> dict[str, Any]:
    X = data.X if not data.is_numeric else data.numeric_X()
    a = ModelRunner.open(ref_path, ref.input_schema, ref.output_schema).predict(X)
    b = ModelRunner.open(cand_path, cand.input_schema, cand.output_schema).predict(X)
    report = compare(a, b, ref.output_schema.task, ParityThresholds())
    return {**report.to_dict(), "reference": "unquantized model"}


# --- ONNX ------------------------------------------------------------------------------


def weight_ops(model: Any) -> set[str]:
    return {n.op_type for n in model.graph.node if n.op_type in WEIGHT_OPS}


def _quantize_onnx(
    path: Path, target: Path, mode: Mode, sidecar: Sidecar, data: Dataset | None
) -> dict[str, Any]:
    with translate("reading ONNX", QuantizationError, path.name):
        import onnx

        model = onnx.load(str(path))
    ops = weight_ops(model)
    if not ops:
        kinds = sorted({n.op_type for n in model.graph.node})[:4]
        raise QuantizationNotApplicable(
            f"{path.name} has no MatMul/Gemm/Conv weights to quantize (operators: "
            f"{', '.join(kinds)}); tree ensembles and ai.onnx.ml operators stay fp32"
        )
    if mode == "fp16":
        with translate("FP16 conversion", QuantizationError, path.name):
            from onnxconverter_common import float16

            with warnings.catch_warnings():
                # "the float32 number 1e-29 will be truncated to 1e-07": expected for fp16
                warnings.simplefilter("ignore", UserWarning)
                half = float16.convert_float_to_float16(drop_noop_casts(model), keep_io_types=True)
            _pack_raw(half)
            onnx.save(half, str(target))
        return {"tool": "onnxconverter_common.float16", "keep_io_types": True}
    if mode == "dynamic":
        with translate("dynamic INT8 quantization", QuantizationError, path.name):
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(str(path), str(target), weight_type=QuantType.QInt8)
        return {"tool": "onnxruntime.quantization.quantize_dynamic", "weight_type": "QInt8"}
    # static / int8: QDQ, per-channel, calibrated
    if data is None:
        raise QuantizationError("static INT8 quantization needs calibration data: pass --data")
    reader = _calibration_reader(data, sidecar)
    with translate("static INT8 quantization", QuantizationError, path.name):
        from onnxruntime.quantization import (
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )

        quantize_static(
            str(path),
            str(target),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
    return {
        "tool": "onnxruntime.quantization.quantize_static",
        "format": "QDQ",
        "per_channel": True,
        "calibration_rows": min(data.n_rows, CALIBRATION_ROWS),
        "calibrate_method": "MinMax",
    }


def _pack_raw(model: Any) -> None:
    """Store initializers as raw bytes.

    The FP16 converter leaves float16 values in ``int32_data``, where protobuf varints cost
    up to 3 bytes each (the file came out at 0.64× fp32 instead of about 0.5×).
    """
    from onnx import numpy_helper

    for init in model.graph.initializer:
        if init.data_location == 0 and not init.raw_data:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init), init.name))


def drop_noop_casts(model: Any) -> Any:
    """Replace ``Cast`` nodes whose input already has the target type by ``Identity``.

    skl2onnx starts MLP graphs with ``Cast(to=float)`` on the float input; the FP16
    converter keeps that cast, which turns the fp16 stream back to float32 in front of an
    fp16 MatMul (onnxruntime then refuses the model).
    """
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    types.update({v.name: v.type.tensor_type.elem_type for v in inferred.graph.input})
    for node in model.graph.node:
        if node.op_type != "Cast":
            continue
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        if to is not None and types.get(node.input[0]) == to:
            node.op_type = "Identity"
            del node.attribute[:]
    return model


def _calibration_reader(data: Dataset, sidecar: Sidecar) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    X = data.X if not data.is_numeric else data.numeric_X()
    X = X[:CALIBRATION_ROWS]
    if X.shape[1] != sidecar.input_schema.n_features:
        raise QuantizationError(
            f"calibration data has {X.shape[1]} features, the model expects "
            f"{sidecar.input_schema.n_features}"
        )
    batches = [
        make_feeds(X[i : i + CALIBRATION_BATCH], sidecar.input_schema)
        for i in range(0, len(X), CALIBRATION_BATCH)
    ]

    class _Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._it = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

        def rewind(self) -> None:
            self._it = iter(batches)

    return _Reader()


# --- TFLite ----------------------------------------------------------------------------


def _quantize_tflite(
    path: Path, target: Path, mode: Mode, sidecar: Sidecar, data: Dataset | None
) -> tuple[dict[str, Any], Sidecar]:
    from .sources import load_source
    from .tflite import tflite_bytes, tflite_schema

    src = sidecar.lineage.settings.get("source_path")
    if not src or not Path(src).exists():
        raise QuantizationError(
            f"quantizing {path.name} needs its Keras source (TensorFlow quantizes while "
            f"converting), but the sidecar names {src or 'none'}; run `edgefleet convert` on "
            "the .keras model again, or quantize the ONNX variant"
        )
    source = load_source(src)
    if source.kind != "keras":
        raise QuantizationError(f"TFLite quantization needs a Keras source, {src} is {source.kind}")
    tmode: Literal["dynamic", "fp16", "int8"] = "int8" if mode in ("int8", "static") else mode  # type: ignore[assignment]
    if tmode == "int8" and data is None:
        raise QuantizationError("full-INT8 TFLite needs representative data: pass --data")
    target.write_bytes(tflite_bytes(source, tmode, data))
    if data is None:
        from .data import Dataset as _D

        data = _D(
            np.zeros((1, sidecar.input_schema.n_features), dtype=np.float32),
            feature_names=sidecar.input_schema.feature_names,
        )
    inp, outs = tflite_schema(target, data, sidecar.output_schema.task)
    # keep the feature specs (ranges, names) of the float model; only tensor names change
    inp = inp.model_copy(update={"features": sidecar.input_schema.features})
    outs = outs.model_copy(update={"classes": sidecar.output_schema.classes})
    details = {
        "tool": "tf.lite.TFLiteConverter",
        "tflite_mode": tmode,
        "io": "int8" if tmode == "int8" else "float32",
    }
    new = sidecar.model_copy(update={"input_schema": inp, "output_schema": outs})
    return details, new
