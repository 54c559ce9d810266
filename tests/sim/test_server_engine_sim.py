"""engine-sim end to end: the simulated engine (and its fault injector) behind the HTTP
server, answering what a vLLM server answers.

The engines run fast (``speed=100``: steps of about 0.1 ms), so these tests take real time
but little of it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import openai
import pytest

from sage_llm import tokens
from sage_llm.engines.base import EngineClient
from sage_llm.engines.metrics_scrape import parse_prometheus_text
from sage_llm.sim.engine import SimEngine, SimEngineConfig
from sage_llm.sim.faults import FaultPlan, FaultyEngineClient
from sage_llm.sim.server import start_engine_server
from sage_llm.types import ExecutionInstanceType

MODEL = "llama-3-8b"


def fast_engine(**config: Any) -> SimEngine:
    return SimEngine("sim-0", SimEngineConfig(speed=100.0, **config))


def faulty(spec: str, **config: Any) -> FaultyEngineClient:
    return FaultyEngineClient(fast_engine(**config), FaultPlan.parse(spec))


@asynccontextmanager
async def served(engine: EngineClient, **kwargs: Any) -> AsyncIterator[str]:
    runner, port = await start_engine_server(
        engine, model_name=MODEL, shutdown_timeout=1.0, **kwargs
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
        await engine.aclose()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def post(
    http: aiohttp.ClientSession, url: str, body: Any, rid: str | None = None
) -> tuple[int, Any]:
    headers = {"X-Request-Id": rid} if rid else {}
    async with http.post(url, json=body, headers=headers) as resp:
        return resp.status, await resp.json()


async def stream_events(
    http: aiohttp.ClientSession, url: str, body: Any, rid: str | None = None
) -> list[str]:
    headers = {"X-Request-Id": rid} if rid else {}
    async with http.post(url, json={**body, "stream": True}, headers=headers) as resp:
        assert resp.status == 200
        text = (await resp.read()).decode()
    return [block.removeprefix("data: ") for block in text.strip().split("\n\n")]


async def metrics(http: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    async with http.get(f"{base}/metrics") as resp:
        return parse_prometheus_text(await resp.text())


def total(samples: dict[str, Any], name: str) -> float:
    return float(sum(value for _, value in samples.get(name, [])))


COMPLETION = {"model": MODEL, "prompt": "Tell me a story about a river", "max_tokens": 10}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}


# --- faults -------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [503, 429, 500])
async def test_an_injected_error_answers_exactly_the_configured_status(
    http: aiohttp.ClientSession, status: int
) -> None:
    async with served(faulty(f"error={status}@p1; seed=1")) as base:
        expected = {
            "error": {
                "message": f"engine answered HTTP {status} (injected)",
                "type": {503: "Service Unavailable", 429: "Too Many Requests",
                         500: "Internal Server Error"}[status],
                "param": None,
                "code": status,
            }
        }  # fmt: skip
        for path, body in (("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)):
            for stream in (False, True):
                got = await post(http, base + path, {**body, "stream": stream})
                assert got == (status, expected)
        prefill_leg = {**COMPLETION, "kv_transfer_params": {"do_remote_decode": True}}
        got_status, err = await post(http, f"{base}/v1/completions", prefill_leg)
        assert (got_status, err["error"]["code"]) == (status, status)
        assert err["error"]["message"] == f"prefill leg answered HTTP {status} (injected)"
        async with http.get(f"{base}/health") as resp:
            assert resp.status == 200  # a random fault: the engine itself is healthy


async def test_a_scheduled_error_fails_health_probes_too(http: aiohttp.ClientSession) -> None:
    async with served(faulty("error=503")) as base:
        async with http.get(f"{base}/health") as resp:
            assert resp.status == 503
        status, _ = await post(http, f"{base}/v1/completions", COMPLETION)
        assert status == 503
    async with served(fast_engine()) as base, http.get(f"{base}/health") as resp:
        assert resp.status == 200


async def test_a_truncated_answer_drops_the_connection(http: aiohttp.ClientSession) -> None:
    async with served(faulty("truncate=3")) as base:
        for path, body in (("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)):
            with pytest.raises(aiohttp.ServerDisconnectedError):
                await post(http, base + path, body)
            received: list[bytes] = []
            async with http.post(base + path, json={**body, "stream": True}) as resp:
                assert resp.status == 200
                with pytest.raises(aiohttp.ClientPayloadError):
                    async for line in resp.content:
                        received.append(line)
            events = [json.loads(line[6:]) for line in received if line.startswith(b"data: {")]
            texts = [e["choices"][0].get("text") or e["choices"][0]["delta"].get("content")
                     for e in events]  # fmt: skip
            assert len([t for t in texts if t]) == 3
            assert all(e["choices"][0]["finish_reason"] is None for e in events)
            assert b"data: [DONE]\n" not in received
        client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
        try:
            with pytest.raises(openai.APIConnectionError):
                await client.completions.create(model=MODEL, prompt="x", max_tokens=8)
        finally:
            await client.close()
        samples = await metrics(http, base)
    assert total(samples, "vllm:request_success_total") == 0.0
    assert total(samples, "vllm:e2e_request_latency_seconds_count") == 0.0


async def test_a_stream_cut_before_any_output_drops_the_connection_too(
    http: aiohttp.ClientSession,
) -> None:
    async with served(faulty("truncate=0")) as base:
        for stream in (False, True):
            with pytest.raises(aiohttp.ServerDisconnectedError):
                await post(http, f"{base}/v1/completions", {**COMPLETION, "stream": stream})


async def test_a_random_crash_drops_the_connection_as_a_crashed_engine_would(
    http: aiohttp.ClientSession,
) -> None:
    """Not a 502 whose text says "connection refused": a router's drill meets the
    connection failure itself (the process stays up: its other requests are served)."""
    async with served(faulty("crash@p1; seed=1")) as base:
        for stream in (False, True):
            with pytest.raises(aiohttp.ServerDisconnectedError):
                await post(http, f"{base}/v1/completions", {**COMPLETION, "stream": stream})
        leg = {**COMPLETION, "kv_transfer_params": {"do_remote_decode": True}}
        with pytest.raises(aiohttp.ServerDisconnectedError):  # a prefill leg too
            await post(http, f"{base}/v1/completions", leg)
        async with http.get(f"{base}/health") as r:
            assert r.status == 200  # a random crash hits requests, not the probes


# --- metrics ------------------------------------------------------------------------------


@pytest.mark.parametrize("wrapped", [False, True])
async def test_queue_time_histogram_counts_every_request(
    http: aiohttp.ClientSession, wrapped: bool
) -> None:
    engine: EngineClient = (
        faulty("seed=1", max_num_seqs=2) if wrapped else fast_engine(max_num_seqs=2)
    )
    async with served(engine) as base:
        results = await asyncio.gather(
            *(post(http, f"{base}/v1/completions", COMPLETION, f"q{i}") for i in range(8))
        )
        assert [status for status, _ in results] == [200] * 8
        samples = await metrics(http, base)
    assert total(samples, "vllm:request_success_total") == 8.0
    assert total(samples, "vllm:request_queue_time_seconds_count") == 8.0
    assert total(samples, "vllm:request_queue_time_seconds_sum") > 0.0  # 6 of 8 waited


# --- API parity ---------------------------------------------------------------------------


@pytest.mark.parametrize("wrapped", [False, True])
async def test_model_card_and_tokenizer_report_the_engines_limit(
    http: aiohttp.ClientSession, wrapped: bool
) -> None:
    engine: EngineClient = fast_engine(max_model_len=4096, tp=2)
    if wrapped:
        engine = FaultyEngineClient(engine, FaultPlan.parse(""))
    async with served(engine) as base:
        async with http.get(f"{base}/v1/models") as resp:
            (card,) = (await resp.json())["data"]
        assert card["max_model_len"] == 4096
        _, tok = await post(http, f"{base}/tokenize", {"prompt": "Hello there"})
        assert tok["max_model_len"] == 4096
        async with http.get(f"{base}/server_info") as resp:
            info = await resp.json()
        assert (info["context_length"], info["tp_size"]) == (4096, 2)
        assert info["disaggregation_mode"] == "null"
        status, err = await post(http, f"{base}/v1/completions", {**COMPLETION, "max_tokens": 4097})
        assert status == 400 and err["error"]["param"] == "max_tokens"
        assert (
            "max_tokens=4097 cannot be greater than max_model_len=4096" in err["error"]["message"]
        )
        # the context holds the prompt and less than max_tokens: served cut, as vLLM 0.32
        status, out = await post(http, f"{base}/v1/completions", {**COMPLETION, "max_tokens": 4096})
        assert status == 200 and out["choices"][0]["finish_reason"] == "length"
        usage = out["usage"]
        assert usage["prompt_tokens"] + usage["completion_tokens"] == 4096
        # a prompt longer than the context: its length is the problem, whatever max_tokens
        # (none here), in vLLM's words (a text prompt counted to one token past the context)
        words = " ".join(["word"] * 4200)
        chat = [{"role": "user", "content": words}]
        for path, body in (
            ("chat/completions", {"model": MODEL, "messages": chat}),
            ("completions", {"model": MODEL, "prompt": words}),
        ):  # fmt: skip
            status, err = await post(http, f"{base}/v1/{path}", body)
            assert (status, err["error"]["param"]) == (400, "input_tokens"), err
            assert err["error"]["message"] == (
                "This model's maximum context length is 4096 tokens. However, your prompt "
                "contains at least 4097 input tokens, which exceeds this limit even without any "
                "output tokens. Please reduce the length of the input prompt. "
                "(parameter=input_tokens, value=4097)"
            )
    # by default the model's own context: Llama-3-8B's 8192, Llama-3.1-8B's 131072
    for model, context in (("llama-3-8b", 8192), ("llama-3.1-8b", 131072)):
        async with served(fast_engine(model=model)) as base, http.get(f"{base}/v1/models") as r:
            assert (await r.json())["data"][0]["max_model_len"] == context
    for role, mode in ((ExecutionInstanceType.PREFILLING, "prefill"),
                       (ExecutionInstanceType.DECODING, "decode")):  # fmt: skip
        async with served(fast_engine(role=role)) as base, http.get(f"{base}/server_info") as r:
            assert (await r.json())["disaggregation_mode"] == mode  # as SGLang says it


async def test_stop_reason_is_the_matched_stop_string(http: aiohttp.ClientSession) -> None:
    async with served(fast_engine()) as base:
        url = f"{base}/v1/completions"
        _, full = await post(http, url, {**COMPLETION, "max_tokens": 30}, "s")
        assert full["choices"][0]["stop_reason"] is None  # ran to max_tokens
        stop = " " + full["choices"][0]["text"].split()[4]
        body = {**COMPLETION, "max_tokens": 30, "stop": ["never-there", stop]}
        _, out = await post(http, url, body, "s")
        choice = out["choices"][0]
        assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", stop)
        assert full["choices"][0]["text"].startswith(choice["text"] + stop)
        events = await stream_events(http, url, body, "s")
        assert events[-1] == "[DONE]"
        last = json.loads(events[-2])["choices"][0]
        assert (last["finish_reason"], last["stop_reason"]) == ("stop", stop)
        assert all(json.loads(e)["choices"][0]["stop_reason"] is None for e in events[:-2])

        chat_url = f"{base}/v1/chat/completions"
        _, chat = await post(http, chat_url, {**CHAT, "max_tokens": 30}, "c")
        word = " " + chat["choices"][0]["message"]["content"].split()[3]
        _, stopped = await post(http, chat_url, {**CHAT, "max_tokens": 30, "stop": word}, "c")
        assert stopped["choices"][0]["stop_reason"] == word
        assert stopped["choices"][0]["finish_reason"] == "stop"


async def test_stop_token_ids_and_max_completion_tokens_as_vllm(
    http: aiohttp.ClientSession,
) -> None:
    async with served(fast_engine()) as base:
        url = f"{base}/v1/completions"
        body = {**COMPLETION, "max_tokens": 30}
        _, full = await post(http, url, body, "t")
        words = full["choices"][0]["text"].split()
        async with http.post(f"{base}/tokenize", json={"prompt": " " + words[3]}) as resp:
            (stop_id,) = (await resp.json())["tokens"]
        _, out = await post(http, url, {**body, "stop_token_ids": [stop_id]}, "t")
        choice = out["choices"][0]
        assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", stop_id)
        # the stop token's text is left out, as vLLM v1's detokenizer leaves it out
        assert choice["text"].split() == words[:3]
        kept = {**body, "stop_token_ids": [stop_id], "include_stop_str_in_output": True}
        _, out = await post(http, url, kept, "t")
        assert out["choices"][0]["text"].split() == words[:4]
        events = await stream_events(http, url, {**body, "stop_token_ids": [stop_id]}, "t")
        last = json.loads(events[-2])["choices"][0]
        assert (last["finish_reason"], last["stop_reason"]) == ("stop", stop_id)
        chat = {**CHAT, "max_completion_tokens": 3, "max_tokens": 5}
        _, answer = await post(http, f"{base}/v1/chat/completions", chat, "c")
        assert answer["usage"]["completion_tokens"] == 3  # the newer name wins
        zero = {**CHAT, "max_completion_tokens": 0}
        status, err = await post(http, f"{base}/v1/chat/completions", zero)
        assert status == 400 and err["error"]["param"] == "max_completion_tokens"
        status, err = await post(http, url, {**COMPLETION, "max_tokens": 2, "min_tokens": 5})
        assert status == 400 and err["error"]["param"] == "min_tokens"


async def test_return_token_ids_gives_each_choices_ids_and_the_prompts(
    http: aiohttp.ClientSession,
) -> None:
    """vLLM's ``return_token_ids``: a completion's choice has its ``token_ids`` and its
    ``prompt_token_ids``; a chat's object has the prompt's; a stream's chunks their own."""
    async with served(fast_engine()) as base:
        url = f"{base}/v1/completions"
        body = {**COMPLETION, "max_tokens": 5, "return_token_ids": True}
        _, out = await post(http, url, body, "t")
        choice = out["choices"][0]
        assert len(choice["token_ids"]) == out["usage"]["completion_tokens"] == 5
        assert choice["prompt_token_ids"] == tokens.tokenize(str(COMPLETION["prompt"]))
        assert len(choice["prompt_token_ids"]) == out["usage"]["prompt_tokens"]
        raw = await stream_events(http, url, {**body, "stream": True}, "t")
        events = [json.loads(e) for e in raw if e != "[DONE]"]
        streamed = [t for e in events if e["choices"] for t in e["choices"][0]["token_ids"]]
        assert streamed == choice["token_ids"]  # the same request id: the same answer
        assert events[0]["choices"][0]["prompt_token_ids"] == choice["prompt_token_ids"]
        chat_url = f"{base}/v1/chat/completions"
        _, chat = await post(http, chat_url, {**CHAT, "max_tokens": 3, "return_token_ids": True})
        assert len(chat["prompt_token_ids"]) == chat["usage"]["prompt_tokens"]
        assert len(chat["choices"][0]["token_ids"]) == 3
        _, plain = await post(http, url, {**COMPLETION, "max_tokens": 2})
        assert "token_ids" not in plain["choices"][0]


