"""The ``.efb`` bundle: a zip of flat members, read defensively.

Layout: ``manifest.json``, ``manifest.sig``, the model file, ``reference.sketch``,
``model_card.md``. :func:`pack_bundle` builds the bytes (stored, deterministic order and
timestamps); :func:`read_bundle` opens a file it is handed and refuses hostile archives
before anything is trusted: absolute or ``..`` paths, directories, duplicate names,
members over ``max_member_bytes`` (checked on the declared size *and* while reading, so a
lying header does not help), more than ``max_members`` members, and missing files. Given
a trust store it verifies the manifest's signature before inflating any other member, and
inflates each member streamed, capped at the size the manifest declares for it.

:func:`verify_bundle` then runs the device-side checks in order — signature by a trusted,
unrevoked key → every file hash and size → release newer than installed (unless a signed
rollback) → same model name as installed (unless ``replace_model``) → validity window →
profile compatibility — and raises :class:`BundleError` with the first failing
:class:`ReasonCode`. Anti-rollback is per model name: ``installed`` maps each model name
to the highest release installed of it. Loading the model and the smoke tests are the
agent's job, since they need a runtime.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO, Union

from .errors import ArchiveError, BundleError, ProtocolError, ReasonCode
from .manifest import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    Manifest,
    canonical_bytes,
    parse_manifest,
)
from .profiles import DeviceProfile
from .signing import Signature, TrustStore

MAX_MEMBER_BYTES = 512 * 1024 * 1024
MAX_MEMBERS = 32
MAX_MANIFEST_BYTES = 1024 * 1024
MAX_SIGNATURE_BYTES = 4096
_BLOCK = 64 * 1024
_ZIP_DATE = (2020, 1, 1, 0, 0, 0)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pack_bundle(manifest_bytes: bytes, signature: Signature, files: Mapping[str, bytes]) -> bytes:
    """Return the zip bytes of a bundle. ``files`` are the members the manifest lists."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in [(MANIFEST_NAME, manifest_bytes), (SIGNATURE_NAME, signature.to_bytes())]:
            zf.writestr(zipfile.ZipInfo(name, _ZIP_DATE), data)
        for name in sorted(files):
            info = zipfile.ZipInfo(name, _ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, files[name])
    return buf.getvalue()


@dataclass
class Bundle:
    """A bundle read into memory. Nothing here is trusted until :func:`verify_bundle`."""

    manifest_bytes: bytes
    signature: Signature
    members: dict[str, bytes]

    @property
    def manifest(self) -> Manifest:
        return parse_manifest(self.manifest_bytes)

    def model_bytes(self) -> bytes:
        return self.members[self.manifest.model.path]


def _unsafe(name: str) -> str | None:
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "absolute path"
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        return "path escapes the bundle folder"
    if len(parts) > 1 or name.endswith("/"):
        return "nested path (bundle members are flat)"
    if not name or name.startswith("."):
        return "hidden or empty name"
    return None


def _inflate(
    zf: zipfile.ZipFile,
    info: zipfile.ZipInfo,
    cap: int,
    reason: ReasonCode = ReasonCode.ARCHIVE_UNSAFE,
) -> bytes:
    """Inflate one member in blocks, refusing it as soon as it passes ``cap`` bytes
    (``reason``: ``hash_mismatch`` when the cap is the size the signed manifest declares)."""
    if info.file_size > cap:
        raise ArchiveError(
            reason,
            f"member {info.filename!r} declares {info.file_size} bytes (limit {cap})",
        )
    parts: list[bytes] = []
    total = 0
    try:
        with zf.open(info) as fh:
            while True:
                block = fh.read(min(_BLOCK, cap - total + 1))
                if not block:
                    break
                total += len(block)
                if total > cap:
                    raise ArchiveError(
                        reason,
                        f"member {info.filename!r} inflates past {cap} bytes",
                    )
                parts.append(block)
    except (zipfile.BadZipFile, OSError, RuntimeError, NotImplementedError, EOFError) as exc:
        raise ArchiveError(ReasonCode.ARCHIVE_INVALID, f"member {info.filename!r}: {exc}") from None
    return b"".join(parts)


