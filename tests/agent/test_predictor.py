from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.errors import InferenceError, InputError, NoModelError
from agent.predictor import Predictor
from protocol import read_bundle
from protocol.manifest import Fallback
from tests.agent.agent_env import IRIS_ROW, Recorder, fragile_bundle, make_device
from tests.support.bundles import make_bundle

NAMES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


@pytest.fixture(scope="module")
def v1(signing_key):
    return make_bundle(signing_key)


@pytest.fixture
def device(tmp_path: Path, signing_key, v1):
    dev = make_device(tmp_path, signing_key)
    dev.installer.install_bytes(v1[0])
    return dev


def test_predict_returns_labels_and_probabilities_matching_the_smoke_test(device, v1) -> None:
    smoke = v1[1].smoke_tests[0]
    res = device.predictor.predict(smoke.rows)
    assert res.labels == smoke.expected_labels
    np.testing.assert_allclose(res.probabilities, smoke.expected_probabilities, atol=1e-5)
    assert isinstance(res.probabilities, list) and isinstance(res.probabilities[0][0], float)
    assert res.model.name == "iris" and res.model.release == 1 and res.fallback is False
    assert len(res.request_id) == 24 and res.latency_ms > 0


def test_instances_by_name_give_the_same_answer_as_rows(device) -> None:
    by_row = device.predictor.predict([IRIS_ROW])
    by_name = device.predictor.predict(instances=[dict(zip(NAMES, IRIS_ROW, strict=True))])
    assert by_row.labels == by_name.labels
    assert by_row.probabilities == by_name.probabilities


def test_caller_request_id_is_kept(device) -> None:
    assert device.predictor.predict([IRIS_ROW], request_id="abc-1").request_id == "abc-1"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rows": []}, "empty batch"),
        ({"rows": [[1.0, 2.0, 3.0]]}, "has 3 features, the model needs 4"),
        ({"rows": [[1.0, 2.0, 3.0, 4.0], [1.0]]}, r"inputs\[1\] has 1 features"),
        ({"rows": [[1.0, "x", 3.0, 4.0]]}, "'sepal_width' is not a number"),
        ({"rows": [[1.0, True, 3.0, 4.0]]}, "'sepal_width' is not a number"),
        ({"rows": [[1.0, math.nan, 3.0, 4.0]]}, "'sepal_width' is NaN"),
        ({"rows": [[1.0, None, 3.0, 4.0]]}, "'sepal_width' is null"),
        ({"rows": [[math.inf, 2.0, 3.0, 4.0]]}, "'sepal_length' is not finite"),
        ({"rows": [[1e300, 2.0, 3.0, 4.0]]}, "too large for float32"),
        ({"rows": [[10**400, 2.0, 3.0, 4.0]]}, "too large"),
        ({"rows": [[[1.0, 2.0, 3.0, 4.0]]]}, r"inputs\[0\] has 1 features"),
        ({"rows": {"a": 1}}, "list of rows"),
        ({"instances": [{"sepal_length": 1.0}]}, "missing feature 'sepal_width'"),
        (
            {"instances": [dict(zip([*NAMES, "colour"], [*IRIS_ROW, 1], strict=True))]},
            "unknown feature 'colour'",
        ),
        ({"instances": [[1, 2, 3, 4]]}, "objects keyed by feature name"),
        ({}, "no inputs"),
    ],
)
def test_rows_that_do_not_fit_the_schema_raise_input_error_naming_the_problem(
    device, kwargs, message
) -> None:
    rows = kwargs.pop("rows", None)
    with pytest.raises(InputError, match=message):
        device.predictor.predict(rows, **kwargs)


def test_batch_over_the_limit_is_refused(device) -> None:
    with pytest.raises(InputError, match="over the limit of 2"):
        device.predictor.predict([IRIS_ROW] * 3, max_rows=2)


def test_predict_before_any_model_raises_no_model(tmp_path: Path) -> None:
    pred = Predictor()
    assert not pred.ready and pred.model is None
    with pytest.raises(NoModelError):
        pred.predict([IRIS_ROW])


