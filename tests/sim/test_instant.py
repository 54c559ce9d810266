"""The instant engine: immediate answers of ``max_tokens`` tokens, over vLLM's HTTP API too."""

from __future__ import annotations

import subprocess
import sys

import aiohttp
import openai
import pytest

from sage_llm import tokens
from sage_llm.engines.base import EngineClient, EngineRequest
from sage_llm.errors import InvalidRequestError
from sage_llm.sim.instant import INSTANT_MAX_MODEL_LEN, InstantEngine
from sage_llm.sim.server import start_engine_server

MODEL = "llama-3-8b"


async def test_generate_yields_max_tokens_chunks_then_usage() -> None:
    engine = InstantEngine("i0")
    assert isinstance(engine, EngineClient)
    req = EngineRequest("r1", MODEL, prompt="Hello, my name is Bob", max_tokens=3)
    chunks = [c async for c in engine.generate(req)]
    assert [c.text for c in chunks] == [" x"] * 3
    assert [c.finish_reason for c in chunks] == [None, None, "length"]
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 3 and usage.prompt_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])
    # each chunk carries its token's id (return_token_ids), as the shared tokenizer gives it
    assert [c.token_ids for c in chunks] == [(tokens.token_id(" x"),)] * 3
    stats = await engine.stats()
    assert (stats.generation_tokens_total, stats.prompt_tokens_total) == (3, usage.prompt_tokens)
    assert await engine.health()


async def test_max_tokens_one_gives_one_chunk() -> None:
    engine = InstantEngine("i0")
    req = EngineRequest("r1", MODEL, prompt="Hi", max_tokens=1)
    chunks = [c async for c in engine.generate(req)]
    assert [(c.text, c.finish_reason) for c in chunks] == [(" x", "length")]
    usage = chunks[0].usage
    assert usage is not None and usage.completion_tokens == 1


@pytest.mark.parametrize(
    ("extra", "param"),
    [({"top_k": -5}, "top_k"), ({"presence_penalty": 5}, "presence_penalty"),
     ({"repetition_penalty": 0}, "repetition_penalty"), ({"min_tokens": 3}, "min_tokens"),
     ({"suffix": "!"}, "suffix"), ({"return_token_ids": "x"}, "return_token_ids")],
)  # fmt: skip
async def test_sampling_fields_vllm_refuses_are_refused(
    extra: dict[str, object], param: str
) -> None:
    """As the simulated engine and vLLM refuse them: a proxy's error path is measured
    behind it as behind them."""
    req = EngineRequest("r1", MODEL, prompt="hi", max_tokens=2, extra=extra)
    with pytest.raises(InvalidRequestError) as err:
        [c async for c in InstantEngine("i0").generate(req)]
    assert err.value.param == param


async def test_a_request_beyond_its_context_is_refused() -> None:
    engine = InstantEngine("i0")
    assert await engine.context_length() == INSTANT_MAX_MODEL_LEN
    req = EngineRequest("r1", MODEL, prompt="hi", max_tokens=100_000_000)
    with pytest.raises(InvalidRequestError, match="max_model_len=32768") as err:
        [c async for c in engine.generate(req)]
    assert err.value.param == "max_tokens"


@pytest.mark.parametrize(
    ("changes", "param"),
    [({"stop": ["x"]}, "stop"), ({"extra": {"logprobs": 2}}, "logprobs"),
     ({"extra": {"logprobs": 0}}, "logprobs"),
     ({"extra": {"prompt_logprobs": 0}}, "prompt_logprobs"),
     ({"extra": {"n": 2}}, "n"), ({"extra": {"echo": True}}, "echo")],
)  # fmt: skip
async def test_options_it_does_not_apply_are_refused_not_ignored(
    changes: dict[str, object], param: str
) -> None:
    req = EngineRequest("r1", MODEL, prompt="hi", max_tokens=2).with_changes(**changes)
    with pytest.raises(InvalidRequestError, match="does not apply") as err:
        [c async for c in InstantEngine("i0").generate(req)]
    assert err.value.param == param
    plain = EngineRequest(
        "r2", MODEL, prompt="hi", max_tokens=2,
        extra={"n": 1, "logprobs": None, "stop_token_ids": [], "echo": False},
    )  # fmt: skip
    assert len([c async for c in InstantEngine("i0").generate(plain)]) == 2


