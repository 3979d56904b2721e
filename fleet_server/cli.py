"""``edgefleet fleet|rollout|drift|telemetry …``: the fleet server's commands.

Commands talk to a running server through its REST API (``--url``/``EDGEFLEET_URL`` and
``--token``/``EDGEFLEET_TOKEN``), except ``fleet serve``, ``fleet init``, ``fleet token
create`` and ``fleet user add``, which work on the config and its registry directly.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from protocol.states import DEVICE_FAILED

app = typer.Typer(rich_markup_mode=None, add_completion=False, no_args_is_help=True)
fleet_app = typer.Typer(
    rich_markup_mode=None,
    no_args_is_help=True,
    help="Run the fleet server and manage bundles and devices.",
)
bundles_app = typer.Typer(
    rich_markup_mode=None, no_args_is_help=True, help="Upload and list signed bundles."
)
devices_app = typer.Typer(rich_markup_mode=None, no_args_is_help=True, help="List and tag devices.")
token_app = typer.Typer(rich_markup_mode=None, no_args_is_help=True, help="Create API tokens.")
user_app = typer.Typer(rich_markup_mode=None, no_args_is_help=True, help="Dashboard users.")
rollout_app = typer.Typer(
    rich_markup_mode=None, no_args_is_help=True, help="Start and steer staged rollouts."
)
drift_app = typer.Typer(
    rich_markup_mode=None, no_args_is_help=True, help="Drift reports from merged device sketches."
)
telemetry_app = typer.Typer(
    rich_markup_mode=None, no_args_is_help=True, help="Watch MQTT telemetry live."
)
app.add_typer(fleet_app, name="fleet")
app.add_typer(rollout_app, name="rollout")
app.add_typer(drift_app, name="drift")
app.add_typer(telemetry_app, name="telemetry")
fleet_app.add_typer(bundles_app, name="bundles")
fleet_app.add_typer(devices_app, name="devices")
fleet_app.add_typer(token_app, name="token")
fleet_app.add_typer(user_app, name="user")

UrlOpt = typer.Option(
    None, "--url", envvar="EDGEFLEET_URL", help="Fleet server URL (default http://127.0.0.1:8700)."
)
TokenOpt = typer.Option(None, "--token", envvar="EDGEFLEET_TOKEN", help="API token.")
ConfigOpt = typer.Option(
    Path("fleet.toml"), "--config", "-c", envvar="EDGEFLEET_FLEET_CONFIG", help="Fleet config file."
)
FINAL = ("succeeded", "halted", "aborted", "rolled_back")


@app.callback()
def _root() -> None:
    """edgefleet fleet server commands."""


def client(url: str | None, token: str | None) -> Any:
    """The REST client (tests replace this to talk to an in-process app)."""
    from .client import FleetClient

    return FleetClient(url, token)


def _console() -> Any:
    from rich.console import Console

    return Console()


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    from rich.table import Table

    t = Table(title=title)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*["" if v is None else str(v) for v in r])
    _console().print(t)


def _ago(ts: float | None) -> str:
    if not ts:
        return "-"
    s = max(0.0, time.time() - ts)
    return (
        f"{s:.0f}s ago" if s < 120 else f"{s / 60:.0f}m ago" if s < 7200 else f"{s / 3600:.0f}h ago"
    )


# fleet ------------------------------------------------------------------------------------
@fleet_app.command("serve")
def serve_cmd(
    config: Path = ConfigOpt,
    embedded_broker: bool = typer.Option(
        False, "--embedded-broker", help="Run the amqtt broker in-process."
    ),
    host: str | None = typer.Option(
        None, "--host", help="Address to listen on (default: [api] host, 127.0.0.1)."
    ),
    port: int | None = typer.Option(
        None, "--port", min=0, max=65535, help="Port to listen on (default: [api] port, 8700)."
    ),
) -> None:
    """Run the fleet server: REST API, dashboard, MQTT bridge, rollout and drift engines.

    Prints one line once it listens; a port that is taken is one error line (exit code 4).

    \b
    Example:
      edgefleet fleet serve --config fleet.toml --embedded-broker --host 0.0.0.0 --port 8700
    """
    from .config import load_config
    from .serve import FleetServer

    cfg = load_config(config)
    api = {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    if api:
        cfg = cfg.model_copy(update={"api": cfg.api.model_copy(update=api)})
    server = FleetServer(cfg, embedded_broker=embedded_broker)

    def ready() -> None:
        broker = ", ".join(server.config.broker.all_urls()) + (
            " (embedded)" if server.embedded else ""
        )
        print(
            f"fleet server on {server.url} — dashboard {server.url}/ui/, API {server.url}/docs "
            f"(broker {broker}); Ctrl-C to stop",
            file=sys.stderr,
        )

    try:
        server.run(on_ready=ready)
    except KeyboardInterrupt:
        pass


@fleet_app.command("init")
def init(
    out: Path = typer.Option(Path("fleet.toml"), "--out", "-o", help="Where to write the config."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
) -> None:
    """Write a commented example config.

    \b
    Example:
      edgefleet fleet init --out fleet.toml
    """
    from .config import example_config
    from .errors import ConfigError

    if out.exists() and not force:
        raise ConfigError(f"{out} exists (use --force to overwrite)")
    out.write_text(example_config(), encoding="utf-8")
    print(f"wrote {out}")


def _local_service(config: Path) -> Any:
    from .config import load_config
    from .service import FleetService

    return FleetService(load_config(config))


@token_app.command("create")
def token_create(
    role: str = typer.Option("viewer", "--role", help="viewer, operator or admin."),
    name: str = typer.Option("", "--name", help="A label for the token."),
    config: Path = ConfigOpt,
) -> None:
    """Create an API token and print it once (only its hash is stored).

    \b
    Example:
      edgefleet fleet token create --role operator --name ci --config fleet.toml
    """
    svc = _local_service(config)
    try:
        token = svc.create_token(role, name)
    finally:
        svc.repo.close()
    print(token)
    print(
        f"({role} token; only its hash is stored, so it will not be shown again)", file=sys.stderr
    )


@user_app.command("add")
def user_add(
    username: str = typer.Argument(..., help="Login name."),
    role: str = typer.Option("viewer", "--role", help="viewer, operator or admin."),
    password: str = typer.Option(
        ...,
        prompt=True,
        hide_input=True,
        confirmation_prompt=True,
        envvar="EDGEFLEET_USER_PASSWORD",
        help="Asked for (hidden) when not given; prefer the prompt or the env var to a flag.",
    ),
    config: Path = ConfigOpt,
) -> None:
    """Add (or reset) a dashboard user; the password is stored as a scrypt hash.

    \b
    Example:
      edgefleet fleet user add ana --role admin --config fleet.toml
    """
    svc = _local_service(config)
    try:
        svc.add_user(username, password, role)
    finally:
        svc.repo.close()
    print(f"user {username} ({role}) saved")


@bundles_app.command("push")
def bundles_push(
    bundle: Path = typer.Argument(..., help="A .efb bundle."),
    url: str | None = UrlOpt,
    token: str | None = TokenOpt,
) -> None:
    """Upload a signed bundle; the server refuses unsigned or tampered ones with the reason.

    \b
    Example:
      edgefleet fleet bundles push iris-1.0.0.efb
    """
    info = client(url, token).push_bundle(bundle)
    profiles = ", ".join(info["profiles"]) or "-"
    print(
        f"uploaded {info['name']} {info['version']} (release {info['release']}) "
        f"sha256 {info['sha256'][:12]} profiles {profiles}"
    )


@bundles_app.command("list")
def bundles_list(url: str | None = UrlOpt, token: str | None = TokenOpt) -> None:
    """List uploaded bundles.

    \b
    Example:
      edgefleet fleet bundles list
    """
    rows = client(url, token).bundles()
    _table(
        "bundles",
        ["name", "version", "release", "sha256", "profiles", "signer"],
        [
            [
                b["name"],
                b["version"],
                b["release"],
                b["sha256"][:12],
                ",".join(b["profiles"]),
                b["signer"],
            ]
            for b in rows
        ],
    )


@devices_app.command("list")
def devices_list(
    profile: str | None = typer.Option(None, "--profile", help="Only this device profile."),
    tag: str | None = typer.Option(None, "--tag", help="Only devices with this tag."),
    version: str | None = typer.Option(None, "--version", help="Only this model version."),
    online: bool | None = typer.Option(
        None, "--online/--offline", help="Only online (or offline) devices."
    ),
    limit: int | None = typer.Option(
        None,
        "--limit",
        min=1,
        max=1000,
        help="Show one page of at most this many devices (default: every page).",
    ),
    cursor: str | None = typer.Option(
        None, "--cursor", help="Start after this position (a 'next page' cursor printed before)."
    ),
    url: str | None = UrlOpt,
    token: str | None = TokenOpt,
) -> None:
    """List devices, filtered by profile, tag, version or online state.

    The server answers in pages; without --limit every page is read (progress shows on a
    terminal), with --limit one page and the command for the next one.

    \b
    Example:
      edgefleet fleet devices list --profile raspberry-pi-4 --online
      edgefleet fleet devices list --limit 100
    """
    filters = {"profile": profile, "tag": tag, "version": version, "online": online}
    rows, more = _read_pages(client(url, token), "/v1/devices", limit, cursor, filters)
    _table(
        f"{len(rows)} devices" + (" (one page)" if limit else ""),
        ["device", "profile", "model", "version", "online", "last seen", "tags"],
        [
            [
                d["device_id"],
                d["profile"],
                d.get("model"),
                d.get("version"),
                "yes" if d["online"] else "no",
                _ago(d.get("last_seen")),
                ",".join(d["tags"]),
            ]
            for d in rows
        ],
    )
    if more:
        print(f"next page: edgefleet fleet devices list --limit {limit} --cursor {more}")


def _read_pages(
    c: Any, path: str, limit: int | None, cursor: str | None, params: dict[str, Any]
) -> tuple[list[dict[str, Any]], str | None]:
    """One page (``limit`` set) and its next cursor, or every page from ``cursor`` on,
    counting them on a terminal as they arrive."""
    if limit is not None:
        page = c.page(path, limit, cursor, **params)
        return page["items"], page["next_cursor"]
    con = _console()
    rows: list[dict[str, Any]] = []
    with con.status("reading…") if con.is_terminal else _nothing() as status:
        for page in c.pages(path, cursor=cursor, **params):
            rows += page["items"]
            if status is not None:
                status.update(f"read {len(rows):,} so far…")
    return rows, None


def _nothing() -> Any:
    from contextlib import nullcontext

    return nullcontext()


@devices_app.command("tag")
def devices_tag(
    device_id: str = typer.Argument(..., help="The device id."),
    tags: list[str] = typer.Argument(..., help="Tags to set."),
    url: str | None = UrlOpt,
    token: str | None = TokenOpt,
) -> None:
    """Set a device's manual tags.

    \b
    Example:
      edgefleet fleet devices tag pi-0001 canary lab
    """
    c = client(url, token)
    d = c._call("PUT", f"/v1/devices/{device_id}/tags", json={"tags": tags})
    print(f"{device_id}: {', '.join(d['tags'])}")


@devices_app.command("pending")
def devices_pending(
    all_keys: bool = typer.Option(False, "--all", help="Also list approved device keys."),
    url: str | None = UrlOpt,
    token: str | None = TokenOpt,
) -> None:
    """List devices waiting for approval, with the key id each one presents.

    Compare the key id with `edgefleet agent status` on the device before approving.

    Example:
      edgefleet fleet devices pending
    """
    rows = client(url, token)._call(
        "GET", "/v1/enrolments", params={} if all_keys else {"status": "pending"}
    )
    _table(
        f"{len(rows)} device keys",
        ["device", "key id", "status", "how", "since"],
        [
            [r["device_id"], r["key_id"], r["status"], r["method"], _ago(r["created_at"])]
            for r in rows
        ],
    )


@devices_app.command("approve")
def devices_approve(
    device_id: str = typer.Argument(..., help="The pending device's id."),
    key_id: str | None = typer.Option(
        None, "--key-id", help="Refuse unless the device presents this key id."
    ),
    url: str | None = UrlOpt,
    token: str | None = TokenOpt,
) -> None:
    """Approve a pending device: pin the key it presented; its messages count from now on.

    Example:
      edgefleet fleet devices approve pi-0001 --key-id 3f2a9c0d1e4b5a6c
    """
    body = {"key_id": key_id} if key_id else {}
    d = client(url, token)._call("POST", f"/v1/devices/{device_id}/approve", json=body)
    print(f"{device_id}: approved, key {d['key_id']}")


@devices_app.command("revoke")
def devices_revoke(
    device_id: str = typer.Argument(..., help="The device whose pinned key to drop."),
    url: str | None = UrlOpt,
    token: str | None = TokenOpt,
) -> None:
    """Forget a device's key: its messages are dropped until it enrols again.

    Example:
      edgefleet fleet devices revoke pi-0001
    """
    client(url, token)._call("POST", f"/v1/devices/{device_id}/revoke")
    print(f"{device_id}: key revoked")


@devices_app.command("enrol-token")
def devices_enrol_token() -> None:
    """Make an enrolment token: the token goes to devices, its hash into fleet.toml.

    Devices that prove the token (agent.toml `[enrol] token_file`) are approved at once.

    Example:
      edgefleet fleet devices enrol-token
    """
    import secrets

    from protocol.device_auth import token_hash

    tok = "efe_" + secrets.token_urlsafe(32)
    print(f"token (put it in each device's [enrol] token_file): {tok}")
    print(f'fleet.toml: [devices] enrol_token_hashes = ["{token_hash(tok)}"]')


# rollouts ------------------------------------------------------------------------------------
def _stages(text: str) -> list[float]:
    from .errors import InvalidInput

    try:
        return [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise InvalidInput(
            f"--stages {text!r}: use numbers like 5,25,50,100", field="stages"
        ) from None


def stage_state(stage: dict[str, Any]) -> str:
    """A stage's state as shown: one with no devices passes trivially, so say "empty"."""
    if stage["devices"] == 0 and stage["state"] in ("passed", "running"):
        return "empty (0 devices)"
    return str(stage["state"])


