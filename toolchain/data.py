"""Reading the user's data: ``.npz`` (X, optional y, optional feature_names) or ``.csv``.

A :class:`Dataset` holds a 2-D ``X`` in feature order: ``float32`` when every column is
numeric, ``dtype=object`` (floats and strings) when some columns are categorical. NaN in
numeric columns and stray strings in mostly-numeric columns are refused with the row and
column named, because a converted model would silently turn them into garbage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .errors import DataError

Kind = Literal["numeric", "categorical"]


@dataclass
class Dataset:
    X: np.ndarray
    y: np.ndarray | None = None
    feature_names: list[str] = field(default_factory=list)
    kinds: list[Kind] = field(default_factory=list)
    # per-row shape of an .npz X with more than two dimensions (images), before flattening
    row_shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not self.feature_names:
            self.feature_names = [f"f{i}" for i in range(self.n_features)]
        if not self.kinds:
            self.kinds = ["numeric"] * self.n_features

    @property
    def n_rows(self) -> int:
        return int(self.X.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.X.shape[1])

    @property
    def is_numeric(self) -> bool:
        return all(k == "numeric" for k in self.kinds)

    def numeric_X(self) -> np.ndarray:
        """``X`` as float32; :class:`DataError` when a column is categorical."""
        if not self.is_numeric:
            col = self.kinds.index("categorical")
            raise DataError(
                f"column {self.feature_names[col]!r} holds strings (e.g. {self.X[0, col]!r}) "
                "but this model takes numbers only"
            )
        return np.asarray(self.X, dtype=np.float32)

    def head(self, n: int) -> Dataset:
        y = None if self.y is None else self.y[:n]
        return Dataset(self.X[:n], y, list(self.feature_names), list(self.kinds), self.row_shape)

    def frame(self) -> Any:
        """A pandas DataFrame with the feature names (numeric columns as float)."""
        import pandas as pd

        cols: dict[str, Any] = {}
        for j, (name, kind) in enumerate(zip(self.feature_names, self.kinds, strict=True)):
            col = self.X[:, j]
            cols[name] = col.astype(np.float64) if kind == "numeric" else col.astype(str)
        return pd.DataFrame(cols)


def feature_count_mismatch(model: str, expected: int, names: list[str]) -> DataError:
    """The error for data whose column count differs from what ``model`` expects.

    The model gave no column names (else the caller names the missing columns), so say
    what can be said: the data's columns and what usually causes the difference.
    """
    got = len(names)
    shown = ", ".join(names[:12]) + (" …" if got > 12 else "")
    text = f"{model} expects {expected} features but the data has {got} ({shown})"
    if got < expected:
        text += (
            f": {expected - got} column(s) missing. The model was fit without column names "
            "(a NumPy array), so they cannot be named here: compare the data's header with the "
            "training columns (fit on a pandas DataFrame to get named checks)"
        )
    else:
        text += f": {got - expected} column(s) too many; if one is the label, pass --target NAME"
    return DataError(text)


def load_data(path: str | Path, target: str | None = None) -> Dataset:
    """Load ``.npz`` or ``.csv`` data; ``target`` names the label column of a CSV."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"data file {p} does not exist")
    suffix = p.suffix.lower()
    if suffix == ".npz":
        return _load_npz(p, target)
    if suffix == ".csv":
        return _load_csv(p, target)
    raise DataError(
        f"cannot read data file {p.name}: unknown suffix {suffix or '(none)'!r} (use .npz or .csv)"
    )


def dataset_from_arrays(X: Any, y: Any = None, feature_names: Any = None) -> Dataset:
    """Build a checked :class:`Dataset` from arrays or a pandas DataFrame."""
    if hasattr(X, "columns") and hasattr(X, "dtypes"):
        return _from_frame(X, None if y is None else np.asarray(y), "<DataFrame>")
    arr = np.asarray(X)
    if arr.ndim == 1:
        raise DataError("X must be 2-D (rows × features), got a 1-D array")
    row_shape = None
    if arr.ndim > 2:  # images etc.: flatten; the input schema reshapes them back
        row_shape = tuple(int(d) for d in arr.shape[1:])
        arr = arr.reshape(arr.shape[0], -1)
    names = None if feature_names is None else [str(n) for n in feature_names]
    if names is not None and len(names) != arr.shape[1]:
        raise DataError(f"{len(names)} feature names for {arr.shape[1]} columns")
    if arr.dtype == object:
        import pandas as pd

        frame = pd.DataFrame(arr, columns=names or [f"f{i}" for i in range(arr.shape[1])])
        return _from_frame(frame.infer_objects(), None if y is None else np.asarray(y), "<array>")
    if arr.dtype.kind not in "biuf":
        raise DataError(f"X has dtype {arr.dtype}; numeric data expected")
    _check_finite(arr, names, "<array>")
    ys = None if y is None else np.asarray(y)
    if ys is not None and len(ys) != arr.shape[0]:
        raise DataError(f"y has {len(ys)} rows but X has {arr.shape[0]}")
    return Dataset(arr.astype(np.float32), ys, names or [], [], row_shape)


