"""Device profiles: one TOML file per device class, validated into frozen models.

Profiles ship in the ``firmware_profiles`` package; ``EDGEFLEET_PROFILES_DIR`` (a
``os.pathsep``-separated list) adds directories searched first, and a path ending in
``.toml`` loads that file directly.
"""

from __future__ import annotations

import os
import sys
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ProfileError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class Runtime(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    name: Literal["onnxruntime", "litert"]
    version: str
    formats: list[Literal["onnx", "tflite"]]
    max_opset: int | None = None
    max_ml_opset: int | None = None


class MeasuredSpeed(BaseModel):
    """A speed factor measured on devices of this profile (``[measured]`` in the TOML file).

    Written by ``edgefleet profiles calibrate --from-fleet`` from field benchmarks: for each
    device, its p50 divided by the host p50 of the same bundle; ``speed_factor`` is the
    median over ``devices`` devices, ``spread`` the interquartile range of those ratios.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    speed_factor: float = Field(gt=0)
    devices: int = Field(ge=1)
    spread: float = Field(default=0.0, ge=0)
    date: str = Field(min_length=10, max_length=32, pattern=r"^\d{4}-\d{2}-\d{2}")
    bundles: list[str] = Field(default_factory=list, max_length=64)
    source: str = "field benchmarks collected by the fleet server"


class DeviceProfile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str
    description: str
    arch: Literal["x86_64", "aarch64", "armv7l"]
    cpu: str
    cores: int = Field(ge=1)
    inference_threads: int = Field(ge=1)
    memory_budget_mb: float = Field(gt=0)
    storage_budget_mb: float = Field(gt=0)
    runtimes: list[Runtime] = Field(min_length=1)
    preferred_precision: Literal["fp32", "fp16", "int8"] = "fp32"
    preferred_format: Literal["onnx", "tflite"] = "onnx"
    latency_budget_ms: float = Field(default=10.0, gt=0)
    # Device latency ≈ host latency × speed_factor (the file's comment says where it comes from).
    speed_factor: float = Field(gt=0)
    speed_factor_source: str = ""
    measured: MeasuredSpeed | None = None

    def effective_speed_factor(self) -> float:
        """The measured factor when the profile has one, else the estimate."""
        return self.measured.speed_factor if self.measured is not None else self.speed_factor

    def speed_basis(self) -> str:
        """``measured on N devices (DATE)`` or ``estimate``: what the factor rests on."""
        m = self.measured
        if m is None:
            return "estimate"
        return f"measured on {m.devices} device{'s' if m.devices != 1 else ''} ({m.date[:10]})"

    def runtime_for(self, fmt: str) -> Runtime | None:
        for rt in self.runtimes:
            if fmt in rt.formats:
                return rt
        return None


def _dirs() -> list[Path]:
    extra = [Path(p) for p in os.environ.get("EDGEFLEET_PROFILES_DIR", "").split(os.pathsep) if p]
    builtin = Path(str(resources.files("firmware_profiles")))
    return [*extra, builtin]


def parse_profile(text: str, origin: str = "<profile>") -> DeviceProfile:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{origin}: not valid TOML: {exc}") from None
    try:
        return DeviceProfile.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ProfileError(f"{origin}: field {where}: {err['msg']}") from None


def list_profiles() -> list[DeviceProfile]:
    seen: dict[str, DeviceProfile] = {}
    for d in _dirs():
        if not d.is_dir():
            continue
        for path in sorted(d.glob("*.toml")):
            if path.stem not in seen:
                seen[path.stem] = load_profile(path)
    return sorted(seen.values(), key=lambda p: p.name)


def load_profile(name_or_path: str | Path) -> DeviceProfile:
    """Load a profile by name (``raspberry-pi-4``) or by a path to a ``.toml`` file."""
    text = str(name_or_path)
    if text.endswith(".toml"):
        path = Path(text)
        if not path.is_file():
            raise ProfileError(f"profile file {path} does not exist")
        profile = parse_profile(path.read_text(encoding="utf-8"), str(path))
        return profile
    for d in _dirs():
        path = d / f"{text}.toml"
        if path.is_file():
            profile = parse_profile(path.read_text(encoding="utf-8"), str(path))
            if profile.name != text:
                raise ProfileError(f"{path}: name {profile.name!r} does not match the file name")
            return profile
    known = ", ".join(p.stem for d in _dirs() if d.is_dir() for p in sorted(d.glob("*.toml")))
    raise ProfileError(f"unknown profile {text!r} (known: {known})")
