"""Drift from merged device sketches, checked on synthetic data and against scipy's exact KS."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import numpy as np
import pytest
import sqlite_utils

from fleet_server.drift import DriftConfig, DriftConfigError, DriftEngine
from protocol.errors import ProtocolError
from protocol.messages import Alert, ModelRef, SketchReport
from protocol.sketches import FeatureSketch, SketchBuilder, SketchSet, ks_distance

NUMERIC = ["f0", "f1", "f2"]
CATS = ["red", "green", "blue"]
T0 = 1_699_999_200.0  # on a 3600 s window boundary


def sketch_rows(
    rng: np.random.Generator, n: int, shift: float = 0.0, cat_p=(0.6, 0.3, 0.1)
) -> SketchSet:
    b = SketchBuilder()
    for name in NUMERIC:
        b.update_numeric(name, rng.normal(shift, 1.0, n))
    b.update_categorical("colour", rng.choice(CATS, size=n, p=list(cat_p)).tolist())
    b.rows = n
    return b.build()


def report(
    sketches: SketchSet, device: str = "dev-1", seq: int = 0, ts: float = T0, version: str = "1.0"
) -> SketchReport:
    start = datetime.fromtimestamp(ts, timezone.utc)
    return SketchReport(
        device_id=device,
        model=ModelRef(name="m", version=version, release=1),
        window_start=start,
        window_end=start,
        seq=seq,
        sketches=sketches,
    )


class Recorder:
    def __init__(self) -> None:
        self.alerts: list[Alert] = []
        self.hooked: list[dict[str, Any]] = []


@pytest.fixture()
def engine(tmp_path) -> tuple[DriftEngine, Recorder]:
    rec = Recorder()
    db = sqlite_utils.Database(tmp_path / "fleet.db")
    eng = DriftEngine(db, DriftConfig(), rec.alerts.append, hook=rec.hooked.append)
    eng.register_reference("m", "1.0", sketch_rows(np.random.default_rng(1000), 5000))
    return eng, rec


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_no_drift_when_devices_sample_the_reference_distribution(engine, seed):
    eng, rec = engine
    rng = np.random.default_rng(seed)
    for i in range(3):
        assert eng.ingest(report(sketch_rows(rng, 700), device=f"dev-{i}"))
    result = eng.evaluate("m", "1.0", now=T0 + 10)
    assert result is not None and result.rows == 2100
    assert [f.name for f in result.features if f.drift] == []
    assert not result.dataset_drift and not eng.is_drifting("m", "1.0")
    assert rec.alerts == [] and rec.hooked == []


def test_half_sigma_shift_is_dataset_drift_with_one_alert_and_one_hook_call(engine):
    eng, rec = engine
    rng = np.random.default_rng(7)
    eng.ingest(report(sketch_rows(rng, 1000, shift=0.5), device="a"))
    eng.ingest(report(sketch_rows(rng, 1000, shift=0.5), device="b"))
    result = eng.evaluate("m", "1.0", now=T0 + 10)
    assert result is not None and result.dataset_drift
    assert sorted(result.drifted) == NUMERIC  # the categorical feature did not move
    for f in result.features:
        if f.kind == "numeric":
            assert f.ks_lower > f.ks_critical and f.ks >= 0.1
            assert 0.12 < f.ks < 0.28  # 2Φ(0.25) − 1 ≈ 0.197
            assert f.psi > 0.1
    eng.evaluate("m", "1.0", now=T0 + 20)  # another tick on the same window
    assert len(rec.alerts) == 1 and rec.alerts[0].kind == "drift"
    assert rec.alerts[0].model == "m" and rec.alerts[0].version == "1.0"
    assert sorted(rec.alerts[0].details["features"]) == NUMERIC
    assert len(rec.hooked) == 1 and rec.hooked[0]["dataset_drift"] is True
    assert eng.is_drifting("m", "1.0")


def test_a_new_window_that_drifts_alerts_again(engine):
    eng, rec = engine
    rng = np.random.default_rng(8)
    eng.ingest(report(sketch_rows(rng, 1000, shift=0.5), seq=0, ts=T0))
    eng.evaluate("m", "1.0", now=T0 + 10)
    eng.ingest(report(sketch_rows(rng, 1000, shift=0.5), seq=1, ts=T0 + 3600))
    eng.evaluate("m", "1.0", now=T0 + 3610)
    assert len(rec.alerts) == 2
    assert len(eng.results("m", "1.0")) == 2


def test_categorical_shift_drifts_by_js_and_chi_square(engine):
    eng, _ = engine
    rng = np.random.default_rng(9)
    eng.ingest(report(sketch_rows(rng, 2000, cat_p=(0.2, 0.3, 0.5))))
    result = eng.evaluate("m", "1.0", now=T0 + 10)
    assert result is not None
    colour = next(f for f in result.features if f.name == "colour")
    assert colour.kind == "categorical" and colour.drift
    assert colour.js >= 0.1 and colour.p_value < 0.05
    assert result.drifted == ["colour"] and not result.dataset_drift  # 1 of 4 < 50 %


def test_duplicate_qos1_delivery_counts_once(engine):
    eng, _ = engine
    rep = report(sketch_rows(np.random.default_rng(3), 500), device="dup", seq=4)
    assert eng.ingest(rep) is True
    assert eng.ingest(rep) is False
    assert eng.ingest(rep.model_copy()) is False
    result = eng.evaluate("m", "1.0", now=T0 + 10)
    assert result is not None and result.rows == 500
    assert all(f.n_cur == 500 for f in result.features)
    # the next seq of the same device is new data
    assert eng.ingest(report(sketch_rows(np.random.default_rng(4), 500), device="dup", seq=5))
    assert eng.evaluate("m", "1.0", now=T0 + 10).rows == 1000


def test_merge_across_devices_matches_one_sketch_of_all_rows(engine):
    eng, _ = engine
    rng = np.random.default_rng(11)
    data = [rng.normal(0.3, 1.0, 800) for _ in range(4)]
    for i, x in enumerate(data):
        b = SketchBuilder()
        b.update_numeric("f0", x)
        b.rows = x.size
        eng.ingest(report(b.build(), device=f"d{i}"))
    whole = SketchBuilder()
    whole.update_numeric("f0", np.concatenate(data))
    ref = eng.reference("m", "1.0")
    expected = ks_distance(ref.features["f0"].kll(), whole.build().features["f0"].kll())
    got = next(f for f in eng.evaluate("m", "1.0", now=T0 + 1).features if f.name == "f0")
    assert got.n_cur == 3200
    assert abs(got.ks - expected.statistic) <= got.rank_error + expected.rank_error


def test_malformed_sketch_is_rejected_and_changes_nothing(engine):
    eng, _ = engine
    eng.ingest(report(sketch_rows(np.random.default_rng(5), 300), device="ok"))
    bad = SketchSet(
        rows=10, features={"f0": FeatureSketch(kind="numeric", sketch="bm90IGEgc2tldGNo")}
    )
    with pytest.raises(ProtocolError, match="f0"):
        eng.ingest(report(bad, device="evil"))
    wrong_kind = sketch_rows(np.random.default_rng(6), 10)
    wrong_kind.features["f0"] = wrong_kind.features[
        "colour"
    ]  # a categorical sketch under a numeric name
    with pytest.raises(ProtocolError, match="f0"):
        eng.ingest(report(wrong_kind, device="evil", seq=1))
    result = eng.evaluate("m", "1.0", now=T0 + 1)
    assert result is not None and result.rows == 300
    # the refused reports were not marked as seen: a corrected resend is accepted
    assert eng.ingest(report(sketch_rows(np.random.default_rng(6), 10), device="evil", seq=1))


def test_window_below_min_rows_is_not_evaluated(engine):
    eng, _ = engine
    eng.ingest(report(sketch_rows(np.random.default_rng(5), 150, shift=3.0)))
    assert eng.evaluate("m", "1.0", now=T0 + 1) is None
    assert eng.evaluate("m", "unknown-version", now=T0 + 1) is None


def test_ks_from_sketches_agrees_with_scipy_exact_ks_within_rank_error():
    from scipy.stats import ks_2samp

    rng = np.random.default_rng(21)
    for n, shift in [(3000, 0.0), (20000, 0.1), (20000, 0.5), (50000, 0.05)]:
        a, b = rng.normal(0, 1, n).astype(np.float32), rng.normal(shift, 1, n).astype(np.float32)
        sa, sb = SketchBuilder(), SketchBuilder()
        sa.update_numeric("x", a)
        sb.update_numeric("x", b)
        ks = ks_distance(sa.build().features["x"].kll(), sb.build().features["x"].kll())
        exact = ks_2samp(a, b).statistic
        assert abs(ks.statistic - exact) <= ks.rank_error, (n, shift, ks, exact)


def test_tiny_shift_on_many_rows_stays_below_the_effect_floor(tmp_path):
    eng = DriftEngine(sqlite_utils.Database(tmp_path / "d.db"), DriftConfig(), lambda a: None)
    rng = np.random.default_rng(2)
    eng.register_reference("m", "1.0", sketch_rows(rng, 50000))
    eng.ingest(report(sketch_rows(rng, 50000, shift=0.05)))
    result = eng.evaluate("m", "1.0", now=T0 + 1)
    assert result is not None and result.drifted == []


def test_per_model_override_changes_the_dataset_share(tmp_path):
    cfg = DriftConfig.from_dict({"dataset_share": 0.5, "m": {"dataset_share": 0.25}})
    assert cfg.for_model("m").dataset_share == 0.25 and cfg.for_model("other").dataset_share == 0.5
    eng = DriftEngine(sqlite_utils.Database(tmp_path / "d.db"), cfg, lambda a: None)
    eng.register_reference("m", "1.0", sketch_rows(np.random.default_rng(1), 3000))
    eng.ingest(report(sketch_rows(np.random.default_rng(2), 2000, cat_p=(0.2, 0.3, 0.5))))
    assert eng.evaluate("m", "1.0", now=T0 + 1).dataset_drift  # 1 of 4 features ≥ 25 %


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"ks_alpa": 0.1}, "drift.ks_alpa"),
        ({"m": {"bogus": 1}}, "drift.m.bogus"),
        ({"dataset_share": 2}, None),
    ],
)
def test_bad_drift_config_names_the_field(data, field):
    with pytest.raises(DriftConfigError) as err:
        DriftConfig.from_dict(data)
    if field:
        assert err.value.field == field and field in str(err.value)


def test_history_and_distributions_for_the_dashboard(engine):
    eng, _ = engine
    rng = np.random.default_rng(12)
    eng.ingest(report(sketch_rows(rng, 600, shift=0.5), seq=0))
    eng.evaluate("m", "1.0", now=T0 + 1)
    eng.evaluate("m", "1.0", now=T0 + 2)  # nothing new: no second history row
    eng.ingest(report(sketch_rows(rng, 600, shift=0.5), seq=1))
    eng.evaluate("m", "1.0", now=T0 + 3)
    history = eng.results("m", "1.0")
    assert [h["rows"] for h in history] == [1200, 600]  # newest first
    assert {f["name"] for f in history[0]["features"]} == {*NUMERIC, "colour"}
    dist = eng.feature_distributions("m", "1.0")
    f0 = dist["f0"]
    assert f0["kind"] == "numeric" and len(f0["edges"]) == len(f0["reference"]) + 1
    assert sum(f0["reference"]) == pytest.approx(1.0) and sum(f0["current"]) == pytest.approx(1.0)
    # the current distribution sits to the right of the reference
    centres = np.diff(f0["edges"]) / 2 + np.array(f0["edges"][:-1])
    assert np.dot(centres, f0["current"]) - np.dot(centres, f0["reference"]) == pytest.approx(
        0.5, abs=0.15
    )
    colour = dist["colour"]
    assert set(colour["items"]) == set(CATS) and sum(colour["reference"]) == pytest.approx(1.0)
    assert f0["stats"]["ks"] > 0.1


def test_merged_windows_and_seen_reports_survive_a_restart_after_flush(tmp_path):
    path = tmp_path / "fleet.db"
    eng = DriftEngine(sqlite_utils.Database(path), DriftConfig(), lambda a: None)
    eng.register_reference("m", "1.0", sketch_rows(np.random.default_rng(1), 1000))
    eng.ingest(report(sketch_rows(np.random.default_rng(2), 500, shift=0.5)))
    eng.flush()  # the service flushes on stop; evaluate() and the 1 s interval flush too
    again = DriftEngine(sqlite_utils.Database(path), DriftConfig(), lambda a: None)
    assert again.ingest(report(sketch_rows(np.random.default_rng(2), 500, shift=0.5))) is False
    assert again.evaluate("m", "1.0", now=T0 + 1).dataset_drift


def test_ingest_writes_through_once_max_pending_reports_are_held(tmp_path):
    path = tmp_path / "fleet.db"
    eng = DriftEngine(
        sqlite_utils.Database(path),
        DriftConfig(),
        lambda a: None,
        max_pending=2,
        flush_interval_s=3600,
    )
    for seq in range(3):
        eng.ingest(report(sketch_rows(np.random.default_rng(seq), 100), seq=seq))
    db = sqlite_utils.Database(path)
    assert (
        db["drift_reports"].count == 2 and db["drift_windows"].get(("m", "1.0", T0))["rows"] == 200
    )
    eng.flush()
    assert (
        db["drift_reports"].count == 3 and db["drift_windows"].get(("m", "1.0", T0))["rows"] == 300
    )


def test_fleet_service_merges_device_sketches_publishes_one_alert_and_fires_the_hook(
    tmp_path, signing_key
):
    """Through the real seams: bridge → engine → alerts topic, and the configured command hook."""
    import json
    import sys
    import time

    from fleet_server.service import FleetService
    from protocol.messages import decode
    from protocol.topics import Topics
    from protocol.transport import MemoryBroker
    from tests.fleet_server.fleetkit import DeviceKey, make_config
    from tests.support.bundles import make_bundle, trained

    out = tmp_path / "hook.json"
    script = f"import sys; open({str(out)!r}, 'w').write(sys.stdin.read())"
    cfg = make_config(tmp_path, signing_key)
    cfg = cfg.model_copy(
        update={
            "hooks": cfg.hooks.model_copy(
                update={"drift_command": f'{sys.executable} -c "{script}"'}
            )
        }
    )
    broker = MemoryBroker()
    service = FleetService(cfg, transport=broker.client("server"))
    service.bridge.start()
    service.transport.connect()
    alerts: list[Alert] = []
    watcher = broker.client("watcher")
    watcher.set_handler(lambda topic, payload: alerts.append(decode(Alert, payload)))
    watcher.connect()
    watcher.subscribe(Topics().alerts())
    try:
        service.upload_bundle(
            make_bundle(signing_key, version="1.0.0")[0]
        )  # registers the reference
        tm = trained("iris-logreg")
        now = datetime.now(timezone.utc)
        ref = ModelRef(name="iris", version="1.0.0", release=1)
        for i in range(2):
            b = SketchBuilder(tm.input_schema)
            b.update_rows(tm.X + np.array([0.0, 0.0, 1.5, 0.8]))  # petal features move
            rep = SketchReport(
                device_id=f"d{i}",
                model=ref,
                window_start=now,
                window_end=now,
                seq=1,
                sketches=b.build(),
            )
            dev = DeviceKey(f"d{i}")
            broker.route(Topics().state(f"d{i}"), dev.birth(), True)
            topic = Topics().sketch(f"d{i}")
            broker.route(topic, dev.sign(topic, rep.to_json()), False)
            broker.route(topic, dev.sign(topic, rep.to_json()), False)  # re-sent after a lost ack
        assert service.sketches_merged == 2
        result = service.evaluate_drift("iris", "1.0.0")
        service.evaluate_drift("iris", "1.0.0")
        assert result is not None and result["rows"] == 300 and result["dataset_drift"]
        assert sorted(f["name"] for f in result["features"] if f["drift"]) == [
            "petal_length",
            "petal_width",
        ]
        assert [a.kind for a in alerts] == ["drift"] and alerts[0].version == "1.0.0"
        deadline = time.monotonic() + 10
        while not (out.exists() and out.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert json.loads(out.read_text())["model"] == "iris"
        assert service.drift_results("iris", "1.0.0")[0]["dataset_drift"] is True
    finally:
        service.repo.close()
