"""The synchronous simulated engine core, driven with explicit ``now`` values."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest

from sage_llm.errors import ConfigError, ConflictError, InvalidRequestError
from sage_llm.sim import core as core_module
from sage_llm.sim.core import BlockPool, SimEngineConfig, SimEngineCore, StepResult
from sage_llm.sim.costmodel import LinearStepModel
from sage_llm.sim.specs import resolve_model


@dataclass
class Trace:
    """Everything a driven core did, step by step."""

    steps: list[StepResult] = field(default_factory=list)
    starts: list[float] = field(default_factory=list)
    first_token_at: dict[str, float] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    finished: dict[str, str] = field(default_factory=dict)
    end: float = 0.0


def drive(core: SimEngineCore, now: float = 0.0, max_steps: int = 100_000) -> Trace:
    """Step ``core`` until it has no work, advancing time by each step's duration."""
    trace = Trace()
    for _ in range(max_steps):
        if not core.has_work():
            break
        res = core.step(now)
        trace.steps.append(res)
        trace.starts.append(now)
        now += res.duration_s
        for rid, n in res.new_tokens:
            trace.tokens[rid] = trace.tokens.get(rid, 0) + n
            trace.first_token_at.setdefault(rid, now)
        trace.finished.update(res.finished)
    else:  # pragma: no cover - a hang is a bug
        raise AssertionError("core did not finish")
    trace.end = now
    return trace


def prompt(n: int, start: int = 1000) -> list[int]:
    return list(range(start, start + n))


def make_core(**kwargs: object) -> SimEngineCore:
    return SimEngineCore(SimEngineConfig(**kwargs))  # type: ignore[arg-type]


def test_single_request_produces_max_tokens() -> None:
    core = make_core()
    core.add_request("a", prompt(100), 5, arrival=0.0)
    trace = drive(core)
    assert trace.tokens == {"a": 5}
    assert trace.finished == {"a": "length"}
    assert len(trace.steps) == 5  # one prefill step (with the first token), four decodes
    assert trace.steps[0].num_prefill_tokens == 100
    assert trace.first_token_at["a"] == trace.steps[0].duration_s
    stats = core.stats()
    assert (stats.prompt_tokens_total, stats.generation_tokens_total) == (100, 5)
    assert stats.kv_usage == 0.0
    assert stats.source == "sim"


def test_continuous_batching_decodes_requests_together() -> None:
    core = make_core()
    for i in range(4):
        core.add_request(f"r{i}", prompt(50, 100 * i), 10, arrival=0.0)
    trace = drive(core)
    assert trace.tokens == {f"r{i}": 10 for i in range(4)}
    assert trace.steps[0].num_prefill_tokens == 200
    assert all(step.num_decode_tokens == 4 for step in trace.steps[1:])
    assert len(trace.steps) == 10


def test_late_arrival_joins_the_running_batch() -> None:
    core = make_core()
    core.add_request("early", prompt(64), 20, arrival=0.0)
    now = 0.0
    for _ in range(3):
        now += core.step(now).duration_s
    core.add_request("late", prompt(64, 5000), 3, arrival=now)
    res = core.step(now)
    assert dict(res.new_tokens) == {"early": 1, "late": 1}
    assert res.num_prefill_tokens == 64
    assert res.num_decode_tokens == 1


def test_chunked_prefill_splits_a_long_prompt() -> None:
    core = make_core(max_num_batched_tokens=2048)
    core.add_request("long", prompt(10_000), 2, arrival=0.0)
    trace = drive(core)
    chunks = [s.num_prefill_tokens for s in trace.steps]
    assert chunks == [2048, 2048, 2048, 2048, 1808, 0]
    assert [dict(s.new_tokens) for s in trace.steps[:4]] == [{}, {}, {}, {}]
    assert trace.tokens == {"long": 2}


def test_decodes_are_scheduled_before_new_prefill_chunks() -> None:
    core = make_core(max_num_batched_tokens=512)
    core.add_request("short", prompt(16), 50, arrival=0.0)
    now = core.step(0.0).duration_s
    core.add_request("long", prompt(4000, 9000), 1, arrival=now)
    res = core.step(now)
    assert res.num_decode_tokens == 1
    assert res.num_prefill_tokens == 511  # the budget left after the decode


