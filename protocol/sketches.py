"""Feature sketches: Apache DataSketches KLL (numeric) and frequent items (categorical).

A :class:`SketchSet` summarises one window of rows (or the reference data of a bundle):
per feature a compact serialized sketch plus counts of rows, NaN/missing and values
outside the reference range, and sketches of the model's scores and predicted labels.
Serialized sketches are the standard DataSketches bytes (readable from Java/C++), carried
base64-encoded so a SketchSet is plain JSON. Sketches merge across devices and windows.

:func:`ks_distance` computes the KS statistic from the two KLL CDFs directly (DataSketches'
own ``ks_test`` is too conservative, see DESIGN.md) and returns it with the combined rank
error bound; :func:`psi` computes PSI on reference-quantile bins.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ProtocolError
from .schema import InputSchema

DEFAULT_K = 200
DEFAULT_LG_MAX_MAP = 6  # frequent items map holds up to 0.75 * 2**6 = 48 items

# Caps checked on a sketch's header BEFORE the bytes reach DataSketches' deserializer, which
# allocates what the header says (a 1.4 KB frequent-items sketch claiming a 2**26 map cost
# the fleet server +1.3 GB). Generous next to what edgefleet builds (k=200, lg map 6).
MAX_SKETCH_BYTES = 256 * 1024  # one serialized sketch
MAX_KLL_K = 4096
MAX_KLL_LEVELS = 61
MAX_LG_MAP = 12  # 4096-slot frequent-items map
MAX_FEATURES = 2048  # sketches in one SketchSet
_KLL_FAMILY = 15
_FREQUENT_FAMILY = 10

SCORES_KEY = "__score__"
LABELS_KEY = "__label__"


def _ds() -> Any:
    import datasketches  # light C++ extension, but keep import cost off CLI start-up

    return datasketches


class FeatureSketch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["numeric", "categorical"]
    sketch: str  # base64 of the DataSketches serialization
    count: int = Field(default=0, ge=0)
    missing: int = Field(default=0, ge=0)
    out_of_range: int = Field(default=0, ge=0)

    def kll(self) -> Any:
        if self.kind != "numeric":
            raise ProtocolError("not a numeric sketch")
        return decode_kll(self.sketch)

    def frequent(self) -> Any:
        if self.kind != "categorical":
            raise ProtocolError("not a categorical sketch")
        return decode_frequent(self.sketch)


class SketchSet(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rows: int = Field(default=0, ge=0)
    features: dict[str, FeatureSketch] = Field(default_factory=dict, max_length=MAX_FEATURES)

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> SketchSet:
        try:
            out = cls.model_validate_json(data)
        except ValidationError as exc:
            raise ProtocolError(f"sketch set: {exc.errors()[0]['msg']}") from None
        for name, fs in out.features.items():
            try:
                fs.kll() if fs.kind == "numeric" else fs.frequent()
            except ProtocolError as exc:
                raise ProtocolError(f"sketch of {name!r}: {exc}") from None
        return out


def encode(sketch: Any) -> str:
    return base64.b64encode(sketch.serialize()).decode()


def _raw(data: str, what: str) -> bytes:
    if len(data) > (MAX_SKETCH_BYTES + 2) // 3 * 4:
        raise ProtocolError(f"{what} sketch is over {MAX_SKETCH_BYTES} bytes")
    try:
        return base64.b64decode(data, validate=True)
    except ValueError:
        raise ProtocolError(f"{what} sketch is not base64") from None


def check_kll_header(raw: bytes) -> None:
    """Refuse a KLL float sketch whose header asks for more than the caps (no allocation).

    Layout (DataSketches KLL, little endian): preamble ints, serial version, family (15),
    flags, k (uint16), m; a full sketch (serial version 1) then has n (uint64),
    min_k (uint16) and the number of levels (uint8).
    """
    if len(raw) < 8:
        raise ProtocolError("KLL sketch: header is truncated")
    if raw[2] != _KLL_FAMILY:
        raise ProtocolError(f"KLL sketch: family {raw[2]} is not KLL ({_KLL_FAMILY})")
    if raw[1] not in (1, 2):
        raise ProtocolError(f"KLL sketch: serial version {raw[1]} is not supported")
    k = int.from_bytes(raw[4:6], "little")
    if not 8 <= k <= MAX_KLL_K:
        raise ProtocolError(f"KLL sketch: k={k} is outside 8..{MAX_KLL_K}")
    if raw[1] == 1 and len(raw) > 8:
        if len(raw) < 20:
            raise ProtocolError("KLL sketch: header is truncated")
        min_k = int.from_bytes(raw[16:18], "little")
        levels = raw[18]
        if min_k > k or levels > MAX_KLL_LEVELS:
            raise ProtocolError(f"KLL sketch: min_k={min_k}, {levels} levels are over the caps")


def check_frequent_header(raw: bytes) -> None:
    """Refuse a frequent-items sketch whose map sizes or item count exceed the caps.

    Layout: preamble longs, serial version, family (10), lg max map size, lg current map
    size, flags, 2 unused; a non-empty sketch then has the active item count (uint32).
    """
    if len(raw) < 8:
        raise ProtocolError("frequent-items sketch: header is truncated")
    if raw[2] != _FREQUENT_FAMILY:
        raise ProtocolError(f"frequent-items sketch: family {raw[2]} is not {_FREQUENT_FAMILY}")
    lg_max, lg_cur = raw[3], raw[4]
    if lg_max > MAX_LG_MAP or lg_cur > lg_max:
        raise ProtocolError(
            f"frequent-items sketch: map size 2^{max(lg_max, lg_cur)} is over the cap "
            f"2^{MAX_LG_MAP}"
        )
    if raw[0] > 1:  # not empty
        if len(raw) < 12:
            raise ProtocolError("frequent-items sketch: header is truncated")
        active = int.from_bytes(raw[8:12], "little")
        if active > (3 << lg_cur) // 4:
            raise ProtocolError(
                f"frequent-items sketch: {active} items do not fit a 2^{lg_cur} map"
            )


def decode_kll(data: str) -> Any:
    raw = _raw(data, "KLL")
    check_kll_header(raw)
    try:
        return _ds().kll_floats_sketch.deserialize(raw)
    except Exception as exc:  # the C++ binding raises RuntimeError/ValueError/...
        raise ProtocolError(f"not a KLL sketch: {exc}") from None


def decode_frequent(data: str) -> Any:
    raw = _raw(data, "frequent-items")
    check_frequent_header(raw)
    try:
        return _ds().frequent_strings_sketch.deserialize(raw)
    except Exception as exc:
        raise ProtocolError(f"not a frequent-items sketch: {exc}") from None


def _int_counts(values: Iterable[Any]) -> dict[str, int] | None:
    """{str(value): count} for a list of plain ints, else None."""
    if type(values) is not list or not values or not all(type(v) is int for v in values):
        return None
    try:
        uniq, counts = np.unique(np.array(values, dtype=np.int64), return_counts=True)
    except OverflowError:
        return None
    return {str(u): c for u, c in zip(uniq.tolist(), counts.tolist(), strict=True)}


class _ColumnPlan:
    """A schema's columns as SketchBuilder.update_rows reads them, computed once."""

    def __init__(self, schema: InputSchema) -> None:
        num = [(j, f) for j, f in enumerate(schema.features) if f.kind == "numeric"]
        self.index = np.array([j for j, _ in num], dtype=np.intp)
        self.numeric = [f.name for _, f in num]
        self.all_numeric = len(num) == len(schema.features)
        # reference range per numeric column; ±inf where unknown (never out of range)
        self.lo = np.array([-np.inf if f.min is None else f.min for _, f in num], dtype=np.float64)
        self.hi = np.array([np.inf if f.max is None else f.max for _, f in num], dtype=np.float64)
        self.categorical = [(j, f) for j, f in enumerate(schema.features) if f.kind != "numeric"]


