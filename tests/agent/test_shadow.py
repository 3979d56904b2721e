"""Shadow mode: agreement and candidate latency from paired live predictions."""

from __future__ import annotations

import numpy as np

from agent.events import PredictionEvent
from agent.metrics import Metrics
from agent.shadow import ShadowComparer
from protocol.feeds import Prediction
from protocol.messages import ModelRef
from tests.agent.agent_env import make_device
from tests.agent.fleet_sim import wait_for
from tests.support.bundles import make_bundle, trained

ACTIVE = ModelRef(name="iris", version="1.0.0", release=1)
CAND = ModelRef(name="iris", version="2.0.0", release=2)


def ev(rid, labels, *, shadow=False, latency=1.0, error=None, values=None) -> PredictionEvent:
    n = len(labels) if labels is not None else len(values)
    pred = None if error else Prediction(labels=labels, values=values)
    model = CAND if shadow else ACTIVE
    return PredictionEvent(0.0, rid, model, np.zeros((n, 4)), pred, latency, error, False, shadow)


def test_agreement_is_the_share_of_rows_with_the_same_label_in_either_arrival_order():
    c = ShadowComparer()
    c.on_prediction(ev("a", [0, 1]))
    c.on_prediction(ev("a", [0, 2], shadow=True, latency=2.0))
    c.on_prediction(ev("b", [1, 1], shadow=True, latency=4.0))  # shadow first
    c.on_prediction(ev("b", [1, 1]))
    snap = c.snapshot()
    assert snap["compared_requests"] == 2 and snap["compared_rows"] == 4
    assert snap["agreement"] == 0.75
    assert snap["latency_p50_ms"] == 3.0 and snap["model"]["version"] == "2.0.0"
    assert c.snapshot() is None  # the period was reset and no shadow ran since


def test_regression_agreement_uses_a_tolerance():
    c = ShadowComparer(rtol=0.01)
    c.on_prediction(ev("a", None, values=np.array([[100.0], [5.0]])))
    c.on_prediction(ev("a", None, values=np.array([[100.5], [6.0]]), shadow=True))
    snap = c.snapshot()
    assert snap["agreement"] == 0.5 and abs(snap["mean_abs_diff"] - 0.75) < 1e-9


def test_candidate_errors_and_unpaired_requests_are_counted():
    c = ShadowComparer(max_pending=2)
    c.on_prediction(ev("x", [0], shadow=True, error="boom"))
    for rid in "pqr":
        c.on_prediction(ev(rid, [0]))
    snap = c.snapshot()
    assert snap["errors"] == 1 and snap["unmatched"] == 1 and snap["agreement"] is None


def test_shadow_statistics_reach_the_metrics_report_from_live_traffic(tmp_path, signing_key):
    device = make_device(tmp_path, signing_key)
    device.installer.install_bytes(make_bundle(signing_key, version="1.0.0", release=1)[0])
    from protocol import read_bundle

    cand_bytes, cand = make_bundle(signing_key, version="2.0.0", release=2)
    comparer = ShadowComparer()
    seq = iter(range(100))
    metrics = Metrics("dev-1", next_seq=lambda: next(seq), shadow=comparer.snapshot)
    device.predictor.add_observer(comparer)
    device.predictor.set_shadow(cand, read_bundle(cand_bytes).model_bytes())
    X = trained("iris-logreg").X
    for i in range(20):
        device.predictor.predict(X[i : i + 1].tolist())
    wait_for(lambda: comparer.compared_requests == 20, timeout=10)
    (report,) = [r for r in metrics.report() if r.shadow]
    assert report.shadow["agreement"] == 1.0  # same training data and model: the same answers
    assert report.shadow["latency_p95_ms"] > 0
    device.predictor.close()


def test_nothing_is_kept_or_counted_while_no_shadow_model_runs():
    running = {"now": False}
    c = ShadowComparer(max_pending=2, running=lambda: running["now"])
    for rid in "pqrs":
        c.on_prediction(ev(rid, [0]))
    assert c.snapshot() is None and c.unmatched == 0
    running["now"] = True
    c.on_prediction(ev("t", [0]))
    c.on_prediction(ev("t", [0], shadow=True))
    assert c.snapshot()["agreement"] == 1.0
