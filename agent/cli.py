"""``edgefleet agent …``: set up, install, roll back and inspect a device agent.

Every command except ``run`` works offline against the config's ``data_dir``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import typer

from .config import DEFAULT_API_PORT

app = typer.Typer(rich_markup_mode=None, add_completion=False, no_args_is_help=True)
agent_app = typer.Typer(
    rich_markup_mode=None, no_args_is_help=True, help="Run and manage the on-device agent."
)
log_app = typer.Typer(
    rich_markup_mode=None, no_args_is_help=True, help="Read the SQLite prediction log."
)
app.add_typer(agent_app, name="agent")
agent_app.add_typer(log_app, name="log")

ConfigOpt = typer.Option(
    Path("agent.toml"), "--config", "-c", envvar="EDGEFLEET_AGENT_CONFIG", help="Agent config file."
)


@app.callback()
def _root() -> None:
    """edgefleet agent commands."""


def _config(path: Path):  # type: ignore[no-untyped-def]
    from .config import load_config

    return load_config(path)


@agent_app.command("init")
def init(
    out: Path = typer.Option(Path("agent.toml"), "--out", "-o", help="Where to write the config."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
    device_id: str = typer.Option(
        "device-0001", "--device-id", help="Unique device id (letters, digits, . _ -)."
    ),
    profile: str = typer.Option(
        "host", "--profile", help="Device profile name (edgefleet profiles list) or a .toml path."
    ),
    broker: list[str] = typer.Option(
        [],
        "--broker",
        help="MQTT broker URL (mqtts:// for TLS; default mqtt://127.0.0.1:1883). Repeat it "
        "for a clustered broker's nodes: the agent fails over to the next in this order.",
    ),
    api_port: int = typer.Option(
        DEFAULT_API_PORT, "--api-port", min=0, max=65535, help="Local inference API port."
    ),
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
    """Write a commented config for one device; every value is checked before it is written.

    \b
    Example:
      edgefleet agent init --device-id pi-0001 --profile raspberry-pi-4 \\
        --broker mqtt://fleet.local:1883 --bundle-key release.pub \\
        --command-key fleet-command.pub --out /etc/edgefleet/agent.toml
      edgefleet agent init --device-id pi-0002 --broker mqtt://nats-1:1883 \\
        --broker mqtt://nats-2:1883 --broker mqtt://nats-3:1883 --out agent.toml
    """
    from .config import example_config, parse_config
    from .errors import ConfigError

    if out.exists() and not force:
        raise ConfigError(f"{out} exists (use --force to overwrite)")
    text = example_config(
        device_id=device_id,
        profile=profile,
        broker_url=broker or "mqtt://127.0.0.1:1883",
        api_port=api_port,
        bundle_keys=[str(p.resolve()) for p in bundle_key],
        command_keys=[str(p.resolve()) for p in command_key],
        artifact_origins=list(artifact_origin),
    )
    parse_config(text, str(out), base=out.resolve().parent).trust_stores()  # refuse bad keys
    out.write_text(text, encoding="utf-8")
    brokers = ", ".join(broker or ["mqtt://127.0.0.1:1883"])
    print(f"wrote {out} (device {device_id}, profile {profile}, broker {brokers})")


@agent_app.command("install")
def install(
    bundle: Path = typer.Argument(..., help="The .efb bundle to install."),
    config: Path = ConfigOpt,
    allow_older: bool = typer.Option(False, "--allow-older", help="Skip the anti-rollback check."),
    replace_model: bool = typer.Option(
        False, "--replace-model", help="Allow replacing the active model with another name."
    ),
) -> None:
    """Verify and install a bundle offline, then make it active.

    \b
    Example:
      edgefleet agent install iris-1.2.0.efb --config agent.toml
    """
    from .installer import Installer

    m = Installer.from_config(_config(config)).install_file(
        bundle, allow_older=allow_older, replace_model=replace_model
    )
    print(f"installed {m.name} {m.version} (release {m.release})")


@agent_app.command("rollback")
def rollback(
    config: Path = ConfigOpt,
    to: int | None = typer.Option(
        None, "--to", help="Release to roll back to (default: previous)."
    ),
) -> None:
    """Switch back to the previously installed version.

    \b
    Example:
      edgefleet agent rollback --config agent.toml
    """
    from .installer import Installer

    m = Installer.from_config(_config(config)).rollback(to)
    print(f"rolled back to {m.name} {m.version} (release {m.release})")


@agent_app.command("status")
def status(
    config: Path = ConfigOpt,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Show the active model, installed versions and runtimes.

    \b
    Example:
      edgefleet agent status --config agent.toml
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
    console.print(f"device key id {st.device_key_id or '(created on the first `agent run`)'}")
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
def run(config: Path = ConfigOpt) -> None:
    """Run the agent daemon: local API, prediction log, telemetry and the MQTT link.

    Prints one line when it serves (device, model, API URL, broker) and one line each time
    the broker link changes (connected, lost, reconnecting).

    \b
    Example:
      edgefleet agent run --config agent.toml
    """
    from . import daemon  # type: ignore[attr-defined]

    cfg = _config(config)
    lines = _LinkLines()
    transport_log = logging.getLogger("protocol.transport_paho")
    transport_log.addHandler(lines)
    transport_log.setLevel(logging.INFO)

    def started(agent: Any) -> None:
        m = agent.predictor.model
        model = f"{m.name} {m.version} (release {m.release})" if m else "no model installed yet"
        print(
            f"agent {cfg.device_id} ({cfg.profile}) serving {model}; "
            f"API {agent.api_url}/v1/predict; broker {', '.join(cfg.broker.all_urls())}",
            file=sys.stderr,
            flush=True,
        )
        lines.start_printing()

    try:
        daemon.run_agent(cfg, on_started=started)
    finally:
        transport_log.removeHandler(lines)


class _LinkLines(logging.Handler):
    """Prints the MQTT transport's link-state records (``record.link``) as one line each,
    held back until the start line is out so the order reads naturally."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self._held: list[str] | None = []

    def emit(self, record: logging.LogRecord) -> None:
        state = getattr(record, "link", None)
        if state is None:
            return
        detail = getattr(record, "detail", "")
        verb = {
            "connected": "connected to",
            "lost": "lost",
            "reconnecting": "cannot reach",
            "subscribe_refused": "a subscription was refused by",
        }
        line = f"broker link {state}: {verb.get(state, state)} {getattr(record, 'broker', '')}"
        if detail:
            line += f": {detail}"
        if state == "reconnecting":
            line += "; retrying with backoff, predictions keep being served"
        if self._held is not None:
            self._held.append(line)
        else:
            print(line, file=sys.stderr, flush=True)

    def start_printing(self) -> None:
        """Print what was held back, then every line as it comes."""
        with self.lock:  # type: ignore[union-attr]
            held, self._held = self._held or [], None
            for line in held:
                print(line, file=sys.stderr, flush=True)


