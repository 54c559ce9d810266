"""DeadlineTimers: deadlines sharing event-loop timers, never early, at most 0.1% late."""

from __future__ import annotations

import asyncio

import pytest

from sage_llm.control_plane.deadlines import DeadlineTimers
from sage_llm.sim.clock import run_virtual


def test_a_deadline_fails_its_future_not_early_and_at_most_a_thousandth_late() -> None:
    async def main() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        timers = DeadlineTimers(loop)
        fut: asyncio.Future[None] = loop.create_future()
        start = loop.time()
        timers.add(10.0, fut)
        with pytest.raises(TimeoutError):
            await fut
        return start, loop.time()

    start, fired = run_virtual(main(), start=0.0123)
    assert 10.0 <= fired - start <= 10.0 + 0.01


def test_a_short_limit_fires_within_a_millisecond() -> None:
    async def main() -> float:
        loop = asyncio.get_running_loop()
        timers = DeadlineTimers(loop)
        fut: asyncio.Future[None] = loop.create_future()
        start = loop.time()
        timers.add(0.2, fut)
        with pytest.raises(TimeoutError):
            await fut
        return loop.time() - start

    waited = run_virtual(main(), start=5.00037)
    assert 0.2 <= waited <= 0.201


def test_deadlines_in_one_interval_share_one_timer_and_fire_together() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        timers = DeadlineTimers(loop)
        futs: list[asyncio.Future[None]] = [loop.create_future() for _ in range(5)]
        keys = []
        for fut in futs:
            keys.append(timers.add(600.0, fut))
            await asyncio.sleep(0.01)  # 50 ms apart in all, inside one 0.6 s bucket
        assert len(set(keys)) <= 2
        assert len(timers) == 5
        done = await asyncio.gather(*futs, return_exceptions=True)
        assert all(isinstance(d, TimeoutError) for d in done)
        assert len(timers) == 0

    run_virtual(main(), start=0.0)


def test_a_discarded_deadline_does_not_fire_and_an_empty_bucket_drops_its_timer() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        timers = DeadlineTimers(loop)
        kept: asyncio.Future[None] = loop.create_future()
        dropped: asyncio.Future[None] = loop.create_future()
        at_kept = timers.add(1.0, kept)
        at_dropped = timers.add(1.0, dropped)
        assert at_kept == at_dropped
        timers.discard(at_dropped, dropped)
        timers.discard(at_dropped, dropped)  # twice is harmless
        with pytest.raises(TimeoutError):
            await kept
        await asyncio.sleep(2.0)
        assert not dropped.done()
        lone: asyncio.Future[None] = loop.create_future()
        at = timers.add(1.0, lone)
        timers.discard(at, lone)
        assert len(timers) == 0
        await asyncio.sleep(2.0)
        assert not lone.done()

    run_virtual(main(), start=0.0)


def test_a_future_already_done_is_left_alone_and_close_cancels_every_timer() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        timers = DeadlineTimers(loop)
        done: asyncio.Future[str] = loop.create_future()
        done.set_result("finished")
        timers.add(0.5, done)
        await asyncio.sleep(1.0)
        assert done.result() == "finished"
        pending: asyncio.Future[None] = loop.create_future()
        timers.add(0.5, pending)
        timers.close()
        await asyncio.sleep(1.0)
        assert not pending.done()
        assert len(timers) == 0

    run_virtual(main(), start=0.0)