def _load_npz(p: Path, target: str | None) -> Dataset:
    try:
        with np.load(p, allow_pickle=False) as z:
            files = set(z.files)
            if "X" not in files:
                raise DataError(f"{p.name} has no array named 'X' (found: {sorted(files)})")
            X, y = z["X"], (z["y"] if "y" in files else None)
            names = z["feature_names"].tolist() if "feature_names" in files else None
    except DataError:
        raise
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise DataError(f"{p.name} holds object arrays; save plain numeric arrays") from None
        raise DataError(f"cannot read {p.name}: {exc}") from None
    except Exception as exc:  # zipfile/OSError/…: a broken npz
        raise DataError(f"cannot read {p.name} as .npz: {exc}") from None
    if target is not None:
        raise DataError("--target applies to CSV files; an .npz carries its labels as 'y'")
    try:
        return dataset_from_arrays(X, y, names)
    except DataError as exc:
        raise DataError(f"{p.name}: {exc}") from None


def _load_csv(p: Path, target: str | None) -> Dataset:
    import pandas as pd

    try:
        frame = pd.read_csv(p)
    except Exception as exc:
        raise DataError(f"cannot read {p.name} as CSV: {type(exc).__name__}: {exc}") from None
    if frame.shape[0] == 0 or frame.shape[1] == 0:
        raise DataError(f"{p.name} holds no rows")
    y = None
    if target is not None:
        if target not in frame.columns:
            raise DataError(
                f"{p.name} has no column {target!r} (columns: {list(frame.columns)[:8]})"
            )
        y = frame.pop(target).to_numpy()
    return _from_frame(frame, y, p.name, csv=True)


def _where(row: int, csv: bool) -> str:
    """Rows count from 0; in a CSV also name the line (header = line 1)."""
    return f"row {row} (line {row + 2})" if csv else f"row {row}"


def _from_frame(frame: Any, y: np.ndarray | None, origin: str, csv: bool = False) -> Dataset:
    import pandas as pd

    names = [str(c) for c in frame.columns]
    kinds: list[Kind] = []
    columns: list[np.ndarray] = []
    for name in frame.columns:
        col = frame[name]
        if pd.api.types.is_bool_dtype(col) or pd.api.types.is_numeric_dtype(col):
            values = col.to_numpy(dtype=np.float64)
            _check_finite(values.reshape(-1, 1), [str(name)], origin, csv)
            kinds.append("numeric")
            columns.append(values)
            continue
        raw = col.to_numpy(dtype=object)
        missing = [i for i, v in enumerate(raw) if v is None or (isinstance(v, float) and v != v)]
        if missing:
            raise DataError(f"{origin}: column {name!r} {_where(missing[0], csv)} is empty/NaN")
        as_num = pd.to_numeric(col, errors="coerce")
        bad = as_num.isna().to_numpy()
        if bad.mean() < 0.5:  # mostly numbers: a numeric column with stray strings
            row = int(np.flatnonzero(bad)[0])
            raise DataError(
                f"{origin}: numeric column {name!r} holds a string in {_where(row, csv)}: "
                f"{raw[row]!r}"
            )
        kinds.append("categorical")
        columns.append(np.array([str(v) for v in raw], dtype=object))
    if y is not None and len(y) != len(frame):
        raise DataError(f"{origin}: y has {len(y)} rows but X has {len(frame)}")
    if all(k == "numeric" for k in kinds):
        X = np.column_stack(columns).astype(np.float32)
    else:
        X = np.empty((len(frame), len(columns)), dtype=object)
        for j, c in enumerate(columns):
            X[:, j] = c
    return Dataset(X, y, names, kinds)


def _check_finite(arr: np.ndarray, names: list[str] | None, origin: str, csv: bool = False) -> None:
    if arr.dtype.kind != "f":
        return
    bad = ~np.isfinite(arr)
    if bad.any():
        row, col = (int(v) for v in np.argwhere(bad)[0])
        name = names[col] if names else f"f{col}"
        what = "NaN" if np.isnan(arr[row, col]) else "infinite"
        raise DataError(f"{origin}: {what} value in numeric column {name!r}, {_where(row, csv)}")
