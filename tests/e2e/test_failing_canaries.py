"""Failing canaries: 3 of the 10 stage-1 devices fail their smoke test; the rollout halts at
stage 1, no device outside stage 1 ever receives the version, and the canaries that had
installed it are rolled back with signed rollback commands.

13 real agent processes on a real Mosquitto, a real fleet server, and a wildcard recorder
that keeps every message of the broker, so "never received" is checked on the wire.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fleet_server.service import RolloutRequest
from protocol import KeyPair
from protocol.messages import Command
from tests.e2e.conftest import Release
from tests.e2e.support import (
    AgentProcess,
    BrokerRecorder,
    install_offline,
    make_fleet,
    wait_until,
    write_agent_config,
)

pytestmark = [pytest.mark.slow, pytest.mark.mosquitto]

CANARIES = 10
OTHERS = 3
FAILING = 3  # 30 % of the canaries


def test_rollout_halts_at_stage_one_when_30_percent_of_canaries_fail(
    tmp_path: Path,
    mosquitto: Any,
    command_key: KeyPair,
    key_files: dict[str, Path],
    iris_v1: Release,
    iris_v2: Release,
) -> None:
    service = make_fleet(tmp_path, mosquitto.url, bundle_keys=[key_files["signing"]])
    recorder = BrokerRecorder(mosquitto.url).start()
    ids = [f"edge-{i:02d}" for i in range(CANARIES + OTHERS)]

    def config(device_id: str, fail: bool = False) -> Path:
        return write_agent_config(
            tmp_path / device_id,
            device_id=device_id,
            broker_url=mosquitto.url,
            bundle_keys=[key_files["signing"]],
            fail_smoke_test=fail,
            window_s=30.0,
        )

    configs = {d: config(d) for d in ids}
    install_offline(list(configs.values()), iris_v1.write(tmp_path))
    agents = {d: AgentProcess(c).start() for d, c in configs.items()}
    try:
        for a in agents.values():
            a.wait_api(ready=True, timeout=120)
        online = lambda: {d["device_id"] for d in service.list_devices(online=True)}  # noqa: E731
        wait_until(lambda: set(ids) <= online(), 60, "every device to come online")

        info = service.upload_bundle(iris_v2.data)
        plan = service.create_rollout(
            RolloutRequest(
                bundle=info["sha256"],
                stages=[CANARIES, CANARIES + OTHERS],
                stage_unit="count",
                failure_threshold=0.2,
                success_threshold=0.8,
                min_devices=CANARIES,
                rollback_on_halt=True,
                device_timeout_s=120,
            )
        )
        rid = plan["rollout_id"]
        canaries = plan["stages"][0]["device_ids"]
        outside = plan["stages"][1]["device_ids"]
        assert len(canaries) == CANARIES and len(outside) == OTHERS
        failing = sorted(canaries)[:FAILING]
        # Make 30 % of the canaries fail: restart them with the smoke-test fault injected.
        for d in failing:
            agents[d].close()
            agents[d] = AgentProcess(config(d, fail=True)).start()
        for d in failing:
            agents[d].wait_api(ready=True, timeout=60)
        wait_until(lambda: set(failing) <= online(), 60, "the failing canaries to come back")

        service.start_rollout(rid)

        def settled() -> dict[str, Any] | None:
            st = service.rollout_status(rid)
            devs = {d["device_id"]: d for d in st["devices"]}
            done = all(devs[d]["state"] in ("rejected", "rolled_back") for d in canaries)
            return st if st["state"] == "halted" and done else None

        st = wait_until(settled, 120, "the halt and the rollbacks of the installed canaries")
        devs = {d["device_id"]: d for d in st["devices"]}
        assert st["stages"][0]["state"] == "failed"
        assert st["stages"][1]["state"] == "pending" and st["stages"][1]["started_at"] is None
        for d in failing:
            assert devs[d]["state"] == "rejected"
            assert "smoke_test_failed" in (devs[d]["reason"] or "")
        installed = [d for d in canaries if d not in failing]
        for d in installed:
            assert devs[d]["state"] == "rolled_back"
        for d in outside:
            assert devs[d]["state"] == "queued"

        # On the wire: nothing for the devices outside stage 1, ever.
        to_device: dict[str, list[tuple[str, Any]]] = {d: [] for d in ids}
        for kind in ("cmd", "artifact"):
            for device, m in recorder.by_kind(kind):
                to_device[device].append((kind, m))
        for d in outside:
            assert to_device[d] == [], f"{d} (outside stage 1) received {to_device[d][:2]}"
        # Every canary that installed got a rollback, signed by the fleet's command key.
        for d in installed:
            rollbacks = [
                Command.model_validate_json(m.payload)
                for kind, m in to_device[d]
                if kind == "cmd" and json.loads(m.payload).get("kind") == "rollback"
            ]
            assert len(rollbacks) >= 1, f"{d} installed v2 but got no rollback"
            for cmd in rollbacks:
                assert recorder.verify_command(cmd, command_key) == command_key.key_id
        # And every device serves v1 again (or still), answering predictions.
        for d, a in agents.items():
            assert a.model() == {"name": "iris", "version": "1.0.0", "release": 1}, d
            assert a.predict().status_code == 200
    finally:
        for a in agents.values():
            a.close()
        recorder.close()
        service.stop()
