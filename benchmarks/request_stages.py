"""Where a lone request's time goes inside ``sage-llm serve`` (issue #4 item 6, concurrency 1).

The proxy bench gives the latency a proxy adds at concurrency 1 as one number. This script
splits the gateway's share of it into steps. It starts two engines (``engine-sim
--instant`` by default, as the proxy bench's concurrency-1 runs do; ``--engine sim`` for
``engine-sim --speed 1000``) and one ``sage-llm serve`` over them (``fifo + round_robin``,
as the bench runs it). That gateway runs with timestamps taken at the entry and exit of
the functions a ``/v1/completions`` request passes through (:data:`PROBES`, or
:data:`STREAM_PROBES` with ``--stream``):

* the front's ``data_received``;
* body parsing, admission, dispatch;
* the engine call, the answer's arrival and the request's end;
* the response (or each write of the stream), and the batched writes.

Then one closed-loop client process sends ``--requests`` requests one at a time. The
script prints, for each event, the median time since the client's bytes arrived
(``at``) and the median time since the event before it (``step``).

The probes add a few microseconds each, and the names they wrap are internal: when one
is renamed the script stops with the name it could not find, rather than measuring
something else. Linux or macOS (the gateway reports on ``SIGUSR1``). Run from the
repository root::

    .venv/bin/python benchmarks/request_stages.py
    .venv/bin/python benchmarks/request_stages.py --engine-stream always --requests 1000
    .venv/bin/python benchmarks/request_stages.py --stream
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib
import inspect
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

PROBES: tuple[tuple[str, str, str], ...] = (
    ("sage_llm.gateway.lean", "LeanConnection.data_received", "client bytes in"),
    ("sage_llm.gateway.lean_routes", "LeanRoutes.__call__", "route handler"),
    ("sage_llm.gateway.openai", "parse_generation", "parse_generation"),
    ("sage_llm.control_plane.manager", "ControlPlaneManager._submit", "admit (_submit)"),
    ("sage_llm.control_plane.dispatcher", "Dispatcher.start_here", "dispatch (start_here)"),
    ("sage_llm.engines.http", "HTTPEngineClient.complete", "engine call"),
    ("sage_llm.writebatch", "WriteBatch.flush", "batched writes sent"),
    ("sage_llm.engines.fastclient", "_Conn.data_received", "engine bytes in"),
    ("sage_llm.control_plane.dispatcher", "Dispatcher._finish", "request end (_finish)"),
    ("sage_llm.gateway.relay", "completion_body", "completion_body"),
    ("sage_llm.gateway.lean", "LeanConnection.respond", "respond"),
)
"""(module, qualified name, label) of every function timed, in the order a request
reaches them."""

STREAM_PROBES: tuple[tuple[str, str, str], ...] = (
    ("sage_llm.gateway.lean", "LeanConnection.data_received", "client bytes in"),
    ("sage_llm.gateway.lean_routes", "LeanRoutes.__call__", "route handler"),
    ("sage_llm.gateway.openai", "parse_generation", "parse_generation"),
    ("sage_llm.control_plane.manager", "ControlPlaneManager._submit", "admit (_submit)"),
    ("sage_llm.control_plane.dispatcher", "Dispatcher.start_here", "dispatch (start_here)"),
    ("sage_llm.engines.http", "HTTPEngineClient._fast_send", "engine request"),
    ("sage_llm.writebatch", "WriteBatch.flush", "batched writes sent"),
    ("sage_llm.engines.fastclient", "_Conn.data_received", "engine bytes in"),
    ("sage_llm.control_plane.dispatcher", "Dispatcher._first_output", "first output"),
    ("sage_llm.gateway.lean", "LeanStream.write", "stream write"),
    ("sage_llm.control_plane.dispatcher", "Dispatcher._finish", "request end (_finish)"),
    ("sage_llm.gateway.lean", "LeanStream.write_eof", "last write (write_eof)"),
)
"""The same for a streamed request (``--stream``): the engine's answer comes in several
reads, each numbered (``#2``, …), and so do the stream's writes."""

FIRST = "client bytes in >"
"""The event each request's times are measured from."""


def _install(
    events: list[tuple[int, str]], probes: Sequence[tuple[str, str, str]] = PROBES
) -> None:
    """Wrap every function of ``probes`` to note ``(ns, label + ' >' / ' <')``."""
    now = time.perf_counter_ns
    for module_name, qualname, label in probes:
        owner: Any = importlib.import_module(module_name)
        *path, name = qualname.split(".")
        for part in path:
            owner = getattr(owner, part)
        fn = inspect.getattr_static(owner, name)  # AttributeError names a renamed probe
        if isinstance(fn, staticmethod):
            raise TypeError(f"{qualname}: static methods are not probed")
        enter, leave = label + " >", label + " <"
        if inspect.iscoroutinefunction(fn):

            def make_async(f: Any, enter: str, leave: str) -> Callable[..., Any]:
                @functools.wraps(f)
                async def wrapper(*args: Any, **kwargs: Any) -> Any:
                    events.append((now(), enter))
                    try:
                        return await f(*args, **kwargs)
                    finally:
                        events.append((now(), leave))

                return wrapper

            setattr(owner, name, make_async(fn, enter, leave))
        else:

            def make_sync(f: Any, enter: str, leave: str) -> Callable[..., Any]:
                @functools.wraps(f)
                def wrapper(*args: Any, **kwargs: Any) -> Any:
                    events.append((now(), enter))
                    try:
                        return f(*args, **kwargs)
                    finally:
                        events.append((now(), leave))

                return wrapper

            setattr(owner, name, make_sync(fn, enter, leave))
        if not path:  # a module-level function: rebind it where it was imported by name
            for module in list(sys.modules.values()):
                if module is not None and getattr(module, name, None) is fn:
                    setattr(module, name, getattr(owner, name))


def summarize(events: Sequence[tuple[int, str]], skip: int = 5) -> list[tuple[str, float]]:
    """``(event, median µs since the request's first event)``, in order of those medians;
    each request runs from one :data:`FIRST` to the next (concurrency 1), the first
    ``skip`` requests left out; an event seen in fewer than half the requests is left out.
    The *n*-th occurrence of an event in a request is its own event (``#n``)."""
    requests: list[list[tuple[int, str]]] = []
    for t, name in events:
        if name == FIRST:
            requests.append([(t, name)])
        elif requests:
            requests[-1].append((t, name))
    offsets: dict[str, list[float]] = defaultdict(list)
    for request in requests[skip:]:
        start = request[0][0]
        seen: Counter[str] = Counter()
        for t, name in request:
            seen[name] += 1
            key = name if seen[name] == 1 else f"{name} #{seen[name]}"
            offsets[key].append((t - start) / 1000.0)
    counted = len(requests[skip:])
    rows = [(k, statistics.median(v)) for k, v in offsets.items() if 2 * len(v) >= counted]
    return sorted(rows, key=lambda row: row[1])


def _probe_serve(argv: Sequence[str]) -> int:
    """The gateway side: probes installed, ``sage-llm serve argv``, stats on SIGUSR1."""
    out = Path(os.environ["SAGE_STAGES_OUT"])
    events: list[tuple[int, str]] = []
    _install(events, STREAM_PROBES if os.environ.get("SAGE_STAGES_STREAM") else PROBES)

    def dump(_signum: int, _frame: object) -> None:
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(summarize(events)), encoding="utf-8")
        tmp.replace(out)

    signal.signal(signal.SIGUSR1, dump)
    from sage_llm.cli import main

    sys.argv = ["sage-llm", *argv]
    main()
    return 0


