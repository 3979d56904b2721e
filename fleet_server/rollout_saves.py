"""Which devices of a rollout changed since the driver last saved it.

The driver saves each changed live rollout after every tick (:meth:`.rollout_driver.
RolloutDriver.flush`); most ticks move a few devices of many. :class:`SavedRows` keeps a
copy of each device's fields as this process last wrote them, per rollout *object*, so the
next save encodes and writes only the devices whose progress differs
(``save_rollout(…, devices=…)``, :mod:`.rollout_rows`). A rollout object it has not saved
yet — new, or loaded from the registry (a takeover, another process's rollout) — is
written whole: the registry may hold another process's rows, or rows of the layout before
migration 10. A failed save records nothing, so the next one writes the same devices again.

The copy is shallow: a device's ``previous`` model is replaced, never changed in place
(:meth:`.rollout_driver.RolloutDriver.send_deploy`).
"""

from __future__ import annotations

from typing import Any

from .rollout_engine import Rollout


class SavedRows:
    def __init__(self) -> None:
        # rollout id → (the object saved, device id → its fields as written)
        self._last: dict[str, tuple[Rollout, dict[str, dict[str, Any]]]] = {}

    def changed(self, r: Rollout) -> list[str] | None:
        """Ids of the devices whose fields differ from the last save of ``r``; None when
        ``r`` was never saved here (write every device)."""
        last = self._last.get(r.rollout_id)
        if last is None or last[0] is not r:
            return None
        prev = last[1]
        return [i for i, d in r.devices.items() if prev.get(i) != vars(d)]

    def saved(self, r: Rollout, devices: list[str] | None) -> None:
        """``r`` was written: every device (``devices`` None) or these."""
        last = self._last.get(r.rollout_id)
        if devices is None or last is None or last[0] is not r:
            self._last[r.rollout_id] = (r, {i: dict(vars(d)) for i, d in r.devices.items()})
            return
        for i in devices:
            last[1][i] = dict(vars(r.devices[i]))

    def keep(self, rollout_ids: set[str]) -> None:
        """Forget rollouts no longer held in memory."""
        for rid in [rid for rid in self._last if rid not in rollout_ids]:
            del self._last[rid]
