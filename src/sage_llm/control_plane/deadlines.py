"""Many request deadlines on few event-loop timers.

Every request with a time limit needs a timer, and asyncio's (``asyncio.timeout``: a
context object, a timer handle pushed on the loop's heap, its cancellation and the
task's cancel/uncancel bookkeeping) costs about as much CPU as routing the request.
:class:`DeadlineTimers` shares one timer among the deadlines that fall in the same short
interval: a deadline is rounded *up* to a multiple of its bucket width, a thousandth of
its time limit and at least a millisecond (a 600 s limit fires within 0.6 s after it, a
200 ms one within 1 ms), so a request never times out early and at most 0.1% late.
A deadline that fires sets :class:`TimeoutError` on the future it was registered with,
unless that future is already done; one that is no longer needed is withdrawn with
:meth:`DeadlineTimers.discard`, and a bucket left empty cancels its timer.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

_MIN_WIDTH_S = 0.001
_RELATIVE_WIDTH = 0.001


class DeadlineTimers:
    """Deadlines (on the event loop's clock) that fail futures when they pass."""

    __slots__ = ("_buckets", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._buckets: dict[float, tuple[set[asyncio.Future[Any]], asyncio.TimerHandle]] = {}

    def __len__(self) -> int:
        """Deadlines pending."""
        return sum(len(futures) for futures, _ in self._buckets.values())

    def add(self, timeout_s: float, future: asyncio.Future[Any]) -> float:
        """Fail ``future`` with :class:`TimeoutError` ``timeout_s`` seconds from now (at most
        0.1% or 1 ms later). Returns the key :meth:`discard` takes."""
        width = max(_MIN_WIDTH_S, timeout_s * _RELATIVE_WIDTH)
        at = math.ceil((self._loop.time() + timeout_s) / width) * width
        bucket = self._buckets.get(at)
        if bucket is None:
            futures = {future}
            handle = self._loop.call_at(at, self._fire, at)
            self._buckets[at] = (futures, handle)
        else:
            bucket[0].add(future)
        return at

    def discard(self, at: float, future: asyncio.Future[Any]) -> None:
        """Withdraw the deadline :meth:`add` set for ``future`` (returned ``at``)."""
        bucket = self._buckets.get(at)
        if bucket is None:
            return
        futures, handle = bucket
        futures.discard(future)
        if not futures:
            handle.cancel()
            del self._buckets[at]

    def _fire(self, at: float) -> None:
        bucket = self._buckets.pop(at, None)
        if bucket is None:
            return
        for future in bucket[0]:
            if not future.done():
                future.set_exception(TimeoutError())

    def close(self) -> None:
        """Cancel every timer (the futures are left as they are)."""
        for _futures, handle in self._buckets.values():
            handle.cancel()
        self._buckets.clear()
