"""The fleet's two logs: the audit trail (who did what, and why) and the event stream.

Both are buffered in memory and written in batches by :meth:`AuditLog.flush` (the service
flushes after every operator action and every tick), so a burst of device reports costs
one transaction, not one per line. The buffers have their own leaf lock: anything may log
while holding the rollout driver's lock.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

from protocol.errors import EdgefleetError

from .repository import Repository


class AuditLog:
    def __init__(self, repo: Repository, clock: Callable[[], float]) -> None:
        self.repo = repo
        self.clock = clock
        self._lock = threading.Lock()
        self._audits: list[dict[str, Any]] = []
        self._events: list[dict[str, Any]] = []

    def audit(
        self, actor: str, action: str, target: str, reason: str, data: dict[str, Any] | None = None
    ) -> None:
        row = {
            "ts": self.clock(),
            "actor": actor,
            "action": action,
            "target": target,
            "reason": reason,
            "data": data,
        }
        with self._lock:
            self._audits.append(row)

    def event(self, kind: str, message: str, **data: Any) -> None:
        row = {
            "ts": self.clock(),
            "kind": kind,
            "message": message,
            "rollout_id": data.pop("rollout_id", None),
            "device_id": data.pop("device_id", None),
            "data": json.dumps(data, default=str),
        }
        with self._lock:
            self._events.append(row)

    def flush(self) -> None:
        """Write what is buffered: audit entries first, then events."""
        with self._lock:
            audits, self._audits = self._audits, []
            events, self._events = self._events, []
        try:
            if audits:
                self.repo.add_audits(audits)
                audits = []
            if events:
                self.repo.add_events(events)
        except EdgefleetError:  # the registry is away: keep it all for the next flush
            with self._lock:
                self._audits[:0] = audits
                self._events[:0] = events
            raise

    def events(
        self, limit: int = 100, rollout_id: str | None = None, device_id: str | None = None
    ) -> list[dict[str, Any]]:
        self.flush()
        return self.repo.events(limit=limit, rollout_id=rollout_id, device_id=device_id)

    def entries(self, limit: int = 100, target: str | None = None) -> list[dict[str, Any]]:
        self.flush()
        return self.repo.audit(limit=limit, target=target)
