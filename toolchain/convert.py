"""Convert a source model to ONNX or TFLite, check parity on the user's data, write a sidecar.

* scikit-learn → ONNX with skl2onnx. ZipMap is switched off so probabilities are a plain
  ``(n, n_classes)`` tensor. The input is float32, which is what scikit-learn's trees
  compare anyway: ``float32(x) ≤ t`` with a float64 threshold ``t``. A float32 graph must
  store, per threshold, the largest float32 ``w ≤ t`` so every float32 input takes the
  same branch. skl2onnx does that for DecisionTree-based ensembles
  (``tree_ensemble.sklearn_threshold``) but rounds HistGradientBoosting thresholds to
  nearest and ignores their native categorical splits, so we rewrite those
  (:mod:`toolchain.hist_gradient_boosting`). Values
  that reach the trees must also be bit-identical: StandardScaler is emitted as Sub + Div
  in float32 like scikit-learn computes it, not skl2onnx's multiply-by-reciprocal Scaler.
  Double-precision graphs are no way out: onnxruntime 1.31 refuses TreeEnsemble* with
  double outputs. The tests assert 100 % label agreement for every tree model.
  skl2onnx 1.20 also hands numpy bools to an integer attribute of HistGradientBoosting
  trees (protobuf 6 warns, 7 fails); :func:`_int_missing_value_tracks` converts them.
  ColumnTransformer pipelines and data with categorical columns get one ONNX input per
  column (strings for categorical ones), named after the column.
* XGBoost, LightGBM and CatBoost scikit-learn wrappers, alone or at the end of a Pipeline,
  take the scikit-learn path with their converters registered in skl2onnx
  (:mod:`toolchain.boosters`); a native LightGBM Booster goes through onnxmltools.
* PyTorch modules → ONNX with ``torch.onnx.export`` (:mod:`toolchain.torch_export`).
* ONNX → ONNX: passed through unchanged (bytes copied), schema inferred from the graph.
* Keras / SavedModel → TFLite with TensorFlow's converter (see :mod:`toolchain.tflite`);
  Keras → ONNX with Keras' own ONNX export (:mod:`toolchain.keras_onnx`). ONNX → TFLite is
  refused with its reason (no converter works with the pinned versions).

Parity failures raise :class:`ParityError` (with ``.report``); the written files are kept
for inspection, with the failed report in the sidecar.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import numpy as np

from protocol.manifest import Lineage
from protocol.schema import InputSchema, ModelInput, OutputSchema

from .boosters import LightGBMBooster
from .data import Dataset, feature_count_mismatch
from .errors import ConversionError, DataError, translate
from .parity import ParityReport, ParityThresholds, compare
from .runner import ModelRunner, source_predict
from .sidecar import Sidecar, feature_specs, infer_onnx_schema, write_sidecar
from .sources import SourceModel

Format = Literal["onnx", "tflite"]
DEFAULT_OPSET = 17  # onnxruntime ≥ 1.12 everywhere; the profiles allow up to 21–23
DEFAULT_ML_OPSET = 3


@dataclass
class Converted:
    path: Path
    format: Format
    sidecar: Sidecar
    parity: ParityReport


def tool_versions(*names: str) -> dict[str, str]:
    out = {}
    for name in ("numpy", *names):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def default_out(source: SourceModel, to: Format) -> Path:
    p = source.path
    return p.with_name(p.name + f".{to}") if p.is_dir() else p.with_suffix(f".{to}")


def align_data(source: SourceModel, data: Dataset) -> Dataset:
    """Check the data fits the model; reorder named columns to the model's order."""
    names = getattr(source.obj, "feature_names_in_", None) if source.kind == "sklearn" else None
    if names is not None:
        names = [str(n) for n in names]
        missing = [n for n in names if n not in data.feature_names]
        if missing and data.n_features == len(names) and data.feature_names[0] == "f0":
            return data  # unnamed .npz columns: trust the order
        if missing:
            raise DataError(
                f"{source.name} was fit on columns the data lacks: {missing[:5]} "
                f"(data has {data.feature_names[:8]})"
            )
        idx = [data.feature_names.index(n) for n in names]
        X = data.X[:, idx]
        return Dataset(X, data.y, names, [data.kinds[i] for i in idx])
    if source.kind == "onnx":
        initializers = {i.name for i in source.obj.graph.initializer}
        inputs = [i.name for i in source.obj.graph.input if i.name not in initializers]
        if len(inputs) > 1:  # one input per column: take the data's columns by name
            missing = [n for n in inputs if n not in data.feature_names]
            if missing:
                raise DataError(
                    f"{source.name} has inputs {missing[:5]} that the data has no columns for "
                    f"(data has {data.feature_names[:8]})"
                )
            idx = [data.feature_names.index(n) for n in inputs]
            return Dataset(data.X[:, idx], data.y, inputs, [data.kinds[i] for i in idx])
    n = source.n_features
    if n is not None and n != data.n_features:
        raise feature_count_mismatch(source.name, n, data.feature_names)
    return data


