"""Bundle attacks: each hostile bundle is refused with its reason code while the device keeps
serving the model it had, and the fleet server records the reason.

One real agent process (serving iris 1.1.0, release 2) on a real Mosquitto, with a real
fleet server on the same broker. Each attack is delivered the way an attacker who controls
the bytes would: a deploy command (signed with the fleet's command key, as a compromised
server would, so the *bundle* checks are what is tested) and the artifact chunks, straight
onto the device's MQTT topics — and also with ``edgefleet agent install`` on the device
itself. A replayed older release is also sent through a genuine staged rollout of the
fleet server.
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fleet_server.delivery import chunk, n_chunks
from protocol import KeyPair, read_bundle
from protocol.errors import EdgefleetError
from protocol.messages import (
    DEFAULT_CHUNK_BYTES,
    Command,
    CommandStatus,
    DeployPayload,
    chunk_hashes,
    sign_command,
)
from protocol.transport_paho import PahoTransport
from tests.e2e.support import (
    TOPICS,
    AgentProcess,
    BrokerRecorder,
    edgefleet,
    make_fleet,
    wait_until,
    write_agent_config,
    write_public_keys,
)
from tests.support.brokers import MOSQUITTO, Mosquitto
from tests.support.bundles import make_bundle

pytestmark = [pytest.mark.slow, pytest.mark.mosquitto]

DEVICE = "victim-1"
SERVING = "1.1.0"
ATTACKS = [
    "tampered_model",
    "tampered_manifest",
    "unknown_key",
    "revoked_key",
    "expired",
    "replayed_older_release",
    "mixed_releases",
    "path_traversal",
    "oversize_member",
]
TERMINAL = ("rejected", "failed", "installed", "done", "rolled_back")


@dataclass
class Victim:
    agent: AgentProcess
    config: Path
    service: Any
    recorder: BrokerRecorder
    attacker: PahoTransport
    decoy: bytes  # a legitimate bundle whose manifest an attacker can quote
    folder: Path


@pytest.fixture(scope="module")
def victim(
    tmp_path_factory: pytest.TempPathFactory, signing_key: KeyPair, revoked_key: KeyPair
) -> Iterator[Victim]:
    if MOSQUITTO is None:
        pytest.skip("mosquitto is not installed (CI installs it)")
    folder = tmp_path_factory.mktemp("attacks")
    keys = write_public_keys(folder / "keys", signing_key, revoked_key)
    with Mosquitto() as broker:
        service = make_fleet(folder, broker.url, bundle_keys=keys[:1])
        recorder = BrokerRecorder(broker.url).start()
        config = write_agent_config(
            folder / "device",
            device_id=DEVICE,
            broker_url=broker.url,
            bundle_keys=keys,
            revoked=[revoked_key.key_id],
        )
        base, _ = make_bundle(signing_key, version=SERVING, release=2)
        (folder / "base.efb").write_bytes(base)
        out = edgefleet("agent", "install", str(folder / "base.efb"), "--config", str(config))
        assert out.returncode == 0, out.stderr
        agent = AgentProcess(config).start()
        attacker = PahoTransport(broker.url, "attacker", clean_session=True)
        try:
            agent.wait_api(ready=True)
            wait_until(
                lambda: any(d["device_id"] == DEVICE for d in service.list_devices(online=True)),
                30,
                "the fleet server to see the device online",
            )
            attacker.connect(timeout=10)
            decoy, _ = make_bundle(signing_key, version="2.0.0", release=3)
            yield Victim(agent, config, service, recorder, attacker, decoy, folder)
        finally:
            attacker.close()
            agent.close()
            recorder.close()
            service.stop()


def deploy_command(data: bytes, quote: bytes, cid: str, key: KeyPair) -> Command:
    """The deploy an attacker sends: the bundle's own manifest when it has one to quote."""
    try:
        b = read_bundle(data)
    except EdgefleetError:
        b = read_bundle(quote)
    payload = DeployPayload(
        manifest=base64.b64encode(b.manifest_bytes).decode(),
        manifest_signature=b.signature,
        bundle_sha256=hashlib.sha256(data).hexdigest(),
        bundle_size=len(data),
        chunk_size=DEFAULT_CHUNK_BYTES,
        n_chunks=n_chunks(len(data), DEFAULT_CHUNK_BYTES),
        chunk_hashes=chunk_hashes(data, DEFAULT_CHUNK_BYTES),
    )
    cmd = Command(command_id=cid, device_id=DEVICE, kind="deploy", deploy=payload)
    return sign_command(cmd, key, ttl_s=600)


