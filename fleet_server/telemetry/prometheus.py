"""Prometheus exporter for fleet metrics, and field quality per model version.

The bridge feeds it every decoded message (``observe_state``, ``observe_metrics``,
``observe_status``) and every drop (``count_dropped``); ``render()`` returns the text
exposition for ``GET /metrics``. Each exporter owns a private ``CollectorRegistry`` whose
one custom collector reads plain dicts under a lock, so rendering is a snapshot and the
hot path (observe_*) is a few dict updates.

Exposed series (``model``/``version`` label the active model of the reporting device)::

    edgefleet_devices{profile,model,version,online}        gauge
    edgefleet_requests_total{model,version}                counter
    edgefleet_inference_errors_total{model,version}        counter
    edgefleet_fallbacks_total{model,version}               counter
    edgefleet_feedback_total{model,version}                counter
    edgefleet_error_rate{model,version}                    gauge  errors / requests
    edgefleet_accuracy{model,version}                      gauge  from device feedback
    edgefleet_latency_p95_ms{model,version}                gauge  from merged histograms
    edgefleet_command_status_total{state}                  counter
    edgefleet_messages_dropped_total{reason}               counter

QoS 1 duplicates of a metrics report (same device, seq and window) count once.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from protocol.messages import CommandStatus, DeviceState, MetricsReport

DEDUPE_KEYS = 50_000


@dataclass
class _Quality:
    requests: int = 0
    errors: int = 0
    fallbacks: int = 0
    feedback: int = 0
    correct: float = 0.0
    histogram: dict[float, int] = field(default_factory=dict)
    device_p95: dict[str, float] = field(default_factory=dict)
    devices: set[str] = field(default_factory=set)

    def p95(self) -> float | None:
        total = sum(self.histogram.values())
        if total:
            cum = 0
            for bound in sorted(self.histogram):
                cum += self.histogram[bound]
                if cum >= 0.95 * total:
                    if math.isfinite(bound):
                        return bound
                    break
        return max(self.device_p95.values()) if self.device_p95 else None


def _bound(key: str) -> float | None:
    try:
        return float(key.replace("+Inf", "inf"))
    except ValueError:
        return None


class FleetExporter:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry

        self._lock = threading.Lock()
        self._devices: dict[str, tuple[str, str, str, bool]] = {}
        self._quality: dict[tuple[str, str], _Quality] = {}
        self._status: dict[str, int] = {}
        self._dropped: dict[str, int] = {}
        self._seen: OrderedDict[tuple[Any, ...], None] = OrderedDict()
        # firing standing alerts (set by fleet_server.measures): [{rule, scope, subject, …}]
        self.alerts_source: Callable[[], list[dict[str, Any]]] | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))

    def _first_time(self, key: tuple[Any, ...]) -> bool:
        if key in self._seen:
            return False
        self._seen[key] = None
        if len(self._seen) > DEDUPE_KEYS:
            self._seen.popitem(last=False)
        return True

    # input -------------------------------------------------------------------------------
    def observe_state(self, state: DeviceState) -> None:
        model = state.model.name if state.model else ""
        version = state.model.version if state.model else ""
        with self._lock:
            self._devices[state.device_id] = (state.profile, model, version, state.online)

    def observe_metrics(self, report: MetricsReport) -> None:
        if report.model is None:
            return
        key = (report.device_id, report.seq, report.window_start.timestamp())
        with self._lock:
            if not self._first_time(("m", *key)):
                return
            q = self._quality.setdefault((report.model.name, report.model.version), _Quality())
            q.devices.add(report.device_id)
            q.requests += report.requests
            q.errors += report.errors
            q.fallbacks += report.fallbacks
            if report.accuracy is not None and report.feedback_count:
                q.feedback += report.feedback_count
                q.correct += report.accuracy * report.feedback_count
            for k, n in report.latency.histogram.items():
                b = _bound(k)
                if b is not None and n > 0:
                    q.histogram[b] = q.histogram.get(b, 0) + n
            if report.latency.p95_ms is not None:
                q.device_p95[report.device_id] = report.latency.p95_ms

    def observe_status(self, status: CommandStatus) -> None:
        key = ("s", status.device_id, status.command_id, status.seq, status.state)
        with self._lock:
            if self._first_time(key):
                self._status[status.state] = self._status.get(status.state, 0) + 1

    def count_dropped(self, reason: str) -> None:
        with self._lock:
            self._dropped[reason] = self._dropped.get(reason, 0) + 1

    # output ------------------------------------------------------------------------------
    def render(self) -> tuple[bytes, str]:
        """``(body, content type)`` of the Prometheus text exposition."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def field_quality(self) -> dict[str, dict[str, dict[str, Any]]]:
        """``{model: {version: {requests, errors, error_rate, accuracy, p95_ms, …}}}``."""
        out: dict[str, dict[str, dict[str, Any]]] = {}
        with self._lock:
            for (model, version), q in sorted(self._quality.items()):
                out.setdefault(model, {})[version] = {
                    "requests": q.requests,
                    "errors": q.errors,
                    "fallbacks": q.fallbacks,
                    "error_rate": q.errors / q.requests if q.requests else None,
                    "feedback": q.feedback,
                    "accuracy": q.correct / q.feedback if q.feedback else None,
                    "p95_ms": q.p95(),
                    "devices": len(q.devices),
                }
        return out

    def dropped(self) -> dict[str, int]:
        with self._lock:
            return dict(self._dropped)

    def snapshot(
        self,
    ) -> tuple[dict[str, tuple[str, str, str, bool]], dict[str, int], dict[str, int]]:
        with self._lock:
            return dict(self._devices), dict(self._status), dict(self._dropped)


