"""Where the CPU goes in the proxy benchmark, per request and per process (issue #4 item 6).

The proxy bench (:mod:`sage_llm.bench.proxy_bench`) runs the load client, the proxy and
two ``engine-sim`` processes on the same cores, so a proxy's req/s at concurrency 64 is
bounded by the CPU that *all* of them spend per request, not by the proxy alone. This
script shows that budget. For each target (the first engine ``direct``, ``sage-llm serve``
with ``engine_stream`` ``sampled`` (the default) and ``client``, the Rust routers and the
minimal python-forwarder, :mod:`sage_llm.bench.forwarder`) and each mode (non-streaming,
streaming) it runs one closed-loop client process (the proxy bench's
client: ``concurrency`` requests in flight, 4 output tokens) and reports:

* ``req/s`` of that run;
* CPU milliseconds per completed request of the **engines** (both together), the
  **proxy** (its whole process group: every thread and child), and the **client** (its
  own ``process_time`` over the measured requests), and their **sum**;
* ``busy``: how much of the machine was in use during the run (``/proc/stat``, all
  processes, this script's and anyone else's), as a fraction of all cores.

When ``busy`` is close to 1 the run was CPU-bound, and ``req/s × sum`` is close to the
number of cores: a proxy then gains req/s only by spending less CPU per request itself,
and every process's CPU counts. Linux only (``/proc``). Run from the repository root::

    .venv/bin/python benchmarks/cpu_budget.py                       # all targets
    .venv/bin/python benchmarks/cpu_budget.py --peers vllm-router --requests 3000
    .venv/bin/python benchmarks/cpu_budget.py --json bench-out/cpu_budget.json

``--rounds N`` measures every target N times, the targets interleaved (round 1 of each,
then round 2 …), and reports each figure's median over the rounds: one run per target is
not enough to compare two of them on a shared machine. ``--baseline-src DIR`` adds one more
target, ``sage-llm serve @ baseline`` (``engine_stream = "client"``), run from the source
tree ``DIR`` (another checkout's ``src``, through ``PYTHONPATH``), to measure a change
against the commit before it side by side::

    git worktree add /tmp/base <commit>
    .venv/bin/python benchmarks/cpu_budget.py --peers --rounds 5 --baseline-src /tmp/base/src

``--split N`` adds the target ``sage-llm serve xN``: N gateway processes
(``engine_stream = "client"``), each over the whole fleet, with the client's in-flight
requests spread evenly over them (as a kernel spreading connections over workers that
share a port would). Each process keeps its own control-plane state and nothing is
shared, so this is the most that N worker processes could gain on the machine; the
``proxy`` column is the CPU of all N together::

    .venv/bin/python benchmarks/cpu_budget.py --peers --mode plain --rounds 5 --split 2

The peers are installed on first use (as for the proxy bench). Logs go to
``bench-out/cpu_budget/``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from sage_llm.bench.cli_args import at_least, check_out
from sage_llm.bench.procs import group_cpu_s, start_engine_sims
from sage_llm.bench.proxy_bench import (
    DEFAULT_PEERS,
    ProxyTarget,
    bench_gateway,
    check_proxy_options,
    client_process,
    proxy_targets,
)
from sage_llm.errors import ConfigError

MODEL = "llama-3-8b"
LOG_DIR = Path("bench-out/cpu_budget")


@dataclass(frozen=True)
class BudgetRow:
    """One closed-loop run against one target (CPU in ms per completed request)."""

    target: str
    stream: bool
    requests: int
    errors: int
    req_per_s: float
    engines_ms: float
    proxy_ms: float | None
    client_ms: float
    total_ms: float
    busy: float


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all cores so far, from the first line of ``/proc/stat``."""
    with open("/proc/stat", encoding="ascii") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # user … steal (guest time is counted in user already)
    return total - idle, total


@dataclass(frozen=True)
class Target:
    """Where a target's traffic goes (one base URL, or several the client's in-flight
    requests are spread over) and the process groups whose CPU is the proxy's (none: the
    engine itself)."""

    urls: tuple[str, ...]
    pgids: tuple[int, ...]

    @classmethod
    def of(cls, target: ProxyTarget) -> Target:
        return cls((target.url,), () if target.pgid is None else (target.pgid,))


