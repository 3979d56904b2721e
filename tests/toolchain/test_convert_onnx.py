"""ONNX sources pass through unchanged; their schema is inferred from the graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from toolchain.convert import convert
from toolchain.data import load_data
from toolchain.errors import DataError, RuntimeLoadError, UnsupportedModelError
from toolchain.runner import ModelRunner
from toolchain.sidecar import describe, read_sidecar
from toolchain.sources import load_source


def _linear_onnx(path: Path, n_in: int, n_out: int, softmax: bool, seed: int = 0) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.normal(size=(n_in, n_out)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.normal(size=(n_out,)).astype(np.float32), "B")
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xw"]),
        helper.make_node("Add", ["xw", "B"], ["z"]),
    ]
    out_name = "z"
    if softmax:
        nodes.append(helper.make_node("Softmax", ["z"], ["probs"], axis=1))
        out_name = "probs"
    graph = helper.make_graph(
        nodes,
        "handmade",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, n_in])],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, [None, n_out])],
        initializer=[w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_onnx_regressor_passes_through_byte_for_byte(datasets, tmp_path):
    src = _linear_onnx(tmp_path / "reg.onnx", 10, 1, softmax=False)
    source = load_source(src)
    assert source.kind == "onnx" and source.task == "regression"
    converted = convert(
        source, load_data(datasets["diabetes"].npz), out=tmp_path / "out" / "reg.onnx"
    )
    assert converted.path.read_bytes() == src.read_bytes()
    assert converted.parity.passed and converted.parity.max_abs_error == 0.0
    side = converted.sidecar
    assert side.output_schema.task == "regression" and side.output_schema.value_output == "z"
    assert side.input_schema.feature_names == datasets["diabetes"].feature_names
    assert side.lineage.converter.startswith("none")


def test_onnx_softmax_output_is_read_as_a_classifier(datasets, tmp_path):
    src = _linear_onnx(tmp_path / "clf.onnx", 4, 3, softmax=True)
    converted = convert(
        load_source(src), load_data(datasets["iris"].npz), out=tmp_path / "clf2.onnx"
    )
    out = converted.sidecar.output_schema
    assert out.task == "classification" and out.classes == [0, 1, 2]
    assert out.probability_output == "probs"
    pred = ModelRunner.open(converted.path, converted.sidecar.input_schema, out).predict(
        datasets["iris"].X[:5]
    )
    assert pred.probabilities is not None and np.allclose(
        pred.probabilities.sum(axis=1), 1, atol=1e-5
    )


def test_converting_an_onnx_file_in_place_keeps_it(datasets, tmp_path):
    src = _linear_onnx(tmp_path / "same.onnx", 4, 3, softmax=True)
    before = src.read_bytes()
    converted = convert(load_source(src), load_data(datasets["iris"].npz))
    assert converted.path == src and src.read_bytes() == before
    assert read_sidecar(src) is not None


def test_onnx_passthrough_rejects_feature_count_mismatch(datasets, tmp_path):
    src = _linear_onnx(tmp_path / "four.onnx", 4, 3, softmax=True)
    with pytest.raises(DataError, match="expects 4 features but the data has 13"):
        convert(load_source(src), load_data(datasets["wine"].npz), out=tmp_path / "x.onnx")


def test_describe_infers_schema_from_an_onnx_graph_without_sidecar(datasets, tmp_path):
    src = _linear_onnx(tmp_path / "bare.onnx", 4, 3, softmax=True)
    side = describe(src)
    assert side.input_schema.feature_names == ["f0", "f1", "f2", "f3"]
    assert side.input_schema.inputs[0].name == "x" and side.input_schema.inputs[0].shape == [
        None,
        4,
    ]
    assert side.lineage.settings["inferred_schema"] is True


def test_describe_reads_classes_from_an_skl2onnx_tree_classifier(datasets, save_model, tmp_path):
    from sklearn.ensemble import RandomForestClassifier

    iris = datasets["iris"]
    model = RandomForestClassifier(n_estimators=5, random_state=0).fit(iris.X, iris.y)
    converted = convert(
        load_source(save_model(model, "rf5")), load_data(iris.npz), out=tmp_path / "rf.onnx"
    )
    converted.path.with_name("rf.onnx.edgefleet.json").unlink()
    side = describe(converted.path)
    assert side.output_schema.classes == [0, 1, 2]
    assert side.output_schema.label_output == "label"
    assert side.output_schema.probability_output == "probabilities"


def test_load_source_rejects_a_corrupt_onnx_file(tmp_path):
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"\x00not protobuf at all")
    with pytest.raises(UnsupportedModelError, match=r"reading ONNX of broken\.onnx failed"):
        load_source(path)


def test_runner_rejects_unknown_model_suffix_and_unloadable_files(tmp_path):
    side = describe(_linear_onnx(tmp_path / "ok.onnx", 4, 3, softmax=True))
    other = tmp_path / "model.bin"
    other.write_bytes(b"x")
    with pytest.raises(RuntimeLoadError, match=r"expected a \.onnx or \.tflite file"):
        ModelRunner.open(other, side.input_schema, side.output_schema)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"garbage")
    with pytest.raises(RuntimeLoadError, match=r"onnxruntime load of bad\.onnx failed"):
        ModelRunner.open(bad, side.input_schema, side.output_schema)


def test_runner_turns_bad_rows_into_data_errors(tmp_path):
    side = describe(_linear_onnx(tmp_path / "ok.onnx", 4, 3, softmax=True))
    runner = ModelRunner.open(
        tmp_path / "ok.onnx", side.input_schema, side.output_schema, threads=2
    )
    assert runner.format == "onnx" and runner.load_ms > 0
    with pytest.raises(DataError, match="each row needs 4 features, got 3"):
        runner.predict([[1.0, 2.0, 3.0]])
    with pytest.raises(DataError, match="is not a number"):
        runner.predict([[1.0, 2.0, 3.0, "x"]])


# torch 2.13's default (dynamo) exporter needs onnxscript; the legacy TorchScript exporter
# works without it and warns (twice, in its own words) that it is deprecated.
@pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export")
@pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning")
def test_pytorch_export_passes_through_with_parity(datasets, tmp_path):
    torch = pytest.importorskip("torch")
    iris = datasets["iris"]
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    x, y = torch.tensor(iris.X), torch.tensor(iris.y)
    for _ in range(60):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    path = tmp_path / "torch_iris.onnx"
    torch.onnx.export(
        net,
        (x[:2],),
        str(path),
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        dynamo=False,
    )
    converted = convert(load_source(path), load_data(iris.npz), out=tmp_path / "out.onnx")
    assert converted.path.read_bytes() == path.read_bytes()
    assert converted.sidecar.output_schema.task == "classification"
    runner = ModelRunner.open(
        converted.path, converted.sidecar.input_schema, converted.sidecar.output_schema
    )
    labels = runner.predict(iris.X).labels
    expected = net(x).argmax(dim=1).tolist()
    assert labels == expected
    assert np.mean(np.array(labels) == iris.y) > 0.8


def test_multi_input_onnx_takes_data_columns_by_name(mixed_csv, save_model, tmp_path):
    import pandas as pd
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder

    frame = pd.read_csv(mixed_csv)
    y = frame.pop("species")
    pipe = Pipeline(
        [
            (
                "prep",
                ColumnTransformer(
                    [
                        ("num", "passthrough", ["sepal_length", "petal_width"]),
                        ("cat", OneHotEncoder(handle_unknown="ignore"), ["size"]),
                    ]
                ),
            ),
            ("clf", LogisticRegression(max_iter=1000)),
        ]
    ).fit(frame, y)
    first = convert(
        load_source(save_model(pipe, "ct")),
        load_data(mixed_csv, target="species"),
        out=tmp_path / "ct.onnx",
    )
    # the same columns in another order
    shuffled = tmp_path / "shuffled.csv"
    order = ["size", "shape", "petal_width", "sepal_width", "sepal_length"]
    frame[order].assign(species=y).to_csv(shuffled, index=False)
    again = convert(
        load_source(first.path), load_data(shuffled, target="species"), out=tmp_path / "ct2.onnx"
    )
    assert again.parity.passed and again.path.read_bytes() == first.path.read_bytes()
    names = [i.name for i in again.sidecar.input_schema.inputs]
    assert names == [i.name for i in first.sidecar.input_schema.inputs]
    assert sorted(names) == sorted(order)
    size = next(f for f in again.sidecar.input_schema.features if f.name == "size")
    assert size.kind == "categorical" and size.dtype == "string"
    missing = tmp_path / "missing.csv"
    frame[order[1:]].assign(species=y).to_csv(missing, index=False)
    with pytest.raises(DataError, match=r"ct\.onnx has inputs \['size'\] that the data has no"):
        convert(
            load_source(first.path), load_data(missing, target="species"), out=tmp_path / "ct3.onnx"
        )


# --- ONNX → TFLite: no converter works with the pinned versions ------------------------


def test_onnx_to_tflite_is_refused_with_the_reason(tmp_path, datasets):
    from toolchain.errors import ConversionError

    model = _linear_onnx(tmp_path / "lin.onnx", 4, 3, softmax=True)
    with pytest.raises(ConversionError, match=r"onnx2tf 2\.x needs Python ≥ 3\.12") as info:
        convert(load_source(model), load_data(datasets["iris"].npz), to="tflite")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "lin.tflite").exists()


def test_convert_command_says_in_one_line_why_onnx_to_tflite_is_not_offered(tmp_path, datasets):
    import subprocess
    import sys

    model = _linear_onnx(tmp_path / "lin.onnx", 4, 3, softmax=True)
    out = subprocess.run(
        [sys.executable, "-m", "edgefleet", "convert", str(model), "--to", "tflite",
         "--data", str(datasets["iris"].npz)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode != 0
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert "ONNX → TFLite is not supported" in lines[0] and "onnx2tf" in lines[0]
