"""ChunkChannel: what the dispatcher puts reaches the relaying task in order, in batches."""

from __future__ import annotations

import asyncio
import contextlib

from sage_llm.control_plane.records import STREAM_END, ChunkChannel
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
