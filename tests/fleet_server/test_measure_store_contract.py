"""One contract for the measures' stores on both registry backends (SQLite and a real
PostgreSQL 15), as ``test_repository_contract.py`` holds the registry to one.

"Two processes" here are two stores on the same registry through separate connections
(two SQLite connections to one file, or two PostgreSQL pools), which is what two
``fleet serve`` processes have. The PostgreSQL parameter shows as skipped, with the reason,
where PostgreSQL's server binaries are missing.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fleet_server import migrations
from fleet_server.cohort_drift import CohortDrift
from fleet_server.drift import DriftConfig
from fleet_server.field_accuracy import FieldAccuracy
from fleet_server.measure_store import (
    MeasureStores,
    SQLiteBenchStore,
    SQLiteCohortStore,
    SQLiteFeedbackStore,
    WindowKey,
)
from fleet_server.repository import SQLiteRepository, connect
from protocol.messages import LatencySummary, MetricsReport, ModelRef, SketchReport
from protocol.sketches import SketchBuilder, SketchSet

Opener = Callable[[], MeasureStores]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def open_stores(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """Opens the stores on one fresh registry, once per simulated server process."""
    closers: list[Callable[[], None]] = []
    if request.param == "postgres":
        from fleet_server.measure_store_pg import PgBenchStore, PgCohortStore, PgFeedbackStore
        from fleet_server.repository_pg import PostgresRepository

        url = request.getfixturevalue("postgres_url")

        def make() -> MeasureStores:
            repo = PostgresRepository(url, pool_size=3)
            closers.append(repo.close)
            p = repo.pool
            return MeasureStores(PgBenchStore(p), PgFeedbackStore(p), PgCohortStore(p), repo.close)

    else:
        path = tmp_path / "fleet.db"
        SQLiteRepository(path).close()  # the registry migrates the file, as fleet serve does

        def make() -> MeasureStores:
            db = connect(path)
            closers.append(db.conn.close)
            lock = threading.RLock()
            return MeasureStores(
                SQLiteBenchStore(db, lock),
                SQLiteFeedbackStore(db, lock),
                SQLiteCohortStore(db, lock),
                db.conn.close,
            )

    yield make
    for close in closers:
        close()


def _sample(device: str, profile: str, ts: float, p50: float = 4.0) -> dict[str, Any]:
    return {
        "device_id": device,
        "profile": profile,
        "model": "iris",
        "version": "1.0.0",
        "bundle_sha256": "a" * 64,
        "variant": "fp32",
        "p50_ms": p50,
        "p95_ms": p50 * 1.5,
        "host_p50_ms": 1.0,
        "host_basis": "manifest host target",
        "ratio": p50,
        "runs": 200,
        "ts": ts,
    }


# field benchmarks --------------------------------------------------------------------------
def test_bench_commands_are_found_only_for_the_device_they_were_sent_to(
    open_stores: Opener,
) -> None:
    s = open_stores().bench
    assert s.issued("fb1-d1", "d1") is None
    s.issue("fb1-d1", "d1", "a" * 64, 10.0)
    got = s.issued("fb1-d1", "d1")
    assert got is not None and got["bundle_sha256"] == "a" * 64 and got["issued_at"] == 10.0
    assert s.issued("fb1-d1", "d2") is None


def test_a_bench_answer_delivered_to_two_processes_is_kept_once(open_stores: Opener) -> None:
    one, two = open_stores().bench, open_stores().bench
    assert one.add("fb1-d1", _sample("d1", "raspberry-pi-4", 20.0, p50=4.0))
    assert not two.add("fb1-d1", _sample("d1", "raspberry-pi-4", 21.0, p50=9.0))
    assert two.add("fb1-d2", _sample("d2", "jetson-orin-nano", 15.0))
    rows = one.samples()
    assert [(r["command_id"], r["ts"]) for r in rows] == [("fb1-d2", 15.0), ("fb1-d1", 20.0)]
    assert rows[1]["p50_ms"] == 4.0 and isinstance(rows[1]["runs"], int)
    assert [r["device_id"] for r in two.samples("raspberry-pi-4")] == ["d1"]
    assert one.samples("no-such-profile") == []


# field feedback ----------------------------------------------------------------------------
def _metrics(device: str, version: str, seq: int, acc: float, n: int = 40) -> MetricsReport:
    end = datetime.fromtimestamp(1_800_000_000 + seq, timezone.utc)
    return MetricsReport(
        device_id=device,
        seq=seq,
        window_start=end,
        window_end=end,
        model=ModelRef(name="m", version=version, release=1),
        requests=n,
        feedback_count=n,
        accuracy=acc,
        latency=LatencySummary(count=n, p95_ms=1.0),
    )


def test_feedback_windows_count_once_whichever_process_got_them(open_stores: Opener) -> None:
    a, b = FieldAccuracy(open_stores().feedback), FieldAccuracy(open_stores().feedback)
    a.ingest(_metrics("d1", "1.0", 1, 0.9))
    b.ingest(_metrics("d2", "1.0", 2, 0.8))
    b.ingest(_metrics("d1", "1.0", 1, 0.9))  # the same report, delivered to the other one
    a.ingest(_metrics("d1", "2.0", 3, 0.5))
    for fa in (a, b):
        (v1,) = fa.report("m", "1.0")
        assert v1["labelled"] == 80 and v1["devices"] == 2
        assert v1["value"] == pytest.approx(0.85)
        assert fa.previous_version("m", "2.0") == "1.0"
    rows = open_stores().feedback.rows("m", None, "d1")
    assert [(r["version"], r["seq"], r["n"]) for r in rows] == [("1.0", 1, 40), ("2.0", 3, 40)]
    assert open_stores().feedback.rows(None, None, None)[0]["kind"] == "accuracy"


# per-device drift windows and scope results ------------------------------------------------
@dataclass(frozen=True)
class _Count:
    rows: int


def _add(key: WindowKey, row: dict[str, Any] | None, delta: _Count) -> dict[str, Any] | None:
    """A merge with no sketches: rows add up, revision counts merges."""
    if delta.rows < 0:
        return None  # "leave the stored window as it is"
    device, model, version, window = key
    return {
        "device": device,
        "model": model,
        "version": version,
        "window": window,
        "rows": (row["rows"] if row else 0) + delta.rows,
        "revision": (row["revision"] if row else 0) + 1,
        "sketch": "{}",
    }


def test_window_merges_from_two_processes_add_up(open_stores: Opener) -> None:
    one, two = open_stores().cohorts, open_stores().cohorts
    k1: WindowKey = ("d1", "m", "1.0", 3600.0)
    k2: WindowKey = ("d2", "m", "1.0", 3600.0)
    one.merge_windows({k1: _Count(10), k2: _Count(5)}, _add)
    two.merge_windows({k1: _Count(7)}, _add)
    two.merge_windows({k1: _Count(-1)}, _add)  # a merge that keeps the stored row
    rows = {r["device"]: r for r in one.windows("m", "1.0", 3600.0)}
    assert (rows["d1"]["rows"], rows["d1"]["revision"]) == (17, 2)
    assert rows["d2"]["rows"] == 5 and isinstance(rows["d2"]["window"], float)
    assert one.windows("m", "2.0", 3600.0) == []


def test_concurrent_merges_into_one_window_lose_nothing(open_stores: Opener) -> None:
    stores = [open_stores().cohorts for _ in range(2)]
    key: WindowKey = ("d1", "m", "1.0", 0.0)
    errors: list[BaseException] = []

    def work(store: Any) -> None:
        try:
            for _ in range(25):
                store.merge_windows({key: _Count(1)}, _add)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    (row,) = stores[0].windows("m", "1.0", 0.0)
    assert (row["rows"], row["revision"]) == (50, 50)


def test_latest_window_and_pruning(open_stores: Opener) -> None:
    s = open_stores().cohorts
    s.merge_windows({("d1", "m", "1.0", w): _Count(1) for w in (0.0, 3600.0, 7200.0)}, _add)
    assert s.latest_window("m", "1.0", 5000.0) == 3600.0
    assert s.latest_window("m", "1.0", -1.0) is None
    assert s.latest_window("m", "9.9", 1e12) is None
    s.prune_windows("m", "1.0", 3600.0)
    assert s.windows("m", "1.0", 0.0) == [] and len(s.windows("m", "1.0", 3600.0)) == 1


def test_a_windows_alert_is_claimed_once_by_any_process(open_stores: Opener) -> None:
    one, two = open_stores().cohorts, open_stores().cohorts
    assert one.claim_alert("m", "1.0", 0.0)
    assert not two.claim_alert("m", "1.0", 0.0) and not one.claim_alert("m", "1.0", 0.0)
    assert two.claim_alert("m", "1.0", 3600.0) and two.claim_alert("m", "2.0", 0.0)
    one.prune_windows("m", "1.0", 3600.0)  # forgotten with the windows it was about
    assert two.claim_alert("m", "1.0", 0.0)


def test_scope_results_keep_the_newest_per_scope_and_filter(open_stores: Opener) -> None:
    s = open_stores().cohorts

    def result(scope: str, subject: str, at: float) -> dict[str, Any]:
        return {
            "model": "m",
            "version": "1.0",
            "scope": scope,
            "subject": subject,
            "window": 0.0,
            "evaluated_at": at,
            "result": f'{{"at": {at}}}',
        }

    s.save_results([result("device", "d1", 1.0), result("tag", "lab", 1.0)])
    s.save_results([result("device", "d1", 2.0)])
    got = {(r["scope"], r["subject"]): r["evaluated_at"] for r in s.results({})}
    assert got == {("device", "d1"): 2.0, ("tag", "lab"): 1.0}
    only = s.results({"model": "m", "version": "1.0", "scope": "device", "subject": None})
    assert [r["result"] for r in only] == ['{"at": 2.0}']
    assert s.results({"model": "other"}) == []


T0 = 1_699_999_200.0


def _sketches(rng: np.random.Generator, n: int, shift: float = 0.0) -> SketchSet:
    b = SketchBuilder()
    for name in ("f0", "f1", "f2"):
        b.update_numeric(name, rng.normal(shift, 1.0, n))
    b.rows = n
    return b.build()


def _report(device: str, seq: int, sketches: SketchSet) -> SketchReport:
    start = datetime.fromtimestamp(T0 + 10 + seq, timezone.utc)
    return SketchReport(
        device_id=device,
        model=ModelRef(name="m", version="1.0", release=1),
        window_start=start,
        window_end=start,
        seq=seq,
        sketches=sketches,
    )


def test_cohort_drift_sees_a_device_whose_reports_went_to_two_processes(
    open_stores: Opener,
) -> None:
    ref = _sketches(np.random.default_rng(1), 10_000)
    info = {"d1": ("host", ["lab"]), "d2": ("host", ["lab"])}

    def process() -> CohortDrift:
        return CohortDrift(open_stores().cohorts, DriftConfig(), lambda m, v: ref, lambda: info)

    a, b = process(), process()
    rng = np.random.default_rng(2)
    a.ingest(_report("d1", 0, _sketches(rng, 600, shift=1.0)))
    b.ingest(_report("d1", 1, _sketches(rng, 600, shift=1.0)))
    a.ingest(_report("d2", 2, _sketches(rng, 700)))
    a.flush()
    b.flush()
    for c in (a, b):
        by = {(r.scope, r.subject): r for r in c.evaluate("m", "1.0", now=T0 + 100)}
        assert by[("device", "d1")].rows == 1200 and by[("device", "d1")].dataset_drift
        assert by[("device", "d2")].rows == 700 and not by[("device", "d2")].dataset_drift
        assert by[("tag", "lab")].rows == 1900
    stored = b.stored("m", "1.0", scope="device")
    assert [r["subject"] for r in stored] == ["d1", "d2"] and stored[0]["dataset_drift"]
    alerts = [c.local_alert("m", "1.0", now=T0 + 100) for c in (a, b, process())]
    assert [x is not None for x in alerts] == [True, False, False]  # one alert per window
    assert alerts[0] is not None and list(alerts[0]["drifted_devices"]) == ["d1"]


# the schema --------------------------------------------------------------------------------
def test_migration_9_holds_the_measures_on_both_backends() -> None:
    for steps in (migrations.SQLITE, migrations.POSTGRES):
        (step,) = [m for m in steps if m.version == 9]
        text = " ".join(step.statements)
        for table in (
            "field_benchmarks",
            "field_bench_commands",
            "field_feedback",
            "device_drift_windows",
            "drift_scope_results",
        ):
            assert f'"{table}"' in text


# What the stores created in a fleet.db before migration 9 (sqlite-utils' layout, verbatim),
# with a row in each.
_OLD_MEASURES = """
CREATE TABLE "field_benchmarks" (
   "command_id" TEXT, "device_id" TEXT, "profile" TEXT, "model" TEXT, "version" TEXT,
   "bundle_sha256" TEXT, "variant" TEXT, "p50_ms" REAL, "p95_ms" REAL, "host_p50_ms" REAL,
   "host_basis" TEXT, "ratio" REAL, "runs" INTEGER, "ts" REAL,
   PRIMARY KEY ("command_id", "device_id"));
