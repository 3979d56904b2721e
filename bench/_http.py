"""Ordinary HTTP clients timing sequential requests on one keep-alive connection.

``sample(client, url, bodies, n)`` returns ``n`` per-request times in milliseconds (after
a warm-up), for:

* ``httpx`` — ``httpx.Client`` (what most Python code uses today);
* ``requests`` — ``requests.Session``;
* ``curl`` — one ``curl`` process doing all ``n`` requests on one connection (a ``-K``
  config with one ``url`` per request); the times are curl's own ``%{time_total}`` per
  transfer, so the process start is not counted;
* ``raw`` — a bare socket (``TCP_NODELAY``, request bytes built once, answer read by
  Content-Length): the least client CPU per request, an extra row, not a user's client.

``bodies`` None means GET; otherwise each request POSTs the next body as JSON.
"""

from __future__ import annotations

import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

CLIENTS = ("httpx", "requests", "curl", "raw")
WARMUP = 30


def percentiles(samples: Sequence[float]) -> dict[str, float]:
    arr = np.asarray(samples, dtype=float)
    return {
        "p50_ms": float(np.percentile(arr, 50)),
        "p99_ms": float(np.percentile(arr, 99)),
        "mean_ms": float(arr.mean()),
        "runs": int(arr.size),
    }


def _timed(call: Callable[[int], int], n: int) -> list[float]:
    for i in range(WARMUP):
        _check(call(i))
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        status = call(i)
        out.append((time.perf_counter() - t0) * 1000.0)
        _check(status)
    return out


def _check(status: int, what: str = "") -> None:
    if status != 200:
        raise RuntimeError(f"HTTP {status} {what}".strip())


def _httpx(url: str, bodies: list[bytes] | None, n: int, extra: dict[str, str]) -> list[float]:
    import httpx

    headers = {"content-type": "application/json", **extra}
    with httpx.Client(timeout=30) as client:
        if bodies is None:
            first = client.get(url, headers=extra)
            _check(first.status_code, f"from {url}: {first.text[:300]}")
            return _timed(lambda i: client.get(url, headers=extra).status_code, n)
        first = client.post(url, content=bodies[0], headers=headers)
        _check(first.status_code, f"from {url}: {first.text[:300]}")

        def post(i: int) -> int:
            return client.post(url, content=bodies[i % len(bodies)], headers=headers).status_code

        return _timed(post, n)


def _requests(url: str, bodies: list[bytes] | None, n: int, extra: dict[str, str]) -> list[float]:
    import requests

    headers = {"content-type": "application/json", **extra}
    with requests.Session() as session:
        if bodies is None:
            return _timed(lambda i: session.get(url, headers=extra, timeout=30).status_code, n)
        return _timed(
            lambda i: (
                session.post(
                    url, data=bodies[i % len(bodies)], headers=headers, timeout=30
                ).status_code
            ),
            n,
        )


def _curl(url: str, bodies: list[bytes] | None, n: int, extra: dict[str, str]) -> list[float]:
    """One curl process, ``WARMUP + n`` transfers on one connection (curl reuses it)."""
    total = WARMUP + n
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "curl.conf"
        lines = ["silent", "show-error"]
        lines.append('write-out = "%{http_code} %{time_total} %{num_connects}\\n"')
        lines += [f'header = "{k}: {v}"' for k, v in extra.items()]
        if bodies is not None:
            body = Path(tmp) / "body.json"
            body.write_bytes(bodies[0])
            lines += [f'data-binary = "@{body}"', 'header = "content-type: application/json"']
        for _ in range(total):
            lines += [f'url = "{url}"', 'output = "/dev/null"']
        config.write_text("\n".join(lines) + "\n")
        out = subprocess.run(
            ["curl", "-K", str(config)], capture_output=True, text=True, timeout=600, check=True
        ).stdout.split("\n")
    rows = [line.split() for line in out if line.strip()]
    if len(rows) != total:
        raise RuntimeError(f"curl did {len(rows)} of {total} transfers")
    connects = sum(int(r[2]) for r in rows)
    if connects != 1:
        raise RuntimeError(f"curl opened {connects} connections, not one (no keep-alive)")
    for r in rows:
        _check(int(r[0]))
    return [float(r[1]) * 1000.0 for r in rows[WARMUP:]]


class RawClient:
    """A keep-alive HTTP/1.1 client on a bare socket: the request bytes are built once and
    the answer is read by Content-Length. httpx spends ~300 µs of client CPU per request,
    which on two cores made the client, not the server, the throughput limit."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        u = urlsplit(url)
        self.extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self.host, self.port, self.path = u.hostname or "127.0.0.1", u.port or 80, u.path
        self.sock = socket.create_connection((self.host, self.port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def request(self, body: bytes | None) -> int:
        if body is None:
            head = f"GET {self.path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\n{self.extra}\r\n"
            self.sock.sendall(head.encode())
        else:
            head = (
                f"POST {self.path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\n"
                f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
                f"{self.extra}\r\n"
            )
            self.sock.sendall(head.encode() + body)
        while b"\r\n\r\n" not in self.buf:
            self.buf += self._recv_chunk()
        header, _, rest = self.buf.partition(b"\r\n\r\n")
        status = int(header.split(b" ", 2)[1])
        length = 0
        for line in header.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(rest) < length:
            rest += self._recv_chunk()
        self.buf = rest[length:]
        return status

    def _recv_chunk(self) -> bytes:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("server closed the connection")
        return data

    def close(self) -> None:
        self.sock.close()


def _raw(url: str, bodies: list[bytes] | None, n: int, extra: dict[str, str]) -> list[float]:
    client = RawClient(url, extra)
    try:
        return _timed(
            lambda i: client.request(None if bodies is None else bodies[i % len(bodies)]), n
        )
    finally:
        client.close()


_SAMPLERS: dict[str, Callable[[str, list[bytes] | None, int, dict[str, str]], list[float]]] = {
    "httpx": _httpx,
    "requests": _requests,
    "curl": _curl,
    "raw": _raw,
}


def sample(
    client: str,
    url: str,
    bodies: list[bytes] | None,
    n: int,
    headers: dict[str, str] | None = None,
) -> list[float]:
    """``n`` sequential request times (ms) from ``client`` on one keep-alive connection,
    sending ``headers`` (e.g. ``Authorization``) with every request."""
    return _SAMPLERS[client](url, bodies, n, headers or {})
