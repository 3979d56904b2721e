"""Two ``edgefleet fleet serve`` processes on one PostgreSQL registry, real agents, a real broker.

Each server is the shipped command started from a config ``edgefleet fleet init`` wrote
(with its own ``broker.client_id`` and API port); the devices are ``edgefleet agent run``
processes with v1 installed offline. The broker is the ``broker`` fixture: Mosquitto here,
with MQTT 5 shared subscriptions for telemetry; a 3-node cluster speaking MQTT 3.1.1 plugs in
as another fixture value with ``mqtt5=False`` (then every server takes every report and
the registry merges each once).

* (a) ``kill -9`` the process that runs the rollout tick mid-rollout: the other takes the
  tick and the rollout completes; every device runs v2 and installed it once (its command
  ledger holds one deploy command of the rollout; the broker carried one command id).
* (c) PostgreSQL restarts mid-rollout: the servers reconnect, the rollout completes, and
  every event, audit entry and device recorded before the restart is still there.
* (d) ``kill -9`` one of the two ingest processes while devices upload sketches: every
  report the devices published is merged once, counted by (device, model, version,
  window, seq) in the registry, and each window's row count is the sum of its reports'.
  Run twice: with the MQTT 5 shared subscription, and with plain subscriptions (as on a
  3.1.1-only broker) where both processes take every report and merge it concurrently.

The artifact store is still a folder per process, so a bundle is uploaded through each
server's API (the second upload finds the registered bundle and keeps the bytes).
"""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from fleet_server import auth
from protocol.device_auth import token_hash
from protocol.messages import CommandStatus, SketchReport, decode
from tests.e2e.conftest import Release
from tests.e2e.support import (
    ADMIN_TOKEN,
    ENROL_TOKEN,
    AgentProcess,
    BrokerRecorder,
    Traffic,
    install_offline,
    wait_until,
    write_agent_config,
    write_private_key,
)
from tests.support.brokers import free_port
from tests.support.keys import COMMAND_KEY
from tests.support.postgres import PostgresServer
from tests.support.shipped import Process, init_config

pytestmark = [pytest.mark.slow, pytest.mark.mosquitto, pytest.mark.postgres]

HEADERS = {"authorization": f"Bearer {ADMIN_TOKEN}"}


@dataclass(frozen=True)
class Broker:
    url: str
    mqtt5: bool  # shared subscriptions split telemetry; without, every server takes all


@pytest.fixture
def broker(mosquitto: Any, request: pytest.FixtureRequest) -> Broker:
    """Mosquitto; ``mqtt5=False`` (indirect parameter) makes the servers subscribe as on a
    3.1.1-only broker: every process takes every report."""
    return Broker(mosquitto.url, mqtt5=getattr(request, "param", True))


class FleetProcess:
    """``edgefleet fleet serve --config …`` from a ``fleet init`` config."""

    def __init__(self, folder: Path, name: str, db_url: str, broker: Broker, **keys: Any):
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        key_path = write_private_key(folder / "keys", COMMAND_KEY)
        values = {
            "data_dir": str(folder / f"{name}-data"),
            "registry.url": db_url,
            "broker.url": broker.url,
            "broker.client_id": name,
            "broker.mqtt5": broker.mqtt5,
            "broker.shared_group": "fleet",
            "api.port": self.port,
            "signing.command_key": str(key_path),
            "signing.bundle_keys": [str(p) for p in keys.pop("bundle_keys")],
            "rollout.tick_s": 0.2,
            "devices.enrol_token_hashes": [token_hash(ENROL_TOKEN)],
            "cluster.heartbeat_s": 1.0,
            "cluster.dead_after_s": 4.0,
            "cluster.lease_retry_s": 1.0,
        }
        self.config = init_config("fleet", folder / f"{name}.toml", values)
        # a token in the config file: the same on both processes
        text = self.config.read_text().replace(
            "tokens = []",
            f'tokens = [{{ name = "e2e", token_hash = "{auth.hash_token(ADMIN_TOKEN)}", '
            'role = "admin" }]',
        )
        self.config.write_text(text)
        self.log = folder / f"{name}.log"
        self.proc: Process | None = None
        self.client = httpx.Client(base_url=self.url, headers=HEADERS, timeout=30.0)

    def start(self) -> FleetProcess:
        self.proc = Process(["fleet", "serve", "--config", str(self.config)], self.log)
        return self

    def wait(self) -> FleetProcess:
        assert self.proc is not None
        self.proc.wait_http(f"{self.url}/v1/health")
        return self

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
        self.client.close()

    def get(self, path: str, **kw: Any) -> Any:
        r = self.client.get(path, **kw)
        assert r.status_code == 200, f"{self.name} GET {path}: {r.status_code} {r.text}"
        return r.json()

    def leads(self) -> bool:
        try:
            return bool(httpx.get(f"{self.url}/v1/health", timeout=5).json()["tick"])
        except httpx.HTTPError:
            return False


