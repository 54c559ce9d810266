"""Serving the gateway: :func:`run_gateway` for ``sage-llm serve``, :func:`start_gateway`
for tests and benchmarks.

Both serve with aiohttp's ``AppRunner`` + ``TCPSite``, bind 127.0.0.1 by default, and
cancel a request's handler when its client disconnects (so the request is cancelled in the
manager and the engine call aborted).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from aiohttp import web

from sage_llm.control_plane.manager import ControlPlaneManager
from sage_llm.gateway.app import create_app
from sage_llm.gateway.settings import GatewaySettings
from sage_llm.httpserve import start_site

log = logging.getLogger("sage_llm.gateway")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_SHUTDOWN_TIMEOUT_S = 30.0


async def start_gateway(
    manager: ControlPlaneManager,
    gateway: GatewaySettings | None = None,
    host: str = DEFAULT_HOST,
    port: int = 0,
    *,
    manage_lifecycle: bool = False,
    environ: Mapping[str, str] | None = None,
    shutdown_timeout_s: float = 5.0,
) -> tuple[web.AppRunner, int]:
    """Start serving ``manager``; returns the runner (``await runner.cleanup()`` stops it)
    and the bound port (``port=0`` picks a free one).

    The caller owns the manager unless ``manage_lifecycle=True`` (then the app starts it
    now and stops it on cleanup).
    """
    app = create_app(manager, gateway, manage_lifecycle=manage_lifecycle, environ=environ)
    return await start_site(app, host, port, shutdown_timeout_s=shutdown_timeout_s)


async def run_gateway(
    manager: ControlPlaneManager,
    gateway: GatewaySettings,
    *,
    host: str | None = None,
    port: int | None = None,
    ready: asyncio.Event | None = None,
    shutdown_timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S,
) -> None:
    """Start the manager, serve until cancelled, then shut down gracefully: stop accepting
    connections, let in-flight requests finish for up to ``shutdown_timeout_s``, then stop
    the manager. ``host``/``port`` override the settings; ``ready`` is set once listening.
    """
    bind_host = host if host is not None else (gateway.host or DEFAULT_HOST)
    bind_port = port if port is not None else gateway.port
    if gateway.workers > 1:
        log.warning(
            "gateway.workers = %d ignored: one process serves one control plane "
            "(its queue and fleet state are not shared between processes)",
            gateway.workers,
        )
    await manager.start()
    try:
        app = create_app(manager, gateway)
        runner, bound = await start_site(
            app, bind_host, bind_port, shutdown_timeout_s=shutdown_timeout_s
        )
        try:
            log.info("gateway listening on http://%s:%d", bind_host, bound)
            if ready is not None:
                ready.set()
            await asyncio.Event().wait()
        finally:
            log.info("gateway shutting down: finishing in-flight requests")
            await runner.cleanup()
    finally:
        await manager.stop(drain_timeout_s=shutdown_timeout_s)
        log.info("gateway stopped")
