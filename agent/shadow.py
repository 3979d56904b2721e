"""Shadow mode: compare a candidate model with the active one on live traffic.

A bundle deployed with ``DeployPayload.shadow=True`` is installed without switching and
handed to :meth:`Predictor.set_shadow`; the predictor runs it on the same rows off the
request path and emits ``PredictionEvent(shadow=True)`` with the same ``request_id``.
:class:`ShadowComparer` pairs the two events by request id (whichever comes first waits,
bounded) and accumulates, per period:

- ``agreement``: share of rows where the candidate agrees — same label for classifiers,
  ``|Δ| ≤ atol + rtol·|active|`` for regressors;
- ``mean_abs_diff``: mean absolute difference of the scores (max probability or value);
- the candidate's latency p50/p95 and its error count; requests that never paired.

:meth:`ShadowComparer.snapshot` closes the period and returns the dict carried in
``MetricsReport.shadow`` (None when no shadow ran in the period).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np

from protocol.messages import ModelRef

from .events import PredictionEvent

MAX_PENDING = 5_000


class ShadowComparer:
    def __init__(
        self,
        *,
        atol: float = 1e-6,
        rtol: float = 1e-3,
        max_pending: int = MAX_PENDING,
        running: Callable[[], bool] | None = None,
    ) -> None:
        """``running`` says whether a shadow model is loaded; while it is not, active
        predictions are not kept for pairing (no cost, no false "unmatched")."""
        self.atol = atol
        self.rtol = rtol
        self.max_pending = max_pending
        self.running = running
        self._lock = threading.Lock()
        self._active: OrderedDict[str, PredictionEvent] = OrderedDict()
        self._shadow: OrderedDict[str, PredictionEvent] = OrderedDict()
        self._reset()

    def _reset(self) -> None:
        self.model: ModelRef | None = None
        self.compared_requests = 0
        self.compared_rows = 0
        self.agreeing_rows = 0
        self.abs_diff_sum = 0.0
        self.errors = 0
        self.unmatched = 0
        self.latencies: list[float] = []

    # PredictionObserver ------------------------------------------------------------------
    def on_prediction(self, event: PredictionEvent) -> None:
        if not event.request_id:
            return
        try:
            with self._lock:
                if event.shadow:
                    self.model = event.model
                    self.latencies.append(event.latency_ms)
                    if len(self.latencies) > 50_000:
                        del self.latencies[::2]
                    if event.error is not None:
                        self.errors += 1
                        self._active.pop(event.request_id, None)
                        return
                    mine, other = self._shadow, self._active
                else:
                    if self.running is not None and not self.running():
                        return
                    mine, other = self._active, self._shadow
                peer = other.pop(event.request_id, None)
                if peer is None:
                    mine[event.request_id] = event
                    while len(mine) > self.max_pending:
                        mine.popitem(last=False)
                        self.unmatched += 1
                    return
            active, shadow = (peer, event) if event.shadow else (event, peer)
            self._compare(active, shadow)
        except Exception:  # an observer never raises
            pass

    def on_feedback(self, request_id: str, model: ModelRef, truth: Any, predicted: Any) -> None:
        return None

    def _compare(self, active: PredictionEvent, shadow: PredictionEvent) -> None:
        a, s = active.prediction, shadow.prediction
        if a is None or s is None:
            return
        n = len(active.rows)
        if a.labels is not None and s.labels is not None:
            agree = int(sum(str(x) == str(y) for x, y in zip(a.labels, s.labels, strict=False)))
        else:
            av = np.asarray(
                a.values if a.values is not None else a.scores, dtype=np.float64
            ).reshape(n, -1)
            sv = np.asarray(
                s.values if s.values is not None else s.scores, dtype=np.float64
            ).reshape(n, -1)
            ok = np.abs(av - sv) <= self.atol + self.rtol * np.abs(av)
            agree = int(ok.all(axis=1).sum())
        diff = float(
            np.abs(
                np.asarray(a.scores, dtype=np.float64) - np.asarray(s.scores, dtype=np.float64)
            ).sum()
        )
        with self._lock:
            self.compared_requests += 1
            self.compared_rows += n
            self.agreeing_rows += agree
            self.abs_diff_sum += diff

    # reporting ---------------------------------------------------------------------------
    def snapshot(self, reset: bool = True) -> dict[str, Any] | None:
        with self._lock:
            if self.model is None and not self.compared_requests:
                return None
            lat = np.asarray(self.latencies, dtype=np.float64)
            out: dict[str, Any] = {
                "model": None if self.model is None else self.model.model_dump(exclude_none=True),
                "compared_requests": self.compared_requests,
                "compared_rows": self.compared_rows,
                "agreement": self.agreeing_rows / self.compared_rows
                if self.compared_rows
                else None,
                "mean_abs_diff": self.abs_diff_sum / self.compared_rows
                if self.compared_rows
                else None,
                "latency_p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
                "latency_p95_ms": float(np.percentile(lat, 95)) if lat.size else None,
                "errors": self.errors,
                "unmatched": self.unmatched,
            }
            if reset:
                self._reset()
            return out
