"""Serving an aiohttp application on a TCP port: shared by the gateway and the engine server."""

from __future__ import annotations

from aiohttp import web


async def start_site(
    app: web.Application, host: str, port: int, *, shutdown_timeout_s: float
) -> tuple[web.AppRunner, int]:
    """Serve ``app`` on ``host:port`` (``port=0`` picks a free one).

    Returns the runner (``await runner.cleanup()`` stops it) and the bound port. A request's
    handler is cancelled when its client disconnects, so the work behind it is aborted.
    aiohttp's access log is off: callers write their own, without secrets.
    """
    runner = web.AppRunner(
        app, handler_cancellation=True, access_log=None, shutdown_timeout=shutdown_timeout_s
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, int(runner.addresses[0][1])
