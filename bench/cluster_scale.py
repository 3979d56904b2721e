"""Fleet server scaled out: simulated devices over a 3-node NATS cluster, 2 ``fleet serve``
processes on one PostgreSQL, a 4-stage rollout; against the single-machine run.

The servers are the shipped command: ``edgefleet fleet init`` writes each ``fleet.toml``,
edited as a user edits it for a cluster (``registry.url`` of the PostgreSQL, ``broker.urls``
listing the three NATS nodes in another order for each process, its own
``broker.client_id`` and API port, the bench's command and bundle keys, the hash of the
bench's enrolment token, ``rollout.tick_s`` as in the single-machine run, and an enrolment
rate that lets 10,000 devices enrol at once); ``edgefleet fleet token create`` makes an
operator token and ``edgefleet fleet serve`` runs each server as its own process. The bundle
is uploaded and the rollout created and started through the REST API with httpx.

PostgreSQL is a real PostgreSQL 15 on a loopback port (``tests/support/postgres.py``); the
broker is a real 3-node ``nats-server`` cluster with MQTT on JetStream
(``tests/support/nats_cluster.py``, the shipped ``deploy/nats`` configs). The devices are
``bench/fleet_scale.py``'s simulated agents (own Ed25519 and X25519 keys, signed births
with the enrolment proof, signed deploy commands verified, shared retained chunks
reassembled and hashed, MAC'd statuses), ``DEVICES_PER_CLIENT`` per MQTT connection, the
connections dealt round-robin over the three nodes: 10,000 agent processes do not fit on
one machine, and the point is the servers' and the brokers' work, not the agents'.

Measured per fleet size:

* rollout time: ``POST /v1/rollouts?start=true`` to every device having installed the
  bundle, as the devices saw it (their own ``installed`` set), and to the rollout's
  ``succeeded`` state in the API;
* server CPU: user + system seconds of both ``fleet serve`` processes over the rollout
  (psutil), each process and their sum, per device in ms (the single-process figure is
  1.1 ms in ``fleet_scale``'s 1,000-device run);
* registration: births to every device online in the API, and the servers' CPU for it;
* the broker floor: one command to every device and every status back through the
  cluster (``fleet_scale._ping_round``), with the nats-server processes' CPU over the rollout.

Anchor in the same invocation: ``fleet_scale.run_once`` at 1,000 devices on one Mosquitto
with one ``FleetService`` process; the cluster's rollout time and CPU per device are
printed as ratios against it, and the growth from the cluster's smallest to its largest
size as a ratio against the single machine's growth would be linear.

Sizes 1,000, 3,000 and 10,000 (``--quick``: 200 and 1,000), each on a fresh NATS cluster
and database; the first size that does not finish (devices not all online within 600 s, a
rollout that does not end within 300 s, a broker node that cannot be reached) ends the run,
and the reason is printed and written with the results. The SUBACKs NATS sends back
refused are counted (``subscriptions_refused``).

    python -m bench.fleet_scale --cluster [--quick]
    python -m bench.cluster_scale --sizes 10000      (writes cluster_scale_10000.json)
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench._common import load_line, table, write_result

SIZES = (1_000, 3_000, 10_000)
QUICK_SIZES = (200, 1_000)
TARGET_S = 30.0
CPU_TARGET_MS = 1.1  # single process, 1,000 devices (README, fleet_scale)
STAGES = [5, 25, 50, 100]
TICK_S = 0.05  # as fleet_scale's single-machine server


def _cpu(pids: list[int]) -> list[float]:
    import psutil

    out = []
    for pid in pids:
        t = psutil.Process(pid).cpu_times()
        out.append(float(t.user + t.system))
    return out


def _wait(cond: Any, timeout: float, what: str, every: float = 0.05) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(every)
    return time.monotonic() - t0


def _configs(
    work: Path, nats: Any, db_url: str, command_pem: Path, bundle_pub: Path
) -> list[tuple[Path, int]]:
    """Two ``fleet init`` configs edited for the cluster: (path, API port) each."""
    from bench.fleet_scale import ENROL_TOKEN, PREFIX
    from protocol.device_auth import token_hash
    from tests.support.brokers import free_port
    from tests.support.shipped import init_config, set_keys

    out = []
    orders = [(1, 2, 3), (2, 3, 1)]
    for i, order in enumerate(orders, 1):
        port = free_port()
        folder = work / f"fleet-{i}"
        folder.mkdir()
        path = folder / "fleet.toml"
        init_config("fleet", path, {})
        # one broker is `url`, a cluster `urls`: the user swaps the line, as deploy/ shows
        path.write_text(path.read_text().replace('\nurl = "mqtt://127.0.0.1:1883"', "\n"))
        keys = {
            "data_dir": str(folder / "data"),
            "registry.url": db_url,
            "broker.urls": [nats.node(n).url for n in order],
            "broker.client_id": f"bench-fleet-{i}",
            "broker.topic_prefix": PREFIX,
            "api.port": port,
            "signing.command_key": str(command_pem),
            "signing.bundle_keys": [str(bundle_pub)],
            "rollout.tick_s": TICK_S,
            "devices.enrol_token_hashes": [token_hash(ENROL_TOKEN)],
            "devices.enrol_per_minute": 1_000_000.0,
            "devices.enrol_burst": 100_000,
        }
        path.write_text(set_keys(path.read_text(), keys))
        out.append((path, port))
    return out


def _count_subacks(clients: list[Any]) -> list[int]:
    """Counters of the SUBACKs the clients' connections receive: ``[acknowledged, refused]``
    (a SUBACK whose return code is a failure: NATS answers so when it cannot make the
    subscription's JetStream consumer in time). The transport does not report SUBACKs, so
    the bench sets paho's callback on it."""
    count, lock = [0, 0], threading.Lock()

    def on_subscribe(client: Any, userdata: Any, mid: Any, codes: Any, props: Any = None) -> None:
        refused = sum(1 for c in codes if getattr(c, "is_failure", False))
        with lock:
            count[0] += len(codes)
            count[1] += refused

    for c in clients:
        c.t._client.on_subscribe = on_subscribe
    return count


def _online(http: Any) -> int:
    by = http.get("/v1/overview").json()["by"]
    return _count_online(by)


def _progress(line: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {line}", flush=True)


def _count_online(by: dict[str, dict[str, int]]) -> int:
    """Online devices from the overview's counts (``{"online": {"online": n, …}, …}``)."""
    return int(by.get("online", {}).get("online", 0))


def run_cluster(
    n: int, bundle: bytes, key: Any, work: Path, db_url: str, nats: Any
) -> dict[str, Any]:
    """One rollout to ``n`` simulated devices spread over ``nats``'s nodes, two servers."""
    import httpx

    from bench._servers import Server
    from bench.fleet_scale import DEVICES_PER_CLIENT, SimClient, _ping_round
    from protocol import KeyPair, TrustStore
    from protocol.transport_paho import PahoTransport
    from tests.support.shipped import edgefleet

    work.mkdir(parents=True)
    command_key = KeyPair.generate()
    command_pem = work / "command.pem"
    command_pem.write_bytes(command_key.private_pem())
    command_pem.chmod(0o600)
    bundle_pub = work / "release.pub"
    bundle_pub.write_bytes(key.public_pem())
    configs = _configs(work, nats, db_url, command_pem, bundle_pub)
    token = (
        edgefleet("fleet", "token", "create", "--role", "operator", "--config", str(configs[0][0]))
        .stdout.strip()
        .splitlines()[-1]
    )
    trust = TrustStore.from_keys([command_key.public])
    ids = [f"dev-{i:05d}" for i in range(n)]
    urls = nats.urls
    clients = [
        SimClient(
            urls[(j // DEVICES_PER_CLIENT) % len(urls)],
            f"sim-{n}-{j}",
            ids[j : j + DEVICES_PER_CLIENT],
            trust,
        )
        for j in range(0, n, DEVICES_PER_CLIENT)
    ]
    servers: list[Server] = []
    out: dict[str, Any] = {"n": n, "connections": len(clients)}
    try:
        t0 = time.monotonic()
        acks = _count_subacks(clients)
        threads = [threading.Thread(target=c.start) for c in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # every command subscription acknowledged (QoS 0, as the agent): a command sent
        # before the SUBACK is lost
        want = n + len(clients)  # one per device, and each connection's kex topic
        out["subscribe_s"] = _wait(lambda: acks[0] >= want, 600, "every subscription", 0.2)
        out["subscribe_s"] = time.monotonic() - t0
        out["subscriptions_refused"] = acks[1]
        _progress(f"{n} devices: every subscription acknowledged after {out['subscribe_s']:.1f} s")
        # the broker floor, before the servers run (they would answer nothing anyway)
        anchor = PahoTransport(urls[0], f"anchor-{n}", clean_session=True)
        anchor.connect(timeout=120)  # a loaded NATS node can take a while to load a session
        out["ping_round_s"] = _ping_round(clients, key, anchor)
        anchor.close()
        for i, (path, port) in enumerate(configs, 1):
            servers.append(
                Server.edgefleet(
                    f"fleet serve {i}",
                    ["fleet", "serve", "--config", str(path)],
                    "/v1/health",
                    port,
                    path.parent / "fleet.log",
                )
            )
        pids = [s.proc.pid for s in servers]
        nats_pids = [node.proc.pid for node in nats.nodes]
        auth = {"authorization": f"Bearer {token}"}
        with httpx.Client(base_url=servers[0].url, headers=auth, timeout=120) as http:
            r = http.post(
                "/v1/bundles", content=bundle, headers={"content-type": "application/octet-stream"}
            )
            if r.status_code not in (200, 201):
                raise RuntimeError(f"upload: {r.status_code} {r.text[:300]}")
            c0, t0 = _cpu(pids), time.monotonic()
            for c in clients:
                c.birth()
            out["register_s"] = _wait(lambda: _online(http) >= n, 600, "every device online", 0.5)
            _progress(f"{n} devices online after {out['register_s']:.1f} s")
            out["register_cpu_s"] = [b - a for a, b in zip(c0, _cpu(pids), strict=True)]
            time.sleep(2 * TICK_S + 1.0)  # let the births' tail settle before the rollout
            body = {
                "bundle": "bench@2.0.0",
                "stages": STAGES,
                "soak_s": 0,
                "success_threshold": 1.0,
                "device_timeout_s": 120,
                "min_devices": 1,
            }
            c0, n0, d0 = _cpu(pids), _cpu(nats_pids), _cpu([os.getpid()])
            t0 = time.monotonic()
            r = http.post("/v1/rollouts", params={"start": "true"}, json=body)
            if r.status_code != 201:
                raise RuntimeError(f"create rollout: {r.status_code} {r.text[:300]}")
            rid = r.json()["rollout_id"]
            state: dict[str, Any] = {"state": None, "at": None}

            def installed() -> int:
                return sum(len(c.installed) for c in clients)

            def done() -> bool:
                if state["at"] is None:
                    rows = http.get("/v1/rollouts", params={"limit": 5}).json()["items"]
                    row = next((x for x in rows if x["rollout_id"] == rid), {})
                    if time.monotonic() - state.setdefault("said", 0.0) > 5:
                        state["said"] = time.monotonic()
                        _progress(
                            f"{installed()} installed; {row.get('state')} {row.get('counts')}"
                        )
                    if row.get("state") in ("succeeded", "halted", "aborted", "rolled_back"):
                        state.update(state=row["state"], at=time.monotonic() - t0)
                if state["at"] is not None and state["state"] != "succeeded":
                    return True
                return installed() >= n and state["at"] is not None

            devices_at: list[float] = []

            def watch() -> None:
                while installed() < n and time.monotonic() - t0 < 300:
                    time.sleep(0.01)
                devices_at.append(time.monotonic() - t0)

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            _wait(done, 300, "the rollout to end", 0.25)
            watcher.join(5)
            cpu = [b - a for a, b in zip(c0, _cpu(pids), strict=True)]
            nats_cpu = [b - a for a, b in zip(n0, _cpu(nats_pids), strict=True)]
            devices_cpu = _cpu([os.getpid()])[0] - d0[0]
            status = http.get(f"/v1/rollouts/{rid}").json()
            lease = http.get("/v1/overview").json().get("cluster", {})
        out.update(
            {
                "rollout_s": devices_at[0] if devices_at else float("nan"),
                "api_done_s": state["at"],
                "state": state["state"],
                "installed_seen_by_devices": installed(),
                "stalled_downloads_asked_again": sum(c.asked_again for c in clients),
                "stage_states": [s["state"] for s in status.get("stages", [])],
                "server_cpu_s": cpu,
                "nats_cpu_s": nats_cpu,
                "devices_cpu_s": devices_cpu,
                "server_rss_mb": [s.rss_mb() for s in servers],
                "cluster": lease,
            }
        )
        return out
    finally:
        for s in servers:
            s.stop()
        for c in clients:
            c.close()


def main(quick: bool = False, sizes: tuple[int, ...] | None = None) -> dict[str, Any]:
    """``sizes``: the cluster's fleet sizes (default ``SIZES``); a run with other sizes
    writes ``cluster_scale_<sizes>.json`` beside the default run's file."""
    from bench import fleet_scale
    from protocol import KeyPair
    from tests.support.nats_cluster import NatsCluster
    from tests.support.nats_cluster import why_unavailable as no_nats
    from tests.support.postgres import PostgresServer
    from tests.support.postgres import why_unavailable as no_pg

    missing = no_nats() or no_pg()
    if missing:
        raise SystemExit(f"fleet_scale --cluster needs nats-server and PostgreSQL: {missing}")
    name = "cluster_scale" if sizes is None else "cluster_scale_" + "_".join(map(str, sizes))
    sizes = sizes or (QUICK_SIZES if quick else SIZES)
    key = KeyPair.generate()
    bundle = fleet_scale._bundle(key)
    result: dict[str, Any] = {"quick": quick, "sizes": list(sizes), "load_at_start": load_line()}
    # the anchor: one FleetService process on one Mosquitto, 1,000 devices, this invocation
    single = fleet_scale.run_once(1_000, fleet_scale.DEVICES_PER_CLIENT * 20, bundle, key)
    result["single"] = single
    runs: list[dict[str, Any]] = []
    errors: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp, PostgresServer() as pg:
        for n in sizes:
            # a fresh cluster and database per size: no retained births or sessions carried over
            try:
                with NatsCluster() as nats:
                    runs.append(
                        run_cluster(n, bundle, key, Path(tmp) / f"c{n}", pg.create_database(), nats)
                    )
            except Exception as e:  # measured what was reachable; say why
                errors[str(n)] = f"{type(e).__name__}: {e}"[:2000]
                _progress(f"{n} devices: not reached: {errors[str(n)][:300]}")
                break
            write_result(name, {**result, "cluster": runs, "partial": True})
    result["cluster"] = runs
    result["errors"] = errors
    result["load_at_end"] = load_line()
    _report(result, single, runs, errors)
    write_result(name, result)
    return result


def _report(
    result: dict[str, Any], single: dict[str, Any], runs: list[dict[str, Any]], errors: Any
) -> None:
    s_ro = single["rollout"]
    s_ms = s_ro["cpu_s"] / single["n"] * 1000
    rows = [
        [
            "single: 1 process, Mosquitto, SQLite",
            single["n"],
            s_ro["state"],
            s_ro["seconds"],
            single["ping_round_s"],
            f"{s_ro['cpu_s']:.2f}",
            s_ms,
            1.0,
            1.0,
        ]
    ]
    for r in runs:
        ms = sum(r["server_cpu_s"]) / r["n"] * 1000
        r["cpu_ms_per_device"] = ms
        rows.append(
            [
                "cluster: 2 processes, 3 NATS nodes, PostgreSQL",
                r["n"],
                r["state"],
                r["rollout_s"],
                r["ping_round_s"],
                " + ".join(f"{c:.2f}" for c in r["server_cpu_s"]),
                ms,
                r["rollout_s"] / s_ro["seconds"],
                ms / s_ms,
            ]
        )
    print(
        table(
            "fleet_scale --cluster: 4-stage rollout (5/25/50/100 %, no soak), "
            "start to every device installed",
            ["setup", "devices", "state", "rollout s", "ping round s", "server CPU s",
             "CPU ms/device", "time × single", "CPU/device × single"],
            rows,
        )
    )  # fmt: skip
    for r in runs:
        print(
            f"  cluster, {r['n']:,} devices on {r['connections']} connections: registration "
            f"{r['register_s']:.1f} s (server CPU {sum(r['register_cpu_s']):.1f} s); rollout "
            f"{r['state']} in the API after {r['api_done_s']:.2f} s; CPU over the rollout: "
            f"nats-server {' + '.join(f'{c:.1f}' for c in r['nats_cpu_s'])} s, the simulated "
            f"devices {r['devices_cpu_s']:.1f} s; subscriptions acknowledged after "
            f"{r['subscribe_s']:.0f} s; stalled downloads that asked again "
            f"{r.get('stalled_downloads_asked_again', 0)}; server RSS "
            f"{' / '.join(f'{m:.0f}' for m in r['server_rss_mb'])} MB"
        )
    headline = []
    if runs:
        big = runs[-1]
        headline += [
            {
                "metric": f"4-stage rollout to {big['n']:,} devices, 2 fleet serve processes, "
                "3 NATS nodes, PostgreSQL",
                "value": f"{big['rollout_s']:.2f} s",
                "anchor": f"target {TARGET_S:.0f} s",
                "ratio": big["rollout_s"] / TARGET_S,
            },
            {
                "metric": f"server CPU per device over the rollout, cluster, {big['n']:,} devices",
                "value": f"{big['cpu_ms_per_device']:.2f} ms",
                "anchor": f"{s_ms:.2f} ms: one process, 1,000 devices, same run",
                "ratio": big["cpu_ms_per_device"] / s_ms,
            },
        ]
        small = runs[0]
        if len(runs) > 1:
            k = big["n"] / small["n"]
            growth = big["rollout_s"] / small["rollout_s"]
            result["growth"] = {"devices_x": k, "rollout_time_x": growth}
            print(
                f"  growth {small['n']:,} → {big['n']:,} devices (×{k:.0f}) on the cluster: "
                f"rollout time ×{growth:.2f}, server CPU "
                f"×{sum(big['server_cpu_s']) / sum(small['server_cpu_s']):.2f}"
            )
            headline.append(
                {
                    "metric": f"rollout time growth on the cluster, {small['n']:,} → "
                    f"{big['n']:,} devices",
                    "value": f"×{growth:.2f}",
                    "anchor": f"single machine at 1,000 devices: {s_ro['seconds']:.2f} s",
                    "ratio": big["rollout_s"] / s_ro["seconds"],
                }
            )
    for n, why in errors.items():
        print(f"  {n} devices: not reached: {why.splitlines()[0]}")
    print(f"{result['load_at_start']}; at the end: {result['load_at_end']}")
    result["headline"] = headline


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer devices, for a smoke check")
    ap.add_argument("--sizes", type=int, nargs="+", help="the cluster's fleet sizes")
    args = ap.parse_args()
    main(args.quick, tuple(args.sizes) if args.sizes else None)
