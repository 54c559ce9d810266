"""Streaming relay and whole responses: no buffering, failures, disconnects, timeouts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, cast

import aiohttp
import pytest
from aiohttp import web

from sage_llm.config import GatewayConfig
from sage_llm.control_plane.manager import ControlPlaneManager
from sage_llm.engines.base import Chunk, EngineClient, Usage
from sage_llm.engines.sse import ResponseFormat
from sage_llm.errors import EngineRequestRejectedError
from sage_llm.gateway.lean import LeanStream
from sage_llm.gateway.relay import (
    _as_the_client_named,
    _Choices,
    _merged,
    completion_body,
    fill_generation,
    merge_delta,
    merge_logprobs,
    relay_stream,
    sum_usage,
)
from sage_llm.gateway.server import start_gateway
from sage_llm.sim.core import SimEngineConfig
from sage_llm.sim.engine import SimEngine
from sage_llm.sim.server import start_engine_server
from sage_llm.tokens import tokenize
from sage_llm.types import RequestResult, RequestStatus
from tests.engines.fake_engine import probed_app, start_app
from tests.engines.probes import FaultyEngine
from tests.factories import MODEL, make_instance, make_metadata
from tests.gateway.harness import chat_body, read_events, serve
from tests.gateway.harness import completion_body as body_of


async def _first_event(resp: aiohttp.ClientResponse) -> Any:
    while True:
        line = await resp.content.readline()
        assert line, "stream ended before its first event"
        if line.startswith(b"data: "):
            return json.loads(line[len(b"data: ") :])


def _faulty(sim: SimEngine) -> EngineClient:
    return FaultyEngine(sim, fail_mid=lambda rid: True, mid_after=2)


BATCHING = pytest.mark.parametrize("batching", [False, True], ids=["task", "here"])
"""A stream's engine call in a task of its own, or in the relaying task (an engine client
with ``generate_batches``, as the HTTP one)."""


@BATCHING
async def test_first_chunk_is_sent_before_the_engine_finishes(batching: bool) -> None:
    held = serve(1, hold=lambda rid: True, hold_after=1, batching=batching)
    async with held as gw, aiohttp.ClientSession() as s:
        async with s.post(gw.url("/v1/completions"), json=body_of(stream=True)) as resp:
            assert resp.status == 200
            first = await _first_event(resp)
            assert first["choices"][0]["text"]
            assert first["choices"][0]["finish_reason"] is None
            assert gw.probes["sim-0"].in_flight == 1  # the engine is held after one chunk
            assert gw.manager._dispatcher is not None
            assert len(gw.manager._dispatcher._tasks) == (0 if batching else 1)
            gw.probes["sim-0"].gate.set()
            rest = await read_events(resp)
        assert rest[-1] == "[DONE]"
        assert rest[-2]["choices"][0]["finish_reason"] == "length"


@BATCHING
async def test_a_stream_ends_with_the_engines_last_chunk_before_the_request_is_accounted(
    batching: bool,
) -> None:
    # the engine is held after its last chunk (finish reason and usage): the client has
    # the whole stream, [DONE] and the body's end while the request is still running
    held = serve(1, hold=lambda rid: True, hold_after=4, batching=batching)
    async with held as gw, aiohttp.ClientSession() as s:
        body = body_of(stream=True, max_tokens=4, stream_options={"include_usage": True})
        headers = {"x-request-id": "ends-first"}
        async with s.post(gw.url("/v1/completions"), json=body, headers=headers) as resp:
            assert resp.status == 200
            events = await asyncio.wait_for(read_events(resp), 5)  # to the body's end
        assert events[-1] == "[DONE]"
        assert events[-2]["usage"]["completion_tokens"] == 4
        assert events[-3]["choices"][0]["finish_reason"] == "length"
        assert "".join(e["choices"][0]["text"] for e in events[:-2]).count(" ") == 4
        probe = gw.probes["sim-0"]
        assert probe.in_flight == 1
        assert await gw.manager.get_result("ends-first") is None  # not ended yet
        probe.gate.set()
        result = await gw.manager.wait_for_result("ends-first", timeout=5)
        assert result.status is RequestStatus.COMPLETED
        assert result.completion_tokens == 4
        assert probe.aborted == []


async def test_a_timeout_after_the_streams_end_cancels_the_request(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = GatewayConfig(request_timeout_s=0.3)
    held = serve(1, settings=settings, hold=lambda rid: True, hold_after=4, batching=True)
    async with held as gw, aiohttp.ClientSession() as s:
        body = body_of(stream=True, max_tokens=4)
        headers = {"x-request-id": "ends-then-hangs"}
        async with s.post(gw.url("/v1/completions"), json=body, headers=headers) as resp:
            events = await asyncio.wait_for(read_events(resp), 5)
        assert events[-1] == "[DONE]"
        assert not any("error" in e for e in events[:-1])
        result = await gw.manager.wait_for_result("ends-then-hangs", timeout=5)
        assert result.status is RequestStatus.CANCELLED  # its engine call never returned
        assert gw.probes["sim-0"].aborted == ["ends-then-hangs"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [
        "request ends-then-hangs passed its 0.3 s limit after its stream had ended; cancelling it"
    ]


async def test_an_engine_failure_after_its_last_chunk_leaves_the_answer_whole(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def fails_after_the_end(sim: SimEngine) -> EngineClient:
        return FaultyEngine(sim, fail_mid=lambda rid: True, mid_after=4)

    async with serve(1, wrap=fails_after_the_end) as gw, aiohttp.ClientSession() as s:
        body = body_of(stream=True, max_tokens=4, stream_options={"include_usage": True})
        headers = {"x-request-id": "fails-late"}
        async with s.post(gw.url("/v1/completions"), json=body, headers=headers) as resp:
            events = await read_events(resp)
        assert events[-1] == "[DONE]"
        assert events[-2]["usage"]["completion_tokens"] == 4
        assert not any("error" in e for e in events[:-1])
        result = await gw.manager.wait_for_result("fails-late", timeout=5)
    assert result.status is RequestStatus.FAILED  # what the engine said, kept in the records
    assert "mid-stream" in (result.error or "")
    assert any("after its whole answer was sent" in r.getMessage() for r in caplog.records)


async def test_a_stream_of_several_prompts_is_logged_under_the_clients_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Its failure line (and error event) name the id the client sent and got back, not a
    prompt's part of it (``multi-0``), so the line joins the access line."""
    async with serve(1, wrap=_faulty) as gw, aiohttp.ClientSession() as s:
        body = body_of(stream=True, max_tokens=8)
        body["prompt"] = ["first prompt", "second prompt"]
        headers = {"x-request-id": "multi"}
        async with s.post(gw.url("/v1/completions"), json=body, headers=headers) as resp:
            assert resp.status == 200 and resp.headers["x-request-id"] == "multi"
            events = await read_events(resp)
    assert events[-1] == "[DONE]" and "error" in events[-2]
    failed = [r for r in caplog.records if "(after its 200" in r.getMessage()]
    assert [getattr(r, "request_id", None) for r in failed] == ["multi"]
    assert failed[0].getMessage().startswith("request multi failed")


