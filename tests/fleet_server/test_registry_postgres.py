"""The fleet server on a PostgreSQL registry: selection from fleet.toml, the API over it,
migrations under concurrency, and errors that name the problem without the password.

Needs PostgreSQL's server binaries (skipped, with the reason, without them).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet_server import migrations
from fleet_server.app import create_app
from fleet_server.config import FleetConfig, RegistrySection, example_config, parse_config
from fleet_server.delivery import chunk_size_for, n_chunks
from fleet_server.errors import ConfigError, StorageError
from fleet_server.repository import SQLiteRepository, open_repository
from fleet_server.repository_pg import PostgresRepository, redact
from fleet_server.service import FleetService
from protocol import KeyPair, TrustStore
from protocol.transport import MemoryBroker
from tests.fleet_server.fleetkit import Api, SimDevice, make_config
from tests.support.bundles import make_bundle

pytestmark = pytest.mark.postgres


def pg_config(tmp: Path, key: KeyPair, url: str) -> FleetConfig:
    cfg = make_config(tmp, key)
    return cfg.model_copy(update={"registry": RegistrySection(url=url, pool_size=4)})


def test_registry_url_selects_postgresql_and_its_absence_sqlite(
    tmp_path: Path, signing_key: KeyPair, postgres_url: str
) -> None:
    pg = open_repository(pg_config(tmp_path, signing_key, postgres_url))
    assert isinstance(pg, PostgresRepository)
    pg.close()
    lite = open_repository(make_config(tmp_path, signing_key))
    assert isinstance(lite, SQLiteRepository)
    lite.close()


def test_fleet_toml_registry_section_is_validated() -> None:
    cfg = parse_config('[registry]\nurl = "postgresql://fleet:pw@db:5432/edgefleet"\n')
    assert cfg.registry.url == "postgresql://fleet:pw@db:5432/edgefleet"
    assert "pw" not in repr(cfg.registry)
    assert parse_config("").registry.url is None
    assert parse_config(example_config()) == FleetConfig()  # the commented url stays off
    with pytest.raises(ConfigError) as err:
        parse_config('[registry]\nurl = "mysql://db/edgefleet"\n')
    assert err.value.field == "registry.url"


def test_an_unreachable_registry_is_a_storage_error_without_the_password() -> None:
    from tests.support.brokers import free_port

    url = f"postgresql://fleet:s3cret@127.0.0.1:{free_port()}/edgefleet"
    with pytest.raises(StorageError) as err:
        PostgresRepository(url, pool_size=1)
    assert "s3cret" not in str(err.value) and "cannot reach the registry" in str(err.value)
    assert redact("postgresql://u:p@h/db") == "postgresql://u:***@h/db"
    assert redact("host=h password=p dbname=x") == "host=h password=*** dbname=x"


def test_a_postgresql_outage_is_a_storage_error_and_a_restart_costs_no_failed_call() -> None:
    """Pooled connections are checked before use, so calls after a restart just work."""
    from tests.support.postgres import PostgresServer, why_unavailable

    if why_unavailable():
        pytest.skip(str(why_unavailable()))
    with PostgresServer() as server:
        repo = PostgresRepository(server.create_database(), pool_size=2, timeout_s=2.0)
        repo.upsert_device("d1", profile="host")
        server.restart()
        assert [d["device_id"] for d in repo.list_devices()] == ["d1"]
        server.halt()
        with pytest.raises(StorageError):
            repo.upsert_device("d2", profile="host")
        server.resume()
        for _ in range(15):  # after an outage the pool reconnects with a backoff: it comes back
            try:
                repo.upsert_device("d2", profile="host")
                break
            except StorageError:
                continue
        assert repo.device_counts()["devices"] == 2
        repo.close()


def test_processes_starting_together_migrate_the_database_once(postgres_url: str) -> None:
    errors: list[BaseException] = []
    repos: list[PostgresRepository] = []

    def open_one() -> None:
        try:
            repos.append(PostgresRepository(postgres_url, pool_size=1))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    rows = repos[0]._all("select version from schema_version order by version")
    assert [r["version"] for r in rows] == [m.version for m in migrations.POSTGRES]
    for r in repos:
        r.close()


def test_a_database_from_a_newer_edgefleet_is_refused_unchanged(postgres_url: str) -> None:
    repo = PostgresRepository(postgres_url, pool_size=1)
    with repo.pool.connection() as conn:
        conn.execute("insert into schema_version values (99, 'from the future', 0)")
    repo.close()
    with pytest.raises(StorageError, match="schema version 99"):
        PostgresRepository(postgres_url, pool_size=1)


class PgFleet:
    def __init__(self, tmp: Path, key: KeyPair, url: str) -> None:
        self.broker = MemoryBroker()
        self.key = key
        self.service = FleetService(
            pg_config(tmp, key, url), transport=self.broker.client("server")
        )
        assert isinstance(self.service.repo, PostgresRepository)
        assert self.service.bridge is not None
        self.service.bridge.start()
        self.service.transport.connect()  # type: ignore[union-attr]
        self.api = Api(create_app(self.service))
        self.admin = self.api.as_(self.service.create_token("admin", name="admin"))

    def device(self, device_id: str, **kw: Any) -> SimDevice:
        trust = TrustStore.from_keys([self.key.public])
        return SimDevice(device_id, self.broker.client(device_id), trust, **kw).start()


@pytest.fixture
def pg_fleet(tmp_path: Path, signing_key: KeyPair, postgres_url: str) -> Iterator[PgFleet]:
    f = PgFleet(tmp_path, signing_key, postgres_url)
    yield f
    f.service.repo.close()


def test_the_api_serves_devices_bundles_and_a_rollout_from_postgresql(
    pg_fleet: PgFleet, signing_key: KeyPair, tmp_path: Path, postgres_url: str
) -> None:
    f = pg_fleet
    for i in range(4):
        f.device(f"pi-{i}", profile="host", tags=("lab",) if i < 2 else ())
    devices = f.admin.get("/v1/devices")
    assert devices.status_code == 200, devices.text
    assert [d["device_id"] for d in devices.json()["items"]] == ["pi-0", "pi-1", "pi-2", "pi-3"]
    assert [
        d["device_id"] for d in f.admin.get("/v1/devices", params={"tag": "lab"}).json()["items"]
    ] == [
        "pi-0",
        "pi-1",
    ]
    data, _ = make_bundle(signing_key, version="1.0.0", release=1, profiles=("host",))
    up = f.admin.post("/v1/bundles", content=data)
    assert up.status_code in (200, 201), up.text
    assert f.service.drift is not None and f.service.drift.reference("iris", "1.0.0") is not None
    r = f.admin.post(
        "/v1/rollouts", json={"bundle": "iris@1.0.0", "stages": [50, 100]}, params={"start": "true"}
    )
    assert r.status_code == 201, r.text
    rid = r.json()["rollout_id"]
    for _ in range(5):
        f.service.tick()
    status = f.admin.get(f"/v1/rollouts/{rid}").json()
    assert status["state"] == "succeeded"
    assert {d["state"] for d in status["devices"]} == {"installed"}
    overview = f.admin.get("/v1/overview").json()
    assert overview["devices"] == 4 and overview["by"]["version"] == {"iris 1.0.0": 4}
    assert f.service.repo.device_counts()["by"] == overview["by"]
    assert any(e["kind"] == "stage" for e in f.admin.get("/v1/events").json()["items"])
    f.service.flush()

    # a second server process on the same database sees everything the first recorded
    (tmp_path / "b").mkdir()
    other = FleetService(pg_config(tmp_path / "b", signing_key, postgres_url))
    try:
        assert other.drift is not None and other.drift.reference("iris", "1.0.0") is not None
        assert [d["device_id"] for d in other.repo.list_devices()] == [
            "pi-0",
            "pi-1",
            "pi-2",
            "pi-3",
        ]
        assert other.repo.get_rollout(rid)["state"] == "succeeded"  # type: ignore[index]
        assert (
            Api(create_app(other))
            .as_(other.create_token("viewer", name="v"))
            .get("/v1/devices")
            .status_code
            == 200
        )
    finally:
        other.repo.close()


def test_the_drift_engine_merges_evaluates_and_alerts_from_postgresql(postgres_url: str) -> None:
    import numpy as np

    from fleet_server.drift import DriftConfig, DriftEngine
    from fleet_server.drift_store_pg import PgDriftStore
    from tests.fleet_server.test_drift import T0, report, sketch_rows

    repo = PostgresRepository(postgres_url, pool_size=2)
    try:
        alerts: list[Any] = []
        eng = DriftEngine(PgDriftStore(repo.pool), DriftConfig(), alerts.append)
        eng.register_reference("m", "1.0", sketch_rows(np.random.default_rng(1), 3000))
        shifted = sketch_rows(np.random.default_rng(2), 1000, shift=0.5)
        assert eng.ingest(report(shifted, device="a"))
        assert eng.ingest(report(shifted, device="b"))
        eng.flush()
        assert eng.ingest(report(shifted, device="a")) is False  # a redelivery counts once
        result = eng.evaluate("m", "1.0", now=T0 + 10)
        assert result is not None and result.rows == 2000 and result.dataset_drift
        assert len(alerts) == 1
        assert eng.evaluate("m", "1.0", now=T0 + 20) is not None and len(alerts) == 1

        # another process on the same database: same reference, same seen reports, results
        other = DriftEngine(PgDriftStore(repo.pool), DriftConfig(), alerts.append)
        assert other.reference("m", "1.0") is not None
        assert other.ingest(report(shifted, device="b")) is False
        assert [r["rows"] for r in other.results("m", "1.0", 5)] == [2000]
        assert [(r.model, r.version) for r in other.evaluate_all(now=T0 + 30)] == [("m", "1.0")]
        assert len(alerts) == 1  # the window was already alerted, in the database
    finally:
        repo.close()


def test_a_bundle_uploaded_to_one_server_is_published_and_served_by_another(
    pg_fleet: PgFleet, signing_key: KeyPair, tmp_path: Path, postgres_url: str
) -> None:
    """Two server processes on one PostgreSQL, each with its own data_dir: the second has
    never seen the bundle's file, fetches it from the registry, publishes its chunks once
    and serves HTTP range requests for it."""
    import hashlib

    data, _ = make_bundle(signing_key, version="3.0.0", release=3, profiles=("host",))
    sha = hashlib.sha256(data).hexdigest()
    assert pg_fleet.admin.post("/v1/bundles", content=data).status_code in (200, 201)
    (tmp_path / "b").mkdir()
    other = FleetService(
        pg_config(tmp_path / "b", signing_key, postgres_url),
        transport=pg_fleet.broker.client("server-b"),
    )
    try:
        assert not other.artifacts.path(sha).exists()  # its own data_dir
        assert other.bridge is not None
        other.bridge.start()
        other.transport.connect()  # type: ignore[union-attr]
        devs = [pg_fleet.device(f"b-{i}") for i in range(3)]
        api = Api(create_app(other)).as_(other.create_token("admin", name="b-admin"))
        r = api.post(
            "/v1/rollouts", json={"bundle": "iris@3.0.0", "stages": [100]}, params={"start": "true"}
        )
        assert r.status_code == 201, r.text
        assert other.artifacts.fetched == 1 and other.artifacts.path(sha).read_bytes() == data
        assert all(d.model is not None and d.model.version == "3.0.0" for d in devs)
        assert other.sender is not None and other.sender.publishes[sha] == n_chunks(
            len(data), chunk_size_for(len(data), other.config.rollout.chunk_bytes)
        )
        got = api.get(f"/v1/artifacts/{sha}", headers={"Range": "bytes=100-"})
        assert got.status_code == 206 and got.content == data[100:]
        assert hashlib.sha256(api.get(f"/v1/artifacts/{sha}").content).hexdigest() == sha
    finally:
        other.repo.close()


def test_artifact_bytes_that_do_not_match_their_sha256_are_not_cached(
    pg_fleet: PgFleet, signing_key: KeyPair, tmp_path: Path, postgres_url: str
) -> None:
    from fleet_server.artifacts import ArtifactStore

    repo = pg_fleet.service.repo
    sha = "ab" * 32
    assert repo.put_artifact(sha, 5, iter([b"wrong"]))
    store = ArtifactStore(tmp_path / "c", repo)
    with pytest.raises(StorageError, match="does not match"):
        store.get(sha)
    assert not store.path(sha).exists()
    assert [p.name for p in store.root.iterdir()] == []  # no temp file left behind
