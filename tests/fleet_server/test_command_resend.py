"""A device that comes back gets its unanswered rollout command again.

Devices read their command topic at QoS 0 (no broker queues a command for a device that
was away; on a NATS cluster a QoS 1 subscription is a replicated consumer per device), so
the fleet server sends an unanswered deploy or rollback again when the device's birth says
it is back: the same command id, signed again. A birth that already reports the model the
command names sends nothing. The service runs on an in-memory broker; its tick is driven
by hand, so "nothing more was sent" is a fact about one tick, not a timeout.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet_server.service import FleetService, RolloutRequest
from protocol import KeyPair, TrustStore
from protocol.messages import ModelRef
from protocol.transport import MemoryBroker
from tests.fleet_server.fleetkit import SimDevice, make_config
from tests.support.bundles import make_bundle


class Clock:
    """The service's clock: a millisecond passes at every reading, and the test moves it
    further (timeouts without sleeping)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        self.now += 0.001
        return self.now


class Fleet:
    def __init__(self, tmp: Path, key: KeyPair) -> None:
        self.broker = MemoryBroker()
        self.key = key
        self.clock = Clock()
        self.service = FleetService(
            make_config(tmp, key), transport=self.broker.client("server"), clock=self.clock
        )
        assert self.service.bridge is not None
        self.service.bridge.start()
        self.service.transport.connect()  # type: ignore[union-attr]

    def device(self, device_id: str, **kw: object) -> SimDevice:
        trust = TrustStore.from_keys([self.key.public])
        return SimDevice(device_id, self.broker.client(device_id), trust, **kw).start()  # type: ignore[arg-type]

    def upload(self, version: str, release: int) -> None:
        data, _ = make_bundle(self.key, version=version, release=release, profiles=("host",))
        self.service.upload_bundle(data)

    def rollout(self, bundle: str, **spec: object) -> str:
        rid = self.service.create_rollout(RolloutRequest(bundle=bundle, stages=[100], **spec))  # type: ignore[arg-type]
        self.service.start_rollout(rid["rollout_id"])
        self.service.tick()
        return str(rid["rollout_id"])

    def resent_events(self, rid: str) -> list[str]:
        return [
            e["message"]
            for e in self.service.events(rollout_id=rid)
            if "sent again" in e["message"]
        ]


@pytest.fixture
def fleet(tmp_path: Path, signing_key: KeyPair) -> Iterator[Fleet]:
    f = Fleet(tmp_path, signing_key)
    yield f
    f.service.repo.close()


def test_a_device_that_comes_back_gets_its_unanswered_deploy_again_under_the_same_id(
    fleet: Fleet,
) -> None:
    fleet.upload("2.0.0", 2)
    dev = fleet.device("pi-away", silent=True)  # takes the command, never answers
    rid = fleet.rollout("iris@2.0.0")
    assert [c.command_id for c in dev.commands] == [f"{rid}:pi-away:deploy:1"]
    fleet.service.tick()
    assert len(dev.commands) == 1  # no birth, nothing sent again

    dev.birth()  # it reconnected: its first message on every connection
    fleet.service.tick()

    assert [c.command_id for c in dev.commands] == [f"{rid}:pi-away:deploy:1"] * 2
    first, again = dev.commands
    assert again.expires_at is not None and first.expires_at is not None
    assert again.expires_at >= first.expires_at  # signed again, not a stored copy
    assert fleet.resent_events(rid) == [
        "pi-away came back online: its unanswered deploy sent again"
    ]
    assert fleet.service.rollout_status(rid)["devices"][0]["attempts"] == 1  # not a retry


def test_a_birth_that_already_reports_the_new_model_sends_nothing_again(fleet: Fleet) -> None:
    fleet.upload("2.0.0", 2)
    dev = fleet.device("pi-done", silent=True)
    rid = fleet.rollout("iris@2.0.0")
    assert len(dev.commands) == 1
    dev.model = ModelRef(name="iris", version="2.0.0", release=2)  # installed; status not in yet
    dev.birth()
    fleet.service.tick()
    assert len(dev.commands) == 1
    assert fleet.resent_events(rid) == []


def test_a_device_that_comes_back_gets_its_unanswered_rollback_again(fleet: Fleet) -> None:
    fleet.upload("1.0.0", 1)
    fleet.upload("2.0.0", 2)
    dev = fleet.device("pi-back")
    fleet.rollout("iris@1.0.0")
    rid = fleet.rollout("iris@2.0.0")
    assert dev.model is not None and dev.model.version == "2.0.0"
    dev.silent = True  # from here it takes commands and never answers
    dev.birth()  # a birth from before the rollback, not yet seen by a tick: no reason to resend
    fleet.service.rollouts.act(rid, "api:operator", "rollback")
    assert [c.kind for c in dev.commands][-1] == "rollback"
    sent = len(dev.commands)
    fleet.service.tick()
    assert len(dev.commands) == sent

    dev.birth()  # still on 2.0.0: the rollback did not reach it
    fleet.service.tick()

    assert len(dev.commands) == sent + 1
    assert dev.commands[-1].kind == "rollback"
    assert dev.commands[-1].command_id == dev.commands[-2].command_id
    assert fleet.resent_events(rid) == [
        "pi-back came back online: its unanswered rollback sent again"
    ]


