"""The fleet measures itself, end to end: real agents, Mosquitto, the REST API and Chromium.

Five ``edgefleet agent run`` processes: ``a1 a2 a3`` (tag ``site-a``) run iris 1.0.0 and
``b1 b2`` (tag ``site-b``) run iris 2.0.0; one fleet server (uvicorn in a thread). In order:

1. two cohorts with different shifts: ``a1 a2`` send petal features moved up, ``a3`` sends
   the reference distribution, ``b1 b2`` send sepal features moved up. The API's drift by
   device and by tag, the alert on the alert topic and the dashboard's drift and device
   pages must each say which devices and cohorts drifted, on which features, and which not;
2. one slow device among fast ones (``a1`` restarted with ``faults.extra_latency_ms``): a
   latency alert naming ``a1`` on the API, the alert topic, Prometheus and the dashboard's
   overview, an outlier entry for it, and the alert resolving once ``a1`` runs fast again;
3. labelled feedback on the two versions (1.0.0 all right, 2.0.0 half wrong): accuracy per
   version and per device with Wilson intervals in the API and the dashboard, and a rollout
   of 2.0.0 onto ``site-a`` held at its first stage by the field-accuracy gate.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from protocol import KeyPair
from protocol.messages import Alert, decode
from tests.e2e.support import (
    AgentProcess,
    BrokerRecorder,
    Traffic,
    install_offline,
    wait_online,
    wait_until,
    write_agent_config,
)
from tests.support.brokers import MOSQUITTO, Mosquitto, free_port

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TOKEN = "measures-admin-token"
PASSWORD = "measures-viewer-pw"
SLOW_MS = 250.0
SITE_A, SITE_B = ["a1", "a2", "a3"], ["b1", "b2"]
PETAL_SHIFT = np.array([0.0, 0.0, 2.5, 1.0])
SEPAL_SHIFT = np.array([1.5, 1.0, 0.0, 0.0])

pytestmark = [
    pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed (CI installs it)"),
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium"),
]


def _config(folder: Path, device: str, broker: str, key: Path, **kw: Any) -> Path:
    return write_agent_config(
        folder / device,
        device_id=device,
        broker_url=broker,
        bundle_keys=[key],
        tags=["site-a"] if device.startswith("a") else ["site-b"],
        window_s=2.0,
        **kw,
    )


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, signing_key: KeyPair
) -> Iterator[dict[str, Any]]:
    from fleet_server import auth
    from fleet_server.config import FleetConfig
    from fleet_server.serve import FleetServer
    from protocol.device_auth import token_hash
    from tests.e2e.support import ENROL_TOKEN, write_public_keys
    from tests.support.bundles import make_bundle
    from tests.support.keys import write_private

    tmp = tmp_path_factory.mktemp("measures")
    (pub,) = write_public_keys(tmp / "keys", signing_key)
    command = write_private(tmp / "command")  # the session's command key, pinned by agents
    v1, _ = make_bundle(signing_key, version="1.0.0", release=1, benchmark=_host_benchmark(tmp))
    v2, _ = make_bundle(signing_key, version="2.0.0", release=2)
    (tmp / "v1.efb").write_bytes(v1)
    (tmp / "v2.efb").write_bytes(v2)
    broker = Mosquitto().start()
    configs = {d: _config(tmp, d, broker.url, pub) for d in SITE_A + SITE_B}
    install_offline([configs[d] for d in SITE_A], tmp / "v1.efb")
    install_offline([configs[d] for d in SITE_B], tmp / "v2.efb")
    cfg = FleetConfig.model_validate(
        {
            "data_dir": str(tmp / "fleet"),
            "broker": {"url": broker.url, "client_id": f"fleet-{uuid.uuid4().hex[:6]}"},
            "api": {"host": "127.0.0.1", "port": free_port()},
            "signing": {"command_key": str(command), "bundle_keys": [str(pub)]},
            "auth": {"tokens": [{"token_hash": auth.hash_token(TOKEN), "role": "admin"}]},
            "rollout": {"tick_s": 0.2},
            "health": {"p95_ms": 100.0, "min_requests": 5, "offline_after_s": 3600.0},
            "devices": {"enrol_token_hashes": [token_hash(ENROL_TOKEN)]},  # agents prove it
        }
    )
    server = FleetServer(cfg).start()
    service = server.service
    assert service is not None
    service.drift_every_s = 1.0
    service.add_user("viewer", PASSWORD, "viewer")
    service.upload_bundle(v1)
    service.upload_bundle(v2)
    recorder = BrokerRecorder(broker.url).start()
    agents = {d: AgentProcess(c).start() for d, c in configs.items()}
    api = httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30
    )
    try:
        for a in agents.values():
            a.wait_api(ready=True)
        wait_online(service, agents)
        yield {
            "tmp": tmp,
            "broker": broker,
            "pub": pub,
            "server": server,
            "service": service,
            "agents": agents,
            "api": api,
            "recorder": recorder,
        }
    finally:
        api.close()
        for a in agents.values():
            a.close()
        recorder.close()
        server.stop()
        broker.stop()


def _host_benchmark(tmp: Path) -> Any:
    """What ``edgefleet build`` puts into a bundle: the toolchain's benchmark on this host."""
    from protocol.profiles import load_profile
    from tests.support.bundles import trained
    from toolchain.benchmark import benchmark

    path = tmp / "iris.onnx"
    path.write_bytes(trained("iris-logreg").onnx)
    return benchmark(path, load_profile("host"), runs=100).result


