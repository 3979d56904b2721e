"""Several fleet server processes on one PostgreSQL registry, in one test process: the tick
lease (an advisory lock), rollout actions handed from a follower to the tick holder, a
takeover that resends an unanswered command under its old id, and sketch reports merged
once whichever process takes them. (The same with real processes: tests/e2e/test_scale_out.py.)
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet_server.config import FleetConfig, RegistrySection, example_config, parse_config
from fleet_server.service import FleetService, RolloutRequest
from fleet_server.tick_lease import TickLease
from protocol import KeyPair, TrustStore
from protocol.transport import MemoryBroker
from tests.fleet_server.fleetkit import SimDevice, make_config
from tests.support.bundles import make_bundle
from tests.support.postgres import PostgresServer


@pytest.mark.postgres
def test_one_lease_holds_the_tick_and_another_takes_it_once_the_holder_is_gone(
    postgres_url: str,
) -> None:
    changes: list[tuple[str, bool]] = []
    a = TickLease(postgres_url, on_change=lambda held: changes.append(("a", held)))
    b = TickLease(postgres_url, on_change=lambda held: changes.append(("b", held)))
    try:
        assert a.step() is True
        assert b.step() is False and b.step() is False  # held elsewhere: b keeps trying
        assert a.step() is True  # the holder checks its session, keeps the lock
        a.stop()  # it lets go (a killed process's session ends, which frees it too)
        assert b.step() is True
        assert changes == [("a", True), ("a", False), ("b", True)]
        assert b.acquired == 1
    finally:
        a.stop()
        b.stop()


@pytest.mark.postgres
def test_a_holder_whose_database_restarts_loses_the_lease_and_a_process_takes_it_again(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    a = TickLease(postgres_url)
    b = TickLease(postgres_url)
    try:
        assert a.step() and not b.step()
        postgres_server.restart()  # every session ends: nobody holds the lock any more
        assert a.step() is False and a.last_error  # noticed on its next check
        assert b.step() is False  # b's session died too: it reconnects on its next try
        assert [b.step(), a.step()] == [True, False]  # one of them holds it again
    finally:
        a.stop()
        b.stop()


def test_without_a_registry_url_the_only_process_always_holds_the_tick() -> None:
    seen: list[bool] = []
    lease = TickLease(None, on_change=seen.append)
    assert lease.held
    lease.start()
    assert seen == [True] and lease.held
    lease.stop()
    assert lease.held


def test_fleet_init_writes_the_cluster_section_with_its_defaults() -> None:
    assert "[cluster]" in example_config()
    cfg = parse_config(example_config())
    assert cfg.cluster == FleetConfig().cluster
    assert cfg.cluster.lease_retry_s == 1.0 and cfg.cluster.dead_after_s == 10.0


# two services on one registry ------------------------------------------------------------
def pg_config(tmp: Path, key: KeyPair, url: str, name: str) -> FleetConfig:
    (tmp / name).mkdir(parents=True, exist_ok=True)
    cfg = make_config(tmp / name, key)
    broker = cfg.broker.model_copy(update={"client_id": name})
    api = cfg.api.model_copy(update={"port": 0})
    return cfg.model_copy(
        update={"registry": RegistrySection(url=url, pool_size=3), "broker": broker, "api": api}
    )


class Pair:
    def __init__(self, tmp: Path, key: KeyPair, url: str) -> None:
        self.broker = MemoryBroker()
        self.key = key
        self.a = FleetService(
            pg_config(tmp, key, url, "fleet-a"), transport=self.broker.client("fleet-a")
        )
        self.a.start()
        _wait(lambda: self.a.cluster.leads, "fleet-a to take the tick")
        self.b = FleetService(
            pg_config(tmp, key, url, "fleet-b"), transport=self.broker.client("fleet-b")
        )
        self.b.start()

    def device(self, device_id: str, **kw: Any) -> SimDevice:
        trust = TrustStore.from_keys([self.key.public])
        return SimDevice(device_id, self.broker.client(device_id), trust, **kw).start()

    def close(self) -> None:
        for s in (self.b, self.a):
            s.stop()
            s.repo.close()


def _wait(pred: Any, what: str, timeout: float = 30.0) -> Any:
    from tests.e2e.support import wait_until

    return wait_until(pred, timeout, what, interval=0.05)


@pytest.fixture
def pair(tmp_path: Path, signing_key: KeyPair, postgres_url: str) -> Iterator[Pair]:
    p = Pair(tmp_path, signing_key, postgres_url)
    yield p
    p.close()


@pytest.mark.postgres
def test_a_follower_hands_rollout_actions_to_the_tick_holder_and_shows_its_result(
    pair: Pair, signing_key: KeyPair
) -> None:
    for i in range(3):
        pair.device(f"pi-{i}", profile="host")
    _wait(lambda: len(pair.b.list_devices(online=True)) == 3, "devices at fleet-b")
    assert pair.a.cluster.leads and not pair.b.cluster.leads
    data, _ = make_bundle(signing_key, version="2.0.0", release=2, profiles=("host",))
    pair.a.upload_bundle(data)
    pair.b.upload_bundle(data)
    created = pair.b.create_rollout(RolloutRequest(bundle="iris@2.0.0", stages=[100]))
    rid = created["rollout_id"]
    started = pair.b.start_rollout(rid, actor="api:operator")  # carried out by fleet-a
    assert started["state"] in ("running", "succeeded")
    _wait(lambda: pair.b.rollout_status(rid)["state"] == "succeeded", "the rollout to finish")
    with pytest.raises(Exception, match=r"running|paus|state") as err:
        pair.b.pause_rollout(rid)  # the holder's refusal comes back to the caller
    assert getattr(err.value, "status_code", None) == 409
    actions = [a["action"] for a in pair.a.audit(target=f"rollout:{rid}")]
    assert "rollout.start" in actions
    status = _wait(lambda: (s := pair.b.cluster.status())["leader"] and s, "the holder's beat")
    assert status["leader"] == "fleet-a" and {p["process_id"] for p in status["processes"]} == {
        "fleet-a",
        "fleet-b",
    }


@pytest.mark.postgres
def test_a_takeover_resends_an_unanswered_deploy_under_the_same_command_id(
    pair: Pair, signing_key: KeyPair
) -> None:
    mute = pair.device("pi-mute", profile="host", silent=True)
    _wait(lambda: len(pair.b.list_devices(online=True)) == 1, "the device at fleet-b")
    data, _ = make_bundle(signing_key, version="2.0.0", release=2, profiles=("host",))
    pair.a.upload_bundle(data)
    pair.b.upload_bundle(data)
    rid = pair.a.create_rollout(RolloutRequest(bundle="iris@2.0.0", stages=[100]))["rollout_id"]
    pair.a.start_rollout(rid)
    _wait(lambda: len(mute.commands) >= 1, "the first deploy")
    assert pair.a.bridge is not None and pair.b.bridge is not None
    assert pair.a.bridge.statuses and not pair.b.bridge.statuses  # a follower takes none
    pair.a.stop()  # the holder goes; fleet-b takes the tick and resumes from the registry
    _wait(lambda: pair.b.cluster.leads, "fleet-b to take the tick")
    assert pair.b.bridge.statuses
    _wait(lambda: len(mute.commands) >= 2, "the deploy resent after the takeover")
    ids = {c.command_id for c in mute.commands}
    assert ids == {f"{rid}:pi-mute:deploy:1"}  # one command, sent twice: installed at most once


@pytest.mark.postgres
def test_sketch_reports_taken_by_two_processes_are_merged_once_each(postgres_url: str) -> None:
    """Every report reaches both processes (as without shared subscriptions) and they merge
    concurrently: each (device, window, seq) counts once and the window holds their sum."""
    import numpy as np

    from fleet_server.drift import DriftConfig, DriftEngine
    from fleet_server.drift_store_pg import PgDriftStore
    from fleet_server.repository_pg import PostgresRepository
    from tests.fleet_server.test_drift import report, sketch_rows

    repos = [PostgresRepository(postgres_url, pool_size=2) for _ in range(2)]
    engines = [DriftEngine(PgDriftStore(r.pool), DriftConfig(), lambda a: None) for r in repos]
    rng = np.random.default_rng(7)
    reports = [report(sketch_rows(rng, 10 + i), device=f"d{i % 3}", seq=i // 3) for i in range(24)]
    merged: list[list[bool]] = [[], []]

    def take(n: int) -> None:
        for r in reports:
            merged[n].append(engines[n].ingest(r))

    try:
        threads = [threading.Thread(target=take, args=(n,)) for n in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [a + b for a, b in zip(*merged, strict=True)] == [1] * len(reports)
        assert engines[0].ingest(reports[0]) is False  # a redelivery later: nothing
        rows = repos[0]._all('select "rows", devices, revision from drift_windows')
        assert len(rows) == 1
        assert rows[0]["rows"] == sum(r.sketches.rows for r in reports)
        assert rows[0]["revision"] == len(reports)
        keys = repos[0]._all("select count(*) as n from drift_reports")
        assert keys[0]["n"] == len(reports)
    finally:
        for r in repos:
            r.close()


@pytest.mark.postgres
def test_a_device_approved_or_revoked_through_one_process_is_so_on_the_other(pair: Pair) -> None:
    pair.device("pi-new", profile="host", enrol_token=None)  # waits for an operator
    _wait(lambda: pair.b.devices.known("pi-new") and pair.a.devices.known("pi-new"), "enrolment")
    assert pair.b.devices.approved("pi-new") is None
    pair.a.approve_device("pi-new", actor="cli")
    _wait(lambda: pair.b.devices.approved("pi-new") is not None, "the approval at fleet-b")
    pair.a.revoke_device("pi-new", actor="cli")
    _wait(lambda: not pair.b.devices.known("pi-new"), "the revocation at fleet-b")
