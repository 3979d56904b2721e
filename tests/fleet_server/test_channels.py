"""Release channels through the REST API, over a real service on the in-memory broker with
simulated devices (the real-agent version is tests/e2e/test_channels.py). The clock is
injected, so hold times are exact."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet_server.app import create_app
from fleet_server.service import FleetService
from protocol import KeyPair, TrustStore
from protocol.transport import MemoryBroker
from tests.fleet_server.fleetkit import Api, SimDevice, make_config
from tests.support.bundles import make_bundle


class ChannelDevice(SimDevice):
    """A simulated device whose (signed) birth message names the channel it follows."""


def make_bundles(key: KeyPair) -> dict[str, bytes]:
    return {
        v: make_bundle(key, version=v, release=r, profiles=("host",))[0]
        for v, r in (("1.0.0", 1), ("1.1.0", 2), ("1.2.0", 3))
    }


@pytest.fixture(scope="module")
def bundles(signing_key: KeyPair) -> dict[str, bytes]:
    return make_bundles(signing_key)


class Fleet:
    def __init__(self, tmp: Path, key: KeyPair, repo: Any = None) -> None:
        self.now = time.time()
        self.broker = MemoryBroker()
        self.key = key
        self.service = FleetService(
            make_config(tmp, key),
            repo=repo,
            transport=self.broker.client("server"),
            clock=lambda: self.now,
        )
        assert self.service.bridge is not None
        self.service.bridge.start()
        self.service.transport.connect()  # type: ignore[union-attr]
        self.api = Api(create_app(self.service))
        self.tokens = {r: self.service.create_token(r, name=r) for r in ("viewer", "operator")}
        self.devices: dict[str, ChannelDevice] = {}

    def as_(self, role: str) -> Api:
        return self.api.as_(self.tokens[role])

    def device(self, device_id: str, channel: str | None) -> ChannelDevice:
        dev = ChannelDevice(
            device_id, self.broker.client(device_id), TrustStore.from_keys([self.key.public])
        )
        dev.channel = channel
        self.devices[device_id] = dev.start()
        return dev

    def tick(self, seconds: float = 2.0, n: int = 4) -> None:
        for _ in range(n):
            self.now += seconds
            self.service.tick()

    def versions(self) -> dict[str, str | None]:
        return {d: (x.model.version if x.model else None) for d, x in self.devices.items()}


@pytest.fixture
def fleet(tmp_path: Path, signing_key: KeyPair, bundles: dict[str, bytes]) -> Iterator[Fleet]:
    f = Fleet(tmp_path, signing_key)
    for data in bundles.values():
        r = f.as_("operator").post(
            "/v1/bundles", content=data, headers={"content-type": "application/octet-stream"}
        )
        assert r.status_code == 201, r.text
    yield f
    f.service.repo.close()


def promote(fleet: Fleet, ref: str, to: str, **kw: Any) -> Any:
    return fleet.as_("operator").post(
        "/v1/promotions", json={"bundle": ref, "to": to, "reason": "test", **kw}
    )


def test_every_model_has_beta_and_stable_by_default(fleet: Fleet) -> None:
    rows = fleet.as_("viewer").get("/v1/channels").json()
    assert [(r["model"], r["channel"]) for r in rows] == [("iris", "beta"), ("iris", "stable")]
    stable = rows[1]
    assert stable["current"] is None and stable["policy"]["requires"] == "beta"


def test_promotion_reaches_only_the_channels_devices_and_is_audited(fleet: Fleet) -> None:
    fleet.device("b1", "beta")
    fleet.device("s1", "stable")
    r = promote(fleet, "iris@1.0.0", "beta")
    assert r.status_code == 201, r.text
    fleet.tick()
    assert fleet.versions() == {"b1": "1.0.0", "s1": None}
    audit = fleet.service.audit(target="channel:iris/beta")
    assert audit[0]["action"] == "channel.promote" and audit[0]["actor"] == "api:operator"
    assert "test" in audit[0]["reason"]
    assert fleet.as_("viewer").get("/v1/channels/iris/beta").json()["current"]["version"] == "1.0.0"


def test_stable_refuses_until_beta_succeeded_and_held_naming_the_condition(fleet: Fleet) -> None:
    fleet.as_("operator").put("/v1/channels/iris/stable", json={"hold_s": 600})
    fleet.device("b1", "beta")
    fleet.device("s1", "stable")
    r = promote(fleet, "iris@1.0.0", "stable")
    assert r.status_code == 409
    body = r.json()
    assert "requires" in body["detail"] and body["field"] == "conditions"
    assert [c["name"] for c in body["conditions"] if not c["ok"]] == ["requires"]
    assert fleet.service.audit(target="channel:iris/stable")[0]["action"] == (
        "channel.promote_refused"
    )
    promote(fleet, "iris@1.0.0", "beta")
    fleet.tick()
    r = promote(fleet, "iris@1.0.0", "stable")
    assert r.status_code == 409 and "must hold 600 s" in r.json()["detail"]
    fleet.now += 600
    r = promote(fleet, "iris@1.0.0", "stable")
    assert r.status_code == 201, r.text
    fleet.tick()
    assert fleet.versions() == {"b1": "1.0.0", "s1": "1.0.0"}


def _to_stable(fleet: Fleet, version: str) -> None:
    fleet.as_("operator").put("/v1/channels/iris/stable", json={"hold_s": 0})
    assert promote(fleet, f"iris@{version}", "beta").status_code == 201
    fleet.tick()
    r = promote(fleet, f"iris@{version}", "stable")
    assert r.status_code == 201, r.text
    fleet.tick()


def test_a_late_joiner_and_a_drifted_device_get_the_channels_bundle(fleet: Fleet) -> None:
    fleet.device("b1", "beta")
    fleet.device("s1", "stable")
    _to_stable(fleet, "1.0.0")
    _to_stable(fleet, "1.1.0")
    assert fleet.versions() == {"b1": "1.1.0", "s1": "1.1.0"}
    late = fleet.device("s2", "stable")  # joins with nothing installed
    fleet.tick()
    assert late.model is not None and late.model.version == "1.1.0"
    audit = fleet.service.audit(target="channel:iris/stable")
    assert any(a["action"] == "channel.deliver" and "late joiner" in a["reason"] for a in audit)
    # s1 is restored from an old image: runs 1.0.0 again
    s1 = fleet.devices["s1"]
    s1.model, s1.previous = s1.previous[0], []
    assert s1.model.version == "1.0.0"
    s1.birth()
    fleet.tick()
    assert s1.model.version == "1.1.0"
    assert any(
        "drift back" in a["reason"] for a in fleet.service.audit(target="channel:iris/stable")
    )


def test_a_server_set_channel_overrides_the_agents_and_brings_the_device_over(
    fleet: Fleet,
) -> None:
    fleet.device("b1", "beta")
    d = fleet.device("x1", None)
    assert promote(fleet, "iris@1.0.0", "beta").status_code == 201
    fleet.tick()
    assert d.model is None
    r = fleet.as_("operator").put("/v1/devices/x1/channel", json={"channel": "iris/beta"})
    assert r.status_code == 200, r.text
    fleet.tick()
    assert d.model is not None and d.model.version == "1.0.0"
    assert (
        fleet.as_("operator")
        .put("/v1/devices/x1/channel", json={"channel": "Not A Channel"})
        .status_code
        == 422
    )


def test_demotion_rolls_the_channels_devices_back_and_lineage_shows_every_move(
    fleet: Fleet,
) -> None:
    fleet.device("s1", "stable")
    fleet.device("s2", "stable")
    fleet.device("b1", "beta")
    _to_stable(fleet, "1.0.0")
    _to_stable(fleet, "1.1.0")
    assert fleet.versions() == {"s1": "1.1.0", "s2": "1.1.0", "b1": "1.1.0"}
    op = fleet.as_("operator")
    r = op.post("/v1/channels/iris/stable/demote", json={"reason": "bad field accuracy"})
    assert r.status_code == 200, r.text
    assert r.json()["current"]["version"] == "1.0.0" and r.json()["rolled_back"]
    fleet.tick()
    assert fleet.versions() == {"s1": "1.0.0", "s2": "1.0.0", "b1": "1.1.0"}
    rollbacks = [c for c in fleet.devices["s1"].commands if c.kind == "rollback"]
    assert rollbacks and rollbacks[0].signature is not None
    lineage = fleet.as_("viewer").get("/v1/bundles/iris@1.1.0/lineage").json()["lineage"]
    assert [(x["channel"], x["action"]) for x in lineage] == [
        ("beta", "promote"),
        ("stable", "promote"),
    ]
    lineage = fleet.as_("viewer").get("/v1/bundles/iris@1.0.0/lineage").json()["lineage"]
    assert [(x["channel"], x["action"]) for x in lineage][-1] == ("stable", "demote")
    assert "bad field accuracy" in lineage[-1]["reason"]
    # nothing older to return to
    assert op.post("/v1/channels/iris/stable/demote", json={}).status_code == 409


def test_an_archived_bundle_needs_force_which_is_audited(fleet: Fleet) -> None:
    fleet.device("b1", "beta")
    op = fleet.as_("operator")
    assert op.post("/v1/bundles/iris@1.0.0/archive", json={"reason": "old"}).status_code == 200
    r = promote(fleet, "iris@1.0.0", "beta")
    assert r.status_code == 409
    assert [c["name"] for c in r.json()["conditions"] if not c["ok"]] == ["not_archived"]
    r = promote(fleet, "iris@1.0.0", "beta", force=True)
    assert r.status_code == 201, r.text
    actions = [a["action"] for a in fleet.service.audit(target="channel:iris/beta")]
    assert "channel.force" in actions


def test_an_older_release_cannot_be_promoted_over_a_newer_one(fleet: Fleet) -> None:
    assert promote(fleet, "iris@1.1.0", "beta").status_code == 201
    r = promote(fleet, "iris@1.0.0", "beta")
    assert r.status_code == 409 and "newer_release" in r.json()["detail"]


def test_a_halted_promotion_reverts_the_channel(fleet: Fleet) -> None:
    fleet.device("b1", "beta")
    assert promote(fleet, "iris@1.0.0", "beta").status_code == 201
    fleet.tick()
    fleet.devices["b1"].fail_versions = frozenset({"1.1.0"})
    fleet.devices["b1"].fail_install = True
    assert promote(fleet, "iris@1.1.0", "beta").status_code == 201
    fleet.tick()
    row = fleet.as_("viewer").get("/v1/channels/iris/beta").json()
    assert row["current"]["version"] == "1.0.0"
    assert row["history"][0]["action"] == "revert"


def test_bad_input_is_refused_naming_the_field(fleet: Fleet) -> None:
    op = fleet.as_("operator")
    r = op.put("/v1/channels/iris/canary", json={"stages": [50, 40]})
    assert r.status_code == 422 and r.json()["field"] == "stages"
    r = op.put("/v1/channels/iris/Canary!", json={})
    assert r.status_code == 422 and r.json()["field"] == "channel"
    r = op.put(
        "/v1/channels/iris/canary",
        content=b'{"hold_s": NaN}',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 422 and r.json()["field"] == "hold_s"
    r = op.put("/v1/channels/iris/canary", json={"requires": "canary"})
    assert r.status_code == 422 and r.json()["field"] == "requires"
    assert promote(fleet, "iris@9.9.9", "beta").status_code == 404
    r = promote(fleet, "iris@1.0.0", "nightly")
    assert r.status_code == 409 and "known_channel" in r.json()["detail"]
    assert (
        fleet.as_("viewer")
        .post("/v1/promotions", json={"bundle": "iris@1.0.0", "to": "beta"})
        .status_code
        == 403
    )
    assert op.post("/v1/promotions", json={"bundle": "iris@1.0.0", "to": "beta",
                                            "reason": "x" * 501}).status_code == 422  # fmt: skip


def test_a_user_defined_channel_takes_its_own_policy(fleet: Fleet) -> None:
    op = fleet.as_("operator")
    r = op.put("/v1/channels/iris/canary", json={"stages": [1, 100], "stage_unit": "count"})
    assert r.status_code == 200, r.text
    for i in range(3):
        fleet.device(f"c{i}", "canary")
    r = promote(fleet, "iris@1.0.0", "canary")
    assert r.status_code == 201, r.text
    status = op.get(f"/v1/rollouts/{r.json()['rollout_id']}").json()
    assert [s["devices"] for s in status["stages"]] == [1, 2]
    fleet.tick()
    assert set(fleet.versions().values()) == {"1.0.0"}


# dashboard (in-process; the full flow runs in Chromium: test_channels_browser.py) -----------
def test_the_channels_page_shows_a_viewer_no_actions_and_refuses_their_confirmations(
    fleet: Fleet,
) -> None:
    from tests.fleet_server.test_dashboard import PASSWORD, Browser

    fleet.service.add_user("watcher", PASSWORD, "viewer")
    fleet.service.add_user("ops", PASSWORD, "operator")
    fleet.device("b1", "beta")
    assert promote(fleet, "iris@1.0.0", "beta").status_code == 201
    fleet.tick()
    assert promote(fleet, "iris@1.1.0", "beta").status_code == 201
    fleet.tick()
    viewer = Browser(fleet.api.app)
    viewer.login("watcher")
    page = viewer.get("/ui/channels")
    assert page.status_code == 200 and "b1" in page.text and "1.1.0" in page.text
    assert "Promote…" not in page.text and "Demote to" not in page.text
    assert viewer.get("/ui/channels/iris/beta/demote").status_code == 403
    ops = Browser(fleet.api.app)
    ops.login("ops")
    page = ops.get("/ui/channels").text
    assert "Demote to 1.0.0…" in page
    assert page.count("Promote…") == 2  # beta (1.2.0) and stable (any)
    csrf = ops.csrf("/ui/channels")
    r = ops.post("/ui/channels/iris/beta/demote", data={"csrf": csrf, "reason": "x"})
    assert r.status_code == 422  # no confirm=yes: nothing happens
    assert fleet.service.channels.get("iris", "beta")["current"]["version"] == "1.1.0"
    r = ops.post(
        "/ui/channels/iris/beta/demote",
        data={"csrf": csrf, "confirm": "yes", "reason": "<script>alert(1)</script>"},
    )
    assert r.status_code == 303
    assert fleet.service.channels.get("iris", "beta")["current"]["version"] == "1.0.0"
    page = ops.get("/ui/channels").text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>alert" not in page
    lineage = ops.get("/ui/bundles/iris@1.0.0").text
    assert "demote" in lineage and "&lt;script&gt;" in lineage


def test_a_malformed_channel_in_a_state_message_is_ignored_and_counted(fleet: Fleet) -> None:
    fleet.device("b1", "beta")
    bad = fleet.device("x1", "../../Beta Channel")
    assert promote(fleet, "iris@1.0.0", "beta").status_code == 201
    fleet.tick()
    assert bad.model is None  # follows nothing
    assert fleet.service.repo.get_device("x1") is not None  # the state itself was kept
    assert "x1" not in fleet.service.repo.device_channels()
    assert fleet.service.exporter.render()[0].count(b'reason="channel_invalid"') == 1


def test_the_hold_time_restarts_when_beta_returns_to_the_bundle_by_a_demotion(
    fleet: Fleet,
) -> None:
    fleet.as_("operator").put("/v1/channels/iris/stable", json={"hold_s": 600})
    fleet.device("b1", "beta")
    assert promote(fleet, "iris@1.0.0", "beta").status_code == 201
    fleet.tick()
    assert promote(fleet, "iris@1.1.0", "beta").status_code == 201
    fleet.tick()
    fleet.now += 600  # 1.1.0 held long enough on beta, then 1.2.0 replaced it
    assert promote(fleet, "iris@1.2.0", "beta").status_code == 201
    fleet.tick()
    r = promote(fleet, "iris@1.1.0", "stable")
    assert r.status_code == 409 and "no longer current on beta" in r.json()["detail"]
    op = fleet.as_("operator")
    assert op.post("/v1/channels/iris/beta/demote", json={"reason": "1.2.0 bad"}).status_code == 200
    fleet.tick()
    assert fleet.versions() == {"b1": "1.1.0"}
    r = promote(fleet, "iris@1.1.0", "stable")  # current on beta again: the clock restarted
    assert r.status_code == 409 and "must hold 600 s" in r.json()["detail"]
    fleet.now += 600
    assert promote(fleet, "iris@1.1.0", "stable").status_code == 201


@pytest.mark.postgres
def test_promote_late_join_and_demote_on_a_postgresql_registry(
    tmp_path: Path, signing_key: KeyPair, bundles: dict[str, bytes], request: pytest.FixtureRequest
) -> None:
    from fleet_server.repository_pg import PostgresRepository

    server = request.getfixturevalue("postgres_server")
    url = server.create_database()
    f = Fleet(tmp_path, signing_key, repo=PostgresRepository(url, pool_size=2))
    try:
        for data in bundles.values():
            f.service.upload_bundle(data)
        f.device("b1", "beta")
        f.device("s1", "stable")
        _to_stable(f, "1.0.0")
        _to_stable(f, "1.1.0")
        late = f.device("s2", "stable")
        f.tick()
        assert late.model is not None and late.model.version == "1.1.0"
        r = f.as_("operator").post("/v1/channels/iris/stable/demote", json={"reason": "pg"})
        assert r.status_code == 200, r.text
        f.tick()
        # s2 joined with no model: its rollback has nothing to return to, and devices refuse
        # an older release, so it stays ahead of the channel (reported, not downgraded)
        assert f.versions() == {"b1": "1.1.0", "s1": "1.0.0", "s2": "1.1.0"}
        members = f.as_("viewer").get("/v1/channels/iris/stable").json()["devices"]
        status = {d["device_id"]: d["status"] for d in members}
        assert status["s1"] == "on the channel's version"
        assert status["s2"].startswith("ahead of the channel (1.1.0)")
        lineage = f.as_("viewer").get("/v1/bundles/iris@1.0.0/lineage").json()["lineage"]
        assert [(x["channel"], x["action"]) for x in lineage][-1] == ("stable", "demote")
    finally:
        f.service.repo.close()
        server.drop_database(url)


def test_a_channel_tag_set_on_the_server_moves_a_device_between_channels(fleet: Fleet) -> None:
    fleet.as_("operator").put("/v1/channels/iris/stable", json={"hold_s": 0})
    fleet.device("b1", "beta")
    d = fleet.device("s1", "stable")
    _to_stable(fleet, "1.0.0")
    assert promote(fleet, "iris@1.1.0", "beta").status_code == 201
    fleet.tick()
    assert d.model is not None and d.model.version == "1.0.0"
    r = fleet.as_("operator").put("/v1/devices/s1/tags", json={"tags": ["channel:beta"]})
    assert r.status_code == 200, r.text
    fleet.tick()
    assert d.model.version == "1.1.0"  # a channel change: it gets beta's bundle
    beta = fleet.as_("viewer").get("/v1/channels/iris/beta").json()
    assert [x["device_id"] for x in beta["devices"]] == ["b1", "s1"]
