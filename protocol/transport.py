"""The one seam between edgefleet and the network: publish/subscribe.

    Transport (interface)
    ├── MemoryTransport   in-memory, attached to a MemoryBroker (unit tests, no sockets)
    └── PahoTransport     paho-mqtt, MQTT 3.1.1 or 5, TLS, credentials, last will,
                          reconnect with backoff (protocol/transport_paho.py)

Handlers receive ``(topic, payload)``. ``publish`` returns a :class:`Delivery` whose
``wait(timeout)`` is True once the broker acknowledged it (QoS 1) — the outboxes delete a
message only then. Transport errors surface as :class:`TransportError`.

This module is the one place in ``protocol`` that touches sockets (through the paho module,
imported lazily): the programs share it so neither re-implements the wire.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlparse

from .errors import EdgefleetError

Handler = Callable[[str, bytes], None]


class TransportError(EdgefleetError):
    """Broker unreachable, refused credentials, publish failed."""


class Delivery(Protocol):
    def wait(self, timeout: float) -> bool: ...


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True)
class BrokerURL:
    host: str
    port: int
    tls: bool = False

    @classmethod
    def parse(cls, url: str) -> BrokerURL:
        u = urlparse(url if "://" in url else f"mqtt://{url}")
        if "@" in u.netloc:  # user:password@host: refused, and never repeated in a message
            raise TransportError(
                f"broker URL {u.scheme}://…@{u.hostname}: credentials do not belong in a URL "
                "(set broker.username and broker.password_file)"
            )
        if u.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise TransportError(f"broker URL {url!r}: scheme must be mqtt:// or mqtts://")
        tls = u.scheme in ("mqtts", "ssl")
        if not u.hostname:
            raise TransportError(f"broker URL {url!r} has no host")
        try:
            port = u.port
        except ValueError:  # not a number, or outside 0-65535
            raise TransportError(f"broker URL {url!r}: the port must be 1-65535") from None
        return cls(u.hostname, port or (8883 if tls else 1883), tls)

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


MAX_BROKER_URLS = 16


def broker_urls(urls: str | Sequence[str]) -> list[BrokerURL]:
    """Parse one URL or a failover list (a cluster's nodes, at most 16); refuses an empty
    list, a URL longer than 2 KiB and a list that mixes TLS and plain URLs."""
    raw = [urls] if isinstance(urls, str) else list(urls)
    if not raw:
        raise TransportError("no broker URL given")
    if len(raw) > MAX_BROKER_URLS:
        raise TransportError(f"at most {MAX_BROKER_URLS} broker URLs, got {len(raw)}")
    if any(not isinstance(u, str) or len(u) > 2048 for u in raw):
        raise TransportError("a broker URL must be a string of at most 2048 characters")
    parsed = [BrokerURL.parse(u) for u in raw]
    if len({u.tls for u in parsed}) > 1:
        raise TransportError(
            "broker URLs mix mqtt:// and mqtts://: every node of a failover list must use the same"
        )
    return parsed


class Transport(Protocol):
    client_id: str

    def connect(self) -> None: ...
    def close(self) -> None: ...
    def is_connected(self) -> bool: ...
    def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False
    ) -> Delivery: ...
    def subscribe(self, topic_filter: str, qos: int = 1) -> None: ...
    def unsubscribe(self, topic_filter: str) -> None: ...
    def set_handler(self, handler: Handler) -> None: ...
    def on_connection_change(self, callback: Callable[[bool], None]) -> None: ...


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT wildcard matching (``+`` one level, ``#`` the rest); handles ``$share/g/``."""
    if topic_filter.startswith("$share/"):
        topic_filter = topic_filter.split("/", 2)[2]
    f_parts, t_parts = topic_filter.split("/"), topic.split("/")
    for i, fp in enumerate(f_parts):
        if fp == "#":
            return True
        if i >= len(t_parts):
            return False
        if fp != "+" and fp != t_parts[i]:
            return False
    return len(f_parts) == len(t_parts)


class _Done:
    def __init__(self, ok: bool = True) -> None:
        self.ok = ok

    def wait(self, timeout: float) -> bool:
        return self.ok


@dataclass
class MemoryBroker:
    """A tiny in-process broker for unit tests: retained messages, wills, outages."""

    clients: list[MemoryTransport] = field(default_factory=list)
    retained: dict[str, bytes] = field(default_factory=dict)
    online: bool = True
    log: list[tuple[str, bytes]] = field(default_factory=list)
    _lock: threading.RLock = field(default_factory=threading.RLock)

    def client(self, client_id: str, will: Will | None = None) -> MemoryTransport:
        t = MemoryTransport(self, client_id, will)
        with self._lock:
            self.clients.append(t)
        return t

    def route(self, topic: str, payload: bytes, retain: bool) -> None:
        with self._lock:
            self.log.append((topic, payload))
            if retain:
                if payload:
                    self.retained[topic] = payload
                else:
                    self.retained.pop(topic, None)
            targets = [c for c in self.clients if c._connected and c.wants(topic)]
        for c in targets:
            c._deliver(topic, payload)

    def set_online(self, online: bool) -> None:
        """Simulate a broker outage: every client disconnects (wills fire) and reconnects later."""
        with self._lock:
            self.online = online
            clients = list(self.clients)
        for c in clients:
            if online:
                if c._want_connected:
                    c.connect()
            elif c._connected:
                c._drop()


class MemoryTransport:
    def __init__(self, broker: MemoryBroker, client_id: str, will: Will | None = None) -> None:
        self.broker = broker
        self.client_id = client_id
        self.will = will
        self._subs: set[str] = set()
        self._handler: Handler | None = None
        self._conn_cbs: list[Callable[[bool], None]] = []
        self._connected = False
        self._want_connected = False

    def wants(self, topic: str) -> bool:
        return any(topic_matches(f, topic) for f in self._subs)

    def _deliver(self, topic: str, payload: bytes) -> None:
        if self._handler is not None:
            self._handler(topic, payload)

    def _drop(self) -> None:
        self._connected = False
        if self.will is not None:
            self.broker.route(self.will.topic, self.will.payload, self.will.retain)
        for cb in self._conn_cbs:
            cb(False)

    def connect(self) -> None:
        self._want_connected = True
        if not self.broker.online:
            raise TransportError("broker unavailable")
        self._connected = True
        for cb in self._conn_cbs:
            cb(True)

    def close(self) -> None:
        self._want_connected = False
        self._connected = False
        with self.broker._lock:
            if self in self.broker.clients:
                self.broker.clients.remove(self)

    def is_connected(self) -> bool:
        return self._connected

    def set_will(self, will: Will | None) -> None:
        self.will = will

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> Delivery:
        if not self._connected:
            return _Done(False)
        self.broker.route(topic, payload, retain)
        return _Done(True)

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        self._subs.add(topic_filter)
        if self._connected:
            for topic, payload in list(self.broker.retained.items()):
                if topic_matches(topic_filter, topic):
                    self._deliver(topic, payload)

    def unsubscribe(self, topic_filter: str) -> None:
        self._subs.discard(topic_filter)

    def set_handler(self, handler: Handler) -> None:
        self._handler = handler

    def on_connection_change(self, callback: Callable[[bool], None]) -> None:
        self._conn_cbs.append(callback)
