"""Release channels end to end: real agent processes on a real Mosquitto, a real fleet server.

2 devices follow ``beta`` and 3 follow ``stable`` (``[agent] channel`` in their config, sent
in their state message); every device starts at iris 1.0.0 (installed offline), and both
channels are promoted to 1.0.0 first (nothing to send: the devices run it).

* a promotion of 2.0.0 to beta updates only the beta devices;
* a promotion to stable is refused (naming ``requires``) before the beta rollout exists and
  while it is still running, then goes through once it has succeeded;
* a sixth device that joins stable later, from an old image (1.0.0), gets 2.0.0;
* a demotion of stable sends signed rollbacks: every stable device runs 1.0.0 again, the
  beta devices keep 2.0.0.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fleet_server.errors import PromotionRefused
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
from tests.support.keys import COMMAND_KEY

pytestmark = [pytest.mark.slow, pytest.mark.mosquitto]

BETA = ["beta-0", "beta-1"]
STABLE = ["stable-0", "stable-1", "stable-2"]
LATE = "stable-3"
V1 = {"name": "iris", "version": "1.0.0", "release": 1}
V2 = {"name": "iris", "version": "2.0.0", "release": 2}


def test_channels_promote_refuse_late_join_and_demote_with_real_agents(
    tmp_path: Path,
    mosquitto: Any,
    signing_key: KeyPair,
    key_files: dict[str, Path],
    iris_v1: Release,
    iris_v2: Release,
) -> None:
    service = make_fleet(tmp_path, mosquitto.url, bundle_keys=[key_files["signing"]])
    recorder = BrokerRecorder(mosquitto.url).start()

    def config(device_id: str, channel: str) -> Path:
        path = write_agent_config(
            tmp_path / device_id,
            device_id=device_id,
            broker_url=mosquitto.url,
            bundle_keys=[key_files["signing"]],
            window_s=30.0,
        )
        text = path.read_text().replace(
            'profile = "host"\n', f'profile = "host"\nchannel = "{channel}"\n'
        )
        path.write_text(text)
        return path

    configs = {d: config(d, "beta") for d in BETA} | {d: config(d, "stable") for d in STABLE}
    configs[LATE] = config(LATE, "stable")
    install_offline(list(configs.values()), iris_v1.write(tmp_path))
    service.upload_bundle(iris_v1.data)
    agents = {d: AgentProcess(configs[d]).start() for d in BETA + STABLE}
    ch = service.channels
    try:
        for a in agents.values():
            a.wait_api(ready=True, timeout=120)
        online = lambda: {d["device_id"] for d in service.list_devices(online=True)}  # noqa: E731
        wait_until(lambda: set(BETA + STABLE) <= online(), 60, "every device to come online")
        v2 = service.upload_bundle(iris_v2.data)["sha256"]
        ch.define("iris", "stable", {"hold_s": 0}, actor="e2e")
        following = {d["device_id"] for c in ch.overview("iris") for d in c["devices"]}
        assert following == set(BETA + STABLE)

        # both channels start at 1.0.0, which every device already runs
        for channel in ("beta", "stable"):
            rid = ch.promote("iris@1.0.0", channel, actor="e2e", reason="baseline")["rollout_id"]
            wait_until(
                lambda rid=rid: service.rollout_status(rid)["state"] == "succeeded",
                60,
                f"the {channel} baseline",
            )

        # 2.0.0 to stable before any beta rollout of it: refused, naming the condition
        with pytest.raises(PromotionRefused) as refused:
            ch.promote("iris@2.0.0", "stable", actor="e2e", reason="too early")
        assert "requires" in str(refused.value)

        # to beta: a rollout to the two beta devices only
        out = ch.promote("iris@2.0.0", "beta", actor="e2e", reason="release candidate")
        beta_rollout = out["rollout_id"]
        service.pause_rollout(beta_rollout, actor="e2e")  # hold it "still running"
        plan = service.rollout_status(beta_rollout)
        assert sorted(d["device_id"] for d in plan["devices"]) == BETA
        with pytest.raises(PromotionRefused) as refused:
            ch.promote("iris@2.0.0", "stable", actor="e2e", reason="still too early")
        assert "no rollout of it on beta has succeeded" in str(refused.value)
        service.resume_rollout(beta_rollout, actor="e2e")
        wait_until(
            lambda: service.rollout_status(beta_rollout)["state"] == "succeeded",
            120,
            "the beta rollout to succeed",
        )
        for d in BETA:
            wait_until(lambda d=d: agents[d].model() == V2, 60, f"{d} to run 2.0.0")
        for d in STABLE:
            assert agents[d].model() == V1, f"{d} (stable) changed on a beta promotion"

        # to stable: now allowed, reaches the three stable devices
        out = ch.promote("iris@2.0.0", "stable", actor="e2e", reason="beta succeeded")
        stable_rollout = out["rollout_id"]
        assert (
            sorted(d["device_id"] for d in service.rollout_status(stable_rollout)["devices"])
            == STABLE
        )
        wait_until(
            lambda: service.rollout_status(stable_rollout)["state"] == "succeeded",
            120,
            "the stable rollout to succeed",
        )

        # a sixth device joins stable later, from an old image
        agents[LATE] = AgentProcess(configs[LATE]).start()
        agents[LATE].wait_api(ready=True, timeout=120)
        wait_until(lambda: agents[LATE].model() == V2, 120, "the late joiner to get 2.0.0")
        delivered = [
            a
            for a in service.audit(target="channel:iris/stable")
            if a["action"] == "channel.deliver"
        ]
        assert delivered and LATE in delivered[0]["reason"]

        # demote stable: signed rollbacks bring every stable device back to 1.0.0
        out = ch.demote("iris", "stable", actor="e2e", reason="field accuracy dropped")
        assert out["current"]["version"] == "1.0.0" and stable_rollout in out["rolled_back"]
        for d in [*STABLE, LATE]:
            wait_until(lambda d=d: agents[d].model() == V1, 120, f"{d} to roll back to 1.0.0")
        for d in BETA:
            assert agents[d].model() == V2, f"{d} (beta) changed on a stable demotion"
        for a in agents.values():
            assert a.predict().status_code == 200

        # on the wire: the beta devices got no rollback, the stable ones got signed ones
        rollbacks: dict[str, list[Command]] = {}
        for device, m in recorder.by_kind("cmd"):
            if json.loads(m.payload).get("kind") == "rollback":
                rollbacks.setdefault(device, []).append(Command.model_validate_json(m.payload))
        assert not set(rollbacks) & set(BETA)
        assert {*STABLE, LATE} <= set(rollbacks)
        for cmds in rollbacks.values():
            for cmd in cmds:
                assert recorder.verify_command(cmd, COMMAND_KEY) == COMMAND_KEY.key_id
        lineage = ch.lineage(v2)["lineage"]
        assert [(x["channel"], x["action"]) for x in lineage] == [
            ("beta", "promote"),
            ("stable", "promote"),
        ]
        assert lineage[1]["reason"] == "beta succeeded" and lineage[1]["actor"] == "e2e"
    finally:
        for a in agents.values():
            a.close()
        recorder.close()
        service.stop()
