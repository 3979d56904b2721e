"""The embedded MQTT broker (amqtt, MQTT 3.1.1) run in a background thread.

Used by ``edgefleet fleet serve --embedded-broker``, ``edgefleet demo`` and the tests, so a
fresh machine needs nothing else. Production uses Mosquitto/EMQX: nothing may depend on
this broker's quirks (it has no MQTT 5, so no shared subscriptions).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import threading
import warnings
from typing import Any

from protocol.errors import AddressInUse
from protocol.transport import TransportError


def free_port(host: str = "127.0.0.1") -> int:
    # bind-only probes: never connected or accepted on, but made like every TCP socket of ours
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def ensure_port_free(host: str, port: int, what: str, hint: str) -> None:
    """Raise :class:`AddressInUse` when another process listens on ``host:port``.

    Binds a probe the way asyncio's servers do (``SO_REUSEADDR``), so a port left in
    TIME_WAIT by our own last run counts as free and only a live listener counts as taken.
    """
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                return  # not ours to judge (e.g. an address this host lacks): let it fail later
            raise AddressInUse(
                f"{what}: {host}:{port} is already in use by another process; {hint}"
            ) from None


class EmbeddedBroker:
    """``with EmbeddedBroker() as b: b.url`` → ``mqtt://127.0.0.1:PORT``."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker: Any = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> EmbeddedBroker:
        try:
            from amqtt.broker import Broker
        except ImportError:  # pragma: no cover
            raise TransportError("amqtt is not installed: pip install 'edgefleet[fleet]'") from None
        ensure_port_free(
            self.host,
            self.port,
            "embedded MQTT broker",
            "stop it, or put another port in [broker] url (or use that broker without "
            "--embedded-broker)",
        )
        # amqtt logs every connection at INFO; keep our logs readable. While it starts it
        # would also log a failure's traceback: that failure is raised below as one line.
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.WARNING)
        logging.getLogger("amqtt.broker").setLevel(logging.CRITICAL)
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
        }

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                # amqtt 0.12 warns (DeprecationWarning, attributed to our frame) that its
                # $SYS plugin's psutil dependency will move to an extra. Nothing else runs
                # while the starting thread waits for us, so a scoped filter is safe here.
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    self._broker = Broker(config, loop=loop)
                    loop.run_until_complete(self._broker.start())
            except BaseException as exc:
                self._error = exc
                self._ready.set()
                return
            self._ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="amqtt-broker", daemon=True)
        self._thread.start()
        started = self._ready.wait(timeout)
        logging.getLogger("amqtt.broker").setLevel(logging.WARNING)
        if not started or self._error is not None:
            if _address_in_use(self._error):
                raise AddressInUse(f"embedded MQTT broker: {self.host}:{self.port} is in use")
            raise TransportError(f"embedded broker failed to start on {self.url}: {self._error}")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        loop, broker = self._loop, self._broker
        if loop is None or broker is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(broker.shutdown(), loop).result(timeout)
        except Exception:
            pass
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout)
        self._loop = self._broker = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _address_in_use(exc: BaseException | None) -> bool:
    """amqtt wraps the OSError of its listener; look through the chain."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
            return True
        exc = exc.__cause__ or exc.__context__
    return False
