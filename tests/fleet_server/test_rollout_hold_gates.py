"""Rule 7 of the rollout engine: hold gates (profile budget, own drift, field accuracy)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from fleet_server.rollout_engine import Rollout, RolloutSpec, Telemetry

DEVICES = [f"dev-{i:02d}" for i in range(10)]


def _rollout(**kw: object) -> Rollout:
    spec = RolloutSpec(bundle_sha256="ab" * 32, stages=(20, 100), success_threshold=1.0, **kw)  # type: ignore[arg-type]
    r = Rollout.plan("r-hold", spec, DEVICES, 0.0)
    r.start(0.0, DEVICES)
    return r


def _install_stage(r: Rollout, now: float) -> None:
    for d in r.stages[0].devices:
        r.on_status(d, "downloading", now)
        r.on_status(d, "installed", now)


SLOW = Telemetry(profile_p95=(("raspberry-pi-4", 14.0, 10.0, 2),))
FAST = Telemetry(profile_p95=(("raspberry-pi-4", 6.0, 10.0, 2),))


def test_stage_holds_while_a_profile_reports_p95_over_its_budget_and_passes_when_back() -> None:
    r = _rollout(hold_on_profile_budget=True)
    _install_stage(r, 1.0)
    out = r.tick(2.0, DEVICES, SLOW)
    holds = [d for d in out if d.kind == "gate" and d.state == "hold"]
    assert holds and "raspberry-pi-4: p95 14.00 ms over its budget of 10 ms" in holds[0].reason
    assert r.stages[0].state == "running" and r.state == "running"
    assert not [d for d in r.tick(3.0, DEVICES, SLOW) if d.kind == "gate"]  # recorded once
    out = r.tick(4.0, DEVICES, FAST)
    assert any(d.state == "hold_cleared" for d in out)
    assert r.stages[0].state == "passed"


def test_profile_budget_does_not_hold_unless_asked() -> None:
    r = _rollout()
    _install_stage(r, 1.0)
    r.tick(2.0, DEVICES, SLOW)
    assert r.stages[0].state == "passed"


def test_stage_holds_when_its_own_devices_drift_naming_them() -> None:
    r = _rollout(hold_on_own_drift=True)
    _install_stage(r, 1.0)
    out = r.tick(2.0, DEVICES, Telemetry(own_drift=True, own_drifted_devices=("dev-03",)))
    assert any("dev-03" in d.reason for d in out if d.state == "hold")
    assert r.stages[0].state == "running"


def test_stage_holds_when_new_accuracy_is_below_old_by_more_than_margin_with_enough_labels() -> (
    None
):
    r = _rollout(accuracy_margin=0.05, min_labels=50)
    _install_stage(r, 1.0)
    worse = Telemetry(
        accuracy_new=0.70, labels_new=60, accuracy_old=0.95, labels_old=80, old_version="1.0.0"
    )
    out = r.tick(2.0, DEVICES, worse)
    assert any("below 1.0.0's 95.0%" in d.reason for d in out if d.state == "hold")
    few = Telemetry(accuracy_new=0.70, labels_new=10, accuracy_old=0.95, labels_old=80)
    r2 = _rollout(accuracy_margin=0.05, min_labels=50)
    _install_stage(r2, 1.0)
    r2.tick(2.0, DEVICES, few)
    assert r2.stages[0].state == "passed"  # too few labels to decide


def test_regressor_holds_when_mae_rises_by_more_than_margin() -> None:
    r = _rollout(accuracy_margin=0.5, min_labels=5)
    _install_stage(r, 1.0)
    t = Telemetry(
        accuracy_metric="mae", accuracy_new=3.0, labels_new=9, accuracy_old=1.0, labels_old=9
    )
    r.tick(2.0, DEVICES, t)
    assert r.stages[0].state == "running" and "MAE" in r.stages[0].held


def test_held_rollout_survives_a_round_trip_through_its_document() -> None:
    r = _rollout(hold_on_own_drift=True)
    _install_stage(r, 1.0)
    r.tick(2.0, DEVICES, Telemetry(own_drift=True))
    again = Rollout.from_dict(r.to_dict())
    assert again.stages[0].held == r.stages[0].held != ""
    assert again.spec.hold_on_own_drift


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(0.5, 30.0), st.booleans(), st.floats(0.0, 1.0), st.floats(0.0, 1.0)),
        min_size=1,
        max_size=12,
    )
)
def test_a_stage_never_passes_while_a_hold_gate_objects_and_never_halts_for_one(
    steps: list[tuple[float, bool, float, float]],
) -> None:
    r = _rollout(
        hold_on_profile_budget=True, hold_on_own_drift=True, accuracy_margin=0.1, min_labels=1
    )
    _install_stage(r, 0.5)
    now = 1.0
    for p95, drift, acc_new, acc_old in steps:
        t = Telemetry(
            profile_p95=(("pi", p95, 10.0, 2),),
            own_drift=drift,
            accuracy_new=acc_new,
            labels_new=5,
            accuracy_old=acc_old,
            labels_old=5,
        )
        before = r.stages[0].state
        r.tick(now, DEVICES, t)
        objects = p95 > 10.0 or drift or acc_old - acc_new > 0.1
        if before == "running" and objects:
            assert r.stages[0].state == "running"
            assert r.stages[0].held
        if before == "running" and not objects:
            assert r.stages[0].state == "passed"
        assert r.state != "halted"
        now += 1.0
