"""Helpers for the fault and attack suite: real agent processes, a broker recorder, a fleet.

* :func:`write_agent_config` writes an ``agent.toml`` for one device (own data dir, API
  port, pinned bundle keys and the fleet's command key, short telemetry windows, optional
  fault injection).
* :class:`AgentProcess` runs ``edgefleet agent run --config …`` as a real OS process
  (``kill()`` is ``kill -9``), and waits for its local API.
* :func:`edgefleet` runs any other ``edgefleet …`` command in a subprocess.
* :class:`BrokerRecorder` subscribes to ``{prefix}/#`` and keeps every message it sees.
* :func:`make_fleet` builds a real :class:`fleet_server.FleetService` with its MQTT bridge.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from protocol import KeyPair
from protocol.topics import Topics
from tests.support.brokers import free_port
from tests.support.keys import COMMAND_KEY, write_public

REPO = Path(__file__).resolve().parents[2]
# Devices of the suite enrol with this token; make_fleet() lists its hash.
ENROL_TOKEN = "efe_e2e-enrolment-token"
IRIS_ROW = [5.1, 3.5, 1.4, 0.2]
TOPICS = Topics()


def wait_until(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def wait_online(service: Any, device_ids: Iterable[str], timeout: float = 60.0) -> None:
    """Wait until the fleet server has seen every device's birth message."""
    wanted = set(device_ids)

    def online() -> bool:
        return wanted <= {d["device_id"] for d in service.list_devices(online=True)}

    wait_until(online, timeout, f"{sorted(wanted)[:3]}… to come online at the fleet server")


def write_public_keys(folder: Path, *keys: KeyPair) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for key in keys:
        path = folder / f"{key.key_id}.pub"
        path.write_bytes(key.public_pem())
        paths.append(path)
    return paths


def write_private_key(folder: Path, key: KeyPair) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key.key_id}.pem"
    path.write_bytes(key.private_pem())
    path.chmod(0o600)
    return path


def _toml(value: Any) -> str:
    return json.dumps(str(value) if isinstance(value, Path) else value)


def write_agent_config(
    folder: Path,
    *,
    device_id: str,
    broker_url: str,
    bundle_keys: Iterable[Path],
    command_keys: Iterable[Path] | None = None,
    revoked: Iterable[str] = (),
    artifact_origins: Iterable[str] = (),
    data_dir: Path | None = None,
    api_port: int | None = None,
    window_s: float = 2.0,
    fail_smoke_test: bool = False,
    tags: Iterable[str] = (),
    log_enabled: bool = True,
    outbox_max_bytes: int | None = None,
    enrol_token: str | None = ENROL_TOKEN,
    extra_latency_ms: float = 0.0,
    profile: str = "host",
    broker_urls: Iterable[str] = (),
    topic_prefix: str | None = None,
) -> Path:
    """Write ``folder/agent.toml`` for one device and return its path.

    ``broker_urls`` (a cluster's nodes in failover order) replaces ``broker_url``;
    ``topic_prefix`` sets ``broker.topic_prefix``.

    With ``enrol_token`` (the default) the device proves the suite's enrolment token, so
    :func:`make_fleet` servers approve it at once; ``None`` leaves it pending.
    ``command_keys`` defaults to the session's fleet command key
    (:data:`tests.support.keys.COMMAND_KEY`).
    """
    folder.mkdir(parents=True, exist_ok=True)
    if command_keys is None:
        command_keys = [write_public(folder / "keys")]
    lines = [
        f"device_id = {_toml(device_id)}",
        f"profile = {_toml(profile)}",
        f"data_dir = {_toml(data_dir or folder / 'data')}",
        f"tags = {json.dumps(list(tags))}",
        "[broker]",
        f"urls = {json.dumps(list(broker_urls))}" if broker_urls else f"url = {_toml(broker_url)}",
        *([f"topic_prefix = {_toml(topic_prefix)}"] if topic_prefix else []),
        "[trust]",
        f"bundle_keys = {json.dumps([str(p) for p in bundle_keys])}",
        f"command_keys = {json.dumps([str(p) for p in command_keys])}",
        f"revoked = {json.dumps(list(revoked))}",
        f"artifact_origins = {json.dumps(list(artifact_origins))}",
        "[api]",
        f"port = {api_port or free_port()}",
        "[log]",
        f"enabled = {'true' if log_enabled else 'false'}",
        "flush_interval_s = 0.2",
        "[sketch]",
        f"window_seconds = {window_s}",
        "[runtime]",
        "threads = 1",
        "[faults]",
        f"fail_smoke_test = {'true' if fail_smoke_test else 'false'}",
        f"extra_latency_ms = {float(extra_latency_ms)}",
    ]
    if outbox_max_bytes is not None:
        lines += ["[outbox]", f"max_bytes = {outbox_max_bytes}"]
    if enrol_token is not None:
        token_file = folder / "enrol-token"
        token_file.write_text(enrol_token + "\n")
        token_file.chmod(0o600)
        lines += ["[enrol]", f"token_file = {_toml(token_file)}"]
    path = folder / "agent.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("EDGEFLEET_DEBUG", None)
    return env


