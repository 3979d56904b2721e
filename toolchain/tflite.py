"""Keras / SavedModel → TFLite with TensorFlow's converter, optionally quantized.

Modes: ``none`` (float32), ``dynamic`` (dynamic-range INT8 weights), ``fp16`` (float16
weights) and ``int8`` (full integer with int8 input/output tensors, calibrated on
representative rows of the user's data; the runner quantizes inputs and dequantizes outputs
with the tensors' scale and zero point). TensorFlow is the optional extra ``tflite``.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import numpy as np

from protocol.manifest import Lineage
from protocol.schema import InputSchema, OutputSchema

from .data import Dataset
from .errors import ConversionError, DataError, QuantizationError, translate
from .sidecar import plain_features, single_input_schema
from .sources import SourceModel

TfliteMode = Literal["none", "dynamic", "fp16", "int8"]
REPRESENTATIVE_ROWS = 200


def _tf() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf
    except ImportError:
        raise ConversionError(
            "TFLite conversion needs TensorFlow: pip install 'edgefleet[tflite]'"
        ) from None
    return tf


def tflite_bytes(
    source: SourceModel, mode: TfliteMode = "none", data: Dataset | None = None
) -> bytes:
    """The ``.tflite`` flatbuffer for ``source`` in ``mode``."""
    from .runner import keras_batch

    tf = _tf()
    error: type[ConversionError] | type[QuantizationError] = (
        ConversionError if mode == "none" else QuantizationError
    )
    if mode == "int8":
        if data is None:
            raise QuantizationError("full-INT8 TFLite needs representative data: pass --data")
        rows = keras_batch(source, data.numeric_X()[:REPRESENTATIVE_ROWS])
    with translate(f"TFLite conversion ({mode})", error, source.name):
        sink = io.StringIO()  # Keras prints "Saved artifact at …" while exporting
        with contextlib.redirect_stdout(sink), warnings.catch_warnings():
            # TF warns that an int8-input model has no input statistics: we calibrate instead
            warnings.filterwarnings("ignore", message="Statistics for quantized inputs")
            if hasattr(source.obj, "layers"):
                converter = tf.lite.TFLiteConverter.from_keras_model(source.obj)
            else:
                converter = tf.lite.TFLiteConverter.from_saved_model(str(source.path))
            if mode != "none":
                converter.optimizations = [tf.lite.Optimize.DEFAULT]
            if mode == "fp16":
                converter.target_spec.supported_types = [tf.float16]
            if mode == "int8":

                def representative() -> Any:
                    for i in range(len(rows)):
                        yield [rows[i : i + 1]]

                converter.representative_dataset = representative
                converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
                converter.inference_input_type = tf.int8
                converter.inference_output_type = tf.int8
            return bytes(converter.convert())


def tflite_schema(
    path: Path, data: Dataset, task: Literal["classification", "regression"]
) -> tuple[InputSchema, OutputSchema]:
    """Schema of a TFLite file converted from a Keras model, features named after ``data``."""
    from .runner import load_tflite_interpreter

    interp = load_tflite_interpreter(path)
    ins, outs = interp.get_input_details(), interp.get_output_details()
    if len(ins) != 1:
        raise ConversionError(f"TFLite models with {len(ins)} inputs are not supported")
    tail = [int(d) for d in ins[0]["shape"][1:]] or [1]
    n = int(np.prod(tail))
    if n != data.n_features:
        raise DataError(
            f"feature-count mismatch: the model takes {n} values per row but the data has "
            f"{data.n_features}"
        )
    inp = single_input_schema(ins[0]["name"], tail, plain_features(n, data))
    width = int(outs[0]["shape"][-1]) if len(outs[0]["shape"]) > 1 else 1
    if task == "classification":
        return inp, OutputSchema(
            task="classification", classes=list(range(width)), probability_output=outs[0]["name"]
        )
    return inp, OutputSchema(task="regression", value_output=outs[0]["name"], n_outputs=width)


def tf_versions() -> dict[str, str]:
    out = {}
    for name in ("numpy", "tensorflow", "tensorflow-cpu", "keras", "ai-edge-litert"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def keras_to_tflite(
    source: SourceModel, data: Dataset, out: Path
) -> tuple[InputSchema, OutputSchema, Lineage]:
    """Convert to float32 TFLite at ``out``; the source path is kept for later quantization."""
    n = source.n_features
    if n is not None and n != data.n_features:
        raise DataError(
            f"feature-count mismatch: {source.name} expects {n} values per row but the data "
            f"has {data.n_features}"
        )
    out.write_bytes(tflite_bytes(source, "none"))
    inp, outs = tflite_schema(out, data, source.task)
    lineage = Lineage(
        source_sha256=source.sha256,
        source_kind="keras",
        source_name=source.name,
        converter=f"tf.lite.TFLiteConverter (tensorflow {tf_versions().get('tensorflow', '?')})",
        settings={"source_path": str(source.path.resolve()), "tflite_mode": "none"},
        tool_versions=tf_versions(),
    )
    return inp, outs, lineage
