"""Half-sent requests and connection floods cannot hold the agent's local API.

The agent runs as ``edgefleet agent run`` from a config written by ``edgefleet agent
init`` with a bundle installed by ``edgefleet agent install``. A slowloris client trickles
a request head (or a body) one byte at a time; the API closes it once ``api.read_timeout_s``
has passed since the connection was accepted, however it trickles, and keeps answering
other clients meanwhile. ``api.max_connections`` idle connections make the next one get a
503 naming the limit, and the API serves again as soon as they go. Nothing is timed: the
tests wait (with generous bounds) for what must happen.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import Release
from tests.e2e.support import IRIS_ROW, wait_until
from tests.support.brokers import free_port
from tests.support.shipped import Process, edgefleet, init_config

# Trickled one byte at a time, then ``a`` forever: a header value / a body that never ends.
PARTIAL_HEAD = b"POST /v1/predict HTTP/1.1\r\nhost: slow\r\nx-slow: "
PARTIAL_BODY = (
    b"POST /v1/predict HTTP/1.1\r\nhost: slow\r\ncontent-type: application/json\r\n"
    b"content-length: 1000000\r\n\r\n" + b'{"inputs": [[5.1, "'
)


def _agent(
    folder: Path, key: Path, bundle: Path, *, read_timeout_s: float, max_connections: int
) -> Iterator[tuple[Process, str]]:
    port = free_port()
    config = init_config(
        "agent",
        folder / "agent.toml",
        {
            "data_dir": folder / "data",
            "broker.url": f"mqtt://127.0.0.1:{free_port()}",  # no broker: serving never waits
            "trust.bundle_keys": [str(key)],
            "api.port": port,
            "api.read_timeout_s": read_timeout_s,
            "api.max_connections": max_connections,
        },
    )
    edgefleet("agent", "install", str(bundle), "--config", str(config))
    url = f"http://127.0.0.1:{port}"
    with Process(["agent", "run", "--config", str(config)], folder / "agent.log") as agent:
        agent.wait_http(url + "/v1/ready")
        yield agent, url


@pytest.fixture
def slow_agent(
    tmp_path: Path, key_files: dict[str, Path], iris_v1: Release
) -> Iterator[tuple[Process, str]]:
    yield from _agent(
        tmp_path,
        key_files["signing"],
        iris_v1.write(tmp_path),
        read_timeout_s=2.0,
        max_connections=50,
    )


@pytest.fixture
def capped_agent(
    tmp_path: Path, key_files: dict[str, Path], iris_v1: Release
) -> Iterator[tuple[Process, str]]:
    yield from _agent(
        tmp_path,
        key_files["signing"],
        iris_v1.write(tmp_path),
        read_timeout_s=120.0,
        max_connections=3,
    )


def _gauge(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} is not in /metrics")


class Trickler(threading.Thread):
    """Sends ``data`` one byte every 50 ms, then ``a`` bytes, until the server closes it."""

    def __init__(self, url: str, data: bytes) -> None:
        super().__init__(daemon=True)
        port = int(url.rsplit(":", 1)[1])
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.data = data
        self.closed_by_server = False
        self.answer = b""
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            i = 0
            while not self._halt.wait(0.05):
                self.sock.send(self.data[i : i + 1] or b"a")  # never completes the request
                i += 1
        except OSError:  # EPIPE / ECONNRESET: the server closed it
            pass
        try:
            self.sock.settimeout(60)
            while chunk := self.sock.recv(65536):
                self.answer += chunk
            self.closed_by_server = True
        except ConnectionResetError:
            self.closed_by_server = True
        except OSError:
            pass
        finally:
            self.sock.close()

    def stop(self) -> None:
        self._halt.set()


def test_slowloris_requests_are_closed_and_the_model_keeps_answering(
    slow_agent: tuple[Process, str],
) -> None:
    agent, url = slow_agent
    slow = [Trickler(url, PARTIAL_HEAD) for _ in range(3)] + [Trickler(url, PARTIAL_BODY)]
    for t in slow:
        t.start()
    answers = []
    with httpx.Client(base_url=url, timeout=30) as client:
        while any(t.is_alive() for t in slow) and len(answers) < 5000:
            answers.append(client.post("/v1/predict", json={"inputs": [IRIS_ROW]}).status_code)
    for t in slow:
        t.join(90)
        t.stop()
        assert t.closed_by_server, "a half-sent request was never closed"
        assert t.answer == b"", f"a half-sent request got an answer: {t.answer[:80]!r}"
    assert answers and set(answers) == {200}, f"other clients got {sorted(set(answers))}"
    assert _gauge(url, "edgefleet_api_read_timeouts_total") >= len(slow)
    assert agent.proc.poll() is None


def test_connections_over_the_cap_get_503_and_the_api_recovers(
    capped_agent: tuple[Process, str],
) -> None:
    agent, url = capped_agent
    port = int(url.rsplit(":", 1)[1])
    held: list[socket.socket] = []
    refusal = b""
    try:
        for _ in range(3 + 2):  # the cap is 3; allow for a health check still closing
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            sock.settimeout(0.5)  # an accepted connection stays silent: no answer
            try:
                refusal = sock.recv(65536)
            except TimeoutError:
                held.append(sock)
                continue
            sock.settimeout(30)
            while chunk := sock.recv(65536):
                refusal += chunk
            sock.close()
            break
        assert refusal, f"{len(held)} idle connections held and none refused"
        head, _, body = refusal.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 ")
        assert json.loads(body)["error"] == "too_many_connections"
        assert b"api.max_connections" in body
    finally:
        for sock in held:
            sock.close()

    def serves() -> bool:
        try:
            r = httpx.post(url + "/v1/predict", json={"inputs": [IRIS_ROW]}, timeout=10)
        except httpx.HTTPError:
            return False
        return r.status_code == 200

    wait_until(serves, 60, "the API to serve again once the idle connections closed")
    assert _gauge(url, "edgefleet_api_refused_connections_total") >= 1
    assert agent.proc.poll() is None


def test_pipelined_and_keep_alive_requests_are_not_cut_by_the_read_deadline(
    slow_agent: tuple[Process, str],
) -> None:
    """The deadline covers reading one request: complete requests sent back to back on one
    connection (pipelined, then keep-alive) are all answered."""
    _, url = slow_agent
    port = int(url.rsplit(":", 1)[1])
    body = json.dumps({"inputs": [IRIS_ROW]}).encode()
    request = (
        b"POST /v1/predict HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(body), body)
    )
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request * 3)  # three pipelined requests in one write
        got = b""
        while got.count(b'"fallback":') < 3:  # the last field of each answer's body
            chunk = sock.recv(65536)
            assert chunk, f"closed after {got.count(b'HTTP/1.1 200 OK')} of 3 answers"
            got += chunk
        assert got.count(b"HTTP/1.1 200 OK") == 3
        for _ in range(20):  # then one at a time on the same connection
            sock.sendall(request)
            answer = b""
            while b'"fallback"' not in answer:
                chunk = sock.recv(65536)
                assert chunk, "a keep-alive request was cut"
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200 OK")
