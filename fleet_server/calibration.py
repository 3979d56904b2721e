"""Calibrated profiles: measured speed factors from field benchmarks, and latency outliers.

A profile's ``speed_factor`` says how much slower than the packaging host a device of that
class runs a model. The toolchain wrote an *estimated* device latency into every bundle's
manifest (host p50 × the factor it used, recorded as ``speed_factor`` in the target's
benchmark). A field benchmark (the ``benchmark`` command, sent by ``edgefleet fleet bench``,
or a benchmark a device reports after an install) measures the same bundle on the device.
The pair gives one ratio per device::

    ratio = device p50 / host p50        host p50 = manifest p50 / manifest speed_factor

Per profile the measured factor is the **median** ratio over devices (each device counts
once: the median of its own ratios), with the interquartile range as ``spread``, the
number of devices and the date of the newest sample. ``edgefleet profiles calibrate
--from-fleet`` writes that into the profile file as its ``[measured]`` table.

Outliers: a device whose ratio (or, from live telemetry, whose p95 for the same model
version) is more than ``OUTLIER_FACTOR`` × its profile's median away, either way, with at
least ``MIN_COHORT`` devices in the profile — thermal throttling, or a wrong profile.

Everything here is pure; the samples and the benchmark commands sent live in the registry
(:class:`~.measure_store.BenchStore`: the SQLite file, or PostgreSQL shared by several
server processes), one sample per command and device (a repeated answer changes nothing).
"""

from __future__ import annotations

import json
import math
import re
import statistics
import time
from typing import Any

MAX_MS = 3_600_000.0
OUTLIER_FACTOR = 2.0
MIN_COHORT = 3


_PROFILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def profile_name_ok(name: str) -> bool:
    """A profile name a device sent may be looked up: a plain name, never a path or .toml."""
    return bool(_PROFILE_NAME.match(name)) and not name.endswith(".toml") and ".." not in name


def host_p50(manifest: dict[str, Any], profile: str) -> tuple[float | None, str]:
    """The host p50 behind the manifest's estimate for ``profile``, and where it came from."""
    targets = {t.get("profile"): t for t in manifest.get("targets") or []}
    for name in (profile, "host"):
        t = targets.get(name) or {}
        b = t.get("benchmark") or {}
        p50 = b.get("p50_ms")
        if not isinstance(p50, (int, float)) or p50 <= 0:
            continue
        if b.get("estimated") is False:
            continue  # a device measurement, not the host's
        factor = _factor_of(str(b.get("measured_on") or ""))
        if name == "host":
            return float(p50) / float(factor or 1.0), "manifest host target"
        if factor is not None:
            return float(p50) / factor, f"manifest {name} estimate ÷ {factor:g}"
        if not profile_name_ok(str(name)):
            continue
        try:
            from protocol.profiles import load_profile

            est = load_profile(name).speed_factor
        except Exception:
            continue
        return float(p50) / est, f"manifest {name} estimate ÷ profile estimate {est:g}"
    return None, "no host timing in the manifest"


