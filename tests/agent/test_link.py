"""The MQTT link as a state machine over the in-memory broker (no sockets, no threads)."""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.commands import CommandProcessor
from agent.download import Downloads
from agent.link import Link, last_will
from agent.outbox import Outbox
from protocol import KeyPair, TrustStore
from protocol.messages import DeviceState, decode
from protocol.topics import Topics
from protocol.transport import MemoryBroker
from tests.agent.agent_env import IRIS_ROW, Device, make_device
from tests.agent.fleet_sim import (
    FleetSim,
    chunks,
    command,
    deploy_command,
    rollback_command,
    signed,
)
from tests.support.bundles import make_bundle
from tests.support.keys import COMMAND_KEY

DEV = "dev-1"
TOPICS = Topics()


@dataclass
class Node:
    device: Device
    outbox: Outbox
    downloads: Downloads
    processor: CommandProcessor
    link: Link


def make_node(
    tmp_path: Path,
    key: KeyPair,
    broker: MemoryBroker,
    device: Device | None = None,
    origins: tuple[str, ...] = (),
) -> Node:
    device = device or make_device(tmp_path, key, device_id=DEV)
    data = device.config.data_dir
    data.mkdir(parents=True, exist_ok=True)
    outbox = Outbox(data / "outbox.db", 10**7)
    downloads = Downloads(data / "downloads")

    def birth() -> DeviceState:
        return DeviceState(
            device_id=DEV,
            online=True,
            model=device.predictor.model,
            profile="host",
            agent_version="test",
            runtimes={"onnxruntime": "x"},
            tags=["line-3"],
            api_url="http://127.0.0.1:8765",
        )

    holder: list[Link] = []
    processor = CommandProcessor(
        DEV,
        ledger=outbox,
        trust=device.installer.trust,
        command_trust=TrustStore.from_keys([COMMAND_KEY.public], role="command"),
        downloads=downloads,
        installer=device.installer,
        predictor=device.predictor,
        report=lambda st: holder[0].report(st),
        on_model_change=lambda: holder[0].publish_birth(),
        origins=origins,
    )
    transport = broker.client(DEV, will=last_will(birth(), TOPICS))
    link = Link(DEV, TOPICS, transport, outbox, processor, birth, synchronous=True)
    holder.append(link)
    return Node(device, outbox, downloads, processor, link)


@pytest.fixture
def v1(signing_key):
    return make_bundle(signing_key, version="1.0.0", release=1)


@pytest.fixture
def v2(signing_key):
    return make_bundle(signing_key, version="2.0.0", release=2)


@pytest.fixture
def world(tmp_path, signing_key, v1):
    broker = MemoryBroker()
    server = broker.client("server")
    server.connect()
    sim = FleetSim(server, DEV)
    sim.auto_resend = False
    node = make_node(tmp_path, signing_key, broker)
    node.device.installer.install_bytes(v1[0])
    node.link.start()
    return broker, sim, node


def deliver(node: Node) -> None:
    node.link.flush(timeout=0.1)


def test_birth_is_retained_and_the_last_will_replaces_it_when_the_device_vanishes(world):
    broker, _sim, node = world
    state = decode(DeviceState, broker.retained[TOPICS.state(DEV)])
    assert state.online and state.model.version == "1.0.0" and state.tags == ["line-3"]
    assert state.api_url == "http://127.0.0.1:8765"
    broker.set_online(False)
    dead = decode(DeviceState, broker.retained[TOPICS.state(DEV)])
    assert not dead.online and dead.device_id == DEV
    broker.set_online(True)  # reconnect: the birth is published again
    assert decode(DeviceState, broker.retained[TOPICS.state(DEV)]).online
    assert node.link.births == 2


