"""The embedded MQTT broker (amqtt, MQTT 3.1.1) run in a background thread.

Used by ``edgefleet fleet serve --embedded-broker``, ``edgefleet demo`` and the tests, so a
fresh machine needs nothing else. Production uses Mosquitto/EMQX: nothing may depend on
this broker's quirks (it has no MQTT 5, so no shared subscriptions).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import warnings
from typing import Any

from protocol.transport import TransportError


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


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
        # amqtt logs every connection at INFO; keep our logs readable.
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.WARNING)
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
        if not self._ready.wait(timeout) or self._error is not None:
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
