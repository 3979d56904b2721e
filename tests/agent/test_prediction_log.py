from __future__ import annotations

import csv
import io
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from agent.config import LogConfig
from agent.events import PredictionEvent
from agent.prediction_log import PredictionLog, export, read_rows
from protocol.feeds import Prediction
from protocol.messages import ModelRef
from tests.agent.agent_env import IRIS_ROW, make_device
from tests.support.bundles import make_bundle

REF = ModelRef(name="iris", version="1.0.0", release=1)
REPO = Path(__file__).resolve().parents[2]


def _event(i: int, ts: float | None = None, width: int = 4) -> PredictionEvent:
    rows = np.full((1, width), float(i))
    pred = Prediction(labels=[i % 3], probabilities=np.array([[0.2, 0.3, 0.5]]))
    return PredictionEvent(ts or time.time(), f"req-{i}", REF, rows, pred, 0.5, None, False)


def _count(path: Path) -> int:
    con = sqlite3.connect(path)
    try:
        return con.execute("SELECT COUNT(*) FROM predictions").fetchone()[0]
    finally:
        con.close()


def test_predictions_are_logged_with_inputs_outputs_and_model(tmp_path: Path, signing_key) -> None:
    dev = make_device(tmp_path, signing_key)
    dev.installer.install_bytes(make_bundle(signing_key)[0])
    with PredictionLog(tmp_path / "p.db") as plog:
        dev.predictor.add_observer(plog)
        res = dev.predictor.predict([IRIS_ROW, IRIS_ROW])
        assert plog.flush()
    rows = read_rows(tmp_path / "p.db")
    assert len(rows) == 1
    row = rows[0]
    assert row["request_id"] == res.request_id
    assert (row["model"], row["version"], row["release"]) == ("iris", "1.0.0", 1)
    assert json.loads(row["inputs"]) == [IRIS_ROW, IRIS_ROW]
    assert json.loads(row["outputs"])["labels"] == res.labels
    assert row["latency_ms"] == pytest.approx(res.latency_ms)


def test_database_uses_wal(tmp_path: Path) -> None:
    with PredictionLog(tmp_path / "p.db") as plog:
        plog.on_prediction(_event(1))
        plog.flush()
    con = sqlite3.connect(tmp_path / "p.db")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()


def test_a_full_queue_drops_and_counts_instead_of_blocking(tmp_path: Path) -> None:
    plog = PredictionLog(tmp_path / "p.db", LogConfig(queue_size=2))  # writer not started
    for i in range(5):
        plog.on_prediction(_event(i))
    assert plog.stats.queued == 2 and plog.stats.dropped == 3


def test_shadow_events_are_not_logged(tmp_path: Path) -> None:

    with PredictionLog(tmp_path / "p.db") as plog:
        plog.on_prediction(_event(1)._replace(shadow=True))
        plog.on_prediction(_event(2))
        plog.flush()
    assert [r["request_id"] for r in read_rows(tmp_path / "p.db")] == ["req-2"]


def test_retention_keeps_the_newest_max_rows(tmp_path: Path) -> None:
    with PredictionLog(tmp_path / "p.db", LogConfig(max_rows=10, batch_size=7)) as plog:
        for i in range(50):
            plog.on_prediction(_event(i))
        plog.flush()
    ids = [r["request_id"] for r in read_rows(tmp_path / "p.db")]
    assert ids == [f"req-{i}" for i in range(40, 50)]


def test_retention_drops_rows_older_than_max_age(tmp_path: Path) -> None:
    old = time.time() - 3 * 86400
    with PredictionLog(tmp_path / "p.db", LogConfig(max_age_days=1)) as plog:
        for i in range(5):
            plog.on_prediction(_event(i, ts=old))
        plog.on_prediction(_event(99))
        plog.flush()
    assert [r["request_id"] for r in read_rows(tmp_path / "p.db")] == ["req-99"]


def test_retention_keeps_the_newest_row_so_ids_never_repeat(tmp_path: Path) -> None:
    """With no AUTOINCREMENT, SQLite reuses the largest id once that row is gone; a reader
    following the log by id would then miss rows. Retention therefore never takes it."""
    path = tmp_path / "p.db"
    old = time.time() - 3 * 86400
    with PredictionLog(path, LogConfig(max_age_days=1)) as plog:
        for i in range(4):
            plog.on_prediction(_event(i, ts=old))
        plog.flush()
        rows = read_rows(path)
        assert [r["request_id"] for r in rows] == ["req-3"]  # too old, but the newest
        last_id = rows[0]["id"]
        plog.on_prediction(_event(4))
        plog.flush()
    rows = read_rows(path)
    assert [r["request_id"] for r in rows] == ["req-4"] and rows[0]["id"] == last_id + 1


