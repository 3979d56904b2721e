"""The pure rollout state machine: no broker, no clock, no database."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleet_server.errors import Conflict, InvalidInput
from fleet_server.rollout_engine import (
    Rollout,
    RolloutSpec,
    Selector,
    Telemetry,
    assign_stages,
)

DEVICES = [f"dev-{i:03d}" for i in range(20)]


def spec(**kw: object) -> RolloutSpec:
    base: dict[str, object] = {
        "bundle_sha256": "ab" * 32,
        "stages": (10, 50, 100),
        "success_threshold": 1.0,
    }
    base.update(kw)
    return RolloutSpec(**base)  # type: ignore[arg-type]


def sends(decisions: list, kind: str = "send_deploy") -> list[str]:
    return [d.device_id for d in decisions if d.kind == kind]


def install(r: Rollout, devices: list[str], now: float) -> list:
    out = []
    for d in devices:
        out += r.on_status(d, "downloading", now)
        out += r.on_status(d, "installed", now)
    return out


def started(r: Rollout, now: float = 0.0, online: list[str] | None = None) -> tuple[Rollout, list]:
    return r, r.start(now, DEVICES if online is None else online)


# assignment -----------------------------------------------------------------------------
def test_assignment_is_deterministic_and_independent_of_input_order() -> None:
    s = spec(stages=(5, 25, 50, 100))
    a = assign_stages("r-1", DEVICES, s)
    b = assign_stages("r-1", list(reversed(DEVICES)), s)
    assert a == b
    assert assign_stages("r-2", DEVICES, s) != a  # another rollout picks other canaries


def test_percentage_stages_are_cumulative_and_cover_every_device() -> None:
    devices = [f"d{i}" for i in range(100)]
    groups = assign_stages("r", devices, spec(stages=(5, 25, 50, 100)))
    assert [len(g) for g in groups] == [5, 20, 25, 50]
    assert sorted(d for g in groups for d in g) == sorted(devices)


def test_count_stages_cut_at_cumulative_counts_and_leave_the_rest_out() -> None:
    groups = assign_stages("r", DEVICES, spec(stages=(1, 3, 8), stage_unit="count"))
    assert [len(g) for g in groups] == [1, 2, 5]


def test_plan_refuses_a_selector_that_matches_nothing() -> None:
    with pytest.raises(InvalidInput) as exc:
        Rollout.plan("r", spec(), [], 0)
    assert exc.value.field == "selector"


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"stages": ()}, "stages"),
        ({"stages": (50, 20, 100)}, "stages"),
        ({"stages": (10, 50)}, "stages"),
        ({"failure_threshold": 1.5}, "failure_threshold"),
        ({"min_devices": 0}, "min_devices"),
        ({"max_retries": -1}, "max_retries"),
    ],
)
def test_invalid_specs_name_the_field(kw: dict, field: str) -> None:
    with pytest.raises(InvalidInput) as exc:
        spec(**kw).validate()
    assert exc.value.field == field


def test_selector_parses_terms_and_matches_all_of_them() -> None:
    sel = Selector.parse("profile=raspberry-pi-4, tag=lab,tag=eu")
    assert sel.matches("a", "raspberry-pi-4", ["lab", "eu", "x"])
    assert not sel.matches("a", "raspberry-pi-4", ["lab"])
    assert not sel.matches("a", "host", ["lab", "eu"])
    assert Selector.parse("id=a,id=b").matches("b", "host", [])


@pytest.mark.parametrize("text", ["profile", "color=red", "tag="])
def test_selector_refuses_malformed_terms(text: str) -> None:
    with pytest.raises(InvalidInput) as exc:
        Selector.parse(text)
    assert exc.value.field == "selector"


# sending and advancing -------------------------------------------------------------------
def test_start_sends_the_deploy_to_the_first_stage_only() -> None:
    r, out = started(Rollout.plan("r", spec(), DEVICES, 0))
    assert r.state == "running"
    assert sorted(sends(out)) == sorted(r.stages[0].devices)
    assert len(r.stages[0].devices) == 2


def test_offline_device_gets_its_pending_deploy_when_it_comes_online() -> None:
    r = Rollout.plan("r", spec(), DEVICES, 0)
    late = r.stages[0].devices[0]
    out = r.start(0, [d for d in DEVICES if d != late])
    assert late not in sends(out)
    assert sends(r.tick(5, [d for d in DEVICES if d != late])) == []
    assert sends(r.tick(10, DEVICES)) == [late]


def test_stage_passes_when_success_share_reached_and_next_stage_starts() -> None:
    r, _ = started(Rollout.plan("r", spec(), DEVICES, 0))
    install(r, r.stages[0].devices, 1)
    out = r.tick(2, DEVICES)
    assert r.stages[0].state == "passed"
    assert r.stages[1].state == "running"
    assert sorted(sends(out)) == sorted(r.stages[1].devices)
    assert any(d.kind == "stage" and d.state == "passed" and "installed" in d.reason for d in out)


def test_soak_holds_the_next_stage_until_it_has_passed() -> None:
    r, _ = started(Rollout.plan("r", spec(soak_s=60), DEVICES, 0))
    install(r, r.stages[0].devices, 1)
    out = r.tick(2, DEVICES)
    assert any(d.kind == "gate" and d.state == "soak" for d in out)
    assert sends(r.tick(61, DEVICES)) == []
    assert r.stages[1].state == "pending"
    assert sends(r.tick(62, DEVICES))
    assert r.stages[1].state == "running"


def test_rollout_succeeds_when_every_stage_passed() -> None:
    r, _ = started(Rollout.plan("r", spec(), DEVICES, 0))
    now = 1.0
    for stage in r.stages:
        install(r, stage.devices, now)
        r.tick(now, DEVICES)
        now += 1
    assert r.state == "succeeded"
    assert r.counts() == {"installed": len(DEVICES)}
    assert "every stage passed" in r.reason


def test_success_threshold_below_one_lets_a_stage_pass_with_a_straggler() -> None:
    r, _ = started(Rollout.plan("r", spec(stages=(50, 100), success_threshold=0.8), DEVICES, 0))
    install(r, r.stages[0].devices[:8], 1)
    r.tick(2, DEVICES)
    assert r.stages[0].state == "passed"


# halting ---------------------------------------------------------------------------------
def test_halt_waits_for_min_devices_to_report() -> None:
    r, _ = started(
        Rollout.plan("r", spec(stages=(50, 100), min_devices=3, max_retries=0), DEVICES, 0)
    )
    a, b, c = r.stages[0].devices[:3]
    r.on_status(a, "failed", 1, reason="smoke_test_failed")
    r.on_status(b, "failed", 1)
    r.tick(2, DEVICES)
    assert r.state == "running"  # 2 of 2 failed, but only 2 reported
    r.on_status(c, "installed", 3)
    out = r.tick(4, DEVICES)
    assert r.state == "halted"
    assert "min" not in r.reason and "3 reported" in r.reason
    assert sends(out, "send_rollback") == [c]  # the one that installed goes back
    assert r.stages[0].state == "failed"


def test_halt_stops_every_further_deploy() -> None:
    r, _ = started(Rollout.plan("r", spec(stages=(50, 100), max_retries=0), DEVICES, 0))
    first = r.stages[0].devices[0]
    r.on_status(first, "rejected", 1, reason="signature_invalid")
    r.tick(2, DEVICES)
    assert r.state == "halted"
    assert sends(r.tick(3, DEVICES)) == []
    assert sends(r.tick(1000, DEVICES)) == []


def test_no_rollback_commands_when_rollback_on_halt_is_off() -> None:
    r, _ = started(
        Rollout.plan("r", spec(stages=(50, 100), rollback_on_halt=False, max_retries=0), DEVICES, 0)
    )
    devs = r.stages[0].devices
    install(r, devs[:5], 1)
    for d in devs[5:]:
        r.on_status(d, "failed", 1)
    out = r.tick(2, DEVICES)
    assert r.state == "halted"
    assert sends(out, "send_rollback") == []


def test_device_installing_after_halt_is_rolled_back() -> None:
    r, _ = started(Rollout.plan("r", spec(stages=(50, 100), max_retries=0), DEVICES, 0))
    a, b = r.stages[0].devices[:2]
    r.on_status(a, "failed", 1)
    r.tick(2, DEVICES)
    assert r.state == "halted"
    out = r.on_status(b, "installed", 3)
    assert sends(out, "send_rollback") == [b]
    r.on_status(b, "done", 4, kind="rollback")
    assert r.devices[b].state == "rolled_back"


@pytest.mark.parametrize(
    ("telemetry", "words"),
    [
        (Telemetry(p95_ms=30.0, latency_budget_ms=10.0), "p95 latency"),
        (Telemetry(error_rate=0.5), "error rate"),
        (Telemetry(drift=True), "drifted"),
    ],
)
def test_telemetry_gates_halt_the_rollout(telemetry: Telemetry, words: str) -> None:
    r, _ = started(Rollout.plan("r", spec(max_error_rate=0.1, halt_on_drift=True), DEVICES, 0))
    install(r, r.stages[0].devices, 1)
    r.tick(2, DEVICES, telemetry)
    assert r.state == "halted"
    assert words in r.reason


def test_healthy_telemetry_lets_the_stage_pass() -> None:
    r, _ = started(Rollout.plan("r", spec(max_error_rate=0.1, halt_on_drift=True), DEVICES, 0))
    install(r, r.stages[0].devices, 1)
    r.tick(2, DEVICES, Telemetry(p95_ms=3.0, latency_budget_ms=10.0, error_rate=0.0, drift=False))
    assert r.stages[0].state == "passed"


# timeouts and retries ----------------------------------------------------------------------
def test_stuck_device_times_out_is_retried_then_counts_as_failed() -> None:
    r, _ = started(
        Rollout.plan(
            "r",
            spec(stages=(50, 100), device_timeout_s=30, max_retries=1, failure_threshold=0.5),
            DEVICES,
            0,
        )
    )
    d, *others = r.stages[0].devices
    install(r, others, 1)
    r.on_status(d, "downloading", 1)
    out = r.tick(31, DEVICES)
    assert any(x.kind == "device" and x.state == "timed_out" for x in out)
    assert sends(out) == [d]  # retry 1
    assert r.devices[d].attempts == 2
    r.tick(62, DEVICES)
    assert r.devices[d].state == "timed_out"
    assert r.devices[d].attempts == 2


def test_rejected_device_is_not_retried() -> None:
    r, _ = started(
        Rollout.plan("r", spec(stages=(50, 100), max_retries=3, failure_threshold=1.0), DEVICES, 0)
    )
    d = r.stages[0].devices[0]
    out = r.on_status(d, "rejected", 1, reason="profile_incompatible")
    assert r.devices[d].state == "rejected"
    assert r.devices[d].reason == "profile_incompatible"
    assert sends(out + r.tick(2, DEVICES)) == []


def test_failed_device_is_retried_until_retries_run_out() -> None:
    r, _ = started(
        Rollout.plan("r", spec(stages=(50, 100), max_retries=2, failure_threshold=1.0), DEVICES, 0)
    )
    d = r.stages[0].devices[0]
    attempts = []
    for t in range(1, 5):
        r.on_status(d, "failed", t)
        if sends(r.tick(t + 0.5, DEVICES)):
            attempts.append(r.devices[d].attempts)
    assert attempts == [2, 3]
    assert r.devices[d].state == "failed"


def test_stale_and_duplicate_reports_do_not_change_terminal_states() -> None:
    r, _ = started(Rollout.plan("r", spec(), DEVICES, 0))
    d = r.stages[0].devices[0]
    install(r, [d], 1)
    assert r.on_status(d, "downloading", 2) == []
    assert r.on_status(d, "installed", 2) == []
    assert r.on_status("not-in-rollout", "installed", 2) == []
    unsent = r.stages[2].devices[0]
    assert r.on_status(unsent, "installed", 2) == []


# operator actions ------------------------------------------------------------------------
def test_paused_rollout_sends_nothing_until_resumed() -> None:
    r = Rollout.plan("r", spec(), DEVICES, 0)
    late = r.stages[0].devices[0]
    r.start(0, [d for d in DEVICES if d != late])
    r.pause(1)
    assert sends(r.tick(2, DEVICES)) == []
    assert sends(r.resume(3, DEVICES)) == [late]


def test_abort_stops_sending_and_undoes_nothing() -> None:
    r, _ = started(Rollout.plan("r", spec(), DEVICES, 0))
    install(r, r.stages[0].devices, 1)
    out = r.abort(2)
    assert r.state == "aborted"
    assert sends(out, "send_rollback") == []
    assert sends(r.tick(3, DEVICES)) == []


def test_operator_rollback_sends_signed_rollbacks_to_installed_devices() -> None:
    r, _ = started(Rollout.plan("r", spec(), DEVICES, 0))
    install(r, r.stages[0].devices, 1)
    r.tick(2, DEVICES)
    out = r.rollback(3)
    assert r.state == "rolled_back"
    assert sorted(sends(out, "send_rollback")) == sorted(r.stages[0].devices)
    for d in r.stages[0].devices:
        r.on_status(d, "rolled_back", 4, kind="rollback")
    assert r.counts()["rolled_back"] == len(r.stages[0].devices)


@pytest.mark.parametrize(
    ("setup", "action"),
    [
        ("created", "pause"),
        ("created", "resume"),
        ("running", "start"),
        ("aborted", "rollback"),
        ("aborted", "abort"),
    ],
)
def test_actions_the_state_does_not_allow_raise_conflict(setup: str, action: str) -> None:
    r = Rollout.plan("r", spec(), DEVICES, 0)
    if setup in ("running", "aborted"):
        r.start(0, DEVICES)
    if setup == "aborted":
        r.abort(1)
    with pytest.raises(Conflict):
        getattr(r, action)(2)


def test_rollout_round_trips_through_its_dict() -> None:
    r, _ = started(
        Rollout.plan("r", spec(soak_s=5, selector=Selector(("host",), ("lab",))), DEVICES, 0)
    )
    install(r, r.stages[0].devices[:1], 1)
    again = Rollout.from_dict(r.to_dict())
    assert again.to_dict() == r.to_dict()
    assert again.spec == r.spec


# properties --------------------------------------------------------------------------------
REPORTS = [
    "accepted",
    "downloading",
    "verifying",
    "installed",
    "failed",
    "rejected",
    "timed_out",
    "bogus",
]

event = st.one_of(
    st.tuples(st.just("status"), st.integers(0, len(DEVICES) - 1), st.sampled_from(REPORTS)),
    st.tuples(st.just("tick"), st.floats(0, 120), st.sets(st.integers(0, len(DEVICES) - 1))),
    st.tuples(st.just("op"), st.sampled_from(["pause", "resume", "abort", "rollback"]), st.just(0)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    events=st.lists(event, max_size=60),
    soak=st.sampled_from([0.0, 30.0]),
    min_devices=st.integers(1, 4),
    retries=st.integers(0, 2),
    rollback_on_halt=st.booleans(),
)
def test_no_device_outside_a_running_or_passed_stage_is_ever_sent_the_deploy(
    events: list, soak: float, min_devices: int, retries: int, rollback_on_halt: bool
) -> None:
    r = Rollout.plan(
        "r-prop",
        spec(
            stages=(10, 40, 100),
            soak_s=soak,
            min_devices=min_devices,
            max_retries=retries,
            rollback_on_halt=rollback_on_halt,
            device_timeout_s=60,
        ),
        DEVICES,
        0,
    )
    now = 0.0
    stopped = False
    ever_installed: set[str] = set()

    def check(decisions: list, state_before: str) -> None:
        for d in decisions:
            assert d.reason  # every decision carries a reason for the audit log
            if d.kind == "send_deploy":
                stage = r.stages[r.devices[d.device_id].stage]
                assert stage.state in ("running", "passed")
                assert r.state in ("running", "succeeded")
                assert not stopped
                assert r.devices[d.device_id].attempts <= retries + 1
            if d.kind == "send_rollback":
                assert d.device_id in ever_installed
        assert r.state != "created"

    check(r.start(now, DEVICES), "created")
    for ev in events:
        before = r.state
        if ev[0] == "status":
            out = r.on_status(DEVICES[ev[1]], ev[2], now)
        elif ev[0] == "tick":
            now += ev[1]
            out = r.tick(now, [DEVICES[i] for i in ev[2]])
        else:
            try:
                out = getattr(r, ev[1])(now)
            except Conflict:
                out = []
        ever_installed |= {d for d, p in r.devices.items() if p.state == "installed"}
        check(out, before)
        if r.state in ("halted", "aborted", "rolled_back"):
            stopped = True
        # a device counts at most once per attempt and never leaves its stage
        for p in r.devices.values():
            assert r.devices[p.device_id].stage == p.stage
        if r.state == "halted":
            assert any(s.state == "failed" for s in r.stages) or all(
                s.state == "passed" for s in r.stages[:1]
            )
    # stages advance strictly in order
    states = [s.state for s in r.stages]
    seen_pending = False
    for s in states:
        if s == "pending":
            seen_pending = True
        else:
            assert not seen_pending, states


def test_devices_already_on_the_version_count_as_installed_and_get_nothing() -> None:
    r = Rollout.plan("r", spec(stages=(100,)), DEVICES, 0, already=DEVICES[:5])
    out = r.start(0, DEVICES)
    assert sorted(sends(out)) == sorted(DEVICES[5:])
    assert r.devices[DEVICES[0]].state == "installed"
    assert r.devices[DEVICES[0]].reason == "already runs this version"


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(1, 300),
    cuts=st.lists(st.integers(1, 99), max_size=4, unique=True),
    rid=st.text("abcdef0123456789", min_size=1, max_size=10),
)
def test_percentage_assignment_covers_every_device_once_and_canaries_come_first(
    n: int, cuts: list[int], rid: str
) -> None:
    devices = [f"d{i}" for i in range(n)]
    stages = (*sorted(cuts), 100)
    groups = assign_stages(rid, devices, spec(stages=stages))
    flat = [d for g in groups for d in g]
    assert sorted(flat) == sorted(devices)  # everyone, exactly once
    cum = 0
    for target, g in zip(stages, groups, strict=True):
        cum += len(g)
        assert cum == min(n, -(-n * target // 100))  # cumulative share, rounded up
    assert assign_stages(rid, reversed(devices), spec(stages=stages)) == groups


# stage-level telemetry: one device cannot move a gate ---------------------------------------
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    normal=st.lists(st.floats(min_value=0.1, max_value=9.9), min_size=2, max_size=30),
    outlier_p95=st.floats(min_value=10.0, max_value=1e9),
    outlier_errors=st.floats(min_value=0.11, max_value=1.0),
)
def test_one_outlier_device_cannot_halt_a_stage(
    normal: list[float], outlier_p95: float, outlier_errors: float
) -> None:
    """Every honest device is under the budget (10 ms, 10 % errors); one reports anything."""
    r, _ = started(Rollout.plan("r", spec(max_p95_ms=10.0, max_error_rate=0.1), DEVICES, 0))
    install(r, r.stages[0].devices, 1)
    t = Telemetry(
        device_p95_ms=(*normal, outlier_p95),
        device_error_rate=(*[n / 100 for n in normal], outlier_errors),
    )
    r.tick(2, DEVICES, t)
    assert r.state == "running", r.reason
    assert r.stages[0].state == "passed"


def test_most_devices_over_the_budget_still_halt_the_stage() -> None:
    r, _ = started(Rollout.plan("r", spec(max_p95_ms=10.0), DEVICES, 0))
    install(r, r.stages[0].devices, 1)
    r.tick(2, DEVICES, Telemetry(device_p95_ms=(40.0, 50.0, 3.0)))
    assert r.state == "halted" and "p95 latency 40.00 ms" in r.reason


def test_telemetry_gate_waits_for_min_devices_reports() -> None:
    r, _ = started(Rollout.plan("r", spec(max_p95_ms=10.0, min_devices=3), DEVICES, 0))
    install(r, r.stages[0].devices, 1)
    r.tick(2, DEVICES, Telemetry(device_p95_ms=(40.0, 50.0)))  # only two reported
    assert r.state == "running"
