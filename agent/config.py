"""The agent's TOML configuration, validated into a frozen :class:`AgentConfig`.

``edgefleet agent init`` writes :func:`example_config`, a commented file that loads back
into the defaults (a test keeps that true). Relative paths in the file are resolved
against the file's directory.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from protocol.errors import ProfileError, ProtocolError
from protocol.profiles import DeviceProfile, load_profile
from protocol.signing import TrustStore

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_API_PORT = 8765


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BrokerConfig(_Section):
    url: str = "mqtt://127.0.0.1:1883"
    username: str | None = None
    password: str | None = Field(default=None, repr=False)
    password_file: Path | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    topic_prefix: str = "edgefleet"

    def resolved_password(self) -> str | None:
        """The password, read from ``password_file`` when that is set."""
        if self.password_file is not None:
            try:
                return self.password_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(
                    f"broker.password_file: cannot read {self.password_file}: {exc.strerror}"
                ) from None
        return self.password


class TrustConfig(_Section):
    public_keys: list[Path] = Field(default_factory=list)
    revoked: list[str] = Field(default_factory=list)


class ApiConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=DEFAULT_API_PORT, ge=0, le=65535)
    max_body_bytes: int = Field(default=1024 * 1024, gt=0)
    max_batch_rows: int = Field(default=1024, gt=0)


class LogConfig(_Section):
    enabled: bool = True
    max_rows: int = Field(default=100_000, gt=0)
    max_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    max_age_days: float = Field(default=7.0, gt=0)
    batch_size: int = Field(default=1024, gt=0)
    flush_interval_s: float = Field(default=0.5, gt=0)
    queue_size: int = Field(default=10_000, gt=0)


class SketchConfig(_Section):
    window_seconds: float = Field(default=60.0, gt=0)
    window_rows: int = Field(default=10_000, gt=0)
    k: int = Field(default=200, ge=8)


class OutboxConfig(_Section):
    max_bytes: int = Field(default=16 * 1024 * 1024, gt=0)


class SlotsConfig(_Section):
    keep_previous: int = Field(default=2, ge=1)


class FallbackConfig(_Section):
    """Overrides the manifest's fallback when ``kind`` is set."""

    kind: Literal["none", "constant", "previous"] | None = None
    value: Union[int, float, str] | None = None


class RuntimeConfig(_Section):
    threads: int | None = Field(default=None, ge=1)


class FaultsConfig(_Section):
    """Fault injection for tests and demos only. Never set these on a real device."""

    fail_smoke_test: bool = False


class AgentConfig(_Section):
    device_id: str = Field(
        default="device-0001", min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$"
    )
    profile: str = "host"
    data_dir: Path = Path("edgefleet-data")
    tags: list[str] = Field(default_factory=list)
    # release channel this device follows: "stable", or "MODEL/stable" (None: none)
    channel: str | None = Field(
        default=None, max_length=160, pattern=r"^([^/\s]{1,128}/)?[a-z][a-z0-9-]{0,23}$"
    )
    broker: BrokerConfig = BrokerConfig()
    trust: TrustConfig = TrustConfig()
    api: ApiConfig = ApiConfig()
    log: LogConfig = LogConfig()
    sketch: SketchConfig = SketchConfig()
    outbox: OutboxConfig = OutboxConfig()
    slots: SlotsConfig = SlotsConfig()
    fallback: FallbackConfig = FallbackConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    faults: FaultsConfig = FaultsConfig()

    @model_validator(mode="after")
    def _password_once(self) -> AgentConfig:
        if self.broker.password and self.broker.password_file:
            raise ValueError("broker: set password or password_file, not both")
        return self

    def resolve(self, base: Path) -> AgentConfig:
        """A copy whose relative paths are taken relative to ``base``."""

        def fix(p: Path | None) -> Path | None:
            if p is None or p.is_absolute():
                return p
            return base / p

        broker = self.broker.model_copy(
            update={
                k: fix(getattr(self.broker, k))
                for k in ("password_file", "ca_file", "cert_file", "key_file")
            }
        )
        trust = self.trust.model_copy(
            update={"public_keys": [fix(p) for p in self.trust.public_keys]}
        )
        return self.model_copy(
            update={"data_dir": fix(self.data_dir), "broker": broker, "trust": trust}
        )

    def trust_store(self) -> TrustStore:
        try:
            return TrustStore.from_files(self.trust.public_keys, self.trust.revoked)
        except OSError as exc:
            raise ConfigError(
                f"trust.public_keys: cannot read {exc.filename}: {exc.strerror}"
            ) from None
        except ProtocolError as exc:
            raise ConfigError(f"trust.public_keys: {exc}") from None

    def device_profile(self) -> DeviceProfile:
        try:
            return load_profile(self.profile)
        except ProfileError as exc:
            raise ConfigError(f"profile: {exc}") from None


