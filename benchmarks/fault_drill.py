"""Fault drill: requests through the gateway while one engine hangs or fails its requests.

Starts ``--engines`` ``sage-llm engine-sim`` processes, engine 0 with a fault from
``--at`` seconds in (``--fault``):

* ``hang``: its streams stop and its ``/health`` stalls (``hang@AT``): the calls on it
  wait, and its probes time out;
* ``gray``: every request it gets fails with HTTP 500 while its ``/health`` still passes
  (``error=500@p1``, from the start: a scheduled error fails the probes too);
* ``drop``: it drops the connection of every request without an answer
  (``truncate=0@AT``), its ``/health`` passing;
* ``partial``: half of its requests fail with HTTP 500 from the start
  (``error=500@p0.5``), its probes passing;
* ``stall``: every request it gets hangs from the start while its ``/health`` and
  ``/metrics`` still answer (``hang@p1``): a wedged engine behind a live HTTP server. Only
  the stall check (``--stall-timeout-s``, 5 s in this drill; 0 turns it off) ejects it.

A control plane in HTTP mode over them (probes every 0.5 s, 0.3 s timeout, breaker
threshold 2) and the OpenAI gateway in-process take ``--requests`` calls to
``/v1/completions`` open-loop at ``--rate`` per second, answered whole unless
``--stream``. Reported: outcome counts, latency percentiles of the completed calls, how
many took longer than 5 s, the requests engine 0 failed (each was retried elsewhere or
failed), its breaker's transitions, and the time from the start of the load to its first
ejection (``first_open_s``); the fault's ``--at`` counts from engine 0's start, a moment
before the load's, so the report gives when the fault began from the load's start
(``fault_began_s``: between its two figures; an ``--at`` shorter than the start-up of the
other engines and the gateway makes the fault begin before the first request). ``gray``,
``partial`` and ``stall`` run from engine 0's start: they take no ``--at``, and their
``fault_began_s`` is that start.
``--no-move-on-eject`` runs with ``[health] move_on_eject = false``, to compare; with
``PYTHONPATH=<another checkout>/src`` the drill runs that checkout's code (engines
included). Run::

    .venv/bin/python benchmarks/fault_drill.py --fault hang --requests 400 --rate 20
    .venv/bin/python benchmarks/fault_drill.py --fault hang --no-move-on-eject --timeout-s 30
    .venv/bin/python benchmarks/fault_drill.py --fault gray --requests 600 --rate 20
    .venv/bin/python benchmarks/fault_drill.py --fault stall --requests 400 --rate 20
    .venv/bin/python benchmarks/fault_drill.py --fault stall --stall-timeout-s 0 --timeout-s 30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

import aiohttp

from sage_llm import ControlPlaneManager
from sage_llm.bench.cli_args import above, at_least, at_least_number, check_out
from sage_llm.bench.procs import loopback_instances, start_engine_sims
from sage_llm.control_plane.health import BreakerSettings, HealthSettings
from sage_llm.engines.http import HTTPTimeouts
from sage_llm.gateway.server import start_gateway

MODEL = "llama-3-8b"
FAULTS = ("hang", "gray", "drop", "partial", "stall")
TIMED_FAULTS = ("hang", "drop")
"""The faults that begin ``--at`` seconds in; the others run from engine 0's start."""
SLOW_S = 5.0
"""A completed call slower than this counts as held up by the fault."""


def fault_spec(fault: str, at: float) -> str:
    """engine-sim's ``--faults`` for a drill's ``fault`` starting ``at`` seconds in."""
    if fault == "hang":
        return f"hang@{at:g}"
    if fault == "gray":
        return "error=500@p1"
    if fault == "drop":
        return f"truncate=0@{at:g}"
    if fault == "partial":
        return "error=500@p0.5; seed=1"
    if fault == "stall":
        return "hang@p1"
    raise ValueError(f"unknown fault {fault!r}; expected one of {', '.join(FAULTS)}")