async def test_generated_token_ids_detokenize_to_the_generated_text(
    http: aiohttp.ClientSession,
) -> None:
    async with served(fast_engine()) as base:
        body = {**COMPLETION, "max_tokens": 6, "return_token_ids": True}
        _, out = await post(http, f"{base}/v1/completions", body)
        choice = out["choices"][0]
        status, detok = await post(http, f"{base}/detokenize", {"tokens": choice["token_ids"]})
        assert (status, detok) == (200, {"prompt": choice["text"]})
        wrong = {"model": "other", "tokens": choice["token_ids"]}
        status, err = await post(http, f"{base}/detokenize", wrong)
        assert status == 404 and err["error"]["param"] == "model"  # as /tokenize


async def test_fields_read_as_vllms_request_models_read_them(
    http: aiohttp.ClientSession,
) -> None:
    """Whole-number floats are integers, temperature has no upper bound, and a suffix and
    a priority (vLLM's default FCFS scheduler takes none) are refused in vLLM's words."""
    async with served(fast_engine()) as base:
        url = f"{base}/v1/completions"
        accepted: list[dict[str, Any]] = [
            {"min_tokens": 1.0},
            {"logprobs": 2.0},
            {"stop_token_ids": [5.0]},
            {"temperature": 3},
            {"priority": 0},  # the FCFS default
        ]
        for fields in accepted:
            status, out = await post(http, url, {**COMPLETION, **fields})
            assert status == 200, (fields, out)
        status, out = await post(http, url, {**COMPLETION, "logprobs": 2.0})
        # 2 alternatives, and the sampled token when it is not among them (as vLLM's)
        assert len(out["choices"][0]["logprobs"]["top_logprobs"][0]) in (2, 3)
        refused: list[tuple[dict[str, Any], str]] = [
            ({"min_tokens": 1.5}, "min_tokens"),
            ({"suffix": "!"}, "suffix"),
            ({"temperature": -1}, "temperature"),
            ({"priority": 1.5}, "priority"),  # (vLLM 0.32 takes any integer, FCFS or not)
            ({"stream": "yes"}, "stream"),
            ({"stream": True, "stream_options": "x"}, "stream_options"),
            # "false" is no boolean: never taken as true
            (
                {"stream": True, "stream_options": {"include_usage": "false"}},
                "stream_options.include_usage",
            ),
            (
                {
                    "stream": True,
                    "stream_options": {"include_usage": True, "continuous_usage_stats": 1},
                },
                "stream_options.continuous_usage_stats",
            ),
            ({"return_token_ids": "false"}, "return_token_ids"),
            (  # checked with include_usage off too
                {"stream": True, "stream_options": {"continuous_usage_stats": "bogus"}},
                "stream_options.continuous_usage_stats",
            ),
        ]
        for fields, param in refused:
            status, err = await post(http, url, {**COMPLETION, **fields})
            assert (status, err["error"]["param"]) == (400, param), err
        assert (
            "suffix is not currently supported"
            in ((await post(http, url, {**COMPLETION, "suffix": "!"}))[1]["error"]["message"])
        )


