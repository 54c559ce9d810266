"""Failover under load: streamed requests through the gateway while one engine is killed.

Starts ``--engines`` ``sage-llm engine-sim`` processes, a control plane in HTTP mode over
them and the OpenAI gateway in-process, then sends ``--requests`` streamed
``/v1/completions`` calls open-loop at ``--rate`` per second. ``--kill-at`` seconds in,
engine 0 gets SIGKILL. Every request must end: completed (``[DONE]`` after the last token)
or failed with a reason (an HTTP error or an error event) — none hangs. Reported: outcome
counts, completion rate, and the time from the kill to the dead engine's circuit breaker
opening (read from the manager's status every 10 ms). Run::

    .venv/bin/python benchmarks/failover_load.py --requests 2000 --out failover.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import time
from typing import Any

import aiohttp

from sage_llm import ControlPlaneManager
from sage_llm.bench.cli_args import above, at_least, check_out
from sage_llm.bench.procs import loopback_instances, start_engine_sims
from sage_llm.control_plane.health import BreakerSettings, HealthSettings
from sage_llm.engines.http import HTTPTimeouts
from sage_llm.gateway.server import start_gateway

MODEL = "llama-3-8b"


async def one(
    session: aiohttp.ClientSession, url: str, i: int, max_tokens: int, timeout_s: float
) -> str:
    """One streamed request: 'ok', 'failed: <reason>' or 'hung'."""
    body = {
        "model": MODEL, "prompt": f"request {i}: " + "tell me a story " * 16,
        "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
    }  # fmt: skip
    try:
        async with asyncio.timeout(timeout_s):
            async with session.post(url, json=body) as resp:
                if resp.status != 200:
                    return f"failed: HTTP {resp.status}"
                async for raw in resp.content:
                    line = raw.strip()
                    if line == b"data: [DONE]":
                        return "ok"
                    if line.startswith(b"data:") and b'"error"' in line:
                        return "failed: error event"
                return "failed: stream closed without [DONE]"
    except TimeoutError:
        return "hung"
    except aiohttp.ClientError as exc:
        return f"failed: {type(exc).__name__}"


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark; returns the report."""
    fleet = await start_engine_sims(args.engines, model=MODEL, speed=args.speed)
    health = HealthSettings(
        interval_s=1.0,
        timeout_s=0.5,
        breaker=BreakerSettings(failure_threshold=3, base_cooldown_s=1.0, max_cooldown_s=30.0),
    )
    cp = ControlPlaneManager(
        scheduling_policy="fifo", routing_strategy="load_balanced", mode="http",
        enable_pd_separation=False, health=health, max_retries=3, seed=0,
        engine_timeouts=HTTPTimeouts(connect_s=3.0, first_token_s=10.0, idle_s=5.0),
    )  # fmt: skip
    for instance in loopback_instances(fleet.engines, MODEL, max_concurrent_requests=args.slots):
        cp.register_instance(instance)
    victim = fleet.engines[0]
    await cp.start()
    runner, port = await start_gateway(cp)
    url = f"http://127.0.0.1:{port}/v1/completions"
    killed_at: float | None = None
    opened_at: float | None = None

    async def killer() -> None:
        nonlocal killed_at, opened_at
        await asyncio.sleep(args.kill_at)
        os.killpg(victim.pid, signal.SIGKILL)
        killed_at = time.perf_counter()
        while cp.get_status()["circuits"].get("engine-0") != "open":  # noqa: ASYNC110 - polling
            await asyncio.sleep(0.01)
        opened_at = time.perf_counter()

    try:
        kill_task = asyncio.create_task(killer())
        start = time.perf_counter()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            tasks = []
            for i in range(args.requests):
                delay = start + i / args.rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(
                    asyncio.create_task(one(session, url, i, args.max_tokens, args.timeout_s))
                )
            outcomes = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        # the circuit opens within 30 s of the kill, or the report says it did not (null)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(kill_task, 30)
        status = cp.get_status()
        metrics = cp.get_instance_metrics("engine-0")
    finally:
        await runner.cleanup()
        await cp.stop()
        await fleet.aclose()
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o] = counts.get(o, 0) + 1
    ok = counts.get("ok", 0)
    return {
        "requests": args.requests,
        "engines": args.engines,
        "rate_req_s": args.rate,
        "duration_s": duration,
        "outcomes": counts,
        "completed_pct": 100.0 * ok / args.requests,
        "hung": counts.get("hung", 0),
        "lost": args.requests - sum(counts.values()),
        "kill_to_open_s": None if opened_at is None or killed_at is None else opened_at - killed_at,
        "dead_engine_circuit": metrics["circuit"],
        "circuits_at_end": status["circuits"],
    }


def main() -> None:
    """Command line entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=at_least(1), default=2000)
    p.add_argument("--engines", type=at_least(2), default=4)
    p.add_argument("--rate", type=above(0), default=100.0, help="requests per second")
    p.add_argument("--kill-at", type=above(0), default=5.0, help="seconds before the kill")
    p.add_argument("--speed", type=above(0), default=10.0, help="engine-sim speed factor")
    p.add_argument(
        "--slots", type=at_least(1), default=64, help="max concurrent requests per engine"
    )
    p.add_argument("--max-tokens", type=at_least(1), default=32)
    p.add_argument("--timeout-s", type=above(0), default=60.0, help="a request slower hangs")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    check_out(p, "--out", args.out)
    arrivals_s = args.requests / args.rate
    if args.kill_at >= arrivals_s:  # a kill after the last arrival measures no failover
        p.error(
            f"--kill-at {args.kill_at:g}: the requests arrive within {arrivals_s:g} s "
            "(--requests / --rate); kill an engine while they do"
        )
    report = asyncio.run(run(args))
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
