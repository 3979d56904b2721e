"""Run every benchmark, write ``bench/results/*.json`` and ``bench/results/summary.md``.

    python -m bench            # full run (the numbers in README.md)
    python -m bench --quick    # smaller sizes, for a smoke check
    python -m bench --only agent_latency sketch_accuracy

Each benchmark runs in its own process (a server or a thousand MQTT clients must not skew
the next one) and prints its own table; this runner collects each one's ``headline``
rows — metric, value, anchor, ratio — into one markdown table with the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

BENCHES = [
    "convert_speedup",
    "quantize",
    "sketch_accuracy",
    "agent_latency",
    "fleet_api_latency",
    "fleet_scale",
]
RESULTS = Path(__file__).parent / "results"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()}"


def headline_rows(name: str, result: dict) -> list[list[str]]:
    rows = []
    for h in result.get("headline", []):
        ratio = h.get("ratio")
        rows.append(
            [
                name,
                str(h.get("metric", "")),
                str(h.get("value", "")),
                str(h.get("anchor", "")),
                f"{ratio:.2f}×" if isinstance(ratio, (int, float)) else str(ratio or ""),
            ]
        )
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="smaller sizes for a smoke run")
    ap.add_argument("--only", nargs="*", choices=BENCHES, help="run only these benchmarks")
    args = ap.parse_args()
    RESULTS.mkdir(exist_ok=True)
    todo = args.only or BENCHES
    failures = []
    started = time.time()
    for name in todo:
        print(f"\n=== bench/{name}.py {'(quick)' if args.quick else ''}", flush=True)
        cmd = [sys.executable, "-m", f"bench.{name}"] + (["--quick"] if args.quick else [])
        rc = subprocess.call(cmd, cwd=Path(__file__).parent.parent)
        if rc != 0:
            failures.append(name)
            print(f"!!! bench/{name}.py exited with {rc}", flush=True)
    table = [["benchmark", "metric", "value", "anchor", "ratio"]]
    for name in BENCHES:
        path = RESULTS / f"{name}.json"
        if path.exists():
            table += headline_rows(name, json.loads(path.read_text()))
    lines = [
        f"Machine: {machine()}; run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}"
        f"{' (quick)' if args.quick else ''}; reproduce with `python -m bench`.",
        "",
        "| " + " | ".join(table[0]) + " |",
        "|" + "---|" * len(table[0]),
        *("| " + " | ".join(r) + " |" for r in table[1:]),
    ]
    (RESULTS / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))
    if failures:
        print(f"\nfailed: {', '.join(failures)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