def convert(
    source: SourceModel,
    data: Dataset,
    *,
    to: Format = "onnx",
    out: Path | None = None,
    thresholds: ParityThresholds | None = None,
    target_opset: int | None = None,
) -> Converted:
    """Convert ``source``, check parity on ``data``, write the model and its sidecar."""
    data = align_data(source, data)
    out = Path(out) if out is not None else default_out(source, to)
    out.parent.mkdir(parents=True, exist_ok=True)
    if to == "onnx":
        if source.kind == "onnx":
            inp, outs, lineage = _onnx_passthrough(source, data, out)
        elif source.kind == "keras":
            from .keras_onnx import keras_to_onnx

            inp, outs, lineage = keras_to_onnx(source, data, out, target_opset or DEFAULT_OPSET)
        elif source.kind == "torch":
            inp, outs, lineage = _torch_to_onnx(source, data, out, target_opset)
        elif isinstance(source.obj, LightGBMBooster):  # a native Booster file
            inp, outs, lineage = _lightgbm_booster_to_onnx(source, data, out, target_opset)
        else:
            inp, outs, lineage = _sklearn_to_onnx(source, data, out, target_opset)
    elif to == "tflite":
        if source.kind == "onnx":
            from .keras_onnx import ONNX_TO_TFLITE_UNAVAILABLE

            raise ConversionError(ONNX_TO_TFLITE_UNAVAILABLE)
        if source.kind != "keras":
            raise ConversionError(
                f"{source.kind} → TFLite is not supported: TFLite conversion takes a Keras "
                "model or SavedModel; use --to onnx"
            )
        from .tflite import keras_to_tflite

        inp, outs, lineage = keras_to_tflite(source, data, out)
    else:
        raise ConversionError(f"unknown target format {to!r} (use onnx or tflite)")

    X = data.X if not data.is_numeric else data.numeric_X()
    reference = source_predict(source, X, row_shape=data.row_shape)
    runner = ModelRunner.open(out, inp, outs)
    candidate = runner.predict(X)
    report = compare(reference, candidate, source.task, thresholds)
    sidecar = Sidecar(
        input_schema=inp, output_schema=outs, lineage=lineage, parity=report.to_dict()
    )
    write_sidecar(out, sidecar)
    report.raise_if_failed(f"{source.name} → {out.name} (kept for inspection)")
    return Converted(out, to, sidecar, report)


# --- scikit-learn → ONNX ------------------------------------------------------------------


def final_estimator(model: Any) -> Any:
    while getattr(model, "steps", None):
        model = model.steps[-1][1]
    return model


def _has_column_transformer(model: Any) -> bool:
    from sklearn.compose import ColumnTransformer

    if isinstance(model, ColumnTransformer):
        return True
    return any(_has_column_transformer(s) for _, s in getattr(model, "steps", []) or [])


def sklearn_input_schema(source: SourceModel, data: Dataset) -> InputSchema:
    features = feature_specs(data)
    if not _has_column_transformer(source.obj):
        data.numeric_X()  # DataError naming the first string column
    if data.is_numeric and not _has_column_transformer(source.obj):
        return InputSchema(
            features=features,
            inputs=[
                ModelInput(
                    name="input",
                    dtype="float32",
                    shape=[None, data.n_features],
                    features=data.feature_names,
                )
            ],
        )
    return InputSchema(
        features=features,
        inputs=[
            ModelInput(
                name=f.name,
                dtype="string" if f.kind == "categorical" else "float32",
                shape=[None, 1],
                features=[f.name],
            )
            for f in features
        ],
    )


