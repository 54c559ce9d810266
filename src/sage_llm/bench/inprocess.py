"""Replay a workload against an in-process control plane and measure every request.

Used by ``sage-llm demo`` and the policy benchmarks: the control plane and its simulated
engines run in this process, on virtual time (:func:`sage_llm.sim.clock.run_virtual`), so a
run of many simulated minutes takes seconds and is exactly repeatable.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sage_llm.bench.loadgen import measurement
from sage_llm.bench.stats import SLO, BenchSummary, RequestMeasurement, summarize
from sage_llm.bench.workloads import Workload, WorkloadRequest
from sage_llm.control_plane.manager import ControlPlaneManager
from sage_llm.engines.base import EngineStats
from sage_llm.errors import SageLLMError
from sage_llm.sim.clock import run_virtual
from sage_llm.types import ExecutionInstance, RequestMetadata


async def _one(
    cp: ControlPlaneManager, wr: WorkloadRequest, model: str | None
) -> RequestMeasurement:
    loop = asyncio.get_running_loop()
    arrival = loop.time()
    slo_e2e = wr.slo_e2e_s
    meta = RequestMetadata(
        request_id=wr.request_id,
        prompt=wr.prompt,
        max_tokens=wr.max_tokens,
        priority=wr.priority,
        slo_deadline_ms=None if slo_e2e is None else slo_e2e * 1000.0,
        user_id=wr.user_id,
        session_id=wr.session_id,
        model_name=wr.model or model,
    )
    times: list[float] = []
    output = 0
    error: str | None = None
    try:
        async for chunk in cp.stream(meta):
            if chunk.text or chunk.token_ids:
                times.append(loop.time())
            output += len(chunk.token_ids) if chunk.token_ids else int(bool(chunk.text))
            if chunk.usage is not None:
                output = chunk.usage.completion_tokens
    except SageLLMError as exc:
        error = f"{type(exc).__name__}: {exc.message}"
    return measurement(wr, arrival, times, loop.time(), output, error)


async def replay(
    cp: ControlPlaneManager, workload: Workload, *, model: str | None = None
) -> list[RequestMeasurement]:
    """Send each request at its arrival offset (open loop) and measure it while streaming."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks: list[asyncio.Task[RequestMeasurement]] = []
    for wr in workload.requests:
        delay = start + wr.arrival_s - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(_one(cp, wr, model)))
    return list(await asyncio.gather(*tasks))


@dataclass(frozen=True)
class Preset:
    """A named control-plane configuration to compare."""

    name: str
    policy: str
    routing: str
    policy_params: dict[str, Any] = field(default_factory=dict)
    routing_params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunResult:
    preset: Preset
    summary: BenchSummary
    prefix_hit_rate: float
    measurements: Sequence[RequestMeasurement]
    policy_state: dict[str, Any]


def run_preset(
    preset: Preset,
    workload: Workload,
    instances: Callable[[], Sequence[ExecutionInstance]],
    *,
    slo: SLO | None = None,
    seed: int = 0,
    manager_kwargs: dict[str, Any] | None = None,
) -> RunResult:
    """Run ``workload`` through a fresh simulated fleet under ``preset``, on virtual time."""

    async def main() -> RunResult:
        cp = ControlPlaneManager(
            scheduling_policy=preset.policy,
            routing_strategy=preset.routing,
            mode="simulated",
            policy_params=preset.policy_params,
            routing_params=preset.routing_params,
            seed=seed,
            **(manager_kwargs or {}),
        )
        fleet = list(instances())
        for inst in fleet:
            cp.register_instance(inst)
        async with cp:
            start = asyncio.get_running_loop().time()
            measurements = await replay(cp, workload)
            duration = asyncio.get_running_loop().time() - start
            stats: list[EngineStats] = []
            for inst in fleet:
                stats.append(await cp.engine_stats(inst.instance_id))
            policy_state = cp.policy.describe()
        queries = sum(s.prefix_cache_queries_total for s in stats)
        hits = sum(s.prefix_cache_hits_total for s in stats)
        return RunResult(
            preset=preset,
            summary=summarize(measurements, duration, slo),
            prefix_hit_rate=hits / queries if queries else 0.0,
            measurements=measurements,
            policy_state=dict(policy_state),
        )

    return run_virtual(main())
