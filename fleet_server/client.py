"""A small HTTP client for the fleet REST API (what the CLI uses).

httpx errors become :class:`ServerUnreachable` (exit code 5 in the CLI) and error answers
:class:`ClientError` with the server's message and ``status``. Lists come from the server
in cursor pages (``{"items": [...], "next_cursor": ...}``): :meth:`FleetClient.page` reads
one, :meth:`FleetClient.pages` follows ``next_cursor`` to the end.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from protocol.errors import Unreachable

from .errors import ClientError


class ServerUnreachable(ClientError, Unreachable):
    """No answer from the fleet server (wrong URL, not running, refused)."""


DEFAULT_URL = "http://127.0.0.1:8700"
PAGE_SIZE = 1000  # the server's largest page: fewest round trips when reading a whole list


class FleetClient:
    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        http: Any = None,
        timeout: float = 30.0,
    ) -> None:
        import httpx

        self.url = (url or os.environ.get("EDGEFLEET_URL") or DEFAULT_URL).rstrip("/")
        self.token = token if token is not None else os.environ.get("EDGEFLEET_TOKEN")
        self.http = http if http is not None else httpx.Client(base_url=self.url, timeout=timeout)

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        import httpx

        headers = dict(kw.pop("headers", {}) or {})
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            r = self.http.request(method, path, headers=headers, **kw)
        except httpx.HTTPError as exc:
            raise ServerUnreachable(
                f"cannot reach the fleet server at {self.url}: {exc} "
                "(start it with edgefleet fleet serve, or set EDGEFLEET_URL / --url)"
            ) from None
        if r.status_code >= 400:
            try:
                body = r.json()
                detail = body.get("detail") or body
            except ValueError:
                detail = r.text[:200]
            hint = " (set EDGEFLEET_TOKEN or --token)" if r.status_code == 401 else ""
            err = ClientError(f"{r.status_code}: {detail}{hint}")
            err.status = r.status_code
            raise err
        return r.json() if r.content else None

    # cursor pages
    def page(
        self, path: str, limit: int | None = None, cursor: str | None = None, **params: Any
    ) -> dict[str, Any]:
        """One page of a list: ``{"items": [...], "next_cursor": "..." | None}``."""
        query = {k: v for k, v in params.items() if v is not None}
        if limit is not None:
            query["limit"] = limit
        if cursor is not None:
            query["cursor"] = cursor
        body = self._call("GET", path, params=query)
        return {"items": list(body["items"]), "next_cursor": body.get("next_cursor")}

    def pages(
        self, path: str, limit: int | None = None, cursor: str | None = None, **params: Any
    ) -> Iterator[dict[str, Any]]:
        """Every page (``limit`` items each, :data:`PAGE_SIZE` when None) from ``cursor``
        (the start when None) to the last."""
        while True:
            page = self.page(path, limit or PAGE_SIZE, cursor, **params)
            yield page
            cursor = page["next_cursor"]
            if cursor is None:
                return

    def all_items(self, path: str, **params: Any) -> list[dict[str, Any]]:
        return [item for page in self.pages(path, **params) for item in page["items"]]

    # bundles
    def push_bundle(self, path: Path) -> dict[str, Any]:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ClientError(f"cannot read {path}: {exc.strerror}") from None
        return dict(
            self._call(
                "POST",
                "/v1/bundles",
                content=data,
                headers={"Content-Type": "application/octet-stream"},
            )
        )

    def bundles(self) -> list[dict[str, Any]]:
        return self.all_items("/v1/bundles")

    def find_bundle(self, ref: str) -> dict[str, Any] | None:
        """The bundle for a sha256 (prefix) or name@version, or None when the server lacks it."""
        try:
            return dict(self._call("GET", f"/v1/bundles/{ref}"))
        except ClientError as exc:
            if exc.status == 404:
                return None
            raise

    def broker(self) -> dict[str, Any]:
        """Where the fleet's MQTT broker is: ``{"url": …, "topic_prefix": …}``."""
        return dict(self._call("GET", "/v1/broker"))

    # devices
    def devices(self, **filters: Any) -> list[dict[str, Any]]:
        """Every device that matches ``filters`` (profile, tag, version, online), all pages."""
        return self.all_items("/v1/devices", **filters)

    def device(self, device_id: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/v1/devices/{device_id}"))

    # rollouts
    def create_rollout(
        self,
        body: dict[str, Any],
        *,
        dry_run: bool = False,
        force: bool = False,
        start: bool = False,
    ) -> dict[str, Any]:
        params = {
            "dry_run": str(dry_run).lower(),
            "force": str(force).lower(),
            "start": str(start).lower(),
        }
        return dict(self._call("POST", "/v1/rollouts", json=body, params=params))

    def rollouts(self) -> list[dict[str, Any]]:
        return self.all_items("/v1/rollouts")

    def rollout(self, rollout_id: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/v1/rollouts/{rollout_id}"))

    def action(self, rollout_id: str, action: str) -> dict[str, Any]:
        return dict(self._call("POST", f"/v1/rollouts/{rollout_id}/{action}"))

    # drift and history
    def drift(
        self, model: str | None = None, version: str | None = None, limit: int = 50
    ) -> list[dict[str, Any]]:
        """The newest ``limit`` drift results (one page)."""
        return self.page("/v1/drift", limit, model=model, version=version)["items"]

    def events(self, limit: int = 50, rollout_id: str | None = None) -> list[dict[str, Any]]:
        """The newest ``limit`` events (one page)."""
        return self.page("/v1/events", limit, rollout_id=rollout_id or None)["items"]

    # the fleet's own measurements (fleet_server.measures_api) ---------------------------------
    def drift_scopes(
        self, by: str = "device", model: str | None = None, version: str | None = None
    ) -> list[dict[str, Any]]:
        params = {k: v for k, v in (("by", by), ("model", model), ("version", version)) if v}
        result: list[dict[str, Any]] = self._call("GET", "/v1/drift/scopes", params=params)
        return result

    def accuracy(
        self, model: str | None = None, version: str | None = None, by: str = "version"
    ) -> list[dict[str, Any]]:
        params = {k: v for k, v in (("by", by), ("model", model), ("version", version)) if v}
        result: list[dict[str, Any]] = self._call("GET", "/v1/accuracy", params=params)
        return result

    def health_alerts(self, limit: int = 50) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/v1/alerts/health", params={"limit": limit})
        return result

    def calibration(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/v1/calibration")
        return result

    def bench(self, bundle: str, selector: str = "", sample: int = 10, runs: int = 200) -> Any:
        body = {"bundle": bundle, "selector": selector, "sample": sample, "runs": runs}
        return self._call("POST", "/v1/benchmarks", json=body)

    def benchmarks(self, profile: str | None = None) -> list[dict[str, Any]]:
        params = {"profile": profile} if profile else {}
        result: list[dict[str, Any]] = self._call("GET", "/v1/benchmarks", params=params)
        return result

    # release channels
    def channels(self, model: str | None = None) -> list[dict[str, Any]]:
        return list(self._call("GET", "/v1/channels", params={"model": model} if model else {}))

    def channel(self, model: str, channel: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/v1/channels/{model}/{channel}"))

    def define_channel(self, model: str, channel: str, policy: dict[str, Any]) -> dict[str, Any]:
        return dict(self._call("PUT", f"/v1/channels/{model}/{channel}", json=policy))

    def promote(
        self, bundle: str, to: str, reason: str = "", force: bool = False, preview: bool = False
    ) -> dict[str, Any]:
        body = {"bundle": bundle, "to": to, "reason": reason, "force": force}
        path = "/v1/promotions/preview" if preview else "/v1/promotions"
        return dict(self._call("POST", path, json=body))

    def demote(self, model: str, channel: str, reason: str = "") -> dict[str, Any]:
        path = f"/v1/channels/{model}/{channel}/demote"
        return dict(self._call("POST", path, json={"reason": reason}))

    def archive(self, bundle: str, reason: str = "") -> dict[str, Any]:
        return dict(self._call("POST", f"/v1/bundles/{bundle}/archive", json={"reason": reason}))

    def lineage(self, bundle: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/v1/bundles/{bundle}/lineage"))

    def set_device_channel(self, device_id: str, channel: str | None) -> dict[str, Any]:
        path = f"/v1/devices/{device_id}/channel"
        return dict(self._call("PUT", path, json={"channel": channel}))