def _sklearn_to_onnx(
    source: SourceModel, data: Dataset, out: Path, target_opset: int | None
) -> tuple[InputSchema, OutputSchema, Lineage]:
    model = source.obj
    inp = sklearn_input_schema(source, data)
    opset = {"": target_opset or DEFAULT_OPSET, "ai.onnx.ml": DEFAULT_ML_OPSET}
    final = final_estimator(model)
    with translate("skl2onnx conversion", ConversionError, source.name):
        from skl2onnx import convert_sklearn

        from .boosters import register_converters

        boosting = register_converters(model)
        from skl2onnx.common.data_types import FloatTensorType, StringTensorType

        types = [
            (i.name, (StringTensorType if i.dtype == "string" else FloatTensorType)(list(i.shape)))
            for i in inp.inputs
        ]
        from sklearn.preprocessing import StandardScaler

        # StandardScaler: scikit-learn computes (x - float32(mean)) / float32(scale) in
        # float32; skl2onnx's default Scaler op multiplies by the reciprocal instead, which
        # moves values across tree thresholds downstream (Pipeline(StandardScaler,
        # RandomForest) on digits: max |Δprobability| 0.04). "div" emits Sub + Div: exact.
        options: dict[Any, dict[str, Any]] = {StandardScaler: {"div": "div"}}
        if source.task == "classification":
            options[id(final)] = {"zipmap": False}
        with _int_missing_value_tracks(), warnings.catch_warnings():
            # skl2onnx reads SVC.probA_/probB_, deprecated in scikit-learn 1.9: harmless here
            warnings.filterwarnings("ignore", message=r"Attribute `prob[AB]_` was deprecated")
            onx = convert_sklearn(model, initial_types=types, options=options, target_opset=opset)
        if type(final).__name__.startswith("HistGradientBoosting"):
            from .hist_gradient_boosting import fix_hist_gradient_boosting

            fix_hist_gradient_boosting(onx, final)
        if "lightgbm" in boosting:
            from .boosters import fix_lightgbm_thresholds, lightgbm_boosters

            fix_lightgbm_thresholds(onx, lightgbm_boosters(model))
        out.write_bytes(onx.SerializeToString())
    names = [o.name for o in onx.graph.output]
    if source.task == "classification":
        classes = [_py(c) for c in final.classes_]
        has_proba = hasattr(model, "predict_proba")
        outs = OutputSchema(
            task="classification",
            classes=classes,
            label_output=names[0],
            probability_output=names[1] if has_proba and len(names) > 1 else None,
        )
    else:
        width = int(np.prod(onx.graph.output[0].type.tensor_type.shape.dim[-1].dim_value or 1))
        outs = OutputSchema(task="regression", value_output=names[0], n_outputs=max(width, 1))
    converter = f"skl2onnx {metadata.version('skl2onnx')}"
    if {"xgboost", "lightgbm"} & set(boosting):
        converter += f" + onnxmltools {metadata.version('onnxmltools')}"
    if "catboost" in boosting:
        converter += f" + CatBoost's ONNX export (catboost {metadata.version('catboost')})"
    lineage = Lineage(
        source_sha256=source.sha256,
        source_kind=source.kind,
        source_name=source.name,
        converter=converter,
        settings={
            "source_path": str(source.path.resolve()),
            "target_opset": opset,
            "zipmap": False,
            "input_layout": "single" if len(inp.inputs) == 1 else "per-column",
            "tree_thresholds": "float32, rounded down to keep scikit-learn's branch",
            "standard_scaler": "Sub+Div in float32, as scikit-learn computes it",
        },
        tool_versions=tool_versions(*_SKLEARN_TOOLS, *_booster_tools(boosting)),
    )
    return inp, outs, lineage


_SKLEARN_TOOLS = ("scikit-learn", "skl2onnx", "onnx", "onnxruntime", "protobuf")


def _booster_tools(libraries: list[str]) -> list[str]:
    onnxmltools = ["onnxmltools"] if {"xgboost", "lightgbm"} & set(libraries) else []
    return onnxmltools + libraries


@contextmanager
def _int_missing_value_tracks() -> Iterator[None]:
    """Make skl2onnx pass ints, not bools, as ``nodes_missing_value_tracks_true``.

    skl2onnx 1.20's HistGradientBoosting converter puts numpy bools into an integer
    attribute: protobuf 6.33 warns ("Expected an int, got a boolean … rejected in 7.34")
    and protobuf 7 raises. Wrapping ``tree_ensemble.add_node`` for the duration of the
    conversion converts the value, so neither happens (the pin ``protobuf<7`` stays as a
    second line of defence).
    """
    from skl2onnx.common import tree_ensemble

    original = tree_ensemble.add_node

    def add_node(*args: Any, **kwargs: Any) -> Any:
        if "nodes_missing_value_tracks_true" in kwargs:
            kwargs["nodes_missing_value_tracks_true"] = int(
                bool(kwargs["nodes_missing_value_tracks_true"])
            )
        return original(*args, **kwargs)

    tree_ensemble.add_node = add_node
    try:
        yield
    finally:
        tree_ensemble.add_node = original


