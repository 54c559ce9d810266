"""Writes gathered over one turn of the event loop: when they leave, in what order, and what
a closing or failing transport gets."""

from __future__ import annotations

import asyncio
import logging

import pytest

from sage_llm.writebatch import WriteBatch


class _Transport(asyncio.WriteTransport):
    """Records each ``write`` call; ``closing`` and ``fail`` as a test sets them."""

    def __init__(self, log: list[tuple[str, bytes]], name: str) -> None:
        super().__init__()
        self._log = log
        self.name = name
        self.closing = False
        self.fail = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.fail:
            raise RuntimeError("peer gone")
        self._log.append((self.name, bytes(data)))

    def is_closing(self) -> bool:
        return self.closing


async def _next_turn() -> None:
    await asyncio.sleep(0)


def _two() -> tuple[list[tuple[str, bytes]], _Transport, _Transport, WriteBatch]:
    """A write log, transports ``a`` and ``b`` recording into it, and an empty batch."""
    log: list[tuple[str, bytes]] = []
    return log, _Transport(log, "a"), _Transport(log, "b"), WriteBatch()


async def test_writes_of_a_turn_leave_together_at_the_next_turn() -> None:
    log, a, b, batch = _two()
    batch.write(a, b"a1")
    batch.write(b, b"b1")
    batch.write(a, b"a2")
    assert log == [] and len(batch) == 2
    await _next_turn()
    # one write call per transport, its pieces joined in order; transports in first-write order
    assert log == [("a", b"a1a2"), ("b", b"b1")]
    assert len(batch) == 0
    batch.write(b, b"b2")
    await _next_turn()
    assert log[-1] == ("b", b"b2")


async def test_a_batch_leaves_before_callbacks_queued_after_it() -> None:
    log, a, _b, batch = _two()
    batch.write(a, b"first")
    asyncio.get_running_loop().call_soon(log.append, ("callback", b""))
    await _next_turn()
    await _next_turn()
    assert log == [("a", b"first"), ("callback", b"")]


async def test_flush_one_sends_a_transports_writes_now_and_only_once() -> None:
    log, a, b, batch = _two()
    batch.write(a, b"x")
    batch.write(a, b"y")
    batch.write(b, b"z")
    batch.flush_one(a)  # as before closing `a`
    assert log == [("a", b"xy")]
    batch.flush_one(a)  # nothing left for it
    await _next_turn()
    assert log == [("a", b"xy"), ("b", b"z")]


async def test_a_closing_transport_gets_nothing() -> None:
    log, a, b, batch = _two()
    batch.write(a, b"dropped")
    batch.write(b, b"kept")
    a.closing = True  # aborted before the turn ended
    await _next_turn()
    assert log == [("b", b"kept")]


async def test_a_failing_transport_does_not_stop_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log, a, b, batch = _two()
    a.fail = True
    batch.write(a, b"lost")
    batch.write(b, b"kept")
    with caplog.at_level(logging.DEBUG, logger="sage_llm.writebatch"):
        await _next_turn()
    assert log == [("b", b"kept")]
    assert "write to" in caplog.text


async def test_write_now_sends_at_once_after_what_its_transport_had_waiting() -> None:
    log, a, b, batch = _two()
    batch.write(a, b"a1")
    batch.write(b, b"b1")
    batch.write(a, b"a2")
    batch.write_now(a, b"a3")
    # a's waiting writes and the new one in one write, now; b still waits for the turn's end
    assert log == [("a", b"a1a2a3")] and len(batch) == 1
    batch.write_now(a, b"a4")  # nothing waiting: the data alone
    assert log[-1] == ("a", b"a4")
    await _next_turn()
    assert log == [("a", b"a1a2a3"), ("a", b"a4"), ("b", b"b1")]
    a.fail = True
    with pytest.raises(RuntimeError, match="peer gone"):  # the transport's own error
        batch.write_now(a, b"a5")