def test_retention_bounds_logged_bytes(tmp_path: Path) -> None:
    with PredictionLog(tmp_path / "p.db", LogConfig(max_bytes=5000)) as plog:
        for i in range(100):
            plog.on_prediction(_event(i, width=64))  # ~330 bytes of JSON per row
        plog.flush()
    con = sqlite3.connect(tmp_path / "p.db")
    total, n = con.execute("SELECT SUM(nbytes), COUNT(*) FROM predictions").fetchone()
    con.close()
    assert total <= 5000 and 5 < n < 100
    assert read_rows(tmp_path / "p.db", last=1)[0]["request_id"] == "req-99"


def test_full_disk_is_counted_and_reported_while_serving_continues(
    tmp_path: Path, signing_key
) -> None:
    dev = make_device(tmp_path, signing_key)
    dev.installer.install_bytes(make_bundle(signing_key)[0])
    plog = PredictionLog(tmp_path / "p.db", LogConfig(batch_size=50), max_pages=8).start()
    try:
        dev.predictor.add_observer(plog)
        wide = [[float(i)] * 4 for i in range(1000)]
        for _ in range(20):
            dev.predictor.predict(wide)  # ~20 kB of JSON per row: the 8-page database overflows
            plog.flush()
        assert plog.stats.write_errors > 0
        assert plog.conditions() == ["disk_full"]
        assert dev.predictor.predict([IRIS_ROW]).labels is not None
    finally:
        plog.close()


def test_log_survives_sigkill_up_to_the_last_committed_batch(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from tests.agent.test_prediction_log import _event
        from agent.config import LogConfig
        from agent.prediction_log import PredictionLog
        config = LogConfig(flush_interval_s=30, batch_size=1000)
        plog = PredictionLog({str(tmp_path / "p.db")!r}, config).start()
        for i in range(200):
            plog.on_prediction(_event(i))
        assert plog.flush()
        print("flushed", flush=True)
        for i in range(200, 300):  # queued, never committed: the interval is 30 s
            plog.on_prediction(_event(i))
        print("queued", flush=True)
        time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "flushed"
        assert proc.stdout.readline().strip() == "queued"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    con = sqlite3.connect(tmp_path / "p.db")
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()
    ids = [r["request_id"] for r in read_rows(tmp_path / "p.db")]
    assert ids == [f"req-{i}" for i in range(200)]


def test_export_jsonl_and_csv_round_trip(tmp_path: Path) -> None:
    with PredictionLog(tmp_path / "p.db") as plog:
        for i in range(3):
            plog.on_prediction(_event(i))
        plog.flush()
    out = io.StringIO()
    assert export(tmp_path / "p.db", out, "jsonl") == 3
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["inputs"] for line in lines] == [[[0.0] * 4], [[1.0] * 4], [[2.0] * 4]]
    assert lines[2]["outputs"]["labels"] == [2]
    out = io.StringIO()
    assert export(tmp_path / "p.db", out, "csv") == 3
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert [r["request_id"] for r in rows] == ["req-0", "req-1", "req-2"]


def test_read_rows_tails_and_follows(tmp_path: Path) -> None:
    with PredictionLog(tmp_path / "p.db") as plog:
        for i in range(10):
            plog.on_prediction(_event(i))
        plog.flush()
    last3 = read_rows(tmp_path / "p.db", last=3)
    assert [r["request_id"] for r in last3] == ["req-7", "req-8", "req-9"]
    assert read_rows(tmp_path / "p.db", after_id=last3[-1]["id"]) == []
    assert _count(tmp_path / "p.db") == 10


def test_numeric_nan_and_mixed_rows_read_back_as_json(tmp_path: Path) -> None:
    nan_rows = np.array([[1.5, np.nan, -2.0]])
    mixed = np.array([[1.0, "red", None]], dtype=object)
    values = Prediction(values=np.array([[np.inf], [0.25]]))
    with PredictionLog(tmp_path / "p.db") as plog:
        plog.on_prediction(
            PredictionEvent(time.time(), "nan", REF, nan_rows, None, 1.0, "boom", True)
        )
        plog.on_prediction(
            PredictionEvent(time.time(), "mixed", REF, mixed, values, 1.0, None, False)
        )
        plog.flush()
    first, second = read_rows(tmp_path / "p.db")
    assert json.loads(first["inputs"]) == [[1.5, None, -2.0]]
    assert first["outputs"] is None and first["error"] == "boom" and first["fallback"] == 1
    assert json.loads(second["inputs"]) == [[1.0, "red", None]]
    assert json.loads(second["outputs"]) == {"values": [[None], [0.25]]}


