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

With ``--weight W`` it runs a second experiment instead: two batch users, ``batch-a`` and
``batch-b``, each sending ``--heavy-rate`` requests a second of the heavy user's kind
(together four times what the fleet serves), under ``fifo``, ``fair``, and ``fair`` with
``user_weights = {batch-a = W}``. Its table gives each user's share of the work started
in the second half of the arrivals, when both users' requests wait in the control plane:
the output tokens of the requests whose first token came then.

Everything runs on virtual time, so the figures are exact and repeatable. With ``--http``
the same setups run over real processes instead: two ``sage-llm engine-sim`` processes
(fresh for each setup) behind ``sage-llm serve``, the workload sent over HTTP by the load
generator (the user as ``x-sage-user``), at ``--speed`` times real time (engines and
arrivals; every measured time multiplied back into simulated seconds).

* heavy user: ``--heavy-rate`` requests a second (8), prompts of 1,000–3,000 tokens, answers of
  200–600;
* light users: ``--light-rate`` requests a second (2) between the eight of them (chosen at
  random), prompts of 100–600 tokens, answers of 50–200;
* both for ``--duration-s`` seconds of arrivals; the run goes on until every request has
  ended.

Run from the repository root (about a minute)::

    .venv/bin/python benchmarks/fair_share.py
    .venv/bin/python benchmarks/fair_share.py --heavy-rate 1.5   # no overload
    .venv/bin/python benchmarks/fair_share.py --http --duration-s 60   # over HTTP, ~10 min
    .venv/bin/python benchmarks/fair_share.py --weight 2   # two batch users, one weighted
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from sage_llm.bench.cli_args import above, at_least
from sage_llm.bench.compare import rescale, sage_gateway
from sage_llm.bench.inprocess import Preset, run_preset
from sage_llm.bench.loadgen import run_http_workload
from sage_llm.bench.procs import start_engine_sims
from sage_llm.bench.report import latency_cells
from sage_llm.bench.stats import RequestMeasurement
from sage_llm.bench.workloads import Workload, scale_rate, synthetic
from sage_llm.types import ExecutionInstance

MODEL = "llama-3-8b"
LIGHT_USERS = 8
BATCH_USERS = ("batch-a", "batch-b")


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


def batch_workload(rate: float, duration_s: float, seed: int) -> Workload:
    """Two batch users, ``batch-a`` and ``batch-b``, each sending ``rate`` requests a
    second of the heavy user's kind, merged by arrival."""
    requests = []
    for n, user in enumerate(BATCH_USERS):
        one = synthetic(
            max(1, round(rate * duration_s)), rate, "uniform:1000,3000",
            "uniform:200,600", seed=seed + n, name=user,
        )  # fmt: skip
        requests += [replace(r, user_id=user) for r in one.requests]
    requests.sort(key=lambda r: r.arrival_s)
    return Workload("fair_share_batch", tuple(requests), "2 batch users")


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


Setup = tuple[str, str, int, dict[str, Any]]
"""A run: its label, policy, ``max_concurrent_requests`` and policy parameters."""


def setups(cap: int, open_cap: int) -> list[Setup]:
    """The flood's runs."""
    return [
        (f"fifo, cap {open_cap}", "fifo", open_cap, {}),
        (f"fifo, cap {cap}", "fifo", cap, {}),
        (f"fair, cap {cap}", "fair", cap, {}),
        (f"adaptive, cap {cap}", "adaptive", cap, {}),
    ]


def weighted_setups(cap: int, weight: float) -> list[Setup]:
    """The ``--weight`` runs."""
    weights = {"user_weights": {BATCH_USERS[0]: weight}}
    return [
        (f"fifo, cap {cap}", "fifo", cap, {}),
        (f"fair, cap {cap}", "fair", cap, {}),
        (f"fair, {BATCH_USERS[0]} weight {weight:g}, cap {cap}", "fair", cap, weights),
    ]


def run(
    policy: str,
    load: Workload,
    engines: int,
    cap: int,
    seed: int,
    params: dict[str, Any] | None = None,
) -> list[RequestMeasurement]:
    """The setup's measurements, in process on virtual time."""
    preset = Preset(policy, policy, "load_balanced", policy_params=dict(params or {}))
    return list(run_preset(preset, load, lambda: fleet(engines, cap), seed=seed).measurements)


async def run_http(
    policy: str,
    load: Workload,
    engines: int,
    cap: int,
    seed: int,
    speed: float,
    logs: Path,
    params: dict[str, Any] | None = None,
) -> list[RequestMeasurement]:
    """The setup's measurements over real processes: fresh engine-sim processes (L40S,
    ``speed`` times real time) behind ``sage-llm serve``; times in simulated seconds."""
    preset = Preset(policy, policy, "load_balanced", policy_params=dict(params or {}))
    async with (
        await start_engine_sims(
            engines, model=MODEL, gpu="l40s", speed=speed, log_dir=logs
        ) as engine_fleet,
        sage_gateway(
            preset, engine_fleet.urls, model=MODEL, max_concurrent=cap, log_dir=logs, seed=seed
        ) as gateway,
    ):
        report = await run_http_workload(gateway.url, scale_rate(load, speed), model=MODEL)
    return rescale(report.measurements, speed)


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


