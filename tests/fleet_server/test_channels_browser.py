"""The channels page end to end in headless Chromium (Debian's, driven by Playwright).

A real fleet server (uvicorn in a thread) on a real broker (amqtt), three real agents in
process following beta (1) and stable (2) through ``[agent] channel``, all on 1.0.0 and both
channels at 1.0.0: the page shows versions and devices per channel and only the actions
that apply; a stable promotion's confirmation shows the failed condition and no button;
beta and then stable are promoted through the confirmation (reason required); stable is
demoted and its devices return to 1.0.0; the bundle page shows the lineage; a POST without
the CSRF token is refused.
"""

from __future__ import annotations

import re
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
from tests.fleet_server.test_dashboard_browser import CHROMIUM, CHROMIUM_ARGS, _wait
from tests.support.brokers import free_port
from tests.support.bundles import make_bundle
from tests.support.keys import write_private, write_public

PASSWORD = "fleet-operator-pw"
CHANNELS = {"pi-beta": "beta", "pi-s0": "stable", "pi-s1": "stable"}

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

    prefix = f"ch{uuid.uuid4().hex[:8]}"
    _, pub = write_keys(tmp_path, signing_key)
    cfg = FleetConfig.model_validate(
        {
            "data_dir": str(tmp_path / "fleet"),
            "broker": {"url": amqtt_broker.url, "topic_prefix": prefix, "client_id": f"{prefix}-f"},
            "api": {"host": "127.0.0.1", "port": free_port()},
            "signing": {
                "command_key": str(write_private(tmp_path / "command")),
                "bundle_keys": [str(pub)],
            },
            "rollout": {"tick_s": 0.1},
            "devices": {"enrol_token_hashes": [token_hash(TEST_ENROL_TOKEN)]},
        }
    )
    v1, _ = make_bundle(signing_key, version="1.0.0", release=1)
    v2, _ = make_bundle(signing_key, version="2.0.0", release=2)
    agents: dict[str, Any] = {}
    for name, channel in CHANNELS.items():
        config = AgentConfig(
            device_id=f"{prefix}-{name}",
            data_dir=tmp_path / name,
            channel=channel,
            broker=BrokerConfig(url=amqtt_broker.url, topic_prefix=prefix),
            trust=TrustConfig(bundle_keys=[pub], command_keys=[write_public(tmp_path / "command")]),
            enrol=EnrolConfig(token_file=enrol_token_file(tmp_path)),
            api=ApiConfig(port=0),
            sketch=SketchConfig(window_seconds=3600),
        )
        Installer.from_config(config).install_bytes(v1)
        agents[name] = Agent(config, serve_api=False, max_backoff=2)
    server = FleetServer(cfg).start()
    service = server.service
    assert service is not None
    try:
        service.add_user("ops", PASSWORD, "operator")
        service.upload_bundle(v1)
        sha2 = service.upload_bundle(v2)["sha256"]
        for a in agents.values():
            a.start()
        _wait(lambda: len(service.list_devices(online=True)) == len(agents), "agents online")
        _wait(
            lambda: sum(len(c["devices"]) for c in service.channels.overview()) == len(agents),
            "every agent's channel to be known",
        )
        service.channels.define("iris", "stable", {"hold_s": 0}, actor="test")
        for channel in ("beta", "stable"):
            service.channels.promote("iris@1.0.0", channel, actor="test", reason="baseline")
        yield {"server": server, "service": service, "agents": agents, "v2": sha2}
    finally:
        for a in agents.values():
            if a.started:
                a.stop()
        server.stop()


def versions(fleet: dict[str, Any]) -> dict[str, str | None]:
    out = {}
    for name, a in fleet["agents"].items():
        model = a.birth().model
        out[name] = model.version if model else None
    return out


