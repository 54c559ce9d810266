"""Gateway speed: ``sage-llm serve`` next to vllm-router and sglang-router (issue #4 item 6).

Every proxy runs in its own process in front of the same ``engine-sim`` processes (high
``--speed``, a few output tokens) on loopback; for the concurrency-1 runs, by default
(``c1_engine="instant"``), a second copy of every target runs in front of ``engine-sim
--instant`` processes (:mod:`sage_llm.sim.instant`), which answer at once. The simulated
engine's own latency at concurrency 1 depends on when a request arrives within its step
loop and moves by more than a proxy adds (through a proxy it was 0.3–0.6 ms faster or
slower than direct, from one run to the next); behind an engine that answers at once
the added latency is what the proxy adds. The load generator is a separate process too
(``python -m sage_llm.bench.proxy_bench client …``: a closed-loop aiohttp client that keeps
``concurrency`` requests in flight), so it never shares the gateway's event loop. For each
target (``direct`` = the first engine itself, then each proxy) and for non-streaming and
streaming ``/v1/completions``:

* ``p50 c1``: median latency at concurrency 1 (streaming: until the last chunk);
* ``added``: the proxy's ``p50 c1`` minus ``direct``'s;
* ``ttft c1``: median time to the first streamed chunk at concurrency 1, which shows
  whether a proxy relays the first chunk at once;
* ``req/s c64``: completed requests per second at concurrency 64.

Each concurrency-1 run is preceded by :data:`C1_WARMUP` unmeasured requests (``c1_warmup``)
through the same target, each concurrency-64 run by 5 per engine URL: the first few hundred
requests of a lone client after a pause come slower through a Python proxy, and the
concurrency-1 figures are of the steady state (docs/benchmarks.md, thirty-first round).

``sage-llm serve`` is measured twice (:data:`SAGE_TARGETS`): as configured by default
(``engine_stream = "sampled"``), and with ``engine_stream = "client"``. The peers
(:data:`DEFAULT_PEERS`) are the two Rust routers and ``python-forwarder``
(:mod:`sage_llm.bench.forwarder`): a forwarder that only passes requests and answers
through, on the gateway's own transport, to show what a Python proxy costs on the machine
before any control-plane work.

With ``rounds`` above 1 every target is measured that many times, the rounds interleaved
(round *k* starts with the *k*-th target), so a change in the machine's load over the run
falls on all targets alike: ``req/s c64`` is then the median of the rounds (each round's
figure is kept in ``req_per_s_c64_runs``), and the concurrency-1 figures are over the
rounds' latencies together.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
from rich.console import Console
from rich.table import Table

from sage_llm.bench.cli_args import at_least
from sage_llm.bench.peers import PEERS
from sage_llm.bench.report import check_out_dir, refuse_repeats, report_console
from sage_llm.bench.stats import percentile
from sage_llm.errors import ConfigError
from sage_llm.sim.core import default_max_model_len
from sage_llm.tokens import count_tokens, split

if TYPE_CHECKING:
    from sage_llm.bench.procs import ManagedProcess

__all__ = [
    "C1_ENGINES",
    "DEFAULT_PEERS",
    "FORWARDER",
    "ClientResult",
    "ProxyRow",
    "ProxyTarget",
    "bench_prompt",
    "client_process",
    "closed_loop",
    "proxy_bench_main",
    "proxy_targets",
    "python_forwarder",
    "run_proxy_bench",
    "target_lines",
]

PROMPT = "Tell me about the weather in a city of your choice, briefly."

_FILLER = (
    "The control plane schedules requests over a fleet of engines, and each engine keeps "
    "the prompts it has seen in its prefix cache. Routing a request to the engine that "
    "holds its prefix saves the prefill of those tokens; spreading requests evenly keeps "
    "queues short. Operators weigh both, watch time to first token and tokens per second, "
    "and resize the fleet when either drifts. "
)


def bench_prompt(prompt_tokens: int = 0) -> str:
    """The bench's prompt: :data:`PROMPT` (14 tokens) when ``prompt_tokens`` is 0, else a
    text of exactly ``prompt_tokens`` tokens (as :func:`sage_llm.tokens.count_tokens`
    counts them: what the simulated engines read) ending in :data:`PROMPT`."""
    if prompt_tokens < 0:
        raise ValueError("prompt_tokens must be >= 0")
    if prompt_tokens == 0:
        return PROMPT
    tail = split(" " + PROMPT)
    if prompt_tokens <= len(tail):
        return "".join(tail[-prompt_tokens:]).lstrip()
    need = prompt_tokens - len(tail)
    filler = _FILLER * (need // count_tokens(_FILLER) + 1)
    return "".join(split(filler)[:need] + tail)


C1_WARMUP = 1000
"""Unmeasured requests before each concurrency-1 run. With 5, the p50 through a proxy
measured the warm-up of the run as much as the proxy: a lone client's first 200–400
requests after a pause (a new client process, the target idle while others were measured)
came apart more often (the end of a stream a wake-up after its first piece), about 0.2 ms
slower through the gateway (0.03 ms through the minimal forwarder, no slower through
vllm-router), then settled; 1,000 take under a second."""

C1_ENGINES = ("instant", "sim")
"""The engines the concurrency-1 runs can go to: ``engine-sim --instant`` or the
``engine-sim`` processes of the concurrency-64 runs."""

DEFAULT_PEERS = ("vllm-router", "sglang-router", "python-forwarder")
"""The bench's peers unless told otherwise: both Rust routers and :data:`FORWARDER`."""

