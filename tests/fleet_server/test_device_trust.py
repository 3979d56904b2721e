"""Devices speak only for themselves: pinned keys, enrolment, freshness, per-device caps.

A real FleetService behind its real bridge on the in-memory broker; every message goes
through ``bridge.handle`` exactly as paho would deliver it.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from fleet_server.service import FleetService
from protocol import KeyPair
from protocol.device_auth import sign_payload
from protocol.messages import CommandStatus, DeviceState, MetricsReport, ModelRef, SketchReport
from protocol.sketches import SketchSet
from protocol.topics import Topics
from protocol.transport import MemoryBroker
from tests.fleet_server.fleetkit import Api, DeviceKey, make_config

T = Topics()
REF = ModelRef(name="iris", version="1.0.0", release=1)


@pytest.fixture
def svc(tmp_path: Path, signing_key: KeyPair) -> Iterator[FleetService]:
    s = FleetService(make_config(tmp_path, signing_key), transport=MemoryBroker().client("s"))
    yield s
    s.repo.close()


def handle(svc: FleetService, topic: str, payload: bytes) -> None:
    assert svc.bridge is not None
    svc.bridge.handle(topic, payload)


def dropped(svc: FleetService) -> dict[str, int]:
    assert svc.bridge is not None
    return svc.bridge.stats()["dropped"]


def metrics(device_id: str, **kw: object) -> bytes:
    now = datetime.now(timezone.utc)
    m = MetricsReport(device_id=device_id, seq=1, window_start=now, window_end=now, model=REF)
    return m.model_copy(update=kw).to_json()


def test_a_device_with_the_enrolment_token_is_approved_at_once(svc: FleetService) -> None:
    d = DeviceKey("d1")
    handle(svc, T.state("d1"), d.birth(profile="host"))
    assert svc.get_device("d1")["online"] is True
    assert svc.list_enrolments()[0]["method"] == "token"


def test_a_device_without_a_token_is_pending_until_an_operator_approves_it(
    svc: FleetService,
) -> None:
    d = DeviceKey("d1", token=None)
    handle(svc, T.state("d1"), d.birth(profile="host"))
    handle(svc, T.metrics("d1"), d.sign(T.metrics("d1"), metrics("d1")))
    assert svc.list_devices() == []
    assert dropped(svc) == {"pending": 2}
    [pending] = svc.list_enrolments("pending")
    assert pending["key_id"] == d.key.key_id
    api = Api(__import__("fleet_server.app", fromlist=["create_app"]).create_app(svc))
    viewer, operator = (api.as_(svc.create_token(r)) for r in ("viewer", "operator"))
    assert viewer.post("/v1/devices/d1/approve").status_code == 403
    wrong = operator.post("/v1/devices/d1/approve", json={"key_id": "0" * 16})
    assert wrong.status_code == 409 and wrong.json()["field"] == "key_id"
    ok = operator.post("/v1/devices/d1/approve", json={"key_id": d.key.key_id})
    assert ok.status_code == 200 and ok.json()["status"] == "approved"
    assert svc.get_device("d1")["online"] is True  # the birth it sent is applied on approval
    handle(svc, T.metrics("d1"), d.sign(T.metrics("d1"), metrics("d1", seq=2)))
    assert svc.bridge is not None and svc.bridge.stats()["accepted"]["metrics"] == 1
    assert any(a["action"] == "device.approve" for a in svc.audit())


def test_messages_not_signed_by_the_pinned_key_are_dropped_by_reason(svc: FleetService) -> None:
    d, attacker = DeviceKey("d1"), DeviceKey("d1")  # the attacker knows the token, not d1's key
    handle(svc, T.state("d1"), d.birth())
    st = CommandStatus(device_id="d1", command_id="r-x:d1:deploy:1", state="failed").to_json()
    handle(svc, T.status("d1"), st)  # unsigned
    handle(svc, T.status("d1"), attacker.sign(T.status("d1"), st))  # another key
    handle(svc, T.state("d1"), attacker.birth(online=False))  # a re-enrolment attempt
    signed = d.sign(T.status("d1"), st)
    handle(svc, T.status("d1"), signed.replace(b"failed", b"rejected"))  # tampered
    handle(svc, T.metrics("d1"), signed)  # d1's own status replayed on another topic
    assert dropped(svc) == {"unsigned": 1, "key_mismatch": 2, "bad_signature": 2}
    assert svc.get_device("d1")["online"] is True
    body, _ = svc.exporter.render()
    assert b'reason="key_mismatch"' in body


def test_an_old_retained_state_or_will_cannot_mark_a_live_device_offline(
    svc: FleetService,
) -> None:
    d = DeviceKey("d1")
    topic = T.state("d1")
    old_will = d.signer.sign(
        topic, DeviceState(device_id="d1", online=False).to_json(), seq=(1 << 20) - 1
    )
    handle(svc, topic, d.birth())  # connection 0, birth 1
    reconnected = DeviceState(device_id="d1", online=True, public_key=d.signer.public_key_b64())
    handle(svc, topic, d.signer.sign(topic, reconnected.to_json(), seq=(1 << 20) + 1))
    handle(svc, topic, old_will)  # connection 0's will, replayed after connection 1's birth
    assert svc.get_device("d1")["online"] is True
    assert dropped(svc) == {"stale": 1}
    earlier_boot = sign_payload(
        DeviceState(device_id="d1", online=False).to_json(), topic, d.key, 0, 10**9
    )
    handle(svc, topic, earlier_boot)
    assert svc.get_device("d1")["online"] is True and dropped(svc)["stale"] == 2
    fresh_will = d.signer.sign(
        topic, DeviceState(device_id="d1", online=False).to_json(), seq=(2 << 20) - 1
    )
    handle(svc, topic, fresh_will)  # connection 1's own will: the device is gone
    assert svc.get_device("d1")["online"] is False


def test_the_newest_state_order_survives_a_server_restart(
    tmp_path: Path, signing_key: KeyPair
) -> None:
    cfg = make_config(tmp_path, signing_key)
    d = DeviceKey("d1")
    topic = T.state("d1")
    first = d.birth()
    s1 = FleetService(cfg, transport=MemoryBroker().client("s"))
    handle(s1, topic, first)
    handle(s1, topic, d.birth())
    s1.repo.close()
    s2 = FleetService(cfg, transport=MemoryBroker().client("s"))
    handle(s2, topic, first)  # an older retained state offered again
    assert dropped(s2) == {"stale": 1}
    s2.repo.close()


def test_a_replayed_status_is_dropped(svc: FleetService) -> None:
    d = DeviceKey("d1")
    handle(svc, T.state("d1"), d.birth())
    st = CommandStatus(device_id="d1", command_id="c1", state="failed").to_json()
    signed = d.sign(T.status("d1"), st)
    handle(svc, T.status("d1"), signed)
    handle(svc, T.status("d1"), signed)
    assert dropped(svc) == {"replayed": 1}


def test_a_flood_of_fake_registrations_is_capped(tmp_path: Path, signing_key: KeyPair) -> None:
    cfg = make_config(tmp_path, signing_key)
    cfg = cfg.model_copy(
        update={"devices": cfg.devices.model_copy(update={"max_pending": 50, "enrol_burst": 100})}
    )
    now = datetime.now(timezone.utc).timestamp()
    svc = FleetService(cfg, transport=MemoryBroker().client("s"), clock=lambda: now)
    for i in range(3000):
        d = DeviceKey(f"fake-{i}", token=None)
        handle(svc, T.state(d.device_id), d.birth())
    assert len(svc.list_enrolments("pending")) == 50
    assert svc.list_devices() == []
    drops = dropped(svc)
    assert drops["pending"] == 50 and drops["pending_full"] == 50 and drops["enrol_limit"] == 2900
    svc.repo.close()


def test_per_device_rate_models_and_windows_are_capped(
    tmp_path: Path, signing_key: KeyPair
) -> None:
    cfg = make_config(tmp_path, signing_key)
    caps = {"msgs_burst": 20, "msgs_per_second": 0.001, "max_models": 2, "max_windows": 2}
    cfg = cfg.model_copy(update={"devices": cfg.devices.model_copy(update=caps)})
    svc = FleetService(cfg, transport=MemoryBroker().client("s"))
    d = DeviceKey("d1")
    handle(svc, T.state("d1"), d.birth())
    for v in ("1", "2", "3"):
        m = metrics("d1", model=ModelRef(name="m", version=v, release=1))
        handle(svc, T.metrics("d1"), d.sign(T.metrics("d1"), m))
    now = datetime.now(timezone.utc)
    for start in (
        now - timedelta(days=30),
        now,
        now - timedelta(hours=1),
        now - timedelta(hours=2),
    ):
        rep = SketchReport(
            device_id="d1",
            model=ModelRef(name="m", version="1", release=1),
            window_start=start,
            window_end=start,
            seq=1,
            sketches=SketchSet(),
        )
        handle(svc, T.sketch("d1"), d.sign(T.sketch("d1"), rep.to_json()))
    for _ in range(30):
        m = metrics("d1", model=ModelRef(name="m", version="1", release=1))
        handle(svc, T.metrics("d1"), d.sign(T.metrics("d1"), m))
    drops = dropped(svc)
    assert drops["model_limit"] == 1
    assert drops["stale_window"] == 1
    assert drops["window_limit"] == 1  # the third distinct sketch hour (max_windows=2)
    assert drops["rate_limited"] >= 10
    svc.repo.close()


def test_revoked_device_must_enrol_again(svc: FleetService) -> None:
    d = DeviceKey("d1")
    handle(svc, T.state("d1"), d.birth())
    svc.revoke_device("d1")
    handle(svc, T.metrics("d1"), d.sign(T.metrics("d1"), metrics("d1")))
    assert dropped(svc) == {"unknown_device": 1}


def test_a_full_pending_list_forgets_entries_nobody_approved_for_a_day(
    tmp_path: Path, signing_key: KeyPair
) -> None:
    cfg = make_config(tmp_path, signing_key)
    cfg = cfg.model_copy(update={"devices": cfg.devices.model_copy(update={"max_pending": 2})})
    now = [datetime.now(timezone.utc).timestamp()]
    svc = FleetService(cfg, transport=MemoryBroker().client("s"), clock=lambda: now[0])
    for name in ("p1", "p2", "p3"):
        d = DeviceKey(name, token=None)
        handle(svc, T.state(name), d.birth())
    assert dropped(svc) == {"pending": 2, "pending_full": 1}
    now[0] += 2 * 86400
    handle(svc, T.state("p4"), DeviceKey("p4", token=None).birth())
    assert [p["device_id"] for p in svc.list_enrolments("pending")] == ["p4"]
    svc.repo.close()


def test_dashboard_approve_button_needs_the_operator_role_and_the_csrf_token(
    svc: FleetService,
) -> None:
    from fleet_server.app import create_app
    from tests.fleet_server.test_dashboard import PASSWORD, Browser

    d = DeviceKey("pi-7", token=None)
    handle(svc, T.state("pi-7"), d.birth(profile="host"))
    for role in ("viewer", "operator"):
        svc.add_user(role, PASSWORD, role)
    app = create_app(svc)
    viewer, operator = Browser(app), Browser(app)
    assert viewer.login("viewer").status_code == 303
    assert operator.login("operator").status_code == 303
    page = viewer.get("/ui/devices").text
    assert "Waiting for approval" in page and d.key.key_id in page
    assert 'action="/ui/devices/pi-7/approve"' not in page  # no button for a viewer
    r = viewer.post("/ui/devices/pi-7/approve", data={"csrf": viewer.csrf("/ui/devices")})
    assert r.status_code == 403
    page = operator.get("/ui/devices").text
    assert 'action="/ui/devices/pi-7/approve"' in page
    assert operator.post("/ui/devices/pi-7/approve", data={"csrf": "forged"}).status_code == 403
    assert svc.list_enrolments("pending") != []
    form = {"csrf": operator.csrf("/ui/devices"), "key_id": d.key.key_id}
    r = operator.post("/ui/devices/pi-7/approve", data=form)
    assert r.status_code == 303
    assert svc.list_enrolments("pending") == [] and svc.get_device("pi-7")["online"] is True


def test_a_message_the_sink_failed_to_take_is_taken_from_its_next_copy(
    svc: FleetService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A report whose handler failed (the registry briefly refused it) is not marked seen:
    its QoS 1 redelivery, or the same report drained from a dead process's session, is
    merged instead of being dropped as ``replayed``; a copy after that one is a replay."""
    from fleet_server.errors import StorageError

    d = DeviceKey("d1")
    handle(svc, T.state("d1"), d.birth())
    assert svc.bridge is not None
    sink = svc.bridge.sink
    take = sink.on_metrics
    calls: list[int] = []

    def flaky(msg: MetricsReport) -> None:
        calls.append(msg.seq)
        if len(calls) == 1:
            raise StorageError("registry unavailable")
        take(msg)

    monkeypatch.setattr(sink, "on_metrics", flaky)
    signed = d.sign(T.metrics("d1"), metrics("d1", seq=7))
    handle(svc, T.metrics("d1"), signed)
    assert dropped(svc) == {"rejected": 1}
    handle(svc, T.metrics("d1"), signed)  # the second copy is taken
    assert svc.bridge.stats()["accepted"]["metrics"] == 1
    handle(svc, T.metrics("d1"), signed)  # and a third is a replay
    assert dropped(svc) == {"rejected": 1, "replayed": 1}
    assert calls == [7, 7]
