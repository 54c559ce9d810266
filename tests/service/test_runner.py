"""LoopThread: one event loop on its own thread, driven from other threads and loops."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from sage_llm.errors import (
    ConfigError,
    ControlPlaneNotRunningError,
    InvalidRequestError,
    SageLLMError,
)
from sage_llm.service import ControlPlaneVLLMService
from sage_llm.service.runner import LoopThread
from sage_llm.sim.clock import VirtualEventLoop


async def _thread_name() -> str:
    return threading.current_thread().name


async def _fail() -> None:
    raise InvalidRequestError("bad", param="x")


def test_run_executes_on_the_loop_thread_and_returns_the_result() -> None:
    runner = LoopThread("svc-loop")
    runner.start()
    try:
        assert runner.running
        assert runner.run(_thread_name()) == "svc-loop"
    finally:
        runner.stop()
    assert (runner.running, runner.loop) == (False, None)


def test_exceptions_propagate_with_their_type() -> None:
    runner = LoopThread()
    runner.start()
    try:
        with pytest.raises(InvalidRequestError) as err:
            runner.run(_fail())
        assert err.value.param == "x"
    finally:
        runner.stop()


def test_init_and_final_run_on_the_loop() -> None:
    seen: list[str] = []

    async def init() -> None:
        seen.append("init:" + threading.current_thread().name)

    async def final() -> None:
        seen.append("final:" + threading.current_thread().name)

    runner = LoopThread("lt")
    runner.start(init)
    runner.stop(final)
    assert seen == ["init:lt", "final:lt"]


def test_failed_init_stops_the_thread_and_reraises() -> None:
    runner = LoopThread()
    with pytest.raises(InvalidRequestError):
        runner.start(_fail)
    assert not runner.running
    assert runner.loop is None
    runner.start()  # can start again after a failed start
    runner.stop()


def test_an_init_past_its_time_limit_is_a_sage_error_naming_it() -> None:
    """An ``init`` that runs past ``timeout`` is cancelled and said (it had been a bare
    ``TimeoutError()``); its own TimeoutError stays its own."""
    cancelled = threading.Event()

    async def load_model() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()

    async def own() -> None:
        raise TimeoutError("the engine said so")

    runner = LoopThread("svc")
    with pytest.raises(SageLLMError, match=r"svc did not start: .*load_model\(\) did not "
                       r"finish within 0\.05 s") as err:  # fmt: skip
        runner.start(load_model, timeout=0.05)
    assert type(err.value) is SageLLMError and cancelled.is_set()
    assert not runner.running
    with pytest.raises(TimeoutError, match="the engine said so"):
        runner.start(own, timeout=None)


def test_calls_before_start_or_after_stop_are_refused() -> None:
    runner = LoopThread()
    with pytest.raises(ControlPlaneNotRunningError, match="setup"):
        runner.run(_thread_name())
    runner.start()
    runner.stop()
    runner.stop()  # idempotent
    with pytest.raises(ControlPlaneNotRunningError):
        runner.run(_thread_name())


def test_starting_twice_is_an_error() -> None:
    runner = LoopThread()
    runner.start()
    try:
        with pytest.raises(SageLLMError, match="already started"):
            runner.start()
    finally:
        runner.stop()


def test_stop_cancels_calls_in_flight_and_their_callers_get_a_clear_error() -> None:
    runner = LoopThread()
    runner.start()
    entered = threading.Event()

    async def forever() -> None:
        entered.set()
        await asyncio.Event().wait()

    with ThreadPoolExecutor(2) as pool:
        waiting = [pool.submit(runner.run, forever()) for _ in range(2)]
        assert entered.wait(10)
        runner.stop()
        for fut in waiting:
            with pytest.raises(ControlPlaneNotRunningError, match="stopped before"):
                fut.result(10)


def test_blocking_run_from_the_loop_thread_is_refused() -> None:
    runner = LoopThread()
    runner.start()

    async def nested() -> str:
        with pytest.raises(SageLLMError, match="aprocess"):
            runner.run(_thread_name())
        return "refused"

    try:
        assert runner.run(nested()) == "refused"
    finally:
        runner.stop()


def test_arun_awaits_from_another_loop_and_from_the_loop_itself() -> None:
    runner = LoopThread("svc")
    runner.start()

    async def inner() -> str:
        return await runner.arun(_thread_name())

    async def caller() -> list[str]:
        return list(await asyncio.gather(runner.arun(_thread_name()), runner.arun(inner())))

    try:
        assert asyncio.run(caller()) == ["svc", "svc"]
    finally:
        runner.stop()


def test_arun_caller_gets_a_clear_error_when_the_service_stops() -> None:
    runner = LoopThread()
    runner.start()
    entered = threading.Event()

    async def forever() -> None:
        entered.set()
        await asyncio.Event().wait()

    async def caller() -> None:
        pending = asyncio.ensure_future(runner.arun(forever()))
        await asyncio.to_thread(entered.wait, 10)
        await asyncio.to_thread(runner.stop)
        with pytest.raises(ControlPlaneNotRunningError):
            await pending

    asyncio.run(caller())


def test_a_cancelled_arun_returns_once_its_call_has_ended_on_the_loop() -> None:
    """The caller's cancellation had been re-raised at once, while the call was still
    cleaning up on the service loop (a request id it held was still in use)."""
    runner = LoopThread()
    runner.start()
    entered, cleaning = threading.Event(), threading.Event()
    proceed = asyncio.Event()  # (of the service loop: set there)
    ended: list[str] = []

    async def call() -> None:
        entered.set()
        try:
            await asyncio.Event().wait()
        finally:
            cleaning.set()
            await proceed.wait()  # its clean-up takes a while
            ended.append("cleaned up")

    async def caller() -> None:
        pending = asyncio.ensure_future(runner.arun(call()))
        await asyncio.to_thread(entered.wait, 10)
        pending.cancel()
        await asyncio.to_thread(cleaning.wait, 10)
        assert not pending.done()  # still waiting for the clean-up
        assert runner.loop is not None
        runner.loop.call_soon_threadsafe(proceed.set)
        with pytest.raises(asyncio.CancelledError):
            await pending
        assert ended == ["cleaned up"]

    try:
        asyncio.run(caller())
    finally:
        runner.stop()


def test_a_virtual_loop_factory_runs_timers_without_waiting() -> None:
    runner = LoopThread(loop_factory=VirtualEventLoop)
    runner.start()

    async def long_sleep() -> float:
        loop = asyncio.get_running_loop()
        start = loop.time()
        await asyncio.sleep(3600)
        return loop.time() - start

    try:
        assert runner.run(long_sleep()) == pytest.approx(3600)
    finally:
        runner.stop()


def test_a_virtual_loop_holds_its_time_between_calls() -> None:
    """A background timer (a health probe's) does not make virtual time run away while no
    call is in flight: the loop waits for the next call; during a call time passes."""
    runner = LoopThread(loop_factory=VirtualEventLoop)
    ticks: list[float] = []

    async def init() -> None:
        async def probe() -> None:
            while True:
                await asyncio.sleep(1.0)
                ticks.append(asyncio.get_running_loop().time())

        asyncio.get_running_loop().create_task(probe())

    async def now() -> float:
        return asyncio.get_running_loop().time()

    runner.start(init)
    try:
        time.sleep(0.05)  # idle: the probe's timer must not be jumped to, again and again
        assert runner.run(now()) == 0.0 and ticks == []
        runner.run(asyncio.sleep(5.5))  # a call that waits: time passes, the probe runs
        assert runner.run(now()) == pytest.approx(5.5) and len(ticks) == 5
        time.sleep(0.05)
        assert runner.run(now()) == pytest.approx(5.5) and len(ticks) == 5
    finally:
        runner.stop()


async def _suspended_generator(
    closed: list[str], kept: list[AsyncIterator[int]], pause_s: float = 0.0
) -> None:
    """Leave a generator suspended (kept in ``kept``: its finalization is the loop's
    shutdown's), whose ``finally`` waits ``pause_s`` then notes it in ``closed``."""

    async def gen() -> AsyncIterator[int]:
        try:
            yield 1
            yield 2
        finally:
            if pause_s:
                await asyncio.sleep(pause_s)
            closed.append("closed")

    kept.append(gen())
    await anext(kept[-1])


def test_a_virtual_loop_finalizes_its_generators_at_stop() -> None:
    """A generator left suspended, whose finally waits on a timer, is finalized at stop on
    virtual time too (time held between calls had left stop waiting its whole timeout)."""
    runner = LoopThread(loop_factory=VirtualEventLoop)
    runner.start()
    closed: list[str] = []
    kept: list[AsyncIterator[int]] = []
    runner.run(_suspended_generator(closed, kept, pause_s=0.5))
    started = time.monotonic()
    runner.stop(timeout=10)
    assert time.monotonic() - started < 5 and closed == ["closed"]


def test_stop_cancels_the_calls_before_final_runs() -> None:
    """``final`` (closing an engine) runs once the calls in flight are cancelled, so their
    callers are told the service stopped, not what closing the engine did to them."""
    runner = LoopThread()
    runner.start()
    entered = threading.Event()
    seen: list[bool] = []
    calls: list[asyncio.Task[Any]] = []

    async def call() -> None:
        task = asyncio.current_task()
        assert task is not None
        calls.append(task)
        entered.set()
        await asyncio.Event().wait()

    async def final() -> None:
        seen.append(all(task.done() for task in calls))

    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(runner.run, call())
        assert entered.wait(10)
        runner.stop(final)
        with pytest.raises(ControlPlaneNotRunningError, match="stopped before"):
            waiting.result(10)
    assert seen == [True]


def test_stop_from_inside_another_running_loop_closes_the_service_loop() -> None:
    """An asyncio caller may stop the service from its own loop (``with`` inside a
    coroutine): the service loop is finalized and closed by its own thread."""
    runner = LoopThread()
    runner.start()
    gens: list[str] = []
    kept: list[AsyncIterator[int]] = []

    async def caller() -> asyncio.AbstractEventLoop | None:
        await runner.arun(_suspended_generator(gens, kept))
        loop = runner.loop
        runner.stop()  # synchronous, from inside this running loop
        return loop

    service_loop = asyncio.run(caller())
    assert service_loop is not None and service_loop.is_closed()
    assert gens == ["closed"]
    assert (runner.running, runner.loop) == (False, None)


def test_a_loop_factory_that_gives_no_usable_loop_is_a_config_error_not_a_hang() -> None:
    """None, a closed loop or a running one had killed the loop thread while ``start``
    waited for it for ever; a value that is no callable raised a bare TypeError."""
    closed = asyncio.new_event_loop()
    closed.close()
    for factory, what in (
        (lambda: None, "must return an asyncio event loop, got NoneType"),
        (lambda: closed, "this one is closed"),
    ):
        runner = LoopThread("t", factory)  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match=what) as err:
            runner.start()
        assert err.value.key == "loop_factory"
        assert not runner.running and runner.loop is None

    async def inside() -> None:  # asyncio.get_running_loop from async code
        runner = LoopThread("t", asyncio.get_running_loop)
        with pytest.raises(ConfigError, match="already running"):
            runner.start()

    asyncio.run(inside())
    with pytest.raises(ConfigError, match="must be a callable") as err:
        LoopThread("t", 5)  # type: ignore[arg-type]
    assert err.value.key == "loop_factory"
    with pytest.raises(ConfigError, match="must be a callable"):
        ControlPlaneVLLMService(None, loop_factory=5)  # type: ignore[arg-type]


def test_a_loop_that_fails_to_run_is_reported_by_start() -> None:
    class Broken(asyncio.SelectorEventLoop):
        def run_forever(self) -> None:
            raise RuntimeError("no selector")

    runner = LoopThread("t", Broken)
    with pytest.raises(SageLLMError, match=r"could not start.*no selector"):
        runner.start()
    assert runner.loop is None
    runner.stop()  # nothing to stop


def test_an_init_raising_keyboard_interrupt_is_an_error_not_a_wedged_runner() -> None:
    """It had ended the loop's thread: start waited out its timeout, raised "Event loop is
    closed", and the runner could be neither stopped nor started again."""

    async def interrupted() -> None:
        raise KeyboardInterrupt

    runner = LoopThread("k")
    started = time.monotonic()
    with pytest.raises(SageLLMError, match="KeyboardInterrupt"):
        runner.start(interrupted, timeout=30)
    assert time.monotonic() - started < 10
    assert runner.loop is None
    runner.start()  # usable again
    assert runner.run(_thread_name()) == "k"
    runner.stop()


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit])
def test_a_task_a_call_awaits_raising_an_interrupt_leaves_the_loop_running(
    exc: type[BaseException],
) -> None:
    """Raised in a task the call awaited (not the call itself), it had ended the loop's
    thread, and the caller waited for ever."""

    async def boom() -> None:
        raise exc

    async def nested() -> None:
        await asyncio.gather(boom())

    runner = LoopThread("n")
    runner.start()
    try:
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(runner.run, nested())
            with pytest.raises(SageLLMError, match=exc.__name__):
                future.result(timeout=10)
        assert runner.running and runner.run(_thread_name()) == "n"
    finally:
        runner.stop()


