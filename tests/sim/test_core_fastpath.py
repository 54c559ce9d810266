"""The engine core's decode fast path against the per-step reference core.

:class:`~tests.sim.reference_core.ReferenceCore` is the core as it was before lazy decodes
(every running request walked every step). Both are driven with the same random mixed
workloads — chunked prefills, prefix hits, preemption under a small KV cache, a tight
token budget, aborts, PD legs, step jitter, several cost models — and every step must
give the same result.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import pytest

from sage_llm.sim.core import (
    STEP_FIELDS,
    SimEngineConfig,
    SimEngineCore,
    StepResult,
    fast_step_time,
)
from sage_llm.sim.costmodel import CostModel, LinearStepModel, PrefillChunk, RooflineCostModel
from sage_llm.tokens import block_hashes
from tests.sim.reference_core import ReferenceCore


class OrderSensitiveCost:
    """A cost model that reads every decode context in batch order (not just the sum)."""

    name = "order-sensitive"

    def step_time(
        self, prefill_tokens: Sequence[PrefillChunk], decode_contexts: Sequence[int]
    ) -> float:
        weighted = sum((i + 1) * c for i, c in enumerate(decode_contexts))
        chunks = sum(n * (ctx + 1) for n, ctx in prefill_tokens)
        return 1e-3 + 1e-9 * weighted + 1e-8 * chunks

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}


def _config(rng: random.Random, cost: str) -> SimEngineConfig:
    cost_model: CostModel | None = None
    if cost == "linear":
        cost_model = LinearStepModel.llama31_8b_h100()
    elif cost == "ordered":
        cost_model = OrderSensitiveCost()
    return SimEngineConfig(
        block_size=rng.choice([4, 16]),
        num_gpu_blocks=rng.choice([48, 96, 400]),
        max_num_batched_tokens=rng.choice([48, 128, 512, 8192]),
        max_num_seqs=rng.choice([3, 8, 256]),
        enable_prefix_caching=rng.random() < 0.8,
        enable_chunked_prefill=rng.random() < 0.85,
        step_jitter=rng.choice([0.0, 0.1]),
        seed=rng.randrange(100),
        cost_model=cost_model,
        kv_pin_timeout_s=rng.choice([0.05, 1.0]),
    )


def _workload(rng: random.Random, config: SimEngineConfig, n: int) -> list[dict[str, Any]]:
    bs = config.block_size
    assert config.num_gpu_blocks is not None
    cap_tokens = config.num_gpu_blocks * bs
    pool = [rng.randrange(256, 32_000) for _ in range(4096)]
    prefixes = [pool[i * 300 : i * 300 + rng.randrange(0, 200)] for i in range(4)]
    out: list[dict[str, Any]] = []
    t = 0.0
    for i in range(n):
        t += rng.expovariate(40.0) if rng.random() < 0.8 else 0.0
        max_tokens = rng.choice([1, 2, 5, 17, 33, 60])
        room = min(cap_tokens // 2, 300) - max_tokens
        if not config.enable_chunked_prefill:
            room = min(room, config.max_num_batched_tokens - max_tokens)
        length = rng.randrange(1, max(2, room))
        start = rng.randrange(0, 3000)
        prompt = (rng.choice(prefixes) + pool[start : start + length])[: max(1, room)]
        kv: dict[str, Any] | None = None
        roll = rng.random()
        if roll < 0.08:
            kv = {"do_remote_decode": True}
        elif roll < 0.16:
            kv = {"do_remote_prefill": True, "remote_engine_id": "p0", "remote_request_id": f"x{i}"}
        out.append({"id": f"r{i}", "prompt": prompt, "max_tokens": max_tokens, "at": t, "kv": kv})
    return out


def _pool_state(core: SimEngineCore | ReferenceCore) -> tuple[object, ...]:
    pool = core._pool
    return (list(pool._free), pool._fresh, pool._ref, pool._hash_of, pool._by_hash, pool.evictions)


def _fields(res: StepResult) -> dict[str, Any]:
    out = {name: getattr(res, name) for name in STEP_FIELDS}
    del out["num_new_tokens"], out["first_tokens"]
    return out


def _run_both(seed: int, cost: str, *, list_tokens: bool) -> int:
    """Drive both cores through one random scenario; returns the steps compared."""
    rng = random.Random(seed)
    config = _config(rng, cost)
    fast, ref = SimEngineCore(config), ReferenceCore(config)
    pending = _workload(rng, config, 60)
    now = 0.0
    steps = 0
    seen_first: set[str] = set()
    while pending or fast.has_work() or ref.has_work():
        while pending and pending[0]["at"] <= now:
            r = pending.pop(0)
            for core in (fast, ref):
                core.add_request(
                    r["id"], r["prompt"], r["max_tokens"], arrival=now, kv_transfer=r["kv"]
                )
        if rng.random() < 0.03:  # abort something, wherever it is
            victim = f"r{rng.randrange(60)}"
            assert fast.abort(victim) == ref.abort(victim)
        if not ref.has_work():
            assert not fast.has_work()
            if pending:
                now = max(now, pending[0]["at"])
            continue
        expected = ref.step(now)
        got = fast.step(now, list_tokens=list_tokens)
        steps += 1
        want = _fields(expected)
        if list_tokens:
            assert _fields(got) == want, f"step {steps}"
        else:
            assert got.new_tokens == []
            assert _fields(got) == {**want, "new_tokens": []}, f"step {steps}"
        assert got.num_new_tokens == len(expected.new_tokens)
        firsts = [rid for rid, _ in expected.new_tokens if rid not in seen_first]
        assert got.first_tokens == firsts
        seen_first.update(rid for rid, _ in expected.new_tokens)
        assert fast.stats() == ref.stats()
        assert _pool_state(fast) == _pool_state(ref)
        assert (fast.num_running, fast.num_waiting) == (ref.num_running, ref.num_waiting)
        if expected.idle and expected.duration_s <= 0.0:
            now = pending[0]["at"] if pending else now
        else:
            now += expected.duration_s
        for rid, _ in expected.finished:
            if rng.random() < 0.5:  # the decode side pulls a finished prefill leg's KV
                assert fast.release_kv(rid) == ref.release_kv(rid)
    assert fast.stats() == ref.stats()
    return steps


@pytest.mark.parametrize("cost", ["roofline", "linear", "ordered"])
@pytest.mark.parametrize("list_tokens", [True, False])
def test_fast_path_matches_the_per_step_reference(cost: str, list_tokens: bool) -> None:
    total = sum(_run_both(seed, cost, list_tokens=list_tokens) for seed in range(8))
    assert total > 500  # the scenarios did run


def test_long_decodes_under_preemption_match_the_reference() -> None:
    config = SimEngineConfig(num_gpu_blocks=40, enable_prefix_caching=False, block_size=16)
    fast, ref = SimEngineCore(config), ReferenceCore(config)
    for core in (fast, ref):
        for i in range(6):
            core.add_request(f"r{i}", list(range(1000 * i, 1000 * i + 100)), 100, arrival=0.0)
    now = 0.0
    preempted = 0
    while ref.has_work():
        expected, got = ref.step(now), fast.step(now)
        assert _fields(got) == _fields(expected)
        preempted += len(expected.preempted)
        now += expected.duration_s
    assert preempted > 0 and not fast.has_work()
    assert fast.stats() == ref.stats()


def test_precomputed_block_hashes_are_used_as_given() -> None:
    ids = list(range(500, 600))
    core = SimEngineCore(SimEngineConfig())
    core.add_request("a", ids, 2, arrival=0.0, block_hashes=block_hashes(ids, 16))
    now = 0.0
    while core.has_work():
        now += core.step(now).duration_s
    core.add_request("b", ids, 1, arrival=now)
    assert core.step(now).admitted == [("b", 96)]


@pytest.mark.parametrize(
    "model",
    [
        RooflineCostModel.from_names("h100", "llama-3-8b"),
        RooflineCostModel.from_names("a100", "llama-3-70b", sharpness=math.inf),
        RooflineCostModel.from_names("h100", "mixtral-8x7b", overhead_s=0.0, sharpness=1.5),
        LinearStepModel.llama31_8b_h100(),
    ],
    ids=lambda m: m.name,
)
def test_fast_step_time_equals_the_cost_model_bit_for_bit(model: CostModel) -> None:
    fast = fast_step_time(model)
    assert fast is not None
    rng = random.Random(7)
    for _ in range(3000):
        prefill = [
            (rng.randrange(1, 4096), rng.choice([0, rng.randrange(0, 32_000)]))
            for _ in range(rng.choice([0, 0, 1, 2, 5]))
        ]
        decode = [rng.randrange(1, 8192) for _ in range(rng.choice([0, 1, 3, 40, 256]))]
        expected = model.step_time(prefill, decode)
        assert fast(prefill, len(decode), sum(decode)) == expected
        # what the core passes for lazy decodes: the sum in one entry, zeros after it
        lumped = [sum(decode), *([0] * (len(decode) - 1))] if decode else []
        assert model.step_time(prefill, lumped) == expected


def test_fast_step_time_leaves_other_models_to_themselves() -> None:
    assert fast_step_time(OrderSensitiveCost()) is None
    assert fast_step_time(RooflineCostModel.from_names("h100", "llama-3-70b", tp=2)) is None
    assert fast_step_time(RooflineCostModel.from_names("h100", "llama-3-70b", pp=2)) is None


def test_a_replaced_cost_model_is_the_one_called() -> None:
    core = SimEngineCore(SimEngineConfig(block_size=16, num_gpu_blocks=400))
    core.add_request("a", list(range(300, 340)), 3, arrival=0.0)
    core.cost_model = OrderSensitiveCost()
    first = core.step(0.0)
    assert first.duration_s == OrderSensitiveCost().step_time([(40, 0)], [])
