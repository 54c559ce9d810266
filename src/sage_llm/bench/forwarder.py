"""A minimal HTTP/1.1 forwarder: the floor of a Python proxy in the proxy bench.

``python -m sage_llm.bench.forwarder --port P URL [URL ...]`` passes every request on to
the next engine in turn (round robin) and the engine's answer back unchanged. No JSON is
parsed, and nothing is scheduled, measured or recorded. It runs on the same pieces as
``sage-llm serve``'s hot path:

* the engine side is the gateway's engine transport
  (:class:`~sage_llm.engines.fastclient.FastPool`, writes batched per turn of the loop);
* the front is an :class:`asyncio.Protocol` that answers with the same batched writes, as
  the gateway's lean front does.

So its row in the proxy bench (``python-forwarder``) shows what one Python process on
asyncio costs per proxied request on that machine. The difference between it and
``sage-llm serve`` is what the control plane's own work costs.

It is a measuring stick, not a product. It has no timeouts and no TLS, and request bodies
need ``Content-Length``. An engine that cannot be reached, or whose answer breaks off
before anything of it was relayed, is answered with 502. A stream that breaks off
half-way ends the client's connection.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import urlsplit

from sage_llm.engines.fastclient import FastPool, UnsupportedEncodingError
from sage_llm.gateway.errors import error_body
from sage_llm.httpserve import tcp_nodelay
from sage_llm.writebatch import WriteBatch

__all__ = ["Forwarder", "forwarder_main"]

_MAX_HEAD = 64 * 1024
_JSON_HEADER = "Content-Type: application/json\r\n"


@dataclass(frozen=True, slots=True)
class _Request:
    method: str
    path: str
    body: bytes
    close: bool


class _BadRequest(Exception):
    """A request this forwarder cannot read; answered with ``status``, then closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _answer(status: int, reason: str, body: bytes, content_type: str) -> bytes:
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body


def _error(status: int, reason: str, message: str) -> bytes:
    body = json.dumps(error_body(message, "forwarder_error", status)).encode()
    return _answer(status, reason, body, "application/json")


class Forwarder:
    """Round robin over ``upstreams`` (``http://host:port`` URLs)."""

    def __init__(self, upstreams: Sequence[str]) -> None:
        if not upstreams:
            raise ValueError("at least one upstream is needed")
        self.writes = WriteBatch()
        self._pools = [self._pool(url) for url in upstreams]
        self._next = 0

    def _pool(self, url: str) -> FastPool:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname or parts.port is None:
            raise ValueError(f"upstream must be http://host:port, not {url!r}")
        return FastPool(parts.hostname, parts.port, writes=self.writes)

    def protocol(self) -> asyncio.Protocol:
        """A protocol for one client connection (the server's protocol factory)."""
        return _Front(self)

    def close(self) -> None:
        for pool in self._pools:
            pool.close()

    async def forward(self, request: _Request, out: asyncio.WriteTransport) -> None:
        """Send ``request`` to the next upstream and its answer to ``out``."""
        if request.method == "GET" and request.path == "/health":
            self.writes.write(out, _answer(200, "OK", b"ok", "text/plain"))
            return
        pool = self._pools[self._next]
        self._next = (self._next + 1) % len(self._pools)
        try:
            resp = await pool.request(request.method, request.path, request.body, _JSON_HEADER)
        except (OSError, UnsupportedEncodingError) as exc:
            self.writes.write(out, _error(502, "Bad Gateway", f"upstream failed: {exc}"))
            return
        clean = started = False
        try:
            content_type = resp.headers.get("content-type", "application/octet-stream")
            if "chunked" not in resp.headers.get("transfer-encoding", "").lower():
                body = await resp.read()
                self.writes.write(out, _answer(resp.status, resp.reason, body, content_type))
            else:  # relayed piece by piece as it comes (a stream), as the gateway does
                self.writes.flush_one(out)
                head = (
                    f"HTTP/1.1 {resp.status} {resp.reason}\r\nContent-Type: {content_type}\r\n"
                    "Transfer-Encoding: chunked\r\n\r\n"
                ).encode("latin-1")
                while piece := await resp.read_some():
                    out.write(head + b"%x\r\n%b\r\n" % (len(piece), piece))
                    head, started = b"", True
                out.write(head + b"0\r\n\r\n")
            clean = True
        except OSError as exc:  # the upstream failed inside its answer
            if started:
                raise  # the client's answer is cut short: its connection is dropped
            self.writes.write(out, _error(502, "Bad Gateway", f"upstream failed: {exc}"))
        finally:
            if clean:
                resp.release()
            else:
                resp.close()


