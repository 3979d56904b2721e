"""Serving metrics: per model version latency, requests, errors, fallbacks, field accuracy.

:class:`Metrics` is a :class:`PredictionObserver` whose ``on_prediction`` is a few counter
updates under a lock. Two views of the same numbers:

- :meth:`Metrics.report` closes the current period and returns one
  :class:`protocol.messages.MetricsReport` per model version seen in it (one with
  ``model=None`` when there was no traffic), with the latency histogram and p50/p95/p99 of
  the period, field accuracy (classification) or MAE (regression) from feedback, process
  CPU and RSS (psutil), free disk space of the data directory and the conditions reported
  by the other parts (``disk_full``, ``outbox_thinned``, …);
- :meth:`Metrics.prometheus_text` renders the cumulative counters for the local ``/metrics``.

Feedback decides accuracy vs MAE by the predicted value: a float that is not an integer
(or a list of values) is a regression output, anything else is a label.
"""

from __future__ import annotations

import random
import shutil
import threading
import time
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from protocol.messages import LatencySummary, MetricsReport, ModelRef

from .events import PredictionEvent

BUCKETS_MS = (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000)
MAX_SAMPLES = 20_000  # latency samples kept per period (reservoir beyond that)
DISK_LOW_MB = 50.0


@dataclass
class _Counters:
    requests: int = 0
    rows: int = 0
    errors: int = 0
    fallbacks: int = 0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS_MS) + 1))
    latency_sum_ms: float = 0.0
    samples: list[float] = field(default_factory=list)
    seen: int = 0
    feedback: int = 0
    correct: int = 0
    abs_err_sum: float = 0.0
    regression: int = 0

    def observe(self, latency_ms: float, rng: random.Random) -> None:
        self.buckets[_bucket(latency_ms)] += 1
        self.latency_sum_ms += latency_ms
        self.seen += 1
        if len(self.samples) < MAX_SAMPLES:
            self.samples.append(latency_ms)
        else:
            j = rng.randrange(self.seen)
            if j < MAX_SAMPLES:
                self.samples[j] = latency_ms


def _bucket(ms: float) -> int:
    return bisect_left(BUCKETS_MS, ms)  # first bucket whose upper bound is >= ms


def _is_regression(predicted: Any) -> bool:
    if isinstance(predicted, (list, tuple, np.ndarray)):
        return True
    if isinstance(predicted, (float, np.floating)):
        return not float(predicted).is_integer()
    return False


def _as_number(v: Any) -> float:
    if isinstance(v, (list, tuple, np.ndarray)):
        return float(np.asarray(v, dtype=np.float64).reshape(-1)[0])
    return float(v)


def _key(model: ModelRef) -> tuple[str, str]:
    return (model.name, model.version)


