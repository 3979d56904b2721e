"""Message models for every MQTT payload (JSON; binary data base64-encoded).

Later features extend these models by adding optional fields, never by changing the
meaning of an existing one. Every device-originated message carries ``device_id``; the
server accepts it only when that id matches the topic's. :data:`MAX_MESSAGE_BYTES` bounds
what either side will parse.

Every command, whatever its kind, carries a ``signature`` by the fleet's *command* key
over :func:`command_signing_bytes`: a short canonical envelope of the device id, command id,
kind, rollout id, ``ts``, ``issued_at`` and ``expires_at`` plus the sha256 of the canonical
JSON of *everything else* in the command (:func:`command_payload_sha256`: the deploy,
rollback, benchmark and config payloads and any field added later). The payload of a deploy
is the same for every device of a rollout, so the server hashes it once per bundle and signs
only the envelope per device. The signature is either Ed25519 by a command key, or
(``alg = "hmac-sha256"``, :func:`mac_command`) an HMAC-SHA256 with the per-device key the
device agreed with the fleet's X25519 key (:mod:`protocol.device_mac`), which the fleet
announced signed by a command key; the device accepts such a MAC only while that command
key is trusted and not revoked (:func:`verify_command`).

Hostile-input caps live here, on the models, so nothing unchecked gets past
:func:`decode`: every sha256 is exactly 64 lowercase hex digits, a deploy's chunk size is
between :data:`MIN_CHUNK_BYTES` and :data:`MAX_CHUNK_BYTES`, its chunk count at most
:data:`MAX_CHUNKS` and equal to ``ceil(bundle_size / chunk_size)``, and its size at most
:data:`MAX_BUNDLE_BYTES`. A deploy lists the sha256 of every chunk (``chunk_hashes``, signed
with the rest), so a chunk is checked against the signed command, not against a hash it
brings along.
"""

from __future__ import annotations

import base64
import hashlib
from datetime import datetime, timezone
from functools import cached_property
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .device_mac import AgreedKey, mac
from .errors import ProtocolError
from .manifest import canonical_json
from .signing import KeyPair, Signature, TrustStore
from .sketches import SketchSet
from .states import CommandKind, CommandStatusState

MAX_MESSAGE_BYTES = 1024 * 1024
DEFAULT_CHUNK_BYTES = 64 * 1024
MIN_CHUNK_BYTES = 1024  # floor: a tiny chunk size must not turn into millions of chunks
MAX_CHUNK_BYTES = 512 * 1024  # base64 of a chunk stays under MAX_MESSAGE_BYTES
MAX_CHUNKS = 16_384  # so the signed list of chunk digests fits in one message
MAX_BUNDLE_BYTES = 512 * 1024 * 1024  # protocol.bundle.MAX_MEMBER_BYTES
MAX_URL_CHARS = 2048