def _show(status: dict[str, Any]) -> None:
    b = status["bundle"]
    print(
        f"rollout {status['rollout_id']}: {b.get('name')} {b.get('version')} — {status['state']}"
        + (f" ({status['reason']})" if status.get("reason") else "")
    )
    unit = "%" if status["spec"]["stage_unit"] == "percent" else " devices"
    _table(
        "stages",
        ["stage", "target", "state", "devices", "installed", "failed", "in progress", "queued"],
        [
            [
                s["index"] + 1,
                f"{s['target']:g}{unit}",
                stage_state(s),
                s["devices"],
                s["installed"],
                s["failed"],
                s["in_progress"],
                s["queued"],
            ]
            for s in status["stages"]
        ],
    )


def _wait(
    c: Any, rollout_id: str, poll: float = 0.5, timeout: float | None = None
) -> dict[str, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    status = c.rollout(rollout_id)
    deadline = None if timeout is None else time.monotonic() + timeout
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=_console(),
        transient=False,
    ) as bar:
        task = bar.add_task(rollout_id, total=status["total"])
        while True:
            counts = status["counts"]
            stage = next(
                (s["index"] + 1 for s in status["stages"] if s["state"] == "running"), None
            )
            desc = f"{status['state']}" + (
                f", stage {stage}/{len(status['stages'])}" if stage else ""
            )
            failed = sum(counts.get(k, 0) for k in DEVICE_FAILED)
            bar.update(
                task, completed=counts.get("installed", 0), description=f"{desc} · {failed} failed"
            )
            if status["state"] in FINAL or (deadline is not None and time.monotonic() > deadline):
                return dict(status)
            time.sleep(poll)
            status = c.rollout(rollout_id)


def _finish(c: Any, status: dict[str, Any], wait: bool, timeout: float | None) -> None:
    from .errors import ClientError

    if wait and status["state"] not in FINAL:
        status = _wait(c, status["rollout_id"], timeout=timeout)
    _show(status)
    if status["state"] in ("halted", "aborted"):
        raise ClientError(f"rollout {status['rollout_id']} {status['state']}: {status['reason']}")


@rollout_app.command("start")
def rollout_start(
    bundle: str = typer.Argument(
        ..., help="Bundle sha256 prefix, name@version, or a .efb file to push first."
    ),
    selector: str = typer.Option(
        "", "--selector", "-s", help="profile=…,tag=…,id=… (default: every device)."
    ),
    stages: str = typer.Option("5,25,50,100", "--stages", help="Cumulative stage sizes."),
    count: bool = typer.Option(False, "--count", help="Stages are device counts, not percentages."),
    success_threshold: float | None = typer.Option(
        None, "--success-threshold", help="Installed share to pass a stage."
    ),
    failure_threshold: float | None = typer.Option(
        None, "--failure-threshold", help="Failed share that halts."
    ),
    min_devices: int | None = typer.Option(
        None, "--min-devices", help="Reports needed before a halt."
    ),
    soak: float | None = typer.Option(None, "--soak", help="Seconds each stage must hold."),
    timeout_s: float | None = typer.Option(
        None, "--device-timeout", help="Seconds before a device times out."
    ),
    max_p95_ms: float | None = typer.Option(
        None, "--max-p95-ms", help="Halt when p95 latency exceeds this."
    ),
    max_error_rate: float | None = typer.Option(
        None, "--max-error-rate", help="Halt when the error rate exceeds this."
    ),
    halt_on_drift: bool = typer.Option(
        False, "--halt-on-drift", help="Halt when the new version's inputs drift."
    ),
    hold_on_budget: bool = typer.Option(
        False, "--hold-on-budget", help="Hold a stage while a profile's p95 is over its budget."
    ),
    hold_on_own_drift: bool = typer.Option(
        False, "--hold-on-own-drift", help="Hold a stage while the rollout's devices drift."
    ),
    accuracy_margin: float | None = typer.Option(
        None, "--accuracy-margin", help="Hold while field accuracy trails the old version by more."
    ),
    min_labels: int | None = typer.Option(
        None, "--min-labels", help="Labels each version needs before --accuracy-margin decides."
    ),
    no_rollback: bool = typer.Option(
        False, "--no-rollback", help="Do not roll back devices on a halt."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show the plan; send nothing."),
    force: bool = typer.Option(
        False, "--force", help="Allow profiles the bundle was not benchmarked for (audited)."
    ),
    wait: bool = typer.Option(False, "--wait", help="Follow progress until the rollout ends."),
    wait_timeout: float | None = typer.Option(
        None, "--wait-timeout", help="Stop following after this many seconds."
    ),
    url: str | None = UrlOpt,
    token: str | None = TokenOpt,
) -> None:
    """Create and start a staged rollout.

    \b
    Example:
      edgefleet rollout start iris@1.2.0 -s profile=raspberry-pi-4 --stages 5,25,100 --wait
    """
    c = client(url, token)
    if bundle.endswith(".efb") or Path(bundle).is_file():
        if dry_run:
            ref = _bundle_on_server(c, Path(bundle))
            if ref is None:
                return
            bundle = ref
        else:
            bundle = c.push_bundle(Path(bundle))["sha256"]
    body: dict[str, Any] = {
        "bundle": bundle,
        "selector": selector,
        "stages": _stages(stages),
        "stage_unit": "count" if count else "percent",
        "success_threshold": success_threshold,
        "failure_threshold": failure_threshold,
        "min_devices": min_devices,
        "soak_s": soak,
        "device_timeout_s": timeout_s,
        "max_p95_ms": max_p95_ms,
        "max_error_rate": max_error_rate,
        "halt_on_drift": halt_on_drift,
        "hold_on_profile_budget": hold_on_budget or None,
        "hold_on_own_drift": hold_on_own_drift or None,
        "accuracy_margin": accuracy_margin,
        "min_labels": min_labels,
        "rollback_on_halt": False if no_rollback else None,
    }
    status = c.create_rollout(
        {k: v for k, v in body.items() if v is not None},
        dry_run=dry_run,
        force=force,
        start=not dry_run,
    )
    if dry_run:
        _show_plan(status)
        return
    _finish(c, status, wait, wait_timeout)


def _bundle_on_server(c: Any, path: Path) -> str | None:
    """For a dry run with a .efb file: its sha256 when the server already has it; otherwise
    say what a real run would upload and return None (a dry run uploads nothing)."""
    import hashlib

    from .errors import ClientError

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ClientError(f"cannot read {path}: {exc.strerror}") from None
    sha = hashlib.sha256(data).hexdigest()
    if c.find_bundle(sha) is not None:
        return sha
    print(
        f"dry run: nothing uploaded, created or sent. {path.name} (sha256 {sha[:12]}) is not on "
        "the server yet, so there is no plan to show: a real run would upload it first "
        f"(or upload it now with edgefleet fleet bundles push {path} and dry-run again)."
    )
    return None


def _show_plan(status: dict[str, Any]) -> None:
    b = status["bundle"]
    unit = "%" if status["spec"]["stage_unit"] == "percent" else " devices"
    print(
        f"dry run: nothing created or sent. Plan for {b.get('name')} {b.get('version')} "
        f"to {status['total']} devices:"
    )
    _table(
        "planned stages",
        ["stage", "target", "devices", "device ids"],
        [
            [
                s["index"] + 1,
                f"{s['target']:g}{unit}",
                s["devices"],
                ", ".join(s.get("device_ids") or []) or "-",
            ]
            for s in status["stages"]
        ],
    )
    for s in status["stages"]:
        print(f"stage {s['index'] + 1}: {', '.join(s.get('device_ids') or []) or '-'}")


@rollout_app.command("status")
def rollout_status(
    rollout_id: str = typer.Argument(..., help="The rollout id (r-…)."),
    wait: bool = typer.Option(False, "--wait", help="Follow until it ends."),
    devices: bool = typer.Option(False, "--devices", help="Also list every device's state."),
    url: str | None = UrlOpt,
    token: str | None = TokenOpt,
) -> None:
    """Show a rollout's stages (and devices).

    \b
    Example:
      edgefleet rollout status r-1a2b3c4d5e --devices
    """
    c = client(url, token)
    status = c.rollout(rollout_id)
    if wait and status["state"] not in FINAL:
        status = _wait(c, rollout_id)
    _show(status)
    if devices:
        _table(
            "devices",
            ["device", "stage", "state", "attempts", "reason"],
            [
                [d["device_id"], d["stage"] + 1, d["state"], d["attempts"], d["reason"]]
                for d in status["devices"]
            ],
        )


@rollout_app.command("list")
def rollout_list(url: str | None = UrlOpt, token: str | None = TokenOpt) -> None:
    """List rollouts, newest first.

    \b
    Example:
      edgefleet rollout list
    """
    rows = client(url, token).rollouts()
    _table(
        "rollouts",
        ["id", "bundle", "version", "state", "created"],
        [
            [r["rollout_id"], r.get("bundle"), r.get("version"), r["state"], _ago(r["created_at"])]
            for r in rows
        ],
    )


def _action(action: str) -> Callable[..., None]:
    def command(
        rollout_id: str = typer.Argument(..., help="The rollout id (r-…)."),
        url: str | None = UrlOpt,
        token: str | None = TokenOpt,
    ) -> None:
        _show(client(url, token).action(rollout_id, action))

    command.__doc__ = {
        "pause": "Pause a rollout: nothing more is sent until it resumes.",
        "resume": "Resume a paused rollout.",
        "abort": "Abort a rollout: stop sending; installed devices keep the new version.",
        "rollback": "Roll back: send signed rollback commands to every device that installed it.",
    }[action] + f"\n\n    \b\n    Example:\n      edgefleet rollout {action} r-1a2b3c4d5e\n    "
    return command


for _name in ("pause", "resume", "abort", "rollback"):
    rollout_app.command(_name)(_action(_name))


# drift and telemetry --------------------------------------------------------------------------
@drift_app.command("report")
def drift_report(
    model: str | None = typer.Option(None, "--model", help="Only this model (bundle name)."),
    version: str | None = typer.Option(None, "--version", help="Only this model version."),
    limit: int = typer.Option(
        20, "--limit", min=1, max=1000, help="How many results, newest first (one page)."
    ),
    by: str | None = typer.Option(
        None, "--by", help="device, tag or profile: one row per device or cohort, drifted first."
    ),
    url: str | None = UrlOpt,
    token: str | None = TokenOpt,
) -> None:
    """Latest drift results per model version, from the server's merged sketches.

    \b
    Example:
      edgefleet drift report --model iris --by device
    """
    if by is not None:
        _drift_by(client(url, token), by, model, version)
        return
    rows = client(url, token).drift(model=model, version=version, limit=limit)
    if not rows:
        print("no drift results yet")
        return
    out = []
    for r in rows:
        feats = [f for f in r.get("features", []) if f.get("role", "feature") == "feature"]
        drifted = [f["name"] for f in feats if f.get("drift")]
        window = r.get("window_start", r.get("window"))  # stored results name it "window"
        when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(window)) if window else "-"
        out.append(
            [
                r.get("model"),
                r.get("version"),
                when,
                r.get("rows", ""),
                f"{len(drifted)}/{len(feats)} {', '.join(drifted[:4])}".strip(),
                "YES" if r.get("dataset_drift") else "no",
            ]
        )
    _table(
        "drift",
        ["model", "version", "window (UTC)", "rows", "drifted features", "dataset drift"],
        out,
    )


