"""Two fleet servers on one PostgreSQL registry see one set of measures: field benchmarks,
labelled feedback and drift per device, whichever process a report reached (and a report
delivered to both counts once).

Needs PostgreSQL's server binaries (skipped, with the reason, without them).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from fleet_server.config import RegistrySection
from fleet_server.measure_store_pg import PgBenchStore, PgCohortStore, PgFeedbackStore
from fleet_server.service import FleetService
from protocol import KeyPair
from protocol.messages import CommandStatus, LatencySummary, MetricsReport, ModelRef, SketchReport
from protocol.sketches import SketchBuilder
from tests.fleet_server.fleetkit import make_config
from tests.support.bundles import make_bundle

pytestmark = pytest.mark.postgres

REF = ModelRef(name="iris", version="1.0.0", release=1)
T0 = 1_700_000_000.0  # windows before "now": drift_by evaluates up to the clock


@pytest.fixture
def two_servers(
    tmp_path: Path, signing_key: KeyPair, postgres_url: str
) -> Iterator[tuple[FleetService, FleetService]]:
    services = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        cfg = make_config(tmp_path / name, signing_key)
        cfg = cfg.model_copy(update={"registry": RegistrySection(url=postgres_url, pool_size=4)})
        services.append(FleetService(cfg))
    try:
        yield services[0], services[1]
    finally:
        for s in services:
            s.measures.stores.close()
            s.repo.close()


def metrics(device: str, seq: int, acc: float) -> MetricsReport:
    end = datetime.fromtimestamp(T0 + seq, timezone.utc)
    return MetricsReport(
        device_id=device,
        seq=seq,
        window_start=end,
        window_end=end,
        model=REF,
        requests=40,
        feedback_count=40,
        accuracy=acc,
        latency=LatencySummary(count=40, p95_ms=2.0),
    )


def sketch(device: str, seq: int, n: int) -> SketchReport:
    b = SketchBuilder()
    b.update_numeric("petal_length", np.random.default_rng(seq).normal(0.0, 1.0, n))
    b.rows = n
    start = datetime.fromtimestamp(T0 + seq, timezone.utc)
    return SketchReport(
        device_id=device,
        model=REF,
        window_start=start,
        window_end=start,
        seq=seq,
        sketches=b.build(),
    )


def test_the_measures_live_in_postgresql_not_in_each_data_dir(
    two_servers: tuple[FleetService, FleetService], tmp_path: Path
) -> None:
    for s, name in zip(two_servers, ("a", "b"), strict=True):
        assert isinstance(s.measures.bench_store, PgBenchStore)
        assert isinstance(s.measures.stores.feedback, PgFeedbackStore)
        assert isinstance(s.measures.stores.cohorts, PgCohortStore)
        assert s.measures.stores.cohorts.pool is s.repo.pool  # type: ignore[attr-defined]
        assert not (tmp_path / name / "fleet.db").exists()


def test_two_servers_on_one_postgresql_share_every_measure(
    two_servers: tuple[FleetService, FleetService], signing_key: KeyPair
) -> None:
    a, b = two_servers
    sha = a.upload_bundle(make_bundle(signing_key, version="1.0.0")[0])["sha256"]
    for dev in ("d1", "d2"):
        a.repo.upsert_device(dev, profile="host", tags=["lab"], online=True, **_runs())

    # a field benchmark a sent; the answer reaches b, and then a as well
    a.measures.bench_store.issue("fb1-d1", "d1", sha, T0)
    answer = {"p50_ms": 3.0, "estimated": False, "model": {"name": "iris", "version": "1.0.0"}}
    done = CommandStatus(device_id="d1", command_id="fb1-d1", state="done", result=answer)
    b.on_status(done)
    a.on_status(done)
    for s in (a, b):
        (sample,) = s.measures.bench_samples()
        assert sample["device_id"] == "d1" and sample["p50_ms"] == 3.0

    # labelled feedback split over the two, one window delivered to both
    a.on_metrics(metrics("d1", 1, 0.9))
    b.on_metrics(metrics("d2", 2, 0.7))
    b.on_metrics(metrics("d1", 1, 0.9))
    for s in (a, b):
        (row,) = s.measures.accuracy_report("iris")
        assert row["labelled"] == 80 and row["devices"] == 2
        assert row["value"] == pytest.approx(0.8)

    # one device's sketch reports split over the two: its window holds all of them
    a.on_sketch(sketch("d1", 10, 300))
    b.on_sketch(sketch("d1", 11, 500))
    a.on_sketch(sketch("d2", 12, 200))
    a.measures.flush()
    b.measures.flush()
    for s in (a, b):
        rows = {r["subject"]: r["rows"] for r in s.measures.drift_by("device", "iris", "1.0.0")}
        assert rows == {"d1": 800, "d2": 200}
    tags = b.measures.drift_by("tag", "iris", "1.0.0", evaluate=False)
    assert [(t["subject"], t["rows"]) for t in tags] == [("lab", 1000)]


def test_a_process_that_does_not_tick_still_writes_its_device_windows(
    two_servers: tuple[FleetService, FleetService],
    signing_key: KeyPair,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Only the process holding the rollout tick runs the measures' tick; another one writes
    what it merged from the ingest path once it has waited INGEST_FLUSH_AFTER_S."""
    import fleet_server.measures

    a, b = two_servers
    a.upload_bundle(make_bundle(signing_key, version="1.0.0")[0])
    a.repo.upsert_device("d1", profile="host", tags=[], online=True, **_runs())
    monkeypatch.setattr(fleet_server.measures, "INGEST_FLUSH_AFTER_S", 1e9)
    b.on_sketch(sketch("d1", 20, 400))
    assert a.measures.drift_by("device", "iris", "1.0.0") == []  # held in b's memory
    monkeypatch.setattr(fleet_server.measures, "INGEST_FLUSH_AFTER_S", 0.0)
    b.on_sketch(sketch("d1", 21, 100))
    rows = {r["subject"]: r["rows"] for r in a.measures.drift_by("device", "iris", "1.0.0")}
    assert rows == {"d1": 500}


def _runs() -> dict[str, str]:
    return {"model": "iris", "version": "1.0.0"}
