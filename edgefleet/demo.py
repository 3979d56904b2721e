"""``edgefleet demo``: the whole story, on one machine, with real parts.

1. train a classifier on scikit-learn's breast-cancer data (v1: scaled logistic regression,
   v2: a random forest);
2. build and sign bundles v1 and v2 for two device profiles with the real toolchain;
3. start the fleet server (REST API, dashboard, MQTT bridge, rollout and drift engines) on
   the embedded amqtt broker, or on ``broker_url``;
4. start N real agents in this process, each with its own device id, data dir and API port;
5. roll v1 out in stages while traffic flows through the agents' local HTTP APIs;
6. roll v2 out with some canaries made to fail their smoke test: the rollout halts at
   stage 1 and the canaries that installed it are rolled back by signed commands;
7. shift the inputs on some devices until the central drift check fires its alert.

The library never prints: :func:`run_demo` reports progress through a callback and returns
a :class:`DemoResult`; ``edgefleet/demo_cli.py`` renders it.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from protocol.errors import EdgefleetError

Progress = Callable[[str, str], None]  # (step, message)

MODEL_NAME = "cancer-screen"
PROFILES = ("host", "atom-x6000e-gateway")


@dataclass
class DemoOptions:
    devices: int = 20
    workdir: Path | None = None
    broker_url: str | None = None  # None: embedded amqtt broker
    api_port: int = 0  # 0: a free port
    seed: int = 0
    failing_share: float = 0.4  # of the v2 canaries
    drift_devices: int = 10
    timeout_s: float = 120.0


@dataclass
class DeviceRow:
    device_id: str
    profile: str
    version: str
    requests: int
    not_ready: int  # 503 before the device had any model (v1 not installed yet)
    errors: int
    p50_ms: float | None
    p95_ms: float | None
    shifted: bool
    failing_canary: bool


@dataclass
class DemoResult:
    workdir: Path
    dashboard_url: str
    username: str
    password: str
    devices: list[DeviceRow]
    rollouts: list[dict[str, Any]]
    decisions: list[str]
    drift: dict[str, Any] | None
    alerts: list[dict[str, Any]]
    v2_halted: bool
    canaries: list[str]
    failing: list[str]
    stage1_only: bool
    dashboard_shows_drift: bool = False
    error_samples: list[str] = field(default_factory=list)
    durations: dict[str, float] = field(default_factory=dict)


class DemoError(EdgefleetError):
    """A step of the demo did not reach its expected state in time."""


def _wait(what: str, cond: Callable[[], bool], timeout: float, every: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(every)
    raise DemoError(f"timed out after {timeout:.0f} s waiting for {what}")


def _free_port() -> int:
    from fleet_server.embedded_broker import free_port

    return free_port()


# 1–2: model and bundles ---------------------------------------------------------------
def _train(work: Path, seed: int) -> dict[str, Any]:
    import joblib
    from sklearn.datasets import load_breast_cancer
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    data = load_breast_cancer()
    names = [n.replace(" ", "_") for n in data.feature_names]
    X = data.data.astype(np.float32)
    X_train, X_live, y_train, y_live = train_test_split(
        X, data.target, test_size=0.4, random_state=seed, stratify=data.target
    )
    v1 = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(X_train, y_train)
    v2 = RandomForestClassifier(n_estimators=60, max_depth=8, random_state=seed).fit(
        X_train, y_train
    )
    joblib.dump(v1, work / "v1.joblib")
    joblib.dump(v2, work / "v2.joblib")
    np.savez(work / "train.npz", X=X_train, y=y_train, feature_names=np.array(names))
    return {
        "names": names,
        "X_live": X_live,
        "y_live": y_live,
        "std": X_train.std(axis=0),
        "acc_v1": float(v1.score(X_live, y_live)),
        "acc_v2": float(v2.score(X_live, y_live)),
    }


def _build_bundles(work: Path, progress: Progress) -> tuple[Path, Path, Path, Path]:
    from protocol.profiles import load_profile
    from toolchain.build import build
    from toolchain.data import load_data
    from toolchain.keys import generate_keys

    keys = work / "keys"
    release = generate_keys(keys, "release")
    fleet = generate_keys(keys, "fleet")
    data = load_data(work / "train.npz")
    profiles = [load_profile(p) for p in PROFILES]
    out: list[Path] = []
    for version, release_no, src in (("1.0.0", 1, "v1.joblib"), ("2.0.0", 2, "v2.joblib")):
        progress("build", f"building {MODEL_NAME} {version} from {src} for {', '.join(PROFILES)}")
        res = build(
            work / src,
            data,
            name=MODEL_NAME,
            version=version,
            profiles=profiles,
            key_path=release.private_path,
            out_dir=work / "bundles",
            release=release_no,
            runs=60,
        )
        if res.bundle is None:
            raise DemoError(f"build of {version} produced no bundle: {res.report}")
        chosen = getattr(res.report, "chosen", None)
        progress("build", f"signed {res.bundle.name} (variant: {getattr(chosen, 'name', chosen)})")
        out.append(res.bundle)
    return out[0], out[1], release.public_path, fleet.private_path


# 3: fleet server ----------------------------------------------------------------------
def _fleet_config(
    work: Path,
    broker_url: str,
    api_port: int,
    release_pub: Path,
    fleet_key: Path,
    prefix: str,
    enrol_token: str,
) -> Any:
    from fleet_server.config import FleetConfig
    from protocol.device_auth import token_hash

    return FleetConfig.model_validate(
        {
            "data_dir": str(work / "fleet"),
            "broker": {
                "url": broker_url,
                "client_id": f"edgefleet-server-{secrets.token_hex(3)}",
                "topic_prefix": prefix,
            },
            "api": {"host": "127.0.0.1", "port": api_port},
            # Two roles: the fleet's online key signs commands, the release key bundles.
            "signing": {"command_key": str(fleet_key), "bundle_keys": [str(release_pub)]},
            # A device that has not confirmed in 20 s is timed out and sent the deploy again
            # (the default 300 s suits real fleets, not a 3-minute story).
            "rollout": {
                "tick_s": 0.25,
                "soak_s": 1.0,
                "min_devices": 2,
                "failure_threshold": 0.2,
                "device_timeout_s": 20.0,
                "max_retries": 3,
            },
            "drift": {"min_rows": 150, "window_seconds": 3600},
            # The demo's devices prove this run's enrolment token (only its hash is here).
            "devices": {"enrol_token_hashes": [token_hash(enrol_token)]},
        }
    )


# 4: agents ----------------------------------------------------------------------------
def _enrol_token_file(work: Path, token: str) -> Path:
    path = work / "enrol-token"
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    return path


def _agent_config(
    work: Path,
    i: int,
    broker_url: str,
    trusted: tuple[Path, Path],
    prefix: str,
    failing: bool = False,
) -> Any:
    """``trusted``: (bundle public key, fleet command public key)."""
    from agent.config import AgentConfig

    profile = PROFILES[i % len(PROFILES)]
    short = "host" if profile == "host" else "gw"
    device_id = f"{short}-{i:02d}"
    return AgentConfig.model_validate(
        {
            "device_id": device_id,
            "profile": profile,
            "data_dir": str(work / "devices" / device_id),
            "tags": [f"site-{'north' if i % 3 else 'south'}"],
            "broker": {"url": broker_url, "topic_prefix": prefix},
            "trust": {"bundle_keys": [str(trusted[0])], "command_keys": [str(trusted[1])]},
            "api": {"host": "127.0.0.1", "port": _free_port()},
            "sketch": {"window_seconds": 2.0, "window_rows": 5000},
            "faults": {"fail_smoke_test": failing},
            "enrol": {"token_file": str(work / "enrol-token")},
        }
    )


class _Traffic:
    """Client threads sending rows through the agents' local HTTP APIs."""

    def __init__(
        self, agents: dict[str, Any], rows: np.ndarray, std: np.ndarray, seed: int
    ) -> None:
        self.agents = agents
        self.rows = rows
        self.std = std
        self.shifted: set[str] = set()
        self.latency: dict[str, list[float]] = {d: [] for d in agents}
        self.errors: dict[str, int] = {d: 0 for d in agents}
        self.not_ready: dict[str, int] = {d: 0 for d in agents}
        self.error_samples: list[str] = []
        self.rng = np.random.default_rng(seed)
        self._stop = threading.Event()
        self._gate = threading.Lock()  # held by pause(): no request while agents restart
        self._threads: list[threading.Thread] = []

    def start(self, workers: int = 2) -> None:
        ids = sorted(self.agents)
        for w in range(workers):
            mine = ids[w::workers]
            t = threading.Thread(target=self._run, args=(mine,), name=f"traffic-{w}", daemon=True)
            t.start()
            self._threads.append(t)

    def _run(self, ids: list[str]) -> None:
        import httpx

        with httpx.Client(timeout=5.0) as client:
            while not self._stop.is_set():
                with self._gate:
                    self._round(client, ids)
                time.sleep(0.02)

    def _round(self, client: Any, ids: list[str]) -> None:
        import httpx

        for device_id in ids:
            agent = self.agents[device_id]
            batch = self.rows[self.rng.integers(0, len(self.rows), 4)].astype(np.float64)
            if device_id in self.shifted:
                batch = batch + 2.5 * self.std
            t0 = time.perf_counter()
            try:
                r = client.post(f"{agent.api_url}/v1/predict", json={"inputs": batch.tolist()})
            except httpx.HTTPError as exc:
                self.errors[device_id] += 1
                self.error_samples.append(f"{device_id}: {type(exc).__name__}")
                continue
            if r.status_code == 200:
                self.latency[device_id].append((time.perf_counter() - t0) * 1000)
            elif r.status_code == 503 and '"no_model"' in r.text:
                # Read from the answer itself: checking the predictor afterwards races with
                # the install that lands between the answer and the check.
                self.not_ready[device_id] += 1
            else:
                self.errors[device_id] += 1
                self.error_samples.append(f"{device_id}: HTTP {r.status_code} {r.text[:120]}")

    def pause(self) -> None:
        self._gate.acquire()

    def resume(self) -> None:
        self._gate.release()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)


