"""The local API's HTTP server: a listening socket with Nagle off, and uvicorn's h11
protocol with a read deadline and a connection cap (:func:`guarded_protocol`).

Nagle. asyncio turns ``TCP_NODELAY`` on for an accepted connection only when the
listening socket's protocol number is ``IPPROTO_TCP``; a socket made with
``socket.socket(AF_INET)`` has protocol 0, so every accepted connection kept Nagle on and
each response's second write (uvicorn writes the head and the body separately) waited
for the client's delayed ACK: ~40 ms per request from httpx, requests and curl.
:func:`listen` creates the socket with ``IPPROTO_TCP`` *and* sets ``TCP_NODELAY`` on it
(Linux and the BSDs copy it to every accepted socket), so either mechanism alone is enough.

Half-sent requests. uvicorn waits forever for a request that never completes (its
keep-alive timer runs only between requests), so a client that sends half a header
(slowloris) or half a body held a connection, and enough of them held the API.
:func:`guarded_protocol`'s protocol gives the client ``api.read_timeout_s`` seconds, from the
connection's accept or the end of the previous response, to deliver a *complete*
request (head and body); after that the connection is closed (counted as
``read_timeouts``). The clock stops once the request is complete, so a slow model is
never cut off. At most ``api.max_connections`` connections are open at once; one more is
answered ``503 {"error": "too_many_connections"}`` and closed at once (counted as
``refused_connections``), so a flood of idle sockets costs the API nothing but file
descriptors it gets back within ``read_timeout_s``.

uvicorn and h11 are imported inside the functions that need them (``import agent`` stays
light).
"""

from __future__ import annotations

import asyncio
import errno
import json
import socket
from dataclasses import dataclass
from typing import Any

from protocol.errors import AddressInUse

from .config import ApiConfig
from .errors import ConfigError

# HTTP/1.1 keep-alive: an idle connection between requests is closed after this long
# (uvicorn's own timer; the read deadline bounds the wait for the first request).
KEEP_ALIVE_S = 5.0


@dataclass
class GuardStats:
    """Counters the daemon exports as gauges (``/metrics``)."""

    refused_connections: int = 0
    read_timeouts: int = 0


def listen(host: str, port: int, backlog: int = 128) -> socket.socket:
    """A bound TCP socket whose accepted connections have ``TCP_NODELAY`` on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise AddressInUse(
                f"api: {host}:{port} is in use by another process; stop it or set api.port"
            ) from None
        raise ConfigError(f"api: cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


def _refusal(max_connections: int) -> bytes:
    body = json.dumps(
        {
            "error": "too_many_connections",
            "detail": f"the API serves at most {max_connections} connections at once "
            "(api.max_connections); try again",
        }
    ).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\nretry-after: 1\r\n\r\n"
    ).encode()
    return head + body


def guarded_protocol(
    read_timeout_s: float, max_connections: int, stats: GuardStats
) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol with a deadline for each request and a connection cap
    (uvicorn takes a protocol class; this one carries the limits)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    refusal = _refusal(max_connections)

    class GuardedH11Protocol(H11Protocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                stats.refused_connections += 1
                transport.write(refusal)
                transport.close()
                return
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
                self._disarm()  # the request is complete (or the connection is ending)

        def on_response_complete(self) -> None:
            # Armed before uvicorn starts the next cycle: a pipelined request that is
            # already complete disarms it again in handle_events.
            if not self.transport.is_closing():
                self._arm()
            super().on_response_complete()

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(read_timeout_s, self._read_timed_out)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _read_timed_out(self) -> None:
            self._deadline = None
            if not self.transport.is_closing() and self.conn.their_state in (
                h11.IDLE,
                h11.SEND_BODY,
            ):
                stats.read_timeouts += 1
                self.transport.close()

    return GuardedH11Protocol


def make_server(app: Any, api: ApiConfig, stats: GuardStats) -> Any:
    """The uvicorn server for the local API (``server.run(sockets=[listen(...)])``)."""
    import uvicorn

    return uvicorn.Server(
        uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            http=guarded_protocol(api.read_timeout_s, api.max_connections, stats),
            timeout_keep_alive=int(KEEP_ALIVE_S),
            backlog=128,
        )
    )
