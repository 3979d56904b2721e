"""Signing keys on disk: ``NAME.key`` (PKCS8 PEM, mode 0600) and ``NAME.pub``.

The private key file is created with ``os.open(..., O_CREAT | O_EXCL, 0o600)`` so it is
never readable by others, not even for an instant, and an existing file is never
overwritten. Key material is never printed or logged; only the key id is returned.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from protocol.errors import ProtocolError
from protocol.signing import KeyPair, load_private_key

from .errors import ToolchainError


@dataclass(frozen=True)
class GeneratedKey:
    key_id: str
    private_path: Path
    public_path: Path


def _write_new(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(path, mode)  # the umask may have narrowed it further; make it exact


def generate_keys(out_dir: Path, name: str = "edgefleet") -> GeneratedKey:
    """Write a new Ed25519 key pair to ``out_dir``; refuse to overwrite existing files."""
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise ToolchainError(f"key name {name!r} must be a plain file name")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    private_path, public_path = out / f"{name}.key", out / f"{name}.pub"
    for path in (private_path, public_path):
        if path.exists():
            raise ToolchainError(f"{path} already exists; refusing to overwrite a key")
    pair = KeyPair.generate()
    _write_new(private_path, pair.private_pem(), 0o600)
    try:
        _write_new(public_path, pair.public_pem(), 0o644)
    except OSError:
        private_path.unlink(missing_ok=True)
        raise
    return GeneratedKey(key_id=pair.key_id, private_path=private_path, public_path=public_path)


def load_signing_key(path: Path) -> KeyPair:
    """The private key at ``path``, or one readable error (a .pub given, missing, not PEM).

    ``build`` and ``package`` call this before any other work, so a wrong ``--key`` is
    refused at once rather than after the conversion.
    """
    p = Path(path)
    if not p.is_file():
        raise ToolchainError(
            f"signing key {p} does not exist (create one with 'edgefleet keys generate')"
        )
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ToolchainError(f"cannot read signing key {p}: {exc.strerror}") from None
    if b"PUBLIC KEY" in data:
        raise ToolchainError(
            f"{p} is a public key; --key needs the private key "
            f"(e.g. {p.with_suffix('.key')}, made by 'edgefleet keys generate')"
        )
    try:
        return load_private_key(data)
    except ProtocolError as exc:
        raise ToolchainError(f"{p} is not an Ed25519 private key: {exc}") from None
