"""The agent's private files: 0600 files in 0700 folders whatever the umask."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from agent.identity import DeviceIdentity, load_or_create_key
from agent.outbox import Outbox
from agent.prediction_log import PredictionLog
from agent.slots import Slots
from protocol import KeyPair
from tests.support.bundles import make_bundle


@pytest.mark.parametrize("umask", [0o022, 0o000])
def test_data_folder_slots_outbox_log_and_key_are_private(
    tmp_path: Path, signing_key: KeyPair, umask: int
) -> None:
    data = tmp_path / "data"
    bundle, manifest = make_bundle(signing_key)
    old = os.umask(umask)
    try:
        ident = DeviceIdentity("d1", data, token="efe_t")
        slots = Slots(data / "slots", keep_previous=2)
        slots.activate(slots.write(bundle, manifest))
        box = Outbox(data / "outbox.db", 1 << 20)
        box.close()
        log = PredictionLog(data / "predictions.db").start()
        log.close()
    finally:
        os.umask(old)

    def mode(p: Path) -> int:
        return stat.S_IMODE(p.stat().st_mode)

    assert mode(data) == 0o700
    files = [p for p in data.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"device_key.pem", "boot", "outbox.db", "predictions.db", "bundle.efb"} <= names
    assert {str(p.relative_to(data)): oct(mode(p)) for p in files if mode(p) != 0o600} == {}
    dirs = [p for p in data.rglob("*") if p.is_dir()]
    assert {str(p.relative_to(data)): oct(mode(p)) for p in dirs if mode(p) != 0o700} == {}
    assert ident.boot == 1 and ident.proof


def test_the_device_key_is_created_once_and_the_boot_counter_grows(tmp_path: Path) -> None:
    a = DeviceIdentity("d1", tmp_path)
    b = DeviceIdentity("d1", tmp_path)
    assert a.key_id == b.key_id == load_or_create_key(tmp_path).key_id
    assert (a.boot, b.boot) == (1, 2)
    assert a.proof is None
