"""Planner vs exhaustive simulation: is the planner's choice as good as the best plan?

For each scenario (model, GPUs, workload, SLO) the script

1. profiles a synthetic workload (prompt/output lengths) and asks the planner for the plan
   with the highest goodput capacity (``rate=None``);
2. regenerates the workload at ``--load`` × that capacity (1.0 by default: the rate where
   the best plans are just sufficient) and plans again at that rate: the chosen plan plus
   every feasible alternative is the space;
3. runs every plan of the space through the simulator (``run_preset``: a control plane
   over simulated engines with the plan's TP/PP and roles, on virtual time, several plans
   at once in worker processes) and measures goodput: requests meeting both the TTFT and
   the TPOT target, divided by the arrival window;
4. passes when the chosen plan's simulated goodput is at least 95% of the best.

PD plans are simulated only when the control plane can run PD (probed at start);
otherwise the planner is restricted to colocated plans so both sides search the same space.

    .venv/bin/python benchmarks/planner_vs_exhaustive.py            # default scenarios
    .venv/bin/python benchmarks/planner_vs_exhaustive.py --thorough # two loads, longer runs
    .venv/bin/python benchmarks/planner_vs_exhaustive.py --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

from sage_llm.bench.cli_args import above, at_least, check_out
from sage_llm.bench.inprocess import Preset, run_preset
from sage_llm.bench.stats import SLO
from sage_llm.bench.workloads import LogNormal, Workload, synthetic
from sage_llm.control_plane.manager import ControlPlaneManager
from sage_llm.control_plane.parallelism import (
    Candidate,
    PlanEstimates,
    PlannedInstance,
    SLOTarget,
    WorkloadProfile,
    plan,
)
from sage_llm.sim.clock import run_virtual
from sage_llm.types import ExecutionInstance, ExecutionInstanceType, RequestMetadata

PRESET = Preset("fifo + load_balanced", "fifo", "load_balanced")
THRESHOLD = 0.95


@dataclass(frozen=True)
class Scenario:
    name: str
    model: str
    gpu: str
    gpus: int
    prompt: LogNormal
    output: LogNormal
    slo: SLOTarget


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "llama-3-70b-8xh100-chat",
        "llama-3-70b",
        "h100",
        8,
        LogNormal(median=800, sigma=0.6, lo=16, hi=4096),
        LogNormal(median=200, sigma=0.5, lo=8, hi=1024),
        SLOTarget(ttft_s=2.0, tpot_s=0.05),
    ),
    Scenario(
        "llama-3-8b-4xl40s-long-prompt",
        "llama-3-8b",
        "l40s",
        4,
        LogNormal(median=2000, sigma=0.5, lo=64, hi=8000),
        LogNormal(median=150, sigma=0.5, lo=8, hi=1024),
        SLOTarget(ttft_s=1.5, tpot_s=0.06),
    ),
)


def fleet_for(
    instances: Sequence[PlannedInstance], model: str, gpu: str
) -> list[ExecutionInstance]:
    """Simulated instances matching a plan: TP/PP, role and the simulator's GPU/model."""
    return [
        ExecutionInstance(
            instance_id=f"{inst.role.value}-{k}",
            host="127.0.0.1",
            port=9000 + k,
            model_name=model,
            tensor_parallel_size=inst.tp,
            pipeline_parallel_size=inst.pp,
            instance_type=inst.role,
            gpu_count=inst.tp * inst.pp,
            max_concurrent_requests=256,
            metadata={"sim_gpu": gpu, "sim_model": model},
        )
        for k, inst in enumerate(instances)
    ]


def pd_supported(model: str = "llama-3-8b", gpu: str = "h100") -> bool:
    """Whether the control plane runs a request as a prefill leg plus a decode leg."""

    async def probe() -> bool:
        cp = ControlPlaneManager(mode="simulated", enable_pd_separation=True)
        roles = (ExecutionInstanceType.PREFILLING, ExecutionInstanceType.DECODING)
        insts = [PlannedInstance(role, 1, 1, 1, (k,)) for k, role in enumerate(roles)]
        for inst in fleet_for(insts, model, gpu):
            cp.register_instance(inst)
        async with cp:
            meta = RequestMetadata("probe", prompt="word " * 2000, max_tokens=4, model_name=model)
            try:
                result = await asyncio.wait_for(cp.generate(meta), 60.0)  # virtual seconds
            except Exception:
                return False
        return result.ok and result.prefill_instance_id is not None

    return run_virtual(probe())


def workload(sc: Scenario, n: int, rate: float, seed: int) -> Workload:
    return synthetic(n, rate, sc.prompt, sc.output, seed=seed, model=sc.model, name=sc.name)


