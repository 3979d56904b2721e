"""Verify and inspect a bundle file on the host, with the same checks a device runs.

:func:`verify_file` reads the ``.efb`` defensively and runs
:func:`protocol.bundle.verify_bundle` against a trust store built from public key files
and revoked key ids; any refusal is a :class:`protocol.errors.BundleError` carrying a
reason code. :func:`inspect_file` only reads: its summary is *not* a verification.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from protocol.bundle import read_bundle, verify_bundle
from protocol.manifest import Manifest
from protocol.profiles import DeviceProfile
from protocol.signing import TrustStore

from .errors import ToolchainError


@dataclass
class Verified:
    manifest: Manifest
    key_id: str


def verify_file(
    path: Path,
    trusted: Sequence[Path],
    *,
    revoked: Sequence[str] = (),
    profile: DeviceProfile | None = None,
    now: datetime | None = None,
) -> Verified:
    if not trusted:
        raise ToolchainError("verify needs at least one --trust public key")
    try:
        trust = TrustStore.from_files([Path(p) for p in trusted], revoked)
    except OSError as exc:
        raise ToolchainError(f"cannot read public key {exc.filename}: {exc.strerror}") from None
    bundle = read_bundle(Path(path))
    manifest = verify_bundle(bundle, trust, profile=profile, now=now)
    return Verified(manifest=manifest, key_id=bundle.signature.key_id)


def inspect_file(path: Path) -> dict[str, Any]:
    """Everything a person wants to see about a bundle, as plain JSON-able data."""
    bundle = read_bundle(Path(path))
    m = bundle.manifest
    return {
        "file": str(path),
        "signature_key_id": bundle.signature.key_id,
        "verified": False,
        "manifest": m.model_dump(mode="json"),
        "members": {name: len(data) for name, data in sorted(bundle.members.items())},
    }
