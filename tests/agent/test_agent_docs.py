"""docs/agent.md must not drift: reason codes, config fields and metric names it documents."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from agent.config import AgentConfig
from agent.events import PredictionEvent
from agent.metrics import Metrics
from protocol.errors import ReasonCode
from protocol.feeds import Prediction
from protocol.messages import ModelRef

DOC = (Path(__file__).resolve().parents[2] / "docs" / "agent.md").read_text(encoding="utf-8")


def test_every_reason_code_is_documented():
    missing = [c.value for c in ReasonCode if f"`{c.value}`" not in DOC]
    assert missing == []


def test_every_config_section_and_top_level_field_is_documented():
    for name, field in AgentConfig.model_fields.items():
        sub = getattr(field.annotation, "model_fields", None)
        if sub is None:
            assert f"`{name}`" in DOC, name
        else:
            assert f"`{name}." in DOC, name


def test_every_prometheus_metric_name_is_documented():
    m = Metrics(
        "dev",
        next_seq=lambda: 0,
        gauges=lambda: {
            "outbox_messages": 1,
            "outbox_bytes": 2,
            "outbox_dropped_disk_full_total": 0,
            "telemetry_dropped_events_total": 0,
            "mqtt_connected": 1,
        },
    )
    ref = ModelRef(name="m", version="1.0.0", release=1)
    m.on_prediction(
        PredictionEvent(0.0, "r", ref, np.zeros((1, 2)), Prediction(labels=[1]), 1.0, None, False)
    )
    m.on_feedback("r", ref, 1, 1)
    names = set(re.findall(r"^# TYPE (\S+)", m.prometheus_text(), flags=re.M))
    assert names and [n for n in sorted(names) if f"`{n}" not in DOC] == []