def parse_config(text: str, origin: str = "<config>", base: Path | None = None) -> AgentConfig:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{origin}: not valid TOML: {exc}") from None
    try:
        config = AgentConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "config"
        raise ConfigError(f"{origin}: {where}: {err['msg']}") from None
    return config.resolve(base) if base is not None else config


def load_config(path: Union[str, Path]) -> AgentConfig:
    """Read ``agent.toml``; relative paths in it are relative to its directory."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    return parse_config(text, str(path), base=path.resolve().parent)


def example_config() -> str:
    """A commented ``agent.toml`` whose values are the defaults."""
    return f"""\
# edgefleet agent configuration. Paths are relative to this file.

device_id = "device-0001"      # unique per device; appears in every MQTT topic
profile = "host"               # device profile name (see `edgefleet profiles list`) or a .toml path
data_dir = "edgefleet-data"    # slots, prediction log and outbox live here
tags = []                      # free-form labels rollouts can select on, e.g. ["line-3", "eu"]
# channel = "stable"           # release channel to follow ("beta", "stable", "MODEL/NAME")

[broker]
url = "mqtt://127.0.0.1:1883"  # mqtts://host:8883 for TLS
# username = "device-0001"
# password_file = "secrets/broker-password"   # preferred over `password = "..."`
# ca_file = "certs/ca.pem"
# cert_file = "certs/device.pem"              # client certificate (mutual TLS)
# key_file = "certs/device.key"
topic_prefix = "edgefleet"

[trust]
public_keys = []               # pinned Ed25519 public keys (PEM), e.g. ["keys/release.pub"]
revoked = []                   # key ids that must be refused even when listed above

[api]
host = "127.0.0.1"             # local inference API; bind 0.0.0.0 only behind a firewall
port = {DEFAULT_API_PORT}                   # the documented fixed default port
max_body_bytes = 1048576       # larger request bodies get HTTP 413
max_batch_rows = 1024          # larger batches get HTTP 422

[log]
enabled = true
max_rows = 100000              # prediction log retention: whichever limit is hit first
max_bytes = 67108864
max_age_days = 7.0
batch_size = 1024              # rows per SQLite transaction (one fsync each)
flush_interval_s = 0.5         # the longest a row waits in memory before it is committed
queue_size = 10000             # rows buffered in memory; beyond that rows are dropped and counted

[sketch]
window_seconds = 60.0          # a feature-sketch window closes after this many seconds...
window_rows = 10000            # ...or this many rows, whichever comes first
k = 200                        # KLL accuracy parameter

[outbox]
max_bytes = 16777216           # store-and-forward queue; old sketches merge when full

[slots]
keep_previous = 2              # installed versions kept for rollback

[fallback]
# Overrides the bundle's own fallback when the model raises:
# kind = "constant"            # "none" (answer an error), "constant" or "previous" (model)
# value = 0

[runtime]
# threads = 1                  # inference threads; default: the profile's inference_threads

[faults]
# FOR TESTS AND DEMOS ONLY: injects faults. Never set on a real device.
fail_smoke_test = false        # every install fails its smoke test (demo: a failing canary)
"""
