"""Store-and-forward outbox: everything that must reach the server goes through SQLite.

Rules (docs/agent.md says the same for operators):

- ``put`` commits a message before it returns (WAL, ``synchronous=NORMAL``: a committed
  message survives a process crash; a power cut may lose the last few milliseconds).
- ``flush`` publishes pending messages in insertion order at QoS 1 and deletes one only
  after the broker acknowledged it (``Delivery.wait``). Delivery is *at least once*: a
  crash between the ack and the delete re-sends it; the server dedupes sketches by
  (device, model version, window, seq) and status by (command id, seq).
- The outbox is bounded in bytes (payload bytes). When a new message pushes it over:
  1. old sketch windows of the same model version are merged pairwise (oldest first) into
     one coarser window (``merged_windows`` summed, window bounds widened, smallest seq
     kept) — sketches are never simply dropped;
  2. only when no model version has two sketch windows left are metrics thinned: every
     second metrics report is dropped, oldest first (metrics are periodic snapshots; a
     thinner series keeps its shape);
  3. command status messages are never dropped: they are small and a rollout waits on them.
  So the bound can be exceeded by status messages plus one sketch window per model version.
- A full disk (``SQLITE_FULL`` / ``ENOSPC``) is caught: the outbox first makes room as
  above and retries once; if that fails the message is counted in ``dropped_disk_full``,
  ``conditions()`` reports ``disk_full`` and the caller carries on (serving never stops).

The same database keeps the per-device sequence counters (:meth:`next_seq`) and the ledger
of command ids already handled (:meth:`command_seen` / :meth:`record_command`), so a copy of
a command (the fleet server's resend after a reconnect, a broker's redelivery) does not
install twice, also after a restart.
"""

from __future__ import annotations

import errno
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Union

from protocol.errors import ProtocolError
from protocol.files import private_dir, private_file
from protocol.messages import SketchReport, decode
from protocol.sketches import merge
from protocol.transport import Transport

log = logging.getLogger(__name__)

