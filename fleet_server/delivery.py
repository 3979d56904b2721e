"""Getting a bundle to a device: the signed deploy command and the artifact bytes.

The deploy command carries the bundle's signed manifest (canonical bytes, base64, plus the
bundle's signature) and how to fetch the bundle: its sha256, size and chunking, and the
HTTP URL when the server offers the download. The bytes travel as :class:`ArtifactChunk`
messages (QoS 1, retained) on ``{p}/artifacts/{sha256}/{index}``, published once per
artifact however many devices receive it (:class:`Sender`); each device subscribes to
``{p}/artifacts/{sha256}/+`` while it downloads, so a device that comes late gets the
retained chunks from the broker. Transfers resume: a device reports ``downloading`` with
``result.missing`` and those chunks are published again on the artifact's topic, at most
once per interval per chunk whoever asks. Every chunk is checked by the device against the
sha256 the signed deploy lists for its index (``DeployPayload.chunk_hashes``), so a chunk
forged onto the shared topic is dropped, not stored.

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
from collections import Counter, OrderedDict
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
    """Publishes commands and artifact chunks through the transport seam.

    An artifact's chunks go out once, retained, on ``{p}/artifacts/{sha256}/{index}``
    (:meth:`artifact`), however many devices the rollout addresses; a device subscribes
    there while it downloads. Chunks devices report missing are published again
    (:meth:`republish`) at most once per ``republish_interval_s`` per (artifact, index),
    whichever and however many devices ask. :meth:`sweep` clears the retained chunks of
    artifacts no live rollout needs (empty retained payloads) once they have been idle for
    ``linger_s``. :attr:`publishes` counts chunk publishes per artifact (clears apart).
    """

    def __init__(
        self,
        transport: Transport,
        topics: Topics,
        chunk_size: int,
        *,
        republish_interval_s: float = 2.0,
        linger_s: float = 300.0,
    ) -> None:
        self.transport = transport
        self.topics = topics
        self.chunk_size = chunk_size
        self.republish_interval_s = republish_interval_s
        self.linger_s = linger_s
        self.chunks_sent = 0
        self.chunks_coalesced = 0  # asked for again within the interval: not re-published
        self.publishes: Counter[str] = Counter()  # artifact sha256 → chunk publishes
        self.cleared: Counter[str] = Counter()  # artifact sha256 → retained chunks cleared
        self._counts: dict[str, int] = {}  # published (retained) artifacts → chunk count
        self._used: dict[str, float] = {}  # published artifacts → last time a device needed it
        self._sent_at: dict[str, dict[int, float]] = {}  # artifact → index → last publish

    def command(self, cmd: Command) -> None:
        self.transport.publish(self.topics.cmd(cmd.device_id), cmd.to_json(), qos=1)

    def _publish(self, data: bytes, sha: str, indices: Iterable[int], now: float) -> int:
        size = chunk_size_for(len(data), self.chunk_size)
        count = n_chunks(len(data), size)
        sent_at = self._sent_at.setdefault(sha, {})
        sent = 0
        for i in indices:
            msg = chunk(data, i, size, sha)
            self.transport.publish(
                self.topics.artifact_chunk(sha, i), msg.to_json(), qos=1, retain=True
            )
            sent_at[i] = now
            sent += 1
        self._counts[sha] = count
        self._used[sha] = now
        self.chunks_sent += sent
        self.publishes[sha] += sent
        return sent

    def artifact(self, data: bytes, now: float, sha256: str | None = None) -> int:
        """Make the artifact's chunks available on its topic: published (retained) the first
        time, nothing while they still are. Returns the chunks published."""
        sha = sha256 or hashlib.sha256(data).hexdigest()
        if sha in self._counts:
            self._used[sha] = now
            return 0
        count = n_chunks(len(data), chunk_size_for(len(data), self.chunk_size))
        return self._publish(data, sha, range(count), now)

    def republish(
        self, data: bytes, indices: Iterable[int], now: float, sha256: str | None = None
    ) -> int:
        """Publish again the chunks devices miss, each at most once per interval."""
        sha = sha256 or hashlib.sha256(data).hexdigest()
        count = n_chunks(len(data), chunk_size_for(len(data), self.chunk_size))
        sent_at = self._sent_at.get(sha, {})
        wanted = []
        for i in sorted({i for i in indices if 0 <= i < count}):
            if now - sent_at.get(i, float("-inf")) < self.republish_interval_s:
                self.chunks_coalesced += 1
            else:
                wanted.append(i)
        return self._publish(data, sha, wanted, now) if wanted else 0

    def sweep(self, needed: Iterable[str], now: float) -> list[str]:
        """Clear the retained chunks of every published artifact not in ``needed`` and
        idle for ``linger_s``; returns the artifacts cleared."""
        keep = set(needed)
        gone = [
            sha
            for sha in self._counts
            if sha not in keep and now - self._used.get(sha, now) >= self.linger_s
        ]
        for sha in gone:
            for i in range(self._counts[sha]):
                self.transport.publish(self.topics.artifact_chunk(sha, i), b"", qos=1, retain=True)
            self.cleared[sha] += self._counts.pop(sha)
            self._used.pop(sha, None)
            self._sent_at.pop(sha, None)
        for sha in keep & self._counts.keys():
            self._used[sha] = now
        return gone

    @property
    def retained(self) -> dict[str, int]:
        """Artifacts whose chunks are retained on the broker now → their chunk count."""
        return dict(self._counts)


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
