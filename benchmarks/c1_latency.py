"""The latency a proxy adds at concurrency 1, and what the machine does to it (issue #4).

The proxy bench (:mod:`sage_llm.bench.proxy_bench`) measures a proxy's added p50 latency
at concurrency 1 behind ``engine-sim --instant`` engines, between its concurrency-64
runs. This script measures that latency alone, with the conditions around it as options,
to tell what a proxy adds from what the machine adds:

* ``--after-c64``: before each target's concurrency-1 run, a concurrency-64 run of 2,000
  requests through the same kind of target in front of two ``engine-sim --speed 1000``
  processes (as the proxy bench runs them one after the other);
* ``--pin ENGINE_CPU,PROXY_CPU``: the concurrency-1 engines on one core and the proxies
  on another (``taskset``; the client is left to the scheduler);
* ``--baseline-src DIR``: one more target, ``sage-llm serve`` run from another checkout's
  ``src`` (``engine_stream = "client"``, as the target ``sage-llm serve`` here);
* ``--warmup N``: unmeasured requests before each measured run (the proxy bench's
  :data:`~sage_llm.bench.proxy_bench.C1_WARMUP` unless given; before the thirty-first
  round of docs/benchmarks.md, 5, and ``--warmup 5`` measures as those rounds did).

Targets: ``direct`` (the first engine), ``sage-llm serve`` (``engine_stream =
"client"``), ``python-forwarder`` (:mod:`sage_llm.bench.forwarder`) and ``--peers``. Every
round runs each target once, in a new order (each target takes its turn first), with the
proxy bench's client in its own process (``--requests`` requests after 5 warm-up ones),
and prints its p50 latency, its p50 time to the first chunk and the share of its streams
that came split (:func:`split_share`); the summary gives each target's medians over the
rounds and its added latency (its median minus ``direct``'s). Linux only (``taskset``).
Run from the repository root::

    .venv/bin/python benchmarks/c1_latency.py --mode stream --rounds 5
    .venv/bin/python benchmarks/c1_latency.py --mode stream --rounds 3 --after-c64
    .venv/bin/python benchmarks/c1_latency.py --mode stream --after-c64 --pin 0,1
    .venv/bin/python benchmarks/c1_latency.py --baseline-src /tmp/base/src --rounds 5
    .venv/bin/python benchmarks/c1_latency.py --mode stream --rounds 6 --warmup 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
from collections.abc import Sequence
from pathlib import Path

from sage_llm.bench.procs import EngineFleet, start_engine_sims
from sage_llm.bench.proxy_bench import (
    C1_WARMUP,
    FORWARDER,
    ProxyTarget,
    bench_gateway,
    check_proxy_options,
    client_process,
    proxy_targets,
)
from sage_llm.errors import ConfigError

LOG_DIR = Path("bench-out/c1_latency")
SAGE = "sage-llm serve, engine_stream=client"
BASELINE = "sage-llm serve @ baseline"
SPLIT_S = 0.15e-3
"""A stream whose end came this much after its first piece counts as split."""


def _pin(pid: int, cpu: str) -> None:
    """Every thread of process ``pid`` (and its children's, by process group) on ``cpu``."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (proc / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[2]) == pid:  # its process group
                subprocess.run(
                    ["taskset", "-a", "-p", "-c", cpu, proc.name],
                    stdout=subprocess.DEVNULL, check=False,
                )  # fmt: skip


Run = tuple[float, float | None, float | None]
"""One target's round: p50 ms, TTFT p50 ms and :func:`split_share` (None without streams)."""


async def _targets(
    stack: contextlib.AsyncExitStack,
    fleet: EngineFleet,
    peers: Sequence[str],
    baseline: Path | None,
    log_dir: Path,
) -> dict[str, ProxyTarget]:
    targets = dict(await stack.enter_async_context(proxy_targets(fleet.urls, peers, log_dir)))
    targets.pop("sage-llm serve", None)  # engine_stream = "client" only, as the baseline
    if baseline is not None:
        env = {**os.environ, "PYTHONPATH": str(baseline)}
        gw = await stack.enter_async_context(
            bench_gateway(fleet.urls, log_dir, engine_stream="client", env=env)
        )
        targets[BASELINE] = ProxyTarget(gw.url, gw.pid)
    return targets


async def run(
    *,
    modes: Sequence[bool],
    rounds: int,
    requests: int,
    warmup: int,
    peers: Sequence[str],
    after_c64: bool,
    pin: tuple[str, str] | None,
    baseline: Path | None,
) -> dict[tuple[str, bool], list[Run]]:
    """``{(target, stream): [(p50 ms, TTFT p50 ms or None, split share or None) of each
    round]}``, the targets in a new order each round (each takes its turn first)."""
    out: dict[tuple[str, bool], list[Run]] = {}
    async with contextlib.AsyncExitStack() as stack:
        loaded: dict[str, ProxyTarget] = {}
        if after_c64:
            sims = await stack.enter_async_context(
                await start_engine_sims(2, speed=1000.0, log_dir=LOG_DIR)
            )
            loaded = await _targets(stack, sims, peers, baseline, LOG_DIR / "c64")
        fleet = await stack.enter_async_context(
            await start_engine_sims(2, extra_args=["--instant"], log_dir=LOG_DIR)
        )
        targets = await _targets(stack, fleet, peers, baseline, LOG_DIR / "c1")
        if pin is not None:
            for engine in fleet.engines:
                _pin(engine.pid, pin[0])
            for target in targets.values():
                if target.pgid is not None:
                    _pin(target.pgid, pin[1])
        names = list(targets)
        for k in range(rounds):
            order = names[k % len(names) :] + names[: k % len(names)]  # each its turn first
            for stream in modes:
                for name in order:
                    result = await client_process(
                        targets[name].url, 1, requests, stream, warmup=warmup
                    )
                    p50 = statistics.median(result.latencies_s) * 1000.0
                    ttft = statistics.median(result.ttfts_s) * 1000.0 if result.ttfts_s else None
                    split = split_share(result.latencies_s, result.ttfts_s)
                    out.setdefault((name, stream), []).append((p50, ttft, split))
                    shown = "-" if ttft is None else f"{ttft:.3f}"
                    late = "" if split is None else f"  split {split:.0%}"
                    mode = "stream" if stream else "plain"
                    print(
                        f"round {k + 1}  {name:38s} {mode:6s} p50 {p50:.3f} ms  TTFT {shown}{late}"
                    )
                    if name in loaded:
                        await client_process(loaded[name].url, 64, 2000, stream)
    return out


def split_share(latencies_s: Sequence[float], ttfts_s: Sequence[float]) -> float | None:
    """The share of a run's streams whose end came more than :data:`SPLIT_S` after their
    first piece (None without streams). Behind the instant engines a stream's end comes
    with or just after its first piece, or, when the client went to sleep in between, a
    wake-up later: the share tells the two apart where a p50 flips between them."""
    if not ttfts_s:
        return None
    pairs = list(zip(latencies_s, ttfts_s, strict=True))
    return sum(1 for end, first in pairs if end - first > SPLIT_S) / len(pairs)


def summary(results: dict[tuple[str, bool], list[Run]]) -> list[str]:
    """One line per target and mode: the medians over the rounds, and the added latency."""
    lines = []
    for (name, stream), runs in results.items():
        p50 = statistics.median(r[0] for r in runs)
        ttfts = [r[1] for r in runs if r[1] is not None]
        splits = [r[2] for r in runs if r[2] is not None]
        direct = results.get(("direct", stream))
        added = ""
        if direct is not None and name != "direct":
            added = f"  added {p50 - statistics.median(r[0] for r in direct):.3f} ms"
        ttft = f"  TTFT {statistics.median(ttfts):.3f} ms" if ttfts else ""
        split = f"  split {statistics.median(splits):.0%}" if splits else ""
        mode = "stream" if stream else "plain"
        lines.append(f"{name:38s} {mode:6s} p50 {p50:.3f} ms{ttft}{added}{split}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("both", "plain", "stream"), default="both")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument(
        "--warmup", type=int, default=C1_WARMUP, help="unmeasured requests before each run"
    )
    parser.add_argument("--peers", nargs="*", default=[FORWARDER])
    parser.add_argument("--after-c64", action="store_true")
    parser.add_argument("--pin", default=None, help="ENGINE_CPU,PROXY_CPU (e.g. 0,1)")
    parser.add_argument("--baseline-src", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.requests < 1:
        parser.error("--rounds and --requests must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    try:  # before any engine or gateway starts
        check_proxy_options(args.peers, 0)
    except ConfigError as exc:
        parser.error(f"--peers: {exc.detail}")
    pin = None
    if args.pin is not None:
        cpus = args.pin.split(",")
        if len(cpus) != 2 or not all(c.isascii() and c.isdigit() for c in cpus):
            parser.error(f"--pin {args.pin}: expected ENGINE_CPU,PROXY_CPU such as 0,1")
        free = os.sched_getaffinity(0)
        missing = [c for c in cpus if int(c) not in free]
        if missing:  # taskset would fail, and the run go on unpinned, unsaid
            parser.error(f"--pin {args.pin}: CPU {missing[0]} is not one this process may use")
        pin = (cpus[0], cpus[1])
    if args.baseline_src is not None and not (args.baseline_src / "sage_llm").is_dir():
        parser.error(f"--baseline-src {args.baseline_src}: no sage_llm package in it")
    modes = {"both": (False, True), "plain": (False,), "stream": (True,)}[args.mode]
    baseline = None if args.baseline_src is None else args.baseline_src.resolve()
    results = asyncio.run(
        run(
            modes=modes, rounds=args.rounds, requests=args.requests, warmup=args.warmup,
            peers=args.peers,
            after_c64=args.after_c64, pin=pin, baseline=baseline,
        )
    )  # fmt: skip
    print(f"\nmedians of {args.rounds} rounds of {args.requests} requests at concurrency 1")
    for line in summary(results):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