def read_bundle(
    source: Union[str, Path, bytes, BinaryIO],
    *,
    trust: TrustStore | None = None,
    max_member_bytes: int = MAX_MEMBER_BYTES,
    max_members: int = MAX_MEMBERS,
) -> Bundle:
    """Read and sanity-check a bundle; raise :class:`ArchiveError` for hostile archives.

    ``manifest.json`` and ``manifest.sig`` are inflated first (capped at
    :data:`MAX_MANIFEST_BYTES`). With ``trust``, the signature must verify before any other
    member is inflated, every other member must be listed in the manifest, and each is
    inflated in blocks with a cap equal to its declared size: a zip bomb costs neither
    memory nor time. Without ``trust`` (files this process wrote itself) the manifest's
    declared sizes still cap the members it lists.
    """
    fileobj: BinaryIO
    if isinstance(source, (bytes, bytearray)):
        fileobj = io.BytesIO(source)
    elif isinstance(source, (str, Path)):
        try:
            fileobj = open(source, "rb")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise ArchiveError(
                ReasonCode.ARCHIVE_INVALID, f"cannot open bundle: {exc.strerror}"
            ) from None
    else:
        fileobj = source
    try:
        try:
            zf = zipfile.ZipFile(fileobj)
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise ArchiveError(ReasonCode.ARCHIVE_INVALID, f"not a bundle (zip): {exc}") from None
        with zf:
            infos = zf.infolist()
            if len(infos) > max_members:
                raise ArchiveError(
                    ReasonCode.ARCHIVE_UNSAFE, f"{len(infos)} members (limit {max_members})"
                )
            seen: dict[str, zipfile.ZipInfo] = {}
            for info in infos:
                why = _unsafe(info.filename)
                if why:
                    raise ArchiveError(
                        ReasonCode.ARCHIVE_UNSAFE, f"member {info.filename!r}: {why}"
                    )
                if info.filename in seen:
                    raise ArchiveError(
                        ReasonCode.ARCHIVE_UNSAFE, f"duplicate member {info.filename!r}"
                    )
                seen[info.filename] = info
                if info.file_size > max_member_bytes:
                    raise ArchiveError(
                        ReasonCode.ARCHIVE_UNSAFE,
                        f"member {info.filename!r} is {info.file_size} bytes "
                        f"(limit {max_member_bytes})",
                    )
            for required in (MANIFEST_NAME, SIGNATURE_NAME):
                if required not in seen:
                    raise ArchiveError(ReasonCode.MISSING_FILE, f"bundle has no {required}")
            manifest_bytes = _inflate(zf, seen[MANIFEST_NAME], MAX_MANIFEST_BYTES)
            signature = Signature.from_bytes(
                _inflate(zf, seen[SIGNATURE_NAME], MAX_SIGNATURE_BYTES)
            )
            declared: dict[str, int] = {}
            if trust is not None:
                trust.verify(manifest_bytes, signature)  # before any other member inflates
            try:
                declared = {f.path: f.size for f in parse_manifest(manifest_bytes).files}
            except ProtocolError as exc:
                if trust is not None:
                    raise BundleError(ReasonCode.MANIFEST_INVALID, str(exc)) from None
            members: dict[str, bytes] = {}
            for name, info in seen.items():
                if name in (MANIFEST_NAME, SIGNATURE_NAME):
                    continue
                if trust is not None and name not in declared:
                    raise ArchiveError(ReasonCode.ARCHIVE_UNSAFE, f"unlisted member {name!r}")
                listed = declared.get(name)
                if listed is not None and listed <= max_member_bytes:
                    members[name] = _inflate(zf, info, listed, ReasonCode.HASH_MISMATCH)
                else:
                    members[name] = _inflate(zf, info, max_member_bytes)
    finally:
        if isinstance(source, (str, Path)):
            fileobj.close()
    return Bundle(manifest_bytes=manifest_bytes, signature=signature, members=members)


