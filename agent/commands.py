"""The driver of :mod:`agent.update`: it carries out the machine's actions, nothing more.

:class:`agent.update.Update` decides — admission (signature by a command key → addressee →
freshness → ledger → payload caps) and every status transition — without I/O. This module
does the I/O those decisions call for: it reads the ledger, writes statuses to it and the
outbox, creates download folders, stores chunks, downloads, installs, rolls back, runs
benchmarks and config changes. Every command is answered on the status topic with a
:class:`protocol.messages.CommandStatus`; ``reason`` is a :class:`protocol.ReasonCode` value::

    deploy      accepted → downloading (progress, or result={"missing": [...]})
                → verifying → installed | rejected(reason) | failed(reason)
    rollback    accepted → rolled_back | failed(version_not_installed | reason)
    benchmark   accepted → done(result={p50_ms, p95_ms, p99_ms, …}) | failed(reason)
    config      accepted → done(result={applied}) | rejected(command_invalid)
    shadow_stop accepted → done
    any kind    rejected(signature_* | key_* | not_addressed | command_expired |
                command_from_future | command_invalid)   best-effort, never stored

A refusal of an unauthenticated, misaddressed or stale command is sent straight to the
transport (``send_now``, QoS 0, rate-limited) and counted by reason in memory
(:attr:`CommandProcessor.refused`); it writes nothing to disk. A copy of a known command
(the fleet server sends an unanswered one again after a reconnect) re-sends its last
status instead of acting twice; a copy of a deploy whose download is under way
re-reports which chunks are still missing. The bundle that arrives
must carry exactly the manifest the command announced.

:meth:`CommandProcessor.receive` and :meth:`CommandProcessor.on_chunk` are cheap and run on
the network thread; they return a :class:`Job` that :meth:`CommandProcessor.run` executes on
the link's worker thread (installs and benchmarks take seconds).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from protocol.bundle import read_bundle
from protocol.errors import BundleError, EdgefleetError, ReasonCode, SignatureError
from protocol.manifest import canonical_bytes
from protocol.messages import (
    BenchmarkPayload,
    Command,
    CommandStatus,
    ModelRef,
    RollbackPayload,
    decode,
    utcnow,
    verify_command,
)
from protocol.signing import TrustStore
from protocol.states import COMMAND_FINAL

from .download import Download, DownloadError, Downloads, fetch_http
from .errors import SlotError
from .installer import model_ref
from .outbox import Outbox
from .update import (
    AskMissing,
    IllegalTransition,
    Limits,
    Redeliver,
    Refuse,
    Report,
    Run,
    Seen,
    Update,
)

log = logging.getLogger(__name__)

MAX_MISSING = 2000  # indices per status message (keeps it far under MAX_MESSAGE_BYTES)
TERMINAL = COMMAND_FINAL


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
        command_trust: TrustStore,
        downloads: Downloads,
        installer: Any,
        predictor: Any,
        report: Callable[[CommandStatus], None],
        send_now: Callable[[CommandStatus], bool] | None = None,
        on_model_change: Callable[[], None] = lambda: None,
        benchmark: Callable[[BenchmarkPayload], dict[str, Any]] | None = None,
        apply_config: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        bench_after_install: int = 0,
        stall_seconds: float = 10.0,
        http_client: Any = None,
        origins: tuple[str, ...] = (),
        limits: Limits = Limits(),
        now: Callable[[], datetime] = utcnow,
    ) -> None:
        self.device_id = device_id
        self.ledger = ledger
        self.trust = trust
        self.command_trust = command_trust
        self.downloads = downloads
        self.installer = installer
        self.predictor = predictor
        self.report = report
        self.send_now = send_now  # best-effort, unstored publishing (set by the link)
        # (sha256, True) subscribes to an artifact's shared chunk topic, (sha256, False)
        # leaves it (set by the link; None: chunks arrive on the device's own topic only)
        self.follow: Callable[[str, bool], None] | None = None
        self.on_model_change = on_model_change
        self.benchmark = benchmark
        self.apply_config = apply_config
        self.bench_after_install = bench_after_install
        self.stall_seconds = stall_seconds
        self.http_client = http_client
        self.origins = tuple(origins)
        self.now = now
        self.update = Update(device_id, command_trust, trust, self.origins, limits)

    @property
    def refused(self) -> dict[str, int]:
        """Commands refused, by reason code (in memory only)."""
        return dict(self.update.refused)

    @property
    def duplicates(self) -> int:
        return self.update.duplicates

    @property
    def invalid(self) -> int:
        return sum(self.update.refused.values()) - self.update.duplicates

    def counters(self) -> dict[str, Any]:
        return {
            "refused": self.refused,
            "refusals_unsent": self.update.refusals_unsent,
            "duplicates": self.duplicates,
            "unknown_chunks": self.downloads.unknown_chunks,
            "rejected_chunks": sum(d.rejected_chunks for d in self.downloads.active.values()),
        }

    # -- status ----------------------------------------------------------------------------
    def status(
        self,
        cmd: Command,
        state: str,
        *,
        reason: ReasonCode | None = None,
        detail: str = "",
        progress: float | None = None,
        model: ModelRef | None = None,
        result: dict[str, Any] | None = None,
    ) -> CommandStatus:
        """Move an admitted command to ``state`` (the machine checks the move) and record it."""
        r = self.update.report(
            cmd, state, reason=reason, detail=detail, progress=progress, model=model, result=result
        )
        return self._record(r)

    def _record(self, r: Report) -> CommandStatus:
        cmd = r.command
        st = CommandStatus(
            device_id=self.device_id,
            command_id=cmd.command_id,
            state=r.state,  # type: ignore[arg-type]
            seq=self.ledger.next_seq("status"),
            rollout_id=cmd.rollout_id,
            reason=r.reason.value if r.reason is not None else None,
            detail=r.detail[:500],
            progress=r.progress,
            model=r.model,
            result=r.result,
        )
        self.ledger.record_command(cmd.command_id, cmd.kind, r.state, st.to_json())
        log.info(
            "command %s %s: %s %s %s", cmd.command_id, cmd.kind, r.state, st.reason or "", r.detail
        )
        self.report(st)
        return st

    def _refuse(self, cmd: Command, exc: BundleError) -> None:
        if isinstance(exc, DownloadError) and exc.reason is not ReasonCode.ORIGIN_UNTRUSTED:
            self.status(cmd, "failed", reason=exc.reason, detail=exc.message)  # a retry may work
        else:
            self._record(self.update.refused_job(cmd, exc.reason, exc.message))

    def _send_refusal(self, ref: Refuse) -> None:
        st = CommandStatus(
            device_id=self.device_id,
            command_id=ref.command_id,
            state="rejected",
            rollout_id=ref.rollout_id,
            reason=ref.reason.value,
            detail=ref.detail,
            admitted=False,
        )
        log.warning("command %s refused: %s %s", ref.command_id[:64], ref.reason.value, ref.detail)
        sent = False
        if self.send_now is not None:
            try:
                sent = self.send_now(st)
            except Exception:  # best-effort: a refusal never fails the network thread
                sent = False
        if not sent:
            self.update.refusals_unsent += 1

    # -- network thread --------------------------------------------------------------------
    def receive(self, payload: bytes) -> Job | None:
        now = self.now()
        admitted = self.update.admit(payload, now)
        if admitted is None:
            return None
        if isinstance(admitted, Refuse):
            self._send_refusal(admitted)
            return None
        cmd = admitted
        seen = self.ledger.command_seen(cmd.command_id)
        active = None
        if cmd.deploy is not None:
            active = self.downloads.active.get(cmd.deploy.bundle_sha256)
        downloading = active is not None and not active.http and not active.complete
        job = None
        for action in self.update.decide(
            cmd, Seen(*seen) if seen is not None else None, downloading=downloading, now=now
        ):
            job = self._carry_out(action) or job
        return job

    def _carry_out(self, action: Report | Redeliver | Run | Refuse | AskMissing) -> Job | None:
        if isinstance(action, AskMissing):
            if action.command.deploy is not None:
                d = self.downloads.active.get(action.command.deploy.bundle_sha256)
                if d is not None:
                    self._ask_missing(d)
        elif isinstance(action, Report):
            self._record(action)
        elif isinstance(action, Refuse):
            self._send_refusal(action)
        elif isinstance(action, Redeliver):
            if action.last_status is not None:
                try:
                    last = decode(CommandStatus, action.last_status)
                except EdgefleetError:
                    return None
                # best-effort: a replayed command must not make the device write
                if self.send_now is None or not self.send_now(last):
                    self.update.refusals_unsent += 1
            elif action.ask_missing and action.command.deploy is not None:
                d = self.downloads.active.get(action.command.deploy.bundle_sha256)
                if d is not None:
                    self._ask_missing(d)
        elif isinstance(action, Run):
            if action.job == "download":
                return self._begin_download(action.command)
            download = None
            if action.job in ("fetch", "install") and action.command.deploy is not None:
                download = self.downloads.active.get(action.command.deploy.bundle_sha256)
            return Job(action.job, action.command, download)
        return None

    def _begin_download(self, cmd: Command) -> Job | None:
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
        job = None
        for action in self.update.download_begun(
            cmd, http=d.http, complete=d.complete, progress=d.progress
        ):
            job = self._carry_out(action) or job
        if not d.http and not d.complete:
            self._follow(d.sha256, True)  # after the report: retained chunks may arrive at once
        return job

    def _follow(self, sha256: str, on: bool) -> None:
        if self.follow is None:
            return
        try:
            self.follow(sha256, on)
        except Exception as exc:  # a chunk topic never fails a command: stalls ask again
            log.warning("artifact %s: %s its chunk topic failed: %s", sha256[:12], on, exc)

    def _finish(self, d: Download) -> None:
        self.downloads.finish(d)
        self._follow(d.sha256, False)

    def on_chunk(self, sha256: str, payload: bytes, index: int | None = None) -> Job | None:
        """A chunk from the broker (``index`` from a shared chunk topic, to skip a chunk
        already stored without decoding it)."""
        try:
            done = self.downloads.on_chunk(sha256, payload, index)
        except OSError as exc:
            d = self.downloads.active.get(sha256)
            if d is not None:
                self.status(
                    d.command,
                    "failed",
                    reason=_os_reason(exc),
                    detail=f"cannot store chunk: {exc.strerror}",
                )
                self._finish(d)
            return None
        d = done or self.downloads.active.get(sha256)
        if d is None:
            return None
        job = None
        for action in self.update.chunk_stored(d.command, d.progress, complete=done is not None):
            job = self._carry_out(action) or job
        return job

    # -- periodic --------------------------------------------------------------------------
    def tick(self, now: float) -> None:
        """Ask again for the chunks of downloads that stalled for ``stall_seconds``."""
        for d in self.downloads.stalled(now, self.stall_seconds):
            d.last_activity = now
            self._follow(d.sha256, True)  # subscribing again brings the retained chunks again
            self._ask_missing(d)

    def resume(self) -> list[Job]:
        """After a restart: continue interrupted downloads (report what is missing).

        A saved session is checked again (command and manifest signatures, caps) before it
        is used; one that fails is discarded."""
        jobs = []
        for d in self.downloads.resume():
            try:
                verify_command(d.command, self.command_trust)
                self.trust.verify(d.payload.manifest_bytes(), d.payload.manifest_signature)
                if d.command.device_id != self.device_id:
                    raise SignatureError(ReasonCode.NOT_ADDRESSED, "another device's download")
            except (BundleError, ValueError) as exc:
                log.warning("download %s: saved session refused (%s), discarded", d.sha256, exc)
                self._finish(d)
                continue
            self.update.resumed(d.command)
            if d.http:
                jobs.append(Job("fetch", d.command, d))
            elif d.complete:
                jobs.append(Job("install", d.command, d))
            else:
                self._follow(d.sha256, True)
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
            try:
                self.status(
                    cmd,
                    "failed",
                    reason=ReasonCode.INTERNAL,
                    detail=f"{type(exc).__name__}: {exc}",
                )
            except IllegalTransition:  # it had already finished
                pass

    def _fetch(self, cmd: Command, d: Download) -> None:
        self.status(cmd, "downloading", progress=0.0, detail=f"GET {d.payload.http_url}")
        last = [0]

        def progress(share: float) -> None:
            q = int(share * 4)
            if 0 < q < 4 and q > last[0]:
                last[0] = q
                self.status(cmd, "downloading", progress=round(share, 3))

        try:
            fetch_http(d, origins=self.origins, client=self.http_client, on_progress=progress)
        except DownloadError as exc:
            self._refuse(cmd, exc)
            if exc.reason == ReasonCode.HASH_MISMATCH:
                self._finish(d)
            return
        self._install(cmd, d)

    def _install(self, cmd: Command, d: Download) -> None:
        p = d.payload
        self.status(cmd, "verifying", progress=1.0)
        try:
            data = d.assemble()
            if read_bundle(data, trust=self.trust).manifest_bytes != p.manifest_bytes():
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
                manifest = self.installer.install_bytes(
                    data, activate=not p.shadow, replace_model=p.replace_model
                )
            if p.shadow:
                self.predictor.set_shadow(
                    manifest, read_bundle(data, trust=self.trust).model_bytes()
                )
        except BundleError as exc:
            self._refuse(cmd, exc)
            self._finish(d)
            return
        self._finish(d)
        result: dict[str, Any] | None = {"shadow": True} if p.shadow else None
        if not p.shadow:
            result = self._bench_installed()
        self.status(
            cmd,
            "installed",
            model=model_ref(manifest),
            detail=("shadow " if p.shadow else "") + f"{manifest.name} {manifest.version}",
            result=result,
        )
        self.on_model_change()

    def _bench_installed(self) -> dict[str, Any] | None:
        """Time the model just installed on this hardware (``runtime.bench_after_install``
        runs); the fleet server derives measured speed factors from it. A failure here never
        fails the install: the status then carries no benchmark."""
        if self.benchmark is None or self.bench_after_install <= 0:
            return None
        try:
            runs = max(self.bench_after_install, 10)
            return {"benchmark": self.benchmark(BenchmarkPayload(runs=runs))}
        except Exception as exc:  # the install stands; only the measurement is lost
            log.warning("benchmark after install failed: %s", exc)
            return None

    def _rollback(self, cmd: Command) -> None:
        payload = cmd.rollback or RollbackPayload()
        try:
            if payload.target is not None:
                manifest = self.installer.rollback_to(payload.target)
            else:
                manifest = self.installer.rollback(payload.to_release)
        except SlotError as exc:
            self.status(cmd, "failed", reason=ReasonCode.VERSION_NOT_INSTALLED, detail=str(exc))
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
