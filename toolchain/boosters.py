"""Gradient-boosted trees from XGBoost, LightGBM and CatBoost: loading and ONNX conversion.

Their scikit-learn wrappers (``XGBClassifier``, ``LGBMRegressor``, ``CatBoostClassifier`` …)
go through skl2onnx like any estimator, alone or at the end of a Pipeline: before a
conversion :func:`register_converters` tells skl2onnx about the wrappers the model holds,
with onnxmltools' converters for XGBoost and LightGBM and CatBoost's own ONNX export for
CatBoost (its ``TreeEnsemble*`` node is copied into the graph; its ZipMap is dropped, so
probabilities stay a plain ``(n, n_classes)`` tensor). Going through skl2onnx also gives
the label output a dynamic batch dimension: onnxmltools' own ``convert_lightgbm`` declares
it as ``[1]``, which onnxruntime warns about on every batch.

Native model files are read by their own library, never unpickled:

* XGBoost ``.json`` / ``.ubj``: ``XGBClassifier`` or ``XGBRegressor`` by the objective;
* LightGBM Booster text files (``.txt``, first line ``tree``): a :class:`LightGBMBooster`,
  converted by onnxmltools (label dimension made dynamic afterwards, see above);
* CatBoost ``.cbm``: ``CatBoostClassifier`` or ``CatBoostRegressor`` by the loss function.

Trees compare float32 inputs with float32 thresholds in XGBoost and CatBoost, so their ONNX
graphs match exactly. LightGBM keeps float64 thresholds, which onnxmltools rounds to the
nearest float32; :func:`fix_lightgbm_thresholds` rounds them down instead, so every float32
input takes LightGBM's branch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .errors import ConversionError, UnsupportedModelError, translate

Library = Literal["sklearn", "xgboost", "lightgbm", "catboost"]
EXTRA_HINT = {
    "xgboost": "pip install 'edgefleet[xgboost]'",
    "lightgbm": "pip install 'edgefleet[lightgbm]'",
    "catboost": "pip install 'edgefleet[catboost]'",
}
NATIVE_SUFFIXES = {".json": "xgboost", ".ubj": "xgboost", ".cbm": "catboost", ".txt": "lightgbm"}


def library_of(estimator: Any) -> Library:
    """Which library an estimator (not a Pipeline) comes from, by its module."""
    top = type(estimator).__module__.split(".")[0]
    if top in ("xgboost", "lightgbm", "catboost"):
        return top  # type: ignore[return-value]
    return "sklearn"


def _steps(model: Any) -> list[Any]:
    """Every estimator inside ``model``: Pipeline steps and ColumnTransformer parts too."""
    out = [model]
    for _, step in getattr(model, "steps", None) or []:
        out.extend(_steps(step))
    for _, part, _cols in getattr(model, "transformers_", None) or []:
        if not isinstance(part, str):
            out.extend(_steps(part))
    return out


def register_converters(model: Any) -> list[str]:
    """Register skl2onnx converters for the boosting wrappers in ``model``; their names.

    Call it inside the conversion's ``translate`` block: other failures are translated there.
    """
    libs: list[str] = sorted({library_of(s) for s in _steps(model)} - {"sklearn"})
    register = {
        "xgboost": _register_xgboost,
        "lightgbm": _register_lightgbm,
        "catboost": _register_catboost,
    }
    for lib in libs:
        try:
            register[lib]()
        except ImportError as exc:
            raise ConversionError(
                f"converting {lib} models needs {exc.name or 'a missing package'}: "
                f"{EXTRA_HINT[lib]}"
            ) from None
    return libs


_CLASSIFIER_OPTIONS = {"nocl": [True, False], "zipmap": [True, False, "columns"]}


def _register_xgboost() -> None:
    from onnxmltools.convert.xgboost.operator_converters.XGBoost import convert_xgboost
    from skl2onnx import update_registered_converter
    from skl2onnx.common.shape_calculator import (
        calculate_linear_classifier_output_shapes,
        calculate_linear_regressor_output_shapes,
    )
    from xgboost import XGBClassifier, XGBRegressor

    update_registered_converter(
        XGBClassifier,
        "XGBoostXGBClassifier",
        calculate_linear_classifier_output_shapes,
        convert_xgboost,
        options=_CLASSIFIER_OPTIONS,
    )
    update_registered_converter(
        XGBRegressor,
        "XGBoostXGBRegressor",
        calculate_linear_regressor_output_shapes,
        convert_xgboost,
    )


def _register_lightgbm() -> None:
    from lightgbm import LGBMClassifier, LGBMRegressor
    from onnxmltools.convert.lightgbm.operator_converters.LightGbm import convert_lightgbm
    from skl2onnx import update_registered_converter
    from skl2onnx.common.shape_calculator import (
        calculate_linear_classifier_output_shapes,
        calculate_linear_regressor_output_shapes,
    )

    update_registered_converter(
        LGBMClassifier,
        "LightGbmLGBMClassifier",
        calculate_linear_classifier_output_shapes,
        convert_lightgbm,
        options=_CLASSIFIER_OPTIONS,
    )
    update_registered_converter(
        LGBMRegressor,
        "LightGbmLGBMRegressor",
        calculate_linear_regressor_output_shapes,
        convert_lightgbm,
        options={"split": None},
    )


def _register_catboost() -> None:
    from catboost import CatBoostClassifier, CatBoostRegressor
    from skl2onnx import update_registered_converter
    from skl2onnx._supported_operators import sklearn_classifier_list
    from skl2onnx.common.shape_calculator import (
        calculate_linear_classifier_output_shapes,
        calculate_linear_regressor_output_shapes,
    )

    update_registered_converter(
        CatBoostClassifier,
        "CatBoostCatBoostClassifier",
        calculate_linear_classifier_output_shapes,
        _convert_catboost,
        options=_CLASSIFIER_OPTIONS,
    )
    # not a ClassifierMixin: without this skl2onnx gives it one output, like a regressor
    if CatBoostClassifier not in sklearn_classifier_list:
        sklearn_classifier_list.append(CatBoostClassifier)
    update_registered_converter(
        CatBoostRegressor,
        "CatBoostCatBoostRegressor",
        calculate_linear_regressor_output_shapes,
        _convert_catboost,
    )


def _convert_catboost(scope: Any, operator: Any, container: Any) -> None:
    """skl2onnx converter: copy the TreeEnsemble node of CatBoost's own ONNX export."""
    from catboost.utils import convert_to_onnx_object
    from onnx.helper import get_attribute_value

    onx = convert_to_onnx_object(operator.raw_operator)
    nodes = [n for n in onx.graph.node if n.op_type != "ZipMap"]
    if len(nodes) != 1 or not nodes[0].op_type.startswith("TreeEnsemble") or onx.graph.initializer:
        kinds = ", ".join(n.op_type for n in onx.graph.node)
        raise ConversionError(
            f"CatBoost's ONNX export holds {kinds}; only a single tree ensemble is supported "
            "(models with categorical or text features are not)"
        )
    node = nodes[0]
    attrs = {a.name: get_attribute_value(a) for a in node.attribute}
    opsets = {d.domain: d.version for d in onx.opset_import}
    outputs = [o.full_name for o in operator.outputs]
    container.add_node(
        node.op_type,
        [operator.inputs[0].full_name],
        outputs[:2] if node.op_type == "TreeEnsembleClassifier" else outputs[:1],
        op_domain=node.domain,
        op_version=opsets.get(node.domain),
        name=scope.get_unique_operator_name("CatBoost"),
        **attrs,
    )


