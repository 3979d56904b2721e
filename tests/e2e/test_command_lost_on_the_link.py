"""A deploy lost on a dying link reaches the agent when it comes back.

The agent reads its command topic at QoS 0: no broker queues a command for it. Here a
real ``edgefleet agent run`` talks to Mosquitto through a link that starts throwing
everything away while the broker still counts the agent as connected; the rollout's deploy
goes out and dies on that link. When the link is cut, the agent reconnects and publishes
its birth, and the fleet server sends the unanswered deploy again under the same command
id. The rollout succeeds long before ``device_timeout_s`` (300 s) would have retried it.
"""

from __future__ import annotations

import time
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
    wait_online,
    wait_until,
    write_agent_config,
)
from tests.support.link_cut import CuttableLink

pytestmark = [pytest.mark.slow, pytest.mark.mosquitto]


def test_a_deploy_lost_on_a_dying_link_is_sent_again_when_the_agent_is_back(
    tmp_path: Path,
    mosquitto: Any,
    signing_key: KeyPair,
    key_files: dict[str, Path],
    iris_v1: Release,
    iris_v2: Release,
) -> None:
    service = make_fleet(tmp_path, mosquitto.url, bundle_keys=[key_files["signing"]])
    recorder = BrokerRecorder(mosquitto.url).start()
    link = CuttableLink("127.0.0.1", mosquitto.port)
    config = write_agent_config(
        tmp_path / "pi-link",
        device_id="pi-link",
        broker_url=link.url,
        bundle_keys=[key_files["signing"]],
    )
    install_offline([config], iris_v1.write(tmp_path))
    agent = AgentProcess(config).start()
    try:
        agent.wait_api(ready=True, timeout=90)
        wait_online(service, ["pi-link"])
        info = service.upload_bundle(iris_v2.data)

        link.drop()  # the agent hears nothing from here, and the broker does not know
        rid = service.create_rollout(RolloutRequest(bundle=info["sha256"], stages=[100.0]))[
            "rollout_id"
        ]
        service.start_rollout(rid)
        wait_until(lambda: recorder.by_kind("cmd"), 30, "the deploy on the broker")
        wait_until(lambda: link.dropped["to_client"] > 0, 30, "the deploy lost on the link")
        time.sleep(1.0)
        assert (agent.model() or {}).get("version") == "1.0.0"
        assert service.rollout_status(rid)["state"] == "running"

        link.cut()  # the broker publishes the will; the agent reconnects and is born again
        wait_until(
            lambda: service.rollout_status(rid)["state"] == "succeeded",
            90,
            "the rollout to finish once the agent is back",
        )
        assert (agent.model() or {}).get("version") == "2.0.0"

        sent = [Command.model_validate(m.json()) for _, m in recorder.by_kind("cmd")]
        # one command, sent again (a birth racing its first status may add a copy)
        assert len(sent) >= 2 and {c.command_id for c in sent} == {f"{rid}:pi-link:deploy:1"}
        assert link.connections >= 2
        events = [e["message"] for e in service.events(rollout_id=rid)]
        assert "pi-link came back online: its unanswered deploy sent again" in events
        # carried out once, however many copies arrived: a copy is answered with the last
        # status again (the same seq), never by running a step twice
        statuses = [m.json() for _, m in recorder.by_kind("status")]
        for state in ("accepted", "installed"):
            assert len({s["seq"] for s in statuses if s["state"] == state}) == 1, statuses
        device = service.rollout_status(rid)["devices"][0]
        assert device["state"] == "installed" and device["attempts"] == 1
        assert agent.alive()
    finally:
        agent.close()
        recorder.close()
        link.close()
        service.stop()
