"""A refused subscription is not silent: the transport logs it once, counts it, and
subscribes again with backoff until the broker takes it.

A broker refuses a SUBSCRIBE with a failure code in its SUBACK: a permission, or (seen with
NATS under load) a QoS 1 subscription it could not set up in time. Before, the client stayed
connected and never got that topic's messages. Here a real 3-node NATS cluster first denies
the topic to the client's user, then reloads its permissions (SIGHUP) to allow it.
(Mosquitto 2.0 grants a subscription its ACL denies and filters the messages instead, so
it cannot show this.)
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable

import pytest

from protocol.transport_paho import PahoTransport
from tests.support.nats_cluster import NatsCluster, why_unavailable

pytestmark = [pytest.mark.nats]

PROBE = ("probe", "pw-probe")


def _users(client_may_read: list[str]) -> str:
    subjects = ", ".join(f'"{s}"' for s in [*client_may_read, "$MQTT.sub.>"])
    return f"""authorization {{
  users = [
    {{ user: "probe", password: "pw-probe", allowed_connection_types: ["MQTT"],
       permissions: {{ publish: [">"], subscribe: [">"] }} }}
    {{ user: "client", password: "pw-client", allowed_connection_types: ["MQTT"],
       permissions: {{ publish: ["open.>"], subscribe: [{subjects}] }} }}
  ]
}}"""


def _wait(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_a_refused_subscription_is_logged_and_taken_once_the_broker_allows_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    reason = why_unavailable()
    if reason is not None:
        pytest.skip(reason)
    got = threading.Event()
    with NatsCluster(users=_users(["open", "open.>"]), probe=PROBE) as cluster:
        url = cluster.node(1).url
        t = PahoTransport(
            url, "suback-client", username="client", password="pw-client", max_backoff=2
        )
        pub = PahoTransport(url, "suback-pub", username="probe", password="pw-probe")
        try:
            t.set_handler(lambda topic, payload: got.set())
            with caplog.at_level(logging.INFO, logger="protocol.transport_paho"):
                t.connect(timeout=30)
                t.subscribe("closed/cmd", 1)
                _wait(lambda: t.subscriptions_refused >= 2, 30, "the refusal and a retry")
                refused = [
                    r for r in caplog.records if getattr(r, "link", "") == "subscribe_refused"
                ]
                assert len(refused) == 1  # one line for a run of refusals, not one a retry
                assert "closed/cmd" in refused[0].getMessage()
                assert not t.subscribed("closed/cmd")  # wanted, refused: not acknowledged
                assert not t.subscribed("never/asked")

                allowed = _users(["open", "open.>", "closed", "closed.>"])
                for node in cluster.nodes:  # nats-server reloads its config on SIGHUP
                    node.write_config(cluster.nodes, allowed)
                    assert node.proc is not None
                    node.proc.send_signal(signal.SIGHUP)
                _wait(
                    lambda: any("taken on retry" in r.getMessage() for r in caplog.records),
                    30,
                    "the subscription to be taken on a retry",
                )
                assert t.subscribed("closed/cmd")
            pub.connect(timeout=30)
            pub.publish("closed/cmd", b"hello", qos=1).wait(10)
            assert got.wait(20), "the retried subscription delivers"
        finally:
            t.close()
            pub.close()
