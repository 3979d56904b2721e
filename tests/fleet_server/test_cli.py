"""The fleet CLI through typer's CliRunner, talking to the API in-process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import click
import httpx
import pytest
import typer
from typer.testing import CliRunner

from fleet_server import cli
from fleet_server.app import create_app
from fleet_server.client import FleetClient
from fleet_server.config import load_config
from protocol import KeyPair
from tests.fleet_server.fleetkit import SyncASGITransport, make_config
from tests.fleet_server.test_api import Fleet
from tests.support.bundles import make_bundle

runner = CliRunner()


@pytest.fixture
def fleet(tmp_path: Path, signing_key: KeyPair, monkeypatch: pytest.MonkeyPatch) -> Iterator[Fleet]:
    f = Fleet(tmp_path, signing_key)
    http = httpx.Client(transport=SyncASGITransport(create_app(f.service)), base_url="http://fleet")

    def make(url: str | None, token: str | None) -> FleetClient:
        return FleetClient("http://fleet", token, http=http)

    monkeypatch.setattr(cli, "client", make)
    yield f
    http.close()
    f.service.repo.close()


@pytest.fixture(scope="module")
def bundle_file(tmp_path_factory: pytest.TempPathFactory, signing_key: KeyPair) -> Path:
    path = tmp_path_factory.mktemp("b") / "iris-1.0.0.efb"
    path.write_bytes(make_bundle(signing_key)[0])
    return path


def run(*args: str, token: str | None = None) -> object:
    extra = ["--token", token] if token else []
    return runner.invoke(cli.app, [*args, *extra])


def _walk(cmd: click.Command, path: str = "") -> Iterator[tuple[str, click.Command]]:
    yield path, cmd
    if hasattr(cmd, "commands"):
        for name, sub in cmd.commands.items():
            yield from _walk(sub, f"{path} {name}".strip())


def test_every_command_has_help_with_an_example() -> None:
    root = typer.main.get_command(cli.app)
    for path, cmd in _walk(root):
        assert cmd.help, path
        if not hasattr(cmd, "commands"):
            assert "Example: edgefleet" in cmd.help, path


def test_init_writes_a_config_that_loads_into_the_defaults(tmp_path: Path) -> None:
    out = tmp_path / "fleet.toml"
    r = runner.invoke(cli.app, ["fleet", "init", "--out", str(out)])
    assert r.exit_code == 0, r.output
    cfg = load_config(out)
    assert cfg.api.port == 8700 and cfg.rollout.failure_threshold == 0.2
    again = runner.invoke(cli.app, ["fleet", "init", "--out", str(out)])
    assert again.exit_code == 1 and "exists" in again.output


def test_token_create_prints_a_working_token_once(tmp_path: Path, signing_key: KeyPair) -> None:
    from fleet_server.service import FleetService

    cfg = make_config(tmp_path, signing_key)
    toml = tmp_path / "fleet.toml"
    toml.write_text(
        f'data_dir = "{cfg.data_dir}"\n[signing]\nbundle_keys = ["{cfg.signing.bundle_keys[0]}"]\n',
        encoding="utf-8",
    )
    r = runner.invoke(
        cli.app, ["fleet", "token", "create", "--role", "operator", "--config", str(toml)]
    )
    assert r.exit_code == 0, r.output
    token = r.stdout.strip().splitlines()[0]
    svc = FleetService(load_config(toml))
    assert svc.authenticate_token(token) == "operator"
    assert token not in (tmp_path / "fleet" / "fleet.db").read_bytes().decode("latin-1")
    svc.repo.close()
    bad = runner.invoke(
        cli.app, ["fleet", "token", "create", "--role", "root", "--config", str(toml)]
    )
    assert bad.exit_code == 1 and "role" in bad.output


def test_push_list_and_roll_out_with_wait(fleet: Fleet, bundle_file: Path) -> None:
    op = fleet.tokens["operator"]
    for i in range(4):
        fleet.device(f"d{i}", tags=("lab",))
    r = run("fleet", "bundles", "push", str(bundle_file), token=op)
    assert r.exit_code == 0, r.output
    assert "uploaded iris 1.0.0" in r.output
    r = run("fleet", "bundles", "list", token=op)
    assert "iris" in r.output and "1.0.0" in r.output
    r = run("fleet", "devices", "list", "--tag", "lab", token=op)
    assert "4 devices" in r.output
    fleet.service.start()  # background tick drives the stages
    try:
        r = run(
            "rollout",
            "start",
            "iris@1.0.0",
            "--selector",
            "tag=lab",
            "--stages",
            "25,50,100",
            "--wait",
            "--wait-timeout",
            "30",
            token=op,
        )
    finally:
        fleet.service.stop()
    assert r.exit_code == 0, r.output
    assert "succeeded" in r.output
    assert all(d.model is not None for d in fleet.devices.values())


def test_dry_run_lists_the_canaries_and_sends_nothing(fleet: Fleet, bundle_file: Path) -> None:
    for i in range(4):
        fleet.device(f"d{i}")
    run("fleet", "bundles", "push", str(bundle_file), token=fleet.tokens["operator"])
    r = run(
        "rollout",
        "start",
        "iris@1.0.0",
        "--stages",
        "1,4",
        "--count",
        "--dry-run",
        token=fleet.tokens["operator"],
    )
    assert r.exit_code == 0, r.output
    assert "stage 1: d" in r.output
    assert all(not d.commands for d in fleet.devices.values())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["rollout", "start", "iris@1.0.0", "--selector", "colour=red"], "selector key"),
        (["rollout", "start", "iris@1.0.0", "--stages", "5,x"], "--stages"),
        (["rollout", "start", "iris@9.9.9"], "no bundle"),
        (["rollout", "status", "r-nope"], "unknown rollout"),
        (["rollout", "start", "iris@1.0.0", "--selector", "id=ghost"], "unknown device"),
    ],
)
def test_bad_input_is_one_line_and_exit_1(
    fleet: Fleet, bundle_file: Path, args: list[str], message: str
) -> None:
    fleet.device("d1")
    run("fleet", "bundles", "push", str(bundle_file), token=fleet.tokens["operator"])
    r = run(*args, token=fleet.tokens["operator"])
    assert r.exit_code == 1
    assert message in r.output
    assert "Traceback" not in r.output


def test_missing_token_says_how_to_set_it(fleet: Fleet) -> None:
    r = run("fleet", "devices", "list")
    assert r.exit_code == 1
    assert "401" in r.output and "EDGEFLEET_TOKEN" in r.output


def test_viewer_token_cannot_push(fleet: Fleet, bundle_file: Path) -> None:
    r = run("fleet", "bundles", "push", str(bundle_file), token=fleet.tokens["viewer"])
    assert r.exit_code == 1 and "403" in r.output


def test_rollout_actions_and_status(fleet: Fleet, bundle_file: Path) -> None:
    op = fleet.tokens["operator"]
    fleet.device("d1")
    fleet.device("d2", fail_install=True)
    run("fleet", "bundles", "push", str(bundle_file), token=op)
    r = run(
        "rollout",
        "start",
        "iris@1.0.0",
        "--stages",
        "100",
        "--failure-threshold",
        "0.4",
        "--min-devices",
        "2",
        token=op,
    )
    fleet.service.tick()  # d2's retry is sent and fails again
    fleet.service.tick()  # now 1 of 2 reported failed: over 40 % with 2 reported
    rid = fleet.service.list_rollouts()[0]["rollout_id"]
    r = run("rollout", "status", rid, "--devices", token=op)
    assert r.exit_code == 0, r.output
    assert "halted" in r.output and "smoke_test_failed" in r.output
    r = run("rollout", "pause", rid, token=op)
    assert r.exit_code == 1 and "cannot pause" in r.output
    r = run("rollout", "rollback", rid, token=op)
    assert r.exit_code == 0 and "rolled_back" in r.output
    assert "r-" in run("rollout", "list", token=op).output


def test_drift_report_shows_the_servers_drift_results(fleet: Fleet, bundle_file: Path) -> None:
    from datetime import datetime, timezone

    import numpy as np

    from protocol import build_reference
    from protocol.messages import ModelRef, SketchReport
    from tests.support.bundles import trained

    if fleet.service.drift is None:
        pytest.skip("fleet_server.drift is not installed")
    r = run("drift", "report", token=fleet.tokens["viewer"])
    assert r.exit_code == 0 and "no drift results yet" in r.output
    run("fleet", "bundles", "push", str(bundle_file), token=fleet.tokens["operator"])
    fleet.service.drift.config = type(fleet.service.drift.config)(min_rows=50)
    tm = trained("iris-logreg")
    now = datetime.now(timezone.utc)
    report = SketchReport(
        device_id="d1",
        model=ModelRef(name="iris", version="1.0.0", release=1),
        window_start=now,
        window_end=now,
        seq=1,
        sketches=build_reference(tm.X + np.float32(3.0), tm.input_schema),
    )
    fleet.service.on_sketch(report)
    fleet.service.evaluate_drift("iris", "1.0.0")
    r = run("drift", "report", "--model", "iris", token=fleet.tokens["viewer"])
    assert r.exit_code == 0, r.output
    assert "iris" in r.output and "YES" in r.output and "4/4" in r.output


def test_telemetry_tail_shows_a_readable_line_per_message(amqtt_broker: object) -> None:
    from protocol.messages import DeviceState
    from protocol.transport_paho import PahoTransport

    url = amqtt_broker.url  # type: ignore[attr-defined]
    t = PahoTransport(url, "tail-pub", clean_session=True)
    t.connect()
    state = DeviceState(device_id="tail-dev", online=True, profile="raspberry-pi-4")
    assert t.publish("tailtest/devices/tail-dev/state", state.to_json(), retain=True).wait(5)
    t.close()
    r = runner.invoke(
        cli.app,
        [
            "telemetry",
            "tail",
            "tailtest/devices/+/state",
            "--broker",
            url,
            "--prefix",
            "tailtest",
            "--limit",
            "1",
            "--duration",
            "10",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "tail-dev" in r.output and "raspberry-pi-4" in r.output
    assert r.output.count("\n") == 1
