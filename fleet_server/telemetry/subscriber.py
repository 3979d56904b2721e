"""A small reusable MQTT subscriber: shared subscriptions where the broker has them.

    sub = Subscriber(url, "edgefleet/devices/+/telemetry/+", group="ingest", handler=fn)
    with sub:            # connects, subscribes; sub.shared says what the broker gave us
        ...

With ``group`` set, the subscriber speaks MQTT 5 and subscribes to
``$share/{group}/{filter}``: the broker (Mosquitto, EMQX, HiveMQ) hands each message to
**one** member of the group, so several workers split the stream. On an MQTT 3.1.1-only
broker (the embedded amqtt) the MQTT 5 connection is refused; the subscriber then falls
back to a plain subscription of the same filter and sets ``shared = False`` — every worker
then sees every message, so run one worker there.

``mqtt5=None`` (default) means "try 5 when a group is set, fall back to 3.1.1"; True or
False forces the protocol. A handler that raises is logged and does not stop the network
loop. :class:`DecodingSubscriber` parses payloads with the ``protocol`` message models and
drops those whose device id does not match the topic.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from protocol.errors import ProtocolError
from protocol.messages import TOPIC_MODELS, decode
from protocol.topics import DEFAULT_PREFIX, Topics, shared
from protocol.transport import Transport, TransportError

log = logging.getLogger(__name__)

Handler = Callable[[str, bytes], None]


def _connect(
    url: str, client_id: str, mqtt5: bool, timeout: float, creds: dict[str, Any]
) -> Transport:
    from protocol.transport_paho import PahoTransport

    t = PahoTransport(url, client_id, mqtt5=mqtt5, clean_session=True, **creds)
    t.connect(timeout=0)
    deadline = time.monotonic() + timeout
    while not t.is_connected():
        # PahoTransport keeps the broker's refusal; an MQTT 3.1.1-only broker answers an
        # MQTT 5 CONNECT with "Unsupported protocol version" at once, so fail fast on it.
        refused = getattr(t, "last_error", "")
        if refused or time.monotonic() > deadline:
            t.close()
            raise TransportError(f"cannot connect to {url}: {refused or 'timed out'}")
        time.sleep(0.02)
    return t


class Subscriber:
    def __init__(
        self,
        url: str,
        filters: str | Sequence[str],
        *,
        group: str | None = None,
        handler: Handler | None = None,
        client_id: str | None = None,
        mqtt5: bool | None = None,
        qos: int = 1,
        timeout: float = 10.0,
        username: str | None = None,
        password: str | None = None,
        ca_file: str | None = None,
    ) -> None:
        self.url = url
        self.filters = [filters] if isinstance(filters, str) else list(filters)
        self.group = group
        self.handler = handler
        self.client_id = client_id or f"edgefleet-sub-{uuid.uuid4().hex[:10]}"
        self.mqtt5 = mqtt5
        self.qos = qos
        self.timeout = timeout
        self._creds = {"username": username, "password": password, "ca_file": ca_file}
        self.transport: Transport | None = None
        self.shared = False
        self.protocol = ""
        self.subscriptions: list[str] = []

    def start(self) -> Subscriber:
        want5 = self.mqtt5 if self.mqtt5 is not None else self.group is not None
        transport: Transport | None = None
        if want5:
            try:
                transport = _connect(self.url, self.client_id, True, self.timeout, self._creds)
                self.protocol = "5"
            except TransportError as exc:
                if self.mqtt5:  # forced: no fallback
                    raise
                log.info("MQTT 5 refused (%s); falling back to a plain 3.1.1 subscription", exc)
        if transport is None:
            transport = _connect(self.url, self.client_id, False, self.timeout, self._creds)
            self.protocol = "3.1.1"
        self.shared = self.group is not None and self.protocol == "5"
        transport.set_handler(self._dispatch)
        self.subscriptions = [
            shared(f, self.group) if self.shared and self.group else f for f in self.filters
        ]
        for f in self.subscriptions:
            transport.subscribe(f, self.qos)
        self.transport = transport
        return self

    def stop(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    def __enter__(self) -> Subscriber:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _dispatch(self, topic: str, payload: bytes) -> None:
        try:
            self.handle(topic, payload)
        except Exception:  # a bad handler must not kill paho's network thread
            log.exception("subscriber handler failed on %s", topic)

    def handle(self, topic: str, payload: bytes) -> None:
        """Called for every message (paho's thread). Override, or pass ``handler``."""
        if self.handler is not None:
            self.handler(topic, payload)


class DecodingSubscriber(Subscriber):
    """Decodes payloads with the protocol models; override :meth:`on_message`.

    ``on_message(device_id, kind, message)`` gets ``device_id=None`` for ``alerts``.
    Payloads that do not parse, or whose ``device_id`` differs from the topic's, go to
    :meth:`on_invalid` with a one-line reason.
    """

    def __init__(
        self, url: str, filters: str | Sequence[str], *, prefix: str = DEFAULT_PREFIX, **kw: Any
    ) -> None:
        super().__init__(url, filters, **kw)
        self.topics = Topics(prefix)

    def handle(self, topic: str, payload: bytes) -> None:
        try:
            device_id, kind, msg = decode_topic(self.topics, topic, payload)
        except ProtocolError as exc:
            self.on_invalid(topic, str(exc))
            return
        self.on_message(device_id, kind, msg)

    def on_message(self, device_id: str | None, kind: str, message: Any) -> None:
        if self.handler is not None:
            self.handler(kind, message)

    def on_invalid(self, topic: str, reason: str) -> None:
        log.warning("dropped message on %s: %s", topic, reason)


def decode_topic(topics: Topics, topic: str, payload: bytes) -> tuple[str | None, str, Any]:
    """``(device_id, kind, message)`` for a payload on one of edgefleet's topics.

    Raises :class:`ProtocolError` for an unknown topic, a payload that does not parse, or a
    device id in the payload that differs from the topic's.
    """
    if topic == topics.alerts():
        return None, "alerts", decode(TOPIC_MODELS["alerts"], payload)
    parsed = topics.parse(topic)
    if parsed is None or parsed.kind not in TOPIC_MODELS:
        raise ProtocolError(f"not an edgefleet topic: {topic}")
    msg = decode(TOPIC_MODELS[parsed.kind], payload)
    claimed = getattr(msg, "device_id", None)
    if claimed is not None and claimed != parsed.device_id:
        raise ProtocolError(
            f"device_id {claimed!r} does not match the topic's {parsed.device_id!r}"
        )
    return parsed.device_id, parsed.kind, msg
