"""The device's own identity: its Ed25519 key, its boot counter, private files.

    data_dir/ (0700)
      device_key.pem   the device's private key, created on first start (0600)
      boot             how many times the agent started (the ``boot`` of every signature)

The fleet server pins the public key at enrolment (an operator's approval, or an enrolment
token proven in the birth message) and drops every message not signed by it. The key never
leaves the device; ``edgefleet agent status`` shows its key id so an operator can compare
it with what the server shows before approving.

Both files are written 0600 in a 0700 folder whatever the umask (:mod:`agent.files`).
"""

from __future__ import annotations

import os
from pathlib import Path

from protocol.device_auth import DeviceSigner, enrol_proof, token_hash
from protocol.signing import KeyPair, load_private_key

from .errors import ConfigError
from .files import private_dir

KEY_FILE = "device_key.pem"
BOOT_FILE = "boot"


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

    @property
    def key_id(self) -> str:
        return self.key.key_id
