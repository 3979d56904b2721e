"""Every toolchain command through the root ``edgefleet`` CLI, on real (tiny) models."""

from __future__ import annotations

import json
import stat
import warnings
from pathlib import Path

import numpy as np
import pytest

from protocol.bundle import read_bundle, verify_bundle
from protocol.profiles import list_profiles
from protocol.signing import TrustStore
from tests.support.cli import run_cli
from tests.toolchain import fixtures_pkg as fx

iris, iris_joblib, iris_onnx, keys, iris_bundle = (
    fx.iris,
    fx.iris_joblib,
    fx.iris_onnx,
    fx.keys,
    fx.iris_bundle,
)


def ok(*args: object):
    result = run_cli(args)
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def test_profiles_list_shows_every_profile():
    out = ok("profiles", "list").stdout
    for profile in list_profiles():
        assert profile.name in out
    assert "speed" in out and "latency" in out


def test_profiles_show_includes_the_speed_factor_source():
    out = ok("profiles", "show", "raspberry-pi-4").stdout
    assert "speed_factor_source" in out and "onnxruntime" in out and "latency_budget_ms" in out


def test_keys_generate_prints_the_key_id_and_never_key_material(tmp_path):
    out = ok("keys", "generate", "--out", tmp_path, "--name", "ci").output
    assert "key id" in out and "PRIVATE KEY" not in out and "BEGIN" not in out
    assert stat.S_IMODE((tmp_path / "ci.key").stat().st_mode) == 0o600
    assert (tmp_path / "ci.pub").is_file()


def test_convert_prints_the_parity_table_and_writes_the_model(iris, iris_joblib, tmp_path):
    out_path = tmp_path / "rf.onnx"
    out = ok("convert", iris_joblib, "--data", iris.csv, "--target", "species", "--out", out_path)
    assert "label agreement" in out.stdout and "max |Δprobability|" in out.stdout
    assert out_path.is_file() and (tmp_path / "rf.onnx.edgefleet.json").is_file()


def test_convert_fails_with_the_report_when_parity_is_below_threshold(iris, iris_joblib, tmp_path):
    result = run_cli(
        [
            "convert", str(iris_joblib), "--data", str(iris.npz),
            "--out", str(tmp_path / "m.onnx"), "--min-label-agreement", "1.5",
        ],
    )  # fmt: skip
    assert result.exit_code != 0
    assert "parity: FAILED" in result.stdout and "label agreement" in result.stdout
    assert result.stderr.startswith("error: ") and "parity failed" in result.stderr


