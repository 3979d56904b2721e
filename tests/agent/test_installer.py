from __future__ import annotations

import errno
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

import agent.slots as slots_mod
from agent.errors import SlotError
from protocol import BundleError, ReasonCode, SmokeTest, pack_bundle, read_bundle
from tests.agent.agent_env import IRIS_ROW, make_device
from tests.support.bundles import make_bundle


@pytest.fixture(scope="module")
def v1(signing_key):
    return make_bundle(signing_key, version="1.0.0", release=1)


@pytest.fixture(scope="module")
def v2(signing_key):
    return make_bundle(signing_key, version="1.1.0", release=2)


def _reject(device, data: bytes, reason: ReasonCode, **kw) -> BundleError:
    before = device.predictor.model
    with pytest.raises(BundleError) as info:
        device.installer.install_bytes(data, **kw)
    assert info.value.reason == reason, str(info.value)
    assert device.predictor.model == before  # the running model keeps serving
    last = device.events[-1]
    assert last.reason == reason.value and last.state in ("rejected", "failed")
    return info.value


def test_valid_bundle_installs_and_reports_each_step(tmp_path: Path, signing_key, v1) -> None:
    dev = make_device(tmp_path, signing_key)
    manifest = dev.installer.install_bytes(v1[0])
    assert manifest == v1[1]
    assert [e.state for e in dev.events] == ["verifying", "installed"]
    assert dev.events[-1].model is not None and dev.events[-1].model.version == "1.0.0"
    assert dev.predictor.model is not None and dev.predictor.model.release == 1
    assert dev.installer.active() == v1[1]


def test_install_rejects_bundle_when_signature_key_unknown(
    tmp_path: Path, signing_key, other_key
) -> None:
    dev = make_device(tmp_path, signing_key)
    _reject(dev, make_bundle(other_key)[0], ReasonCode.KEY_UNKNOWN)


def test_install_rejects_bundle_signed_by_revoked_key(tmp_path: Path, signing_key, v1) -> None:
    dev = make_device(tmp_path, signing_key, revoked=(signing_key.key_id,))
    _reject(dev, v1[0], ReasonCode.KEY_REVOKED)


def test_install_rejects_tampered_manifest(tmp_path: Path, signing_key, v1) -> None:
    b = read_bundle(v1[0])
    forged = b.manifest_bytes.replace(b'"release":1', b'"release":9')
    dev = make_device(tmp_path, signing_key)
    _reject(dev, pack_bundle(forged, b.signature, b.members), ReasonCode.SIGNATURE_INVALID)


def test_install_rejects_tampered_model_file(tmp_path: Path, signing_key, v1) -> None:
    b = read_bundle(v1[0])
    members = dict(b.members)
    model = bytearray(members["model.onnx"])
    model[-5] ^= 0xFF
    members["model.onnx"] = bytes(model)
    dev = make_device(tmp_path, signing_key)
    _reject(dev, pack_bundle(b.manifest_bytes, b.signature, members), ReasonCode.HASH_MISMATCH)


def test_install_rejects_a_replayed_older_release(tmp_path: Path, signing_key, v1, v2) -> None:
    dev = make_device(tmp_path, signing_key)
    dev.installer.install_bytes(v2[0])
    _reject(dev, v1[0], ReasonCode.RELEASE_NOT_NEWER)
    _reject(dev, v2[0], ReasonCode.RELEASE_NOT_NEWER)  # the same release again
    assert dev.installer.install_bytes(v1[0], allow_older=True).release == 1


def test_install_rejects_expired_bundle(tmp_path: Path, signing_key) -> None:
    old = datetime.now(timezone.utc) - timedelta(days=10)
    data, _ = make_bundle(signing_key, created_at=old, expires_in=timedelta(days=1))
    _reject(make_device(tmp_path, signing_key), data, ReasonCode.EXPIRED)


def test_install_rejects_bundle_for_another_profile(tmp_path: Path, signing_key) -> None:
    data, _ = make_bundle(signing_key, profiles=("raspberry-pi-4",))
    _reject(make_device(tmp_path, signing_key), data, ReasonCode.PROFILE_INCOMPATIBLE)


def test_install_rejects_model_that_does_not_load(tmp_path: Path, signing_key) -> None:
    smoke = SmokeTest(rows=[IRIS_ROW], expected_labels=[0])
    data, _ = make_bundle(signing_key, model_bytes=b"\x08garbage", smoke=smoke)
    _reject(make_device(tmp_path, signing_key), data, ReasonCode.MODEL_LOAD_FAILED)


def test_install_rejects_bundle_whose_smoke_test_fails(tmp_path: Path, signing_key, v1) -> None:
    good = v1[1].smoke_tests[0]
    wrong_labels = good.model_copy(update={"expected_labels": [2] * len(good.rows)})
    data, _ = make_bundle(signing_key, smoke=wrong_labels)
    err = _reject(make_device(tmp_path / "a", signing_key), data, ReasonCode.SMOKE_TEST_FAILED)
    assert "labels" in str(err)
    probs = np.asarray(good.expected_probabilities)
    shifted = good.model_copy(update={"expected_probabilities": (probs + 0.01).tolist()})
    data, _ = make_bundle(signing_key, smoke=shifted)
    err = _reject(make_device(tmp_path / "b", signing_key), data, ReasonCode.SMOKE_TEST_FAILED)
    assert "atol" in str(err)


