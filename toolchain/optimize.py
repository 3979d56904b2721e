"""Try every variant a source model allows, measure each, pick the best that fits.

Variants: ONNX fp32, dynamic INT8, static INT8 (QDQ, calibrated on DATA) and FP16 for
every source that converts to ONNX (scikit-learn, XGBoost, LightGBM, CatBoost, PyTorch and
ONNX files); TFLite fp32, dynamic-range, full INT8 and FP16 for Keras sources, plus their
ONNX variants. ONNX→TFLite is skipped: no converter works with the pinned versions
(:data:`toolchain.keras_onnx.ONNX_TO_TFLITE_UNAVAILABLE`).

Accuracy: when DATA has a target, a quarter of it (at least 10 rows, seeded) is held out;
the rest calibrates and checks conversion parity. Each variant is scored on the held-out
rows against the truth (accuracy for classifiers, R² for regressors) and compared with
the source model's score: ``drop = source score - variant score``. Without a target the
variant is scored against the source's own predictions (agreement or R²), so ``drop`` is
``1 - agreement`` (or ``1 - R²``).

Choice: among variants that converted, fit the profile (see :mod:`toolchain.benchmark`)
and lose at most ``max_accuracy_drop``, the smallest estimated p95 wins; a tie (within 5%,
which is timing noise on a shared host) goes to the smaller file. Every other variant gets
the reason it lost. INT8 is never assumed faster: each variant is timed on this host.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from protocol.feeds import Prediction
from protocol.profiles import DeviceProfile

from .benchmark import BenchReport, benchmark
from .errors import QuantizationNotApplicable, ToolchainError

Progress = Callable[[str], None]

ONNX_VARIANTS = [
    ("onnx-fp32", None),
    ("onnx-int8-dynamic", "dynamic"),
    ("onnx-int8-static", "static"),
    ("onnx-fp16", "fp16"),
]
TFLITE_VARIANTS = [
    ("tflite-fp32", None),
    ("tflite-int8-dynamic", "dynamic"),
    ("tflite-int8", "int8"),
    ("tflite-fp16", "fp16"),
]
# Estimated p95 values within 5% are a tie (timing noise on a shared host): smaller file wins.
TIE_REL = 0.05


@dataclass
class Variant:
    name: str
    format: str
    mode: str
    path: Path | None = None
    size_bytes: int | None = None
    bench: BenchReport | None = None
    score: float | None = None
    drop: float | None = None
    agreement: float | None = None
    error: str | None = None
    verdict: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None and self.bench is not None

    @property
    def fits(self) -> bool:
        return self.ok and self.bench is not None and self.bench.fits

    @property
    def est_p95(self) -> float:
        return self.bench.result.p95_ms if self.bench else float("inf")


@dataclass
class OptimizeReport:
    profile: DeviceProfile
    task: str
    metric: str
    source_score: float
    max_accuracy_drop: float
    variants: list[Variant] = field(default_factory=list)
    chosen: Variant | None = None
    skipped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data (``edgefleet optimize --json`` prints this)."""
        p = self.profile
        return {
            "profile": p.name,
            "speed_factor": p.effective_speed_factor(),
            "speed_basis": p.speed_basis(),
            "speed_factor_estimate": p.speed_factor,
            "latency_budget_ms": p.latency_budget_ms,
            "metric": self.metric,
            "max_accuracy_drop": self.max_accuracy_drop,
            "variants": [
                {
                    "name": v.name,
                    "size_bytes": v.size_bytes,
                    "p50_ms": v.bench.result.p50_ms if v.bench else None,
                    "p95_ms": v.bench.result.p95_ms if v.bench else None,
                    "score": v.score,
                    "drop": v.drop,
                    "fits": v.fits if v.bench else None,
                    "verdict": v.verdict,
                    "error": v.error,
                }
                for v in self.variants
            ],
            "chosen": self.chosen.name if self.chosen else None,
            "path": str(self.chosen.path) if self.chosen and self.chosen.path else None,
        }


def _norm(v: Any) -> str:
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return _norm(v.item())
    return str(v)


def _labels(pred: Prediction) -> list[str]:
    return [_norm(v) for v in (pred.labels or [])]


def _values(pred: Prediction) -> np.ndarray:
    return np.asarray(pred.values, dtype=np.float64).reshape(-1)


def r2(truth: np.ndarray, pred: np.ndarray) -> float:
    truth = np.asarray(truth, dtype=np.float64).reshape(-1)
    ss_tot = float(np.sum((truth - truth.mean()) ** 2))
    ss_res = float(np.sum((truth - pred.reshape(-1)) ** 2))
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else 0.0)


def score(pred: Prediction, truth: Any, task: str) -> float:
    """Accuracy (classification) or R² (regression) of ``pred`` against ``truth``."""
    if task == "classification":
        got = _labels(pred)
        want = [_norm(v) for v in np.asarray(truth).reshape(-1)]
        return float(np.mean([a == b for a, b in zip(got, want, strict=False)])) if want else 0.0
    return r2(np.asarray(truth, dtype=np.float64), _values(pred))


def agreement(pred: Prediction, ref: Prediction, task: str) -> float:
    if task == "classification":
        return float(np.mean([a == b for a, b in zip(_labels(pred), _labels(ref), strict=False)]))
    return r2(_values(ref), _values(pred))