@telemetry_app.command("tail")
def telemetry_tail(
    topic_filter: str = typer.Argument(
        "#", help="MQTT topic filter, e.g. 'edgefleet/devices/+/telemetry/#'."
    ),
    broker: str | None = typer.Option(
        None,
        "--broker",
        envvar="EDGEFLEET_BROKER",
        help="Broker URL, e.g. mqtt://127.0.0.1:1883 (default: asked from the fleet server).",
    ),
    prefix: str | None = typer.Option(
        None, "--prefix", help="Topic prefix (default: the fleet server's, or edgefleet)."
    ),
    limit: int | None = typer.Option(None, "--limit", help="Stop after this many messages."),
    duration: float | None = typer.Option(None, "--duration", help="Stop after this many seconds."),
    url: str | None = UrlOpt,
    token: str | None = TokenOpt,
) -> None:
    """A readable live view of any topic: one line per message.

    Without --broker it asks the fleet server (EDGEFLEET_URL, EDGEFLEET_TOKEN) where the
    broker is. While no message comes it says what it is waiting for (on stderr).

    \b
    Example:
      edgefleet telemetry tail 'edgefleet/devices/+/status'
      edgefleet telemetry tail '#' --broker mqtt://127.0.0.1:1883 --limit 10
    """
    from .telemetry.tail import follow

    if broker is None:
        broker, server_prefix = _broker_from_server(url, token)
        prefix = prefix or server_prefix
    prefix = prefix or "edgefleet"

    def waiting() -> None:
        print(
            f"waiting for messages on {topic_filter!r} at {broker} (Ctrl-C to stop)",
            file=sys.stderr,
        )

    try:
        follow(
            broker,
            topic_filter,
            print,
            prefix=prefix,
            limit=limit,
            duration=duration,
            on_waiting=waiting,
        )
    except KeyboardInterrupt:
        pass


