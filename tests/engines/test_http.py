"""HTTPEngineClient against real aiohttp servers on loopback (no mocked transport)."""

from __future__ import annotations

import asyncio
import json
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from sage_llm.engines import http as http_mod
from sage_llm.engines.base import Chunk, EngineRequest
from sage_llm.engines.http import HTTPEngineClient, HTTPTimeouts, make_session
from sage_llm.errors import (
    EngineConnectionError,
    EngineError,
    EngineRequestRejectedError,
    EngineStreamError,
    EngineTimeoutError,
    InvalidRequestError,
)
from sage_llm.sim.server import start_engine_server
from tests.engines.fake_engine import MODEL, FakeEngine, closed_port, start_app
from tests.factories import make_instance

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture(params=["fast", "aiohttp"])
async def session(request: pytest.FixtureRequest) -> AsyncIterator[aiohttp.ClientSession]:
    """Every test runs over both transports of ``generate``: the lean client (a session
    from ``make_session()``) and aiohttp's (a session with a connection limit)."""
    s = make_session() if request.param == "fast" else make_session(limit=1024)
    yield s
    await s.close()


@pytest.fixture
def fake() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
async def sim_port(fake: FakeEngine) -> AsyncIterator[int]:
    runner, port = await start_engine_server(fake, model_name=MODEL, shutdown_timeout=1.0)
    yield port
    fake.release.set()
    await runner.cleanup()


def client_for(port: int, session: aiohttp.ClientSession, **kwargs: Any) -> HTTPEngineClient:
    api_key = kwargs.pop("api_key", None)
    inst = make_instance("eng-0", port=port, model_name=MODEL, api_key=api_key)
    return HTTPEngineClient(inst, session, **kwargs)


def completion_req(**kwargs: Any) -> EngineRequest:
    kwargs.setdefault("request_id", "req-1")
    kwargs.setdefault("model", MODEL)
    if "messages" not in kwargs:
        kwargs.setdefault("prompt", "The quick brown fox")
    kwargs.setdefault("max_tokens", 5)
    return EngineRequest(**kwargs)


async def collect(client: HTTPEngineClient, req: EngineRequest) -> list[Chunk]:
    return [c async for c in client.generate(req)]


async def collect_into(got: list[Chunk], client: HTTPEngineClient, req: EngineRequest) -> None:
    """Append chunks to ``got`` until the stream ends or raises."""
    async for chunk in client.generate(req):
        got.append(chunk)


class Recorder:
    """A raw aiohttp server whose handler is swapped per test; it records each request."""

    def __init__(self) -> None:
        self.bodies: list[Any] = []
        self.headers: list[dict[str, str]] = []
        self.paths: list[str] = []
        self.handler: Handler | None = None
        self.disconnected = asyncio.Event()

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        self.paths.append(request.path)
        self.headers.append({k.lower(): v for k, v in request.headers.items()})
        raw = await request.read()
        self.bodies.append(json.loads(raw) if raw else None)
        assert self.handler is not None
        try:
            return await self.handler(request)
        except asyncio.CancelledError:
            self.disconnected.set()
            raise


@pytest.fixture
async def raw() -> AsyncIterator[tuple[Recorder, int]]:
    rec = Recorder()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", rec.dispatch)
    runner, port = await start_app(app)
    yield rec, port
    await runner.cleanup()


async def sse(request: web.Request, events: list[bytes]) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for event in events:
        await resp.write(event)
    await resp.write_eof()
    return resp


def ev(obj: Any) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


def text_event(text: str, finish: str | None = None, index: int = 0) -> bytes:
    choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
    return ev({"id": "cmpl-x", "object": "text_completion", "choices": [choice]})


USAGE = {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}


# --- against the simulated engine's server ------------------------------------------------


async def test_completion_stream_concatenates_and_ends_with_usage(
    sim_port: int, session: aiohttp.ClientSession, fake: FakeEngine
) -> None:
    client = client_for(sim_port, session)
    chunks = await collect(client, completion_req(max_tokens=5))
    assert "".join(c.text for c in chunks) == " w0 w1 w2 w3 w4"
    last = chunks[-1]
    assert last.finish_reason == "length"
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (4, 5)
    assert all(c.usage is None and c.finish_reason is None for c in chunks[:-1])
    assert fake.finished == ["req-1"]


