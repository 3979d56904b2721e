"""What a command's signature covers, and commands MAC'd with a device's agreed key.

The signed bytes are a short canonical envelope (device id, command id, kind, rollout id,
``ts``, ``issued_at``, ``expires_at``) plus the sha256 of the canonical JSON of everything
else in the command; a golden vector pins the format. A MAC'd command verifies only with
the key agreed with a fleet key that a trusted, unrevoked command key announced.
"""

from __future__ import annotations

import base64
import hashlib
from datetime import datetime, timedelta, timezone

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import KeyPair, TrustStore
from protocol.device_auth import mac_payload
from protocol.device_mac import AgreedKey, announce, fleet_kex_key, kex_id, mac_key, raw_public
from protocol.errors import ReasonCode, SignatureError
from protocol.manifest import canonical_json
from protocol.messages import (
    COMMAND_DOMAIN,
    Command,
    RollbackPayload,
    command_payload_sha256,
    command_signing_bytes,
    decode,
    mac_command,
    sign_command,
    verify_command,
)
from protocol.signing import Signature

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)


def rollback(device: str = "d1", reason: str = "halt") -> Command:
    return Command(
        command_id="r1:d1:rollback:1",
        device_id=device,
        kind="rollback",
        rollout_id="r1",
        ts=T0,
        rollback=RollbackPayload(reason=reason, to_release=3),
    )


def test_signed_bytes_are_the_envelope_and_the_payload_digest_golden() -> None:
    cmd = rollback().model_copy(update={"issued_at": T0, "expires_at": T0 + timedelta(seconds=60)})
    payload = b'{"rollback":{"reason":"halt","to_release":3}}'
    digest = hashlib.sha256(payload).hexdigest()
    assert command_payload_sha256(cmd) == digest
    expected = (
        b"edgefleet-command/2\x00"
        b'{"command_id":"r1:d1:rollback:1","device_id":"d1",'
        b'"expires_at":"2026-11-30T12:01:00Z","issued_at":"2026-11-30T12:00:00Z",'
        b'"kind":"rollback","payload_sha256":"' + digest.encode() + b'",'
        b'"rollout_id":"r1","ts":"2026-11-30T12:00:00Z"}'
    )
    assert command_signing_bytes(cmd) == expected
    assert command_signing_bytes(cmd, digest) == expected


def test_the_payload_digest_is_shared_by_devices_and_covers_every_payload_field() -> None:
    a, b = rollback("d1"), rollback("d2")
    assert command_payload_sha256(a) == command_payload_sha256(b)
    assert command_signing_bytes(a) != command_signing_bytes(b)
    assert command_payload_sha256(rollback(reason="other")) != command_payload_sha256(a)
    config = Command(command_id="c", device_id="d1", kind="config", config={"a": 1})
    changed = config.model_copy(update={"config": {"a": 2}})
    assert command_payload_sha256(config) != command_payload_sha256(changed)


@settings(max_examples=60, deadline=None)
@given(
    field=st.sampled_from(
        [
            *("device_id", "command_id", "kind", "rollout_id", "ts", "issued_at", "expires_at"),
            *("reason", "to_release", "config"),
        ]
    ),
    mac=st.booleans(),
)
def test_any_change_to_a_signed_or_macd_command_is_refused(field: str, mac: bool) -> None:
    key = KeyPair.generate()
    trust = TrustStore.from_keys([key.public])
    k = AgreedKey(b"k" * 32, key.key_id)
    agreed = {"f" * 16: k}
    cmd = rollback()
    good = (
        mac_command(cmd, k.key, "f" * 16, now=T0, ttl_s=60)
        if mac
        else sign_command(cmd, key, now=T0, ttl_s=60)
    )
    assert verify_command(decode(Command, good.to_json()), trust, agreed) == key.key_id
    changes = {
        "device_id": {"device_id": "d2"},
        "command_id": {"command_id": "other"},
        "kind": {"kind": "benchmark"},
        "rollout_id": {"rollout_id": "r2"},
        "ts": {"ts": T0 + timedelta(seconds=1)},
        "issued_at": {"issued_at": T0 + timedelta(seconds=1)},
        "expires_at": {"expires_at": T0 + timedelta(days=9)},
        "reason": {"rollback": RollbackPayload(reason="other", to_release=3)},
        "to_release": {"rollback": RollbackPayload(reason="halt", to_release=1)},
        "config": {"config": {"x": 1}},
    }
    bad = good.model_copy(update=changes[field])
    with pytest.raises(SignatureError) as err:
        verify_command(decode(Command, bad.to_json()), trust, agreed)
    assert err.value.reason is ReasonCode.SIGNATURE_INVALID


