"""The agent signs what it publishes, and its births and wills stay in order across reconnects."""

from __future__ import annotations

from pathlib import Path

from agent.identity import DeviceIdentity
from agent.link import Link, StateSigner
from agent.outbox import Outbox
from protocol.device_auth import SigningTransport, open_envelope, verify_envelope
from protocol.messages import CommandStatus, DeviceState, decode
from protocol.topics import Topics
from protocol.transport import MemoryBroker

DEV = "dev-sig"
T = Topics()


class _NoCommands:
    def resume(self) -> list[object]:
        return []


def test_births_and_wills_are_signed_in_order_across_reconnects(tmp_path: Path) -> None:
    broker = MemoryBroker()

    ident = DeviceIdentity(DEV, tmp_path, token="efe_t")
    states = StateSigner(T, ident)

    def birth() -> DeviceState:
        return DeviceState(device_id=DEV, online=True, profile="host")

    inner = broker.client(DEV, will=states.will(birth()))
    transport = SigningTransport(inner, ident.signer, lambda t: t.startswith(f"{T.prefix}/"))
    outbox = Outbox(tmp_path / "outbox.db", 10**6)
    link = Link(DEV, T, transport, outbox, _NoCommands(), birth, synchronous=True, states=states)  # type: ignore[arg-type]
    link.start()
    for _ in range(2):  # two outages: the broker publishes a will each time, then a birth
        broker.set_online(False)
        broker.set_online(True)
    link.report(CommandStatus(device_id=DEV, command_id="c1", state="done"))
    link.flush(timeout=0.1)
    link.stop(timeout=0.1)
    seen = list(broker.log)  # everything the broker routed, wills included

    order: list[tuple[bool, int]] = []
    for topic, payload in seen:
        env = open_envelope(payload)
        assert env is not None, f"unsigned message on {topic}"
        assert env.key_id == ident.key_id and env.boot == 1
        assert verify_envelope(env, topic, ident.key.public)
        if topic == T.state(DEV):
            state = decode(DeviceState, payload)
            order.append((state.online, env.seq))
            if state.online:
                assert state.public_key == ident.signer.public_key_b64() and state.enrol_proof
    # birth, will, birth, will, birth, goodbye: every state outranks the one before it
    assert [online for online, _ in order] == [True, False, True, False, True, False]
    seqs = [seq for _, seq in order]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), seqs
    assert any(t == T.status(DEV) for t, _ in seen)
    outbox.close()


def test_the_device_agrees_a_mac_key_only_with_a_command_signed_fleet_key(tmp_path: Path) -> None:
    from datetime import datetime, timedelta, timezone

    from protocol import KeyPair, TrustStore
    from protocol.device_mac import announce

    ident = DeviceIdentity(DEV, tmp_path)
    assert (tmp_path / "device_kex.key").stat().st_mode & 0o777 == 0o600
    again = DeviceIdentity(DEV, tmp_path)
    assert again.x25519_b64() == ident.x25519_b64()  # static: the server caches its K
    command = KeyPair.generate()
    trust = TrustStore.from_keys([command.public], role="command")
    now = datetime.now(timezone.utc)
    forged = announce(KeyPair.generate(), now).to_json()  # a broker client's own key
    assert ident.accept_kex(forged, trust, now) == "key_unknown"
    assert ident.signer.mac is None
    assert open_envelope(ident.signer.sign(T.status(DEV), b'{"a":1}')).scheme == "ed25519"  # type: ignore[union-attr]
    assert ident.accept_kex(announce(command, now).to_json(), trust, now) is None
    assert open_envelope(ident.signer.sign(T.status(DEV), b'{"a":1}')).scheme == "mac"  # type: ignore[union-attr]
    old = announce(command, now - timedelta(days=1)).to_json()
    assert ident.accept_kex(old, trust, now) == "stale"
