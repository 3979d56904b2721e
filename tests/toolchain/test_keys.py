"""Signing keys on disk: 0600 private PEM, no overwrite, usable for signing."""

from __future__ import annotations

import stat

import pytest

from protocol.signing import TrustStore, read_private_key
from toolchain.errors import ToolchainError
from toolchain.keys import generate_keys


def test_generate_writes_a_pkcs8_private_key_readable_only_by_its_owner(tmp_path):
    key = generate_keys(tmp_path, "release")
    assert stat.S_IMODE(key.private_path.stat().st_mode) == 0o600
    assert key.private_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert key.public_path.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert read_private_key(key.private_path).key_id == key.key_id


def test_private_key_is_0600_even_with_a_permissive_umask(tmp_path):
    import os

    old = os.umask(0)
    try:
        key = generate_keys(tmp_path, "k")
    finally:
        os.umask(old)
    assert stat.S_IMODE(key.private_path.stat().st_mode) == 0o600


def test_generate_refuses_to_overwrite_an_existing_key(tmp_path):
    first = generate_keys(tmp_path, "release")
    before = first.private_path.read_bytes()
    with pytest.raises(ToolchainError, match="refusing to overwrite"):
        generate_keys(tmp_path, "release")
    assert first.private_path.read_bytes() == before


def test_generated_pair_signs_what_a_trust_store_of_its_public_key_accepts(tmp_path):
    key = generate_keys(tmp_path, "release")
    signature = read_private_key(key.private_path).sign(b"manifest bytes")
    assert (
        TrustStore.from_files([key.public_path]).verify(b"manifest bytes", signature) == key.key_id
    )


def test_key_names_that_are_paths_are_refused(tmp_path):
    with pytest.raises(ToolchainError, match="plain file name"):
        generate_keys(tmp_path, "../escape")