async def measure_one(
    name: str,
    target: Target,
    *,
    stream: bool,
    engine_pgids: Sequence[int],
    concurrency: int,
    requests: int,
    prompt_tokens: int = 0,
) -> BudgetRow:
    """One measured run (after a short unmeasured warm-up)."""
    urls, proxies = target.urls, target.pgids
    await client_process(urls, concurrency, 200, stream, prompt_tokens=prompt_tokens)
    engines_before = sum(group_cpu_s(p) for p in engine_pgids)
    proxy_before = sum(group_cpu_s(p) for p in proxies)
    busy_before, total_before = machine_ticks()
    data = await client_process(urls, concurrency, requests, stream, prompt_tokens=prompt_tokens)
    busy_after, total_after = machine_ticks()
    client_s = data.cpu_s
    engines_s = sum(group_cpu_s(p) for p in engine_pgids) - engines_before
    proxy_s = sum(group_cpu_s(p) for p in proxies) - proxy_before if proxies else None
    done = max(1, data.requests - data.errors)
    per = 1000.0 / done
    total = engines_s + (proxy_s or 0.0) + client_s
    return BudgetRow(
        target=name,
        stream=stream,
        requests=data.requests,
        errors=data.errors,
        req_per_s=data.req_per_s,
        engines_ms=engines_s * per,
        proxy_ms=None if proxy_s is None else proxy_s * per,
        client_ms=client_s * per,
        total_ms=total * per,
        busy=(busy_after - busy_before) / max(1, total_after - total_before),
    )


BASELINE = "sage-llm serve @ baseline"


@contextlib.asynccontextmanager
async def _baseline(urls: Sequence[str], src: Path | None) -> AsyncIterator[dict[str, Target]]:
    """The ``--baseline-src`` target (none without it); ``src`` is an absolute path."""
    if src is None:
        yield {}
        return
    env = {**os.environ, "PYTHONPATH": str(src)}
    async with bench_gateway(urls, LOG_DIR, engine_stream="client", env=env) as gw:
        yield {BASELINE: Target((gw.url,), (gw.pid,))}


def split_name(processes: int) -> str:
    """The name of the ``--split`` target."""
    return f"sage-llm serve x{processes}, engine_stream=client"


@contextlib.asynccontextmanager
async def _split(urls: Sequence[str], processes: int) -> AsyncIterator[dict[str, Target]]:
    """The ``--split N`` target (none for N below 2): N ``sage-llm serve`` processes
    (``engine_stream = "client"``), each over the whole fleet, the client's in-flight
    requests spread evenly over them."""
    if processes < 2:
        yield {}
        return
    async with contextlib.AsyncExitStack() as stack:
        gateways = [
            await stack.enter_async_context(bench_gateway(urls, LOG_DIR, engine_stream="client"))
            for _ in range(processes)
        ]
        target = Target(tuple(g.url for g in gateways), tuple(g.pid for g in gateways))
        yield {split_name(processes): target}


def median_row(rows: Sequence[BudgetRow]) -> BudgetRow:
    """One target's rounds in one mode: each figure's median (requests and errors summed)."""
    first = rows[0]

    def med(values: Sequence[float]) -> float:
        return float(statistics.median(values))

    proxies = [r.proxy_ms for r in rows if r.proxy_ms is not None]
    return BudgetRow(
        target=first.target,
        stream=first.stream,
        requests=sum(r.requests for r in rows),
        errors=sum(r.errors for r in rows),
        req_per_s=med([r.req_per_s for r in rows]),
        engines_ms=med([r.engines_ms for r in rows]),
        proxy_ms=med(proxies) if proxies else None,
        client_ms=med([r.client_ms for r in rows]),
        total_ms=med([r.total_ms for r in rows]),
        busy=med([r.busy for r in rows]),
    )


