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

from sage_llm.errors import InvalidRequestError

log = logging.getLogger("sage_llm.deadlines")

_MIN_WIDTH_S = 0.001
_RELATIVE_WIDTH = 0.001


def time_limit_arg(value: float | None, param: str) -> float | None:
    """A time limit as given to the manager's calls: None (and infinity) for none, else
    a positive number of seconds; anything else is the caller's error
    (:class:`~sage_llm.errors.InvalidRequestError` naming ``param``), raised before a
    request is taken."""
    if value is None or (type(value) is float and 0.0 < value < math.inf):
        return value  # the common cases, in one test
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise InvalidRequestError(
            f"{param} must be a positive number of seconds or None, got {value!r}", param=param
        )
    return None if value == math.inf else value


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


class TimeLimit:
    """``async with TimeLimit(timers, timeout_s)``: :func:`asyncio.timeout` on a
    :class:`DeadlineTimers` deadline (``timers`` None: a timer of its own), for a block
    run once per request. When the block has not ended ``timeout_s`` seconds after it
    began (at most 0.1% or 1 ms later), its task is cancelled and :class:`TimeoutError`
    raised out of the block, as :func:`asyncio.timeout` does: a cancellation of the task
    from elsewhere, at the same time or not, goes on up as :class:`asyncio.CancelledError`.
    ``timeout_s`` None sets no limit. It costs a third of :func:`asyncio.timeout_at`
    (no context object of asyncio's, and a timer shared with other requests).
    ``on_expire`` is called when the limit passes, just before the task is cancelled."""

    __slots__ = (
        "_at", "_cancelling", "_expired", "_handle", "_on_expire", "_task", "_timeout_s",
        "_timers",
    )  # fmt: skip

    def __init__(
        self,
        timers: DeadlineTimers | None,
        timeout_s: float | None,
        on_expire: Callable[[], object] | None = None,
    ) -> None:
        self._timers = timers
        self._timeout_s = timeout_s
        self._on_expire = on_expire
        self._task: asyncio.Task[object] | None = None
        self._cancelling = 0
        self._expired = False
        self._at: float | None = None
        self._handle: asyncio.TimerHandle | None = None

    @property
    def expired(self) -> bool:
        """Whether the limit passed (the block was cancelled for it)."""
        return self._expired

    async def __aenter__(self) -> TimeLimit:
        timeout_s = self._timeout_s
        if timeout_s is None:
            return self
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("TimeLimit must be used inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        timers = self._timers
        if timers is None:
            self._handle = asyncio.get_running_loop().call_later(timeout_s, self._expire)
        else:
            self._at = timers.add(timeout_s, self._expire)
        return self

    def _expire(self) -> None:
        self._at = self._handle = None
        task = self._task
        if task is not None and not task.done():
            self._expired = True
            if self._on_expire is not None:  # before the cancellation reaches anyone
                self._on_expire()
            task.cancel()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        if self._at is not None and self._timers is not None:
            self._timers.discard(self._at, self._expire)
        if self._handle is not None:
            self._handle.cancel()
        self._at = self._handle = None
        task = self._task
        # as asyncio.timeout: the cancellation is ours unless another came too
        if (
            self._expired
            and task is not None
            and task.uncancel() <= self._cancelling
            and exc_type is asyncio.CancelledError
        ):
            raise TimeoutError from exc
