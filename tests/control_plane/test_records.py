"""Request records: the chunk channel, finished results, last instances, queue waits."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from sage_llm.control_plane.records import (
    STREAM_END,
    ChunkChannel,
    FinishedRecords,
    LastInstances,
    RequestRecord,
)
from sage_llm.engines.base import Chunk, EngineRequest
from sage_llm.errors import EngineError
from sage_llm.sim.clock import run_virtual
from sage_llm.types import RequestResult, RequestStatus
from tests.factories import MODEL, make_metadata, make_request_info


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


def _result(request_id: str, status: RequestStatus = RequestStatus.COMPLETED) -> RequestResult:
    return RequestResult(request_id=request_id, status=status)


def _record(**changes: Any) -> RequestRecord:
    loop = asyncio.new_event_loop()
    try:
        future: asyncio.Future[RequestResult] = loop.create_future()
    finally:
        loop.close()
    return RequestRecord(
        make_metadata("r0"), make_request_info("r0"), EngineRequest("r0", MODEL), future, **changes
    )


def test_finished_records_forget_the_failure_of_a_reused_id_that_completed() -> None:
    finished = FinishedRecords()
    finished.add(_result("r", RequestStatus.FAILED), 0.0, failure=EngineError("boom"))
    assert isinstance(finished.failure("r"), EngineError)
    finished.add(_result("r"), 1.0)  # the id reused, and completed this time
    assert finished.failure("r") is None


def test_finished_records_move_a_reused_id_to_the_most_recent() -> None:
    finished = FinishedRecords(capacity=2)
    finished.add(_result("a"), 0.0)
    finished.add(_result("b"), 1.0)
    finished.add(_result("a"), 2.0)  # "a" finished again: the most recent now
    finished.add(_result("c"), 3.0)  # one goes: "b", the least recently finished
    assert ("a" in finished, "b" in finished, "c" in finished) == (True, False, True)


def test_finished_records_keep_a_result_for_ttl_s_seconds() -> None:
    finished = FinishedRecords(ttl_s=600.0)
    finished.add(_result("r"), 0.0)
    assert finished.get("r", 600.0) is not None  # exactly ttl_s old: still kept
    assert finished.get("r", 600.001) is None


def test_queue_wait_stops_growing_once_the_request_left_the_queue() -> None:
    queued = _record(queued_s=1.0, queued_at=5.0)
    assert queued.queue_wait_s(10.0) == 6.0  # the ended wait and the one going on
    for status in (RequestStatus.RUNNING, RequestStatus.COMPLETED, RequestStatus.FAILED):
        record = _record(status=status, queued_s=1.0, queued_at=0.0)
        assert record.queue_wait_s(10.0) == 1.0


def test_discard_output_forgets_the_finish_reason_too() -> None:
    record = _record(first_token_at=1.0, completion_tokens=1, prompt_tokens=3, finish_reason="stop")
    record.text_parts.append("x")
    record.token_ids.append(1)
    record.discard_output()
    assert record.finish_reason is None
    assert record.first_token_at is None and record.completion_tokens == 0
    assert not record.text_parts and not record.token_ids


def test_a_failure_is_forgotten_with_its_result_and_each_copy_is_fresh() -> None:
    """``failure`` answers None once the result is no longer kept (past ``ttl_s``, or
    pushed out by ``capacity``), and a fresh copy each time it is asked."""
    finished = FinishedRecords(capacity=2, ttl_s=10.0)
    for rid in ("old", "a", "b"):  # "old" pushed out by capacity
        finished.add(_result(rid, RequestStatus.FAILED), 0.0, failure=EngineError(rid))
    assert "old" not in finished and finished.failure("old") is None
    first, second = finished.failure("a"), finished.failure("a")
    assert isinstance(first, EngineError) and first is not second
    finished.expire(10.001)  # "a" and "b" expired
    assert len(finished) == 0 and finished.failure("a") is None
    assert finished._failures == {}


@pytest.mark.parametrize("kind", [FinishedRecords, LastInstances])
def test_a_bounded_map_holds_at_least_one_item(kind: type[object]) -> None:
    with pytest.raises(ValueError, match="capacity must be at least 1"):
        kind(capacity=0)  # type: ignore[call-arg]
