"""Check request rows against a manifest's input schema before they reach a runtime.

:func:`validate_rows` accepts a 2-D list (or array) of rows in schema feature order and
returns an array ready for :func:`protocol.feeds.make_feeds`, or raises
:class:`agent.errors.InputError` whose message names the row and feature at fault: wrong
row length, a non-number for a numeric feature, NaN/None where the schema does not allow
it, infinities and values beyond float32's range (JSON ``1e400`` parses as infinity), or
an empty batch. All-numeric schemas take a vectorized fast path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from protocol.schema import InputSchema

from .errors import InputError

_F32_MAX = float(np.finfo(np.float32).max)


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
    if not isinstance(rows, np.ndarray):
        # numpy would silently turn True/False into 1.0/0.0: a JSON bool is a wrong type.
        for row in rows:
            if isinstance(row, (list, tuple)):
                for v in row:
                    if v.__class__ is bool:
                        return None
    try:
        arr = rows if isinstance(rows, np.ndarray) else np.array(rows)
    except (ValueError, TypeError, OverflowError):
        return None  # ragged or odd: the slow path says exactly what is wrong
    if arr.ndim != 2 or arr.shape[1] != plan.n or arr.dtype.kind not in "fiu":
        return None
    if arr.dtype.kind == "f":
        finite = np.isfinite(arr)
        if not finite.all():
            nan = np.isnan(arr)
            if (~finite & ~nan).any() or (nan & ~plan.nan_ok).any():
                return None
        big = np.abs(np.where(np.isnan(arr), 0, arr)) > _F32_MAX
        if (big & plan.f32_cols).any():
            return None
    elif (
        arr.dtype.kind in "iu"
        and plan.f32_cols.any()
        and (np.abs(arr.astype(np.float64)) > _F32_MAX).any()
    ):
        return None
    return arr


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
