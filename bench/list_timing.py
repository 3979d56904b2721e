"""Fleet lists at fleet size: ``GET /v1/devices?limit=100`` and ``GET /v1/overview`` with
1,000 and with 100,000 registered devices, on both registry backends.

The server is the shipped one, set up as a user sets it up: ``edgefleet fleet init`` writes
``fleet.toml`` (this script sets its data folder, ports and, for PostgreSQL,
``registry.url``), ``edgefleet fleet token create --role viewer`` makes the token, and
``edgefleet fleet serve --embedded-broker`` runs as its own process. PostgreSQL is a real
PostgreSQL 15 started for the run as the ``postgres`` user on a loopback port
(``tests/support/postgres.py``); its row is skipped, with the reason, where the server
binaries are missing.

The devices are seeded into the registry before the server starts, not registered by
signed births: one birth costs the server an Ed25519 check and a registry write
(bench/fleet_api_latency.py registers 1,000 that way), so 100,000 would take most of an
hour and time the ingest path, not the lists. The seed opens the registry the config names
with ``open_repository`` (so the schema is the server's own, migrations included) and
bulk-inserts the rows a birth writes (id, profile, online, model, version, tags, last
seen within the last minute) through that repository's connection (``executemany`` on
SQLite, ``COPY`` on PostgreSQL, then ``VACUUM ANALYZE`` as autovacuum would soon do). The
server's first passes over every device after it starts (health rules, local drift) are
waited out before timing; how long they took is printed.

Timed with httpx, sequential requests on one keep-alive connection: the first page, a page
from the middle of the list by cursor, and the overview (its device counts are the few
rows of a count table that registry triggers keep, not a device listing). Anchor: the
same call at 1,000 devices in the same run; the growth to 100,000 is printed as a ratio.
Target: < 50 ms p50 at 100,000 on both backends.

    python -m bench.list_timing [--quick]      (also: python -m bench.fleet_scale --lists)
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from bench import registry_lists
from bench._common import load_line, run_cli, table, write_result

SIZES = (1_000, 100_000)
TARGET_MS = 50.0
PAGE = 100
CALLS = (
    "GET /v1/devices?limit=100",
    "GET /v1/devices?limit=100&cursor=(middle)",
    "GET /v1/overview",
)


def _rows(n: int) -> list[tuple[Any, ...]]:
    """Rows as births leave them (bench/registry_lists.py's), heard from in the last minute:
    a fleet whose devices were all silent for years would be one offline-alert storm."""
    now = time.time()
    return [(*row[:4], now - i % 60, *row[5:]) for i, row in enumerate(registry_lists._rows(n))]


def _seed(config: Path, n: int) -> None:
    """``n`` devices into the registry ``config`` names, before the server starts."""
    from fleet_server.config import load_config
    from fleet_server.repository import SQLiteRepository, open_repository

    repo: Any = open_repository(load_config(config))
    cols = registry_lists._COLS
    try:
        if isinstance(repo, SQLiteRepository):
            with repo.db.conn:
                marks = ", ".join("?" * len(cols.split(",")))
                repo.db.conn.executemany(f"insert into devices ({cols}) values ({marks})", _rows(n))
        else:
            # one transaction per 2,000 rows: the count triggers update a few counter rows,
            # and one transaction's chain of versions of a row grows with every update
            copy_sql = f"copy devices ({cols}) from stdin"
            rows = _rows(n)
            for at in range(0, n, 2_000):
                with repo.pool.connection() as conn, conn.cursor() as c, c.copy(copy_sql) as copy:
                    for row in rows[at : at + 2_000]:
                        copy.write_row(row)
            registry_lists._vacuum_pg(repo)  # as autovacuum soon would: index-only counts
    finally:
        repo.close()


def _settle(server: Any, quiet: float = 0.15, timeout: float = 300.0) -> float:
    """Wait until the server's CPU use over 2 s drops below ``quiet`` of a core: its first
    passes over every device (health rules, local drift) run once at start. Returns the
    seconds waited."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        c0 = server.cpu_s()
        time.sleep(2.0)
        if (server.cpu_s() - c0) / 2.0 < quiet:
            break
    return time.monotonic() - start


def _one(work: Path, n: int, registry_url: str | None, runs: int) -> dict[str, Any]:
    import httpx

    from bench._http import percentiles, sample
    from bench._servers import Server
    from tests.support.brokers import free_port
    from tests.support.shipped import edgefleet, init_config

    api_port, broker_port = free_port(), free_port()
    keys: dict[str, Any] = {
        "data_dir": "fleet-data",
        "broker.url": f"mqtt://127.0.0.1:{broker_port}",
        "api.port": api_port,
    }
    if registry_url:
        keys["registry.url"] = registry_url
    config = init_config("fleet", work / "fleet.toml", keys)
    t0 = time.perf_counter()
    _seed(config, n)
    seed_s = time.perf_counter() - t0
    token = (
        edgefleet(
            "fleet",
            "token",
            "create",
            "--role",
            "viewer",
            "--name",
            "bench",
            "--config",
            str(config),
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    auth = {"authorization": f"Bearer {token}"}
    fleet = Server.edgefleet(
        "fleet serve",
        ["fleet", "serve", "--config", str(config), "--embedded-broker"],
        "/v1/health",
        api_port,
        work / "fleet.log",
    )
    try:
        settle_s = _settle(fleet)
        base = fleet.url
        with httpx.Client(base_url=base, headers=auth, timeout=60) as http:
            counted = http.get("/v1/overview").json()["devices"]
            if counted != n:
                raise RuntimeError(f"the overview counts {counted} devices, {n} were seeded")
            first = http.get("/v1/devices", params={"limit": PAGE}).json()
            assert len(first["items"]) == PAGE and first["next_cursor"]
            # a cursor from the middle of the list: the last device id before the half
            middle = http.get(
                "/v1/devices", params={"limit": PAGE, "cursor": _cursor_at(n // 2)}
            ).json()
            assert len(middle["items"]) == PAGE
            page_bytes = len(http.get("/v1/devices", params={"limit": PAGE}).content)
        urls = {
            CALLS[0]: f"{base}/v1/devices?limit={PAGE}",
            CALLS[1]: f"{base}/v1/devices?limit={PAGE}&cursor={_cursor_at(n // 2)}",
            CALLS[2]: f"{base}/v1/overview",
        }
        lat = {}
        for name, url in urls.items():
            sample("httpx", url, None, 10, auth)  # warm-up
            lat[name] = percentiles(sample("httpx", url, None, runs, auth))
        return {
            "devices": n,
            "seed_s": seed_s,
            "settle_s": settle_s,
            "page_bytes": page_bytes,
            "latency": lat,
            "server_rss_mb": fleet.rss_mb(),
        }
    finally:
        fleet.stop()


def _cursor_at(i: int) -> str:
    """The cursor that starts a page after seeded device ``i`` (ids as registry_lists
    writes them); the server checks it like any client's."""
    from fleet_server.pagination import DEVICES

    return DEVICES.encode({"device_id": f"dev-{i:07d}"})


def main(quick: bool = False) -> dict[str, Any]:
    from tests.support.postgres import PostgresServer, why_unavailable

    sizes = (1_000, 20_000) if quick else SIZES
    runs = 40 if quick else 200
    results: dict[str, Any] = {"sizes": list(sizes), "quick": quick, "load_at_start": load_line()}
    by: dict[str, dict[int, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        by["sqlite"] = {}
        for n in sizes:
            work = Path(tmp) / f"sqlite-{n}"
            work.mkdir()
            by["sqlite"][n] = _one(work, n, None, runs)
        skipped = why_unavailable()
        if skipped is None:
            by["postgres"] = {}
            with PostgresServer() as server:
                for n in sizes:
                    work = Path(tmp) / f"pg-{n}"
                    work.mkdir()
                    by["postgres"][n] = _one(work, n, server.create_database(), runs)
    results["results"] = by
    results["skipped"] = skipped
    small, big = sizes
    rows, headline = [], []
    for backend, per in by.items():
        for call in CALLS:
            a, b = per[small]["latency"][call], per[big]["latency"][call]
            rows.append(
                [
                    backend,
                    call,
                    a["p50_ms"],
                    b["p50_ms"],
                    b["p99_ms"],
                    b["p50_ms"] / a["p50_ms"],
                    "yes" if b["p50_ms"] < TARGET_MS else "NO",
                ]
            )
            if "cursor" in call:
                continue
            headline.append(
                {
                    "metric": f"`fleet serve` {call} p50 at {big:,} devices, {backend}, httpx",
                    "value": f"{b['p50_ms']:.2f} ms",
                    "anchor": f"{a['p50_ms']:.2f} ms at {small:,} devices "
                    f"(target < {TARGET_MS:.0f} ms)",
                    "ratio": b["p50_ms"] / a["p50_ms"],
                }
            )
    print(
        table(
            f"fleet lists: `edgefleet fleet serve`, httpx p50/p99 ms at {small:,} and {big:,} "
            f"registered devices",
            ["backend", "call", f"p50 {small:,}", f"p50 {big:,}", f"p99 {big:,}", "growth ×",
             f"< {TARGET_MS:.0f} ms"],
            rows,
        )
    )  # fmt: skip
    for backend, per in by.items():
        print(
            f"  {backend}: seeding {big:,} devices took {per[big]['seed_s']:.1f} s, the server's "
            f"first passes over them {per[big]['settle_s']:.0f} s; one page of "
            f"{PAGE} is {per[big]['page_bytes'] / 1024:.1f} KiB; server RSS "
            f"{per[small]['server_rss_mb']:.0f} → {per[big]['server_rss_mb']:.0f} MB"
        )
    if skipped:
        print(f"postgres: skipped ({skipped})")
    results["headline"] = headline
    results["load_at_end"] = load_line()
    print(f"{results['load_at_start']}; at the end: {results['load_at_end']}")
    write_result("list_timing", results)
    return results


if __name__ == "__main__":
    run_cli(main, __doc__)
