"""Optimize: every variant is built and measured; the choice rule and the reasons it gives."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from protocol.manifest import BenchmarkResult
from protocol.profiles import load_profile
from tests.toolchain import fixtures_pkg as fx
from toolchain.benchmark import BenchReport
from toolchain.compat import CompatReport, ModelFacts
from toolchain.optimize import OptimizeReport, Variant, _choose, optimize, split_holdout

iris, iris_joblib = fx.iris, fx.iris_joblib


def _measured(name: str, p95: float, size: int, drop: float, fits: bool = True) -> Variant:
    profile = load_profile("host")
    result = BenchmarkResult(p50_ms=p95 / 2, p95_ms=p95, p99_ms=p95 * 2, fits_budget=fits)
    reasons = [] if fits else ["estimated p95 exceeds the latency budget"]
    bench = BenchReport(
        Path(name),
        profile,
        CompatReport("host", ModelFacts("onnx", size), "ort"),
        None,
        result,
        reasons,
    )
    return Variant(name, "onnx", "none", size_bytes=size, bench=bench, score=1 - drop, drop=drop)


def _report(*variants: Variant, max_drop: float = 0.01) -> OptimizeReport:
    report = OptimizeReport(load_profile("host"), "classification", "accuracy", 1.0, max_drop)
    report.variants = list(variants)
    _choose(report)
    return report


def test_choice_is_the_smallest_estimated_p95_among_passing_variants():
    fast, slow = _measured("fast", 1.0, 5000, 0.0), _measured("slow", 2.0, 1000, 0.0)
    report = _report(slow, fast)
    assert report.chosen is fast
    assert slow.verdict.startswith("slower: est. p95 2.000 ms vs 1.000 ms")


def test_choice_breaks_a_p95_tie_by_the_smaller_file():
    big, small = _measured("big", 1.00, 5000, 0.0), _measured("small", 1.03, 1000, 0.0)
    report = _report(big, small)
    assert report.chosen is small
    assert big.verdict.startswith("larger:")


def test_choice_skips_fast_variants_that_are_inaccurate_over_budget_or_failed():
    inaccurate = _measured("inaccurate", 0.5, 100, 0.05)
    over = _measured("over", 0.1, 100, 0.0, fits=False)
    failed = Variant("failed", "onnx", "static", error="failed to convert: no weights")
    ok = _measured("ok", 3.0, 9000, 0.005)
    report = _report(inaccurate, over, failed, ok)
    assert report.chosen is ok
    assert inaccurate.verdict.startswith("too inaccurate: accuracy drop 0.0500 > 0.01")
    assert over.verdict.startswith("over budget:")
    assert failed.verdict == "failed to convert: no weights"


def test_no_choice_when_nothing_passes():
    report = _report(_measured("over", 0.1, 100, 0.0, fits=False))
    assert report.chosen is None


def test_holdout_split_is_disjoint_and_covers_every_row_when_there_is_a_target():
    calib, held = split_holdout(100, has_target=True)
    assert len(held) == 25 and not set(calib) & set(held)
    assert sorted([*calib, *held]) == list(range(100))
    same_calib, same_eval = split_holdout(100, has_target=False)
    assert list(same_calib) == list(same_eval) == list(range(100))


@pytest.fixture(scope="module")
def digits_mlp(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    import joblib
    from sklearn.datasets import load_digits
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    X, y = load_digits(return_X_y=True)
    X = X.astype(np.float32)
    d = tmp_path_factory.mktemp("digits")
    model = MLPClassifier(hidden_layer_sizes=(32,), max_iter=200, random_state=0)
    with warnings.catch_warnings():
        # A few hundred iterations are plenty for this test; convergence is not the point.
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(X[:1000], y[:1000])
    joblib.dump(model, d / "mlp.joblib")
    np.savez(d / "digits.npz", X=X[1000:1400], y=y[1000:1400])
    return d / "mlp.joblib", d / "digits.npz"


def test_optimize_builds_measures_and_chooses_among_every_onnx_variant(digits_mlp, tmp_path):
    from toolchain.data import load_data

    model, data = digits_mlp
    report = optimize(model, load_data(data), load_profile("host"), out_dir=tmp_path, runs=20)
    names = [v.name for v in report.variants]
    assert names == ["onnx-fp32", "onnx-int8-dynamic", "onnx-int8-static", "onnx-fp16"]
    measured = {v.name: v for v in report.variants if v.ok}
    assert "onnx-fp32" in measured and "onnx-int8-dynamic" in measured
    for v in measured.values():
        assert v.bench is not None and v.bench.host is not None and v.bench.host.p50_ms > 0
        assert (
            v.score is not None and v.drop is not None and v.path is not None and v.path.is_file()
        )
    # Sizes are measured, not assumed: INT8 weights make the file smaller than fp32.
    assert measured["onnx-int8-dynamic"].size_bytes < measured["onnx-fp32"].size_bytes
    assert report.chosen is not None and report.chosen.drop <= 0.01
    assert all(v.verdict for v in report.variants)
    assert any("onnx2tf" in s for s in report.skipped)


def test_optimize_says_why_tree_models_have_no_int8_variants(iris, iris_joblib, tmp_path):
    from toolchain.data import load_data

    report = optimize(
        iris_joblib, load_data(iris.npz), load_profile("host"), out_dir=tmp_path, runs=20
    )
    by_name = {v.name: v for v in report.variants}
    assert by_name["onnx-fp32"].ok
    assert report.chosen is not None
    failed = [v for v in report.variants if v.error]
    assert failed, "quantizing a tree ensemble should fail with a reason, not silently pass"
    # nothing to quantize is not a conversion failure: it is labelled as not applicable
    assert all(v.verdict.startswith("not applicable: ") for v in failed)
    assert all("no MatMul/Gemm/Conv weights" in v.verdict for v in failed)


def test_regressors_are_scored_by_r2_and_classifiers_by_accuracy():
    from protocol.feeds import Prediction
    from toolchain.optimize import agreement, score

    truth = np.array([1.0, 2.0, 3.0, 4.0])
    exact = Prediction(values=truth.reshape(-1, 1))
    off = Prediction(values=(truth + 1.0).reshape(-1, 1))
    assert score(exact, truth, "regression") == pytest.approx(1.0)
    assert score(off, truth, "regression") == pytest.approx(1 - 4 / 5)
    assert agreement(off, exact, "regression") == pytest.approx(1 - 4 / 5)
    labels = Prediction(labels=[0, 1, 1, 2])
    # Labels compare by value whatever their numeric type (y loaded as float, labels as int).
    assert score(labels, np.array([0.0, 1.0, 2.0, 2.0]), "classification") == pytest.approx(0.75)
    assert agreement(labels, Prediction(labels=["0", "1", "1", "2"]), "classification") == 1.0


def test_optimize_without_a_target_scores_variants_against_the_source(digits_mlp, tmp_path):
    from toolchain.data import dataset_from_arrays, load_data

    model, data = digits_mlp
    unlabeled = dataset_from_arrays(load_data(data).X[:100])
    report = optimize(model, unlabeled, load_profile("host"), out_dir=tmp_path, runs=10)
    assert report.metric == "agreement" and report.source_score == 1.0
    fp32 = report.variants[0]
    assert fp32.name == "onnx-fp32" and fp32.agreement == 1.0 and fp32.drop == 0.0
