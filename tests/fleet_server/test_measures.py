"""Drift per device and cohort, field accuracy, calibration, and their wiring in the service."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pytest
import sqlite_utils

from fleet_server.calibration import bench_sample, derive, host_p50, latency_outliers
from fleet_server.cohort_drift import CohortDrift, describe, summarize
from fleet_server.drift import DriftConfig
from fleet_server.field_accuracy import FieldAccuracy, compare_versions, wilson
from fleet_server.measure_store import SQLiteCohortStore, SQLiteFeedbackStore
from protocol.messages import LatencySummary, MetricsReport, ModelRef, SketchReport
from protocol.sketches import SketchBuilder, SketchSet

T0 = 1_699_999_200.0
FEATURES = [f"f{i}" for i in range(6)]


def rows(rng: np.random.Generator, n: int, shift: float = 0.0) -> SketchSet:
    b = SketchBuilder()
    for name in FEATURES:
        b.update_numeric(name, rng.normal(shift, 1.0, n))
    b.rows = n
    return b.build()


def sketch_report(device: str, sketches: SketchSet, seq: int = 0) -> SketchReport:
    start = datetime.fromtimestamp(T0 + 10, timezone.utc)
    return SketchReport(
        device_id=device,
        model=ModelRef(name="m", version="1.0", release=1),
        window_start=start,
        window_end=start,
        seq=seq,
        sketches=sketches,
    )


@pytest.fixture()
def cohorts(tmp_path: Any) -> CohortDrift:
    ref = rows(np.random.default_rng(99), 20_000)
    info = {
        "a1": ("raspberry-pi-4", ["site-a"]),
        "a2": ("raspberry-pi-4", ["site-a"]),
        "b1": ("jetson-orin-nano", ["site-b"]),
        "b2": ("jetson-orin-nano", ["site-b"]),
    }
    db = sqlite_utils.Database(tmp_path / "fleet.db")
    return CohortDrift(SQLiteCohortStore(db), DriftConfig(), lambda m, v: ref, lambda: info)


def test_a_shift_on_one_device_names_that_device_and_not_the_others(cohorts: CohortDrift) -> None:
    rng = np.random.default_rng(1)
    for dev in ("a1", "a2", "b1"):
        cohorts.ingest(sketch_report(dev, rows(rng, 3000)))
    cohorts.ingest(sketch_report("b2", rows(rng, 3000, shift=0.8)))
    results = cohorts.evaluate("m", "1.0", now=T0 + 100)
    by = {(r.scope, r.subject): r for r in results}
    assert [s for (sc, s), r in sorted(by.items()) if sc == "device" and r.dataset_drift] == ["b2"]
    assert by[("tag", "site-a")].dataset_drift is False
    assert by[("profile", "jetson-orin-nano")].evaluated
    summary = summarize(results)
    assert list(summary["drifted_devices"]) == ["b2"]
    assert sorted(summary["steady_devices"]) == ["a1", "a2", "b1"]
    text = describe("m", "1.0", summary)
    assert "on 1 of 4 devices: b2 (6/6 features)" in text and "not drifted: a1, a2, b1" in text
    stored = cohorts.stored("m", "1.0")
    assert stored[0]["subject"] in ("b2", "jetson-orin-nano", "site-b")  # drifted rows first
    assert stored[0]["dataset_drift"]


def test_two_cohorts_with_different_shifts_drift_separately(cohorts: CohortDrift) -> None:
    rng = np.random.default_rng(2)
    cohorts.ingest(sketch_report("a1", rows(rng, 2500, shift=0.6)))
    cohorts.ingest(sketch_report("a2", rows(rng, 2500, shift=0.6)))
    cohorts.ingest(sketch_report("b1", rows(rng, 2500)))
    cohorts.ingest(sketch_report("b2", rows(rng, 2500)))
    cohorts.evaluate("m", "1.0", now=T0 + 50)
    tags = {r["subject"]: r for r in cohorts.stored(scope="tag")}
    assert tags["site-a"]["dataset_drift"] and not tags["site-b"]["dataset_drift"]
    group = cohorts.group("m", "1.0", ["b1", "b2"], now=T0 + 50, name="r-1")
    assert group is not None and group.evaluated and not group.dataset_drift


def test_per_device_windows_survive_a_restart(tmp_path: Any) -> None:
    ref = rows(np.random.default_rng(5), 5000)
    db = sqlite_utils.Database(tmp_path / "f.db")
    c = CohortDrift(SQLiteCohortStore(db), DriftConfig(), lambda m, v: ref, lambda: {})
    c.ingest(sketch_report("d", rows(np.random.default_rng(6), 1000)))
    c.flush()
    again = CohortDrift(SQLiteCohortStore(db), DriftConfig(), lambda m, v: ref, lambda: {})
    again.ingest(sketch_report("d", rows(np.random.default_rng(7), 1000), seq=1))
    res = again.evaluate("m", "1.0", now=T0 + 60)
    assert [r.rows for r in res if r.scope == "device"] == [2000]


# field accuracy ----------------------------------------------------------------------------
def metrics(
    device: str, version: str, n: int, acc: float | None, seq: int, mae: float | None = None
) -> MetricsReport:
    end = datetime.fromtimestamp(T0 + seq, timezone.utc)
    return MetricsReport(
        device_id=device,
        seq=seq,
        window_start=end,
        window_end=end,
        model=ModelRef(name="m", version=version, release=1),
        requests=n,
        feedback_count=n,
        accuracy=acc,
        mae=mae,
        latency=LatencySummary(count=n, p95_ms=1.0),
    )


def test_wilson_interval_matches_the_textbook_value() -> None:
    lo, hi = wilson(81, 100)
    assert lo == pytest.approx(0.7222, abs=1e-3) and hi == pytest.approx(0.8751, abs=1e-3)
    assert wilson(0, 0) == (0.0, 1.0)


def test_field_accuracy_per_version_and_device_with_interval(tmp_path: Any) -> None:
    fa = FieldAccuracy(SQLiteFeedbackStore(sqlite_utils.Database(tmp_path / "f.db")))
    assert fa.ingest(metrics("d1", "1.0", 50, 0.96, 1))
    assert fa.ingest(metrics("d2", "1.0", 50, 0.94, 2))
    assert fa.ingest(metrics("d1", "2.0", 40, 0.70, 3))
    assert not fa.ingest(metrics("d1", "2.0", 0, None, 4))  # no labels: nothing kept
    fa.ingest(metrics("d1", "2.0", 40, 0.70, 3))  # a QoS 1 duplicate counts once
    by_version = {r["version"]: r for r in fa.report("m")}
    assert by_version["1.0"]["labelled"] == 100 and by_version["1.0"]["value"] == pytest.approx(
        0.95
    )
    assert by_version["2.0"]["labelled"] == 40
    assert by_version["2.0"]["ci_low"] < 0.70 < by_version["2.0"]["ci_high"]
    per_device = fa.report("m", "1.0", by="device")
    assert [r["device_id"] for r in per_device] == ["d1", "d2"]
    assert fa.previous_version("m", "2.0") == "1.0"
    reason = compare_versions(
        {**by_version["2.0"], "version": "2.0"}, {**by_version["1.0"], "version": "1.0"}, 0.05, 30
    )
    assert "below 1.0's 95.0%" in reason
    assert compare_versions(by_version["2.0"], by_version["1.0"], 0.05, 60) == ""  # too few


def test_regressor_feedback_reports_mae_with_an_interval(tmp_path: Any) -> None:
    fa = FieldAccuracy(SQLiteFeedbackStore(sqlite_utils.Database(tmp_path / "f.db")))
    fa.ingest(metrics("d1", "1.0", 20, None, 1, mae=2.0))
    fa.ingest(metrics("d1", "1.0", 20, None, 2, mae=4.0))
    (r,) = fa.report("m")
    assert r["metric"] == "mae" and r["value"] == pytest.approx(3.0)
    assert r["ci_low"] < 3.0 < r["ci_high"]


# calibration --------------------------------------------------------------------------------
def test_measured_speed_factor_is_the_median_device_ratio_with_outliers_named() -> None:
    samples = [
        {
            "device_id": f"pi-{i}",
            "profile": "pi",
            "ratio": r,
            "ts": T0 + i,
            "model": "m",
            "version": "1",
        }
        for i, r in enumerate([4.0, 4.2, 3.9, 4.1, 12.0])
    ]
    (c,) = derive(samples).values()
    assert c["speed_factor"] == pytest.approx(4.1) and c["devices"] == 5
    assert c["spread"] == pytest.approx(4.2 - 4.0)
    assert [o["device_id"] for o in c["outliers"]] == ["pi-4"]
    assert c["date"] == "2023-11-14"


def test_host_timing_comes_from_the_manifest_estimate_and_its_factor() -> None:
    manifest = {
        "targets": [
            {
                "profile": "pi",
                "benchmark": {"p50_ms": 6.0, "measured_on": "x86_64 host × 6 (estimate)"},
            }
        ]
    }
    assert host_p50(manifest, "pi")[0] == pytest.approx(1.0)
    result = {
        "p50_ms": 4.5,
        "p95_ms": 5.0,
        "estimated": False,
        "model": {"name": "m", "version": "1"},
    }
    bundle = {"sha256": "ab", "name": "m", "version": "1", "manifest": json.dumps(manifest)}
    s = bench_sample("d", "pi", result, bundle, T0)
    assert s is not None and s["ratio"] == pytest.approx(4.5) and s["profile"] == "pi"
    assert bench_sample("d", "pi", {**result, "estimated": True}, bundle, T0) is None
    other = {**result, "model": {"name": "m", "version": "2"}}  # not the bundle we asked about
    assert bench_sample("d", "pi", other, bundle, T0) is None
    for bad in (float("nan"), -1.0, True, "4.5", 1e12):
        assert bench_sample("d", "pi", {**result, "p50_ms": bad}, bundle, T0) is None


def test_latency_outlier_is_far_from_its_profile_median() -> None:
    rows_ = [
        {"device_id": d, "profile": "host", "model": "m", "version": "1", "p95_ms": p}
        for d, p in [("a", 1.0), ("b", 1.2), ("c", 1.1), ("slow", 9.0)]
    ]
    (o,) = latency_outliers(rows_)
    assert o["device_id"] == "slow" and o["times_median"] > 2


def test_per_device_drift_test_false_alarm_rate_on_null_windows_is_at_most_five_percent() -> None:
    from bench.sketch_accuracy import null_experiment

    for row in null_experiment(windows=200, rows=2000):
        assert row["windows"] >= 200 and row["rows_per_window"] >= 2000
        assert row["false_alarm_rate"] <= 0.05, row
        assert row["detection_rate"] >= 0.9, row  # and the test is not simply blind


@pytest.mark.parametrize("name", ["../../etc/passwd", "/tmp/x.toml", "x.toml", "", "a/b", "é"])
def test_a_profile_name_from_a_device_is_never_a_path(name: str) -> None:
    from fleet_server.calibration import profile_name_ok

    assert not profile_name_ok(name)
    assert profile_name_ok("raspberry-pi-4")
