"""REST routes of the fleet's own measurements (see :mod:`fleet_server.measures`).

``/v1/drift/scopes``, ``/v1/devices/{id}/measures``, ``/v1/accuracy``, ``/v1/alerts/health``,
``/v1/calibration`` and ``/v1/benchmarks``. Viewers read; operators start field benchmarks.
Errors are the API's usual JSON (``error``, ``detail``, ``field``).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from .auth import require


class BenchRequest(BaseModel):
    bundle: str = Field(min_length=1, max_length=200, description="sha256 prefix or name@version")
    selector: str = Field(default="", max_length=2000, description="profile=…,tag=…,id=…")
    sample: int = Field(default=10, ge=1, le=1000, description="at most this many devices")
    runs: int = Field(default=200, ge=10, le=100_000, description="timed runs per device")


def build_router(service: Any) -> Any:
    from fastapi import APIRouter, Depends, Query

    router = APIRouter()
    viewer, operator = require("viewer"), require("operator")
    m = service.measures

    @router.get("/v1/drift/scopes", tags=["drift"])
    def drift_scopes(
        by: str = Query("device", pattern="^(device|tag|profile|all)$"),
        model: str | None = Query(None, max_length=200),
        version: str | None = Query(None, max_length=100),
        role: str = Depends(viewer),
    ) -> list[dict[str, Any]]:
        """Latest drift test per device, tag or profile cohort; drifted scopes first."""
        return list(m.drift_by(by, model, version))

    @router.get("/v1/devices/{device_id}/measures", tags=["devices"])
    def device_measures(device_id: str, role: str = Depends(viewer)) -> dict[str, Any]:
        """Drift, field accuracy, latency outlier verdict, firing alerts of one device."""
        service.get_device(device_id)  # 404 for an unknown device
        return dict(m.device_view(device_id))

    @router.get("/v1/accuracy", tags=["drift"])
    def accuracy(
        model: str | None = Query(None, max_length=200),
        version: str | None = Query(None, max_length=100),
        by: str = Query("version", pattern="^(version|device)$"),
        role: str = Depends(viewer),
    ) -> list[dict[str, Any]]:
        """Field accuracy (or MAE) with labelled rows and a 95 % interval."""
        return list(m.accuracy_report(model, version, by))

    @router.get("/v1/alerts/health", tags=["alerts"])
    def health_alerts(
        limit: int = Query(50, ge=1, le=1000), role: str = Depends(viewer)
    ) -> dict[str, Any]:
        """Standing alerts firing now, and the latest firing/resolved transitions."""
        recent = [
            e
            for e in service.events(limit=1000)
            if e["kind"] == "alert" and (e.get("data") or {}).get("alert_kind") == "health"
        ][:limit]
        return {"firing": m.firing(), "recent": recent}

    @router.get("/v1/calibration", tags=["profiles"])
    def calibration(role: str = Depends(viewer)) -> dict[str, Any]:
        """Measured speed factor per profile (median, spread, devices, date) and outliers."""
        return dict(m.calibration())

    @router.get("/v1/benchmarks", tags=["profiles"])
    def benchmarks(
        profile: str | None = Query(None, max_length=100), role: str = Depends(viewer)
    ) -> list[dict[str, Any]]:
        return list(m.bench_samples(profile))

    @router.post("/v1/benchmarks", status_code=202, tags=["profiles"])
    def start_bench(body: BenchRequest, role: str = Depends(operator)) -> dict[str, Any]:
        """Send signed ``benchmark`` commands to a sample of devices running the bundle."""
        return dict(m.bench(body.bundle, body.selector, body.sample, body.runs))

    return router