def check_files(manifest: Manifest, members: Mapping[str, bytes]) -> None:
    """Every listed file is present with the listed size and sha256; nothing extra."""
    listed = {f.path for f in manifest.files}
    for entry in manifest.files:
        data = members.get(entry.path)
        if data is None:
            raise BundleError(ReasonCode.MISSING_FILE, f"{entry.path} is listed but missing")
        if len(data) != entry.size or sha256_hex(data) != entry.sha256:
            raise BundleError(ReasonCode.HASH_MISMATCH, f"{entry.path} does not match its sha256")
    extra = sorted(set(members) - listed)
    if extra:
        raise BundleError(ReasonCode.ARCHIVE_UNSAFE, f"unlisted members {extra}")
    if manifest.model.path not in listed:
        raise BundleError(ReasonCode.MISSING_FILE, f"model {manifest.model.path} is not listed")


def check_profile(manifest: Manifest, profile: DeviceProfile) -> None:
    """The bundle targets this profile and the profile has a runtime for its format."""
    if manifest.targets and profile.name not in manifest.profiles:
        raise BundleError(
            ReasonCode.PROFILE_INCOMPATIBLE,
            f"bundle targets {manifest.profiles}, device profile is {profile.name!r}",
        )
    runtime = profile.runtime_for(manifest.model.format)
    if runtime is None:
        raise BundleError(
            ReasonCode.PROFILE_INCOMPATIBLE,
            f"profile {profile.name!r} has no runtime for {manifest.model.format}",
        )
    if manifest.model.opset and runtime.max_opset and manifest.model.opset > runtime.max_opset:
        raise BundleError(
            ReasonCode.PROFILE_INCOMPATIBLE,
            f"model needs opset {manifest.model.opset}, {runtime.name} on {profile.name} "
            f"supports {runtime.max_opset}",
        )
    size_mb = manifest.model.size_bytes / 2**20
    if size_mb > profile.memory_budget_mb:
        raise BundleError(
            ReasonCode.PROFILE_INCOMPATIBLE,
            f"model is {size_mb:.1f} MiB, profile memory budget is {profile.memory_budget_mb} MiB",
        )


def verify_bundle(
    bundle: Bundle,
    trust: TrustStore,
    *,
    now: datetime | None = None,
    installed_release: int | None = None,
    allow_older: bool = False,
    profile: DeviceProfile | None = None,
    active_name: str | None = None,
    installed: Mapping[str, int] | None = None,
    replace_model: bool = False,
) -> Manifest:
    """Run the ordered device checks; return the manifest or raise :class:`BundleError`.

    ``installed_release`` is the active model's release; it applies only when the bundle
    has the active model's name (``active_name``, when given). A bundle of another name is
    refused (``model_name_mismatch``) unless ``replace_model``; then it must be newer than
    the highest release of its own name in ``installed``.
    """
    trust.verify(bundle.manifest_bytes, bundle.signature)
    try:
        manifest = bundle.manifest
    except ProtocolError as exc:
        raise BundleError(ReasonCode.MANIFEST_INVALID, str(exc)) from None
    if canonical_bytes(manifest) != bundle.manifest_bytes:
        raise BundleError(ReasonCode.MANIFEST_INVALID, "manifest bytes are not canonical")
    check_files(manifest, bundle.members)
    floor = installed_release
    if active_name is not None and manifest.name != active_name:
        if not replace_model:
            raise BundleError(
                ReasonCode.MODEL_NAME_MISMATCH,
                f"bundle is model {manifest.name!r}, the device runs {active_name!r} "
                "(replacing it needs replace_model)",
            )
        floor = (installed or {}).get(manifest.name)
    if floor is not None and not allow_older and manifest.release <= floor:
        raise BundleError(
            ReasonCode.RELEASE_NOT_NEWER,
            f"release {manifest.release} is not newer than installed release {floor}",
        )
    now = now or datetime.now(timezone.utc)
    if now >= manifest.expires_at:
        raise BundleError(
            ReasonCode.EXPIRED, f"bundle expired at {manifest.expires_at.isoformat()}"
        )
    if (
        now < manifest.created_at.replace(microsecond=0)
        and (manifest.created_at - now).total_seconds() > 300
    ):
        raise BundleError(
            ReasonCode.NOT_YET_VALID,
            f"bundle is dated in the future ({manifest.created_at.isoformat()})",
        )
    if profile is not None:
        check_profile(manifest, profile)
    return manifest