async def test_a_request_of_several_prompts_times_out_under_the_clients_id() -> None:
    settings = GatewayConfig(request_timeout_s=0.3)
    held = serve(1, settings=settings, hold=lambda rid: True, hold_after=1)
    async with held as gw, aiohttp.ClientSession() as s:
        body = body_of(max_tokens=8)
        body["prompt"] = ["first prompt", "second prompt"]
        headers = {"x-request-id": "late"}
        async with s.post(gw.url("/v1/completions"), json=body, headers=headers) as resp:
            error = (await resp.json())["error"]
    assert resp.status == 504
    assert error["message"].startswith("request late did not finish within 0.3 s"), error


@pytest.mark.parametrize("stream", [False, True])
async def test_a_cancelled_prompt_of_several_is_said_of_the_clients_request(stream: bool) -> None:
    """The error named the manager's request of one prompt (``gone#0``), an id the client
    never saw, where the timeout's says the client's (the gateway's shutdown said so)."""
    held = serve(1, hold=lambda rid: True, hold_after=0 if stream else 1)
    async with held as gw, aiohttp.ClientSession() as s:
        body = body_of(max_tokens=8, stream=stream)
        body["prompt"] = ["first prompt", "second prompt"]
        headers = {"x-request-id": "gone"}
        post = asyncio.ensure_future(s.post(gw.url("/v1/completions"), json=body, headers=headers))
        for _ in range(1000):  # (10 s at most, real time)
            if gw.manager.get_status()["running_requests"] >= 2:
                break
            await asyncio.sleep(0.01)
        assert gw.manager.get_status()["running_requests"] >= 2
        for k in (0, 1):  # as the control plane's stop cancels them
            assert await gw.manager.cancel_request(f"gone#{k}")
        async with await post as resp:
            if stream and resp.status == 200:
                events = await read_events(resp)
                error = events[-2]["error"]
            else:
                error = (await resp.json())["error"]
    assert error["message"].replace("'", "").startswith("request gone was cancelled"), error


async def test_mid_stream_failure_ends_with_an_error_event_then_done() -> None:
    async with serve(1, wrap=_faulty) as gw, aiohttp.ClientSession() as s:
        body = chat_body(stream=True, max_tokens=8, stream_options={"include_usage": True})
        headers = {"x-request-id": "fails-mid"}
        async with s.post(gw.url("/v1/chat/completions"), json=body, headers=headers) as resp:
            assert resp.status == 200
            events = await read_events(resp)
        assert events[-1] == "[DONE]"
        error = events[-2]["error"]
        assert error["type"] == "engine_error"
        assert "mid-stream" in error["message"]
        content = [
            e for e in events[:-2] if e["choices"] and e["choices"][0]["delta"].get("content")
        ]
        assert len(content) == 2
        assert not any(e.get("usage") for e in events[:-1] if isinstance(e, dict))
        result = await gw.manager.wait_for_result("fails-mid")
        assert result.status is RequestStatus.FAILED


async def test_failure_of_a_whole_response_is_502_json() -> None:
    async with (
        serve(1, wrap=_faulty) as gw,
        aiohttp.ClientSession() as s,
        s.post(gw.url("/v1/completions"), json=body_of(max_tokens=8)) as resp,
    ):
        assert resp.status == 502
        assert (await resp.json())["error"]["type"] == "engine_error"


async def test_failure_before_the_first_chunk_is_a_json_status() -> None:
    def fail_first(sim: SimEngine) -> EngineClient:
        return FaultyEngine(sim, fail_before=lambda rid: True)

    async with (
        serve(1, wrap=fail_first) as gw,
        aiohttp.ClientSession() as s,
        s.post(gw.url("/v1/completions"), json=body_of(stream=True)) as resp,
    ):
        assert resp.status == 502
        assert resp.content_type == "application/json"


@BATCHING
async def test_client_disconnect_mid_stream_cancels_the_request(batching: bool) -> None:
    async with serve(1, hold=lambda rid: True, hold_after=1, batching=batching) as gw:
        probe = gw.probes["sim-0"]
        headers = {"x-request-id": "goes-away"}
        async with aiohttp.ClientSession() as s:
            resp = await s.post(
                gw.url("/v1/completions"), json=body_of(stream=True), headers=headers
            )
            await _first_event(resp)
            resp.close()
        await asyncio.wait_for(probe.aborted_event.wait(), 5)
        assert probe.aborted == ["goes-away"]
        result = await gw.manager.wait_for_result("goes-away", timeout=5)
        assert result.status is RequestStatus.CANCELLED


