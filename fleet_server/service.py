"""``FleetService``: the fleet in one object, for the API, the CLI, the dashboard and the demo.

A thin facade over the parts, each of which can run in any process on one registry:

- :class:`~.registry.Registry` — bundles (verified, stored) and devices (rows, tags,
  enrolled identities);
- :class:`~.access.Access` — API tokens and dashboard users;
- :class:`~.rollout_driver.RolloutDriver` — runs the pure rollout engine and carries out
  its decisions (signed commands, audit, alerts);
- :class:`~.ingest.Ingest` — the MQTT bridge's sink: state, status, metrics, sketches;
- :class:`~.audit_log.AuditLog` — the audit trail and the event stream;
- :mod:`.views` — the documents the API and the dashboard show;
- :class:`~.measures.Measures` and :class:`~.channel_service.ChannelService` — the fleet
  measuring itself, and release channels.

It also owns what they share: the repository, the trust store and the command key, the
MQTT bridge, the drift engine and the Prometheus exporter. :meth:`tick` drives the
engines; :meth:`start` runs it in a background thread together with the bridge.

Every method returns plain dicts (JSON-ready) and raises :class:`~.errors.FleetError`
subclasses for bad input. Methods are thread-safe.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from protocol.device_mac import announce, fleet_kex_key
from protocol.errors import EdgefleetError, ProtocolError
from protocol.messages import Alert, CommandStatus, DeviceState, MetricsReport, SketchReport
from protocol.signing import KeyPair, TrustStore, read_private_key, read_public_key
from protocol.topics import Topics
from protocol.transport import Transport

from . import lists, views
from .access import Access
from .artifacts import ArtifactStore
from .audit_log import AuditLog
from .bridge import Bridge
from .channel_service import ChannelService
from .cluster import Cluster
from .command_signing import CommandSigner
from .config import FleetConfig
from .delivery import Sender
from .device_trust import DeviceTrust
from .drift import DriftConfig, DriftEngine
from .errors import ConfigError
from .hooks import make_hook
from .ingest import Ingest
from .measures import Measures
from .pagination import DEFAULT_LIMIT, Page
from .registry import Registry
from .repository import Repository, drift_database, open_repository
from .rollout_driver import RolloutDriver, RolloutRequest
from .telemetry.prometheus import FleetExporter

__all__ = ["FleetService", "RolloutRequest"]

log = logging.getLogger(__name__)

# The least time between two ticks (or rollout.tick_s when shorter): status reports wake the
# tick, and during a rollout they arrive dozens of times a second.
TICK_GAP_S = 0.05


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
        self.trust = _trust_store(config)
        self.key = _command_key(config, self.trust)
        self.transport = transport
        self.sender = (
            Sender(transport, self.topics, config.rollout.chunk_bytes)
            if transport is not None
            else None
        )
        self.devices = DeviceTrust(self.repo, config.devices, clock)
        if self.key is not None:  # devices agree per-device MAC keys with this fleet key
            self.devices.set_kex(fleet_kex_key(self.key))
        self.command_signer = None if self.key is None else CommandSigner(self.key, self.devices)
        now = self._now  # the parts read the clock through here: tests may replace it
        self.audit_log = AuditLog(self.repo, now)
        self.exporter = FleetExporter()
        hook: Callable[[dict[str, Any]], Any] | None = make_hook(
            config.hooks.drift_webhook, config.hooks.drift_command
        )
        self.drift = DriftEngine(
            drift_database(config, self.repo),
            DriftConfig.from_dict(dict(config.drift)),
            self.publish_alert,
            hook=hook,
        )
        self.drift_every_s = 30.0
        self._last_drift = 0.0
        self.registry = Registry(
            config, self.repo, now, self.audit_log, self.trust, self.devices, self.drift
        )
        self.access = Access(config, self.repo, now, self.audit_log)
        self.measures = Measures(self)  # drift by device/cohort, field accuracy, health alerts
        self.rollouts = RolloutDriver(
            config,
            self.repo,
            now,
            self.registry,
            self.audit_log,
            self.measures,
            self.drift,
            self.exporter,
            self.sender,
            self.command_signer,
            self.publish_alert,
        )
        self.channels = ChannelService(self)  # release channels: promotion, late joiners
        self.cluster = Cluster(self, now)  # several processes: tick lease, takeover, actions
        self.ingest = Ingest(
            self.repo,
            self.registry,
            self.rollouts,
            self.audit_log,
            self.exporter,
            self.drift,
            self.measures,
            self.channels,
            self.cluster,
        )
        self.bridge = (
            Bridge(
                transport,
                self.topics,
                self.ingest,
                mqtt5=config.broker.mqtt5,
                shared_group=config.broker.shared_group,
                trust=self.devices,
            )
            if transport is not None
            else None
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _now(self) -> float:
        return self.clock()

    @property
    def artifacts(self) -> ArtifactStore:
        return self.registry.artifacts

    @property
    def sketches_merged(self) -> int:
        return self.ingest.sketches_merged

    # lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Connect to the broker, start ingest and the background tick."""
        if self.transport is not None and self.bridge is not None:
            self.transport.on_connection_change(self._on_connection)
            # with several processes, statuses only once this one runs the tick (cluster.py)
            self.bridge.start(statuses=not self.cluster.multi)
            self.transport.connect()
        self.cluster.start()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="fleet-tick", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.rollouts.wake.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        self.flush()
        self.cluster.stop()  # after the flush: a process taking the tick reads it all
        if self.transport is not None:
            self.transport.close()
        self.drift.flush()  # the open window is merged in memory; keep it across restarts
        self.measures.flush()

    def _on_connection(self, up: bool) -> None:
        self.audit_log.event(
            "broker", "connected to the broker" if up else "lost the broker connection"
        )
        if up:
            self.announce_kex()

    def announce_kex(self) -> None:
        """Publish the fleet's X25519 key, signed by the command key, retained (at every
        connect: start and reconnects). Never waits for the broker (network thread)."""
        if self.key is None or self.transport is None:
            return
        msg = announce(self.key, datetime.fromtimestamp(self.clock(), timezone.utc))
        try:
            self.transport.publish(self.topics.kex(), msg.to_json(), qos=1, retain=True)
        except Exception as exc:  # devices keep signing with Ed25519 meanwhile
            log.warning("could not announce the fleet key: %s", exc)

    def _run(self) -> None:
        interval = self.config.rollout.tick_s
        wake = self.rollouts.wake
        while not self._stop.is_set():
            wake.wait(interval)
            wake.clear()
            try:
                self.cluster.step()  # the tick where this process holds the tick lease
            except Exception:
                log.exception("fleet tick failed")
            if not self._stop.is_set():  # coalesce a burst of status reports into one tick:
                time.sleep(min(interval, TICK_GAP_S))  # each tick passes over every device

    def tick(self) -> None:
        """Timeouts, gates and pending sends for every live rollout; channels; periodic
        drift checks and the fleet's own measures."""
        now = self.clock()
        self.rollouts.tick(now)
        self.channels.tick()
        drift_due = now - self._last_drift >= self.drift_every_s
        if drift_due:
            self._last_drift = now
            for model, version in sorted(self.registry.running_versions()):
                try:
                    self.drift.evaluate(model, version, now=now)
                except EdgefleetError as exc:
                    log.warning("drift evaluation of %s %s failed: %s", model, version, exc)
        self.measures.tick(now, drift_due)

    def flush(self) -> None:
        """Write changed rollouts, buffered audit entries and events."""
        self.rollouts.flush()

    # bundles and devices ------------------------------------------------------------------
    def upload_bundle(
        self, data: bytes | Path, actor: str = "api", *, sha256: str | None = None
    ) -> dict[str, Any]:
        return self.registry.upload_bundle(data, actor, sha256=sha256)

    def list_bundles(self) -> list[dict[str, Any]]:
        return self.registry.list_bundles()

    def get_bundle(self, ref: str) -> dict[str, Any]:
        return self.registry.get_bundle(ref)

    def list_devices(
        self,
        profile: str | None = None,
        tag: str | None = None,
        version: str | None = None,
        online: bool | None = None,
    ) -> list[dict[str, Any]]:
        return self.registry.list_devices(profile, tag, version, online)

    def get_device(self, device_id: str) -> dict[str, Any]:
        """Device detail: registry row, version history, recent metrics, rollout attempts."""
        d = self.registry.device(device_id)
        d["rollouts"] = views.device_rollouts(self.rollouts.snapshot(), device_id)
        return d

    def tag_device(self, device_id: str, tags: list[str], actor: str = "api") -> dict[str, Any]:
        self.registry.tag_device(device_id, tags, actor)
        return self.get_device(device_id)

    def list_enrolments(self, status: str | None = None) -> list[dict[str, Any]]:
        return self.registry.list_enrolments(status)

    def approve_device(
        self, device_id: str, actor: str = "api", key_id: str | None = None
    ) -> dict[str, Any]:
        """Pin a pending device's key; its kept birth message is applied at once."""
        ident, birth = self.registry.approve_device(device_id, actor, key_id)
        if birth is not None:
            if self.bridge is not None:
                self.bridge.deliver("state", birth)
            else:
                self.ingest.on_state(birth)
        return ident

    def revoke_device(self, device_id: str, actor: str = "api") -> None:
        self.registry.revoke_device(device_id, actor)

    # rollouts -----------------------------------------------------------------------------
    def create_rollout(
        self, req: RolloutRequest, *, actor: str = "api", dry_run: bool = False, force: bool = False
    ) -> dict[str, Any]:
        return self.rollouts.create(req, actor=actor, dry_run=dry_run, force=force)

    def start_rollout(self, rollout_id: str, actor: str = "api") -> dict[str, Any]:
        return self._act(rollout_id, actor, "start")

    def pause_rollout(self, rollout_id: str, actor: str = "api") -> dict[str, Any]:
        return self._act(rollout_id, actor, "pause")

    def resume_rollout(self, rollout_id: str, actor: str = "api") -> dict[str, Any]:
        return self._act(rollout_id, actor, "resume")

    def abort_rollout(self, rollout_id: str, actor: str = "api") -> dict[str, Any]:
        return self._act(rollout_id, actor, "abort")

    def rollback_rollout(self, rollout_id: str, actor: str = "api") -> dict[str, Any]:
        return self._act(rollout_id, actor, "rollback")

    def _act(self, rollout_id: str, actor: str, action: str) -> dict[str, Any]:
        if not self.cluster.leads:  # another process runs the tick: it carries the action out
            self.cluster.forward(rollout_id, action, actor)
            return self.rollout_status(rollout_id)
        return self.rollouts.act(rollout_id, actor, action)

    def list_rollouts(self) -> list[dict[str, Any]]:
        return self.rollouts.rows()

    def rollout_status(self, rollout_id: str) -> dict[str, Any]:
        return self.rollouts.status(rollout_id)

    # logs, access, overview ---------------------------------------------------------------
    def events(
        self, limit: int = 100, rollout_id: str | None = None, device_id: str | None = None
    ) -> list[dict[str, Any]]:
        return self.audit_log.events(limit, rollout_id, device_id)

    def audit(self, limit: int = 100, target: str | None = None) -> list[dict[str, Any]]:
        return self.audit_log.entries(limit, target)

    # cursor pages of every growing list (fleet_server/lists.py) ----------------------------
    def devices_page(
        self, limit: int = DEFAULT_LIMIT, cursor: str | None = None, **filters: Any
    ) -> Page:
        return lists.devices(self.repo, limit, cursor, **filters)

    def bundles_page(self, limit: int = DEFAULT_LIMIT, cursor: str | None = None) -> Page:
        return lists.bundles(self.repo, views.bundle_info, limit, cursor)

    def rollouts_page(self, limit: int = DEFAULT_LIMIT, cursor: str | None = None) -> Page:
        with self.rollouts.lock:
            live = {rid: r.counts() for rid, r in self.rollouts.live.items()}
        return lists.rollouts(self.repo, live, limit, cursor)

    def events_page(self, limit: int = DEFAULT_LIMIT, cursor: str | None = None, **f: Any) -> Page:
        self.flush()
        return lists.events(self.repo, limit, cursor, **f)

    def audit_page(self, limit: int = DEFAULT_LIMIT, cursor: str | None = None, **f: Any) -> Page:
        self.flush()
        return lists.audit(self.repo, limit, cursor, **f)

    def drift_page(self, limit: int = DEFAULT_LIMIT, cursor: str | None = None, **f: Any) -> Page:
        return lists.drift(self.drift, limit, cursor, **f)

    def authenticate_token(self, token: str) -> str | None:
        return self.access.authenticate_token(token)

    def authenticate_user(self, username: str, password: str) -> str | None:
        return self.access.authenticate_user(username, password)

    def create_token(self, role: str, name: str = "", actor: str = "cli") -> str:
        return self.access.create_token(role, name, actor)

    def add_user(self, username: str, password: str, role: str, actor: str = "cli") -> None:
        self.access.add_user(username, password, role, actor)

    def overview(self) -> dict[str, Any]:
        """Devices by profile, version and online state (kept counts in the registry, not a
        device listing); active rollouts; recent alerts."""
        return views.overview(
            self.repo.device_counts(),
            self.list_rollouts(),
            self.events(limit=200),
            self.bridge.stats() if self.bridge else {},
            self.cluster.status(),
        )

    # drift and alerts ---------------------------------------------------------------------
    def drift_results(
        self, model: str | None = None, version: str | None = None, limit: int = 50
    ) -> list[dict[str, Any]]:
        return list(self.drift.results(model=model, version=version, limit=limit))

    def evaluate_drift(self, model: str, version: str) -> dict[str, Any] | None:
        res = self.drift.evaluate(model, version, now=self.clock())
        return None if res is None else res.to_dict()

    def publish_alert(self, alert: Alert) -> None:
        self.audit_log.event(
            "alert",
            alert.message,
            rollout_id=alert.rollout_id,
            alert_kind=alert.kind,
            details=alert.details,
        )
        if self.transport is not None:
            self.transport.publish(self.topics.alerts(), alert.to_json(), qos=1)

    # the bridge's sink (also called directly by tests and tools) --------------------------
    def on_state(self, msg: DeviceState) -> None:
        self.ingest.on_state(msg)

    def on_status(self, msg: CommandStatus) -> None:
        self.ingest.on_status(msg)

    def on_metrics(self, msg: MetricsReport) -> None:
        self.ingest.on_metrics(msg)

    def on_sketch(self, msg: SketchReport) -> None:
        self.ingest.on_sketch(msg)

    def on_dropped(self, reason: str) -> None:
        self.ingest.on_dropped(reason)


