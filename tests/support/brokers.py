"""Real MQTT brokers for tests and benchmarks: amqtt in-process, Mosquitto as a subprocess."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from fleet_server.embedded_broker import EmbeddedBroker
from tests.support.ports import free_port

MOSQUITTO = shutil.which("mosquitto") or (
    "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
)

__all__ = ["MOSQUITTO", "EmbeddedBroker", "Mosquitto", "free_port", "wait_port"]


def wait_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port}")


class Mosquitto:
    """A Mosquitto process on an ephemeral localhost port; ``stop()``/``start()`` for outages.

    ``config`` replaces the default (anonymous, no persistence) configuration; ``{port}``
    and ``{dir}`` in it are filled in.
    """

    def __init__(self, config: str | None = None, port: int | None = None) -> None:
        if MOSQUITTO is None:
            raise RuntimeError("mosquitto is not installed")
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="edgefleet-mosq-"))
        text = (
            config
            or "listener {port} 127.0.0.1\nallow_anonymous true\n"
            "persistence true\npersistence_location {dir}/\n"
        )
        text = text.format(port=self.port, dir=self.dir)
        if os.geteuid() == 0:
            # Started as root, Mosquitto drops to the "mosquitto" user and then cannot read
            # the test's private temp folders; tests keep the invoking user instead.
            text = "user root\n" + text
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text(text)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> Mosquitto:
        self.log = open(self.dir / "mosquitto.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [str(MOSQUITTO), "-c", str(self.conf)], stdout=self.log, stderr=self.log
        )
        wait_port("127.0.0.1", self.port)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
            self.log.close()

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