def test_chunked_prefill_disabled_needs_a_budget_of_the_whole_context() -> None:
    """As vLLM: without chunked prefill a step must hold a whole prompt, so a token budget
    below max_model_len is refused at the start (it would refuse prompts the context
    takes); prompts are prefilled whole, one beside another only when both fit."""
    with pytest.raises(ConfigError, match="smaller than max_model_len") as config_err:
        make_core(max_num_batched_tokens=256, enable_chunked_prefill=False)
    assert config_err.value.key == "max_num_batched_tokens"
    core = make_core(max_num_batched_tokens=256, enable_chunked_prefill=False, max_model_len=256)
    with pytest.raises(InvalidRequestError) as err:
        core.add_request("a", prompt(300), 4, arrival=0.0)
    assert err.value.param in ("prompt", "max_tokens")
    core.add_request("b", prompt(200), 4, arrival=0.0)
    core.add_request("c", prompt(200, 5000), 4, arrival=0.0)
    trace = drive(core)
    assert trace.steps[0].num_prefill_tokens == 200  # "c" does not fit beside "b"
    assert trace.tokens == {"b": 4, "c": 4}


def test_max_num_seqs_is_respected() -> None:
    core = make_core(max_num_seqs=3)
    for i in range(10):
        core.add_request(f"r{i}", prompt(40, 100 * i), 6, arrival=0.0)
    peak = 0
    now = 0.0
    while core.has_work():
        res = core.step(now)
        now += res.duration_s
        peak = max(peak, core.num_running)
        assert len(res.new_tokens) <= 3
    assert peak == 3
    assert core.stats().generation_tokens_total == 60


def test_full_kv_cache_preempts_and_everything_finishes() -> None:
    core = make_core(num_gpu_blocks=40, enable_prefix_caching=False)
    for i in range(6):
        core.add_request(f"r{i}", prompt(100, 1000 * i), 100, arrival=0.0)
    trace = drive(core)
    assert trace.tokens == {f"r{i}": 100 for i in range(6)}
    assert set(trace.finished.values()) == {"length"}
    stats = core.stats()
    assert stats.preemptions_total > 0
    assert stats.prompt_tokens_total == 600  # recomputation is not counted twice
    assert stats.kv_usage == 0.0
    preempted = [rid for step in trace.steps for rid in step.preempted]
    # r0..r4 fill 35 of 40 blocks (r5 waits); the most recently admitted goes first.
    assert preempted[0] == "r4"


def test_requests_larger_than_the_cache_are_rejected() -> None:
    core = make_core(num_gpu_blocks=10)
    with pytest.raises(InvalidRequestError) as err:
        core.add_request("a", prompt(150), 20, arrival=0.0)
    assert err.value.param == "max_tokens"


def test_a_request_that_exactly_fills_the_cache_is_served_and_one_token_more_refused() -> None:
    core = make_core(num_gpu_blocks=4, block_size=16)
    core.add_request("fits", prompt(60), 4, arrival=0.0)  # 64 tokens: all 4 blocks of 16
    trace = drive(core)
    assert trace.tokens == {"fits": 4}
    assert trace.finished == {"fits": "length"}
    with pytest.raises(InvalidRequestError, match="exceed the KV cache") as err:
        core.add_request("over", prompt(60), 5, arrival=trace.end)  # 65 tokens: a 5th block
    assert err.value.param == "max_tokens"


def test_prefix_cache_hit_lowers_ttft_by_the_cached_fraction() -> None:
    core = make_core()
    shared = prompt(2048)
    core.add_request("cold", shared + prompt(2048, 50_000), 2, arrival=0.0)
    cold = drive(core)
    core.add_request("warm", shared + prompt(2048, 90_000), 2, arrival=cold.end)
    warm = drive(core, cold.end)
    assert warm.steps[0].admitted == [("warm", 2048)]
    assert warm.steps[0].num_cached_tokens == 2048
    assert warm.steps[0].num_prefill_tokens == 2048
    ttft_cold = cold.first_token_at["cold"]
    ttft_warm = warm.first_token_at["warm"] - cold.end
    assert 1 - ttft_warm / ttft_cold == pytest.approx(0.5, abs=0.1)
    stats = core.stats()
    assert (stats.prefix_cache_queries_total, stats.prefix_cache_hits_total) == (8192, 2048)