def _trust_store(config: FleetConfig) -> TrustStore:
    """The bundle-signing keys; the fleet's own command key is never one of them."""
    try:
        return TrustStore.from_keys(
            [read_public_key(p) for p in config.signing.bundle_keys],
            config.signing.revoked,
            role="bundle",
        )
    except OSError as exc:
        raise ConfigError(
            f"signing.bundle_keys: cannot read {exc.filename}: {exc.strerror}"
        ) from None
    except ProtocolError as exc:
        raise ConfigError(f"signing.bundle_keys: {exc}") from None


def _command_key(config: FleetConfig, trust: TrustStore) -> KeyPair | None:
    if config.signing.command_key is None:
        log.warning("signing.command_key is not set: devices will refuse every command")
        return None
    try:
        key = read_private_key(config.signing.command_key)
    except OSError as exc:
        raise ConfigError(
            f"signing.command_key: cannot read {exc.filename}: {exc.strerror}"
        ) from None
    except ProtocolError as exc:
        raise ConfigError(f"signing.command_key: {exc}") from None
    if key.key_id in trust.keys:
        raise ConfigError(
            f"signing: the command key {key.key_id} is also listed in signing.bundle_keys; "
            "bundles must be signed by a different (offline) key",
            field="signing.bundle_keys",
        )
    trust.other_role.add(key.key_id)  # a bundle signed by it: key_wrong_role
    return key