@dataclass
class Fleet:
    servers: list[FleetProcess]
    agents: dict[str, AgentProcess]
    recorder: BrokerRecorder

    def leader(self) -> FleetProcess:
        def one() -> FleetProcess | None:
            holders = [s for s in self.servers if s.proc and s.proc.proc.poll() is None]
            holders = [s for s in holders if s.leads()]
            return holders[0] if len(holders) == 1 else None

        found: FleetProcess = wait_until(one, 60, "one server to run the rollout tick")
        return found


@pytest.fixture
def fleet(
    tmp_path: Path,
    broker: Broker,
    postgres_url: str,
    key_files: dict[str, Path],
    iris_v1: Release,
    iris_v2: Release,
    request: pytest.FixtureRequest,
) -> Iterator[Fleet]:
    n = getattr(request, "param", 4)
    servers = [
        FleetProcess(
            tmp_path, f"fleet-{x}", postgres_url, broker, bundle_keys=[key_files["signing"]]
        )
        for x in "ab"
    ]
    for s in servers:
        s.start()
    recorder = BrokerRecorder(broker.url).start()
    ids = [f"edge-{i:02d}" for i in range(n)]
    configs = {
        d: write_agent_config(
            tmp_path / d,
            device_id=d,
            broker_url=broker.url,
            bundle_keys=[key_files["signing"]],
            window_s=1.0,
        )
        for d in ids
    }
    install_offline(list(configs.values()), iris_v1.write(tmp_path))
    agents = {d: AgentProcess(c).start() for d, c in configs.items()}
    try:
        for s in servers:
            s.wait()
        for a in agents.values():
            a.wait_api(ready=True, timeout=120)
        for s in servers:  # both processes see every device (births are not shared)
            wait_until(
                lambda s=s: (
                    {d["device_id"] for d in s.get("/v1/devices") if d["online"]} >= set(ids)
                ),
                90,
                f"every device online at {s.name}",
            )
        yield Fleet(servers, agents, recorder)
    finally:
        for a in agents.values():
            a.close()
        recorder.close()
        for s in servers:
            s.stop()


def upload_and_start(fleet: Fleet, release: Release, via: FleetProcess, **spec: Any) -> str:
    for s in fleet.servers:  # each process keeps the bytes it sends (its own artifact folder)
        up = s.client.post("/v1/bundles", content=release.data)
        assert up.status_code in (200, 201), up.text
    body = {"bundle": up.json()["sha256"], **spec}
    r = via.client.post("/v1/rollouts", json=body, params={"start": "true"})
    assert r.status_code == 201, r.text
    return str(r.json()["rollout_id"])


def rollout_state(fleet: Fleet, rid: str) -> dict[str, Any]:
    for s in fleet.servers:
        if s.proc is not None and s.proc.proc.poll() is None:
            try:
                r = s.client.get(f"/v1/rollouts/{rid}")
            except httpx.HTTPError:
                continue
            if r.status_code == 200:
                return dict(r.json())
    return {}


def deploy_ledger(agent: AgentProcess, rid: str) -> list[tuple[str, str]]:
    """(command id, state) of every deploy command of ``rid`` in the agent's ledger."""
    data_dir = agent.config.parent / "data"
    out: list[tuple[str, str]] = []
    for db in sorted(data_dir.glob("*.db")):
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            if "commands" in {r[0] for r in con.execute("select name from sqlite_master")}:
                out += [
                    (cid, state)
                    for cid, state in con.execute(
                        "select command_id, state from commands where kind = 'deploy'"
                    )
                    if rid in cid
                ]
        finally:
            con.close()
    return out


