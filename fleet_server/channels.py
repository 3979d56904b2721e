"""Release channels: the rules. Pure: no I/O, no clock — facts and ``now`` in, decisions out.

Each model name has channels (``beta`` and ``stable`` by default; operators add more). A
channel holds one current bundle, a history (the lineage) and a :class:`ChannelPolicy`: the
stages, gates and soak its rollouts take, and the conditions a bundle must meet to be
promoted into it. :mod:`.channel_service` gathers the facts from the registry, asks these
functions, and carries the answers out with the ordinary rollout functions.

Rules
=====

1. **Following.** A device follows the channel its server-side assignment names, else a
   manual tag ``channel:NAME`` set from the server, else the one its agent reports
   (``[agent] channel``). A name is ``CHANNEL`` (the channel of the
   model the device runs) or ``MODEL/CHANNEL``. A device that runs no model and names a
   bare channel follows the one model that has that channel with a current bundle for the
   device's profile, else the one model that has the channel at all; with several, none
   (name the model) (:func:`resolve`).
2. **Promotion conditions** (:func:`check_promotion`), all evaluated, each named in a
   refusal:
   ``known_channel`` the channel is a default or was defined;
   ``not_current`` the bundle is not already the channel's current bundle;
   ``newer_release`` its release is above the current bundle's (devices refuse older ones);
   ``not_archived`` it is not archived (``force`` overrides, and is audited);
   ``requires`` a rollout of it on the required channel has succeeded since its latest
   promotion there, it is still that channel's current bundle, and ``hold_s`` has passed
   since the later of that success and the move that last made it current there (a
   demotion back to it restarts the clock);
   ``no_drift`` the drift engine raises no alert for it (when the policy asks);
   ``accuracy`` its field accuracy is no worse than the current bundle's by more than the
   tolerance (when the policy asks; a side with no labelled feedback yet is "not measured"
   and does not refuse — the detail says so).
3. **Promotion** sets the channel's current bundle and starts one staged rollout to the
   devices that follow the channel, under the channel's policy. If that rollout halts, is
   aborted or rolled back, the channel reverts to the bundle it had (:func:`revert_needed`).
4. **Demotion** sets the current bundle back to the one before it (:func:`previous_bundle`)
   and rolls back (signed rollbacks) every rollout that delivered the demoted bundle to the
   channel.
5. **Late joiners and drift back** (:func:`plan_catch_up`): an online device that follows a
   channel, is in no active rollout, and runs no model, another model, or an *older* release
   than the channel's current bundle, is queued; all queued devices of a channel go in one
   rollout under the channel's policy, and only while no other rollout of that channel is
   active. A device *ahead* of its channel (e.g. after a demotion whose rollback it did not
   confirm) is reported, never sent an older bundle (devices refuse it). A device that
   already failed a delivery of the current bundle is reported and not retried
   automatically (a manual rollout can).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from protocol.states import DEVICE_UNSETTLED, ROLLOUT_ACTIVE, ROLLOUT_MOVING, STAGE_STARTED

from .errors import InvalidInput
from .rollout_engine import RolloutSpec

DEFAULT_CHANNELS = ("beta", "stable")
CHANNEL_NAME = re.compile(r"^[a-z][a-z0-9-]{0,23}$")
# history actions that move a channel's current bundle (the lineage); "deliver" rows tie a
# catch-up rollout to its channel and stay out of the lineage view
MOVES = frozenset({"promote", "demote", "revert"})


def check_name(channel: str) -> str:
    if not CHANNEL_NAME.match(channel or ""):
        raise InvalidInput(
            f"channel {channel!r} must be 1–24 of a-z, 0-9 and '-', starting with a letter",
            field="channel",
        )
    return channel


@dataclass(frozen=True)
class ChannelPolicy:
    """How a channel's rollouts run and what a promotion into it requires."""

    stages: tuple[float, ...] = (50.0, 100.0)
    stage_unit: str = "percent"
    success_threshold: float = 1.0
    failure_threshold: float = 0.2
    min_devices: int = 1
    soak_s: float = 0.0
    device_timeout_s: float = 300.0
    max_retries: int = 1
    # promotion conditions
    requires: str | None = None  # a channel the bundle must have succeeded on first
    hold_s: float = 0.0  # ... and held there this long
    no_drift: bool = False
    accuracy_tolerance: float | None = None  # None: accuracy is not compared

    def validate(self) -> ChannelPolicy:
        numbers = {
            "stages": self.stages,
            "success_threshold": (self.success_threshold,),
            "failure_threshold": (self.failure_threshold,),
            "soak_s": (self.soak_s,),
            "device_timeout_s": (self.device_timeout_s,),
            "hold_s": (self.hold_s,),
            "accuracy_tolerance": (self.accuracy_tolerance or 0.0,),
        }
        for name, values in numbers.items():
            if not all(isinstance(v, int | float) and math.isfinite(v) for v in values):
                raise InvalidInput(f"{name} must be finite numbers", field=name)
        if self.stage_unit not in ("percent", "count"):
            raise InvalidInput("stage_unit must be percent or count", field="stage_unit")
        self.spec("0" * 64)  # the rollout engine's own checks on stages and thresholds
        if self.requires is not None:
            check_name(self.requires)
        if self.hold_s < 0:
            raise InvalidInput("hold_s must be ≥ 0", field="hold_s")
        if self.accuracy_tolerance is not None and not 0 <= self.accuracy_tolerance <= 1:
            raise InvalidInput("accuracy_tolerance must be between 0 and 1", field="accuracy")
        return self

    def spec(self, bundle_sha256: str) -> RolloutSpec:
        return RolloutSpec(
            bundle_sha256=bundle_sha256,
            stages=tuple(self.stages),
            stage_unit=self.stage_unit,  # type: ignore[arg-type]
            success_threshold=self.success_threshold,
            failure_threshold=self.failure_threshold,
            min_devices=self.min_devices,
            soak_s=self.soak_s,
            device_timeout_s=self.device_timeout_s,
            max_retries=self.max_retries,
        ).validate()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stages"] = list(self.stages)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ChannelPolicy:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise InvalidInput(f"unknown policy field {unknown[0]!r}", field=unknown[0])
        if "stages" in known:
            try:
                known["stages"] = tuple(float(s) for s in known["stages"])
            except (TypeError, ValueError):
                raise InvalidInput("stages must be a list of numbers", field="stages") from None
        try:
            return cls(**known).validate()
        except TypeError as exc:
            raise InvalidInput(f"policy: {exc}", field="policy") from None


