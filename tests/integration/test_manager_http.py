"""The control plane in HTTP mode against simulated engines served over real HTTP."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from sage_llm import ControlPlaneManager, ExecutionInstance, RequestStatus
from sage_llm.sim.engine import SimEngine, SimEngineConfig
from sage_llm.sim.server import start_engine_server
from sage_llm.tokens import count_tokens
from tests.factories import make_metadata

MODEL = "llama-3-8b"


@pytest.fixture
async def two_engines() -> AsyncIterator[list[tuple[SimEngine, int]]]:
    runners: list[web.AppRunner] = []
    out: list[tuple[SimEngine, int]] = []
    for i in range(2):
        engine = SimEngine(f"e{i}", SimEngineConfig(model=MODEL, speed=20.0, seed=i))
        runner, port = await start_engine_server(engine, model_name=MODEL)
        runners.append(runner)
        out.append((engine, port))
    yield out
    for runner in runners:
        await runner.cleanup()
    for engine, _ in out:
        await engine.aclose()


async def test_requests_complete_over_http_and_spread_over_both_engines(
    two_engines: list[tuple[SimEngine, int]],
) -> None:
    cp = ControlPlaneManager(
        scheduling_policy="fifo", routing_strategy="load_balanced", stats_interval_s=0.05
    )
    for n, (_, port) in enumerate(two_engines):
        cp.register_instance(
            ExecutionInstance(f"http-{n}", "127.0.0.1", port, MODEL, max_concurrent_requests=4)
        )
    async with cp:
        metas = [make_metadata(f"h{i}", max_tokens=6) for i in range(16)]
        results = await asyncio.gather(*(cp.generate(m) for m in metas))
        parts = [c.text async for c in cp.stream(make_metadata("s", max_tokens=5))]
        await asyncio.sleep(0.2)
        stats = [await cp.engine_stats(f"http-{n}") for n in range(2)]
    assert all(r.status is RequestStatus.COMPLETED for r in results)
    assert all(r.completion_tokens == 6 for r in results)
    assert all(count_tokens(r.text) == 6 for r in results)
    assert {r.instance_id for r in results} == {"http-0", "http-1"}
    assert count_tokens("".join(parts)) == 5
    assert sum(s.generation_tokens_total for s in stats) == 16 * 6 + 5
    assert all(s.source == "vllm" for s in stats)


async def test_dead_engine_before_first_token_retries_on_the_other(
    two_engines: list[tuple[SimEngine, int]],
) -> None:
    cp = ControlPlaneManager(scheduling_policy="fifo", routing_strategy="round_robin")
    _, live_port = two_engines[0]
    # A port nobody listens on: connection refused before any output.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    cp.register_instance(ExecutionInstance("dead", "127.0.0.1", dead_port, MODEL))
    cp.register_instance(ExecutionInstance("live", "127.0.0.1", live_port, MODEL))
    async with cp:
        results = await asyncio.gather(
            *(cp.generate(make_metadata(f"r{i}", max_tokens=3)) for i in range(6))
        )
    assert all(r.status is RequestStatus.COMPLETED for r in results)
    assert all(r.instance_id == "live" for r in results)
    assert any(r.attempts == 2 for r in results)


async def test_sampled_engine_streaming_over_http_measures_one_request_in_n(
    two_engines: list[tuple[SimEngine, int]],
) -> None:
    # no rate limit here: these requests come closer together than the default's 1/20 s
    cp = ControlPlaneManager(
        scheduling_policy="fifo", engine_stream_sample=0.25, engine_stream_sample_max_per_s=0
    )
    assert cp.engine_stream == "sampled"  # the default
    _, port = two_engines[0]
    cp.register_instance(ExecutionInstance("http-0", "127.0.0.1", port, MODEL))
    async with cp:
        results = [await cp.generate(make_metadata(f"r{i}", max_tokens=4)) for i in range(9)]
        parts = [c.text async for c in cp.stream(make_metadata("s", max_tokens=4))]
        streamed = await cp.wait_for_result("s")
    assert all(r.status is RequestStatus.COMPLETED and r.completion_tokens == 4 for r in results)
    assert all(count_tokens(r.text) == 4 for r in results)
    # the first non-streaming request on the instance streamed from the engine, then one in 4
    measured = [r.ttft_ms is not None and r.tpot_ms is not None for r in results]
    assert measured == [True, False, False, False, True, False, False, False, True]
    assert all(r.e2e_latency_ms is not None for r in results)
    assert count_tokens("".join(parts)) == 4
    assert streamed.ttft_ms is not None  # a streaming request always streams


@pytest.mark.parametrize("mode", ["http", "simulated"])
async def test_a_gateway_request_without_max_tokens_gets_the_engines_default(
    two_engines: list[tuple[SimEngine, int]], mode: str
) -> None:
    """A client that gives no max_tokens gets what the engine gives it (vLLM: 16 for a
    completion, a chat's whole answer), not the control plane's default_max_tokens (10
    here), which only estimates it; a library caller's request gets that default. The
    same from simulated engines over HTTP and in-process (the embedded fleet)."""
    import aiohttp

    from sage_llm.gateway.server import start_gateway

    cp = ControlPlaneManager(scheduling_policy="fifo", default_max_tokens=10, mode=mode)
    for n, (_, port) in enumerate(two_engines):
        cp.register_instance(ExecutionInstance(f"http-{n}", "127.0.0.1", port, MODEL))
    async with cp:
        runner, port = await start_gateway(cp)
        try:
            async with aiohttp.ClientSession() as http:
                base = f"http://127.0.0.1:{port}/v1"
                chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
                async with http.post(f"{base}/chat/completions", json=chat) as resp:
                    chat_usage = (await resp.json())["usage"]
                plain = {"model": MODEL, "prompt": "hi"}
                async with http.post(f"{base}/completions", json=plain) as resp:
                    completion_usage = (await resp.json())["usage"]
        finally:
            await runner.cleanup()
        library = await cp.generate(make_metadata("lib", max_tokens=None))
    assert chat_usage["completion_tokens"] == 128  # engine-sim's chat answer, uncapped
    assert completion_usage["completion_tokens"] == 16
    assert library.completion_tokens == 10