async def test_malformed_chat_messages_are_refused_as_vllm_refuses_them(
    http: aiohttp.ClientSession,
) -> None:
    """The gateway's own rule for a message (sage_llm.chat_messages): a content that is
    not a string, a list of content parts or (outside system/developer/user/tool) null."""
    async with served(fast_engine()) as base:
        url = f"{base}/v1/chat/completions"
        for messages, where in (
            ([{"role": "user", "content": 5}], "messages[0].content"),
            ([{"role": "user", "content": ["x"]}], "messages[0].content[0]"),
            ([{"role": "user", "content": "a"}, {"content": "b"}], "messages[1].role"),
            ([{"role": "system", "content": None}], "messages[0].content"),
        ):
            status, err = await post(http, url, {**CHAT, "messages": messages})
            assert status == 400 and err["error"]["param"] == "messages"
            assert err["error"]["message"].startswith(f"{where}: "), err
        parts = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
        status, _ = await post(http, url, {**CHAT, "messages": parts})
        assert status == 200


async def test_unknown_routes_and_methods_answer_json_as_vllm_does(
    http: aiohttp.ClientSession,
) -> None:
    async with served(fast_engine()) as base:
        async with http.get(f"{base}/v1/nope") as resp:
            assert resp.status == 404
            assert resp.content_type == "application/json"
            assert await resp.json() == {"detail": "Not Found"}
        async with http.get(f"{base}/v1/completions") as resp:
            assert resp.status == 405
            assert resp.content_type == "application/json"
            assert await resp.json() == {"detail": "Method Not Allowed"}
            assert "POST" in resp.headers["Allow"]