async def test_client_disconnect_while_waiting_for_a_whole_response() -> None:
    async with serve(1, hold=lambda rid: True, hold_after=0) as gw:
        probe = gw.probes["sim-0"]
        async with aiohttp.ClientSession() as s:
            task = asyncio.create_task(
                s.post(
                    gw.url("/v1/completions"), json=body_of(), headers={"x-request-id": "impatient"}
                )
            )
            await asyncio.wait_for(probe.started_event.wait(), 5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        await asyncio.wait_for(probe.aborted_event.wait(), 5)
        result = await gw.manager.wait_for_result("impatient", timeout=5)
        assert result.status is RequestStatus.CANCELLED


@BATCHING
async def test_timeout_mid_stream_ends_with_a_timeout_event(batching: bool) -> None:
    settings = GatewayConfig(request_timeout_s=0.3)
    held = serve(1, settings=settings, hold=lambda rid: True, hold_after=1, batching=batching)
    async with held as gw:
        async with aiohttp.ClientSession() as s:
            headers = {"x-request-id": "slow-stream"}
            async with s.post(
                gw.url("/v1/completions"), json=body_of(stream=True), headers=headers
            ) as resp:
                assert resp.status == 200
                events = await read_events(resp)
        assert events[-1] == "[DONE]"
        assert events[-2]["error"]["type"] == "timeout_error"
        assert events[-2]["error"]["code"] == 504
        assert events[0]["choices"][0]["text"]
        result = await gw.manager.wait_for_result("slow-stream", timeout=5)
        assert result.status is RequestStatus.CANCELLED
        assert result.error == "timed out: its limit of 0.3 s passed"  # not "by the caller"


async def test_a_timed_out_answer_says_so_in_its_result() -> None:
    settings = GatewayConfig(request_timeout_s=0.3)
    async with serve(1, settings=settings, hold=lambda rid: True) as gw:
        async with aiohttp.ClientSession() as s:
            headers = {"x-request-id": "slow"}
            async with s.post(gw.url("/v1/completions"), json=body_of(), headers=headers) as r:
                assert r.status == 504
        result = await gw.manager.wait_for_result("slow", timeout=5)
        assert (result.status, result.error) == (
            RequestStatus.CANCELLED, "timed out: its limit of 0.3 s passed"
        )  # fmt: skip


def test_merge_logprobs() -> None:
    assert merge_logprobs(None) is None
    assert merge_logprobs([{"content": [1]}]) == {"content": [1]}
    assert merge_logprobs([{"content": [1]}, {"content": [2, 3]}]) == {"content": [1, 2, 3]}
    completions = [
        {"tokens": ["a"], "token_logprobs": [-0.1], "top_logprobs": None, "text_offset": [0]},
        {"tokens": ["b"], "token_logprobs": [-0.2], "top_logprobs": None, "text_offset": [1]},
    ]
    merged = merge_logprobs(completions)
    assert merged["tokens"] == ["a", "b"]
    assert merged["token_logprobs"] == [-0.1, -0.2]
    assert merged["text_offset"] == [0, 1]
    assert merged["top_logprobs"] is None
    assert merge_logprobs([[1], [2]]) == [1, 2]
    # forms that cannot be joined (an engine that changed its form mid-answer): the last
    assert merge_logprobs([{"content": [1]}, [2]]) == [2]
    assert merge_logprobs([[1], "x"]) == "x"


def test_completion_body_builds_one_choice_per_index() -> None:
    choices = _Choices()
    choices.add(Chunk("a", index=1))
    choices.add(Chunk("x", index=0, logprobs={"content": [{"token": "x"}]}))
    choices.add(Chunk("b", index=1, finish_reason="stop"))
    choices.add(Chunk("y", index=0, finish_reason="length", usage=Usage(3, 4, 1)))
    fmt = ResponseFormat(chat=True, request_id="r1", model="m", created=7)
    assert choices.usage == Usage(3, 4, 1)
    body = completion_body(fmt, choices, choices.usage)
    assert body["id"] == "chatcmpl-r1"
    assert body["object"] == "chat.completion"
    assert [c["message"]["content"] for c in body["choices"]] == ["xy", "ab"]
    assert [c["finish_reason"] for c in body["choices"]] == ["length", "stop"]
    assert body["choices"][0]["logprobs"] == {"content": [{"token": "x"}]}
    assert body["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 4,
        "total_tokens": 7,
        "prompt_tokens_details": {"cached_tokens": 1},
    }


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "aiohttp"])
async def test_client_gone_when_the_stream_starts_cancels_quietly(
    lean: bool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def closing_transport(self: object, *args: object) -> None:
        raise ConnectionResetError("Cannot write to closing transport")

    async with (
        serve(1, settings=GatewayConfig(lean_server=lean)) as gw,
        aiohttp.ClientSession() as s,
    ):
        if lean:
            monkeypatch.setattr(LeanStream, "write", closing_transport)
        else:
            monkeypatch.setattr(web.StreamResponse, "prepare", closing_transport)
        headers = {"x-request-id": "left-early"}
        with contextlib.suppress(aiohttp.ClientError):
            async with s.post(
                gw.url("/v1/completions"), json=body_of(stream=True), headers=headers
            ) as resp:
                await resp.read()
        result = await gw.manager.wait_for_result("left-early", timeout=5)
    assert result.status is RequestStatus.CANCELLED
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# --- what a vLLM engine sends beyond text reaches the client --------------------------------

_CALL = {"index": 0, "id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": ""}}  # fmt: skip
_ARGS = ('{"city": ', '"Paris"}')


async def _sse(request: web.Request, events: list[dict[str, Any]]) -> web.StreamResponse:
    """Answer ``request`` with ``events`` as server-sent events, then ``[DONE]``."""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for event in events:
        await resp.write(f"data: {json.dumps(event)}\n\n".encode())
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