def second_half(
    measurements: Iterable[RequestMeasurement], duration_s: float
) -> dict[str, list[RequestMeasurement]]:
    """Per batch user, its answered requests whose first token came in the second half of
    the arrivals (``duration_s`` / 2 to ``duration_s`` after the first arrival: over HTTP
    the times are the load generator's, from another origin)."""
    ms = list(measurements)
    out: dict[str, list[RequestMeasurement]] = {user: [] for user in BATCH_USERS}
    if not ms:
        return out
    start = min(m.arrival_s for m in ms)
    for m in ms:
        first = m.first_token_s
        if m.ok and first is not None and duration_s / 2 <= first - start <= duration_s:
            out.setdefault(m.user_id or "", []).append(m)
    return out


def share_rows(
    label: str, measurements: Iterable[RequestMeasurement], duration_s: float
) -> list[str]:
    """Per batch user: answered, its requests started in the second half of the arrivals,
    their output tokens a second over that half and their share of both users', and the
    TTFT p50 of all its answered requests."""
    ms = list(measurements)
    started = second_half(ms, duration_s)
    tokens = {user: sum(m.output_tokens for m in started[user]) for user in BATCH_USERS}
    total = sum(tokens.values())
    out = []
    for user in BATCH_USERS:
        mine = [m for m in ms if m.user_id == user]
        ttft = sorted(
            m.first_token_s - m.arrival_s for m in mine if m.ok and m.first_token_s is not None
        )
        p50 = f"{ttft[len(ttft) // 2]:.2f}" if ttft else "–"
        share = f"{tokens[user] / total:.0%}" if total else "–"
        answered = sum(1 for m in mine if m.ok)
        out.append(
            f"| {label} | {user} | {answered}/{len(mine)} | {len(started[user])} "
            f"| {tokens[user] / (duration_s / 2):,.0f} | {share} | {p50} |"
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
    parser.add_argument(
        "--weight", type=above(0.0), default=None, help="two batch users, batch-a of this weight"
    )
    parser.add_argument("--http", action="store_true", help="over real processes (HTTP)")
    parser.add_argument(
        "--speed", type=above(0.0), default=1.0, help="with --http: engines and arrivals"
    )
    args = parser.parse_args(argv)
    if args.weight is not None:
        return main_weighted(args)
    load = workload(args.heavy_rate, args.light_rate, args.duration_s, args.seed)
    print(
        f"{args.engines} simulated L40S (Llama-3-8B), load_balanced; heavy user "
        f"{args.heavy_rate:g} req/s, {LIGHT_USERS} light users "
        f"{args.light_rate:g} req/s together, {args.duration_s:g} s of arrivals "
        f"({len(load)} requests), seed {args.seed}; seconds"
        + (f"; over HTTP at speed {args.speed:g}" if args.http else "; in process")
    )
    head = "setup | users | answered | TTFT p50 | p99 | E2E p50 | p99 | output tok/s"
    print_table(args, load, head, setups(args.cap, args.open_cap), rows)
    return 0


def print_table(
    args: argparse.Namespace,
    load: Workload,
    head: str,
    runs: Iterable[Setup],
    rows_of: Callable[[str, list[RequestMeasurement]], list[str]],
) -> None:
    """Run each setup on ``load`` (in process, or over HTTP with ``--http``, the processes'
    logs in a new directory, said) and print its rows under the markdown header ``head``
    (its columns ``|``-separated, the first two left-aligned)."""
    logs = Path(tempfile.mkdtemp(prefix="fair-share-"))
    if args.http:
        print(f"(the processes' logs: {logs})")
    print()
    columns = head.count("|") + 1
    print(f"| {head} |")
    print("|---|---|" + "---:|" * (columns - 2))
    for label, policy, cap, params in runs:
        if args.http:
            measured = asyncio.run(
                run_http(policy, load, args.engines, cap, args.seed, args.speed, logs, params)
            )
        else:
            measured = run(policy, load, args.engines, cap, args.seed, params)
        for line in rows_of(label, measured):
            print(line, flush=True)


def main_weighted(args: argparse.Namespace) -> int:
    load = batch_workload(args.heavy_rate, args.duration_s, args.seed)
    print(
        f"{args.engines} simulated L40S (Llama-3-8B), load_balanced; {len(BATCH_USERS)} batch "
        f"users {args.heavy_rate:g} req/s each, {args.duration_s:g} s of arrivals "
        f"({len(load)} requests), seed {args.seed}; work started in the 2nd half of arrivals"
        + (f"; over HTTP at speed {args.speed:g}" if args.http else "; in process")
    )
    head = "setup | user | answered | started in 2nd half | their tok/s | share | TTFT p50 (s)"
    runs = weighted_setups(args.cap, args.weight)
    print_table(args, load, head, runs, lambda label, ms: share_rows(label, ms, args.duration_s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
