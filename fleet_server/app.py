"""The REST API (``/v1``, OpenAPI at ``/openapi.json``) over a :class:`FleetService`.

Every route but ``/v1/health``, ``/v1/artifacts/{sha256}`` (content-addressed, fetched by
devices that hold no API token; the bytes are a signed bundle) and ``/metrics`` needs a
bearer token: viewers read, operators act, admins also manage tokens. Errors are JSON:
``{"error": ..., "detail": ..., "field": ...}`` with a 4xx status. Lists (bundles, devices,
rollouts, drift, events, audit) answer one page, ``{"items": [...], "next_cursor": ...}``
(:mod:`fleet_server.lists`). The dashboard router from
:mod:`fleet_server.dashboard` is mounted at ``/`` when that package is present.
"""

from typing import TYPE_CHECKING, Any

from .auth import require
from .errors import FleetError, InvalidInput, TooLarge
from .http_limits import MAX_UPLOAD_BYTES, BodyGuard, BodyTooLarge, too_large_detail
from .pagination import DEFAULT_LIMIT, MAX_CURSOR_CHARS, MAX_LIMIT
from .service import FleetService, RolloutRequest

if TYPE_CHECKING:
    from fastapi import FastAPI

ACTIONS = ("start", "pause", "resume", "abort", "rollback")


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """``bytes=a-b``, ``bytes=a-`` or ``bytes=-n`` → inclusive (start, end); None: 416."""
    unit, _, spec = header.partition("=")
    if unit.strip() != "bytes" or "," in spec:
        return None
    first, _, last = spec.strip().partition("-")
    try:
        if first == "":
            n = int(last)
            start, end = max(0, size - n), size - 1
        else:
            start = int(first)
            end = int(last) if last else size - 1
    except ValueError:
        return None
    end = min(end, size - 1)
    if start > end or start >= size:
        return None
    return start, end


