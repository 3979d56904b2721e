"""The device list pages in headless Chromium: 100 a page, next/previous links with a cursor.

A real fleet server (uvicorn in a thread) on a real broker (amqtt). The 250 devices are
written into its registry through the repository (a paging test needs many rows; births
are tested in test_dashboard_browser.py): the overview counts them from the registry's
aggregate query, the list walks forward and back through three pages, a filter stays on
every link, and a forged cursor gets an error page naming the field.
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
from tests.fleet_server.fleetkit import write_keys
from tests.fleet_server.test_dashboard_browser import CHROMIUM, CHROMIUM_ARGS
from tests.support.brokers import free_port
from tests.support.keys import write_private

PASSWORD = "fleet-viewer-pw"
N = 250

pytestmark = [
    pytest.mark.chromium,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium"
    ),
    # amqtt 0.12.1 warns that psutil becomes an optional extra of its $SYS plugin.
    pytest.mark.filterwarnings("ignore:`BrokerSysPlugin`:DeprecationWarning"),
]


@pytest.fixture
def server(tmp_path: Path, signing_key: KeyPair, amqtt_broker: Any) -> Iterator[FleetServer]:
    prefix = f"pg{uuid.uuid4().hex[:8]}"
    _, pub = write_keys(tmp_path, signing_key)
    cfg = FleetConfig.model_validate(
        {
            "data_dir": str(tmp_path / "fleet"),
            "broker": {"url": amqtt_broker.url, "topic_prefix": prefix, "client_id": prefix},
            "api": {"host": "127.0.0.1", "port": free_port()},
            "signing": {
                "command_key": str(write_private(tmp_path / "command")),
                "bundle_keys": [str(pub)],
            },
        }
    )
    srv = FleetServer(cfg).start()
    service = srv.service
    assert service is not None
    try:
        service.add_user("viewer", PASSWORD, "viewer")
        for i in range(N):
            service.repo.upsert_device(
                f"dev-{i:04d}",
                profile="raspberry-pi-4" if i % 2 else "host",
                online=1 if i % 5 else 0,
                model="iris",
                version="1.0.0",
            )
        yield srv
    finally:
        srv.stop()


def _shown(page: Any) -> list[str]:
    return [
        t.strip() for t in page.locator("section.card table tr td:first-child a").all_inner_texts()
    ]


def test_device_list_pages_forward_and_back_with_cursor_links(server: FleetServer) -> None:
    from playwright.sync_api import expect, sync_playwright

    base = server.url
    ids = [f"dev-{i:04d}" for i in range(N)]
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(20_000)
        try:
            page.goto(f"{base}/ui/devices")
            page.fill("input[name=username]", "viewer")
            page.fill("input[name=password]", PASSWORD)
            page.click("button[type=submit]")
            expect(page.locator("h1")).to_have_text("Devices")

            # forward: 100, 100, 50; the last page has no next link
            assert _shown(page) == ids[:100]
            expect(page.locator("nav.pager a.prev")).to_have_count(0)
            page.click("nav.pager a.next")
            expect(page).to_have_url(re.compile(r"/ui/devices\?cursor="))
            assert _shown(page) == ids[100:200]
            page.click("nav.pager a.next")
            assert _shown(page) == ids[200:]
            expect(page.locator("nav.pager a.next")).to_have_count(0)

            # back: the previous links walk the same pages in reverse
            page.click("nav.pager a.prev")
            expect(page).to_have_url(re.compile(r"/ui/devices\?before="))
            assert _shown(page) == ids[100:200]
            page.click("nav.pager a.prev")
            assert _shown(page) == ids[:100]
            expect(page.locator("nav.pager a.prev")).to_have_count(0)
            page.click("nav.pager a.first")
            assert _shown(page) == ids[:100]

            # a filter stays on the paging links
            page.fill("form.filters input[name=profile]", "raspberry-pi-4")
            page.click("form.filters button[type=submit]")
            pis = [d for i, d in enumerate(ids) if i % 2]
            assert _shown(page) == pis[:100]
            page.click("nav.pager a.next")
            expect(page).to_have_url(re.compile(r"profile=raspberry-pi-4"))
            assert _shown(page) == pis[100:]

            # the overview's counts are the registry's aggregate, not the page
            page.click("nav >> text=Overview")
            expect(page.locator(".card.stat").first).to_contain_text(str(N))
            expect(page.locator(".card.stat").nth(2)).to_contain_text(str(N // 5))

            # a forged cursor: an error page that names the field, nothing else changes
            page.goto(f"{base}/ui/devices?cursor=not-a-cursor")
            expect(page.locator("p.flash.bad")).to_contain_text("cursor")
            page.screenshot(path="/tmp/edgefleet-devices-pages.png", full_page=True)
        finally:
            browser.close()
