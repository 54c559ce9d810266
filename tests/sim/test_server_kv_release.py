"""Cross-process PD KV release: a decode engine server tells the prefill server over HTTP."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import aiohttp
import pytest

from sage_llm.bench.procs import free_ports
from sage_llm.engines.base import EngineClient, EngineRequest
from sage_llm.engines.http import HTTPEngineClient, make_session
from sage_llm.sim.engine import SimEngine, SimEngineConfig
from sage_llm.sim.faults import FaultPlan, FaultyEngineClient
from sage_llm.sim.instant import InstantEngine
from sage_llm.sim.server import KV_RELEASE_PATH, HTTPKVReleaser, start_engine_server
from sage_llm.types import ExecutionInstance, ExecutionInstanceType

MODEL = "llama-3-8b"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.mark.parametrize("faults", [False, True], ids=["plain", "under-faults"])
async def test_decode_server_releases_prefill_kv_in_another_server(faults: bool) -> None:
    """Two servers sharing no KVTransferHub: after the decode leg pulls the KV, the prefill
    engine's blocks are unpinned through ``POST /sim/kv/release``, long before the pin
    timeout; also through the fault injector (``--faults``), which had hidden both ends."""
    p_port, d_port = free_ports(2)
    prefill = SimEngine(
        "p0",
        SimEngineConfig(speed=100.0, role=ExecutionInstanceType.PREFILLING, kv_port=p_port),
    )
    decode = SimEngine(
        "d0", SimEngineConfig(speed=100.0, role=ExecutionInstanceType.DECODING, kv_port=d_port)
    )
    served: list[EngineClient] = [prefill, decode]
    if faults:  # a plan whose fault never comes
        served = [FaultyEngineClient(e, FaultPlan.parse("error=503@100000")) for e in served]
    p_runner, _ = await start_engine_server(served[0], model_name=MODEL, port=p_port)
    d_runner, _ = await start_engine_server(served[1], model_name=MODEL, port=d_port)
    session = make_session()
    try:
        releaser = decode.remote_releaser
        assert isinstance(releaser, HTTPKVReleaser)
        assert isinstance(prefill.remote_releaser, HTTPKVReleaser)
        p = HTTPEngineClient(ExecutionInstance("p0", "127.0.0.1", p_port, MODEL), session)
        d = HTTPEngineClient(ExecutionInstance("d0", "127.0.0.1", d_port, MODEL), session)
        req = EngineRequest("pd-1", MODEL, prompt=" ".join(["word"] * 200), max_tokens=4)
        handle = await p.prefill(req)
        assert handle.params["remote_port"] == p_port
        assert handle.params["remote_host"] == "127.0.0.1"
        pinned_usage = prefill.core.kv_usage
        assert pinned_usage > 0
        chunks = [c async for c in d.generate(req.with_changes(kv_transfer_params=handle.params))]
        assert chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == 4
        await releaser.aclose()  # waits for the background notification
        assert (releaser.sent, releaser.failed) == (1, 0)
        # already unpinned by the notification: nothing left to release
        assert prefill.release_kv("pd-1") is False
    finally:
        await session.close()
        for engine in (prefill, decode):
            await engine.aclose()
        for runner in (p_runner, d_runner):
            await runner.cleanup()
    assert decode.remote_releaser is None  # the server removed its releaser on cleanup


async def test_release_endpoint_validates_and_reports(http: aiohttp.ClientSession) -> None:
    engine = SimEngine("p0", SimEngineConfig(speed=100.0))
    runner, port = await start_engine_server(engine, model_name=MODEL)
    url = f"http://127.0.0.1:{port}{KV_RELEASE_PATH}"
    try:
        async with http.post(url, json={"request_id": "nope"}) as resp:
            assert resp.status == 200
            assert await resp.json() == {"request_id": "nope", "released": False}
        for bad in ({}, {"request_id": 3}, {"request_id": ""}, [1]):
            async with http.post(url, json=bad) as resp:
                assert resp.status == 400
                assert (await resp.json())["error"]["type"] == "BadRequestError"
    finally:
        await engine.aclose()
        await runner.cleanup()


async def test_a_refused_release_is_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    engine = InstantEngine("i0")  # pins no KV: the release endpoint refuses
    runner, port = await start_engine_server(engine, model_name=MODEL)
    releaser = HTTPKVReleaser(timeout_s=2.0)
    try:
        with caplog.at_level(logging.WARNING, logger="sage_llm.sim"):
            releaser.release("127.0.0.1", port, "r1")
            await releaser.aclose()
    finally:
        await engine.aclose()
        await runner.cleanup()
    assert (releaser.sent, releaser.failed) == (0, 1)
    assert "KV release of r1" in caplog.text and "refused: HTTP 400" in caplog.text
    assert "does not pin KV" in caplog.text


async def test_failed_release_is_counted_not_raised() -> None:
    (port,) = free_ports(1)  # nothing listens there
    releaser = HTTPKVReleaser(timeout_s=2.0)
    releaser.release("127.0.0.1", port, "r1")
    await releaser.aclose()
    assert (releaser.sent, releaser.failed) == (0, 1)


def test_releaser_rejects_bad_timeout() -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        HTTPKVReleaser(timeout_s=0)


async def test_close_cancels_a_release_its_prefill_server_never_answers() -> None:
    """``aclose`` waits its grace for pending posts, then cancels them: a prefill server
    that never answers does not hold the decode server's shutdown."""
    heard = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heard.set()
        await reader.read()  # never answers; the connection ends when the client's does
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    releaser = HTTPKVReleaser(timeout_s=30.0)
    try:
        releaser.release("127.0.0.1", port, "r1")
        await asyncio.wait_for(heard.wait(), timeout=10)
        await asyncio.wait_for(releaser.aclose(grace_s=0.05), timeout=10)
    finally:
        server.close()
        await server.wait_closed()
    assert (releaser.sent, releaser.failed) == (0, 0)  # neither: the pin timeout frees it
