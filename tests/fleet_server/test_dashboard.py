"""The dashboard in-process (httpx.ASGITransport): login, pages, confirmed actions, roles, CSRF."""

from __future__ import annotations

import asyncio
import base64
import json
import re
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet_server.app import create_app
from fleet_server.service import FleetService
from protocol import KeyPair, TrustStore
from protocol.messages import LatencySummary, MetricsReport, ModelRef, SketchReport
from protocol.sketches import SketchBuilder
from protocol.topics import Topics
from protocol.transport import MemoryBroker
from tests.fleet_server.fleetkit import SimDevice, make_config
from tests.support.bundles import make_bundle, trained

DASHBOARD = Path(__file__).resolve().parents[2] / "fleet_server" / "dashboard"
PASSWORD = "correct horse"


class Browser:
    """A cookie-keeping client over ASGITransport (no redirects followed)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.cookies = httpx.Cookies()

    def request(self, method: str, url: str, **kw: Any) -> httpx.Response:
        async def go() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://testserver", cookies=self.cookies
            ) as client:
                resp = await client.request(method, url, **kw)
                self.cookies = client.cookies
                return resp

        return asyncio.run(go())

    def get(self, url: str, **kw: Any) -> httpx.Response:
        return self.request("GET", url, **kw)

    def post(self, url: str, **kw: Any) -> httpx.Response:
        return self.request("POST", url, **kw)

    def login(self, user: str, password: str = PASSWORD, next_: str = "/ui/") -> httpx.Response:
        form = self.get(f"/ui/login?next={next_}")
        nonce = re.search(r'name="nonce" value="([^"]+)"', form.text).group(1)
        return self.post(
            "/ui/login",
            data={"username": user, "password": password, "nonce": nonce, "next": next_},
        )

    def csrf(self, url: str = "/ui/") -> str:
        return re.search(r'name="csrf" value="([^"]+)"', self.get(url).text).group(1)


@pytest.fixture(scope="module")
def bundles(signing_key: KeyPair) -> dict[str, bytes]:
    return {
        "v1": make_bundle(signing_key, version="1.0.0", release=1)[0],
        "v2": make_bundle(signing_key, version="2.0.0", release=2)[0],
        "pi": make_bundle(signing_key, version="3.0.0", release=3, profiles=("raspberry-pi-4",))[0],
    }


class Fleet:
    def __init__(self, tmp: Path, key: KeyPair, bundles: dict[str, bytes]) -> None:
        self.broker = MemoryBroker()
        self.service = FleetService(make_config(tmp, key), transport=self.broker.client("server"))
        self.service.bridge.start()
        self.service.transport.connect()
        self.app = create_app(self.service)
        for role in ("viewer", "operator"):
            self.service.add_user(role, PASSWORD, role)
        self.v1 = self.service.upload_bundle(bundles["v1"])
        self.v2 = self.service.upload_bundle(bundles["v2"])
        trust = TrustStore.from_keys([key.public])
        ref = ModelRef(name="iris", version="1.0.0", release=1)
        self.devices = [
            SimDevice(f"dev-{i}", self.broker.client(f"dev-{i}"), trust, model=ref).start()
            for i in range(4)
        ]

    def browser(self, role: str | None = None) -> Browser:
        b = Browser(self.app)
        if role:
            assert b.login(role).status_code == 303
        return b

    def publish(self, topic: str, payload: bytes) -> None:
        """Publish as the device the topic names (signed with its key)."""
        dev = next(d for d in self.devices if f"/devices/{d.device_id}/" in topic)
        dev.publish(topic, payload)


@pytest.fixture
def fleet(tmp_path: Path, signing_key: KeyPair, bundles: dict[str, bytes]) -> Iterator[Fleet]:
    f = Fleet(tmp_path, signing_key, bundles)
    yield f
    f.service.repo.close()


# login and sessions ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "url", ["/ui/", "/ui/devices", "/ui/rollouts", "/ui/drift", "/ui/devices/dev-0"]
)
def test_every_page_redirects_to_the_login_without_a_session(fleet: Fleet, url: str) -> None:
    r = fleet.browser().get(url)
    assert r.status_code == 303 and r.headers["location"].startswith("/ui/login?next=")


def test_login_with_a_wrong_password_is_refused_and_the_right_one_opens_a_session(
    fleet: Fleet,
) -> None:
    b = fleet.browser()
    bad = b.login("operator", "nope")
    assert bad.status_code == 401 and "Wrong user name or password" in bad.text
    ok = b.login("operator", next_="/ui/drift")
    assert ok.status_code == 303 and ok.headers["location"] == "/ui/drift"
    cookie = next(
        c for c in ok.headers.get_list("set-cookie") if c.startswith("edgefleet_session=")
    )
    assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
    assert "secure" not in cookie.lower()  # served over plain HTTP here
    assert b.get("/ui/").status_code == 200


def test_login_refuses_a_foreign_redirect_and_a_missing_nonce(fleet: Fleet) -> None:
    b = fleet.browser()
    assert b.login("viewer", next_="https://evil.example/").headers["location"] == "/ui/"
    forged = fleet.browser().post("/ui/login", data={"username": "viewer", "password": PASSWORD})
    assert forged.status_code == 403


def test_a_tampered_session_cookie_is_no_session(fleet: Fleet) -> None:
    b = fleet.browser("viewer")
    value = b.cookies["edgefleet_session"]
    body, sig = value.rsplit(".", 1)

    doc = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    doc["r"] = "admin"
    forged = base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()
    fresh = Browser(fleet.app)
    fresh.cookies.set("edgefleet_session", f"{forged}.{sig}")
    assert fresh.get("/ui/").status_code == 303


# pages ------------------------------------------------------------------------------------
def _telemetry(fleet: Fleet) -> None:
    tm = trained("iris-logreg")
    t = Topics()
    now = datetime.now(timezone.utc)
    ref = ModelRef(name="iris", version="1.0.0", release=1)
    rng = np.random.default_rng(0)
    for i, dev in enumerate(fleet.devices[:2]):
        b = SketchBuilder(tm.input_schema)
        b.update_rows(tm.X * 1.4 + rng.normal(0, 0.05, tm.X.shape))  # clearly shifted
        rep = SketchReport(
            device_id=dev.device_id,
            model=ref,
            window_start=now,
            window_end=now,
            seq=0,
            sketches=b.build(),
        )
        fleet.publish(t.sketch(dev.device_id), rep.to_json())
        m = MetricsReport(
            device_id=dev.device_id,
            seq=i,
            window_start=now,
            window_end=now,
            model=ref,
            requests=100,
            errors=i,
            feedback_count=20,
            accuracy=0.8 + 0.1 * i,
            latency=LatencySummary(count=100, p50_ms=1.0 + i, p95_ms=3.0 + i),
        )
        fleet.publish(t.metrics(dev.device_id), m.to_json())
    fleet.service.evaluate_drift("iris", "1.0.0")


def test_overview_shows_devices_by_profile_version_and_state(fleet: Fleet) -> None:
    fleet.devices[3].stop()
    page = fleet.browser("viewer").get("/ui/").text
    assert "Fleet overview" in page and "iris 1.0.0" in page
    assert re.search(r">online</a></td>\s*<td[^>]*>.*?</td>\s*<td class=\"n\">3<", page, re.S)
    assert re.search(r">offline</a></td>\s*<td[^>]*>.*?</td>\s*<td class=\"n\">1<", page, re.S)


def test_device_page_shows_history_latency_and_last_seen(fleet: Fleet) -> None:
    _telemetry(fleet)
    page = fleet.browser("viewer").get("/ui/devices/dev-1").text
    assert "dev-1" in page and "Version history" in page and "last seen" in page
    assert '<svg class="chart lines"' in page  # the latency chart
    assert fleet.browser("viewer").get("/ui/devices/nope").status_code == 404


def test_drift_page_charts_reference_against_current_with_ks_psi_and_field_quality(
    fleet: Fleet,
) -> None:
    _telemetry(fleet)
    b = fleet.browser("viewer")
    index = b.get("/ui/drift").text
    assert "/ui/drift/iris/1.0.0" in index and "drift</span>" in index
    page = b.get("/ui/drift/iris/1.0.0").text
    for feature in ("sepal_length", "petal_width"):
        assert feature in page
    assert page.count('<svg class="chart bars"') == 4
    assert page.count('class="ref"') > 10 and page.count('class="cur"') > 10
    assert "KS " in page and "PSI " in page
    assert "85.0%" in page  # accuracy (0.8·20 + 0.9·20) / 40 from device feedback
    assert "Share of drifted features" in page


# rollouts ---------------------------------------------------------------------------------
def _plan_and_start(b: Browser, fleet: Fleet, **fields: str) -> httpx.Response:
    form = {
        "csrf": b.csrf("/ui/rollouts"),
        "bundle": fleet.v2["sha256"],
        "selector": "",
        "stages": "50,100",
        "stage_unit": "percent",
        **fields,
    }
    plan = b.post("/ui/rollouts/plan", data=form)
    assert plan.status_code == 200 and "Start this rollout?" in plan.text
    hidden = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', plan.text))
    assert hidden["confirm"] == "yes"
    return b.post("/ui/rollouts/create", data=hidden)


def test_operator_plans_confirms_starts_and_rolls_back_with_confirmation(fleet: Fleet) -> None:
    b = fleet.browser("operator")
    created = _plan_and_start(b, fleet)
    assert created.status_code == 303
    url = created.headers["location"]
    rid = url.rsplit("/", 1)[1]
    for _ in range(6):
        fleet.service.tick()
    live = b.get(f"{url}/live.json").json()
    assert live["state"] == "succeeded" and live["counts"]["installed"] == 4
    assert all(d.model.version == "2.0.0" for d in fleet.devices)
    page = b.get(url).text
    assert 'id="action-rollback"' in page and "Gate decisions" in page and "stage." in page

    # pressing the button only asks; posting without confirm=yes does nothing
    ask = b.get(f"/ui/rollouts/{rid}/confirm/rollback")
    assert ask.status_code == 200 and "Roll back rollout" in ask.text
    csrf = re.search(r'name="csrf" value="([^"]+)"', ask.text).group(1)
    unconfirmed = b.post(f"/ui/rollouts/{rid}/rollback", data={"csrf": csrf})
    assert unconfirmed.status_code == 422 and "confirmation" in unconfirmed.text
    assert fleet.service.rollout_status(rid)["state"] == "succeeded"

    done = b.post(f"/ui/rollouts/{rid}/rollback", data={"csrf": csrf, "confirm": "yes"})
    assert done.status_code == 303
    fleet.service.tick()
    assert fleet.service.rollout_status(rid)["state"] == "rolled_back"
    assert all(d.model.version == "1.0.0" for d in fleet.devices)
    assert any(
        a["actor"] == "dashboard:operator" and a["action"] == "rollout.rollback"
        for a in fleet.service.audit(target=f"rollout:{rid}")
    )


def test_rollout_page_shows_only_the_actions_that_apply_to_its_state(fleet: Fleet) -> None:
    b = fleet.browser("operator")
    url = _plan_and_start(b, fleet, stages="50,100", soak_s="3600").headers["location"]
    rid = url.rsplit("/", 1)[1]

    def buttons() -> list[str]:
        return re.findall(r'id="action-([a-z]+)"', b.get(url).text)

    assert fleet.service.rollout_status(rid)["state"] == "running"
    assert buttons() == ["pause", "abort", "rollback"]
    assert buttons() == re.findall(
        r'id="action-([a-z]+)"', b.get(f"{url}/live.json").json()["html"]
    )
    fleet.service.pause_rollout(rid, actor="test")
    assert buttons() == ["resume", "abort", "rollback"]
    refused = b.get(f"/ui/rollouts/{rid}/confirm/pause")
    assert refused.status_code == 409 and "does not apply" in refused.text
    fleet.service.abort_rollout(rid, actor="test")
    assert buttons() == []
    assert b.get(f"/ui/rollouts/{rid}/confirm/rollback").status_code == 409


def test_plan_page_shows_the_selector_as_typed_not_as_a_dict(fleet: Fleet) -> None:
    b = fleet.browser("operator")
    form = {
        "csrf": b.csrf("/ui/rollouts"),
        "bundle": fleet.v2["sha256"],
        "selector": "profile=host",
        "stages": "50,100",
        "stage_unit": "percent",
    }
    plan = b.post("/ui/rollouts/plan", data=form)
    assert plan.status_code == 200, plan.text
    shown = re.search(r'<code id="plan-selector">([^<]*)</code>', plan.text).group(1)
    assert shown == "profile=host" and "{" not in shown


def test_stage_with_no_devices_is_shown_as_empty_not_passed(fleet: Fleet) -> None:
    b = fleet.browser("operator")
    # 4 devices in count stages 4 then 10: the second stage has no device left to take
    url = _plan_and_start(b, fleet, stages="4,10", stage_unit="count").headers["location"]
    for _ in range(6):
        fleet.service.tick()
    html = b.get(f"{url}/live.json").json()["html"]
    rows = re.findall(r'<tr class="stage" data-state="[a-z_]+"><td>(\d)</td>.*?</tr>', html, re.S)
    second = re.search(r'<tr class="stage" data-state="[a-z_]+"><td>2</td>.*?</tr>', html, re.S)
    assert rows == ["1", "2"] and second is not None
    assert ">empty<" in second.group(0) and ">passed<" not in second.group(0)


def test_viewer_sees_rollouts_but_cannot_plan_or_act(fleet: Fleet) -> None:
    rid = _plan_and_start(fleet.browser("operator"), fleet).headers["location"].rsplit("/", 1)[1]
    v = fleet.browser("viewer")
    page = v.get(f"/ui/rollouts/{rid}").text
    assert "action-rollback" not in page and "Plan rollout" not in v.get("/ui/rollouts").text
    assert v.get(f"/ui/rollouts/{rid}/confirm/abort").status_code == 403
    csrf = v.csrf()
    r = v.post(f"/ui/rollouts/{rid}/abort", data={"csrf": csrf, "confirm": "yes"})
    assert r.status_code == 403 and "operator role" in r.text
    assert fleet.service.rollout_status(rid)["state"] != "aborted"


def test_a_post_without_the_session_csrf_token_is_refused(fleet: Fleet) -> None:
    b = fleet.browser("operator")
    rid = _plan_and_start(b, fleet).headers["location"].rsplit("/", 1)[1]
    r = b.post(f"/ui/rollouts/{rid}/abort", data={"csrf": "guessed", "confirm": "yes"})
    assert r.status_code == 403 and "CSRF" in r.text
    assert b.post(f"/ui/rollouts/{rid}/abort", data={"confirm": "yes"}).status_code == 403
    assert fleet.service.rollout_status(rid)["state"] != "aborted"


@pytest.mark.parametrize(
    ("fields", "status", "text"),
    [
        ({"stages": "5,lots"}, 422, "stages"),
        ({"selector": "id=ghost"}, 404, "ghost"),
        ({"selector": "colour=red"}, 422, "selector"),
        ({"soak_s": "soon"}, 422, "soak_s"),
        ({"bundle": "ffffffffff"}, 404, "bundle"),
    ],
)
def test_bad_rollout_form_input_gets_a_readable_4xx_page(
    fleet: Fleet, fields: dict[str, str], status: int, text: str
) -> None:
    b = fleet.browser("operator")
    form = {
        "csrf": b.csrf("/ui/rollouts"),
        "bundle": fleet.v2["sha256"],
        "stages": "50,100",
        **fields,
    }
    r = b.post("/ui/rollouts/plan", data=form)
    assert r.status_code == status and text in r.text
    assert fleet.service.list_rollouts() == []


def test_a_profile_the_bundle_was_not_benchmarked_for_needs_force(
    fleet: Fleet, bundles: dict[str, bytes]
) -> None:
    pi = fleet.service.upload_bundle(bundles["pi"])
    b = fleet.browser("operator")
    form = {"csrf": b.csrf("/ui/rollouts"), "bundle": pi["sha256"], "stages": "100"}
    refused = b.post("/ui/rollouts/plan", data=form)
    assert refused.status_code == 422 and "benchmarked" in refused.text
    assert b.post("/ui/rollouts/plan", data={**form, "force": "yes"}).status_code == 200


def test_upload_refuses_a_tampered_bundle_and_accepts_a_signed_one(
    fleet: Fleet, bundles: dict[str, bytes], signing_key: KeyPair
) -> None:
    b = fleet.browser("operator")
    csrf = b.csrf("/ui/rollouts")
    tampered = bytearray(bundles["pi"])
    tampered[len(tampered) // 2] ^= 0xFF
    bad = b.post("/ui/bundles", data={"csrf": csrf}, files={"bundle": ("x.efb", bytes(tampered))})
    assert bad.status_code == 422 and "refused" in bad.text
    good = b.post("/ui/bundles", data={"csrf": csrf}, files={"bundle": ("pi.efb", bundles["pi"])})
    assert good.status_code == 303 and good.headers["location"].startswith("/ui/rollouts?bundle=")
    assert "3.0.0" in b.get(good.headers["location"]).text
    v = fleet.browser("viewer")
    r = v.post("/ui/bundles", data={"csrf": v.csrf()}, files={"bundle": ("pi.efb", bundles["pi"])})
    assert r.status_code == 403


# assets -----------------------------------------------------------------------------------
def test_assets_ship_in_the_package_and_nothing_loads_from_elsewhere(fleet: Fleet) -> None:
    b = fleet.browser()
    css = b.get("/ui/static/dashboard.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    assert b.get("/ui/static/dashboard.js").headers["content-type"].startswith("text/javascript")
    assert b.get("/ui/static/..%2Froutes.py").status_code == 404
    assert b.get("/ui/static/missing.css").status_code == 404
    for path in [*DASHBOARD.glob("templates/*.html"), *DASHBOARD.glob("static/*")]:
        text = path.read_text()
        assert not re.search(r"(src|href)=\"(https?:)?//", text), path
        assert "@import" not in text and "url(http" not in text, path


def test_session_cookie_is_secure_behind_an_https_proxy(fleet: Fleet) -> None:
    b = fleet.browser()
    form = b.get("/ui/login")
    nonce = re.search(r'name="nonce" value="([^"]+)"', form.text).group(1)
    r = b.post(
        "/ui/login",
        data={"username": "viewer", "password": PASSWORD, "nonce": nonce},
        headers={"x-forwarded-proto": "https"},
    )
    assert r.status_code == 303 and "secure" in r.headers["set-cookie"].lower()
    assert "secure" not in form.headers["set-cookie"].lower()  # plain http here


@given(user=st.text(min_size=1, max_size=40), flip=st.integers(min_value=0, max_value=10_000))
@settings(max_examples=60, deadline=None)
def test_a_session_cookie_round_trips_and_any_flipped_character_invalidates_it(
    user: str, flip: int
) -> None:
    from fleet_server.dashboard.session import Sessions

    sessions = Sessions(b"k" * 32)
    cookie, issued = sessions.issue(user, "operator", now=1000.0)
    assert sessions.read(cookie, now=1001.0) == issued
    assert sessions.read(cookie, now=issued.expires + 1) is None  # expired
    assert Sessions(b"x" * 32).read(cookie, now=1001.0) is None  # another server's secret
    i = flip % len(cookie)
    swapped = "A" if cookie[i] != "A" else "B"
    tampered = cookie[:i] + swapped + cookie[i + 1 :]
    got = sessions.read(tampered, now=1001.0)
    assert got is None or got == issued  # base64 padding bits may decode to the same bytes
