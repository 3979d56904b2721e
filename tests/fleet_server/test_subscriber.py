"""The reusable subscriber: MQTT 5 shared subscriptions on Mosquitto, a plain one on amqtt."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timezone

import pytest

from fleet_server.telemetry.subscriber import DecodingSubscriber, Subscriber
from protocol.messages import MetricsReport, ModelRef
from protocol.topics import Topics
from protocol.transport import TransportError
from protocol.transport_paho import PahoTransport

# amqtt 0.12.1 warns (DeprecationWarning, attributed outside amqtt's own modules) that psutil
# becomes an optional extra of its $SYS plugin; nothing we can act on from here.
pytestmark = pytest.mark.filterwarnings("ignore:`BrokerSysPlugin`:DeprecationWarning")

TOPICS = Topics()
FILTER = TOPICS.all_telemetry()
NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


def metrics_payload(device: str, seq: int) -> bytes:
    return MetricsReport(
        device_id=device,
        seq=seq,
        window_start=NOW,
        window_end=NOW,
        model=ModelRef(name="iris", version="1.0.0", release=1),
        requests=seq,
    ).to_json()


class Collector:
    def __init__(self) -> None:
        self.items: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()

    def __call__(self, topic: str, payload: bytes) -> None:
        with self.lock:
            self.items.append((topic, payload))


def wait_for(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def publish_all(url: str, messages: list[tuple[str, bytes]]) -> None:
    pub = PahoTransport(url, "test-publisher", clean_session=True)
    pub.connect()
    try:
        for topic, payload in messages:
            assert pub.publish(topic, payload, qos=1).wait(5)
    finally:
        pub.close()


@pytest.mark.mosquitto
def test_two_workers_in_a_shared_group_split_the_stream_on_mosquitto(mosquitto_broker):
    url = mosquitto_broker.url
    a, b = Collector(), Collector()
    with (
        Subscriber(url, FILTER, group="ingest", handler=a) as wa,
        Subscriber(url, FILTER, group="ingest", handler=b) as wb,
    ):
        assert wa.shared and wb.shared and wa.protocol == "5"
        assert wa.subscriptions == [f"$share/ingest/{FILTER}"]
        time.sleep(0.3)  # let both SUBACKs land before publishing
        msgs = [
            (TOPICS.metrics(f"dev-{i % 7}"), metrics_payload(f"dev-{i % 7}", i)) for i in range(60)
        ]
        publish_all(url, msgs)
        wait_for(lambda: len(a.items) + len(b.items) >= 60)
        time.sleep(0.2)  # nothing more should arrive: each message went to one worker
    got_a, got_b = {p for _, p in a.items}, {p for _, p in b.items}
    assert len(a.items) + len(b.items) == 60
    assert got_a and got_b and not (got_a & got_b)
    assert got_a | got_b == {p for _, p in msgs}


def test_a_shared_group_on_amqtt_degrades_to_a_plain_subscription(amqtt_broker):
    url = amqtt_broker.url
    a, b = Collector(), Collector()
    with (
        Subscriber(url, FILTER, group="ingest", handler=a) as wa,
        Subscriber(url, FILTER, group="ingest", handler=b) as wb,
    ):
        assert not wa.shared and not wb.shared and wa.protocol == "3.1.1"
        assert wa.subscriptions == [FILTER]
        time.sleep(0.3)
        publish_all(url, [(TOPICS.metrics("dev-1"), metrics_payload("dev-1", i)) for i in range(5)])
        wait_for(lambda: len(a.items) == 5 and len(b.items) == 5)  # everyone sees everything


def test_forcing_mqtt5_on_a_311_only_broker_fails_with_a_readable_error(amqtt_broker):
    with pytest.raises(TransportError, match="protocol"):
        Subscriber(amqtt_broker.url, FILTER, mqtt5=True, timeout=5).start()


def test_decoding_subscriber_drops_mismatched_and_malformed_payloads(amqtt_broker):
    good: list[tuple[str, object]] = []
    bad: list[str] = []

    class Sub(DecodingSubscriber):
        def on_message(self, device_id, kind, message):
            good.append((kind, message))

        def on_invalid(self, topic, reason):
            bad.append(reason)

    with Sub(amqtt_broker.url, FILTER):
        time.sleep(0.2)
        publish_all(
            amqtt_broker.url,
            [
                (TOPICS.metrics("dev-1"), metrics_payload("dev-2", 1)),  # claims another device
                (TOPICS.metrics("dev-1"), b"{not json"),
                (TOPICS.metrics("dev-1"), metrics_payload("dev-1", 2)),
            ],
        )
        wait_for(lambda: len(good) + len(bad) == 3)
    assert [(k, m.seq) for k, m in good] == [("metrics", 2)]
    assert any("does not match" in r for r in bad) and len(bad) == 2


def test_a_handler_that_raises_does_not_stop_the_subscriber(amqtt_broker, caplog):
    seen: list[bytes] = []

    def handler(topic: str, payload: bytes) -> None:
        seen.append(payload)
        if len(seen) == 1:
            raise ValueError("boom")

    with Subscriber(amqtt_broker.url, FILTER, handler=handler):
        time.sleep(0.2)
        publish_all(
            amqtt_broker.url, [(TOPICS.metrics("d"), metrics_payload("d", i)) for i in range(3)]
        )
        wait_for(lambda: len(seen) == 3)
    assert "handler failed" in caplog.text


def test_example_subscriber_script_prints_decoded_metrics(broker_url):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.Popen(
        [
            sys.executable,
            str(root / "examples" / "subscriber.py"),
            "--broker",
            broker_url,
            "--count",
            "2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        first = proc.stdout.readline()
        assert first.startswith("listening on edgefleet/devices/+/telemetry/metrics"), (
            proc.stderr.read()
        )
        time.sleep(0.2)
        publish_all(
            broker_url,
            [
                (TOPICS.metrics("ex-1"), metrics_payload("ex-1", 7)),
                (
                    TOPICS.metrics("ex-1"),
                    metrics_payload("someone-else", 8),
                ),  # dropped: id mismatch
                (TOPICS.metrics("ex-2"), metrics_payload("ex-2", 9)),
            ],
        )
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    assert out.splitlines() == [
        "ex-1 iris 1.0.0 requests=7 errors=0 p95=-",
        "ex-2 iris 1.0.0 requests=9 errors=0 p95=-",
    ]
    assert "does not match" in err
