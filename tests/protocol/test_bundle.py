"""Bundle reading and the ordered verification checks."""

from __future__ import annotations

import io
import zipfile
from datetime import datetime, timedelta, timezone

import pytest

from protocol import (
    ArchiveError,
    BundleError,
    ReasonCode,
    SignatureError,
    TrustStore,
    canonical_bytes,
    load_profile,
    pack_bundle,
    read_bundle,
    verify_bundle,
)
from tests.support.bundles import make_bundle


@pytest.fixture(scope="module")
def bundle(signing_key):
    return make_bundle(signing_key)


def trust(*keys, revoked=()):
    return TrustStore.from_keys([k.public for k in keys], revoked)


def rezip(data: bytes, mutate) -> bytes:
    """Copy a zip member by member through ``mutate(name, bytes) -> [(name, bytes)]``."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            for name, payload in mutate(info.filename, src.read(info)):
                dst.writestr(name, payload)
    return out.getvalue()


def test_verify_accepts_bundle_signed_by_trusted_key(bundle, signing_key):
    data, manifest = bundle
    got = verify_bundle(read_bundle(data), trust(signing_key), profile=load_profile("host"))
    assert got == manifest


def test_verify_rejects_bundle_when_signature_key_unknown(bundle, other_key):
    with pytest.raises(SignatureError) as err:
        verify_bundle(read_bundle(bundle[0]), trust(other_key))
    assert err.value.reason is ReasonCode.KEY_UNKNOWN


def test_verify_rejects_bundle_when_key_revoked(bundle, signing_key):
    with pytest.raises(SignatureError) as err:
        verify_bundle(read_bundle(bundle[0]), trust(signing_key, revoked=[signing_key.key_id]))
    assert err.value.reason is ReasonCode.KEY_REVOKED


def test_verify_accepts_any_of_several_trusted_keys(bundle, signing_key, other_key):
    assert verify_bundle(read_bundle(bundle[0]), trust(other_key, signing_key)).name == "iris"


def test_verify_rejects_tampered_model_by_hash(bundle, signing_key):
    def flip(name, payload):
        if name == "model.onnx":
            payload = payload[:100] + bytes([payload[100] ^ 1]) + payload[101:]
        return [(name, payload)]

    with pytest.raises(BundleError) as err:
        verify_bundle(read_bundle(rezip(bundle[0], flip)), trust(signing_key))
    assert err.value.reason is ReasonCode.HASH_MISMATCH


def test_verify_rejects_tampered_manifest_by_signature(bundle, signing_key):
    def edit(name, payload):
        if name == "manifest.json":
            payload = payload.replace(b'"release":1', b'"release":9')
        return [(name, payload)]

    with pytest.raises(SignatureError) as err:
        verify_bundle(read_bundle(rezip(bundle[0], edit)), trust(signing_key))
    assert err.value.reason is ReasonCode.SIGNATURE_INVALID


def test_verify_rejects_manifest_of_one_release_with_model_of_another(signing_key):
    v1, _ = make_bundle(signing_key, release=1, kind="iris-logreg")
    v2, _ = make_bundle(signing_key, release=2, kind="digits-forest")
    model_v2 = read_bundle(v2).members["model.onnx"]

    def swap(name, payload):
        return [(name, model_v2 if name == "model.onnx" else payload)]

    with pytest.raises(BundleError) as err:
        verify_bundle(read_bundle(rezip(v1, swap)), trust(signing_key))
    assert err.value.reason is ReasonCode.HASH_MISMATCH


def test_verify_rejects_release_not_newer_unless_rollback_allowed(signing_key):
    data, _ = make_bundle(signing_key, release=3)
    b = read_bundle(data)
    with pytest.raises(BundleError) as err:
        verify_bundle(b, trust(signing_key), installed_release=3)
    assert err.value.reason is ReasonCode.RELEASE_NOT_NEWER
    assert verify_bundle(b, trust(signing_key), installed_release=5, allow_older=True).release == 3


def test_verify_rejects_expired_bundle(signing_key):
    past = datetime.now(timezone.utc) - timedelta(days=10)
    data, _ = make_bundle(signing_key, created_at=past, expires_in=timedelta(days=1))
    with pytest.raises(BundleError) as err:
        verify_bundle(read_bundle(data), trust(signing_key))
    assert err.value.reason is ReasonCode.EXPIRED


def test_verify_rejects_bundle_for_another_profile(signing_key):
    data, _ = make_bundle(signing_key, profiles=("raspberry-pi-4",))
    with pytest.raises(BundleError) as err:
        verify_bundle(read_bundle(data), trust(signing_key), profile=load_profile("host"))
    assert err.value.reason is ReasonCode.PROFILE_INCOMPATIBLE


@pytest.mark.parametrize("evil", ["../evil.txt", "/etc/evil", "sub/dir.txt", "..\\evil.txt"])
def test_read_rejects_member_path_escaping_the_bundle(bundle, evil):
    def add(name, payload):
        out = [(name, payload)]
        if name == "manifest.json":
            out.append((evil, b"x"))
        return out

    with pytest.raises(ArchiveError) as err:
        read_bundle(rezip(bundle[0], add))
    assert err.value.reason is ReasonCode.ARCHIVE_UNSAFE


def test_read_rejects_oversize_member(bundle):
    with pytest.raises(ArchiveError) as err:
        read_bundle(bundle[0], max_member_bytes=1000)
    assert "limit" in str(err.value)


def test_read_rejects_zip_bomb_member_that_inflates_past_limit(signing_key):
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("manifest.json", b"{}")
        zf.writestr("manifest.sig", signing_key.sign(b"{}").to_bytes())
        zf.writestr("model.onnx", b"\0" * 2_000_000)
    with pytest.raises(ArchiveError):
        read_bundle(out.getvalue(), max_member_bytes=100_000)


def test_read_rejects_duplicate_member_names(bundle):
    def dup(name, payload):
        return [(name, payload), (name, payload)] if name == "model.onnx" else [(name, payload)]

    with pytest.warns(UserWarning, match="Duplicate name"):
        data = rezip(bundle[0], dup)
    with pytest.raises(ArchiveError, match="duplicate"):
        read_bundle(data)


def test_read_rejects_missing_signature(bundle):
    def drop(name, payload):
        return [] if name == "manifest.sig" else [(name, payload)]

    with pytest.raises(ArchiveError) as err:
        read_bundle(rezip(bundle[0], drop))
    assert err.value.reason is ReasonCode.MISSING_FILE


def test_verify_rejects_listed_file_missing(bundle, signing_key):
    def drop(name, payload):
        return [] if name == "reference.sketch" else [(name, payload)]

    with pytest.raises(BundleError) as err:
        verify_bundle(read_bundle(rezip(bundle[0], drop)), trust(signing_key))
    assert err.value.reason is ReasonCode.MISSING_FILE


def test_read_rejects_bytes_that_are_not_a_zip():
    with pytest.raises(ArchiveError) as err:
        read_bundle(b"definitely not a zip")
    assert err.value.reason is ReasonCode.ARCHIVE_INVALID


def test_pack_is_deterministic(bundle, signing_key):
    data, manifest = bundle
    b = read_bundle(data)
    again = pack_bundle(canonical_bytes(manifest), b.signature, b.members)
    assert again == data
