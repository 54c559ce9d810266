"""Clocks: real time, and virtual time for asyncio code.

Everything time-dependent in sage-llm asks a :class:`Clock` for the time and sleeps with
``asyncio.sleep``. Under :func:`run_virtual` the event loop itself runs on virtual time:
whenever every task is waiting on a timer, the loop jumps straight to the next timer
instead of sleeping. A simulation of minutes of traffic then takes as long as its
computation, and is exactly repeatable when its random choices are seeded (a
``ControlPlaneManager``'s ``seed``; without one its routers draw from the operating
system). The virtual loop is meant for socket-free code
(in-process simulated engines); real I/O still works but does not advance virtual time.
"""

from __future__ import annotations

import asyncio
import selectors
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from datetime import datetime, timedelta
from typing import Any, Protocol, TypeVar, runtime_checkable

T = TypeVar("T")

VIRTUAL_EPOCH = datetime(2025, 1, 1)


@runtime_checkable
class Clock(Protocol):
    """Monotonic time in seconds, and a way to turn it into a wall-clock datetime."""

    def now(self) -> float: ...

    def to_datetime(self, t: float) -> datetime: ...

    async def sleep(self, seconds: float) -> None: ...


class RealClock:
    """The process's monotonic clock (the same one asyncio's default loop uses)."""

    def __init__(self) -> None:
        # wall-clock time of monotonic zero; re-read now and then so that wall-clock
        # adjustments (NTP) show up within a minute
        self._offset = time.time() - time.monotonic()
        self._offset_at = time.monotonic()

    def now(self) -> float:
        return time.monotonic()

    def to_datetime(self, t: float) -> datetime:
        if t - self._offset_at > 60.0:  # the wall clock read again once a minute (of t)
            mono = time.monotonic()
            self._offset = time.time() - mono
            self._offset_at = mono
        return datetime.fromtimestamp(self._offset + t)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class _VirtualSelector(selectors.BaseSelector):
    """Wraps a real selector; a blocking select() advances virtual time instead of waiting."""

    def __init__(self) -> None:
        self._real = selectors.DefaultSelector()
        self._advance: Callable[[float], None] = lambda _dt: None
        self.held = False

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._real.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.modify(fileobj, events, data)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = self._real.select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None or self.held:
            # Nothing scheduled, or time held: only real I/O (or another thread) can wake
            # the loop.
            return self._real.select(None)
        self._advance(timeout)
        return []

    def close(self) -> None:
        self._real.close()

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self._real.get_map()


class VirtualEventLoop(asyncio.SelectorEventLoop):
    """An event loop whose ``time()`` is virtual and jumps to the next timer when idle."""

    def __init__(self, start: float = 0.0) -> None:
        selector = _VirtualSelector()
        super().__init__(selector)
        self._virtual_now = float(start)
        selector._advance = self._advance
        self._selector_ = selector

    def hold_time(self, held: bool) -> None:
        """While time is held, an idle loop waits for real I/O or a call from another
        thread instead of jumping to its next timer (a service's loop holds it between
        calls: see :class:`~sage_llm.service.runner.LoopThread`). Call it on the loop."""
        self._selector_.held = held

    def _advance(self, dt: float) -> None:
        self._virtual_now += max(0.0, dt)

    def time(self) -> float:
        return self._virtual_now


class VirtualClock:
    """The clock of a :class:`VirtualEventLoop`. Create it inside the loop it reads."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        if not isinstance(self._loop, VirtualEventLoop):
            raise TypeError("VirtualClock needs a VirtualEventLoop (use sage_llm.sim.run_virtual)")

    def now(self) -> float:
        return self._loop.time()

    def to_datetime(self, t: float) -> datetime:
        return VIRTUAL_EPOCH + timedelta(seconds=t)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


def run_virtual(main: Coroutine[Any, Any, T] | Callable[[], Awaitable[T]], start: float = 0.0) -> T:
    """Run ``main`` to completion on a fresh :class:`VirtualEventLoop` and close the loop."""
    loop = VirtualEventLoop(start)
    try:
        coro = main if asyncio.iscoroutine(main) else _call(main)
        return loop.run_until_complete(coro)
    finally:
        try:
            _cancel_all(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()


async def _call(fn: Callable[[], Awaitable[T]]) -> T:
    return await fn()


def _cancel_all(loop: asyncio.AbstractEventLoop) -> None:
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))


def current_clock() -> Clock:
    """The clock matching the running loop: virtual on a VirtualEventLoop, else real."""
    loop = asyncio.get_running_loop()
    if isinstance(loop, VirtualEventLoop):
        return VirtualClock(loop)
    return RealClock()