FORWARDER = "python-forwarder"
"""The peer name of :mod:`sage_llm.bench.forwarder`: a minimal Python forwarder on the
gateway's own transport, the floor of a Python proxy (nothing to install)."""

SAGE_TARGETS = (("sampled", "sage-llm serve"), ("client", "sage-llm serve, engine_stream=client"))
"""Two of the gateway's ways of calling engines (``engine_stream``), each a target: the
default (``sampled``: calls stream when their client streams, and one non-streaming request
in ten on each instance streams too, at most 20 a second, so TTFT and TPOT stay measured),
and ``client`` (only those whose client streams, as the Rust routers do; also the only mode
that commits before ``sampled`` know, so ``--baseline-src`` comparisons use it)."""


@dataclass(frozen=True)
class ClientResult:
    """One closed-loop run: per-request latencies and first-chunk times (seconds)."""

    requests: int
    errors: int
    wall_s: float
    latencies_s: list[float]
    ttfts_s: list[float]
    cpu_s: float = 0.0
    """CPU seconds the client process spent on the measured requests (not on warm-up)."""

    @property
    def req_per_s(self) -> float:
        return (self.requests - self.errors) / self.wall_s if self.wall_s > 0 else 0.0

    def p50_ms(self) -> float | None:
        return percentile(self.latencies_s, 50) * 1000 if self.latencies_s else None

    def ttft_p50_ms(self) -> float | None:
        return percentile(self.ttfts_s, 50) * 1000 if self.ttfts_s else None


async def _one(
    session: aiohttp.ClientSession, url: str, body: bytes, stream: bool
) -> tuple[float, float | None]:
    start = time.perf_counter()
    first: float | None = None
    async with session.post(url, data=body, headers={"content-type": "application/json"}) as r:
        if r.status != 200:
            raise aiohttp.ClientResponseError(r.request_info, (), status=r.status)
        if stream:
            async for _piece in r.content.iter_any():
                if first is None:
                    first = time.perf_counter() - start
        else:
            await r.read()
    return time.perf_counter() - start, first