class _Front(asyncio.Protocol):
    """One client connection: requests in order, one at a time."""

    def __init__(self, forwarder: Forwarder) -> None:
        self._fwd = forwarder
        self._buf = bytearray()
        self._queue: deque[_Request] = deque()
        self._transport: asyncio.WriteTransport | None = None
        self._task: asyncio.Task[None] | None = None
        self._broken: _BadRequest | None = None
        """An unreadable request: answered, and the connection closed, once the requests
        before it have been."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        tcp_nodelay(transport)

    def data_received(self, data: bytes) -> None:
        if self._broken is not None:
            return  # nothing after an unreadable request is read
        self._buf += data
        try:
            while (request := self._parse()) is not None:
                self._queue.append(request)
        except _BadRequest as exc:
            self._broken = exc
            self._buf.clear()
        if self._task is None:
            if self._queue:
                self._task = asyncio.get_running_loop().create_task(self._serve())
            elif self._broken is not None:
                self._fail(self._broken)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._task is not None:
            self._task.cancel()

    def _parse(self) -> _Request | None:
        buf = self._buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > _MAX_HEAD:
                raise _BadRequest(431, "request head too large")
            return None
        lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise _BadRequest(400, "not an HTTP/1.x request")
        length = 0
        close = parts[2] == "HTTP/1.0"
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                if not (value.strip().isascii() and value.strip().isdigit()):
                    raise _BadRequest(400, "bad Content-Length")
                length = int(value)
            elif name == "transfer-encoding":
                raise _BadRequest(411, "a request body needs Content-Length")
            elif name == "connection":
                close = "close" in value.lower()
        if len(buf) < end + 4 + length:
            return None
        body = bytes(buf[end + 4 : end + 4 + length])
        del buf[: end + 4 + length]
        return _Request(parts[0], parts[1], body, close)

    def _fail(self, exc: _BadRequest) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        reason = HTTPStatus(exc.status).phrase
        self._fwd.writes.write(transport, _error(exc.status, reason, str(exc)))
        self._fwd.writes.flush_one(transport)
        transport.close()

    async def _serve(self) -> None:
        transport = self._transport
        assert transport is not None
        try:
            while self._queue:
                request = self._queue.popleft()
                try:
                    await self._fwd.forward(request, transport)
                except OSError:  # a stream cut short: the client sees the connection end
                    self._queue.clear()
                    transport.abort()
                    return
                if request.close:
                    self._fwd.writes.flush_one(transport)
                    transport.close()
                    return
            if self._broken is not None:
                self._fail(self._broken)
        finally:
            self._task = None


async def _serve(forwarder: Forwarder, host: str, port: int, upstreams: Sequence[str]) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(forwarder.protocol, host, port)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"forwarding http://{host}:{port} to {', '.join(upstreams)}", flush=True)
    try:
        await stop.wait()
    finally:
        server.close()
        forwarder.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 1.0)


def forwarder_main(argv: Sequence[str] | None = None) -> int:
    """``python -m sage_llm.bench.forwarder [--host H] --port P URL [URL ...]``."""
    parser = argparse.ArgumentParser(
        prog="python -m sage_llm.bench.forwarder",
        description="Minimal round-robin HTTP/1.1 forwarder (the proxy bench's floor).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("upstreams", nargs="+", metavar="URL")
    args = parser.parse_args(argv)
    try:
        forwarder = Forwarder(args.upstreams)  # the URLs, checked before binding
    except ValueError as exc:
        parser.error(str(exc))
    asyncio.run(_serve(forwarder, args.host, args.port, args.upstreams))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(forwarder_main())
