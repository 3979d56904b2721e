"""``edgefleet build``: convert + optimize + package in one step, for the common path.

The variants are built and measured against the *first* profile given (the primary
target); the chosen variant is then packaged and benchmarked for every profile. When no
variant fits the primary profile's budget and accuracy goal, nothing is packaged and the
optimize report says why.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol.manifest import Fallback, Manifest
from protocol.profiles import DeviceProfile

from .errors import ToolchainError
from .keys import load_signing_key
from .optimize import OptimizeReport, optimize
from .package import check_identity, package
from .sources import check_source_path

Progress = Callable[[str], None]


@dataclass
class BuildResult:
    report: OptimizeReport
    manifest: Manifest | None = None
    bundle: Path | None = None


def _notes(report: OptimizeReport) -> dict[str, str]:
    chosen = report.chosen
    assert chosen is not None
    notes = {
        "variant": chosen.name,
        "chosen_for_profile": report.profile.name,
        "accuracy_metric": report.metric,
        "source_accuracy": f"{report.source_score:.4f}",
    }
    if chosen.score is not None and chosen.drop is not None:
        notes["variant_accuracy"] = f"{chosen.score:.4f}"
        notes["accuracy_drop"] = f"{chosen.drop:.4f}"
    return notes


def check_build_inputs(
    source_path: Path,
    *,
    name: str,
    version: str,
    profiles: Sequence[DeviceProfile],
    key_path: Path,
) -> None:
    """Every check ``build`` can make before any work: name and version, profiles, the
    signing key (private, Ed25519) and the model path. The CLI runs it before reading data."""
    check_identity(name, version)
    if not profiles:
        raise ToolchainError("build needs at least one --profile")
    load_signing_key(Path(key_path))
    check_source_path(source_path)


def build(
    source_path: Path,
    data: Any,
    *,
    name: str,
    version: str,
    profiles: Sequence[DeviceProfile],
    key_path: Path,
    out_dir: Path,
    max_accuracy_drop: float = 0.01,
    release: int | None = None,
    expires_days: float = 180,
    fallback: Fallback | None = None,
    runs: int = 100,
    progress: Progress | None = None,
) -> BuildResult:
    """Optimize ``source_path`` for ``profiles[0]`` and package the winner, signed."""
    check_build_inputs(
        source_path, name=name, version=version, profiles=profiles, key_path=key_path
    )
    out_dir = Path(out_dir)
    report = optimize(
        Path(source_path),
        data,
        profiles[0],
        out_dir=out_dir / "variants",
        max_accuracy_drop=max_accuracy_drop,
        runs=runs,
        progress=progress,
    )
    result = BuildResult(report=report)
    chosen = report.chosen
    if chosen is None or chosen.path is None:
        return result
    bundle = out_dir / f"{name}-{version}.efb"
    result.manifest = package(
        chosen.path,
        name=name,
        version=version,
        profiles=profiles,
        reference=data,
        key_path=key_path,
        out=bundle,
        release=release,
        expires_days=expires_days,
        fallback=fallback,
        runs=runs,
        metadata_=_notes(report),
        progress=progress,
    )
    result.bundle = bundle
    return result
