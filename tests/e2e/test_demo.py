"""The README's main job: ``edgefleet demo``, run through the CLI and checked by outcome."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

pytestmark = [pytest.mark.slow]


def run_demo(tmp_path: Any, *extra: str) -> tuple[dict[str, Any], str]:
    out = tmp_path / "summary.json"
    argv = ["demo", "--devices", "20", "--summary-json", str(out), *extra]
    proc = subprocess.run(
        [sys.executable, "-m", "edgefleet", *argv], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def check_outcome(s: dict[str, Any]) -> None:
    versions = {d["device_id"]: d["version"] for d in s["devices"]}
    assert len(versions) == 20
    # v1 everywhere at the end: v2 halted at stage 1 and its canaries were rolled back.
    assert set(versions.values()) == {"1.0.0"}, versions
    assert s["v2_halted"] is True
    assert s["failing"] and set(s["failing"]) <= set(s["canaries"])
    assert s["stage1_only"] is True
    v1, v2 = s["rollouts"]
    assert v1["state"] == "succeeded"
    assert v2["state"] in ("halted", "rolled_back")
    outside = [d for d in v2["devices"] if d["stage"] != 0]
    assert outside and all(d["state"] == "queued" for d in outside)
    # Drift fired centrally and reached the alert log the dashboard shows.
    assert s["drift"]["dataset_drift"] is True
    assert any((a.get("data") or {}).get("alert_kind") == "drift" for a in s["alerts"])
    assert s["dashboard_shows_drift"] is True  # logged in, read off the overview page
    # Traffic flowed through every agent's local API with no errors.
    # ("not ready" answers before v1 reached a device are counted apart, not as errors)
    assert all(d["requests"] > 0 and d["errors"] == 0 for d in s["devices"]), s["error_samples"]


def test_demo_halts_failing_canaries_rolls_back_and_fires_drift(tmp_path):
    s, stdout = run_demo(tmp_path)
    check_outcome(s)
    # Progress from the first second: this line comes before any heavy import.
    assert stdout.splitlines()[0].startswith("edgefleet demo: starting")
    # The dashboard closes with the demo, so its URL is shown only with --keep-running.
    assert "Dashboard:" not in stdout and "/ui/" not in stdout and "http://" not in stdout
    assert "not ready: requests answered 503" in stdout
    tail = stdout[stdout.index("Try next") :]
    assert "edgefleet demo --keep-running" in tail and "edgefleet build" in tail


@pytest.mark.mosquitto
def test_demo_runs_the_same_story_against_an_external_mosquitto(tmp_path, mosquitto_broker):
    # A broker in use: a real device's retained state must not be pulled into the demo.
    from protocol import Topics
    from protocol.messages import DeviceState
    from protocol.transport_paho import PahoTransport

    other = PahoTransport(mosquitto_broker.url, "stranger-device", clean_session=True)
    other.connect()
    state = DeviceState(device_id="stranger", online=True, profile="host")
    assert other.publish(Topics().state("stranger"), state.to_json(), retain=True).wait(5)
    other.close()
    s, stdout = run_demo(tmp_path, "--broker", mosquitto_broker.url)
    check_outcome(s)
    assert "stranger" not in json.dumps(s)
    assert f"external broker at {mosquitto_broker.url}" in stdout
