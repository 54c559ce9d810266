"""Two real vLLM CPU engines (the tiny Llama), started by :mod:`sage_llm.launch`, registered
with a control plane that routes by prefix locality, served through the sage-llm gateway.

The tests share one fleet (starting vLLM takes tens of seconds) and run in file order: the
last one kills an engine.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from sage_llm import ControlPlaneManager
from sage_llm.bench.fidelity import EngineShape
from sage_llm.bench.fidelity_real import real_vllm_paths, vllm_cpu_engines, vllm_cpu_settings
from sage_llm.engines.base import EngineStats
from sage_llm.launch import LaunchedFleet
from sage_llm.types import RequestStatus
from tests.factories import free_ports
from tests.real.conftest import ROOT, served_fleet, skip_reason

pytestmark = pytest.mark.asyncio(loop_scope="module")

MODEL = "tiny"
_TOOL_CALLS = ("--enable-auto-tool-choice", "--tool-call-parser", "hermes")
"""Tool calls on (a forced ``tool_choice`` needs a parser), for the answers' shapes."""
LONG_PROMPT = " ".join(
    f"Request {i} asks the control plane to route a prompt with a shared prefix." for i in range(10)
)


@dataclass
class RealFleet:
    manager: ControlPlaneManager
    fleet: LaunchedFleet
    url: str

    @property
    def ids(self) -> list[str]:
        return [inst.instance_id for inst in self.fleet.instances]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def real(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RealFleet]:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    python, model_dir = real_vllm_paths(ROOT)
    shape = EngineShape(max_num_seqs=16, max_num_batched_tokens=2048)
    settings = vllm_cpu_settings(
        python, model_dir, base_port=free_ports(2), shape=shape,
        log_dir=tmp_path_factory.mktemp("vllm-logs"), served_model_name=MODEL,
        extra_args=_TOOL_CALLS,
    )  # fmt: skip
    manager = ControlPlaneManager(
        scheduling_policy="fifo", routing_strategy="locality", enable_pd_separation=False,
        stats_interval_s=0.25, health_interval_s=0.5, max_retries=2,
    )  # fmt: skip
    async with (
        manager,
        served_fleet(manager, vllm_cpu_engines(settings, 2), settings) as (fleet, url),
    ):
        yield RealFleet(manager, fleet, url)


async def _post(
    fleet: RealFleet, path: str, body: dict[str, Any], rid: str | None = None
) -> dict[str, Any]:
    headers = {"X-Request-Id": rid} if rid else {}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{fleet.url}{path}", json=body, headers=headers) as resp,
    ):
        data: dict[str, Any] = await resp.json(content_type=None)
        assert resp.status == 200, (data, fleet.fleet.describe())
        return data


async def _served_by(fleet: RealFleet, rid: str) -> str:
    for _ in range(100):
        result = await fleet.manager.get_result(rid)
        if result is not None:
            assert result.status is RequestStatus.COMPLETED
            return result.instance_id or ""
        await asyncio.sleep(0.05)
    raise AssertionError(f"no result recorded for {rid}")


