"""``edgefleet agent run`` as a user starts it: one start line, then one line per link change."""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.support.brokers import free_port

ROOT = Path(__file__).resolve().parents[2]


class Lines:
    """The process's stderr, line by line, read on a thread."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.seen: list[str] = []
        self._q: queue.Queue[str] = queue.Queue()
        assert proc.stderr is not None
        stream = proc.stderr
        self.reader = threading.Thread(target=lambda: [self._q.put(x) for x in stream], daemon=True)
        self.reader.start()

    def wait_for(self, fragment: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._q.get(timeout=0.2)
            except queue.Empty:
                continue
            self.seen.append(line.rstrip("\n"))
            if fragment in line:
                return line
        raise AssertionError(f"no line with {fragment!r} in {self.seen}")


class BrokerProcess:
    """The embedded (amqtt) broker in a process of its own: ``stop()`` kills it, so the OS
    closes its sockets at once, as when a real broker goes away. (Stopped in this process,
    amqtt sometimes leaves its listener open, and the agent then waits a keep-alive.)"""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"mqtt://127.0.0.1:{self.port}"
        code = (
            "import time; from fleet_server.embedded_broker import EmbeddedBroker; "
            f"EmbeddedBroker(port={self.port}).start(); time.sleep(3600)"
        )
        self.proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)

    def start(self) -> BrokerProcess:
        import socket

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.1)
        raise AssertionError("the broker process did not start listening")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def test_agent_run_prints_a_start_line_and_each_link_state_change(tmp_path: Path) -> None:
    broker = BrokerProcess().start()
    config = tmp_path / "agent.toml"
    init = subprocess.run(
        [
            sys.executable, "-m", "edgefleet", "agent", "init", "--out", str(config),
            "--device-id", "pi-run", "--broker", broker.url, "--api-port", str(free_port()),
        ],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert init.returncode == 0, init.stderr
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgefleet", "agent", "run", "-c", str(config)],
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    lines = Lines(proc)
    try:
        start = lines.wait_for("agent pi-run")
        assert "no model installed yet" in start and "/v1/predict" in start
        assert f"broker {broker.url}" in start
        lines.wait_for(f"broker link connected: connected to {broker.url}")
        broker.stop()
        lines.wait_for(f"broker link lost: lost {broker.url}")
        lines.wait_for(f"broker link reconnecting: cannot reach {broker.url}")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        lines.reader.join(10)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        broker.stop()
    # one line per change: the start line first, no repeated "reconnecting" lines
    assert lines.seen[0] == start.rstrip("\n")
    assert sum("reconnecting" in x for x in lines.seen) == 1, "\n".join(lines.seen)


def test_agent_run_on_a_busy_api_port_says_so_in_one_line_and_exits_4(tmp_path: Path) -> None:
    import socket

    busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    config = tmp_path / "agent.toml"
    try:
        init = subprocess.run(
            [
                sys.executable, "-m", "edgefleet", "agent", "init", "--out", str(config),
                "--device-id", "pi-busy", "--api-port", str(port),
            ],
            capture_output=True, text=True, cwd=ROOT, timeout=60,
        )  # fmt: skip
        assert init.returncode == 0, init.stderr
        run = subprocess.run(
            [sys.executable, "-m", "edgefleet", "agent", "run", "-c", str(config)],
            capture_output=True, text=True, cwd=ROOT, timeout=60,
        )  # fmt: skip
    finally:
        busy.close()
    assert run.returncode == 4, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"127.0.0.1:{port} is in use" in errors[0], run.stderr
    assert "Traceback" not in run.stderr