KINDS = ("status", "sketch", "metrics", "other")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    size INTEGER NOT NULL,
    created REAL NOT NULL,
    group_key TEXT,
    window_start REAL
);
CREATE INDEX IF NOT EXISTS outbox_kind ON outbox(kind, group_key, window_start);
CREATE TABLE IF NOT EXISTS seq (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS commands (
    command_id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    last_status BLOB,
    ts REAL NOT NULL
);
"""


class DiskFull(Exception):
    """Internal: the database could not grow."""


def is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    if isinstance(exc, sqlite3.DatabaseError):
        code = getattr(exc, "sqlite_errorcode", None)
        return code == sqlite3.SQLITE_FULL or "full" in str(exc).lower()
    return False


@dataclass(frozen=True)
class Entry:
    id: int
    kind: str
    topic: str
    payload: bytes


@dataclass
class OutboxStats:
    merged: int = 0  # pairwise sketch merges done to stay under the bound
    thinned: int = 0  # metrics reports dropped to stay under the bound
    dropped_disk_full: int = 0  # messages refused because the disk was full
    published: int = 0  # messages acknowledged by the broker and deleted


class Outbox:
    """SQLite outbox at ``path`` bounded by ``max_bytes`` of payload."""

    def __init__(
        self,
        path: Union[str, Path],
        max_bytes: int,
        *,
        max_page_count: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.clock = clock
        self.stats = OutboxStats()
        self.disk_full = False
        self._mem_seq: dict[str, int] = {}
        self._drops_polled = 0
        self._inflight: set[int] = set()  # being published: never merged under flush's feet
        self._lock = threading.RLock()
        private_dir(self.path.parent)
        private_file(self.path)  # SQLite gives its -wal/-shm files the same mode
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        if max_page_count is not None:  # tests: make the database "full" deterministically
            self._db.execute(f"PRAGMA max_page_count={int(max_page_count)}")

    # -- writing -------------------------------------------------------------------------
    def put(
        self,
        kind: str,
        topic: str,
        payload: bytes,
        *,
        group_key: str | None = None,
        window_start: float | None = None,
    ) -> bool:
        """Queue one message. False (and counted) when the disk is full even after making room."""
        if kind not in KINDS:
            raise ValueError(f"unknown outbox kind {kind!r}")
        row = (kind, topic, payload, len(payload), self.clock(), group_key, window_start)
        with self._lock:
            for attempt in (0, 1):
                try:
                    self._insert(row)
                    break
                except DiskFull:
                    if attempt == 0:
                        self._make_room(shrink_to=self.size_bytes() // 2)
                        continue
                    self.stats.dropped_disk_full += 1
                    self.disk_full = True
                    log.warning("outbox: disk full, dropped a %s message", kind)
                    return False
            self.disk_full = False
            if self.size_bytes() > self.max_bytes:
                self._make_room(shrink_to=self.max_bytes)
            return True

    def put_message(self, kind: str, topic: str, message: Any) -> bool:
        """Queue a pydantic message (a SketchReport keeps its merge key)."""
        if isinstance(message, SketchReport):
            return self.put(
                "sketch",
                topic,
                message.to_json(),
                group_key=f"{message.model.name}@{message.model.version}",
                window_start=message.window_start.timestamp(),
            )
        return self.put(kind, topic, message.to_json())

    def _insert(self, row: tuple[Any, ...]) -> None:
        try:
            self._db.execute(
                "INSERT INTO outbox(kind, topic, payload, size, created, group_key, window_start)"
                " VALUES (?,?,?,?,?,?,?)",
                row,
            )
        except (sqlite3.DatabaseError, OSError) as exc:
            if is_disk_full(exc):
                raise DiskFull() from exc
            raise

    # -- bounding ------------------------------------------------------------------------
    def _make_room(self, shrink_to: int) -> None:
        while self.size_bytes() > shrink_to:
            if self._merge_oldest_sketches():
                continue
            if self._thin_metrics():
                continue
            break

    def _merge_oldest_sketches(self) -> bool:
        """Merge the two oldest windows of the model version with the oldest mergeable pair."""
        rows = self._db.execute(
            "SELECT id, group_key FROM outbox WHERE kind='sketch' ORDER BY window_start, id"
        ).fetchall()
        groups: dict[str, list[int]] = {}
        for rid, key in rows:
            if rid not in self._inflight:
                groups.setdefault(key, []).append(rid)
        candidates = [ids[:2] for ids in groups.values() if len(ids) > 1]
        if not candidates:
            return False
        ids = min(candidates, key=lambda c: min(c))
        pair = [
            self._db.execute("SELECT id, topic, payload FROM outbox WHERE id=?", (i,)).fetchone()
            for i in ids
        ]
        try:
            a, b = (decode(SketchReport, p) for _, _, p in pair)
            merged = _merge_reports(a, b)
        except ProtocolError as exc:  # a corrupt row: drop the older one rather than loop
            log.error("outbox: cannot merge sketch rows %s: %s", [r[0] for r in pair], exc)
            self._db.execute("DELETE FROM outbox WHERE id=?", (pair[0][0],))
            return True
        payload = merged.to_json()
        older = self._db.execute(
            "SELECT kind, topic, created, group_key FROM outbox WHERE id=?", (pair[0][0],)
        ).fetchone()
        try:
            # Delete both, then insert the merged window under the older id: the pages the
            # two rows free are reused, so this works on a full disk too.
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("DELETE FROM outbox WHERE id=?", [(pair[0][0],), (pair[1][0],)])
            self._db.execute(
                "INSERT INTO outbox(id, kind, topic, payload, size, created, group_key,"
                " window_start)"
                " VALUES (?,?,?,?,?,?,?,?)",
                (
                    pair[0][0],
                    older[0],
                    older[1],
                    payload,
                    len(payload),
                    older[2],
                    older[3],
                    merged.window_start.timestamp(),
                ),
            )
            self._db.execute("COMMIT")
        except (sqlite3.DatabaseError, OSError) as exc:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            if not is_disk_full(exc):
                raise
            # Not even room to rewrite: keep both windows, free space by thinning instead.
            return False
        self.stats.merged += 1
        return True

    def _thin_metrics(self) -> bool:
        ids = [
            r[0] for r in self._db.execute("SELECT id FROM outbox WHERE kind='metrics' ORDER BY id")
        ]
        if not ids:
            return False
        # Drop every second report, oldest first; always drop at least one, never the newest
        # unless it is the only one.
        drop = ids[:-1][::2] or ids[:1]
        self._db.executemany("DELETE FROM outbox WHERE id=?", [(i,) for i in drop])
        self.stats.thinned += len(drop)
        return True

    # -- reading / delivering ------------------------------------------------------------
    def pending(self, limit: int = 100) -> list[Entry]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, kind, topic, payload FROM outbox ORDER BY id LIMIT ?", (limit,)
            ).fetchall()
        return [Entry(int(i), k, t, bytes(p)) for i, k, t, p in rows]

    def delete(self, ids: list[int]) -> None:
        with self._lock:
            self._db.executemany("DELETE FROM outbox WHERE id=?", [(i,) for i in ids])

    def flush(self, transport: Transport, *, timeout: float = 5.0, batch: int = 50) -> int:
        """Publish pending messages in order; delete each once acknowledged. Returns how many."""
        sent = 0
        while transport.is_connected():
            with self._lock:  # read and mark in one step: a merge must not slip in between
                entries = self.pending(batch)
                self._inflight = {e.id for e in entries}
            if not entries:
                break
            try:
                acked = self._publish_batch(transport, entries, timeout)
            finally:
                with self._lock:
                    self._inflight = set()
            self.delete(acked)
            sent += len(acked)
            self.stats.published += len(acked)
            if len(acked) < len(entries):
                break
        return sent

    @staticmethod
    def _publish_batch(transport: Transport, entries: list[Entry], timeout: float) -> list[int]:
        deliveries = []
        for e in entries:
            try:
                deliveries.append((e, transport.publish(e.topic, e.payload, qos=1)))
            except Exception as exc:
                log.info("outbox: publish failed: %s", exc)
                break
        acked = []
        for e, d in deliveries:
            if not d.wait(timeout):
                break
            acked.append(e.id)
        return acked

    # -- accounting ----------------------------------------------------------------------
    def size_bytes(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COALESCE(SUM(size), 0) FROM outbox").fetchone()[0])

    def count(self, kind: str | None = None) -> int:
        with self._lock:
            if kind is None:
                return int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
            return int(
                self._db.execute("SELECT COUNT(*) FROM outbox WHERE kind=?", (kind,)).fetchone()[0]
            )

    def conditions(self) -> list[str]:
        """``disk_full`` while full or when messages were refused since the last call."""
        out = []
        drops = self.stats.dropped_disk_full
        if self.disk_full or drops > self._drops_polled:
            out.append("disk_full")
        self._drops_polled = drops
        if self.stats.thinned:
            out.append("outbox_thinned")
        return out

    # -- sequence numbers and the command ledger ----------------------------------------
    def next_seq(self, name: str) -> int:
        """Next value of a persisted monotonic counter (0, 1, 2, …). Survives restarts."""
        with self._lock:
            try:
                row = self._db.execute(
                    "INSERT INTO seq(name, value) VALUES (?, 0) ON CONFLICT(name)"
                    " DO UPDATE SET value = value + 1 RETURNING value",
                    (name,),
                ).fetchone()
                return int(row[0])
            except (sqlite3.DatabaseError, OSError) as exc:
                if not is_disk_full(exc):
                    raise
                self.disk_full = True
                # Keep going in memory: monotonic for this process, may repeat after restart.
                cur = self._db.execute("SELECT value FROM seq WHERE name=?", (name,)).fetchone()
                fallback = self._mem_seq.get(name, (cur[0] if cur else -1)) + 1
                self._mem_seq[name] = fallback
                return fallback

    def command_seen(self, command_id: str) -> tuple[str, bytes | None] | None:
        """``(state, last status JSON)`` of a command handled before, else None."""
        with self._lock:
            row = self._db.execute(
                "SELECT state, last_status FROM commands WHERE command_id=?", (command_id,)
            ).fetchone()
        return None if row is None else (row[0], None if row[1] is None else bytes(row[1]))

    def record_command(
        self, command_id: str, kind: str, state: str, status: bytes | None = None
    ) -> None:
        with self._lock:
            try:
                self._db.execute(
                    "INSERT INTO commands(command_id, kind, state, last_status, ts)"
                    " VALUES (?,?,?,?,?)"
                    " ON CONFLICT(command_id) DO UPDATE SET state=excluded.state,"
                    " last_status=excluded.last_status, ts=excluded.ts",
                    (command_id, kind, state, status, self.clock()),
                )
            except (sqlite3.DatabaseError, OSError) as exc:
                if not is_disk_full(exc):
                    raise
                self.disk_full = True

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _merge_reports(a: SketchReport, b: SketchReport) -> SketchReport:
    def ts(d: datetime) -> float:
        return d.timestamp()

    return a.model_copy(
        update={
            "window_start": min(a.window_start, b.window_start, key=ts),
            "window_end": max(a.window_end, b.window_end, key=ts),
            "seq": min(a.seq, b.seq),
            "sketches": merge(a.sketches, b.sketches),
            "merged_windows": a.merged_windows + b.merged_windows,
        }
    )
