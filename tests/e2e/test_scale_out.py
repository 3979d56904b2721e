"""Two ``edgefleet fleet serve`` processes on one PostgreSQL registry, real agents, a real
3-node broker cluster.

Each server is the shipped command started from a config ``edgefleet fleet init`` wrote
(its own ``broker.client_id``, API port and list of broker URLs); the devices are
``edgefleet agent run`` processes with v1 installed offline, each with a list of broker
URLs. The broker is a 3-node NATS cluster with MQTT on JetStream (``nats_cluster``, one per
module): fleet-a starts on node 2, fleet-b on node 3, the devices alternate between node 1
and node 2. NATS speaks MQTT 3.1.1 only, so every server takes every report and the
registry merges each once. PostgreSQL is one server for the session with a fresh database
per test; each test has its own topic prefix, device ids and client ids, so nothing a
previous test left on the cluster (retained births, persistent sessions) reaches it.

* (a) ``kill -9`` the process that runs the rollout tick mid-rollout: the other takes the
  tick and the rollout completes; every device runs v2 and installed it once (its command
  ledger holds one deploy command of the rollout; the broker carried one command id).
  The bundle is uploaded through the process that does not send it: its bytes are in the
  registry.
* (b) ``kill -9`` broker node 1 mid-rollout: its devices move to the next node of their
  lists, the rollout completes, every device runs v2 and installed it once.
* (c) PostgreSQL restarts mid-rollout: the servers reconnect, the rollout completes, and
  every event, audit entry and device recorded before the restart is still there.
* (d) ``kill -9`` one of the two ingest processes while devices upload sketches: every
  report the devices published is merged once, counted by (device, model, version,
  window, seq) in the registry, and each window's row count is the sum of its reports'.
  Run on NATS (both processes take every report and merge it concurrently; the survivor
  drains the dead one's persistent session) and on Mosquitto, the one broker here with
  MQTT 5 shared subscriptions (the broker splits reports between the processes and the
  dead one's share moves to the survivor), which NATS cannot show. (Debian's NATS 2.9.10
  lost a QoS 1 report between nodes in 6 of 14 runs; the cluster now runs 2.15.1, and a
  report published and never merged fails the test.)

Everything waits with generous deadlines; nothing asserts a duration.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from fleet_server import auth
from protocol.device_auth import token_hash
from protocol.messages import CommandStatus, SketchReport, decode
from tests.e2e.cluster_deploy import connected_to
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
from tests.support.nats_cluster import NatsCluster
from tests.support.postgres import PostgresServer
from tests.support.shipped import Process, init_config, set_keys

pytestmark = [pytest.mark.slow, pytest.mark.nats, pytest.mark.postgres]

HEADERS = {"authorization": f"Bearer {ADMIN_TOKEN}"}
# broker node order (counted from 1) of each fleet process and of the devices, in turn
SERVER_NODES = {"a": (2, 3, 1), "b": (3, 2, 1)}
DEVICE_NODES = [(1, 2, 3), (2, 1, 3), (1, 3, 2), (2, 3, 1)]
RECORDER_NODE = 3  # never killed


@dataclass(frozen=True)
class Broker:
    nodes: list[str]  # MQTT URL of each node (one for Mosquitto)
    mqtt5: bool  # shared subscriptions split telemetry; without, every server takes all
    cluster: NatsCluster | None = None

    def urls(self, order: tuple[int, ...]) -> list[str]:
        """The nodes in ``order`` (a single broker: its one URL)."""
        return [self.nodes[n - 1] for n in order if n <= len(self.nodes)]


@pytest.fixture
def broker(request: pytest.FixtureRequest) -> Broker:
    """The 3-node NATS cluster (MQTT 3.1.1); ``"mosquitto"`` (indirect parameter): one
    Mosquitto with MQTT 5 shared subscriptions for telemetry."""
    if getattr(request, "param", "nats") == "mosquitto":
        return Broker([request.getfixturevalue("mosquitto").url], mqtt5=True)
    cluster: NatsCluster = request.getfixturevalue("nats_cluster")
    for node in cluster.nodes:  # a test that failed midway may have left one down
        if not node.alive():
            cluster.restart(node.index)
    return Broker(cluster.urls, mqtt5=False, cluster=cluster)


class FleetProcess:
    """``edgefleet fleet serve --config …`` from a ``fleet init`` config."""

    def __init__(
        self, folder: Path, name: str, db_url: str, urls: list[str], mqtt5: bool, **keys: Any
    ):
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        key_path = write_private_key(folder / "keys", COMMAND_KEY)
        values = {
            "data_dir": str(folder / f"{name}-data"),
            "registry.url": db_url,
            "broker.client_id": name,
            "broker.topic_prefix": keys.pop("prefix"),
            "broker.mqtt5": mqtt5,
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
        # a list of broker URLs replaces the one url, as a user edits the file
        one_broker = '\nurl = "mqtt://127.0.0.1:1883"'
        text = self.config.read_text()
        assert one_broker in text
        text = set_keys(text.replace(one_broker, ""), {"broker.urls": urls})
        # a token in the config file: the same on both processes
        text = text.replace(
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
        self.proc.wait_http(f"{self.url}/v1/health", timeout=120)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.proc.poll() is None

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

    def items(self, path: str) -> list[dict[str, Any]]:
        """Every item of a cursor-paged list (the tests' lists fit one page)."""
        page = self.get(path, params={"limit": 1000})
        assert page["next_cursor"] is None, page["next_cursor"]
        return list(page["items"])

    def leads(self) -> bool:
        try:
            return bool(httpx.get(f"{self.url}/v1/health", timeout=5).json()["tick"])
        except httpx.HTTPError:
            return False


@dataclass
class Fleet:
    servers: list[FleetProcess]
    agents: dict[str, AgentProcess]
    urls: dict[str, list[str]]  # device → its broker URL list
    recorder: BrokerRecorder
    broker: Broker

    def leader(self) -> FleetProcess:
        def one() -> FleetProcess | None:
            holders = [s for s in self.servers if s.alive() and s.leads()]
            return holders[0] if len(holders) == 1 else None

        found: FleetProcess = wait_until(one, 60, "one server to run the rollout tick")
        return found

    def live(self) -> FleetProcess:
        return next(s for s in self.servers if s.alive())

    def logs(self) -> str:
        parts = [f"--- {s.name}\n{s.proc.log() if s.proc else ''}" for s in self.servers]
        parts += [f"--- {d}\n{a.log()}" for d, a in self.agents.items()]
        return "\n".join(parts)


@pytest.fixture
def fleet(
    tmp_path: Path,
    broker: Broker,
    postgres_url: str,
    key_files: dict[str, Path],
    iris_v1: Release,
    request: pytest.FixtureRequest,
) -> Iterator[Fleet]:
    n = getattr(request, "param", 4)
    tag = uuid.uuid4().hex[:6]
    prefix = f"so{tag}"  # no dots: NATS turns topic levels into subject tokens
    servers = [
        FleetProcess(
            tmp_path,
            f"fleet-{x}-{tag}",
            postgres_url,
            broker.urls(order),
            broker.mqtt5,
            bundle_keys=[key_files["signing"]],
            prefix=prefix,
        )
        for x, order in SERVER_NODES.items()
    ]
    for s in servers:
        s.start()
    recorder_urls = broker.urls((RECORDER_NODE,)) or broker.nodes
    recorder = BrokerRecorder(recorder_urls, prefix=prefix).start()
    ids = [f"edge-{tag}-{i:02d}" for i in range(n)]
    urls = {d: broker.urls(DEVICE_NODES[i % len(DEVICE_NODES)]) for i, d in enumerate(ids)}
    configs = {
        d: write_agent_config(
            tmp_path / d,
            device_id=d,
            broker_url=urls[d][0],
            broker_urls=urls[d],
            topic_prefix=prefix,
            bundle_keys=[key_files["signing"]],
            window_s=1.0,
        )
        for d in ids
    }
    install_offline(list(configs.values()), iris_v1.write(tmp_path))
    agents = {d: AgentProcess(c).start() for d, c in configs.items()}
    made = Fleet(servers, agents, urls, recorder, broker)
    try:
        for s in servers:
            s.wait()
        for a in agents.values():
            a.wait_api(ready=True, timeout=120)
        for s in servers:  # both processes see every device (births are not shared)
            wait_until(
                lambda s=s: (
                    {d["device_id"] for d in s.items("/v1/devices") if d["online"]} >= set(ids)
                ),
                120,
                f"every device online at {s.name}",
            )
        yield made
    except BaseException:
        print(made.logs())
        raise
    finally:
        for a in agents.values():
            a.close()
        recorder.close()
        for s in servers:
            s.stop()


def upload_and_start(fleet: Fleet, release: Release, via: FleetProcess, **spec: Any) -> str:
    """Upload through ``via`` only (bundle bytes live in the registry: whichever process
    holds the tick sends them) and start the rollout through it."""
    up = via.client.post("/v1/bundles", content=release.data)
    assert up.status_code in (200, 201), up.text
    body = {"bundle": up.json()["sha256"], **spec}
    r = via.client.post("/v1/rollouts", json=body, params={"start": "true"})
    assert r.status_code == 201, r.text
    return str(r.json()["rollout_id"])


def rollout_state(fleet: Fleet, rid: str) -> dict[str, Any]:
    for s in fleet.servers:
        if s.alive():
            try:
                r = s.client.get(f"/v1/rollouts/{rid}")
            except httpx.HTTPError:
                continue
            if r.status_code == 200:
                return dict(r.json())
    return {}


def wait_first_install(fleet: Fleet, rid: str) -> None:
    wait_until(
        lambda: rollout_state(fleet, rid).get("counts", {}).get("installed", 0) >= 1,
        120,
        "the first stage to install",
    )
    assert rollout_state(fleet, rid)["state"] == "running"  # mid-rollout


def wait_final(fleet: Fleet, rid: str, what: str) -> dict[str, Any]:
    status: dict[str, Any] = wait_until(
        lambda: (
            s if (s := rollout_state(fleet, rid)).get("state") in ("succeeded", "halted") else None
        ),
        300,
        what,
        0.5,
    )
    assert status["state"] == "succeeded", (status, fleet.logs())
    assert {d["state"] for d in status["devices"]} == {"installed"}, status["devices"]
    return status


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
    live = fleet.live()
    for device, agent in fleet.agents.items():
        model = agent.model()
        assert model is not None and model["version"] == version, (device, model)
        ledger = deploy_ledger(agent, rid)
        assert len(ledger) == 1 and ledger[0][1] == "installed", (device, ledger)
        # resent after a takeover or a reconnect maybe, but always the same command
        assert deploys.get(device) == {ledger[0][0]}, (device, deploys.get(device))
        # a replayed command is answered with the recorded status (same seq); a second
        # install would have reported with a new one
        assert installed.get(device) and len(installed[device]) == 1, (device, installed)
        # the registry's version history has it, whichever process was holding the tick
        history = live.get(f"/v1/devices/{device}")["history"]
        assert history[0]["version"] == version, (device, history)


# (a) ------------------------------------------------------------------------------------
def test_killing_the_tick_holder_mid_rollout_hands_the_tick_over_and_nobody_installs_twice(
    fleet: Fleet, iris_v2: Release
) -> None:
    leader = fleet.leader()
    follower = next(s for s in fleet.servers if s is not leader)
    # uploaded, created and started through the follower: it hands the start to the
    # holder, which sends bytes it never received itself (they are in the registry)
    rid = upload_and_start(
        fleet, iris_v2, follower, stages=[1, 2, 4], stage_unit="count", soak_s=3.0
    )
    wait_first_install(fleet, rid)
    leader.kill()
    assert follower.alive()
    wait_until(follower.leads, 60, f"{follower.name} to take the rollout tick")
    wait_final(fleet, rid, "the rollout to finish on the surviving process")
    cluster = follower.get("/v1/cluster")
    assert cluster["leader"] == follower.name and cluster["takeovers"] >= 1
    took = [e for e in follower.items("/v1/events") if e["kind"] == "cluster"]
    assert any("runs the rollout tick now" in e["message"] for e in took), took
    assert_installed_once(fleet, rid, iris_v2.version)


# (b) ------------------------------------------------------------------------------------
def test_killing_broker_node_1_mid_rollout_moves_its_devices_and_the_rollout_completes(
    fleet: Fleet, iris_v2: Release
) -> None:
    cluster = fleet.broker.cluster
    assert cluster is not None
    node_1 = cluster.node(1).url
    on_node_1 = [d for d, a in fleet.agents.items() if connected_to(a) == node_1]
    assert len(on_node_1) == 2, fleet.logs()  # devices alternate between nodes 1 and 2
    rid = upload_and_start(
        fleet, iris_v2, fleet.leader(), stages=[1, 2, 4], stage_unit="count", soak_s=3.0
    )
    try:
        wait_first_install(fleet, rid)
        cluster.kill(1)

        def moved() -> bool:
            return all(connected_to(fleet.agents[d]) not in (None, node_1) for d in on_node_1)

        wait_until(moved, 180, f"{on_node_1} to reconnect to another node", 0.5)
        for d in on_node_1:  # the next node of its own list
            assert connected_to(fleet.agents[d]) in fleet.urls[d][1:]
        wait_final(fleet, rid, "the rollout to finish without node 1")
        assert_installed_once(fleet, rid, iris_v2.version)
        for s in fleet.servers:
            wait_until(
                lambda s=s: (
                    {d["device_id"] for d in s.items("/v1/devices") if d["online"]}
                    >= set(fleet.agents)
                ),
                120,
                f"every device online again at {s.name}",
            )
    finally:
        cluster.restart(1)  # the cluster whole again for the next test


# (c) ------------------------------------------------------------------------------------
def test_a_postgresql_restart_mid_rollout_loses_nothing_recorded_and_the_rollout_completes(
    fleet: Fleet, iris_v2: Release, postgres_server: PostgresServer
) -> None:
    a = fleet.servers[0]
    rid = upload_and_start(fleet, iris_v2, a, stages=[1, 2, 4], stage_unit="count", soak_s=3.0)
    wait_first_install(fleet, rid)
    events_before = {(e["ts"], e["message"]) for e in a.items("/v1/events")}
    audit_before = {(e["ts"], e["action"]) for e in a.items("/v1/audit")}
    devices_before = {d["device_id"] for d in a.items("/v1/devices")}
    postgres_server.restart()
    wait_final(fleet, rid, "the rollout to finish after the restart")
    for s in fleet.servers:
        events = {(e["ts"], e["message"]) for e in s.items("/v1/events")}
        audit = {(e["ts"], e["action"]) for e in s.items("/v1/audit")}
        assert events_before <= events and audit_before <= audit
        assert devices_before <= {d["device_id"] for d in s.items("/v1/devices")}
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
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ  # one snapshot
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


def _wait_for(predicate: Any, timeout: float) -> bool:
    """Poll ``predicate`` until true or ``timeout`` (the caller says what is still wrong)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def took_sketches(server: FleetProcess) -> int:
    """Sketch reports this process's bridge accepted (its share of the subscription)."""
    stats = server.get("/v1/health")["bridge"]
    return int(stats["accepted"].get("sketch", 0))


@pytest.mark.parametrize(
    "broker",
    ["nats", pytest.param("mosquitto", marks=pytest.mark.mosquitto)],
    ids=["nats-every-process", "mosquitto-shared"],
    indirect=True,
)
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
        # the survivor drains the dead session until it goes quiet; under steady telemetry
        # (metrics every window) it never does, and the drain runs to its limit (60 s)
        # before it unsubscribes
        wait_until(
            lambda: victim.name in survivor.get("/v1/cluster")["adopted"],
            150,
            f"{survivor.name} to drain {victim.name}'s MQTT session",
        )
    finally:
        traffic.stop()
    drained = survivor.get("/v1/cluster")["adopted"][victim.name]
    assert drained > 0
    # devices still upload: compare what was published before a snapshot with what was
    # merged after it, and what was merged with what the recorder saw by then
    published = sent_reports(fleet)
    _wait_for(lambda: set(published) <= set(merged_reports(postgres_url)[0]), 120)
    keys, windows = merged_reports(postgres_url)
    _wait_for(lambda: set(keys) <= set(sent_reports(fleet)), 60)
    sent = sent_reports(fleet)
    assert all(keys[k][0] == sent[k] for k in keys if k in sent)
    per_window: dict[Any, int] = {}
    for (_, model, version, _, _), (rows, w) in keys.items():
        per_window[(model, version, w)] = per_window.get((model, version, w), 0) + rows
    assert per_window == windows  # merged once: each window holds the sum of its reports
    missing = sorted(set(published) - set(keys))  # published, never merged
    unseen = sorted(set(keys) - set(sent))  # merged, never seen by the recorder
    assert not missing, (missing, len(published), survivor.get("/v1/health")["bridge"])
    assert not unseen, unseen  # none invented
