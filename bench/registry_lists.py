"""Registry lists at fleet size, on both backends: one cursor page and the overview's counts.

This bench builds repositories itself (no ``fleet serve``): it measures the storage layer
under the API — ``devices_page(100)`` and ``device_counts()`` — at 1,000 and 100,000
registered devices, on SQLite and on a real PostgreSQL 15 started for the run (skipped
where PostgreSQL's server binaries are missing). The API half (``GET /v1/devices?limit=``,
``/v1/overview``) sits on these calls.

Anchors in the same run: ``list_devices()`` (every row, what ``GET /v1/devices`` and the
overview read today) and the overview's count computed by listing every device; the
growth from 1,000 to 100,000 devices is printed as a ratio. Target: < 50 ms p50 at 100,000.

Devices are bulk-inserted through the repository's own connection (one statement per
batch) because the bench is about reading; that is not an API.

    python -m bench.registry_lists [--quick]
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from bench._common import latency_ms, run_cli, table, write_result

SIZES = (1_000, 100_000)
TARGET_MS = 50.0


def _rows(n: int) -> list[tuple[Any, ...]]:
    profiles = ("host", "raspberry-pi-4", "jetson-orin-nano", "gateway")
    return [
        (
            f"dev-{i:07d}",
            profiles[i % 4],
            "[]",
            int(i % 3 != 0),
            1_700_000_000.0 + i,
            "iris",
            f"{1 + i % 5}.0.0",
            1 + i % 5,
            "[]",
        )
        for i in range(n)
    ]


_COLS = "device_id, profile, tags, online, last_seen, model, version, release, manual_tags"


def _fill_sqlite(repo: Any, n: int) -> None:
    with repo.db.conn:
        repo.db.conn.executemany(
            f"insert into devices ({_COLS}) values ({', '.join('?' * 9)})", _rows(n)
        )


def _fill_pg(repo: Any, n: int) -> None:
    with repo.pool.connection() as conn, conn.cursor() as cur:
        with cur.copy(f"copy devices ({_COLS}) from stdin") as copy:
            for row in _rows(n):
                copy.write_row(row)
        cur.execute("analyze devices")


def _vacuum_pg(repo: Any) -> None:
    """What autovacuum does soon after a bulk load: sets the visibility map, so index-only
    scans work. Device rows change rarely (birth/LWT state), so that is the steady state;
    the bench reports the count before it too (the counts are a kept table since
    migration 8, so the two should agree)."""
    with repo.pool.connection() as conn:
        conn.autocommit = True
        conn.execute("vacuum analyze devices")


def _count_by_listing(repo: Any) -> dict[str, Any]:
    devices = repo.list_devices()
    return {
        "devices": len(devices),
        "profile": Counter(d["profile"] for d in devices),
        "online": sum(1 for d in devices if d["online"]),
    }


def _measure(repo: Any, runs: int) -> dict[str, dict[str, float]]:
    page = repo.devices_page(100)
    assert len(page.items) == 100 and page.next_cursor is not None
    mid = repo.devices_page(100, page.next_cursor)  # a page from the middle, by cursor
    cursor = mid.next_cursor
    return {
        "page": latency_ms(lambda: repo.devices_page(100), runs=runs, warmup=5),
        "page_by_cursor": latency_ms(lambda: repo.devices_page(100, cursor), runs=runs, warmup=5),
        "counts": latency_ms(repo.device_counts, runs=runs, warmup=3),
        "list_all": latency_ms(repo.list_devices, runs=max(5, runs // 10), warmup=1, budget_s=20),
        "count_by_listing": latency_ms(
            lambda: _count_by_listing(repo), runs=max(5, runs // 10), warmup=1, budget_s=20
        ),
    }


def main(quick: bool = False) -> dict[str, Any]:
    from fleet_server.repository import SQLiteRepository
    from tests.support.postgres import PostgresServer, why_unavailable

    sizes = (1_000, 20_000) if quick else SIZES
    runs = 30 if quick else 200
    results: dict[str, dict[int, dict[str, dict[str, float]]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        results["sqlite"] = {}
        for n in sizes:
            repo = SQLiteRepository(Path(tmp) / f"r{n}.db")
            _fill_sqlite(repo, n)
            results["sqlite"][n] = _measure(repo, runs)
            repo.close()
    skipped = why_unavailable()
    if skipped is None:
        from fleet_server.repository_pg import PostgresRepository

        results["postgres"] = {}
        with PostgresServer() as server:
            for n in sizes:
                repo = PostgresRepository(server.create_database(), pool_size=2)
                _fill_pg(repo, n)
                fresh = latency_ms(repo.device_counts, runs=max(10, runs // 10), warmup=3)
                _vacuum_pg(repo)
                results["postgres"][n] = {**_measure(repo, runs), "counts_before_vacuum": fresh}
                repo.close()

    small, big = sizes
    rows, headline = [], []
    calls = ("page", "page_by_cursor", "counts", "counts_before_vacuum", "list_all")
    for backend, by_n in results.items():
        for what in (*calls, "count_by_listing"):
            if what not in by_n[small]:
                continue
            a, b = by_n[small][what]["p50_ms"], by_n[big][what]["p50_ms"]
            rows.append([backend, what, a, b, b / a if a else 0.0])
        for what, anchor in (("page", "list_all"), ("counts", "count_by_listing")):
            value = by_n[big][what]["p50_ms"]
            ref = by_n[big][anchor]["p50_ms"]
            headline.append(
                {
                    "metric": f"{backend} {what} p50 at {big:,} devices (ms, target < {TARGET_MS})",
                    "value": round(value, 2),
                    "anchor": f"{anchor} {ref:.1f} ms",
                    "ratio": round(ref / value, 1) if value else None,
                }
            )
    print(
        table(
            f"registry lists: p50 ms at {small:,} and {big:,} devices",
            ["backend", "call", f"{small:,}", f"{big:,}", "growth ×"],
            rows,
        )
    )
    if skipped:
        print(f"postgres: skipped ({skipped})")
    result = {"sizes": list(sizes), "results": results, "headline": headline, "skipped": skipped}
    write_result("registry_lists", result)
    return result


if __name__ == "__main__":
    run_cli(main, __doc__)
