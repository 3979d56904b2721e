"""Run a converted model on this host, the same way for ONNX and TFLite.

ONNX goes to onnxruntime; TFLite to LiteRT (``ai_edge_litert``), falling back to
``tflite_runtime`` where only that is installed. Rows become tensors and tensors become
predictions through :mod:`protocol.feeds`, exactly as on a device. Full-INT8 TFLite models
get their float inputs quantized and integer outputs dequantized here.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import numpy as np

from protocol.feeds import (
    FeedError,
    Prediction,
    decode_outputs,
    dequantize_tensor,
    make_feeds,
    quantize_tensor,
)
from protocol.schema import InputSchema, OutputSchema

from .errors import DataError, RuntimeLoadError, translate
from .sources import SourceModel, keras_input_shape


class ModelRunner:
    format: Literal["onnx", "tflite"]
    load_ms: float

    def __init__(self, path: Path, input_schema: InputSchema, output_schema: OutputSchema) -> None:
        self.path = path
        self.input_schema = input_schema
        self.output_schema = output_schema
        self.load_ms = 0.0

    @classmethod
    def open(
        cls,
        path: str | Path,
        input_schema: InputSchema,
        output_schema: OutputSchema,
        *,
        threads: int = 1,
    ) -> ModelRunner:
        p = Path(path)
        if not p.is_file():
            raise RuntimeLoadError(f"model file {p} does not exist")
        suffix = p.suffix.lower()
        runner: ModelRunner
        t0 = time.perf_counter()
        if suffix == ".onnx":
            runner = _OnnxRunner(p, input_schema, output_schema, threads)
        elif suffix == ".tflite":
            runner = _TfliteRunner(p, input_schema, output_schema, threads)
        else:
            raise RuntimeLoadError(f"cannot run {p.name}: expected a .onnx or .tflite file")
        runner.load_ms = (time.perf_counter() - t0) * 1000.0
        return runner

    def feeds(self, rows: Any) -> dict[str, np.ndarray]:
        try:
            return make_feeds(rows, self.input_schema)
        except FeedError as exc:
            raise DataError(str(exc)) from None

    def predict(self, rows: Any) -> Prediction:
        """Rows (2-D, schema feature order) → :class:`Prediction`."""
        return decode_outputs(self.run_feeds(self.feeds(rows)), self.output_schema)

    def run_feeds(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError


class _OnnxRunner(ModelRunner):
    format = "onnx"

    def __init__(self, path: Path, inp: InputSchema, out: OutputSchema, threads: int) -> None:
        super().__init__(path, inp, out)
        with translate("onnxruntime load", RuntimeLoadError, path.name):
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            opts.log_severity_level = 3
            self.session = ort.InferenceSession(
                str(path), sess_options=opts, providers=["CPUExecutionProvider"]
            )
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run_feeds(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with translate("onnxruntime run", RuntimeLoadError, self.path.name):
            outs = self.session.run(None, feeds)
        return dict(zip(self.output_names, outs, strict=True))


def load_tflite_interpreter(path: Path, threads: int = 1) -> Any:
    """A LiteRT interpreter (or tflite_runtime's), tensors allocated."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter  # type: ignore[no-redef]
        except ImportError:
            raise RuntimeLoadError(
                "running TFLite models needs LiteRT (ai-edge-litert): "
                "pip install 'edgefleet[tflite]'"
            ) from None
    interp = Interpreter(model_path=str(path), num_threads=threads)
    interp.allocate_tensors()
    return interp


class _TfliteRunner(ModelRunner):
    format = "tflite"

    def __init__(self, path: Path, inp: InputSchema, out: OutputSchema, threads: int) -> None:
        super().__init__(path, inp, out)
        with translate("LiteRT load", RuntimeLoadError, path.name):
            self.interp = load_tflite_interpreter(path, threads)
        self._inputs = self.interp.get_input_details()
        self._outputs = self.interp.get_output_details()
        self._batch = int(self._inputs[0]["shape"][0])

    @property
    def quantized_io(self) -> bool:
        return any(d["dtype"] in (np.int8, np.uint8) for d in self._inputs)

    def _resize(self, n: int) -> None:
        if n == self._batch:
            return
        for d in self._inputs:
            self.interp.resize_tensor_input(d["index"], [n, *[int(v) for v in d["shape"][1:]]])
        self.interp.allocate_tensors()
        self._inputs = self.interp.get_input_details()
        self._outputs = self.interp.get_output_details()
        self._batch = n

    def run_feeds(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with translate("LiteRT run", RuntimeLoadError, self.path.name):
            arrays = list(feeds.values())
            self._resize(int(arrays[0].shape[0]))
            for i, d in enumerate(self._inputs):
                x = feeds.get(d["name"], arrays[i] if i < len(arrays) else None)
                if x is None:
                    raise RuntimeLoadError(f"no feed for TFLite input {d['name']!r}")
                x = np.asarray(x).reshape([int(v) for v in d["shape"]])
                if d["dtype"] in (np.int8, np.uint8) and x.dtype.kind == "f":
                    scale, zp = d["quantization"]
                    x = quantize_tensor(x, scale, zp, d["dtype"])
                self.interp.set_tensor(d["index"], x.astype(d["dtype"], copy=False))
            self.interp.invoke()
            result: dict[str, np.ndarray] = {}
            for d in self._outputs:
                y = self.interp.get_tensor(d["index"])
                if d["dtype"] in (np.int8, np.uint8):
                    scale, zp = d["quantization"]
                    y = dequantize_tensor(y, scale, zp)
                result[d["name"]] = y
        return result


# --- the source model's own predictions --------------------------------------------------


def source_predict(
    source: SourceModel, X: np.ndarray, row_shape: tuple[int, ...] | None = None
) -> Prediction:
    """Predictions of the source model itself (the parity reference).

    ``row_shape`` is the per-row input shape of a PyTorch module (default: ``X``'s width).
    """
    if source.kind in ("sklearn", "xgboost", "lightgbm", "catboost"):
        return _sklearn_predict(source, X)
    if source.kind == "keras":
        return _keras_predict(source, X)
    if source.kind == "torch":
        return _torch_predict(source, X, row_shape)
    return _onnx_predict(source, X)


def sklearn_input(model: Any, X: np.ndarray) -> Any:
    """``X`` as the estimator saw it in ``fit``: a DataFrame when it was fit on one."""
    names = getattr(model, "feature_names_in_", None)
    if names is None:
        return np.asarray(X, dtype=np.float32) if X.dtype != object else X
    import pandas as pd

    frame = pd.DataFrame(X, columns=list(names))
    for col in frame.columns:
        try:
            frame[col] = frame[col].astype(np.float64)
        except (TypeError, ValueError):
            frame[col] = frame[col].astype(str)
    return frame


def _sklearn_predict(source: SourceModel, X: np.ndarray) -> Prediction:
    model = source.obj
    n = source.n_features
    if n is not None and X.shape[1] != n:
        raise DataError(f"{source.name} expects {n} features but the data has {X.shape[1]}")
    Xin = sklearn_input(model, X)
    with translate(f"{source.name}.predict", DataError):
        if source.task == "regression":
            vals = np.asarray(model.predict(Xin), dtype=np.float64)
            return Prediction(values=vals.reshape(len(vals), -1))
        labels = [_py(v) for v in np.asarray(model.predict(Xin)).reshape(len(X))]
        probs = None
        if hasattr(model, "predict_proba"):
            probs = np.asarray(model.predict_proba(Xin), dtype=np.float64)
    return Prediction(labels=labels, probabilities=probs)


def keras_batch(source: SourceModel, X: np.ndarray) -> np.ndarray:
    shape = keras_input_shape(source)
    x = np.asarray(X, dtype=np.float32)
    if shape and all(d is not None for d in shape[1:]):
        need = int(np.prod([int(d) for d in shape[1:] if d is not None]))
        if x.shape[1] != need:
            raise DataError(
                f"{source.name} expects {need} input values per row but the data has {x.shape[1]}"
            )
        x = x.reshape([x.shape[0], *[int(d) for d in shape[1:] if d is not None]])
    return x


def _keras_predict(source: SourceModel, X: np.ndarray) -> Prediction:
    x = keras_batch(source, X)
    with translate(f"{source.name} predict", DataError):
        if hasattr(source.obj, "predict"):
            out = np.asarray(source.obj.predict(x, verbose=0, batch_size=256))
        else:  # a plain SavedModel
            import tensorflow as tf

            fn = source.obj.signatures["serving_default"]
            res = fn(tf.constant(x))
            out = np.asarray(next(iter(res.values())))
    out = out.reshape(out.shape[0], -1).astype(np.float64)
    if source.task == "regression":
        return Prediction(values=out)
    return Prediction(labels=[int(i) for i in out.argmax(axis=1)], probabilities=out)


def _torch_predict(
    source: SourceModel, X: np.ndarray, row_shape: tuple[int, ...] | None
) -> Prediction:
    from .torch_export import torch_head, torch_outputs

    head, _ = torch_head(source.obj)
    shape = list(row_shape) if row_shape else [X.shape[1]]
    with translate(f"{source.name} forward", DataError):
        out = torch_outputs(source.obj, head, X, shape)
    if source.task == "regression":
        return Prediction(values=out)
    return Prediction(labels=[int(i) for i in out.argmax(axis=1)], probabilities=out)


def _onnx_predict(source: SourceModel, X: np.ndarray) -> Prediction:
    from .data import Dataset
    from .errors import UnsupportedModelError
    from .sidecar import infer_onnx_schema

    try:
        inp, out = infer_onnx_schema(source.obj)
    except UnsupportedModelError:  # dynamic feature dimension: the data's width fixes it
        inp, out = infer_onnx_schema(source.obj, Dataset(np.zeros((1, X.shape[1]), np.float32)))
    if inp.n_features != X.shape[1]:
        raise DataError(
            f"{source.name} expects {inp.n_features} features but the data has {X.shape[1]}"
        )
    return ModelRunner.open(source.path, inp, out).predict(X)


def _py(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v