class Metrics:
    """Counters per model version, a period view for MQTT and a cumulative one for Prometheus."""

    def __init__(
        self,
        device_id: str,
        *,
        next_seq: Callable[[], int],
        data_dir: Path | None = None,
        clock: Callable[[], float] = time.time,
        conditions: list[Callable[[], list[str]]] | None = None,
        shadow: Callable[[], dict[str, Any] | None] | None = None,
        gauges: Callable[[], dict[str, float]] | None = None,
    ) -> None:
        self.device_id = device_id
        self.next_seq = next_seq
        self.data_dir = data_dir
        self.clock = clock
        self.condition_sources = list(conditions or [])
        self.shadow_source = shadow
        self.gauges = gauges
        self._lock = threading.Lock()
        self._rng = random.Random(0)
        self._period: dict[tuple[str, str], _Counters] = {}
        self._total: dict[tuple[str, str], _Counters] = {}
        self._models: dict[tuple[str, str], ModelRef] = {}
        self._period_start = clock()
        self._proc: Any = None
        self._latched: set[str] = set()  # conditions seen since the last report

    # PredictionObserver ------------------------------------------------------------------
    def on_prediction(self, event: PredictionEvent) -> None:
        if event.shadow:
            return
        try:
            n = int(event.rows.shape[0]) if event.rows is not None and event.rows.ndim == 2 else 1
            k = _key(event.model)
            with self._lock:  # only the period's counters: totals are folded in at report time
                c = self._period.get(k)
                if c is None:
                    c = self._period[k] = _Counters()
                    self._models[k] = event.model
                c.requests += 1
                c.rows += n
                if event.error is None or event.fallback:  # a failed call has no latency
                    c.fallbacks += event.fallback
                    c.observe(event.latency_ms, self._rng)
                else:
                    c.errors += 1
        except Exception:  # an observer never raises
            pass

    def on_feedback(self, request_id: str, model: ModelRef, truth: Any, predicted: Any) -> None:
        try:
            reg = _is_regression(predicted) or _is_regression(truth)
            err = abs(_as_number(truth) - _as_number(predicted)) if reg else 0.0
            ok = (not reg) and str(truth) == str(predicted)
        except (TypeError, ValueError):
            return
        k = _key(model)
        with self._lock:
            self._models[k] = model
            c = self._period.setdefault(k, _Counters())
            c.feedback += 1
            if reg:
                c.regression += 1
                c.abs_err_sum += err
            else:
                c.correct += ok

    # period reports ----------------------------------------------------------------------
    def report(self, now: float | None = None) -> list[MetricsReport]:
        """Close the current period; one report per model version seen (or one without a model)."""
        now = self.clock() if now is None else now
        with self._lock:
            period, self._period = self._period, {}
            start, self._period_start = self._period_start, now
            models = dict(self._models)
            for k, c in period.items():
                _fold(self._total.setdefault(k, _Counters()), c)
        system = self.system()
        conditions = sorted(set(self.conditions(system)) | self._take_latched())
        shadow = self.shadow_source() if self.shadow_source else None
        common: dict[str, Any] = {
            "device_id": self.device_id,
            "window_start": datetime.fromtimestamp(start, tz=timezone.utc),
            "window_end": datetime.fromtimestamp(max(now, start), tz=timezone.utc),
            "conditions": conditions,
            **system,
        }
        if not period:
            return [MetricsReport(seq=self.next_seq(), shadow=shadow, **common)]
        out = []
        for i, (k, c) in enumerate(sorted(period.items())):
            out.append(
                MetricsReport(
                    seq=self.next_seq(),
                    model=models[k],
                    requests=c.requests,
                    errors=c.errors,
                    fallbacks=c.fallbacks,
                    latency=latency_summary(c),
                    feedback_count=c.feedback,
                    accuracy=_accuracy(c),
                    mae=_mae(c),
                    shadow=shadow if i == 0 else None,
                    **common,
                )
            )
        return out

    def system(self) -> dict[str, float | None]:
        cpu = rss = disk = None
        try:
            import psutil

            if self._proc is None:
                self._proc = psutil.Process()
                self._proc.cpu_percent(None)
            cpu = float(self._proc.cpu_percent(None))
            rss = self._proc.memory_info().rss / 2**20
        except Exception:  # psutil missing or the platform refuses: report None
            pass
        if self.data_dir is not None:
            try:
                disk = shutil.disk_usage(self.data_dir).free / 2**20
            except OSError:
                pass
        return {"cpu_percent": cpu, "rss_mb": rss, "disk_free_mb": disk}

    def observe_conditions(self) -> None:
        """Poll the condition sources now; the next report includes what was seen (a full
        disk that clears a second later is still reported)."""
        found = self.conditions()
        with self._lock:
            self._latched.update(found)

    def _take_latched(self) -> set[str]:
        with self._lock:
            out, self._latched = self._latched, set()
        return out

    def conditions(self, system: dict[str, float | None] | None = None) -> list[str]:
        found: set[str] = set()
        for src in self.condition_sources:
            try:
                found.update(src())
            except Exception:
                found.add("condition_source_failed")
        free = (system or {}).get("disk_free_mb")
        if free is not None and free < DISK_LOW_MB:
            found.add("disk_low")
        return sorted(found)

    # Prometheus --------------------------------------------------------------------------
    def prometheus_text(self) -> str:
        """Cumulative counters in the Prometheus text exposition format (0.0.4)."""
        with self._lock:
            merged: dict[tuple[str, str], _Counters] = {}
            for part in (self._total, self._period):
                for k, c in part.items():
                    _fold(merged.setdefault(k, _Counters()), c)
            totals = {k: (self._models[k], c) for k, c in merged.items()}
        lines: list[str] = []

        def head(name: str, kind: str, help_: str) -> None:
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} {kind}")

        def lab(m: ModelRef, extra: str = "") -> str:
            base = f'model="{_esc(m.name)}",version="{_esc(m.version)}"'
            return "{" + base + (f",{extra}" if extra else "") + "}"

        for name, attr, help_ in (
            ("edgefleet_requests_total", "requests", "Predict calls answered or failed."),
            ("edgefleet_rows_total", "rows", "Rows predicted."),
            ("edgefleet_errors_total", "errors", "Predict calls that failed without a fallback."),
            ("edgefleet_fallbacks_total", "fallbacks", "Predict calls answered by the fallback."),
            ("edgefleet_feedback_total", "feedback", "Feedback records received."),
        ):
            head(name, "counter", help_)
            for m, c in totals.values():
                lines.append(f"{name}{lab(m)} {getattr(c, attr)}")
        head("edgefleet_request_latency_ms", "histogram", "Predict latency in milliseconds.")
        for m, c in totals.values():
            cum = 0
            for ub, n in zip([*map(str, BUCKETS_MS), "+Inf"], c.buckets, strict=True):
                cum += n
                le = 'le="' + ub + '"'
                lines.append(f"edgefleet_request_latency_ms_bucket{lab(m, le)} {cum}")
            lines.append(f"edgefleet_request_latency_ms_sum{lab(m)} {c.latency_sum_ms:.6f}")
            lines.append(f"edgefleet_request_latency_ms_count{lab(m)} {c.seen}")
        head("edgefleet_field_accuracy", "gauge", "Share of correct labels among feedback.")
        for m, c in totals.values():
            acc = _accuracy(c)
            if acc is not None:
                lines.append(f"edgefleet_field_accuracy{lab(m)} {acc:.6f}")
        head("edgefleet_field_mae", "gauge", "Mean absolute error among regression feedback.")
        for m, c in totals.values():
            mae = _mae(c)
            if mae is not None:
                lines.append(f"edgefleet_field_mae{lab(m)} {mae:.6f}")
        system = self.system()
        for key, help_ in (
            ("cpu_percent", "Process CPU percent since the last sample."),
            ("rss_mb", "Process resident memory in MiB."),
            ("disk_free_mb", "Free space on the data disk in MiB."),
        ):
            v = system.get(key)
            if v is not None:
                head(f"edgefleet_{key}", "gauge", help_)
                lines.append(f"edgefleet_{key} {v:.3f}")
        if self.gauges is not None:
            for gname, value in sorted(self.gauges().items()):
                head(f"edgefleet_{gname}", "gauge", gname.replace("_", " ") + ".")
                lines.append(f"edgefleet_{gname} {value}")
        head("edgefleet_condition", "gauge", "1 while a condition (disk_full, …) holds.")
        for cond in self.conditions(system):
            lines.append(f'edgefleet_condition{{condition="{_esc(cond)}"}} 1')
        return "\n".join(lines) + "\n"


