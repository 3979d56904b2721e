"""The driver saves only the devices of a rollout that changed (fleet_server.rollout_saves)."""

from __future__ import annotations

from dataclasses import asdict

from fleet_server.rollout_engine import Decision, Rollout, RolloutSpec
from fleet_server.rollout_saves import SavedRows


def _rollout() -> Rollout:
    spec = RolloutSpec(bundle_sha256="a" * 64, stages=(50, 100))
    return Rollout.plan("r-1", spec, ["a", "b", "c", "d"], 1.0)


def test_hand_written_to_dict_matches_asdict_for_every_field() -> None:
    r = _rollout()
    r.start(2.0, ["a", "b", "c", "d"])
    for dev in r.devices.values():
        dev.previous = {"name": "iris", "version": "1.0.0", "release": 1}
    doc = r.to_dict()
    assert doc["stages"] == [asdict(s) for s in r.stages]
    assert doc["devices"] == [asdict(d) for d in r.devices.values()]
    for d in [Decision("device", "x", device_id="a", stage=0), Decision("rollout", "y")]:
        assert d.to_dict() == {k: v for k, v in asdict(d).items() if v is not None}
    doc["devices"][0]["previous"]["name"] = "changed"  # a copy: the engine's dict is untouched
    assert r.devices[doc["devices"][0]["device_id"]].previous == {
        "name": "iris",
        "version": "1.0.0",
        "release": 1,
    }


def test_saved_rows_name_the_devices_changed_since_the_last_save_of_that_object() -> None:
    saved, r = SavedRows(), _rollout()
    assert saved.changed(r) is None  # never saved: every row
    saved.saved(r, None)
    assert saved.changed(r) == []
    r.start(2.0, ["a", "b", "c", "d"])
    sent = [d.device_id for d in r.devices.values() if d.sent_at is not None]
    assert sent and saved.changed(r) == sent
    assert [d["device_id"] for d in r.to_dict(sent)["devices"]] == sent
    saved.saved(r, sent)
    r.on_status(sent[0], "installed", 3.0)
    assert saved.changed(r) == [sent[0]]
    r.devices[sent[-1]].previous = {"name": "iris"}  # set by the driver, not the engine
    assert saved.changed(r) == [sent[0], sent[-1]]
    # the same rollout read back from the registry (a takeover) is another object: all rows
    again = Rollout.from_dict(r.to_dict())
    assert saved.changed(again) is None
    saved.keep(set())
    assert saved.changed(r) is None
