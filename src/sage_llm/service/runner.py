"""A background thread running one asyncio event loop, for synchronous callers.

SAGE calls a service's ``process`` synchronously, from any of its operator threads. A
service owns one :class:`LoopThread`; its control plane lives on that loop, and callers
submit coroutines to it with :meth:`LoopThread.run` (blocking) or :meth:`LoopThread.arun`
(awaitable from another event loop)::

    runner = LoopThread("sage-llm")
    runner.start(init)                # runs ``init()`` on the loop; re-raises its error
    answer = runner.run(handle(payload))
    runner.stop(final)                # runs ``final()``, cancels what is left, joins

Stopping cancels every call still in flight (before ``final`` runs: its callers are told
the service stopped, not what closing its engine did to them); their callers get
:class:`~sage_llm.errors.ControlPlaneNotRunningError`.

On a :class:`~sage_llm.sim.clock.VirtualEventLoop` virtual time passes only while the
loop works for a caller (a call, ``init`` or ``final``): between calls the loop waits for
the next one, as a real one would, rather than jump through its background timers (health
probes, stats) at full speed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from sage_llm.errors import ConfigError, ControlPlaneNotRunningError, SageLLMError

__all__ = ["LoopFactory", "LoopThread", "check_loop_factory"]

T = TypeVar("T")

START_TIMEOUT_S = 60.0
"""How long :meth:`LoopThread.start` waits for its ``init`` by default."""
LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def check_loop_factory(loop_factory: object) -> None:
    """Raise ``ConfigError`` (key ``loop_factory``) unless it is None or callable."""
    if loop_factory is not None and not callable(loop_factory):
        raise ConfigError(
            "must be a callable that returns a new asyncio event loop, got "
            f"{type(loop_factory).__name__}",
            key="loop_factory",
        )


class LoopThread:
    """One daemon thread running one event loop; thread-safe to call from any thread."""

    def __init__(self, name: str = "sage-llm-service", loop_factory: LoopFactory | None = None):
        check_loop_factory(loop_factory)
        self._name = name
        self._loop_factory = loop_factory or asyncio.new_event_loop
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._stop_asked = threading.Event()
        """Set by :meth:`stop` before it stops the loop (the loop thread reads it)."""
        self._calls: set[asyncio.Task[Any]] = set()
        """The tasks of calls in flight (read and written on the loop's thread only)."""
        self._working = 0
        """Coroutines submitted and not finished: calls, ``init`` and ``final``."""

    @property
    def running(self) -> bool:
        """True between a successful :meth:`start` and :meth:`stop`."""
        loop = self._loop
        return loop is not None and loop.is_running() and not self._stopping

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        return self._loop

    def in_loop_thread(self) -> bool:
        """True when called from the loop's own thread."""
        thread = self._thread
        return thread is not None and threading.current_thread() is thread

    def start(
        self,
        init: Callable[[], Awaitable[None]] | None = None,
        timeout: float | None = START_TIMEOUT_S,
    ) -> None:
        """Start the thread and run ``init()`` on its loop; on failure stop and re-raise.
        ``init`` that runs past ``timeout`` seconds (None: no limit) is cancelled, and a
        :class:`SageLLMError` says so."""
        with self._lock:
            if self._loop is not None:
                raise SageLLMError(f"{self._name} is already started")
            loop = self._loop_factory()
            if not isinstance(loop, asyncio.AbstractEventLoop):
                raise ConfigError(
                    f"must return an asyncio event loop, got {type(loop).__name__}",
                    key="loop_factory",
                )
            if loop.is_closed() or loop.is_running():
                state = "closed" if loop.is_closed() else "already running"
                raise ConfigError(
                    f"must return a new event loop for the service's own thread; this one "
                    f"is {state}",
                    key="loop_factory",
                )
            ready = threading.Event()
            failed: list[BaseException] = []
            self._stop_asked = threading.Event()
            thread = threading.Thread(
                target=self._main,
                args=(loop, ready, failed, self._stop_asked),
                name=self._name,
                daemon=True,
            )
            self._loop, self._thread, self._stopping = loop, thread, False
            thread.start()
            ready.wait()
            if failed:  # the loop never ran: nothing to stop
                thread.join()
                self._loop = self._thread = None
                raise SageLLMError(
                    f"{self._name}: its event loop could not start: {failed[0]!r}"
                ) from failed[0]
        if init is None:
            return
        started = asyncio.run_coroutine_threadsafe(self._work(_call(init)), loop)
        try:
            started.result(timeout)
        except BaseException as exc:
            timed_out = isinstance(exc, TimeoutError) and not started.done()  # (not init's)
            self.stop()
            if timed_out:
                what = getattr(init, "__qualname__", "its start")
                raise SageLLMError(
                    f"{self._name} did not start: {what}() did not finish within {timeout:g} s"
                ) from None
            raise

    def stop(
        self, final: Callable[[], Awaitable[None]] | None = None, timeout: float = 60.0
    ) -> None:
        """Run ``final()`` on the loop, cancel every task left, stop the loop and join.

        Does nothing when not started. Must not be called from the loop's own thread.
        """
        with self._lock:
            loop, thread = self._loop, self._thread
            if loop is None or thread is None or self._stopping:
                return
            if threading.current_thread() is thread:
                raise SageLLMError(f"{self._name} cannot be stopped from its own loop thread")
            if loop.is_closed() or not thread.is_alive():  # its thread ended already
                thread.join(timeout)
                self._loop = self._thread = None
                return
            self._stopping = True
        try:
            shutdown = asyncio.run_coroutine_threadsafe(self._work(self._shutdown(final)), loop)
            shutdown.result(timeout)
        finally:
            # The loop thread finalizes its loop itself (async generators, close): this
            # caller may be running an event loop of its own, where run_until_complete
            # on another loop raises.
            self._stop_asked.set()
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)
            with self._lock:
                self._loop = self._thread = None
                self._stopping = False

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and block until it finishes; its exception propagates.

        Raises :class:`ControlPlaneNotRunningError` when the loop is not running or stops
        before the coroutine finishes, and refuses to block the loop's own thread.
        """
        future = self._submit(coro)
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            raise ControlPlaneNotRunningError(
                f"{self._name} stopped before the call finished"
            ) from None

    async def arun(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the service loop and await it from the caller's loop.

        When the caller is cancelled, ``coro`` is cancelled on the service loop and
        awaited (up to :data:`CANCEL_WAIT_S`) before the cancellation is re-raised: what
        it holds (a request id) is free once the cancelled call has returned.
        """
        call = _Call()
        future = self._submit(coro, allow_same_thread=True, call=call)
        waiter = asyncio.wrap_future(future)
        try:
            return await asyncio.shield(waiter)  # the caller's cancellation is ours to pass
        except asyncio.CancelledError:
            if future.cancelled() and not _current_task_cancelling():
                raise ControlPlaneNotRunningError(
                    f"{self._name} stopped before the call finished"
                ) from None
            loop = self._loop
            with contextlib.suppress(RuntimeError):  # (its loop closed: nothing runs there)
                if loop is not None:
                    loop.call_soon_threadsafe(call.cancel)
            if not waiter.done():
                await asyncio.wait([waiter], timeout=CANCEL_WAIT_S)
            raise

    def _submit(
        self,
        coro: Coroutine[Any, Any, T],
        *,
        allow_same_thread: bool = False,
        call: _Call | None = None,
    ) -> concurrent.futures.Future[T]:
        loop = self._loop
        if loop is None or self._stopping or not loop.is_running():
            coro.close()
            raise ControlPlaneNotRunningError(
                f"{self._name} is not running: call setup() first (SAGE calls it when the "
                "pipeline starts) or use the service as a context manager"
            )
        if not allow_same_thread and self.in_loop_thread():
            coro.close()
            raise SageLLMError(
                "process() was called from the service's own event loop and would block it; "
                "await aprocess() instead"
            )
        work = self._work(coro, call=True, handle=call)
        return asyncio.run_coroutine_threadsafe(work, loop)

    async def _work(
        self, coro: Coroutine[Any, Any, T], *, call: bool = False, handle: _Call | None = None
    ) -> T:
        """Run ``coro`` for a caller: a ``call`` is cancelled first when the runner stops;
        virtual time (:func:`_hold_time`) passes while any such coroutine runs. ``handle``
        lets the caller cancel it from its own thread (:meth:`_Call.cancel`)."""
        task = asyncio.current_task()
        if handle is not None:
            if handle.cancelled:  # its caller left before it started
                coro.close()
                raise asyncio.CancelledError
            handle.task = task
        if call and task is not None:
            self._calls.add(task)
        self._working += 1
        _hold_time(False)
        try:
            return await coro
        except (KeyboardInterrupt, SystemExit) as exc:  # raised out of the loop, they would
            # end its thread, and the caller would wait out its timeout on a dead loop
            raise SageLLMError(f"{self._name}: a call raised {exc!r}") from exc
        finally:
            self._working -= 1
            if task is not None:
                self._calls.discard(task)
            if self._working == 0:
                _hold_time(True)

    async def _shutdown(self, final: Callable[[], Awaitable[None]] | None) -> None:
        """Cancel the calls in flight, run ``final`` (its failure still lets the rest of
        the shutdown happen), then cancel and await every other task of the loop."""
        calls = [t for t in self._calls if not t.done()]
        for task in calls:
            task.cancel()
        if calls:
            await asyncio.gather(*calls, return_exceptions=True)
        error: BaseException | None = None
        if final is not None:
            try:
                await final()
            except Exception as exc:
                error = exc
        me = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if error is not None:
            raise error

    @staticmethod
    def _main(
        loop: asyncio.AbstractEventLoop,
        ready: threading.Event,
        failed: list[BaseException],
        stop_asked: threading.Event,
    ) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.call_soon(_hold_time, True)  # until the first coroutine comes
            loop.call_soon(ready.set)
            while True:
                try:
                    loop.run_forever()
                except (KeyboardInterrupt, SystemExit):
                    if not ready.is_set() or loop.is_closed():
                        raise
                    if stop_asked.is_set():  # (the raise may have undone stop()'s stop)
                        break
                    # a task raised it: the task ended with it (whoever awaits it gets
                    # it, and a call's caller gets a SageLLMError); the loop goes on
                    # (ended, its thread had left every caller waiting for ever)
                    continue
                break
            hold = getattr(loop, "hold_time", None)
            if hold is not None:  # its timers run out now: nothing waits for a call any more
                hold(False)
            with contextlib.suppress(KeyboardInterrupt, SystemExit):  # (a callback's, as
                loop.run_until_complete(loop.shutdown_asyncgens())  # above: it is closing)
        except BaseException as exc:
            if ready.is_set():
                raise
            failed.append(exc)  # start() says so (it had waited for ever)
        finally:
            ready.set()
            asyncio.set_event_loop(None)
            if not loop.is_running():
                loop.close()


CANCEL_WAIT_S = 10.0
"""How long a cancelled :meth:`LoopThread.arun` waits for its call to end on the loop."""


class _Call:
    """A call submitted by :meth:`LoopThread.arun`: its task on the service loop, once it
    has started (read and written on the loop's thread only)."""

    def __init__(self) -> None:
        self.task: asyncio.Task[Any] | None = None
        self.cancelled = False

    def cancel(self) -> None:
        """Cancel the call (on the loop's thread): its task, or the call before it starts."""
        self.cancelled = True
        if self.task is not None:
            self.task.cancel()


async def _call(fn: Callable[[], Awaitable[None]]) -> None:
    await fn()


def _hold_time(held: bool) -> None:
    """Hold (or let go) the virtual time of the running loop, when it has one
    (:meth:`~sage_llm.sim.clock.VirtualEventLoop.hold_time`); a real loop has no say."""
    hold = getattr(asyncio.get_running_loop(), "hold_time", None)
    if hold is not None:
        hold(held)


def _current_task_cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