def test_fault_injection_fails_the_smoke_test(tmp_path: Path, signing_key, v1) -> None:
    dev = make_device(tmp_path, signing_key, faults={"fail_smoke_test": True})
    err = _reject(dev, v1[0], ReasonCode.SMOKE_TEST_FAILED)
    assert "fault injected" in str(err)


def test_checks_run_in_order_and_the_first_failure_is_reported(
    tmp_path: Path, signing_key, other_key
) -> None:
    old = datetime.now(timezone.utc) - timedelta(days=10)
    expired_wrong_profile, _ = make_bundle(
        signing_key, created_at=old, expires_in=timedelta(days=1), profiles=("raspberry-pi-4",)
    )
    _reject(make_device(tmp_path / "a", signing_key), expired_wrong_profile, ReasonCode.EXPIRED)
    untrusted_and_expired, _ = make_bundle(other_key, created_at=old, expires_in=timedelta(days=1))
    _reject(make_device(tmp_path / "b", signing_key), untrusted_and_expired, ReasonCode.KEY_UNKNOWN)


def test_not_a_bundle_is_rejected(tmp_path: Path, signing_key) -> None:
    _reject(
        make_device(tmp_path, signing_key), b"PK\x03\x04 not really", ReasonCode.ARCHIVE_INVALID
    )


def test_full_disk_fails_install_and_old_model_keeps_serving(
    tmp_path: Path, signing_key, v1, v2, monkeypatch
) -> None:
    dev = make_device(tmp_path, signing_key)
    dev.installer.install_bytes(v1[0])

    def disk_full(path: Path, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(slots_mod, "_write_bytes", disk_full)
    _reject(dev, v2[0], ReasonCode.DISK_FULL)
    assert dev.events[-1].state == "failed"
    assert dev.predictor.predict([IRIS_ROW]).model.version == "1.0.0"
    assert dev.installer.active() == v1[1]


def test_rollback_goes_to_previous_slot_and_to_a_named_release(
    tmp_path: Path, signing_key, v1, v2
) -> None:
    dev = make_device(tmp_path, signing_key)
    v3 = make_bundle(signing_key, version="1.2.0", release=3)
    for b in (v1, v2, v3):
        dev.installer.install_bytes(b[0])
    assert [m.release for m in dev.installer.history()] == [3, 2, 1]
    assert dev.installer.rollback().release == 2
    assert dev.predictor.model is not None and dev.predictor.model.release == 2
    assert dev.events[-1].state == "rolled_back"
    assert dev.installer.rollback(to_release=3).release == 3  # anti-rollback does not apply
    assert dev.installer.rollback(to_release=1).release == 1
    with pytest.raises(SlotError, match="no previous"):
        dev.installer.rollback()
    with pytest.raises(SlotError, match="release 7 is not installed"):
        dev.installer.rollback(to_release=7)


def test_install_persists_across_restart(tmp_path: Path, signing_key, v1) -> None:
    from agent.predictor import Predictor

    dev = make_device(tmp_path, signing_key)
    dev.installer.install_bytes(v1[0])
    again = Predictor.from_config(dev.config)
    assert again.model == dev.predictor.model
    assert again.predict([IRIS_ROW]).labels == dev.predictor.predict([IRIS_ROW]).labels


def test_requests_in_flight_during_swaps_are_never_dropped(
    tmp_path: Path, signing_key, v1, v2
) -> None:
    dev = make_device(tmp_path, signing_key)
    dev.installer.install_bytes(v1[0])
    versions = {}
    for data, manifest in (v1, v2):
        versions[manifest.version] = (manifest, read_bundle(data).model_bytes())
    errors: list[BaseException] = []
    answered: list[str] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                answered.append(dev.predictor.predict([IRIS_ROW]).model.version)
            except Exception as exc:
                errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    i, deadline = 0, time.monotonic() + 60
    # Swap at least 20 times, and until both versions have answered (a loaded CI machine
    # may not schedule the clients between a few fast swaps).
    while (i < 20 or len(set(answered)) < 2) and time.monotonic() < deadline:
        dev.predictor.swap(*versions["1.1.0" if i % 2 == 0 else "1.0.0"])
        i += 1
        time.sleep(0.002)
    stop.set()
    for t in threads:
        t.join()
    assert not errors
    assert set(answered) == {"1.0.0", "1.1.0"}


def test_install_rejects_unsigned_bundle(tmp_path: Path, signing_key, v1) -> None:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(v1[0])) as src, zipfile.ZipFile(buf, "w") as dst:
        for info in src.infolist():
            if info.filename != "manifest.sig":
                dst.writestr(info.filename, src.read(info))
    dev = make_device(tmp_path, signing_key)
    dev.installer.install_bytes(v1[0])
    _reject(dev, buf.getvalue(), ReasonCode.MISSING_FILE)
    assert dev.predictor.predict([IRIS_ROW]).model.version == "1.0.0"


def test_install_rejects_truncated_bundle(tmp_path: Path, signing_key, v1) -> None:
    _reject(
        make_device(tmp_path, signing_key), v1[0][: len(v1[0]) // 2], ReasonCode.ARCHIVE_INVALID
    )
