"""Every list of the REST API comes in cursor pages: ``{"items": [...], "next_cursor": ...}``.

Devices and events are written into the registry through the repository here (a list
test needs many rows, not many birth messages); test_api.py registers devices by birth.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet_server.pagination import DEFAULT_LIMIT, MAX_CURSOR_CHARS, MAX_LIMIT
from protocol import KeyPair
from tests.fleet_server.fleetkit import Api
from tests.fleet_server.test_api import Fleet, bundle_v1, bundle_v2  # noqa: F401 (fixtures)

LISTS = ("/v1/devices", "/v1/bundles", "/v1/rollouts", "/v1/events", "/v1/audit", "/v1/drift")


@pytest.fixture
def fleet(tmp_path: Path, signing_key: KeyPair) -> Iterator[Fleet]:
    f = Fleet(tmp_path, signing_key)
    yield f
    f.service.repo.close()


def _seed_devices(fleet: Fleet, n: int) -> list[str]:
    ids = [f"dev-{i:04d}" for i in range(n)]
    for i, d in enumerate(ids):
        fleet.service.repo.upsert_device(
            d,
            profile="raspberry-pi-4" if i % 3 == 0 else "host",
            online=i % 2,
            tags=["lab"] if i % 4 == 0 else [],
            manual_tags=["canary"] if i % 5 == 0 else [],
            model="iris",
            version="1.0.0" if i % 2 else "2.0.0",
            last_seen=1_700_000_000.0 + i,
        )
    return ids


def _walk(api: Api, path: str, **params: Any) -> tuple[list[dict[str, Any]], int]:
    """Every item of a list by following next_cursor; and how many pages that took."""
    items: list[dict[str, Any]] = []
    pages, cursor = 0, None
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        r = api.get(path, params=query)
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"items", "next_cursor"}
        items += body["items"]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            return items, pages


def test_device_pages_hold_every_device_once_in_id_order(fleet: Fleet) -> None:
    ids = _seed_devices(fleet, 23)
    v = fleet.as_("viewer")
    items, pages = _walk(v, "/v1/devices", limit=5)
    assert [d["device_id"] for d in items] == ids
    assert pages == 5
    first = v.get("/v1/devices", params={"limit": 5}).json()
    assert len(first["items"]) == 5 and isinstance(first["next_cursor"], str)


def test_device_pages_filter_in_the_query(fleet: Fleet) -> None:
    ids = _seed_devices(fleet, 40)
    v = fleet.as_("viewer")
    cases: list[tuple[dict[str, Any], list[str]]] = [
        ({"profile": "raspberry-pi-4"}, [d for i, d in enumerate(ids) if i % 3 == 0]),
        ({"tag": "lab"}, [d for i, d in enumerate(ids) if i % 4 == 0]),
        ({"tag": "canary"}, [d for i, d in enumerate(ids) if i % 5 == 0]),
        ({"online": "true"}, [d for i, d in enumerate(ids) if i % 2]),
        ({"version": "2.0.0", "online": "false"}, [d for i, d in enumerate(ids) if i % 2 == 0]),
        ({"tag": "la"}, []),  # a tag is matched whole, not as a prefix
    ]
    for params, expected in cases:
        items, _ = _walk(v, "/v1/devices", limit=3, **params)
        assert [d["device_id"] for d in items] == expected, params


def test_device_list_defaults_to_a_page_of_100(fleet: Fleet) -> None:
    _seed_devices(fleet, DEFAULT_LIMIT + 5)
    body = fleet.as_("viewer").get("/v1/devices").json()
    assert len(body["items"]) == DEFAULT_LIMIT and body["next_cursor"]
    rest = fleet.as_("viewer").get("/v1/devices", params={"cursor": body["next_cursor"]}).json()
    assert len(rest["items"]) == 5 and rest["next_cursor"] is None


def test_a_device_registered_between_pages_is_neither_lost_nor_repeated(fleet: Fleet) -> None:
    _seed_devices(fleet, 10)
    v = fleet.as_("viewer")
    first = v.get("/v1/devices", params={"limit": 4}).json()
    fleet.service.repo.upsert_device("dev-0009a", profile="host", online=1)  # after the cursor
    fleet.service.repo.upsert_device("dev-0000a", profile="host", online=1)  # before it
    rest, _ = _walk(v, "/v1/devices", limit=4, cursor=first["next_cursor"])
    seen = [d["device_id"] for d in first["items"] + rest]
    assert len(seen) == len(set(seen)) == 11
    assert "dev-0009a" in seen and "dev-0000a" not in seen


def test_events_and_audit_pages_run_newest_first(fleet: Fleet) -> None:
    repo = fleet.service.repo
    for i in range(11):
        repo.add_event("note", f"event {i}", 1_700_000_000.0 + i, device_id="d1")
        repo.add_audit("api:admin", "note", "device:d1", f"audit {i}", 1_700_000_000.0 + i)
    op = fleet.as_("operator")
    events, pages = _walk(op, "/v1/events", limit=4, device_id="d1")
    assert [e["message"] for e in events] == [f"event {i}" for i in reversed(range(11))]
    assert pages == 3
    audit, _ = _walk(op, "/v1/audit", limit=4, target="device:d1")
    assert [a["reason"] for a in audit] == [f"audit {i}" for i in reversed(range(11))]


def test_bundle_and_rollout_pages_run_newest_first(
    fleet: Fleet,
    bundle_v1: bytes,  # noqa: F811
    bundle_v2: bytes,  # noqa: F811
) -> None:
    op = fleet.as_("operator")
    fleet.device("d1")
    for data in (bundle_v1, bundle_v2):
        assert op.post("/v1/bundles", content=data).status_code == 201
    bundles, pages = _walk(op, "/v1/bundles", limit=1)
    assert [b["version"] for b in bundles] == ["2.0.0", "1.0.0"] and pages == 2
    for ref in ("iris@1.0.0", "iris@2.0.0"):
        r = op.post("/v1/rollouts", json={"bundle": ref, "stages": [100]}, params={"force": "1"})
        assert r.status_code == 201, r.text
    rollouts, _ = _walk(op, "/v1/rollouts", limit=1)
    assert [r["version"] for r in rollouts] == ["2.0.0", "1.0.0"]
    assert all(r["bundle"] == "iris" and r["state"] == "created" for r in rollouts)


def test_drift_list_is_a_page_even_before_any_evaluation(fleet: Fleet) -> None:
    body = fleet.as_("viewer").get("/v1/drift", params={"model": "iris", "limit": 5}).json()
    assert body == {"items": [], "next_cursor": None}


@pytest.mark.parametrize("path", LISTS)
@pytest.mark.parametrize("limit", ["0", str(MAX_LIMIT + 1), "-3", "ten", "1.5"])
def test_a_bad_limit_is_refused_naming_limit(fleet: Fleet, path: str, limit: str) -> None:
    r = fleet.as_("admin").get(path, params={"limit": limit})
    assert r.status_code == 422, r.text
    assert r.json()["field"] == "limit"


@pytest.mark.parametrize("path", LISTS)
def test_a_bad_cursor_is_refused_naming_cursor(fleet: Fleet, path: str) -> None:
    _seed_devices(fleet, 3)
    admin = fleet.as_("admin")
    foreign = admin.get("/v1/devices", params={"limit": 1}).json()["next_cursor"]
    bad = [
        "not a cursor!",
        "W10",  # base64 of "[]"
        "x" * (MAX_CURSOR_CHARS + 1),
        "WyJkZXZpY2VzIiwgW3RydWVdXQ",  # ["devices", [true]]: the wrong type
    ]
    if path != "/v1/devices":
        bad.append(foreign)  # a cursor of another list
    for cursor in bad:
        r = admin.get(path, params={"cursor": cursor})
        assert r.status_code == 422, (cursor, r.text)
        assert r.json()["field"] == "cursor", r.json()
    # and the lists are unchanged by the refusals
    assert len(admin.get("/v1/devices").json()["items"]) == 3
