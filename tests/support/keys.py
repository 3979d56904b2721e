"""The fleet's command key for tests: one per session, never a bundle-signing key.

Bundles are signed by the session's ``signing_key`` (the bundle role); every command a
test server sends is signed by :data:`COMMAND_KEY` (the command role). Devices pin both,
each in its own role, as real devices do.
"""

from __future__ import annotations

from pathlib import Path

from protocol import KeyPair

COMMAND_KEY = KeyPair.generate()


def write_public(folder: Path, key: KeyPair = COMMAND_KEY) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key.key_id}.pub"
    path.write_bytes(key.public_pem())
    return path


def write_private(folder: Path, key: KeyPair = COMMAND_KEY) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key.key_id}.pem"
    path.write_bytes(key.private_pem())
    path.chmod(0o600)
    return path
