"""Artifact downloads: resume across a restart (MQTT chunks) and over HTTP with Range."""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from agent.download import HTTP_PART, DownloadError, Downloads, fetch_http
from protocol.messages import Command
from protocol.transport import MemoryBroker
from tests.agent.agent_env import IRIS_ROW, make_device
from tests.agent.fleet_sim import FleetSim, chunks, deploy_command, wait_for
from tests.agent.test_link import DEV, make_node
from tests.support.bundles import make_bundle


class _Handler(BaseHTTPRequestHandler):
    body = b""
    ranges_seen: ClassVar[list[str]] = []
    honour_range = True

    requests = 0

    def do_GET(self) -> None:
        type(self).requests += 1
        if self.path != "/bundle.efb":
            self.send_error(404)
            return
        rng = self.headers.get("Range")
        start = 0
        if rng:
            type(self).ranges_seen.append(rng)
        if rng and self.honour_range:
            start = int(rng.split("=")[1].rstrip("-"))
            self.send_response(206)
            self.send_header(
                "Content-Range", f"bytes {start}-{len(self.body) - 1}/{len(self.body)}"
            )
        else:
            self.send_response(200)
        data = self.body[start:]
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Handler.ranges_seen = []
    _Handler.honour_range = True
    yield f"http://127.0.0.1:{server.server_address[1]}", _Handler
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def v2(signing_key):
    return make_bundle(signing_key, version="2.0.0", release=2)


def http_download(tmp_path, bundle, manifest, key, url, **kw):
    cmd = deploy_command(DEV, bundle, manifest, key, http_url=url, **kw)
    return Downloads(tmp_path / "downloads").begin(cmd)


def test_http_download_resumes_with_a_range_request_and_verifies_the_sha256(
    tmp_path, http_server, signing_key, v2
):
    url, handler = http_server
    bundle, manifest = v2
    handler.body = bundle
    d = http_download(tmp_path, bundle, manifest, signing_key, f"{url}/bundle.efb")
    (d.dir / HTTP_PART).write_bytes(bundle[:1000])  # what an interrupted transfer left
    assert fetch_http(d) == bundle
    assert handler.ranges_seen == ["bytes=1000-"]


def test_http_server_that_ignores_range_restarts_from_zero(tmp_path, http_server, signing_key, v2):
    url, handler = http_server
    bundle, manifest = v2
    handler.body = bundle
    handler.honour_range = False
    d = http_download(tmp_path, bundle, manifest, signing_key, f"{url}/bundle.efb")
    (d.dir / HTTP_PART).write_bytes(b"garbage!" * 100)
    assert fetch_http(d) == bundle


def test_http_artifact_with_the_wrong_sha256_is_refused_and_not_kept(
    tmp_path, http_server, signing_key, v2
):
    url, handler = http_server
    bundle, manifest = v2
    handler.body = bundle[:-1] + b"?"
    d = http_download(tmp_path, bundle, manifest, signing_key, f"{url}/bundle.efb")
    with pytest.raises(DownloadError) as err:
        fetch_http(d)
    assert err.value.reason.value == "hash_mismatch"
    assert not (d.dir / HTTP_PART).exists()


def test_http_errors_become_download_failed(tmp_path, http_server, signing_key, v2):
    url, _ = http_server
    bundle, manifest = v2
    d = http_download(tmp_path, bundle, manifest, signing_key, f"{url}/missing.efb")
    with pytest.raises(DownloadError, match="HTTP 404") as err:
        fetch_http(d)
    assert err.value.reason.value == "download_failed"
    refused = http_download(tmp_path, bundle, manifest, signing_key, "http://127.0.0.1:9/x")
    with pytest.raises(DownloadError, match="ConnectError"):
        fetch_http(refused, timeout=2)


def test_deploy_with_http_url_installs_through_the_link(tmp_path, http_server, signing_key, v2):
    url, handler = http_server
    bundle, manifest = v2
    handler.body = bundle
    broker = MemoryBroker()
    server = broker.client("server")
    server.connect()
    sim = FleetSim(server, DEV)
    node = make_node(tmp_path, signing_key, broker, origins=(url,))
    node.device.installer.install_bytes(make_bundle(signing_key)[0])
    node.link.start()
    cmd = deploy_command(DEV, bundle, manifest, signing_key, http_url=f"{url}/bundle.efb")
    sim.send(cmd)
    node.link.flush(timeout=0.1)
    assert sim.states_of(cmd.command_id)[0] == "accepted"
    assert sim.states_of(cmd.command_id)[-1] == "installed"
    assert node.device.predictor.predict([IRIS_ROW]).model.version == "2.0.0"


def test_http_url_outside_the_trusted_origins_is_refused_before_a_socket_opens(
    tmp_path, http_server, signing_key, v2
):
    url, handler = http_server
    bundle, manifest = v2
    handler.body = bundle
    handler.requests = 0
    broker = MemoryBroker()
    server = broker.client("server")
    server.connect()
    sim = FleetSim(server, DEV)
    node = make_node(tmp_path, signing_key, broker, origins=("https://fleet.example:8700",))
    node.device.installer.install_bytes(make_bundle(signing_key)[0])
    node.link.start()
    for n, foreign in enumerate((f"{url}/bundle.efb", "http://169.254.169.254/latest")):
        cmd = deploy_command(
            DEV, bundle, manifest, signing_key, http_url=foreign, command_id=f"o-{n}"
        )
        sim.send(cmd)
    node.link.flush(timeout=0.1)
    for n in range(2):
        last = sim.last(f"o-{n}")
        assert (last.state, last.reason) == ("rejected", "origin_untrusted")
    assert handler.requests == 0 and not node.downloads.root.exists()
    with pytest.raises(DownloadError) as err:  # the download code refuses it on its own too
        fetch_http(http_download(tmp_path, bundle, manifest, signing_key, url), origins=())
    assert err.value.reason.value == "origin_untrusted" and handler.requests == 0


