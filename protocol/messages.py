"""Message models for every MQTT payload (JSON; binary data base64-encoded).

Later features extend these models by adding optional fields, never by changing the
meaning of an existing one. Every device-originated message carries ``device_id``; the
server accepts it only when that id matches the topic's. :data:`MAX_MESSAGE_BYTES` bounds
what either side will parse.

Every command, whatever its kind, carries an Ed25519 ``signature`` by a fleet *command*
key over :func:`command_signing_bytes`: the canonical JSON of the whole command without its
signature, which covers the device id, command id, kind, every payload, ``issued_at`` and
``expires_at``. Hostile-input caps live here, on the models, so nothing unchecked gets past
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


def command_signing_bytes(cmd: Command) -> bytes:
    """Canonical bytes of everything in the command but its signature (all kinds)."""
    return canonical_json(cmd.model_dump(mode="json", exclude={"signature"}, exclude_none=True))


def sign_command(
    cmd: Command,
    key: KeyPair,
    *,
    now: datetime | None = None,
    ttl_s: float | None = None,
) -> Command:
    """Sign ``cmd``; with ``ttl_s`` stamp ``issued_at = now`` and ``expires_at = now + ttl``."""
    from datetime import timedelta

    update: dict[str, Any] = {}
    if ttl_s is not None:
        issued = (now or utcnow()).replace(microsecond=0)
        update = {"issued_at": issued, "expires_at": issued + timedelta(seconds=ttl_s)}
    cmd = cmd.model_copy(update=update) if update else cmd
    return cmd.model_copy(update={"signature": key.sign(command_signing_bytes(cmd))})


def verify_command(cmd: Command, trust: TrustStore) -> str:
    """Return the signing key id; raise SignatureError if unsigned or invalid."""
    from .errors import ReasonCode, SignatureError

    if cmd.signature is None:
        raise SignatureError(ReasonCode.SIGNATURE_INVALID, f"{cmd.kind} command is not signed")
    return trust.verify(command_signing_bytes(cmd), cmd.signature)
