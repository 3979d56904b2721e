"""Tokens, roles and password hashes."""

from __future__ import annotations

import base64
import hashlib

from fleet_server import auth


def test_tokens_are_random_and_stored_only_as_their_hash() -> None:
    a, b = auth.new_token(), auth.new_token()
    assert a != b and len(a) > 40
    h = auth.hash_token(a)
    assert a not in h and len(h) == 64
    assert auth.token_matches(a, h)
    assert not auth.token_matches(b, h)


def test_roles_are_ordered_viewer_operator_admin() -> None:
    assert auth.allows("admin", "operator")
    assert auth.allows("operator", "operator")
    assert not auth.allows("viewer", "operator")
    assert not auth.allows(None, "viewer")
    assert not auth.allows("root", "viewer")


def test_scrypt_password_hash_verifies_only_the_right_password() -> None:
    stored = auth.hash_password("correct horse", n=2**10)
    assert stored.startswith("scrypt$")
    assert auth.verify_password("correct horse", stored)
    assert not auth.verify_password("wrong", stored)
    assert stored != auth.hash_password("correct horse", n=2**10)  # salted


def test_pbkdf2_hashes_verify_and_garbage_never_does() -> None:
    salt = b"0123456789abcdef"
    dk = hashlib.pbkdf2_hmac("sha256", b"pw", salt, 1000)
    b64 = base64.urlsafe_b64encode
    stored = f"pbkdf2$1000${b64(salt).decode()}${b64(dk).decode()}"
    assert auth.verify_password("pw", stored)
    assert not auth.verify_password("pw2", stored)
    assert not auth.verify_password("pw", "md5$abc")
    assert not auth.verify_password("pw", "scrypt$x$y$z$a$b")


def test_bearer_header_parsing() -> None:
    assert auth.bearer("Bearer abc") == "abc"
    assert auth.bearer("bearer  abc ") == "abc"
    assert auth.bearer("Basic abc") is None
    assert auth.bearer(None) is None
    assert auth.bearer("Bearer ") is None
