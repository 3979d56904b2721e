"""``FleetService``: the one object that owns the fleet, called by the API, CLI, dashboard and demo.

It holds the registry (:mod:`.repository`), the artifact store, the trust store and the
signing key, the MQTT bridge, the pure rollout engine (one :class:`~.rollout_engine.Rollout`
per active rollout, in memory, persisted after every change), the drift engine and the
Prometheus exporter (both built by :mod:`.drift` and :mod:`.telemetry.prometheus` when
present). :meth:`tick` drives the engines; :meth:`start` runs it in a background thread
together with the bridge.

Every method returns plain dicts (JSON-ready) and raises :class:`~.errors.FleetError`
subclasses for bad input. Methods are thread-safe (one lock around the engine state).
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from protocol.bundle import read_bundle, verify_bundle
from protocol.device_mac import announce, fleet_kex_key
from protocol.errors import BundleError, EdgefleetError, ProtocolError
from protocol.messages import Alert, CommandStatus, DeviceState, MetricsReport, SketchReport
from protocol.signing import KeyPair, TrustStore, read_private_key, read_public_key
from protocol.sketches import SketchSet
from protocol.topics import Topics
from protocol.transport import Transport

from . import auth
from .artifacts import ArtifactStore
from .bridge import Bridge
from .command_signing import CommandSigner
from .config import FleetConfig
from .delivery import Sender, command_id, deploy_command, parse_command_id, rollback_command
from .device_trust import DeviceTrust
from .errors import BundleRejected, ConfigError, Conflict, InvalidInput, NotFound
from .measures import Measures
from .repository import Repository, open_repository
from .rollout_engine import Decision, Rollout, RolloutSpec, Selector, Telemetry

log = logging.getLogger(__name__)


_FINAL_STATUS = frozenset({"installed", "failed", "rejected", "timed_out", "rolled_back", "done"})


class RolloutRequest(BaseModel):
    """What a client sends to create a rollout; unset thresholds come from the config."""

    bundle: str = Field(description="bundle sha256 (or unique prefix), or name@version")
    rollout_id: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,40}$",
        description="choose the id (stage assignment hashes it); default: random",
    )
    selector: str = Field(default="", description="profile=…,tag=…,id=… (empty: every device)")
    stages: list[float] = Field(default_factory=lambda: [5.0, 25.0, 50.0, 100.0])
    stage_unit: str = "percent"
    success_threshold: float | None = None
    failure_threshold: float | None = None
    min_devices: int | None = None
    soak_s: float | None = None
    device_timeout_s: float | None = None
    max_retries: int | None = None
    rollback_on_halt: bool | None = None
    max_p95_ms: float | None = None
    max_error_rate: float | None = None
    halt_on_drift: bool = False
    hold_on_profile_budget: bool = False
    hold_on_own_drift: bool = False
    accuracy_margin: float | None = None
    min_labels: int = 30


class _NullExporter:
    """Used when fleet_server.telemetry.prometheus is not installed: counts drops only."""

    def __init__(self) -> None:
        self.dropped: dict[str, int] = {}

    def observe_state(self, msg: DeviceState) -> None:
        pass

    def observe_metrics(self, msg: MetricsReport) -> None:
        pass

    def observe_status(self, msg: CommandStatus) -> None:
        pass

    def count_dropped(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def render(self) -> tuple[bytes, str]:
        lines = ["# TYPE edgefleet_messages_dropped_total counter"]
        lines += [
            f'edgefleet_messages_dropped_total{{reason="{k}"}} {v}'
            for k, v in sorted(self.dropped.items())
        ]
        return ("\n".join(lines) + "\n").encode(), "text/plain; version=0.0.4"

    def field_quality(self) -> dict[str, Any]:
        return {}


def _optional_module(name: str) -> Any:
    import importlib

    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and name.startswith(exc.name):
            return None
        raise


class FleetService:
    def __init__(
        self,
        config: FleetConfig,
        repo: Repository | None = None,
        transport: Transport | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.repo: Repository = repo if repo is not None else open_repository(config)
        self.clock = clock
        self.topics = Topics(config.broker.topic_prefix)
        self.artifacts = ArtifactStore(config.artifacts_dir)
        self.trust = self._trust_store()
        self.key = self._signing_key()
        self.transport = transport
        self.sender = (
            Sender(transport, self.topics, config.rollout.chunk_bytes)
            if transport is not None
            else None
        )
        self.devices = DeviceTrust(self.repo, config.devices, clock)
        if self.key is not None:  # devices agree per-device MAC keys with this fleet key
            self.devices.set_kex(fleet_kex_key(self.key))
        # sigcost: commands are MAC'd to devices that hold this fleet's key, else signed
        self.command_signer = None if self.key is None else CommandSigner(self.key, self.devices)
        self.bridge = (
            Bridge(
                transport,
                self.topics,
                self,
                mqtt5=config.broker.mqtt5,
                shared_group=config.broker.shared_group,
                trust=self.devices,
            )
            if transport is not None
            else None
        )
        self.exporter: Any = self._exporter()
        self.drift: Any = self._drift_engine()
        self.measures = Measures(self)  # drift by device/cohort, field accuracy, health alerts
        self.sketches_merged = 0
        self._lock = threading.RLock()  # the engine state; taken before any other lock
        self._buf_lock = threading.Lock()  # leaf lock for the audit/event buffers (drift alerts)
        self._rollouts: dict[str, Rollout] = {}
        self._bundle_cache: dict[str, tuple[Any, bytes]] = {}
        self._dirty: set[str] = set()
        self._audit_buf: list[dict[str, Any]] = []
        self._event_buf: list[dict[str, Any]] = []
        self._resent: dict[tuple[str, str], int] = {}  # (rollout, device) → chunks resent
        self._devices: dict[str, dict[str, Any]] = {
            d["device_id"]: d for d in self.repo.list_devices()
        }
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_drift = 0.0
        self.drift_every_s = 30.0
        for row in self.repo.list_rollouts(["created", "running", "paused", "halted", "succeeded"]):
            full = self.repo.get_rollout(row["rollout_id"])
            if full is not None:
                self._rollouts[row["rollout_id"]] = Rollout.from_dict(full["doc"])
        from .channel_service import ChannelService

        self.channels = ChannelService(self)  # release channels: promotion, late joiners

    # construction helpers -------------------------------------------------------------
    def _trust_store(self) -> TrustStore:
        """The bundle-signing keys; the fleet's own command key is never one of them."""
        try:
            store = TrustStore.from_keys(
                [read_public_key(p) for p in self.config.signing.bundle_keys],
                self.config.signing.revoked,
                role="bundle",
            )
        except OSError as exc:
            raise ConfigError(
                f"signing.bundle_keys: cannot read {exc.filename}: {exc.strerror}"
            ) from None
        except ProtocolError as exc:
            raise ConfigError(f"signing.bundle_keys: {exc}") from None
        return store

    def _signing_key(self) -> KeyPair | None:
        if self.config.signing.command_key is None:
            log.warning("signing.command_key is not set: devices will refuse every command")
            return None
        try:
            key = read_private_key(self.config.signing.command_key)
        except OSError as exc:
            raise ConfigError(
                f"signing.command_key: cannot read {exc.filename}: {exc.strerror}"
            ) from None
        except ProtocolError as exc:
            raise ConfigError(f"signing.command_key: {exc}") from None
        if key.key_id in self.trust.keys:
            raise ConfigError(
                f"signing: the command key {key.key_id} is also listed in signing.bundle_keys; "
                "bundles must be signed by a different (offline) key",
                field="signing.bundle_keys",
            )
        self.trust.other_role.add(key.key_id)  # a bundle signed by it: key_wrong_role
        return key

    def _exporter(self) -> Any:
        mod = _optional_module("fleet_server.telemetry.prometheus")
        return mod.FleetExporter() if mod is not None else _NullExporter()

    def _drift_engine(self) -> Any:
        mod = _optional_module("fleet_server.drift")
        if mod is None:
            return None
        from .repository import drift_database

        cfg = mod.DriftConfig.from_dict(dict(self.config.drift))
        return mod.DriftEngine(
            drift_database(self.config, self.repo), cfg, self.publish_alert, hook=self._drift_hook()
        )

    def _drift_hook(self) -> Callable[[dict[str, Any]], Any] | None:
        hooks = _optional_module("fleet_server.hooks")
        if hooks is None:
            return None
        h = self.config.hooks
        hook: Callable[[dict[str, Any]], Any] | None = hooks.make_hook(
            h.drift_webhook, h.drift_command
        )
        return hook

    # lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Connect to the broker, start ingest and the background tick."""
        if self.transport is not None and self.bridge is not None:
            self.transport.on_connection_change(self._on_connection)
            self.bridge.start()
            self.transport.connect()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="fleet-tick", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        self.flush()
        if self.transport is not None:
            self.transport.close()
        if self.drift is not None:
            self.drift.flush()  # the open window is merged in memory; keep it across restarts
        self.measures.flush()

    def _on_connection(self, up: bool) -> None:
        self._event("broker", "connected to the broker" if up else "lost the broker connection")
        if up:
            self.announce_kex()

    def announce_kex(self) -> None:
        """Publish the fleet's X25519 key, signed by the command key, retained (at every
        connect: start and reconnects). Never waits for the broker (network thread)."""
        if self.key is None or self.transport is None:
            return
        from datetime import datetime, timezone

        msg = announce(self.key, datetime.fromtimestamp(self.clock(), timezone.utc))
        try:
            self.transport.publish(self.topics.kex(), msg.to_json(), qos=1, retain=True)
        except Exception as exc:  # devices keep signing with Ed25519 meanwhile
            log.warning("could not announce the fleet key: %s", exc)

    def _run(self) -> None:
        interval = self.config.rollout.tick_s
        while not self._stop.is_set():
            self._wake.wait(interval)
            self._wake.clear()
            try:
                self.tick()
            except Exception:
                log.exception("fleet tick failed")
            if not self._stop.is_set():
                time.sleep(0.02)  # coalesce a burst of status reports into one tick

    # bundles --------------------------------------------------------------------------
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
            manifest = verify_bundle(bundle, self.trust, now=_dt(self.clock()))
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
            return _bundle_info(other)  # the same bytes again: nothing to do
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
        self._audit(
            actor,
            "bundle.upload",
            f"bundle:{sha}",
            f"{manifest.name} {manifest.version} signed by {bundle.signature.key_id}",
        )
        self.flush()
        ref = bundle.members.get("reference.sketch")
        if self.drift is not None and ref is not None:
            try:
                self.drift.register_reference(
                    manifest.name, manifest.version, SketchSet.from_bytes(ref)
                )
            except EdgefleetError as exc:
                log.warning("bundle %s: reference sketch not registered: %s", sha, exc)
        return _bundle_info(row)

    def list_bundles(self) -> list[dict[str, Any]]:
        return [_bundle_info(r) for r in self.repo.list_bundles()]

    def get_bundle(self, ref: str) -> dict[str, Any]:
        return _bundle_info(self._find_bundle(ref), manifest=True)

    def _find_bundle(self, ref: str) -> dict[str, Any]:
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

    def _loaded_bundle(self, sha: str) -> tuple[Any, bytes]:
        if sha not in self._bundle_cache:
            data = self.artifacts.get(sha)
            self._bundle_cache[sha] = (read_bundle(data), data)
        return self._bundle_cache[sha]

    # devices --------------------------------------------------------------------------
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

    def get_device(self, device_id: str) -> dict[str, Any]:
        """Device detail: registry row, version history, recent metrics, rollout attempts."""
        d = self.repo.get_device(device_id)
        if d is None:
            raise NotFound(f"unknown device {device_id!r}", field="device_id")
        d["history"] = self.repo.device_history(device_id)
        d["metrics"] = self.repo.device_metrics(device_id, limit=20)
        d["rollouts"] = [
            {
                "rollout_id": rid,
                "stage": r.devices[device_id].stage,
                "state": r.devices[device_id].state,
                "reason": r.devices[device_id].reason,
                "attempts": r.devices[device_id].attempts,
            }
            for rid, r in self._snapshot().items()
            if device_id in r.devices
        ]
        d["events"] = self.repo.events(limit=20, device_id=device_id)
        return d

    def tag_device(self, device_id: str, tags: list[str], actor: str = "api") -> dict[str, Any]:
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
            self._devices[device_id] = self.repo.get_device(device_id) or d
        self._audit(actor, "device.tag", f"device:{device_id}", f"tags set to {sorted(set(tags))}")
        self.flush()
        return self.get_device(device_id)

    # rollouts -------------------------------------------------------------------------
    def create_rollout(
        self, req: RolloutRequest, *, actor: str = "api", dry_run: bool = False, force: bool = False
    ) -> dict[str, Any]:
        """Plan a rollout. ``dry_run`` returns the plan without saving anything."""
        bundle = self._find_bundle(req.bundle)
        selector = Selector.parse(req.selector)
        devices = self.repo.list_devices()
        known = {d["device_id"] for d in devices}
        unknown = [i for i in selector.device_ids if i not in known]
        if unknown:
            raise NotFound(f"unknown device {unknown[0]!r} in the selector", field="selector")
        chosen = [d for d in devices if selector.matches(d["device_id"], d["profile"], d["tags"])]
        if req.stage_unit not in ("percent", "count"):
            raise InvalidInput("stage_unit must be percent or count", field="stage_unit")
        d_ = self.config.rollout
        spec = RolloutSpec(
            bundle_sha256=bundle["sha256"],
            selector=selector,
            stages=tuple(req.stages),
            stage_unit=req.stage_unit,  # type: ignore[arg-type]
            success_threshold=_or(req.success_threshold, d_.success_threshold),
            failure_threshold=_or(req.failure_threshold, d_.failure_threshold),
            min_devices=_or(req.min_devices, d_.min_devices),
            soak_s=_or(req.soak_s, d_.soak_s),
            device_timeout_s=_or(req.device_timeout_s, d_.device_timeout_s),
            max_retries=_or(req.max_retries, d_.max_retries),
            rollback_on_halt=_or(req.rollback_on_halt, d_.rollback_on_halt),
            max_p95_ms=req.max_p95_ms,
            max_error_rate=req.max_error_rate,
            halt_on_drift=req.halt_on_drift,
            hold_on_profile_budget=req.hold_on_profile_budget,
            hold_on_own_drift=req.hold_on_own_drift,
            accuracy_margin=req.accuracy_margin,
            min_labels=req.min_labels,
        ).validate()
        expires = _manifest_expiry(bundle)
        if expires is not None and expires <= _dt(self.clock()):
            raise InvalidInput(
                f"bundle {bundle['name']} {bundle['version']} expired at {expires.isoformat()}",
                field="bundle",
            )
        targets = [p for p in bundle["profiles"].split(",") if p]
        off_profile = sorted(
            {d["profile"] for d in chosen if targets and d["profile"] not in targets}
        )
        if off_profile and not force:
            raise InvalidInput(
                f"bundle {bundle['name']} {bundle['version']} was benchmarked for {targets}, "
                f"not for "
                f"{off_profile}; pass force to roll out anyway",
                field="selector",
            )
        rid = req.rollout_id or "r-" + secrets.token_hex(5)
        if req.rollout_id and (rid in self._rollouts or self.repo.get_rollout(rid) is not None):
            raise Conflict(f"rollout {rid} already exists", field="rollout_id")
        now = self.clock()
        busy = self._busy_devices({d["device_id"] for d in chosen})
        if busy:
            rid_, dev = busy
            raise Conflict(
                f"device {dev!r} is in rollout {rid_}, which is still running; pause is not "
                "enough: abort it or wait for it to end",
                field="selector",
            )
        already = [
            d["device_id"]
            for d in chosen
            if d.get("model") == bundle["name"] and d.get("version") == bundle["version"]
        ]
        rollout = Rollout.plan(rid, spec, [d["device_id"] for d in chosen], now, already)
        rollout.dry_run = dry_run
        if dry_run:
            return self._status(rollout, bundle, decisions=False)
        with self._lock:
            self._rollouts[rid] = rollout
            self.repo.save_rollout(rollout.to_dict(), bundle["sha256"])
        target = f"rollout:{rid}"
        self._audit(
            actor,
            "rollout.create",
            target,
            f"{bundle['name']} {bundle['version']} to {len(chosen)} devices ({selector})",
        )
        if off_profile:
            self._audit(
                actor,
                "rollout.force",
                target,
                f"forced onto profiles {off_profile} the bundle was not benchmarked for",
            )
        self.flush()
        return self.rollout_status(rid)

    def _busy_devices(self, wanted: set[str]) -> tuple[str, str] | None:
        with self._lock:
            for rid, r in self._rollouts.items():
                if r.state in ("running", "paused"):
                    for d in sorted(wanted & set(r.devices)):
                        return rid, d
        return None

    def _rollout(self, rollout_id: str) -> Rollout:
        r = self._rollouts.get(rollout_id)
        if r is None:
            row = self.repo.get_rollout(rollout_id)
            if row is None:
                raise NotFound(f"unknown rollout {rollout_id!r}", field="rollout_id")
            r = Rollout.from_dict(row["doc"])
        return r

    def _act(
        self,
        rollout_id: str,
        actor: str,
        action: str,
        fn: Callable[[Rollout, float], list[Decision]],
    ) -> dict[str, Any]:
        with self._lock:
            r = self._rollout(rollout_id)
            now = self.clock()
            self._audit(actor, f"rollout.{action}", f"rollout:{rollout_id}", f"{action} requested")
            decisions = fn(r, now)
            self._rollouts[rollout_id] = r
            self._apply(r, decisions, actor)
            self._persist(r)
            self.flush()
        self._wake.set()
        return self.rollout_status(rollout_id)

    def start_rollout(self, rollout_id: str, actor: str = "api") -> dict[str, Any]:
        return self._act(rollout_id, actor, "start", lambda r, now: r.start(now, self._online()))

    def pause_rollout(self, rollout_id: str, actor: str = "api") -> dict[str, Any]:
        return self._act(rollout_id, actor, "pause", lambda r, now: r.pause(now))

    def resume_rollout(self, rollout_id: str, actor: str = "api") -> dict[str, Any]:
        return self._act(rollout_id, actor, "resume", lambda r, now: r.resume(now, self._online()))

    def abort_rollout(self, rollout_id: str, actor: str = "api") -> dict[str, Any]:
        return self._act(rollout_id, actor, "abort", lambda r, now: r.abort(now))

    def rollback_rollout(self, rollout_id: str, actor: str = "api") -> dict[str, Any]:
        return self._act(rollout_id, actor, "rollback", lambda r, now: r.rollback(now))

    def list_rollouts(self) -> list[dict[str, Any]]:
        rows = self.repo.list_rollouts()
        bundles = {b["sha256"]: b for b in self.repo.list_bundles()}
        with self._lock:
            live = {rid: r.counts() for rid, r in self._rollouts.items()}
        out = []
        for row in rows:
            b = bundles.get(row["bundle_sha256"], {})
            out.append(
                {
                    **row,
                    "bundle": b.get("name"),
                    "version": b.get("version"),
                    "counts": live.get(row["rollout_id"]),
                }
            )
        return out

    def rollout_status(self, rollout_id: str) -> dict[str, Any]:
        """Rollout detail: state, every stage, every device, and the gate decisions with reasons."""
        with self._lock:
            r = self._rollout(rollout_id)
            doc = Rollout.from_dict(r.to_dict())
        bundle = self.repo.get_bundle(doc.spec.bundle_sha256) or {}
        return self._status(doc, bundle)

    def _status(self, r: Rollout, bundle: dict[str, Any], decisions: bool = True) -> dict[str, Any]:
        stages = []
        for s in r.stages:
            states = [r.devices[d].state for d in s.devices]
            stages.append(
                {
                    "index": s.index,
                    "target": s.target,
                    "state": s.state,
                    "devices": len(s.devices),
                    "installed": states.count("installed"),
                    "failed": sum(x in ("failed", "rejected", "timed_out") for x in states),
                    "in_progress": sum(x in ("downloading", "verifying") for x in states),
                    "rolled_back": states.count("rolled_back"),
                    "queued": states.count("queued"),
                    "started_at": s.started_at,
                    "finished_at": s.finished_at,
                    "device_ids": list(s.devices),
                }
            )
        out: dict[str, Any] = {
            "rollout_id": r.rollout_id,
            "state": r.state,
            "reason": r.reason,
            "dry_run": r.dry_run,
            "bundle": {k: bundle.get(k) for k in ("sha256", "name", "version", "release")},
            "spec": r.spec.to_dict(),
            "created_at": r.created_at,
            "updated_at": r.updated_at,
            "counts": r.counts(),
            "total": len(r.devices),
            "stages": stages,
            "devices": [
                {
                    "device_id": d.device_id,
                    "stage": d.stage,
                    "state": d.state,
                    "attempts": d.attempts,
                    "reason": d.reason,
                    "updated_at": d.updated_at,
                }
                for d in sorted(r.devices.values(), key=lambda x: (x.stage, x.device_id))
            ],
        }
        if decisions:
            out["decisions"] = [
                a
                for a in self.repo.audit(limit=200, target=f"rollout:{r.rollout_id}")
                if a["action"] != "device"
            ]
        return out

    # events and audit -----------------------------------------------------------------
    def events(
        self, limit: int = 100, rollout_id: str | None = None, device_id: str | None = None
    ) -> list[dict[str, Any]]:
        self.flush()
        return self.repo.events(limit=limit, rollout_id=rollout_id, device_id=device_id)

    def audit(self, limit: int = 100, target: str | None = None) -> list[dict[str, Any]]:
        self.flush()
        return self.repo.audit(limit=limit, target=target)

    def _audit(
        self, actor: str, action: str, target: str, reason: str, data: dict[str, Any] | None = None
    ) -> None:
        row = {
            "ts": self.clock(),
            "actor": actor,
            "action": action,
            "target": target,
            "reason": reason,
            "data": data,
        }
        with self._buf_lock:
            self._audit_buf.append(row)

    def _event(self, kind: str, message: str, **data: Any) -> None:
        import json

        row = {
            "ts": self.clock(),
            "kind": kind,
            "message": message,
            "rollout_id": data.pop("rollout_id", None),
            "device_id": data.pop("device_id", None),
            "data": json.dumps(data, default=str),
        }
        with self._buf_lock:
            self._event_buf.append(row)

    def flush(self) -> None:
        """Write buffered audit entries, events and changed rollouts."""
        with self._lock:
            with self._buf_lock:
                audits, self._audit_buf = self._audit_buf, []
                events, self._event_buf = self._event_buf, []
            dirty, self._dirty = self._dirty, set()
            for rid in dirty:
                r = self._rollouts.get(rid)
                if r is not None:
                    self.repo.save_rollout(r.to_dict(), r.spec.bundle_sha256)
            if audits:
                self.repo.add_audits(audits)
            if events:
                self.repo.add_events(events)

    # auth -----------------------------------------------------------------------------
    def authenticate_token(self, token: str) -> str | None:
        h = auth.hash_token(token)
        for t in self.config.auth.tokens:
            if auth.token_matches(token, t.token_hash):
                return t.role
        return self.repo.token_role(h)

    def authenticate_user(self, username: str, password: str) -> str | None:
        """The user's role, or None. An unknown user costs the same scrypt work as a known one."""
        for u in self.config.auth.users:
            if u.username == username:
                return u.role if auth.verify_password(password, u.password_hash) else None
        row = self.repo.get_user(username)
        if row is None:
            auth.burn_password_check(password)
            return None
        if auth.verify_password(password, row["password_hash"]):
            return str(row["role"])
        return None

    def create_token(self, role: str, name: str = "", actor: str = "cli") -> str:
        if role not in auth.ROLES:
            raise InvalidInput(f"role must be one of {', '.join(auth.ROLES)}", field="role")
        token = auth.new_token()
        self.repo.add_token(auth.hash_token(token), role, name, self.clock())
        self._audit(actor, "token.create", f"token:{name or role}", f"{role} token created")
        self.flush()
        return token

    def add_user(self, username: str, password: str, role: str, actor: str = "cli") -> None:
        if role not in auth.ROLES:
            raise InvalidInput(f"role must be one of {', '.join(auth.ROLES)}", field="role")
        self.repo.add_user(username, auth.hash_password(password), role)
        self._audit(actor, "user.add", f"user:{username}", f"{role} user added")
        self.flush()

    # dashboard helpers ----------------------------------------------------------------
    def overview(self) -> dict[str, Any]:
        """Devices by profile, version and online state (one GROUP BY in the registry, not a
        device listing); active rollouts; recent alerts."""
        counts = self.repo.device_counts()
        active = [r for r in self.list_rollouts() if r["state"] in ("created", "running", "paused")]
        alerts = [e for e in self.events(limit=200) if e["kind"] == "alert"][:20]
        return {
            "devices": counts["devices"],
            "by": counts["by"],
            "active_rollouts": active,
            "alerts": alerts,
            "bridge": self.bridge.stats() if self.bridge else {},
        }

    def drift_results(
        self, model: str | None = None, version: str | None = None, limit: int = 50
    ) -> list[dict[str, Any]]:
        if self.drift is None:
            return []
        return list(self.drift.results(model=model, version=version, limit=limit))

    def evaluate_drift(self, model: str, version: str) -> dict[str, Any] | None:
        if self.drift is None:
            raise NotFound("the drift engine is not installed", field="drift")
        res = self.drift.evaluate(model, version, now=self.clock())
        if res is None:
            return None
        return res.to_dict() if hasattr(res, "to_dict") else dict(getattr(res, "__dict__", {}))

    def publish_alert(self, alert: Alert) -> None:
        self._event(
            "alert",
            alert.message,
            rollout_id=alert.rollout_id,
            alert_kind=alert.kind,
            details=alert.details,
        )
        if self.transport is not None:
            self.transport.publish(self.topics.alerts(), alert.to_json(), qos=1)

    # bridge sink ----------------------------------------------------------------------
    def on_state(self, msg: DeviceState) -> None:
        self.exporter.observe_state(msg)
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
            before = self._devices.get(msg.device_id)
            self.repo.upsert_device(msg.device_id, **fields)
            if msg.model is not None and (
                before is None
                or before.get("version") != msg.model.version
                or before.get("model") != msg.model.name
            ):
                self.repo.add_device_history(
                    msg.device_id, now, msg.model.name, msg.model.version, msg.model.release
                )
            if before is None or bool(before.get("online")) != msg.online:
                self._event(
                    "device",
                    f"{msg.device_id} {'online' if msg.online else 'offline'}",
                    device_id=msg.device_id,
                )
            cur = dict(before or {})
            cur.update(fields, online=msg.online)
            self._devices[msg.device_id] = cur
        if msg.online:
            self.channels.observe(msg.device_id, msg.channel)
            self._wake.set()  # a late device gets its pending command on the next tick

    def on_status(self, msg: CommandStatus) -> None:
        self.exporter.observe_status(msg)
        self.measures.on_status(msg)
        parsed = parse_command_id(msg.command_id)
        if msg.state in _FINAL_STATUS:  # every verdict is kept, also for commands we did not send
            why = f" ({msg.reason})" if msg.reason else ""
            self._event(
                "status",
                f"{msg.device_id}: command {msg.command_id} {msg.state}{why}",
                device_id=msg.device_id,
                rollout_id=parsed[0] if parsed else msg.rollout_id,
                command_id=msg.command_id,
                state=msg.state,
                reason=msg.reason,
                detail=msg.detail[:300],
            )
        if parsed is None or not msg.admitted:
            return  # a refusal of a command the device never admitted decides nothing
        rid, device_id, kind, attempt = parsed
        if device_id != msg.device_id:
            raise ProtocolError(f"command {msg.command_id} is not for {msg.device_id}")
        with self._lock:
            r = self._rollouts.get(rid)
            if r is None or device_id not in r.devices:
                return
            dev = r.devices[device_id]
            if kind == "deploy" and attempt != dev.attempts:
                return  # a report from an earlier attempt
            missing = (msg.result or {}).get("missing") if msg.state == "downloading" else None
            if (
                kind == "deploy"
                and isinstance(missing, list)
                and self.sender is not None
                and r.state == "running"
                and dev.state in ("queued", "downloading")
            ):
                self._resend(r, device_id, missing)
            decisions = r.on_status(
                device_id, msg.state, self.clock(), kind=kind, reason=msg.reason or msg.detail
            )
            if decisions:
                self._apply(r, decisions, "engine")
                self._dirty.add(rid)
                self._wake.set()

    def _resend(self, r: Rollout, device_id: str, missing: list[Any]) -> None:
        """Resend the chunks a device misses, within its per-rollout budget."""
        assert self.sender is not None
        key = (r.rollout_id, device_id)
        budget = self.config.devices.resend_budget - self._resent.get(key, 0)
        wanted = sorted({i for i in missing if isinstance(i, int) and i >= 0})[: max(budget, 0)]
        if not wanted:
            self.exporter.count_dropped("resend_budget")
            return
        _, data = self._loaded_bundle(r.spec.bundle_sha256)
        n = self.sender.chunks(device_id, data, wanted)
        self._resent[key] = self._resent.get(key, 0) + n
        self._event(
            "delivery", f"resent {n} missing chunks", rollout_id=r.rollout_id, device_id=device_id
        )

    # device identities ----------------------------------------------------------------
    def list_enrolments(self, status: str | None = None) -> list[dict[str, Any]]:
        """Device keys: approved and pending (``status`` filters)."""
        return self.devices.list(status)

    def approve_device(
        self, device_id: str, actor: str = "api", key_id: str | None = None
    ) -> dict[str, Any]:
        """Pin a pending device's key; its kept birth message is applied at once."""
        ident, birth = self.devices.approve(device_id, actor, key_id)
        self._audit(actor, "device.approve", f"device:{device_id}", f"key {ident['key_id']}")
        self.flush()
        if birth is not None:
            if self.bridge is not None:
                self.bridge.deliver("state", birth)
            else:
                self.on_state(birth)
        return ident

    def revoke_device(self, device_id: str, actor: str = "api") -> None:
        """Forget a device's pinned key: its messages are dropped until it enrols again."""
        self.devices.revoke(device_id)
        self._audit(actor, "device.revoke", f"device:{device_id}", "device key forgotten")
        self.flush()

    def on_metrics(self, msg: MetricsReport) -> None:
        self.exporter.observe_metrics(msg)
        self.measures.on_metrics(msg)
        self.repo.add_metrics(
            {
                "device_id": msg.device_id,
                "model": msg.model.name if msg.model else None,
                "version": msg.model.version if msg.model else None,
                "ts": msg.window_end.timestamp(),
                "seq": msg.seq,
                "requests": msg.requests,
                "errors": msg.errors,
                "p95_ms": msg.latency.p95_ms,
                "p50_ms": msg.latency.p50_ms,
                "accuracy": msg.accuracy,
                "feedback": msg.feedback_count,
            }
        )

    def on_sketch(self, msg: SketchReport) -> None:
        if self.drift is not None and self.drift.ingest(msg):
            self.sketches_merged += 1
            self.measures.on_sketch(msg)

    def on_dropped(self, reason: str) -> None:
        self.exporter.count_dropped(reason)

    # the engine driver ----------------------------------------------------------------
    def _online(self) -> set[str]:
        return {d for d, row in self._devices.items() if row.get("online")}

    def _snapshot(self) -> dict[str, Rollout]:
        with self._lock:
            return dict(self._rollouts)

    def tick(self) -> None:
        """Timeouts, gates and pending sends for every live rollout; periodic drift checks."""
        now = self.clock()
        with self._lock:
            online = self._online()
            for rid, r in list(self._rollouts.items()):
                if r.state not in ("running", "paused", "succeeded"):
                    continue
                decisions = r.tick(now, online, self.measures.extend(r, self._telemetry(r), now))
                if decisions:
                    self._apply(r, decisions, "engine")
                    self._dirty.add(rid)
        self.flush()
        self.channels.tick()
        drift_due = self.drift is not None and now - self._last_drift >= self.drift_every_s
        if drift_due:
            self._last_drift = now
            self._evaluate_live_drift(now)
        self.measures.tick(now, drift_due)

    def _evaluate_live_drift(self, now: float) -> None:
        versions = {
            (d.get("model"), d.get("version")) for d in self._devices.values() if d.get("model")
        }
        for model, version in sorted(v for v in versions if v[0] and v[1]):
            try:
                self.drift.evaluate(model, version, now=now)
            except EdgefleetError as exc:
                log.warning("drift evaluation of %s %s failed: %s", model, version, exc)

    def _telemetry(self, r: Rollout) -> Telemetry | None:
        spec = r.spec
        if spec.max_p95_ms is None and spec.max_error_rate is None and not spec.halt_on_drift:
            return None
        bundle = self.repo.get_bundle(spec.bundle_sha256)
        if bundle is None:
            return None
        installed = [d.device_id for d in r.devices.values() if d.state == "installed"]
        started = min(
            (s.started_at for s in r.stages if s.started_at is not None), default=r.created_at
        )
        per = self.repo.metrics_by_device(bundle["name"], bundle["version"], started, installed)
        drift = False
        if spec.halt_on_drift and self.drift is not None:
            drift = bool(self.drift.is_drifting(bundle["name"], bundle["version"]))
        return Telemetry(
            device_p95_ms=tuple(d["p95_ms"] for d in per.values() if d["p95_ms"] is not None),
            device_error_rate=tuple(
                d["error_rate"] for d in per.values() if d["error_rate"] is not None
            ),
            drift=drift,
        )

    def _apply(self, r: Rollout, decisions: list[Decision], actor: str) -> None:
        """Carry out the engine's decisions: send commands, record every reason."""
        target = f"rollout:{r.rollout_id}"
        for d in decisions:
            if d.kind == "send_deploy":
                self._send_deploy(r, d)
            elif d.kind == "send_rollback":
                self._send_rollback(r, d)
            if d.kind in ("rollout", "stage", "gate"):
                self._audit(actor, f"{d.kind}.{d.state}", target, d.reason, d.to_dict())
                self._event(d.kind, d.reason, rollout_id=r.rollout_id, state=d.state, stage=d.stage)
            else:
                self._audit(actor, "device", target, f"{d.device_id}: {d.reason}", d.to_dict())
                self._event(
                    d.kind, d.reason, rollout_id=r.rollout_id, device_id=d.device_id, state=d.state
                )
            if d.kind == "rollout" and d.state == "halted":
                bundle = self.repo.get_bundle(r.spec.bundle_sha256) or {}
                self.publish_alert(
                    Alert(
                        kind="rollout_halted",
                        rollout_id=r.rollout_id,
                        model=bundle.get("name"),
                        version=bundle.get("version"),
                        message=d.reason,
                    )
                )

    def _send_deploy(self, r: Rollout, d: Decision) -> None:
        if self.sender is None or d.device_id is None:
            return
        bundle, data = self._loaded_bundle(r.spec.bundle_sha256)
        mode = self.config.rollout.delivery
        http_url = None
        if self.config.api.public_url and mode in ("http", "both"):
            http_url = (
                f"{self.config.api.public_url.rstrip('/')}/v1/artifacts/{r.spec.bundle_sha256}"
            )
        dev = r.devices.get(d.device_id)
        if dev is not None and dev.previous is None:
            # What the device ran before this rollout: the signed rollback names it.
            dev.previous = self._running_model(d.device_id)
            self._persist(r)
        cmd = deploy_command(
            bundle,
            data,
            device_id=d.device_id,
            rollout_id=r.rollout_id,
            cid=command_id(r.rollout_id, d.device_id, "deploy", d.attempt),
            chunk_size=self.config.rollout.chunk_bytes,
            key=self.command_signer,
            http_url=http_url,
            now=_dt(self.clock()),
            ttl_s=self.config.signing.command_ttl_s,
        )
        self.sender.command(cmd)
        if http_url is None or mode == "both":
            self.sender.chunks(d.device_id, data)

    def _running_model(self, device_id: str) -> dict[str, Any]:
        """The model a device reported last ({} when none): a rollback's target."""
        row = self._devices.get(device_id) or {}
        if not (row.get("model") and row.get("model_sha256")):
            return {}
        return {
            "name": row["model"],
            "version": row.get("version") or "",
            "release": int(row.get("release") or 0),
            "sha256": row["model_sha256"],
        }

    def _send_rollback(self, r: Rollout, d: Decision) -> None:
        if self.sender is None or d.device_id is None:
            return
        dev = r.devices.get(d.device_id)
        cmd = rollback_command(
            device_id=d.device_id,
            rollout_id=r.rollout_id,
            cid=command_id(r.rollout_id, d.device_id, "rollback", 1),
            key=self.command_signer,
            reason=d.reason,
            target=(dev.previous or None) if dev is not None else None,
            now=_dt(self.clock()),
            ttl_s=self.config.signing.rollback_ttl_s,
        )
        self.sender.command(cmd)

    def _persist(self, r: Rollout) -> None:
        self._dirty.add(r.rollout_id)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def _manifest_expiry(bundle: dict[str, Any]) -> Any:
    import json

    from protocol.manifest import Manifest

    try:
        return Manifest.model_validate(json.loads(bundle["manifest"])).expires_at
    except (ValueError, KeyError):
        return None


def _dt(ts: float) -> Any:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(ts, timezone.utc)


def _bundle_info(row: dict[str, Any], manifest: bool = False) -> dict[str, Any]:
    import json

    out = {
        k: row[k]
        for k in (
            "sha256",
            "name",
            "version",
            "release",
            "size",
            "signer",
            "uploaded_at",
            "uploaded_by",
        )
    }
    out["profiles"] = [p for p in (row.get("profiles") or "").split(",") if p]
    if manifest:
        out["manifest"] = json.loads(row["manifest"])
    return out
