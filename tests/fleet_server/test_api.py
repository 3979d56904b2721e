"""The REST API in-process (httpx.ASGITransport) over a service on an in-memory broker."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet_server.app import create_app
from fleet_server.service import FleetService
from protocol import KeyPair, TrustStore
from protocol.transport import MemoryBroker
from tests.fleet_server.fleetkit import Api, SimDevice, make_config
from tests.support.bundles import make_bundle


@pytest.fixture(scope="module")
def bundle_v1(signing_key: KeyPair) -> bytes:
    return make_bundle(signing_key, version="1.0.0", release=1, profiles=("host",))[0]


@pytest.fixture(scope="module")
def bundle_v2(signing_key: KeyPair) -> bytes:
    return make_bundle(signing_key, version="2.0.0", release=2, profiles=("host",))[0]


class Fleet:
    def __init__(self, tmp: Path, key: KeyPair, **rollout: object) -> None:
        self.broker = MemoryBroker()
        self.key = key
        self.service = FleetService(
            make_config(tmp, key, **rollout), transport=self.broker.client("server")
        )
        assert self.service.bridge is not None
        self.service.bridge.start()
        self.service.transport.connect()  # type: ignore[union-attr]
        self.api = Api(create_app(self.service))
        self.tokens = {
            r: self.service.create_token(r, name=r) for r in ("viewer", "operator", "admin")
        }
        self.devices: dict[str, SimDevice] = {}

    def as_(self, role: str) -> Api:
        return self.api.as_(self.tokens[role])

    def device(self, device_id: str, **kw: object) -> SimDevice:
        trust = TrustStore.from_keys([self.key.public])
        dev = SimDevice(device_id, self.broker.client(device_id), trust, **kw)  # type: ignore[arg-type]
        self.devices[device_id] = dev.start()
        return dev


@pytest.fixture
def fleet(tmp_path: Path, signing_key: KeyPair) -> Iterator[Fleet]:
    f = Fleet(tmp_path, signing_key)
    yield f
    f.service.repo.close()


# auth ---------------------------------------------------------------------------------------
def test_request_without_token_gets_401_naming_the_header(fleet: Fleet) -> None:
    r = fleet.api.get("/v1/devices")
    assert r.status_code == 401
    assert r.json()["field"] == "authorization"


def test_request_with_unknown_token_gets_401(fleet: Fleet) -> None:
    assert fleet.api.as_("eft_not-a-token").get("/v1/devices").status_code == 401


def test_viewer_cannot_upload_or_act_and_gets_403(fleet: Fleet, bundle_v1: bytes) -> None:
    viewer = fleet.as_("viewer")
    assert viewer.get("/v1/devices").status_code == 200
    assert viewer.post("/v1/bundles", content=bundle_v1).status_code == 403
    assert viewer.post("/v1/rollouts/r-x/start").status_code == 403
    assert fleet.as_("operator").post("/v1/tokens", json={"role": "admin"}).status_code == 403


def test_admin_creates_a_token_that_then_works(fleet: Fleet) -> None:
    r = fleet.as_("admin").post("/v1/tokens", json={"role": "viewer", "name": "ci"})
    assert r.status_code == 201
    assert fleet.api.as_(r.json()["token"]).get("/v1/bundles").status_code == 200


# bundles --------------------------------------------------------------------------------------
def test_signed_bundle_uploads_lists_and_shows(fleet: Fleet, bundle_v1: bytes) -> None:
    op = fleet.as_("operator")
    r = op.post("/v1/bundles", content=bundle_v1)
    assert r.status_code == 201, r.text
    info = r.json()
    assert (info["name"], info["version"], info["profiles"]) == ("iris", "1.0.0", ["host"])
    assert [b["sha256"] for b in op.get("/v1/bundles").json()["items"]] == [info["sha256"]]
    shown = op.get("/v1/bundles/iris@1.0.0").json()
    assert shown["manifest"]["release"] == 1
    assert op.get(f"/v1/bundles/{info['sha256'][:12]}").status_code == 200
    assert op.get("/v1/bundles/iris@9.9.9").status_code == 404


def test_bundle_signed_by_an_untrusted_key_is_refused_with_the_reason(
    fleet: Fleet, other_key: KeyPair
) -> None:
    foreign, _ = make_bundle(other_key)
    r = fleet.as_("operator").post("/v1/bundles", content=foreign)
    assert r.status_code == 422
    assert r.json()["reason"] == "key_unknown"
    assert r.json()["field"] == "bundle"
    assert fleet.service.list_bundles() == []


def test_tampered_bundle_is_refused_and_the_registry_is_unchanged(
    fleet: Fleet, bundle_v1: bytes
) -> None:
    src = zipfile.ZipFile(io.BytesIO(bundle_v1))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "model.onnx":
                data = data[:-1] + bytes([data[-1] ^ 1])
            dst.writestr(info, data)
    r = fleet.as_("operator").post("/v1/bundles", content=out.getvalue())
    assert r.status_code == 422
    assert r.json()["reason"] == "hash_mismatch"
    assert fleet.service.list_bundles() == []


@pytest.mark.parametrize(("body", "reason"), [(b"not a zip", "archive_invalid"), (b"", None)])
def test_garbage_upload_is_refused(fleet: Fleet, body: bytes, reason: str | None) -> None:
    r = fleet.as_("operator").post("/v1/bundles", content=body)
    assert r.status_code == 422
    assert r.json().get("reason") == reason
    assert r.json()["field"] == "bundle"


# devices -------------------------------------------------------------------------------------
def test_devices_register_from_their_birth_state_and_filter(fleet: Fleet) -> None:
    fleet.device("pi-1", profile="raspberry-pi-4", tags=("lab",))
    fleet.device("gw-1", profile="host")
    fleet.devices["gw-1"].stop()
    v = fleet.as_("viewer")
    assert {d["device_id"] for d in v.get("/v1/devices").json()["items"]} == {"pi-1", "gw-1"}
    assert [
        d["device_id"]
        for d in v.get("/v1/devices", params={"profile": "raspberry-pi-4"}).json()["items"]
    ] == ["pi-1"]
    assert [
        d["device_id"] for d in v.get("/v1/devices", params={"tag": "lab"}).json()["items"]
    ] == ["pi-1"]
    assert [
        d["device_id"] for d in v.get("/v1/devices", params={"online": "false"}).json()["items"]
    ] == ["gw-1"]
    detail = v.get("/v1/devices/pi-1").json()
    assert detail["online"] is True and detail["profile"] == "raspberry-pi-4"


def test_unknown_device_is_404_naming_the_field(fleet: Fleet) -> None:
    r = fleet.as_("viewer").get("/v1/devices/nope")
    assert r.status_code == 404
    assert r.json()["field"] == "device_id"
    assert (
        fleet.as_("operator").put("/v1/devices/nope/tags", json={"tags": ["x"]}).status_code == 404
    )


def test_operator_tags_a_device_and_the_tag_selects_it(fleet: Fleet) -> None:
    fleet.device("d1")
    r = fleet.as_("operator").put("/v1/devices/d1/tags", json={"tags": ["canary"]})
    assert r.status_code == 200
    assert "canary" in r.json()["tags"]
    assert [
        d["device_id"]
        for d in fleet.as_("viewer").get("/v1/devices", params={"tag": "canary"}).json()["items"]
    ] == ["d1"]
    bad = fleet.as_("operator").put("/v1/devices/d1/tags", json={"tags": ["a,b"]})
    assert bad.status_code == 422 and bad.json()["field"] == "tags"


# rollouts --------------------------------------------------------------------------------------
def _upload(fleet: Fleet, data: bytes) -> str:
    r = fleet.as_("operator").post("/v1/bundles", content=data)
    assert r.status_code == 201, r.text
    return str(r.json()["sha256"])


def test_invalid_selector_is_refused_naming_the_selector(fleet: Fleet, bundle_v1: bytes) -> None:
    _upload(fleet, bundle_v1)
    fleet.device("d1")
    r = fleet.as_("operator").post(
        "/v1/rollouts", json={"bundle": "iris@1.0.0", "selector": "colour=red"}
    )
    assert r.status_code == 422
    assert r.json()["field"] == "selector"


def test_rollout_naming_an_unknown_device_is_404(fleet: Fleet, bundle_v1: bytes) -> None:
    _upload(fleet, bundle_v1)
    fleet.device("d1")
    r = fleet.as_("operator").post(
        "/v1/rollouts", json={"bundle": "iris@1.0.0", "selector": "id=ghost"}
    )
    assert r.status_code == 404
    assert "ghost" in r.json()["detail"] and r.json()["field"] == "selector"


def test_invalid_stages_are_refused_naming_the_field(fleet: Fleet, bundle_v1: bytes) -> None:
    _upload(fleet, bundle_v1)
    fleet.device("d1")
    op = fleet.as_("operator")
    r = op.post("/v1/rollouts", json={"bundle": "iris@1.0.0", "stages": [50, 10]})
    assert r.status_code == 422 and r.json()["field"] == "stages"
    r = op.post("/v1/rollouts", json={"bundle": "iris@1.0.0", "stages": ["x"]})
    assert r.status_code == 422 and r.json()["field"].startswith("stages")


def test_rollout_to_a_profile_the_bundle_was_not_benchmarked_for_needs_force_and_is_audited(
    fleet: Fleet, bundle_v1: bytes
) -> None:
    _upload(fleet, bundle_v1)
    fleet.device("pi-1", profile="raspberry-pi-4")
    op = fleet.as_("operator")
    body = {"bundle": "iris@1.0.0", "selector": "profile=raspberry-pi-4"}
    r = op.post("/v1/rollouts", json=body)
    assert r.status_code == 422
    assert "raspberry-pi-4" in r.json()["detail"] and r.json()["field"] == "selector"
    assert op.get("/v1/rollouts").json()["items"] == []
    r = op.post("/v1/rollouts", json=body, params={"force": "true"})
    assert r.status_code == 201
    audit = op.get("/v1/audit", params={"target": f"rollout:{r.json()['rollout_id']}"}).json()[
        "items"
    ]
    assert any(a["action"] == "rollout.force" and "raspberry-pi-4" in a["reason"] for a in audit)


def test_dry_run_plans_without_saving_or_sending(fleet: Fleet, bundle_v1: bytes) -> None:
    _upload(fleet, bundle_v1)
    for i in range(10):
        fleet.device(f"d{i}")
    r = fleet.as_("viewer").post(
        "/v1/rollouts/dry-run", json={"bundle": "iris@1.0.0", "stages": [10, 50, 100]}
    )
    assert r.status_code == 200, r.text
    plan = r.json()
    assert plan["dry_run"] is True
    assert [s["devices"] for s in plan["stages"]] == [1, 4, 5]
    assert fleet.as_("viewer").get("/v1/rollouts").json()["items"] == []
    assert all(not d.commands for d in fleet.devices.values())


def test_staged_rollout_through_the_api_reaches_every_device(
    fleet: Fleet, bundle_v1: bytes
) -> None:
    _upload(fleet, bundle_v1)
    for i in range(8):
        fleet.device(f"d{i}")
    op = fleet.as_("operator")
    r = op.post(
        "/v1/rollouts",
        json={"bundle": "iris@1.0.0", "stages": [25, 50, 100]},
        params={"start": "true"},
    )
    assert r.status_code == 201, r.text
    rid = r.json()["rollout_id"]
    for _ in range(5):
        fleet.service.tick()
    status = op.get(f"/v1/rollouts/{rid}").json()
    assert status["state"] == "succeeded"
    assert [s["state"] for s in status["stages"]] == ["passed"] * 3
    assert {d["state"] for d in status["devices"]} == {"installed"}
    assert any(x["action"] == "stage.passed" for x in status["decisions"])
    assert all(d.model is not None and d.model.version == "1.0.0" for d in fleet.devices.values())
    versions = op.get("/v1/devices", params={"version": "1.0.0"}).json()["items"]
    assert len(versions) == 8


def test_pause_resume_abort_and_conflicts(fleet: Fleet, bundle_v1: bytes) -> None:
    _upload(fleet, bundle_v1)
    fleet.device("d1")
    op = fleet.as_("operator")
    rid = op.post("/v1/rollouts", json={"bundle": "iris@1.0.0", "stages": [100]}).json()[
        "rollout_id"
    ]
    assert op.post(f"/v1/rollouts/{rid}/pause").status_code == 409
    assert op.post(f"/v1/rollouts/{rid}/start").json()["state"] in ("running", "succeeded")
    assert op.post(f"/v1/rollouts/{rid}/launch").status_code == 422
    assert op.post("/v1/rollouts/r-missing/start").status_code == 404


def test_rollback_returns_devices_to_the_previous_version(
    fleet: Fleet, bundle_v1: bytes, bundle_v2: bytes
) -> None:
    _upload(fleet, bundle_v1)
    _upload(fleet, bundle_v2)
    for i in range(4):
        fleet.device(f"d{i}")
    op = fleet.as_("operator")
    first = op.post(
        "/v1/rollouts", json={"bundle": "iris@1.0.0", "stages": [100]}, params={"start": "true"}
    )
    fleet.service.tick()
    assert op.get(f"/v1/rollouts/{first.json()['rollout_id']}").json()["state"] == "succeeded"
    rid = op.post(
        "/v1/rollouts", json={"bundle": "iris@2.0.0", "stages": [100]}, params={"start": "true"}
    ).json()["rollout_id"]
    fleet.service.tick()
    assert {d.model.version for d in fleet.devices.values() if d.model} == {"2.0.0"}
    r = op.post(f"/v1/rollouts/{rid}/rollback")
    assert r.json()["state"] == "rolled_back"
    assert {d.model.version for d in fleet.devices.values() if d.model} == {"1.0.0"}
    assert op.get(f"/v1/rollouts/{rid}").json()["counts"] == {"rolled_back": 4}
    assert {d["version"] for d in op.get("/v1/devices").json()["items"]} == {"1.0.0"}


def test_events_and_audit_record_decisions_with_reasons(fleet: Fleet, bundle_v1: bytes) -> None:
    _upload(fleet, bundle_v1)
    fleet.device("d1")
    op = fleet.as_("operator")
    op.post(
        "/v1/rollouts", json={"bundle": "iris@1.0.0", "stages": [100]}, params={"start": "true"}
    )
    fleet.service.tick()
    audit = op.get("/v1/audit").json()["items"]
    actions = {a["action"] for a in audit}
    assert {
        "bundle.upload",
        "rollout.create",
        "rollout.start",
        "stage.passed",
        "rollout.succeeded",
    } <= actions
    assert all(a["reason"] for a in audit)
    assert fleet.as_("viewer").get("/v1/audit").status_code == 403
    assert fleet.as_("viewer").get("/v1/events").status_code == 200


# artifacts, metrics, openapi ---------------------------------------------------------------
def test_artifact_download_supports_ranges(fleet: Fleet, bundle_v1: bytes) -> None:
    sha = _upload(fleet, bundle_v1)
    full = fleet.api.get(f"/v1/artifacts/{sha}")
    assert full.status_code == 200 and full.content == bundle_v1
    part = fleet.api.get(f"/v1/artifacts/{sha}", headers={"Range": "bytes=10-19"})
    assert part.status_code == 206
    assert part.content == bundle_v1[10:20]
    assert part.headers["content-range"] == f"bytes 10-19/{len(bundle_v1)}"
    tail = fleet.api.get(f"/v1/artifacts/{sha}", headers={"Range": "bytes=-5"})
    assert tail.content == bundle_v1[-5:]
    assert (
        fleet.api.get(
            f"/v1/artifacts/{sha}", headers={"Range": f"bytes={len(bundle_v1)}-"}
        ).status_code
        == 416
    )
    assert fleet.api.get(f"/v1/artifacts/{'0' * 64}").status_code == 404
    assert fleet.api.get("/v1/artifacts/not-a-sha").status_code == 422


def test_openapi_is_published_and_metrics_render(fleet: Fleet) -> None:
    spec = fleet.api.get("/openapi.json").json()
    assert {
        "/v1/bundles",
        "/v1/rollouts",
        "/v1/rollouts/{rollout_id}/{action}",
        "/v1/devices",
    } <= set(spec["paths"])
    m = fleet.api.get("/metrics")
    assert m.status_code == 200
    assert m.headers["content-type"].startswith("text/plain")


def test_a_second_rollout_over_devices_of_a_running_one_is_a_conflict(
    fleet: Fleet, bundle_v1: bytes, bundle_v2: bytes
) -> None:
    _upload(fleet, bundle_v1)
    _upload(fleet, bundle_v2)
    fleet.device("d1", fail_install=True)
    op = fleet.as_("operator")
    body = {"bundle": "iris@1.0.0", "stages": [100], "failure_threshold": 1.0, "max_retries": 5}
    assert op.post("/v1/rollouts", json=body, params={"start": "true"}).status_code == 201
    r = op.post("/v1/rollouts", json={"bundle": "iris@2.0.0", "stages": [100]})
    assert r.status_code == 409
    assert r.json()["field"] == "selector" and "d1" in r.json()["detail"]


def test_expired_bundle_cannot_be_rolled_out(tmp_path: Path, signing_key: KeyPair) -> None:
    from datetime import datetime, timedelta, timezone

    clock = [datetime.now(timezone.utc).timestamp()]
    f = Fleet(tmp_path, signing_key)
    f.service.clock = lambda: clock[0]
    data, _ = make_bundle(signing_key, expires_in=timedelta(hours=1))
    _upload(f, data)
    f.device("d1")
    clock[0] += 2 * 3600
    r = f.as_("operator").post("/v1/rollouts", json={"bundle": "iris@1.0.0", "stages": [100]})
    assert r.status_code == 422
    assert r.json()["field"] == "bundle" and "expired" in r.json()["detail"]
    f.service.repo.close()


def test_one_process_on_sqlite_runs_the_rollout_tick_and_says_so(fleet: Fleet) -> None:
    assert fleet.api.get("/v1/cluster").status_code == 401
    c = fleet.as_("viewer").get("/v1/cluster")
    assert c.status_code == 200, c.text
    body = c.json()
    assert body["tick"] is True and body["leader"] == body["process_id"]
    assert body["processes"] == []  # heartbeats are for a shared (PostgreSQL) registry
    assert fleet.api.get("/v1/health").json()["tick"] is True
    assert "edgefleet_rollout_tick_leader 1\n" in fleet.api.get("/metrics").text
