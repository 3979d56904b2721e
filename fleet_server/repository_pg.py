"""The registry on PostgreSQL: :class:`PostgresRepository`, the same contract as SQLite's.

Selected by ``[registry] url = "postgresql://user:password@host:5432/db"`` in fleet.toml
(:func:`.repository.open_repository`). Uses psycopg 3 with a ``psycopg_pool`` connection
pool (the ``postgres`` extra: ``pip install 'edgefleet[postgres]'``); both are imported
when a repository is opened, never by ``import fleet_server``.

Why two implementations under one contract suite, and not one on SQLAlchemy Core +
Alembic: the SQLite registry is the one-machine default and its hot paths (device state,
metrics, rollout saves) are measured; it stays on the stdlib ``sqlite3`` + sqlite-utils it
has, with no new dependency and no extra layer per call. The interface is ~30 small
methods, so a second implementation is a few hundred lines of plain SQL, and
``tests/fleet_server/test_repository_contract.py`` runs every method on both backends
(against a real PostgreSQL 15), which is what keeps them equal. Migrations are data
(:mod:`.migrations`, one numbered list per backend) applied by ~20 lines per backend,
instead of an Alembic environment that would have to drive SQLite as well.

Errors: every psycopg / pool error is translated into :class:`~.errors.StorageError` in
one place, :func:`_translate`; messages never carry the URL's password.

Connections: a pool of ``pool_size`` connections (at least one kept open), each checked
before it is handed out (:func:`_check_connection`: a round trip only when the socket says
the server ended the session), so a restarted PostgreSQL costs no failed call once it is back;
while it is down a call fails with :class:`~.errors.StorageError` after at most 10 s.
Each method runs in one transaction on one pooled connection.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from . import migrations, pagination, rollout_rows
from .errors import StorageError
from .pagination import Page
from .repository import _LATEST_HISTORY_SQL, _device, _j, _with_data, fold_device_metrics

# pg_advisory_xact_lock key taken while migrating ("edgefleet-migrate"); other users of
# advisory locks on the same database must pick different keys.
MIGRATION_LOCK = 0x6564_6765_6D69_67


# _insert_many writes a batch of at least this many rows with COPY instead of INSERTs
COPY_FROM_ROWS = 8


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for messages and logs)."""
    url = re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)
    return re.sub(r"(password=)\S+", r"\1***", url)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


@contextmanager
def _translate(what: str) -> Iterator[None]:
    """The one place psycopg and pool errors become :class:`StorageError`."""
    import psycopg

    try:
        yield
    except psycopg.Error as exc:  # PoolTimeout and PoolClosed derive from it too
        raise StorageError(f"{what}: {redact(_one_line(exc))}") from None


def open_pool(url: str, pool_size: int = 10, timeout_s: float = 10.0) -> Any:
    """An open ``psycopg_pool.ConnectionPool`` on ``url`` whose connections return dict rows."""
    try:
        import psycopg  # noqa: F401
        from psycopg.rows import dict_row
        from psycopg_pool import ConnectionPool
    except ImportError:
        raise StorageError(
            "registry.url names PostgreSQL but psycopg is not installed: "
            "pip install 'edgefleet[postgres]'"
        ) from None
    with _translate(f"cannot reach the registry at {redact(url)}"):
        pool = ConnectionPool(
            url,
            min_size=1,
            max_size=max(1, pool_size),
            kwargs={"row_factory": dict_row, "connect_timeout": max(1, int(timeout_s))},
            check=_check_connection,
            timeout=timeout_s,  # a call waits this long for a connection, then StorageError
            name="edgefleet-registry",
            open=False,
        )
        try:
            pool.open(wait=True, timeout=timeout_s)
        except BaseException:
            pool.close()
            raise
    return pool


def _check_connection(conn: Any) -> None:
    """The pool's check before it hands a connection out, without a round trip for a
    healthy one: an idle connection has nothing to read, so a readable socket means the
    server ended the session (a restart, an administrator) or closed it, and only then is
    the connection pinged — the ping fails and the pool replaces it. Every call used to pay
    a round trip (``ConnectionPool.check_connection``) for this."""
    import select

    from psycopg_pool import ConnectionPool

    try:
        readable = conn.closed or bool(select.select([conn.fileno()], [], [], 0)[0])
    except (OSError, ValueError):  # no socket any more
        readable = True
    if readable:
        ConnectionPool.check_connection(conn)


