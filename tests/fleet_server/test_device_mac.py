"""Per-device MAC keys on the server: accepted only as the agreed key of a pinned device.

A real FleetService behind its real bridge on the in-memory broker; the device side agrees
its key from the fleet's retained, command-signed announcement exactly as the agent does.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fleet_server.service import FleetService
from protocol import KeyPair, TrustStore
from protocol.device_auth import mac_payload, open_envelope, public_key_b64
from protocol.device_mac import kex_id, mac_key, open_announcement, raw_public, x25519_b64
from protocol.messages import CommandStatus
from protocol.topics import Topics
from protocol.transport import MemoryBroker
from tests.fleet_server.fleetkit import TEST_ENROL_TOKEN, DeviceKey, make_config
from tests.support.keys import COMMAND_KEY

T = Topics()


@pytest.fixture
def broker() -> MemoryBroker:
    return MemoryBroker()


@pytest.fixture
def svc(tmp_path: Path, signing_key: KeyPair, broker: MemoryBroker) -> Iterator[FleetService]:
    s = FleetService(make_config(tmp_path, signing_key), transport=broker.client("s"))
    s.start()
    yield s
    s.stop()
    s.repo.close()


class MacDevice(DeviceKey):
    """A hand-driven device with an X25519 key that agrees its MAC key like the agent."""

    def __init__(self, device_id: str, token: str | None = TEST_ENROL_TOKEN) -> None:
        super().__init__(device_id, token)
        self.kex = X25519PrivateKey.generate()

    def birth(self, **fields: object) -> bytes:
        return super().birth(x25519_key=x25519_b64(self.kex.public_key()), **fields)

    def agree(self, announcement: bytes) -> None:
        trust = TrustStore.from_keys([COMMAND_KEY.public])
        got = open_announcement(announcement, trust, datetime.now(timezone.utc))
        assert not isinstance(got, str), got
        peer = got[1]
        k = mac_key(
            self.kex, peer, self.device_id, raw_public(self.kex.public_key()), raw_public(peer)
        )
        self.signer.use_mac(k, kex_id(peer))


def retained_kex(broker: MemoryBroker) -> bytes:
    got: list[bytes] = []
    c = broker.client("reader")
    c.set_handler(lambda t, p: got.append(p))
    c.connect()
    c.subscribe(T.kex())
    assert got, "the fleet announces its key, retained, when it connects"
    return got[-1]


def status(device_id: str, n: int = 1) -> bytes:
    return CommandStatus(device_id=device_id, command_id=f"c{n}", state="installed").to_json()


def handle(svc: FleetService, topic: str, payload: bytes) -> None:
    assert svc.bridge is not None
    svc.bridge.handle(topic, payload)


def stats(svc: FleetService) -> dict[str, dict[str, int]]:
    assert svc.bridge is not None
    return svc.bridge.stats()


def test_a_mac_from_the_agreed_key_is_accepted(svc: FleetService, broker: MemoryBroker) -> None:
    d = MacDevice("d1")
    handle(svc, T.state("d1"), d.birth())
    d.agree(retained_kex(broker))
    payload = d.sign(T.status("d1"), status("d1"))
    env = open_envelope(payload)
    assert env is not None and env.scheme == "mac"
    handle(svc, T.status("d1"), payload)
    assert stats(svc)["accepted"].get("status") == 1
    assert stats(svc)["dropped"] == {}


def test_altered_payload_other_topic_other_device_key_and_replay_are_refused(
    svc: FleetService, broker: MemoryBroker
) -> None:
    ann = retained_kex(broker)
    d1, d2 = MacDevice("d1"), MacDevice("d2")
    for d in (d1, d2):
        handle(svc, T.state(d.device_id), d.birth())
        d.agree(ann)
    good = d1.sign(T.status("d1"), status("d1"))
    handle(svc, T.status("d1"), good.replace(b'"installed"', b'"failed"'))
    assert stats(svc)["dropped"] == {"bad_mac": 1}
    # a status MAC moved to the metrics topic
    handle(svc, T.metrics("d1"), good)
    assert stats(svc)["dropped"] == {"bad_mac": 2}
    # d2 speaking for d1 with its own K
    handle(svc, T.status("d1"), d2.sign(T.status("d1"), status("d1")))
    assert stats(svc)["dropped"] == {"bad_mac": 3}
    handle(svc, T.status("d1"), good)
    handle(svc, T.status("d1"), good)
    assert stats(svc)["accepted"].get("status") == 1
    assert stats(svc)["dropped"] == {"bad_mac": 3, "replayed": 1}


def test_mac_without_an_announced_device_key_or_fleet_key_is_refused(
    tmp_path: Path, signing_key: KeyPair, svc: FleetService, broker: MemoryBroker
) -> None:
    ann = retained_kex(broker)
    # the device's birth carried no X25519 key: the server cannot know its K
    d = MacDevice("d1")
    handle(svc, T.state("d1"), DeviceKey.birth(d))
    d.agree(ann)
    handle(svc, T.status("d1"), d.sign(T.status("d1"), status("d1")))
    assert stats(svc)["dropped"] == {"mac_no_key": 1}
    # a MAC'd state: the server knows no X25519 key of this device either
    assert d.signer.mac is not None
    k, fid = d.signer.mac
    state = mac_payload(b'{"device_id":"d1","online":true}', T.state("d1"), k, fid, 1, 99)
    handle(svc, T.state("d1"), state)
    assert stats(svc)["dropped"] == {"mac_no_key": 2}

    # a server without the command key has no fleet key: MACs cannot be checked
    (tmp_path / "nokey").mkdir()
    cfg = make_config(tmp_path / "nokey", signing_key)
    cfg = cfg.model_copy(update={"signing": cfg.signing.model_copy(update={"command_key": None})})
    bare = FleetService(cfg, transport=MemoryBroker().client("s2"))
    try:
        e = MacDevice("e1")
        bare.bridge.handle(T.state("e1"), e.birth())  # type: ignore[union-attr]
        e.agree(ann)
        bare.bridge.handle(T.status("e1"), e.sign(T.status("e1"), status("e1")))  # type: ignore[union-attr]
        assert bare.bridge.stats()["dropped"] == {"mac_no_key": 1}  # type: ignore[union-attr]
    finally:
        bare.repo.close()


def test_a_mac_for_another_fleet_key_is_refused(svc: FleetService, broker: MemoryBroker) -> None:
    d = MacDevice("d1")
    handle(svc, T.state("d1"), d.birth())
    d.agree(retained_kex(broker))
    k, _ = d.signer.mac or (b"", "")
    d.signer.use_mac(k, "0" * 16)
    handle(svc, T.status("d1"), d.sign(T.status("d1"), status("d1")))
    assert stats(svc)["dropped"] == {"mac_wrong_fleet_key": 1}


def test_every_fleet_process_with_the_command_key_agrees_the_same_key(
    tmp_path: Path, signing_key: KeyPair, svc: FleetService, broker: MemoryBroker
) -> None:
    d = MacDevice("d1")
    d.agree(retained_kex(broker))
    (tmp_path / "other").mkdir()
    other = FleetService(
        make_config(tmp_path / "other", signing_key), transport=MemoryBroker().client("o")
    )
    try:
        other.bridge.handle(T.state("d1"), d.birth())  # type: ignore[union-attr]
        other.bridge.handle(T.status("d1"), d.sign(T.status("d1"), status("d1")))  # type: ignore[union-attr]
        assert other.bridge.stats()["accepted"].get("status") == 1  # type: ignore[union-attr]
    finally:
        other.repo.close()


def test_a_pending_device_macs_only_after_an_operator_approves_it(
    svc: FleetService, broker: MemoryBroker
) -> None:
    d = MacDevice("d1", token=None)
    handle(svc, T.state("d1"), d.birth())  # pending: its birth announced its X25519 key
    d.agree(retained_kex(broker))
    handle(svc, T.status("d1"), d.sign(T.status("d1"), status("d1", 1)))
    assert stats(svc)["dropped"] == {"pending": 2}  # the birth (kept) and the status
    svc.approve_device("d1", "op", d.key.key_id)
    handle(svc, T.status("d1"), d.sign(T.status("d1"), status("d1", 2)))
    assert stats(svc)["accepted"].get("status") == 1
    assert stats(svc)["dropped"] == {"pending": 2}


def mac_state(d: MacDevice, seq: int, **fields: object) -> bytes:
    """A later birth of ``d``, MAC'd as the agent MACs its births after the first."""
    from protocol.messages import DeviceState

    assert d.signer.mac is not None
    k, fid = d.signer.mac
    msg = DeviceState(device_id=d.device_id, online=True, **fields)  # type: ignore[arg-type]
    return mac_payload(msg.to_json(), T.state(d.device_id), k, fid, 1, seq)


