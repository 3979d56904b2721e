"""The agent's TOML configuration, validated into a frozen :class:`AgentConfig`.

``edgefleet agent init`` writes :func:`example_config`, a commented file that loads back
into the defaults (a test keeps that true). Relative paths in the file are resolved
against the file's directory.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from protocol.config_errors import describe_validation_error
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


def check_broker_urls(urls: list[str]) -> list[str]:
    """Every URL parses (scheme, host, port), all agree on TLS, at most 16 of them."""
    from protocol.transport import TransportError, broker_urls

    try:
        broker_urls(urls)
    except TransportError as exc:
        raise ValueError(str(exc)) from None
    return urls


class BrokerConfig(_Section):
    url: str = Field(default="mqtt://127.0.0.1:1883", max_length=2048)
    # a clustered broker: the nodes in failover order (replaces url); on losing its node the
    # agent reconnects to the next one with backoff
    urls: list[str] = Field(default_factory=list)
    username: str | None = None
    password: str | None = Field(default=None, repr=False)
    password_file: Path | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    topic_prefix: str = "edgefleet"

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        check_broker_urls([v])
        return v

    @field_validator("urls")
    @classmethod
    def _urls(cls, v: list[str]) -> list[str]:
        return check_broker_urls(v) if v else v

    @model_validator(mode="after")
    def _url_or_urls(self) -> BrokerConfig:
        if self.urls and "url" in self.model_fields_set:
            raise ValueError("set url (one broker) or urls (a cluster's nodes), not both")
        return self

    def all_urls(self) -> list[str]:
        """The brokers to connect to, in failover order."""
        return list(self.urls) or [self.url]

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


OLD_TRUST_KEYS = (
    "trust.public_keys is gone: list the keys that sign bundles under trust.bundle_keys and "
    "the fleet server's command public key under trust.command_keys"
)


class TrustConfig(_Section):
    """Two trust roles that never mix: bundle keys sign bundles (offline, on a build host),
    command keys are the fleet server's online keys that sign every command."""

    bundle_keys: list[Path] = Field(default_factory=list)
    command_keys: list[Path] = Field(default_factory=list)
    revoked: list[str] = Field(default_factory=list)  # key ids refused in either role
    artifact_origins: list[str] = Field(default_factory=list)  # scheme://host[:port] for http_url
    clock_skew_s: float = Field(default=300.0, ge=0, le=86_400)

    @model_validator(mode="before")
    @classmethod
    def _old_names(cls, data: object) -> object:
        if isinstance(data, dict) and "public_keys" in data:
            raise ConfigError(OLD_TRUST_KEYS)
        return data

    @field_validator("artifact_origins")
    @classmethod
    def _origins(cls, v: list[str]) -> list[str]:
        from .update import origin_of

        out = []
        for url in v:
            origin = origin_of(url)
            if origin is None or origin != url.rstrip("/").lower():
                raise ValueError(f"{url!r} is not an origin like https://fleet.example:8700")
            out.append(origin)
        return out


class ApiConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=DEFAULT_API_PORT, ge=0, le=65535)
    max_body_bytes: int = Field(default=1024 * 1024, gt=0)
    max_batch_rows: int = Field(default=1024, gt=0)
    read_timeout_s: float = Field(default=10.0, gt=0, le=3600)
    max_connections: int = Field(default=100, ge=1, le=100_000)


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
    # timed single-row runs on the new model after each install, reported with the
    # "installed" status (the fleet calibrates profiles from them); 0 turns it off
    bench_after_install: int = Field(default=100, ge=0, le=10_000)


class FaultsConfig(_Section):
    """Fault injection for tests and demos only. Never set these on a real device."""

    fail_smoke_test: bool = False
    extra_latency_ms: float = Field(default=0.0, ge=0, le=10_000)  # a slow device


class EnrolConfig(_Section):
    """How this device becomes known to the fleet server (docs/security.md)."""

    # A file holding an enrolment token (`edgefleet fleet devices enrol-token` prints one). With
    # it the device is approved at once; without it an operator approves it by id.
    token_file: Path | None = None

    def token(self) -> str | None:
        if self.token_file is None:
            return None
        try:
            return self.token_file.read_text(encoding="utf-8").strip() or None
        except OSError as exc:
            raise ConfigError(
                f"enrol.token_file: cannot read {self.token_file}: {exc.strerror}"
            ) from None


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
    enrol: EnrolConfig = EnrolConfig()

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
            update={
                "bundle_keys": [fix(p) for p in self.trust.bundle_keys],
                "command_keys": [fix(p) for p in self.trust.command_keys],
            }
        )
        enrol = self.enrol.model_copy(update={"token_file": fix(self.enrol.token_file)})
        return self.model_copy(
            update={
                "data_dir": fix(self.data_dir),
                "broker": broker,
                "trust": trust,
                "enrol": enrol,
            }
        )

    def trust_stores(self) -> tuple[TrustStore, TrustStore]:
        """``(bundle keys, command keys)``; a key id listed in both roles is refused."""
        stores = []
        for role in ("bundle", "command"):
            paths = getattr(self.trust, f"{role}_keys")
            try:
                stores.append(TrustStore.from_files(paths, self.trust.revoked, role=role))
            except OSError as exc:
                raise ConfigError(
                    f"trust.{role}_keys: cannot read {exc.filename}: {exc.strerror}"
                ) from None
            except ProtocolError as exc:
                raise ConfigError(f"trust.{role}_keys: {exc}") from None
        bundle, command = stores
        both = sorted(set(bundle.keys) & set(command.keys))
        if both:
            raise ConfigError(
                f"trust: key {both[0]} is listed as both a bundle key and a command key; "
                "the roles need different keys"
            )
        bundle.other_role, command.other_role = set(command.keys), set(bundle.keys)
        return bundle, command

    def trust_store(self) -> TrustStore:
        """The bundle-signing keys (what the installer checks)."""
        return self.trust_stores()[0]

    def command_trust(self) -> TrustStore:
        """The fleet's command keys (what every command must be signed by)."""
        return self.trust_stores()[1]

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
    if isinstance(data.get("trust"), dict) and "public_keys" in data["trust"]:
        raise ConfigError(f"{origin}: {OLD_TRUST_KEYS}")
    try:
        config = AgentConfig.model_validate(data)
    except ValidationError as exc:
        where, message = describe_validation_error(exc, AgentConfig)
        raise ConfigError(f"{origin}: {where}: {message}") from None
    return config.resolve(base) if base is not None else config


