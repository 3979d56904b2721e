"""``<model>.edgefleet.json``: what a converted model carries to quantize, bench and package.

A model file alone does not say which row column feeds which tensor, what the class labels
are, or where it came from. :func:`convert` and :func:`quantize` write that next to the
model; :func:`describe` reads it back, or infers a schema from the graph when there is none
(an ONNX or TFLite file the user brings).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from protocol.manifest import Lineage, Quantization
from protocol.schema import DType, FeatureSpec, InputSchema, ModelInput, OutputSchema

from .data import Dataset
from .errors import RuntimeLoadError, UnsupportedModelError, translate

SUFFIX = ".edgefleet.json"
MAX_CATEGORIES = 1000


class Sidecar(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input_schema: InputSchema
    output_schema: OutputSchema
    lineage: Lineage
    quantization: Quantization = Quantization()
    parity: dict[str, Any] | None = None


def sidecar_path(model_path: str | Path) -> Path:
    p = Path(model_path)
    return p.with_name(p.name + SUFFIX)


def write_sidecar(model_path: str | Path, sidecar: Sidecar) -> Path:
    path = sidecar_path(model_path)
    path.write_text(sidecar.model_dump_json(indent=2), encoding="utf-8")
    return path


def read_sidecar(model_path: str | Path) -> Sidecar | None:
    path = sidecar_path(model_path)
    if not path.is_file():
        return None
    try:
        return Sidecar.model_validate_json(path.read_text(encoding="utf-8"))
    except (ValidationError, json.JSONDecodeError) as exc:
        raise UnsupportedModelError(
            f"{path.name} is not a valid edgefleet sidecar: {exc}"
        ) from None


def feature_specs(data: Dataset) -> list[FeatureSpec]:
    """One :class:`FeatureSpec` per column: range of numeric, categories of categorical ones."""
    specs = []
    for j, (name, kind) in enumerate(zip(data.feature_names, data.kinds, strict=True)):
        col = data.X[:, j]
        if kind == "numeric":
            vals = col.astype(np.float64)
            specs.append(FeatureSpec(name=name, min=float(vals.min()), max=float(vals.max())))
        else:
            cats = sorted({str(v) for v in col})
            specs.append(
                FeatureSpec(
                    name=name,
                    kind="categorical",
                    dtype="string",
                    categories=cats if len(cats) <= MAX_CATEGORIES else None,
                )
            )
    return specs


def plain_features(n: int, data: Dataset | None) -> list[FeatureSpec]:
    if data is not None and data.n_features == n:
        return feature_specs(data)
    return [FeatureSpec(name=f"f{i}") for i in range(n)]


def describe(model_path: str | Path, data: Dataset | None = None) -> Sidecar:
    """The model's sidecar, or one inferred from its graph (and ``data``, when given)."""
    found = read_sidecar(model_path)
    if found is not None:
        return found
    p = Path(model_path)
    if not p.is_file():
        raise UnsupportedModelError(f"model file {p} does not exist")
    from .sources import file_sha256

    suffix = p.suffix.lower()
    if suffix == ".onnx":
        with translate("reading ONNX", UnsupportedModelError, p.name):
            import onnx

            model = onnx.load(str(p))
        inp, out = infer_onnx_schema(model, data)
        kind, converter = "onnx", "none (ONNX as given)"
    elif suffix == ".tflite":
        inp, out = infer_tflite_schema(p, data)
        kind, converter = "keras", "unknown (TFLite as given)"
    else:
        raise UnsupportedModelError(f"cannot describe {p.name}: expected .onnx or .tflite")
    lineage = Lineage(
        source_sha256=file_sha256(p),
        source_kind=kind,  # type: ignore[arg-type]
        source_name=p.stem,
        converter=converter,
        settings={"source_path": str(p.resolve()), "inferred_schema": True},
    )
    return Sidecar(input_schema=inp, output_schema=out, lineage=lineage)


# --- ONNX ------------------------------------------------------------------------------

_ONNX_DTYPES: dict[int, DType] = {
    1: "float32",
    11: "float64",
    7: "int64",
    6: "int32",
    2: "uint8",
    3: "int8",
    8: "string",
    9: "bool",
}


def _dims(value_info: Any) -> list[int | None]:
    dims = value_info.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims]