def _chat_app(chat: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.Application:
    app = probed_app()
    app.router.add_post("/v1/chat/completions", chat)
    return app


@contextlib.asynccontextmanager
async def _gateway_over(app: web.Application, engine_stream: str) -> AsyncIterator[str]:
    """A gateway over the engine ``app`` (model ``m``); yields its chat completions URL."""
    engine, engine_port = await start_app(app)
    manager = ControlPlaneManager(mode="http", engine_stream=engine_stream)
    manager.register_instance(make_instance("engine", port=engine_port, model_name="m"))
    site, port = await start_gateway(manager, None, manage_lifecycle=True, environ={})
    try:
        yield f"http://127.0.0.1:{port}/v1/chat/completions"
    finally:
        await site.cleanup()
        await engine.cleanup()


def _tool_engine() -> web.Application:
    """A vLLM-shaped chat engine that answers with reasoning and a tool call, whole or as
    deltas (the call's arguments in two pieces, as vLLM streams them); a whole answer's
    content is ``""`` when the request forced the call, as vLLM's."""

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        head = {"id": "chatcmpl-e", "object": "chat.completion", "created": 1,
                "model": body["model"]}  # fmt: skip
        usage = {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12,
                 "completion_tokens_details": {"reasoning_tokens": 2}}  # fmt: skip
        if not body.get("stream"):
            call = {**_CALL, "function": {"name": "get_weather", "arguments": "".join(_ARGS)}}
            forced = body.get("tool_choice") == "required" or isinstance(
                body.get("tool_choice"), dict
            )
            message = {"role": "assistant", "content": "" if forced else None,
                       "reasoning_content": "I think.", "tool_calls": [call]}  # fmt: skip
            choice = {"index": 0, "message": message, "logprobs": None,
                      "finish_reason": "tool_calls", "stop_reason": 128008}  # fmt: skip
            return web.json_response({**head, "choices": [choice], "usage": usage})
        deltas = [
            {"role": "assistant", "content": ""},
            {"reasoning_content": "I "},
            {"reasoning_content": "think."},
            {"tool_calls": [_CALL]},
            *({"tool_calls": [{"index": 0, "function": {"arguments": a}}]} for a in _ARGS),
        ]
        chunk = {**head, "object": "chat.completion.chunk"}
        choices = [
            {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
            for delta in deltas
        ]
        choices.append({"index": 0, "delta": {}, "logprobs": None, "finish_reason": "tool_calls",
                        "stop_reason": 128008})  # fmt: skip
        events = [{**chunk, "choices": [choice]} for choice in choices]
        return await _sse(request, [*events, {**chunk, "choices": [], "usage": usage}])

    return _chat_app(chat)


_FORCED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.mark.parametrize(
    "tool_choice", [None, "required", _FORCED], ids=["auto", "required", "named"]
)
@pytest.mark.parametrize("engine_stream", ["client", "always"])  # engine answers whole / streamed
async def test_tool_calls_reasoning_and_stop_reason_reach_the_client(
    engine_stream: str, tool_choice: Any
) -> None:
    """A whole answer that calls a tool has null content, or ``""`` when the request forced
    the call, as vLLM answers, whether the engine answered whole or streamed it."""
    body = {"model": "m", "messages": [{"role": "user", "content": "weather?"}],
            "tools": [{"type": "function", "function": {"name": "get_weather"}}]}  # fmt: skip
    if tool_choice is not None:
        body["tool_choice"] = tool_choice
    async with _gateway_over(_tool_engine(), engine_stream) as url, aiohttp.ClientSession() as http:
        async with http.post(url, json=body) as r:
            whole = await r.json()
        streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
        async with http.post(url, json=streamed) as r:
            events = await read_events(r)
    [choice] = whole["choices"]
    # the engine's other usage fields reach the client, whole or streamed
    details = {"reasoning_tokens": 2}
    assert whole["usage"]["completion_tokens_details"] == details
    usages = [e["usage"] for e in events if isinstance(e, dict) and e.get("usage")]
    assert [u["completion_tokens_details"] for u in usages] == [details]
    # the engine said nothing of cached tokens: null details (as vLLM's), not 0 cached
    assert whole["usage"]["prompt_tokens_details"] is None
    assert [u["prompt_tokens_details"] for u in usages] == [None]
    # a whole answer's tool calls have no "index" (a stream's deltas do), as vLLM answers
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}  # fmt: skip
    content = None if tool_choice is None else ""
    assert choice["message"] == {"role": "assistant", "content": content,
                                 "reasoning_content": "I think.", "tool_calls": [call]}  # fmt: skip
    assert (choice["finish_reason"], choice["stop_reason"]) == ("tool_calls", 128008)
    deltas = [e["choices"][0]["delta"] for e in events if isinstance(e, dict) and e["choices"]]
    assert {"reasoning_content": "I "} in deltas
    assert {"tool_calls": [_CALL]} in deltas
    assert {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]} in deltas
    last = [e for e in events if isinstance(e, dict) and e["choices"]][-1]["choices"][0]
    assert (last["finish_reason"], last["stop_reason"]) == ("tool_calls", 128008)


def _ids_engine() -> web.Application:
    """A vLLM-shaped chat engine that honours ``return_token_ids`` (each choice's
    ``token_ids``; the answer's ``prompt_token_ids``) and adds ``system_fingerprint`` and
    its PD ``kv_transfer_params`` to every object, whole or streamed."""

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        ids = bool(body.get("return_token_ids"))
        head: dict[str, Any] = {"id": "chatcmpl-e", "object": "chat.completion", "created": 1,
                                "model": body["model"], "system_fingerprint": "fp-1",
                                "kv_transfer_params": {"remote_block_ids": [1]}}  # fmt: skip
        usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
        if not body.get("stream"):
            choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": "length",
                      "message": {"role": "assistant", "content": "a b"}}  # fmt: skip
            if ids:
                choice["token_ids"] = [10, 11]
                head["prompt_token_ids"] = [1, 2, 3]
            return web.json_response({**head, "choices": [choice], "usage": usage})
        chunk = {**head, "object": "chat.completion.chunk"}
        role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}  # fmt: skip
        events: list[dict[str, Any]] = [{**chunk, "choices": [role]}]
        if ids:
            events[0]["prompt_token_ids"] = [1, 2, 3]
        for i, (text, finish) in enumerate([("a", None), (" b", "length")]):
            choice = {"index": 0, "delta": {"content": text}, "logprobs": None,
                      "finish_reason": finish}  # fmt: skip
            if ids:
                choice["token_ids"] = [10 + i]
            events.append({**chunk, "choices": [choice]})
        events.append({**chunk, "choices": [], "usage": usage})
        return await _sse(request, events)

    return _chat_app(chat)


