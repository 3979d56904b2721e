"""A clustered broker, tested as one: a real 3-node NATS cluster (MQTT on JetStream).

(i)   What the broker gives, checked with plain paho: a retained message published on node 1
      reaches a wildcard subscriber on node 2; a persistent QoS 1 session that disconnects
      from node 2 gets its queued message after reconnecting to node 3; a last will fires
      across nodes and stays retained; MQTT 5 is refused and ``$share/…`` filters deliver
      nothing (no shared subscriptions in NATS 2.15); our transport, asked for MQTT 5,
      falls back to 3.1.1 with plain filters.
(ii)  The shipped commands on it: ``edgefleet fleet init`` + ``fleet serve`` on node 3,
      ``edgefleet agent init`` (with ``--broker`` repeated: a failover list) + ``agent run``
      for three devices spread over nodes 1 and 2, and a staged rollout that completes.
(iii) ``kill -9`` of node 1 mid-rollout: its devices move to another node of their lists,
      keep serving, drain their outboxes, and the rollout completes with every device on
      the target version; then the same with the fleet server's own node (node 3).

Everything waits with generous deadlines; nothing asserts a duration.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from protocol import KeyPair
from tests.e2e.cluster_deploy import (
    FINAL,
    Deployment,
    connected_to,
    deploy,
    on_version,
    queued_before,
)
from tests.e2e.conftest import Release
from tests.e2e.support import Traffic, wait_until
from tests.support.bundles import make_bundle
from tests.support.nats_cluster import NatsCluster

pytestmark = [pytest.mark.slow, pytest.mark.nats]


# (i) what the broker gives ----------------------------------------------------------------
def _paho(url: str, client_id: str, *, clean: bool = True, v5: bool = False) -> Any:
    import paho.mqtt.client as mqtt

    if v5:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    else:
        c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv311,
            clean_session=clean,
        )
    c.got = []  # type: ignore[attr-defined]
    c.connack = []  # type: ignore[attr-defined]
    c.on_message = lambda cl, ud, m: cl.got.append((m.topic, bytes(m.payload), m.retain))
    c.subacks = []  # type: ignore[attr-defined]
    c.on_connect = lambda cl, ud, fl, rc, pr=None: cl.connack.append(rc)
    c.on_subscribe = lambda cl, ud, mid, rcs, pr=None: cl.subacks.append(mid)
    host, port = url.removeprefix("mqtt://").rsplit(":", 1)
    c.connect(host, int(port), keepalive=30)
    c.loop_start()
    wait_until(lambda: c.connack, 30, f"a CONNACK from {url}")
    return c


def _close(c: Any) -> None:
    c.disconnect()
    c.loop_stop()


def test_retained_message_from_node_1_reaches_a_wildcard_subscriber_on_node_2(
    nats_cluster: NatsCluster,
) -> None:
    topic = f"cluster-{uuid.uuid4().hex[:6]}/devices/d1/state"
    pub = _paho(nats_cluster.node(1).url, f"pub-{uuid.uuid4().hex[:6]}")
    try:
        assert not pub.connack[0].is_failure
        pub.publish(topic, b"retained-on-1", qos=1, retain=True).wait_for_publish(30)
    finally:
        _close(pub)
    sub = _paho(nats_cluster.node(2).url, f"sub-{uuid.uuid4().hex[:6]}")
    try:
        sub.subscribe(topic.split("/")[0] + "/devices/+/state", 1)  # a wildcard filter
        wait_until(lambda: sub.got, 30, "the retained message on node 2")
        assert sub.got[0] == (topic, b"retained-on-1", True)
    finally:
        _close(sub)


def test_persistent_qos1_session_resumes_on_another_node_with_its_queued_message(
    nats_cluster: NatsCluster,
) -> None:
    client_id = f"sess-{uuid.uuid4().hex[:6]}"
    topic = f"cluster-{uuid.uuid4().hex[:6]}/devices/d2/cmd"
    first = _paho(nats_cluster.node(2).url, client_id, clean=False)
    _, mid = first.subscribe(topic, 1)
    wait_until(lambda: mid in first.subacks, 30, "the SUBACK on node 2")
    _close(first)
    pub = _paho(nats_cluster.node(1).url, f"pub-{uuid.uuid4().hex[:6]}")
    try:
        pub.publish(topic, b"queued-while-offline", qos=1).wait_for_publish(30)
    finally:
        _close(pub)
    again = _paho(nats_cluster.node(3).url, client_id, clean=False)
    try:
        assert again.connack and not again.connack[0].is_failure
        wait_until(lambda: again.got, 60, "the queued message on node 3")
        assert again.got[0][:2] == (topic, b"queued-while-offline")
    finally:
        _close(again)


def test_last_will_of_a_vanished_client_on_node_1_is_delivered_and_retained_cluster_wide(
    nats_cluster: NatsCluster,
) -> None:
    import socket

    import paho.mqtt.client as mqtt

    base = f"cluster-{uuid.uuid4().hex[:6]}"
    watcher = _paho(nats_cluster.node(2).url, f"w-{uuid.uuid4().hex[:6]}")
    try:
        _, mid = watcher.subscribe(f"{base}/devices/+/state", 1)
        wait_until(lambda: mid in watcher.subacks, 30, "the watcher's SUBACK")
        device = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"d-{uuid.uuid4().hex[:6]}",
            protocol=mqtt.MQTTv311,
            clean_session=False,
        )
        device.will_set(f"{base}/devices/d3/state", b"offline", qos=1, retain=True)
        host, port = nats_cluster.node(1).url.removeprefix("mqtt://").rsplit(":", 1)
        device.connect(host, int(port), keepalive=30)
        wait_until(lambda: device.loop(0.2) == 0 and device.is_connected(), 30, "CONNACK")
        sock = device.socket()
        sock.shutdown(socket.SHUT_RDWR)  # vanish without DISCONNECT: the will fires
        sock.close()
        wait_until(lambda: watcher.got, 60, "the last will on node 2")
        assert watcher.got[0][:2] == (f"{base}/devices/d3/state", b"offline")
    finally:
        _close(watcher)
    late = _paho(nats_cluster.node(3).url, f"l-{uuid.uuid4().hex[:6]}")
    try:
        late.subscribe(f"{base}/#", 1)
        wait_until(lambda: late.got, 30, "the retained will on node 3")
        assert late.got[0] == (f"{base}/devices/d3/state", b"offline", True)
    finally:
        _close(late)


def test_nats_refuses_mqtt5_and_never_delivers_to_a_share_filter(
    nats_cluster: NatsCluster,
) -> None:
    """Why the fleet server falls back to 3.1.1 there, and why ingest cannot rely on
    ``$share/…`` on NATS: the subscription is granted, and nothing ever arrives."""
    v5 = _paho(nats_cluster.node(1).url, f"v5-{uuid.uuid4().hex[:6]}", v5=True)
    try:
        assert v5.connack[0].is_failure
        assert "protocol version" in str(v5.connack[0]).lower()
    finally:
        v5.loop_stop()
    base = f"cluster-{uuid.uuid4().hex[:6]}/x"
    shared = _paho(nats_cluster.node(1).url, f"sh-{uuid.uuid4().hex[:6]}")
    plain = _paho(nats_cluster.node(1).url, f"pl-{uuid.uuid4().hex[:6]}")
    try:
        _, mid_shared = shared.subscribe(f"$share/g/{base}", 1)
        _, mid_plain = plain.subscribe(base, 1)
        wait_until(lambda: mid_shared in shared.subacks, 30, "the $share SUBACK")
        wait_until(lambda: mid_plain in plain.subacks, 30, "the plain SUBACK")
        pub = _paho(nats_cluster.node(2).url, f"pub-{uuid.uuid4().hex[:6]}")
        try:
            pub.publish(base, b"to-everyone", qos=1).wait_for_publish(30)
        finally:
            _close(pub)
        wait_until(lambda: plain.got, 30, "the plain subscriber's copy")
        time.sleep(1.0)  # the shared subscriber had the same chance (not an assertion)
        assert shared.got == []
    finally:
        _close(shared)
        _close(plain)


def test_transport_asked_for_mqtt5_falls_back_to_311_with_plain_filters_on_nats(
    nats_cluster: NatsCluster,
) -> None:
    from protocol.transport_paho import PahoTransport

    base = f"cluster-{uuid.uuid4().hex[:6]}/devices/+/telemetry/+"
    got: list[str] = []
    t = PahoTransport(
        [nats_cluster.node(2).url, nats_cluster.node(3).url],
        f"fleet-{uuid.uuid4().hex[:6]}",
        mqtt5=True,
        clean_session=False,
    )
    t.set_handler(lambda topic, payload: got.append(topic))
    t.subscribe(f"$share/fleet/{base}", 1)  # what the bridge asks for with a shared_group
    try:
        t.connect(timeout=60)
        assert t.mqtt5 is False and t.is_connected()
        pub = _paho(nats_cluster.node(1).url, f"pub-{uuid.uuid4().hex[:6]}")
        try:
            topic = base.replace("+", "d9", 1).replace("+", "metrics")

            def delivered() -> bool:  # until the new subscription is in place on the cluster
                pub.publish(topic, b"{}", qos=1).wait_for_publish(30)
                return bool(got)

            wait_until(delivered, 60, "a telemetry message through the plain filter", 0.5)
            assert got[0] == topic
        finally:
            _close(pub)
    finally:
        t.close()


# (ii) + (iii) the shipped commands -----------------------------------------------------------
# devices and their failover lists: two start on node 1, one on node 2
LISTS = {"nats-a": (1, 2, 3), "nats-b": (1, 3, 2), "nats-c": (2, 1, 3)}


@pytest.fixture(scope="module")
def deployment(
    nats_cluster: NatsCluster,
    tmp_path_factory: pytest.TempPathFactory,
    signing_key: KeyPair,
    iris_v1: Release,
) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("cluster")
    with deploy(root, nats_cluster, signing_key, iris_v1, LISTS, fleet_nodes=(3, 2)) as dep:
        yield dep


def test_shipped_fleet_and_agents_complete_a_staged_rollout_over_the_cluster(
    deployment: Deployment, iris_v2: Release
) -> None:
    dep = deployment
    for device in ("nats-a", "nats-b"):  # two devices on node 1, one on node 2
        assert connected_to(dep.agents[device]) == dep.cluster.node(1).url, dep.logs()
    assert connected_to(dep.agents["nats-c"]) == dep.cluster.node(2).url, dep.logs()

    with dep.http() as c:  # tools are told every node of the fleet's list
        broker = c.get("/v1/broker").json()
    assert broker["urls"] == [dep.cluster.node(3).url, dep.cluster.node(2).url]
    assert broker["url"] == dep.cluster.node(3).url

    rollout = dep.start_rollout(iris_v2.write(dep.root / "bundles"), "--stages", "1,2,3", "--count")
    status = dep.wait_final(rollout)
    assert status["state"] == "succeeded", (status, dep.logs())
    assert {d["state"] for d in status["devices"]} == {"installed"}
    wait_until(lambda: not on_version(dep, "2.0.0"), 60, "every device serving 2.0.0")


def test_killing_node_1_mid_rollout_moves_its_devices_and_the_rollout_completes(
    deployment: Deployment, iris_v3: Release
) -> None:
    dep = deployment
    on_node_1 = [d for d, a in dep.agents.items() if connected_to(a) == dep.cluster.node(1).url]
    assert on_node_1, dep.logs()
    traffic = Traffic(list(dep.agents.values()), threads=2, pause_s=0.1).start()
    try:
        # each stage soaks, so the rollout is still running when the node dies
        rollout = dep.start_rollout(
            iris_v3.write(dep.root / "bundles"), "--stages", "1,2,3", "--count", "--soak", "8"
        )
        wait_until(
            lambda: any(s["state"] != "pending" for s in dep.rollout(rollout)["stages"]),
            120,
            "the first stage to start",
        )
        before = dep.rollout(rollout)
        assert before["state"] not in FINAL, before
        dep.cluster.kill(1)

        def moved() -> bool:
            return all(
                connected_to(dep.agents[d]) not in (None, dep.cluster.node(1).url)
                for d in on_node_1
            )

        wait_until(moved, 180, f"{on_node_1} to reconnect to another node", 0.5)
        moved_at = time.time()
        for d in on_node_1:
            assert connected_to(dep.agents[d]) in dep.brokers[d][1:]
        # what the moved devices queued while their node was gone leaves their outboxes
        wait_until(
            lambda: all(queued_before(dep.root / d / "data", moved_at) == 0 for d in on_node_1),
            120,
            "the moved devices' outboxes to drain",
            0.5,
        )
        status = dep.wait_final(rollout, timeout=400)
        assert status["state"] == "succeeded", (status, dep.logs())
        assert {d["state"] for d in status["devices"]} == {"installed"}, status["devices"]
        wait_until(lambda: not on_version(dep, "3.0.0"), 60, "every device serving 3.0.0")
        wait_until(
            lambda: set(LISTS) <= dep.online(), 120, "every device online again at the fleet"
        )
    finally:
        traffic.stop()
        dep.cluster.restart(1)  # leave the cluster whole for the next test
    assert traffic.count() > 0 and not traffic.failures(), traffic.failures()[:5]


@pytest.fixture(scope="module")
def iris_v4(signing_key: KeyPair) -> Release:
    return Release(*make_bundle(signing_key, version="4.0.0", release=4))


def test_killing_the_fleet_servers_node_mid_rollout_moves_it_and_the_rollout_completes(
    deployment: Deployment, iris_v4: Release
) -> None:
    """The fleet server's own URL list: its node dies, it reconnects to the next node of its
    list with its persistent session and finishes the rollout."""
    dep = deployment
    fleet_node = dep.cluster.node(3)
    assert f"broker {fleet_node.url}," in dep.fleet.log()  # the first URL of its list
    rollout = dep.start_rollout(
        iris_v4.write(dep.root / "bundles"), "--stages", "1,2,3", "--count", "--soak", "8"
    )
    try:
        wait_until(
            lambda: any(s["state"] != "pending" for s in dep.rollout(rollout)["stages"]),
            120,
            "the first stage to start",
        )
        assert dep.rollout(rollout)["state"] not in FINAL
        dep.cluster.kill(3)
        status = dep.wait_final(rollout, timeout=400)
        assert status["state"] == "succeeded", (status, dep.logs())
        assert {d["state"] for d in status["devices"]} == {"installed"}, status["devices"]
        wait_until(lambda: not on_version(dep, "4.0.0"), 60, "every device serving 4.0.0")
        for device, agent in dep.agents.items():
            assert connected_to(agent) != fleet_node.url, (device, agent.log())
    finally:
        dep.cluster.restart(3)
