"""Getting a bundle to a device: the signed deploy command and the artifact bytes.

The deploy command carries the bundle's signed manifest (canonical bytes, base64, plus the
bundle's signature) and how to fetch the bundle: its sha256, size and chunking, and the
HTTP URL when the server offers the download. The bytes travel as :class:`ArtifactChunk`
messages (QoS 1) on ``{p}/devices/{id}/artifact/{sha256}/{index}``, each with its own
sha256. Transfers resume: a device reports ``downloading`` with ``result.missing`` and
only those chunks are sent again.

Every command, of every kind, is signed with the fleet's *command* key (never a bundle key),
or MAC'd with the key its device agreed with that key (:mod:`.command_signing`), and
stamped with ``issued_at``/``expires_at`` (``signing.command_ttl_s``, rollbacks
``signing.rollback_ttl_s``); a retry is a new command id, signed again. A deploy's payload
(manifest, chunking, chunk hashes, URL) and its sha256 are built once per bundle and
delivery (:func:`deploy_payload`), not once per device. A rollback names the
exact model the device ran before the rollout (``RollbackPayload.target``).
"""

from __future__ import annotations

import base64
import hashlib
import math
import threading
from collections import OrderedDict
from collections.abc import Iterable
from datetime import datetime
from typing import Any, Union

from protocol.bundle import Bundle
from protocol.messages import (
    MAX_CHUNKS,
    ArtifactChunk,
    Command,
    DeployPayload,
    ModelRef,
    RollbackPayload,
    chunk_hashes,
    command_payload_sha256,
    sign_command,
)
from protocol.signing import KeyPair
from protocol.topics import Topics
from protocol.transport import Transport

from .command_signing import CommandSigner

Key = Union[KeyPair, CommandSigner, None]
_PAYLOADS: OrderedDict[tuple[Any, ...], tuple[bytes, DeployPayload, str]] = OrderedDict()
_PAYLOADS_MAX = 4  # entries hold their bundle's bytes
_PAYLOADS_LOCK = threading.Lock()


def command_id(rollout_id: str, device_id: str, kind: str, attempt: int = 1) -> str:
    """Structured so a status report routes back without a lookup table."""
    return f"{rollout_id}:{device_id}:{kind}:{attempt}"


def parse_command_id(cid: str) -> tuple[str, str, str, int] | None:
    parts = cid.split(":")
    if len(parts) != 4 or not parts[3].isdigit():
        return None
    return parts[0], parts[1], parts[2], int(parts[3])


def n_chunks(size: int, chunk_size: int) -> int:
    return max(1, math.ceil(size / chunk_size))


