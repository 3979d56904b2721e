"""Helpers for fleet-server tests: a config with keys, an in-process API caller, and a
simulated device that speaks the real protocol (used until/alongside the real agent).

The simulated device does what the contract asks of an agent and nothing more: it
publishes a retained birth state, verifies the signed deploy command and the bundle with
``protocol``, reassembles chunks (or downloads over HTTP), reports progress, and answers
signed rollbacks. Faults are switchable so tests can make it fail or drop chunks.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fleet_server.config import FleetConfig
from fleet_server.delivery import reassemble
from protocol import KeyPair, TrustStore
from protocol.bundle import read_bundle, verify_bundle
from protocol.device_auth import DeviceSigner, SigningTransport, enrol_proof, token_hash
from protocol.device_mac import kex_id, mac_key, open_announcement, raw_public, x25519_b64
from protocol.errors import EdgefleetError
from protocol.messages import (
    ArtifactChunk,
    Command,
    CommandStatus,
    DeviceState,
    ModelRef,
    decode,
    verify_command,
)
from protocol.topics import Topics
from protocol.transport import Transport, Will
from tests.support.keys import COMMAND_KEY, write_private

# Simulated devices enrol with this token; make_config() lists its hash.
TEST_ENROL_TOKEN = "eft-enrol-test-token"
STATE_STEP = 1 << 20


def write_keys(tmp: Path, key: KeyPair) -> tuple[Path, Path]:
    priv, pub = tmp / "fleet.pem", tmp / "fleet.pub.pem"
    priv.write_bytes(key.private_pem())
    pub.write_bytes(key.public_pem())
    return priv, pub


def make_config(
    tmp: Path, key: KeyPair, *, broker_url: str = "mqtt://127.0.0.1:1", **rollout: Any
) -> FleetConfig:
    """``key`` signs bundles; commands are signed by the session's :data:`COMMAND_KEY`."""
    _, pub = write_keys(tmp, key)
    data: dict[str, Any] = {
        "data_dir": str(tmp / "fleet"),
        "broker": {"url": broker_url},
        "signing": {
            "command_key": str(write_private(tmp / "command")),
            "bundle_keys": [str(pub)],
        },
        "rollout": {"tick_s": 0.1, **rollout},
        "devices": {"enrol_token_hashes": [token_hash(TEST_ENROL_TOKEN)]},
    }
    return FleetConfig.model_validate(data)


def enrol_token_file(folder: Path) -> Path:
    """A 0600 file holding TEST_ENROL_TOKEN, for an agent's ``[enrol] token_file``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "enrol-token"
    path.write_text(TEST_ENROL_TOKEN + "\n")
    path.chmod(0o600)
    return path


class DeviceKey:
    """A device's signing key for tests that publish device messages by hand."""

    def __init__(
        self, device_id: str, token: str | None = TEST_ENROL_TOKEN, prefix: str = "edgefleet"
    ) -> None:
        self.device_id = device_id
        self.topics = Topics(prefix)
        self.key = KeyPair.generate()
        self.signer = DeviceSigner(device_id, self.key, boot=1)
        self.proof = enrol_proof(token_hash(token), device_id, self.key.key_id) if token else None
        self.births = 0

    def birth(self, **fields: Any) -> bytes:
        """A signed birth (online, with the public key and token proof)."""
        self.births += 1
        state = DeviceState(
            device_id=self.device_id,
            online=fields.pop("online", True),
            public_key=self.signer.public_key_b64(),
            enrol_proof=self.proof,
            **fields,
        )
        return self.signer.sign(self.topics.state(self.device_id), state.to_json(), self.births)

    def sign(self, topic: str, payload: bytes) -> bytes:
        if topic.endswith("/state"):  # states follow the state sequence, like the agent's
            self.births += 1
            return self.signer.sign(topic, payload, self.births)
        return self.signer.sign(topic, payload)


class Api:
    """Calls the FastAPI app in-process through ``httpx.ASGITransport``."""

    def __init__(self, app: Any, token: str | None = None) -> None:
        self.app = app
        self.token = token

    def as_(self, token: str | None) -> Api:
        return Api(self.app, token)

    def request(self, method: str, url: str, **kw: Any) -> httpx.Response:
        headers = dict(kw.pop("headers", {}) or {})
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"

        async def go() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://fleet") as client:
                return await client.request(method, url, headers=headers, **kw)

        return asyncio.run(go())

    def get(self, url: str, **kw: Any) -> httpx.Response:
        return self.request("GET", url, **kw)

    def post(self, url: str, **kw: Any) -> httpx.Response:
        return self.request("POST", url, **kw)

    def put(self, url: str, **kw: Any) -> httpx.Response:
        return self.request("PUT", url, **kw)