CREATE TABLE "field_bench_commands" (
   "command_id" TEXT PRIMARY KEY, "device_id" TEXT, "bundle_sha256" TEXT, "issued_at" REAL);
CREATE TABLE "field_feedback" (
   "device_id" TEXT, "model" TEXT, "version" TEXT, "ts" REAL, "seq" INTEGER, "n" INTEGER,
   "kind" TEXT, "value" REAL, PRIMARY KEY ("device_id", "model", "version", "ts", "seq"));
CREATE INDEX "idx_field_feedback_model_version" ON "field_feedback" ("model", "version");
CREATE TABLE "device_drift_windows" (
   "device" TEXT, "model" TEXT, "version" TEXT, "window" REAL, "rows" INTEGER,
   "revision" INTEGER, "sketch" TEXT, PRIMARY KEY ("device", "model", "version", "window"));
CREATE TABLE "drift_scope_results" (
   "model" TEXT, "version" TEXT, "scope" TEXT, "subject" TEXT, "window" REAL,
   "evaluated_at" REAL, "result" TEXT, PRIMARY KEY ("model", "version", "scope", "subject"));
INSERT INTO field_bench_commands VALUES ('fb1-d1', 'd1', 'sha', 5.0);
INSERT INTO field_benchmarks VALUES ('fb1-d1', 'd1', 'host', 'iris', '1.0.0', 'sha', 'fp32',
   2.0, 3.0, 1.0, 'manifest host target', 2.0, 200, 6.0);
