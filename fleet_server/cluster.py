"""Several ``fleet serve`` processes on one PostgreSQL registry.

Every process serves the API and the dashboard (tokens, users, revoked sessions and the
session key live in the registry) and takes device births and telemetry. Command statuses
only reach a process once it has held the tick lease: it subscribes to them when it
first takes the lease and keeps the subscription (on a broker without shared
subscriptions, checking every status twice was most of a follower's CPU), so a follower's
``/metrics`` counts no statuses and field-benchmark results are kept by the holder. What
each one does besides:

* **The rollout tick** runs in exactly one process, the holder of the tick lease
  (:mod:`.tick_lease`, a PostgreSQL advisory lock). Only the holder changes rollouts: it
  applies device status reports to the engine, runs the tick, and carries out operator
  actions. A process without the lease (a *follower*) hands an action (start, pause, resume,
  abort, rollback) to the holder through the ``rollout_actions`` table and waits for its
  answer; it creates rollouts itself (a new id, nobody else writes it), and it re-reads
  the rollouts it shows from the registry when it shows them (it marks the changed ones
  every ``POLL_S``, 0.25 s, the holder reading new rollouts and actions as often).
* **A takeover resumes from the registry.** The new holder waits until the broker has
  acknowledged its status subscription (at most 15 s), loads every live rollout and
  sends each device that was sent a command but has not answered with a final state the
  *same* command again: the command id is ``(rollout, device, kind, attempt)`` and the
  attempt counter is persisted, so a device that already carried the command out finds
  the id in its ledger and answers with the status it recorded (installed, failed…), and
  never installs twice; one that never got it (the old holder died between deciding and
  publishing) installs it now. A replayed command the device refuses unadmitted decides
  nothing (``CommandStatus.admitted``), so a refusal is never read as a failure. Device
  version history is written by the holder only; a new holder adds a row for each device
  whose newest history row is not the model it reports (changes seen while nobody held it).
* **Telemetry ingest.** With ``broker.mqtt5`` and ``broker.shared_group`` the broker splits
  telemetry over the processes (``$share/<group>/…``, MQTT 5 shared subscriptions:
  Mosquitto, EMQX, HiveMQ). Without (amqtt, NATS: MQTT 3.1.1) every process takes every
  report. Either way the registry merges a report once: metrics are unique on
  (device, seq), and a sketch report is merged in one transaction that first inserts its
  (device, model, version, window, seq) key and does nothing when the key exists
  (:meth:`.drift_store_pg.PgDriftStore.merge_report`).
* **Device identities** (approvals, revocations) made through one process reach the others
  within ``cluster.heartbeat_s``: each re-reads them from the registry with its heartbeat.
* **A dead process's share.** Every process writes a heartbeat row (``fleet_processes``)
  every ``cluster.heartbeat_s``. Its MQTT session is persistent (3.1.1 clean session off;
  MQTT 5 with a session expiry), so what the broker had queued or in flight for it when it
  died stays in that session. A survivor that finds a heartbeat older than
  ``cluster.dead_after_s`` claims the row, connects with the dead process's client id
  (the broker hands it the session and its queued messages), feeds them to its own bridge
  until they stop, unsubscribes (a shared subscription's share goes to the live members),
  and ends the session with a clean connect. Nothing the broker accepted is lost; a report
  that both processes took is merged once.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from protocol.states import DEVICE_UNSETTLED, ROLLOUT_LOADED

from .errors import Conflict, FleetError, InvalidInput, NotFound, Unavailable
from .rollout_driver import Back
from .rollout_engine import Rollout
from .tick_lease import TickLease

if TYPE_CHECKING:
    from protocol.transport import Transport

    from .service import FleetService

log = logging.getLogger(__name__)

LIVE_STATES = sorted(ROLLOUT_LOADED)
_ERRORS: dict[int, type[FleetError]] = {404: NotFound, 409: Conflict, 422: InvalidInput}
ACTION_TIMEOUT_S = 15.0
STATUSES_WAIT_S = 15.0  # a takeover waits at most this for its status subscription's SUBACK
# How often a process reads what the others wrote for the tick (rollouts created elsewhere,
# forwarded actions; a follower: rollouts the holder changed). Status reports wake the tick
# many times a second during a rollout; these reads need not follow it.
POLL_S = 0.25
# (client id, clean session) → a transport to the broker; set by fleet serve
TransportFactory = Callable[[str, bool], "Transport"]


class Cluster:
    """The processes' shared work, driven from the service's tick thread (:meth:`step`)."""

    def __init__(self, service: FleetService, clock: Callable[[], float] = time.time) -> None:
        cfg = service.config
        self.service = service
        self.clock = clock
        self.cfg = cfg.cluster
        self.multi = cfg.registry.url is not None
        self.process_id = cfg.broker.client_id
        self.api_url = cfg.api.public_url or f"http://{cfg.api.host}:{cfg.api.port}"
        self.lease = TickLease(
            cfg.registry.url, retry_s=self.cfg.lease_retry_s, on_change=self._lease_changed
        )
        self.transport_factory: TransportFactory | None = None
        self.started_at = clock()
        self.takeovers = 0
        self.adopted: dict[str, int] = {}  # dead process id → messages taken from its session
        self._takeover = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = False
        self._polled = float("-inf")  # time.monotonic() of the last registry poll

    @property
    def leads(self) -> bool:
        """True in the process that runs the rollout tick (always with SQLite, and in a
        service that was never started: a test or a tool acting on the registry itself)."""
        return self.lease.held or not self._started

    # lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        self._started = True
        self.lease.start()
        if self.multi:
            self._stop.clear()
            self._beat()
            self._thread = threading.Thread(target=self._run, name="fleet-cluster", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(15)
            self._thread = None
        self.lease.stop()
        self._started = False
        if self.multi:
            try:
                self._beat()  # leader = 0 from now on
            except FleetError:
                pass

    def _lease_changed(self, held: bool) -> None:
        if held and self.multi:
            bridge = self.service.bridge
            if bridge is not None:  # kept after the tick moves on: a later takeover is ready
                bridge.take_statuses()
            self._takeover.set()
        self.service.rollouts.wake.set()
        if self.multi and self._started:
            try:
                self._beat()  # tell the other processes at once who runs the tick
            except FleetError:
                pass

    # the tick thread ----------------------------------------------------------------------
    def step(self) -> None:
        """One tick period: the holder ticks, a follower refreshes what it shows."""
        svc = self.service
        poll = time.monotonic() - self._polled >= POLL_S
        if poll:
            self._polled = time.monotonic()
        if not self.leads:
            if poll:
                self.follow()
            return
        if self._takeover.is_set():
            self._takeover.clear()
            self.take_over()
        if self.multi and poll:
            self._load_new_rollouts()
            self._run_actions()
        svc.tick()

    def take_over(self) -> None:
        """Resume every live rollout from the registry; resend unanswered commands once the
        broker acknowledged this process's status subscription (a follower takes none), so
        the answers to them reach it."""
        svc = self.service
        bridge = svc.bridge
        if bridge is not None and svc.transport is not None:
            deadline = time.monotonic() + STATUSES_WAIT_S
            while not bridge.statuses_ready() and time.monotonic() < deadline:
                time.sleep(0.05)
            if not bridge.statuses_ready():
                log.warning(
                    "status subscription not acknowledged after %.0f s; resending anyway",
                    STATUSES_WAIT_S,
                )
        with svc.rollouts.lock:
            svc.rollouts.live = svc.rollouts.load_live()
            svc.rollouts.stale.clear()
            # an offline device gets its command when it comes back (its birth)
            online = dict.fromkeys(svc.registry.online(), Back(None, math.inf))
            resent = len(
                svc.rollouts.resend_unanswered(
                    online, "resent after a takeover", deploy_states=DEVICE_UNSETTLED
                )
            )
        added = self._fill_history()
        self.takeovers += 1
        svc.audit_log.event(
            "cluster",
            f"{self.process_id} runs the rollout tick now; {resent} unanswered commands "
            f"resent, {added} version changes seen meanwhile recorded",
        )
        log.info("took over the rollout tick (%d commands resent)", resent)

    def _fill_history(self) -> int:
        """Version changes devices reported while no process held the tick (only the holder
        writes device history): one row for each device whose newest row is not its model."""
        svc = self.service
        last = svc.repo.latest_history()
        now, added = self.clock(), 0
        devices = [dict(d, device_id=i) for i, d in svc.registry.rows().items()]
        for d in devices:
            model = (d.get("model"), d.get("version"))
            if all(model) and last.get(d["device_id"]) != model:
                svc.repo.add_device_history(
                    d["device_id"], now, d["model"], d["version"], int(d.get("release") or 0)
                )
                added += 1
        return added

    def _load_new_rollouts(self) -> None:
        """Rollouts another process created since the last tick."""
        svc = self.service
        rows = svc.repo.list_rollouts(LIVE_STATES)
        with svc.rollouts.lock:
            svc.rollouts.refresh_stale()  # read while following, not yet shown
            for row in rows:
                if row["rollout_id"] not in svc.rollouts.live:
                    full = svc.repo.get_rollout(row["rollout_id"])
                    if full is not None:
                        svc.rollouts.live[row["rollout_id"]] = Rollout.from_dict(full["doc"])

    def follow(self) -> None:
        """A follower shows what the holder wrote: changed live rollouts are marked stale,
        and re-read when the API or the dashboard next shows them
        (:meth:`.rollout_driver.RolloutDriver.refresh_stale`), not on every tick period."""
        svc = self.service
        if not self.multi:
            return
        try:
            rows = {r["rollout_id"]: r for r in svc.repo.list_rollouts(LIVE_STATES)}
        except FleetError as exc:
            log.warning("could not refresh rollouts: %s", exc)
            return
        with svc.rollouts.lock:
            for rid in [rid for rid in svc.rollouts.live if rid not in rows]:
                del svc.rollouts.live[rid]  # ended: read from the registry when asked
            svc.rollouts.stale &= set(rows)
            for rid, row in rows.items():
                cur = svc.rollouts.live.get(rid)
                if cur is None:  # new: read now (its spec is what status reports need)
                    full = svc.repo.get_rollout(rid)
                    if full is not None:
                        svc.rollouts.live[rid] = Rollout.from_dict(full["doc"])
                elif cur.updated_at != row["updated_at"] or cur.state != row["state"]:
                    svc.rollouts.stale.add(rid)

    # operator actions ---------------------------------------------------------------------
    def forward(self, rollout_id: str, action: str, actor: str) -> None:
        """Hand an action to the tick holder and wait for its answer (raises its error)."""
        repo = self.service.repo
        if repo.get_rollout(rollout_id) is None:
            raise NotFound(f"unknown rollout {rollout_id!r}", field="rollout_id")
        aid = repo.add_rollout_action(rollout_id, action, actor, self.clock())
        self.service.rollouts.wake.set()
        deadline = time.monotonic() + ACTION_TIMEOUT_S
        row = repo.get_rollout_action(aid)
        while row is not None and row["done_at"] is None and time.monotonic() < deadline:
            time.sleep(0.05)
            row = repo.get_rollout_action(aid)
        if row is None or row["done_at"] is None:
            repo.finish_rollout_action(aid, self.clock(), "no process took it", 503)
            raise Unavailable(
                f"no fleet server process runs the rollout tick; {action} was not applied",
                field="rollout_id",
            )
        if row["error"]:
            raise _ERRORS.get(int(row["status"] or 400), InvalidInput)(
                row["error"], field="rollout_id"
            )
        full = repo.get_rollout(rollout_id)
        if full is not None:
            with self.service.rollouts.lock:
                self.service.rollouts.live[rollout_id] = Rollout.from_dict(full["doc"])
                self.service.rollouts.stale.discard(rollout_id)

    def _run_actions(self) -> None:
        svc = self.service
        acts: dict[str, Callable[[str, str], Any]] = {
            "start": svc.start_rollout,
            "pause": svc.pause_rollout,
            "resume": svc.resume_rollout,
            "abort": svc.abort_rollout,
            "rollback": svc.rollback_rollout,
        }
        for row in svc.repo.pending_rollout_actions():
            error, status = "", 200
            fn = acts.get(row["action"])
            try:
                if fn is None:
                    raise InvalidInput(f"unknown action {row['action']!r}", field="action")
                fn(row["rollout_id"], row["actor"])
            except FleetError as exc:
                error, status = str(exc), exc.status_code
            svc.repo.finish_rollout_action(int(row["id"]), self.clock(), error, status)

    # heartbeats and dead processes ----------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(self.cfg.heartbeat_s):
            try:
                self._beat()
                self.service.devices.refresh()  # approvals and revocations made elsewhere
                if self.cfg.adopt_sessions and self.transport_factory is not None:
                    self._adopt_dead()
            except FleetError as exc:
                log.warning("cluster heartbeat failed: %s", exc)

    def _beat(self) -> None:
        self.service.repo.heartbeat(
            {
                "process_id": self.process_id,
                "client_id": self.process_id,
                "api_url": self.api_url,
                "started_at": self.started_at,
                "heartbeat_at": self.clock(),
                "leader": int(self.lease.held),
                "adopted_by": None,
            }
        )

    def _adopt_dead(self) -> None:
        now = self.clock()
        for row in self.service.repo.list_processes():
            if row["process_id"] == self.process_id or row["adopted_by"]:
                continue
            if now - float(row["heartbeat_at"] or 0) < self.cfg.dead_after_s:
                continue
            if self.service.repo.claim_process(row["process_id"], self.process_id):
                threading.Thread(
                    target=self._adopt, args=(row,), name="fleet-adopt", daemon=True
                ).start()

    def _adopt(self, row: dict[str, Any]) -> None:
        """Drain a dead process's MQTT session through our bridge, then end it."""
        svc = self.service
        factory, bridge = self.transport_factory, svc.bridge
        if factory is None or bridge is None:
            return
        pid, client_id = row["process_id"], row["client_id"]
        got: list[Any] = [0, time.monotonic()]

        def handle(topic: str, payload: bytes) -> None:
            got[0] += 1
            got[1] = time.monotonic()
            bridge.handle(topic, payload)

        try:
            t = factory(client_id, False)
            t.set_handler(handle)
            t.connect()
            _wait_quiet(got, quiet_s=2.0, limit_s=60.0)
            for f in bridge.filters():
                t.unsubscribe(f)  # its share of a shared subscription goes to live members
            _wait_quiet(got, quiet_s=1.0, limit_s=30.0)
            t.close()
            alive = [
                p
                for p in svc.repo.list_processes()
                if p["process_id"] == pid
                and self.clock() - float(p["heartbeat_at"] or 0) < self.cfg.dead_after_s
            ]
            if not alive:  # it did not come back meanwhile: end its session
                wipe = factory(client_id, True)
                wipe.connect()
                wipe.close()
                svc.repo.delete_process(pid)
        except Exception as exc:  # the next heartbeat of a live process clears the claim
            log.warning("could not adopt the MQTT session of %s: %s", pid, exc)
            return
        self.adopted[pid] = int(got[0])
        svc.audit_log.event("cluster", f"took {got[0]} queued messages from {pid}'s MQTT session")

    # views ------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """This process, whether it runs the tick, and (PostgreSQL) every live process."""
        out: dict[str, Any] = {
            "process_id": self.process_id,
            "tick": self.lease.held,
            "takeovers": self.takeovers,
            "adopted": dict(self.adopted),
            "processes": [],
            "leader": self.process_id if self.lease.held else None,
        }
        if self.multi:
            now = self.clock()
            for p in self.service.repo.list_processes():
                live = now - float(p["heartbeat_at"] or 0) < self.cfg.dead_after_s
                out["processes"].append(
                    {
                        "process_id": p["process_id"],
                        "api_url": p["api_url"],
                        "heartbeat_at": p["heartbeat_at"],
                        "live": live,
                        "tick": bool(p["leader"]) and live,
                    }
                )
                if p["leader"] and live and out["leader"] is None:
                    out["leader"] = p["process_id"]
        return out


def _wait_quiet(got: list[Any], *, quiet_s: float, limit_s: float) -> None:
    start = time.monotonic()
    got[1] = max(got[1], start)
    while time.monotonic() - got[1] < quiet_s and time.monotonic() - start < limit_s:
        time.sleep(0.1)
