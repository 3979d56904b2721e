"""The ONNX made from XGBoost, LightGBM, CatBoost and PyTorch runs on the agent as any other.

Each model is converted, packaged and signed, installed by the agent's real installer
(signature, hashes, smoke test) and answers through ``agent.Predictor`` with the source
model's own labels. Optimize treats these sources like the others.
"""

from __future__ import annotations

import numpy as np
import pytest

from protocol.profiles import load_profile
from toolchain.convert import convert
from toolchain.data import load_data
from toolchain.sources import load_source

CASES = [
    ("xgboost_sources", "pipeline-wine.joblib"),
    ("lightgbm_sources", "classifier-iris.txt"),
    ("catboost_sources", "classifier-breast_cancer.cbm"),
    ("torch_sources", "mlp_script.pt"),
]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory):  # -> GeneratedKey
    from toolchain.keys import generate_keys

    return generate_keys(tmp_path_factory.mktemp("keys"), "release")


@pytest.mark.parametrize(("fixture", "case"), CASES, ids=[c for _, c in CASES])
def test_converted_model_installs_and_predicts_on_the_agent(fixture, case, request, keys, tmp_path):
    from agent.config import AgentConfig
    from agent.installer import Installer
    from agent.predictor import Predictor
    from agent.slots import Slots
    from protocol.signing import TrustStore
    from toolchain.package import package
    from toolchain.runner import source_predict

    source = request.getfixturevalue(fixture)[case]
    src = load_source(source.path)
    data = load_data(source.data)
    converted = convert(src, data, out=tmp_path / "model.onnx")
    bundle = tmp_path / "m-1.0.0.efb"
    package(
        converted.path,
        name="m",
        version="1.0.0",
        profiles=[load_profile("host")],
        reference=data,
        key_path=keys.private_path,
        out=bundle,
        runs=10,
    )
    cfg = AgentConfig(data_dir=tmp_path / "device")
    predictor = Predictor(cfg)
    installer = Installer(
        cfg,
        Slots(cfg.data_dir / "slots", cfg.slots.keep_previous),
        TrustStore.from_files([keys.public_path]),
        load_profile("host"),
        on_activate=predictor.swap,
    )
    manifest = installer.install_file(bundle)
    assert manifest.lineage.source_kind == src.kind

    rows = data.X[:25]
    answer = predictor.predict(rows.tolist())
    expected = source_predict(src, rows, row_shape=data.row_shape)
    assert not answer.fallback
    assert [int(v) for v in answer.labels] == [int(v) for v in expected.labels]
    assert np.abs(np.asarray(answer.probabilities) - expected.probabilities).max() < 1e-5


def test_optimize_tries_every_onnx_variant_for_boosted_trees_and_torch(
    lightgbm_sources, torch_sources, tmp_path
):
    from toolchain.optimize import optimize

    names = ["onnx-fp32", "onnx-int8-dynamic", "onnx-int8-static", "onnx-fp16"]
    for source in (lightgbm_sources["regressor-diabetes.joblib"], torch_sources["mlp_script.pt"]):
        report = optimize(
            source.path,
            load_data(source.data),
            load_profile("host"),
            out_dir=tmp_path / source.path.stem,
            runs=10,
        )
        assert [v.name for v in report.variants] == names
        by_name = {v.name: v for v in report.variants}
        assert by_name["onnx-fp32"].ok and by_name["onnx-fp32"].drop == pytest.approx(0, abs=1e-6)
        assert report.chosen is not None and report.chosen.drop is not None
        assert report.chosen.drop <= report.max_accuracy_drop + 1e-12
        assert all(v.verdict for v in report.variants)
        if source.task == "regression":  # trees: no weights to quantize, said so
            assert by_name["onnx-int8-dynamic"].error is not None
        else:  # an MLP: INT8 weights, measured, not assumed
            dynamic = by_name["onnx-int8-dynamic"]
            assert dynamic.ok and dynamic.size_bytes is not None
            assert dynamic.size_bytes < (by_name["onnx-fp32"].size_bytes or 0)
