"""Artifact reception that survives restarts: MQTT chunks, or HTTP(S) with Range resume.

Only commands :mod:`agent.update` admitted (signed, addressed, fresh, new, within caps)
get here, and ``<sha256>`` is a validated 64-hex wire value, never anything else.

MQTT: the server publishes :class:`protocol.messages.ArtifactChunk` messages once per
artifact, retained, on ``{p}/artifacts/{sha256}/{index}`` (QoS 1); the link subscribes to
``{p}/artifacts/{sha256}/+`` while the download runs (older servers' per-device topic
``{p}/devices/{id}/artifact/{sha256}/{index}`` is still read). Anyone who may publish on
the shared topic can put a chunk there, so each chunk is checked by
:func:`agent.update.check_chunk` against the signed deploy (artifact sha, count, index <
n_chunks, the exact size of that index, its own ``chunk_sha256`` and the sha256 the signed
deploy lists for that index) before it is decoded or buffered, and written to
``data_dir/downloads/<sha256>/<index>.chunk`` (temp file, fsync, rename), so a chunk on
disk is a verified chunk. ``session.json`` next to them keeps the deploy command: after a
restart the download resumes, and :meth:`Download.missing` says which indices to ask for
again (``CommandStatus(state="downloading", result={"missing": [...]})``). When every
chunk is there, :meth:`Download.assemble` joins them and checks the whole artifact's size
and sha256 against the payload.

HTTP(S) (``DeployPayload.http_url``, only on an origin the device trusts; redirects are
not followed): :func:`fetch_http` streams into
``downloads/<sha256>/bundle.part``; a restart continues with a ``Range`` request, a server
that ignores ranges (200) restarts from zero, and the result is checked the same way.

Errors: :class:`DownloadError` (a :class:`protocol.BundleError`) with ``download_failed``
or ``hash_mismatch``; httpx errors are translated here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from protocol.errors import BundleError, ProtocolError, ReasonCode
from protocol.messages import ArtifactChunk, Command, DeployPayload, decode

from .update import check_chunk, check_chunk_model, origin_of

log = logging.getLogger(__name__)

SESSION = "session.json"
HTTP_PART = "bundle.part"
MAX_MISSING_REPORTED = 2000  # indices per status message (keeps it under MAX_MESSAGE_BYTES)


class DownloadError(BundleError):
    """The artifact could not be fetched, or it does not match its sha256."""


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class Download:
    """One artifact being received, identified by the bundle's sha256."""

    def __init__(
        self, root: Path, command: Command, clock: Callable[[], float] = time.time
    ) -> None:
        if command.deploy is None:
            raise ValueError("a download needs a deploy command")
        self.command = command
        self.payload: DeployPayload = command.deploy
        self.sha256 = self.payload.bundle_sha256
        self.dir = root / self.sha256
        self.clock = clock
        self.last_activity = clock()
        self.rejected_chunks = 0
        self._have: set[int] = set()
        if self.dir.is_dir():
            for p in self.dir.glob("*.chunk"):
                try:
                    index = int(p.stem)
                except ValueError:
                    continue
                if 0 <= index < self.payload.n_chunks:
                    self._have.add(index)

    @property
    def http(self) -> bool:
        return self.payload.http_url is not None

    def persist(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.dir / SESSION, self.command.to_json())

    def add(self, chunk: ArtifactChunk) -> bool:
        """Store a chunk that verifies; False for a duplicate or a bad chunk (counted)."""
        if chunk.index in self._have:
            return False
        data, why = check_chunk_model(self.payload, chunk)
        if why:
            self.rejected_chunks += 1
            return False
        self.store(chunk.index, data)
        return True

    def store(self, index: int, data: bytes) -> None:
        """Write a chunk already checked against the signed deploy."""
        self.dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.dir / f"{index:06d}.chunk", data)
        self._have.add(index)
        self.last_activity = self.clock()

    def missing(self) -> list[int]:
        return [i for i in range(self.payload.n_chunks) if i not in self._have]

    @property
    def complete(self) -> bool:
        return len(self._have) >= self.payload.n_chunks

    @property
    def progress(self) -> float:
        n = self.payload.n_chunks
        return 1.0 if n == 0 else len(self._have) / n

    def assemble(self) -> bytes:
        """The whole artifact, checked against the payload's size and sha256."""
        if self.http:
            data = (self.dir / HTTP_PART).read_bytes()
        else:
            if not self.complete:
                raise DownloadError(
                    ReasonCode.DOWNLOAD_FAILED, f"{len(self.missing())} chunks missing"
                )
            data = b"".join(
                (self.dir / f"{i:06d}.chunk").read_bytes() for i in range(self.payload.n_chunks)
            )
        self.check(data)
        return data

    def check(self, data: bytes) -> None:
        if len(data) != self.payload.bundle_size:
            raise DownloadError(
                ReasonCode.HASH_MISMATCH,
                f"artifact is {len(data)} bytes, the command says {self.payload.bundle_size}",
            )
        if hashlib.sha256(data).hexdigest() != self.sha256:
            raise DownloadError(ReasonCode.HASH_MISMATCH, "artifact does not match its sha256")

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        self._have.clear()


