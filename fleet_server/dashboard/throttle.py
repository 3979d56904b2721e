"""Dashboard login throttling: per user name and per client address, with backoff.

Rules: the first ``free`` failures of a key (``user:NAME`` or ``addr:IP``) cost nothing;
each later failure locks that key for ``base_s · 2^(failures − free − 1)`` seconds, at most
``max_s``. A login attempt is refused (HTTP 429 with ``Retry-After``) while either of its
keys is locked — before any password is checked, so a locked account costs the server no
hashing. A success clears the user key. Memory is bounded: at most ``max_keys`` keys are
remembered, the least recently failed forgotten first.

The clock is injected, nothing here sleeps or does I/O.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Entry:
    failures: int = 0
    locked_until: float = 0.0


class LoginThrottle:
    def __init__(
        self,
        *,
        free: int = 5,
        base_s: float = 1.0,
        max_s: float = 900.0,
        max_keys: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.free = free
        self.base_s = base_s
        self.max_s = max_s
        self.max_keys = max_keys
        self.clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def keys(user: str, addr: str) -> tuple[str, str]:
        return f"user:{user.strip().lower()[:128]}", f"addr:{addr}"

    def wait_s(self, user: str, addr: str) -> float:
        """Seconds until a login for ``user`` from ``addr`` may be tried (0: now)."""
        now = self.clock()
        with self._lock:
            waits = [
                e.locked_until - now
                for k in self.keys(user, addr)
                if (e := self._entries.get(k)) is not None
            ]
        return max([0.0, *waits])

    def failed(self, user: str, addr: str) -> None:
        now = self.clock()
        with self._lock:
            for k in self.keys(user, addr):
                e = self._entries.pop(k, None) or _Entry()
                e.failures += 1
                over = e.failures - self.free
                if over >= 1:
                    e.locked_until = now + min(self.max_s, self.base_s * 2.0 ** (over - 1))
                self._entries[k] = e  # most recent at the end
            while len(self._entries) > self.max_keys:
                self._entries.popitem(last=False)

    def succeeded(self, user: str, addr: str) -> None:
        with self._lock:
            self._entries.pop(self.keys(user, addr)[0], None)
