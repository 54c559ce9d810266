"""A real gateway over a real control plane with simulated engines, for the gateway tests.

:class:`GatewayProbe` wraps a :class:`~sage_llm.sim.engine.SimEngine` (every request still
runs on it) and adds what the tests observe or steer: the engine requests it received,
aborted requests, ``n > 1`` (one simulated generation per choice, as an engine does),
embeddings, and a gate that holds chosen requests after some chunks until released.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sage_llm import ControlPlaneManager
from sage_llm.engines.base import Chunk, EngineClient, EngineRequest
from sage_llm.gateway.admin import GatewaySource
from sage_llm.gateway.server import start_gateway
from sage_llm.gateway.settings import GatewaySettings
from sage_llm.sim.engine import SimEngine
from sage_llm.sim.factory import make_sim_engine
from sage_llm.tokens import tokenize
from sage_llm.types import ExecutionInstance
from tests.engines.probes import ConcurrencyProbe
from tests.factories import MODEL, make_instances

FAST = 50.0
"""sim_speed of fast instances (a 16-token request takes a few milliseconds)."""


class GatewayProbe(ConcurrencyProbe):
    """Records and steers the requests reaching one simulated engine."""

    def __init__(
        self,
        inner: EngineClient,
        *,
        hold: Callable[[str], bool] = lambda _rid: False,
        hold_after: int = 1,
    ) -> None:
        super().__init__(inner)
        self.requests: list[EngineRequest] = []
        self.aborted: list[str] = []
        self.hold = hold
        self.hold_after = hold_after
        self.gate = asyncio.Event()
        self.started_event = asyncio.Event()
        self.aborted_event = asyncio.Event()

    async def generate(self, req: EngineRequest) -> AsyncGenerator[Chunk, None]:
        self.requests.append(req)
        self.started_event.set()
        finished = False
        try:
            async for chunk in self._held(req):  # (n > 1: the simulated engine's samples)
                yield chunk
            finished = True
        finally:
            if not finished:
                self.aborted.append(req.request_id)
                self.aborted_event.set()

    async def _held(self, req: EngineRequest) -> AsyncGenerator[Chunk, None]:
        held = self.hold(req.request_id)
        produced = 0
        if held and self.hold_after == 0:
            await self.gate.wait()
        async with contextlib.aclosing(ConcurrencyProbe.generate(self, req)) as stream:
            async for chunk in stream:
                yield chunk
                produced += 1
                if held and produced == self.hold_after:
                    await self.gate.wait()

    async def embed(
        self,
        model: str,
        inputs: list[Any],
        options: Mapping[str, Any] | None = None,
        *,
        request_id: str | None = None,
    ) -> dict[str, Any]:
        """Deterministic 8-dimensional embeddings from the shared tokenizer (or the token
        ids given); ``options`` are recorded in ``embed_options``, ``request_id`` in
        ``embed_request_id``."""
        self.embed_options = dict(options or {})
        self.embed_request_id = request_id
        data = []
        total = 0
        for i, text in enumerate(inputs):
            ids = tokenize(text) if isinstance(text, str) else list(text)
            total += len(ids)
            vec = [(ids[j % len(ids)] % 1000) / 1000.0 if ids else 0.0 for j in range(8)]
            data.append({"object": "embedding", "index": i, "embedding": vec})
        usage = {"prompt_tokens": total, "total_tokens": total}
        return {"object": "list", "data": data, "model": model, "usage": usage}


class BatchingGatewayProbe(GatewayProbe):
    """A :class:`GatewayProbe` that also yields its chunks a list at a time
    (``generate_batches``, as the HTTP engine client does), so a lone stream's engine
    call runs in the task that relays it."""

    async def generate_batches(self, req: EngineRequest) -> AsyncGenerator[list[Chunk], None]:
        async with contextlib.aclosing(self.generate(req)) as stream:
            async for chunk in stream:
                yield [chunk]


Wrap = Callable[[SimEngine], EngineClient]


@dataclass
class Gateway:
    """A running gateway (``url(path)``) over ``manager``; ``probes`` by instance id."""

    manager: ControlPlaneManager
    port: int
    probes: dict[str, GatewayProbe] = field(default_factory=dict)
    engines: dict[str, EngineClient] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def probe_running(self) -> GatewayProbe:
        """The probe with a request in flight (exactly one must have)."""
        busy = [p for p in self.probes.values() if p.in_flight]
        assert len(busy) == 1, f"expected one busy instance, got {len(busy)}"
        return busy[0]


def make_manager(
    instances: int | list[ExecutionInstance] = 1,
    *,
    speed: float = FAST,
    bound: int = 8,
    wrap: Wrap | None = None,
    hold: Callable[[str], bool] = lambda _rid: False,
    hold_after: int = 1,
    batching: bool = False,
    **manager_kwargs: Any,
) -> tuple[ControlPlaneManager, dict[str, GatewayProbe], dict[str, EngineClient]]:
    """A manager (not started) whose instances run simulated engines behind probes
    (:class:`BatchingGatewayProbe` ones with ``batching``), or behind ``wrap``; returns it
    with the probes and engine clients it will create."""
    kind = BatchingGatewayProbe if batching else GatewayProbe
    engines: dict[str, EngineClient] = {}
    probes: dict[str, GatewayProbe] = {}

    def factory(inst: ExecutionInstance) -> EngineClient:
        sim = make_sim_engine(inst)
        client: EngineClient
        if wrap is not None:
            client = wrap(sim)
        else:
            probe = kind(sim, hold=hold, hold_after=hold_after)
            probes[inst.instance_id] = probe
            client = probe
        engines[inst.instance_id] = client
        return client

    manager_kwargs.setdefault("scheduling_policy", "fifo")
    manager = ControlPlaneManager(mode="simulated", engine_factory=factory, **manager_kwargs)
    if isinstance(instances, int):
        instances = make_instances(
            instances, max_concurrent_requests=bound, metadata={"sim_speed": speed}
        )
    for inst in instances:
        manager.register_instance(inst)
    return manager, probes, engines


@contextlib.asynccontextmanager
async def serve(
    instances: int | list[ExecutionInstance] = 1,
    *,
    settings: GatewaySettings | None = None,
    reload_from: GatewaySource | None = None,
    environ: Mapping[str, str] | None = None,
    **kwargs: Any,
) -> AsyncIterator[Gateway]:
    """Start a manager with simulated engines (``make_manager`` arguments) and a gateway
    in front of it (its ``*_env`` keys read from ``environ``, default none); stop both."""
    manager, probes, engines = make_manager(instances, **kwargs)
    await manager.start()
    try:
        runner, port = await start_gateway(
            manager, settings, environ=environ or {}, reload_from=reload_from
        )
        try:
            yield Gateway(manager, port, probes, engines)
        finally:
            await runner.cleanup()
    finally:
        for probe in probes.values():
            probe.gate.set()
        await manager.stop()


def completion_body(prompt: str = "Tell me about the control plane.", **fields: Any) -> Any:
    """A small completions body for the shared test model."""
    return {"model": MODEL, "prompt": prompt, "max_tokens": 8, **fields}


def chat_body(content: str = "Hello there, how are you?", /, **fields: Any) -> Any:
    """A small chat body for the shared test model."""
    messages = [{"role": "user", "content": content}]
    return {"model": MODEL, "messages": messages, "max_tokens": 8, **fields}


async def read_events(resp: Any) -> list[Any]:
    """The ``data`` payloads of an SSE response, ``[DONE]`` included (as a string)."""
    import json

    text = await resp.text()
    events: list[Any] = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events
