"""Where the fleet's own measures are kept: one small interface per store, in the registry.

Three stores, each a :class:`typing.Protocol` here with a SQLite implementation beside it
and a PostgreSQL one in :mod:`.measure_store_pg`; :func:`open_measure_stores` picks the
backend from the same ``[registry] url`` as the registry (SQLite file in the data dir when
unset), so several ``fleet serve`` processes on one PostgreSQL see every measure:

    BenchStore     field_benchmarks (command, device) → one field benchmark sample;
                   field_bench_commands (command) → the benchmark command this server sent
                   (:mod:`.calibration`)
    FeedbackStore  field_feedback (device, model, version, ts, seq) → one window of labelled
                   feedback (:mod:`.field_accuracy`)
    CohortStore    device_drift_windows (device, model, version, window) → merged sketches;
                   drift_scope_results (model, version, scope, subject) → the newest test of
                   a device, cohort or group; drift_scope_alerts (model, version, window)
                   → an alert named the drifted scopes of that window (:mod:`.cohort_drift`)

The tables are registry migration 9 (:mod:`.migrations`). Writes that may arrive twice (a
report delivered to two processes, a QoS 1 duplicate) are idempotent on the natural key:
the first sample or feedback window is kept and a repeat changes nothing. Per-device
windows are merged, not overwritten: :meth:`CohortStore.merge_windows` reads, merges and
writes each window in one transaction holding its row (PostgreSQL) or the file's write
lock (SQLite), so processes that each hold part of a device's reports add up.

Errors: sqlite3 errors become :class:`~.errors.StorageError` here; psycopg errors in the
registry's one translation point (:func:`.repository_pg._translate`).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from . import migrations
from .errors import StorageError

BENCH = "field_benchmarks"
BENCH_COMMANDS = "field_bench_commands"
FEEDBACK = "field_feedback"
DEVICE_WINDOWS = "device_drift_windows"
SCOPE_RESULTS = "drift_scope_results"
SCOPE_ALERTS = "drift_scope_alerts"

BENCH_COLS = (
    "command_id",
    "device_id",
    "profile",
    "model",
    "version",
    "bundle_sha256",
    "variant",
    "p50_ms",
    "p95_ms",
    "host_p50_ms",
    "host_basis",
    "ratio",
    "runs",
    "ts",
)
FEEDBACK_COLS = ("device_id", "model", "version", "ts", "seq", "n", "kind", "value")
WINDOW_COLS = ("device", "model", "version", "window", "rows", "revision", "sketch")
RESULT_COLS = ("model", "version", "scope", "subject", "window", "evaluated_at", "result")

WindowKey = tuple[str, str, str, float]  # device, model, version, window
# (key, the stored row or None, the delta) → the row to store, or None to leave it as it is
Merge = Callable[[WindowKey, dict[str, Any] | None, Any], dict[str, Any] | None]


class BenchStore(Protocol):
    def issue(self, command_id: str, device_id: str, bundle_sha256: str, ts: float) -> None: ...
    def issued(self, command_id: str, device_id: str) -> dict[str, Any] | None: ...
    def add(self, command_id: str, sample: dict[str, Any]) -> bool: ...
    def samples(self, profile: str | None = None) -> list[dict[str, Any]]: ...


class FeedbackStore(Protocol):
    def add(self, row: dict[str, Any]) -> bool: ...
    def rows(
        self, model: str | None, version: str | None, device: str | None
    ) -> list[dict[str, Any]]: ...


class CohortStore(Protocol):
    def merge_windows(self, deltas: dict[WindowKey, Any], merge: Merge) -> None: ...
    def windows(self, model: str, version: str, window: float) -> list[dict[str, Any]]: ...
    def latest_window(self, model: str, version: str, not_after: float) -> float | None: ...
    def prune_windows(self, model: str, version: str, before: float) -> None: ...
    def save_results(self, rows: list[dict[str, Any]]) -> None: ...
    def results(self, filters: dict[str, str | None]) -> list[dict[str, Any]]: ...
    def claim_alert(self, model: str, version: str, window: float) -> bool: ...


@dataclass
class MeasureStores:
    bench: BenchStore
    feedback: FeedbackStore
    cohorts: CohortStore
    close: Callable[[], None]


def open_measure_stores(config: Any, repo: Any) -> MeasureStores:
    """The stores the config names: on PostgreSQL sharing the registry's pool, else one
    connection to the SQLite file in the data dir (``config``: a FleetConfig)."""
    if config.registry.url:
        from .measure_store_pg import PgBenchStore, PgCohortStore, PgFeedbackStore
        from .repository_pg import PostgresRepository, open_pool

        own = not isinstance(repo, PostgresRepository)
        pool = open_pool(config.registry.url, config.registry.pool_size) if own else repo.pool
        return MeasureStores(
            PgBenchStore(pool),
            PgFeedbackStore(pool),
            PgCohortStore(pool),
            pool.close if own else _nothing,
        )
    from .repository import connect

    db = connect(config.db_path)
    lock = threading.RLock()
    return MeasureStores(
        SQLiteBenchStore(db, lock),
        SQLiteFeedbackStore(db, lock),
        SQLiteCohortStore(db, lock),
        db.conn.close,
    )


def _nothing() -> None:
    return None


def ensure_tables(db: Any) -> None:
    """Create the measures' tables in a SQLite file that lacks them (migration 9's
    statements; a registry opened on the file has applied them already)."""
    try:
        with db.conn:
            for statement in migrations.measure_tables("REAL", "INTEGER"):
                db.conn.execute(statement)
    except sqlite3.Error as exc:
        raise StorageError(f"measures: {exc}") from None


class _SQLite:
    """A store on a ``sqlite_utils.Database``; stores sharing one connection share ``lock``
    (one transaction at a time on a connection)."""

    def __init__(self, db: Any, lock: threading.RLock | None = None) -> None:
        self.db = db
        self._lock = lock if lock is not None else threading.RLock()
        ensure_tables(db)

    @contextmanager
    def _tx(self, immediate: bool = False) -> Iterator[Any]:
        """One transaction (``BEGIN IMMEDIATE`` takes the write lock before reading)."""
        conn = self.db.conn
        with self._lock:
            try:
                conn.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
                try:
                    yield conn
                except BaseException:
                    conn.rollback()
                    raise
                conn.commit()
            except sqlite3.Error as exc:
                raise StorageError(f"measures: {exc}") from None

    def _all(self, sql: str, args: list[Any]) -> list[dict[str, Any]]:
        with self._lock:
            try:
                cur = self.db.conn.execute(sql, args)
                names = [d[0] for d in cur.description]
                return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
            except sqlite3.Error as exc:
                raise StorageError(f"measures: {exc}") from None


def _cols(names: tuple[str, ...]) -> str:
    return ", ".join(f'"{n}"' for n in names)


def _where(pairs: list[tuple[str, Any]], mark: str) -> tuple[str, list[Any]]:
    """`` where "a" = ? and "b" = ?`` for the pairs whose value is not None."""
    clauses = [f'"{c}" = {mark}' for c, v in pairs if v is not None]
    args = [v for _, v in pairs if v is not None]
    return (" where " + " and ".join(clauses) if clauses else ""), args


class SQLiteBenchStore(_SQLite):
    def issue(self, command_id: str, device_id: str, bundle_sha256: str, ts: float) -> None:
        """Remember a benchmark command we sent: only its answer is taken as a sample."""
        with self._tx() as conn:
            conn.execute(
                f"insert into {BENCH_COMMANDS} (command_id, device_id, bundle_sha256, issued_at) "
                "values (?, ?, ?, ?) on conflict (command_id) do update set "
                "device_id = excluded.device_id, bundle_sha256 = excluded.bundle_sha256, "
                "issued_at = excluded.issued_at",
                [command_id, device_id, bundle_sha256, ts],
            )

    def issued(self, command_id: str, device_id: str) -> dict[str, Any] | None:
        rows = self._all(
            f"select * from {BENCH_COMMANDS} where command_id = ? and device_id = ?",
            [command_id, device_id],
        )
        return rows[0] if rows else None

    def add(self, command_id: str, sample: dict[str, Any]) -> bool:
        """Keep a sample; False when this command's answer from that device is kept already."""
        row = {**sample, "command_id": command_id}
        with self._tx() as conn:
            cur = conn.execute(
                f"insert into {BENCH} ({_cols(BENCH_COLS)}) values "
                f"({', '.join('?' * len(BENCH_COLS))}) on conflict do nothing",
                [row.get(c) for c in BENCH_COLS],
            )
            return cur.rowcount > 0

    def samples(self, profile: str | None = None) -> list[dict[str, Any]]:
        where, args = _where([("profile", profile or None)], "?")
        return self._all(f"select * from {BENCH}{where} order by ts, command_id, device_id", args)


