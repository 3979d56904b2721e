"""Loopback ports for the servers tests start as subprocesses, chosen below the kernel's
ephemeral range.

A port the kernel hands out for ``bind(0)`` is in the ephemeral range, which is also where
every outgoing connection takes its source port. Between the probe and the server's own
``bind``, a connection made in the meantime (a NATS node dialling its routes, a client of
PostgreSQL) can take the same number, and the server then dies with "address already in
use" (seen once in CI: a NATS node's MQTT port). Ports below the range are never given to
outgoing connections, so only another listener could take one, and :func:`free_port`
checks that none does and never hands the same port out twice in one test run.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_LOWEST = 10000
_given: set[int] = set()


def _ephemeral_floor() -> int:
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        return int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on, below the ephemeral range when there is room there."""
    top = _ephemeral_floor()
    if top - _LOWEST >= 1000:
        for _ in range(200):
            port = random.randrange(_LOWEST, top)
            if port not in _given and _bindable(host, port):
                _given.add(port)
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
