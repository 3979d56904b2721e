"""The MAC scheme and the fleet key announcement, on their own (no server, no broker)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from protocol import KeyPair, TrustStore
from protocol.device_auth import MAC, DeviceSigner, open_envelope, verify_envelope, verify_mac
from protocol.device_mac import (
    announce,
    fleet_kex_key,
    kex_id,
    mac_key,
    open_announcement,
    raw_public,
)

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)
TOPIC = "edgefleet/devices/d1/status"


def agreed(command: KeyPair, device: X25519PrivateKey, device_id: str = "d1") -> bytes:
    fleet = fleet_kex_key(command).public_key()
    return mac_key(device, fleet, device_id, raw_public(device.public_key()), raw_public(fleet))


def test_both_sides_agree_and_the_fleet_key_is_deterministic() -> None:
    command, device = KeyPair.generate(), X25519PrivateKey.generate()
    fleet = fleet_kex_key(command)
    on_fleet = mac_key(
        fleet, device.public_key(), "d1", raw_public(device.public_key()),
        raw_public(fleet.public_key()),
    )  # fmt: skip
    assert on_fleet == agreed(command, device)
    assert raw_public(fleet_kex_key(command).public_key()) == raw_public(fleet.public_key())
    assert agreed(command, device, "d2") != on_fleet  # bound to the device id
    assert agreed(KeyPair.generate(), device) != on_fleet


def test_a_mac_envelope_verifies_only_on_its_topic_body_and_key() -> None:
    k = agreed(KeyPair.generate(), X25519PrivateKey.generate())
    signer = DeviceSigner("d1", KeyPair.generate(), boot=3)
    signer.use_mac(k, "ab" * 8)
    payload = signer.sign(TOPIC, b'{"device_id":"d1","state":"installed"}')
    env = open_envelope(payload)
    assert env is not None and env.scheme == MAC and (env.boot, env.seq) == (3, 1)
    assert env.key_id == "ab" * 8
    assert verify_mac(env, TOPIC, k)
    assert not verify_mac(env, "edgefleet/devices/d1/telemetry/metrics", k)
    assert not verify_mac(env, TOPIC, bytes(32))
    assert not verify_envelope(env, TOPIC, signer.key.public)  # never taken for Ed25519
    forged = open_envelope(payload.replace(b"installed", b"failed"))
    assert forged is not None and not verify_mac(forged, TOPIC, k)
    # states keep Ed25519 (they carry the keys)
    state = open_envelope(signer.sign("edgefleet/devices/d1/state", b'{"a":1}', seq=5))
    assert state is not None and state.scheme == "ed25519"


def test_the_device_takes_only_an_announcement_signed_by_a_command_key() -> None:
    command = KeyPair.generate()
    trust = TrustStore.from_keys([command.public], role="command")
    good = announce(command, NOW).to_json()
    got = open_announcement(good, trust, NOW)
    assert not isinstance(got, str)
    assert kex_id(got[1]) == kex_id(fleet_kex_key(command).public_key())
    # signed by another key (a broker client's, a device's): ignored
    assert open_announcement(announce(KeyPair.generate(), NOW).to_json(), trust, NOW) == (
        "key_unknown"
    )
    # someone else's X25519 key under the fleet's signature
    tampered = good.replace(
        good.split(b'"x25519":"')[1].split(b'"')[0],
        announce(KeyPair.generate(), NOW).x25519.encode(),
    )
    assert open_announcement(tampered, trust, NOW) == "signature_invalid"
    assert open_announcement(b"{" + b" " * 2000 + b"}", trust, NOW) == "oversize"
    assert open_announcement(b"[1]", trust, NOW) == "malformed"
    late = announce(command, NOW + timedelta(hours=1)).to_json()
    assert open_announcement(late, trust, NOW) == "future"
