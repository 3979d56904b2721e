"""Fixtures of the fault and attack suite: signed bundles, key files, a Mosquitto per test.

Bundles are built once per session from models trained here (iris logistic regression,
digits random forest); keys come from the session's ``signing_key`` / ``other_key``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from protocol import KeyPair, Manifest
from tests.e2e.support import write_public_keys
from tests.support.brokers import MOSQUITTO, Mosquitto
from tests.support.bundles import make_bundle


@dataclass(frozen=True)
class Release:
    data: bytes
    manifest: Manifest

    @property
    def version(self) -> str:
        return self.manifest.version

    def write(self, folder: Path, name: str | None = None) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / (name or self.manifest.bundle_filename)
        path.write_bytes(self.data)
        return path


@pytest.fixture(scope="session")
def iris_v1(signing_key: KeyPair) -> Release:
    return Release(*make_bundle(signing_key, version="1.0.0", release=1))


@pytest.fixture(scope="session")
def iris_v2(signing_key: KeyPair) -> Release:
    return Release(*make_bundle(signing_key, version="2.0.0", release=2))


@pytest.fixture(scope="session")
def iris_v3(signing_key: KeyPair) -> Release:
    return Release(*make_bundle(signing_key, version="3.0.0", release=3))


@pytest.fixture(scope="session")
def key_files(
    tmp_path_factory: pytest.TempPathFactory, signing_key: KeyPair, other_key: KeyPair
) -> dict[str, Path]:
    """Public key files: ``signing`` (trusted by devices) and ``other`` (an outsider's)."""
    folder = tmp_path_factory.mktemp("keys")
    signing, other = write_public_keys(folder, signing_key, other_key)
    return {"signing": signing, "other": other}


@pytest.fixture
def mosquitto() -> Iterator[Mosquitto]:
    """A fresh Mosquitto for one test (persistence on, so stop()/start() keeps sessions)."""
    if MOSQUITTO is None:
        pytest.skip("mosquitto is not installed (CI installs it)")
    with Mosquitto() as broker:
        yield broker


# -- hostile bundles ------------------------------------------------------------------------


def _repack(bundle: bytes, *, manifest: bytes | None = None, members: dict | None = None) -> bytes:
    """Rebuild a bundle with its signature kept, replacing the manifest and/or members."""
    from protocol import pack_bundle, read_bundle

    b = read_bundle(bundle)
    files = dict(b.members)
    files.update(members or {})
    return pack_bundle(manifest if manifest is not None else b.manifest_bytes, b.signature, files)


def _zip(entries: list[tuple[str, bytes]]) -> bytes:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries:
            zf.writestr(zipfile.ZipInfo(name, (2020, 1, 1, 0, 0, 0)), data)
    return buf.getvalue()


def _bomb_member(name: str, size: int) -> bytes:
    """A zip with one deflated member of ``size`` zero bytes (stays small on the wire)."""
    import struct
    import zlib

    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = bytes(1 << 20)
    parts, crc, left = [], 0, size
    while left:
        piece = block[: min(left, len(block))]
        crc = zlib.crc32(piece, crc)
        parts.append(comp.compress(piece))
        left -= len(piece)
    parts.append(comp.flush())
    data = b"".join(parts)
    fn = name.encode()
    local = struct.pack(
        "<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0x5021, crc, len(data), size, len(fn), 0
    )
    central = struct.pack(
        "<IHHHHHHIIIHHHHHII",
        0x02014B50,
        20,
        20,
        0,
        8,
        0,
        0x5021,
        crc,
        len(data),
        size,
        len(fn),
        0,
        0,
        0,
        0,
        0,
        0,
    )
    cd_offset = len(local) + len(fn) + len(data)
    cd = central + fn
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(cd), cd_offset, 0)
    return local + fn + data + cd + end


@pytest.fixture(scope="session")
def other_iris_model() -> bytes:
    """A second, different iris model (a decision tree) with the same input/output schema."""
    from skl2onnx import to_onnx
    from sklearn.tree import DecisionTreeClassifier

    from tests.support.bundles import trained

    tm = trained("iris-logreg")
    tree = DecisionTreeClassifier(max_depth=2, random_state=0).fit(tm.X, tm.y)
    onx = to_onnx(
        tree,
        tm.X[:1],
        options={id(tree): {"zipmap": False}},
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    return onx.SerializeToString()


@pytest.fixture(scope="session")
def revoked_key() -> KeyPair:
    """A key devices still list but have revoked."""
    return KeyPair.generate()


@pytest.fixture(scope="session")
def hostile_bundles(
    signing_key: KeyPair, other_key: KeyPair, revoked_key: KeyPair, other_iris_model: bytes
) -> dict[str, tuple[bytes, str]]:
    """``attack name → (bundle bytes, the reason code a device must refuse it with)``.

    Devices under attack serve iris 1.1.0 (release 2); every bundle here is refused.
    """
    import dataclasses
    from datetime import datetime, timedelta, timezone

    from protocol import canonical_bytes, parse_manifest, read_bundle
    from protocol.bundle import MAX_MEMBER_BYTES
    from tests.support.bundles import TrainedModel, smoke_test, trained

    good, _ = make_bundle(signing_key, version="2.0.0", release=3)
    b = read_bundle(good)
    flipped = bytearray(b.members["model.onnx"])
    flipped[len(flipped) // 2] ^= 0xFF
    m = b.manifest.model_copy(update={"release": 99})
    tree = dataclasses.replace(trained("iris-logreg"), onnx=other_iris_model)
    assert isinstance(tree, TrainedModel)
    tree_bundle, _ = make_bundle(
        signing_key,
        version="2.1.0",
        release=4,
        model_bytes=other_iris_model,
        smoke=smoke_test(tree),
    )
    past = datetime.now(timezone.utc) - timedelta(days=10)
    older, _ = make_bundle(signing_key, version="1.0.0", release=1)
    traversal = _zip(
        [
            ("manifest.json", b.manifest_bytes),
            ("manifest.sig", b.signature.to_bytes()),
            ("../../evil.sh", b"#!/bin/sh\necho owned\n"),
            *sorted(b.members.items()),
        ]
    )
    assert parse_manifest(canonical_bytes(m)).release == 99
    return {
        "tampered_model": (_repack(good, members={"model.onnx": bytes(flipped)}), "hash_mismatch"),
        "tampered_manifest": (_repack(good, manifest=canonical_bytes(m)), "signature_invalid"),
        "unknown_key": (make_bundle(other_key, version="2.0.0", release=3)[0], "key_unknown"),
        "revoked_key": (make_bundle(revoked_key, version="2.0.0", release=3)[0], "key_revoked"),
        "expired": (
            make_bundle(
                signing_key,
                version="2.0.0",
                release=3,
                created_at=past,
                expires_in=timedelta(days=1),
            )[0],
            "expired",
        ),
        "replayed_older_release": (older, "release_not_newer"),
        "mixed_releases": (
            _repack(good, members={"model.onnx": read_bundle(tree_bundle).members["model.onnx"]}),
            "hash_mismatch",
        ),
        "path_traversal": (traversal, "archive_unsafe"),
        "oversize_member": (_bomb_member("model.onnx", MAX_MEMBER_BYTES + 1), "archive_unsafe"),
    }
