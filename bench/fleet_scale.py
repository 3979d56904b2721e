"""Fleet server at scale: N simulated devices on Mosquitto, a 4-stage rollout, telemetry ingest.

The fleet server (``FleetService`` + paho) runs in its own process so its CPU time and
memory are measured alone. It is built there rather than started as ``edgefleet fleet
serve`` because this bench reads the rollout engine's state as it moves (stage timings,
per-operation trust costs on that rollout's own payloads) and, for the unsigned variant,
monkeypatches the signer inside that process; the same service object is what ``fleet
serve`` runs, and ``--lists`` and ``--cluster`` drive the shipped command itself.

The devices are lightweight simulated agents in this process,
many per MQTT connection (``DEVICES_PER_CLIENT``), speaking the real protocol: retained
birth state, deploy command MAC'd or signed and checked, bundle chunks reassembled and
checked against their sha256, status reports ``downloading → verifying → installed``.

Measured for N = 100, 300, 1000:

* rollout time: start of a 4-stage rollout (5/25/50/100 %, zero soak) to 100 % installed,
* telemetry ingest: sketch reports merged per second by the drift engine,
* server CPU seconds and peak RSS,
* artifact publishes: the chunk messages the server's transport published during the
  rollout, per artifact (chunks go once, retained, on ``{p}/artifacts/{sha256}/{i}``; each
  simulated connection subscribes there while its devices download), against the
  bundle's chunk count (one copy),
* the cost of trust, two ways in the same run:

  - **measured**: every size is rolled out ``REPEATS`` times as shipped and as many times
    with signing and checking taken out (``unsigned``), in alternating order, each on a
    fresh broker and server; the share is ``1 − median(unsigned) / median(signed)``
    rollout time; and, less noisy on a shared machine, the CPU the server process and the
    simulated devices (this process) spent with minus without signing, over the signed
    rollout time.
    How the unsigned variant is made, in the bench only: in the server process
    ``CommandSigner.sign`` is replaced by a function that only stamps ``issued_at`` /
    ``expires_at``, and ``verify_envelope`` / ``verify_mac`` in ``fleet_server.device_trust``
    by functions that accept any well-formed ``dsig`` (the bridge still parses every
    envelope, enrols by token proof, keeps replay windows and rate limits); the simulated
    devices append a well-formed but dummy ``dsig`` and do not verify commands. Nothing in
    the product can switch checks off: this is monkeypatching inside the bench's own
    processes. Every rollout time is printed, so the run-to-run noise that the difference
    carries shows next to the estimate;
  - **per operation**: each sign/verify/MAC is timed in the server process right after
    the signed rollout, on that rollout's real command and status payloads, and multiplied
    by what the rollout exchanged: commands MAC'd or Ed25519-signed (the deploy payload's
    sha256 computed once per bundle, then a short envelope per device), device messages
    checked by scheme (MAC'd once the fleet key is agreed), and the per-device key
    agreements the server made during the rollout (once per device key, made when a
    device's birth names the fleet key, so at registration here; shown apart).
    CPU time of the measuring thread (``time.thread_time``), so a loaded machine does not
    inflate it; the sum covers both sides (devices sign and verify in parallel in a real
    fleet), so it overstates the wall-clock share. The registration births (Ed25519: they
    carry the keys and the enrolment proof) come before the rollout starts and are shown
    apart, with the share they would add.

Each simulated device has its own Ed25519 and X25519 keys and enrols by proving the bench's
enrolment token (its hash is in the server's config), as a real agent with
``[enrol] token_file`` does; once the fleet's signed key arrives it MACs its statuses and
later births, names the fleet key in its births (so the server MACs its commands), and
verifies each command as the agent does (``verify_command`` with the agreed key). Unlike
the agent, a simulated device sends no new birth after an install: each state costs the
server about 2.4 ms of CPU in registry work that has nothing to do with signing (measured
here: with those 1,000 births the rollout took 6.5 s instead of 2.3 s, unsigned 6.2 s
instead of 1.9 s), which would bury the figure this bench is for; the agent MACs those
births (6 µs to check), so they would add ≈ 9 µs each to the signing cost.

Anchors in the same run: the time for the same devices to merely *answer* one round of
commands (a broadcast ping → status), i.e. the broker + client floor, so the rollout
time is reported as a multiple of four such rounds (one per stage).

    python -m bench.fleet_scale [--quick] [--lists | --cluster]

``--lists`` runs only the list timing (``bench/list_timing.py``: ``GET /v1/devices?limit=100``
and ``GET /v1/overview`` at 1,000 and 100,000 devices on SQLite and PostgreSQL), which the
default run also does after the rollouts, its rows joining this script's headline.

``--quick``: 100 and 300 devices, 3 rollouts per variant; the full run adds 1,000 devices
and rolls out 5 times per variant.

``--cluster`` runs only the scale-out run (``bench/cluster_scale.py``: 2 ``fleet serve``
processes, a 3-node NATS cluster and PostgreSQL, against this script's 1,000-device run).
"""

from __future__ import annotations

import hashlib
import importlib
import itertools
import multiprocessing as mp
import statistics
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench._common import run_cli, table, write_result

