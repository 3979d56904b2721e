"""Session-wide fixtures: signing keys, real MQTT brokers and a real PostgreSQL.

``broker_url`` is parametrized over amqtt (in-process, always) and Mosquitto (a real
subprocess, when ``mosquitto`` is installed; otherwise that parameter is skipped and shows
as skipped, never as passed).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from protocol import KeyPair
from tests.support.brokers import MOSQUITTO, EmbeddedBroker, Mosquitto
from tests.support.keys import COMMAND_KEY
from tests.support.nats_cluster import nats_cluster  # noqa: F401 (fixture)
from tests.support.postgres import postgres_server, postgres_url  # noqa: F401 (fixtures)


@pytest.fixture(scope="session")
def signing_key() -> KeyPair:
    return KeyPair.generate()


@pytest.fixture(scope="session")
def other_key() -> KeyPair:
    return KeyPair.generate()


@pytest.fixture(scope="session")
def command_key() -> KeyPair:
    """The fleet's online command key (a different role from ``signing_key``)."""
    return COMMAND_KEY


@pytest.fixture(scope="session")
def amqtt_broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker() as broker:
        yield broker


@pytest.fixture(scope="session")
def mosquitto_broker() -> Iterator[Mosquitto]:
    if MOSQUITTO is None:
        pytest.skip("mosquitto is not installed (CI installs it)")
    with Mosquitto() as broker:
        yield broker


@pytest.fixture(params=["amqtt", pytest.param("mosquitto", marks=pytest.mark.mosquitto)])
def broker_url(request: pytest.FixtureRequest) -> str:
    name = "amqtt_broker" if request.param == "amqtt" else "mosquitto_broker"
    return str(request.getfixturevalue(name).url)
