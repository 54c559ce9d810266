"""Soak benchmark: steady load through the gateway for a long time, watching its memory.

It starts ``sage-llm serve`` as a subprocess over the embedded simulated fleet (``[simulation]``:
the engines run inside the gateway process, so their memory counts too), measures the
fleet's capacity with a short closed-loop saturation run, then sends streamed
``/v1/completions`` requests open-loop at ``--load`` (default 70 %) of that capacity for
``--minutes``, sampling the gateway's resident set size every ``--sample-s`` seconds.
Reported: RSS after warm-up, at the end, and the growth between them (target: < 5 %), plus
request outcomes. Run::

    .venv/bin/python benchmarks/soak.py --minutes 30 --out soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from sage_llm.bench.procs import free_ports

_CONFIG = """\
[services.llm_control_plane]
mode = "simulated"
scheduling_policy = "fifo"
routing_strategy = "load_balanced"
enable_pd_separation = false
result_retention = 2000
result_ttl_s = 60.0

[gateway]
host = "127.0.0.1"

[simulation]
instances = {instances}
model = "llama-3-8b"
gpu = "h100"
speed = {speed}
max_concurrent_requests = {slots}
"""


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid`` (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def one_request(
    session: aiohttp.ClientSession, url: str, i: int, max_tokens: int
) -> tuple[bool, str | None]:
    """One streamed completion; (ok, error)."""
    body = {
        "model": "llama-3-8b",
        "prompt": f"soak request {i}: " + "lorem ipsum " * 24,
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


async def calibrate(url: str, concurrency: int, seconds: float, max_tokens: int) -> float:
    """Closed-loop saturation: completed requests per second with ``concurrency`` clients."""
    done = 0
    stop_at = time.monotonic() + seconds

    async def worker(w: int, session: aiohttp.ClientSession) -> None:
        nonlocal done
        i = 0
        while time.monotonic() < stop_at:
            ok, _ = await one_request(session, url, w * 1_000_000 + i, max_tokens)
            i += 1
            done += ok

    start = time.monotonic()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(worker(w, session) for w in range(concurrency)))
    return done / (time.monotonic() - start)


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    """Run the soak and return its report."""
    port = free_ports(1)[0]
    workdir = Path(tempfile.mkdtemp(prefix="sage-soak-"))
    cfg = workdir / "soak.toml"
    cfg.write_text(_CONFIG.format(instances=args.instances, speed=args.speed, slots=args.slots))
    log = (workdir / "gateway.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sage_llm.cli", "serve", "--config", str(cfg),
        "--port", str(port), "--log-level", "warning",
        stdout=log, stderr=log, start_new_session=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    url = base + "/v1/completions"
    outcomes: dict[str, int] = {"ok": 0, "failed": 0}
    errors: dict[str, int] = {}
    samples: list[tuple[float, int]] = []
    try:
        await wait_ready(base + "/health")
        capacity = await calibrate(
            url, args.instances * args.slots * 2, args.calibrate_s, args.max_tokens
        )
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
                samples.append((time.monotonic() - start, rss_bytes(proc.pid)))
                await asyncio.sleep(args.sample_s)

        sampling = asyncio.create_task(sampler())
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
    finally:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()
        log.close()
    warm = args.warmup_minutes * 60.0
    after = [r for t, r in samples if t >= warm] or [r for _, r in samples]
    base_rss = sum(after[:3]) / len(after[:3])
    end_rss = sum(after[-3:]) / len(after[-3:])
    return {
        "minutes": args.minutes,
        "warmup_minutes": args.warmup_minutes,
        "capacity_req_s": capacity,
        "load": args.load,
        "rate_req_s": rate,
        "requests": outcomes,
        "errors": errors,
        "rss_start_mb": samples[0][1] / 2**20,
        "rss_after_warmup_mb": base_rss / 2**20,
        "rss_end_mb": end_rss / 2**20,
        "rss_max_mb": max(r for _, r in samples) / 2**20,
        "growth_after_warmup_pct": 100.0 * (end_rss - base_rss) / base_rss,
        "samples": [(round(t, 1), round(r / 2**20, 2)) for t, r in samples],
        "gateway_log": str(workdir / "gateway.log"),
    }


def main() -> None:
    """Command line entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--warmup-minutes", type=float, default=5.0)
    p.add_argument("--load", type=float, default=0.7, help="fraction of measured capacity")
    p.add_argument("--sample-s", type=float, default=10.0)
    p.add_argument("--calibrate-s", type=float, default=20.0)
    p.add_argument("--instances", type=int, default=4)
    p.add_argument("--slots", type=int, default=4, help="max concurrent requests per engine")
    p.add_argument("--speed", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    report = asyncio.run(soak(args))
    text = json.dumps(report, indent=2)
    if args.out is not None:
        args.out.write_text(text)
    summary = {k: v for k, v in report.items() if k != "samples"}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