DEVICES_PER_CLIENT = 50
STALL_S = 10.0  # the agent's default stall_seconds: a download this still asks again
PREFIX = "bench"
TARGET_S = 60.0
TRUST_TARGET = 0.10
REPEATS = 5  # rollouts per size and variant (signed, unsigned); medians are compared
ENROL_TOKEN = "efe_bench-enrolment-token"


def _trust_costs(svc: Any, rid: str, counts: dict[str, int]) -> dict[str, Any]:
    """Per-operation sign/verify times on this rollout's payloads, times their counts."""
    from fleet_server.delivery import command_id, deploy_command, deploy_payload
    from protocol import KeyPair, TrustStore
    from protocol.device_auth import (
        mac_payload,
        open_envelope,
        sign_payload,
        verify_envelope,
        verify_mac,
    )
    from protocol.device_mac import AgreedKey
    from protocol.messages import CommandStatus, mac_command, sign_command, verify_command
    from protocol.topics import Topics

    r = svc.rollouts.live[rid]
    dev = next(iter(r.devices))
    bundle, data = svc.registry.loaded_bundle(r.spec.bundle_sha256)
    cid = command_id(rid, dev, "deploy", 1)
    cmd = deploy_command(
        bundle, data, device_id=dev, rollout_id=rid, cid=cid, chunk_size=65536, key=None
    )
    _, digest = deploy_payload(bundle, data, chunk_size=65536)
    key, trust = svc.key, TrustStore.from_keys([svc.key.public])
    k, fid = bytes(range(32)), "f" * 16
    agreed = {fid: AgreedKey(k, key.key_id)}
    device_key = KeyPair.generate()
    topic = Topics(PREFIX).status(dev)
    status = CommandStatus(device_id=dev, command_id=cid, state="installed").to_json()
    n = 2000

    def timed(fn: Any, runs: int = n) -> float:
        # CPU time of this thread: what an operation costs, not how long the (shared,
        # loaded) machine took to schedule it
        t0 = time.thread_time()
        for _ in range(runs):
            fn()
        return (time.thread_time() - t0) / runs

    # the server: the payload's sha256 once per bundle, then the envelope per device
    payload_digest = timed(lambda: _uncached_digest(cmd), 200)
    cmd_sign = timed(lambda: sign_command(cmd, key, payload_sha256=digest))
    cmd_mac = timed(lambda: mac_command(cmd, k, fid, payload_sha256=digest))
    # the device: hashes the payload it got, then checks the short envelope
    signed_cmd = sign_command(cmd, key)
    maced_cmd = mac_command(cmd, k, fid)
    cmd_verify = timed(lambda: verify_command(signed_cmd, trust))
    cmd_mac_verify = timed(lambda: verify_command(maced_cmd, trust, agreed))
    signed = sign_payload(status, topic, device_key, 1, 7)
    msg_sign = timed(lambda: sign_payload(status, topic, device_key, 1, 7))

    def check() -> None:
        env = open_envelope(signed)
        assert env is not None and verify_envelope(env, topic, device_key.public)

    msg_verify = timed(check)
    maced = mac_payload(status, topic, k, fid, 1, 7)
    mac_sign = timed(lambda: mac_payload(status, topic, k, fid, 1, 7))

    def check_mac() -> None:
        env = open_envelope(maced)
        assert env is not None and verify_mac(env, topic, k)

    mac_verify = timed(check_mac)
    agreement = timed(lambda: _agree_once(svc, dev), 200)

    c_mac, c_sig = counts["commands_mac"], counts["commands_ed25519"]
    m_mac, m_sig = counts["messages_mac"], counts["messages_ed25519"]
    agreements = counts["agreements"]
    server = (
        payload_digest
        + c_mac * cmd_mac
        + c_sig * cmd_sign
        + m_mac * mac_verify
        + m_sig * msg_verify
        + agreements * agreement
    )
    devices = c_mac * cmd_mac_verify + c_sig * cmd_verify + m_mac * mac_sign + m_sig * msg_sign
    births = counts["registration_births"] * (msg_sign + msg_verify)
    return {
        **counts,
        "payload_digest_us": payload_digest * 1e6,
        "command_sign_us": cmd_sign * 1e6,
        "command_verify_us": cmd_verify * 1e6,
        "command_mac_us": cmd_mac * 1e6,
        "command_mac_verify_us": cmd_mac_verify * 1e6,
        "message_sign_us": msg_sign * 1e6,
        "message_verify_us": msg_verify * 1e6,
        "mac_sign_us": mac_sign * 1e6,
        "mac_verify_us": mac_verify * 1e6,
        "agreement_us": agreement * 1e6,
        "server_s": server,
        "total_s": server + devices,
        "registration_births_s": births,
    }


def _uncached_digest(cmd: Any) -> str:
    from protocol.messages import command_payload_sha256

    return command_payload_sha256(cmd)


def _agree_once(svc: Any, device_id: str) -> None:
    """One X25519 agreement + HKDF as the server makes it once per device key."""
    ident = svc.devices.approved(device_id)
    ident.mac_key = None
    svc.devices.command_key(device_id)


def _unsigned_server() -> None:
    """The bench-only variant without signing or checking (see the module docstring)."""
    import fleet_server.command_signing as cs
    import fleet_server.device_trust as dt
    from protocol.messages import _stamped

    def stamp_only(self: Any, cmd: Any, *, now: Any, ttl_s: float, **_: Any) -> Any:
        return _stamped(cmd, now, ttl_s)

    cs.CommandSigner.sign = stamp_only  # type: ignore[method-assign]
    dt.verify_envelope = lambda env, topic, public: env.scheme == "ed25519"  # type: ignore[assignment]
    dt.verify_mac = lambda env, topic, key: env.scheme == "mac"  # type: ignore[assignment]


