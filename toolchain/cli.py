"""The host toolchain's commands, mounted by the root ``edgefleet`` CLI.

Each command is a docstring with an example and a few lines calling one library function.
Heavy libraries (scikit-learn, onnx, onnxruntime, TensorFlow) are imported inside the
commands, so importing this module and ``edgefleet --help`` stay fast. Commands raise our
errors; the root CLI (``edgefleet/cli.py``) turns them into one ``error: …`` line and the
documented exit code (``OverBudget`` → 3).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from rich.console import Console

    from .benchmark import BenchReport
    from .optimize import OptimizeReport


def _typer(help_: str | None = None) -> typer.Typer:
    return typer.Typer(
        rich_markup_mode=None, add_completion=False, no_args_is_help=True, help=help_
    )


app = _typer()
keys_app = _typer("Generate signing keys.")
profiles_app = _typer("List and show device profiles.")
app.add_typer(keys_app, name="keys")
app.add_typer(profiles_app, name="profiles")


@app.callback()
def main() -> None:
    """edgefleet host toolchain: convert, quantize, benchmark, package and verify models."""


def _console(stderr: bool = False) -> Console:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


@contextmanager
def _quiet_libraries() -> Iterator[None]:
    """Hide third-party advice logged on the root logger (onnxruntime's quantizer suggests
    "pre-processing" on every call) unless ``edgefleet --debug`` turned debug logging on;
    restored afterwards."""
    import logging

    root = logging.getLogger()
    level = root.level
    if root.getEffectiveLevel() > logging.DEBUG:
        root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


@contextmanager
def _progress(enabled: bool = True) -> Iterator[Callable[[str], None]]:
    """A rich spinner whose text the library's progress callback updates (on stderr)."""
    if not enabled:
        with _quiet_libraries():
            yield lambda _msg: None
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with (
        Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=_console(stderr=True),
            transient=True,
        ) as bar,
        _quiet_libraries(),
    ):
        task = bar.add_task("starting", total=None)
        yield lambda msg: bar.update(task, description=msg)


def _model_file(path: Path) -> None:
    """A converted model (.onnx/.tflite) must exist before any data is read."""
    from .compat import model_format
    from .errors import UnsupportedModelError

    model_format(path)
    if not path.is_file():
        raise UnsupportedModelError(f"model file {path} does not exist")


def _profiles(names: list[str]) -> list[Any]:
    from protocol.profiles import load_profile

    return [load_profile(n) for n in names]


# --- profiles ---------------------------------------------------------------------------


@profiles_app.command("list")
def profiles_list() -> None:
    """List the device profiles edgefleet knows.

    \b
    Example:
      edgefleet profiles list
    """
    from rich.table import Table

    from protocol.profiles import list_profiles

    table = Table(title="device profiles (speed × = device latency / host latency)")
    for col in ("name", "arch", "threads", "mem MiB", "budget ms", "speed ×", "prefers"):
        table.add_column(col, no_wrap=True)
    table.add_column("cpu")
    for p in list_profiles():
        table.add_row(
            p.name, p.arch, f"{p.inference_threads}/{p.cores}", f"{p.memory_budget_mb:g}",
            f"{p.latency_budget_ms:g}", f"{p.speed_factor:g}",
            f"{p.preferred_precision} {p.preferred_format}", p.cpu,
        )  # fmt: skip
    _console().print(table)


