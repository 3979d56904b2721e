"""Standing health rules: pure, no clock; hysteresis, auto-resolve, scope naming."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet_server.health_rules import DeviceSample, HealthConfig, HealthConfigError, HealthRules


def sample(device: str, window: float, p95: float, **kw: object) -> DeviceSample:
    base: dict[str, object] = {
        "device_id": device,
        "profile": "host",
        "window_end": window,
        "requests": 100,
        "p95_ms": p95,
        "budget_ms": 10.0,
        "disk_free_mb": 5000.0,
    }
    base.update(kw)
    return DeviceSample(**base)  # type: ignore[arg-type]


def fleet(window: float, slow_p95: float) -> list[DeviceSample]:
    return [
        sample("fast-1", window, 2.0),
        sample("fast-2", window, 2.5),
        sample("slow", window, slow_p95),
    ]


def test_slow_device_fires_after_two_windows_naming_it_and_resolves_on_its_own() -> None:
    rules = HealthRules(HealthConfig())
    assert rules.evaluate(fleet(1.0, 40.0), 1.0) == []  # one window over: not yet
    assert rules.evaluate(fleet(1.0, 40.0), 1.5) == []  # the same window again: not counted
    fired = rules.evaluate(fleet(2.0, 40.0), 2.0)
    assert [(t.state, t.rule, t.scope, t.subject) for t in fired] == [
        ("firing", "latency", "device", "slow")
    ]
    assert "slow" in fired[0].message and "10.0 ms" in fired[0].message
    assert [a.subject for a in rules.firing()] == ["slow"]
    assert rules.evaluate(fleet(3.0, 3.0), 3.0) == []  # one window under: hold
    resolved = rules.evaluate(fleet(4.0, 3.0), 4.0)
    assert [(t.state, t.subject) for t in resolved] == [("resolved", "slow")]
    assert rules.firing() == []


def test_between_the_lines_nothing_changes() -> None:
    rules = HealthRules(HealthConfig(resolve_ratio=0.8))
    rules.evaluate(fleet(1.0, 40.0), 1.0)
    rules.evaluate(fleet(2.0, 40.0), 2.0)
    for w in range(3, 10):  # 9 ms: under the budget of 10 but over 0.8 × 10
        assert rules.evaluate(fleet(float(w), 9.0), float(w)) == []
    assert [a.subject for a in rules.firing()] == ["slow"]


@settings(max_examples=80, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=40))
def test_an_alert_never_flaps_faster_than_its_hysteresis(overs: list[bool]) -> None:
    rules = HealthRules(HealthConfig(fire_after=2, resolve_after=2))
    transitions = []
    for i, over in enumerate(overs):
        out = rules.evaluate([sample("d", float(i), 50.0 if over else 1.0)], float(i))
        transitions += [(i, t.state) for t in out]
    for (i, a), (j, b) in itertools.pairwise(transitions):
        assert a != b and j - i >= 2  # alternating states, at least two windows apart
    for i, state in transitions:
        want = state == "firing"
        assert overs[i] == want and overs[i - 1] == want


def test_cohort_alert_names_the_devices_over_the_line_and_those_that_are_not() -> None:
    rules = HealthRules(HealthConfig(min_requests=1))
    samples = lambda w, rate: [  # noqa: E731
        sample("a", w, 1.0, errors=int(rate * 100), tags=("site-1",)),
        sample("b", w, 1.0, errors=int(rate * 100), tags=("site-1",)),
        sample("c", w, 1.0, errors=0, tags=("site-1",)),
    ]
    rules.evaluate(samples(1.0, 0.2), 1.0)
    out = rules.evaluate(samples(2.0, 0.2), 2.0)
    cohort = [t for t in out if t.scope == "tag"]
    assert len(cohort) == 1 and cohort[0].rule == "errors"
    assert cohort[0].devices == ("a", "b") and cohort[0].healthy == ("c",)
    assert "not affected: c" in cohort[0].message
    assert not [t for t in rules.evaluate(samples(3.0, 0.0), 3.0) if t.scope == "tag"]
    out = rules.evaluate(samples(4.0, 0.0), 4.0)  # the devices' hysteresis carries over
    assert any(t.scope == "tag" and t.state == "resolved" for t in out)


def test_offline_fires_after_the_limit_and_resolves_when_back() -> None:
    rules = HealthRules(HealthConfig(offline_after_s=60))
    gone = [sample("d", 1.0, 1.0, online=False, last_seen=100.0)]
    assert rules.evaluate(gone, 130.0) == []
    out = rules.evaluate(gone, 170.0)
    assert [(t.rule, t.state) for t in out] == [("offline", "firing")]
    out = rules.evaluate([sample("d", 1.0, 1.0, online=True, last_seen=171.0)], 171.0)
    assert [(t.rule, t.state) for t in out] == [("offline", "resolved")]


def test_full_disk_flag_fires_the_disk_rule() -> None:
    rules = HealthRules(HealthConfig(fire_after=1))
    out = rules.evaluate([sample("d", 1.0, 1.0, disk_full=True)], 1.0)
    assert [(t.rule, t.state) for t in out] == [("disk", "firing")]


def test_profile_override_and_config_errors_name_the_field() -> None:
    cfg = HealthConfig.from_dict({"profiles": {"host": {"p95_ms": 100.0}}})
    rules = HealthRules(cfg)
    rules.evaluate(fleet(1.0, 40.0), 1.0)
    assert rules.evaluate(fleet(2.0, 40.0), 2.0) == []  # 40 ms is under the override
    with pytest.raises(HealthConfigError, match=r"health\.nope"):
        HealthConfig.from_dict({"nope": 1})
    with pytest.raises(HealthConfigError, match="error_rate"):
        HealthConfig.from_dict({"error_rate": 3})
    with pytest.raises(HealthConfigError, match=r"health\.profiles\.pi\.bad"):
        HealthConfig.from_dict({"profiles": {"pi": {"bad": 1}}})


def test_too_few_requests_leave_the_state_alone() -> None:
    rules = HealthRules(HealthConfig(min_requests=50))
    for w in (1.0, 2.0, 3.0):
        assert rules.evaluate([sample("d", w, 99.0, requests=10)], w) == []
