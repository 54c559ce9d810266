"""The engine HTTP server: OpenAI/vLLM wire format, PD legs, probes and metrics."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from sage_llm.engines.base import Chunk, EngineRequest, KVHandle
from sage_llm.engines.http import HTTPEngineClient
from sage_llm.engines.metrics_scrape import parse_prometheus_text
from sage_llm.errors import AdmissionError, EngineError
from sage_llm.sim import server as sim_server
from sage_llm.sim.engine import SimEngine, SimEngineConfig
from sage_llm.sim.server import create_engine_app, start_engine_server
from tests.engines.fake_engine import MODEL, FakeEngine, ManualClock, start_app
from tests.factories import make_instance


@pytest.fixture
def fake() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
async def base(fake: FakeEngine) -> AsyncIterator[str]:
    runner, port = await start_engine_server(
        fake, model_name=MODEL, max_model_len=64, shutdown_timeout=1.0
    )
    yield f"http://127.0.0.1:{port}"
    fake.release.set()
    await runner.cleanup()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def oai(base: str) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
    yield client
    await client.close()


async def post(http: aiohttp.ClientSession, url: str, body: Any, **headers: str) -> tuple[int, Any]:
    async with http.post(url, json=body, headers=headers) as resp:
        return resp.status, await resp.json()


async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.get(url) as resp:
        return resp.status, await resp.json()


async def sse_events(http: aiohttp.ClientSession, url: str, body: Any) -> list[str]:
    async with http.post(url, json=body, headers={"X-Request-Id": "rid"}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        text = (await resp.read()).decode()
    assert text.endswith("\n\n")
    return [block.removeprefix("data: ") for block in text.strip().split("\n\n")]


# --- OpenAI client compatibility ---------------------------------------------------------


async def test_openai_client_streams_completions(oai: openai.AsyncOpenAI) -> None:
    stream = await oai.completions.create(
        model=MODEL, prompt="Hello there", max_tokens=4, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    texts: list[str] = []
    usage: openai.types.CompletionUsage | None = None
    finishes: list[str | None] = []
    async for chunk in stream:
        if chunk.choices:
            texts.append(chunk.choices[0].text)
            finishes.append(chunk.choices[0].finish_reason)
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(texts) == " w0 w1 w2 w3"
    assert finishes == [None, None, None, "length"]
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (2, 4)


async def test_openai_client_streams_chat(oai: openai.AsyncOpenAI) -> None:
    stream = await oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    roles, texts, usage = [], [], None
    async for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        for choice in chunk.choices:
            roles.append(choice.delta.role)
            texts.append(choice.delta.content or "")
        usage = chunk.usage or usage
    assert roles[0] == "assistant"
    assert "".join(texts) == " w0 w1 w2"
    assert usage is not None and usage.completion_tokens == 3


async def test_openai_client_non_streaming(oai: openai.AsyncOpenAI, fake: FakeEngine) -> None:
    fake.cached_tokens = 2
    done = await oai.completions.create(model=MODEL, prompt="a b c", max_tokens=2)
    assert done.choices[0].text == " w0 w1"
    assert done.choices[0].finish_reason == "length"
    assert done.usage is not None and done.usage.total_tokens == 5
    chat = await oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=1
    )
    assert chat.choices[0].message.content == " w0"
    assert chat.usage is not None
    assert chat.usage.prompt_tokens_details is not None
    assert chat.usage.prompt_tokens_details.cached_tokens == 2


async def test_openai_client_sees_typed_errors(oai: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        await oai.completions.create(model="nope", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError):
        await oai.completions.create(model=MODEL, prompt="x", max_tokens=0)


# --- wire format --------------------------------------------------------------------------


async def test_stream_chunks_follow_vllm_format(
    base: str, http: aiohttp.ClientSession, fake: FakeEngine
) -> None:
    body = {"model": MODEL, "prompt": "p q", "max_tokens": 2, "stream": True,
            "stream_options": {"include_usage": True}, "seed": 1}  # fmt: skip
    events = await sse_events(http, f"{base}/v1/completions", body)
    assert events[-1] == "[DONE]"
    objs = [json.loads(e) for e in events[:-1]]
    for obj in objs:
        assert obj["id"] == "cmpl-rid" and obj["object"] == "text_completion"
        assert obj["model"] == MODEL and isinstance(obj["created"], int)
    assert [o["choices"][0]["text"] for o in objs[:2]] == [" w0", " w1"]
    assert [o["choices"][0]["finish_reason"] for o in objs[:2]] == [None, "length"]
    assert objs[2]["choices"] == []
    assert objs[2]["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert fake.requests[-1].request_id == "rid"
    assert dict(fake.requests[-1].extra) == {"seed": 1}


async def test_stream_without_include_usage_has_no_usage_chunk(
    base: str, http: aiohttp.ClientSession
) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
            "stream": True}  # fmt: skip
    events = await sse_events(http, f"{base}/v1/chat/completions", body)
    objs = [json.loads(e) for e in events[:-1]]
    assert all("usage" not in o for o in objs)
    assert [o["choices"][0]["delta"] for o in objs] == [
        {"role": "assistant", "content": ""}, {"content": " w0"}, {"content": " w1"},
    ]  # fmt: skip


@pytest.mark.parametrize("include_usage", [True, False])
async def test_continuous_usage_stats_ride_every_chunk_only_with_include_usage(
    base: str, http: aiohttp.ClientSession, include_usage: bool
) -> None:
    """As vLLM: ``continuous_usage_stats`` gives every chunk its usage so far, and without
    ``include_usage`` no chunk carries usage at all."""
    options = {"include_usage": include_usage, "continuous_usage_stats": True}
    body = {"model": MODEL, "prompt": "p q", "max_tokens": 2, "stream": True,
            "stream_options": options}  # fmt: skip
    events = await sse_events(http, f"{base}/v1/completions", body)
    objs = [json.loads(e) for e in events[:-1]]
    if not include_usage:
        assert len(objs) == 2 and all("usage" not in o for o in objs)
        return
    assert [o["usage"]["completion_tokens"] for o in objs] == [1, 2, 2]
    assert objs[-1]["choices"] == []  # the closing usage chunk


async def test_continuous_usage_totals_are_prompt_plus_completion_tokens(
    base: str, http: aiohttp.ClientSession
) -> None:
    """Every chunk's usage so far is vLLM's: ``total_tokens`` is the prompt's tokens and
    those generated so far."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}  # fmt: skip
    events = await sse_events(http, f"{base}/v1/chat/completions", body)
    usages = [json.loads(e)["usage"] for e in events[:-1]]
    assert [u["completion_tokens"] for u in usages] == [0, 1, 2, 2]
    for usage in usages:
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