def test_identical_prompt_recomputes_only_the_last_token_block() -> None:
    core = make_core()
    core.add_request("a", prompt(100), 1, arrival=0.0)
    first = drive(core)
    core.add_request("b", prompt(100), 1, arrival=first.end)
    second = drive(core, first.end)
    # 96 tokens (6 full blocks) hit; vLLM always computes at least the last token.
    assert second.steps[0].admitted == [("b", 96)]
    assert second.steps[0].num_prefill_tokens == 4


def test_prefix_caching_disabled_never_hits() -> None:
    core = make_core(enable_prefix_caching=False)
    for i in range(2):
        core.add_request(f"r{i}", prompt(64), 1, arrival=float(i))
        drive(core, float(i))
    assert core.stats().prefix_cache_hits_total == 0


def test_lru_eviction_keeps_recent_prefixes() -> None:
    core = make_core(num_gpu_blocks=16)
    now = 0.0
    # Each 64-token prompt fills 4 blocks; a..d use all 16, then e must evict.
    for name, start in [("a", 0), ("b", 10_000), ("c", 20_000), ("d", 30_000)]:
        core.add_request(name, prompt(64, start), 1, arrival=now)
        now = drive(core, now).end
    core.add_request("e", prompt(64, 40_000), 1, arrival=now)
    now = drive(core, now).end
    results: dict[str, int] = {}
    for name, start in [("a2", 0), ("d2", 30_000), ("c2", 20_000)]:
        core.add_request(name, prompt(64, start), 1, arrival=now)
        trace = drive(core, now)
        now = trace.end
        results.update(trace.steps[0].admitted)
    # "a" was the least recently used and is gone; "d" and "c" still hit (3 full blocks:
    # the last block holds the token vLLM always recomputes).
    assert results == {"a2": 0, "d2": 48, "c2": 48}


def test_block_pool_lru_order() -> None:
    pool = BlockPool(4)
    first = pool.allocate(2)
    pool.cache(first[0], 111)
    pool.cache(first[1], 222)
    pool.free(first)  # tail block first: 222 is older in the LRU than 111
    second = pool.allocate(2)
    assert second == [2, 3]  # never-used blocks go before cached ones
    evicted = pool.allocate(1)
    assert evicted == [first[1]]
    assert pool.match([111]) == [first[0]]
    assert pool.match([222]) == []
    assert pool.evictions == 1
    pool.touch([first[0]])
    assert pool.num_free == 0
    assert not pool.can_allocate(1)


def test_abort_frees_kv_and_forgets_the_request() -> None:
    core = make_core(max_num_batched_tokens=64)
    core.add_request("a", prompt(500), 10, arrival=0.0)
    core.add_request("b", prompt(10, 9000), 10, arrival=0.0)
    core.step(0.0)
    assert core.kv_usage > 0
    assert core.abort("a")
    assert core.abort("b")
    assert not core.abort("a")
    assert core.kv_usage == 0.0
    assert not core.has_work()


def test_duplicate_and_invalid_requests() -> None:
    core = make_core()
    core.add_request("a", prompt(10), 1, arrival=0.0)
    with pytest.raises(ConflictError):
        core.add_request("a", prompt(10), 1, arrival=0.0)
    with pytest.raises(InvalidRequestError):
        core.add_request("b", [], 1, arrival=0.0)
    with pytest.raises(InvalidRequestError):
        core.add_request("c", prompt(10), 0, arrival=0.0)


