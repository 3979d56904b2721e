"""A failover list of broker URLs: parsing refuses bad lists; the paho transport moves to
the next URL when its broker goes away (two real Mosquitto processes, no cluster needed)."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from protocol.transport import MAX_BROKER_URLS, TransportError, broker_urls
from protocol.transport_paho import PahoTransport, _unshared
from tests.support.brokers import MOSQUITTO, Mosquitto, free_port


def test_broker_urls_parses_a_failover_list_in_order() -> None:
    urls = broker_urls(["mqtt://a:1883", "b:1884", "tcp://c"])
    assert [str(u) for u in urls] == ["mqtt://a:1883", "mqtt://b:1884", "mqtt://c:1883"]


@pytest.mark.parametrize(
    ("urls", "message"),
    [
        ([], "no broker URL"),
        (["mqtt://a:1883", "mqtts://b:8883"], "mix mqtt:// and mqtts://"),
        (["http://a"], "scheme must be mqtt"),
        (["mqtt://a:99999"], "port must be 1-65535"),
        (["mqtt://a:port"], "port must be 1-65535"),
        (["mqtt://:1883"], "has no host"),
        (["mqtt://a"] * (MAX_BROKER_URLS + 1), f"at most {MAX_BROKER_URLS}"),
        (["mqtt://" + "a" * 2100], "at most 2048 characters"),
        (["mqtt://dev:s3cret@a:1883"], "credentials do not belong in a URL"),
        (["http://dev:s3cret@a"], "credentials do not belong in a URL"),
    ],
)
def test_broker_urls_refuses_bad_lists_with_one_line(urls: list[str], message: str) -> None:
    with pytest.raises(TransportError, match=message) as err:
        broker_urls(urls)
    assert "\n" not in str(err.value) and "s3cret" not in str(err.value)


def test_unshared_turns_a_shared_filter_into_a_plain_one() -> None:
    assert _unshared("$share/fleet/edgefleet/devices/+/telemetry/+") == (
        "edgefleet/devices/+/telemetry/+"
    )
    assert _unshared("edgefleet/#") == "edgefleet/#"


@pytest.mark.mosquitto
def test_paho_transport_fails_over_to_the_next_url_and_back() -> None:
    if MOSQUITTO is None:
        pytest.skip("mosquitto is not installed (CI installs it)")
    dead = f"mqtt://127.0.0.1:{free_port()}"  # nothing listens here
    with Mosquitto() as first, Mosquitto() as second:
        t = PahoTransport([dead, first.url, second.url], f"fo-{uuid.uuid4().hex[:8]}")
        ups: list[bool] = []
        t.on_connection_change(ups.append)
        got = threading.Event()
        t.set_handler(lambda topic, payload: got.set())
        t.subscribe("failover/#", 1)
        try:
            t.connect(timeout=60)  # the dead URL first: the next attempt goes to ``first``
            assert str(t.url) == first.url
            first.stop()  # the connected node goes away
            deadline = time.monotonic() + 60
            while not (t.is_connected() and str(t.url) == second.url):
                assert time.monotonic() < deadline, f"no failover; ups={ups} at {t.url}"
                time.sleep(0.1)
            # the subscription was renewed on the new node
            t.publish("failover/x", b"1", qos=1).wait(10)
            assert got.wait(10)
            assert ups[0] is True and False in ups and ups[-1] is True
        finally:
            t.close()
