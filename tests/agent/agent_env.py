"""Shared helpers for the agent tests: a device in a tmp dir, and a fragile model.

``fragile_iris_onnx`` is a real ONNX model with the iris schema that answers a single
row but makes onnxruntime raise for a batch of two (a fixed Reshape), so fallbacks are
exercised by a genuine runtime error.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.config import AgentConfig
from agent.events import InstallEvent, PredictionEvent
from agent.installer import Installer
from agent.predictor import Predictor
from agent.slots import Slots
from protocol import KeyPair, SmokeTest, TrustStore, load_profile
from protocol.manifest import Fallback
from tests.support.bundles import make_bundle, trained

IRIS_ROW = [5.1, 3.5, 1.4, 0.2]


@dataclass
class Device:
    config: AgentConfig
    slots: Slots
    installer: Installer
    predictor: Predictor
    events: list[InstallEvent] = field(default_factory=list)


def make_device(
    tmp_path: Path, key: KeyPair, *, revoked: tuple[str, ...] = (), **config: Any
) -> Device:
    cfg = AgentConfig(data_dir=tmp_path / "data", **config)
    slots = Slots(cfg.data_dir / "slots", cfg.slots.keep_previous)
    predictor = Predictor(cfg)
    events: list[InstallEvent] = []
    trust = TrustStore.from_keys([key.public], revoked)
    installer = Installer(
        cfg, slots, trust, load_profile("host"), on_event=events.append, on_activate=predictor.swap
    )
    return Device(cfg, slots, installer, predictor, events)


class Recorder:
    """A PredictionObserver that keeps what it sees."""

    def __init__(self) -> None:
        self.events: list[PredictionEvent] = []
        self.feedback: list[tuple[Any, ...]] = []

    def on_prediction(self, event: PredictionEvent) -> None:
        self.events.append(event)

    def on_feedback(self, request_id: str, model: Any, truth: Any, predicted: Any) -> None:
        self.feedback.append((request_id, model, truth, predicted))


@functools.lru_cache(maxsize=1)
def fragile_iris_onnx() -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    tm = trained("iris-logreg")
    in_name = tm.input_schema.inputs[0].name
    label, probs = tm.output_schema.label_output, tm.output_schema.probability_output
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(4, 3)).astype(np.float32), "W")
    shape = numpy_helper.from_array(np.array([1, 3], dtype=np.int64), "shape")
    nodes = [
        helper.make_node("MatMul", [in_name, "W"], ["logits"]),
        helper.make_node("Reshape", ["logits", "shape"], ["fixed"]),  # only batch 1 fits
        helper.make_node("Softmax", ["fixed"], [probs], axis=1),
        helper.make_node("ArgMax", [probs], [label], axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "fragile",
        [helper.make_tensor_value_info(in_name, TensorProto.FLOAT, [None, 4])],
        [
            helper.make_tensor_value_info(label, TensorProto.INT64, [None]),
            helper.make_tensor_value_info(probs, TensorProto.FLOAT, [None, 3]),
        ],
        initializer=[w, shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def fragile_bundle(
    key: KeyPair, *, version: str = "2.0.0", release: int = 2, fallback: Fallback = Fallback()
) -> tuple[bytes, Any]:
    """A bundle whose model works on one row and raises on two (smoke test: one row)."""
    import onnxruntime as ort

    model = fragile_iris_onnx()
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    x = np.asarray([IRIS_ROW], dtype=np.float32)
    label, probs = sess.run(None, {sess.get_inputs()[0].name: x})
    smoke = SmokeTest(
        rows=[IRIS_ROW],
        expected_labels=[int(label[0])],
        expected_probabilities=probs.tolist(),
        atol=1e-4,
    )
    return make_bundle(
        key, version=version, release=release, model_bytes=model, smoke=smoke, fallback=fallback
    )


class ASGIClient:
    """A synchronous facade over ``httpx.AsyncClient`` + ``ASGITransport`` (in-process).

    (starlette's TestClient warns that plain httpx is deprecated for it, and warnings are
    errors here.)
    """

    def __init__(self, app: Any) -> None:
        import asyncio

        import httpx

        self._loop = asyncio.new_event_loop()
        self._client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://agent"
        )

    def request(self, method: str, url: str, **kwargs: Any) -> Any:
        return self._loop.run_until_complete(self._client.request(method, url, **kwargs))

    def get(self, url: str, **kwargs: Any) -> Any:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> Any:
        return self.request("POST", url, **kwargs)

    def close(self) -> None:
        self._loop.run_until_complete(self._client.aclose())
        self._loop.close()

    def __enter__(self) -> ASGIClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
