"""Manifest canonical bytes, signatures and key handling."""

from __future__ import annotations

import string
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import (
    KeyPair,
    ProtocolError,
    ReasonCode,
    SignatureError,
    TrustStore,
    canonical_bytes,
    load_private_key,
    load_public_key,
    parse_manifest,
)
from protocol.manifest import Manifest
from protocol.signing import Signature
from tests.support.bundles import make_bundle


@pytest.fixture(scope="module")
def manifest(signing_key) -> Manifest:
    return make_bundle(signing_key)[1]


names = st.text(
    alphabet=string.ascii_lowercase + string.digits + "-_.", min_size=1, max_size=20
).filter(lambda s: s[0].isalnum())
versions = st.tuples(st.integers(0, 99), st.integers(0, 99), st.integers(0, 99)).map(
    lambda t: f"{t[0]}.{t[1]}.{t[2]}"
)


@settings(max_examples=60, deadline=None)
@given(
    name=names,
    version=versions,
    release=st.integers(1, 2**40),
    meta=st.dictionaries(st.text(max_size=10), st.text(max_size=30), max_size=4),
)
def test_manifest_round_trips_through_canonical_bytes(manifest, name, version, release, meta):
    m = manifest.model_copy(
        update={"name": name, "version": version, "release": release, "metadata": meta}
    )
    m = Manifest.model_validate(m.model_dump())
    data = canonical_bytes(m)
    back = parse_manifest(data)
    assert back == m
    assert canonical_bytes(back) == data


def test_canonical_bytes_do_not_depend_on_field_order(manifest):
    dumped = manifest.model_dump(mode="json")
    reordered = dict(reversed(list(dumped.items())))
    assert canonical_bytes(Manifest.model_validate(reordered)) == canonical_bytes(manifest)


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [("version", "1.0", "semantic"), ("name", "Bad Name", "lowercase"), ("release", 0, "release")],
)
def test_parse_manifest_names_the_bad_field(manifest, field, value, needle):
    data = manifest.model_dump(mode="json")
    data[field] = value
    import json

    with pytest.raises(ProtocolError, match=field):
        parse_manifest(json.dumps(data).encode())


def test_manifest_rejects_naive_timestamps(manifest):
    with pytest.raises(ValueError, match="timezone"):
        Manifest.model_validate({**manifest.model_dump(), "created_at": datetime(2026, 1, 1)})


@settings(max_examples=30, deadline=None)
@given(data=st.binary(max_size=2000))
def test_signature_verifies_exactly_the_signed_bytes(signing_key, data):
    sig = signing_key.sign(data)
    trust = TrustStore.from_keys([signing_key.public])
    assert trust.verify(data, sig) == signing_key.key_id
    with pytest.raises(SignatureError):
        trust.verify(data + b"x", sig)


def test_signature_document_round_trips(signing_key):
    sig = signing_key.sign(b"hello")
    assert Signature.from_bytes(sig.to_bytes()) == sig


def test_malformed_signature_document_is_a_signature_error():
    with pytest.raises(SignatureError) as err:
        Signature.from_bytes(b'{"nope": 1}')
    assert err.value.reason is ReasonCode.SIGNATURE_INVALID


def test_keys_round_trip_through_pem():
    kp = KeyPair.generate()
    again = load_private_key(kp.private_pem())
    assert again.key_id == kp.key_id
    pub = load_public_key(kp.public_pem())
    assert TrustStore.from_keys([pub]).verify(b"m", kp.sign(b"m")) == kp.key_id


def test_key_repr_never_shows_key_material():
    kp = KeyPair.generate()
    assert "PRIVATE" not in repr(kp) and kp.key_id in repr(kp)


def test_loading_garbage_as_key_is_a_protocol_error():
    with pytest.raises(ProtocolError):
        load_private_key(b"not a key")
    with pytest.raises(ProtocolError):
        load_public_key(b"not a key")


def test_manifest_expiry_is_after_creation_in_test_bundles(manifest):
    assert manifest.expires_at - manifest.created_at == timedelta(days=30)
    assert manifest.created_at.tzinfo == timezone.utc
