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


# -- zip bombs: nothing is inflated before the signature, nothing past its declared size ---
BOMB_BYTES = 64 * 1024 * 1024  # inflates from about 64 KB


def _bomb(real: bytes, *, sign_with=None) -> bytes:
    """The real bundle's manifest (+ signature, or one by ``sign_with``), and a
    ``model.onnx`` that inflates to 64 MiB of zeros, written streamed (no 64 MiB buffer)."""
    b = read_bundle(real)
    sig = (sign_with.sign(b.manifest_bytes) if sign_with else b.signature).to_bytes()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("manifest.json", b.manifest_bytes)
        zf.writestr("manifest.sig", sig)
        info = zipfile.ZipInfo("model.onnx")
        info.compress_type = zipfile.ZIP_DEFLATED
        with zf.open(info, "w", force_zip64=True) as fh:
            block = bytes(1024 * 1024)
            for _ in range(BOMB_BYTES // len(block)):
                fh.write(block)
    return out.getvalue()


def _peak_mib(fn) -> float:
    import tracemalloc

    tracemalloc.start()
    try:
        fn()
    except BundleError:
        pass
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak / 2**20


def test_a_forged_zip_bomb_is_refused_before_any_member_is_inflated(bundle, signing_key, other_key):
    bomb = _bomb(bundle[0], sign_with=other_key)
    assert len(bomb) < 1024 * 1024
    with pytest.raises(SignatureError) as err:
        read_bundle(bomb, trust=trust(signing_key))
    assert err.value.reason is ReasonCode.KEY_UNKNOWN
    peak = _peak_mib(lambda: read_bundle(bomb, trust=trust(signing_key)))
    assert peak < 8, f"{peak:.1f} MiB allocated refusing a forged bomb"


def test_a_signed_manifest_caps_inflation_at_each_members_declared_size(bundle, signing_key):
    bomb = _bomb(bundle[0])  # the genuine signature: the manifest declares the real size
    for kwargs in ({"trust": trust(signing_key)}, {}):
        with pytest.raises(ArchiveError) as err:
            read_bundle(bomb, **kwargs)
        assert err.value.reason is ReasonCode.HASH_MISMATCH
        peak = _peak_mib(lambda kw=kwargs: read_bundle(bomb, **kw))
        assert peak < 8, f"{peak:.1f} MiB allocated inflating a 64 MiB member ({kwargs})"


def test_with_trust_an_unlisted_member_is_refused_before_it_is_inflated(bundle, signing_key):
    def add(name, payload):
        extra = [("extra.bin", b"x" * 10)] if name == "manifest.sig" else []
        return [(name, payload), *extra]

    with pytest.raises(ArchiveError, match="unlisted"):
        read_bundle(rezip(bundle[0], add), trust=trust(signing_key))


def test_anti_rollback_is_per_model_name_and_another_name_needs_replace_model(signing_key):
    wine, _ = make_bundle(signing_key, name="wine", version="1.0.0", release=1)
    b = read_bundle(wine)
    with pytest.raises(BundleError) as err:
        verify_bundle(b, trust(signing_key), installed_release=5, active_name="iris")
    assert err.value.reason is ReasonCode.MODEL_NAME_MISMATCH
    m = verify_bundle(
        b, trust(signing_key), installed_release=5, active_name="iris", replace_model=True
    )
    assert m.name == "wine"  # iris's release 5 does not count against wine
    with pytest.raises(BundleError) as err:
        verify_bundle(
            b,
            trust(signing_key),
            installed_release=5,
            active_name="iris",
            installed={"iris": 5, "wine": 1},
            replace_model=True,
        )
    assert err.value.reason is ReasonCode.RELEASE_NOT_NEWER


def test_a_command_key_cannot_sign_a_bundle(signing_key, command_key):
    forged, _ = make_bundle(command_key)
    store = TrustStore.from_keys(
        [signing_key.public], role="bundle", other_role=[command_key.key_id]
    )
    with pytest.raises(SignatureError) as err:
        read_bundle(forged, trust=store)
    assert err.value.reason is ReasonCode.KEY_WRONG_ROLE
