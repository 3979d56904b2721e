"""The rollout driver: runs the pure :mod:`.rollout_engine` and carries out its decisions.

It holds one :class:`~.rollout_engine.Rollout` per live rollout in memory (persisted after
every change), turns operator actions, device reports and the clock into engine events,
and carries out the decisions that come back: signed deploy and rollback commands (through
:mod:`.delivery`), audit entries and events with the engine's reasons, and an alert when a
rollout halts. Its lock guards the engine state and is taken before any other lock.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, NamedTuple

from pydantic import BaseModel, Field

from protocol.errors import EdgefleetError, ProtocolError
from protocol.messages import Alert, CommandStatus, ModelRef
from protocol.states import ROLLOUT_ACTIVE, ROLLOUT_LOADED, ROLLOUT_MOVING, ROLLOUT_TICKED

from . import views
from .audit_log import AuditLog
from .command_signing import CommandSigner
from .config import FleetConfig
from .delivery import Sender, command_id, deploy_command, parse_command_id, rollback_command
from .drift import DriftEngine
from .errors import Conflict, InvalidInput, NotFound
from .registry import Registry
from .repository import Repository
from .rollout_engine import (
    Decision,
    DeviceProgress,
    Rollout,
    RolloutSpec,
    Selector,
    Telemetry,
)
from .rollout_saves import SavedRows
from .telemetry.prometheus import FleetExporter

if TYPE_CHECKING:
    from .measures import Measures

log = logging.getLogger(__name__)


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


UNANSWERED = frozenset({"queued"})  # a deploy sent, nothing reported on it yet


class Back(NamedTuple):
    """A device seen online: the model it reports ((name, version); ("", "") for none; None:
    whatever it runs) and since when (the driver's clock; inf: any command sent so far)."""

    runs: tuple[str, str] | None
    at: float


class RolloutDriver:
    def __init__(
        self,
        config: FleetConfig,
        repo: Repository,
        clock: Callable[[], float],
        registry: Registry,
        audit_log: AuditLog,
        measures: Measures,
        drift: DriftEngine,
        exporter: FleetExporter,
        sender: Sender | None,
        signer: CommandSigner | None,
        publish_alert: Callable[[Alert], None],
    ) -> None:
        self.config = config
        self.repo = repo
        self.clock = clock
        self.registry = registry
        self.audit_log = audit_log
        self.measures = measures
        self.drift = drift
        self.exporter = exporter
        self.sender = sender
        self.signer = signer  # signs (or MACs) every command this driver sends
        self.publish_alert = publish_alert
        self.lock = threading.RLock()  # the engine state; taken before any other lock
        self.wake = threading.Event()  # set when a tick is due sooner than the interval
        self.live: dict[str, Rollout] = {}
        self._dirty: set[str] = set()
        self._saved = SavedRows()  # what was last written of each rollout's devices
        # live rollouts another process changed, re-read when next shown (:mod:`.cluster`)
        self.stale: set[str] = set()
        self._resent: dict[tuple[str, str], int] = {}  # (rollout, device) → chunks resent
        # devices whose birth arrived since the last tick → the model each reported
        self._back: dict[str, Back] = {}
        self._born: dict[str, datetime] = {}  # device → the ts of the last birth taken
        self._back_lock = threading.Lock()
        self.live = self.load_live()

    def load_live(self) -> dict[str, Rollout]:
        """The rollouts this process keeps in memory, read from the registry: every one in
        :data:`ROLLOUT_LOADED`, and a rolled-back one whose rollback some device has not
        answered yet, for as long as a rollback stays valid (``signing.rollback_ttl_s``):
        no broker queues it for a device that is away, so its birth must find the rollout
        to be sent it again."""
        out: dict[str, Rollout] = {}
        oldest = self.clock() - self.config.signing.rollback_ttl_s
        for row in self.repo.list_rollouts(sorted(ROLLOUT_LOADED | {"rolled_back"})):
            if row["state"] == "rolled_back" and (row.get("updated_at") or 0.0) < oldest:
                continue
            full = self.repo.get_rollout(row["rollout_id"])
            if full is None:
                continue
            r = Rollout.from_dict(full["doc"])
            if r.state == "rolled_back" and not any(
                d.rollback_sent and d.state == "installed" for d in r.devices.values()
            ):
                continue
            out[row["rollout_id"]] = r
        return out

    # operator actions ---------------------------------------------------------------------
    def create(
        self, req: RolloutRequest, *, actor: str = "api", dry_run: bool = False, force: bool = False
    ) -> dict[str, Any]:
        """Plan a rollout. ``dry_run`` returns the plan without saving anything."""
        bundle = self.registry.find_bundle(req.bundle)
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
        if req.rollout_id and (rid in self.live or self.repo.get_rollout(rid) is not None):
            raise Conflict(f"rollout {rid} already exists", field="rollout_id")
        now = self.clock()
        busy = self.busy_devices({d["device_id"] for d in chosen})
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
            return views.rollout_status(rollout, bundle)
        with self.lock:
            self.live[rid] = rollout
            self._save(rollout)
        target = f"rollout:{rid}"
        self.audit_log.audit(
            actor,
            "rollout.create",
            target,
            f"{bundle['name']} {bundle['version']} to {len(chosen)} devices ({selector})",
        )
        if off_profile:
            self.audit_log.audit(
                actor,
                "rollout.force",
                target,
                f"forced onto profiles {off_profile} the bundle was not benchmarked for",
            )
        self.flush()
        return self.status(rid)

    def busy_devices(self, wanted: set[str]) -> tuple[str, str] | None:
        """(rollout, device) for the first wanted device a running or paused rollout holds."""
        with self.lock:
            self.refresh_stale()
            for rid, r in self.live.items():
                if r.state in ROLLOUT_MOVING:
                    for d in sorted(wanted & set(r.devices)):
                        return rid, d
        return None

    def rollout(self, rollout_id: str) -> Rollout:
        if rollout_id in self.stale:
            with self.lock:
                self.refresh_stale()
        r = self.live.get(rollout_id)
        if r is None:
            row = self.repo.get_rollout(rollout_id)
            if row is None:
                raise NotFound(f"unknown rollout {rollout_id!r}", field="rollout_id")
            r = Rollout.from_dict(row["doc"])
        return r

    def act(self, rollout_id: str, actor: str, action: str) -> dict[str, Any]:
        """Carry out an operator action (start, pause, resume, abort, rollback)."""
        with self.lock:
            r = self.rollout(rollout_id)
            now = self.clock()
            self.audit_log.audit(
                actor, f"rollout.{action}", f"rollout:{rollout_id}", f"{action} requested"
            )
            if action == "start":
                decisions = r.start(now, self.registry.online())
            elif action == "resume":
                decisions = r.resume(now, self.registry.online())
            elif action == "pause":
                decisions = r.pause(now)
            elif action == "abort":
                decisions = r.abort(now)
            elif action == "rollback":
                decisions = r.rollback(now)
            else:
                raise InvalidInput(f"unknown rollout action {action!r}", field="action")
            self.live[rollout_id] = r
            self.apply(r, decisions, actor)
            if action == "resume":
                # a deploy lost before the pause whose device came back meanwhile (a paused
                # rollout sends nothing, so that birth resent nothing) goes again now
                online = dict.fromkeys(self.registry.online(), Back(None, now))
                sent = self.resend_unanswered(online, "resent on resume", [r])
                self._log_resent(sent, "{device}: its unanswered {kind} sent again on resume")
            self._dirty.add(rollout_id)
            self.flush()
        self.wake.set()
        return self.status(rollout_id)

    # views --------------------------------------------------------------------------------
    def rows(self) -> list[dict[str, Any]]:
        """Every rollout in the registry, with live counts for those held here."""
        rows = self.repo.list_rollouts()
        bundles = {b["sha256"]: b for b in self.repo.list_bundles()}
        with self.lock:
            self.refresh_stale()
            live = {rid: r.counts() for rid, r in self.live.items()}
        return views.rollout_rows(rows, bundles, live)

    def status(self, rollout_id: str) -> dict[str, Any]:
        """Rollout detail: state, every stage, every device, and the gate decisions with reasons."""
        with self.lock:
            r = self.rollout(rollout_id)
            doc = Rollout.from_dict(r.to_dict())
        bundle = self.repo.get_bundle(doc.spec.bundle_sha256) or {}
        decisions = self.repo.audit(limit=200, target=f"rollout:{rollout_id}")
        return views.rollout_status(doc, bundle, decisions)

    def snapshot(self) -> dict[str, Rollout]:
        with self.lock:
            self.refresh_stale()
            return dict(self.live)

    def refresh_stale(self) -> None:
        """Re-read the live rollouts another process changed (a process without the tick
        marks them on every tick period and reads them only when it shows one)."""
        with self.lock:
            for rid in sorted(self.stale):
                full = self.repo.get_rollout(rid)
                if full is not None:
                    self.live[rid] = Rollout.from_dict(full["doc"])
                self.stale.discard(rid)

    # device reports -----------------------------------------------------------------------
    def on_status(self, msg: CommandStatus) -> None:
        """A device's report on a command this fleet sent (admitted, addressed to it)."""
        parsed = parse_command_id(msg.command_id)
        if parsed is None or not msg.admitted:
            return  # a refusal of a command the device never admitted decides nothing
        rid, device_id, kind, attempt = parsed
        if device_id != msg.device_id:
            raise ProtocolError(f"command {msg.command_id} is not for {msg.device_id}")
        with self.lock:
            r = self.live.get(rid)
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
                self.apply(r, decisions, "engine")
                self._dirty.add(rid)
                self.wake.set()

    def _resend(self, r: Rollout, device_id: str, missing: list[Any]) -> None:
        """Resend the chunks a device misses, within its per-rollout budget."""
        assert self.sender is not None
        key = (r.rollout_id, device_id)
        budget = self.config.devices.resend_budget - self._resent.get(key, 0)
        wanted = sorted({i for i in missing if isinstance(i, int) and i >= 0})[: max(budget, 0)]
        if not wanted:
            self.exporter.count_dropped("resend_budget")
            return
        _, data = self.registry.loaded_bundle(r.spec.bundle_sha256)
        n = self.sender.republish(data, wanted, self.clock(), r.spec.bundle_sha256)
        self._resent[key] = self._resent.get(key, 0) + n
        if n:  # 0: others asked for them within the interval (delivery.Sender.republish)
            self.audit_log.event(
                "delivery",
                f"re-published {n} missing chunks",
                rollout_id=r.rollout_id,
                device_id=device_id,
            )

    # devices coming back ----------------------------------------------------------------
    def device_back(self, device_id: str, model: ModelRef | None, born: datetime) -> None:
        """A device's birth (it publishes one on every connection): the next tick sends its
        unanswered rollout command again if it went out before this birth. Commands travel
        at QoS 0, so no broker keeps one for a device that was away when it went out; a
        device that did get it answers the copy with its last status and does nothing twice
        (docs/agent.md). Another copy of the same birth (its signed ``ts``; a replay the
        trust check lets through because states are ordered, not windowed) sends nothing."""
        runs = (model.name, model.version) if model else ("", "")
        with self._back_lock:
            if self._born.get(device_id) == born:
                return
            self._born[device_id] = born
            self._back[device_id] = Back(runs, self.clock())
        self.wake.set()

    def resend_unanswered(
        self,
        devices: dict[str, Back],
        why: str,
        rollouts: list[Rollout] | None = None,
        deploy_states: frozenset[str] = UNANSWERED,
    ) -> list[tuple[str, str, str]]:
        """Send again each unanswered deploy or rollback of a live rollout to ``devices``
        whose command went out before the device's :class:`Back`; the same command id,
        signed again with a fresh expiry. A deploy counts as unanswered in
        ``deploy_states``: by default while the device has reported nothing on it (one
        that reported ``accepted`` has it in its ledger and goes on by itself after a
        reconnect); a takeover passes every unsettled state, so a download under way
        re-reports its missing chunks to the new holder. A device already running the model
        its command names is left alone: its own status is on the way. ``rollouts``: these
        only (default: every live one). Returns (rollout, device, kind)."""
        sent: list[tuple[str, str, str]] = []
        with self.lock:
            for r in list(self.live.values()) if rollouts is None else rollouts:
                for device_id in sorted(devices.keys() & r.devices.keys()):
                    dev = r.devices[device_id]
                    kind = self._unanswered(r, dev, devices[device_id], deploy_states)
                    if kind == "deploy":
                        d = Decision("send_deploy", why, device_id, attempt=dev.attempts)
                        self.send_deploy(r, d)
                    elif kind == "rollback":
                        self.send_rollback(r, Decision("send_rollback", why, device_id))
                    if kind is not None:
                        sent.append((r.rollout_id, device_id, kind))
        return sent

    def _unanswered(
        self, r: Rollout, dev: DeviceProgress, back: Back, deploy_states: frozenset[str]
    ) -> str | None:
        """``deploy`` or ``rollback`` when that command of ``r`` went out to ``dev`` before
        ``back`` and is unanswered, and the device does not report the model it names."""
        runs, at = back
        if (
            r.state in ("running", "succeeded")
            and dev.sent_at is not None
            and dev.sent_at < at
            and dev.state in deploy_states
            and dev.attempts > 0
        ):
            bundle, _ = self.registry.loaded_bundle(r.spec.bundle_sha256)  # read once
            kind, names = "deploy", (bundle.manifest.name, bundle.manifest.version)
        elif dev.rollback_sent and dev.state == "installed" and (dev.updated_at or 0.0) < at:
            before = dev.previous or {}  # updated_at: set when the rollback went out
            kind, names = "rollback", (before.get("name") or "", before.get("version") or "")
        else:
            return None
        return kind if runs is None or runs != names else None

    def _resend_to_returned(self) -> None:
        with self._back_lock:
            back, self._back = self._back, {}
        if back and self.live:
            sent = self.resend_unanswered(back, "device back online")
            self._log_resent(sent, "{device} came back online: its unanswered {kind} sent again")

    def _log_resent(self, sent: list[tuple[str, str, str]], text: str) -> None:
        for rid, device_id, kind in sent:
            self.audit_log.event(
                "delivery",
                text.format(device=device_id, kind=kind),
                rollout_id=rid,
                device_id=device_id,
            )

    # the clock ----------------------------------------------------------------------------
    def tick(self, now: float) -> None:
        """Timeouts, gates and pending sends for every live rollout."""
        with self.lock:
            live = [r for r in self.live.values() if r.state in ROLLOUT_TICKED]
            online = self.registry.online() if live else set()  # every device: only if needed
            for r in live:
                rid = r.rollout_id
                decisions = r.tick(now, online, self.measures.extend(r, self._telemetry(r), now))
                if decisions:
                    self.apply(r, decisions, "engine")
                    self._dirty.add(rid)
            # after the engine: a deploy it just timed out and sent as a new attempt is not
            # also sent again under its old id
            self._resend_to_returned()
            if self.sender is not None:  # retained chunks only while a live rollout needs them
                self.sender.sweep(
                    {r.spec.bundle_sha256 for r in self.live.values() if r.state in ROLLOUT_ACTIVE},
                    now,
                )
        self.flush()

    def flush(self) -> None:
        """Write the rollouts that changed, then the buffered audit entries and events."""
        with self.lock:
            dirty, self._dirty = self._dirty, set()
            try:
                for rid in sorted(dirty):
                    r = self.live.get(rid)
                    if r is not None:
                        self._save(r)
                    dirty.discard(rid)
            except EdgefleetError:  # the registry is away: keep them for the next flush
                self._dirty |= dirty
                raise
            self._saved.keep(set(self.live))
            self.audit_log.flush()

    def _save(self, r: Rollout) -> None:
        """Write ``r``: its head and the devices that changed since this object's last save."""
        changed = self._saved.changed(r)
        self.repo.save_rollout(r.to_dict(changed), r.spec.bundle_sha256, changed)
        self._saved.saved(r, changed)

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
        drift = spec.halt_on_drift and bool(
            self.drift.is_drifting(bundle["name"], bundle["version"])
        )
        return Telemetry(
            device_p95_ms=tuple(d["p95_ms"] for d in per.values() if d["p95_ms"] is not None),
            device_error_rate=tuple(
                d["error_rate"] for d in per.values() if d["error_rate"] is not None
            ),
            drift=drift,
        )

    # carrying out decisions ---------------------------------------------------------------
    def apply(self, r: Rollout, decisions: list[Decision], actor: str) -> None:
        """Carry out the engine's decisions: send commands, record every reason."""
        target = f"rollout:{r.rollout_id}"
        for d in decisions:
            if d.kind == "send_deploy":
                self.send_deploy(r, d)
            elif d.kind == "send_rollback":
                self.send_rollback(r, d)
            if d.kind in ("rollout", "stage", "gate"):
                self.audit_log.audit(actor, f"{d.kind}.{d.state}", target, d.reason, d.to_dict())
                self.audit_log.event(
                    d.kind, d.reason, rollout_id=r.rollout_id, state=d.state, stage=d.stage
                )
            else:
                self.audit_log.audit(
                    actor, "device", target, f"{d.device_id}: {d.reason}", d.to_dict()
                )
                self.audit_log.event(
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

    def send_deploy(self, r: Rollout, d: Decision) -> None:
        if self.sender is None or d.device_id is None:
            return
        bundle, data = self.registry.loaded_bundle(r.spec.bundle_sha256)
        mode = self.config.rollout.delivery
        http_url = None
        if self.config.api.public_url and mode in ("http", "both"):
            http_url = (
                f"{self.config.api.public_url.rstrip('/')}/v1/artifacts/{r.spec.bundle_sha256}"
            )
        dev = r.devices.get(d.device_id)
        if dev is not None and dev.previous is None:
            # What the device ran before this rollout: the signed rollback names it.
            dev.previous = self.registry.running_model(d.device_id)
            self._dirty.add(r.rollout_id)
        cmd = deploy_command(
            bundle,
            data,
            device_id=d.device_id,
            rollout_id=r.rollout_id,
            cid=command_id(r.rollout_id, d.device_id, "deploy", d.attempt),
            chunk_size=self.config.rollout.chunk_bytes,
            key=self.signer,
            http_url=http_url,
            now=_dt(self.clock()),
            ttl_s=self.config.signing.command_ttl_s,
        )
        if http_url is None or mode == "both":  # once per artifact, retained (delivery.Sender)
            self.sender.artifact(data, self.clock(), r.spec.bundle_sha256)
        self.sender.command(cmd)

    def send_rollback(self, r: Rollout, d: Decision) -> None:
        if self.sender is None or d.device_id is None:
            return
        dev = r.devices.get(d.device_id)
        cmd = rollback_command(
            device_id=d.device_id,
            rollout_id=r.rollout_id,
            cid=command_id(r.rollout_id, d.device_id, "rollback", 1),
            key=self.signer,
            reason=d.reason,
            target=(dev.previous or None) if dev is not None else None,
            now=_dt(self.clock()),
            ttl_s=self.config.signing.rollback_ttl_s,
        )
        self.sender.command(cmd)


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def _manifest_expiry(bundle: dict[str, Any]) -> datetime | None:
    from protocol.manifest import Manifest

    try:
        return Manifest.model_validate(json.loads(bundle["manifest"])).expires_at
    except (ValueError, KeyError):
        return None


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, timezone.utc)
