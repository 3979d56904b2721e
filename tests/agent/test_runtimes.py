from __future__ import annotations

import numpy as np
import pytest

from agent.errors import InferenceError, ModelLoadError
from agent.runtimes import open_runtime, runtime_available, runtime_versions
from protocol.feeds import decode_outputs, make_feeds
from tests.support.bundles import make_bundle, trained


@pytest.fixture(scope="module")
def iris(signing_key):
    _, manifest = make_bundle(signing_key)
    return trained("iris-logreg"), manifest


def test_onnx_runtime_matches_the_smoke_test_outputs(iris) -> None:
    tm, manifest = iris
    rt = open_runtime(tm.onnx, manifest, threads=1)
    smoke = manifest.smoke_tests[0]
    outs = rt.run(make_feeds(np.asarray(smoke.rows), manifest.input_schema))
    pred = decode_outputs(outs, manifest.output_schema)
    assert pred.labels == smoke.expected_labels
    np.testing.assert_allclose(pred.probabilities, smoke.expected_probabilities, atol=1e-5)


def test_onnx_runtime_casts_inputs_to_the_model_dtype(iris) -> None:
    tm, manifest = iris
    rt = open_runtime(tm.onnx, manifest)
    name = rt.input_names[0]
    out64 = rt.run({name: tm.X[:3].astype(np.float64)})
    out32 = rt.run({name: tm.X[:3]})
    for k in rt.output_names:
        np.testing.assert_array_equal(out64[k], out32[k])


def test_model_bytes_that_do_not_load_raise_our_error(iris) -> None:
    _, manifest = iris
    with pytest.raises(ModelLoadError, match="onnxruntime cannot load"):
        open_runtime(b"not a model", manifest)


def test_runtime_failure_is_translated(iris) -> None:
    tm, manifest = iris
    rt = open_runtime(tm.onnx, manifest)
    with pytest.raises(InferenceError, match="onnxruntime failed") as info:
        rt.run({rt.input_names[0]: np.zeros((2, 7), dtype=np.float32)})
    assert "onnxruntime" not in type(info.value).__module__


def test_a_missing_input_reads_as_onnxruntime_session_run_words_it(iris) -> None:
    tm, manifest = iris
    rt = open_runtime(tm.onnx, manifest)
    with pytest.raises(InferenceError, match=r"Required inputs \(\['X'\]\) are missing"):
        rt.run({"not_x": tm.X[:1]})


def test_runtime_versions_reports_installed_runtimes_without_importing_them() -> None:
    versions = runtime_versions()
    assert "onnxruntime" in versions and versions["onnxruntime"][0].isdigit()
    assert runtime_available("onnx")
    assert not runtime_available("coreml")


@pytest.fixture(scope="module")
def keras_iris():
    pytest.importorskip("tensorflow")
    pytest.importorskip("ai_edge_litert")
    import tensorflow as tf

    tm = trained("iris-logreg")
    X = ((tm.X - tm.X.mean(0)) / tm.X.std(0)).astype(np.float32)
    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential(
        [
            tf.keras.Input((4,)),
            tf.keras.layers.Dense(16, activation="relu"),
            tf.keras.layers.Dense(3, activation="softmax"),
        ]
    )
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(X, tm.y, epochs=30, verbose=0)
    expected = model.predict(X, verbose=0)

    def convert(int8: bool) -> bytes:
        conv = tf.lite.TFLiteConverter.from_keras_model(model)
        if int8:
            conv.optimizations = [tf.lite.Optimize.DEFAULT]
            conv.representative_dataset = lambda: ([X[i : i + 1]] for i in range(100))
            conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            conv.inference_input_type = tf.int8
            conv.inference_output_type = tf.int8
        return conv.convert()

    return X, expected, convert(False), convert(True)


def _tflite_manifest(iris_manifest, model: bytes):
    info = iris_manifest.model.model_copy(update={"format": "tflite", "path": "model.tflite"})
    return iris_manifest.model_copy(update={"model": info})


@pytest.mark.tflite
# TF/LiteRT internals warn on import and conversion; the converter warns about input stats.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore:Statistics for quantized inputs:UserWarning")
def test_litert_float_model_matches_keras(keras_iris, iris) -> None:
    X, expected, fp32, _ = keras_iris
    rt = open_runtime(fp32, _tflite_manifest(iris[1], fp32), threads=1)
    assert rt.name == "litert"
    out = next(iter(rt.run({"x": X[:20]}).values()))  # one input: matched by position
    np.testing.assert_allclose(out, expected[:20], atol=1e-5)


@pytest.mark.tflite
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore:Statistics for quantized inputs:UserWarning")
def test_litert_full_int8_model_quantizes_inputs_and_dequantizes_outputs(keras_iris, iris) -> None:
    X, expected, _, int8 = keras_iris
    rt = open_runtime(int8, _tflite_manifest(iris[1], int8))
    out = next(iter(rt.run({"x": X}).values()))
    assert out.dtype == np.float32  # dequantized
    assert np.abs(out - expected).max() < 0.05
    assert (out.argmax(1) == expected.argmax(1)).mean() > 0.95


def test_run_array_matches_run_across_batch_sizes_rows_and_threads(iris) -> None:
    """run_array reuses one IOBinding per thread: a change of batch size, of rows, or of
    thread must never hand back another call's outputs."""
    import threading

    tm, manifest = iris
    rt = open_runtime(tm.onnx, manifest, threads=1)
    X = np.ascontiguousarray(tm.X, dtype=np.float32)
    name = rt.input_names[0]

    def expected(lo: int, hi: int) -> list[np.ndarray]:
        outs = rt.run({name: X[lo:hi]})
        return [outs[n] for n in rt.output_names]

    for lo, hi in ((0, 2), (5, 6), (50, 55), (100, 105), (7, 8), (0, 150)):
        got = rt.run_array(np.ascontiguousarray(X[lo:hi]))
        for a, b in zip(got, expected(lo, hi), strict=True):
            np.testing.assert_array_equal(a, b)

    wrong: list[tuple[int, int]] = []

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(300):
            lo = int(rng.integers(0, 149))
            hi = lo + int(rng.integers(1, min(4, 150 - lo) + 1))
            got = rt.run_array(np.ascontiguousarray(X[lo:hi]))
            if not all(np.array_equal(a, b) for a, b in zip(got, expected(lo, hi), strict=True)):
                wrong.append((lo, hi))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []


def test_run_array_failure_is_translated_and_the_next_call_works(iris) -> None:
    tm, manifest = iris
    rt = open_runtime(tm.onnx, manifest, threads=1)
    with pytest.raises(InferenceError, match="onnxruntime failed"):
        rt.run_array(np.zeros((1, 7), dtype=np.float32))  # 7 features, the model takes 4
    out = rt.run_array(np.ascontiguousarray(tm.X[:1], dtype=np.float32))
    assert out[0].tolist() == [0]
