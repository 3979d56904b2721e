"""edgefleet's host toolchain: load a trained model, convert, quantize, check parity, run.

The names below are imported lazily, so ``import toolchain`` stays light (no scikit-learn,
onnx or TensorFlow until a function that needs them is called).

    >>> from toolchain import load_source, load_data, convert
    >>> converted = convert(load_source("model.joblib"), load_data("train.csv", target="y"))
"""

from __future__ import annotations

import importlib
import os
from typing import Any

# TensorFlow's converter logs every SavedModel read at INFO from C++; a person running
# `edgefleet build` wants our progress, not that. Set before TF can be imported anywhere.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

_EXPORTS = {
    "ToolchainError": "errors",
    "UnsupportedModelError": "errors",
    "DataError": "errors",
    "ConversionError": "errors",
    "ParityError": "errors",
    "QuantizationError": "errors",
    "RuntimeLoadError": "errors",
    "Dataset": "data",
    "load_data": "data",
    "dataset_from_arrays": "data",
    "SourceModel": "sources",
    "load_source": "sources",
    "ModelRunner": "runner",
    "source_predict": "runner",
    "ParityThresholds": "parity",
    "ParityReport": "parity",
    "compare": "parity",
    "Sidecar": "sidecar",
    "describe": "sidecar",
    "read_sidecar": "sidecar",
    "write_sidecar": "sidecar",
    "sidecar_path": "sidecar",
    "Converted": "convert",
    "convert": "convert",
    "Quantized": "quantize",
    "quantize": "quantize",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'toolchain' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
