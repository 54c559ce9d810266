"""Socket writes gathered over one turn of the event loop and sent at the start of the next.

Under load the gateway serves many requests per turn of its event loop. Written at once,
each request to an engine (and each response to a client) wakes its reader for that one
message: the engine runs a step for one request, goes back to sleep, and is woken again by
the next write a few microseconds later. :class:`WriteBatch` holds the writes of one turn
and sends them together when the turn ends (a callback the loop runs at the start of its
next turn, before the callbacks of new events), so a reader woken by the first of them finds the
others already there. Measured on the proxy bench (docs/benchmarks.md, "Proxy overhead"),
this cut the CPU the engines and the load client spent per request as well as the
gateway's own. Writes to one transport keep their order and leave in one ``write`` call.

The cost is the rest of the turn: a write leaves after the callbacks the loop is running
now, never later than the start of the next turn (no timer, nothing like Nagle's 40 ms).
A write that should not wait (the gateway's stream events) goes out at once with
:meth:`WriteBatch.write_now`, after whatever its transport had waiting.

A transport's pending writes must be sent with :meth:`WriteBatch.flush_one` before it is
closed or handed to another protocol (``close()`` flushes only what the transport itself
buffered); a transport that is closing when the batch is sent gets nothing (as a write to
an aborted connection would be dropped).
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger(__name__)

__all__ = ["WriteBatch"]


class WriteBatch:
    """The writes of the current turn of the event loop, by transport, in order."""

    __slots__ = ("_pending", "_scheduled")

    def __init__(self) -> None:
        self._pending: dict[asyncio.WriteTransport, list[bytes]] = {}
        self._scheduled = False

    def __len__(self) -> int:
        """Transports with writes waiting."""
        return len(self._pending)

    def write(self, transport: asyncio.WriteTransport, data: bytes) -> None:
        """Send ``data`` on ``transport`` when this turn of the loop ends."""
        parts = self._pending.get(transport)
        if parts is not None:
            parts.append(data)
            return
        self._pending[transport] = [data]
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def write_now(self, transport: asyncio.WriteTransport, data: bytes) -> None:
        """Send ``data`` on ``transport`` now, after the writes waiting for it, in one
        ``write`` (for what must not wait for the end of the turn); the transport's own
        errors are raised."""
        parts = self._pending.pop(transport, None)
        transport.write(data if parts is None else b"".join([*parts, data]))

    def flush_one(self, transport: asyncio.WriteTransport) -> None:
        """Send ``transport``'s waiting writes now (before closing or handing it over)."""
        parts = self._pending.pop(transport, None)
        if parts is not None:
            _send(transport, parts)

    def flush(self) -> None:
        """Send every waiting write (the loop runs this once per turn with writes)."""
        self._scheduled = False
        pending, self._pending = self._pending, {}
        for transport, parts in pending.items():
            _send(transport, parts)


def _send(transport: asyncio.WriteTransport, parts: list[bytes]) -> None:
    if transport.is_closing():
        return
    try:
        transport.write(parts[0] if len(parts) == 1 else b"".join(parts))
    except Exception:  # a transport's own failure must not stop the others' writes
        log.debug("write to %r failed", transport, exc_info=True)
