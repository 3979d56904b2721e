"""JSON Schema of every topic's payload, generated from the message models."""

from __future__ import annotations

import json
from typing import Any

from .messages import TOPIC_MODELS


def topic_schemas() -> dict[str, dict[str, Any]]:
    return {name: model.model_json_schema() for name, model in TOPIC_MODELS.items()}


def schema_files() -> dict[str, str]:
    """File name → pretty JSON text, as shipped in ``protocol/schemas/``."""
    return {
        f"{name}.schema.json": json.dumps(schema, indent=2, sort_keys=True) + "\n"
        for name, schema in topic_schemas().items()
    }
