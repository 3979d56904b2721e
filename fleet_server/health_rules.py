"""Standing health rules: device metrics and ``now`` in, alert transitions out. Pure.

No I/O, no clock, no threads. :class:`HealthRules` keeps the state of every alert; the
driver (:mod:`fleet_server.measures`) feeds it one :class:`DeviceSample` per device on every
tick and carries out the :class:`Transition` list it returns (alert topic, hook, events,
Prometheus).

Rules
=====

Per device, from the newest metrics window of the device (``window_end`` tells a new
window from one already counted) and its birth/last-will state:

============  ===============================================  ==========================
rule          over when                                        threshold (``[health]``)
============  ===============================================  ==========================
latency       window p95 > budget                              ``p95_ms``, else the
                                                               profile's latency budget
errors        errors / requests > limit                        ``error_rate`` (0.01)
fallbacks     fallbacks / requests > limit                     ``fallback_rate`` (0.05)
offline       offline (or silent) for longer than the limit    ``offline_after_s`` (600)
disk          free disk < limit, or the ``disk_full`` flag     ``disk_free_mb`` (50)
============  ===============================================  ==========================

Rate rules need at least ``min_requests`` requests in the window; fewer leaves the state
as it is (neither over nor under).

Hysteresis: an alert fires after ``fire_after`` consecutive windows over the threshold and
resolves by itself after ``resolve_after`` consecutive windows under ``resolve_ratio`` ×
threshold (between the two lines nothing changes). The offline rule counts time, not
windows: it fires once the limit passed and resolves when the device is back.

Per cohort (each profile, each tag): an alert fires when the device alert of a rule fires on
at least ``cohort_share`` of the cohort's devices with a verdict (and on at least
``cohort_min_devices``), naming those devices and the ones that are not; it resolves when
the share drops below the line (so the devices' hysteresis carries over to the cohort).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

from .errors import ConfigError

Rule = Literal["latency", "errors", "fallbacks", "offline", "disk"]
RULES: tuple[Rule, ...] = ("latency", "errors", "fallbacks", "offline", "disk")
Scope = Literal["device", "profile", "tag"]
DEFAULT_P95_MS = 500.0  # the usual MLOps line, for a device whose profile is unknown


class HealthConfigError(ConfigError):
    """A ``[health]`` value that cannot work (unknown field, negative limit)."""


@dataclass(frozen=True)
class HealthConfig:
    enabled: bool = True
    p95_ms: float | None = None  # None: each profile's latency_budget_ms
    error_rate: float = 0.01
    fallback_rate: float = 0.05
    offline_after_s: float = 600.0
    disk_free_mb: float = 50.0
    min_requests: int = 20
    fire_after: int = 2
    resolve_after: int = 2
    resolve_ratio: float = 0.8
    cohort_share: float = 0.5
    cohort_min_devices: int = 2
    hook: bool = True  # also fire the [hooks] webhook/command with each transition
    # profile name → {p95_ms, error_rate, …} overriding the fields above for that profile
    profiles: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(self)
        names = {f.name for f in fields(self)} - {"profiles"}
        for profile, over in self.profiles.items():
            if not isinstance(over, dict):
                raise HealthConfigError(
                    f"health.profiles.{profile} must be a table", field=f"health.profiles.{profile}"
                )
            unknown = sorted(set(over) - names)
            if unknown:
                where = f"health.profiles.{profile}.{unknown[0]}"
                raise HealthConfigError(f"{where}: unknown field", field=where)
            _check(replace(self, profiles={}, **over))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HealthConfig:
        """Build from the ``[health]`` table; unknown fields name ``health.FIELD``."""
        names = {f.name for f in fields(cls)}
        for key in data:
            if key not in names:
                raise HealthConfigError(f"health.{key}: unknown field", field=f"health.{key}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise HealthConfigError(f"health: {exc}", field="health") from None

    def for_profile(self, profile: str) -> HealthConfig:
        over = self.profiles.get(profile)
        return replace(self, profiles={}, **over) if over else self


def _check(c: HealthConfig) -> None:
    for name in ("error_rate", "fallback_rate", "cohort_share", "resolve_ratio"):
        v = getattr(c, name)
        if not isinstance(v, (int, float)) or not 0 <= v <= 1:
            raise HealthConfigError(f"health.{name} must be in [0, 1], got {v!r}", field=name)
    for name in ("offline_after_s", "disk_free_mb"):
        v = getattr(c, name)
        if not isinstance(v, (int, float)) or v < 0:
            raise HealthConfigError(f"health.{name} must be ≥ 0, got {v!r}", field=name)
    if c.p95_ms is not None and (not isinstance(c.p95_ms, (int, float)) or c.p95_ms <= 0):
        raise HealthConfigError(f"health.p95_ms must be > 0, got {c.p95_ms!r}", field="p95_ms")
    for name in ("min_requests", "fire_after", "resolve_after", "cohort_min_devices"):
        v = getattr(c, name)
        if not isinstance(v, int) or v < (0 if name == "min_requests" else 1):
            raise HealthConfigError(f"health.{name} must be a whole number ≥ 1", field=name)


@dataclass(frozen=True)
class DeviceSample:
    """What the fleet knows about one device now (its newest metrics window, if any)."""

    device_id: str
    profile: str = ""
    tags: tuple[str, ...] = ()
    online: bool = True
    last_seen: float | None = None  # when the server last heard from it
    window_end: float | None = None  # newest metrics window
    requests: int = 0
    errors: int = 0
    fallbacks: int = 0
    p95_ms: float | None = None
    disk_free_mb: float | None = None
    disk_full: bool = False
    budget_ms: float | None = None  # the profile's latency budget (None: DEFAULT_P95_MS)


@dataclass(frozen=True)
class Transition:
    """An alert that started firing or resolved."""

    state: Literal["firing", "resolved"]
    rule: Rule
    scope: Scope
    subject: str  # device id, profile name or tag
    value: float | None
    threshold: float
    message: str
    devices: tuple[str, ...] = ()  # cohort: devices over the line
    healthy: tuple[str, ...] = ()  # cohort: devices under it

    @property
    def key(self) -> str:
        return f"{self.rule}:{self.scope}:{self.subject}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "rule": self.rule,
            "scope": self.scope,
            "subject": self.subject,
            "value": self.value,
            "threshold": self.threshold,
            "message": self.message,
            "devices": list(self.devices),
            "healthy": list(self.healthy),
        }


@dataclass
class AlertState:
    rule: Rule
    scope: Scope
    subject: str
    firing: bool = False
    over: int = 0  # consecutive windows over the threshold
    under: int = 0  # consecutive windows under resolve_ratio × threshold
    last_window: float | None = None
    since: float | None = None
    value: float | None = None
    threshold: float = 0.0
    message: str = ""
    devices: tuple[str, ...] = ()
    healthy: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "scope": self.scope,
            "subject": self.subject,
            "since": self.since,
            "value": self.value,
            "threshold": self.threshold,
            "message": self.message,
            "devices": list(self.devices),
            "healthy": list(self.healthy),
        }


_WHAT = {
    "latency": "p95 latency",
    "errors": "error rate",
    "fallbacks": "fallback rate",
    "offline": "offline for",
    "disk": "free disk",
}


def _fmt(rule: Rule, v: float | None) -> str:
    if v is None:
        return "-"
    if rule == "latency":
        return f"{v:.1f} ms"
    if rule in ("errors", "fallbacks"):
        return f"{v:.1%}"
    if rule == "offline":
        return f"{v:.0f} s"
    return f"{v:.0f} MiB"


def measure(
    rule: Rule, s: DeviceSample, cfg: HealthConfig, now: float
) -> tuple[float | None, float]:
    """(value, threshold) of ``rule`` for one device; value None: no verdict this time."""
    if rule == "latency":
        limit = cfg.p95_ms if cfg.p95_ms is not None else (s.budget_ms or DEFAULT_P95_MS)
        enough = s.requests >= max(1, cfg.min_requests) and s.p95_ms is not None
        return (s.p95_ms if enough else None), float(limit)
    if rule in ("errors", "fallbacks"):
        limit = cfg.error_rate if rule == "errors" else cfg.fallback_rate
        if s.requests < max(1, cfg.min_requests):
            return None, limit
        n = s.errors if rule == "errors" else s.fallbacks
        return n / s.requests, limit
    if rule == "offline":
        if s.online or s.last_seen is None:
            return 0.0, cfg.offline_after_s
        return max(0.0, now - s.last_seen), cfg.offline_after_s
    if s.disk_full:
        return 0.0, cfg.disk_free_mb
    return s.disk_free_mb, cfg.disk_free_mb


def is_over(rule: Rule, value: float, threshold: float) -> bool:
    return value < threshold if rule == "disk" else value > threshold


def is_clear(rule: Rule, value: float, threshold: float, ratio: float) -> bool:
    if rule == "disk":
        return value >= threshold / ratio if ratio > 0 else True
    if rule == "offline":
        return value <= 0.0
    return value <= threshold * ratio


class HealthRules:
    """The state of every standing alert; :meth:`evaluate` is the one entry point."""

    def __init__(self, config: HealthConfig | None = None) -> None:
        self.config = config or HealthConfig()
        self.states: dict[str, AlertState] = {}

    def firing(self) -> list[AlertState]:
        return sorted(
            (a for a in self.states.values() if a.firing),
            key=lambda a: (a.scope != "device", a.rule, a.subject),
        )

    def evaluate(self, samples: list[DeviceSample], now: float) -> list[Transition]:
        if not self.config.enabled:
            return []
        out: list[Transition] = []
        over_by_rule: dict[Rule, dict[str, bool]] = {r: {} for r in RULES}
        for s in sorted(samples, key=lambda x: x.device_id):
            cfg = self.config.for_profile(s.profile)
            for rule in RULES:
                value, limit = measure(rule, s, cfg, now)
                if value is not None:
                    over_by_rule[rule][s.device_id] = is_over(rule, value, limit)
                t = self._device(rule, s, value, limit, cfg, now)
                if t is not None:
                    out.append(t)
        known = {s.device_id for s in samples}
        for key in [k for k, a in self.states.items() if a.scope == "device"]:
            a = self.states[key]
            if a.subject not in known:  # a device that left the registry
                if a.firing:
                    out.append(self._resolve(a, None, "the device is no longer registered"))
                del self.states[key]
        out += self._cohorts(samples, over_by_rule, now)
        return out

    # per device -------------------------------------------------------------------------
    def _device(
        self,
        rule: Rule,
        s: DeviceSample,
        value: float | None,
        limit: float,
        cfg: HealthConfig,
        now: float,
    ) -> Transition | None:
        key = f"{rule}:device:{s.device_id}"
        a = self.states.get(key)
        if a is None:
            a = self.states[key] = AlertState(rule, "device", s.device_id)
        a.threshold = limit
        if value is None:
            return None
        if rule == "offline":
            # time-based: no window counting
            if is_over(rule, value, limit) and not a.firing:
                return self._fire(
                    a,
                    value,
                    now,
                    f"device {s.device_id} is offline for {value:.0f} s (limit {limit:g} s)",
                )
            if a.firing and is_clear(rule, value, limit, cfg.resolve_ratio):
                return self._resolve(a, value, f"device {s.device_id} is back online")
            return None
        if s.window_end is None or s.window_end == a.last_window:
            return None  # this window was already counted
        a.last_window = s.window_end
        a.value = value
        if is_over(rule, value, limit):
            a.over, a.under = a.over + 1, 0
        elif is_clear(rule, value, limit, cfg.resolve_ratio):
            a.over, a.under = 0, a.under + 1
        else:
            a.over = a.under = 0  # between the lines: hold
        if not a.firing and a.over >= cfg.fire_after:
            what = _WHAT[rule]
            rel = "under" if rule == "disk" else "over"
            line = f"the {s.profile or 'device'} budget" if rule == "latency" else "the limit"
            return self._fire(
                a,
                value,
                now,
                f"{what} {_fmt(rule, value)} on device {s.device_id} is {rel} {line} of "
                f"{_fmt(rule, limit)} ({a.over} windows in a row)",
            )
        if a.firing and a.under >= cfg.resolve_after:
            return self._resolve(
                a,
                value,
                f"{_WHAT[rule]} on device {s.device_id} back to {_fmt(rule, value)} "
                f"(limit {_fmt(rule, limit)})",
            )
        return None

    def _device_firing(self, rule: Rule, device: str) -> bool:
        a = self.states.get(f"{rule}:device:{device}")
        return a is not None and a.firing

    def _fire(self, a: AlertState, value: float | None, now: float, message: str) -> Transition:
        a.firing, a.since, a.value, a.message = True, now, value, message
        return Transition(
            "firing", a.rule, a.scope, a.subject, value, a.threshold, message, a.devices, a.healthy
        )

    def _resolve(self, a: AlertState, value: float | None, why: str) -> Transition:
        a.firing, a.since, a.over, a.under = False, None, 0, 0
        a.message = f"resolved: {why}"
        return Transition(
            "resolved",
            a.rule,
            a.scope,
            a.subject,
            value,
            a.threshold,
            a.message,
            a.devices,
            a.healthy,
        )

    # per cohort -------------------------------------------------------------------------
    def _cohorts(
        self, samples: list[DeviceSample], over_by_rule: dict[Rule, dict[str, bool]], now: float
    ) -> list[Transition]:
        cohorts: dict[tuple[Scope, str], list[str]] = {}
        for s in samples:
            if s.profile:
                cohorts.setdefault(("profile", s.profile), []).append(s.device_id)
            for t in s.tags:
                cohorts.setdefault(("tag", t), []).append(s.device_id)
        cfg = self.config
        out: list[Transition] = []
        seen: set[str] = set()
        for (scope, name), members in sorted(cohorts.items()):
            for rule in RULES:
                key = f"{rule}:{scope}:{name}"
                seen.add(key)
                verdicts = {
                    d: self._device_firing(rule, d) for d in members if d in over_by_rule[rule]
                }
                bad = tuple(sorted(d for d, v in verdicts.items() if v))
                good = tuple(sorted(d for d, v in verdicts.items() if not v))
                share = len(bad) / len(verdicts) if verdicts else 0.0
                a = self.states.get(key)
                if a is None:
                    a = self.states[key] = AlertState(rule, scope, name)
                a.threshold, a.value = cfg.cohort_share, share
                hot = len(bad) >= cfg.cohort_min_devices and share >= cfg.cohort_share
                if hot and not a.firing:
                    a.devices, a.healthy = bad, good
                    out.append(
                        self._fire(
                            a,
                            share,
                            now,
                            f"{_WHAT[rule]} over the line on {len(bad)} of {len(verdicts)} "
                            f"devices of {scope} {name}: {', '.join(bad[:8])}"
                            + (f"; not affected: {', '.join(good[:8])}" if good else ""),
                        )
                    )
                elif a.firing and not hot:
                    a.devices, a.healthy = bad, good
                    out.append(
                        self._resolve(
                            a,
                            share,
                            f"{_WHAT[rule]} on {scope} {name}: {len(bad)} of "
                            f"{len(verdicts)} devices over the line",
                        )
                    )
                elif a.firing:
                    a.devices, a.healthy = bad, good
        for key in [k for k, a in self.states.items() if a.scope != "device" and k not in seen]:
            a = self.states.pop(key)
            if a.firing:
                out.append(self._resolve(a, None, f"{a.scope} {a.subject} has no devices left"))
        return out