def load_config(path: Union[str, Path]) -> AgentConfig:
    """Read ``agent.toml``; relative paths in it are relative to its directory."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    return parse_config(text, str(path), base=path.resolve().parent)


def example_config(
    *,
    device_id: str = "device-0001",
    profile: str = "host",
    broker_url: str | list[str] = "mqtt://127.0.0.1:1883",
    api_port: int = DEFAULT_API_PORT,
    bundle_keys: list[str] | None = None,
    command_keys: list[str] | None = None,
    artifact_origins: list[str] | None = None,
) -> str:
    """A commented ``agent.toml``; with no arguments its values are the defaults.

    The arguments (``edgefleet agent init --device-id --profile --broker --api-port`` and
    the trust flags) are checked by loading the text back with :func:`parse_config` before
    anyone writes it.
    """
    urls = [broker_url] if isinstance(broker_url, str) else list(broker_url)
    if len(urls) > 1:
        broker_lines = (
            f"# url = {_toml_str(urls[0])}  # one broker; mqtts://host:8883 for TLS\n"
            f"urls = {_toml_list(urls)}  # a cluster's nodes, in failover order"
        )
    else:
        broker_lines = (
            f"url = {_toml_str(urls[0] if urls else 'mqtt://127.0.0.1:1883')}"
            "  # mqtts://host:8883 for TLS\n"
            '# urls = ["mqtt://node1:1883", "mqtt://node2:1883"]  # a cluster, instead of url'
        )
    text = _EXAMPLE.format(
        device_id=_toml_str(device_id),
        profile=_toml_str(profile),
        broker_lines=broker_lines,
        api_port=int(api_port),
        bundle=_toml_list(bundle_keys),
        command=_toml_list(command_keys),
        origins=_toml_list(artifact_origins),
    )
    config = parse_config(text, "agent init")
    config.device_profile()  # an unknown profile is refused now, not when the agent starts
    return text


def _toml_list(values: list[str] | None) -> str:
    """A TOML array of basic strings."""
    import json

    return json.dumps(list(values or []))


def _toml_str(value: str) -> str:
    """A TOML basic string (JSON's escaping is a subset TOML accepts)."""
    import json

    return json.dumps(value)


_EXAMPLE = """\
# edgefleet agent configuration. Paths are relative to this file.

device_id = {device_id}  # unique per device; appears in every MQTT topic
profile = {profile}  # device profile name (see `edgefleet profiles list`) or a .toml path
data_dir = "edgefleet-data"    # slots, prediction log and outbox live here
tags = []                      # free-form labels rollouts can select on, e.g. ["line-3", "eu"]
# channel = "stable"           # release channel to follow ("beta", "stable", "MODEL/NAME")

[broker]
{broker_lines}
# username = "device-0001"
# password_file = "secrets/broker-password"   # preferred over `password = "..."`
# ca_file = "certs/ca.pem"
# cert_file = "certs/device.pem"              # client certificate (mutual TLS)
# key_file = "certs/device.key"
topic_prefix = "edgefleet"

[trust]
# Two roles, never the same key: bundle keys sign bundles (offline, on the build host);
# command keys are the fleet server's online keys, which sign every command it sends.
bundle_keys = {bundle}               # pinned Ed25519 public keys (PEM), e.g. ["keys/release.pub"]
command_keys = {command}              # e.g. ["keys/fleet-command.pub"]; several allowed (rotation)
revoked = []                   # key ids refused in either role, even when listed above
# Where HTTP downloads may come from (scheme://host:port), e.g. ["https://fleet.example:8700"]
artifact_origins = {origins}
clock_skew_s = 300.0           # a command issued further in the future than this is refused

[enrol]
# The device signs every message with its own key (created in data_dir on first start). The
# fleet server keeps it pending until an operator runs `edgefleet fleet devices approve ID`,
# or approves it at once when it proves an enrolment token:
# token_file = "secrets/enrol-token"

[api]
host = "127.0.0.1"             # local inference API; bind 0.0.0.0 only behind a firewall
port = {api_port}                   # the documented fixed default port
max_body_bytes = 1048576       # larger request bodies get HTTP 413
max_batch_rows = 1024          # larger batches get HTTP 422
read_timeout_s = 10.0          # a request (head and body) not complete after this is closed
max_connections = 100          # one more connection gets HTTP 503 and is closed

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
bench_after_install = 100      # timed runs after each install, sent to the fleet (0: off)

[faults]
# FOR TESTS AND DEMOS ONLY: injects faults. Never set on a real device.
fail_smoke_test = false        # every install fails its smoke test (demo: a failing canary)
extra_latency_ms = 0.0         # every prediction takes this much longer (a slow device)
"""
