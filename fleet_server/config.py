"""The fleet server's TOML configuration, validated into a frozen :class:`FleetConfig`.

``edgefleet fleet init`` writes :func:`example_config`, a commented file that loads back
into the defaults (a test keeps that true). Relative paths are resolved against the
file's directory.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from protocol.config_errors import describe_validation_error

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

Role = Literal["viewer", "operator", "admin"]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BrokerSection(_Section):
    url: str = "mqtt://127.0.0.1:1883"
    # a clustered broker: its nodes in failover order (replaces url; not with embedded)
    urls: list[str] = Field(default_factory=list)
    embedded: bool = False
    username: str | None = None
    password: str | None = Field(default=None, repr=False)
    ca_file: Path | None = None
    topic_prefix: str = "edgefleet"
    mqtt5: bool = False
    shared_group: str | None = None
    client_id: str = "edgefleet-server"
    # How devices and tools reach the broker, told by GET /v1/broker (default: url).
    public_url: str | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return _check_broker_urls([v])[0]

    @field_validator("urls")
    @classmethod
    def _urls(cls, v: list[str]) -> list[str]:
        return _check_broker_urls(v) if v else v

    @model_validator(mode="after")
    def _url_or_urls(self) -> BrokerSection:
        if self.urls and "url" in self.model_fields_set:
            raise ValueError("set url (one broker) or urls (a cluster's nodes), not both")
        if self.urls and self.embedded:
            raise ValueError("the embedded broker is one node: use url, not urls")
        return self

    def all_urls(self) -> list[str]:
        """The brokers to connect to, in failover order."""
        return list(self.urls) or [self.url]


def _check_broker_urls(urls: list[str]) -> list[str]:
    """Every URL parses (scheme, host, port), all agree on TLS, at most 16 of them."""
    from protocol.transport import TransportError, broker_urls

    try:
        broker_urls(urls)
    except TransportError as exc:
        raise ValueError(str(exc)) from None
    return urls


class ApiSection(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8700, ge=0, le=65535)
    public_url: str | None = None  # how devices reach /v1/artifacts (HTTP download path)


OLD_SIGNING_KEYS = (
    "signing.key and signing.trusted are gone: name the online private key that signs "
    "commands as signing.command_key and the public keys bundles must be signed by as "
    "signing.bundle_keys (a different key)"
)


class SigningSection(_Section):
    """Two trust roles: the online command key signs every command; bundles must be signed
    by one of ``bundle_keys`` (offline keys), never by the command key."""

    command_key: Path | None = None  # private key that signs every command
    bundle_keys: list[Path] = Field(default_factory=list)  # public keys bundles must be signed by
    revoked: list[str] = Field(default_factory=list)
    command_ttl_s: float = Field(default=86_400.0, gt=0, le=30 * 86_400)  # deploy, config, …
    rollback_ttl_s: float = Field(default=7 * 86_400.0, gt=0, le=30 * 86_400)

    @model_validator(mode="before")
    @classmethod
    def _old_names(cls, data: object) -> object:
        if isinstance(data, dict) and ("key" in data or "trusted" in data):
            raise ConfigError(OLD_SIGNING_KEYS, field="signing")
        return data


class UserEntry(_Section):
    username: str
    password_hash: str
    role: Role = "viewer"


class TokenEntry(_Section):
    name: str = ""
    token_hash: str  # sha256 hex of the token
    role: Role = "viewer"


class AuthSection(_Section):
    users: list[UserEntry] = Field(default_factory=list)
    tokens: list[TokenEntry] = Field(default_factory=list)


class RolloutDefaults(_Section):
    success_threshold: float = Field(default=0.8, ge=0, le=1)
    failure_threshold: float = Field(default=0.2, ge=0, le=1)
    min_devices: int = Field(default=1, ge=1)
    soak_s: float = Field(default=0.0, ge=0)
    device_timeout_s: float = Field(default=300.0, gt=0)
    max_retries: int = Field(default=1, ge=0, le=10)
    rollback_on_halt: bool = True
    tick_s: float = Field(default=0.5, gt=0)
    delivery: Literal["mqtt", "http", "both"] = "mqtt"
    chunk_bytes: int = Field(default=64 * 1024, ge=1024, le=512 * 1024)  # protocol caps


class RegistrySection(_Section):
    # unset: SQLite in data_dir (fleet.db); "postgresql://user:password@host:5432/db":
    # PostgreSQL (the 'postgres' extra), shared by every fleet serve process
    url: str | None = Field(default=None, pattern=r"^postgres(ql)?://", repr=False)
    pool_size: int = Field(default=10, ge=1, le=200)


class DevicesSection(_Section):
    """Device identity and the per-device caps of the MQTT bridge (docs/security.md)."""

    # sha256 hex of enrolment tokens (`edgefleet fleet devices enrol-token`); a device that proves
    # one is approved at once, any other new device waits for an operator.
    enrol_token_hashes: list[str] = Field(default_factory=list)
    max_pending: int = Field(default=256, ge=0)  # unapproved devices kept for an operator
    enrol_per_minute: float = Field(default=600.0, gt=0)  # new identities accepted …
    enrol_burst: int = Field(default=1200, ge=1)  # … with this burst (a fleet booting at once)
    msgs_per_second: float = Field(default=20.0, gt=0)  # per device, sustained …
    msgs_burst: int = Field(default=400, ge=1)  # … and burst
    max_models: int = Field(default=8, ge=1)  # distinct model versions a device reports per day
    max_windows: int = Field(default=32, ge=1)  # distinct sketch hours a device reports per hour
    max_window_age_s: float = Field(default=7 * 86400.0, gt=0)  # older windows are dropped
    resend_budget: int = Field(default=4096, ge=0)  # chunks resent per device per rollout


class ClusterSection(_Section):
    """Several ``fleet serve`` processes on one PostgreSQL registry (:mod:`.cluster`).

    Each process needs its own ``broker.client_id`` (it names the process). With SQLite
    there is one process, always the one running the rollout tick."""

    heartbeat_s: float = Field(default=2.0, gt=0, le=60)  # each process's registry heartbeat
    dead_after_s: float = Field(default=10.0, gt=0, le=3600)  # no heartbeat this long: dead
    lease_retry_s: float = Field(default=1.0, gt=0, le=10)  # a follower tries the tick lock
    adopt_sessions: bool = True  # a survivor drains a dead process's MQTT session


class HooksSection(_Section):
    drift_webhook: str | None = None
    drift_command: str | None = None


class FleetConfig(_Section):
    data_dir: Path = Path("edgefleet-fleet")
    registry: RegistrySection = RegistrySection()
    broker: BrokerSection = BrokerSection()
    api: ApiSection = ApiSection()
    signing: SigningSection = SigningSection()
    auth: AuthSection = AuthSection()
    rollout: RolloutDefaults = RolloutDefaults()
    drift: dict[str, Any] = Field(default_factory=dict)  # fields of fleet_server.drift.DriftConfig
    hooks: HooksSection = HooksSection()
    cluster: ClusterSection = ClusterSection()
    devices: DevicesSection = DevicesSection()
    health: dict[str, Any] = Field(default_factory=dict)  # fleet_server.health_rules.HealthConfig

    @property
    def db_path(self) -> Path:
        return self.data_dir / "fleet.db"

    @property
    def artifacts_dir(self) -> Path:
        return self.data_dir / "artifacts"

    def resolve(self, base: Path) -> FleetConfig:
        def fix(p: Path | None) -> Path | None:
            if p is None or p.is_absolute():
                return p
            return base / p

        signing = self.signing.model_copy(
            update={
                "command_key": fix(self.signing.command_key),
                "bundle_keys": [fix(p) for p in self.signing.bundle_keys],
            }
        )
        broker = self.broker.model_copy(update={"ca_file": fix(self.broker.ca_file)})
        return self.model_copy(
            update={"data_dir": fix(self.data_dir), "signing": signing, "broker": broker}
        )


def parse_config(text: str, origin: str = "<config>") -> FleetConfig:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{origin}: not valid TOML: {exc}") from None
    signing = data.get("signing")
    if isinstance(signing, dict) and ("key" in signing or "trusted" in signing):
        raise ConfigError(f"{origin}: {OLD_SIGNING_KEYS}", field="signing")
    try:
        return FleetConfig.model_validate(data)
    except ValidationError as exc:
        where, message = describe_validation_error(exc, FleetConfig)
        raise ConfigError(f"{origin}: field {where}: {message}", field=where) from None


def load_config(path: Path) -> FleetConfig:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    return parse_config(text, str(path)).resolve(path.parent.resolve())


def example_config() -> str:
    """A commented fleet.toml that loads into the defaults."""
    return """\
