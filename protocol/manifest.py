"""The bundle manifest and its canonical bytes.

The manifest is the one document a device trusts: it lists every file of the bundle with
its sha256 and size, describes inputs and outputs, records lineage, quantization, the
profiles it was benchmarked for, smoke tests, the anti-rollback ``release`` and the validity
window. The Ed25519 signature covers :func:`canonical_bytes` of it, nothing else.

Canonical bytes: UTF-8 JSON of ``model_dump(mode="json")`` with sorted keys, no spaces and
no NaN. Two manifests that compare equal have the same canonical bytes.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ProtocolError
from .schema import InputSchema, OutputSchema, Scalar

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
REFERENCE_SKETCH_NAME = "reference.sketch"
MODEL_CARD_NAME = "model_card.md"

_SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$"
)
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_MEMBER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FileEntry(_Model):
    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)

    @field_validator("path")
    @classmethod
    def _flat_safe_name(cls, v: str) -> str:
        if not _MEMBER.match(v):
            raise ValueError("bundle member names are flat file names (no '/', no '..')")
        return v


class ModelInfo(_Model):
    path: str
    format: Literal["onnx", "tflite"]
    opset: int | None = None
    ml_opset: int | None = None
    operators: list[str] = Field(default_factory=list)
    size_bytes: int = 0


class Lineage(_Model):
    source_sha256: str
    # the library the source model came from (a Pipeline counts as "sklearn")
    source_kind: Literal["sklearn", "onnx", "keras", "xgboost", "lightgbm", "catboost", "torch"]
    source_name: str = ""
    converter: str = ""
    settings: dict[str, Any] = Field(default_factory=dict)
    tool_versions: dict[str, str] = Field(default_factory=dict)


class Quantization(_Model):
    mode: Literal["none", "dynamic", "static", "fp16", "int8"] = "none"
    details: dict[str, Any] = Field(default_factory=dict)


class BenchmarkResult(_Model):
    p50_ms: float
    p95_ms: float
    p99_ms: float
    batch_p50_ms: float | None = None
    throughput_rps: float | None = None
    load_ms: float | None = None
    peak_memory_mb: float | None = None
    size_bytes: int | None = None
    # True: host latency scaled by the profile's speed factor. False: measured on the device.
    estimated: bool = True
    fits_budget: bool = True
    measured_on: str = ""


class TargetProfile(_Model):
    profile: str
    latency_budget_ms: float
    benchmark: BenchmarkResult | None = None


class SmokeTest(_Model):
    """Canonical inputs with the outputs the packaged model produced for them."""

    rows: list[list[Scalar]] = Field(min_length=1)
    expected_labels: list[Union[int, str]] | None = None
    expected_values: list[list[float]] | None = None
    expected_probabilities: list[list[float]] | None = None
    atol: float = 1e-3


class Fallback(_Model):
    """What the device answers when the model raises."""

    kind: Literal["none", "constant", "previous"] = "none"
    value: Union[int, float, str] | None = None


class Manifest(_Model):
    format_version: int = FORMAT_VERSION
    name: str
    version: str
    release: int = Field(ge=1)
    created_at: datetime
    expires_at: datetime
    model: ModelInfo
    files: list[FileEntry] = Field(min_length=1)
    input_schema: InputSchema
    output_schema: OutputSchema
    lineage: Lineage
    quantization: Quantization = Quantization()
    targets: list[TargetProfile] = Field(default_factory=list)
    smoke_tests: list[SmokeTest] = Field(default_factory=list)
    fallback: Fallback = Fallback()
    metadata: dict[str, str] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("name must be lowercase letters, digits, '.', '_' or '-'")
        return v

    @field_validator("version")
    @classmethod
    def _semver(cls, v: str) -> str:
        if not _SEMVER.match(v):
            raise ValueError(f"version {v!r} is not semantic versioning (MAJOR.MINOR.PATCH)")
        return v

    @field_validator("created_at", "expires_at")
    @classmethod
    def _aware(cls, v: datetime) -> datetime:
        if v.tzinfo is None:
            raise ValueError("timestamps must carry a timezone")
        return v.astimezone(timezone.utc)

    @property
    def bundle_filename(self) -> str:
        return f"{self.name}-{self.version}.efb"

    def file(self, path: str) -> FileEntry:
        for entry in self.files:
            if entry.path == path:
                return entry
        raise KeyError(path)

    @property
    def profiles(self) -> list[str]:
        return [t.profile for t in self.targets]


def canonical_json(obj: Any) -> bytes:
    """Sorted-key, compact, NaN-free UTF-8 JSON: the bytes we sign."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def canonical_bytes(manifest: Manifest) -> bytes:
    return canonical_json(manifest.model_dump(mode="json"))


def parse_manifest(data: bytes) -> Manifest:
    try:
        return Manifest.model_validate_json(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "manifest"
        raise ProtocolError(f"manifest field {where}: {first['msg']}") from None