def test_model_failure_falls_back_to_previous_model_and_is_counted(device, signing_key) -> None:
    rec = Recorder()
    device.predictor.add_observer(rec)
    data, _ = fragile_bundle(signing_key, fallback=Fallback(kind="previous"))
    device.installer.install_bytes(data)
    one = device.predictor.predict([IRIS_ROW])
    assert one.model.version == "2.0.0" and not one.fallback
    two = device.predictor.predict([IRIS_ROW, IRIS_ROW])
    assert two.fallback and two.model.version == "1.0.0" and two.labels is not None
    assert "Reshape" in (two.error or "")
    assert device.predictor.stats.fallbacks == 1
    assert rec.events[-1].fallback and rec.events[-1].error


def test_constant_fallback_from_the_manifest(tmp_path: Path, signing_key) -> None:
    dev = make_device(tmp_path, signing_key)
    data, _ = fragile_bundle(signing_key, release=1, fallback=Fallback(kind="constant", value=1))
    dev.installer.install_bytes(data)
    res = dev.predictor.predict([IRIS_ROW, IRIS_ROW])
    assert res.fallback and res.labels == [1, 1] and res.probabilities is None


def test_config_fallback_overrides_the_manifest(tmp_path: Path, signing_key) -> None:
    dev = make_device(tmp_path, signing_key, fallback={"kind": "constant", "value": 2})
    data, _ = fragile_bundle(signing_key, release=1, fallback=Fallback(kind="none"))
    dev.installer.install_bytes(data)
    assert dev.predictor.predict([IRIS_ROW, IRIS_ROW]).labels == [2, 2]


def test_no_fallback_raises_our_inference_error(tmp_path: Path, signing_key) -> None:
    dev = make_device(tmp_path, signing_key)
    data, _ = fragile_bundle(signing_key, release=1)
    dev.installer.install_bytes(data)
    with pytest.raises(InferenceError):
        dev.predictor.predict([IRIS_ROW, IRIS_ROW])
    assert dev.predictor.stats.errors == 1 and dev.predictor.stats.fallbacks == 0


def test_previous_fallback_is_loaded_from_slots_at_start(tmp_path: Path, signing_key, v1) -> None:
    dev = make_device(tmp_path, signing_key)
    dev.installer.install_bytes(v1[0])
    dev.installer.install_bytes(fragile_bundle(signing_key, fallback=Fallback(kind="previous"))[0])
    restarted = Predictor.from_config(dev.config)
    res = restarted.predict([IRIS_ROW, IRIS_ROW])
    assert res.fallback and res.model.version == "1.0.0"


def test_observers_see_every_prediction_and_feedback(device) -> None:
    rec = Recorder()
    device.predictor.add_observer(rec)
    res = device.predictor.predict([IRIS_ROW])
    ev = rec.events[-1]
    assert ev.request_id == res.request_id and ev.model == res.model and not ev.shadow
    assert ev.rows.shape == (1, 4) and ev.prediction is not None
    device.predictor.feedback(res.request_id, 0)
    assert rec.feedback == [(res.request_id, res.model, 0, res.labels[0])]
    with pytest.raises(KeyError):
        device.predictor.feedback("unknown", 1)


def test_a_raising_observer_never_breaks_a_request(device) -> None:
    class Broken:
        def on_prediction(self, event):
            raise RuntimeError("boom")

        def on_feedback(self, *a):
            raise RuntimeError("boom")

    device.predictor.add_observer(Broken())
    assert device.predictor.predict([IRIS_ROW]).labels is not None
    assert device.predictor.stats.observer_errors == 1


def test_shadow_model_sees_live_rows_but_never_answers(device, signing_key) -> None:
    rec = Recorder()
    device.predictor.add_observer(rec)
    data, manifest = make_bundle(signing_key, name="iris-candidate", version="3.0.0", release=3)
    device.predictor.set_shadow(manifest, read_bundle(data).model_bytes())
    try:
        res = device.predictor.predict([IRIS_ROW])
        assert res.model.name == "iris"
        deadline = time.monotonic() + 10
        while not any(e.shadow for e in rec.events) and time.monotonic() < deadline:
            time.sleep(0.01)
        shadow = [e for e in rec.events if e.shadow]
        assert shadow and shadow[0].model.name == "iris-candidate"
        assert shadow[0].request_id == res.request_id
        assert shadow[0].prediction is not None and shadow[0].prediction.labels == res.labels
    finally:
        device.predictor.close()


