"""Structured logs: one JSON object per line.

Records that carry ``extra={"fields": {...}}`` (the access log does) are merged into the
object; others get their formatted message under ``msg``. Secrets never reach a log: no
request bodies are logged, and the config's password is excluded from its repr.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, TextIO


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        else:
            out["msg"] = record.getMessage()
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info).splitlines()[-1]
        return json.dumps(out, default=str, separators=(",", ":"))


def setup_json_logging(level: int = logging.INFO, stream: TextIO | None = None) -> logging.Handler:
    """Send every ``edgefleet`` log record to ``stream`` (stderr) as JSON lines."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("edgefleet")
    logger.addHandler(handler)
    logger.setLevel(level)
    return handler