def chunk_size_for(size: int, configured: int) -> int:
    """The configured chunk size, grown (in KiB steps) when a bundle would otherwise need
    more than the protocol's :data:`~protocol.messages.MAX_CHUNKS` chunks."""
    floor = -(-size // MAX_CHUNKS)
    return max(configured, -(-floor // 1024) * 1024)


def chunk(data: bytes, index: int, chunk_size: int, sha256: str | None = None) -> ArtifactChunk:
    count = n_chunks(len(data), chunk_size)
    if not 0 <= index < count:
        raise IndexError(f"chunk {index} of {count}")
    piece = data[index * chunk_size : (index + 1) * chunk_size]
    return ArtifactChunk(
        sha256=sha256 or hashlib.sha256(data).hexdigest(),
        index=index,
        count=count,
        chunk_sha256=hashlib.sha256(piece).hexdigest(),
        data=base64.b64encode(piece).decode(),
    )


def deploy_payload(
    bundle: Bundle,
    data: bytes,
    *,
    chunk_size: int,
    http_url: str | None = None,
    replace_model: bool = False,
) -> tuple[DeployPayload, str]:
    """A deploy's payload and the sha256 its signature covers, built once per bundle object,
    chunking, URL and ``replace_model`` (kept for the last few), then shared by every device."""
    key = (id(data), len(data), chunk_size, http_url, replace_model, bundle.signature.key_id)
    with _PAYLOADS_LOCK:
        hit = _PAYLOADS.get(key)
        if hit is not None and hit[0] is data:
            _PAYLOADS.move_to_end(key)
            return hit[1], hit[2]
    size = chunk_size_for(len(data), chunk_size)
    payload = DeployPayload(
        manifest=base64.b64encode(bundle.manifest_bytes).decode(),
        manifest_signature=bundle.signature,
        bundle_sha256=hashlib.sha256(data).hexdigest(),
        bundle_size=len(data),
        chunk_size=size,
        n_chunks=n_chunks(len(data), size),
        http_url=http_url,
        replace_model=replace_model,
        chunk_hashes=chunk_hashes(data, size),
    )
    template = Command(command_id="x", device_id="x", kind="deploy", deploy=payload)
    digest = command_payload_sha256(template)
    with _PAYLOADS_LOCK:
        _PAYLOADS[key] = (data, payload, digest)
        while len(_PAYLOADS) > _PAYLOADS_MAX:
            _PAYLOADS.popitem(last=False)
    return payload, digest


def deploy_command(
    bundle: Bundle,
    data: bytes,
    *,
    device_id: str,
    rollout_id: str,
    cid: str,
    chunk_size: int,
    key: Key,
    http_url: str | None = None,
    replace_model: bool = False,
    now: datetime | None = None,
    ttl_s: float = 86_400.0,
) -> Command:
    payload, digest = deploy_payload(
        bundle, data, chunk_size=chunk_size, http_url=http_url, replace_model=replace_model
    )
    cmd = Command(
        command_id=cid, device_id=device_id, kind="deploy", rollout_id=rollout_id, deploy=payload
    )
    return signed(cmd, key, now=now, ttl_s=ttl_s, payload_sha256=digest)


def signed(
    cmd: Command,
    key: Key,
    *,
    now: datetime | None,
    ttl_s: float,
    payload_sha256: str | None = None,
) -> Command:
    """Stamp ``issued_at``/``expires_at`` and sign with the command key (every kind), or MAC
    with the device's agreed key when ``key`` is a :class:`CommandSigner` that has one.
    ``payload_sha256``: :func:`~protocol.messages.command_payload_sha256` of ``cmd``."""
    if key is None:  # devices refuse it; the service logs that it has no command key
        return cmd
    if isinstance(key, CommandSigner):
        return key.sign(cmd, now=now, ttl_s=ttl_s, payload_sha256=payload_sha256)
    return sign_command(cmd, key, now=now, ttl_s=ttl_s, payload_sha256=payload_sha256)


def rollback_command(
    *,
    device_id: str,
    rollout_id: str,
    cid: str,
    key: Key,
    to_release: int | None = None,
    reason: str = "",
    target: dict[str, Any] | ModelRef | None = None,
    now: datetime | None = None,
    ttl_s: float = 7 * 86_400.0,
) -> Command:
    ref = ModelRef.model_validate(target) if target else None
    cmd = Command(
        command_id=cid,
        device_id=device_id,
        kind="rollback",
        rollout_id=rollout_id,
        rollback=RollbackPayload(target=ref, to_release=to_release, reason=reason[:500]),
    )
    return signed(cmd, key, now=now, ttl_s=ttl_s)


class Sender:
    """Publishes commands and chunks through the transport seam."""

    def __init__(self, transport: Transport, topics: Topics, chunk_size: int) -> None:
        self.transport = transport
        self.topics = topics
        self.chunk_size = chunk_size
        self.chunks_sent = 0

    def command(self, cmd: Command) -> None:
        self.transport.publish(self.topics.cmd(cmd.device_id), cmd.to_json(), qos=1)

    def chunks(self, device_id: str, data: bytes, indices: Iterable[int] | None = None) -> int:
        sha = hashlib.sha256(data).hexdigest()
        size = chunk_size_for(len(data), self.chunk_size)
        count = n_chunks(len(data), size)
        wanted = range(count) if indices is None else sorted({i for i in indices if 0 <= i < count})
        sent = 0
        for i in wanted:
            msg = chunk(data, i, size, sha)
            self.transport.publish(self.topics.artifact(device_id, sha, i), msg.to_json(), qos=1)
            sent += 1
        self.chunks_sent += sent
        return sent


def reassemble(chunks: Iterable[ArtifactChunk], sha256: str) -> tuple[bytes | None, list[int]]:
    """Device-side helper (used by tests and simulated agents): bytes when complete and
    verified, else ``None`` and the missing indices. Chunks whose own hash fails are dropped."""
    got: dict[int, bytes] = {}
    count = 0
    for c in chunks:
        if c.sha256 != sha256:
            continue
        piece = c.payload()
        if hashlib.sha256(piece).hexdigest() != c.chunk_sha256:
            continue
        got[c.index] = piece
        count = c.count
    missing = [i for i in range(count) if i not in got] if count else [0]
    if missing:
        return None, missing
    data = b"".join(got[i] for i in range(count))
    if hashlib.sha256(data).hexdigest() != sha256:
        return None, list(range(count))
    return data, []
