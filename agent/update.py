"""The device's update state machine. Pure: no I/O, no clock, no threads — ``now`` is an argument.

Events go in (a command's bytes, what the ledger knows of its id, a download's outcome, a
job's result); a list of actions comes out, and :mod:`agent.commands` carries them out
(SQLite, folders, downloads, installs). Nothing here touches a file or a socket, so every
refusal below happens before any I/O.

Admission rules
===============

A command's bytes are checked in this order; the first failure decides:

0. it parses within the protocol's caps (sizes, 64-hex sha256, chunk counts)  command_invalid
1. signed by a trusted *command* key, or MAC'd  signature_invalid / key_unknown /
   with the key agreed with a fleet key that a  key_revoked / key_wrong_role
   trusted command key announced
2. addressed to this device                     not_addressed
3. fresh: ``issued_at - skew <= now < expires_at``  command_expired / command_from_future
4. never seen before (the ledger survives restarts)  command_replayed (a redelivery re-sends
                                                its last status best-effort, within the
                                                same rate budget; nothing runs twice)
5. payload within limits: the payload its kind needs, bundle size under the device cap,
   ``http_url`` only on a trusted origin, the manifest signed by a *bundle* key
                                                command_invalid / limit_exceeded /
                                                origin_untrusted / signature_* / key_*

A refusal at 0–4 is answered best-effort (:class:`Refuse` with ``persist=False``): it is
rate-limited, counted in memory by reason, and never written anywhere, so forged traffic
cannot fill a disk. Only a command that passed 1–4 enters the ledger (:class:`Report`).

Per-command states (the transition table, :data:`TRANSITIONS`)::

    new ──▶ accepted | rejected
    accepted ──▶ downloading | verifying | rolled_back | done | rejected | failed
    downloading ──▶ downloading | verifying | rejected | failed
    verifying ──▶ installed | rejected | failed
    installed, rolled_back, done, rejected, failed: terminal

A move the table does not allow raises :class:`IllegalTransition`; a terminal command never
changes again.

Downloads: :meth:`Update.download_begun` says what follows once the folder exists (fetch
over HTTP, install a complete download, ask only for missing chunks, or wait for the
server's chunks) and :meth:`Update.chunk_stored` reports progress once per quarter and
installs when the last chunk lands.

Artifact chunks (:func:`check_chunk`) are checked against the signed deploy — artifact sha,
index, count, exact size, base64 length before a byte is decoded, then the chunk's sha256
against the one the signed deploy lists for its index — before anything is buffered.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Union
from urllib.parse import urlsplit

from protocol.device_mac import AgreedKey
from protocol.errors import ProtocolError, ReasonCode, SignatureError
from protocol.messages import (
    MAX_BUNDLE_BYTES,
    ArtifactChunk,
    Command,
    DeployPayload,
    ModelRef,
    decode,
    verify_command,
)
from protocol.signing import TrustStore
from protocol.states import COMMAND_FINAL, COMMAND_KINDS

MAX_TRACKED = 1024  # command states kept in memory (the ledger keeps every admitted id)
TERMINAL = COMMAND_FINAL
TRANSITIONS: dict[str, frozenset[str]] = {
    "new": frozenset({"accepted", "rejected"}),
    "accepted": frozenset(
        {"downloading", "verifying", "rolled_back", "done", "rejected", "failed"}
    ),
    "downloading": frozenset({"downloading", "verifying", "rejected", "failed"}),
    "verifying": frozenset({"installed", "rejected", "failed"}),
    **{t: frozenset() for t in TERMINAL},
}
# A transfer that went wrong is a failure (a retry may work); a bad bundle is rejected.
FAILED_NOT_REJECTED = frozenset(
    {ReasonCode.DISK_FULL, ReasonCode.INTERNAL, ReasonCode.DOWNLOAD_FAILED}
)


class IllegalTransition(Exception):
    """The driver asked for a move the transition table refuses (a bug, not an attack)."""


# -- actions ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Refuse:
    """Answer ``rejected``. ``persist=False``: best-effort, never stored (steps 0–4)."""

    command_id: str
    kind: str
    reason: ReasonCode
    detail: str
    persist: bool
    rollout_id: str | None = None
    command: Command | None = None  # set when persist (the ledger keeps it)


@dataclass(frozen=True)
class Report:
    """Record and send a status of an admitted command."""

    command: Command
    state: str
    reason: ReasonCode | None = None
    detail: str = ""
    progress: float | None = None
    model: ModelRef | None = None
    result: dict[str, Any] | None = None


@dataclass(frozen=True)
class Redeliver:
    """A redelivered command: re-send its last status, or ask for missing chunks again."""

    command: Command
    last_status: bytes | None
    ask_missing: bool


@dataclass(frozen=True)
class Run:
    """Start the work an admitted command asks for (driver: download / rollback / …)."""

    job: str  # download | fetch | install | rollback | benchmark | config | shadow_stop
    command: Command


@dataclass(frozen=True)
class AskMissing:
    """Report ``downloading`` with the indices still missing (the server resends those)."""

    command: Command


Action = Union[Refuse, Report, Redeliver, Run, AskMissing]


@dataclass(frozen=True)
class Seen:
    """What the ledger holds for a command id."""

    state: str
    last_status: bytes | None


@dataclass(frozen=True)
class Limits:
    clock_skew_s: float = 300.0
    max_bundle_bytes: int = MAX_BUNDLE_BYTES
    refusals_per_s: float = 5.0  # best-effort rejections sent, sustained
    refusal_burst: int = 20


def origin_of(url: str) -> str | None:
    """``scheme://host[:port]`` of an http(s) URL, lower-cased; None if it is not one."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username:
        return None
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}" + (f":{port}" if port is not None else "")


