"""The MQTT link: birth/last will, command and artifact subscriptions, outbox delivery.

    transport (paho or memory) ──(topic, payload)──▶ Link._on_message   [network thread]
        cmd topic       → CommandProcessor.receive  ─┐
        artifacts/sha/i → CommandProcessor.on_chunk ─┴─▶ job queue ─▶ worker thread
                                                                       (install, rollback,
                                                                        benchmark, config)
    outbox (SQLite) ◀── statuses, sketches, metrics
        └── Link.flush() publishes at QoS 1 and deletes on ack          [daemon's pump thread]

Artifact chunks come on the artifact's shared topic, ``{p}/artifacts/{sha256}/+``, which
the link subscribes to while that download runs (:meth:`Link.follow`, called by the
processor) and leaves when it ends; the server publishes them there once, retained, for
every device. (Chunks on the device's own ``artifact/#`` topic, as older servers sent
them, are read too.) Empty payloads on the shared topic are the server clearing its
retained chunks and are skipped.

On every (re)connect the link publishes the retained birth :class:`DeviceState`
(``online=true``, model, runtimes, profile, agent version, tags, API URL) and wakes the
pump so queued messages leave at once. The transport carries the matching retained last
will (``online=false``), which the broker publishes if the device vanishes; a graceful
:meth:`Link.stop` publishes it itself. Reconnecting with backoff is the transport's job
(paho: 1 s → 30 s), as is moving to the next URL of a cluster's failover list
(``broker.urls``). The network thread never waits on the broker: waiting for acks happens in
:meth:`Link.flush`.

Signing (:mod:`protocol.device_auth`): with a :class:`~.identity.DeviceIdentity` every
message the device publishes is signed, here in the one publish path — the transport is a
:class:`~protocol.device_auth.SigningTransport` (statuses, metrics, sketches from the
outbox) and :class:`StateSigner` signs the birth and the last will with their state
sequence. Births of connection ``c`` carry ``c·2^20 + n`` (n = 1, 2, …), its last will
``c·2^20 + 2^20 − 1``: the will outranks every birth of its connection and is outranked by
every birth of the next, so the server can drop an old retained state or a replayed will.
When a connection is lost the next connection's will is set before paho reconnects.
The link also follows the retained fleet key announcement (``{prefix}/fleet/kex``): once
one verifies against the command trust store, statuses, metrics and sketches carry an
HMAC with the agreed per-device key instead (:mod:`protocol.device_mac`).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from protocol.device_auth import SigningTransport
from protocol.messages import CommandStatus, DeviceState
from protocol.topics import Topics
from protocol.transport import Transport, TransportError, Will

from .commands import CommandProcessor, Job
from .identity import DeviceIdentity
from .outbox import Outbox

log = logging.getLogger(__name__)

STATE_STEP = 1 << 20  # births per connection before the sequence would reach the will's


class StateSigner:
    """Signed birth and last-will payloads in ``(boot, seq)`` order (unsigned without identity)."""

    def __init__(self, topics: Topics, identity: DeviceIdentity | None = None) -> None:
        self.topics = topics
        self.identity = identity
        self.connection = 0
        self.births = 0
        self._lock = threading.Lock()

    def _sign(self, state: DeviceState, seq: int, mac: bool = False) -> bytes:
        payload = state.to_json()
        if self.identity is None:
            return payload
        topic = self.topics.state(state.device_id)
        return self.identity.signer.sign(topic, payload, seq=seq, mac_state=mac)

    def birth(self, state: DeviceState) -> bytes:
        if self.identity is not None:
            state = state.model_copy(
                update={
                    "public_key": self.identity.signer.public_key_b64(),
                    "enrol_proof": self.identity.proof,
                    "x25519_key": self.identity.x25519_b64(),
                    "fleet_kex": self.identity.fleet_kex,
                }
            )
        with self._lock:
            self.births = min(self.births + 1, STATE_STEP - 2)
            seq = self.connection * STATE_STEP + self.births
            later = self.births > 1
        # the first birth of a connection (and the will) carry the keys Ed25519-signed; the
        # later ones are MAC'd once a fleet key was agreed (the server keeps the X25519 key)
        return self._sign(state, seq, mac=later)

    def will(self, state: DeviceState) -> Will:
        """The retained ``online=false`` twin of a birth, for the current connection."""
        dead = state.model_copy(update={"online": False, "api_url": None})
        if self.identity is not None:  # commands sent while it is offline may still be MAC'd
            dead = dead.model_copy(update={"fleet_kex": self.identity.fleet_kex})
        with self._lock:
            seq = self.connection * STATE_STEP + STATE_STEP - 1
        return Will(self.topics.state(state.device_id), self._sign(dead, seq), qos=1, retain=True)

    def connection_lost(self) -> None:
        with self._lock:
            self.connection += 1
            self.births = 0


def last_will(state: DeviceState, topics: Topics, states: StateSigner | None = None) -> Will:
    """The retained ``online=false`` twin of a birth message (signed with ``states``)."""
    return (states or StateSigner(topics)).will(state)


class Link:
    def __init__(
        self,
        device_id: str,
        topics: Topics,
        transport: Transport,
        outbox: Outbox,
        processor: CommandProcessor,
        birth: Callable[[], DeviceState],
        *,
        synchronous: bool = False,
        states: StateSigner | None = None,
        on_kex: Callable[[bytes], None] | None = None,
    ) -> None:
        self.device_id = device_id
        self.on_kex = on_kex  # the fleet's signed X25519 key (protocol.device_mac)
        self.states = states or StateSigner(topics)
        self.topics = topics
        self.transport = transport
        self.outbox = outbox
        self.processor = processor
        self.birth = birth
        self.synchronous = synchronous  # unit tests: run jobs on the calling thread
        self.wake = threading.Event()  # set when the outbox should be flushed soon
        self.births = 0
        self.connected_once = threading.Event()
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._flush_lock = threading.Lock()
        processor.send_now = self.send_now
        processor.follow = self.follow
        self.following: set[str] = set()  # artifacts whose chunk topic is subscribed

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, connect_timeout: float = 0.0) -> Link:
        """Subscribe and connect. A broker that is down is fine: the transport keeps trying."""
        t = self.transport
        t.set_handler(self._on_message)
        t.on_connection_change(self._on_connection)
        # Everything is QoS 0. On a NATS cluster each QoS 1 subscription is a JetStream
        # consumer replicated on three nodes: at 3,000 devices one command round trip took
        # 32-38 s through the consumers and 1.4-1.7 s without. No broker has to queue a
        # command for a device that was away: the fleet server sends an unanswered command
        # again when the device's birth says it is back, and a copy the device already has
        # is answered with its last status (the ledger), never run twice.
        t.subscribe(self.topics.cmd(self.device_id), 0)
        # Per-device chunks: only servers from before shared artifact topics publish there;
        # the agent reports the chunks it misses (``missing``) either way.
        t.subscribe(self.topics.artifact_filter(self.device_id), 0)
        if self.on_kex is not None:
            # retained, and the transport subscribes again on every connection, so the
            # newest announcement arrives after any outage without a queue
            t.subscribe(self.topics.kex(), 0)
        if not self.synchronous and self._worker is None:
            self._worker = threading.Thread(target=self._work, name="link-worker", daemon=True)
            self._worker.start()
        for job in self.processor.resume():
            self._submit(job)
        from protocol.transport_paho import PahoTransport  # paho itself is imported lazily

        try:
            if isinstance(t, SigningTransport) and isinstance(t.inner, PahoTransport):
                t.connect(timeout=connect_timeout)  # 0: do not wait, the loop keeps trying
            elif isinstance(t, PahoTransport):
                t.connect(timeout=connect_timeout)
            else:
                t.connect()
        except TransportError as exc:
            log.warning(
                "MQTT broker not reachable yet (%s); serving continues, telemetry queues", exc
            )
        return self

    def stop(self, timeout: float = 3.0) -> None:
        """Flush what can be flushed, publish the offline state, disconnect, stop the worker."""
        if self._worker is not None:
            self._jobs.put(None)
            self._worker.join(timeout * 10)
            self._worker = None
        if self.transport.is_connected():
            self.flush(timeout=timeout)
            try:
                will = self.states.will(self.birth())
                self.transport.publish(will.topic, will.payload, qos=1, retain=True).wait(timeout)
            except Exception as exc:  # leaving anyway
                log.info("could not publish offline state: %s", exc)
        self.transport.close()

    # -- transport callbacks (network thread) -----------------------------------------------
    def _on_connection(self, up: bool) -> None:
        if up:
            self.connected_once.set()
            self.publish_birth()
            self.wake.set()
        else:
            # The broker published this connection's will; the next one gets a newer will.
            self.states.connection_lost()
            setter = getattr(self.transport, "set_will", None)
            if setter is not None:
                try:
                    setter(self.states.will(self.birth()))
                except Exception as exc:  # keep the old will rather than stop reconnecting
                    log.warning("could not renew the last will: %s", exc)
            # The transport logs the link change itself (``agent run`` prints it): no twin here.
            log.info("MQTT connection lost; reconnecting with backoff, telemetry queues")

    def _on_message(self, topic: str, payload: bytes) -> None:
        try:
            if topic == self.topics.kex():
                if self.on_kex is not None and payload:
                    self.on_kex(payload)
                return
            shared = self.topics.parse_artifact_chunk(topic)
            if shared is not None:
                if payload and shared[0] in self.following:
                    job = self.processor.on_chunk(shared[0], payload, shared[1])
                    if job is not None:
                        self._submit(job)
                return
            parsed = self.topics.parse(topic)
            if parsed is None or parsed.device_id != self.device_id:
                return
            job = None
            if parsed.kind == "cmd":
                job = self.processor.receive(payload)
            elif parsed.kind == "artifact":
                job = self.processor.on_chunk(parsed.rest[0], payload)
            if job is not None:
                self._submit(job)
            self.wake.set()
        except Exception:  # never let a message kill the network thread
            log.exception("handling %s failed", topic)

    def follow(self, sha256: str, on: bool) -> None:
        """Subscribe to (``on``) or leave an artifact's shared chunk topic. Subscribing again
        makes the broker send its retained chunks again (a stalled download uses that).
        QoS 0, as for the fleet key: the chunks are retained, a chunk lost on the way is
        asked for again (``missing``), and on NATS a QoS 1 subscription here would create
        and delete a replicated JetStream consumer per device per download."""
        topic = self.topics.artifact_chunks(sha256)
        if on:
            self.following.add(sha256)
            self.transport.subscribe(topic, 0)
        elif sha256 in self.following:
            self.following.discard(sha256)
            self.transport.unsubscribe(topic)

    # -- jobs ------------------------------------------------------------------------------
    def _submit(self, job: Job) -> None:
        if self.synchronous:
            self.processor.run(job)
        else:
            self._jobs.put(job)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                self.processor.run(job)
                self.wake.set()
            finally:
                self._jobs.task_done()

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Wait until every queued command job has run (tests and shutdown)."""
        done = threading.Event()

        def waiter() -> None:
            self._jobs.join()
            done.set()

        threading.Thread(target=waiter, daemon=True).start()
        return done.wait(timeout)

    # -- publishing ------------------------------------------------------------------------
    def publish_birth(self) -> None:
        if not self.transport.is_connected():
            return
        try:
            payload = self.states.birth(self.birth())
            self.transport.publish(self.topics.state(self.device_id), payload, qos=1, retain=True)
            self.births += 1
        except Exception as exc:  # the next connect publishes it again
            log.warning("birth message not published: %s", exc)

    def report(self, status: CommandStatus) -> None:
        """Queue a command status (the processor's ``report``)."""
        self.outbox.put_message("status", self.topics.status(self.device_id), status)
        self.wake.set()

    def send_now(self, status: CommandStatus) -> bool:
        """Publish a status best-effort (QoS 0, never stored): refusals of commands that were
        not authenticated must not cost disk. False when it could not be handed over."""
        if not self.transport.is_connected():
            return False
        try:
            self.transport.publish(self.topics.status(self.device_id), status.to_json(), qos=0)
        except TransportError:
            return False
        return True

    def flush(self, timeout: float = 5.0) -> int:
        """Deliver queued messages now (pump thread; never the network thread)."""
        with self._flush_lock:
            return self.outbox.flush(self.transport, timeout=timeout)
