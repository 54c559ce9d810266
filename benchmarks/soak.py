"""Soak benchmark: steady load through the gateway for a long time, watching its memory.

It starts ``--instances`` simulated engines as ``sage-llm engine-sim`` processes and
``sage-llm serve`` over them (``mode = "http"``, every control-plane cap at its default),
measures the fleet's capacity with a short closed-loop saturation run, then sends streamed
``/v1/completions`` requests (every prompt distinct) open-loop at ``--load`` (default
70 %) of that capacity for ``--minutes``, sampling the resident set size of the gateway
(and, reported apart, of the engines) every ``--sample-s`` seconds. Reported: the
gateway's RSS after warm-up, at the end, and the growth between them (target: < 5 %),
request outcomes, the mean load average and the prefix index size. ``--embedded`` runs
the engines inside the gateway process instead (``[simulation]``), so that their
simulated KV-cache bookkeeping counts too. Run::

    .venv/bin/python benchmarks/soak.py --minutes 30 --out soak.json

``--tracemalloc DIR`` attributes growth: the gateway then runs under :mod:`tracemalloc`
(slower, so the calibrated rate is lower) with a ``SIGUSR1`` handler that dumps a snapshot
and live-object counts by type into ``DIR``; the benchmark signals it right after warm-up
and at the end and reports the top allocation sites and object types that grew between
the two (``report["tracemalloc"]``)::

    .venv/bin/python benchmarks/soak.py --minutes 5 --warmup-minutes 1 --tracemalloc /tmp/tm
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import aiohttp

from sage_llm.bench.cli_args import above, at_least, check_out
from sage_llm.bench.procs import free_ports, start_engine_sims
from sage_llm.orphans import dies_with_parent

_CONFIG = """\
[services.llm_control_plane]
mode = "{mode}"
scheduling_policy = "fifo"
routing_strategy = "load_balanced"
enable_pd_separation = false
{extra}
[gateway]
host = "127.0.0.1"
"""

_EMBEDDED = """
[simulation]
instances = {instances}
model = "llama-3-8b"
gpu = "h100"
speed = {speed}
max_concurrent_requests = {slots}
"""

_INSTANCE = """
[[services.llm_control_plane.instances]]
instance_id = "engine-{i}"
host = "127.0.0.1"
port = {port}
model_name = "llama-3-8b"
max_concurrent_requests = {slots}
"""


def gateway_config(args: argparse.Namespace, engine_ports: list[int]) -> str:
    """The gateway's TOML: every control-plane cap at its default unless overridden."""
    extra = ""
    if args.prefix_index_capacity is not None:
        extra += f"prefix_index_capacity = {args.prefix_index_capacity}\n"
    if args.result_retention is not None:
        extra += f"result_retention = {args.result_retention}\n"
    if not engine_ports:
        text = _CONFIG.format(mode="simulated", extra=extra)
        return text + _EMBEDDED.format(instances=args.instances, speed=args.speed, slots=args.slots)
    text = _CONFIG.format(mode="http", extra=extra)
    return text + "".join(
        _INSTANCE.format(i=i, port=port, slots=args.slots) for i, port in enumerate(engine_ports)
    )


