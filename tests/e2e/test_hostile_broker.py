"""Device-side attacks from a client on the same broker (the embedded amqtt broker, and
Mosquitto without ACLs): whatever it publishes, the device changes nothing on disk, keeps
serving, records why, and its memory stays bounded.

One real agent process per broker (``edgefleet agent run``, config written like
``agent init``'s, serving iris 2.0.0 installed over MQTT by a legitimate, command-key-signed
deploy that the attacker captured) and an attacker paho client that holds neither the
fleet's command key nor any trusted key. The fleet's X25519 key is announced (signed by the
command key), so the device also takes commands MAC'd with the key it agreed; the attacker
tries those too: a guessed key, a compromised neighbour's own key, another fleet key, and
genuine MAC'd captures re-dated, expired or with a swapped chunk list. A second legitimate
deploy (3.0.0) is left half delivered, so chunk attacks meet a download in progress.

For every attack the test asserts:

* the data folder is unchanged, by hashing its tree. Excluded, because they change without
  any attack: ``predictions.db*`` (the test's own /v1/predict calls are logged) and
  ``outbox.db*`` (metrics and sketch windows are queued and flushed every few seconds;
  the in-progress download re-asks for its missing chunks every 10 s). For the outbox the
  test checks what matters instead: the command ledger holds no new command id, and every
  status the attacker's commands got was sent best-effort (``admitted: false``), never stored;
* ``/v1/predict`` answers with the model that was serving;
* chunks forged onto the shared artifact topic (``{p}/artifacts/{sha256}/{i}``, retained
  so the broker keeps handing them out) are dropped like those on the device's own topic:
  each is checked against the sha256 the signed deploy lists for its index;
* the reason is recorded: the agent's in-memory counter by reason (``GET /v1/status`` →
  ``commands.refused``) grew by the expected code, and any status the broker carried for
  the attack's command id says ``rejected`` with that code;
* the agent's RSS growth is measured and printed per attack, and bounded overall (a
  generous 150 MiB: the attacks this closes cost 1-2 GiB each).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import sqlite3
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import psutil
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from protocol import KeyPair, Manifest, read_bundle
from protocol.device_mac import (
    announce,
    fleet_kex_key,
    kex_id,
    mac_key,
    raw_public,
    x25519_from_b64,
)
from protocol.messages import (
    ArtifactChunk,
    Command,
    CommandStatus,
    DeployPayload,
    RollbackPayload,
    chunk_hashes,
    mac_command,
    sign_command,
    utcnow,
)
from protocol.transport_paho import PahoTransport
from tests.agent.fleet_sim import chunks as make_chunks
from tests.agent.fleet_sim import deploy_command as legit_deploy
from tests.e2e.support import (
    TOPICS,
    AgentProcess,
    BrokerRecorder,
    edgefleet,
    wait_until,
    write_agent_config,
    write_public_keys,
)
from tests.support.bundles import make_bundle
from tests.support.keys import COMMAND_KEY

pytestmark = [pytest.mark.slow]

KINDS = ("deploy", "rollback", "benchmark", "config", "shadow_stop")
SERVING = "2.0.0"
RSS_BOUND_MIB = 150
EXCLUDED = ("predictions.db", "outbox.db")  # see the module docstring


@dataclass
class Victim:
    name: str
    device: str
    agent: AgentProcess
    data_dir: Path
    recorder: BrokerRecorder
    attacker: PahoTransport
    captured_deploy: bytes  # the legitimate 2.0.0 deploy, as seen on the wire
    captured_chunks: list[tuple[str, bytes]]
    pending: Command  # the legitimate 3.0.0 deploy whose chunks were withheld
    wine: tuple[bytes, Manifest]  # a genuine bundle of another model name
    bundle_key: KeyPair  # the attacker may hold one (a leaked build machine)
    fleet_kex: str  # the fleet X25519 key id the device agreed its MAC key with
    mac_key: bytes  # the victim's K (what the fleet MACs its commands with)
    neighbour_key: bytes  # a compromised neighbour's own K with the same fleet
    rss: list[tuple[str, float]] = field(default_factory=list)


def tree_hash(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.name.startswith(EXCLUDED):
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def ledger_ids(data_dir: Path) -> set[str]:
    con = sqlite3.connect(f"file:{data_dir / 'outbox.db'}?mode=ro", uri=True)
    try:
        return {r[0] for r in con.execute("SELECT command_id FROM commands")}
    finally:
        con.close()


def refused(v: Victim) -> dict[str, int]:
    r = v.agent.get("/v1/status")
    assert r.status_code == 200, r.text
    counts: dict[str, int] = r.json()["commands"]["refused"]
    return counts


def rss_mib(v: Victim) -> float:
    assert v.agent.proc is not None
    return float(psutil.Process(v.agent.proc.pid).memory_info().rss) / 2**20


@pytest.fixture(
    scope="module", params=["amqtt", pytest.param("mosquitto", marks=pytest.mark.mosquitto)]
)
def victim(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    signing_key: KeyPair,
) -> Iterator[Victim]:
    broker = request.getfixturevalue(f"{request.param}_broker")
    url = str(broker.url)
    folder = tmp_path_factory.mktemp(f"hostile-{request.param}")
    device = f"hostile-{request.param}-{uuid.uuid4().hex[:6]}"
    (bundle_pub,) = write_public_keys(folder / "keys", signing_key)
    config = write_agent_config(
        folder / "device",
        device_id=device,
        broker_url=url,
        bundle_keys=[bundle_pub],
        artifact_origins=["https://fleet.example:8700"],
    )
    v1, _ = make_bundle(signing_key, version="1.0.0", release=1)
    (folder / "v1.efb").write_bytes(v1)
    out = edgefleet("agent", "install", str(folder / "v1.efb"), "--config", str(config))
    assert out.returncode == 0, out.stderr
    agent = AgentProcess(config).start()
    recorder = BrokerRecorder(url, f"{TOPICS.prefix}/devices/{device}/#").start()
    fleet = PahoTransport(url, f"fleet-{uuid.uuid4().hex[:6]}", clean_session=True)
    attacker = PahoTransport(url, f"attacker-{uuid.uuid4().hex[:6]}", clean_session=True)
    captured_chunks: list[tuple[str, bytes]] = []
    pending_sha: str | None = None
    try:
        agent.wait_api(ready=True)
        fleet.connect(timeout=10)
        attacker.connect(timeout=10)
        wait_until(lambda: recorder.by_kind("state"), 30, "the device's birth message")
        # the fleet announces its X25519 key (signed by the command key): the device agrees
        # its MAC key and says so in a birth, so MAC'd commands are in play too
        fleet_x = fleet_kex_key(COMMAND_KEY)
        fid = kex_id(fleet_x.public_key())
        ann = announce(COMMAND_KEY, utcnow()).to_json()
        assert fleet.publish(TOPICS.kex(), ann, qos=1, retain=True).wait(10)

        def agreed() -> dict[str, Any] | None:
            for _, m in recorder.by_kind("state"):
                if m.json().get("fleet_kex") == fid:
                    return dict(m.json())
            return None

        birth = wait_until(agreed, 30, "a birth naming the fleet key")
        victim_x = x25519_from_b64(birth["x25519_key"])
        assert victim_x is not None
        fleet_pub = raw_public(fleet_x.public_key())
        victim_k = mac_key(fleet_x, victim_x, device, raw_public(victim_x), fleet_pub)
        neighbour_x = X25519PrivateKey.generate().public_key()
        neighbour_k = mac_key(fleet_x, neighbour_x, "neighbour", raw_public(neighbour_x), fleet_pub)

        def final(cid: str) -> CommandStatus | None:
            for _, m in recorder.by_kind("status"):
                st = CommandStatus.model_validate_json(m.payload)
                if st.command_id == cid and st.state in ("installed", "rejected", "failed"):
                    return st
            return None

        # The legitimate fleet deploys 2.0.0 (signed by the command key); the attacker
        # captures the command and its chunks from the broker.
        v2, m2 = make_bundle(signing_key, version=SERVING, release=2)
        cmd = legit_deploy(device, v2, m2, signing_key, chunk_size=4096, command_id="legit-2")
        # Like the fleet server: the chunks once, retained, on the artifact's shared topic.
        captured_chunks += [
            (TOPICS.artifact_chunk(ch.sha256, ch.index), ch.to_json())
            for ch in make_chunks(v2, cmd)
        ]
        for topic, payload in captured_chunks:
            assert fleet.publish(topic, payload, qos=1, retain=True).wait(10)
        assert fleet.publish(TOPICS.cmd(device), cmd.to_json(), qos=1).wait(10)
        st = wait_until(lambda: final("legit-2"), 60, "the legitimate deploy to finish")
        assert st.state == "installed", st
        wait_until(lambda: (agent.model() or {}).get("version") == SERVING, 30, "2.0.0 serving")
        captured = next(m.payload for _, m in recorder.by_kind("cmd"))
        # A second legitimate deploy (3.0.0) whose chunks never come: a download in progress.
        v3, m3 = make_bundle(signing_key, version="3.0.0", release=3)
        pending = legit_deploy(device, v3, m3, signing_key, chunk_size=4096, command_id="legit-3")
        assert fleet.publish(TOPICS.cmd(device), pending.to_json(), qos=1).wait(10)
        pending_sha = pending.deploy.bundle_sha256 if pending.deploy is not None else None

        def downloading() -> bool:
            return any(
                CommandStatus.model_validate_json(m.payload).command_id == "legit-3"
                and CommandStatus.model_validate_json(m.payload).state == "downloading"
                for _, m in recorder.by_kind("status")
            )

        wait_until(downloading, 30, "the 3.0.0 download to start")  # session.json written
        wine = make_bundle(signing_key, name="wine", version="9.0.0", release=9)
        yield Victim(
            request.param,
            device,
            agent,
            folder / "device" / "data",
            recorder,
            attacker,
            captured,
            captured_chunks,
            pending,
            wine,
            signing_key,
            fid,
            victim_k,
            neighbour_k,
        )
    finally:
        for topic, _ in captured_chunks:
            fleet.publish(topic, b"", qos=1, retain=True)  # the shared broker forgets them
        for i in range(3):  # and the forged retained chunks of the shared-topic attack
            if pending_sha is not None:
                fleet.publish(TOPICS.artifact_chunk(pending_sha, i), b"", qos=1, retain=True)
        fleet.publish(TOPICS.kex(), b"", qos=1, retain=True).wait(10)  # no trace for others
        attacker.close()
        fleet.close()
        agent.close()
        recorder.close()


# -- the attacks ------------------------------------------------------------------------------
Publish = list[tuple[str, bytes]]


def _cmd(v: Victim, kind: str, cid: str, **fields: Any) -> Command:
    payloads: dict[str, Any] = {
        "deploy": {
            "deploy": DeployPayload.model_validate_json(_captured(v).deploy.model_dump_json())
        },  # type: ignore[union-attr]
        "rollback": {"rollback": RollbackPayload(to_release=1)},
        "config": {"config": {"metrics_interval": 0.01}},
        "benchmark": {},
        "shadow_stop": {},
    }
    base: dict[str, Any] = {"command_id": cid, "device_id": v.device, "kind": kind}
    base.update(payloads[kind])
    base.update(fields)
    return Command(**base)


def _payload_swapped(v: Victim, cid: str) -> Command:
    good = _maced(v, _cmd(v, "deploy", cid), v.mac_key)
    assert good.deploy is not None and good.deploy.chunk_hashes is not None
    raw = base64.b64decode(good.deploy.chunk_hashes)
    planted = hashlib.sha256(b"the attacker's chunk").digest() + raw[32:]
    other = good.deploy.model_copy(update={"chunk_hashes": base64.b64encode(planted).decode()})
    return good.model_copy(update={"deploy": other})


def _captured(v: Victim) -> Command:
    return Command.model_validate_json(v.captured_deploy)


def _on_cmd(v: Victim, *cmds: Command | bytes) -> Publish:
    topic = TOPICS.cmd(v.device)
    return [(topic, c if isinstance(c, bytes) else c.to_json()) for c in cmds]


def _raw_deploy(v: Victim, cid: str, **payload: Any) -> bytes:
    """A deploy built as JSON (no model checks), as a hand-writing attacker sends it."""
    doc = json.loads(v.captured_deploy)
    doc["command_id"] = cid
    doc["deploy"].update(payload)
    return json.dumps(doc).encode()


def _zip_bomb(v: Victim) -> bytes:
    cap = _captured(v)
    assert cap.deploy is not None
    manifest = cap.deploy.manifest_bytes()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("manifest.json", manifest)
        zf.writestr("manifest.sig", cap.deploy.manifest_signature.to_bytes())
        info = zipfile.ZipInfo("model.onnx")
        info.compress_type = zipfile.ZIP_DEFLATED
        with zf.open(info, "w", force_zip64=True) as fh:
            for _ in range(256):
                fh.write(bytes(1024 * 1024))
    return out.getvalue()


def _deploy_of(v: Victim, data: bytes, cid: str, key: KeyPair | None, **extra: Any) -> Publish:
    """A deploy for ``data`` quoting the captured (genuine) manifest, and all its chunks."""
    cap = _captured(v)
    assert cap.deploy is not None
    try:
        b = read_bundle(data)
        manifest, sig = b.manifest_bytes, b.signature
    except Exception:
        manifest, sig = cap.deploy.manifest_bytes(), cap.deploy.manifest_signature
    size = len(data)
    payload = DeployPayload(
        manifest=base64.b64encode(manifest).decode(),
        manifest_signature=sig,
        bundle_sha256=hashlib.sha256(data).hexdigest(),
        bundle_size=size,
        chunk_size=65536,
        n_chunks=-(-size // 65536),
        chunk_hashes=chunk_hashes(data, 65536),
        **extra,
    )
    cmd = Command(command_id=cid, device_id=v.device, kind="deploy", deploy=payload)
    if key is not None:
        cmd = sign_command(cmd, key, ttl_s=600)
    pubs = _on_cmd(v, cmd)
    for i in range(payload.n_chunks):
        piece = data[i * 65536 : (i + 1) * 65536]
        ch = ArtifactChunk(
            sha256=payload.bundle_sha256,
            index=i,
            count=payload.n_chunks,
            chunk_sha256=hashlib.sha256(piece).hexdigest(),
            data=base64.b64encode(piece).decode(),
        )
        pubs.append((TOPICS.artifact(v.device, payload.bundle_sha256, i), ch.to_json()))
    return pubs


def _bogus_chunks(v: Victim) -> Publish:
    p = v.pending.deploy
    assert p is not None
    sha = p.bundle_sha256
    good = b"\0" * p.chunk_size

    def ch(index: int, data: bytes, **kw: Any) -> bytes:
        doc = {
            "sha256": sha,
            "index": index,
            "count": p.n_chunks,
            "chunk_sha256": hashlib.sha256(data).hexdigest(),
            "data": base64.b64encode(data).decode(),
        }
        doc.update(kw)
        return json.dumps(doc).encode()

    topic = TOPICS.artifact
    return [
        (topic(v.device, sha, 0), ch(0, good)),  # its own hash holds, not the signed one
        (topic(v.device, sha, 0), ch(0, good, chunk_sha256="0" * 64)),  # not its own hash
        (topic(v.device, sha, 0), ch(0, b"x" * 10)),  # wrong size for index 0
        (topic(v.device, sha, 1), ch(10**6, good)),  # index past the count
        (topic(v.device, sha, 1), ch(1, good, count=10**6)),  # another count
        (topic(v.device, sha, 1), ch(1, good, chunk_sha256="../../" + "a" * 58)),
        (topic(v.device, sha, 2), b"{" * 200_000),  # not JSON at all
        (f"{TOPICS.prefix}/devices/{v.device}/artifact/../0", ch(0, good)),
        (topic(v.device, "f" * 64, 0), ch(0, good, sha256="f" * 64)),  # no such download
    ]


def _forged_shared_chunks(v: Victim) -> Publish:
    """The same forgeries on the pending artifact's shared topic, which the device follows
    while it downloads and where anyone allowed to publish can put a (retained) chunk."""
    p = v.pending.deploy
    assert p is not None
    sha = p.bundle_sha256
    out: Publish = []
    for topic, payload in _bogus_chunks(v):
        *_, target, index = topic.split("/")
        try:
            out.append((TOPICS.artifact_chunk(target, int(index)), payload))
        except ValueError:  # the path-traversal one: published as it is
            out.append((f"{TOPICS.prefix}/artifacts/{target}/{index}", payload))
    # a genuine chunk of another artifact (the captured 2.0.0), put under the pending sha
    out.append((TOPICS.artifact_chunk(sha, 0), v.captured_chunks[0][1]))
    return out


@dataclass(frozen=True)
class Attack:
    name: str
    build: Callable[[Victim, str], Publish]
    reasons: dict[str, int]  # expected counter growth by reason code
    chunks_only: bool = False
    retain: bool = False  # published retained, so the broker keeps handing it out


def _captured_kind(
    v: Victim, kind: str, cid: str, *, days: float = 0.0, device: str | None = None
) -> Command:
    """A command the fleet really signed (a capture from an earlier day, or meant for
    another device) that the attacker now replays at this device."""
    issued = utcnow() + timedelta(days=days)
    cmd = _cmd(v, kind, cid, device_id=device or v.device)
    return sign_command(cmd, COMMAND_KEY, now=issued, ttl_s=3600)


def _maced(v: Victim, cmd: Command, key: bytes, *, days: float = 0.0, kex: str = "") -> Command:
    """``cmd`` MAC'd as the fleet MACs commands to a device that agreed its key."""
    issued = utcnow() + timedelta(days=days)
    return mac_command(cmd, key, kex or v.fleet_kex, now=issued, ttl_s=3600)