def test_deploy_over_chunks_reports_every_step_and_switches_the_model(world, signing_key, v2):
    _broker, sim, node = world
    bundle, manifest = v2
    cmd = deploy_command(DEV, bundle, manifest, signing_key, chunk_size=2048)
    sim.send(cmd)
    sim.send_chunks(bundle, cmd)
    deliver(node)
    states = sim.states_of(cmd.command_id)
    assert states[0] == "accepted" and states[-2:] == ["verifying", "installed"]
    assert "downloading" in states
    progress = [s.progress for s in sim.statuses if s.state == "downloading"]
    assert progress == sorted(progress)
    assert sim.last(cmd.command_id).model.version == "2.0.0"
    assert node.device.predictor.predict([IRIS_ROW]).model.version == "2.0.0"
    assert sim.states[-1].model.version == "2.0.0"  # the birth follows the model
    assert not (node.downloads.root / cmd.deploy.bundle_sha256).exists()


def test_redelivered_deploy_does_not_install_twice_and_resends_the_last_status(
    world, signing_key, v2
):
    _broker, sim, node = world
    bundle, manifest = v2
    cmd = deploy_command(DEV, bundle, manifest, signing_key)
    sim.send(cmd)
    sim.send_chunks(bundle, cmd)
    deliver(node)
    installs = [e for e in node.device.events if e.state == "installed"]
    sim.send(cmd)  # QoS 1 redelivery
    deliver(node)
    assert [e for e in node.device.events if e.state == "installed"] == installs
    assert sim.states_of(cmd.command_id)[-2:] == ["installed", "installed"]
    assert node.processor.duplicates == 1


def test_unsigned_rollback_is_refused_and_a_signed_one_rolls_back(world, signing_key, v2):
    _broker, sim, node = world
    node.device.installer.install_bytes(v2[0])
    unsigned = rollback_command(DEV, None)
    sim.send(unsigned)
    deliver(node)
    last = sim.last(unsigned.command_id)
    assert (last.state, last.reason) == ("rejected", "signature_invalid")
    assert node.device.predictor.model.version == "2.0.0"
    ok = rollback_command(DEV)
    sim.send(ok)
    deliver(node)
    assert sim.states_of(ok.command_id) == ["accepted", "rolled_back"]
    assert node.device.predictor.model.version == "1.0.0"


def test_rollback_signed_by_an_untrusted_key_is_refused(world, other_key):
    _broker, sim, node = world
    cmd = rollback_command(DEV, other_key)
    sim.send(cmd)
    deliver(node)
    assert sim.last(cmd.command_id).reason == "key_unknown"


def test_deploy_whose_manifest_is_signed_by_an_unknown_key_is_refused_before_download(
    world, other_key
):
    _broker, sim, node = world
    bundle, manifest = make_bundle(other_key, version="2.0.0", release=2)
    cmd = deploy_command(DEV, bundle, manifest, other_key)
    sim.send(cmd)
    deliver(node)
    assert sim.states_of(cmd.command_id) == ["rejected"]  # admitted, its payload refused
    assert sim.last(cmd.command_id).reason == "key_unknown"
    assert not node.downloads.root.exists() or not any(node.downloads.root.iterdir())


def test_bundle_that_fails_install_checks_is_rejected_with_its_reason_and_v1_keeps_serving(
    world, signing_key
):
    _broker, sim, node = world
    bundle, manifest = make_bundle(signing_key, version="0.9.0", release=1)  # not newer
    cmd = deploy_command(DEV, bundle, manifest, signing_key)
    sim.send(cmd)
    sim.send_chunks(bundle, cmd)
    deliver(node)
    last = sim.last(cmd.command_id)
    assert (last.state, last.reason) == ("rejected", "release_not_newer")
    assert node.device.predictor.predict([IRIS_ROW]).model.version == "1.0.0"


