"""Central drift detection from merged device sketches.

Devices send a :class:`~protocol.messages.SketchReport` per telemetry window. The engine

1. **ingests** it idempotently on ``(device, model, version, window_start, seq)`` (a QoS 1
   duplicate counts once) and merges its sketches into the server window
   ``floor(window_start / window_seconds)`` of that ``(model, version)``. On SQLite the
   open window is held in memory and written every ``flush_interval_s`` with the keys it
   absorbed; on PostgreSQL (several server processes) each report is merged at once in
   one transaction that inserts its key first (:meth:`.drift_store_pg.PgDriftStore.merge_report`),
   so a report any process took counts once;
2. **evaluates** the latest window against the bundle's reference sketch:

   - numeric features: the KS statistic ``D`` from the two KLL CDFs
     (:func:`protocol.sketches.ks_distance`) with the sketches' rank-error band ``ε``. A
     feature drifts only when the lower bound ``D − ε`` clears the critical value
     :func:`~protocol.sketches.ks_critical` **and** ``D`` reaches ``ks_effect_floor`` (with
     thousands of rows any tiny difference is "significant"; the floor keeps it meaningful).
     PSI on reference-quantile bins is reported beside it (``numeric_rule`` chooses what
     decides: ``ks`` (default), ``psi`` or ``ks_or_psi``).
   - categorical features: Jensen–Shannon distance between the frequent-item shares, and a
     chi-square test of the current counts against the reference shares. A feature drifts
     when the chi-square p-value is below ``ks_alpha`` **and** JS ≥ ``js_threshold``.
   - the dataset drifts when at least ``dataset_share`` of the tested features drift
     (Evidently's convention). Score/label sketches, when both sides have them, are tested
     and reported with ``role="prediction"`` but do not count towards the share.

3. stores each evaluation whose inputs changed, publishes one ``Alert(kind="drift")`` per
   window that drifts (not on every tick) and fires the optional hook with the result dict.

Windows with fewer than ``min_rows`` rows are not evaluated. All public methods are
thread-safe (one lock around the store).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

from protocol.errors import ProtocolError
from protocol.messages import Alert, SketchReport
from protocol.sketches import (
    LABELS_KEY,
    SCORES_KEY,
    SketchSet,
    frequent_distribution,
    jensen_shannon,
    ks_critical,
    ks_distance,
    psi,
)

from .drift_store import DriftStore
from .drift_store_pg import PgDriftStore
from .drift_window import OpenWindow, decode_set
from .errors import ConfigError

log = logging.getLogger(__name__)

PREDICTION_KEYS = (SCORES_KEY, LABELS_KEY)
MAX_FEATURES = 4096


class DriftConfigError(ConfigError):
    """A drift configuration value that cannot work (unknown field, share outside 0..1)."""


@dataclass(frozen=True)
class DriftConfig:
    ks_alpha: float = 0.05
    ks_effect_floor: float = 0.1
    psi_threshold: float = 0.2
    js_threshold: float = 0.1
    dataset_share: float = 0.5
    min_rows: int = 200
    window_seconds: float = 3600.0
    numeric_rule: Literal["ks", "psi", "ks_or_psi"] = "ks"
    # model name → {field: value} overriding the fields above for that model
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(self)
        names = {f.name for f in fields(self)} - {"overrides"}
        for model, over in self.overrides.items():
            unknown = sorted(set(over) - names)
            if unknown:
                where = f"drift.{model}.{unknown[0]}"
                raise DriftConfigError(f"{where}: unknown field", field=where)
            _check(replace(self, overrides={}, **over))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DriftConfig:
        """Build from a ``[drift]`` TOML table; a sub-table ``[drift.MODEL]`` overrides per model.

        Unknown fields raise :class:`DriftConfigError` naming ``drift.FIELD``.
        """
        names = {f.name for f in fields(cls)} - {"overrides"}
        top: dict[str, Any] = {}
        overrides: dict[str, dict[str, Any]] = dict(data.get("overrides") or {})
        for key, value in data.items():
            if key == "overrides":
                continue
            if isinstance(value, dict):
                overrides[key] = {**overrides.get(key, {}), **value}
            elif key in names:
                top[key] = value
            else:
                raise DriftConfigError(f"drift.{key}: unknown field", field=f"drift.{key}")
        return cls(**top, overrides=overrides)

    def for_model(self, model: str) -> DriftConfig:
        over = self.overrides.get(model)
        return replace(self, overrides={}, **over) if over else self


def _check(c: DriftConfig) -> None:
    if not 0 < c.ks_alpha < 1:
        raise DriftConfigError(f"drift.ks_alpha must be in (0, 1), got {c.ks_alpha}")
    if not 0 < c.dataset_share <= 1:
        raise DriftConfigError(f"drift.dataset_share must be in (0, 1], got {c.dataset_share}")
    if c.window_seconds <= 0:
        raise DriftConfigError(f"drift.window_seconds must be > 0, got {c.window_seconds}")
    if c.min_rows < 0:
        raise DriftConfigError(f"drift.min_rows must be ≥ 0, got {c.min_rows}")
    if c.numeric_rule not in ("ks", "psi", "ks_or_psi"):
        raise DriftConfigError(
            f"drift.numeric_rule must be ks, psi or ks_or_psi, got {c.numeric_rule!r}"
        )


@dataclass
class FeatureDrift:
    name: str
    kind: Literal["numeric", "categorical"]
    drift: bool
    n_ref: int
    n_cur: int
    role: Literal["feature", "prediction"] = "feature"
    # numeric
    ks: float | None = None
    rank_error: float | None = None
    ks_lower: float | None = None
    ks_critical: float | None = None
    psi: float | None = None
    # categorical
    js: float | None = None
    chi2: float | None = None
    p_value: float | None = None
    missing_share: float = 0.0


@dataclass
class DriftResult:
    model: str
    version: str
    window_start: float
    evaluated_at: float
    rows: int
    features: list[FeatureDrift]
    drifted_share: float
    dataset_drift: bool

    @property
    def drifted(self) -> list[str]:
        return [f.name for f in self.features if f.drift and f.role == "feature"]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _kll_error(sk: Any) -> float:
    """Normalized rank error of one KLL sketch: 0 while it still holds every item."""
    return float(sk.normalized_rank_error(False)) if sk.is_estimation_mode() else 0.0


def _chi2_pvalue(x: float, df: int) -> float:
    """Upper tail of chi-square via the Wilson–Hilferty normal approximation (no scipy)."""
    if df <= 0:
        return 1.0
    h = 2.0 / (9.0 * df)
    z = ((x / df) ** (1.0 / 3.0) - (1.0 - h)) / math.sqrt(h)
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def numeric_drift(name: str, ref: Any, cur: Any, cfg: DriftConfig) -> FeatureDrift:
    rk, ck = ref.kll(), cur.kll()
    ks = ks_distance(rk, ck)
    eps = _kll_error(rk) + _kll_error(ck)
    crit = ks_critical(ks.n_ref, ks.n_cur, cfg.ks_alpha)
    lower = max(0.0, ks.statistic - eps)
    ks_drift = lower > crit and ks.statistic >= cfg.ks_effect_floor
    p = psi(rk, ck)
    psi_drift = p >= cfg.psi_threshold and ks.n_cur > 0
    drift = {"ks": ks_drift, "psi": psi_drift, "ks_or_psi": ks_drift or psi_drift}[cfg.numeric_rule]
    return FeatureDrift(
        name=name,
        kind="numeric",
        drift=bool(drift),
        n_ref=ks.n_ref,
        n_cur=ks.n_cur,
        ks=ks.statistic,
        rank_error=eps,
        ks_lower=lower,
        ks_critical=crit,
        psi=p,
        missing_share=cur.missing / cur.count if cur.count else 0.0,
    )


def categorical_drift(name: str, ref: Any, cur: Any, cfg: DriftConfig) -> FeatureDrift:
    rf, cf = ref.frequent(), cur.frequent()
    p, q = frequent_distribution(rf), frequent_distribution(cf)
    n_ref, n_cur = int(rf.total_weight), int(cf.total_weight)
    js = jensen_shannon(p, q)
    chi2, pval = 0.0, 1.0
    if n_ref and n_cur:
        keys = sorted(set(p) | set(q))
        floor = 0.5 / n_ref  # an item never seen in the reference still gets a tiny share
        expected = [max(p.get(k, 0.0), floor) for k in keys]
        total = sum(expected)
        chi2 = sum(
            (q.get(k, 0.0) * n_cur - e / total * n_cur) ** 2 / (e / total * n_cur)
            for k, e in zip(keys, expected, strict=True)
        )
        pval = _chi2_pvalue(chi2, len(keys) - 1)
    drift = pval < cfg.ks_alpha and js >= cfg.js_threshold
    return FeatureDrift(
        name=name,
        kind="categorical",
        drift=bool(drift),
        n_ref=n_ref,
        n_cur=n_cur,
        js=js,
        chi2=chi2,
        p_value=pval,
        missing_share=cur.missing / cur.count if cur.count else 0.0,
    )


def compare(reference: SketchSet, current: SketchSet, cfg: DriftConfig) -> list[FeatureDrift]:
    """Per-feature drift of ``current`` against ``reference`` (features present in both)."""
    out = []
    for name, ref in reference.features.items():
        cur = current.features.get(name)
        if cur is None or cur.kind != ref.kind:
            continue
        fd = (numeric_drift if ref.kind == "numeric" else categorical_drift)(name, ref, cur, cfg)
        if name in PREDICTION_KEYS:
            fd.role = "prediction"
        out.append(fd)
    return out


def validate_sketches(sketches: SketchSet) -> None:
    """Raise :class:`ProtocolError` unless every sketch decodes as its kind says."""
    if len(sketches.features) > MAX_FEATURES:
        raise ProtocolError(
            f"sketch report has {len(sketches.features)} features (limit {MAX_FEATURES})"
        )
    for name, fs in sketches.features.items():
        try:
            fs.kll() if fs.kind == "numeric" else fs.frequent()
        except ProtocolError as exc:
            raise ProtocolError(f"sketch of {name!r}: {exc}") from None


class DriftEngine:
    def __init__(
        self,
        db: Any,
        config: DriftConfig,
        publish_alert: Callable[[Alert], None],
        hook: Callable[[dict[str, Any]], None] | None = None,
        *,
        flush_interval_s: float = 1.0,
        max_pending: int = 500,
    ) -> None:
        self.config = config
        self.publish_alert = publish_alert
        self.hook = hook
        self._lock = threading.RLock()
        # db: the SQLite registry's sqlite_utils.Database, or a PgDriftStore (PostgreSQL)
        self._store = db if isinstance(db, PgDriftStore) else DriftStore(db)
        self._refs: dict[tuple[str, str], SketchSet] = {}
        self._open: dict[tuple[str, str, float], OpenWindow] = {}
        self._pending_keys: set[tuple[Any, ...]] = set()
        self._last_flush = time.monotonic()
        self.flush_interval_s = flush_interval_s
        self.max_pending = max_pending
        # (result) → (message, details) naming the devices/cohorts that drifted; set by the
        # service from fleet_server.cohort_drift so the alert says where the drift is
        self.describe_scope: Callable[[DriftResult], tuple[str, dict[str, Any]] | None] | None = (
            None
        )

    # input ------------------------------------------------------------------------------
    def register_reference(self, model: str, version: str, reference: SketchSet) -> None:
        validate_sketches(reference)
        with self._lock:
            self._store.put_reference(model, version, reference.model_dump_json(), reference.rows)
            self._refs[(model, version)] = reference

    def reference(self, model: str, version: str) -> SketchSet | None:
        with self._lock:
            ref = self._refs.get((model, version))
            if ref is None:
                text = self._store.reference(model, version)
                if text is None:
                    return None
                ref = self._refs[(model, version)] = SketchSet.model_validate_json(text)
            return ref

    def window_of(self, model: str, ts: float) -> float:
        w = self.config.for_model(model).window_seconds
        return math.floor(ts / w) * w

    def ingest(self, report: SketchReport) -> bool:
        """Merge one report into its window. False when this report was already counted.

        Raises :class:`ProtocolError` (and changes nothing) for a sketch that does not
        decode or whose kind differs from the same feature's in the window.
        """
        if len(report.sketches.features) > MAX_FEATURES:
            n = len(report.sketches.features)
            raise ProtocolError(f"sketch report has {n} features (limit {MAX_FEATURES})")
        incoming = decode_set(report.sketches)
        model, version = report.model.name, report.model.version
        window_start = report.window_start.timestamp()
        key = {
            "device": report.device_id,
            "model": model,
            "version": version,
            "window_start": window_start,
            "seq": report.seq,
        }
        ident = tuple(key.values())
        window = self.window_of(model, window_start)
        if isinstance(self._store, PgDriftStore):  # shared by processes: merged at once
            rows = report.sketches.rows
            return self._store.merge_report({**key, "window": window, "rows": rows}, incoming)
        with self._lock:
            if ident in self._pending_keys or self._store.seen(key):
                return False
            w = self._open.get((model, version, window))
            if w is None:
                row = self._store.window(model, version, window)
                w = OpenWindow.from_row(row) if row else OpenWindow(model, version, window)
                self._open[(model, version, window)] = w
            w.check(incoming)
            rows = report.sketches.rows
            w.add(report.device_id, rows, incoming, {**key, "window": window, "rows": rows})
            self._pending_keys.add(ident)
            due = time.monotonic() - self._last_flush >= self.flush_interval_s
            if due or len(self._pending_keys) >= self.max_pending:
                self._flush_locked()
        return True

    def flush(self) -> None:
        """Write merged windows and the report keys they absorbed (one transaction)."""
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        self._last_flush = time.monotonic()
        dirty = [w for w in self._open.values() if w.pending]
        if dirty:
            self._store.save_windows(
                [w.to_row() for w in dirty], [k for w in dirty for k in w.pending]
            )
            for w in dirty:
                w.pending = []
            self._pending_keys.clear()
        newest: dict[tuple[str, str], float] = {}
        for m, v, win in self._open:
            newest[(m, v)] = max(win, newest.get((m, v), win))
        for k in [k for k in self._open if k[2] < newest[(k[0], k[1])]]:
            del self._open[k]  # keep only the newest window of each version in memory

    # evaluation -------------------------------------------------------------------------
    def evaluate(self, model: str, version: str, *, now: float) -> DriftResult | None:
        """Test the latest window (starting at or before ``now``) against the reference."""
        cfg = self.config.for_model(model)
        with self._lock:
            self._flush_locked()
            # evaluation updates the stored window (evaluated/alerted): reload it next time
            for k in [k for k in self._open if k[:2] == (model, version)]:
                del self._open[k]
            reference = self.reference(model, version)
            row = self._store.latest_window(model, version, now)
            if reference is None or row is None or row["rows"] < cfg.min_rows:
                return None
            current = SketchSet.model_validate_json(row["sketch"])
            feats = compare(reference, current, cfg)
            counted = [f for f in feats if f.role == "feature"]
            share = sum(f.drift for f in counted) / len(counted) if counted else 0.0
            result = DriftResult(
                model=model,
                version=version,
                window_start=row["window"],
                evaluated_at=now,
                rows=row["rows"],
                features=feats,
                drifted_share=share,
                dataset_drift=bool(counted) and share >= cfg.dataset_share,
            )
            if row["evaluated_revision"] != row["revision"]:
                self._store.add_result(
                    {
                        "model": model,
                        "version": version,
                        "window": row["window"],
                        "evaluated_at": now,
                        "rows": row["rows"],
                        "drifted_share": share,
                        "dataset_drift": int(result.dataset_drift),
                        "features": json.dumps([asdict(f) for f in feats]),
                    }
                )
                self._store.mark_window(
                    model, version, row["window"], evaluated_revision=row["revision"]
                )
            notify = result.dataset_drift and not row["alerted"]
            if notify:
                self._store.mark_window(model, version, row["window"], alerted=1)
        if notify:
            self._notify(result)
        return result

    def evaluate_all(self, *, now: float) -> list[DriftResult]:
        """Evaluate every (model, version) that has a reference or data."""
        with self._lock:
            pairs = self._store.model_versions()
        return [r for m, v in pairs if (r := self.evaluate(m, v, now=now)) is not None]

    def _notify(self, result: DriftResult) -> None:
        names = result.drifted
        alert = Alert(
            kind="drift",
            model=result.model,
            version=result.version,
            message=(
                f"dataset drift on {result.model} {result.version}: {len(names)} of "
                f"{sum(f.role == 'feature' for f in result.features)} features drifted "
                f"({', '.join(names[:5])}{'…' if len(names) > 5 else ''})"
            ),
            details={
                "window_start": result.window_start,
                "rows": result.rows,
                "drifted_share": result.drifted_share,
                "features": names,
            },
        )
        scoped = None
        if self.describe_scope is not None:
            try:
                scoped = self.describe_scope(result)
            except Exception:  # the scope is extra information; never lose the alert
                log.exception("describing the drift scope failed")
        if scoped is not None:
            message, scope = scoped
            alert.message = f"{message} (fleet-wide merge: {len(names)} features drifted)"
            alert.details["scope"] = scope
        try:
            self.publish_alert(alert)
        except Exception:  # a failing publisher must not stop drift detection
            log.exception(
                "publishing the drift alert for %s %s failed", result.model, result.version
            )
        if self.hook is not None:
            try:
                self.hook(result.to_dict())
            except Exception:  # hooks log their own errors; belt and braces
                log.exception("drift hook failed")

    # queries ----------------------------------------------------------------------------
    def results(
        self, model: str | None = None, version: str | None = None, limit: int = 50
    ) -> list[dict[str, Any]]:
        """Stored evaluations, newest first (``features`` decoded to a list of dicts)."""
        with self._lock:
            self._flush_locked()
            return self._store.results(model, version, limit)

    def results_page(
        self,
        model: str | None = None,
        version: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> Any:
        """Stored evaluations newest first, one cursor page (a :class:`.pagination.Page`)."""
        with self._lock:
            self._flush_locked()
            return self._store.results_page(model, version, limit, cursor)

    def is_drifting(self, model: str, version: str) -> bool:
        latest = self.results(model, version, limit=1)
        return bool(latest and latest[0]["dataset_drift"])

    def feature_distributions(self, model: str, version: str, bins: int = 20) -> dict[str, Any]:
        """Reference vs current distribution per feature, for charts.

        Numeric: ``edges`` (bins + 1 values over the joint range) with the share of each
        sketch in every bin. Categorical: the most frequent items with both shares. The
        latest stored statistics of the feature sit under ``stats``.
        """
        with self._lock:
            self._flush_locked()
            reference = self.reference(model, version)
            row = self._store.latest_window(model, version, time.time() + 365 * 86400)
            latest = self._store.results(model, version, 1)
        if reference is None:
            return {}
        current = SketchSet.model_validate_json(row["sketch"]) if row else SketchSet()
        stats = {f["name"]: f for f in latest[0]["features"]} if latest else {}
        out: dict[str, Any] = {}
        for name, ref in reference.features.items():
            cur = current.features.get(name)
            if cur is not None and cur.kind != ref.kind:
                cur = None
            entry = _numeric_bins(ref, cur, bins) if ref.kind == "numeric" else _top_items(ref, cur)
            entry["stats"] = stats.get(name)
            entry["window_start"] = row["window"] if row else None
            out[name] = entry
        return out


def _numeric_bins(ref: Any, cur: Any, bins: int) -> dict[str, Any]:
    rk = ref.kll()
    ck = cur.kll() if cur is not None else None
    if rk.is_empty():
        return {"kind": "numeric", "edges": [], "reference": [], "current": []}
    lo, hi = float(rk.get_min_value()), float(rk.get_max_value())
    if ck is not None and not ck.is_empty():
        lo, hi = min(lo, float(ck.get_min_value())), max(hi, float(ck.get_max_value()))
    if hi <= lo:
        hi = lo + 1.0
    step = (hi - lo) / bins
    edges = [lo + i * step for i in range(bins + 1)]
    inner = edges[1:-1]
    ref_pmf = [float(x) for x in rk.get_pmf(inner)]
    cur_pmf = [float(x) for x in ck.get_pmf(inner)] if ck is not None and not ck.is_empty() else []
    return {
        "kind": "numeric",
        "edges": edges,
        "reference": ref_pmf,
        "current": cur_pmf,
        "n_ref": int(rk.n),
        "n_cur": int(ck.n) if ck is not None else 0,
    }


def _top_items(ref: Any, cur: Any, top: int = 12) -> dict[str, Any]:
    p = frequent_distribution(ref.frequent())
    q = frequent_distribution(cur.frequent()) if cur is not None else {}
    items = sorted(set(p) | set(q), key=lambda k: (-max(p.get(k, 0.0), q.get(k, 0.0)), k))[:top]
    return {
        "kind": "categorical",
        "items": items,
        "reference": [p.get(k, 0.0) for k in items],
        "current": [q.get(k, 0.0) for k in items],
    }