def test_a_macd_birth_is_accepted_also_after_a_restart_but_cannot_change_keys(
    tmp_path: Path, signing_key: KeyPair, svc: FleetService, broker: MemoryBroker
) -> None:
    d = MacDevice("d1")
    handle(svc, T.state("d1"), d.birth())
    d.agree(retained_kex(broker))
    handle(svc, T.state("d1"), mac_state(d, 5, agent_version="2"))
    assert stats(svc)["accepted"].get("state") == 2 and stats(svc)["dropped"] == {}
    # a MAC'd state may not bring another X25519 or Ed25519 key
    other = x25519_b64(X25519PrivateKey.generate().public_key())
    handle(svc, T.state("d1"), mac_state(d, 6, x25519_key=other))
    stranger = public_key_b64(KeyPair.generate().public)
    handle(svc, T.state("d1"), mac_state(d, 7, public_key=stranger))
    assert stats(svc)["dropped"] == {"mac_key_change": 2}
    # a restarted server (same registry) checks the MAC from the persisted X25519 key,
    # before the device sends another Ed25519-signed birth
    svc.stop()
    again = FleetService(svc.config, transport=broker.client("s-again"))
    try:
        assert again.bridge is not None
        again.bridge.handle(T.state("d1"), mac_state(d, 8, agent_version="3"))
        again.bridge.handle(T.status("d1"), d.sign(T.status("d1"), status("d1")))
        assert again.bridge.stats()["dropped"] == {}
        assert again.bridge.stats()["accepted"] == {"state": 1, "status": 1}
    finally:
        again.repo.close()