async def closed_loop(
    base_url: str | Sequence[str],
    *,
    concurrency: int,
    requests: int,
    stream: bool,
    max_tokens: int = 4,
    model: str = "llama-3-8b",
    warmup: int = 5,
    prompt_tokens: int = 0,
) -> ClientResult:
    """Keep ``concurrency`` requests in flight until ``requests`` are done (after
    ``warmup`` unmeasured ones) and return what was measured. Several base URLs (the same
    service behind several processes) share the concurrency: in-flight slot *i* sends
    to URL *i* modulo their number, and each gets ``warmup`` requests. Every request has
    the same prompt, :func:`bench_prompt` of ``prompt_tokens``."""
    if concurrency < 1 or requests < 1:
        raise ValueError("concurrency and requests must be >= 1")
    bases = [base_url] if isinstance(base_url, str) else list(base_url)
    if not bases:
        raise ValueError("give at least one base URL")
    urls = [b.rstrip("/") + "/v1/completions" for b in bases]
    body = json.dumps(
        {"model": model, "prompt": bench_prompt(prompt_tokens), "max_tokens": max_tokens,
         "stream": stream,
         "ignore_eos": True}
    ).encode()  # fmt: skip
    latencies: list[float] = []
    ttfts: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        for url in urls:
            for _ in range(warmup):
                with contextlib.suppress(aiohttp.ClientError):
                    await _one(session, url, body, stream)
        remaining = requests

        async def worker(url: str) -> None:
            nonlocal remaining, errors
            while remaining > 0:
                remaining -= 1
                try:
                    latency, first = await _one(session, url, body, stream)
                except (aiohttp.ClientError, TimeoutError):
                    errors += 1
                    continue
                latencies.append(latency)
                if first is not None:
                    ttfts.append(first)

        start, cpu_start = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker(urls[i % len(urls)]) for i in range(concurrency)))
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return ClientResult(requests, errors, wall, latencies, ttfts, cpu)


async def client_process(
    url: str | Sequence[str],
    concurrency: int,
    requests: int,
    stream: bool,
    max_tokens: int = 4,
    prompt_tokens: int = 0,
    warmup: int = 5,
) -> ClientResult:
    """:func:`closed_loop` in a process of its own (so it never shares a proxy's cores'
    event loop with it), over one base URL or several; raises RuntimeError when that
    process fails."""
    urls = [url] if isinstance(url, str) else list(url)
    argv = [sys.executable, "-m", "sage_llm.bench.proxy_bench", "client",
            *(arg for u in urls for arg in ("--url", u)),
            "--concurrency", str(concurrency), "--requests", str(requests),
            "--max-tokens", str(max_tokens), "--prompt-tokens", str(prompt_tokens),
            "--warmup", str(warmup),
            ] + (["--stream"] if stream else [])  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed: {err.decode()[-500:]}")
    data = json.loads(out)
    return ClientResult(**data)


@dataclass(frozen=True)
class ProxyRow:
    """The figures of one target in one mode (times in ms)."""

    target: str
    stream: bool
    p50_c1_ms: float | None
    added_ms: float | None
    ttft_c1_ms: float | None
    req_per_s_c64: float
    errors: int
    req_per_s_c64_runs: tuple[float, ...] = ()
    """The req/s of each round (the figure above is their median)."""


def merged(results: Sequence[ClientResult]) -> ClientResult:
    """Several runs of one client as one (latencies together, counts and times summed)."""
    return ClientResult(
        requests=sum(r.requests for r in results),
        errors=sum(r.errors for r in results),
        wall_s=sum(r.wall_s for r in results),
        latencies_s=[v for r in results for v in r.latencies_s],
        ttfts_s=[v for r in results for v in r.ttfts_s],
        cpu_s=sum(r.cpu_s for r in results),
    )


def rows_from(
    results: Mapping[tuple[str, bool], Sequence[tuple[ClientResult, ClientResult]]],
) -> list[ProxyRow]:
    """Rows from ``{(target, stream): [(c1 result, c64 result) of each round]}``; ``added``
    is against the ``direct`` target of the same mode."""
    c1s = {key: merged([c1 for c1, _ in runs]) for key, runs in results.items()}
    rows = []
    for (target, stream), runs in results.items():
        c1 = c1s[(target, stream)]
        base = c1s.get(("direct", stream))
        p50, direct = c1.p50_ms(), base.p50_ms() if base else None
        added = None if p50 is None or direct is None or target == "direct" else p50 - direct
        rates = tuple(c64.req_per_s for _, c64 in runs)
        rows.append(
            ProxyRow(
                target, stream, p50, added, c1.ttft_p50_ms() if stream else None,
                # a round's own figure (an even count's lower middle, not a mean of two)
                statistics.median_low(rates), c1.errors + sum(c64.errors for _, c64 in runs),
                rates,
            )
        )  # fmt: skip
    return rows