def simulate(job: tuple[Scenario, int, float, int, tuple[PlannedInstance, ...]]) -> dict[str, Any]:
    """One plan through the simulator (a worker process): its measured goodput and latencies.

    Goodput is the number of requests meeting both SLO targets divided by the arrival
    window (the offered load's duration), so a slow tail after the last arrival does not
    count against a plan, while requests that queue past their TTFT target do."""
    sc, n, rate, seed, insts = job
    wl = workload(sc, n, rate, seed)
    slo = SLO(ttft_s=sc.slo.ttft_s, tpot_s=sc.slo.tpot_s, name=sc.slo.describe())
    fleet = fleet_for(insts, sc.model, sc.gpu)
    t0 = time.perf_counter()
    s = run_preset(PRESET, wl, lambda: fleet, slo=slo, seed=seed).summary
    return {
        "sim_goodput_rps": round(s.slo_met / wl.duration_s, 3),
        "sim_slo_attainment": s.slo_attainment,
        "sim_ttft_p90_s": s.ttft.p90 if s.ttft else None,
        "sim_tpot_p90_s": s.tpot.p90 if s.tpot else None,
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def run_scenario(
    sc: Scenario, *, load: float, duration_s: float, max_requests: int, seed: int, workers: int
) -> dict[str, Any]:
    pilot = workload(sc, 2000, 1.0, seed)
    prompts = [r.prompt_tokens for r in pilot.requests]
    outputs = [r.max_tokens for r in pilot.requests]
    allow_pd = pd_supported()
    first = plan(
        sc.model, sc.gpus, sc.gpu, WorkloadProfile.from_samples(prompts, outputs), sc.slo,
        allow_pd=allow_pd,
    )  # fmt: skip
    rate = round(first.estimates.capacity_rps * load, 2)
    n = max(200, min(max_requests, int(rate * duration_s)))
    wl = workload(sc, n, rate, seed)
    profile = WorkloadProfile.from_samples(
        [r.prompt_tokens for r in wl.requests], [r.max_tokens for r in wl.requests], rate
    )
    chosen = plan(sc.model, sc.gpus, sc.gpu, profile, sc.slo, allow_pd=allow_pd)
    space: list[tuple[Candidate, Sequence[PlannedInstance], PlanEstimates]] = [
        (chosen.candidate, chosen.instances, chosen.estimates),
        *((a.candidate, a.instances, a.estimates) for a in chosen.alternatives),
    ]
    jobs = [(sc, n, rate, seed, tuple(insts)) for _, insts, _ in space]
    rows = []
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for k, ((cand, _, est), sim) in enumerate(
            zip(space, pool.map(simulate, jobs), strict=True)
        ):
            rows.append(
                {
                    "plan": cand.label,
                    "chosen": k == 0,
                    "est_capacity_rps": round(est.capacity_rps, 3),
                    "est_ttft_s": round(est.ttft_s, 4),
                    "est_tpot_s": None if est.tpot_s is None else round(est.tpot_s, 4),
                    **sim,
                }
            )
            print(
                f"  [{k + 1}/{len(space)}] {cand.label:<46} est {est.capacity_rps:7.2f} req/s  "
                f"sim goodput {sim['sim_goodput_rps']:7.2f} req/s",
                flush=True,
            )
    best = max(rows, key=lambda r: float(r["sim_goodput_rps"]))
    mine = rows[0]
    ratio = (
        float(mine["sim_goodput_rps"]) / float(best["sim_goodput_rps"])
        if best["sim_goodput_rps"]
        else 1.0
    )
    return {
        "scenario": sc.name,
        "model": sc.model,
        "gpus": f"{sc.gpus}x{sc.gpu}",
        "slo": sc.slo.describe(),
        "load": load,
        "rate_rps": rate,
        "requests": n,
        "pd_simulated": allow_pd,
        "chosen": mine["plan"],
        "best": best["plan"],
        "ratio": round(ratio, 4),
        "passed": ratio >= THRESHOLD,
        "rows": rows,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--scenario", action="append", help="run only these scenario names")
    parser.add_argument(
        "--load", type=above(0), action="append",
        help="offered load as a multiple of the chosen plan's estimated capacity (repeatable; "
        "default 1.0)",
    )  # fmt: skip
    parser.add_argument("--duration", type=above(0), default=20.0, help="seconds of arrivals")
    parser.add_argument(
        "--max-requests", type=at_least(200), default=400,
        help="requests per simulation at most (at least 200: fewer judge the plans by noise; "
        "a run gets rate × duration within [200, this])",
    )  # fmt: skip
    parser.add_argument(
        "--thorough", action="store_true", help="loads 1.0 and 1.25, 40 s, up to 800 requests"
    )
    parser.add_argument("--seed", type=at_least(0), default=0)
    parser.add_argument(
        "--jobs", type=at_least(1), default=os.cpu_count() or 1, help="parallel sims"
    )
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)
    check_out(parser, "--json", args.json)
    loads = args.load or [1.0]
    if args.thorough:
        loads, args.duration, args.max_requests = args.load or [1.0, 1.25], 40.0, 800
    known = [s.name for s in SCENARIOS]
    unknown = [name for name in args.scenario or () if name not in known]
    if unknown:  # each one given runs, or the run is refused
        parser.error(f"unknown scenario {unknown[0]!r}; known: {', '.join(known)}")
    chosen = [s for s in SCENARIOS if not args.scenario or s.name in args.scenario]
    results = []
    started = time.perf_counter()
    for sc in chosen:
        for load in loads:
            print(
                f"{sc.name}: {sc.model} on {sc.gpus} × {sc.gpu}, {sc.slo.describe()}, load {load}×"
            )
            res = run_scenario(
                sc, load=load, duration_s=args.duration, max_requests=args.max_requests,
                seed=args.seed, workers=args.jobs,
            )  # fmt: skip
            results.append(res)
            verdict = "PASS" if res["passed"] else "FAIL"
            print(
                f"  rate {res['rate_rps']} req/s, {res['requests']} requests, PD simulated: "
                f"{res['pd_simulated']}\n  chosen {res['chosen']} reaches {res['ratio']:.1%} of "
                f"the best simulated goodput ({res['best']}): {verdict}\n",
                flush=True,
            )
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=2)
    return 0 if all(r["passed"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
