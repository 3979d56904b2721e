"""``edgefleet demo``: tells the story of :mod:`edgefleet.demo` in the terminal."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

app = typer.Typer(rich_markup_mode=None, add_completion=False)


@app.callback()
def _group() -> None:
    """The demo."""


@app.command("demo")
def demo(
    devices: int = typer.Option(20, min=4, max=200, help="How many agents to start."),
    broker: str | None = typer.Option(
        None, help="External broker, e.g. mqtt://127.0.0.1:1883 (default: embedded amqtt)."
    ),
    keep_running: bool = typer.Option(
        False, "--keep-running", help="Leave the fleet and dashboard up until Ctrl-C."
    ),
    workdir: Path | None = typer.Option(
        None, help="Keep models, bundles, keys and data here (default: a temp dir, removed)."
    ),
    port: int = typer.Option(0, help="Dashboard/API port (default: a free port)."),
    summary_json: Path | None = typer.Option(
        None, help="Also write the outcome as JSON (used by the tests)."
    ),
) -> None:
    """Run the whole story on one machine: train, build and sign v1 and v2, start the fleet
    server and N real agents, roll out v1 in stages with live traffic, roll out v2 to failing
    canaries (it halts and rolls back), then shift inputs until the drift alert fires.

    \b
    Example:
      edgefleet demo --devices 20 --keep-running
    """
    # Say something before the heavy imports (scikit-learn, ONNX Runtime, the fleet server).
    print("edgefleet demo: starting (loading libraries takes a few seconds)…", flush=True)
    import logging

    from rich.console import Console

    from edgefleet.demo import DemoOptions, DemoResult, run_demo

    # Agents and the server log to the root logger; the story goes to the console instead.
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    console = Console(width=max(Console().width, 110))
    started = time.monotonic()
    colors = {
        "train": "cyan",
        "build": "magenta",
        "fleet": "blue",
        "agents": "green",
        "rollout": "yellow",
        "drift": "red",
    }

    def progress(step: str, message: str) -> None:
        elapsed = time.monotonic() - started
        console.print(
            f"[dim]{elapsed:6.1f}s[/] [{colors.get(step, 'white')}]{step:>7}[/] {message}"
        )

    def hold(result: DemoResult) -> None:
        _summary(console, result)
        if keep_running:
            console.print(
                f"\n[bold]Running.[/] Dashboard: [bold]{result.dashboard_url}[/]  login "
                f"[bold]{result.username}[/] / [bold]{result.password}[/] — Ctrl-C to stop."
            )
            try:
                while True:
                    time.sleep(1)
            except KeyboardInterrupt:
                console.print("stopping…")

    opts = DemoOptions(devices=devices, broker_url=broker, workdir=workdir, api_port=port)
    with console.status("[bold]edgefleet demo[/] running…", spinner="dots"):
        result = run_demo(opts, progress, keep=hold)
    if summary_json is not None:
        summary_json.write_text(json.dumps(_outcome(result), indent=2, default=str))
    for line in next_steps(keep_running, workdir):
        console.print(line)


def next_steps(keep_running: bool, workdir: Path | None) -> list[str]:
    """What to try after the demo (its last lines)."""
    lines = ["", "[bold]Try next[/]"]
    if not keep_running:
        lines.append(
            "  edgefleet demo --keep-running      # explore the dashboard and API afterwards"
        )
    if workdir is None:
        lines.append(
            "  edgefleet demo --workdir demo      # keep the models, bundles and keys it made"
        )
    lines += [
        "  edgefleet keys generate --out keys # then build your own model, as in the README:",
        "  edgefleet build model.joblib --data train.csv --target label --name mymodel "
        "--version 1.0.0 --profile raspberry-pi-4 --key keys/edgefleet.key",
        "  edgefleet --help                   # every command (docs/cli.md)",
    ]
    return lines


def _outcome(r: object) -> dict:
    from dataclasses import asdict

    return asdict(r)  # type: ignore[call-overload]


def _summary(console: object, r: object) -> None:
    from rich.console import Console
    from rich.table import Table

    assert isinstance(console, Console)
    from edgefleet.demo import DemoResult

    assert isinstance(r, DemoResult)
    t = Table(title="Devices", show_lines=False)
    for col in (
        "device",
        "profile",
        "version",
        "requests",
        "not ready",
        "errors",
        "p50 ms",
        "p95 ms",
        "note",
    ):
        t.add_column(
            col, justify="right" if col in ("requests", "errors", "p50 ms", "p95 ms") else "left"
        )
    for d in r.devices:
        note = ", ".join(
            x
            for x, on in (
                ("v2 canary: failed, rolled back", d.failing_canary),
                ("shifted", d.shifted),
            )
            if on
        )
        t.add_row(
            d.device_id,
            d.profile,
            d.version,
            str(d.requests),
            str(d.not_ready),
            str(d.errors),
            f"{d.p50_ms:.1f}" if d.p50_ms is not None else "-",
            f"{d.p95_ms:.1f}" if d.p95_ms is not None else "-",
            note,
        )
    console.print(t)
    console.print(
        "[dim]not ready: requests answered 503 because the device had no model yet (before "
        "v1 reached it); they are expected and not counted as errors.[/]"
    )
    ro = Table(title="Rollouts")
    for col in ("rollout", "bundle", "state", "reason"):
        ro.add_column(col)
    for s in r.rollouts:
        b = s.get("bundle") or {}
        ro.add_row(
            s["rollout_id"],
            f"{b.get('name')} {b.get('version')}",
            s["state"],
            s.get("reason") or "",
        )
    console.print(ro)
    console.print("[bold]Gate decisions[/]")
    for line in r.decisions:
        console.print(f"  • {line}")
    if r.drift:
        dt = Table(title=f"Drift: {r.drift.get('model')} {r.drift.get('version')}")
        for col in ("feature", "KS ± rank error", "KS critical", "PSI", "drifted"):
            dt.add_column(col)
        feats = [f for f in r.drift.get("features") or [] if f.get("role") == "feature"]
        for f in feats[:10]:
            ks = f"{f['ks']:.3f} ± {f['rank_error']:.3f}" if f.get("ks") is not None else "-"
            crit = f"{f['ks_critical']:.3f}" if f.get("ks_critical") is not None else "-"
            drifted = "yes" if f.get("drift") else "no"
            dt.add_row(str(f.get("name")), ks, crit, f"{f.get('psi') or 0:.3f}", drifted)
        if len(feats) > 10:
            dt.caption = f"… and {len(feats) - 10} more features"
        console.print(dt)
        console.print(
            f"dataset drift: {r.drift.get('dataset_drift')} "
            f"({r.drift.get('drifted_share', 0):.0%} of features); alerts fired: {len(r.alerts)}"
        )
    console.print(f"Timings (s): {r.durations}")
