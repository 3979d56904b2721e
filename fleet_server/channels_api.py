"""The release-channel routes of the REST API (``/v1``), added by :func:`.app.create_app`.

    GET  /v1/channels[?model=]                 every channel: policy, current, devices, history
    GET  /v1/channels/{model}/{channel}        one channel
    PUT  /v1/channels/{model}/{channel}        define a channel / set its policy   (operator)
    POST /v1/promotions/preview                policy + every condition, nothing changes (viewer)
    POST /v1/promotions                        promote a bundle into a channel      (operator)
    POST /v1/channels/{model}/{channel}/demote back to the previous bundle           (operator)
    POST /v1/bundles/{ref}/archive             archive a bundle                     (operator)
    GET  /v1/bundles/{ref}/lineage             every channel the bundle was in, when and why
    PUT  /v1/devices/{device_id}/channel       the channel a device follows (server-set)

A refused promotion answers 409 with ``conditions``: every condition with ``ok`` and a
``detail``; the failed ones are named in ``detail`` too.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from .auth import require
from .service import FleetService

REASON = Field(default="", max_length=500, description="why: kept in the audit log")


class Promotion(BaseModel):
    bundle: str = Field(max_length=200, description="name@version or a sha256 prefix")
    to: str = Field(max_length=24, description="the channel, e.g. stable")
    reason: str = REASON
    force: bool = Field(default=False, description="promote an archived bundle (audited)")


class Reason(BaseModel):
    reason: str = REASON


class ChannelPolicyBody(BaseModel):
    """Unset fields take the channel's defaults."""

    stages: list[float] | None = Field(default=None, max_length=20)
    stage_unit: str | None = None
    success_threshold: float | None = None
    failure_threshold: float | None = None
    min_devices: int | None = None
    soak_s: float | None = None
    device_timeout_s: float | None = None
    max_retries: int | None = None
    requires: str | None = Field(default=None, max_length=24)
    hold_s: float | None = None
    no_drift: bool | None = None
    accuracy_tolerance: float | None = None


class DeviceChannel(BaseModel):
    channel: str | None = Field(default=None, max_length=160, description="null clears it")


def add_routes(app: Any, service: FleetService) -> None:
    from fastapi import APIRouter, Depends

    viewer, operator = require("viewer"), require("operator")
    router = APIRouter(tags=["channels"])
    ch = service.channels

    def actor(role: str) -> str:
        return f"api:{role}"

    @router.get("/v1/channels")
    def channels(model: str | None = None, role: str = Depends(viewer)) -> list[dict[str, Any]]:
        return ch.overview(model)

    @router.get("/v1/channels/{model}/{channel}")
    def channel(model: str, channel: str, role: str = Depends(viewer)) -> dict[str, Any]:
        return ch.get(model, channel)

    @router.put("/v1/channels/{model}/{channel}")
    def define(
        model: str, channel: str, body: ChannelPolicyBody, role: str = Depends(operator)
    ) -> dict[str, Any]:
        policy = {k: v for k, v in body.model_dump().items() if v is not None}
        return ch.define(model, channel, policy, actor=actor(role))

    @router.post("/v1/promotions/preview")
    def preview(body: Promotion, role: str = Depends(viewer)) -> dict[str, Any]:
        return ch.preview(body.bundle, body.to, force=body.force)

    @router.post("/v1/promotions", status_code=201)
    def promote(body: Promotion, role: str = Depends(operator)) -> dict[str, Any]:
        return ch.promote(
            body.bundle, body.to, actor=actor(role), reason=body.reason, force=body.force
        )

    @router.post("/v1/channels/{model}/{channel}/demote")
    def demote(
        model: str, channel: str, body: Reason, role: str = Depends(operator)
    ) -> dict[str, Any]:
        return ch.demote(model, channel, actor=actor(role), reason=body.reason)

    @router.post("/v1/bundles/{ref}/archive")
    def archive(ref: str, body: Reason, role: str = Depends(operator)) -> dict[str, Any]:
        return ch.archive(ref, actor=actor(role), reason=body.reason)

    @router.get("/v1/bundles/{ref}/lineage")
    def lineage(ref: str, role: str = Depends(viewer)) -> dict[str, Any]:
        return ch.lineage(ref)

    @router.put("/v1/devices/{device_id}/channel")
    def device_channel(
        device_id: str, body: DeviceChannel, role: str = Depends(operator)
    ) -> dict[str, Any]:
        return ch.assign(device_id, body.channel, actor=actor(role))

    app.include_router(router)
