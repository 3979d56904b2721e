"""Benchmark a converted model for a device profile: compatibility, memory, latency.

Order: read the model's facts and check operators/opsets/size against the profile
(:mod:`toolchain.compat`); load it with the profile's ``inference_threads`` while watching
the process RSS (psutil); warm up; time single-row predictions and batch predictions on
this host; scale every latency by the profile's speed factor to an **estimate** of the
device latency: the factor measured on devices (the profile's ``[measured]`` table, written
by ``edgefleet profiles calibrate --from-fleet``) when there is one, else the estimate. The
result's ``measured_on`` says which (``x86_64 host × 4.2 (measured on 7 devices (DATE))``), so
the fleet server can recover the host timing from a bundle.

Verdict: the model fits when it is compatible, its size and peak RSS delta stay within
``memory_budget_mb``, and the *estimated p95* single-row latency is within
``latency_budget_ms`` (p95 rather than p50 so that a budget means "almost every request",
without letting one scheduler hiccup in p99 decide it on a shared 2-core host).

Latencies include building the input tensors from rows, as the agent does when it serves.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from protocol.manifest import BenchmarkResult
from protocol.profiles import DeviceProfile
from protocol.schema import InputSchema

from .compat import CompatReport, check_compat, read_facts
from .errors import DataError

Progress = Callable[[str], None]

DEFAULT_RUNS = 200
DEFAULT_BATCH = 64
WARMUP = 10


@dataclass
class HostTiming:
    p50_ms: float
    p95_ms: float
    p99_ms: float
    batch_size: int
    batch_p50_ms: float
    batch_p95_ms: float
    batch_p99_ms: float
    throughput_rps: float
    load_ms: float
    peak_memory_mb: float
    runs: int


@dataclass
class BenchReport:
    model: Path
    profile: DeviceProfile
    compat: CompatReport
    host: HostTiming | None
    result: BenchmarkResult
    reasons: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.result.fits_budget

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data (``edgefleet bench --json`` prints this)."""
        from dataclasses import asdict

        return {
            "model": str(self.model),
            "profile": self.profile.name,
            "compatible": self.compat.ok,
            "runtime": self.compat.runtime,
            "opset": self.compat.facts.opset,
            "ml_opset": self.compat.facts.ml_opset,
            "operators": self.compat.facts.operators,
            "host": None if self.host is None else asdict(self.host),
            "estimate": self.result.model_dump(mode="json"),
            "speed_factor": self.profile.effective_speed_factor(),
            "speed_basis": self.profile.speed_basis(),
            "speed_factor_estimate": self.profile.speed_factor,
            "latency_budget_ms": self.profile.latency_budget_ms,
            "fits_budget": self.fits,
            "reasons": self.reasons,
        }


def synthesize_rows(schema: InputSchema, n: int, seed: int = 0) -> np.ndarray:
    """Rows drawn from the schema: uniform in [min, max] (default [0, 1]), known categories."""
    rng = np.random.default_rng(seed)
    cols: list[np.ndarray] = []
    for f in schema.features:
        if f.kind == "categorical" or f.dtype == "string":
            cats = f.categories or ["a", "b"]
            cols.append(rng.choice(np.array(cats, dtype=object), size=n))
        else:
            lo = 0.0 if f.min is None else f.min
            hi = lo + 1.0 if f.max is None else f.max
            vals = rng.uniform(lo, hi, size=n)
            if f.dtype.startswith(("int", "uint")):
                vals = np.round(vals)
            cols.append(vals.astype(object))
    return np.stack(cols, axis=1) if cols else np.empty((n, 0), dtype=object)


def _rows_array(rows: Any) -> np.ndarray:
    arr = np.asarray(rows)
    if arr.dtype.kind in "fiub":
        return arr.astype(np.float64)
    return np.asarray(rows, dtype=object)


def _percentiles(samples: list[float]) -> tuple[float, float, float]:
    a = np.asarray(samples)
    p50, p95, p99 = np.percentile(a, [50, 95, 99])
    return float(p50), float(p95), float(p99)


def _rss_mb() -> float:
    import psutil

    return float(psutil.Process().memory_info().rss) / 2**20


class _PeakRSS:
    """Sample this process's RSS in a thread while the block runs (load, warm-up, a batch).

    The timed loops themselves are not sampled, so the sampler cannot disturb them; RSS is
    read again after each loop instead.
    """

    def __init__(self, interval_s: float = 0.002) -> None:
        import threading

        self.interval_s = interval_s
        self.peak = _rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edgefleet-rss", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, _rss_mb())

    def __enter__(self) -> _PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())


def _import_runtime(path: Path) -> None:
    try:
        if path.suffix.lower() == ".onnx":
            import onnxruntime  # noqa: F401
        else:
            import ai_edge_litert.interpreter  # noqa: F401
    except ImportError:
        pass  # the runner raises the readable error


