"""Field accuracy per model version and per device, from the labelled feedback devices report.

Each :class:`~protocol.messages.MetricsReport` carries, for its window, how many predictions
got ground truth through the agent's ``/v1/feedback`` (``feedback_count``) and the share
that was right (``accuracy``, classifiers) or the mean absolute error (``mae``, regressors).
Windows are stored once each (``device, model, version, window_end, seq``) and summed:

- classification: ``correct / labelled`` with a **Wilson** score interval (95 % by default);
  it stays inside [0, 1] and behaves with few labels, where the normal interval does not;
- regression: the label-weighted mean absolute error, with a normal interval from the spread
  of the per-window errors (windows are the only unit the wire carries; with one window there
  is no interval).

:func:`compare_versions` is what a rollout gate asks: is the new version's accuracy below the
old one's by more than a margin, with at least ``min_labels`` labels on each side?

The windows live in the registry (:class:`~.measure_store.FeedbackStore`: the SQLite file,
or PostgreSQL shared by several server processes); a window kept once is never summed twice.
"""

from __future__ import annotations

import math
from typing import Any

from protocol.messages import MetricsReport

from .measure_store import FeedbackStore

MAX_LABELS_PER_WINDOW = 10_000_000  # a window claiming more is refused, not summed
Z95 = 1.959963984540054


def wilson(correct: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion (``(0, 1)`` when there is no label)."""
    if n <= 0:
        return 0.0, 1.0
    p = min(1.0, max(0.0, correct / n))
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum feedback windows into one accuracy (or MAE) with its interval."""
    cls = [r for r in rows if r["kind"] == "accuracy"]
    reg = [r for r in rows if r["kind"] == "mae"]
    out: dict[str, Any] = {"windows": len(rows)}
    lo: float | None
    hi: float | None
    if len(cls) >= len(reg):
        n = sum(int(r["n"]) for r in cls)
        correct = sum(float(r["value"]) * int(r["n"]) for r in cls)
        lo, hi = wilson(correct, n)
        out.update(
            metric="accuracy",
            labelled=n,
            value=correct / n if n else None,
            ci_low=lo if n else None,
            ci_high=hi if n else None,
            interval="wilson 95%",
        )
    else:
        n = sum(int(r["n"]) for r in reg)
        mean = sum(float(r["value"]) * int(r["n"]) for r in reg) / n if n else None
        lo = hi = None
        if mean is not None and len(reg) >= 2:
            var = sum(int(r["n"]) * (float(r["value"]) - mean) ** 2 for r in reg) / n
            half = Z95 * math.sqrt(var / len(reg))
            lo, hi = max(0.0, mean - half), mean + half
        out.update(
            metric="mae",
            labelled=n,
            value=mean,
            ci_low=lo,
            ci_high=hi,
            interval="normal 95% over windows",
        )
    return out


def compare_versions(
    new: dict[str, Any] | None, old: dict[str, Any] | None, margin: float, min_labels: int
) -> str:
    """A reason when ``new`` is worse than ``old`` by more than ``margin``; else ``""``.

    Accuracy: worse is lower; MAE: worse is higher. Nothing is decided below ``min_labels``
    labels on either side or when the two use different metrics.
    """
    if not new or not old or new.get("metric") != old.get("metric"):
        return ""
    if new.get("value") is None or old.get("value") is None:
        return ""
    if new["labelled"] < min_labels or old["labelled"] < min_labels:
        return ""
    if new["metric"] == "accuracy":
        gap = old["value"] - new["value"]
        if gap > margin:
            return (
                f"field accuracy of {new.get('version', 'the new version')} is "
                f"{new['value']:.1%} on {new['labelled']} labels, {gap:.1%} below "
                f"{old.get('version', 'the old version')}'s {old['value']:.1%} on "
                f"{old['labelled']} labels (margin {margin:.1%})"
            )
        return ""
    gap = new["value"] - old["value"]
    if gap > margin:
        return (
            f"field MAE of {new.get('version', 'the new version')} is {new['value']:.4g} on "
            f"{new['labelled']} labels, {gap:.4g} above {old.get('version', 'the old version')}'s "
            f"{old['value']:.4g} (margin {margin:g})"
        )
    return ""


class FieldAccuracy:
    """Stores labelled windows; answers per version and per device. Thread-safe (the store is)."""

    def __init__(self, store: FeedbackStore) -> None:
        self.store = store

    def ingest(self, msg: MetricsReport) -> bool:
        """Keep a window that carries labelled feedback; False when there is none."""
        if msg.model is None or not 0 < msg.feedback_count <= MAX_LABELS_PER_WINDOW:
            return False
        if msg.accuracy is not None and math.isfinite(msg.accuracy) and 0 <= msg.accuracy <= 1:
            kind, value = "accuracy", float(msg.accuracy)
        elif msg.mae is not None and math.isfinite(msg.mae) and msg.mae >= 0:
            kind, value = "mae", float(msg.mae)
        else:
            return False
        row = {
            "device_id": msg.device_id,
            "model": msg.model.name,
            "version": msg.model.version,
            "ts": msg.window_end.timestamp(),
            "seq": msg.seq,
            "n": int(msg.feedback_count),
            "kind": kind,
            "value": value,
        }
        self.store.add(row)
        return True

    def _rows(self, model: str | None, version: str | None, device: str | None) -> list[Any]:
        return self.store.rows(model, version, device)

    def report(
        self,
        model: str | None = None,
        version: str | None = None,
        *,
        by: str = "version",
        device: str | None = None,
    ) -> list[dict[str, Any]]:
        """One entry per model version (``by="version"``) or per device and version."""
        groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for r in self._rows(model, version, device):
            key = (r["model"], r["version"]) + ((r["device_id"],) if by == "device" else ())
            groups.setdefault(key, []).append(r)
        out = []
        for key, rows in sorted(groups.items()):
            entry: dict[str, Any] = {"model": key[0], "version": key[1]}
            if by == "device":
                entry["device_id"] = key[2]
            else:
                entry["devices"] = len({r["device_id"] for r in rows})
            entry.update(summarize(rows))
            out.append(entry)
        return out

    def version(self, model: str, version: str, devices: list[str] | None = None) -> dict[str, Any]:
        rows = self._rows(model, version, None)
        if devices is not None:
            keep = set(devices)
            rows = [r for r in rows if r["device_id"] in keep]
        return {"model": model, "version": version, **summarize(rows)}

    def previous_version(self, model: str, version: str) -> str | None:
        """The other version of ``model`` with the most labels (what the new one replaces)."""
        counts: dict[str, int] = {}
        for r in self._rows(model, None, None):
            if r["version"] != version:
                counts[r["version"]] = counts.get(r["version"], 0) + int(r["n"])
        return max(counts, key=lambda v: (counts[v], v)) if counts else None