@pytest.fixture(scope="module")
def iris_mlp_onnx(iris, tmp_path_factory) -> Path:
    import joblib
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    d = tmp_path_factory.mktemp("mlp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # convergence is not the point
        model = MLPClassifier(hidden_layer_sizes=(16,), max_iter=300, random_state=0)
        model.fit(iris.X, iris.y)
    joblib.dump(model, d / "mlp.joblib")
    ok("convert", d / "mlp.joblib", "--data", iris.npz, "--out", d / "mlp.onnx")
    return d / "mlp.onnx"


def test_quantize_writes_a_smaller_dynamic_int8_model(iris, iris_mlp_onnx, tmp_path):
    out_path = tmp_path / "mlp-int8.onnx"
    out = ok("quantize", iris_mlp_onnx, "--mode", "dynamic", "--data", iris.npz, "--out", out_path)
    assert out_path.is_file() and "dynamic" in out.stdout and "× the input" in out.stdout


def test_quantize_fails_with_the_report_when_agreement_is_below_threshold(
    iris, iris_mlp_onnx, tmp_path
):
    result = run_cli(
        [
            "quantize", str(iris_mlp_onnx), "--mode", "dynamic", "--data", str(iris.npz),
            "--out", str(tmp_path / "q.onnx"), "--min-label-agreement", "1.01",
        ],
    )  # fmt: skip
    assert result.exit_code == 1
    assert "FAILED" in result.stdout and "unquantized model" in result.stdout
    assert "label agreement" in result.stdout
    assert result.stderr.startswith("error: ") and "label agreement" in result.stderr


def test_quantized_parity_judges_regressors_by_absolute_and_relative_error():
    from toolchain.quantize import QuantizedParityThresholds

    failures = QuantizedParityThresholds().failures
    assert failures({"max_abs_error": 0.2, "max_rel_error": 0.01}) == []
    assert failures({"max_abs_error": 0.01, "max_rel_error": 0.5}) == []
    assert failures({"max_abs_error": 0.2, "max_rel_error": 0.5})
    assert failures({"label_agreement": 0.9})


def test_quantize_rejects_an_unknown_mode(iris_mlp_onnx):
    result = run_cli(["quantize", str(iris_mlp_onnx), "--mode", "int3"])
    assert result.exit_code != 0 and "dynamic, static, fp16 or int8" in result.output


def test_bench_json_carries_host_numbers_estimates_and_the_verdict(iris, iris_onnx):
    out = ok(
        "bench",
        iris_onnx,
        "--profile",
        "raspberry-pi-4",
        "--data",
        iris.npz,
        "--json",
        "--runs",
        20,
    )
    doc = json.loads(out.stdout)
    assert doc["profile"] == "raspberry-pi-4" and doc["compatible"] is True
    assert doc["estimate"]["estimated"] is True
    assert doc["estimate"]["p95_ms"] == pytest.approx(doc["host"]["p95_ms"] * doc["speed_factor"])
    assert doc["fits_budget"] is True and doc["host"]["batch_size"] == 64


def test_bench_table_labels_device_numbers_as_estimates(iris_onnx):
    out = ok("bench", iris_onnx, "--profile", "host", "--runs", 20).stdout
    assert "ESTIMATES" in out and "FITS" in out and "p99" in out and "load ms" in out


def test_package_verify_and_inspect_round_trip(iris, iris_onnx, keys, tmp_path):
    bundle = tmp_path / "iris-2.0.0.efb"
    out = ok(
        "package", iris_onnx, "--name", "iris", "--version", "2.0.0", "--profile", "host",
        "--profile", "coral-dev-board", "--data", iris.npz, "--key", keys.private_path,
        "--out", bundle, "--release", 7, "--fallback", "previous",
    ).stdout  # fmt: skip
    assert "release 7" in out and bundle.is_file()
    verified = ok("verify", bundle, "--trust", keys.public_path, "--profile", "coral-dev-board")
    assert verified.stdout.startswith("OK iris 2.0.0 release 7") and keys.key_id in verified.stdout
    summary = ok("inspect", bundle).stdout
    for text in (
        "iris 2.0.0",
        "release 7",
        "model.onnx",
        "reference.sketch",
        "coral-dev-board",
        "smoke tests: 1",
    ):
        assert text in summary
    doc = json.loads(ok("inspect", bundle, "--json").stdout)
    assert doc["manifest"]["fallback"]["kind"] == "previous"
    assert doc["signature_key_id"] == keys.key_id and doc["verified"] is False


def test_build_makes_a_signed_verifiable_bundle_from_a_sklearn_pickle(
    iris, iris_joblib, keys, tmp_path
):
    out = ok(
        "build", iris_joblib, "--data", iris.csv, "--target", "species", "--name", "iris-rf",
        "--version", "1.0.0", "--profile", "host", "--profile", "raspberry-pi-5",
        "--key", keys.private_path, "--out", tmp_path, "--runs", 20,
    ).stdout  # fmt: skip
    bundle = tmp_path / "iris-rf-1.0.0.efb"
    assert bundle.is_file() and "onnx-fp32" in out
    manifest = verify_bundle(read_bundle(bundle), TrustStore.from_files([keys.public_path]))
    assert manifest.model.format == "onnx" and manifest.profiles == ["host", "raspberry-pi-5"]
    assert manifest.metadata["variant"] == "onnx-fp32"
    assert manifest.metadata["accuracy_metric"] == "accuracy"
    assert float(manifest.metadata["accuracy_drop"]) <= 0.01
    card = read_bundle(bundle).members["model_card.md"].decode()
    assert "## Build notes" in card and "variant: onnx-fp32" in card
    assert [f.name for f in manifest.input_schema.features][:2] == ["sepal_length", "sepal_width"]


def test_build_table_keeps_variant_names_whole_at_80_columns(iris, iris_joblib, keys, tmp_path):
    result = run_cli(
        [
            "build", iris_joblib, "--data", iris.npz, "--name", "iris", "--version", "1.0.0",
            "--profile", "host", "--key", keys.private_path, "--out", tmp_path, "--runs", "10",
        ],
        env={"COLUMNS": "80"},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    import re

    rows = []
    for name in ("onnx-fp32", "onnx-int8-dynamic", "onnx-int8-static", "onnx-fp16"):
        row = re.search(rf"^(→ )?{name} .*$", result.stdout, re.M)
        assert row, result.stdout
        rows.append(row.group(0))
    assert all(len(row) <= 80 for row in rows), rows
    assert "onnx-fp16: not applicable: " in " ".join(result.stdout.split())
    assert "failed to convert" not in result.stdout


def test_build_exits_3_and_packages_nothing_when_no_variant_fits(iris, iris_joblib, keys, tmp_path):
    slow = fx.profile_toml(tmp_path, "glacial", speed_factor=10000.0)
    result = run_cli(
        [
            "build", str(iris_joblib), "--data", str(iris.npz), "--name", "iris",
            "--version", "1.0.0", "--profile", str(slow), "--key", str(keys.private_path),
            "--out", str(tmp_path / "out"), "--runs", "10",
        ],
    )  # fmt: skip
    assert result.exit_code == 3, result.output
    assert "over budget" in result.stdout
    assert not list((tmp_path / "out").glob("*.efb"))


@pytest.mark.tflite
def test_build_makes_a_signed_verifiable_bundle_from_a_keras_model(iris, keys, tmp_path):
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(iris.X, iris.y, epochs=30, verbose=0)
    path = tmp_path / "iris.keras"
    model.save(path)
    out = ok(
        "build", path, "--data", iris.npz, "--name", "iris-keras", "--version", "1.0.0",
        "--profile", "host", "--key", keys.private_path, "--out", tmp_path / "dist",
        "--max-accuracy-drop", "0.05", "--runs", 20,
    ).stdout  # fmt: skip
    assert "tflite-fp32" in out and "tflite-int8" in out
    bundle = tmp_path / "dist" / "iris-keras-1.0.0.efb"
    manifest = verify_bundle(read_bundle(bundle), TrustStore.from_files([keys.public_path]))
    assert manifest.model.format == "tflite" and manifest.model.path == "model.tflite"
    assert manifest.lineage.source_kind == "keras"
    assert "FULLY_CONNECTED" in manifest.model.operators  # read from the flatbuffer
    assert manifest.smoke_tests[0].expected_probabilities is not None
    np.testing.assert_allclose(
        np.sum(manifest.smoke_tests[0].expected_probabilities, axis=1), 1, atol=0.02
    )


def test_root_edgefleet_command_runs_keys_build_verify_and_over_budget_exit_3(
    iris, iris_joblib, iris_onnx, tmp_path
):
    import os
    import subprocess
    import sys

    def edgefleet(*args: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "edgefleet", *map(str, args)],
            capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "160"},
        )  # fmt: skip

    assert edgefleet("keys", "generate", "--out", tmp_path / "keys").returncode == 0
    built = edgefleet(
        "build", iris_joblib, "--data", iris.npz, "--name", "iris", "--version", "3.0.0",
        "--profile", "host", "--key", tmp_path / "keys" / "edgefleet.key",
        "--out", tmp_path / "dist", "--runs", 10,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    verified = edgefleet(
        "verify",
        tmp_path / "dist" / "iris-3.0.0.efb",
        "--trust",
        tmp_path / "keys" / "edgefleet.pub",
    )
    assert verified.returncode == 0 and verified.stdout.startswith("OK iris 3.0.0")
    slow = fx.profile_toml(tmp_path, "slow", speed_factor=10000.0)
    over = edgefleet("bench", iris_onnx, "--profile", slow, "--runs", 10)
    assert over.returncode == 3 and "OVER BUDGET" in over.stdout and "Traceback" not in over.stderr
    unknown = edgefleet("bench", iris_onnx, "--profile", "toaster")
    lines = unknown.stderr.strip().splitlines()
    assert unknown.returncode == 1 and len(lines) == 1
    assert lines[0].startswith("error: unknown profile 'toaster'")