# edgefleet fleet server configuration (edgefleet fleet serve --config fleet.toml)

# The SQLite registry (unless [registry] url names PostgreSQL) and the content-addressed
# artifact store live here.
data_dir = "edgefleet-fleet"

[registry]
# url = "postgresql://fleet:…@db.example:5432/edgefleet"   # unset: SQLite in data_dir
pool_size = 10                  # PostgreSQL connections per fleet serve process

[broker]
url = "mqtt://127.0.0.1:1883"   # mqtts:// for TLS
# urls = ["mqtt://nats-1:1883", "mqtt://nats-2:1883", "mqtt://nats-3:1883"]  # a cluster's
#                               # nodes instead of url: on losing one, the next (with backoff)
embedded = false                # true: start the in-process amqtt broker on url's port
# username = "fleet"
# password = "…"
# ca_file = "ca.pem"
topic_prefix = "edgefleet"
mqtt5 = false                   # Mosquitto/EMQX: true enables shared subscriptions
#                               # (a broker refusing MQTT 5, e.g. NATS, gets 3.1.1 instead)
# shared_group = "fleet"        # with mqtt5: several servers split telemetry ingest
client_id = "edgefleet-server"
# public_url = "mqtt://fleet.example:1883"   # what GET /v1/broker tells tools (default: url)

