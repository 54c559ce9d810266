"""ChunkChannel: what the dispatcher puts reaches the relaying task in order, in batches."""

from __future__ import annotations

import asyncio
import contextlib

from sage_llm.control_plane.records import STREAM_END, ChunkChannel, LastInstances
from sage_llm.engines.base import Chunk
from sage_llm.sim.clock import run_virtual


def test_take_returns_everything_put_since_the_last_take_in_order() -> None:
    async def main() -> None:
        channel = ChunkChannel()
        channel.put_nowait(Chunk(text="a"))
        channel.put_nowait(Chunk(text="b"))
        assert [c.text for c in await channel.take()] == ["a", "b"]  # type: ignore[union-attr]
        waiting = asyncio.create_task(channel.take())
        await asyncio.sleep(0)
        assert not waiting.done()
        channel.put_nowait(Chunk(text="c"))
        channel.put_nowait(STREAM_END)
        assert await waiting == [Chunk(text="c"), STREAM_END]

    run_virtual(main())


def test_a_cancelled_take_leaves_the_channel_usable() -> None:
    async def main() -> None:
        channel = ChunkChannel()
        waiting = asyncio.create_task(channel.take())
        await asyncio.sleep(0)
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        channel.put_nowait(Chunk(text="x"))  # no waiter left to wake
        assert await channel.take() == [Chunk(text="x")]

    run_virtual(main())


def test_last_instances_keep_the_latest_of_the_most_recently_served_sessions() -> None:
    last = LastInstances(capacity=2)
    last.note("a", "i0")
    last.note("b", "i1")
    last.note("a", "i2")  # a is the most recent now
    last.note("c", "i3")  # b, the least recently served, goes
    assert (last.get("a"), last.get("b"), last.get("c")) == ("i2", None, "i3")
    assert len(last) == 2


def test_last_instances_hold_a_long_session_id_in_bounded_memory() -> None:
    last = LastInstances(capacity=4)
    long_a, long_b = "a" * 200_000, "a" * 199_999 + "b"
    last.note(long_a, "i0")
    last.note(long_b, "i1")
    assert (last.get(long_a), last.get(long_b)) == ("i0", "i1")
    assert all(len(key) <= LastInstances.LONG_KEY for key in last._items)
    exact = "s" * LastInstances.LONG_KEY  # at the bound: kept as it is
    last.note(exact, "i2")
    assert exact in last._items and last.get(exact) == "i2"
    wide = "\U0001f600" * LastInstances.LONG_KEY  # 4 bytes a character: a digest too
    last.note(wide, "i3")
    assert wide not in last._items and last.get(wide) == "i3"
    assert all(key.isascii() for key in last._items)
