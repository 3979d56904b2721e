"""The device's own identity: its Ed25519 key, its boot counter, private files.

    data_dir/ (0700)
      device_key.pem   the device's private key, created on first start (0600)
      device_kex.key   the device's static X25519 key, raw 32 bytes (0600): its MAC key
                       with the fleet is agreed with it (protocol.device_mac)
      boot             how many times the agent started (the ``boot`` of every signature)
      fleet_kex.json   the last fleet key announcement it verified (0600): re-verified with
                       the command keys at every start, so commands MAC'd with the agreed
                       key are accepted before the retained announcement arrives again,
                       and never after its signer was revoked

The fleet server pins the public key at enrolment (an operator's approval, or an enrolment
token proven in the birth message) and drops every message not signed by it. The key never
leaves the device; ``edgefleet agent status`` shows its key id so an operator can compare
it with what the server shows before approving.

All these files are written 0600 in a 0700 folder whatever the umask (:mod:`protocol.files`).
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from protocol.device_auth import DeviceSigner, enrol_proof, token_hash
from protocol.device_mac import (
    AgreedKey,
    kex_id,
    mac_key,
    open_announcement,
    raw_public,
    x25519_b64,
)
from protocol.files import private_dir
from protocol.signing import KeyPair, TrustStore, load_private_key

from .errors import ConfigError

KEY_FILE = "device_key.pem"
KEX_FILE = "device_kex.key"
BOOT_FILE = "boot"
ANNOUNCEMENT_FILE = "fleet_kex.json"


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def load_or_create_key(data_dir: Path) -> KeyPair:
    path = Path(data_dir) / KEY_FILE
    if path.exists():
        try:
            key = load_private_key(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"device key {path}: {exc}") from None
        except Exception as exc:  # ProtocolError: not an Ed25519 PEM
            raise ConfigError(f"device key {path}: {exc}") from None
        os.chmod(path, 0o600)
        return key
    key = KeyPair.generate()
    _write_private(path, key.private_pem())
    return key


def load_or_create_kex(data_dir: Path) -> X25519PrivateKey:
    path = Path(data_dir) / KEX_FILE
    if path.exists():
        raw = path.read_bytes()
        if len(raw) != 32:
            raise ConfigError(f"device X25519 key {path}: not 32 raw bytes")
        os.chmod(path, 0o600)
        return X25519PrivateKey.from_private_bytes(raw)
    key = X25519PrivateKey.generate()
    from cryptography.hazmat.primitives import serialization

    _write_private(
        path,
        key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        ),
    )
    return key


def next_boot(data_dir: Path) -> int:
    """Increment and return the persisted boot counter."""
    path = Path(data_dir) / BOOT_FILE
    try:
        boot = int(path.read_text(encoding="ascii").strip() or 0) + 1
    except (OSError, ValueError):
        boot = 1
    _write_private(path, str(boot).encode())
    return boot


class DeviceIdentity:
    """Key, boot number and enrolment proof of one device; signs through :attr:`signer`."""

    def __init__(self, device_id: str, data_dir: Path, token: str | None = None) -> None:
        private_dir(data_dir)
        self.device_id = device_id
        self.key = load_or_create_key(data_dir)
        self.boot = next_boot(data_dir)
        self.signer = DeviceSigner(device_id, self.key, self.boot)
        self.proof = enrol_proof(token_hash(token), device_id, self.key.key_id) if token else None
        self.kex = load_or_create_kex(data_dir)
        self.kex_issued: datetime | None = None  # of the fleet announcement in use
        self.data_dir = Path(data_dir)
        self.agreed: dict[str, AgreedKey] = {}  # fleet kex id → K (commands' MACs)
        self._saved = b""  # the announcement in fleet_kex.json

    def x25519_b64(self) -> str:
        return x25519_b64(self.kex.public_key())

    def accept_kex(
        self, payload: bytes, command_trust: TrustStore, now: datetime, *, save: bool = True
    ) -> str | None:
        """A fleet key announcement: agree the MAC key when it verifies; else a reason.

        An announcement older than the one in use is ignored (``stale``); until one is
        accepted the device keeps signing every message with Ed25519, and takes only
        Ed25519-signed commands. The agreed key also authenticates commands
        (:attr:`agreed`, for :func:`protocol.messages.verify_command`): only while the
        command key that signed the announcement is trusted and not revoked.
        """
        got = open_announcement(payload, command_trust, now)
        if isinstance(got, str):
            return got
        msg, peer = got
        if self.kex_issued is not None and msg.issued_at < self.kex_issued:
            return "stale"
        own = raw_public(self.kex.public_key())
        k = mac_key(self.kex, peer, self.device_id, own, raw_public(peer))
        fid = kex_id(peer)
        self.signer.use_mac(k, fid)
        self.kex_issued = msg.issued_at
        assert msg.signature is not None  # open_announcement checked it
        if fid not in self.agreed:
            self.agreed.clear()  # the dict object is shared with the update machine
        self.agreed[fid] = AgreedKey(k, msg.signature.key_id)
        if save and payload != self._saved:  # the same one comes back at every connect
            try:
                _write_private(self.data_dir / ANNOUNCEMENT_FILE, payload)
                self._saved = payload
            except OSError:  # the retained announcement brings it back next time
                pass
        return None

    def restore_kex(self, command_trust: TrustStore, now: datetime) -> str | None:
        """Agree again from the announcement saved by the last run (checked like a new one)."""
        path = self.data_dir / ANNOUNCEMENT_FILE
        try:
            payload = path.read_bytes()[:4096]
        except OSError:
            return "none"
        why = self.accept_kex(payload, command_trust, now, save=False)
        if why is None:
            self._saved = payload
        return why

    @property
    def fleet_kex(self) -> str | None:
        """The id of the fleet X25519 key the MAC key was agreed with (None: not yet)."""
        agreed = self.signer.mac
        return agreed[1] if agreed is not None else None

    @property
    def key_id(self) -> str:
        return self.key.key_id
