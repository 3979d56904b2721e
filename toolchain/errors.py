"""The toolchain's exception tree, and the one place third-party errors are translated.

    protocol.errors.EdgefleetError
    └── ToolchainError
        ├── UnsupportedModelError   unknown file type; a pickle that is not a model
        ├── DataError               unreadable data; NaN or strings in numeric data;
        │                           feature-count mismatch with the model
        ├── ConversionError         skl2onnx / onnxmltools / CatBoost / torch.onnx /
        │                           TensorFlow / onnx failed to convert; a conversion
        │                           that no converter offers (ONNX → TFLite)
        ├── ParityError             converted model disagrees with its source (``.report``)
        ├── QuantizationError       quantization impossible or failed
        │   ├── QuantizationNotApplicable  nothing to quantize (e.g. tree ensembles)
        │   └── QuantizedParityError  quantized model moved too far from its source
        └── RuntimeLoadError        onnxruntime / LiteRT failed to load or run a model

Every message is one line a person can act on; the root CLI prints it as ``error: …``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from protocol.errors import EdgefleetError

if TYPE_CHECKING:
    from .parity import ParityReport


class ToolchainError(EdgefleetError):
    """Base of every error the host toolchain raises on purpose."""


class UnsupportedModelError(ToolchainError):
    """A model file we cannot load: unknown type, or a pickle that holds no model."""


class DataError(ToolchainError):
    """Data that cannot be read or does not fit the model."""


class ConversionError(ToolchainError):
    """A converter (skl2onnx, onnxmltools, torch.onnx, TensorFlow Lite, onnx) failed."""


class ParityError(ToolchainError):
    """The converted model's predictions differ from the source model's beyond thresholds."""

    def __init__(self, message: str, report: ParityReport) -> None:
        super().__init__(message)
        self.report = report


class QuantizationError(ToolchainError):
    """A quantization mode that does not apply to this model, or that failed."""


class QuantizationNotApplicable(QuantizationError):
    """The model has nothing this quantization can act on (no MatMul/Gemm/Conv weights)."""


class QuantizedParityError(QuantizationError):
    """A quantized model that disagrees with its fp32 source beyond the thresholds."""

    def __init__(self, message: str, parity: dict[str, Any], failures: list[str]) -> None:
        super().__init__(message)
        self.parity = parity
        self.failures = failures


class RuntimeLoadError(ToolchainError):
    """onnxruntime or LiteRT could not load or run a model."""


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


@contextmanager
def translate(stage: str, error: type[ToolchainError], what: str = "") -> Iterator[None]:
    """Turn any third-party exception raised inside the block into ``error``.

    ``stage`` names the step ("skl2onnx conversion", "onnxruntime load"), ``what`` the
    object (a path or model name). Our own errors pass through unchanged.
    """
    try:
        yield
    except EdgefleetError:
        raise
    except ImportError as exc:
        raise error(
            f"{stage} needs {exc.name or 'a missing package'}: "
            "install it with pip install 'edgefleet[toolchain]' (or '[tflite]' for TFLite)"
        ) from exc
    except Exception as exc:
        subject = f" of {what}" if what else ""
        raise error(f"{stage}{subject} failed: {type(exc).__name__}: {_one_line(exc)}") from exc
