"""PD over HTTP: a manager in ``http`` mode drives two simulated engine servers (one
prefill-role, one decode-role) through recording proxies that capture the bytes on the wire.

The two simulated engines share a :class:`KVTransferHub`, as vLLM engines share NIXL: the
prefill side's KV blocks are released when the decode side has pulled them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from sage_llm import ControlPlaneManager, ExecutionInstance, RequestStatus
from sage_llm.engines.http import prefill_kv_transfer_params
from sage_llm.sim.engine import KVTransferHub, SimEngine, SimEngineConfig
from sage_llm.sim.server import start_engine_server
from sage_llm.tokens import count_tokens
from sage_llm.types import ExecutionInstanceType as Role
from sage_llm.types import PDSeparationConfig
from tests.engines.fake_engine import start_app
from tests.factories import make_metadata

MODEL = "llama-3-8b"
PROMPT = "the quick brown fox jumps over the lazy dog " * 60
GENERATE_PATHS = ("/v1/completions", "/v1/chat/completions")


@dataclass
class Exchange:
    """One request that went through a proxy, and the response bytes that came back."""

    method: str
    path: str
    request_id: str | None
    body: bytes
    status: int = 0
    response: bytearray = field(default_factory=bytearray)

    def json(self) -> Any:
        return json.loads(self.body)


class RecordingProxy:
    """Forwards every request to ``upstream`` byte for byte and records it. With
    ``fail_status`` set, generation requests are answered with that error instead."""

    def __init__(self, upstream: str, session: aiohttp.ClientSession) -> None:
        self.upstream = upstream
        self.session = session
        self.exchanges: list[Exchange] = []
        self.fail_status: int | None = None
        self.without_kv = False
        """Answer generation requests as an engine without a KV connector does: a
        completion with no ``kv_transfer_params``."""
        self.generation_seen = asyncio.Event()

    @property
    def generations(self) -> list[Exchange]:
        return [e for e in self.exchanges if e.path in GENERATE_PATHS]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        ex = Exchange(request.method, request.path, request.headers.get("X-Request-Id"), body)
        self.exchanges.append(ex)
        if request.path in GENERATE_PATHS:
            self.generation_seen.set()
            if self.fail_status is not None:
                ex.status = self.fail_status
                error = {"error": {"message": "prefill worker crashed", "type": "internal"}}
                return web.json_response(error, status=self.fail_status)
            if self.without_kv:
                choice = {"index": 0, "text": " x", "finish_reason": "length"}
                usage = {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10}
                return web.json_response({"choices": [choice], "usage": usage})
        headers = {
            name: value
            for name in ("Content-Type", "X-Request-Id")
            if (value := request.headers.get(name)) is not None
        }
        async with self.session.request(
            request.method, self.upstream + request.path_qs, data=body, headers=headers
        ) as upstream:
            ex.status = upstream.status
            resp = web.StreamResponse(
                status=upstream.status,
                headers={"Content-Type": upstream.headers.get("Content-Type", "text/plain")},
            )
            await resp.prepare(request)
            async for data in upstream.content.iter_any():
                ex.response.extend(data)
                await resp.write(data)
            await resp.write_eof()
            return resp


@dataclass
class Cluster:
    cp: ControlPlaneManager
    engines: dict[str, SimEngine]
    proxies: dict[str, RecordingProxy]

    def pinned_nowhere(self, rid: str) -> bool:
        return all(e.core.release_kv(rid) is False for e in self.engines.values())

    async def releases_ended(self, count: int) -> None:
        """Until ``count`` KV releases have ended (a cancelled request's goes on after it),
        within 10 s."""
        async with asyncio.timeout(10.0):
            while True:
                connector = self.cp.get_status()["pd"]["connector"]
                if connector["kv_releases"] + connector["kv_release_failures"] >= count:
                    return
                await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def cluster(
    *,
    link_gbps: float = 50.0,
    general: bool = False,
    fallback: bool = True,
    engine_stream: str = "always",
    prefills: int = 1,
) -> AsyncIterator[Cluster]:
    hub = KVTransferHub()
    roles = [*((f"p{n}", Role.PREFILLING) for n in range(prefills)), ("d0", Role.DECODING)]
    if general:
        roles.append(("g0", Role.GENERAL))
    cfg = PDSeparationConfig(routing_policy="always", fallback_to_colocated=fallback)
    cp = ControlPlaneManager(
        mode="http", pd_config=cfg, enable_monitoring=False, seed=1, engine_stream=engine_stream
    )
    engines: dict[str, SimEngine] = {}
    proxies: dict[str, RecordingProxy] = {}
    runners: list[web.AppRunner] = []
    async with aiohttp.ClientSession() as session:
        try:
            for iid, role in roles:
                config = SimEngineConfig(role=role, speed=10.0, kv_link_gbps=link_gbps)
                engine = SimEngine(iid, config, kv_hub=hub)
                engines[iid] = engine
                runner, port = await start_engine_server(engine, model_name=MODEL)
                runners.append(runner)
                proxy = RecordingProxy(f"http://127.0.0.1:{port}", session)
                app = web.Application()
                app.router.add_route("*", "/{tail:.*}", proxy.handle)
                runner, proxy_port = await start_app(app)
                runners.append(runner)
                proxies[iid] = proxy
                cp.register_instance(
                    ExecutionInstance(iid, "127.0.0.1", proxy_port, MODEL, instance_type=role)
                )
            async with cp:
                yield Cluster(cp, engines, proxies)
        finally:
            for runner in reversed(runners):
                await runner.cleanup()
            for engine in engines.values():
                await engine.aclose()


async def test_pd_request_bytes_match_the_vllm_protocol() -> None:
    async with cluster() as c:
        res = await c.cp.generate(make_metadata("pd-1", prompt=PROMPT, max_tokens=8))
        assert res.status is RequestStatus.COMPLETED, res.error
        assert (res.prefill_instance_id, res.instance_id) == ("p0", "d0")
        [p_leg] = c.proxies["p0"].generations
        [d_leg] = c.proxies["d0"].generations
    assert (p_leg.path, d_leg.path) == ("/v1/completions", "/v1/completions")
    assert p_leg.request_id == d_leg.request_id == "pd-1"
    sampling = {"model": MODEL, "prompt": PROMPT, "temperature": 1.0, "top_p": 1.0}
    assert p_leg.json() == {
        **sampling,
        "max_tokens": 1,
        "stream": False,
        "kv_transfer_params": {
            "do_remote_decode": True,
            "do_remote_prefill": False,
            "remote_engine_id": None,
            "remote_block_ids": None,
            "remote_host": None,
            "remote_port": None,
        },
    }
    assert p_leg.json()["kv_transfer_params"] == prefill_kv_transfer_params()
    returned = json.loads(p_leg.response)["kv_transfer_params"]
    assert returned["do_remote_prefill"] is True and returned["remote_request_id"] == "pd-1"
    # The decode leg: the original request (streamed from the engine, as every control-plane
    # request is) plus exactly the parameters the prefill leg returned.
    assert d_leg.json() == {
        **sampling,
        "max_tokens": 8,
        "stream": True,
        "stream_options": {"include_usage": True},
        "kv_transfer_params": returned,
    }
    assert d_leg.response.startswith(b"data: ")
    assert res.prompt_tokens == count_tokens(PROMPT) and res.completion_tokens == 8


async def test_chat_requests_use_the_chat_path_on_both_legs() -> None:
    messages = [{"role": "user", "content": PROMPT}]
    async with cluster() as c:
        res = await c.cp.generate(make_metadata("chat-1", prompt=None, messages=messages))
        assert res.status is RequestStatus.COMPLETED, res.error
        legs = [*c.proxies["p0"].generations, *c.proxies["d0"].generations]
    assert [leg.path for leg in legs] == ["/v1/chat/completions"] * 2
    assert [leg.json()["messages"] for leg in legs] == [messages, messages]


async def test_usage_is_right_streamed_and_not() -> None:
    async with cluster() as c:
        chunks = [ch async for ch in c.cp.stream(make_metadata("s-1", prompt=PROMPT, max_tokens=5))]
        streamed = await c.cp.wait_for_result("s-1")
        plain = await c.cp.generate(make_metadata("n-1", prompt=PROMPT, max_tokens=5))
        assert c.pinned_nowhere("s-1") and c.pinned_nowhere("n-1")
    usage = chunks[-1].usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (count_tokens(PROMPT), 5)
    assert "".join(ch.text for ch in chunks) == streamed.text
    for res in (streamed, plain):
        assert res.status is RequestStatus.COMPLETED
        assert (res.prompt_tokens, res.completion_tokens) == (count_tokens(PROMPT), 5)


async def test_engine_stream_client_asks_the_decode_leg_for_one_answer() -> None:
    async with cluster(engine_stream="client") as c:
        plain = await c.cp.generate(make_metadata("n-1", prompt=PROMPT, max_tokens=5))
        parts = [ch.text async for ch in c.cp.stream(make_metadata("s-1", prompt=PROMPT))]
        streamed = await c.cp.wait_for_result("s-1")
        assert c.pinned_nowhere("n-1") and c.pinned_nowhere("s-1")
        prefill = [leg.json() for leg in c.proxies["p0"].generations]
        decode = [leg.json() for leg in c.proxies["d0"].generations]
    assert [leg["stream"] for leg in prefill] == [False, False]
    assert [leg["stream"] for leg in decode] == [False, True]
    assert "stream_options" not in decode[0]
    assert plain.status is RequestStatus.COMPLETED, plain.error
    assert (plain.prompt_tokens, plain.completion_tokens) == (count_tokens(PROMPT), 5)
    assert count_tokens(plain.text) == 5
    assert plain.ttft_ms is None and plain.tpot_ms is None
    assert "".join(parts) == streamed.text and streamed.ttft_ms is not None


async def test_cancel_between_the_legs_releases_the_prefill_kv() -> None:
    async with cluster(link_gbps=0.25) as c:  # the decode side pulls for ~0.3 s
        decode = c.proxies["d0"]
        rid = await c.cp.submit_request(make_metadata("c-1", prompt=PROMPT, max_tokens=8))
        await decode.generation_seen.wait()  # the prefill leg has returned
        assert c.engines["p0"].core.kv_usage > 0  # its KV is pinned for the decode side
        assert await c.cp.cancel_request(rid) is True
        res = await c.cp.wait_for_result(rid)
        assert res.status is RequestStatus.CANCELLED
        await c.releases_ended(1)
        assert c.pinned_nowhere(rid)
        [p_leg] = c.proxies["p0"].generations
        returned = json.loads(p_leg.response)["kv_transfer_params"]
        legs = decode.generations
    # The decode leg was dropped and its KV pulled by a one-token leg whose output is discarded.
    assert [leg.request_id for leg in legs] == ["c-1", "c-1-kv-release"]
    release = legs[1].json()
    assert release["max_tokens"] == 1 and release["kv_transfer_params"] == returned


async def test_prefill_failure_returns_its_error_and_never_calls_decode() -> None:
    async with cluster(fallback=False) as c:
        c.proxies["p0"].fail_status = 500
        res = await c.cp.generate(make_metadata("f-1", prompt=PROMPT, max_tokens=4))
        assert c.proxies["d0"].generations == []
    assert res.status is RequestStatus.FAILED
    assert res.error is not None
    assert "prefill leg failed" in res.error and "HTTP 500" in res.error
    assert "prefill worker crashed" in res.error


async def test_prefill_failure_falls_back_to_a_colocated_instance() -> None:
    async with cluster(general=True, fallback=True) as c:
        c.proxies["p0"].fail_status = 503
        res = await c.cp.generate(make_metadata("f-2", prompt=PROMPT, max_tokens=4))
        assert c.proxies["d0"].generations == []
        [whole] = c.proxies["g0"].generations
        status = c.cp.get_status()["pd"]
    assert res.status is RequestStatus.COMPLETED, res.error
    assert (res.instance_id, res.prefill_instance_id, res.attempts) == ("g0", None, 2)
    assert "kv_transfer_params" not in whole.json()
    assert status["colocated_fallbacks"] == 1


async def test_a_prefill_engine_without_a_kv_connector_is_failed_over() -> None:
    """An engine with no KV connector answers the prefill leg without kv_transfer_params:
    that is the instance's failure, and each request it took runs on the other pair (they
    had failed with a 502)."""
    async with cluster(prefills=2, fallback=False) as c:
        c.proxies["p1"].without_kv = True
        metas = [make_metadata(f"k{i}", prompt=PROMPT, max_tokens=4) for i in range(6)]
        results = await asyncio.gather(*(c.cp.generate(m) for m in metas))
        p1 = c.cp.get_instance_metrics("p1")
        tried = len(c.proxies["p1"].generations)
    for res in results:
        assert res.status is RequestStatus.COMPLETED, res.error
        assert (res.prefill_instance_id, res.instance_id) == ("p0", "d0")
    assert tried >= 1 and p1["failed_calls"] == tried
