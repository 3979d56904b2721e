"""``profiles calibrate``: the [measured] table in a profile file, and its use by bench."""

from __future__ import annotations

from pathlib import Path

import pytest

import firmware_profiles
from protocol.errors import ProfileError
from protocol.profiles import load_profile, parse_profile
from tests.toolchain import fixtures_pkg as fx
from toolchain.calibrate import calibrate, with_measured

iris, iris_joblib, iris_onnx = fx.iris, fx.iris_joblib, fx.iris_onnx  # fixtures

PI4 = Path(firmware_profiles.__file__).parent / "raspberry-pi-4.toml"
MEASURED = {
    "speed_factor": 4.2,
    "devices": 7,
    "spread": 0.3,
    "date": "2026-11-30",
    "bundles": ["m@1"],
}


def test_measured_table_sits_beside_the_estimate_and_is_used() -> None:
    base = PI4.read_text()
    assert load_profile("raspberry-pi-4").speed_basis() == "estimate"
    text = with_measured(base, MEASURED)
    assert "speed_factor = 6.0" in text and "# Speed factor: an estimate" in text
    p = parse_profile(text)
    assert p.effective_speed_factor() == 4.2 and p.speed_factor == 6.0
    assert p.speed_basis() == "measured on 7 devices (2026-11-30)"
    again = parse_profile(with_measured(text, {**MEASURED, "devices": 2, "speed_factor": 5.0}))
    assert again.measured is not None and again.measured.devices == 2
    assert again.runtimes == p.runtimes  # the [[runtimes]] tables survive a rewrite


def test_a_bad_measured_table_names_the_field() -> None:
    bad = PI4.read_text() + '\n[measured]\nspeed_factor = -1\ndevices = 1\ndate = "2026-01-01"\n'
    with pytest.raises(ProfileError, match=r"measured\.speed_factor"):
        parse_profile(bad)


def test_calibrate_writes_a_profile_file_that_bench_then_uses(tmp_path: Path, monkeypatch) -> None:
    data = {
        "profiles": [
            {"profile": "raspberry-pi-4", **MEASURED},
            {"profile": "host", **MEASURED, "devices": 0},
        ]
    }
    done = calibrate(data, folder=tmp_path, min_devices=1)
    assert [(p.name, path.name) for p, path in done] == [("raspberry-pi-4", "raspberry-pi-4.toml")]
    monkeypatch.setenv("EDGEFLEET_PROFILES_DIR", str(tmp_path))
    from toolchain.benchmark import HostTiming, estimate

    prof = load_profile("raspberry-pi-4")
    host = HostTiming(
        p50_ms=1.0, p95_ms=1.0, p99_ms=1.0, batch_size=8, batch_p50_ms=1.0, batch_p95_ms=1.0,
        batch_p99_ms=1.0, throughput_rps=1000.0, load_ms=1.0, peak_memory_mb=1.0, runs=10,
    )  # fmt: skip
    result = estimate(host, prof, 100, [])
    assert result.p50_ms == pytest.approx(4.2)
    assert "measured on 7 devices (2026-11-30)" in result.measured_on


def _calibrated(tmp_path: Path) -> Path:
    base = fx.profile_toml(tmp_path, "field-host", speed_factor=1.0)
    measured = {**MEASURED, "speed_factor": 3.0, "devices": 5}
    base.write_text(with_measured(base.read_text(), measured))
    return base


def test_bench_and_optimize_say_the_factor_was_measured_in_table_and_json(
    iris, iris_onnx, iris_joblib, tmp_path: Path
) -> None:
    import json

    from typer.testing import CliRunner

    from toolchain.cli import app

    runner = CliRunner()
    prof = _calibrated(tmp_path)
    out = runner.invoke(
        app, ["bench", str(iris_onnx), "--profile", str(prof), "--runs", "20", "--json"]
    )
    doc = json.loads(out.stdout)
    assert doc["speed_factor"] == 3.0 and doc["speed_factor_estimate"] == 1.0
    assert doc["speed_basis"] == "measured on 5 devices (2026-11-30)"
    assert doc["estimate"]["p50_ms"] == pytest.approx(doc["host"]["p50_ms"] * 3.0)
    table = runner.invoke(app, ["bench", str(iris_onnx), "--profile", str(prof), "--runs", "20"])
    assert "measured on 5 devices (2026-11-30)" in " ".join(table.stdout.split())
    opt = runner.invoke(
        app,
        [
            "optimize", str(iris_joblib), "--data", str(iris.npz), "--profile", str(prof),
            "--out", str(tmp_path / "variants"), "--runs", "10", "--json",
        ],
    )  # fmt: skip
    doc = json.loads(opt.stdout)
    assert doc["speed_basis"] == "measured on 5 devices (2026-11-30)" and doc["variants"]
    estimate = runner.invoke(
        app, ["bench", str(iris_onnx), "--profile", "host", "--runs", "20", "--json"]
    )
    assert json.loads(estimate.stdout)["speed_basis"] == "estimate"


def test_calibrate_into_a_folder_it_cannot_write_is_one_readable_error(tmp_path: Path) -> None:
    from toolchain.errors import ToolchainError

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    data = {"profiles": [{"profile": "raspberry-pi-4", **MEASURED}]}
    with pytest.raises(ToolchainError, match="cannot write"):
        calibrate(data, folder=blocker / "sub")
