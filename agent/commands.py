"""Server commands → actions and status reports. No sockets here: bytes in, statuses out.

Every command is answered on the status topic (through the outbox) with a
:class:`protocol.messages.CommandStatus`; ``reason`` is a :class:`protocol.ReasonCode` value::

    deploy      accepted → downloading (progress, or result={"missing": [...]})
                → verifying → installed | rejected(reason) | failed(reason)
    rollback    accepted → rolled_back | rejected(signature_*/key_*) | failed(reason)
    benchmark   accepted → done(result={p50_ms, p95_ms, p99_ms, …}) | failed(reason)
    config      accepted → done(result={applied}) | rejected(command_invalid)
    shadow_stop accepted → done

Rules:

- A command for another device id, without its payload, or that does not parse (when its
  ``command_id`` can still be read) is ``rejected(command_invalid)``.
- A signed command must verify against the trust store; a rollback command *must* be
  signed (an unsigned one is ``rejected(signature_invalid)``). A deploy command's manifest
  signature is checked before downloading anything (and the installer checks it again).
- Command ids are remembered in the outbox's ledger (persisted): a QoS 1 redelivery of a
  finished command re-sends its last status instead of acting twice; a redelivered deploy
  whose download is under way re-reports which chunks are still missing.
- The bundle that arrives must carry exactly the manifest the command announced.

:meth:`CommandProcessor.receive` and :meth:`CommandProcessor.on_chunk` are cheap and run on
the network thread; they return a :class:`Job` that :meth:`CommandProcessor.run` executes on
the link's worker thread (installs and benchmarks take seconds).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from protocol.bundle import read_bundle
from protocol.errors import BundleError, EdgefleetError, ProtocolError, ReasonCode, SignatureError
from protocol.manifest import canonical_bytes
from protocol.messages import (
    BenchmarkPayload,
    Command,
    CommandStatus,
    ModelRef,
    RollbackPayload,
    decode,
    verify_command,
)
from protocol.signing import TrustStore

from .download import Download, DownloadError, Downloads, fetch_http, manifest_preview
from .errors import SlotError
from .installer import model_ref
from .outbox import Outbox

log = logging.getLogger(__name__)

MAX_MISSING = 2000  # indices per status message (keeps it far under MAX_MESSAGE_BYTES)
MAX_BUNDLE_BYTES = 512 * 1024 * 1024  # protocol.bundle.MAX_MEMBER_BYTES: nothing bigger installs
TERMINAL = frozenset({"installed", "rejected", "failed", "rolled_back", "done", "timed_out"})
FAILED_NOT_REJECTED = frozenset(
    {ReasonCode.DISK_FULL, ReasonCode.INTERNAL, ReasonCode.DOWNLOAD_FAILED}
)


@dataclass(frozen=True)
class Job:
    kind: str  # install | fetch | rollback | benchmark | config | shadow_stop
    command: Command
    download: Download | None = None


class CommandProcessor:
    def __init__(
        self,
        device_id: str,
        *,
        ledger: Outbox,
        trust: TrustStore,
        downloads: Downloads,
        installer: Any,
        predictor: Any,
        report: Callable[[CommandStatus], None],
        on_model_change: Callable[[], None] = lambda: None,
        benchmark: Callable[[BenchmarkPayload], dict[str, Any]] | None = None,
        apply_config: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        stall_seconds: float = 10.0,
        http_client: Any = None,
        max_bundle_bytes: int = MAX_BUNDLE_BYTES,
    ) -> None:
        self.device_id = device_id
        self.ledger = ledger
        self.trust = trust
        self.downloads = downloads
        self.installer = installer
        self.predictor = predictor
        self.report = report
        self.on_model_change = on_model_change
        self.benchmark = benchmark
        self.apply_config = apply_config
        self.stall_seconds = stall_seconds
        self.http_client = http_client
        self.max_bundle_bytes = max_bundle_bytes
        self.duplicates = 0
        self.invalid = 0
        self._quarter: dict[str, int] = {}

    # -- status ----------------------------------------------------------------------------
    def status(
        self,
        cmd: Command,
        state: str,
        *,
        reason: ReasonCode | str | None = None,
        detail: str = "",
        progress: float | None = None,
        model: ModelRef | None = None,
        result: dict[str, Any] | None = None,
    ) -> CommandStatus:
        st = CommandStatus(
            device_id=self.device_id,
            command_id=cmd.command_id,
            state=state,  # type: ignore[arg-type]
            seq=self.ledger.next_seq("status"),
            rollout_id=cmd.rollout_id,
            reason=reason.value if isinstance(reason, ReasonCode) else reason,
            detail=detail[:500],
            progress=progress,
            model=model,
            result=result,
        )
        self.ledger.record_command(cmd.command_id, cmd.kind, state, st.to_json())
        log.info(
            "command %s %s: %s %s %s", cmd.command_id, cmd.kind, state, st.reason or "", detail
        )
        self.report(st)
        return st

    def _refuse(self, cmd: Command, exc: BundleError) -> None:
        # A transfer that went wrong is a failure (a retry may work); a bundle is rejected.
        failed = isinstance(exc, DownloadError) or exc.reason in FAILED_NOT_REJECTED
        state = "failed" if failed else "rejected"
        self.status(cmd, state, reason=exc.reason, detail=exc.message)

    # -- network thread --------------------------------------------------------------------
    def receive(self, payload: bytes) -> Job | None:
        try:
            cmd = decode(Command, payload)
        except ProtocolError as exc:
            self.invalid += 1
            self._reject_unparsable(payload, str(exc))
            return None
        if cmd.device_id != self.device_id:
            self.invalid += 1
            self.status(
                cmd,
                "rejected",
                reason=ReasonCode.COMMAND_INVALID,
                detail=f"command is for {cmd.device_id}",
            )
            return None
        seen = self.ledger.command_seen(cmd.command_id)
        if seen is not None:
            return self._redelivered(cmd, *seen)
        if cmd.kind == "rollback" or cmd.signature is not None:
            try:
                verify_command(cmd, self.trust)
            except SignatureError as exc:
                detail = (
                    f"{cmd.kind} commands must be signed" if cmd.signature is None else exc.message
                )
                self.status(cmd, "rejected", reason=exc.reason, detail=detail)
                return None
        if cmd.kind == "deploy":
            return self._accept_deploy(cmd)
        if cmd.kind == "config" and cmd.config is None:
            self.status(
                cmd,
                "rejected",
                reason=ReasonCode.COMMAND_INVALID,
                detail="config command without config",
            )
            return None
        self.status(cmd, "accepted")
        return Job(cmd.kind, cmd)

    def _reject_unparsable(self, payload: bytes, why: str) -> None:
        try:
            raw = json.loads(payload)
            cid = str(raw["command_id"])[:128]
            kind = (
                raw.get("kind")
                if raw.get("kind") in ("deploy", "rollback", "benchmark", "config", "shadow_stop")
                else "config"
            )
            if not cid or raw.get("device_id") != self.device_id:
                raise ValueError
        except (ValueError, TypeError, KeyError, AttributeError):
            log.warning("unparsable command ignored: %s", why)
            return
        cmd = Command(command_id=cid, device_id=self.device_id, kind=kind)  # type: ignore[arg-type]
        self.status(cmd, "rejected", reason=ReasonCode.COMMAND_INVALID, detail=why)

    def _redelivered(self, cmd: Command, state: str, last: bytes | None) -> Job | None:
        self.duplicates += 1
        if state in TERMINAL and last is not None:
            try:
                self.report(decode(CommandStatus, last))
            except ProtocolError:
                pass
            return None
        if cmd.kind == "deploy" and cmd.deploy is not None:
            d = self.downloads.active.get(cmd.deploy.bundle_sha256)
            if d is not None and not d.http and not d.complete:
                self._ask_missing(d)
        return None

    def _accept_deploy(self, cmd: Command) -> Job | None:
        p = cmd.deploy
        if p is None:
            self.status(
                cmd,
                "rejected",
                reason=ReasonCode.COMMAND_INVALID,
                detail="deploy command without payload",
            )
            return None
        try:
            self.trust.verify(p.manifest_bytes(), p.manifest_signature)
        except SignatureError as exc:
            self.status(cmd, "rejected", reason=exc.reason, detail=f"manifest: {exc.message}")
            return None
        except ValueError:
            self.status(
                cmd, "rejected", reason=ReasonCode.MANIFEST_INVALID, detail="manifest is not base64"
            )
            return None
        expected_chunks = -(-p.bundle_size // p.chunk_size)
        if p.bundle_size > self.max_bundle_bytes or p.n_chunks != expected_chunks:
            why = (
                f"bundle of {p.bundle_size} bytes is over the {self.max_bundle_bytes} limit"
                if p.bundle_size > self.max_bundle_bytes
                else f"n_chunks {p.n_chunks} does not match {p.bundle_size} bytes in {p.chunk_size}"
            )
            self.status(cmd, "rejected", reason=ReasonCode.COMMAND_INVALID, detail=why)
            return None
        preview = manifest_preview(p)
        self.status(cmd, "accepted", detail=f"{preview.get('name')} {preview.get('version')}")
        try:
            d = self.downloads.begin(cmd)
        except OSError as exc:
            self.status(
                cmd,
                "failed",
                reason=_os_reason(exc),
                detail=f"cannot start download: {exc.strerror}",
            )
            return None
        if d.http:
            return Job("fetch", cmd, d)
        if d.complete:
            return Job("install", cmd, d)
        if d.progress > 0:  # chunks kept from an earlier attempt: ask only for the rest
            self._ask_missing(d)
        else:  # the server is sending; asking for "everything missing" would double it
            self.status(cmd, "downloading", progress=0.0)
        return None

    def on_chunk(self, sha256: str, payload: bytes) -> Job | None:
        try:
            done = self.downloads.on_chunk(sha256, payload)
        except OSError as exc:
            d = self.downloads.active.get(sha256)
            if d is not None:
                self.status(
                    d.command,
                    "failed",
                    reason=_os_reason(exc),
                    detail=f"cannot store chunk: {exc.strerror}",
                )
                self.downloads.finish(d)
            return None
        d = self.downloads.active.get(sha256)
        if d is not None and not done:
            q = int(d.progress * 4)
            if q > self._quarter.get(sha256, 0):
                self._quarter[sha256] = q
                self.status(d.command, "downloading", progress=round(d.progress, 3))
        if done is not None:
            return Job("install", done.command, done)
        return None

    # -- periodic --------------------------------------------------------------------------
    def tick(self, now: float) -> None:
        """Ask again for the chunks of downloads that stalled for ``stall_seconds``."""
        for d in self.downloads.stalled(now, self.stall_seconds):
            d.last_activity = now
            self._ask_missing(d)

    def resume(self) -> list[Job]:
        """After a restart: continue interrupted downloads (report what is missing)."""
        jobs = []
        for d in self.downloads.resume():
            if d.http:
                jobs.append(Job("fetch", d.command, d))
            elif d.complete:
                jobs.append(Job("install", d.command, d))
            else:
                self._ask_missing(d)
        return jobs

    def _ask_missing(self, d: Download) -> None:
        missing = d.missing()
        self.status(
            d.command,
            "downloading",
            progress=round(d.progress, 3),
            detail=f"resuming: {len(missing)} of {d.payload.n_chunks} chunks missing",
            result={"missing": missing[:MAX_MISSING]},
        )

    # -- worker thread ---------------------------------------------------------------------
    def run(self, job: Job) -> None:
        cmd = job.command
        try:
            if job.kind == "fetch":
                assert job.download is not None
                self._fetch(cmd, job.download)
            elif job.kind == "install":
                assert job.download is not None
                self._install(cmd, job.download)
            elif job.kind == "rollback":
                self._rollback(cmd)
            elif job.kind == "benchmark":
                self._benchmark(cmd)
            elif job.kind == "config":
                self._config(cmd)
            elif job.kind == "shadow_stop":
                self.predictor.set_shadow(None, None)
                self.status(cmd, "done", detail="shadow model stopped")
                self.on_model_change()
            else:
                self.status(
                    cmd,
                    "rejected",
                    reason=ReasonCode.COMMAND_INVALID,
                    detail=f"unknown job {job.kind}",
                )
        except Exception as exc:  # the worker must survive anything a command does
            log.exception("command %s failed", cmd.command_id)
            self.status(
                cmd, "failed", reason=ReasonCode.INTERNAL, detail=f"{type(exc).__name__}: {exc}"
            )

    def _fetch(self, cmd: Command, d: Download) -> None:
        self.status(cmd, "downloading", progress=0.0, detail=f"GET {d.payload.http_url}")
        last = [0]

        def progress(share: float) -> None:
            q = int(share * 4)
            if 0 < q < 4 and q > last[0]:
                last[0] = q
                self.status(cmd, "downloading", progress=round(share, 3))

        try:
            fetch_http(d, client=self.http_client, on_progress=progress)
        except DownloadError as exc:
            self._refuse(cmd, exc)
            if exc.reason == ReasonCode.HASH_MISMATCH:
                self.downloads.finish(d)
            return
        self._install(cmd, d)

    def _install(self, cmd: Command, d: Download) -> None:
        p = d.payload
        self.status(cmd, "verifying", progress=1.0)
        try:
            data = d.assemble()
            if read_bundle(data).manifest_bytes != p.manifest_bytes():
                raise BundleError(
                    ReasonCode.MANIFEST_INVALID, "bundle manifest differs from the deploy command's"
                )
            active = self.installer.active()
            if (
                not p.shadow
                and active is not None
                and canonical_bytes(active) == p.manifest_bytes()
            ):
                # Installed before a crash cut the report short: do not install twice.
                manifest = active
            else:
                manifest = self.installer.install_bytes(data, activate=not p.shadow)
            if p.shadow:
                self.predictor.set_shadow(manifest, read_bundle(data).model_bytes())
        except BundleError as exc:
            self._refuse(cmd, exc)
            self.downloads.finish(d)
            return
        self.downloads.finish(d)
        self._quarter.pop(d.sha256, None)
        self.status(
            cmd,
            "installed",
            model=model_ref(manifest),
            detail=("shadow " if p.shadow else "") + f"{manifest.name} {manifest.version}",
            result={"shadow": True} if p.shadow else None,
        )
        self.on_model_change()

    def _rollback(self, cmd: Command) -> None:
        payload = cmd.rollback or RollbackPayload()
        try:
            manifest = self.installer.rollback(payload.to_release)
        except SlotError as exc:
            self.status(cmd, "failed", reason=ReasonCode.INTERNAL, detail=str(exc))
            return
        except BundleError as exc:
            self.status(cmd, "failed", reason=exc.reason, detail=exc.message)
            return
        self.status(cmd, "rolled_back", model=model_ref(manifest), detail=payload.reason)
        self.on_model_change()

    def _benchmark(self, cmd: Command) -> None:
        if self.benchmark is None:
            self.status(
                cmd, "rejected", reason=ReasonCode.COMMAND_INVALID, detail="benchmarks are disabled"
            )
            return
        try:
            result = self.benchmark(cmd.benchmark or BenchmarkPayload())
        except EdgefleetError as exc:
            reason = exc.reason if isinstance(exc, BundleError) else ReasonCode.INTERNAL
            self.status(cmd, "failed", reason=reason, detail=str(exc))
            return
        self.status(cmd, "done", result=result, detail=f"{result.get('runs')} runs")

    def _config(self, cmd: Command) -> None:
        if self.apply_config is None:
            self.status(
                cmd,
                "rejected",
                reason=ReasonCode.COMMAND_INVALID,
                detail="remote config is disabled",
            )
            return
        try:
            applied = self.apply_config(cmd.config or {})
        except ValueError as exc:
            self.status(cmd, "rejected", reason=ReasonCode.COMMAND_INVALID, detail=str(exc))
            return
        self.status(cmd, "done", result={"applied": applied})


def _os_reason(exc: OSError) -> ReasonCode:
    import errno

    return (
        ReasonCode.DISK_FULL if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ReasonCode.INTERNAL
    )
