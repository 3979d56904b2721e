"""Passes over every device (health rules, local drift) are spaced out by what they cost."""

from __future__ import annotations

import pytest

from fleet_server import measures
from fleet_server.measures import PASS_DUTY, SLOW_PASS_S, _Paced


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(measures.time, "monotonic", c)
    return c


def test_a_cheap_pass_runs_every_time(clock: Clock) -> None:
    pace = _Paced()
    runs = []

    def cheap() -> None:
        runs.append(clock.t)
        clock.t += SLOW_PASS_S / 2

    for _ in range(3):
        assert pace.ready()
        pace.run(cheap)
    assert len(runs) == 3


def test_a_slow_pass_waits_until_it_has_used_its_share(clock: Clock) -> None:
    pace = _Paced()

    def slow() -> None:
        clock.t += 2.0  # a pass over 100,000 devices

    pace.run(slow)
    wait = 2.0 / PASS_DUTY  # from the pass's start
    clock.t = 100.0 + wait - 0.1
    assert not pace.ready()
    clock.t = 100.0 + wait
    assert pace.ready()


def test_without_new_metrics_the_health_pass_follows_the_smallest_offline_limit() -> None:
    from fleet_server.health_rules import HealthConfig
    from fleet_server.measures import HEALTH_EVERY_MAX_S, HEALTH_EVERY_S, time_pass_every

    assert time_pass_every(HealthConfig()) == HEALTH_EVERY_MAX_S  # 600 s: every 30 s
    assert time_pass_every(HealthConfig(offline_after_s=200)) == 10.0
    assert time_pass_every(HealthConfig(offline_after_s=5)) == HEALTH_EVERY_S  # not below 1 s
    tight = HealthConfig(profiles={"pi4": {"offline_after_s": 60}})
    assert time_pass_every(tight) == 3.0  # a profile's own limit counts