async def test_chat_stream_uses_chat_path_and_delta_content(
    sim_port: int, session: aiohttp.ClientSession, fake: FakeEngine
) -> None:
    client = client_for(sim_port, session)
    req = completion_req(messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    chunks = await collect(client, req)
    assert "".join(c.text for c in chunks) == " w0 w1 w2"
    assert chunks[-1].finish_reason == "length" and chunks[-1].usage is not None
    assert fake.requests[-1].messages == [{"role": "user", "content": "hi"}]


async def test_request_id_and_extra_fields_reach_the_engine(
    sim_port: int, session: aiohttp.ClientSession, fake: FakeEngine
) -> None:
    client = client_for(sim_port, session)
    extra = {"seed": 7, "ignore_eos": True, "vendor": {"a": [1, 2], "b": None}}
    await collect(client, completion_req(request_id="abc-123", extra=extra))
    seen = fake.requests[-1]
    assert seen.request_id == "abc-123"
    assert dict(seen.extra) == extra


async def test_decode_leg_passes_kv_transfer_params(
    sim_port: int, session: aiohttp.ClientSession, fake: FakeEngine
) -> None:
    params = {"do_remote_prefill": True, "remote_block_ids": [1, 2], "remote_engine_id": "p0"}
    client = client_for(sim_port, session)
    chunks = await collect(client, completion_req(kv_transfer_params=params))
    assert chunks[-1].finish_reason == "length"
    assert fake.requests[-1].kv_transfer_params == params


async def test_prefill_against_simulated_server_returns_handle(
    sim_port: int, session: aiohttp.ClientSession, fake: FakeEngine
) -> None:
    client = client_for(sim_port, session)
    handle = await client.prefill(completion_req(request_id="pd-1", max_tokens=50))
    assert handle.instance_id == "eng-0"
    assert handle.params["remote_block_ids"] == [3, 4, 5]
    assert handle.params["remote_request_id"] == "pd-1"
    assert handle.prompt_tokens == 4
    assert handle.first_token is not None and handle.first_token.text == " w0"
    assert [r.request_id for r in fake.prefills] == ["pd-1"]
    assert fake.requests == []


async def test_closing_consumer_mid_stream_aborts_on_the_engine(
    session: aiohttp.ClientSession,
) -> None:
    gated = FakeEngine(gate_after=2)
    runner, port = await start_engine_server(gated, model_name=MODEL, shutdown_timeout=1.0)
    try:
        client = client_for(port, session)
        got: list[Chunk] = []
        async with aclosing(client.generate(completion_req(max_tokens=10))) as stream:
            async for chunk in stream:
                got.append(chunk)
                if len(got) == 2:
                    break
        await asyncio.wait_for(gated.aborted_event.wait(), timeout=10)
        assert gated.aborted == ["req-1"] and gated.finished == []
    finally:
        gated.release.set()
        await runner.cleanup()


@pytest.mark.parametrize("call", ["generate", "complete"])
async def test_cancelling_consumer_task_aborts_on_the_engine(
    session: aiohttp.ClientSession, call: str
) -> None:
    """Cancelling the task that drains ``generate``, or that awaits ``complete`` (the answer
    of a request not streamed comes in one piece), closes the engine's request."""
    gated = FakeEngine(gate_after=1)
    runner, port = await start_engine_server(gated, model_name=MODEL, shutdown_timeout=1.0)
    try:
        client = client_for(port, session)
        if call == "generate":
            task = asyncio.create_task(collect(client, completion_req(max_tokens=10)))
        else:
            req = completion_req(stream=False, max_tokens=10)
            task = asyncio.create_task(client.complete(req))
        await asyncio.wait_for(gated.gated.wait(), timeout=10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(gated.aborted_event.wait(), timeout=10)
        assert gated.aborted == ["req-1"]
    finally:
        gated.release.set()
        await runner.cleanup()


async def test_lora_adapters_are_the_cards_whose_parent_is_the_model(
    session: aiohttp.ClientSession,
) -> None:
    """vLLM lists each LoRA adapter (``--lora-modules``, or loaded at run time) as a card
    whose ``parent`` is the base model's served name."""
    cards: list[dict[str, Any]] = [
        {"id": MODEL, "object": "model", "root": "/models/base", "parent": None},
        {"id": "sql", "object": "model", "root": "/loras/sql", "parent": MODEL},
        {"id": "elsewhere", "object": "model", "root": "/loras/x", "parent": "another"},
        {"id": 3, "object": "model", "parent": MODEL},
    ]

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": cards})

    app = web.Application()
    app.router.add_get("/v1/models", models)
    runner, port = await start_app(app)
    try:
        assert await client_for(port, session).lora_adapters() == ["sql"]
        for card in cards:  # an engine whose cards have no parent field does not say
            card.pop("parent")
        assert await client_for(port, session).lora_adapters() is None
    finally:
        await runner.cleanup()


async def test_context_length_and_adapters_read_the_cards_once(
    session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The health loop asks for the context length and then the adapters: one ``GET
    /v1/models`` answers both; the cards are read again once they are older than
    ``CARDS_REUSE_S``, and after a load or unload through the client."""
    reads: list[int] = []
    cards: list[dict[str, Any]] = [
        {"id": MODEL, "object": "model", "parent": None, "max_model_len": 2048},
        {"id": "sql", "object": "model", "parent": MODEL},
    ]

    async def models(request: web.Request) -> web.Response:
        reads.append(1)
        return web.json_response({"object": "list", "data": cards})

    async def load(request: web.Request) -> web.Response:
        cards.append({"id": (await request.json())["lora_name"], "parent": MODEL})
        return web.Response(text="Success")

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/load_lora_adapter", load)
    runner, port = await start_app(app)
    try:
        client = client_for(port, session)
        assert await client.context_length() == 2048
        assert await client.lora_adapters() == ["sql"]
        assert len(reads) == 1
        await client.load_lora_adapter("chat", "/loras/chat")
        assert await client.lora_adapters() == ["sql", "chat"]
        assert len(reads) == 2
        monkeypatch.setattr(http_mod, "CARDS_REUSE_S", 0.0)  # older than that: read again
        assert await client.context_length() == 2048
        assert len(reads) == 3
        assert await client.models() == [MODEL, "sql", "chat"]  # always read
        assert len(reads) == 4
    finally:
        await runner.cleanup()


async def test_context_length_of_llama_cpp_is_its_slots_n_ctx(
    session: aiohttp.ClientSession,
) -> None:
    """llama.cpp's ``llama-server`` gives no ``max_model_len``: its card's ``meta.n_ctx``
    is a slot's context (``-c`` over ``-np``), which is what holds one request."""
    card: dict[str, Any] = {"id": MODEL, "object": "model", "owned_by": "llamacpp",
            "meta": {"n_ctx": 512, "n_ctx_train": 32768, "n_vocab": 262144}}  # fmt: skip

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [card]})

    app = web.Application()
    app.router.add_get("/v1/models", models)
    runner, port = await start_app(app)
    try:
        assert await client_for(port, session).context_length() == 512
        card["max_model_len"] = 1024  # where both are given, vLLM's field
        assert await client_for(port, session).context_length() == 1024
    finally:
        await runner.cleanup()


async def test_health_stats_and_models(sim_port: int, session: aiohttp.ClientSession) -> None:
    client = client_for(sim_port, session)
    assert await client.health() is True
    stats = await client.stats()
    assert stats.source == "vllm"
    assert (stats.waiting, stats.kv_usage, stats.num_gpu_blocks, stats.block_size) == (
        2, 0.25, 1000, 16,
    )  # fmt: skip
    assert stats.prefix_hit_rate == pytest.approx(0.4)
    assert await client.models() == [MODEL]


async def test_context_length_is_the_model_cards_max_model_len(
    fake: FakeEngine, session: aiohttp.ClientSession
) -> None:
    runner, port = await start_engine_server(fake, model_name=MODEL, max_model_len=4096)
    try:
        assert await client_for(port, session).context_length() == 4096
    finally:
        await runner.cleanup()
    runner, port = await start_engine_server(fake, model_name=MODEL)  # unbounded: none
    try:
        assert await client_for(port, session).context_length() is None
    finally:
        fake.release.set()
        await runner.cleanup()


# --- wire format, against a recording server ----------------------------------------------


async def test_stream_body_and_headers_exactly(
    raw: tuple[Recorder, int], session: aiohttp.ClientSession
) -> None:
    rec, port = raw
    rec.handler = lambda r: sse(r, [text_event("a"), text_event("b", "stop"), ev(
        {"choices": [], "usage": USAGE})])  # fmt: skip
    client = client_for(port, session, api_key="sk-test")
    extra = {"seed": 3, "logprobs": 2, "stream_options": {"continuous_usage_stats": False}}
    req = completion_req(request_id="rid-9", stop=("\n",), extra=extra, temperature=0.5)
    await collect(client, req)
    assert rec.paths == ["/v1/completions"]
    assert rec.bodies[0] == {
        "model": MODEL,
        "prompt": "The quick brown fox",
        "max_tokens": 5,
        "temperature": 0.5,
        "top_p": 1.0,
        "stop": ["\n"],
        "seed": 3,
        "logprobs": 2,
        "stream": True,
        "stream_options": {"continuous_usage_stats": False, "include_usage": True},
    }
    assert rec.headers[0]["x-request-id"] == "rid-9"
    assert rec.headers[0]["authorization"] == "Bearer sk-test"


async def test_prefill_leg_body_matches_vllm_protocol(
    raw: tuple[Recorder, int], session: aiohttp.ClientSession
) -> None:
    rec, port = raw
    kv = {"do_remote_prefill": True, "remote_engine_id": "e1", "remote_block_ids": [7]}
    answer = {
        "id": "cmpl-x",
        "object": "text_completion",
        "choices": [{"index": 0, "text": "Hi", "finish_reason": "length"}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10,
                  "prompt_tokens_details": {"cached_tokens": 4}},
        "kv_transfer_params": kv,
    }  # fmt: skip

    async def reply(request: web.Request) -> web.StreamResponse:
        return web.json_response(answer)

    rec.handler = reply
    client = client_for(port, session)
    extra = {"min_tokens": 5, "max_completion_tokens": 64, "stream_options": {"x": 1}, "seed": 1}
    handle = await client.prefill(completion_req(request_id="pd-7", extra=extra, max_tokens=64))
    body = rec.bodies[0]
    assert body["max_tokens"] == 1
    assert body["max_completion_tokens"] == 1
    assert "min_tokens" not in body
    assert body["stream"] is False
    assert "stream_options" not in body
    assert body["seed"] == 1
    assert body["kv_transfer_params"] == {
        "do_remote_decode": True,
        "do_remote_prefill": False,
        "remote_engine_id": None,
        "remote_block_ids": None,
        "remote_host": None,
        "remote_port": None,
    }
    assert rec.headers[0]["x-request-id"] == "pd-7"
    assert handle.params == kv
    assert (handle.prompt_tokens, handle.cached_tokens) == (9, 4)
    assert handle.first_token is not None and handle.first_token.text == "Hi"


@pytest.mark.parametrize(
    ("fields", "error", "said"),
    [
        ({}, EngineError, "--kv-transfer-config"),  # the engine is not configured for PD
        ({"kv_transfer_params": [1]}, EngineStreamError,
         "eng-0: prefill response's kv_transfer_params is not an object: [1]"),
    ],
)  # fmt: skip
async def test_a_prefill_answer_without_usable_kv_transfer_params_is_the_instances_failure(
    raw: tuple[Recorder, int],
    session: aiohttp.ClientSession,
    fields: dict[str, object],
    error: type[EngineError],
    said: str,
) -> None:
    rec, port = raw

    async def reply(request: web.Request) -> web.StreamResponse:
        choice = {"index": 0, "text": "x", "finish_reason": "length"}
        return web.json_response({"choices": [choice], "usage": USAGE, **fields})

    rec.handler = reply
    with pytest.raises(error, match=re.escape(said)) as info:
        await client_for(port, session).prefill(completion_req())
    # the instance's failure, as the engine's refusal of the field is: tried elsewhere
    assert info.value.retryable is True and info.value.status is None


async def test_usage_chunk_after_finish_is_merged_into_last_chunk(
    raw: tuple[Recorder, int], session: aiohttp.ClientSession
) -> None:
    rec, port = raw
    usage = {**USAGE, "prompt_tokens_details": {"cached_tokens": 3}}
    rec.handler = lambda r: sse(r, [text_event("x"), text_event("y", "stop"), ev(
        {"choices": [], "usage": usage}), b"data: [DONE]\n\n"])  # fmt: skip
    chunks = await collect(client_for(port, session), completion_req())
    assert [c.text for c in chunks] == ["x", "y"]
    assert chunks[-1].finish_reason == "stop"
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.completion_tokens, chunks[-1].usage.cached_tokens) == (2, 3)


