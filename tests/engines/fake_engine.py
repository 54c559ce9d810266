"""A small in-process engine and loopback-server helpers for the HTTP tests.

:class:`FakeEngine` implements :class:`~sage_llm.engines.base.EngineClient`: it yields one
word per token (``" w0"``, ``" w1"``, …) up to ``max_tokens``, records what it was asked,
and notes which requests were aborted (iterator closed before the end). It never sleeps on
real time: ``gate_after`` parks a stream on an event, and a :class:`ManualClock` advanced
per chunk gives the server exact timings.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from sage_llm.engines.base import Chunk, EngineRequest, EngineStats, KVHandle, Usage
from sage_llm.errors import SageLLMError
from sage_llm.tokens import chat_prompt_text, count_tokens

MODEL = "fake-model"


class ManualClock:
    """A clock that moves only when told to (explicit ``now`` values for timing tests)."""

    def __init__(self, start: float = 0.0) -> None:
        self.t = start

    def now(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt

    def to_datetime(self, t: float) -> datetime:
        return datetime(2025, 1, 1, tzinfo=UTC) + timedelta(seconds=t)

    async def sleep(self, seconds: float) -> None:
        self.advance(seconds)
        await asyncio.sleep(0)


def prompt_tokens(req: EngineRequest) -> int:
    if req.messages is not None:
        return count_tokens(chat_prompt_text(list(req.messages)))
    return count_tokens(req.prompt)


class FakeEngine:
    """Deterministic engine: token *i* is the text ``" w{i}"``; the last chunk carries
    ``finish_reason="length"`` and usage."""

    def __init__(
        self,
        instance_id: str = "fake-0",
        *,
        gate_after: int | None = None,
        clock: ManualClock | None = None,
        step_s: float = 0.0,
        fail_with: SageLLMError | None = None,
        fail_after: int | None = None,
        cached_tokens: int = 0,
    ) -> None:
        self._id = instance_id
        self.gate_after = gate_after
        self.clock = clock
        self.step_s = step_s
        self.fail_with = fail_with
        self.fail_after = fail_after
        self.cached_tokens = cached_tokens
        self.requests: list[EngineRequest] = []
        self.prefills: list[EngineRequest] = []
        self.finished: list[str] = []
        self.aborted: list[str] = []
        self.queue_times: dict[str, float] = {}
        self.tasks: dict[str, asyncio.Task[Any] | None] = {}
        self.in_flight = 0
        self.release = asyncio.Event()
        self.gated = asyncio.Event()
        self.aborted_event = asyncio.Event()

    @property
    def instance_id(self) -> str:
        return self._id

    async def generate(self, req: EngineRequest) -> AsyncIterator[Chunk]:
        self.requests.append(req)
        if self.fail_with is not None and self.fail_after is None:
            raise self.fail_with
        self.in_flight += 1
        complete = False
        try:
            n = req.max_tokens
            for i in range(n):
                if self.gate_after is not None and i == self.gate_after:
                    self.gated.set()
                    await self.release.wait()
                if self.fail_with is not None and i == self.fail_after:
                    raise self.fail_with
                if self.clock is not None:
                    self.clock.advance(self.step_s)
                await asyncio.sleep(0)
                last = i == n - 1
                usage = Usage(prompt_tokens(req), n, self.cached_tokens) if last else None
                yield Chunk(text=f" w{i}", finish_reason="length" if last else None, usage=usage)
            complete = True
        finally:
            self.in_flight -= 1
            if complete:
                self.finished.append(req.request_id)
            else:
                self.aborted.append(req.request_id)
                self.aborted_event.set()

    async def prefill(self, req: EngineRequest) -> KVHandle:
        self.prefills.append(req)
        if self.fail_with is not None:
            raise self.fail_with
        if self.gate_after == 0:  # held, as a long prompt's prefill would be
            self.gated.set()
            await self.release.wait()
        params: dict[str, Any] = {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_engine_id": f"engine-{self._id}",
            "remote_block_ids": [3, 4, 5],
            "remote_host": "127.0.0.1",
            "remote_port": 5600,
            "remote_request_id": req.request_id,
            "tp_size": 1,
        }
        first = Chunk(text=" w0", finish_reason="length")
        return KVHandle(self._id, params, prompt_tokens(req), self.cached_tokens, first)

    async def health(self) -> bool:
        return True

    async def stats(self) -> EngineStats:
        return EngineStats(
            running=self.in_flight,
            waiting=2,
            kv_usage=0.25,
            prefix_cache_queries_total=100.0,
            prefix_cache_hits_total=40.0,
            preemptions_total=1.0,
            prompt_tokens_total=500.0,
            generation_tokens_total=300.0,
            num_gpu_blocks=1000,
            block_size=16,
            source="sim",
        )

    def queue_time_s(self, request_id: str) -> float | None:
        return self.queue_times.get(request_id)

    async def aclose(self) -> None:
        return None


def probed_app() -> web.Application:
    """An aiohttp app with an engine's probe routes (``/health`` and ``/metrics`` answer
    200, empty); a test adds the routes it scripts."""

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="")

    app = web.Application()
    app.router.add_get("/health", ok)
    app.router.add_get("/metrics", ok)
    return app


async def start_app(app: web.Application) -> tuple[web.AppRunner, int]:
    """Serve ``app`` on an ephemeral loopback port; handlers are cancelled on disconnect."""
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, int(runner.addresses[0][1])


class BatchingFakeEngine(FakeEngine):
    """A :class:`FakeEngine` that also yields its chunks a list at a time
    (``generate_batches``, as the HTTP client does), so the control plane relays a lone
    stream from it in the relaying task."""

    async def generate_batches(self, req: EngineRequest) -> AsyncIterator[list[Chunk]]:
        """:meth:`generate`'s chunks in lists of one; notes the task each call ran
        in (:attr:`tasks`)."""
        self.tasks[req.request_id] = asyncio.current_task()
        it = self.generate(req)
        try:
            async for chunk in it:
                yield [chunk]
        finally:
            await it.aclose()  # type: ignore[attr-defined]


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