def _iris() -> np.ndarray:
    from sklearn.datasets import load_iris

    return np.asarray(load_iris().data, dtype=float)


def _browser() -> Any:
    from playwright.sync_api import sync_playwright

    pw = sync_playwright().start()
    browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
    return pw, browser


def _login(page: Any, base: str) -> None:
    page.goto(f"{base}/ui/login")
    page.fill("input[name=username]", "viewer")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r"/ui/$"))


def _alerts(fleet: dict[str, Any]) -> list[Alert]:
    return [
        decode(Alert, m.payload)
        for m in fleet["recorder"].snapshot()
        if m.topic.endswith("/alerts")
    ]


def test_two_cohorts_with_different_shifts_are_named_by_device_and_tag(
    fleet: dict[str, Any],
) -> None:
    from playwright.sync_api import expect

    api, agents = fleet["api"], fleet["agents"]
    fleet["service"].drift_every_s = 3600.0  # no fleet-wide check until every device reported
    X = _iris()
    shifts = {"a1": PETAL_SHIFT, "a2": PETAL_SHIFT, "a3": 0.0, "b1": SEPAL_SHIFT, "b2": SEPAL_SHIFT}
    for device, shift in shifts.items():
        for chunk in np.array_split(X + shift, 3):  # 150 rows a device, twice over
            for _ in range(2):
                r = agents[device].predict(chunk.tolist())
                assert r.status_code == 200, r.text

    def by(what: str) -> dict[str, dict[str, Any]]:
        rows = api.get("/v1/drift/scopes", params={"by": what}).json()
        return {f"{r['version']}:{r['subject']}": r for r in rows if r["evaluated"]}

    def devices_tested() -> dict[str, dict[str, Any]] | None:
        rows = by("device")
        return rows if len(rows) == 5 else None

    devices = wait_until(devices_tested, 60, "every device's drift test")
    drifted = sorted(k for k, r in devices.items() if r["dataset_drift"])
    assert drifted == ["1.0.0:a1", "1.0.0:a2", "2.0.0:b1", "2.0.0:b2"]
    assert not devices["1.0.0:a3"]["dataset_drift"]
    tags = by("tag")
    site_a, site_b = tags["1.0.0:site-a"], tags["2.0.0:site-b"]
    assert site_a["dataset_drift"] and site_b["dataset_drift"]
    assert {"petal_length", "petal_width"} <= set(site_a["drifted_features"])
    assert not {"sepal_length", "sepal_width"} & set(site_a["drifted_features"])
    assert {"sepal_length", "sepal_width"} <= set(site_b["drifted_features"])
    assert not {"petal_length", "petal_width"} & set(site_b["drifted_features"])
    first = api.get("/v1/drift/scopes", params={"by": "all", "model": "iris", "version": "1.0.0"})
    assert first.json()[0]["dataset_drift"]  # drifted scopes come first

    # the alert names the scope: which devices drifted, and that a3 did not
    fleet["service"].drift_every_s = 1.0
    alert = wait_until(
        lambda: [a for a in _alerts(fleet) if a.kind == "drift" and a.version == "1.0.0"],
        60,
        "a drift alert for 1.0.0",
    )[0]
    assert "a1" in alert.message and "a2" in alert.message and "not drifted: a3" in alert.message
    assert alert.details["scope"]["steady_devices"] == ["a3"]

    pw, browser = _browser()
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(20_000)
        base = fleet["server"].url
        _login(page, base)
        page.goto(f"{base}/ui/drift")
        index = page.locator("#drift-scopes")
        expect(index).to_contain_text("site-a")
        expect(index.locator("tr", has_text="b2")).to_contain_text("sepal_length")
        expect(index).not_to_contain_text("a3")
        page.goto(f"{base}/ui/drift/iris/1.0.0")
        table = page.locator("#drift-cohorts")
        expect(table).to_contain_text("site-a")
        first_row = table.locator("tr").nth(1)
        expect(first_row).to_have_class(re.compile("failrow"))
        expect(table.locator("tr", has_text="a3")).to_contain_text("stable")
        page.goto(f"{base}/ui/devices/a1")
        expect(page.locator("#device-drift")).to_contain_text("drift")
        expect(page.locator("#device-drift")).to_contain_text("petal_length")
        page.goto(f"{base}/ui/devices/a3")
        expect(page.locator("#device-drift")).to_contain_text("stable")
        page.screenshot(path="/tmp/edgefleet-drift-cohorts.png", full_page=True)
    finally:
        browser.close()
        pw.stop()


