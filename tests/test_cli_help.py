"""Every command has help text, the CLI reference is current, and --help stays light."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import click
import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("sklearn", "skl2onnx", "onnx", "onnxruntime", "tensorflow", "keras", "torch", "pandas")


def _module_present(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # the parent package itself is absent
        return False


def _walk(cmd: object, path: list[str]):
    yield path, cmd
    for name, sub in sorted((getattr(cmd, "commands", None) or {}).items()):
        yield from _walk(sub, [*path, name])


def _help(cmd: object) -> str:
    return (getattr(cmd, "help", None) or getattr(cmd, "short_help", None) or "").strip()


def test_every_command_of_every_group_has_help_an_example_and_option_help():
    from edgefleet.cli import COMMANDS, _load

    leaves = [
        (p, c)
        for name in COMMANDS
        for p, c in _walk(_load(name), [name])
        if not getattr(c, "commands", None)
    ]
    assert len(leaves) >= 35
    for path, cmd in leaves:
        text = _help(cmd)
        assert text, f"edgefleet {' '.join(path)} has no help text"
        assert "Example:\n  edgefleet" in text, f"edgefleet {' '.join(path)} has no example"
        for param in getattr(cmd, "params", []):
            if getattr(param, "name", "") != "help":
                assert getattr(param, "help", None), f"{' '.join(path)} {param.name} has no help"


def test_every_group_renders_help_in_one_plain_style():
    """No rich boxes, and no ``--help <bool>`` in any group (one formatter everywhere)."""
    from click.testing import CliRunner

    from edgefleet.cli import cli

    runner = CliRunner(env={"COLUMNS": "100"})
    for args in (["convert"], ["agent", "init"], ["fleet", "serve"], ["drift", "report"], ["demo"]):
        out = runner.invoke(cli, [*args, "--help"], prog_name="edgefleet").stdout
        assert out.startswith(f"Usage: edgefleet {' '.join(args)} "), out
        assert "╭" not in out and "<bool>" not in out, out
        assert "\nOptions:\n" in out and "\n  Example:\n    edgefleet" in out, out


def test_the_exit_codes_are_documented_once_and_match_the_root():
    from edgefleet import cli

    doc = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    for name, meaning in (
        ("EXIT_OK", "ok"),
        ("EXIT_ERROR", "error"),
        ("EXIT_USAGE", "usage"),
        ("EXIT_OVER_BUDGET", "over budget"),
        ("EXIT_ADDRESS_IN_USE", "address in use"),
        ("EXIT_UNREACHABLE", "unreachable"),
        ("EXIT_INTERRUPTED", "interrupted"),
    ):
        assert f"| {getattr(cli, name)} | {meaning}" in doc, name


def test_one_root_maps_errors_to_exit_codes():
    from edgefleet.cli import exit_code_for
    from fleet_server.client import ServerUnreachable
    from protocol.errors import AddressInUse, EdgefleetError, OverBudget, ProfileError

    assert exit_code_for(OverBudget("x")) == 3
    assert exit_code_for(AddressInUse("x")) == 4
    assert exit_code_for(ServerUnreachable("x")) == 5
    assert exit_code_for(ProfileError("x")) == exit_code_for(EdgefleetError("x")) == 1
    assert exit_code_for(ValueError("a bug")) is None  # a bug keeps its traceback
    for module in ("toolchain/cli.py", "agent/cli.py", "fleet_server/cli.py"):
        text = (ROOT / module).read_text(encoding="utf-8")
        assert "except EdgefleetError" not in text and "EDGEFLEET_DEBUG" not in text, module
        assert "typer.Exit(" not in text and "SystemExit" not in text, module


def test_debug_flag_shows_the_traceback_without_touching_the_environment(tmp_path):
    import os

    from click.testing import CliRunner

    from edgefleet.cli import cli

    runner = CliRunner()
    plain = runner.invoke(cli, ["agent", "status", "-c", str(tmp_path / "none.toml")])
    assert plain.exit_code == 1 and plain.stderr.startswith("error: cannot read config")
    debug = runner.invoke(cli, ["--debug", "agent", "status", "-c", str(tmp_path / "none.toml")])
    assert debug.exception is not None and type(debug.exception).__name__ == "ConfigError"
    assert "EDGEFLEET_DEBUG" not in os.environ


def test_every_command_of_the_edgefleet_tree_has_help_text():
    from edgefleet.cli import COMMANDS, cli

    ctx = click.Context(cli, info_name="edgefleet")
    missing, unmounted = [], []
    for name in cli.list_commands(ctx):
        module = COMMANDS[name][0]
        if not _module_present(module):
            continue  # that program's CLI does not exist yet
        cmd = cli.get_command(ctx, name)
        if cmd is None:
            unmounted.append(f"{name} ({module})")
            continue
        for path, sub in _walk(cmd, [name]):
            if not _help(sub):
                missing.append(" ".join(path))
    assert not unmounted, f"listed by `edgefleet --help` but not mounted: {unmounted}"
    assert not missing, f"commands without help text: {missing}"


def test_cli_reference_matches_the_commands_help():
    spec = importlib.util.spec_from_file_location("gen_cli", ROOT / "docs" / "gen_cli.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    committed = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert committed == gen.render(), "docs/cli.md is stale: run python docs/gen_cli.py"


_PROBE = """
import json, sys
{load}
for args in {argv!r}:
    try:
        cli.main(args, prog_name="edgefleet", standalone_mode=False)
    except SystemExit:
        pass
print(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)))
"""
_ROOT = "from edgefleet.cli import cli"
_TOOLCHAIN = "import typer; from toolchain.cli import app; cli = typer.main.get_command(app)"


@pytest.mark.parametrize(
    ("load", "argv"),
    [
        (_ROOT, [["--help"]]),
        (_TOOLCHAIN, [["--help"], ["convert", "--help"], ["bench", "--help"], ["build", "--help"]]),
    ],
    ids=["edgefleet", "toolchain-commands"],
)
def test_help_does_not_import_heavy_libraries(load, argv):
    code = _PROBE.format(load=load, argv=argv, heavy=HEAVY)
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