# --- the server process ------------------------------------------------------------------
def _server(
    conn: Any,
    url: str,
    tmp: str,
    priv: bytes,
    pub: bytes,
    bundle: bytes,
    n: int,
    sketches: int,
    unsigned: bool = False,
) -> None:
    import psutil

    if unsigned:
        _unsigned_server()

    from fleet_server.config import FleetConfig
    from fleet_server.service import FleetService, RolloutRequest
    from protocol.device_auth import token_hash
    from protocol.transport_paho import PahoTransport

    d = Path(tmp)
    (d / "k.pem").write_bytes(priv)
    (d / "k.pub").write_bytes(pub)
    cfg = FleetConfig.model_validate(
        {
            "data_dir": str(d / "fleet"),
            "broker": {"url": url, "topic_prefix": PREFIX},
            # priv: the fleet's command key; pub: the (different) key bundles are signed by
            "signing": {"command_key": str(d / "k.pem"), "bundle_keys": [str(d / "k.pub")]},
            "rollout": {"tick_s": 0.05},
            "devices": {"enrol_token_hashes": [token_hash(ENROL_TOKEN)]},
        }
    )
    proc = psutil.Process()
    transport = PahoTransport(url, "bench-server", clean_session=True)
    published: dict[str, int] = {}  # what the server's transport published, by topic head
    inner_publish = transport.publish

    def counting_publish(topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> Any:
        parts = topic.split("/")
        if payload and len(parts) == 4 and parts[1] == "artifacts":  # {p}/artifacts/{sha}/{i}
            published[parts[2]] = published.get(parts[2], 0) + 1
        elif payload and "/artifact/" in topic:  # per-device chunks (older servers)
            published["per-device"] = published.get("per-device", 0) + 1
        return inner_publish(topic, payload, qos, retain)

    transport.publish = counting_publish  # type: ignore[method-assign]
    svc = FleetService(cfg, transport=transport)
    svc.start()
    conn.send(("ready", None))

    def cpu() -> float:
        t = proc.cpu_times()
        return float(t.user + t.system)

    def rss() -> float:
        return float(proc.memory_info().rss / 2**20)

    t0, c0 = time.monotonic(), cpu()
    while len(svc.registry.online()) < n:
        time.sleep(0.01)
    conn.send(
        ("registered", {"seconds": time.monotonic() - t0, "cpu_s": cpu() - c0, "rss_mb": rss()})
    )

    svc.upload_bundle(bundle)
    rid = svc.create_rollout(
        RolloutRequest(
            bundle="bench@2.0.0",
            stages=[5, 25, 50, 100],
            soak_s=0,
            success_threshold=1.0,
            device_timeout_s=120,
            min_devices=1,
        )
    )["rollout_id"]
    c0, peak = cpu(), rss()

    def counters() -> dict[str, int]:
        signer = svc.command_signer
        return {
            "commands_mac": signer.macs,
            "commands_ed25519": signer.signatures,
            "messages_mac": svc.devices.verified["mac"],
            "messages_ed25519": svc.devices.verified["ed25519"],
            "agreements": svc.devices.agreements,
        }

    births = svc.bridge.stats()["accepted"].get("state", 0) if svc.bridge else 0
    before = counters()
    t0 = time.monotonic()
    svc.start_rollout(rid)
    stage_done: list[float] = []
    polls = 0
    while True:
        polls += 1
        r = svc.rollouts.live[rid]
        done = [s for s in r.stages if s.state == "passed"]
        while len(stage_done) < len(done):
            stage_done.append(time.monotonic() - t0)
        if r.state in ("succeeded", "halted", "aborted"):
            break
        if time.monotonic() - t0 > 600:
            break
        if polls % 20 == 0:  # RSS every 0.1 s: reading it costs CPU that lands in the figure
            peak = max(peak, rss())
        time.sleep(0.005)
    seconds = time.monotonic() - t0
    cpu_s, peak = cpu() - c0, max(peak, rss())
    after = counters()
    counts = {k: after[k] - before[k] for k in after}
    counts["registration_births"] = births
    counts["registration_agreements"] = before["agreements"]
    trust = None
    if not unsigned:
        trust = _trust_costs(svc, rid, counts)
        trust["share_of_rollout"] = trust["total_s"] / seconds
        trust["server_share_of_rollout"] = trust["server_s"] / seconds
        trust["registration_births_share"] = trust["registration_births_s"] / seconds
    conn.send(
        (
            "rollout",
            {
                "seconds": seconds,
                "state": r.state,
                "counts": r.counts(),
                "stage_done_s": stage_done,
                "cpu_s": cpu_s,
                "rss_mb": peak,
                "trust": trust,
                "artifact_publishes": dict(published),
                "bundle_chunks": _chunks_of(bundle, cfg),
            },
        )
    )

    # telemetry ingest
    base = svc.sketches_merged
    c0 = cpu()
    conn.send(("ingest_ready", None))
    first = None
    deadline = time.monotonic() + 300
    while svc.sketches_merged - base < sketches and time.monotonic() < deadline:
        if first is None and svc.sketches_merged > base:
            first = time.monotonic()
        time.sleep(0.002)
    end = time.monotonic()
    merged = svc.sketches_merged - base
    dropped = svc.bridge.stats()["dropped"] if svc.bridge else {}
    conn.send(
        (
            "ingest",
            {
                "merged": merged,
                "seconds": end - (first or end),
                "cpu_s": cpu() - c0,
                "rss_mb": rss(),
                "dropped": dropped,
            },
        )
    )
    svc.stop()
    svc.repo.close()


def _chunks_of(bundle: bytes, cfg: Any) -> int:
    from fleet_server.delivery import chunk_size_for, n_chunks

    return n_chunks(len(bundle), chunk_size_for(len(bundle), cfg.rollout.chunk_bytes))


# --- the simulated devices ---------------------------------------------------------------
class DummySigner:
    """The unsigned variant's device side: a well-formed ``dsig`` with no signature in it."""

    def __init__(self, device_id: str, key: Any) -> None:
        self.device_id = device_id
        self.key = key
        self.key_id = key.key_id
        self.mac: tuple[bytes, str] | None = None
        self._seq = 0

    def public_key_b64(self) -> str:
        from protocol.device_auth import public_key_b64

        return public_key_b64(self.key.public)

    def use_mac(self, key: bytes, fleet_kex_id: str) -> None:
        """Never used: the unsigned variant keeps Ed25519-shaped envelopes throughout."""

    def sign(self, topic: str, payload: bytes, seq: int | None = None, **_: Any) -> bytes:
        if seq is None:
            self._seq += 1
            seq = self._seq
        body = payload.rstrip()[:-1]
        return body + f',"dsig":"1.{seq}.{self.key_id}.{"A" * 86}=="}}'.encode()


class SimClient:
    """One MQTT connection carrying many simulated devices."""

    def __init__(
        self, url: str, name: str, device_ids: list[str], trust: Any, unsigned: bool = False
    ) -> None:
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        from protocol import KeyPair
        from protocol.device_auth import DeviceSigner
        from protocol.topics import Topics
        from protocol.transport_paho import PahoTransport

        self.t = PahoTransport(url, name, clean_session=True)
        self.topics = Topics(PREFIX)
        self.ids = device_ids
        self.unsigned = unsigned
        # every simulated device has its own key and signs what it publishes; like the
        # agent it MACs non-state messages and later births once the fleet's signed X25519
        # key arrives, and verifies commands with the command keys or the agreed key
        self.signers: dict[str, Any] = {
            d: (DummySigner if unsigned else DeviceSigner)(  # type: ignore[operator]
                d, KeyPair.generate(), **({} if unsigned else {"boot": 1})
            )
            for d in device_ids
        }
        self.kex = {d: X25519PrivateKey.generate() for d in device_ids}
        self.agreed: dict[str, dict[str, Any]] = {d: {} for d in device_ids}
        self.fleet_kex: str | None = None
        self.trust = trust
        self.chunks: dict[str, dict[int, bytes]] = {}  # artifact sha256 → index → bytes
        self.pending: dict[str, Any] = {}
        self.installed: set[str] = set()
        self.pings = 0
        self.asked_again = 0  # stalled downloads that asked for their missing chunks
        self._seq = 0
        self._lock = threading.Lock()
        self._since: dict[str, float] = {}  # device → when its download last moved
        self._closed = threading.Event()

    def start(self) -> None:
        self.t.set_handler(self.handle)
        for d in self.ids:
            self.t.subscribe(self.topics.cmd(d), 0)  # as the agent (agent/link.py)
        self.t.subscribe(self.topics.kex(), 0)
        self.t.connect()
        threading.Thread(target=self._watch_stalls, daemon=True).start()

    def _watch_stalls(self) -> None:
        """As the agent (``agent.commands``, ``stall_seconds``): a download that has not
        moved for :data:`STALL_S` reports the chunks it misses, and the server publishes
        them again. (A retained chunk can miss a subscriber: on NATS the command can reach
        a device's node before the artifact's retained copy does.)"""
        while not self._closed.wait(1.0):
            now = time.monotonic()
            with self._lock:
                for d, cmd in list(self.pending.items()):
                    if cmd.deploy is None or now - self._since.get(d, now) < STALL_S:
                        continue
                    got = self.chunks.get(cmd.deploy.bundle_sha256, {})
                    missing = [i for i in range(cmd.deploy.n_chunks) if i not in got]
                    if missing:
                        self._since[d] = now
                        self.asked_again += 1
                        self.status(d, cmd.command_id, "downloading", result={"missing": missing})

    def on_kex(self, payload: bytes) -> None:
        """The fleet's announcement, verified with the command trust store, as the agent does."""
        from protocol.device_mac import (
            AgreedKey,
            kex_id,
            mac_key,
            open_announcement,
            raw_public,
        )

        if self.unsigned:
            self.fleet_kex = "-"  # registration may go on; nothing is agreed
            return
        got = open_announcement(payload, self.trust, datetime.now(timezone.utc))
        if isinstance(got, str):
            return
        ann, peer = got
        assert ann.signature is not None
        fid = kex_id(peer)
        for d in self.ids:
            own = raw_public(self.kex[d].public_key())
            k = mac_key(self.kex[d], peer, d, own, raw_public(peer))
            self.signers[d].use_mac(k, fid)
            self.agreed[d] = {fid: AgreedKey(k, ann.signature.key_id)}
        self.fleet_kex = fid

    def publish(self, device_id: str, topic: str, payload: bytes, **kw: Any) -> None:
        self.t.publish(topic, self.signers[device_id].sign(topic, payload, **kw), qos=1)

    def birth(self) -> None:
        """The first birth of each device: Ed25519, with its keys and enrolment proof."""
        from protocol.device_auth import enrol_proof, token_hash
        from protocol.device_mac import x25519_b64
        from protocol.messages import DeviceState, ModelRef

        old = ModelRef(name="bench", version="1.0.0", release=1)
        kex = None if self.unsigned else self.fleet_kex
        for d in self.ids:
            s = self.signers[d]
            msg = DeviceState(
                device_id=d,
                online=True,
                profile="host",
                model=old,
                agent_version="sim",
                public_key=s.public_key_b64(),
                enrol_proof=enrol_proof(token_hash(ENROL_TOKEN), d, s.key_id),
                x25519_key=x25519_b64(self.kex[d].public_key()),
                fleet_kex=kex,
            )
            topic = self.topics.state(d)
            self.t.publish(topic, s.sign(topic, msg.to_json(), seq=1), qos=1, retain=True)

    def offline(self) -> None:
        from protocol.messages import DeviceState

        for d in self.ids:
            topic = self.topics.state(d)
            dead = DeviceState(device_id=d, online=False).to_json()
            payload = self.signers[d].sign(topic, dead, seq=(1 << 20) - 1)
            self.t.publish(topic, payload, qos=1, retain=True)

    def status(self, device_id: str, cid: str, state: str, **kw: Any) -> None:
        from protocol.messages import CommandStatus

        self._seq += 1
        msg = CommandStatus(device_id=device_id, command_id=cid, state=state, seq=self._seq, **kw)
        self.publish(device_id, self.topics.status(device_id), msg.to_json())

    def handle(self, topic: str, payload: bytes) -> None:
        from protocol.messages import ArtifactChunk, Command, decode, verify_command

        if topic == self.topics.kex():
            if payload:
                self.on_kex(payload)
            return
        shared = self.topics.parse_artifact_chunk(topic)
        if shared is not None:  # the artifact's chunk topic, shared by every device
            if not payload:
                return
            c = decode(ArtifactChunk, payload)
            piece = c.payload()
            with self._lock:
                if hashlib.sha256(piece).hexdigest() == c.chunk_sha256:
                    self.chunks.setdefault(shared[0], {})[c.index] = piece
                for d in [d for d, cmd in self.pending.items() if cmd.deploy]:
                    self._try(d)
            return
        p = self.topics.parse(topic)
        if p is None:
            return
        with self._lock:
            if p.kind == "cmd":
                cmd = decode(Command, payload)
                if cmd.kind == "config":  # the anchor's ping
                    self.pings += 1
                    self.status(p.device_id, cmd.command_id, "done")
                    return
                if not self.unsigned:
                    verify_command(cmd, self.trust, self.agreed[p.device_id])
                self.pending[p.device_id] = cmd
                self._since[p.device_id] = time.monotonic()
                self.status(p.device_id, cmd.command_id, "downloading")
                if cmd.deploy is not None:  # once per connection, as long as it downloads
                    self.t.subscribe(self.topics.artifact_chunks(cmd.deploy.bundle_sha256), 0)
                self._try(p.device_id)

    def _try(self, device_id: str) -> None:
        cmd = self.pending.get(device_id)
        if cmd is None or cmd.deploy is None:
            return
        got = self.chunks.get(cmd.deploy.bundle_sha256, {})
        if len(got) < cmd.deploy.n_chunks:
            return
        data = b"".join(got[i] for i in range(cmd.deploy.n_chunks))
        del self.pending[device_id]
        self.status(device_id, cmd.command_id, "verifying")
        if hashlib.sha256(data).hexdigest() != cmd.deploy.bundle_sha256:
            self.status(device_id, cmd.command_id, "failed", reason="hash_mismatch")
            return
        self.installed.add(device_id)
        self.status(device_id, cmd.command_id, "installed")

    def send_sketches(self, report: Any, count: int) -> None:
        for i in range(count):
            d = self.ids[i % len(self.ids)]
            msg = report.model_copy(update={"device_id": d, "seq": i})
            self.publish(d, self.topics.sketch(d), msg.to_json())

    def close(self) -> None:
        self._closed.set()
        self.t.close()


def _ping_round(clients: list[SimClient], key: Any, server_t: Any) -> float:
    """Anchor: one command to every device and every status back, through the same broker."""
    from protocol.messages import Command, CommandStatus, decode
    from protocol.topics import Topics

    topics = Topics(PREFIX)
    ids = [d for c in clients for d in c.ids]
    got: set[str] = set()
    done = threading.Event()

    def on_status(topic: str, payload: bytes) -> None:
        s = decode(CommandStatus, payload)
        if s.command_id.startswith("ping"):
            got.add(s.device_id)
            if len(got) == len(ids):
                done.set()

    server_t.set_handler(on_status)
    server_t.subscribe(topics.all_status(), 1)
    time.sleep(0.3)
    t0 = time.monotonic()
    for d in ids:
        server_t.publish(
            topics.cmd(d),
            Command(command_id=f"ping-{d}", device_id=d, kind="config").to_json(),
            qos=1,
        )
    done.wait(120)
    return time.monotonic() - t0


def _sketch_report() -> Any:
    from protocol import build_reference
    from protocol.messages import ModelRef, SketchReport
    from tests.support.bundles import trained

    tm = trained("iris-logreg")
    sk = build_reference(tm.X[:50], tm.input_schema)
    now = datetime.now(timezone.utc)
    return SketchReport(
        device_id="x",
        model=ModelRef(name="bench", version="2.0.0", release=2),
        window_start=now,
        window_end=now,
        seq=0,
        sketches=sk,
    )


def run_once(
    n: int, sketches: int, bundle: bytes, key: Any, unsigned: bool = False
) -> dict[str, Any]:
    import psutil

    from protocol import KeyPair, TrustStore
    from protocol.transport_paho import PahoTransport
    from tests.support.brokers import Mosquitto

    conf = (
        "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        "max_queued_messages 1000000\nmax_inflight_messages 0\n"
    )
    command_key = KeyPair.generate()  # the fleet's online key: a role apart from ``key``
    trust = TrustStore.from_keys([command_key.public])
    with Mosquitto(config=conf) as broker, tempfile.TemporaryDirectory() as tmp:
        ids = [f"dev-{i:05d}" for i in range(n)]
        clients = [
            SimClient(broker.url, f"sim-{j}", ids[j : j + DEVICES_PER_CLIENT], trust, unsigned)
            for j in range(0, n, DEVICES_PER_CLIENT)
        ]
        for c in clients:
            c.start()
        anchor_t = PahoTransport(broker.url, "anchor", clean_session=True)
        anchor_t.connect()
        ping_s = _ping_round(clients, key, anchor_t)
        anchor_t.close()

        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        # by module path, so it pickles the same when this file runs as __main__
        target = importlib.import_module("bench.fleet_scale")._server
        per = -(-sketches // len(clients)) if not unsigned else 0  # same number per connection
        args = (
            child,
            broker.url,
            tmp,
            command_key.private_pem(),
            key.public_pem(),
            bundle,
            n,
            per * len(clients),
            unsigned,
        )
        proc = ctx.Process(target=target, args=args)
        proc.start()
        out: dict[str, Any] = {"n": n, "ping_round_s": ping_s, "unsigned": unsigned}
        try:
            if not (parent.poll(120) and parent.recv()[0] == "ready"):
                raise RuntimeError("the server process did not start")
            deadline = time.monotonic() + 60
            while any(c.fleet_kex is None for c in clients) and time.monotonic() < deadline:
                time.sleep(0.01)  # births name the fleet key once it is agreed, as the agent's
            for c in clients:
                c.birth()
            me = psutil.Process()
            for name in ("registered", "rollout"):
                if not parent.poll(900):
                    raise RuntimeError(f"server gave no {name} result")
                tag, data = parent.recv()
                out[tag] = data
                # the simulated devices' CPU (this process) from registration to the end
                # of the rollout: the bundle upload and rollout creation, then the rollout
                t = me.cpu_times()
                out[f"device_cpu_at_{tag}"] = float(t.user + t.system)
            out["device_cpu_s"] = out.pop("device_cpu_at_rollout") - out.pop(
                "device_cpu_at_registered"
            )
            if not (parent.poll(60) and parent.recv()[0] == "ingest_ready"):
                raise RuntimeError("the server process did not reach the ingest phase")
            report = _sketch_report()
            threads = [
                threading.Thread(target=c.send_sketches, args=(report, per)) for c in clients if per
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if parent.poll(600):
                out["ingest"] = parent.recv()[1]
            out["installed_seen_by_devices"] = sum(len(c.installed) for c in clients)
        finally:
            proc.join(60)
            if proc.is_alive():
                proc.terminate()
            for c in clients:
                c.offline()
                c.close()
    return out


def _bundle(key: Any) -> bytes:
    from tests.support.bundles import make_bundle

    return make_bundle(key, name="bench", version="2.0.0", release=2)[0]


def main(quick: bool = False) -> dict[str, Any]:
    from protocol import KeyPair

    key = KeyPair.generate()
    bundle = _bundle(key)
    sizes = (100, 300) if quick else (100, 300, 1000)
    sketches = 500 if quick else 2000
    repeats = 3 if quick else REPEATS
    runs, bare = [], []
    for n in sizes:
        # as shipped and without signing (bench-only, see the docstring), REPEATS pairs
        # with the order alternating, so neither variant always runs on the warmer machine
        signed_n: list[dict[str, Any]] = []
        bare_n: list[dict[str, Any]] = []
        for i in range(repeats):
            for unsigned in (False, True) if i % 2 == 0 else (True, False):
                got = run_once(n, sketches if not signed_n else 0, bundle, key, unsigned)
                (bare_n if unsigned else signed_n).append(got)
        signed_s = statistics.median(r["rollout"]["seconds"] for r in signed_n)
        unsigned_s = statistics.median(r["rollout"]["seconds"] for r in bare_n)
        r = signed_n[0]  # the one with the ingest phase; its trust costs are per-op
        r["measured"] = {
            "signed_rollouts_s": [x["rollout"]["seconds"] for x in signed_n],
            "unsigned_rollouts_s": [x["rollout"]["seconds"] for x in bare_n],
            "signed_rollout_s": signed_s,
            "unsigned_rollout_s": unsigned_s,
            "unsigned_states": [x["rollout"]["state"] for x in bare_n],
            "signed_cpu_s": statistics.median(x["rollout"]["cpu_s"] for x in signed_n),
            "unsigned_cpu_s": statistics.median(x["rollout"]["cpu_s"] for x in bare_n),
            "share_of_rollout": 1.0 - unsigned_s / signed_s,
        }
        m = r["measured"]
        m["server_cpu_share"] = (m["signed_cpu_s"] - m["unsigned_cpu_s"]) / signed_s
        m["signed_device_cpu_s"] = statistics.median(x["device_cpu_s"] for x in signed_n)
        m["unsigned_device_cpu_s"] = statistics.median(x["device_cpu_s"] for x in bare_n)
        m["cpu_share"] = (
            m["signed_cpu_s"]
            - m["unsigned_cpu_s"]
            + m["signed_device_cpu_s"]
            - m["unsigned_device_cpu_s"]
        ) / signed_s
        runs.append(r)
        bare.extend(bare_n)
        r["signed_repeats"] = signed_n[1:]
    rows = []
    for r in runs:
        ro, ing = r["rollout"], r.get("ingest", {})
        rate = ing.get("merged", 0) / ing["seconds"] if ing.get("seconds") else 0.0
        r["ingest_rate_per_s"] = rate
        rows.append(
            [
                r["n"],
                ro["state"],
                ro["seconds"],
                ro["seconds"] / max(4 * r["ping_round_s"], 1e-9),
                r["ping_round_s"],
                ro["cpu_s"],
                ro["cpu_s"] / r["n"] * 1000,
                ro["rss_mb"],
                rate,
                ing.get("cpu_s", 0.0),
            ]
        )
    print(
        table(
            "fleet_scale: 4-stage rollout (5/25/50/100 %, no soak) on Mosquitto, "
            f"{DEVICES_PER_CLIENT} simulated devices per MQTT connection",
            [
                "devices",
                "state",
                "rollout s",
                "× 4 ping rounds",
                "ping round s",
                "server CPU s",
                "CPU ms/device",
                "server RSS MB",
                "sketches merged/s",
                "ingest CPU s",
            ],
            rows,
        )
    )
    big = runs[-1]
    growth = []
    for a, b in itertools.pairwise(runs):
        k = b["n"] / a["n"]
        growth.append(
            {
                "from": a["n"],
                "to": b["n"],
                "devices_x": k,
                "rollout_time_x": b["rollout"]["seconds"] / a["rollout"]["seconds"],
                "server_cpu_x": b["rollout"]["cpu_s"] / max(a["rollout"]["cpu_s"], 1e-9),
                "rss_x": b["rollout"]["rss_mb"] / a["rollout"]["rss_mb"],
            }
        )
    for g in growth:
        print(
            f"  {g['from']}→{g['to']} devices (×{g['devices_x']:.1f}): "
            f"rollout time ×{g['rollout_time_x']:.2f}, "
            f"server CPU ×{g['server_cpu_x']:.2f}, RSS ×{g['rss_x']:.2f}"
        )
    print(
        table(
            "cost of trust, measured: the same rollout with and without signing and checking",
            [
                "devices",
                "signed rollouts s",
                "unsigned rollouts s",
                "measured share (medians)",
                "server CPU s signed / unsigned",
                "devices' CPU s",
                "CPU diff / rollout (server)",
                "per-op estimate",
                "server part",
            ],
            [
                [
                    r["n"],
                    " ".join(f"{x:.2f}" for x in r["measured"]["signed_rollouts_s"]),
                    " ".join(f"{x:.2f}" for x in r["measured"]["unsigned_rollouts_s"]),
                    f"{r['measured']['share_of_rollout']:.1%}",
                    f"{r['measured']['signed_cpu_s']:.2f} / {r['measured']['unsigned_cpu_s']:.2f}",
                    f"{r['measured']['signed_device_cpu_s']:.2f} / "
                    f"{r['measured']['unsigned_device_cpu_s']:.2f}",
                    f"{r['measured']['cpu_share']:.1%} ({r['measured']['server_cpu_share']:.1%})",
                    f"{r['rollout']['trust']['share_of_rollout']:.1%}",
                    f"{r['rollout']['trust']['server_share_of_rollout']:.1%}",
                ]
                for r in runs
            ],
        )
    )
    tr = big["rollout"]["trust"]
    ops = [
        ["deploy payload sha256 (once per bundle)", 1, tr["payload_digest_us"], "", "server"],
        [
            "command, MAC (server) / check (device)",
            tr["commands_mac"],
            tr["command_mac_us"],
            tr["command_mac_verify_us"],
            "both",
        ],
        [
            "command, Ed25519 sign / verify",
            tr["commands_ed25519"],
            tr["command_sign_us"],
            tr["command_verify_us"],
            "both",
        ],
        [
            "device message, MAC (device) / check (server)",
            tr["messages_mac"],
            tr["mac_sign_us"],
            tr["mac_verify_us"],
            "both",
        ],
        [
            "device message, Ed25519 sign / verify",
            tr["messages_ed25519"],
            tr["message_sign_us"],
            tr["message_verify_us"],
            "both",
        ],
        [
            "MAC key agreement, X25519 + HKDF (server)",
            tr["agreements"],
            tr["agreement_us"],
            "",
            f"once per device key; {tr['registration_agreements']} at registration",
        ],
        [
            "registration births, Ed25519 (before the rollout)",
            tr["registration_births"],
            tr["message_sign_us"],
            tr["message_verify_us"],
            "not in the share",
        ],
    ]
    print(
        table(
            f"cost of trust per operation, {big['n']} devices (CPU µs, thread time)",
            ["operation", "count in the rollout", "make µs", "check µs", "note"],
            ops,
        )
    )
    for r in runs:
        tr = r["rollout"]["trust"]
        m = r["measured"]
        print(
            f"  trust, {r['n']} devices: per-op estimate {tr['total_s'] * 1000:.0f} ms = "
            f"{tr['share_of_rollout']:.2%} of the {r['rollout']['seconds']:.2f} s rollout "
            f"(target ≤ {TRUST_TARGET:.0%}; the server's own part {tr['server_s'] * 1000:.0f} "
            f"ms = {tr['server_share_of_rollout']:.2%}; the {tr['registration_births']} "
            f"registration births would add {tr['registration_births_share']:.2%}); "
            f"measured (medians of {repeats}): {m['signed_rollout_s']:.2f} s signed, "
            f"{m['unsigned_rollout_s']:.2f} s without signing → "
            f"{m['share_of_rollout']:.1%}; CPU with minus without signing, server + "
            f"devices, {m['cpu_share']:.1%} of the rollout (server {m['server_cpu_share']:.1%})"
        )
    for r in runs:
        pubs, count = r["rollout"]["artifact_publishes"], r["rollout"]["bundle_chunks"]
        per = max(pubs.values(), default=0)
        r["rollout"]["publishes_per_artifact"] = per
        print(
            f"  artifact, {r['n']} devices: the server published {per} chunk messages per "
            f"artifact for a {count}-chunk bundle ({per / max(count, 1):.2f} copies; sent per "
            f"device it would be {r['n'] * count}), per artifact: {pubs}"
        )
    small = runs[0]
    headline = [
        {
            "metric": f"signing + verifying every command and device message, {big['n']} devices",
            "value": f"{big['rollout']['trust']['total_s'] * 1000:.0f} ms (per-op estimate)",
            "anchor": f"the {big['rollout']['seconds']:.2f} s rollout (target ≤ 10 %)",
            "ratio": big["rollout"]["trust"]["share_of_rollout"],
        },
        {
            "metric": f"rollout time with signing vs without, {big['n']} devices (measured)",
            "value": f"{big['measured']['signed_rollout_s']:.2f} s",
            "anchor": f"{big['measured']['unsigned_rollout_s']:.2f} s unsigned (target ≤ 10 %)",
            "ratio": big["measured"]["share_of_rollout"],
        },
        {
            "metric": f"4-stage rollout to 100 % of {big['n']} devices",
            "value": f"{big['rollout']['seconds']:.2f} s",
            "anchor": f"target {TARGET_S:.0f} s",
            "ratio": big["rollout"]["seconds"] / TARGET_S,
        },
        {
            "metric": f"rollout time, {big['n']} devices",
            "value": f"{big['rollout']['seconds']:.2f} s",
            "anchor": "4 × one command/status round trip to every device",
            "ratio": big["rollout"]["seconds"] / max(4 * big["ping_round_s"], 1e-9),
        },
        {
            "metric": f"rollout time growth, {small['n']} → {big['n']} devices",
            "value": f"{big['rollout']['seconds']:.2f} s",
            "anchor": f"{small['rollout']['seconds']:.2f} s at {small['n']} devices",
            "ratio": big["rollout"]["seconds"] / max(small["rollout"]["seconds"], 1e-9),
        },
        {
            "metric": f"server publishes per artifact, {big['n']} devices",
            "value": f"{big['rollout']['publishes_per_artifact']} chunk messages",
            "anchor": f"{big['rollout']['bundle_chunks']} chunks (one copy of the bundle)",
            "ratio": big["rollout"]["publishes_per_artifact"]
            / max(big["rollout"]["bundle_chunks"], 1),
        },
        {
            "metric": f"sketch reports merged per second, {big['n']} devices",
            "value": f"{big['ingest_rate_per_s']:,.0f}/s",
            "anchor": "publisher-bound: a lower bound on server capacity",
            "ratio": None,
        },
    ]
    result = {
        "quick": quick,
        "devices_per_client": DEVICES_PER_CLIENT,
        "runs": runs,
        "unsigned_runs": bare,
        "growth": growth,
        "headline": headline,
    }
    from bench import list_timing  # lists at fleet size (its own module and result file)

    result["lists"] = list_timing.main(quick)
    headline += result["lists"]["headline"]
    write_result("fleet_scale", result)
    return result


if __name__ == "__main__":
    import sys

    if "--cluster" in sys.argv[1:]:  # the scale-out run (bench/cluster_scale.py)
        sys.argv.remove("--cluster")
        from bench import cluster_scale

        run_cli(cluster_scale.main, cluster_scale.__doc__)
    elif "--lists" in sys.argv[1:]:  # the list timing alone
        sys.argv.remove("--lists")
        from bench import list_timing

        run_cli(list_timing.main, list_timing.__doc__)
    else:
        run_cli(main, __doc__)
