"""Transport over paho-mqtt (``pip install 'edgefleet[agent]'`` or ``[fleet]``).

paho's network loop runs in its own thread. Subscriptions are remembered and renewed on
every (re)connect; the client reconnects by itself with exponential backoff
(1 s → ``max_backoff``). With ``clean_session=False`` the broker keeps QoS 1 messages for a
known client id while it is offline, so a device that comes back receives its pending
commands: on 3.1.1 as a persistent session, on MQTT 5 as ``clean_start=False`` with a
session expiry of ``session_expiry_s`` (MQTT 5's default, 0, would end the session at
every disconnect).

Several broker URLs (the nodes of a cluster) make a failover list: the first is tried
first; whenever an attempt fails or an established link is lost, the next attempt goes to
the next URL (round robin), after paho's backoff. On a clustered broker that keeps
sessions cluster-wide (NATS with MQTT on JetStream) the persistent session, its queued
QoS 1 messages and the retained messages are all there on the next node. The URLs must
agree on TLS (all ``mqtt://`` or all ``mqtts://``): one TLS context serves them all.

``mqtt5=True`` against a broker that refuses MQTT 5 at the first connection ("unsupported
protocol version": NATS 2.15, amqtt) falls back to MQTT 3.1.1 once, logs it, and turns
shared-subscription filters (``$share/GROUP/filter``) into plain ones, since 3.1.1 brokers
other than Mosquitto would read ``$share/…`` as a literal topic and deliver nothing
(NATS 2.15 accepts such a subscription and never delivers to it).

Each change of link state is one log record on this module's logger, carrying
``link`` (``connected``, ``lost`` or ``reconnecting``) and ``broker`` (the URL) as record
attributes, so a CLI can show them without parsing text. A run of failed attempts is one
``reconnecting`` record, not one per attempt.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from .transport import BrokerURL, Delivery, Handler, TransportError, Will, broker_urls

log = logging.getLogger(__name__)


class _PahoDelivery:
    def __init__(self, info: Any) -> None:
        self.info = info

    def wait(self, timeout: float) -> bool:
        try:
            self.info.wait_for_publish(timeout)
        except (RuntimeError, ValueError):
            return False
        return bool(self.info.is_published())


def _no_delay(client: Any, userdata: Any, sock: Any) -> None:
    """Nagle off on every (re)connected socket: paho leaves it on, and then a small packet
    written while an earlier one is unacknowledged waits for the broker's delayed ACK
    (up to ~40 ms), e.g. a PUBACK or the next QoS 0 report."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):  # a websocket wrapper or a non-TCP socket
        pass


def _unshared(topic_filter: str) -> str:
    """``$share/GROUP/a/b`` → ``a/b``; other filters unchanged."""
    if topic_filter.startswith("$share/") and topic_filter.count("/") >= 2:
        return topic_filter.split("/", 2)[2]
    return topic_filter