class _NoUsage(FakeEngine):
    """A fake engine whose chunks carry no usage."""

    async def generate(self, req: EngineRequest) -> AsyncIterator[Chunk]:
        async for chunk in super().generate(req):
            yield replace(chunk, usage=None)


@pytest.mark.parametrize("stream", [True, False])
async def test_an_engine_that_reports_no_usage_is_counted_a_token_a_chunk(
    http: aiohttp.ClientSession, stream: bool
) -> None:
    runner, port = await start_engine_server(_NoUsage(), model_name=MODEL, shutdown_timeout=1.0)
    try:
        body: dict[str, Any] = {"prompt": "p q", "max_tokens": 3, "stream": stream}
        url = f"http://127.0.0.1:{port}/v1/completions"
        if stream:
            body["stream_options"] = {"include_usage": True}
            usage = json.loads((await sse_events(http, url, body))[-2])["usage"]
        else:
            usage = (await post(http, url, body))[1]["usage"]
    finally:
        await runner.cleanup()
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (2, 3, 5)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": MODEL, "max_tokens": 1}, "prompt"),
        ({"model": MODEL, "prompt": "x", "max_tokens": -1}, "max_tokens"),
        ({"model": MODEL, "prompt": "x", "temperature": -0.5}, "temperature"),
        ({"model": MODEL, "prompt": "x", "n": 0}, "n"),
        ({"model": MODEL, "prompt": "x", "n": 1.5}, "n"),
        ({"model": MODEL, "prompt": "x", "stop": [1]}, "stop"),
        ({"model": MODEL, "prompt": "x", "max_tokens": 65}, "max_tokens"),
        ({"model": MODEL, "prompt": ["a", "b"]}, "prompt"),
    ],
)
async def test_validation_errors_are_openai_400s(
    base: str, http: aiohttp.ClientSession, body: dict[str, Any], param: str
) -> None:
    status, err = await post(http, f"{base}/v1/completions", body)
    assert status == 400
    assert set(err["error"]) == {"message", "type", "param", "code"}
    assert (err["error"]["type"], err["error"]["param"]) == ("BadRequestError", param)  # vLLM's
    if param == "n":  # not a whole number >= 1
        assert f"n must be an integer >= 1, got {body['n']!r}" in err["error"]["message"]


async def test_null_n_and_stream_are_their_defaults(base: str, http: aiohttp.ClientSession) -> None:
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2, "n": None, "stream": None}
    status, answer = await post(http, f"{base}/v1/completions", body)
    assert status == 200 and answer["object"] == "text_completion"  # as vLLM reads nulls


async def test_a_body_above_the_limit_is_a_json_413(
    http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sim_server, "MAX_BODY_BYTES", 1024)
    runner, port = await start_engine_server(FakeEngine(), model_name=MODEL)
    try:
        big = {"model": MODEL, "prompt": "x" * 2000}
        async with http.post(f"http://127.0.0.1:{port}/v1/completions", json=big) as resp:
            error = (await resp.json())["error"]  # not aiohttp's plain text
        assert (resp.status, error["code"]) == (413, 413)
        assert error["message"] == "request body larger than 1024 bytes"
    finally:
        await runner.cleanup()


async def test_bad_json_and_unknown_model(base: str, http: aiohttp.ClientSession) -> None:
    async with http.post(f"{base}/v1/completions", data=b"{nope") as resp:
        assert resp.status == 400
    async with http.post(f"{base}/v1/completions", data=b"") as resp:  # as the gateway says
        assert (await resp.json())["error"]["message"] == "request body must be a JSON object"
    # a body not in its Content-Encoding: a JSON 400, as the gateway answers it (was a 500)
    host, port = base.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    body = b'{"prompt": "x"}'
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)  # fmt: skip
    answer = await reader.read()  # the connection closes after it
    writer.close()
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400")
    assert json.loads(payload)["error"]["message"] == (
        "request body cannot be read: Can not decode content-encoding: gzip"
    )
    deep = b'{"model":"m","x":' + b"[" * 1100 + b"]" * 1100 + b"}"
    async with http.post(f"{base}/v1/completions", data=deep) as resp:
        assert resp.status == 400 and "nested deeper" in (await resp.json())["error"]["message"]
    status, err = await post(http, f"{base}/v1/chat/completions",
                             {"model": "other", "messages": [{"role": "user"}]})  # fmt: skip
    assert (status, err["error"]["type"]) == (404, "NotFoundError")  # as vLLM 0.32 types it
    assert err["error"]["param"] == "model" and "other" in err["error"]["message"]