# --- logprobs -----------------------------------------------------------------------------


async def test_completion_logprobs_in_vllms_shape(http: aiohttp.ClientSession) -> None:
    async with served(fast_engine()) as base:
        url = f"{base}/v1/completions"
        body = {**COMPLETION, "logprobs": 2}
        _, out = await post(http, url, body, "lp")
        logprobs = out["choices"][0]["logprobs"]
        assert set(logprobs) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
        tokens = logprobs["tokens"]
        assert len(tokens) == out["usage"]["completion_tokens"] == 10
        assert "".join(tokens) == out["choices"][0]["text"]
        assert logprobs["text_offset"] == [sum(map(len, tokens[:i])) for i in range(10)]
        for token, lp, top in zip(tokens, logprobs["token_logprobs"], logprobs["top_logprobs"],
                                  strict=True):  # fmt: skip
            assert lp <= 0.0 and top[token] == lp and 2 <= len(top) <= 3
        # the same request streamed: the chunks' logprobs join to the same object
        events = await stream_events(http, url, body, "lp")
        parts = [json.loads(e)["choices"][0]["logprobs"] for e in events[:-1]]
        joined = {key: [v for p in parts for v in p[key]] for key in logprobs}
        assert joined == logprobs
        _, plain = await post(http, url, COMPLETION, "lp")
        assert plain["choices"][0]["logprobs"] is None

        client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
        try:
            done = await client.completions.create(model=MODEL, prompt="x", max_tokens=3,
                                                   logprobs=0)  # fmt: skip
            parsed = done.choices[0].logprobs
            assert parsed is not None and parsed.token_logprobs is not None
            assert len(parsed.token_logprobs) == 3
        finally:
            await client.close()


