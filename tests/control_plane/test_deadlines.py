"""DeadlineTimers: deadlines sharing event-loop timers, never early, at most 0.1% late."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from sage_llm.control_plane.deadlines import DeadlineTimers, TimeLimit
from sage_llm.sim.clock import run_virtual


def _recorder(loop: asyncio.AbstractEventLoop, fired: list[float]) -> Callable[[], None]:
    return lambda: fired.append(loop.time())


@pytest.mark.parametrize(
    ("timeout_s", "late_s", "start"),
    [(10.0, 0.01, 0.0123), (600.0, 0.6, 7.7), (0.2, 0.001, 5.0004)],
)
def test_a_deadline_calls_not_early_and_at_most_a_thousandth_or_a_millisecond_late(
    timeout_s: float, late_s: float, start: float
) -> None:
    async def main() -> tuple[float, list[float]]:
        loop = asyncio.get_running_loop()
        timers, fired = DeadlineTimers(loop), list[float]()
        began = loop.time()
        timers.add(timeout_s, _recorder(loop, fired))
        await asyncio.sleep(timeout_s * 2)
        return began, fired

    began, fired = run_virtual(main(), start=start)
    assert len(fired) == 1
    assert timeout_s <= fired[0] - began <= timeout_s + late_s + 1e-9


def test_deadlines_in_one_interval_share_one_timer_and_fire_together() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        timers, fired = DeadlineTimers(loop), list[float]()
        keys = []
        for _ in range(5):
            keys.append(timers.add(600.0, _recorder(loop, fired)))
            await asyncio.sleep(0.01)  # 50 ms apart in all, inside one or two 0.6 s buckets
        assert len(set(keys)) <= 2
        assert len(timers) == 5
        await asyncio.sleep(601.0)
        assert len(fired) == 5 and len(set(fired)) == len(set(keys))
        assert len(timers) == 0

    run_virtual(main(), start=0.0)


def test_a_discarded_deadline_is_not_called_and_an_empty_bucket_drops_its_timer() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        timers = DeadlineTimers(loop)
        kept: list[float] = []
        dropped: list[float] = []
        keep, drop = _recorder(loop, kept), _recorder(loop, dropped)
        at_kept, at_dropped = timers.add(1.0, keep), timers.add(1.0, drop)
        assert at_kept == at_dropped
        timers.discard(at_dropped, drop)
        timers.discard(at_dropped, drop)  # twice is harmless
        await asyncio.sleep(2.0)
        assert len(kept) == 1 and not dropped
        lone: list[float] = []
        call = _recorder(loop, lone)
        timers.discard(timers.add(1.0, call), call)
        assert len(timers) == 0
        await asyncio.sleep(2.0)
        assert not lone

    run_virtual(main(), start=0.0)


def test_the_last_discard_of_a_bucket_cancels_its_timer_and_forgets_the_bucket() -> None:
    """Requests that end long before their limit leave no timer or bucket behind."""

    async def main() -> None:
        timers = DeadlineTimers(asyncio.get_running_loop())
        first, second = (lambda: None), (lambda: None)
        at = timers.add(600.0, first)
        assert timers.add(600.0, second) == at
        handle = timers._buckets[at][1]
        timers.discard(at, first)
        assert not handle.cancelled()  # the other deadline still needs it
        timers.discard(at, second)
        assert handle.cancelled()
        assert timers._buckets == {}
        for i in range(1000):  # a thousand requests, each done at once
            timers.discard(timers.add(600.0 + i, first), first)
        assert timers._buckets == {}

    run_virtual(main(), start=0.0)


def test_a_failing_call_does_not_stop_the_others_and_close_cancels_every_timer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        timers, fired = DeadlineTimers(loop), list[float]()

        def broken() -> None:
            raise RuntimeError("boom")

        timers.add(0.5, broken)
        timers.add(0.5, _recorder(loop, fired))
        await asyncio.sleep(1.0)
        assert len(fired) == 1
        timers.add(0.5, _recorder(loop, fired))
        timers.close()
        await asyncio.sleep(1.0)
        assert len(fired) == 1 and len(timers) == 0

    run_virtual(main(), start=0.0)
    assert "deadline callback failed" in caplog.text


@pytest.mark.parametrize("shared", [True, False], ids=["shared timers", "own timer"])
def test_a_time_limit_raises_timeout_error_out_of_a_block_that_runs_too_long(
    shared: bool,
) -> None:
    async def main() -> tuple[float, int, int]:
        loop = asyncio.get_running_loop()
        timers = DeadlineTimers(loop) if shared else None
        began = loop.time()
        with pytest.raises(TimeoutError):
            async with TimeLimit(timers, 2.0) as limit:
                await asyncio.sleep(10.0)
        assert limit.expired
        task = asyncio.current_task()
        assert task is not None
        await asyncio.sleep(0)  # no cancellation left pending for the task
        return loop.time() - began, task.cancelling(), len(timers or ())

    took, cancelling, pending = run_virtual(main())
    assert 2.0 <= took <= 2.0 + 0.002
    assert (cancelling, pending) == (0, 0)


def test_a_time_limit_that_does_not_pass_or_is_none_changes_nothing() -> None:
    async def main() -> int:
        timers = DeadlineTimers(asyncio.get_running_loop())
        async with TimeLimit(timers, 5.0) as limit:
            assert len(timers) == 1
            await asyncio.sleep(1.0)
        assert not limit.expired
        async with TimeLimit(timers, None):
            await asyncio.sleep(10.0)
        async with TimeLimit(None, 5.0) as own:  # a timer of its own, withdrawn as well
            await asyncio.sleep(1.0)
        assert not own.expired
        await asyncio.sleep(10.0)  # the withdrawn deadlines never fire
        return len(timers)

    assert run_virtual(main()) == 0


@pytest.mark.parametrize("also_expired", [False, True])
def test_a_cancellation_from_elsewhere_goes_on_up_through_a_time_limit(
    also_expired: bool,
) -> None:
    """A task cancelled from outside leaves the block with CancelledError, not
    TimeoutError, whether or not the limit passed at the same moment."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        timers = DeadlineTimers(loop)

        async def limited() -> None:
            async with TimeLimit(timers, 1.0):
                await asyncio.sleep(10.0)

        task = asyncio.create_task(limited())
        await asyncio.sleep(0)  # the block has begun

        def cancel() -> None:
            task.cancel()

        if also_expired:  # cancelled by a deadline of the same bucket: in the same turn
            timers.add(1.0, cancel)
        else:
            await asyncio.sleep(0.5)
            cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert len(timers) == 0

    run_virtual(main())