def render_rows(rows: Sequence[ProxyRow], *, c1_engine: str = "instant") -> Table:
    """A rich table of :class:`ProxyRow` (``c1_engine``: what the c1 runs went to)."""
    behind = "engine-sim --instant" if c1_engine == "instant" else "engine-sim"
    title = f"Proxy overhead on loopback (c1 behind {behind}, c64 behind engine-sim)"
    table = Table(title=title)
    rounds = any(len(r.req_per_s_c64_runs) > 1 for r in rows)
    cols = ["target", "mode", "p50 c1 ms", "added ms", "TTFT c1 ms", "req/s c64", "errors"]
    for col in cols + (["req/s c64 by round"] if rounds else []):
        left = col in ("target", "mode")
        table.add_column(col, justify="left" if left else "right", no_wrap=left)

    def f(v: float | None, digits: int = 2) -> str:
        return "-" if v is None else f"{v:.{digits}f}"

    for r in rows:
        by_round = [" / ".join(f(v, 0) for v in r.req_per_s_c64_runs)] if rounds else []
        table.add_row(
            r.target, "stream" if r.stream else "plain", f(r.p50_c1_ms), f(r.added_ms),
            f(r.ttft_c1_ms), f(r.req_per_s_c64, 0), str(r.errors), *by_round,
        )  # fmt: skip
    return table


RUST_ROUTERS = ("vllm-router", "sglang-router")
"""The peers issue #4's rate targets are set against (the faster of the two)."""

RATE_TARGET = 0.8
"""Issue #4: at concurrency 64, at least this share of the faster Rust router's req/s."""

ADDED_TARGET_MS = 0.5
"""Issue #4: at concurrency 1, a proxy adds less than this to the p50 latency."""


def target_lines(rows: Sequence[ProxyRow]) -> list[str]:
    """Each ``sage-llm serve`` target's figures against issue #4's targets, one line per
    target and mode: its c64 req/s as a share of the faster Rust router's (when one ran)
    and its added c1 p50, each marked met or not."""
    lines: list[str] = []
    for stream in (False, True):
        mode = "streaming" if stream else "non-streaming"
        same = [r for r in rows if r.stream is stream]
        rust = [r for r in same if r.target in RUST_ROUTERS and r.req_per_s_c64 > 0]
        best = max(rust, key=lambda r: r.req_per_s_c64) if rust else None
        for _, name in SAGE_TARGETS:
            row = next((r for r in same if r.target == name), None)
            if row is None:
                continue
            parts: list[str] = []
            if best is not None:
                ratio = row.req_per_s_c64 / best.req_per_s_c64
                verdict = "met" if ratio >= RATE_TARGET else "not met"
                parts.append(f"c64 {ratio:.2f}x {best.target} ({verdict}: >= {RATE_TARGET:g}x)")
            if row.added_ms is not None:
                verdict = "met" if row.added_ms < ADDED_TARGET_MS else "not met"
                parts.append(
                    f"c1 added {row.added_ms:.2f} ms ({verdict}: < {ADDED_TARGET_MS:g} ms)"
                )
            if parts:
                lines.append(f"{name}, {mode}: " + "; ".join(parts))
    return lines


@dataclass(frozen=True)
class ProxyTarget:
    """Where to send a target's traffic, and its process group (None: the engine itself)."""

    url: str
    pgid: int | None


def bench_gateway(
    urls: Sequence[str],
    log_dir: Path,
    *,
    engine_stream: str,
    env: Mapping[str, str] | None = None,
    command: Sequence[str] | None = None,
) -> contextlib.AbstractAsyncContextManager[ManagedProcess]:
    """``sage-llm serve`` as the bench runs it (``fifo + round_robin``, no concurrency
    limit) over the engines at ``urls``; ``env`` and ``command``: its environment and
    program (see :func:`~sage_llm.bench.compare.sage_gateway`)."""
    from sage_llm.bench.compare import sage_gateway
    from sage_llm.bench.inprocess import Preset

    return sage_gateway(
        Preset("fifo + round_robin", "fifo", "round_robin"), urls, model="llama-3-8b",
        max_concurrent=10_000, log_dir=log_dir, engine_stream=engine_stream, env=env,
        command=command,
    )  # fmt: skip


