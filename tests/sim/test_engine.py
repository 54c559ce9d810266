"""The async simulated engine, run on virtual time."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import pytest

from sage_llm import tokens
from sage_llm.engines.base import Chunk, EngineClient, EngineRequest
from sage_llm.errors import ConfigError, EngineConnectionError, EngineError, InvalidRequestError
from sage_llm.sim import engine as engine_module
from sage_llm.sim.clock import run_virtual
from sage_llm.sim.engine import KVTransferHub, SimEngine, SimEngineConfig
from sage_llm.sim.server_metrics import ReportsQueueTime
from sage_llm.sim.server_requests import parse_request, prompt_token_ids
from sage_llm.types import ExecutionInstanceType

PROMPT = "The quick brown fox jumps over the lazy dog. " * 20


def req(rid: str = "r0", **kwargs: Any) -> EngineRequest:
    kwargs.setdefault("prompt", PROMPT)
    kwargs.setdefault("max_tokens", 8)
    return EngineRequest(request_id=rid, model="llama-3-8b", **kwargs)


def now() -> float:
    return asyncio.get_running_loop().time()


async def collect(engine: SimEngine, request: EngineRequest) -> list[Chunk]:
    return [chunk async for chunk in engine.generate(request)]


def virtual(fn: Callable[[], Awaitable[Any]]) -> Any:
    return run_virtual(fn)


def test_generate_yields_max_tokens_with_retokenizable_text() -> None:
    async def main() -> None:
        engine = SimEngine("sim-0")
        chunks = await collect(engine, req(max_tokens=12))
        await engine.aclose()
        text = "".join(c.text for c in chunks)
        assert len(chunks) == 12
        assert sum(len(c.token_ids) for c in chunks) == 12
        assert len(tokens.tokenize(text)) == 12
        assert [c.finish_reason for c in chunks] == [None] * 11 + ["length"]
        assert all(c.usage is None for c in chunks[:-1])
        usage = chunks[-1].usage
        assert usage is not None
        assert (usage.prompt_tokens, usage.completion_tokens) == (
            tokens.count_tokens(PROMPT),
            12,
        )
        assert now() > 0  # time passed, virtually

    virtual(main)


def test_a_request_in_its_last_step_still_runs_and_holds_its_kv() -> None:
    """The core applies a step when it starts; while the step runs, its requests still
    count as running and hold their KV, and its tokens are not counted yet (a one-token
    request, as a PD prefill leg, was never seen running)."""

    async def main() -> None:
        engine = SimEngine("sim-0")
        task = asyncio.create_task(collect(engine, req(prompt=PROMPT * 8, max_tokens=1)))
        await asyncio.sleep(0.001)  # its single step has started: prefill, and its one token
        during = await engine.stats()
        chunks = await task
        after = await engine.stats()
        await engine.aclose()
        assert len(chunks) == 1
        assert (during.running, during.waiting) == (1, 0)
        assert during.kv_usage > 0 and during.generation_tokens_total == 0
        assert during.prompt_tokens_total == 0
        assert (after.running, after.kv_usage, after.generation_tokens_total) == (0, 0.0, 1)
        assert after.prompt_tokens_total == tokens.count_tokens(PROMPT * 8)

    virtual(main)


def test_engine_is_an_engine_client_with_stats_and_health() -> None:
    async def main() -> None:
        engine = SimEngine("sim-0", SimEngineConfig(num_gpu_blocks=1000))
        assert isinstance(engine, EngineClient)
        assert engine.instance_id == "sim-0"
        assert engine.config.num_gpu_blocks == 1000
        assert await engine.health()
        await collect(engine, req())
        stats = await engine.stats()
        assert stats.generation_tokens_total == 8
        assert stats.num_gpu_blocks == 1000
        assert stats.block_size == 16
        await engine.aclose()
        assert not await engine.health()
        with pytest.raises(EngineConnectionError):
            await collect(engine, req("late"))

    virtual(main)


def test_chat_messages_are_tokenized_like_the_control_plane_does() -> None:
    async def main() -> None:
        engine = SimEngine("sim-0")
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
        chunks = await collect(engine, req(prompt=None, messages=messages, max_tokens=3))
        usage = chunks[-1].usage
        assert usage is not None
        expected = len(tokens.tokenize(tokens.chat_prompt_text(messages)))
        assert usage.prompt_tokens == expected
        assert usage.completion_tokens == 3

    virtual(main)


def test_output_is_deterministic_per_seed_and_request() -> None:
    async def text_of(seed: int, rid: str) -> str:
        engine = SimEngine("sim", SimEngineConfig(seed=seed))
        return "".join(c.text for c in await collect(engine, req(rid)))

    async def main() -> None:
        assert await text_of(1, "a") == await text_of(1, "a")
        assert await text_of(1, "a") != await text_of(1, "b")
        assert await text_of(1, "a") != await text_of(2, "a")

    virtual(main)


def test_concurrent_requests_are_batched() -> None:
    async def timed(engine: SimEngine, rid: str) -> float:
        start = now()
        await collect(engine, req(rid, max_tokens=32))
        return now() - start

    async def main() -> None:
        solo = SimEngine("solo")
        individual = [await timed(solo, f"s{i}") for i in range(8)]
        shared = SimEngine("shared")
        start = now()
        await asyncio.gather(*(timed(shared, f"c{i}") for i in range(8)))
        together = now() - start
        assert together < sum(individual) / 4
        stats = await shared.stats()
        assert stats.generation_tokens_total == 8 * 32

    virtual(main)


def test_prefix_cache_hits_show_in_usage() -> None:
    async def main() -> None:
        engine = SimEngine("sim-0")
        await collect(engine, req("a", prompt=PROMPT + " first question"))
        chunks = await collect(engine, req("b", prompt=PROMPT + " second question"))
        usage = chunks[-1].usage
        assert usage is not None
        assert usage.cached_tokens is not None and usage.cached_tokens > 0
        assert usage.cached_tokens % 16 == 0
        assert (await engine.stats()).prefix_cache_hits_total == usage.cached_tokens

    virtual(main)


def test_a_request_for_its_prompts_logprobs_reads_no_prefix_cache() -> None:
    """As vLLM (``skip_reading_prefix_cache``): its prompt is computed whole, and the
    lookup it skipped is not counted; what it computed is cached for the next request."""

    async def main() -> None:
        engine = SimEngine("sim-0")
        await collect(engine, req("a", prompt=PROMPT + " first question"))
        before = await engine.stats()
        for rid, extra in (
            ("plp", {"prompt_logprobs": 0}),
            ("echo", {"echo": True, "logprobs": 0}),
        ):
            chunks = await collect(
                engine, req(rid, prompt=PROMPT + " second question", stream=False, extra=extra)
            )
            usage = chunks[-1].usage
            assert usage is not None and usage.cached_tokens == 0, rid
        after = await engine.stats()
        assert after.prefix_cache_queries_total == before.prefix_cache_queries_total
        chunks = await collect(engine, req("b", prompt=PROMPT + " second question"))
        usage = chunks[-1].usage
        assert usage is not None  # every full block of the prompt, the second question's too
        assert usage.cached_tokens == (usage.prompt_tokens - 1) // 16 * 16

    virtual(main)


def test_a_cache_salt_shares_cached_blocks_only_under_the_same_salt() -> None:
    async def main() -> None:
        engine = SimEngine("sim-0")

        async def cached(rid: str, salt: str | None) -> int | None:
            extra = {} if salt is None else {"cache_salt": salt}
            chunks = await collect(engine, req(rid, extra=extra))
            usage = chunks[-1].usage
            assert usage is not None
            return usage.cached_tokens

        assert await cached("a1", "a") == 0
        assert await cached("b1", "b") == 0  # another salt: nothing shared
        assert await cached("n1", None) == 0  # nor without one
        hit = await cached("a2", "a")
        assert hit is not None and hit > 0
        assert await cached("n2", None) == hit
        for bad in ("", "a/b", "x" * 129, 5):
            with pytest.raises(InvalidRequestError) as err:
                await collect(engine, req("bad", extra={"cache_salt": bad}))
            assert err.value.param == "cache_salt"

    virtual(main)


def test_a_lora_adapters_prompt_shares_cached_blocks_only_with_the_same_adapters() -> None:
    """vLLM hashes an adapter's blocks with its name (and a ``cache_salt`` with them): the
    same prompt shares no cached block across adapters, nor with the base model."""

    async def main() -> None:
        engine = SimEngine("sim-0", lora_adapters=["sql", "chat"])

        async def cached(rid: str, model: str, salt: str | None = None) -> int:
            extra = {} if salt is None else {"cache_salt": salt}
            chunks = await collect(engine, replace(req(rid, extra=extra), model=model))
            usage = chunks[-1].usage
            assert usage is not None and usage.cached_tokens is not None
            return usage.cached_tokens

        assert await cached("s1", "sql") == 0
        assert await cached("c1", "chat") == 0  # another adapter: nothing shared
        assert await cached("b1", "llama-3-8b") == 0  # nor with the model
        assert await cached("x1", "sql", salt="t") == 0  # nor under a salt
        hit = await cached("s2", "sql")
        assert hit > 0
        assert await cached("c2", "chat") == hit
        assert await cached("x2", "sql", salt="t") == hit

    virtual(main)


def test_requests_for_more_adapters_than_max_loras_wait_for_a_slot() -> None:
    """With one LoRA slot, a request for a second adapter waits until the first adapter's
    request is done; the engine's stats say which adapters it runs and holds waiting."""

    async def main() -> None:
        engine = SimEngine("sim-0", SimEngineConfig(max_loras=1), lora_adapters=["sql", "chat"])
        assert (await engine.stats()).max_lora == 1  # an engine with adapters says so at once
        loop = asyncio.get_running_loop()
        ends: dict[str, float] = {}

        async def run(rid: str, model: str) -> None:
            await collect(engine, replace(req(rid, max_tokens=20), model=model))
            ends[rid] = loop.time()

        tasks = [asyncio.create_task(run("s", "sql")), asyncio.create_task(run("c", "chat"))]
        await asyncio.sleep(0.05)
        stats = await engine.stats()
        assert engine.lora_requests() == (frozenset({"sql"}), frozenset({"chat"}))
        assert stats.lora_adapters == frozenset({"sql", "chat"})
        assert not stats.lora_room("code")
        await asyncio.gather(*tasks)
        assert ends["c"] > 1.8 * ends["s"]  # it ran only after sql's request ended
        assert engine.lora_requests() == (frozenset(), frozenset())
        await engine.aclose()

    virtual(main)