async def test_engine_error_before_output_keeps_its_status(
    http: aiohttp.ClientSession,
) -> None:
    fake = FakeEngine(fail_with=AdmissionError("queue full"))
    runner, port = await start_app(create_engine_app(fake, model_name=MODEL))
    try:
        body = {"prompt": "x", "stream": True}
        status, err = await post(http, f"http://127.0.0.1:{port}/v1/completions", body)
        assert status == 429 and err["error"]["message"] == "queue full"
    finally:
        await runner.cleanup()


async def test_engine_error_mid_stream_is_an_error_event(http: aiohttp.ClientSession) -> None:
    fake = FakeEngine(fail_with=EngineError("lost", retryable=False), fail_after=1)
    runner, port = await start_app(create_engine_app(fake, model_name=MODEL))
    try:
        body = {"prompt": "x", "max_tokens": 3, "stream": True}
        events = await sse_events(http, f"http://127.0.0.1:{port}/v1/completions", body)
        assert json.loads(events[0])["choices"][0]["text"] == " w0"
        assert json.loads(events[1])["error"]["message"] == "lost"
        assert events[2] == "[DONE]"
    finally:
        await runner.cleanup()


async def _leave_while_held(
    http: aiohttp.ClientSession, url: str, body: dict[str, Any], fake: FakeEngine
) -> None:
    """Post ``body`` and go away (the request cancelled) once ``fake`` holds it."""
    task = asyncio.create_task(http.post(url, json=body))
    await asyncio.wait_for(fake.gated.wait(), timeout=10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.parametrize("stream", [True, False])
async def test_client_disconnect_closes_engine_iterator_and_counts_no_abort(
    http: aiohttp.ClientSession, stream: bool
) -> None:
    fake = FakeEngine(gate_after=1)
    runner, port = await start_engine_server(fake, model_name=MODEL, shutdown_timeout=1.0)
    try:
        body = {"prompt": "x", "max_tokens": 5, "stream": stream}
        if stream:
            resp = await http.post(f"http://127.0.0.1:{port}/v1/completions", json=body)
            assert b" w0" in await resp.content.readuntil(b"\n\n")
            await asyncio.wait_for(fake.gated.wait(), timeout=10)
            async with http.get(f"http://127.0.0.1:{port}/metrics") as r:  # mid-stream
                running = await r.text()
            # timed as it came, as vLLM times a token in the step that makes it (the
            # histograms had been filled only when a request ended)
            assert "vllm:time_to_first_token_seconds_count{" in running
            line = next(x for x in running.splitlines()
                        if x.startswith("vllm:time_to_first_token_seconds_count"))  # fmt: skip
            assert line.endswith(" 1.0"), line
            resp.close()
        else:
            await _leave_while_held(http, f"http://127.0.0.1:{port}/v1/completions", body, fake)
        await asyncio.wait_for(fake.aborted_event.wait(), timeout=10)
        assert fake.aborted == [fake.requests[0].request_id] and fake.finished == []
        async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
            text = await r.text()
        # vLLM 0.32 counts no request whose client went away: its "abort" series stays 0
        assert 'vllm:request_success_total{engine="0",finished_reason="abort",' in text
        line = next(x for x in text.splitlines() if 'finished_reason="abort"' in x)
        assert line.endswith(" 0.0"), line
        # its first token was timed as it came, as vLLM times it; its end is not
        counts = {
            name: x.rsplit(" ", 1)[1]
            for x in text.splitlines()
            for name in ("time_to_first_token", "e2e_request_latency")
            if x.startswith(f"vllm:{name}_seconds_count")
        }
        assert counts == {"time_to_first_token": "1.0", "e2e_request_latency": "0.0"}, counts
    finally:
        fake.release.set()
        await runner.cleanup()


class _HeldChunks:
    """An engine's stream that is not an async generator (nothing closes it but its
    reader): one chunk, then held until its reader goes."""

    def __init__(self) -> None:
        self.given = False
        self.closed = asyncio.Event()

    def __aiter__(self) -> _HeldChunks:
        return self

    async def __anext__(self) -> Chunk:
        if not self.given:
            self.given = True
            return Chunk(text=" w0")
        await asyncio.Event().wait()
        raise StopAsyncIteration  # pragma: no cover - never reached

    async def aclose(self) -> None:
        self.closed.set()


class _HeldEngine(FakeEngine):
    def __init__(self) -> None:
        super().__init__()
        self.stream = _HeldChunks()

    def generate(self, req: EngineRequest) -> AsyncIterator[Chunk]:
        return self.stream


async def test_a_client_gone_mid_stream_closes_the_engines_iterator(
    http: aiohttp.ClientSession,
) -> None:
    """The server closes the engine's stream itself when its client goes (so the engine
    aborts), whatever kind of iterator the engine answered with."""
    engine = _HeldEngine()
    runner, port = await start_engine_server(engine, model_name=MODEL, shutdown_timeout=1.0)
    try:
        body = {"prompt": "x", "max_tokens": 5, "stream": True}
        resp = await http.post(f"http://127.0.0.1:{port}/v1/completions", json=body)
        assert b" w0" in await resp.content.readuntil(b"\n\n")
        resp.close()
        await asyncio.wait_for(engine.stream.closed.wait(), timeout=10)
    finally:
        await runner.cleanup()


class _LeftPrefill(FakeEngine):
    """A fake engine whose held prefill leg says when its client's going cancelled it."""

    def __init__(self) -> None:
        super().__init__(gate_after=0)
        self.left = asyncio.Event()

    async def prefill(self, req: EngineRequest) -> KVHandle:
        try:
            return await super().prefill(req)
        except asyncio.CancelledError:
            self.left.set()
            raise


async def test_a_client_gone_during_a_prefill_leg_counts_no_abort(
    http: aiohttp.ClientSession,
) -> None:
    fake = _LeftPrefill()
    runner, port = await start_engine_server(fake, model_name=MODEL, shutdown_timeout=1.0)
    try:
        body = {"prompt": "x", "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}}
        await _leave_while_held(http, f"http://127.0.0.1:{port}/v1/completions", body, fake)
        await asyncio.wait_for(fake.left.wait(), timeout=10)  # the server saw it go
        async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
            text = await r.text()
        line = next(x for x in text.splitlines() if 'finished_reason="abort"' in x)
        assert line.endswith(" 0.0"), line  # as vLLM 0.32 counts it: not at all
    finally:
        fake.release.set()
        await runner.cleanup()


async def test_a_client_gone_before_the_first_chunk_is_not_an_error_in_the_log(
    http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """A gateway that moved the call elsewhere while this engine was stopped, say: the
    engine call ends, and nothing is logged as an error (also when the first chunk and
    the connection's end come in one turn of the loop, which this test cannot time)."""
    fake = FakeEngine(gate_after=0)
    runner, port = await start_engine_server(fake, model_name=MODEL, shutdown_timeout=1.0)
    try:
        body = {"prompt": "x", "max_tokens": 5, "stream": True}
        task = asyncio.create_task(http.post(f"http://127.0.0.1:{port}/v1/completions", json=body))
        await asyncio.wait_for(fake.gated.wait(), timeout=10)
        task.cancel()  # the client goes before any byte of the answer
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.05)
        fake.release.set()
        await asyncio.wait_for(fake.aborted_event.wait(), timeout=10)
        await asyncio.sleep(0.05)
    finally:
        fake.release.set()
        await runner.cleanup()
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


# --- PD legs ------------------------------------------------------------------------------


async def test_prefill_leg_answers_one_token_with_kv_transfer_params(
    base: str, http: aiohttp.ClientSession, fake: FakeEngine
) -> None:
    body = {"model": MODEL, "prompt": "long prompt here", "max_tokens": 1, "stream": False,
            "kv_transfer_params": {"do_remote_decode": True, "do_remote_prefill": False,
                                   "remote_engine_id": None, "remote_block_ids": None,
                                   "remote_host": None, "remote_port": None}}  # fmt: skip
    status, out = await post(http, f"{base}/v1/completions", body, **{"X-Request-Id": "pd"})
    assert status == 200
    assert out["kv_transfer_params"]["remote_request_id"] == "pd"
    assert out["kv_transfer_params"]["do_remote_prefill"] is True
    assert out["choices"][0]["text"] == " w0"
    assert out["usage"]["completion_tokens"] == 1 and out["usage"]["prompt_tokens"] == 3
    assert [r.request_id for r in fake.prefills] == ["pd"] and fake.requests == []
    status, out = await post(http, f"{base}/v1/completions", {**body, "stream": True})
    assert status == 400 and out["error"]["param"] == "stream"
    assert "answered in one piece" in out["error"]["message"]
    assert [r.request_id for r in fake.prefills] == ["pd"]  # not run


async def test_a_prefill_leg_ends_length_and_reports_its_cached_prompt_tokens(
    base: str, http: aiohttp.ClientSession, fake: FakeEngine
) -> None:
    """As documented: the leg's one token ends with ``finish_reason: "length"`` (and
    ``stop_reason: null``), and its usage counts the prompt tokens the prefix cache held."""
    fake.cached_tokens = 2
    body = {"model": MODEL, "prompt": "long prompt here", "max_tokens": 1,
            "kv_transfer_params": {"do_remote_decode": True}}  # fmt: skip
    status, out = await post(http, f"{base}/v1/completions", body)
    assert status == 200
    choice = out["choices"][0]
    assert (choice["finish_reason"], choice["stop_reason"]) == ("length", None)
    assert out["usage"]["prompt_tokens_details"] == {"cached_tokens": 2}


async def test_decode_leg_hands_params_to_generate(
    base: str, http: aiohttp.ClientSession, fake: FakeEngine
) -> None:
    params = {"do_remote_prefill": True, "remote_block_ids": [1], "remote_engine_id": "e"}
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2, "kv_transfer_params": params}
    status, out = await post(http, f"{base}/v1/completions", body)
    assert status == 200 and out["choices"][0]["text"] == " w0 w1"
    assert fake.requests[-1].kv_transfer_params == params


@pytest.mark.parametrize("timeout_s", ["0", "-1", "601", "nan"])
async def test_a_bootstrap_wait_outside_its_bounds_is_a_400(
    base: str, http: aiohttp.ClientSession, timeout_s: str
) -> None:
    """``timeout_s`` is in (0, 600]: a wait of none at all is no wait for a room."""
    async with http.get(f"{base}/sim/bootstrap/7", params={"timeout_s": timeout_s}) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert error["param"] == "timeout_s" and "(0, 600]" in error["message"]


async def test_a_bootstrap_room_is_below_2_to_the_64(
    base: str, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{base}/sim/bootstrap/{2**64}", params={"timeout_s": "0.01"}) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["param"] == "room"
    last = f"{base}/sim/bootstrap/{2**64 - 1}"  # taken: waited for, and never published
    async with http.get(last, params={"timeout_s": "0.01"}) as resp:
        assert resp.status == 504


# --- probe endpoints ----------------------------------------------------------------------


async def test_information_endpoints(base: str, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{base}/health") as resp:
        assert resp.status == 200
    status, version = await get(http, f"{base}/version")
    assert status == 200 and isinstance(version["version"], str)
    _, models = await get(http, f"{base}/v1/models")
    assert [m["id"] for m in models["data"]] == [MODEL]
    card = models["data"][0]
    assert card["max_model_len"] == 64
    assert (card["owned_by"], card["root"], card["parent"]) == ("vllm", MODEL, None)
    (permission,) = card["permission"]  # vLLM's card carries one ModelPermission
    assert permission["id"].startswith("modelperm-")
    assert permission["object"] == "model_permission"
    assert (permission["allow_sampling"], permission["organization"]) == (True, "*")
    _, load = await get(http, f"{base}/get_load")
    assert load == [{"dp_rank": 0, "num_reqs": 2, "num_waiting_reqs": 2, "num_tokens": 4000,
                     "load": 2}]  # fmt: skip
    _, server_load = await get(http, f"{base}/load")
    assert server_load == {"server_load": 2}
    for path in ("/get_server_info", "/server_info"):
        status, info = await get(http, base + path)
        assert status == 200
        assert (info["model_path"], info["dp_size"], info["max_total_num_tokens"]) == (
            MODEL, 1, 16000,
        )  # fmt: skip
    for path in ("/get_model_info", "/model_info"):
        status, info = await get(http, base + path)
        assert status == 200 and info["model_path"] == MODEL and info["is_generation"] is True


async def test_server_info_load_counts_running_and_waiting_requests(
    http: aiohttp.ClientSession,
) -> None:
    """SGLang's ``internal_states[0].load``: the requests the engine holds, those running
    (one here, held mid-answer) and those waiting (the fake engine's two)."""
    fake = FakeEngine(gate_after=0)
    runner, port = await start_engine_server(fake, model_name=MODEL, shutdown_timeout=1.0)
    url = f"http://127.0.0.1:{port}"
    try:
        body = {"prompt": "x", "max_tokens": 2}
        answer = asyncio.create_task(post(http, f"{url}/v1/completions", body))
        await asyncio.wait_for(fake.gated.wait(), timeout=10)
        for path in ("/get_server_info", "/server_info"):
            status, info = await get(http, url + path)
            assert status == 200 and info["internal_states"] == [{"load": 3}]
        fake.release.set()
        assert (await answer)[0] == 200
        _, info = await get(http, f"{url}/get_server_info")
        assert info["internal_states"] == [{"load": 2}]
    finally:
        fake.release.set()
        await runner.cleanup()


async def test_tokenize_detokenize_and_render(base: str, http: aiohttp.ClientSession) -> None:
    status, tok = await post(http, f"{base}/tokenize", {"model": MODEL, "prompt": "Hello, world"})
    assert status == 200 and tok["count"] == 3 and tok["max_model_len"] == 64
    assert tok["token_strs"] is None  # only when asked for
    status, detok = await post(http, f"{base}/detokenize", {"tokens": tok["tokens"]})
    assert status == 200 and detok == {"prompt": "Hello, world"}
    status, strs = await post(http, f"{base}/tokenize",
                              {"prompt": "Hello, world", "return_token_strs": True})  # fmt: skip
    assert status == 200 and strs["token_strs"] == ["Hello", ",", " world"]
    # token ids have no text of their own here: their strings are null, as for no request
    status, ids = await post(http, f"{base}/tokenize",
                             {"prompt": [1, 2, 3], "return_token_strs": True})  # fmt: skip
    assert status == 200
    assert (ids["count"], ids["tokens"], ids["token_strs"]) == (3, [1, 2, 3], None)
    status, err = await post(http, f"{base}/detokenize", {"tokens": [1]})
    assert status == 400 and err["error"]["param"] == "tokens"
    status, rendered = await post(http, f"{base}/v1/completions/render", {"prompt": "Hello"})
    assert status == 200 and rendered["token_ids"] == tok["tokens"][:1]
    chat = {"messages": [{"role": "user", "content": "Hello"}]}
    status, rendered = await post(http, f"{base}/v1/chat/completions/render", chat)
    assert status == 200 and "<|user|> Hello" in rendered["prompt"]
    assert len(rendered["token_ids"]) > 1
    # add_generation_prompt, as a chat template reads it (default true)
    status, with_tag = await post(http, f"{base}/tokenize", chat)
    status_b, without = await post(
        http, f"{base}/tokenize", {**chat, "add_generation_prompt": False}
    )
    assert (status, status_b) == (200, 200)
    assert without["count"] < with_tag["count"]
    status, err = await post(http, f"{base}/tokenize", {**chat, "add_generation_prompt": "no"})
    assert status == 400 and err["error"]["param"] == "add_generation_prompt"
    # continue_final_message goes on from the last message: not with a new tag (vLLM's 400)
    going_on = {**chat, "continue_final_message": True}
    status, err = await post(http, f"{base}/v1/chat/completions", {**going_on, "max_tokens": 1})
    assert status == 400 and err["error"]["param"] == "continue_final_message"
    assert "Cannot set both" in err["error"]["message"]
    status, tok = await post(http, f"{base}/tokenize", {**going_on, "add_generation_prompt": False})
    assert status == 200 and tok["count"] == without["count"]


# --- metrics ------------------------------------------------------------------------------


HISTOGRAMS = (
    "vllm:time_to_first_token_seconds",
    "vllm:inter_token_latency_seconds",
    "vllm:e2e_request_latency_seconds",
    "vllm:request_queue_time_seconds",
)


async def test_metrics_use_vllm_names_and_server_timings(http: aiohttp.ClientSession) -> None:
    clock = ManualClock(100.0)
    fake = FakeEngine(clock=clock, step_s=0.5)
    fake.queue_times["m1"] = 0.25
    runner, port = await start_app(create_engine_app(fake, model_name=MODEL, clock=clock))
    url = f"http://127.0.0.1:{port}"
    try:
        async with http.get(f"{url}/metrics") as resp:
            fresh = parse_prometheus_text(await resp.text())
        for name in HISTOGRAMS:
            assert fresh[f"{name}_count"][0][1] == 0.0
            assert fresh[f"{name}_bucket"][-1][0]["le"] == "+Inf"
        body = {"prompt": "x", "max_tokens": 3, "stream": True}
        await sse_events(http, f"{url}/v1/completions", body)  # request id "rid"
        status, _ = await post(http, f"{url}/v1/completions", {"prompt": "x", "max_tokens": 2},
                               **{"X-Request-Id": "m1"})  # fmt: skip
        assert status == 200
        async with http.get(f"{url}/metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            samples = parse_prometheus_text(await resp.text())
    finally:
        await runner.cleanup()

    def one(name: str) -> float:
        ((labels, value),) = samples[name]
        assert labels["model_name"] == MODEL
        return value

    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:kv_cache_usage_perc", "vllm:prefix_cache_queries_total",
                 "vllm:prefix_cache_hits_total", "vllm:num_preemptions_total",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total"):  # fmt: skip
        assert name in samples
    assert one("vllm:num_requests_waiting") == 2.0
    assert one("vllm:generation_tokens_total") == 300.0
    # each counter from its own statistic (the fake engine's 100 queried, 40 hit)
    assert one("vllm:prefix_cache_queries_total") == 100.0
    assert one("vllm:prefix_cache_hits_total") == 40.0
    ((info, _),) = samples["vllm:cache_config_info"]
    assert (info["block_size"], info["num_gpu_blocks"]) == ("16", "1000")
    # Request 1: chunks at +0.5, +1.0, +1.5; request 2: at +0.5, +1.0.
    assert one("vllm:time_to_first_token_seconds_count") == 2.0
    assert one("vllm:time_to_first_token_seconds_sum") == 1.0
    assert one("vllm:inter_token_latency_seconds_count") == 3.0
    assert one("vllm:inter_token_latency_seconds_sum") == 1.5
    assert one("vllm:e2e_request_latency_seconds_sum") == 2.5
    assert one("vllm:request_queue_time_seconds_count") == 1.0
    assert one("vllm:request_queue_time_seconds_sum") == 0.25
    success = {labels["finished_reason"]: v for labels, v in samples["vllm:request_success_total"]}
    assert success == {"abort": 0.0, "length": 2.0, "stop": 0.0}  # vLLM's series, from 0


def test_app_factory_rejects_bad_arguments(fake: FakeEngine) -> None:
    with pytest.raises(ValueError, match="model_name"):
        create_engine_app(fake, model_name="")
    with pytest.raises(ValueError, match="max_model_len"):
        create_engine_app(fake, model_name=MODEL, max_model_len=0)


# --- the real simulated engine behind the server ------------------------------------------


async def test_simulated_engine_served_over_http_runs_pd_end_to_end() -> None:
    from sage_llm.engines.base import EngineRequest
    from sage_llm.engines.http import HTTPEngineClient, make_session
    from sage_llm.sim.engine import KVTransferHub, SimEngine, SimEngineConfig
    from sage_llm.types import ExecutionInstance

    hub = KVTransferHub()
    config = SimEngineConfig(speed=100.0)  # steps of ~0.1 ms of real time
    prefill_engine = SimEngine("p0", config, kv_hub=hub)
    decode_engine = SimEngine("d0", config, kv_hub=hub)
    p_runner, p_port = await start_engine_server(prefill_engine, model_name="llama-3-8b")
    d_runner, d_port = await start_engine_server(decode_engine, model_name="llama-3-8b")
    session = make_session()
    try:
        p = HTTPEngineClient(ExecutionInstance("p0", "127.0.0.1", p_port, "llama-3-8b"), session)
        d = HTTPEngineClient(ExecutionInstance("d0", "127.0.0.1", d_port, "llama-3-8b"), session)
        req = EngineRequest("pd-1", "llama-3-8b", prompt=" ".join(["word"] * 100), max_tokens=6)
        handle = await p.prefill(req)
        assert handle.params["remote_engine_id"] == "p0"
        assert handle.prompt_tokens == 100
        chunks = [c async for c in d.generate(req.with_changes(kv_transfer_params=handle.params))]
        last = chunks[-1]
        assert last.finish_reason == "length"
        assert last.usage is not None
        assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (100, 6)
        stats = await d.stats()
        assert stats.source == "vllm"
        assert stats.generation_tokens_total == 6.0
    finally:
        await session.close()
        for engine in (prefill_engine, decode_engine):
            await engine.aclose()
        for runner in (p_runner, d_runner):
            await runner.cleanup()


async def test_without_max_tokens_a_completion_gets_16_and_a_chat_its_answer(
    base: str, http: aiohttp.ClientSession
) -> None:
    """As vLLM: 16 tokens for a completion; a chat runs to its end (the simulated model's
    answer of 128 tokens, which has no end-of-sequence token of its own), within what is
    left of the context (64 tokens here)."""
    status, answer = await post(http, f"{base}/v1/completions", {"model": MODEL, "prompt": "x"})
    assert status == 200 and answer["usage"]["completion_tokens"] == 16
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
    status, answer = await post(http, f"{base}/v1/chat/completions", chat)
    usage = answer["usage"]
    assert status == 200 and usage["completion_tokens"] == 64 - usage["prompt_tokens"]
    engine = await start_engine_server(FakeEngine(), model_name=MODEL, shutdown_timeout=1.0)
    try:
        status, answer = await post(http, f"http://127.0.0.1:{engine[1]}/v1/chat/completions", chat)
        assert status == 200 and answer["usage"]["completion_tokens"] == 128
    finally:
        await engine[0].cleanup()


async def test_the_model_card_roots_the_served_name_in_the_model(
    http: aiohttp.ClientSession,
) -> None:
    """As vLLM's: ``id`` the served name, ``root`` (and the probes' ``model_path``) the
    model itself (``--model``)."""
    runner, port = await start_engine_server(FakeEngine(), model_name="chat", model_root=MODEL)
    try:
        _, models = await get(http, f"http://127.0.0.1:{port}/v1/models")
        (card,) = models["data"]
        assert (card["id"], card["root"]) == ("chat", MODEL)
        _, info = await get(http, f"http://127.0.0.1:{port}/server_info")
        assert info["model_path"] == MODEL
    finally:
        await runner.cleanup()


async def test_lora_modules_are_listed_and_served_by_name(http: aiohttp.ClientSession) -> None:
    """As vLLM's ``--lora-modules``: a card per adapter (``parent`` the served model, no
    ``max_model_len``), a request that names one is run for it and answered under its name,
    and an unknown name is a 404."""
    engine = FakeEngine()
    runner, port = await start_engine_server(
        engine, model_name=MODEL, lora_modules={"sql": "/loras/sql", "chat": "chat"}
    )
    base = f"http://127.0.0.1:{port}"
    try:
        _, models = await get(http, f"{base}/v1/models")
        cards = [(c["id"], c["root"], c["parent"], c["max_model_len"]) for c in models["data"]]
        assert cards[1:] == [("sql", "/loras/sql", MODEL, None), ("chat", "chat", MODEL, None)]
        assert cards[0][:3] == (MODEL, MODEL, None)
        status, answer = await post(http, f"{base}/v1/completions",
                                    {"model": "sql", "prompt": "x", "max_tokens": 2})  # fmt: skip
        assert status == 200 and answer["model"] == "sql"
        status, answer = await post(http, f"{base}/v1/completions",
                                    {"model": MODEL, "prompt": "x", "max_tokens": 2})  # fmt: skip
        assert status == 200 and answer["model"] == MODEL
        assert [r.model for r in engine.requests] == ["sql", MODEL]
        status, answer = await post(http, f"{base}/tokenize", {"model": "chat", "prompt": "x"})
        assert status == 200 and answer["count"] == 1
        status, answer = await post(http, f"{base}/v1/completions",
                                    {"model": "nope", "prompt": "x", "max_tokens": 2})  # fmt: skip
        assert status == 404 and answer["error"]["param"] == "model"
    finally:
        await runner.cleanup()
    with pytest.raises(ValueError, match="the model's own name"):
        await start_engine_server(FakeEngine(), model_name=MODEL, lora_modules={MODEL: "x"})


async def test_lora_adapters_load_and_unload_at_run_time_as_vllms_do(
    http: aiohttp.ClientSession,
) -> None:
    """vLLM's ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` (as with
    ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``), with their refusals; the simulated engine
    behind serves the adapter from then on, and the control plane's client calls them."""
    engine = SimEngine("e0", SimEngineConfig(speed=100.0))
    runner, port = await start_engine_server(engine, model_name=MODEL)
    base = f"http://127.0.0.1:{port}"
    client = HTTPEngineClient(make_instance("e0", port=port, model_name=MODEL), http)
    try:
        await client.load_lora_adapter("sql", "/loras/sql")
        assert engine.served_adapters == {"sql"}
        assert await client.lora_adapters() == ["sql"]
        status, answer = await post(http, f"{base}/v1/completions",
                                    {"model": "sql", "prompt": "x", "max_tokens": 2})  # fmt: skip
        assert status == 200 and answer["model"] == "sql"
        for body, code, says in [
            ({"lora_name": "sql", "lora_path": "/x"}, 400, "has already been loaded"),
            ({"lora_name": MODEL, "lora_path": "/x"}, 400, "conflicts with the served model"),
            ({"lora_name": "y"}, 400, "Both 'lora_name' and 'lora_path' must be provided."),
        ]:
            status, answer = await post(http, f"{base}/v1/load_lora_adapter", body)
            assert (status, says in answer["error"]["message"]) == (code, True), answer
        await client.unload_lora_adapter("sql")
        assert engine.served_adapters == set() and await client.lora_adapters() == []
        with pytest.raises(EngineError, match="cannot be found"):
            await client.unload_lora_adapter("sql")
    finally:
        await runner.cleanup()
        await engine.aclose()
    app = web.Application()  # an engine without the routes (vLLM without the variable)
    runner, port = await start_app(app)
    try:
        bare = HTTPEngineClient(make_instance("e1", port=port, model_name=MODEL), http)
        with pytest.raises(EngineError, match="VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"):
            await bare.load_lora_adapter("sql", "/loras/sql")
    finally:
        await runner.cleanup()


async def test_a_requests_priority_reaches_the_engine_as_vllm_takes_it(
    http: aiohttp.ClientSession,
) -> None:
    """vLLM 0.32 takes a ``priority`` field whatever its scheduling policy (FCFS ignores
    it): the engine is given it (0 when none), and a non-integer one is refused."""
    engine = FakeEngine()
    runner, port = await start_engine_server(engine, model_name=MODEL)
    url = f"http://127.0.0.1:{port}/v1/completions"
    try:
        for given in (3, None):
            body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
            status, _ = await post(
                http, url, body if given is None else {**body, "priority": given}
            )
            assert status == 200
        assert [r.priority for r in engine.requests] == [3, 0]
        status, answer = await post(http, url, {"model": MODEL, "prompt": "x", "priority": "hi"})
        assert (status, answer["error"]["param"]) == (400, "priority")
    finally:
        await runner.cleanup()


async def test_metrics_list_the_lora_adapters_as_vllms_lora_requests_info(
    http: aiohttp.ClientSession,
) -> None:
    """vLLM with ``--enable-lora`` exports ``vllm:lora_requests_info`` (``max_lora`` and the
    adapters of the running and waiting requests in its labels), which the control plane's
    scrape reads; an engine without adapters exports none."""
    engine = SimEngine("e0", SimEngineConfig(max_loras=2), lora_adapters=["sql"])
    runner, port = await start_engine_server(engine, model_name=MODEL, lora_modules={"sql": "s"})
    client = HTTPEngineClient(make_instance("e0", port=port, model_name=MODEL), http)
    try:
        text = await (await http.get(f"http://127.0.0.1:{port}/metrics")).text()
        assert 'vllm:lora_requests_info{max_lora="2",running_lora_adapters="",' in text
        stats = await client.stats()
        assert (stats.max_lora, stats.lora_adapters) == (2, frozenset())
        engine._core.add_request("r1", list(range(50)), 10, arrival=0.0, lora="sql")
        stats = await client.stats()
        assert stats.lora_adapters == frozenset({"sql"})
    finally:
        await runner.cleanup()
        await engine.aclose()
    plain = SimEngine("e1")
    runner, port = await start_engine_server(plain, model_name=MODEL)
    try:
        text = await (await http.get(f"http://127.0.0.1:{port}/metrics")).text()
        assert "lora_requests_info" not in text
    finally:
        await runner.cleanup()
        await plain.aclose()


class _DownEngine(FakeEngine):
    """An engine whose health check and statistics fail (it went away)."""

    async def health(self) -> bool:
        raise EngineError("engine down", status=503)

    async def stats(self) -> Any:
        raise EngineError("engine down", status=503)


async def test_probes_of_an_engine_that_fails_answer_its_failure(
    http: aiohttp.ClientSession,
) -> None:
    """``/health`` says 503 (unhealthy, as vLLM's); the statistics endpoints answer the
    engine's error in vLLM's JSON body with the engine's status, never a 500 page."""
    runner, port = await start_app(create_engine_app(_DownEngine(), model_name=MODEL))
    base = f"http://127.0.0.1:{port}"
    try:
        async with http.get(f"{base}/health") as resp:
            assert resp.status == 503
        for path in ("/metrics", "/get_load", "/load", "/server_info", "/get_server_info"):
            async with http.get(base + path) as resp:
                assert resp.status == 503, path
                error = (await resp.json())["error"]
            assert (error["message"], error["type"], error["code"]) == (
                "engine down", "Service Unavailable", 503,
            ), path  # fmt: skip
    finally:
        await runner.cleanup()


async def test_an_engine_error_with_a_status_of_no_name_is_typed_error(
    http: aiohttp.ClientSession,
) -> None:
    """A status with no HTTP phrase (nginx's 499, a client gone) is passed on, typed
    ``Error``."""
    fake = FakeEngine(fail_with=EngineError("client closed", status=499))
    runner, port = await start_app(create_engine_app(fake, model_name=MODEL))
    try:
        status, err = await post(http, f"http://127.0.0.1:{port}/v1/completions", {"prompt": "x"})
    finally:
        await runner.cleanup()
    assert status == 499
    assert err["error"] == {"message": "client closed", "type": "Error", "param": None,
                            "code": 499}  # fmt: skip


async def test_tokenizer_endpoints_refuse_a_prompt_or_tokens_of_the_wrong_type(
    base: str, http: aiohttp.ClientSession
) -> None:
    for path in ("/tokenize", "/v1/completions/render"):
        for prompt in ({"a": 1}, [1, "2"], [True]):
            status, err = await post(http, base + path, {"prompt": prompt})
            assert status == 400, (path, prompt)
            assert err["error"]["param"] == "prompt"
            assert err["error"]["message"] == "prompt must be a string or a list of token ids"
    for ids in ("1 2", [1, 2.5], [False], None):
        status, err = await post(http, f"{base}/detokenize", {"tokens": ids})
        assert status == 400, ids
        assert err["error"]["message"] == "tokens must be a list of integers"


async def test_the_text_a_server_remembers_for_detokenize_is_bounded(
    base: str, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pieces of tokenized text kept for ``/detokenize`` are capped: the oldest go."""
    monkeypatch.setattr(sim_server, "_PIECE_CACHE_LIMIT", 2)
    status, tok = await post(http, f"{base}/tokenize", {"prompt": "alpha beta gamma"})
    assert status == 200 and tok["count"] == 3
    first, *rest = tok["tokens"]
    status, detok = await post(http, f"{base}/detokenize", {"tokens": rest})
    assert status == 200 and detok == {"prompt": " beta gamma"}
    status, err = await post(http, f"{base}/detokenize", {"tokens": [first]})
    assert status == 400 and f"token ids [{first}] are unknown" in err["error"]["message"]


async def test_a_streamed_chat_with_return_token_ids_leads_with_its_prompts_ids(
    base: str, http: aiohttp.ClientSession
) -> None:
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hello there"}]}
    _, tok = await post(http, f"{base}/tokenize", chat)
    body = {**chat, "max_tokens": 2, "stream": True, "return_token_ids": True}
    events = await sse_events(http, f"{base}/v1/chat/completions", body)
    role = json.loads(events[0])
    assert role["choices"][0]["delta"]["role"] == "assistant"
    assert role["prompt_token_ids"] == tok["tokens"]
    assert events[-1] == "[DONE]"
