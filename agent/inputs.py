"""Check request rows against a manifest's input schema before they reach a runtime.

:func:`validate_rows` accepts a 2-D list (or array) of rows in schema feature order and
returns an array ready for :func:`protocol.feeds.make_feeds`, or raises
:class:`agent.errors.InputError` whose message names the row and feature at fault: wrong
row length, a non-number for a numeric feature, NaN/None where the schema does not allow
it, infinities and values beyond float32's range (JSON ``1e400`` parses as infinity), or
an empty batch. All-numeric schemas take a vectorized fast path, and
:meth:`SchemaPlan.fast_array` accepts a finite float32 array as it is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from protocol.schema import InputSchema

from .errors import InputError

_F32_MAX = float(np.finfo(np.float32).max)
_F32 = np.dtype(np.float32)
_FAST_VALUES = 65_536


class SchemaPlan:
    """What validation needs from a schema, computed once per loaded model."""

    def __init__(self, schema: InputSchema) -> None:
        self.schema = schema
        self.names = schema.feature_names
        self.n = len(self.names)
        self.numeric = [f.kind == "numeric" and f.dtype != "string" for f in schema.features]
        self.all_numeric = all(self.numeric)
        self.nan_ok = np.array([f.allow_nan for f in schema.features])
        self.any_nan_ok = bool(self.nan_ok.any())
        self.f32_cols = np.array([f.dtype in ("float32", "float16") for f in schema.features])
        self.any_f32 = bool(self.f32_cols.any())
        # fast_array's zero vector: at least one row, at most _FAST_VALUES values
        self._zeros: np.ndarray | None = None
        self._zeros1: np.ndarray | None = None
        if self.all_numeric:
            self._zeros = np.zeros(max(self.n, min(self.n * 256, _FAST_VALUES)), np.float32)
            self._zeros1 = self._zeros[: self.n]

    def fast_array(self, rows: np.ndarray, max_rows: int | None = None) -> np.ndarray | None:
        """``rows`` itself when it is a C-contiguous float32 (n, features) array of 1 to
        ``max_rows`` rows with every value finite; else None, and :func:`validate_rows`
        decides. Only for all-numeric schemas.

        For up to 64k values, finiteness is one ``np.vdot`` with zeros: x·0 is 0 for every
        finite x and NaN for NaN or ±inf, so the sum is 0 exactly when all values are
        finite. That costs about half of ``np.isfinite(rows).all()`` on a single row.
        (``vdot`` does not check the FPU flags, so ``inf·0`` raises no warning; a test
        holds numpy to that.)
        """
        zeros = self._zeros
        if (
            zeros is None
            or rows.dtype is not _F32
            or rows.ndim != 2
            or rows.shape[1] != self.n
            or not rows.flags.c_contiguous
        ):
            return None
        n = rows.shape[0]
        if n == 0 or (max_rows is not None and n > max_rows):
            return None
        try:
            if n == 1:
                if np.vdot(rows, self._zeros1) != 0:
                    return None
            elif rows.size <= zeros.size:
                if np.vdot(rows, zeros[: rows.size]) != 0:
                    return None
            elif not np.isfinite(rows).all():
                return None
        except (FloatingPointError, RuntimeWarning):  # np.seterr / warnings set to raise
            return None
        return rows


def validate_rows(rows: Any, plan: SchemaPlan, max_rows: int | None = None) -> np.ndarray:
    if isinstance(rows, np.ndarray):
        if rows.ndim != 2:
            raise InputError(f"inputs must be 2-D (rows × features), got {rows.ndim} dimension(s)")
    elif not isinstance(rows, (list, tuple)):
        raise InputError("inputs must be a list of rows")
    if len(rows) == 0:
        raise InputError("inputs is an empty batch")
    if max_rows is not None and len(rows) > max_rows:
        raise InputError(f"batch of {len(rows)} rows is over the limit of {max_rows}")
    if plan.all_numeric:
        arr = _numeric_fast(rows, plan)
        if arr is not None:
            return arr
    return _checked(rows, plan)


def _numeric_fast(rows: Any, plan: SchemaPlan) -> np.ndarray | None:
    """The common case in a few vectorized calls; None sends the rows to the slow path."""
    if isinstance(rows, np.ndarray):
        arr = rows
    else:
        # numpy would silently turn True/False into 1.0/0.0: a JSON bool is a wrong type.
        for row in rows:
            if isinstance(row, list) and bool in map(type, row):
                return None
        try:
            arr = np.array(rows)
        except (ValueError, TypeError, OverflowError):
            return None  # ragged or odd: the slow path says exactly what is wrong
    if arr.ndim != 2 or arr.shape[1] != plan.n or arr.dtype.kind not in "fiu":
        return None
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            nan = np.isnan(arr)
            if not plan.any_nan_ok or np.isinf(arr).any() or (nan & ~plan.nan_ok).any():
                return None
            finite = np.where(nan, 0.0, arr)
        else:
            finite = arr
        if arr.dtype.itemsize > 4 and plan.any_f32 and np.abs(finite).max() > _F32_MAX:
            return None
    elif plan.any_f32 and np.abs(arr.astype(np.float64)).max() > _F32_MAX:
        return None
    return arr


class FeedPlan:
    """Rows → input tensors exactly as :func:`protocol.feeds.make_feeds` builds them,
    with the column lookups done once per model instead of once per request.

    Only numeric inputs take the fast path; a model with a string input uses
    ``make_feeds`` itself.
    """

    def __init__(self, schema: InputSchema) -> None:
        from protocol.feeds import _NP

        self.schema = schema
        index = {f.name: j for j, f in enumerate(schema.features)}
        self.fast = all(inp.dtype != "string" for inp in schema.inputs)
        self.parts: list[tuple[str, Any, Any, list[int] | None]] = []
        for inp in schema.inputs:
            cols = [index[f] for f in inp.features]
            identity = cols == list(range(len(schema.features)))
            tail = [d for d in inp.shape[1:] if d is not None]
            reshape: list[int] | None = None
            if tail and len(tail) == len(inp.shape) - 1 and int(np.prod(tail)) == len(cols):
                reshape = tail
            self.parts.append(
                (inp.name, None if identity else np.asarray(cols), _NP.get(inp.dtype), reshape)
            )
        # The input's name when the rows are the model's only input as they are: every
        # feature in order, float32, (n, features). The predictor then skips building feeds.
        self.single: str | None = None
        if len(self.parts) == 1:
            name, cols_, dtype_, reshape_ = self.parts[0]
            flat = reshape_ is None or reshape_ == [len(schema.features)]
            if cols_ is None and flat and dtype_ is np.float32:
                self.single = name

    def feeds(self, arr: np.ndarray) -> dict[str, np.ndarray]:
        if not self.fast:
            from protocol.feeds import make_feeds

            return make_feeds(arr, self.schema)
        out = {}
        n = arr.shape[0]
        for name, cols, dtype, reshape in self.parts:
            block = arr if cols is None else arr[:, cols]
            try:
                tensor = block.astype(dtype, copy=False)
            except (TypeError, ValueError):
                from protocol.feeds import make_feeds

                return make_feeds(arr, self.schema)  # raises FeedError naming the value
            if reshape is not None:
                tensor = tensor.reshape([n, *reshape])
            out[name] = tensor
        return out


def _checked(rows: Sequence[Any], plan: SchemaPlan) -> np.ndarray:
    out = np.empty((len(rows), plan.n), dtype=object if not plan.all_numeric else np.float64)
    for i, row in enumerate(rows):
        if isinstance(row, np.ndarray):
            row = row.tolist()
        if not isinstance(row, (list, tuple)):
            raise InputError(f"inputs[{i}] must be a list of {plan.n} feature values")
        if len(row) != plan.n:
            raise InputError(f"inputs[{i}] has {len(row)} features, the model needs {plan.n}")
        for j, v in enumerate(row):
            out[i, j] = _value(v, i, j, plan)
    return out


def _value(v: Any, i: int, j: int, plan: SchemaPlan) -> Any:
    name = plan.names[j]
    spec = plan.schema.features[j]
    if not plan.numeric[j]:
        if v is None:
            if spec.allow_nan:
                return ""
            raise InputError(f"inputs[{i}]: feature {name!r} is missing (null)")
        if isinstance(v, (list, dict)):
            raise InputError(f"inputs[{i}]: feature {name!r} must be a string")
        return str(v)
    if v is None:
        if spec.allow_nan:
            return math.nan
        raise InputError(
            f"inputs[{i}]: feature {name!r} is null and the model does not allow missing values"
        )
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise InputError(f"inputs[{i}]: feature {name!r} is not a number ({type(v).__name__})")
    try:
        x = float(v)
    except OverflowError:
        raise InputError(f"inputs[{i}]: feature {name!r} is too large") from None
    if math.isnan(x):
        if spec.allow_nan:
            return x
        raise InputError(f"inputs[{i}]: feature {name!r} is NaN and the model does not allow NaN")
    if math.isinf(x):
        raise InputError(f"inputs[{i}]: feature {name!r} is not finite")
    if spec.dtype in ("float32", "float16") and abs(x) > _F32_MAX:
        raise InputError(f"inputs[{i}]: feature {name!r} is too large for float32")
    return x
