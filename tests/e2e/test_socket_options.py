"""Every TCP socket edgefleet opens has Nagle off (``TCP_NODELAY``), read where it lives.

With Nagle on, a response written in two parts (uvicorn writes head and body separately)
waits for the peer's delayed ACK: the agent API answered in ~44 ms instead of ~1 ms. These
tests start the shipped commands as processes from configs written by ``init`` and read
the option on the *server's* end of a connection (``tests.support.sockets``: the kernel's
TCP table, the process's descriptors, ``pidfd_getfd``); nothing is timed.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.support import wait_until
from tests.support.brokers import MOSQUITTO, EmbeddedBroker, free_port
from tests.support.shipped import Process, init_config
from tests.support.sockets import (
    client_tcp_nodelay,
    pidfd_getfd_works,
    server_tcp_nodelay,
)

pytestmark = pytest.mark.skipif(
    not pidfd_getfd_works(), reason="pidfd_getfd(2) is not permitted here (Linux ≥ 5.6, ptrace)"
)


def _accepted_nodelay(pid: int, client: socket.socket) -> bool:
    """TCP_NODELAY on the server's end, once the server has accepted ``client``."""

    def read() -> tuple[bool] | None:
        try:
            return (server_tcp_nodelay(pid, client),)
        except LookupError:  # still in the kernel's accept queue
            return None

    return wait_until(read, 30, "the server to accept the connection")[0]


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"GET /v1/health HTTP/1.1\r\nhost: test\r\n\r\n")
    assert sock.recv(64).startswith(b"HTTP/1.1 "), "the server did not answer"
    return sock


def test_agent_api_and_mqtt_connections_have_nagle_off(tmp_path: Path) -> None:
    port = free_port()
    with EmbeddedBroker() as broker:
        config = init_config(
            "agent",
            tmp_path / "agent.toml",
            {"api.port": port, "broker.url": broker.url, "data_dir": tmp_path / "data"},
        )
        with Process(["agent", "run", "--config", str(config)], tmp_path / "agent.log") as agent:
            agent.wait_http(f"http://127.0.0.1:{port}/v1/health")
            with _connect(port) as client:
                assert server_tcp_nodelay(agent.pid, client), (
                    "the agent API accepted a connection with Nagle on"
                )

            def mqtt_socket() -> dict[int, bool]:
                return client_tcp_nodelay(agent.pid, broker.port)

            found = wait_until(mqtt_socket, 30, "the agent's MQTT connection")
            assert all(found.values()), f"the agent's MQTT socket has Nagle on: {found}"


def test_fleet_api_embedded_broker_and_bridge_have_nagle_off(tmp_path: Path) -> None:
    api_port, broker_port = free_port(), free_port()
    config = init_config(
        "fleet",
        tmp_path / "fleet.toml",
        {
            "data_dir": tmp_path / "fleet",
            "broker.url": f"mqtt://127.0.0.1:{broker_port}",
            "api.port": api_port,
        },
    )
    args = ["fleet", "serve", "--config", str(config), "--embedded-broker"]
    with Process(args, tmp_path / "fleet.log") as fleet:
        fleet.wait_http(f"http://127.0.0.1:{api_port}/v1/health")
        with _connect(api_port) as client:
            assert server_tcp_nodelay(fleet.pid, client), "the fleet API has Nagle on"
        with socket.create_connection(("127.0.0.1", broker_port), timeout=10) as client:
            assert _accepted_nodelay(fleet.pid, client), "the embedded broker has Nagle on"
        bridge = wait_until(
            lambda: client_tcp_nodelay(fleet.pid, broker_port),
            30,
            "the fleet server's MQTT connection to its broker",
        )
        assert all(bridge.values()), f"the fleet server's MQTT socket has Nagle on: {bridge}"


@pytest.mark.mosquitto
@pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed")
def test_shipped_mosquitto_config_turns_nagle_off(tmp_path: Path) -> None:
    from tests.support.secure_broker import secure_mosquitto

    broker, _ = secure_mosquitto(tmp_path, {"device-1": "pw"})
    try:
        assert broker.proc is not None
        with socket.create_connection(("127.0.0.1", broker.port), timeout=10) as client:
            assert _accepted_nodelay(broker.proc.pid, client), (
                "deploy/mosquitto/mosquitto.conf leaves Nagle on (set_tcp_nodelay true)"
            )
    finally:
        broker.stop()


def _client_side_nodelay(request: Callable[[str], object]) -> dict[int, bool]:
    """Serve one HTTP answer on a local port; ``request(url)`` is the client under test.
    Returns TCP_NODELAY of this process's sockets connected to that port (the client's)."""
    seen: dict[int, bool] = {}
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            seen.update(client_tcp_nodelay(os.getpid(), port))
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        request(f"http://127.0.0.1:{port}")
    finally:
        thread.join(10)
        server.close()
    assert seen, "the client never connected"
    return seen


def test_download_and_cli_http_clients_have_nagle_off() -> None:
    """The agent's artifact download builds ``httpx.Client(timeout=…, follow_redirects=True)``;
    the CLI talks through :class:`fleet_server.client.FleetClient`. Read on their sockets."""
    import httpx

    from fleet_server.client import FleetClient

    def download(url: str) -> None:
        with httpx.Client(timeout=10, follow_redirects=True) as http:
            http.get(url + "/artifact")

    def cli(url: str) -> None:
        FleetClient(url, None).http.get("/v1/health")

    for name, request in (("download", download), ("fleet client", cli)):
        seen = _client_side_nodelay(request)
        assert all(seen.values()), f"the {name} socket has Nagle on: {seen}"
