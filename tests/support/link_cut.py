"""A TCP link between an MQTT client and its broker that a test can make lose traffic.

:class:`CuttableLink` listens on a loopback port and forwards every connection to the
broker, byte for byte, on two threads per connection. ``drop()`` makes it a dying link:
it keeps the open connections' sockets open and reads what either side sends, and throws
it away (no FIN, no RST), so the broker still counts the client as connected and writes to
it, and the client hears nothing. ``cut()`` then closes those connections (the broker
publishes the client's will; the client reconnects, and a new connection is forwarded).
``dropped`` counts the bytes thrown away in each direction.
"""

from __future__ import annotations

import socket
import threading
from collections import Counter

from tests.support.ports import free_port


class CuttableLink:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = free_port()
        self.dropped: Counter[str] = Counter()  # "to_broker" / "to_client" → bytes
        self.connections = 0
        self._dropping: set[socket.socket] = set()  # sources whose bytes are thrown away
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._closed = False
        threading.Thread(target=self._accept, name="link-accept", daemon=True).start()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                broker = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            broker.settimeout(None)
            with self._lock:
                self._pairs.append((client, broker))
                self.connections += 1
            for src, dst, way in ((client, broker, "to_broker"), (broker, client, "to_client")):
                threading.Thread(target=self._pump, args=(src, dst, way), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, way: str) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                for s in (src, dst):
                    try:
                        s.close()
                    except OSError:
                        pass
                return
            if src in self._dropping:
                with self._lock:
                    self.dropped[way] += len(data)
                continue
            try:
                dst.sendall(data)
            except OSError:
                return

    def drop(self) -> None:
        """From now on every byte of the open connections, either way, is thrown away."""
        with self._lock:
            self._dropping |= {s for pair in self._pairs for s in pair}

    def cut(self) -> None:
        """Close the open connections; those that follow are forwarded."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for s in pair:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        self.cut()
