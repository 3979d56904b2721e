"""FleetService beyond the API: telemetry gates fed by real ingest, restart, dashboard helpers."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from fleet_server.service import FleetService, RolloutRequest
from protocol import KeyPair, build_reference
from protocol.messages import MetricsReport, ModelRef, SketchReport
from protocol.transport import MemoryBroker
from tests.fleet_server.test_api import Fleet
from tests.support.bundles import make_bundle, trained

V1 = ModelRef(name="iris", version="1.0.0", release=1)


@pytest.fixture(scope="module")
def bundle_v1(signing_key: KeyPair) -> bytes:
    return make_bundle(signing_key)[0]


def _soaking_rollout(f: Fleet, bundle: bytes, **kw: object) -> str:
    f.service.upload_bundle(bundle)
    for i in range(4):
        f.device(f"d{i}")
    req = RolloutRequest(
        bundle="iris@1.0.0", stages=[50, 100], soak_s=3600, success_threshold=1.0, **kw
    )  # type: ignore[arg-type]
    rid = f.service.create_rollout(req)["rollout_id"]
    f.service.start_rollout(rid)
    f.service.tick()
    st = f.service.rollout_status(rid)
    assert st["state"] == "running" and st["stages"][0]["installed"] == 2  # soaking
    return str(rid)


def test_p95_latency_over_the_gate_reported_by_devices_halts_the_rollout(
    tmp_path: Path, signing_key: KeyPair, bundle_v1: bytes
) -> None:
    f = Fleet(tmp_path, signing_key)
    rid = _soaking_rollout(f, bundle_v1, max_p95_ms=5.0)
    now = datetime.now(timezone.utc)
    for seq, dev in enumerate(f.service.rollout_status(rid)["stages"][0]["device_ids"]):
        m = MetricsReport(
            device_id=dev,
            seq=seq,
            window_start=now,
            window_end=now,
            model=V1,
            requests=50,
            latency={"count": 50, "p95_ms": 42.0},
        )
        f.devices[dev].publish(f"edgefleet/devices/{dev}/telemetry/metrics", m.to_json())
    f.service.tick()
    st = f.service.rollout_status(rid)
    assert st["state"] == "halted"
    assert "p95 latency 42.00 ms is over the budget of 5 ms" in st["reason"]
    assert st["counts"].get("rolled_back") == 2  # the two canaries went back


def test_input_drift_on_the_new_version_halts_a_drift_gated_rollout(
    tmp_path: Path, signing_key: KeyPair, bundle_v1: bytes
) -> None:
    f = Fleet(tmp_path, signing_key)
    if f.service.drift is None:
        pytest.skip("fleet_server.drift is not installed")
    f.service.drift.config = type(f.service.drift.config)(min_rows=50)
    f.service.drift_every_s = 0.0
    rid = _soaking_rollout(f, bundle_v1, halt_on_drift=True)
    tm = trained("iris-logreg")
    shifted = build_reference(tm.X + np.float32(3.0), tm.input_schema)
    now = datetime.now(timezone.utc)
    dev = f.service.rollout_status(rid)["stages"][0]["device_ids"][0]
    report = SketchReport(
        device_id=dev, model=V1, window_start=now, window_end=now, seq=1, sketches=shifted
    )
    f.devices[dev].publish(f"edgefleet/devices/{dev}/telemetry/sketch", report.to_json())
    assert f.service.sketches_merged == 1
    f.service.tick()  # evaluates drift, then the gate sees it
    f.service.tick()
    st = f.service.rollout_status(rid)
    assert st["state"] == "halted"
    assert "drifted" in st["reason"]
    assert f.service.drift_results(model="iris")


def test_a_restarted_service_resumes_the_rollout_from_the_registry(
    tmp_path: Path, signing_key: KeyPair, bundle_v1: bytes
) -> None:
    f = Fleet(tmp_path, signing_key)
    f.service.upload_bundle(bundle_v1)
    for i in range(4):
        f.device(f"d{i}")
    rid = f.service.create_rollout(
        RolloutRequest(bundle="iris@1.0.0", stages=[50, 100], soak_s=3600)
    )["rollout_id"]
    f.service.start_rollout(rid)
    f.service.tick()
    f.service.flush()
    before = f.service.rollout_status(rid)
    f.service.repo.close()
    again = FleetService(f.service.config, transport=MemoryBroker().client("server2"))
    after = again.rollout_status(rid)
    assert after["state"] == "running"
    assert after["stages"] == before["stages"]
    assert again.list_devices()[0]["device_id"] == "d0"
    again.pause_rollout(rid, actor="api:operator")
    assert again.rollout_status(rid)["state"] == "paused"
    again.repo.close()


def test_dashboard_helpers_overview_users_and_device_detail(
    tmp_path: Path, signing_key: KeyPair, bundle_v1: bytes
) -> None:
    f = Fleet(tmp_path, signing_key)
    f.device("pi-1", profile="raspberry-pi-4")
    f.device("h-1", model=V1)
    f.service.add_user("ana", "s3cret-pass", "operator")
    assert f.service.authenticate_user("ana", "s3cret-pass") == "operator"
    assert f.service.authenticate_user("ana", "wrong") is None
    assert f.service.authenticate_user("bob", "s3cret-pass") is None
    ov = f.service.overview()
    assert ov["devices"] == 2
    assert ov["by"]["profile"] == {"raspberry-pi-4": 1, "host": 1}
    assert ov["by"]["online"] == {"online": 2}
    detail = f.service.get_device("h-1")
    assert [h["version"] for h in detail["history"]] == ["1.0.0"]
    assert detail["events"][0]["message"] == "h-1 online"
    f.service.repo.close()


def test_a_hung_device_times_out_is_retried_and_then_halts_the_rollout(
    tmp_path: Path, signing_key: KeyPair, bundle_v1: bytes
) -> None:
    clock = [time.time()]
    f = Fleet(tmp_path, signing_key)
    f.service.clock = lambda: clock[0]
    f.service.upload_bundle(bundle_v1)
    f.device("hung", silent=True)
    f.device("ok")
    req = RolloutRequest(
        bundle="iris@1.0.0",
        stages=[100],
        device_timeout_s=60,
        max_retries=1,
        failure_threshold=0.4,
        min_devices=2,
    )
    rid = f.service.create_rollout(req)["rollout_id"]
    f.service.start_rollout(rid)
    assert len(f.devices["hung"].commands) == 1
    clock[0] += 61
    f.service.tick()  # timed out → retried
    assert len(f.devices["hung"].commands) == 2
    assert f.devices["hung"].commands[1].command_id.endswith(":deploy:2")
    assert f.service.rollout_status(rid)["state"] == "running"
    clock[0] += 61
    f.service.tick()  # out of retries: counts as failed, 1 of 2 > 40 %
    f.service.tick()
    st = f.service.rollout_status(rid)
    assert st["state"] == "halted"
    by_id = {d["device_id"]: d for d in st["devices"]}
    assert by_id["hung"]["state"] == "timed_out" and by_id["hung"]["attempts"] == 2
    assert by_id["ok"]["state"] == "rolled_back"
    f.service.repo.close()