async def test_missing_usage_is_estimated(
    raw: tuple[Recorder, int], session: aiohttp.ClientSession
) -> None:
    rec, port = raw
    rec.handler = lambda r: sse(r, [text_event("x"), text_event("y"), text_event("z", "stop"),
                                    b"data: [DONE]\n\n"])  # fmt: skip
    chunks = await collect(client_for(port, session), completion_req(prompt="one two three"))
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (3, 3)


async def test_events_split_into_single_bytes_still_parse(
    raw: tuple[Recorder, int], session: aiohttp.ClientSession
) -> None:
    rec, port = raw
    payload = b"".join([text_event("h\u00e9"), text_event("llo", "stop"), b"data: [DONE]\r\n\r\n"])
    rec.handler = lambda r: sse(r, [payload[i : i + 1] for i in range(len(payload))])
    chunks = await collect(client_for(port, session), completion_req())
    assert "".join(c.text for c in chunks) == "h\u00e9llo"


async def test_generate_batches_yields_what_each_read_brought(
    raw: tuple[Recorder, int], session: aiohttp.ClientSession
) -> None:
    """``generate_batches``: one list per read from the engine (the events of one write
    arrive together here), the usage merged into the last chunk, as ``generate`` does."""
    rec, port = raw
    first_batch = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(text_event("a") + text_event("b"))
        await first_batch.wait()
        await resp.write(text_event("c", "stop") + ev({"choices": [], "usage": USAGE}))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    rec.handler = handler
    batches: list[list[str]] = []
    async with aclosing(client_for(port, session).generate_batches(completion_req())) as it:
        async for batch in it:
            batches.append([c.text for c in batch])
            first_batch.set()
            last = batch[-1]
    assert batches == [["a", "b"], ["c"]]
    assert last.finish_reason == "stop"
    assert last.usage is not None and last.usage.completion_tokens == 2


async def test_generate_batches_ends_a_stream_read_at_once_in_one_batch(
    raw: tuple[Recorder, int], session: aiohttp.ClientSession
) -> None:
    """A whole answer in one read (the usage event and ``[DONE]`` with the text) is one
    list, its last chunk with the finish reason and the usage: the relay writes it to its
    client at once, in one write, instead of holding the last chunk for a read of its own."""
    rec, port = raw
    whole = text_event("a") + text_event("b", "stop") + ev({"choices": [], "usage": USAGE})
    rec.handler = lambda r: sse(r, [whole + b"data: [DONE]\n\n"])
    batches: list[list[Chunk]] = []
    async with aclosing(client_for(port, session).generate_batches(completion_req())) as it:
        async for batch in it:
            batches.append(batch)
    assert [[c.text for c in b] for b in batches] == [["a", "b"]]
    last = batches[0][-1]
    assert last.finish_reason == "stop"
    assert last.usage is not None and last.usage.completion_tokens == 2