@contextlib.asynccontextmanager
async def proxy_targets(
    urls: Sequence[str], peers: Sequence[str], log_dir: Path
) -> AsyncIterator[dict[str, ProxyTarget]]:
    """Every target of the bench over the engines at ``urls``, by name: ``direct`` (the
    first engine), ``sage-llm serve`` in each of :data:`SAGE_TARGETS`, then ``peers`` (Rust
    routers, and :data:`FORWARDER`); all stopped on exit."""
    from sage_llm.bench.procs import start_peer_router

    async with contextlib.AsyncExitStack() as stack:
        targets = {"direct": ProxyTarget(urls[0], None)}
        for engine_stream, name in SAGE_TARGETS:
            gw = await stack.enter_async_context(
                bench_gateway(urls, log_dir, engine_stream=engine_stream)
            )
            targets[name] = ProxyTarget(gw.url, gw.pid)
        for peer in peers:
            if peer == FORWARDER:
                proc = await stack.enter_async_context(python_forwarder(urls, log_dir))
                targets[peer] = ProxyTarget(proc.url, proc.pid)
                continue
            router = await start_peer_router(peer, urls, policy="round_robin", log_dir=log_dir)
            stack.push_async_callback(router.aclose)
            targets[peer] = ProxyTarget(router.url, router.process.pid)
        yield targets


@contextlib.asynccontextmanager
async def python_forwarder(
    urls: Sequence[str], log_dir: Path, *, startup_timeout_s: float = 30.0
) -> AsyncIterator[ManagedProcess]:
    """:mod:`sage_llm.bench.forwarder` over the engines at ``urls``, in a process of its
    own on a free port; stopped on exit."""
    from sage_llm.bench.procs import free_ports, serving

    (port,) = free_ports(1)
    argv = [sys.executable, "-m", "sage_llm.bench.forwarder", "--port", str(port), *urls]
    await asyncio.to_thread(log_dir.mkdir, parents=True, exist_ok=True)
    log_path = log_dir / f"{FORWARDER}-{port}.log"
    async with serving(
        FORWARDER, argv, port=port, log_path=log_path, timeout_s=startup_timeout_s
    ) as proc:
        yield proc


def check_proxy_options(peers: Sequence[str], prompt_tokens: int, max_tokens: int = 4) -> None:
    """:class:`ConfigError` for what would fail a proxy measurement only once its
    processes run: an unknown peer (the forwarder is named beside the routers), or requests
    longer than the engines' context (every one would be refused)."""
    refuse_repeats(peers, "peers")
    for peer in peers:
        if peer != FORWARDER and peer not in PEERS:
            known = ", ".join(sorted([*PEERS, FORWARDER]))
            raise ConfigError(f"unknown peer {peer!r} (known: {known})", key="peers")
    context = default_max_model_len("llama-3-8b")  # the concurrency-64 engines' model
    if prompt_tokens + max_tokens > context:
        raise ConfigError(
            f"{prompt_tokens} prompt tokens and {max_tokens} to generate exceed the "
            f"engines' context of {context} tokens",
            key="prompt_tokens",
        )