def infer_onnx_schema(model: Any, data: Dataset | None = None) -> tuple[InputSchema, OutputSchema]:
    from .sources import onnx_task

    initializers = {i.name for i in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in initializers]
    inputs: list[ModelInput] = []
    features: list[FeatureSpec] = []
    if len(graph_inputs) == 1:
        gi = graph_inputs[0]
        shape = _dims(gi)
        tail = shape[1:] if len(shape) > 1 else [1]
        if any(d is None for d in tail):
            if data is None:
                raise UnsupportedModelError(
                    f"input {gi.name!r} has a dynamic feature dimension; pass --data to fix it"
                )
            tail = [data.n_features]
        n = int(np.prod([int(d) for d in tail if d is not None]))
        features = plain_features(n, data)
        dtype = _ONNX_DTYPES.get(gi.type.tensor_type.elem_type, "float32")
        inputs = [
            ModelInput(
                name=gi.name, dtype=dtype, shape=[None, *tail], features=[f.name for f in features]
            )
        ]
    else:
        by_name = {}
        if data is not None:
            by_name = {f.name: f for f in feature_specs(data)}
        for gi in graph_inputs:
            dtype = _ONNX_DTYPES.get(gi.type.tensor_type.elem_type, "float32")
            spec = by_name.get(gi.name) or FeatureSpec(
                name=gi.name, kind="categorical" if dtype == "string" else "numeric", dtype=dtype
            )
            features.append(spec)
            inputs.append(
                ModelInput(name=gi.name, dtype=dtype, shape=[None, 1], features=[gi.name])
            )
    task = onnx_task(model)
    outs = list(model.graph.output)
    if task == "regression":
        return InputSchema(features=features, inputs=inputs), OutputSchema(
            task="regression",
            value_output=outs[0].name,
            n_outputs=(_dims(outs[0])[1:] or [1])[0] or 1,
        )
    label = next((o.name for o in outs if o.type.tensor_type.elem_type in (7, 8, 6)), None)
    proba = next((o.name for o in outs if o.type.tensor_type.elem_type in (1, 11)), None)
    classes = onnx_classes(model)
    if classes is None and proba is not None:
        width = (_dims(next(o for o in outs if o.name == proba))[1:] or [None])[0]
        if width:
            classes = list(range(width))
    if classes is None and data is not None and data.y is not None:
        classes = [_py(v) for v in np.unique(data.y)]
    return InputSchema(features=features, inputs=inputs), OutputSchema(
        task="classification", classes=classes, label_output=label, probability_output=proba
    )


def onnx_classes(model: Any) -> list[Any] | None:
    import onnx

    for node in model.graph.node:
        for attr in node.attribute:
            if attr.name == "classlabels_int64s":
                return [int(v) for v in onnx.helper.get_attribute_value(attr)]
            if attr.name == "classlabels_strings":
                return [v.decode() for v in onnx.helper.get_attribute_value(attr)]
    return None


def _py(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


# --- TFLite ----------------------------------------------------------------------------


def single_input_schema(name: str, tail: list[int], features: list[Any]) -> InputSchema:
    """The schema of a one-tensor (TFLite) model: every feature feeds tensor ``name``."""
    return InputSchema(
        features=features,
        inputs=[
            ModelInput(
                name=name,
                dtype="float32",
                shape=[None, *tail],
                features=[f.name for f in features],
            )
        ],
    )


def infer_tflite_schema(
    path: Path, data: Dataset | None = None
) -> tuple[InputSchema, OutputSchema]:
    from .runner import load_tflite_interpreter

    with translate("LiteRT load", RuntimeLoadError, path.name):
        interp = load_tflite_interpreter(path, threads=1)
        ins = interp.get_input_details()
        outs = interp.get_output_details()
    if len(ins) != 1:
        raise UnsupportedModelError(
            f"{path.name}: TFLite models with {len(ins)} inputs are not supported"
        )
    tail = [int(d) for d in ins[0]["shape"][1:]] or [1]
    inp = single_input_schema(ins[0]["name"], tail, plain_features(int(np.prod(tail)), data))
    width = int(outs[0]["shape"][-1]) if len(outs[0]["shape"]) > 1 else 1
    if width > 1:
        classes: list[Any] = list(range(width))
        if data is not None and data.y is not None and len(np.unique(data.y)) == width:
            classes = [_py(v) for v in np.unique(data.y)]
        return inp, OutputSchema(
            task="classification", classes=classes, probability_output=outs[0]["name"]
        )
    return inp, OutputSchema(task="regression", value_output=outs[0]["name"])