def _restart(fleet: dict[str, Any], device: str, **kw: Any) -> AgentProcess:
    agents = fleet["agents"]
    agents[device].close()
    _config(fleet["tmp"], device, fleet["broker"].url, fleet["pub"], **kw)
    agents[device] = AgentProcess(agents[device].config).start()
    agents[device].wait_api(ready=True)
    wait_online(fleet["service"], [device])
    return agents[device]


def test_one_slow_device_raises_a_latency_alert_naming_it_and_resolves_when_it_recovers(
    fleet: dict[str, Any],
) -> None:
    from playwright.sync_api import expect

    api = fleet["api"]
    _restart(fleet, "a1", extra_latency_ms=SLOW_MS)
    traffic = Traffic(list(fleet["agents"].values()), threads=5, pause_s=0.02).start()
    try:

        def latency_firing() -> list[dict[str, Any]]:
            firing = api.get("/v1/alerts/health").json()["firing"]
            return [a for a in firing if a["rule"] == "latency"]

        firing = wait_until(latency_firing, 90, "a latency alert")
        assert [(a["scope"], a["subject"]) for a in firing] == [("device", "a1")]
        assert "a1" in firing[0]["message"] and "100.0 ms" in firing[0]["message"]
        health = [a for a in _alerts(fleet) if a.kind == "health"]
        assert any(a.details["subject"] == "a1" and a.details["state"] == "firing" for a in health)
        metrics = httpx.get(f"{fleet['server'].url}/metrics").text
        assert 'edgefleet_health_alert{rule="latency",scope="device",subject="a1"} 1.0' in metrics
        outliers = wait_until(
            lambda: [
                o for o in api.get("/v1/calibration").json()["outliers"] if o["device_id"] == "a1"
            ],
            30,
            "a1 listed as a latency outlier",
        )
        assert outliers[0]["times_median"] > 2
        assert api.get("/v1/devices/a2/measures").json()["health"] == []

        pw, browser = _browser()
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(20_000)
            _login(page, fleet["server"].url)
            box = page.locator("#health-alerts")
            expect(box).to_contain_text("latency")
            expect(box).to_contain_text("a1")
            expect(box).to_contain_text("Latency outliers")
            page.screenshot(path="/tmp/edgefleet-health.png", full_page=True)
            page.goto(f"{fleet['server'].url}/ui/devices/a1")
            expect(page.locator("#device-health")).to_contain_text("latency outlier")
        finally:
            browser.close()
            pw.stop()

        traffic.stop()
        _restart(fleet, "a1")
        traffic = Traffic(list(fleet["agents"].values()), threads=5, pause_s=0.02).start()
        wait_until(lambda: not latency_firing(), 90, "the latency alert to resolve")
        recent = api.get("/v1/alerts/health").json()["recent"]
        assert any(e["message"].startswith("resolved: p95 latency on device a1") for e in recent)
        health = [a for a in _alerts(fleet) if a.kind == "health"]
        assert any(
            a.details["subject"] == "a1" and a.details["state"] == "resolved" for a in health
        )
    finally:
        traffic.stop()


