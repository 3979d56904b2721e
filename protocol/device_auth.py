"""Device message signatures: every device→server message is signed by the device's own key.

Why keys and not broker ACLs: a signature travels with the message, so it holds on every
broker (the embedded amqtt has no useful ACLs; Mosquitto without an ACL file is common; a
stolen broker password lets anyone publish). The server pins each device's Ed25519 public
key at enrolment and drops any message that is not signed by it.

Wire form. A signed payload is the message's JSON object with one last member appended::

    {"device_id":"d1", … ,"dsig":"<boot>.<seq>.<key_id>.<base64 signature>"}

The signature covers ``DOMAIN \\0 topic \\0 "<boot>.<seq>" \\0 body`` where ``body`` is the
payload up to (not including) ``,"dsig"``: the exact bytes, so nothing is canonicalised
or parsed twice, and JSON subscribers that do not care simply ignore the extra member.
Binding the topic binds the device id and the kind (a status cannot be replayed as a
state). ``boot`` counts agent starts (persisted on the device); ``seq`` orders messages
within one boot:

* ``state`` messages (retained birth and last will) carry the link's state sequence: the
  server keeps the newest ``(boot, seq)`` it accepted and drops anything older, so an old
  retained state or last will cannot mark a live device offline;
* every other kind carries the signer's message counter; the server keeps a sliding
  anti-replay window (as IPsec does) per device.

Enrolment proof: a device configured with an enrolment token sends
``HMAC-SHA256(sha256(token), device_id \\n key_id)`` in its birth. The token never
travels, and a proof seen on the broker is bound to that device's key.

Nothing here touches a socket: :class:`SigningTransport` only wraps another transport.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .device_mac import mac
from .signing import KeyPair, key_id
from .transport import Delivery, Handler, Transport, Will

DOMAIN = b"edgefleet-device-msg/1"
SIG_MEMBER = b',"dsig":"'
_TRAILER_RE = re.compile(rb"^(\d{1,12})\.(\d{1,15})\.([0-9a-f]{16})\.([A-Za-z0-9+/]{86}==)$")
# the MAC scheme (protocol.device_mac): "m.<boot>.<seq>.<fleet kex id>.<base64 HMAC-SHA256>"
_MAC_TRAILER_RE = re.compile(rb"^m\.(\d{1,12})\.(\d{1,15})\.([0-9a-f]{16})\.([A-Za-z0-9+/]{43}=)$")
ED25519 = "ed25519"
MAC = "mac"
MAX_TRAILER = 160


@dataclass(frozen=True)
class SignedEnvelope:
    """What :func:`open_envelope` found: the signed body and the claimed signer."""

    body: bytes
    boot: int
    seq: int
    key_id: str  # Ed25519: the device key's id; MAC: the fleet kex key's id
    signature: bytes
    scheme: str = ED25519  # or MAC


def _signing_input(topic: str, boot: int, seq: int, body: bytes) -> bytes:
    return b"\0".join((DOMAIN, topic.encode(), f"{boot}.{seq}".encode(), body))


def sign_payload(payload: bytes, topic: str, key: KeyPair, boot: int, seq: int) -> bytes:
    """Append the ``dsig`` member to a JSON object payload."""
    body = payload.rstrip()
    if not body.endswith(b"}"):
        raise ValueError("only JSON objects can be signed")
    body = body[:-1]
    sig = key.private.sign(_signing_input(topic, boot, seq, body))
    sep = SIG_MEMBER if not body.rstrip().endswith(b"{") else SIG_MEMBER[1:]
    trailer = f"{boot}.{seq}.{key.key_id}.".encode() + base64.b64encode(sig)
    return body + sep + trailer + b'"}'


def open_envelope(payload: bytes) -> SignedEnvelope | None:
    """Split a signed payload; ``None`` when it carries no well-formed ``dsig`` member.

    Cheap and allocation-bounded: one ``rfind`` over the payload and a regex on at most
    :data:`MAX_TRAILER` bytes.
    """
    if not payload.endswith(b'"}'):
        return None
    start = payload.rfind(SIG_MEMBER[1:], max(0, len(payload) - MAX_TRAILER - 10))
    if start < 0:
        return None
    trailer = payload[start + len(SIG_MEMBER) - 1 : -2]
    scheme = ED25519
    m = _TRAILER_RE.match(trailer)
    if m is None:
        m = _MAC_TRAILER_RE.match(trailer)
        scheme = MAC
    if m is None:
        return None
    body = payload[:start]
    if body.endswith(b","):
        body = body[:-1]
    return SignedEnvelope(
        body=body,
        boot=int(m.group(1)),
        seq=int(m.group(2)),
        key_id=m.group(3).decode(),
        signature=base64.b64decode(m.group(4)),
        scheme=scheme,
    )


def verify_envelope(env: SignedEnvelope, topic: str, public: Ed25519PublicKey) -> bool:
    if env.scheme != ED25519:
        return False
    try:
        public.verify(env.signature, _signing_input(topic, env.boot, env.seq, env.body))
    except InvalidSignature:
        return False
    return True


def mac_payload(
    payload: bytes, topic: str, key: bytes, fleet_kex_id: str, boot: int, seq: int
) -> bytes:
    """Append an ``m.`` ``dsig`` member (HMAC-SHA256 with the device's agreed key ``key``)."""
    body = payload.rstrip()
    if not body.endswith(b"}"):
        raise ValueError("only JSON objects can be signed")
    body = body[:-1]
    tag = mac(key, _signing_input(topic, boot, seq, body))
    sep = SIG_MEMBER if not body.rstrip().endswith(b"{") else SIG_MEMBER[1:]
    trailer = f"m.{boot}.{seq}.{fleet_kex_id}.".encode() + base64.b64encode(tag)
    return body + sep + trailer + b'"}'


def verify_mac(env: SignedEnvelope, topic: str, key: bytes) -> bool:
    if env.scheme != MAC:
        return False
    expected = mac(key, _signing_input(topic, env.boot, env.seq, env.body))
    return hmac.compare_digest(expected, env.signature)


def public_key_b64(public: Ed25519PublicKey) -> str:
    from cryptography.hazmat.primitives import serialization

    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def public_key_from_b64(text: str) -> Ed25519PublicKey | None:
    try:
        raw = base64.b64decode(text, validate=True)
        if len(raw) != 32:
            return None
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        return None


def token_hash(token: str) -> str:
    """What a fleet config stores for an enrolment token (hex sha256)."""
    return hashlib.sha256(token.strip().encode()).hexdigest()


def enrol_proof(token_sha256_hex: str, device_id: str, kid: str) -> str:
    return hmac.new(
        bytes.fromhex(token_sha256_hex), f"{device_id}\n{kid}".encode(), hashlib.sha256
    ).hexdigest()


def check_enrol_proof(
    proof: str, token_hashes: list[str], device_id: str, public: Ed25519PublicKey
) -> bool:
    kid = key_id(public)
    ok = False
    for h in token_hashes:  # every hash is tried: the time does not say which one matched
        ok |= hmac.compare_digest(enrol_proof(h, device_id, kid), proof)
    return ok


class DeviceSigner:
    """Signs one device's messages: its key, its boot number and a message counter."""

    def __init__(self, device_id: str, key: KeyPair, boot: int) -> None:
        self.device_id = device_id
        self.key = key
        self.boot = boot
        self._seq = 0
        self._lock = threading.Lock()
        # (agreed MAC key, fleet kex id) once a verified fleet announcement arrived
        self.mac: tuple[bytes, str] | None = None

    def use_mac(self, key: bytes, fleet_kex_id: str) -> None:
        """MAC non-state messages from now on (:mod:`protocol.device_mac`)."""
        self.mac = (key, fleet_kex_id)

    @property
    def key_id(self) -> str:
        return self.key.key_id

    def public_key_b64(self) -> str:
        return public_key_b64(self.key.public)

    def next_seq(self) -> int:
        with self._lock:
            self._seq += 1
            return self._seq

    def sign(
        self, topic: str, payload: bytes, seq: int | None = None, *, mac_state: bool = False
    ) -> bytes:
        """Ed25519 for states (an explicit ``seq``: they carry the keys), else the MAC once
        a fleet key was agreed. ``mac_state``: MAC this state too (a birth after the first
        of a connection, whose keys the server holds already)."""
        agreed = self.mac
        if agreed is not None and seq is not None and mac_state:
            return mac_payload(payload, topic, agreed[0], agreed[1], self.boot, seq)
        if seq is None and agreed is not None and not topic.endswith("/state"):
            return mac_payload(payload, topic, agreed[0], agreed[1], self.boot, self.next_seq())
        return sign_payload(
            payload, topic, self.key, self.boot, self.next_seq() if seq is None else seq
        )


class SigningTransport:
    """A :class:`Transport` that signs what a device publishes on its own topics.

    ``state`` topics are signed by whoever builds the state (the link: it owns the state
    sequence) and pass through untouched when already signed; every other device topic
    is signed here with the signer's message counter.
    """

    def __init__(
        self,
        inner: Transport,
        signer: DeviceSigner,
        own_topic: Callable[[str], bool],
    ) -> None:
        self.inner = inner
        self.signer = signer
        self.own_topic = own_topic
        self.client_id = inner.client_id

    def connect(self, **kw: float) -> None:  # PahoTransport takes timeout=…
        self.inner.connect(**kw)

    def close(self) -> None:
        self.inner.close()

    def is_connected(self) -> bool:
        return self.inner.is_connected()

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> Delivery:
        if payload and self.own_topic(topic) and open_envelope(payload) is None:
            payload = self.signer.sign(topic, payload)
        return self.inner.publish(topic, payload, qos=qos, retain=retain)

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        self.inner.subscribe(topic_filter, qos)

    def unsubscribe(self, topic_filter: str) -> None:
        self.inner.unsubscribe(topic_filter)

    def set_handler(self, handler: Handler) -> None:
        self.inner.set_handler(handler)

    def on_connection_change(self, callback: Callable[[bool], None]) -> None:
        self.inner.on_connection_change(callback)

    def set_will(self, will: Will) -> None:
        setter = getattr(self.inner, "set_will", None)
        if setter is not None:
            setter(will)

    def __getattr__(self, name: str) -> object:  # connect(timeout=…), last_error, url …
        return getattr(self.inner, name)
