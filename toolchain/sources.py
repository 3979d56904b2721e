"""Loading the user's trained model.

* pickle/joblib: a scikit-learn estimator or Pipeline, or an XGBoost, LightGBM or CatBoost
  scikit-learn wrapper (alone or at the end of a Pipeline);
* native boosting files, read by their own library (:mod:`toolchain.boosters`): XGBoost
  ``.json``/``.ubj``, LightGBM Booster text ``.txt``, CatBoost ``.cbm``;
* PyTorch ``.pt``/``.pth``: a TorchScript file or a module saved whole
  (:mod:`toolchain.torch_export`);
* ``.onnx``; Keras ``.keras``/``.h5`` and SavedModel directories.

.. warning:: Unpickling runs arbitrary code, and so does ``torch.load`` of a module saved
   whole. :func:`load_source` only opens the exact path the user names on the command
   line; never point it at files from untrusted places.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .errors import UnsupportedModelError, translate

SourceKind = Literal["sklearn", "onnx", "keras", "xgboost", "lightgbm", "catboost", "torch"]
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
        if self.kind in ("sklearn", "xgboost", "lightgbm", "catboost"):
            n = getattr(self.obj, "n_features_in_", None)
            if not n and getattr(self.obj, "feature_names_", None):  # CatBoost after a reload
                n = len(self.obj.feature_names_)
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
    from . import boosters, torch_export

    known = (*PICKLE_SUFFIXES, ".onnx", *KERAS_SUFFIXES, *torch_export.TORCH_SUFFIXES)
    if suffix not in known and suffix not in boosters.NATIVE_SUFFIXES:
        raise UnsupportedModelError(_unknown_type(p, suffix))
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
    from . import boosters, torch_export

    if suffix in torch_export.TORCH_SUFFIXES:
        return _load_torch(p)
    library = boosters.NATIVE_SUFFIXES.get(suffix)
    if library is not None and (library != "lightgbm" or boosters.is_lightgbm_text(p)):
        return _load_native_booster(p, library)
    raise UnsupportedModelError(_unknown_type(p, suffix))


def _unknown_type(p: Path, suffix: str) -> str:
    return (
        f"unsupported model file {p.name}: unknown type {suffix or '(no suffix)'!r}; expected "
        ".joblib/.pkl/.pickle (scikit-learn, XGBoost, LightGBM, CatBoost), .json/.ubj "
        "(XGBoost), .txt (LightGBM Booster), .cbm (CatBoost), .pt/.pth (PyTorch), .onnx, "
        ".keras or a SavedModel directory"
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
    except ModuleNotFoundError as exc:
        from .boosters import EXTRA_HINT
        from .torch_export import EXTRA_HINT as TORCH_HINT

        top = (exc.name or "").split(".")[0]
        hint = EXTRA_HINT.get(top) or (TORCH_HINT if top == "torch" else None)
        if hint is None:
            raise UnsupportedModelError(
                f"cannot unpickle {p.name}: {type(exc).__name__}: {exc}"
            ) from None
        raise UnsupportedModelError(
            f"{p.name} holds a {top} model; reading it needs {top}: {hint}"
        ) from None
    except Exception as exc:
        raise UnsupportedModelError(_not_a_pickle(p, exc)) from None
    task: Task | None = None
    from .boosters import library_of

    estimator_like = isinstance(obj, sklearn.base.BaseEstimator) or library_of(obj) != "sklearn"
    if estimator_like and hasattr(obj, "predict"):
        if sklearn.base.is_classifier(obj):
            task = "classification"
        elif sklearn.base.is_regressor(obj):
            task = "regression"
    if task is None:
        raise UnsupportedModelError(
            f"{p.name} holds a {type(obj).__module__}.{type(obj).__name__}, not a scikit-learn "
            "(or XGBoost/LightGBM/CatBoost) classifier, regressor or Pipeline ending in one"
        )
    from sklearn.exceptions import NotFittedError
    from sklearn.utils.validation import check_is_fitted

    try:
        check_is_fitted(obj)
    except NotFittedError:
        raise UnsupportedModelError(
            f"{p.name} holds an unfitted {type(obj).__name__}: fit it first"
        ) from None
    kind: SourceKind = "sklearn" if getattr(obj, "steps", None) else library_of(obj)
    return SourceModel(kind, p, file_sha256(p), obj, task, sklearn_name(obj))


def _load_native_booster(p: Path, library: str) -> SourceModel:
    from .boosters import LightGBMBooster, load_native

    obj = load_native(p, library)
    if isinstance(obj, LightGBMBooster):
        task: Task = "classification" if obj.is_classifier else "regression"
        name = f"LightGBM Booster ({obj.objective})"
    else:
        import sklearn.base

        task = "classification" if sklearn.base.is_classifier(obj) else "regression"
        name = type(obj).__name__
    return SourceModel(library, p, file_sha256(p), obj, task, name)  # type: ignore[arg-type]


# --- PyTorch ---------------------------------------------------------------------------


def _load_torch(p: Path) -> SourceModel:
    from .torch_export import load_torch, torch_task

    module, scripted = load_torch(p)
    name = str(getattr(module, "original_name", None) or type(module).__name__)
    task: Task = torch_task(module)  # type: ignore[assignment]
    return SourceModel(
        "torch", p, file_sha256(p), module, task, f"{name} (TorchScript)" if scripted else name
    )


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