def test_field_benchmark_calibrates_the_profile_and_profiles_calibrate_writes_it(
    fleet: dict[str, Any],
) -> None:
    from protocol.profiles import load_profile
    from tests.e2e.support import edgefleet

    api = fleet["api"]
    started = api.post(
        "/v1/benchmarks",
        json={"bundle": "iris@1.0.0", "selector": "tag=site-a", "sample": 2, "runs": 50},
    )
    assert started.status_code == 202, started.text
    sent = started.json()
    assert len(sent["devices"]) == 2 and set(sent["devices"]) <= set(SITE_A)

    def results() -> list[dict[str, Any]] | None:
        rows = [
            r for r in api.get("/v1/benchmarks").json() if r["command_id"] in sent["command_ids"]
        ]
        return rows if len(rows) == 2 else None

    rows = wait_until(results, 90, "both field benchmark results")
    assert all(r["profile"] == "host" and r["ratio"] > 0 and r["host_p50_ms"] > 0 for r in rows)
    cal = api.get("/v1/calibration").json()
    (host,) = [p for p in cal["profiles"] if p["profile"] == "host"]
    assert host["devices"] == 2 and host["estimate"] == 1.0
    ratios = sorted(r["ratio"] for r in rows)
    assert host["speed_factor"] == pytest.approx(sum(ratios) / 2)  # the median of two

    out_dir = fleet["tmp"] / "calibrated"
    run = edgefleet(
        "profiles", "calibrate", "--from-fleet", "--url", fleet["server"].url,
        "--token", TOKEN, "--profile", "host", "--dir", str(out_dir),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "measured on 2 devices" in run.stdout
    calibrated = load_profile(out_dir / "host.toml")
    assert calibrated.measured is not None and calibrated.measured.devices == 2
    assert calibrated.effective_speed_factor() == pytest.approx(host["speed_factor"], rel=1e-5)
    assert calibrated.speed_factor == 1.0  # the estimate stays beside it
    bad = edgefleet("profiles", "calibrate", "--from-fleet", "--url", "http://127.0.0.1:1")
    assert bad.returncode == 1 and "cannot reach the fleet server" in bad.stderr


def _labelled(agent: AgentProcess, rows: np.ndarray, wrong_every: int = 0) -> None:
    for i, row in enumerate(rows):
        r = agent.predict([row.tolist()])
        assert r.status_code == 200, r.text
        body = r.json()
        label = body["labels"][0]
        truth = (label + 1) % 3 if wrong_every and i % wrong_every == 0 else label
        fb = agent._client.post(
            "/v1/feedback", json={"request_id": body["request_id"], "truth": truth}
        )
        assert fb.status_code in (200, 202, 204), fb.text


def test_labelled_feedback_on_two_versions_and_a_rollout_held_by_field_accuracy(
    fleet: dict[str, Any],
) -> None:
    from playwright.sync_api import expect

    api, agents = fleet["api"], fleet["agents"]
    X = _iris()
    for d in SITE_A:
        _labelled(agents[d], X[:40])
    for d in SITE_B:
        _labelled(agents[d], X[:40], wrong_every=2)  # half the labels disagree

    def versions() -> dict[str, dict[str, Any]] | None:
        rows = {r["version"]: r for r in api.get("/v1/accuracy", params={"model": "iris"}).json()}
        done = (
            rows.get("1.0.0", {}).get("labelled", 0) >= 120
            and rows.get("2.0.0", {}).get("labelled", 0) >= 80
        )
        return rows if done else None

    rows = wait_until(versions, 60, "labelled feedback from every device")
    v1, v2 = rows["1.0.0"], rows["2.0.0"]
    assert v1["value"] == 1.0 and v1["ci_low"] > 0.95 and v1["interval"] == "wilson 95%"
    assert v2["value"] == pytest.approx(0.5) and v2["ci_low"] < 0.5 < v2["ci_high"]
    per_device = api.get("/v1/accuracy", params={"model": "iris", "by": "device"}).json()
    assert sorted(r["device_id"] for r in per_device) == sorted(SITE_A + SITE_B)
    assert all(r["labelled"] == 40 for r in per_device)

    created = api.post(
        "/v1/rollouts",
        params={"start": "true"},
        json={
            "bundle": "iris@2.0.0",
            "selector": "tag=site-a",
            "stages": [1, 3],
            "stage_unit": "count",
            "success_threshold": 1.0,
            "accuracy_margin": 0.1,
            "min_labels": 30,
        },
    )
    assert created.status_code == 201, created.text
    rid = created.json()["rollout_id"]

    def held() -> dict[str, Any] | None:
        st = api.get(f"/v1/rollouts/{rid}").json()
        hits = [a for a in st.get("decisions", []) if "held: field accuracy" in a["reason"]]
        return st if hits else None

    status = wait_until(held, 90, "the first stage held by field accuracy")
    assert status["state"] == "running"
    assert status["stages"][0]["state"] == "running" and status["stages"][1]["state"] == "pending"
    assert status["stages"][0]["installed"] == 1

    pw, browser = _browser()
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(20_000)
        base = fleet["server"].url
        _login(page, base)
        page.goto(f"{base}/ui/rollouts/{rid}")
        expect(page.locator("body")).to_contain_text("held: field accuracy")
        page.goto(f"{base}/ui/drift/iris/2.0.0")
        acc = page.locator("#field-accuracy")
        expect(acc.locator("tr", has_text="iris 1.0.0")).to_contain_text("100.0%")
        expect(acc.locator("tr", has_text="iris 2.0.0")).to_contain_text("50.0%")
        page.goto(f"{base}/ui/devices/b1")
        expect(page.locator("#device-accuracy")).to_contain_text("50.0%")
    finally:
        browser.close()
        pw.stop()
    assert api.post(f"/v1/rollouts/{rid}/abort").status_code == 200