def assert_installed_once(fleet: Fleet, rid: str, version: str) -> None:
    deploys: dict[str, set[str]] = {}
    for device, m in fleet.recorder.by_kind("cmd"):
        doc = m.json()
        cid = str(doc.get("command_id", ""))
        if rid in cid and doc.get("kind") == "deploy":
            deploys.setdefault(device, set()).add(str(cid))
    installed: dict[str, set[int]] = {}
    for device, m in fleet.recorder.by_kind("status"):
        st = decode(CommandStatus, m.payload)
        if st.state == "installed" and rid in st.command_id and "deploy" in st.command_id:
            installed.setdefault(device, set()).add(st.seq)
    for device, agent in fleet.agents.items():
        model = agent.model()
        assert model is not None and model["version"] == version, (device, model)
        ledger = deploy_ledger(agent, rid)
        assert len(ledger) == 1 and ledger[0][1] == "installed", (device, ledger)
        # resent after the takeover maybe, but always the same command: one install
        assert deploys.get(device) == {ledger[0][0]}, (device, deploys.get(device))
        # a replayed command is answered with the recorded status (same seq); a second
        # install would have reported with a new one
        assert installed.get(device) and len(installed[device]) == 1, (device, installed)
        # the registry's version history has it, whichever process was holding the tick
        live = next(s for s in fleet.servers if s.proc and s.proc.proc.poll() is None)
        history = live.get(f"/v1/devices/{device}")["history"]
        assert history[0]["version"] == version, (device, history)


# (a) ------------------------------------------------------------------------------------
def test_killing_the_tick_holder_mid_rollout_hands_the_tick_over_and_nobody_installs_twice(
    fleet: Fleet, iris_v2: Release
) -> None:
    leader = fleet.leader()
    follower = next(s for s in fleet.servers if s is not leader)
    # created and started through the follower: it hands the start to the holder
    rid = upload_and_start(
        fleet, iris_v2, follower, stages=[1, 2, 4], stage_unit="count", soak_s=3.0
    )
    wait_until(
        lambda: rollout_state(fleet, rid).get("counts", {}).get("installed", 0) >= 1,
        120,
        "the first stage to install",
    )
    assert rollout_state(fleet, rid)["state"] == "running"  # mid-rollout
    leader.kill()
    assert follower.proc is not None and follower.proc.proc.poll() is None
    wait_until(follower.leads, 60, f"{follower.name} to take the rollout tick")
    done = wait_until(
        lambda: rollout_state(fleet, rid).get("state") in ("succeeded", "halted"),
        180,
        "the rollout to finish on the surviving process",
    )
    status = rollout_state(fleet, rid)
    assert done and status["state"] == "succeeded", status
    assert {d["state"] for d in status["devices"]} == {"installed"}
    cluster = follower.get("/v1/cluster")
    assert cluster["leader"] == follower.name and cluster["takeovers"] >= 1
    took = [e for e in follower.get("/v1/events", params={"limit": 500}) if e["kind"] == "cluster"]
    assert any("runs the rollout tick now" in e["message"] for e in took), took
    assert_installed_once(fleet, rid, iris_v2.version)


