"""The fleet dashboard: server-rendered pages behind a login, mounted by ``create_app``.

    from fleet_server.dashboard import build_router
    app.include_router(build_router(service))     # pages under /ui, assets under /ui/static

Every asset (templates, CSS, the small JS that refreshes a rollout page, the SVG charts
rendered on the server) ships in this package: no CDN, no external fonts.
"""

from __future__ import annotations

from .routes import build_router

__all__ = ["build_router"]