def test_only_the_process_holding_the_tick_sends_again(fleet: Fleet) -> None:
    """A follower (another ``fleet serve`` on the same registry) sees the same birth; the
    tick holder alone sends, so the device does not get one copy per process."""
    fleet.upload("2.0.0", 2)
    dev = fleet.device("pi-once", silent=True)
    fleet.rollout("iris@2.0.0")
    fleet.service.cluster.lease._held = False  # as a started process that lost the lease
    fleet.service.cluster._started = True
    assert not fleet.service.cluster.leads
    dev.birth()
    fleet.service.rollouts.tick(fleet.service.clock())
    assert len(dev.commands) == 1


def test_a_device_that_already_took_the_deploy_is_not_sent_it_again(fleet: Fleet) -> None:
    """A device that reported anything on the deploy has it in its ledger and carries on by
    itself after a reconnect (its download resumes from the retained chunks)."""
    fleet.upload("2.0.0", 2)
    dev = fleet.device("pi-busy", drop_chunks=frozenset({0}))  # its download stalls
    rid = fleet.rollout("iris@2.0.0")
    assert fleet.service.rollout_status(rid)["devices"][0]["state"] == "downloading"
    dev.birth()
    fleet.service.tick()
    assert len(dev.commands) == 1
    assert fleet.resent_events(rid) == []


def test_a_replayed_birth_sends_nothing_again(fleet: Fleet) -> None:
    """States are ordered by (boot, seq), so the device's latest birth passes the trust check
    again when someone on the broker replays it; the same signed birth is one comeback."""
    fleet.upload("2.0.0", 2)
    dev = fleet.device("pi-replay", silent=True)
    rid = fleet.rollout("iris@2.0.0")
    seen: list[bytes] = []
    inner = dev.t.publish

    def keep(topic: str, payload: bytes, *a: object, **kw: object) -> object:
        if topic.endswith("/state"):
            seen.append(payload)
        return inner(topic, payload, *a, **kw)  # type: ignore[arg-type]

    dev.t.publish = keep  # type: ignore[method-assign]
    dev.birth()
    fleet.service.tick()
    assert len(dev.commands) == 2
    server = fleet.broker.client("replayer")
    server.connect()
    for _ in range(3):
        server.publish("edgefleet/devices/pi-replay/state", seen[-1], qos=1, retain=True)
        fleet.service.tick()
    assert len(dev.commands) == 2
    assert len(fleet.resent_events(rid)) == 1


def test_a_rollback_lost_while_the_device_was_away_survives_a_restart_of_the_server(
    fleet: Fleet,
) -> None:
    """A rolled-back rollout is kept in memory while a rollback is unanswered (and valid):
    after a takeover or a restart, the device's birth still finds it."""
    fleet.upload("1.0.0", 1)
    fleet.upload("2.0.0", 2)
    dev = fleet.device("pi-gone")
    fleet.rollout("iris@1.0.0")
    rid = fleet.rollout("iris@2.0.0")
    dev.silent = True  # the rollback below dies on the way
    fleet.service.rollouts.act(rid, "api:operator", "rollback")
    sent = len(dev.commands)
    fleet.service.cluster.take_over()  # what a restart does: live rollouts read again
    assert rid in fleet.service.rollouts.live
    assert len(dev.commands) == sent + 1  # to the devices the takeover sees online
    dev.birth()  # back, still on 2.0.0
    fleet.service.tick()
    assert len(dev.commands) == sent + 2
    assert {c.kind for c in dev.commands[sent:]} == {"rollback"}

    # past the rollback's validity, or once every rollback is answered, it is not read again
    fleet.clock.now += fleet.service.config.signing.rollback_ttl_s + 1
    assert rid not in fleet.service.rollouts.load_live()


def test_a_deploy_lost_before_a_pause_goes_again_on_resume(fleet: Fleet) -> None:
    fleet.upload("2.0.0", 2)
    dev = fleet.device("pi-paused", silent=True)
    rid = fleet.rollout("iris@2.0.0")
    assert len(dev.commands) == 1  # lost on the link
    fleet.service.rollouts.act(rid, "api:operator", "pause")
    dev.birth()  # back while paused: a paused rollout sends nothing
    fleet.service.tick()
    assert len(dev.commands) == 1
    fleet.clock.now += 1
    fleet.service.rollouts.act(rid, "api:operator", "resume")
    assert [c.command_id for c in dev.commands] == [f"{rid}:pi-paused:deploy:1"] * 2
    assert fleet.resent_events(rid) == ["pi-paused: its unanswered deploy sent again on resume"]


def test_a_birth_after_the_timeout_does_not_send_two_attempts_at_once(fleet: Fleet) -> None:
    """The engine times the deploy out and sends attempt 2 in the same tick that takes the
    late birth: attempt 1 is not also sent again (both ids would be new to the device)."""
    fleet.upload("2.0.0", 2)
    dev = fleet.device("pi-late", silent=True)
    rid = fleet.rollout("iris@2.0.0", device_timeout_s=5.0)
    assert len(dev.commands) == 1
    fleet.clock.now += 6.0
    dev.birth()
    fleet.service.tick()
    assert [c.command_id for c in dev.commands] == [
        f"{rid}:pi-late:deploy:1",
        f"{rid}:pi-late:deploy:2",
    ]
