"""Choosing the event loop for long-running commands (``serve``, ``engine-sim``).

uvloop (a libuv-based loop) is used when installed and asked for (``auto`` or
``uvloop``); ``asyncio`` keeps the standard loop. On this project's gateway benchmarks it
has made no difference to the CPU per request beyond the machine's noise (see
docs/benchmarks.md, "Proxy overhead"), so it stays optional. The library itself never
sets a loop policy: only the command line does, for the process it runs.
"""

from __future__ import annotations

import asyncio
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