async def run(
    *,
    peers: Sequence[str],
    concurrency: int,
    requests: int,
    modes: Sequence[bool],
    rounds: int = 1,
    baseline_src: Path | None = None,
    split: int = 1,
    prompt_tokens: int = 0,
) -> tuple[list[BudgetRow], list[BudgetRow]]:
    """Every target in every mode, ``rounds`` times interleaved: the median row of each, and
    every run's row."""
    runs: dict[tuple[str, bool], list[BudgetRow]] = {}
    async with (
        await start_engine_sims(2, model=MODEL, speed=1000.0, log_dir=LOG_DIR) as fleet,
        proxy_targets(fleet.urls, peers, LOG_DIR) as targets,
        _baseline(fleet.urls, baseline_src) as extra,
        _split(fleet.urls, split) as several,
    ):
        engine_pgids = [e.pid for e in fleet.engines]
        every = {**{k: Target.of(t) for k, t in targets.items()}, **extra, **several}
        for stream in modes:
            for _round in range(rounds):
                for name, target in every.items():
                    row = await measure_one(
                        name, target, stream=stream, engine_pgids=engine_pgids,
                        concurrency=concurrency, requests=requests,
                        prompt_tokens=prompt_tokens,
                    )  # fmt: skip
                    runs.setdefault((name, stream), []).append(row)
    return [median_row(rows) for rows in runs.values()], [r for rows in runs.values() for r in rows]


def render(rows: Sequence[BudgetRow], concurrency: int) -> str:
    """The rows as a fixed-width text table."""
    head = (
        f"{'target':<42}{'mode':<8}{'req/s':>7}{'engines':>9}{'proxy':>8}{'client':>8}"
        f"{'sum':>7}{'busy':>6}{'err':>5}"
    )
    lines = [f"CPU ms per request, concurrency {concurrency} ({os.cpu_count()} cores)", head]
    for r in rows:
        proxy = "-" if r.proxy_ms is None else f"{r.proxy_ms:.2f}"
        lines.append(
            f"{r.target:<42}{'stream' if r.stream else 'plain':<8}{r.req_per_s:>7.0f}"
            f"{r.engines_ms:>9.2f}{proxy:>8}{r.client_ms:>8.2f}{r.total_ms:>7.2f}"
            f"{r.busy:>6.2f}{r.errors:>5d}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", nargs="*", default=list(DEFAULT_PEERS))
    parser.add_argument("--concurrency", type=at_least(1), default=64)
    parser.add_argument("--requests", type=at_least(1), default=2000)
    parser.add_argument("--mode", choices=("both", "plain", "stream"), default="both")
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        help="also write the median rows and every run's row here (JSON)",
    )
    parser.add_argument(
        "--rounds", type=at_least(1), default=1,
        help="runs per target, interleaved; medians reported",
    )  # fmt: skip
    parser.add_argument(
        "--baseline-src", type=Path, default=None,
        help="also run sage-llm serve from this source tree (another checkout's src)",
    )  # fmt: skip
    parser.add_argument(
        "--split", type=at_least(1), default=1, metavar="N",
        help="also run N sage-llm serve processes (N >= 2), each over the whole fleet, the "
        "client's in-flight requests spread over them",
    )  # fmt: skip
    parser.add_argument(
        "--prompt-tokens", type=at_least(0), default=0,
        help="tokens in every request's prompt (0: the proxy bench's 14-token prompt)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    check_out(parser, "--json", args.json)
    try:
        check_proxy_options(args.peers, args.prompt_tokens)
    except ConfigError as exc:
        parser.error(f"--{(exc.key or '').replace('_', '-')}: {exc.detail}")
    if args.baseline_src is not None and not (args.baseline_src / "sage_llm").is_dir():
        parser.error(f"--baseline-src {args.baseline_src}: no sage_llm package in it")
    modes = {"both": (False, True), "plain": (False,), "stream": (True,)}[args.mode]
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    baseline = None if args.baseline_src is None else args.baseline_src.resolve()
    job = run(
        peers=args.peers, concurrency=args.concurrency, requests=args.requests,
        modes=modes, rounds=args.rounds, baseline_src=baseline, split=args.split,
        prompt_tokens=args.prompt_tokens,
    )  # fmt: skip
    rows, every_run = asyncio.run(job)
    print(render(rows, args.concurrency))
    if args.rounds > 1:
        print(f"(each figure: the median of {args.rounds} interleaved runs)")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        out = {"medians": [asdict(r) for r in rows], "runs": [asdict(r) for r in every_run]}
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
