"""The local inference API (FastAPI, versioned under ``/v1``).

(No ``from __future__ import annotations`` here: FastAPI must see the real ``Request``
class, which is imported inside :func:`create_app` to keep ``import agent`` light.)

Endpoints: ``POST /v1/predict``, ``POST /v1/feedback``, ``GET /v1/health`` (live),
``GET /v1/ready`` (503 until a model is loaded), ``GET /v1/model`` (manifest summary),
``GET /v1/status`` (when the daemon passes ``status``), ``GET /metrics`` (Prometheus text)
and the OpenAPI document at ``/openapi.json``.

Errors are JSON ``{"error": code, "detail": message}`` with 4xx for anything the client
sent: 413 for bodies over ``api.max_body_bytes``, 400 for malformed JSON, 422 for bodies
that do not fit the schema (the message names the row/feature). A model failure with no
fallback is 503. Bad input never produces a 5xx.

Hot path: the body is read with a size cap and parsed with :func:`json.loads`, then
validated by :class:`PredictRequest`, the very model the OpenAPI document publishes (about
4 µs for a 64-feature row); row contents are checked against the model's input schema by
the predictor. The model runs inline on the event loop (single-row inference is far
shorter than a thread hop), and observers only enqueue. One access-log record per request
goes to the ``edgefleet.agent.access`` logger with ``extra={"fields": {method, path, status, ms,
request_id}}`` (never bodies or secrets); :func:`agent.jsonlog.setup_json_logging` prints
them as JSON lines.
"""

import json
import logging
import math
import time
from collections.abc import Callable
from typing import Any, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .config import AgentConfig
from .errors import InputError, ModelError, NoModelError
from .predictor import Predictor

access_log = logging.getLogger("edgefleet.agent.access")

Scalar = Union[float, int, str, bool, None]


