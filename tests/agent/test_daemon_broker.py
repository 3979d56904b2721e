"""The whole agent on real brokers (amqtt in-process; Mosquitto when installed)."""

from __future__ import annotations

import threading

import httpx
import pytest

from agent.daemon import Agent
from tests.agent.agent_env import IRIS_ROW
from tests.agent.daemon_env import agent_config, preinstall, server
from tests.agent.fleet_sim import deploy_command, wait_for
from tests.support.brokers import MOSQUITTO, EmbeddedBroker, Mosquitto, free_port
from tests.support.bundles import make_bundle, trained

pytestmark = pytest.mark.slow


def predict(agent: Agent, rows) -> dict:
    r = httpx.post(f"{agent.api_url}/v1/predict", json={"inputs": rows}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def test_birth_is_retained_and_the_broker_publishes_the_last_will(
    tmp_path, broker_url, signing_key
):
    cfg = agent_config(tmp_path, broker_url, signing_key, "dev-will")
    preinstall(cfg, signing_key)
    agent = Agent(cfg, max_backoff=1).start()
    try:
        wait_for(agent.transport.is_connected)
        late = server(broker_url, "dev-will")  # subscribes after the birth: gets the retained one
        birth = wait_for(lambda: [s for s in late.states if s.online])[-1]
        assert birth.model.version == "1.0.0" and birth.api_url == agent.api_url
        assert birth.profile == "host" and "onnxruntime" in birth.runtimes and birth.agent_version
        # The device vanishes without a goodbye: the broker publishes the retained will.
        client = agent.transport._client
        client.loop_stop()
        client.socket().close()
        dead = wait_for(lambda: [s for s in late.states if not s.online])[-1]
        assert dead.device_id == "dev-will" and dead.model.version == "1.0.0"
        assert late.signature_failures == [] and late.signed >= 2  # birth and will, signed
        late.t.close()
    finally:
        if agent.started:
            agent.stop(timeout=1)


def test_deploy_over_mqtt_in_chunks_end_to_end(tmp_path, broker_url, signing_key):
    cfg = agent_config(tmp_path, broker_url, signing_key, "dev-deploy")
    preinstall(cfg, signing_key)
    sim = server(broker_url, "dev-deploy")
    with Agent(cfg, max_backoff=1) as agent:
        wait_for(lambda: [s for s in sim.states if s.online])
        assert predict(agent, [IRIS_ROW])["model"]["version"] == "1.0.0"
        bundle, manifest = make_bundle(signing_key, version="2.0.0", release=2)
        cmd = deploy_command("dev-deploy", bundle, manifest, signing_key, chunk_size=2048)
        sim.send(cmd, bundle)
        sim.send_chunks(bundle, cmd)
        wait_for(
            lambda: sim.states_of(cmd.command_id)[-1:] in (["installed"], ["rejected"], ["failed"])
        )
        states = sim.states_of(cmd.command_id)
        assert states[0] == "accepted" and states[-2:] == ["verifying", "installed"], states
        # the new model was timed on this machine before it was reported installed
        (done,) = [s for s in sim.statuses if s.command_id == cmd.command_id and s.result]
        bench = done.result["benchmark"]  # type: ignore[index]
        assert bench["runs"] == 100 and 0 < bench["p50_ms"] <= bench["p95_ms"]
        assert predict(agent, [IRIS_ROW])["model"]["version"] == "2.0.0"
        wait_for(lambda: sim.states[-1].model.version == "2.0.0")  # birth follows the model
        assert [m.version for m in sim.states[-1].previous] == ["1.0.0"]
        assert sim.signature_failures == [] and sim.signed >= 4  # births and every status
    sim.t.close()


@pytest.mark.parametrize("kind", ["amqtt", pytest.param("mosquitto", marks=pytest.mark.mosquitto)])
def test_broker_down_at_start_serving_continues_and_telemetry_flushes_when_it_appears(
    tmp_path, signing_key, kind
):
    if kind == "mosquitto" and MOSQUITTO is None:
        pytest.skip("mosquitto is not installed (CI installs it)")
    port = free_port()
    url = f"mqtt://127.0.0.1:{port}"
    cfg = agent_config(tmp_path, url, signing_key, f"dev-late-{kind}")
    preinstall(cfg, signing_key)
    X = trained("iris-logreg").X
    with Agent(cfg, max_backoff=1) as agent:
        for i in range(0, 60, 3):  # 60 rows → 3 windows of 20, all while offline
            predict(agent, X[i : i + 3].tolist())
        wait_for(lambda: agent.outbox.count("sketch") == 3)
        assert not agent.transport.is_connected()
        broker = (
            EmbeddedBroker(port=port).start() if kind == "amqtt" else Mosquitto(port=port).start()
        )
        try:
            sim = server(url, cfg.device_id)
            wait_for(lambda: len({r.seq for r in sim.sketches}) == 3)
            assert sorted(r.sketches.rows for r in sim.sketches[:3]) == [20, 20, 20]
            wait_for(lambda: agent.outbox.count("sketch") == 0)
            assert predict(agent, [IRIS_ROW])["model"]["version"] == "1.0.0"
            sim.t.close()
        finally:
            agent.stop(timeout=1)
            broker.stop()


@pytest.mark.mosquitto
def test_broker_stopped_mid_run_loses_no_window_and_no_request(tmp_path, signing_key):
    if MOSQUITTO is None:
        pytest.skip("mosquitto is not installed (CI installs it)")
    X = trained("iris-logreg").X
    with Mosquitto() as mosq:
        cfg = agent_config(tmp_path, mosq.url, signing_key, "dev-outage", window_rows=10)
        preinstall(cfg, signing_key)
        sim = server(mosq.url, cfg.device_id)
        agent = Agent(cfg, max_backoff=1).start()
        wait_for(agent.transport.is_connected)
        answered: list[str] = []
        failures: list[str] = []
        stop = threading.Event()

        def traffic() -> None:
            i = 0
            while not stop.is_set():
                try:
                    answered.append(predict(agent, [X[i % 150].tolist()])["request_id"])
                except AssertionError as exc:
                    failures.append(str(exc))
                i += 1

        worker = threading.Thread(target=traffic)
        worker.start()
        try:
            wait_for(lambda: len(answered) >= 50)
            mosq.stop()
            during = len(answered)
            wait_for(lambda: not agent.transport.is_connected())
            wait_for(lambda: len(answered) >= during + 100)  # inference goes on offline
            assert agent.outbox.count("sketch") > 0  # windows wait in the outbox
            mosq.start()
            wait_for(agent.transport.is_connected)
            wait_for(lambda: len(answered) >= during + 200)
        finally:
            stop.set()
            worker.join()
            agent.stop()
        assert failures == []
        windows = agent.sketcher.closed
        assert windows >= (len(answered) // 10)
        wait_for(lambda: {r.seq for r in sim.sketches} == set(range(windows)), timeout=30)
        assert sum(r.sketches.rows for r in {r.seq: r for r in sim.sketches}.values()) == len(
            answered
        )
        sim.t.close()


def test_agent_run_stops_gracefully_on_sigterm_delivering_the_open_window(
    tmp_path, amqtt_broker, signing_key
):
    import signal
    import subprocess
    import sys

    url = str(amqtt_broker.url)
    port = free_port()
    cfg = agent_config(tmp_path, url, signing_key, "dev-sigterm", window_rows=1000)
    preinstall(cfg, signing_key)
    toml = tmp_path / "agent.toml"
    toml.write_text(
        f'device_id = "dev-sigterm"\ndata_dir = "{cfg.data_dir}"\n'
        f'[broker]\nurl = "{url}"\n[trust]\nbundle_keys = ["{cfg.trust.bundle_keys[0]}"]\n'
        f'command_keys = ["{cfg.trust.command_keys[0]}"]\n'
        f"[api]\nport = {port}\n[sketch]\nwindow_rows = 1000\n"
    )
    sim = server(url, "dev-sigterm")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from edgefleet.cli import main; main()",
            "agent",
            "run",
            "--config",
            str(toml),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: [s for s in sim.states if s.online], timeout=60)
        for row in trained("iris-logreg").X[:7].tolist():
            r = httpx.post(
                f"http://127.0.0.1:{port}/v1/predict", json={"inputs": [row]}, timeout=10
            )
            assert r.status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, proc.stdout.read().decode() if proc.stdout else ""
    finally:
        if proc.poll() is None:
            proc.kill()
    # The open window (7 rows, far from window_rows) was closed and delivered on the way out,
    # and the retained state now says offline.
    (report,) = wait_for(lambda: sim.sketches)
    assert report.sketches.rows == 7
    wait_for(lambda: not sim.states[-1].online)
    sim.t.close()


def test_agent_refuses_to_start_on_a_busy_api_port_with_a_readable_error(tmp_path, signing_key):
    import socket

    from protocol.errors import AddressInUse
    from protocol.transport import MemoryBroker

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    cfg = agent_config(tmp_path, "mqtt://unused:1", signing_key, "dev-busy")
    cfg = cfg.model_copy(update={"api": cfg.api.model_copy(update={"port": busy.getsockname()[1]})})
    try:
        with pytest.raises(AddressInUse, match=r"127\.0\.0\.1:\d+ is in use"):
            Agent(cfg, transport=MemoryBroker().client("dev-busy")).start()
    finally:
        busy.close()