async def run_proxy_bench(
    *,
    engines: int = 2,
    speed: float = 1000.0,
    max_tokens: int = 4,
    requests_c1: int = 200,
    requests_c64: int = 2000,
    peers: Sequence[str] = DEFAULT_PEERS,
    log_dir: Path = Path("bench-out/proxy/logs"),
    rounds: int = 1,
    c1_engine: str = "instant",
    prompt_tokens: int = 0,
    c1_warmup: int = C1_WARMUP,
) -> list[ProxyRow]:
    """Measure every target in both modes, ``rounds`` times (see the module docstring)."""
    from sage_llm.bench.procs import start_engine_sims

    if rounds < 1:
        raise ValueError("rounds must be >= 1")
    if c1_warmup < 0:
        raise ValueError("c1_warmup must be >= 0")
    if c1_engine not in C1_ENGINES:
        raise ValueError(f"c1_engine must be one of {', '.join(C1_ENGINES)}, not {c1_engine!r}")
    results: dict[tuple[str, bool], list[tuple[ClientResult, ClientResult]]] = {}
    async with contextlib.AsyncExitStack() as stack:
        fleet = await stack.enter_async_context(await start_engine_sims(engines, speed=speed))
        targets = await stack.enter_async_context(proxy_targets(fleet.urls, peers, log_dir))
        c1_targets = targets
        if c1_engine == "instant":
            instant = await stack.enter_async_context(
                await start_engine_sims(engines, extra_args=["--instant"], log_dir=log_dir)
            )
            c1_targets = await stack.enter_async_context(
                proxy_targets(instant.urls, peers, log_dir)
            )
        names = list(targets)
        for stream in (False, True):
            for name in names:
                results[(name, stream)] = []
            for k in range(rounds):
                for name in names[k % len(names) :] + names[: k % len(names)]:
                    url = c1_targets[name].url
                    c1 = await client_process(
                        url, 1, requests_c1, stream, max_tokens, prompt_tokens, c1_warmup
                    )
                    url = targets[name].url
                    c64 = await client_process(
                        url, 64, requests_c64, stream, max_tokens, prompt_tokens
                    )
                    results[(name, stream)].append((c1, c64))
    return rows_from(results)


def proxy_bench_main(
    *,
    engines: int = 2,
    speed: float = 1000.0,
    max_tokens: int = 4,
    requests_c1: int = 200,
    requests_c64: int = 2000,
    peers: Sequence[str] = DEFAULT_PEERS,
    out: Path = Path("bench-out/proxy"),
    console: Console | None = None,
    rounds: int = 1,
    c1_engine: str = "instant",
    prompt_tokens: int = 0,
    c1_warmup: int = C1_WARMUP,
) -> int:
    """Entry point of ``sage-llm bench proxy``: prints the table, writes ``proxy.json``."""
    check_out_dir(out)
    check_proxy_options(peers, prompt_tokens, max_tokens)
    console = console or report_console()
    with console.status("measuring proxies …"):
        rows = asyncio.run(
            run_proxy_bench(
                engines=engines, speed=speed, max_tokens=max_tokens, requests_c1=requests_c1,
                requests_c64=requests_c64, peers=peers, log_dir=out / "logs", rounds=rounds,
                c1_engine=c1_engine, prompt_tokens=prompt_tokens, c1_warmup=c1_warmup,
            )
        )  # fmt: skip
    console.print(render_rows(rows, c1_engine=c1_engine))
    for line in target_lines(rows):
        console.print(line, highlight=False)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "proxy.json"
    path.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n", encoding="utf-8")
    console.print(f"wrote {path}")
    return 0


def _client_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="proxy_bench client")
    parser.add_argument(
        "--url", action="append", required=True, help="base URL (repeat: spread over several)"
    )
    parser.add_argument("--concurrency", type=at_least(1), default=1)
    parser.add_argument("--requests", type=at_least(1), default=100)
    parser.add_argument("--max-tokens", type=at_least(1), default=4)
    parser.add_argument("--prompt-tokens", type=at_least(0), default=0)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument(
        "--warmup", type=at_least(0), default=5, help="unmeasured requests first, per URL"
    )
    args = parser.parse_args(argv)
    result = asyncio.run(
        closed_loop(
            args.url, concurrency=args.concurrency, requests=args.requests, stream=args.stream,
            max_tokens=args.max_tokens, prompt_tokens=args.prompt_tokens, warmup=args.warmup,
        )
    )  # fmt: skip
    data: dict[str, Any] = asdict(result)
    sys.stdout.write(json.dumps(data))
    return 0


def _module_main(argv: Sequence[str]) -> int:
    """``python -m sage_llm.bench.proxy_bench``: the bench with its defaults, or ``client
    OPTIONS``, the load client the bench runs; anything else is refused (the bench's
    options are ``sage-llm bench proxy``'s)."""
    if argv and argv[0] == "client":
        return _client_main(argv[1:])
    if argv:
        sys.stderr.write(
            "usage: python -m sage_llm.bench.proxy_bench [client --help | client OPTIONS]\n"
            "(the bench with options: sage-llm bench proxy --help)\n"
        )
        return 0 if argv[0] in ("-h", "--help") else 2
    return proxy_bench_main()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(_module_main(sys.argv[1:]))
