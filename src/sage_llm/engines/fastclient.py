"""A lean HTTP/1.1 client for the per-request engine calls (the gateway's hot path).

aiohttp's client costs the gateway about as much CPU per proxied request as all of the
control plane's work together (request object, tracing hooks, header multidicts, a
separate write for the body, a payload writer per request). The engine calls on the hot
path are always the same shape — ``POST`` of a small JSON body to one ``http://`` engine,
answered by a JSON body (``Content-Length``) or an SSE stream (chunked) — so this module
does just that, on :class:`asyncio.Protocol` connections:

* :class:`FastPool`: keep-alive connections to one ``host:port`` (``TCP_NODELAY``), reused
  while idle for less than ``keepalive_s`` (4 s by default: under the 5 s after which
  uvicorn, and so vLLM and SGLang, close an idle connection, so a request is rarely sent
  on a connection the engine is closing); a connection is only put back once its
  response was read to the end.
* :meth:`FastPool.request`: one write per request (head and body together); returns a
  :class:`FastResponse` once the status line and headers are in.
* :class:`FastResponse`: the status, the headers (names lower-cased) and the body through
  :meth:`~FastResponse.read_some` (whatever is there, de-chunked; ``b""`` at its end).
  :meth:`~FastResponse.close` drops the connection: that is how an engine learns that a
  request was cancelled.

Errors are plain :class:`ConnectionError` (the connection failed, closed early or sent
something that is not HTTP/1.x); the caller maps them to engine errors and applies its
timeouts around the awaits. Everything else (health probes, ``/metrics``, ``/v1/models``,
``https://`` engines) stays on aiohttp: :class:`EngineConnector` is the aiohttp connector
that also owns the fast pools, so closing the session closes them too.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import cast

import aiohttp

from sage_llm.httpserve import tcp_nodelay
from sage_llm.types import host_port
from sage_llm.writebatch import WriteBatch

__all__ = ["EngineConnector", "FastPool", "FastResponse"]

_MAX_HEAD = 64 * 1024
_PAUSE_AT = 1 << 20


class _Conn(asyncio.Protocol):
    """One keep-alive connection; the response is parsed by :class:`FastResponse`."""

    __slots__ = (
        "buf",
        "closed",
        "drainer",
        "eof",
        "exc",
        "idle_since",
        "paused",
        "transport",
        "waiter",
    )

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[None] | None = None
        self.drainer: FastResponse | None = None
        """The response whose rest is dropped as it arrives (:meth:`FastResponse.release_later`)."""
        self.closed = False
        self.eof = False
        self.paused = False
        self.exc: BaseException | None = None
        self.idle_since = 0.0

    # --- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one
        self.transport = cast(asyncio.Transport, transport)
        tcp_nodelay(transport)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.drainer is not None:
            self.drainer._drain()
            return
        if len(self.buf) > _PAUSE_AT and self.transport is not None and not self.paused:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        if self.drainer is not None:
            self.drainer._drain()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.eof = True
        self.exc = exc
        self._wake()
        if self.drainer is not None:
            self.drainer._drain()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # --- used by FastResponse -----------------------------------------------------------

    async def more(self) -> bool:
        """Wait for more bytes; False when the peer closed (nothing more will come)."""
        self.resume()
        if self.eof:
            return False
        waiter = asyncio.get_running_loop().create_future()
        self.waiter = waiter
        await waiter
        return True

    def resume(self) -> None:
        """Read again if reading was paused (the buffer grew past its bound)."""
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class UnsupportedEncodingError(ValueError):
    """An answer's body came compressed though identity was asked for: the engine's
    answer is unusable, its connection is not at fault."""


class FastResponse:
    """The response to one :meth:`FastPool.request`; read its body, then :meth:`release`
    it (back to the pool when read to the end and reusable) or :meth:`close` it."""

    __slots__ = (
        "_chunk_left",
        "_conn",
        "_done",
        "_drain_timer",
        "_keep_alive",
        "_left",
        "_mode",
        "_pool",
        "content_type",
        "headers",
        "reason",
        "status",
    )

    def __init__(self, pool: FastPool, conn: _Conn) -> None:
        self._pool = pool
        self._conn: _Conn | None = conn
        self.status = 0
        self.reason = ""
        self.headers: dict[str, str] = {}
        self.content_type = ""
        self._mode = 0  # 0: Content-Length, 1: chunked, 2: until the connection closes
        self._left = 0
        self._chunk_left = -1  # -1: expecting a size line; -2: expecting the CRLF after data
        self._done = False
        self._keep_alive = True
        self._drain_timer: asyncio.TimerHandle | None = None

    async def _read_head(self) -> None:
        """The final response's head: interim ones (``100 Continue``, ``103 Early Hints``:
        1xx but 101) are read past, as RFC 9110 asks of every client."""
        while True:
            lines = await self._next_head()
            parts = lines[0].split(" ", 2)
            code = parts[1] if len(parts) > 1 else ""
            if not parts[0].startswith("HTTP/1.") or not (code.isascii() and code.isdigit()):
                raise ConnectionError(f"not an HTTP/1.x response: {lines[0][:100]!r}")
            if not (100 <= int(code) < 200) or int(code) == 101:
                break
        self.status = int(parts[1])
        self.reason = parts[2] if len(parts) > 2 else ""
        headers = self.headers
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise ConnectionError(f"malformed response header: {line[:100]!r}")
            key = name.strip().lower()
            value = value.strip()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        self.content_type = headers.get("content-type", "").partition(";")[0].strip().lower()
        coding = headers.get("content-encoding", "identity").strip().lower()
        if coding not in ("identity", ""):  # asked for identity: a body this reads as it is
            raise UnsupportedEncodingError(
                f"the engine answered with Content-Encoding {coding!r}, which this client "
                "does not decode (it asks for identity)"
            )
        connection = headers.get("connection", "").lower()
        self._keep_alive = (
            "close" not in connection if parts[0] == "HTTP/1.1" else "keep-alive" in connection
        )
        if self.status in (204, 304) or 100 <= self.status < 200:
            self._done = True
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            self._mode = 1
        elif (length := headers.get("content-length")) is not None:
            try:
                self._left = int(length)
            except ValueError:
                raise ConnectionError(f"bad Content-Length {length!r}") from None
            if self._left < 0:
                raise ConnectionError(f"bad Content-Length {length!r}")
            self._done = self._left == 0
        else:
            self._mode = 2
            self._keep_alive = False

    async def _next_head(self) -> list[str]:
        """The lines of the next response head in the buffer (waiting for it)."""
        conn = self._conn
        assert conn is not None
        while True:
            end = conn.buf.find(b"\r\n\r\n")
            if end >= 0:
                break
            if len(conn.buf) > _MAX_HEAD:
                raise ConnectionError("response head too large")
            if not await conn.more():
                raise ConnectionError(_closed_message(conn, "before the response"))
        head = bytes(conn.buf[:end]).decode("latin-1")
        del conn.buf[: end + 4]
        return head.split("\r\n")

    @property
    def at_eof(self) -> bool:
        """True once the whole body was read."""
        return self._done

    async def read_some(self) -> bytes:
        """The body bytes that are there (waiting for some); ``b""`` once it is all read.
        Raises :class:`ConnectionError` when the connection ends inside the body."""
        while True:
            if self._done:
                return b""
            conn = self._conn
            if conn is None:
                raise ConnectionError("response closed")
            data = self._take(conn)
            if data or self._done:
                return data
            if not await conn.more():
                data = self._take(conn)
                if data or self._done:
                    return data
                if self._mode == 2:
                    self._done = True
                    return b""
                raise ConnectionError(_closed_message(conn, "inside the response body"))

    def _take(self, conn: _Conn) -> bytes:
        buf = conn.buf
        if not buf:
            return b""
        if self._mode == 0:
            n = min(len(buf), self._left)
            data = bytes(buf[:n])
            del buf[:n]
            self._left -= n
            if self._left == 0:
                self._done = True
            return data
        if self._mode == 2:
            data = bytes(buf)
            buf.clear()
            return data
        return self._take_chunked(buf)

    def _take_chunked(self, buf: bytearray) -> bytes:
        parts: list[bytes] = []
        pos = 0
        n = len(buf)
        try:
            while pos < n:
                left = self._chunk_left
                if left > 0:
                    take = min(left, n - pos)
                    parts.append(bytes(buf[pos : pos + take]))
                    pos += take
                    left -= take
                    self._chunk_left = left if left > 0 else -2
                elif left == -2:
                    if n - pos < 2:
                        break
                    if buf[pos : pos + 2] != b"\r\n":
                        raise ConnectionError("malformed chunked body")
                    pos += 2
                    self._chunk_left = -1
                else:
                    eol = buf.find(b"\r\n", pos)
                    if eol < 0:
                        if n - pos > 1024:
                            raise ConnectionError("malformed chunk size line")
                        break
                    size_text = bytes(buf[pos:eol]).split(b";", 1)[0].strip()
                    try:
                        size = int(size_text, 16)
                    except ValueError:
                        raise ConnectionError(f"bad chunk size {size_text[:20]!r}") from None
                    if size == 0:
                        # the last chunk: skip trailers up to the empty line
                        if buf[eol : eol + 4] == b"\r\n\r\n":
                            end = eol + 4
                        else:
                            end = buf.find(b"\r\n\r\n", eol)
                            if end < 0:
                                break
                            end += 4
                        pos = end
                        self._done = True
                        break
                    pos = eol + 2
                    self._chunk_left = size
        finally:
            del buf[:pos]
        return b"".join(parts) if len(parts) != 1 else parts[0]

    async def read(self) -> bytes:
        """The rest of the body."""
        parts = []
        while data := await self.read_some():
            parts.append(data)
        return b"".join(parts)

    def release(self) -> None:
        """Done with the response: the connection goes back to the pool when the body was
        read to the end and the connection is reusable, else it is closed."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._done and self._keep_alive and not conn.buf:
            self._pool.put_back(conn)
        else:
            conn.abort()

    def close(self) -> None:
        """Drop the connection (the engine sees the request's connection close)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.abort()

    def release_later(self, timeout_s: float) -> None:
        """:meth:`release`, for a response whose reader is done before its body ended (a
        stream past its ``[DONE]`` event, the body's last chunk still on the way): the
        rest is read and dropped as it arrives, in the connection's ``data_received`` (no
        task, nothing awaited), and the connection goes back to the pool once the body
        ends; it is closed instead if the body is malformed, the connection ends, or the
        body has not ended within ``timeout_s``."""
        conn = self._conn
        if conn is None:
            return
        if self._pool._closed:  # nothing would close it: the pool's owner has left
            self.close()
            return
        conn.resume()
        conn.drainer = self
        self._drain()
        if self._conn is not None:  # still to come
            loop = asyncio.get_running_loop()
            self._drain_timer = loop.call_later(timeout_s, self._drain_expired)
            self._pool._draining.add(self)

    def _drain(self) -> None:
        """Drop the body bytes received; release or close the connection at the end."""
        conn = self._conn
        if conn is None:
            return
        try:
            self._take(conn)
        except ConnectionError:
            self._end_drain(conn)
            self.close()
            return
        if self._done:
            self._end_drain(conn)
            self.release()
        elif conn.eof or self._mode == 2:
            self._end_drain(conn)
            self.close()

    def _drain_expired(self) -> None:
        self._drain_timer = None
        self.abandon_drain()

    def abandon_drain(self) -> None:
        """Stop waiting for the rest of the body: close the connection."""
        conn = self._conn
        if conn is not None:
            self._end_drain(conn)
            self.close()

    def _end_drain(self, conn: _Conn) -> None:
        conn.drainer = None
        self._pool._draining.discard(self)
        timer, self._drain_timer = self._drain_timer, None
        if timer is not None:
            timer.cancel()


def _closed_message(conn: _Conn, where: str) -> str:
    reason = f": {conn.exc}" if conn.exc is not None else ""
    return f"connection closed {where}{reason}"


class FastPool:
    """Keep-alive HTTP/1.1 connections to one ``host:port``."""

    def __init__(
        self, host: str, port: int, *, keepalive_s: float = 4.0, writes: WriteBatch | None = None
    ) -> None:
        self.host = host
        self.port = port
        self.keepalive_s = keepalive_s
        self.writes = WriteBatch() if writes is None else writes
        """Requests leave together at the end of each turn of the loop (see
        :mod:`sage_llm.writebatch`; pools of one connector share it)."""
        self._host_header = host_port(host, port)  # an IPv6 address in brackets
        self._idle: deque[_Conn] = deque()
        self._draining: set[FastResponse] = set()
        """Responses whose body's rest is being read and dropped
        (:meth:`FastResponse.release_later`): no task holds them, so closing the pool
        closes them."""
        self._closed = False

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    def _get_idle(self, now: float) -> _Conn | None:
        idle = self._idle
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to be stale
            if conn.closed or conn.eof or conn.buf or now - conn.idle_since > self.keepalive_s:
                conn.abort()
                continue
            return conn
        return None

    async def _connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        try:
            _transport, conn = await loop.create_connection(_Conn, self.host, self.port)
        except OSError as exc:
            # worded as aiohttp words it, so messages stay the same for both paths
            raise ConnectionError(
                f"Cannot connect to host {self.host}:{self.port} [{exc.strerror or exc}]"
            ) from exc
        return conn

    async def request(
        self,
        method: str,
        path: str,
        body: bytes,
        headers: str = "",
        *,
        connect_timeout_s: float | None = None,
    ) -> FastResponse:
        """Send ``method path`` with ``body`` (``headers``: extra header lines, each ending in
        ``\\r\\n``) and wait for the response head. Cancelling the await closes the
        connection."""
        if self._closed:
            raise ConnectionError("connection pool is closed")
        loop = asyncio.get_running_loop()
        conn = self._get_idle(loop.time())
        if conn is None:
            if connect_timeout_s is None:
                conn = await self._connect()
            else:
                async with asyncio.timeout(connect_timeout_s):
                    conn = await self._connect()
        transport = conn.transport
        assert transport is not None
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {self._host_header}\r\n"
            f"Accept-Encoding: identity\r\nContent-Length: {len(body)}\r\n{headers}\r\n"
        )
        resp = FastResponse(self, conn)
        try:
            self.writes.write(transport, head.encode("latin-1") + body)
            await resp._read_head()
        except BaseException:
            resp.close()
            raise
        return resp

    def put_back(self, conn: _Conn) -> None:
        if self._closed or conn.closed:
            conn.abort()
            return
        now = asyncio.get_running_loop().time()
        conn.idle_since = now
        idle = self._idle
        idle.append(conn)
        # the least recently used connections sit at the left: close the expired ones
        while now - idle[0].idle_since > self.keepalive_s or idle[0].closed:
            idle.popleft().abort()

    def close(self) -> None:
        """Close the idle connections and those whose answer's rest is being dropped;
        connections in use close when released."""
        self._closed = True
        while self._idle:
            self._idle.pop().abort()
        while self._draining:
            self._draining.pop().abandon_drain()


class EngineConnector(aiohttp.TCPConnector):
    """aiohttp's connector for the non-hot-path calls, also owning one :class:`FastPool`
    per engine address: closing the session (which closes its connector) closes them."""

    def __init__(self, *, fast_keepalive_s: float = 4.0, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._fast_keepalive_s = fast_keepalive_s
        self._fast: dict[tuple[str, int], FastPool] = {}
        self._users: dict[tuple[str, int], int] = {}
        """How many clients took each pool (:meth:`fast_pool`) and have not given it back."""
        self._writes = WriteBatch()

    def fast_pool(self, host: str, port: int) -> FastPool | None:
        """The pool for ``host:port``, shared by the clients of that address, each of
        which gives it back with :meth:`release_pool`; None once the connector is closed."""
        if self.closed:
            return None
        key = (host, port)
        pool = self._fast.get(key)
        if pool is None:
            pool = self._fast[key] = FastPool(
                host, port, keepalive_s=self._fast_keepalive_s, writes=self._writes
            )
        self._users[key] = self._users.get(key, 0) + 1
        return pool

    def release_pool(self, host: str, port: int) -> None:
        """A client of ``host:port`` is done with its pool: the last one's going closes
        the pool's idle connections (those in use close when their call ends) and forgets
        it (a removed engine's connections are not kept open, nor its pool)."""
        key = (host, port)
        users = self._users.get(key, 0) - 1
        if users > 0:
            self._users[key] = users
            return
        self._users.pop(key, None)
        pool = self._fast.pop(key, None)
        if pool is not None:
            pool.close()

    async def close(self, *, abort_ssl: bool = False) -> None:
        for pool in self._fast.values():
            pool.close()
        self._fast.clear()
        self._users.clear()
        await super().close(abort_ssl=abort_ssl)
