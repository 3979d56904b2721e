"""Bad input gets one readable line and a non-zero exit, never a traceback.

Every case runs the real command through the root ``edgefleet`` CLI.
"""

from __future__ import annotations

import io
import zipfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from edgefleet.cli import EXIT_OVER_BUDGET
from protocol.profiles import load_profile
from tests.support.cli import run_cli
from tests.toolchain import fixtures_pkg as fx
from tests.toolchain.fixtures_pkg import profile_toml

iris, iris_joblib, iris_onnx, keys, iris_bundle = (
    fx.iris,
    fx.iris_joblib,
    fx.iris_onnx,
    fx.keys,
    fx.iris_bundle,
)


def run(*args: object):
    return run_cli(args)


def one_line_error(result, *fragments: str) -> str:
    assert result.exit_code not in (0, None), result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def test_unknown_model_file_type(iris, tmp_path):
    model = tmp_path / "model.txt"
    model.write_text("not a model")
    one_line_error(run("convert", model, "--data", iris.npz), "model.txt")


def test_pickle_that_is_not_a_model(iris, tmp_path):
    import joblib

    model = tmp_path / "dict.joblib"
    joblib.dump({"weights": [1, 2, 3]}, model)
    one_line_error(run("convert", model, "--data", iris.npz))


def test_feature_count_mismatch_between_model_and_data(iris, iris_joblib, tmp_path):
    data = tmp_path / "three.npz"
    np.savez(data, X=iris.X[:, :3], y=iris.y)
    line = one_line_error(run("convert", iris_joblib, "--data", data))
    assert "3" in line and "4" in line


def test_feature_count_mismatch_when_benchmarking(iris, iris_onnx, tmp_path):
    data = tmp_path / "three.npz"
    np.savez(data, X=iris.X[:, :3])
    one_line_error(run("bench", iris_onnx, "--profile", "host", "--data", data), "features")


@pytest.mark.parametrize("bad", ["nan", "abc"])
def test_nan_or_strings_in_numeric_data(bad, iris, iris_joblib, tmp_path):
    lines = iris.csv.read_text().splitlines()
    cells = lines[5].split(",")
    cells[1] = bad
    lines[5] = ",".join(cells)
    data = tmp_path / "bad.csv"
    data.write_text("\n".join(lines) + "\n")
    one_line_error(run("convert", iris_joblib, "--data", data, "--target", "species"))


def test_unknown_profile(iris_onnx):
    one_line_error(run("bench", iris_onnx, "--profile", "toaster-9000"), "unknown profile")
    one_line_error(run("profiles", "show", "toaster-9000"), "unknown profile")


def test_over_budget_model_exits_3_with_the_table(iris, iris_onnx, tmp_path):
    slow = profile_toml(tmp_path, "slow-board", speed_factor=10000.0)
    result = run("bench", iris_onnx, "--profile", slow, "--data", iris.npz, "--runs", 20)
    assert result.exit_code == EXIT_OVER_BUDGET == 3
    assert ("Traceback" not in result.output and result.exception is None) or isinstance(
        result.exception, SystemExit
    )
    assert "OVER BUDGET" in result.stdout and "ESTIMATES" in result.stdout
    assert "exceeds the latency budget" in result.stdout


def _rezip(src: Path, dst: Path, change) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, change(info.filename, zin.read(info)))


def test_bundle_with_one_flipped_byte_in_the_archive(iris_bundle, keys, tmp_path):
    path, _ = iris_bundle
    data = bytearray(path.read_bytes())
    offset = data.find(b'"name":"iris"')  # inside the stored manifest.json
    assert offset > 0
    data[offset + 9] ^= 0x01
    bad = tmp_path / "flipped.efb"
    bad.write_bytes(bytes(data))
    line = one_line_error(run("verify", bad, "--trust", keys.public_path))
    assert any(
        code in line for code in ("archive_invalid", "signature_invalid", "manifest_invalid")
    )


def test_bundle_with_one_flipped_byte_in_the_model_fails_its_hash(iris_bundle, keys, tmp_path):
    path, _ = iris_bundle
    bad = tmp_path / "model-flipped.efb"

    def flip(name: str, data: bytes) -> bytes:
        if name != "model.onnx":
            return data
        b = bytearray(data)
        b[len(b) // 2] ^= 0x01
        return bytes(b)

    _rezip(path, bad, flip)
    one_line_error(run("verify", bad, "--trust", keys.public_path), "hash_mismatch", "model.onnx")


def test_bundle_signed_by_an_unknown_key(iris_bundle, tmp_path):
    from toolchain.keys import generate_keys

    path, _ = iris_bundle
    stranger = generate_keys(tmp_path, "stranger")
    one_line_error(run("verify", path, "--trust", stranger.public_path), "key_unknown")


def test_bundle_signed_by_a_revoked_key(iris_bundle, keys):
    path, _ = iris_bundle
    result = run("verify", path, "--trust", keys.public_path, "--revoked", keys.key_id)
    one_line_error(result, "key_revoked", keys.key_id)


def test_expired_bundle(iris, iris_onnx, keys, tmp_path):
    from toolchain.data import load_data
    from toolchain.package import package

    out = tmp_path / "old.efb"
    package(
        iris_onnx, name="iris", version="0.9.0", profiles=[load_profile("host")],
        reference=load_data(iris.npz), key_path=keys.private_path, out=out, expires_days=1,
        now=datetime(2020, 1, 1, tzinfo=timezone.utc), runs=10,
    )  # fmt: skip
    one_line_error(run("verify", out, "--trust", keys.public_path), "expired")


def test_member_path_that_escapes_the_extraction_folder(iris_bundle, keys, tmp_path):
    path, _ = iris_bundle
    buf = io.BytesIO()
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(buf, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info))
        zout.writestr("../../evil.sh", b"#!/bin/sh\necho owned\n")
    hostile = tmp_path / "hostile.efb"
    hostile.write_bytes(buf.getvalue())
    one_line_error(run("verify", hostile, "--trust", keys.public_path), "archive_unsafe", "escapes")
    one_line_error(run("inspect", hostile), "archive_unsafe")
    assert not (tmp_path.parent / "evil.sh").exists()


