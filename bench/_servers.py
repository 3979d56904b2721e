"""Server processes for the benchmarks: shipped commands and each bench's own ``--serve``."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path


class Server:
    """One server process: a shipped ``edgefleet`` command or a bench's ``--serve`` child."""

    def __init__(self, name: str, argv: list[str], health: str, port: int, log: Path) -> None:
        from tests.support.shipped import env

        self.name, self.port = name, port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log
        with open(log, "ab") as fh:
            self.proc = subprocess.Popen(
                argv, stdout=fh, stderr=subprocess.STDOUT, cwd=log.parent, env=env()
            )
        if health:
            self._wait(self.url + health)

    def _wait(self, url: str) -> None:
        import httpx

        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = self.log_path.read_text()[-3000:]
                raise RuntimeError(f"{self.name} did not start:\n{log}")
            time.sleep(0.1)

    @classmethod
    def edgefleet(cls, name: str, args: list[str], health: str, port: int, log: Path) -> Server:
        """``edgefleet ARGS`` (the console command's module), ready once ``health`` is 200."""
        return cls(name, [sys.executable, "-m", "edgefleet", *args], health, port, log)

    @classmethod
    def agent(cls, name: str, config: Path, port: int) -> Server:
        """``edgefleet agent run --config CONFIG``, ready once a model is loaded."""
        args = ["agent", "run", "--config", str(config)]
        return cls.edgefleet(name, args, "/v1/ready", port, config.parent / "agent.log")

    @classmethod
    def child(
        cls, kind: str, workdir: Path, health: str = "/health", module: str = "bench.agent_latency"
    ) -> Server:
        """``python -m MODULE --serve KIND --port P --workdir W`` (a bench's own server)."""
        from tests.support.brokers import free_port

        port = free_port()
        argv = [sys.executable, "-m", module, "--serve", kind, "--port", str(port)]
        argv += ["--workdir", str(workdir)]
        log = workdir / f"{kind}-{port}.log"
        server = cls(kind, argv, health, port, log)
        return server

    def cpu_s(self) -> float:
        import psutil

        t = psutil.Process(self.proc.pid).cpu_times()
        return t.user + t.system

    def rss_mb(self) -> float:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss / 2**20

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