def test_corrupt_chunks_are_ignored_and_a_good_resend_completes_the_download(
    world, signing_key, v2
):
    _broker, sim, node = world
    bundle, manifest = v2
    cmd = deploy_command(DEV, bundle, manifest, signing_key)
    sim.send(cmd)
    good = chunks(bundle, cmd)
    bad = good[-1].model_copy(update={"data": base64.b64encode(b"tampered").decode()})
    for ch in [*good[:-1], bad]:  # the last chunk does not match its own hash
        topic = TOPICS.artifact(DEV, cmd.deploy.bundle_sha256, ch.index)
        sim.t.publish(topic, ch.to_json())
    deliver(node)
    assert sim.states_of(cmd.command_id)[-1] == "downloading"
    missing = node.downloads.active[cmd.deploy.bundle_sha256].missing()
    assert missing == [cmd.deploy.n_chunks - 1]
    assert node.downloads.active[cmd.deploy.bundle_sha256].rejected_chunks == 1
    # The device asks again after a stall; the server resends only what is missing.
    node.processor.tick(now=10**10)
    deliver(node)
    asked = sim.last(cmd.command_id).result["missing"]
    assert asked == missing
    sim.send_chunks(bundle, cmd, asked)
    deliver(node)
    assert sim.states_of(cmd.command_id)[-1] == "installed"


def test_artifact_that_does_not_match_its_sha256_fails_with_hash_mismatch(world, signing_key, v2):
    _broker, sim, node = world
    bundle, manifest = v2
    fake_sha = "0" * 64
    cmd = deploy_command(DEV, bundle, manifest, signing_key, bundle_sha256=fake_sha)
    sim.send(cmd)
    sim.send_chunks(bundle, cmd)  # every chunk matches its own hash, the whole does not
    deliver(node)
    last = sim.last(cmd.command_id)
    assert (last.state, last.reason) == ("failed", "hash_mismatch")
    assert node.device.predictor.model.version == "1.0.0"


def test_command_for_another_device_or_garbage_is_rejected_and_nothing_is_stored(world):
    broker, sim, node = world
    other = command("someone-else", "shadow_stop", command_id="c-x")
    broker.route(TOPICS.cmd(DEV), other.to_json(), False)
    broker.route(
        TOPICS.cmd(DEV), b'{"command_id": "c-y", "device_id": "dev-1", "kind": "explode"}', False
    )
    broker.route(TOPICS.cmd(DEV), b"not json at all", False)
    deliver(node)
    assert sim.last("c-x").reason == "not_addressed"
    assert sim.last("c-y").reason == "command_invalid"
    assert node.processor.refused == {"not_addressed": 1, "command_invalid": 2}
    assert node.outbox.command_seen("c-x") is None and node.outbox.command_seen("c-y") is None


def test_shadow_deploy_runs_the_candidate_beside_the_active_model(world, signing_key, v2):
    _broker, sim, node = world
    bundle, manifest = v2
    cmd = deploy_command(DEV, bundle, manifest, signing_key, shadow=True)
    sim.send(cmd)
    sim.send_chunks(bundle, cmd)
    deliver(node)
    assert sim.last(cmd.command_id).result == {"shadow": True}
    assert node.device.predictor.model.version == "1.0.0"
    assert node.device.predictor.shadow.version == "2.0.0"
    stop = command(DEV, "shadow_stop", command_id="s-1")
    sim.send(stop)
    deliver(node)
    assert sim.states_of("s-1") == ["accepted", "done"] and node.device.predictor.shadow is None


def test_statuses_queue_while_the_broker_is_down_and_flush_in_order_after(world, signing_key):
    broker, sim, node = world
    node.device.installer.install_bytes(make_bundle(signing_key, version="2.0.0", release=2)[0])
    broker.set_online(False)
    forged = rollback_command(DEV, None)
    node.link._on_message(TOPICS.cmd(DEV), forged.to_json())  # refused: nothing stored
    assert node.outbox.count("status") == 0 and node.processor.refused == {"signature_invalid": 1}
    cmd = rollback_command(DEV)
    node.link._on_message(TOPICS.cmd(DEV), cmd.to_json())  # e.g. a retained session replay
    assert node.link.flush(timeout=0.1) == 0 and node.outbox.count("status") == 2
    broker.set_online(True)
    sim.t.connect()
    deliver(node)
    assert sim.states_of(cmd.command_id) == ["accepted", "rolled_back"]
    assert node.outbox.count() == 0


