"""Topic names, message models, signed commands and the in-memory transport."""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import ProtocolError, ReasonCode, SignatureError, Topics, TrustStore
from protocol.messages import (
    MAX_MESSAGE_BYTES,
    Command,
    CommandStatus,
    DeviceState,
    MetricsReport,
    RollbackPayload,
    decode,
    sign_command,
    verify_command,
)
from protocol.topics import shared, valid_device_id
from protocol.transport import MemoryBroker, Will, topic_matches

ids = st.text(
    alphabet=string.ascii_letters + string.digits + "-_.", min_size=1, max_size=30
).filter(lambda s: s[0].isalnum())


@settings(max_examples=50, deadline=None)
@given(device=ids, prefix=st.sampled_from(["edgefleet", "acme/prod"]))
def test_topics_parse_back_to_device_and_kind(device, prefix):
    t = Topics(prefix)
    for topic, kind in [
        (t.state(device), "state"),
        (t.cmd(device), "cmd"),
        (t.status(device), "status"),
        (t.metrics(device), "metrics"),
        (t.sketch(device), "sketch"),
    ]:
        parsed = t.parse(topic)
        assert parsed is not None and (parsed.device_id, parsed.kind) == (device, kind)
        assert topic_matches(t.all_states() if kind == "state" else t.all_telemetry(), topic) == (
            kind in ("state", "metrics", "sketch")
        )


@pytest.mark.parametrize("bad", ["a/b", "+", "#", "", "dev#1", "x" * 65])
def test_invalid_device_ids_are_refused(bad):
    assert not valid_device_id(bad)
    with pytest.raises(ValueError):
        Topics().state(bad)


def test_parse_ignores_foreign_topics():
    t = Topics()
    assert t.parse("other/devices/d1/state") is None
    assert t.parse("edgefleet/devices/d1/telemetry/unknown") is None


def test_shared_subscription_filter_matches_like_the_plain_filter():
    f = shared(Topics().all_telemetry(), "ingest")
    assert f.startswith("$share/ingest/")
    assert topic_matches(f, Topics().metrics("d1"))


@settings(max_examples=30, deadline=None)
@given(device=ids, seq=st.integers(0, 2**31), requests=st.integers(0, 10**9))
def test_metrics_report_round_trips(device, seq, requests):
    from datetime import datetime, timezone

    now = datetime.now(timezone.utc)
    m = MetricsReport(
        device_id=device, seq=seq, window_start=now, window_end=now, requests=requests
    )
    assert decode(MetricsReport, m.to_json()) == m


def test_decode_names_the_bad_field_and_refuses_oversize():
    with pytest.raises(ProtocolError, match="online"):
        decode(DeviceState, b'{"device_id": "d1", "online": "maybe"}')
    with pytest.raises(ProtocolError, match="limit"):
        decode(DeviceState, b" " * (MAX_MESSAGE_BYTES + 1))
    with pytest.raises(ProtocolError):
        decode(CommandStatus, b"not json")


def test_rollback_command_must_be_signed_by_a_trusted_key(signing_key, other_key):
    cmd = Command(
        command_id="c1", device_id="d1", kind="rollback", rollback=RollbackPayload(reason="halt")
    )
    trust = TrustStore.from_keys([signing_key.public])
    with pytest.raises(SignatureError):
        verify_command(cmd, trust)
    signed = sign_command(cmd, signing_key)
    assert verify_command(decode(Command, signed.to_json()), trust) == signing_key.key_id
    forged = signed.model_copy(update={"device_id": "d2"})
    with pytest.raises(SignatureError) as err:
        verify_command(forged, trust)
    assert err.value.reason is ReasonCode.SIGNATURE_INVALID
    with pytest.raises(SignatureError):
        verify_command(sign_command(cmd, other_key), trust)


def test_memory_broker_delivers_retained_messages_and_wills():
    broker = MemoryBroker()
    t = Topics()
    dev = broker.client(
        "d1", will=Will(t.state("d1"), DeviceState(device_id="d1", online=False).to_json())
    )
    dev.connect()
    dev.publish(t.state("d1"), DeviceState(device_id="d1", online=True).to_json(), retain=True)
    seen: list[DeviceState] = []
    server = broker.client("server")
    server.set_handler(lambda topic, payload: seen.append(decode(DeviceState, payload)))
    server.connect()
    server.subscribe(t.all_states())
    assert [s.online for s in seen] == [True]
    broker.set_online(False)
    assert [s.online for s in seen] == [True, False]
    assert not dev.is_connected()
    assert dev.publish(t.metrics("d1"), b"{}").wait(0.1) is False
