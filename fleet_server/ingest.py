"""Ingest: the MQTT bridge's sink. Every device message the bridge admitted lands here.

A device's retained state goes to the registry; a command status to the event log, the
field measures and the rollout driver; metrics to the registry and the measures; a sketch
report to the drift engine (which merges each (device, window, seq) once) and then to the
measures. Every message is also counted for the Prometheus exporter.

With several server processes (:mod:`.cluster`) only the one holding the rollout tick
writes device history and online/offline events and decides on status reports; the others
keep the device rows and feed the measures, so nothing is recorded twice.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from protocol.messages import CommandStatus, DeviceState, MetricsReport, SketchReport
from protocol.states import COMMAND_FINAL

from .audit_log import AuditLog
from .delivery import parse_command_id
from .drift import DriftEngine
from .registry import Registry
from .repository import Repository
from .rollout_driver import RolloutDriver
from .telemetry.prometheus import FleetExporter

if TYPE_CHECKING:
    from .channel_service import ChannelService
    from .cluster import Cluster
    from .measures import Measures


class Ingest:
    def __init__(
        self,
        repo: Repository,
        registry: Registry,
        rollouts: RolloutDriver,
        audit_log: AuditLog,
        exporter: FleetExporter,
        drift: DriftEngine,
        measures: Measures,
        channels: ChannelService,
        cluster: Cluster,
    ) -> None:
        self.repo = repo
        self.registry = registry
        self.rollouts = rollouts
        self.audit_log = audit_log
        self.exporter = exporter
        self.drift = drift
        self.measures = measures
        self.channels = channels
        self.cluster = cluster
        self._count_lock = threading.Lock()
        self.sketches_merged = 0

    def on_state(self, msg: DeviceState) -> None:
        self.exporter.observe_state(msg)
        self.registry.observe_state(msg, record=self.cluster.leads)
        if msg.online:
            self.channels.observe(msg.device_id, msg.channel)
            if self.cluster.leads:  # its unanswered command goes again; a late one goes first
                self.rollouts.device_back(msg.device_id, msg.model, msg.ts)
            else:
                self.rollouts.wake.set()

    def on_status(self, msg: CommandStatus) -> None:
        self.exporter.observe_status(msg)
        self.measures.on_status(msg)
        if not self.cluster.leads:
            return  # the tick holder (which gets every status too) records and decides
        if msg.state in COMMAND_FINAL:  # every verdict is kept, also for commands we did not send
            parsed = parse_command_id(msg.command_id)
            why = f" ({msg.reason})" if msg.reason else ""
            self.audit_log.event(
                "status",
                f"{msg.device_id}: command {msg.command_id} {msg.state}{why}",
                device_id=msg.device_id,
                rollout_id=parsed[0] if parsed else msg.rollout_id,
                command_id=msg.command_id,
                state=msg.state,
                reason=msg.reason,
                detail=msg.detail[:300],
            )
        self.rollouts.on_status(msg)

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
        if self.drift.ingest(msg):
            with self._count_lock:
                self.sketches_merged += 1
            self.measures.on_sketch(msg)

    def on_dropped(self, reason: str) -> None:
        self.exporter.count_dropped(reason)