# --- native model files -------------------------------------------------------------------


def is_lightgbm_text(path: Path) -> bool:
    """A LightGBM Booster text file starts with the line ``tree``."""
    with path.open("rb") as fh:
        return fh.read(5) in (b"tree\n", b"tree\r")


def load_native(path: Path, library: str) -> Any:
    """The model in a native XGBoost/LightGBM/CatBoost file, read by its own library."""
    loader = {"xgboost": _load_xgboost, "lightgbm": _load_lightgbm, "catboost": _load_catboost}
    try:
        __import__(library)
    except ImportError:
        raise UnsupportedModelError(
            f"{path.name} is a {library} model file; reading it needs {library}: "
            f"{EXTRA_HINT[library]}"
        ) from None
    with translate(f"reading the {library} model", UnsupportedModelError, path.name):
        return loader[library](path)


def _load_xgboost(path: Path) -> Any:
    import xgboost as xgb

    booster = xgb.Booster(model_file=str(path))
    objective = json.loads(booster.save_config())["learner"]["objective"]["name"]
    if objective.startswith(("binary:", "multi:")):
        model: Any = xgb.XGBClassifier()
    elif objective.startswith(("reg:", "count:", "survival:")):
        model = xgb.XGBRegressor()
    else:
        raise UnsupportedModelError(
            f"{path.name}: XGBoost objective {objective!r} is neither a classifier nor a regressor"
        )
    model.load_model(str(path))
    return model


def _load_catboost(path: Path) -> Any:
    import catboost

    loss = str(catboost.CatBoost().load_model(str(path)).get_all_params()["loss_function"])
    cls = (
        catboost.CatBoostClassifier
        if loss in ("Logloss", "CrossEntropy", "MultiClass", "MultiClassOneVsAll")
        else catboost.CatBoostRegressor
    )
    return cls().load_model(str(path))


def _load_lightgbm(path: Path) -> LightGBMBooster:
    import lightgbm

    return LightGBMBooster(lightgbm.Booster(model_file=str(path)))


