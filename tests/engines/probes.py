"""Engine wrappers for tests: they delegate to a real engine and observe or inject faults.

These are not mocks: every request still runs on the wrapped (simulated) engine unless the
wrapper is told to fail it, in which case it raises the same EngineError an HTTP engine
would.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable

from sage_llm.engines.base import (
    Chunk,
    EngineClient,
    EngineRequest,
    EngineStats,
    KVHandle,
    LoadsAdapters,
    ReportsContextLength,
)
from sage_llm.errors import EngineConnectionError, EngineError, EngineStreamError


class ConcurrencyProbe:
    """Counts requests in flight on one engine and remembers the maximum ever seen."""

    def __init__(self, inner: EngineClient) -> None:
        self.inner = inner
        self.in_flight = 0
        self.max_in_flight = 0
        self.started = 0
        self.request_ids: list[str] = []
        self.finished: list[str] = []
        """The requests whose stream the engine ran to its end."""

    @property
    def instance_id(self) -> str:
        return self.inner.instance_id

    async def generate(self, req: EngineRequest) -> AsyncGenerator[Chunk, None]:
        self.in_flight += 1
        self.started += 1
        self.request_ids.append(req.request_id)
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            async for chunk in self.inner.generate(req):
                yield chunk
            self.finished.append(req.request_id)
        finally:
            self.in_flight -= 1

    async def prefill(self, req: EngineRequest) -> KVHandle:
        return await self.inner.prefill(req)

    async def health(self) -> bool:
        return await self.inner.health()

    async def stats(self) -> EngineStats:
        return await self.inner.stats()

    async def context_length(self) -> int | None:
        inner = self.inner
        return await inner.context_length() if isinstance(inner, ReportsContextLength) else None

    async def load_lora_adapter(self, name: str, path: str) -> None:
        if not isinstance(self.inner, LoadsAdapters):
            raise EngineError(f"{self.instance_id}: cannot load LoRA adapters")
        await self.inner.load_lora_adapter(name, path)

    async def unload_lora_adapter(self, name: str) -> None:
        if not isinstance(self.inner, LoadsAdapters):
            raise EngineError(f"{self.instance_id}: cannot unload LoRA adapters")
        await self.inner.unload_lora_adapter(name)

    async def aclose(self) -> None:
        await self.inner.aclose()


class FaultyEngine(ConcurrencyProbe):
    """Fails chosen requests: before the first token (retryable) or after ``mid_after``
    chunks (not retryable, like a connection dropped mid-stream)."""

    def __init__(
        self,
        inner: EngineClient,
        *,
        fail_before: Callable[[str], bool] = lambda _rid: False,
        fail_mid: Callable[[str], bool] = lambda _rid: False,
        mid_after: int = 2,
    ) -> None:
        super().__init__(inner)
        self.fail_before = fail_before
        self.fail_mid = fail_mid
        self.mid_after = mid_after
        self.failed_before: list[str] = []
        self.failed_mid: list[str] = []

    async def generate(self, req: EngineRequest) -> AsyncGenerator[Chunk, None]:
        if self.fail_before(req.request_id):
            self.failed_before.append(req.request_id)
            raise EngineConnectionError(
                "connection refused", instance_id=self.instance_id, retryable=True
            )
        n = 0
        async for chunk in super().generate(req):
            yield chunk
            n += 1
            if n >= self.mid_after and self.fail_mid(req.request_id):
                self.failed_mid.append(req.request_id)
                raise EngineStreamError(
                    "connection reset mid-stream", instance_id=self.instance_id, retryable=False
                )