def test_an_engine_that_schedules_by_priority_takes_the_most_urgent_first() -> None:
    """One sequence at a time: under ``priority`` the waiting requests run by their
    ``priority`` (lower first), under ``fcfs`` by arrival."""

    async def main() -> None:
        for policy, expected in (("fcfs", ["a", "b", "c"]), ("priority", ["a", "c", "b"])):
            engine = SimEngine("sim-0", SimEngineConfig(max_num_seqs=1, scheduling_policy=policy))
            ended: list[str] = []

            async def run(
                rid: str, priority: int, engine: SimEngine = engine, ended: list[str] = ended
            ) -> None:
                await collect(engine, req(rid, max_tokens=4, priority=priority))
                ended.append(rid)

            tasks = [asyncio.create_task(run("a", 2))]
            await asyncio.sleep(0.001)  # a runs; b and c wait
            tasks += [asyncio.create_task(run("b", 4)), asyncio.create_task(run("c", 0))]
            await asyncio.gather(*tasks)
            assert ended == expected, policy
            await engine.aclose()

    virtual(main)


def test_cancelling_mid_stream_aborts_and_frees_kv() -> None:
    async def main() -> None:
        engine = SimEngine("sim-0")
        gen = engine.generate(req(max_tokens=100))
        got = [await anext(gen) for _ in range(3)]
        assert len(got) == 3
        assert engine.core.kv_usage > 0
        await gen.aclose()
        assert engine.core.kv_usage == 0.0
        assert not engine.core.has_work()

        async def consume() -> None:
            await collect(engine, req("r1", max_tokens=100))

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.05)
        assert engine.core.num_running == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert engine.core.kv_usage == 0.0
        assert (await engine.stats()).running == 0

    virtual(main)


def test_an_aborted_request_counts_only_what_its_client_was_given() -> None:
    """As vLLM's output processor: the tokens of a step still running when the client went
    away are not counted (each aborted stream had counted one more than it was given), nor
    the prompt of one that went before its first token."""

    async def main() -> None:
        engine = SimEngine("sim-0")
        gen = engine.generate(req(max_tokens=100))
        got = [await anext(gen) for _ in range(3)]
        await gen.aclose()  # read as they came: the next step was under way
        await asyncio.sleep(0.05)
        stats = await engine.stats()
        assert stats.generation_tokens_total == sum(len(c.token_ids) for c in got) == 3
        assert stats.prompt_tokens_total == tokens.count_tokens(PROMPT)

        early = SimEngine("sim-1")
        task = asyncio.create_task(collect(early, req("r1", prompt="word " * 4000)))
        await asyncio.sleep(0)  # it runs its prefill, then goes away before the token
        await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(1.0)
        stats = await early.stats()
        assert (stats.prompt_tokens_total, stats.generation_tokens_total) == (0.0, 0.0)

    virtual(main)


def test_close_fails_in_flight_streams() -> None:
    async def main() -> None:
        engine = SimEngine("sim-0")
        gen = engine.generate(req(max_tokens=50))
        await anext(gen)
        await engine.aclose()
        with pytest.raises(EngineConnectionError) as err:
            await anext(gen)
        assert err.value.retryable is False  # tokens were already produced
        await engine.aclose()  # closing again is a no-op

    virtual(main)


def test_close_fails_a_prefill_leg_that_waits_for_its_step() -> None:
    async def main() -> None:
        engine = SimEngine("p0", SimEngineConfig(role=ExecutionInstanceType.PREFILLING))
        leg = asyncio.create_task(engine.prefill(req("pd-1")))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert not leg.done()
        await engine.aclose()
        with pytest.raises(EngineConnectionError, match="engine closed"):
            await leg
        assert engine.core.kv_usage == 0.0  # nothing left pinned

    virtual(main)


class _FaultyCore:
    """A simulated core whose steps raise once ``failing`` is set; all else is the wrapped
    core's."""

    def __init__(self, core: Any) -> None:
        self._wrapped = core
        self.failing = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._wrapped, name)

    def step(self, now: float, **kwargs: Any) -> Any:
        if self.failing:
            raise RuntimeError("core fault")
        return self._wrapped.step(now, **kwargs)