class SketchBuilder:
    """Accumulate rows into sketches. Not thread-safe: one writer at a time."""

    def __init__(
        self,
        schema: InputSchema | None = None,
        *,
        k: int = DEFAULT_K,
        lg_max_map: int = DEFAULT_LG_MAX_MAP,
    ) -> None:
        self.schema = schema
        self.k = k
        self.lg_max_map = lg_max_map
        self.rows = 0
        self._kll: dict[str, Any] = {}
        self._freq: dict[str, Any] = {}
        self._count: dict[str, int] = {}
        self._missing: dict[str, int] = {}
        self._oor: dict[str, int] = {}
        if schema is not None:
            for f in schema.features:
                if f.kind == "numeric":
                    self._new_numeric(f.name)
                else:
                    self._new_categorical(f.name)
            self._plan = _ColumnPlan(schema)

    def _new_numeric(self, name: str) -> None:
        self._kll[name] = _ds().kll_floats_sketch(self.k)
        self._count[name] = self._missing[name] = self._oor[name] = 0

    def _new_categorical(self, name: str) -> None:
        self._freq[name] = _ds().frequent_strings_sketch(self.lg_max_map)
        self._count[name] = self._missing[name] = self._oor[name] = 0

    def update_numeric(
        self, name: str, values: Any, lo: float | None = None, hi: float | None = None
    ) -> None:
        if name not in self._kll:
            self._new_numeric(name)
        arr = np.asarray(values, dtype=np.float64).ravel()
        nan = np.isnan(arr)
        finite = arr[~nan]
        self._count[name] += int(arr.size)
        self._missing[name] += int(nan.sum())
        if finite.size:
            self._kll[name].update(finite.astype(np.float32))
            if lo is not None:
                self._oor[name] += int((finite < lo).sum())
            if hi is not None:
                self._oor[name] += int((finite > hi).sum())

    def update_categorical(
        self, name: str, values: Iterable[Any], known: Sequence[str] | None = None
    ) -> None:
        if name not in self._freq:
            self._new_categorical(name)
        counts = _int_counts(values)  # predicted labels: one numpy call
        total = missing = 0
        if counts is not None:
            total = sum(counts.values())
        else:
            counts = {}
            for v in values:
                total += 1
                if v is None or (isinstance(v, float) and math.isnan(v)):
                    missing += 1
                    continue
                s = v if type(v) is str else str(v)
                counts[s] = counts.get(s, 0) + 1
        sk = self._freq[name]
        known_set = set(known) if known else None
        for s, c in counts.items():  # one weighted update per distinct value
            sk.update(s, c)
            if known_set is not None and s not in known_set:
                self._oor[name] += c
        self._count[name] += total
        self._missing[name] += missing

    def update_rows(self, rows: Any) -> None:
        """Add a 2-D batch of rows in schema feature order (needs a schema).

        The numeric columns are counted in a few whole-matrix numpy calls (NaN, below the
        reference minimum, above its maximum), then each column goes to its KLL sketch in
        one call: the per-batch cost hardly depends on the batch size.
        """
        if self.schema is None:
            raise ValueError("update_rows needs an InputSchema")
        arr = np.asarray(rows, dtype=object) if not isinstance(rows, np.ndarray) else rows
        if arr.ndim == 1:
            arr = arr.reshape(1, -1)
        plan = self._plan
        n = int(arr.shape[0])
        if plan.numeric:
            block = arr if plan.all_numeric else arr[:, plan.index]
            vals = np.asarray(block, dtype=np.float64)
            nan = np.isnan(vals)
            has_nan = bool(nan.any())
            missing = nan.sum(axis=0).tolist() if has_nan else None
            oor = ((vals < plan.lo).sum(axis=0) + (vals > plan.hi).sum(axis=0)).tolist()
            cols = np.ascontiguousarray(vals.T, dtype=np.float32)
            for i, name in enumerate(plan.numeric):
                col = cols[i]
                if missing is not None and missing[i]:
                    col = col[~nan[:, i]]
                    self._missing[name] += missing[i]
                if col.size:
                    self._kll[name].update(col)
                self._count[name] += n
                self._oor[name] += oor[i]
        for j, f in plan.categorical:
            self.update_categorical(f.name, arr[:, j].tolist(), f.categories)
        self.rows += n

    def update_predictions(self, scores: Any = None, labels: Iterable[Any] | None = None) -> None:
        if scores is not None:
            self.update_numeric(SCORES_KEY, scores)
        if labels is not None:
            self.update_categorical(LABELS_KEY, labels)

    def build(self) -> SketchSet:
        feats: dict[str, FeatureSketch] = {}
        for name, sk in self._kll.items():
            feats[name] = FeatureSketch(
                kind="numeric",
                sketch=encode(sk),
                count=self._count[name],
                missing=self._missing[name],
                out_of_range=self._oor[name],
            )
        for name, sk in self._freq.items():
            feats[name] = FeatureSketch(
                kind="categorical",
                sketch=encode(sk),
                count=self._count[name],
                missing=self._missing[name],
                out_of_range=self._oor[name],
            )
        return SketchSet(rows=self.rows, features=feats)


