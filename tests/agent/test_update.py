"""The device's pure update state machine: admission order, transitions, chunk checks.

No broker, no clock, no files: bytes and ``now`` in, actions out.
"""

from __future__ import annotations

import base64
import hashlib
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.update import (
    TERMINAL,
    TRANSITIONS,
    AskMissing,
    IllegalTransition,
    Limits,
    Redeliver,
    Refuse,
    Report,
    Run,
    Seen,
    Update,
    check_chunk,
    origin_of,
)
from protocol import KeyPair, TrustStore
from protocol.messages import (
    ArtifactChunk,
    Command,
    DeployPayload,
    RollbackPayload,
    chunk_hashes,
    sign_command,
)
from tests.support.keys import COMMAND_KEY

DEV = "dev-1"
NOW = datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc)
BUNDLE_KEY = KeyPair.generate()
STRANGER = KeyPair.generate()
REVOKED = KeyPair.generate()
MANIFEST = b'{"name":"iris","release":2,"version":"2.0.0"}'
BUNDLE = bytes(range(256)) * 40  # 10,240 bytes
SHA = hashlib.sha256(BUNDLE).hexdigest()


def machine(**limits: Any) -> Update:
    command = TrustStore.from_keys(
        [COMMAND_KEY.public, REVOKED.public],
        [REVOKED.key_id],
        role="command",
        other_role=[BUNDLE_KEY.key_id],
    )
    bundle = TrustStore.from_keys(
        [BUNDLE_KEY.public], role="bundle", other_role=[COMMAND_KEY.key_id]
    )
    return Update(DEV, command, bundle, ("https://fleet.example:8700",), Limits(**limits))


def deploy(**payload: Any) -> DeployPayload:
    base: dict[str, Any] = {
        "manifest": base64.b64encode(MANIFEST).decode(),
        "manifest_signature": BUNDLE_KEY.sign(MANIFEST),
        "bundle_sha256": SHA,
        "bundle_size": len(BUNDLE),
        "chunk_size": 4096,
        "n_chunks": 3,
        "chunk_hashes": chunk_hashes(BUNDLE, 4096),
    }
    base.update(payload)
    return DeployPayload(**base)


def cmd(
    kind: str = "deploy",
    *,
    key: KeyPair | None = COMMAND_KEY,
    device: str = DEV,
    issued: datetime = NOW,
    ttl: float = 3600,
    cid: str = "c-1",
    **fields: Any,
) -> Command:
    if kind == "deploy" and "deploy" not in fields:
        fields["deploy"] = deploy()
    if kind == "config" and "config" not in fields:
        fields["config"] = {"metrics_interval": 5}
    c = Command(command_id=cid, device_id=device, kind=kind, **fields)  # type: ignore[arg-type]
    return sign_command(c, key, now=issued, ttl_s=ttl) if key is not None else c


def admit(u: Update, c: Command | bytes, now: datetime = NOW) -> Command | Refuse | None:
    return u.admit(c if isinstance(c, bytes) else c.to_json(), now)


def reason(result: Command | Refuse | None) -> str:
    assert isinstance(result, Refuse), result
    assert not result.persist
    return result.reason.value


# -- admission, in order -------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["deploy", "rollback", "benchmark", "config", "shadow_stop"])
def test_every_kind_must_be_signed_by_a_command_key(kind: str) -> None:
    u = machine()
    assert reason(admit(u, cmd(kind, key=None))) == "signature_invalid"
    assert reason(admit(u, cmd(kind, key=BUNDLE_KEY))) == "key_wrong_role"
    assert reason(admit(u, cmd(kind, key=STRANGER))) == "key_unknown"
    assert reason(admit(u, cmd(kind, key=REVOKED))) == "key_revoked"
    assert isinstance(admit(u, cmd(kind)), Command)


def test_checks_run_in_the_stated_order() -> None:
    u = machine()
    late = NOW + timedelta(days=2)
    # forged, misaddressed and expired: the signature decides
    assert reason(admit(u, cmd(key=STRANGER, device="dev-2"), late)) == "key_unknown"
    # signed, misaddressed and expired: the addressee decides
    assert reason(admit(u, cmd(device="dev-2"), late)) == "not_addressed"
    # signed, addressed, expired
    assert reason(admit(u, cmd(), late)) == "command_expired"


