"""The dashboard end to end in headless Chromium (Debian's, driven by Playwright).

A real fleet server (uvicorn in a thread on 127.0.0.1) on a real broker (amqtt) with real
agents attached (``agent.daemon.Agent`` in process, each starting on the 1.0.0 bundle):
log in, upload a bundle and start a staged rollout, watch the stages advance on the
self-refreshing rollout page, press rollback (and confirm), see every device return to
the previous version. Screenshots of the overview and rollout pages go to /tmp.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet_server.config import FleetConfig
from fleet_server.serve import FleetServer
from protocol import KeyPair
from protocol.device_auth import token_hash
from tests.fleet_server.fleetkit import TEST_ENROL_TOKEN, enrol_token_file, write_keys
from tests.support.brokers import free_port
from tests.support.bundles import make_bundle
from tests.support.keys import write_private, write_public

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PASSWORD = "fleet-operator-pw"
N_DEVICES = 4

pytestmark = [
    pytest.mark.chromium,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium"
    ),
    # amqtt 0.12.1 warns that psutil becomes an optional extra of its $SYS plugin.
    pytest.mark.filterwarnings("ignore:`BrokerSysPlugin`:DeprecationWarning"),
]


@pytest.fixture
def fleet(tmp_path: Path, signing_key: KeyPair, amqtt_broker: Any) -> Iterator[dict[str, Any]]:
    from agent.config import (
        AgentConfig,
        ApiConfig,
        BrokerConfig,
        EnrolConfig,
        SketchConfig,
        TrustConfig,
    )
    from agent.daemon import Agent
    from agent.installer import Installer

    prefix = f"bt{uuid.uuid4().hex[:8]}"  # this test's own topics on the shared broker
    _, pub = write_keys(tmp_path, signing_key)
    cfg = FleetConfig.model_validate(
        {
            "data_dir": str(tmp_path / "fleet"),
            "broker": {
                "url": amqtt_broker.url,
                "topic_prefix": prefix,
                "client_id": f"{prefix}-fleet",
            },
            "api": {"host": "127.0.0.1", "port": free_port()},
            "signing": {
                "command_key": str(write_private(tmp_path / "command")),
                "bundle_keys": [str(pub)],
            },
            "rollout": {"tick_s": 0.1, "soak_s": 0.0},
            "devices": {"enrol_token_hashes": [token_hash(TEST_ENROL_TOKEN)]},
        }
    )
    v1, _ = make_bundle(signing_key, version="1.0.0", release=1)
    v2, _ = make_bundle(signing_key, version="2.0.0", release=2)
    (tmp_path / "iris-2.0.0.efb").write_bytes(v2)
    agents = []
    for i in range(N_DEVICES):
        config = AgentConfig(
            device_id=f"{prefix}-pi-{i}",
            data_dir=tmp_path / f"agent-{i}",
            broker=BrokerConfig(url=amqtt_broker.url, topic_prefix=prefix),
            trust=TrustConfig(bundle_keys=[pub], command_keys=[write_public(tmp_path / "command")]),
            api=ApiConfig(port=0),
            sketch=SketchConfig(window_seconds=3600),
            enrol=EnrolConfig(token_file=enrol_token_file(tmp_path)),
        )
        Installer.from_config(config).install_bytes(v1)  # every device starts on 1.0.0
        agents.append(Agent(config, serve_api=False, max_backoff=2))
    server = FleetServer(cfg).start()
    service = server.service
    assert service is not None
    try:
        service.add_user("ops", PASSWORD, "operator")
        service.upload_bundle(v1)
        for a in agents:
            a.start()
        _wait(lambda: len(service.list_devices(online=True)) == N_DEVICES, "agents online")
        yield {
            "server": server,
            "service": service,
            "agents": agents,
            "bundle": tmp_path / "iris-2.0.0.efb",
        }
    finally:
        for a in agents:
            if a.started:
                a.stop()
        server.stop()


def active_version(agent: Any) -> str | None:
    model = agent.birth().model
    return model.version if model else None


def _wait(cond: Any, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_login_rollout_stages_advance_then_rollback_returns_devices(fleet: dict[str, Any]) -> None:
    from playwright.sync_api import expect, sync_playwright

    base = fleet["server"].url
    service = fleet["service"]
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(20_000)
        try:
            # 1. log in (the overview redirects to the login first)
            page.goto(f"{base}/ui/")
            expect(page).to_have_url(re.compile(r"/ui/login\?next="))
            page.fill("input[name=username]", "ops")
            page.fill("input[name=password]", PASSWORD)
            page.click("button[type=submit]")
            expect(page.locator("h1")).to_have_text("Fleet overview")
            expect(page.locator("body")).to_contain_text("iris 1.0.0")

            # 2. upload the new bundle, plan a 3-stage rollout, confirm and start it
            page.click("nav >> text=Rollouts")
            page.set_input_files("input[name=bundle][type=file]", str(fleet["bundle"]))
            page.click("text=Upload and verify")
            expect(page.locator("select[name=bundle] option:checked")).to_contain_text("iris 2.0.0")
            page.fill("input[name=stages]", "25,50,100")
            page.fill("input[name=soak_s]", "2")
            page.click("text=Plan rollout…")
            expect(page.locator("h1")).to_have_text("Start this rollout?")
            expect(page.locator("#plan-selector")).to_have_text("(all devices)")
            page.click("#confirm-start")
            expect(page).to_have_url(re.compile(r"/ui/rollouts/r-[0-9a-f]+$"))

            # 3. the stages advance on the page by themselves (JS polls live.json)
            passed = page.locator("tr.stage[data-state=passed]")
            expect(passed).to_have_count(1, timeout=15_000)
            seen_partial = page.locator("tr.stage").count() == 3 and passed.count() < 3
            expect(passed).to_have_count(3, timeout=20_000)
            expect(page.locator("#rollout-state")).to_have_text("succeeded")
            expect(page.locator("tr[data-device][data-state=installed]")).to_have_count(N_DEVICES)
            # a succeeded rollout can only be rolled back: no pause, resume or abort button
            expect(page.locator("#actions a")).to_have_count(1)
            expect(page.locator("#action-rollback")).to_be_visible()
            page.screenshot(path="/tmp/edgefleet-rollout.png", full_page=True)
            assert seen_partial
            assert [active_version(a) for a in fleet["agents"]] == ["2.0.0"] * N_DEVICES

            # 4. roll back, through the confirmation step
            page.click("#action-rollback")
            expect(page.locator("h1")).to_contain_text("Roll back rollout")
            page.click("#confirm-action")
            expect(page.locator("#rollout-state")).to_have_text("rolled_back")

            # 5. every device reports the previous version again
            expect(page.locator("tr[data-device][data-state=rolled_back]")).to_have_count(N_DEVICES)
            expect(page.locator("#actions")).to_have_count(0)  # nothing applies any more
            _wait(
                lambda: {d["version"] for d in service.list_devices()} == {"1.0.0"},
                "devices on 1.0.0",
            )
            page.click("nav >> text=Overview")
            versions = page.locator("section.card", has_text="By model version")
            expect(versions).to_contain_text("iris 1.0.0")
            expect(versions).not_to_contain_text("iris 2.0.0")
            page.screenshot(path="/tmp/edgefleet-overview.png", full_page=True)
        finally:
            browser.close()
    assert [active_version(a) for a in fleet["agents"]] == ["1.0.0"] * N_DEVICES
