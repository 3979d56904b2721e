"""The API's and the dashboard's lists, one cursor page at a time. No HTTP here.

Every list that grows with the fleet or with time — devices, bundles, rollouts, events,
audit, drift results — is read as a :class:`~.pagination.Page` of at most ``limit`` rows
(:data:`~.pagination.DEFAULT_LIMIT` when the client names none, at most
:data:`~.pagination.MAX_LIMIT`) after an opaque ``cursor`` that the previous page handed
out. The API answers ``{"items": [...], "next_cursor": "..." | null}``; a client follows
``next_cursor`` until it is null. A bad ``limit`` or ``cursor`` is
:class:`~.errors.InvalidInput` naming that field (checked in :mod:`.pagination` before any
query runs).

Each function takes the parts it reads (the repository, the drift engine, the live rollout
counts) rather than the service, so it runs in any process that holds a repository.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .pagination import DEFAULT_LIMIT, DRIFT, Page, check_limit
from .repository import Repository


def devices(
    repo: Repository,
    limit: int = DEFAULT_LIMIT,
    cursor: str | None = None,
    *,
    profile: str | None = None,
    tag: str | None = None,
    version: str | None = None,
    online: bool | None = None,
    before: str | None = None,
) -> Page:
    """Devices by id; the filters run in the query, so a page costs the same at any size."""
    return repo.devices_page(
        limit, cursor, profile=profile, tag=tag, version=version, online=online, before=before
    )


def bundles(
    repo: Repository,
    info: Callable[[dict[str, Any]], dict[str, Any]],
    limit: int = DEFAULT_LIMIT,
    cursor: str | None = None,
) -> Page:
    """Bundles newest first, each row shaped by ``info`` (the service's bundle view)."""
    page = repo.bundles_page(limit, cursor)
    return Page([info(r) for r in page.items], page.next_cursor)


def rollouts(
    repo: Repository,
    live: dict[str, dict[str, int]],
    limit: int = DEFAULT_LIMIT,
    cursor: str | None = None,
) -> Page:
    """Rollouts newest first with their bundle's name and version and, for rollouts this
    process drives, the live per-state device counts (``counts``; None otherwise)."""
    page = repo.rollouts_page(limit, cursor)
    shas = {r["bundle_sha256"] for r in page.items}
    found = {sha: repo.get_bundle(sha) or {} for sha in shas}
    items = [
        {
            **r,
            "bundle": found[r["bundle_sha256"]].get("name"),
            "version": found[r["bundle_sha256"]].get("version"),
            "counts": live.get(r["rollout_id"]),
        }
        for r in page.items
    ]
    return Page(items, page.next_cursor)


def events(
    repo: Repository,
    limit: int = DEFAULT_LIMIT,
    cursor: str | None = None,
    rollout_id: str | None = None,
    device_id: str | None = None,
) -> Page:
    """Events newest first, optionally of one rollout or one device."""
    return repo.events_page(limit, cursor, rollout_id=rollout_id, device_id=device_id)


def audit(
    repo: Repository,
    limit: int = DEFAULT_LIMIT,
    cursor: str | None = None,
    target: str | None = None,
) -> Page:
    """Audit records newest first, optionally about one target (``rollout:r-…``)."""
    return repo.audit_page(limit, cursor, target=target)


def drift(
    engine: Any,
    limit: int = DEFAULT_LIMIT,
    cursor: str | None = None,
    model: str | None = None,
    version: str | None = None,
) -> Page:
    """Stored drift evaluations newest first; an empty page without a drift engine."""
    if engine is None:
        check_limit(limit)
        if cursor is not None:
            DRIFT.decode(cursor)
        return Page([], None)
    page: Page = engine.results_page(model, version, limit, cursor)
    return page
