"""Agents on real brokers: config factory and a paho server-side client for tests."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from agent.config import AgentConfig, ApiConfig, BrokerConfig, SketchConfig, TrustConfig
from agent.installer import Installer
from protocol import KeyPair
from protocol.transport_paho import PahoTransport
from tests.agent.fleet_sim import FleetSim
from tests.support.bundles import make_bundle
from tests.support.keys import write_public


def agent_config(
    tmp_path: Path, url: str, key: KeyPair, device_id: str, **sketch: Any
) -> AgentConfig:
    pub = tmp_path / f"{device_id}-trusted.pub"
    pub.write_bytes(key.public_pem())
    return AgentConfig(
        device_id=device_id,
        data_dir=tmp_path / device_id,
        broker=BrokerConfig(url=url),
        trust=TrustConfig(bundle_keys=[pub], command_keys=[write_public(tmp_path / "command")]),
        api=ApiConfig(port=0),
        sketch=SketchConfig(**({"window_seconds": 3600, "window_rows": 20} | sketch)),
    )


def preinstall(config: AgentConfig, key: KeyPair, version: str = "1.0.0", release: int = 1) -> None:
    Installer.from_config(config).install_bytes(
        make_bundle(key, version=version, release=release)[0]
    )


def server(url: str, device_id: str) -> FleetSim:
    t = PahoTransport(url, f"server-{uuid.uuid4().hex[:8]}", clean_session=False, max_backoff=2)
    sim = FleetSim(t, device_id)
    t.connect(timeout=10)
    return sim
