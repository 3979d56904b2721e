"""A full data disk: serving continues, the condition is reported, the outbox degrades as designed.

The disk is made "full" deterministically: SQLite's ``max_page_count`` caps the outbox and
the prediction log, and an injected writer raises ``OSError(ENOSPC)`` for downloads.
"""

from __future__ import annotations

import errno

import pytest

from agent import download
from agent.daemon import Agent
from protocol.messages import MetricsReport
from protocol.transport import MemoryBroker, TransportError
from tests.agent.agent_env import IRIS_ROW
from tests.agent.daemon_env import agent_config, preinstall
from tests.agent.fleet_sim import FleetSim, deploy_command, wait_for
from tests.agent.test_link import DEV, make_node
from tests.support.bundles import make_bundle, trained


def test_full_disk_keeps_serving_reports_disk_full_and_merges_windows(tmp_path, signing_key):
    broker = MemoryBroker(online=False)  # offline: everything must fit in the outbox
    cfg = agent_config(tmp_path, "mqtt://unused:1883", signing_key, DEV, window_rows=5)
    preinstall(cfg, signing_key)
    agent = Agent(
        cfg, transport=broker.client(DEV), serve_api=False, outbox_max_pages=12, log_max_pages=12
    )
    agent.start()
    try:
        X = trained("iris-logreg").X
        answers = [agent.predictor.predict([X[i % 150].tolist()]) for i in range(600)]
        assert len(answers) == 600 and all(a.labels for a in answers)  # serving never stopped
        agent.telemetry.drain()
        assert agent.prediction_log is not None and agent.prediction_log.flush()
        agent.metrics.observe_conditions()  # what the pump does every tick, made explicit
        stats = agent.outbox.stats
        assert stats.merged > 0  # old windows were merged before anything was refused
        # The broker comes back: what the outbox kept is delivered, and the server learns
        # about the full disk from a metrics report.
        server = broker.client("server")
        sim = FleetSim(server, DEV)
        with pytest.raises(TransportError):
            server.connect()  # the broker is down; it reconnects the server first when it is back
        broker.clients.insert(0, broker.clients.pop())
        broker.set_online(True)
        agent.publish_metrics()
        agent.link.wake.set()
        (report,) = wait_for(lambda: sim.metrics)
        # The log's own disk_full flag clears when a later batch fits again; its write errors
        # are latched until reported.
        assert "log_write_error" in report.conditions
        wait_for(lambda: agent.outbox.count() == 0)
        delivered = sum(r.merged_windows for r in sim.sketches)
        refused = stats.dropped_disk_full
        assert delivered > 0 and delivered + agent.lost_reports + refused >= agent.sketcher.closed
        assert all(isinstance(m, MetricsReport) for m in sim.metrics)
    finally:
        agent.stop(timeout=1)


def test_download_hitting_enospc_fails_with_disk_full_and_the_old_model_keeps_serving(
    tmp_path, signing_key, monkeypatch
):
    broker = MemoryBroker()
    server = broker.client("server")
    server.connect()
    sim = FleetSim(server, DEV)
    node = make_node(tmp_path, signing_key, broker)
    node.device.installer.install_bytes(make_bundle(signing_key)[0])
    node.link.start()

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(download, "_atomic_write", full)
    bundle, manifest = make_bundle(signing_key, version="2.0.0", release=2)
    cmd = deploy_command(DEV, bundle, manifest, signing_key)
    sim.send(cmd)
    sim.send_chunks(bundle, cmd)
    node.link.flush(timeout=0.1)
    last = sim.last(cmd.command_id)
    assert (last.state, last.reason) == ("failed", "disk_full")
    assert node.device.predictor.predict([IRIS_ROW]).model.version == "1.0.0"


@pytest.mark.parametrize("where", ["outbox", "log"])
def test_a_full_database_never_raises_into_the_request_path(tmp_path, signing_key, where):
    cfg = agent_config(tmp_path, "mqtt://unused:1883", signing_key, DEV, window_rows=2)
    preinstall(cfg, signing_key)
    pages = {"outbox_max_pages": 8} if where == "outbox" else {"log_max_pages": 8}
    broker = MemoryBroker(online=False)
    with Agent(cfg, transport=broker.client(DEV), serve_api=False, **pages) as agent:
        for _ in range(300):
            assert agent.predictor.predict([IRIS_ROW]).labels
        agent.telemetry.drain()
        if agent.prediction_log is not None:
            agent.prediction_log.flush()
        (report,) = agent.metrics.report()
        expected = "disk_full" if where == "outbox" else "log_write_error"
        assert expected in report.conditions
        assert agent.predictor.stats.observer_errors == 0
