"""The registry: the bundles the fleet has and the devices in it.

:class:`Registry` verifies and stores uploaded bundles (the artifact store holds the bytes,
the repository the rows), finds them by sha256 prefix or ``name@version``, and keeps the
devices: their registry rows, a copy in memory of the newest row of each device (what the
rollout driver asks "who is online" and "what does it run" of, many times a tick), their
tags and their enrolled identities (:class:`~.device_trust.DeviceTrust`).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from protocol.bundle import read_bundle, verify_bundle
from protocol.errors import BundleError, EdgefleetError
from protocol.messages import DeviceState
from protocol.signing import TrustStore
from protocol.sketches import SketchSet

from .artifacts import ArtifactStore
from .audit_log import AuditLog
from .config import FleetConfig
from .device_trust import DeviceTrust
from .drift import DriftEngine
from .errors import BundleRejected, Conflict, InvalidInput, NotFound
from .repository import Repository
from .views import bundle_info

log = logging.getLogger(__name__)


class Registry:
    def __init__(
        self,
        config: FleetConfig,
        repo: Repository,
        clock: Callable[[], float],
        audit_log: AuditLog,
        trust: TrustStore,
        identities: DeviceTrust,
        drift: DriftEngine,
    ) -> None:
        self.config = config
        self.repo = repo
        self.clock = clock
        self.audit_log = audit_log
        self.trust = trust
        self.identities = identities
        self.drift = drift
        self.artifacts = ArtifactStore(config.artifacts_dir, repo)  # shared on PostgreSQL
        self._bundle_cache: dict[str, tuple[Any, bytes]] = {}
        self._lock = threading.Lock()  # the device rows in memory (a leaf lock)
        self._rows: dict[str, dict[str, Any]] = {d["device_id"]: d for d in repo.list_devices()}

    # bundles ------------------------------------------------------------------------------
    def upload_bundle(
        self, data: bytes | Path, actor: str = "api", *, sha256: str | None = None
    ) -> dict[str, Any]:
        """Verify against the fleet's trusted keys, store, and register the drift reference.

        ``data`` is the bundle's bytes or a file the API streamed it into (with its
        ``sha256``). The same name@version with other bytes is a conflict (409); the same
        bytes again return the stored bundle.
        """
        if not self.trust.keys:
            raise BundleRejected(
                "the fleet trusts no bundle key (set signing.bundle_keys)", reason="key_unknown"
            )
        try:
            bundle = read_bundle(data, trust=self.trust)
            manifest = verify_bundle(
                bundle, self.trust, now=datetime.fromtimestamp(self.clock(), timezone.utc)
            )
        except BundleError as exc:
            raise BundleRejected(f"bundle refused: {exc}", reason=exc.reason.value) from None
        except EdgefleetError as exc:
            raise BundleRejected(f"bundle refused: {exc}", reason="manifest_invalid") from None
        if isinstance(data, bytes):
            sha, size = hashlib.sha256(data).hexdigest(), len(data)
        else:
            size = Path(data).stat().st_size
            sha = sha256 or _file_sha256(Path(data))
        for other in self.repo.list_bundles():
            if (other["name"], other["version"]) != (manifest.name, manifest.version):
                continue
            if other["sha256"] != sha:
                raise Conflict(
                    f"{manifest.name}@{manifest.version} is already uploaded with other bytes "
                    f"(sha256 {other['sha256'][:12]}…); give the new build a new version",
                    field="bundle",
                )
            if not self.artifacts.has(sha):  # registered by another process: keep the bytes here
                if isinstance(data, bytes):
                    self.artifacts.put(data)
                else:
                    self.artifacts.adopt(Path(data), sha)
            return bundle_info(other)  # the same bytes again: nothing else to do
        if isinstance(data, bytes):
            sha = self.artifacts.put(data)
        else:
            self.artifacts.adopt(Path(data), sha)
        row = {
            "sha256": sha,
            "name": manifest.name,
            "version": manifest.version,
            "release": manifest.release,
            "size": size,
            "model_sha256": manifest.file(manifest.model.path).sha256,
            "profiles": ",".join(manifest.profiles),
            "manifest": bundle.manifest_bytes.decode(),
            "signer": bundle.signature.key_id,
            "uploaded_at": self.clock(),
            "uploaded_by": actor,
        }
        self.repo.add_bundle(row)
        self.audit_log.audit(
            actor,
            "bundle.upload",
            f"bundle:{sha}",
            f"{manifest.name} {manifest.version} signed by {bundle.signature.key_id}",
        )
        self.audit_log.flush()
        ref = bundle.members.get("reference.sketch")
        if ref is not None:
            try:
                self.drift.register_reference(
                    manifest.name, manifest.version, SketchSet.from_bytes(ref)
                )
            except EdgefleetError as exc:
                log.warning("bundle %s: reference sketch not registered: %s", sha, exc)
        return bundle_info(row)

    def list_bundles(self) -> list[dict[str, Any]]:
        return [bundle_info(r) for r in self.repo.list_bundles()]

    def get_bundle(self, ref: str) -> dict[str, Any]:
        return bundle_info(self.find_bundle(ref), manifest=True)

    def find_bundle(self, ref: str) -> dict[str, Any]:
        """The bundle row a sha256 prefix (6+ characters) or ``name@version`` names."""
        ref = ref.strip()
        rows = self.repo.list_bundles()
        if "@" in ref:
            name, _, version = ref.partition("@")
            hits = [r for r in rows if r["name"] == name and r["version"] == version]
        else:
            hits = [r for r in rows if r["sha256"].startswith(ref.lower())] if len(ref) >= 6 else []
        if not hits:
            raise NotFound(
                f"no bundle {ref!r} (use a sha256 prefix or name@version)", field="bundle"
            )
        if len(hits) > 1:
            raise InvalidInput(f"bundle reference {ref!r} is ambiguous", field="bundle")
        return hits[0]

    def loaded_bundle(self, sha: str) -> tuple[Any, bytes]:
        """The parsed bundle and its bytes, read once per process."""
        if sha not in self._bundle_cache:
            data = self.artifacts.get(sha)
            self._bundle_cache[sha] = (read_bundle(data), data)
        return self._bundle_cache[sha]

    # devices ------------------------------------------------------------------------------
    def list_devices(
        self,
        profile: str | None = None,
        tag: str | None = None,
        version: str | None = None,
        online: bool | None = None,
    ) -> list[dict[str, Any]]:
        out = []
        for d in self.repo.list_devices():
            if profile and d["profile"] != profile:
                continue
            if tag and tag not in d["tags"]:
                continue
            if version and d.get("version") != version:
                continue
            if online is not None and d["online"] != online:
                continue
            out.append(d)
        return out

    def device(self, device_id: str) -> dict[str, Any]:
        """A device's registry row with its version history, recent metrics and events."""
        d = self.repo.get_device(device_id)
        if d is None:
            raise NotFound(f"unknown device {device_id!r}", field="device_id")
        d["history"] = self.repo.device_history(device_id)
        d["metrics"] = self.repo.device_metrics(device_id, limit=20)
        d["events"] = self.repo.events(limit=20, device_id=device_id)
        return d

    def tag_device(self, device_id: str, tags: list[str], actor: str = "api") -> None:
        d = self.repo.get_device(device_id)
        if d is None:
            raise NotFound(f"unknown device {device_id!r}", field="device_id")
        bad = [t for t in tags if not t or "," in t or "=" in t or len(t) > 64]
        if bad:
            raise InvalidInput(
                f"tags must be 1–64 characters without ',' or '=': {bad}", field="tags"
            )
        self.repo.upsert_device(device_id, manual_tags=sorted(set(tags)))
        with self._lock:
            self._rows[device_id] = self.repo.get_device(device_id) or d
        self.audit_log.audit(
            actor, "device.tag", f"device:{device_id}", f"tags set to {sorted(set(tags))}"
        )
        self.audit_log.flush()

    def observe_state(self, msg: DeviceState, *, record: bool = True) -> None:
        """Record a device's retained state (birth, will, model change): its registry row
        and, with ``record`` (the process holding the rollout tick), a history line when its
        model changed and an event when it came or went."""
        now = self.clock()
        fields: dict[str, Any] = {
            "online": int(msg.online),
            "last_seen": now,
            "state": "online" if msg.online else "offline",
        }
        if msg.online or msg.profile:
            fields.update(
                profile=msg.profile,
                tags=msg.tags,
                agent_version=msg.agent_version,
                api_url=msg.api_url or "",
            )
        if msg.model is not None:
            fields.update(
                model=msg.model.name,
                version=msg.model.version,
                release=msg.model.release,
                model_sha256=msg.model.sha256 or "",
            )
        with self._lock:
            before = self._rows.get(msg.device_id)
            self.repo.upsert_device(msg.device_id, **fields)
            if (
                record
                and msg.model is not None
                and (
                    before is None
                    or before.get("version") != msg.model.version
                    or before.get("model") != msg.model.name
                )
            ):
                self.repo.add_device_history(
                    msg.device_id, now, msg.model.name, msg.model.version, msg.model.release
                )
            if record and (before is None or bool(before.get("online")) != msg.online):
                self.audit_log.event(
                    "device",
                    f"{msg.device_id} {'online' if msg.online else 'offline'}",
                    device_id=msg.device_id,
                )
            cur = dict(before or {})
            cur.update(fields, online=msg.online)
            self._rows[msg.device_id] = cur

    def rows(self) -> dict[str, dict[str, Any]]:
        """A copy of the newest row of every known device, by id."""
        with self._lock:
            return {k: dict(v) for k, v in self._rows.items()}

    def online(self) -> set[str]:
        with self._lock:
            return {d for d, row in self._rows.items() if row.get("online")}

    def running_versions(self) -> set[tuple[str, str]]:
        """Every (model, version) some known device reports running."""
        with self._lock:
            return {
                (str(d["model"]), str(d["version"]))
                for d in self._rows.values()
                if d.get("model") and d.get("version")
            }

    def running_model(self, device_id: str) -> dict[str, Any]:
        """The model a device reported last ({} when none): a rollback's target."""
        with self._lock:
            row = self._rows.get(device_id) or {}
        if not (row.get("model") and row.get("model_sha256")):
            return {}
        return {
            "name": row["model"],
            "version": row.get("version") or "",
            "release": int(row.get("release") or 0),
            "sha256": row["model_sha256"],
        }

    # device identities --------------------------------------------------------------------
    def list_enrolments(self, status: str | None = None) -> list[dict[str, Any]]:
        """Device keys: approved and pending (``status`` filters)."""
        return self.identities.list(status)

    def approve_device(
        self, device_id: str, actor: str = "api", key_id: str | None = None
    ) -> tuple[dict[str, Any], DeviceState | None]:
        """Pin a pending device's key; returns its identity and the birth message it sent
        while pending (the caller applies it)."""
        ident, birth = self.identities.approve(device_id, actor, key_id)
        self.audit_log.audit(
            actor, "device.approve", f"device:{device_id}", f"key {ident['key_id']}"
        )
        self.audit_log.flush()
        return ident, birth

    def revoke_device(self, device_id: str, actor: str = "api") -> None:
        """Forget a device's pinned key: its messages are dropped until it enrols again."""
        self.identities.revoke(device_id)
        self.audit_log.audit(actor, "device.revoke", f"device:{device_id}", "device key forgotten")
        self.audit_log.flush()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
