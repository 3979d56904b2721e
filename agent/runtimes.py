"""ONNX Runtime and LiteRT behind one small interface.

:func:`open_runtime` takes the model (bytes or a path) and its manifest and returns a
:class:`Runtime` whose :meth:`Runtime.run` maps ``{input name: tensor}`` to
``{output name: array}``. It casts inputs to the dtype the model declares, and for
full-INT8 TFLite models quantizes float inputs and dequantizes integer outputs with the
tensors' own scale and zero point. Every runtime exception is translated (see
:mod:`agent.errors`). onnxruntime and LiteRT are imported only when a model is opened.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any, Union

import numpy as np

from protocol.feeds import dequantize_tensor, quantize_tensor
from protocol.manifest import Manifest

from .errors import (
    InferenceError,
    ModelLoadError,
    RuntimeUnavailableError,
    translate_runtime_errors,
    translated,
)

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
    "tensor(bool)": np.bool_,
    "tensor(float16)": np.float16,
}


class Runtime:
    """A loaded model. ``run`` is safe to call from several threads."""

    name: str = ""
    input_names: list[str]
    output_names: list[str]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def input_type(self, name: str) -> Any:
        """The numpy dtype the model declares for input ``name`` (None if unknown)."""
        return None

    def run_array(self, x: np.ndarray) -> list[np.ndarray]:
        """Outputs in ``output_names`` order for a one-input model; ``x`` is already in the
        input's declared dtype and C-contiguous (the predictor's direct path)."""
        outs = self.run({self.input_names[0]: x})
        return [outs[n] for n in self.output_names]


class OnnxRuntime(Runtime):
    name = "onnxruntime"

    def __init__(self, model: bytes, threads: int) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise RuntimeUnavailableError(
                "onnxruntime is not installed: pip install 'edgefleet[agent]'"
            ) from None
        with translate_runtime_errors(ModelLoadError, "onnxruntime cannot load the model"):
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            opts.log_severity_level = 4  # errors reach the caller translated
            self._session = ort.InferenceSession(
                model, sess_options=opts, providers=["CPUExecutionProvider"]
            )
        self.input_names = [i.name for i in self._session.get_inputs()]
        self.output_names = [o.name for o in self._session.get_outputs()]
        self.output_types = [o.type for o in self._session.get_outputs()]
        self._dtypes = {i.name: _ORT_TYPES.get(i.type) for i in self._session.get_inputs()}
        # run_array binds through IOBinding, which returns tensors only (not ZipMap's maps).
        self._bindable = len(self.input_names) == 1 and all(
            t.startswith("tensor(") for t in self.output_types
        )
        self._local = threading.local()  # one IOBinding per thread: a binding is not shared

    def input_type(self, name: str) -> Any:
        return self._dtypes.get(name)

    def run_array(self, x: np.ndarray) -> list[np.ndarray]:
        """One input through IOBinding (public API). It skips the feed checks in Python that
        ``InferenceSession.run`` repeats on every call, about 1 µs of a 6-9 µs single-row
        run; the predictor has validated the rows and the dtype before this.

        Each thread keeps its own binding (a binding is not thread-safe). Bound outputs keep
        the shape of the last run, so they are bound afresh when the batch size changes.
        """
        if not self._bindable:
            return super().run_array(x)
        local = self._local
        binding = getattr(local, "binding", None)
        try:
            if binding is None or local.rows != x.shape[0]:
                binding = self._session.io_binding()
                for name in self.output_names:
                    binding.bind_output(name)
                local.binding, local.rows = binding, x.shape[0]
            binding.bind_cpu_input(self.input_names[0], x)
            self._session.run_with_iobinding(binding)
            return binding.copy_outputs_to_cpu()
        except Exception:
            # Start the next call with a fresh binding, and answer this one (or raise the
            # translated error) the ordinary way, so a model whose output shapes change in
            # other ways than by batch size still works.
            local.binding = None
            return super().run_array(x)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        dtypes = self._dtypes
        for k, v in feeds.items():  # (a loop, not all(genexpr): this is the hot path)
            want = dtypes.get(k)
            if want is not None and want != v.dtype:
                break
        else:
            try:
                outs = self._session.run(self.output_names, feeds)
            except Exception as exc:
                raise translated(exc, InferenceError, "onnxruntime failed") from exc
            return dict(zip(self.output_names, outs, strict=True))
        cast = {}
        for name, tensor in feeds.items():
            want = self._dtypes.get(name)
            if want is not None and tensor.dtype != want:
                with translate_runtime_errors(InferenceError, f"input {name!r} cannot be cast"):
                    tensor = tensor.astype(want)
            cast[name] = tensor
        with translate_runtime_errors(InferenceError, "onnxruntime failed"):
            outs = self._session.run(self.output_names, cast)
        return dict(zip(self.output_names, outs, strict=True))


def _litert_interpreter() -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter

        return Interpreter
    except ImportError:
        raise RuntimeUnavailableError(
            "TFLite bundles need LiteRT: pip install 'edgefleet[agent-tflite]'"
        ) from None


class LiteRtRuntime(Runtime):
    """LiteRT interpreter (not thread-safe itself, so calls are serialized by a lock)."""

    name = "litert"

    def __init__(self, model: bytes, threads: int) -> None:
        interpreter_cls = _litert_interpreter()
        with translate_runtime_errors(ModelLoadError, "LiteRT cannot load the model"):
            self._interp = interpreter_cls(model_content=bytes(model), num_threads=threads)
            self._interp.allocate_tensors()
        self._inputs = self._interp.get_input_details()
        self._outputs = self._interp.get_output_details()
        self.input_names = [d["name"] for d in self._inputs]
        self.output_names = [d["name"] for d in self._outputs]
        self._lock = threading.Lock()
        self._batch: int | None = None

    def _match(self, feeds: Mapping[str, np.ndarray]) -> list[tuple[dict, np.ndarray]]:
        by_name = {d["name"]: d for d in self._inputs}
        if all(k in by_name for k in feeds):
            return [(by_name[k], v) for k, v in feeds.items()]
        if len(feeds) == len(self._inputs):  # TFLite renames inputs; fall back to order
            return list(zip(self._inputs, feeds.values(), strict=True))
        raise InferenceError(f"model inputs are {self.input_names}, got {list(feeds)}")

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        pairs = self._match(feeds)
        with self._lock, translate_runtime_errors(InferenceError, "LiteRT failed"):
            batch = next(iter(feeds.values())).shape[0]
            if batch != self._batch:
                for detail, tensor in pairs:
                    self._interp.resize_tensor_input(detail["index"], list(tensor.shape))
                self._interp.allocate_tensors()
                self._inputs = self._interp.get_input_details()
                self._outputs = self._interp.get_output_details()
                pairs = self._match(feeds)
                self._batch = batch
            for detail, tensor in pairs:
                self._interp.set_tensor(detail["index"], _to_input(tensor, detail))
            self._interp.invoke()
            return {
                d["name"]: _from_output(self._interp.get_tensor(d["index"]), d)
                for d in self._outputs
            }


def _to_input(tensor: np.ndarray, detail: dict) -> np.ndarray:
    dtype = detail["dtype"]
    scale, zero = detail.get("quantization", (0.0, 0))
    if np.issubdtype(dtype, np.integer) and scale and np.issubdtype(tensor.dtype, np.floating):
        return quantize_tensor(tensor, scale, zero, dtype)
    return tensor.astype(dtype, copy=False)


def _from_output(tensor: np.ndarray, detail: dict) -> np.ndarray:
    scale, zero = detail.get("quantization", (0.0, 0))
    if np.issubdtype(tensor.dtype, np.integer) and scale:
        return dequantize_tensor(tensor, scale, zero)
    return np.array(tensor)  # copy: the interpreter reuses its buffers


def open_runtime(model: Union[bytes, str, Path], manifest: Manifest, threads: int = 1) -> Runtime:
    """Load ``model`` with the runtime its manifest's format needs."""
    data = model if isinstance(model, (bytes, bytearray)) else Path(model).read_bytes()
    fmt = manifest.model.format
    if fmt == "onnx":
        return OnnxRuntime(bytes(data), threads)
    if fmt == "tflite":
        return LiteRtRuntime(bytes(data), threads)
    raise RuntimeUnavailableError(f"no runtime for model format {fmt!r}")


def runtime_available(fmt: str) -> bool:
    """True when the runtime for ``fmt`` can be imported (checked without importing it)."""
    from importlib.util import find_spec

    if fmt == "onnx":
        return find_spec("onnxruntime") is not None
    if fmt == "tflite":
        return find_spec("ai_edge_litert") is not None or find_spec("tflite_runtime") is not None
    return False


def runtime_versions() -> dict[str, str]:
    """Installed runtime versions by name (from package metadata; nothing is imported)."""
    out: dict[str, str] = {}
    for name, dist in (
        ("onnxruntime", "onnxruntime"),
        ("litert", "ai-edge-litert"),
        ("tflite_runtime", "tflite-runtime"),
    ):
        try:
            out[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out
