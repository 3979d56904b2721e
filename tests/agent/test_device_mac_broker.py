"""A real agent and a real fleet server on the embedded amqtt broker: the agent signs with
Ed25519 until the fleet's key announcement arrives, then MACs its statuses and metrics,
and the server keeps accepting them."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.daemon import Agent
from protocol import KeyPair
from protocol.device_auth import open_envelope
from protocol.messages import CommandStatus
from tests.agent.daemon_env import agent_config, preinstall
from tests.agent.fleet_sim import wait_for
from tests.e2e.support import ENROL_TOKEN, BrokerRecorder, make_fleet, write_public_keys
from tests.support.brokers import EmbeddedBroker

pytestmark = pytest.mark.slow
DEV = "dev-mac"


def test_the_agent_switches_to_mac_after_the_fleet_key_and_stays_accepted(
    tmp_path: Path, amqtt_broker: EmbeddedBroker, signing_key: KeyPair
) -> None:
    url = str(amqtt_broker.url)
    token = tmp_path / "enrol.token"
    token.write_text(ENROL_TOKEN)
    cfg = agent_config(tmp_path, url, signing_key, DEV)
    cfg = cfg.model_copy(update={"enrol": cfg.enrol.model_copy(update={"token_file": token})})
    preinstall(cfg, signing_key)
    recorder = BrokerRecorder(url, f"edgefleet/devices/{DEV}/#").start()
    agent = Agent(cfg, max_backoff=1, metrics_interval=0.3).start()
    fleet = None
    try:
        wait_for(agent.transport.is_connected)
        # no fleet yet: no announcement, the agent signs with its Ed25519 key
        agent.link.report(CommandStatus(device_id=DEV, command_id="c-before", state="done"))
        wait_for(lambda: [m for m in recorder.snapshot() if b"c-before" in m.payload])
        assert agent.identity.signer.mac is None

        fleet = make_fleet(
            tmp_path, url, bundle_keys=write_public_keys(tmp_path / "k", signing_key)
        )
        wait_for(lambda: agent.identity.signer.mac is not None, timeout=30)
        agent.link.report(CommandStatus(device_id=DEV, command_id="c-after", state="done"))
        accepted = lambda: fleet.bridge.stats()["accepted"]  # noqa: E731
        wait_for(lambda: accepted().get("status", 0) >= 1, timeout=30)
        start = accepted().get("metrics", 0)
        wait_for(lambda: accepted().get("metrics", 0) >= start + 2, timeout=30)

        schemes = {}
        for m in recorder.snapshot():
            env = open_envelope(m.payload)
            assert env is not None, m.topic
            kind = m.topic.rsplit("/", 1)[-1]
            schemes.setdefault(kind, set()).add(env.scheme)
        assert schemes["state"] == {"ed25519"}  # births carry the keys
        assert "mac" in schemes["metrics"] and "mac" in schemes["status"]
        mac_status = [
            m for m in recorder.snapshot() if b"c-after" in m.payload and m.topic.endswith("status")
        ]
        assert open_envelope(mac_status[-1].payload).scheme == "mac"  # type: ignore[union-attr]
        dropped = fleet.bridge.stats()["dropped"]
        assert not {k: v for k, v in dropped.items() if "mac" in k or "sig" in k or "key" in k}
    finally:
        agent.stop(timeout=1)
        recorder.close()
        if fleet is not None:
            fleet.stop()
            fleet.repo.close()