def test_keys_generate_refuses_to_overwrite(tmp_path):
    assert run("keys", "generate", "--out", tmp_path).exit_code == 0
    one_line_error(run("keys", "generate", "--out", tmp_path), "refusing to overwrite")


def test_bundle_that_is_not_a_zip(keys, tmp_path):
    bad = tmp_path / "junk.efb"
    bad.write_bytes(b"definitely not a zip")
    one_line_error(run("verify", bad, "--trust", keys.public_path), "archive_invalid")


def test_bundle_verified_for_a_profile_it_does_not_target(iris_bundle, keys):
    path, _ = iris_bundle
    result = run("verify", path, "--trust", keys.public_path, "--profile", "coral-dev-board")
    one_line_error(result, "profile_incompatible", "coral-dev-board")


def test_package_of_a_source_model_points_at_convert(iris, iris_joblib, keys, tmp_path):
    result = run(
        "package", iris_joblib, "--name", "iris", "--version", "1.0.0", "--profile", "host",
        "--data", iris.npz, "--key", keys.private_path, "--out", tmp_path / "x.efb",
    )  # fmt: skip
    one_line_error(result, "edgefleet convert")
    assert not (tmp_path / "x.efb").exists()


def test_package_with_a_missing_signing_key(iris, iris_onnx, tmp_path):
    result = run(
        "package", iris_onnx, "--name", "iris", "--version", "1.0.0", "--profile", "host",
        "--data", iris.npz, "--key", tmp_path / "nope.key", "--out", tmp_path / "x.efb",
    )  # fmt: skip
    one_line_error(result, "signing key")


def test_build_refuses_a_public_key_before_any_work(iris_joblib, keys, tmp_path):
    out = tmp_path / "dist"
    missing_data = tmp_path / "not-read-yet.csv"  # reading it would fail with another error
    line = one_line_error(
        run(
            "build",
            iris_joblib,
            "--data",
            missing_data,
            "--name",
            "iris",
            "--version",
            "1.0.0",
            "--profile",
            "host",
            "--key",
            keys.public_path,
            "--out",
            out,
        ),
        "is a public key",
    )
    assert ".key" in line
    assert not out.exists()  # no variant was converted, nothing written


def test_package_refuses_a_public_key_before_reading_data(iris_onnx, keys, tmp_path):
    one_line_error(
        run(
            "package",
            iris_onnx,
            "--name",
            "iris",
            "--version",
            "1.0.0",
            "--profile",
            "host",
            "--data",
            tmp_path / "absent.csv",
            "--key",
            keys.public_path,
            "--out",
            tmp_path / "x.efb",
        ),
        "is a public key",
    )


def test_a_text_file_named_like_a_joblib_model_says_it_is_not_a_pickle(iris, tmp_path):
    model = tmp_path / "model.joblib"
    model.write_text("this is not a model\n")
    line = one_line_error(run("convert", model, "--data", iris.npz))
    assert "is a text file, not a pickle or joblib file" in line and "IndexError" not in line


def _csv_without(iris, tmp_path, column: str):
    import csv

    rows = list(csv.reader(iris.csv.read_text().splitlines()))
    drop = rows[0].index(column)
    out = tmp_path / "short.csv"
    out.write_text("\n".join(",".join(r[:drop] + r[drop + 1 :]) for r in rows) + "\n")
    return out


def test_csv_missing_a_column_names_it_when_the_model_knows_its_columns(iris, tmp_path):
    import joblib
    import pandas as pd
    from sklearn.linear_model import LogisticRegression

    names = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
    model = LogisticRegression(max_iter=500).fit(pd.DataFrame(iris.X, columns=names), iris.y)
    path = tmp_path / "named.joblib"
    joblib.dump(model, path)
    short = _csv_without(iris, tmp_path, "petal_width")
    one_line_error(run("convert", path, "--data", short, "--target", "species"), "'petal_width'")


def test_csv_missing_a_column_says_how_many_and_lists_the_columns(iris_joblib, iris, tmp_path):
    short = _csv_without(iris, tmp_path, "sepal_width")
    line = one_line_error(run("convert", iris_joblib, "--data", short, "--target", "species"))
    assert "expects 4 features but the data has 3" in line and "1 column(s) missing" in line
    assert "sepal_length, petal_length, petal_width" in line