class PahoTransport:
    def __init__(
        self,
        url: str | Sequence[str],
        client_id: str,
        *,
        username: str | None = None,
        password: str | None = None,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        will: Will | None = None,
        clean_session: bool = False,
        mqtt5: bool = False,
        keepalive: int = 30,
        max_backoff: float = 30.0,
        session_expiry_s: int = 86_400,
    ) -> None:
        try:
            import paho.mqtt.client as mqtt
        except ImportError:  # pragma: no cover
            raise TransportError(
                "paho-mqtt is not installed: pip install 'edgefleet[agent]'"
            ) from None
        self.urls = broker_urls(url)
        self._index = 0  # the URL of the current (or next) connection attempt
        self._advance = False  # the next attempt goes to the next URL
        self.client_id = client_id
        self.mqtt5 = mqtt5
        self._mqtt = mqtt
        self._keepalive = keepalive
        self._clean_session = clean_session
        self._creds = (username, password)
        self._tls = (ca_file, cert_file, key_file)
        self._will = will
        self._max_backoff = max_backoff
        self._fell_back = False  # the broker refused MQTT 5; now on 3.1.1
        self._session_expiry_s = session_expiry_s
        self._subs: dict[str, int] = {}
        self._sub_mids: dict[int, str] = {}  # SUBSCRIBE packet id → filter, until its SUBACK
        self._refused: dict[str, float] = {}  # filter → the delay before its next retry
        self.subscriptions_refused = 0  # SUBACKs that refused a filter (counted per refusal)
        self._handler: Handler | None = None
        self._conn_cbs: list[Callable[[bool], None]] = []
        self._connected = threading.Event()
        self._attempted = threading.Event()  # set when a connection attempt was refused
        self._lock = threading.Lock()
        self._next_will: Will | None = None  # set_will: applied before the next CONNECT
        self._started = False
        self._last_error: str = ""
        self._failing = False  # inside a run of failed connection attempts
        self._closing = False  # close() was called: a disconnect is not a lost link
        self._client = self._new_client(mqtt5)

    @property
    def url(self) -> BrokerURL:
        """The broker of the current (or next) connection attempt."""
        return self.urls[self._index]

    def _new_client(self, mqtt5: bool) -> Any:
        mqtt = self._mqtt
        if mqtt5:
            client = mqtt.Client(
                mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5
            )
        else:
            client = mqtt.Client(
                mqtt.CallbackAPIVersion.VERSION2,
                client_id=self.client_id,
                protocol=mqtt.MQTTv311,
                clean_session=self._clean_session,
            )
        username, password = self._creds
        if username:
            client.username_pw_set(username, password)
        ca_file, cert_file, key_file = self._tls
        if self.url.tls or ca_file:
            ctx = ssl.create_default_context(cafile=ca_file)
            if cert_file:
                ctx.load_cert_chain(cert_file, key_file)
            client.tls_set_context(ctx)
        will = self._will
        if will is not None:
            client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        client.reconnect_delay_set(min_delay=1, max_delay=int(self._max_backoff))
        client.max_inflight_messages_set(100)
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_connect_fail = self._on_connect_fail
        client.on_pre_connect = self._on_pre_connect
        client.on_socket_open = _no_delay
        return client

    # paho callbacks (network thread) -------------------------------------------------
    def _on_connect(
        self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any = None
    ) -> None:
        if getattr(reason, "is_failure", False):
            self._last_error = str(reason)
            self._advance = True
            self._attempted.set()
            self._link_failed()
            return
        self._failing = False
        self._link("connected", logging.INFO, "")
        with self._lock:
            subs = list(self._subs.items())
        for topic, qos in subs:
            self._send_subscribe(client, topic, qos)
        self._connected.set()
        for cb in list(self._conn_cbs):
            cb(True)

    def _on_connect_fail(self, client: Any, userdata: Any) -> None:
        self._last_error = self._last_error or "connection failed (network or TLS)"
        self._advance = True
        self._attempted.set()
        self._link_failed()

    def _link_failed(self) -> None:
        if not self._failing:
            self._failing = True
            self._link("reconnecting", logging.WARNING, self._last_error)

    def _link(self, state: str, level: int, detail: str) -> None:
        log.log(
            level,
            "MQTT %s: %s%s",
            state,
            self.url,
            f" ({detail})" if detail else "",
            extra={"link": state, "broker": str(self.url), "detail": detail},
        )

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any = None
    ) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        if not self._closing:
            self._advance = True  # this node went away (or refused us): try the next one
        if was and not self._closing:
            why = str(reason) if reason else ""
            self._link("lost", logging.WARNING, "" if why == "Unspecified error" else why)
            for cb in list(self._conn_cbs):
                cb(False)

    def _send_subscribe(self, client: Any, topic_filter: str, qos: int) -> None:
        _, mid = client.subscribe(topic_filter, qos)
        if mid is not None:
            with self._lock:
                self._sub_mids[mid] = topic_filter

    def _on_subscribe(
        self, client: Any, userdata: Any, mid: int, reasons: Any, props: Any = None
    ) -> None:
        """A SUBACK. A refused filter (an ACL, or a clustered broker that could not set up
        the subscription in time: NATS under load) would otherwise leave the client
        connected and deaf to that topic: it is logged, counted and subscribed again after
        a backoff (1 s doubling to ``max_backoff``) while the filter is wanted."""
        with self._lock:
            topic_filter = self._sub_mids.pop(mid, None)
        if topic_filter is None:
            return
        refused = any(getattr(r, "is_failure", False) or r == 0x80 for r in reasons or [])
        with self._lock:
            delay = self._refused.get(topic_filter)
            if not refused:
                if delay is not None:
                    del self._refused[topic_filter]
                    log.info("MQTT subscription to %s taken on retry", topic_filter)
                return
            self.subscriptions_refused += 1
            self._refused[topic_filter] = min((delay or 0.5) * 2, self._max_backoff)
            wait = self._refused[topic_filter]
        why = ", ".join(str(r) for r in reasons or [])
        if delay is None:  # the first refusal of a run of them: one line, not one a retry
            log.warning(
                "MQTT subscription to %s refused by %s (%s); retrying every %.0f–%.0f s",
                topic_filter,
                self.url,
                why,
                wait,
                self._max_backoff,
                extra={
                    "link": "subscribe_refused",
                    "broker": str(self.url),
                    "detail": f"{topic_filter} ({why}); subscribing again with backoff",
                },
            )
        timer = threading.Timer(wait, self._resubscribe, args=(topic_filter,))
        timer.daemon = True
        timer.start()

    def _resubscribe(self, topic_filter: str) -> None:
        with self._lock:
            qos = self._subs.get(topic_filter)
        if qos is None or self._closing or not self.is_connected():
            with self._lock:  # unwanted now, or a reconnect subscribes everything again
                self._refused.pop(topic_filter, None)
            return
        self._send_subscribe(self._client, topic_filter, qos)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        if self._handler is not None:
            self._handler(msg.topic, msg.payload)

    # Transport --------------------------------------------------------------------------
    def connect(self, timeout: float = 10.0) -> None:
        """Start the network loop. Returns once connected, or raises after ``timeout``.

        Even when it raises, the loop keeps trying in the background (``connect_async``),
        so a caller may ignore the error and rely on ``on_connection_change``.
        """
        if not self._started:
            if self.mqtt5 and not self._clean_session:  # MQTT 5 keeps a session only with an expiry
                from paho.mqtt.packettypes import PacketTypes
                from paho.mqtt.properties import Properties

                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = self._session_expiry_s
                self._client.connect_async(
                    self.url.host,
                    self.url.port,
                    keepalive=self._keepalive,
                    clean_start=False,
                    properties=props,
                )
            else:
                self._client.connect_async(self.url.host, self.url.port, keepalive=self._keepalive)
            self._client.loop_start()
            self._started = True
        if not timeout:
            return
        deadline = time.monotonic() + timeout
        while not self._connected.is_set() and time.monotonic() < deadline:
            if self._attempted.wait(min(0.05, max(deadline - time.monotonic(), 0))):
                error = self._last_error.lower()
                if self.mqtt5 and "protocol version" in error:
                    self._fall_back_to_311()
                    continue
                if "not authori" in error or "bad user" in error:
                    break  # refused credentials will not get better by waiting
                self._attempted.clear()
        if not self._connected.is_set():
            where = ", ".join(str(u) for u in self.urls)
            raise TransportError(
                f"cannot reach MQTT broker at {where}"
                + (f" ({self._last_error})" if self._last_error else "")
            )

    def _fall_back_to_311(self) -> None:
        """The broker refused MQTT 5: start over with 3.1.1 (caller's thread, loop stopped)."""
        log.warning(
            "MQTT broker %s refused MQTT 5 (%s); falling back to MQTT 3.1.1 without shared "
            "subscriptions",
            self.url,
            self._last_error,
        )
        self._closing = True
        try:
            self._client.disconnect()
        finally:
            self._client.loop_stop()
        self._closing = False
        self.mqtt5 = False
        self._fell_back = True
        with self._lock:
            self._subs = {_unshared(f): q for f, q in self._subs.items()}
        self._index, self._advance = 0, False
        self._last_error = ""
        self._failing = False
        self._attempted.clear()
        self._client = self._new_client(False)
        self._client.connect_async(self.url.host, self.url.port, keepalive=self._keepalive)
        self._client.loop_start()

    def close(self) -> None:
        if self._started:
            self._closing = True
            try:
                self._client.disconnect()
            finally:
                self._client.loop_stop()
                self._started = False
                self._connected.clear()

    def is_connected(self) -> bool:
        return self._connected.is_set()

    @property
    def last_error(self) -> str:
        """Why the last connection attempt failed ('' when none did)."""
        return self._last_error

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> Delivery:
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        return _PahoDelivery(info)

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        if not self.mqtt5 and self._fell_back:
            topic_filter = _unshared(topic_filter)
        with self._lock:
            self._subs[topic_filter] = qos
        if self.is_connected():
            self._send_subscribe(self._client, topic_filter, qos)

    def subscribed(self, topic_filter: str) -> bool:
        """True once the broker acknowledged ``topic_filter`` on this connection (wanted, no
        SUBSCRIBE without its SUBACK, not refused)."""
        if not self.is_connected():
            return False
        with self._lock:
            return (
                topic_filter in self._subs
                and topic_filter not in self._sub_mids.values()
                and topic_filter not in self._refused
            )

    def unsubscribe(self, topic_filter: str) -> None:
        with self._lock:
            self._subs.pop(topic_filter, None)
        if self.is_connected():
            self._client.unsubscribe(topic_filter)

    def set_will(self, will: Will) -> None:
        """Replace the last will; it is sent with the next CONNECT (the next reconnect).

        Only stored here: paho's ``will_set`` runs in ``on_pre_connect``, right before the
        next CONNECT is built, never from inside its disconnect handling (calling it there
        left an agent reconnecting silently to a broker that had gone away)."""
        with self._lock:
            self._next_will = will
            self._will = will

    def _on_pre_connect(self, client: Any, userdata: Any) -> None:
        if self._advance and len(self.urls) > 1:
            self._advance = False
            self._index = (self._index + 1) % len(self.urls)
            # paho's public host/port setters refuse while a (re)connection is under way,
            # which is always the case here; its reconnect() reads these two right after.
            client._host, client._port = self.url.host, self.url.port
        self._advance = False
        with self._lock:
            will, self._next_will = self._next_will, None
        if will is not None:
            client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)

    def set_handler(self, handler: Handler) -> None:
        self._handler = handler

    def on_connection_change(self, callback: Callable[[bool], None]) -> None:
        self._conn_cbs.append(callback)
