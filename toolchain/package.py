"""Package a converted model as a signed ``.efb`` bundle.

The bundle holds ``manifest.json`` (canonical bytes), ``manifest.sig``, the model as
``model.onnx`` / ``model.tflite``, ``reference.sketch`` (DataSketches over the reference
data) and ``model_card.md``. The manifest records lineage (from the model's sidecar plus
the versions of the tools installed here), one benchmark per target profile (host time ×
speed factor, ``estimated=True``), smoke tests (up to 8 evenly spaced reference rows with
the outputs the packaged model itself produced), and the validity window.

``release``: the ``--release`` given, else the UTC creation time as the integer
``YYYYMMDDHHMMSS``. That grows with time, so bundles packaged later supersede earlier ones
without a counter to keep anywhere; give ``--release`` explicitly when two bundles of
the same model may be packaged within one second or on machines with skewed clocks.

The file is written atomically (temporary file in the target folder, fsync, rename).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from protocol.bundle import pack_bundle, sha256_hex
from protocol.manifest import (
    MODEL_CARD_NAME,
    REFERENCE_SKETCH_NAME,
    Fallback,
    FileEntry,
    Manifest,
    ModelInfo,
    SmokeTest,
    TargetProfile,
    canonical_bytes,
)
from protocol.profiles import DeviceProfile
from protocol.sketches import build_reference

from .benchmark import HostTiming, estimate, time_model
from .compat import check_compat, read_facts
from .errors import DataError, ToolchainError
from .keys import load_signing_key
from .model_card import render_model_card

Progress = Callable[[str], None]

SMOKE_ROWS = 8
TOOLS = (
    "edgefleet",
    "onnx",
    "onnxruntime",
    "skl2onnx",
    "scikit-learn",
    "tensorflow-cpu",
    "tensorflow",
    "ai-edge-litert",
    "numpy",
)


def parse_fallback(text: str | None) -> Fallback:
    """``constant:VALUE``, ``previous`` or ``none`` → :class:`Fallback`."""
    if not text or text == "none":
        return Fallback()
    if text == "previous":
        return Fallback(kind="previous")
    if text.startswith("constant:") and len(text) > len("constant:"):
        raw = text.split(":", 1)[1]
        value: Any = raw
        for cast in (int, float):
            try:
                value = cast(raw)
                break
            except ValueError:
                continue
        return Fallback(kind="constant", value=value)
    raise ToolchainError(f"fallback {text!r} must be 'constant:VALUE', 'previous' or 'none'")


def check_identity(name: str, version: str) -> None:
    """Fail early on a bundle name or version the manifest would refuse."""
    from pydantic import ValidationError

    try:
        Manifest.model_validate({"name": name, "version": version})
    except ValidationError as exc:
        for err in exc.errors():
            if err["loc"] and err["loc"][0] in ("name", "version"):
                raise ToolchainError(
                    f"{err['loc'][0]} {(name if err['loc'][0] == 'name' else version)!r}: "
                    f"{err['msg'].removeprefix('Value error, ')}"
                ) from None


def tool_versions() -> dict[str, str]:
    out = {}
    for name in TOOLS:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def default_release(now: datetime) -> int:
    return int(now.astimezone(timezone.utc).strftime("%Y%m%d%H%M%S"))


def _py(v: Any) -> Any:
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, float) and v != v:  # NaN has no JSON form
        return None
    return v


def _label(v: Any) -> Any:
    v = _py(v)
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v if isinstance(v, (int, str)) else str(v)


def smoke_test(model_path: Path, sidecar: Any, X: np.ndarray, atol: float) -> SmokeTest:
    """Up to 8 evenly spaced rows of ``X`` with what the packaged model answers for them."""
    from .runner import ModelRunner

    n = len(X)
    idx = sorted(set(np.linspace(0, n - 1, min(SMOKE_ROWS, n)).astype(int).tolist()))
    rows = X[idx]
    runner = ModelRunner.open(model_path, sidecar.input_schema, sidecar.output_schema)
    pred = runner.predict(rows)
    return SmokeTest(
        rows=[[_py(v) for v in row] for row in rows],
        expected_labels=None if pred.labels is None else [_label(v) for v in pred.labels],
        expected_probabilities=None
        if pred.probabilities is None
        else np.asarray(pred.probabilities, dtype=np.float64).round(7).tolist(),
        expected_values=None
        if pred.values is None
        else np.asarray(pred.values, dtype=np.float64).tolist(),
        atol=atol,
    )


def _rows(X: np.ndarray) -> np.ndarray:
    return X.astype(np.float64) if X.dtype.kind in "fiub" else X


def write_atomic(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def package(
    model_path: Path,
    *,
    name: str,
    version: str,
    profiles: Sequence[DeviceProfile],
    reference: Any,
    key_path: Path,
    out: Path,
    release: int | None = None,
    expires_days: float = 180,
    fallback: Fallback | None = None,
    now: datetime | None = None,
    runs: int = 100,
    metadata_: dict[str, str] | None = None,
    progress: Progress | None = None,
) -> Manifest:
    """Build, sign and write the bundle; return its manifest.

    ``reference`` is a :class:`toolchain.data.Dataset` (the training or validation data).
    """
    from pydantic import ValidationError

    from .sidecar import describe

    say = progress or (lambda _msg: None)
    model_path = Path(model_path)
    check_identity(name, version)
    if not profiles:
        raise ToolchainError("package needs at least one --profile")
    if expires_days <= 0:
        raise ToolchainError("--expires-days must be positive")
    pair = load_signing_key(Path(key_path))
    facts = read_facts(model_path)
    say("reading the model's schema and lineage")
    sidecar = describe(model_path, reference)
    schema = sidecar.input_schema
    X = reference.X
    if X.shape[1] != schema.n_features:
        raise DataError(
            f"reference data has {X.shape[1]} features, the model expects {schema.n_features}"
        )
    say("sketching the reference data")
    sketch_bytes = build_reference(X, schema).to_bytes()
    say("recording smoke tests")
    atol = 1e-3 if sidecar.quantization.mode == "none" else 1e-2
    smoke = smoke_test(model_path, sidecar, X, atol)
    targets = []
    timings: dict[int, HostTiming] = {}  # host timing depends only on the thread count
    for profile in profiles:
        compat = check_compat(model_path, profile, facts)
        if not compat.ok:
            raise ToolchainError(
                f"model cannot run on profile {profile.name!r}: {'; '.join(compat.problems)}"
            )
        threads = profile.inference_threads
        if threads not in timings:
            say(f"benchmarking with {threads} thread(s) for {profile.name}")
            timings[threads] = time_model(
                model_path, schema, sidecar.output_schema, _rows(X), threads=threads, runs=runs
            )
        result = estimate(timings[threads], profile, facts.size_bytes, [])
        targets.append(
            TargetProfile(
                profile=profile.name, latency_budget_ms=profile.latency_budget_ms, benchmark=result
            )
        )
    created = (now or datetime.now(timezone.utc)).replace(microsecond=0)
    member = f"model.{facts.format}"
    model_bytes = model_path.read_bytes()
    # The bundle leaves this machine: keep the source's file name, not its local path.
    settings = dict(sidecar.lineage.settings)
    if "source_path" in settings:
        settings["source_path"] = Path(str(settings["source_path"])).name
    lineage = sidecar.lineage.model_copy(
        update={
            "tool_versions": {**tool_versions(), **sidecar.lineage.tool_versions},
            "settings": settings,
        }
    )
    files = {member: model_bytes, REFERENCE_SKETCH_NAME: sketch_bytes}

    def entries(members: dict[str, bytes]) -> list[FileEntry]:
        return [
            FileEntry(path=k, sha256=sha256_hex(v), size=len(v)) for k, v in sorted(members.items())
        ]

    try:
        draft = Manifest(
            name=name,
            version=version,
            release=release if release is not None else default_release(created),
            created_at=created,
            expires_at=created + timedelta(days=expires_days),
            model=ModelInfo(
                path=member,
                format=facts.format,  # type: ignore[arg-type]
                opset=facts.opset,
                ml_opset=facts.ml_opset,
                operators=facts.operators,
                size_bytes=len(model_bytes),
            ),
            files=entries(files),
            input_schema=schema,
            output_schema=sidecar.output_schema,
            lineage=lineage,
            quantization=sidecar.quantization,
            targets=targets,
            smoke_tests=[smoke],
            fallback=fallback or Fallback(),
            metadata=metadata_ or {},
        )
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ToolchainError(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}") from None
    say("writing the model card and signing")
    files[MODEL_CARD_NAME] = render_model_card(draft, sidecar.parity).encode()
    manifest = draft.model_copy(update={"files": entries(files)})
    manifest = Manifest.model_validate(manifest.model_dump())
    manifest_bytes = canonical_bytes(manifest)
    signature = pair.sign(manifest_bytes)
    write_atomic(Path(out), pack_bundle(manifest_bytes, signature, files))
    return manifest
