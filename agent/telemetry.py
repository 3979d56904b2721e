"""Feature sketches per window, computed off the request path.

    request thread ──on_prediction()──▶ bounded deque ──▶ one worker thread
                                                           │ batches rows into numpy arrays
                                                           ▼
                                        WindowSketcher (pure: events + now in, reports out)
                                                           │ window full or old enough
                                                           ▼
                                        sink(SketchReport)  → the outbox

:class:`WindowSketcher` holds one open window per model version: a
:class:`protocol.sketches.SketchBuilder` over the manifest's input schema (KLL per numeric
feature, frequent items per categorical one, counts of rows, NaN and out-of-range values)
plus the prediction scores and predicted labels. A window closes when it holds
``window_rows`` rows or is ``window_seconds`` old; it becomes a
:class:`protocol.messages.SketchReport` keyed by (device, model version, window, seq), with
``seq`` from a persisted per-device counter (the outbox's), so the server merges
idempotently.

Shadow events are not sketched (the candidate sees the same inputs as the active model).
If the queue is full the event is dropped and counted in ``dropped`` — the request never
waits. What is lost on a crash: the open windows and the queued events (at most one window
per model version); closed windows are in the outbox. A graceful stop closes open windows.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np

from protocol.messages import ModelRef, SketchReport
from protocol.schema import InputSchema
from protocol.sketches import DEFAULT_K, SketchBuilder

from .events import PredictionEvent

log = logging.getLogger(__name__)

SchemaLookup = Callable[[ModelRef], "InputSchema | None"]


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=timezone.utc)


@dataclass
class _Window:
    model: ModelRef
    builder: SketchBuilder
    start: float
    rows: int = 0


@dataclass
class _Batch:
    """Events of one model version gathered by the worker, as arrays."""

    rows: list[np.ndarray] = field(default_factory=list)
    scores: list[np.ndarray] = field(default_factory=list)
    labels: list[Any] = field(default_factory=list)
    # While every event has an (n, k) probability array for its n rows, the arrays are
    # kept and reduced to scores (max per row) in one numpy call for the whole batch.
    probs: list[np.ndarray] | None = field(default_factory=list)

    def add_scores(self, scores: np.ndarray) -> None:
        if self.probs is not None:  # leave the all-probabilities path, keeping the order
            self.scores = [_max_rows(p) for p in self.probs]
            self.probs = None
        self.scores.append(scores)

    def all_scores(self) -> np.ndarray | None:
        if self.probs is not None:
            if not self.probs:
                return None
            return _max_rows(_stack(self.probs))
        return np.concatenate(self.scores) if self.scores else None


def _max_rows(probs: np.ndarray) -> np.ndarray:
    """What ``Prediction.scores`` gives for probabilities, as float64."""
    return np.asarray(probs.max(axis=1), dtype=np.float64).reshape(-1)


class WindowSketcher:
    """Windows of sketches per model version. No threads, no clock: pass ``now``."""

    def __init__(
        self,
        device_id: str,
        *,
        schemas: SchemaLookup,
        next_seq: Callable[[], int],
        window_seconds: float = 60.0,
        window_rows: int = 10_000,
        k: int = DEFAULT_K,
    ) -> None:
        self.device_id = device_id
        self.schemas = schemas
        self.next_seq = next_seq
        self.window_seconds = window_seconds
        self.window_rows = window_rows
        self.k = k
        self._open: dict[tuple[str, str], _Window] = {}
        self.closed = 0

    def add(
        self,
        model: ModelRef,
        rows: np.ndarray,
        now: float,
        *,
        scores: Any = None,
        labels: Any = None,
    ) -> list[SketchReport]:
        """Add a batch of rows (and its predictions); return the windows this closed."""
        out: list[SketchReport] = []
        key = (model.name, model.version)
        win = self._open.get(key)
        if win is None:
            win = self._open[key] = self._new_window(model, now)
        if rows.ndim == 1:
            rows = rows.reshape(1, -1)
        # Split a batch that overflows the window so every window holds at most window_rows.
        start = 0
        while start < rows.shape[0]:
            take = min(rows.shape[0] - start, self.window_rows - win.rows)
            sl = slice(start, start + take)
            self._update(win, rows[sl], _part(scores, sl), _part(labels, sl))
            start += take
            if win.rows >= self.window_rows:
                out.append(self._close(key, now))
                win = self._open[key] = self._new_window(model, now)
        if win.rows == 0:
            self._open.pop(key, None)
        return out

    def due(self, now: float) -> list[SketchReport]:
        """Close the windows that are ``window_seconds`` old."""
        keys = [k for k, w in self._open.items() if now - w.start >= self.window_seconds]
        return [self._close(k, now) for k in keys]

    def close_all(self, now: float) -> list[SketchReport]:
        return [self._close(k, now) for k in list(self._open)]

    def open_rows(self) -> int:
        return sum(w.rows for w in self._open.values())

    def _new_window(self, model: ModelRef, now: float) -> _Window:
        schema = self.schemas(model)
        return _Window(model, SketchBuilder(schema, k=self.k), now)

    def _update(self, win: _Window, rows: np.ndarray, scores: Any, labels: Any) -> None:
        b = win.builder
        if b.schema is not None and rows.shape[1] == b.schema.n_features:
            b.update_rows(rows)
        else:  # no schema known: numeric columns by position
            for j in range(rows.shape[1]):
                b.update_numeric(f"f{j}", np.asarray(rows[:, j], dtype=np.float64))
            b.rows += int(rows.shape[0])
        if scores is not None or labels is not None:
            b.update_predictions(scores=scores, labels=labels)
        win.rows += int(rows.shape[0])

    def _close(self, key: tuple[str, str], now: float) -> SketchReport:
        win = self._open.pop(key)
        self.closed += 1
        return SketchReport(
            device_id=self.device_id,
            model=win.model,
            window_start=_dt(win.start),
            window_end=_dt(max(now, win.start)),
            seq=self.next_seq(),
            sketches=win.builder.build(),
        )


def _part(values: Any, sl: slice) -> Any:
    if values is None:
        return None
    return values[sl]


class Telemetry:
    """The :class:`PredictionObserver` that feeds a :class:`WindowSketcher` from a worker.

    The request path only appends the event to a bounded deque (no lock, no wake-up); the
    worker wakes every ``interval_s`` and sketches everything queued, ``max_batch`` events
    at a time. A KLL update per feature costs about the same for one row as for hundreds,
    so sketching in large batches is what keeps its cost per request small.
    """

    def __init__(
        self,
        sketcher: WindowSketcher,
        sink: Callable[[SketchReport], None],
        *,
        clock: Callable[[], float] = time.time,
        queue_size: int = 10_000,
        max_batch: int = 1024,
        interval_s: float = 0.25,
    ) -> None:
        self.sketcher = sketcher
        self.interval_s = interval_s
        self.sink = sink
        self.clock = clock
        self.queue_size = queue_size
        self.max_batch = max_batch
        self.dropped = 0
        self.errors = 0
        self.emitted = 0
        self._buf: deque[PredictionEvent] = deque()
        self._markers: list[threading.Event] = []
        self._lock = threading.Lock()  # the worker's step and the markers
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # PredictionObserver ------------------------------------------------------------------
    def on_prediction(self, event: PredictionEvent) -> None:
        if event.shadow or event.rows is None:
            return
        buf = self._buf
        if len(buf) >= self.queue_size:
            self.dropped += 1
            return
        buf.append(event)  # deque.append is atomic; the worker is not woken per event

    def on_feedback(self, request_id: str, model: ModelRef, truth: Any, predicted: Any) -> None:
        return None

    # worker ------------------------------------------------------------------------------
    def start(self) -> Telemetry:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._run, name="telemetry-sketcher", daemon=True
            )
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Drain the queue, close every open window, stop the worker."""
        if self._thread is not None:
            self.drain(timeout)
            self._stop.set()
            self._wake.set()
            self._thread.join(timeout)
            self._thread = None
        self._emit(self.sketcher.close_all(self.clock()))

    def drain(self, timeout: float = 10.0) -> bool:
        """Wait until every event queued so far has been sketched."""
        if self._thread is None:
            self.process_pending()
            return True
        done = threading.Event()
        with self._lock:
            self._markers.append(done)
        self._wake.set()
        return done.wait(timeout)

    def process_pending(self) -> int:
        """Sketch what is queued now (the worker's step; tests call it without a thread)."""
        with self._lock:
            markers, self._markers = self._markers, []
            n = len(self._buf)  # what is queued now; later events wait for the next step
            done = 0
            while True:
                items: list[PredictionEvent] = []
                buf = self._buf
                while buf and done < n and len(items) < self.max_batch:
                    items.append(buf.popleft())
                    done += 1
                self._handle(items)
                if done >= n:
                    break
        for m in markers:
            m.set()
        return done

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval_s)
            self._wake.clear()
            self.process_pending()

    def _handle(self, events: list[PredictionEvent]) -> None:
        try:
            reports = self._sketch(events) if events else []
            reports += self.sketcher.due(self.clock())
            self._emit(reports)
        except Exception:  # a telemetry bug must never take the worker down
            self.errors += 1
            log.exception("telemetry: sketching failed")

    def _sketch(self, events: list[PredictionEvent]) -> list[SketchReport]:
        groups: dict[tuple[str, str], list[PredictionEvent]] = {}
        for ev in events:
            m = ev.model
            groups.setdefault((m.name, m.version), []).append(ev)
        out: list[SketchReport] = []
        now = self.clock()
        for evs in groups.values():
            batch = _answered(evs) or _gathered(evs)
            rows, scores, labels = batch
            out += self.sketcher.add(evs[0].model, rows, now, scores=scores, labels=labels)
        return out

    def _emit(self, reports: list[SketchReport]) -> None:
        for r in reports:
            try:
                self.sink(r)
                self.emitted += 1
            except Exception:
                self.errors += 1
                log.exception("telemetry: sink failed for window seq %s", r.seq)


