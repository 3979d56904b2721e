"""Two ``edgefleet fleet serve`` processes on one PostgreSQL registry, each with its own
``data_dir``, on one broker, with real agents (``edgefleet agent run``).

A bundle is pushed to the server that does not hold the rollout tick, and a rollout of it
started there; the holder, which carries every rollout out and has never held the bundle's
file, fetches the bytes from the registry, publishes the artifact's chunks once on the
shared topic (``{p}/artifacts/{sha256}/{i}``) for every device, and serves them over HTTP
with ``Range`` too. Nothing goes on a per-device chunk topic.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import pytest

from fleet_server.delivery import chunk_size_for, n_chunks
from protocol import KeyPair
from protocol.device_auth import token_hash
from tests.e2e.support import (
    ENROL_TOKEN,
    AgentProcess,
    BrokerRecorder,
    install_offline,
    wait_until,
    write_agent_config,
    write_private_key,
    write_public_keys,
)
from tests.support.brokers import EmbeddedBroker, free_port
from tests.support.bundles import make_bundle
from tests.support.keys import COMMAND_KEY
from tests.support.shipped import Process, edgefleet, init_config

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

CHUNK = 4096  # several chunks for a test bundle


def test_a_bundle_pushed_to_one_server_is_delivered_once_by_another(
    tmp_path: Path, signing_key: KeyPair, postgres_url: str
) -> None:
    (bundle_pub,) = write_public_keys(tmp_path / "keys", signing_key)
    command_key = write_private_key(tmp_path / "keys", COMMAND_KEY)
    v1, _ = make_bundle(signing_key, version="1.0.0", release=1)
    v2, _ = make_bundle(signing_key, version="2.0.0", release=2)
    (tmp_path / "v1.efb").write_bytes(v1)
    (tmp_path / "v2.efb").write_bytes(v2)
    sha = hashlib.sha256(v2).hexdigest()
    with EmbeddedBroker() as broker:
        configs, urls = {}, {}
        for name in ("a", "b"):
            port = free_port()
            urls[name] = f"http://127.0.0.1:{port}"
            configs[name] = init_config(
                "fleet",
                tmp_path / name / "fleet.toml",
                {
                    "data_dir": tmp_path / name / "data",
                    "registry.url": postgres_url,
                    "broker.url": broker.url,
                    "broker.client_id": f"fleet-{name}",
                    "api.port": port,
                    "signing.command_key": command_key,
                    "signing.bundle_keys": [str(bundle_pub)],
                    "devices.enrol_token_hashes": [token_hash(ENROL_TOKEN)],
                    "rollout.tick_s": 0.2,
                    "rollout.chunk_bytes": CHUNK,
                },
            )
        token = edgefleet("fleet", "token", "create", "--role", "admin", "-c", str(configs["a"]))
        admin = token.stdout.strip().splitlines()[0]
        agents_cfg = [
            write_agent_config(
                tmp_path / f"dev-{i}",
                device_id=f"dev-{i}",
                broker_url=broker.url,
                bundle_keys=[bundle_pub],
            )
            for i in range(2)
        ]
        install_offline(agents_cfg, tmp_path / "v1.efb")
        recorder = BrokerRecorder(broker.url, "edgefleet/#").start()
        servers = [
            Process(["fleet", "serve", "--config", str(configs[n])], tmp_path / f"{n}.log")
            for n in ("a", "b")
        ]
        agents = [AgentProcess(c).start() for c in agents_cfg]
        try:
            for n, s in zip(("a", "b"), servers, strict=True):
                s.wait_http(f"{urls[n]}/v1/health")
            for a in agents:
                a.wait_api(ready=True)
            headers = {"Authorization": f"Bearer {admin}"}
            wait_until(
                lambda: (
                    sum(
                        d["online"]
                        for d in httpx.get(
                            f"{urls['b']}/v1/devices?limit=1000", headers=headers
                        ).json()["items"]
                    )
                    == 2
                ),
                60,
                "both devices online on the second server",
            )
            # the process holding the rollout tick delivers every rollout (fleet_server/
            # cluster.py): push the bundle to the other one, so the holder must take it
            # from the registry
            holder = wait_until(
                lambda: next(
                    (n for n in ("a", "b") if httpx.get(f"{urls[n]}/v1/health").json().get("tick")),
                    None,
                ),
                60,
                "one process to hold the rollout tick",
            )
            other = "b" if holder == "a" else "a"
            edgefleet(
                "fleet", "bundles", "push", str(tmp_path / "v2.efb"), "--url", urls[other],
                "--token", admin,
            )  # fmt: skip
            cached = tmp_path / holder / "data" / "artifacts" / sha[:2] / sha
            assert not cached.exists()  # the holder never saw the upload
            edgefleet(
                "rollout", "start", "iris@2.0.0", "--stages", "100", "--url",
                urls[other], "--token", admin,
            )  # fmt: skip
            for a in agents:
                wait_until(
                    lambda a=a: (a.model() or {}).get("version") == "2.0.0",
                    90,
                    "the agents to install 2.0.0 from the process holding the tick",
                )
            assert cached.read_bytes() == v2  # fetched from the registry, cached
            count = n_chunks(len(v2), chunk_size_for(len(v2), CHUNK))
            assert count > 1
            chunk_msgs = [
                m
                for m in recorder.snapshot()
                if m.payload and m.topic.startswith(f"edgefleet/artifacts/{sha}/")
            ]
            assert len(chunk_msgs) == count  # one set for both devices
            assert not recorder.by_kind("artifact")  # no per-device chunk topic
            got = httpx.get(f"{urls[holder]}/v1/artifacts/{sha}", headers={"Range": "bytes=10-"})
            assert got.status_code == 206 and got.content == v2[10:]
        finally:
            for a in agents:
                a.close()
            for s in servers:
                s.stop()
            recorder.close()
