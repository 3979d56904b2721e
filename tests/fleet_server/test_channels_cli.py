"""The channel commands through the root CLI (where errors map to exit codes), against the
API in-process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fleet_server import cli
from fleet_server.app import create_app
from fleet_server.client import FleetClient
from protocol import KeyPair
from tests.fleet_server.fleetkit import SyncASGITransport
from tests.fleet_server.test_channels import Fleet, make_bundles
from tests.support.cli import run_cli


@pytest.fixture
def fleet(
    tmp_path: Path,
    signing_key: KeyPair,
    bundles: dict[str, bytes],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Fleet]:
    f = Fleet(tmp_path, signing_key)
    for data in bundles.values():
        f.service.upload_bundle(data)
    http = httpx.Client(transport=SyncASGITransport(create_app(f.service)), base_url="http://fleet")
    monkeypatch.setattr(
        cli, "client", lambda url, token: FleetClient("http://fleet", token, http=http)
    )
    yield f
    http.close()
    f.service.repo.close()


@pytest.fixture(scope="module")
def bundles(signing_key: KeyPair) -> dict[str, bytes]:
    return make_bundles(signing_key)


def run(fleet: Fleet, *args: str) -> Any:
    return run_cli([*args, "--token", fleet.tokens["operator"]])


def test_promote_refusal_is_one_line_naming_the_condition_and_exit_1(fleet: Fleet) -> None:
    fleet.device("s1", "stable")
    r = run(fleet, "fleet", "promote", "iris@1.0.0", "--to", "stable", "--reason", "go")
    assert r.exit_code == 1
    assert r.stderr.count("\n") == 1 and "requires" in r.stderr and "409" in r.stderr
    r = run(fleet, "fleet", "promote", "iris@1.0.0", "--to", "stable", "--dry-run")
    assert r.exit_code == 0, r.output
    assert "NO  requires" in r.output and "1 devices follow stable" in r.output


def test_promote_demote_archive_lineage_and_device_channel(fleet: Fleet) -> None:
    fleet.device("b1", "beta")
    d = fleet.device("x1", None)
    assert run(fleet, "fleet", "devices", "channel", "x1", "beta").exit_code == 0
    r = run(fleet, "fleet", "promote", "iris@1.0.0", "--to", "beta", "--reason", "first")
    assert r.exit_code == 0, r.output
    assert "iris 1.0.0 is now beta: rollout beta-" in r.output
    fleet.tick()
    assert d.model is not None and d.model.version == "1.0.0"
    assert run(fleet, "fleet", "promote", "iris@1.1.0", "--to", "beta").exit_code == 0
    fleet.tick()
    r = run(fleet, "fleet", "channels", "list")
    assert r.exit_code == 0 and "1.1.0" in r.output and "2 (2 online)" in r.output
    r = run(fleet, "fleet", "demote", "iris", "--channel", "beta", "--reason", "regression")
    assert r.exit_code == 0, r.output
    assert "iris/beta is back at 1.0.0" in r.output
    fleet.tick()
    assert d.model.version == "1.0.0"
    assert run(fleet, "fleet", "bundles", "archive", "iris@1.1.0").exit_code == 0
    r = run(fleet, "fleet", "promote", "iris@1.1.0", "--to", "beta")
    assert r.exit_code == 1 and "not_archived" in r.output
    r = run(fleet, "fleet", "bundles", "lineage", "iris@1.1.0")
    assert r.exit_code == 0 and "promote" in r.output
    r = run(fleet, "fleet", "channels", "show", "iris", "beta")
    assert r.exit_code == 0 and "regression" in r.output
    r = run(fleet, "fleet", "channels", "set", "iris", "canary", "--stages", "20,100")
    assert r.exit_code == 0 and "stages=[20.0, 100.0]" in r.output