def default_policy(channel: str) -> ChannelPolicy:
    if channel == "stable":
        return ChannelPolicy(
            stages=(25.0, 100.0),
            requires="beta",
            hold_s=3600.0,
            no_drift=True,
            accuracy_tolerance=0.0,
        )
    return ChannelPolicy()


# promotion --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Condition:
    name: str
    ok: bool
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PromotionFacts:
    """What the service measured for a promotion of ``sha256`` into a channel."""

    sha256: str
    release: int
    channel_known: bool = True
    current_sha256: str | None = None
    current_release: int | None = None
    archived: bool = False
    # on the required channel: when a rollout of this bundle there succeeded (None: never),
    # and whether the bundle is still that channel's current bundle
    required_succeeded_at: float | None = None
    required_holds: bool = False
    drifting: bool | None = None  # None: no drift engine / no data
    accuracy: float | None = None
    current_accuracy: float | None = None


def check_promotion(
    policy: ChannelPolicy, facts: PromotionFacts, now: float, *, force: bool = False
) -> list[Condition]:
    """Every condition with its verdict (rule 2); a promotion goes ahead when all are ok."""
    out = [
        Condition(
            "known_channel",
            facts.channel_known,
            "the channel exists" if facts.channel_known else "no such channel (define it first)",
        )
    ]
    is_current = facts.current_sha256 == facts.sha256
    out.append(
        Condition(
            "not_current",
            not is_current,
            "it is already the channel's current bundle" if is_current else "a new bundle",
        )
    )
    if facts.current_release is None:
        out.append(Condition("newer_release", True, "the channel has no bundle yet"))
    else:
        newer = facts.release > facts.current_release
        out.append(
            Condition(
                "newer_release",
                newer or is_current,
                f"release {facts.release} vs current {facts.current_release}"
                + ("" if newer else ": devices refuse an older release; demote instead"),
            )
        )
    if facts.archived:
        out.append(
            Condition(
                "not_archived",
                force,
                "archived; promoted anyway with force (audited)" if force else "archived",
            )
        )
    else:
        out.append(Condition("not_archived", True, "not archived"))
    if policy.requires:
        req = policy.requires
        at = facts.required_succeeded_at
        if at is None:
            out.append(Condition("requires", False, f"no rollout of it on {req} has succeeded"))
        elif not facts.required_holds:
            out.append(Condition("requires", False, f"it is no longer current on {req}"))
        elif now - at < policy.hold_s:
            left = policy.hold_s - (now - at)
            out.append(
                Condition(
                    "requires",
                    False,
                    f"succeeded on {req} {now - at:.0f} s ago; must hold {policy.hold_s:g} s "
                    f"({left:.0f} s left)",
                )
            )
        else:
            out.append(Condition("requires", True, f"succeeded on {req} and held {now - at:.0f} s"))
    if policy.no_drift:
        if facts.drifting is None:
            out.append(Condition("no_drift", True, "not measured (no drift data)"))
        else:
            out.append(
                Condition(
                    "no_drift",
                    not facts.drifting,
                    "a drift alert is raised for it" if facts.drifting else "no drift alert",
                )
            )
    if policy.accuracy_tolerance is not None:
        a, c = facts.accuracy, facts.current_accuracy
        if a is None or c is None:
            out.append(Condition("accuracy", True, "not measured (no labelled feedback yet)"))
        else:
            ok = a >= c - policy.accuracy_tolerance
            out.append(
                Condition(
                    "accuracy",
                    ok,
                    f"field accuracy {a:.3f} vs current {c:.3f} "
                    f"(tolerance {policy.accuracy_tolerance:g})",
                )
            )
    return out


