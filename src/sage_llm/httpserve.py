"""Serving an aiohttp application on a TCP port: shared by the gateway and the engine server."""

from __future__ import annotations

import asyncio
import contextlib
import socket

from aiohttp import web


def tcp_nodelay(transport: asyncio.BaseTransport | None) -> None:
    """Disable Nagle on a TCP transport so each small write (an SSE event) leaves at once;
    nothing for other transports."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


KEEPALIVE_TIMEOUT_S = 75.0
"""How long an idle keep-alive connection stays open (the gateway's lean front closes its
own after as long)."""


def new_runner(app: web.Application, *, shutdown_timeout_s: float) -> web.AppRunner:
    """The runner every server here uses: a request's handler is cancelled when its client
    disconnects; an idle keep-alive connection closes after :data:`KEEPALIVE_TIMEOUT_S`
    (aiohttp's own default is an hour); aiohttp's access log is off (callers write their
    own, without secrets)."""
    return web.AppRunner(
        app,
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=shutdown_timeout_s,
        keepalive_timeout=KEEPALIVE_TIMEOUT_S,
    )


async def start_site(
    app: web.Application, host: str, port: int, *, shutdown_timeout_s: float
) -> tuple[web.AppRunner, int]:
    """Serve ``app`` on ``host:port`` (``port=0`` picks a free one).

    Returns the runner (``await runner.cleanup()`` stops it) and the bound port. A request's
    handler is cancelled when its client disconnects, so the work behind it is aborted.
    aiohttp's access log is off: callers write their own, without secrets.
    """
    runner = new_runner(app, shutdown_timeout_s=shutdown_timeout_s)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, int(runner.addresses[0][1])