def migrate(pool: Any) -> int:
    """Apply the pending :data:`.migrations.POSTGRES` entries; returns the schema version.

    All pending migrations run in one transaction holding an advisory lock, so processes
    that start together migrate once and never see half a schema.
    """
    with _translate("registry: migration failed"), pool.connection() as conn, conn.transaction():
        conn.execute("select pg_advisory_xact_lock(%s)", [MIGRATION_LOCK])
        conn.execute(migrations.SCHEMA_VERSION_DDL.format(real="DOUBLE PRECISION"))
        row = conn.execute("select coalesce(max(version), 0) as v from schema_version").fetchone()
        current = int(row["v"])
        if current > migrations.latest(migrations.POSTGRES):
            raise StorageError(
                f"registry has schema version {current}; this edgefleet knows up to "
                f"{migrations.latest(migrations.POSTGRES)}"
            )
        for step in migrations.pending(migrations.POSTGRES, current):
            for statement in step.statements:
                conn.execute(statement)
            conn.execute(
                "insert into schema_version (version, name, applied_at) values (%s, %s, %s)",
                [step.version, step.name, time.time()],
            )
            current = step.version
    return current


def _value(v: Any) -> Any:
    """Integer columns hold 0/1 for flags (as on SQLite): PostgreSQL will not cast a bool."""
    return int(v) if isinstance(v, bool) else v


def _q(name: str) -> str:
    return f'"{name}"'