class _Collector:
    def __init__(self, exporter: FleetExporter) -> None:
        self.exporter = exporter

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        devices, status, dropped = self.exporter.snapshot()
        quality = self.exporter.field_quality()
        mv = ["model", "version"]

        g = GaugeMetricFamily(
            "edgefleet_devices",
            "Devices by profile, active model and online state",
            labels=["profile", "model", "version", "online"],
        )
        counts: dict[tuple[str, str, str, str], int] = {}
        for profile, model, version, online in devices.values():
            k = (profile, model, version, "true" if online else "false")
            counts[k] = counts.get(k, 0) + 1
        for k, n in sorted(counts.items()):
            g.add_metric(list(k), n)
        yield g

        fams: dict[str, Any] = {
            "requests": CounterMetricFamily("edgefleet_requests", "Inference requests", labels=mv),
            "errors": CounterMetricFamily(
                "edgefleet_inference_errors", "Failed inferences", labels=mv
            ),
            "fallbacks": CounterMetricFamily("edgefleet_fallbacks", "Fallback answers", labels=mv),
            "feedback": CounterMetricFamily(
                "edgefleet_feedback", "Labelled feedback rows", labels=mv
            ),
            "error_rate": GaugeMetricFamily("edgefleet_error_rate", "Errors / requests", labels=mv),
            "accuracy": GaugeMetricFamily(
                "edgefleet_accuracy", "Accuracy from feedback", labels=mv
            ),
            "p95_ms": GaugeMetricFamily("edgefleet_latency_p95_ms", "Field p95 latency", labels=mv),
        }
        for model, versions in quality.items():
            for version, q in versions.items():
                for name, fam in fams.items():
                    if q[name] is not None:
                        fam.add_metric([model, version], q[name])
        yield from fams.values()

        c = CounterMetricFamily(
            "edgefleet_command_status", "Command status messages by state", labels=["state"]
        )
        for state, n in sorted(status.items()):
            c.add_metric([state], n)
        yield c
        d = CounterMetricFamily(
            "edgefleet_messages_dropped", "Dropped MQTT messages by reason", labels=["reason"]
        )
        for reason, n in sorted(dropped.items()):
            d.add_metric([reason], n)
        yield d
        source = self.exporter.alerts_source
        if source is not None:
            h = GaugeMetricFamily(
                "edgefleet_health_alert",
                "1 for every firing standing health alert",
                labels=["rule", "scope", "subject"],
            )
            for a in source():
                h.add_metric([a["rule"], a["scope"], a["subject"]], 1)
            yield h