def test_a_step_that_fails_fails_every_request_naming_the_failure() -> None:
    """A fault inside the simulated core ends the requests it holds with an engine error
    that names it (none is left waiting), and the engine reports itself unhealthy."""

    async def main() -> None:
        engine = SimEngine("sim-0")
        # The fault goes in through a stand-in core that delegates all else (a compiled
        # core, under `make sim-accel`, has read-only methods that cannot be patched).
        faulty = _FaultyCore(engine.core)
        engine._core = faulty  # type: ignore[assignment]
        gen = engine.generate(req("a", max_tokens=50))
        await anext(gen)
        waiting = asyncio.create_task(collect(engine, req("b", max_tokens=5)))
        await asyncio.sleep(0)

        faulty.failing = True
        with pytest.raises(EngineError, match=r"simulated engine failed: RuntimeError\('core"):
            async for _ in gen:
                pass
        with pytest.raises(EngineError, match="simulated engine failed"):
            await waiting
        assert await engine.health() is False
        with pytest.raises(EngineConnectionError):
            await collect(engine, req("c"))
        await engine.aclose()

    virtual(main)


@pytest.mark.parametrize(
    ("request_kwargs", "param"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": None}, "prompt"),
        ({"prompt": None, "messages": []}, "messages"),
        ({"prompt": [1, -2, 3]}, "prompt"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"prompt": list(range(300))}, "input_tokens"),
        ({"prompt": list(range(256))}, "max_tokens"),
        ({"prompt": list(range(200)), "max_tokens": 300}, "max_tokens"),
        ({"extra": {"min_tokens": -1}}, "min_tokens"),
        ({"extra": {"n": 0}}, "n"),
        ({"extra": {"n": "2"}}, "n"),
        ({"extra": {"n": 257}}, "n"),  # above max_num_seqs (256)
        ({"stop": ["a", "b", "c", "d", "e"]}, "body.stop"),
        ({"stop": ["a", ""]}, "stop"),
        ({"extra": {"suffix": "!"}}, "suffix"),
        ({"extra": {"return_token_ids": "x"}}, "return_token_ids"),
    ],
)
def test_invalid_requests_raise_with_param(request_kwargs: dict[str, Any], param: str) -> None:
    async def main() -> None:
        engine = SimEngine("sim-0", SimEngineConfig(max_model_len=256))
        with pytest.raises(InvalidRequestError) as err:
            await collect(engine, req(**request_kwargs))
        assert err.value.param == param

    virtual(main)


def test_a_request_past_its_context_runs_cut_to_it() -> None:
    """As vLLM 0.32: max_tokens cut to what the context holds after the prompt."""

    async def main() -> None:
        engine = SimEngine("sim-0", SimEngineConfig(max_model_len=256))
        chunks = await collect(engine, req(prompt=list(range(200)), max_tokens=100))
        await engine.aclose()
        assert chunks[-1].finish_reason == "length" and chunks[-1].usage is not None
        assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (200, 56)

    virtual(main)


def test_stop_string_finishes_with_stop() -> None:
    async def main() -> None:
        probe = SimEngine("sim-0")
        full = "".join(c.text for c in await collect(probe, req(max_tokens=30)))
        stop_word = full.split()[5]
        engine = SimEngine("sim-0")
        chunks = await collect(engine, req(max_tokens=30, stop=[" " + stop_word]))
        text = "".join(c.text for c in chunks)
        assert chunks[-1].finish_reason == "stop"
        assert full.startswith(text)
        assert len(text) < len(full)
        assert engine.core.kv_usage == 0.0
        # min_tokens keeps the stop string from ending the output early.
        late = await collect(
            SimEngine("sim-0"),
            req(max_tokens=30, stop=[" " + stop_word], extra={"min_tokens": 30}),
        )
        assert late[-1].finish_reason == "length"

    virtual(main)