async def test_chat_logprobs_in_vllms_shape(http: aiohttp.ClientSession) -> None:
    async with served(fast_engine()) as base:
        url = f"{base}/v1/chat/completions"
        body = {**CHAT, "logprobs": True, "top_logprobs": 3}
        _, out = await post(http, url, body, "c")
        content = out["choices"][0]["logprobs"]["content"]
        assert len(content) == 10
        assert "".join(e["token"] for e in content) == out["choices"][0]["message"]["content"]
        for entry in content:
            assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
            assert entry["bytes"] == list(entry["token"].encode())
            top = entry["top_logprobs"]
            assert len(top) == 3
            assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
            assert all(t["bytes"] == list(t["token"].encode()) for t in top)
        events = await stream_events(http, url, body, "c")
        parts = [json.loads(e)["choices"][0]["logprobs"] for e in events[1:-1]]
        assert [x for p in parts for x in p["content"]] == content
        _, bare = await post(http, url, {**CHAT, "logprobs": True}, "c")
        assert all(e["top_logprobs"] == [] for e in bare["choices"][0]["logprobs"]["content"])


async def test_echo_leads_a_completion_with_its_prompt(http: aiohttp.ClientSession) -> None:
    async with served(fast_engine()) as base:
        url = f"{base}/v1/completions"
        prompt = COMPLETION["prompt"]
        _, plain = await post(http, url, {**COMPLETION, "logprobs": 1}, "e")
        _, out = await post(http, url, {**COMPLETION, "echo": True, "logprobs": 1}, "e")
        text = out["choices"][0]["text"]
        assert text == prompt + plain["choices"][0]["text"]
        lp = out["choices"][0]["logprobs"]
        assert "".join(lp["tokens"]) == text
        assert lp["text_offset"] == [
            sum(map(len, lp["tokens"][:i])) for i in range(len(lp["tokens"]))
        ]
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert out["usage"] == plain["usage"]  # the echoed prompt is not output
        events = await stream_events(http, url, {**COMPLETION, "echo": True, "logprobs": 1}, "e")
        parts = [json.loads(e)["choices"][0] for e in events[:-1]]
        assert parts[0]["text"].startswith(prompt)
        assert "".join(p["text"] for p in parts) == text
        assert [o for p in parts for o in p["logprobs"]["text_offset"]] == lp["text_offset"]
        status, err = await post(http, url, {**COMPLETION, "prompt": [1, 2, 3], "echo": True})
        assert status == 400 and err["error"]["param"] == "echo"