@pytest.mark.parametrize("kind", ["iris-logreg", "digits-forest"])
def test_feed_plan_builds_the_same_tensors_as_the_protocol(kind) -> None:
    from agent.inputs import FeedPlan
    from protocol.feeds import make_feeds
    from tests.support.bundles import trained

    tm = trained(kind)
    rows = tm.X[:5].astype(np.float64)
    ours = FeedPlan(tm.input_schema).feeds(rows)
    theirs = make_feeds(rows, tm.input_schema)
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert ours[k].dtype == theirs[k].dtype
        np.testing.assert_array_equal(ours[k], theirs[k])


def test_feed_plan_selects_and_reshapes_columns_per_input() -> None:
    from agent.inputs import FeedPlan
    from protocol import FeatureSpec, InputSchema, ModelInput
    from protocol.feeds import make_feeds

    schema = InputSchema(
        features=[FeatureSpec(name=n) for n in "abcd"],
        inputs=[
            ModelInput(name="x1", dtype="float32", shape=[None, 2], features=["d", "b"]),
            ModelInput(name="x2", dtype="int64", shape=[None, 1, 2], features=["a", "c"]),
        ],
    )
    rows = np.arange(8, dtype=np.float64).reshape(2, 4)
    ours, theirs = FeedPlan(schema).feeds(rows), make_feeds(rows, schema)
    for k in ("x1", "x2"):
        assert ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape
        np.testing.assert_array_equal(ours[k], theirs[k])


def test_request_ids_are_unique(device) -> None:
    ids = {device.predictor.predict([IRIS_ROW]).request_id for _ in range(200)}
    assert len(ids) == 200


def test_nan_passes_only_where_the_schema_allows_it() -> None:
    from agent.inputs import SchemaPlan, validate_rows
    from protocol import FeatureSpec, InputSchema, ModelInput

    schema = InputSchema(
        features=[FeatureSpec(name="a", allow_nan=True), FeatureSpec(name="b")],
        inputs=[ModelInput(name="x", dtype="float32", shape=[None, 2], features=["a", "b"])],
    )
    plan = SchemaPlan(schema)
    out = validate_rows([[math.nan, 1.0], [None, 2.0]], plan)
    assert np.isnan(out[:, 0]).all() and out[:, 1].tolist() == [1.0, 2.0]
    assert np.isnan(validate_rows(np.array([[np.nan, 1.0]]), plan)[0, 0])
    with pytest.raises(InputError, match="'b' is NaN"):
        validate_rows([[1.0, math.nan]], plan)
    with pytest.raises(InputError, match="'a' is not finite"):
        validate_rows(np.array([[np.inf, 1.0]]), plan)


def test_finite_float_arrays_pass_through_unchanged_and_bad_ones_get_exact_errors() -> None:
    from agent.inputs import SchemaPlan, validate_rows
    from protocol import FeatureSpec, InputSchema, ModelInput

    schema = InputSchema(
        features=[FeatureSpec(name="a"), FeatureSpec(name="b", dtype="float32")],
        inputs=[ModelInput(name="x", dtype="float32", shape=[None, 2], features=["a", "b"])],
    )
    plan = SchemaPlan(schema)
    ok = np.array([[1.5, -2.0], [0.0, 3.0]], dtype=np.float32)
    assert validate_rows(ok, plan) is ok  # passed through, not copied
    with pytest.raises(InputError, match="'b' is not finite"):
        validate_rows(np.array([[1.0, np.inf]], dtype=np.float32), plan)
    with pytest.raises(InputError, match="'a' is NaN"):
        validate_rows(np.array([[np.nan, 1.0]], dtype=np.float32), plan)
    with pytest.raises(InputError, match="'b' is too large for float32"):
        validate_rows(np.array([[1.0, 1e39]]), plan)
    with pytest.raises(InputError, match="over the limit of 1"):
        validate_rows(ok, plan, max_rows=1)
    with pytest.raises(InputError, match="empty batch"):
        validate_rows(np.empty((0, 2), dtype=np.float32), plan)


