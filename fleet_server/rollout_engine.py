"""The rollout state machine. Pure: no I/O, no clock, no threads — ``now`` is an argument.

Events go in (start/pause/resume/abort/rollback from an operator, device status reports,
a periodic ``tick`` with who is online and the telemetry of the new version); a list of
:class:`Decision` comes out (commands to send, state changes), each with a reason the
service writes to the audit log. The service persists :meth:`Rollout.to_dict`.

State rules
===========

Rollout::

    created ──start──▶ running ──pause──▶ paused ──resume──▶ running
    running ── every stage passed and nothing in flight ──▶ succeeded
    running|paused ── halt gate ──▶ halted           (rollback of installed devices if configured)
    created|running|paused ──abort──▶ aborted        (stop sending, nothing undone)
    running|paused|halted|succeeded ──rollback──▶ rolled_back  (rollback every installed device)

Stage (ordered; stage *i+1* starts only when stage *i* passed)::

    pending ──▶ running ──▶ passed | failed

Device (per rollout)::

    queued ──sent──▶ downloading ──▶ verifying ──▶ installed | failed | rejected | timed_out
    installed ──rollback acknowledged──▶ rolled_back

Rules:

1. Deploy commands are sent only to queued devices of a ``running`` or ``passed`` stage of a
   ``running`` (or, for late devices, ``succeeded``) rollout, only while the device is online,
   and never after a halt, abort or rollback.
2. Assignment to stages is deterministic: devices are ordered by sha256(rollout id + device id)
   and cut at the cumulative stage sizes (percentages of N rounded up, or counts).
3. A device sent a deploy that reports nothing terminal within ``device_timeout_s`` is
   ``timed_out``. ``failed`` and ``timed_out`` devices are re-queued while
   ``attempts <= max_retries``; ``rejected`` (a deterministic refusal) never is.
4. Halt gate (checked first, over devices of started stages): failed share of *reported*
   devices > ``failure_threshold`` **and** reported ≥ ``min_devices``. Telemetry gates also
   halt: p95 latency over the budget, error rate over the maximum, drift when gated on it.
   Latency and error rate are stage-level statistics over the devices that reported: the
   lower median of the per-device values, taken only once ``min_devices`` devices
   reported — never the maximum, so one device (broken or lying) cannot halt a stage.
5. Advance gate: installed share of the stage ≥ ``success_threshold``, then ``soak_s`` must
   pass with the telemetry gates holding; then the stage passes and the next one starts.
6. A paused rollout sends nothing and advances nothing, but records reports.
7. Hold gates (each opt-in) keep a stage whose success share is reached from passing, and do
   not halt: the p95 its installed devices report per profile is over that profile's
   latency budget (``hold_on_profile_budget``); the merge of its installed devices' sketches
   drifts from the reference (``hold_on_own_drift``); the new version's field accuracy is
   below the old one's by more than ``accuracy_margin`` with at least ``min_labels`` labels on
   each side (for regressors: its MAE above by more). A hold is recorded once per reason; the
   soak restarts once the hold clears.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from protocol.states import (
    DEVICE_FAILED,
    DEVICE_IN_PROGRESS,
    DEVICE_TERMINAL,
    ROLLOUT_ACTIVE,
    ROLLOUT_MOVING,
    ROLLOUT_TICKED,
    RolloutState,
    StageState,
)

from .errors import Conflict, InvalidInput

# The rollout states each operator action applies in (the dashboard shows only these).
ACTION_STATES: dict[str, frozenset[str]] = {
    "pause": frozenset({"running"}),
    "resume": frozenset({"paused"}),
    "abort": ROLLOUT_ACTIVE,
    "rollback": ROLLOUT_TICKED | {"halted"},
}


def allowed_actions(state: str) -> list[str]:
    """The operator actions that apply to a rollout in ``state``, in ACTION_STATES' order."""
    return [a for a, states in ACTION_STATES.items() if state in states]


_STUCK = frozenset({"queued", *DEVICE_IN_PROGRESS})  # sent, no result yet: can time out