def failed(conditions: Iterable[Condition]) -> list[Condition]:
    return [c for c in conditions if not c.ok]


# lineage ----------------------------------------------------------------------------------
def previous_bundle(history: Sequence[Mapping[str, Any]], current: str | None) -> str | None:
    """The bundle a demotion returns to (rule 4). ``history``: one channel's rows, newest
    first. It is the bundle the channel held before the promotion that made ``current``."""
    moves = [h for h in history if h.get("action") in MOVES]
    for i, h in enumerate(moves):
        if h["action"] == "promote" and h["sha256"] == current:
            for older in moves[i + 1 :]:
                if older["sha256"] and older["sha256"] != current:
                    return str(older["sha256"])
            return None
    return None


def revert_needed(rollout_state: str) -> bool:
    """A promotion whose rollout ended this way leaves the channel where it was (rule 3)."""
    return rollout_state in ("halted", "aborted", "rolled_back")


# following --------------------------------------------------------------------------------
TAG_PREFIX = "channel:"


def effective(
    assigned: str | None, reported: str | None, manual_tags: Iterable[str] = ()
) -> str | None:
    """Rule 1's precedence: the server's assignment, a manual ``channel:NAME`` tag (the
    first in sorted order), then what the agent reports."""
    tagged = sorted(t[len(TAG_PREFIX) :] for t in manual_tags if t.startswith(TAG_PREFIX))
    return assigned or (tagged[0] if tagged else None) or reported or None