def _kind_attacks() -> list[Attack]:
    stranger = KeyPair.generate()
    out: list[Attack] = []
    for kind in KINDS:
        out += [
            Attack(
                f"mac-forged-{kind}",
                # a MAC naming the device's real fleet key, made with a guessed key
                lambda v, cid, k=kind: _on_cmd(v, _maced(v, _cmd(v, k, cid), bytes(32))),
                {"signature_invalid": 1},
            ),
            Attack(
                f"mac-neighbour-key-{kind}",
                # a compromised neighbour MACs with the key it agreed with the same fleet
                lambda v, cid, k=kind: _on_cmd(v, _maced(v, _cmd(v, k, cid), v.neighbour_key)),
                {"signature_invalid": 1},
            ),
            Attack(
                f"mac-redated-{kind}",
                # a genuinely MAC'd capture from an earlier day, its dates changed
                lambda v, cid, k=kind: _on_cmd(
                    v,
                    _maced(v, _cmd(v, k, cid), v.mac_key, days=-2).model_copy(
                        update={"expires_at": utcnow() + timedelta(days=1)}
                    ),
                ),
                {"signature_invalid": 1},
            ),
        ]
        out += [
            Attack(
                f"unsigned-{kind}",
                lambda v, cid, k=kind: _on_cmd(v, _cmd(v, k, cid)),
                {"signature_invalid": 1},
            ),
            Attack(
                f"forged-{kind}",
                lambda v, cid, k=kind: _on_cmd(
                    v, sign_command(_cmd(v, k, cid), stranger, ttl_s=60)
                ),
                {"key_unknown": 1},
            ),
            Attack(
                f"bundle-key-signed-{kind}",
                # the attacker holds a bundle key (a leaked build machine): still no command
                lambda v, cid, k=kind: _on_cmd(
                    v, sign_command(_cmd(v, k, cid), v.bundle_key, ttl_s=60)
                ),
                {"key_wrong_role": 1},
            ),
            Attack(
                f"expired-{kind}",
                lambda v, cid, k=kind: _on_cmd(v, _captured_kind(v, k, cid, days=-2)),
                {"command_expired": 1},
            ),
            Attack(
                f"future-{kind}",
                lambda v, cid, k=kind: _on_cmd(v, _captured_kind(v, k, cid, days=+2)),
                {"command_from_future": 1},
            ),
            Attack(
                f"misaddressed-{kind}",
                lambda v, cid, k=kind: _on_cmd(v, _captured_kind(v, k, cid, device="neighbour")),
                {"not_addressed": 1},
            ),
            Attack(
                f"redated-{kind}",
                # the best an attacker can do to a capture: change its dates (or anything)
                lambda v, cid, k=kind: _on_cmd(
                    v,
                    _captured_kind(v, k, cid, days=-2).model_copy(
                        update={"expires_at": utcnow() + timedelta(days=1)}
                    ),
                ),
                {"signature_invalid": 1},
            ),
        ]
    return out