def test_a_bundle_installed_just_before_a_crash_is_reported_installed_not_reinstalled(
    world, signing_key, v2
):
    _broker, sim, node = world
    bundle, manifest = v2
    node.device.installer.install_bytes(bundle)  # installed; the status never went out
    installs = len([e for e in node.device.events if e.state == "installed"])
    cmd = deploy_command(DEV, bundle, manifest, signing_key)
    sim.send(cmd)
    sim.send_chunks(bundle, cmd)
    deliver(node)
    assert sim.states_of(cmd.command_id)[-1] == "installed"
    assert len([e for e in node.device.events if e.state == "installed"]) == installs


def test_a_fresh_deploy_does_not_ask_for_every_chunk_but_a_retry_asks_only_for_the_rest(
    world, signing_key, v2
):
    _broker, sim, node = world
    bundle, manifest = v2
    cmd = deploy_command(DEV, bundle, manifest, signing_key, chunk_size=1024)
    sim.send(cmd)
    deliver(node)
    assert [s.result for s in sim.statuses if s.command_id == cmd.command_id] == [None, None]
    sim.send_chunks(bundle, cmd, [0, 1])
    retry = signed(cmd.model_copy(update={"command_id": "retry-1"}))  # the server retried
    sim.send(retry)
    deliver(node)
    n = cmd.deploy.n_chunks
    assert sim.last("retry-1").result == {"missing": list(range(2, n))}


