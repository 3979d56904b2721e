"""A readable live view of any topic filter: one line per message.

:func:`summarize` turns a payload on an edgefleet topic into a one-line summary (device,
kind and the few fields a person watching wants); anything else is shown as its size and
a short text preview. :func:`follow` subscribes and hands each line to ``emit`` (the CLI
prints it) until ``limit`` messages or ``duration`` seconds; ``on_waiting`` hears once it
is subscribed and whenever ``idle_s`` pass without a message (the CLI says "waiting …").
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from protocol.errors import ProtocolError
from protocol.messages import (
    Alert,
    ArtifactChunk,
    Command,
    CommandStatus,
    DeviceState,
    MetricsReport,
    ModelRef,
    SketchReport,
)
from protocol.topics import DEFAULT_PREFIX, Topics

from .subscriber import Subscriber, decode_topic


def _model(ref: ModelRef | None) -> str:
    return f"{ref.name} {ref.version} (r{ref.release})" if ref else "no model"


def _num(x: float | None, unit: str = "", digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}{unit}"


def _hm(ts: datetime) -> str:
    return ts.astimezone(timezone.utc).strftime("%H:%M:%S")


def _describe(kind: str, m: Any) -> str:
    if isinstance(m, DeviceState):
        if not m.online:
            return "offline"
        agent = m.agent_version or "?"
        return f"online profile={m.profile or '?'} model={_model(m.model)} agent={agent}"
    if isinstance(m, CommandStatus):
        bits = [m.state, f"cmd={m.command_id}"]
        if m.progress is not None and m.state in ("downloading", "progress"):
            bits.append(f"{m.progress:.0%}")
        if m.model:
            bits.append(f"model={_model(m.model)}")
        if m.reason:
            bits.append(f"reason={m.reason}")
        if m.detail:
            bits.append(f"— {m.detail}")
        return " ".join(bits)
    if isinstance(m, MetricsReport):
        acc = f" acc={_num(m.accuracy)}" if m.accuracy is not None else ""
        return (
            f"{_model(m.model)} req={m.requests} err={m.errors} fallback={m.fallbacks} "
            f"p50={_num(m.latency.p50_ms, 'ms')} p95={_num(m.latency.p95_ms, 'ms')}{acc}"
            + (f" conditions={','.join(m.conditions)}" if m.conditions else "")
        )
    if isinstance(m, SketchReport):
        return (
            f"{_model(m.model)} rows={m.sketches.rows} features={len(m.sketches.features)} "
            f"window={_hm(m.window_start)}–{_hm(m.window_end)} seq={m.seq}"
        )
    if isinstance(m, Command):
        extra = ""
        if m.deploy is not None:
            extra = f" bundle={m.deploy.bundle_sha256[:12]} chunks={m.deploy.n_chunks}"
        elif m.rollback is not None and m.rollback.target is not None:
            t = m.rollback.target
            extra = f" to={t.name} {t.version} (r{t.release})"
        elif m.rollback is not None:
            extra = f" to_release={m.rollback.to_release or 'previous'}"
        signed = "signed" if m.signature else "unsigned"
        return f"{m.kind} id={m.command_id}{extra} rollout={m.rollout_id or '–'} {signed}"
    if isinstance(m, ArtifactChunk):
        return f"{m.sha256[:12]} chunk {m.index + 1}/{m.count} ({len(m.data) * 3 // 4} B)"
    if isinstance(m, Alert):
        what = " ".join(x for x in (m.model, m.version, m.rollout_id) if x)
        return f"{m.kind} {what}: {m.message}".replace("  ", " ")
    return kind  # pragma: no cover - every TOPIC_MODELS kind is handled above


def summarize(topic: str, payload: bytes, topics: Topics | None = None) -> str:
    """One readable line for one message."""
    topics = topics or Topics()
    try:
        device_id, kind, msg = decode_topic(topics, topic, payload)
    except ProtocolError as exc:
        if topics.parse(topic) is None and topic != topics.alerts():
            return f"{topic} {_preview(payload)}"
        return f"{topic} INVALID: {exc}"
    who = device_id if device_id is not None else "fleet"
    return f"{who} {kind}: {_describe(kind, msg)}"


def _preview(payload: bytes, width: int = 60) -> str:
    try:
        text = payload.decode()
    except UnicodeDecodeError:
        return f"({len(payload)} bytes, binary)"
    text = " ".join(text.split())
    return f"({len(payload)} bytes) {text[:width]}{'…' if len(text) > width else ''}"


def follow(
    url: str,
    topic_filter: str = "#",
    emit: Callable[[str], None] = lambda line: None,
    *,
    prefix: str = DEFAULT_PREFIX,
    limit: int | None = None,
    duration: float | None = None,
    timestamps: bool = True,
    on_waiting: Callable[[], None] | None = None,
    idle_s: float = 10.0,
    **subscriber_kw: Any,
) -> int:
    """Subscribe to ``topic_filter`` and emit one line per message. Returns the count.

    Runs until ``limit`` messages were shown or ``duration`` seconds passed (forever when
    both are None; the CLI stops it with Ctrl-C).
    """
    topics = Topics(prefix)
    inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
    sub = Subscriber(url, topic_filter, handler=lambda t, p: inbox.put((t, p)), **subscriber_kw)
    deadline = None if duration is None else time.monotonic() + duration
    shown = 0
    with sub:
        if on_waiting is not None:
            on_waiting()
        quiet_since = time.monotonic()
        while limit is None or shown < limit:
            wait = 0.5 if deadline is None else deadline - time.monotonic()
            if wait <= 0:
                break
            try:
                topic, payload = inbox.get(timeout=min(wait, 0.5))
            except queue.Empty:
                if on_waiting is not None and time.monotonic() - quiet_since >= idle_s:
                    on_waiting()
                    quiet_since = float("inf")  # once per quiet stretch
                continue
            quiet_since = time.monotonic()
            line = summarize(topic, payload, topics)
            if timestamps:
                line = f"{datetime.now(timezone.utc).strftime('%H:%M:%S')} {line}"
            emit(line)
            shown += 1
    return shown
