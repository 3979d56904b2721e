"""Field benchmark: measure an installed model on this device's own hardware.

The server sends a ``benchmark`` command (:class:`protocol.messages.BenchmarkPayload`); the
device runs the active model (or the installed bundle whose sha256 — of the bundle file or
of the model file — the payload names) ``runs`` times, one smoke-test row per call, cycling
through the manifest's smoke-test rows, after a short warm-up. The status ``result`` holds
p50/p95/p99/mean in ms, the load time, peak memory (process high-water mark and the RSS the
model added), the runtime versions, CPU model, flags (``/proc/cpuinfo``) and core count, and
whether p95 fits the latency budget the bundle lists for this device's profile — the numbers
a device profile needs instead of estimates (``estimated: false``).
"""

from __future__ import annotations

import hashlib
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from protocol.errors import BundleError, ReasonCode
from protocol.manifest import Manifest
from protocol.messages import BenchmarkPayload

from .inputs import validate_rows
from .predictor import LoadedModel
from .runtimes import runtime_versions
from .slots import Slots

WARMUP = 5


def cpu_info(path: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    """CPU model, flags and core count (flags from /proc/cpuinfo when present)."""
    model: str = platform.processor() or ""
    flags: list[str] = []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = sorted(set(value.split()))
    return {"model": model, "flags": flags, "cores": os.cpu_count(), "machine": platform.machine()}


def _rss_mb() -> float | None:
    try:
        import psutil

        return float(psutil.Process().memory_info().rss) / 2**20
    except Exception:
        return None


def _peak_mb() -> float | None:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
    except Exception:
        return None


def run_benchmark(
    manifest: Manifest,
    model_bytes: bytes,
    runs: int,
    *,
    threads: int = 1,
    profile: str | None = None,
    device_id: str = "",
) -> dict[str, Any]:
    """Load the model, run ``runs`` single-row predictions, return the measured numbers."""
    if not manifest.smoke_tests:
        raise BundleError(ReasonCode.SMOKE_TEST_FAILED, "bundle has no smoke-test rows to run")
    rows = [[list(r)] for t in manifest.smoke_tests for r in t.rows]
    before = _rss_mb()
    t0 = time.perf_counter()
    model = LoadedModel.open(manifest, model_bytes, threads)
    load_ms = (time.perf_counter() - t0) * 1000.0
    arrays = [validate_rows(r, model.plan) for r in rows]
    for i in range(WARMUP):
        model.infer(arrays[i % len(arrays)])
    times = np.empty(runs, dtype=np.float64)
    for i in range(runs):
        x = arrays[i % len(arrays)]
        t = time.perf_counter()
        model.infer(x)
        times[i] = (time.perf_counter() - t) * 1000.0
    after = _rss_mb()
    p50, p95, p99 = (float(v) for v in np.percentile(times, [50, 95, 99]))
    budget = next((t.latency_budget_ms for t in manifest.targets if t.profile == profile), None)
    return {
        "model": {"name": manifest.name, "version": manifest.version, "release": manifest.release},
        "runs": runs,
        "p50_ms": p50,
        "p95_ms": p95,
        "p99_ms": p99,
        "mean_ms": float(times.mean()),
        "load_ms": load_ms,
        "peak_memory_mb": _peak_mb(),
        "model_rss_mb": (after - before) if after is not None and before is not None else None,
        "threads": threads,
        "runtimes": runtime_versions(),
        "cpu": cpu_info(),
        "profile": profile,
        "latency_budget_ms": budget,
        "fits_budget": None if budget is None else p95 <= budget,
        "estimated": False,
        "measured_on": device_id,
    }


def find_installed(slots: Slots, bundle_sha256: str | None) -> tuple[Manifest, bytes]:
    """The active slot, or the installed one whose bundle or model file has this sha256."""
    candidates = [slots.active_id()] if bundle_sha256 is None else list(reversed(slots.order()))
    for slot in candidates:
        if slot is None:
            continue
        loaded = slots.load(slot)
        if bundle_sha256 is None:
            return loaded.manifest, loaded.model_bytes
        model_sha = hashlib.sha256(loaded.model_bytes).hexdigest()
        bundle_file = slots.root / slot
        bundle_shas = {
            hashlib.sha256(p.read_bytes()).hexdigest() for p in bundle_file.iterdir() if p.is_file()
        }
        if bundle_sha256 == model_sha or bundle_sha256 in bundle_shas:
            return loaded.manifest, loaded.model_bytes
    what = (
        "no model is active"
        if bundle_sha256 is None
        else f"bundle {bundle_sha256[:12]}… is not installed"
    )
    raise BundleError(ReasonCode.COMMAND_INVALID, what)


class FieldBench:
    """The ``benchmark`` callable the command processor uses."""

    def __init__(self, slots: Slots, *, threads: int, profile: str, device_id: str) -> None:
        self.slots = slots
        self.threads = threads
        self.profile = profile
        self.device_id = device_id

    def __call__(self, payload: BenchmarkPayload) -> dict[str, Any]:
        manifest, model_bytes = find_installed(self.slots, payload.bundle_sha256)
        return run_benchmark(
            manifest,
            model_bytes,
            payload.runs,
            threads=self.threads,
            profile=self.profile,
            device_id=self.device_id,
        )