def test_prefill_role_returns_vllm_kv_transfer_params() -> None:
    async def main() -> None:
        engine = SimEngine(
            "p0", SimEngineConfig(role=ExecutionInstanceType.PREFILLING, tp=2, kv_port=5601)
        )
        handle = await engine.prefill(req("pd-1", max_tokens=64))
        params = dict(handle.params)
        assert params["do_remote_prefill"] is True
        assert params["do_remote_decode"] is False
        assert params["remote_engine_id"] == "p0"
        assert params["remote_request_id"] == "pd-1"
        assert params["remote_port"] == 5601
        assert params["remote_host"]
        assert params["tp_size"] == 2
        n = tokens.count_tokens(PROMPT)
        assert params["num_tokens"] == handle.prompt_tokens == n
        assert len(params["remote_block_ids"]) == -(-(n + 1) // 16)
        assert handle.instance_id == "p0"
        first = handle.first_token
        assert first is not None
        assert first.finish_reason == "length"
        assert first.usage is not None
        assert first.usage.completion_tokens == 1
        assert engine.core.kv_usage > 0  # pinned for the decode side
        assert engine.release_kv("pd-1")
        assert engine.core.kv_usage == 0.0

    virtual(main)


def test_stop_strings_a_suffix_and_return_token_ids_are_refused_as_over_http() -> None:
    """The embedded fleet of ``sage-llm serve`` had taken what engine-sim (and vLLM)
    refuse: five stop strings, an empty one, a completion's suffix, a ``return_token_ids``
    that is not a boolean. A chat's suffix is not a completion's: both ignore it."""
    bodies: list[dict[str, Any]] = [
        {"stop": ["a", "b", "c", "d", "e"]},
        {"stop": ["a", ""]},
        {"stop": "a", "suffix": "!"},
        {"stop": "a", "return_token_ids": "x"},
    ]

    async def main() -> None:
        engine = SimEngine("sim-0", SimEngineConfig())
        for body in bodies:
            with pytest.raises(InvalidRequestError) as over_http:
                parse_request(
                    {"model": "llama-3-8b", "prompt": "hi", **body},
                    chat=False, model_name="llama-3-8b",
                )  # fmt: skip
            stop = body["stop"]
            extra = {k: v for k, v in body.items() if k != "stop"}
            request = req(stop=[stop] if isinstance(stop, str) else stop, extra=extra)
            with pytest.raises(InvalidRequestError) as in_process:
                await collect(engine, request)
            assert (in_process.value.param, in_process.value.message) == (
                over_http.value.param,
                over_http.value.message,
            )
        chat = req(prompt=None, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        chunks = await collect(engine, chat.with_changes(extra={"suffix": "!"}))
        assert chunks[-1].finish_reason == "length"

    virtual(main)


def test_a_prefill_leg_refuses_what_its_decode_leg_would_refuse() -> None:
    """Checked as vLLM checks a whole request before a leg runs: a bad sampling field had
    passed the prefill leg (its KV pinned), then the decode leg refused it."""

    async def main() -> None:
        engine = SimEngine("p0", SimEngineConfig(role=ExecutionInstanceType.PREFILLING))
        for extra, param in (({"top_k": -5}, "top_k"), ({"stop_token_ids": "a"}, "stop_token_ids"),
                             ({"logprobs": 50}, "logprobs"),
                             ({"suffix": "!"}, "suffix")):  # fmt: skip
            with pytest.raises(InvalidRequestError) as err:
                await engine.prefill(req("bad", extra=extra))
            assert err.value.param == param
        assert engine.core.kv_usage == 0.0  # nothing pinned

    virtual(main)


def test_decode_only_engine_refuses_prefill_legs() -> None:
    async def main() -> None:
        engine = SimEngine("d0", SimEngineConfig(role=ExecutionInstanceType.DECODING))
        with pytest.raises(EngineError) as err:
            await engine.prefill(req())
        assert err.value.retryable

    virtual(main)


def test_decode_leg_ttft_includes_kv_transfer_and_releases_prefill_kv() -> None:
    async def main() -> None:
        hub = KVTransferHub()
        link = 10.0
        prefill = SimEngine(
            "p0", SimEngineConfig(role=ExecutionInstanceType.PREFILLING), kv_hub=hub
        )
        decode = SimEngine(
            "d0",
            SimEngineConfig(role=ExecutionInstanceType.DECODING, kv_link_gbps=link),
            kv_hub=hub,
        )
        long_prompt = PROMPT * 10
        handle = await prefill.prefill(req("pd", prompt=long_prompt, max_tokens=5))
        assert prefill.core.kv_usage > 0
        start = now()
        first_at = None
        chunks = []
        async for chunk in decode.generate(
            req("pd", prompt=long_prompt, max_tokens=5, kv_transfer_params=handle.params)
        ):
            first_at = now() if first_at is None else first_at
            chunks.append(chunk)
        assert first_at is not None
        n = handle.prompt_tokens
        transfer = (n - 1) * decode.core.model.kv_bytes_per_token / (link * 1e9)
        one_step = decode.core.cost_model.step_time([], [n - 1])
        assert first_at - start == pytest.approx(transfer + one_step)
        assert len(chunks) == 5
        usage = chunks[-1].usage
        assert usage is not None
        assert usage.prompt_tokens == n
        assert (await decode.stats()).prompt_tokens_total == n
        # The decode side pulled the KV, so the prefill side unpinned it (still cached).
        assert prefill.core.kv_usage == 0.0
        # Same seed and request id: the decode leg repeats the prefill leg's first token.
        assert handle.first_token is not None
        assert chunks[0].text == handle.first_token.text

    virtual(main)


def test_speed_scales_virtual_latency() -> None:
    async def e2e(engine: SimEngine) -> float:
        start = now()
        await collect(engine, req(max_tokens=20))
        return now() - start

    async def main() -> None:
        slow = await e2e(SimEngine("a"))
        fast_engine = SimEngine("b")
        fast_engine.speed = 2.0
        assert fast_engine.speed == 2.0
        assert await e2e(fast_engine) == pytest.approx(slow / 2)
        for bad in (0.0, -1.0, math.nan):
            with pytest.raises(ConfigError, match="must be > 0") as err:
                fast_engine.speed = bad
            assert err.value.key == "speed"
        assert fast_engine.speed == 2.0  # unchanged

    virtual(main)


def test_queue_time_runs_from_arrival_to_first_scheduling() -> None:
    async def main() -> None:
        engine = SimEngine("sim-0", SimEngineConfig(max_num_seqs=2))
        assert isinstance(engine, ReportsQueueTime)
        start = now()
        ends: dict[str, float] = {}

        async def run(rid: str) -> None:
            await collect(engine, req(rid, max_tokens=4))
            ends[rid] = now()

        await asyncio.gather(*(run(f"q{i}") for i in range(4)))
        # Two run at once; the other two wait until those finish, then are scheduled.
        assert [engine.queue_time_s(f"q{i}") for i in range(2)] == [0.0, 0.0]
        for rid in ("q2", "q3"):
            assert engine.queue_time_s(rid) == pytest.approx(ends["q0"] - start)
        assert engine.queue_time_s("unknown") is None
        await engine.aclose()

    virtual(main)


def test_stop_token_ids_end_the_answer_at_the_token_kept_in_it() -> None:
    """As vLLM's ``stop_token_ids``: the first such token (at or after ``min_tokens``)
    ends the answer with ``stop``; its id is kept in ``token_ids`` and counted (its text is
    left out); the id is the stop reason."""

    async def main() -> None:
        full = await collect(SimEngine("sim-0"), req("a", max_tokens=30))
        ids = [t for c in full for t in c.token_ids]
        engine = SimEngine("sim-0")
        chunks = await collect(engine, req("a", max_tokens=30, extra={"stop_token_ids": [ids[6]]}))
        got = [t for c in chunks for t in c.token_ids]
        first = ids.index(ids[6])
        assert got == ids[: first + 1]
        assert chunks[-1].finish_reason == "stop"
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == first + 1
        assert engine.stop_reason("a") == ids[6]
        assert engine.core.kv_usage == 0.0
        late = await collect(
            SimEngine("sim-0"),
            req("a", max_tokens=30, extra={"stop_token_ids": [ids[0]], "min_tokens": 30}),
        )
        assert late[-1].finish_reason == "length"  # min_tokens first, as vLLM
        # vLLM masks stop tokens while fewer than min_tokens were generated: a stop token
        # at position min_tokens - 1 does not end it, one at position min_tokens does
        stop_at = ids[2]
        assert ids.index(stop_at) == 2  # (its first place)
        masked = await collect(
            SimEngine("sim-0"),
            req("a", max_tokens=30, extra={"stop_token_ids": [stop_at], "min_tokens": 3}),
        )
        kept = [t for c in masked for t in c.token_ids]
        assert kept[:3] == ids[:3] and len(kept) > 3  # went on past it
        ended = await collect(
            SimEngine("sim-0"),
            req("a", max_tokens=30, extra={"stop_token_ids": [stop_at], "min_tokens": 2}),
        )
        assert [t for c in ended for t in c.token_ids] == ids[:3]
        for bad in ([-1], ["7"], 7, [True]):
            with pytest.raises(InvalidRequestError) as err:
                await collect(SimEngine("sim-0"), req(max_tokens=4, extra={"stop_token_ids": bad}))
            assert err.value.param == "stop_token_ids"
        with pytest.raises(InvalidRequestError, match="min_tokens must be less than or equal"):
            await collect(SimEngine("sim-0"), req(max_tokens=2, extra={"min_tokens": 5}))

    virtual(main)


def test_max_model_len_is_at_most_what_the_kv_cache_holds() -> None:
    """vLLM refuses to start with a ``max_model_len`` its KV cache cannot hold; the
    simulated engine serves (and reports) what it holds."""
    small = SimEngine("s", SimEngineConfig(num_gpu_blocks=100, block_size=16))
    assert small.config.max_model_len == 1600
    roomy = SimEngine("r", SimEngineConfig(num_gpu_blocks=10_000, max_model_len=4096))
    assert roomy.config.max_model_len == 4096


def test_stop_reason_is_the_matched_stop_string_and_none_otherwise() -> None:
    async def main() -> None:
        engine = SimEngine("sim-0")
        plain = await collect(engine, req("a", max_tokens=30))
        full = "".join(c.text for c in plain)
        assert engine.stop_reason("a") is None
        assert all(c.extras is None for c in plain)
        stop = " " + full.split()[5]
        chunks = await collect(engine, req("a", max_tokens=30, stop=["no-such-word", stop]))
        assert chunks[-1].finish_reason == "stop"
        assert engine.stop_reason("a") == stop  # the same request again, stopped this time
        # on the last chunk too, as a choice's stop_reason in process (no server to ask)
        assert chunks[-1].extras == {"stop_reason": stop}
        assert engine.stop_reason("unknown") is None
        await engine.aclose()

    virtual(main)


def _flat(chunks: list[Chunk], key: str) -> list[Any]:
    return [x for c in chunks for x in c.logprobs[key]]


def test_completion_logprobs_are_plausible_and_deterministic_per_seed() -> None:
    async def main() -> None:
        def engine(seed: int) -> SimEngine:
            return SimEngine("sim-0", SimEngineConfig(seed=seed))

        chunks = await collect(engine(1), req("lp", max_tokens=12, extra={"logprobs": 3}))
        assert all(c.logprobs is not None for c in chunks)
        toks = _flat(chunks, "tokens")
        assert "".join(toks) == "".join(c.text for c in chunks)
        assert _flat(chunks, "text_offset") == [sum(map(len, toks[:i])) for i in range(12)]
        for tok, lp, top in zip(
            toks, _flat(chunks, "token_logprobs"), _flat(chunks, "top_logprobs"), strict=True
        ):
            assert -30.0 < lp <= 0.0
            assert top[tok] == lp and 3 <= len(top) <= 4  # the top 3 and the sampled token
            assert sum(math.exp(v) for v in top.values()) <= 1.0 + 1e-9
        again = await collect(engine(1), req("lp", max_tokens=12, extra={"logprobs": 3}))
        assert [c.logprobs for c in again] == [c.logprobs for c in chunks]
        other = await collect(engine(2), req("lp", max_tokens=12, extra={"logprobs": 3}))
        assert [c.logprobs for c in other] != [c.logprobs for c in chunks]
        plain = await collect(engine(1), req("lp", max_tokens=12))
        assert all(c.logprobs is None for c in plain)
        assert [c.text for c in plain] == [c.text for c in chunks]  # the text is unchanged

    virtual(main)


def test_chat_logprobs_list_the_content_tokens() -> None:
    async def main() -> None:
        messages = [{"role": "user", "content": "hello"}]
        extra = {"logprobs": True, "top_logprobs": 2}
        chunks = await collect(
            SimEngine("sim-0"), req(prompt=None, messages=messages, max_tokens=5, extra=extra)
        )
        content = _flat(chunks, "content")
        assert [e["token"] for e in content] == [c.text for c in chunks]
        assert all(len(e["top_logprobs"]) == 2 for e in content)
        assert all(e["bytes"] == list(e["token"].encode()) for e in content)

    virtual(main)


@pytest.mark.parametrize(
    ("extra", "chat", "param"),
    [
        ({"logprobs": 21}, False, "logprobs"),
        ({"logprobs": -1}, False, "logprobs"),
        ({"logprobs": 1.5}, False, "logprobs"),
        ({"logprobs": 2}, True, "logprobs"),
        ({"top_logprobs": 1}, True, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": -1}, True, "top_logprobs"),
    ],
)
def test_bad_logprobs_fields_raise_with_param(
    extra: dict[str, Any], chat: bool, param: str
) -> None:
    async def main() -> None:
        kwargs: dict[str, Any] = {"extra": extra}
        if chat:
            kwargs.update(prompt=None, messages=[{"role": "user", "content": "x"}])
        with pytest.raises(InvalidRequestError) as err:
            await collect(SimEngine("sim-0"), req(**kwargs))
        assert err.value.param == param

    virtual(main)


def test_a_request_that_leaves_max_tokens_to_the_engine_gets_its_default() -> None:
    """As engine-sim over HTTP: 16 tokens for a completion, 128 for a chat."""

    async def main() -> None:
        engine = SimEngine("e0", SimEngineConfig(model="llama-3-8b", speed=50.0))
        completion = EngineRequest("c", "llama-3-8b", prompt="Hi", max_tokens=5)
        chat = EngineRequest(
            "h", "llama-3-8b", messages=[{"role": "user", "content": "Hi"}], max_tokens=5
        )
        counts = []
        for req in (completion, chat):
            chunks = [c async for c in engine.generate(req.with_changes(send_max_tokens=False))]
            usage = chunks[-1].usage
            assert usage is not None
            counts.append(usage.completion_tokens)
        await engine.aclose()
        assert counts == [16, 128]

    run_virtual(main())


def test_text_repeats_where_vllms_sampling_does() -> None:
    """Greedy decoding gives a prompt the same text on any engine, a seed the same text for
    the same prompt and seed; other requests differ by request id."""

    async def main() -> None:
        one, two = SimEngine("a", SimEngineConfig(seed=1)), SimEngine("b", SimEngineConfig(seed=2))

        async def text(engine: SimEngine, rid: str, **kwargs: Any) -> str:
            return "".join(c.text for c in await collect(engine, req(rid, **kwargs)))

        greedy = await text(one, "g1", temperature=0.0)
        assert greedy == await text(two, "g2", temperature=0.0)
        assert greedy != await text(one, "g3", temperature=0.0, prompt="another prompt")
        seeded = await text(one, "s1", extra={"seed": 7})
        assert seeded == await text(two, "s2", extra={"seed": 7})
        assert seeded != await text(one, "s3", extra={"seed": 8})
        assert await text(one, "r1") != await text(one, "r2")
        await one.aclose()
        await two.aclose()

    virtual(main)


@pytest.mark.parametrize(
    ("extra", "param", "message"),
    [
        ({"top_k": -2}, "top_k", "top_k must be 0 (disable), or at least 1, got -2."),
        ({"repetition_penalty": 0}, "repetition_penalty", "must be greater than zero"),
        ({"presence_penalty": 3}, "presence_penalty", "must be in [-2, 2], got 3.0"),
        ({"min_p": 1.5}, "min_p", "min_p must be in [0, 1]"),
        ({"ignore_eos": "yes"}, "ignore_eos", "ignore_eos must be a boolean"),
        ({"seed": 1.5}, "seed", "seed must be a 64-bit integer"),
        ({"seed": 2**64}, "seed", "seed must be a 64-bit integer"),
        ({"seed": 1e30}, "seed", "seed must be a 64-bit integer"),
        ({"seed": -float(2**63)}, "seed", "seed must be a 64-bit integer"),  # JSON's -2**63-1
        ({"frequency_penalty": "x"}, "frequency_penalty", "must be a number"),
    ],
)
def test_sampling_parameters_vllm_refuses_are_refused(
    extra: dict[str, Any], param: str, message: str
) -> None:
    async def main() -> None:
        engine = SimEngine("sim-0")
        with pytest.raises(InvalidRequestError) as err:
            await collect(engine, req(extra=extra))
        assert err.value.param == param and message in str(err.value)
        fine = {"top_k": -1, "repetition_penalty": 1.1, "min_p": 0.1, "ignore_eos": True}
        assert len(await collect(engine, req(extra=fine))) == 8
        await engine.aclose()

    virtual(main)


def test_include_stop_str_in_output_keeps_the_stop_string() -> None:
    async def main() -> None:
        engine = SimEngine("sim-0")
        full = "".join(c.text for c in await collect(engine, req("a", max_tokens=30)))
        stop = full.split()[5]
        kept = await collect(
            engine, req("a", max_tokens=30, stop=[stop], extra={"include_stop_str_in_output": True})
        )
        cut = await collect(engine, req("a", max_tokens=30, stop=[stop]))
        text = "".join(c.text for c in kept)
        assert text.endswith(stop) and text == "".join(c.text for c in cut) + stop
        assert kept[-1].finish_reason == "stop"
        await engine.aclose()

    virtual(main)


class _LateClock:
    """Virtual time whose every sleep ends ``late`` seconds after it was due, as a busy
    process's wake-ups (and the engine loop's own work) make real time do."""

    def __init__(self, late: float) -> None:
        from sage_llm.sim.clock import VirtualClock

        self._inner = VirtualClock()
        self.late = late

    def now(self) -> float:
        return self._inner.now()

    def to_datetime(self, t: float) -> Any:
        return self._inner.to_datetime(t)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds) + self.late)


def test_the_loops_own_delay_comes_off_the_next_step() -> None:
    """Back-to-back decode steps last what the cost model says on average, not that plus
    the loop's delay after each sleep (which ``speed`` magnified: a step of 0.8 ms with
    0.5 ms of overhead measured 1.3 ms)."""

    async def itl(late: float) -> float:
        engine = SimEngine("e", SimEngineConfig(), clock=_LateClock(late))
        times = []
        async for _ in engine.generate(req(max_tokens=101, prompt="hi")):
            times.append(now())
        await engine.aclose()
        return (times[-1] - times[1]) / (len(times) - 2)  # decode steps only

    async def main() -> None:
        exact, late = await itl(0.0), await itl(0.002)
        assert exact > 0.005  # an 8B decode step on an H100: about 7.9 ms
        assert late == pytest.approx(exact, rel=0.01)  # was exact + 2 ms

    virtual(main)


def test_a_stop_counts_only_the_tokens_given_in_generation_tokens_total() -> None:
    """The engine steps on while its client reads; tokens made past a stop were counted
    as generated (a request stopped at 7 tokens counted 8)."""

    async def main() -> None:
        engine = SimEngine("e", SimEngineConfig())
        plain = await collect(engine, req("a", prompt="Hi", max_tokens=16, temperature=0.0))
        words = "".join(c.text for c in plain).split()
        stop_word = words[5]
        base = (await engine.stats()).generation_tokens_total
        chunks = await collect(
            engine, req("b", prompt="Hi", max_tokens=16, temperature=0.0, stop=[stop_word])
        )
        usage = chunks[-1].usage
        assert usage is not None and chunks[-1].finish_reason == "stop"
        assert usage.completion_tokens < 16
        after = (await engine.stats()).generation_tokens_total
        assert after - base == usage.completion_tokens
        await engine.aclose()

    virtual(main)


def test_a_max_model_len_given_above_the_kv_cache_is_refused_as_vllm_does() -> None:
    with pytest.raises(ConfigError) as info:
        SimEngine("e", SimEngineConfig(num_gpu_blocks=2, max_model_len=100))
    assert info.value.key == "max_model_len"
    assert "100 is above what the KV cache holds (32 tokens)" in info.value.detail
    # the model's context by default: served as far as the cache holds
    lowered = SimEngine("e", SimEngineConfig(num_gpu_blocks=2))
    assert lowered.config.max_model_len == 32
    # the model's context asked for by name (engine-sim --max-model-len 8192) is refused too
    with pytest.raises(ConfigError, match="8192 is above"):
        SimEngine(
            "e", SimEngineConfig(num_gpu_blocks=2, max_model_len=8192), max_model_len_given=True
        )


@pytest.mark.parametrize("keep", [False, True])
def test_a_stop_string_spanning_tokens_never_reaches_the_output(keep: bool) -> None:
    """As vLLM's detokenizer: the text ends where the stop string begins, though its first
    token came in an earlier chunk (with stop strings the stream holds back the characters
    that could begin one); include_stop_str_in_output keeps the string."""

    async def main() -> None:
        engine = SimEngine("e")
        plain = await collect(engine, req("a", prompt="Hi", max_tokens=12, temperature=0.0))
        full = "".join(c.text for c in plain)
        words = full.split()
        stop = f"{words[3]} {words[4]}"  # two tokens: " w3", " w4"
        extra: dict[str, Any] = {"include_stop_str_in_output": True} if keep else {}
        chunks = await collect(
            engine, req("b", prompt="Hi", max_tokens=12, temperature=0.0, stop=[stop], extra=extra)
        )
        await engine.aclose()
        text = "".join(c.text for c in chunks)
        start = full.index(stop)
        assert text == (full[: start + len(stop)] if keep else full[:start])
        assert chunks[-1].finish_reason == "stop" and chunks[-1].extras == {"stop_reason": stop}
        assert sum(len(c.token_ids) for c in chunks) == 5  # its tokens, the stop's included

    virtual(main)


def test_truncate_prompt_tokens_in_process_as_over_http() -> None:
    """The in-process engine had run the whole prompt while the control plane counted the
    kept tokens (and engine-sim over HTTP cut it): one rule, the prompt's last k."""

    async def main() -> None:
        engine = SimEngine("sim-0")
        try:
            chunks = await collect(engine, req(max_tokens=2, extra={"truncate_prompt_tokens": 5}))
            usage = chunks[-1].usage
            assert usage is not None and usage.prompt_tokens == 5
            long = req("r1", prompt="word " * 9000, max_tokens=2,
                       extra={"truncate_prompt_tokens": 100.0})  # fmt: skip
            usage = (await collect(engine, long))[-1].usage  # beyond the context, cut to 100
            assert usage is not None and usage.prompt_tokens == 100
            chat = req("r2", prompt=None, messages=[{"role": "user", "content": PROMPT}],
                       max_tokens=2, extra={"truncate_prompt_tokens": 3, "echo": True})  # fmt: skip
            usage = (await collect(engine, chat))[-1].usage
            assert usage is not None and usage.prompt_tokens == 3
            for bad in (True, 0, -2, "5"):
                with pytest.raises(InvalidRequestError) as info:
                    await collect(engine, req("r3", extra={"truncate_prompt_tokens": bad}))
                assert info.value.param == "truncate_prompt_tokens"
        finally:
            await engine.aclose()

    virtual(main)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"logit_bias": "x"}, "logit_bias"),
        ({"logit_bias": {"5": "big"}}, "logit_bias"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"\u00b2": 1}}, "logit_bias"),  # a digit to isdigit(), not to int()
        ({"logit_bias": {"999999": 1}}, "logit_bias"),  # beyond Llama-3's 128,256 tokens
        ({"allowed_token_ids": [999999]}, "allowed_token_ids"),
        ({"allowed_token_ids": [-3]}, "allowed_token_ids"),
        ({"allowed_token_ids": []}, "allowed_token_ids"),
        ({"allowed_token_ids": "5"}, "allowed_token_ids"),
        ({"allowed_token_ids": [5, "x"]}, "allowed_token_ids"),
        ({"bad_words": [5]}, "bad_words"),
    ],
)
def test_token_fields_vllm_refuses_are_refused(extra: dict[str, Any], param: str) -> None:
    """They had been answered 200, where vLLM answers 400."""

    async def main() -> None:
        engine = SimEngine("sim-0")
        try:
            with pytest.raises(InvalidRequestError) as info:
                await collect(engine, req(extra=extra))
            assert info.value.param == param
            fine = {"logit_bias": {"5": -100, "+6": 2.5}, "allowed_token_ids": [5, 6.0],
                    "bad_words": ["x"]}  # fmt: skip
            assert await collect(engine, req("ok", extra=fine))
        finally:
            await engine.aclose()

    virtual(main)


