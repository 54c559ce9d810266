"""Instructions the gateway's request path runs per request, counted by valgrind (issue #4).

Timed figures move by 10–30% on the shared development machine. The instructions a piece
of code executes do not: the same code counts the same to within about 1% (request ids are
random and the clock moves), so a change of a few percent shows. This script counts them for the
gateway's Python request path, for one checkout or two side by side (``--baseline-src``).

The path runs in one process with no sockets:

* the lean routes' handler (:class:`~sage_llm.gateway.lean_routes.LeanRoutes`);
* body parsing and validation, admission, scheduling and routing;
* the engine call, the request's end and its accounting, and the response's body;
* an in-process engine that answers at once: one piece, or 4 streamed chunks with
  ``--stream`` (a list of one per read, as the HTTP client yields them: a lone stream's
  engine call runs in the relaying task).

Requests run 64 at a time, through ``fifo + round_robin`` over two instances, as in the
proxy bench. Each count is taken twice under ``valgrind --tool=callgrind``, once with
``--warm`` requests and once with ``--warm`` + ``--requests``. The difference divided by
``--requests`` is the count per request, without start-up.

The HTTP front, the engine transport and the kernel are not in it: ``cpu_budget.py``
measures those, in time. It needs valgrind (``apt-get install valgrind``), and the runs
take a few minutes (they run in parallel). Run from the repository root::

    .venv/bin/python benchmarks/gateway_instructions.py
    git worktree add /tmp/base <commit>
    .venv/bin/python benchmarks/gateway_instructions.py --stream --baseline-src /tmp/base/src

``--time RUNS`` times the same workload instead (no valgrind): RUNS runs of each source
tree, alternated, each in a process of its own, and prints the best and the median
microseconds per request (and the ratio of the best). A timed figure moves with the
machine's load; the instruction count does not, but it weighs every instruction alike,
where the time also shows what an instruction costs (an allocation, a cache miss, a call
into C)::

    .venv/bin/python benchmarks/gateway_instructions.py --time 7 --requests 20000 \\
        --baseline-src /tmp/base/src
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import re
import shutil
import statistics
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from sage_llm.engines.base import Chunk, EngineStats, Usage

SRC = Path(__file__).resolve().parents[1] / "src"
MODEL = "llama-3-8b"
PROMPT = "Hello, my name is Bob and I like to eat"
_COLLECTED = re.compile(rb"Collected : (\d+)")
_SECONDS = re.compile(rb"seconds ([0-9.e-]+)")


# --- the workload (run inside valgrind: python gateway_instructions.py --child N STREAM) ---


class _InstantEngine:
    """An engine client that answers at once: one chunk, or 4 streamed ones, each after a
    turn of the event loop, through ``generate`` or, as the HTTP client gives them,
    ``generate_batches`` (a list per read from the engine: here one chunk each)."""

    def __init__(self, instance_id: str) -> None:
        self.instance_id = instance_id

    async def complete(self, req: Any) -> list[Chunk]:
        await asyncio.sleep(0)
        return [Chunk(text=" a b c d", finish_reason="length", usage=Usage(13, 4, 0))]

    async def generate(self, req: Any) -> AsyncIterator[Chunk]:
        for i in range(3):
            await asyncio.sleep(0)
            yield Chunk(text=f" w{i}")
        await asyncio.sleep(0)
        yield Chunk(text=" w3", finish_reason="length", usage=Usage(13, 4, 0))

    async def generate_batches(self, req: Any) -> AsyncIterator[list[Chunk]]:
        async for chunk in self.generate(req):
            yield [chunk]

    async def prefill(self, req: Any) -> Any:
        raise NotImplementedError

    async def health(self) -> bool:
        return True

    async def stats(self) -> EngineStats:
        return EngineStats()

    async def aclose(self) -> None:
        return None


class _Sink:
    def __init__(self, conn: _Connection) -> None:
        self._conn = conn

    async def write(self, data: bytes) -> None:
        self._conn.out.append(data)

    async def write_eof(self, data: bytes = b"") -> None:
        self._conn.out.append(data)
        self._conn.status = 200


class _Connection:
    """What the lean routes answer on: the status and the bytes, kept."""

    answered = False

    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.status = 0

    def respond(
        self, status: int, body: bytes, *, content_type: str, headers: Mapping[str, str]
    ) -> None:
        self.answered = True
        self.status = status
        self.out.append(body)

    def open_stream(self, status: int, *, content_type: str, headers: Mapping[str, str]) -> _Sink:
        self.answered = True
        return _Sink(self)


async def _workload(warm: int, measured: int, stream: bool) -> float:
    from sage_llm import jsonutil
    from sage_llm.control_plane.manager import ControlPlaneManager
    from sage_llm.gateway.lean import LeanRequest
    from sage_llm.gateway.lean_routes import LeanRoutes
    from sage_llm.gateway.settings import ResolvedGateway, default_settings
    from sage_llm.types import ExecutionInstance

    cp = ControlPlaneManager(
        scheduling_policy="fifo", routing_strategy="round_robin", mode="http",
        enable_pd_separation=False,
        engine_factory=lambda inst: _InstantEngine(inst.instance_id),
        engine_stream="client", seed=0,
    )  # fmt: skip
    for i in range(2):
        instance = ExecutionInstance(
            f"engine-{i}", "127.0.0.1", 18101 + i, MODEL, max_concurrent_requests=100_000
        )
        cp.register_instance(instance)
    await cp.start()
    routes = LeanRoutes(cp, ResolvedGateway.from_settings(default_settings()))
    body = jsonutil.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "stream": stream})
    head = {"host": "127.0.0.1:8000", "content-type": "application/json",
            "content-length": str(len(body))}  # fmt: skip
    left = 0

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            conn = _Connection()
            await routes(LeanRequest("POST", "/v1/completions", dict(head), body), conn)  # type: ignore[arg-type]
            if conn.status != 200:
                raise RuntimeError(f"request failed: {conn.status} {conn.out}")

    for n in (warm, measured):
        left = n
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(64)))
    elapsed = time.perf_counter() - started  # of the measured requests only
    await cp.stop()
    return elapsed


def _child(argv: Sequence[str]) -> int:
    warm, measured, stream = int(argv[0]), int(argv[1]), argv[2] == "stream"
    gc.set_threshold(50_000, 10, 10)  # as sage-llm serve sets it
    elapsed = asyncio.run(_workload(warm, measured, stream))
    if measured:
        print(f"seconds {elapsed!r}")
    return 0


# --- the driver ---------------------------------------------------------------------------


async def _run(src: Path, warm: int, measured: int, stream: bool, *, counted: bool) -> bytes:
    """What one run of the workload from ``src`` reports: its instruction count under
    valgrind (``counted``), or the seconds its measured requests took."""
    env = {**os.environ, "PYTHONPATH": str(src), "PYTHONHASHSEED": "0"}
    argv = [sys.executable, __file__, "--child", str(warm), str(measured),
            "stream" if stream else "plain"]  # fmt: skip
    if counted:
        argv = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *argv]
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    found = _COLLECTED.search(err) if counted else _SECONDS.search(out)
    if proc.returncode != 0 or found is None:
        tail = (out + err).decode(errors="replace")[-2000:]
        kind = "counted" if counted else "timed"
        raise RuntimeError(f"the {kind} run failed ({proc.returncode}): {tail}")
    return found.group(1)


async def _count(src: Path, warm: int, measured: int, stream: bool) -> int:
    """Instructions of one run of the workload from ``src``."""
    return int(await _run(src, warm, measured, stream, counted=True))


async def _timed(src: Path, warm: int, measured: int, stream: bool) -> float:
    """Microseconds per request of one run of the workload from ``src`` (no valgrind)."""
    return float(await _run(src, warm, measured, stream, counted=False)) / measured * 1e6


async def time_per_request(
    sources: Mapping[str, Path], warm: int, requests: int, stream: bool, runs: int
) -> dict[str, list[float]]:
    """Microseconds per request of each source tree over ``runs`` runs each, one at a time
    and alternated (so that a busier moment of the machine falls on all of them)."""
    times: dict[str, list[float]] = {name: [] for name in sources}
    for _ in range(runs):
        for name, src in sources.items():
            times[name].append(await _timed(src, warm, requests, stream))
    return times


async def per_request(
    sources: Mapping[str, Path], warm: int, requests: int, stream: bool
) -> dict[str, float]:
    """Instructions per request of each source tree, by name (all runs in parallel)."""
    runs = {
        (name, n): _count(src, warm, n, stream)
        for name, src in sources.items()
        for n in (0, requests)
    }
    counts = dict(zip(runs, await asyncio.gather(*runs.values()), strict=True))
    return {name: (counts[(name, requests)] - counts[(name, 0)]) / requests for name in sources}


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    if args_in[:1] == ["--child"]:
        return _child(args_in[1:])
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--warm", type=int, default=200)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--baseline-src", type=Path, default=None)
    parser.add_argument(
        "--time", type=int, default=0, metavar="RUNS",
        help="time RUNS runs of each instead of counting instructions (no valgrind)",
    )  # fmt: skip
    args = parser.parse_args(args_in)
    if args.requests < 100 or args.warm < 0 or args.time < 0:
        parser.error("--requests must be at least 100, --warm and --time at least 0")
    if not args.time and shutil.which("valgrind") is None:
        parser.error("valgrind is not installed (apt-get install valgrind)")
    sources = {"this checkout": SRC}
    if args.baseline_src is not None:
        if not (args.baseline_src / "sage_llm").is_dir():
            parser.error(f"--baseline-src {args.baseline_src}: no sage_llm package there")
        sources["baseline"] = args.baseline_src.resolve()
    mode = "streamed" if args.stream else "non-streaming"
    if args.time:
        times = asyncio.run(
            time_per_request(sources, args.warm, args.requests, args.stream, args.time)
        )
        print(f"µs per {mode} request (over {args.requests}, after {args.warm} warm-up; "
              f"best and median of {args.time} runs)")  # fmt: skip
        for name, values in times.items():
            print(f"  {name:<14} {min(values):>8.1f} {statistics.median(values):>8.1f}")
        if "baseline" in times:
            ratio = min(times["this checkout"]) / min(times["baseline"])
            print(f"  ratio          {ratio:>8.3f}")
        return 0
    # the warm-up requests run in both counts: they only make the path warm
    counts = asyncio.run(per_request(sources, args.warm, args.requests, args.stream))
    print(f"instructions per {mode} request (over {args.requests}, after {args.warm} warm-up)")
    for name, value in counts.items():
        print(f"  {name:<14} {value:>12,.0f}")
    if "baseline" in counts:
        print(f"  ratio          {counts['this checkout'] / counts['baseline']:>12.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
