"""The fleet measuring itself: the driver around the pure measuring modules.

:class:`Measures` is built by :class:`~fleet_server.service.FleetService` and fed by it
(metrics, sketches the drift engine accepted, command status, the tick). It owns

- :class:`~.cohort_drift.CohortDrift` — drift per device, per profile and per tag;
- :class:`~.field_accuracy.FieldAccuracy` — labelled feedback per version and device;
- :mod:`.calibration` — field benchmark samples, measured speed factors and latency
  outliers, and :meth:`Measures.bench`, which sends signed ``benchmark`` commands;
- :class:`~.health_rules.HealthRules` — standing alerts, carried out here: the alert topic
  (``Alert(kind="health")``, also an ``alert`` event for the dashboard), the ``[hooks]``
  webhook/command and a Prometheus gauge;
- :meth:`Measures.rollout_inputs` — the hold-gate inputs of a rollout (rule 7 of
  :mod:`.rollout_engine`), measured on that rollout's installed devices.

What they keep lives in the registry (:mod:`.measure_store`: the SQLite file, or the
PostgreSQL that ``[registry] url`` names, where every server process sees all of it).

Every method catches nothing it cannot name: storage errors reach the caller, and the
service's tick logs them.
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from protocol.errors import EdgefleetError
from protocol.messages import (
    Alert,
    BenchmarkPayload,
    Command,
    CommandStatus,
    MetricsReport,
    SketchReport,
)

from . import calibration
from .cohort_drift import CohortDrift, describe
from .delivery import parse_command_id, signed
from .errors import InvalidInput, NotFound, StorageError
from .field_accuracy import FieldAccuracy
from .health_rules import DeviceSample, HealthConfig, HealthRules, Transition
from .measure_store import open_measure_stores
from .rollout_engine import Rollout, Selector, Telemetry, stage_order

log = logging.getLogger(__name__)

MAX_BENCH_DEVICES = 1000
ROLLOUT_INPUTS_EVERY_S = 2.0
FLUSH_EVERY_S = 5.0  # per-device windows are written at most this often (and on every read)
# a process whose tick does not flush them (one that does not hold the rollout tick) writes
# them from the ingest path once they have waited this long
INGEST_FLUSH_AFTER_S = 2 * FLUSH_EVERY_S
# New metrics are evaluated on the next tick. Without them only the time-based offline rule
# can change, so that pass runs every twentieth of its smallest limit, within these bounds
# (the 600 s default: every 30 s; an alert fires or resolves at most 5 % of its limit late).
HEALTH_EVERY_S = 1.0
HEALTH_EVERY_MAX_S = 30.0
# The health pass and the local-drift pass read every device. Once a pass costs more than
# SLOW_PASS_S it runs at most PASS_DUTY of the time (100,000 devices: the health pass about
# once a minute, against the offline rule's 600 s default), so the API and ingest keep the
# server at any fleet size.
SLOW_PASS_S = 0.02
PASS_DUTY = 0.05


def time_pass_every(cfg: HealthConfig) -> float:
    """Seconds between health passes that no new metrics asked for (see HEALTH_EVERY_S)."""
    limits = [cfg.offline_after_s]
    limits += [float(o["offline_after_s"]) for o in cfg.profiles.values() if "offline_after_s" in o]
    return min(HEALTH_EVERY_MAX_S, max(HEALTH_EVERY_S, min(limits) / 20))


class _Paced:
    """Spaces out a pass over every device by what the last one cost (real time)."""

    def __init__(self) -> None:
        self.after = 0.0  # time.monotonic() before which the pass waits

    def ready(self) -> bool:
        return time.monotonic() >= self.after

    def run(self, fn: Callable[[], None]) -> None:
        started = time.monotonic()
        fn()
        cost = time.monotonic() - started
        self.after = started + cost / PASS_DUTY if cost > SLOW_PASS_S else 0.0


MAX_PROFILES = 1000  # distinct profile names whose budget is cached


@dataclass
class _Window:
    """The newest metrics window of a device (what the health rules and outliers read)."""

    window_end: float
    model: str | None
    version: str | None
    requests: int
    errors: int
    fallbacks: int
    p95_ms: float | None
    disk_free_mb: float | None
    disk_full: bool


class Measures:
    def __init__(self, service: Any) -> None:
        self.service = service
        self.stores = open_measure_stores(service.config, service.repo)
        self.health_config = HealthConfig.from_dict(dict(service.config.health))
        self.rules = HealthRules(self.health_config)
        self._health_every = time_pass_every(self.health_config)
        self.accuracy = FieldAccuracy(self.stores.feedback)
        self.bench_store = self.stores.bench
        drift = service.drift
        self.cohorts: CohortDrift | None = None
        if drift is not None:
            self.cohorts = CohortDrift(
                self.stores.cohorts, drift.config, drift.reference, self._device_info
            )
            drift.describe_scope = self._describe_scope
        self._lock = threading.Lock()
        self._windows: dict[str, _Window] = {}
        self._budgets: dict[str, float | None] = {}
        self._rollout_cache: dict[str, tuple[float, dict[str, Any]]] = {}
        self._new_metrics = False
        self._last_health = 0.0
        self._health_pace, self._drift_pace = _Paced(), _Paced()
        self._last_flush = 0.0
        self._flushed_at = time.monotonic()
        self.hook: Callable[[dict[str, Any]], Any] | None = None
        if self.health_config.hook:
            from .hooks import make_hook

            hooks = service.config.hooks
            self.hook = make_hook(hooks.drift_webhook, hooks.drift_command)
        exporter = getattr(service, "exporter", None)
        if exporter is not None and hasattr(exporter, "alerts_source"):
            exporter.alerts_source = self.firing

    # input --------------------------------------------------------------------------------
    def on_metrics(self, msg: MetricsReport) -> None:
        end = msg.window_end.timestamp()
        w = _Window(
            window_end=end,
            model=msg.model.name if msg.model else None,
            version=msg.model.version if msg.model else None,
            requests=max(0, msg.requests),
            errors=min(max(0, msg.errors), max(0, msg.requests)),
            fallbacks=min(max(0, msg.fallbacks), max(0, msg.requests)),
            p95_ms=_finite(msg.latency.p95_ms),
            disk_free_mb=_finite(msg.disk_free_mb),
            disk_full="disk_full" in msg.conditions,
        )
        with self._lock:
            have = self._windows.get(msg.device_id)
            if have is None or end >= have.window_end:
                self._windows[msg.device_id] = w
                self._new_metrics = True
        self.accuracy.ingest(msg)

    def on_sketch(self, msg: SketchReport) -> None:
        """A report the fleet-wide drift engine accepted (duplicates already dropped)."""
        if self.cohorts is not None:
            self.cohorts.ingest(msg)
            if time.monotonic() - self._flushed_at >= INGEST_FLUSH_AFTER_S:
                try:
                    self._flush_cohorts()
                except StorageError as exc:  # the windows stay in memory for the next flush
                    log.warning("writing per-device drift windows failed: %s", exc)

    def _flush_cohorts(self) -> None:
        assert self.cohorts is not None
        self._flushed_at = time.monotonic()
        self.cohorts.flush()

    def on_status(self, msg: CommandStatus) -> None:
        """Keep the numbers of a field benchmark we asked for: the answer to a ``benchmark``
        command this server sent to this device, or a benchmark a device reports with the
        ``installed`` status of a rollout's deploy (``result.benchmark``)."""
        result = msg.result or {}
        sha: str | None = None
        if msg.state == "done" and "p50_ms" in result:
            issued = self.bench_store.issued(msg.command_id, msg.device_id)
            sha = issued["bundle_sha256"] if issued else None
        elif msg.state == "installed" and isinstance(result.get("benchmark"), dict):
            result = result["benchmark"]
            parsed = parse_command_id(msg.command_id)
            if parsed is not None and parsed[1] == msg.device_id and parsed[2] == "deploy":
                r = self.service.rollouts.live.get(parsed[0])
                sha = r.spec.bundle_sha256 if r is not None else None
        if sha is None:
            return
        bundle = self.service.repo.get_bundle(sha)
        device = self.service.repo.get_device(msg.device_id) or {}
        if bundle is None:
            return
        sample = calibration.bench_sample(
            msg.device_id, str(device.get("profile") or ""), result, bundle, self.service.clock()
        )
        if sample is not None:
            self.bench_store.add(msg.command_id, sample)

    def flush(self) -> None:
        """Write what is held in memory (the service calls this when it stops)."""
        if self.cohorts is not None:
            self.cohorts.flush()

    # the tick -----------------------------------------------------------------------------
    def tick(self, now: float, drift_due: bool) -> None:
        due = self._new_metrics or now - self._last_health >= self._health_every
        if due and self._health_pace.ready():
            self._new_metrics = False
            self._last_health = now
            self._health_pace.run(lambda: self._health(now))
        if self.cohorts is not None:
            self.cohorts.drain()
            if now - self._last_flush >= FLUSH_EVERY_S:
                self._last_flush = now
                self._flush_cohorts()
            if drift_due and self._drift_pace.ready():
                self._drift_pace.run(lambda: self._local_drift(now))

    def _device_info(self) -> dict[str, tuple[str, list[str]]]:
        return {
            d["device_id"]: (d.get("profile") or "", list(d.get("tags") or []))
            for d in self.service.repo.list_devices()
        }

    def _budget(self, profile: str) -> float | None:
        """The latency budget of a profile a device names (a name, never a path)."""
        if profile not in self._budgets:
            if len(self._budgets) >= MAX_PROFILES or not calibration.profile_name_ok(profile):
                return None
            try:
                from protocol.profiles import load_profile

                self._budgets[profile] = load_profile(profile).latency_budget_ms
            except EdgefleetError:
                self._budgets[profile] = None
        return self._budgets[profile]

    def samples(self) -> list[DeviceSample]:
        out = []
        with self._lock:
            windows = dict(self._windows)
        for d in self.service.repo.list_devices():
            w = windows.get(d["device_id"])
            profile = d.get("profile") or ""
            current = w is not None and (w.model, w.version) == (d.get("model"), d.get("version"))
            out.append(
                DeviceSample(
                    device_id=d["device_id"],
                    profile=profile,
                    tags=tuple(d.get("tags") or ()),
                    online=bool(d.get("online")),
                    last_seen=d.get("last_seen"),
                    window_end=w.window_end if w else None,
                    requests=w.requests if w and current else 0,
                    errors=w.errors if w and current else 0,
                    fallbacks=w.fallbacks if w and current else 0,
                    p95_ms=w.p95_ms if w and current else None,
                    disk_free_mb=w.disk_free_mb if w else None,
                    disk_full=w.disk_full if w else False,
                    budget_ms=self._budget(profile) if profile else None,
                )
            )
        return out

    def _health(self, now: float) -> None:
        for t in self.rules.evaluate(self.samples(), now):
            self._deliver(t)

    def _deliver(self, t: Transition) -> None:
        alert = Alert(kind="health", message=t.message, details=t.to_dict())
        device = t.subject if t.scope == "device" else None
        self.service.audit_log.event(
            "alert", t.message, device_id=device, alert_kind="health", details=t.to_dict()
        )
        transport = self.service.transport
        if transport is not None:
            try:
                transport.publish(self.service.topics.alerts(), alert.to_json(), qos=1)
            except Exception:  # a broker outage must not stop the rules
                log.exception("publishing the health alert failed")
        if self.hook is not None:
            try:
                self.hook({"kind": "health", **t.to_dict()})
            except Exception:
                log.exception("health hook failed")

    def firing(self) -> list[dict[str, Any]]:
        return [a.to_dict() for a in self.rules.firing()]

    # drift by scope -----------------------------------------------------------------------
    def _describe_scope(self, result: Any) -> tuple[str, dict[str, Any]] | None:
        if self.cohorts is None:
            return None
        summary = self.cohorts.scope_summary(result.model, result.version, result.window_start)
        if summary is None:
            return None
        self.cohorts.mark_alerted(result.model, result.version, result.window_start)
        return describe(result.model, result.version, summary), summary

    def _local_drift(self, now: float) -> None:
        """Alert on drift that only some devices or cohorts show (the merge may hide it)."""
        assert self.cohorts is not None
        versions = {
            (d.get("model"), d.get("version"))
            for d in self.service.repo.list_devices()
            if d.get("model") and d.get("version")
        }
        for model, version in sorted(versions):
            try:
                summary = self.cohorts.local_alert(model, version, now)
            except EdgefleetError as exc:
                log.warning("drift by device of %s %s failed: %s", model, version, exc)
                continue
            if summary is None:
                continue
            self.service.publish_alert(
                Alert(
                    kind="drift",
                    model=model,
                    version=version,
                    message=describe(model, version, summary),
                    details={"scope": summary, "window_start": summary["window_start"]},
                )
            )

    def drift_by(
        self,
        by: str,
        model: str | None = None,
        version: str | None = None,
        device: str | None = None,
        evaluate: bool = True,
    ) -> list[dict[str, Any]]:
        """Latest drift per ``device``, ``tag`` or ``profile`` (drifted first)."""
        if by not in ("device", "tag", "profile", "all"):
            raise InvalidInput("by must be device, tag, profile or all", field="by")
        if self.cohorts is None:
            return []
        if evaluate:
            pairs = {(model, version)} if model and version else self._versions(model)
            for m, v in sorted(pairs):
                self.cohorts.evaluate(m, v, now=self.service.clock())
        return self.cohorts.stored(
            model, version, None if by == "all" else by, subject=device, features=device is not None
        )

    def _versions(self, model: str | None) -> set[tuple[str, str]]:
        return {
            (b["name"], b["version"])
            for b in self.service.repo.list_bundles()
            if model is None or b["name"] == model
        }

    # field accuracy -----------------------------------------------------------------------
    def accuracy_report(
        self, model: str | None = None, version: str | None = None, by: str = "version"
    ) -> list[dict[str, Any]]:
        if by not in ("version", "device"):
            raise InvalidInput("by must be version or device", field="by")
        return self.accuracy.report(model, version, by=by)

    # calibration --------------------------------------------------------------------------
    def calibration(self) -> dict[str, Any]:
        """Measured speed factor per profile, next to the estimate, plus outliers."""
        from protocol.profiles import load_profile

        derived = calibration.derive(self.bench_store.samples())
        profiles = []
        for name, c in derived.items():
            try:
                if not calibration.profile_name_ok(name):
                    raise EdgefleetError(f"{name!r} is not a profile name")
                p = load_profile(name)
                estimate, basis = p.speed_factor, p.speed_basis()
            except EdgefleetError:
                estimate, basis = None, "unknown profile"
            profiles.append({**c, "estimate": estimate, "profile_file_basis": basis})
        bench_outliers = [
            {**o, "profile": c["profile"], "source": "field benchmark"}
            for c in derived.values()
            for o in c["outliers"]
        ]
        return {
            "profiles": profiles,
            "outliers": bench_outliers + self.latency_outliers(),
            "samples": len(self.bench_store.samples()),
        }

    def latency_outliers(self) -> list[dict[str, Any]]:
        with self._lock:
            windows = dict(self._windows)
        rows = []
        for d in self.service.repo.list_devices():
            w = windows.get(d["device_id"])
            if w is None or w.p95_ms is None or not w.requests:
                continue
            rows.append(
                {
                    "device_id": d["device_id"],
                    "profile": d.get("profile") or "",
                    "model": w.model,
                    "version": w.version,
                    "p95_ms": w.p95_ms,
                }
            )
        return calibration.latency_outliers(rows)

    def bench_samples(self, profile: str | None = None) -> list[dict[str, Any]]:
        return self.bench_store.samples(profile)

    def bench(
        self, bundle_ref: str, selector: str = "", sample: int = 10, runs: int = 200
    ) -> dict[str, Any]:
        """Send a signed ``benchmark`` command to up to ``sample`` online devices running
        the bundle and matching ``selector`` (chosen by hash order: a re-run picks the same)."""
        svc = self.service
        bundle = svc.registry.find_bundle(bundle_ref)
        sel = Selector.parse(selector)
        if not 1 <= sample <= MAX_BENCH_DEVICES:
            raise InvalidInput(f"sample must be 1..{MAX_BENCH_DEVICES}", field="sample")
        try:
            payload = BenchmarkPayload(runs=runs, bundle_sha256=bundle["sha256"])
        except ValueError:
            raise InvalidInput("runs must be 10..100000", field="runs") from None
        chosen = [
            d
            for d in svc.repo.list_devices()
            if d.get("online")
            and sel.matches(d["device_id"], d.get("profile") or "", d.get("tags") or [])
            and (d.get("model"), d.get("version")) == (bundle["name"], bundle["version"])
        ]
        if not chosen:
            raise NotFound(
                f"no online device matching {sel} runs {bundle['name']} {bundle['version']}",
                field="selector",
            )
        run_id = f"fb{int(svc.clock() * 1000):x}"
        chosen.sort(key=lambda d: stage_order(run_id, d["device_id"]))
        picked = sorted(d["device_id"] for d in chosen[:sample])
        if svc.sender is None:
            raise NotFound("the fleet server has no broker connection", field="broker")
        commands = []
        for dev in picked:
            cmd = Command(
                command_id=f"{run_id}-{dev}"[:128],
                device_id=dev,
                kind="benchmark",
                benchmark=payload,
            )
            cmd = signed(cmd, svc.key, now=None, ttl_s=svc.config.signing.command_ttl_s)
            self.bench_store.issue(cmd.command_id, dev, bundle["sha256"], svc.clock())
            svc.sender.command(cmd)
            commands.append(cmd.command_id)
        svc.audit_log.audit(
            "api",
            "bench.start",
            f"bundle:{bundle['sha256']}",
            f"field benchmark of {bundle['name']} {bundle['version']} on {len(picked)} devices",
        )
        return {
            "run_id": run_id,
            "bundle": {k: bundle[k] for k in ("sha256", "name", "version")},
            "devices": picked,
            "command_ids": commands,
            "runs": runs,
        }

    # device page --------------------------------------------------------------------------
    def device_view(self, device_id: str) -> dict[str, Any]:
        drift = self.drift_by("device", device=device_id, evaluate=False) if self.cohorts else []
        return {
            "drift": drift,
            "accuracy": self.accuracy.report(by="device", device=device_id),
            "outliers": [o for o in self.latency_outliers() if o["device_id"] == device_id],
            "health": [
                a
                for a in self.firing()
                if a["subject"] == device_id or device_id in a.get("devices", [])
            ],
            "bench": [s for s in self.bench_store.samples() if s["device_id"] == device_id][-5:],
        }

    # rollout hold-gate inputs -------------------------------------------------------------
    def rollout_inputs(self, r: Rollout, now: float) -> dict[str, Any]:
        spec = r.spec
        if not (
            spec.hold_on_profile_budget
            or spec.hold_on_own_drift
            or spec.accuracy_margin is not None
        ):
            return {}
        cached = self._rollout_cache.get(r.rollout_id)
        if cached is not None and now - cached[0] < ROLLOUT_INPUTS_EVERY_S:
            return cached[1]
        bundle = self.service.repo.get_bundle(spec.bundle_sha256)
        if bundle is None:
            return {}
        name, version = bundle["name"], bundle["version"]
        installed = sorted(d.device_id for d in r.devices.values() if d.state == "installed")
        out: dict[str, Any] = {}
        if spec.hold_on_profile_budget:
            out["profile_p95"] = self._profile_p95(installed, name, version)
        if spec.hold_on_own_drift and self.cohorts is not None and installed:
            res = self.cohorts.group(name, version, installed, now=now, name=r.rollout_id)
            if res is not None and res.evaluated:
                out["own_drift"] = res.dataset_drift
                per_device = {
                    x.subject
                    for x in self.cohorts.evaluate(name, version, now=now)
                    if x.scope == "device" and x.dataset_drift
                }
                out["own_drifted_devices"] = tuple(sorted(per_device & set(installed)))
        if spec.accuracy_margin is not None:
            new = self.accuracy.version(name, version)  # wherever the new version runs
            old_version = self.accuracy.previous_version(name, version)
            if old_version is not None and new["value"] is not None:
                old = self.accuracy.version(name, old_version)
                out.update(
                    accuracy_metric=new["metric"],
                    accuracy_new=new["value"],
                    labels_new=new["labelled"],
                    accuracy_old=old["value"],
                    labels_old=old["labelled"] if old["metric"] == new["metric"] else 0,
                    old_version=old_version,
                )
        self._rollout_cache[r.rollout_id] = (now, out)
        return out

    def _profile_p95(
        self, installed: list[str], model: str, version: str
    ) -> tuple[tuple[str, float, float, int], ...]:
        """Per profile: the median of the installed devices' recent p95, and its budget."""
        with self._lock:
            windows = {d: self._windows.get(d) for d in installed}
        profiles = {
            d["device_id"]: d.get("profile") or "" for d in self.service.repo.list_devices()
        }
        groups: dict[str, list[float]] = {}
        for d, w in windows.items():
            if w is None or w.p95_ms is None or (w.model, w.version) != (model, version):
                continue
            groups.setdefault(profiles.get(d, ""), []).append(w.p95_ms)
        out = []
        for profile, values in sorted(groups.items()):
            budget = self._budget(profile) if profile else None
            if budget is None:
                continue
            out.append((profile, float(statistics.median(values)), float(budget), len(values)))
        return tuple(out)

    def extend(self, r: Rollout, base: Telemetry | None, now: float) -> Telemetry | None:
        """The engine's telemetry with the hold-gate inputs added (None stays None without)."""
        extra = self.rollout_inputs(r, now)
        if not extra:
            return base
        return replace(base if base is not None else Telemetry(), **extra)


def _finite(value: float | None) -> float | None:
    """A number a device sent, or None when it is not a finite, non-negative one."""
    if value is None or not math.isfinite(value) or value < 0:
        return None
    return float(value)
