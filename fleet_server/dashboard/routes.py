"""Dashboard pages under ``/ui``: server-rendered Jinja2, a login, CSRF-safe POST forms.

    /ui/login                      GET form, POST credentials (double-submit nonce)
    /ui/                           overview: devices by profile/version/state, rollouts, alerts
    /ui/devices, /ui/devices/{id}  device list, 100 a page (next/previous links carry a
                                   cursor); version history, latency, last seen, failures
    /ui/devices/{id}/approve       POST: pin a pending device's key (operator, CSRF)
    /ui/rollouts                   50 a page (older: a cursor link) + new rollout (upload or
                                   pick a bundle → plan → confirm)
    /ui/rollouts/{id}              stages, devices, gate decisions, action buttons
    /ui/rollouts/{id}/live.json    the live part of that page (polled by static/dashboard.js)
    /ui/rollouts/{id}/confirm/{a}  the confirmation step; POST /ui/rollouts/{id}/{a} acts
    /ui/drift, /ui/drift/{m}/{v}   per feature reference vs current, KS/PSI over time, field quality
    /ui/channels, /ui/bundles/{r}  release channels and bundle lineage (:mod:`.channel_pages`)
    /ui/static/{file}              CSS and JS shipped in this package

Pages need a session (else a redirect to the login); actions need the operator role and
the session's CSRF token, and a rollout action needs ``confirm=yes`` from the confirmation
page. Only documented :class:`~fleet_server.service.FleetService` methods are called, plus
two read-only adapters for what the service keeps as attributes (:func:`_distributions`
and :func:`_field_quality`).
"""

# No ``from __future__ import annotations`` here: FastAPI reads the route signatures at
# runtime, and ``Request`` is imported inside build_router (fastapi stays a lazy import).
import math
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlparse

from protocol.states import DEVICE_FAILED, ROLLOUT_TERMINAL

from ..auth import allows
from ..errors import Conflict, FleetError, InvalidInput
from . import charts
from .session import COOKIE, LOGIN_COOKIE, Session, Sessions, csrf_ok, new_nonce, session_secret
from .throttle import LoginThrottle

HERE = Path(__file__).parent
STATIC_TYPES = {
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
}
ACTIONS = {
    "pause": ("Pause", "Stop sending the new version to more devices until you resume."),
    "resume": ("Resume", "Continue the rollout where it stopped."),
    "abort": ("Abort", "Stop the rollout for good. Devices keep what they have installed."),
    "rollback": (
        "Roll back",
        "Send signed rollback commands: every device that installed this "
        "version returns to its previous one.",
    ),
}
TERMINAL = ROLLOUT_TERMINAL
FAILED_STATES = DEVICE_FAILED
DEVICES_PER_PAGE = 100
ROLLOUTS_PER_PAGE = 50


