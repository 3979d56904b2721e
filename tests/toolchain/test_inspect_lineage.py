"""``edgefleet inspect BUNDLE --server URL``: the bundle's channel lineage from a real fleet
server (uvicorn in a thread on the session's amqtt broker), through the root CLI."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fleet_server.config import FleetConfig
from fleet_server.serve import FleetServer
from protocol import KeyPair
from tests.fleet_server.fleetkit import write_keys
from tests.support.brokers import free_port
from tests.support.bundles import make_bundle
from tests.support.keys import write_private
from toolchain.cli import app

pytestmark = pytest.mark.filterwarnings("ignore:`BrokerSysPlugin`:DeprecationWarning")
runner = CliRunner()


@pytest.fixture
def server(tmp_path: Path, signing_key: KeyPair, amqtt_broker: Any) -> Iterator[dict[str, Any]]:
    _, pub = write_keys(tmp_path, signing_key)
    prefix = f"il{uuid.uuid4().hex[:8]}"
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
    data, _ = make_bundle(signing_key, version="1.0.0", release=1)
    path = tmp_path / "iris-1.0.0.efb"
    path.write_bytes(data)
    srv = FleetServer(cfg).start()
    assert srv.service is not None
    try:
        srv.service.upload_bundle(data)
        srv.service.channels.promote("iris@1.0.0", "beta", actor="api:ops", reason="first cut")
        token = srv.service.create_token("viewer", name="inspect")
        yield {"url": srv.url, "token": token, "path": path}
    finally:
        srv.stop()


def test_inspect_with_a_server_shows_where_the_bundle_has_been(server: dict[str, Any]) -> None:
    args = ["inspect", str(server["path"]), "--server", server["url"], "--token", server["token"]]
    r = runner.invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.output
    fleet = json.loads(r.output)["fleet"]
    assert fleet["current_in"] == ["beta"]
    assert [(h["channel"], h["action"], h["reason"]) for h in fleet["lineage"]] == [
        ("beta", "promote", "first cut")
    ]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "current in beta" in r.output and "first cut" in r.output


def test_inspect_with_a_server_but_a_bad_token_is_one_readable_line(
    server: dict[str, Any],
) -> None:
    from tests.e2e.support import edgefleet

    r = edgefleet("inspect", str(server["path"]), "--server", server["url"], "--token", "nope")
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0, r.stderr  # one line
    assert "401" in r.stderr and "EDGEFLEET_TOKEN" in r.stderr
