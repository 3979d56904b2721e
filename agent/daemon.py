"""The agent daemon: every part of the device composed, started and stopped in order.

    Slots ─ Installer ─▶ Predictor ──observers──▶ PredictionLog   (SQLite, batched)
                             │                  ├▶ Telemetry       (sketch windows → outbox)
                             │                  ├▶ Metrics         (periodic reports → outbox)
                             │                  └▶ ShadowComparer  (→ MetricsReport.shadow)
                             ▼
                  local API (FastAPI on uvicorn, own thread; see api_server)
    Link (MQTT transport, commands, downloads) ◀─▶ Outbox (SQLite) ◀── pump thread:
        download stall checks, metrics every ``sketch.window_seconds``, outbox flush

:class:`Agent` has ``start()``/``stop()`` so tests and the demo can run many agents in one
process (own device id, data dir and API port each; ``api.port = 0`` picks a free port,
see :attr:`Agent.api_url`). :func:`run_agent` is ``edgefleet agent run``: it starts an
agent and stops it gracefully on SIGTERM/SIGINT (open sketch windows are closed into the
outbox, queued predictions are committed, the retained state says offline).

The broker may be down at start or go away at any time: serving never waits on it, the
transport reconnects with backoff, and the outbox keeps everything until it is delivered.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from protocol.device_auth import SigningTransport
from protocol.files import private_dir
from protocol.messages import DeviceState, ModelRef
from protocol.schema import InputSchema
from protocol.topics import Topics
from protocol.transport import Transport

from .api_server import GuardStats
from .commands import CommandProcessor
from .config import AgentConfig
from .download import Downloads
from .events import InstallEvent
from .fieldbench import FieldBench
from .identity import DeviceIdentity
from .installer import Installer
from .link import Link, StateSigner
from .metrics import Metrics
from .outbox import Outbox
from .prediction_log import PredictionLog
from .predictor import Predictor
from .runtimes import runtime_versions
from .shadow import ShadowComparer
from .slots import Slots
from .telemetry import Telemetry, WindowSketcher
from .update import Limits

log = logging.getLogger(__name__)

OUTBOX_FILE = "outbox.db"
PREDICTIONS_FILE = "predictions.db"
# The local API answers on its event-loop thread while the prediction log and the sketcher
# work in their own threads; a request that arrives while one of them runs Python code
# waits for the GIL up to the switch interval (5 ms by default). 0.5 ms bounds that wait.
# Measured with bench/agent_latency.py's clients on the 2-vCPU VM, three paired runs of two
# agents: httpx p99 3.1 / 3.7 / 7.2 ms against 7.5 / 7.3 / 8.1 ms; p50 and throughput
# (1,610 against 1,662 req/s, 4 clients) unchanged within the noise.
GIL_SWITCH_S = 0.0005


def agent_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("edgefleet")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a checkout
        from protocol import __version__

        return __version__


class Agent:
    """One device agent. ``Agent(config).start()`` … ``.stop()``."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        transport: Transport | None = None,
        clock: Callable[[], float] = time.time,
        serve_api: bool = True,
        metrics_interval: float | None = None,
        pump_interval: float = 0.5,
        max_backoff: float = 30.0,
        outbox_max_pages: int | None = None,
        log_max_pages: int | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.serve_api = serve_api
        self.metrics_interval = metrics_interval or config.sketch.window_seconds
        self.pump_interval = pump_interval
        self.max_backoff = max_backoff
        self.topics = Topics(config.broker.topic_prefix)
        self._transport = transport
        self._outbox_max_pages = outbox_max_pages  # tests: a "full disk" without root mounts
        self._log_max_pages = log_max_pages
        self._stop = threading.Event()
        self._pump: threading.Thread | None = None
        self._api_thread: threading.Thread | None = None
        self._server: Any = None
        self.api_stats = GuardStats()
        self._schemas: dict[tuple[str, str], InputSchema] = {}
        self.api_url: str | None = None
        self.started = False
        self.direct_published = 0  # reports sent around a full outbox
        self.lost_reports = 0  # reports neither stored nor sent (full disk and offline)
        self._log_errors_seen = 0

    # -- composition -----------------------------------------------------------------------
    def start(self) -> Agent:
        cfg = self.config
        dev = cfg.device_id
        private_dir(cfg.data_dir)
        self.identity = DeviceIdentity(dev, cfg.data_dir, cfg.enrol.token())
        self.states = StateSigner(self.topics, self.identity)
        self.slots = Slots(cfg.data_dir / "slots", cfg.slots.keep_previous)
        profile = cfg.device_profile()
        self.predictor = Predictor.from_config(cfg)
        self.installer = Installer(
            cfg,
            self.slots,
            cfg.trust_store(),
            profile,
            on_event=self._on_install_event,
            on_activate=self.predictor.swap,
        )
        self.outbox = Outbox(
            cfg.data_dir / OUTBOX_FILE, cfg.outbox.max_bytes, max_page_count=self._outbox_max_pages
        )
        self.sketcher = WindowSketcher(
            dev,
            schemas=self._schema_for,
            next_seq=lambda: self.outbox.next_seq("sketch"),
            window_seconds=cfg.sketch.window_seconds,
            window_rows=cfg.sketch.window_rows,
            k=cfg.sketch.k,
        )
        self.telemetry = Telemetry(self.sketcher, self._queue_sketch, clock=self.clock)
        self.shadow = ShadowComparer(running=lambda: self.predictor.shadow is not None)
        self.prediction_log = (
            PredictionLog(cfg.data_dir / PREDICTIONS_FILE, cfg.log, max_pages=self._log_max_pages)
            if cfg.log.enabled
            else None
        )
        self.metrics = Metrics(
            dev,
            next_seq=lambda: self.outbox.next_seq("metrics"),
            data_dir=cfg.data_dir,
            clock=self.clock,
            shadow=self.shadow.snapshot,
            gauges=self._gauges,
            conditions=[self.outbox.conditions, self._conditions]
            + ([self.prediction_log.conditions] if self.prediction_log else []),
        )
        for obs in (self.prediction_log, self.telemetry, self.metrics, self.shadow):
            if obs is not None:
                self.predictor.add_observer(obs)
        if self.prediction_log is not None:
            self.prediction_log.start()
        self.telemetry.start()
        if self.serve_api:
            try:
                self._start_api()
            except BaseException:
                self.telemetry.stop()
                if self.prediction_log is not None:
                    self.prediction_log.close()
                self.outbox.close()
                raise
        own = f"{self.topics.prefix}/devices/{dev}/"
        self.transport = SigningTransport(
            self._transport or self._paho(), self.identity.signer, lambda t: t.startswith(own)
        )
        self.downloads = Downloads(cfg.data_dir / "downloads", clock=self.clock)
        self.processor = CommandProcessor(
            dev,
            ledger=self.outbox,
            trust=self.installer.trust,
            command_trust=cfg.command_trust(),
            origins=tuple(cfg.trust.artifact_origins),
            limits=Limits(clock_skew_s=cfg.trust.clock_skew_s),
            downloads=self.downloads,
            installer=self.installer,
            predictor=self.predictor,
            report=self._report_status,
            on_model_change=self._model_changed,
            benchmark=FieldBench(
                self.slots, threads=self.installer.threads, profile=profile.name, device_id=dev
            ),
            apply_config=self.apply_config,
            bench_after_install=cfg.runtime.bench_after_install,
        )
        # commands MAC'd with the key agreed with the fleet verify from the first one on
        self.processor.update.agreed = self.identity.agreed
        self._restore_kex()
        self.link = Link(
            dev,
            self.topics,
            self.transport,
            self.outbox,
            self.processor,
            self.birth,
            states=self.states,
            on_kex=self._on_kex,
        )
        self.link.start()
        self._stop.clear()
        self._pump = threading.Thread(target=self._run_pump, name=f"agent-pump-{dev}", daemon=True)
        self._pump.start()
        self.started = True
        log.info(
            "agent %s started (api %s, broker %s)",
            dev,
            self.api_url,
            ", ".join(cfg.broker.all_urls()),
        )
        return self

    def _restore_kex(self) -> None:
        from datetime import datetime, timezone

        now = datetime.fromtimestamp(self.clock(), timezone.utc)
        why = self.identity.restore_kex(self.processor.command_trust, now)
        if why not in (None, "none"):
            log.warning("saved fleet key announcement not used: %s", why)

    def _on_kex(self, payload: bytes) -> None:
        """The fleet's key announcement (network thread): MAC device messages once it verifies."""
        from datetime import datetime, timezone

        now = datetime.fromtimestamp(self.clock(), timezone.utc)
        before = self.identity.fleet_kex
        why = self.identity.accept_kex(payload, self.processor.command_trust, now)
        if why is None:
            if self.identity.fleet_kex != before:
                log.info("fleet key agreed: device messages now carry a MAC")
                # the birth tells the fleet it may MAC commands to this device
                self.link.publish_birth()
        else:
            log.warning("fleet key announcement ignored: %s", why)

    def _paho(self) -> Transport:
        from protocol.transport_paho import PahoTransport

        b = self.config.broker
        return PahoTransport(
            b.all_urls(),
            self.config.device_id,
            username=b.username,
            password=b.resolved_password(),
            ca_file=str(b.ca_file) if b.ca_file else None,
            cert_file=str(b.cert_file) if b.cert_file else None,
            key_file=str(b.key_file) if b.key_file else None,
            will=self.states.will(self.birth()),
            clean_session=False,
            max_backoff=self.max_backoff,
        )

    def _start_api(self) -> None:
        from .api_server import listen, make_server
        from .app import create_app

        api = self.config.api
        app = create_app(
            self.predictor,
            config=self.config,
            metrics_text=self._metrics_text,
            status=self.status,
        )
        sock = listen(api.host, api.port)
        port = sock.getsockname()[1]
        self.api_url = f"http://{api.host}:{port}"
        server = make_server(app, api, self.api_stats)
        self._server = server
        self._api_thread = threading.Thread(
            target=server.run,
            kwargs={"sockets": [sock]},
            name=f"agent-api-{self.config.device_id}",
            daemon=True,
        )
        self._api_thread.start()
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline and self._api_thread.is_alive():
            time.sleep(0.01)

    # -- callbacks -------------------------------------------------------------------------
    def birth(self) -> DeviceState:
        cfg = self.config
        active = self.predictor.model
        try:  # the installed versions a rollback can go back to, newest first
            prev = [
                _ref(m)
                for m in self.installer.history()
                if active is None or (m.name, m.version) != (active.name, active.version)
            ]
        except Exception:
            prev = []
        return DeviceState(
            device_id=cfg.device_id,
            online=True,
            agent_version=agent_version(),
            profile=cfg.profile,
            model=active,
            previous=prev,
            runtimes=runtime_versions(),
            tags=list(cfg.tags),
            api_url=self.api_url,
            channel=cfg.channel,
        )

    def _schema_for(self, model: ModelRef) -> InputSchema | None:
        key = (model.name, model.version)
        if key not in self._schemas:
            current = self.predictor.manifest
            if current is not None and (current.name, current.version) == key:
                self._schemas[key] = current.input_schema
            else:
                for m in self.installer.history():
                    if (m.name, m.version) == key:
                        self._schemas[key] = m.input_schema
                        break
        return self._schemas.get(key)

    def _on_install_event(self, event: InstallEvent) -> None:
        log.info("install: %s %s %s", event.state, event.reason or "", event.detail)

    def _model_changed(self) -> None:
        self.link.publish_birth()

    def _queue(self, kind: str, topic: str, message: Any) -> None:
        if self.outbox.put_message(kind, topic, message):
            if hasattr(self, "link"):
                self.link.wake.set()
            return
        # The outbox is full (disk): send it now if we can, so the condition still gets out.
        t = getattr(self, "transport", None)
        if t is not None and t.is_connected():
            t.publish(topic, message.to_json(), qos=1)
            self.direct_published += 1
        else:
            self.lost_reports += 1

    def _queue_sketch(self, report: Any) -> None:
        self._queue("sketch", self.topics.sketch(self.config.device_id), report)

    def _report_status(self, status: Any) -> None:
        self._queue("status", self.topics.status(self.config.device_id), status)

    def _conditions(self) -> list[str]:
        out = []
        if self.prediction_log is not None:
            errors = self.prediction_log.stats.write_errors
            if errors > self._log_errors_seen:  # latched by Metrics until the next report
                self._log_errors_seen = errors
                out.append("log_write_error")
        if self.lost_reports:
            out.append("reports_lost")
        if self.telemetry.dropped:
            out.append("telemetry_dropped")
        return out

    def _gauges(self) -> dict[str, float]:
        return {
            "outbox_messages": self.outbox.count(),
            "outbox_bytes": self.outbox.size_bytes(),
            "outbox_dropped_disk_full_total": self.outbox.stats.dropped_disk_full,
            "telemetry_dropped_events_total": self.telemetry.dropped,
            "api_refused_connections_total": self.api_stats.refused_connections,
            "api_read_timeouts_total": self.api_stats.read_timeouts,
            "mqtt_connected": int(self.transport.is_connected())
            if hasattr(self, "transport")
            else 0,
        }

    def apply_config(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Remote ``config`` command: the few settings that change at run time (not persisted)."""
        setters: dict[str, Callable[[float], None]] = {
            "sketch.window_seconds": lambda v: setattr(self.sketcher, "window_seconds", float(v)),
            "sketch.window_rows": lambda v: setattr(self.sketcher, "window_rows", int(v)),
            "metrics_interval": lambda v: setattr(self, "metrics_interval", float(v)),
        }
        unknown = sorted(set(changes) - set(setters))
        if unknown:
            raise ValueError(
                f"unknown config key {unknown[0]!r} (known: {', '.join(sorted(setters))})"
            )
        for key, value in changes.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{key} must be a positive number, got {value!r}")
        for key, value in changes.items():
            setters[key](value)
        return dict(changes)

    def _metrics_text(self) -> str:
        text = self.metrics.prometheus_text()
        processor = getattr(self, "processor", None)
        if processor is None:
            return text
        lines = [
            "# HELP edgefleet_commands_refused_total Commands refused before any I/O, by reason.",
            "# TYPE edgefleet_commands_refused_total counter",
        ] + [
            f'edgefleet_commands_refused_total{{reason="{r}"}} {n}'
            for r, n in sorted(processor.refused.items())
        ]
        return text + "\n".join(lines) + "\n"

    def status(self) -> dict[str, Any]:
        return {
            "device_id": self.config.device_id,
            "device_key_id": self.identity.key_id,  # compare before `fleet devices approve`
            "model": self.predictor.model.model_dump() if self.predictor.model else None,
            "shadow": self.predictor.shadow.model_dump() if self.predictor.shadow else None,
            "mqtt_connected": self.transport.is_connected()
            if hasattr(self, "transport")
            else False,
            "outbox": {
                "messages": self.outbox.count(),
                "bytes": self.outbox.size_bytes(),
                **vars(self.outbox.stats),
            },
            "telemetry": {
                "windows": self.sketcher.closed,
                "dropped_events": self.telemetry.dropped,
            },
            "conditions": self.metrics.conditions(),
            "commands": self.processor.counters() if hasattr(self, "processor") else {},
        }

    # -- pump ------------------------------------------------------------------------------
    def _run_pump(self) -> None:
        next_metrics = self.clock() + self.metrics_interval
        while not self._stop.is_set():
            self.link.wake.wait(self.pump_interval)
            self.link.wake.clear()
            if self._stop.is_set():
                break
            try:
                now = self.clock()
                self.processor.tick(now)
                self.metrics.observe_conditions()
                if now >= next_metrics:
                    self.publish_metrics(now)
                    next_metrics = now + self.metrics_interval
                self.link.flush()
            except Exception:  # the pump must keep going
                log.exception("agent pump step failed")

    def publish_metrics(self, now: float | None = None) -> None:
        for report in self.metrics.report(now):
            self._queue("metrics", self.topics.metrics(self.config.device_id), report)

    # -- shutdown --------------------------------------------------------------------------
    def stop(self, timeout: float = 5.0) -> None:
        if not self.started:
            return
        self.started = False
        self._stop.set()
        self.link.wake.set()
        if self._pump is not None:
            self._pump.join(timeout * 4)
        self.telemetry.stop()  # closes open windows into the outbox
        self.publish_metrics()
        if self.prediction_log is not None:
            self.prediction_log.close()
        self.link.stop(timeout=timeout)  # flushes, publishes offline state, disconnects
        if self._server is not None:
            self._server.should_exit = True
            if self._api_thread is not None:
                self._api_thread.join(timeout)
        self.predictor.close()
        self.outbox.close()
        log.info("agent %s stopped", self.config.device_id)

    def __enter__(self) -> Agent:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


AgentProcess = Agent  # the name the demo uses


def _ref(manifest: Any) -> ModelRef:
    from .installer import model_ref

    return model_ref(manifest)


def run_agent(
    config: AgentConfig,
    *,
    transport: Transport | None = None,
    stop: threading.Event | None = None,
    on_started: Callable[[Agent], None] | None = None,
) -> int:
    """``edgefleet agent run``: serve until SIGTERM/SIGINT (or ``stop`` is set).

    ``on_started(agent)`` is called once the agent serves (the CLI prints its start line).
    It owns the process, so it also sets the GIL switch interval (:data:`GIL_SWITCH_S`).
    """
    stop = stop or threading.Event()
    sys.setswitchinterval(GIL_SWITCH_S)
    agent = Agent(config, transport=transport).start()
    if on_started is not None:
        on_started(agent)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    finally:
        agent.stop()
    return 0
