"""PyTorch ``nn.Module`` → ONNX with ``torch.onnx.export``.

Two kinds of file are read (both only from a path the user names; see
:mod:`toolchain.sources`): a TorchScript file (``torch.jit.save``), and a module saved whole
(``torch.save(model)``, which is a pickle: loading it runs code, like a joblib file).

* The input shape comes from the data: ``(batch, n_features)``, or the per-row shape of an
  ``.npz`` whose ``X`` has more than two dimensions (e.g. ``(n, 1, 8, 8)`` images).
* The task comes from the last layer: ``Softmax``/``LogSoftmax``, or a ``Linear`` with more
  than one output, make a classifier (labels ``0 … k-1``, or the data's classes when there
  are exactly ``k``); anything else is a regressor. A classifier's graph ends in a
  ``probabilities`` output: softmax of the module's logits (or ``exp`` of a LogSoftmax),
  appended at export so the device gets probabilities, not logits.
* Exporters: a whole module goes through the ``torch.export``-based exporter
  (``dynamo=True``, needs onnxscript, in the ``torch`` extra); TorchScript modules can only
  go through the TorchScript-based one (``dynamo=False``). The lineage records which one and
  the opset.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConversionError, UnsupportedModelError, translate

TORCH_SUFFIXES = (".pt", ".pth", ".ptl")
EXTRA_HINT = "pip install 'edgefleet[torch]'"


@contextmanager
def _quiet_torch() -> Iterator[None]:
    """Silence the deprecation chatter of torch's own machinery while we drive it.

    torch ≥ 2.9 deprecates TorchScript (``jit.load`` and the TorchScript exporter) and warns
    on every call; the torch.export-based exporter trips deprecation/future warnings inside
    torch, onnxscript and typing_extensions. None of it is the user's to fix, and under
    ``-W error`` it would abort the export itself.
    """
    import logging

    log = logging.getLogger("torch.onnx")  # "torchvision is not installed. Skipping …"
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch(\.|$)")
            yield
    finally:
        log.setLevel(level)


def load_torch(path: Path) -> tuple[Any, bool]:
    """(module in eval mode, is TorchScript) from a TorchScript file or a whole saved module."""
    try:
        import torch
    except ImportError:
        raise UnsupportedModelError(
            f"{path.name} looks like a PyTorch model; reading it needs torch: {EXTRA_HINT}"
        ) from None
    import zipfile

    scripted = False
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            scripted = any(n.endswith("/constants.pkl") for n in zf.namelist())
    with translate("loading the PyTorch model", UnsupportedModelError, path.name), _quiet_torch():
        if scripted:
            module = torch.jit.load(str(path), map_location="cpu")
        else:
            module = torch.load(str(path), map_location="cpu", weights_only=False)
    if not isinstance(module, torch.nn.Module):
        raise UnsupportedModelError(
            f"{path.name} holds a {type(module).__module__}.{type(module).__name__}, not an "
            "nn.Module (a state_dict needs its model class: save the module whole or with "
            "torch.jit.save)"
        )
    return module.eval(), scripted


def _last_layer(module: Any) -> Any:
    leaves = [m for m in module.modules() if not list(m.children())]
    return leaves[-1] if leaves else module


def _layer_name(layer: Any) -> str:
    return str(getattr(layer, "original_name", None) or type(layer).__name__)


def torch_head(module: Any) -> tuple[str, int | None]:
    """("softmax" | "logsoftmax" | "logits" | "value", width) from the last layer."""
    last = _last_layer(module)
    name = _layer_name(last)
    if name == "Softmax":
        return "softmax", None
    if name == "LogSoftmax":
        return "logsoftmax", None
    width = getattr(last, "out_features", None)
    if name == "Linear" and width is not None and int(width) > 1:
        return "logits", int(width)
    return "value", int(width) if width is not None else None


def torch_task(module: Any) -> str:
    return "regression" if torch_head(module)[0] == "value" else "classification"


def _wrapped(module: Any, head: str) -> Any:
    import torch

    class _Probabilities(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: Any) -> Any:
            y = self.inner(x)
            if head == "logsoftmax":
                return torch.exp(y)
            if head == "logits":
                return torch.softmax(y, dim=-1)
            return y

    return _Probabilities(module).eval()


def row_shape(data: Any) -> list[int]:
    shape = getattr(data, "row_shape", None)
    return list(shape) if shape else [data.n_features]


def torch_outputs(module: Any, head: str, X: np.ndarray, shape: list[int]) -> np.ndarray:
    """The module's output for ``X`` (rows flattened), probabilities for classifiers."""
    import torch

    x = torch.from_numpy(np.asarray(X, dtype=np.float32).reshape([len(X), *shape]))
    with torch.no_grad(), _quiet_torch():
        y = _wrapped(module, head)(x)
    return y.detach().cpu().numpy().reshape(len(X), -1).astype(np.float64)


