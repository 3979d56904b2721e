"""Keras → ONNX with Keras' own ``model.export(format="onnx")`` (tf2onnx underneath).

Checked with TensorFlow 2.21 / Keras 3.15 / tf2onnx 1.17 (all in the ``tflite`` extra):
Keras 3 drives tf2onnx itself, whereas calling ``tf2onnx.convert.from_keras`` on a Keras 3
model fails (``KeyError: 'keras_tensor_…'``). A SavedModel directory is not converted
(TFLite only). The model is called once on a row of the data first: Keras refuses to export
a model that has never been called, which a freshly loaded ``.keras`` file has not.

ONNX → TFLite is not offered: onnx2tf 2.x needs Python ≥ 3.12, and onnx2tf 1.x, the last
line for Python 3.11, pins tensorflow 2.19, numpy < 2 and onnx 1.19, which conflict with the
TensorFlow 2.21 / numpy 2 / onnx 1.23 that edgefleet pins.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from importlib import metadata
from pathlib import Path

from protocol.manifest import Lineage
from protocol.schema import InputSchema, OutputSchema

from .data import Dataset
from .errors import ConversionError, DataError, translate
from .sidecar import plain_features, single_input_schema
from .sources import SourceModel, keras_input_shape

ONNX_TO_TFLITE_UNAVAILABLE = (
    "ONNX → TFLite is not supported: onnx2tf 2.x needs Python ≥ 3.12 and onnx2tf 1.x pins "
    "tensorflow 2.19 and numpy < 2, which conflict with edgefleet's TensorFlow 2.21; convert "
    "the Keras model to TFLite instead, or use --to onnx"
)


def keras_to_onnx(
    source: SourceModel, data: Dataset, out: Path, opset: int
) -> tuple[InputSchema, OutputSchema, Lineage]:
    """Export ``source`` (a Keras model) to ONNX at ``out``."""
    from .runner import keras_batch
    from .tflite import _tf, tf_versions

    model = source.obj
    if not hasattr(model, "export") or not hasattr(model, "layers"):
        raise ConversionError(
            f"{source.name} is a SavedModel directory: Keras → ONNX takes a .keras/.h5 model; "
            "use --to tflite"
        )
    shape = keras_input_shape(source) or [None, data.n_features]
    tail = [int(d) if d is not None else data.n_features for d in shape[1:]]
    n = 1
    for d in tail:
        n *= d
    if n != data.n_features:
        raise DataError(
            f"feature-count mismatch: {source.name} expects {n} values per row but the data "
            f"has {data.n_features}"
        )
    _tf()
    try:
        import tf2onnx  # noqa: F401
    except ImportError:
        raise ConversionError(
            "Keras → ONNX needs tf2onnx: pip install 'edgefleet[tflite]'"
        ) from None
    with translate("Keras → ONNX export", ConversionError, source.name):
        model(keras_batch(source, data.numeric_X()[:1]))  # Keras exports only called models
        sink = io.StringIO()
        with contextlib.redirect_stdout(sink), warnings.catch_warnings():
            # Keras' tf2onnx shim probes np.object, which numpy 2 warns about
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"keras(\.|$)")
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            model.export(str(out), format="onnx", verbose=False, opset_version=opset)
        import onnx

        onx = onnx.load(str(out))
    graph_in = [i for i in onx.graph.input if i.name not in {t.name for t in onx.graph.initializer}]
    if len(graph_in) != 1:
        raise ConversionError(f"Keras → ONNX gave {len(graph_in)} inputs; one is supported")
    inp = single_input_schema(graph_in[0].name, tail, plain_features(n, data))
    first = onx.graph.output[0]
    dims = first.type.tensor_type.shape.dim
    width = int(dims[-1].dim_value) if len(dims) > 1 and dims[-1].dim_value else 1
    outs = (
        OutputSchema(
            task="classification", classes=list(range(width)), probability_output=first.name
        )
        if source.task == "classification"
        else OutputSchema(task="regression", value_output=first.name, n_outputs=width)
    )
    versions = tf_versions()
    for name in ("tf2onnx", "onnx", "onnxruntime"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    lineage = Lineage(
        source_sha256=source.sha256,
        source_kind="keras",
        source_name=source.name,
        converter=f"keras export(format='onnx') with tf2onnx {versions.get('tf2onnx', '?')}",
        settings={"source_path": str(source.path.resolve()), "opset": opset},
        tool_versions=versions,
    )
    return inp, outs, lineage