def create_app(service: FleetService) -> "FastAPI":
    from fastapi import Body, Depends, FastAPI, Query, Request, Response
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, Field

    app = FastAPI(
        title="edgefleet fleet server",
        version="1",
        description="Bundles, devices, staged rollouts with health gates, drift, events and audit.",
    )
    app.state.service = service
    viewer, operator, admin = require("viewer"), require("operator"), require("admin")

    @app.exception_handler(FleetError)
    async def _fleet_error(request: Request, exc: FleetError) -> JSONResponse:
        return JSONResponse(exc.to_dict(), status_code=exc.status_code)

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request: Request, exc: BodyTooLarge) -> JSONResponse:
        return JSONResponse(
            {"error": "TooLarge", "detail": too_large_detail(exc.limit), "field": "body"},
            status_code=413,
            headers={"Connection": "close"},
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0]
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path")]
        field = ".".join(loc) or "body"
        return JSONResponse(
            {"error": "InvalidInput", "detail": f"{field}: {err.get('msg')}", "field": field},
            status_code=422,
        )

    def actor(role: str) -> str:
        return f"api:{role}"

    @app.get("/v1/health", tags=["service"])
    def health() -> dict[str, Any]:
        return {
            "ok": True,
            "bridge": service.bridge.stats() if service.bridge else None,
            "tick": service.cluster.leads,  # this process runs the rollout tick
        }

    @app.get("/v1/cluster", tags=["service"])
    def cluster(role: str = Depends(viewer)) -> dict[str, Any]:
        """The fleet serve processes on this registry and which one runs the rollout tick."""
        return service.cluster.status()

    @app.get("/v1/broker", tags=["service"])
    def broker(role: str = Depends(viewer)) -> dict[str, Any]:
        """Where tools (``edgefleet telemetry tail``) reach the MQTT broker: URL and prefix
        (``urls``: every node of a clustered broker, when no public URL is set)."""
        b = service.config.broker
        urls = [b.public_url] if b.public_url else b.all_urls()
        return {"url": urls[0], "urls": urls, "topic_prefix": b.topic_prefix}

    @app.get("/v1/overview", tags=["service"])
    def overview(role: str = Depends(viewer)) -> dict[str, Any]:
        return service.overview()

    # bundles ---------------------------------------------------------------------------
    @app.post(
        "/v1/bundles",
        status_code=201,
        tags=["bundles"],
        openapi_extra={
            "requestBody": {
                "content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
                },
                "required": True,
            }
        },
    )
    async def upload_bundle(request: Request, role: str = Depends(operator)) -> dict[str, Any]:
        """Upload a ``.efb`` as the raw request body; refused unless signed by a trusted key.

        The body streams into a 0600 file of the artifact store under the upload cap (413
        past it); the same name@version with other bytes is a 409, the same bytes again 200.
        """
        import hashlib

        from starlette.concurrency import run_in_threadpool

        tmp = service.artifacts.temp()
        try:
            digest, size = hashlib.sha256(), 0
            with open(tmp, "wb") as fh:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > MAX_UPLOAD_BYTES:
                        raise TooLarge(too_large_detail(MAX_UPLOAD_BYTES), field="body")
                    digest.update(chunk)
                    fh.write(chunk)
            if not size:
                raise InvalidInput("the request body must be the bundle bytes", field="bundle")
            return dict(
                await run_in_threadpool(
                    service.upload_bundle, tmp, actor(role), sha256=digest.hexdigest()
                )
            )
        finally:
            tmp.unlink(missing_ok=True)

    # Lists come in cursor pages: {"items": [...], "next_cursor": "..." | null}; pass the
    # cursor back as ?cursor= for the next page (fleet_server/lists.py, docs/api.md).
    def limit_q() -> Any:
        return Query(
            DEFAULT_LIMIT,
            ge=1,
            le=MAX_LIMIT,
            description=f"Page size (default {DEFAULT_LIMIT}, at most {MAX_LIMIT}).",
        )

    def cursor_q() -> Any:
        return Query(
            None,
            max_length=MAX_CURSOR_CHARS,
            description="The previous page's next_cursor; absent for the first page.",
        )

    @app.get("/v1/bundles", tags=["bundles"])
    def list_bundles(
        limit: int = limit_q(), cursor: str | None = cursor_q(), role: str = Depends(viewer)
    ) -> dict[str, Any]:
        """Uploaded bundles, newest first, one page."""
        return service.bundles_page(limit, cursor).to_dict()

    @app.get("/v1/bundles/{ref}", tags=["bundles"])
    def show_bundle(ref: str, role: str = Depends(viewer)) -> dict[str, Any]:
        return service.get_bundle(ref)

    # devices ---------------------------------------------------------------------------
    @app.get("/v1/devices", tags=["devices"])
    def list_devices(
        profile: str | None = None,
        tag: str | None = None,
        version: str | None = None,
        online: bool | None = None,
        limit: int = limit_q(),
        cursor: str | None = cursor_q(),
        role: str = Depends(viewer),
    ) -> dict[str, Any]:
        """Devices by id, one page, filtered by profile, tag, model version or online state."""
        filters = {"profile": profile, "tag": tag, "version": version, "online": online}
        return service.devices_page(limit, cursor, **filters).to_dict()

    @app.get("/v1/devices/{device_id}", tags=["devices"])
    def show_device(device_id: str, role: str = Depends(viewer)) -> dict[str, Any]:
        return service.get_device(device_id)

    class Tags(BaseModel):
        tags: list[str]

    @app.put("/v1/devices/{device_id}/tags", tags=["devices"])
    def tag_device(device_id: str, body: Tags, role: str = Depends(operator)) -> dict[str, Any]:
        return service.tag_device(device_id, body.tags, actor=actor(role))

    @app.get("/v1/enrolments", tags=["devices"])
    def enrolments(
        status: str | None = Query(None, pattern="^(pending|approved)$"),
        role: str = Depends(viewer),
    ) -> list[dict[str, Any]]:
        """Device keys the server pinned (approved) or holds for an operator (pending)."""
        return service.list_enrolments(status)

    class Approval(BaseModel):
        key_id: str | None = Field(default=None, pattern="^[0-9a-f]{16}$")

    @app.post("/v1/devices/{device_id}/approve", tags=["devices"])
    def approve_device(
        device_id: str, body: Approval | None = None, role: str = Depends(operator)
    ) -> dict[str, Any]:
        """Pin the key a pending device presented (``key_id``: refuse if it differs)."""
        key = body.key_id if body is not None else None
        return service.approve_device(device_id, actor=actor(role), key_id=key)

    @app.post("/v1/devices/{device_id}/revoke", tags=["devices"])
    def revoke_device(device_id: str, role: str = Depends(operator)) -> dict[str, Any]:
        """Forget a device's key; it must enrol again."""
        service.revoke_device(device_id, actor=actor(role))
        return {"device_id": device_id, "revoked": True}

    # rollouts --------------------------------------------------------------------------
    @app.post("/v1/rollouts", status_code=201, tags=["rollouts"])
    def create_rollout(
        body: RolloutRequest,
        dry_run: bool = Query(False),
        force: bool = Query(False),
        start: bool = Query(False),
        role: str = Depends(operator),
    ) -> dict[str, Any]:
        """Create (and with ``start=true`` start) a rollout; ``dry_run=true`` only plans it."""
        out = service.create_rollout(body, actor=actor(role), dry_run=dry_run, force=force)
        if start and not dry_run:
            out = service.start_rollout(out["rollout_id"], actor=actor(role))
        return out

    @app.post("/v1/rollouts/dry-run", tags=["rollouts"])
    def dry_run_rollout(
        body: RolloutRequest, force: bool = Query(False), role: str = Depends(viewer)
    ) -> dict[str, Any]:
        return service.create_rollout(body, actor=actor(role), dry_run=True, force=force)

    @app.get("/v1/rollouts", tags=["rollouts"])
    def list_rollouts(
        limit: int = limit_q(), cursor: str | None = cursor_q(), role: str = Depends(viewer)
    ) -> dict[str, Any]:
        """Rollouts, newest first, one page."""
        return service.rollouts_page(limit, cursor).to_dict()

    @app.get("/v1/rollouts/{rollout_id}", tags=["rollouts"])
    def rollout_status(rollout_id: str, role: str = Depends(viewer)) -> dict[str, Any]:
        return service.rollout_status(rollout_id)

    @app.post("/v1/rollouts/{rollout_id}/{action}", tags=["rollouts"])
    def rollout_action(
        rollout_id: str, action: str, role: str = Depends(operator)
    ) -> dict[str, Any]:
        if action not in ACTIONS:
            raise InvalidInput(f"action must be one of {', '.join(ACTIONS)}", field="action")
        method = getattr(service, f"{action}_rollout")
        return dict(method(rollout_id, actor=actor(role)))

    # drift, events, audit ------------------------------------------------------------------
    @app.get("/v1/drift", tags=["drift"])
    def drift(
        model: str | None = None,
        version: str | None = None,
        limit: int = limit_q(),
        cursor: str | None = cursor_q(),
        role: str = Depends(viewer),
    ) -> dict[str, Any]:
        """Stored drift evaluations (one per model version and window), newest first."""
        return service.drift_page(limit, cursor, model=model, version=version).to_dict()

    @app.post("/v1/drift/evaluate", tags=["drift"])
    def drift_evaluate(
        model: str = Body(embed=True),
        version: str = Body(embed=True),
        role: str = Depends(operator),
    ) -> Any:
        return service.evaluate_drift(model, version)

    @app.get("/v1/events", tags=["history"])
    def events(
        limit: int = limit_q(),
        cursor: str | None = cursor_q(),
        rollout_id: str | None = None,
        device_id: str | None = None,
        role: str = Depends(viewer),
    ) -> dict[str, Any]:
        """Events, newest first, optionally of one rollout or one device."""
        ids = {"rollout_id": rollout_id, "device_id": device_id}
        return service.events_page(limit, cursor, **ids).to_dict()

    @app.get("/v1/audit", tags=["history"])
    def audit(
        limit: int = limit_q(),
        cursor: str | None = cursor_q(),
        target: str | None = None,
        role: str = Depends(operator),
    ) -> dict[str, Any]:
        """Audit records (who did what, and why), newest first, optionally of one target."""
        return service.audit_page(limit, cursor, target=target).to_dict()

    class TokenRequest(BaseModel):
        role: str
        name: str = ""

    @app.post("/v1/tokens", status_code=201, tags=["auth"])
    def create_token(body: TokenRequest, role: str = Depends(admin)) -> dict[str, str]:
        """Create an API token; the answer is the only place the token is ever shown."""
        return {
            "token": service.create_token(body.role, body.name, actor=actor(role)),
            "role": body.role,
        }

    # artifacts and metrics ------------------------------------------------------------------
    @app.get("/v1/artifacts/{sha256}", tags=["delivery"])
    def artifact(sha256: str, request: Request) -> Response:
        """Bundle bytes by sha256, with ``Range`` support so an interrupted download resumes."""
        data = service.artifacts.get(sha256)
        headers = {"Accept-Ranges": "bytes", "ETag": f'"{sha256}"'}
        rng = request.headers.get("range")
        if rng:
            span = _parse_range(rng, len(data))
            if span is None:
                return Response(
                    status_code=416, headers={**headers, "Content-Range": f"bytes */{len(data)}"}
                )
            a, b = span
            headers["Content-Range"] = f"bytes {a}-{b}/{len(data)}"
            return Response(
                data[a : b + 1],
                status_code=206,
                media_type="application/octet-stream",
                headers=headers,
            )
        return Response(data, media_type="application/octet-stream", headers=headers)

    @app.get("/metrics", tags=["service"], include_in_schema=False)
    def metrics() -> Response:
        body, ctype = service.exporter.render()
        lead = int(service.cluster.leads)
        body += (
            "# HELP edgefleet_rollout_tick_leader 1 in the process that runs the rollout tick\n"
            f"# TYPE edgefleet_rollout_tick_leader gauge\nedgefleet_rollout_tick_leader {lead}\n"
        ).encode()
        return Response(body, media_type=ctype)

    from . import measures_api

    app.include_router(measures_api.build_router(service))
    from .channels_api import add_routes as add_channel_routes

    add_channel_routes(app, service)  # release channels: /v1/channels, /v1/promotions, …
    _mount_dashboard(app, service)
    app.add_middleware(BodyGuard, authenticate=service.authenticate_token)
    return app


def _mount_dashboard(app: Any, service: FleetService) -> None:
    try:
        from fleet_server import dashboard
    except ModuleNotFoundError as exc:
        if exc.name == "fleet_server.dashboard":
            return
        raise
    if getattr(dashboard, "__file__", None) is None:
        return  # a bare directory (namespace package): the dashboard is not installed
    app.include_router(dashboard.build_router(service))