async def test_generate_batches_yields_the_chunks_before_a_bad_event_then_raises(
    raw: tuple[Recorder, int], session: aiohttp.ClientSession
) -> None:
    rec, port = raw
    rec.handler = lambda r: sse(r, [text_event("a") + text_event("b") + b"data: [1, 2\n\n"])
    got: list[list[str]] = []
    with pytest.raises(EngineStreamError) as info:
        async with aclosing(client_for(port, session).generate_batches(completion_req())) as it:
            async for batch in it:
                got.append([c.text for c in batch])
    assert got == [["a", "b"]]
    assert info.value.retryable is False


async def test_json_answer_to_a_stream_request_is_accepted(
    raw: tuple[Recorder, int], session: aiohttp.ClientSession
) -> None:
    rec, port = raw

    async def reply(request: web.Request) -> web.StreamResponse:
        choice = {"index": 0, "message": {"content": "whole"}, "finish_reason": "stop"}
        return web.json_response({"choices": [choice], "usage": USAGE})

    rec.handler = reply
    req = completion_req(messages=[{"role": "user", "content": "x"}])
    chunks = await collect(client_for(port, session), req)
    assert rec.paths == ["/v1/chat/completions"]
    assert [(c.text, c.finish_reason) for c in chunks] == [("whole", "stop")]
    assert chunks[0].usage is not None and chunks[0].usage.total_tokens == 6


async def test_unstreamed_request_asks_for_one_answer_and_ignores_the_first_token_limit(
    raw: tuple[Recorder, int], session: aiohttp.ClientSession
) -> None:
    rec, port = raw

    async def reply(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(0.1)  # longer than the first-token limit: the answer is whole
        choice = {"index": 0, "text": "whole", "finish_reason": "length"}
        return web.json_response({"choices": [choice], "usage": USAGE})

    rec.handler = reply
    client = client_for(port, session, timeouts=HTTPTimeouts(first_token_s=0.02))
    extra = {"stream_options": {"include_usage": True}, "seed": 3}
    chunks = await collect(client, completion_req(stream=False, extra=extra))
    body = rec.bodies[0]
    assert body["stream"] is False
    assert "stream_options" not in body
    assert body["seed"] == 3
    assert [(c.text, c.finish_reason) for c in chunks] == [("whole", "length")]
    assert chunks[0].usage is not None and chunks[0].usage.completion_tokens == 2


async def test_unstreamed_request_against_the_simulated_engine(
    sim_port: int, session: aiohttp.ClientSession
) -> None:
    chunks = await collect(client_for(sim_port, session), completion_req(stream=False))
    assert [c.text for c in chunks] == [" w0 w1 w2 w3 w4"]
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5


async def test_complete_returns_what_generate_yields(
    sim_port: int, session: aiohttp.ClientSession
) -> None:
    client = client_for(sim_port, session)
    for stream in (False, True):
        req = completion_req(stream=stream, max_tokens=7)
        assert await client.complete(req) == await collect(client, req)
    chat = completion_req(stream=False, messages=[{"role": "user", "content": "hi"}])
    assert await client.complete(chat) == await collect(client, chat)


async def test_complete_accepts_a_streamed_answer(
    raw: tuple[Recorder, int], session: aiohttp.ClientSession
) -> None:
    rec, port = raw
    rec.handler = lambda r: sse(
        r, [text_event("a"), text_event("b", "stop"), ev({"choices": [], "usage": USAGE})]
    )
    chunks = await client_for(port, session).complete(completion_req(stream=False))
    assert rec.bodies[0]["stream"] is False
    assert [(c.text, c.finish_reason) for c in chunks] == [("a", None), ("b", "stop")]
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 6


async def test_one_piece_answers_reuse_the_connection(
    raw: tuple[Recorder, int], session: aiohttp.ClientSession
) -> None:
    """Whether the answer is taken with ``complete`` or with ``generate`` left after its
    last chunk, the next request goes over the same connection."""
    rec, port = raw
    peers: list[object] = []

    async def reply(request: web.Request) -> web.StreamResponse:
        peers.append(request.transport.get_extra_info("peername") if request.transport else None)
        choice = {"index": 0, "text": "whole", "finish_reason": "length"}
        return web.json_response({"choices": [choice], "usage": USAGE})

    rec.handler = reply
    client = client_for(port, session)
    await client.complete(completion_req(stream=False))
    async with aclosing(client.generate(completion_req(stream=False))) as stream:
        async for chunk in stream:
            if chunk.finish_reason is not None:
                break  # the consumer stops at the last chunk, before the generator ends
    await client.complete(completion_req(stream=False))
    assert len(peers) == 3 and peers[0] is not None
    assert peers[1] == peers[0] and peers[2] == peers[0]


async def test_the_aiohttp_path_reads_a_stream_to_its_end_after_done_and_reuses_it(
    raw: tuple[Recorder, int],
) -> None:
    """The body's end comes after ``[DONE]`` (here: once the consumer has the last
    chunk): it is read before the connection is given back, so the next request goes
    over the same connection."""
    rec, port = raw
    peers: list[object] = []

    async def reply(request: web.Request) -> web.StreamResponse:
        peers.append(request.transport.get_extra_info("peername") if request.transport else None)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(text_event("hi", "stop") + ev({"choices": [], "usage": USAGE}))
        await resp.write(b"data: [DONE]\n\n")
        await go.wait()
        await resp.write_eof()
        return resp

    rec.handler = reply
    session = make_session(limit=1024)  # aiohttp's transport
    try:
        client = client_for(port, session)
        assert client._fast_pool is None
        for _ in range(3):
            go = asyncio.Event()
            async with asyncio.timeout(10):
                async for chunk in client.generate(completion_req()):
                    if chunk.finish_reason is not None:
                        go.set()
        assert len(peers) == 3 and peers[0] is not None
        assert peers[1] == peers[0] and peers[2] == peers[0]
    finally:
        await session.close()


async def test_embed_posts_inputs_and_returns_json(
    raw: tuple[Recorder, int], session: aiohttp.ClientSession
) -> None:
    rec, port = raw
    answer = {
        "object": "list",
        "data": [{"index": 0, "embedding": [0.5]}, {"index": 1, "embedding": [0.25]}],
    }

    async def reply(request: web.Request) -> web.StreamResponse:
        return web.json_response(answer)

    rec.handler = reply
    assert await client_for(port, session).embed("emb", ["a", "b"]) == answer
    assert rec.bodies[0] == {"model": "emb", "input": ["a", "b"]}
    assert rec.paths == ["/v1/embeddings"]
    options = {"encoding_format": "base64", "dimensions": 2}
    await client_for(port, session).embed("emb", [[1, 2], [3]], options)
    assert rec.bodies[1] == {"model": "emb", "input": [[1, 2], [3]], **options}


@pytest.mark.parametrize(
    ("answer", "says"),
    [
        ([], "not a JSON object"),
        ({"object": "list"}, "has no data list"),
        ({"object": "list", "data": {}}, "has no data list"),
        ({"object": "list", "data": [{"embedding": [0.5]}]}, "has 1 embeddings for 2 inputs"),
    ],
)
async def test_an_embeddings_answer_without_one_embedding_per_input_is_an_engine_error(
    raw: tuple[Recorder, int], session: aiohttp.ClientSession, answer: object, says: str
) -> None:
    """An answer without ``data`` had reached the client as a 200 the OpenAI SDK cannot
    read (``ValueError: No embedding data received``)."""
    rec, port = raw

    async def reply(request: web.Request) -> web.StreamResponse:
        return web.json_response(answer)

    rec.handler = reply
    with pytest.raises(EngineStreamError, match=says) as info:
        await client_for(port, session).embed("emb", ["a", "b"])
    assert info.value.instance_id == "eng-0"


# --- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "retryable"),
    [
        (500, True),
        (503, True),
        (429, True),
        (408, True),
        (404, True),
        (401, True),
        (403, True),
        (409, False),
    ],
)
async def test_http_status_errors(
    raw: tuple[Recorder, int], session: aiohttp.ClientSession, status: int, retryable: bool
) -> None:
    rec, port = raw

    async def reply(request: web.Request) -> web.StreamResponse:
        body = {"error": {"message": f"engine says {status}", "type": "x", "code": status}}
        return web.json_response(body, status=status)

    rec.handler = reply
    with pytest.raises(EngineError, match=f"engine says {status}") as info:
        await collect(client_for(port, session), completion_req())
    assert type(info.value) is EngineError
    assert (info.value.status, info.value.retryable) == (status, retryable)
    assert info.value.instance_id == "eng-0"


