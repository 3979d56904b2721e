"""The measures wired into FleetService: alert topic, hook, events, Prometheus, rollout inputs.

Devices are born through :class:`tests.fleet_server.fleetkit.SimDevice` on the in-memory
broker; their telemetry goes to the service's bridge sink (``on_metrics``/``on_sketch``),
which the bridge tests cover from the wire.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fleet_server.rollout_engine import Rollout, RolloutSpec
from protocol import KeyPair, TrustStore
from protocol.messages import Alert, LatencySummary, MetricsReport, ModelRef, SketchReport, decode
from protocol.sketches import SketchBuilder
from protocol.topics import Topics
from protocol.transport import MemoryBroker
from tests.fleet_server.fleetkit import SimDevice, make_config

REF = ModelRef(name="iris", version="1.0.0", release=1)


@pytest.fixture()
def fleet(tmp_path: Path, signing_key: KeyPair) -> Iterator[dict[str, Any]]:
    from fleet_server.service import FleetService
    from tests.support.bundles import make_bundle

    hook_out = tmp_path / "hook.jsonl"
    script = f"import sys; open({str(hook_out)!r}, 'a').write(sys.stdin.read() + '\\n')"
    cfg = make_config(tmp_path, signing_key)
    cfg = cfg.model_copy(
        update={
            "hooks": cfg.hooks.model_copy(
                update={"drift_command": f'{sys.executable} -c "{script}"'}
            ),
            "health": {"min_requests": 5, "p95_ms": 20.0},
        }
    )
    broker = MemoryBroker()
    service = FleetService(cfg, transport=broker.client("server"))
    service.bridge.start()
    service.transport.connect()
    alerts: list[Alert] = []
    watcher = broker.client("watcher")
    watcher.set_handler(lambda topic, payload: alerts.append(decode(Alert, payload)))
    watcher.connect()
    watcher.subscribe(Topics().alerts())
    service.upload_bundle(make_bundle(signing_key, version="1.0.0")[0])
    trust = TrustStore.from_keys([signing_key.public])
    devices = []
    for i, tag in enumerate(["site-a", "site-a", "site-b"]):
        d = SimDevice(f"d{i}", broker.client(f"d{i}"), trust, tags=(tag,), model=REF).start()
        devices.append(d)
    try:
        yield {"service": service, "alerts": alerts, "hook": hook_out, "devices": devices}
    finally:
        service.repo.close()


def metrics(device: str, seq: int, p95: float) -> MetricsReport:
    end = datetime.fromtimestamp(1_800_000_000 + seq * 2, timezone.utc)
    return MetricsReport(
        device_id=device,
        seq=seq,
        window_start=end,
        window_end=end,
        model=REF,
        requests=50,
        latency=LatencySummary(count=50, p50_ms=p95 / 2, p95_ms=p95),
    )


def test_a_slow_device_alert_reaches_topic_hook_events_and_prometheus_then_resolves(
    fleet: dict[str, Any],
) -> None:
    service = fleet["service"]
    for seq in (1, 2):
        for dev, p95 in (("d0", 80.0), ("d1", 2.0), ("d2", 2.5)):
            service.on_metrics(metrics(dev, seq, p95))
        service.tick()
    health = [a for a in fleet["alerts"] if a.kind == "health"]
    assert [(a.details["subject"], a.details["state"]) for a in health] == [("d0", "firing")]
    assert "p95 latency 80.0 ms on device d0" in health[0].message
    assert [a["subject"] for a in service.measures.firing()] == ["d0"]
    body, _ = service.exporter.render()
    assert b'edgefleet_health_alert{rule="latency",scope="device",subject="d0"} 1.0' in body
    assert any("d0" in a["message"] for a in service.overview()["alerts"])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "d0" not in (
        fleet["hook"].read_text() if fleet["hook"].exists() else ""
    ):
        time.sleep(0.05)
    hooked = [json.loads(x) for x in fleet["hook"].read_text().splitlines() if x.strip()]
    assert any(h.get("kind") == "health" and h["subject"] == "d0" for h in hooked)
    for seq in (3, 4):
        for dev in ("d0", "d1", "d2"):
            service.on_metrics(metrics(dev, seq, 2.0))
        service.tick()
    states = [a.details["state"] for a in fleet["alerts"] if a.kind == "health"]
    assert states == ["firing", "resolved"] and service.measures.firing() == []


def _sketch(device: str, shift: np.ndarray) -> SketchReport:
    from tests.support.bundles import trained

    tm = trained("iris-logreg")
    b = SketchBuilder(tm.input_schema)
    for _ in range(3):
        b.update_rows(tm.X + shift)
    now = datetime.now(timezone.utc)
    return SketchReport(
        device_id=device, model=REF, window_start=now, window_end=now, seq=1, sketches=b.build()
    )


def test_shift_on_one_device_of_two_reads_as_that_device_not_the_whole_fleet(
    fleet: dict[str, Any],
) -> None:
    service = fleet["service"]
    service.on_sketch(_sketch("d0", np.array([0.0, 0.0, 2.0, 0.8])))
    service.on_sketch(_sketch("d1", np.zeros(4)))
    service.evaluate_drift("iris", "1.0.0")
    service.measures.tick(time.time(), drift_due=True)
    drift = [a for a in fleet["alerts"] if a.kind == "drift"]
    assert len(drift) == 1, [a.message for a in drift]
    msg = drift[0].message
    assert "on 1 of 2 devices: d0" in msg and "not drifted: d1" in msg
    assert drift[0].details["scope"]["drifted_devices"].keys() == {"d0"}
    rows = service.measures.drift_by("device", "iris", "1.0.0")
    assert [(r["subject"], r["dataset_drift"]) for r in rows] == [("d0", True), ("d1", False)]


def test_rollout_inputs_measure_the_rollouts_own_devices(fleet: dict[str, Any]) -> None:
    service = fleet["service"]
    sha = service.list_bundles()[0]["sha256"]
    for dev, p95 in (("d0", 30.0), ("d1", 25.0), ("d2", 1.0)):
        service.on_metrics(metrics(dev, 1, p95))
    service.on_sketch(_sketch("d0", np.array([0.0, 0.0, 2.0, 0.8])))
    service.on_sketch(_sketch("d1", np.array([0.0, 0.0, 2.0, 0.8])))
    service.on_sketch(_sketch("d2", np.zeros(4)))
    spec = RolloutSpec(bundle_sha256=sha, hold_on_profile_budget=True, hold_on_own_drift=True)
    r = Rollout.plan("r-own", spec, ["d0", "d1"], 0.0)
    for d in r.devices.values():
        d.state = "installed"
    t = service.measures.extend(r, None, time.time())
    assert t is not None
    assert t.profile_p95 == (("host", 27.5, 10.0, 2),)  # median of the two, host budget 10 ms
    assert t.own_drift and t.own_drifted_devices == ("d0", "d1")
    r2 = Rollout.plan("r-steady", spec, ["d2"], 0.0)
    r2.devices["d2"].state = "installed"
    t2 = service.measures.extend(r2, None, time.time())
    assert t2 is not None and not t2.own_drift and t2.profile_p95 == (("host", 1.0, 10.0, 1),)


def test_a_benchmark_result_nobody_asked_for_is_not_a_calibration_sample(
    fleet: dict[str, Any],
) -> None:
    from protocol.messages import CommandStatus

    service = fleet["service"]
    forged = {"p50_ms": 0.001, "estimated": False, "model": {"name": "iris", "version": "1.0.0"}}
    service.on_status(
        CommandStatus(device_id="d0", command_id="fb1-d0", state="done", result=forged)
    )
    assert service.measures.bench_samples() == []
    service.measures.bench_store.issue("fb2-d1", "d1", service.list_bundles()[0]["sha256"], 0.0)
    service.on_status(  # issued to d1, answered by d0
        CommandStatus(device_id="d0", command_id="fb2-d1", state="done", result=forged)
    )
    assert service.measures.bench_samples() == []
    service.on_status(
        CommandStatus(device_id="d1", command_id="fb2-d1", state="done", result=forged)
    )
    (sample,) = service.measures.bench_samples()
    assert sample["device_id"] == "d1" and sample["profile"] == "host"
