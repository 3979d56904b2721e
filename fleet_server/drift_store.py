"""The drift engine's own SQLite tables (all prefixed ``drift_``).

    drift_references  (model, version) → the bundle's reference SketchSet (JSON)
    drift_reports     (device, model, version, window_start, seq) → seen; makes ingest idempotent
    drift_windows     (model, version, window) → merged SketchSet, rows, devices, revision,
                      alerted (an alert was already published for this window)
    drift_results     one row per evaluation whose inputs changed: per-feature statistics (JSON)

Only :mod:`fleet_server.drift` uses this module. Every write is one transaction on the
``sqlite_utils.Database`` the caller hands in; the caller serialises access.
"""

from __future__ import annotations

import json
from typing import Any

from .pagination import DRIFT, Page, drift_results_query

REFERENCES = "drift_references"
REPORTS = "drift_reports"
WINDOWS = "drift_windows"
RESULTS = "drift_results"


class DriftStore:
    def __init__(self, db: Any) -> None:
        self.db = db
        self._ensure()

    def _ensure(self) -> None:
        db = self.db
        if REFERENCES not in db.table_names():
            db[REFERENCES].create(
                {"model": str, "version": str, "sketch": str, "rows": int}, pk=("model", "version")
            )
        if REPORTS not in db.table_names():
            db[REPORTS].create(
                {
                    "device": str,
                    "model": str,
                    "version": str,
                    "window_start": float,
                    "seq": int,
                    "window": float,
                    "rows": int,
                },
                pk=("device", "model", "version", "window_start", "seq"),
            )
        if WINDOWS not in db.table_names():
            db[WINDOWS].create(
                {
                    "model": str,
                    "version": str,
                    "window": float,
                    "sketch": str,
                    "rows": int,
                    "devices": str,
                    "revision": int,
                    "evaluated_revision": int,
                    "alerted": int,
                },
                pk=("model", "version", "window"),
            )
        if RESULTS not in db.table_names():
            db[RESULTS].create(
                {
                    "id": int,
                    "model": str,
                    "version": str,
                    "window": float,
                    "evaluated_at": float,
                    "rows": int,
                    "drifted_share": float,
                    "dataset_drift": int,
                    "features": str,
                },
                pk="id",
            )
            db[RESULTS].create_index(["model", "version", "evaluated_at"])

    # references ---------------------------------------------------------------------
    def put_reference(self, model: str, version: str, sketch_json: str, rows: int) -> None:
        self.db[REFERENCES].upsert(
            {"model": model, "version": version, "sketch": sketch_json, "rows": rows},
            pk=("model", "version"),
        )

    def reference(self, model: str, version: str) -> str | None:
        rows = list(
            self.db.query(
                f"select sketch from {REFERENCES} where model = ? and version = ?", [model, version]
            )
        )
        return rows[0]["sketch"] if rows else None

    # reports and windows --------------------------------------------------------------
    def seen(self, key: dict[str, Any]) -> bool:
        rows = self.db.query(
            f"select 1 from {REPORTS} where device = :device and model = :model and "
            "version = :version and window_start = :window_start and seq = :seq",
            key,
        )
        return any(True for _ in rows)

    def window(self, model: str, version: str, window: float) -> dict[str, Any] | None:
        rows = list(
            self.db.query(
                f"select * from {WINDOWS} where model = ? and version = ? and window = ?",
                [model, version, window],
            )
        )
        return rows[0] if rows else None

    def latest_window(self, model: str, version: str, not_after: float) -> dict[str, Any] | None:
        rows = list(
            self.db.query(
                f"select * from {WINDOWS} where model = ? and version = ? and window <= ? "
                "order by window desc limit 1",
                [model, version, not_after],
            )
        )
        return rows[0] if rows else None

    def save_windows(self, windows: list[dict[str, Any]], keys: list[dict[str, Any]]) -> None:
        """Store merged windows and mark the reports they absorbed as seen, atomically.

        ``BEGIN IMMEDIATE`` takes the write lock before sqlite-utils reads the schema: a
        deferred transaction that reads first cannot upgrade to a write once the registry's
        connection (same file) has committed, and SQLite then answers "database is locked"
        at once instead of waiting (seen in CI under load).
        """
        conn = self.db.conn
        nested = conn.in_transaction  # inside a caller's transaction: a savepoint
        if not nested:
            conn.execute("BEGIN IMMEDIATE")
        try:
            with self.db.atomic():
                self.db[REPORTS].insert_all(keys)
                self.db[WINDOWS].upsert_all(windows, pk=("model", "version", "window"))
        except BaseException:
            if not nested:
                conn.rollback()
            raise
        if not nested:
            conn.commit()

    def mark_window(self, model: str, version: str, window: float, **fields: Any) -> None:
        self.db[WINDOWS].update((model, version, window), fields)

    # results --------------------------------------------------------------------------
    def add_result(self, row: dict[str, Any]) -> None:
        self.db[RESULTS].insert(row)

    def results(self, model: str | None, version: str | None, limit: int) -> list[dict[str, Any]]:
        where, params = [], []
        if model is not None:
            where.append("model = ?")
            params.append(model)
        if version is not None:
            where.append("version = ?")
            params.append(version)
        sql = f"select * from {RESULTS}"
        if where:
            sql += " where " + " and ".join(where)
        sql += " order by evaluated_at desc, id desc limit ?"
        out = []
        for row in self.db.query(sql, [*params, int(limit)]):
            row = dict(row)
            row["features"] = json.loads(row["features"])
            row["dataset_drift"] = bool(row["dataset_drift"])
            out.append(row)
        return out

    def results_page(
        self, model: str | None, version: str | None, limit: int, cursor: str | None
    ) -> Page:
        """Stored evaluations newest first, one cursor page (:mod:`.pagination`)."""
        sql, params = drift_results_query(model, version, limit, cursor, "?")
        rows = []
        for row in self.db.query(sql, params):
            row = dict(row)
            row["features"] = json.loads(row["features"])
            row["dataset_drift"] = bool(row["dataset_drift"])
            rows.append(row)
        return DRIFT.page(rows, limit)

    def model_versions(self) -> list[tuple[str, str]]:
        rows = self.db.query(
            f"select model, version from {REFERENCES} union select model, version from {WINDOWS} "
            "order by model, version"
        )
        return [(r["model"], r["version"]) for r in rows]