@pytest.mark.parametrize(("status", "detail"), [(404, "Not Found"), (405, "Method Not Allowed")])
@pytest.mark.parametrize("chat", [False, True])
async def test_a_generation_route_the_engine_lacks_is_the_requests_fault(
    raw: tuple[Recorder, int], session: aiohttp.ClientSession, status: int, detail: str, chat: bool
) -> None:
    """A pooling model's server has no /v1/completions: FastAPI answers 404 {"detail"}.
    That is the request's fault (a 400 naming ``model``), not the instance's: clients
    sending completions to an embedding model had every instance of it ejected. A 404
    error object (vLLM's "model does not exist") stays the instance's fault, above."""
    rec, port = raw

    async def reply(request: web.Request) -> web.StreamResponse:
        return web.json_response({"detail": detail}, status=status)

    rec.handler = reply
    req = completion_req(messages=[{"role": "user", "content": "hi"}]) if chat else completion_req()
    with pytest.raises(EngineRequestRejectedError) as info:
        await collect(client_for(port, session), req)
    exc = info.value
    assert (exc.status, exc.retryable, exc.param) == (status, False, "model")
    route = "/v1/chat/completions" if chat else "/v1/completions"
    assert f"HTTP {status} from POST {route}: {detail}" in exc.message
    assert f"its model is not served for {route} by this engine" in exc.message


async def test_a_generation_route_answered_not_found_in_plain_text_is_the_requests_fault(
    raw: tuple[Recorder, int], session: aiohttp.ClientSession
) -> None:
    """A 404 whose body is no JSON at all (a proxy's page) is no engine's error object
    either: the route is not served."""
    rec, port = raw

    async def reply(request: web.Request) -> web.StreamResponse:
        return web.Response(status=404, text="404 page not found")

    rec.handler = reply
    with pytest.raises(EngineRequestRejectedError, match="404 page not found") as info:
        await collect(client_for(port, session), completion_req())
    assert (info.value.status, info.value.retryable, info.value.param) == (404, False, "model")


@pytest.mark.parametrize(("status", "retryable"), [(404, True), (405, False)])
async def test_a_route_other_than_generation_answering_not_found_is_the_instances_failure(
    raw: tuple[Recorder, int], session: aiohttp.ClientSession, status: int, retryable: bool
) -> None:
    """The "route not served" rejection is for the generation routes only: an engine
    whose ``GET /v1/models`` or ``GET /metrics`` answers 404 is itself at fault (another
    instance may be tried); a 405 is a plain EngineError too."""
    rec, port = raw

    async def reply(request: web.Request) -> web.StreamResponse:
        return web.json_response({"detail": "Not Found"}, status=status)

    rec.handler = reply
    client = client_for(port, session)
    for call in (client.models, client.stats):
        with pytest.raises(EngineError, match="Not Found") as info:
            await call()
        assert type(info.value) is EngineError
        assert (info.value.status, info.value.retryable) == (status, retryable)


@pytest.mark.parametrize("status", [400, 413, 422])
@pytest.mark.parametrize("stream", [False, True])
async def test_an_engine_refusing_the_request_is_a_rejection_not_a_failure(
    raw: tuple[Recorder, int], session: aiohttp.ClientSession, status: int, stream: bool
) -> None:
    rec, port = raw

    async def reply(request: web.Request) -> web.StreamResponse:
        body = {  # vLLM's ErrorResponse
            "object": "error",
            "message": "This model's maximum context length is 2048 tokens.",
            "type": "BadRequestError",
            "param": "max_tokens",
            "code": status,
        }
        return web.json_response(body, status=status)

    rec.handler = reply
    client = client_for(port, session)
    with pytest.raises(EngineRequestRejectedError) as info:
        if stream:
            await collect(client, completion_req(stream=True))
        else:
            await client.complete(completion_req(stream=False))
    exc = info.value
    assert (exc.status, exc.retryable, exc.param) == (status, False, "max_tokens")
    assert (exc.http_status, exc.error_type) == (400, "invalid_request_error")
    assert exc.message == (
        f"eng-0: rejected the request (HTTP {status} from POST /v1/completions): "
        "This model's maximum context length is 2048 tokens."
    )


