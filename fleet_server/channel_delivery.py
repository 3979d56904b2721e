"""Continuous delivery to each channel: the tick that reverts failed promotions, aborts
stalled catch-ups and batches late joiners and drifted devices into rollouts under the
channel's policy (rules 3 and 5 of :mod:`.channels`), through
:class:`.channel_service.ChannelService`. Live rollouts are read from the engine's memory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from protocol.states import DEVICE_FAILED, DEVICE_UNSETTLED, ROLLOUT_ACTIVE

from . import channels as rules
from .channels import DeviceView, Target
from .errors import FleetError
from .rollout_engine import Rollout

if TYPE_CHECKING:
    from .channel_service import ChannelService

log = logging.getLogger(__name__)

_ACTIVE = ROLLOUT_ACTIVE
_IN_FLIGHT = DEVICE_UNSETTLED


class ChannelDelivery:
    def __init__(self, channels: ChannelService, every_s: float = 1.0) -> None:
        self.ch = channels
        self.svc = channels.svc
        self.repo = channels.repo
        self.every_s = every_s
        self._last_tick = float("-inf")

    def tick(self, force: bool = False) -> None:
        """Revert failed promotions; deliver channel bundles to late joiners and drifted ones."""
        now = self.svc.clock()
        if not force and now - self._last_tick < self.every_s:
            return
        self._last_tick = now
        with self.ch._lock:
            rows = self.ch._rows()
            if any(r.get("current_sha256") for r in rows.values()):
                following = self.ch._following(rows)
                for (model, channel), row in sorted(rows.items()):
                    if not row.get("current_sha256"):
                        continue
                    try:
                        self._tick_channel(model, channel, row, following)
                    except FleetError as exc:  # one channel's problem stops no other
                        log.warning("channel %s/%s: %s", model, channel, exc)
                        self.svc.audit_log.event("channel", f"{model}/{channel}: {exc}")
        self.svc.flush()

    def _tick_channel(
        self,
        model: str,
        channel: str,
        row: dict[str, Any],
        following: dict[str, tuple[str, str]],
    ) -> None:
        cur = str(row["current_sha256"])
        target_name = f"channel:{model}/{channel}"
        history = self.repo.channel_history(model=model, channel=channel, limit=200)
        if self._maybe_revert(model, channel, cur, history):
            return
        b = self.ch._bundle(cur)
        if b is None:
            return
        mine = [h for h in history if h.get("rollout_id")]
        for h in mine:
            info = self.ch._info(h["rollout_id"])
            if h["action"] == "deliver" and info is not None and rules.rollout_stalled(*info.rule):
                self.svc.audit_log.audit(
                    "channels",
                    "channel.stalled",
                    target_name,
                    f"catch-up rollout {info.rid} stalled: aborted so its waiting "
                    "devices go in the next batch",
                )
                self.svc.abort_rollout(info.rid, actor="channels")
        infos = [i for i in (self.ch._info(h["rollout_id"]) for h in mine) if i is not None]
        moving = next((i.rid for i in infos if rules.rollout_moving(*i.rule)), "")
        failed_before = {
            d for i in infos if i.sha == cur for d, _, st in i.devices if st in DEVICE_FAILED
        }
        busy = self._busy_devices()
        views = [
            device_view(d, busy, failed_before)
            for d in self.svc.list_devices()
            if following.get(d["device_id"]) == (model, channel)
        ]
        target = Target(model, channel, cur, b["version"], int(b["release"]))
        plan = rules.plan_catch_up(target, views, moving)
        if not plan.send:
            return
        try:
            rid = self.ch._start(
                cur, channel, plan.send, self.ch._policy(row, channel).to_dict(), "channels"
            )
        except FleetError as exc:
            self.svc.audit_log.event("channel", f"{model}/{channel}: catch-up not started: {exc}")
            return
        why = "; ".join(f"{d}: {plan.reasons[d]}" for d in plan.send)
        self.ch._history(model, channel, cur, "deliver", "channels", why, rid)
        self.svc.audit_log.audit(
            "channels",
            "channel.deliver",
            target_name,
            f"{b['version']} to {len(plan.send)} devices: {why}",
            {"rollout_id": rid, "devices": plan.send},
        )

    def _busy_devices(self) -> set[str]:
        """Devices a live rollout may still send a deploy to."""
        out: set[str] = set()
        with self.svc.rollouts.lock:
            for r in self.svc.rollouts.live.values():
                if r.state in _ACTIVE:
                    out |= set(r.devices)
                elif r.state == "succeeded":  # late devices still get its deploy
                    out |= {d for d, p in r.devices.items() if p.state in _IN_FLIGHT}
        return out

    def _maybe_revert(
        self, model: str, channel: str, cur: str, history: list[dict[str, Any]]
    ) -> bool:
        moves = [h for h in history if h["action"] in rules.MOVES]
        last = moves[0] if moves else None
        if last is None or last["action"] != "promote" or not last.get("rollout_id"):
            return False
        info = self.ch._info(last["rollout_id"])
        if info is None or not rules.revert_needed(info.state):
            return False
        prev = rules.previous_bundle(history, cur)
        self.repo.save_channel(
            {
                "model": model,
                "channel": channel,
                "current_sha256": prev,
                "updated_at": self.svc.clock(),
            }
        )
        why = f"promotion rollout {info.rid} ended {info.state}"
        self.ch._history(model, channel, prev or "", "revert", "channels", why, None)
        self.svc.audit_log.audit("channels", "channel.revert", f"channel:{model}/{channel}", why)
        return True


@dataclass(frozen=True)
class RolloutView:
    rid: str
    state: str
    sha: str
    stages: tuple[str, ...]
    devices: tuple[tuple[str, int, str], ...]  # (device id, stage, state)
    done_at: float | None

    @classmethod
    def of(cls, r: Rollout) -> RolloutView:
        finished = [s.finished_at for s in r.stages if s.finished_at is not None]
        return cls(
            r.rollout_id,
            r.state,
            r.spec.bundle_sha256,
            tuple(s.state for s in r.stages),
            tuple((d.device_id, d.stage, d.state) for d in r.devices.values()),
            max(finished) if finished else None,
        )

    @property
    def rule(self) -> tuple[str, tuple[str, ...], list[tuple[int, str]]]:
        """The arguments of :func:`.channels.rollout_moving` / ``rollout_stalled``."""
        return self.state, self.stages, [(stage, st) for _, stage, st in self.devices]


def device_view(d: dict[str, Any], busy: set[str], failed_before: set[str]) -> DeviceView:
    return DeviceView(
        device_id=d["device_id"],
        online=bool(d.get("online")),
        model=d.get("model") or None,
        version=d.get("version") or None,
        release=int(d["release"]) if d.get("release") is not None else None,
        busy=d["device_id"] in busy,
        failed_current=d["device_id"] in failed_before,
    )