async def _stats_until(
    fleet: RealFleet, instance_id: str, ok: Any, timeout_s: float = 20.0
) -> EngineStats:
    """Poll the engine's scraped metrics until ``ok(stats)`` (the engine updates its
    counters asynchronously, after the response)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        stats = await fleet.manager.engine_stats(instance_id)
        if ok(stats) or loop.time() > deadline:
            return stats
        await asyncio.sleep(0.05)


async def test_completions_chat_and_models_through_the_gateway(real: RealFleet) -> None:
    text = await _post(
        real, "/v1/completions",
        {"model": MODEL, "prompt": "Hello there", "max_tokens": 8, "ignore_eos": True},
    )  # fmt: skip
    assert text["object"] == "text_completion"
    assert isinstance(text["choices"][0]["text"], str)
    assert text["usage"]["completion_tokens"] == 8
    assert text["usage"]["prompt_tokens"] > 0
    chat = await _post(
        real, "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 6,
         "ignore_eos": True},
    )  # fmt: skip
    assert chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"]["role"] == "assistant"
    assert isinstance(chat["choices"][0]["message"]["content"], str)
    assert chat["usage"]["completion_tokens"] == 6
    async with aiohttp.ClientSession() as session, session.get(f"{real.url}/v1/models") as resp:
        models = await resp.json()
    card = next(m for m in models["data"] if m["id"] == MODEL)
    assert sorted(card["sage"]["instances"]) == sorted(real.ids)
    assert card["sage"]["healthy_instances"] == 2


async def test_echo_with_max_tokens_0_is_the_prompt_alone(real: RealFleet) -> None:
    # lm-eval's log-likelihood request: the prompt and its tokens' logprobs, nothing more
    prompt = "The river runs to the sea"
    out = await _post(
        real, "/v1/completions",
        {"model": MODEL, "prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 1},
    )  # fmt: skip
    choice = out["choices"][0]
    assert choice["text"] == prompt, out
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == out["usage"]["prompt_tokens"] > 0
    assert logprobs["token_logprobs"][0] is None
    assert all(isinstance(x, float) for x in logprobs["token_logprobs"][1:])


async def test_streaming_relays_tokens_and_the_usage_chunk(real: RealFleet) -> None:
    body = {"model": MODEL, "prompt": "Stream this", "max_tokens": 12, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    events: list[str] = []
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{real.url}/v1/completions", json=body) as resp,
    ):
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        async for raw in resp.content:
            line = raw.decode().strip()
            if line.startswith("data:"):
                events.append(line.removeprefix("data:").strip())
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    with_choices = [c for c in chunks if c.get("choices")]
    assert len(with_choices) >= 2  # relayed as produced, not as one body
    assert with_choices[-1]["choices"][0]["finish_reason"] == "length"
    usage = [c["usage"] for c in chunks if c.get("usage")]
    assert usage[-1]["completion_tokens"] == 12


# --- the same bodies straight to an engine and through the gateway --------------------------

_PROMPT = "The quick brown fox"
_MESSAGES = [{"role": "user", "content": "Say hello"}]
_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "f",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}},
                "required": ["a"],
            },
        },
    }
]
_SAME_SHAPE: list[tuple[str, dict[str, Any]]] = [
    ("/v1/completions", {"prompt": _PROMPT, "max_tokens": 4}),
    ("/v1/completions", {"prompt": _PROMPT, "max_tokens": 3, "n": 2, "seed": 3}),
    ("/v1/completions", {"prompt": _PROMPT, "max_tokens": 3, "logprobs": 2, "echo": True}),
    ("/v1/completions", {"prompt": [_PROMPT, "Hello"], "max_tokens": 2}),
    ("/v1/completions", {"prompt": [[1, 450, 4996], [5, 6]], "max_tokens": 2}),
    ("/v1/completions", {"prompt": _PROMPT, "max_tokens": 2, "prompt_logprobs": 1}),
    ("/v1/completions", {"prompt": _PROMPT, "max_tokens": 2, "return_token_ids": True}),
    ("/v1/completions", {"prompt": _PROMPT, "max_tokens": 3, "stream": True,
                         "stream_options": {"include_usage": True}}),
    ("/v1/completions", {"prompt": _PROMPT, "max_tokens": 3, "logprobs": 1, "stream": True}),
    ("/v1/chat/completions", {"messages": _MESSAGES, "max_tokens": 4}),
    ("/v1/chat/completions", {"messages": _MESSAGES, "max_completion_tokens": 3, "n": 2,
                              "seed": 5}),
    ("/v1/chat/completions", {"messages": _MESSAGES, "max_tokens": 3, "logprobs": True,
                              "top_logprobs": 2}),
    ("/v1/chat/completions", {"messages": _MESSAGES, "max_tokens": 2, "return_token_ids": True}),
    ("/v1/chat/completions", {"messages": _MESSAGES, "max_tokens": 3, "stream": True,
                              "stream_options": {"include_usage": True,
                                                 "continuous_usage_stats": True}}),
    # a forced call is answered with "" content (auto ones' is null when they call)
    ("/v1/chat/completions", {"messages": _MESSAGES, "max_tokens": 60, "tools": _TOOLS,
                              "tool_choice": "required"}),
    ("/v1/chat/completions", {"messages": _MESSAGES, "max_tokens": 60, "tools": _TOOLS,
                              "tool_choice": {"type": "function", "function": {"name": "f"}}}),
    ("/v1/chat/completions", {"messages": _MESSAGES, "max_tokens": 60, "tools": _TOOLS,
                              "tool_choice": "required", "stream": True}),
    # refusals: the engine's (passed on) and the gateway's own (the same status and param)
    ("/v1/completions", {"prompt": _PROMPT, "max_tokens": 100000}),
    ("/v1/completions", {"prompt": "word " * 600, "max_tokens": 2}),
    ("/v1/completions", {"prompt": _PROMPT, "max_tokens": 2, "logprobs": 50}),
    ("/v1/completions", {"prompt": _PROMPT, "max_tokens": 2, "temperature": -1}),
    ("/v1/completions", {"prompt": _PROMPT, "max_tokens": 2, "stream_options": {}}),
    ("/v1/chat/completions", {"messages": _MESSAGES, "max_tokens": 2, "top_logprobs": 2}),
]  # fmt: skip
_KEPT = frozenset(
    {"object", "finish_reason", "index", "role", "prompt_tokens", "completion_tokens",
     "total_tokens", "cached_tokens", "param", "code"}
)  # fmt: skip
_DROPPED = frozenset({"system_fingerprint", "message", "type"})
"""Dropped: what differs by design (an error's wording and OpenAI-style ``type``) or by
build (the fingerprint)."""


def _shape(value: Any, key: str = "", *, event: bool = False) -> Any:
    """``value`` with every leaf replaced by its type's name (those under :data:`_KEPT`
    keys kept as they are) and null fields left out: the structure an answer has. In a
    stream's ``event`` a list is the set of its items' shapes: how many tokens one event
    carries is timing (vLLM joins the outputs of steps its API server has not yet sent
    when it runs behind, and the gateway may join what it reads at once)."""
    if isinstance(value, dict):
        return {k: _shape(v, k, event=event) for k, v in sorted(value.items())
                if v is not None and k not in _DROPPED}  # fmt: skip
    if isinstance(value, list):
        if key == "top_logprobs":  # a completion's are {token: logprob}: the tokens are data
            items = [len(v) if isinstance(v, dict) and "token" not in v
                     else _shape(v, event=event) for v in value]  # fmt: skip
        else:
            items = [_shape(v, event=event) for v in value]
        if event:
            return sorted({json.dumps(item, sort_keys=True) for item in items})
        return items
    return value if key in _KEPT else type(value).__name__


async def _answer_shape(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> Any:
    """The status and the shape of the answer to ``body`` at ``url``: a stream's is the set
    of its events' shapes (the gateway may split or join an engine's pieces in time)."""
    async with session.post(url, json={"model": MODEL, "temperature": 0, **body}) as resp:
        raw = (await resp.read()).decode()
    if resp.status != 200 or not body.get("stream"):
        return resp.status, _shape(json.loads(raw))
    data = [line.removeprefix("data: ") for line in raw.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]", raw[-300:]
    return resp.status, sorted({json.dumps(_shape(json.loads(d), event=True)) for d in data[:-1]})


async def test_answers_through_the_gateway_have_the_engines_shape(real: RealFleet) -> None:
    """Every field an engine answers with, and only those, reaches the client, whole or
    streamed, and refusals have the engine's status and param (the cached-token count had
    been written 0 where vLLM writes null details), whether the gateway asked the engine for
    a whole answer or streamed it and put the answer together (``engine_stream = "always"``;
    vLLM's streamed echo had brought the prompt's token ids in place of its logprobs)."""
    engine = real.fleet.instances[0]
    direct = f"http://{engine.host}:{engine.port}"
    configured = real.manager.engine_stream
    async with aiohttp.ClientSession() as session:
        for mode in (configured, "always"):
            real.manager.engine_stream = mode
            try:
                for path, body in _SAME_SHAPE:
                    want = await _answer_shape(session, direct + path, body)
                    got = await _answer_shape(session, real.url + path, body)
                    assert got == want, (mode, path, body)
            finally:
                real.manager.engine_stream = configured


async def test_engine_metrics_are_scraped_while_requests_run(real: RealFleet) -> None:
    before = [await real.manager.engine_stats(i) for i in real.ids]
    assert all(s.source == "vllm" and s.num_gpu_blocks and s.block_size for s in before)
    body = {"model": MODEL, "max_tokens": 160, "ignore_eos": True}
    tasks = [
        asyncio.create_task(_post(real, "/v1/completions", {**body, "prompt": f"load {i}"}))
        for i in range(8)
    ]
    busy = await asyncio.gather(
        *(_stats_until(real, i, lambda s: s.running > 0 and s.kv_usage > 0) for i in real.ids)
    )
    seen = {i: real.manager.get_instance_metrics(i) for i in real.ids}
    done = await asyncio.gather(*tasks)
    assert all(r["usage"]["completion_tokens"] == 160 for r in done)
    assert all(s.running > 0 and 0 < s.kv_usage <= 1 and s.waiting >= 0 for s in busy)
    assert all(m["engine_running"] is not None and m["kv_cache_usage"] is not None
               for m in seen.values())  # fmt: skip
    after = [await real.manager.engine_stats(i) for i in real.ids]
    generated = sum(a.generation_tokens_total - b.generation_tokens_total
                    for a, b in zip(after, before, strict=True))  # fmt: skip
    assert generated >= 8 * 160


async def test_repeated_prefix_hits_the_cache_on_the_warm_instance(real: RealFleet) -> None:
    body = {"model": MODEL, "prompt": LONG_PROMPT, "max_tokens": 4, "ignore_eos": True}
    first = await _post(real, "/v1/completions", body, rid="real-prefix-1")
    assert 2 * 128 < first["usage"]["prompt_tokens"] <= 512 - 4  # two full KV blocks
    warm = await _served_by(real, "real-prefix-1")
    hits = (await _stats_until(real, warm, lambda s: True)).prefix_cache_hits_total
    await _post(real, "/v1/completions", body, rid="real-prefix-2")
    assert await _served_by(real, "real-prefix-2") == warm
    after = await _stats_until(real, warm, lambda s: s.prefix_cache_hits_total > hits)
    assert after.prefix_cache_hits_total > hits
    assert after.prefix_cache_queries_total > 0
    # under a cache_salt the same prompt shares no block (why the control plane salts the
    # prompt's block hashes too): sent straight to the warm engine, it hits nothing
    engine = next(i for i in real.fleet.instances if i.instance_id == warm)
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"http://{engine.host}:{engine.port}/v1/completions",
                     json={**body, "cache_salt": "tenant-b"}) as resp,
    ):  # fmt: skip
        assert resp.status == 200, await resp.text()
    salted = await _stats_until(
        real, warm, lambda s: s.prefix_cache_queries_total > after.prefix_cache_queries_total
    )
    assert salted.prefix_cache_queries_total > after.prefix_cache_queries_total
    assert salted.prefix_cache_hits_total == after.prefix_cache_hits_total


async def test_requests_complete_on_the_survivor_after_an_engine_is_killed(
    real: RealFleet,
) -> None:
    victim, survivor = real.fleet.processes
    os.killpg(victim.pid, signal.SIGKILL)
    await victim.process.wait()
    dead, alive = victim.launch.instance_id, survivor.launch.instance_id
    body = {"model": MODEL, "max_tokens": 6, "ignore_eos": True}
    rids = [f"real-failover-{i}" for i in range(6)]
    results = await asyncio.gather(
        *(_post(real, "/v1/completions", {**body, "prompt": f"after {r}"}, r) for r in rids)
    )
    assert all(r["usage"]["completion_tokens"] == 6 for r in results)
    assert [await _served_by(real, r) for r in rids] == [alive] * len(rids)
    for _ in range(200):  # the health loop probes every 0.5 s
        if not real.manager.get_instance_metrics(dead)["is_healthy"]:
            break
        await asyncio.sleep(0.1)
    assert real.manager.get_instance_metrics(dead)["is_healthy"] is False
    last = await _post(real, "/v1/completions", {**body, "prompt": "still served"}, "real-last")
    assert last["usage"]["completion_tokens"] == 6
    assert await _served_by(real, "real-last") == alive