def split_holdout(n: int, has_target: bool, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(calibration indices, evaluation indices); the same rows for both without a target."""
    idx = np.arange(n)
    if not has_target or n < 40:
        return idx, idx
    perm = np.random.default_rng(seed).permutation(n)
    n_eval = max(10, n // 4)
    return np.sort(perm[n_eval:]), np.sort(perm[:n_eval])


def optimize(
    source_path: Path,
    data: Any,
    profile: DeviceProfile,
    *,
    out_dir: Path,
    max_accuracy_drop: float = 0.01,
    runs: int = 100,
    progress: Progress | None = None,
) -> OptimizeReport:
    """Build and measure every variant of ``source_path``; ``data`` is a :class:`Dataset`."""
    from .data import dataset_from_arrays
    from .runner import ModelRunner, source_predict
    from .sources import load_source

    say = progress or (lambda _msg: None)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    source = load_source(Path(source_path))
    calib_idx, eval_idx = split_holdout(len(data.X), data.y is not None)
    calib = dataset_from_arrays(
        data.X[calib_idx], None if data.y is None else data.y[calib_idx], data.feature_names
    )
    calib.row_shape = data.row_shape  # a PyTorch CNN's per-row input shape
    X_eval = data.X[eval_idx]
    y_eval = None if data.y is None else data.y[eval_idx]
    ref = source_predict(source, X_eval, row_shape=data.row_shape)
    task = source.task
    if y_eval is not None:
        metric = "accuracy" if task == "classification" else "R²"
        source_score = score(ref, y_eval, task)
    else:
        metric = "agreement" if task == "classification" else "R² vs source"
        source_score = 1.0
    report = OptimizeReport(profile, task, metric, source_score, max_accuracy_drop)
    if source.kind != "keras":
        report.skipped.append(
            "TFLite variants: TFLite conversion takes a Keras model, and ONNX → TFLite "
            "(onnx2tf) does not work with the pinned versions (see 'Not handled yet' in the "
            "README)"
        )

    for name, fmt, mode, make in _plans(source, calib, out_dir):
        variant = Variant(name=name, format=fmt, mode=mode or "none")
        report.variants.append(variant)
        say(f"{name}: building")
        try:
            variant.path = make()
        except QuantizationNotApplicable as exc:
            variant.error = f"not applicable: {exc}"
            continue
        except ToolchainError as exc:
            variant.error = f"failed to convert: {exc}"
            continue
        variant.size_bytes = variant.path.stat().st_size
        say(f"{name}: measuring")
        try:
            from .sidecar import describe

            side = describe(variant.path)
            runner = ModelRunner.open(variant.path, side.input_schema, side.output_schema)
            pred = runner.predict(X_eval)
            variant.agreement = agreement(pred, ref, task)
            variant.score = score(pred, y_eval, task) if y_eval is not None else variant.agreement
            variant.drop = source_score - variant.score
            variant.bench = benchmark(variant.path, profile, rows=X_eval, runs=runs)
        except ToolchainError as exc:
            variant.error = f"failed to run: {exc}"
    _choose(report)
    return report


def _plans(
    source: Any, calib: Any, out_dir: Path
) -> list[tuple[str, str, str | None, Callable[[], Path]]]:
    """(name, format, quantization mode, builder) for every variant the source allows."""
    from .convert import convert
    from .quantize import quantize

    plans: list[tuple[str, str, str | None, Callable[[], Path]]] = []
    formats = ["tflite", "onnx"] if source.kind == "keras" else ["onnx"]
    for fmt in formats:
        base: dict[str, Path] = {}
        variants = TFLITE_VARIANTS if fmt == "tflite" else ONNX_VARIANTS

        def make_base(fmt: str = fmt, base: dict[str, Path] = base) -> Path:
            if "path" not in base:
                out = out_dir / f"model-fp32.{fmt}"
                base["path"] = Path(convert(source, calib, to=fmt, out=out).path)  # type: ignore[arg-type]
            return base["path"]

        for name, mode in variants:
            if mode is None:
                plans.append((name, fmt, None, make_base))
            else:

                def make(
                    mode: str = mode,
                    name: str = name,
                    fmt: str = fmt,
                    mb: Callable[[], Path] = make_base,
                ) -> Path:
                    q = quantize(mb(), mode=mode, data=calib, out=out_dir / f"{name}.{fmt}")  # type: ignore[arg-type]
                    return Path(q.path)

                plans.append((name, fmt, mode, make))
    return plans


def _choose(report: OptimizeReport) -> None:
    limit = report.max_accuracy_drop + 1e-12
    passing = [v for v in report.variants if v.fits and v.drop is not None and v.drop <= limit]
    best: Variant | None = None
    if passing:
        fastest = min(v.est_p95 for v in passing)
        ties = [v for v in passing if v.est_p95 <= fastest * (1 + TIE_REL)]
        best = min(ties, key=lambda v: (v.size_bytes or 0, v.est_p95))
    report.chosen = best
    for v in report.variants:
        if v is best:
            v.verdict = (
                "chosen: smallest estimated p95 (within "
                f"{TIE_REL:.0%}, then smallest file) among variants that fit and stay accurate"
            )
        elif v.error:
            v.verdict = v.error
        elif v.bench is not None and not v.bench.fits:
            v.verdict = "over budget: " + "; ".join(v.bench.reasons)
        elif v.drop is not None and v.drop > limit:
            v.verdict = (
                f"too inaccurate: {report.metric} drop {v.drop:.4f} > {report.max_accuracy_drop:g}"
            )
        elif best is not None and v.est_p95 > best.est_p95 * (1 + TIE_REL):
            v.verdict = f"slower: est. p95 {v.est_p95:.3f} ms vs {best.est_p95:.3f} ms"
        elif best is not None:
            v.verdict = (
                f"larger: as fast within {TIE_REL:.0%} "
                f"but {v.size_bytes} vs {best.size_bytes} bytes"
            )
        else:
            v.verdict = "not chosen"