class PostgresRepository:
    def __init__(
        self, url: str, pool_size: int = 10, *, pool: Any = None, timeout_s: float = 10.0
    ) -> None:
        self.where = redact(url)  # for messages: never the password
        self.pool = pool if pool is not None else open_pool(url, pool_size, timeout_s)
        self._sql: dict[tuple[str, tuple[str, ...], tuple[str, ...]], str] = {}
        try:
            self._version = migrate(self.pool)
            self._columns = self._load_columns()
        except BaseException:
            if pool is None:
                self.pool.close()
            raise

    # plumbing -----------------------------------------------------------------------
    @contextmanager
    def _conn(self) -> Iterator[Any]:
        """One pooled connection, one transaction (committed on success)."""
        with _translate("registry"), self.pool.connection() as conn:
            yield conn

    def _all(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        with self._conn() as conn:
            return list(conn.execute(sql, list(args)).fetchall())

    def _one(self, sql: str, args: Sequence[Any] = ()) -> dict[str, Any] | None:
        rows = self._all(sql, args)
        return rows[0] if rows else None

    def _load_columns(self) -> dict[str, frozenset[str]]:
        rows = self._all(
            "select table_name, column_name from information_schema.columns "
            "where table_schema = current_schema()"
        )
        out: dict[str, set[str]] = {}
        for r in rows:
            out.setdefault(r["table_name"], set()).add(r["column_name"])
        return {k: frozenset(v) for k, v in out.items()}

    def _check_columns(self, table: str, names: Any) -> None:
        unknown = sorted(set(names) - self._columns.get(table, frozenset()))
        if unknown:
            raise StorageError(f"registry: table {table} has no column {', '.join(unknown)}")

    def _upsert_sql(self, table: str, cols: Sequence[str], pk: Sequence[str]) -> str:
        key = (table, tuple(cols), tuple(pk))
        sql = self._sql.get(key)
        if sql is None:
            sql = self._sql[key] = self._build_upsert(table, cols, pk)
        return sql

    def _build_upsert(self, table: str, cols: Sequence[str], pk: Sequence[str]) -> str:
        self._check_columns(table, cols)
        names = ", ".join(_q(c) for c in cols)
        marks = ", ".join(["%s"] * len(cols))
        updates = [f"{_q(c)} = excluded.{_q(c)}" for c in cols if c not in pk]
        action = f"do update set {', '.join(updates)}" if updates else "do nothing"
        conflict = ", ".join(_q(c) for c in pk)
        return (
            f"insert into {_q(table)} ({names}) values ({marks}) on conflict ({conflict}) {action}"
        )

    def _insert_sql(self, table: str, cols: Sequence[str], ignore: bool = False) -> str:
        self._check_columns(table, cols)
        names = ", ".join(_q(c) for c in cols)
        marks = ", ".join(["%s"] * len(cols))
        tail = " on conflict do nothing" if ignore else ""
        return f"insert into {_q(table)} ({names}) values ({marks}){tail}"

    def schema_version(self) -> int:
        row = self._one("select coalesce(max(version), 0) as v from schema_version")
        return int(row["v"]) if row else 0

    # bundles ------------------------------------------------------------------------
    def add_bundle(self, row: dict[str, Any]) -> None:
        cols = list(row)
        with self._conn() as conn:
            conn.execute(
                self._upsert_sql("bundles", cols, ["sha256"]), [_value(row[c]) for c in cols]
            )

    def get_bundle(self, sha256: str) -> dict[str, Any] | None:
        return self._one("select * from bundles where sha256 = %s", [sha256])

    def list_bundles(self) -> list[dict[str, Any]]:
        return self._all(f"select * from bundles order by {pagination.BUNDLES.order_by()}")

    # devices ------------------------------------------------------------------------
    def upsert_device(self, device_id: str, **fields: Any) -> None:
        for k in ("tags", "manual_tags"):
            if k in fields and not isinstance(fields[k], str):
                fields[k] = _j(sorted(fields[k]))
        row = {"device_id": device_id, **fields}
        cols = list(row)
        with self._conn() as conn:
            conn.execute(
                self._upsert_sql("devices", cols, ["device_id"]), [_value(row[c]) for c in cols]
            )

    def get_device(self, device_id: str) -> dict[str, Any] | None:
        row = self._one("select * from devices where device_id = %s", [device_id])
        return _device(row) if row else None

    def list_devices(self) -> list[dict[str, Any]]:
        return [_device(r) for r in self._all("select * from devices order by device_id")]

    def add_device_history(
        self, device_id: str, ts: float, model: str, version: str, release: int
    ) -> None:
        with self._conn() as conn:
            conn.execute(
                "insert into device_history (device_id, ts, model, version, release) "
                "values (%s, %s, %s, %s, %s)",
                [device_id, ts, model, version, release],
            )

    def latest_history(self) -> dict[str, tuple[str, str]]:
        rows = self._all(_LATEST_HISTORY_SQL)
        return {r["device_id"]: (r["model"], r["version"]) for r in rows}

    def device_history(self, device_id: str, limit: int = 50) -> list[dict[str, Any]]:
        return self._all(
            "select * from device_history where device_id = %s order by ts desc, id desc limit %s",
            [device_id, limit],
        )

    # rollouts -----------------------------------------------------------------------
    def save_rollout(
        self, doc: dict[str, Any], bundle_sha256: str, devices: Collection[str] | None = None
    ) -> None:
        rid = doc["rollout_id"]
        head = {
            "rollout_id": rid,
            "bundle_sha256": bundle_sha256,
            "state": doc["state"],
            "created_at": doc["created_at"],
            "updated_at": doc["updated_at"],
            "dry_run": int(doc.get("dry_run", False)),
            "doc": rollout_rows.head(doc),
        }
        stage_cols = ["rollout_id", "idx", "state", "target", "devices"]
        stage_cols += ["started_at", "finished_at"]
        stages = [
            (
                rid,
                s["index"],
                s["state"],
                s["target"],
                len(s["devices"]),
                s["started_at"],
                s["finished_at"],
            )
            for s in doc["stages"]
        ]
        rows = rollout_rows.device_rows(doc, devices)
        dev_cols, dev_pk = list(rollout_rows.DEVICE_COLUMNS), ["rollout_id", "device_id"]
        with self._conn() as conn:
            conn.execute(
                self._upsert_sql("rollouts", list(head), ["rollout_id"]), list(head.values())
            )
            with conn.cursor() as cur:
                if stages:
                    cur.executemany(
                        self._upsert_sql("rollout_stages", stage_cols, ["rollout_id", "idx"]),
                        stages,
                    )
                if rows:
                    cur.executemany(self._upsert_sql("rollout_devices", dev_cols, dev_pk), rows)

    def get_rollout(self, rollout_id: str) -> dict[str, Any] | None:
        row = self._one("select * from rollouts where rollout_id = %s", [rollout_id])
        if row is None:
            return None
        doc = json.loads(row["doc"])
        if rollout_rows.split_layout(doc):
            texts = self._all("select doc from rollout_devices where rollout_id = %s", [rollout_id])
            doc = rollout_rows.assemble(doc, (t["doc"] for t in texts))
        return {**row, "doc": doc}

    def list_rollouts(self, states: list[str] | None = None) -> list[dict[str, Any]]:
        cols = "rollout_id, bundle_sha256, state, created_at, updated_at, dry_run"
        order = pagination.ROLLOUTS.order_by()
        if states:
            return self._all(
                f"select {cols} from rollouts where state = any(%s) order by {order}",
                [list(states)],
            )
        return self._all(f"select {cols} from rollouts order by {order}")

    # telemetry ----------------------------------------------------------------------
    def add_metrics(self, row: dict[str, Any]) -> None:
        cols = list(row)
        with self._conn() as conn:  # (device, seq) unique: QoS 1 duplicates count once
            conn.execute(
                self._insert_sql("metrics", cols, ignore=True), [_value(row[c]) for c in cols]
            )

    def metrics_summary(
        self, model: str, version: str, since: float, device_ids: list[str] | None = None
    ) -> dict[str, Any]:
        where, args = "model = %s and version = %s and ts >= %s", [model, version, since]
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
            where += " and device_id = any(%s)"
            args.append(list(device_ids))
        row = self._one(
            "select count(*) as n, sum(requests)::bigint as req, sum(errors)::bigint as err, "
            "max(p95_ms) as p95, sum(accuracy * feedback) as acc_sum, "
            "sum(case when accuracy is not null then feedback else 0 end)::bigint as fb "
            f"from metrics where {where}",
            args,
        )
        assert row is not None
        req, err, fb = row["req"], row["err"], row["fb"]
        return {
            "reports": row["n"],
            "requests": req or 0,
            "errors": err or 0,
            "p95_ms": row["p95"],
            "error_rate": (err or 0) / req if req else None,
            "accuracy": row["acc_sum"] / fb if fb else None,
        }

    def metrics_by_device(
        self, model: str, version: str, since: float, device_ids: list[str]
    ) -> dict[str, dict[str, Any]]:
        if not device_ids:
            return {}
        rows = self._all(
            "select device_id, p95_ms, requests, errors from metrics where model = %s "
            "and version = %s and ts >= %s and device_id = any(%s)",
            [model, version, since, list(device_ids)],
        )
        return fold_device_metrics(
            (r["device_id"], r["p95_ms"], r["requests"], r["errors"]) for r in rows
        )

    def device_metrics(self, device_id: str, limit: int = 50) -> list[dict[str, Any]]:
        return self._all(
            "select * from metrics where device_id = %s order by ts desc, id desc limit %s",
            [device_id, limit],
        )

    # history ------------------------------------------------------------------------
    def add_event(self, kind: str, message: str, ts: float, **data: Any) -> None:
        rollout_id = data.pop("rollout_id", None)
        device_id = data.pop("device_id", None)
        self.add_events(
            [
                {
                    "ts": ts,
                    "kind": kind,
                    "message": message,
                    "rollout_id": rollout_id,
                    "device_id": device_id,
                    "data": _j(data),
                }
            ]
        )

    def add_events(self, rows: list[dict[str, Any]]) -> None:
        self._insert_many("events", [{**r, "data": _text(r.get("data"))} for r in rows])

    def _insert_many(self, table: str, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        groups: dict[tuple[str, ...], list[list[Any]]] = {}
        for r in rows:
            groups.setdefault(tuple(r), []).append([_value(v) for v in r.values()])
        with self._conn() as conn, conn.cursor() as cur:
            for cols, values in groups.items():
                if len(values) < COPY_FROM_ROWS:
                    cur.executemany(self._insert_sql(table, cols), values)
                    continue
                # a tick's audit trail and events: COPY costs a fraction of an INSERT per row
                self._check_columns(table, cols)
                names = ", ".join(_q(c) for c in cols)
                with cur.copy(f"copy {_q(table)} ({names}) from stdin") as copy:
                    for v in values:
                        copy.write_row(v)

    def events(
        self, limit: int = 100, rollout_id: str | None = None, device_id: str | None = None
    ) -> list[dict[str, Any]]:
        clauses, args = _filters([("rollout_id", rollout_id), ("device_id", device_id)])
        rows = self._all(f"select * from events{clauses} order by id desc limit %s", [*args, limit])
        return _with_data(rows)

    def add_audit(
        self,
        actor: str,
        action: str,
        target: str,
        reason: str,
        ts: float,
        data: dict[str, Any] | None = None,
    ) -> None:
        self.add_audits(
            [
                {
                    "ts": ts,
                    "actor": actor,
                    "action": action,
                    "target": target,
                    "reason": reason,
                    "data": data,
                }
            ]
        )

    def add_audits(self, rows: list[dict[str, Any]]) -> None:
        self._insert_many("audit", [{**r, "data": _j(r.get("data") or {})} for r in rows])

    def audit(self, limit: int = 100, target: str | None = None) -> list[dict[str, Any]]:
        clauses, args = _filters([("target", target)])
        rows = self._all(f"select * from audit{clauses} order by id desc limit %s", [*args, limit])
        return _with_data(rows)

    # auth ---------------------------------------------------------------------------
    def add_token(self, token_hash: str, role: str, name: str, ts: float) -> None:
        with self._conn() as conn:
            conn.execute(
                "insert into tokens (token_hash, role, name, created_at) values (%s, %s, %s, %s)",
                [token_hash, role, name, ts],
            )

    def token_role(self, token_hash: str) -> str | None:
        row = self._one("select role from tokens where token_hash = %s", [token_hash])
        return str(row["role"]) if row else None

    def list_tokens(self) -> list[dict[str, Any]]:
        return self._all(
            "select name, role, created_at from tokens order by created_at, token_hash"
        )

    def add_user(self, username: str, password_hash: str, role: str) -> None:
        with self._conn() as conn:
            conn.execute(
                self._upsert_sql("users", ["username", "password_hash", "role"], ["username"]),
                [username, password_hash, role],
            )

    def get_user(self, username: str) -> dict[str, Any] | None:
        return self._one("select * from users where username = %s", [username])

    # cursor pages and aggregate counts ------------------------------------------------
    # device identities ------------------------------------------------------------------
    def list_identities(self, device_ids: Collection[str] | None = None) -> list[dict[str, Any]]:
        if device_ids is None:
            return self._all("select * from device_identities order by device_id")
        return self._all(
            "select * from device_identities where device_id = any(%s) order by device_id",
            [sorted(set(device_ids))],
        )

    def identity_versions(self) -> dict[str, tuple[str, str]]:
        from psycopg.rows import tuple_row

        with self._conn() as conn, conn.cursor(row_factory=tuple_row) as cur:
            cur.execute("select device_id, key_id, status from device_identities")
            return {r[0]: (r[1], r[2]) for r in cur.fetchall()}

    def upsert_identity(self, row: dict[str, Any]) -> None:
        cols = list(row)
        with self._conn() as conn:
            conn.execute(
                self._upsert_sql("device_identities", cols, ["device_id"]),
                [_value(row[c]) for c in cols],
            )

    def set_identity_x25519(self, device_id: str, x25519_key: str | None) -> bool:
        """Record a device's X25519 public key (base64); False when it has no identity."""
        with self._conn() as conn:
            cur = conn.execute(
                "update device_identities set x25519_key = %s where device_id = %s",
                [x25519_key, device_id],
            )
            return bool(cur.rowcount > 0)

    def delete_identity(self, device_id: str) -> None:
        with self._conn() as conn:
            conn.execute("delete from device_identities where device_id = %s", [device_id])

    # sessions -------------------------------------------------------------------------
    def revoke_session(self, sid: str, expires: float) -> None:
        with self._conn() as conn:
            conn.execute(
                self._upsert_sql("revoked_sessions", ["sid", "expires"], ["sid"]), [sid, expires]
            )
            conn.execute("delete from revoked_sessions where expires < %s", [time.time()])

    def session_revoked(self, sid: str) -> bool:
        return self._one("select 1 as x from revoked_sessions where sid = %s", [sid]) is not None

    # several processes ----------------------------------------------------------------
    def shared_secret(self, name: str, value: str) -> str:
        with self._conn() as conn:
            conn.execute(
                "insert into shared_secrets (name, value) values (%s, %s) on conflict do nothing",
                [name, value],
            )
            row = conn.execute(
                "select value from shared_secrets where name = %s", [name]
            ).fetchone()
        return str(row["value"])

    def heartbeat(self, row: dict[str, Any]) -> None:
        cols = list(row)
        with self._conn() as conn:
            conn.execute(
                self._upsert_sql("fleet_processes", cols, ["process_id"]),
                [_value(row[c]) for c in cols],
            )

    def list_processes(self) -> list[dict[str, Any]]:
        return self._all("select * from fleet_processes order by process_id")

    def claim_process(self, process_id: str, by: str) -> bool:
        with self._conn() as conn:
            cur = conn.execute(
                "update fleet_processes set adopted_by = %s "
                "where process_id = %s and adopted_by is null",
                [by, process_id],
            )
            return bool(cur.rowcount)

    def delete_process(self, process_id: str) -> None:
        with self._conn() as conn:
            conn.execute("delete from fleet_processes where process_id = %s", [process_id])

    def add_rollout_action(self, rollout_id: str, action: str, actor: str, ts: float) -> int:
        with self._conn() as conn:
            row = conn.execute(
                "insert into rollout_actions (rollout_id, action, actor, requested_at) "
                "values (%s, %s, %s, %s) returning id",
                [rollout_id, action, actor, ts],
            ).fetchone()
        return int(row["id"])

    def pending_rollout_actions(self) -> list[dict[str, Any]]:
        return self._all("select * from rollout_actions where done_at is null order by id")

    def finish_rollout_action(
        self, action_id: int, ts: float, error: str = "", status: int = 200
    ) -> None:
        with self._conn() as conn:
            conn.execute(
                "update rollout_actions set done_at = %s, error = %s, status = %s where id = %s",
                [ts, error, status, action_id],
            )

    def get_rollout_action(self, action_id: int) -> dict[str, Any] | None:
        return self._one("select * from rollout_actions where id = %s", [action_id])

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
        clauses, args = _filters(filters)
        for clause, values in raw or []:
            clauses += (" and " if clauses else " where ") + clause
            args += values
        back = cursor is None and before is not None
        if cursor is not None or before is not None:
            clauses += (" and " if clauses else " where ") + keyset.after("%s", backwards=back)
            args += keyset.decode(cursor if cursor is not None else str(before))
        order = keyset.order_by(backwards=back)
        rows = self._all(
            f"select {select} from {_q(table)}{clauses} order by {order} limit %s",
            [*args, limit + 1],
        )
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
        has_tag = '(strpos("tags", %s) > 0 or strpos("manual_tags", %s) > 0)'
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
        filters = [("rollout_id", rollout_id), ("device_id", device_id)]
        page = self._page("events", pagination.EVENTS, limit, cursor, filters)
        return Page(_with_data(page.items), page.next_cursor)

    def audit_page(
        self, limit: int = 100, cursor: str | None = None, target: str | None = None
    ) -> Page:
        page = self._page("audit", pagination.AUDIT, limit, cursor, [("target", target)])
        return Page(_with_data(page.items), page.next_cursor)

    def device_counts(self) -> dict[str, Any]:
        rows = self._all(migrations.DEVICE_COUNTS_SQL)
        return pagination.counts_from_groups(
            [(r["profile"], r["model"], r["version"], r["online"], r["n"]) for r in rows]
        )

    # release channels -----------------------------------------------------------------
    def save_channel(self, row: dict[str, Any]) -> None:
        cols = list(row)
        with self._conn() as conn:
            conn.execute(
                self._upsert_sql("channels", cols, ["model", "channel"]),
                [_value(row[c]) for c in cols],
            )

    def list_channels(self) -> list[dict[str, Any]]:
        return self._all("select * from channels order by model, channel")

    def add_channel_history(self, row: dict[str, Any]) -> None:
        cols = list(row)
        with self._conn() as conn:
            conn.execute(self._insert_sql("channel_history", cols), [row[c] for c in cols])

    def channel_history(
        self,
        model: str | None = None,
        channel: str | None = None,
        sha256: str | None = None,
        limit: int = 200,
    ) -> list[dict[str, Any]]:
        where, args = _filters([("model", model), ("channel", channel), ("sha256", sha256)])
        return self._all(
            f"select * from channel_history{where} order by id desc limit %s", [*args, limit]
        )

    def set_device_channel(self, device_id: str, **fields: Any) -> None:
        row = {"device_id": device_id, **fields}
        cols = list(row)
        with self._conn() as conn:
            conn.execute(
                self._upsert_sql("device_channels", cols, ["device_id"]), [row[c] for c in cols]
            )

    def device_channels(self) -> dict[str, dict[str, Any]]:
        return {r["device_id"]: r for r in self._all("select * from device_channels")}

    def archive_bundle(self, sha256: str, ts: float, actor: str, reason: str) -> None:
        with self._conn() as conn:
            conn.execute(
                self._upsert_sql(
                    "archived_bundles", ["sha256", "ts", "actor", "reason"], ["sha256"]
                ),
                [sha256, ts, actor, reason],
            )

    def archived_bundles(self) -> dict[str, dict[str, Any]]:
        return {r["sha256"]: r for r in self._all("select * from archived_bundles")}

    # artifacts ------------------------------------------------------------------------
    shares_artifacts = True  # every server process on this database reads them

    def put_artifact(self, sha256: str, size: int, parts: Iterable[bytes]) -> bool:
        """Store an artifact's bytes as numbered parts; False when it was there already.
        Its ``artifacts`` row is written last, in the same transaction, so another process
        sees the whole artifact or none of it."""
        if self.artifact_info(sha256) is not None:
            return False
        with self._conn() as conn:
            n = 0
            for n, data in enumerate(parts, 1):
                conn.execute(
                    'insert into "artifact_parts" ("sha256", "part", "data") values (%s, %s, %s) '
                    'on conflict ("sha256", "part") do update set "data" = excluded."data"',
                    [sha256, n - 1, bytes(data)],
                )
            cur = conn.execute(
                'insert into "artifacts" ("sha256", "size", "parts", "stored_at") '
                "values (%s, %s, %s, %s) on conflict do nothing",
                [sha256, size, n, time.time()],
            )
            return bool(cur.rowcount)

    def artifact_info(self, sha256: str) -> dict[str, Any] | None:
        return self._one("select * from artifacts where sha256 = %s", [sha256])

    def artifact_part(self, sha256: str, part: int) -> bytes | None:
        row = self._one(
            'select "data" from "artifact_parts" where "sha256" = %s and "part" = %s',
            [sha256, part],
        )
        return bytes(row["data"]) if row else None

    def close(self) -> None:
        self.pool.close()


def _filters(pairs: list[tuple[str, Any]]) -> tuple[str, list[Any]]:
    """`` where a = %s and b = any(%s)`` for the pairs whose value is set."""
    clauses: list[str] = []
    args: list[Any] = []
    for col, value in pairs:
        if value is None or value == "":
            continue
        if isinstance(value, list):
            clauses.append(f"{_q(col)} = any(%s)")
        else:
            clauses.append(f"{_q(col)} = %s")
        args.append(value)
    return (" where " + " and ".join(clauses) if clauses else ""), args


def _text(value: Any) -> Any:
    """Event rows may carry ``data`` as JSON text already (the service's buffer) or as an
    object (sqlite-utils stores those as JSON; do the same)."""
    return value if value is None or isinstance(value, str) else _j(value)
