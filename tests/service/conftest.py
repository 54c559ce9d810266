"""Fixtures of the service tests: simulated fleets, a simulated engine over HTTP, a dead port."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Iterator

import pytest
from aiohttp import web

from sage_llm.service.runner import LoopThread
from sage_llm.sim.factory import make_sim_engine
from sage_llm.sim.server import start_engine_server
from sage_llm.types import ExecutionInstance
from tests.service.fleets import MODEL


@pytest.fixture
def engine_server() -> Iterator[Callable[..., str]]:
    """Start simulated engines serving vLLM's HTTP API on loopback; yields a starter that
    returns the base URL. Engines run 200x faster than the modelled GPU."""
    runner = LoopThread("sim-engine-server")
    runner.start()
    sites: list[web.AppRunner] = []

    def start(model: str = MODEL, speed: float = 200.0) -> str:
        inst = ExecutionInstance("http-0", "127.0.0.1", 1, model, metadata={"sim_speed": speed})

        async def serve() -> int:
            app_runner, port = await start_engine_server(make_sim_engine(inst), model_name=model)
            sites.append(app_runner)
            return port

        return f"http://127.0.0.1:{runner.run(serve())}"

    async def close_all() -> None:
        for site in sites:
            await site.cleanup()

    try:
        yield start
    finally:
        runner.stop(close_all)


@pytest.fixture
def embeddings_server() -> Iterator[str]:
    """A minimal OpenAI-compatible ``/v1/embeddings`` + ``/v1/models`` endpoint (the
    simulated engine has no embeddings): vector i of an answer is ``[len(text), i]``; an
    input ``"hang"`` is answered after 30 s (or never: the handler is cancelled when its
    client leaves)."""
    runner = LoopThread("embeddings-server")
    runner.start()
    holder: list[web.AppRunner] = []

    async def embeddings(request: web.Request) -> web.Response:
        body = await request.json()
        if "hang" in body["input"]:
            await asyncio.sleep(30.0)
        data = [
            {"object": "embedding", "index": i, "embedding": [float(len(t)), float(i)]}
            for i, t in enumerate(body["input"])
        ]
        return web.json_response({"object": "list", "model": body["model"], "data": data})

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "e5-small"}]})

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="")

    async def serve() -> int:
        app = web.Application()
        app.router.add_post("/v1/embeddings", embeddings)
        app.router.add_get("/v1/models", models)
        app.router.add_get("/health", health)
        app_runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await app_runner.setup()
        site = web.TCPSite(app_runner, "127.0.0.1", 0)
        await site.start()
        holder.append(app_runner)
        return int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

    async def close() -> None:
        for app_runner in holder:
            await app_runner.cleanup()

    try:
        yield f"http://127.0.0.1:{runner.run(serve())}"
    finally:
        runner.stop(close)


@pytest.fixture
def dead_port() -> int:
    """A loopback port nobody listens on (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port
