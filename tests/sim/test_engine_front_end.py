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
from sage_llm.sim.engine import SharedCore, SimEngine, SimEngineConfig

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
    assert model.describe() == {"intake_s": 0.004, "per_output_s": 0.001, "shared_step_s": 0.0}
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="intake_s"):
            FrontEndModel(intake_s=bad)
        with pytest.raises(ValueError, match="shared_step_s"):
            FrontEndModel(shared_step_s=bad)
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


# -- the shared core ---------------------------------------------------------------------------


def test_shared_core_without_step_parts_is_the_fifo_queue_to_the_last_bit() -> None:
    model = FrontEndModel(intake_s=0.0123, per_output_s=0.00071)
    fifo, shared = FrontEndQueue(model), SharedCore(model)
    # bursts (jobs queue up) and gaps (the server idles)
    arrivals = [(0.007 * k + (0.05 if k > 20 else 0.0), k % 3) for k in range(40)]
    wanted, jobs = [], []
    for now, outputs in arrivals:
        shared.advance(now)
        wanted.append(fifo.intake(now) if outputs == 0 else fifo.outputs(now, outputs))
        jobs.append(shared.intake(now) if outputs == 0 else shared.outputs(now, outputs))
    assert shared.advance(fifo.free_at)[-1] is jobs[-1]
    assert [(job.start, job.end) for job in jobs] == wanted  # exactly, not approximately
    assert any(start > now for (start, _), (now, _) in zip(wanted, arrivals, strict=True))
    assert shared.next_change() == float("inf")


def test_shared_core_runs_both_at_half_speed_while_both_are_busy() -> None:
    line = SharedCore(FrontEndModel(intake_s=4.0, shared_step_s=3.0))
    intake = line.intake(0.0)
    assert intake.end == 4.0
    line.advance(1.0)
    step = line.step_part(1.0, line.shared_part_s(2.0))  # a 2 s step: all of it shared
    # From 1 s both run at half speed: the step's 2 s take 4 s (until 5 s); the intake has
    # 3 s left, of which 2 s are done by 5 s; the last second runs alone.
    assert (step.end, intake.end) == (5.0, 7.0)
    assert line.advance(4.9) == [] and line.next_change() == 5.0
    assert line.advance(5.0) == [step] and intake.end == 6.0
    later = line.outputs(5.5, 2)  # waits for the intake
    assert line.advance(10.0) == [intake, later]
    assert (later.start, later.end) == (6.0, 6.0)
    line.step_part(11.0, 1.0)
    with pytest.raises(RuntimeError, match="already running"):
        line.step_part(11.5, 1.0)


def test_a_front_end_on_the_shared_core_slows_the_step_it_overlaps() -> None:
    async def main(shared_s: float) -> tuple[list[float], list[float]]:
        front = FrontEndModel(intake_s=0.003, shared_step_s=shared_s)
        engine = SimEngine("sim-0", CONFIG, front_end=front)
        first, second = await asyncio.gather(
            chunk_times(engine, req("r0")), chunk_times(engine, req("r1", 2), delay_ms=21.0)
        )
        await engine.aclose()
        return first, second

    # Without a shared part: r0's intake 0-3, steps end at 13, 23, 33, 43; r1's intake runs
    # 21-24 (r0's second token waits for it), r1 joins the step of 33-43.
    assert run_virtual(main(0.0)) == ([13.0, 24.0, 33.0, 43.0], [43.0, 53.0])
    # The last 4 ms of every step run on the front end's core. Alone (the first step:
    # 3-9 worker, 9-13 shared) nothing changes. r1's intake arrives at 21 with 2 ms of the
    # second step's shared part left: both at half speed, the step ends at 25 and the
    # intake at 26 (1 ms alone). The third step (r0 alone) runs 25-35, r1 joins the fourth.
    assert run_virtual(main(0.004)) == ([13.0, 26.0, 35.0, 45.0], [45.0, 55.0])


def test_shared_core_engine_serves_prefill_legs_and_refuses_when_closed() -> None:
    front = FrontEndModel(intake_s=0.004, per_output_s=0.001, shared_step_s=0.002)

    async def main() -> float:
        engine = SimEngine("sim-0", CONFIG, front_end=front)
        await engine.prefill(req("p0"))
        t = now_ms()
        waiting = asyncio.ensure_future(chunk_times(engine, req("r0")))
        await asyncio.sleep(0.001)  # r0's intake is in progress
        await engine.aclose()
        with pytest.raises(EngineConnectionError):
            await waiting
        return t

    # Intake 0-4 ms, the prefill step 4-14 (its shared part 12-14 alone), its output 14-15.
    assert run_virtual(main()) == 15.0


def test_the_front_end_runs_on_the_engines_time_scale() -> None:
    front = FrontEndModel(intake_s=0.008, per_output_s=0.002, shared_step_s=0.004)
    fast = SimEngine("s", SimEngineConfig(speed=4.0), front_end=front)
    assert fast.front_end == FrontEndModel(0.002, 0.0005, 0.001)
    assert SimEngine("s", front_end=front).front_end is front
