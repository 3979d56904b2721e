"""The shipped JSON Schema files match the protocol models and validate real payloads."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest

from protocol.jsonschema import schema_files
from protocol.messages import (
    TOPIC_MODELS,
    Alert,
    DeviceState,
    MetricsReport,
    ModelRef,
    SketchReport,
)
from protocol.sketches import SketchBuilder

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = ROOT / "protocol" / "schemas"
NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


def test_committed_schema_files_match_the_models():
    from scripts.gen_schemas import stale

    assert stale(SCHEMAS) == [], "run: python scripts/gen_schemas.py"
    assert sorted(p.name for p in SCHEMAS.glob("*.schema.json")) == sorted(schema_files())
    assert {n.split(".")[0] for n in schema_files()} == set(TOPIC_MODELS)


def test_check_mode_reports_a_stale_file(tmp_path):
    from scripts.gen_schemas import stale, write

    write(tmp_path)
    assert stale(tmp_path) == []
    (tmp_path / "metrics.schema.json").write_text("{}\n")
    (tmp_path / "old.schema.json").write_text("{}\n")
    assert stale(tmp_path) == ["metrics.schema.json", "old.schema.json"]


def _sample_messages() -> dict[str, bytes]:
    b = SketchBuilder()
    b.update_numeric("x", [0.5, 1.5])
    b.update_categorical("c", ["a", "b"])
    b.rows = 2
    ref = ModelRef(name="iris", version="1.0.0", release=1)
    return {
        "state": DeviceState(device_id="d1", online=True, profile="pi4", model=ref).to_json(),
        "metrics": MetricsReport(
            device_id="d1", seq=1, window_start=NOW, window_end=NOW, model=ref
        ).to_json(),
        "sketch": SketchReport(
            device_id="d1", model=ref, window_start=NOW, window_end=NOW, seq=0, sketches=b.build()
        ).to_json(),
        "alerts": Alert(kind="drift", model="iris", message="drift").to_json(),
    }


def test_real_payloads_validate_and_broken_ones_do_not():
    jsonschema_rs = pytest.importorskip("jsonschema_rs")
    for kind, payload in _sample_messages().items():
        schema = json.loads((SCHEMAS / f"{kind}.schema.json").read_text())
        validator = jsonschema_rs.validator_for(schema)
        doc = json.loads(payload)
        assert validator.is_valid(doc), kind
        broken = {k: v for k, v in doc.items() if k not in ("device_id", "kind")}
        assert not validator.is_valid(broken), kind