[api]
host = "127.0.0.1"
port = 8700
# public_url = "http://fleet.example:8700"   # set to offer the HTTP artifact download

[signing]
# Two roles, two different keys. The command key is online (this server signs every
# command with it); bundle keys sign bundles offline and are only pinned here.
# command_key = "fleet-command.pem"   # private key: signs every command sent to devices
bundle_keys = []                # public keys an uploaded bundle must be signed by
revoked = []                    # revoked key ids
command_ttl_s = 86400.0         # a command expires this long after it is signed
rollback_ttl_s = 604800.0       # rollbacks live longer: devices offline for days still get them

[auth]
# Tokens: create with `edgefleet fleet token create --role operator` (stored hashed).
# users = [{ username = "admin", password_hash = "…", role = "admin" }]   # dashboard logins
users = []
tokens = []

[rollout]                       # defaults for new rollouts
success_threshold = 0.8         # installed share needed to pass a stage
failure_threshold = 0.2         # halt when the failed share is above this …
min_devices = 1                 # … and at least this many devices reported
soak_s = 0.0                    # seconds a stage must hold before the next starts
device_timeout_s = 300.0        # a device in progress longer than this timed out
max_retries = 1
rollback_on_halt = true         # send signed rollbacks to devices that installed
tick_s = 0.5
delivery = "mqtt"               # mqtt | http | both (http needs api.public_url)
chunk_bytes = 65536

[drift]                         # fleet_server.drift.DriftConfig fields, e.g.
# ks_alpha = 0.05
# dataset_share = 0.5

[devices]
# New devices are pending until `edgefleet fleet devices approve ID`, unless they prove an
# enrolment token whose sha256 is listed here (`edgefleet fleet devices enrol-token`).
enrol_token_hashes = []
max_pending = 256               # unapproved devices remembered for an operator
enrol_per_minute = 600.0        # new device identities accepted per minute …
enrol_burst = 1200              # … and at once
msgs_per_second = 20.0          # per device; more is dropped and counted (rate_limited)
msgs_burst = 400
max_models = 8                  # model versions one device may report on per day
max_windows = 32                # sketch hours one device may report on per hour
max_window_age_s = 604800.0     # sketch windows older than this are dropped
resend_budget = 4096            # artifact chunks resent to one device per rollout

[health]                        # standing alerts (fleet_server.health_rules.HealthConfig)
# p95_ms = 500                # default: each profile's latency_budget_ms
# error_rate = 0.01             # errors / requests in a telemetry window
# fallback_rate = 0.05          # fallback answers / requests
# offline_after_s = 600.0       # a device silent longer than this
# disk_free_mb = 50.0           # free disk under this (or the device's disk_full flag)
# fire_after = 2                # windows in a row over the line before an alert fires
# resolve_after = 2             # windows in a row under resolve_ratio × the line to resolve
# [health.profiles.raspberry-pi-4]
# p95_ms = 25

[cluster]                       # several fleet serve processes on one PostgreSQL registry
# Give each process its own broker.client_id and api port (or host). The one holding a
# PostgreSQL advisory lock runs the rollout tick; another takes it when that one dies.
# Telemetry: with broker.mqtt5 and broker.shared_group the broker splits it; without,
# every process takes every report and the registry merges each (device, window, seq)
# once. With SQLite there is one process. (deploy/README.md, "Growing past one machine")
heartbeat_s = 2.0               # each process writes a heartbeat this often
dead_after_s = 10.0             # silent this long: dead; a survivor drains its MQTT session
adopt_sessions = true           # … (false: what the broker queued for it waits for it)
lease_retry_s = 1.0             # how often a process without the rollout tick tries to take it

[hooks]                         # called with drift alerts and (health.hook) health alerts
# drift_webhook = "https://ci.example/retrain"
# drift_command = "retrain.sh"
"""