async def _measure(
    engine_stream: str,
    requests: int,
    log_dir: Path,
    *,
    stream: bool = False,
    engine: str = "instant",
) -> list[tuple[str, float]]:
    from sage_llm.bench.procs import start_engine_sims
    from sage_llm.bench.proxy_bench import bench_gateway, client_process

    out = log_dir / "stages.json"
    env = {**os.environ, "SAGE_STAGES_OUT": str(out), "SAGE_STAGES_STREAM": "1" if stream else ""}
    probed = (sys.executable, __file__, "--probe-serve")
    extra = ("--instant",) if engine == "instant" else ()
    async with (
        await start_engine_sims(2, speed=1000.0, log_dir=log_dir, extra_args=extra) as fleet,
        bench_gateway(
            fleet.urls, log_dir, engine_stream=engine_stream, env=env, command=probed
        ) as proc,
    ):
        result = await client_process(proc.url, 1, requests, stream)
        if result.errors:
            raise RuntimeError(f"{result.errors} of {requests} requests failed")
        os.kill(proc.pid, signal.SIGUSR1)
        for _ in range(100):
            if out.exists():
                break
            await asyncio.sleep(0.05)
        else:
            raise RuntimeError(f"the gateway wrote no stages; see {proc.log_path}")
    return [(str(name), float(at)) for name, at in json.loads(out.read_text("utf-8"))]


def render(rows: Sequence[tuple[str, float]]) -> str:
    """The table the script prints: event, ``at`` and ``step`` in µs."""
    lines = [f"{'event':<34} {'at µs':>9} {'step µs':>9}"]
    before = 0.0
    for name, at in rows:
        lines.append(f"{name:<34} {at:>9.0f} {at - before:>9.0f}")
        before = at
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    if args_in[:1] == ["--probe-serve"]:
        return _probe_serve(args_in[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--engine-stream", choices=("sampled", "always", "client"), default="client"
    )
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--stream", action="store_true", help="streamed requests")
    parser.add_argument(
        "--engine", choices=("instant", "sim"), default="instant",
        help="engine-sim --instant (default) or engine-sim --speed 1000",
    )  # fmt: skip
    args = parser.parse_args(args_in)
    if args.requests < 10:
        parser.error("--requests must be at least 10")
    with tempfile.TemporaryDirectory(prefix="sage-stages-") as tmp:
        rows = asyncio.run(
            _measure(
                args.engine_stream, args.requests, Path(tmp), stream=args.stream,
                engine=args.engine,
            )
        )  # fmt: skip
    kind = "streamed" if args.stream else "non-streaming"
    print(
        f"sage-llm serve, engine_stream = {args.engine_stream!r}, {args.engine} engines: "
        f"a lone {kind} request, medians of {args.requests - 5}"
    )
    print(render(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