def edgefleet_argv(*args: str) -> list[str]:
    """``edgefleet ARGS`` through the real root CLI (``python -m edgefleet``)."""
    return [sys.executable, "-m", "edgefleet", *args]


def edgefleet(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run ``edgefleet ARGS`` in a subprocess; never raises on a non-zero exit."""
    return subprocess.run(
        edgefleet_argv(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
        cwd=REPO,
    )


def agent_status(config: Path) -> dict[str, Any]:
    """``edgefleet agent status --json`` of a (stopped or running) agent."""
    out = edgefleet("agent", "status", "--config", str(config), "--json")
    assert out.returncode == 0, f"agent status failed: {out.stderr.strip()}"
    status: dict[str, Any] = json.loads(out.stdout)
    return status


def install_offline(configs: Iterable[Path], bundle: Path) -> None:
    """``edgefleet agent install BUNDLE`` on every device at once (offline, in parallel)."""
    procs = [
        subprocess.Popen(
            edgefleet_argv("agent", "install", str(bundle), "--config", str(c)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_env(),
        )
        for c in configs
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()


def api_port(config: Path) -> int:
    from agent.config import load_config

    return load_config(config).api.port


class AgentProcess:
    """``edgefleet agent run --config CONFIG`` as a real OS process."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.port = api_port(config)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = config.parent / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._client = httpx.Client(base_url=self.url, timeout=10.0)

    def start(self) -> AgentProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        try:
            self.proc = subprocess.Popen(
                edgefleet_argv("agent", "run", "--config", str(self.config)),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_env(),
                cwd=self.config.parent,
                start_new_session=True,
            )
        finally:
            log.close()
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_api(self, timeout: float = 60.0, ready: bool = False) -> None:
        """Wait until the local API answers (``ready``: until a model is loaded)."""
        path = "/v1/ready" if ready else "/v1/health"

        def up() -> bool:
            if not self.alive():
                raise AssertionError(f"agent exited early ({self.returncode()}):\n{self.log()}")
            try:
                return self._client.get(path, timeout=2.0).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, timeout, f"the local API of {self.config} ({path})", interval=0.1)

    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def predict(self, rows: list[list[float]] | None = None) -> httpx.Response:
        return self._client.post("/v1/predict", json={"inputs": rows or [IRIS_ROW]})

    def model(self) -> dict[str, Any] | None:
        r = self._client.get("/v1/ready")
        return r.json().get("model") if r.status_code == 200 else None

    def get(self, path: str) -> httpx.Response:
        return self._client.get(path)

    def kill(self) -> None:
        """``kill -9``: no cleanup of any kind runs in the agent."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def close(self) -> None:
        self.stop()
        self._client.close()


@dataclass(frozen=True)
class Recorded:
    ts: float
    topic: str
    payload: bytes

    def json(self) -> Any:
        return json.loads(self.payload)


class BrokerRecorder:
    """A wildcard subscriber that keeps every message published under ``prefix``."""

    def __init__(
        self,
        broker_url: str | list[str],
        topic_filter: str | None = None,
        prefix: str = TOPICS.prefix,
    ) -> None:
        from protocol.transport_paho import PahoTransport

        self.topics = Topics(prefix)
        topic_filter = topic_filter or f"{prefix}/#"
        self.messages: list[Recorded] = []
        self._lock = threading.Lock()
        self.transport = PahoTransport(
            broker_url, f"recorder-{uuid.uuid4().hex[:8]}", clean_session=True
        )
        self.transport.set_handler(self._on)
        self.transport.subscribe(topic_filter, qos=1)

    def _on(self, topic: str, payload: bytes) -> None:
        with self._lock:
            self.messages.append(Recorded(time.time(), topic, bytes(payload)))

    def start(self) -> BrokerRecorder:
        self.transport.connect(timeout=10)
        return self

    def close(self) -> None:
        self.transport.close()

    def snapshot(self) -> list[Recorded]:
        with self._lock:
            return list(self.messages)

    def by_kind(self, kind: str) -> list[tuple[str, Recorded]]:
        """``(device id, message)`` for every message of a topic kind (cmd, status, …)."""
        out = []
        for m in self.snapshot():
            parsed = self.topics.parse(m.topic)
            if parsed is not None and parsed.kind == kind:
                out.append((parsed.device_id, m))
        return out

    def verify_command(self, cmd: Any, command_key: KeyPair) -> str:
        """Check a command seen on the wire as its device would: an Ed25519 signature by
        ``command_key``, or a MAC with the key that device agreed with the fleet (rebuilt
        here from ``command_key`` and the X25519 keys in the device's recorded births)."""
        from protocol.device_mac import (
            AgreedKey,
            fleet_kex_key,
            kex_id,
            mac_key,
            raw_public,
            x25519_from_b64,
        )
        from protocol.messages import verify_command
        from protocol.signing import TrustStore

        fleet = fleet_kex_key(command_key)
        fleet_pub = raw_public(fleet.public_key())
        agreed: dict[str, AgreedKey] = {}
        for device, m in self.by_kind("state"):
            text = m.json().get("x25519_key") if device == cmd.device_id else None
            peer = x25519_from_b64(text) if text else None
            if peer is not None:
                k = mac_key(fleet, peer, device, raw_public(peer), fleet_pub)
                agreed[kex_id(fleet.public_key())] = AgreedKey(k, command_key.key_id)
        return verify_command(cmd, TrustStore.from_keys([command_key.public]), agreed)


ADMIN_TOKEN = "eft_e2e-admin-token-" + "x" * 24


def make_fleet(
    folder: Path,
    broker_url: str,
    *,
    bundle_keys: Iterable[Path],
    command_key: KeyPair = COMMAND_KEY,
    revoked: Iterable[str] = (),
    rollout: dict[str, Any] | None = None,
    connect: bool = True,
    transport_options: dict[str, Any] | None = None,
    devices: dict[str, Any] | None = None,
    topic_prefix: str = "edgefleet",
) -> Any:
    """A real :class:`fleet_server.FleetService` on ``broker_url`` with its bridge started;
    it signs commands with ``command_key`` and accepts bundles signed by ``bundle_keys``.

    Devices proving :data:`ENROL_TOKEN` are approved at once (``devices`` overrides the
    ``[devices]`` section).
    """
    from fleet_server import auth
    from fleet_server.config import FleetConfig
    from fleet_server.service import FleetService
    from protocol.device_auth import token_hash
    from protocol.transport_paho import PahoTransport

    key_path = write_private_key(folder / "keys", command_key)
    config = FleetConfig.model_validate(
        {
            "data_dir": str(folder / "fleet"),
            "broker": {
                "url": broker_url,
                "client_id": f"fleet-{uuid.uuid4().hex[:8]}",
                "topic_prefix": topic_prefix,
            },
            "signing": {
                "command_key": str(key_path),
                "bundle_keys": [str(p) for p in bundle_keys],
                "revoked": list(revoked),
            },
            "auth": {
                "tokens": [
                    {"name": "e2e", "token_hash": auth.hash_token(ADMIN_TOKEN), "role": "admin"}
                ]
            },
            "rollout": {"tick_s": 0.2, **(rollout or {})},
            "devices": {"enrol_token_hashes": [token_hash(ENROL_TOKEN)], **(devices or {})},
        }
    )
    config.data_dir.mkdir(parents=True, exist_ok=True)
    transport = (
        PahoTransport(
            broker_url, config.broker.client_id, clean_session=False, **(transport_options or {})
        )
        if connect
        else None
    )
    service = FleetService(config, transport=transport)
    if connect:
        service.start()
    return service


class CountingSink:
    """The fleet service's bridge sink, wrapped: records ``(device, kind, seq)`` of every
    status, metrics and sketch message the real bridge accepted and the service took."""

    def __init__(self, service: Any) -> None:
        self.service = service
        self.seen: dict[tuple[str, str], list[int]] = {}
        self.merged_windows = 0
        # (device, received at, window_end) of every telemetry window taken
        self.windows: list[tuple[str, float, float]] = []
        self._lock = threading.Lock()

    def _record(self, device_id: str, kind: str, seq: int) -> None:
        with self._lock:
            self.seen.setdefault((device_id, kind), []).append(seq)

    def forwarded(self, device_id: str, closed: tuple[float, float], after: float) -> int:
        """Windows of ``device_id`` closed within ``closed`` and received after ``after``."""
        with self._lock:
            return sum(
                1
                for d, received, end in self.windows
                if d == device_id and closed[0] <= end <= closed[1] and received > after
            )

    def seqs(self, device_id: str, kind: str) -> set[int]:
        with self._lock:
            return set(self.seen.get((device_id, kind), []))

    def on_state(self, msg: Any) -> None:
        self.service.on_state(msg)

    def on_status(self, msg: Any) -> None:
        self.service.on_status(msg)
        self._record(msg.device_id, "status", msg.seq)

    def on_metrics(self, msg: Any) -> None:
        self.service.on_metrics(msg)
        self._record(msg.device_id, "metrics", msg.seq)
        with self._lock:
            self.windows.append((msg.device_id, time.time(), msg.window_end.timestamp()))

    def on_sketch(self, msg: Any) -> None:
        self.service.on_sketch(msg)
        if msg.merged_windows > 1:
            with self._lock:
                self.merged_windows += 1
        self._record(msg.device_id, "sketch", msg.seq)
        with self._lock:
            self.windows.append((msg.device_id, time.time(), msg.window_end.timestamp()))

    def on_dropped(self, reason: str) -> None:
        self.service.on_dropped(reason)


class Traffic:
    """Client threads calling the agents' local APIs; every answer is kept."""

    def __init__(self, agents: list[AgentProcess], threads: int = 4, pause_s: float = 0.03):
        self.agents = agents
        self.threads = threads
        self.pause_s = pause_s
        self.results: list[tuple[float, str, int | str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []

    def _run(self, offset: int) -> None:
        clients = [httpx.Client(base_url=a.url, timeout=10.0) for a in self.agents]
        i = offset
        try:
            while not self._stop.is_set():
                a, client = self.agents[i % len(self.agents)], clients[i % len(clients)]
                i += 1
                try:
                    code: int | str = client.post(
                        "/v1/predict", json={"inputs": [IRIS_ROW]}
                    ).status_code
                except httpx.HTTPError as exc:
                    code = f"{type(exc).__name__}: {exc}"
                with self._lock:
                    self.results.append((time.time(), a.url, code))
                self._stop.wait(self.pause_s)
        finally:
            for c in clients:
                c.close()

    def start(self) -> Traffic:
        for n in range(self.threads):
            t = threading.Thread(target=self._run, args=(n,), daemon=True)
            t.start()
            self._workers.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._workers:
            t.join(15)

    def failures(self) -> list[tuple[float, str, int | str]]:
        with self._lock:
            return [r for r in self.results if r[2] != 200]

    def count(self, since: float = 0.0, until: float = float("inf")) -> int:
        with self._lock:
            return sum(1 for ts, _, code in self.results if since <= ts <= until and code == 200)


def agent_counters(data_dir: Path) -> dict[str, int]:
    """The agent's persisted per-device sequence counters (name → last value handed out)."""
    import sqlite3

    found: dict[str, int] = {}
    for db in sorted(data_dir.glob("*.db")):
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master")}
            if "seq" in tables:
                found.update(
                    {str(n): int(v) for n, v in con.execute("SELECT name, value FROM seq")}
                )
        finally:
            con.close()
    return found
