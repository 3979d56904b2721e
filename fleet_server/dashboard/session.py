"""Signed session cookies and CSRF tokens for the dashboard, revocable on the server.

A session cookie is ``base64url(json) "." base64url(HMAC-SHA256(secret, json))`` holding
the user, role, expiry, a random session id and a random CSRF token. Every POST form
carries that token in a hidden field and is refused when it does not match (constant-time
compare); the cookie is ``HttpOnly``, ``SameSite=Strict`` and ``Secure`` when the page was
served over HTTPS. Logging out records the session id as revoked (in the registry, so every
server process sharing it refuses the cookie from then on). The login form, posted before a
session exists, uses a double-submit nonce (cookie == form field) instead.

The secret comes from ``EDGEFLEET_DASHBOARD_SECRET`` when it is set. Otherwise, on a
PostgreSQL registry (several server processes), the first process generates one and keeps
it in the registry (``shared_secrets``), so a login made on one process works on all of
them; with SQLite (one process) it is generated per process, so a restart logs everyone out.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass

COOKIE = "edgefleet_session"
LOGIN_COOKIE = "edgefleet_login"
MAX_AGE_S = 12 * 3600


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def session_secret(shared: Callable[[str, str], str] | None) -> bytes:
    """The environment's secret, else the registry's shared one (``shared(name, value)``
    stores ``value`` when none is stored and returns the stored one), else a new one."""
    env = os.environ.get("EDGEFLEET_DASHBOARD_SECRET")
    if env:
        return env.encode()
    if shared is not None:
        return bytes.fromhex(shared("dashboard_session", secrets.token_hex(32)))
    return secrets.token_bytes(32)


@dataclass(frozen=True)
class Session:
    user: str
    role: str
    csrf: str
    expires: float
    sid: str = ""


class Sessions:
    def __init__(
        self,
        secret: bytes,
        max_age_s: float = MAX_AGE_S,
        *,
        revoked: Callable[[str], bool] | None = None,
        revoke: Callable[[str, float], None] | None = None,
    ) -> None:
        self.secret = secret
        self.max_age_s = max_age_s
        self._revoked = revoked
        self._revoke = revoke

    def _sign(self, body: bytes) -> str:
        return _b64(hmac.new(self.secret, body, hashlib.sha256).digest())

    def issue(self, user: str, role: str, now: float) -> tuple[str, Session]:
        s = Session(
            user, role, secrets.token_urlsafe(16), now + self.max_age_s, secrets.token_urlsafe(12)
        )
        body = json.dumps(
            {"u": s.user, "r": s.role, "c": s.csrf, "e": s.expires, "i": s.sid}
        ).encode()
        return f"{_b64(body)}.{self._sign(body)}", s

    def read(self, cookie: str | None, now: float) -> Session | None:
        if not cookie or "." not in cookie:
            return None
        b, sig = cookie.rsplit(".", 1)
        try:
            body = _unb64(b)
        except (ValueError, TypeError):
            return None
        if not hmac.compare_digest(sig, self._sign(body)):
            return None
        try:
            d = json.loads(body)
            s = Session(str(d["u"]), str(d["r"]), str(d["c"]), float(d["e"]), str(d.get("i", "")))
        except (ValueError, KeyError, TypeError):
            return None
        if s.expires <= now:
            return None
        if self._revoked is not None and (not s.sid or self._revoked(s.sid)):
            return None
        return s

    def revoke(self, session: Session) -> None:
        """Refuse this session's cookie from now on (logout)."""
        if self._revoke is not None and session.sid:
            self._revoke(session.sid, session.expires)


def csrf_ok(session: Session | None, token: str | None) -> bool:
    return session is not None and bool(token) and hmac.compare_digest(session.csrf, str(token))


def new_nonce() -> str:
    return secrets.token_urlsafe(16)
