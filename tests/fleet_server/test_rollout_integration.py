"""Rollouts end to end on a real broker (amqtt always, Mosquitto when installed).

The devices here are simulated agents speaking the real protocol over their own paho
connections (tests/fleet_server/fleetkit.py: signed commands verified, bundles verified
with ``protocol``, chunks reassembled, retained birth + last will). They stand in for
``agent.daemon`` until that lands; the assertions are about the server's behaviour.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fleet_server.rollout_engine import RolloutSpec, assign_stages
from fleet_server.service import FleetService, RolloutRequest
from protocol import KeyPair, TrustStore
from protocol.messages import ModelRef
from protocol.transport_paho import PahoTransport
from tests.fleet_server.fleetkit import SimDevice, make_config
from tests.support.bundles import make_bundle

pytestmark = pytest.mark.slow

V1 = ModelRef(name="iris", version="1.0.0", release=1)


def wait_for(cond: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def bundle_v2(signing_key: KeyPair) -> bytes:
    return make_bundle(signing_key, version="2.0.0", release=2)[0]


class RealFleet:
    def __init__(self, tmp: Path, key: KeyPair, url: str) -> None:
        self.url = url
        self.key = key
        self.tag = "t" + secrets.token_hex(4)
        cfg = make_config(tmp, key, broker_url=url)
        broker = cfg.broker.model_copy(
            update={"topic_prefix": f"it-{self.tag}", "client_id": f"srv-{self.tag}"}
        )
        self.cfg = cfg.model_copy(update={"broker": broker})
        self.service = FleetService(
            self.cfg, transport=PahoTransport(url, broker.client_id, clean_session=False)
        )
        self.service.start()
        self.devices: dict[str, SimDevice] = {}

    def device(self, name: str, **kw: object) -> SimDevice:
        dev_id = f"{self.tag}-{name}"
        trust = TrustStore.from_keys([self.key.public])
        prefix = self.cfg.broker.topic_prefix
        probe = SimDevice(dev_id, None, trust, prefix=prefix)  # type: ignore[arg-type]
        t = PahoTransport(self.url, dev_id, will=probe.will(), clean_session=False)
        dev = SimDevice(dev_id, t, trust, prefix=prefix, **kw)  # type: ignore[arg-type]
        self.devices[dev_id] = dev.start()
        return dev

    def registered(self, n: int) -> None:
        wait_for(
            lambda: len(self.service.list_devices(online=True)) >= n, what=f"{n} devices online"
        )

    def close(self) -> None:
        for d in self.devices.values():
            try:
                d.t.close()
            except Exception:
                pass
        self.service.stop()
        self.service.repo.close()


@pytest.fixture
def fleet(tmp_path: Path, signing_key: KeyPair, broker_url: str) -> Iterator[RealFleet]:
    f = RealFleet(tmp_path, signing_key, broker_url)
    yield f
    f.close()


def state(svc: FleetService, rid: str) -> str:
    return str(svc.rollout_status(rid)["state"])


def test_staged_rollout_succeeds_on_a_real_broker(fleet: RealFleet, bundle_v2: bytes) -> None:
    for i in range(6):
        fleet.device(f"d{i}", model=V1)
    fleet.registered(6)
    fleet.service.upload_bundle(bundle_v2)
    rid = fleet.service.create_rollout(
        RolloutRequest(bundle="iris@2.0.0", stages=[20, 50, 100], success_threshold=1.0)
    )["rollout_id"]
    fleet.service.start_rollout(rid)
    wait_for(lambda: state(fleet.service, rid) == "succeeded", what="rollout success")
    status = fleet.service.rollout_status(rid)
    assert [s["state"] for s in status["stages"]] == ["passed"] * 3
    assert all(
        d.model == ModelRef(name="iris", version="2.0.0", release=2) for d in fleet.devices.values()
    )
    wait_for(
        lambda: {d["version"] for d in fleet.service.list_devices()} == {"2.0.0"},
        what="registry versions",
    )
    # stages passed in order, each after the previous one
    passed = [
        a
        for a in reversed(fleet.service.audit(target=f"rollout:{rid}"))
        if a["action"] == "stage.passed"
    ]
    assert [a["data"]["stage"] for a in passed] == [0, 1, 2]


def test_failing_canaries_halt_at_stage_one_and_installed_canaries_roll_back(
    fleet: RealFleet, bundle_v2: bytes
) -> None:
    rid = f"r-canary-{fleet.tag}"
    names = [f"{fleet.tag}-d{i}" for i in range(6)]
    spec = RolloutSpec(bundle_sha256="x", stages=(3, 6), stage_unit="count")
    canaries = assign_stages(rid, names, spec)[0]
    failing = set(canaries[:2])
    for n in names:
        fleet.device(
            n.removeprefix(f"{fleet.tag}-"),
            model=V1,
            fail_versions=frozenset({"2.0.0"}) if n in failing else frozenset(),
        )
    fleet.registered(6)
    fleet.service.upload_bundle(bundle_v2)
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
    wait_for(lambda: state(fleet.service, rid) == "halted", what="halt")
    ok_canary = next(c for c in canaries if c not in failing)
    wait_for(
        lambda: fleet.service.rollout_status(rid)["counts"].get("rolled_back") == 1,
        what="rollback confirmed",
    )
    status = fleet.service.rollout_status(rid)
    assert [s["state"] for s in status["stages"]] == ["failed", "pending"]
    assert "failure share 67%" in status["reason"]
    assert fleet.devices[ok_canary].model == V1  # back on the previous version
    assert [c.kind for c in fleet.devices[ok_canary].commands] == ["deploy", "rollback"]
    for n in names:
        if n not in canaries:
            assert fleet.devices[n].commands == []  # stage 2 never saw the deploy
    assert any(e["kind"] == "alert" for e in fleet.service.events(rollout_id=rid))


def test_a_late_device_gets_its_pending_command_when_it_comes_online(
    fleet: RealFleet, bundle_v2: bytes
) -> None:
    for i in range(5):
        fleet.device(f"d{i}", model=V1)
    late = fleet.device("late", model=V1)
    fleet.registered(6)
    late.stop()
    wait_for(
        lambda: not fleet.service.get_device(late.device_id)["online"], what="late device offline"
    )
    fleet.service.upload_bundle(bundle_v2)
    rid = fleet.service.create_rollout(
        RolloutRequest(bundle="iris@2.0.0", stages=[100], success_threshold=0.8)
    )["rollout_id"]
    fleet.service.start_rollout(rid)
    wait_for(
        lambda: fleet.service.rollout_status(rid)["counts"].get("installed") == 5,
        what="5 installed",
    )
    assert late.commands == []
    again = fleet.device("late", model=V1)
    wait_for(
        lambda: again.model is not None and again.model.version == "2.0.0",
        what="late device installs",
    )
    wait_for(
        lambda: fleet.service.rollout_status(rid)["counts"] == {"installed": 6}, what="6 installed"
    )
    assert state(fleet.service, rid) == "succeeded"