@given(
    hnp.arrays(
        np.float64,
        hnp.array_shapes(min_dims=2, max_dims=2, max_side=6),
        elements=st.floats(allow_nan=True, allow_infinity=True, width=64),
    )
)
def test_logged_numeric_inputs_round_trip_to_json(rows: np.ndarray) -> None:
    from agent.prediction_log import _decode_inputs, _encode_inputs

    data, fmt = _encode_inputs(rows)
    back = json.loads(_decode_inputs(data, fmt))
    want = [[v if math.isfinite(v) else None for v in row] for row in rows.tolist()]
    assert back == want


def test_packed_outputs_read_back_as_the_json_encoder_writes_them() -> None:
    """Outputs are stored as bytes where they can be; every reader must still see exactly
    the JSON the plain encoder writes (rounded, non-finite as null, strings as strings)."""
    from agent.prediction_log import _encode_outputs, _pack_outputs, _unpack_outputs

    rng = np.random.default_rng(3)
    preds = [
        Prediction(labels=[1], probabilities=rng.random((1, 3))),
        Prediction(labels=[0, 2], probabilities=rng.random((2, 3)) * 1e-7),  # rounds to 0.0
        Prediction(labels=[5], probabilities=np.array([[np.nan, 0.5, np.inf]])),
        Prediction(labels=[3], probabilities=rng.random((1, 5)).astype(np.float32)),
        Prediction(labels=["setosa"], probabilities=rng.random((1, 3))),
        Prediction(labels=[True], probabilities=rng.random((1, 3))),
        Prediction(labels=[2**70], probabilities=rng.random((1, 3))),  # beyond int64
        Prediction(values=rng.random((2, 1)) * 1e6),
        Prediction(values=np.array([[1.5, np.nan]], dtype=np.float32)),
        Prediction(labels=[7]),
        Prediction(labels=[7, 8], probabilities=rng.random((1, 3))),  # inconsistent: JSON
        None,
        Prediction(labels=[-4], probabilities=np.array([[-0.0, 1.0, 123456.7654321]])),
    ]
    formats = []
    for pred in preds:
        data, fmt = _pack_outputs(pred)
        formats.append(fmt.split(":")[0])
        assert _unpack_outputs(data, fmt) == _encode_outputs(pred), pred
    assert formats.count("c") == 6 and formats.count("v") == 2  # the rest went as JSON


def test_a_log_written_before_outputs_were_packed_still_reads_and_grows(tmp_path: Path) -> None:
    path = tmp_path / "p.db"
    old = sqlite3.connect(path)
    old.executescript(
        """CREATE TABLE predictions (
            id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, request_id TEXT NOT NULL,
            model TEXT NOT NULL, version TEXT NOT NULL, release INTEGER NOT NULL,
            inputs BLOB NOT NULL, inputs_format TEXT NOT NULL DEFAULT 'json', outputs TEXT,
            latency_ms REAL NOT NULL, error TEXT, fallback INTEGER NOT NULL DEFAULT 0,
            nbytes INTEGER NOT NULL);
        """
    )
    old.execute(
        "INSERT INTO predictions(ts, request_id, model, version, release, inputs, outputs,"
        " latency_ms, nbytes) VALUES (?, 'old-1', 'm', '1.0.0', 1, '[[1.0]]',"
        " '{\"labels\":[1]}', 0.5, 20)",
        (time.time(),),
    )
    old.commit()
    old.close()
    with PredictionLog(path) as plog:
        plog.on_prediction(_event(2))
        plog.flush()
    rows = read_rows(path)
    assert [r["request_id"] for r in rows] == ["old-1", "req-2"]
    assert json.loads(rows[0]["outputs"]) == {"labels": [1]}
    assert json.loads(rows[1]["outputs"]) == {"labels": [2], "probabilities": [[0.2, 0.3, 0.5]]}


def test_byte_retention_keeps_a_running_total_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "p.db"
    with PredictionLog(path, LogConfig(max_bytes=5000)) as plog:
        for i in range(10):
            plog.on_prediction(_event(i, width=64))
        plog.flush()
    with PredictionLog(path, LogConfig(max_bytes=5000)) as plog:  # total read back at start
        for i in range(10, 40):
            plog.on_prediction(_event(i, width=64))
        plog.flush()
        con = sqlite3.connect(path)
        total, n = con.execute("SELECT SUM(nbytes), COUNT(*) FROM predictions").fetchone()
        con.close()
        assert plog._bytes == total
    assert total <= 5000 and 5 < n < 40
    assert total + total // n > 5000  # equal rows: no row was deleted that would fit
