"""Release channels, carried out: gathers facts from the registry, asks :mod:`.channels`,
and acts through the service's ordinary rollout functions (``create_rollout``,
``start_rollout``, ``rollback_rollout``), so channel rollouts are plain rollouts with the
usual gates, audit and signed commands.

The periodic part (reverting failed promotions, catch-up of late joiners and drifted
devices) lives in :mod:`.channel_delivery`.

Stored (migration 3): ``channels`` (policy and current bundle per model and channel),
``channel_history`` (every move, with who and why, and the rollouts that delivered a
channel's bundle), ``device_channels`` (reported by the agent / assigned by the server) and
``archived_bundles``. Every action is audited with the actor and the reason.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
from typing import TYPE_CHECKING, Any

from protocol.states import ROLLOUT_TICKED

from . import channels as rules
from .channel_delivery import ChannelDelivery, RolloutView, device_view
from .channels import ChannelPolicy, PromotionFacts, Target
from .errors import Conflict, InvalidInput, NotFound, PromotionRefused
from .rollout_engine import Rollout

if TYPE_CHECKING:
    from .service import FleetService

log = logging.getLogger(__name__)


class ChannelService:
    """The channel actions of one :class:`~.service.FleetService` (its ``channels``)."""

    def __init__(self, service: FleetService, every_s: float = 1.0) -> None:
        self.svc = service
        self.repo = service.repo
        # one channel action at a time in this process (a promotion and a catch-up must not
        # both plan a rollout for the same device)
        self._lock = threading.RLock()
        self.delivery = ChannelDelivery(self, every_s)
        self._reported: dict[str, str | None] = {
            d: r.get("reported") for d, r in self.repo.device_channels().items()
        }

    # reading ----------------------------------------------------------------------------
    def _rows(self) -> dict[tuple[str, str], dict[str, Any]]:
        return {(r["model"], r["channel"]): r for r in self.repo.list_channels()}

    def _policy(self, row: dict[str, Any] | None, channel: str) -> ChannelPolicy:
        if row and row.get("policy"):
            return ChannelPolicy.from_dict(json.loads(row["policy"]))
        return rules.default_policy(channel)

    def _models(self, rows: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
        return sorted({b["name"] for b in self.repo.list_bundles()} | {m for m, _ in rows})

    def _bundle(self, sha: str | None) -> dict[str, Any] | None:
        return self.repo.get_bundle(sha) if sha else None

    def _following(self, rows: dict[tuple[str, str], dict[str, Any]]) -> dict[str, tuple[str, str]]:
        """device id → (model, channel) it follows (rule 1)."""
        assigned = self.repo.device_channels()
        bundles = {b["sha256"]: b for b in self.repo.list_bundles()}
        models = self._models(rows)
        out: dict[str, tuple[str, str]] = {}
        for d in self.svc.list_devices():
            a = assigned.get(d["device_id"], {})
            name = rules.effective(a.get("assigned"), a.get("reported"), d.get("manual_tags") or [])
            if not name or not _valid_follow(name):
                continue
            with_bundle, with_channel = [], []
            for m in models:
                row = rows.get((m, name))
                if row is None and name not in rules.DEFAULT_CHANNELS:
                    continue
                with_channel.append(m)
                b = bundles.get((row or {}).get("current_sha256") or "")
                if b is not None:
                    profiles = [p for p in (b.get("profiles") or "").split(",") if p]
                    if not profiles or d["profile"] in profiles:
                        with_bundle.append(m)
            got = rules.resolve(name, d.get("model"), with_bundle or with_channel)
            if got is not None:
                out[d["device_id"]] = got
        return out

    def overview(self, model: str | None = None) -> list[dict[str, Any]]:
        """Every channel of every model: policy, current bundle, devices and history."""
        rows = self._rows()
        following = self._following(rows)
        devices = {d["device_id"]: d for d in self.svc.list_devices()}
        out = []
        for m in self._models(rows):
            if model and m != model:
                continue
            names = sorted(set(rules.DEFAULT_CHANNELS) | {c for mm, c in rows if mm == m})
            for c in names:
                out.append(self._describe(m, c, rows.get((m, c)), following, devices))
        return out

    def get(self, model: str, channel: str) -> dict[str, Any]:
        rows = self._rows()
        if (model, channel) not in rows and channel not in rules.DEFAULT_CHANNELS:
            raise NotFound(f"model {model} has no channel {channel!r}", field="channel")
        devices = {d["device_id"]: d for d in self.svc.list_devices()}
        return self._describe(
            model, channel, rows.get((model, channel)), self._following(rows), devices
        )

    def _describe(
        self,
        model: str,
        channel: str,
        row: dict[str, Any] | None,
        following: dict[str, tuple[str, str]],
        devices: dict[str, dict[str, Any]],
    ) -> dict[str, Any]:
        current = self._bundle((row or {}).get("current_sha256"))
        history = self.repo.channel_history(model=model, channel=channel, limit=50)
        target = (
            Target(model, channel, current["sha256"], current["version"], int(current["release"]))
            if current
            else None
        )
        members = [
            {
                "device_id": d,
                "online": bool(devices[d].get("online")),
                "version": devices[d].get("version"),
                "model": devices[d].get("model"),
                "status": rules.device_status(device_view(devices[d], set(), set()), target),
            }
            for d, mc in sorted(following.items())
            if mc == (model, channel) and d in devices
        ]
        prev = rules.previous_bundle(history, current["sha256"] if current else None)
        prev_b = self._bundle(prev)
        return {
            "model": model,
            "channel": channel,
            "policy": self._policy(row, channel).to_dict(),
            "current": _brief(current),
            "previous": _brief(prev_b),
            "devices": members,
            "history": [_history(h) for h in history if h["action"] in rules.MOVES],
            "can_demote": current is not None and prev_b is not None,
        }

    def lineage(self, ref: str) -> dict[str, Any]:
        """Every channel a bundle was in, when, and why; and whether it is archived."""
        b = self.svc.registry.find_bundle(ref)
        rows = self.repo.channel_history(sha256=b["sha256"], limit=500)
        archived = self.repo.archived_bundles().get(b["sha256"])
        return {
            "bundle": _brief(b),
            "lineage": [_history(h) for h in reversed(rows) if h["action"] in rules.MOVES],
            "current_in": [
                r["channel"]
                for r in self.repo.list_channels()
                if r.get("current_sha256") == b["sha256"]
            ],
            "archived": archived,
        }

    # policies and membership ----------------------------------------------------------------
    def define(
        self, model: str, channel: str, policy: dict[str, Any], actor: str = "api"
    ) -> dict[str, Any]:
        """Create a channel, or replace its policy (unset fields take the defaults)."""
        rules.check_name(channel)
        if not model or len(model) > 128:
            raise InvalidInput("model name must be 1–128 characters", field="model")
        p = ChannelPolicy.from_dict({**rules.default_policy(channel).to_dict(), **policy})
        if p.requires == channel:
            raise InvalidInput("a channel cannot require itself", field="requires")
        self.repo.save_channel(
            {
                "model": model,
                "channel": channel,
                "policy": json.dumps(p.to_dict()),
                "updated_at": self.svc.clock(),
            }
        )
        self.svc.audit_log.audit(
            actor,
            "channel.define",
            f"channel:{model}/{channel}",
            f"policy set: {json.dumps(p.to_dict(), sort_keys=True)}",
        )
        self.svc.flush()
        return self.get(model, channel)

    def assign(self, device_id: str, channel: str | None, actor: str = "api") -> dict[str, Any]:
        """Server-side channel of a device (overrides what its agent reports); None clears."""
        if self.repo.get_device(device_id) is None:
            raise NotFound(f"unknown device {device_id!r}", field="device_id")
        if channel and not _valid_follow(channel):
            _model, sep, name = channel.partition("/")
            rules.check_name(name if sep else channel)  # names the rule the name breaks
            raise InvalidInput(f"channel {channel!r} names no model", field="channel")
        self.repo.set_device_channel(
            device_id, assigned=channel or None, updated_at=self.svc.clock()
        )
        self.svc.audit_log.audit(
            actor,
            "device.channel",
            f"device:{device_id}",
            f"channel set to {channel}" if channel else "channel assignment cleared",
        )
        self.svc.flush()
        self.svc.rollouts.wake.set()
        return {
            "device_id": device_id,
            "assigned": channel or None,
            "reported": self._reported.get(device_id),
        }

    def observe(self, device_id: str, reported: str | None) -> None:
        """From a device's state message: the channel its agent follows."""
        if reported is not None and not _valid_follow(reported):
            self.svc.on_dropped("channel_invalid")  # the field is ignored; the state is kept
            return
        if self._reported.get(device_id, None) == reported:
            return
        self._reported[device_id] = reported
        self.repo.set_device_channel(device_id, reported=reported, updated_at=self.svc.clock())
        self.svc.audit_log.event(
            "channel", f"{device_id} follows channel {reported}", device_id=device_id
        )

    # promotion ------------------------------------------------------------------------------
    def _facts(
        self, b: dict[str, Any], channel: str, rows: dict[tuple[str, str], dict[str, Any]]
    ) -> tuple[ChannelPolicy, PromotionFacts]:
        model = b["name"]
        row = rows.get((model, channel))
        policy = self._policy(row, channel)
        current = self._bundle((row or {}).get("current_sha256"))
        succeeded_at, holds = None, False
        if policy.requires:
            req = rows.get((model, policy.requires)) or {}
            holds = req.get("current_sha256") == b["sha256"]
            # only since its latest promotion there, and held since it last became current
            history = self.repo.channel_history(model=model, channel=policy.requires, limit=500)
            for h in _since_latest_promote(history, b["sha256"]):
                info = self._info(h.get("rollout_id"))
                if info is not None and info.state == "succeeded":
                    done = info.done_at or 0.0
                    succeeded_at = done if succeeded_at is None else min(succeeded_at, done)
            became = next(
                (h["ts"] for h in history if h["action"] in rules.MOVES), None
            )  # the newest move of the required channel: what made its current bundle current
            if succeeded_at is not None and holds and became is not None:
                succeeded_at = max(succeeded_at, float(became))
        drifting = None
        if policy.no_drift and self.svc.drift is not None:
            try:
                drifting = bool(self.svc.drift.is_drifting(model, b["version"]))
            except Exception:  # a drift store problem must not decide a promotion
                log.exception("drift check for %s %s failed", model, b["version"])
        accuracy = current_accuracy = None
        if policy.accuracy_tolerance is not None:
            accuracy = self.repo.metrics_summary(model, b["version"], 0.0)["accuracy"]
            if current is not None:
                current_accuracy = self.repo.metrics_summary(model, current["version"], 0.0)[
                    "accuracy"
                ]
        facts = PromotionFacts(
            sha256=b["sha256"],
            release=int(b["release"]),
            channel_known=row is not None or channel in rules.DEFAULT_CHANNELS,
            current_sha256=current["sha256"] if current else None,
            current_release=int(current["release"]) if current else None,
            archived=b["sha256"] in self.repo.archived_bundles(),
            required_succeeded_at=succeeded_at,
            required_holds=holds,
            drifting=drifting,
            accuracy=accuracy,
            current_accuracy=current_accuracy,
        )
        return policy, facts

    def preview(self, ref: str, channel: str, force: bool = False) -> dict[str, Any]:
        """What a promotion would do: the policy, every condition, the devices it reaches."""
        rules.check_name(channel)
        b = self.svc.registry.find_bundle(ref)
        rows = self._rows()
        policy, facts = self._facts(b, channel, rows)
        conditions = rules.check_promotion(policy, facts, self.svc.clock(), force=force)
        following = self._following(rows)
        devices = sorted(d for d, mc in following.items() if mc == (b["name"], channel))
        return {
            "bundle": _brief(b),
            "channel": channel,
            "policy": policy.to_dict(),
            "conditions": [c.to_dict() for c in conditions],
            "allowed": not rules.failed(conditions),
            "devices": devices,
            "current": _brief(self._bundle(facts.current_sha256)),
        }

    def promote(
        self, ref: str, channel: str, *, actor: str = "api", reason: str = "", force: bool = False
    ) -> dict[str, Any]:
        """Make ``ref`` the channel's current bundle and roll it out to the channel's devices."""
        with self._lock:
            return self._promote(ref, channel, actor, reason, force)

    def _promote(
        self, ref: str, channel: str, actor: str, reason: str, force: bool
    ) -> dict[str, Any]:
        plan = self.preview(ref, channel, force=force)
        b = plan["bundle"]
        target = f"channel:{b['name']}/{channel}"
        bad = [c for c in plan["conditions"] if not c["ok"]]
        if bad:
            self.svc.audit_log.audit(
                actor,
                "channel.promote_refused",
                target,
                f"{b['name']} {b['version']} refused: "
                + "; ".join(f"{c['name']}: {c['detail']}" for c in bad),
                {"conditions": plan["conditions"], "reason": reason},
            )
            self.svc.flush()
            raise PromotionRefused(
                f"promotion of {b['name']} {b['version']} to {channel} refused: "
                + "; ".join(f"{c['name']} ({c['detail']})" for c in bad),
                conditions=plan["conditions"],
            )
        rid = None
        if plan["devices"]:
            rid = self._start(b["sha256"], channel, plan["devices"], plan["policy"], actor, force)
        self.repo.save_channel(
            {
                "model": b["name"],
                "channel": channel,
                "current_sha256": b["sha256"],
                "updated_at": self.svc.clock(),
            }  # the policy stays as defined (none stored: the channel's defaults)
        )
        self._history(b["name"], channel, b["sha256"], "promote", actor, reason, rid)
        why = f"{b['name']} {b['version']} promoted to {channel}" + (
            f": {reason}" if reason else ""
        )
        self.svc.audit_log.audit(
            actor,
            "channel.promote",
            target,
            why,
            {"rollout_id": rid, "devices": len(plan["devices"])},
        )
        if force and any(
            c["name"] == "not_archived" and "force" in c["detail"] for c in plan["conditions"]
        ):
            self.svc.audit_log.audit(
                actor,
                "channel.force",
                target,
                f"archived bundle {b['version']} promoted with force",
            )
        self.svc.flush()
        return {**self.get(b["name"], channel), "rollout_id": rid, "conditions": plan["conditions"]}

    def _start(
        self,
        sha: str,
        channel: str,
        devices: list[str],
        policy: dict[str, Any],
        actor: str,
        force: bool = False,
    ) -> str:
        from .service import RolloutRequest

        rid = f"{channel}-{secrets.token_hex(5)}"
        p = ChannelPolicy.from_dict(policy)
        req = RolloutRequest(
            bundle=sha,
            rollout_id=rid,
            selector=",".join(f"id={d}" for d in devices),
            stages=list(p.stages),
            stage_unit=p.stage_unit,
            success_threshold=p.success_threshold,
            failure_threshold=p.failure_threshold,
            min_devices=p.min_devices,
            soak_s=p.soak_s,
            device_timeout_s=p.device_timeout_s,
            max_retries=p.max_retries,
        )
        self.svc.create_rollout(req, actor=actor, force=force)
        self.svc.start_rollout(rid, actor=actor)
        return rid

    # demotion and archiving -----------------------------------------------------------------
    def demote(
        self, model: str, channel: str, *, actor: str = "api", reason: str = ""
    ) -> dict[str, Any]:
        """Back to the previous bundle; signed rollbacks to the devices that got this one."""
        with self._lock:
            return self._demote(model, channel, actor, reason)

    def _demote(self, model: str, channel: str, actor: str, reason: str) -> dict[str, Any]:
        rows = self._rows()
        row = rows.get((model, channel))
        cur = (row or {}).get("current_sha256")
        if not cur:
            raise Conflict(f"{model}/{channel} has no current bundle to demote", field="channel")
        history = self.repo.channel_history(model=model, channel=channel, limit=500)
        prev = rules.previous_bundle(history, cur)
        if prev is None:
            raise Conflict(
                f"{model}/{channel} has no previous bundle to return to", field="channel"
            )
        rolled = []
        for h in history:
            if h["sha256"] != cur or h["action"] not in ("promote", "deliver"):
                continue
            info = self._info(h.get("rollout_id"))
            if info is not None and info.state in ROLLOUT_TICKED | {"halted"}:
                self.svc.rollback_rollout(h["rollout_id"], actor=actor)
                rolled.append(h["rollout_id"])
        self.repo.save_channel(
            {
                "model": model,
                "channel": channel,
                "current_sha256": prev,
                "updated_at": self.svc.clock(),
            }
        )
        self._history(model, channel, prev, "demote", actor, reason, None)
        cur_b, prev_b = self._bundle(cur) or {}, self._bundle(prev) or {}
        self.svc.audit_log.audit(
            actor,
            "channel.demote",
            f"channel:{model}/{channel}",
            f"{channel} demoted from {cur_b.get('version')} to {prev_b.get('version')}"
            + (f": {reason}" if reason else ""),
            {"rolled_back": rolled},
        )
        self.svc.flush()
        return {**self.get(model, channel), "rolled_back": rolled}

    def archive(self, ref: str, *, actor: str = "api", reason: str = "") -> dict[str, Any]:
        """Archive a bundle: it cannot be promoted again without force."""
        b = self.svc.registry.find_bundle(ref)
        self.repo.archive_bundle(b["sha256"], self.svc.clock(), actor, reason)
        self.svc.audit_log.audit(
            actor,
            "bundle.archive",
            f"bundle:{b['sha256']}",
            f"{b['name']} {b['version']} archived" + (f": {reason}" if reason else ""),
        )
        self.svc.flush()
        return self.lineage(b["sha256"])

    def _history(
        self,
        model: str,
        channel: str,
        sha: str,
        action: str,
        actor: str,
        reason: str,
        rid: str | None,
    ) -> None:
        self.repo.add_channel_history(
            {
                "model": model,
                "channel": channel,
                "sha256": sha,
                "ts": self.svc.clock(),
                "action": action,
                "actor": actor,
                "reason": reason[:500],
                "rollout_id": rid,
            }
        )

    # the clock ------------------------------------------------------------------------------
    def tick(self, force: bool = False) -> None:
        """Revert failed promotions; deliver to late joiners and drifted devices
        (:class:`.channel_delivery.ChannelDelivery`)."""
        self.delivery.tick(force)

    def _info(self, rid: str | None) -> RolloutView | None:
        """A rollout's state without the audit trail: from the engine's memory when live."""
        if not rid:
            return None
        with self.svc.rollouts.lock:
            r = self.svc.rollouts.live.get(rid)
            if r is not None:
                return RolloutView.of(r)
        row = self.repo.get_rollout(rid)
        return RolloutView.of(Rollout.from_dict(row["doc"])) if row else None


def _since_latest_promote(history: list[dict[str, Any]], sha: str) -> list[dict[str, Any]]:
    """The rows of ``sha`` from its newest promotion on (``history`` newest first)."""
    for i, h in enumerate(history):
        if h["action"] == "promote" and h["sha256"] == sha:
            return [x for x in history[: i + 1] if x["sha256"] == sha]
    return []


def _valid_follow(name: str) -> bool:
    """``CHANNEL`` or ``MODEL/CHANNEL`` with a 1–128 character model name."""
    model, sep, channel = name.partition("/")
    if sep and not 0 < len(model) <= 128:
        return False
    return bool(rules.CHANNEL_NAME.match(channel if sep else name))


def _brief(b: dict[str, Any] | None) -> dict[str, Any] | None:
    if b is None:
        return None
    return {k: b.get(k) for k in ("sha256", "name", "version", "release")}


def _history(h: dict[str, Any]) -> dict[str, Any]:
    return {
        k: h.get(k)
        for k in ("model", "channel", "sha256", "ts", "action", "actor", "reason", "rollout_id")
    }