class Downloads:
    """The downloads under ``root`` (``data_dir/downloads``), by artifact sha256."""

    def __init__(
        self, root: Path, clock: Callable[[], float] = time.time, max_age_s: float = 7 * 86400
    ) -> None:
        self.root = Path(root)
        self.max_age_s = max_age_s  # interrupted downloads older than this are not resumed
        self.clock = clock
        self.active: dict[str, Download] = {}
        self.unknown_chunks = 0

    def begin(self, command: Command) -> Download:
        """Start (or resume) the download a deploy command asks for."""
        assert command.deploy is not None
        sha = command.deploy.bundle_sha256
        d = self.active.get(sha)
        if d is None or d.command.command_id != command.command_id:
            d = Download(self.root, command, self.clock)
            self.active[sha] = d
        d.persist()
        return d

    def resume(self) -> list[Download]:
        """Downloads interrupted by a restart (their ``session.json`` is on disk)."""
        if not self.root.is_dir():
            return []
        out = []
        for session in sorted(self.root.glob(f"*/{SESSION}")):
            try:
                cmd = decode(Command, session.read_bytes())
            except (ProtocolError, OSError) as exc:
                log.warning(
                    "download %s: unreadable session, discarded (%s)", session.parent.name, exc
                )
                shutil.rmtree(session.parent, ignore_errors=True)
                continue
            if cmd.deploy is None or cmd.deploy.bundle_sha256 != session.parent.name:
                shutil.rmtree(session.parent, ignore_errors=True)
                continue
            if time.time() - session.stat().st_mtime > self.max_age_s:
                log.info("download %s: abandoned for too long, discarded", session.parent.name)
                shutil.rmtree(session.parent, ignore_errors=True)
                continue
            d = Download(self.root, cmd, self.clock)
            self.active[d.sha256] = d
            out.append(d)
        return out

    def on_chunk(self, sha256: str, payload: bytes, index: int | None = None) -> Download | None:
        """Check a chunk against its signed deploy, then store it; return its download
        when this chunk completed it. Nothing is decoded for an unknown artifact, nor for
        an ``index`` (named by a shared chunk topic) already stored."""
        d = self.active.get(sha256)
        if d is None or d.http:
            self.unknown_chunks += 1
            return None
        if index is not None and index in d._have:
            return None  # a retained chunk delivered again (a re-subscribe, a reconnect)
        chunk, data, _why = check_chunk(d.payload, sha256, payload)
        if chunk is None:
            d.rejected_chunks += 1
            return None
        if chunk.index in d._have:
            return None
        was_complete = d.complete
        d.store(chunk.index, data)
        if d.complete and not was_complete:
            return d
        return None

    def finish(self, d: Download) -> None:
        d.discard()
        self.active.pop(d.sha256, None)

    def stalled(self, now: float, after: float) -> list[Download]:
        return [
            d
            for d in self.active.values()
            if not d.http and not d.complete and now - d.last_activity >= after
        ]


def fetch_http(
    d: Download,
    *,
    origins: tuple[str, ...] | None = None,
    client: Any = None,
    timeout: float = 30.0,
    on_progress: Callable[[float], None] | None = None,
) -> bytes:
    """Download ``d.payload.http_url`` into ``d.dir/bundle.part`` (resuming), verify, return it.

    With ``origins``, a URL outside them is refused before a socket opens."""
    import httpx

    url = d.payload.http_url
    assert url is not None
    if origins is not None and origin_of(url) not in origins:
        raise DownloadError(ReasonCode.ORIGIN_UNTRUSTED, f"{origin_of(url)} is not trusted")
    size = d.payload.bundle_size
    d.dir.mkdir(parents=True, exist_ok=True)
    part = d.dir / HTTP_PART
    have = part.stat().st_size if part.exists() else 0
    if have > size:
        part.unlink()
        have = 0
    own = client is None
    http = client or httpx.Client(timeout=timeout, follow_redirects=False)
    try:
        if have < size:
            headers = {"Range": f"bytes={have}-"} if have else {}
            with http.stream("GET", url, headers=headers) as resp:
                if resp.status_code == 206 and have:
                    mode = "ab"
                elif resp.status_code == 200:
                    mode, have = "wb", 0
                else:
                    raise DownloadError(
                        ReasonCode.DOWNLOAD_FAILED, f"GET {url}: HTTP {resp.status_code}"
                    )
                with open(part, mode) as fh:
                    for block in resp.iter_bytes(64 * 1024):
                        if have + len(block) > size:
                            raise DownloadError(
                                ReasonCode.HASH_MISMATCH,
                                f"GET {url}: more than the {size} bytes expected",
                            )
                        fh.write(block)
                        have += len(block)
                        d.last_activity = d.clock()
                        if on_progress is not None and size:
                            on_progress(have / size)
                    fh.flush()
                    os.fsync(fh.fileno())
    except httpx.HTTPError as exc:
        raise DownloadError(
            ReasonCode.DOWNLOAD_FAILED, f"GET {url}: {type(exc).__name__}: {exc}"
        ) from None
    except OSError as exc:
        raise DownloadError(
            ReasonCode.DOWNLOAD_FAILED, f"cannot write {part}: {exc.strerror}"
        ) from None
    finally:
        if own:
            http.close()
    try:
        return d.assemble()
    except DownloadError:
        part.unlink(missing_ok=True)  # a wrong artifact is not resumed
        raise


def manifest_preview(payload: DeployPayload) -> dict[str, Any]:
    """Name/version/release from the (not yet trusted) manifest in a deploy payload."""
    try:
        data = json.loads(payload.manifest_bytes())
        return {k: data.get(k) for k in ("name", "version", "release")}
    except (ValueError, TypeError):
        return {}