def check_fresh(cmd: Command, now: datetime, skew_s: float) -> tuple[ReasonCode, str] | None:
    if cmd.issued_at is None or cmd.expires_at is None:
        return ReasonCode.COMMAND_INVALID, "a command needs issued_at and expires_at"
    if now >= cmd.expires_at:
        return ReasonCode.COMMAND_EXPIRED, f"command expired at {cmd.expires_at.isoformat()}"
    if cmd.issued_at - timedelta(seconds=skew_s) > now:
        return (
            ReasonCode.COMMAND_FROM_FUTURE,
            f"command issued at {cmd.issued_at.isoformat()}, beyond the {skew_s:g}s clock skew",
        )
    return None


def check_chunk(
    payload: DeployPayload, sha256: str, raw: bytes
) -> tuple[ArtifactChunk | None, bytes, str]:
    """Check an artifact chunk's bytes against the signed deploy before anything is buffered.

    ``sha256`` is the one in the topic. Returns ``(chunk, data, "")`` or ``(None, b"", why)``.
    """
    if sha256 != payload.bundle_sha256:
        return None, b"", "chunk for another artifact"
    try:
        chunk = decode(ArtifactChunk, raw)
    except ProtocolError as exc:
        return None, b"", str(exc)
    data, why = check_chunk_model(payload, chunk)
    return (chunk, data, "") if not why else (None, b"", why)


