"""Signed test bundles built straight from protocol + skl2onnx (no toolchain needed).

Agent and fleet-server tests use these so they do not depend on toolchain internals.
Models are trained here, from datasets scikit-learn ships.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np

from protocol import (
    BenchmarkResult,
    FeatureSpec,
    FileEntry,
    InputSchema,
    KeyPair,
    Lineage,
    Manifest,
    ModelInfo,
    ModelInput,
    OutputSchema,
    SmokeTest,
    TargetProfile,
    build_reference,
    canonical_bytes,
    pack_bundle,
    sha256_hex,
)
from protocol.feeds import decode_outputs, make_feeds
from protocol.manifest import Fallback


@dataclass(frozen=True)
class TrainedModel:
    name: str
    onnx: bytes
    X: np.ndarray
    y: np.ndarray
    input_schema: InputSchema
    output_schema: OutputSchema


@functools.lru_cache(maxsize=8)
def trained(kind: str = "iris-logreg") -> TrainedModel:
    """A small classifier converted to ONNX (ZipMap off). Cached per process."""
    from skl2onnx import to_onnx
    from sklearn.datasets import load_digits, load_iris
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression

    if kind == "iris-logreg":
        X, y = load_iris(return_X_y=True)
        model: Any = LogisticRegression(max_iter=500).fit(X, y)
        names = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
    elif kind == "digits-forest":
        X, y = load_digits(return_X_y=True)
        model = RandomForestClassifier(n_estimators=100, random_state=0, n_jobs=1).fit(X, y)
        names = [f"pixel_{i}" for i in range(X.shape[1])]
    else:
        raise ValueError(kind)
    X = X.astype(np.float32)
    onx = to_onnx(
        model, X[:1], options={id(model): {"zipmap": False}}, target_opset={"": 17, "ai.onnx.ml": 3}
    )
    feats = [
        FeatureSpec(name=n, min=float(X[:, j].min()), max=float(X[:, j].max()))
        for j, n in enumerate(names)
    ]
    in_name = onx.graph.input[0].name
    schema = InputSchema(
        features=feats,
        inputs=[
            ModelInput(name=in_name, dtype="float32", shape=[None, len(names)], features=names)
        ],
    )
    out = OutputSchema(
        task="classification",
        classes=[int(c) for c in model.classes_],
        label_output=onx.graph.output[0].name,
        probability_output=onx.graph.output[1].name,
    )
    return TrainedModel(kind, onx.SerializeToString(), X, y, schema, out)


@functools.lru_cache(maxsize=1)
def trained_mixed() -> TrainedModel:
    """Iris plus a categorical ``size`` column through a ColumnTransformer pipeline: five
    named ONNX inputs, one of them a string tensor (kind ``mixed-logreg``)."""
    import pandas as pd
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType, StringTensorType
    from sklearn.compose import ColumnTransformer
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    X, y = load_iris(return_X_y=True)
    names = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
    df = pd.DataFrame(X.astype(np.float32), columns=names)
    df["size"] = np.where(X[:, 2] < 2.5, "small", np.where(X[:, 2] < 5, "medium", "large"))
    pipe = Pipeline(
        [
            (
                "ct",
                ColumnTransformer(
                    [
                        ("num", StandardScaler(), names),
                        ("cat", OneHotEncoder(handle_unknown="ignore"), ["size"]),
                    ]
                ),
            ),
            ("lr", LogisticRegression(max_iter=500)),
        ]
    ).fit(df, y)
    types = [(n, FloatTensorType([None, 1])) for n in names] + [
        ("size", StringTensorType([None, 1]))
    ]
    onx = to_onnx(
        pipe,
        initial_types=types,
        options={id(pipe): {"zipmap": False}},
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    feats = [FeatureSpec(name=n, min=float(df[n].min()), max=float(df[n].max())) for n in names]
    feats.append(
        FeatureSpec(
            name="size", kind="categorical", dtype="string", categories=["large", "medium", "small"]
        )
    )
    inputs = [ModelInput(name=n, dtype="float32", shape=[None, 1], features=[n]) for n in names]
    inputs.append(ModelInput(name="size", dtype="string", shape=[None, 1], features=["size"]))
    schema = InputSchema(features=feats, inputs=inputs)
    out = OutputSchema(
        task="classification",
        classes=[0, 1, 2],
        label_output="label",
        probability_output="probabilities",
    )
    rows = df.astype(object).to_numpy()
    return TrainedModel("mixed-logreg", onx.SerializeToString(), rows, y, schema, out)


def smoke_test(tm: TrainedModel, rows: int = 5) -> SmokeTest:
    import onnxruntime as ort

    sess = ort.InferenceSession(tm.onnx, providers=["CPUExecutionProvider"])
    X = tm.X[:rows]
    outs = sess.run(None, make_feeds(X, tm.input_schema))
    pred = decode_outputs(
        dict(zip([o.name for o in sess.get_outputs()], outs, strict=True)), tm.output_schema
    )
    return SmokeTest(
        rows=X.tolist(),
        expected_labels=pred.labels,
        expected_probabilities=np.asarray(pred.probabilities).tolist(),
        atol=1e-4,
    )


def make_bundle(
    key: KeyPair,
    *,
    name: str = "iris",
    version: str = "1.0.0",
    release: int = 1,
    kind: str = "iris-logreg",
    profiles: tuple[str, ...] = ("host",),
    created_at: datetime | None = None,
    expires_in: timedelta = timedelta(days=30),
    smoke: SmokeTest | None = None,
    model_bytes: bytes | None = None,
    fallback: Fallback = Fallback(),
    benchmark: BenchmarkResult | None = None,
) -> tuple[bytes, Manifest]:
    """Return ``(bundle bytes, manifest)`` for a signed bundle."""
    tm = trained_mixed() if kind == "mixed-logreg" else trained(kind)
    model = model_bytes if model_bytes is not None else tm.onnx
    ref = build_reference(tm.X, tm.input_schema)
    files = {
        "model.onnx": model,
        "reference.sketch": ref.to_bytes(),
        "model_card.md": f"# {name} {version}\n".encode(),
    }
    now = created_at or datetime.now(timezone.utc)
    manifest = Manifest(
        name=name,
        version=version,
        release=release,
        created_at=now,
        expires_at=now + expires_in,
        model=ModelInfo(
            path="model.onnx", format="onnx", opset=17, ml_opset=3, size_bytes=len(model)
        ),
        files=[
            FileEntry(path=k, sha256=sha256_hex(v), size=len(v)) for k, v in sorted(files.items())
        ],
        input_schema=tm.input_schema,
        output_schema=tm.output_schema,
        lineage=Lineage(
            source_sha256=sha256_hex(tm.onnx), source_kind="sklearn", converter="skl2onnx"
        ),
        targets=[
            TargetProfile(profile=p, latency_budget_ms=10.0, benchmark=benchmark) for p in profiles
        ],
        smoke_tests=[smoke or smoke_test(tm)],
        fallback=fallback,
    )
    mb = canonical_bytes(manifest)
    return pack_bundle(mb, key.sign(mb), files), manifest
