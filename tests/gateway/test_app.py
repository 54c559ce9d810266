"""The gateway app end to end: the official openai client, probes, models, pass-through."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from multidict import CIMultiDict

from sage_llm.config import GatewayConfig, TenantConfig
from sage_llm.control_plane.manager import ControlPlaneManager
from sage_llm.control_plane.scheduling.fair import FairSharePolicy
from sage_llm.gateway.server import start_gateway
from sage_llm.tokens import count_tokens
from sage_llm.types import ExecutionInstanceType, RequestPriority
from tests.engines.fake_engine import probed_app, start_app
from tests.factories import MODEL, make_instance
from tests.gateway.harness import FAST, chat_body, completion_body, read_events, serve


def _client(base_url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)


async def test_async_openai_client_completions_and_chat() -> None:
    async with serve(2) as gw, _client(gw.base_url) as client:
        comp = await client.completions.create(
            model=MODEL, prompt="What is a control plane?", max_tokens=8
        )
        assert comp.object == "text_completion"
        assert comp.id.startswith("cmpl-")
        assert comp.model == MODEL
        assert comp.choices[0].finish_reason == "length"
        assert count_tokens(comp.choices[0].text) == 8
        assert comp.usage is not None
        assert comp.usage.completion_tokens == 8
        assert comp.usage.prompt_tokens == count_tokens("What is a control plane?")
        assert comp.usage.total_tokens == comp.usage.prompt_tokens + 8

        chat = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi there"}], max_tokens=6
        )
        assert chat.object == "chat.completion"
        assert chat.id.startswith("chatcmpl-")
        assert chat.choices[0].message.role == "assistant"
        assert count_tokens(chat.choices[0].message.content or "") == 6
        assert chat.usage is not None and chat.usage.completion_tokens == 6
        details = chat.usage.prompt_tokens_details
        assert details is not None and details.cached_tokens is not None


async def test_async_openai_client_streams_with_usage_chunk() -> None:
    async with serve(1) as gw, _client(gw.base_url) as client:
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Stream please"}],
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert count_tokens(text) == 8
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
        assert finishes[-1] == "length"
        assert all(f is None for f in finishes[:-1])
        assert chunks[-1].choices == []
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
        assert all(c.usage is None for c in chunks[:-1])

        comp_stream = await client.completions.create(
            model=MODEL, prompt="Count to five", max_tokens=5, stream=True
        )
        comp_chunks = [c async for c in comp_stream]
        assert all(c.usage is None for c in comp_chunks)  # no include_usage: no usage chunk
        assert count_tokens("".join(c.choices[0].text for c in comp_chunks)) == 5


async def test_sync_openai_client_in_a_thread() -> None:
    async with serve(1) as gw:
        base = gw.base_url + "/v1"

        def run() -> tuple[str, str, int]:
            with openai.OpenAI(base_url=base, api_key="unused", max_retries=0) as client:
                comp = client.completions.create(model=MODEL, prompt="Sync call", max_tokens=4)
                stream = client.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": "Sync stream"}],
                    max_tokens=4,
                    stream=True,
                )
                text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
                return comp.choices[0].text, text, comp.usage.completion_tokens if comp.usage else 0

        comp_text, chat_text, tokens = await asyncio.to_thread(run)
        assert count_tokens(comp_text) == 4
        assert count_tokens(chat_text) == 4
        assert tokens == 4


async def test_n_choices_are_rebuilt_by_index() -> None:
    """``n`` reaches the engine, whose samples (the simulated engine's own: it had answered
    400, and these tests' probe had run them one after the other) the gateway rebuilds by
    index, whole and streamed, with the usage of them all."""
    async with serve(1) as gw, _client(gw.base_url) as client:
        comp = await client.completions.create(model=MODEL, prompt="Two ways", max_tokens=5, n=2)
        assert [c.index for c in comp.choices] == [0, 1]
        assert all(count_tokens(c.text) == 5 for c in comp.choices)
        assert comp.choices[0].text != comp.choices[1].text
        assert comp.usage is not None and comp.usage.completion_tokens == 10
        assert comp.usage.prompt_tokens == count_tokens("Two ways")
        (engine_req,) = gw.probes["sim-0"].requests
        assert engine_req.extra["n"] == 2

        stream = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Two answers"}],
            max_tokens=4,
            n=2,
            stream=True,
            stream_options={"include_usage": True},
        )
        texts: dict[int, str] = {0: "", 1: ""}
        roles: list[int] = []
        finished: list[int] = []
        usage = None
        async for chunk in stream:
            usage = chunk.usage or usage
            for choice in chunk.choices:
                if choice.delta.role == "assistant":
                    roles.append(choice.index)
                texts[choice.index] += choice.delta.content or ""
                if choice.finish_reason:
                    finished.append(choice.index)
        assert roles == [0, 1]
        assert finished == [0, 1]
        assert all(count_tokens(t) == 4 for t in texts.values())
        assert usage is not None and usage.completion_tokens == 8


async def test_several_prompts_in_one_completions_request_are_answered_as_vllm_does() -> None:
    """One request per prompt, answered as one: prompt k's choice i is choice k·n + i, the
    usage is the sum, whole or streamed (the usage chunk once, at the end)."""
    async with serve(2) as gw, _client(gw.base_url) as client:
        prompts = ["The first prompt", "A second, longer prompt than the first"]
        comp = await client.completions.create(
            model=MODEL, prompt=prompts, max_tokens=3, n=2, extra_headers={"x-request-id": "b"}
        )
        assert comp.id == "cmpl-b"
        assert [c.index for c in comp.choices] == [0, 1, 2, 3]
        assert all(count_tokens(c.text) == 3 for c in comp.choices)
        assert comp.usage is not None and comp.usage.completion_tokens == 12
        assert comp.usage.prompt_tokens == sum(count_tokens(p) for p in prompts)
        sent = sorted(r.request_id for p in gw.probes.values() for r in p.requests)
        assert sent == ["b#0", "b#1"]
        ids = await client.completions.create(model=MODEL, prompt=[[1, 2, 3], [4, 5]], max_tokens=2)
        assert [c.index for c in ids.choices] == [0, 1]
        assert ids.usage is not None and ids.usage.prompt_tokens == 5

        stream = await client.completions.create(
            model=MODEL, prompt=prompts, max_tokens=4, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        texts: dict[int, str] = {}
        finished: list[int] = []
        usages = []
        async for chunk in stream:
            if chunk.usage is not None:
                usages.append(chunk.usage)
            for choice in chunk.choices:
                texts[choice.index] = texts.get(choice.index, "") + choice.text
                if choice.finish_reason:
                    finished.append(choice.index)
        assert sorted(finished) == [0, 1]
        assert all(count_tokens(t) == 4 for t in texts.values())
        assert len(usages) == 1 and usages[0].completion_tokens == 8
        assert usages[0].prompt_tokens == comp.usage.prompt_tokens
        assert not gw.manager._require_dispatcher().records  # every request ended


async def test_a_request_with_several_prompts_holds_its_own_id() -> None:
    """While a request with several prompts runs (as ``dup-0``, ``dup-1``), a request with
    its id is a 409, whole or streamed, either way round."""
    async with serve(1, speed=0.5) as gw, aiohttp.ClientSession() as http:
        url, headers = gw.url("/v1/completions"), {"x-request-id": "dup"}
        records = gw.manager._require_dispatcher().records
        several = {**completion_body(max_tokens=16), "prompt": ["one", "two"]}

        async def post(body: dict[str, object]) -> int:
            async with http.post(url, json=body, headers=headers) as r:
                answer = await r.read()
                if r.status == 409:
                    assert r.headers["x-should-retry"] == "false"
                    # the id came from the header: that is what the client should change
                    assert json.loads(answer)["error"]["param"] == "x-request-id"
                return r.status

        for first, second in ((several, completion_body()), (completion_body(), several)):
            for stream in (False, True):
                running = asyncio.ensure_future(post({**first, "stream": stream}))
                for _ in range(1000):  # until the first is in the control plane
                    if any(rid.startswith("dup") for rid in records):
                        break
                    await asyncio.sleep(0.005)
                assert await post({**second, "stream": stream}) == 409
                assert await running == 200
        assert await post(several) == 200  # free again once it has ended


async def test_one_refused_prompt_fails_the_request_and_cancels_the_others() -> None:
    settings = GatewayConfig(max_prompt_tokens=40_000)  # the engine refuses it, not us
    async with serve(1, settings=settings) as gw, aiohttp.ClientSession() as http:
        # the second is longer than the simulated model's context (Llama-3-8B's 8,192 tokens)
        body = {**completion_body(max_tokens=4), "prompt": ["short", "word " * 33_000]}
        for stream in (False, True):
            async with http.post(gw.url("/v1/completions"), json={**body, "stream": stream}) as r:
                assert r.status == 400
                error = (await r.json())["error"]
                assert (
                    error["param"] == "input_tokens" and "rejected the request" in error["message"]
                )
        records = gw.manager._require_dispatcher().records
        for _ in range(500):  # the other prompt's cancellation ends (5 s at most, real time)
            if not records:
                break
            await asyncio.sleep(0.01)
        assert not records


async def test_a_stop_string_is_the_choices_stop_reason_in_process_too() -> None:
    """The built-in fleet (simulated engines in the gateway's process) reports the stop
    string that ended a choice, whole or streamed, as engine-sim and vLLM do over HTTP."""
    async with serve(1) as gw, aiohttp.ClientSession() as http:
        url, same = gw.url("/v1/completions"), {"x-request-id": "same"}  # the same text
        async with http.post(url, json=completion_body(max_tokens=12), headers=same) as r:
            word = " " + (await r.json())["choices"][0]["text"].split()[4]
        body = completion_body(max_tokens=12, stop=[word])
        async with http.post(url, json=body, headers=same) as r:
            (choice,) = (await r.json())["choices"]
        assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", word)
        async with http.post(url, json={**body, "stream": True}, headers=same) as r:
            events = [e for e in await read_events(r) if isinstance(e, dict) and e["choices"]]
        last = events[-1]["choices"][0]
        assert (last["finish_reason"], last["stop_reason"]) == ("stop", word)


async def test_stop_sequences_reach_the_engine() -> None:
    async with serve(1) as gw, aiohttp.ClientSession() as http:
        body = completion_body(max_tokens=16, stop=["zzz-never"], logprobs=2)
        async with http.post(gw.url("/v1/completions"), json=body) as resp:
            assert resp.status == 200
        (req,) = gw.probes["sim-0"].requests
        assert list(req.stop) == ["zzz-never"]
        assert req.extra["logprobs"] == 2


async def test_echo_with_max_tokens_0_answers_the_prompt_alone() -> None:
    # what lm-eval's log-likelihood requests send, as vLLM answers them: the prompt and its
    # logprobs, the engine asked for 0 tokens
    async with serve(1) as gw, aiohttp.ClientSession() as http:
        body = completion_body(max_tokens=0, echo=True, logprobs=1)
        async with http.post(gw.url("/v1/completions"), json=body) as resp:
            assert resp.status == 200, await resp.text()
            (choice,) = (await resp.json())["choices"]
        assert choice["text"] == body["prompt"] and choice["finish_reason"] == "length"
        assert "".join(choice["logprobs"]["tokens"]) == body["prompt"]
        (req,) = gw.probes["sim-0"].requests
        assert req.max_tokens == 0 and req.extra["echo"] is True
        async with http.post(gw.url("/v1/completions"), json={**body, "stream": True}) as resp:
            events = [e for e in await read_events(resp) if isinstance(e, dict)]
        assert "".join(e["choices"][0]["text"] for e in events) == body["prompt"]
        async with http.post(gw.url("/v1/completions"), json={**body, "echo": False}) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["param"] == "max_tokens"


async def test_unknown_fields_reach_the_engine_unchanged_and_sage_fields_do_not() -> None:
    extra = {"foo": {"bar": [1, 2, {"baz": None}]}, "seed": 7, "min_tokens": 2}
    async with serve(1) as gw, aiohttp.ClientSession() as http:
        body = chat_body(priority="high", slo_deadline_ms=60_000, user="alice", **extra)
        async with http.post(gw.url("/v1/chat/completions"), json=body) as resp:
            assert resp.status == 200
        (req,) = gw.probes["sim-0"].requests
        assert dict(req.extra) == {**extra, "user": "alice"}  # user too, as the engine takes it
        assert req.priority == 1
        assert req.messages == body["messages"]
        assert req.max_tokens == 8


async def test_max_completion_tokens_wins_over_max_tokens_on_the_engine_too() -> None:
    async with serve(1) as gw, aiohttp.ClientSession() as http:
        body = chat_body(max_tokens=50, max_completion_tokens=3, ignore_eos=True)
        async with http.post(gw.url("/v1/chat/completions"), json=body) as resp:
            assert resp.status == 200
            usage = (await resp.json())["usage"]
        assert 1 <= usage["completion_tokens"] <= 3
        (req,) = gw.probes["sim-0"].requests
        # the engine gets the one budget the control plane accounted, as max_tokens
        assert req.max_tokens == 3
        assert "max_tokens" not in req.extra and "max_completion_tokens" not in req.extra


PRIORITY_CASES = [
    ({}, None, 2),
    ({}, "high", 1),
    ({}, 4, 4),
    ({"x-sage-priority": "critical"}, "low", 0),
    ({"x-sage-priority": "3"}, None, 3),
]


async def test_priority_from_headers_wins_over_body() -> None:
    async with serve(1) as gw, aiohttp.ClientSession() as http:
        for headers, body_priority, _ in PRIORITY_CASES:
            body = completion_body()
            if body_priority is not None:
                body["priority"] = body_priority
            async with http.post(gw.url("/v1/completions"), json=body, headers=headers) as resp:
                assert resp.status == 200
        requests = gw.probes["sim-0"].requests
        assert [r.priority for r in requests] == [case[2] for case in PRIORITY_CASES]
        assert all("priority" not in r.extra for r in requests)


async def test_compressed_bodies_and_repeated_headers_read_alike_on_both_fronts() -> None:
    """The lean front hands a gzip body to aiohttp, which inflates it, and reads a repeated
    header's first value, as aiohttp does (a query string sends the request to aiohttp)."""
    body = json.dumps(completion_body()).encode()
    async with serve(1) as gw, aiohttp.ClientSession(auto_decompress=False) as http:
        for path in ("/v1/completions", "/v1/completions?via=aiohttp"):
            async with http.post(
                gw.url(path),
                data=gzip.compress(body),
                headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
            ) as resp:
                assert resp.status == 200, await resp.text()
            headers = CIMultiDict([("x-sage-priority", "high"), ("x-sage-priority", "bogus")])
            async with http.post(gw.url(path), json=completion_body(), headers=headers) as resp:
                assert resp.status == 200, await resp.text()
        priorities = [r.priority for r in gw.probes["sim-0"].requests]
        assert priorities[1::2] == [RequestPriority.HIGH] * 2


async def test_slo_and_session_from_headers_and_body() -> None:
    async with serve(1) as gw, aiohttp.ClientSession() as http:
        headers = {"x-request-id": "slo-header", "x-sage-slo-ms": "60000", "x-session-id": "s1"}
        async with http.post(gw.url("/v1/completions"), json=completion_body(), headers=headers):
            pass
        async with http.post(
            gw.url("/v1/completions"),
            json=completion_body(slo_deadline_ms=50_000, user="bob"),
            headers={"x-request-id": "slo-body"},
        ):
            pass
        async with http.post(
            gw.url("/v1/completions"), json=completion_body(), headers={"x-request-id": "no-slo"}
        ):
            pass
        with_header = await gw.manager.wait_for_result("slo-header")
        with_body = await gw.manager.wait_for_result("slo-body")
        without = await gw.manager.wait_for_result("no-slo")
        assert with_header.slo_met is True
        assert with_body.slo_met is True
        assert without.slo_met is None
        assert all("slo_deadline_ms" not in r.extra for r in gw.probes["sim-0"].requests)


async def test_a_cost_budget_from_the_body_or_the_header_reaches_the_policy() -> None:
    """``cost_budget`` (body) and ``x-sage-cost-budget`` (header, which wins) are the
    cost_optimized policy's budget; neither reaches the engine."""
    async with serve(1) as gw, aiohttp.ClientSession() as http:
        gw.manager.update_policy("cost_optimized", {"over_budget_action": "reject"})
        tiny: dict[str, Any] = {"cost_budget": 1e-12}
        ample: dict[str, Any] = {"cost_budget": 1e6}
        cases = [
            (tiny, {}, 429),
            ({}, {"x-sage-cost-budget": "1e-12"}, 429),
            (tiny, {"x-sage-cost-budget": "1e6"}, 200),  # the header wins
            (ample, {}, 200),
        ]
        for fields, headers, status in cases:
            body = completion_body(**fields)
            async with http.post(gw.url("/v1/completions"), json=body, headers=headers) as r:
                answer = await r.json()
                assert r.status == status, answer
                if status == 429:  # refused again a second later: no retry is invited
                    assert "over budget" in answer["error"]["message"]
                    assert "Retry-After" not in r.headers
                    assert r.headers["x-should-retry"] == "false"
        for bad in ("cheap", "-1", "nan"):
            headers = {"x-sage-cost-budget": bad}
            async with http.post(
                gw.url("/v1/completions"), json=completion_body(), headers=headers
            ) as r:
                error = (await r.json())["error"]
                assert (r.status, error["param"]) == (400, "x-sage-cost-budget")
        body = completion_body(cost_budget=-1)
        async with http.post(gw.url("/v1/completions"), json=body) as r:
            assert (r.status, (await r.json())["error"]["param"]) == (400, "cost_budget")
        assert all("cost_budget" not in r.extra for r in gw.probes["sim-0"].requests)


@pytest.mark.parametrize(("policy", "light_starts"), [("fair", 2), ("fifo", 5)])
async def test_the_user_from_the_header_or_the_body_is_the_fair_policys(
    policy: str, light_starts: int
) -> None:
    """One engine slot, held by a heavy user's first request while four more of its
    requests queue (user from ``x-sage-user``), then a light user's one (user from the
    body): ``fair`` starts it after one more heavy request, ``fifo`` after all of them."""
    async with (
        serve(1, bound=1, scheduling_policy=policy, hold=lambda rid: rid == "heavy0") as gw,
        aiohttp.ClientSession() as http,
    ):

        async def send(rid: str, headers: dict[str, str], **fields: Any) -> int:
            async with http.post(
                gw.url("/v1/completions"),
                json=completion_body(**fields),
                headers={"x-request-id": rid, **headers},
            ) as r:
                await r.read()
                return r.status

        probe = gw.probes["sim-0"]
        tasks = [asyncio.create_task(send("heavy0", {"x-sage-user": "heavy"}))]
        await asyncio.wait_for(probe.started_event.wait(), 5)

        async def queued(n: int) -> None:  # (arrival order: each one queued before the next)
            while len(gw.manager.policy) < n:  # noqa: ASYNC110 - no event says it
                await asyncio.sleep(0.001)

        for n in range(1, 5):
            tasks.append(asyncio.create_task(send(f"heavy{n}", {"x-sage-user": "heavy"})))
            await asyncio.wait_for(queued(n), 5)
        tasks.append(asyncio.create_task(send("light", {}, user="light")))
        await asyncio.wait_for(queued(5), 5)
        probe.gate.set()
        assert await asyncio.gather(*tasks) == [200] * 6
        order = [r.request_id for r in probe.requests]
        assert order.index("light") == light_starts, order
        if policy == "fair":
            state = gw.manager.get_status()["policy"]["state"]
            assert state["users"] == 2


@pytest.mark.parametrize("lean", [True, False])
async def test_a_tenants_key_makes_its_requests_that_users_whatever_they_say(lean: bool) -> None:
    """``[[gateway.tenants]]``: a request with a tenant's key is its user's (``x-sage-user``
    and the body's ``user`` notwithstanding); with a plain API key the header or the body
    names the user; the engine gets the body's ``user`` as sent either way."""
    tenants = (TenantConfig("team-a", api_key="sk-a"),)
    settings = GatewayConfig(api_keys=("plain",), tenants=tenants, lean_server=lean)
    async with (
        serve(1, settings=settings, scheduling_policy="fair") as gw,
        aiohttp.ClientSession() as http,
    ):

        async def send(key: str, headers: dict[str, str], **fields: Any) -> int:
            async with http.post(
                gw.url("/v1/completions"),
                json=completion_body(**fields),
                headers={"Authorization": f"Bearer {key}", **headers},
            ) as r:
                await r.read()
                return r.status

        assert await send("sk-a", {"x-sage-user": "someone"}, user="else") == 200
        assert await send("sk-a", {}, stream=True) == 200
        assert await send("plain", {"x-sage-user": "proxy-said"}) == 200
        assert await send("plain", {}, user="body-said") == 200
        assert await send("sk-b", {}) == 401
        assert await send("plain", {"x-sage-user": "team-a"}) == 403  # a tenant's user
        assert await send("plain", {}, user="team-a", stream=True) == 403
        policy = gw.manager.policy
        assert isinstance(policy, FairSharePolicy)
        assert set(policy.counters()) == {"team-a", "proxy-said", "body-said"}
        assert gw.probes["sim-0"].requests[0].extra.get("user") == "else"
        async with _client(gw.base_url) as client:  # the openai client sends its key so
            client.api_key = "sk-a"
            await client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, user="x")
        assert set(policy.counters()) == {"team-a", "proxy-said", "body-said"}
        async with http.get(gw.url("/metrics")) as r:  # a tenant has series of its own
            exposition = await r.text()
        assert 'sage_llm_user_requests_total{status="completed",user="team-a"} 3.0' in exposition
        assert 'sage_llm_user_requests_total{status="completed",user="(other)"} 2.0' in exposition


async def test_request_id_is_honoured_and_echoed() -> None:
    async with serve(1) as gw, aiohttp.ClientSession() as http:
        headers = {"x-request-id": "my-request-1"}
        async with http.post(
            gw.url("/v1/completions"), json=completion_body(), headers=headers
        ) as r:
            assert r.headers["x-request-id"] == "my-request-1"
            assert (await r.json())["id"] == "cmpl-my-request-1"
        body = completion_body(stream=True)
        headers = {"x-request-id": "my-stream-1"}
        async with http.post(gw.url("/v1/completions"), json=body, headers=headers) as r:
            assert r.headers["x-request-id"] == "my-stream-1"
            assert r.headers["content-type"].startswith("text/event-stream")
            events = await read_events(r)
        assert events[-1] == "[DONE]"
        assert all(e["id"] == "cmpl-my-stream-1" for e in events[:-1])
        async with http.post(gw.url("/v1/completions"), json=completion_body()) as r:
            generated = r.headers["x-request-id"]
            assert (await r.json())["id"] == f"cmpl-{generated}"
        assert [q.request_id for q in gw.probes["sim-0"].requests][:2] == [
            "my-request-1",
            "my-stream-1",
        ]


async def test_embeddings() -> None:
    async with serve(1) as gw, _client(gw.base_url) as client:
        one = await client.embeddings.create(model=MODEL, input="hello world")
        many = await client.embeddings.create(model=MODEL, input=["a b", "c d e"])
        assert len(one.data) == 1 and len(one.data[0].embedding) == 8
        assert [d.index for d in many.data] == [0, 1]
        assert one.model == MODEL
        # token ids, as LangChain sends them; the request's options reach the engine
        ids = await client.embeddings.create(model=MODEL, input=[5, 6, 7], dimensions=8)
        probe = next(iter(gw.probes.values()))
        # the client asks for base64 by default (and reads floats too)
        assert probe.embed_options == {"dimensions": 8, "encoding_format": "base64"}
        batch = await client.embeddings.create(model=MODEL, input=[[5, 6], [7]])
        assert len(ids.data) == 1 and [d.index for d in batch.data] == [0, 1]
        # sage-llm's own fields are not the engine's
        extra = {"priority": "high", "slo_deadline_ms": 500}
        await client.embeddings.create(model=MODEL, input="x", extra_body=extra)
        assert probe.embed_options == {"encoding_format": "base64"}
        # the request's id reaches the engine as a generation request's does
        named = {"X-Request-Id": "emb-1"}
        await client.embeddings.create(model=MODEL, input="x", extra_headers=named)
        assert probe.embed_request_id == "emb-1"
        async with aiohttp.ClientSession() as http:
            body = {"model": MODEL, "input": [{"text": "no"}]}
            async with http.post(gw.url("/v1/embeddings"), json=body) as r:
                error = (await r.json())["error"]
        assert r.status == 400 and error["param"] == "input"
        assert "a list of token ids or a list of token-id lists" in error["message"]
        async with aiohttp.ClientSession() as http:  # vLLM's chat form: not taken, and said
            body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
            async with http.post(gw.url("/v1/embeddings"), json=body) as r:
                error = (await r.json())["error"]
        assert r.status == 400 and error["param"] == "messages"
        assert error["message"].startswith("messages: chat-form embeddings are not supported")


async def test_models_are_aggregated_over_the_fleet() -> None:
    fleet = [
        make_instance("a-0", model_name="model-a", metadata={"sim_speed": FAST}),
        make_instance("a-1", port=8001, model_name="model-a", metadata={"sim_speed": FAST}),
        make_instance("b-0", port=8002, model_name="org/model-b", metadata={"sim_speed": FAST}),
    ]
    async with serve(fleet) as gw, _client(gw.base_url) as client:
        models = await client.models.list()
        ids = [m.id for m in models.data]
        assert ids == ["model-a", "org/model-b"]
        assert all(m.owned_by == "sage-llm" for m in models.data)
        async with aiohttp.ClientSession() as http:
            async with http.get(gw.url("/v1/models")) as r:
                data = (await r.json())["data"]
            assert data[0]["sage"] == {"instances": ["a-0", "a-1"], "healthy_instances": 2}
            # as vLLM's cards: the simulated engines' context length (Llama-3-8B's 8192)
            assert [(d["max_model_len"], d["permission"]) for d in data] == [(8192, [])] * 2
            async with http.get(gw.url("/v1/models/org/model-b")) as r:
                assert r.status == 200
                assert (await r.json())["sage"]["instances"] == ["b-0"]
            async with http.get(gw.url("/v1/models/nope")) as r:
                assert r.status == 404
                assert (await r.json())["error"]["param"] == "model"


async def test_lora_adapters_are_listed_and_served_by_name() -> None:
    """An adapter has its own card (``parent``: its model, as vLLM's), and a request that
    names it is answered under its name by an instance serving it."""
    fleet = [
        make_instance("a-0", metadata={"sim_speed": FAST}),
        make_instance("a-1", port=8001, lora_adapters=["sql"], metadata={"sim_speed": FAST}),
    ]
    async with serve(fleet) as gw, _client(gw.base_url) as client:
        models = await client.models.list()
        assert [(m.id, (m.model_extra or {})["parent"]) for m in models.data] == [
            (MODEL, None),
            ("sql", MODEL),
        ]
        for _ in range(3):
            done = await client.completions.create(model="sql", prompt="hi", max_tokens=2)
            assert done.model == "sql"
        for model, extra in [(f"{MODEL}:sql", None), (MODEL, {"lora_path": "sql"})]:  # SGLang's
            done = await client.completions.create(
                model=model, prompt="hi", max_tokens=2, extra_body=extra
            )
            assert done.model == model  # the name the client gave
        counted = (
            f'sage_llm_lora_requests_total{{adapter="sql",model="{MODEL}",status="completed"}} 5.0'
        )
        assert counted in gw.manager.prometheus_metrics().decode()
        async with aiohttp.ClientSession() as http:
            async with http.get(gw.url("/v1/models/sql")) as r:
                card = await r.json()
            assert card["sage"] == {"instances": ["a-1"], "healthy_instances": 1}
            assert card["root"] == "sql" and card["max_model_len"] == 8192
            async with http.get(gw.url("/admin/instances")) as r:
                listed = {i["instance_id"]: i["lora_adapters"] for i in (await r.json())["data"]}
            assert listed == {"a-0": [], "a-1": ["sql"]}
            spec = {"instance_id": "a-2", "host": "sim", "port": 8002, "model_name": MODEL,
                    "engine": "sim", "metadata": {"sim_speed": FAST}}  # fmt: skip
            async with http.post(
                gw.url("/admin/instances"), json={**spec, "lora_adapters": [MODEL]}
            ) as r:
                error = (await r.json())["error"]
            assert r.status == 400 and error["param"] == "lora_adapters", error
            async with http.post(
                gw.url("/admin/instances"), json={**spec, "lora_adapters": ["chat"]}
            ) as r:
                assert r.status in (200, 201), await r.text()
        chat = await client.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        assert chat.model == "chat"


async def test_health_ready_and_metrics() -> None:
    async with serve(1) as gw, aiohttp.ClientSession() as http:
        async with http.get(gw.url("/health")) as r:
            assert r.status == 200
            assert await r.json() == {"status": "ok"}
        async with http.get(gw.url("/ready")) as r:
            assert r.status == 200
            assert (await r.json())["healthy_instances"] == 1
        async with http.post(gw.url("/v1/completions"), json=completion_body()) as r:
            assert r.status == 200
        async with http.get(gw.url("/metrics")) as r:
            assert r.status == 200
            assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
            text = await r.text()
        assert 'sage_llm_requests_total{instance_id="sim-0",model="llama-3-8b"' in text
        gw.manager.drain_instance("sim-0")
        async with http.get(gw.url("/ready")) as r:
            assert r.status == 503
            assert (await r.json())["error"]["type"] == "service_unavailable"
        async with http.get(gw.url("/health")) as r:
            assert r.status == 200
        await gw.manager.stop()
        async with http.get(gw.url("/health")) as r:
            assert r.status == 503
        async with http.get(gw.url("/ready")) as r:
            assert r.status == 503


async def test_sampling_fields_the_client_left_out_are_left_to_the_engine() -> None:
    async with serve(1) as gw, aiohttp.ClientSession() as s:
        for extra in ({}, {"temperature": 0.2, "top_p": 0.5}):
            body = chat_body(**extra)
            async with s.post(gw.url("/v1/chat/completions"), json=body) as r:
                assert r.status == 200
        unset, given = gw.probes["sim-0"].requests
        assert (unset.temperature, unset.top_p) == (None, None)  # not sent to the engine
        assert (given.temperature, given.top_p) == (0.2, 0.5)


@contextlib.asynccontextmanager
async def _gateway_over(app: web.Application) -> AsyncIterator[str]:
    """A gateway (its base URL) over one HTTP instance served by ``app``."""
    runner, engine_port = await start_app(app)
    manager = ControlPlaneManager(mode="http")
    manager.register_instance(make_instance("e0", port=engine_port))
    site, port = await start_gateway(manager, None, manage_lifecycle=True, environ={})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await site.cleanup()
        await runner.cleanup()


async def test_embeddings_on_an_engine_without_them_are_a_400_not_a_retried_502() -> None:
    # no /v1/embeddings: a 404
    async with _gateway_over(probed_app()) as base, aiohttp.ClientSession() as http:
        body = {"model": MODEL, "input": "hi"}
        async with http.post(f"{base}/v1/embeddings", json=body) as r:
            error = (await r.json())["error"]
            assert (r.status, error["param"]) == (400, "model")
    assert "supports embeddings" in error["message"]


async def test_embeddings_carry_the_request_id_and_answer_valid_json() -> None:
    """The engine gets the client's x-request-id, as a generation's engine does; a NaN in
    the engine's vector is answered as valid JSON (null), not as a body JSON refuses."""
    seen: list[str | None] = []

    async def embeddings(request: web.Request) -> web.Response:
        seen.append(request.headers.get("X-Request-Id"))
        text = '{"object": "list", "data": [{"index": 0, "embedding": [0.5, NaN]}]}'
        return web.Response(text=text, content_type="application/json")

    app = probed_app()
    app.router.add_post("/v1/embeddings", embeddings)
    async with _gateway_over(app) as base, aiohttp.ClientSession() as http:
        body = {"model": MODEL, "input": "hi"}
        headers = {"x-request-id": "emb-rid-1"}
        async with http.post(f"{base}/v1/embeddings", json=body, headers=headers) as r:
            assert r.status == 200
            answer = json.loads(await r.text())
    assert answer["data"][0]["embedding"] == [0.5, None]
    assert seen == ["emb-rid-1"]


@pytest.mark.parametrize("lean_server", [True, False])
async def test_a_body_of_max_body_bytes_is_served_and_one_byte_more_is_413_on_either_front(
    lean_server: bool,
) -> None:
    """``max_body_bytes``: larger bodies get 413 (docs/gateway.md), aiohttp's front as the
    lean one's."""
    body = json.dumps(completion_body()).encode()
    limit = len(body) + 64
    exact = body + b" " * (limit - len(body))  # JSON whitespace up to the limit
    settings = GatewayConfig(max_body_bytes=limit, lean_server=lean_server)
    headers = {"Content-Type": "application/json"}
    async with serve(1, settings=settings) as gw, aiohttp.ClientSession() as http:
        async with http.post(gw.url("/v1/completions"), data=exact, headers=headers) as r:
            assert r.status == 200, await r.text()
        async with http.post(gw.url("/v1/completions"), data=exact + b" ", headers=headers) as r:
            assert r.status == 413
            error = (await r.json())["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", 413)


async def test_several_prompts_answered_whole_on_aiohttps_front() -> None:
    """``lean_server = false``: aiohttp's front answers several prompts as one, as the
    lean front does (prompt k's choice is choice k, the usage is the sum)."""
    prompts = ["The first prompt", "A second, longer prompt than the first"]
    body = {"model": MODEL, "prompt": prompts, "max_tokens": 3}
    settings = GatewayConfig(lean_server=False)
    async with serve(2, settings=settings) as gw, aiohttp.ClientSession() as s:
        r = await s.post(gw.url("/v1/completions"), json=body)
        assert r.status == 200, await r.text()
        comp = await r.json()
    assert [c["index"] for c in comp["choices"]] == [0, 1]
    assert all(count_tokens(c["text"]) == 3 for c in comp["choices"])
    assert comp["usage"]["completion_tokens"] == 6
    assert comp["usage"]["prompt_tokens"] == sum(count_tokens(p) for p in prompts)


async def test_an_embeddings_request_past_the_request_timeout_is_a_504() -> None:
    never = asyncio.Event()

    async def stuck(*_args: Any, **_kwargs: Any) -> dict[str, Any]:
        await never.wait()
        raise AssertionError("unreachable")

    settings = GatewayConfig(request_timeout_s=0.05)
    async with serve(1, settings=settings) as gw, aiohttp.ClientSession() as s:
        gw.probes["sim-0"].embed = stuck  # type: ignore[method-assign]
        body = {"model": MODEL, "input": "hello"}
        async with asyncio.timeout(10), s.post(gw.url("/v1/embeddings"), json=body) as r:
            assert r.status == 504
            error = (await r.json())["error"]
    assert error["message"] == "embeddings did not finish within 0.05 s"


async def test_ready_is_503_while_no_model_has_an_instance_that_can_run_a_request() -> None:
    """A prefill instance alone is healthy, but no request can run on it (no decode
    instance to pair it with)."""
    prefill = make_instance("p0", instance_type=ExecutionInstanceType.PREFILLING)
    async with serve([prefill]) as gw, aiohttp.ClientSession() as s:
        r = await s.get(gw.url("/ready"))
        assert r.status == 503
        error = (await r.json())["error"]
    assert error["type"] == "service_unavailable"
    assert error["message"].startswith("no model can run a request: none has an instance")
