"""The in-process predictor: the model behind the local API, and ``agent.Predictor``.

A loaded model is an immutable :class:`LoadedModel` (runtime, manifest, schema plan).
:meth:`Predictor.swap` replaces the pointer to it in one assignment, so a request that
already took the old one finishes on it and none is dropped. When the runtime raises, the
fallback named by the config (or else the manifest) answers: a constant, the previous
model, or none (the error is raised). Every fallback is counted and flagged.

Observers (prediction log, sketcher, metrics) are called after the answer is computed;
they must only enqueue. A shadow candidate gets the rows through a bounded queue on one
background thread and never answers a request.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from protocol.bundle import sha256_hex
from protocol.feeds import FeedError, Prediction, decode_outputs, rows_from_instances
from protocol.manifest import Manifest
from protocol.messages import ModelRef

from .config import AgentConfig
from .errors import InferenceError, InputError, ModelError, NoModelError
from .events import PredictionEvent, PredictionObserver
from .inputs import FeedPlan, SchemaPlan, validate_rows
from .runtimes import Runtime, open_runtime

log = logging.getLogger("edgefleet.agent.predictor")

FEEDBACK_MEMORY = 10_000
# Request ids: 16 random hex digits per process + a counter (unique, and cheaper than uuid4).
_ID_PREFIX = uuid.uuid4().hex[:16]
_ID_COUNTER = itertools.count(1)
SHADOW_QUEUE = 1_000


_F32 = np.dtype(np.float32)
_INT_TENSORS = ("tensor(int64)", "tensor(int32)")
_FLOAT_TENSORS = ("tensor(float)", "tensor(double)")


@dataclass(frozen=True)
class DirectPath:
    """Rows straight to the runtime and outputs straight to the answer.

    Taken when the rows are the model's only input as they are (every feature in order,
    one float32 (n, features) tensor) and the outputs are integer labels with float
    probabilities, or float values. ``label``, ``proba`` and ``value`` are positions in
    the runtime's output list. The arrays are returned as the runtime made them (labels
    1-D, the others 2-D); :class:`PredictResult` turns them into lists when read.
    """

    run_array: Callable[[np.ndarray], list[np.ndarray]]
    label: int | None
    proba: int | None
    value: int | None

    @classmethod
    def plan(
        cls, runtime: Runtime, feed_plan: FeedPlan, plan: SchemaPlan, out: Any
    ) -> DirectPath | None:
        names = list(runtime.output_names)
        types = list(getattr(runtime, "output_types", None) or [])
        if (
            not plan.all_numeric
            or len(runtime.input_names) != 1
            or feed_plan.single != runtime.input_names[0]
            or runtime.input_type(runtime.input_names[0]) != _F32
            or len(types) != len(names)
        ):
            return None

        def pos(name: str | None, allowed: tuple[str, ...]) -> int | None:
            if name is None or name not in names:
                return None
            i = names.index(name)
            return i if types[i] in allowed else None

        if out.task == "regression":
            value = pos(out.value_output or names[0], _FLOAT_TENSORS)
            return None if value is None else cls(runtime.run_array, None, None, value)
        label = pos(out.label_output, _INT_TENSORS)
        proba = pos(out.probability_output, _FLOAT_TENSORS)
        if label is None or (out.probability_output is not None and proba is None):
            return None  # string labels, labels from classes, ...: the general decoder
        return cls(runtime.run_array, label, proba, None)

    def __call__(self, x: np.ndarray) -> tuple[Any, Any, Any]:
        """(labels, probabilities, values) for a C-contiguous float32 (n, features) array."""
        outs = self.run_array(x)
        labels = probs = values = None
        try:
            if self.label is not None:
                labels = outs[self.label]
                if labels.ndim != 1:
                    labels = labels.reshape(-1)
            if self.proba is not None:
                probs = outs[self.proba]
                if probs.ndim != 2:
                    probs = probs.reshape(x.shape[0], -1)
            if self.value is not None:
                values = outs[self.value]
                if values.ndim != 2:
                    values = values.reshape(x.shape[0], -1)
        except ValueError as exc:
            raise InferenceError(f"model outputs do not match the output schema: {exc}") from None
        return labels, probs, values


@dataclass(frozen=True)
class LoadedModel:
    runtime: Runtime
    manifest: Manifest
    ref: ModelRef
    plan: SchemaPlan

    feed_plan: FeedPlan
    # (label, probability) output names when both exist: decoded without the general path
    # (same result as protocol.feeds.decode_outputs for integer labels; tested).
    fast_outputs: tuple[str, str] | None = None
    direct: DirectPath | None = None

    @classmethod
    def open(cls, manifest: Manifest, model_bytes: bytes, threads: int) -> LoadedModel:
        runtime = open_runtime(model_bytes, manifest, threads)
        ref = ModelRef(
            name=manifest.name,
            version=manifest.version,
            release=manifest.release,
            sha256=sha256_hex(model_bytes),
        )
        schema = manifest.input_schema
        out = manifest.output_schema
        fast = None
        names = set(runtime.output_names)
        if out.task == "classification" and {out.label_output, out.probability_output} <= names:
            fast = (str(out.label_output), str(out.probability_output))
        plan, feed_plan = SchemaPlan(schema), FeedPlan(schema)
        direct = DirectPath.plan(runtime, feed_plan, plan, out)
        return cls(runtime, manifest, ref, plan, feed_plan, fast, direct)

    def run(self, arr: np.ndarray) -> tuple[Any, Any, Any]:
        """(labels, probabilities, values) for validated rows. Labels may be a 1-D integer
        array and the others 2-D arrays in the model's dtype; see :class:`PredictResult`."""
        direct = self.direct
        if direct is not None:
            if arr.dtype is not _F32 or not arr.flags.c_contiguous:
                arr = np.ascontiguousarray(arr, dtype=np.float32)
            return direct(arr)
        pred = self.infer(arr)
        return pred.labels, pred.probabilities, pred.values

    def infer(self, arr: np.ndarray) -> Prediction:
        if self.direct is not None:
            labels, probs, values = self.run(arr)
            return Prediction(_as_list(labels), probs, values)
        try:
            feeds = self.feed_plan.feeds(arr)
        except FeedError as exc:
            raise InputError(str(exc)) from None
        outputs = self.runtime.run(feeds)
        fast = self.fast_outputs
        if fast is not None:
            labels = outputs.get(fast[0])
            probs = outputs.get(fast[1])
            if labels is not None and probs is not None and labels.dtype.kind in "iu":
                n = probs.shape[0]
                p = probs if probs.dtype == np.float64 else probs.astype(np.float64)
                return Prediction(
                    labels=labels.reshape(-1).tolist(), probabilities=p.reshape(n, -1)
                )
        try:
            return decode_outputs(outputs, self.manifest.output_schema)
        except (KeyError, IndexError, ValueError, TypeError) as exc:
            raise InferenceError(f"model outputs do not match the output schema: {exc}") from None