def _broker_from_server(url: str | None, token: str | None) -> tuple[str, str | None]:
    """The broker URL and topic prefix the fleet server announces on GET /v1/broker."""
    from .errors import ClientError

    c = client(url, token)
    try:
        info = c.broker()
    except ClientError as exc:
        raise type(exc)(
            f"telemetry tail needs the broker's URL and could not ask the fleet server at "
            f"{c.url} ({exc}); pass --broker mqtt://HOST:1883 or set EDGEFLEET_BROKER"
        ) from None
    return str(info["url"]), info.get("topic_prefix")


# the fleet's own measurements ----------------------------------------------------------------
def _drift_by(c: Any, by: str, model: str | None, version: str | None) -> None:
    if by not in ("device", "tag", "profile"):
        from .errors import InvalidInput

        raise InvalidInput("--by must be device, tag or profile", field="by")
    rows = c.drift_scopes(by=by, model=model, version=version)
    if not rows:
        print(f"no drift results by {by} yet")
        return
    out = []
    for r in rows:
        drifted = r.get("drifted_features") or []
        out.append(
            [
                f"{r['model']} {r['version']}",
                f"{r['scope']}:{r['subject']}",
                len(r.get("devices") or []),
                r.get("rows", ""),
                f"{len(drifted)}/{r.get('tested_features', 0)} {', '.join(drifted[:4])}".strip()
                if r.get("evaluated")
                else "not tested (too few rows)",
                "YES" if r.get("dataset_drift") else "no",
            ]
        )
    _table(
        f"drift by {by}",
        ["model", "scope", "devices", "rows", "drifted features", "dataset drift"],
        out,
    )


