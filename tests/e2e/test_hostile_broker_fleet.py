"""An attacker on the broker against the fleet server: nothing it says decides anything.

A real :class:`FleetService` (its paho bridge, its registry, its drift engine) and four
simulated devices that enrolled with the suite's token, on the embedded amqtt broker and
on Mosquitto without ACLs. A v2 rollout is soaking in stage 1 (two canaries installed),
gated on p95 latency, error rate and drift. An attacker paho client — no device key, no
enrolment token — then tries each attack; a "compromised device" (one canary's own key in
the attacker's hands) tries the ones that only a device can try. For every attack:

* the rollout's decisions are unchanged (rollout, stage and device states);
* the reason is counted in the bridge's drop counters (and so on /metrics);
* the server process's RSS growth is measured, printed and bounded (generous bound).
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fleet_server.service import RolloutRequest
from protocol import KeyPair, SketchBuilder, TrustStore
from protocol.device_auth import public_key_b64, sign_payload
from protocol.messages import CommandStatus, DeviceState, MetricsReport, ModelRef, SketchReport
from protocol.sketches import FeatureSketch, SketchSet
from protocol.topics import Topics
from protocol.transport_paho import PahoTransport
from tests.e2e.support import ENROL_TOKEN, make_fleet, wait_until, write_public_keys
from tests.fleet_server.fleetkit import DeviceKey, SimDevice
from tests.support.bundles import make_bundle, trained

pytestmark = [pytest.mark.slow]

RSS_BOUND_MB = 200.0  # generous: the 2^26 sketch alone cost +1.3 GB before the caps
V1 = ModelRef(name="iris", version="1.0.0", release=1)
V2 = ModelRef(name="iris", version="2.0.0", release=2)


def rss_mb() -> float:
    import psutil

    return float(psutil.Process().memory_info().rss) / 2**20


@dataclass
class World:
    service: Any
    topics: Topics
    devices: list[SimDevice]
    canaries: list[SimDevice]
    rollout_id: str
    attacker: PahoTransport

    def decisions(self) -> tuple[Any, ...]:
        st = self.service.rollout_status(self.rollout_id)
        return (
            st["state"],
            tuple(s["state"] for s in st["stages"]),
            tuple(sorted((d["device_id"], d["state"]) for d in st["devices"])),
        )

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        assert self.attacker.publish(topic, payload, qos=1, retain=retain).wait(10)

    def dropped(self) -> dict[str, int]:
        return dict(self.service.bridge.stats()["dropped"])


@pytest.fixture
def world(broker_url: str, tmp_path: Path, signing_key: KeyPair) -> Iterator[World]:
    prefix = "hb" + secrets.token_hex(4)
    topics = Topics(prefix)
    keys = write_public_keys(tmp_path / "keys", signing_key)
    service = make_fleet(tmp_path, broker_url, bundle_keys=keys, topic_prefix=prefix)
    trust = TrustStore.from_keys([signing_key.public])
    devices: list[SimDevice] = []
    attacker = PahoTransport(broker_url, f"{prefix}-attacker", clean_session=True)
    try:
        service.upload_bundle(make_bundle(signing_key, version="1.0.0", release=1)[0])
        service.upload_bundle(make_bundle(signing_key, version="2.0.0", release=2)[0])
        for i in range(4):
            t = PahoTransport(broker_url, f"{prefix}-d{i}", clean_session=True)
            dev = SimDevice(f"d{i}", t, trust, prefix=prefix, model=V1, enrol_token=ENROL_TOKEN)
            devices.append(dev.start())
        wait_until(lambda: len(service.list_devices(online=True)) == 4, 30, "four devices enrolled")
        req = RolloutRequest(
            bundle="iris@2.0.0",
            stages=[50, 100],
            soak_s=3600,
            success_threshold=1.0,
            min_devices=1,
            max_p95_ms=50.0,
            max_error_rate=0.5,
            halt_on_drift=True,
        )
        rid = service.create_rollout(req)["rollout_id"]
        service.start_rollout(rid)

        def soaking() -> bool:
            st = service.rollout_status(rid)
            return st["stages"][0]["installed"] == 2 and st["state"] == "running"

        wait_until(soaking, 60, "the two canaries to install v2")
        stage0 = set(service.rollout_status(rid)["stages"][0]["device_ids"])
        canaries = [d for d in devices if d.device_id in stage0]
        attacker.connect(timeout=10)
        yield World(service, topics, devices, canaries, rid, attacker)
    finally:
        attacker.close()
        for d in devices:
            d.t.close()
        service.stop()
        service.repo.close()


def attack(
    world: World, name: str, run: Callable[[], None], expect: dict[str, int], timeout: float = 60
) -> float:
    """Run one attack; check decisions, counted reasons and memory; return the RSS growth."""
    before, drops0, rss0 = world.decisions(), world.dropped(), rss_mb()
    run()

    def counted() -> bool:
        now = world.dropped()
        return all(now.get(k, 0) - drops0.get(k, 0) >= n for k, n in expect.items())

    wait_until(counted, timeout, f"{name}: drops {expect} (have {world.dropped()})")
    world.service.tick()
    world.service.tick()
    grown = rss_mb() - rss0
    now = world.dropped()
    delta = {k: now[k] - drops0.get(k, 0) for k in now if now[k] != drops0.get(k, 0)}
    print(f"\n[{name}] dropped {delta}; server RSS growth {grown:+.1f} MB")
    assert world.decisions() == before, f"{name} changed a rollout decision"
    assert grown < RSS_BOUND_MB, f"{name}: RSS grew {grown:.0f} MB"
    body, _ = world.service.exporter.render()
    for reason in expect:
        assert f'reason="{reason}"'.encode() in body, f"{reason} not on /metrics"
    return grown


def signed_by(key: KeyPair, topics: Topics, topic: str, payload: bytes) -> bytes:
    """Signed with a key that is not the device's (the attacker's own)."""
    return sign_payload(payload, topic, key, 1, 10**6 + secrets.randbelow(10**6))


def test_an_attacker_on_the_broker_decides_nothing(world: World) -> None:
    svc, T = world.service, world.topics
    own = KeyPair.generate()  # the attacker's key: no token, never enrolled
    victim = world.canaries[0]
    cid = victim.commands[0].command_id
    now = datetime.now(timezone.utc)

    # 1. forged "failed" statuses for a real device (halt + roll back the real canaries)
    failed = CommandStatus(
        device_id=victim.device_id, command_id=cid, state="failed", reason="smoke_test_failed"
    ).to_json()

    def forged_failed() -> None:
        for d in world.canaries:
            st = failed.replace(victim.device_id.encode(), d.device_id.encode())
            world.publish(T.status(d.device_id), st)
            world.publish(T.status(d.device_id), signed_by(own, T, T.status(d.device_id), st))

    attack(world, "forged failed statuses", forged_failed, {"unsigned": 2, "key_mismatch": 2})

    # 2. forged p95 metrics (the p95 gate used to take the max)
    def forged_p95() -> None:
        for d in world.canaries:
            m = MetricsReport(
                device_id=d.device_id,
                seq=99,
                window_start=now,
                window_end=now,
                model=V2,
                requests=1000,
                errors=900,
                latency={"count": 1000, "p95_ms": 9_999.0},
            ).to_json()
            world.publish(T.metrics(d.device_id), m)
            world.publish(T.metrics(d.device_id), signed_by(own, T, T.metrics(d.device_id), m))

    attack(world, "forged p95 metrics", forged_p95, {"unsigned": 2, "key_mismatch": 2})

    # 3. a forged retained offline state for a live device
    dead = DeviceState(
        device_id=victim.device_id, online=False, public_key=public_key_b64(own.public)
    ).to_json()

    def forged_offline() -> None:
        world.publish(T.state(victim.device_id), dead, retain=True)
        world.publish(
            T.state(victim.device_id), signed_by(own, T, T.state(victim.device_id), dead), True
        )

    attack(
        world, "forged retained offline state", forged_offline, {"unsigned": 1, "key_mismatch": 1}
    )
    assert svc.get_device(victim.device_id)["online"] is True
    victim.birth()  # the real device's next birth puts its own retained state back

    # 4. forged sketches: poison drift for the new version
    tm = trained("iris-logreg")
    b = SketchBuilder(tm.input_schema)
    b.update_rows(tm.X + np.array([5.0, 5.0, 5.0, 5.0]))
    poison = SketchReport(
        device_id=victim.device_id,
        model=V2,
        window_start=now,
        window_end=now,
        seq=5,
        sketches=b.build(),
    ).to_json()
    merged = svc.sketches_merged

    def forged_sketches() -> None:
        for d in world.devices:
            p = poison.replace(victim.device_id.encode(), d.device_id.encode())
            world.publish(T.sketch(d.device_id), p)
            world.publish(T.sketch(d.device_id), signed_by(own, T, T.sketch(d.device_id), p))

    attack(world, "forged sketches", forged_sketches, {"unsigned": 4, "key_mismatch": 4})
    assert svc.sketches_merged == merged
    if svc.drift is not None:
        assert not svc.drift.is_drifting("iris", "2.0.0")

    # 5. a frequent-items sketch claiming a 2^26 table, sent by a compromised canary
    import datasketches

    fi = datasketches.frequent_strings_sketch(6)
    for i in range(10):
        fi.update(str(i), i + 1)
    raw = bytearray(fi.serialize())
    raw[3] = raw[4] = 26
    bomb = SketchReport(
        device_id=victim.device_id,
        model=V2,
        window_start=now,
        window_end=now,
        seq=6,
        sketches=SketchSet(
            rows=10,
            features={
                f"f{i}": FeatureSketch(
                    kind="categorical", sketch=base64.b64encode(bytes(raw)).decode(), count=10
                )
                for i in range(30)
            },
        ),
    ).to_json()

    def huge_table() -> None:
        world.publish(T.sketch(victim.device_id), bomb)  # from the attacker: unsigned
        compromised = victim.signer.sign(T.sketch(victim.device_id), bomb)
        world.publish(T.sketch(victim.device_id), compromised)

    grown = attack(world, "2^26-table sketch", huge_table, {"unsigned": 1, "malformed": 1})
    assert grown < 64, f"the capped sketch still cost {grown:.0f} MB"

    # 6. a flood of fake device registrations
    n0 = len(svc.list_devices())

    def flood() -> None:
        for i in range(3000):
            fake = DeviceKey(f"fake-{i:04d}", token=None, prefix=T.prefix)
            world.attacker.publish(T.state(fake.device_id), fake.birth(), qos=0)
        world.publish(T.state("fake-last"), DeviceKey("fake-last", None, T.prefix).birth())

    grown = attack(world, "3000 fake registrations", flood, {"pending": 1}, timeout=120)
    assert len(svc.list_devices()) == n0  # none became a fleet device
    pending = svc.list_enrolments("pending")
    assert 0 < len(pending) <= svc.config.devices.max_pending
    d = world.dropped()
    print(
        f"    pending {len(pending)}, pending_full {d.get('pending_full', 0)}, "
        f"enrol_limit {d.get('enrol_limit', 0)}"
    )

    # 7. forged "missing chunks" statuses: resend for a finished transfer
    sent = svc.sender.chunks_sent
    missing = CommandStatus(
        device_id=victim.device_id,
        command_id=cid,
        state="downloading",
        result={"missing": list(range(10_000))},
    ).to_json()

    def forged_missing() -> None:
        world.publish(T.status(victim.device_id), missing)
        world.publish(
            T.status(victim.device_id), signed_by(own, T, T.status(victim.device_id), missing)
        )

    attack(
        world, "forged missing-chunks statuses", forged_missing, {"unsigned": 1, "key_mismatch": 1}
    )
    assert svc.sender.chunks_sent == sent
    # The same from the compromised canary itself: its transfer is finished, nothing resent.
    accepted = svc.bridge.stats()["accepted"].get("status", 0)
    world.publish(
        T.status(victim.device_id), victim.signer.sign(T.status(victim.device_id), missing)
    )
    wait_until(lambda: svc.bridge.stats()["accepted"].get("status", 0) > accepted, 20, "the status")
    assert svc.sender.chunks_sent == sent
    assert world.decisions()[0] == "running"