@pytest.mark.parametrize(("status", "rejected"), [(400, True), (502, False)])
async def test_plain_text_error_body_is_the_message(
    raw: tuple[Recorder, int], session: aiohttp.ClientSession, status: int, rejected: bool
) -> None:
    rec, port = raw

    async def reply(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, text="the engine says no")

    rec.handler = reply
    with pytest.raises(EngineError, match="the engine says no") as info:
        await collect(client_for(port, session), completion_req())
    assert isinstance(info.value, EngineRequestRejectedError) is rejected
    assert info.value.retryable is not rejected
    assert info.value.param is None


async def test_connection_refused_is_retryable(session: aiohttp.ClientSession) -> None:
    client = client_for(closed_port(), session)
    with pytest.raises(EngineConnectionError) as info:
        await collect(client, completion_req())
    assert info.value.retryable is True
    with pytest.raises(EngineConnectionError):
        await client.prefill(completion_req())
    with pytest.raises(EngineError):
        await client.stats()
    assert await client.health() is False
    assert client.health_error is not None
    assert client.health_error.startswith("GET /health failed: Cannot connect")


async def test_health_is_false_on_error_status(
    raw: tuple[Recorder, int], session: aiohttp.ClientSession
) -> None:
    rec, port = raw

    async def reply(request: web.Request) -> web.StreamResponse:
        return web.Response(status=503)

    rec.handler = reply
    client = client_for(port, session)
    assert await client.health() is False
    assert client.health_error == "GET /health answered HTTP 503"  # why, for the breaker


async def test_health_is_true_only_for_200(
    raw: tuple[Recorder, int], session: aiohttp.ClientSession
) -> None:
    rec, port = raw
    status = 204

    async def reply(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status)

    rec.handler = reply
    client = client_for(port, session)
    assert await client.health() is False
    assert client.health_error == "GET /health answered HTTP 204"
    status = 200
    assert await client.health() is True
    assert client.health_error is None


async def test_malformed_json_before_output_is_retryable_stream_error(
    raw: tuple[Recorder, int], session: aiohttp.ClientSession
) -> None:
    rec, port = raw
    rec.handler = lambda r: sse(r, [b"data: {not json\n\n"])
    with pytest.raises(EngineStreamError) as info:
        await collect(client_for(port, session), completion_req())
    assert info.value.retryable is True


async def test_malformed_json_after_output_is_not_retryable(
    raw: tuple[Recorder, int], session: aiohttp.ClientSession
) -> None:
    rec, port = raw
    rec.handler = lambda r: sse(r, [text_event("a"), b"data: [1, 2\n\n"])
    got: list[Chunk] = []
    with pytest.raises(EngineStreamError) as info:
        await collect_into(got, client_for(port, session), completion_req())
    assert [c.text for c in got] == ["a"]
    assert info.value.retryable is False


async def test_stream_truncated_without_finish_reason(
    raw: tuple[Recorder, int], session: aiohttp.ClientSession
) -> None:
    rec, port = raw
    rec.handler = lambda r: sse(r, [text_event("a"), text_event("b")])
    got: list[Chunk] = []
    with pytest.raises(EngineStreamError, match="without a finish_reason") as info:
        await collect_into(got, client_for(port, session), completion_req())
    assert [c.text for c in got] == ["a", "b"]
    assert info.value.retryable is False


async def test_error_event_inside_stream(
    raw: tuple[Recorder, int], session: aiohttp.ClientSession
) -> None:
    rec, port = raw
    err = {"error": {"message": "KV cache exhausted", "type": "x", "code": 500}}
    rec.handler = lambda r: sse(r, [ev(err), b"data: [DONE]\n\n"])
    with pytest.raises(EngineError, match="KV cache exhausted") as info:
        await collect(client_for(port, session), completion_req())
    assert not isinstance(info.value, EngineStreamError)
    assert (info.value.status, info.value.retryable) == (500, True)


