"""Sketch encoding, merging and the KS/PSI helpers against exact statistics."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import (
    FeatureSpec,
    InputSchema,
    ModelInput,
    ProtocolError,
    SketchBuilder,
    SketchSet,
    merge,
)
from protocol.sketches import (
    build_reference,
    frequent_distribution,
    jensen_shannon,
    ks_critical,
    ks_distance,
    psi,
)

SCHEMA = InputSchema(
    features=[
        FeatureSpec(name="x", min=-3.0, max=3.0),
        FeatureSpec(name="color", kind="categorical", dtype="string", categories=["red", "blue"]),
    ],
    inputs=[
        ModelInput(name="x", dtype="float32", shape=[None, 1], features=["x"]),
        ModelInput(name="color", dtype="string", shape=[None, 1], features=["color"]),
    ],
)


def rows(n, shift=0.0, seed=0, colors=("red", "blue")):
    rng = np.random.default_rng(seed)
    X = np.empty((n, 2), dtype=object)
    X[:, 0] = rng.normal(shift, 1.0, n)
    X[:, 1] = rng.choice(colors, n)
    return X


def test_sketch_set_round_trips_through_bytes():
    s = build_reference(rows(1000), SCHEMA)
    back = SketchSet.from_bytes(s.to_bytes())
    assert back == s
    assert back.features["x"].kll().n == 1000
    assert frequent_distribution(back.features["color"].frequent()).keys() == {"red", "blue"}


def test_counts_nan_and_out_of_range_values():
    X = rows(10)
    X[0, 0] = float("nan")
    X[1, 0] = 99.0
    X[2, 1] = "green"
    s = build_reference(X, SCHEMA)
    assert (s.features["x"].missing, s.features["x"].out_of_range) == (1, 1)
    assert s.features["color"].out_of_range == 1
    assert s.rows == 10


@settings(max_examples=20, deadline=None)
@given(st.lists(st.integers(1, 400), min_size=1, max_size=5))
def test_merge_of_windows_equals_one_pass_counts(sizes):
    parts = [build_reference(rows(n, seed=i), SCHEMA) for i, n in enumerate(sizes)]
    merged = parts[0]
    for p in parts[1:]:
        merged = merge(merged, p)
    assert merged.rows == sum(sizes)
    assert merged.features["x"].kll().n == sum(sizes)
    assert merged.features["color"].count == sum(sizes)


def test_ks_from_sketches_matches_exact_ks_within_rank_error():
    from scipy.stats import ks_2samp

    rng = np.random.default_rng(1)
    a, b = rng.normal(0, 1, 20_000), rng.normal(0.1, 1, 20_000)
    sa, sb = SketchBuilder(), SketchBuilder()
    sa.update_numeric("x", a)
    sb.update_numeric("x", b)
    res = ks_distance(sa.build().features["x"].kll(), sb.build().features["x"].kll())
    exact = ks_2samp(a, b).statistic
    assert abs(res.statistic - exact) <= res.rank_error
    # The 0.1σ shift that DataSketches' own ks_test misses is visible here.
    assert res.statistic > ks_critical(res.n_ref, res.n_cur)


def test_psi_is_small_for_same_distribution_and_large_for_shift():
    def kll(x):
        b = SketchBuilder()
        b.update_numeric("x", x)
        return b.build().features["x"].kll()

    rng = np.random.default_rng(2)
    ref = kll(rng.normal(0, 1, 10_000))
    assert psi(ref, kll(rng.normal(0, 1, 10_000))) < 0.02
    assert psi(ref, kll(rng.normal(1.0, 1, 10_000))) > 0.2


def test_jensen_shannon_bounds():
    assert jensen_shannon({"a": 0.5, "b": 0.5}, {"a": 0.5, "b": 0.5}) == pytest.approx(0, abs=1e-5)
    assert jensen_shannon({"a": 1.0}, {"b": 1.0}) == pytest.approx(1.0, abs=1e-5)


def test_corrupt_sketch_bytes_are_a_protocol_error():
    s = build_reference(rows(50), SCHEMA).model_dump()
    s["features"]["x"]["sketch"] = "AAAA"
    import json

    with pytest.raises(ProtocolError, match="x"):
        SketchSet.from_bytes(json.dumps(s).encode())


def test_merge_refuses_kind_mismatch():
    a = build_reference(rows(10), SCHEMA)
    b = a.model_copy(deep=True)
    b.features["x"], b.features["color"] = b.features["color"], b.features["x"]
    with pytest.raises(ProtocolError, match="numeric"):
        merge(a, b)


WIDE = InputSchema(
    features=[
        FeatureSpec(name="a", min=0.0, max=1.0, allow_nan=True),
        FeatureSpec(name="size", kind="categorical", dtype="string", categories=["s", "m"]),
        FeatureSpec(name="b", allow_nan=True),  # no reference range: never out of range
        FeatureSpec(name="c", min=-5.0, allow_nan=True),
    ],
    inputs=[
        ModelInput(name="num", dtype="float32", shape=[None, 3], features=["a", "b", "c"]),
        ModelInput(name="size", dtype="string", shape=[None, 1], features=["size"]),
    ],
)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.one_of(st.floats(-10, 10), st.just(float("nan")), st.just(float("inf"))),
            st.sampled_from(["s", "m", "xl", None]),
            st.one_of(st.floats(-1e6, 1e6), st.just(float("nan"))),
            st.one_of(st.floats(-10, 10), st.just(float("nan")), st.just(-float("inf"))),
        ),
        min_size=1,
        max_size=60,
    )
)
def test_update_rows_counts_and_sketches_as_feature_by_feature_updates(batch):
    """update_rows works on the whole matrix at once; it must count and sketch exactly what
    one update per feature does."""
    X = np.array(batch, dtype=object)
    whole = SketchBuilder(WIDE)
    whole.update_rows(X)
    one = SketchBuilder(WIDE)
    for j, f in enumerate(WIDE.features):
        if f.kind == "numeric":
            one.update_numeric(f.name, X[:, j].astype(np.float64), f.min, f.max)
        else:
            one.update_categorical(f.name, X[:, j].tolist(), f.categories)
    a, b = whole.build(), one.build()
    for name in ("a", "size", "b", "c"):
        fa, fb = a.features[name], b.features[name]
        assert (fa.count, fa.missing, fa.out_of_range) == (fb.count, fb.missing, fb.out_of_range)
        if fa.kind == "numeric":
            ka, kb = fa.kll(), fb.kll()
            assert ka.n == kb.n
            if ka.n:
                assert (ka.get_min_value(), ka.get_max_value()) == (
                    kb.get_min_value(),
                    kb.get_max_value(),
                )
                assert ka.get_quantile(0.5) == kb.get_quantile(0.5)
        else:
            assert frequent_distribution(fa.frequent()) == frequent_distribution(fb.frequent())
    assert a.rows == len(batch)


def test_weighted_categorical_updates_keep_counts_and_unknown_categories():
    b = SketchBuilder()
    b.update_categorical("size", ["s", "s", "m", None, float("nan"), "xl", "xl", 3], ["s", "m"])
    f = b.build().features["size"]
    assert (f.count, f.missing, f.out_of_range) == (8, 2, 3)  # "xl" twice and 3
    sk = f.frequent()
    assert sk.get_estimate("s") == 2 and sk.get_estimate("xl") == 2 and sk.get_estimate("3") == 1
    b.update_categorical("label", [3, 1, 3, 3], ["1", "2"])  # plain ints: counted by numpy
    f = b.build().features["label"]
    assert (f.count, f.missing, f.out_of_range) == (4, 0, 3)
    assert f.frequent().get_estimate("3") == 3 and f.frequent().get_estimate("1") == 1


# caps before deserializing ----------------------------------------------------------------
def _frequent_bytes() -> bytearray:
    import datasketches

    sk = datasketches.frequent_strings_sketch(6)
    for i in range(10):
        sk.update(str(i), i + 1)
    return bytearray(sk.serialize())


def test_frequent_items_sketch_claiming_a_2_26_map_is_refused_before_it_allocates() -> None:
    """The 1.4 KB sketch that cost the fleet server +1.3 GB: refused from its header."""
    import base64
    import resource

    from protocol.errors import ProtocolError
    from protocol.sketches import decode_frequent

    raw = _frequent_bytes()
    raw[3] = raw[4] = 26  # lg max map size, lg current map size
    text = base64.b64encode(bytes(raw)).decode()
    peak0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(20):
        with pytest.raises(ProtocolError, match="2\\^26 is over the cap"):
            decode_frequent(text)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak0) / 1024
    assert grown_mb < 32, f"refusing the sketch raised the peak RSS by {grown_mb:.0f} MB"


def test_sketch_headers_over_the_caps_are_refused_and_good_ones_pass() -> None:
    import base64

    import datasketches

    from protocol.errors import ProtocolError
    from protocol.sketches import MAX_KLL_K, MAX_SKETCH_BYTES, decode_frequent, decode_kll

    ok = _frequent_bytes()
    assert decode_frequent(base64.b64encode(bytes(ok)).decode()).total_weight == 55
    many = bytearray(ok)
    many[8:12] = (10_000).to_bytes(4, "little")  # more items than the map can hold
    with pytest.raises(ProtocolError, match="do not fit"):
        decode_frequent(base64.b64encode(bytes(many)).decode())
    kll = datasketches.kll_floats_sketch(200)
    kll.update(np.arange(1000, dtype=np.float32))
    raw = bytearray(kll.serialize())
    assert decode_kll(base64.b64encode(bytes(raw)).decode()).n == 1000
    raw[4:6] = (MAX_KLL_K + 1).to_bytes(2, "little")
    with pytest.raises(ProtocolError, match="k="):
        decode_kll(base64.b64encode(bytes(raw)).decode())
    with pytest.raises(ProtocolError, match="not KLL"):
        decode_kll(base64.b64encode(bytes(ok)).decode())  # a frequent-items sketch
    with pytest.raises(ProtocolError, match="over"):
        decode_kll("A" * (MAX_SKETCH_BYTES * 2))