def send_deploy(v: Victim, data: bytes, cid: str, key: KeyPair) -> None:
    cmd = deploy_command(data, v.decoy, cid, key)
    assert v.attacker.publish(TOPICS.cmd(DEVICE), cmd.to_json()).wait(10)
    sha = hashlib.sha256(data).hexdigest()
    for i in range(n_chunks(len(data), DEFAULT_CHUNK_BYTES)):
        msg = chunk(data, i, DEFAULT_CHUNK_BYTES, sha)
        assert v.attacker.publish(TOPICS.artifact(DEVICE, sha, i), msg.to_json()).wait(10)


def final_status(v: Victim, cid: str) -> CommandStatus | None:
    for device, m in v.recorder.by_kind("status"):
        if device != DEVICE:
            continue
        st = CommandStatus.model_validate_json(m.payload)
        if st.command_id == cid and st.state in TERMINAL:
            return st
    return None


def server_recorded(service: Any, device_id: str, reason: str, cid: str | None = None) -> bool:
    """The reason is in the server's events or device record for this device (next to the
    command id when one is given, so two attacks with the same reason are told apart)."""

    def mentions(entry: Any) -> bool:
        text = json.dumps(entry, default=str)
        return reason in text and (cid is None or cid in text)

    if any(mentions(e) for e in service.events(limit=500, device_id=device_id)):
        return True
    device = service.get_device(device_id)
    entries = [v for k, v in device.items() if k not in ("events", "metrics")]
    return any(mentions(e) for e in entries + device.get("rollouts", []))


def assert_still_serving(v: Victim) -> None:
    assert v.agent.alive(), f"the agent died:\n{v.agent.log()}"
    model = v.agent.model()
    assert model is not None and model["version"] == SERVING
    answer = v.agent.predict()
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"]["version"] == SERVING


@pytest.mark.parametrize("attack", ATTACKS)
def test_hostile_bundle_over_mqtt_is_refused_and_the_old_model_keeps_serving(
    victim: Victim, hostile_bundles: dict[str, tuple[bytes, str]], command_key: KeyPair, attack: str
) -> None:
    data, reason = hostile_bundles[attack]
    cid = f"attack-{attack}-{uuid.uuid4().hex[:6]}"
    send_deploy(victim, data, cid, command_key)
    status = wait_until(lambda: final_status(victim, cid), 60, f"the device's verdict on {attack}")
    assert status.state in ("rejected", "failed"), f"{attack} was {status.state}"
    assert status.reason == reason, f"{attack}: {status.reason} ({status.detail})"
    assert_still_serving(victim)
    # The status is on the broker already; the server's bridge takes it within milliseconds.
    try:
        wait_until(lambda: server_recorded(victim.service, DEVICE, reason, cid), 5, "")
    except AssertionError:
        events = [e["message"] for e in victim.service.events(limit=20, device_id=DEVICE)]
        raise AssertionError(
            f"the device reported {status.state}({reason}) for {cid} on its status topic, but "
            f"the fleet server recorded no such reason; its events for {DEVICE}: {events}"
        ) from None


@pytest.mark.parametrize("attack", ATTACKS)
def test_hostile_bundle_installed_by_hand_is_refused_with_its_reason(
    victim: Victim, hostile_bundles: dict[str, tuple[bytes, str]], attack: str
) -> None:
    data, reason = hostile_bundles[attack]
    path = victim.folder / f"{attack}.efb"
    path.write_bytes(data)
    out = edgefleet("agent", "install", str(path), "--config", str(victim.config))
    assert out.returncode == 1
    assert out.stderr.startswith(f"error: {reason}"), out.stderr
    assert "Traceback" not in out.stderr
    assert_still_serving(victim)


def test_replayed_older_release_in_a_staged_rollout_is_rejected_and_recorded(
    victim: Victim, signing_key: KeyPair
) -> None:
    from fleet_server.service import RolloutRequest

    older, _ = make_bundle(signing_key, version="1.0.0", release=1)
    info = victim.service.upload_bundle(older)
    r = victim.service.create_rollout(
        RolloutRequest(bundle=info["sha256"], selector=f"id={DEVICE}", stages=[100.0])
    )
    rid = r["rollout_id"]
    victim.service.start_rollout(rid)

    def device_state() -> dict[str, Any] | None:
        st = victim.service.rollout_status(rid)
        dev = next(d for d in st["devices"] if d["device_id"] == DEVICE)
        return dev if dev["state"] in ("rejected", "failed", "installed") else None

    dev = wait_until(device_state, 60, "the device's verdict in the rollout")
    assert dev["state"] == "rejected"
    assert "release_not_newer" in (dev["reason"] or "")
    assert server_recorded(victim.service, DEVICE, "release_not_newer")
    assert_still_serving(victim)
