"""The shipped entry points as a user runs them: configs from ``init``, servers as processes.

* :func:`init_config` runs ``edgefleet agent init`` / ``edgefleet fleet init`` and then sets
  a few keys in the written file (ports, paths, keys), as a user edits it.
* :func:`start` runs ``edgefleet …`` as a child process and waits until ``url`` answers.

Used by the socket-option and API-hardening tests and by ``bench/agent_latency.py`` and
``bench/fleet_api_latency.py``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parents[2]


def env() -> dict[str, str]:
    out = dict(os.environ)
    out["PYTHONPATH"] = str(REPO) + os.pathsep + out.get("PYTHONPATH", "")
    out.pop("EDGEFLEET_DEBUG", None)
    return out


def edgefleet(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """``edgefleet ARGS`` in a subprocess; raises with its stderr when it fails."""
    out = subprocess.run(
        [sys.executable, "-m", "edgefleet", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env(),
        cwd=REPO,
    )
    if out.returncode != 0:
        raise RuntimeError(f"edgefleet {' '.join(args)} exited {out.returncode}: {out.stderr}")
    return out


def _toml_value(value: Any) -> str:
    return json.dumps(str(value) if isinstance(value, Path) else value)


def set_keys(text: str, values: dict[str, Any]) -> str:
    """Set ``"section.key"`` (or top-level ``"key"``) in TOML text written by ``init``:
    the existing line, commented out or not, is replaced; a missing key is added to its
    section. Comments after the value are dropped."""
    lines = text.splitlines()
    for dotted, value in values.items():
        section, _, key = dotted.rpartition(".")
        current, start, found = "", None, False
        for i, line in enumerate(lines):
            m = re.match(r"\s*\[([^\]]+)\]", line)
            if m:
                current = m.group(1).strip()
                if current == section:
                    start = i
                continue
            if current == section and re.match(rf"\s*#?\s*{re.escape(key)}\s*=", line):
                lines[i] = f"{key} = {_toml_value(value)}"
                found = True
                break
        if found:
            continue
        if section and start is None:
            lines += [f"[{section}]", f"{key} = {_toml_value(value)}"]
        elif section:
            assert start is not None
            lines.insert(start + 1, f"{key} = {_toml_value(value)}")
        else:
            first = next((i for i, ln in enumerate(lines) if ln.lstrip().startswith("[")), 0)
            lines.insert(first, f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def init_config(program: str, path: Path, values: dict[str, Any]) -> Path:
    """``edgefleet PROGRAM init --out PATH``, then the given keys set in it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    edgefleet(program, "init", "--out", str(path), "--force")
    path.write_text(set_keys(path.read_text(), values))
    return path


class Process:
    """``edgefleet ARGS`` as a child process (its own session), output to ``log``."""

    def __init__(self, args: list[str], log: Path, cwd: Path | None = None) -> None:
        self.log_path = log
        fh: IO[bytes] = open(log, "ab")  # noqa: SIM115 - the child owns it
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edgefleet", *args],
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=env(),
                cwd=cwd or log.parent,
                start_new_session=True,
            )
        finally:
            fh.close()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def wait_http(self, url: str, timeout: float = 90.0) -> None:
        """Until ``GET url`` answers 200 (fails with the process's log if it exits)."""
        import httpx

        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(url, timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not answer within {timeout:.0f}s:\n{self.log()}")
            time.sleep(0.1)

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def __enter__(self) -> Process:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
