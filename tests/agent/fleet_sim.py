"""A tiny server side written with the protocol only (the fleet server is not imported).

Commands are signed by the session's command key (:data:`tests.support.keys.COMMAND_KEY`)
unless a test says otherwise; manifests by the bundle key the test passes.

Builds deploy/rollback commands and artifact chunks, and talks to a device over any
``Transport``: it collects the device's statuses and states, and resends the chunks a
``downloading`` status lists as missing. Like the fleet server it pins the public key the
device's first birth carries and checks every device message's signature against it
(:attr:`FleetSim.signature_failures` lists the topics of any that did not verify).
"""

from __future__ import annotations

import base64
import hashlib
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from protocol import KeyPair, Manifest, canonical_bytes
from protocol.device_auth import open_envelope, public_key_from_b64, verify_envelope
from protocol.messages import (
    ArtifactChunk,
    Command,
    CommandStatus,
    DeployPayload,
    DeviceState,
    MetricsReport,
    ModelRef,
    RollbackPayload,
    SketchReport,
    chunk_hashes,
    decode,
    sign_command,
)
from protocol.topics import Topics
from protocol.transport import Transport
from tests.support.keys import COMMAND_KEY


def signed(
    cmd: Command,
    key: KeyPair | None = COMMAND_KEY,
    *,
    now: datetime | None = None,
    ttl_s: float = 3600.0,
) -> Command:
    """Stamp issued_at/expires_at and sign (``key=None``: unsigned, as an attacker sends)."""
    if key is None:
        return cmd
    return sign_command(cmd, key, now=now, ttl_s=ttl_s)


