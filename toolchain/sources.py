"""Loading the user's trained model: scikit-learn pickle/joblib, ONNX, Keras/SavedModel.

.. warning:: Unpickling runs arbitrary code. :func:`load_source` only opens the exact path
   the user names on the command line; never point it at files from untrusted places.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .errors import UnsupportedModelError, translate

SourceKind = Literal["sklearn", "onnx", "keras"]
Task = Literal["classification", "regression"]

PICKLE_SUFFIXES = (".joblib", ".pkl", ".pickle")
KERAS_SUFFIXES = (".keras", ".h5")


@dataclass
class SourceModel:
    kind: SourceKind
    path: Path
    sha256: str
    obj: Any
    task: Task
    name: str

    @property
    def n_features(self) -> int | None:
        """Number of input features the model expects, when it says."""
        if self.kind == "sklearn":
            n = getattr(self.obj, "n_features_in_", None)
            return int(n) if n is not None else None
        if self.kind == "keras":
            shape = keras_input_shape(self)
            dims = [d for d in (shape or [None])[1:] if d is not None]
            if shape and len(dims) == len(shape) - 1:
                n_total = 1
                for d in dims:
                    n_total *= d
                return n_total
            return None
        return None


def file_sha256(path: Path) -> str:
    """sha256 of a file, or of every file of a directory (sorted relative paths + bytes)."""
    h = hashlib.sha256()
    if path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(str(f.relative_to(path)).encode())
            h.update(f.read_bytes())
        return h.hexdigest()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_source_path(path: str | Path) -> Path:
    """Refuse a model path that cannot be loaded, without loading it (cheap; run first)."""
    p = Path(path)
    if not p.exists():
        raise UnsupportedModelError(f"model path {p} does not exist")
    if p.is_dir():
        if not (p / "saved_model.pb").is_file():
            raise UnsupportedModelError(f"{p} is a directory but not a TensorFlow SavedModel")
        return p
    suffix = p.suffix.lower()
    if suffix not in (*PICKLE_SUFFIXES, ".onnx", *KERAS_SUFFIXES):
        raise UnsupportedModelError(
            f"unsupported model file {p.name}: unknown type {suffix or '(no suffix)'!r}; "
            "expected .joblib/.pkl/.pickle (scikit-learn), .onnx, .keras or a SavedModel directory"
        )
    return p


def load_source(path: str | Path) -> SourceModel:
    """Load a trained model from ``path`` (see the module warning about pickles)."""
    p = Path(path)
    if not p.exists():
        raise UnsupportedModelError(f"model path {p} does not exist")
    if p.is_dir():
        if (p / "saved_model.pb").is_file():
            return _load_saved_model(p)
        raise UnsupportedModelError(f"{p} is a directory but not a TensorFlow SavedModel")
    suffix = p.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        return _load_sklearn(p)
    if suffix == ".onnx":
        return _load_onnx(p)
    if suffix in KERAS_SUFFIXES:
        return _load_keras(p)
    raise UnsupportedModelError(
        f"unsupported model file {p.name}: unknown type {suffix or '(no suffix)'!r}; expected "
        ".joblib/.pkl/.pickle (scikit-learn), .onnx, .keras or a SavedModel directory"
    )


# --- scikit-learn -----------------------------------------------------------------------


def _not_a_pickle(p: Path, exc: Exception) -> str:
    """Why ``p`` did not unpickle, in words: a text file says so instead of a stray
    ``IndexError: pop from empty list`` from deep inside the unpickler."""
    with p.open("rb") as fh:
        head = fh.read(512)
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if not head:
        return f"cannot unpickle {p.name}: it is empty, not a pickle or joblib file"
    if text is not None and all(c.isprintable() or c in "\r\n\t" for c in text):
        first = " ".join(text.split())[:40]
        return (
            f"cannot unpickle {p.name}: it is a text file, not a pickle or joblib file (it starts "
            f"with {first!r}); save the model with joblib.dump(model, path)"
        )
    return (
        f"cannot unpickle {p.name}: it is not a pickle or joblib file, or it is damaged "
        f"({type(exc).__name__}: {' '.join(str(exc).split())[:120]})"
    )


def _load_sklearn(p: Path) -> SourceModel:
    with translate("unpickling", UnsupportedModelError, p.name):
        import joblib
        import sklearn.base

    try:
        obj = joblib.load(p)
    except Exception as exc:
        raise UnsupportedModelError(_not_a_pickle(p, exc)) from None
    task: Task | None = None
    if isinstance(obj, sklearn.base.BaseEstimator) and hasattr(obj, "predict"):
        if sklearn.base.is_classifier(obj):
            task = "classification"
        elif sklearn.base.is_regressor(obj):
            task = "regression"
    if task is None:
        raise UnsupportedModelError(
            f"{p.name} holds a {type(obj).__module__}.{type(obj).__name__}, not a scikit-learn "
            "classifier, regressor or Pipeline ending in one"
        )
    from sklearn.exceptions import NotFittedError
    from sklearn.utils.validation import check_is_fitted

    try:
        check_is_fitted(obj)
    except NotFittedError:
        raise UnsupportedModelError(
            f"{p.name} holds an unfitted {type(obj).__name__}: fit it first"
        ) from None
    return SourceModel("sklearn", p, file_sha256(p), obj, task, sklearn_name(obj))


def sklearn_name(obj: Any) -> str:
    steps = getattr(obj, "steps", None)
    if steps is not None:
        return f"Pipeline({','.join(sklearn_name(s) for _, s in steps)})"
    return type(obj).__name__


# --- ONNX ------------------------------------------------------------------------------


def _load_onnx(p: Path) -> SourceModel:
    with translate("reading ONNX", UnsupportedModelError, p.name):
        import onnx

        model = onnx.load(str(p))
        onnx.checker.check_model(model)
    # named after the file, not graph.name: skl2onnx names graphs with a random hex id
    return SourceModel("onnx", p, file_sha256(p), model, onnx_task(model), p.name)


def onnx_task(model: Any) -> Task:
    """Guess the task from the graph: a label output or a multi-column score → classification."""
    from onnx import TensorProto

    classifier_ops = {"TreeEnsembleClassifier", "LinearClassifier", "SVMClassifier", "ZipMap"}
    if any(n.op_type in classifier_ops for n in model.graph.node):
        return "classification"
    for out in model.graph.output:
        t = out.type.tensor_type
        if t.elem_type in (TensorProto.INT64, TensorProto.STRING, TensorProto.INT32):
            return "classification"
    first = model.graph.output[0].type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in first.shape.dim]
    if len(dims) >= 2 and dims[-1] is not None and dims[-1] > 1:
        return "classification"
    return "regression"


# --- Keras / SavedModel -----------------------------------------------------------------


def _load_keras(p: Path) -> SourceModel:
    with translate("loading the Keras model", UnsupportedModelError, p.name):
        import keras

        model = keras.models.load_model(p, compile=False)
    return SourceModel("keras", p, file_sha256(p), model, keras_task(model), model.name or p.stem)


def _load_saved_model(p: Path) -> SourceModel:
    with translate("loading the SavedModel", UnsupportedModelError, str(p)):
        import tensorflow as tf

        obj = tf.saved_model.load(str(p))
        fn = obj.signatures["serving_default"]
        outs = list(fn.structured_outputs.values())
        last = outs[0].shape[-1] if outs and outs[0].shape.rank else 1
    task: Task = "classification" if last and last > 1 else "regression"
    return SourceModel("keras", p, file_sha256(p), obj, task, p.name)


def keras_task(model: Any) -> Task:
    """A softmax output over ≥ 2 units → classification; anything else → regression.

    A 1-unit sigmoid (binary classifier) is treated as regression on its score: the
    contract's predictions take labels from the argmax of a probability tensor, which a
    single column cannot carry. Parity then compares the scores themselves.
    """
    last = model.layers[-1] if getattr(model, "layers", None) else None
    act = getattr(getattr(last, "activation", None), "__name__", "")
    units = model.outputs[0].shape[-1] if getattr(model, "outputs", None) else 1
    if act == "softmax" and (units or 0) > 1:
        return "classification"
    return "regression"


def keras_input_shape(source: SourceModel) -> list[int | None] | None:
    obj = source.obj
    inputs = getattr(obj, "inputs", None)
    if inputs:
        return [None if d is None else int(d) for d in inputs[0].shape]
    sigs = getattr(obj, "signatures", None)
    if sigs is not None:
        spec = next(iter(sigs["serving_default"].structured_input_signature[1].values()))
        return [None if d is None else int(d) for d in spec.shape]
    return None
