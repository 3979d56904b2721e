"""Helpers shared by the bench scripts: timing, a plain-text table, the JSON result file.

Every script has ``main(quick: bool = False) -> dict`` that prints its table, writes
``bench/results/<name>.json`` (with a ``headline`` list of ``{metric, value, anchor,
ratio}`` rows that ``python -m bench`` collects) and returns the same dict.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).parent / "results"


def latency_ms(
    fn: Callable[[], Any], *, runs: int, warmup: int = 20, budget_s: float = 10.0
) -> dict[str, float]:
    """p50/p99 (and mean) of ``fn()`` in milliseconds, after ``warmup`` calls.

    Stops early once ``budget_s`` seconds are spent (slow anchors like a 100-tree forest
    in scikit-learn), but always measures at least 20 calls.
    """
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    for i in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
        if i >= 20 and time.perf_counter() - start > budget_s:
            break
    arr = np.asarray(times)
    return {
        "p50_ms": float(np.percentile(arr, 50)),
        "p99_ms": float(np.percentile(arr, 99)),
        "mean_ms": float(arr.mean()),
        "runs": len(arr),
    }


def table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A fixed-width text table (benchmarks print; they do not need rich)."""
    cells = [[str(h) for h in headers]] + [[_fmt(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = "  ".join("-" * w for w in widths)
    out = [title, line]
    for j, r in enumerate(cells):
        out.append(
            "  ".join(
                c.rjust(w) if j and _numeric(c) else c.ljust(w)
                for c, w in zip(r, widths, strict=True)
            )
        )
        if j == 0:
            out.append(line)
    return "\n".join(out)


def _numeric(text: str) -> bool:
    return bool(text) and (text[0].isdigit() or text[0] in "-+.")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        return f"{v:.4f}"
    return str(v)


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "system": platform.system(),
        "loadavg_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def load_line() -> str:
    """The machine's load averages, printed with timing results (a shared machine's load
    moves them more than most code changes do)."""
    if not hasattr(os, "getloadavg"):
        return "load average: n/a"
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.1f} / {five:.1f} / {fifteen:.1f} on {os.cpu_count()} CPUs"


def write_result(name: str, result: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "machine": machine(), **result}
    path.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    return path


def _json_default(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, Path):
        return str(v)
    raise TypeError(type(v).__name__)


def run_cli(main: Callable[..., dict[str, Any]], doc: str | None) -> None:
    ap = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="fewer runs, for a smoke check")
    args = ap.parse_args()
    main(quick=args.quick)
