"""The SQLite registry behind the repository interface."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet_server.repository import Repository, SQLiteRepository
from fleet_server.rollout_engine import Rollout, RolloutSpec


@pytest.fixture
def repo(tmp_path: Path) -> SQLiteRepository:
    r = SQLiteRepository(tmp_path / "fleet.db")
    yield r
    r.close()


def test_sqlite_repository_satisfies_the_interface(repo: SQLiteRepository) -> None:
    def use(r: Repository) -> None:
        r.list_devices()

    use(repo)


def test_device_tags_merge_reported_and_manual(repo: SQLiteRepository) -> None:
    repo.upsert_device("d1", profile="host", tags=["lab"], online=1, last_seen=1.0)
    repo.upsert_device("d1", manual_tags=["canary"])
    d = repo.get_device("d1")
    assert d is not None
    assert d["tags"] == ["canary", "lab"]
    assert d["online"] is True
    assert repo.get_device("nope") is None


def test_rollout_doc_round_trips_and_denormalises_stages_and_devices(
    repo: SQLiteRepository,
) -> None:
    r = Rollout.plan(
        "r-1", RolloutSpec(bundle_sha256="a" * 64, stages=(50, 100)), ["a", "b", "c", "d"], 1.0
    )
    r.start(2.0, ["a", "b", "c", "d"])
    repo.save_rollout(r.to_dict(), "a" * 64)
    got = repo.get_rollout("r-1")
    assert got is not None and got["state"] == "running"
    assert Rollout.from_dict(got["doc"]).to_dict() == r.to_dict()
    assert repo.list_rollouts(["running"])[0]["rollout_id"] == "r-1"
    assert repo.list_rollouts(["halted"]) == []
    stages = list(repo.db["rollout_stages"].rows_where(order_by="idx"))
    assert [s["state"] for s in stages] == ["running", "pending"]
    assert repo.db["rollout_devices"].count == 4


def test_events_and_audit_come_back_newest_first(repo: SQLiteRepository) -> None:
    repo.add_event("device", "d1 online", 1.0, device_id="d1")
    repo.add_events(
        [
            {
                "ts": 2.0,
                "kind": "stage",
                "message": "stage 1 passed",
                "rollout_id": "r",
                "device_id": None,
                "data": "{}",
            }
        ]
    )
    assert [e["message"] for e in repo.events()] == ["stage 1 passed", "d1 online"]
    assert [e["message"] for e in repo.events(device_id="d1")] == ["d1 online"]
    repo.add_audit("api:admin", "rollout.start", "rollout:r", "start requested", 3.0, {"x": 1})
    assert repo.audit(target="rollout:r")[0]["data"] == {"x": 1}


def test_tokens_are_looked_up_by_hash_and_users_by_name(repo: SQLiteRepository) -> None:
    repo.add_token("h" * 64, "operator", "ci", 1.0)
    assert repo.token_role("h" * 64) == "operator"
    assert repo.token_role("x" * 64) is None
    assert repo.list_tokens() == [{"name": "ci", "role": "operator", "created_at": 1.0}]
    repo.add_user("ana", "scrypt$...", "admin")
    assert repo.get_user("ana")["role"] == "admin"  # type: ignore[index]


def test_reopening_the_file_keeps_everything(tmp_path: Path) -> None:
    a = SQLiteRepository(tmp_path / "f.db")
    a.add_bundle(
        {
            "sha256": "b" * 64,
            "name": "iris",
            "version": "1.0.0",
            "release": 1,
            "size": 3,
            "model_sha256": "c" * 64,
            "profiles": "host",
            "manifest": "{}",
            "signer": "k",
            "uploaded_at": 1.0,
            "uploaded_by": "t",
        }
    )
    a.close()
    b = SQLiteRepository(tmp_path / "f.db")
    assert b.get_bundle("b" * 64)["name"] == "iris"  # type: ignore[index]
    b.close()