async def test_echo_with_max_tokens_0_answers_the_prompt_alone(
    http: aiohttp.ClientSession,
) -> None:
    # as vLLM answers it (what lm-eval's log-likelihood requests send): the prompt, its
    # logprobs, finish "length", and the one token it ran counted in the usage
    async with served(fast_engine()) as base:
        url = f"{base}/v1/completions"
        prompt = str(COMPLETION["prompt"])
        body = {**COMPLETION, "max_tokens": 0, "echo": True, "logprobs": 1}
        status, out = await post(http, url, body, "z")
        assert status == 200, out
        choice = out["choices"][0]
        assert choice["text"] == prompt and choice["finish_reason"] == "length"
        lp = choice["logprobs"]
        assert "".join(lp["tokens"]) == prompt
        assert len(lp["token_logprobs"]) == len(tokens.tokenize(prompt))
        usage = out["usage"]
        assert (usage["prompt_tokens"], usage["completion_tokens"]) == (len(lp["tokens"]), 1)
        events = await stream_events(http, url, {**body, "stream": True}, "z")
        parts = [json.loads(e)["choices"][0] for e in events[:-1]]
        assert "".join(p["text"] for p in parts) == prompt
        assert parts[-1]["finish_reason"] == "length"
        for refused in ({**COMPLETION, "max_tokens": 0}, {**CHAT, "max_tokens": 0, "echo": True}):
            status, err = await post(http, url if "prompt" in refused else
                                     f"{base}/v1/chat/completions", refused)  # fmt: skip
            assert status == 400 and err["error"]["param"] == "max_tokens", err


async def test_prompt_logprobs_in_vllms_shape(http: aiohttp.ClientSession) -> None:
    async with served(fast_engine()) as base:
        _, out = await post(
            http, f"{base}/v1/completions", {**COMPLETION, "prompt_logprobs": 2}, "p"
        )
        drawn = out["choices"][0]["prompt_logprobs"]
        assert len(drawn) == out["usage"]["prompt_tokens"] and drawn[0] is None
        ids = tokens.tokenize(str(COMPLETION["prompt"]))
        for tid, entry in zip(ids[1:], drawn[1:], strict=True):
            mine = entry[str(tid)]
            assert mine["logprob"] <= 0 and mine["rank"] >= 1 and 2 <= len(entry) <= 3
            assert {"logprob", "rank", "decoded_token"} == set(mine)
        _, chat = await post(http, f"{base}/v1/chat/completions",
                             {**CHAT, "prompt_logprobs": 0}, "q")  # fmt: skip
        assert chat["prompt_logprobs"][0] is None  # a chat's at the top, as vLLM's
        assert len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"]
        status, err = await post(http, f"{base}/v1/completions",
                                 {**COMPLETION, "prompt_logprobs": 1, "stream": True})  # fmt: skip
        assert status == 400 and err["error"]["param"] == "prompt_logprobs"
        # an echo's logprobs and prompt_logprobs are the same draws, whatever N each asks
        both = {**COMPLETION, "echo": True, "logprobs": 3, "prompt_logprobs": 1}
        _, out = await post(http, f"{base}/v1/completions", both, "b")
        echoed = out["choices"][0]["logprobs"]["token_logprobs"][1 : len(ids)]
        given = [
            e[str(t)]["logprob"]
            for t, e in zip(ids[1:], out["choices"][0]["prompt_logprobs"][1:], strict=True)
        ]
        assert echoed == given
        # a prompt of token ids: its own token once, the alternatives under their ranks
        by_ids = {**COMPLETION, "prompt": [9906, 1070, 77], "prompt_logprobs": 2}
        _, ided = await post(http, f"{base}/v1/completions", by_ids, "i")
        for entry in ided["choices"][0]["prompt_logprobs"][1:]:
            ranks = [v["rank"] for v in entry.values()]
            assert len(ranks) == len(set(ranks))


@pytest.mark.parametrize(
    ("path", "fields", "param"),
    [
        ("/v1/completions", {"logprobs": 21}, "logprobs"),
        ("/v1/completions", {"logprobs": -1}, "logprobs"),
        ("/v1/completions", {"logprobs": "two"}, "logprobs"),
        ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": 3}, "logprobs"),
    ],
)
async def test_bad_logprobs_fields_are_400s_naming_the_field(
    http: aiohttp.ClientSession, path: str, fields: dict[str, Any], param: str
) -> None:
    body = {**(CHAT if "chat" in path else COMPLETION), **fields}
    async with served(fast_engine()) as base:
        for stream in (False, True):
            status, err = await post(http, base + path, {**body, "stream": stream})
            assert status == 400 and err["error"]["param"] == param


async def test_requests_are_read_as_vllm_reads_them(http: aiohttp.ClientSession) -> None:
    """/ping answers as /health; stream_options without stream, and a token id beyond the
    vocabulary, are 400s; a whole-number float max_tokens is read as an integer."""
    async with served(fast_engine()) as base:
        for method in (http.get, http.post):
            async with method(f"{base}/ping") as resp:
                assert resp.status == 200
        url = f"{base}/v1/completions"
        options = {**COMPLETION, "stream_options": {"include_usage": True}}
        status, err = await post(http, url, options)
        assert (status, err["error"]["param"]) == (400, "stream_options")
        assert "only be defined when `stream=True`" in err["error"]["message"]
        status, err = await post(http, url, {**COMPLETION, "prompt": [1, 2, 128256]})
        assert (status, err["error"]["param"]) == (400, "prompt")
        assert "Token id 128256 is out of vocabulary" in err["error"]["message"]
        status, done = await post(http, url, {**COMPLETION, "max_tokens": 3.0})
        assert status == 200 and done["usage"]["completion_tokens"] == 3