def test_freshness_allows_the_configured_skew_and_no_more() -> None:
    u = machine(clock_skew_s=60)
    assert isinstance(admit(u, cmd(issued=NOW + timedelta(seconds=59))), Command)
    assert reason(admit(u, cmd(issued=NOW + timedelta(seconds=61)))) == "command_from_future"
    assert reason(admit(u, cmd(), NOW + timedelta(seconds=3600))) == "command_expired"
    no_times = sign_command(
        Command(command_id="c-9", device_id=DEV, kind="shadow_stop"), COMMAND_KEY
    )
    assert reason(admit(u, no_times)) == "command_invalid"


def test_unparsable_or_out_of_caps_bytes_are_refused_naming_the_command_when_safe() -> None:
    u = machine()
    bad_sha = cmd().to_json().replace(SHA.encode(), b"../../" + b"a" * 58)
    r = admit(u, bad_sha)
    assert reason(r) == "command_invalid" and isinstance(r, Refuse) and r.command_id == "c-1"
    assert admit(u, b"not json") is None  # nothing to answer to
    assert u.refused == {"command_invalid": 2}


def test_a_known_command_id_is_redelivered_never_run_twice() -> None:
    u = machine()
    c = admit(u, cmd())
    assert isinstance(c, Command)
    actions = u.decide(c, Seen("installed", b"{}"))
    assert actions == [Redeliver(c, b"{}", ask_missing=False)]
    actions = u.decide(c, Seen("downloading", None), downloading=True)
    assert actions == [Redeliver(c, None, ask_missing=True)]
    assert u.duplicates == 2 and u.refused["command_replayed"] == 2


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        ({"http_url": "http://169.254.169.254/latest"}, "origin_untrusted"),
        ({"http_url": "https://fleet.example:8701/v1/artifacts/x"}, "origin_untrusted"),
        ({"manifest_signature": COMMAND_KEY.sign(MANIFEST)}, "key_wrong_role"),
        ({"manifest_signature": STRANGER.sign(MANIFEST)}, "key_unknown"),
        ({"manifest_signature": BUNDLE_KEY.sign(b"other")}, "signature_invalid"),
    ],
)
def test_a_deploy_payload_outside_the_limits_is_rejected_and_runs_nothing(
    payload: dict[str, Any], code: str
) -> None:
    u = machine()
    c = admit(u, cmd(deploy=deploy(**payload)))
    assert isinstance(c, Command)
    actions = u.decide(c, None)
    assert len(actions) == 1 and isinstance(actions[0], Report)
    assert (actions[0].state, actions[0].reason.value) == ("rejected", code)  # type: ignore[union-attr]


def test_a_bundle_over_the_device_limit_is_rejected() -> None:
    u = machine(max_bundle_bytes=1000)
    c = admit(u, cmd())
    assert isinstance(c, Command)
    (r,) = u.decide(c, None)
    assert isinstance(r, Report) and r.reason is not None and r.reason.value == "limit_exceeded"


def test_a_good_command_is_accepted_and_its_job_runs() -> None:
    u = machine()
    for kind, job in (("deploy", "download"), ("rollback", "rollback"), ("config", "config")):
        c = admit(u, cmd(kind, cid=f"c-{kind}"))
        assert isinstance(c, Command)
        actions = u.decide(c, None)
        assert [type(a) for a in actions] == [Report, Run]
        assert actions[0].state == "accepted" and actions[1].job == job  # type: ignore[union-attr]
    ok = cmd(deploy=deploy(http_url="https://fleet.example:8700/v1/artifacts/" + SHA), cid="c-h")
    c = admit(u, ok)
    assert isinstance(c, Command) and isinstance(u.decide(c, None)[1], Run)


def test_a_rollback_target_must_name_the_model_files_sha256() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        RollbackPayload.model_validate(
            {"target": {"name": "iris", "version": "1.0.0", "release": 1}}
        )


def test_forged_traffic_is_answered_at_a_bounded_rate_but_every_one_is_counted() -> None:
    u = machine(refusals_per_s=5, refusal_burst=20)
    raw = cmd(key=None).to_json()
    sent = sum(isinstance(u.admit(raw, NOW), Refuse) for _ in range(1000))
    assert sent == 20 and u.refused["signature_invalid"] == 1000 and u.refusals_unsent == 980
    sent = sum(isinstance(u.admit(raw, NOW + timedelta(seconds=2)), Refuse) for _ in range(100))
    assert sent == 10


