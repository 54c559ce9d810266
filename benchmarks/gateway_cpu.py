"""CPU time the gateway process spends per proxied request (issue #4 item 6).

The proxy benchmark (:mod:`sage_llm.bench.proxy_bench`) runs the engines, the proxy and the
load client on the same cores, so its req/s is bounded by the *total* CPU per request and
moves with whatever else the machine runs. This script reports a figure that is robust to
that noise: the CPU seconds (user + system, from ``/proc/<pid>/stat`` as ``psutil`` reads
them; Linux only) the proxy process used during a closed-loop run, divided by the requests
it completed.

It starts two ``sage-llm engine-sim`` processes (``--speed 1000``, as the proxy bench does),
then the proxy in its own process:

* default: ``sage-llm serve`` with the proxy bench's configuration (``fifo + round_robin``,
  no concurrency limit, log level warning);
* ``--bare``: a minimal aiohttp proxy (aiohttp server + aiohttp client, round robin over the
  engines, bodies relayed unchanged, no control plane), for comparison;

and runs the proxy bench's closed-loop client process (``python -m
sage_llm.bench.proxy_bench client --url … --concurrency 64 --requests 1500 [--stream]``,
4 output tokens) once non-streaming and once streaming. For each mode it prints
``ms CPU/request`` of the proxy process, the client's req/s and errors, and the proxy's
CPU utilisation over the run. Run from the repository root::

    .venv/bin/python benchmarks/gateway_cpu.py            # sage-llm serve
    .venv/bin/python benchmarks/gateway_cpu.py --bare     # bare aiohttp proxy
    .venv/bin/python benchmarks/gateway_cpu.py --loop uvloop --requests 3000
    .venv/bin/python benchmarks/gateway_cpu.py --engine-stream client

``--json PATH`` also writes the figures as JSON. Logs go to ``bench-out/gateway_cpu/``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from sage_llm.bench.cli_args import at_least, check_out
from sage_llm.bench.compare import sage_config_toml
from sage_llm.bench.inprocess import Preset
from sage_llm.bench.procs import (
    ManagedProcess,
    free_ports,
    group_cpu_s,
    serving,
    start_engine_sims,
)
from sage_llm.bench.proxy_bench import client_process

MODEL = "llama-3-8b"
LOG_DIR = Path("bench-out/gateway_cpu")


@dataclass(frozen=True)
class ModeResult:
    """One closed-loop run against the proxy."""

    mode: str
    requests: int
    errors: int
    req_per_s: float
    cpu_s: float
    cpu_ms_per_request: float
    cpu_utilisation: float


# --- the bare proxy (runs in its own process: ``gateway_cpu.py bare-serve PORT URL...``) --


def _bare_serve(port: int, urls: Sequence[str]) -> None:
    import aiohttp
    from aiohttp import web

    async def main() -> None:
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=None)
        )
        pick = itertools.cycle(urls)

        async def proxy(request: web.Request) -> web.StreamResponse:
            body = await request.read()
            async with session.post(
                next(pick) + request.path,
                data=body,
                headers={"Content-Type": "application/json"},
            ) as upstream:
                resp = web.StreamResponse(status=upstream.status)
                resp.content_type = upstream.content_type
                await resp.prepare(request)
                async for piece in upstream.content.iter_any():
                    await resp.write(piece)
                await resp.write_eof()
                return resp

        async def health(_request: web.Request) -> web.Response:
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_post("/v1/completions", proxy)
        app.router.add_post("/v1/chat/completions", proxy)
        app.router.add_get("/health", health)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()
            await session.close()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


# --- the measurement ----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _proxy(
    urls: Sequence[str], *, bare: bool, loop: str, engine_stream: str = "sampled"
) -> AsyncIterator[ManagedProcess]:
    (port,) = free_ports(1)
    await asyncio.to_thread(LOG_DIR.mkdir, parents=True, exist_ok=True)
    if bare:
        argv = [sys.executable, __file__, "bare-serve", str(port), *urls]
        name = f"bare-{port}"
    else:
        config = LOG_DIR / f"sage-{port}.toml"
        preset = Preset("fifo + round_robin", "fifo", "round_robin")
        text = sage_config_toml(
            preset, urls, model=MODEL, max_concurrent=10_000, engine_stream=engine_stream
        )
        await asyncio.to_thread(config.write_text, text, encoding="utf-8")
        argv = [sys.executable, "-m", "sage_llm.cli", "serve", "--config", str(config),
                "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
                "--loop", loop]  # fmt: skip
        name = f"sage-{port}"
    async with serving(name, argv, port=port, log_path=LOG_DIR / f"{name}.log") as proc:
        yield proc


async def measure(
    *,
    bare: bool,
    loop: str,
    concurrency: int,
    requests: int,
    modes: Sequence[bool],
    engine_stream: str = "sampled",
) -> list[ModeResult]:
    results = []
    async with (
        await start_engine_sims(2, model=MODEL, speed=1000.0, log_dir=LOG_DIR) as fleet,
        _proxy(fleet.urls, bare=bare, loop=loop, engine_stream=engine_stream) as proxy,
    ):
        for stream in modes:
            # a short warm-up run (connections, caches), not measured
            await client_process(proxy.url, concurrency, 200, stream)
            before = group_cpu_s(proxy.pid)
            data = await client_process(proxy.url, concurrency, requests, stream)
            cpu = group_cpu_s(proxy.pid) - before
            done = data.requests - data.errors
            results.append(
                ModeResult(
                    mode="stream" if stream else "plain",
                    requests=data.requests,
                    errors=data.errors,
                    req_per_s=data.req_per_s,
                    cpu_s=cpu,
                    cpu_ms_per_request=cpu * 1000 / max(done, 1),
                    cpu_utilisation=cpu / data.wall_s if data.wall_s > 0 else 0.0,
                )
            )
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    if args_in and args_in[0] == "bare-serve":
        _bare_serve(int(args_in[1]), args_in[2:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bare", action="store_true", help="measure a bare aiohttp proxy")
    parser.add_argument(
        "--loop", default="auto", choices=("auto", "uvloop", "asyncio"), help="serve --loop"
    )
    parser.add_argument("--concurrency", type=at_least(1), default=64)
    parser.add_argument("--requests", type=at_least(1), default=1500)
    parser.add_argument("--mode", choices=("both", "plain", "stream"), default="both")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument(
        "--engine-stream", choices=("sampled", "always", "client"), default="sampled",
        help="the gateway's engine_stream setting",
    )  # fmt: skip
    args = parser.parse_args(args_in)
    check_out(parser, "--json", args.json)
    modes = {"both": (False, True), "plain": (False,), "stream": (True,)}[args.mode]
    results = asyncio.run(
        measure(
            bare=args.bare, loop=args.loop, concurrency=args.concurrency,
            requests=args.requests, modes=modes, engine_stream=args.engine_stream,
        )
    )  # fmt: skip
    target = (
        "bare aiohttp proxy" if args.bare
        else f"sage-llm serve (loop {args.loop}, engine_stream {args.engine_stream})"
    )  # fmt: skip
    print(f"{target}, concurrency {args.concurrency}, {args.requests} requests per mode")
    print(f"{'mode':<8}{'ms CPU/req':>12}{'req/s':>10}{'CPU util':>10}{'errors':>8}")
    for r in results:
        print(
            f"{r.mode:<8}{r.cpu_ms_per_request:>12.3f}{r.req_per_s:>10.0f}"
            f"{r.cpu_utilisation:>10.2f}{r.errors:>8d}"
        )
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
