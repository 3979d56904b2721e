"""Spoofing, first line of defence: the shipped Mosquitto config (TLS, per-device
credentials, pattern ACL) refuses a device that writes another device's topics.

The second line — the fleet server's device-id check — is tested in
tests/fleet_server (bridge) and in test_fleet_spoofing below when the server exists.
"""

from __future__ import annotations

import shutil
import ssl
import threading

import pytest

from protocol import Topics
from protocol.messages import MetricsReport, utcnow
from protocol.transport import TransportError
from protocol.transport_paho import PahoTransport
from tests.support.secure_broker import SERVER_USER, secure_mosquitto

pytestmark = [
    pytest.mark.mosquitto,
    pytest.mark.skipif(
        shutil.which("mosquitto_passwd") is None, reason="mosquitto is not installed"
    ),
]

PASSWORDS = {"d1": "pw-d1-secret", "d2": "pw-d2-secret", SERVER_USER: "pw-server-secret"}
T = Topics()


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    b, pki = secure_mosquitto(tmp_path_factory.mktemp("mosq"), PASSWORDS)
    yield b, pki
    b.stop()


def tls_url(b) -> str:
    return f"mqtts://127.0.0.1:{b.port}"


def client(b, pki, user, password=None, **kw) -> PahoTransport:
    return PahoTransport(
        tls_url(b),
        f"{user}-{threading.get_ident()}-{id(kw)}",
        username=user,
        password=PASSWORDS.get(user) if password is None else password,
        ca_file=str(pki["ca"]),
        **kw,
    )


def metrics(device_id: str, seq: int) -> bytes:
    now = utcnow()
    return MetricsReport(device_id=device_id, seq=seq, window_start=now, window_end=now).to_json()


def test_device_cannot_publish_another_devices_telemetry_or_status(broker):
    b, pki = broker
    got: list[tuple[str, bytes]] = []
    marker = threading.Event()
    server = client(b, pki, SERVER_USER)

    def on_msg(topic: str, payload: bytes) -> None:
        got.append((topic, payload))
        if topic == T.metrics("d1"):
            marker.set()

    server.set_handler(on_msg)
    server.subscribe("edgefleet/devices/#")
    server.connect()
    d1 = client(b, pki, "d1", mqtt5=True)
    d1.connect()
    try:
        # Spoofs first, then d1's own message: Mosquitto keeps one client's order, so once
        # the legit message arrived any spoof that got through would already be here.
        d1.publish(T.metrics("d2"), metrics("d2", 1)).wait(5)
        d1.publish(T.status("d2"), b'{"device_id":"d2","command_id":"x","state":"installed"}').wait(
            5
        )
        d1.publish(T.state("d2"), b'{"device_id":"d2","online":false}', retain=True).wait(5)
        assert d1.publish(T.metrics("d1"), metrics("d1", 1)).wait(5)
        assert marker.wait(10), "the device's own telemetry must get through"
        topics = [t for t, _ in got]
        assert T.metrics("d1") in topics
        assert not [t for t in topics if "/d2/" in t], f"spoofed messages delivered: {topics}"
    finally:
        d1.close()
        server.close()


def test_device_cannot_read_another_devices_commands(broker):
    b, pki = broker
    received: list[str] = []
    d1 = client(b, pki, "d1")
    d1.set_handler(lambda t, p: received.append(t))
    d1.subscribe(T.cmd("d2"))
    d1.subscribe(T.cmd("d1"))
    d1.connect()
    server = client(b, pki, SERVER_USER)
    server.connect()
    try:
        server.publish(T.cmd("d2"), b'{"secret": 1}').wait(5)
        server.publish(T.cmd("d1"), b'{"mine": 1}').wait(5)
        deadline = threading.Event()
        for _ in range(100):
            if T.cmd("d1") in received:
                break
            deadline.wait(0.05)
        assert received == [T.cmd("d1")]
    finally:
        d1.close()
        server.close()


def test_devices_read_the_shared_artifact_topic_that_only_the_server_writes(broker):
    b, pki = broker
    sha = "ab" * 32
    received: list[tuple[str, bytes]] = []
    d2 = client(b, pki, "d2")
    d2.set_handler(lambda t, p: received.append((t, p)))
    d2.subscribe(T.artifact_chunks(sha))
    d2.connect()
    d1 = client(b, pki, "d1")
    d1.connect()
    server = client(b, pki, SERVER_USER)
    server.connect()
    try:
        # a device's forgery first, then the server's chunk: one client's order is kept
        d1.publish(T.artifact_chunk(sha, 0), b"forged by d1", retain=True).wait(5)
        assert server.publish(T.artifact_chunk(sha, 0), b"the server's chunk", retain=True).wait(5)
        for _ in range(200):
            if received:
                break
            threading.Event().wait(0.05)
        assert received == [(T.artifact_chunk(sha, 0), b"the server's chunk")]
    finally:
        server.publish(T.artifact_chunk(sha, 0), b"", retain=True).wait(5)
        d1.close()
        d2.close()
        server.close()


@pytest.mark.parametrize("user,password", [("d1", "wrong-password"), ("nobody", "x"), ("", "")])
def test_broker_refuses_wrong_or_missing_credentials(broker, user, password):
    b, pki = broker
    t = PahoTransport(
        tls_url(b),
        f"bad-{user or 'anon'}",
        username=user or None,
        password=password or None,
        ca_file=str(pki["ca"]),
    )
    try:
        with pytest.raises(TransportError):
            t.connect(timeout=3)
    finally:
        t.close()


def test_broker_refuses_plaintext_and_unknown_ca(broker, tmp_path):
    b, _pki = broker
    plain = PahoTransport(
        f"mqtt://127.0.0.1:{b.port}", "plain", username="d1", password=PASSWORDS["d1"]
    )
    try:
        with pytest.raises(TransportError):
            plain.connect(timeout=3)
    finally:
        plain.close()
    from tests.support.pki import make_pki

    other = make_pki(tmp_path / "other")
    with pytest.raises((TransportError, ssl.SSLError)):
        t = client(b, {"ca": other["ca"]}, "d1")
        try:
            t.connect(timeout=3)
        finally:
            t.close()
