"""Device message signatures: exact bytes, bound to the topic, cheap to check."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from protocol import KeyPair
from protocol.device_auth import (
    DeviceSigner,
    SigningTransport,
    check_enrol_proof,
    enrol_proof,
    open_envelope,
    sign_payload,
    token_hash,
    verify_envelope,
)
from protocol.messages import DeviceState, decode
from protocol.transport import MemoryBroker

KEY = KeyPair.generate()
TOPIC = "edgefleet/devices/d1/status"


@given(
    body=st.dictionaries(st.text(max_size=8), st.text(max_size=20), max_size=5),
    boot=st.integers(0, 10**9),
    seq=st.integers(0, 10**12),
)
def test_a_signed_payload_opens_verifies_and_is_still_the_same_json(
    body: dict[str, str], boot: int, seq: int
) -> None:
    body.pop("dsig", None)
    payload = json.dumps(body).encode()
    signed = sign_payload(payload, TOPIC, KEY, boot, seq)
    env = open_envelope(signed)
    assert env is not None and (env.boot, env.seq, env.key_id) == (boot, seq, KEY.key_id)
    assert verify_envelope(env, TOPIC, KEY.public)
    assert {k: v for k, v in json.loads(signed).items() if k != "dsig"} == body


def test_signature_does_not_verify_on_another_topic_key_or_body() -> None:
    signed = sign_payload(b'{"device_id":"d1","state":"failed"}', TOPIC, KEY, 1, 5)
    env = open_envelope(signed)
    assert env is not None
    assert not verify_envelope(env, "edgefleet/devices/d1/state", KEY.public)  # other kind
    assert not verify_envelope(env, "edgefleet/devices/d2/status", KEY.public)  # other device
    assert not verify_envelope(env, TOPIC, KeyPair.generate().public)
    tampered = open_envelope(signed.replace(b"failed", b"passed"))
    assert tampered is not None and not verify_envelope(tampered, TOPIC, KEY.public)
    bumped = open_envelope(signed.replace(b'"1.5.', b'"1.9.'))
    assert bumped is not None and not verify_envelope(bumped, TOPIC, KEY.public)


def test_unsigned_or_garbled_payloads_have_no_envelope() -> None:
    assert open_envelope(b'{"device_id":"d1"}') is None
    assert open_envelope(b'{"device_id":"d1","dsig":"1.2.nothex.sig"}') is None
    assert open_envelope(b"") is None
    assert open_envelope(b"x" * 100_000 + b'"}') is None


def test_enrolment_proof_is_bound_to_the_device_and_its_key() -> None:
    h = token_hash("efe_secret")
    proof = enrol_proof(h, "d1", KEY.key_id)
    assert check_enrol_proof(proof, ["00" * 32, h], "d1", KEY.public)
    assert not check_enrol_proof(proof, [h], "d2", KEY.public)
    assert not check_enrol_proof(proof, [h], "d1", KeyPair.generate().public)
    assert not check_enrol_proof(proof, [token_hash("efe_other")], "d1", KEY.public)


def test_signing_transport_signs_own_topics_and_leaves_others_alone() -> None:
    broker = MemoryBroker()
    seen: list[tuple[str, bytes]] = []
    sub = broker.client("sub")
    sub.set_handler(lambda t, p: seen.append((t, p)))
    sub.connect()
    sub.subscribe("#")
    signer = DeviceSigner("d1", KEY, boot=3)
    t = SigningTransport(broker.client("d1"), signer, lambda topic: "/d1/" in topic)
    t.connect()
    t.publish(TOPIC, b'{"device_id":"d1"}')
    t.publish(TOPIC, b'{"device_id":"d1"}')
    t.publish("elsewhere/x", b'{"a":1}')
    envs = [open_envelope(p) for _, p in seen]
    assert envs[0] is not None and envs[1] is not None and envs[2] is None
    assert (envs[0].boot, envs[0].seq, envs[1].seq) == (3, 1, 2)
    assert decode(DeviceState, sign_payload(b'{"device_id":"d1","online":true}', TOPIC, KEY, 1, 1))


def test_a_renewed_will_reaches_paho_only_right_before_the_next_connect() -> None:
    """``set_will`` runs from the disconnect callback: it must only store the will, and
    paho's ``will_set`` must happen in ``on_pre_connect`` (calling it inside paho's
    disconnect handling left a real agent reconnecting silently)."""
    from protocol.transport import Will
    from protocol.transport_paho import PahoTransport

    first = Will("edgefleet/devices/d1/state", b"first", qos=1, retain=True)
    t = PahoTransport("mqtt://127.0.0.1:1", "d1", will=first)
    client = t._client
    t.set_will(Will("edgefleet/devices/d1/state", b"second", qos=1, retain=True))
    assert client._will_payload == b"first"  # not yet: still this connection's will
    assert client.on_pre_connect is not None
    client.on_pre_connect(client, None)
    assert client._will_payload == b"second" and client._will_retain is True
    client.on_pre_connect(client, None)  # nothing pending: unchanged
    assert client._will_payload == b"second"
    t.close()
