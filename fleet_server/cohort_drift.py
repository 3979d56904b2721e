"""Drift per device and per cohort (tag, profile), from the sketches devices already upload.

The fleet-wide engine (:mod:`.drift`) merges every device's sketches of a model version into
one window; a shift on one device of two then reads as drift of the whole fleet. This
module keeps the same windows **per device** (one merged :class:`~.drift_window.OpenWindow`
per device, model, version and window; no new data on the wire) and tests, against the
bundle's reference sketch, with the thresholds of :class:`~.drift.DriftConfig`:

- every device on its own (``scope="device"``);
- every cohort: the merge of its devices' windows, per profile and per tag;
- any set of devices a caller names (a rollout's own devices: :meth:`CohortDrift.group`).

A scope is tested only with at least ``min_rows`` rows; fewer are reported as
``evaluated: false``. :meth:`CohortDrift.scope_summary` says which devices and cohorts
drifted and which did not; the fleet-wide drift alert leads with it, and when the fleet-wide
merge does not drift but some scope does, :meth:`CohortDrift.evaluate` returns that local
drift so the caller can alert on it (once per window, whichever process evaluates it).

The windows and results live in the registry (:class:`~.measure_store.CohortStore`:
the SQLite file, or PostgreSQL shared by several server processes).
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from protocol.errors import ProtocolError
from protocol.messages import SketchReport
from protocol.sketches import SketchSet

from .drift import DriftConfig, FeatureDrift, compare
from .drift_window import OpenWindow, decode_set
from .measure_store import CohortStore, WindowKey

log = logging.getLogger(__name__)

MAX_QUEUED = 20_000  # reports waiting for the tick to merge them
KEEP_WINDOWS = 48  # per-device windows kept behind the newest (for restarts and history)

DeviceInfo = Callable[[], dict[str, tuple[str, list[str]]]]  # id → (profile, tags)


@dataclass
class ScopeResult:
    """The test of one scope (a device, a cohort or a named group) in one window."""

    model: str
    version: str
    scope: str  # device | profile | tag | group
    subject: str  # device id, profile name, tag, group name
    window_start: float
    rows: int
    devices: list[str]
    evaluated: bool
    dataset_drift: bool = False
    drifted_share: float = 0.0
    drifted_features: list[str] = field(default_factory=list)
    tested_features: int = 0
    features: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self, features: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not features:
            d.pop("features")
        return d


def check_scope(
    reference: SketchSet,
    current: SketchSet,
    cfg: DriftConfig,
    *,
    model: str,
    version: str,
    scope: str,
    subject: str,
    window: float,
    devices: list[str],
) -> ScopeResult:
    """Test one merged window against the reference (Evidently's share rule)."""
    res = ScopeResult(model, version, scope, subject, window, current.rows, sorted(devices), False)
    if current.rows < max(1, cfg.min_rows):
        return res
    feats: list[FeatureDrift] = compare(reference, current, cfg)
    counted = [f for f in feats if f.role == "feature"]
    share = sum(f.drift for f in counted) / len(counted) if counted else 0.0
    res.evaluated = True
    res.drifted_share = share
    res.dataset_drift = bool(counted) and share >= cfg.dataset_share
    res.drifted_features = [f.name for f in counted if f.drift]
    res.tested_features = len(counted)
    res.features = [asdict(f) for f in feats]
    return res


def merge_windows(windows: Iterable[OpenWindow]) -> SketchSet:
    """Merge device windows into one sketch set (the inputs are left untouched)."""
    acc: OpenWindow | None = None
    for w in windows:
        incoming = decode_set(w.sketch_set())
        if acc is None:
            acc = OpenWindow(w.model, w.version, w.window)
        acc.check(incoming)
        acc.add("-", w.rows, incoming, {})
    return acc.sketch_set() if acc is not None else SketchSet()


@dataclass(frozen=True)
class _Delta:
    """Reports of one device window merged here since the last flush (encoded)."""

    rows: int
    reports: int
    sketches: SketchSet


def _merge_delta(
    key: WindowKey, row: dict[str, Any] | None, delta: _Delta
) -> dict[str, Any] | None:
    """The stored window ``row`` (None: none yet) with ``delta`` merged in; None to keep
    the row as it is (a feature whose kind differs from the stored one's)."""
    device, model, version, window = key
    w = _window_of_row(row) if row is not None else OpenWindow(model, version, window)
    revision = w.revision
    incoming = decode_set(delta.sketches)
    try:
        w.check(incoming)
    except ProtocolError as exc:  # the fleet engine checked it; belt and braces
        log.warning("per-device sketches of %s dropped: %s", device, exc)
        return None
    w.add(device, delta.rows, incoming, {})
    return {
        "device": device,
        "model": model,
        "version": version,
        "window": window,
        "rows": w.rows,
        "revision": revision + delta.reports,
        "sketch": w.sketch_set().model_dump_json(),
    }


def _window_of_row(row: dict[str, Any]) -> OpenWindow:
    w = OpenWindow(row["model"], row["version"], float(row["window"]))
    w.features = decode_set(SketchSet.model_validate_json(row["sketch"]))
    w.rows, w.revision = int(row["rows"]), int(row["revision"])
    w.devices = {row["device"]}
    return w


class CohortDrift:
    """Per-device windows and the per-device / per-cohort tests. Thread-safe.

    Reports are merged in memory into a delta per device window; :meth:`flush` merges the
    deltas into the stored windows (:meth:`~.measure_store.CohortStore.merge_windows`), so
    several server processes that each got part of a device's reports add up, and every
    read starts from what all of them stored.
    """

    def __init__(
        self,
        store: CohortStore,
        config: DriftConfig,
        reference: Callable[[str, str], SketchSet | None],
        devices: DeviceInfo,
    ) -> None:
        self.store = store
        self.config = config
        self.reference = reference
        self.devices = devices
        self._lock = threading.RLock()
        self._open: dict[tuple[str, str, str, float], OpenWindow] = {}
        self._cache: dict[tuple[str, str, float], tuple[int, list[ScopeResult]]] = {}
        self._alerted: set[tuple[str, str, float]] = set()
        self._queue: deque[SketchReport] = deque(maxlen=MAX_QUEUED)
        self.dropped = 0

    def window_of(self, model: str, ts: float) -> float:
        w = self.config.for_model(model).window_seconds
        return math.floor(ts / w) * w

    # input ------------------------------------------------------------------------------
    def ingest(self, report: SketchReport) -> None:
        """Queue a report the fleet-wide engine accepted (it dropped duplicates already).

        The bridge thread only appends; the merge happens in :meth:`drain` (the service's
        tick, or any read), so per-device windows do not slow telemetry ingest down. A full
        queue drops its oldest report and counts it in ``dropped``.
        """
        if len(self._queue) == self._queue.maxlen:
            self.dropped += 1
        self._queue.append(report)

    def drain(self) -> int:
        """Merge the queued reports into their device windows' deltas (in memory)."""
        n = 0
        with self._lock:
            while self._queue:
                report = self._queue.popleft()
                try:
                    self._merge(report)
                except ProtocolError as exc:  # the fleet engine checked it; belt and braces
                    log.warning("per-device sketch of %s dropped: %s", report.device_id, exc)
                n += 1
        return n

    def _merge(self, report: SketchReport) -> None:
        incoming = decode_set(report.sketches)
        model, version = report.model.name, report.model.version
        window = self.window_of(model, report.window_start.timestamp())
        key = (report.device_id, model, version, window)
        w = self._open.get(key) or OpenWindow(model, version, window)
        w.check(incoming)
        w.add(report.device_id, report.sketches.rows, incoming, {})
        self._open[key] = w

    def flush(self) -> None:
        """Drain the queue and merge the deltas into the stored device windows."""
        self.drain()
        with self._lock:
            if not self._open:
                return
            deltas = {
                key: _Delta(w.rows, w.revision, w.sketch_set()) for key, w in self._open.items()
            }
            self.store.merge_windows(deltas, _merge_delta)
            self._open.clear()

    # windows ----------------------------------------------------------------------------
    def _windows(self, model: str, version: str, window: float) -> dict[str, OpenWindow]:
        """Every device's window of (model, version) that starts at ``window``."""
        self.flush()
        return {
            row["device"]: _window_of_row(row) for row in self.store.windows(model, version, window)
        }

    def latest_window(self, model: str, version: str, now: float) -> float | None:
        self.flush()
        return self.store.latest_window(model, version, now)

    # evaluation -------------------------------------------------------------------------
    def evaluate(
        self, model: str, version: str, *, now: float, window: float | None = None
    ) -> list[ScopeResult]:
        """Test every device and cohort of the latest window (or ``window``); cached."""
        with self._lock:
            if window is None:
                window = self.latest_window(model, version, now)
            if window is None:
                return []
            reference = self.reference(model, version)
            if reference is None:
                return []
            windows = self._windows(model, version, window)
            revision = sum(w.revision for w in windows.values())
            cached = self._cache.get((model, version, window))
            if cached is not None and cached[0] == revision:
                return cached[1]
            cfg = self.config.for_model(model)
            info = self.devices()
            out: list[ScopeResult] = []
            for dev, w in sorted(windows.items()):
                out.append(
                    check_scope(
                        reference,
                        w.sketch_set(),
                        cfg,
                        model=model,
                        version=version,
                        scope="device",
                        subject=dev,
                        window=window,
                        devices=[dev],
                    )
                )
            cohorts: dict[tuple[str, str], list[str]] = {}
            for dev in windows:
                profile, tags = info.get(dev, ("", []))
                if profile:
                    cohorts.setdefault(("profile", profile), []).append(dev)
                for t in tags:
                    cohorts.setdefault(("tag", t), []).append(dev)
            for (scope, name), members in sorted(cohorts.items()):
                merged = merge_windows(windows[d] for d in sorted(members))
                out.append(
                    check_scope(
                        reference,
                        merged,
                        cfg,
                        model=model,
                        version=version,
                        scope=scope,
                        subject=name,
                        window=window,
                        devices=members,
                    )
                )
            self._cache = {
                k: v for k, v in self._cache.items() if k[:2] != (model, version)
            }  # the newest window of each version only
            self._cache[(model, version, window)] = (revision, out)
            self._store(out, now)
            oldest = window - KEEP_WINDOWS * cfg.window_seconds
            self.store.prune_windows(model, version, oldest)
            return out

    def _store(self, results: list[ScopeResult], now: float) -> None:
        rows = [
            {
                "model": r.model,
                "version": r.version,
                "scope": r.scope,
                "subject": r.subject,
                "window": r.window_start,
                "evaluated_at": now,
                "result": json.dumps(r.to_dict(features=True)),
            }
            for r in results
        ]
        if rows:
            self.store.save_results(rows)

    def group(
        self, model: str, version: str, devices: Iterable[str], *, now: float, name: str = "group"
    ) -> ScopeResult | None:
        """Test the merge of the named devices' latest windows (a rollout's own devices)."""
        wanted = set(devices)
        with self._lock:
            window = self.latest_window(model, version, now)
            reference = self.reference(model, version)
            if window is None or reference is None or not wanted:
                return None
            windows = self._windows(model, version, window)
            members = sorted(wanted & set(windows))
            if not members:
                return None
            merged = merge_windows(windows[d] for d in members)
            return check_scope(
                reference,
                merged,
                self.config.for_model(model),
                model=model,
                version=version,
                scope="group",
                subject=name,
                window=window,
                devices=members,
            )

    # queries ----------------------------------------------------------------------------
    def stored(
        self,
        model: str | None = None,
        version: str | None = None,
        scope: str | None = None,
        subject: str | None = None,
        features: bool = False,
    ) -> list[dict[str, Any]]:
        """The latest stored result of every scope; drifted first, then by scope and name."""
        rows = self.store.results(
            {"model": model, "version": version, "scope": scope, "subject": subject}
        )
        out = []
        for row in rows:
            r = json.loads(row["result"])
            r["evaluated_at"] = row["evaluated_at"]
            if not features:
                r.pop("features", None)
            out.append(r)
        order = {"device": 0, "profile": 1, "tag": 2, "group": 3}
        out.sort(
            key=lambda r: (
                not r["dataset_drift"],
                r["model"],
                r["version"],
                order.get(r["scope"], 9),
                r["subject"],
            )
        )
        return out

    def scope_summary(self, model: str, version: str, window: float) -> dict[str, Any] | None:
        """Which devices and cohorts drifted in ``window`` and which did not."""
        results = self.evaluate(model, version, now=window, window=window)
        if not results:
            return None
        return summarize(results)

    def local_alert(self, model: str, version: str, now: float) -> dict[str, Any] | None:
        """A summary to alert on when some scope drifts in the latest window, once per window."""
        results = self.evaluate(model, version, now=now)
        if not results or not any(r.dataset_drift for r in results):
            return None
        if not self._claim(model, version, results[0].window_start):
            return None
        return summarize(results)

    def mark_alerted(self, model: str, version: str, window: float) -> None:
        """The fleet-wide alert of this window named the scopes: no local alert follows."""
        self._claim(model, version, window)

    def _claim(self, model: str, version: str, window: float) -> bool:
        """True for the first alert of a window in the whole registry (any process)."""
        key = (model, version, window)
        with self._lock:
            if key in self._alerted:
                return False
            first = self.store.claim_alert(model, version, window)
            self._alerted.add(key)
            return first


def summarize(results: list[ScopeResult]) -> dict[str, Any]:
    devices = [r for r in results if r.scope == "device" and r.evaluated]
    cohorts = [r for r in results if r.scope in ("profile", "tag") and r.evaluated]
    drifted = [r for r in devices if r.dataset_drift]
    steady = [r for r in devices if not r.dataset_drift]
    d_cohorts = [r for r in cohorts if r.dataset_drift]
    s_cohorts = [r for r in cohorts if not r.dataset_drift]
    return {
        "window_start": results[0].window_start,
        "devices_tested": len(devices),
        "drifted_devices": {r.subject: r.drifted_features for r in drifted},
        "steady_devices": [r.subject for r in steady],
        "untested_devices": [r.subject for r in results if r.scope == "device" and not r.evaluated],
        "drifted_cohorts": [f"{r.scope}:{r.subject}" for r in d_cohorts],
        "steady_cohorts": [f"{r.scope}:{r.subject}" for r in s_cohorts],
        "features_tested": max((r.tested_features for r in devices), default=0),
    }


def describe(model: str, version: str, s: dict[str, Any]) -> str:
    """One line naming the scope: which devices and cohorts drifted and which did not."""
    drifted = s["drifted_devices"]
    n = s["devices_tested"]
    parts = []
    if drifted:
        names = ", ".join(
            f"{d} ({len(f)}/{s['features_tested']} features)" for d, f in drifted.items()
        )
        parts.append(f"drift on {model} {version} on {len(drifted)} of {n} devices: {names}")
    else:
        parts.append(
            f"drift on {model} {version} in the fleet-wide merge; no single device of {n} drifted"
        )
    if s["steady_devices"]:
        parts.append(f"not drifted: {', '.join(s['steady_devices'][:10])}")
    if s["drifted_cohorts"]:
        parts.append(f"cohorts drifted: {', '.join(s['drifted_cohorts'][:10])}")
    if s["steady_cohorts"]:
        parts.append(f"cohorts not drifted: {', '.join(s['steady_cohorts'][:10])}")
    return "; ".join(parts)