def time_model(
    path: Path,
    input_schema: Any,
    output_schema: Any,
    rows: np.ndarray,
    *,
    threads: int,
    runs: int = DEFAULT_RUNS,
    batch: int = DEFAULT_BATCH,
    progress: Progress | None = None,
) -> HostTiming:
    """Load the model and time it on this host (no scaling)."""
    from .runner import ModelRunner

    say = progress or (lambda _msg: None)
    _import_runtime(Path(path))  # so the RSS delta is the model's, not the library's
    base = _rss_mb()
    n = len(rows)
    size = min(batch, n)
    block = rows[:size]
    with _PeakRSS() as sampler:
        t0 = time.perf_counter()
        runner = ModelRunner.open(path, input_schema, output_schema, threads=threads)
        load_ms = (time.perf_counter() - t0) * 1e3
        say(f"warm-up ({WARMUP} runs)")
        for i in range(WARMUP):
            runner.predict(rows[i % n : i % n + 1])
        runner.predict(block)
    peak = sampler.peak
    say(f"single-row timing ({runs} runs)")
    single: list[float] = []
    for i in range(runs):
        row = rows[i % n : i % n + 1]
        t = time.perf_counter()
        runner.predict(row)
        single.append((time.perf_counter() - t) * 1e3)
    peak = max(peak, _rss_mb())
    reps = max(runs // 10, 10)
    say(f"batch timing ({reps} runs of {size} rows)")
    batched: list[float] = []
    for _ in range(reps):
        t = time.perf_counter()
        runner.predict(block)
        batched.append((time.perf_counter() - t) * 1e3)
    peak = max(peak, _rss_mb())
    p50, p95, p99 = _percentiles(single)
    b50, b95, b99 = _percentiles(batched)
    return HostTiming(
        p50_ms=p50,
        p95_ms=p95,
        p99_ms=p99,
        batch_size=size,
        batch_p50_ms=b50,
        batch_p95_ms=b95,
        batch_p99_ms=b99,
        throughput_rps=size / (b50 / 1e3) if b50 > 0 else float("inf"),
        load_ms=load_ms,
        peak_memory_mb=max(peak - base, 0.0),
        runs=runs,
    )


def benchmark(
    model_path: Path,
    profile: DeviceProfile,
    *,
    rows: Any = None,
    data: Any = None,
    runs: int = DEFAULT_RUNS,
    batch: int = DEFAULT_BATCH,
    progress: Progress | None = None,
) -> BenchReport:
    """Check compatibility, time the model on this host and estimate it on ``profile``.

    ``rows`` are input rows in schema order; ``data`` (a :class:`toolchain.data.Dataset`)
    gives rows too and helps infer the schema of a bare model file. Without either, rows
    are synthesized from the model's input schema.
    """
    from .sidecar import describe

    model_path = Path(model_path)
    say = progress or (lambda _msg: None)
    say(f"checking {model_path.name} against {profile.name}")
    facts = read_facts(model_path)
    compat = check_compat(model_path, profile, facts)
    reasons = list(compat.problems)
    sidecar = describe(model_path, data)
    if rows is None and data is not None:
        rows = data.X
    if rows is None:
        arr = synthesize_rows(sidecar.input_schema, max(batch, 64))
    else:
        arr = _rows_array(rows)
        if arr.ndim != 2 or len(arr) == 0:
            raise DataError("benchmark data must be a non-empty 2-D table of rows")
        if arr.shape[1] != sidecar.input_schema.n_features:
            raise DataError(
                f"data has {arr.shape[1]} features, "
                f"the model expects {sidecar.input_schema.n_features}"
            )
    host: HostTiming | None = None
    if compat.runtime is not None:
        host = time_model(
            model_path,
            sidecar.input_schema,
            sidecar.output_schema,
            arr,
            threads=profile.inference_threads,
            runs=runs,
            batch=batch,
            progress=progress,
        )
    result = estimate(host, profile, facts.size_bytes, reasons)
    return BenchReport(model_path, profile, compat, host, result, reasons)


def estimate(
    host: HostTiming | None, profile: DeviceProfile, size_bytes: int, reasons: list[str]
) -> BenchmarkResult:
    """Scale host timings by the profile's speed factor and decide the verdict.

    Appends the reasons for a negative verdict to ``reasons``.
    """
    if host is None:
        return BenchmarkResult(
            p50_ms=0.0,
            p95_ms=0.0,
            p99_ms=0.0,
            size_bytes=size_bytes,
            estimated=True,
            fits_budget=False,
            measured_on=_host_name(profile),
        )
    k = profile.effective_speed_factor()
    if host.peak_memory_mb > profile.memory_budget_mb:
        reasons.append(
            f"peak memory {host.peak_memory_mb:.1f} MiB exceeds "
            f"the budget of {profile.memory_budget_mb:g} MiB"
        )
    est_p95 = host.p95_ms * k
    if est_p95 > profile.latency_budget_ms:
        reasons.append(
            f"estimated p95 {est_p95:.2f} ms exceeds "
            f"the latency budget of {profile.latency_budget_ms:g} ms"
        )
    return BenchmarkResult(
        p50_ms=host.p50_ms * k,
        p95_ms=est_p95,
        p99_ms=host.p99_ms * k,
        batch_p50_ms=host.batch_p50_ms * k,
        throughput_rps=host.throughput_rps / k,
        load_ms=host.load_ms * k,
        peak_memory_mb=round(host.peak_memory_mb, 3),
        size_bytes=size_bytes,
        estimated=True,
        fits_budget=not reasons,
        measured_on=_host_name(profile),
    )


def _host_name(profile: DeviceProfile) -> str:
    k = profile.effective_speed_factor()
    return f"{platform.machine()} host × {k:g} ({profile.speed_basis()})"


def benchmark_result(model_path: Path, profile: DeviceProfile, **kwargs: Any) -> BenchmarkResult:
    """Just the manifest's view of :func:`benchmark`: estimated device numbers and verdict."""
    return benchmark(model_path, profile, **kwargs).result
