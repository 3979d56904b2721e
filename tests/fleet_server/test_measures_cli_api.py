"""The measuring routes and commands: bad input gets 4xx/exit 1 naming the field, good input
gets the tables (API in-process, CLI through CliRunner)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest

from fleet_server import cli
from fleet_server.app import create_app
from fleet_server.client import FleetClient
from protocol import KeyPair
from protocol.messages import MetricsReport, ModelRef, verify_command
from protocol.signing import TrustStore
from tests.fleet_server.fleetkit import SyncASGITransport
from tests.fleet_server.test_api import Fleet
from tests.support.bundles import make_bundle
from tests.support.cli import run_cli
from tests.support.keys import COMMAND_KEY

REF = ModelRef(name="iris", version="1.0.0", release=1)


@pytest.fixture
def fleet(tmp_path: Path, signing_key: KeyPair, monkeypatch: pytest.MonkeyPatch) -> Iterator[Fleet]:
    f = Fleet(tmp_path, signing_key)
    f.service.upload_bundle(make_bundle(signing_key)[0])
    http = httpx.Client(transport=SyncASGITransport(create_app(f.service)), base_url="http://fleet")
    monkeypatch.setattr(
        cli,
        "client",
        lambda url, token: FleetClient("http://fleet", f.tokens["operator"], http=http),
    )
    yield f
    http.close()
    f.service.repo.close()


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "field"),
    [
        ("GET", "/v1/drift/scopes?by=planet", None, 422, "by"),
        ("GET", "/v1/accuracy?by=moon", None, 422, "by"),
        ("GET", "/v1/devices/nope/measures", None, 404, "device_id"),
        ("POST", "/v1/benchmarks", {"bundle": "iris@1.0.0", "sample": 0}, 422, "sample"),
        ("POST", "/v1/benchmarks", {"bundle": "iris@1.0.0", "runs": 5}, 422, "runs"),
        ("POST", "/v1/benchmarks", {"bundle": "nope@9"}, 404, "bundle"),
        (
            "POST",
            "/v1/benchmarks",
            {"bundle": "iris@1.0.0", "selector": "planet=x"},
            422,
            "selector",
        ),
        ("POST", "/v1/benchmarks", {"bundle": "iris@1.0.0"}, 404, "selector"),  # no device runs it
    ],
)
def test_bad_input_gets_4xx_naming_the_field(
    fleet: Fleet, method: str, path: str, body: dict | None, status: int, field: str
) -> None:
    r = fleet.as_("operator").request(method, path, json=body)
    assert r.status_code == status, r.text
    assert r.json()["field"] == field


def test_viewer_reads_but_cannot_start_a_field_benchmark(fleet: Fleet) -> None:
    assert fleet.as_("viewer").get("/v1/calibration").status_code == 200
    assert (
        fleet.as_("viewer").post("/v1/benchmarks", json={"bundle": "iris@1.0.0"}).status_code == 403
    )


def test_field_benchmark_sends_signed_commands_to_a_sample_running_the_bundle(
    fleet: Fleet, signing_key: KeyPair
) -> None:
    for i in range(4):
        fleet.device(f"pi-{i}", tags=("lab",) if i < 3 else (), model=REF)
    fleet.device("other", tags=("lab",))  # runs nothing: not picked
    r = fleet.as_("operator").post(
        "/v1/benchmarks",
        json={"bundle": "iris@1.0.0", "selector": "tag=lab", "sample": 2, "runs": 50},
    )
    assert r.status_code == 202, r.text
    picked = r.json()["devices"]
    assert len(picked) == 2 and set(picked) <= {"pi-0", "pi-1", "pi-2"}
    trust = TrustStore.from_keys([COMMAND_KEY.public])  # the fleet's command key signs it
    for dev in picked:
        (cmd,) = [c for c in fleet.devices[dev].commands if c.kind == "benchmark"]
        assert verify_command(cmd, trust) and cmd.benchmark is not None and cmd.benchmark.runs == 50
        assert cmd.issued_at is not None and cmd.expires_at is not None  # fresh for the device
    assert not [c for c in fleet.devices["pi-3"].commands if c.kind == "benchmark"]


def test_cli_reports_drift_by_scope_accuracy_alerts_and_calibration(fleet: Fleet) -> None:
    out = run_cli(["drift", "report", "--by", "device"])
    assert out.exit_code == 0 and "no drift results by device yet" in out.stdout
    bad = run_cli(["drift", "report", "--by", "planet"])
    assert bad.exit_code == 1 and "--by must be device, tag or profile" in bad.stderr
    end = datetime.now(timezone.utc)
    fleet.service.on_metrics(
        MetricsReport(
            device_id="pi-0", seq=1, window_start=end, window_end=end, model=REF,
            requests=40, feedback_count=40, accuracy=0.9,
        )
    )  # fmt: skip
    acc = run_cli(["fleet", "accuracy", "--by", "device"])
    assert acc.exit_code == 0 and "pi-0" in acc.stdout and "90.0%" in acc.stdout
    doc = json.loads(run_cli(["fleet", "accuracy", "--json"]).stdout)
    assert doc[0]["labelled"] == 40 and doc[0]["ci_low"] < 0.9 < doc[0]["ci_high"]
    alerts = run_cli(["fleet", "alerts"])
    assert alerts.exit_code == 0 and "no health alert is firing" in alerts.stdout
    cal = json.loads(run_cli(["fleet", "calibration", "--json"]).stdout)
    assert cal["profiles"] == [] and cal["samples"] == 0
