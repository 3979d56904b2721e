"""Resends of missing chunks: only for active rollouts, within a per-device budget."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fleet_server.delivery import n_chunks
from fleet_server.service import FleetService, RolloutRequest
from protocol import KeyPair, TrustStore
from protocol.messages import CommandStatus
from protocol.transport import MemoryBroker
from tests.fleet_server.fleetkit import SimDevice, make_config
from tests.support.bundles import make_bundle

CHUNK = 1024  # the smallest chunk a deploy may use (protocol MIN_CHUNK_BYTES)


@pytest.fixture(scope="module")
def bundle(signing_key: KeyPair) -> bytes:
    return make_bundle(signing_key)[0]


def fleet(
    tmp: Path, key: KeyPair, budget: int = 4096, clock: Callable[[], float] = time.time
) -> tuple[FleetService, MemoryBroker]:
    broker = MemoryBroker()
    cfg = make_config(tmp, key, chunk_bytes=CHUNK)
    cfg = cfg.model_copy(
        update={"devices": cfg.devices.model_copy(update={"resend_budget": budget})}
    )
    svc = FleetService(cfg, transport=broker.client("server"), clock=clock)
    assert svc.bridge is not None
    svc.bridge.start()
    broker.clients[0].connect()
    return svc, broker


def missing(dev: SimDevice, cid: str, indices: list[int]) -> None:
    """The device (or whoever holds its key) says it misses ``indices``."""
    st = CommandStatus(
        device_id=dev.device_id, command_id=cid, state="downloading", result={"missing": indices}
    )
    dev.publish(dev.topics.status(dev.device_id), st.to_json())


def test_no_resend_for_a_finished_rollout(
    tmp_path: Path, signing_key: KeyPair, bundle: bytes
) -> None:
    svc, broker = fleet(tmp_path, signing_key)
    dev = SimDevice("d1", broker.client("d1"), TrustStore.from_keys([signing_key.public])).start()
    svc.upload_bundle(bundle)
    rid = svc.create_rollout(RolloutRequest(bundle="iris@1.0.0", stages=[100]))["rollout_id"]
    svc.start_rollout(rid)
    svc.tick()
    assert svc.rollout_status(rid)["state"] == "succeeded"
    sent = svc.sender.chunks_sent  # type: ignore[union-attr]
    missing(dev, dev.commands[0].command_id, list(range(50)))
    assert svc.sender.chunks_sent == sent  # type: ignore[union-attr]


def test_resends_stop_at_the_per_device_budget(
    tmp_path: Path, signing_key: KeyPair, bundle: bytes
) -> None:
    now = [time.time()]
    svc, broker = fleet(tmp_path, signing_key, budget=3, clock=lambda: now[0])
    trust = TrustStore.from_keys([signing_key.public])
    dev = SimDevice("d1", broker.client("d1"), trust, silent=True).start()
    svc.upload_bundle(bundle)
    rid = svc.create_rollout(RolloutRequest(bundle="iris@1.0.0", stages=[100]))["rollout_id"]
    svc.start_rollout(rid)
    count = n_chunks(len(bundle), CHUNK)
    assert count > 3
    sent = svc.sender.chunks_sent  # type: ignore[union-attr]
    for _ in range(20):
        now[0] += 10  # past the per-chunk re-publish interval every time
        missing(dev, dev.commands[0].command_id, list(range(count)))
    assert svc.sender.chunks_sent - sent == 3  # type: ignore[union-attr]
    body, _ = svc.exporter.render()
    assert b"resend_budget" in body