def _factor_of(measured_on: str) -> float | None:
    """The factor the toolchain used, from ``"x86_64 host × 4.2 (…)"`` (None if absent)."""
    m = re.search(r"×\s*([0-9]+(?:\.[0-9]+)?(?:e[+-]?[0-9]+)?)", measured_on)
    if m is None:
        return None
    value = float(m.group(1))
    return value if value > 0 else None


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def derive(samples: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per profile: the measured speed factor from samples with a ``ratio``.

    Each sample: ``device_id, profile, ratio, ts, model, version`` (extra keys ignored).
    """
    by_profile: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for s in samples:
        if not s.get("profile") or not isinstance(s.get("ratio"), (int, float)) or s["ratio"] <= 0:
            continue
        by_profile.setdefault(s["profile"], {}).setdefault(s["device_id"], []).append(s)
    out: dict[str, dict[str, Any]] = {}
    for profile, devices in sorted(by_profile.items()):
        per_device = {d: statistics.median(x["ratio"] for x in rows) for d, rows in devices.items()}
        ratios = sorted(per_device.values())
        median = statistics.median(ratios)
        q1, q3 = _quartiles(ratios)
        newest = max(x["ts"] for rows in devices.values() for x in rows)
        bundles = sorted(
            {f"{x['model']}@{x['version']}" for rows in devices.values() for x in rows}
        )
        outliers = [
            {"device_id": d, "ratio": r, "times_median": r / median}
            for d, r in sorted(per_device.items())
            if len(ratios) >= MIN_COHORT
            and not median / OUTLIER_FACTOR <= r <= median * OUTLIER_FACTOR
        ]
        out[profile] = {
            "profile": profile,
            "speed_factor": median,
            "devices": len(ratios),
            "spread": q3 - q1,
            "q1": q1,
            "q3": q3,
            "min": ratios[0],
            "max": ratios[-1],
            "date": time.strftime("%Y-%m-%d", time.gmtime(newest)),
            "newest": newest,
            "bundles": bundles,
            "per_device": per_device,
            "outliers": outliers,
        }
    return out


def latency_outliers(
    rows: list[dict[str, Any]], factor: float = OUTLIER_FACTOR, min_cohort: int = MIN_COHORT
) -> list[dict[str, Any]]:
    """Devices whose p95 is far from the median p95 of their profile on the same version.

    ``rows``: ``device_id, profile, model, version, p95_ms`` (one per device, its recent p95).
    """
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("p95_ms") is None or not r.get("profile") or not r.get("model"):
            continue
        groups.setdefault((r["profile"], r["model"], r["version"]), []).append(r)
    out = []
    for (profile, model, version), members in sorted(groups.items()):
        if len(members) < min_cohort:
            continue
        median = statistics.median(float(m["p95_ms"]) for m in members)
        if median <= 0:
            continue
        for m in sorted(members, key=lambda x: x["device_id"]):
            k = float(m["p95_ms"]) / median
            if k > factor or k < 1.0 / factor:
                out.append(
                    {
                        "device_id": m["device_id"],
                        "profile": profile,
                        "model": model,
                        "version": version,
                        "p95_ms": float(m["p95_ms"]),
                        "profile_median_p95_ms": median,
                        "times_median": k,
                        "source": "telemetry",
                        "why": (
                            f"p95 {float(m['p95_ms']):.2f} ms is {k:.1f}× the {profile} median "
                            f"of {median:.2f} ms on {model} {version} "
                            "(thermal throttling or a wrong profile?)"
                        ),
                    }
                )
    return out


def _ms(value: Any) -> float | None:
    """A latency a device reported: a finite positive number below an hour, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    v = float(value)
    return v if math.isfinite(v) and 0 < v < MAX_MS else None


def bench_sample(
    device_id: str, profile: str, result: dict[str, Any], bundle: dict[str, Any], ts: float
) -> dict[str, Any] | None:
    """One stored sample from a device's benchmark ``result`` of the bundle the server asked
    it to time (None when the result is not a device measurement of that bundle).

    The result is hostile: numbers are checked for type and range, and the model it names
    must be the bundle's. The profile is the registry's, not the result's.
    """
    p50 = _ms(result.get("p50_ms"))
    model = result.get("model") or {}
    if p50 is None or result.get("estimated") is not False or not isinstance(model, dict):
        return None
    if (model.get("name"), model.get("version")) != (bundle.get("name"), bundle.get("version")):
        return None
    try:
        manifest: dict[str, Any] = json.loads(bundle["manifest"])
    except (ValueError, KeyError, TypeError):
        manifest = {}
    prof = profile
    host, basis = host_p50(manifest, prof)
    quant = manifest.get("quantization") or {}
    variant = (
        str(quant.get("mode") or quant.get("method") or "fp32")
        if isinstance(quant, dict)
        else "fp32"
    )
    return {
        "device_id": device_id,
        "profile": prof,
        "model": str(bundle.get("name")),
        "version": str(bundle.get("version")),
        "bundle_sha256": str(bundle.get("sha256") or ""),
        "variant": variant[:64],
        "p50_ms": p50,
        "p95_ms": _ms(result.get("p95_ms")) or p50,
        "host_p50_ms": host,
        "host_basis": basis,
        "ratio": (p50 / host) if host else None,
        "runs": runs if isinstance(runs := result.get("runs"), int) and 0 < runs <= 10**6 else 0,
        "ts": ts,
    }
