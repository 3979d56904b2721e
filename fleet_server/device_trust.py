"""Who may speak for a device: pinned device keys, enrolment, freshness and per-device caps.

Rules (checked by :class:`~.bridge.Bridge` in this order, each refusal a counted reason):

1. A device message must carry a ``dsig`` signature (:mod:`protocol.device_auth`)
   → else ``unsigned``.
2. An *approved* device's message must be signed by its pinned key → ``key_mismatch`` /
   ``bad_signature``; within the device's rate → ``rate_limited``; and fresh:
   a ``state`` whose ``(boot, seq)`` is older than the newest accepted one, or any other
   message outside the device's anti-replay window → ``stale`` / ``replayed``.
3. A device that is not approved may only send its birth ``state``, carrying its public
   key and signed by it (``bad_signature``). New identities are rate-limited
   (``enrol_limit``) and at most ``max_pending`` wait (``pending_full``; when the list is
   full, entries older than a day are forgotten to make room). A valid enrolment
   token proof approves the device at once; otherwise it is ``pending`` until an
   operator approves it (:meth:`DeviceTrust.approve`). Any other message of an unknown or
   pending device is dropped (``unknown_device`` / ``pending``).
   A non-state message may instead carry the MAC scheme (:mod:`protocol.device_mac`):
   accepted only when this server holds the fleet X25519 key and the device's X25519 key
   came in a state its pinned Ed25519 key signed (``mac_no_key``), the MAC names this
   fleet's key (``mac_wrong_fleet_key``) and verifies (``bad_mac``). A state may carry a
   MAC too (a device MACs its births after the first of a connection), but it must not
   change the device's keys: a MAC'd state naming another Ed25519 or X25519 key is dropped
   (``mac_key_change``). The agreed key is computed once per device key; the device's
   X25519 key is persisted with its identity, so MAC'd messages verify after a restart.
5. Commands: the fleet MACs a command (instead of signing it with Ed25519) only to an
   approved device whose last authenticated state said it holds this fleet's X25519 key
   (``DeviceState.fleet_kex``) — :meth:`DeviceTrust.command_key`. The MAC key is agreed
   as soon as an approved device names this fleet's key, not when the first command goes.
4. Telemetry: a device reports on at most ``max_models`` model versions per day and
   ``max_windows`` sketch hours per hour, never older than ``max_window_age_s`` or from
   the future (``model_limit`` / ``window_limit`` / ``stale_window``).

Everything the bridge keeps per device is bounded: identities exist only for approved
devices and at most ``max_pending`` others; every per-device structure has a fixed size.
The newest accepted state ``(boot, seq)`` is persisted with the identity so a server
restart does not reopen old retained states; the anti-replay windows of other messages
live in memory (after a restart a message of the current boot can be replayed once —
docs/security.md names this).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from protocol.device_auth import (
    MAC,
    SignedEnvelope,
    check_enrol_proof,
    public_key_from_b64,
    verify_envelope,
    verify_mac,
)
from protocol.device_mac import kex_id, mac_key, raw_public, x25519_from_b64
from protocol.messages import DeviceState, MetricsReport, SketchReport
from protocol.signing import key_id

from .config import DevicesSection
from .errors import Conflict, NotFound
from .repository import Repository

log = logging.getLogger(__name__)

REPLAY_WINDOW = 4096  # messages of one boot that may arrive out of order
PENDING_TTL_S = 86400.0  # a full pending list forgets entries nobody approved for a day
FUTURE_SKEW_S = 300.0


def _int(value: Any) -> int:
    return -1 if value is None else int(value)


def _identity(row: dict[str, Any]) -> Identity | None:
    public = public_key_from_b64(row["public_key"])
    if public is None:
        return None
    return Identity(
        device_id=row["device_id"],
        public=public,
        public_b64=row["public_key"],
        key_id=row["key_id"],
        status=row["status"],
        method=row.get("method") or "",
        created_at=row.get("created_at") or 0.0,
        approved_at=row.get("approved_at"),
        approved_by=row.get("approved_by") or "",
        state_boot=_int(row.get("state_boot")),
        state_seq=_int(row.get("state_seq")),
        x25519=row.get("x25519_key") or None,
    )


class TokenBucket:
    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate, self.burst = rate, float(burst)
        self.tokens, self.last = float(burst), now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class ReplayWindow:
    """Sliding anti-replay window over ``(boot, seq)`` (highest seq plus a bitmap)."""

    def __init__(self) -> None:
        self.boot = -1
        self.high = 0
        self.bits = 0  # bit i set: seq (high - i) was seen

    def admit(self, boot: int, seq: int) -> str | None:
        if boot < self.boot:
            return "stale"
        if boot > self.boot:
            self.boot, self.high, self.bits = boot, seq, 1
            return None
        if seq > self.high:
            shift = seq - self.high
            self.bits = ((self.bits << shift) | 1) & ((1 << REPLAY_WINDOW) - 1)
            self.high = seq
            return None
        age = self.high - seq
        if age >= REPLAY_WINDOW:
            return "stale"
        if self.bits >> age & 1:
            return "replayed"
        self.bits |= 1 << age
        return None

    def forget(self, boot: int, seq: int) -> None:
        """Unmark ``(boot, seq)`` (admitted, but not taken): another copy of it is admitted."""
        age = self.high - seq
        if boot == self.boot and 0 <= age < REPLAY_WINDOW:
            self.bits &= ~(1 << age)


@dataclass
class Identity:
    device_id: str
    public: Ed25519PublicKey
    public_b64: str
    key_id: str
    status: str  # pending | approved
    method: str = ""  # token | operator
    created_at: float = 0.0
    approved_at: float | None = None
    approved_by: str = ""
    state_boot: int = -1
    state_seq: int = -1
    # the X25519 key of the newest state the pinned key signed (persisted), the MAC key
    # agreed with it (memory), and the fleet kex id the device's last state said it holds
    x25519: str | None = None
    mac_key: bytes | None = None
    fleet_kex: str | None = None

    def row(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "public_key": self.public_b64,
            "key_id": self.key_id,
            "status": self.status,
            "method": self.method,
            "created_at": self.created_at,
            "approved_at": self.approved_at,
            "approved_by": self.approved_by,
            "state_boot": self.state_boot,
            "state_seq": self.state_seq,
        }

    def public_view(self) -> dict[str, Any]:
        out = self.row()
        out.pop("state_boot")
        out.pop("state_seq")
        return out


@dataclass
class _Usage:
    """Per-device limits: a rate bucket, a replay window, recent models and windows."""

    bucket: TokenBucket
    replay: ReplayWindow = field(default_factory=ReplayWindow)
    models: dict[tuple[str, str], float] = field(default_factory=dict)
    windows: dict[tuple[str, str, int], float] = field(default_factory=dict)


class DeviceTrust:
    def __init__(
        self, repo: Repository, cfg: DevicesSection, clock: Callable[[], float] = time.time
    ) -> None:
        self.repo = repo
        self.cfg = cfg
        self.clock = clock
        self._lock = threading.Lock()
        self._ids: dict[str, Identity] = {}
        self._usage: dict[str, _Usage] = {}
        self._pending_state: dict[str, DeviceState] = {}
        self._enrol = TokenBucket(cfg.enrol_per_minute / 60.0, cfg.enrol_burst, clock())
        self._kex: X25519PrivateKey | None = None
        self.verified: Counter[str] = Counter()  # messages whose signature or MAC held, by scheme
        self.agreements = 0  # MAC keys computed (X25519 + HKDF, once per device key)
        self._kex_id = ""
        self._kex_pub = b""
        for row in repo.list_identities():
            ident = _identity(row)
            if ident is not None:
                self._ids[row["device_id"]] = ident

    def refresh(self) -> int:
        """Take the identity changes other server processes sharing the registry made
        (an approval, a revocation, a new key); returns how many changed here. Reads each
        identity's key id and status, and whole rows only of those that differ."""
        versions = self.repo.identity_versions()
        with self._lock:
            differ = [
                d
                for d, v in versions.items()
                if (cur := self._ids.get(d)) is None or (cur.key_id, cur.status) != v
            ]
        rows = {r["device_id"]: r for r in self.repo.list_identities(differ)} if differ else {}
        changed = 0
        with self._lock:
            for device_id in list(self._ids):
                if device_id not in versions and self._ids[device_id].status == "approved":
                    del self._ids[device_id]  # revoked elsewhere
                    self._usage.pop(device_id, None)
                    changed += 1
            for device_id, row in rows.items():
                cur = self._ids.get(device_id)
                if cur is not None and (cur.key_id, cur.status) == (row["key_id"], row["status"]):
                    continue
                ident = _identity(row)
                if ident is None:
                    continue
                if cur is not None and cur.key_id == ident.key_id:
                    ident.x25519 = ident.x25519 or cur.x25519
                    if ident.x25519 == cur.x25519:  # the same agreement: keep its key
                        ident.mac_key, ident.fleet_kex = cur.mac_key, cur.fleet_kex
                    ident.state_boot, ident.state_seq = max(
                        (cur.state_boot, cur.state_seq), (ident.state_boot, ident.state_seq)
                    )
                if ident.status == "approved":
                    self._pending_state.pop(device_id, None)
                self._ids[device_id] = ident
                changed += 1
        return changed

    # -- queries ---------------------------------------------------------------------------
    def approved(self, device_id: str) -> Identity | None:
        ident = self._ids.get(device_id)
        return ident if ident is not None and ident.status == "approved" else None

    def known(self, device_id: str) -> bool:
        return device_id in self._ids

    def list(self, status: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            rows = [i.public_view() for i in self._ids.values()]
        return sorted(
            (r for r in rows if status is None or r["status"] == status),
            key=lambda r: r["device_id"],
        )

    # -- MAC keys ----------------------------------------------------------------------------
    def set_kex(self, private: X25519PrivateKey) -> None:
        """The fleet's X25519 key (derived from the command key): MAC messages verify now."""
        with self._lock:
            self._kex = private
            self._kex_pub = raw_public(private.public_key())
            self._kex_id = kex_id(private.public_key())
            for ident in self._ids.values():
                ident.mac_key = None

    def note_state(self, msg: DeviceState, scheme: str = "ed25519") -> str | None:
        """Record the keys of a state the device authenticated (after :meth:`verify`):
        its X25519 key (persisted when it changes) and the fleet key it says it holds.
        A MAC'd state must name the keys already pinned: else ``mac_key_change``."""
        with self._lock:
            ident = self._ids.get(msg.device_id)
            if ident is None:
                return None
            if scheme == MAC:
                if (msg.public_key and msg.public_key != ident.public_b64) or (
                    msg.x25519_key and msg.x25519_key != ident.x25519
                ):
                    return "mac_key_change"
                ident.fleet_kex = msg.fleet_kex
                return None
            ident.fleet_kex = msg.fleet_kex
            new = msg.x25519_key if x25519_from_b64(msg.x25519_key or "") else None
            changed = new is not None and ident.x25519 != new
            if changed:
                ident.x25519, ident.mac_key = new, None
        if changed:
            self.repo.set_identity_x25519(msg.device_id, new)
        self._agree_early(ident)
        return None

    def _agree_early(self, ident: Identity) -> None:
        """Agree K as soon as an approved device names this fleet's key (once per device
        key), so the first command to it does not wait for an X25519 exchange."""
        if ident.status == "approved" and ident.fleet_kex and ident.fleet_kex == self._kex_id:
            self._agreed(ident)

    def command_key(self, device_id: str) -> tuple[bytes, str] | None:
        """``(K, fleet kex id)`` to MAC a command to ``device_id`` with, or None (sign it
        with Ed25519): the device is approved, its X25519 key is known and its last
        authenticated state said it holds this fleet's key."""
        ident = self.approved(device_id)
        if ident is None or self._kex is None or ident.fleet_kex != self._kex_id:
            return None
        key = self._agreed(ident)
        return None if key is None else (key, self._kex_id)

    def _agreed(self, ident: Identity) -> bytes | None:
        key = ident.mac_key
        if key is not None:
            return key
        with self._lock:
            peer = x25519_from_b64(ident.x25519) if ident.x25519 else None
            if self._kex is None or peer is None:
                return None
            key = mac_key(self._kex, peer, ident.device_id, raw_public(peer), self._kex_pub)
            ident.mac_key = key  # once per device key, not per message
            self.agreements += 1
            return key

    def _check_mac(self, ident: Identity, kind: str, topic: str, env: SignedEnvelope) -> str | None:
        key = self._agreed(ident)
        if key is None:
            return "mac_no_key"
        if env.key_id != self._kex_id:
            return "mac_wrong_fleet_key"
        if not verify_mac(env, topic, key):
            return "bad_mac"
        return None

    # -- messages of approved devices ------------------------------------------------------
    def verify(self, ident: Identity, kind: str, topic: str, env: SignedEnvelope) -> str | None:
        """Signature, rate and freshness of an approved device's message; a reason or None."""
        if env.scheme == MAC:
            why = self._check_mac(ident, kind, topic, env)
            if why is not None:
                return why
        elif env.key_id != ident.key_id:
            return "key_mismatch"
        elif not verify_envelope(env, topic, ident.public):
            return "bad_signature"
        now = self.clock()
        with self._lock:
            self.verified[env.scheme] += 1
            use = self._use(ident.device_id, now)
            if not use.bucket.take(now):
                return "rate_limited"
            if kind == "state":
                if (env.boot, env.seq) < (ident.state_boot, ident.state_seq):
                    return "stale"
                changed = (env.boot, env.seq) != (ident.state_boot, ident.state_seq)
                ident.state_boot, ident.state_seq = env.boot, env.seq
            else:
                if env.boot < ident.state_boot:
                    return "stale"  # from a boot before the device's current one
                return use.replay.admit(env.boot, env.seq)
        if changed:
            self.repo.upsert_identity(ident.row())
        return None

    def forget(self, device_id: str, kind: str, env: SignedEnvelope) -> None:
        """A message :meth:`verify` admitted was not taken (its handler failed): unmark it
        in the anti-replay window, so another copy of it (a QoS 1 redelivery, the same
        report drained from a dead process's session) is admitted instead of ``replayed``."""
        if kind == "state":
            return  # states are ordered by (boot, seq), not windowed
        with self._lock:
            use = self._usage.get(device_id)
            if use is not None:
                use.replay.forget(env.boot, env.seq)

    def _use(self, device_id: str, now: float) -> _Usage:
        use = self._usage.get(device_id)
        if use is None:
            use = _Usage(TokenBucket(self.cfg.msgs_per_second, self.cfg.msgs_burst, now))
            self._usage[device_id] = use
        return use

    def check_telemetry(self, msg: MetricsReport | SketchReport) -> str | None:
        """Per-device caps on the models and sketch windows a device reports on."""
        now = self.clock()
        model = msg.model
        with self._lock:
            use = self._use(msg.device_id, now)
            if model is not None:
                mkey = (model.name, model.version)
                for k, seen in list(use.models.items()):
                    if now - seen > 86400.0:
                        del use.models[k]
                if mkey not in use.models and len(use.models) >= self.cfg.max_models:
                    return "model_limit"
                use.models[mkey] = now
            if isinstance(msg, SketchReport):
                start = msg.window_start.timestamp()
                end = msg.window_end.timestamp()
                if (
                    now - start > self.cfg.max_window_age_s
                    or end > now + FUTURE_SKEW_S
                    or end < start
                ):
                    return "stale_window"
                wkey = (msg.model.name, msg.model.version, int(start // 3600))
                for w, seen in list(use.windows.items()):
                    if now - seen > 3600.0:
                        del use.windows[w]
                if wkey not in use.windows and len(use.windows) >= self.cfg.max_windows:
                    return "window_limit"
                use.windows[wkey] = now
        return None

    # -- enrolment -------------------------------------------------------------------------
    def enrol(self, msg: DeviceState, topic: str, env: SignedEnvelope) -> str | None:
        """A state from a device that is not approved: None when it is approved now."""
        if not msg.public_key:
            return "unknown_device"
        public = public_key_from_b64(msg.public_key)
        if env.scheme == MAC or public is None or key_id(public) != env.key_id:
            return "bad_signature"
        if not verify_envelope(env, topic, public):
            return "bad_signature"
        now = self.clock()
        tokened = bool(
            msg.enrol_proof
            and self.cfg.enrol_token_hashes
            and check_enrol_proof(
                msg.enrol_proof, list(self.cfg.enrol_token_hashes), msg.device_id, public
            )
        )
        with self._lock:
            cur = self._ids.get(msg.device_id)
            if cur is not None and cur.key_id == env.key_id and not tokened:
                self._pending_state[msg.device_id] = msg  # the same pending device again
                return "pending"
            if not self._enrol.take(now):
                return "enrol_limit"
            if not tokened and cur is None:
                pending = [i for i in self._ids.values() if i.status == "pending"]
                if len(pending) >= self.cfg.max_pending:
                    expired = [i for i in pending if now - i.created_at > PENDING_TTL_S]
                    if not expired:
                        return "pending_full"
                    for old in expired:  # nobody approved them within a day: forget them
                        self._ids.pop(old.device_id, None)
                        self._pending_state.pop(old.device_id, None)
                        self.repo.delete_identity(old.device_id)
            ident = Identity(
                device_id=msg.device_id,
                public=public,
                public_b64=msg.public_key,
                key_id=env.key_id,
                status="approved" if tokened else "pending",
                method="token" if tokened else "",
                created_at=now,
                approved_at=now if tokened else None,
                approved_by="enrolment token" if tokened else "",
                state_boot=env.boot,
                state_seq=env.seq,
                x25519=msg.x25519_key if x25519_from_b64(msg.x25519_key or "") else None,
                fleet_kex=msg.fleet_kex,
            )
            self._ids[msg.device_id] = ident
            if not tokened:
                self._pending_state[msg.device_id] = msg
        self.repo.upsert_identity(ident.row())
        if ident.x25519 is not None:
            self.repo.set_identity_x25519(ident.device_id, ident.x25519)
        self._agree_early(ident)
        if tokened:
            log.info("device %s enrolled with a token (key %s)", msg.device_id, env.key_id)
            return None
        log.info("device %s is pending approval (key %s)", msg.device_id, env.key_id)
        return "pending"

    def approve(
        self, device_id: str, actor: str, expect_key_id: str | None = None
    ) -> tuple[dict[str, Any], DeviceState | None]:
        """Pin a pending device's key; returns its identity and the birth it sent."""
        with self._lock:
            ident = self._ids.get(device_id)
            if ident is None:
                raise NotFound(
                    f"no device {device_id!r} is waiting for approval", field="device_id"
                )
            if expect_key_id and expect_key_id != ident.key_id:
                raise Conflict(
                    f"device {device_id} presents key {ident.key_id}, not {expect_key_id}",
                    field="key_id",
                )
            if ident.status != "approved":
                ident.status = "approved"
                ident.method = "operator"
                ident.approved_at = self.clock()
                ident.approved_by = actor
            state = self._pending_state.pop(device_id, None)
            row = ident.row()
        self.repo.upsert_identity(row)
        self._agree_early(ident)
        return ident.public_view(), state

    def revoke(self, device_id: str) -> None:
        """Forget a device's key: it must enrol again (a new key, a token or an approval)."""
        with self._lock:
            if self._ids.pop(device_id, None) is None:
                raise NotFound(f"device {device_id!r} has no enrolled key", field="device_id")
            self._usage.pop(device_id, None)
            self._pending_state.pop(device_id, None)
        self.repo.delete_identity(device_id)