# --- a request id used again ------------------------------------------------------------------


def test_an_id_sent_again_while_its_call_is_open_ends_that_call_and_runs_alone() -> None:
    """A caller that ended a request may send its id again before the engine call of the
    first has closed (the control plane frees an id when the request ends): the new
    request gets its own tokens only, and the old call ends with an error."""

    async def main() -> None:
        engine = SimEngine("sim-0")
        old = engine.generate(req("r", max_tokens=100))
        await anext(old)
        await anext(old)  # the old call is open, between two of its tokens
        again = await collect(engine, req("r", max_tokens=2))
        assert sum(len(c.token_ids) for c in again) == 2
        assert again[-1].usage is not None and again[-1].usage.completion_tokens == 2
        with pytest.raises(EngineError, match="'r' was sent again"):
            await anext(old)
        await old.aclose()
        stats = await engine.stats()
        assert (stats.running, stats.waiting) == (0, 0)
        await engine.aclose()

    virtual(main)


def test_a_step_computed_for_an_ended_request_gives_nothing_to_its_ids_next_request() -> None:
    """The tokens of a step that was computed while the first request ran go to no one when
    that request ends before the step does, also when its id is sent again meanwhile."""

    async def main() -> None:
        engine = SimEngine("sim-0")
        old = engine.generate(req("r", max_tokens=100))
        await anext(old)
        await asyncio.sleep(0)  # the engine computes its next step and waits out its time
        await old.aclose()  # ended mid-step: the step's token for it is not delivered
        again = await collect(engine, req("r", max_tokens=2))
        assert sum(len(c.token_ids) for c in again) == 2
        assert [c.finish_reason for c in again] == [None, "length"]
        await engine.aclose()

    virtual(main)


