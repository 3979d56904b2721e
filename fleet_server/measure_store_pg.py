"""The fleet's measures on PostgreSQL: the stores of :mod:`.measure_store`, same methods.

The tables are registry migration 9 (:mod:`.migrations`); every store shares the registry's
connection pool. Every method is one transaction; errors become
:class:`~.errors.StorageError` through the registry's one translation point.

Idempotent writes: a sample or feedback window already kept (its natural key) is left as
it is (``on conflict do nothing``), whichever process got the report first. Per-device
windows are merged under a row lock (``select … for update``, keys in sorted order so two
processes never wait on each other in a circle).

``"window"`` and ``"rows"`` are keywords in PostgreSQL, so every identifier is quoted.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .measure_store import (
    BENCH,
    BENCH_COLS,
    BENCH_COMMANDS,
    DEVICE_WINDOWS,
    FEEDBACK,
    FEEDBACK_COLS,
    RESULT_COLS,
    SCOPE_ALERTS,
    SCOPE_RESULTS,
    WINDOW_COLS,
    Merge,
    WindowKey,
    _cols,
    _where,
)
from .repository_pg import _translate, _value, migrate


def _marks(n: int) -> str:
    return ", ".join(["%s"] * n)


_WINDOW_KEY = 'device = %s and model = %s and version = %s and "window" = %s'


class _Pg:
    def __init__(self, pool: Any) -> None:
        self.pool = pool
        migrate(pool)  # a no-op when the registry already migrated

    @contextmanager
    def _conn(self) -> Iterator[Any]:
        with _translate("measures"), self.pool.connection() as conn:
            yield conn

    def _all(self, sql: str, args: list[Any]) -> list[dict[str, Any]]:
        with self._conn() as conn:
            return list(conn.execute(sql, args).fetchall())


class PgBenchStore(_Pg):
    def issue(self, command_id: str, device_id: str, bundle_sha256: str, ts: float) -> None:
        with self._conn() as conn:
            conn.execute(
                f"insert into {BENCH_COMMANDS} (command_id, device_id, bundle_sha256, issued_at) "
                "values (%s, %s, %s, %s) on conflict (command_id) do update set "
                "device_id = excluded.device_id, bundle_sha256 = excluded.bundle_sha256, "
                "issued_at = excluded.issued_at",
                [command_id, device_id, bundle_sha256, ts],
            )

    def issued(self, command_id: str, device_id: str) -> dict[str, Any] | None:
        rows = self._all(
            f"select * from {BENCH_COMMANDS} where command_id = %s and device_id = %s",
            [command_id, device_id],
        )
        return rows[0] if rows else None

    def add(self, command_id: str, sample: dict[str, Any]) -> bool:
        row = {**sample, "command_id": command_id}
        with self._conn() as conn:
            cur = conn.execute(
                f"insert into {BENCH} ({_cols(BENCH_COLS)}) values ({_marks(len(BENCH_COLS))}) "
                "on conflict do nothing",
                [_value(row.get(c)) for c in BENCH_COLS],
            )
            return bool(cur.rowcount)

    def samples(self, profile: str | None = None) -> list[dict[str, Any]]:
        where, args = _where([("profile", profile or None)], "%s")
        return self._all(f"select * from {BENCH}{where} order by ts, command_id, device_id", args)


class PgFeedbackStore(_Pg):
    def add(self, row: dict[str, Any]) -> bool:
        with self._conn() as conn:
            cur = conn.execute(
                f"insert into {FEEDBACK} ({_cols(FEEDBACK_COLS)}) values "
                f"({_marks(len(FEEDBACK_COLS))}) on conflict do nothing",
                [_value(row.get(c)) for c in FEEDBACK_COLS],
            )
            return bool(cur.rowcount)

    def rows(
        self, model: str | None, version: str | None, device: str | None
    ) -> list[dict[str, Any]]:
        where, args = _where([("model", model), ("version", version), ("device_id", device)], "%s")
        return self._all(f"select * from {FEEDBACK}{where} order by ts, device_id, seq", args)


class PgCohortStore(_Pg):
    def merge_windows(self, deltas: dict[WindowKey, Any], merge: Merge) -> None:
        """Merge each delta into its stored window in one transaction, each row locked.

        A window no process stored yet is inserted (``on conflict do nothing``); when
        another process inserted it meanwhile, it is read again under the lock and merged.
        """
        if not deltas:
            return
        insert = (
            f"insert into {DEVICE_WINDOWS} ({_cols(WINDOW_COLS)}) values "
            f"({_marks(len(WINDOW_COLS))}) on conflict do nothing"
        )
        update = (
            f'update {DEVICE_WINDOWS} set "rows" = %s, "revision" = %s, "sketch" = %s '
            f"where {_WINDOW_KEY}"
        )
        select = f"select * from {DEVICE_WINDOWS} where {_WINDOW_KEY} for update"
        with self._conn() as conn, conn.transaction():
            for key in sorted(deltas):
                found = conn.execute(select, list(key)).fetchone()
                if found is None:
                    row = merge(key, None, deltas[key])
                    if row is None:
                        continue
                    cur = conn.execute(insert, [_value(row[c]) for c in WINDOW_COLS])
                    if cur.rowcount:
                        continue
                    found = conn.execute(select, list(key)).fetchone()
                row = merge(key, found, deltas[key])
                if row is not None:
                    conn.execute(update, [row["rows"], row["revision"], row["sketch"], *key])

    def windows(self, model: str, version: str, window: float) -> list[dict[str, Any]]:
        return self._all(
            f"select * from {DEVICE_WINDOWS} "
            'where model = %s and version = %s and "window" = %s order by device',
            [model, version, window],
        )

    def latest_window(self, model: str, version: str, not_after: float) -> float | None:
        rows = self._all(
            f'select max("window") as w from {DEVICE_WINDOWS} '
            'where model = %s and version = %s and "window" <= %s',
            [model, version, not_after],
        )
        w = rows[0]["w"] if rows else None
        return float(w) if w is not None else None

    def prune_windows(self, model: str, version: str, before: float) -> None:
        with self._conn() as conn:
            for table in (DEVICE_WINDOWS, SCOPE_ALERTS):
                conn.execute(
                    f'delete from {table} where model = %s and version = %s and "window" < %s',
                    [model, version, before],
                )

    def claim_alert(self, model: str, version: str, window: float) -> bool:
        with self._conn() as conn:
            cur = conn.execute(
                f'insert into {SCOPE_ALERTS} (model, version, "window") values (%s, %s, %s) '
                "on conflict do nothing",
                [model, version, window],
            )
            return bool(cur.rowcount)

    def save_results(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        updates = ", ".join(f'"{c}" = excluded."{c}"' for c in RESULT_COLS if c not in _RESULT_KEY)
        with self._conn() as conn, conn.cursor() as cur:
            cur.executemany(
                f"insert into {SCOPE_RESULTS} ({_cols(RESULT_COLS)}) values "
                f"({_marks(len(RESULT_COLS))}) on conflict ({_cols(_RESULT_KEY)}) "
                f"do update set {updates}",
                [[_value(r[c]) for c in RESULT_COLS] for r in rows],
            )

    def results(self, filters: dict[str, str | None]) -> list[dict[str, Any]]:
        pairs = [(c, filters.get(c)) for c in ("model", "version", "scope", "subject")]
        where, args = _where(pairs, "%s")
        return self._all(
            f"select * from {SCOPE_RESULTS}{where} order by model, version, scope, subject", args
        )


_RESULT_KEY = ("model", "version", "scope", "subject")