async def test_requests_read_as_vllms_request_models_read_them(
    http: aiohttp.ClientSession,
) -> None:
    """Whole-number floats for integer fields, an empty model name (the served one), a
    batch of one token-id prompt, an empty stop string refused, a chat's default length
    raised to its min_tokens: as vLLM answers each."""
    async with served(fast_engine()) as base:
        url = f"{base}/v1/completions"
        for field in ({"top_k": 2.0}, {"seed": 1.0}, {"priority": 0.0}, {"model": ""}):
            status, out = await post(http, url, {"prompt": "x", "max_tokens": 2, **field})
            assert status == 200, (field, out)
        status, out = await post(http, url, {"prompt": [[5, 6]], "max_tokens": 1})
        assert status == 200 and out["usage"]["prompt_tokens"] == 2
        for stop in ("", ["done", ""]):
            status, out = await post(http, url, {"prompt": "x", "max_tokens": 2, "stop": stop})
            assert (status, out["error"]["param"]) == (400, "stop")
            assert out["error"]["message"] == "stop cannot contain an empty string."
        chat = {"messages": [{"role": "user", "content": "x"}], "min_tokens": 200}
        status, out = await post(http, f"{base}/v1/chat/completions", chat)
        assert status == 200 and out["usage"]["completion_tokens"] >= 200


async def test_tokenize_checks_messages_as_chat_does_and_detokenize_reads_prompt_ids(
    http: aiohttp.ClientSession,
) -> None:
    async with served(fast_engine()) as base:
        bad: list[list[dict[str, str]]] = [[{}], []]
        for messages in bad:
            status, out = await post(http, f"{base}/tokenize", {"messages": messages})
            assert (status, out["error"]["param"]) == (400, "messages"), out
        tool_turn = [{"role": "user", "content": "hi"},
                     {"role": "assistant", "content": None, "tool_calls": []}]  # fmt: skip
        status, out = await post(http, f"{base}/v1/chat/completions/render",
                                 {"messages": tool_turn})  # fmt: skip
        assert status == 200 and "None" not in json.dumps(out)
        body = {"prompt": "Hello world", "max_tokens": 1, "return_token_ids": True}
        _, out = await post(http, f"{base}/v1/completions", body)
        ids = out["choices"][0]["prompt_token_ids"]
        status, text = await post(http, f"{base}/detokenize", {"tokens": ids})
        assert (status, text["prompt"]) == (200, "Hello world")


async def test_requests_sharing_an_id_are_all_served_as_vllm_serves_them(
    http: aiohttp.ClientSession,
) -> None:
    """A client's ``X-Request-Id`` need not be unique: as vLLM does, the engine gives a
    duplicate an id of its own and answers each under the client's id."""
    async with served(fast_engine()) as base:
        url = f"{base}/v1/completions"
        body = {**COMPLETION, "max_tokens": 40}
        answers = await asyncio.gather(
            post(http, url, body, rid="same"),
            post(http, url, body, rid="same"),
            stream_events(http, url, body, rid="same"),
        )
        status_a, a = answers[0]
        status_b, b = answers[1]
        events = answers[2]
        samples = await metrics(http, base)
    assert (status_a, status_b) == (200, 200)
    assert a["id"] == b["id"] == "cmpl-same"
    assert a["usage"]["completion_tokens"] == b["usage"]["completion_tokens"] == 40
    assert events[-1] == "[DONE]"
    assert json.loads(events[0])["id"] == "cmpl-same"
    assert total(samples, "vllm:request_success_total") == 3


async def test_a_chat_without_the_generation_prompt_runs_the_prompt_render_shows(
    http: aiohttp.ClientSession,
) -> None:
    """``add_generation_prompt: false`` leaves the assistant's tag out of the prompt the
    chat completion counts, as /tokenize and render show it."""
    async with served(fast_engine()) as base:
        bare = {**CHAT, "add_generation_prompt": False, "max_tokens": 1}
        _, counted = await post(http, f"{base}/tokenize", bare)
        _, tagged = await post(http, f"{base}/tokenize", CHAT)
        status, done = await post(http, f"{base}/v1/chat/completions", bare)
        assert status == 200, done
        assert done["usage"]["prompt_tokens"] == counted["count"] < tagged["count"]
        status, err = await post(
            http, f"{base}/v1/chat/completions", {**bare, "add_generation_prompt": 1}
        )
        assert status == 400 and err["error"]["param"] == "add_generation_prompt"