@pytest.mark.parametrize("keep", [False, True])
def test_a_stop_tokens_own_text_is_left_out_unless_include_stop_str_in_output(
    keep: bool,
) -> None:
    """docs/simulator.md: a stop token's own text is left out (its id is not: ``token_ids``
    has it), and ``include_stop_str_in_output`` keeps both in the text."""

    async def main() -> None:
        full = await collect(SimEngine("sim-0"), req("a", max_tokens=30))
        ids = [t for c in full for t in c.token_ids]
        texts = [c.text for c in full]
        assert len(texts) == 30 and ids.index(ids[4]) == 4  # one token a chunk; its first place
        extra: dict[str, Any] = {"stop_token_ids": [ids[4]]}
        if keep:
            extra["include_stop_str_in_output"] = True
        chunks = await collect(SimEngine("sim-0"), req("a", max_tokens=30, extra=extra))
        assert [t for c in chunks for t in c.token_ids] == ids[:5]
        assert "".join(c.text for c in chunks) == "".join(texts[: 5 if keep else 4])
        assert chunks[-1].finish_reason == "stop"

    virtual(main)


def test_a_stop_string_is_looked_for_only_past_min_tokens() -> None:
    """As vLLM's detokenizer: a stop string in token ``k`` does not end the answer with
    ``min_tokens = k`` (looked for only once more than ``min_tokens`` were made), and does
    with ``min_tokens = k - 1``."""

    async def main() -> None:
        full = await collect(SimEngine("sim-0"), req("a", max_tokens=12))
        texts = [c.text for c in full]
        stop = texts[2]  # in token 3
        assert len(texts) == 12 and "".join(texts).count(stop) == 1
        masked = await collect(
            SimEngine("sim-0"), req("a", max_tokens=12, stop=[stop], extra={"min_tokens": 3})
        )
        assert masked[-1].finish_reason == "length"
        assert "".join(c.text for c in masked) == "".join(texts)
        ended = await collect(
            SimEngine("sim-0"), req("a", max_tokens=12, stop=[stop], extra={"min_tokens": 2})
        )
        assert ended[-1].finish_reason == "stop"
        assert "".join(c.text for c in ended) == "".join(texts[:2])

    virtual(main)