_Arrays = tuple[np.ndarray, "np.ndarray | None", "list[Any] | None"]


def _answered(events: list[PredictionEvent]) -> _Arrays | None:
    """(rows, scores, labels) of one model version's events in a few whole-batch calls,
    when every event was answered by the model with probabilities and labels for each of
    its rows (the usual case); None sends the batch to :func:`_gathered`."""
    preds = [ev.prediction for ev in events]
    if any(p is None for p in preds) or any(ev.error is not None for ev in events):
        return None
    try:
        rows = np.concatenate([ev.rows for ev in events])
        probs = np.concatenate([p.probabilities for p in preds])  # type: ignore[union-attr]
        labels = [lab for p in preds for lab in p.labels]  # type: ignore[union-attr]
    except (ValueError, TypeError):  # other widths, no probabilities or no labels
        return None
    n = rows.shape[0]
    if rows.ndim != 2 or probs.ndim != 2 or probs.shape[0] != n or len(labels) != n:
        return None
    return rows, _max_rows(probs), labels


def _gathered(events: list[PredictionEvent]) -> _Arrays:
    """(rows, scores, labels) event by event: failed requests (NaN score, no label),
    fallbacks, values instead of probabilities, rows of other widths."""
    b = _Batch()
    for ev in events:
        rows = ev.rows if ev.rows.ndim == 2 else ev.rows.reshape(1, -1)
        b.rows.append(rows)
        p = ev.prediction
        n = rows.shape[0]
        if p is not None and ev.error is None:
            probs = p.probabilities
            if (
                b.probs is not None
                and type(probs) is np.ndarray
                and probs.ndim == 2
                and probs.shape[0] == n
                and (not b.probs or b.probs[0].shape[1] == probs.shape[1])
            ):
                b.probs.append(probs)
            else:
                b.add_scores(np.asarray(p.scores, dtype=np.float64).reshape(-1)[:n])
            if p.labels is not None:
                b.labels.extend(p.labels[:n])
            else:
                b.labels.extend([None] * n)
        else:
            b.add_scores(np.full(n, np.nan))
            b.labels.extend([None] * n)
    has_labels = any(lab is not None for lab in b.labels)
    return _stack(b.rows), b.all_scores(), b.labels if has_labels else None


def _stack(parts: list[np.ndarray]) -> np.ndarray:
    if len(parts) == 1:
        return parts[0]
    widths = {p.shape[1] for p in parts}
    if len(widths) != 1:  # should not happen within one model version; keep the common shape
        w = max(widths, key=lambda x: sum(p.shape[1] == x for p in parts))
        parts = [p for p in parts if p.shape[1] == w]
    if any(p.dtype == object for p in parts):
        return np.concatenate([p.astype(object) for p in parts])
    return np.concatenate(parts)
