"""Crash during update: ``kill -9`` an install at random points; every restart serves a
verified model (the old one or the new one, never a half-written one) and says which.

The kill delays are drawn from a seeded RNG across the install's own duration: between the
time an ``edgefleet agent install`` process needs to start and refuse a missing file (the
import cost every run pays) and the time a complete install takes, so the kills land in
verification, smoke test, slot write, fsync and the state-file switch.
"""

from __future__ import annotations

import random
import shutil
import statistics
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from agent import Predictor, load_config
from agent.slots import BUNDLE_FILE
from fleet_server.service import RolloutRequest
from protocol import KeyPair, TrustStore, read_bundle, verify_bundle
from tests.e2e.conftest import Release
from tests.e2e.support import (
    AgentProcess,
    BrokerRecorder,
    _env,
    agent_status,
    edgefleet,
    edgefleet_argv,
    make_fleet,
    wait_online,
    wait_until,
    write_agent_config,
)
from tests.support.bundles import make_bundle, trained

pytestmark = pytest.mark.slow

KILLS = 24
SEED = 20261121
UNUSED_BROKER = "mqtt://127.0.0.1:9"  # the offline commands never connect


@pytest.fixture(scope="module")
def digits(signing_key: KeyPair) -> tuple[Release, Release]:
    """Two releases of a 100-tree digits forest (~200 KB bundles: writes take a while)."""
    v1 = Release(*make_bundle(signing_key, name="digits", kind="digits-forest", release=1))
    v2 = Release(
        *make_bundle(signing_key, name="digits", kind="digits-forest", version="2.0.0", release=2)
    )
    return v1, v2


def served_after_restart(config: Path, trust: TrustStore, versions: set[str]) -> str:
    """Restart the agent's model loading from disk; check it serves a verified model."""
    cfg = load_config(config)
    predictor = Predictor.from_config(cfg)
    try:
        ref = predictor.model
        assert ref is not None, "after the crash the device serves no model at all"
        assert ref.version in versions
        manifest = predictor.manifest
        assert manifest is not None
        # A real prediction, checked against the outputs the release was signed with.
        smoke = manifest.smoke_tests[0]
        result = predictor.predict(smoke.rows)
        assert result.labels == smoke.expected_labels
        assert not result.fallback
        X = trained("digits-forest").X[:50]
        assert len(predictor.predict(X.tolist()).labels or []) == 50
    finally:
        predictor.close()
    # The active slot on disk verifies end to end (signature, every hash) and holds exactly
    # the model that is served.
    st = agent_status(config)
    active = [s for s in st["slots"] if s["active"]]
    assert len(active) == 1 and active[0]["ok"], f"active slot unusable: {st['slots']}"
    assert active[0]["version"] == ref.version, "agent status disagrees with the served model"
    bundle = read_bundle(cfg.data_dir / "slots" / active[0]["slot"] / BUNDLE_FILE)
    manifest = verify_bundle(bundle, trust, allow_older=True)
    assert manifest.file(manifest.model.path).sha256 == ref.sha256
    return ref.version


def _timed(argv: list[str]) -> tuple[float, int]:
    t0 = time.perf_counter()
    rc = subprocess.run(argv, capture_output=True, env=_env(), timeout=60).returncode
    return time.perf_counter() - t0, rc