def _py(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


# --- ONNX passthrough ----------------------------------------------------------------------


def _onnx_passthrough(
    source: SourceModel, data: Dataset, out: Path
) -> tuple[InputSchema, OutputSchema, Lineage]:
    inp, outs = infer_onnx_schema(source.obj, data)
    if inp.n_features != data.n_features:
        raise feature_count_mismatch(source.name, inp.n_features, data.feature_names)
    if out.resolve() != source.path.resolve():
        shutil.copyfile(source.path, out)
    lineage = Lineage(
        source_sha256=source.sha256,
        source_kind="onnx",
        source_name=source.name,
        converter="none (ONNX passed through unchanged)",
        settings={"source_path": str(source.path.resolve())},
        tool_versions=tool_versions("onnx", "onnxruntime"),
    )
    return inp, outs, lineage


# --- native LightGBM Booster → ONNX ------------------------------------------------------------

ONNXMLTOOLS_OPSET = 15  # the newest ai.onnx opset onnxmltools 1.16 writes on its own


def _lightgbm_booster_to_onnx(
    source: SourceModel, data: Dataset, out: Path, target_opset: int | None
) -> tuple[InputSchema, OutputSchema, Lineage]:
    from .boosters import lightgbm_booster_to_onnx

    opset = target_opset or ONNXMLTOOLS_OPSET
    n = source.n_features or data.n_features
    with translate("onnxmltools conversion", ConversionError, source.name):
        onx = lightgbm_booster_to_onnx(source.obj, n, opset)
        out.write_bytes(onx.SerializeToString())
    inp = InputSchema(
        features=feature_specs(data),
        inputs=[
            ModelInput(name="input", dtype="float32", shape=[None, n], features=data.feature_names)
        ],
    )
    names = [o.name for o in onx.graph.output]
    if source.task == "classification":
        outs = OutputSchema(
            task="classification",
            classes=[_py(c) for c in source.obj.classes_],
            label_output=names[0],
            probability_output=names[1] if len(names) > 1 else None,
        )
    else:
        outs = OutputSchema(task="regression", value_output=names[0], n_outputs=1)
    lineage = Lineage(
        source_sha256=source.sha256,
        source_kind="lightgbm",
        source_name=source.name,
        converter=f"onnxmltools {metadata.version('onnxmltools')} (convert_lightgbm)",
        settings={
            "source_path": str(source.path.resolve()),
            "target_opset": opset,
            "zipmap": False,
            "label_batch_dimension": "dynamic (onnxmltools declares [1])",
            "tree_thresholds": "float32, rounded down to keep LightGBM's branch",
        },
        tool_versions=tool_versions("lightgbm", "onnxmltools", "onnx", "onnxruntime"),
    )
    return inp, outs, lineage


# --- PyTorch → ONNX -------------------------------------------------------------------------

TORCH_DYNAMO_OPSET = 18  # the torch.export-based exporter writes opset 18 natively


def _torch_to_onnx(
    source: SourceModel, data: Dataset, out: Path, target_opset: int | None
) -> tuple[InputSchema, OutputSchema, Lineage]:
    import torch

    from .torch_export import export_torch, row_shape, torch_head

    scripted = isinstance(source.obj, torch.jit.ScriptModule)
    head, width = torch_head(source.obj)
    shape = row_shape(data)
    opset = target_opset or (DEFAULT_OPSET if scripted else TORCH_DYNAMO_OPSET)
    from .torch_export import torch_outputs

    with translate(f"{source.name} on a row of the data (shape {shape})", DataError):
        first = torch_outputs(source.obj, head, data.numeric_X()[:1], shape)
    settings = export_torch(source.obj, scripted, head, shape, out, opset)
    inp = InputSchema(
        features=feature_specs(data),
        inputs=[
            ModelInput(
                name="input", dtype="float32", shape=[None, *shape], features=data.feature_names
            )
        ],
    )
    if source.task == "classification":
        k = width or first.shape[1]
        # a module outputs class indices; it carries no class names
        outs = OutputSchema(
            task="classification", classes=list(range(k)), probability_output="probabilities"
        )
    else:
        import onnx

        dims = onnx.load(str(out)).graph.output[0].type.tensor_type.shape.dim
        n_out = int(dims[-1].dim_value) if len(dims) > 1 and dims[-1].dim_value else 1
        outs = OutputSchema(task="regression", value_output="value", n_outputs=n_out)
    settings["source_path"] = str(source.path.resolve())
    lineage = Lineage(
        source_sha256=source.sha256,
        source_kind="torch",
        source_name=source.name,
        converter=f"{settings['exporter']}, opset {opset}",
        settings=settings,
        tool_versions=tool_versions("torch", "onnx", "onnxscript", "onnxruntime"),
    )
    return inp, outs, lineage