def deploy_command(
    device_id: str,
    bundle: bytes,
    manifest: Manifest,
    key: KeyPair,
    *,
    command_id: str | None = None,
    chunk_size: int = 4096,
    http_url: str | None = None,
    shadow: bool = False,
    replace_model: bool = False,
    command_key: KeyPair | None = COMMAND_KEY,
    bundle_sha256: str | None = None,
) -> Command:
    """A deploy whose manifest is signed by ``key`` (a bundle key) and whose command is
    signed by ``command_key`` (the fleet's command key; ``None``: unsigned)."""
    mb = canonical_bytes(manifest)
    payload = DeployPayload(
        manifest=base64.b64encode(mb).decode(),
        manifest_signature=key.sign(mb),
        bundle_sha256=bundle_sha256 or hashlib.sha256(bundle).hexdigest(),
        bundle_size=len(bundle),
        chunk_size=chunk_size,
        n_chunks=-(-len(bundle) // chunk_size),
        http_url=http_url,
        shadow=shadow,
        replace_model=replace_model,
        chunk_hashes=chunk_hashes(bundle, chunk_size),
    )
    cmd = Command(
        command_id=command_id or uuid.uuid4().hex,
        device_id=device_id,
        kind="deploy",
        deploy=payload,
        rollout_id="ro-1",
    )
    return signed(cmd, command_key)


def rollback_command(
    device_id: str,
    key: KeyPair | None = COMMAND_KEY,
    *,
    to_release: int | None = None,
    target: ModelRef | None = None,
    command_id: str | None = None,
) -> Command:
    cmd = Command(
        command_id=command_id or uuid.uuid4().hex,
        device_id=device_id,
        kind="rollback",
        rollback=RollbackPayload(to_release=to_release, target=target, reason="test"),
    )
    return signed(cmd, key)


def command(device_id: str, kind: str, key: KeyPair | None = COMMAND_KEY, **fields: Any) -> Command:
    """Any other kind (config, benchmark, shadow_stop), signed by ``key``."""
    cmd = Command(
        command_id=fields.pop("command_id", None) or uuid.uuid4().hex,
        device_id=device_id,
        kind=kind,  # type: ignore[arg-type]
        **fields,
    )
    return signed(cmd, key)


def chunks(
    bundle: bytes, cmd: Command, indices: Iterable[int] | None = None
) -> list[ArtifactChunk]:
    p = cmd.deploy
    assert p is not None
    out = []
    for i in indices if indices is not None else range(p.n_chunks):
        data = bundle[i * p.chunk_size : (i + 1) * p.chunk_size]
        out.append(
            ArtifactChunk(
                sha256=p.bundle_sha256,
                index=i,
                count=p.n_chunks,
                chunk_sha256=hashlib.sha256(data).hexdigest(),
                data=base64.b64encode(data).decode(),
            )
        )
    return out


class FleetSim:
    """Server side of one device over a transport."""

    def __init__(self, transport: Transport, device_id: str, topics: Topics = Topics()) -> None:
        self.t = transport
        self.device_id = device_id
        self.topics = topics
        self.statuses: list[CommandStatus] = []
        self.states: list[DeviceState] = []
        self.sketches: list[SketchReport] = []
        self.metrics: list[MetricsReport] = []
        self.bundles: dict[str, tuple[bytes, Command]] = {}
        self.auto_resend = True
        self.device_key: Any = None  # pinned from the first birth
        self.signed = 0
        self.signature_failures: list[str] = []
        self._lock = threading.Lock()
        self.t.set_handler(self._on_message)
        for topic in (
            topics.status(device_id),
            topics.state(device_id),
            topics.sketch(device_id),
            topics.metrics(device_id),
        ):
            self.t.subscribe(topic, 1)

    def _check_signature(self, kind: str, topic: str, payload: bytes) -> None:
        env = open_envelope(payload)
        if kind == "state" and self.device_key is None and env is not None:
            key = decode(DeviceState, payload).public_key
            self.device_key = public_key_from_b64(key) if key else None
        ok = (
            env is not None
            and self.device_key is not None
            and verify_envelope(env, topic, self.device_key)
        )
        with self._lock:
            if ok:
                self.signed += 1
            else:
                self.signature_failures.append(topic)

    def _on_message(self, topic: str, payload: bytes) -> None:
        parsed = self.topics.parse(topic)
        if parsed is None:
            return
        if payload and parsed.kind in ("status", "state", "sketch", "metrics"):
            self._check_signature(parsed.kind, topic, payload)
        if parsed.kind == "status":
            st = decode(CommandStatus, payload)
            with self._lock:
                self.statuses.append(st)
            missing = (st.result or {}).get("missing")
            if missing and self.auto_resend and st.command_id in self.bundles:
                bundle, cmd = self.bundles[st.command_id]
                threading.Thread(
                    target=self.send_chunks, args=(bundle, cmd, missing), daemon=True
                ).start()
        elif parsed.kind == "state" and payload:
            with self._lock:
                self.states.append(decode(DeviceState, payload))
        elif parsed.kind == "sketch":
            with self._lock:
                self.sketches.append(decode(SketchReport, payload))
        elif parsed.kind == "metrics":
            with self._lock:
                self.metrics.append(decode(MetricsReport, payload))

    def send(self, cmd: Command, bundle: bytes | None = None) -> None:
        if bundle is not None:
            self.bundles[cmd.command_id] = (bundle, cmd)
        self.t.publish(self.topics.cmd(self.device_id), cmd.to_json(), qos=1).wait(5)

    def send_chunks(
        self, bundle: bytes, cmd: Command, indices: Iterable[int] | None = None
    ) -> None:
        assert cmd.deploy is not None
        for ch in chunks(bundle, cmd, indices):
            topic = self.topics.artifact(self.device_id, cmd.deploy.bundle_sha256, ch.index)
            self.t.publish(topic, ch.to_json(), qos=1).wait(5)

    def states_of(self, command_id: str) -> list[str]:
        with self._lock:
            return [s.state for s in self.statuses if s.command_id == command_id]

    def last(self, command_id: str) -> CommandStatus | None:
        with self._lock:
            found = [s for s in self.statuses if s.command_id == command_id]
        return found[-1] if found else None


def wait_for(pred: Callable[[], Any], timeout: float = 20.0, step: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(step)
    raise AssertionError(f"condition not met within {timeout}s")
