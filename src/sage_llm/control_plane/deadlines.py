"""Many request deadlines on few event-loop timers.

Every request with a time limit needs a timer, and asyncio's (``asyncio.timeout``: a
context object, a timer handle pushed on the loop's heap, its cancellation and the
task's cancel/uncancel bookkeeping) costs about as much CPU as routing the request.
:class:`DeadlineTimers` shares one timer among the deadlines that fall in the same short
interval: a deadline is rounded *up* to a multiple of its bucket width, a thousandth of
its time limit and at least a millisecond (a 600 s limit fires within 0.6 s after it, a
200 ms one within 1 ms), so a request never times out early and at most 0.1% late.
A deadline that fires calls the function it was registered with; one that is no longer
needed is withdrawn with :meth:`DeadlineTimers.discard`, and a bucket left empty cancels
its timer.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable

log = logging.getLogger("sage_llm.deadlines")

_MIN_WIDTH_S = 0.001
_RELATIVE_WIDTH = 0.001


class DeadlineTimers:
    """Deadlines (on the event loop's clock) that call a function when they pass."""

    __slots__ = ("_buckets", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._buckets: dict[float, tuple[set[Callable[[], None]], asyncio.TimerHandle]] = {}

    def __len__(self) -> int:
        """Deadlines pending."""
        return sum(len(calls) for calls, _ in self._buckets.values())

    def add(self, timeout_s: float, call: Callable[[], None]) -> float:
        """Call ``call()`` ``timeout_s`` seconds from now (at most 0.1% or 1 ms later).
        Returns the key :meth:`discard` takes."""
        width = max(_MIN_WIDTH_S, timeout_s * _RELATIVE_WIDTH)
        at = math.ceil((self._loop.time() + timeout_s) / width) * width
        bucket = self._buckets.get(at)
        if bucket is None:
            handle = self._loop.call_at(at, self._fire, at)
            self._buckets[at] = ({call}, handle)
        else:
            bucket[0].add(call)
        return at

    def discard(self, at: float, call: Callable[[], None]) -> None:
        """Withdraw the deadline :meth:`add` set for ``call`` (it returned ``at``)."""
        bucket = self._buckets.get(at)
        if bucket is None:
            return
        calls, handle = bucket
        calls.discard(call)
        if not calls:
            handle.cancel()
            del self._buckets[at]

    def _fire(self, at: float) -> None:
        bucket = self._buckets.pop(at, None)
        if bucket is None:
            return
        for call in list(bucket[0]):
            try:
                call()
            except Exception:  # one failing deadline must not stop the others
                log.exception("deadline callback failed")

    def close(self) -> None:
        """Cancel every timer (no function is called)."""
        for _futures, handle in self._buckets.values():
            handle.cancel()
        self._buckets.clear()
