"""How the fleet authenticates a command to one device: a MAC or an Ed25519 signature.

Both cover the same bytes (:func:`protocol.messages.command_signing_bytes`: a short
envelope with the sha256 of the command's payload). Which one a device gets:

* the HMAC-SHA256 with the key ``K`` the device agreed with the fleet's X25519 key
  (:mod:`protocol.device_mac`) when the device's last authenticated state said it holds
  this fleet's key (:meth:`.device_trust.DeviceTrust.command_key`). ``K`` is known only to
  that device and to holders of the command key (the fleet's X25519 key is derived from it
  and announced signed by it), so a valid MAC proves the command key's holder to the device
  as a signature would — while that command key is trusted and not revoked there, which the
  device checks (:func:`protocol.messages.verify_command`);
* else an Ed25519 signature by the command key (a device that has no agreed key, an
  operator tool, an old agent).

A deploy's payload is the same for every device of a rollout: its sha256 is computed once
per (bundle, chunking, URL) by :mod:`.delivery` and handed in, so each device costs one
small canonical envelope and a MAC (≈ 10 µs) or a signature.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from protocol.messages import Command, mac_command, sign_command
from protocol.signing import KeyPair

if TYPE_CHECKING:
    from .device_trust import DeviceTrust


class CommandSigner:
    def __init__(self, key: KeyPair, devices: DeviceTrust | None = None) -> None:
        self.key = key
        self.devices = devices
        self.macs = 0  # commands authenticated with a MAC
        self.signatures = 0  # ... with an Ed25519 signature

    @property
    def key_id(self) -> str:
        return self.key.key_id

    def sign(
        self,
        cmd: Command,
        *,
        now: datetime | None,
        ttl_s: float,
        payload_sha256: str | None = None,
    ) -> Command:
        """Stamp ``issued_at``/``expires_at`` and authenticate ``cmd`` for its device."""
        agreed = self.devices.command_key(cmd.device_id) if self.devices is not None else None
        if agreed is not None:
            self.macs += 1
            return mac_command(
                cmd, agreed[0], agreed[1], now=now, ttl_s=ttl_s, payload_sha256=payload_sha256
            )
        self.signatures += 1
        return sign_command(cmd, self.key, now=now, ttl_s=ttl_s, payload_sha256=payload_sha256)
