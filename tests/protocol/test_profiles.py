"""Every shipped device profile loads and says where its speed factor comes from."""

from __future__ import annotations

import pytest

from protocol import ProfileError, list_profiles, load_profile

REQUIRED = {"raspberry-pi-4", "raspberry-pi-5", "jetson-orin-nano", "coral-dev-board", "host"}


def test_every_profile_loads_and_required_ones_exist():
    profiles = {p.name: p for p in list_profiles()}
    assert set(profiles) >= REQUIRED
    assert any(p.arch == "x86_64" and "Atom" in p.cpu for p in profiles.values())


@pytest.mark.parametrize("profile", list_profiles(), ids=lambda p: p.name)
def test_profile_is_complete(profile):
    assert profile.inference_threads <= profile.cores
    assert profile.latency_budget_ms > 0
    assert profile.speed_factor_source, "speed factor must say where it comes from"
    assert profile.runtime_for(profile.preferred_format) is not None


def test_coral_prefers_full_int8_tflite():
    p = load_profile("coral-dev-board")
    assert (p.preferred_format, p.preferred_precision) == ("tflite", "int8")


def test_unknown_profile_lists_known_ones():
    with pytest.raises(ProfileError, match="raspberry-pi-4"):
        load_profile("toaster")


def test_profile_from_path_and_invalid_field(tmp_path):
    good = tmp_path / "mine.toml"
    good.write_text(
        'name = "mine"\ndescription = "x"\narch = "x86_64"\ncpu = "c"\n'
        "cores = 1\ninference_threads = 1\n"
        "memory_budget_mb = 10\nstorage_budget_mb = 10\nspeed_factor = 2.0\n"
        '[[runtimes]]\nname = "onnxruntime"\nversion = "1"\nformats = ["onnx"]\n'
    )
    assert load_profile(str(good)).speed_factor == 2.0
    bad = tmp_path / "bad.toml"
    bad.write_text(good.read_text().replace("cores = 1", "cores = 0"))
    with pytest.raises(ProfileError, match="cores"):
        load_profile(str(bad))
    broken = tmp_path / "broken.toml"
    broken.write_text("name = ")
    with pytest.raises(ProfileError, match="TOML"):
        load_profile(str(broken))
