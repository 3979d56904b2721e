"""Rollouts end to end: real agents (``agent.daemon.Agent``, in process, each with its own
data dir) and the fleet service on a real broker (amqtt always, Mosquitto when installed).

Every agent starts on iris 1.0.0; the rollouts deliver 2.0.0 as signed commands plus MQTT
chunks; the agents verify, smoke-test, install and report. Scenarios: a staged rollout
succeeds; failing canaries (agent ``faults.fail_smoke_test``) halt the rollout at stage 1,
stage 2 never sees the deploy, and the canary that installed is rolled back; a device
that is offline at the start gets its pending command when it comes online.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet_server.delivery import n_chunks
from fleet_server.rollout_engine import RolloutSpec, assign_stages
from fleet_server.service import FleetService, RolloutRequest
from protocol import KeyPair
from protocol.transport_paho import PahoTransport
from tests.fleet_server.fleetkit import DeviceKey, enrol_token_file, make_config
from tests.support.bundles import make_bundle
from tests.support.keys import write_public

pytestmark = pytest.mark.slow


def wait_for(cond: Callable[[], bool], timeout: float = 40.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def bundles(signing_key: KeyPair) -> dict[str, bytes]:
    return {
        "1.0.0": make_bundle(signing_key, version="1.0.0", release=1)[0],
        "2.0.0": make_bundle(signing_key, version="2.0.0", release=2)[0],
    }


class RealFleet:
    def __init__(self, tmp: Path, key: KeyPair, url: str, bundles: dict[str, bytes]) -> None:
        self.tmp, self.url, self.key, self.bundles = tmp, url, key, bundles
        self.prefix = "it" + secrets.token_hex(4)  # this test's own topics on a shared broker
        cfg = make_config(tmp, key, broker_url=url)
        broker = cfg.broker.model_copy(
            update={"topic_prefix": self.prefix, "client_id": f"{self.prefix}-srv"}
        )
        self.cfg = cfg.model_copy(update={"broker": broker})
        transport = PahoTransport(url, broker.client_id, clean_session=False, max_backoff=2)
        self.service = FleetService(self.cfg, transport=transport)
        self.service.start()
        self.service.upload_bundle(bundles["1.0.0"])
        self.service.upload_bundle(bundles["2.0.0"])
        self.agents: dict[str, Any] = {}

    def name(self, i: int) -> str:
        return f"{self.prefix}-d{i}"

    def agent_config(self, device_id: str, *, fail: bool = False) -> Any:
        from agent.config import (
            AgentConfig,
            ApiConfig,
            BrokerConfig,
            EnrolConfig,
            FaultsConfig,
            SketchConfig,
            TrustConfig,
        )

        return AgentConfig(
            device_id=device_id,
            data_dir=self.tmp / device_id,
            broker=BrokerConfig(url=self.url, topic_prefix=self.prefix),
            trust=TrustConfig(
                bundle_keys=[self.cfg.signing.bundle_keys[0]],
                command_keys=[write_public(self.tmp / "command")],
            ),
            api=ApiConfig(port=0),  # own API port each
            sketch=SketchConfig(window_seconds=3600),
            faults=FaultsConfig(fail_smoke_test=fail),
            enrol=EnrolConfig(token_file=enrol_token_file(self.tmp)),
        )

    def agent(self, device_id: str, *, fail: bool = False, preinstall: bool = True) -> Any:
        from agent.daemon import Agent
        from agent.installer import Installer

        if preinstall:  # every device starts on 1.0.0 (installed before any fault is switched on)
            Installer.from_config(self.agent_config(device_id)).install_bytes(self.bundles["1.0.0"])
        a = Agent(self.agent_config(device_id, fail=fail), max_backoff=2).start()
        self.agents[device_id] = a
        return a

    def online(self, n: int) -> None:
        wait_for(
            lambda: len(self.service.list_devices(online=True)) >= n, what=f"{n} agents online"
        )

    def close(self) -> None:
        for a in self.agents.values():
            if a.started:
                a.stop()
        self.service.stop()
        self.service.repo.close()


def version(agent: Any) -> str | None:
    model = agent.birth().model
    return model.version if model else None


@pytest.fixture
def fleet(
    tmp_path: Path, signing_key: KeyPair, broker_url: str, bundles: dict[str, bytes]
) -> Iterator[RealFleet]:
    f = RealFleet(tmp_path, signing_key, broker_url, bundles)
    yield f
    f.close()


def status(svc: FleetService, rid: str) -> dict[str, Any]:
    return svc.rollout_status(rid)


def test_staged_rollout_with_real_agents_succeeds(fleet: RealFleet) -> None:
    for i in range(6):
        fleet.agent(fleet.name(i))
    fleet.online(6)
    req = RolloutRequest(bundle="iris@2.0.0", stages=[20, 50, 100], success_threshold=1.0)
    rid = fleet.service.create_rollout(req)["rollout_id"]
    fleet.service.start_rollout(rid)
    wait_for(lambda: status(fleet.service, rid)["state"] == "succeeded", what="rollout success")
    st = status(fleet.service, rid)
    assert [s["state"] for s in st["stages"]] == ["passed"] * 3
    assert st["counts"] == {"installed": 6}
    assert {version(a) for a in fleet.agents.values()} == {"2.0.0"}
    wait_for(
        lambda: {d["version"] for d in fleet.service.list_devices()} == {"2.0.0"},
        what="registry versions",
    )
    passed = [
        a
        for a in reversed(fleet.service.audit(target=f"rollout:{rid}"))
        if a["action"] == "stage.passed"
    ]
    assert [a["data"]["stage"] for a in passed] == [0, 1, 2]
    history = fleet.service.get_device(fleet.name(0))["history"]
    assert [h["version"] for h in history][:2] == ["2.0.0", "1.0.0"]


def test_failing_canaries_halt_at_stage_one_and_the_installed_canary_rolls_back(
    fleet: RealFleet,
) -> None:
    rid = f"r-canary-{fleet.prefix}"
    names = [fleet.name(i) for i in range(6)]
    canaries = assign_stages(
        rid, names, RolloutSpec(bundle_sha256="-", stages=(3, 6), stage_unit="count")
    )[0]
    failing = set(canaries[:2])
    for n in names:
        fleet.agent(n, fail=n in failing)
    fleet.online(6)
    req = RolloutRequest(
        bundle="iris@2.0.0",
        rollout_id=rid,
        stages=[3, 6],
        stage_unit="count",
        min_devices=3,
        failure_threshold=0.5,
        max_retries=0,
        success_threshold=1.0,
    )
    fleet.service.create_rollout(req)
    fleet.service.start_rollout(rid)
    wait_for(lambda: status(fleet.service, rid)["state"] == "halted", what="halt")
    ok = next(c for c in canaries if c not in failing)
    wait_for(
        lambda: status(fleet.service, rid)["counts"].get("rolled_back") == 1,
        what="rollback confirmed",
    )
    st = status(fleet.service, rid)
    assert [s["state"] for s in st["stages"]] == ["failed", "pending"]
    assert "failure share 67%" in st["reason"]
    by_id = {d["device_id"]: d for d in st["devices"]}
    assert {by_id[f]["state"] for f in failing} <= {"rejected", "failed"}
    assert version(fleet.agents[ok]) == "1.0.0"  # back on the previous version
    for n in names:
        if n not in canaries:
            assert by_id[n]["attempts"] == 0 and by_id[n]["state"] == "queued"
            assert version(fleet.agents[n]) == "1.0.0"
    assert any(e["kind"] == "alert" for e in fleet.service.events(rollout_id=rid))


def test_a_late_agent_gets_its_pending_command_when_it_comes_online(fleet: RealFleet) -> None:
    for i in range(6):
        fleet.agent(fleet.name(i))
    fleet.online(6)
    late = fleet.name(5)
    fleet.agents[late].stop()
    wait_for(lambda: not fleet.service.get_device(late)["online"], what="late agent offline")
    req = RolloutRequest(bundle="iris@2.0.0", stages=[100], success_threshold=0.8)
    rid = fleet.service.create_rollout(req)["rollout_id"]
    fleet.service.start_rollout(rid)
    wait_for(lambda: status(fleet.service, rid)["counts"].get("installed") == 5, what="5 installed")
    assert version(fleet.agents[late]) == "1.0.0"
    again = fleet.agent(late, preinstall=False)  # same data dir: comes back on 1.0.0
    wait_for(lambda: version(again) == "2.0.0", what="late agent installs")
    wait_for(lambda: status(fleet.service, rid)["counts"] == {"installed": 6}, what="6 installed")
    # the engine decides on the tick after the last report (seen once in CI: still running)
    wait_for(lambda: status(fleet.service, rid)["state"] == "succeeded", what="succeeded")
    # the late agent got the broker's retained chunks: the server published them once
    sender = fleet.service.sender
    assert sender is not None and list(sender.publishes.values()) == [
        n_chunks(len(fleet.bundles["2.0.0"]), fleet.cfg.rollout.chunk_bytes)
    ]


def test_serve_runs_api_bridge_and_embedded_broker_in_one_process(
    tmp_path: Path, signing_key: KeyPair, bundles: dict[str, bytes]
) -> None:
    """What `edgefleet fleet serve --embedded-broker` runs, over real HTTP and MQTT."""
    from fleet_server.client import FleetClient
    from fleet_server.serve import FleetServer
    from tests.support.ports import free_port

    cfg = make_config(tmp_path, signing_key, broker_url=f"mqtt://127.0.0.1:{free_port()}")
    cfg = cfg.model_copy(
        update={
            "api": cfg.api.model_copy(update={"port": free_port()}),
            "broker": cfg.broker.model_copy(
                update={"mqtt5": True, "shared_group": "g"}
            ),  # amqtt: degrades to 3.1.1
        }
    )
    with FleetServer(cfg, embedded_broker=True) as server:
        assert server.service is not None
        token = server.service.create_token("operator", "t")
        c = FleetClient(server.url, token)
        (tmp_path / "iris.efb").write_bytes(bundles["1.0.0"])
        assert c.push_bundle(tmp_path / "iris.efb")["version"] == "1.0.0"
        from agent.config import AgentConfig, ApiConfig, BrokerConfig, EnrolConfig, TrustConfig
        from agent.daemon import Agent

        agent = Agent(
            AgentConfig(
                device_id="served-1",
                data_dir=tmp_path / "a",
                broker=BrokerConfig(url=cfg.broker.url),
                trust=TrustConfig(
                    bundle_keys=[cfg.signing.bundle_keys[0]],
                    command_keys=[write_public(tmp_path / "command")],
                ),
                api=ApiConfig(port=0),
                enrol=EnrolConfig(token_file=enrol_token_file(tmp_path)),
            ),
            serve_api=False,
            max_backoff=2,
        ).start()
        try:
            wait_for(
                lambda: [d["device_id"] for d in c.devices(online=True)] == ["served-1"],
                what="agent listed over HTTP",
            )
        finally:
            agent.stop()
        assert server.service.bridge is not None
        assert all(not f.startswith("$share") for f in server.service.bridge.filters())


@pytest.mark.mosquitto
def test_two_servers_split_telemetry_through_an_mqtt5_shared_subscription(
    tmp_path: Path, signing_key: KeyPair, mosquitto_broker: Any
) -> None:
    from datetime import datetime, timezone

    from protocol.messages import MetricsReport, ModelRef

    prefix = "sh" + secrets.token_hex(4)
    services = []
    for i in range(2):
        (tmp_path / f"s{i}").mkdir()
        cfg = make_config(tmp_path / f"s{i}", signing_key, broker_url=mosquitto_broker.url)
        broker = cfg.broker.model_copy(
            update={
                "topic_prefix": prefix,
                "mqtt5": True,
                "shared_group": "ingest",
                "client_id": f"{prefix}-{i}",
            }
        )
        cfg = cfg.model_copy(update={"broker": broker})
        svc = FleetService(
            cfg, transport=PahoTransport(mosquitto_broker.url, broker.client_id, mqtt5=True)
        )
        svc.start()
        services.append(svc)
    try:
        # Shared subscriptions keep no session for a group nobody joined yet: publish only
        # once both workers are connected (they subscribe in on_connect) and subscribed.
        wait_for(
            lambda: all(s.transport.is_connected() for s in services),  # type: ignore[union-attr]
            timeout=20,
            what="both workers connected",
        )
        time.sleep(0.5)
        pub = PahoTransport(mosquitto_broker.url, f"{prefix}-dev", clean_session=True)
        pub.connect()
        d1 = DeviceKey("d1", prefix=prefix)  # enrols with both servers (states are not shared)
        assert pub.publish(f"{prefix}/devices/d1/state", d1.birth(), retain=True).wait(5)
        wait_for(
            lambda: all(s.devices.approved("d1") for s in services), timeout=10, what="d1 enrolled"
        )
        now = datetime.now(timezone.utc)
        for seq in range(40):
            m = MetricsReport(
                device_id="d1",
                seq=seq,
                window_start=now,
                window_end=now,
                model=ModelRef(name="iris", version="1.0.0", release=1),
                requests=1,
            )
            topic = f"{prefix}/devices/d1/telemetry/metrics"
            assert pub.publish(topic, d1.sign(topic, m.to_json())).wait(5)
        pub.close()

        def counts() -> list[int]:
            return [s.bridge.stats()["accepted"].get("metrics", 0) for s in services]  # type: ignore[union-attr]

        wait_for(
            lambda: sum(counts()) >= 40,
            timeout=10,
            what=f"40 reports ingested once in total {[s.bridge.stats() for s in services]}",
        )  # type: ignore[union-attr]
        assert sum(counts()) == 40
        assert all(c > 0 for c in counts()), counts()  # both workers took a share
    finally:
        for s in services:
            s.stop()
            s.repo.close()