def _request_id(key: str | int) -> str:
    """A request id from what the predictor keeps: the caller's string, or our counter
    (formatted only when someone reads it)."""
    return key if type(key) is str else f"{_ID_PREFIX}{key:08x}"


def _as_list(v: Any) -> Any:
    return v.tolist() if isinstance(v, np.ndarray) else v


class PredictResult:
    """One answer: request id, model, outputs, latency, and whether a fallback answered.

    ``labels``, ``probabilities`` and ``values`` are plain lists, built when first read
    from the arrays the runtime returned (nothing is converted that nobody reads);
    :meth:`arrays` gives the arrays themselves.
    """

    __slots__ = ("_out", "_rid", "error", "fallback", "latency_ms", "model")

    def __init__(
        self,
        request_id: str | int,
        model: ModelRef,
        labels: Any = None,
        probabilities: Any = None,
        values: Any = None,
        latency_ms: float = 0.0,
        fallback: bool = False,
        error: str | None = None,
    ) -> None:
        self._rid = request_id
        self.model = model
        self.latency_ms = latency_ms
        self.fallback = fallback
        self.error = error
        self._out = (labels, probabilities, values)

    @property
    def request_id(self) -> str:
        return _request_id(self._rid)

    @property
    def labels(self) -> list[Any] | None:
        return _as_list(self._out[0])

    @property
    def probabilities(self) -> list[list[float]] | None:
        return _as_list(self._out[1])

    @property
    def values(self) -> list[list[float]] | None:
        return _as_list(self._out[2])

    def arrays(self) -> tuple[Any, Any, Any]:
        """(labels, probabilities, values) as the runtime returned them (None if absent)."""
        return self._out

    def __repr__(self) -> str:
        return (
            f"PredictResult(request_id={self.request_id!r}, model={self.model.version!r}, "
            f"labels={self.labels!r}, probabilities={self.probabilities!r}, "
            f"values={self.values!r}, latency_ms={self.latency_ms:.4f}, "
            f"fallback={self.fallback})"
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "request_id": self.request_id,
            "model": {
                "name": self.model.name,
                "version": self.model.version,
                "release": self.model.release,
            },
        }
        for key, value in zip(("labels", "probabilities", "values"), self._out, strict=True):
            if value is not None:
                out[key] = _as_list(value)
        out["latency_ms"] = round(self.latency_ms, 4)
        out["fallback"] = self.fallback
        return out