def test_config_validation() -> None:
    with pytest.raises(ConfigError) as err:
        SimEngineConfig(max_num_seqs=0)
    assert err.value.key == "max_num_seqs"
    with pytest.raises(ConfigError):
        SimEngineConfig(gpu_memory_utilization=1.5)
    with pytest.raises(ConfigError) as model_err:
        make_core(model="llama-3-70b", gpu="l40s")
    assert model_err.value.key == "model"
    # not finite, or of the wrong type: an infinite jitter had made every step endless,
    # a NaN one had turned it off
    bad: list[tuple[str, object]] = [
        ("step_jitter", math.inf), ("step_jitter", math.nan), ("speed", math.inf),
        ("kv_link_gbps", math.nan), ("max_num_seqs", 2.5), ("max_num_seqs", True),
        ("seed", 1.5), ("kv_port", 70000), ("enable_prefix_caching", "yes"),
        ("cost_model", "x"),  # (an AttributeError on the first request had said so)
        ("num_gpu_blocks", 0), ("role", "prefill"),
    ]  # fmt: skip
    compiled = not str(core_module.__file__).endswith(".py")  # (the accelerator built)
    for key, value in bad:
        if compiled and isinstance(value, bool):
            continue  # compiled, an int field stores True as the int 1 before our check
        # compiled, a field's wrong type is mypyc's TypeError before any check of ours
        wrong_type = isinstance(value, str | float) and key in ("max_num_seqs", "seed",
                                                               "enable_prefix_caching",
                                                               "cost_model", "role")  # fmt: skip
        expected = (ConfigError, TypeError) if compiled and wrong_type else ConfigError
        with pytest.raises(expected) as refused:
            SimEngineConfig(**{key: value})  # type: ignore[arg-type]
        if isinstance(refused.value, ConfigError):
            assert refused.value.key == key, (key, value)


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("llama-3-8b", 8192),  # max_position_embeddings, as vLLM defaults max_model_len
        ("llama-3.1-8b", 131072),
        ("llama-2-7b", 4096),
        ("tiny", 32768),  # no context stated: DEFAULT_MAX_MODEL_LEN
        ("no-such-model", 32768),  # refused where the model is first needed
    ],
)
def test_max_model_len_defaults_to_the_models_context(model: str, expected: int) -> None:
    assert SimEngineConfig(model=model).max_model_len == expected
    assert SimEngineConfig(model=model, max_model_len=1000).max_model_len == 1000
    with pytest.raises(ConfigError) as err:
        SimEngineConfig(model=model, max_model_len=-1)
    assert err.value.key == "max_model_len"
    assert SimEngineConfig(model=model, tp=2).tp == 2  # an unknown model: refused later, too


def test_max_model_len_above_the_models_context_is_refused_as_vllm_does() -> None:
    with pytest.raises(ConfigError, match=r"100000 is above the model's context window \(8192"):
        SimEngineConfig(model="llama-3-8b", max_model_len=100_000)
    assert SimEngineConfig(model="llama-3.1-8b", max_model_len=100_000).max_model_len == 100_000
    assert SimEngineConfig(model="tiny", max_model_len=100_000).max_model_len == 100_000


@pytest.mark.parametrize(
    ("model", "tp", "match"),
    [
        ("llama-3-8b", 3, "32 attention heads"),
        ("llama-3-8b", 64, "32 attention heads"),
        ("qwen2.5-7b", 8, "28 attention heads"),
        ("qwen2.5-7b", 7, "4 KV heads"),  # 28 heads split 7 ways, but 4 KV heads do not
    ],
)
def test_a_tensor_parallel_size_vllm_refuses_is_a_config_error(
    model: str, tp: int, match: str
) -> None:
    with pytest.raises(ConfigError, match=match) as err:
        SimEngineConfig(model=model, tp=tp)
    assert err.value.key == "tp"
    assert "\n" not in str(err.value)
    spec = resolve_model(model)
    with pytest.raises(ConfigError, match=match):
        SimEngineConfig(model=spec, tp=tp)


@pytest.mark.parametrize(
    ("model", "tp"),
    [("llama-3-8b", 1), ("llama-3-8b", 2), ("llama-3-8b", 16), ("llama-3-8b", 32),
     ("qwen2.5-7b", 4), ("tiny", 2)],
)  # fmt: skip
def test_tensor_parallel_sizes_vllm_accepts_are_accepted(model: str, tp: int) -> None:
    assert SimEngineConfig(model=model, tp=tp).tp == tp


