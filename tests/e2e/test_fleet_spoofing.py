"""Spoofing, second line of defence: the fleet server's device-id and device-key checks.

The shipped Mosquitto config lets a device write only its own topics
(``test_spoofing.py``). What the broker cannot see is the payload: device d1 may publish,
on its own topics, messages that claim to come from d2, signed with d1's own (enrolled)
key. The server — a real :class:`FleetService` behind its real MQTT bridge, on the shipped
TLS + ACL broker — must drop every one of them, count them, and leave d2's record
untouched. On a plain broker (no ACL), messages on d2's topics signed by d1 are dropped the
same way (d2 never enrolled: ``unknown_device``; its state: the id does not match).
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any

import pytest

from protocol import KeyPair, Topics, build_reference
from protocol.messages import (
    CommandStatus,
    DeviceState,
    MetricsReport,
    ModelRef,
    SketchReport,
    utcnow,
)
from protocol.transport_paho import PahoTransport
from tests.e2e.support import ENROL_TOKEN, make_fleet, wait_until
from tests.fleet_server.fleetkit import DeviceKey
from tests.support.bundles import trained
from tests.support.secure_broker import SERVER_USER, secure_mosquitto

pytestmark = [
    pytest.mark.slow,
    pytest.mark.mosquitto,
    pytest.mark.skipif(
        shutil.which("mosquitto_passwd") is None, reason="mosquitto is not installed"
    ),
]

PASSWORDS = {"d1": "pw-d1-e2e", "d2": "pw-d2-e2e", SERVER_USER: "pw-server-e2e"}
T = Topics()
REF = ModelRef(name="iris", version="1.0.0", release=1)


def forged(claimed: str) -> dict[str, bytes]:
    """One message of every device→server kind, each claiming to come from ``claimed``."""
    now = utcnow()
    tm = trained("iris-logreg")
    return {
        "metrics": MetricsReport(
            device_id=claimed, seq=7, window_start=now, window_end=now, model=REF, requests=99
        ).to_json(),
        "sketch": SketchReport(
            device_id=claimed,
            model=REF,
            window_start=now,
            window_end=now,
            seq=7,
            sketches=build_reference(tm.X[:50], tm.input_schema),
        ).to_json(),
        "status": CommandStatus(
            device_id=claimed, command_id="r-forged:d2:deploy:1", state="installed", model=REF
        ).to_json(),
        "state": DeviceState(device_id=claimed, online=True, profile="host", model=REF).to_json(),
    }


def topic_for(kind: str, device_id: str) -> str:
    return {
        "metrics": T.metrics,
        "sketch": T.sketch,
        "status": T.status,
        "state": T.state,
    }[kind](device_id)


@pytest.fixture
def secure(tmp_path: Path) -> Any:
    broker, pki = secure_mosquitto(tmp_path / "mosq", PASSWORDS)
    yield broker, pki
    broker.stop()


def device_client(url: str, user: str, pki: dict[str, Path] | None) -> PahoTransport:
    creds: dict[str, Any] = {}
    if pki is not None:
        creds = {"username": user, "password": PASSWORDS[user], "ca_file": str(pki["ca"])}
    t = PahoTransport(url, f"{user}-spoofer-{threading.get_ident()}", clean_session=True, **creds)
    t.connect(timeout=10)
    return t


def enrol_d1(service: Any, device: PahoTransport) -> DeviceKey:
    """d1 enrols with the suite's token; its key signs everything it sends afterwards."""
    key = DeviceKey("d1", token=ENROL_TOKEN)
    assert device.publish(T.state("d1"), key.birth(profile="host"), retain=True).wait(5)
    wait_until(lambda: service.devices.approved("d1"), 20, "d1 to enrol")
    return key


def assert_server_dropped_spoofs(
    service: Any, device: PahoTransport, key: DeviceKey, spoofs: list
) -> None:
    """Publish the spoofs, then d1's own metrics; every spoof must be dropped and counted."""
    before = service.bridge.stats()
    for topic, payload, retain in spoofs:
        signed = key.sign(topic, payload)
        assert device.publish(topic, signed, retain=retain).wait(5), f"broker refused {topic}"
    now = utcnow()
    own = MetricsReport(device_id="d1", seq=1, window_start=now, window_end=now, model=REF)
    assert device.publish(T.metrics("d1"), key.sign(T.metrics("d1"), own.to_json())).wait(5)
    accepted0 = before["accepted"].get("metrics", 0)
    wait_until(
        lambda: service.bridge.stats()["accepted"].get("metrics", 0) > accepted0,
        20,
        "the server to accept d1's own metrics",
    )
    stats = service.bridge.stats()
    dropped = {
        reason: n - before["dropped"].get(reason, 0) for reason, n in stats["dropped"].items()
    }
    assert sum(dropped.values()) == len(spoofs), f"spoofs not all dropped: {stats}"
    assert stats["accepted"].get("metrics", 0) == accepted0 + 1, "a spoofed report was accepted"
    # Nothing of d2 reached the registry: no device row, no metrics, no status effect.
    assert "d2" not in {d["device_id"] for d in service.list_devices()}
    body, _ = service.exporter.render()
    assert b"device_id_mismatch" in body, "the drops are not counted in /metrics"


def test_server_drops_messages_a_device_sends_in_another_devices_name(
    secure, tmp_path, signing_key: KeyPair
):
    broker, pki = secure
    url = f"mqtts://127.0.0.1:{broker.port}"
    service = make_fleet(
        tmp_path,
        url,
        bundle_keys=[],
        transport_options={
            "username": SERVER_USER,
            "password": PASSWORDS[SERVER_USER],
            "ca_file": str(pki["ca"]),
        },
    )
    d1 = device_client(url, "d1", pki)
    key = enrol_d1(service, d1)
    try:
        # The ACL lets d1 write its own topics, so these reach the server: only the
        # payload lies. The status claims d1 but names a command of d2.
        spoofs = [
            (topic_for(kind, "d1"), payload, kind == "state")
            for kind, payload in forged("d2").items()
        ]
        status_for_d2 = CommandStatus(
            device_id="d1", command_id="r-forged:d2:deploy:1", state="installed", model=REF
        )
        spoofs.append((T.status("d1"), status_for_d2.to_json(), False))
        assert_server_dropped_spoofs(service, d1, key, spoofs)
        dropped = service.bridge.stats()["dropped"]
        assert dropped.get("device_id_mismatch") == 4, dropped
        assert dropped.get("rejected") == 1, dropped
    finally:
        d1.close()
        service.stop()


def test_server_drops_another_devices_topic_on_a_broker_without_acl(
    mosquitto, tmp_path, signing_key: KeyPair
):
    service = make_fleet(tmp_path, mosquitto.url, bundle_keys=[])
    d1 = device_client(mosquitto.url, "d1", None)
    key = enrol_d1(service, d1)
    try:
        spoofs = [
            (topic_for(kind, "d2"), payload, kind == "state")
            for kind, payload in forged("d1").items()
        ]
        assert_server_dropped_spoofs(service, d1, key, spoofs)
        dropped = service.bridge.stats()["dropped"]
        assert dropped.get("device_id_mismatch") == 1, dropped  # the state: d1's id on d2's topic
        assert dropped.get("unknown_device") == 3, dropped  # d2 never enrolled
    finally:
        d1.close()
        service.stop()
