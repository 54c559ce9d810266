"""merge_streams: several async streams read as one."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator

import pytest

from sage_llm.asyncmerge import merge_streams


class _Stream:
    """A stream of ``items`` (raising ``fail`` after them, when given) that says whether it
    was closed, and how many items it has handed out."""

    def __init__(self, items: list[str], fail: Exception | None = None) -> None:
        self.items, self.fail = items, fail
        self.given = 0
        self.closed = False

    async def run(self) -> AsyncGenerator[str, None]:
        try:
            for item in self.items:
                await asyncio.sleep(0)
                self.given += 1
                yield item
            if self.fail is not None:
                raise self.fail
        finally:
            self.closed = True


async def test_every_item_comes_with_its_streams_position_in_its_streams_order() -> None:
    streams = [_Stream(["a0", "a1", "a2"]), _Stream([]), _Stream(["c0"])]
    got = [pair async for pair in merge_streams([s.run() for s in streams])]
    assert sorted(got) == [(0, "a0"), (0, "a1"), (0, "a2"), (2, "c0")]
    assert [item for k, item in got if k == 0] == ["a0", "a1", "a2"]
    assert all(s.closed for s in streams)
    none: list[AsyncGenerator[str, None]] = []
    assert [pair async for pair in merge_streams(none)] == []


async def test_a_failure_ends_the_merged_stream_and_closes_the_others() -> None:
    failing = _Stream(["x"], fail=ValueError("broken"))
    endless = _Stream([f"y{i}" for i in range(1000)])
    merged = merge_streams([failing.run(), endless.run()])
    with pytest.raises(ValueError, match="broken"):
        async for _ in merged:
            pass
    assert failing.closed and endless.closed and endless.given < 1000


async def test_closing_it_closes_every_stream_and_unread_items_do_not_pile_up() -> None:
    streams = [_Stream([f"{k}-{i}" for i in range(100)]) for k in range(3)]
    merged = merge_streams([s.run() for s in streams])
    async with contextlib.aclosing(merged):
        first = await anext(merged)
        for _ in range(20):  # nothing read: each stream is at most an item or two ahead
            await asyncio.sleep(0)
        assert sum(s.given for s in streams) <= 1 + 3 + 3
    assert first[1].startswith(f"{first[0]}-")
    assert all(s.closed for s in streams)