# Run as ``python -c _TRACED_SERVE DIR serve ...``: the CLI under tracemalloc; each SIGUSR1
# writes DIR/snap-N.tm (a tracemalloc snapshot) and DIR/types-N.json (live objects by type).
_TRACED_SERVE = """\
import collections, gc, itertools, json, signal, sys, tracemalloc
tracemalloc.start(8)
out = sys.argv.pop(1)
seq = itertools.count()
def dump(signum, frame):
    n = next(seq)
    gc.collect()
    types = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
    tracemalloc.take_snapshot().dump(f"{out}/snap-{n}.tm")
    with open(f"{out}/types-{n}.json", "w") as f:
        json.dump(dict(types), f)
signal.signal(signal.SIGUSR1, dump)
sys.argv[0] = "sage-llm"
from sage_llm.cli import main
main()
"""


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid`` (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def one_request(
    session: aiohttp.ClientSession, url: str, i: int, max_tokens: int, tag: str = "request"
) -> tuple[bool, str | None]:
    """One streamed completion; (ok, error). Prompts differ in their first block for every
    (``tag``, ``i``): ``i`` is written digit by digit, one token each, because a number
    written whole is a single token of a 32,000-id vocabulary, and numbers beyond that
    many would repeat prompts (and their prefix blocks) token for token."""
    body = {
        "model": "llama-3-8b",
        "prompt": f"soak {tag} " + " ".join(str(i)) + ": " + "lorem ipsum " * 24,
        "max_tokens": max_tokens,
        "stream": True,
        "ignore_eos": True,
    }
    try:
        async with session.post(url, json=body) as resp:
            if resp.status != 200:
                return False, f"HTTP {resp.status}"
            saw_done = False
            async for raw in resp.content:
                line = raw.strip()
                if line == b"data: [DONE]":
                    saw_done = True
                elif b'"error"' in line:
                    return False, line.decode(errors="replace")[:200]
            return saw_done, None if saw_done else "stream ended without [DONE]"
    except (aiohttp.ClientError, TimeoutError) as exc:
        return False, repr(exc)


async def wait_ready(url: str, timeout_s: float = 60.0) -> None:
    """Poll ``url`` until it answers 200."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{url} did not become ready")


async def traced_dump(pid: int, out: Path, n: int, timeout_s: float = 300.0) -> None:
    """Ask the traced gateway for its ``n``-th snapshot and wait until it is written."""
    os.kill(pid, signal.SIGUSR1)
    done = out / f"types-{n}.json"
    deadline = time.monotonic() + timeout_s
    while not done.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"gateway wrote no {done}")
        await asyncio.sleep(0.5)
    await asyncio.sleep(0.5)  # let the write finish


def diff_snapshots(out: Path, first: int, second: int, top: int = 25) -> dict[str, Any]:
    """Top allocation sites (by line and by traceback) and object types that grew."""
    filters = [tracemalloc.Filter(False, tracemalloc.__file__)]
    old = tracemalloc.Snapshot.load(str(out / f"snap-{first}.tm")).filter_traces(filters)
    new = tracemalloc.Snapshot.load(str(out / f"snap-{second}.tm")).filter_traces(filters)

    def site(stat: tracemalloc.StatisticDiff) -> dict[str, Any]:
        return {
            "size_diff_kb": round(stat.size_diff / 1024, 1),
            "size_kb": round(stat.size / 1024, 1),
            "count_diff": stat.count_diff,
            "where": [f"{f.filename}:{f.lineno}" for f in stat.traceback],
        }

    by_line = new.compare_to(old, "lineno")[:top]
    by_trace = new.compare_to(old, "traceback")[:top]
    t_old = json.loads((out / f"types-{first}.json").read_text())
    t_new = json.loads((out / f"types-{second}.json").read_text())
    grew = sorted(((t_new.get(k, 0) - t_old.get(k, 0), k) for k in t_new), reverse=True)
    return {
        "traced_kb_first": round(sum(s.size for s in old.statistics("filename")) / 1024, 1),
        "traced_kb_second": round(sum(s.size for s in new.statistics("filename")) / 1024, 1),
        "by_line": [site(s) for s in by_line],
        "by_traceback": [site(s) for s in by_trace],
        "object_types_grown": [
            {"type": k, "count_diff": d, "count": t_new[k]} for d, k in grew[:top] if d > 0
        ],
    }


async def calibrate(url: str, concurrency: int, seconds: float, max_tokens: int) -> float:
    """Closed-loop saturation: completed requests per second with ``concurrency`` clients."""
    done = 0
    stop_at = time.monotonic() + seconds

    async def worker(w: int, session: aiohttp.ClientSession) -> None:
        nonlocal done
        i = 0
        while time.monotonic() < stop_at:
            ok, _ = await one_request(session, url, w * 1_000_000 + i, max_tokens, "warm-up")
            i += 1
            done += ok

    start = time.monotonic()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(worker(w, session) for w in range(concurrency)))
    return done / (time.monotonic() - start)


async def admin_status(base: str) -> dict[str, Any]:
    """The prefix index size from the gateway's ``/admin/status`` (loopback, no admin token)
    and the request retry count from its ``/metrics``; {} where unavailable."""
    out: dict[str, Any] = {}
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(base + "/admin/status") as r:
                if r.status == 200:
                    body = await r.json()
                    out.update({k: v for k, v in body.items() if k.startswith("prefix_index")})
            async with session.get(base + "/metrics") as r:
                for line in (await r.text()).splitlines():
                    if line.startswith("sage_llm_request_retries_total "):
                        out["request_retries"] = float(line.split()[1])
    except (aiohttp.ClientError, ValueError):
        pass
    return out


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    """Run the soak and return its report."""
    async with contextlib.AsyncExitStack() as stack:
        engine_pids: list[int] = []
        engine_ports: list[int] = []
        if not args.embedded:
            fleet = await start_engine_sims(args.instances, speed=args.speed)
            stack.push_async_callback(fleet.aclose)
            engine_pids = [e.pid for e in fleet.engines]
            engine_ports = [e.port for e in fleet.engines]
        return await soak_gateway(args, engine_ports, engine_pids)
    raise AssertionError("unreachable")


async def soak_gateway(
    args: argparse.Namespace, engine_ports: list[int], engine_pids: list[int]
) -> dict[str, Any]:
    """Start the gateway over ``engine_ports`` (none: embedded engines), soak, report."""
    port = free_ports(1)[0]
    workdir = Path(tempfile.mkdtemp(prefix="sage-soak-"))
    cfg = workdir / "soak.toml"
    cfg.write_text(gateway_config(args, engine_ports))
    log = (workdir / "gateway.log").open("wb")
    traced: Path | None = args.tracemalloc
    launcher = ["-m", "sage_llm.cli"]
    if traced is not None:
        launcher = ["-c", _TRACED_SERVE, str(traced)]
    argv = dies_with_parent([  # stopped with this script, however it ends
        sys.executable, *launcher, "serve", "--config", str(cfg),
        "--port", str(port), "--log-level", "warning",
    ])  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=log, stderr=log, start_new_session=True
    )
    base = f"http://127.0.0.1:{port}"
    url = base + "/v1/completions"
    outcomes: dict[str, int] = {"ok": 0, "failed": 0}
    errors: dict[str, int] = {}
    samples: list[tuple[float, int]] = []
    engine_samples: list[tuple[float, int]] = []
    status: dict[str, dict[str, Any]] = {}
    tm_report: dict[str, Any] | None = None
    loads: list[float] = []
    in_flight: list[tuple[float, int]] = []  # requests sent and not finished, per sample
    try:
        await wait_ready(base + "/health")
        capacity = await calibrate(
            url, args.instances * args.slots * 2, args.calibrate_s, args.max_tokens
        )
        if capacity <= 0:
            raise RuntimeError(f"no request completed during calibration; see {log.name}")
        rate = capacity * args.load
        print(f"capacity {capacity:.1f} req/s; soaking at {rate:.1f} req/s", flush=True)
        duration = args.minutes * 60.0
        start = time.monotonic()
        pending: set[asyncio.Task[tuple[bool, str | None]]] = set()

        def tally(task: asyncio.Task[tuple[bool, str | None]]) -> None:
            pending.discard(task)
            ok, err = task.result()
            outcomes["ok" if ok else "failed"] += 1
            if err:
                key = err[:60]
                errors[key] = errors.get(key, 0) + 1

        async def sampler() -> None:
            while True:
                t = time.monotonic() - start
                samples.append((t, rss_bytes(proc.pid)))
                in_flight.append((t, len(pending)))
                if engine_pids:
                    engine_samples.append((t, sum(rss_bytes(pid) for pid in engine_pids)))
                loads.append(os.getloadavg()[0])
                await asyncio.sleep(args.sample_s)

        sampling = asyncio.create_task(sampler())
        warm_s = args.warmup_minutes * 60.0

        async def at_warmup() -> None:
            await asyncio.sleep(warm_s)
            status["after_warmup"] = await admin_status(base)
            if traced is not None:
                await traced_dump(proc.pid, traced, 0)

        warming = asyncio.create_task(at_warmup())
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            i = 0
            while (now := time.monotonic() - start) < duration:
                due = i / rate
                if due > now:
                    await asyncio.sleep(due - now)
                task = asyncio.create_task(one_request(session, url, i, args.max_tokens))
                task.add_done_callback(tally)
                pending.add(task)
                i += 1
            if pending:
                await asyncio.wait(pending, timeout=120)
        sampling.cancel()
        samples.append((time.monotonic() - start, rss_bytes(proc.pid)))
        status["end"] = await admin_status(base)
        if traced is not None:
            await warming
            await traced_dump(proc.pid, traced, 1)
            tm_report = diff_snapshots(traced, 0, 1)
        else:
            warming.cancel()
    finally:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()
        log.close()
    report = {
        "minutes": args.minutes,
        "warmup_minutes": args.warmup_minutes,
        "engines": "embedded in the gateway" if args.embedded else "engine-sim processes",
        "capacity_req_s": capacity,
        "load": args.load,
        "rate_req_s": rate,
        "requests": outcomes,
        "errors": errors,
        "load_average_1m_mean": sum(loads) / len(loads) if loads else None,
        **rss_summary(samples, args.warmup_minutes * 60.0, "rss"),
        "samples": [(round(t, 1), round(r / 2**20, 2)) for t, r in samples],
        # a backlog (the machine's other load slowing the fleet below the offered rate)
        # raises the gateway's memory high-water mark: read growth next to these
        "in_flight_max_after_warmup": max(
            (n for t, n in in_flight if t >= args.warmup_minutes * 60.0), default=0
        ),
        "in_flight": [(round(t, 1), n) for t, n in in_flight],
        "control_plane": status,
        "gateway_log": str(workdir / "gateway.log"),
        "tracemalloc": tm_report,
    }
    if engine_samples:
        report["engines_rss"] = rss_summary(engine_samples, args.warmup_minutes * 60.0, "rss")
    return report


def rss_summary(samples: list[tuple[float, int]], warm_s: float, key: str) -> dict[str, float]:
    """Start, after warm-up (mean of the first 3 samples after it), end (mean of the last 3),
    maximum, the growth from after warm-up to the end, and the least-squares slope of the
    samples after warm-up (MB per minute)."""
    after = [(t, r) for t, r in samples if t >= warm_s] or samples
    base_rss = sum(r for _, r in after[:3]) / len(after[:3])
    end_rss = sum(r for _, r in after[-3:]) / len(after[-3:])
    mean_t = sum(t for t, _ in after) / len(after)
    mean_r = sum(r for _, r in after) / len(after)
    var_t = sum((t - mean_t) ** 2 for t, _ in after)
    cov = sum((t - mean_t) * (r - mean_r) for t, r in after)
    slope = cov / var_t if var_t else 0.0
    return {
        f"{key}_start_mb": samples[0][1] / 2**20,
        f"{key}_after_warmup_mb": base_rss / 2**20,
        f"{key}_end_mb": end_rss / 2**20,
        f"{key}_max_mb": max(r for _, r in samples) / 2**20,
        "growth_after_warmup_pct": 100.0 * (end_rss - base_rss) / base_rss,
        "slope_after_warmup_mb_per_min": slope * 60.0 / 2**20,
    }


def main() -> None:
    """Command line entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=above(0), default=30.0)
    p.add_argument(
        "--warmup-minutes",
        type=float,
        default=10.0,
        help="minutes before the growth baseline (the default caps fill within about 13 minutes)",
    )
    p.add_argument("--load", type=above(0), default=0.7, help="fraction of measured capacity")
    p.add_argument("--sample-s", type=above(0), default=10.0)
    p.add_argument("--calibrate-s", type=above(0), default=20.0)
    p.add_argument("--instances", type=at_least(1), default=4)
    p.add_argument(
        "--slots", type=at_least(1), default=4, help="max concurrent requests per engine"
    )
    p.add_argument("--speed", type=above(0), default=1.0)
    p.add_argument("--max-tokens", type=at_least(1), default=64)
    p.add_argument(
        "--prefix-index-capacity",
        type=int,
        default=None,
        help="override the control plane's prefix index bound (entries)",
    )
    p.add_argument(
        "--result-retention",
        type=int,
        default=None,
        help="override the control plane's finished-result retention (count)",
    )
    p.add_argument(
        "--embedded",
        action="store_true",
        help="run the simulated engines inside the gateway process (their memory counts too)",
    )
    p.add_argument("--out", type=Path, default=None)
    p.add_argument(
        "--tracemalloc",
        type=Path,
        default=None,
        metavar="DIR",
        help="run the gateway under tracemalloc; diff snapshots after warm-up and at the end",
    )
    args = p.parse_args()
    if not 0 <= args.warmup_minutes < args.minutes:
        p.error("--warmup-minutes must be >= 0 and below --minutes (samples must follow it)")
    check_out(p, "--out", args.out)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    if args.tracemalloc is not None:
        if args.tracemalloc.exists() and not args.tracemalloc.is_dir():
            p.error(f"--tracemalloc: {args.tracemalloc} is a file, not a folder")
        args.tracemalloc.mkdir(parents=True, exist_ok=True)
    report = asyncio.run(soak(args))
    summary = {k: v for k, v in report.items() if k != "samples"}
    print(json.dumps(summary, indent=2))  # first: the figures are not lost with the file
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
