"""The ``model_card.md`` every bundle carries, rendered from its manifest.

The card is written for a person deciding whether to deploy the bundle: what the model
is, what it takes and returns, where it came from, how it was quantized, how fast it is
estimated to be on each target, how closely it matches its source, and its limits.
"""

from __future__ import annotations

from typing import Any

from protocol.manifest import Manifest


def _fmt(v: float | None, unit: str = "", digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}{unit}"


def render_model_card(manifest: Manifest, parity: dict[str, Any] | None = None) -> str:
    """Markdown for ``manifest`` (the card itself is not listed in the manifest it renders)."""
    m = manifest
    lines = [
        f"# {m.name} {m.version}",
        "",
        f"Release {m.release}, created {m.created_at.isoformat()}, "
        f"expires {m.expires_at.isoformat()}.",
        "",
        "## What it is",
        "",
        f"A {m.output_schema.task} model ({m.lineage.source_name or m.lineage.source_kind}) "
        f"converted from {m.lineage.source_kind} to {m.model.format} "
        f"(`{m.model.path}`, {m.model.size_bytes} bytes).",
        "",
        "## Inputs",
        "",
        "| feature | kind | dtype | range / categories |",
        "|---|---|---|---|",
    ]
    for f in m.input_schema.features:
        if f.categories:
            rng = ", ".join(f.categories[:10]) + (" …" if len(f.categories) > 10 else "")
        elif f.min is not None and f.max is not None:
            rng = f"{f.min:g} … {f.max:g}"
        else:
            rng = "–"
        lines.append(f"| {f.name} | {f.kind} | {f.dtype} | {rng} |")
    out = m.output_schema
    lines += ["", "## Outputs", ""]
    if out.task == "classification":
        lines.append(f"Class label and per-class probabilities; classes: {out.classes}.")
    else:
        lines.append(f"{out.n_outputs} regression value(s).")
    lines += [
        "",
        "## Lineage",
        "",
        f"- source: {m.lineage.source_kind} `{m.lineage.source_name}`, "
        f"sha256 `{m.lineage.source_sha256}`",
        f"- converter: {m.lineage.converter or '–'}",
    ]
    for k, v in sorted(m.lineage.settings.items()):
        lines.append(f"- setting `{k}`: {v}")
    if m.lineage.tool_versions:
        tools = ", ".join(f"{k} {v}" for k, v in sorted(m.lineage.tool_versions.items()))
        lines.append(f"- tools: {tools}")
    lines += ["", "## Quantization", "", f"Mode: {m.quantization.mode}."]
    for k, v in sorted(m.quantization.details.items()):
        lines.append(f"- {k}: {v}")
    lines += [
        "",
        "## Targets (latency is an estimate: host time × the profile's speed factor)",
        "",
        "| profile | budget ms | est. p50 ms | est. p95 ms | est. p99 ms | peak MiB | fits |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in m.targets:
        b = t.benchmark
        if b is None:
            lines.append(f"| {t.profile} | {t.latency_budget_ms:g} | – | – | – | – | – |")
        else:
            lines.append(
                f"| {t.profile} | {t.latency_budget_ms:g} | {_fmt(b.p50_ms)} | {_fmt(b.p95_ms)} | "
                f"{_fmt(b.p99_ms)} | {_fmt(b.peak_memory_mb, digits=1)} | "
                f"{'yes' if b.fits_budget else 'NO'} |"
            )
    lines += ["", "## Parity", ""]
    if parity:
        lines.append(f"Compared with: {parity.get('reference', 'the source model')}.")
        for k in (
            "n_rows",
            "label_agreement",
            "max_abs_proba_diff",
            "max_abs_error",
            "max_rel_error",
            "passed",
        ):
            if parity.get(k) is not None:
                lines.append(f"- {k}: {parity[k]}")
    else:
        lines.append("No parity report recorded (the model was packaged without its source).")
    if m.metadata:
        lines += ["", "## Build notes", ""]
        lines += [f"- {k}: {v}" for k, v in sorted(m.metadata.items())]
    n_rows = sum(len(s.rows) for s in m.smoke_tests)
    lines += [
        "",
        "## Smoke tests",
        "",
        f"{len(m.smoke_tests)} smoke test(s) with {n_rows} canonical row(s); a device installs the "
        "bundle only when its outputs match the recorded ones within the stated tolerance.",
        "",
        "## Intended use and limitations",
        "",
        "- Intended for inputs like the reference data summarised in `reference.sketch`; the fleet "
        "server reports drift against it.",
        "- Latency figures are estimates until measured on a device.",
        "- Inputs outside the reference ranges or unseen categories are counted as out-of-range; "
        "predictions for them are extrapolation.",
    ]
    if m.quantization.mode != "none":
        lines.append("- Quantized weights: small numeric differences from the source are expected.")
    return "\n".join(lines) + "\n"