def test_corrupt_active_slot_at_start_serves_the_previous_verified_slot(
    tmp_path: Path, signing_key, v1
) -> None:
    dev = make_device(tmp_path, signing_key)
    dev.installer.install_bytes(v1[0])
    dev.installer.install_bytes(make_bundle(signing_key, version="1.1.0", release=2)[0])
    active = dev.slots.active_id()
    assert active is not None
    bundle = dev.slots.root / active / "bundle.efb"
    data = bytearray(bundle.read_bytes())
    data[len(data) // 2] ^= 0xFF  # bit rot inside the model
    bundle.write_bytes(bytes(data))
    restarted = Predictor.from_config(dev.config)
    assert restarted.model is not None and restarted.model.version == "1.0.0"
    assert restarted.recovered_from is not None and restarted.recovered_from[0] == active
    assert restarted.predict([IRIS_ROW]).labels == [0]


@given(
    st.lists(
        st.lists(
            st.one_of(
                st.integers(-(10**6), 10**6),
                st.floats(-1e30, 1e30, allow_nan=False, allow_infinity=False),
            ),
            min_size=4,
            max_size=4,
        ),
        min_size=1,
        max_size=5,
    )
)
def test_any_finite_numeric_rows_validate_to_the_same_values(rows) -> None:
    from agent.inputs import SchemaPlan, validate_rows
    from tests.support.bundles import trained

    out = validate_rows(rows, SchemaPlan(trained("iris-logreg").input_schema))
    np.testing.assert_array_equal(out.astype(np.float64), np.array(rows, dtype=np.float64))


def test_direct_and_fast_output_decoding_match_the_protocol(device) -> None:
    """Both shortcuts (the direct path, and the label/probability decoder it bypasses) give
    what protocol.feeds.decode_outputs gives; the direct path keeps the model's float32."""
    import dataclasses

    from protocol.feeds import decode_outputs, make_feeds
    from tests.support.bundles import trained

    cur = device.predictor._current
    assert cur is not None and cur.fast_outputs is not None and cur.direct is not None
    X = trained("iris-logreg").X[::7]
    theirs = decode_outputs(
        cur.runtime.run(make_feeds(X, cur.manifest.input_schema)), cur.manifest.output_schema
    )
    assert theirs.probabilities is not None
    direct = cur.infer(X)
    general = dataclasses.replace(cur, direct=None).infer(X)
    for ours, dtype in ((direct, np.float32), (general, np.float64)):
        assert ours.labels == theirs.labels
        assert ours.probabilities is not None and ours.probabilities.dtype == dtype
        np.testing.assert_array_equal(ours.probabilities, theirs.probabilities)
    # PredictResult's lists are the same numbers either way (float32 → Python float is exact)
    res = device.predictor.predict(X.astype(np.float32))
    assert res.probabilities == theirs.probabilities.tolist()
    assert res.labels == theirs.labels


@pytest.fixture(scope="module")
def mixed_bundle(signing_key):
    return make_bundle(signing_key, name="iris-mixed", kind="mixed-logreg")


def test_mixed_numeric_and_categorical_model_serves_rows_and_instances(
    tmp_path: Path, signing_key, mixed_bundle
) -> None:
    dev = make_device(tmp_path, signing_key)
    dev.installer.install_bytes(mixed_bundle[0])  # the smoke test ran through 5 named inputs
    rec = Recorder()
    dev.predictor.add_observer(rec)
    smoke = mixed_bundle[1].smoke_tests[0]
    assert dev.predictor.predict(smoke.rows).labels == smoke.expected_labels
    inst = dict(zip([*NAMES, "size"], [*IRIS_ROW, "small"], strict=True))
    assert dev.predictor.predict(instances=[inst]).labels == [0]
    assert rec.events[-1].rows.dtype == object and rec.events[-1].rows[0, 4] == "small"
    with pytest.raises(InputError, match="'size' must be a string"):
        dev.predictor.predict([[*IRIS_ROW, ["small"]]])
    with pytest.raises(InputError, match="'sepal_length' is not a number"):
        dev.predictor.predict([["5.1", 3.5, 1.4, 0.2, "small"]])
    with pytest.raises(InputError, match="'size' is missing"):
        dev.predictor.predict([[*IRIS_ROW, None]])
    unseen = dev.predictor.predict([[*IRIS_ROW, "enormous"]])  # unknown category: the model's call
    assert unseen.labels is not None


def test_inference_threads_come_from_the_profile_unless_configured(tmp_path: Path) -> None:
    from agent.config import AgentConfig
    from protocol import load_profile

    profile = load_profile("raspberry-pi-4")
    by_profile = Predictor.from_config(AgentConfig(data_dir=tmp_path, profile="raspberry-pi-4"))
    assert by_profile.threads == profile.inference_threads
    configured = AgentConfig(data_dir=tmp_path, profile="raspberry-pi-4", runtime={"threads": 3})
    assert Predictor.from_config(configured).threads == 3


def test_fast_array_takes_only_finite_float32_rows_of_the_right_shape() -> None:
    """The predictor's shortcut for ndarray rows: anything it declines goes through
    validate_rows, so it must decline every NaN and infinity, wherever it sits."""
    from agent.inputs import SchemaPlan
    from tests.support.bundles import trained

    plan = SchemaPlan(trained("iris-logreg").input_schema)
    ok = np.array([[5.1, 3.5, 1.4, 0.2], [0.0, -0.0, 1e38, -1e-45]], dtype=np.float32)
    assert plan.fast_array(ok) is ok
    assert plan.fast_array(ok[:1]) is not None
    for bad in (np.nan, np.inf, -np.inf):
        for n in (1, 3):
            for i in range(n):
                for j in range(4):
                    rows = np.ones((n, 4), dtype=np.float32)
                    rows[i, j] = bad
                    assert plan.fast_array(rows) is None, (bad, n, i, j)
    assert plan.fast_array(ok.astype(np.float64)) is None  # float64: range checks needed
    assert plan.fast_array(np.ones((2, 4), dtype=np.int64)) is None
    assert plan.fast_array(np.asfortranarray(np.ones((3, 4), dtype=np.float32))) is None
    assert plan.fast_array(np.ones((2, 5), dtype=np.float32)) is None
    assert plan.fast_array(np.ones((0, 4), dtype=np.float32)) is None
    assert plan.fast_array(np.ones(4, dtype=np.float32)) is None
    assert plan.fast_array(ok, max_rows=1) is None
    big = np.ones((20_000, 4), dtype=np.float32)  # beyond the zero vector: isfinite path
    assert plan.fast_array(big) is big
    big[12_345, 2] = np.inf
    assert plan.fast_array(big) is None


def test_ndarray_rows_the_shortcut_declines_still_get_exact_errors(device) -> None:
    p = device.predictor
    assert p._current is not None and p._current.direct is not None
    with pytest.raises(InputError, match="'petal_length' is NaN"):
        p.predict(np.array([[5.1, 3.5, np.nan, 0.2]], dtype=np.float32))
    with pytest.raises(InputError, match="not finite"):
        p.predict(np.array([[5.1, 3.5, 1.4, np.inf]], dtype=np.float32))
    with pytest.raises(InputError, match="over the limit of 1"):
        p.predict(np.ones((2, 4), dtype=np.float32), max_rows=1)
    a = p.predict(np.array([IRIS_ROW], dtype=np.float32))
    b = p.predict([IRIS_ROW])  # lists take the full checks; same answer
    assert a.labels == b.labels and a.probabilities == b.probabilities


def test_result_lists_are_built_on_read_and_arrays_are_available(device) -> None:
    res = device.predictor.predict(np.array([IRIS_ROW, IRIS_ROW], dtype=np.float32))
    labels, probs, values = res.arrays()
    assert isinstance(labels, np.ndarray) and isinstance(probs, np.ndarray) and values is None
    assert res.labels == labels.tolist() and isinstance(res.labels[0], int)
    assert isinstance(res.probabilities, list) and isinstance(res.probabilities[0][0], float)
    assert res.to_dict()["probabilities"] == probs.tolist()
    assert "PredictResult(request_id=" in repr(res)


def test_feedback_finds_generated_and_caller_ids_across_memory_generations(
    device, monkeypatch
) -> None:
    import agent.predictor as predictor_module

    monkeypatch.setattr(predictor_module, "FEEDBACK_MEMORY", 10)
    rec = Recorder()
    p = device.predictor
    p.add_observer(rec)
    ids = [p.predict([IRIS_ROW]).request_id for _ in range(15)]
    ids.append(p.predict([IRIS_ROW], request_id="caller-7").request_id)
    for rid in (ids[0], ids[9], ids[14], "caller-7"):  # older and newer generation
        p.feedback(rid, 0)
    assert [f[0] for f in rec.feedback] == [ids[0], ids[9], ids[14], "caller-7"]
    assert all(f[3] == 0 for f in rec.feedback)  # the predicted label, as a plain value
    for _ in range(20):  # two rotations later the first ones are forgotten
        p.predict([IRIS_ROW])
    with pytest.raises(KeyError):
        p.feedback(ids[0], 0)
    with pytest.raises(KeyError):
        p.feedback(ids[0][:-1] + "g", 0)  # ours in form, not a hex counter
