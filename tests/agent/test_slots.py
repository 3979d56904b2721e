from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

import agent.slots as slots_mod
from agent.errors import SlotError
from agent.slots import STATE_FILE, Slots, atomic_write
from tests.support.bundles import make_bundle


@pytest.fixture(scope="module")
def bundles(signing_key):
    return [make_bundle(signing_key, version=f"1.{i}.0", release=i + 1) for i in range(4)]


def _install(slots: Slots, bundle) -> str:
    data, manifest = bundle
    slot = slots.write(data, manifest)
    slots.activate(slot)
    return slot


def test_active_slot_survives_a_restart(tmp_path: Path, bundles) -> None:
    s1 = _install(Slots(tmp_path), bundles[0])
    s2 = _install(Slots(tmp_path), bundles[1])
    again = Slots(tmp_path)
    assert again.active_id() == s2
    loaded = again.load_active()
    assert loaded is not None and loaded.manifest.version == "1.1.0"
    assert again.order() == [s1, s2]


def test_keeps_only_n_previous_slots(tmp_path: Path, bundles) -> None:
    slots = Slots(tmp_path, keep_previous=2)
    ids = [_install(slots, b) for b in bundles]
    assert slots.order() == ids[-3:]
    assert not (tmp_path / ids[0]).exists()


def test_corrupt_active_slot_falls_back_to_previous_verified_slot(tmp_path: Path, bundles) -> None:
    slots = Slots(tmp_path)
    first = _install(slots, bundles[0])
    second = _install(slots, bundles[1])
    path = tmp_path / second / "bundle.efb"
    path.write_bytes(path.read_bytes()[:100])  # torn write
    fresh = Slots(tmp_path)
    loaded = fresh.load_active()
    assert loaded is not None and loaded.slot_id == first
    assert fresh.recovered_from is not None and fresh.recovered_from[0] == second
    assert fresh.active_id() == first  # the state now says so


def test_missing_active_slot_falls_back_to_previous(tmp_path: Path, bundles) -> None:
    import shutil

    slots = Slots(tmp_path)
    first = _install(slots, bundles[0])
    second = _install(slots, bundles[1])
    shutil.rmtree(tmp_path / second)
    loaded = Slots(tmp_path).load_active()
    assert loaded is not None and loaded.slot_id == first


def test_garbled_state_file_recovers_newest_slot(tmp_path: Path, bundles) -> None:
    slots = Slots(tmp_path)
    _install(slots, bundles[0])
    second = _install(slots, bundles[1])
    (tmp_path / STATE_FILE).write_text("{not json")
    loaded = Slots(tmp_path).load_active()
    assert loaded is not None and loaded.slot_id == second


def test_no_slots_means_nothing_active(tmp_path: Path) -> None:
    slots = Slots(tmp_path / "none")
    assert slots.load_active() is None
    assert slots.previous_id() is None


def test_full_disk_while_writing_leaves_no_partial_slot(
    tmp_path: Path, bundles, monkeypatch
) -> None:
    slots = Slots(tmp_path)
    first = _install(slots, bundles[0])

    def disk_full(path: Path, data: bytes) -> None:
        path.write_bytes(data[:10])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(slots_mod, "_write_bytes", disk_full)
    with pytest.raises(OSError):
        slots.write(*bundles[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first, STATE_FILE])
    assert slots.active_id() == first


def test_atomic_write_replaces_the_file_without_leftovers(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    atomic_write(target, b'{"a": 1}')
    atomic_write(target, b'{"a": 2}')
    assert json.loads(target.read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_switch_to_unknown_slot_is_refused(tmp_path: Path, bundles) -> None:
    slots = Slots(tmp_path)
    _install(slots, bundles[0])
    with pytest.raises(SlotError):
        slots.switch("r00000099-000000000000")