INSERT INTO field_feedback VALUES ('d1', 'iris', '1.0.0', 7.0, 1, 30, 'accuracy', 0.9);
INSERT INTO device_drift_windows VALUES ('d1', 'iris', '1.0.0', 0.0, 10, 1, '{}');
INSERT INTO drift_scope_results VALUES ('iris', '1.0.0', 'device', 'd1', 0.0, 8.0, '{}');
"""


def test_a_fleet_db_with_the_measures_tables_upgrades_to_migration_9_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "fleet.db"
    with monkeypatch.context() as m:  # a registry as the release before migration 9 left it…
        m.setattr(migrations, "SQLITE", tuple(s for s in migrations.SQLITE if s.version <= 4))
        SQLiteRepository(path).close()
    with sqlite3.connect(path) as conn:  # …with the tables the stores made themselves
        conn.executescript(_OLD_MEASURES)
    conn.close()
    repo = SQLiteRepository(path)
    assert repo.schema_version() == len(migrations.SQLITE)
    applied = [r["version"] for r in repo.db.query("select version from schema_version")]
    assert applied == [m.version for m in migrations.SQLITE]
    assert "drift_scope_alerts" in repo.db.table_names()  # the table the old layout lacked
    repo.close()
    db = connect(path)
    bench, feedback, cohorts = SQLiteBenchStore(db), SQLiteFeedbackStore(db), SQLiteCohortStore(db)
    assert bench.issued("fb1-d1", "d1") is not None
    assert [s["ratio"] for s in bench.samples("host")] == [2.0]
    assert [r["n"] for r in feedback.rows("iris", "1.0.0", None)] == [30]
    assert [r["rows"] for r in cohorts.windows("iris", "1.0.0", 0.0)] == [10]
    assert [r["subject"] for r in cohorts.results({"scope": "device"})] == ["d1"]
    assert cohorts.claim_alert("iris", "1.0.0", 0.0)
    assert not feedback.add(
        {"device_id": "d1", "model": "iris", "version": "1.0.0", "ts": 7.0, "seq": 1}
    )  # the old primary key still holds
    indexes = {r[0] for r in db.conn.execute("select name from sqlite_master where type='index'")}
    assert "idx_device_drift_windows_model_version_window" in indexes
    db.conn.close()
