"""MQTT ingest: only well-formed messages whose device id matches the topic get through."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fleet_server.service import FleetService
from protocol import KeyPair
from protocol.messages import MAX_MESSAGE_BYTES, DeviceState, MetricsReport, ModelRef, SketchReport
from protocol.sketches import FeatureSketch, SketchSet
from protocol.transport import MemoryBroker
from tests.fleet_server.fleetkit import DeviceKey, make_config

D1 = DeviceKey("d1")


@pytest.fixture
def fleet(tmp_path: Path, signing_key: KeyPair) -> tuple[FleetService, MemoryBroker]:
    broker = MemoryBroker()
    svc = FleetService(make_config(tmp_path, signing_key), transport=broker.client("server"))
    assert svc.bridge is not None
    svc.bridge.start()
    broker.clients[0].connect()
    return svc, broker


def _pub(broker: MemoryBroker, topic: str, payload: bytes) -> None:
    c = broker.client("x")
    c.connect()
    c.publish(topic, payload)
    c.close()


def test_valid_state_registers_the_device(fleet: tuple[FleetService, MemoryBroker]) -> None:
    svc, broker = fleet
    _pub(broker, "edgefleet/devices/d1/state", D1.birth(profile="host"))
    assert svc.get_device("d1")["profile"] == "host"
    assert svc.bridge.stats()["accepted"] == {"state": 1}  # type: ignore[union-attr]


def test_device_id_mismatch_is_dropped_and_counted(
    fleet: tuple[FleetService, MemoryBroker],
) -> None:
    svc, broker = fleet
    t = "edgefleet/devices/d1/state"
    _pub(broker, t, D1.sign(t, DeviceState(device_id="d2", online=True).to_json()))
    assert svc.list_devices() == []
    assert svc.bridge.stats()["dropped"] == {"device_id_mismatch": 1}  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        ("edgefleet/devices/d1/state", b"{not json", "unsigned"),
        ("edgefleet/devices/d1/state", b'{"device_id": "d1", "online": "x"}', "malformed"),
        ("edgefleet/devices/d1/status", b'{"device_id": "d1"}', "malformed"),
        ("edgefleet/devices/d1/status", b'{"device_id": "d1"}', "unsigned"),
        ("edgefleet/devices/d1/telemetry/metrics", b"x" * (MAX_MESSAGE_BYTES + 1), "oversize"),
        ("edgefleet/devices/d1/telemetry/other", b"{}", "unknown_topic"),
        ("edgefleet/devices/d9/status", b'{"device_id": "d9"}', "unknown_device"),
    ],
)
def test_bad_messages_are_dropped_counted_and_never_crash(
    fleet: tuple[FleetService, MemoryBroker], topic: str, payload: bytes, reason: str
) -> None:
    svc, _ = fleet
    svc.bridge.handle("edgefleet/devices/d1/state", D1.birth())  # type: ignore[union-attr]
    if reason not in ("unsigned", "unknown_topic", "oversize"):
        signer = D1 if "/d1/" in topic else DeviceKey("d9")
        payload = signer.sign(topic, payload)
    svc.bridge.handle(topic, payload)  # type: ignore[union-attr]
    assert svc.bridge.stats()["dropped"] == {reason: 1}  # type: ignore[union-attr]
    body, _ = svc.exporter.render()
    assert reason.encode() in body


def test_malformed_sketch_is_dropped_as_malformed(fleet: tuple[FleetService, MemoryBroker]) -> None:
    from datetime import datetime, timezone

    svc, _ = fleet
    now = datetime.now(timezone.utc)
    bad = SketchSet(
        rows=5, features={"f": FeatureSketch(kind="numeric", sketch="bm90IGEgc2tldGNo", count=5)}
    )
    report = SketchReport(
        device_id="d1",
        model=ModelRef(name="iris", version="1.0.0", release=1),
        window_start=now,
        window_end=now,
        seq=1,
        sketches=bad,
    )
    t = "edgefleet/devices/d1/telemetry/sketch"
    svc.bridge.handle("edgefleet/devices/d1/state", D1.birth())  # type: ignore[union-attr]
    svc.bridge.handle(t, D1.sign(t, report.to_json()))  # type: ignore[union-attr]
    assert svc.bridge.stats()["dropped"] == {"malformed": 1}  # type: ignore[union-attr]


def test_a_failing_handler_is_counted_not_raised(
    fleet: tuple[FleetService, MemoryBroker], monkeypatch: pytest.MonkeyPatch
) -> None:
    svc, _ = fleet

    def boom(msg: object) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(svc.ingest, "on_state", boom)  # the bridge's sink
    svc.bridge.handle("edgefleet/devices/d1/state", D1.birth())  # type: ignore[union-attr]
    assert svc.bridge.stats()["dropped"] == {"handler_error": 1}  # type: ignore[union-attr]


def test_metrics_are_stored_once_per_device_and_seq(
    fleet: tuple[FleetService, MemoryBroker],
) -> None:
    from datetime import datetime, timezone

    svc, broker = fleet
    now = datetime.now(timezone.utc)
    m = MetricsReport(
        device_id="d1",
        seq=7,
        window_start=now,
        window_end=now,
        model=ModelRef(name="iris", version="1.0.0", release=1),
        requests=100,
        errors=5,
        latency={"count": 100, "p95_ms": 4.0},
    )
    _pub(broker, "edgefleet/devices/d1/state", D1.birth())
    t = "edgefleet/devices/d1/telemetry/metrics"
    _pub(broker, t, D1.sign(t, m.to_json()))
    _pub(broker, t, D1.sign(t, m.to_json()))  # re-sent by the outbox after a lost ack
    summary = svc.repo.metrics_summary("iris", "1.0.0", 0)
    assert summary["reports"] == 1
    assert summary["error_rate"] == pytest.approx(0.05)
    assert summary["p95_ms"] == 4.0


def test_shared_subscription_only_with_mqtt5(tmp_path: Path, signing_key: KeyPair) -> None:
    from fleet_server.bridge import Bridge
    from protocol.topics import Topics

    b5 = Bridge(MemoryBroker().client("s"), Topics(), None, mqtt5=True, shared_group="g")  # type: ignore[arg-type]
    b3 = Bridge(MemoryBroker().client("s"), Topics(), None, mqtt5=False, shared_group="g")  # type: ignore[arg-type]
    assert "$share/g/edgefleet/devices/+/telemetry/+" in b5.filters()
    assert all(not f.startswith("$share") for f in b3.filters())
    assert json.dumps(b3.filters())


def test_a_device_verdict_on_a_command_the_server_did_not_send_is_recorded(
    fleet: tuple[FleetService, MemoryBroker],
) -> None:
    from protocol.messages import CommandStatus

    svc, broker = fleet
    st = CommandStatus(
        device_id="d1", command_id="someone-else-1", state="rejected", reason="key_unknown"
    )
    _pub(broker, "edgefleet/devices/d1/state", D1.birth())
    t = "edgefleet/devices/d1/status"
    _pub(broker, t, D1.sign(t, st.to_json()))
    events = svc.events(device_id="d1")
    assert events[0]["kind"] == "status"
    assert events[0]["data"]["command_id"] == "someone-else-1"
    assert events[0]["data"]["reason"] == "key_unknown"
