"""The SQLite outbox: ordered at-least-once delivery, bounded by merging, never losing status."""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import pytest

from agent.outbox import Outbox
from protocol.messages import CommandStatus, MetricsReport, ModelRef, SketchReport, decode
from protocol.sketches import SketchBuilder
from protocol.transport import MemoryBroker

MODEL = ModelRef(name="iris", version="1.0.0", release=1)


def sketch_report(seq: int, start: float, rows: int = 200, version: str = "1.0.0") -> SketchReport:
    b = SketchBuilder()
    rng = np.random.default_rng(seq)
    for j in range(4):
        b.update_numeric(f"f{j}", rng.normal(size=rows))
    b.rows = rows
    return SketchReport(
        device_id="dev-1",
        model=MODEL.model_copy(update={"version": version}),
        seq=seq,
        window_start=datetime.fromtimestamp(start, tz=timezone.utc),
        window_end=datetime.fromtimestamp(start + 60, tz=timezone.utc),
        sketches=b.build(),
    )


def metrics_report(seq: int) -> MetricsReport:
    t = datetime.fromtimestamp(1000 + seq, tz=timezone.utc)
    return MetricsReport(device_id="dev-1", seq=seq, window_start=t, window_end=t, requests=seq)


def status(i: int) -> CommandStatus:
    return CommandStatus(device_id="dev-1", command_id=f"c{i}", state="accepted", seq=i)


def test_flush_publishes_in_order_and_deletes_only_acknowledged(tmp_path):
    broker = MemoryBroker()
    sub = broker.client("server")
    got: list[str] = []
    sub.set_handler(lambda t, p: got.append(decode(CommandStatus, p).command_id))
    sub.connect()
    sub.subscribe("x/#")
    ob = Outbox(tmp_path / "o.db", 10**6)
    for i in range(5):
        ob.put_message("status", "x/status", status(i))
    dev = broker.client("dev-1")
    assert ob.flush(dev) == 0  # not connected: nothing leaves, nothing is deleted
    assert ob.count() == 5
    dev.connect()
    assert ob.flush(dev) == 5
    assert got == [f"c{i}" for i in range(5)]
    assert ob.count() == 0


class _NoAck:
    client_id = "no-ack"

    def is_connected(self) -> bool:
        return True

    def publish(self, topic, payload, qos=1, retain=False):
        class D:
            def wait(self, timeout: float) -> bool:
                return False

        return D()


def test_unacknowledged_messages_stay_queued_and_survive_a_restart(tmp_path):
    ob = Outbox(tmp_path / "o.db", 10**6)
    ob.put_message("status", "x/status", status(1))
    ob.put_message("sketch", "x/sketch", sketch_report(0, 0))
    assert ob.flush(_NoAck(), timeout=0.01) == 0  # type: ignore[arg-type]
    ob.close()
    again = Outbox(tmp_path / "o.db", 10**6)
    assert [e.kind for e in again.pending()] == ["status", "sketch"]


def test_full_outbox_merges_old_sketch_windows_of_the_same_version_instead_of_dropping(tmp_path):
    one = len(sketch_report(0, 0).to_json())
    ob = Outbox(tmp_path / "o.db", max_bytes=int(one * 3.5))
    for i in range(8):
        assert ob.put_message("sketch", "x/sketch", sketch_report(i, 60.0 * i))
    reports = [decode(SketchReport, e.payload) for e in ob.pending()]
    assert ob.size_bytes() <= ob.max_bytes
    assert ob.stats.merged >= 1
    # Every row of every window is still accounted for, and windows cover the whole span.
    assert sum(r.sketches.rows for r in reports) == 8 * 200
    assert sum(r.merged_windows for r in reports) == 8
    assert min(r.window_start for r in reports).timestamp() == 0
    assert max(r.window_end for r in reports).timestamp() == 7 * 60 + 60
    merged = [r for r in reports if r.merged_windows > 1]
    assert merged and all(
        r.sketches.features["f0"].kll().n == 200 * r.merged_windows for r in merged
    )


