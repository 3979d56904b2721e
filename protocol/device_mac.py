"""Per-device MAC keys: X25519 agreement with the fleet, then HMAC-SHA256 on device messages.

Why: one Ed25519 verify costs the server ~60–110 µs per device message; an HMAC-SHA256
costs a few µs. The property stays the same — a device (even a compromised one) can speak
only for itself and a broker client for nobody — because each device's MAC key ``K`` is
known only to that device and to the holders of the fleet's command key.

Agreement::

    device: static X25519 key (0600 beside its Ed25519 key); its public key travels in
            its Ed25519-signed birth (DeviceState.x25519_key)
    fleet:  X25519 key = HKDF(command private key, info=KEX_LABEL): every fleet process
            holding the command key derives the same one; it is announced, signed by the
            command key, retained on ``{prefix}/fleet/kex`` (:class:`KexAnnouncement`)
    both:   K = HKDF-SHA256(X25519(shared), info = MAC_LABEL ‖ device_id ‖ device pub ‖ fleet pub)

Wire form: the ``dsig`` member of :mod:`protocol.device_auth` with an ``m.`` prefix::

    "dsig":"m.<boot>.<seq>.<fleet kex id>.<base64 HMAC-SHA256>"

The MAC covers the same bytes an Ed25519 ``dsig`` covers (topic, ``boot.seq``, body).
A device's first birth of each connection and its last will are Ed25519-signed: they
carry the keys. Later births may carry the MAC (the server keeps each device's X25519 key
in its registry, so it can check them after a restart too), and the fleet MACs commands to a
device whose signed birth says it holds the fleet's current key (``DeviceState.fleet_kex``;
:func:`protocol.messages.mac_command`). A device that has no verified announcement keeps
signing with Ed25519, and gets Ed25519-signed commands.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass
from datetime import datetime

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import BaseModel, ConfigDict, Field

from .manifest import canonical_json
from .signing import KeyPair, Signature, TrustStore

KEX_LABEL = b"edgefleet-fleet-x25519/1"
MAC_LABEL = b"edgefleet-device-mac/1"
MAX_KEX_BYTES = 1024


def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def raw_public(public: X25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def x25519_b64(public: X25519PublicKey) -> str:
    return base64.b64encode(raw_public(public)).decode()


def x25519_from_b64(text: str) -> X25519PublicKey | None:
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError:
        return None
    if len(raw) != 32:
        return None
    return X25519PublicKey.from_public_bytes(raw)


def kex_id(public: X25519PublicKey) -> str:
    """16 hex characters naming an X25519 public key (as key ids name Ed25519 keys)."""
    return hashlib.sha256(raw_public(public)).hexdigest()[:16]


def fleet_kex_key(command_key: KeyPair) -> X25519PrivateKey:
    """The fleet's X25519 key, derived from its command private key (same key, same result)."""
    seed = command_key.private.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )
    return X25519PrivateKey.from_private_bytes(_hkdf(seed, KEX_LABEL))


def mac_key(
    own: X25519PrivateKey,
    peer: X25519PublicKey,
    device_id: str,
    device_pub: bytes,
    fleet_pub: bytes,
) -> bytes:
    """K for one device: the same on the device (own = device key) and the fleet."""
    shared = own.exchange(peer)
    info = b"\0".join((MAC_LABEL, device_id.encode(), device_pub, fleet_pub))
    return _hkdf(shared, info)


def mac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


@dataclass(frozen=True)
class AgreedKey:
    """A device's MAC key ``K`` with its fleet, and the command key id that signed the fleet
    announcement it was agreed from (a MAC'd command counts as that key's, while it is
    trusted)."""

    key: bytes
    signer: str

    def __repr__(self) -> str:  # never print key material
        return f"AgreedKey(signer={self.signer!r})"


class KexAnnouncement(BaseModel):
    """Retained on ``{prefix}/fleet/kex``: the fleet's X25519 public key, signed by its
    command key (the role devices already pin)."""

    model_config = ConfigDict(extra="ignore")
    x25519: str = Field(max_length=44)
    issued_at: datetime
    signature: Signature | None = None

    def signing_bytes(self) -> bytes:
        return canonical_json(self.model_dump(mode="json", exclude={"signature"}))

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()


def announce(command_key: KeyPair, issued_at: datetime) -> KexAnnouncement:
    public = fleet_kex_key(command_key).public_key()
    msg = KexAnnouncement(x25519=x25519_b64(public), issued_at=issued_at.replace(microsecond=0))
    return msg.model_copy(update={"signature": command_key.sign(msg.signing_bytes())})


def open_announcement(
    payload: bytes, trust: TrustStore, now: datetime, skew_s: float = 300.0
) -> tuple[KexAnnouncement, X25519PublicKey] | str:
    """A device's check of a fleet announcement: the announcement and the fleet's key, or a
    reason (``oversize``, ``malformed``, a signature reason code, ``future``).

    The signature must verify against the device's *command* trust store: a broker client
    or another device cannot make a device agree a key with anyone but its fleet.
    """
    from .errors import SignatureError

    if len(payload) > MAX_KEX_BYTES:
        return "oversize"
    try:
        msg = KexAnnouncement.model_validate_json(payload)
    except ValueError:
        return "malformed"
    if msg.signature is None or msg.issued_at.tzinfo is None:
        return "malformed"
    try:
        trust.verify(msg.signing_bytes(), msg.signature)
    except SignatureError as exc:
        return exc.reason.value
    if (msg.issued_at - now).total_seconds() > skew_s:
        return "future"
    peer = x25519_from_b64(msg.x25519)
    if peer is None:
        return "malformed"
    return msg, peer