def export_torch(
    module: Any, scripted: bool, head: str, shape: list[int], out: Path, opset: int
) -> dict[str, Any]:
    """Export to ``out``; returns the settings for the lineage (exporter, opset, names).

    The module is exported as it is; a classifier's softmax (or ``exp`` of a LogSoftmax) is
    appended to the ONNX graph afterwards, since a TorchScript module cannot be wrapped in
    a Python module and traced.
    """
    import torch

    example = torch.zeros([2, *shape], dtype=torch.float32)
    output = "value" if head == "value" else "probabilities"
    raw = output if head in ("value", "softmax") else "raw_output"
    settings: dict[str, Any] = {
        "input_name": "input",
        "output_name": output,
        "input_shape": ["batch", *shape],
        "opset": opset,
        "output_head": {
            "value": "the module's output",
            "softmax": "the module's softmax output",
            "logsoftmax": "Exp appended to the module's LogSoftmax output",
            "logits": "Softmax appended to the module's logits",
        }[head],
    }
    with translate("torch.onnx.export", ConversionError, out.name), _quiet_torch():
        if scripted:
            settings["exporter"] = "torch.onnx.export(dynamo=False), TorchScript-based"
            torch.onnx.export(
                module, (example,), str(out), input_names=["input"], output_names=[raw],
                opset_version=opset, dynamic_axes={"input": {0: "batch"}, raw: {0: "batch"}},
                dynamo=False,
            )  # fmt: skip
        else:
            _need_onnxscript()
            settings["exporter"] = "torch.onnx.export(dynamo=True), torch.export-based"
            program = torch.onnx.export(
                module, (example,), input_names=["input"], output_names=[raw],
                opset_version=opset, dynamic_shapes=({0: torch.export.Dim("batch")},),
                dynamo=True, optimize=True, verbose=False,
            )  # fmt: skip
            if program is None:  # only None when given a file to write to
                raise ConversionError("torch.onnx.export returned no program")
            program.save(str(out), external_data=False)
        if raw != output:
            _append_head(out, raw, output, "Exp" if head == "logsoftmax" else "Softmax")
    settings["torch"] = metadata.version("torch")
    return settings


def _append_head(path: Path, raw: str, output: str, op: str) -> None:
    """Append ``op`` (Softmax over the last axis, or Exp) after the graph output ``raw``."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path))
    graph = model.graph
    old = next(o for o in graph.output if o.name == raw)
    attrs: dict[str, Any] = {"axis": -1} if op == "Softmax" else {}
    graph.node.append(helper.make_node(op, [raw], [output], name=f"edgefleet_{op}", **attrs))
    new = onnx.ValueInfoProto()
    new.CopyFrom(old)
    new.name = output
    graph.output.remove(old)
    graph.output.append(new)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _need_onnxscript() -> None:
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        raise ConversionError(
            f"exporting an nn.Module with torch.onnx.export(dynamo=True) needs onnxscript: "
            f"{EXTRA_HINT}"
        ) from None
