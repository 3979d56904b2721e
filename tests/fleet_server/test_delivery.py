"""Delivery: the signed deploy command, chunked MQTT transfer that resumes, HTTP download."""

from __future__ import annotations

import base64
import time
from datetime import timedelta
from pathlib import Path

import pytest

from fleet_server.config import parse_config
from fleet_server.delivery import chunk, deploy_command, n_chunks, reassemble, rollback_command
from fleet_server.errors import BundleRejected, ConfigError
from fleet_server.service import FleetService, RolloutRequest
from protocol import KeyPair, TrustStore
from protocol.bundle import read_bundle
from protocol.errors import SignatureError
from protocol.messages import ModelRef, verify_command
from protocol.transport import MemoryBroker
from tests.fleet_server.fleetkit import Api, SimDevice, make_config
from tests.support.bundles import make_bundle

CHUNK = 1024  # the protocol floor (MIN_CHUNK_BYTES)


@pytest.fixture(scope="module")
def bundle(signing_key: KeyPair) -> bytes:
    return make_bundle(signing_key)[0]


class Clock:
    """A hand-moved clock: the per-chunk re-publish interval is counted on it."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def _fleet(
    tmp: Path, key: KeyPair, clock: Clock | None = None, **rollout: object
) -> tuple[FleetService, MemoryBroker]:
    broker = MemoryBroker()
    cfg = make_config(tmp, key, chunk_bytes=CHUNK, **rollout)
    if rollout.get("delivery") in ("http", "both"):
        cfg = cfg.model_copy(
            update={"api": cfg.api.model_copy(update={"public_url": "http://fleet"})}
        )
    svc = FleetService(cfg, transport=broker.client("server"), clock=clock or Clock())
    assert svc.bridge is not None
    svc.bridge.start()
    broker.clients[0].connect()
    return svc, broker


def _chunk_topics(broker: MemoryBroker) -> list[str]:
    """Every artifact chunk the broker carried (shared or per-device), clears apart."""
    return [t for t, p in broker.log if ("/artifacts/" in t or "/artifact/" in t) and p]


def _device(broker: MemoryBroker, key: KeyPair, name: str = "d1", **kw: object) -> SimDevice:
    return SimDevice(name, broker.client(name), TrustStore.from_keys([key.public]), **kw).start()  # type: ignore[arg-type]


def _rollout(svc: FleetService, bundle: bytes) -> str:
    svc.upload_bundle(bundle)
    rid = svc.create_rollout(RolloutRequest(bundle="iris@1.0.0", stages=[100]))["rollout_id"]
    svc.start_rollout(rid)
    return str(rid)


def test_deploy_command_carries_the_signed_manifest_and_chunking(
    signing_key: KeyPair, command_key: KeyPair, bundle: bytes
) -> None:
    b = read_bundle(bundle)
    cmd = deploy_command(
        b,
        bundle,
        device_id="d1",
        rollout_id="r-1",
        cid="r-1:d1:deploy:1",
        chunk_size=CHUNK,
        key=command_key,
        ttl_s=600,
    )
    assert cmd.issued_at is not None and cmd.expires_at is not None
    assert (cmd.expires_at - cmd.issued_at).total_seconds() == 600
    assert cmd.deploy is not None
    assert base64.b64decode(cmd.deploy.manifest) == b.manifest_bytes
    assert cmd.deploy.manifest_signature == b.signature
    assert cmd.deploy.bundle_size == len(bundle)
    assert cmd.deploy.n_chunks == n_chunks(len(bundle), CHUNK) > 1
    trust = TrustStore.from_keys([command_key.public])
    assert verify_command(cmd, trust) == command_key.key_id
    for change in (
        {"device_id": "d2"},
        {"expires_at": cmd.expires_at + timedelta(days=1)},  # type: ignore[operator]
        {"deploy": cmd.deploy.model_copy(update={"http_url": "http://evil"})},
    ):
        with pytest.raises(SignatureError):
            verify_command(cmd.model_copy(update=change), trust)


def test_a_rollback_names_the_version_the_device_ran_before_and_is_signed(
    command_key: KeyPair,
) -> None:
    before = {"name": "iris", "version": "1.0.0", "release": 1, "sha256": "a" * 64}
    cmd = rollback_command(
        device_id="d1", rollout_id="r-1", cid="r-1:d1:rollback:1", key=command_key, target=before
    )
    assert cmd.rollback is not None and cmd.rollback.target is not None
    assert cmd.rollback.target.model_dump() == before
    assert verify_command(cmd, TrustStore.from_keys([command_key.public])) == command_key.key_id


def test_the_server_refuses_a_bundle_signed_by_its_own_command_key(
    tmp_path: Path, signing_key: KeyPair, command_key: KeyPair
) -> None:
    svc, _ = _fleet(tmp_path, signing_key)
    own = make_bundle(command_key, version="9.0.0", release=9)[0]
    with pytest.raises(BundleRejected) as err:
        svc.upload_bundle(own)
    assert err.value.reason == "key_wrong_role"
    assert svc.upload_bundle(make_bundle(signing_key)[0])["version"] == "1.0.0"


def test_the_command_key_listed_as_a_bundle_key_is_a_config_error(
    tmp_path: Path, command_key: KeyPair
) -> None:
    cfg = make_config(tmp_path, command_key)  # the bundle key IS the command key
    with pytest.raises(ConfigError, match="bundle_keys"):
        FleetService(cfg)


def test_an_old_signing_section_gets_one_line_saying_what_to_change() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config('[signing]\nkey = "k.pem"\ntrusted = ["k.pub"]\n', "fleet.toml")
    msg = str(err.value)
    assert "\n" not in msg and "signing.command_key" in msg and "signing.bundle_keys" in msg


def test_chunks_carry_their_own_hash_and_reassemble_only_when_whole(bundle: bytes) -> None:
    import hashlib

    sha = hashlib.sha256(bundle).hexdigest()
    count = n_chunks(len(bundle), CHUNK)
    chunks = [chunk(bundle, i, CHUNK, sha) for i in range(count)]
    assert reassemble(chunks, sha) == (bundle, [])
    corrupt = chunks[1].model_copy(update={"data": base64.b64encode(b"x" * 10).decode()})
    data, missing = reassemble([chunks[0], corrupt, *chunks[2:]], sha)
    assert data is None and missing == [1]


def test_mqtt_transfer_installs_the_bundle(
    tmp_path: Path, signing_key: KeyPair, bundle: bytes
) -> None:
    svc, broker = _fleet(tmp_path, signing_key)
    dev = _device(broker, signing_key)
    rid = _rollout(svc, bundle)
    assert dev.model is not None and dev.model.version == "1.0.0"
    assert dev.chunk_count == n_chunks(len(bundle), CHUNK)
    assert svc.rollout_status(rid)["counts"] == {"installed": 1}


def test_interrupted_mqtt_transfer_resends_only_the_missing_chunks(
    tmp_path: Path, signing_key: KeyPair, bundle: bytes
) -> None:
    clock = Clock()
    svc, broker = _fleet(tmp_path, signing_key, clock)
    dev = _device(broker, signing_key, drop_chunks=frozenset({1, 3}))
    rid = _rollout(svc, bundle)
    count = n_chunks(len(bundle), CHUNK)
    assert dev.model is None
    assert svc.rollout_status(rid)["devices"][0]["state"] == "downloading"
    sent_before = svc.sender.chunks_sent  # type: ignore[union-attr]
    clock.now += 10  # past the re-publish interval of the first send
    assert dev.report_missing() == [1, 3]
    assert svc.sender.chunks_sent - sent_before == 2  # type: ignore[union-attr]
    assert dev.chunk_count == count + 2
    assert dev.model is not None and dev.model.version == "1.0.0"
    svc.tick()
    assert svc.rollout_status(rid)["state"] == "succeeded"


def test_one_publish_set_serves_every_device_of_the_rollout(
    tmp_path: Path, signing_key: KeyPair, bundle: bytes
) -> None:
    svc, broker = _fleet(tmp_path, signing_key)
    devs = [_device(broker, signing_key, f"d{i}") for i in range(6)]
    rid = _rollout(svc, bundle)
    count = n_chunks(len(bundle), CHUNK)
    assert all(d.model is not None and d.model.version == "1.0.0" for d in devs)
    assert all(d.chunk_count == count for d in devs)
    topics = _chunk_topics(broker)
    sha = svc.list_bundles()[0]["sha256"]
    assert sorted(topics) == sorted(f"edgefleet/artifacts/{sha}/{i}" for i in range(count))
    assert svc.sender.publishes == {sha: count}  # type: ignore[union-attr]
    assert svc.rollout_status(rid)["counts"] == {"installed": 6}


def test_a_device_that_comes_late_gets_the_retained_chunks_without_a_new_publish(
    tmp_path: Path, signing_key: KeyPair, bundle: bytes
) -> None:
    svc, broker = _fleet(tmp_path, signing_key)
    first = _device(broker, signing_key, "d1")
    late = _device(broker, signing_key, "d2")
    late.publish(late.topics.state("d2"), late.will().payload)  # known to the fleet,
    late.t.inner._drop()  # offline when the rollout starts  # type: ignore[attr-defined]
    rid = _rollout(svc, bundle)
    assert first.model is not None and late.model is None
    published = len(_chunk_topics(broker))
    late.t.connect()  # back online: its birth (of a newer connection than the will's),
    late._births = 1 << 20  # then the tick sends its deploy
    late.birth()
    svc.tick()
    assert late.model is not None and late.model.version == "1.0.0"
    assert len(_chunk_topics(broker)) == published  # the broker's retained copies served it
    svc.tick()
    assert svc.rollout_status(rid)["counts"] == {"installed": 2}


def test_many_devices_missing_the_same_chunks_cause_one_re_publish(
    tmp_path: Path, signing_key: KeyPair, bundle: bytes
) -> None:
    clock = Clock()
    svc, broker = _fleet(tmp_path, signing_key, clock)
    devs = [_device(broker, signing_key, f"d{i}", silent=True) for i in range(5)]
    _rollout(svc, bundle)
    sha = svc.list_bundles()[0]["sha256"]
    first = svc.sender.publishes[sha]  # type: ignore[union-attr]
    sender = svc.sender
    assert sender is not None
    clock.now += 10
    for d in devs:  # each (silent) device asks for chunks 0 and 2
        from protocol.messages import CommandStatus

        st = CommandStatus(
            device_id=d.device_id,
            command_id=d.commands[0].command_id,
            state="downloading",
            result={"missing": [0, 2]},
        )
        d.publish(d.topics.status(d.device_id), st.to_json())
    assert sender.publishes[sha] == first + 2
    assert sender.chunks_coalesced == 8
    clock.now += 10  # a later request is served again
    devs[0].publish(
        devs[0].topics.status("d0"),
        CommandStatus(
            device_id="d0",
            command_id=devs[0].commands[0].command_id,
            state="downloading",
            result={"missing": [2]},
        ).to_json(),
    )
    assert sender.publishes[sha] == first + 3


def test_retained_chunks_are_cleared_once_no_live_rollout_needs_them(
    tmp_path: Path, signing_key: KeyPair, bundle: bytes
) -> None:
    clock = Clock()
    svc, broker = _fleet(tmp_path, signing_key, clock)
    _device(broker, signing_key)
    rid = _rollout(svc, bundle)
    sha = svc.list_bundles()[0]["sha256"]
    assert any(t.startswith(f"edgefleet/artifacts/{sha}/") for t in broker.retained)
    svc.tick()
    assert svc.rollout_status(rid)["state"] == "succeeded"
    assert any(t.startswith(f"edgefleet/artifacts/{sha}/") for t in broker.retained)
    clock.now += 301  # linger_s after its last use
    svc.tick()
    assert not [t for t in broker.retained if "/artifacts/" in t]
    assert svc.sender.retained == {}  # type: ignore[union-attr]


def test_http_download_resumes_with_a_range_request(
    tmp_path: Path, signing_key: KeyPair, bundle: bytes
) -> None:
    from fleet_server.app import create_app

    svc, broker = _fleet(tmp_path, signing_key, delivery="http")
    api = Api(create_app(svc))

    def fetch(url: str, headers: dict[str, str]) -> bytes:
        r = api.get(url.replace("http://fleet", ""), headers=headers)
        assert r.status_code in (200, 206)
        return r.content

    dev = _device(broker, signing_key, http=fetch, http_cut=300)
    rid = _rollout(svc, bundle)
    assert dev.commands[0].deploy is not None
    assert (
        dev.commands[0].deploy.http_url
        == f"http://fleet/v1/artifacts/{svc.list_bundles()[0]['sha256']}"
    )
    assert dev.chunk_count == 0  # nothing went over MQTT
    assert dev.http_requests == [{}, {"Range": "bytes=300-"}]
    assert dev.model is not None and dev.model.version == "1.0.0"
    assert svc.rollout_status(rid)["counts"] == {"installed": 1}


def test_rollback_names_the_model_each_device_ran_before_the_rollout(
    tmp_path: Path, signing_key: KeyPair, command_key: KeyPair, bundle: bytes
) -> None:
    svc, broker = _fleet(tmp_path, signing_key)
    before = ModelRef(name="iris", version="0.9.0", release=1, sha256="c" * 64)
    dev = _device(broker, signing_key, model=before)
    fresh = _device(broker, signing_key, name="d2")  # ran no model before
    rid = _rollout(svc, bundle)
    assert dev.model is not None and dev.model.version == "1.0.0"
    svc.rollback_rollout(rid)
    svc.tick()
    rollbacks = {
        d.device_id: c
        for d in (dev, fresh)
        for c in d.commands
        if c.kind == "rollback" and c.rollback is not None
    }
    assert rollbacks["d1"].rollback.target == before  # type: ignore[union-attr]
    assert rollbacks["d2"].rollback.target is None  # type: ignore[union-attr]
    trust = TrustStore.from_keys([command_key.public])
    for c in [*dev.commands, *fresh.commands]:  # every kind, every command: signed, dated
        assert verify_command(c, trust) == command_key.key_id
        assert c.issued_at is not None and c.expires_at is not None and c.expires_at > c.issued_at


def test_a_refusal_the_device_sent_for_a_command_it_never_admitted_decides_nothing(
    tmp_path: Path, signing_key: KeyPair, bundle: bytes
) -> None:
    """An attacker sends the device an unsigned command carrying a real rollout's command id;
    the device answers rejected(signature_invalid, admitted=false). The rollout ignores it."""
    from protocol.messages import CommandStatus

    svc, broker = _fleet(tmp_path, signing_key)
    dev = _device(broker, signing_key, silent=True)  # received the deploy, answers nothing yet
    rid = _rollout(svc, bundle)
    cid = dev.commands[0].command_id
    refusal = CommandStatus(
        device_id="d1",
        command_id=cid,
        state="rejected",
        reason="signature_invalid",
        admitted=False,
    )
    svc.on_status(refusal)
    svc.tick()
    st = svc.rollout_status(rid)
    assert st["state"] == "running" and st["devices"][0]["state"] != "rejected"
    assert any("signature_invalid" in e["message"] for e in svc.events(device_id="d1"))


def test_a_big_bundle_gets_chunks_large_enough_for_the_protocols_chunk_cap() -> None:
    from fleet_server.delivery import chunk_size_for
    from protocol.messages import MAX_BUNDLE_BYTES, MAX_CHUNKS

    for size, configured in ((MAX_BUNDLE_BYTES, 1024), (10**8, 4096), (5000, 1024)):
        cs = chunk_size_for(size, configured)
        assert cs >= configured and cs % 1024 == 0 and n_chunks(size, cs) <= MAX_CHUNKS
    assert chunk_size_for(5000, 1024) == 1024
