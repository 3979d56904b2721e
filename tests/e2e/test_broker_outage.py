"""Broker outage: Mosquitto is stopped for 60 s while traffic runs.

Three real agent processes (2 s telemetry windows) answer client threads through their
local APIs the whole time: every request must get a 200. A deploy is in flight when the
broker goes down, so command statuses are produced during the outage too. After the
broker is back, the real fleet server (its bridge, its service) must have every status,
metrics and sketch window each agent produced up to a snapshot of the agent's own
persisted sequence counters: counted by (device, kind, seq), 0 lost.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from fleet_server.service import RolloutRequest
from protocol import KeyPair
from tests.e2e.conftest import Release
from tests.e2e.support import (
    AgentProcess,
    BrokerRecorder,
    CountingSink,
    Traffic,
    agent_counters,
    install_offline,
    make_fleet,
    wait_until,
    write_agent_config,
)

pytestmark = [pytest.mark.slow, pytest.mark.mosquitto]

AGENTS = 3
OUTAGE_S = 60.0
KINDS = ("status", "metrics", "sketch")


def test_sixty_second_broker_outage_loses_no_request_and_no_telemetry(
    tmp_path: Path,
    mosquitto: Any,
    signing_key: KeyPair,
    key_files: dict[str, Path],
    iris_v1: Release,
    iris_v2: Release,
) -> None:
    service = make_fleet(tmp_path, mosquitto.url, bundle_keys=[key_files["signing"]])
    counting = CountingSink(service)
    service.bridge.sink = counting
    recorder = BrokerRecorder(mosquitto.url).start()
    ids = [f"outage-{i}" for i in range(AGENTS)]
    configs = {
        d: write_agent_config(
            tmp_path / d,
            device_id=d,
            broker_url=mosquitto.url,
            bundle_keys=[key_files["signing"]],
            window_s=2.0,
        )
        for d in ids
    }
    install_offline(list(configs.values()), iris_v1.write(tmp_path))
    agents = [AgentProcess(c).start() for c in configs.values()]
    traffic = Traffic(agents)
    try:
        for a in agents:
            a.wait_api(ready=True, timeout=90)
        wait_until(
            lambda: set(ids) <= {d["device_id"] for d in service.list_devices(online=True)},
            60,
            "every agent to come online",
        )
        traffic.start()
        time.sleep(5)  # windows flow normally first

        # A deploy in flight when the broker dies: its statuses are produced offline.
        info = service.upload_bundle(iris_v2.data)
        rid = service.create_rollout(RolloutRequest(bundle=info["sha256"], stages=[100.0]))[
            "rollout_id"
        ]
        service.start_rollout(rid)
        wait_until(
            lambda: {d for d, _ in recorder.by_kind("status")} >= set(ids),
            30,
            "every agent to acknowledge the deploy",
            interval=0.02,
        )
        mosquitto.stop()
        down = time.time()
        time.sleep(OUTAGE_S)
        mosquitto.start()
        up = time.time()

        def succeeded() -> bool:
            return bool(service.rollout_status(rid)["state"] == "succeeded")

        wait_until(succeeded, 90, "the rollout to finish after the broker came back")
        time.sleep(4)  # a few windows after the reconnect
        traffic.stop()

        # Inference was never interrupted.
        assert traffic.failures() == [], traffic.failures()[:5]
        assert traffic.count(down, up) > OUTAGE_S * 5, "too little traffic during the outage"
        for a in agents:
            assert (a.model() or {}).get("version") == "2.0.0"

        # Every window and status each agent produced reached the server.
        expected: dict[tuple[str, str], set[int]] = {}
        for d, cfg in configs.items():
            counters = agent_counters(cfg.parent / "data")
            for kind in KINDS:
                assert kind in counters, f"{d}: no {kind} counter in {counters}"
                expected[(d, kind)] = set(range(counters[kind] + 1))
        assert all(len(expected[(d, "sketch")]) >= OUTAGE_S / 2 for d in ids), expected

        def missing() -> dict[tuple[str, str], list[int]]:
            return {
                key: sorted(want - counting.seqs(*key))[:10]
                for key, want in expected.items()
                if want - counting.seqs(*key)
            }

        try:
            wait_until(lambda: not missing(), 60, "the server to have every window")
        except AssertionError:
            raise AssertionError(
                f"windows lost (device, kind) → first missing seqs: {missing()}"
            ) from None
        assert counting.merged_windows == 0, "the outbox merged windows although it had room"
        # Store and forward really happened: windows closed while the broker was down
        # reached the server after it came back (2 kinds × one per 2 s × 60 s per agent).
        forwarded = {d: counting.forwarded(d, (down + 3, up - 3), up) for d in ids}
        assert all(n >= OUTAGE_S / 2 for n in forwarded.values()), forwarded
        produced = sum(len(v) for v in expected.values())
        print(
            f"\n{traffic.count()} requests answered 200 ({traffic.count(down, up)} during the "
            f"{OUTAGE_S:.0f}s outage); {produced} status/metrics/sketch messages produced, 0 lost; "
            f"windows closed during the outage and forwarded after it: {forwarded}"
        )
        # What the service persisted agrees for metrics (unique per device and seq).
        for d in ids:
            rows = service.repo.device_metrics(d, limit=100_000)
            assert expected[(d, "metrics")] <= {r["seq"] for r in rows}
    finally:
        traffic.stop()
        for a in agents:
            a.close()
        recorder.close()
        service.stop()