def latency_summary(c: _Counters) -> LatencySummary:
    if not c.seen:
        return LatencySummary()
    arr = np.asarray(c.samples, dtype=np.float64)
    p50, p95, p99 = (float(x) for x in np.percentile(arr, [50, 95, 99]))
    hist = {}
    for ub, n in zip([*map(str, BUCKETS_MS), "inf"], c.buckets, strict=True):
        if n:
            hist[ub] = n
    return LatencySummary(count=c.seen, p50_ms=p50, p95_ms=p95, p99_ms=p99, histogram=hist)


def _accuracy(c: _Counters) -> float | None:
    labelled = c.feedback - c.regression
    return c.correct / labelled if labelled else None


def _mae(c: _Counters) -> float | None:
    return c.abs_err_sum / c.regression if c.regression else None


def _fold(dst: _Counters, src: _Counters) -> None:
    """Add ``src``'s counts to ``dst`` (latency samples are per period and not folded)."""
    dst.requests += src.requests
    dst.rows += src.rows
    dst.errors += src.errors
    dst.fallbacks += src.fallbacks
    dst.buckets = [a + b for a, b in zip(dst.buckets, src.buckets, strict=True)]
    dst.latency_sum_ms += src.latency_sum_ms
    dst.seen += src.seen
    dst.feedback += src.feedback
    dst.correct += src.correct
    dst.abs_err_sum += src.abs_err_sum
    dst.regression += src.regression


def _esc(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