@pytest.mark.parametrize("engine_stream", ["client", "always"])  # engine answers whole / streamed
async def test_token_ids_and_the_engine_objects_own_fields_reach_the_client(
    engine_stream: str,
) -> None:
    """vLLM's ``return_token_ids``: each choice's ``token_ids`` and the answer's
    ``prompt_token_ids``, and fields such as ``system_fingerprint``, reach the client,
    whole and streamed; the engines' ``kv_transfer_params`` do not."""
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}],
            "return_token_ids": True}  # fmt: skip
    async with _gateway_over(_ids_engine(), engine_stream) as url, aiohttp.ClientSession() as http:
        async with http.post(url, json=body) as r:
            whole = await r.json()
        async with http.post(url, json={**body, "stream": True}) as r:
            events = [e for e in await read_events(r) if isinstance(e, dict)]
        async with http.post(url, json={**body, "return_token_ids": False}) as r:
            plain = await r.json()
    assert whole["choices"][0]["token_ids"] == [10, 11]
    assert whole["prompt_token_ids"] == [1, 2, 3]
    assert whole["system_fingerprint"] == "fp-1"
    assert whole["id"].startswith("chatcmpl-") and whole["id"] != "chatcmpl-e"
    assert "token_ids" not in plain["choices"][0] and "prompt_token_ids" not in plain
    assert [e["choices"][0].get("token_ids") for e in events if e["choices"]] == [
        *([None] * (len([e for e in events if e["choices"]]) - 2)),
        [10],
        [11],
    ]
    assert any(e.get("prompt_token_ids") == [1, 2, 3] for e in events)
    texts = [e for e in events if e["choices"] and e["choices"][0]["delta"].get("content")]
    assert len(texts) == 2 and all(e["system_fingerprint"] == "fp-1" for e in texts)
    for obj in (whole, plain, *events):
        assert "kv_transfer_params" not in obj or obj["kv_transfer_params"] is None


def _fingerprint_on_usage_engine() -> web.Application:
    """vLLM 0.32's stream: ``system_fingerprint`` on its usage event alone (choices
    ``[]``), the last event before ``[DONE]``."""

    async def chat(request: web.Request) -> web.StreamResponse:
        head = {"id": "chatcmpl-e", "object": "chat.completion.chunk", "created": 1,
                "model": "m"}  # fmt: skip
        events: list[dict[str, Any]] = [
            {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                  "finish_reason": None}]},
            {**head, "choices": [{"index": 0, "delta": {"content": "a"}, "finish_reason": None}]},
            {**head, "choices": [{"index": 0, "delta": {"content": " b"},
                                  "finish_reason": "length"}]},
            {**head, "choices": [], "system_fingerprint": "fp-1",
             "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}},
        ]  # fmt: skip
        return await _sse(request, events)

    return _chat_app(chat)


def _user_role_engine() -> web.Application:
    """vLLM's answer to ``add_generation_prompt: false``: the role of the last message
    (here ``user``), whole or streamed, and no ``tool_calls`` (vLLM 0.32 leaves an empty
    list out)."""

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        head = {"id": "chatcmpl-e", "created": 1, "model": "m"}
        usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
        if not body.get("stream"):
            message = {"role": "user", "content": "a b", "refusal": None}
            choice = {"index": 0, "message": message, "finish_reason": "length"}
            whole = {**head, "object": "chat.completion", "usage": usage, "choices": [choice]}
            return web.json_response(whole)
        head["object"] = "chat.completion.chunk"
        events: list[dict[str, Any]] = [
            {**head, "choices": [{"index": 0, "delta": {"role": "user", "content": ""},
                                  "finish_reason": None}]},
            {**head, "choices": [{"index": 0, "delta": {"content": "a"}, "finish_reason": None}]},
            {**head, "choices": [{"index": 0, "delta": {"content": " b"},
                                  "finish_reason": "length"}]},
            {**head, "choices": [], "usage": usage},
        ]  # fmt: skip
        return await _sse(request, events)

    return _chat_app(chat)


@pytest.mark.parametrize("engine_stream", ["client", "always"])
async def test_a_whole_chat_answer_has_the_engines_role_and_no_empty_tool_calls(
    engine_stream: str,
) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}],
            "add_generation_prompt": False}  # fmt: skip
    async with (
        _gateway_over(_user_role_engine(), engine_stream) as url,
        aiohttp.ClientSession() as http,
    ):
        async with http.post(url, json=body) as r:
            whole = await r.json()
        async with http.post(url, json={**body, "stream": True}) as r:
            events = [e for e in await read_events(r) if isinstance(e, dict)]
    message = whole["choices"][0]["message"]
    assert (message["role"], message["content"]) == ("user", "a b")
    assert "tool_calls" not in message
    roles = [e["choices"][0]["delta"].get("role") for e in events if e["choices"]]
    assert [r for r in roles if r is not None] == ["user"]  # one role event, the engine's
    assert roles[0] == "user"
    assert (
        "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
        == "a b"
    )


@pytest.mark.parametrize("include_usage", [False, True])
async def test_the_fingerprint_of_the_engines_usage_event_reaches_the_client(
    include_usage: bool,
) -> None:
    """The gateway asks every engine stream for its usage; vLLM then says
    ``system_fingerprint`` on that usage event only, which the client may not have asked
    for: it goes with the last chunk, streamed or assembled into a whole answer."""
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    options = {"stream_options": {"include_usage": True}} if include_usage else {}
    async with (
        _gateway_over(_fingerprint_on_usage_engine(), "always") as url,
        aiohttp.ClientSession() as http,
    ):
        async with http.post(url, json=body) as r:
            whole = await r.json()
        async with http.post(url, json={**body, "stream": True, **options}) as r:
            events = [e for e in await read_events(r) if isinstance(e, dict)]
    assert whole["system_fingerprint"] == "fp-1"
    assert whole["choices"][0]["message"]["content"] == "a b"
    marked = [e for e in events if "system_fingerprint" in e]
    assert [e["choices"][0]["finish_reason"] for e in marked] == ["length"]
    assert marked[0]["system_fingerprint"] == "fp-1"
    assert any("usage" in e for e in events) is include_usage


async def test_each_of_several_choices_carries_its_own_token_ids() -> None:
    """``n`` = 2 with ``return_token_ids``: each choice, whole or streamed, has the ids of
    its own text (the simulated engine's ids are its text's tokens), not the first's."""
    body = body_of(n=2, return_token_ids=True, max_tokens=3)
    async with serve() as gw, aiohttp.ClientSession() as http:
        async with http.post(gw.url("/v1/completions"), json=body) as r:
            assert r.status == 200
            whole = await r.json()
        async with http.post(gw.url("/v1/completions"), json={**body, "stream": True}) as r:
            events = [e for e in await read_events(r) if isinstance(e, dict)]
    choices = sorted(whole["choices"], key=lambda c: c["index"])
    assert [c["index"] for c in choices] == [0, 1]
    for c in choices:
        assert c["token_ids"] == tokenize(c["text"]) and len(c["token_ids"]) == 3
    assert choices[0]["token_ids"] != choices[1]["token_ids"]
    texts: dict[int, str] = {0: "", 1: ""}
    ids: dict[int, list[int]] = {0: [], 1: []}
    for event in events:
        for c in event["choices"]:
            texts[c["index"]] += c["text"]
            ids[c["index"]] += c.get("token_ids") or []
    for index in (0, 1):
        assert ids[index] == tokenize(texts[index]) and len(ids[index]) == 3
    assert ids[0] != ids[1]