# -- transitions -----------------------------------------------------------------------------
def test_the_transition_table_refuses_illegal_moves_and_terminal_states_never_change() -> None:
    u = machine()
    c = admit(u, cmd())
    assert isinstance(c, Command)
    u.decide(c, None)
    with pytest.raises(IllegalTransition):
        u.report(c, "installed")  # accepted → installed skips verifying
    u.report(c, "downloading")
    u.report(c, "verifying")
    u.report(c, "installed")
    for state in ("failed", "downloading", "installed"):
        with pytest.raises(IllegalTransition):
            u.report(c, state)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(sorted(TRANSITIONS)), max_size=12))
def test_any_sequence_of_requested_states_follows_the_table(requests: list[str]) -> None:
    u = machine()
    c = admit(u, cmd())
    assert isinstance(c, Command)
    u.decide(c, None)
    state = "accepted"
    for want in requests:
        if want in TRANSITIONS[state]:
            assert u.report(c, want).state == want
            state = want
        else:
            with pytest.raises(IllegalTransition):
                u.report(c, want)
        if state in TERMINAL:
            assert TRANSITIONS[state] == frozenset()


# -- properties: nothing unsigned or altered gets in ---------------------------------------
_MUTATIONS = {
    "device_id": st.sampled_from(["dev-2", "DEV-1", "dev-1 "]),
    "command_id": st.text("abc:-", min_size=1, max_size=8),
    "kind": st.sampled_from(["rollback", "benchmark", "config", "shadow_stop"]),
    "issued_at": st.datetimes(timezones=st.just(timezone.utc)),
    "expires_at": st.datetimes(timezones=st.just(timezone.utc)),
    "rollout_id": st.text("abc", max_size=4),
    "http_url": st.just("https://fleet.example:8700/x"),
    "shadow": st.just(True),
    "replace_model": st.just(True),
    "chunk_size": st.just(5120),
}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(_MUTATIONS)), st.data())
def test_any_change_to_a_signed_command_is_refused(field: str, data: st.DataObject) -> None:
    u = machine()
    good = cmd()
    value = data.draw(_MUTATIONS[field])
    if field in ("http_url", "shadow", "replace_model", "chunk_size"):
        assert good.deploy is not None
        update: dict[str, Any] = {field: value}
        if field == "chunk_size":
            update["n_chunks"] = 2
        changed = good.model_copy(update={"deploy": good.deploy.model_copy(update=update)})
    else:
        if getattr(good, field) == value:
            return
        changed = good.model_copy(update={field: value})
    assert not isinstance(admit(u, changed), Command)
    assert sum(u.refused.values()) == 1


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=300),
        st.dictionaries(
            st.sampled_from(["command_id", "device_id", "kind", "signature", "deploy"]),
            st.one_of(st.text(max_size=20), st.integers(), st.none()),
        ).map(lambda d: __import__("json").dumps(d).encode()),
    )
)
def test_arbitrary_bytes_never_get_in_and_never_raise(raw: bytes) -> None:
    u = machine()
    assert not isinstance(u.admit(raw, NOW), Command)


# -- artifact chunks -------------------------------------------------------------------------
def _chunk(index: int, data: bytes | None = None, **kw: Any) -> bytes:
    piece = data if data is not None else BUNDLE[index * 4096 : (index + 1) * 4096]
    fields: dict[str, Any] = {
        "sha256": SHA,
        "index": index,
        "count": 3,
        "chunk_sha256": hashlib.sha256(piece).hexdigest(),
        "data": base64.b64encode(piece).decode(),
    }
    fields.update(kw)
    return ArtifactChunk(**fields).to_json()


def test_chunks_are_checked_against_the_signed_deploy_before_anything_is_buffered() -> None:
    p = deploy()
    for i in range(3):
        chunk, data, why = check_chunk(p, SHA, _chunk(i))
        assert chunk is not None and why == "" and data == BUNDLE[i * 4096 : (i + 1) * 4096]
    bad = {
        "other artifact (topic)": check_chunk(p, "0" * 64, _chunk(0)),
        "count": check_chunk(p, SHA, _chunk(0, count=4)),
        "index": check_chunk(p, SHA, _chunk(3, data=b"x" * 4096, count=3)),
        "short": check_chunk(p, SHA, _chunk(0, data=b"x" * 100)),
        "long last": check_chunk(p, SHA, _chunk(2, data=b"x" * 4096)),
        "hash": check_chunk(p, SHA, _chunk(1, chunk_sha256="0" * 64)),
        # right size, consistent with its own hash, but not the chunk the deploy signed
        "substitute": check_chunk(p, SHA, _chunk(1, data=b"y" * 4096)),
        "garbage": check_chunk(p, SHA, b"{" * 10_000),
    }
    assert all(c is None and d == b"" and why for c, d, why in bad.values()), bad