def test_kill_9_during_install_always_restarts_on_a_verified_model(
    tmp_path: Path, signing_key: KeyPair, key_files: dict[str, Path], digits
) -> None:
    v1, v2 = digits
    trust = TrustStore.from_keys([signing_key.public])
    template = tmp_path / "template"
    cfg = write_agent_config(
        template, device_id="crash-1", broker_url=UNUSED_BROKER, bundle_keys=[key_files["signing"]]
    )
    out = edgefleet("agent", "install", str(v1.write(tmp_path)), "--config", str(cfg))
    assert out.returncode == 0, out.stderr
    new = v2.write(tmp_path)

    def device(i: int) -> Path:
        folder = tmp_path / f"run-{i:02d}"
        shutil.copytree(template / "data", folder / "data")
        return write_agent_config(
            folder,
            device_id="crash-1",
            broker_url=UNUSED_BROKER,
            bundle_keys=[key_files["signing"]],
        )

    # How long the process takes to start and refuse (imports only) vs a whole install;
    # the kills are spread from a little before the first to a little after the second.
    refuse = [str(tmp_path / "none.efb"), "--config", str(cfg)]
    base = statistics.median(_timed(edgefleet_argv("agent", "install", *refuse))[0] for _ in "ab")
    runs = [
        _timed(edgefleet_argv("agent", "install", str(new), "--config", str(device(90 + n))))
        for n in range(2)
    ]
    assert all(rc == 0 for _, rc in runs)
    full = statistics.median(t for t, _ in runs)
    lo, hi = 0.8 * base, max(1.1 * full, 1.2 * base)

    rng = random.Random(SEED)
    outcomes: Counter[str] = Counter()
    completed = 0
    for i in range(KILLS):
        config = device(i)
        delay = rng.uniform(lo, hi)
        proc = subprocess.Popen(
            edgefleet_argv("agent", "install", str(new), "--config", str(config)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=_env(),
        )
        time.sleep(delay)
        finished = proc.poll() is not None
        proc.kill()  # SIGKILL: kill -9
        rc = proc.wait(10)
        version = served_after_restart(config, trust, {v1.version, v2.version})
        if finished and rc == 0:
            completed += 1
            assert version == v2.version, "a completed install must survive the restart"
        outcomes[version] += 1
    print(
        f"\n{KILLS} kills between {lo:.2f}s and {hi:.2f}s (a refused start takes "
        f"{base:.2f}s, a whole install {full:.2f}s): "
        f"{dict(outcomes)} served after restart, {completed} installs completed before the kill"
    )
    assert sum(outcomes.values()) == KILLS


DAEMON_KILLS = 6


@pytest.mark.mosquitto
def test_kill_9_of_the_daemon_during_a_deploy_restarts_on_a_verified_model_and_reports_it(
    tmp_path: Path,
    mosquitto: Any,
    signing_key: KeyPair,
    key_files: dict[str, Path],
    digits,
) -> None:
    """The running daemon is killed while a rollout delivers v2 over MQTT; the restarted
    daemon serves a verified model over HTTP, says which in its birth message, and the
    rollout still completes."""
    v1, v2 = digits
    trust = TrustStore.from_keys([signing_key.public])
    service = make_fleet(
        tmp_path,
        mosquitto.url,
        bundle_keys=[key_files["signing"]],
        rollout={"device_timeout_s": 20.0, "max_retries": 3},
    )
    recorder = BrokerRecorder(mosquitto.url).start()
    bundle = service.upload_bundle(v2.data)
    base = v1.write(tmp_path)
    rng = random.Random(SEED + 1)
    outcomes: list[tuple[float, str]] = []
    try:
        for i in range(DAEMON_KILLS):
            device = f"crash-d{i}"
            config = write_agent_config(
                tmp_path / device,
                device_id=device,
                broker_url=mosquitto.url,
                bundle_keys=[key_files["signing"]],
            )
            assert edgefleet("agent", "install", str(base), "--config", str(config)).returncode == 0
            agent = AgentProcess(config).start()
            try:
                agent.wait_api(ready=True)
                wait_online(service, [device], 30)
                rid = service.create_rollout(
                    RolloutRequest(bundle=bundle["sha256"], selector=f"id={device}", stages=[100])
                )["rollout_id"]
                service.start_rollout(rid)
                delay = rng.uniform(0.0, 0.6)
                time.sleep(delay)
                agent.kill()
                killed_at = time.time()
                agent = AgentProcess(config).start()
                agent.wait_api(ready=True)
                served = agent.model()
                assert served is not None and served["version"] in (v1.version, v2.version)
                answer = agent.predict(trained("digits-forest").X[:2].tolist())
                assert answer.status_code == 200, answer.text
                slot = next(s for s in agent_status(config)["slots"] if s["active"])
                data_dir = load_config(config).data_dir
                verify_bundle(
                    read_bundle(data_dir / "slots" / slot["slot"] / BUNDLE_FILE),
                    trust,
                    allow_older=True,
                )

                def birth(d: str = device, since: float = killed_at) -> Any:
                    for dev, m in reversed(recorder.by_kind("state")):
                        st = m.json()
                        if dev == d and m.ts > since and st.get("online"):
                            return st
                    return None

                state = wait_until(birth, 30, f"{device}'s birth message after the restart")
                assert state["model"]["version"] in (v1.version, v2.version)

                def finished(r: str = rid) -> Any:
                    st = service.rollout_status(r)
                    return st if st["state"] in ("succeeded", "halted") else None

                outcomes.append((round(delay, 2), served["version"]))
                st = wait_until(finished, 90, f"the rollout to {device} to finish")
                assert st["state"] == "succeeded", st["devices"]
                assert (agent.model() or {}).get("version") == v2.version
            finally:
                agent.close()
        print(f"\ndaemon killed (delay s, version served after restart): {outcomes}")
    finally:
        recorder.close()
        service.stop()