def test_stop_ends_the_thread_though_a_callback_keeps_raising_system_exit() -> None:
    """The raise in stop()'s loop iteration had undone its loop.stop(); run_forever was
    started again and the thread ran on after stop() returned."""

    async def arm() -> None:
        loop = asyncio.get_running_loop()

        def tick() -> None:
            loop.call_later(0.0005, tick)
            raise SystemExit

        loop.call_soon(tick)

    for _ in range(20):
        runner = LoopThread("t")
        runner.start()
        runner.run(arm())
        thread = runner._thread
        runner.stop(timeout=5)
        assert thread is not None and not thread.is_alive()


def test_a_failing_final_is_raised_by_stop_once_the_loop_is_stopped() -> None:
    async def final() -> None:
        raise RuntimeError("engine would not close")

    runner = LoopThread("f")
    runner.start()
    thread = runner._thread
    with pytest.raises(RuntimeError, match="engine would not close"):
        runner.stop(final)
    assert runner.loop is None and thread is not None and not thread.is_alive()
    runner.start()  # usable again
    runner.stop()


def test_stop_from_the_loops_own_thread_is_refused() -> None:
    runner = LoopThread("own")
    runner.start()

    async def stop_here() -> None:
        runner.stop()

    try:
        with pytest.raises(SageLLMError, match="cannot be stopped from its own loop thread"):
            runner.run(stop_here())
        assert runner.running
    finally:
        runner.stop()