def _fmt_row(row: dict) -> str:
    ts = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["ts"]))
    what = row["error"] if row["error"] else row["outputs"]
    flag = " fallback" if row["fallback"] else ""
    return (
        f"{row['id']:>8} {ts} {row['model']} {row['version']} {row['latency_ms']:.2f}ms"
        f"{flag} in={row['inputs'][:60]} out={(what or '')[:80]}"
    )


@log_app.command("tail")
def log_tail(
    config: Path = ConfigOpt,
    n: int = typer.Option(10, "-n", "--lines", help="How many recent rows."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new rows."),
) -> None:
    """Print the most recent predictions.

    \b
    Example:
      edgefleet agent log tail -n 20 --follow
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
def log_export(
    config: Path = ConfigOpt,
    fmt: str = typer.Option("jsonl", "--format", help="jsonl or csv."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output file (default: stdout)."),
) -> None:
    """Export the whole prediction log.

    \b
    Example:
      edgefleet agent log export --format csv --out predictions.csv
    """
    from .prediction_log import LOG_FILE, export

    path = _config(config).data_dir / LOG_FILE
    if out is None:
        export(path, sys.stdout, fmt)
        return
    with out.open("w", encoding="utf-8", newline="") as fh:
        n = export(path, fh, fmt)
    print(f"exported {n} rows to {out}", file=sys.stderr)