def test_an_mqtt_deploy_without_the_signed_chunk_list_is_refused() -> None:
    u = machine()
    c = admit(u, cmd(deploy=deploy(chunk_hashes=None)))
    assert isinstance(c, Command)
    (r,) = u.decide(c, None)
    assert isinstance(r, Report) and r.reason is not None and r.reason.value == "command_invalid"


def test_rotation_accepts_every_listed_command_key_and_revocation_is_per_key() -> None:
    new = KeyPair.generate()
    trust = TrustStore.from_keys([COMMAND_KEY.public, new.public], role="command")
    u = Update(DEV, trust, TrustStore(role="bundle"))
    assert isinstance(admit(u, cmd("shadow_stop", cid="a")), Command)
    assert isinstance(admit(u, cmd("shadow_stop", key=new, cid="b")), Command)
    trust.revoke(COMMAND_KEY.key_id)
    assert reason(admit(u, cmd("shadow_stop", cid="c"))) == "key_revoked"
    assert isinstance(admit(u, cmd("shadow_stop", key=new, cid="d")), Command)


def test_origins_compare_scheme_host_and_port() -> None:
    assert origin_of("https://Fleet.Example:8700/v1/x?y") == "https://fleet.example:8700"
    assert origin_of("http://[::1]:80/a") == "http://[::1]:80"
    for bad in ("file:///etc/passwd", "ftp://x", "https://user@host/", "http://:99999/", "x"):
        assert origin_of(bad) is None, bad


# -- downloads -------------------------------------------------------------------------------
def test_what_follows_a_begun_download_depends_only_on_what_is_on_disk() -> None:
    u = machine()
    c = admit(u, cmd())
    assert isinstance(c, Command)
    u.decide(c, None)
    assert u.download_begun(c, http=True, complete=False, progress=0) == [Run("fetch", c)]
    assert u.download_begun(c, http=False, complete=True, progress=1) == [Run("install", c)]
    assert u.download_begun(c, http=False, complete=False, progress=0.5) == [AskMissing(c)]
    (r,) = u.download_begun(c, http=False, complete=False, progress=0)
    assert isinstance(r, Report) and (r.state, r.progress) == ("downloading", 0.0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=1), max_size=40))
def test_progress_is_reported_once_per_quarter_and_never_after_completion(
    shares: list[float],
) -> None:
    u = machine()
    c = admit(u, cmd())
    assert isinstance(c, Command)
    u.decide(c, None)
    u.report(c, "downloading")
    reported = []
    for share in sorted(shares):
        for a in u.chunk_stored(c, share, complete=False):
            assert isinstance(a, Report) and a.state == "downloading"
            reported.append(a.progress)
    assert len(reported) <= 3 and reported == sorted(set(reported))  # 1/4, 2/4, 3/4 at most
    assert u.chunk_stored(c, 1.0, complete=True) == [Run("install", c)]


# -- commands MAC'd with the key agreed with the fleet ---------------------------------------
@pytest.mark.parametrize("kind", ["deploy", "rollback", "benchmark", "config", "shadow_stop"])
def test_a_macd_command_passes_the_same_checks_as_a_signed_one(kind: str) -> None:
    from protocol.device_mac import AgreedKey
    from protocol.messages import mac_command

    u = machine()
    k, fid = b"K" * 32, "a" * 16

    def maced(key: bytes = k, **kw: Any) -> Command:
        base = cmd(kind, key=None, **kw)
        return mac_command(base, key, fid, now=NOW, ttl_s=3600)

    # no key agreed yet: refused before anything else, like an unknown key
    assert reason(admit(u, maced())) == "key_unknown"
    u.agreed[fid] = AgreedKey(k, COMMAND_KEY.key_id)
    assert isinstance(admit(u, maced()), Command)
    assert reason(admit(u, maced(key=b"x" * 32))) == "signature_invalid"
    assert reason(admit(u, maced(device="dev-2"))) == "not_addressed"
    assert reason(admit(u, maced(), NOW + timedelta(days=2))) == "command_expired"
    # agreed from an announcement by a revoked command key, or by a bundle key: refused
    u.agreed[fid] = AgreedKey(k, REVOKED.key_id)
    assert reason(admit(u, maced())) == "key_revoked"
    u.agreed[fid] = AgreedKey(k, BUNDLE_KEY.key_id)
    assert reason(admit(u, maced())) == "key_unknown"
