"""Fleet API latency where operators meet it: ``edgefleet fleet serve`` with 1,000 devices.

The server is set up as a user sets it up: ``edgefleet fleet init`` writes the config
(this script sets its data folder, broker port and API port), ``edgefleet fleet token
create --role viewer`` makes the API token, and ``edgefleet fleet serve --embedded-broker``
runs as its own process. The 1,000 devices register the way real devices do: a retained
birth message (``DeviceState``) on ``{p}/devices/{id}/state`` of the server's embedded
broker, which the server's MQTT bridge takes into the registry. One MQTT client publishes
all 1,000 births (a thousand paho clients would measure the broker's connection handling,
not the API); the script waits until ``GET /v1/overview`` counts all of them.

Timed with httpx (sequential requests on one keep-alive connection, ``Authorization:
Bearer``) and with a bare-socket client as an extra row (least client CPU, so it shows the
server's own cost), in interleaved rounds whose samples are pooled, never picked:

* ``GET /v1/devices?limit=1000`` (all 1,000 in one page, as JSON) and ``GET /v1/overview``
  on the fleet server;
* the **floor**: a hello-world FastAPI endpoint that returns a constant;
* the **transfer floor**: a FastAPI endpoint that returns the very bytes ``/v1/devices``
  answered, as a constant, so the ratio to it is the server's work, not the bytes on
  the wire.

Both floors are uvicorn processes of this script (``--serve``), started in the same run:
the script builds them itself because they are the baselines, not the product (no edgefleet
command serves a constant); the fleet API is only ever the shipped ``edgefleet fleet serve``.
No target is set for the fleet API; the ratios are printed.

Each simulated device signs its birth with a key of its own and proves the enrolment
token whose hash the script puts in ``fleet.toml`` (``[devices] enrol_token_hashes``), as
an agent with ``[enrol] token_file`` does; unsigned births would stay pending. If fewer
devices are listed than were published, the script says so.

    python -m bench.fleet_api_latency [--quick]
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

try:
    from bench._common import load_line, table, write_result
    from bench._http import percentiles, sample
    from bench._servers import Server
except ImportError:  # pragma: no cover - run as a loose script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench._common import load_line, table, write_result
    from bench._http import percentiles, sample
    from bench._servers import Server

DEVICES = 1000
ALL_DEVICES = f"/v1/devices?limit={DEVICES}"
ROUNDS = 3
CLIENTS = ("httpx", "raw")


def _serve(kind: str, port: int, workdir: Path) -> None:
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import Response

    app = FastAPI()

    @app.get("/health")
    async def health() -> dict:
        return {"ok": True}

    if kind == "same-bytes":
        body = (workdir / "devices.json").read_bytes()

        @app.get("/devices")
        async def devices() -> Response:
            return Response(body, media_type="application/json")

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def _register(broker_port: int, n: int, token: str) -> None:
    """Publish ``n`` retained birth messages, one per device, as the devices would: each
    signed by the device's own key and proving the enrolment ``token``."""
    from protocol import KeyPair
    from protocol.device_auth import enrol_proof, public_key_b64, sign_payload, token_hash
    from protocol.messages import DeviceState, ModelRef
    from protocol.topics import Topics
    from protocol.transport_paho import PahoTransport

    topics = Topics()
    t = PahoTransport(f"mqtt://127.0.0.1:{broker_port}", "bench-births", clean_session=True)
    t.connect(timeout=30)
    try:
        model = ModelRef(name="digits", version="1.0.0", release=1)
        pending = []
        for i in range(n):
            d = f"bench-{i:05d}"
            key = KeyPair.generate()
            birth = DeviceState(
                device_id=d,
                online=True,
                profile="host",
                model=model,
                agent_version="bench",
                tags=[f"line-{i % 10}"],
                public_key=public_key_b64(key.public),
                enrol_proof=enrol_proof(token_hash(token), d, key.key_id),
            )
            topic = topics.state(d)
            payload = sign_payload(birth.to_json(), topic, key, boot=1, seq=1)
            pending.append(t.publish(topic, payload, qos=1, retain=True))
        for p in pending:
            p.wait(30)
    finally:
        t.close()


ENROL_TOKEN = "efe_bench-fleet-api-latency"


def main(quick: bool = False) -> dict[str, Any]:
    import httpx

    from protocol.device_auth import token_hash
    from tests.support.brokers import free_port
    from tests.support.shipped import edgefleet, init_config

    n = 60 if quick else 300  # per (endpoint, client), split over ROUNDS rounds
    results: dict[str, Any] = {"devices_published": DEVICES, "quick": quick}
    results["load_at_start"] = load_line()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        api_port, broker_port = free_port(), free_port()
        config = init_config(
            "fleet",
            work / "fleet.toml",
            {
                "data_dir": "fleet-data",
                "broker.url": f"mqtt://127.0.0.1:{broker_port}",
                "api.port": api_port,
                "devices.enrol_token_hashes": [token_hash(ENROL_TOKEN)],
            },
        )
        token = edgefleet(
            "fleet", "token", "create", "--role", "viewer", "--name", "bench", "--config",
            str(config),
        ).stdout.strip().splitlines()[-1]  # fmt: skip
        auth = {"authorization": f"Bearer {token}"}
        fleet = Server.edgefleet(
            "fleet serve",
            ["fleet", "serve", "--config", str(config), "--embedded-broker"],
            "/v1/health",
            api_port,
            work / "fleet.log",
        )
        servers = [fleet]
        try:
            t0 = time.perf_counter()
            _register(broker_port, DEVICES, ENROL_TOKEN)
            base = fleet.url
            deadline = time.monotonic() + 120
            listed = 0
            while time.monotonic() < deadline:
                listed = httpx.get(base + "/v1/overview", headers=auth, timeout=30).json()[
                    "devices"
                ]
                if listed >= DEVICES:
                    break
                time.sleep(0.2)
            results["registration_s"] = time.perf_counter() - t0
            results["devices_listed"] = listed
            # the largest page (limit=1000) holds all 1,000 devices, as one answer did before
            # the list was paged; bench/list_timing.py times the default 100-device page
            body = httpx.get(base + ALL_DEVICES, headers=auth, timeout=30).content
            (work / "devices.json").write_bytes(body)
            results["devices_body_bytes"] = len(body)
            floor = Server.child("hello", work, module="bench.fleet_api_latency")
            servers.append(floor)
            same = Server.child("same-bytes", work, module="bench.fleet_api_latency")
            servers.append(same)
            endpoints = {
                "GET /v1/devices": (base + ALL_DEVICES, auth),
                "GET /v1/overview": (base + "/v1/overview", auth),
                "floor: hello-world constant": (floor.url + "/health", {}),
                "transfer floor: /v1/devices bytes as a constant": (same.url + "/devices", {}),
            }
            samples: dict[str, dict[str, list[float]]] = {
                e: {c: [] for c in CLIENTS} for e in endpoints
            }
            for _ in range(ROUNDS):
                for client in CLIENTS:
                    for name, (url, headers) in endpoints.items():
                        samples[name][client] += sample(client, url, None, n // ROUNDS, headers)
            results["rss_mb"] = fleet.rss_mb()
        finally:
            for s in servers:
                s.stop()
    lat = {e: {c: percentiles(v) for c, v in per.items()} for e, per in samples.items()}
    results["latency"] = lat
    results["load_at_end"] = load_line()
    _report(results)
    print(f"{results['load_at_start']}; at the end: {results['load_at_end']}")
    path = write_result("fleet_api_latency", results)
    print(f"\nwrote {path}")
    return results


def _report(results: dict[str, Any]) -> None:
    lat = results["latency"]
    rows = [
        [e, c, m["p50_ms"], m["p99_ms"], m["runs"]]
        for e, per in lat.items()
        for c, m in per.items()
    ]
    print(
        table(
            f"edgefleet fleet serve, {results['devices_listed']} devices listed "
            f"({results['devices_body_bytes']:,} B of JSON); ms, rounds pooled",
            ["endpoint", "client", "p50", "p99", "n"],
            rows,
        )
    )
    if results["devices_listed"] < results["devices_published"]:
        print(
            f"note: {results['devices_published']} births published, "
            f"{results['devices_listed']} devices listed (pending enrolment?)"
        )
    print(
        f"registration of {results['devices_published']} devices by birth message: "
        f"{results['registration_s']:.1f} s · fleet server RSS {results['rss_mb']:.0f} MiB"
    )
    floor = "floor: hello-world constant"
    same = "transfer floor: /v1/devices bytes as a constant"
    ratios: dict[str, dict[str, float]] = {}
    for c in CLIENTS:
        f, s = lat[floor][c]["p50_ms"], lat[same][c]["p50_ms"]
        d, o = lat["GET /v1/devices"][c]["p50_ms"], lat["GET /v1/overview"][c]["p50_ms"]
        ratios[c] = {
            "devices_over_floor": d / f,
            "devices_over_transfer_floor": d / s,
            "overview_over_floor": o / f,
        }
        print(
            f"{c:6s} /v1/devices p50 {d:.2f} ms = {d / f:.1f}× the floor ({f:.2f} ms), "
            f"{d / s:.1f}× the same bytes served as a constant ({s:.2f} ms) · "
            f"/v1/overview p50 {o:.2f} ms = {o / f:.1f}× the floor"
        )
    results["ratios"] = ratios
    h = {e: lat[e]["httpx"] for e in lat}
    results["headline"] = [
        {
            "metric": f"`fleet serve` GET /v1/devices ({results['devices_listed']} devices) "
            "p50 / p99, httpx",
            "value": f"{h['GET /v1/devices']['p50_ms']:.1f} / "
            f"{h['GET /v1/devices']['p99_ms']:.1f} ms",
            "anchor": f"hello-world {h[floor]['p50_ms']:.2f} ms; same bytes "
            f"{h[same]['p50_ms']:.2f} ms",
            "ratio": ratios["httpx"]["devices_over_floor"],
        },
        {
            "metric": "`fleet serve` GET /v1/overview p50 / p99, httpx",
            "value": f"{h['GET /v1/overview']['p50_ms']:.1f} / "
            f"{h['GET /v1/overview']['p99_ms']:.1f} ms",
            "anchor": f"hello-world {h[floor]['p50_ms']:.2f} ms",
            "ratio": ratios["httpx"]["overview_over_floor"],
        },
    ]


def _cli() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="fewer runs, for a smoke check")
    ap.add_argument("--serve", choices=["hello", "same-bytes"], help=argparse.SUPPRESS)
    ap.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        _serve(args.serve, args.port, args.workdir)
    else:
        main(quick=args.quick)


if __name__ == "__main__":
    _cli()