class PredictRequest(BaseModel):
    """Either ``inputs`` (rows in schema feature order) or ``instances`` (named features).

    ``POST /v1/predict`` validates every body with this model, and publishes it as the
    request schema in OpenAPI.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    inputs: list[list[Scalar]] | None = Field(default=None, examples=[[[5.1, 3.5, 1.4, 0.2]]])
    instances: list[dict[str, Scalar]] | None = Field(
        default=None,
        examples=[[{"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4}]],
    )
    request_id: str | None = Field(default=None, min_length=1, max_length=128)


_SCALAR_TAGS = {"float", "int", "str", "bool", "none"}  # pydantic's names for Scalar's members


def request_error(exc: ValidationError) -> str:
    """One line for the first problem pydantic found, naming where it is (``inputs[0][2]``)."""
    err = exc.errors()[0]
    loc = list(err["loc"])
    if err["type"] == "extra_forbidden" and len(loc) == 1:
        return f"unknown field {loc[0]!r}"
    msg = str(err["msg"])
    if len(loc) > 1 and loc[-1] in _SCALAR_TAGS:
        loc, msg = loc[:-1], "must be a number, string, boolean or null"
    where = str(loc[0]) + "".join(f"[{p!r}]" if isinstance(p, str) else f"[{p}]" for p in loc[1:])
    return f"{where}: {msg}"


class ModelOut(BaseModel):
    name: str
    version: str
    release: int


class PredictResponse(BaseModel):
    request_id: str
    model: ModelOut
    labels: list[Any] | None = None
    probabilities: list[list[float]] | None = None
    values: list[list[float]] | None = None
    latency_ms: float
    fallback: bool


class FeedbackRequest(BaseModel):
    request_id: str
    truth: Any


class ErrorBody(BaseModel):
    error: str
    detail: str


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 413, 422, 503)
}


class _Counters:
    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = {}

    def add(self, path: str, status: int) -> None:
        key = (path, status)
        self.requests[key] = self.requests.get(key, 0) + 1

    def text(self, predictor: Predictor) -> str:
        lines = [
            "# HELP edgefleet_agent_http_requests_total HTTP requests by path and status.",
            "# TYPE edgefleet_agent_http_requests_total counter",
        ]
        for (path, status), n in sorted(self.requests.items()):
            lines.append(
                f'edgefleet_agent_http_requests_total{{path="{path}",status="{status}"}} {n}'
            )
        s = predictor.stats
        for name, value, help_ in (
            ("predictions_total", s.requests, "Answered predict calls."),
            ("prediction_rows_total", s.rows, "Rows predicted."),
            (
                "prediction_errors_total",
                s.errors,
                "Predict calls the model failed without fallback.",
            ),
            ("fallbacks_total", s.fallbacks, "Predict calls answered by the fallback."),
        ):
            lines += [
                f"# HELP edgefleet_agent_{name} {help_}",
                f"# TYPE edgefleet_agent_{name} counter",
                f"edgefleet_agent_{name} {value}",
            ]
        lines += [
            "# HELP edgefleet_agent_model_loaded 1 when a model is loaded.",
            "# TYPE edgefleet_agent_model_loaded gauge",
            f"edgefleet_agent_model_loaded {int(predictor.ready)}",
        ]
        return "\n".join(lines) + "\n"


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def _parse_float(text: str) -> float:
    x = float(text)
    if math.isinf(x):
        raise InputError(f"number {text[:40]} is too large")
    return x


def create_app(
    predictor: Predictor,
    *,
    config: AgentConfig,
    metrics_text: Callable[[], str] | None = None,
    status: Callable[[], dict] | None = None,
) -> Any:
    """Build the FastAPI app around ``predictor`` (imports FastAPI here, not at module top)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from starlette.responses import JSONResponse, PlainTextResponse, Response

    from protocol import __version__

    api = config.api
    counters = _Counters()
    app = FastAPI(
        title="edgefleet agent",
        version=__version__,
        description="Local inference API of an edgefleet device agent.",
    )

    def error(status_code: int, code: str, detail: str) -> Response:
        return Response(
            json.dumps({"error": code, "detail": detail}),
            status_code,
            media_type="application/json",
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"])
        return error(422, "invalid_request", f"{where}: {first['msg']}")

    async def read_json(request: Request) -> tuple[Any, Response | None]:
        length = request.headers.get("content-length")
        if length is not None:
            try:
                if int(length) > api.max_body_bytes:
                    return None, error(
                        413, "body_too_large", f"body is over {api.max_body_bytes} bytes"
                    )
            except ValueError:
                return None, error(400, "bad_request", "invalid Content-Length")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > api.max_body_bytes:
                return None, error(
                    413, "body_too_large", f"body is over {api.max_body_bytes} bytes"
                )
            chunks.append(chunk)
        body = b"".join(chunks)
        try:
            return json.loads(body, parse_float=_parse_float, parse_constant=_reject_constant), None
        except InputError as exc:
            return None, error(422, "invalid_input", str(exc))
        except (ValueError, RecursionError) as exc:
            return None, error(400, "malformed_json", f"body is not valid JSON: {str(exc)[:200]}")

    @app.post(
        "/v1/predict",
        response_model=PredictResponse,
        responses=_ERRORS,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": PredictRequest.model_json_schema(
                            ref_template="#/components/schemas/{model}"
                        )
                    }
                },
            }
        },
    )
    async def predict(request: Request) -> Response:
        """Predict for `inputs` (rows in feature order) or `instances` (objects by feature name)."""
        body, err = await read_json(request)
        if err is not None:
            return err
        if not isinstance(body, dict):
            return error(
                422, "invalid_request", "body must be a JSON object with inputs or instances"
            )
        batch = body.get("inputs") if body.get("inputs") is not None else body.get("instances")
        if isinstance(batch, list) and len(batch) > api.max_batch_rows:
            return error(
                422,
                "batch_too_large",
                f"batch of {len(batch)} rows is over the limit of {api.max_batch_rows}",
            )
        try:
            req = PredictRequest.model_validate(body)
        except ValidationError as exc:
            return error(422, "invalid_request", request_error(exc))
        rows, instances, rid = req.inputs, req.instances, req.request_id
        if rows is None and instances is None:
            return error(422, "invalid_request", "send inputs (rows) or instances (objects)")
        try:
            result = predictor.predict(
                rows, instances=instances, request_id=rid, max_rows=api.max_batch_rows
            )
        except InputError as exc:
            field = "instances" if instances is not None else "inputs"
            return error(422, "invalid_input", f"{field}: {exc}")
        except NoModelError as exc:
            return error(503, "no_model", str(exc))
        except ModelError as exc:
            return error(503, "model_failed", str(exc))
        return Response(
            json.dumps(result.to_dict(), separators=(",", ":")),
            200,
            media_type="application/json",
            headers={"x-request-id": result.request_id},
        )

    @app.post(
        "/v1/feedback",
        responses=_ERRORS,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": FeedbackRequest.model_json_schema()}},
            }
        },
    )
    async def feedback(request: Request) -> Response:
        """Report the true label or value for an earlier request id."""
        body, err = await read_json(request)
        if err is not None:
            return err
        if (
            not isinstance(body, dict)
            or not isinstance(body.get("request_id"), str)
            or "truth" not in body
        ):
            return error(422, "invalid_request", "body needs request_id (string) and truth")
        try:
            predictor.feedback(body["request_id"], body["truth"])
        except KeyError:
            return error(
                404,
                "unknown_request",
                f"request_id {body['request_id'][:128]!r} is unknown or too old",
            )
        return JSONResponse({"ok": True})

    @app.get("/v1/health")
    async def health() -> dict:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/v1/ready", responses={503: {"model": ErrorBody}})
    async def ready() -> Response:
        """Readiness: 200 once a model is loaded, else 503."""
        ref = predictor.model
        if ref is None:
            return error(503, "no_model", "no model is loaded yet")
        return JSONResponse(
            {
                "ready": True,
                "model": {"name": ref.name, "version": ref.version, "release": ref.release},
            }
        )

    @app.get("/v1/model", responses={503: {"model": ErrorBody}})
    async def model() -> Response:
        """Summary of the active model's manifest."""
        m = predictor.manifest
        if m is None:
            return error(503, "no_model", "no model is loaded yet")
        return JSONResponse(
            {
                "name": m.name,
                "version": m.version,
                "release": m.release,
                "format": m.model.format,
                "created_at": m.created_at.isoformat(),
                "expires_at": m.expires_at.isoformat(),
                "task": m.output_schema.task,
                "classes": m.output_schema.classes,
                "features": [f.model_dump(exclude_none=True) for f in m.input_schema.features],
                "quantization": m.quantization.mode,
                "fallback": m.fallback.model_dump(),
                "shadow": predictor.shadow.model_dump() if predictor.shadow else None,
            }
        )

    if status is not None:

        @app.get("/v1/status")
        async def status_view() -> Response:
            """Agent status (daemon, link, conditions)."""
            return JSONResponse(status())

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        """Prometheus text exposition."""
        text = metrics_text() if metrics_text is not None else counters.text(predictor)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    app.add_middleware(_AccessLog, counters=counters)
    return app


class _AccessLog:
    """Pure ASGI middleware: count requests and write one JSON log line per request."""

    def __init__(self, app: Any, counters: _Counters) -> None:
        self.app = app
        self.counters = counters

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        seen: dict[str, Any] = {"status": 500, "rid": None}

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
                for k, v in message.get("headers", ()):
                    if k == b"x-request-id":
                        seen["rid"] = v.decode("latin-1")
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            path = scope.get("path", "")
            self.counters.add(path, seen["status"])
            if access_log.isEnabledFor(logging.INFO):
                fields = {
                    "method": scope.get("method"),
                    "path": path,
                    "status": seen["status"],
                    "ms": round((time.perf_counter() - t0) * 1000, 3),
                    "request_id": seen["rid"],
                }
                access_log.info(
                    "%s %s %s", fields["method"], path, seen["status"], extra={"fields": fields}
                )