@dataclass
class PredictorStats:
    requests: int = 0
    rows: int = 0
    errors: int = 0
    fallbacks: int = 0
    observer_errors: int = 0
    shadow_dropped: int = 0
    swaps: int = 0
    extra: dict[str, int] = field(default_factory=dict)


class Predictor:
    """Answers predictions from the active model; safe to call from many threads."""

    def __init__(self, config: AgentConfig | None = None, *, threads: int | None = None) -> None:
        self.config = config or AgentConfig()
        self.threads = threads or self.config.runtime.threads or 1
        self._current: LoadedModel | None = None
        self._previous: LoadedModel | None = None
        self._observers: tuple[PredictionObserver, ...] = ()
        self._lock = threading.Lock()
        # Feedback memory in two generations: requests go into _recent without a lock;
        # when it holds FEEDBACK_MEMORY it becomes _older (the one before is dropped).
        self._recent: dict[str | int, tuple[ModelRef, Any]] = {}
        self._older: dict[str | int, tuple[ModelRef, Any]] = {}
        self._recent_lock = threading.Lock()
        self.stats = PredictorStats()
        self._shadow: LoadedModel | None = None
        self._shadow_queue: queue.Queue | None = None
        self._shadow_thread: threading.Thread | None = None
        # (slot, why) when from_config found the active slot unusable and fell back.
        self.recovered_from: tuple[str, str] | None = None
        self._fault_delay_s = self.config.faults.extra_latency_ms / 1000.0  # tests/demos only

    # -- loading ------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: AgentConfig) -> Predictor:
        """Load the active slot from ``config.data_dir`` (no network needed)."""
        from .slots import Slots

        threads = config.runtime.threads
        if threads is None:
            try:
                threads = config.device_profile().inference_threads
            except Exception:  # an unknown profile must not stop serving
                threads = 1
        pred = cls(config, threads=threads)
        slots = Slots(config.data_dir / "slots", config.slots.keep_previous)
        active = slots.load_active()
        pred.recovered_from = slots.recovered_from
        if slots.recovered_from is not None:
            log.error("slot %s unusable, serving an earlier slot: %s", *slots.recovered_from)
        if active is None:
            return pred
        pred.swap(active.manifest, active.model_bytes)
        if pred.fallback_kind() == "previous":
            prev_id = slots.previous_id(active.slot_id)
            if prev_id is not None:
                try:
                    prev = slots.load(prev_id)
                    pred._previous = LoadedModel.open(prev.manifest, prev.model_bytes, pred.threads)
                except Exception as exc:
                    log.warning("previous slot %s cannot serve as fallback: %s", prev_id, exc)
        return pred

    def swap(self, manifest: Manifest, model_bytes: bytes) -> None:
        """Load the new model, then switch to it atomically (in-flight requests finish)."""
        new = LoadedModel.open(manifest, model_bytes, self.threads)
        with self._lock:
            if self._current is not None and self._current.ref != new.ref:
                self._previous = self._current
            self._current = new
            self.stats.swaps += 1

    @property
    def model(self) -> ModelRef | None:
        cur = self._current
        return cur.ref if cur else None

    @property
    def manifest(self) -> Manifest | None:
        cur = self._current
        return cur.manifest if cur else None

    @property
    def ready(self) -> bool:
        return self._current is not None

    def add_observer(self, obs: PredictionObserver) -> None:
        with self._lock:
            self._observers = (*self._observers, obs)

    def fallback_kind(self) -> str:
        if self.config.fallback.kind is not None:
            return self.config.fallback.kind
        cur = self._current
        return cur.manifest.fallback.kind if cur else "none"

    def _fallback_value(self) -> Any:
        if self.config.fallback.kind is not None:
            return self.config.fallback.value
        cur = self._current
        return cur.manifest.fallback.value if cur else None

    # -- predicting ---------------------------------------------------------------------
    def predict(
        self,
        rows: Any = None,
        *,
        instances: Any = None,
        request_id: str | None = None,
        max_rows: int | None = None,
    ) -> PredictResult:
        """Predict for rows (schema order) or instances (dicts by feature name).

        Raises :class:`InputError` for rows that do not fit the schema, :class:`NoModelError`
        before a model is loaded, and :class:`ModelError` when the model fails and the
        fallback is ``none``.
        """
        t0 = time.perf_counter()
        cur = self._current
        if cur is None:
            raise NoModelError("no model is installed yet")
        rid: str | int = request_id or next(_ID_COUNTER)
        run: Callable[[np.ndarray], tuple[Any, Any, Any]] = cur.run
        arr = None
        if cur.direct is not None and instances is None and type(rows) is np.ndarray:
            arr = cur.plan.fast_array(rows, max_rows)  # None: the full checks decide
            if arr is not None:
                run = cur.direct
        if arr is None:
            arr = self._validated(cur, rows, instances, max_rows)
        error: str | None = None
        model = cur
        try:
            labels, probs, values = run(arr)
        except ModelError as exc:
            error = str(exc)
            pred, model = self._fallback(cur, arr, exc)
            labels, probs, values = pred.labels, pred.probabilities, pred.values
        if self._fault_delay_s:
            time.sleep(self._fault_delay_s)  # faults.extra_latency_ms: a slow device
        latency = (time.perf_counter() - t0) * 1000.0
        fallback = error is not None
        stats = self.stats
        stats.requests += 1
        stats.rows += len(arr)
        if fallback:
            stats.fallbacks += 1
        self._remember(rid, model.ref, labels if labels is not None else values)
        if self._observers:  # no event object at all when nobody listens
            pred = Prediction(_as_list(labels), probs, values)
            event = PredictionEvent(
                time.time(), _request_id(rid), model.ref, arr, pred, latency, error, fallback
            )
            self._notify(event)
        if self._shadow_queue is not None:
            try:
                self._shadow_queue.put_nowait((_request_id(rid), arr))
            except queue.Full:
                stats.shadow_dropped += 1
        return PredictResult(rid, model.ref, labels, probs, values, latency, fallback, error)

    @staticmethod
    def _validated(cur: LoadedModel, rows: Any, instances: Any, max_rows: int | None) -> np.ndarray:
        if instances is not None:
            if rows is not None:
                raise InputError("send either inputs or instances, not both")
            if not isinstance(instances, list) or not all(isinstance(x, dict) for x in instances):
                raise InputError("instances must be a list of objects keyed by feature name")
            try:
                rows = rows_from_instances(instances, cur.manifest.input_schema)
            except FeedError as exc:
                raise InputError(str(exc)) from None
        if rows is None:
            raise InputError("no inputs given")
        return validate_rows(rows, cur.plan, max_rows)

    def _fallback(
        self, cur: LoadedModel, arr: np.ndarray, exc: ModelError
    ) -> tuple[Prediction, LoadedModel]:
        kind = self.fallback_kind()
        if kind == "previous" and self._previous is not None:
            try:
                return self._previous.infer(arr), self._previous
            except ModelError:
                pass
        elif kind == "constant":
            value = self._fallback_value()
            n = len(arr)
            if cur.manifest.output_schema.task == "classification":
                return Prediction(labels=[value] * n), cur
            return Prediction(values=np.full((n, 1), float(value or 0.0))), cur
        self.stats.errors += 1
        self._notify(PredictionEvent(time.time(), "", cur.ref, arr, None, 0.0, str(exc), False))
        raise exc

    def _notify(self, event: PredictionEvent) -> None:
        for obs in self._observers:
            try:
                obs.on_prediction(event)
            except Exception:  # an observer must never break a request
                self.stats.observer_errors += 1

    # -- feedback -----------------------------------------------------------------------
    def _remember(self, rid: str | int, ref: ModelRef, predicted: Any) -> None:
        recent = self._recent
        recent[rid] = (ref, predicted)
        if len(recent) >= FEEDBACK_MEMORY:
            with self._recent_lock:
                if self._recent is recent:
                    self._older, self._recent = recent, {}

    def feedback(self, request_id: str, truth: Any) -> None:
        """Report the true label/value of an earlier request (KeyError if unknown/too old).

        At least the last FEEDBACK_MEMORY requests are remembered (at most twice that)."""
        hit = self._recall(request_id)
        if hit is None and request_id.startswith(_ID_PREFIX):
            try:  # one of ours: remembered by its counter
                hit = self._recall(int(request_id[len(_ID_PREFIX) :], 16))
            except ValueError:
                pass
        if hit is None:
            raise KeyError(request_id)
        ref, raw = hit
        predicted = _as_list(raw)
        if predicted is not None and len(predicted) == 1:
            predicted = predicted[0]
        for obs in self._observers:
            try:
                obs.on_feedback(request_id, ref, truth, predicted)
            except Exception:
                self.stats.observer_errors += 1

    def _recall(self, key: str | int) -> tuple[ModelRef, Any] | None:
        return self._recent.get(key) or self._older.get(key)

    # -- shadow -------------------------------------------------------------------------
    def set_shadow(self, manifest: Manifest | None, model_bytes: bytes | None) -> None:
        """Run a candidate beside the active model on live rows (None stops it)."""
        if manifest is None or model_bytes is None:
            self._shadow = None
            return
        self._shadow = LoadedModel.open(manifest, model_bytes, 1)
        if self._shadow_thread is None:
            self._shadow_queue = queue.Queue(maxsize=SHADOW_QUEUE)
            self._shadow_thread = threading.Thread(
                target=self._shadow_loop, name="edgefleet-shadow", daemon=True
            )
            self._shadow_thread.start()

    def _shadow_loop(self) -> None:
        assert self._shadow_queue is not None
        while True:
            item = self._shadow_queue.get()
            if item is None:
                return
            shadow = self._shadow
            if shadow is None:
                continue
            rid, arr = item
            t0 = time.perf_counter()
            try:
                pred: Prediction | None = shadow.infer(arr)
                error = None
            except Exception as exc:  # a failing candidate is data, not a crash
                pred, error = None, str(exc)
            latency = (time.perf_counter() - t0) * 1000.0
            self._notify(
                PredictionEvent(
                    time.time(), rid, shadow.ref, arr, pred, latency, error, False, shadow=True
                )
            )

    @property
    def shadow(self) -> ModelRef | None:
        s = self._shadow
        return s.ref if s else None

    def close(self) -> None:
        self._shadow = None
        if self._shadow_queue is not None and self._shadow_thread is not None:
            try:
                self._shadow_queue.put(None, timeout=1.0)
            except queue.Full:
                pass
            self._shadow_thread.join(timeout=2.0)
            self._shadow_thread = None
            self._shadow_queue = None
