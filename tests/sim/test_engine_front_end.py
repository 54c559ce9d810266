"""The simulated engine's front end (a single FIFO server in front of the core), on virtual
time: intake delays the core, output processing delays the streams and serialises under
concurrency."""

from __future__ import annotations

import asyncio

import pytest

from sage_llm.engines.base import EngineRequest
from sage_llm.errors import EngineConnectionError
from sage_llm.sim.clock import run_virtual
from sage_llm.sim.costmodel import FrontEndModel, FrontEndQueue, LinearStepModel
from sage_llm.sim.engine import SimEngine, SimEngineConfig

STEP_MS = 10.0  # every step costs 10 ms, whatever it computes
CONFIG = SimEngineConfig(
    model="tiny", gpu="cpu", cost_model=LinearStepModel(STEP_MS * 1e3, 0.0, 0.0),
    max_model_len=512, num_gpu_blocks=256,
)  # fmt: skip


def req(rid: str, max_tokens: int = 4) -> EngineRequest:
    return EngineRequest(request_id=rid, model="tiny", prompt=list(range(10, 42)),
                         max_tokens=max_tokens)  # fmt: skip


def now_ms() -> float:
    return round(asyncio.get_running_loop().time() * 1e3, 6)


async def chunk_times(
    engine: SimEngine, request: EngineRequest, delay_ms: float = 0.0
) -> list[float]:
    await asyncio.sleep(delay_ms / 1e3)
    times = []
    async for _ in engine.generate(request):
        times.append(now_ms())
    return times


def test_front_end_model_validates_and_queue_serves_jobs_in_order() -> None:
    assert FrontEndModel().is_zero
    model = FrontEndModel(intake_s=0.004, per_output_s=0.001)
    assert not model.is_zero
    assert model.outputs_s(3) == pytest.approx(0.003)
    assert model.describe() == {"intake_s": 0.004, "per_output_s": 0.001}
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="intake_s"):
            FrontEndModel(intake_s=bad)
    queue = FrontEndQueue(model)
    assert queue.intake(1.0) == (1.0, 1.004)
    assert queue.outputs(1.002, 2) == pytest.approx((1.004, 1.006))  # waits for the intake
    assert queue.outputs(2.0, 1) == (2.0, 2.001)  # idle server: starts at once
    assert queue.busy_s == pytest.approx(0.007)


def test_without_a_front_end_tokens_arrive_as_steps_end() -> None:
    async def main() -> list[float]:
        engine = SimEngine("sim-0", CONFIG)
        assert engine.front_end.is_zero
        times = await chunk_times(engine, req("r0"))
        await engine.aclose()
        return times

    assert run_virtual(main()) == [10.0, 20.0, 30.0, 40.0]


def test_intake_delays_the_core_and_output_processing_delays_each_token() -> None:
    async def main() -> list[float]:
        engine = SimEngine("sim-0", CONFIG, front_end=FrontEndModel(0.003, 0.002))
        times = await chunk_times(engine, req("r0"))
        await engine.aclose()
        return times

    # Intake 0-3 ms; steps end at 13, 23, 33, 43; each token is handed out 2 ms later.
    # The core does not wait for the front end, so the steps stay 10 ms apart.
    assert run_virtual(main()) == [15.0, 25.0, 35.0, 45.0]


def test_intake_waits_behind_output_processing_of_running_requests() -> None:
    async def main() -> tuple[list[float], list[float]]:
        engine = SimEngine("sim-0", CONFIG, front_end=FrontEndModel(0.003, 0.006))
        first, second = await asyncio.gather(
            chunk_times(engine, req("r0", 5)), chunk_times(engine, req("r1", 2), delay_ms=15.0)
        )
        await engine.aclose()
        return first, second

    first, second = run_virtual(main())
    # r0: intake 0-3, steps end at 13, 23, 33, 43, 53. r1 arrives at 15 while the front end
    # processes r0's first output (13-19): its intake runs 19-22, and it joins the step of
    # 23-33. That step's two outputs cost 12 ms (33-45); the next step's two, 45-57; r0's
    # last output, 57-63.
    assert second == [45.0, 57.0]
    assert first == [19.0, 29.0, 45.0, 57.0, 63.0]


def test_output_processing_serialises_and_lags_behind_the_core_under_concurrency() -> None:
    async def main() -> tuple[list[list[float]], float]:
        engine = SimEngine("sim-0", CONFIG, front_end=FrontEndModel(0.0, 0.005))
        results = await asyncio.gather(*(chunk_times(engine, req(f"r{i}")) for i in range(3)))
        core_done = engine.core.stats().generation_tokens_total
        assert core_done == 12
        await engine.aclose()
        return list(results), now_ms()

    results, _ = run_virtual(main())
    # Three outputs per 10 ms step cost 15 ms of front-end time: the streams fall 5 ms
    # further behind the core each step (steps end at 10, 20, 30, 40).
    for times in results:
        assert times == [25.0, 40.0, 55.0, 70.0]


def test_a_closed_engine_refuses_before_the_intake() -> None:
    async def main() -> None:
        engine = SimEngine("sim-0", CONFIG, front_end=FrontEndModel(0.003, 0.0))
        await engine.aclose()
        with pytest.raises(EngineConnectionError):
            await chunk_times(engine, req("r0"))

    run_virtual(main())


def test_prefill_leg_also_goes_through_the_intake() -> None:
    async def main() -> float:
        engine = SimEngine("sim-0", CONFIG, front_end=FrontEndModel(0.004, 0.001))
        handle = await engine.prefill(req("p0"))
        assert handle.first_token is not None and handle.first_token.usage is not None
        t = now_ms()
        await engine.aclose()
        return t

    # Intake 0-4 ms, the prefill step 4-14, its output 14-15.
    assert run_virtual(main()) == 15.0


def test_prefix_cache_hits_of_a_chunked_prefill_are_reported_behind_a_front_end() -> None:
    config = SimEngineConfig(
        model="tiny", gpu="cpu", cost_model=LinearStepModel(STEP_MS * 1e3, 0.0, 0.0),
        max_model_len=512, num_gpu_blocks=256, max_num_batched_tokens=16,
    )  # fmt: skip

    async def main() -> list[int | None]:
        engine = SimEngine("sim-0", config, front_end=FrontEndModel(0.001, 0.001))
        cached: list[int | None] = []
        # b shares a's first 32 tokens; it computes its other 32 in two 16-token chunks, so
        # the step that admits it produces no token.
        prompts = {"a": list(range(10, 74)), "b": [*range(10, 42), *range(100, 132)]}
        for rid, prompt in prompts.items():
            request = EngineRequest(request_id=rid, model="tiny", prompt=prompt, max_tokens=2)
            chunks = [c async for c in engine.generate(request)]
            usage = chunks[-1].usage
            cached.append(usage.cached_tokens if usage is not None else None)
        await engine.aclose()
        return cached

    assert run_virtual(main()) == [0, 32]