def check_chunk_model(payload: DeployPayload, chunk: ArtifactChunk) -> tuple[bytes, str]:
    """``(data, "")`` when the chunk is exactly what the signed deploy announces."""
    if chunk.sha256 != payload.bundle_sha256 or chunk.count != payload.n_chunks:
        return b"", "chunk sha256/count differ from the signed deploy"
    if chunk.index >= payload.n_chunks:
        return b"", f"chunk index {chunk.index} ≥ {payload.n_chunks}"
    size = payload.chunk_bytes(chunk.index)
    if len(chunk.data) != 4 * (-(-size // 3)):
        return b"", f"chunk {chunk.index} is not {size} bytes"
    try:
        data = base64.b64decode(chunk.data, validate=True)
    except ValueError:
        return b"", "chunk data is not base64"
    digest = hashlib.sha256(data).digest()
    if len(data) != size or digest.hex() != chunk.chunk_sha256:
        return b"", f"chunk {chunk.index} does not match its sha256 or size"
    signed = payload.chunk_digests
    if signed is not None and signed[chunk.index] != digest:
        return b"", f"chunk {chunk.index} is not the one the signed deploy lists"
    return data, ""


@dataclass
class Update:
    """The decisions of one device. The driver feeds it events and carries out its actions."""

    device_id: str
    command_trust: TrustStore
    bundle_trust: TrustStore
    origins: tuple[str, ...] = ()
    limits: Limits = Limits()
    states: dict[str, str] = field(default_factory=dict)
    refused: Counter[str] = field(default_factory=Counter)
    refusals_unsent: int = 0
    duplicates: int = 0
    _tokens: float = -1.0
    _tokens_at: datetime | None = None
    _quarters: dict[str, int] = field(default_factory=dict)
    # keys agreed with the fleet (fleet kex id → K): a command may carry a MAC under one
    # instead of an Ed25519 signature (protocol.messages.verify_command)
    agreed: dict[str, AgreedKey] = field(default_factory=dict)

    # -- admission -----------------------------------------------------------------------
    def admit(self, raw: bytes, now: datetime) -> Command | Refuse | None:
        """Steps 0–3. A :class:`Command` passed them; a :class:`Refuse` (not persisted) or
        ``None`` (not even answerable, or over the refusal budget) did not."""
        try:
            cmd = decode(Command, raw)
        except ProtocolError as exc:
            cid, kind, rollout = _ids(raw)
            return self._refuse_unsent(
                cid, kind, rollout, ReasonCode.COMMAND_INVALID, str(exc), now
            )
        try:
            verify_command(cmd, self.command_trust, self.agreed)
        except SignatureError as exc:
            detail = f"{cmd.kind} commands must be signed" if cmd.signature is None else exc.message
            return self._refuse_unsent(
                cmd.command_id, cmd.kind, cmd.rollout_id, exc.reason, detail, now
            )
        if cmd.device_id != self.device_id:
            return self._refuse_unsent(
                cmd.command_id,
                cmd.kind,
                cmd.rollout_id,
                ReasonCode.NOT_ADDRESSED,
                f"command is for {cmd.device_id[:64]}",
                now,
            )
        stale = check_fresh(cmd, now, self.limits.clock_skew_s)
        if stale is not None:
            return self._refuse_unsent(cmd.command_id, cmd.kind, cmd.rollout_id, *stale, now)
        return cmd

    def decide(
        self,
        cmd: Command,
        seen: Seen | None,
        *,
        downloading: bool = False,
        now: datetime | None = None,
    ) -> list[Action]:
        """Steps 4–5 for an admitted command; ``seen`` is the ledger's answer for its id.

        A redelivery (or a replay: the bytes are the same) is answered only within the
        refusal budget, so replaying a captured command cannot make the device write."""
        if seen is not None:
            self.duplicates += 1
            self.refused[ReasonCode.COMMAND_REPLAYED.value] += 1
            self.states.setdefault(cmd.command_id, seen.state)
            if now is not None and not self._take_token(now):
                self.refusals_unsent += 1
                return []
            terminal = seen.state in TERMINAL
            return [
                Redeliver(
                    cmd,
                    seen.last_status if terminal else None,
                    ask_missing=not terminal and cmd.kind == "deploy" and downloading,
                )
            ]
        self.states[cmd.command_id] = "new"
        problem = self._payload_problem(cmd)
        if problem is not None:
            return [self.report(cmd, "rejected", reason=problem[0], detail=problem[1])]
        detail = ""
        if cmd.kind == "deploy" and cmd.deploy is not None:
            m = _manifest_preview(cmd.deploy)
            detail = f"{m.get('name')} {m.get('version')}"
        return [self.report(cmd, "accepted", detail=detail), Run(_job(cmd.kind), cmd)]

    def _payload_problem(self, cmd: Command) -> tuple[ReasonCode, str] | None:
        need = {"deploy": cmd.deploy, "config": cmd.config}
        if cmd.kind in need and need[cmd.kind] is None:
            return ReasonCode.COMMAND_INVALID, f"{cmd.kind} command without its payload"
        p = cmd.deploy
        if cmd.kind != "deploy" or p is None:
            return None
        if p.bundle_size > self.limits.max_bundle_bytes:
            return (
                ReasonCode.LIMIT_EXCEEDED,
                f"bundle of {p.bundle_size} bytes is over the {self.limits.max_bundle_bytes} limit",
            )
        if p.http_url is None and p.chunk_digests is None:
            return ReasonCode.COMMAND_INVALID, "an MQTT deploy must list every chunk's sha256"
        if p.http_url is not None and origin_of(p.http_url) not in self.origins:
            return (
                ReasonCode.ORIGIN_UNTRUSTED,
                f"http_url origin {origin_of(p.http_url) or p.http_url[:80]!r} is not trusted",
            )
        try:
            manifest = p.manifest_bytes()
        except ValueError:
            return ReasonCode.MANIFEST_INVALID, "manifest is not base64"
        try:
            self.bundle_trust.verify(manifest, p.manifest_signature)
        except SignatureError as exc:
            return exc.reason, f"manifest: {exc.message}"
        return None

    # -- progress of admitted commands ---------------------------------------------------
    def report(
        self,
        cmd: Command,
        state: str,
        *,
        reason: ReasonCode | None = None,
        detail: str = "",
        progress: float | None = None,
        model: ModelRef | None = None,
        result: dict[str, Any] | None = None,
    ) -> Report:
        """Move ``cmd`` to ``state`` through the transition table; the status to record."""
        current = self.states.get(cmd.command_id, "accepted")
        if state not in TRANSITIONS.get(current, frozenset()):
            raise IllegalTransition(f"{cmd.command_id}: {current} → {state}")
        self.states[cmd.command_id] = state
        if state in TERMINAL and len(self.states) > MAX_TRACKED:
            # finished commands live on in the ledger; keep memory bounded here
            for cid in [c for c, s in self.states.items() if s in TERMINAL][: MAX_TRACKED // 2]:
                del self.states[cid]
        return Report(cmd, state, reason, detail, progress, model, result)

    def refused_job(self, cmd: Command, reason: ReasonCode, detail: str) -> Report:
        """A job failed with ``reason``: ``failed`` if a retry may work, else ``rejected``."""
        state = "failed" if reason in FAILED_NOT_REJECTED else "rejected"
        return self.report(cmd, state, reason=reason, detail=detail)

    def download_begun(
        self, cmd: Command, *, http: bool, complete: bool, progress: float
    ) -> list[Action]:
        """The download folder exists: what comes next."""
        if http:
            return [Run("fetch", cmd)]
        if complete:
            return [Run("install", cmd)]
        if progress > 0:  # chunks kept from an earlier attempt: ask only for the rest
            return [AskMissing(cmd)]
        # the server is sending already; asking for "everything missing" would double it
        return [self.report(cmd, "downloading", progress=0.0)]

    def chunk_stored(self, cmd: Command, progress: float, *, complete: bool) -> list[Action]:
        """A chunk was stored: install when complete, else report each new quarter."""
        if complete:
            self._quarters.pop(cmd.command_id, None)
            return [Run("install", cmd)]
        q = int(progress * 4)
        if progress >= 1.0 or q <= self._quarters.get(cmd.command_id, 0):
            return []  # (complete already: its install is under way)
        self._quarters[cmd.command_id] = q
        return [self.report(cmd, "downloading", progress=round(progress, 3))]

    def resumed(self, cmd: Command, state: str = "downloading") -> None:
        """A download found on disk after a restart continues from ``state``."""
        self.states[cmd.command_id] = state

    # -- best-effort refusals ------------------------------------------------------------
    def _refuse_unsent(
        self,
        cid: str | None,
        kind: str,
        rollout_id: str | None,
        reason: ReasonCode,
        detail: str,
        now: datetime,
    ) -> Refuse | None:
        self.refused[reason.value] += 1
        if cid is None or not self._take_token(now):
            self.refusals_unsent += 1
            return None
        return Refuse(cid, kind, reason, detail[:300], persist=False, rollout_id=rollout_id)

    def _take_token(self, now: datetime) -> bool:
        lim = self.limits
        if self._tokens_at is None:
            self._tokens = float(lim.refusal_burst)
        else:
            elapsed = max(0.0, (now - self._tokens_at).total_seconds())
            self._tokens = min(
                float(lim.refusal_burst), self._tokens + elapsed * lim.refusals_per_s
            )
        self._tokens_at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


def _job(kind: str) -> str:
    return "download" if kind == "deploy" else kind


def _ids(raw: bytes) -> tuple[str | None, str, str | None]:
    """Command id, kind and rollout id of an unparsable command, when they are safe to echo."""
    try:
        obj = json.loads(raw)
        cid = obj["command_id"]
        kind = obj.get("kind")
        rollout = obj.get("rollout_id")
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
        return None, "config", None
    ok = isinstance(cid, str) and 0 < len(cid) <= 128 and cid.isprintable()
    return (
        cid if ok else None,
        kind if kind in COMMAND_KINDS else "config",
        rollout if isinstance(rollout, str) and len(rollout) <= 128 else None,
    )


def _manifest_preview(payload: DeployPayload) -> dict[str, Any]:
    try:
        data = json.loads(payload.manifest_bytes())
        return {k: data.get(k) for k in ("name", "version", "release")}
    except (ValueError, TypeError, AttributeError):
        return {}