def run_trace(**kwargs: object) -> list[tuple[float, list[tuple[str, int]]]]:
    core = make_core(**kwargs)
    for i in range(8):
        core.add_request(f"r{i}", prompt(30 + 40 * i, 100 * i), 5 + i, arrival=0.0)
    trace = drive(core)
    return [(s.duration_s, s.new_tokens) for s in trace.steps]


def test_same_seed_gives_the_same_step_sequence() -> None:
    a = run_trace(step_jitter=0.1, seed=3)
    b = run_trace(step_jitter=0.1, seed=3)
    c = run_trace(step_jitter=0.1, seed=4)
    assert a == b
    assert [d for d, _ in a] != [d for d, _ in c]
    assert [t for _, t in a] == [t for _, t in c]  # noise changes time, not the schedule


def test_speed_and_cost_model_scale_durations() -> None:
    base = run_trace()
    fast = run_trace(speed=2.0)
    assert [d / 2 for d, _ in base] == pytest.approx([d for d, _ in fast])
    linear = run_trace(cost_model=LinearStepModel.llama31_8b_h100())
    assert linear[1][0] == pytest.approx((5752.7 + 6.0 * 8) * 1e-6)


def test_prefill_leg_pins_kv_until_released() -> None:
    core = make_core()
    core.add_request("p", prompt(100), 50, arrival=0.0, kv_transfer={"do_remote_decode": True})
    trace = drive(core)
    assert trace.tokens == {"p": 1}  # a prefill leg produces exactly one token
    (pinned,) = trace.steps[0].kv_pinned
    assert pinned.request_id == "p"
    assert pinned.num_tokens == 100
    assert len(pinned.block_ids) == math.ceil(101 / 16)
    assert core.kv_usage > 0
    assert core.num_pinned == 1
    assert core.release_kv("p")
    assert (core.kv_usage, core.num_pinned) == (0.0, 0)
    assert not core.release_kv("p")


def test_pinned_kv_expires_after_the_timeout() -> None:
    core = make_core(kv_pin_timeout_s=30.0, num_gpu_blocks=10)
    core.add_request("p", prompt(100), 1, arrival=0.0, kv_transfer={"do_remote_decode": True})
    trace = drive(core)
    # A request that needs the pinned blocks waits (idle steps) until they expire.
    core.add_request("q", prompt(120, 7000), 2, arrival=trace.end)
    waited = drive(core, trace.end)
    assert waited.steps[0].idle
    assert waited.starts[1] == pytest.approx(trace.end + 30.0)
    assert waited.tokens == {"q": 2}


def test_pinned_kv_alone_leaves_the_core_idle_without_waiting_for_its_expiry() -> None:
    """Only a queued request waits on a pin's expiry: with none, an idle step takes no time."""
    core = make_core(kv_pin_timeout_s=30.0)
    core.add_request("p", prompt(100), 8, arrival=0.0, kv_transfer={"do_remote_decode": True})
    trace = drive(core)
    assert not core.has_work() and core.kv_usage > 0
    res = core.step(trace.end)
    assert res.idle
    assert res.duration_s == 0.0


def test_decode_leg_waits_for_the_kv_transfer() -> None:
    core = make_core(kv_link_gbps=25.0)
    params = {"do_remote_prefill": True, "remote_engine_id": "p0", "remote_request_id": "x"}
    core.add_request("x", prompt(4001), 3, arrival=0.0, kv_transfer=params)
    trace = drive(core)
    transfer = 4000 * 128 * 1024 / 25e9
    assert trace.steps[0].idle
    assert trace.steps[0].duration_s == pytest.approx(transfer)
    assert not trace.steps[0].has_pulls()
    assert trace.steps[1].has_pulls()
    assert trace.steps[1].kv_pulled == [("p0", "x")]
    assert trace.steps[1].num_prefill_tokens == 0  # only the last prompt token, as a decode
    decode_step = core.cost_model.step_time([], [4000])
    assert trace.first_token_at["x"] == pytest.approx(transfer + decode_step)
    assert trace.tokens == {"x": 3}
    assert core.kv_usage == 0.0