async def test_connection_dropped_mid_stream(
    raw: tuple[Recorder, int], session: aiohttp.ClientSession
) -> None:
    rec, port = raw

    async def drop(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(text_event("a"))
        assert request.transport is not None
        request.transport.close()
        return resp

    rec.handler = drop
    got: list[Chunk] = []
    with pytest.raises(EngineConnectionError) as info:
        await collect_into(got, client_for(port, session), completion_req())
    assert [c.text for c in got] == ["a"]
    assert info.value.retryable is False


async def test_first_token_timeout(
    raw: tuple[Recorder, int], session: aiohttp.ClientSession
) -> None:
    rec, port = raw
    never = asyncio.Event()

    async def hang(request: web.Request) -> web.StreamResponse:
        await never.wait()
        raise AssertionError("unreachable")

    rec.handler = hang
    client = client_for(port, session, timeouts=HTTPTimeouts(first_token_s=0.05))
    with pytest.raises(EngineTimeoutError) as info:
        async with asyncio.timeout(10):  # (a TimeoutError, not a hang, if it is not applied)
            await collect(client, completion_req())
    assert info.value.retryable is True
    await asyncio.wait_for(rec.disconnected.wait(), timeout=10)


async def test_idle_timeout_after_output(
    raw: tuple[Recorder, int], session: aiohttp.ClientSession
) -> None:
    rec, port = raw
    never = asyncio.Event()

    async def stall(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(text_event("a"))
        await never.wait()
        return resp

    rec.handler = stall
    client = client_for(port, session, timeouts=HTTPTimeouts(idle_s=0.05))
    got: list[Chunk] = []
    with pytest.raises(EngineTimeoutError) as info:
        async with asyncio.timeout(10):  # (a TimeoutError, not a hang, if idle_s is not applied)
            await collect_into(got, client, completion_req())
    assert [c.text for c in got] == ["a"]
    assert info.value.retryable is False
    await asyncio.wait_for(rec.disconnected.wait(), timeout=10)


async def test_prefill_is_vllm_only(session: aiohttp.ClientSession) -> None:
    client = client_for(closed_port(), session, dialect="sglang")
    with pytest.raises(EngineError, match="sglang") as info:
        await client.prefill(completion_req())
    assert info.value.retryable is False


def test_bad_dialect_and_timeouts_are_rejected() -> None:
    with pytest.raises(ValueError, match="dialect"):
        HTTPEngineClient(make_instance(), None, dialect="tgi")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="first_token_s"):
        HTTPTimeouts(first_token_s=0)


def test_dialect_defaults_to_instance_engine() -> None:
    inst = make_instance(engine="sglang")
    assert HTTPEngineClient(inst, None).dialect == "sglang"  # type: ignore[arg-type]
    assert HTTPEngineClient(make_instance(engine="sim"), None).dialect == "vllm"  # type: ignore[arg-type]


def test_an_unset_temperature_or_top_p_is_left_to_the_engine() -> None:
    client = HTTPEngineClient(make_instance("eng-0", model_name=MODEL), session=None)  # type: ignore[arg-type]
    unset = client.request_body(completion_req(temperature=None, top_p=None))
    assert "temperature" not in unset and "top_p" not in unset
    given = client.request_body(completion_req(temperature=0.0, top_p=0.5))
    assert (given["temperature"], given["top_p"]) == (0.0, 0.5)
    assert "max_tokens" not in client.request_body(completion_req(send_max_tokens=False))
    assert client.request_body(completion_req(max_tokens=9))["max_tokens"] == 9


def test_a_requests_priority_goes_to_a_vllm_engine_that_schedules_by_it() -> None:
    """A request's ``priority`` is sent to an instance whose vLLM engine schedules by it
    (``--scheduling-policy priority``) only, its prefill leg included."""
    req = completion_req(priority=1)
    fcfs = HTTPEngineClient(make_instance("a", model_name=MODEL), session=None)  # type: ignore[arg-type]
    assert "priority" not in fcfs.request_body(req)
    inst = make_instance("b", model_name=MODEL, engine_scheduling_policy="priority")
    client = HTTPEngineClient(inst, session=None)  # type: ignore[arg-type]
    assert client.request_body(req)["priority"] == 1
    assert client.request_body(completion_req())["priority"] == 2  # NORMAL's value
    assert client.prefill_body(req)["priority"] == 1
    other = HTTPEngineClient(inst, session=None, dialect="openai")  # type: ignore[arg-type]
    assert "priority" not in other.request_body(req)


def test_a_lora_adapter_is_asked_for_by_name_from_vllm_and_in_lora_path_from_sglang() -> None:
    req = completion_req(model="sql")
    vllm = HTTPEngineClient(make_instance("a", model_name=MODEL), session=None)  # type: ignore[arg-type]
    assert vllm.request_body(req)["model"] == "sql"
    inst = make_instance("b", model_name=MODEL, engine="sglang", lora_adapters=["sql"])
    sglang = HTTPEngineClient(inst, session=None)  # type: ignore[arg-type]
    body = sglang.request_body(req)
    assert (body["model"], body["lora_path"]) == (MODEL, "sql")
    assert "lora_path" not in sglang.request_body(completion_req())


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this machine")
async def test_an_engine_at_an_ipv6_address_is_reached(
    session: aiohttp.ClientSession, fake: FakeEngine
) -> None:
    runner, port = await start_engine_server(
        fake, model_name=MODEL, host="::1", shutdown_timeout=1.0
    )
    try:
        inst = make_instance("eng-6", host="::1", port=port, model_name=MODEL)
        assert inst.base_url == f"http://[::1]:{port}"
        client = HTTPEngineClient(inst, session)
        assert await client.health()
        chunks = await collect(client, completion_req(max_tokens=3))
        assert "".join(c.text for c in chunks) == " w0 w1 w2"
        assert (await client.complete(completion_req(request_id="r2")))[-1].finish_reason
    finally:
        await runner.cleanup()


async def test_a_compressed_answer_is_decoded_or_an_unusable_answer_never_a_broken_link(
    raw: tuple[Recorder, int], session: aiohttp.ClientSession, request: pytest.FixtureRequest
) -> None:
    """aiohttp's transport decodes gzip; the lean one asks for identity and fails a gzip
    answer as an unusable answer (EngineStreamError), not as a broken connection, which
    would eject the instance at once."""
    rec, port = raw

    async def reply(request: web.Request) -> web.StreamResponse:
        choice = {"index": 0, "text": "zipped", "finish_reason": "stop"}
        resp = web.json_response({"choices": [choice], "usage": USAGE})
        resp.enable_compression(web.ContentCoding.gzip)  # whatever the client asked for
        return resp

    rec.handler = reply
    client = client_for(port, session)
    if request.node.callspec.params["session"] == "aiohttp":
        chunks = await collect(client, completion_req(stream=False))
        assert [c.text for c in chunks] == ["zipped"]
        return
    with pytest.raises(EngineStreamError, match="Content-Encoding 'gzip'") as info:
        await collect(client, completion_req(stream=False))
    assert type(info.value) is EngineStreamError and info.value.retryable


# --- answers cut short, malformed or slow -------------------------------------------------


def test_a_negative_connection_limit_is_refused() -> None:
    with pytest.raises(ValueError, match="limit must be >= 0"):
        make_session(limit=-1)


def test_a_token_id_prompt_is_sent_as_ids_and_a_request_without_a_prompt_is_refused() -> None:
    timeouts = HTTPTimeouts(request_s=3.0)
    client = HTTPEngineClient(make_instance("eng-0", model_name=MODEL), None, timeouts=timeouts)  # type: ignore[arg-type]
    assert client.timeouts is timeouts
    assert client.request_body(completion_req(prompt=(1, 2, 3)))["prompt"] == [1, 2, 3]
    with pytest.raises(InvalidRequestError, match="neither prompt nor messages") as info:
        client.request_body(EngineRequest(request_id="r", model=MODEL))
    assert info.value.param == "prompt"


async def cut_short(request: web.Request, status: int, head: bytes) -> web.StreamResponse:
    """An answer whose body ends (the connection closed) before its Content-Length."""
    resp = web.StreamResponse(status=status)
    resp.content_length = 100
    await resp.prepare(request)
    await resp.write(head)
    assert request.transport is not None
    request.transport.close()
    return resp


async def test_an_error_answer_cut_short_is_still_the_engines_status_error(
    raw: tuple[Recorder, int], session: aiohttp.ClientSession
) -> None:
    rec, port = raw
    rec.handler = lambda r: cut_short(r, 500, b'{"error": {"mess')
    client = client_for(port, session)
    with pytest.raises(
        EngineError, match=r"^eng-0: HTTP 500 from GET /v1/models: Internal Server Error$"
    ) as info:
        await client.models()
    assert (type(info.value), info.value.status, info.value.retryable) == (EngineError, 500, True)
    with pytest.raises(
        EngineError, match="HTTP 500 from POST /v1/completions: Internal Server Error"
    ) as info:
        await collect(client, completion_req())
    assert (type(info.value), info.value.status, info.value.retryable) == (EngineError, 500, True)


async def test_a_json_answer_cut_short_or_stalled_is_a_connection_or_timeout_error(
    raw: tuple[Recorder, int], session: aiohttp.ClientSession
) -> None:
    rec, port = raw
    rec.handler = lambda r: cut_short(r, 200, b'{"object": "list", "da')
    client = client_for(port, session, timeouts=HTTPTimeouts(request_s=0.05))
    with pytest.raises(EngineConnectionError, match=r"^eng-0: GET /v1/models failed: "):
        await client.models()
    never = asyncio.Event()

    async def stall(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = 100
        await resp.prepare(request)
        await resp.write(b'{"object": "list", "da')
        await never.wait()
        return resp

    rec.handler = stall
    with pytest.raises(EngineTimeoutError, match=r"^eng-0: GET /v1/models timed out$"):
        async with asyncio.timeout(10):
            await client.models()


@pytest.mark.parametrize(
    ("answer", "error", "said"),
    [
        (lambda: web.Response(text="<html>busy</html>", content_type="application/json"),
         EngineStreamError, "eng-0: GET /v1/models returned invalid JSON"),
        (lambda: web.json_response({"object": "list"}), EngineStreamError,
         "eng-0: models response has no data list"),
    ],
)  # fmt: skip
async def test_a_models_answer_that_is_not_a_model_list_is_the_engines_failure(
    raw: tuple[Recorder, int],
    session: aiohttp.ClientSession,
    answer: Callable[[], web.Response],
    error: type[EngineError],
    said: str,
) -> None:
    rec, port = raw

    async def reply(request: web.Request) -> web.StreamResponse:
        return answer()

    rec.handler = reply
    with pytest.raises(error, match=f"^{re.escape(said)}$") as info:
        await client_for(port, session).models()
    assert type(info.value) is error


async def test_several_model_cards_none_of_them_the_instances_give_no_context_length(
    raw: tuple[Recorder, int], session: aiohttp.ClientSession
) -> None:
    rec, port = raw
    cards = [{"id": "other-a", "max_model_len": 1024}, {"id": "other-b", "max_model_len": 2048}]

    async def reply(request: web.Request) -> web.StreamResponse:
        return web.json_response({"object": "list", "data": cards})

    rec.handler = reply
    assert await client_for(port, session).context_length() is None


@pytest.mark.parametrize(
    ("answer", "error", "said"),
    [
        ([1, 2], EngineStreamError, "eng-0: prefill response is not a JSON object"),
        ({"error": {"message": "KV pool exhausted"}}, EngineError,
         "eng-0: prefill failed: KV pool exhausted"),
    ],
)  # fmt: skip
async def test_a_prefill_answer_that_is_not_a_completion_is_the_instances_failure(
    raw: tuple[Recorder, int],
    session: aiohttp.ClientSession,
    answer: object,
    error: type[EngineError],
    said: str,
) -> None:
    rec, port = raw

    async def reply(request: web.Request) -> web.StreamResponse:
        return web.json_response(answer)

    rec.handler = reply
    with pytest.raises(error, match=f"^{re.escape(said)}$") as info:
        await client_for(port, session).prefill(completion_req())
    assert type(info.value) is error and info.value.retryable is True


async def test_a_health_probe_unanswered_in_time_says_it_timed_out(
    raw: tuple[Recorder, int], session: aiohttp.ClientSession
) -> None:
    rec, port = raw
    never = asyncio.Event()

    async def hang(request: web.Request) -> web.StreamResponse:
        await never.wait()
        raise AssertionError("unreachable")

    rec.handler = hang
    client = client_for(port, session, timeouts=HTTPTimeouts(health_s=0.05))
    async with asyncio.timeout(10):
        assert await client.health() is False
    assert client.health_error == "GET /health timed out after 0.05 s"


async def test_a_one_piece_answer_that_is_not_json_is_an_unusable_answer(
    raw: tuple[Recorder, int], session: aiohttp.ClientSession
) -> None:
    rec, port = raw

    async def reply(request: web.Request) -> web.StreamResponse:
        return web.Response(text="{not json", content_type="application/json")

    rec.handler = reply
    client = client_for(port, session)
    for call in (client.complete, collect.__get__(client)):
        with pytest.raises(EngineStreamError, match=r"^eng-0: response is not valid JSON$"):
            await call(completion_req(stream=False))


async def test_a_one_piece_request_answered_with_a_broken_stream_fails_and_is_let_go(
    raw: tuple[Recorder, int], session: aiohttp.ClientSession
) -> None:
    """The engine streamed (not asked to) and broke its stream: the request fails as an
    unusable answer and its connection is closed, not left with the engine."""
    rec, port = raw
    never = asyncio.Event()

    async def reply(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(text_event("a") + b"data: {broken\n\n")
        await never.wait()
        return resp

    rec.handler = reply
    with pytest.raises(EngineStreamError, match="malformed JSON in stream") as info:
        async with asyncio.timeout(10):
            await client_for(port, session).complete(completion_req(stream=False))
    assert info.value.retryable is False  # after a token
    await asyncio.wait_for(rec.disconnected.wait(), timeout=10)


async def test_the_aiohttp_path_drops_bytes_after_done_or_closes_a_body_that_does_not_end(
    raw: tuple[Recorder, int],
) -> None:
    """After ``[DONE]`` the rest of the body is read and dropped, the connection reused;
    a body that does not end within ``idle_s`` has its connection closed, and the answer
    stands."""
    rec, port = raw
    peers: list[object] = []
    never = asyncio.Event()

    async def reply(request: web.Request) -> web.StreamResponse:
        peers.append(request.transport.get_extra_info("peername") if request.transport else None)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(text_event("hi", "stop") + ev({"choices": [], "usage": USAGE}))
        await resp.write(b"data: [DONE]\n\n")
        await go.wait()
        await resp.write(b": after the end\n\n")
        if len(peers) == 2:
            await never.wait()
        await resp.write_eof()
        return resp

    rec.handler = reply
    session = make_session(limit=1024)  # aiohttp's transport
    try:
        client = client_for(port, session, timeouts=HTTPTimeouts(idle_s=0.05))
        for _ in range(3):
            go = asyncio.Event()
            got = []
            async with asyncio.timeout(10):
                async for chunk in client.generate(completion_req()):
                    got.append(chunk.text)
                    if chunk.finish_reason is not None:
                        go.set()
            assert got == ["hi"]
        assert len(peers) == 3 and peers[0] is not None
        assert peers[1] == peers[0] and peers[2] != peers[1]
        await asyncio.wait_for(rec.disconnected.wait(), timeout=10)
    finally:
        await session.close()
