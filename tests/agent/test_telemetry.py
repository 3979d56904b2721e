"""Sketch windows: closed by rows or time, keyed by model version and a persisted seq."""

from __future__ import annotations

import time

import numpy as np

from agent.events import PredictionEvent
from agent.outbox import Outbox
from agent.telemetry import Telemetry, WindowSketcher
from protocol.feeds import Prediction
from protocol.messages import ModelRef, SketchReport
from protocol.sketches import LABELS_KEY, SCORES_KEY, frequent_distribution
from tests.support.bundles import trained

V1 = ModelRef(name="iris", version="1.0.0", release=1)
V2 = ModelRef(name="iris", version="2.0.0", release=2)


def schema_lookup(model: ModelRef):
    return trained("iris-logreg").input_schema


def sketcher(outbox: Outbox | None = None, **kw) -> WindowSketcher:
    counter = iter(range(10**6))
    seq = (lambda: outbox.next_seq("sketch")) if outbox else (lambda: next(counter))
    return WindowSketcher("dev-1", schemas=schema_lookup, next_seq=seq, **kw)


def event(
    rows, model=V1, *, ts=0.0, labels=None, probs=None, shadow=False, error=None
) -> PredictionEvent:
    rows = np.asarray(rows, dtype=np.float32)
    pred = None if error else Prediction(labels=labels, probabilities=probs)
    return PredictionEvent(ts, "r", model, rows, pred, 1.0, error, False, shadow)


def test_window_closes_at_window_rows_and_keeps_exact_counts():
    X = trained("iris-logreg").X
    s = sketcher(window_rows=100, window_seconds=3600)
    out = []
    for i in range(0, 150, 10):
        out += s.add(V1, X[i : i + 10], now=float(i))
    out += s.close_all(now=200.0)
    assert [r.sketches.rows for r in out] == [100, 50]
    assert [r.seq for r in out] == [0, 1]
    f = out[0].sketches.features["petal_length"]
    assert f.kll().n == 100 and f.count == 100 and f.missing == 0


def test_a_batch_larger_than_the_window_is_split_across_windows():
    X = trained("iris-logreg").X
    s = sketcher(window_rows=40, window_seconds=3600)
    out = s.add(V1, X[:100], now=0.0) + s.close_all(now=1.0)
    assert [r.sketches.rows for r in out] == [40, 40, 20]


def test_window_closes_after_window_seconds_with_bounds_from_the_injected_clock():
    X = trained("iris-logreg").X
    s = sketcher(window_rows=10_000, window_seconds=60)
    s.add(V1, X[:5], now=1000.0)
    assert s.due(now=1059.0) == []
    (r,) = s.due(now=1060.0)
    assert r.window_start.timestamp() == 1000.0 and r.window_end.timestamp() == 1060.0
    assert s.open_rows() == 0


def test_each_model_version_has_its_own_window():
    X = trained("iris-logreg").X
    s = sketcher()
    s.add(V1, X[:3], now=0.0)
    s.add(V2, X[3:10], now=0.0)
    out = {r.model.version: r.sketches.rows for r in s.close_all(now=1.0)}
    assert out == {"1.0.0": 3, "2.0.0": 7}


def test_nan_and_out_of_range_values_are_counted():
    s = sketcher()
    rows = np.array([[np.nan, 3.0, 1.0, 0.2], [100.0, 3.0, 1.0, 0.2]], dtype=np.float64)
    s.add(V1, rows, now=0.0)
    (r,) = s.close_all(now=1.0)
    f = r.sketches.features["sepal_length"]
    assert (f.count, f.missing, f.out_of_range) == (2, 1, 1)


def test_sequence_numbers_continue_after_a_restart(tmp_path):
    X = trained("iris-logreg").X
    ob = Outbox(tmp_path / "o.db", 10**6)
    s = sketcher(ob, window_rows=10)
    assert [r.seq for r in s.add(V1, X[:30], now=0.0)] == [0, 1, 2]
    ob.close()
    ob = Outbox(tmp_path / "o.db", 10**6)
    assert [r.seq for r in sketcher(ob, window_rows=10).add(V1, X[:10], now=0.0)] == [3]


def test_observer_sketches_inputs_scores_and_labels_off_the_request_path():
    X = trained("iris-logreg").X
    out: list[SketchReport] = []
    tel = Telemetry(sketcher(window_rows=1000), out.append, clock=lambda: 5.0)
    probs = np.tile([0.7, 0.2, 0.1], (2, 1))
    for i in range(0, 20, 2):
        tel.on_prediction(event(X[i : i + 2], labels=[0, 1], probs=probs))
    tel.on_prediction(event(X[:2], shadow=True))  # shadow rows are not sketched
    tel.on_prediction(event(X[:2], error="boom"))  # inputs of a failed request still count
    assert out == []  # nothing happened on the calling thread
    tel.process_pending()
    tel.stop()
    (r,) = out
    assert r.sketches.rows == 22
    assert r.sketches.features[SCORES_KEY].kll().get_quantile(0.5) == np.float32(0.7)
    assert r.sketches.features[SCORES_KEY].missing == 2
    assert frequent_distribution(r.sketches.features[LABELS_KEY].frequent()) == {"0": 0.5, "1": 0.5}


def test_worker_thread_drains_and_stop_flushes_the_open_window():
    X = trained("iris-logreg").X
    out: list[SketchReport] = []
    tel = Telemetry(sketcher(window_rows=50), out.append).start()
    for i in range(120):
        tel.on_prediction(event(X[i : i + 1], ts=time.time()))
    assert tel.drain()
    assert [r.sketches.rows for r in out] == [50, 50]
    tel.stop()
    assert [r.sketches.rows for r in out] == [50, 50, 20]


def test_a_full_queue_drops_and_counts_instead_of_blocking():
    X = trained("iris-logreg").X
    tel = Telemetry(sketcher(), lambda r: None, queue_size=3)
    for i in range(5):
        tel.on_prediction(event(X[i : i + 1]))
    assert tel.dropped == 2


class RecordingSketcher(WindowSketcher):
    def __init__(self) -> None:
        super().__init__("dev-1", schemas=schema_lookup, next_seq=lambda: 1, window_rows=1000)
        self.scores: list[np.ndarray] = []

    def add(self, model, rows, now, *, scores=None, labels=None):
        self.scores.append(scores)
        return super().add(model, rows, now, scores=scores, labels=labels)


def test_batched_scores_are_the_per_event_scores_in_row_order():
    X = trained("iris-logreg").X
    rng = np.random.default_rng(1)
    events = []
    for i in range(6):  # probabilities only: the one-reduction path
        events.append(event(X[i : i + 2], labels=[0, 1], probs=rng.random((2, 3))))
    mixed = list(events)
    mixed.insert(3, event(X[:1], error="boom"))  # NaN score in the middle
    values = Prediction(values=rng.random((1, 1)))
    row = X[:1].astype(np.float32)
    mixed.insert(5, PredictionEvent(0.0, "r", V1, row, values, 1.0, None, False))
    mixed.append(event(X[:2], labels=[2, 2], probs=rng.random((2, 4))))  # other width
    for batch in (events, mixed):
        sk = RecordingSketcher()
        Telemetry(sk, lambda r: None)._sketch(batch)
        expected = [
            np.full(e.rows.shape[0], np.nan)
            if e.prediction is None
            else np.asarray(e.prediction.scores, dtype=np.float64)
            for e in batch
        ]
        (scores,) = sk.scores
        assert scores.dtype == np.float64
        np.testing.assert_array_equal(scores, np.concatenate(expected))