def resolve(
    name: str | None, device_model: str | None, offered: Iterable[str]
) -> tuple[str, str] | None:
    """(model, channel) a device follows (rule 1). ``offered``: the candidate models for a
    device that runs none (the service narrows them as rule 1 says)."""
    if not name:
        return None
    model, sep, channel = name.partition("/")
    if sep:
        return (model, channel) if model and channel else None
    if device_model:
        return device_model, name
    models = sorted(set(offered))
    return (models[0], name) if len(models) == 1 else None


@dataclass(frozen=True)
class DeviceView:
    device_id: str
    online: bool
    model: str | None
    version: str | None
    release: int | None
    busy: bool = False  # in an active rollout (running/paused, or queued in a live one)
    failed_current: bool = False  # already failed a delivery of the current bundle


@dataclass(frozen=True)
class Target:
    """A channel's current bundle."""

    model: str
    channel: str
    sha256: str
    version: str
    release: int


@dataclass
class CatchUp:
    """One channel's decision for this tick."""

    send: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)  # device → why (sent or not)
    ahead: list[str] = field(default_factory=list)
    waiting: str = ""  # why nothing is sent this tick


def lag_reason(dev: DeviceView, target: Target) -> str | None:
    """Why ``dev`` should receive ``target`` (None: it runs it, or is ahead of it)."""
    if dev.model is None:
        return "late joiner: runs no model yet"
    if dev.model != target.model:
        return f"runs {dev.model}, not {target.model}"
    if dev.version == target.version:
        return None
    if dev.release is not None and dev.release > target.release:
        return None
    return f"drift back: runs {dev.version}, the channel is at {target.version}"


def device_status(dev: DeviceView, target: Target | None) -> str:
    """One phrase for a device of a channel: on it, ahead of it, or why it lags."""
    if target is None:
        return "the channel has no bundle yet"
    if (
        dev.model == target.model
        and dev.version != target.version
        and dev.release is not None
        and dev.release > target.release
    ):
        return f"ahead of the channel ({dev.version}); not sent an older release"
    return lag_reason(dev, target) or "on the channel's version"


def rollout_moving(state: str, stages: Sequence[str], devices: Iterable[tuple[int, str]]) -> bool:
    """Whether a channel rollout still holds back the next batch (rule 5). ``stages``: the
    stage states in order; ``devices``: (stage index, device state) pairs."""
    if state not in ROLLOUT_ACTIVE:
        return False
    if state == "created":
        return True
    started = {i for i, s in enumerate(stages) if s in STAGE_STARTED}
    return any(i in started and st in DEVICE_UNSETTLED for i, st in devices)


def rollout_stalled(state: str, stages: Sequence[str], devices: Iterable[tuple[int, str]]) -> bool:
    """Running or paused, yet nothing of it can move any more (rule 5)."""
    return state in ROLLOUT_MOVING and not rollout_moving(state, stages, devices)


def plan_catch_up(target: Target, devices: Iterable[DeviceView], channel_busy: str) -> CatchUp:
    """The late joiners and drifted devices of one channel to deliver to now (rule 5).

    ``channel_busy``: the id of a moving rollout of this channel ("" when none).
    """
    out = CatchUp()
    for dev in sorted(devices, key=lambda d: d.device_id):
        if (
            dev.model == target.model
            and dev.version != target.version
            and dev.release is not None
            and dev.release > target.release
        ):
            out.ahead.append(dev.device_id)
            out.reasons[dev.device_id] = (
                f"ahead of the channel: runs {dev.version} (release {dev.release}) above "
                f"{target.version}; not sent an older release"
            )
            continue
        why = lag_reason(dev, target)
        if why is None:
            continue
        if dev.failed_current:
            out.reasons[dev.device_id] = f"{why}; failed a delivery of it before: not retried"
        elif not dev.online:
            out.reasons[dev.device_id] = f"{why}; offline"
        elif dev.busy:
            out.reasons[dev.device_id] = f"{why}; in another active rollout"
        else:
            out.send.append(dev.device_id)
            out.reasons[dev.device_id] = why
    if out.send and channel_busy:
        out.waiting = f"rollout {channel_busy} of this channel is still active"
        out.send = []
    return out