async def test_continuous_usage_stats_reach_the_client_with_every_chunk() -> None:
    """vLLM's ``stream_options.continuous_usage_stats`` (with ``include_usage``): the engine
    puts the usage so far in every chunk, and each reaches the client with its chunk;
    without it, no chunk but the last usage chunk has one."""
    engine = SimEngine("sim-0", SimEngineConfig(speed=100.0))
    runner, engine_port = await start_engine_server(engine, model_name="m")
    manager = ControlPlaneManager(mode="http")
    manager.register_instance(make_instance("cont", port=engine_port, model_name="m"))
    site, port = await start_gateway(manager, None, manage_lifecycle=True, environ={})
    body = {"model": "m", "prompt": "Hello there", "max_tokens": 4, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}  # fmt: skip
    url = f"http://127.0.0.1:{port}/v1/completions"
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(url, json=body) as r:
                events = [e for e in await read_events(r) if isinstance(e, dict)]
            plain = {**body, "stream_options": {"include_usage": True}}
            async with http.post(url, json=plain) as r:
                without = [e for e in await read_events(r) if isinstance(e, dict)]
            chat_body_ = {**body, "messages": [{"role": "user", "content": "Hello there"}]}
            del chat_body_["prompt"]
            async with http.post(
                url.replace("/completions", "/chat/completions"), json=chat_body_
            ) as r:
                chat = await read_events(r)
    finally:
        await site.cleanup()
        await runner.cleanup()
        await engine.aclose()
    chunks = [e for e in events if e["choices"]]
    assert [e["usage"]["completion_tokens"] for e in chunks] == [1, 2, 3, 4]
    # a chat: the engine's role event's usage goes with the gateway's role chunk (one
    # role chunk, as the engine sent it, not a role chunk and an empty one)
    chat_events = [e for e in chat if isinstance(e, dict) and e["choices"]]
    assert chat_events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [e["usage"]["completion_tokens"] for e in chat_events] == [0, 1, 2, 3, 4]
    prompt = chunks[0]["usage"]["prompt_tokens"]
    assert all(
        e["usage"]["total_tokens"] == prompt + e["usage"]["completion_tokens"] for e in chunks
    )
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 4
    assert [e.get("usage") for e in without if e["choices"]] == [None] * 4


def test_merge_delta_assembles_a_message_as_a_client_does() -> None:
    merged: dict[str, Any] = {}
    for part in (
        {"reasoning_content": "a"},
        {
            "tool_calls": [
                {
                    "index": 0,
                    "id": "c0",
                    "type": "function",
                    "function": {"name": "f", "arguments": "{"},
                }
            ]
        },
        {
            "tool_calls": [
                {
                    "index": 1,
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "g", "arguments": ""},
                }
            ]
        },
        {"tool_calls": [{"index": 0, "type": "function", "function": {"arguments": "}"}}]},
        {"reasoning_content": "b", "annotations": ["x"]},
        {"annotations": ["y"]},
    ):
        merge_delta(merged, part)
    assert merged == {
        "reasoning_content": "ab",
        "tool_calls": [
            {
                "index": 0,
                "id": "c0",
                "type": "function",
                "function": {"name": "f", "arguments": "{}"},
            },
            {
                "index": 1,
                "id": "c1",
                "type": "function",
                "function": {"name": "g", "arguments": ""},
            },
        ],
        "annotations": ["x", "y"],  # a list without indices is extended
    }


async def test_echo_and_prompt_logprobs_of_simulated_engines_reach_the_client() -> None:
    """The in-process simulated engines answer ``echo`` and ``prompt_logprobs`` as vLLM's:
    a completion led by its prompt (whole and streamed), and the prompt's logprobs in the
    choice (a completion) or the answer (a chat)."""
    prompt = "Tell me about the control plane."
    async with serve(1) as gw, aiohttp.ClientSession() as http:
        url = gw.url("/v1/completions")
        async with http.post(url, json=body_of(prompt, echo=True)) as r:
            whole = await r.json()
        async with http.post(url, json=body_of(prompt, echo=True, stream=True)) as r:
            events = [e for e in await read_events(r) if isinstance(e, dict)]
        async with http.post(url, json=body_of(prompt, prompt_logprobs=1)) as r:
            scored = await r.json()
        async with http.post(gw.url("/v1/chat/completions"),
                             json=chat_body(prompt_logprobs=0)) as r:  # fmt: skip
            chat = await r.json()
        async with http.post(url, json=body_of(prompt, prompt_logprobs=1, stream=True)) as r:
            refused = (r.status, await r.json())
    assert whole["choices"][0]["text"].startswith(prompt)
    streamed = "".join(e["choices"][0]["text"] for e in events if e["choices"])
    assert streamed.startswith(prompt) and len(streamed) > len(prompt)
    drawn = scored["choices"][0]["prompt_logprobs"]
    assert drawn[0] is None and len(drawn) == scored["usage"]["prompt_tokens"]
    assert chat["prompt_logprobs"][0] is None
    assert len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"]
    assert refused[0] == 400 and refused[1]["error"]["param"] == "prompt_logprobs"


def test_several_prompts_usage_sums_the_engines_other_fields() -> None:
    one = Usage(3, 5, 1, {"completion_tokens_details": {"reasoning_tokens": 2}, "tier": "a"})
    two = Usage(4, 6, 0, {"completion_tokens_details": {"reasoning_tokens": 3, "audio": 1}})
    total = sum_usage([one, two, Usage(1, 1)])
    assert (total.prompt_tokens, total.completion_tokens, total.cached_tokens) == (8, 12, 1)
    assert total.extra == {
        "completion_tokens_details": {"reasoning_tokens": 5, "audio": 1},
        "tier": "a",
    }
    assert one.extra == {"completion_tokens_details": {"reasoning_tokens": 2}, "tier": "a"}
    assert sum_usage([Usage(1, 1)]).extra is None
    unsaid = sum_usage([Usage(1, 1, None), Usage(1, 1, None)])
    assert unsaid.cached_tokens is None  # no engine said: unknown, not 0
    assert sum_usage([Usage(1, 1, None), Usage(1, 1, 2)]).cached_tokens == 2
    flags = sum_usage([Usage(1, 1, 0, {"is_cached": True}), Usage(1, 1, 0, {"is_cached": True})])
    assert flags.extra == {"is_cached": True}  # a flag is kept, not added up


