"""The drift engine's tables on PostgreSQL: :class:`PgDriftStore`, the same methods as
:class:`~.drift_store.DriftStore` (which keeps them in the SQLite file).

The tables (``drift_references``, ``drift_reports``, ``drift_windows``, ``drift_results``)
are part of PostgreSQL migration 1 (:mod:`.migrations`); the store shares the registry's
connection pool. Every method is one transaction; :meth:`PgDriftStore.merge_report` merges
a report at once, so several server processes can share the windows. Errors become
:class:`~.errors.StorageError` through the registry's one translation point.

``"window"`` is a reserved word in PostgreSQL, so every identifier here is quoted.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .errors import StorageError
from .pagination import DRIFT, Page, drift_results_query
from .repository_pg import _translate, _value, migrate

_WINDOW_COLS = (
    "model",
    "version",
    "window",
    "sketch",
    "rows",
    "devices",
    "revision",
    "evaluated_revision",
    "alerted",
)
_REPORT_COLS = ("device", "model", "version", "window_start", "seq", "window", "rows")
_RESULT_COLS = (
    "model",
    "version",
    "window",
    "evaluated_at",
    "rows",
    "drifted_share",
    "dataset_drift",
    "features",
)


def _cols(names: tuple[str, ...] | list[str]) -> str:
    return ", ".join(f'"{n}"' for n in names)


def _marks(n: int) -> str:
    return ", ".join(["%s"] * n)


class PgDriftStore:
    def __init__(self, pool: Any) -> None:
        self.pool = pool
        migrate(pool)  # a no-op when the registry already migrated

    @contextmanager
    def _conn(self) -> Iterator[Any]:
        with _translate("drift store"), self.pool.connection() as conn:
            yield conn

    def _all(self, sql: str, args: list[Any]) -> list[dict[str, Any]]:
        with self._conn() as conn:
            return list(conn.execute(sql, args).fetchall())

    # references ---------------------------------------------------------------------
    def put_reference(self, model: str, version: str, sketch_json: str, rows: int) -> None:
        with self._conn() as conn:
            conn.execute(
                'insert into drift_references ("model", "version", "sketch", "rows") '
                "values (%s, %s, %s, %s) on conflict (model, version) do update set "
                '"sketch" = excluded."sketch", "rows" = excluded."rows"',
                [model, version, sketch_json, rows],
            )

    def reference(self, model: str, version: str) -> str | None:
        rows = self._all(
            "select sketch from drift_references where model = %s and version = %s",
            [model, version],
        )
        return rows[0]["sketch"] if rows else None

    # reports and windows --------------------------------------------------------------
    def seen(self, key: dict[str, Any]) -> bool:
        rows = self._all(
            "select 1 from drift_reports where device = %s and model = %s and version = %s "
            "and window_start = %s and seq = %s",
            [key["device"], key["model"], key["version"], key["window_start"], key["seq"]],
        )
        return bool(rows)

    def window(self, model: str, version: str, window: float) -> dict[str, Any] | None:
        rows = self._all(
            'select * from drift_windows where model = %s and version = %s and "window" = %s',
            [model, version, window],
        )
        return rows[0] if rows else None

    def latest_window(self, model: str, version: str, not_after: float) -> dict[str, Any] | None:
        rows = self._all(
            'select * from drift_windows where model = %s and version = %s and "window" <= %s '
            'order by "window" desc limit 1',
            [model, version, not_after],
        )
        return rows[0] if rows else None

    def save_windows(self, windows: list[dict[str, Any]], keys: list[dict[str, Any]]) -> None:
        """Store merged windows and mark the reports they absorbed as seen, atomically.

        A report key already present fails the whole transaction (primary key), as on
        SQLite: a report is merged into its window once.
        """
        win_cols = [c for c in _WINDOW_COLS if windows and c in windows[0]]
        updates = ", ".join(
            f'"{c}" = excluded."{c}"' for c in win_cols if c not in ("model", "version", "window")
        )
        with self._conn() as conn, conn.cursor() as cur:
            if keys:
                cur.executemany(
                    f"insert into drift_reports ({_cols(_REPORT_COLS)}) "
                    f"values ({_marks(len(_REPORT_COLS))})",
                    [[_value(k.get(c)) for c in _REPORT_COLS] for k in keys],
                )
            if windows:
                cur.executemany(
                    f"insert into drift_windows ({_cols(win_cols)}) values "
                    f'({_marks(len(win_cols))}) on conflict ("model", "version", "window") '
                    f"do update set {updates}",
                    [[_value(w.get(c)) for c in win_cols] for w in windows],
                )

    def merge_report(self, key: dict[str, Any], incoming: dict[str, Any]) -> bool:
        """Merge one report into its window now, in one transaction; False when its key
        (device, model, version, window_start, seq) was merged before, by any process.

        The key is inserted first (``on conflict do nothing``): a second delivery of the
        report, to this process or another, finds it and changes nothing. The window row is
        created empty if missing and then locked (``for update``), so processes merging
        into the same window take turns and none overwrites another's merge. A sketch
        whose kind differs from the window's raises :class:`ProtocolError` and rolls the
        whole transaction back (the key too). ``key`` also carries ``window`` and ``rows``.
        """
        from .drift_window import OpenWindow

        model, version, window = key["model"], key["version"], key["window"]
        empty = OpenWindow(model, version, window).to_row()
        with self._conn() as conn, conn.transaction():
            cur = conn.execute(
                f"insert into drift_reports ({_cols(_REPORT_COLS)}) "
                f"values ({_marks(len(_REPORT_COLS))}) on conflict do nothing",
                [_value(key.get(c)) for c in _REPORT_COLS],
            )
            if cur.rowcount == 0:
                return False
            conn.execute(
                f"insert into drift_windows ({_cols(_WINDOW_COLS)}) "
                f"values ({_marks(len(_WINDOW_COLS))}) on conflict do nothing",
                [_value(empty[c]) for c in _WINDOW_COLS],
            )
            row = conn.execute(
                'select * from drift_windows where model = %s and version = %s and "window" = %s '
                "for update",
                [model, version, window],
            ).fetchone()
            w = OpenWindow.from_row(row)
            w.check(incoming)
            w.add(key["device"], int(key["rows"]), incoming, key)
            new = w.to_row()
            changed = ("sketch", "rows", "devices", "revision")
            sets = ", ".join(f'"{c}" = %s' for c in changed)
            conn.execute(
                f"update drift_windows set {sets} "
                'where model = %s and version = %s and "window" = %s',
                [*(new[c] for c in changed), model, version, window],
            )
        return True

    def mark_window(self, model: str, version: str, window: float, **fields: Any) -> None:
        unknown = set(fields) - set(_WINDOW_COLS)
        if unknown:
            raise StorageError(f"drift store: drift_windows has no column {sorted(unknown)}")
        if not fields:
            return
        sets = ", ".join(f'"{c}" = %s' for c in fields)
        with self._conn() as conn:
            conn.execute(
                f"update drift_windows set {sets} "
                'where model = %s and version = %s and "window" = %s',
                [*(_value(v) for v in fields.values()), model, version, window],
            )

    # results --------------------------------------------------------------------------
    def add_result(self, row: dict[str, Any]) -> None:
        cols = [c for c in _RESULT_COLS if c in row]
        with self._conn() as conn:
            conn.execute(
                f"insert into drift_results ({_cols(cols)}) values ({_marks(len(cols))})",
                [_value(row[c]) for c in cols],
            )

    def results(self, model: str | None, version: str | None, limit: int) -> list[dict[str, Any]]:
        where, params = [], []
        if model is not None:
            where.append("model = %s")
            params.append(model)
        if version is not None:
            where.append("version = %s")
            params.append(version)
        sql = "select * from drift_results"
        if where:
            sql += " where " + " and ".join(where)
        sql += " order by evaluated_at desc, id desc limit %s"
        out = []
        for row in self._all(sql, [*params, int(limit)]):
            row["features"] = json.loads(row["features"])
            row["dataset_drift"] = bool(row["dataset_drift"])
            out.append(row)
        return out

    def results_page(
        self, model: str | None, version: str | None, limit: int, cursor: str | None
    ) -> Page:
        """Stored evaluations newest first, one cursor page (:mod:`.pagination`)."""
        sql, params = drift_results_query(model, version, limit, cursor, "%s")
        rows = []
        for row in self._all(sql, params):
            row = dict(row)
            row["features"] = json.loads(row["features"])
            row["dataset_drift"] = bool(row["dataset_drift"])
            rows.append(row)
        return DRIFT.page(rows, limit)

    def model_versions(self) -> list[tuple[str, str]]:
        rows = self._all(
            "select model, version from drift_references union "
            "select model, version from drift_windows order by model, version",
            [],
        )
        return [(r["model"], r["version"]) for r in rows]
