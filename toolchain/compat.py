"""Can this model run on this device profile? Operators, opsets and the memory budget.

ONNX: the opset imported per domain (``ai.onnx`` vs the runtime's ``max_opset``,
``ai.onnx.ml`` vs ``max_ml_opset``) and the operator set (``domain::Op``); operators from a
domain the runtime does not know (anything but the default, ``ai.onnx.ml`` and
``com.microsoft``) are flagged. TFLite: the builtin operator names, read cheaply from the
interpreter when LiteRT is installed; custom ops are flagged. Memory: the model file
size against ``memory_budget_mb`` (the benchmark adds the measured peak RSS).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from protocol.profiles import DeviceProfile

from .errors import RuntimeLoadError, UnsupportedModelError

_KNOWN_ONNX_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft"}


@dataclass
class ModelFacts:
    """What the compatibility check reads out of a model file."""

    format: str
    size_bytes: int
    opset: int | None = None
    ml_opset: int | None = None
    operators: list[str] = field(default_factory=list)
    custom_domains: list[str] = field(default_factory=list)


@dataclass
class CompatReport:
    profile: str
    facts: ModelFacts
    runtime: str | None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def model_format(path: Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix == ".tflite":
        return "tflite"
    raise UnsupportedModelError(
        f"{Path(path).name}: unknown model file type {suffix or '(none)'!r}; "
        "expected a converted .onnx or .tflite model (see 'edgefleet convert')"
    )


def read_facts(path: Path) -> ModelFacts:
    path = Path(path)
    fmt = model_format(path)
    if not path.is_file():
        raise UnsupportedModelError(f"{path} does not exist")
    size = path.stat().st_size
    if fmt == "onnx":
        return _onnx_facts(path, size)
    return _tflite_facts(path, size)


def _onnx_facts(path: Path, size: int) -> ModelFacts:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, ValueError, OSError…
        raise UnsupportedModelError(f"{path.name} is not a readable ONNX model: {exc}") from None
    opset = ml_opset = None
    custom = []
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            opset = int(imp.version)
        elif imp.domain == "ai.onnx.ml":
            ml_opset = int(imp.version)
        elif imp.domain not in _KNOWN_ONNX_DOMAINS:
            custom.append(imp.domain)
    ops: set[str] = set()
    graphs = [model.graph]
    while graphs:
        g = graphs.pop()
        for node in g.node:
            ops.add(f"{node.domain}::{node.op_type}" if node.domain else node.op_type)
            for attr in node.attribute:
                if attr.g is not None and attr.g.node:
                    graphs.append(attr.g)
                graphs.extend(sub for sub in attr.graphs)
    return ModelFacts("onnx", size, opset, ml_opset, sorted(ops), sorted(custom))


def _tflite_facts(path: Path, size: int) -> ModelFacts:
    facts = ModelFacts("tflite", size)
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # operators stay unknown; the runtime check below still applies
        return facts
    try:
        interp = Interpreter(model_path=str(path))
        details = interp._get_ops_details()
    except Exception as exc:  # LiteRT raises ValueError/RuntimeError for broken flatbuffers
        raise RuntimeLoadError(f"{path.name} is not a readable TFLite model: {exc}") from None
    facts.operators = sorted({str(d.get("op_name", "?")) for d in details})
    return facts


def check_compat(
    path: Path, profile: DeviceProfile, facts: ModelFacts | None = None
) -> CompatReport:
    """Compare a model's operators, opsets and size against a profile's runtime and budget."""
    facts = facts or read_facts(path)
    runtime = profile.runtime_for(facts.format)
    report = CompatReport(
        profile.name, facts, f"{runtime.name} {runtime.version}" if runtime else None
    )
    if runtime is None:
        report.problems.append(f"profile {profile.name!r} has no runtime for {facts.format}")
        return report
    if facts.opset and runtime.max_opset and facts.opset > runtime.max_opset:
        report.problems.append(
            f"model needs ai.onnx opset {facts.opset}, "
            f"{runtime.name} {runtime.version} supports {runtime.max_opset}"
        )
    if facts.ml_opset and runtime.max_ml_opset and facts.ml_opset > runtime.max_ml_opset:
        report.problems.append(
            f"model needs ai.onnx.ml opset {facts.ml_opset}, "
            f"{runtime.name} {runtime.version} supports {runtime.max_ml_opset}"
        )
    for domain in facts.custom_domains:
        report.problems.append(f"operator domain {domain!r} is not known to {runtime.name}")
    custom_ops = [op for op in facts.operators if op.upper().startswith("CUSTOM")]
    if custom_ops:
        report.problems.append(
            f"custom TFLite operators {custom_ops[:3]} need a custom runtime build"
        )
    size_mb = facts.size_bytes / 2**20
    if size_mb > profile.memory_budget_mb:
        report.problems.append(
            f"model file is {size_mb:.1f} MiB, memory budget is {profile.memory_budget_mb:g} MiB"
        )
    return report