def test_an_engines_refusal_of_max_tokens_is_said_in_the_clients_name() -> None:
    """vLLM's words, about the ``max_tokens`` the gateway sent it, name the chat's
    ``max_completion_tokens`` the client gave (and nothing else changes)."""
    said = (
        "engine vllm-0: rejected the request (HTTP 400 from POST /v1/chat/completions): "
        "max_tokens=600 cannot be greater than max_model_len=512 (parameter=max_tokens, "
        "value=600)"
    )
    meta = make_metadata()
    for named, expected in (
        ("max_completion_tokens", said.replace("max_tokens", "max_completion_tokens")),
        ("max_tokens", said),
    ):
        gen = fill_generation(meta, True, "m", False, False, None, named)
        exc = EngineRequestRejectedError(said, instance_id="vllm-0", status=400, param="max_tokens")
        _as_the_client_named(exc, gen)
        assert (exc.param, exc.message, str(exc)) == (named, expected, expected)
    other = EngineRequestRejectedError(said, status=400, param="prompt")
    gen = fill_generation(meta, True, "m", False, False, None, "max_completion_tokens")
    _as_the_client_named(other, gen)
    assert (other.param, other.message) == ("prompt", said)


async def test_a_stream_of_several_prompts_pulls_no_further_ahead_than_its_reader() -> None:
    """While the client reads nothing, the prompts' streams wait: their batches do not
    pile up in memory (every token of every prompt had)."""
    pulled: Counter[str] = Counter()

    class _Endless:
        async def stream_batches(self, meta: Any) -> AsyncGenerator[list[Chunk], None]:
            for _ in range(10_000):
                pulled[meta.request_id] += 1
                yield [Chunk(text="x")]

    gens = [
        fill_generation(make_metadata(f"r#{k}"), False, "m", True, False, None, "max_tokens")
        for k in range(3)
    ]
    merged = _merged(cast(ControlPlaneManager, _Endless()), gens)
    assert (await anext(merged))[0].text == "x"
    for _ in range(100):  # the pumps' turns
        await asyncio.sleep(0)
    assert sum(pulled.values()) <= 2 * len(gens) + 1, pulled  # the queue's, the pumps', one read
    assert set(pulled) == {"r#0", "r#1", "r#2"}
    await merged.aclose()


class _Scripted:
    """A manager whose stream is ``batches`` (an exception among them is raised there) and
    whose result of it is ``result``: what :func:`relay_stream` reads."""

    def __init__(self, batches: list[list[Chunk] | Exception], result: RequestResult) -> None:
        self.batches = batches
        self.result = result

    async def stream_batches(self, meta: Any) -> AsyncGenerator[list[Chunk], None]:
        for batch in self.batches:
            if isinstance(batch, Exception):
                raise batch
            yield batch

    def time_limit(self, timeout_s: float | None, on_expire: object = None) -> Any:
        return asyncio.timeout(timeout_s)

    async def get_result(self, request_id: str) -> RequestResult:
        return self.result


class _Recorder:
    """A sink that keeps each write (``write`` or ``write_eof``) and its bytes."""

    def __init__(self) -> None:
        self.writes: list[tuple[str, bytes]] = []

    async def write(self, data: bytes) -> None:
        self.writes.append(("write", data))

    async def write_eof(self, data: bytes = b"") -> None:
        self.writes.append(("write_eof", data))

    def events(self, data: bytes | None = None) -> list[Any]:
        text = (b"".join(d for _, d in self.writes) if data is None else data).decode()
        blocks = [b[len("data: ") :] for b in text.split("\n\n") if b.startswith("data: ")]
        return [b if b == "[DONE]" else json.loads(b) for b in blocks]


async def _relay_scripted(
    batches: list[list[Chunk] | Exception], *, include_usage: bool, n: int = 1
) -> tuple[_Recorder, int | None]:
    sink = _Recorder()
    result = RequestResult("s", RequestStatus.COMPLETED, prompt_tokens=3, completion_tokens=2,
                           cached_tokens=1)  # fmt: skip
    manager = cast(ControlPlaneManager, _Scripted(batches, result))
    meta = make_metadata("s", extra_body={"n": n})
    gen = fill_generation(meta, False, "m", True, include_usage, None, "max_tokens")

    async def open_sink() -> _Recorder:
        return sink

    return sink, await relay_stream(open_sink, manager, [gen], 0, "s")


@pytest.mark.parametrize("include_usage", [False, True])
async def test_a_usage_chunk_follows_the_last_chunk_only_with_include_usage(
    include_usage: bool,
) -> None:
    """Without ``stream_options.include_usage`` no chunk carries a usage, also when the
    engine's chunks had none (the usage then is the request's result's, cached tokens
    included)."""
    batches: list[list[Chunk] | Exception] = [[Chunk("a")], [Chunk("b", finish_reason="stop")]]
    sink, ended = await _relay_scripted(batches, include_usage=include_usage)
    events = sink.events()
    assert ended is None and events[-1] == "[DONE]"
    assert [e["choices"][0]["text"] for e in events[:2]] == ["a", "b"]
    usages = [e["usage"] for e in events[:-1] if e.get("usage")]
    if not include_usage:
        assert usages == [] and len(events) == 3
        return
    assert events[-2]["choices"] == []
    assert usages == [
        {"prompt_tokens": 3, "total_tokens": 5, "completion_tokens": 2,
         "prompt_tokens_details": {"cached_tokens": 1}}
    ]  # fmt: skip


async def test_the_last_chunk_usage_chunk_done_and_body_end_leave_in_one_write() -> None:
    last = Chunk("b", finish_reason="stop", usage=Usage(3, 2))
    sink, _ = await _relay_scripted([[Chunk("a")], [last]], include_usage=True)
    assert [how for how, _ in sink.writes] == ["write", "write_eof"]
    ending = sink.events(sink.writes[-1][1])
    assert ending[0]["choices"][0]["finish_reason"] == "stop"
    assert ending[1]["choices"] == [] and ending[1]["usage"]["completion_tokens"] == 2
    assert ending[2:] == ["[DONE]"]


