"""The registry behind a small interface (:class:`Repository`), with a SQLite implementation.

Everything the service stores goes through these methods; :mod:`.repository_pg` implements
the same interface on PostgreSQL, and ``tests/fleet_server/test_repository_contract.py``
holds both to one contract. :func:`open_repository` picks the backend from the config
(``registry.url``; SQLite in the data dir when unset). Rows come back as plain dicts.
sqlite3 errors are translated into :class:`StorageError` here.

Tables: bundles, devices, device_history, rollouts, rollout_stages, rollout_devices,
metrics, events, audit, tokens, users, device_identities (pinned device keys, enrolment),
revoked_sessions (dashboard logouts), channels, channel_history, device_channels,
archived_bundles, schema_version. The SQLite file is 0600 and its folder 0700 whatever the
umask: it holds token hashes and device keys. The schema is the numbered list
:data:`.migrations.SQLITE`, applied on open. (The drift engine keeps its own tables in the
same file through its own connection.)

Lists that grow with the fleet also come as cursor pages (``*_page(limit, cursor)``, see
:mod:`.pagination`), and the overview's device counts come from :meth:`device_counts`
(the few rows of a per-group count table that triggers keep, not a device listing).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, TypeVar

from . import migrations, pagination, rollout_rows
from .errors import StorageError
from .pagination import Page

T = TypeVar("T")


class Repository(Protocol):
    # bundles
    def add_bundle(self, row: dict[str, Any]) -> None: ...
    def get_bundle(self, sha256: str) -> dict[str, Any] | None: ...
    def list_bundles(self) -> list[dict[str, Any]]: ...
    # devices
    def upsert_device(self, device_id: str, **fields: Any) -> None: ...
    def get_device(self, device_id: str) -> dict[str, Any] | None: ...
    def list_devices(self) -> list[dict[str, Any]]: ...
    def add_device_history(
        self, device_id: str, ts: float, model: str, version: str, release: int
    ) -> None: ...
    def device_history(self, device_id: str, limit: int = 50) -> list[dict[str, Any]]: ...
    def latest_history(self) -> dict[str, tuple[str, str]]: ...
    # rollouts
    def save_rollout(
        self, doc: dict[str, Any], bundle_sha256: str, devices: Collection[str] | None = None
    ) -> None:
        """Write a rollout document; ``devices``: the only devices whose progress changed
        since this caller last saved it (None: all), and then ``doc["devices"]`` need hold
        only those (:mod:`.rollout_rows`)."""
        ...

    def get_rollout(self, rollout_id: str) -> dict[str, Any] | None: ...
    def list_rollouts(self, states: list[str] | None = None) -> list[dict[str, Any]]: ...
    # telemetry
    def add_metrics(self, row: dict[str, Any]) -> None: ...
    def metrics_summary(
        self, model: str, version: str, since: float, device_ids: list[str] | None = None
    ) -> dict[str, Any]: ...
    def metrics_by_device(
        self, model: str, version: str, since: float, device_ids: list[str]
    ) -> dict[str, dict[str, Any]]: ...
    def device_metrics(self, device_id: str, limit: int = 50) -> list[dict[str, Any]]: ...
    # history
    def add_event(self, kind: str, message: str, ts: float, **data: Any) -> None: ...
    def add_events(self, rows: list[dict[str, Any]]) -> None: ...
    def add_audits(self, rows: list[dict[str, Any]]) -> None: ...
    def events(
        self, limit: int = 100, rollout_id: str | None = None, device_id: str | None = None
    ) -> list[dict[str, Any]]: ...
    def add_audit(
        self,
        actor: str,
        action: str,
        target: str,
        reason: str,
        ts: float,
        data: dict[str, Any] | None = None,
    ) -> None: ...
    def audit(self, limit: int = 100, target: str | None = None) -> list[dict[str, Any]]: ...
    # auth
    def add_token(self, token_hash: str, role: str, name: str, ts: float) -> None: ...
    def token_role(self, token_hash: str) -> str | None: ...
    def list_tokens(self) -> list[dict[str, Any]]: ...
    def add_user(self, username: str, password_hash: str, role: str) -> None: ...
    def get_user(self, username: str) -> dict[str, Any] | None: ...
    # device identities (fleet_server.device_trust)
    def list_identities(self, device_ids: Collection[str] | None = None) -> list[dict[str, Any]]:
        """Every identity row, or those of ``device_ids``."""
        ...

    def identity_versions(self) -> dict[str, tuple[str, str]]:
        """device id → (key id, status) of every identity: what a refresh compares."""
        ...

    def upsert_identity(self, row: dict[str, Any]) -> None: ...
    def delete_identity(self, device_id: str) -> None: ...
    def set_identity_x25519(self, device_id: str, x25519_key: str | None) -> bool: ...
    # dashboard sessions revoked before they expire
    def revoke_session(self, sid: str, expires: float) -> None: ...
    def session_revoked(self, sid: str) -> bool: ...
    # several fleet serve processes (fleet_server/cluster.py)
    def shared_secret(self, name: str, value: str) -> str: ...
    def heartbeat(self, row: dict[str, Any]) -> None: ...
    def list_processes(self) -> list[dict[str, Any]]: ...
    def claim_process(self, process_id: str, by: str) -> bool: ...
    def delete_process(self, process_id: str) -> None: ...
    def add_rollout_action(self, rollout_id: str, action: str, actor: str, ts: float) -> int: ...
    def pending_rollout_actions(self) -> list[dict[str, Any]]: ...
    def finish_rollout_action(
        self, action_id: int, ts: float, error: str = "", status: int = 200
    ) -> None: ...
    def get_rollout_action(self, action_id: int) -> dict[str, Any] | None: ...
    # cursor pages and aggregate counts (lists that grow with the fleet)
    def devices_page(
        self,
        limit: int = 100,
        cursor: str | None = None,
        *,
        profile: str | None = None,
        version: str | None = None,
        online: bool | None = None,
        tag: str | None = None,
        before: str | None = None,
    ) -> Page: ...
    def bundles_page(self, limit: int = 100, cursor: str | None = None) -> Page: ...
    def rollouts_page(
        self, limit: int = 100, cursor: str | None = None, states: list[str] | None = None
    ) -> Page: ...
    def events_page(
        self,
        limit: int = 100,
        cursor: str | None = None,
        rollout_id: str | None = None,
        device_id: str | None = None,
    ) -> Page: ...
    def audit_page(
        self, limit: int = 100, cursor: str | None = None, target: str | None = None
    ) -> Page: ...
    def device_counts(self) -> dict[str, Any]: ...
    # release channels (fleet_server/channels.py)
    def save_channel(self, row: dict[str, Any]) -> None: ...
    def list_channels(self) -> list[dict[str, Any]]: ...
    def add_channel_history(self, row: dict[str, Any]) -> None: ...
    def channel_history(
        self,
        model: str | None = None,
        channel: str | None = None,
        sha256: str | None = None,
        limit: int = 200,
    ) -> list[dict[str, Any]]: ...
    def set_device_channel(self, device_id: str, **fields: Any) -> None: ...
    def device_channels(self) -> dict[str, dict[str, Any]]: ...
    def archive_bundle(self, sha256: str, ts: float, actor: str, reason: str) -> None: ...
    def archived_bundles(self) -> dict[str, dict[str, Any]]: ...

    # artifact bytes (fleet_server/artifacts.py): True where every server process on this
    # registry can read them (PostgreSQL); on SQLite the files in data_dir stay the store
    shares_artifacts: bool

    def put_artifact(self, sha256: str, size: int, parts: Iterable[bytes]) -> bool: ...
    def artifact_info(self, sha256: str) -> dict[str, Any] | None: ...
    def artifact_part(self, sha256: str, part: int) -> bytes | None: ...
    def schema_version(self) -> int: ...
    def close(self) -> None: ...


# The newest history row of every device, (model, version) by device id (both backends).
_LATEST_HISTORY_SQL = (
    'select h."device_id", h."model", h."version" from "device_history" h join '
    '(select "device_id", max("id") as "id" from "device_history" group by "device_id") last '
    'on h."id" = last."id"'
)


def open_repository(config: Any) -> Repository:
    """The registry the config names: PostgreSQL when ``registry.url`` is set, else the
    SQLite file in the data dir. (``config`` is a :class:`~.config.FleetConfig`.)"""
    url = config.registry.url
    if url:
        from .repository_pg import PostgresRepository

        return PostgresRepository(url, pool_size=config.registry.pool_size)
    return SQLiteRepository(config.db_path)


def drift_database(config: Any, repo: Repository) -> Any:
    """What the drift engine stores into: on PostgreSQL a ``PgDriftStore`` sharing the
    registry's pool, else its own connection to the SQLite file."""
    if config.registry.url:
        from .drift_store_pg import PgDriftStore
        from .repository_pg import PostgresRepository, open_pool

        pool = repo.pool if isinstance(repo, PostgresRepository) else None
        return PgDriftStore(pool or open_pool(config.registry.url, config.registry.pool_size))
    return connect(config.db_path)


