"""PyTorch modules → ONNX: a module saved whole, a TorchScript file, a CNN shaped by its data."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from toolchain.convert import convert
from toolchain.data import load_data
from toolchain.errors import UnsupportedModelError
from toolchain.runner import ModelRunner
from toolchain.sidecar import read_sidecar
from toolchain.sources import load_source


@pytest.mark.parametrize(
    ("case", "exporter", "opset"),
    [
        ("mlp.pt", "dynamo=True", 18),
        ("mlp_script.pt", "dynamo=False", 17),
        ("regressor.pt", "dynamo=True", 18),
        ("cnn.pt", "dynamo=True", 18),
    ],
)
def test_torch_module_exports_to_onnx_with_parity_and_names_its_exporter(
    case, exporter, opset, torch_sources, tmp_path
):
    source = torch_sources[case]
    src = load_source(source.path)
    assert src.kind == "torch" and src.task == source.task
    data = load_data(source.data)

    converted = convert(src, data, out=tmp_path / "model.onnx")

    report = converted.parity
    assert report.passed, report.failures
    if source.task == "classification":
        assert report.label_agreement == 1.0
        assert report.max_abs_proba_diff is not None and report.max_abs_proba_diff < 1e-5
        assert converted.sidecar.output_schema.classes == list(range(10))
        assert converted.sidecar.output_schema.probability_output == "probabilities"
    else:
        assert report.max_abs_error is not None and report.max_abs_error < 1e-4
    side = read_sidecar(converted.path)
    assert side is not None
    lineage = side.lineage
    assert lineage.source_kind == "torch" and "torch" in lineage.tool_versions
    assert exporter in lineage.converter and f"opset {opset}" in lineage.converter
    assert lineage.settings["exporter"].startswith("torch.onnx.export")
    assert lineage.settings["opset"] == opset
    import onnx

    model = onnx.load(str(converted.path))
    assert {i.domain: i.version for i in model.opset_import}[""] == opset
    # the input shape came from the data: a 4-D .npz gives the CNN its 1×8×8 images
    shape = side.input_schema.inputs[0].shape
    assert shape == ([None, 1, 8, 8] if case == "cnn.pt" else [None, data.n_features])
    runner = ModelRunner.open(converted.path, side.input_schema, side.output_schema)
    assert len(runner.predict(data.X[:3]).scores) == 3


def test_classifier_probabilities_are_a_softmax_not_logits(torch_sources, tmp_path):
    source = torch_sources["mlp_script.pt"]
    data = load_data(source.data)
    converted = convert(load_source(source.path), data, out=tmp_path / "m.onnx")
    side = converted.sidecar
    probs = ModelRunner.open(converted.path, side.input_schema, side.output_schema).predict(
        data.X[:20]
    )
    p = np.asarray(probs.probabilities)
    assert np.all(p >= 0) and np.allclose(p.sum(axis=1), 1.0, atol=1e-5)
    assert side.lineage.settings["output_head"] == "Softmax appended to the module's logits"


def test_a_state_dict_is_refused_with_what_to_save_instead(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "weights.pt"
    torch.save(torch.nn.Linear(4, 3).state_dict(), path)
    with pytest.raises(UnsupportedModelError, match=r"not an nn\.Module.*save the module whole"):
        load_source(path)


def test_a_corrupt_torch_file_is_refused(tmp_path):
    pytest.importorskip("torch")
    path = tmp_path / "model.pt"
    path.write_bytes(pickle.dumps([1, 2]) + b"garbage")
    with pytest.raises(UnsupportedModelError, match=r"model\.pt"):
        load_source(path)


def test_data_of_the_wrong_width_is_refused_before_export(torch_sources, datasets, tmp_path):
    from toolchain.errors import DataError

    source = torch_sources["mlp.pt"]  # 64 inputs
    with pytest.raises(DataError, match=r"on a row of the data \(shape \[4\]\).*mat1 and mat2"):
        convert(load_source(source.path), load_data(datasets["iris"].npz), out=tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_convert_command_reports_the_exporter_and_opset(torch_sources, tmp_path):
    from typer.testing import CliRunner

    from toolchain.cli import app

    source = torch_sources["mlp_script.pt"]
    out = tmp_path / "m.onnx"
    result = CliRunner().invoke(
        app, ["convert", str(source.path), "--data", str(source.data), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert f"wrote {out} (onnx; torch.onnx.export(dynamo=False)" in result.output
    assert "opset 17" in result.output and "parity: ok" in result.output