ATTACKS: list[Attack] = [
    *_kind_attacks(),
    Attack(
        "mac-expired-deploy",
        lambda v, cid: _on_cmd(v, _maced(v, _cmd(v, "deploy", cid), v.mac_key, days=-2)),
        {"command_expired": 1},
    ),
    Attack(
        "mac-another-fleet-key-deploy",
        lambda v, cid: _on_cmd(v, _maced(v, _cmd(v, "deploy", cid), v.mac_key, kex="0" * 16)),
        {"key_unknown": 1},
    ),
    Attack(
        "mac-payload-swapped-deploy",
        # a genuine MAC'd deploy with the captured payload's chunk list replaced
        lambda v, cid: _on_cmd(v, _payload_swapped(v, cid)),
        {"signature_invalid": 1},
    ),
    Attack(
        "replayed-captured-deploy",
        lambda v, cid: _on_cmd(v, v.captured_deploy) + v.captured_chunks,
        {"command_replayed": 1},
    ),
    Attack(
        "replayed-pending-deploy",
        lambda v, cid: _on_cmd(v, v.pending.to_json()),
        {"command_replayed": 1},
    ),
    Attack(
        "captured-deploy-under-a-new-id",
        lambda v, cid: _on_cmd(v, _captured(v).model_copy(update={"command_id": cid})),
        {"signature_invalid": 1},
    ),
    Attack(
        "path-traversal-sha256",
        lambda v, cid: _on_cmd(v, _raw_deploy(v, cid, bundle_sha256="../../.." + "a" * 56)),
        {"command_invalid": 1},
    ),
    Attack(
        "chunk-size-1",
        lambda v, cid: _on_cmd(v, _raw_deploy(v, cid, chunk_size=1, n_chunks=_size(v))),
        {"command_invalid": 1},
    ),
    Attack(
        "huge-n-chunks",
        lambda v, cid: _on_cmd(v, _raw_deploy(v, cid, n_chunks=10**9)),
        {"command_invalid": 1},
    ),
    Attack(
        "oversize-bundle-size",
        lambda v, cid: _on_cmd(
            v, _raw_deploy(v, cid, bundle_size=10**12, n_chunks=10**12 // 65536)
        ),
        {"command_invalid": 1},
    ),
    Attack(
        "foreign-http-url",
        lambda v, cid: _on_cmd(
            v, _raw_deploy(v, cid, http_url="http://169.254.169.254/latest/meta-data")
        ),
        {"signature_invalid": 1},
    ),
    Attack(
        "captured-signature-with-foreign-http-url",
        # the captured id and signature, another URL: the signature is checked first
        lambda v, cid: _on_cmd(v, _raw_deploy(v, "legit-2", http_url="http://10.0.0.1:22/")),
        {"signature_invalid": 1},
    ),
    Attack(
        "zip-bomb-deploy",
        lambda v, cid: _deploy_of(v, _zip_bomb(v), cid, None),
        {"signature_invalid": 1},
    ),
    Attack(
        "model-name-swap",
        lambda v, cid: _deploy_of(v, v.wine[0], cid, None, replace_model=True),
        {"signature_invalid": 1},
    ),
    Attack("bogus-artifact-chunks", lambda v, cid: _bogus_chunks(v), {}, chunks_only=True),
    Attack(
        "forged-chunks-on-the-shared-artifact-topic",
        lambda v, cid: _forged_shared_chunks(v),
        {},
        chunks_only=True,
        retain=True,
    ),
    Attack(
        "garbage-commands",
        lambda v, cid: _on_cmd(v, b"\xff" * 1000, b"[]", b'{"command_id": 5}', b"{" * 100_000),
        {"command_invalid": 4},
    ),
]


def _size(v: Victim) -> int:
    p = _captured(v).deploy
    assert p is not None
    return p.bundle_size


# -- the test ---------------------------------------------------------------------------------
@pytest.mark.parametrize("attack", ATTACKS, ids=lambda a: a.name)
def test_attack_changes_nothing_and_is_recorded(victim: Victim, attack: Attack) -> None:
    v = victim
    cid = f"atk-{attack.name[:40]}-{uuid.uuid4().hex[:6]}"
    before_tree = tree_hash(v.data_dir)
    before_ids = ledger_ids(v.data_dir)
    before_refused = refused(v)
    before_rss = rss_mib(v)
    if not v.rss:
        v.rss.append(("start", before_rss))
    pending = v.pending.deploy
    assert pending is not None
    chunks_before = _chunk_counters(v)

    pubs = attack.build(v, cid)
    for topic, payload in pubs:
        assert v.attacker.publish(topic, payload, qos=1, retain=attack.retain).wait(10)

    def recorded() -> bool:
        now = refused(v)
        grew = all(now.get(r, 0) - before_refused.get(r, 0) >= n for r, n in attack.reasons.items())
        if attack.chunks_only:  # 6 of its chunks name a download; each must be counted
            grew = sum(_chunk_counters(v)) - sum(chunks_before) >= 6
        return grew

    wait_until(recorded, 30, f"the agent to count {attack.name} ({attack.reasons})")
    time.sleep(0.3)  # anything the attack could still cause has had its chance to land

    # 1. nothing changed on disk
    assert tree_hash(v.data_dir) == before_tree, attack.name
    assert ledger_ids(v.data_dir) == before_ids, attack.name
    for _, m in v.recorder.by_kind("status"):
        st = CommandStatus.model_validate_json(m.payload)
        if st.command_id == cid:
            assert not st.admitted and st.state == "rejected", st  # best-effort, never stored
            assert st.reason in attack.reasons, st
    # 2. the model keeps serving
    r = v.agent.predict()
    assert r.status_code == 200 and r.json()["model"]["version"] == SERVING, r.text
    assert v.agent.model() == {"name": "iris", "version": SERVING, "release": 2}
    # 3. the reason was recorded (counter, above); 4. memory
    after = rss_mib(v)
    v.rss.append((attack.name, after))
    print(
        f"[{v.name}] {attack.name}: {len(pubs)} messages, RSS {before_rss:.1f} → {after:.1f} MiB "
        f"({after - before_rss:+.1f}), refused {refused(v)}"
    )
    start = v.rss[0][1]
    assert after - start < RSS_BOUND_MIB, f"RSS grew {after - start:.0f} MiB since the start"


def _chunk_counters(v: Victim) -> tuple[int, int]:
    c = v.agent.get("/v1/status").json()["commands"]
    return int(c["unknown_chunks"]), int(c["rejected_chunks"])


def test_a_flood_of_forged_commands_costs_no_disk_and_bounded_memory(victim: Victim) -> None:
    v = victim
    before_tree, before_ids = tree_hash(v.data_dir), ledger_ids(v.data_dir)
    before = refused(v).get("signature_invalid", 0)
    rss0 = rss_mib(v)
    n = 2000
    raw = _cmd(v, "config", "flood").to_json()
    for batch in range(0, n, 100):  # batches, so no broker queue limit drops any of them
        for i in range(batch, batch + 100):
            v.attacker.publish(
                TOPICS.cmd(v.device), raw.replace(b"flood", f"flood-{i}".encode()), qos=1
            )
        wait_until(
            lambda b=batch: refused(v).get("signature_invalid", 0) - before >= b + 100,
            60,
            f"flood messages {batch}-{batch + 99} counted",
        )
    sent = sum(
        1
        for _, m in v.recorder.by_kind("status")
        if CommandStatus.model_validate_json(m.payload).command_id.startswith("flood-")
    )
    rss1 = rss_mib(v)
    print(f"[{v.name}] flood of {n}: {sent} refusals sent, RSS {rss0:.1f} → {rss1:.1f} MiB")
    assert sent < n / 4  # rate-limited
    metrics = v.agent.get("/metrics").text
    line = next(x for x in metrics.splitlines() if 'refused_total{reason="signature_invalid"}' in x)
    assert int(line.split()[-1]) >= n  # the counter is on /metrics too
    assert tree_hash(v.data_dir) == before_tree and ledger_ids(v.data_dir) == before_ids
    assert v.agent.predict().status_code == 200
    assert rss1 - rss0 < RSS_BOUND_MIB
