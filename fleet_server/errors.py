"""The fleet server's exceptions, all derived from :class:`protocol.errors.EdgefleetError`.

    EdgefleetError
    └── FleetError                   anything the fleet server refuses on purpose
        ├── ConfigError              fleet.toml does not load or validate
        ├── NotFound                 unknown bundle, device, rollout or token (HTTP 404)
        ├── InvalidInput             bad selector, stages, thresholds… (HTTP 422); names the field
        ├── Conflict                 an action the current state does not allow (HTTP 409)
        │   └── PromotionRefused     a channel's promotion conditions failed; names each
        ├── BundleRejected           unsigned, tampered or untrusted upload (HTTP 422)
        ├── TooLarge                 a request body over its route's cap (HTTP 413)
        ├── Throttled                too many failed logins; retry later (HTTP 429)
        ├── AuthError                missing or invalid credentials (HTTP 401)
        │   └── Forbidden            role too low (HTTP 403)
        ├── StorageError             SQLite or the artifact store failed (HTTP 500)
        ├── Unavailable              no process runs the rollout tick to act (HTTP 503)
        └── ClientError              the CLI's HTTP client got an error answer or no answer

Third-party errors (sqlite3, httpx, paho) are translated where they are caught: the
repository, the artifact store, :mod:`fleet_server.client` and the bridge.
"""

from __future__ import annotations

from protocol.errors import EdgefleetError


class FleetError(EdgefleetError):
    status_code = 400

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"error": type(self).__name__, "detail": self.message}
        if self.field:
            out["field"] = self.field
        return out


class ConfigError(FleetError):
    pass


class NotFound(FleetError):
    status_code = 404


class InvalidInput(FleetError):
    status_code = 422


class Conflict(FleetError):
    status_code = 409


class PromotionRefused(Conflict):
    """A promotion into a release channel whose conditions did not all hold."""

    def __init__(self, message: str, *, conditions: list[dict[str, object]]) -> None:
        super().__init__(message, field="conditions")
        self.conditions = conditions

    def to_dict(self) -> dict[str, object]:
        return {**super().to_dict(), "conditions": self.conditions}


class BundleRejected(FleetError):
    status_code = 422

    def __init__(self, message: str, *, reason: str = "", field: str | None = "bundle") -> None:
        super().__init__(message, field=field)
        self.reason = reason

    def to_dict(self) -> dict[str, object]:
        out = super().to_dict()
        if self.reason:
            out["reason"] = self.reason
        return out


class TooLarge(FleetError):
    status_code = 413


class Throttled(FleetError):
    status_code = 429

    def __init__(self, message: str, *, retry_after: float, field: str | None = None) -> None:
        super().__init__(message, field=field)
        self.retry_after = retry_after


class AuthError(FleetError):
    status_code = 401


class Forbidden(AuthError):
    status_code = 403


class StorageError(FleetError):
    status_code = 500


class Unavailable(FleetError):
    """No fleet server process runs the rollout tick to carry an action out (503)."""

    status_code = 503


class ClientError(FleetError):
    status: int | None = None  # the HTTP status of an error answer, when there was one
