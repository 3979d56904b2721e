"""The fleet CLI through the root ``edgefleet`` CLI, talking to the API in-process."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import click
import httpx
import pytest
import typer

from edgefleet.cli import EXIT_ADDRESS_IN_USE, EXIT_UNREACHABLE
from fleet_server import cli
from fleet_server.app import create_app
from fleet_server.client import FleetClient
from fleet_server.config import load_config
from protocol import KeyPair
from tests.fleet_server.fleetkit import SyncASGITransport, make_config
from tests.fleet_server.test_api import Fleet
from tests.support.bundles import make_bundle
from tests.support.cli import run_cli


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
    return run_cli([*args, *extra])


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
            assert "Example:\n  edgefleet" in cmd.help, path


def test_init_writes_a_config_that_loads_into_the_defaults(tmp_path: Path) -> None:
    out = tmp_path / "fleet.toml"
    r = run_cli(["fleet", "init", "--out", str(out)])
    assert r.exit_code == 0, r.output
    cfg = load_config(out)
    assert cfg.api.port == 8700 and cfg.rollout.failure_threshold == 0.2
    again = run_cli(["fleet", "init", "--out", str(out)])
    assert again.exit_code == 1 and "exists" in again.output


def test_token_create_prints_a_working_token_once(tmp_path: Path, signing_key: KeyPair) -> None:
    from fleet_server.service import FleetService

    cfg = make_config(tmp_path, signing_key)
    toml = tmp_path / "fleet.toml"
    toml.write_text(
        f'data_dir = "{cfg.data_dir}"\n[signing]\nbundle_keys = ["{cfg.signing.bundle_keys[0]}"]\n',
        encoding="utf-8",
    )
    r = run_cli(["fleet", "token", "create", "--role", "operator", "--config", str(toml)])
    assert r.exit_code == 0, r.output
    token = r.stdout.strip().splitlines()[0]
    svc = FleetService(load_config(toml))
    assert svc.authenticate_token(token) == "operator"
    assert token not in (tmp_path / "fleet" / "fleet.db").read_bytes().decode("latin-1")
    assert "only its hash is stored" in r.stderr and "not stored" not in r.stderr
    svc.repo.close()
    bad = run_cli(["fleet", "token", "create", "--role", "root", "--config", str(toml)])
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
    window = time.strftime("%Y-%m-%d", time.gmtime(fleet.service.drift_results()[0]["window"]))
    assert window in r.output


def test_telemetry_tail_shows_a_readable_line_per_message(amqtt_broker: object) -> None:
    from protocol.messages import DeviceState
    from protocol.transport_paho import PahoTransport

    url = amqtt_broker.url  # type: ignore[attr-defined]
    t = PahoTransport(url, "tail-pub", clean_session=True)
    t.connect()
    state = DeviceState(device_id="tail-dev", online=True, profile="raspberry-pi-4")
    assert t.publish("tailtest/devices/tail-dev/state", state.to_json(), retain=True).wait(5)
    t.close()
    r = run_cli(
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
    assert "tail-dev" in r.stdout and "raspberry-pi-4" in r.stdout
    assert r.stdout.count("\n") == 1
    assert f"waiting for messages on 'tailtest/devices/+/state' at {url}" in r.stderr


def test_telemetry_tail_asks_the_fleet_server_where_the_broker_is(
    tmp_path: Path, signing_key: KeyPair, amqtt_broker: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fleet_server.service import FleetService
    from protocol.transport import MemoryBroker

    url = amqtt_broker.url  # type: ignore[attr-defined]
    cfg = make_config(tmp_path, signing_key)
    broker = cfg.broker.model_copy(update={"public_url": url, "topic_prefix": "asked"})
    service = FleetService(
        cfg.model_copy(update={"broker": broker}), transport=MemoryBroker().client("s")
    )
    token = service.create_token("viewer")
    http = httpx.Client(transport=SyncASGITransport(create_app(service)), base_url="http://fleet")
    monkeypatch.setattr(cli, "client", lambda u, t: FleetClient("http://fleet", t, http=http))
    try:
        r = run_cli(
            ["telemetry", "tail", "asked/devices/+/status", "--duration", "0.5", "--token", token]
        )
    finally:
        http.close()
        service.repo.close()
    assert r.exit_code == 0, r.output
    assert f"waiting for messages on 'asked/devices/+/status' at {url}" in r.stderr


def test_telemetry_tail_without_a_server_says_how_to_name_the_broker() -> None:
    r = run_cli(
        ["telemetry", "tail", "edgefleet/devices/+/status", "--url", "http://127.0.0.1:9"],
        env={"EDGEFLEET_BROKER": ""},
    )
    assert r.exit_code == EXIT_UNREACHABLE, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: telemetry tail needs the broker")
    assert "--broker mqtt://" in lines[0] and "EDGEFLEET_BROKER" in lines[0]


def test_dry_run_with_a_bundle_file_uploads_and_creates_nothing(
    fleet: Fleet, bundle_file: Path
) -> None:
    fleet.device("d1")
    op = fleet.tokens["operator"]
    r = run("rollout", "start", str(bundle_file), "--dry-run", token=op)
    assert r.exit_code == 0, r.output
    assert "nothing uploaded, created or sent" in r.stdout and "not on the server" in r.stdout
    assert fleet.service.repo.list_bundles() == []
    assert fleet.service.list_rollouts() == []
    assert "created" not in r.stdout.replace("nothing uploaded, created", "")


def test_dry_run_with_a_bundle_file_already_on_the_server_shows_the_plan_only(
    fleet: Fleet, bundle_file: Path
) -> None:
    for i in range(3):
        fleet.device(f"d{i}")
    op = fleet.tokens["operator"]
    run("fleet", "bundles", "push", str(bundle_file), token=op)
    r = run(
        "rollout", "start", str(bundle_file), "--stages", "1,3", "--count", "--dry-run", token=op
    )
    assert r.exit_code == 0, r.output
    assert "dry run: nothing created or sent" in r.stdout and "to 3 devices" in r.stdout
    assert "stage 1: d" in r.stdout and "r-" not in r.stdout
    assert fleet.service.list_rollouts() == []
    assert len(fleet.service.repo.list_bundles()) == 1
    assert all(not d.commands for d in fleet.devices.values())


def test_serve_prints_one_start_line_naming_the_dashboard(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.support.brokers import free_port

    (tmp_path / "fleet.toml").write_text(
        f'data_dir = "data"\n[broker]\nurl = "mqtt://127.0.0.1:{free_port()}"\n',
        encoding="utf-8",
    )
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "edgefleet",
        "fleet",
        "serve",
        "--embedded-broker",
        "--port",
        str(port),
    ]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        before = []  # this config names no command key: the server says so first
        line = proc.stderr.readline()
        while line and not line.startswith("fleet server on"):
            before.append(line)
            line = proc.stderr.readline()
    finally:
        proc.terminate()
        proc.wait(20)
    assert line.startswith(f"fleet server on http://127.0.0.1:{port}")
    assert f"dashboard http://127.0.0.1:{port}/ui/" in line
    assert all("signing.command_key is not set" in b for b in before), before


def _listening(port: int) -> object:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", port))
    s.listen()
    return s


def test_serve_on_a_busy_port_is_one_line_and_exit_4(tmp_path: Path) -> None:
    from tests.support.brokers import free_port

    (tmp_path / "fleet.toml").write_text(f'data_dir = "{tmp_path / "data"}"\n', encoding="utf-8")
    port = free_port()
    with _listening(port):  # type: ignore[attr-defined]
        r = run_cli(["fleet", "serve", "-c", tmp_path / "fleet.toml", "--port", port])
    assert r.exit_code == EXIT_ADDRESS_IN_USE == 4, r.output
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: fleet API: 127.0.0.1:")
    assert "--port" in lines[0]


def test_busy_embedded_broker_port_is_one_line_and_exit_4(tmp_path: Path) -> None:
    from tests.support.brokers import free_port

    mqtt = free_port()
    (tmp_path / "fleet.toml").write_text(
        f'data_dir = "{tmp_path / "data"}"\n[broker]\nurl = "mqtt://127.0.0.1:{mqtt}"\n',
        encoding="utf-8",
    )
    with _listening(mqtt):  # type: ignore[attr-defined]
        r = run_cli(
            [
                "fleet",
                "serve",
                "-c",
                tmp_path / "fleet.toml",
                "--port",
                free_port(),
                "--embedded-broker",
            ]
        )
    assert r.exit_code == EXIT_ADDRESS_IN_USE, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: embedded MQTT broker:")
    assert "Traceback" not in r.output


def test_config_typo_suggests_the_nearest_key(tmp_path: Path) -> None:
    (tmp_path / "fleet.toml").write_text("[api]\nprot = 8700\n", encoding="utf-8")
    r = run_cli(["fleet", "serve", "-c", tmp_path / "fleet.toml"])
    assert r.exit_code == 1
    assert "api.prot: unknown key (did you mean 'port'?)" in r.stderr


def test_a_stage_with_no_devices_shows_as_empty_not_passed(fleet: Fleet, bundle_file: Path) -> None:
    op = fleet.tokens["operator"]
    for i in range(2):
        fleet.device(f"d{i}")
    run("fleet", "bundles", "push", str(bundle_file), token=op)
    r = run("rollout", "start", "iris@1.0.0", "--stages", "2,5", "--count", token=op)
    assert r.exit_code == 0, r.output
    for _ in range(4):
        fleet.service.tick()
    rid = fleet.service.list_rollouts()[0]["rollout_id"]
    out = run("rollout", "status", rid, token=op).stdout
    second = next(line for line in out.splitlines() if line.strip().startswith("│ 2 "))
    assert "empty (0 devices)" in second and "passed" not in second


def test_broker_urls_name_a_cluster_and_bad_ones_are_refused(tmp_path: Path) -> None:
    from fleet_server.config import parse_config
    from fleet_server.errors import ConfigError

    cfg = parse_config('[broker]\nurls = ["mqtt://n1:1883", "mqtt://n2:1883"]\n')
    assert cfg.broker.all_urls() == ["mqtt://n1:1883", "mqtt://n2:1883"]
    assert parse_config("").broker.all_urls() == ["mqtt://127.0.0.1:1883"]
    for text, message in [
        ('[broker]\nurls = ["mqtt://n1", "mqtts://n2"]\n', "mix mqtt"),
        ('[broker]\nurl = "ftp://x"\n', "scheme must be mqtt"),
        ('[broker]\nurls = ["mqtt://n1"]\nembedded = true\n', "embedded broker is one node"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_config(text)


def test_embedded_broker_flag_with_a_broker_list_is_one_readable_error(tmp_path: Path) -> None:
    cfg = tmp_path / "fleet.toml"
    cfg.write_text(
        f'data_dir = "{tmp_path / "fleet"}"\n[broker]\nurls = ["mqtt://n1:1883", "mqtt://n2:1883"]\n'
    )
    result = run_cli(["fleet", "serve", "--config", str(cfg), "--embedded-broker"])
    assert result.exit_code != 0
    assert "the embedded broker is one node" in result.output
    assert "Traceback" not in result.output
