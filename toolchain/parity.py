"""Does a converted model predict what its source predicts?

Classification: share of rows with the same label, and max |Δprobability| over all cells.
Regression: max absolute and max relative error; a value passes when
``|Δ| ≤ max_abs_error + max_rel_error·|reference|`` (numpy ``allclose`` semantics, so
targets near zero are judged by the absolute and large targets by the relative bound).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from protocol.feeds import Prediction

from .errors import ParityError

Task = Literal["classification", "regression"]


@dataclass
class ParityThresholds:
    min_label_agreement: float = 0.999
    max_proba_diff: float = 1e-3
    max_abs_error: float = 1e-3
    max_rel_error: float = 1e-3


@dataclass
class ParityReport:
    task: Task
    n_rows: int
    label_agreement: float | None = None
    max_abs_proba_diff: float | None = None
    max_abs_error: float | None = None
    max_rel_error: float | None = None
    passed: bool = True
    failures: list[str] = field(default_factory=list)
    thresholds: ParityThresholds = field(default_factory=ParityThresholds)

    def rows(self) -> list[tuple[str, str, str, str]]:
        """(metric, value, threshold, ok) rows for a table."""
        t = self.thresholds
        out: list[tuple[str, str, str, str]] = [("rows compared", str(self.n_rows), "", "")]

        def add(name: str, value: float | None, limit: str, ok: bool) -> None:
            if value is not None:
                out.append((name, f"{value:.6g}", limit, "yes" if ok else "NO"))

        if self.label_agreement is not None:
            add(
                "label agreement",
                self.label_agreement,
                f"≥ {t.min_label_agreement:g}",
                self.label_agreement >= t.min_label_agreement,
            )
        if self.max_abs_proba_diff is not None:
            add(
                "max |Δprobability|",
                self.max_abs_proba_diff,
                f"≤ {t.max_proba_diff:g}",
                self.max_abs_proba_diff <= t.max_proba_diff,
            )
        if self.task == "regression":
            ok = self.passed
            add("max absolute error", self.max_abs_error, f"≤ {t.max_abs_error:g} + rel", ok)
            add("max relative error", self.max_rel_error, f"≤ {t.max_rel_error:g} + abs", ok)
        return out

    def summary(self) -> str:
        if self.passed:
            return f"parity ok on {self.n_rows} rows"
        return f"parity failed on {self.n_rows} rows: " + "; ".join(self.failures)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def raise_if_failed(self, what: str = "converted model") -> None:
        if not self.passed:
            raise ParityError(f"{what}: {self.summary()}", self)


def compare(
    reference: Prediction,
    candidate: Prediction,
    task: Task,
    thresholds: ParityThresholds | None = None,
) -> ParityReport:
    """Compare a candidate's predictions with the reference (the source model's)."""
    t = thresholds or ParityThresholds()
    if task == "classification":
        return _compare_classification(reference, candidate, t)
    return _compare_regression(reference, candidate, t)


def _compare_classification(ref: Prediction, cand: Prediction, t: ParityThresholds) -> ParityReport:
    failures: list[str] = []
    if ref.labels is None or cand.labels is None:
        raise ValueError("classification parity needs labels on both sides")
    n = len(ref.labels)
    if len(cand.labels) != n:
        raise ValueError(f"{n} reference rows but {len(cand.labels)} candidate rows")
    same = sum(1 for a, b in zip(ref.labels, cand.labels, strict=True) if _same_label(a, b))
    agreement = same / n if n else 1.0
    if agreement < t.min_label_agreement:
        failures.append(
            f"label agreement {agreement:.4%} < {t.min_label_agreement:.4%} "
            f"({n - same} of {n} rows differ)"
        )
    diff = None
    if ref.probabilities is not None and cand.probabilities is not None:
        a = np.asarray(ref.probabilities, dtype=np.float64)
        b = np.asarray(cand.probabilities, dtype=np.float64)
        if a.shape != b.shape:
            failures.append(f"probability shapes differ: {a.shape} vs {b.shape}")
        else:
            diff = float(np.max(np.abs(a - b))) if a.size else 0.0
            if diff > t.max_proba_diff:
                failures.append(f"max |Δprobability| {diff:.3g} > {t.max_proba_diff:g}")
    return ParityReport(
        "classification",
        n,
        label_agreement=agreement,
        max_abs_proba_diff=diff,
        passed=not failures,
        failures=failures,
        thresholds=t,
    )


def _same_label(a: Any, b: Any) -> bool:
    if a == b:
        return True
    return str(a) == str(b) or _num(a) == _num(b)


def _num(v: Any) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _compare_regression(ref: Prediction, cand: Prediction, t: ParityThresholds) -> ParityReport:
    if ref.values is None or cand.values is None:
        raise ValueError("regression parity needs values on both sides")
    a = np.asarray(ref.values, dtype=np.float64).reshape(len(ref.values), -1)
    b = np.asarray(cand.values, dtype=np.float64).reshape(len(cand.values), -1)
    failures: list[str] = []
    if a.shape != b.shape:
        failures.append(f"output shapes differ: {a.shape} vs {b.shape}")
        return ParityReport("regression", len(a), passed=False, failures=failures, thresholds=t)
    d = np.abs(a - b)
    max_abs = float(d.max()) if d.size else 0.0
    rel = d / np.maximum(np.abs(a), np.finfo(np.float64).tiny)
    max_rel = float(rel.max()) if rel.size else 0.0
    bad = d > t.max_abs_error + t.max_rel_error * np.abs(a)
    if not np.all(np.isfinite(b)):
        failures.append("candidate produced NaN/inf values")
    elif bad.any():
        i = int(np.argwhere(bad)[0][0])
        failures.append(
            f"{int(bad.sum())} of {bad.size} values differ by more than {t.max_abs_error:g} + "
            f"{t.max_rel_error:g}·|ref| (max abs {max_abs:.3g}, first at row {i})"
        )
    return ParityReport(
        "regression",
        len(a),
        max_abs_error=max_abs,
        max_rel_error=max_rel,
        passed=not failures,
        failures=failures,
        thresholds=t,
    )