async def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens_as_vllm(
    http: aiohttp.ClientSession,
) -> None:
    async with served(fast_engine(max_model_len=4096)) as base:
        url = f"{base}/v1/completions"
        status, one = await post(
            http, url, {**COMPLETION, "prompt": "Hi there you", "truncate_prompt_tokens": 1}
        )
        assert status == 200 and one["usage"]["prompt_tokens"] == 1
        long = {**COMPLETION, "prompt": "word " * 9000, "truncate_prompt_tokens": 100}
        status, cut = await post(http, url, long)  # beyond the context, served once cut
        assert status == 200 and cut["usage"]["prompt_tokens"] == 100
        status, chat = await post(
            http, f"{base}/v1/chat/completions", {**CHAT, "truncate_prompt_tokens": 2}
        )
        assert status == 200 and chat["usage"]["prompt_tokens"] == 2
        # a cut text prompt stays text: echoed, its tokens decoded (as vLLM's)
        text = " ".join(f"w{k}" for k in range(40))
        body = {**COMPLETION, "prompt": text, "truncate_prompt_tokens": 5, "echo": True}
        status, echoed = await post(http, url, {**body, "max_tokens": 2, "prompt_logprobs": 0})
        assert status == 200, echoed
        choice = echoed["choices"][0]
        assert choice["text"].startswith(" w35 w36 w37 w38 w39")
        decoded = [next(iter(t.values()))["decoded_token"] for t in choice["prompt_logprobs"][1:]]
        assert decoded == [" w36", " w37", " w38", " w39"]
        chat_echo = {**CHAT, "truncate_prompt_tokens": 2, "echo": True}
        status, _ = await post(http, f"{base}/v1/chat/completions", chat_echo)
        assert status == 200  # a chat's echo is ignored, cut or not
        for bad, words in (
            (0, "must be -1 or an integer >= 1"),
            (5000, "greater than max_model_len"),
        ):
            status, err = await post(http, url, {**COMPLETION, "truncate_prompt_tokens": bad})
            assert status == 400 and words in err["error"]["message"]
            assert err["error"]["param"] == "truncate_prompt_tokens"


async def test_n_choices_whole_and_streamed_as_vllm_answers_them(
    http: aiohttp.ClientSession,
) -> None:
    """``n`` > 1 (the simulated engine had answered 400): a whole answer has one choice per
    sample, each with its own text, token ids and the prompt's; a chat stream starts with
    a role chunk per choice, and its chunks carry each choice's index; the usage counts
    the prompt once and every sample's tokens."""
    async with served(fast_engine()) as base:
        url = f"{base}/v1/completions"
        body = {**COMPLETION, "max_tokens": 3, "n": 3, "return_token_ids": True}
        status, out = await post(http, url, body)
        assert status == 200
        choices = out["choices"]
        assert [c["index"] for c in choices] == [0, 1, 2]
        assert len({c["text"] for c in choices}) == 3
        assert all(len(c["token_ids"]) == 3 and c["finish_reason"] == "length" for c in choices)
        prompt_ids = tokens.tokenize(str(COMPLETION["prompt"]))
        assert all(c["prompt_token_ids"] == prompt_ids for c in choices)
        assert out["usage"]["completion_tokens"] == 9
        assert out["usage"]["prompt_tokens"] == len(prompt_ids)
        usage = {"include_usage": True, "continuous_usage_stats": True}
        chat = {**CHAT, "max_tokens": 2, "n": 2, "stream_options": usage}
        raw = await stream_events(http, f"{base}/v1/chat/completions", chat)
        events = [json.loads(e) for e in raw if e != "[DONE]"]
        roles = [e["choices"][0]["index"] for e in events[:2]]
        assert roles == [0, 1] and all(e["choices"][0]["delta"]["role"] for e in events[:2])
        texts = [e for e in events[2:] if e["choices"]]
        assert sorted(e["choices"][0]["index"] for e in texts) == [0, 0, 1, 1]
        assert [e["usage"]["completion_tokens"] for e in texts] == [1, 2, 3, 4]
        assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 4
        assert raw[-1] == "[DONE]"


async def test_each_of_n_choices_has_its_own_stop_reason(http: aiohttp.ClientSession) -> None:
    """A choice that ran to its length has no ``stop_reason``, whichever string ended
    another choice of the request (the request's own stop reason is its choice 0's)."""
    stops = [" river", " garden"]
    async with served(fast_engine()) as base:
        url = f"{base}/v1/completions"
        body = {**COMPLETION, "max_tokens": 12, "n": 6, "stop": stops}
        _, out = await post(http, url, body, "s")
        raw = await stream_events(http, url, body, "s")
    ends = {(c["finish_reason"], c["stop_reason"]) for c in out["choices"]}
    assert {f for f, _ in ends} == {"stop", "length"}  # (this request's six: both kinds)
    assert all((f == "stop") == (r in stops) and (f == "length") == (r is None) for f, r in ends)
    streamed = {
        (c["finish_reason"], c["stop_reason"])
        for e in raw if e != "[DONE]" for c in json.loads(e)["choices"] if c["finish_reason"]
    }  # fmt: skip
    assert streamed == ends  # the same request id: the same samples