async def one(
    session: aiohttp.ClientSession, url: str, i: int, args: argparse.Namespace
) -> tuple[str, float]:
    """One call: ('ok' | 'failed: …' | 'hung', seconds)."""
    body = {
        "model": MODEL, "prompt": f"request {i}: " + "tell me a story " * 16,
        "max_tokens": args.max_tokens, "stream": args.stream, "ignore_eos": True,
    }  # fmt: skip
    start = time.perf_counter()
    try:
        async with asyncio.timeout(args.timeout_s):
            async with session.post(url, json=body) as resp:
                if resp.status != 200:
                    return f"failed: HTTP {resp.status}", time.perf_counter() - start
                if not args.stream:
                    answer = await resp.json()
                    ok = answer["choices"][0]["finish_reason"] is not None
                    return ("ok" if ok else "failed: no finish"), time.perf_counter() - start
                async for raw in resp.content:
                    line = raw.strip()
                    if line == b"data: [DONE]":
                        return "ok", time.perf_counter() - start
                    if line.startswith(b"data:") and b'"error"' in line:
                        return "failed: error event", time.perf_counter() - start
                return "failed: stream closed without [DONE]", time.perf_counter() - start
    except TimeoutError:
        return "hung", time.perf_counter() - start
    except aiohttp.ClientError as exc:
        return f"failed: {type(exc).__name__}", time.perf_counter() - start


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the drill; returns the report."""
    spawned = time.perf_counter()  # engine 0 arms its fault plan as its process starts
    faulty = await start_engine_sims(
        1, model=MODEL, speed=args.speed, extra_args=["--faults", fault_spec(args.fault, args.at)]
    )
    ready = time.perf_counter()
    healthy = await start_engine_sims(args.engines - 1, model=MODEL, speed=args.speed)
    # move_on_eject only when off: the drill also runs on checkouts from before it
    # (PYTHONPATH=<checkout>/src), to compare
    moving: dict[str, Any] = {} if args.move_on_eject else {"move_on_eject": False}
    stall = args.stall_timeout_s
    if stall is None and args.fault == "stall":
        stall = 5.0
    if stall is not None:  # else the default (and a checkout from before the check runs)
        moving["stall_timeout_s"] = stall or None
    health = HealthSettings(
        interval_s=0.5,
        timeout_s=0.3,
        breaker=BreakerSettings(failure_threshold=2, base_cooldown_s=0.5, max_cooldown_s=30.0),
        **moving,
    )
    cp = ControlPlaneManager(
        scheduling_policy="fifo", routing_strategy="round_robin", mode="http",
        enable_pd_separation=False, health=health, max_retries=3, seed=0,
        engine_timeouts=HTTPTimeouts(connect_s=3.0),
    )  # fmt: skip
    engines = [*faulty.engines, *healthy.engines]
    for instance in loopback_instances(engines, MODEL, max_concurrent_requests=args.slots):
        cp.register_instance(instance)
    await cp.start()
    runner, port = await start_gateway(cp)
    url = f"http://127.0.0.1:{port}/v1/completions"
    opened_at: float | None = None

    async def watch(start: float) -> None:
        nonlocal opened_at
        while cp.get_status()["circuits"].get("engine-0") != "open":  # noqa: ASYNC110 - polling
            await asyncio.sleep(0.01)
        opened_at = time.perf_counter() - start

    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            start = time.perf_counter()
            watcher = asyncio.create_task(watch(start))
            tasks = []
            for i in range(args.requests):
                delay = start + i / args.rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(session, url, i, args)))
            results = await asyncio.gather(*tasks)
            duration = time.perf_counter() - start
            watcher.cancel()
        metrics = cp.get_instance_metrics("engine-0")
        status = cp.get_status()
    finally:
        await runner.cleanup()
        await cp.stop()
        await faulty.aclose()
        await healthy.aclose()
    counts: dict[str, int] = {}
    for outcome, _ in results:
        counts[outcome] = counts.get(outcome, 0) + 1
    done = sorted(s for outcome, s in results if outcome == "ok")
    delay = args.at if args.fault in TIMED_FAULTS else 0.0
    return {
        "fault": args.fault,
        "spec": fault_spec(args.fault, args.at),
        "move_on_eject": args.move_on_eject,
        "stall_timeout_s": stall,
        "stream": args.stream,
        "requests": args.requests,
        "rate_req_s": args.rate,
        "duration_s": round(duration, 2),
        "outcomes": counts,
        "completed_s": {
            "p50": round(statistics.median(done), 3) if done else None,
            "p99": round(done[int(0.99 * (len(done) - 1))], 3) if done else None,
            "max": round(done[-1], 3) if done else None,
            f"over_{SLOW_S:g}_s": sum(1 for s in done if s > SLOW_S),
        },
        "engine0_failed_calls": metrics["failed_calls"],  # retried elsewhere, or failed
        "engine0_completed_requests": metrics["completed_requests"],
        "engine0_circuit": metrics["circuit"],
        "first_open_s": None if opened_at is None else round(opened_at, 2),
        # when the fault began, from the start of the load: between these two (the fault
        # counts from engine 0's start, which came before the load's; one that runs from
        # the start began with engine 0)
        "fault_began_s": [round(spawned + delay - start, 2), round(ready + delay - start, 2)],
        "circuits_at_end": status["circuits"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fault", choices=FAULTS, default="hang")
    p.add_argument(
        "--at", dest="at_given", type=above(0), default=None,
        help="seconds before the fault (hang and drop; default 5)",
    )  # fmt: skip
    p.add_argument("--requests", type=at_least(1), default=400)
    p.add_argument("--engines", type=at_least(2), default=3)
    p.add_argument("--rate", type=above(0), default=20.0, help="requests per second")
    p.add_argument("--speed", type=above(0), default=10.0, help="engine-sim speed factor")
    p.add_argument(
        "--slots", type=at_least(1), default=64, help="max concurrent requests per engine"
    )
    p.add_argument("--max-tokens", type=at_least(1), default=16)
    p.add_argument("--stream", action="store_true", help="stream the answers")
    p.add_argument("--timeout-s", type=above(0), default=60.0, help="a call slower hangs")
    p.add_argument(
        "--no-move-on-eject", dest="move_on_eject", action="store_false",
        help="[health] move_on_eject = false",
    )  # fmt: skip
    p.add_argument(
        "--stall-timeout-s", type=at_least_number(0), default=None,
        help="[health] stall_timeout_s (0: off; default 5 with --fault stall, else 60)",
    )  # fmt: skip
    p.add_argument("--out", default=None)
    args = p.parse_args()
    check_out(p, "--out", args.out)
    if args.fault not in TIMED_FAULTS and args.at_given is not None:
        p.error(f"--at: the {args.fault} fault runs from engine 0's start (only "
                f"{' and '.join(TIMED_FAULTS)} begin --at seconds in)")  # fmt: skip
    args.at = 5.0 if args.at_given is None else args.at_given
    report = asyncio.run(run(args))
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
