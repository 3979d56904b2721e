"""MQTT ingest: device state, command status and telemetry into the service.

The bridge subscribes to ``{p}/devices/+/state``, ``…/status`` and ``…/telemetry/+``
(telemetry through ``$share/{group}/…`` when MQTT 5 and a shared group are configured, so
several servers can split it; amqtt is 3.1.1 only, so there it subscribes plainly). A message
is accepted only when it parses as its topic's model and its ``device_id`` matches the
topic's. Everything else — unknown topics, malformed JSON, id mismatches, oversize payloads,
a sink that raises — is dropped and counted by reason; the bridge never raises into paho.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from typing import Any, Protocol

from protocol.errors import EdgefleetError
from protocol.messages import (
    MAX_MESSAGE_BYTES,
    CommandStatus,
    DeviceState,
    MetricsReport,
    SketchReport,
    decode,
)
from protocol.topics import Topics, shared
from protocol.transport import Transport

log = logging.getLogger(__name__)

_MODELS: dict[str, Any] = {
    "state": DeviceState,
    "status": CommandStatus,
    "metrics": MetricsReport,
    "sketch": SketchReport,
}


class Sink(Protocol):
    def on_state(self, msg: DeviceState) -> None: ...
    def on_status(self, msg: CommandStatus) -> None: ...
    def on_metrics(self, msg: MetricsReport) -> None: ...
    def on_sketch(self, msg: SketchReport) -> None: ...
    def on_dropped(self, reason: str) -> None: ...


class Bridge:
    def __init__(
        self,
        transport: Transport,
        topics: Topics,
        sink: Sink,
        *,
        mqtt5: bool = False,
        shared_group: str | None = None,
    ) -> None:
        self.transport = transport
        self.topics = topics
        self.sink = sink
        self.mqtt5 = mqtt5
        self.shared_group = shared_group
        self.accepted: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self._lock = threading.Lock()

    def filters(self) -> list[str]:
        telemetry = self.topics.all_telemetry()
        if self.mqtt5 and self.shared_group:
            telemetry = shared(telemetry, self.shared_group)
        return [self.topics.all_states(), self.topics.all_status(), telemetry]

    def start(self) -> None:
        self.transport.set_handler(self.handle)
        for f in self.filters():
            self.transport.subscribe(f, qos=1)

    def _drop(self, reason: str, topic: str, detail: str = "") -> None:
        with self._lock:
            self.dropped[reason] += 1
        log.debug("dropped %s message on %s: %s", reason, topic, detail)
        try:
            self.sink.on_dropped(reason)
        except Exception:
            pass

    def handle(self, topic: str, payload: bytes) -> None:
        """Transport handler; never raises."""
        parsed = self.topics.parse(topic)
        if parsed is None or parsed.kind not in _MODELS:
            self._drop("unknown_topic", topic)
            return
        if len(payload) > MAX_MESSAGE_BYTES:
            self._drop("oversize", topic, f"{len(payload)} bytes")
            return
        if not payload:
            return  # a cleared retained message
        try:
            msg = decode(_MODELS[parsed.kind], payload)
        except EdgefleetError as exc:
            self._drop("malformed", topic, str(exc))
            return
        if msg.device_id != parsed.device_id:
            self._drop("device_id_mismatch", topic, f"payload says {msg.device_id!r}")
            return
        if isinstance(msg, SketchReport):
            try:
                for fs in msg.sketches.features.values():
                    fs.kll() if fs.kind == "numeric" else fs.frequent()
            except EdgefleetError as exc:
                self._drop("malformed", topic, f"sketch: {exc}")
                return
        try:
            getattr(self.sink, f"on_{parsed.kind}")(msg)
        except EdgefleetError as exc:
            self._drop("rejected", topic, str(exc))
            return
        except Exception:
            log.exception("handling %s message on %s failed", parsed.kind, topic)
            self._drop("handler_error", topic)
            return
        with self._lock:
            self.accepted[parsed.kind] += 1

    def stats(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {"accepted": dict(self.accepted), "dropped": dict(self.dropped)}
