"""From rows to model input tensors and from output tensors to predictions.

This is part of the contract: the manifest's :class:`InputSchema` says how a row maps to
named tensors and :class:`OutputSchema` how outputs read back, so the toolchain (parity,
smoke tests) and the agent (serving) must do it identically. Pure numpy, no runtime.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .schema import InputSchema, OutputSchema

_NP = {
    "float32": np.float32,
    "float64": np.float64,
    "int64": np.int64,
    "int32": np.int32,
    "uint8": np.uint8,
    "int8": np.int8,
    "bool": np.bool_,
}


class FeedError(ValueError):
    """Rows that do not fit the input schema; the message names the problem."""


def rows_from_instances(
    instances: Sequence[Mapping[str, Any]], schema: InputSchema
) -> list[list[Any]]:
    """Named-feature dicts → rows in schema order (unknown or missing names are errors)."""
    names = schema.feature_names
    known = set(names)
    rows = []
    for i, inst in enumerate(instances):
        extra = [k for k in inst if k not in known]
        if extra:
            raise FeedError(f"instances[{i}]: unknown feature {extra[0]!r}")
        missing = [n for n in names if n not in inst]
        if missing:
            raise FeedError(f"instances[{i}]: missing feature {missing[0]!r}")
        rows.append([inst[n] for n in names])
    return rows


def make_feeds(rows: Any, schema: InputSchema) -> dict[str, np.ndarray]:
    """Rows (2-D, schema feature order) → ``{input name: tensor}``."""
    arr = rows if isinstance(rows, np.ndarray) else np.asarray(rows, dtype=object)
    if arr.ndim != 2:
        raise FeedError(f"inputs must be a 2-D list of rows, got {arr.ndim} dimension(s)")
    if arr.shape[0] == 0:
        raise FeedError("inputs is an empty batch")
    if arr.shape[1] != schema.n_features:
        raise FeedError(f"each row needs {schema.n_features} features, got {arr.shape[1]}")
    index = {f.name: j for j, f in enumerate(schema.features)}
    feeds: dict[str, np.ndarray] = {}
    n = arr.shape[0]
    for inp in schema.inputs:
        cols = [index[f] for f in inp.features]
        block = arr[:, cols]
        if inp.dtype == "string":
            tensor = np.array(
                [[("" if v is None else str(v)) for v in row] for row in block], dtype=object
            )
        else:
            try:
                tensor = block.astype(_NP[inp.dtype])
            except (TypeError, ValueError):
                bad = _first_non_numeric(block)
                raise FeedError(
                    f"feature {inp.features[bad[1]]!r} in row {bad[0]} is not a number"
                ) from None
        tail = [int(d) for d in inp.shape[1:] if d is not None]
        if tail and len(tail) == len(inp.shape) - 1 and int(np.prod(tail)) == len(cols):
            tensor = tensor.reshape([n, *tail])
        feeds[inp.name] = tensor
    return feeds


def _first_non_numeric(block: np.ndarray) -> tuple[int, int]:
    for i, row in enumerate(block):
        for j, v in enumerate(row):
            try:
                float(v)
            except (TypeError, ValueError):
                return i, j
    return 0, 0


@dataclass(slots=True)
class Prediction:
    labels: list[Any] | None = None
    probabilities: np.ndarray | None = None  # (n, n_classes)
    values: np.ndarray | None = None  # (n, n_outputs)

    @property
    def scores(self) -> np.ndarray:
        """One score per row: max probability, or the (first) predicted value."""
        if self.probabilities is not None:
            return np.asarray(self.probabilities).max(axis=1)
        if self.values is not None:
            return np.asarray(self.values).reshape(len(self.values), -1)[:, 0]
        return np.zeros(len(self.labels or []))


def decode_outputs(outputs: Mapping[str, np.ndarray], schema: OutputSchema) -> Prediction:
    """Output tensors by name → :class:`Prediction` per the output schema."""
    if schema.task == "regression":
        name = schema.value_output or next(iter(outputs))
        vals = np.asarray(outputs[name], dtype=np.float64)
        return Prediction(values=vals.reshape(vals.shape[0], -1))
    probs = None
    if schema.probability_output and schema.probability_output in outputs:
        probs = np.asarray(outputs[schema.probability_output], dtype=np.float64)
        probs = probs.reshape(probs.shape[0], -1)
    labels: list[Any] | None = None
    if schema.label_output and schema.label_output in outputs:
        raw = np.asarray(outputs[schema.label_output]).reshape(-1)
        labels = [_py(v) for v in raw]
    elif probs is not None and schema.classes:
        labels = [schema.classes[int(i)] for i in probs.argmax(axis=1)]
    return Prediction(labels=labels, probabilities=probs)


def _py(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    return v


def quantize_tensor(x: np.ndarray, scale: float, zero_point: int, dtype: Any) -> np.ndarray:
    """Float tensor → integer tensor for a full-INT8 TFLite input."""
    info = np.iinfo(dtype)
    q = np.round(x / scale + zero_point)
    return np.clip(q, info.min, info.max).astype(dtype)


def dequantize_tensor(q: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    return (q.astype(np.float32) - zero_point) * scale