class LightGBMBooster:
    """A native LightGBM ``Booster`` with the small scikit-learn face parity needs.

    Classifiers (objective ``binary`` or ``multiclass*``) predict class indices
    ``0 … k-1`` as labels, the Booster's probabilities as ``predict_proba``; anything else
    is a regressor.
    """

    def __init__(self, booster: Any) -> None:
        self.booster = booster
        self.objective = str(booster.dump_model().get("objective", "regression")).split()[0]
        self.n_features_in_ = int(booster.num_feature())
        self.is_classifier = self.objective in ("binary", "multiclass", "multiclassova")
        if self.is_classifier:
            k = int(booster.dump_model().get("num_class", 1))
            self.classes_ = np.arange(max(k, 2))

    def predict_proba(self, X: Any) -> np.ndarray:
        p = np.asarray(self.booster.predict(np.asarray(X, dtype=np.float64)), dtype=np.float64)
        return np.column_stack([1.0 - p, p]) if p.ndim == 1 else p

    def predict(self, X: Any) -> np.ndarray:
        if self.is_classifier:
            return self.classes_[self.predict_proba(X).argmax(axis=1)]
        return np.asarray(self.booster.predict(np.asarray(X, dtype=np.float64)))


def lightgbm_booster_to_onnx(model: LightGBMBooster, n_features: int, target_opset: int) -> Any:
    """onnxmltools' LightGBM converter on a native Booster, label batch dimension dynamic."""
    from onnxmltools import convert_lightgbm
    from onnxmltools.convert.common.data_types import FloatTensorType

    onx = convert_lightgbm(
        model.booster,
        initial_types=[("input", FloatTensorType([None, n_features]))],
        target_opset=target_opset,
        zipmap=False,
    )
    for out in onx.graph.output:
        dims = out.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value"):  # declared [1]: onnxruntime warns per batch
            dims[0].ClearField("dim_value")
            dims[0].dim_param = "N"
    fix_lightgbm_thresholds(onx, [model.booster])
    return onx


# --- LightGBM thresholds ------------------------------------------------------------------


def _lightgbm_splits(tree: dict[str, Any], out: dict[tuple[int, float], set[float]]) -> None:
    """Collect ``(feature, float32(threshold)) → {float64 thresholds}`` of ``<=`` splits."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if "split_feature" not in node:
            continue
        if node.get("decision_type") == "<=" and not isinstance(node["threshold"], str):
            t = float(node["threshold"])
            out.setdefault((int(node["split_feature"]), float(np.float32(t))), set()).add(t)
        stack.extend(node[k] for k in ("left_child", "right_child") if k in node)


def fix_lightgbm_thresholds(onx: Any, boosters: list[Any]) -> int:
    """Store LightGBM's ``x ≤ t`` thresholds as the largest float32 ``w ≤ t``; nodes changed.

    LightGBM compares a float32 input (widened to float64) with a float64 threshold;
    onnxmltools writes the threshold rounded to the *nearest* float32, so an input between
    the two takes the other branch (adjacent float32 values in one feature gave 3 % flipped
    labels). Nodes are matched by (feature, stored value), which needs no assumption about
    the order in which onnxmltools emits them; a value two thresholds of one feature round
    to, with different round-downs, is left as it is (the parity check still guards).
    """
    from .hist_gradient_boosting import round_down_float32

    splits: dict[tuple[int, float], set[float]] = {}
    for booster in boosters:
        for info in booster.dump_model()["tree_info"]:
            _lightgbm_splits(info["tree_structure"], splits)
    fixed: dict[tuple[int, float], float] = {}
    for key, thresholds in splits.items():
        down = {float(round_down_float32(np.array([t]))[0]) for t in thresholds}
        if len(down) == 1:
            fixed[key] = down.pop()
    changed = 0
    for node in onx.graph.node:
        if not node.op_type.startswith("TreeEnsemble"):
            continue
        attrs = {a.name: a for a in node.attribute}
        if "nodes_values" not in attrs:
            continue
        modes, features = attrs["nodes_modes"].strings, attrs["nodes_featureids"].ints
        values = list(attrs["nodes_values"].floats)
        for i, v in enumerate(values):
            if modes[i] != b"BRANCH_LEQ":
                continue
            w = fixed.get((int(features[i]), float(np.float32(v))))
            if w is not None and w != v:
                values[i] = w
                changed += 1
        del attrs["nodes_values"].floats[:]
        attrs["nodes_values"].floats.extend(values)
    return changed


def lightgbm_boosters(model: Any) -> list[Any]:
    """The native Boosters of every LightGBM estimator inside ``model``."""
    out = []
    for step in _steps(model):
        if isinstance(step, LightGBMBooster):
            out.append(step.booster)
        elif library_of(step) == "lightgbm":
            out.append(step.booster_)
    return out
