"""Events the agent core emits for telemetry, the MQTT link and shadow mode.

Observers are called on the request path: they must be cheap (enqueue and return) and must
never raise. The predictor guards each call anyway and counts observer errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import numpy as np

from protocol.feeds import Prediction
from protocol.messages import ModelRef


class PredictionEvent(NamedTuple):
    """One answered (or failed) predict call.

    A NamedTuple, not a frozen dataclass: one is made per request, and a tuple is built
    several times faster and is a single object for the garbage collector to track while
    the events wait in the observers' queues."""

    ts: float
    request_id: str
    model: ModelRef
    rows: np.ndarray  # 2-D, schema feature order (object dtype if mixed)
    prediction: Prediction | None
    latency_ms: float
    error: str | None
    fallback: bool
    shadow: bool = False


class PredictionObserver(Protocol):
    def on_prediction(self, event: PredictionEvent) -> None: ...

    def on_feedback(self, request_id: str, model: ModelRef, truth: Any, predicted: Any) -> None: ...


@dataclass(frozen=True)
class InstallEvent:
    """One step of an install, rollback or refusal (``state``: protocol.states.DeviceStateName)."""

    state: str
    reason: str | None
    detail: str
    model: ModelRef | None