def merge(a: SketchSet, b: SketchSet) -> SketchSet:
    """Merge two sketch sets (commutative; features present in either are kept)."""
    feats: dict[str, FeatureSketch] = {}
    for name in sorted(set(a.features) | set(b.features)):
        fa, fb = a.features.get(name), b.features.get(name)
        if fa is None or fb is None:
            feats[name] = (fa or fb).model_copy()  # type: ignore[union-attr]
            continue
        if fa.kind != fb.kind:
            raise ProtocolError(
                f"feature {name!r} is {fa.kind} in one set and {fb.kind} in the other"
            )
        if fa.kind == "numeric":
            sk = fa.kll()
            sk.merge(fb.kll())
        else:
            sk = fa.frequent()
            sk.merge(fb.frequent())
        feats[name] = FeatureSketch(
            kind=fa.kind,
            sketch=encode(sk),
            count=fa.count + fb.count,
            missing=fa.missing + fb.missing,
            out_of_range=fa.out_of_range + fb.out_of_range,
        )
    return SketchSet(rows=a.rows + b.rows, features=feats)


def build_reference(X: Any, schema: InputSchema, *, k: int = DEFAULT_K) -> SketchSet:
    """Reference sketches of a data matrix whose columns follow ``schema.features``."""
    builder = SketchBuilder(schema, k=k)
    builder.update_rows(X)
    return builder.build()


