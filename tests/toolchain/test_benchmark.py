"""Benchmark: compatibility checks, estimates scaled by the speed factor, verdicts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from protocol.profiles import load_profile
from tests.toolchain import fixtures_pkg as fx
from tests.toolchain.fixtures_pkg import profile_toml
from toolchain.benchmark import benchmark, synthesize_rows
from toolchain.compat import check_compat, read_facts
from toolchain.errors import DataError, UnsupportedModelError

iris, iris_joblib, iris_onnx = fx.iris, fx.iris_joblib, fx.iris_onnx


def test_bench_scales_every_host_latency_by_the_profile_speed_factor(iris, iris_onnx, tmp_path):
    profile = load_profile(profile_toml(tmp_path, "times-four", speed_factor=4.0))
    report = benchmark(iris_onnx, profile, rows=iris.X, runs=20)
    host, est = report.host, report.result
    assert host is not None and est.estimated
    assert est.p50_ms == pytest.approx(host.p50_ms * 4)
    assert est.p95_ms == pytest.approx(host.p95_ms * 4)
    assert est.p99_ms == pytest.approx(host.p99_ms * 4)
    assert est.batch_p50_ms == pytest.approx(host.batch_p50_ms * 4)
    assert est.throughput_rps == pytest.approx(host.throughput_rps / 4)
    assert host.p50_ms <= host.p95_ms <= host.p99_ms
    assert host.batch_size == 64 and est.size_bytes == iris_onnx.stat().st_size


def test_bench_fits_a_generous_budget_and_fails_an_impossible_one(iris, iris_onnx, tmp_path):
    roomy = load_profile(profile_toml(tmp_path, "roomy", latency_budget_ms=10000.0))
    assert benchmark(iris_onnx, roomy, rows=iris.X, runs=20).fits
    slow = load_profile(
        profile_toml(tmp_path, "slow", speed_factor=10000.0, latency_budget_ms=0.001)
    )
    report = benchmark(iris_onnx, slow, rows=iris.X, runs=20)
    assert not report.fits and not report.result.fits_budget
    assert any("exceeds the latency budget" in r for r in report.reasons)


def test_bench_synthesizes_rows_within_the_schema_ranges_when_no_data(iris_onnx):
    from toolchain.sidecar import describe

    schema = describe(iris_onnx).input_schema
    rows = synthesize_rows(schema, 100).astype(np.float64)
    for j, f in enumerate(schema.features):
        assert f.min is not None and f.max is not None
        assert rows[:, j].min() >= f.min and rows[:, j].max() <= f.max
    report = benchmark(iris_onnx, load_profile("host"), runs=20)
    assert report.host is not None and report.host.p50_ms > 0


def test_bench_refuses_rows_with_the_wrong_feature_count(iris, iris_onnx):
    with pytest.raises(DataError, match="3 features, the model expects 4"):
        benchmark(iris_onnx, load_profile("host"), rows=iris.X[:, :3], runs=20)


def test_compat_reads_onnx_opsets_and_operators(iris_onnx):
    facts = read_facts(iris_onnx)
    assert facts.format == "onnx" and facts.opset and facts.ml_opset
    assert any("TreeEnsemble" in op for op in facts.operators)


def test_compat_flags_an_opset_newer_than_the_profile_runtime(iris_onnx, tmp_path):
    old = [
        {
            "name": "onnxruntime",
            "version": "1.8",
            "formats": ["onnx"],
            "max_opset": 9,
            "max_ml_opset": 5,
        }
    ]
    profile = load_profile(profile_toml(tmp_path, "old-ort", runtimes=old))
    report = check_compat(iris_onnx, profile)
    assert not report.ok
    assert any("ai.onnx opset" in p and "supports 9" in p for p in report.problems)


def test_compat_flags_a_profile_without_a_runtime_for_the_format(iris_onnx, tmp_path):
    tflite_only = [{"name": "litert", "version": "2.3", "formats": ["tflite"]}]
    profile = load_profile(profile_toml(tmp_path, "tflite-only", runtimes=tflite_only))
    report = benchmark(iris_onnx, profile, runs=20)
    assert not report.fits and report.host is None
    assert any("no runtime for onnx" in r for r in report.reasons)


def test_compat_flags_a_model_larger_than_the_memory_budget(iris_onnx, tmp_path):
    profile = load_profile(profile_toml(tmp_path, "tiny-memory", memory_budget_mb=0.001))
    report = check_compat(iris_onnx, profile)
    assert any("memory budget" in p for p in report.problems)


def test_compat_rejects_an_unknown_model_file_type(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(UnsupportedModelError, match="unknown model file type"):
        read_facts(path)


def test_compat_rejects_an_onnx_file_that_is_not_onnx(tmp_path):
    path = Path(tmp_path) / "broken.onnx"
    path.write_bytes(b"this is not protobuf at all \xff\xfe")
    with pytest.raises(UnsupportedModelError):
        read_facts(path)


def test_bench_runs_a_bare_onnx_file_without_a_sidecar(iris, iris_onnx, tmp_path):
    from toolchain.data import load_data

    bare = tmp_path / "bare.onnx"
    bare.write_bytes(iris_onnx.read_bytes())
    report = benchmark(bare, load_profile("host"), data=load_data(iris.npz), runs=20)
    assert report.compat.ok and report.host is not None and report.fits
