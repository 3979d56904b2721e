from __future__ import annotations

import json
import logging

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.app import create_app
from agent.jsonlog import JsonFormatter
from agent.predictor import Predictor
from tests.agent.agent_env import IRIS_ROW, ASGIClient, Recorder, make_device
from tests.support.bundles import make_bundle

NAMES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


@pytest.fixture(scope="module")
def device(tmp_path_factory, signing_key):
    dev = make_device(
        tmp_path_factory.mktemp("app"),
        signing_key,
        api={"max_body_bytes": 4096, "max_batch_rows": 8},
    )
    dev.installer.install_bytes(make_bundle(signing_key)[0])
    return dev


@pytest.fixture(scope="module")
def client(device):
    with ASGIClient(create_app(device.predictor, config=device.config)) as c:
        yield c


def test_predict_rows_returns_outputs_model_and_request_id(client) -> None:
    r = client.post("/v1/predict", json={"inputs": [IRIS_ROW, IRIS_ROW]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == {"name": "iris", "version": "1.0.0", "release": 1}
    assert body["labels"] == [0, 0] and len(body["probabilities"]) == 2
    assert body["request_id"] == r.headers["x-request-id"]
    assert body["fallback"] is False


def test_predict_instances_by_feature_name(client) -> None:
    r = client.post("/v1/predict", json={"instances": [dict(zip(NAMES, IRIS_ROW, strict=True))]})
    assert r.status_code == 200 and r.json()["labels"] == [0]


def test_feedback_reaches_observers(client, device) -> None:
    rec = Recorder()
    device.predictor.add_observer(rec)
    rid = client.post("/v1/predict", json={"inputs": [IRIS_ROW], "request_id": "fb-1"}).json()[
        "request_id"
    ]
    assert rid == "fb-1"
    assert client.post("/v1/feedback", json={"request_id": rid, "truth": 0}).status_code == 200
    assert rec.feedback[-1][2:] == (0, 0)
    r = client.post("/v1/feedback", json={"request_id": "nope", "truth": 0})
    assert r.status_code == 404 and r.json()["error"] == "unknown_request"


def test_health_ready_model_and_metrics(client) -> None:
    assert client.get("/v1/health").json() == {"status": "ok"}
    assert client.get("/v1/ready").json()["ready"] is True
    model = client.get("/v1/model").json()
    assert model["name"] == "iris" and [f["name"] for f in model["features"]] == NAMES
    client.post("/v1/predict", json={"inputs": [IRIS_ROW]})
    text = client.get("/metrics").text
    assert 'edgefleet_agent_http_requests_total{path="/v1/predict",status="200"}' in text
    assert "edgefleet_agent_predictions_total" in text


def test_ready_is_503_until_a_model_is_loaded() -> None:
    from agent.config import AgentConfig

    with ASGIClient(create_app(Predictor(), config=AgentConfig())) as c:
        assert c.get("/v1/ready").status_code == 503
        assert c.get("/v1/model").status_code == 503
        r = c.post("/v1/predict", json={"inputs": [IRIS_ROW]})
        assert r.status_code == 503 and r.json()["error"] == "no_model"
        assert c.get("/v1/health").status_code == 200


def test_metrics_and_status_come_from_the_daemon_when_given(device) -> None:
    app = create_app(
        device.predictor,
        config=device.config,
        metrics_text=lambda: "x_total 7\n",
        status=lambda: {"link": "offline"},
    )
    with ASGIClient(app) as c:
        assert c.get("/metrics").text == "x_total 7\n"
        assert c.get("/v1/status").json() == {"link": "offline"}


def test_predict_validates_with_the_request_model_it_publishes(client) -> None:
    from agent.app import PredictRequest

    published = client.get("/openapi.json").json()["paths"]["/v1/predict"]["post"]
    schema = published["requestBody"]["content"]["application/json"]["schema"]
    model_schema = PredictRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    assert schema["title"] == model_schema["title"] == "PredictRequest"
    assert schema["properties"].keys() == model_schema["properties"].keys()
    assert schema["additionalProperties"] is model_schema["additionalProperties"] is False
    bodies = [
        {"inputs": [IRIS_ROW]},
        {
            "instances": [
                dict(
                    zip(
                        ["sepal_length", "sepal_width", "petal_length", "petal_width"],
                        IRIS_ROW,
                        strict=True,
                    )
                )
            ]
        },
        {"inputs": [IRIS_ROW], "request_id": "r-1"},
        {"inputs": [IRIS_ROW], "request_id": "x" * 129},
        {"inputs": [IRIS_ROW], "colour": "red"},
        {"inputs": [[IRIS_ROW]]},
        {"inputs": "rows"},
    ]
    for body in bodies:
        try:
            PredictRequest.model_validate(body)
            valid = True
        except ValueError:
            valid = False
        r = client.post("/v1/predict", json=body)
        assert (r.status_code == 200) == valid, (body, r.text)
        if not valid:
            assert r.status_code == 422 and r.json()["error"] == "invalid_request"


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b'{"inputs": [[1, 2, 3, NaN]]}', 400, "NaN"),
        (b'{"inputs": [[1e400, 2, 3, 4]]}', 422, "too large"),
        (b'{"inputs": [[1e300, 2, 3, 4]]}', 422, "float32"),
        (b'{"inputs": [[1, 2, 3]]}', 422, "has 3 features, the model needs 4"),
        (b'{"inputs": [[1, "2", 3, 4]]}', 422, "'sepal_width' is not a number"),
        (b'{"inputs": [[1, true, 3, 4]]}', 422, "'sepal_width' is not a number"),
        (b'{"inputs": [[1, null, 3, 4]]}', 422, "'sepal_width' is null"),
        (b'{"inputs": []}', 422, "empty batch"),
        (b'{"inputs": [1, 2, 3, 4]}', 422, "inputs[0]: Input should be a valid list"),
        (b'{"inputs": {"a": 1}}', 422, "inputs: Input should be a valid list"),
        (b'{"inputs": [[[1, 2, 3, 4]]]}', 422, "inputs[0][0]: must be a number, string"),
        (b'{"instances": [{"sepal_length": [1]}]}', 422, "instances[0]['sepal_length']: must"),
        (b'{"inputs": [[1,2,3,4]], "request_id": ""}', 422, "request_id: String should have"),
        (b'{"instances": [{"sepal_length": 1}]}', 422, "missing feature 'sepal_width'"),
        (b'{"instances": [{"colour": 1}]}', 422, "unknown feature 'colour'"),
        (b'{"inputs": [[1,2,3,4]], "extra": 1}', 422, "unknown field 'extra'"),
        (b"[1, 2]", 422, "JSON object"),
        (b"{}", 422, "inputs (rows) or instances"),
        (b'{"inputs": [[1,2,3,4]], "request_id": 5}', 422, "request_id"),
        (json.dumps({"inputs": [IRIS_ROW] * 9}).encode(), 422, "over the limit of 8"),
        (b"[" * 100_000, 413, "over 4096 bytes"),
        (b"[" * 3000 + b"]" * 1000, 400, "not valid JSON"),
        (b'"\\ud800"', 422, "JSON object"),
    ],
)
def test_bad_input_gets_4xx_naming_the_problem(
    client, body: bytes, status: int, needle: str
) -> None:
    r = client.post("/v1/predict", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert needle in r.json()["detail"]


def test_oversize_body_without_content_length_is_413(client) -> None:
    async def chunks():
        for _ in range(10):
            yield b" " * 1000

    r = client.post("/v1/predict", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_openapi_publishes_the_v1_routes(client) -> None:
    spec = client.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/feedback", "/v1/health", "/v1/ready", "/v1/model"} <= set(
        spec["paths"]
    )
    body = spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]["application/json"][
        "schema"
    ]
    assert "inputs" in json.dumps(body)


