from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import DEFAULT_API_PORT, AgentConfig, example_config, load_config, parse_config
from agent.errors import ConfigError


def test_example_config_loads_back_into_the_defaults() -> None:
    assert parse_config(example_config()) == AgentConfig()


def test_example_config_documents_every_section() -> None:
    text = example_config()
    for section in (
        "broker",
        "trust",
        "api",
        "log",
        "sketch",
        "outbox",
        "slots",
        "fallback",
        "runtime",
        "faults",
    ):
        assert f"[{section}]" in text
    assert "TESTS AND DEMOS ONLY" in text


def test_api_binds_localhost_on_the_documented_port_by_default() -> None:
    cfg = AgentConfig()
    assert (cfg.api.host, cfg.api.port) == ("127.0.0.1", DEFAULT_API_PORT)
    assert str(DEFAULT_API_PORT) in example_config()


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "agent.toml"
    path.parent.mkdir()
    path.write_text('data_dir = "data"\n[trust]\npublic_keys = ["keys/a.pub", "/abs/b.pub"]\n')
    cfg = load_config(path)
    assert cfg.data_dir == tmp_path / "etc" / "data"
    assert cfg.trust.public_keys == [tmp_path / "etc" / "keys" / "a.pub", Path("/abs/b.pub")]


def test_password_file_is_read_and_never_shown_in_repr(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("s3cret\n")
    (tmp_path / "agent.toml").write_text('[broker]\nusername = "d1"\npassword_file = "pw"\n')
    cfg = load_config(tmp_path / "agent.toml")
    assert cfg.broker.resolved_password() == "s3cret"
    inline = parse_config('[broker]\npassword = "hunter2"\n')
    assert "hunter2" not in repr(inline)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("device_id = ", "not valid TOML"),
        ("[api]\nport = 70000\n", "api.port"),
        ("[log]\nmax_rows = 0\n", "log.max_rows"),
        ("colour = 'blue'\n", "colour"),
        ('[fallback]\nkind = "guess"\n', "fallback.kind"),
        ('[broker]\npassword = "a"\npassword_file = "b"\n', "password_file"),
        ('device_id = "a/b"\n', "device_id"),
    ],
)
def test_invalid_config_is_refused_with_the_field_named(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(text, "agent.toml")


def test_missing_config_file_is_one_readable_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.toml")


def test_config_is_frozen() -> None:
    from pydantic import ValidationError

    cfg = AgentConfig()
    with pytest.raises(ValidationError):
        cfg.api.port = 1  # type: ignore[misc]


def test_trust_store_loads_pinned_keys_and_revocations(
    tmp_path: Path, signing_key, other_key
) -> None:
    (tmp_path / "a.pub").write_bytes(signing_key.public_pem())
    cfg = parse_config(
        f'[trust]\npublic_keys = ["a.pub"]\nrevoked = ["{other_key.key_id}"]\n', base=tmp_path
    )
    store = cfg.trust_store()
    assert list(store.keys) == [signing_key.key_id]
    assert store.revoked == {other_key.key_id}
    bad = parse_config('[trust]\npublic_keys = ["missing.pub"]\n', base=tmp_path)
    with pytest.raises(ConfigError, match=r"missing\.pub"):
        bad.trust_store()


def test_unknown_profile_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="profile"):
        AgentConfig(profile="toaster-9000").device_profile()


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        ("[api]\nprot = 1\n", "api.prot: unknown key (did you mean 'port'?)"),
        ("[brokr]\nurl = 'mqtt://x'\n", "brokr: unknown key (did you mean 'broker'?)"),
        ("[log]\nzzz = 1\n", "log.zzz: unknown key (known keys: batch_size, enabled,"),
    ],
)
def test_a_config_typo_names_the_nearest_known_key(text: str, hint: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert hint in str(info.value)