# CommandStatus states a device may report for a deploy, mapped onto our device states.
_REPORTED = {
    "accepted": "downloading",
    "progress": "downloading",
    "downloading": "downloading",
    "verifying": "verifying",
    "installed": "installed",
    "done": "installed",
    "failed": "failed",
    "rejected": "rejected",
    "timed_out": "timed_out",
    "rolled_back": "rolled_back",
}


@dataclass(frozen=True)
class Selector:
    """Which devices a rollout targets: all conditions must hold (empty = no condition)."""

    profiles: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    device_ids: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> Selector:
        """``profile=raspberry-pi-4,tag=lab,id=dev-1`` (repeat a key for alternatives)."""
        profiles: list[str] = []
        tags: list[str] = []
        ids: list[str] = []
        for part in [p.strip() for p in text.split(",") if p.strip()]:
            key, sep, value = part.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or not value:
                raise InvalidInput(f"selector term {part!r} is not key=value", field="selector")
            if key == "profile":
                profiles.append(value)
            elif key == "tag":
                tags.append(value)
            elif key in ("id", "device"):
                ids.append(value)
            else:
                raise InvalidInput(
                    f"selector key {key!r} is unknown (use profile=, tag= or id=)", field="selector"
                )
        return cls(tuple(profiles), tuple(tags), tuple(ids))

    def matches(self, device_id: str, profile: str, tags: Iterable[str]) -> bool:
        if self.device_ids and device_id not in self.device_ids:
            return False
        if self.profiles and profile not in self.profiles:
            return False
        return not (self.tags and not set(self.tags) <= set(tags))

    def __str__(self) -> str:
        terms = [f"profile={p}" for p in self.profiles] + [f"tag={t}" for t in self.tags]
        return ",".join(terms + [f"id={i}" for i in self.device_ids]) or "(all devices)"


