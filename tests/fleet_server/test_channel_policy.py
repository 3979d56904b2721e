"""The release-channel rules and channel rollouts on the pure engine: no broker, no clock
(``now`` is injected), no database."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fleet_server.channels import (
    ChannelPolicy,
    DeviceView,
    PromotionFacts,
    Target,
    check_promotion,
    default_policy,
    failed,
    plan_catch_up,
    previous_bundle,
    resolve,
    rollout_moving,
    rollout_stalled,
)
from fleet_server.errors import InvalidInput
from fleet_server.rollout_engine import Rollout

TARGET = Target("digits", "stable", "c" * 64, "1.5.0", 5)

views = st.builds(
    DeviceView,
    device_id=st.sampled_from([f"d{i}" for i in range(12)]),
    online=st.booleans(),
    model=st.sampled_from([None, "digits", "iris"]),
    version=st.sampled_from([None, "1.4.0", "1.5.0", "1.6.0"]),
    release=st.sampled_from([None, 4, 5, 6]),
    busy=st.booleans(),
    failed_current=st.booleans(),
)


def _lagging(v: DeviceView) -> bool:
    if v.model is None or v.model != TARGET.model:
        return True
    if v.version == TARGET.version:
        return False
    return not (v.release is not None and v.release > TARGET.release)


@settings(max_examples=300, deadline=None)
@given(st.lists(views, unique_by=lambda v: v.device_id, max_size=12), st.booleans())
def test_catch_up_sends_exactly_the_idle_online_lagging_devices(
    devices: list[DeviceView], channel_busy: bool
) -> None:
    plan = plan_catch_up(TARGET, devices, "r-1" if channel_busy else "")
    eligible = {
        v.device_id
        for v in devices
        if v.online and not v.busy and not v.failed_current and _lagging(v)
    }
    assert set(plan.send) == (set() if channel_busy else eligible)
    assert plan.send == sorted(plan.send)
    assert bool(plan.waiting) == (channel_busy and bool(eligible))
    for v in devices:  # every device left behind is explained; none runs ahead and is sent
        if _lagging(v) or v.device_id in plan.ahead:
            assert v.device_id in plan.reasons
    assert not set(plan.ahead) & set(plan.send)
    assert all(
        v.release is not None and v.release > TARGET.release
        for v in devices
        if v.device_id in plan.ahead
    )


facts = st.builds(
    PromotionFacts,
    sha256=st.just("a" * 64),
    release=st.integers(1, 9),
    channel_known=st.booleans(),
    current_sha256=st.sampled_from([None, "a" * 64, "b" * 64]),
    current_release=st.sampled_from([None, 1, 5, 9]),
    archived=st.booleans(),
    required_succeeded_at=st.sampled_from([None, 0.0, 50.0, 100.0]),
    required_holds=st.booleans(),
    drifting=st.sampled_from([None, True, False]),
    accuracy=st.sampled_from([None, 0.8, 0.9]),
    current_accuracy=st.sampled_from([None, 0.85]),
)


@settings(max_examples=400, deadline=None)
@given(facts, st.floats(0, 200), st.floats(0, 100), st.booleans())
def test_a_promotion_is_allowed_exactly_when_every_condition_holds(
    f: PromotionFacts, now: float, hold: float, force: bool
) -> None:
    policy = ChannelPolicy(requires="beta", hold_s=hold, no_drift=True, accuracy_tolerance=0.0)
    got = {c.name: c.ok for c in check_promotion(policy, f, now, force=force)}
    at = f.required_succeeded_at
    expect = {
        "known_channel": f.channel_known,
        "not_current": f.current_sha256 != f.sha256,
        "newer_release": f.current_release is None
        or f.release > f.current_release
        or f.current_sha256 == f.sha256,
        "not_archived": not f.archived or force,
        "requires": at is not None and f.required_holds and now - at >= hold,
        "no_drift": f.drifting is not True,
        "accuracy": f.accuracy is None
        or f.current_accuracy is None
        or f.accuracy >= f.current_accuracy,
    }
    assert got == expect
    refused = failed(check_promotion(policy, f, now, force=force))
    assert {c.name for c in refused} == {k for k, ok in expect.items() if not ok}
    assert all(c.detail for c in refused)  # a refusal says why


def test_a_channel_without_conditions_checks_only_the_basics() -> None:
    names = [c.name for c in check_promotion(ChannelPolicy(), PromotionFacts("a" * 64, 1), 0.0)]
    assert names == ["known_channel", "not_current", "newer_release", "not_archived"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["promote", "demote", "revert"]), max_size=25))
def test_demotion_walks_back_through_the_promotions_like_a_stack(ops: list[str]) -> None:
    stack: list[str] = []
    history: list[dict[str, Any]] = []  # newest first, as the registry returns it
    n = 0
    for op in ops:
        if op == "promote":
            n += 1
            sha = f"{n:064x}"
            stack.append(sha)
            history.insert(0, {"action": "promote", "sha256": sha})
        elif len(stack) >= 2:
            stack.pop()
            history.insert(0, {"action": op, "sha256": stack[-1]})
        history.insert(0, {"action": "deliver", "sha256": "f" * 64})  # ignored rows
    current = stack[-1] if stack else None
    assert previous_bundle(history, current) == (stack[-2] if len(stack) >= 2 else None)


def test_a_device_follows_the_named_model_or_the_one_it_runs() -> None:
    assert resolve("digits/stable", "iris", []) == ("digits", "stable")
    assert resolve("stable", "iris", ["digits"]) == ("iris", "stable")
    assert resolve("stable", None, ["digits"]) == ("digits", "stable")
    assert resolve("stable", None, ["digits", "iris"]) is None  # ambiguous: name the model
    assert resolve(None, "iris", ["iris"]) is None
    assert resolve("/stable", None, []) is None


@pytest.mark.parametrize(
    ("policy", "field"),
    [
        ({"stages": [50, 40]}, "stages"),
        ({"hold_s": -1}, "hold_s"),
        ({"requires": "Beta!"}, "channel"),
        ({"accuracy_tolerance": 2}, "accuracy"),
        ({"colour": "red"}, "colour"),
        ({"hold_s": float("nan")}, "hold_s"),
        ({"stages": [float("inf")], "stage_unit": "count"}, "stages"),
        ({"soak_s": float("-inf")}, "soak_s"),
        ({"stage_unit": "parsecs"}, "stage_unit"),
        ({"stages": "abc"}, "stages"),
        ({"stages": 5}, "stages"),
    ],
)
def test_a_bad_policy_is_refused_naming_the_field(policy: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidInput) as exc:
        ChannelPolicy.from_dict(policy)
    assert exc.value.field == field


def test_policies_round_trip_and_stable_requires_beta_by_default() -> None:
    p = default_policy("stable")
    assert ChannelPolicy.from_dict(p.to_dict()) == p
    assert p.requires == "beta" and p.hold_s > 0 and p.no_drift
    assert default_policy("beta").requires is None


# channel rollouts and late joiners on the engine --------------------------------------------
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    joins=st.lists(st.integers(0, 8), min_size=1, max_size=10),
    bad=st.sets(st.integers(0, 9), max_size=3),
    stages=st.sampled_from([(100.0,), (50.0, 100.0), (10.0, 50.0, 100.0)]),
    starts_old=st.sets(st.integers(0, 9), max_size=4),
)
@example(joins=[0] * 10, bad={1}, stages=(50.0, 100.0), starts_old=set())  # stalls stage 1
@example(joins=[0] * 10, bad={7}, stages=(50.0, 100.0), starts_old={1})
@example(joins=[0] * 5 + [3] * 5, bad={2}, stages=(10.0, 50.0, 100.0), starts_old=set())
def test_late_joiners_are_batched_under_the_channel_policy_until_every_good_one_runs_it(
    joins: list[int], bad: set[int], stages: tuple[float, ...], starts_old: set[int]
) -> None:
    """Devices join a channel at different steps (some with an old version, some that always
    fail); a driver loop asks plan_catch_up and runs the engine, as the service does."""
    policy = ChannelPolicy(stages=stages, max_retries=1)
    ids = [f"d{i}" for i in range(len(joins))]
    joined_at = dict(zip(ids, joins, strict=True))
    state: dict[str, tuple[str | None, int | None]] = {
        d: (("1.4.0", 4) if i in starts_old else (None, None)) for i, d in enumerate(ids)
    }
    rollouts: list[Rollout] = []
    deploys: dict[str, int] = {}
    now = 0.0
    for step in range(40):
        now += 10.0
        online = {d for d in ids if joined_at[d] <= step}
        for r in rollouts:  # the driver aborts a stalled catch-up
            if rollout_stalled(
                r.state,
                [s.state for s in r.stages],
                [(p.stage, p.state) for p in r.devices.values()],
            ):
                r.abort(now)
        active = [r for r in rollouts if r.state in ("created", "running", "paused")]
        moving = [
            r
            for r in active
            if rollout_moving(
                r.state,
                [s.state for s in r.stages],
                [(p.stage, p.state) for p in r.devices.values()],
            )
        ]
        assert len(moving) <= 1  # one moving rollout of a channel at a time
        busy = {d for r in active for d in r.devices}
        failed_before = {
            d for r in rollouts for d, p in r.devices.items() if p.state in ("failed", "rejected")
        }
        views_ = [
            DeviceView(
                d,
                True,
                "digits" if state[d][0] else None,
                *state[d],
                busy=d in busy,
                failed_current=d in failed_before,
            )
            for d in sorted(online)
        ]
        plan = plan_catch_up(TARGET, views_, moving[0].rollout_id if moving else "")
        assert not set(plan.send) & busy
        fresh: dict[str, list[Any]] = {}
        if plan.send:
            r = Rollout.plan(f"c{step}", policy.spec(TARGET.sha256), plan.send, now)
            assert [s.target for s in r.stages] == list(stages)
            rollouts.append(r)
            fresh[r.rollout_id] = r.start(now, online)
        for r in rollouts:
            decisions = fresh.get(r.rollout_id, []) + r.tick(now, online)
            for d in [x.device_id for x in decisions if x.kind == "send_deploy" and x.device_id]:
                deploys[d] = deploys.get(d, 0) + 1
                if int(d[1:]) in bad:
                    r.on_status(d, "failed", now, reason="smoke test failed")
                else:
                    r.on_status(d, "installed", now)
                    state[d] = (TARGET.version, TARGET.release)
    good = [d for d in ids if int(d[1:]) not in bad]
    assert all(state[d] == (TARGET.version, TARGET.release) for d in good)
    for d in ids:
        if int(d[1:]) in bad:  # tried once plus its retries, in one batch, never again
            assert deploys.get(d, 0) <= 1 + policy.max_retries
            assert state[d][0] != TARGET.version
