"""edgefleet's fleet server: registry, signed delivery, staged rollouts, drift, REST API.

The public surface is small: :class:`FleetService` (everything the API, CLI, dashboard and
demo call), :func:`create_app` (the REST API), :func:`serve` (one process with all of it),
the pure rollout engine and the configuration. Heavy imports (FastAPI, paho) stay inside
the functions that need them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import FleetConfig, example_config, load_config, parse_config
from .errors import (
    AuthError,
    BundleRejected,
    ClientError,
    ConfigError,
    Conflict,
    FleetError,
    Forbidden,
    InvalidInput,
    NotFound,
    StorageError,
)
from .rollout_engine import Decision, Rollout, RolloutSpec, Selector, Telemetry

if TYPE_CHECKING:
    from .service import FleetService, RolloutRequest

__all__ = [
    "AuthError",
    "BundleRejected",
    "ClientError",
    "ConfigError",
    "Conflict",
    "Decision",
    "FleetConfig",
    "FleetError",
    "FleetService",
    "Forbidden",
    "InvalidInput",
    "NotFound",
    "Rollout",
    "RolloutRequest",
    "RolloutSpec",
    "Selector",
    "StorageError",
    "Telemetry",
    "create_app",
    "example_config",
    "load_config",
    "parse_config",
    "serve",
]


def __getattr__(name: str) -> Any:  # lazy: keep `import fleet_server` light
    if name in ("FleetService", "RolloutRequest"):
        from . import service

        return getattr(service, name)
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "serve":
        from .serve import serve

        return serve
    raise AttributeError(name)
