"""``telemetry tail``: one readable line per message, live from a real broker."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timezone

import pytest

from fleet_server.telemetry.tail import follow, summarize
from protocol.messages import (
    Alert,
    ArtifactChunk,
    Command,
    CommandStatus,
    DeviceState,
    LatencySummary,
    MetricsReport,
    ModelRef,
    RollbackPayload,
    SketchReport,
)
from protocol.sketches import SketchBuilder
from protocol.topics import Topics
from protocol.transport_paho import PahoTransport

# amqtt 0.12.1 warns (DeprecationWarning, attributed outside amqtt's own modules) that psutil
# becomes an optional extra of its $SYS plugin; nothing we can act on from here.
pytestmark = pytest.mark.filterwarnings("ignore:`BrokerSysPlugin`:DeprecationWarning")

T = Topics()
REF = ModelRef(name="iris", version="1.1.0", release=2)
NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)


def test_every_topic_kind_reads_as_one_line():
    b = SketchBuilder()
    b.update_numeric("x", [1.0, 2.0, 3.0])
    b.rows = 3
    cases = [
        (
            T.state("d1"),
            DeviceState(device_id="d1", online=True, profile="pi4", model=REF, agent_version="0.1"),
            "d1 state: online profile=pi4 model=iris 1.1.0 (r2) agent=0.1",
        ),
        (T.state("d1"), DeviceState(device_id="d1", online=False), "d1 state: offline"),
        (
            T.status("d1"),
            CommandStatus(device_id="d1", command_id="c7", state="failed", reason="hash_mismatch"),
            "d1 status: failed cmd=c7 reason=hash_mismatch",
        ),
        (
            T.metrics("d1"),
            MetricsReport(
                device_id="d1",
                seq=1,
                window_start=NOW,
                window_end=NOW,
                model=REF,
                requests=40,
                errors=1,
                accuracy=0.875,
                latency=LatencySummary(p50_ms=1.0, p95_ms=2.5),
            ),
            "d1 metrics: iris 1.1.0 (r2) req=40 err=1 fallback=0 p50=1.00ms p95=2.50ms acc=0.88",
        ),
        (
            T.sketch("d1"),
            SketchReport(
                device_id="d1",
                model=REF,
                window_start=NOW,
                window_end=NOW,
                seq=3,
                sketches=b.build(),
            ),
            "d1 sketch: iris 1.1.0 (r2) rows=3 features=1 window=12:00:00–12:00:00 seq=3",
        ),
        (
            T.cmd("d1"),
            Command(command_id="k1", device_id="d1", kind="rollback", rollback=RollbackPayload()),
            "d1 cmd: rollback id=k1 to_release=previous rollout=– unsigned",
        ),
        (
            T.artifact("d1", "ab" * 32, 0),
            ArtifactChunk(sha256="ab" * 32, index=0, count=4, chunk_sha256="cd" * 32, data="AAAA"),
            "d1 artifact: abababababab chunk 1/4 (3 B)",
        ),
        (
            T.alerts(),
            Alert(kind="drift", model="iris", version="1.1.0", message="3 of 4 features drifted"),
            "fleet alerts: drift iris 1.1.0: 3 of 4 features drifted",
        ),
    ]
    for topic, msg, expected in cases:
        assert summarize(topic, msg.to_json()) == expected


def test_bad_and_foreign_payloads_are_shown_not_raised():
    assert summarize(T.metrics("d1"), b"{oops").startswith(
        "edgefleet/devices/d1/telemetry/metrics INVALID:"
    )
    mismatch = DeviceState(device_id="d2", online=True).to_json()
    assert "does not match" in summarize(T.state("d1"), mismatch)
    assert summarize("other/thing", b'{"a": 1}') == 'other/thing (8 bytes) {"a": 1}'
    assert summarize("other/bin", b"\xff\xfe") == "other/bin (2 bytes, binary)"


def test_follow_prints_live_messages_from_the_broker(broker_url):
    pub = PahoTransport(broker_url, "tail-test-pub", clean_session=True)
    pub.connect()
    try:
        state = DeviceState(device_id="tail-dev", online=True, profile="host", model=REF)
        assert pub.publish(T.state("tail-dev"), state.to_json(), retain=True).wait(5)
        lines: list[str] = []
        worker = threading.Thread(
            target=follow,
            args=(broker_url, "edgefleet/devices/tail-dev/#", lines.append),
            kwargs={"limit": 2, "duration": 20, "timestamps": False},
        )
        worker.start()
        deadline = time.monotonic() + 10
        while not lines and time.monotonic() < deadline:
            time.sleep(0.02)
        report = MetricsReport(
            device_id="tail-dev", seq=1, window_start=NOW, window_end=NOW, model=REF, requests=5
        )
        assert pub.publish(T.metrics("tail-dev"), report.to_json()).wait(5)
        worker.join(20)
        assert not worker.is_alive()
        assert lines[0].startswith("tail-dev state: online profile=host")
        assert lines[1].startswith("tail-dev metrics: iris 1.1.0 (r2) req=5")
    finally:
        pub.publish(T.state("tail-dev"), b"", retain=True).wait(5)
        pub.close()