def test_stop_after_the_loop_ended_by_itself_clears_the_runner() -> None:
    runner = LoopThread("gone")
    runner.start()
    loop, thread = runner.loop, runner._thread
    assert loop is not None and thread is not None
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    assert not thread.is_alive() and not runner.running
    with pytest.raises(ControlPlaneNotRunningError, match="not running"):
        runner.run(_thread_name())
    runner.stop()
    assert runner.loop is None
    runner.start()  # usable again
    assert runner.run(_thread_name()) == "gone"
    runner.stop()


def test_an_arun_cancelled_before_its_call_started_never_runs_it() -> None:
    runner = LoopThread()
    runner.start()
    blocked, release = threading.Event(), threading.Event()
    ran: list[str] = []

    async def block() -> None:
        blocked.set()
        release.wait(10)  # the loop runs nothing else meanwhile

    async def call() -> None:
        ran.append("ran")

    async def caller() -> None:
        pending = asyncio.ensure_future(runner.arun(call()))
        await asyncio.sleep(0)  # submitted: its start waits behind block()
        pending.cancel()
        await asyncio.sleep(0)  # (its cancellation is queued behind block() too)
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await pending

    try:
        with ThreadPoolExecutor(1) as pool:
            holding = pool.submit(runner.run, block())
            assert blocked.wait(10)
            asyncio.run(caller())
            holding.result(10)
        assert ran == []
        assert runner.run(_thread_name())  # the loop serves on
    finally:
        runner.stop()