def test_decode_leg_kv_is_cached_locally_once_pulled() -> None:
    core = make_core()
    params = {"do_remote_prefill": True, "remote_engine_id": "p0", "remote_request_id": "x"}
    core.add_request("x", prompt(1001), 2, arrival=0.0, kv_transfer=params)
    first = drive(core)
    core.add_request("y", prompt(1001), 2, arrival=first.end, kv_transfer=params)
    second = drive(core, first.end)
    # 992 of the 1000 pulled tokens are now local full blocks: only 8 cross the link.
    assert second.steps[1].admitted == [("y", 992)]
    assert second.steps[0].duration_s == pytest.approx(core.transfer_time_s(8))


def test_preempted_decode_leg_recomputes_instead_of_pulling_again() -> None:
    core = make_core(num_gpu_blocks=20, enable_prefix_caching=False)
    core.add_request("a", prompt(100), 150, arrival=0.0)
    params = {"do_remote_prefill": True, "remote_engine_id": "p0", "remote_request_id": "x"}
    core.add_request("x", prompt(100, 5000), 150, arrival=0.0, kv_transfer=params)
    trace = drive(core)
    assert trace.tokens == {"a": 150, "x": 150}
    assert "x" in [rid for step in trace.steps for rid in step.preempted]
    assert [pulled for step in trace.steps for pulled in step.kv_pulled] == [("p0", "x")]


def test_both_pd_legs_on_one_engine_reuse_the_local_kv() -> None:
    core = make_core()
    core.add_request("x", prompt(1001), 1, arrival=0.0, kv_transfer={"do_remote_decode": True})
    first = drive(core)
    params = {"do_remote_prefill": True, "remote_engine_id": "self", "remote_request_id": "x"}
    core.add_request("x", prompt(1001), 3, arrival=first.end, kv_transfer=params)
    second = drive(core, first.end)
    assert second.tokens == {"x": 3}
    assert second.steps[1].admitted == [("x", 992)]  # the pinned blocks became cache hits
    assert core.kv_usage == 0.0


def test_speed_scales_the_kv_transfer_as_the_steps() -> None:
    """``speed`` is the engine's time scale: a run at speed K, its times multiplied by K, is
    the run at speed 1 (the transfer had run at speed 1 whatever K)."""
    slow, fast = make_core(), make_core(speed=4.0)
    assert fast.transfer_time_s(10_000) == pytest.approx(slow.transfer_time_s(10_000) / 4)
    assert slow.transfer_time_s(10_000) == pytest.approx(10_000 * 131072 / 50e9)


def test_without_chunked_prefill_a_prompt_one_token_over_the_budget_left_waits() -> None:
    """Two decodes leave 98 of 100 tokens: a 99-token prompt waits for them to end, then
    is prefilled whole (never cut to the budget left)."""
    core = make_core(enable_chunked_prefill=False, max_num_batched_tokens=100, max_model_len=100)
    core.add_request("a1", prompt(10), 20, arrival=0.0)
    core.add_request("a2", prompt(10, 5000), 20, arrival=0.0)
    now = core.step(0.0).duration_s  # both prefilled: they decode from now on
    core.add_request("b", prompt(99, 9000), 1, arrival=now)
    trace = drive(core, now)
    chunks = [(s.num_prefill_tokens, s.num_decode_tokens) for s in trace.steps]
    assert [c for c in chunks if c[0]] == [(99, 0)]
    assert trace.tokens == {"a1": 19, "a2": 19, "b": 1}


def test_an_abort_after_one_token_given_keeps_the_prompt_counted() -> None:
    """vLLM counts a prompt with the first token it hands out: an abort that gave one token
    leaves ``prompt_tokens_total`` as it was (one that gave none takes the prompt out)."""
    for delivered, prompt_total in ((1, 100.0), (0, 0.0)):
        core = make_core()
        core.add_request("r", prompt(100), 10, arrival=0.0)
        now = 0.0
        for _ in range(3):
            now += core.step(now).duration_s
        assert core.stats().prompt_tokens_total == 100.0
        assert core.abort("r", delivered=delivered)
        stats = core.stats()
        assert (stats.prompt_tokens_total, stats.generation_tokens_total) == (
            prompt_total,
            float(delivered),
        )