def test_deploy_with_an_absurd_size_or_chunk_count_is_refused_before_anything_is_stored(
    world, signing_key, v2
):
    _broker, sim, node = world
    bundle, manifest = v2
    good = deploy_command(DEV, bundle, manifest, signing_key)
    for cid, update in (
        ("huge", {"bundle_size": 10**12, "n_chunks": 10**12 // good.deploy.chunk_size}),
        ("lying", {"n_chunks": 10**9}),
        ("tiny-chunks", {"chunk_size": 1, "n_chunks": good.deploy.bundle_size}),
    ):
        cmd = good.model_copy(
            update={"command_id": cid, "deploy": good.deploy.model_copy(update=update)}
        )
        sim.send(signed(cmd))  # even signed by the fleet: the caps hold
    deliver(node)
    for cid in ("huge", "lying", "tiny-chunks"):
        assert sim.last(cid).reason == "command_invalid", cid
    assert node.downloads.active == {} and not node.downloads.root.exists()
    assert node.outbox.command_seen("huge") is None


def test_a_rollback_returns_to_the_version_it_names_not_to_the_previous_slot(
    world, signing_key, v1, v2
):
    from agent.installer import model_ref
    from protocol.messages import ModelRef

    _broker, sim, node = world
    inst = node.device.installer
    inst.install_bytes(v2[0])
    inst.rollback()  # back on 1.0.0: 1.0.0 ran before the rollout of 3.0.0 below
    inst.install_bytes(make_bundle(signing_key, version="3.0.0", release=3)[0])
    assert inst.slots.previous_id() is not None and "2.0.0" in [m.version for m in inst.history()]
    cmd = rollback_command(DEV, target=model_ref(v1[1]))
    sim.send(cmd)
    deliver(node)
    assert sim.states_of(cmd.command_id) == ["accepted", "rolled_back"]
    assert node.device.predictor.model.version == "1.0.0"  # not 2.0.0, the previous slot
    gone = ModelRef(name="iris", version="0.5.0", release=1, sha256="0" * 64)
    cmd = rollback_command(DEV, target=gone)
    sim.send(cmd)
    deliver(node)
    last = sim.last(cmd.command_id)
    assert (last.state, last.reason) == ("failed", "version_not_installed")
    assert node.device.predictor.model.version == "1.0.0"


def test_a_deploy_of_another_model_name_needs_the_signed_replace_model(world, signing_key):
    _broker, sim, node = world
    bundle, manifest = make_bundle(signing_key, name="wine", version="1.0.0", release=1)
    cmd = deploy_command(DEV, bundle, manifest, signing_key, command_id="swap-1")
    sim.send(cmd, bundle)
    sim.send_chunks(bundle, cmd)
    deliver(node)
    assert (sim.last("swap-1").state, sim.last("swap-1").reason) == (
        "rejected",
        "model_name_mismatch",
    )
    assert node.device.predictor.model.name == "iris"
    ok = deploy_command(DEV, bundle, manifest, signing_key, command_id="swap-2", replace_model=True)
    sim.send(ok, bundle)
    sim.send_chunks(bundle, ok)
    deliver(node)
    assert sim.last("swap-2").state == "installed"
    assert node.device.predictor.model.name == "wine"


def _shared(sim: FleetSim, bundle: bytes, cmd, *, retain: bool = True, indices=None) -> None:
    """Chunks as the fleet server publishes them: once, on the artifact's shared topic."""
    for ch in chunks(bundle, cmd, indices):
        sim.t.publish(TOPICS.artifact_chunk(ch.sha256, ch.index), ch.to_json(), retain=retain)


def test_a_late_device_installs_from_the_retained_chunks_on_the_shared_topic(
    world, signing_key, v2
):
    _broker, sim, node = world
    bundle, manifest = v2
    cmd = deploy_command(DEV, bundle, manifest, signing_key, chunk_size=2048)
    sha = cmd.deploy.bundle_sha256
    _shared(sim, bundle, cmd)  # published before this device got its command
    sim.send(cmd)
    deliver(node)
    assert sim.states_of(cmd.command_id)[-1] == "installed"
    assert node.device.predictor.predict([IRIS_ROW]).model.version == "2.0.0"
    assert node.link.following == set()  # it left the artifact's topic
    assert TOPICS.artifact_chunks(sha) not in node.link.transport._subs
    before = node.processor.downloads.unknown_chunks
    _shared(sim, bundle, cmd, retain=False)  # later chunks of it reach it no more
    assert node.processor.downloads.unknown_chunks == before


def test_a_forged_chunk_on_the_shared_topic_is_dropped_and_the_re_published_one_completes(
    world, signing_key, v2
):
    broker, sim, node = world
    bundle, manifest = v2
    cmd = deploy_command(DEV, bundle, manifest, signing_key, chunk_size=2048)
    sha, last = cmd.deploy.bundle_sha256, cmd.deploy.n_chunks - 1
    _shared(sim, bundle, cmd, indices=range(last))
    piece = b"\0" * cmd.deploy.chunk_bytes(last)  # right size, its own hash holds
    forged = chunks(bundle, cmd, [last])[0].model_copy(
        update={
            "data": base64.b64encode(piece).decode(),
            "chunk_sha256": hashlib.sha256(piece).hexdigest(),
        }
    )
    broker.route(TOPICS.artifact_chunk(sha, last), forged.to_json(), True)  # retained forgery
    broker.route(TOPICS.artifact_chunk(sha, 0), b"", False)  # a clear: skipped, not counted
    sim.send(cmd)
    deliver(node)
    d = node.downloads.active[sha]
    assert d.rejected_chunks == 1 and d.missing() == [last]
    assert not (d.dir / f"{last:06d}.chunk").exists()
    node.processor.tick(now=10**10)  # a stall: subscribe again (the forgery again) and ask
    deliver(node)
    assert d.rejected_chunks == 2
    assert sim.last(cmd.command_id).result["missing"] == [last]
    _shared(sim, bundle, cmd, indices=[last])  # the server re-publishes it on the topic
    deliver(node)
    assert sim.states_of(cmd.command_id)[-1] == "installed"
    assert node.device.predictor.predict([IRIS_ROW]).model.version == "2.0.0"
