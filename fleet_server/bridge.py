"""MQTT ingest: device state, command status and telemetry into the service.

The bridge subscribes to ``{p}/devices/+/state``, ``…/status`` and ``…/telemetry/+``
(telemetry through ``$share/{group}/…`` when MQTT 5 and a shared group are configured, so
several servers can split it; amqtt is 3.1.1 only, so there it subscribes plainly). A message
is accepted only when it parses as its topic's model and its ``device_id`` matches the
topic's. Everything else — unknown topics, malformed JSON, id mismatches, oversize payloads,
a sink that raises — is dropped and counted by reason; the bridge never raises into paho.

With a :class:`~.device_trust.DeviceTrust` (the fleet service always passes one) a message
must also be signed by the device's pinned key, fresh, within the device's rate and
telemetry caps; unknown devices may only enrol (see that module for every reason). The
order is cheap first: size cap per kind → signature envelope → key and freshness → JSON
parsing → sketch headers (checked against caps before any sketch is deserialized).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from typing import TYPE_CHECKING, Any, Protocol

from protocol.device_auth import open_envelope
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

if TYPE_CHECKING:
    from .device_trust import DeviceTrust

log = logging.getLogger(__name__)

# Per-kind payload caps, checked before anything else is done with the bytes.
MAX_BYTES = {
    "state": 16 * 1024,
    "status": 64 * 1024,
    "metrics": 64 * 1024,
    "sketch": MAX_MESSAGE_BYTES,
}

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
        trust: DeviceTrust | None = None,
    ) -> None:
        self.transport = transport
        self.trust = trust
        self.topics = topics
        self.sink = sink
        self.mqtt5 = mqtt5
        self.shared_group = shared_group
        self.accepted: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self.statuses = False  # subscribed to command statuses
        self._lock = threading.Lock()

    def filters(self) -> list[str]:
        telemetry = self.topics.all_telemetry()
        if self.mqtt5 and self.shared_group:
            telemetry = shared(telemetry, self.shared_group)
        return [self.topics.all_states(), self.topics.all_status(), telemetry]

    def start(self, statuses: bool = True) -> None:
        """Subscribe. ``statuses=False``: not to command statuses (yet): a fleet server that
        does not run the rollout tick has no use for them, and on a broker without shared
        subscriptions checking them was most of a follower's CPU (:meth:`take_statuses`)."""
        self.transport.set_handler(self.handle)
        for f in self.filters():
            if statuses or f != self.topics.all_status():
                self.transport.subscribe(f, qos=1)
        self.statuses = statuses

    def take_statuses(self) -> None:
        """Subscribe to command statuses from now on (this process took the rollout tick)."""
        if not self.statuses:
            self.statuses = True
            self.transport.subscribe(self.topics.all_status(), qos=1)

    def statuses_ready(self) -> bool:
        """Whether the broker acknowledged the status subscription (True where the
        transport cannot tell)."""
        check = getattr(self.transport, "subscribed", None)
        return self.statuses and (check is None or bool(check(self.topics.all_status())))

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
        if len(payload) > MAX_BYTES[parsed.kind]:
            self._drop("oversize", topic, f"{len(payload)} bytes")
            return
        if not payload:
            return  # a cleared retained message
        enrolling = False
        env = None
        if self.trust is not None:
            env = open_envelope(payload)
            if env is None:
                self._drop("unsigned", topic)
                return
            ident = self.trust.approved(parsed.device_id)
            if ident is None:
                if parsed.kind != "state":
                    known = self.trust.known(parsed.device_id)
                    self._drop("pending" if known else "unknown_device", topic)
                    return
                enrolling = True
            else:
                why = self.trust.verify(ident, parsed.kind, topic, env)
                if why is not None:
                    self._drop(why, topic)
                    return
        try:
            msg = decode(_MODELS[parsed.kind], payload)
        except EdgefleetError as exc:
            self._drop("malformed", topic, str(exc))
            return
        if msg.device_id != parsed.device_id:
            self._drop("device_id_mismatch", topic, f"payload says {msg.device_id!r}")
            return
        if enrolling and self.trust is not None and env is not None:
            why = self.trust.enrol(msg, topic, env)
            if why is not None:
                self._drop(why, topic)
                return
        elif self.trust is not None and isinstance(msg, DeviceState) and env is not None:
            # authenticated by the device: its X25519 key and fleet key count (a MAC'd
            # state may not change keys)
            why = self.trust.note_state(msg, env.scheme)
            if why is not None:
                self._drop(why, topic)
                return
        if self.trust is not None and isinstance(msg, (MetricsReport, SketchReport)):
            why = self.trust.check_telemetry(msg)
            if why is not None:
                self._drop(why, topic)
                return
        if isinstance(msg, SketchReport):
            try:
                for fs in msg.sketches.features.values():
                    fs.kll() if fs.kind == "numeric" else fs.frequent()
            except EdgefleetError as exc:
                self._drop("malformed", topic, f"sketch: {exc}")
                return
        if not self.deliver(parsed.kind, msg, topic) and env is not None and not enrolling:
            assert self.trust is not None
            self.trust.forget(parsed.device_id, parsed.kind, env)  # another copy may be taken

    def deliver(self, kind: str, msg: Any, topic: str = "") -> bool:
        """Hand an accepted message to the sink (also used for a birth kept until approval);
        False when the sink failed."""
        try:
            getattr(self.sink, f"on_{kind}")(msg)
        except EdgefleetError as exc:
            self._drop("rejected", topic, str(exc))
            return False
        except Exception:
            log.exception("handling %s message on %s failed", kind, topic)
            self._drop("handler_error", topic)
            return False
        with self._lock:
            self.accepted[kind] += 1
        return True

    def stats(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {"accepted": dict(self.accepted), "dropped": dict(self.dropped)}