class SQLiteFeedbackStore(_SQLite):
    def add(self, row: dict[str, Any]) -> bool:
        """Keep a feedback window; False when the same window was kept already."""
        with self._tx() as conn:
            cur = conn.execute(
                f"insert into {FEEDBACK} ({_cols(FEEDBACK_COLS)}) values "
                f"({', '.join('?' * len(FEEDBACK_COLS))}) on conflict do nothing",
                [row.get(c) for c in FEEDBACK_COLS],
            )
            return cur.rowcount > 0

    def rows(
        self, model: str | None, version: str | None, device: str | None
    ) -> list[dict[str, Any]]:
        where, args = _where([("model", model), ("version", version), ("device_id", device)], "?")
        return self._all(f"select * from {FEEDBACK}{where} order by ts, device_id, seq", args)


class SQLiteCohortStore(_SQLite):
    def merge_windows(self, deltas: dict[WindowKey, Any], merge: Merge) -> None:
        """Merge each delta into its stored window, all in one write transaction."""
        if not deltas:
            return
        with self._tx(immediate=True) as conn:
            for key in sorted(deltas):
                cur = conn.execute(
                    f"select * from {DEVICE_WINDOWS} where device = ? and model = ? and "
                    'version = ? and "window" = ?',
                    list(key),
                )
                names = [d[0] for d in cur.description]
                found = cur.fetchone()
                row = merge(
                    key, dict(zip(names, found, strict=True)) if found else None, deltas[key]
                )
                if row is None:
                    continue
                conn.execute(
                    f"insert or replace into {DEVICE_WINDOWS} ({_cols(WINDOW_COLS)}) values "
                    f"({', '.join('?' * len(WINDOW_COLS))})",
                    [row[c] for c in WINDOW_COLS],
                )

    def windows(self, model: str, version: str, window: float) -> list[dict[str, Any]]:
        return self._all(
            f'select * from {DEVICE_WINDOWS} where model = ? and version = ? and "window" = ? '
            "order by device",
            [model, version, window],
        )

    def latest_window(self, model: str, version: str, not_after: float) -> float | None:
        rows = self._all(
            f'select max("window") as w from {DEVICE_WINDOWS} '
            'where model = ? and version = ? and "window" <= ?',
            [model, version, not_after],
        )
        w = rows[0]["w"] if rows else None
        return float(w) if w is not None else None

    def prune_windows(self, model: str, version: str, before: float) -> None:
        with self._tx() as conn:
            for table in (DEVICE_WINDOWS, SCOPE_ALERTS):
                conn.execute(
                    f'delete from {table} where model = ? and version = ? and "window" < ?',
                    [model, version, before],
                )

    def claim_alert(self, model: str, version: str, window: float) -> bool:
        """True for the first claim of a window's alert; False when one was claimed before."""
        with self._tx() as conn:
            cur = conn.execute(
                f'insert into {SCOPE_ALERTS} (model, version, "window") values (?, ?, ?) '
                "on conflict do nothing",
                [model, version, window],
            )
            return cur.rowcount > 0

    def save_results(self, rows: list[dict[str, Any]]) -> None:
        """Replace each scope's stored result (the newest evaluation wins)."""
        if not rows:
            return
        with self._tx() as conn:
            conn.executemany(
                f"insert or replace into {SCOPE_RESULTS} ({_cols(RESULT_COLS)}) values "
                f"({', '.join('?' * len(RESULT_COLS))})",
                [[r[c] for c in RESULT_COLS] for r in rows],
            )

    def results(self, filters: dict[str, str | None]) -> list[dict[str, Any]]:
        """Stored results; ``filters`` may name model, version, scope and subject."""
        pairs = [(c, filters.get(c)) for c in ("model", "version", "scope", "subject")]
        where, args = _where(pairs, "?")
        return self._all(
            f"select * from {SCOPE_RESULTS}{where} order by model, version, scope, subject", args
        )
