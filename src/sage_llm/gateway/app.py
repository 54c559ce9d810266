"""The gateway's HTTP application: ``create_app(manager)`` wires routes and middlewares.

No module state: everything an app needs hangs off the objects made here, so several apps
(over several managers) can live in one process.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``POST /v1/embeddings``,
``GET /v1/models``, ``GET /v1/models/{model}``, ``GET /health``, ``GET /ready``,
``GET /metrics``, ``GET /openapi.json`` and the admin API under ``/admin/``
(:mod:`sage_llm.gateway.admin`). One middleware
(:func:`~sage_llm.gateway.observe.gateway_middleware`) does, outermost first: request id +
access log + CORS + tracing (:mod:`~sage_llm.gateway.observe`), JSON errors
(:mod:`~sage_llm.gateway.errors`), authentication (:mod:`~sage_llm.gateway.auth`).
"""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web

from sage_llm.control_plane.manager import ControlPlaneManager
from sage_llm.gateway.admin import AdminRoutes, GatewaySource, add_admin_routes
from sage_llm.gateway.observe import continue_or_refuse, gateway_middleware, load_tracer
from sage_llm.gateway.openai import OpenAIRoutes
from sage_llm.gateway.openapi import build_openapi
from sage_llm.gateway.settings import (
    GatewaySettings,
    LiveSettings,
    ResolvedGateway,
    default_settings,
)

MANAGER_KEY = web.AppKey("manager", ControlPlaneManager)
"""The manager an app serves (``app[MANAGER_KEY]``)."""

SETTINGS_KEY = web.AppKey("gateway_settings", ResolvedGateway)
"""The resolved settings an app started with (those a reload cannot change are read here)."""

LIVE_SETTINGS_KEY = web.AppKey("gateway_live_settings", LiveSettings)
"""The settings each request reads, as the last reload left them (``POST /admin/reload``)."""

ADMIN_KEY = web.AppKey("admin_routes", AdminRoutes)
"""The admin API's handlers (``serve_app`` tells them the address it listens on)."""


def create_app(
    manager: ControlPlaneManager,
    gateway: GatewaySettings | None = None,
    *,
    manage_lifecycle: bool = False,
    environ: Mapping[str, str] | None = None,
    reload_from: GatewaySource | None = None,
) -> web.Application:
    """The gateway application serving ``manager``.

    ``gateway`` is the ``[gateway]`` configuration (``sage_llm.config.GatewayConfig`` or any
    object with the same attributes; ``GatewayConfig()`` when None).
    ``manage_lifecycle=True`` starts the manager when the app starts and stops it when the
    app is cleaned up; otherwise the caller owns the manager. ``environ`` is where
    ``api_keys_env`` / ``admin_token_env`` are looked up (default ``os.environ``).
    ``reload_from`` reads the ``[gateway]`` table again for ``POST /admin/reload``
    (without it that answers 409).
    """
    table = gateway or default_settings()
    settings = ResolvedGateway.from_settings(table, environ)
    live = LiveSettings(settings, started_from=table)
    tracer = load_tracer(settings.tracing)
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        middlewares=[
            gateway_middleware(settings.cors_origins, tracer, live, manager.metrics.on_http_error),
        ],
    )
    app[MANAGER_KEY] = manager
    app[SETTINGS_KEY] = settings
    app[LIVE_SETTINGS_KEY] = live
    manager.metrics.track_users(user for _, user in settings.tenant_keys)  # their own series
    openai = OpenAIRoutes(manager, live)
    document = build_openapi()

    async def openapi_json(request: web.Request) -> web.Response:
        return web.json_response(document)

    router = app.router
    expect_continue = continue_or_refuse(live)
    router.add_post("/v1/completions", openai.completions, expect_handler=expect_continue)
    router.add_post("/v1/chat/completions", openai.chat_completions, expect_handler=expect_continue)
    router.add_post("/v1/embeddings", openai.embeddings, expect_handler=expect_continue)
    router.add_get("/v1/models", openai.models, expect_handler=expect_continue)
    router.add_get("/v1/models/{model:.+}", openai.model, expect_handler=expect_continue)
    router.add_get("/health", openai.health, expect_handler=expect_continue)
    router.add_get("/ready", openai.ready, expect_handler=expect_continue)
    router.add_get("/metrics", openai.metrics, expect_handler=expect_continue)
    router.add_get("/openapi.json", openapi_json, expect_handler=expect_continue)
    admin = app[ADMIN_KEY] = AdminRoutes(
        manager, settings.read_timeout_s, live=live, reload_from=reload_from, environ=environ
    )
    add_admin_routes(app, admin, expect_continue)

    if manage_lifecycle:

        async def start_manager(_app: web.Application) -> None:
            await manager.start()

        async def stop_manager(_app: web.Application) -> None:
            await manager.stop()

        app.on_startup.append(start_manager)
        app.on_cleanup.append(stop_manager)
    return app
