"""One user floods the fleet: what the others' requests wait under ``fifo`` and ``fair``.

A shared fleet serves a heavy user (a batch job: long prompts and answers, sent faster than
the fleet serves them) and eight light users (chat: short prompts and answers, a few a
second between them). Under ``fifo`` every request queues behind the heavy user's
backlog; under ``fair`` (a virtual token counter per user, policies.md) a light user's
request starts ahead of it, and the heavy user gets what the others leave. The same
seeded workload runs four ways, side by side, on 2 simulated L40S serving Llama-3-8B
(``load_balanced`` routing):

* ``fifo, cap --open-cap`` (256): each engine takes more requests at once
  (``max_concurrent_requests``) than its KV cache holds, so requests wait in the engines,
  first come first served, whatever the control plane's policy;
* ``fifo, cap --cap`` (96, about what an engine's KV cache holds for these requests):
  requests wait in the control plane, in arrival order;
* ``fair, cap --cap``: they wait in the control plane, a share per user;
* ``adaptive, cap --cap``: the default policy, which switches to ``fair`` when one user
  sent most of the recent requests and they queue.

Everything runs on virtual time, so the figures are exact and repeatable.

* heavy user: ``--heavy-rate`` requests a second (8), prompts of 1,000–3,000 tokens, answers of
  200–600;
* light users: ``--light-rate`` requests a second (2) between the eight of them (chosen at
  random), prompts of 100–600 tokens, answers of 50–200;
* both for ``--duration-s`` seconds of arrivals; the run goes on until every request has
  ended.

Run from the repository root (about a minute)::

    .venv/bin/python benchmarks/fair_share.py
    .venv/bin/python benchmarks/fair_share.py --heavy-rate 1.5   # no overload
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from dataclasses import replace

from sage_llm.bench.cli_args import above, at_least
from sage_llm.bench.inprocess import Preset, RunResult, run_preset
from sage_llm.bench.report import latency_cells
from sage_llm.bench.stats import RequestMeasurement
from sage_llm.bench.workloads import Workload, synthetic
from sage_llm.types import ExecutionInstance

MODEL = "llama-3-8b"
LIGHT_USERS = 8


def workload(heavy_rate: float, light_rate: float, duration_s: float, seed: int) -> Workload:
    """The heavy user's and the light users' requests, merged by arrival."""
    heavy = synthetic(
        max(1, round(heavy_rate * duration_s)), heavy_rate, "uniform:1000,3000",
        "uniform:200,600", seed=seed, name="heavy",
    )  # fmt: skip
    light = synthetic(
        max(1, round(light_rate * duration_s)), light_rate, "uniform:100,600",
        "uniform:50,200", seed=seed + 1, n_users=LIGHT_USERS, name="light",
    )  # fmt: skip
    requests = [replace(r, user_id="heavy") for r in heavy.requests]
    requests += [replace(r, user_id=f"light-{r.user_id}") for r in light.requests]
    requests.sort(key=lambda r: r.arrival_s)
    return Workload("fair_share", tuple(requests), f"1 heavy and {LIGHT_USERS} light users")


def fleet(engines: int, cap: int) -> list[ExecutionInstance]:
    return [
        ExecutionInstance(
            f"sim-{i}",
            "127.0.0.1",
            8100 + i,
            MODEL,
            max_concurrent_requests=cap,
            metadata={"sim_gpu": "l40s"},
        )
        for i in range(engines)
    ]


def setups(cap: int, open_cap: int) -> list[tuple[str, str, int]]:
    """(label, policy, max_concurrent_requests) of each run."""
    return [
        (f"fifo, cap {open_cap}", "fifo", open_cap),
        (f"fifo, cap {cap}", "fifo", cap),
        (f"fair, cap {cap}", "fair", cap),
        (f"adaptive, cap {cap}", "adaptive", cap),
    ]


def run(policy: str, load: Workload, engines: int, cap: int, seed: int) -> RunResult:
    return run_preset(
        Preset(policy, policy, "load_balanced"), load, lambda: fleet(engines, cap), seed=seed
    )


def user_class(m: RequestMeasurement) -> str:
    return "heavy" if m.user_id == "heavy" else "light"


def rows(label: str, measurements: Iterable[RequestMeasurement]) -> list[str]:
    """Per user class: answered, TTFT and end-to-end percentiles (s), output tokens a
    second over the span of the class's answers."""
    by_class: dict[str, list[RequestMeasurement]] = {}
    for m in measurements:
        by_class.setdefault(user_class(m), []).append(m)
    out = []
    for name in ("light", "heavy"):
        ms = by_class.get(name, [])
        done = [m for m in ms if m.ok and m.first_token_s is not None]
        if not done:
            out.append(f"| {label} | {name} | 0/{len(ms)} | – | – | – | – | – |")
            continue
        ttft = [m.first_token_s - m.arrival_s for m in done if m.first_token_s is not None]
        e2e = [m.end_s - m.arrival_s for m in done]
        span = max(m.end_s for m in done) - min(m.arrival_s for m in done)
        rate = sum(m.output_tokens for m in done) / span if span > 0 else 0.0
        out.append(
            f"| {label} | {name} | {len(done)}/{len(ms)} | {latency_cells(ttft, e2e)} "
            f"| {rate:,.0f} |"
        )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--engines", type=at_least(1), default=2)
    parser.add_argument(
        "--cap", type=at_least(1), default=96, help="requests an engine runs, as its KV holds"
    )
    parser.add_argument(
        "--open-cap", type=at_least(1), default=256, help="requests an engine takes, beyond"
    )
    parser.add_argument("--heavy-rate", type=above(0.0), default=8.0, help="requests a second")
    parser.add_argument(
        "--light-rate", type=above(0.0), default=2.0, help="requests a second, all light users"
    )
    parser.add_argument("--duration-s", type=above(0.0), default=120.0)
    parser.add_argument("--seed", type=at_least(0), default=0)
    args = parser.parse_args(argv)
    load = workload(args.heavy_rate, args.light_rate, args.duration_s, args.seed)
    print(
        f"{args.engines} simulated L40S (Llama-3-8B), load_balanced; heavy user "
        f"{args.heavy_rate:g} req/s, {LIGHT_USERS} light users "
        f"{args.light_rate:g} req/s together, {args.duration_s:g} s of arrivals "
        f"({len(load)} requests), seed {args.seed}; seconds"
    )
    print()
    print("| setup | users | answered | TTFT p50 | p99 | E2E p50 | p99 | output tok/s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for label, policy, cap in setups(args.cap, args.open_cap):
        result = run(policy, load, args.engines, cap, args.seed)
        for line in rows(label, result.measurements):
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
