"""API tokens and dashboard users.

Tokens are 32 random bytes (urlsafe base64), stored only as their sha256 and compared in
constant time. Roles are ordered viewer < operator < admin. Passwords are hashed with
scrypt (``scrypt$n$r$p$salt$hash``); PBKDF2 hashes (``pbkdf2$iterations$salt$hash``) verify too.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

ROLES = ("viewer", "operator", "admin")


def role_rank(role: str) -> int:
    return ROLES.index(role) if role in ROLES else -1


def allows(role: str | None, needed: str) -> bool:
    return role is not None and role_rank(role) >= role_rank(needed)


def new_token() -> str:
    return "eft_" + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token_matches(token: str, token_hash: str) -> bool:
    return hmac.compare_digest(hash_token(token), token_hash)


def hash_password(password: str, *, n: int = 2**14, r: int = 8, p: int = 1) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=32)
    b64 = base64.urlsafe_b64encode
    return f"scrypt${n}${r}${p}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    parts = stored.split("$")
    try:
        if parts[0] == "scrypt" and len(parts) == 6:
            n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
            salt, want = base64.urlsafe_b64decode(parts[4]), base64.urlsafe_b64decode(parts[5])
            got = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=len(want))
        elif parts[0] == "pbkdf2" and len(parts) == 4:
            salt, want = base64.urlsafe_b64decode(parts[2]), base64.urlsafe_b64decode(parts[3])
            got = hashlib.pbkdf2_hmac(
                "sha256", password.encode(), salt, int(parts[1]), dklen=len(want)
            )
        else:
            return False
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, want)


_DUMMY: list[str] = []


def burn_password_check(password: str) -> None:
    """The same scrypt work a real check costs, for a user that does not exist.

    Without it an unknown user answers at once and a known one after the hash: the answer
    time would tell which user names exist.
    """
    if not _DUMMY:
        _DUMMY.append(hash_password(secrets.token_urlsafe(16)))
    verify_password(password, _DUMMY[0])


def bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    return value.strip() or None if scheme.lower() == "bearer" else None


def require(role: str):  # type: ignore[no-untyped-def]  # returns a FastAPI dependency
    """FastAPI dependency: the caller's role, or 401 (no/invalid token) / 403 (role too low).

    The app keeps the service in ``app.state.service``; a dashboard session may instead put
    the role in ``request.state.role``.
    """
    from fastapi import Request

    from .errors import AuthError, Forbidden

    def dependency(request: Request) -> str:
        got: str | None = getattr(request.state, "role", None)
        if got is None:
            token = bearer(request.headers.get("authorization"))
            if token is None:
                raise AuthError(
                    "missing API token (Authorization: Bearer …)", field="authorization"
                )
            got = request.app.state.service.authenticate_token(token)
            if got is None:
                raise AuthError("invalid API token", field="authorization")
        if not allows(got, role):
            raise Forbidden(
                f"this needs the {role} role; the token has {got}", field="authorization"
            )
        return got

    # annotations are strings here (PEP 563); hand FastAPI the real class
    dependency.__annotations__ = {"request": Request, "return": str}
    return dependency