def test_commands_are_macd_only_to_a_device_that_says_it_holds_the_fleet_key(
    svc: FleetService, broker: MemoryBroker
) -> None:
    from protocol.device_mac import fleet_kex_key

    fid = kex_id(fleet_kex_key(COMMAND_KEY).public_key())
    # an enrolling birth that already names the fleet key (a device that kept its
    # announcement): MAC'd commands from the first one on
    e = MacDevice("e1")
    e.agree(retained_kex(broker))
    handle(svc, T.state("e1"), e.birth(fleet_kex=fid))
    assert svc.devices.command_key("e1") == (e.signer.mac[0], fid)  # type: ignore[index]

    d = MacDevice("d1")
    handle(svc, T.state("d1"), d.birth())
    assert svc.devices.command_key("d1") is None  # its birth named no fleet key
    d.agree(retained_kex(broker))
    handle(svc, T.state("d1"), d.birth(fleet_kex="0" * 16))  # another fleet's key
    assert svc.devices.command_key("d1") is None
    handle(svc, T.state("d1"), d.birth(fleet_kex=fid))
    got = svc.devices.command_key("d1")
    assert got is not None and got == (d.signer.mac[0], fid)  # type: ignore[index]
    # a later birth without the key (the device lost it) turns the MACs off again
    handle(svc, T.state("d1"), d.birth())
    assert svc.devices.command_key("d1") is None
    assert svc.devices.command_key("nobody") is None