def test_sketches_of_different_model_versions_are_never_merged_together(tmp_path):
    one = len(sketch_report(0, 0).to_json())
    ob = Outbox(tmp_path / "o.db", max_bytes=int(one * 2.5))
    for i in range(6):
        ob.put_message(
            "sketch", "x/sketch", sketch_report(i, 60.0 * i, version="1.0.0" if i % 2 else "2.0.0")
        )
    reports = [decode(SketchReport, e.payload) for e in ob.pending()]
    by_version = {r.model.version: r for r in reports}
    assert len(reports) == 2 and set(by_version) == {"1.0.0", "2.0.0"}
    assert by_version["1.0.0"].merged_windows == 3 and by_version["2.0.0"].merged_windows == 3


def test_metrics_are_thinned_only_once_sketches_cannot_merge_and_status_is_never_dropped(tmp_path):
    one = len(sketch_report(0, 0).to_json())
    ob = Outbox(tmp_path / "o.db", max_bytes=one + 4000)
    for i in range(10):
        ob.put_message("status", "x/status", status(i))
    ob.put_message("sketch", "x/sketch", sketch_report(0, 0))
    for i in range(40):
        ob.put_message("metrics", "x/metrics", metrics_report(i))
    ob.put_message("sketch", "x/sketch", sketch_report(1, 60))  # over budget again: merge first
    assert ob.count("status") == 10
    assert ob.count("sketch") == 1
    assert ob.stats.thinned > 0
    kept = [decode(MetricsReport, e.payload).seq for e in ob.pending(1000) if e.kind == "metrics"]
    assert kept and kept[-1] == 39  # the newest metrics report is kept
    assert "outbox_thinned" in ob.conditions()


def test_full_disk_is_caught_counted_and_reported(tmp_path):
    ob = Outbox(tmp_path / "o.db", max_bytes=10**9, max_page_count=12)
    results = [ob.put("status", "x/status", b"s" * 3000) for _ in range(12)]
    assert results[0] is True and results[-1] is False
    assert ob.stats.dropped_disk_full == results.count(False)
    assert "disk_full" in ob.conditions()
    assert ob.next_seq("sketch") == 0  # counters still work on a full database


def test_sequence_counters_are_monotonic_across_restarts(tmp_path):
    ob = Outbox(tmp_path / "o.db", 10**6)
    assert [ob.next_seq("sketch") for _ in range(3)] == [0, 1, 2]
    assert ob.next_seq("metrics") == 0
    ob.close()
    assert Outbox(tmp_path / "o.db", 10**6).next_seq("sketch") == 3


def test_command_ledger_remembers_handled_commands_across_restarts(tmp_path):
    ob = Outbox(tmp_path / "o.db", 10**6)
    assert ob.command_seen("c1") is None
    ob.record_command("c1", "deploy", "installed", b'{"state":"installed"}')
    ob.close()
    assert Outbox(tmp_path / "o.db", 10**6).command_seen("c1") == (
        "installed",
        b'{"state":"installed"}',
    )


def test_unknown_kind_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown outbox kind"):
        Outbox(tmp_path / "o.db", 10**6).put("bogus", "t", b"")


def test_windows_being_published_are_not_merged_so_none_is_lost_mid_flush(tmp_path):
    one = len(sketch_report(0, 0).to_json())
    ob = Outbox(tmp_path / "o.db", max_bytes=int(one * 2.5))
    ob.put_message("sketch", "x/sketch", sketch_report(0, 0))
    ob.put_message("sketch", "x/sketch", sketch_report(1, 60))
    delivered: list[SketchReport] = []
    more = iter(range(2, 8))

    class Racing:
        """Each publish lets telemetry close another window (which overflows the bound)."""

        client_id = "racing"

        def is_connected(self) -> bool:
            return True

        def publish(self, topic, payload, qos=1, retain=False):
            delivered.append(decode(SketchReport, payload))
            i = next(more, None)
            if i is not None:
                ob.put_message("sketch", "x/sketch", sketch_report(i, 60.0 * i))

            class D:
                def wait(self, timeout: float) -> bool:
                    return True

            return D()

    while ob.count():
        ob.flush(Racing(), batch=2)  # type: ignore[arg-type]
    assert sum(r.merged_windows for r in delivered) == 8
    assert sum(r.sketches.rows for r in delivered) == 8 * 200
