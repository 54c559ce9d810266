"""Peer routers from PyPI route OpenAI traffic to two ``sage-llm engine-sim`` processes.

Each peer (``vllm-router``, ``sglang-router``) is installed on first use into its own venv
under the peers cache (see :mod:`sage_llm.bench.peers`; about 30 s each) and reused after.
Where PyPI cannot be reached the tests are skipped with the reason, except under CI
(``CI=true``) or with ``SAGE_LLM_REQUIRE_PEERS=1``, where a failed install fails them.
``SAGE_LLM_REQUIRE_PEERS=0`` always allows the skip.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import cast

import pytest
import pytest_asyncio
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionStreamOptionsParam

from sage_llm import tokens
from sage_llm.bench.peers import PeerError, PeerInstall, ensure_peer_sync
from sage_llm.bench.procs import EngineFleet, PeerProcess, counter_total, start_engine_sims
from sage_llm.bench.procs import start_peer_router as start_router

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

MODEL = "llama-3-8b"
N_REQUESTS = 40
SPEED = 100.0
CONCURRENCY = 8
WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while",
         "engines", "batch", "tokens")  # fmt: skip


def _required() -> bool:
    flag = os.environ.get("SAGE_LLM_REQUIRE_PEERS")
    if flag is None:
        flag = os.environ.get("CI", "")
    return flag.strip().lower() in {"1", "true", "yes"}


def _install_or_skip(name: str) -> PeerInstall:
    try:
        return ensure_peer_sync(name)
    except PeerError as exc:
        if _required():
            pytest.fail(f"{name} could not be installed: {exc.message}")
        pytest.skip(f"{name} could not be installed (no network to PyPI?): {exc.message}")


@pytest.fixture(scope="session")
def vllm_router() -> PeerInstall:
    """vllm-router, installed once (cached across sessions)."""
    return _install_or_skip("vllm-router")


@pytest.fixture(scope="session")
def sglang_router() -> PeerInstall:
    """sglang-router, installed once (cached across sessions)."""
    return _install_or_skip("sglang-router")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def fleet() -> AsyncIterator[EngineFleet]:
    """Two general engine-sim processes shared by the regular-mode tests of this module."""
    async with await start_engine_sims(2, model=MODEL, speed=SPEED) as engines:
        yield engines


@dataclass(frozen=True)
class Call:
    """One request of the mix and what its answer must contain."""

    index: int
    chat: bool
    stream: bool
    max_tokens: int
    prompt: str

    @property
    def messages(self) -> list[dict[str, str]]:
        return [{"role": "system", "content": "be brief"}, {"role": "user", "content": self.prompt}]

    @property
    def prompt_tokens(self) -> int:
        text = tokens.chat_prompt_text(self.messages) if self.chat else self.prompt
        return tokens.count_tokens(text)


def _calls(n: int) -> list[Call]:
    """Completions and chat, streaming and not, in equal parts, with varied lengths."""
    calls = []
    for i in range(n):
        words = [WORDS[(i * 7 + j) % len(WORDS)] for j in range(3 + (i * 5) % 40)]
        prompt = f"request {i}: " + " ".join(words)
        calls.append(Call(i, chat=i % 2 == 1, stream=(i // 2) % 2 == 1,
                          max_tokens=1 + i % 8, prompt=prompt))  # fmt: skip
    return calls


@dataclass(frozen=True)
class Answer:
    """What came back for one call."""

    call: Call
    prompt_tokens: int
    completion_tokens: int
    pieces: int
    finish_reason: str | None


async def _send(client: AsyncOpenAI, call: Call) -> Answer:
    messages = cast("list[ChatCompletionMessageParam]", call.messages)
    options: ChatCompletionStreamOptionsParam = {"include_usage": True}
    finish: str | None = None
    if not call.stream:
        if call.chat:
            chat = await client.chat.completions.create(
                model=MODEL, messages=messages, max_tokens=call.max_tokens
            )
            usage, finish = chat.usage, chat.choices[0].finish_reason
            pieces = call.max_tokens if chat.choices[0].message.content else 0
        else:
            comp = await client.completions.create(
                model=MODEL, prompt=call.prompt, max_tokens=call.max_tokens
            )
            usage, finish = comp.usage, comp.choices[0].finish_reason
            pieces = call.max_tokens if comp.choices[0].text else 0
        assert usage is not None, f"call {call.index}: no usage"
        return Answer(call, usage.prompt_tokens, usage.completion_tokens, pieces, finish)
    pieces, usage = 0, None
    if call.chat:
        chat_stream = await client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=call.max_tokens, stream=True,
            stream_options=options,
        )  # fmt: skip
        async for chunk in chat_stream:
            usage = chunk.usage or usage
            for choice in chunk.choices:
                pieces += bool(choice.delta.content)
                finish = choice.finish_reason or finish
    else:
        comp_stream = await client.completions.create(
            model=MODEL, prompt=call.prompt, max_tokens=call.max_tokens, stream=True,
            stream_options=options,
        )  # fmt: skip
        async for piece in comp_stream:
            usage = piece.usage or usage
            for c in piece.choices:
                pieces += bool(c.text)
                finish = cast("str | None", c.finish_reason) or finish  # None until the end
    assert usage is not None, f"call {call.index}: no usage chunk"
    return Answer(call, usage.prompt_tokens, usage.completion_tokens, pieces, finish)


async def _drive(router: PeerProcess, calls: list[Call]) -> list[Answer]:
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(call: Call) -> Answer:
        async with gate:
            return await _send(client, call)

    async with AsyncOpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0,
                           timeout=30.0) as client:  # fmt: skip
        return await asyncio.gather(*(one(c) for c in calls))


def _check_answers(answers: list[Answer]) -> None:
    assert len(answers) == N_REQUESTS
    for a in answers:
        where = f"call {a.call.index} (chat={a.call.chat}, stream={a.call.stream})"
        assert a.completion_tokens == a.call.max_tokens, where
        assert a.prompt_tokens == a.call.prompt_tokens, where
        assert a.finish_reason == "length", where
        if a.call.stream:
            assert a.pieces == a.call.max_tokens, where  # one token per streamed chunk


async def _requests_by_engine(fleet: EngineFleet) -> dict[str, float]:
    metrics = await fleet.metrics()
    return {url: counter_total(s, "vllm:request_success_total") for url, s in metrics.items()}


async def _route_through(
    fleet: EngineFleet,
    install: PeerInstall,
    policy: str,
    check_split: Callable[[list[float]], None],
) -> None:
    before = await _requests_by_engine(fleet)
    name = install.spec.name
    async with await start_router(name, fleet.urls, policy=policy, install=install) as router:
        answers = await _drive(router, _calls(N_REQUESTS))
    _check_answers(answers)
    after = await _requests_by_engine(fleet)
    served = [after[url] - before[url] for url in fleet.urls]
    assert sum(served) == N_REQUESTS
    assert all(count > 0 for count in served), served  # both engines got traffic
    check_split(sorted(served))


def _even(split: list[float]) -> None:
    assert split[1] - split[0] <= 2, split


def _any(split: list[float]) -> None:
    assert len(split) == 2


async def test_vllm_router_round_robin(fleet: EngineFleet, vllm_router: PeerInstall) -> None:
    await _route_through(fleet, vllm_router, "round_robin", _even)


async def test_vllm_router_cache_aware(fleet: EngineFleet, vllm_router: PeerInstall) -> None:
    await _route_through(fleet, vllm_router, "cache_aware", _any)


async def test_sglang_router_round_robin(fleet: EngineFleet, sglang_router: PeerInstall) -> None:
    await _route_through(fleet, sglang_router, "round_robin", _even)


async def test_vllm_router_pd_runs_both_legs(vllm_router: PeerInstall) -> None:
    """vLLM's PD protocol: every request is a prefill leg (one token, kv_transfer_params)
    on the prefill engine, then the whole request on the decode engine."""
    async with await start_engine_sims(
        2, model=MODEL, speed=SPEED, role=["prefill", "decode"]
    ) as fleet:
        pd = (fleet.urls_for("prefill"), fleet.urls_for("decode"))
        async with await start_router("vllm-router", pd=pd, install=vllm_router) as router:
            assert router.pd
            answers = await _drive(router, _calls(N_REQUESTS))
        _check_answers(answers)
        metrics = await fleet.metrics()
        prefill, decode = (metrics[pd[0][0]], metrics[pd[1][0]])
        assert counter_total(prefill, "vllm:request_success_total") == N_REQUESTS
        assert counter_total(decode, "vllm:request_success_total") == N_REQUESTS
        assert counter_total(prefill, "vllm:generation_tokens_total") == N_REQUESTS
        assert counter_total(decode, "vllm:generation_tokens_total") == sum(
            a.call.max_tokens for a in answers
        )
