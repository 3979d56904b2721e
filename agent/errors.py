"""The agent's exceptions, and the one place runtime errors are translated.

    protocol.EdgefleetError
    ├── protocol.BundleError           an install refused (carries a ReasonCode)
    └── AgentError
        ├── ConfigError                agent.toml missing, unreadable or invalid
        ├── SlotError                  nothing installed, or a slot that cannot be read
        ├── NoModelError               predict called before any model is loaded
        ├── InputError                 rows that do not fit the manifest's input schema
        ├── RuntimeUnavailableError    the runtime a bundle needs is not installed
        └── ModelError                 the runtime failed to load or run the model
            ├── ModelLoadError
            └── InferenceError

onnxruntime and LiteRT raise their own types (``onnxruntime.capi.onnxruntime_pybind11_state.*``,
``RuntimeError``, ``ValueError``); :func:`translate_runtime_errors` wraps every runtime call
so none of them leaks through the agent's API.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from protocol.errors import EdgefleetError


class AgentError(EdgefleetError):
    """Base of the agent's own errors."""


class ConfigError(AgentError):
    """The agent configuration is missing or invalid."""


class SlotError(AgentError):
    """A slot is missing or unreadable, or there is nothing to roll back to."""


class NoModelError(AgentError):
    """No model is installed/loaded yet."""


class InputError(AgentError):
    """Input rows do not fit the model's input schema (the message names the problem)."""


class RuntimeUnavailableError(AgentError):
    """The runtime needed for this model format is not installed."""


class ModelError(AgentError):
    """The runtime failed on the model."""


class ModelLoadError(ModelError):
    """The runtime could not load the model bytes."""


class InferenceError(ModelError):
    """The runtime raised while running the model."""


def translated(exc: Exception, kind: type[ModelError], what: str) -> Exception:
    """The error to raise for ``exc`` from a runtime: ours and MemoryError pass through,
    anything else becomes ``kind`` with the runtime's first message line."""
    if isinstance(exc, (EdgefleetError, MemoryError)):
        return exc
    text = str(exc).strip()
    msg = text.splitlines()[0] if text else type(exc).__name__
    err = kind(f"{what}: {msg[:300]}")
    err.__cause__ = exc
    return err


@contextmanager
def translate_runtime_errors(kind: type[ModelError], what: str) -> Iterator[None]:
    """Re-raise anything a runtime throws as ``kind`` (ours pass through unchanged).
    (Hot paths use ``try: … except Exception as e: raise translated(e, …)`` instead: a
    generator context manager costs about a microsecond per call.)"""
    try:
        yield
    except Exception as exc:  # onnxruntime/LiteRT raise many private types
        err = translated(exc, kind, what)
        if err is exc:
            raise
        raise err from exc