@dataclass(frozen=True)
class RolloutSpec:
    bundle_sha256: str
    selector: Selector = Selector()
    stages: tuple[float, ...] = (5, 25, 50, 100)  # cumulative
    stage_unit: Literal["percent", "count"] = "percent"
    success_threshold: float = 1.0
    failure_threshold: float = 0.2
    min_devices: int = 1
    soak_s: float = 0.0
    device_timeout_s: float = 300.0
    max_retries: int = 1
    rollback_on_halt: bool = True
    max_p95_ms: float | None = None
    max_error_rate: float | None = None
    halt_on_drift: bool = False
    # hold gates (rule 7): the stage waits, nothing is halted
    hold_on_profile_budget: bool = False
    hold_on_own_drift: bool = False
    accuracy_margin: float | None = None
    min_labels: int = 30

    def validate(self) -> RolloutSpec:
        if not self.stages:
            raise InvalidInput("at least one stage is needed", field="stages")
        if (
            any(b <= a for a, b in zip(self.stages, self.stages[1:], strict=False))
            or self.stages[0] <= 0
        ):
            raise InvalidInput(
                "stages must be positive and strictly increasing (cumulative)", field="stages"
            )
        if self.stage_unit == "percent" and self.stages[-1] != 100:
            raise InvalidInput("percentage stages must end at 100", field="stages")
        if self.stage_unit == "count" and any(s != int(s) for s in self.stages):
            raise InvalidInput("count stages must be whole numbers", field="stages")
        for name in ("success_threshold", "failure_threshold"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise InvalidInput(f"{name} must be between 0 and 1", field=name)
        if self.min_devices < 1:
            raise InvalidInput("min_devices must be at least 1", field="min_devices")
        if self.soak_s < 0 or self.device_timeout_s <= 0:
            raise InvalidInput("soak must be ≥ 0 and the device timeout > 0", field="soak_s")
        if not 0 <= self.max_retries <= 10:
            raise InvalidInput("max_retries must be between 0 and 10", field="max_retries")
        if self.accuracy_margin is not None and not self.accuracy_margin >= 0:
            raise InvalidInput("accuracy_margin must be ≥ 0", field="accuracy_margin")
        if self.min_labels < 1:
            raise InvalidInput("min_labels must be at least 1", field="min_labels")
        return self

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["selector"] = asdict(self.selector)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RolloutSpec:
        d = dict(d)
        sel = d.pop("selector", {}) or {}
        return cls(
            selector=Selector(**{k: tuple(v) for k, v in sel.items()}),
            stages=tuple(d.pop("stages")),
            **d,
        )


@dataclass
class StageProgress:
    index: int
    target: float
    state: StageState = "pending"
    devices: list[str] = field(default_factory=list)
    started_at: float | None = None
    success_at: float | None = None  # when the success share was first reached (soak start)
    finished_at: float | None = None
    held: str = ""  # the reason a hold gate keeps this stage from passing (rule 7)

    def to_dict(self) -> dict[str, Any]:
        """As ``dataclasses.asdict``, without its recursive deep copy (a rollout is saved
        after every change, and ``asdict`` over 1,000 devices took ~50 ms)."""
        return {
            "index": self.index,
            "target": self.target,
            "state": self.state,
            "devices": list(self.devices),
            "started_at": self.started_at,
            "success_at": self.success_at,
            "finished_at": self.finished_at,
            "held": self.held,
        }


@dataclass
class DeviceProgress:
    device_id: str
    stage: int
    state: str = "queued"
    attempts: int = 0
    sent_at: float | None = None
    updated_at: float | None = None
    # The model the device ran before this rollout (name, version, release, sha256), set by
    # the service when it first sends the deploy; {} when it ran none. Rollbacks name it.
    previous: dict[str, Any] | None = None
    reason: str = ""
    rollback_sent: bool = False

    def to_dict(self) -> dict[str, Any]:
        """As ``dataclasses.asdict`` (see :meth:`StageProgress.to_dict`)."""
        return {
            "device_id": self.device_id,
            "stage": self.stage,
            "state": self.state,
            "attempts": self.attempts,
            "sent_at": self.sent_at,
            "updated_at": self.updated_at,
            "previous": dict(self.previous) if self.previous is not None else None,
            "reason": self.reason,
            "rollback_sent": self.rollback_sent,
        }


@dataclass(frozen=True)
class Telemetry:
    """What the service measured for the new version on devices of this rollout.

    ``device_p95_ms`` / ``device_error_rate`` hold one value per reporting device; the
    engine reduces them with :func:`stage_statistic`. ``p95_ms`` / ``error_rate`` are used
    as given when no per-device values are supplied (a caller that already reduced them).
    """

    p95_ms: float | None = None
    latency_budget_ms: float | None = None
    error_rate: float | None = None
    drift: bool = False
    # hold-gate inputs (rule 7), measured on this rollout's installed devices
    profile_p95: tuple[tuple[str, float, float, int], ...] = ()  # (profile, p95, budget, n)
    own_drift: bool = False
    own_drifted_devices: tuple[str, ...] = ()
    accuracy_metric: str = "accuracy"  # accuracy (higher is better) | mae (lower is better)
    accuracy_new: float | None = None
    labels_new: int = 0
    accuracy_old: float | None = None
    labels_old: int = 0
    old_version: str = ""
    device_p95_ms: tuple[float, ...] = ()
    device_error_rate: tuple[float, ...] = ()

    def stage_p95(self, min_devices: int) -> float | None:
        if self.device_p95_ms:
            return stage_statistic(self.device_p95_ms, min_devices)
        return self.p95_ms

    def stage_error_rate(self, min_devices: int) -> float | None:
        if self.device_error_rate:
            return stage_statistic(self.device_error_rate, min_devices)
        return self.error_rate


def stage_statistic(values: Iterable[float], min_devices: int) -> float | None:
    """The lower median of per-device values, or None below ``min_devices`` values.

    With n ≥ 2 values, moving the lower median above x needs more than half of the
    devices above x: one device can never do it alone.
    """
    vals = sorted(v for v in values if v == v)  # NaN-free
    if not vals or len(vals) < max(1, min_devices):
        return None
    return vals[(len(vals) - 1) // 2]


@dataclass(frozen=True)
class Decision:
    """One decision. ``kind``: send_deploy | send_rollback | rollout | stage | device | gate."""

    kind: str
    reason: str
    device_id: str | None = None
    stage: int | None = None
    state: str | None = None
    attempt: int = 0

    def to_dict(self) -> dict[str, Any]:
        # every field is a scalar: vars() instead of asdict's recursive copy (one per decision)
        return {k: v for k, v in vars(self).items() if v is not None}


def stage_order(rollout_id: str, device_id: str) -> str:
    return hashlib.sha256(f"{rollout_id}\x00{device_id}".encode()).hexdigest()


def assign_stages(rollout_id: str, device_ids: Iterable[str], spec: RolloutSpec) -> list[list[str]]:
    """Cut the hash-ordered devices at the cumulative stage sizes."""
    ordered = sorted(set(device_ids), key=lambda d: stage_order(rollout_id, d))
    n = len(ordered)
    out: list[list[str]] = []
    prev = 0
    for target in spec.stages:
        cum = math.ceil(n * target / 100) if spec.stage_unit == "percent" else int(target)
        cum = max(prev, min(n, cum))
        out.append(ordered[prev:cum])
        prev = cum
    return out


@dataclass
class Rollout:
    rollout_id: str
    spec: RolloutSpec
    state: RolloutState = "created"
    stages: list[StageProgress] = field(default_factory=list)
    devices: dict[str, DeviceProgress] = field(default_factory=dict)
    created_at: float = 0.0
    updated_at: float = 0.0
    dry_run: bool = False
    reason: str = ""

    # construction ---------------------------------------------------------------------
    @classmethod
    def plan(
        cls,
        rollout_id: str,
        spec: RolloutSpec,
        device_ids: Iterable[str],
        now: float,
        already: Iterable[str] = (),
    ) -> Rollout:
        """Assign devices to stages; devices in ``already`` run this version: installed."""
        spec.validate()
        done = set(already)
        groups = assign_stages(rollout_id, device_ids, spec)
        if not any(groups):
            raise InvalidInput("the selector matches no device", field="selector")
        r = cls(rollout_id, spec, created_at=now, updated_at=now)
        for i, (target, group) in enumerate(zip(spec.stages, groups, strict=True)):
            r.stages.append(StageProgress(index=i, target=target, devices=list(group)))
            for d in group:
                r.devices[d] = DeviceProgress(d, i)
                if d in done:
                    r.devices[d] = DeviceProgress(
                        d, i, state="installed", updated_at=now, reason="already runs this version"
                    )
        return r

    # operator actions -----------------------------------------------------------------
    def start(self, now: float, online: Iterable[str] = ()) -> list[Decision]:
        self._require({"created"}, "start")
        out = [self._set_state("running", "started by operator", now)]
        out += self._start_stage(0, now)
        return out + self.tick(now, online)

    def pause(self, now: float) -> list[Decision]:
        self._require(ACTION_STATES["pause"], "pause")
        return [self._set_state("paused", "paused by operator", now)]

    def resume(self, now: float, online: Iterable[str] = ()) -> list[Decision]:
        self._require(ACTION_STATES["resume"], "resume")
        return [self._set_state("running", "resumed by operator", now), *self.tick(now, online)]

    def abort(self, now: float) -> list[Decision]:
        self._require(ACTION_STATES["abort"], "abort")
        out = [self._set_state("aborted", "aborted by operator: no further deploys", now)]
        return out + self._fail_running_stages("rollout aborted", now)

    def rollback(self, now: float) -> list[Decision]:
        self._require(ACTION_STATES["rollback"], "roll back")
        out = [self._set_state("rolled_back", "rollback requested by operator", now)]
        out += self._fail_running_stages("rollout rolled back", now)
        return out + self._send_rollbacks("operator rollback", now)

    # device reports -------------------------------------------------------------------
    def on_status(
        self, device_id: str, reported: str, now: float, *, kind: str = "deploy", reason: str = ""
    ) -> list[Decision]:
        """A CommandStatus for this rollout's deploy (or rollback) command of ``device_id``."""
        dev = self.devices.get(device_id)
        new = _REPORTED.get(reported)
        if dev is None or new is None:
            return []
        if kind == "rollback":
            if new in ("installed", "rolled_back") and dev.state != "rolled_back":
                return [self._set_device(dev, "rolled_back", "device confirmed the rollback", now)]
            return []
        if dev.sent_at is None or (dev.state in DEVICE_TERMINAL and dev.state != "timed_out"):
            return []  # a stale or duplicate report; terminal states stick
        if dev.state == "timed_out" and new in DEVICE_IN_PROGRESS:
            return []
        if new == dev.state or new == "rolled_back":
            return []
        why = f"device reported {reported}" + (f" ({reason})" if reason else "")
        out = [self._set_device(dev, new, why, now, detail=reason)]
        if new in ("failed", "timed_out"):
            out += self._maybe_retry(dev, now)
        if (
            new == "installed"
            and self.state in ("halted", "aborted", "rolled_back")
            and self._wants_rollback()
        ):
            out += self._send_rollbacks(
                "installed after the rollout stopped", now, only=[device_id]
            )
        return out

    # the clock ------------------------------------------------------------------------
    def tick(
        self, now: float, online: Iterable[str] = (), telemetry: Telemetry | None = None
    ) -> list[Decision]:
        """Time out stuck devices, apply gates, send pending deploys to online devices."""
        out: list[Decision] = []
        online_set = set(online)
        if self.state in ROLLOUT_MOVING:
            out += self._timeouts(now)
        if self.state == "running":
            out += self._gates(now, telemetry)
        if self.state in ("running", "succeeded"):
            out += self._send_pending(now, online_set)
        if self.state == "running":
            out += self._maybe_succeed(now)
        return out

    # queries --------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        c: dict[str, int] = {}
        for d in self.devices.values():
            c[d.state] = c.get(d.state, 0) + 1
        return c

    def current_stage(self) -> int | None:
        running = [s.index for s in self.stages if s.state == "running"]
        return running[0] if running else None

    def to_dict(self, devices: Iterable[str] | None = None) -> dict[str, Any]:
        """The whole document; ``devices``: only these devices' entries (a partial save)."""
        if devices is None:
            progress = [d.to_dict() for d in self.devices.values()]
        else:
            progress = [self.devices[i].to_dict() for i in devices if i in self.devices]
        return {
            "rollout_id": self.rollout_id,
            "spec": self.spec.to_dict(),
            "state": self.state,
            "stages": [s.to_dict() for s in self.stages],
            "devices": progress,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "dry_run": self.dry_run,
            "reason": self.reason,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Rollout:
        r = cls(
            d["rollout_id"],
            RolloutSpec.from_dict(d["spec"]),
            state=d["state"],
            created_at=d["created_at"],
            updated_at=d["updated_at"],
            dry_run=d.get("dry_run", False),
            reason=d.get("reason", ""),
        )
        r.stages = [StageProgress(**s) for s in d["stages"]]
        r.devices = {x["device_id"]: DeviceProgress(**x) for x in d["devices"]}
        return r

    # internals ------------------------------------------------------------------------
    def _require(self, allowed: frozenset[str] | set[str], action: str) -> None:
        if self.state not in allowed:
            raise Conflict(f"cannot {action} a rollout that is {self.state}", field="state")

    def _wants_rollback(self) -> bool:
        return self.state == "rolled_back" or (
            self.state == "halted" and self.spec.rollback_on_halt
        )

    def _set_state(self, state: RolloutState, reason: str, now: float) -> Decision:
        self.state = state
        self.reason = reason
        self.updated_at = now
        return Decision("rollout", reason, state=state)

    def _set_device(
        self, dev: DeviceProgress, state: str, reason: str, now: float, detail: str = ""
    ) -> Decision:
        dev.state = state
        dev.updated_at = now
        dev.reason = detail or reason
        self.updated_at = now
        return Decision("device", reason, device_id=dev.device_id, stage=dev.stage, state=state)

    def _start_stage(self, index: int, now: float) -> list[Decision]:
        stage = self.stages[index]
        stage.state = "running"
        stage.started_at = now
        return [
            Decision(
                "stage",
                f"stage {index + 1} started ({len(stage.devices)} devices)",
                stage=index,
                state="running",
            )
        ]

    def _fail_running_stages(self, reason: str, now: float) -> list[Decision]:
        out = []
        for s in self.stages:
            if s.state == "running":
                s.state = "failed"
                s.finished_at = now
                out.append(Decision("stage", reason, stage=s.index, state="failed"))
        return out

    def _send_rollbacks(
        self, reason: str, now: float, only: list[str] | None = None
    ) -> list[Decision]:
        out = []
        for dev in self.devices.values():
            if only is not None and dev.device_id not in only:
                continue
            if dev.state == "installed" and not dev.rollback_sent:
                dev.rollback_sent = True
                dev.updated_at = now
                out.append(
                    Decision("send_rollback", reason, device_id=dev.device_id, stage=dev.stage)
                )
        return out

    def _maybe_retry(self, dev: DeviceProgress, now: float) -> list[Decision]:
        if dev.attempts <= self.spec.max_retries and self.state in ROLLOUT_MOVING:
            why = f"retry {dev.attempts} of {self.spec.max_retries} after {dev.state}"
            dev.sent_at = None
            return [self._set_device(dev, "queued", why, now, detail=dev.reason)]
        return []

    def _timeouts(self, now: float) -> list[Decision]:
        out = []
        timeout = self.spec.device_timeout_s
        for dev in self.devices.values():
            sent = dev.sent_at
            if sent is not None and now - sent >= timeout and dev.state in _STUCK:
                out.append(
                    self._set_device(
                        dev,
                        "timed_out",
                        f"no result within {self.spec.device_timeout_s:g} s",
                        now,
                        detail="timeout",
                    )
                )
                out += self._maybe_retry(dev, now)
        return out

    def _halt(self, reason: str, now: float) -> list[Decision]:
        out = [Decision("gate", reason, state="halt"), self._set_state("halted", reason, now)]
        out += self._fail_running_stages(reason, now)
        if self.spec.rollback_on_halt:
            out += self._send_rollbacks(f"rollout halted: {reason}", now)
        return out

    def _gates(self, now: float, telemetry: Telemetry | None) -> list[Decision]:
        started = {s.index for s in self.stages if s.state != "pending"}
        reported = failed = 0
        for d in self.devices.values():  # one pass: this runs every tick
            if d.stage in started and d.state in DEVICE_TERMINAL:
                reported += 1
                failed += d.state in DEVICE_FAILED
        if reported and reported >= self.spec.min_devices:
            share = failed / reported
            if share > self.spec.failure_threshold:
                return self._halt(
                    f"failure share {share:.0%} ({failed}/{reported} reported) is over "
                    f"{self.spec.failure_threshold:.0%} with at least "
                    f"{self.spec.min_devices} reported",
                    now,
                )
        tele_problem = self._telemetry_problem(telemetry)
        idx = self.current_stage()
        if idx is None:
            return []
        stage = self.stages[idx]
        if stage.devices:
            devices = self.devices
            ok = sum(1 for d in stage.devices if devices[d].state == "installed")
            share = ok / len(stage.devices)
        else:
            ok, share = 0, 1.0
        out: list[Decision] = []
        if share < self.spec.success_threshold:
            return out
        if tele_problem and ok:
            return self._halt(tele_problem, now)
        hold = self._hold_problem(telemetry) if ok else ""
        if hold:
            stage.success_at = None  # the soak starts again once the hold clears
            if hold != stage.held:
                stage.held = hold
                out.append(
                    Decision("gate", f"stage {idx + 1} held: {hold}", stage=idx, state="hold")
                )
            return out
        if stage.held:
            out.append(
                Decision(
                    "gate",
                    f"stage {idx + 1} hold cleared ({stage.held})",
                    stage=idx,
                    state="hold_cleared",
                )
            )
            stage.held = ""
        if stage.success_at is None:
            stage.success_at = now
            if self.spec.soak_s > 0:
                out.append(
                    Decision(
                        "gate",
                        f"stage {idx + 1}: {share:.0%} installed, soaking {self.spec.soak_s:g} s",
                        stage=idx,
                        state="soak",
                    )
                )
        if now - stage.success_at < self.spec.soak_s:
            return out
        stage.state = "passed"
        stage.finished_at = now
        out.append(
            Decision(
                "stage",
                f"stage {idx + 1} passed: {share:.0%} installed (threshold "
                f"{self.spec.success_threshold:.0%}), soak {self.spec.soak_s:g} s held",
                stage=idx,
                state="passed",
            )
        )
        if idx + 1 < len(self.stages):
            out += self._start_stage(idx + 1, now)
            out += self._gates(now, telemetry)  # an empty next stage passes at once
        return out

    def _telemetry_problem(self, t: Telemetry | None) -> str:
        if t is None:
            return ""
        budget = self.spec.max_p95_ms if self.spec.max_p95_ms is not None else t.latency_budget_ms
        p95 = t.stage_p95(self.spec.min_devices)
        if budget is not None and p95 is not None and p95 > budget:
            return f"p95 latency {p95:.2f} ms is over the budget of {budget:g} ms"
        rate = t.stage_error_rate(self.spec.min_devices)
        limit = self.spec.max_error_rate
        if limit is not None and rate is not None and rate > limit:
            return f"error rate {rate:.2%} is over {limit:.2%}"
        if self.spec.halt_on_drift and t.drift:
            return "the new version's inputs drifted from its reference data"
        return ""

    def _hold_problem(self, t: Telemetry | None) -> str:
        """Rule 7: why the current stage must wait (empty: nothing holds it)."""
        if t is None:
            return ""
        spec = self.spec
        if spec.hold_on_profile_budget:
            over = [
                f"{p}: p95 {p95:.2f} ms over its budget of {budget:g} ms on {n} devices"
                for p, p95, budget, n in t.profile_p95
                if p95 > budget
            ]
            if over:
                return "; ".join(over)
        if spec.hold_on_own_drift and t.own_drift:
            names = ", ".join(t.own_drifted_devices[:5]) or "no single device"
            return f"this rollout's devices drifted from the reference (devices drifted: {names})"
        if spec.accuracy_margin is not None:
            new, old = t.accuracy_new, t.accuracy_old
            enough = t.labels_new >= spec.min_labels and t.labels_old >= spec.min_labels
            if new is not None and old is not None and enough:
                if t.accuracy_metric == "mae" and new - old > spec.accuracy_margin:
                    return (
                        f"field MAE {new:.4g} ({t.labels_new} labels) is above "
                        f"{t.old_version or 'the old version'}'s {old:.4g} ({t.labels_old} labels) "
                        f"by more than {spec.accuracy_margin:g}"
                    )
                if t.accuracy_metric != "mae" and old - new > spec.accuracy_margin:
                    return (
                        f"field accuracy {new:.1%} ({t.labels_new} labels) is below "
                        f"{t.old_version or 'the old version'}'s {old:.1%} ({t.labels_old} labels) "
                        f"by more than {spec.accuracy_margin:.1%}"
                    )
        return ""

    def _send_pending(self, now: float, online: set[str]) -> list[Decision]:
        out = []
        for s in self.stages:
            if s.state not in ("running", "passed"):
                continue
            for d in s.devices:
                dev = self.devices[d]
                if dev.state == "queued" and dev.sent_at is None and d in online:
                    dev.attempts += 1
                    dev.sent_at = now
                    dev.updated_at = now
                    verb = "deploy" if dev.attempts == 1 else f"deploy (attempt {dev.attempts})"
                    out.append(
                        Decision(
                            "send_deploy",
                            f"{verb} to stage {s.index + 1} device",
                            device_id=d,
                            stage=s.index,
                            attempt=dev.attempts,
                        )
                    )
        return out

    def _maybe_succeed(self, now: float) -> list[Decision]:
        if all(s.state == "passed" for s in self.stages):
            in_flight = [
                d
                for d in self.devices.values()
                if d.sent_at is not None and d.state not in DEVICE_TERMINAL
            ]
            if not in_flight:
                c = self.counts()
                return [
                    self._set_state(
                        "succeeded", f"every stage passed ({c.get('installed', 0)} installed)", now
                    )
                ]
        return []
