"""The SQLite registry behind the repository interface."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from fleet_server import migrations
from fleet_server.errors import StorageError
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


# the layout edgefleet wrote before the schema was versioned (sqlite-utils' DDL, verbatim)
_OLD_LAYOUT = """
CREATE TABLE "bundles" ("sha256" TEXT PRIMARY KEY, "name" TEXT, "version" TEXT,
  "release" INTEGER, "size" INTEGER, "model_sha256" TEXT, "profiles" TEXT, "manifest" TEXT,
  "signer" TEXT, "uploaded_at" REAL, "uploaded_by" TEXT);
CREATE TABLE "devices" ("device_id" TEXT PRIMARY KEY, "profile" TEXT, "tags" TEXT,
  "online" INTEGER, "last_seen" REAL, "model" TEXT, "version" TEXT, "release" INTEGER,
  "model_sha256" TEXT, "agent_version" TEXT, "api_url" TEXT, "state" TEXT, "manual_tags" TEXT);
CREATE TABLE "device_history" ("id" INTEGER PRIMARY KEY, "device_id" TEXT, "ts" REAL,
  "model" TEXT, "version" TEXT, "release" INTEGER);
CREATE INDEX "idx_device_history_device_id_ts" ON "device_history" ("device_id", "ts");
CREATE TABLE "rollouts" ("rollout_id" TEXT PRIMARY KEY, "bundle_sha256" TEXT, "state" TEXT,
  "created_at" REAL, "updated_at" REAL, "dry_run" INTEGER, "doc" TEXT);
CREATE TABLE "rollout_stages" ("rollout_id" TEXT, "idx" INTEGER, "state" TEXT, "target" REAL,
  "devices" INTEGER, "started_at" REAL, "finished_at" REAL, PRIMARY KEY ("rollout_id", "idx"));
CREATE TABLE "rollout_devices" ("rollout_id" TEXT, "device_id" TEXT, "stage" INTEGER,
  "state" TEXT, "attempts" INTEGER, "updated_at" REAL, "reason" TEXT,
  PRIMARY KEY ("rollout_id", "device_id"));
CREATE INDEX "idx_rollout_devices_device_id" ON "rollout_devices" ("device_id");
CREATE TABLE "metrics" ("id" INTEGER PRIMARY KEY, "device_id" TEXT, "model" TEXT,
  "version" TEXT, "ts" REAL, "seq" INTEGER, "requests" INTEGER, "errors" INTEGER,
  "p95_ms" REAL, "p50_ms" REAL, "accuracy" REAL, "feedback" INTEGER);
CREATE INDEX "idx_metrics_model_version_ts" ON "metrics" ("model", "version", "ts");
CREATE UNIQUE INDEX "idx_metrics_device_id_seq" ON "metrics" ("device_id", "seq");
CREATE TABLE "events" ("id" INTEGER PRIMARY KEY, "ts" REAL, "kind" TEXT, "message" TEXT,
  "rollout_id" TEXT, "device_id" TEXT, "data" TEXT);
CREATE INDEX "idx_events_rollout_id" ON "events" ("rollout_id");
CREATE TABLE "audit" ("id" INTEGER PRIMARY KEY, "ts" REAL, "actor" TEXT, "action" TEXT,
  "target" TEXT, "reason" TEXT, "data" TEXT);
CREATE TABLE "tokens" ("token_hash" TEXT PRIMARY KEY, "role" TEXT, "name" TEXT,
  "created_at" REAL);
CREATE TABLE "users" ("username" TEXT PRIMARY KEY, "password_hash" TEXT, "role" TEXT);
INSERT INTO devices (device_id, profile, tags, online, manual_tags)
  VALUES ('pi-1', 'raspberry-pi-4', '["lab"]', 1, '[]');
INSERT INTO events (ts, kind, message, data) VALUES (1.0, 'device', 'pi-1 online', '{}');
INSERT INTO tokens VALUES ('h', 'admin', 'ci', 1.0);
"""


def test_a_registry_file_from_before_versioning_upgrades_in_place(tmp_path: Path) -> None:
    path = tmp_path / "fleet.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(_OLD_LAYOUT)
    conn.close()
    repo = SQLiteRepository(path)
    assert repo.schema_version() == migrations.latest(migrations.SQLITE)
    applied = [r["version"] for r in repo.db.query("select version from schema_version")]
    assert applied == [m.version for m in migrations.SQLITE]
    d = repo.get_device("pi-1")
    assert d is not None and d["tags"] == ["lab"] and d["online"] is True
    assert repo.events()[0]["message"] == "pi-1 online" and repo.token_role("h") == "admin"
    assert "idx_devices_counts" in {i.name for i in repo.db["devices"].indexes}
    repo.upsert_device("pi-2", profile="host")  # and it keeps working as a new one does
    assert repo.device_counts()["devices"] == 2
    repo.close()
    again = SQLiteRepository(path)  # reopening applies nothing twice
    assert again.db.execute("select count(*) from schema_version").fetchone()[0] == len(
        migrations.SQLITE
    )
    again.close()


def test_a_registry_from_a_newer_edgefleet_is_refused_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "fleet.db"
    SQLiteRepository(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("insert into schema_version values (99, 'from the future', 0)")
    conn.close()
    with pytest.raises(StorageError, match="schema version 99"):
        SQLiteRepository(path)


def test_the_sqlite_default_never_imports_psycopg(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from fleet_server.config import FleetConfig\n"
        "from fleet_server.repository import open_repository\n"
        "import fleet_server.service, fleet_server.drift\n"
        f"r = open_repository(FleetConfig(data_dir={str(tmp_path)!r}))\n"
        "r.close()\n"
        "print(sorted(m for m in sys.modules if m.startswith('psycopg')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