# (c) ------------------------------------------------------------------------------------
def test_a_postgresql_restart_mid_rollout_loses_nothing_recorded_and_the_rollout_completes(
    fleet: Fleet, iris_v2: Release, postgres_server: PostgresServer
) -> None:
    a = fleet.servers[0]
    rid = upload_and_start(fleet, iris_v2, a, stages=[1, 2, 4], stage_unit="count", soak_s=3.0)
    wait_until(
        lambda: rollout_state(fleet, rid).get("counts", {}).get("installed", 0) >= 1,
        120,
        "the first stage to install",
    )
    assert rollout_state(fleet, rid)["state"] == "running"
    events_before = {(e["ts"], e["message"]) for e in a.get("/v1/events", params={"limit": 500})}
    audit_before = {(e["ts"], e["action"]) for e in a.get("/v1/audit", params={"limit": 500})}
    devices_before = {d["device_id"] for d in a.get("/v1/devices")}
    postgres_server.restart()
    status = wait_until(
        lambda: (
            s if (s := rollout_state(fleet, rid)).get("state") in ("succeeded", "halted") else None
        ),
        180,
        "the rollout to finish after the restart",
    )
    assert status["state"] == "succeeded", status
    assert {d["state"] for d in status["devices"]} == {"installed"}
    for s in fleet.servers:
        events = {(e["ts"], e["message"]) for e in s.get("/v1/events", params={"limit": 500})}
        audit = {(e["ts"], e["action"]) for e in s.get("/v1/audit", params={"limit": 500})}
        assert events_before <= events and audit_before <= audit
        assert devices_before <= {d["device_id"] for d in s.get("/v1/devices")}
    fleet.leader()  # one process holds the tick again
    assert_installed_once(fleet, rid, iris_v2.version)


# (d) ------------------------------------------------------------------------------------
def sent_reports(fleet: Fleet) -> dict[tuple[Any, ...], int]:
    """Every sketch report the devices published: its key → its rows."""
    out: dict[tuple[Any, ...], int] = {}
    for device, m in fleet.recorder.by_kind("sketch"):
        r = decode(SketchReport, m.payload)
        key = (device, r.model.name, r.model.version, r.window_start.timestamp(), r.seq)
        out[key] = r.sketches.rows
    return out


def merged_reports(db_url: str) -> tuple[dict[tuple[Any, ...], tuple[int, float]], dict[Any, int]]:
    """The registry's merged report keys (→ rows, window) and each window's row count."""
    import psycopg

    with psycopg.connect(db_url) as conn:
        keys = {
            (d, m, v, ws, seq): (rows, w)
            for d, m, v, ws, seq, rows, w in conn.execute(
                'select device, model, version, window_start, seq, "rows", "window" '
                "from drift_reports"
            )
        }
        windows = {
            (m, v, w): rows
            for m, v, w, rows in conn.execute(
                'select model, version, "window", "rows" from drift_windows'
            )
        }
    return keys, windows


def took_sketches(server: FleetProcess) -> int:
    """Sketch reports this process's bridge accepted (its share of the subscription)."""
    stats = server.get("/v1/health")["bridge"]
    return int(stats["accepted"].get("sketch", 0))


@pytest.mark.parametrize("broker", [True, False], ids=["shared", "every-process"], indirect=True)
@pytest.mark.parametrize("fleet", [3], indirect=True)
def test_killing_an_ingest_process_while_devices_upload_sketches_merges_every_report_once(
    fleet: Fleet, postgres_url: str
) -> None:
    traffic = Traffic(list(fleet.agents.values()), threads=2, pause_s=0.05).start()
    try:
        wait_until(lambda: len(sent_reports(fleet)) >= 6, 120, "devices to upload sketches")
        victim = fleet.servers[1]
        survivor = fleet.servers[0]
        wait_until(
            lambda: all(took_sketches(s) > 0 for s in fleet.servers),
            60,
            "both processes to take sketches",
        )
        victim.kill()
        killed_at = time.time()
        wait_until(
            lambda: any(
                t > killed_at + 6 for t in (m.ts for _, m in fleet.recorder.by_kind("sketch"))
            ),
            120,
            "sketches uploaded after the kill",
        )
        wait_until(
            lambda: victim.name in survivor.get("/v1/cluster")["adopted"],
            60,
            f"{survivor.name} to drain {victim.name}'s MQTT session",
        )
    finally:
        traffic.stop()
    wait_until(
        lambda: set(sent_reports(fleet)) <= set(merged_reports(postgres_url)[0]),
        120,
        "every published report to be merged",
    )
    sent = sent_reports(fleet)
    keys, windows = merged_reports(postgres_url)
    assert set(keys) == set(sent)  # each key once (primary key), none missing, none invented
    assert all(keys[k][0] == sent[k] for k in sent)
    per_window: dict[Any, int] = {}
    for (_, model, version, _, _), (rows, w) in keys.items():
        per_window[(model, version, w)] = per_window.get((model, version, w), 0) + rows
    assert per_window == windows  # merged once: each window holds the sum of its reports
