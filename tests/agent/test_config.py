from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import (
    DEFAULT_API_PORT,
    AgentConfig,
    TrustConfig,
    example_config,
    load_config,
    parse_config,
)
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
    path.write_text(
        'data_dir = "data"\n[trust]\nbundle_keys = ["keys/a.pub", "/abs/b.pub"]\n'
        'command_keys = ["keys/c.pub"]\n'
    )
    cfg = load_config(path)
    assert cfg.data_dir == tmp_path / "etc" / "data"
    assert cfg.trust.bundle_keys == [tmp_path / "etc" / "keys" / "a.pub", Path("/abs/b.pub")]
    assert cfg.trust.command_keys == [tmp_path / "etc" / "keys" / "c.pub"]


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
        ('[broker]\nurl = "http://x"\n', r"broker\.url: .*scheme must be mqtt"),
        ('[broker]\nurls = ["mqtt://a", "mqtts://b"]\n', r"broker\.urls: .*mix mqtt"),
        ('[broker]\nurls = ["mqtt://a:0x"]\n', r"broker\.urls: .*port must be"),
        ('[broker]\nurl = "mqtt://a"\nurls = ["mqtt://b"]\n', "url .* or urls"),
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


def test_trust_stores_load_both_roles_and_revocations(
    tmp_path: Path, signing_key, other_key, command_key
) -> None:
    (tmp_path / "a.pub").write_bytes(signing_key.public_pem())
    (tmp_path / "c.pub").write_bytes(command_key.public_pem())
    cfg = parse_config(
        f'[trust]\nbundle_keys = ["a.pub"]\ncommand_keys = ["c.pub"]\n'
        f'revoked = ["{other_key.key_id}"]\n',
        base=tmp_path,
    )
    bundle, command = cfg.trust_stores()
    assert list(bundle.keys) == [signing_key.key_id] and bundle.role == "bundle"
    assert list(command.keys) == [command_key.key_id] and command.role == "command"
    assert bundle.revoked == command.revoked == {other_key.key_id}
    bad = parse_config('[trust]\nbundle_keys = ["missing.pub"]\n', base=tmp_path)
    with pytest.raises(ConfigError, match=r"missing\.pub"):
        bad.trust_stores()


def test_a_config_with_the_old_public_keys_gets_one_line_saying_what_to_change(
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config('[trust]\npublic_keys = ["a.pub"]\n', "agent.toml", base=tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and "trust.bundle_keys" in msg and "trust.command_keys" in msg
    with pytest.raises(ConfigError, match=r"trust\.bundle_keys"):
        TrustConfig(public_keys=[Path("a.pub")])  # type: ignore[call-arg]


def test_the_same_key_in_both_roles_is_refused(tmp_path: Path, signing_key) -> None:
    (tmp_path / "a.pub").write_bytes(signing_key.public_pem())
    cfg = parse_config(
        '[trust]\nbundle_keys = ["a.pub"]\ncommand_keys = ["a.pub"]\n', base=tmp_path
    )
    with pytest.raises(ConfigError, match="both a bundle key and a command key"):
        cfg.trust_stores()


def test_artifact_origins_must_be_bare_origins() -> None:
    assert TrustConfig(artifact_origins=["https://Fleet.example:8700/"]).artifact_origins == [
        "https://fleet.example:8700"
    ]
    for bad in ("https://fleet.example/v1/artifacts", "ftp://fleet", "https://u@fleet"):
        with pytest.raises(ValueError):
            TrustConfig(artifact_origins=[bad])


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


def test_broker_urls_are_a_failover_list_and_url_still_works() -> None:
    assert parse_config('[broker]\nurl = "mqtt://a:1"\n').broker.all_urls() == ["mqtt://a:1"]
    cfg = parse_config('[broker]\nurls = ["mqtt://a:1", "mqtt://b:2"]\n')
    assert cfg.broker.all_urls() == ["mqtt://a:1", "mqtt://b:2"]


def test_agent_init_takes_repeated_brokers_as_a_failover_list(tmp_path: Path) -> None:
    from tests.support.cli import run_cli

    out = tmp_path / "agent.toml"
    args = ["agent", "init", "--out", str(out)]
    result = run_cli([*args, "--broker", "mqtt://n1:1883", "--broker", "mqtt://n2:1883"])
    assert result.exit_code == 0, result.output
    assert load_config(out).broker.all_urls() == ["mqtt://n1:1883", "mqtt://n2:1883"]
    bad = run_cli([*args, "--force", "--broker", "mqtt://n1", "--broker", "mqtts://n2"])
    assert bad.exit_code != 0
    assert "mix mqtt:// and mqtts://" in bad.output
