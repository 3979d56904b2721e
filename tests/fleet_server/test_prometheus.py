"""The Prometheus exporter: device counts, field quality per version, drops; duplicates once."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fleet_server.telemetry.prometheus import FleetExporter
from protocol.messages import CommandStatus, DeviceState, LatencySummary, MetricsReport, ModelRef

V1 = ModelRef(name="iris", version="1.0.0", release=1)
V2 = ModelRef(name="iris", version="1.1.0", release=2)
START = datetime(2026, 1, 1, tzinfo=timezone.utc)


def metrics(device: str, seq: int, model: ModelRef = V1, **kw) -> MetricsReport:
    return MetricsReport(
        device_id=device, seq=seq, window_start=START, window_end=START, model=model, **kw
    )


def samples(exp: FleetExporter) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body, ctype = exp.render()
    assert ctype.startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(body.decode())
        for s in fam.samples
    }


def test_devices_are_counted_by_profile_version_and_online_state():
    exp = FleetExporter()
    exp.observe_state(DeviceState(device_id="a", online=True, profile="pi4", model=V1))
    exp.observe_state(DeviceState(device_id="b", online=True, profile="pi4", model=V1))
    exp.observe_state(DeviceState(device_id="c", online=True, profile="jetson", model=V2))
    exp.observe_state(DeviceState(device_id="c", online=False, profile="jetson", model=V2))  # LWT
    s = samples(exp)
    lab = (("model", "iris"), ("online", "true"), ("profile", "pi4"), ("version", "1.0.0"))
    assert s[("edgefleet_devices", lab)] == 2
    off = (("model", "iris"), ("online", "false"), ("profile", "jetson"), ("version", "1.1.0"))
    assert s[("edgefleet_devices", off)] == 1
    assert not any(
        k[0] == "edgefleet_devices" and ("online", "true") in k[1] and ("profile", "jetson") in k[1]
        for k in s
    )


def test_field_quality_weights_accuracy_by_feedback_and_counts_duplicates_once():
    exp = FleetExporter()
    hist = {"1": 50, "2": 40, "5": 8, "10": 2}
    exp.observe_metrics(
        metrics(
            "a",
            1,
            requests=100,
            errors=2,
            feedback_count=10,
            accuracy=0.9,
            latency=LatencySummary(count=100, p95_ms=2.0, histogram=hist),
        )
    )
    exp.observe_metrics(
        metrics("a", 1, requests=100, errors=2, feedback_count=10, accuracy=0.9)
    )  # QoS 1 dup
    exp.observe_metrics(
        metrics(
            "b",
            1,
            requests=300,
            errors=0,
            feedback_count=30,
            accuracy=0.5,
            latency=LatencySummary(count=300, p95_ms=9.0, histogram={"1": 300}),
        )
    )
    exp.observe_metrics(metrics("c", 1, model=V2, requests=10, errors=5))
    q = exp.field_quality()
    v1 = q["iris"]["1.0.0"]
    assert v1["requests"] == 400 and v1["errors"] == 2 and v1["devices"] == 2
    assert v1["accuracy"] == pytest.approx((0.9 * 10 + 0.5 * 30) / 40)
    assert v1["error_rate"] == pytest.approx(2 / 400)
    assert v1["p95_ms"] == 2.0  # 350 of 400 requests ≤ 1 ms (87.5 %), 390 ≤ 2 ms (97.5 %)
    assert q["iris"]["1.1.0"]["error_rate"] == 0.5 and q["iris"]["1.1.0"]["accuracy"] is None
    s = samples(exp)
    assert s[("edgefleet_requests_total", (("model", "iris"), ("version", "1.0.0")))] == 400
    assert s[("edgefleet_error_rate", (("model", "iris"), ("version", "1.1.0")))] == 0.5
    assert ("edgefleet_accuracy", (("model", "iris"), ("version", "1.1.0"))) not in s


def test_p95_falls_back_to_the_worst_device_p95_without_histograms():
    exp = FleetExporter()
    exp.observe_metrics(metrics("a", 1, requests=10, latency=LatencySummary(count=10, p95_ms=3.5)))
    exp.observe_metrics(metrics("b", 1, requests=10, latency=LatencySummary(count=10, p95_ms=7.25)))
    assert exp.field_quality()["iris"]["1.0.0"]["p95_ms"] == 7.25


def test_status_and_drops_are_counted_by_state_and_reason():
    exp = FleetExporter()
    st = CommandStatus(device_id="a", command_id="c1", state="installed", seq=3)
    exp.observe_status(st)
    exp.observe_status(st)  # duplicate delivery
    exp.observe_status(CommandStatus(device_id="b", command_id="c1", state="failed", seq=3))
    exp.count_dropped("device_mismatch")
    exp.count_dropped("device_mismatch")
    exp.count_dropped("oversize")
    s = samples(exp)
    assert s[("edgefleet_command_status_total", (("state", "installed"),))] == 1
    assert s[("edgefleet_command_status_total", (("state", "failed"),))] == 1
    assert s[("edgefleet_messages_dropped_total", (("reason", "device_mismatch"),))] == 2
    assert exp.dropped() == {"device_mismatch": 2, "oversize": 1}


def test_each_exporter_has_its_own_registry():
    a, b = FleetExporter(), FleetExporter()
    a.count_dropped("oversize")
    assert ("edgefleet_messages_dropped_total", (("reason", "oversize"),)) not in samples(b)
