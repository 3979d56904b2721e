"""A real agent and a real fleet server on the embedded amqtt broker: the agent signs with
Ed25519 until the fleet's key announcement arrives, then MACs its statuses, metrics and
later births, and the server keeps accepting them; the server MACs its commands to the
agent once its birth says it holds the fleet key, and the agent admits them — also after a
restart, from the announcement it saved, before the retained one arrives again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.daemon import Agent
from protocol import KeyPair
from protocol.device_auth import open_envelope
from protocol.messages import Command, CommandStatus
from tests.agent.daemon_env import agent_config, preinstall
from tests.agent.fleet_sim import wait_for
from tests.e2e.support import ENROL_TOKEN, BrokerRecorder, make_fleet, write_public_keys
from tests.support.brokers import EmbeddedBroker

pytestmark = pytest.mark.slow
DEV = "dev-mac"


def config_command(fleet: object, cid: str) -> Command:
    """A config command signed (or MAC'd) by the fleet's command signer, as sent."""
    from fleet_server.delivery import signed

    svc: Any = fleet
    cmd = Command(command_id=cid, device_id=DEV, kind="config", config={"metrics_interval": 0.25})
    cmd = signed(cmd, svc.command_signer, now=None, ttl_s=600)
    svc.sender.command(cmd)
    return cmd


def done(recorder: BrokerRecorder, cid: str) -> bool:
    for m in recorder.snapshot():
        if m.topic.endswith("/status") and cid.encode() in m.payload and b'"done"' in m.payload:
            return True
    return False


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
            if not m.payload or m.topic.endswith("/cmd"):
                continue  # a retained clear left on the shared broker, or a fleet command
            env = open_envelope(m.payload)
            assert env is not None, m.topic
            kind = m.topic.rsplit("/", 1)[-1]
            schemes.setdefault(kind, set()).add(env.scheme)
        # the first birth of a connection carries the keys (Ed25519); the one sent when the
        # fleet key was agreed (it names that key) is MAC'd, and the server accepted it
        assert schemes["state"] == {"ed25519", "mac"}
        wait_for(lambda: fleet.devices.command_key(DEV) is not None, timeout=30)
        assert "mac" in schemes["metrics"] and "mac" in schemes["status"]
        mac_status = [
            m for m in recorder.snapshot() if b"c-after" in m.payload and m.topic.endswith("status")
        ]
        assert open_envelope(mac_status[-1].payload).scheme == "mac"  # type: ignore[union-attr]
        dropped = fleet.bridge.stats()["dropped"]
        assert not {k: v for k, v in dropped.items() if "mac" in k or "sig" in k or "key" in k}

        # a command from the fleet now carries a MAC with the agreed key; the agent runs it
        sent = config_command(fleet, "c-mac")
        assert sent.signature is not None and sent.signature.alg == "hmac-sha256"
        wait_for(lambda: done(recorder, "c-mac"), timeout=30)
        assert agent.metrics_interval == 0.25

        # a restart: the saved announcement is agreed again at start (checked with the
        # command keys again), and MAC'd commands keep being admitted
        assert (cfg.data_dir / "fleet_kex.json").stat().st_mode & 0o777 == 0o600
        agent.stop(timeout=1)
        agent = Agent(cfg, max_backoff=1, metrics_interval=0.3).start()
        assert agent.processor.update.agreed, "agreed from the saved announcement at start"
        wait_for(agent.transport.is_connected)
        wait_for(lambda: fleet.devices.command_key(DEV) is not None, timeout=30)
        again = config_command(fleet, "c-again")
        assert again.signature is not None and again.signature.alg == "hmac-sha256"
        wait_for(lambda: done(recorder, "c-again"), timeout=30)
        assert agent.processor.refused == {}
    finally:
        agent.stop(timeout=1)
        recorder.close()
        if fleet is not None:
            fleet.stop()
            fleet.repo.close()
