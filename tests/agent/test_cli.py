from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
import typer

from agent.cli import app
from agent.config import AgentConfig, load_config
from agent.prediction_log import PredictionLog
from tests.agent.test_prediction_log import _event
from tests.support.bundles import make_bundle
from tests.support.cli import run_cli


def invoke(*args: str):
    return run_cli(["agent", *args])


@pytest.fixture
def config(tmp_path: Path, signing_key) -> Path:
    (tmp_path / "release.pub").write_bytes(signing_key.public_pem())
    path = tmp_path / "agent.toml"
    assert invoke("init", "--out", str(path)).exit_code == 0
    text = path.read_text().replace("bundle_keys = []", 'bundle_keys = ["release.pub"]')
    path.write_text(text)
    return path


def test_init_pins_bundle_and_command_keys_and_artifact_origins(
    tmp_path: Path, signing_key, command_key
) -> None:
    (tmp_path / "release.pub").write_bytes(signing_key.public_pem())
    (tmp_path / "fleet.pub").write_bytes(command_key.public_pem())
    path = tmp_path / "agent.toml"
    r = invoke(
        "init",
        "--out",
        str(path),
        "--bundle-key",
        str(tmp_path / "release.pub"),
        "--command-key",
        str(tmp_path / "fleet.pub"),
        "--artifact-origin",
        "https://fleet.example:8700",
    )
    assert r.exit_code == 0, r.output
    bundle, command = load_config(path).trust_stores()
    assert list(bundle.keys) == [signing_key.key_id]
    assert list(command.keys) == [command_key.key_id]
    assert load_config(path).trust.artifact_origins == ["https://fleet.example:8700"]


def test_init_refuses_one_key_in_both_roles(tmp_path: Path, signing_key) -> None:
    (tmp_path / "k.pub").write_bytes(signing_key.public_pem())
    path = tmp_path / "agent.toml"
    key = str(tmp_path / "k.pub")
    r = invoke("init", "-o", str(path), "--bundle-key", key, "--command-key", key)
    assert r.exit_code == 1 and "both a bundle key and a command key" in r.stderr
    assert not path.exists()


def test_install_of_another_model_name_needs_replace_model(
    config: Path, bundles, signing_key, tmp_path: Path
) -> None:
    assert invoke("install", str(bundles["v1"]), "-c", str(config)).exit_code == 0
    other = tmp_path / "other.efb"
    other.write_bytes(make_bundle(signing_key, name="wine", version="1.0.0", release=1)[0])
    r = invoke("install", str(other), "-c", str(config))
    assert r.exit_code == 1 and "model_name_mismatch" in r.stderr
    r = invoke("install", str(other), "-c", str(config), "--replace-model")
    assert r.exit_code == 0 and "installed wine 1.0.0" in r.output


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, signing_key, other_key) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bundles")
    out = {}
    for tag, key, version, release in (
        ("v1", signing_key, "1.0.0", 1),
        ("v2", signing_key, "1.1.0", 2),
        ("untrusted", other_key, "9.0.0", 9),
    ):
        data, _ = make_bundle(key, version=version, release=release)
        (d / f"{tag}.efb").write_bytes(data)
        out[tag] = d / f"{tag}.efb"
    return out


def test_init_writes_the_commented_example_and_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    r = invoke("init", "--out", str(path))
    assert r.exit_code == 0 and f"wrote {path}" in r.output
    assert load_config(path).api == AgentConfig().api
    r = invoke("init", "--out", str(path))
    assert r.exit_code == 1 and "error:" in r.output and "--force" in r.output
    assert invoke("init", "--out", str(path), "--force").exit_code == 0


def test_install_status_and_rollback_work_offline(config: Path, bundles) -> None:
    r = invoke("install", str(bundles["v1"]), "-c", str(config))
    assert r.exit_code == 0 and "installed iris 1.0.0 (release 1)" in r.output
    assert invoke("install", str(bundles["v2"]), "-c", str(config)).exit_code == 0
    r = invoke("status", "-c", str(config))
    assert r.exit_code == 0
    assert "1.1.0" in r.output and "1.0.0" in r.output and "onnxruntime" in r.output
    st = json.loads(invoke("status", "-c", str(config), "--json").output)
    assert [s["version"] for s in st["slots"] if s["active"]] == ["1.1.0"]
    r = invoke("rollback", "-c", str(config))
    assert r.exit_code == 0 and "rolled back to iris 1.0.0 (release 1)" in r.output
    st = json.loads(invoke("status", "-c", str(config), "--json").output)
    assert [s["version"] for s in st["slots"] if s["active"]] == ["1.0.0"]


