"""View models: the JSON-ready documents the API, the CLI and the dashboard show.

Pure functions of registry rows and rollout snapshots; nothing here reads the database or
takes a lock, so the callers decide what to fetch and hold.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from protocol.states import DEVICE_FAILED, DEVICE_IN_PROGRESS, ROLLOUT_ACTIVE

from .rollout_engine import Rollout

BUNDLE_FIELDS = ("sha256", "name", "version", "release", "size", "signer", "uploaded_at")


def bundle_info(row: Mapping[str, Any], manifest: bool = False) -> dict[str, Any]:
    """A bundle row as the API shows it: profiles as a list, the manifest on request."""
    out = {k: row[k] for k in (*BUNDLE_FIELDS, "uploaded_by")}
    out["profiles"] = [p for p in (row.get("profiles") or "").split(",") if p]
    if manifest:
        out["manifest"] = json.loads(row["manifest"])
    return out


def rollout_status(
    r: Rollout, bundle: Mapping[str, Any], decisions: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Rollout detail: state, every stage, every device, and (when given) the gate
    decisions with their reasons."""
    stages = []
    for s in r.stages:
        states = [r.devices[d].state for d in s.devices]
        stages.append(
            {
                "index": s.index,
                "target": s.target,
                "state": s.state,
                "devices": len(s.devices),
                "installed": states.count("installed"),
                "failed": sum(x in DEVICE_FAILED for x in states),
                "in_progress": sum(x in DEVICE_IN_PROGRESS for x in states),
                "rolled_back": states.count("rolled_back"),
                "queued": states.count("queued"),
                "started_at": s.started_at,
                "finished_at": s.finished_at,
                "device_ids": list(s.devices),
            }
        )
    out: dict[str, Any] = {
        "rollout_id": r.rollout_id,
        "state": r.state,
        "reason": r.reason,
        "dry_run": r.dry_run,
        "bundle": {k: bundle.get(k) for k in ("sha256", "name", "version", "release")},
        "spec": r.spec.to_dict(),
        "created_at": r.created_at,
        "updated_at": r.updated_at,
        "counts": r.counts(),
        "total": len(r.devices),
        "stages": stages,
        "devices": [
            {
                "device_id": d.device_id,
                "stage": d.stage,
                "state": d.state,
                "attempts": d.attempts,
                "reason": d.reason,
                "updated_at": d.updated_at,
            }
            for d in sorted(r.devices.values(), key=lambda x: (x.stage, x.device_id))
        ],
    }
    if decisions is not None:
        out["decisions"] = [a for a in decisions if a["action"] != "device"]
    return out


def rollout_rows(
    rows: Iterable[Mapping[str, Any]],
    bundles: Mapping[str, Mapping[str, Any]],
    live_counts: Mapping[str, dict[str, int]],
) -> list[dict[str, Any]]:
    """Registry rollout rows with their bundle's name and version and, for rollouts the
    driver holds, the live per-state device counts."""
    out = []
    for row in rows:
        b = bundles.get(row["bundle_sha256"], {})
        out.append(
            {
                **row,
                "bundle": b.get("name"),
                "version": b.get("version"),
                "counts": live_counts.get(row["rollout_id"]),
            }
        )
    return out


def device_rollouts(rollouts: Mapping[str, Rollout], device_id: str) -> list[dict[str, Any]]:
    """The rollouts a device is part of, with its stage, state and attempts in each."""
    return [
        {
            "rollout_id": rid,
            "stage": r.devices[device_id].stage,
            "state": r.devices[device_id].state,
            "reason": r.devices[device_id].reason,
            "attempts": r.devices[device_id].attempts,
        }
        for rid, r in rollouts.items()
        if device_id in r.devices
    ]


def overview(
    counts: Mapping[str, Any],
    rollouts: Iterable[Mapping[str, Any]],
    events: Iterable[Mapping[str, Any]],
    bridge: Mapping[str, Any],
    cluster: Mapping[str, Any],
) -> dict[str, Any]:
    """Devices by profile, version and online state (from an aggregate query), the active
    rollouts, the newest alerts, the MQTT bridge's counters and the server processes."""
    return {
        "devices": counts["devices"],
        "by": counts["by"],
        "active_rollouts": [r for r in rollouts if r["state"] in ROLLOUT_ACTIVE],
        "alerts": [e for e in events if e["kind"] == "alert"][:20],
        "bridge": dict(bridge),
        "cluster": dict(cluster),
    }