@profiles_app.command("show")
def profiles_show(
    name: str = typer.Argument(..., help="Profile name, or a path to a .toml file."),
) -> None:
    """Show everything about one device profile, including where its speed factor comes from.

    \b
    Example:
      edgefleet profiles show raspberry-pi-4
    """
    from rich.table import Table

    from protocol.profiles import load_profile

    p = load_profile(name)
    table = Table(title=f"profile {p.name}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for key, value in p.model_dump().items():
        if key == "runtimes":
            continue
        table.add_row(key, str(value))
    for rt in p.runtimes:
        opsets = f", max opset {rt.max_opset}" if rt.max_opset else ""
        opsets += f", max ml opset {rt.max_ml_opset}" if rt.max_ml_opset else ""
        table.add_row("runtime", f"{rt.name} {rt.version} ({', '.join(rt.formats)}{opsets})")
    _console().print(table)


@profiles_app.command("calibrate")
def profiles_calibrate(
    from_fleet: bool = typer.Option(
        False,
        "--from-fleet",
        help="Take measured factors from the fleet server's field benchmarks.",
    ),
    url: str = typer.Option(
        "http://127.0.0.1:8700", "--url", envvar="EDGEFLEET_URL", help="Fleet server URL."
    ),
    token: str | None = typer.Option(None, "--token", envvar="EDGEFLEET_TOKEN", help="API token."),
    profile: list[str] = typer.Option([], "--profile", help="Only these profiles (repeatable)."),
    out_dir: Path | None = typer.Option(
        None, "--dir", help="Write the calibrated files here (default: over the profile file)."
    ),
    min_devices: int = typer.Option(1, "--min-devices", min=1, help="Skip thinner evidence."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show the factors; write nothing."),
) -> None:
    """Write measured speed factors into profile files as a [measured] table.

    The estimate stays beside it; bench and optimize then say "measured on N devices (date)".

    \b
    Example:
      edgefleet profiles calibrate --from-fleet --url http://fleet:8700 --profile raspberry-pi-4
    """
    from .calibrate import calibrate, fetch_calibration

    if not from_fleet:
        from .errors import ToolchainError

        raise ToolchainError("say where the measurements come from: --from-fleet")
    data = fetch_calibration(url, token)
    done = calibrate(
        data, names=list(profile), folder=out_dir, min_devices=min_devices, dry_run=dry_run
    )
    if not done:
        _console().print("no profile has field benchmarks yet (edgefleet fleet bench BUNDLE …)")
        return
    note = " (dry run: nothing written)" if dry_run else ""
    for p, path in done:
        m = p.measured
        assert m is not None
        typer.echo(
            f"{p.name}: speed factor {m.speed_factor:.4g} {p.speed_basis()}, spread (IQR) "
            f"{m.spread:.3g}; estimate {p.speed_factor:g} kept beside it → {path}{note}"
        )


# --- keys -------------------------------------------------------------------------------


@keys_app.command("generate")
def keys_generate(
    out: Path = typer.Option(..., "--out", help="Folder for NAME.key (mode 0600) and NAME.pub."),
    name: str = typer.Option("edgefleet", "--name", help="Base name of the key files."),
) -> None:
    """Generate an Ed25519 signing key pair; prints only the key id.

    \b
    Example:
      edgefleet keys generate --out ~/.edgefleet/keys --name release
    """
    from .keys import generate_keys

    key = generate_keys(out, name)
    typer.echo(f"key id {key.key_id}: private {key.private_path} (0600), public {key.public_path}")


# --- convert / quantize -----------------------------------------------------------------


def _parity_table(report: Any, title: str) -> None:
    from rich.table import Table

    table = Table(title=title)
    for col in ("metric", "value", "threshold", "ok"):
        table.add_column(col)
    for row in report.rows():
        table.add_row(*row)
    _console().print(table)


@app.command()
def convert(
    model: Path = typer.Argument(
        ...,
        help="Pickle/joblib (scikit-learn, XGBoost, LightGBM, CatBoost), .json/.ubj "
        "(XGBoost), .txt (LightGBM), .cbm (CatBoost), .pt (PyTorch), .onnx, .keras or "
        "SavedModel dir.",
    ),
    data: Path = typer.Option(
        ...,
        "--data",
        help="Data to check parity on (.npz or .csv); a PyTorch module's input shape is the "
        "per-row shape of the .npz X.",
    ),
    target: str | None = typer.Option(
        None, "--target", help="CSV target column (excluded from X)."
    ),
    to: str | None = typer.Option(
        None,
        "--to",
        help="onnx or tflite (default: tflite for Keras, onnx otherwise; "
        "TFLite needs a Keras model).",
    ),
    out: Path | None = typer.Option(None, "--out", help="Output model path."),
    min_label_agreement: float | None = typer.Option(None, help="Parity: minimum label agreement."),
    max_proba_diff: float | None = typer.Option(None, help="Parity: maximum |Δprobability|."),
    max_abs_error: float | None = typer.Option(None, help="Parity: maximum absolute error."),
    max_rel_error: float | None = typer.Option(None, help="Parity: maximum relative error."),
) -> None:
    """Convert a model and check parity with the source on DATA.

    \b
    Example:
      edgefleet convert model.joblib --data train.csv --target label --out model.onnx
    """
    from .convert import convert as run_convert
    from .data import load_data
    from .errors import ParityError
    from .parity import ParityThresholds
    from .sources import check_source_path, load_source

    if to not in (None, "onnx", "tflite"):
        raise typer.BadParameter("must be onnx or tflite", param_hint="--to")
    overrides = {
        k: v
        for k, v in {
            "min_label_agreement": min_label_agreement,
            "max_proba_diff": max_proba_diff,
            "max_abs_error": max_abs_error,
            "max_rel_error": max_rel_error,
        }.items()
        if v is not None
    }
    check_source_path(model)
    dataset = load_data(data, target)
    source = load_source(model)
    to = to or ("tflite" if source.kind == "keras" else "onnx")
    try:
        thresholds = ParityThresholds(**overrides)
        result = run_convert(source, dataset, to=to, out=out, thresholds=thresholds)  # type: ignore[arg-type]
    except ParityError as exc:
        _parity_table(exc.report, "parity: FAILED")
        raise
    if result.parity is not None:
        _parity_table(result.parity, "parity: ok")
    typer.echo(f"wrote {result.path} ({result.format}; {result.sidecar.lineage.converter})")


@app.command()
def quantize(
    model: Path = typer.Argument(..., help="A converted .onnx or .tflite model."),
    mode: str = typer.Option(
        ..., "--mode", help="dynamic, static, fp16 or int8 (TFLite full INT8)."
    ),
    data: Path | None = typer.Option(
        None, "--data", help="Calibration data (static/int8); also checks parity."
    ),
    target: str | None = typer.Option(None, "--target", help="CSV target column to drop."),
    out: Path | None = typer.Option(None, "--out", help="Output model path."),
    min_label_agreement: float | None = typer.Option(
        None, help="Parity vs the unquantized model: minimum label agreement (default 0.98)."
    ),
    max_abs_error: float | None = typer.Option(
        None, help="Parity: maximum absolute error, regressors (default 0.05)."
    ),
    max_rel_error: float | None = typer.Option(
        None, help="Parity: maximum relative error, regressors (default 0.05)."
    ),
) -> None:
    """Quantize a converted model; with --data, check it still agrees with the original.

    \b
    Example:
      edgefleet quantize model.onnx --mode static --data calib.csv --out model-int8.onnx
    """
    from .data import load_data
    from .errors import QuantizedParityError
    from .quantize import QuantizedParityThresholds
    from .quantize import quantize as run_quantize

    if mode not in ("dynamic", "static", "fp16", "int8"):
        raise typer.BadParameter("must be dynamic, static, fp16 or int8", param_hint="--mode")
    overrides = {
        k: v
        for k, v in {
            "min_label_agreement": min_label_agreement,
            "max_abs_error": max_abs_error,
            "max_rel_error": max_rel_error,
        }.items()
        if v is not None
    }
    thresholds = QuantizedParityThresholds(**overrides)
    _model_file(model)
    dataset = load_data(data, target) if data else None
    try:
        with _quiet_libraries():
            result = run_quantize(model, mode=mode, data=dataset, out=out, thresholds=thresholds)  # type: ignore[arg-type]
    except QuantizedParityError as exc:
        _quant_parity_table(exc.parity, exc.failures)
        raise
    before = Path(model).stat().st_size
    typer.echo(
        f"wrote {result.path} ({result.format}, {result.mode}): {result.size_bytes} bytes, "
        f"{result.size_bytes / before:.2f}× the input"
    )
    parity = result.sidecar.parity if result.sidecar is not None else None
    if parity:
        _quant_parity_table(parity, [])


def _quant_parity_table(parity: dict[str, Any], failures: list[str]) -> None:
    from rich.table import Table

    table = Table(title="parity with the unquantized model: " + ("FAILED" if failures else "ok"))
    table.add_column("metric")
    table.add_column("value")
    for key in (
        "n_rows",
        "label_agreement",
        "max_abs_proba_diff",
        "max_abs_error",
        "max_rel_error",
    ):
        if parity.get(key) is not None:
            table.add_row(key.replace("_", " "), f"{parity[key]:.6g}")
    _console().print(table)


# --- bench / optimize -------------------------------------------------------------------


def _bench_table(report: BenchReport) -> None:
    from rich.table import Table

    p, r, h = report.profile, report.result, report.host
    table = Table(
        title=f"{report.model.name} on {p.name} "
        f"(device numbers are ESTIMATES: host × {p.effective_speed_factor():g}, "
        f"speed factor {p.speed_basis()})"
    )
    for col in ("measure", "host", f"est. {p.name}", "budget"):
        table.add_column(col)
    if h is not None:
        table.add_row("single-row p50 ms", f"{h.p50_ms:.3f}", f"{r.p50_ms:.3f}", "")
        table.add_row(
            "single-row p95 ms", f"{h.p95_ms:.3f}", f"{r.p95_ms:.3f}", f"{p.latency_budget_ms:g}"
        )
        table.add_row("single-row p99 ms", f"{h.p99_ms:.3f}", f"{r.p99_ms:.3f}", "")
        table.add_row(
            f"batch({h.batch_size}) p50 ms",
            f"{h.batch_p50_ms:.3f}",
            f"{r.batch_p50_ms or 0:.3f}",
            "",
        )
        table.add_row(
            f"batch({h.batch_size}) p95/p99 ms",
            f"{h.batch_p95_ms:.3f} / {h.batch_p99_ms:.3f}",
            "",
            "",
        )
        table.add_row(
            "throughput rows/s", f"{h.throughput_rps:,.0f}", f"{r.throughput_rps or 0:,.0f}", ""
        )
        table.add_row("load ms", f"{h.load_ms:.1f}", f"{r.load_ms or 0:.1f}", "")
        table.add_row(
            "peak RSS delta MiB", f"{h.peak_memory_mb:.1f}", "", f"{p.memory_budget_mb:g}"
        )
    table.add_row(
        "model size", f"{report.compat.facts.size_bytes:,} B", "", f"{p.memory_budget_mb:g} MiB"
    )
    facts = report.compat.facts
    if facts.opset or facts.ml_opset:
        table.add_row(
            "opset (ai.onnx / ml)",
            f"{facts.opset} / {facts.ml_opset}",
            "",
            f"{report.compat.runtime}",
        )
    table.add_row("operators", str(len(facts.operators)), "", "")
    table.add_row("verdict", "", "FITS" if report.fits else "OVER BUDGET", "")
    console = _console()
    console.print(table)
    for reason in report.reasons:
        console.print(f"  - {reason}")


@app.command()
def bench(
    model: Path = typer.Argument(..., help="A converted .onnx or .tflite model."),
    profile: str = typer.Option(..., "--profile", help="Profile name or path to a .toml file."),
    data: Path | None = typer.Option(
        None, "--data", help="Rows to time (default: synthesized from the schema)."
    ),
    target: str | None = typer.Option(None, "--target", help="CSV target column to drop."),
    runs: int = typer.Option(200, "--runs", min=10, help="Single-row timing runs."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Benchmark a model for a device profile; exit code 3 when it does not fit.

    Checks operators/opsets and memory against the profile, then times single-row and
    batch predictions on this host with the profile's thread count and scales them by the
    profile's speed factor. The verdict compares the ESTIMATED p95 with the budget.

    \b
    Example:
      edgefleet bench model.onnx --profile raspberry-pi-4 --data test.csv --target label
    """
    from .benchmark import benchmark
    from .data import load_data

    prof = _profiles([profile])[0]
    _model_file(model)
    dataset = load_data(data, target) if data else None
    with _progress(not as_json) as say:
        report = benchmark(model, prof, data=dataset, runs=runs, progress=say)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        _bench_table(report)
    if not report.fits:
        from protocol.errors import OverBudget

        raise OverBudget(
            f"{model.name} does not fit {prof.name}'s budget: " + "; ".join(report.reasons)
        )


def _short_result(verdict: str) -> str:
    """The table's result cell: the verdict's label ("n/a" for not applicable); the lines
    under the table give each verdict in full."""
    label = verdict.split(":", 1)[0]
    short = {"not applicable": "n/a", "failed to convert": "failed", "failed to run": "failed"}
    return short.get(label, label)


def _optimize_table(report: OptimizeReport) -> None:
    from rich.table import Table

    p = report.profile
    table = Table(
        title=f"variants for {p.name} (latency: ESTIMATES, host × {p.effective_speed_factor():g}, "
        f"speed factor {p.speed_basis()}; "
        f"budget {p.latency_budget_ms:g} ms, max {report.metric} drop {report.max_accuracy_drop:g})"
    )
    # Variant names are never cut; the table fits 80 columns (the full verdicts follow it).
    from rich import box

    table.box = box.SIMPLE_HEAD
    table.pad_edge = False
    table.collapse_padding = True
    table.show_edge = False
    longest = max(
        (len(v.name) + (2 if v is report.chosen else 0) for v in report.variants), default=8
    )
    table.add_column("variant", no_wrap=True, min_width=longest)
    for col in ("size", "p50 ms", "p95 ms", report.metric, "drop", "fits"):
        table.add_column(col, no_wrap=True)
    table.add_column("result", no_wrap=True)
    for v in report.variants:
        b = v.bench.result if v.bench else None
        table.add_row(
            ("→ " if v is report.chosen else "") + v.name,
            f"{v.size_bytes:,}" if v.size_bytes else "–",
            f"{b.p50_ms:.3f}" if b else "–",
            f"{b.p95_ms:.3f}" if b else "–",
            f"{v.score:.4f}" if v.score is not None else "–",
            f"{v.drop:+.4f}" if v.drop is not None else "–",
            ("yes" if v.fits else "no") if v.bench else "–",
            _short_result(v.verdict),
        )
    console = _console()
    console.print(table)
    for v in report.variants:
        console.print(f"  {v.name}: {v.verdict}")
    if report.metric in ("agreement", "R² vs source"):
        console.print("no target in DATA: each variant is scored against the source's predictions")
    else:
        console.print(f"source model's {report.metric} on held-out rows: {report.source_score:.4f}")
    for note in report.skipped:
        console.print(f"  skipped: {note}")


@app.command()
def optimize(
    model: Path = typer.Argument(
        ...,
        help="Source model, any kind 'convert' takes (pickle, native file, .pt, .onnx, .keras).",
    ),
    data: Path = typer.Option(
        ..., "--data", help="Data (.npz or .csv); with a target a quarter is held out."
    ),
    profile: str = typer.Option(..., "--profile", help="Profile name or path to a .toml file."),
    target: str | None = typer.Option(None, "--target", help="CSV target column."),
    max_accuracy_drop: float = typer.Option(
        0.01, "--max-accuracy-drop", help="Largest accepted drop."
    ),
    out: Path = typer.Option(Path("edgefleet-variants"), "--out", help="Folder for the variants."),
    runs: int = typer.Option(100, "--runs", min=10, help="Single-row timing runs per variant."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Try every variant (fp32, INT8 dynamic/static, FP16; ONNX and TFLite) and pick the best.

    The winner has the smallest estimated p95 among variants within the latency budget and
    the accuracy goal (a tie goes to the smaller file). Exit code 3 when none qualifies.

    \b
    Example:
      edgefleet optimize model.joblib --data train.csv --target label --profile raspberry-pi-4
    """
    from .data import load_data
    from .optimize import optimize as run_optimize
    from .sources import check_source_path

    prof = _profiles([profile])[0]
    check_source_path(model)
    dataset = load_data(data, target)
    with _progress(not as_json) as say:
        report = run_optimize(
            model,
            dataset,
            prof,
            out_dir=out,
            max_accuracy_drop=max_accuracy_drop,
            runs=runs,
            progress=say,
        )
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        _optimize_table(report)
    if report.chosen is None:
        from protocol.errors import OverBudget

        raise OverBudget("no variant meets both the budget and the accuracy goal")
    if not as_json:
        typer.echo(f"best: {report.chosen.name} → {report.chosen.path}")


# --- package / verify / inspect / build -------------------------------------------------


@app.command()
def package(
    model: Path = typer.Argument(
        ..., help="A converted .onnx or .tflite model (with its sidecar)."
    ),
    name: str = typer.Option(..., "--name", help="Bundle name (lowercase)."),
    version: str = typer.Option(..., "--version", help="Semantic version, e.g. 1.2.0."),
    profile: list[str] = typer.Option(..., "--profile", help="Target profile (repeatable)."),
    data: Path = typer.Option(..., "--data", help="Reference data for the sketch and smoke tests."),
    target: str | None = typer.Option(None, "--target", help="CSV target column to drop."),
    key: Path = typer.Option(..., "--key", help="Private signing key (PEM)."),
    out: Path = typer.Option(..., "--out", help="Bundle file to write (.efb)."),
    release: int | None = typer.Option(
        None, "--release", min=1, help="Release number (default: UTC YYYYMMDDHHMMSS)."
    ),
    expires_days: float = typer.Option(180, "--expires-days", help="Validity in days."),
    fallback: str | None = typer.Option(None, "--fallback", help="constant:VALUE or previous."),
) -> None:
    """Package a converted model as a signed .efb bundle.

    \b
    Example:
      edgefleet package model.onnx --name iris --version 1.0.0 --profile raspberry-pi-4 \\
        --data train.csv --target label --key keys/edgefleet.key --out iris-1.0.0.efb
    """
    from .data import load_data
    from .keys import load_signing_key
    from .package import check_identity, parse_fallback
    from .package import package as run_package

    profiles = _profiles(profile)
    fb = parse_fallback(fallback)
    check_identity(name, version)
    load_signing_key(key)
    _model_file(model)
    reference = load_data(data, target)
    with _progress() as say:
        manifest = run_package(
            model,
            name=name,
            version=version,
            profiles=profiles,
            reference=reference,
            key_path=key,
            out=out,
            release=release,
            expires_days=expires_days,
            fallback=fb,
            progress=say,
        )
    typer.echo(
        f"wrote {out}: {manifest.name} {manifest.version} release {manifest.release}, "
        f"expires {manifest.expires_at.date()}"
    )


@app.command()
def verify(
    bundle: Path = typer.Argument(..., help="The .efb bundle."),
    trust: list[str] = typer.Option(..., "--trust", help="Trusted public key file (repeatable)."),
    revoked: list[str] | None = typer.Option(
        None, "--revoked", help="Revoked key id (repeatable)."
    ),
    profile: str | None = typer.Option(
        None, "--profile", help="Also check compatibility with a profile."
    ),
) -> None:
    """Verify a bundle as a device would: signature, hashes, validity window, profile.

    \b
    Example:
      edgefleet verify iris-1.0.0.efb --trust keys/edgefleet.pub --profile raspberry-pi-4
    """
    from .verify import verify_file

    prof = _profiles([profile])[0] if profile else None
    result = verify_file(bundle, [Path(t) for t in trust], revoked=revoked or [], profile=prof)
    m = result.manifest
    typer.echo(f"OK {m.name} {m.version} release {m.release} signed by key {result.key_id}")


@app.command()
def inspect(
    bundle: Path = typer.Argument(..., help="The .efb bundle."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    server: str | None = typer.Option(
        None, "--server", help="Fleet server URL: also show the bundle's channel lineage."
    ),
    token: str | None = typer.Option(
        None, "--token", envvar="EDGEFLEET_TOKEN", help="API token for --server (viewer)."
    ),
) -> None:
    """Show a readable summary of a bundle (reading is not verifying: use 'edgefleet verify').

    With --server, also every release channel the bundle was in on that fleet, when and why.

    \b
    Example:
      edgefleet inspect iris-1.0.0.efb
      edgefleet inspect iris-1.0.0.efb --server http://fleet:8700 --token $TOKEN
    """
    from .verify import inspect_file

    info = inspect_file(bundle)
    if server:
        from .fleet_lineage import lineage

        info["fleet"] = lineage(server, token, bundle)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    _inspect_print(info)
    if server:
        _lineage_print(info["fleet"])


def _lineage_print(fleet: dict[str, Any]) -> None:
    from datetime import datetime, timezone

    from rich.table import Table

    console = _console()
    where = ", ".join(fleet.get("current_in") or []) or "no channel"
    archived = " (archived)" if fleet.get("archived") else ""
    console.print(f"on the fleet: current in {where}{archived}")
    t = Table(title="channel lineage")
    for col in ("when (UTC)", "channel", "action", "who", "why"):
        t.add_column(col)
    for h in fleet["lineage"]:
        when = datetime.fromtimestamp(float(h.get("ts") or 0), timezone.utc)
        t.add_row(
            when.strftime("%Y-%m-%d %H:%M:%S"),
            str(h.get("channel")),
            str(h.get("action")),
            str(h.get("actor")),
            str(h.get("reason") or ""),
        )
    console.print(t)


def _inspect_print(info: dict[str, Any]) -> None:
    from rich.table import Table

    m = info["manifest"]
    console = _console()
    console.print(f"[bold]{m['name']} {m['version']}[/bold]  release {m['release']}")
    console.print(f"created {m['created_at']}  expires {m['expires_at']}")
    console.print(f"signature key id {info['signature_key_id']} (not verified here)")
    files = Table(title="files")
    for col in ("path", "size", "sha256"):
        files.add_column(col)
    for f in m["files"]:
        files.add_row(f["path"], f"{f['size']:,}", f["sha256"][:16] + "…")
    console.print(files)
    model = m["model"]
    console.print(
        f"model {model['path']} ({model['format']}, opset {model.get('opset')}, "
        f"ml opset {model.get('ml_opset')}, {len(model.get('operators', []))} operator types)"
    )
    feats = m["input_schema"]["features"]
    names = ", ".join(f["name"] for f in feats[:12]) + (" …" if len(feats) > 12 else "")
    console.print(f"inputs ({len(feats)}): {names}")
    out = m["output_schema"]
    console.print(
        f"outputs: {out['task']}" + (f", classes {out['classes']}" if out.get("classes") else "")
    )
    lin = m["lineage"]
    console.print(
        f"lineage: {lin['source_kind']} {lin['source_name']} sha256 {lin['source_sha256'][:16]}…, "
        f"converter {lin['converter'] or '–'}"
    )
    console.print(f"quantization: {m['quantization']['mode']}")
    targets = Table(title="targets (latency estimated unless stated)")
    for col in ("profile", "budget ms", "p50 ms", "p95 ms", "p99 ms", "fits", "estimated"):
        targets.add_column(col)
    for t in m["targets"]:
        b = t.get("benchmark") or {}
        targets.add_row(
            t["profile"],
            f"{t['latency_budget_ms']:g}",
            *(
                f"{b[k]:.3f}" if b.get(k) is not None else "–"
                for k in ("p50_ms", "p95_ms", "p99_ms")
            ),
            ("yes" if b.get("fits_budget") else "no") if b else "not measured",
            ("yes" if b.get("estimated", True) else "no") if b else "–",
        )
    console.print(targets)
    n_rows = sum(len(s["rows"]) for s in m["smoke_tests"])
    console.print(
        f"smoke tests: {len(m['smoke_tests'])} ({n_rows} rows); fallback: {m['fallback']['kind']}"
    )


@app.command()
def build(
    model: Path = typer.Argument(
        ...,
        help="Source model, any kind 'convert' takes (pickle, native file, .pt, .onnx, .keras).",
    ),
    data: Path = typer.Option(..., "--data", help="Training/validation data (.npz or .csv)."),
    target: str | None = typer.Option(None, "--target", help="CSV target column."),
    name: str = typer.Option(..., "--name", help="Bundle name (lowercase)."),
    version: str = typer.Option(..., "--version", help="Semantic version, e.g. 1.0.0."),
    profile: list[str] = typer.Option(
        ..., "--profile", help="Target profile (repeatable; the first drives the choice)."
    ),
    key: Path = typer.Option(..., "--key", help="Private signing key (PEM)."),
    out: Path = typer.Option(Path("dist"), "--out", help="Output folder (bundle + variants/)."),
    max_accuracy_drop: float = typer.Option(
        0.01, "--max-accuracy-drop", help="Largest accepted drop."
    ),
    release: int | None = typer.Option(None, "--release", min=1, help="Release number."),
    runs: int = typer.Option(100, "--runs", min=10, help="Timing runs per variant."),
) -> None:
    """Convert, optimize and package a model in one step.

    \b
    Example:
      edgefleet keys generate --out keys
      edgefleet build model.joblib --data train.csv --target label --name iris \\
        --version 1.0.0 --profile raspberry-pi-4 --key keys/edgefleet.key --out dist
    """
    from .build import build as run_build
    from .build import check_build_inputs
    from .data import load_data

    profiles = _profiles(profile)
    check_build_inputs(model, name=name, version=version, profiles=profiles, key_path=key)
    dataset = load_data(data, target)
    with _progress() as say:
        result = run_build(
            model,
            dataset,
            name=name,
            version=version,
            profiles=profiles,
            key_path=key,
            out_dir=out,
            max_accuracy_drop=max_accuracy_drop,
            release=release,
            runs=runs,
            progress=say,
        )
    _optimize_table(result.report)
    if result.manifest is None:
        from protocol.errors import OverBudget

        raise OverBudget("no variant meets both the budget and the accuracy goal; nothing packaged")
    m = result.manifest
    typer.echo(
        f"wrote {result.bundle}: {m.name} {m.version} release {m.release} "
        f"({result.report.chosen.name if result.report.chosen else '?'})"
    )
