"""Choosing the event loop for long-running commands (``serve``, ``engine-sim``).

uvloop (a libuv-based loop) is used when installed and asked for (``auto`` or
``uvloop``); ``asyncio`` keeps the standard loop. On this project's gateway benchmarks it
has made no difference to the CPU per request beyond the machine's noise (see
docs/benchmarks.md, "Proxy overhead"), so it stays optional. The library itself never
sets a loop policy: only the command line does, for the process it runs.

:func:`tune_collector_for_serving` is the other process-wide setting ``serve`` makes: the
cyclic garbage collector's young generation is collected every 50,000 net container
allocations instead of CPython's 700, after start-up's objects are frozen out of its
reach.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.util
from collections.abc import Coroutine
from typing import Any, Literal, TypeVar, cast, get_args

T = TypeVar("T")

LoopName = Literal["auto", "uvloop", "asyncio"]
LOOP_NAMES: tuple[str, ...] = get_args(LoopName)


def uvloop_available() -> bool:
    """True when the ``uvloop`` package can be imported."""
    return importlib.util.find_spec("uvloop") is not None


def resolve_loop(name: str) -> Literal["uvloop", "asyncio"]:
    """The loop ``name`` stands for; ``ValueError`` for an unknown name or for ``uvloop``
    when it is not installed."""
    if name not in LOOP_NAMES:
        raise ValueError(f"unknown event loop {name!r}; use one of {', '.join(LOOP_NAMES)}")
    if name == "asyncio":
        return "asyncio"
    if uvloop_available():
        return "uvloop"
    if name == "uvloop":
        raise ValueError("event loop 'uvloop' asked for but the uvloop package is not installed")
    return "asyncio"


def run(main: Coroutine[Any, Any, T], loop: str = "auto") -> T:
    """``asyncio.run(main)`` on the loop ``loop`` names (see :func:`resolve_loop`)."""
    if resolve_loop(loop) == "uvloop":
        uvloop = importlib.import_module("uvloop")  # optional: not a dependency
        return cast(T, uvloop.run(main))
    return asyncio.run(main)


SERVING_GC_THRESHOLD = 50_000
"""Net container allocations between two collections of the young generation in a serving
process (CPython's default is 700). Each request leaves a few reference cycles (asyncio's
tasks and futures) that only the collector frees, and each young collection walks every
object of the requests in flight: at 700, a gateway at concurrency 64 ran one per 30 or
so requests, some 6% of its CPU. At 50,000 they are rare, and the cycles waiting for the
next one hold some tens of megabytes at most."""


def tune_collector_for_serving(threshold: int = SERVING_GC_THRESHOLD) -> None:
    """Set up the garbage collector of a long-running serving process: collect once, freeze
    what exists (modules, configuration, the objects start-up made: never garbage, so no
    later collection walks them again), and collect the young generation every
    ``threshold`` net allocations. Process-wide: only the command line calls it, for the
    process it runs."""
    if threshold < 1:
        raise ValueError("threshold must be at least 1")
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(threshold, older, oldest)