@pytest.mark.parametrize("longer_first", [True, False])
def test_of_stop_strings_beginning_at_one_place_the_first_listed_wins(longer_first: bool) -> None:
    async def main() -> None:
        full = await collect(SimEngine("sim-0"), req("a", max_tokens=12))
        texts = [c.text for c in full]
        word = texts[3]
        assert len(word) >= 5 and word[:4] not in "".join(texts[:3])
        stops = [word, word[:4]] if longer_first else [word[:4], word]
        engine = SimEngine("sim-0")
        chunks = await collect(
            engine,
            req("a", max_tokens=12, stop=stops, extra={"include_stop_str_in_output": True}),
        )
        assert "".join(c.text for c in chunks) == "".join(texts[:3]) + stops[0]
        assert chunks[-1].extras == {"stop_reason": stops[0]}
        assert engine.stop_reason("a") == stops[0]
        await engine.aclose()

    virtual(main)


def test_a_prefill_legs_first_token_usage_counts_its_cached_tokens() -> None:
    """The leg's first chunk carries the prefix-cache hits in its usage, as its handle."""

    async def main() -> None:
        engine = SimEngine("p0", SimEngineConfig(role=ExecutionInstanceType.PREFILLING))
        await engine.prefill(req("a"))
        assert engine.release_kv("a")
        handle = await engine.prefill(req("b"))
        first = handle.first_token
        assert first is not None and first.usage is not None
        assert handle.cached_tokens > 0
        assert first.usage.cached_tokens == handle.cached_tokens
        await engine.aclose()

    virtual(main)


def test_the_oldest_finished_request_goes_at_exactly_finished_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(engine_module, "FINISHED_KEPT", 3)

    async def main() -> None:
        engine = SimEngine("sim-0")
        for i in range(3):
            await collect(engine, req(f"r{i}", prompt="hi", max_tokens=1))
        assert all(engine.queue_time_s(f"r{i}") is not None for i in range(3))
        await collect(engine, req("r3", prompt="hi", max_tokens=1))
        assert engine.queue_time_s("r0") is None
        assert all(engine.queue_time_s(f"r{i}") is not None for i in range(1, 4))
        await engine.aclose()

    virtual(main)


