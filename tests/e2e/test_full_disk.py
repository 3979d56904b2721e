"""Full disk: the agent's data directory is a small tmpfs that we fill to the last byte.

The agent process keeps answering every request, reports the condition (``disk_full`` in
its MetricsReport ``conditions`` on MQTT and as a gauge on its local ``/metrics``), and the
outbox degrades as its design says (agent/outbox.py): what cannot be stored is counted,
serving never stops, and once space is freed telemetry flows again without a restart.

Needs ``mount -t tmpfs`` (root, as on the CI machine); without it the test is skipped with
the reason, never passed.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from protocol import KeyPair
from protocol.messages import MetricsReport
from tests.e2e.conftest import Release
from tests.e2e.support import (
    AgentProcess,
    BrokerRecorder,
    Traffic,
    edgefleet,
    make_fleet,
    wait_until,
    write_agent_config,
)

pytestmark = [pytest.mark.slow, pytest.mark.mosquitto]

DISK_MB = 16
DEVICE = "disk-1"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "data"
    mnt.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m,mode=0700", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for the data disk: {mounted.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(folder: Path) -> int:
    """Write a filler file until the disk refuses one more byte; return its size."""
    path = folder / "filler.bin"
    block = b"\xa5" * 65536
    size = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for piece in (block, b"\xa5" * 512, b"\xa5"):
            while True:
                try:
                    size += os.write(fd, piece)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
    finally:
        os.close(fd)
    return size


def metrics_of(recorder: BrokerRecorder) -> list[MetricsReport]:
    return [
        MetricsReport.model_validate_json(m.payload)
        for device, m in recorder.by_kind("metrics")
        if device == DEVICE
    ]


def test_agent_keeps_serving_and_reports_a_full_data_disk(
    tmp_path: Path,
    small_disk: Path,
    mosquitto: Any,
    signing_key: KeyPair,
    key_files: dict[str, Path],
    iris_v1: Release,
) -> None:
    service = make_fleet(tmp_path, mosquitto.url, bundle_keys=[key_files["signing"]])
    recorder = BrokerRecorder(mosquitto.url).start()
    config = write_agent_config(
        tmp_path / "device",
        device_id=DEVICE,
        broker_url=mosquitto.url,
        bundle_keys=[key_files["signing"]],
        data_dir=small_disk,
        window_s=1.0,
    )
    out = edgefleet("agent", "install", str(iris_v1.write(tmp_path)), "--config", str(config))
    assert out.returncode == 0, out.stderr
    agent = AgentProcess(config).start()
    traffic = Traffic([agent], threads=2, pause_s=0.01)
    try:
        agent.wait_api(ready=True)
        wait_until(
            lambda: metrics_of(recorder), 30, "the first metrics report before the disk fills"
        )
        traffic.start()
        time.sleep(2)
        filled = fill(small_disk)
        full_at = time.time()
        assert filled > 0

        # The condition is reported on MQTT and on the local /metrics.
        def reported_full() -> bool:
            return any("disk_full" in m.conditions for m in metrics_of(recorder))

        def gauge_full() -> bool:
            text = agent.get("/metrics").text
            return 'condition="disk_full"} 1' in text

        wait_until(gauge_full, 30, "disk_full on the agent's local /metrics")
        wait_until(reported_full, 30, "a MetricsReport with disk_full to reach the broker")
        time.sleep(3)  # keep serving on a full disk for a while
        served_full = traffic.count(full_at, time.time())
        assert agent.alive(), agent.log()
        assert traffic.failures() == [], traffic.failures()[:5]
        assert served_full > 50, f"only {served_full} requests answered on the full disk"
        full = agent.get("/v1/status").json()
        print("\n/v1/status on a full disk:", json.dumps(full)[:800])
        assert "disk_full" in full["conditions"]
        # The outbox counts what it could not store instead of failing (its design).
        assert {"dropped_disk_full", "published", "messages"} <= set(full["outbox"])

        # Free the space: telemetry flows again and the condition clears, no restart needed.
        (small_disk / "filler.bin").unlink()
        freed_at = time.time()

        def healthy_again() -> bool:
            later = [m for m in metrics_of(recorder) if m.window_start.timestamp() > freed_at]
            return any("disk_full" not in m.conditions for m in later)

        wait_until(healthy_again, 30, "a clean MetricsReport after the disk was freed")
        # Delivery resumed on its own: more published, and the outbox drains again.
        wait_until(
            lambda: agent.get("/v1/status").json()["outbox"]["messages"] == 0,
            30,
            "the outbox to drain after the disk was freed",
        )
        after = agent.get("/v1/status").json()["outbox"]
        assert after["published"] > full["outbox"]["published"]
        assert "disk_full" not in [c for c in metrics_of(recorder)[-1].conditions], (
            "disk_full still reported after the space came back"
        )
        assert agent.predict().status_code == 200
        assert traffic.failures() == []
    finally:
        traffic.stop()
        agent.close()
        recorder.close()
        service.stop()
