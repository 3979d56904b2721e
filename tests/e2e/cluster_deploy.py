"""A deployment on the NATS cluster made with the shipped commands, for the cluster tests.

:func:`deploy` runs ``edgefleet fleet init`` (then sets keys as a user edits the file,
``broker.urls`` among them), ``edgefleet fleet token create``, ``edgefleet fleet serve``,
and per device ``edgefleet agent init --broker URL --broker URL …`` (a failover list),
``edgefleet agent install`` of the first release, and ``edgefleet agent run``. With
``credentials`` the fleet server and every device log in to the broker (``users.conf``);
on a TLS cluster they trust its test CA (``broker.ca_file``).
"""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from protocol import KeyPair
from tests.e2e.conftest import Release
from tests.e2e.support import ENROL_TOKEN, AgentProcess, install_offline, wait_until
from tests.support.keys import write_private, write_public
from tests.support.nats_cluster import NatsCluster
from tests.support.shipped import REPO, Process, edgefleet, env, set_keys

FINAL = {"succeeded", "halted", "aborted", "rolled_back"}


@dataclass
class Deployment:
    root: Path
    cluster: NatsCluster
    api: str
    token: str
    fleet: Process
    agents: dict[str, AgentProcess] = field(default_factory=dict)
    brokers: dict[str, list[str]] = field(default_factory=dict)  # device → its URL list

    def http(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.api, headers={"authorization": f"Bearer {self.token}"}, timeout=30
        )

    def rollout(self, rollout_id: str) -> dict[str, Any]:
        with self.http() as c:
            r = c.get(f"/v1/rollouts/{rollout_id}")
            r.raise_for_status()
            return dict(r.json())

    def online(self) -> set[str]:
        with self.http() as c:
            r = c.get("/v1/devices")
            r.raise_for_status()
            body = r.json()
        rows = body["items"] if isinstance(body, dict) else body
        return {d["device_id"] for d in rows if d.get("online")}

    def start_rollout(self, bundle: Path, *extra: str) -> str:
        env = {"EDGEFLEET_URL": self.api, "EDGEFLEET_TOKEN": self.token}
        out = _edgefleet_env(env, "rollout", "start", str(bundle), *extra)
        m = re.search(r"rollout (r-[0-9a-zA-Z]+)", out)
        assert m, out
        return m.group(1)

    def wait_final(self, rollout_id: str, timeout: float = 300) -> dict[str, Any]:
        def final() -> dict[str, Any] | None:
            status = self.rollout(rollout_id)
            return status if status["state"] in FINAL else None

        status: dict[str, Any] = wait_until(final, timeout, f"rollout {rollout_id} to end", 0.5)
        return status

    def logs(self) -> str:
        parts = [f"--- fleet\n{self.fleet.log()}"]
        parts += [f"--- {d}\n{a.log()}" for d, a in self.agents.items()]
        return "\n".join(parts)


def _edgefleet_env(extra_env: dict[str, str], *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "edgefleet", *args],
        capture_output=True,
        text=True,
        timeout=180,
        env={**env(), **extra_env, "COLUMNS": "200"},
        cwd=REPO,
    )
    assert out.returncode == 0, f"edgefleet {' '.join(args)}: {out.stderr}{out.stdout}"
    return out.stdout + out.stderr


def _device_auth(folder: Path, device: str, credentials: dict[str, str] | None) -> dict[str, Any]:
    if credentials is None:
        return {}
    secret = folder / "broker-password"
    secret.write_text(credentials[device] + "\n")
    secret.chmod(0o600)
    return {"broker.username": device, "broker.password_file": secret}


