"""Dashboard pages for release channels, added to the router by :func:`.routes.build_router`.

    /ui/channels                                   current version per model and channel,
                                                   devices per channel, history; the actions
                                                   that apply (operators only)
    /ui/channels/{model}/{channel}/promote?bundle= confirmation: policy and every condition
    /ui/channels/{model}/{channel}/demote          confirmation: the version it returns to
    POST the same two paths                        act (CSRF token, ``confirm=yes``, reason)
    /ui/bundles/{ref}                              a bundle and its lineage

Promote is offered for bundles of the model newer than the channel's current one; demote
only when the channel has a previous bundle. The confirmation pages show the channel's
policy and conditions, and a promotion whose conditions fail shows why and no button
(an archived bundle offers ``force``, which is audited).
"""

# No ``from __future__ import annotations``: FastAPI reads the route signatures at runtime.
from collections.abc import Callable
from typing import Any

from ..auth import allows
from ..errors import FleetError, InvalidInput


def add_channel_pages(
    router: Any,
    service: Any,
    *,
    render: Callable[..., Any],
    session_of: Callable[[Any], Any],
    acting: Callable[[Any], Any],
    error: Callable[..., Any],
    to_login: Callable[[Any], Any],
) -> None:
    from fastapi import Request
    from fastapi.responses import RedirectResponse, Response

    ch = service.channels

    def offers(channels: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
        bundles = service.list_bundles()
        out: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for c in channels:
            cur = c.get("current") or {}
            out[(c["model"], c["channel"])] = [
                b
                for b in sorted(bundles, key=lambda b: -int(b["release"]))
                if b["name"] == c["model"] and int(b["release"]) > int(cur.get("release") or 0)
            ]
        return out

    @router.get("/ui/channels")
    def channels_page(request: Request) -> Response:
        if session_of(request) is None:
            return to_login(request)
        rows = ch.overview()
        return render(request, "channels.html", channels=rows, offers=offers(rows))

    def operator_session(request: Request) -> tuple[Any, Response | None]:
        s = session_of(request)
        if s is None:
            return None, to_login(request)
        if not allows(s.role, "operator"):
            return s, error(request, f"this needs the operator role; you are {s.role}", 403)
        return s, None

    @router.get("/ui/channels/{model}/{channel}/promote")
    def promote_confirm(request: Request, model: str, channel: str, bundle: str = "") -> Response:
        _, refused = operator_session(request)
        if refused is not None:
            return refused
        try:
            if not bundle:
                raise InvalidInput("choose a bundle to promote", field="bundle")
            plan = ch.preview(bundle, channel)
            if plan["bundle"]["name"] != model:
                raise InvalidInput(f"bundle is not a {model} bundle", field="bundle")
        except FleetError as exc:
            return error(request, exc)
        failed = [c["name"] for c in plan["conditions"] if not c["ok"]]
        return render(
            request,
            "channel_confirm.html",
            action="promote",
            model=model,
            channel=channel,
            plan=plan,
            can_force=failed == ["not_archived"],
        )

    @router.get("/ui/channels/{model}/{channel}/demote")
    def demote_confirm(request: Request, model: str, channel: str) -> Response:
        _, refused = operator_session(request)
        if refused is not None:
            return refused
        try:
            info = ch.get(model, channel)
        except FleetError as exc:
            return error(request, exc)
        if not info["can_demote"]:
            return error(request, f"{model}/{channel} has no previous bundle to return to", 409)
        return render(
            request,
            "channel_confirm.html",
            action="demote",
            model=model,
            channel=channel,
            info=info,
        )

    @router.post("/ui/channels/{model}/{channel}/{action}")
    async def channel_act(request: Request, model: str, channel: str, action: str) -> Response:
        if action not in ("promote", "demote"):
            return error(request, InvalidInput(f"unknown action {action!r}", field="action"), 404)
        s, form, refused = await acting(request)
        if refused is not None or s is None:
            return refused or to_login(request)
        if form.get("confirm") != "yes":
            return error(request, InvalidInput(f"{action} needs confirmation", field="confirm"))
        actor, reason = f"dashboard:{s.user}", form.get("reason", "")[:500]
        try:
            if action == "promote":
                ch.promote(
                    form.get("bundle", ""),
                    channel,
                    actor=actor,
                    reason=reason,
                    force=form.get("force") == "yes",
                )
            else:
                ch.demote(model, channel, actor=actor, reason=reason)
        except FleetError as exc:
            return error(request, exc)
        return RedirectResponse("/ui/channels", status_code=303)

    @router.get("/ui/bundles/{ref}")
    def bundle_page(request: Request, ref: str) -> Response:
        if session_of(request) is None:
            return to_login(request)
        try:
            info = service.get_bundle(ref)
            lineage = ch.lineage(info["sha256"])
        except FleetError as exc:
            return error(request, exc)
        return render(request, "bundle.html", b=info, lineage=lineage)