async def test_an_unexpected_failure_mid_stream_ends_with_an_error_event_then_done() -> None:
    """Never a silent truncation, whatever the failure (not only the library's errors)."""
    sink, ended = await _relay_scripted([[Chunk("a")], RuntimeError("a bug")], include_usage=True)
    events = sink.events()
    assert ended == 500
    assert events[0]["choices"][0]["text"] == "a"
    assert events[1]["error"]["type"] == "internal_error" and events[1]["error"]["code"] == 500
    assert events[2:] == ["[DONE]"]
    assert sink.writes[-1][0] == "write_eof"


async def test_a_stream_of_several_prompts_makes_prompt_ks_choice_i_choice_k_n_plus_i() -> None:
    class _TwoChoices:
        async def stream_batches(self, meta: Any) -> AsyncGenerator[list[Chunk], None]:
            k = meta.request_id[-1]
            yield [Chunk(f"p{k}c{i}", finish_reason="stop", index=i) for i in range(2)]

    gens = [
        fill_generation(
            make_metadata(f"r#{k}", extra_body={"n": 2}),
            False,
            "m",
            True,
            False,
            None,
            "max_tokens",
        )
        for k in range(3)
    ]
    merged = _merged(cast(ControlPlaneManager, _TwoChoices()), gens)
    indexes = {c.text: c.index for batch in [b async for b in merged] for c in batch}
    assert indexes == {f"p{k}c{i}": 2 * k + i for k in range(3) for i in range(2)}


async def test_several_prompts_queued_past_max_queue_wait_s_are_a_504_saying_so() -> None:
    """A prompt that waited in the queue past ``max_queue_wait_s`` fails the request of
    several prompts with the queue's reason (not taken for the request's own time limit),
    under the client's id; the other prompts are cancelled."""
    settings = GatewayConfig(request_timeout_s=30)
    held = serve(1, settings=settings, bound=1, hold=lambda rid: rid == "busy",
                 max_queue_wait_s=0.3)  # fmt: skip
    async with held as gw, aiohttp.ClientSession() as s:
        busy = asyncio.ensure_future(
            s.post(gw.url("/v1/completions"), json=body_of(), headers={"x-request-id": "busy"})
        )
        (probe,) = gw.probes.values()
        await asyncio.wait_for(probe.started_event.wait(), 5)
        body = body_of(max_tokens=8)
        body["prompt"] = ["first prompt", "second prompt"]
        headers = {"x-request-id": "queued"}
        async with s.post(gw.url("/v1/completions"), json=body, headers=headers) as resp:
            error = (await resp.json())["error"]
            assert resp.status == 504 and resp.headers["x-request-id"] == "queued"
        probe.gate.set()
        async with await busy as answer:
            assert answer.status == 200
        results = [await gw.manager.wait_for_result(f"queued#{k}", timeout=5) for k in (0, 1)]
    assert error["message"] == "queued longer than 0.3 s (max_queue_wait_s)", error
    assert {r.status for r in results} <= {RequestStatus.FAILED, RequestStatus.CANCELLED}


def _shape(value: Any) -> Any:
    """An event's structure: its keys all the way down, with the values that vary from one
    engine to another (texts, ids, token ids, numbers) left out."""
    if isinstance(value, dict):
        return {
            k: None if k in ("id", "created", "text", "content") else _shape(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_shape(v) for v in value[:1]]
    return type(value).__name__


@pytest.mark.parametrize("chat", [False, True])
async def test_an_in_process_engine_answers_token_ids_and_usage_so_far_as_over_http(
    chat: bool,
) -> None:
    """``return_token_ids`` and ``continuous_usage_stats`` through the embedded fleet's
    in-process engines: the answer had no ``prompt_token_ids`` and no chunk the usage so far
    (engine-sim over HTTP gave both). The events now have the shapes and the usage of
    those over HTTP (a chat's role chunk carries the prompt's ids and a usage of 0
    tokens), whole and streamed, with the same prompt token ids."""
    fields = {"max_tokens": 3, "return_token_ids": True}
    body = chat_body("Hello there", **fields) if chat else body_of("Hello there", **fields)
    usage = {"include_usage": True, "continuous_usage_stats": True}
    streamed = {**body, "stream": True, "stream_options": usage}
    path = "/v1/chat/completions" if chat else "/v1/completions"

    async def answers(port: int) -> tuple[Any, list[Any]]:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"http://127.0.0.1:{port}{path}", json=body) as r:
                whole = await r.json()
            async with http.post(f"http://127.0.0.1:{port}{path}", json=streamed) as r:
                events = [e for e in await read_events(r) if isinstance(e, dict)]
        return whole, events

    async with serve() as gw:
        in_process = await answers(gw.port)
    engine = SimEngine("sim-0", SimEngineConfig(speed=100.0))
    runner, engine_port = await start_engine_server(engine, model_name=MODEL)
    manager = ControlPlaneManager(mode="http")
    manager.register_instance(make_instance("e0", port=engine_port, model_name=MODEL))
    site, port = await start_gateway(manager, None, manage_lifecycle=True, environ={})
    try:
        over_http = await answers(port)
    finally:
        await site.cleanup()
        await runner.cleanup()
        await engine.aclose()
    for whole, events in (in_process, over_http):
        ids = whole["prompt_token_ids"] if chat else whole["choices"][0]["prompt_token_ids"]
        assert ids and all(isinstance(t, int) for t in ids)
        first = events[0] if chat else events[0]["choices"][0]
        assert first["prompt_token_ids"] == ids
        used = [e["usage"]["completion_tokens"] for e in events if e["choices"]]
        assert used == ([0, 1, 2, 3] if chat else [1, 2, 3])
    assert _shape(in_process[0]) == _shape(over_http[0])
    assert [_shape(e) for e in in_process[1]] == [_shape(e) for e in over_http[1]]
    in_ids = in_process[0]["prompt_token_ids" if chat else "choices"]
    http_ids = over_http[0]["prompt_token_ids" if chat else "choices"]
    if not chat:
        in_ids, http_ids = in_ids[0]["prompt_token_ids"], http_ids[0]["prompt_token_ids"]
    assert in_ids == http_ids
