"""Who runs the rollout tick: one process at a time, chosen by a PostgreSQL advisory lock.

Several ``fleet serve`` processes share one PostgreSQL registry. Each runs a
:class:`TickLease`: a thread with a dedicated connection (autocommit, outside the pool) that
tries ``pg_try_advisory_lock(TICK_LOCK)`` every ``retry_s``. The process whose session holds
the lock runs the tick; the lock lives exactly as long as that session:

* the holder stops (or is killed with -9): the OS closes its socket, PostgreSQL ends the
  session and frees the lock, and the next try of another process takes it — within
  ``retry_s`` plus the time to reconnect;
* PostgreSQL restarts: every session ends, so the holder loses the lock; the holder's next
  check (``select 1`` every ``retry_s``) fails, it reports the loss, and every process
  reconnects and tries again; one of them wins.

Between the lock freeing and the holder noticing (at most ``retry_s``) two processes may
both think they hold it; the rollout decisions are idempotent (deterministic command ids,
state resumed from the registry: :mod:`.cluster`), so that costs at most a repeated send.

With SQLite (no ``url``) there is one process, and it always holds the lease.
``on_change(held)`` is called from the lease thread on every change.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

# pg_try_advisory_lock key of the rollout tick ("edgefleet-tick"); distinct from the
# migration lock (repository_pg.MIGRATION_LOCK).
TICK_LOCK = 0x6564_6765_7469_636B


class TickLease:
    def __init__(
        self,
        url: str | None,
        *,
        retry_s: float = 1.0,
        on_change: Callable[[bool], None] | None = None,
        key: int = TICK_LOCK,
    ) -> None:
        self.url = url
        self.retry_s = retry_s
        self.key = key
        self._on_change = on_change
        self._held = url is None  # SQLite: one process, always the holder
        self._conn: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.acquired = 0  # times this process took the lease (a takeover counts one)
        self.last_error = ""

    @property
    def held(self) -> bool:
        return self._held

    def start(self) -> None:
        if self.url is None:
            if self._on_change is not None:
                self._on_change(True)
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="fleet-tick-lease", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        if self._held and self._conn is not None:
            try:  # free it now (closing the session frees it too, a moment later)
                self._conn.execute("select pg_advisory_unlock(%s)", [self.key])
            except Exception:
                pass
        self._close()
        if self.url is not None:
            self._set(False)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.step()
            self._stop.wait(self.retry_s)

    def step(self) -> bool:
        """One try: take the lock, or check that the session holding it is alive."""
        import psycopg

        try:
            if self._conn is None:
                self._conn = psycopg.connect(
                    self.url or "", autocommit=True, connect_timeout=max(int(self.retry_s * 5), 2)
                )
            if self._held:
                self._conn.execute("select 1")
            else:
                row = self._conn.execute("select pg_try_advisory_lock(%s)", [self.key]).fetchone()
                if row and row[0]:
                    self.acquired += 1
                    self._set(True)
            self.last_error = ""
        except psycopg.Error as exc:
            self.last_error = str(exc).strip().splitlines()[0] if str(exc).strip() else "error"
            self._close()
            self._set(False)  # the session (and with it the lock) is gone
        return self._held

    def _set(self, held: bool) -> None:
        if held == self._held:
            return
        self._held = held
        log.info("rollout tick lease %s", "taken" if held else "lost")
        if self._on_change is not None:
            try:
                self._on_change(held)
            except Exception:
                log.exception("tick lease change handler failed")

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass
