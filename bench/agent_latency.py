"""Agent serving latency where users meet it: ``edgefleet agent run``, timed by ordinary clients.

Models: a 100-tree RandomForest and an MLP (64 hidden units) on scikit-learn's digits
(64 features), converted with skl2onnx and packed into signed bundles. Each agent is set up
as a user sets one up: ``edgefleet agent init`` writes the config (this script then sets
its port, data folder, broker URL and pinned key, as a user edits it), ``edgefleet agent
install`` verifies and installs the bundle, and ``edgefleet agent run`` serves it as its
own process, with the prediction log and feature sketching on (the defaults) and connected
to an MQTT broker (amqtt in a child process).

In the same run, each as its own uvicorn process on 127.0.0.1 (this script builds these two
servers itself because they are the comparison, not the product: no edgefleet command
serves a hello-world endpoint or the tutorial service; the agent itself is only ever the
shipped ``edgefleet agent run``):

* the **floor**: a hello-world FastAPI endpoint that returns a constant (``POST
  /predict``; access log off, so the floor is as low as it gets);
* the **anchor**: the tutorial service, FastAPI + ``joblib.load`` + ``model.predict`` /
  ``predict_proba`` on the same scikit-learn model.

Clients (``bench/_http.py``): httpx, requests, curl (one process, every request on one
connection, per-request times from ``-w``) and a bare-socket client as an extra row. Each
client sends sequential single-row requests on one keep-alive connection; servers are
measured in interleaved rounds (``ROUNDS``) so that the shared machine's drifting load
hits them alike, and the rounds' samples are pooled, never picked.

Targets, printed as ratios for every client (forest; the MLP is printed the same way):
agent p50 ≤ 1.5× the floor's p50; the anchor's p50 ≥ 5× the agent's (aim 8×); agent p99
< 3 ms with httpx.

Throughput: 4 bare-socket clients against the shipped agent with the prediction log on
and off (``log.enabled = false`` in a second agent's config; sketching has no switch and
is on in both), in paired rounds (``TPUT_ROUNDS``), to show what the log costs.

In-process rows (labelled so): raw ``onnxruntime`` ``session.run`` against
``agent.Predictor.predict``, both built here in this process. That part builds objects
itself because it measures the library's own overhead per row (input checks, IOBinding,
result building) with no HTTP in the way; no shipped command isolates it.

    python -m bench.agent_latency [--quick]

(No ``from __future__ import annotations``: FastAPI must see the anchor's real ``Item``.)
"""

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

try:
    from bench._common import latency_ms, load_line, table, write_result
    from bench._http import CLIENTS, RawClient, percentiles, sample
    from bench._servers import Server
except ImportError:  # pragma: no cover - run as a loose script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench._common import latency_ms, load_line, table, write_result
    from bench._http import CLIENTS, RawClient, percentiles, sample
    from bench._servers import Server

REPO = Path(__file__).resolve().parents[1]
ROUNDS = 3
TPUT_CLIENTS = 4
TPUT_ROUNDS = 6
TARGET_FLOOR = 1.5  # agent p50 ≤ 1.5× the hello-world floor
TARGET_ANCHOR = 5.0  # anchor p50 ≥ 5× the agent's (aim 8×)
TARGET_P99_MS = 3.0  # agent p99 with httpx


# -- models, bundles, configs -----------------------------------------------------------------
def _train(kind: str) -> tuple[Any, np.ndarray, np.ndarray]:
    import warnings

    from sklearn.datasets import load_digits
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.neural_network import MLPClassifier

    X, y = load_digits(return_X_y=True)
    if kind == "forest":
        model: Any = RandomForestClassifier(n_estimators=100, random_state=0, n_jobs=1)
    else:
        model = MLPClassifier(hidden_layer_sizes=(64,), max_iter=400, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MLP convergence chatter
        model.fit(X, y)
    return model, X.astype(np.float32), y


def _prepare(kind: str, workdir: Path, broker_url: str) -> dict[str, Any]:
    """Train and convert one model, sign its bundle, set up two agents with the shipped
    commands (log on / log off), and write the joblib file for the anchor."""
    import joblib
    from skl2onnx import to_onnx

    from protocol import KeyPair
    from tests.support.brokers import free_port
    from tests.support.bundles import TrainedModel, make_bundle, smoke_test, trained
    from tests.support.shipped import edgefleet, init_config

    model, X, y = _train(kind)
    onx = to_onnx(
        model, X[:1], options={id(model): {"zipmap": False}}, target_opset={"": 17, "ai.onnx.ml": 3}
    ).SerializeToString()
    base = trained("digits-forest")  # the digits schema (same 64 features, same output names)
    tm = TrainedModel(kind, onx, X, y, base.input_schema, base.output_schema)
    key = KeyPair.generate()
    bundle, _ = make_bundle(
        key, name=f"digits-{kind}", kind="digits-forest", model_bytes=onx, smoke=smoke_test(tm)
    )
    d = workdir / kind
    d.mkdir(parents=True)
    (d / "release.pub").write_bytes(key.public_pem())
    (d / "bundle.efb").write_bytes(bundle)
    agents = {}
    for mode, log_on in (("agent", True), ("agent_log_off", False)):
        port = free_port()
        config = init_config(
            "agent",
            d / mode / "agent.toml",
            {
                "device_id": f"bench-{kind}-{mode.replace('_', '-')}",
                "data_dir": "data",
                "broker.url": broker_url,
                "trust.bundle_keys": ["../release.pub"],
                "api.port": port,
                "log.enabled": log_on,
            },
        )
        edgefleet("agent", "install", str(d / "bundle.efb"), "--config", str(config))
        agents[mode] = (config, port)
    joblib.dump(model, d / "model.joblib")
    return {"dir": d, "onnx": onx, "X": X, "agents": agents}


# -- the floor, the anchor and the broker (run in a child process) -----------------------------
def _hello_app() -> Any:
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/health")
    async def health() -> dict:
        return {"ok": True}

    @app.post("/predict")
    async def predict() -> dict:
        return {"label": 0}

    return app


def _anchor_app(path: Path) -> Any:
    """The tutorial service: FastAPI + joblib + ``model.predict``."""
    import joblib
    from fastapi import FastAPI
    from pydantic import BaseModel

    model = joblib.load(path)
    app = FastAPI()

    class Item(BaseModel):
        features: list[float]

    @app.get("/health")
    def health() -> dict:
        return {"ok": True}

    @app.post("/predict")
    def predict(item: Item) -> dict:
        X = np.array(item.features).reshape(1, -1)
        return {
            "prediction": int(model.predict(X)[0]),
            "probabilities": model.predict_proba(X)[0].tolist(),
        }

    return app


def _serve(kind: str, port: int, workdir: Path | None) -> None:
    if kind == "broker":
        from fleet_server.embedded_broker import EmbeddedBroker

        EmbeddedBroker("127.0.0.1", port).start()
        threading.Event().wait()
        return
    import uvicorn

    app = _hello_app() if kind == "hello" else _anchor_app(workdir / "model.joblib")  # type: ignore[operator]
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# -- measurements ------------------------------------------------------------------------------
def _bodies(X: np.ndarray, anchor: bool) -> list[bytes]:
    if anchor:
        return [json.dumps({"features": row.tolist()}).encode() for row in X[:256]]
    return [json.dumps({"inputs": [row.tolist()]}).encode() for row in X[:256]]


def _throughput(
    url: str, bodies: list[bytes], seconds: float, server: "Server"
) -> tuple[float, float]:
    """Requests/s with TPUT_CLIENTS concurrent keep-alive bare-socket clients, and the
    server's CPU µs per request (user+system, all threads, including 1 s after the window
    for the background writers to catch up)."""
    counts = [0] * TPUT_CLIENTS
    stop = threading.Event()
    failures: list[str] = []

    def worker(k: int) -> None:
        client = RawClient(url)
        try:
            j = k
            while not stop.is_set():
                status = client.request(bodies[j % len(bodies)])
                if status != 200:
                    failures.append(f"HTTP {status}")
                    return
                counts[k] += 1
                j += TPUT_CLIENTS
        finally:
            client.close()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(TPUT_CLIENTS)]
    for t in threads:
        t.start()
    time.sleep(1.5)  # warm up, and let the background writers drain the warm-up rows
    base, t0, cpu0 = sum(counts), time.perf_counter(), server.cpu_s()
    time.sleep(seconds)
    done, elapsed = sum(counts), time.perf_counter() - t0
    stop.set()
    for t in threads:
        t.join()
    time.sleep(1.0)
    cpu = server.cpu_s() - cpu0
    if failures:
        raise RuntimeError(failures[0])
    return (done - base) / elapsed, cpu / max(done - base, 1) * 1e6


def _in_process(prep: dict[str, Any], runs: int) -> dict[str, dict[str, float]]:
    """Raw onnxruntime against ``agent.Predictor``, both in this process (see docstring)."""
    import onnxruntime as ort

    from agent.config import load_config
    from agent.predictor import Predictor

    X = prep["X"]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(prep["onnx"], sess_options=opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    rows = [X[i : i + 1] for i in range(256)]
    i = 0

    def raw() -> None:
        nonlocal i
        sess.run(None, {name: rows[i % 256]})
        i += 1

    predictor = Predictor.from_config(load_config(prep["agents"]["agent"][0]))

    def agent_array() -> None:
        nonlocal i
        predictor.predict(rows[i % 256])
        i += 1

    out: dict[str, list[float]] = {"ort": [], "predictor": []}
    for _ in range(3):  # interleaved, pooled
        out["ort"].append(latency_ms(raw, runs=runs)["p50_ms"])
        out["predictor"].append(latency_ms(agent_array, runs=runs)["p50_ms"])
    predictor.close()
    return {k: {"p50_ms": float(np.median(v)), "rounds_p50_ms": v} for k, v in out.items()}


def _measure(kind: str, prep: dict[str, Any], floor: Server, n: int, quick: bool) -> dict[str, Any]:
    X = prep["X"]
    d: Path = prep["dir"]
    servers = {
        "agent": Server.agent(f"agent ({kind})", *prep["agents"]["agent"]),
        "anchor": Server.child("anchor", d),
        "floor": floor,
    }
    urls = {
        "agent": servers["agent"].url + "/v1/predict",
        "anchor": servers["anchor"].url + "/predict",
        "floor": floor.url + "/predict",
    }
    bodies = {"agent": _bodies(X, False), "anchor": _bodies(X, True), "floor": _bodies(X, False)}
    samples: dict[str, dict[str, list[float]]] = {s: {c: [] for c in CLIENTS} for s in servers}
    log_off: Server | None = None
    try:
        for _ in range(ROUNDS):
            for client in CLIENTS:
                for s in servers:
                    # the forest anchor takes ~10 ms a request: fewer of them, same rounds
                    k = max(60, n // 5) if s == "anchor" and kind == "forest" else n
                    samples[s][client] += sample(client, urls[s], bodies[s], k // ROUNDS)
        rss = {s: servers[s].rss_mb() for s in ("agent", "anchor")}
        # throughput, log on / off, paired rounds in alternating order
        log_off = Server.agent(f"agent, log off ({kind})", *prep["agents"]["agent_log_off"])
        pair = {"agent": servers["agent"], "agent_log_off": log_off}
        tput: dict[str, list[float]] = {k: [] for k in pair}
        cpu: dict[str, list[float]] = {k: [] for k in pair}
        rounds, window = (2, 1.0) if quick else (TPUT_ROUNDS, 2.0)
        for i in range(rounds):
            for k in list(pair)[:: 1 if i % 2 == 0 else -1]:
                rps, us = _throughput(pair[k].url + "/v1/predict", bodies["agent"], window, pair[k])
                tput[k].append(rps)
                cpu[k].append(us)
    finally:
        for s in ("agent", "anchor"):
            servers[s].stop()
        if log_off is not None:
            log_off.stop()
    lat = {s: {c: percentiles(v) for c, v in per.items()} for s, per in samples.items()}
    return {
        "latency": lat,
        "rss_mb": rss,
        "throughput_rps": tput,
        "server_cpu_us_per_request": cpu,
        "log_cost_throughput": 1
        - float(np.median(np.divide(tput["agent"], tput["agent_log_off"]))),
        "log_cost_cpu": float(np.median(cpu["agent"])) / float(np.median(cpu["agent_log_off"])) - 1,
    }


def main(quick: bool = False) -> dict[str, Any]:
    n = 300 if quick else 1500  # per (server, client), split over ROUNDS rounds
    in_runs = 300 if quick else 2000
    results: dict[str, Any] = {"models": {}, "clients": list(CLIENTS), "quick": quick}
    results["load_at_start"] = load_line()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        broker = Server.child("broker", work, health="")
        from tests.support.brokers import wait_port

        wait_port("127.0.0.1", broker.port, timeout=30)
        floor = Server.child("hello", work)
        try:
            for kind in ("forest", "mlp"):
                prep = _prepare(kind, work, f"mqtt://127.0.0.1:{broker.port}")
                r = _measure(kind, prep, floor, n, quick)
                r["in_process"] = _in_process(prep, in_runs)
                results["models"][kind] = r
        finally:
            floor.stop()
            broker.stop()
    results["load_at_end"] = load_line()
    _report(results)
    print(f"{results['load_at_start']}; at the end: {results['load_at_end']}")
    path = write_result("agent_latency", results)
    print(f"\nwrote {path}")
    return results


def _report(results: dict[str, Any]) -> None:
    rows = []
    for kind, r in results["models"].items():
        lat = r["latency"]
        for s, label in (
            ("agent", "edgefleet agent run (log+sketch on)"),
            ("floor", "hello-world FastAPI (floor)"),
            ("anchor", "FastAPI+joblib+predict (anchor)"),
        ):
            for c in CLIENTS:
                m = lat[s][c]
                rows.append([kind, label, c, m["p50_ms"], m["p99_ms"], m["runs"]])
        ip = r["in_process"]
        rows.append([kind, "in-process onnxruntime session.run", "-", ip["ort"]["p50_ms"], "", ""])
        rows.append([kind, "in-process agent.Predictor", "-", ip["predictor"]["p50_ms"], "", ""])
    print(
        table(
            "sequential single-row requests on one keep-alive connection (ms); "
            "rounds pooled, not picked",
            ["model", "server", "client", "p50", "p99", "n"],
            rows,
        )
    )
    print()
    headline: list[dict[str, Any]] = []
    for kind, r in results["models"].items():
        lat = r["latency"]
        ratios: dict[str, dict[str, float]] = {}
        for c in CLIENTS:
            a, f, d = lat["agent"][c], lat["floor"][c], lat["anchor"][c]
            ratios[c] = {
                "agent_over_floor_p50": a["p50_ms"] / f["p50_ms"],
                "anchor_over_agent_p50": d["p50_ms"] / a["p50_ms"],
            }
            print(
                f"{kind:6s} {c:8s} agent p50 {a['p50_ms']:.3f} ms = "
                f"{ratios[c]['agent_over_floor_p50']:.2f}× floor {f['p50_ms']:.3f} ms "
                f"(target ≤ {TARGET_FLOOR}×) · anchor {d['p50_ms']:.2f} ms = "
                f"{ratios[c]['anchor_over_agent_p50']:.1f}× slower than the agent "
                f"(target ≥ {TARGET_ANCHOR:.0f}×, aim 8×) · agent p99 {a['p99_ms']:.2f} ms"
                + (
                    f" (target < {TARGET_P99_MS} ms; the floor's own p99 {f['p99_ms']:.2f} ms)"
                    if c == "httpx"
                    else ""
                )
            )
        r["ratios"] = ratios
        ip = r["in_process"]
        r["predictor_over_ort_p50"] = ip["predictor"]["p50_ms"] / ip["ort"]["p50_ms"]
        t_on = float(np.median(r["throughput_rps"]["agent"]))
        t_off = float(np.median(r["throughput_rps"]["agent_log_off"]))
        print(
            f"{kind:6s} throughput ({TPUT_CLIENTS} bare-socket clients, median of paired rounds): "
            f"log on {t_on:.0f} req/s, log off {t_off:.0f} req/s, log cost "
            f"{r['log_cost_throughput'] * 100:.1f}% (server CPU {r['log_cost_cpu'] * 100:+.0f}%) · "
            f"in-process Predictor / onnxruntime p50 {r['predictor_over_ort_p50']:.2f}× · "
            f"RSS agent {r['rss_mb']['agent']:.0f} MiB, anchor {r['rss_mb']['anchor']:.0f} MiB"
        )
        h = lat["agent"]["httpx"]
        headline += [
            {
                "metric": f"{kind}: `edgefleet agent run` p50 / p99, httpx",
                "value": f"{h['p50_ms']:.2f} / {h['p99_ms']:.2f} ms",
                "anchor": f"hello-world FastAPI {lat['floor']['httpx']['p50_ms']:.2f} ms",
                "ratio": ratios["httpx"]["agent_over_floor_p50"],
            },
            {
                "metric": f"{kind}: FastAPI+joblib p50 / agent p50, httpx",
                "value": f"{h['p50_ms']:.2f} ms",
                "anchor": f"FastAPI+joblib {lat['anchor']['httpx']['p50_ms']:.2f} ms",
                "ratio": ratios["httpx"]["anchor_over_agent_p50"],
            },
        ]
    results["headline"] = headline


def _cli() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="fewer runs, for a smoke check")
    ap.add_argument("--serve", choices=["hello", "anchor", "broker"], help=argparse.SUPPRESS)
    ap.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        _serve(args.serve, args.port, args.workdir)
    else:
        main(quick=args.quick)


if __name__ == "__main__":
    _cli()