def connect(path: Path) -> Any:
    """A ``sqlite_utils.Database`` on ``path`` in WAL mode, usable from several threads."""
    import sqlite_utils

    from protocol.files import private_dir, private_file

    private_dir(Path(path).parent)
    try:
        private_file(Path(path))
        conn = sqlite3.connect(str(path), check_same_thread=False, timeout=30)
        db = sqlite_utils.Database(conn)
        db.enable_wal()
        conn.execute("PRAGMA synchronous=NORMAL")
    except (sqlite3.Error, OSError) as exc:
        raise StorageError(f"cannot open registry {path}: {exc}") from None
    return db


_UPSERT_ROLLOUT_DEVICES = (
    f"INSERT INTO rollout_devices ({', '.join(rollout_rows.DEVICE_COLUMNS)}) "
    f"VALUES ({', '.join('?' * len(rollout_rows.DEVICE_COLUMNS))}) "
    "ON CONFLICT (rollout_id, device_id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in rollout_rows.DEVICE_COLUMNS[2:])
)


def _j(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


class SQLiteRepository:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.db = connect(self.path)
        self._lock = threading.RLock()
        self._columns: set[str] | None = None  # the devices table's, read once
        try:
            self._migrate()
        except BaseException:
            self.db.conn.close()
            raise

    @contextmanager
    def _tx(self) -> Iterator[Any]:
        with self._lock:
            try:
                with self.db.conn:
                    yield self.db
            except sqlite3.Error as exc:
                raise StorageError(f"registry: {exc}") from None

    def _read(self, fn: Callable[[Any], T]) -> T:
        with self._lock:
            try:
                return fn(self.db)
            except sqlite3.Error as exc:
                raise StorageError(f"registry: {exc}") from None

    def _migrate(self) -> None:
        """Apply the pending :data:`.migrations.SQLITE` entries, each in its own transaction.

        ``BEGIN IMMEDIATE`` takes the write lock before the version is read, so two
        processes opening one file cannot both apply the same migration.
        """
        conn = self.db.conn
        with self._lock:
            try:
                conn.execute(migrations.SCHEMA_VERSION_DDL.format(real="REAL"))
                conn.commit()
                while True:
                    conn.execute("BEGIN IMMEDIATE")
                    try:
                        # every cursor closed at once: a statement left un-reset makes the
                        # COMMIT fail ("SQL statements in progress"; seen once under load)
                        cur = conn.execute("select coalesce(max(version), 0) from schema_version")
                        current = cur.fetchone()[0]
                        cur.close()
                        todo = migrations.pending(migrations.SQLITE, current)
                        if current > migrations.latest(migrations.SQLITE):
                            raise StorageError(
                                f"registry {self.path} has schema version {current}; this "
                                f"edgefleet knows up to {migrations.latest(migrations.SQLITE)}"
                            )
                        if not todo:
                            conn.rollback()
                            return
                        step = todo[0]
                        for statement in step.statements:
                            conn.execute(statement).close()
                        conn.execute(
                            "insert into schema_version (version, name, applied_at) "
                            "values (?, ?, ?)",
                            [step.version, step.name, time.time()],
                        )
                    except BaseException:
                        conn.rollback()
                        raise
                    conn.commit()
            except sqlite3.Error as exc:
                raise StorageError(f"registry {self.path}: migration failed: {exc}") from None

    def schema_version(self) -> int:
        return int(
            self._read(
                lambda db: db.execute(
                    "select coalesce(max(version), 0) from schema_version"
                ).fetchone()[0]
            )
        )

    # bundles ------------------------------------------------------------------------
    def add_bundle(self, row: dict[str, Any]) -> None:
        with self._tx() as db:
            db["bundles"].upsert(row, pk="sha256")

    def get_bundle(self, sha256: str) -> dict[str, Any] | None:
        rows = self._read(lambda db: list(db["bundles"].rows_where("sha256 = ?", [sha256])))
        return rows[0] if rows else None

    def list_bundles(self) -> list[dict[str, Any]]:
        return self._read(
            lambda db: list(db["bundles"].rows_where(order_by=pagination.BUNDLES.order_by()))
        )

    # devices ------------------------------------------------------------------------
    def upsert_device(self, device_id: str, **fields: Any) -> None:
        for k in ("tags", "manual_tags"):
            if k in fields and not isinstance(fields[k], str):
                fields[k] = _j(sorted(fields[k]))
        cols = sorted(fields)
        unknown = set(cols) - self._device_columns()
        if unknown:
            raise StorageError(f"registry: devices has no column {sorted(unknown)[0]!r}")
        # one statement instead of sqlite-utils' upsert (which reads the schema each call):
        # a device's birth is on the ingest path of every fleet-sized rollout
        names = ", ".join(f'"{c}"' for c in cols)
        sql = (
            f'INSERT INTO devices ("device_id"{", " + names if cols else ""}) '
            f"VALUES ({', '.join('?' * (len(cols) + 1))}) ON CONFLICT(device_id) DO "
            + (
                "UPDATE SET " + ", ".join(f'"{c}" = excluded."{c}"' for c in cols)
                if cols
                else "NOTHING"
            )
        )
        with self._tx() as db:
            db.conn.execute(sql, [device_id, *(fields[c] for c in cols)])

    def _device_columns(self) -> set[str]:
        if self._columns is None:
            rows = self._read(lambda db: db.conn.execute('PRAGMA table_info("devices")').fetchall())
            self._columns = {r[1] for r in rows}
        return self._columns

    def get_device(self, device_id: str) -> dict[str, Any] | None:
        rows = self._read(lambda db: list(db["devices"].rows_where("device_id = ?", [device_id])))
        return _device(rows[0]) if rows else None

    def list_devices(self) -> list[dict[str, Any]]:
        return [
            _device(r)
            for r in self._read(lambda db: list(db["devices"].rows_where(order_by="device_id")))
        ]

    def add_device_history(
        self, device_id: str, ts: float, model: str, version: str, release: int
    ) -> None:
        with self._tx() as db:
            db.conn.execute(
                'INSERT INTO device_history ("device_id", "ts", "model", "version", "release") '
                "VALUES (?, ?, ?, ?, ?)",
                (device_id, ts, model, version, release),
            )

    def latest_history(self) -> dict[str, tuple[str, str]]:
        rows = self._read(lambda db: list(db.query(_LATEST_HISTORY_SQL)))
        return {r["device_id"]: (r["model"], r["version"]) for r in rows}

    def device_history(self, device_id: str, limit: int = 50) -> list[dict[str, Any]]:
        return self._read(
            lambda db: list(
                db["device_history"].rows_where(
                    "device_id = ?", [device_id], order_by="ts desc, id desc", limit=limit
                )
            )
        )

    # rollouts -----------------------------------------------------------------------
    def save_rollout(
        self, doc: dict[str, Any], bundle_sha256: str, devices: Collection[str] | None = None
    ) -> None:
        rid = doc["rollout_id"]
        stages = [
            {
                "rollout_id": rid,
                "idx": s["index"],
                "state": s["state"],
                "target": s["target"],
                "devices": len(s["devices"]),
                "started_at": s["started_at"],
                "finished_at": s["finished_at"],
            }
            for s in doc["stages"]
        ]
        rows = rollout_rows.device_rows(doc, devices)
        with self._tx() as db:
            db["rollouts"].upsert(
                {
                    "rollout_id": rid,
                    "bundle_sha256": bundle_sha256,
                    "state": doc["state"],
                    "created_at": doc["created_at"],
                    "updated_at": doc["updated_at"],
                    "dry_run": int(doc.get("dry_run", False)),
                    "doc": rollout_rows.head(doc),
                },
                pk="rollout_id",
            )
            db["rollout_stages"].upsert_all(stages, pk=("rollout_id", "idx"))
            if rows:
                db.conn.executemany(_UPSERT_ROLLOUT_DEVICES, rows)

    def get_rollout(self, rollout_id: str) -> dict[str, Any] | None:
        def q(db: Any) -> tuple[list[dict[str, Any]], list[str | None]]:
            heads = list(db["rollouts"].rows_where("rollout_id = ?", [rollout_id]))
            if not heads or not rollout_rows.split_layout(json.loads(heads[0]["doc"])):
                return heads, []
            sql = "SELECT doc FROM rollout_devices WHERE rollout_id = ?"
            return heads, [r[0] for r in db.conn.execute(sql, [rollout_id])]

        heads, texts = self._read(q)
        if not heads:
            return None
        doc = json.loads(heads[0]["doc"])
        if rollout_rows.split_layout(doc):
            doc = rollout_rows.assemble(doc, texts)
        return {**heads[0], "doc": doc}

    def list_rollouts(self, states: list[str] | None = None) -> list[dict[str, Any]]:
        def q(db: Any) -> list[dict[str, Any]]:
            cols = "rollout_id, bundle_sha256, state, created_at, updated_at, dry_run"
            if states:
                marks = ",".join("?" * len(states))
                return list(
                    db["rollouts"].rows_where(
                        f"state in ({marks})",
                        states,
                        select=cols,
                        order_by=pagination.ROLLOUTS.order_by(),
                    )
                )
            return list(
                db["rollouts"].rows_where(select=cols, order_by=pagination.ROLLOUTS.order_by())
            )

        return self._read(q)

    # telemetry ----------------------------------------------------------------------
    def add_metrics(self, row: dict[str, Any]) -> None:
        with self._tx() as db:
            db["metrics"].insert(
                row, ignore=True
            )  # (device, seq) unique: QoS 1 duplicates count once

    def metrics_summary(
        self, model: str, version: str, since: float, device_ids: list[str] | None = None
    ) -> dict[str, Any]:
        def q(db: Any) -> dict[str, Any]:
            where, args = "model = ? and version = ? and ts >= ?", [model, version, since]
            if device_ids is not None:
                if not device_ids:
                    return {
                        "reports": 0,
                        "requests": 0,
                        "errors": 0,
                        "p95_ms": None,
                        "error_rate": None,
                        "accuracy": None,
                    }
                where += f" and device_id in ({','.join('?' * len(device_ids))})"
                args += device_ids
            row = db.execute(
                f"select count(*), sum(requests), sum(errors), max(p95_ms), "
                "sum(accuracy * feedback), "
                "sum(case when accuracy is not null then feedback else 0 end) "
                f"from metrics where {where}",
                args,
            ).fetchone()
            n, req, err, p95, acc_sum, fb = row
            return {
                "reports": n,
                "requests": req or 0,
                "errors": err or 0,
                "p95_ms": p95,
                "error_rate": (err or 0) / req if req else None,
                "accuracy": acc_sum / fb if fb else None,
            }

        return self._read(q)

    def metrics_by_device(
        self, model: str, version: str, since: float, device_ids: list[str]
    ) -> dict[str, dict[str, Any]]:
        """Per device: the median of its window p95s, its requests and errors since ``since``."""
        if not device_ids:
            return {}

        def q(db: Any) -> list[tuple[Any, ...]]:
            marks = ",".join("?" * len(device_ids))
            return list(
                db.execute(
                    "select device_id, p95_ms, requests, errors from metrics where model = ? "
                    f"and version = ? and ts >= ? and device_id in ({marks})",
                    [model, version, since, *device_ids],
                ).fetchall()
            )

        return fold_device_metrics(self._read(q))

    def device_metrics(self, device_id: str, limit: int = 50) -> list[dict[str, Any]]:
        return self._read(
            lambda db: list(
                db["metrics"].rows_where(
                    "device_id = ?", [device_id], order_by="ts desc, id desc", limit=limit
                )
            )
        )

    # history ------------------------------------------------------------------------
    def add_event(self, kind: str, message: str, ts: float, **data: Any) -> None:
        row = {
            "ts": ts,
            "kind": kind,
            "message": message,
            "rollout_id": data.pop("rollout_id", None),
            "device_id": data.pop("device_id", None),
            "data": _j(data),
        }
        with self._tx() as db:
            db["events"].insert(row)

    def add_events(self, rows: list[dict[str, Any]]) -> None:
        with self._tx() as db:
            db["events"].insert_all(rows)

    def events(
        self, limit: int = 100, rollout_id: str | None = None, device_id: str | None = None
    ) -> list[dict[str, Any]]:
        clauses, args = [], []
        if rollout_id:
            clauses.append("rollout_id = ?")
            args.append(rollout_id)
        if device_id:
            clauses.append("device_id = ?")
            args.append(device_id)
        where = " and ".join(clauses) or None
        rows = self._read(
            lambda db: list(db["events"].rows_where(where, args, order_by="id desc", limit=limit))
        )
        return [{**r, "data": json.loads(r["data"] or "{}")} for r in rows]

    def add_audit(
        self,
        actor: str,
        action: str,
        target: str,
        reason: str,
        ts: float,
        data: dict[str, Any] | None = None,
    ) -> None:
        with self._tx() as db:
            db["audit"].insert(
                {
                    "ts": ts,
                    "actor": actor,
                    "action": action,
                    "target": target,
                    "reason": reason,
                    "data": _j(data or {}),
                }
            )

    def add_audits(self, rows: list[dict[str, Any]]) -> None:
        with self._tx() as db:
            db["audit"].insert_all([{**r, "data": _j(r.get("data") or {})} for r in rows])

    def audit(self, limit: int = 100, target: str | None = None) -> list[dict[str, Any]]:
        where, args = ("target = ?", [target]) if target else (None, [])
        rows = self._read(
            lambda db: list(db["audit"].rows_where(where, args, order_by="id desc", limit=limit))
        )
        return [{**r, "data": json.loads(r["data"] or "{}")} for r in rows]

    # auth ---------------------------------------------------------------------------
    def add_token(self, token_hash: str, role: str, name: str, ts: float) -> None:
        with self._tx() as db:
            db["tokens"].insert(
                {"token_hash": token_hash, "role": role, "name": name, "created_at": ts}
            )

    def token_role(self, token_hash: str) -> str | None:
        rows = self._read(lambda db: list(db["tokens"].rows_where("token_hash = ?", [token_hash])))
        return str(rows[0]["role"]) if rows else None

    def list_tokens(self) -> list[dict[str, Any]]:
        return self._read(
            lambda db: list(
                db["tokens"].rows_where(
                    select="name, role, created_at", order_by="created_at, token_hash"
                )
            )
        )

    def add_user(self, username: str, password_hash: str, role: str) -> None:
        with self._tx() as db:
            db["users"].upsert(
                {"username": username, "password_hash": password_hash, "role": role}, pk="username"
            )

    def get_user(self, username: str) -> dict[str, Any] | None:
        rows = self._read(lambda db: list(db["users"].rows_where("username = ?", [username])))
        return rows[0] if rows else None

    # cursor pages and aggregate counts ------------------------------------------------
    def _page(
        self,
        table: str,
        keyset: pagination.Keyset,
        limit: int,
        cursor: str | None,
        filters: list[tuple[str, Any]],
        select: str = "*",
        before: str | None = None,
        raw: list[tuple[str, list[Any]]] | None = None,
    ) -> Page:
        pagination.check_limit(limit)
        clauses: list[str] = []
        args: list[Any] = []
        for col, value in filters:
            if isinstance(value, list):
                clauses.append(f'"{col}" in ({",".join("?" * len(value))})')
                args += value
            else:
                clauses.append(f'"{col}" = ?')
                args.append(value)
        for clause, values in raw or []:
            clauses.append(clause)
            args += values
        back = cursor is None and before is not None
        if cursor is not None or before is not None:
            clauses.append(keyset.after("?", backwards=back))
            args += keyset.decode(cursor if cursor is not None else str(before))
        where = f" where {' and '.join(clauses)}" if clauses else ""
        order = keyset.order_by(backwards=back)
        sql = f'select {select} from "{table}"{where} order by {order} limit ?'
        rows = self._read(lambda db: [dict(r) for r in db.query(sql, [*args, limit + 1])])
        if back:
            return keyset.page_before(rows, limit)
        page = keyset.page(rows, limit)
        if cursor is not None and page.items:
            return Page(page.items, page.next_cursor, keyset.encode(page.items[0]))
        return page

    def devices_page(
        self,
        limit: int = 100,
        cursor: str | None = None,
        *,
        profile: str | None = None,
        version: str | None = None,
        online: bool | None = None,
        tag: str | None = None,
        before: str | None = None,
    ) -> Page:
        filters = pagination.device_filters(profile, version, online)
        # tags are JSON lists (reported, manual): a device has a tag when one of them holds
        # the tag's JSON string (quotes included, so "lab" does not match "lab-2")
        has_tag = '(instr("tags", ?) > 0 or instr("manual_tags", ?) > 0)'
        raw = [(has_tag, [json.dumps(tag)] * 2)] if tag else []
        page = self._page("devices", pagination.DEVICES, limit, cursor, filters, "*", before, raw)
        return Page([_device(r) for r in page.items], page.next_cursor, page.prev_cursor)

    def bundles_page(self, limit: int = 100, cursor: str | None = None) -> Page:
        return self._page("bundles", pagination.BUNDLES, limit, cursor, [])

    def rollouts_page(
        self, limit: int = 100, cursor: str | None = None, states: list[str] | None = None
    ) -> Page:
        cols = "rollout_id, bundle_sha256, state, created_at, updated_at, dry_run"
        filters: list[tuple[str, Any]] = [("state", list(states))] if states else []
        return self._page("rollouts", pagination.ROLLOUTS, limit, cursor, filters, cols)

    def events_page(
        self,
        limit: int = 100,
        cursor: str | None = None,
        rollout_id: str | None = None,
        device_id: str | None = None,
    ) -> Page:
        filters: list[tuple[str, Any]] = [
            (k, v) for k, v in (("rollout_id", rollout_id), ("device_id", device_id)) if v
        ]
        page = self._page("events", pagination.EVENTS, limit, cursor, filters)
        return Page(_with_data(page.items), page.next_cursor)

    def audit_page(
        self, limit: int = 100, cursor: str | None = None, target: str | None = None
    ) -> Page:
        filters: list[tuple[str, Any]] = [("target", target)] if target else []
        page = self._page("audit", pagination.AUDIT, limit, cursor, filters)
        return Page(_with_data(page.items), page.next_cursor)

    def device_counts(self) -> dict[str, Any]:
        rows = self._read(lambda db: db.execute(migrations.DEVICE_COUNTS_SQL).fetchall())
        return pagination.counts_from_groups([tuple(r) for r in rows])

    # device identities ------------------------------------------------------------------
    def list_identities(self, device_ids: Collection[str] | None = None) -> list[dict[str, Any]]:
        if device_ids is None:
            return self._read(lambda db: list(db["device_identities"].rows))
        wanted = sorted(set(device_ids))

        def q(db: Any) -> list[dict[str, Any]]:
            out: list[dict[str, Any]] = []
            for i in range(0, len(wanted), 500):  # SQLite caps the parameters of a statement
                part = wanted[i : i + 500]
                where = f"device_id in ({','.join('?' * len(part))})"
                out += db["device_identities"].rows_where(where, part)
            return out

        return self._read(q)

    def identity_versions(self) -> dict[str, tuple[str, str]]:
        sql = "SELECT device_id, key_id, status FROM device_identities"
        rows = self._read(lambda db: list(db.conn.execute(sql)))
        return {r[0]: (r[1], r[2]) for r in rows}

    def upsert_identity(self, row: dict[str, Any]) -> None:
        with self._tx() as db:
            db["device_identities"].upsert(row, pk="device_id")

    def set_identity_x25519(self, device_id: str, x25519_key: str | None) -> bool:
        """Record a device's X25519 public key (base64); False when it has no identity."""
        with self._tx() as db:
            cur = db.execute(
                "update device_identities set x25519_key = ? where device_id = ?",
                [x25519_key, device_id],
            )
            return bool(cur.rowcount > 0)

    def delete_identity(self, device_id: str) -> None:
        with self._tx() as db:
            db.execute("delete from device_identities where device_id = ?", [device_id])

    # sessions -------------------------------------------------------------------------
    def revoke_session(self, sid: str, expires: float) -> None:
        with self._tx() as db:
            db["revoked_sessions"].upsert({"sid": sid, "expires": expires}, pk="sid")
            db.execute("delete from revoked_sessions where expires < ?", [time.time()])

    def session_revoked(self, sid: str) -> bool:
        rows = self._read(
            lambda db: db.execute("select 1 from revoked_sessions where sid = ?", [sid]).fetchall()
        )
        return bool(rows)

    # several processes ----------------------------------------------------------------
    def shared_secret(self, name: str, value: str) -> str:
        """The stored secret called ``name``; ``value`` is stored first when there is none."""
        with self._tx() as db:
            db.execute(
                "insert into shared_secrets (name, value) values (?, ?) on conflict do nothing",
                [name, value],
            )
            row = db.execute("select value from shared_secrets where name = ?", [name]).fetchone()
        return str(row[0])

    def heartbeat(self, row: dict[str, Any]) -> None:
        with self._tx() as db:
            db["fleet_processes"].upsert(row, pk="process_id")

    def list_processes(self) -> list[dict[str, Any]]:
        return self._read(
            lambda db: list(db.query("select * from fleet_processes order by process_id"))
        )

    def claim_process(self, process_id: str, by: str) -> bool:
        with self._tx() as db:
            cur = db.execute(
                "update fleet_processes set adopted_by = ? "
                "where process_id = ? and adopted_by is null",
                [by, process_id],
            )
            return bool(cur.rowcount)

    def delete_process(self, process_id: str) -> None:
        with self._tx() as db:
            db.execute("delete from fleet_processes where process_id = ?", [process_id])

    def add_rollout_action(self, rollout_id: str, action: str, actor: str, ts: float) -> int:
        with self._tx() as db:
            cur = db.execute(
                "insert into rollout_actions (rollout_id, action, actor, requested_at) "
                "values (?, ?, ?, ?)",
                [rollout_id, action, actor, ts],
            )
            return int(cur.lastrowid or 0)

    def pending_rollout_actions(self) -> list[dict[str, Any]]:
        return self._read(
            lambda db: list(
                db.query("select * from rollout_actions where done_at is null order by id")
            )
        )

    def finish_rollout_action(
        self, action_id: int, ts: float, error: str = "", status: int = 200
    ) -> None:
        with self._tx() as db:
            db.execute(
                "update rollout_actions set done_at = ?, error = ?, status = ? where id = ?",
                [ts, error, status, action_id],
            )

    def get_rollout_action(self, action_id: int) -> dict[str, Any] | None:
        rows = self._read(
            lambda db: list(db.query("select * from rollout_actions where id = ?", [action_id]))
        )
        return rows[0] if rows else None

    # release channels -----------------------------------------------------------------
    def save_channel(self, row: dict[str, Any]) -> None:
        with self._tx() as db:
            db["channels"].upsert(row, pk=("model", "channel"))

    def list_channels(self) -> list[dict[str, Any]]:
        return self._read(lambda db: list(db["channels"].rows_where(order_by="model, channel")))

    def add_channel_history(self, row: dict[str, Any]) -> None:
        with self._tx() as db:
            db["channel_history"].insert(row)

    def channel_history(
        self,
        model: str | None = None,
        channel: str | None = None,
        sha256: str | None = None,
        limit: int = 200,
    ) -> list[dict[str, Any]]:
        pairs = [(k, v) for k, v in (("model", model), ("channel", channel), ("sha256", sha256))]
        clauses = [(f'"{k}" = ?', v) for k, v in pairs if v is not None]
        where = " and ".join(c for c, _ in clauses) or None
        return self._read(
            lambda db: list(
                db["channel_history"].rows_where(
                    where, [v for _, v in clauses], order_by="id desc", limit=limit
                )
            )
        )

    def set_device_channel(self, device_id: str, **fields: Any) -> None:
        with self._tx() as db:
            db["device_channels"].upsert({"device_id": device_id, **fields}, pk="device_id")

    def device_channels(self) -> dict[str, dict[str, Any]]:
        rows = self._read(lambda db: list(db["device_channels"].rows_where()))
        return {r["device_id"]: r for r in rows}

    def archive_bundle(self, sha256: str, ts: float, actor: str, reason: str) -> None:
        row = {"sha256": sha256, "ts": ts, "actor": actor, "reason": reason}
        with self._tx() as db:
            db["archived_bundles"].upsert(row, pk="sha256")

    def archived_bundles(self) -> dict[str, dict[str, Any]]:
        rows = self._read(lambda db: list(db["archived_bundles"].rows_where()))
        return {r["sha256"]: r for r in rows}

    # artifacts ------------------------------------------------------------------------
    shares_artifacts = False  # one machine: the artifact files in data_dir are the store

    def put_artifact(self, sha256: str, size: int, parts: Iterable[bytes]) -> bool:
        """Store an artifact's bytes as numbered parts; False when it was there already.
        Its ``artifacts`` row is written last, in the same transaction."""
        if self.artifact_info(sha256) is not None:
            return False
        with self._tx() as db:
            n = 0
            for n, data in enumerate(parts, 1):
                db.execute(
                    'insert or replace into "artifact_parts" ("sha256", "part", "data") '
                    "values (?, ?, ?)",
                    [sha256, n - 1, bytes(data)],
                )
            db.execute(
                'insert or ignore into "artifacts" ("sha256", "size", "parts", "stored_at") '
                "values (?, ?, ?, ?)",
                [sha256, size, n, time.time()],
            )
        return True

    def artifact_info(self, sha256: str) -> dict[str, Any] | None:
        rows = self._read(lambda db: list(db["artifacts"].rows_where("sha256 = ?", [sha256])))
        return rows[0] if rows else None

    def artifact_part(self, sha256: str, part: int) -> bytes | None:
        row = self._read(
            lambda db: db.execute(
                'select "data" from "artifact_parts" where "sha256" = ? and "part" = ?',
                [sha256, part],
            ).fetchone()
        )
        return bytes(row[0]) if row else None

    def close(self) -> None:
        with self._lock:
            self.db.conn.close()


def _with_data(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**r, "data": json.loads(r["data"] or "{}")} for r in rows]


def fold_device_metrics(rows: Iterable[Sequence[Any]]) -> dict[str, dict[str, Any]]:
    """(device_id, p95_ms, requests, errors) rows → per device: the median window p95 (lower
    median), its requests, errors and error rate. Shared by both backends."""
    out: dict[str, dict[str, Any]] = {}
    for dev, p95, req, err in rows:
        d = out.setdefault(dev, {"p95s": [], "requests": 0, "errors": 0})
        if p95 is not None:
            d["p95s"].append(float(p95))
        d["requests"] += int(req or 0)
        d["errors"] += int(err or 0)
    for d in out.values():
        p95s = sorted(d.pop("p95s"))
        d["p95_ms"] = p95s[(len(p95s) - 1) // 2] if p95s else None
        d["error_rate"] = d["errors"] / d["requests"] if d["requests"] else None
    return out


def _device(row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    reported = json.loads(row.get("tags") or "[]")
    manual = json.loads(row.get("manual_tags") or "[]")
    out["tags"] = sorted(set(reported) | set(manual))
    out["manual_tags"] = manual
    out["online"] = bool(row.get("online"))
    return out
