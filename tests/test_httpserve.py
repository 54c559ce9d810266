"""The aiohttp servers' shared settings (``sage_llm.httpserve``)."""

from __future__ import annotations

import asyncio
import socket

import pytest
from aiohttp import web

from sage_llm.httpserve import KEEPALIVE_TIMEOUT_S, start_site, tcp_nodelay


async def test_an_idle_keep_alive_connection_closes_after_the_documented_time() -> None:
    """75 s, as the gateway's lean front (aiohttp's own default is an hour)."""
    runner, port = await start_site(web.Application(), "127.0.0.1", 0, shutdown_timeout_s=1.0)
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            server = runner.server
            assert server is not None
            handlers = list(server.connections)  # the protocol serving this connection
            for _ in range(100):
                if handlers:
                    break
                await asyncio.sleep(0.01)
                handlers = list(server.connections)
            assert handlers and KEEPALIVE_TIMEOUT_S == 75.0
            assert handlers[0]._keepalive_timeout == KEEPALIVE_TIMEOUT_S
        finally:
            writer.close()
    finally:
        await runner.cleanup()


async def test_a_site_that_cannot_bind_cleans_its_app_up() -> None:
    """Its runner is cleaned up (the app's on_cleanup hooks run) before the error goes on."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    cleaned: list[bool] = []

    async def on_cleanup(_app: web.Application) -> None:
        cleaned.append(True)

    app = web.Application()
    app.on_cleanup.append(on_cleanup)
    try:
        with pytest.raises(OSError, match="ddress already in use"):
            await start_site(app, "127.0.0.1", taken.getsockname()[1], shutdown_timeout_s=1.0)
    finally:
        taken.close()
    assert cleaned == [True]


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def test_tcp_nodelay_disables_nagle_on_a_tcp_transport(family: socket.AddressFamily) -> None:
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError:  # no IPv6 on this host
        pytest.skip(f"no {family.name} sockets here")
    with sock:
        tcp_nodelay(asyncio.BaseTransport(extra={"socket": sock}))
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