@contextmanager
def deploy(
    root: Path,
    cluster: NatsCluster,
    signing_key: KeyPair,
    first: Release,
    lists: dict[str, tuple[int, ...]],
    fleet_nodes: tuple[int, ...] = (3, 2),
    credentials: dict[str, str] | None = None,
    fleet_keys: dict[str, Any] | None = None,
) -> Iterator[Deployment]:
    """Fleet server on ``fleet_nodes``, one agent per ``lists`` entry (device → node order),
    every device serving ``first`` and online at the fleet server. ``fleet_keys`` are more
    ``fleet.toml`` keys (e.g. ``{"registry.url": "postgresql://…"}``)."""
    keys = root / "keys"
    bundle_pub = keys / "release.pub"
    keys.mkdir()
    bundle_pub.write_bytes(signing_key.public_pem())
    command_pub, command_pem = write_public(keys), write_private(keys)
    from protocol.device_auth import token_hash
    from tests.support.brokers import free_port

    fleet_auth: dict[str, Any] = {}
    if credentials is not None:
        fleet_auth = {
            "broker.username": "edgefleet-server",
            "broker.password": credentials["edgefleet-server"],
        }
    tls = {"broker.ca_file": cluster.ca_file} if cluster.ca_file else {}
    # the fleet server: `fleet init`, a user's edits, `fleet serve` on its list of nodes
    fleet_toml = root / "fleet.toml"
    edgefleet("fleet", "init", "--out", str(fleet_toml))
    api_port = free_port()
    one_broker = '\nurl = "mqtt://127.0.0.1:1883"'
    assert one_broker in fleet_toml.read_text()
    fleet_toml.write_text(
        set_keys(
            fleet_toml.read_text().replace(one_broker, "\n# (one broker: url; a cluster: urls)"),
            {
                "data_dir": root / "fleet",
                "broker.urls": [cluster.node(n).url for n in fleet_nodes],
                "broker.client_id": f"fleet-{uuid.uuid4().hex[:6]}",
                "api.port": api_port,
                "signing.command_key": command_pem,
                "signing.bundle_keys": [str(bundle_pub)],
                "rollout.tick_s": 0.2,
                "devices.enrol_token_hashes": [token_hash(ENROL_TOKEN)],
                **fleet_auth,
                **tls,
                **(fleet_keys or {}),
            },
        )
    )
    token = edgefleet(
        "fleet", "token", "create", "--role", "operator", "--config", str(fleet_toml)
    ).stdout.strip()
    fleet = Process(["fleet", "serve", "--config", str(fleet_toml)], root / "fleet.log")
    api = f"http://127.0.0.1:{api_port}"
    dep = Deployment(root, cluster, api, token, fleet)
    try:
        fleet.wait_http(f"{api}/v1/health", timeout=120)
        # the devices: `agent init --broker … --broker …`, v1 installed offline, `agent run`
        configs = []
        for device, order in lists.items():
            folder = root / device
            folder.mkdir()
            urls = [cluster.node(n).url for n in order]
            dep.brokers[device] = urls
            config = folder / "agent.toml"
            args = ["agent", "init", "--out", str(config), "--device-id", device]
            for u in urls:
                args += ["--broker", u]
            args += ["--bundle-key", str(bundle_pub), "--command-key", str(command_pub)]
            args += ["--api-port", str(free_port())]
            edgefleet(*args)
            token_file = folder / "enrol-token"
            token_file.write_text(ENROL_TOKEN + "\n")
            token_file.chmod(0o600)
            config.write_text(
                set_keys(
                    config.read_text(),
                    {
                        "data_dir": folder / "data",
                        "enrol.token_file": token_file,
                        "sketch.window_seconds": 2.0,
                        "runtime.threads": 1,
                        "runtime.bench_after_install": 5,
                        **_device_auth(folder, device, credentials),
                        **tls,
                    },
                )
            )
            configs.append(config)
        install_offline(configs, first.write(root / "bundles"))
        for device, config in zip(lists, configs, strict=True):
            dep.agents[device] = AgentProcess(config).start()
        for agent in dep.agents.values():
            agent.wait_api(timeout=120, ready=True)
        wait_until(
            lambda: set(lists) <= dep.online(), 120, "every device online at the fleet server"
        )
        yield dep
    except BaseException:
        print(dep.logs())
        raise
    finally:
        for agent in dep.agents.values():
            agent.close()
        fleet.stop()


def connected_to(agent: AgentProcess) -> str | None:
    """The broker URL of the agent's last 'broker link connected' line (``agent run``)."""
    found = re.findall(r"broker link connected: connected to (mqtt://\S+)", agent.log())
    return found[-1] if found else None


def queued_before(data_dir: Path, ts: float) -> int:
    """Outbox entries (statuses, metrics, sketches) queued at or before ``ts``, not yet acked."""
    import sqlite3

    con = sqlite3.connect(f"file:{data_dir / 'outbox.db'}?mode=ro", uri=True, timeout=10)
    try:
        return int(
            con.execute("SELECT COUNT(*) FROM outbox WHERE created <= ?", (ts,)).fetchone()[0]
        )
    finally:
        con.close()


def on_version(dep: Deployment, version: str) -> dict[str, str | None]:
    out = {}
    for device, agent in dep.agents.items():
        model = agent.model()
        out[device] = model.get("version") if model else None
    return {d: v for d, v in out.items() if v != version}