def _interval(r: dict[str, Any]) -> str:
    if r.get("value") is None:
        return "-"
    if r.get("metric") == "accuracy":
        ci = f" [{r['ci_low']:.1%}, {r['ci_high']:.1%}]" if r.get("ci_low") is not None else ""
        return f"{r['value']:.1%}{ci}"
    ci = f" [{r['ci_low']:.4g}, {r['ci_high']:.4g}]" if r.get("ci_low") is not None else ""
    return f"MAE {r['value']:.4g}{ci}"


@fleet_app.command("accuracy")
def fleet_accuracy(
    model: str | None = typer.Option(None, "--model", help="Only this model (bundle name)."),
    version: str | None = typer.Option(None, "--version", help="Only this model version."),
    by: str = typer.Option("version", "--by", help="version or device."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    url: str | None = UrlOpt,
    token: str | None = TokenOpt,
) -> None:
    """Field accuracy (or MAE) from labelled feedback, with a 95 % interval.

    \b
    Example:
      edgefleet fleet accuracy --model iris --by device
    """
    rows = client(url, token).accuracy(model=model, version=version, by=by)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        print("no labelled feedback yet")
        return
    who = "device_id" if by == "device" else "devices"
    _table(
        f"field accuracy by {by}",
        ["model", "version", "device" if by == "device" else "devices", "labelled", "value [95%]"],
        [[r["model"], r["version"], r.get(who), r["labelled"], _interval(r)] for r in rows],
    )


@fleet_app.command("alerts")
def fleet_alerts(
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    url: str | None = UrlOpt,
    token: str | None = TokenOpt,
) -> None:
    """Standing health alerts firing now (latency, errors, fallbacks, offline, disk).

    \b
    Example:
      edgefleet fleet alerts
    """
    data = client(url, token).health_alerts()
    if as_json:
        print(json.dumps(data, indent=2))
        return
    firing = data.get("firing") or []
    if not firing:
        print("no health alert is firing")
        return
    _table(
        "health alerts firing",
        ["rule", "scope", "since", "message"],
        [
            [a["rule"], f"{a['scope']}:{a['subject']}", _ago(a.get("since")), a["message"]]
            for a in firing
        ],
    )


@fleet_app.command("bench")
def fleet_bench(
    bundle: str = typer.Argument(..., help="Bundle sha256 prefix or name@version."),
    selector: str = typer.Option("", "--selector", "-s", help="profile=…,tag=…,id=…"),
    sample: int = typer.Option(10, "--sample", help="Benchmark at most this many devices."),
    runs: int = typer.Option(200, "--runs", help="Timed single-row runs per device."),
    wait: float = typer.Option(0.0, "--wait", help="Seconds to wait for results (0: do not)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    url: str | None = UrlOpt,
    token: str | None = TokenOpt,
) -> None:
    """Time a bundle on a sample of devices; the results calibrate the profile.

    \b
    Example:
      edgefleet fleet bench iris@1.2.0 --selector profile=raspberry-pi-4 --sample 10
    """
    c = client(url, token)
    started = c.bench(bundle, selector=selector, sample=sample, runs=runs)
    wanted = set(started["command_ids"])
    deadline = time.monotonic() + wait
    results: list[dict[str, Any]] = []
    while True:
        results = [s for s in c.benchmarks() if s.get("command_id") in wanted]
        if len(results) >= len(wanted) or time.monotonic() >= deadline:
            break
        time.sleep(1.0)
    if as_json:
        print(json.dumps({**started, "results": results}, indent=2))
        return
    print(f"benchmark {started['run_id']} sent to {len(started['devices'])} devices")
    if results:
        _table(
            "field benchmark",
            ["device", "profile", "p50 ms", "p95 ms", "host p50 ms", "device / host"],
            [
                [
                    r["device_id"],
                    r["profile"],
                    f"{r['p50_ms']:.3f}",
                    f"{r['p95_ms']:.3f}",
                    f"{r['host_p50_ms']:.3f}" if r.get("host_p50_ms") else "-",
                    f"{r['ratio']:.2f}" if r.get("ratio") else "-",
                ]
                for r in results
            ],
        )


@fleet_app.command("calibration")
def fleet_calibration(
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    url: str | None = UrlOpt,
    token: str | None = TokenOpt,
) -> None:
    """Measured speed factor per profile from field benchmarks, and latency outliers.

    \b
    Example:
      edgefleet fleet calibration
    """
    data = client(url, token).calibration()
    if as_json:
        print(json.dumps(data, indent=2))
        return
    _table(
        "measured speed factors",
        ["profile", "measured", "spread (IQR)", "devices", "date", "estimate"],
        [
            [
                p["profile"],
                f"{p['speed_factor']:.3g}",
                f"{p['spread']:.3g}",
                p["devices"],
                p["date"],
                p.get("estimate"),
            ]
            for p in data.get("profiles", [])
        ],
    )
    for o in data.get("outliers", []):
        why = (
            o.get("why")
            or f"device/host ratio {o.get('ratio', 0):.2f} ({o.get('times_median', 0):.1f}× median)"
        )
        print(f"outlier: {o['device_id']} ({o.get('profile')}): {why}")


# release channels ----------------------------------------------------------------------------
channels_app = typer.Typer(
    rich_markup_mode=None,
    no_args_is_help=True,
    help="Release channels (beta, stable, …): policies, devices, history.",
)
fleet_app.add_typer(channels_app, name="channels")
ReasonOpt = typer.Option("", "--reason", help="Why (kept in the audit log).")


def _channel_line(ch: dict[str, Any]) -> list[Any]:
    cur, prev = ch.get("current") or {}, ch.get("previous") or {}
    online = sum(1 for d in ch["devices"] if d["online"])
    return [
        ch["model"],
        ch["channel"],
        cur.get("version") or "-",
        prev.get("version") or "-",
        f"{len(ch['devices'])} ({online} online)",
        ch["policy"].get("requires") or "-",
    ]


@channels_app.command("list")
def channels_list(
    model: str | None = typer.Option(None, "--model", help="Only this model."),
    url: str | None = UrlOpt,
    token: str | None = TokenOpt,
) -> None:
    """Every channel of every model: current and previous version, devices, requirement.

    \b
    Example:
      edgefleet fleet channels list --model digits
    """
    rows = [_channel_line(ch) for ch in client(url, token).channels(model)]
    _table("channels", ["model", "channel", "current", "previous", "devices", "requires"], rows)


@channels_app.command("show")
def channels_show(
    model: str = typer.Argument(..., help="Model name."),
    channel: str = typer.Argument(..., help="Channel name."),
    url: str | None = UrlOpt,
    token: str | None = TokenOpt,
) -> None:
    """One channel: its policy, devices and history (who moved it, when and why).

    \b
    Example:
      edgefleet fleet channels show digits stable
    """
    ch = client(url, token).channel(model, channel)
    cur = ch.get("current") or {}
    print(f"{model}/{channel}: current {cur.get('version') or '-'}")
    print("policy: " + ", ".join(f"{k}={v}" for k, v in ch["policy"].items()))
    _table(
        "devices",
        ["device", "online", "runs"],
        [[d["device_id"], d["online"], d.get("version") or "-"] for d in ch["devices"]],
    )
    _table(
        "history",
        ["when", "action", "bundle", "who", "why"],
        [
            [_ago(h["ts"]), h["action"], (h["sha256"] or "-")[:12], h["actor"], h["reason"]]
            for h in ch["history"]
        ],
    )


@channels_app.command("set")
def channels_set(
    model: str = typer.Argument(..., help="Model name."),
    channel: str = typer.Argument(..., help="Channel name (new ones are created)."),
    stages: str | None = typer.Option(None, "--stages", help="Cumulative stages, e.g. 10,50,100."),
    soak: float | None = typer.Option(None, "--soak", help="Soak seconds per stage."),
    requires: str | None = typer.Option(
        None, "--requires", help="A channel the bundle must have succeeded on first."
    ),
    hold: float | None = typer.Option(
        None, "--hold", help="Seconds it must have held on the required channel."
    ),
    no_drift: bool | None = typer.Option(
        None, "--no-drift/--allow-drift", help="Refuse a bundle with a drift alert."
    ),
    accuracy_tolerance: float | None = typer.Option(
        None, "--accuracy-tolerance", help="Field accuracy may be this much below current."
    ),
    url: str | None = UrlOpt,
    token: str | None = TokenOpt,
) -> None:
    """Define a channel or change its policy (unset options keep the channel's defaults).

    \b
    Example:
      edgefleet fleet channels set digits stable --stages 10,100 --requires beta --hold 3600
    """
    policy: dict[str, Any] = {
        k: v
        for k, v in {
            "stages": _stages(stages) if stages else None,
            "soak_s": soak,
            "requires": requires,
            "hold_s": hold,
            "no_drift": no_drift,
            "accuracy_tolerance": accuracy_tolerance,
        }.items()
        if v is not None
    }
    ch = client(url, token).define_channel(model, channel, policy)
    print(f"{model}/{channel}: " + ", ".join(f"{k}={v}" for k, v in ch["policy"].items()))


@fleet_app.command("promote")
def fleet_promote(
    bundle: str = typer.Argument(..., help="name@version or a sha256 prefix."),
    to: str = typer.Option(..., "--to", help="The channel, e.g. stable."),
    reason: str = ReasonOpt,
    force: bool = typer.Option(False, "--force", help="Promote an archived bundle (audited)."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Show the policy and every condition; change nothing."
    ),
    url: str | None = UrlOpt,
    token: str | None = TokenOpt,
) -> None:
    """Promote a bundle into a channel: a staged rollout to that channel's devices.

    A refusal names each failed condition and exits 1.

    \b
    Example:
      edgefleet fleet promote digits@1.5.0 --to stable --reason "beta held a week"
    """
    c = client(url, token)
    if dry_run:
        plan = c.promote(bundle, to, reason, force, preview=True)
        for cond in plan["conditions"]:
            print(f"{'ok ' if cond['ok'] else 'NO '} {cond['name']}: {cond['detail']}")
        print(f"{len(plan['devices'])} devices follow {to}")
        return
    out = c.promote(bundle, to, reason, force)
    cur = out.get("current") or {}
    rid = out.get("rollout_id")
    where = f"rollout {rid}" if rid else "no device follows it yet"
    print(f"{cur.get('name')} {cur.get('version')} is now {to}: {where}")


@fleet_app.command("demote")
def fleet_demote(
    model: str = typer.Argument(..., help="Model name."),
    channel: str = typer.Option("stable", "--channel", help="The channel to demote."),
    reason: str = ReasonOpt,
    url: str | None = UrlOpt,
    token: str | None = TokenOpt,
) -> None:
    """Return a channel to its previous bundle; its devices get signed rollbacks.

    \b
    Example:
      edgefleet fleet demote digits --channel stable --reason "accuracy dropped"
    """
    out = client(url, token).demote(model, channel, reason)
    cur = out.get("current") or {}
    print(
        f"{model}/{channel} is back at {cur.get('version')}; rolled back: "
        f"{', '.join(out.get('rolled_back') or []) or 'no rollout'}"
    )


@bundles_app.command("archive")
def bundles_archive(
    bundle: str = typer.Argument(..., help="name@version or a sha256 prefix."),
    reason: str = ReasonOpt,
    url: str | None = UrlOpt,
    token: str | None = TokenOpt,
) -> None:
    """Archive a bundle: promoting it again needs --force (audited).

    \b
    Example:
      edgefleet fleet bundles archive digits@1.4.0 --reason "superseded"
    """
    out = client(url, token).archive(bundle, reason)
    print(f"{out['bundle']['name']} {out['bundle']['version']} archived")


@bundles_app.command("lineage")
def bundles_lineage(
    bundle: str = typer.Argument(..., help="name@version or a sha256 prefix."),
    url: str | None = UrlOpt,
    token: str | None = TokenOpt,
) -> None:
    """Every channel a bundle was in, when, and why.

    \b
    Example:
      edgefleet fleet bundles lineage digits@1.5.0
    """
    out = client(url, token).lineage(bundle)
    _table(
        f"{out['bundle']['name']} {out['bundle']['version']}",
        ["when", "channel", "action", "who", "why"],
        [
            [_ago(h["ts"]), h["channel"], h["action"], h["actor"], h["reason"]]
            for h in out["lineage"]
        ],
    )


@devices_app.command("channel")
def devices_channel(
    device_id: str = typer.Argument(..., help="Device id."),
    channel: str | None = typer.Argument(None, help="stable, or MODEL/stable; omit to clear."),
    url: str | None = UrlOpt,
    token: str | None = TokenOpt,
) -> None:
    """Set the channel a device follows (overrides its agent's [agent] channel).

    \b
    Example:
      edgefleet fleet devices channel pi-0001 stable
    """
    out = client(url, token).set_device_channel(device_id, channel)
    print(f"{device_id}: follows {out['assigned'] or out['reported'] or 'no channel'}")