SHA256_PATTERN = r"^[0-9a-f]{64}$"
Sha256 = Annotated[str, Field(pattern=SHA256_PATTERN)]


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    def to_json(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


class ModelRef(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    name: str
    version: str
    release: int
    sha256: Sha256 | None = None  # sha256 of the model file


class DeviceState(Message):
    """Retained on ``state``: the birth message, replaced by the last will when offline."""

    device_id: str
    online: bool
    ts: datetime = Field(default_factory=utcnow)
    agent_version: str = ""
    profile: str = ""
    model: ModelRef | None = None
    previous: list[ModelRef] = Field(default_factory=list)
    runtimes: dict[str, str] = Field(default_factory=dict)
    tags: list[str] = Field(default_factory=list)
    api_url: str | None = None
    # Device identity (protocol.device_auth): the raw Ed25519 public key, base64, that signs
    # this device's messages, and the HMAC proof of an enrolment token (birth only).
    public_key: str | None = Field(default=None, max_length=64)
    enrol_proof: str | None = Field(default=None, max_length=64)
    # the device's X25519 public key, base64 (protocol.device_mac): its MAC key is agreed
    # with it; trusted only in a state signed by the pinned Ed25519 key
    x25519_key: str | None = Field(default=None, max_length=44)
    # the id of the fleet X25519 key the device agreed its MAC key with, from an
    # announcement it verified with its command keys: the fleet may MAC its commands
    fleet_kex: str | None = Field(default=None, pattern=r"^[0-9a-f]{16}$")
    # the release channel the agent follows ("stable" or "MODEL/stable"); optional
    channel: str | None = Field(default=None, max_length=160)


class DeployPayload(BaseModel):
    model_config = ConfigDict(extra="ignore")
    manifest: str = Field(max_length=MAX_MESSAGE_BYTES)  # base64 canonical manifest, as signed
    manifest_signature: Signature
    bundle_sha256: Sha256
    bundle_size: int = Field(ge=1, le=MAX_BUNDLE_BYTES)
    chunk_size: int = Field(default=DEFAULT_CHUNK_BYTES, ge=MIN_CHUNK_BYTES, le=MAX_CHUNK_BYTES)
    n_chunks: int = Field(ge=1, le=MAX_CHUNKS)
    http_url: str | None = Field(default=None, max_length=MAX_URL_CHARS)  # alternative path
    shadow: bool = False  # install as a shadow candidate, do not switch
    replace_model: bool = False  # signed permission to replace a model of another name
    # base64 of the n_chunks raw sha256 digests, chunk after chunk (see chunk_hashes())
    chunk_hashes: str | None = Field(default=None, max_length=4 * (-(-32 * MAX_CHUNKS // 3)))

    @model_validator(mode="after")
    def _chunks_agree(self) -> DeployPayload:
        expected = -(-self.bundle_size // self.chunk_size)
        if self.n_chunks != expected:
            raise ValueError(
                f"n_chunks {self.n_chunks} does not match {self.bundle_size} bytes "
                f"in chunks of {self.chunk_size} ({expected})"
            )
        if self.chunk_hashes is not None and len(self.chunk_hashes) != 4 * (
            -(-32 * self.n_chunks // 3)
        ):
            raise ValueError(f"chunk_hashes does not hold {self.n_chunks} sha256 digests")
        return self

    @cached_property
    def chunk_digests(self) -> list[bytes] | None:
        """The signed sha256 of every chunk, or None when the deploy lists none."""
        if self.chunk_hashes is None:
            return None
        try:
            raw = base64.b64decode(self.chunk_hashes, validate=True)
        except ValueError:
            return None
        if len(raw) != 32 * self.n_chunks:
            return None
        return [raw[i : i + 32] for i in range(0, len(raw), 32)]

    def manifest_bytes(self) -> bytes:
        return base64.b64decode(self.manifest)

    def chunk_bytes(self, index: int) -> int:
        """The exact size chunk ``index`` must have."""
        if index < self.n_chunks - 1:
            return self.chunk_size
        return self.bundle_size - self.chunk_size * (self.n_chunks - 1)


class RollbackPayload(BaseModel):
    model_config = ConfigDict(extra="ignore")
    # The version the device ran before the rollout (recorded by the server when it first
    # sent the deploy). None: the slot installed before the active one.
    target: ModelRef | None = None
    to_release: int | None = None  # operator tools: a release by number
    reason: str = Field(default="", max_length=500)

    @model_validator(mode="after")
    def _target_complete(self) -> RollbackPayload:
        if self.target is not None and self.target.sha256 is None:
            raise ValueError("a rollback target names the model file's sha256")
        return self


class BenchmarkPayload(BaseModel):
    model_config = ConfigDict(extra="ignore")
    runs: int = Field(default=200, ge=10, le=100_000)
    bundle_sha256: Sha256 | None = None  # None: the active model


class Command(Message):
    command_id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:@-]+$")
    device_id: str = Field(min_length=1, max_length=128)
    kind: CommandKind
    ts: datetime = Field(default_factory=utcnow)
    issued_at: datetime | None = None  # signed; the device refuses one from the future
    expires_at: datetime | None = None  # signed; the device refuses it afterwards
    rollout_id: str | None = None
    deploy: DeployPayload | None = None
    rollback: RollbackPayload | None = None
    benchmark: BenchmarkPayload | None = None
    config: dict[str, Any] | None = None
    signature: Signature | None = None


class CommandStatus(Message):
    device_id: str
    command_id: str
    state: CommandStatusState
    ts: datetime = Field(default_factory=utcnow)
    seq: int = 0
    rollout_id: str | None = None
    reason: str | None = None  # a protocol.errors.ReasonCode value on failure
    detail: str = ""
    progress: float | None = None  # 0..1 while downloading
    model: ModelRef | None = None
    result: dict[str, Any] | None = None  # e.g. a field benchmark
    # False: the device refused a command before admitting it (forged, misaddressed, stale,
    # unparsable). Its command id was chosen by whoever sent it, so this is never a verdict
    # on the server's own command: the server records it and decides nothing from it.
    admitted: bool = True


class ArtifactChunk(Message):
    sha256: Sha256  # of the whole artifact
    index: int = Field(ge=0, lt=MAX_CHUNKS)
    count: int = Field(ge=1, le=MAX_CHUNKS)
    chunk_sha256: Sha256
    data: str = Field(max_length=4 * (-(-MAX_CHUNK_BYTES // 3)))  # base64

    def payload(self) -> bytes:
        return base64.b64decode(self.data)


class LatencySummary(BaseModel):
    model_config = ConfigDict(extra="ignore")
    count: int = 0
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    histogram: dict[str, int] = Field(default_factory=dict)  # upper bound ms → count


class MetricsReport(Message):
    device_id: str
    seq: int = Field(ge=0)
    window_start: datetime
    window_end: datetime
    model: ModelRef | None = None
    requests: int = 0
    errors: int = 0
    fallbacks: int = 0
    latency: LatencySummary = LatencySummary()
    feedback_count: int = 0
    accuracy: float | None = None  # classification: share correct
    mae: float | None = None  # regression
    cpu_percent: float | None = None
    rss_mb: float | None = None
    disk_free_mb: float | None = None
    conditions: list[str] = Field(default_factory=list)  # e.g. ["disk_full"]
    shadow: dict[str, Any] | None = None


class SketchReport(Message):
    device_id: str
    model: ModelRef
    window_start: datetime
    window_end: datetime
    seq: int = Field(ge=0)
    sketches: SketchSet
    merged_windows: int = 1  # >1 when the outbox merged old windows to save space


class Alert(Message):
    kind: Literal[
        "drift", "rollout_halted", "rollout_failed", "device_offline", "disk_full", "health"
    ]
    ts: datetime = Field(default_factory=utcnow)
    model: str | None = None
    version: str | None = None
    rollout_id: str | None = None
    message: str = ""
    details: dict[str, Any] = Field(default_factory=dict)


M = TypeVar("M", bound=BaseModel)

TOPIC_MODELS: dict[str, type[BaseModel]] = {
    "state": DeviceState,
    "cmd": Command,
    "status": CommandStatus,
    "artifact": ArtifactChunk,
    "metrics": MetricsReport,
    "sketch": SketchReport,
    "alerts": Alert,
}


def decode(model: type[M], payload: bytes) -> M:
    """Parse a payload, raising :class:`ProtocolError` naming the bad field."""
    if len(payload) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message is {len(payload)} bytes (limit {MAX_MESSAGE_BYTES})")
    try:
        return model.model_validate_json(payload)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or model.__name__
        raise ProtocolError(f"{model.__name__}.{where}: {err['msg']}") from None


def chunk_hashes(data: bytes, chunk_size: int) -> str:
    """``DeployPayload.chunk_hashes`` for ``data`` cut into ``chunk_size`` pieces."""
    digests = b"".join(
        hashlib.sha256(data[i : i + chunk_size]).digest()
        for i in range(0, max(len(data), 1), chunk_size)
    )
    return base64.b64encode(digests).decode()


COMMAND_DOMAIN = b"edgefleet-command/2"
COMMAND_MAC_ALG = "hmac-sha256"
# the fields of the signed envelope; everything else in a command is its payload
ENVELOPE_FIELDS: set[str] = {
    "command_id",
    "device_id",
    "kind",
    "rollout_id",
    "ts",
    "issued_at",
    "expires_at",
}
_NOT_PAYLOAD = ENVELOPE_FIELDS | {"signature"}


def command_payload_sha256(cmd: Command) -> str:
    """Hex sha256 of the canonical JSON of everything in ``cmd`` but its envelope and
    signature. The same for every device a rollout deploys the same bundle to."""
    payload = cmd.model_dump(mode="json", exclude=_NOT_PAYLOAD, exclude_none=True)
    return hashlib.sha256(canonical_json(payload)).hexdigest()


def command_signing_bytes(cmd: Command, payload_sha256: str | None = None) -> bytes:
    """What a command's signature covers (all kinds): the domain, then the canonical JSON of
    the envelope and the payload's sha256. ``payload_sha256`` is the caller's
    :func:`command_payload_sha256` of this very command, when it has it already."""
    env = cmd.model_dump(mode="json", include=ENVELOPE_FIELDS, exclude_none=True)
    env["payload_sha256"] = payload_sha256 or command_payload_sha256(cmd)
    return COMMAND_DOMAIN + b"\0" + canonical_json(env)


def _stamped(cmd: Command, now: datetime | None, ttl_s: float | None) -> Command:
    from datetime import timedelta

    if ttl_s is None:
        return cmd
    issued = (now or utcnow()).replace(microsecond=0)
    return cmd.model_copy(
        update={"issued_at": issued, "expires_at": issued + timedelta(seconds=ttl_s)}
    )


def sign_command(
    cmd: Command,
    key: KeyPair,
    *,
    now: datetime | None = None,
    ttl_s: float | None = None,
    payload_sha256: str | None = None,
) -> Command:
    """Sign ``cmd``; with ``ttl_s`` stamp ``issued_at = now`` and ``expires_at = now + ttl``."""
    cmd = _stamped(cmd, now, ttl_s)
    sig = key.sign(command_signing_bytes(cmd, payload_sha256))
    return cmd.model_copy(update={"signature": sig})


def mac_command(
    cmd: Command,
    key: bytes,
    fleet_kex_id: str,
    *,
    now: datetime | None = None,
    ttl_s: float | None = None,
    payload_sha256: str | None = None,
) -> Command:
    """Authenticate ``cmd`` with the MAC key agreed with its device (``protocol.device_mac``)."""
    cmd = _stamped(cmd, now, ttl_s)
    tag = mac(key, command_signing_bytes(cmd, payload_sha256))
    b64 = base64.b64encode(tag).decode()
    sig = Signature(alg=COMMAND_MAC_ALG, key_id=fleet_kex_id, signature=b64)
    return cmd.model_copy(update={"signature": sig})


def verify_command(
    cmd: Command, trust: TrustStore, agreed: dict[str, AgreedKey] | None = None
) -> str:
    """Return the command key id behind the signature; raise SignatureError if unsigned or
    invalid.

    An Ed25519 signature must verify with a key of ``trust``. A MAC
    (:data:`COMMAND_MAC_ALG`) must verify with the key in ``agreed`` for the fleet X25519
    key it names, and the command key that signed that fleet key's announcement must still
    be in ``trust`` and not revoked: revoking a command key also ends the MACs agreed under it.
    """
    import hmac as _hmac

    from .errors import ReasonCode, SignatureError

    sig = cmd.signature
    if sig is None:
        raise SignatureError(ReasonCode.SIGNATURE_INVALID, f"{cmd.kind} command is not signed")
    if sig.alg != COMMAND_MAC_ALG:
        return trust.verify(command_signing_bytes(cmd), sig)
    k = (agreed or {}).get(sig.key_id)
    if k is None:
        raise SignatureError(
            ReasonCode.KEY_UNKNOWN, f"no key agreed with fleet key {sig.key_id[:16]}"
        )
    if k.signer in trust.revoked:
        raise SignatureError(ReasonCode.KEY_REVOKED, f"key {k.signer} is revoked")
    if k.signer not in trust.keys:
        raise SignatureError(ReasonCode.KEY_UNKNOWN, f"key {k.signer} is not trusted")
    try:
        tag = base64.b64decode(sig.signature, validate=True)
    except ValueError:
        tag = b""
    if not _hmac.compare_digest(tag, mac(k.key, command_signing_bytes(cmd))):
        raise SignatureError(
            ReasonCode.SIGNATURE_INVALID, f"MAC with fleet key {sig.key_id[:16]} does not verify"
        )
    return k.signer
