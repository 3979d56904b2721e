"""Message models for every MQTT payload (JSON; binary data base64-encoded).

Later features extend these models by adding optional fields, never by changing the
meaning of an existing one. Every device-originated message carries ``device_id``; the
server accepts it only when that id matches the topic's. :data:`MAX_MESSAGE_BYTES` bounds
what either side will parse.

Signed commands (deploy, rollback) carry an Ed25519 ``signature`` over
:func:`command_signing_bytes`: the canonical JSON of the command without its signature.
"""

from __future__ import annotations

import base64
from datetime import datetime, timezone
from typing import Any, Literal, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ProtocolError
from .manifest import canonical_json
from .signing import KeyPair, Signature, TrustStore
from .sketches import SketchSet

MAX_MESSAGE_BYTES = 1024 * 1024
DEFAULT_CHUNK_BYTES = 64 * 1024

DeviceStateName = Literal[
    "queued",
    "downloading",
    "verifying",
    "installed",
    "failed",
    "rejected",
    "timed_out",
    "rolled_back",
]
CommandStatusState = Union[DeviceStateName, Literal["accepted", "progress", "done"]]


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
    sha256: str | None = None  # sha256 of the model file


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
    # the release channel the agent follows ("stable" or "MODEL/stable"); optional
    channel: str | None = Field(default=None, max_length=160)


class DeployPayload(BaseModel):
    model_config = ConfigDict(extra="ignore")
    manifest: str  # base64 of the canonical manifest bytes, exactly as signed
    manifest_signature: Signature
    bundle_sha256: str
    bundle_size: int = Field(ge=0)
    chunk_size: int = Field(default=DEFAULT_CHUNK_BYTES, gt=0)
    n_chunks: int = Field(ge=0)
    http_url: str | None = None  # alternative download path
    shadow: bool = False  # install as a shadow candidate, do not switch

    def manifest_bytes(self) -> bytes:
        return base64.b64decode(self.manifest)


class RollbackPayload(BaseModel):
    model_config = ConfigDict(extra="ignore")
    to_release: int | None = None  # None: the previous slot
    reason: str = ""


class BenchmarkPayload(BaseModel):
    model_config = ConfigDict(extra="ignore")
    runs: int = Field(default=200, ge=10, le=100_000)
    bundle_sha256: str | None = None  # None: the active model


class Command(Message):
    command_id: str = Field(min_length=1, max_length=128)
    device_id: str
    kind: Literal["deploy", "rollback", "benchmark", "config", "shadow_stop"]
    ts: datetime = Field(default_factory=utcnow)
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


class ArtifactChunk(Message):
    sha256: str  # of the whole artifact
    index: int = Field(ge=0)
    count: int = Field(ge=1)
    chunk_sha256: str
    data: str  # base64

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
    kind: Literal["drift", "rollout_halted", "rollout_failed", "device_offline", "disk_full"]
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


def command_signing_bytes(cmd: Command) -> bytes:
    return canonical_json(cmd.model_dump(mode="json", exclude={"signature"}, exclude_none=True))


def sign_command(cmd: Command, key: KeyPair) -> Command:
    return cmd.model_copy(update={"signature": key.sign(command_signing_bytes(cmd))})


def verify_command(cmd: Command, trust: TrustStore) -> str:
    """Return the signing key id; raise SignatureError if unsigned or invalid."""
    from .errors import ReasonCode, SignatureError

    if cmd.signature is None:
        raise SignatureError(ReasonCode.SIGNATURE_INVALID, f"{cmd.kind} command is not signed")
    return trust.verify(command_signing_bytes(cmd), cmd.signature)
