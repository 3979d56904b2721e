"""One contract for every registry backend: each test runs on SQLite and on a real PostgreSQL.

The ``postgres`` parameter needs PostgreSQL's server binaries (Debian's ``postgresql``;
``.ci/run`` installs it) and shows as skipped, with the reason, where they are missing.
Each PostgreSQL test gets a fresh database.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlite_utils
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleet_server import migrations
from fleet_server.drift_store import DriftStore
from fleet_server.errors import InvalidInput, StorageError
from fleet_server.pagination import DRIFT, Page
from fleet_server.repository import Repository, SQLiteRepository
from fleet_server.rollout_engine import Rollout, RolloutSpec

Factory = Callable[[], Repository]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def new_repo(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Factory]:
    """Makes a repository on a fresh store each call (hypothesis needs one per example)."""
    opened: list[Any] = []
    dbs: list[str] = []
    server = request.getfixturevalue("postgres_server") if backend == "postgres" else None

    def make() -> Repository:
        if server is not None:
            from fleet_server.repository_pg import PostgresRepository

            url = server.create_database()
            dbs.append(url)
            repo: Any = PostgresRepository(url, pool_size=2)
        else:
            repo = SQLiteRepository(tmp_path / f"fleet{len(opened)}.db")
        opened.append(repo)
        return repo  # type: ignore[no-any-return]

    yield make
    for r in opened:
        r.close()
    for url in dbs:
        server.drop_database(url)  # type: ignore[union-attr]


@pytest.fixture
def repo(new_repo: Factory) -> Repository:
    return new_repo()


@pytest.fixture
def reopen(repo: Repository, request: pytest.FixtureRequest) -> Iterator[Factory]:
    """Opens another repository on ``repo``'s store (a server restart)."""
    opened: list[Any] = []

    def make() -> Repository:
        if isinstance(repo, SQLiteRepository):
            again: Any = SQLiteRepository(repo.path)
        else:
            from fleet_server.repository_pg import PostgresRepository

            url = repo.pool.conninfo  # type: ignore[attr-defined]
            again = PostgresRepository(url, pool_size=1)
        opened.append(again)
        return again  # type: ignore[no-any-return]

    yield make
    for r in opened:
        r.close()


def bundle(sha: str, uploaded_at: float, **kw: Any) -> dict[str, Any]:
    return {
        "sha256": sha,
        "name": kw.get("name", "iris"),
        "version": kw.get("version", "1.0.0"),
        "release": kw.get("release", 1),
        "size": 1234,
        "model_sha256": "c" * 64,
        "profiles": "host,raspberry-pi-4",
        "manifest": '{"name": "iris"}',
        "signer": "k1",
        "uploaded_at": uploaded_at,
        "uploaded_by": kw.get("uploaded_by", "api:admin"),
    }


