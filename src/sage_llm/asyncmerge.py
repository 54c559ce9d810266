"""Several async streams read as one: :func:`merge_streams`.

The gateway answers a completions request of several prompts with one stream of their
requests' chunks, and the simulated engine a request for several samples with one stream
of their sequences' chunks; both read their streams through this.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Sequence
from typing import TypeVar, cast

__all__ = ["merge_streams"]

T = TypeVar("T")


class _Ended:
    """A stream's end, as its pump puts it in the queue."""


_ENDED = _Ended()


async def merge_streams(
    streams: Sequence[AsyncGenerator[T, None]],
) -> AsyncGenerator[tuple[int, T], None]:
    """The items of ``streams`` as they come, each with its stream's position. Each stream
    is read by a task of its own, at most one item ahead per stream (while nothing is
    read, the streams wait, rather than pile up their items). The first failure of a
    stream ends the merged one with it (the others are closed); closing the merged stream
    closes every one."""
    queue: asyncio.Queue[tuple[int, object]] = asyncio.Queue(max(1, len(streams)))

    async def pump(position: int, stream: AsyncGenerator[T, None]) -> None:
        try:
            async with contextlib.aclosing(stream) as items:
                async for item in items:
                    await queue.put((position, item))
        except Exception as exc:  # the merged stream raises it
            await queue.put((position, exc))
        else:
            await queue.put((position, _ENDED))

    tasks = [asyncio.ensure_future(pump(k, stream)) for k, stream in enumerate(streams)]
    running = len(tasks)
    try:
        while running:
            position, item = await queue.get()
            if item is _ENDED:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield position, cast(T, item)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
