"""Where requests queue, and whose order they keep there: the control plane's or the engine's.

The ``priority`` policy orders the control plane's queue. A request it has sent on waits
in the engine when the engine cannot run it yet (its KV cache is full), and there the
engine's own order decides: vLLM's default ``fcfs`` runs them by arrival, ``--scheduling-
policy priority`` by the priority the control plane sends (``engine_scheduling_policy =
"priority"``, policies.md). This script runs one seeded workload through the same
simulated fleet three ways, all with the ``priority`` policy and ``load_balanced``
routing:

* ``cap 256, engine fcfs``: each instance takes up to 256 requests in flight
  (``max_concurrent_requests``), more than its KV cache holds, so they queue in the
  engines, by arrival;
* ``cap 256, engine priority``: the same, the engines scheduling by priority;
* ``cap 100, engine fcfs``: each instance takes about what its KV cache holds, so they
  queue in the control plane, by priority (and the engines preempt by arrival when their
  requests' answers outgrow the cache);
* ``cap 100, engine priority``: the same, the engines preempting by priority.

The fleet: 2 simulated L40S serving Llama-3-8B (14,460 KV blocks of 16 tokens each). The
workload: Poisson arrivals at ``--rate`` a second (1,000 requests), prompts of 500–3,000
tokens and answers of 100–800; 15% CRITICAL, the rest NORMAL (60%) or BACKGROUND. Each
setup runs ``--seeds`` workloads (3 by default: seeds ``--seed`` and on), and the figures
are over all their requests together: under this overload a request's TTFT is either
near nothing or many seconds, and one seed's median may fall either side (seed 0's
BACKGROUND requests had a TTFT p50 of 0.29 s behind FCFS engines, seeds 1 and 2's
7.3–8.2 s). Everything runs on virtual time, so the figures are exact and repeatable.
Run from the repository root (a few minutes)::

    .venv/bin/python benchmarks/engine_priority.py
    .venv/bin/python benchmarks/engine_priority.py --rate 5 --requests 2000
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence

from sage_llm.bench.cli_args import at_least, open_loop_args
from sage_llm.bench.inprocess import Preset, RunResult, run_preset
from sage_llm.bench.report import latency_cells
from sage_llm.bench.stats import RequestMeasurement
from sage_llm.bench.workloads import Workload, synthetic, with_priorities
from sage_llm.types import ExecutionInstance, RequestPriority

MODEL = "llama-3-8b"
SETUPS = (
    ("cap 256, engine fcfs", 256, "fcfs"),
    ("cap 256, engine priority", 256, "priority"),
    ("cap 100, engine fcfs", 100, "fcfs"),
    ("cap 100, engine priority", 100, "priority"),
)
"""(label, max_concurrent_requests, engine_scheduling_policy) of each run."""


def workload(requests: int, rate: float, seed: int) -> Workload:
    """``requests`` Poisson arrivals at ``rate`` a second, prompts of 500–3000 tokens and
    answers of 100–800: 15% CRITICAL, then NORMAL or BACKGROUND (60 : 40)."""
    base = synthetic(requests, rate, "uniform:500,3000", "uniform:100,800", seed=seed)
    mix: dict[RequestPriority | int | str, float] = {
        RequestPriority.CRITICAL: 0.15,
        RequestPriority.NORMAL: 0.85 * 0.6,
        RequestPriority.BACKGROUND: 0.85 * 0.4,
    }
    return with_priorities(base, mix, seed=seed)


def fleet(engines: int, cap: int, engine_policy: str) -> list[ExecutionInstance]:
    return [
        ExecutionInstance(
            f"sim-{i}",
            "127.0.0.1",
            8100 + i,
            MODEL,
            max_concurrent_requests=cap,
            engine_scheduling_policy=engine_policy,
            metadata={"sim_gpu": "l40s"},
        )
        for i in range(engines)
    ]


def run(load: Workload, engines: int, cap: int, engine_policy: str, seed: int) -> RunResult:
    return run_preset(
        Preset(f"cap {cap}, engine {engine_policy}", "priority", "load_balanced"),
        load,
        lambda: fleet(engines, cap, engine_policy),
        seed=seed,
    )


def by_priority(
    measurements: Iterable[RequestMeasurement],
) -> dict[RequestPriority, tuple[int, list[float], list[float]]]:
    """Per priority: requests, and the TTFT and end-to-end seconds of those answered."""
    out: dict[RequestPriority, tuple[int, list[float], list[float]]] = {}
    for m in measurements:
        count, ttft, e2e = out.get(m.priority, (0, [], []))
        if m.first_token_s is not None:
            ttft.append(m.first_token_s - m.arrival_s)
            e2e.append(m.end_s - m.arrival_s)
        out[m.priority] = (count + 1, ttft, e2e)
    return dict(sorted(out.items()))


def rows(label: str, measurements: Iterable[RequestMeasurement]) -> list[str]:
    out = []
    for priority, (count, ttft, e2e) in by_priority(measurements).items():
        if not ttft:
            out.append(f"| {label} | {priority.name} | 0/{count} | – | – | – | – |")
            continue
        out.append(
            f"| {label} | {priority.name} | {len(ttft)}/{count} | {latency_cells(ttft, e2e)} |"
        )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    open_loop_args(parser, engines=2, rate=6.0, requests=1000)
    parser.add_argument(
        "--seeds", type=at_least(1), default=3, help="workloads per setup (seeds from --seed)"
    )
    args = parser.parse_args(argv)
    seeds = range(args.seed, args.seed + args.seeds)
    loads = [workload(args.requests, args.rate, seed) for seed in seeds]
    print(
        f"{args.engines} simulated L40S (Llama-3-8B), priority + load_balanced, "
        f"{args.requests} requests at {args.rate:g}/s, seeds {seeds[0]}–{seeds[-1]} "
        "(their requests together); seconds"
    )
    print()
    print("| setup | priority | answered | TTFT p50 | p99 | E2E p50 | p99 |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for label, cap, engine_policy in SETUPS:
        measured = [
            m
            for load, seed in zip(loads, seeds, strict=True)
            for m in run(load, args.engines, cap, engine_policy, seed).measurements
        ]
        for line in rows(label, measured):
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