def _ts(value: Any) -> str:
    if not value:
        return "–"
    return datetime.fromtimestamp(float(value), timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _ago(value: Any) -> str:
    if not value:
        return "never"
    s = max(0, int(time.time() - float(value)))
    if s < 60:
        return f"{s}s ago"
    if s < 3600:
        return f"{s // 60}m ago"
    if s < 86400:
        return f"{s // 3600}h ago"
    return f"{s // 86400}d ago"


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    return f"{float(value):.{digits}g}" if isinstance(value, float) else str(value)


def _pct(value: Any) -> str:
    return "–" if value is None else f"{float(value) * 100:.1f}%"


def _environment() -> Any:
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    env = Environment(
        loader=FileSystemLoader(str(HERE / "templates")),
        autoescape=select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        ts=_ts, ago=_ago, num=_num, pct=_pct, selector=_selector, stage_state=_stage_state
    )
    env.globals.update(charts=charts, actions=ACTIONS)
    return env


def _selector(spec_selector: Any) -> str:
    """A rollout spec's selector (a dict of lists) as the text an operator types."""
    from ..rollout_engine import Selector

    if isinstance(spec_selector, dict):
        return str(Selector(**{k: tuple(v) for k, v in spec_selector.items()}))
    return str(spec_selector or "(all devices)")


def _stage_state(stage: dict[str, Any]) -> str:
    """A stage with no devices passes trivially: show it as empty, not as passed."""
    if stage.get("devices") == 0 and stage.get("state") in ("passed", "running"):
        return "empty"
    return str(stage.get("state", ""))


def _safe_next(target: str | None) -> str:
    """Only local paths under /ui: never redirect a login to another site."""
    if not target:
        return "/ui/"
    u = urlparse(target)
    if u.scheme or u.netloc or not u.path.startswith("/ui"):
        return "/ui/"
    return target


def _distributions(service: Any, model: str, version: str) -> dict[str, Any]:
    """Adapter: reference vs current per feature from the service's drift engine."""
    drift = getattr(service, "drift", None)
    if drift is None:
        return {}
    return dict(drift.feature_distributions(model, version))


def _drift_config(service: Any, model: str) -> Any:
    """Adapter: the drift thresholds in force for ``model`` (for the charts' limit lines)."""
    from ..drift import DriftConfig

    drift = getattr(service, "drift", None)
    config = getattr(drift, "config", None)
    return config.for_model(model) if isinstance(config, DriftConfig) else DriftConfig()


def _field_quality(service: Any, model: str, version: str) -> dict[str, Any] | None:
    """Adapter: accuracy, error rate and p95 of one version from the service's exporter."""
    exporter = getattr(service, "exporter", None)
    if exporter is None:
        return None
    fq: dict[str, Any] = exporter.field_quality()
    return fq.get(model, {}).get(version)


def _stage_parts(stage: dict[str, Any]) -> dict[str, int]:
    return {
        "installed": stage["installed"],
        "progress": stage["in_progress"],
        "failed": stage["failed"],
        "rolled_back": stage["rolled_back"],
    }


def build_router(service: Any) -> Any:
    from fastapi import APIRouter, Request
    from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
    from starlette.concurrency import run_in_threadpool

    from ..service import RolloutRequest

    router = APIRouter(include_in_schema=False)
    env = _environment()
    shared = service.repo.shared_secret if service.cluster.multi else None
    sessions = Sessions(
        session_secret(shared),
        revoked=service.repo.session_revoked,
        revoke=service.repo.revoke_session,
    )
    throttle = LoginThrottle()

    # helpers ---------------------------------------------------------------------------
    def session_of(request: Request) -> Session | None:
        return sessions.read(request.cookies.get(COOKIE), time.time())

    def render(request: Request, template: str, status: int = 200, **ctx: Any) -> HTMLResponse:
        s = session_of(request)
        html = env.get_template(template).render(
            session=s,
            csrf=s.csrf if s else "",
            path=request.url.path,
            can_act=bool(s and allows(s.role, "operator")),
            **ctx,
        )
        return HTMLResponse(html, status_code=status, headers={"Cache-Control": "no-store"})

    def tls(request: Request) -> bool:
        """Mark cookies Secure when the page was served over HTTPS (directly or via a proxy)."""
        proto = request.headers.get("x-forwarded-proto", request.url.scheme)
        return proto == "https"

    def to_login(request: Request) -> RedirectResponse:
        nxt = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/ui/login?next={quote(nxt)}", status_code=303)

    def error(request: Request, exc: FleetError | str, status: int | None = None) -> HTMLResponse:
        if isinstance(exc, FleetError):
            msg, field, code = exc.message, exc.field, status or exc.status_code
        else:
            msg, field, code = exc, None, status or 400
        return render(request, "error.html", status=code, message=msg, field=field, code=code)

    async def acting(request: Request) -> tuple[Session | None, dict[str, str], Response | None]:
        """Session + form of a POST action, or the response refusing it."""
        s = session_of(request)
        if s is None:
            return None, {}, to_login(request)
        form = {k: str(v) for k, v in (await request.form()).items() if isinstance(v, str)}
        if not csrf_ok(s, form.get("csrf")):
            return (
                s,
                form,
                error(
                    request,
                    "the form expired or did not come from this site "
                    "(CSRF token mismatch); reload the page and try again",
                    403,
                ),
            )
        if not allows(s.role, "operator"):
            return s, form, error(request, f"this needs the operator role; you are {s.role}", 403)
        return s, form, None

    # login -----------------------------------------------------------------------------
    @router.get("/")
    def root() -> RedirectResponse:
        return RedirectResponse("/ui/", status_code=307)

    @router.get("/ui/login")
    def login_form(request: Request, next: str = "/ui/") -> HTMLResponse:
        nonce = new_nonce()
        resp = render(request, "login.html", nonce=nonce, next=_safe_next(next), failed=False)
        resp.set_cookie(
            LOGIN_COOKIE, nonce, httponly=True, samesite="strict", max_age=3600, secure=tls(request)
        )
        return resp

    @router.post("/ui/login")
    async def login(request: Request) -> Response:
        form = {k: str(v) for k, v in (await request.form()).items()}
        nonce = request.cookies.get(LOGIN_COOKIE)
        nxt = _safe_next(form.get("next"))
        if not nonce or not csrf_ok(Session("", "", nonce, 0), form.get("nonce")):
            return error(request, "the login form expired; reload it and sign in again", 403)
        user, addr = form.get("username", ""), request.client.host if request.client else "-"
        wait = throttle.wait_s(user, addr)
        if wait > 0:
            page = error(
                request,
                f"too many failed logins; try again in {math.ceil(wait)} s",
                429,
            )
            page.headers["Retry-After"] = str(math.ceil(wait))
            return page
        role = await run_in_threadpool(service.authenticate_user, user, form.get("password", ""))
        if role is None:
            throttle.failed(user, addr)
            fresh = new_nonce()
            page = render(
                request,
                "login.html",
                status=401,
                nonce=fresh,
                next=nxt,
                failed=True,
                username=form.get("username", ""),
            )
            page.set_cookie(
                LOGIN_COOKIE,
                fresh,
                httponly=True,
                samesite="strict",
                max_age=3600,
                secure=tls(request),
            )
            return page
        throttle.succeeded(user, addr)
        cookie, _ = sessions.issue(form["username"], role, time.time())
        resp = RedirectResponse(nxt, status_code=303)
        resp.set_cookie(
            COOKIE,
            cookie,
            httponly=True,
            samesite="strict",
            max_age=int(sessions.max_age_s),
            secure=tls(request),
        )
        resp.delete_cookie(LOGIN_COOKIE)
        return resp

    @router.post("/ui/logout")
    async def logout(request: Request) -> Response:
        s = session_of(request)
        form = {k: str(v) for k, v in (await request.form()).items()}
        if s is not None and not csrf_ok(s, form.get("csrf")):
            return error(request, "CSRF token mismatch", 403)
        if s is not None:
            sessions.revoke(s)  # the cookie stops working here, also if someone kept a copy
        resp = RedirectResponse("/ui/login", status_code=303)
        resp.delete_cookie(COOKIE, httponly=True, samesite="strict", secure=tls(request))
        return resp

    # static ----------------------------------------------------------------------------
    @router.get("/ui/static/{name}")
    def static(name: str) -> Response:
        path = HERE / "static" / name
        ctype = STATIC_TYPES.get(path.suffix)
        if "/" in name or name.startswith(".") or ctype is None or not path.is_file():
            return Response("not found", status_code=404, media_type="text/plain")
        return Response(
            path.read_bytes(), media_type=ctype, headers={"Cache-Control": "public, max-age=300"}
        )

    # overview and devices -------------------------------------------------------------
    @router.get("/ui/")
    def overview(request: Request) -> Response:
        if session_of(request) is None:
            return to_login(request)
        ov = service.overview()
        return render(
            request,
            "overview.html",
            ov=ov,
            rollouts=service.rollouts_page(10).items,
            bundles=service.list_bundles(),
            events=service.events(limit=15),
            health=service.measures.firing(),
            outliers=service.measures.calibration()["outliers"],
        )

    @router.get("/ui/devices")
    def devices(
        request: Request,
        profile: str = "",
        version: str = "",
        online: str = "",
        tag: str = "",
        cursor: str = "",
        before: str = "",
    ) -> Response:
        """One page of devices (by id) with next/previous links that carry a cursor."""
        if session_of(request) is None:
            return to_login(request)
        flag = {"online": True, "offline": False}.get(online)
        filters = {"profile": profile, "version": version, "online": online, "tag": tag}
        try:
            page = service.devices_page(
                DEVICES_PER_PAGE,
                cursor or None,
                profile=profile or None,
                version=version or None,
                online=flag,
                tag=tag or None,
                before=before or None,
            )
        except FleetError as exc:
            return error(request, exc)
        kept = {k: v for k, v in filters.items() if v}
        links = {
            "next": page.next_cursor and "?" + urlencode({**kept, "cursor": page.next_cursor}),
            "prev": page.prev_cursor and "?" + urlencode({**kept, "before": page.prev_cursor}),
            "first": "?" + urlencode(kept) if (cursor or before) else None,
        }
        return render(
            request,
            "devices.html",
            devices=page.items,
            links=links,
            pending=service.list_enrolments("pending"),
            filters=filters,
        )

    @router.post("/ui/devices/{device_id}/approve")
    async def approve(request: Request, device_id: str) -> Response:
        s, form, refused = await acting(request)
        if refused is not None or s is None:
            return refused or to_login(request)
        try:
            service.approve_device(
                device_id, actor=f"dashboard:{s.user}", key_id=form.get("key_id") or None
            )
        except FleetError as exc:
            return error(request, exc)
        return RedirectResponse("/ui/devices", status_code=303)

    @router.get("/ui/devices/{device_id}")
    def device(request: Request, device_id: str) -> Response:
        if session_of(request) is None:
            return to_login(request)
        try:
            d = service.get_device(device_id)
        except FleetError as exc:
            return error(request, exc)
        metrics = list(reversed(d.get("metrics") or []))
        latency = (
            charts.lines(
                {
                    "p50 ms": [m.get("p50_ms") for m in metrics],
                    "p95 ms": [m.get("p95_ms") for m in metrics],
                },
                title="latency per telemetry window",
            )
            if metrics
            else None
        )
        failures = [r for r in d.get("rollouts", []) if r["state"] in FAILED_STATES]
        measures = service.measures.device_view(device_id)
        return render(
            request, "device.html", d=d, latency=latency, failures=failures, measures=measures
        )

    # rollouts --------------------------------------------------------------------------
    @router.get("/ui/rollouts")
    def rollouts(request: Request, bundle: str = "", cursor: str = "") -> Response:
        """The new-rollout form and one page of rollouts, newest first (older: a cursor)."""
        if session_of(request) is None:
            return to_login(request)
        try:
            page = service.rollouts_page(ROLLOUTS_PER_PAGE, cursor or None)
        except FleetError as exc:
            return error(request, exc)
        links = {
            "older": page.next_cursor and "?" + urlencode({"cursor": page.next_cursor}),
            "newest": "/ui/rollouts" if cursor else None,
        }
        return render(
            request,
            "rollouts.html",
            rollouts=page.items,
            links=links,
            bundles=service.list_bundles(),
            chosen=bundle,
        )

    @router.post("/ui/bundles")
    async def upload(request: Request) -> Response:
        s = session_of(request)
        if s is None:
            return to_login(request)
        form = await request.form()
        if not csrf_ok(s, str(form.get("csrf") or "")):
            return error(request, "CSRF token mismatch; reload the page", 403)
        if not allows(s.role, "operator"):
            return error(request, f"uploading needs the operator role; you are {s.role}", 403)
        file = form.get("bundle")
        tmp = service.artifacts.temp()
        try:
            size = 0
            with open(tmp, "wb") as fh:  # the form parser spooled it; copy it in blocks
                while file is not None and not isinstance(file, str):
                    block = await file.read(1 << 20)
                    if not block:
                        break
                    size += len(block)
                    fh.write(block)
            if not size:
                return error(
                    request, InvalidInput("choose a .efb bundle file to upload", field="bundle")
                )
            info = await run_in_threadpool(service.upload_bundle, tmp, f"dashboard:{s.user}")
        except FleetError as exc:
            return error(request, exc)
        finally:
            tmp.unlink(missing_ok=True)
        return RedirectResponse(f"/ui/rollouts?bundle={info['sha256']}", status_code=303)

    def rollout_request(form: dict[str, str]) -> RolloutRequest:
        def number(name: str, cast: Any = float) -> Any:
            raw = form.get(name, "").strip()
            if not raw:
                return None
            try:
                return cast(raw)
            except ValueError:
                raise InvalidInput(f"{name} must be a number, got {raw!r}", field=name) from None

        raw_stages = form.get("stages", "").replace(" ", "")
        try:
            stages = [float(x) for x in raw_stages.split(",") if x]
        except ValueError:
            raise InvalidInput(
                f"stages must be numbers like 5,25,50,100, got {raw_stages!r}", field="stages"
            ) from None
        if not form.get("bundle"):
            raise InvalidInput("choose a bundle", field="bundle")
        return RolloutRequest(
            bundle=form["bundle"],
            selector=form.get("selector", ""),
            stages=stages or [5.0, 25.0, 50.0, 100.0],
            stage_unit=form.get("stage_unit") or "percent",
            soak_s=number("soak_s"),
            failure_threshold=number("failure_threshold"),
            min_devices=number("min_devices", int),
        )

    @router.post("/ui/rollouts/plan")
    async def plan(request: Request) -> Response:
        s, form, refused = await acting(request)
        if refused is not None:
            return refused
        try:
            req = rollout_request(form)
            planned = service.create_rollout(
                req,
                actor=f"dashboard:{s.user if s else ''}",
                dry_run=True,
                force=form.get("force") == "yes",
            )
        except FleetError as exc:
            return error(request, exc)
        return render(request, "confirm_rollout.html", plan=planned, form=form)

    @router.post("/ui/rollouts/create")
    async def create(request: Request) -> Response:
        s, form, refused = await acting(request)
        if refused is not None or s is None:
            return refused or to_login(request)
        if form.get("confirm") != "yes":
            return error(request, InvalidInput("confirm the plan first", field="confirm"))
        actor = f"dashboard:{s.user}"
        try:
            req = rollout_request(form)
            out = service.create_rollout(req, actor=actor, force=form.get("force") == "yes")
            service.start_rollout(out["rollout_id"], actor=actor)
        except FleetError as exc:
            return error(request, exc)
        return RedirectResponse(f"/ui/rollouts/{out['rollout_id']}", status_code=303)

    def live(request: Request, rollout_id: str) -> tuple[dict[str, Any], str]:
        from ..rollout_engine import allowed_actions

        st = service.rollout_status(rollout_id)
        s = session_of(request)
        html = env.get_template("rollout_live.html").render(
            r=st,
            stage_parts=_stage_parts,
            can_act=bool(s and allows(s.role, "operator")),
            applicable=allowed_actions(st["state"]),
        )
        return st, html

    @router.get("/ui/rollouts/{rollout_id}")
    def rollout(request: Request, rollout_id: str) -> Response:
        if session_of(request) is None:
            return to_login(request)
        try:
            st, live_html = live(request, rollout_id)
        except FleetError as exc:
            return error(request, exc)
        from markupsafe import Markup

        return render(request, "rollout.html", r=st, live=Markup(live_html))

    @router.get("/ui/rollouts/{rollout_id}/live.json")
    def rollout_live(request: Request, rollout_id: str) -> Response:
        if session_of(request) is None:
            return JSONResponse({"error": "AuthError", "detail": "log in again"}, status_code=401)
        try:
            st, html = live(request, rollout_id)
        except FleetError as exc:
            return JSONResponse(exc.to_dict(), status_code=exc.status_code)
        return JSONResponse(
            {
                "state": st["state"],
                "counts": st["counts"],
                "html": html,
                "terminal": st["state"] in TERMINAL,
            },
            headers={"Cache-Control": "no-store"},
        )

    @router.get("/ui/rollouts/{rollout_id}/confirm/{action}")
    def confirm(request: Request, rollout_id: str, action: str) -> Response:
        s = session_of(request)
        if s is None:
            return to_login(request)
        if action not in ACTIONS:
            return error(request, InvalidInput(f"unknown action {action!r}", field="action"), 404)
        if not allows(s.role, "operator"):
            return error(request, f"this needs the operator role; you are {s.role}", 403)
        from ..rollout_engine import allowed_actions

        try:
            st = service.rollout_status(rollout_id)
        except FleetError as exc:
            return error(request, exc)
        if action not in allowed_actions(st["state"]):
            refusal = Conflict(
                f"{ACTIONS[action][0].lower()} does not apply to a rollout that is {st['state']}",
                field="state",
            )
            return error(request, refusal, 409)
        return render(request, "confirm.html", r=st, action=action)

    @router.post("/ui/rollouts/{rollout_id}/{action}")
    async def act(request: Request, rollout_id: str, action: str) -> Response:
        if action not in ACTIONS:
            return error(request, InvalidInput(f"unknown action {action!r}", field="action"), 404)
        s, form, refused = await acting(request)
        if refused is not None or s is None:
            return refused or to_login(request)
        if form.get("confirm") != "yes":
            return error(
                request,
                InvalidInput(
                    f"{action} needs confirmation: use the button on the rollout page",
                    field="confirm",
                ),
            )
        try:
            getattr(service, f"{action}_rollout")(rollout_id, actor=f"dashboard:{s.user}")
        except FleetError as exc:
            return error(request, exc)
        return RedirectResponse(f"/ui/rollouts/{rollout_id}", status_code=303)

    # drift -----------------------------------------------------------------------------
    @router.get("/ui/drift")
    def drift_index(request: Request) -> Response:
        if session_of(request) is None:
            return to_login(request)
        latest: dict[tuple[str, str], dict[str, Any]] = {}
        for r in service.drift_results(limit=500):
            latest.setdefault((r["model"], r["version"]), r)
        pairs = {(b["name"], b["version"]) for b in service.list_bundles()} | set(latest)
        rows = [
            {
                "model": m,
                "version": v,
                "latest": latest.get((m, v)),
                "quality": _field_quality(service, m, v),
            }
            for m, v in sorted(pairs)
        ]
        scopes = service.measures.drift_by("all", evaluate=False)
        return render(request, "drift_index.html", rows=rows, scopes=scopes)

    @router.get("/ui/drift/{model}/{version}")
    def drift_page(request: Request, model: str, version: str) -> Response:
        if session_of(request) is None:
            return to_login(request)
        history = list(reversed(service.drift_results(model=model, version=version, limit=60)))
        dists = _distributions(service, model, version)
        cfg = _drift_config(service, model)
        features = []
        for name, dist in dists.items():
            if dist["kind"] == "numeric":
                edges = dist["edges"]
                labels = [_num(e, 3) for e in edges[:-1]]
            else:
                labels = list(dist["items"])
            chart = charts.paired_bars(
                labels, dist["reference"], dist["current"], title=f"{name}: reference vs current"
            )
            over_time = [{f["name"]: f for f in h["features"]}.get(name) for h in history]
            trends = []
            if history:
                stats = dist.get("stats") or {}
                keys = [("ks", "KS", stats.get("ks_critical")), ("psi", "PSI", cfg.psi_threshold)]
                if dist["kind"] != "numeric":
                    keys = [("js", "Jensen–Shannon", cfg.js_threshold)]
                for key, label, limit in keys:
                    values = [f.get(key) if f else None for f in over_time]
                    trends.append(
                        {
                            "label": f"{label} over the last {len(history)} checks",
                            "svg": charts.lines(
                                {label: values},
                                threshold=limit,
                                width=180,
                                height=80,
                                title=f"{name}: {label} over time",
                            ),
                        }
                    )
            features.append(
                {
                    "name": name,
                    "kind": dist["kind"],
                    "chart": chart,
                    "trends": trends,
                    "stats": dist.get("stats"),
                }
            )
        share = (
            charts.lines(
                {"drifted share": [h["drifted_share"] for h in history]},
                threshold=cfg.dataset_share,
                title="share of drifted features",
            )
            if history
            else None
        )
        return render(
            request,
            "drift.html",
            model=model,
            version=version,
            features=features,
            history=list(reversed(history))[:20],
            share=share,
            quality=_field_quality(service, model, version),
            cohorts=service.measures.drift_by("all", model, version),
            accuracy=service.measures.accuracy_report(model),
        )

    from .channel_pages import add_channel_pages  # /ui/channels, /ui/bundles/{ref}

    add_channel_pages(
        router,
        service,
        render=render,
        session_of=session_of,
        acting=acting,
        error=error,
        to_login=to_login,
    )
    return router