def test_one_json_access_log_line_per_request_without_bodies(client, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="edgefleet.agent.access"):
        client.post("/v1/predict", json={"inputs": [[6.66, 3.5, 1.4, 0.2]]})
    records = [r for r in caplog.records if r.name == "edgefleet.agent.access"]
    assert len(records) == 1
    lines = [json.loads(JsonFormatter().format(r)) for r in records]
    assert lines[0]["logger"] == "edgefleet.agent.access" and lines[0]["level"] == "info"
    assert (
        lines[0]["path"] == "/v1/predict" and lines[0]["status"] == 200 and lines[0]["request_id"]
    )
    assert "6.66" not in caplog.text


json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False) | st.integers() | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.one_of(
        json_values,
        st.fixed_dictionaries({"inputs": json_values}),
        st.fixed_dictionaries({"instances": json_values}),
        st.fixed_dictionaries(
            {"inputs": st.lists(st.lists(json_values, min_size=4, max_size=4), max_size=3)}
        ),
    )
)
def test_any_json_body_never_produces_a_server_error(client, body) -> None:
    r = client.post(
        "/v1/predict",
        content=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    assert r.status_code < 500, r.text


def test_json_logging_writes_one_object_per_line() -> None:
    import io

    from agent.jsonlog import setup_json_logging

    stream = io.StringIO()
    level = logging.getLogger("edgefleet").level
    handler = setup_json_logging(stream=stream)
    try:
        logging.getLogger("edgefleet.agent.installer").info("install %s", "installed")
        logging.getLogger("edgefleet.agent.access").info(
            "x", extra={"fields": {"path": "/v1/ready"}}
        )
    finally:
        logging.getLogger("edgefleet").removeHandler(handler)
        logging.getLogger("edgefleet").setLevel(level)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["msg"] == "install installed" and first["logger"] == "edgefleet.agent.installer"
    assert second["path"] == "/v1/ready" and "msg" not in second


def test_mixed_schema_over_http(tmp_path, signing_key) -> None:
    dev = make_device(tmp_path, signing_key)
    dev.installer.install_bytes(make_bundle(signing_key, name="iris-mixed", kind="mixed-logreg")[0])
    inst = dict(zip([*NAMES, "size"], [*IRIS_ROW, "small"], strict=True))
    with ASGIClient(create_app(dev.predictor, config=dev.config)) as c:
        r = c.post("/v1/predict", json={"instances": [inst]})
        assert r.status_code == 200 and r.json()["labels"] == [0]
        r = c.post("/v1/predict", json={"inputs": [[*IRIS_ROW, {"colour": "red"}]]})
        assert (
            r.status_code == 422 and "inputs[0][4]: must be a number, string" in r.json()["detail"]
        )
        model = c.get("/v1/model").json()
        assert model["features"][-1]["kind"] == "categorical"
