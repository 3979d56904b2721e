"""How a rollout document is stored: a head row plus one row per device.

The rollout driver saves a live rollout after every change (each tick that decided
something), and a rollout's size is its device count. So the document is split:

* ``rollouts.doc`` holds the head: spec, state, stages (with their device lists), times;
* ``rollout_devices.doc`` holds each device's progress (state, attempts, sent time, the
  model it ran before), beside the queryable columns of the same row.

A save writes the head and only the device rows the caller names as changed
(``save_rollout(doc, sha, devices=…)``; every device when it names none), so a tick that
moved five devices of 10,000 writes five rows instead of re-encoding the whole fleet.
Reading assembles the document again, devices in stage order (the order
:meth:`.rollout_engine.Rollout.plan` gave them). A head that still carries ``devices`` was
written before this layout (migration 10) and is read as it is; its first save in the new
layout must name no devices (all rows are written), which the driver's first save of a
loaded rollout does (:class:`.rollout_saves.SavedRows`).

Both repositories (SQLite and PostgreSQL) use these functions, so the layout is one.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable
from typing import Any

DEVICE_COLUMNS: tuple[str, ...] = ("rollout_id", "device_id", "stage", "state", "attempts")
DEVICE_COLUMNS += ("updated_at", "reason", "doc")


def _j(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def head(doc: dict[str, Any]) -> str:
    """The ``rollouts.doc`` text: the document without its devices."""
    return _j({k: v for k, v in doc.items() if k != "devices"})


def device_rows(doc: dict[str, Any], only: Collection[str] | None = None) -> list[tuple[Any, ...]]:
    """``rollout_devices`` rows (:data:`DEVICE_COLUMNS`) of every device, or of ``only``."""
    rid = doc["rollout_id"]
    wanted = None if only is None else set(only)
    return [
        (
            rid,
            d["device_id"],
            d["stage"],
            d["state"],
            d["attempts"],
            d["updated_at"],
            d["reason"],
            _j(d),
        )
        for d in doc["devices"]
        if wanted is None or d["device_id"] in wanted
    ]


def split_layout(head_doc: dict[str, Any]) -> bool:
    """True when the devices of this (parsed) head are in ``rollout_devices``; False for a
    head written before migration 10, which is the whole document."""
    return "devices" not in head_doc


def assemble(head_doc: dict[str, Any], device_docs: Iterable[str | None]) -> dict[str, Any]:
    """The whole document from a parsed head and its device rows' ``doc`` texts."""
    stages = head_doc.get("stages") or []
    order = {d: i for i, d in enumerate(x for s in stages for x in s["devices"])}
    devices = [json.loads(t) for t in device_docs if t]
    devices.sort(key=lambda d: (order.get(d["device_id"], len(order)), d["device_id"]))
    return {**head_doc, "devices": devices}
