"""The shipped NATS permissions (``deploy/nats/users.conf``) and MQTT TLS block on the 3-node
cluster: a device reaches every topic the agent uses and no other device's; the fleet server
reaches all; ``fleet serve`` and ``agent run`` complete a rollout over ``mqtts://``.

The file is used as a user would: its ``device-0001`` block copied for ``device-0002`` with
the id changed, and the password placeholders filled in (plain text here; bcrypt hashes in
production).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from protocol import KeyPair
from tests.e2e.cluster_deploy import deploy, on_version
from tests.e2e.conftest import Release
from tests.e2e.support import wait_until
from tests.support.nats_cluster import DEPLOY, NatsCluster, why_unavailable
from tests.support.pki import make_pki

pytestmark = [pytest.mark.slow, pytest.mark.nats]

PASSWORDS = {"edgefleet-server": "pw-server", "device-0001": "pw-1", "device-0002": "pw-2"}


def _users_conf() -> str:
    text = (DEPLOY / "users.conf").read_text()
    block = re.search(r"\n    \{\n      user: \"device-0001\".*?\n    \}\n", text, re.S)
    assert block, "deploy/nats/users.conf has no device-0001 block to copy"
    second = block.group(0).replace("device-0001", "device-0002").replace("DEVICE-0001", "X")
    text = text.replace(block.group(0), block.group(0) + second.lstrip("\n"))
    text = text.replace("REPLACE-WITH-SERVER-PASSWORD-HASH", PASSWORDS["edgefleet-server"])
    text = text.replace("REPLACE-WITH-DEVICE-0001-PASSWORD-HASH", PASSWORDS["device-0001"])
    text = text.replace("REPLACE-WITH-X-PASSWORD-HASH", PASSWORDS["device-0002"])
    assert '-HASH"' not in text, text
    return text


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    """The cluster as production runs it: ``users.conf`` and the MQTT ``tls`` block on."""
    reason = why_unavailable()
    if reason is not None:
        pytest.skip(reason)
    probe = ("edgefleet-server", PASSWORDS["edgefleet-server"])
    pki = make_pki(tmp_path_factory.mktemp("nats-pki"))
    with NatsCluster(users=_users_conf(), probe=probe, tls=pki) as cluster:
        yield cluster


def _client(
    cluster: NatsCluster, node: int, user: str | None, password: str | None, client_id: str
) -> Any:
    import paho.mqtt.client as mqtt

    c = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv311,
        clean_session=False,
    )
    if user is not None:
        c.username_pw_set(user, password)
    c.tls_set(ca_certs=str(cluster.ca_file))
    url = cluster.node(node).url
    assert url.startswith("mqtts://"), url
    c.got = []  # type: ignore[attr-defined]
    c.connack = []  # type: ignore[attr-defined]
    c.subacks = {}  # type: ignore[attr-defined]
    c.on_connect = lambda cl, ud, fl, rc, pr=None: cl.connack.append(rc)
    c.on_message = lambda cl, ud, m: cl.got.append((m.topic, bytes(m.payload)))
    c.on_subscribe = lambda cl, ud, mid, rcs, pr=None: cl.subacks.__setitem__(mid, rcs)
    host, port = url.removeprefix("mqtts://").rsplit(":", 1)
    c.connect(host, int(port), keepalive=30)
    c.loop_start()
    wait_until(lambda: c.connack, 30, f"a CONNACK for {user}")
    return c


def _subscribe(c: Any, topic: str) -> bool:
    """True when the broker granted the subscription."""
    _, mid = c.subscribe(topic, 1)
    wait_until(lambda: mid in c.subacks, 30, f"the SUBACK for {topic}")
    return not c.subacks[mid][0].is_failure


def _close(c: Any) -> None:
    c.disconnect()
    c.loop_stop()


def test_credentials_are_required(secured: NatsCluster) -> None:
    for user, password in [(None, None), ("device-0001", "wrong")]:
        c = _client(secured, 1, user, password, f"x-{uuid.uuid4().hex[:6]}")
        try:
            assert c.connack[0].is_failure, (user, c.connack)
        finally:
            _close(c)


def test_a_device_reaches_its_own_topics_and_no_other_devices(secured: NatsCluster) -> None:
    p = "edgefleet"
    fleet = _client(secured, 3, "edgefleet-server", PASSWORDS["edgefleet-server"], "fleet-acl")
    dev = _client(secured, 1, "device-0001", PASSWORDS["device-0001"], "device-0001")
    try:
        for f in (f"{p}/devices/+/state", f"{p}/devices/+/status", f"{p}/devices/+/telemetry/+"):
            assert _subscribe(fleet, f), f
        for f in ("cmd", "artifact/#"):
            assert _subscribe(dev, f"{p}/devices/device-0001/{f}"), f
        assert _subscribe(dev, f"{p}/fleet/kex") and _subscribe(dev, f"{p}/alerts")
        for f in (f"{p}/devices/device-0002/cmd", f"{p}/devices/+/cmd", f"{p}/#", "#"):
            assert not _subscribe(dev, f), f"device-0001 may subscribe to {f}"

        # the device's messages: its own reach the fleet, one forged for device-0002 does not
        dev.publish(f"{p}/devices/device-0002/status", b"forged", qos=1)
        own = ["state", "status", "telemetry/metrics", "telemetry/sketch"]
        for kind in own:
            retain = kind == "state"  # births are retained
            dev.publish(f"{p}/devices/device-0001/{kind}", kind.encode(), qos=1, retain=retain)
        wanted = {f"{p}/devices/device-0001/{k}" for k in own}
        wait_until(lambda: wanted <= {t for t, _ in fleet.got}, 60, "the device's messages")
        assert all("device-0002" not in t for t, _ in fleet.got), fleet.got

        # the fleet's messages: the device gets its command, chunk and the fleet key only
        fleet.publish(f"{p}/devices/device-0002/cmd", b"not-yours", qos=1)
        fleet.publish(f"{p}/devices/device-0001/cmd", b"cmd", qos=1)
        fleet.publish(f"{p}/devices/device-0001/artifact/{'a' * 64}/0", b"chunk", qos=1)
        fleet.publish(f"{p}/fleet/kex", b"kex", qos=1, retain=True)
        wait_until(lambda: len(dev.got) >= 3, 60, "the fleet's messages at the device")
        assert sorted(payload for _, payload in dev.got) == [b"chunk", b"cmd", b"kex"]
    finally:
        _close(dev)
        _close(fleet)


def test_shipped_fleet_and_agents_roll_out_under_the_shipped_permissions(
    secured: NatsCluster,
    tmp_path: Path,
    signing_key: KeyPair,
    iris_v1: Release,
    iris_v2: Release,
) -> None:
    """``fleet serve`` and two ``agent run`` processes logged in as the users of
    ``users.conf``: births, commands, artifact chunks, statuses and the fleet key all pass.

    The fleet server is configured for MQTT 5 shared-subscription ingest, as on Mosquitto;
    NATS refuses MQTT 5, so it falls back to 3.1.1 with a plain telemetry filter, and the
    devices' telemetry still arrives."""
    lists = {"device-0001": (1, 2, 3), "device-0002": (2, 1, 3)}
    shared = {"broker.mqtt5": True, "broker.shared_group": "ingest"}
    with deploy(
        tmp_path,
        secured,
        signing_key,
        iris_v1,
        lists,
        fleet_nodes=(3, 1),
        credentials=PASSWORDS,
        fleet_keys=shared,
    ) as dep:
        assert "falling back to MQTT 3.1.1" in dep.fleet.log()

        def telemetry() -> bool:
            with dep.http() as c:
                accepted = c.get("/v1/health").json()["bridge"]["accepted"]
            return accepted.get("metrics", 0) > 0

        wait_until(telemetry, 60, "device telemetry through the plain filter")
        rollout = dep.start_rollout(
            iris_v2.write(tmp_path / "bundles"), "--stages", "1,2", "--count"
        )
        status = dep.wait_final(rollout)
        assert status["state"] == "succeeded", (status, dep.logs())
        wait_until(lambda: not on_version(dep, "2.0.0"), 60, "both devices serving 2.0.0")