def agreement(command_key: KeyPair, device_id: str) -> tuple[AgreedKey, str, bytes]:
    """What the device holds after verifying the fleet's announcement: (K, its signer)."""
    device = X25519PrivateKey.generate()
    fleet = fleet_kex_key(command_key).public_key()
    ann = announce(command_key, T0)
    assert ann.signature is not None
    k = mac_key(device, fleet, device_id, raw_public(device.public_key()), raw_public(fleet))
    return AgreedKey(k, ann.signature.key_id), kex_id(fleet), k


def test_a_macd_command_verifies_only_with_the_agreed_key_of_a_trusted_command_key() -> None:
    command_key, bundle_key = KeyPair.generate(), KeyPair.generate()
    trust = TrustStore.from_keys([command_key.public], other_role=[bundle_key.key_id])
    agreed, fid, k = agreement(command_key, "d1")
    cmd = mac_command(rollback(), k, fid, now=T0, ttl_s=60)
    assert cmd.signature is not None and cmd.signature.alg == "hmac-sha256"
    assert verify_command(cmd, trust, {fid: agreed}) == command_key.key_id

    def reason(agreed_keys: dict[str, AgreedKey] | None, store: TrustStore = trust) -> str:
        with pytest.raises(SignatureError) as err:
            verify_command(cmd, store, agreed_keys)
        return err.value.reason.value

    # no agreed key (a device without the announcement), or one for another fleet key
    assert reason(None) == "key_unknown"
    assert reason({"0" * 16: agreed}) == "key_unknown"
    # another device's K (d2 trying to command d1, or a broker client guessing)
    other, _, _ = agreement(command_key, "d2")
    assert reason({fid: other}) == "signature_invalid"
    # the announcement's signer revoked, or no longer trusted: its MACs end with it
    revoked = TrustStore.from_keys([command_key.public], revoked=[command_key.key_id])
    assert reason({fid: agreed}, revoked) == "key_revoked"
    assert reason({fid: agreed}, TrustStore.from_keys([KeyPair.generate().public])) == (
        "key_unknown"
    )
    # a fleet key announced by a bundle key never counts
    by_bundle = AgreedKey(k, bundle_key.key_id)
    assert reason({fid: by_bundle}) == "key_unknown"


def test_a_device_message_mac_cannot_pass_as_a_command_mac() -> None:
    """The same K authenticates both directions; the domains keep them apart."""
    command_key = KeyPair.generate()
    trust = TrustStore.from_keys([command_key.public])
    agreed, fid, k = agreement(command_key, "d1")
    cmd = rollback().model_copy(update={"issued_at": T0, "expires_at": T0 + timedelta(seconds=60)})
    body = command_signing_bytes(cmd)
    assert body.startswith(COMMAND_DOMAIN + b"\0")
    # a device MAC over the same JSON on its command topic
    device_mac = mac_payload(canonical_json({"x": 1}), "edgefleet/devices/d1/cmd", k, fid, 1, 1)
    tag = device_mac.rsplit(b".", 1)[1][:-2]
    sig = Signature(alg="hmac-sha256", key_id=fid, signature=tag.decode())
    forged = decode(Command, cmd.model_copy(update={"signature": sig}).to_json())
    with pytest.raises(SignatureError):
        verify_command(forged, trust, {fid: agreed})
    assert base64.b64decode(tag)  # a well-formed tag, just not for this command
