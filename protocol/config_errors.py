"""One readable line for a config file that does not validate, shared by agent and fleet.

pydantic's first error becomes ``where: message``; an unknown key (a typo) also names the
nearest known key at the same place, e.g. ``api.prot: unknown key (did you mean 'port'?)``.
"""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ValidationError


def describe_validation_error(exc: ValidationError, model: type[BaseModel]) -> tuple[str, str]:
    """``(where, message)`` for the first error of ``exc`` raised by ``model``."""
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"]]
    where = ".".join(loc) or "config"
    message = str(err["msg"])
    if err["type"] == "extra_forbidden" and loc:
        message = "unknown key"
        known = _keys_at(model, loc[:-1])
        close = difflib.get_close_matches(loc[-1], known, n=1, cutoff=0.6)
        if close:
            message += f" (did you mean {close[0]!r}?)"
        elif known:
            message += f" (known keys: {', '.join(sorted(known))})"
    return where, message


def _keys_at(model: type[BaseModel], path: list[str]) -> list[str]:
    current: Any = model
    for part in path:
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        current = field.annotation
    fields = getattr(current, "model_fields", None)
    return list(fields) if fields else []
