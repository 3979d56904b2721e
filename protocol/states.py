"""Every state name of the fleet, in one place: rollouts, stages, devices in a rollout,
command statuses and command kinds, and the groups of them that code asks about.

The rollout engine, the fleet service and its views, the dashboard, the channels and the
agent's command processor all import these; a state spelled anywhere else is a bug.
"""

from __future__ import annotations

from typing import Literal, Union

# A rollout, as the pure engine (fleet_server.rollout_engine) moves it.
RolloutState = Literal[
    "created", "running", "paused", "succeeded", "halted", "aborted", "rolled_back"
]
ROLLOUT_TERMINAL = frozenset({"succeeded", "halted", "aborted", "rolled_back"})
ROLLOUT_ACTIVE = frozenset({"created", "running", "paused"})  # holds its devices
ROLLOUT_MOVING = frozenset({"running", "paused"})  # devices may still change state
ROLLOUT_TICKED = frozenset({"running", "paused", "succeeded"})  # the tick looks at these
ROLLOUT_LOADED = frozenset({"created", "running", "paused", "halted", "succeeded"})  # kept live

# One stage of a rollout.
StageState = Literal["pending", "running", "passed", "failed"]
STAGE_STARTED = frozenset({"running", "passed"})

# A device within a rollout (also what a device reports for a command).
DeviceStateName = Literal[
    "queued",
    "downloading",
    "verifying",
    "installed",
    "failed",
    "rejected",
    "timed_out",
    "rolled_back",
]
DEVICE_IN_PROGRESS = frozenset({"downloading", "verifying"})
DEVICE_UNSETTLED = frozenset({"queued"}) | DEVICE_IN_PROGRESS
DEVICE_FAILED = frozenset({"failed", "rejected", "timed_out"})
DEVICE_TERMINAL = frozenset({"installed", "rolled_back"}) | DEVICE_FAILED

# What a device reports about one command.
CommandStatusState = Union[DeviceStateName, Literal["accepted", "progress", "done"]]
COMMAND_FINAL = frozenset({"installed", "rejected", "failed", "rolled_back", "done", "timed_out"})

# The kinds of command the fleet sends.
CommandKind = Literal["deploy", "rollback", "benchmark", "config", "shadow_stop"]
COMMAND_KINDS: tuple[str, ...] = ("deploy", "rollback", "benchmark", "config", "shadow_stop")