class SimDevice:
    """A protocol-speaking device on any :class:`Transport`."""

    def __init__(
        self,
        device_id: str,
        transport: Transport,
        trust: TrustStore,
        *,
        profile: str = "host",
        tags: tuple[str, ...] = (),
        prefix: str = "edgefleet",
        model: ModelRef | None = None,
        fail_install: bool = False,
        fail_versions: frozenset[str] = frozenset(),
        silent: bool = False,
        drop_chunks: frozenset[int] = frozenset(),
        http: Callable[[str, dict[str, str]], bytes] | None = None,
        http_cut: int | None = None,
        enrol_token: str | None = TEST_ENROL_TOKEN,
        command_trust: TrustStore | None = None,
    ) -> None:
        self.device_id = device_id
        self.command_trust = command_trust or TrustStore.from_keys([COMMAND_KEY.public])
        self.topics = Topics(prefix)
        # Like the agent: an own key signs every message; the birth proves the token.
        self.key = KeyPair.generate()
        self.signer = DeviceSigner(device_id, self.key, boot=1)
        own = f"{prefix}/devices/{device_id}/"
        self.t = SigningTransport(transport, self.signer, lambda t: t.startswith(own))
        self.kex = X25519PrivateKey.generate()  # MAC key agreement, as the agent does
        self.proof = None
        if enrol_token:
            self.proof = enrol_proof(token_hash(enrol_token), device_id, self.key.key_id)
        self._births = 0
        self.trust = trust  # bundle keys
        self.profile = profile
        self.tags = list(tags)
        self.model = model
        self.previous: list[ModelRef] = []
        self.fail_install = fail_install
        self.fail_versions = fail_versions
        self.silent = silent  # receives commands, never answers (a hung device)
        self.drop_chunks = set(drop_chunks)
        self.http = http
        self.http_cut = http_cut
        self.commands: list[Command] = []
        self.statuses: list[CommandStatus] = []
        self.chunks: dict[str, list[ArtifactChunk]] = {}
        self.chunk_count = 0
        self.pending: Command | None = None
        self.http_requests: list[dict[str, str]] = []
        self._seq = 0
        self._lock = threading.RLock()
        self.channel: str | None = None  # the release channel its birth names (optional)

    # lifecycle ----------------------------------------------------------------------
    def _state(self, state: DeviceState, seq: int) -> bytes:
        return self.signer.sign(self.topics.state(self.device_id), state.to_json(), seq=seq)

    def will(self) -> Will:
        dead = DeviceState(device_id=self.device_id, online=False)
        return Will(self.topics.state(self.device_id), self._state(dead, STATE_STEP - 1), 1, True)

    def publish(self, topic: str, payload: bytes) -> None:
        """Publish a device message on this device's signing transport."""
        self.t.publish(topic, payload, qos=1)

    def start(self) -> SimDevice:
        self.t.set_handler(self.handle)
        self.t.subscribe(self.topics.cmd(self.device_id))
        self.t.subscribe(self.topics.artifact_filter(self.device_id))
        self.t.connect()
        self.t.subscribe(self.topics.kex())  # after connect: the memory broker's retained
        self.birth()
        return self

    def birth(self) -> None:
        state = DeviceState(
            device_id=self.device_id,
            online=True,
            profile=self.profile,
            tags=self.tags,
            model=self.model,
            previous=self.previous,
            agent_version="sim",
            public_key=self.signer.public_key_b64(),
            enrol_proof=self.proof,
            x25519_key=x25519_b64(self.kex.public_key()),
            channel=self.channel,
        )
        self._births += 1
        payload = self._state(state, self._births)
        self.t.publish(self.topics.state(self.device_id), payload, qos=1, retain=True)

    def stop(self) -> None:
        self.t.publish(self.topics.state(self.device_id), self.will().payload, qos=1, retain=True)
        self.t.close()

    # protocol -------------------------------------------------------------------------
    def status(self, cmd: Command, state: str, **kw: Any) -> None:
        self._seq += 1
        msg = CommandStatus(
            device_id=self.device_id,
            command_id=cmd.command_id,
            state=state,
            seq=self._seq,
            rollout_id=cmd.rollout_id,
            **kw,
        )
        self.statuses.append(msg)
        self.t.publish(self.topics.status(self.device_id), msg.to_json(), qos=1)

    def on_kex(self, payload: bytes) -> None:
        """The fleet's signed X25519 key: MAC statuses from now on (like the agent)."""
        got = open_announcement(payload, self.command_trust, datetime.now(timezone.utc))
        if isinstance(got, str):
            return
        own = raw_public(self.kex.public_key())
        peer = got[1]
        k = mac_key(self.kex, peer, self.device_id, own, raw_public(peer))
        self.signer.use_mac(k, kex_id(peer))

    def handle(self, topic: str, payload: bytes) -> None:
        if topic == self.topics.kex():
            if payload:
                self.on_kex(payload)
            return
        if self.topics.parse_artifact_chunk(topic) is not None:
            if payload:  # empty: the server cleared its retained chunk
                with self._lock:
                    self.on_chunk(decode(ArtifactChunk, payload))
            return
        parsed = self.topics.parse(topic)
        if parsed is None:
            return
        with self._lock:
            if parsed.kind == "cmd":
                self.on_command(decode(Command, payload))
            elif parsed.kind == "artifact":
                self.on_chunk(decode(ArtifactChunk, payload))

    def on_command(self, cmd: Command) -> None:
        self.commands.append(cmd)
        if self.silent:
            return
        try:
            verify_command(cmd, self.command_trust)
        except EdgefleetError as exc:
            self.status(cmd, "rejected", reason="signature_invalid", detail=str(exc))
            return
        if cmd.kind == "rollback":
            if self.previous:
                self.model, self.previous = self.previous[0], self.previous[1:]
            self.status(cmd, "rolled_back", model=self.model)
            self.birth()
            return
        if cmd.kind != "deploy" or cmd.deploy is None:
            return
        self.pending = cmd
        self.status(cmd, "accepted")
        if cmd.deploy.http_url and self.http is not None:
            self.download_http(cmd)
        else:  # like the agent: the artifact's shared chunk topic while downloading
            self.t.subscribe(self.topics.artifact_chunks(cmd.deploy.bundle_sha256))
            self.try_finish()

    def on_chunk(self, c: ArtifactChunk) -> None:
        self.chunk_count += 1
        if c.index in self.drop_chunks:
            self.drop_chunks.discard(c.index)  # lost once, arrives when resent
            return
        self.chunks.setdefault(c.sha256, []).append(c)
        self.try_finish()

    def missing(self) -> list[int]:
        cmd = self.pending
        if cmd is None or cmd.deploy is None:
            return []
        _, missing = reassemble(
            self.chunks.get(cmd.deploy.bundle_sha256, []), cmd.deploy.bundle_sha256
        )
        return [i for i in missing if i < cmd.deploy.n_chunks]

    def report_missing(self) -> list[int]:
        """What a real agent does after a stall: ask for the chunks it lacks."""
        with self._lock:
            missing = self.missing()
            if self.pending is not None and missing:
                self.status(self.pending, "downloading", result={"missing": missing})
            return missing

    def try_finish(self) -> None:
        cmd = self.pending
        if cmd is None or cmd.deploy is None:
            return
        data, _ = reassemble(
            self.chunks.get(cmd.deploy.bundle_sha256, []), cmd.deploy.bundle_sha256
        )
        if data is None:
            return
        self.install(cmd, data)

    def download_http(self, cmd: Command) -> None:
        assert cmd.deploy is not None and cmd.deploy.http_url and self.http is not None
        got = b""
        while len(got) < cmd.deploy.bundle_size:
            headers = {"Range": f"bytes={len(got)}-"} if got else {}
            self.http_requests.append(headers)
            body = self.http(cmd.deploy.http_url, headers)
            if self.http_cut is not None and not got:
                body = body[: self.http_cut]  # the connection dropped mid-transfer
            got += body
        self.install(cmd, got)

    def install(self, cmd: Command, data: bytes) -> None:
        assert cmd.deploy is not None
        self.pending = None
        self.status(cmd, "verifying")
        if hashlib.sha256(data).hexdigest() != cmd.deploy.bundle_sha256:
            self.status(cmd, "failed", reason="hash_mismatch")
            return
        try:
            bundle = read_bundle(data)
            if bundle.manifest_bytes != base64.b64decode(cmd.deploy.manifest):
                raise AssertionError("manifest in the command differs from the bundle's")
            manifest = verify_bundle(bundle, self.trust)
        except EdgefleetError as exc:
            self.status(
                cmd, "rejected", reason=getattr(getattr(exc, "reason", None), "value", "internal")
            )
            return
        if self.fail_install or manifest.version in self.fail_versions:
            self.status(
                cmd, "failed", reason="smoke_test_failed", detail="smoke test output differs"
            )
            return
        new = ModelRef(name=manifest.name, version=manifest.version, release=manifest.release)
        if self.model is not None:
            self.previous = [self.model, *self.previous]
        self.model = new
        self.status(cmd, "installed", model=new)
        self.birth()


class SyncASGITransport(httpx.BaseTransport):
    """Lets a synchronous ``httpx.Client`` (the CLI's) call an ASGI app in-process."""

    def __init__(self, app: Any) -> None:
        self.inner = httpx.ASGITransport(app=app)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        async def go() -> httpx.Response:
            resp = await self.inner.handle_async_request(request)
            body = await resp.aread()
            return httpx.Response(resp.status_code, headers=resp.headers, content=body)

        return asyncio.run(go())