class KSResult(BaseModel):
    statistic: float
    rank_error: float  # combined normalized rank error bound of the two sketches
    n_ref: int
    n_cur: int


def ks_distance(ref: Any, cur: Any) -> KSResult:
    """KS statistic between two KLL sketches, from their CDFs on the union of split points."""
    if ref.is_empty() or cur.is_empty():
        return KSResult(statistic=0.0, rank_error=1.0, n_ref=int(ref.n), n_cur=int(cur.n))
    ranks = np.linspace(0.0, 1.0, 201)
    points = np.unique(
        np.concatenate([np.asarray(ref.get_quantiles(ranks)), np.asarray(cur.get_quantiles(ranks))])
    ).astype(np.float32)
    f_ref = np.asarray(ref.get_cdf(points.tolist()))[:-1]
    f_cur = np.asarray(cur.get_cdf(points.tolist()))[:-1]
    d = float(np.max(np.abs(f_ref - f_cur)))
    eps = float(ref.normalized_rank_error(False) + cur.normalized_rank_error(False))
    return KSResult(statistic=d, rank_error=eps, n_ref=int(ref.n), n_cur=int(cur.n))


def ks_critical(n_ref: int, n_cur: int, alpha: float = 0.05) -> float:
    """Two-sample KS critical value (asymptotic)."""
    if n_ref == 0 or n_cur == 0:
        return 1.0
    c = math.sqrt(-0.5 * math.log(alpha / 2))
    return c * math.sqrt((n_ref + n_cur) / (n_ref * n_cur))


def psi(ref: Any, cur: Any, bins: int = 10, floor: float = 1e-4) -> float:
    """Population stability index on ``bins`` reference-quantile bins."""
    if ref.is_empty() or cur.is_empty():
        return 0.0
    inner = np.linspace(0, 1, bins + 1)[1:-1]
    edges = np.unique(np.asarray(ref.get_quantiles(inner.tolist()), dtype=np.float32))
    p = np.diff(np.concatenate([[0.0], np.asarray(ref.get_cdf(edges.tolist()))]))
    q = np.diff(np.concatenate([[0.0], np.asarray(cur.get_cdf(edges.tolist()))]))
    p = np.clip(p, floor, None)
    q = np.clip(q, floor, None)
    return float(np.sum((q - p) * np.log(q / p)))


def frequent_distribution(sketch: Any) -> dict[str, float]:
    """Item → estimated share of the stream, from a frequent-items sketch."""
    ds = _ds()
    total = sketch.total_weight
    if not total:
        return {}
    items = sketch.get_frequent_items(ds.frequent_items_error_type.NO_FALSE_NEGATIVES)
    return {item: est / total for item, est, _lb, _ub in items}


def jensen_shannon(p: dict[str, float], q: dict[str, float]) -> float:
    """Jensen–Shannon distance (base 2, in [0, 1]) between two item distributions."""
    keys = sorted(set(p) | set(q))
    if not keys:
        return 0.0
    pa = np.array([p.get(k, 0.0) for k in keys]) + 1e-12
    qa = np.array([q.get(k, 0.0) for k in keys]) + 1e-12
    pa, qa = pa / pa.sum(), qa / qa.sum()
    m = 0.5 * (pa + qa)
    js = 0.5 * np.sum(pa * np.log2(pa / m)) + 0.5 * np.sum(qa * np.log2(qa / m))
    return float(math.sqrt(max(js, 0.0)))
