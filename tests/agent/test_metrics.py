"""Serving metrics: per version latency percentiles, counts, field accuracy, Prometheus text."""

from __future__ import annotations

import numpy as np

from agent.events import PredictionEvent
from agent.metrics import Metrics
from protocol.feeds import Prediction
from protocol.messages import ModelRef

V1 = ModelRef(name="iris", version="1.0.0", release=1)
V2 = ModelRef(name="iris", version="2.0.0", release=2)


def ev(latency: float, model=V1, *, error=None, fallback=False, shadow=False) -> PredictionEvent:
    return PredictionEvent(
        0.0, "r", model, np.zeros((1, 4)), Prediction(labels=[0]), latency, error, fallback, shadow
    )


def metrics(tmp_path=None, **kw) -> Metrics:
    counter = iter(range(10**6))
    return Metrics(
        "dev-1", next_seq=lambda: next(counter), data_dir=tmp_path, clock=lambda: 100.0, **kw
    )


def test_report_has_latency_percentiles_and_counts_per_model_version():
    m = metrics()
    for ms in range(1, 101):
        m.on_prediction(ev(float(ms)))
    m.on_prediction(ev(3.0, V2, error="boom", fallback=True))
    m.on_prediction(ev(0.0, V2, error="boom"))
    m.on_prediction(ev(1.0, shadow=True))  # the candidate's latency is not the active model's
    reports = {r.model.version: r for r in m.report(now=160.0)}
    r1, r2 = reports["1.0.0"], reports["2.0.0"]
    assert r1.requests == 100 and r1.errors == 0
    assert r1.latency.count == 100
    assert abs(r1.latency.p50_ms - 50.5) < 1e-9 and abs(r1.latency.p99_ms - 99.01) < 1e-9
    assert sum(r1.latency.histogram.values()) == 100
    assert (r2.requests, r2.errors, r2.fallbacks) == (2, 1, 1)
    assert r1.window_start.timestamp() == 100.0 and r1.window_end.timestamp() == 160.0
    assert [r.seq for r in reports.values()] == [0, 1]


def test_a_new_period_starts_empty_and_a_quiet_period_still_reports_system_numbers(tmp_path):
    m = metrics(tmp_path)
    m.on_prediction(ev(1.0))
    m.report()
    (quiet,) = m.report()
    assert quiet.model is None and quiet.requests == 0
    assert quiet.rss_mb and quiet.rss_mb > 0 and quiet.disk_free_mb and quiet.disk_free_mb > 0


def test_feedback_gives_accuracy_for_labels_and_mae_for_values():
    m = metrics()
    m.on_feedback("a", V1, 1, 1)
    m.on_feedback("b", V1, 2, 1)
    m.on_feedback("c", V1, "setosa", "setosa")
    m.on_feedback("d", V2, 3.0, 2.5)
    m.on_feedback("e", V2, 1.0, [1.25])
    reports = {r.model.version: r for r in m.report()}
    assert reports["1.0.0"].accuracy == 2 / 3 and reports["1.0.0"].mae is None
    assert reports["2.0.0"].mae == 0.375 and reports["2.0.0"].feedback_count == 2


def test_conditions_from_other_parts_are_reported():
    m = metrics(conditions=[lambda: ["disk_full"], lambda: ["outbox_thinned", "disk_full"]])
    (r,) = m.report()
    assert r.conditions == ["disk_full", "outbox_thinned"]


def test_prometheus_text_is_cumulative_with_a_histogram_per_version():
    m = metrics(gauges=lambda: {"outbox_pending": 3})
    for ms in (0.4, 3.0, 3.0, 7000.0):
        m.on_prediction(ev(ms))
    m.report()  # closing a period does not reset the cumulative counters
    text = m.prometheus_text()
    assert 'edgefleet_requests_total{model="iris",version="1.0.0"} 4' in text
    assert 'edgefleet_request_latency_ms_bucket{model="iris",version="1.0.0",le="0.5"} 1' in text
    assert 'edgefleet_request_latency_ms_bucket{model="iris",version="1.0.0",le="5"} 3' in text
    assert 'edgefleet_request_latency_ms_bucket{model="iris",version="1.0.0",le="+Inf"} 4' in text
    assert "edgefleet_outbox_pending 3" in text
    assert text.endswith("\n") and "# TYPE edgefleet_request_latency_ms histogram" in text
    m.on_prediction(ev(1.0))  # the open period counts too
    assert 'edgefleet_requests_total{model="iris",version="1.0.0"} 5' in m.prometheus_text()


def test_a_condition_that_clears_before_the_report_is_still_reported():
    state = {"now": ["disk_full"]}
    m = metrics(conditions=[lambda: state["now"]])
    m.observe_conditions()
    state["now"] = []
    (first,) = m.report()
    (second,) = m.report()
    assert first.conditions == ["disk_full"] and second.conditions == []