def test_rejected_install_is_one_line_with_the_reason_and_exit_1(config: Path, bundles) -> None:
    r = invoke("install", str(bundles["untrusted"]), "-c", str(config))
    assert r.exit_code == 1
    assert r.output.strip().startswith("error: key_unknown:")
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args",
    [
        ("install", "missing.efb"),
        ("rollback",),
        ("log", "tail"),
    ],
)
def test_errors_are_one_readable_line(config: Path, args) -> None:
    r = invoke(*args, "-c", str(config))
    assert r.exit_code == 1 and r.output.startswith("error: ") and "Traceback" not in r.output


def test_missing_config_is_one_readable_line(tmp_path: Path) -> None:
    r = invoke("status", "-c", str(tmp_path / "nope.toml"))
    assert r.exit_code == 1 and "cannot read config" in r.output


def test_log_tail_and_export(config: Path, tmp_path: Path) -> None:
    db = load_config(config).data_dir / "predictions.db"
    with PredictionLog(db) as plog:
        for i in range(12):
            plog.on_prediction(_event(i))
        plog.flush()
    r = invoke("log", "tail", "-n", "3", "-c", str(config))
    assert r.exit_code == 0 and len(r.output.strip().splitlines()) == 3
    assert "iris 1.0.0" in r.output
    out = tmp_path / "log.jsonl"
    r = invoke("log", "export", "--format", "jsonl", "--out", str(out), "-c", str(config))
    assert r.exit_code == 0
    assert len(out.read_text().splitlines()) == 12
    out = tmp_path / "log.csv"
    assert (
        invoke("log", "export", "--format", "csv", "--out", str(out), "-c", str(config)).exit_code
        == 0
    )
    assert out.read_text().splitlines()[0].startswith("id,ts,request_id")
    r = invoke("log", "export", "--format", "xml", "-c", str(config))
    assert r.exit_code == 1 and "unknown export format" in r.output


def _commands(group: click.Command, prefix: str = ""):
    for name, cmd in getattr(group, "commands", {}).items():
        yield f"{prefix}{name}", cmd
        yield from _commands(cmd, f"{prefix}{name} ")


def test_every_command_has_help_text_with_an_example() -> None:
    root = typer.main.get_command(app)
    found = dict(_commands(root))
    assert {
        "agent",
        "agent init",
        "agent install",
        "agent rollback",
        "agent status",
        "agent run",
        "agent log",
        "agent log tail",
        "agent log export",
    } <= set(found)
    for name, cmd in found.items():
        assert cmd.help, name
        if not hasattr(cmd, "commands"):
            assert "Example:\n  edgefleet" in cmd.help, name


def test_init_takes_the_per_device_values_as_flags(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    r = invoke(
        "init", "--out", str(path), "--device-id", "pi-0007", "--profile", "raspberry-pi-4",
        "--broker", "mqtts://fleet.example:8883", "--api-port", "9123",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    cfg = load_config(path)
    assert (cfg.device_id, cfg.profile) == ("pi-0007", "raspberry-pi-4")
    assert cfg.broker.url == "mqtts://fleet.example:8883" and cfg.api.port == 9123


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--device-id", "pi 7"], "device_id"),
        (["--profile", "toaster"], "unknown profile 'toaster'"),
        (["--broker", "http://fleet:1883"], "scheme must be mqtt"),
    ],
)
def test_init_refuses_a_bad_value_and_writes_nothing(tmp_path: Path, flags, message) -> None:
    path = tmp_path / "agent.toml"
    r = invoke("init", "--out", str(path), *flags)
    assert r.exit_code == 1 and r.stderr.startswith("error: ") and message in r.stderr
    assert not path.exists()


def test_config_typo_suggests_the_nearest_key(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('devce_id = "pi-1"\n[api]\nport = 8765\n', encoding="utf-8")
    r = invoke("status", "-c", str(path))
    assert r.exit_code == 1
    assert "devce_id: unknown key (did you mean 'device_id'?)" in r.stderr