def dashboard_alerts(base_url: str, username: str, password: str) -> str:
    """Log in to the dashboard like a person would and return the overview's alert panel text."""
    import html
    import re

    import httpx

    with httpx.Client(base_url=base_url, timeout=10.0, follow_redirects=True) as client:
        form = client.get("/ui/login").text
        nonce = re.search(r'name="nonce" value="([^"]+)"', form)
        if nonce is None:
            raise DemoError("the dashboard login page has no form nonce")
        page = client.post(
            "/ui/login",
            data={
                "username": username,
                "password": password,
                "nonce": nonce.group(1),
                "next": "/ui/",
            },
        )
        if page.status_code != 200 or "Fleet overview" not in page.text:
            raise DemoError(f"dashboard login failed (HTTP {page.status_code})")
        text = re.sub(r"<[^>]+>", " ", page.text)
        start = text.find("Alerts")
        return " ".join(html.unescape(text[start : start + 3000]).split())


def _versions(service: Any) -> dict[str, str]:
    return {d["device_id"]: d.get("version") or "-" for d in service.list_devices()}


def _rollout_done(service: Any, rid: str, states: tuple[str, ...]) -> bool:
    return service.rollout_status(rid)["state"] in states


def run_demo(
    options: DemoOptions, progress: Progress, *, keep: Callable[[DemoResult], None] | None = None
) -> DemoResult:
    """Run every step; ``keep`` (if given) is called with the result before shutdown."""
    t_start = time.monotonic()
    durations: dict[str, float] = {}
    own_dir = options.workdir is None
    work = Path(options.workdir or tempfile.mkdtemp(prefix="edgefleet-demo-"))
    work.mkdir(parents=True, exist_ok=True)

    def lap(name: str, since: float) -> float:
        durations[name] = round(time.monotonic() - since, 1)
        return time.monotonic()

    t = time.monotonic()
    progress(
        "train",
        "training v1 (scaled logistic regression) and v2 (random forest) on breast-cancer data",
    )
    trained = _train(work, options.seed)
    progress("train", f"held-out accuracy: v1 {trained['acc_v1']:.3f}, v2 {trained['acc_v2']:.3f}")
    t = lap("train", t)
    v1, v2, release_pub, fleet_key = _build_bundles(work, progress)
    fleet_pub = fleet_key.with_suffix(".pub")
    t = lap("build", t)
    progress("fleet", "starting the fleet server")
    from agent.daemon import Agent
    from fleet_server.embedded_broker import EmbeddedBroker
    from fleet_server.serve import FleetServer
    from fleet_server.service import RolloutRequest

    broker = None
    broker_url = options.broker_url
    # On someone's own broker the demo gets a topic tree of its own, so it never sees (or
    # rolls out to) real devices, nor retained state left there by earlier runs.
    prefix = "edgefleet" if broker_url is None else f"edgefleet-demo-{secrets.token_hex(4)}"
    if broker_url is None:
        broker = EmbeddedBroker().start()
        broker_url = broker.url
        progress("fleet", f"embedded MQTT broker (amqtt) on {broker_url}")
    else:
        progress("fleet", f"using the external broker at {broker_url}, topics under {prefix}/")
    api_port = options.api_port or _free_port()
    enrol_token = "efe_" + secrets.token_urlsafe(24)
    _enrol_token_file(work, enrol_token)
    config = _fleet_config(work, broker_url, api_port, release_pub, fleet_key, prefix, enrol_token)
    server = FleetServer(config).start()
    service = server.service
    assert service is not None
    password = secrets.token_urlsafe(9)
    service.add_user("admin", password, "admin", actor="demo")
    # Its URL is shown only with --keep-running: the server stops when the demo ends.
    progress("fleet", "fleet server up: REST API, dashboard, MQTT bridge, rollout and drift")
    for bundle in (v1, v2):
        info = service.upload_bundle(bundle.read_bytes(), actor="demo")
        progress(
            "fleet", f"registered {info['name']} {info['version']} (release {info['release']})"
        )

    agents: dict[str, Any] = {}
    traffic: _Traffic | None = None
    try:
        trusted = (release_pub, fleet_pub)
        for i in range(options.devices):
            cfg = _agent_config(work, i, broker_url, trusted, prefix)
            agents[cfg.device_id] = Agent(cfg).start()
        progress(
            "agents",
            f"started {len(agents)} agents ({', '.join(PROFILES)}), each with its own API port",
        )
        progress(
            "agents",
            "each agent signs its messages with its own key and enrols by proving this run's "
            "enrolment token (no operator approval needed)",
        )
        _wait(
            "every agent to come online",
            lambda: sum(1 for d in service.list_devices() if d["online"]) >= len(agents),
            options.timeout_s,
        )
        t = lap("start", t)

        # 5: v1 in stages, with traffic
        traffic = _Traffic(agents, trained["X_live"], trained["std"], options.seed)
        traffic.start()
        r1 = service.create_rollout(
            RolloutRequest(bundle=f"{MODEL_NAME}@1.0.0", stages=[10, 50, 100], soak_s=1.0),
            actor="demo",
        )
        rid1 = r1["rollout_id"]
        service.start_rollout(rid1, actor="demo")
        progress("rollout", f"v1 rollout {rid1}: stages 10% → 50% → 100%")
        _wait_stages(service, rid1, progress, ("succeeded",), options.timeout_s)
        _wait(
            "every agent to serve v1",
            lambda: all(v == "1.0.0" for v in _versions(service).values()),
            options.timeout_s,
        )
        progress("rollout", f"v1 on all {len(agents)} devices")
        t = lap("rollout_v1", t)

        # 6: v2 with failing canaries
        # Plan the rollout first (created, not started): stage assignment hashes the device id
        # with the rollout id, so this rollout's own stage 1 are the canaries.
        req = RolloutRequest(bundle=f"{MODEL_NAME}@2.0.0", stages=[25, 50, 100], soak_s=2.0)
        r2 = service.create_rollout(req, actor="demo")
        rid2 = r2["rollout_id"]
        canaries = list(r2["stages"][0]["device_ids"])
        n_fail = max(1, round(len(canaries) * options.failing_share))
        failing = sorted(canaries)[:n_fail]
        traffic.pause()
        for device_id in failing:
            agents[device_id].stop()
            idx = int(device_id.split("-")[1])
            cfg = _agent_config(work, idx, broker_url, trusted, prefix, failing=True)
            cfg = cfg.model_copy(update={"api": agents[device_id].config.api})
            agents[device_id] = Agent(cfg).start()
        traffic.agents = agents
        traffic.resume()
        progress(
            "rollout",
            f"v2 canaries: {', '.join(canaries)}; {', '.join(failing)} will fail the smoke test",
        )
        _wait(
            "restarted canaries to come back online",
            lambda: all(d["online"] for d in service.list_devices() if d["device_id"] in failing),
            options.timeout_s,
        )
        service.start_rollout(rid2, actor="demo")
        _wait_stages(
            service,
            rid2,
            progress,
            ("halted", "rolled_back", "aborted", "succeeded"),
            options.timeout_s,
        )
        status2 = service.rollout_status(rid2)
        halted = status2["state"] in ("halted", "rolled_back")
        progress("rollout", f"v2 rollout {rid2} {status2['state']}: {status2.get('reason') or ''}")
        _wait(
            "the canaries to return to v1",
            lambda: all(v == "1.0.0" for v in _versions(service).values()),
            options.timeout_s,
        )
        stage1_only = all(d["state"] == "queued" or d["stage"] == 0 for d in status2["devices"])
        progress("rollout", "every device is back on v1; no device outside stage 1 received v2")
        t = lap("rollout_v2", t)

        # 7: drift
        shifted = sorted(agents)[: options.drift_devices]
        traffic.shifted = set(shifted)
        progress("drift", f"shifting inputs by +2.5σ on {len(shifted)} devices")
        drift_result: dict[str, Any] | None = None

        def drifted() -> bool:
            nonlocal drift_result
            res = service.evaluate_drift(MODEL_NAME, "1.0.0")
            if res and res.get("dataset_drift"):
                drift_result = res
                return True
            return False

        _wait("the drift alert", drifted, options.timeout_s, every=2.0)
        alerts = [e for e in service.events(limit=500) if e["kind"] == "alert"]
        panel = dashboard_alerts(server.url, "admin", password)
        drift_alerts = [a for a in alerts if (a.get("data") or {}).get("alert_kind") == "drift"]
        shown = any(a["message"][:40] in panel for a in drift_alerts)
        progress(
            "drift",
            f"drift alert fired: {drift_result.get('drifted_share', 0):.0%} of features drifted"
            if drift_result
            else "drift alert fired",
        )
        t = lap("drift", t)
        traffic.stop()

        rows = []
        device_rows = {d["device_id"]: d for d in service.list_devices()}
        for device_id in sorted(agents):
            lat = traffic.latency[device_id]
            rows.append(
                DeviceRow(
                    device_id=device_id,
                    profile=device_rows[device_id]["profile"],
                    version=device_rows[device_id].get("version") or "-",
                    requests=len(lat),
                    not_ready=traffic.not_ready[device_id],
                    errors=traffic.errors[device_id],
                    p50_ms=float(np.percentile(lat, 50)) if lat else None,
                    p95_ms=float(np.percentile(lat, 95)) if lat else None,
                    shifted=device_id in shifted,
                    failing_canary=device_id in failing,
                )
            )
        decisions = [
            f"{a['action']}: {a['reason']}"
            for rid in (rid1, rid2)
            for a in reversed(service.rollout_status(rid).get("decisions", []))
            if a["action"].startswith(("rollout.", "stage.", "gate."))
        ]
        durations["total"] = round(time.monotonic() - t_start, 1)
        result = DemoResult(
            workdir=work,
            dashboard_url=f"{server.url}/ui/",
            username="admin",
            password=password,
            devices=rows,
            rollouts=[service.rollout_status(rid1), status2],
            decisions=decisions,
            drift=drift_result,
            alerts=alerts,
            v2_halted=halted,
            canaries=canaries,
            failing=failing,
            stage1_only=stage1_only,
            dashboard_shows_drift=shown,
            error_samples=traffic.error_samples[:20],
            durations=durations,
        )
        if keep is not None:
            keep(result)
        return result
    finally:
        if traffic is not None:
            traffic.stop()
        for agent in agents.values():
            agent.stop()
        server.stop()
        if broker is not None:
            broker.stop()
        if own_dir:
            shutil.rmtree(work, ignore_errors=True)


def _wait_stages(
    service: Any, rid: str, progress: Progress, final: tuple[str, ...], timeout: float
) -> None:
    seen: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = service.rollout_status(rid)
        for s in st["stages"]:
            if seen.get(s["index"]) != s["state"]:
                seen[s["index"]] = s["state"]
                progress(
                    "rollout",
                    f"  stage {s['index'] + 1} ({s['target']:g}%): {s['state']} — "
                    f"{s['installed']}/{s['devices']} installed, {s['failed']} failed",
                )
        if st["state"] in final:
            return
        time.sleep(0.2)
    raise DemoError(f"rollout {rid} did not finish in {timeout:.0f} s")
