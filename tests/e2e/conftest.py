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
