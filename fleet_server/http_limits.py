"""Request bodies are hostile: authenticate first, cap the size per route, then read.

:class:`BodyGuard` is a plain ASGI middleware in front of the API and the dashboard:

1. A request that carries a body to ``/v1/…`` must present a valid API token *before* a
   byte of the body is read (FastAPI parses JSON bodies before it runs the route's
   dependencies, so without this a 300 MB POST cost +590 MB without any token).
   Dashboard POSTs check their session cookie before reading the form (the routes do).
2. Every body has a cap chosen by route (:func:`body_limit`): a ``Content-Length`` over it
   is refused at once with 413; a body without one is counted while it streams and
   refused the moment it passes the cap. The 413 names the limit.

Role checks stay in the routes (:func:`fleet_server.auth.require`).
"""

from __future__ import annotations

import json
from typing import Any

from .auth import bearer

MAX_UPLOAD_BYTES = 512 * 1024 * 1024  # a bundle (POST /v1/bundles, the dashboard upload)
MAX_FORM_BYTES = 64 * 1024  # dashboard forms
MAX_LOGIN_BYTES = 8 * 1024  # the login form
MAX_JSON_BYTES = 256 * 1024  # every other API body (rollout requests, tags, tokens …)

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def body_limit(method: str, path: str) -> int:
    if path in ("/v1/bundles", "/ui/bundles"):
        return MAX_UPLOAD_BYTES
    if path == "/ui/login":
        return MAX_LOGIN_BYTES
    if path.startswith("/ui/"):
        return MAX_FORM_BYTES
    return MAX_JSON_BYTES


def too_large_detail(limit: int) -> str:
    return f"the request body is over the {limit} byte limit of this route"


class BodyTooLarge(Exception):
    """Raised from ``receive`` when a streamed body passes its cap (handled into a 413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(too_large_detail(limit))
        self.limit = limit


def _http_exception(limit: int) -> Exception:
    # A starlette HTTPException passes through FastAPI's body parsing unchanged.
    from starlette.exceptions import HTTPException

    class _TooLarge(HTTPException, BodyTooLarge):
        def __init__(self) -> None:
            HTTPException.__init__(self, 413, too_large_detail(limit))
            self.limit = limit

    return _TooLarge()


async def _answer(
    send: Any, status: int, body: dict[str, Any], headers: list | None = None
) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                (b"connection", b"close"),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


class BodyGuard:
    def __init__(self, app: Any, authenticate: Any) -> None:
        self.app = app
        self.authenticate = authenticate  # token → role or None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if path.startswith("/v1/"):
            token = bearer(headers.get("authorization"))
            if token is None or self.authenticate(token) is None:
                what = (
                    "missing API token (Authorization: Bearer …)"
                    if token is None
                    else ("invalid API token")
                )
                await _answer(
                    send,
                    401,
                    {"error": "AuthError", "detail": what, "field": "authorization"},
                    [(b"www-authenticate", b"Bearer")],
                )
                return
        limit = body_limit(scope["method"], path)
        declared = headers.get("content-length")
        if declared is not None:
            try:
                too_big = int(declared) > limit
            except ValueError:
                too_big = False
            if too_big:
                await _answer(
                    send,
                    413,
                    {"error": "TooLarge", "detail": too_large_detail(limit), "field": "body"},
                )
                return
        seen = 0

        async def capped() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _http_exception(limit)
            return message

        await self.app(scope, capped, send)
