"""HTTP hardening: auth before bodies, per-route caps, uploads, logins, sessions, file modes."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from fleet_server import auth
from fleet_server.app import create_app
from fleet_server.dashboard.throttle import LoginThrottle
from fleet_server.http_limits import MAX_JSON_BYTES, MAX_UPLOAD_BYTES
from fleet_server.service import FleetService
from protocol import KeyPair
from protocol.transport import MemoryBroker
from tests.fleet_server.fleetkit import Api, make_config
from tests.fleet_server.test_dashboard import PASSWORD, Browser
from tests.support.bundles import make_bundle


@pytest.fixture
def svc(tmp_path: Path, signing_key: KeyPair) -> Iterator[FleetService]:
    s = FleetService(make_config(tmp_path, signing_key), transport=MemoryBroker().client("s"))
    yield s
    s.repo.close()


def raw_post(app: Any, path: str, chunks: list[bytes], headers: dict[str, str]) -> tuple[int, int]:
    """POST through ASGI; returns (status, body bytes the app pulled from the client)."""
    pulled = 0
    sent: list[dict[str, Any]] = []
    parts = list(chunks)

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        if not parts:
            return {"type": "http.disconnect"}
        body = parts.pop(0)
        pulled += len(body)
        return {"type": "http.request", "body": body, "more_body": bool(parts)}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 5000),
        "server": ("fleet", 80),
    }
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], pulled


def test_an_unauthenticated_body_is_refused_before_a_byte_is_read(svc: FleetService) -> None:
    app = create_app(svc)
    big = [b"{" + b" " * (1 << 20)] * 300  # 300 MB offered, never read
    status, pulled = raw_post(app, "/v1/rollouts", big, {"content-type": "application/json"})
    assert (status, pulled) == (401, 0)
    status, pulled = raw_post(
        app, "/v1/bundles", big, {"authorization": "Bearer eft_wrong", "content-length": "1"}
    )
    assert (status, pulled) == (401, 0)


def test_bodies_over_the_route_cap_get_413_naming_the_limit(svc: FleetService) -> None:
    app = create_app(svc)
    token = svc.create_token("operator")
    api = Api(app, token)
    r = api.post("/v1/rollouts", content=b"{" + b" " * MAX_JSON_BYTES + b"}")
    assert r.status_code == 413 and str(MAX_JSON_BYTES) in r.json()["detail"]
    headers = {"authorization": f"Bearer {token}", "content-type": "application/json"}
    streamed = [b"{" + b" " * 65536] * 8  # no Content-Length: counted while it streams
    status, pulled = raw_post(app, "/v1/rollouts", streamed, headers)
    assert status == 413 and pulled <= MAX_JSON_BYTES + 65537
    declared = {"authorization": f"Bearer {token}", "content-length": str(MAX_UPLOAD_BYTES + 1)}
    assert raw_post(app, "/v1/bundles", [b"x"], declared) == (413, 0)


def test_reuploading_a_version_with_other_bytes_is_409_and_the_same_bytes_are_idempotent(
    svc: FleetService, signing_key: KeyPair
) -> None:
    api = Api(create_app(svc), svc.create_token("operator"))
    first, _ = make_bundle(signing_key, version="1.0.0", release=1)
    other, _ = make_bundle(signing_key, version="1.0.0", release=1, expires_in=timedelta(days=9))
    assert first != other
    a = api.post("/v1/bundles", content=first)
    assert a.status_code == 201
    again = api.post("/v1/bundles", content=first)
    assert again.status_code == 201 and again.json()["sha256"] == a.json()["sha256"]
    clash = api.post("/v1/bundles", content=other)
    assert clash.status_code == 409 and "iris@1.0.0" in clash.json()["detail"]
    assert len(svc.list_bundles()) == 1
    leftovers = [p for p in svc.artifacts.root.iterdir() if p.name.startswith(".upload-")]
    assert leftovers == []


def test_login_is_throttled_per_user_and_per_address_with_backoff() -> None:
    now = [0.0]
    t = LoginThrottle(free=3, base_s=1.0, max_s=60.0, clock=lambda: now[0])
    for _ in range(3):
        assert t.wait_s("alice", "10.0.0.1") == 0
        t.failed("alice", "10.0.0.1")
    assert t.wait_s("alice", "10.0.0.1") == 0  # three failures are free
    t.failed("alice", "10.0.0.1")
    assert t.wait_s("alice", "10.0.0.9") == pytest.approx(1.0)  # the user is locked anywhere
    assert t.wait_s("bob", "10.0.0.1") == pytest.approx(1.0)  # and the address for any user
    assert t.wait_s("bob", "10.0.0.2") == 0
    now[0] += 1.0
    t.failed("alice", "10.0.0.1")
    assert t.wait_s("alice", "10.0.0.1") == pytest.approx(2.0)  # doubles
    now[0] += 2.0
    t.failed("alice", "10.0.0.1")
    assert t.wait_s("alice", "10.0.0.1") == pytest.approx(4.0)
    t.succeeded("alice", "10.0.0.1")
    assert t.wait_s("alice", "10.0.0.9") == 0


def test_dashboard_answers_429_after_repeated_failures(svc: FleetService) -> None:
    svc.add_user("op", PASSWORD, "operator")
    b = Browser(create_app(svc))
    codes = [b.login("op", "wrong").status_code for _ in range(7)]
    assert codes[:5] == [401] * 5 and codes[-1] == 429
    r = b.login("op")  # even the right password waits
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1


def test_an_unknown_user_costs_the_same_password_hashing_as_a_known_one(
    svc: FleetService, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc.add_user("op", PASSWORD, "operator")
    calls: list[str] = []
    real = auth.verify_password

    def counting(password: str, stored: str) -> bool:
        calls.append(stored.split("$")[0])
        return real(password, stored)

    monkeypatch.setattr(auth, "verify_password", counting)
    assert svc.authenticate_user("op", "wrong") is None
    known = list(calls)
    calls.clear()
    assert svc.authenticate_user("nobody", "wrong") is None
    assert calls == known == ["scrypt"]


def test_logout_revokes_the_session_on_the_server(svc: FleetService) -> None:
    svc.add_user("op", PASSWORD, "operator")
    b = Browser(create_app(svc))
    assert b.login("op").status_code == 303
    kept = b.cookies.get("edgefleet_session")
    assert b.get("/ui/").status_code == 200
    assert b.post("/ui/logout", data={"csrf": b.csrf()}).status_code == 303
    thief = Browser(b.app)
    thief.cookies.set("edgefleet_session", kept)
    r = thief.get("/ui/")
    assert r.status_code == 303 and r.headers["location"].startswith("/ui/login")


def test_session_cookie_is_secure_when_served_over_https(svc: FleetService) -> None:
    import re

    import httpx

    svc.add_user("op", PASSWORD, "operator")
    app = create_app(svc)

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="https://fleet") as c:
            form = await c.get("/ui/login")
            nonce = re.search(r'name="nonce" value="([^"]+)"', form.text)
            assert nonce is not None
            data = {"username": "op", "password": PASSWORD, "nonce": nonce.group(1)}
            return await c.post("/ui/login", data=data)

    r = asyncio.run(go())
    cookie = next(c for c in r.headers.get_list("set-cookie") if c.startswith("edgefleet_session"))
    assert all(f in cookie.lower() for f in ("httponly", "samesite=strict", "secure"))


@pytest.mark.parametrize("umask", [0o022, 0o000])
def test_registry_and_artifacts_are_private_whatever_the_umask(
    tmp_path: Path, signing_key: KeyPair, umask: int
) -> None:
    old = os.umask(umask)
    try:
        svc = FleetService(make_config(tmp_path, signing_key), transport=None)
        svc.upload_bundle(make_bundle(signing_key)[0])
        svc.repo.close()
    finally:
        os.umask(old)
    data = svc.config.data_dir
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(data) == 0o700
    files = [p for p in data.rglob("*") if p.is_file()]
    dirs = [p for p in data.rglob("*") if p.is_dir()]
    assert any(p.name == "fleet.db" for p in files) and dirs
    assert {str(p.relative_to(data)): oct(mode(p)) for p in files if mode(p) != 0o600} == {}
    assert {str(p.relative_to(data)): oct(mode(p)) for p in dirs if mode(p) != 0o700} == {}