async def test_pd_legs_are_refused_for_good_naming_the_option() -> None:
    req = EngineRequest("r1", MODEL, prompt="x", max_tokens=1)
    with pytest.raises(InvalidRequestError, match="whole requests only") as err:
        await InstantEngine("i0").prefill(req)
    assert err.value.param == "kv_transfer_params"
    # a decode leg too: run whole, it would look served with no KV pulled
    params = {"do_remote_prefill": True, "remote_request_id": "zz"}
    decode = EngineRequest("r2", MODEL, prompt="x", max_tokens=2, kv_transfer_params=params)
    with pytest.raises(InvalidRequestError, match="whole requests only") as err:
        [c async for c in InstantEngine("i0").generate(decode)]
    assert err.value.param == "kv_transfer_params"


async def test_a_max_model_len_given_bounds_requests_and_is_reported() -> None:
    engine = InstantEngine("i0", max_model_len=100)
    assert await engine.context_length() == 100
    long = EngineRequest("r1", MODEL, prompt="hi", max_tokens=200)
    with pytest.raises(InvalidRequestError, match="cannot be greater than max_model_len=100"):
        [c async for c in engine.generate(long)]
    cut = EngineRequest("r2", MODEL, prompt="hi", max_tokens=100)  # served, cut (as vLLM)
    *_, last = [c async for c in engine.generate(cut)]
    assert last.usage is not None and last.usage.prompt_tokens + last.usage.completion_tokens == 100
    for bad in (0, True, "100"):
        with pytest.raises(ValueError, match="max_model_len must be"):
            InstantEngine("i0", max_model_len=bad)  # type: ignore[arg-type]


async def test_served_over_http_answers_completions_and_streamed_chat() -> None:
    engine = InstantEngine("i0")
    runner, port = await start_engine_server(engine, model_name=MODEL, shutdown_timeout=1.0)
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x")
    try:
        done = await client.completions.create(model=MODEL, prompt="hello", max_tokens=4)
        assert done.choices[0].text == " x x x x"
        assert done.choices[0].finish_reason == "length"
        assert done.usage is not None and done.usage.completion_tokens == 4
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
            stream=True, stream_options={"include_usage": True},
        )  # fmt: skip
        text, usage = "", None
        async for event in stream:
            text += "".join(c.delta.content or "" for c in event.choices)
            usage = event.usage or usage
        assert text == " x x"
        assert usage is not None and usage.completion_tokens == 2
        # the token ids it returns are ones its /detokenize reads
        ids = await client.completions.create(
            model=MODEL, prompt="hello", max_tokens=2, extra_body={"return_token_ids": True}
        )
        token_ids = ids.model_dump()["choices"][0]["token_ids"]
        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{port}/detokenize"
            async with http.post(url, json={"tokens": token_ids}) as resp:
                assert (resp.status, await resp.json()) == (200, {"prompt": " x x"})
    finally:
        await client.close()
        await runner.cleanup()


def test_cli_refuses_an_instant_pd_leg() -> None:
    argv = [sys.executable, "-m", "sage_llm.cli", "engine-sim", "--instant", "--role", "prefill"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode != 0
    assert "--instant runs whole requests only" in proc.stderr + proc.stdout


async def test_every_request_served_is_timed_in_the_queue_histogram_at_0_s() -> None:
    """As documented: it reports a queue time of 0 for every request, so its server's
    ``vllm:request_queue_time_seconds`` counts every finished request."""
    runner, port = await start_engine_server(InstantEngine("i0"), model_name=MODEL)
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(2):
                body = {"model": MODEL, "prompt": "hello", "max_tokens": 2}
                async with http.post(f"{base}/v1/completions", json=body) as resp:
                    assert resp.status == 200
            async with http.get(f"{base}/metrics") as resp:
                lines = (await resp.text()).splitlines()
    finally:
        await runner.cleanup()
    queue = {
        line.split("{", 1)[0]: line.rsplit(" ", 1)[1]
        for line in lines
        if line.startswith(("vllm:request_queue_time_seconds_count",
                            "vllm:request_queue_time_seconds_sum"))
    }  # fmt: skip
    assert queue == {
        "vllm:request_queue_time_seconds_count": "2.0",
        "vllm:request_queue_time_seconds_sum": "0.0",
    }
