"""``edgefleet agent …``: set up, install, roll back and inspect a device agent.

Every command except ``run`` works offline against the config's ``data_dir``.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True)
agent_app = typer.Typer(no_args_is_help=True, help="Run and manage the on-device agent.")
log_app = typer.Typer(no_args_is_help=True, help="Read the SQLite prediction log.")
app.add_typer(agent_app, name="agent")
agent_app.add_typer(log_app, name="log")

ConfigOpt = typer.Option(
    Path("agent.toml"), "--config", "-c", envvar="EDGEFLEET_AGENT_CONFIG", help="Agent config file."
)


@app.callback()
def _root() -> None:
    """edgefleet agent commands."""


def _one_line_errors(fn: Callable[..., None]) -> Callable[..., None]:
    """Our errors become ``error: …`` on stderr and exit 1, also when run standalone."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        from protocol.errors import EdgefleetError

        try:
            fn(*args, **kwargs)
        except EdgefleetError as exc:
            if os.environ.get("EDGEFLEET_DEBUG"):
                raise
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(1) from None  # typer.Exit is not click.Exit under typer>=0.2x

    return wrapper


def _config(path: Path):  # type: ignore[no-untyped-def]
    from .config import load_config

    return load_config(path)


@agent_app.command("init")
@_one_line_errors
def init(
    out: Path = typer.Option(Path("agent.toml"), "--out", "-o", help="Where to write the config."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
    bundle_key: list[Path] = typer.Option(
        [], "--bundle-key", help="Public key bundles must be signed by (repeatable)."
    ),
    command_key: list[Path] = typer.Option(
        [], "--command-key", help="The fleet server's command public key (repeatable)."
    ),
    artifact_origin: list[str] = typer.Option(
        [], "--artifact-origin", help="Origin HTTP downloads may come from (repeatable)."
    ),
) -> None:
    """Write a commented example config, optionally with the keys it trusts.

    Example: edgefleet agent init --out agent.toml --bundle-key release.pub
    --command-key fleet-command.pub --artifact-origin https://fleet.example:8700
    """
    from .config import example_config, parse_config
    from .errors import ConfigError

    if out.exists() and not force:
        raise ConfigError(f"{out} exists (use --force to overwrite)")
    text = example_config(
        bundle_keys=[str(p.resolve()) for p in bundle_key],
        command_keys=[str(p.resolve()) for p in command_key],
        artifact_origins=list(artifact_origin),
    )
    parse_config(text, str(out), base=out.resolve().parent).trust_stores()  # refuse bad keys
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out}")


@agent_app.command("install")
@_one_line_errors
def install(
    bundle: Path = typer.Argument(..., help="The .efb bundle to install."),
    config: Path = ConfigOpt,
    allow_older: bool = typer.Option(False, "--allow-older", help="Skip the anti-rollback check."),
    replace_model: bool = typer.Option(
        False, "--replace-model", help="Allow replacing the active model with another name."
    ),
) -> None:
    """Verify and install a bundle offline, then make it active.

    Example: edgefleet agent install iris-1.2.0.efb --config agent.toml
    """
    from .installer import Installer

    m = Installer.from_config(_config(config)).install_file(
        bundle, allow_older=allow_older, replace_model=replace_model
    )
    print(f"installed {m.name} {m.version} (release {m.release})")


@agent_app.command("rollback")
@_one_line_errors
def rollback(
    config: Path = ConfigOpt,
    to: int | None = typer.Option(
        None, "--to", help="Release to roll back to (default: previous)."
    ),
) -> None:
    """Switch back to the previously installed version.

    Example: edgefleet agent rollback --config agent.toml
    """
    from .installer import Installer

    m = Installer.from_config(_config(config)).rollback(to)
    print(f"rolled back to {m.name} {m.version} (release {m.release})")


@agent_app.command("status")
@_one_line_errors
def status(
    config: Path = ConfigOpt,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Show the active model, installed versions and runtimes.

    Example: edgefleet agent status --config agent.toml
    """
    from .status import agent_status

    st = agent_status(_config(config))
    if as_json:
        print(json.dumps(st.to_dict(), indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"device [bold]{st.device_id}[/] · profile {st.profile} · data {st.data_dir}")
    if not st.slots:
        console.print("no model installed")
    else:
        table = Table("active", "model", "version", "release", "slot", "ok")
        for s in st.slots:
            table.add_row(
                "*" if s.active else "",
                s.name,
                s.version,
                str(s.release),
                s.slot,
                "yes" if s.ok else f"no: {s.problem}",
            )
        console.print(table)
    rts = ", ".join(f"{k} {v}" for k, v in st.runtimes.items()) or "none"
    console.print(f"runtimes: {rts}")
    if st.log_rows is not None:
        console.print(f"prediction log: {st.log_rows} rows")


@agent_app.command("run")
@_one_line_errors
def run(config: Path = ConfigOpt) -> None:
    """Run the agent daemon: local API, prediction log, telemetry and the MQTT link.

    Example: edgefleet agent run --config agent.toml
    """
    from . import daemon  # type: ignore[attr-defined]

    daemon.run_agent(_config(config))


def _fmt_row(row: dict) -> str:
    ts = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["ts"]))
    what = row["error"] if row["error"] else row["outputs"]
    flag = " fallback" if row["fallback"] else ""
    return (
        f"{row['id']:>8} {ts} {row['model']} {row['version']} {row['latency_ms']:.2f}ms"
        f"{flag} in={row['inputs'][:60]} out={(what or '')[:80]}"
    )


@log_app.command("tail")
@_one_line_errors
def log_tail(
    config: Path = ConfigOpt,
    n: int = typer.Option(10, "-n", "--lines", help="How many recent rows."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new rows."),
) -> None:
    """Print the most recent predictions.

    Example: edgefleet agent log tail -n 20 --follow
    """
    from .prediction_log import LOG_FILE, read_rows

    path = _config(config).data_dir / LOG_FILE
    rows = read_rows(path, last=n)
    for row in rows:
        print(_fmt_row(row))
    last = rows[-1]["id"] if rows else 0
    while follow:
        time.sleep(0.5)
        for row in read_rows(path, after_id=last):
            print(_fmt_row(row))
            last = row["id"]


@log_app.command("export")
@_one_line_errors
def log_export(
    config: Path = ConfigOpt,
    fmt: str = typer.Option("jsonl", "--format", help="jsonl or csv."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output file (default: stdout)."),
) -> None:
    """Export the whole prediction log.

    Example: edgefleet agent log export --format csv --out predictions.csv
    """
    from .prediction_log import LOG_FILE, export

    path = _config(config).data_dir / LOG_FILE
    if out is None:
        export(path, sys.stdout, fmt)
        return
    with out.open("w", encoding="utf-8", newline="") as fh:
        n = export(path, fh, fmt)
    print(f"exported {n} rows to {out}", file=sys.stderr)
