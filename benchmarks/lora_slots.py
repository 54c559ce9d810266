"""Routing by LoRA slots against routing by who serves the adapter, on virtual time.

A vLLM engine started with ``--enable-lora --max-loras N`` holds requests for at most N
adapters in one batch: a request for another adapter waits until a slot frees, while
requests behind it go past. A router that sends each adapter's requests to any engine
serving it (as every router that knows only ``/v1/models`` does) spreads every adapter
over every engine, and the engines' slots turn over all the time. The control plane's
``lora_slot_routing`` (default on; routing.md, "LoRA adapters") prefers the engines that
run the adapter or have a slot free, and packs adapters while the adapters in demand
outnumber the free slots.

This script runs the same seeded workload through the same simulated fleet twice, with
``lora_slot_routing`` on and off, for each scenario: ``--engines`` simulated H100s serving
Llama-3-8B with the adapters (``sim_max_loras`` slots each); Poisson arrivals at
``--rate`` a second; prompts of 200–1200 tokens and answers of 50–300; each request for
one of the adapters in use, by a Zipf law (the k-th adapter asked for in proportion to
1/k). The simulated engines schedule as vLLM v1 does (sage_llm.sim.core): a batch holds
at most ``max_loras`` adapters, an adapter brought into a slot costs its step
``lora_swap_s`` (3 ms), and a step whose batch holds an adapter's request takes 1.25 ms
and 1.5 µs per token longer (both measured on an H200: docs/benchmarks.md, "GPU steps").

The scenarios (adapters in use / served, slots per engine): 8/8 with 2 slots, 16/16
with 4, 4/32 with 2 (many adapters served, few in use), 4/4 with 4 and 2/2 with 4 (slots
to spare); ``--scenario USED/SERVED/SLOTS`` (repeated) runs others. Everything runs on
virtual time, so the figures are exact and repeatable. Run from the repository root
(about two minutes)::

    .venv/bin/python benchmarks/lora_slots.py
    .venv/bin/python benchmarks/lora_slots.py --rate 20 --requests 3000

``--cluster`` runs the same through the cluster simulator (``sage_llm.sim.cluster``:
the same policy, router and LoRA slot routing, on an event heap; request for request
the same runs at these sizes), which takes fleets of hundreds of engines; above 256 a
decision sees a sample of them (its docstring says how)::

    .venv/bin/python benchmarks/lora_slots.py --cluster --engines 300 --rate 2625 \
        --requests 20000 --scenario 150/150/2
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from sage_llm.bench.cli_args import open_loop_args
from sage_llm.bench.inprocess import Preset, run_preset
from sage_llm.bench.stats import BenchSummary
from sage_llm.bench.workloads import Workload, lora_names, synthetic, with_adapters
from sage_llm.sim.cluster import ClusterSimulator
from sage_llm.types import ExecutionInstance

MODEL = "llama-3-8b"


@dataclass(frozen=True)
class Scenario:
    """Adapters in use, adapters served and LoRA slots per engine."""

    used: int
    served: int
    max_loras: int

    @property
    def label(self) -> str:
        return f"{self.used}/{self.served} adapters, {self.max_loras} slots"


SCENARIOS = (
    Scenario(8, 8, 2),
    Scenario(16, 16, 4),
    Scenario(4, 32, 2),
    Scenario(4, 4, 4),
    Scenario(2, 2, 4),
)


def workload(used: int, requests: int, rate: float, seed: int) -> Workload:
    """``requests`` Poisson arrivals at ``rate`` a second, prompts of 200–1200 tokens and
    answers of 50–300, each for one of ``used`` adapters by a Zipf law (the k-th in
    proportion to 1/k)."""
    base = synthetic(requests, rate, "uniform:200,1200", "uniform:50,300", seed=seed)
    return with_adapters(base, lora_names(used), seed=seed)


def fleet(engines: int, scenario: Scenario) -> list[ExecutionInstance]:
    """``engines`` simulated H100s serving the model and ``scenario.served`` adapters."""
    return [
        ExecutionInstance(
            f"e{i}",
            "127.0.0.1",
            9000 + i,
            MODEL,
            lora_adapters=lora_names(scenario.served),
            metadata={"sim_gpu": "h100", "sim_max_loras": scenario.max_loras},
        )
        for i in range(engines)
    ]


def run(
    scenario: Scenario,
    load: Workload,
    engines: int,
    slot_routing: bool,
    seed: int,
    *,
    cluster: bool = False,
) -> BenchSummary:
    """One run of ``load`` through a fresh fleet, ``fifo`` + ``load_balanced``: by the
    control plane over in-process engines, or by the cluster simulator (``cluster``)."""
    if cluster:
        sim = ClusterSimulator(
            fleet(engines, scenario), policy="fifo", routing="load_balanced", seed=seed,
            lora_slot_routing=slot_routing,
        )  # fmt: skip
        return sim.run(load).summary
    return run_preset(
        Preset("slots" if slot_routing else "serving only", "fifo", "load_balanced"),
        load,
        lambda: fleet(engines, scenario),
        seed=seed,
        manager_kwargs={"lora_slot_routing": slot_routing},
    ).summary


def scenario_arg(text: str) -> Scenario:
    """``USED/SERVED/SLOTS``, e.g. ``8/8/2``."""
    try:
        used, served, slots = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected USED/SERVED/SLOTS, got {text!r}") from None
    if not 1 <= used <= served or slots < 1:
        raise argparse.ArgumentTypeError(f"need 1 <= USED <= SERVED and SLOTS >= 1: {text!r}")
    return Scenario(used, served, slots)


def row(label: str, s: BenchSummary) -> str:
    if s.ttft is None or s.e2e is None:
        return f"| {label} | {s.ok}/{s.count} | – | – | – | – | – | – |"
    return (
        f"| {label} | {s.ok}/{s.count} | {s.request_throughput:.2f} "
        f"| {s.ttft.p50 * 1e3:,.0f} | {s.ttft.p90 * 1e3:,.0f} | {s.ttft.p99 * 1e3:,.0f} "
        f"| {s.e2e.p50:.2f} | {s.e2e.p99:.2f} |"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    open_loop_args(parser, engines=4, rate=35.0, requests=1500)
    parser.add_argument(
        "--scenario", type=scenario_arg, action="append",
        help="USED/SERVED/SLOTS: adapters in use, served, LoRA slots per engine (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--cluster", action="store_true", help="run on the cluster simulator (large fleets)"
    )
    args = parser.parse_args(argv)
    where = "the cluster simulator" if args.cluster else "the control plane"
    print(
        f"{args.engines} simulated H100s (Llama-3-8B), fifo + load_balanced, {args.requests} "
        f"requests at {args.rate:g}/s (seed {args.seed}), on {where}; TTFT in ms, E2E in s"
    )
    print()
    print("| scenario, routing | ok | req/s | TTFT p50 | p90 | p99 | E2E p50 | p99 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for scenario in args.scenario or SCENARIOS:
        load = workload(scenario.used, args.requests, args.rate, args.seed)
        for slot_routing in (False, True):
            result = run(
                scenario, load, args.engines, slot_routing, args.seed, cluster=args.cluster
            )
            how = "LoRA slots" if slot_routing else "serving only"
            print(row(f"{scenario.label}, {how}", result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