def test_chunks_are_verified_one_by_one(tmp_path, signing_key, v2):
    bundle, manifest = v2
    cmd = deploy_command(DEV, bundle, manifest, signing_key, chunk_size=1024)
    d = Downloads(tmp_path / "dl").begin(cmd)
    good = chunks(bundle, cmd)
    assert d.add(good[0]) and not d.add(good[0])  # a duplicate is not stored twice
    assert not d.add(good[1].model_copy(update={"chunk_sha256": "0" * 64}))
    assert not d.add(good[1].model_copy(update={"index": 10**6}))
    assert not d.add(good[1].model_copy(update={"sha256": hashlib.sha256(b"x").hexdigest()}))
    assert d.rejected_chunks == 3 and d.missing() == list(range(1, cmd.deploy.n_chunks))


def test_interrupted_transfer_resumes_after_a_restart_asking_only_for_missing_chunks(
    tmp_path, signing_key, v2
):
    bundle, manifest = v2
    broker = MemoryBroker()
    server = broker.client("server")
    server.connect()
    sim = FleetSim(server, DEV)
    sim.auto_resend = False
    device = make_device(tmp_path, signing_key, device_id=DEV)
    device.installer.install_bytes(make_bundle(signing_key)[0])
    node = make_node(tmp_path, signing_key, broker, device)
    node.link.start()
    cmd = deploy_command(DEV, bundle, manifest, signing_key, chunk_size=1024)
    n = cmd.deploy.n_chunks
    sim.send(cmd, bundle)
    sim.send_chunks(bundle, cmd, range(0, n, 2))  # every other chunk, then the "power cut"
    node.link.flush(timeout=0.1)
    node.link.transport.close()
    node.outbox.close()
    before = len(sim.statuses)

    # Restart: a new agent on the same data directory.
    restarted = make_node(
        tmp_path, signing_key, broker, make_device(tmp_path, signing_key, device_id=DEV)
    )
    sim.auto_resend = True
    restarted.link.start()
    restarted.link.flush(timeout=0.1)
    resumed = [s for s in sim.statuses[before:] if s.command_id == cmd.command_id and s.result]
    assert resumed[0].result["missing"] == list(range(1, n, 2))

    def installed() -> bool:  # the simulated server resends from its own thread
        restarted.link.flush(timeout=0.1)
        return sim.states_of(cmd.command_id)[-1] == "installed"

    wait_for(installed)
    assert restarted.device.predictor.predict([IRIS_ROW]).model.version == "2.0.0"
    # The second delivery of the same deploy command after the restart does nothing new.
    sim.send(Command.model_validate(cmd.model_dump()))
    restarted.link.flush(timeout=0.1)
    assert sim.states_of(cmd.command_id).count("installed") == 2  # last status re-sent once


def test_downloads_abandoned_for_longer_than_max_age_are_discarded_not_resumed(
    tmp_path, signing_key, v2
):
    import os

    bundle, manifest = v2
    cmd = deploy_command(DEV, bundle, manifest, signing_key)
    d = Downloads(tmp_path / "dl").begin(cmd)
    d.add(chunks(bundle, cmd)[0])
    assert [x.sha256 for x in Downloads(tmp_path / "dl").resume()] == [d.sha256]
    old = os.stat(d.dir / "session.json").st_mtime - 8 * 86400
    os.utime(d.dir / "session.json", (old, old))
    assert Downloads(tmp_path / "dl").resume() == [] and not d.dir.exists()


def test_a_saved_session_outside_the_caps_is_discarded_at_restart_not_allocated(
    tmp_path, signing_key, v2
):
    import json

    bundle, manifest = v2
    cmd = deploy_command(DEV, bundle, manifest, signing_key)
    d = Downloads(tmp_path / "dl").begin(cmd)
    doc = json.loads((d.dir / "session.json").read_bytes())
    doc["deploy"].update(chunk_size=1, n_chunks=len(bundle))  # what an old agent accepted
    (d.dir / "session.json").write_text(json.dumps(doc))
    assert Downloads(tmp_path / "dl").resume() == [] and not d.dir.exists()


def test_a_saved_session_whose_signature_fails_is_discarded_at_restart(tmp_path, signing_key, v2):
    from tests.agent.test_link import make_node

    bundle, manifest = v2
    broker = MemoryBroker()
    node = make_node(tmp_path, signing_key, broker)
    good = deploy_command(DEV, bundle, manifest, signing_key)
    forged = good.model_copy(update={"command_id": "forged-1"})  # signature no longer holds
    d = Downloads(node.downloads.root).begin(forged)
    assert node.processor.resume() == []
    assert node.downloads.active == {} and not d.dir.exists()