class _Releases:
    """A remote KV releaser that notes what it is asked to release."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, str]] = []

    def release(self, host: str, port: int, request_id: str) -> None:
        self.calls.append((host, port, request_id))


@pytest.mark.parametrize(
    ("change", "released"),
    [({}, True), ({"remote_host": ""}, False), ({"remote_host": None}, False),
     ({"remote_port": 0}, False), ({"remote_port": True}, False),
     ({"remote_port": "5601"}, False)],
    ids=["whole", "no-host", "null-host", "port-0", "port-bool", "port-string"],
)  # fmt: skip
def test_a_decode_leg_tells_its_prefill_engine_it_pulled_the_kv_only_at_an_address(
    change: dict[str, Any], released: bool
) -> None:
    """The KV release goes to the prefill engine's ``remote_host``/``remote_port``; with no
    usable address none is sent (the prefill side frees the KV at its pin timeout), and
    the decode leg is served all the same."""

    async def main() -> None:
        prefill = SimEngine("p0", SimEngineConfig(role=ExecutionInstanceType.PREFILLING,
                                                  kv_port=5601))  # fmt: skip
        handle = await prefill.prefill(req("pd-1"))
        params = {**handle.params, **change}
        decode = SimEngine("d0", SimEngineConfig(role=ExecutionInstanceType.DECODING))
        releaser = _Releases()
        decode.remote_releaser = releaser
        chunks = await collect(decode, req("pd-1", kv_transfer_params=params))
        assert chunks[-1].finish_reason == "length"
        want = [(handle.params["remote_host"], 5601, "pd-1")] if released else []
        assert releaser.calls == want
        await prefill.aclose()
        await decode.aclose()

    virtual(main)


def test_return_token_ids_and_continuous_usage_lead_and_follow_the_chunks() -> None:
    """As vLLM answers them: ``return_token_ids`` puts the prompt's ids on the first
    chunk (a completion's among its choice's fields, a chat's among the answer's), and
    ``stream_options.continuous_usage_stats`` the usage so far on every chunk."""
    options = {"return_token_ids": True, "stream_options": {"continuous_usage_stats": True}}

    async def main() -> None:
        engine = SimEngine("sim-0", SimEngineConfig())
        completion = req("c", max_tokens=3, extra=options)
        chunks = await collect(engine, completion)
        over_http = parse_request(  # what engine-sim answers as the prompt's ids
            {"model": "llama-3-8b", "prompt": PROMPT, "return_token_ids": True},
            chat=False, model_name="llama-3-8b",
        )  # fmt: skip
        assert chunks[0].extras == {"prompt_token_ids": prompt_token_ids(over_http.req)}
        assert all(c.extras is None or "prompt_token_ids" not in c.extras for c in chunks[1:])
        produced = [c.top["usage"]["completion_tokens"] for c in chunks if c.top]
        assert len(produced) == len(chunks) and produced[-1] == 3
        assert all(c.top and c.top["usage"]["prompt_tokens"] == len(tokens.tokenize(PROMPT))
                   for c in chunks)  # fmt: skip
        messages = [{"role": "user", "content": "hi"}]
        chat = req("h", prompt=None, messages=messages, max_tokens=2,
                   extra={"return_token_ids": True})  # fmt: skip
        chat_chunks = await collect(engine, chat)
        assert chat_chunks[0].top is not None and chat_chunks[0].top["prompt_token_ids"]
        assert chat_chunks[0].extras is None and chat_chunks[-1].top is None
        plain = await collect(engine, req("p", max_tokens=2))
        assert all(c.top is None and not (c.extras or {}).get("prompt_token_ids") for c in plain)

    virtual(main)


def test_n_samples_run_as_requests_of_their_own_and_end_with_the_usage_of_all() -> None:
    """vLLM's parallel sampling: ``n`` samples, each a sequence of its own (its own text,
    a request ``seed`` made ``seed + i``; greedy ones alike), their chunks merged with
    each one's ``index``; the last chunk of all carries the usage (the prompt counted once,
    the samples' tokens summed), no other does."""

    async def main() -> None:
        engine = SimEngine("sim-0", SimEngineConfig())
        chunks = await collect(engine, req("many", max_tokens=4, extra={"n": 3}))
        texts: dict[int, str] = {}
        for c in chunks:
            texts[c.index] = texts.get(c.index, "") + c.text
        assert sorted(texts) == [0, 1, 2] and len(set(texts.values())) == 3
        assert all(len(tokens.tokenize(t)) == 4 for t in texts.values())
        assert all(c.usage is None for c in chunks[:-1])
        assert sum(1 for c in chunks if c.finish_reason == "length") == 3
        last = chunks[-1].usage
        assert last is not None and last.completion_tokens == 12
        assert last.prompt_tokens == len(tokens.tokenize(PROMPT))
        greedy = await collect(engine, req("g", max_tokens=3, temperature=0.0, extra={"n": 2}))
        by_index = {i: "".join(c.text for c in greedy if c.index == i) for i in (0, 1)}
        assert by_index[0] == by_index[1]
        seeded = await collect(engine, req("s", max_tokens=3, extra={"n": 2, "seed": 7}))
        second = "".join(c.text for c in seeded if c.index == 1)
        alone = await collect(engine, req("a", max_tokens=3, extra={"seed": 8}))
        assert second == "".join(c.text for c in alone)  # sample 1 drew with seed 7 + 1
        assert (await engine.stats()).running == 0 and engine.core.kv_usage == 0.0

    virtual(main)


def test_closing_n_samples_aborts_every_one_and_a_failure_fails_them_all() -> None:
    async def main() -> None:
        engine = SimEngine("sim-0", SimEngineConfig())
        gen = engine.generate(req("many", max_tokens=100, extra={"n": 4}))
        got = [await anext(gen) for _ in range(6)]
        assert {c.index for c in got} == {0, 1, 2, 3}
        assert engine.core.kv_usage > 0
        await gen.aclose()
        assert engine.core.kv_usage == 0.0 and (await engine.stats()).running == 0
        gen = engine.generate(req("again", max_tokens=100, extra={"n": 2}))
        await anext(gen)
        await engine.aclose()  # every sample fails: the request fails, once
        with pytest.raises(EngineConnectionError) as err:
            async for _ in gen:
                pass
        assert not err.value.retryable  # (a chunk had gone out)

    virtual(main)


def test_n_samples_with_the_usage_so_far_count_every_samples_tokens() -> None:
    options = {"n": 2, "stream_options": {"continuous_usage_stats": True}}

    async def main() -> None:
        engine = SimEngine("sim-0", SimEngineConfig())
        chunks = await collect(engine, req("c", max_tokens=3, extra=options))
        so_far = [c.top["usage"]["completion_tokens"] for c in chunks if c.top]
        assert len(so_far) == len(chunks) and so_far == sorted(so_far) and so_far[-1] == 6

    virtual(main)


def test_a_pd_decode_leg_serves_one_sample() -> None:
    async def main() -> None:
        engine = SimEngine("d0", SimEngineConfig(role=ExecutionInstanceType.DECODING))
        leg = req("leg", extra={"n": 2}, kv_transfer_params={"do_remote_prefill": True})
        with pytest.raises(InvalidRequestError, match="decode leg takes one sample") as err:
            await collect(engine, leg)
        assert err.value.param == "n"

    virtual(main)


def test_a_chat_of_n_samples_says_its_prompts_ids_once() -> None:
    """A chat answer's ``prompt_token_ids`` are the answer's, not a choice's: sample 0's
    first chunk carries them, as engine-sim's stream gives them once."""

    async def main() -> None:
        engine = SimEngine("sim-0", SimEngineConfig())
        messages = [{"role": "user", "content": "hi"}]
        chat = req("h", prompt=None, messages=messages, max_tokens=2,
                   extra={"n": 3, "return_token_ids": True})  # fmt: skip
        chunks = await collect(engine, chat)
        said = [c.index for c in chunks if c.top and "prompt_token_ids" in c.top]
        assert said == [0]

    virtual(main)
