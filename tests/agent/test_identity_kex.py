"""The device keeps the fleet announcement it verified (0600) and agrees again from it at the
next start, checked against the command keys it trusts then: a revoked signer ends it."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from agent.identity import ANNOUNCEMENT_FILE, DeviceIdentity
from protocol import KeyPair, TrustStore
from protocol.device_mac import announce, fleet_kex_key, kex_id

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)


def test_the_agreed_fleet_key_survives_a_restart_until_its_signer_is_revoked(
    tmp_path: Path,
) -> None:
    command_key = KeyPair.generate()
    trust = TrustStore.from_keys([command_key.public], role="command")
    fid = kex_id(fleet_kex_key(command_key).public_key())
    ident = DeviceIdentity("d1", tmp_path)
    assert ident.restore_kex(trust, NOW) == "none" and ident.fleet_kex is None
    assert ident.accept_kex(announce(command_key, NOW).to_json(), trust, NOW) is None
    assert ident.fleet_kex == fid and ident.agreed[fid].signer == command_key.key_id
    assert (tmp_path / ANNOUNCEMENT_FILE).stat().st_mode & 0o777 == 0o600
    k = ident.agreed[fid].key

    again = DeviceIdentity("d1", tmp_path)  # the next start: same keys, agreed at once
    assert again.restore_kex(trust, NOW) is None
    assert again.fleet_kex == fid and again.agreed[fid].key == k

    revoked = TrustStore.from_keys([command_key.public], [command_key.key_id], role="command")
    third = DeviceIdentity("d1", tmp_path)
    assert third.restore_kex(revoked, NOW) == "key_revoked"
    assert third.fleet_kex is None and third.agreed == {}

    # an announcement by a stranger is not saved over the good one
    stranger = KeyPair.generate()
    assert again.accept_kex(announce(stranger, NOW).to_json(), trust, NOW) == "key_unknown"
    assert DeviceIdentity("d1", tmp_path).restore_kex(trust, NOW) is None
