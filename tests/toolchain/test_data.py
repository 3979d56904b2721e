"""Reading data files: .npz and .csv, numeric and mixed, and the refusals."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from toolchain.data import dataset_from_arrays, load_data
from toolchain.errors import DataError


def test_npz_keeps_feature_names_and_labels(datasets):
    iris = datasets["iris"]
    data = load_data(iris.npz)
    assert data.X.dtype == np.float32 and data.X.shape == (150, 4)
    assert data.feature_names == iris.feature_names
    assert data.kinds == ["numeric"] * 4
    np.testing.assert_array_equal(data.y, iris.y)


def test_npz_without_feature_names_gets_f0_to_fn(tmp_path):
    np.savez(tmp_path / "d.npz", X=np.arange(6, dtype=np.float64).reshape(3, 2))
    data = load_data(tmp_path / "d.npz")
    assert data.feature_names == ["f0", "f1"] and data.y is None


def test_npz_images_are_flattened_to_rows(tmp_path):
    np.savez(tmp_path / "img.npz", X=np.zeros((5, 8, 8, 1), dtype=np.float32))
    assert load_data(tmp_path / "img.npz").X.shape == (5, 64)


def test_csv_header_gives_feature_names_and_target_is_split_off(datasets):
    wine = datasets["wine"]
    data = load_data(wine.csv, target="target")
    assert data.feature_names == wine.feature_names
    np.testing.assert_allclose(data.numeric_X(), wine.X, rtol=1e-6)
    np.testing.assert_array_equal(data.y, wine.y)


def test_csv_with_categorical_columns_is_mixed(mixed_csv):
    data = load_data(mixed_csv, target="species")
    assert data.X.dtype == object
    assert data.kinds == ["numeric", "numeric", "categorical", "categorical", "numeric"]
    assert data.X[0, 2] == "small" and isinstance(data.X[0, 0], float)
    with pytest.raises(DataError, match="column 'size' holds strings"):
        data.numeric_X()


def test_csv_rejects_unknown_target_column(datasets):
    with pytest.raises(DataError, match="has no column 'label'"):
        load_data(datasets["iris"].csv, target="label")


def test_load_data_rejects_unknown_suffix(tmp_path):
    path = tmp_path / "data.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(DataError, match=r"unknown suffix '\.parquet' \(use \.npz or \.csv\)"):
        load_data(path)


def test_load_data_rejects_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_data(tmp_path / "nope.csv")


def test_csv_rejects_nan_in_numeric_column_naming_row_and_column(tmp_path):
    path = tmp_path / "nan.csv"
    path.write_text("a,b\n1,2\n3,\n5,6\n")
    with pytest.raises(DataError, match=r"NaN value in numeric column 'b', row 1 \(line 3\)"):
        load_data(path)


def test_csv_rejects_a_string_in_a_numeric_column(tmp_path):
    path = tmp_path / "str.csv"
    path.write_text("a,b\n1,2\n3,oops\n5,6\n7,8\n")
    with pytest.raises(
        DataError, match=r"numeric column 'b' holds a string in row 1 \(line 3\): 'oops'"
    ):
        load_data(path)


def test_npz_rejects_nan(tmp_path):
    X = np.ones((4, 3))
    X[2, 1] = np.nan
    np.savez(tmp_path / "nan.npz", X=X)
    with pytest.raises(DataError, match="NaN value in numeric column 'f1', row 2"):
        load_data(tmp_path / "nan.npz")


def test_npz_rejects_object_arrays_instead_of_unpickling_them(tmp_path):
    np.savez(tmp_path / "obj.npz", X=np.array([[1, "a"]], dtype=object))
    with pytest.raises(DataError, match="object arrays"):
        load_data(tmp_path / "obj.npz")


def test_npz_without_X_names_what_it_found(tmp_path):
    np.savez(tmp_path / "wrong.npz", data=np.ones((2, 2)))
    with pytest.raises(DataError, match=r"no array named 'X' \(found: \['data'\]\)"):
        load_data(tmp_path / "wrong.npz")


def test_dataset_from_arrays_checks_names_and_rows():
    with pytest.raises(DataError, match="3 feature names for 2 columns"):
        dataset_from_arrays(np.ones((2, 2)), feature_names=["a", "b", "c"])
    with pytest.raises(DataError, match="y has 3 rows but X has 2"):
        dataset_from_arrays(np.ones((2, 2)), y=[1, 2, 3])
    with pytest.raises(DataError, match="infinite value"):
        dataset_from_arrays(np.array([[1.0, np.inf]]))


def test_importing_toolchain_stays_light():
    code = (
        "import sys, toolchain, toolchain.errors, toolchain.data, toolchain.sources;"
        "heavy = [m for m in ('sklearn', 'skl2onnx', 'onnx', 'onnxruntime', 'tensorflow', 'pandas')"
        " if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "convert" in __import__("toolchain").__all__