def test_channels_page_promotes_with_conditions_and_demotes(fleet: dict[str, Any]) -> None:
    from playwright.sync_api import expect, sync_playwright

    base = fleet["server"].url
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(20_000)
        try:
            page.goto(f"{base}/ui/channels")
            page.fill("input[name=username]", "ops")
            page.fill("input[name=password]", PASSWORD)
            page.click("button[type=submit]")
            expect(page.locator("h1")).to_have_text("Release channels")
            beta = page.locator("#channel-iris-beta")
            stable = page.locator("#channel-iris-stable")
            expect(beta.locator("h2")).to_contain_text("1.0.0")
            expect(stable.locator("tr", has_text="pi-s0")).to_have_count(1)
            expect(stable.locator("tr", has_text="pi-s1")).to_have_count(1)
            expect(beta.locator("tr", has_text="pi-beta")).to_have_count(1)
            expect(stable).to_contain_text(
                "Requires a succeeded rollout on beta held 0 s, no drift alert"
            )
            # only what applies: promote 2.0.0 is offered, demote is not (no previous)
            expect(beta.locator("select[name=bundle] option")).to_have_text(["2.0.0 (release 2)"])
            expect(page.locator("a.demote")).to_have_count(0)

            # stable first: the confirmation names the failed condition and offers no button
            stable.locator("text=Promote…").click()
            expect(page.locator("h1")).to_have_text("Promote iris 2.0.0 to stable?")
            expect(page.locator("table.conditions tr.bad")).to_contain_text("requires")
            expect(page.locator("#refused")).to_contain_text("no rollout of it on beta")
            expect(page.locator("#confirm-channel")).to_have_count(0)
            page.screenshot(path="/tmp/edgefleet-channel-refused.png", full_page=True)

            # beta: conditions met; reason required; the beta device only gets 2.0.0
            page.goto(f"{base}/ui/channels")
            page.locator("#channel-iris-beta").locator("text=Promote…").click()
            expect(page.locator("table.conditions tr.bad")).to_have_count(0)
            expect(page.locator("body")).to_contain_text("Stages 50, 100%")
            page.fill("input[name=reason]", "release candidate")
            page.click("#confirm-channel")
            expect(page).to_have_url(re.compile(r"/ui/channels$"))
            _wait(lambda: versions(fleet)["pi-beta"] == "2.0.0", "the beta device on 2.0.0")
            assert versions(fleet) == {"pi-beta": "2.0.0", "pi-s0": "1.0.0", "pi-s1": "1.0.0"}
            _wait(
                lambda: fleet["service"].channels.preview("iris@2.0.0", "stable")["allowed"],
                "the beta rollout to succeed",
            )

            # stable: now allowed
            page.goto(f"{base}/ui/channels")
            expect(page.locator("#channel-iris-beta a.demote")).to_have_text("Demote to 1.0.0…")
            page.locator("#channel-iris-stable").locator("text=Promote…").click()
            expect(page.locator("table.conditions tr.bad")).to_have_count(0)
            page.fill("input[name=reason]", "beta held")
            page.click("#confirm-channel")
            _wait(lambda: set(versions(fleet).values()) == {"2.0.0"}, "stable devices on 2.0.0")

            # demote stable through its confirmation
            page.goto(f"{base}/ui/channels")
            page.locator("#channel-iris-stable a.demote").click()
            expect(page.locator("h1")).to_have_text("Demote iris · stable to 1.0.0?")
            page.fill("input[name=reason]", "accuracy dropped")
            page.click("#confirm-channel")
            expect(page).to_have_url(re.compile(r"/ui/channels$"))
            _wait(
                lambda: versions(fleet) == {"pi-beta": "2.0.0", "pi-s0": "1.0.0", "pi-s1": "1.0.0"},
                "stable devices back on 1.0.0",
            )
            page.reload()
            expect(page.locator("#channel-iris-stable h2")).to_contain_text("1.0.0")
            expect(page.locator("#channel-iris-stable")).to_contain_text("accuracy dropped")
            page.screenshot(path="/tmp/edgefleet-channels.png", full_page=True)

            # the bundle page shows where 2.0.0 has been, when and why
            page.goto(f"{base}/ui/bundles/{fleet['v2']}")
            rows = page.locator("table.lineage tr")
            expect(rows).to_have_count(3)
            expect(rows.nth(1)).to_contain_text("beta")
            expect(rows.nth(1)).to_contain_text("release candidate")
            expect(rows.nth(2)).to_contain_text("stable")

            # CSRF: the same POST without the session's token changes nothing
            r = page.request.post(
                f"{base}/ui/channels/iris/beta/demote", form={"confirm": "yes", "reason": "x"}
            )
            assert r.status == 403
            assert fleet["service"].channels.get("iris", "beta")["current"]["version"] == "2.0.0"
        finally:
            browser.close()