def all_pages(fetch: Callable[[str | None], Page]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        page = fetch(cursor)
        out += page.items
        if page.next_cursor is None:
            return out
        cursor = page.next_cursor


# schema ------------------------------------------------------------------------------------
def test_both_backends_number_their_migrations_alike() -> None:
    assert [m.version for m in migrations.SQLITE] == [m.version for m in migrations.POSTGRES]
    assert [m.name.split(" (")[0] for m in migrations.SQLITE] == [
        m.name.split(" (")[0] for m in migrations.POSTGRES
    ]


def test_a_new_registry_is_at_the_newest_schema_version(repo: Repository) -> None:
    assert repo.schema_version() == migrations.latest(migrations.SQLITE)


# bundles -----------------------------------------------------------------------------------
def test_bundles_round_trip_and_list_newest_first(repo: Repository) -> None:
    repo.add_bundle(bundle("a" * 64, 1.0))
    repo.add_bundle(bundle("b" * 64, 2.5, version="2.0.0", release=2))
    repo.add_bundle(bundle("c" * 64, 2.5, version="3.0.0", release=3))  # same time: by sha desc
    assert repo.get_bundle("a" * 64) == bundle("a" * 64, 1.0)
    assert repo.get_bundle("d" * 64) is None
    assert [b["sha256"][0] for b in repo.list_bundles()] == ["c", "b", "a"]
    repo.add_bundle(bundle("a" * 64, 9.0, uploaded_by="cli"))  # upsert replaces
    got = repo.get_bundle("a" * 64)
    assert got is not None and got["uploaded_by"] == "cli" and got["uploaded_at"] == 9.0
    assert isinstance(got["release"], int) and isinstance(got["uploaded_at"], float)


# devices -----------------------------------------------------------------------------------
def test_artifact_bytes_round_trip_in_parts_and_are_stored_once(repo: Repository) -> None:
    import hashlib

    data = bytes(range(256)) * 40 + b"tail"
    sha = hashlib.sha256(data).hexdigest()
    assert repo.artifact_info(sha) is None and repo.artifact_part(sha, 0) is None
    parts = [data[i : i + 4096] for i in range(0, len(data), 4096)]
    assert repo.put_artifact(sha, len(data), iter(parts)) is True
    info = repo.artifact_info(sha)
    assert info is not None and (info["size"], info["parts"]) == (len(data), 3)
    assert b"".join(repo.artifact_part(sha, i) or b"" for i in range(3)) == data
    assert repo.artifact_part(sha, 3) is None
    assert repo.put_artifact(sha, len(data), iter([b"other bytes"])) is False  # kept as is
    assert repo.artifact_part(sha, 0) == parts[0]
    assert repo.shares_artifacts is (type(repo).__name__ == "PostgresRepository")


def test_device_upsert_keeps_fields_it_does_not_name(repo: Repository) -> None:
    repo.upsert_device("d1", profile="host", tags=["lab"], online=True, last_seen=1.5)
    repo.upsert_device("d1", model="iris", version="1.0.0", release=1, online=False)
    repo.upsert_device("d1", manual_tags=["canary", "a"])
    d = repo.get_device("d1")
    assert d is not None
    assert (d["profile"], d["model"], d["version"], d["release"]) == ("host", "iris", "1.0.0", 1)
    assert d["last_seen"] == 1.5 and d["online"] is False
    assert d["tags"] == ["a", "canary", "lab"] and d["manual_tags"] == ["a", "canary"]
    assert repo.get_device("nope") is None


def test_devices_list_in_id_order(repo: Repository) -> None:
    for i in (3, 1, 2):
        repo.upsert_device(f"d{i}", profile="host", online=1)
    assert [d["device_id"] for d in repo.list_devices()] == ["d1", "d2", "d3"]
    assert all(d["online"] is True for d in repo.list_devices())


def test_a_field_the_registry_does_not_have_is_a_storage_error(repo: Repository) -> None:
    with pytest.raises(StorageError):
        repo.upsert_device("d1", colour="red")
    assert repo.get_device("d1") is None


def test_device_history_is_newest_first_and_limited(repo: Repository) -> None:
    for i in range(5):
        repo.add_device_history("d1", float(i), "iris", f"{i}.0.0", i)
    repo.add_device_history("d2", 9.0, "iris", "9.0.0", 9)
    hist = repo.device_history("d1", limit=3)
    assert [h["version"] for h in hist] == ["4.0.0", "3.0.0", "2.0.0"]
    assert hist[0]["release"] == 4 and hist[0]["device_id"] == "d1"
    assert repo.latest_history() == {"d1": ("iris", "4.0.0"), "d2": ("iris", "9.0.0")}


# rollouts ----------------------------------------------------------------------------------
def _rollout(rid: str, created: float, devices: list[str]) -> Rollout:
    r = Rollout.plan(rid, RolloutSpec(bundle_sha256="a" * 64, stages=(50, 100)), devices, created)
    return r


def test_rollout_doc_round_trips_and_resaves(repo: Repository) -> None:
    r = _rollout("r-1", 1.0, ["a", "b", "c", "d"])
    repo.save_rollout(r.to_dict(), "a" * 64)
    got = repo.get_rollout("r-1")
    assert got is not None and got["state"] == "created" and got["dry_run"] == 0
    assert got["bundle_sha256"] == "a" * 64 and got["created_at"] == 1.0
    r.start(2.0, ["a", "b", "c", "d"])
    repo.save_rollout(r.to_dict(), "a" * 64)
    got = repo.get_rollout("r-1")
    assert got is not None and got["state"] == "running"
    assert Rollout.from_dict(got["doc"]).to_dict() == r.to_dict()
    assert repo.get_rollout("r-2") is None


def test_rollout_save_naming_changed_devices_writes_only_their_rows(repo: Repository) -> None:
    r = _rollout("r-1", 1.0, ["a", "b", "c", "d"])
    repo.save_rollout(r.to_dict(), "a" * 64)
    r.start(2.0, ["a", "b", "c", "d"])
    sent = sorted(d.device_id for d in r.devices.values() if d.sent_at is not None)
    assert sent and len(sent) < 4
    repo.save_rollout(r.to_dict(), "a" * 64, devices=sent)
    got = repo.get_rollout("r-1")
    assert got is not None and Rollout.from_dict(got["doc"]).to_dict() == r.to_dict()
    # a device the caller does not name keeps the row it had: the save wrote no other
    r.on_status(sent[0], "installed", 3.0)
    repo.save_rollout(r.to_dict(), "a" * 64, devices=[])
    got = repo.get_rollout("r-1")
    assert got is not None and got["doc"]["state"] == "running"
    by_id = {d["device_id"]: d for d in got["doc"]["devices"]}
    assert by_id[sent[0]]["state"] != "installed"
    assert [d["device_id"] for d in got["doc"]["devices"]] == list(r.devices)


def test_rollout_saved_whole_in_the_head_before_migration_10_still_reads(
    repo: Repository,
) -> None:
    r = _rollout("r-1", 1.0, ["a", "b", "c"])
    r.start(2.0, ["a", "b", "c"])
    repo.save_rollout(r.to_dict(), "a" * 64)
    old = json.dumps(r.to_dict())  # the layout before: every device in rollouts.doc
    if isinstance(repo, SQLiteRepository):
        with repo.db.conn:
            repo.db.execute("update rollouts set doc = ?", [old])
            repo.db.execute("update rollout_devices set doc = null")
    else:
        with repo.pool.connection() as conn:  # type: ignore[attr-defined]
            conn.execute("update rollouts set doc = %s", [old])
            conn.execute("update rollout_devices set doc = null")
    got = repo.get_rollout("r-1")
    assert got is not None and Rollout.from_dict(got["doc"]).to_dict() == r.to_dict()
    repo.save_rollout(r.to_dict(), "a" * 64)  # the first save in the new layout: every row
    got = repo.get_rollout("r-1")
    assert got is not None and Rollout.from_dict(got["doc"]).to_dict() == r.to_dict()


def test_rollouts_list_newest_first_and_filter_by_state(repo: Repository) -> None:
    a, b, c = (_rollout(f"r-{i}", float(i), ["x"]) for i in (1, 2, 3))
    b.start(5.0, ["x"])
    for r in (a, b, c):
        repo.save_rollout(r.to_dict(), "a" * 64)
    assert [r["rollout_id"] for r in repo.list_rollouts()] == ["r-3", "r-2", "r-1"]
    assert [r["rollout_id"] for r in repo.list_rollouts(["running"])] == ["r-2"]
    assert [r["rollout_id"] for r in repo.list_rollouts(["running", "created"])] == [
        "r-3",
        "r-2",
        "r-1",
    ]
    assert repo.list_rollouts(["halted"]) == []
    assert "doc" not in repo.list_rollouts()[0]


# telemetry ---------------------------------------------------------------------------------
def _metrics(device: str, seq: int, ts: float, **kw: Any) -> dict[str, Any]:
    return {
        "device_id": device,
        "model": "iris",
        "version": kw.get("version", "1.0.0"),
        "ts": ts,
        "seq": seq,
        "requests": kw.get("requests", 100),
        "errors": kw.get("errors", 1),
        "p95_ms": kw.get("p95", 5.0),
        "p50_ms": 1.0,
        "accuracy": kw.get("accuracy"),
        "feedback": kw.get("feedback", 0),
    }


def test_metrics_count_a_duplicate_report_once_and_summarise(repo: Repository) -> None:
    repo.add_metrics(_metrics("d1", 1, 10.0, p95=4.0, accuracy=0.9, feedback=10))
    repo.add_metrics(_metrics("d1", 1, 10.0, p95=99.0))  # QoS 1 duplicate: ignored
    repo.add_metrics(_metrics("d2", 1, 11.0, requests=300, errors=5, p95=7.0))
    repo.add_metrics(_metrics("d3", 1, 12.0, accuracy=0.5, feedback=30))
    repo.add_metrics(_metrics("d1", 2, 1.0))  # before "since"
    repo.add_metrics(_metrics("d1", 3, 20.0, version="2.0.0"))  # another version
    s = repo.metrics_summary("iris", "1.0.0", since=5.0)
    assert s["reports"] == 3 and s["requests"] == 500 and s["errors"] == 7
    assert s["p95_ms"] == 7.0 and s["error_rate"] == pytest.approx(7 / 500)
    assert s["accuracy"] == pytest.approx((0.9 * 10 + 0.5 * 30) / 40)
    assert all(isinstance(s[k], int) for k in ("reports", "requests", "errors"))
    only = repo.metrics_summary("iris", "1.0.0", since=5.0, device_ids=["d2"])
    assert (only["reports"], only["requests"], only["accuracy"]) == (1, 300, None)
    none = repo.metrics_summary("iris", "1.0.0", since=5.0, device_ids=[])
    assert none == {
        "reports": 0,
        "requests": 0,
        "errors": 0,
        "p95_ms": None,
        "error_rate": None,
        "accuracy": None,
    }
    empty = repo.metrics_summary("nope", "1", since=0.0)
    assert empty["reports"] == 0 and empty["p95_ms"] is None and empty["error_rate"] is None
    assert [m["seq"] for m in repo.device_metrics("d1", limit=2)] == [3, 1]


def test_metrics_by_device_gives_each_device_its_median_window_p95(repo: Repository) -> None:
    for seq, p95 in enumerate([3.0, 9.0, 5.0], start=1):
        repo.add_metrics(_metrics("d1", seq, 10.0 + seq, p95=p95, requests=10, errors=1))
    repo.add_metrics(_metrics("d2", 1, 11.0, p95=50.0, requests=0, errors=0))
    repo.add_metrics(_metrics("d3", 1, 11.0, p95=1.0))  # not asked for
    repo.add_metrics(_metrics("d1", 9, 1.0, p95=99.0))  # before "since"
    got = repo.metrics_by_device("iris", "1.0.0", since=5.0, device_ids=["d1", "d2", "dx"])
    assert set(got) == {"d1", "d2"}
    assert got["d1"]["p95_ms"] == 5.0 and got["d1"]["requests"] == 30
    assert got["d1"]["error_rate"] == pytest.approx(0.1)
    assert got["d2"]["p95_ms"] == 50.0 and got["d2"]["error_rate"] is None
    assert repo.metrics_by_device("iris", "1.0.0", since=0.0, device_ids=[]) == {}


# device identities and sessions ----------------------------------------------------------
def test_identities_upsert_list_and_delete(repo: Repository) -> None:
    row = {
        "device_id": "d1",
        "public_key": "pk",
        "key_id": "k1",
        "status": "pending",
        "method": "",
        "created_at": 1.0,
        "approved_at": None,
        "approved_by": "",
        "state_boot": 0,
        "state_seq": 0,
    }
    repo.upsert_identity(row)
    repo.upsert_identity({**row, "device_id": "d0"})
    repo.upsert_identity({**row, "status": "approved", "approved_at": 2.0, "state_seq": 7})
    got = {r["device_id"]: r for r in repo.list_identities()}
    assert set(got) == {"d0", "d1"}
    assert got["d1"]["status"] == "approved" and got["d1"]["state_seq"] == 7
    assert repo.identity_versions() == {"d0": ("k1", "pending"), "d1": ("k1", "approved")}
    assert [r["device_id"] for r in repo.list_identities(["d1", "x"])] == ["d1"]
    assert repo.list_identities([]) == []
    repo.delete_identity("d0")
    assert [r["device_id"] for r in repo.list_identities()] == ["d1"]
    assert repo.identity_versions() == {"d1": ("k1", "approved")}


def test_identity_x25519_key_is_kept_across_upserts_and_reopening(
    repo: Repository, reopen: Callable[[], Repository]
) -> None:
    row = {"device_id": "d1", "public_key": "pk", "key_id": "k1", "status": "approved"}
    repo.upsert_identity(row)
    assert repo.list_identities()[0].get("x25519_key") is None
    assert repo.set_identity_x25519("d1", "x" * 44) is True
    assert repo.set_identity_x25519("nobody", "y" * 44) is False  # never creates an identity
    repo.upsert_identity({**row, "state_seq": 9})  # a state's bookkeeping keeps the key
    assert [r["device_id"] for r in repo.list_identities()] == ["d1"]
    again = reopen()
    got = again.list_identities()[0]
    assert got["x25519_key"] == "x" * 44 and got["state_seq"] == 9
    assert again.set_identity_x25519("d1", None) is True
    assert again.list_identities()[0]["x25519_key"] is None


def test_revoked_sessions_are_remembered_until_they_expire(repo: Repository) -> None:
    import time

    repo.revoke_session("s-old", expires=time.time() - 10)
    repo.revoke_session("s-new", expires=time.time() + 3600)  # also sweeps expired ones
    assert repo.session_revoked("s-new")
    assert not repo.session_revoked("s-old") and not repo.session_revoked("s-other")


# several server processes ---------------------------------------------------------------
def test_the_first_shared_secret_stored_is_the_one_every_caller_gets(repo: Repository) -> None:
    assert repo.shared_secret("dashboard_session", "aa") == "aa"
    assert repo.shared_secret("dashboard_session", "bb") == "aa"  # a second process reads it
    assert repo.shared_secret("other", "cc") == "cc"


def test_process_heartbeats_are_kept_and_a_dead_one_is_claimed_once(repo: Repository) -> None:
    row = {
        "process_id": "p1",
        "client_id": "p1",
        "api_url": "http://127.0.0.1:1",
        "started_at": 1.0,
        "heartbeat_at": 2.0,
        "leader": 1,
        "adopted_by": None,
    }
    repo.heartbeat(row)
    repo.heartbeat({**row, "process_id": "p2", "client_id": "p2", "leader": 0})
    repo.heartbeat({**row, "heartbeat_at": 5.0})  # the same process again: one row
    rows = repo.list_processes()
    assert [(r["process_id"], r["heartbeat_at"], r["leader"]) for r in rows] == [
        ("p1", 5.0, 1),
        ("p2", 2.0, 0),
    ]
    assert repo.claim_process("p2", "p1") is True
    assert repo.claim_process("p2", "p3") is False  # one survivor adopts a dead process
    assert repo.list_processes()[1]["adopted_by"] == "p1"
    repo.delete_process("p2")
    assert [r["process_id"] for r in repo.list_processes()] == ["p1"]


def test_rollout_actions_queue_until_finished_with_their_answer(repo: Repository) -> None:
    a = repo.add_rollout_action("r1", "pause", "api:operator", 1.0)
    b = repo.add_rollout_action("r1", "resume", "api:operator", 2.0)
    assert a != b
    assert [(r["id"], r["action"]) for r in repo.pending_rollout_actions()] == [
        (a, "pause"),
        (b, "resume"),
    ]
    repo.finish_rollout_action(a, 3.0)
    repo.finish_rollout_action(b, 4.0, "rollout r1 is not paused", 409)
    assert repo.pending_rollout_actions() == []
    done = repo.get_rollout_action(b)
    assert done is not None and done["done_at"] == 4.0 and done["status"] == 409
    assert done["error"] == "rollout r1 is not paused"
    assert repo.get_rollout_action(999) is None


# history -----------------------------------------------------------------------------------
def test_events_come_back_newest_first_with_filters(repo: Repository) -> None:
    repo.add_event("device", "d1 online", 1.0, device_id="d1", profile="host")
    repo.add_events(
        [
            {
                "ts": 2.0,
                "kind": "stage",
                "message": "stage 1 passed",
                "rollout_id": "r",
                "device_id": None,
                "data": json.dumps({"stage": 1}),
            },
            {
                "ts": 3.0,
                "kind": "alert",
                "message": "drift",
                "rollout_id": "r",
                "device_id": "d1",
                "data": {"x": [1, 2]},
            },
        ]
    )
    repo.add_events([])
    assert [e["message"] for e in repo.events()] == ["drift", "stage 1 passed", "d1 online"]
    assert [e["message"] for e in repo.events(device_id="d1")] == ["drift", "d1 online"]
    assert [e["message"] for e in repo.events(rollout_id="r", device_id="d1")] == ["drift"]
    assert [e["message"] for e in repo.events(limit=1)] == ["drift"]
    first = repo.events()[-1]
    assert first["data"] == {"profile": "host"} and first["kind"] == "device"
    assert repo.events()[0]["data"] == {"x": [1, 2]}
    assert repo.events()[1]["data"] == {"stage": 1}


def test_a_tick_sized_batch_of_events_and_audits_round_trips_every_value(
    repo: Repository,
) -> None:
    """A batch of many rows (PostgreSQL writes it with COPY) keeps every odd value."""
    odd = ["tab\there", "new\nline", "back\\slash", "quote ' \" done", "ünï ✓", "\\N", ""]
    n = 3 * len(odd)
    repo.add_events(
        [
            {
                "ts": float(i),
                "kind": "device",
                "message": odd[i % len(odd)],
                "rollout_id": "r" if i % 2 else None,
                "device_id": f"d{i}",
                "data": json.dumps({"i": i, "s": odd[i % len(odd)]}),
            }
            for i in range(n)
        ]
    )
    repo.add_audits(
        [
            {
                "ts": float(i),
                "actor": "engine",
                "action": "device",
                "target": "rollout:r",
                "reason": odd[i % len(odd)],
                "data": {"i": i, "none": None},
            }
            for i in range(n)
        ]
    )
    events = repo.events(limit=n)[::-1]
    assert [e["message"] for e in events] == [odd[i % len(odd)] for i in range(n)]
    assert [e["rollout_id"] for e in events] == ["r" if i % 2 else None for i in range(n)]
    assert events[5]["data"] == {"i": 5, "s": odd[5]}
    audits = repo.audit(limit=n)[::-1]
    assert [a["reason"] for a in audits] == [odd[i % len(odd)] for i in range(n)]
    assert audits[-1]["data"] == {"i": n - 1, "none": None} and audits[0]["ts"] == 0.0


def test_audit_comes_back_newest_first_by_target(repo: Repository) -> None:
    repo.add_audit("api:admin", "rollout.start", "rollout:r", "start requested", 3.0, {"x": 1})
    repo.add_audits(
        [
            {
                "ts": 4.0,
                "actor": "engine",
                "action": "stage.passed",
                "target": "rollout:r",
                "reason": "8/8 installed",
                "data": {"stage": 0},
            },
            {
                "ts": 5.0,
                "actor": "api:op",
                "action": "device.tag",
                "target": "device:d1",
                "reason": "tags set",
            },
        ]
    )
    assert [a["action"] for a in repo.audit()] == ["device.tag", "stage.passed", "rollout.start"]
    by_target = repo.audit(target="rollout:r")
    assert [a["data"] for a in by_target] == [{"stage": 0}, {"x": 1}]
    assert repo.audit(limit=1)[0]["data"] == {}
    assert set(repo.audit()[0]) >= {"id", "ts", "actor", "action", "target", "reason", "data"}


# release channels --------------------------------------------------------------------------
def test_channels_upsert_by_model_and_channel_and_list_in_order(repo: Repository) -> None:
    repo.save_channel({"model": "iris", "channel": "stable", "policy": "{}", "updated_at": 1.0})
    repo.save_channel({"model": "digits", "channel": "beta", "policy": '{"stages": [100]}'})
    repo.save_channel({"model": "iris", "channel": "stable", "current_sha256": "a" * 64})
    rows = repo.list_channels()
    assert [(r["model"], r["channel"]) for r in rows] == [("digits", "beta"), ("iris", "stable")]
    iris = rows[1]
    assert iris["current_sha256"] == "a" * 64
    assert iris["policy"] == "{}"  # an upsert keeps the fields it does not name


def test_channel_history_is_newest_first_and_filters_by_model_channel_and_bundle(
    repo: Repository,
) -> None:
    for i, (channel, sha) in enumerate([("beta", "a"), ("stable", "a"), ("beta", "b")]):
        repo.add_channel_history(
            {
                "model": "iris",
                "channel": channel,
                "sha256": sha * 64,
                "ts": float(i),
                "action": "promote",
                "actor": "api:op",
                "reason": f"step {i}",
                "rollout_id": f"r{i}",
            }
        )
    assert [h["reason"] for h in repo.channel_history()] == ["step 2", "step 1", "step 0"]
    assert [h["reason"] for h in repo.channel_history(channel="beta")] == ["step 2", "step 0"]
    assert [h["channel"] for h in repo.channel_history(sha256="a" * 64)] == ["stable", "beta"]
    assert repo.channel_history(model="digits") == []
    assert len(repo.channel_history(limit=1)) == 1


def test_device_channels_keep_reported_and_assigned_apart(repo: Repository) -> None:
    repo.set_device_channel("d1", reported="beta", updated_at=1.0)
    repo.set_device_channel("d1", assigned="stable", updated_at=2.0)
    repo.set_device_channel("d2", reported="stable", updated_at=3.0)
    rows = repo.device_channels()
    assert rows["d1"]["reported"] == "beta" and rows["d1"]["assigned"] == "stable"
    assert rows["d2"]["assigned"] is None
    assert set(rows) == {"d1", "d2"}


def test_archiving_a_bundle_twice_keeps_one_row_with_the_last_reason(repo: Repository) -> None:
    repo.archive_bundle("a" * 64, 1.0, "api:op", "bad calibration")
    repo.archive_bundle("a" * 64, 2.0, "api:admin", "still bad")
    rows = repo.archived_bundles()
    assert list(rows) == ["a" * 64]
    assert rows["a" * 64]["reason"] == "still bad" and rows["a" * 64]["actor"] == "api:admin"


# auth --------------------------------------------------------------------------------------
def test_tokens_are_looked_up_by_hash_and_never_listed_with_it(repo: Repository) -> None:
    repo.add_token("h" * 64, "operator", "ci", 1.0)
    repo.add_token("g" * 64, "viewer", "grafana", 2.0)
    assert repo.token_role("h" * 64) == "operator"
    assert repo.token_role("x" * 64) is None
    assert repo.list_tokens() == [
        {"name": "ci", "role": "operator", "created_at": 1.0},
        {"name": "grafana", "role": "viewer", "created_at": 2.0},
    ]
    with pytest.raises(StorageError):
        repo.add_token("h" * 64, "admin", "again", 3.0)
    assert repo.token_role("h" * 64) == "operator"


def test_users_upsert_by_name(repo: Repository) -> None:
    repo.add_user("ana", "scrypt$1", "viewer")
    repo.add_user("ana", "scrypt$2", "admin")
    assert repo.get_user("ana") == {"username": "ana", "password_hash": "scrypt$2", "role": "admin"}
    assert repo.get_user("bob") is None


# cursor pages ------------------------------------------------------------------------------
def _fill(repo: Repository) -> None:
    for i in range(7):
        repo.upsert_device(f"d{i:02d}", profile="host", online=i % 2)
        repo.add_bundle(bundle(f"{i:x}" * 64, float(i // 2)))  # pairs share uploaded_at
        repo.save_rollout(_rollout(f"r-{i}", float(i // 3), ["x"]).to_dict(), "a" * 64)
        repo.add_event("device", f"e{i}", float(i), device_id=f"d{i % 2}")
        repo.add_audit("api", "x", f"t{i % 2}", "why", float(i), {"i": i})


@pytest.mark.parametrize("limit", [1, 3, 7, 100])
def test_every_list_pages_through_to_the_full_list(repo: Repository, limit: int) -> None:
    _fill(repo)
    assert all_pages(lambda c: repo.devices_page(limit, c)) == repo.list_devices()
    assert all_pages(lambda c: repo.bundles_page(limit, c)) == repo.list_bundles()
    assert all_pages(lambda c: repo.rollouts_page(limit, c)) == repo.list_rollouts()
    assert all_pages(lambda c: repo.events_page(limit, c)) == repo.events(limit=1000)
    assert all_pages(lambda c: repo.audit_page(limit, c)) == repo.audit(limit=1000)
    page = repo.devices_page(7)
    assert len(page.items) == 7 and page.next_cursor is None  # no empty last page
    assert repo.devices_page(3).to_dict()["next_cursor"] is not None


def test_pages_apply_the_same_filters_as_the_lists(repo: Repository) -> None:
    _fill(repo)
    r = _rollout("r-9", 9.0, ["x"])
    r.start(9.5, ["x"])
    repo.save_rollout(r.to_dict(), "a" * 64)
    assert all_pages(lambda c: repo.events_page(2, c, device_id="d1")) == repo.events(
        device_id="d1"
    )
    assert all_pages(lambda c: repo.audit_page(2, c, target="t0")) == repo.audit(target="t0")
    running = all_pages(lambda c: repo.rollouts_page(2, c, states=["running"]))
    assert [x["rollout_id"] for x in running] == ["r-9"]
    assert all_pages(lambda c: repo.rollouts_page(2, c, states=["created", "running"])) == (
        repo.list_rollouts(["created", "running"])
    )


@pytest.mark.parametrize(
    ("cursor", "limit", "field"),
    [
        ("not base64 !!", 10, "cursor"),
        ("x" * 600, 10, "cursor"),
        ("", 10, "cursor"),
        ("WyJldmVudHMiLFsxXV0", 10, "cursor"),  # an events cursor handed to the devices list
        ("WyJkZXZpY2VzIixbMV1d", 10, "cursor"),  # ["devices",[1]]: wrong type
        ("WyJkZXZpY2VzIixbXV0", 10, "cursor"),  # ["devices",[]]: wrong arity
        (None, 0, "limit"),
        (None, 1001, "limit"),
        (None, True, "limit"),
    ],
)
def test_a_bad_cursor_or_limit_is_refused_naming_the_field(
    repo: Repository, cursor: str | None, limit: Any, field: str
) -> None:
    repo.upsert_device("d1", profile="host")
    with pytest.raises(InvalidInput) as err:
        repo.devices_page(limit, cursor)
    assert err.value.field == field


def test_a_bundles_cursor_with_a_text_timestamp_is_refused(repo: Repository) -> None:
    import base64

    forged = base64.urlsafe_b64encode(json.dumps(["bundles", ["1.0", "a"]]).encode()).decode()
    with pytest.raises(InvalidInput):
        repo.bundles_page(5, forged)


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    first=st.sets(st.integers(0, 60), min_size=1, max_size=25),
    later=st.lists(st.sets(st.integers(0, 60), max_size=4), max_size=8),
    limit=st.integers(1, 6),
)
def test_devices_inserted_between_pages_cause_no_duplicate_or_miss(
    new_repo: Factory, first: set[int], later: list[set[int]], limit: int
) -> None:
    repo = new_repo()
    for i in first:
        repo.upsert_device(f"d{i:03d}", profile="host")
    seen: list[str] = []
    cursor: str | None = None
    for step in range(100):
        page = repo.devices_page(limit, cursor)
        seen += [d["device_id"] for d in page.items]
        for i in later[step] if step < len(later) else ():
            repo.upsert_device(f"d{i:03d}", profile="new")
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert len(seen) == len(set(seen))
    assert seen == sorted(seen)
    assert {f"d{i:03d}" for i in first} <= set(seen)
    repo.close()


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    first=st.integers(1, 25),
    later=st.lists(st.integers(0, 4), max_size=8),
    limit=st.integers(1, 6),
)
def test_events_written_between_pages_cause_no_duplicate_or_miss(
    new_repo: Factory, first: int, later: list[int], limit: int
) -> None:
    repo = new_repo()
    for i in range(first):
        repo.add_event("device", f"old {i}", float(i))
    seen: list[int] = []
    cursor: str | None = None
    for step in range(100):
        page = repo.events_page(limit, cursor)
        seen += [e["id"] for e in page.items]
        for j in range(later[step] if step < len(later) else 0):
            repo.add_event("device", f"new {step}.{j}", 100.0 + step)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert len(seen) == len(set(seen))
    assert seen == sorted(seen, reverse=True)
    old = {e["id"] for e in repo.events(limit=1000) if e["message"].startswith("old ")}
    assert old <= set(seen)
    repo.close()


# aggregate counts --------------------------------------------------------------------------
def _counts_by_listing(devices: list[dict[str, Any]]) -> dict[str, Any]:
    """What the overview computed before, by listing every device."""
    by: dict[str, dict[str, int]] = {"profile": {}, "version": {}, "online": {}}
    for d in devices:
        ver = f"{d.get('model') or '-'} {d.get('version') or ''}".strip()
        for key, val in (
            ("profile", d["profile"] or "?"),
            ("version", ver),
            ("online", "online" if d["online"] else "offline"),
        ):
            by[key][val] = by[key].get(val, 0) + 1
    return {"devices": len(devices), "by": by}


def test_device_counts_match_counting_the_listed_devices(repo: Repository) -> None:
    assert repo.device_counts() == {
        "devices": 0,
        "by": {"profile": {}, "version": {}, "online": {}},
    }
    repo.upsert_device("a", profile="host", online=1, model="iris", version="1.0.0")
    repo.upsert_device("b", profile="host", online=0, model="iris", version="1.0.0")
    repo.upsert_device("c", profile="raspberry-pi-4", online=1, model="iris", version="2.0.0")
    repo.upsert_device("d")  # nothing known yet: no profile, no model, online NULL
    repo.upsert_device("e", profile="host", online=True, model="digits")
    got = repo.device_counts()
    assert got == _counts_by_listing(repo.list_devices())
    assert got["by"]["online"] == {"online": 3, "offline": 2}
    assert got["by"]["version"] == {"iris 1.0.0": 2, "iris 2.0.0": 1, "-": 1, "digits": 1}
    assert got["by"]["profile"] == {"host": 3, "raspberry-pi-4": 1, "?": 1}


# the drift engine's tables -----------------------------------------------------------------
@pytest.fixture
def drift_store(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    if backend == "postgres":
        from fleet_server.drift_store_pg import PgDriftStore
        from fleet_server.repository_pg import PostgresRepository

        repo = PostgresRepository(request.getfixturevalue("postgres_url"), pool_size=2)
        yield PgDriftStore(repo.pool)
        repo.close()
    else:
        db = sqlite_utils.Database(tmp_path / "drift.db")
        yield DriftStore(db)
        db.close()


def _window(window: float, revision: int, **kw: Any) -> dict[str, Any]:
    return {
        "model": "iris",
        "version": "1.0.0",
        "window": window,
        "sketch": '{"s": 1}',
        "rows": 10 * revision,
        "devices": '["d1"]',
        "revision": revision,
        "evaluated_revision": kw.get("evaluated_revision", 0),
        "alerted": 0,
    }


def _key(seq: int, window_start: float = 100.0) -> dict[str, Any]:
    return {
        "device": "d1",
        "model": "iris",
        "version": "1.0.0",
        "window_start": window_start,
        "seq": seq,
        "window": 0.0,
        "rows": 10,
    }


def test_drift_store_keeps_references_windows_reports_and_results(drift_store: Any) -> None:
    s = drift_store
    assert s.reference("iris", "1.0.0") is None
    s.put_reference("iris", "1.0.0", '{"ref": 1}', 150)
    s.put_reference("iris", "1.0.0", '{"ref": 2}', 150)
    assert s.reference("iris", "1.0.0") == '{"ref": 2}'
    ident = {k: v for k, v in _key(1).items() if k not in ("window", "rows")}
    assert not s.seen(ident)
    s.save_windows([_window(0.0, 1)], [_key(1)])
    assert s.seen(ident)
    s.save_windows([_window(0.0, 2), _window(3600.0, 1)], [_key(2), _key(3, 3700.0)])
    assert s.window("iris", "1.0.0", 0.0)["revision"] == 2
    assert s.window("iris", "1.0.0", 7200.0) is None
    assert s.latest_window("iris", "1.0.0", 5000.0)["window"] == 3600.0
    assert s.latest_window("iris", "1.0.0", 100.0)["window"] == 0.0
    with pytest.raises((StorageError, sqlite3.IntegrityError)):  # merged once, or not at all
        s.save_windows([_window(0.0, 9)], [_key(1)])
    assert s.window("iris", "1.0.0", 0.0)["revision"] == 2
    s.mark_window("iris", "1.0.0", 0.0, evaluated_revision=2, alerted=1)
    w = s.window("iris", "1.0.0", 0.0)
    assert (w["evaluated_revision"], w["alerted"]) == (2, 1)
    for t in (1.0, 2.0):
        s.add_result(
            {
                "model": "iris",
                "version": "1.0.0",
                "window": 0.0,
                "evaluated_at": t,
                "rows": 20,
                "drifted_share": 0.5,
                "dataset_drift": 1,
                "features": json.dumps([{"name": "x", "drift": True}]),
            }
        )
    res = s.results("iris", None, 5)
    assert [r["evaluated_at"] for r in res] == [2.0, 1.0]
    assert res[0]["dataset_drift"] is True and res[0]["features"] == [{"name": "x", "drift": True}]
    assert s.results("other", None, 5) == []
    s.put_reference("digits", "2", "{}", 1)
    assert s.model_versions() == [("digits", "2"), ("iris", "1.0.0")]


def test_drift_results_page_newest_first_to_the_end(drift_store: Any) -> None:
    for i, t in enumerate((1.0, 2.0, 2.0, 3.0, 5.0)):  # two results share evaluated_at
        drift_store.add_result(
            {
                "model": "iris" if i != 3 else "other",
                "version": "1.0.0",
                "window": 0.0,
                "evaluated_at": t,
                "rows": i,
                "drifted_share": 0.0,
                "dataset_drift": 0,
                "features": "[]",
            }
        )
    full = drift_store.results("iris", None, 100)
    paged = all_pages(lambda c: drift_store.results_page("iris", None, 1, c))
    assert paged == full and [r["rows"] for r in paged] == [4, 2, 1, 0]
    with pytest.raises(InvalidInput):
        drift_store.results_page(None, None, 2, "WyJldmVudHMiLFsxXV0")


# filtered and backward device pages (the API's filters, the dashboard's previous link) -------
def _fleet_of(repo: Repository, n: int) -> list[str]:
    ids = [f"d{i:03d}" for i in range(n)]
    for i, d in enumerate(ids):
        repo.upsert_device(
            d,
            profile="pi" if i % 3 == 0 else "host",
            online=i % 2,
            version="2" if i % 4 == 0 else "1",
            tags=["lab"] if i % 2 == 0 else ["lab-2", 'q"uote'],
            manual_tags=["canary"] if i % 5 == 0 else [],
        )
    return ids


@pytest.mark.parametrize(
    "filters",
    [
        {"profile": "pi"},
        {"online": True},
        {"online": False, "version": "2"},
        {"tag": "lab"},
        {"tag": "canary"},
        {"tag": 'q"uote'},
        {"tag": "la"},
        {"tag": "lab", "profile": "host"},
    ],
)
def test_device_pages_filter_like_the_listing(repo: Repository, filters: dict[str, Any]) -> None:
    _fleet_of(repo, 30)

    def keep(d: dict[str, Any]) -> bool:
        return (
            ("profile" not in filters or d["profile"] == filters["profile"])
            and ("version" not in filters or d["version"] == filters["version"])
            and ("online" not in filters or d["online"] == filters["online"])
            and ("tag" not in filters or filters["tag"] in d["tags"])
        )

    expected = [d for d in repo.list_devices() if keep(d)]
    assert all_pages(lambda c: repo.devices_page(4, c, **filters)) == expected


def test_device_pages_walk_back_with_before(repo: Repository) -> None:
    ids = _fleet_of(repo, 11)
    forward = [repo.devices_page(4)]
    while forward[-1].next_cursor:
        forward.append(repo.devices_page(4, forward[-1].next_cursor))
    assert [len(p.items) for p in forward] == [4, 4, 3]
    assert forward[0].prev_cursor is None and all(p.prev_cursor for p in forward[1:])
    back = repo.devices_page(4, before=forward[2].prev_cursor)
    assert back.items == forward[1].items and back.next_cursor == forward[1].next_cursor
    first = repo.devices_page(4, before=back.prev_cursor)
    assert [d["device_id"] for d in first.items] == ids[:4] and first.prev_cursor is None
    online = repo.devices_page(2, before=forward[2].prev_cursor, online=True)
    assert [d["device_id"] for d in online.items] == ["d005", "d007"]


@pytest.mark.parametrize(
    ("kind", "values"),
    [("events", [2**63]), ("audit", [-(2**64)]), ("bundles", [1e400, "a"]), ("drift", [1, 2**70])],
)
def test_a_cursor_value_no_column_can_hold_is_refused(
    repo: Repository, kind: str, values: list[Any]
) -> None:
    import base64

    raw = json.dumps([kind, values]).replace("Infinity", "1e400")
    forged = base64.urlsafe_b64encode(raw.encode()).decode()
    read = {
        "events": repo.events_page,
        "audit": repo.audit_page,
        "bundles": repo.bundles_page,
        "drift": lambda limit, cursor: DRIFT.decode(cursor),
    }[kind]
    with pytest.raises(InvalidInput) as err:
        read(5, forged)
    assert err.value.field == "cursor"


@settings(
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    changes=st.lists(
        st.tuples(
            st.integers(0, 5),  # which device
            st.fixed_dictionaries(
                {},
                optional={
                    "profile": st.sampled_from([None, "", "host", "pi"]),
                    "model": st.sampled_from([None, "iris", "digits"]),
                    "version": st.sampled_from([None, "1.0.0", "2.0.0"]),
                    "online": st.sampled_from([None, 0, 1, True, False]),
                    "last_seen": st.floats(0, 10),
                },
            ),
        ),
        min_size=1,
        max_size=25,
    )
)
def test_trigger_kept_counts_follow_every_device_change(
    new_repo: Factory, changes: list[tuple[int, dict[str, Any]]]
) -> None:
    """The overview's counts are kept by triggers (migration 8) as devices register, move
    between versions, go on and offline: after every write they equal a recount."""
    repo = new_repo()
    for i, fields in changes:
        repo.upsert_device(f"d{i}", **fields)
        assert repo.device_counts() == _counts_by_listing(repo.list_devices())


def test_a_registry_from_before_the_count_table_counts_its_devices(tmp_path: Path) -> None:
    """Migration 8 fills the count table from the devices already registered."""
    path = tmp_path / "old.db"
    repo = SQLiteRepository(path)
    repo.close()
    db = sqlite3.connect(path)
    with db:
        for t in ("devices_count_insert", "devices_count_delete", "devices_count_update"):
            db.execute(f'drop trigger "{t}"')
        db.execute('drop table "device_count_groups"')
        db.execute('alter table "rollout_devices" drop column "doc"')  # migration 10
        db.execute("delete from schema_version where version > 7")
        db.executemany(
            "insert into devices (device_id, profile, model, version, online) values (?,?,?,?,?)",
            [
                ("a", "host", "iris", "1.0.0", 1),
                ("b", None, None, None, None),
                ("c", "host", "iris", "1.0.0", 0),
            ],
        )
    db.close()
    repo = SQLiteRepository(path)
    try:
        assert repo.schema_version() == len(migrations.SQLITE)
        assert repo.device_counts() == _counts_by_listing(repo.list_devices())
        assert repo.device_counts()["devices"] == 3
    finally:
        repo.close()
