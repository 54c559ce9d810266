"""A lean HTTP/1.1 front for the gateway's two hot routes; aiohttp serves everything else.

aiohttp's server costs more CPU per proxied request than the whole proxy path needs
(request and response objects, header multidicts, the router, a writer per response).
``POST /v1/completions`` and ``POST /v1/chat/completions`` are nearly all of a gateway's
traffic and always the same shape, so :class:`LeanServer` accepts the connections itself,
on :class:`asyncio.Protocol` objects, and serves those two routes with a handler of its
own (:mod:`sage_llm.gateway.lean_routes`). Any other request — another route or method, a
query string, ``HTTP/1.0``, a chunked or ``Expect: 100-continue`` body, a body above the
size limit, no ``Host`` header, a malformed or oversized head (bare-LF line ends, a header
name that is not a token, a control character anywhere in a header line), a CORS request
when CORS is configured — makes the connection switch to aiohttp's protocol for the rest
of its life (the bytes already read are handed over), so every other route, error and edge
case is answered by aiohttp exactly as before.

Per connection, requests are served one at a time in arrival order (pipelined requests
wait in the buffer; reading pauses when it holds more than a whole request can, and while
the client has not read the answers before: the next request starts only once they have
left the transport's buffer, ``resume_writing``, so answers never pile up in memory). A
client that disconnects cancels its request's handler, as aiohttp's
``handler_cancellation`` does. Idle keep-alive connections close after
``keepalive_timeout_s`` (75 s, as the aiohttp front's), and a request whose head and body have
not all arrived ``read_timeout_s`` after its first byte gets a 408 and its connection
closes (one sweep per tenth of the shorter of the two looks for both, so a connection
closes at most 10% late and a request sets no timer of its own).
:meth:`LeanServer.shutdown` closes idle connections, lets in-flight requests finish for up
to a timeout, then cancels them.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import fcntl
import logging
import re
import sys
import termios
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Protocol, cast

from sage_llm import jsonutil
from sage_llm.gateway.errors import error_body
from sage_llm.gateway.observe import REQUEST_ID_HEADER
from sage_llm.httpserve import KEEPALIVE_TIMEOUT_S, tcp_nodelay
from sage_llm.request_json import content_length_value
from sage_llm.writebatch import WriteBatch

log = logging.getLogger("sage_llm.gateway")

_MAX_HEAD = 16 * 1024
"""Heads longer than this go to aiohttp (which answers 400 beyond its own limits), with the
time their first byte came (``head_began``, when the protocol has it), so that
``read_timeout_s`` still counts from it."""
_MAX_LINE = 8190
"""Heads with a line longer than this go to aiohttp too: its limit on the request line, a
header's name and a header's value (it answers 400 beyond them)."""
_MAX_HEADERS = 128
"""Heads with more header lines than this go to aiohttp too: its limit (``max_headers``),
beyond which it answers 400 (too many headers)."""
_REASONS = {s.value: s.phrase for s in HTTPStatus}


@dataclass(slots=True)
class LeanRequest:
    """One parsed request on a hot route."""

    method: str
    path: str
    headers: dict[str, str]
    """Header names lower-cased; of a repeated header, the first (as aiohttp's
    ``request.headers[name]``; one that must not repeat hands the request to aiohttp)."""
    body: bytes


class LeanHandler(Protocol):
    """Serves one hot-route request: writes its whole response through ``conn``."""

    def __call__(
        self, request: LeanRequest, conn: LeanConnection
    ) -> Coroutine[object, object, None]: ...


class LeanStream:
    """The body of a chunked response (``write`` / ``write_eof``, like aiohttp's
    ``StreamResponse``); the head leaves with the first write. Each write is sent at once
    (:meth:`LeanConnection.send` with ``now``), not at the end of the turn: a relayed
    event reaches the client as soon as it is written (a few tens of microseconds sooner at
    concurrency 1), and under load a stream's writes were measured to cost no more CPU."""

    __slots__ = ("_conn", "_head")

    def __init__(self, conn: LeanConnection, head: bytes) -> None:
        self._conn = conn
        self._head = head

    async def write(self, data: bytes) -> None:
        if not data:
            return
        self._conn.send(self._head + b"%x\r\n%b\r\n" % (len(data), data), now=True)
        self._head = b""
        await self._conn.drain()

    async def write_eof(self, data: bytes = b"") -> None:
        """Write ``data`` (if any) and the last chunk, in one send."""
        body = b"%x\r\n%b\r\n0\r\n\r\n" % (len(data), data) if data else b"0\r\n\r\n"
        self._conn.send(self._head + body, now=True)
        self._head = b""
        self._conn.unfinished = False


class LeanConnection(asyncio.Protocol):
    """One client connection (until it is handed over to aiohttp)."""

    def __init__(self, server: LeanServer) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._task: asyncio.Task[None] | None = None
        self._keep_alive = True
        self._answered = False
        self._read_paused = False
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self.idle_since: float | None = None
        """Loop time since which the connection has waited for a request (None: busy)."""
        self.reading_since: float | None = None
        """Loop time of the first byte of a request not yet read whole (None: none)."""
        self._unread = -1
        """Bytes of answers its client had not read at the idle sweep's last look (-1: none
        seen): one that is reading them slowly is not idle."""
        self.closed = False
        self.unfinished = False
        """A chunked response was started and not ended (``write_eof``): when its handler
        returns so, the connection closes (the client cannot tell where the next
        response would begin)."""

    # --- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's too
        tcp_nodelay(transport)
        self._server.connections.add(self)
        self._server.watch_idle()
        self._arm_idle()

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if self._task is None and not self._write_paused:
            self._next()
        elif self._task is None:
            self._hold()
        elif len(self._buf) > self._server.max_buffer and not self._read_paused:
            assert self._transport is not None
            self._transport.pause_reading()
            self._read_paused = True

    def eof_received(self) -> bool:
        # close; a request in progress is cancelled in connection_lost (a half-close too:
        # it cannot be told from a close, whose request's work must stop)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._server.connections.discard(self)
        self.idle_since = None
        if self._task is not None:
            self._task.cancel()
        elif self.reading_since is not None:  # gone while its request's body came
            gone, head = self._server.on_client_gone, self._whole_head()
            if gone is not None and head is not None:
                method, path, headers = head
                waited_s = asyncio.get_running_loop().time() - self.reading_since
                gone(method, path, waited_s, headers.get("x-request-id", ""))
            self.reading_since = None
        self._wake_writer(ConnectionResetError("the client closed the connection"))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_writer(None)
        transport = self._transport
        held = self._task is None and self._read_paused and not self.closed
        if held and transport is not None and not transport.is_closing():  # go on
            self._read_paused = False
            transport.resume_reading()
            self._next()

    # --- writing (used by the handler) ---------------------------------------------------

    def send(self, data: bytes, *, now: bool = False) -> None:
        """Write raw bytes of the current response: at the end of this turn of the loop
        with the others (:mod:`sage_llm.writebatch`), or with ``now`` at once (after what
        is waiting for this connection); ``ConnectionResetError`` once the client is gone
        (as aiohttp's writer raises)."""
        transport = self._transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client closed the connection")
        if now:
            self._server.writes.write_now(transport, data)
        else:
            self._server.writes.write(transport, data)

    async def drain(self) -> None:
        """Wait while the client reads slower than the response is written; one that has
        read none of it for ``keepalive_timeout_s``, and again, is gone: its connection is
        aborted (``ConnectionResetError``, as for a client that left), so that a stream
        left unread does not hold its request for as long as the client waits."""
        limit = self._server.keepalive_timeout_s
        while self._write_paused:
            if self._drain is None or self._drain.done():
                self._drain = asyncio.get_running_loop().create_future()
            if not limit or limit <= 0:
                await self._drain
                return
            try:
                await asyncio.wait_for(asyncio.shield(self._drain), limit)
            except TimeoutError:
                if self.reading_answers():  # slow, but reading
                    continue
                transport = self._transport
                if transport is not None:
                    transport.abort()
                raise ConnectionResetError(
                    f"the client read none of its answer for {limit:g} s"
                ) from None

    def respond(
        self, status: int, body: bytes, *, content_type: str, headers: Mapping[str, str]
    ) -> None:
        """Write a whole response (``Content-Length``) and end it."""
        self.send(self._head(status, headers, content_type, f"Content-Length: {len(body)}") + body)

    def open_stream(
        self, status: int, *, content_type: str, headers: Mapping[str, str]
    ) -> LeanStream:
        """Start a chunked response; its head leaves with the first write."""
        self.unfinished = True
        return LeanStream(
            self, self._head(status, headers, content_type, "Transfer-Encoding: chunked")
        )

    @property
    def answered(self) -> bool:
        """Whether the current request's response has started (the head was produced)."""
        return self._answered

    def _head(
        self, status: int, headers: Mapping[str, str], content_type: str, framing: str
    ) -> bytes:
        self._answered = True
        close = not self._keep_alive or self._server.closing
        lines = [
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}",
            f"Content-Type: {content_type}",
            framing,
            f"Date: {self._server.date()}",
            "Server: sage-llm",
        ]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        if close:
            lines.append("Connection: close")
        lines.append("\r\n")
        return "\r\n".join(lines).encode("latin-1")

    def _wake_writer(self, exc: BaseException | None) -> None:
        waiter = self._drain
        self._drain = None
        if waiter is not None and not waiter.done():
            if exc is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(exc)
                # said here: a drain waiting on it still gets it; one cancelled meanwhile
                # (its handler cut by a shutdown) leaves nobody to, and asyncio would log it
                waiter.exception()

    # --- parsing and dispatch -------------------------------------------------------------

    def _next(self) -> None:
        """Start the next request in the buffer, hand the connection over, or wait."""
        buf = self._buf
        if not buf:
            return
        self.idle_since = None
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > _MAX_HEAD or _BARE_LF.search(buf):  # too long, or bare-LF lines
                self._handover()
            elif self.reading_since is None:
                self.reading_since = asyncio.get_running_loop().time()
            return
        if end > _MAX_HEAD:
            self._handover()
            return
        parsed = self._parse_head(bytes(buf[:end]))
        if parsed is None:
            self._handover()
            return
        method, path, headers = parsed
        length = int(headers["content-length"])
        total = end + 4 + length
        if len(buf) < total:  # the body is still coming
            if self.reading_since is None:
                self.reading_since = asyncio.get_running_loop().time()
            return
        body = bytes(buf[end + 4 : total])
        del buf[:total]
        self.reading_since = None
        connection = headers.get("connection")
        self._keep_alive = connection is None or not _has_close(connection)
        self._answered = self.unfinished = False
        request = LeanRequest(method, path, headers, body)
        self._task = asyncio.get_running_loop().create_task(self._serve(request))

    async def _serve(self, request: LeanRequest) -> None:
        """Run the handler, then go on with the connection (in the same task: no
        done-callback turn of the loop)."""
        try:
            await self._server.handler(request, self)
        except asyncio.CancelledError:
            self._task = None  # the connection is gone (or the server is shutting down)
            raise
        except Exception:
            log.exception("lean request handler failed")
        self._task = None
        self._after_request()

    def _parse_head(self, head: bytes) -> tuple[str, str, dict[str, str]] | None:
        """Method, path and headers of a request the lean path serves; None otherwise."""
        if not head.isascii():
            return None  # aiohttp reads its header values as UTF-8
        text = head.decode("latin-1")
        eol = text.find("\r\n")
        if eol > _MAX_LINE or (eol < 0 and len(text) > _MAX_LINE):
            return None
        parts = (text if eol < 0 else text[:eol]).split(" ")
        if len(parts) != 3 or parts[2] != "HTTP/1.1" or parts[0] != "POST":
            return None
        path = parts[1]
        if path not in self._server.routes:
            return None
        headers: dict[str, str] = {}
        names = self._server.header_names
        if eol >= 0:
            lines = text[eol + 2 :].split("\r\n")
            if len(lines) > _MAX_HEADERS:
                return None
            for line in lines:
                if len(line) > _MAX_LINE:
                    return None
                name, sep, value = line.partition(":")
                if not sep or (not line.isprintable() and not _tabbed_printable(line)):
                    return None  # malformed, or a control character: aiohttp answers it
                key = names.get(name)
                if key is None:
                    if _TOKEN.fullmatch(name) is None:
                        return None  # not a header name (folded, spaced, a separator)
                    key = name.lower()
                    if len(names) < _HEADER_NAMES:
                        names[name] = key
                if key in headers:
                    if key in _SINGLE or key == "connection":  # aiohttp reads all of these
                        return None
                    continue  # the first one counts, as aiohttp's request.headers[key]
                headers[key] = value.strip()
        if not _HANDOVER.isdisjoint(headers) or "host" not in headers:
            return None  # no Host: aiohttp's 400 (RFC 9112 section 3.2)
        if self._server.cors and "origin" in headers:
            return None
        raw = headers.get("content-length", "")
        length = content_length_value(raw)
        if length is None or length > self._server.max_body_bytes:
            return None  # (none: chunked, or not a number; above the limit: aiohttp's 413)
        if raw[0] == "0":  # (leading zeros, which int() refuses past 4,300 digits)
            headers["content-length"] = str(length)
        return "POST", path, headers

    def _after_request(self) -> None:
        transport = self._transport
        if transport is None or self.closed:
            return
        if not self._answered or self.unfinished or not self._keep_alive or self._server.closing:
            self._server.writes.flush_one(transport)
            transport.close()
            return
        if self._buf and self._write_paused:
            self._hold()
            return
        if self._read_paused:
            self._read_paused = False
            transport.resume_reading()
        if self._buf:
            self._next()
        else:
            self._arm_idle()

    def _hold(self) -> None:
        """Between requests, while the client has not read the answers before (writing is
        paused): start no request, and read no more, until ``resume_writing``. What has
        arrived of the next request is not timed meanwhile (its reading was stopped); the
        connection waits on its client as an idle one does, and closes as one after the
        keep-alive timeout."""
        self.reading_since = None
        self.idle_since = asyncio.get_running_loop().time()
        if not self._read_paused and self._transport is not None:
            self._transport.pause_reading()
            self._read_paused = True

    def _handover(self) -> None:
        """Give the connection, and what was read of it, to aiohttp's protocol."""
        transport = self._transport
        assert transport is not None
        self._server.writes.flush_one(transport)
        self.idle_since = None
        self._server.connections.discard(self)
        if self._read_paused:
            self._read_paused = False
            transport.resume_reading()
        protocol = self._server.fallback()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        data, self._buf = bytes(self._buf), bytearray()
        if data:
            began = getattr(protocol, "head_began", None)
            if began is not None:  # its read timeout counts from the head's first byte
                since = self.reading_since
                began(asyncio.get_running_loop().time() if since is None else since, data)
            protocol.data_received(data)

    def _arm_idle(self) -> None:
        self.idle_since = asyncio.get_running_loop().time()

    def time_out_reading(self, limit_s: float) -> None:
        """The request being read took longer than ``limit_s``: answer 408 and close."""
        transport = self._transport
        if self._task is not None or transport is None or self.closed:
            return
        since, self.reading_since = self.reading_since, None
        self._keep_alive = False
        body = read_timeout_body(limit_s)
        headers: dict[str, str] = {}
        noted = self._server.on_read_timeout
        if noted is not None:
            method, path = request_line(self._buf)
            waited_s = 0.0 if since is None else asyncio.get_running_loop().time() - since
            headers[REQUEST_ID_HEADER] = noted(method, path, waited_s, self._given_id())
        self.respond(408, body, content_type="application/json", headers=headers)
        self._server.writes.flush_one(transport)
        transport.close()

    def _given_id(self) -> str:
        """The ``X-Request-Id`` of the request being read, when its head has arrived whole
        (read as :meth:`_next` reads it), else ``""``."""
        parsed = self._whole_head()
        return "" if parsed is None else parsed[2].get("x-request-id", "")

    def _whole_head(self) -> tuple[str, str, dict[str, str]] | None:
        """The head of the request being read when it has arrived whole and is one the lean
        path serves (:meth:`_parse_head`), else None."""
        end = self._buf.find(b"\r\n\r\n")
        return None if end < 0 else self._parse_head(bytes(self._buf[:end]))

    def reading_answers(self) -> bool:
        """Whether its client has read some of the answers left to it since the last time
        this was asked (a slow reader, not an idle client): what the transport holds and
        what the socket has not had acknowledged (the kernel's send queue, which a reader
        drains long before the transport is let write again)."""
        transport = self._transport
        left = 0 if transport is None else _unsent(transport)
        moved = left > 0 and left != self._unread
        self._unread = left
        return moved

    def close_if_idle(self, *, unread: bool = False) -> None:
        """Close now unless a request is in progress (that one closes when it ends). A
        request still arriving is dropped by the server, not left by its client: not a 499
        (:meth:`connection_lost`). With ``unread``, answers the client has left unread
        (the keep-alive timeout passed, and again, without its client reading any of them)
        are dropped: a close would wait for the client to read them first, for ever if it
        never does."""
        transport = self._transport
        if self._task is None and transport is not None:
            self.reading_since = None
            self._server.writes.flush_one(transport)
            if unread and transport.get_write_buffer_size():
                transport.abort()
            else:
                transport.close()

    @property
    def task(self) -> asyncio.Task[None] | None:
        return self._task


_UNREAD_POLL_S = 0.05
"""How often a shutdown looks whether the answers left to clients have been read."""
SWEEP_FRACTION = 0.1
"""Idle connections, and requests slow to arrive, are looked for every tenth of the
keep-alive timeout or of the read timeout, whichever is shorter (aiohttp's connections'
heads too, :class:`sage_llm.gateway.server.HeadTimer`): at most 10% late."""
_BARE_LF = re.compile(rb"(?<!\r)\n")
"""A line end without its CR (aiohttp answers a head with one at once)."""
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
"""A header name (RFC 9110's ``token``)."""


def read_timeout_body(limit_s: float) -> bytes:
    """The JSON error body of a request that did not arrive within ``limit_s`` (408),
    the same on both fronts."""
    message = f"the request did not arrive within {limit_s:g} s"
    return jsonutil.dumps(error_body(message, "timeout_error", 408))


def request_line(buf: bytes | bytearray) -> tuple[str, str]:
    """The method and path of the request line at the start of ``buf``, as far as they
    have arrived (``-`` for what has not, or is not printable ASCII: they go to the log)."""
    eol = buf.find(b"\r\n")
    line = bytes(buf[: eol if eol >= 0 else 200]).decode("latin-1")
    parts = [p if p.isascii() and p.isprintable() else "" for p in line.split(" ")]
    method = parts[0] if len(parts) > 1 and parts[0] else "-"
    path = parts[1] if len(parts) > 2 and parts[1] else "-"
    return method, path


def _unsent(transport: asyncio.Transport) -> int:
    """Bytes written to ``transport`` its peer has not acknowledged: the transport's buffer
    and, where the system tells (Linux ``SIOCOUTQ``), the socket's send queue."""
    size = transport.get_write_buffer_size()
    if size == 0:
        return 0
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            queued = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
            size += int.from_bytes(queued, sys.byteorder, signed=True)
    return size


def _has_close(connection: str) -> bool:
    """Whether a ``Connection`` value, a comma-separated list of tokens (RFC 9110 section
    7.6.1), holds ``close`` (not merely a token containing it, as ``closed``)."""
    value = connection.lower()
    return "close" in value and any(t.strip() == "close" for t in value.split(","))


def _tabbed_printable(line: str) -> bool:
    """Whether ``line``'s only non-printable characters are tabs (blanks in a value)."""
    return line.replace("\t", " ").isprintable()


_HEADER_NAMES = 256
"""How many header names a server remembers as valid (with their lower-case form)."""
_SINGLE = frozenset({"content-length", "host", "content-type", "authorization"})
"""Headers that must not repeat (aiohttp answers the request when they do)."""
_HANDOVER = frozenset({"transfer-encoding", "expect", "upgrade", "content-encoding"})
"""Headers whose requests aiohttp serves (chunked bodies, 100-continue, upgrades,
compressed bodies)."""


class LeanServer:
    """Accepts the gateway's connections; serves ``routes`` with ``handler`` and hands every
    other request's connection to ``fallback()`` (aiohttp's protocol factory)."""

    def __init__(
        self,
        handler: LeanHandler,
        fallback: Callable[[], asyncio.Protocol],
        *,
        routes: frozenset[str],
        max_body_bytes: int,
        cors: bool = False,
        keepalive_timeout_s: float = KEEPALIVE_TIMEOUT_S,
        read_timeout_s: float | None = 30.0,
        on_read_timeout: Callable[[str, str, float, str], str] | None = None,
        on_client_gone: Callable[[str, str, float, str], None] | None = None,
    ) -> None:
        self.handler = handler
        self.on_client_gone = on_client_gone
        """Called for each request whose client closed the connection after its head and
        before its whole body (method, path, seconds since it began to arrive, the
        ``X-Request-Id`` its head gave): a 499, as the aiohttp app counts and logs one."""
        self.on_read_timeout = on_read_timeout
        """Called for each request answered 408 (``read_timeout_s`` passed before it had
        all arrived) with its method and path, as far as they arrived (``-`` otherwise),
        the seconds it had taken and the ``X-Request-Id`` its head gave (``""``: none, or
        the head is not whole); returns the request id its answer carries."""
        self.fallback = fallback
        """aiohttp's protocol factory; a protocol with ``head_began(at, data)`` is told, as
        a connection is handed to it, when the bytes handed over began to arrive."""
        self.routes = routes
        self.max_body_bytes = max_body_bytes
        self.max_buffer = max_body_bytes + _MAX_HEAD
        self.cors = cors
        self.keepalive_timeout_s = keepalive_timeout_s
        self.read_timeout_s = read_timeout_s
        self.connections: set[LeanConnection] = set()
        self.writes = WriteBatch()
        """Responses leave together at the end of each turn of the loop (see
        :mod:`sage_llm.writebatch`)."""
        self.closing = False
        self.header_names: dict[str, str] = {}
        """Header names seen valid, each with its lower-case form (up to
        :data:`_HEADER_NAMES`)."""
        self._sweep: asyncio.TimerHandle | None = None
        self._date_at = -1
        self._date = ""

    def __call__(self) -> LeanConnection:
        return LeanConnection(self)

    def watch_idle(self) -> None:
        """Make sure idle connections, and requests slow to arrive, are being looked for
        (while there are connections)."""
        limits = [t for t in (self.keepalive_timeout_s, self.read_timeout_s) if t and t > 0]
        if self._sweep is None and limits and not self.closing:
            period = min(limits) * SWEEP_FRACTION
            self._sweep = asyncio.get_running_loop().call_later(period, self._close_idle)

    def _close_idle(self) -> None:
        """Close the connections idle for ``keepalive_timeout_s`` or longer, and answer 408
        to those whose request has taken ``read_timeout_s`` or longer to arrive; look again
        a tenth of the shorter limit later while any connection is open (so one closes at
        most that late)."""
        self._sweep = None
        now = asyncio.get_running_loop().time()
        idle_limit = self.keepalive_timeout_s
        read_limit = self.read_timeout_s
        for conn in list(self.connections):
            since = conn.idle_since
            if since is not None and idle_limit > 0 and now - since >= idle_limit:
                if conn.reading_answers():  # still reading its answers: not idle yet
                    conn.idle_since = now
                else:
                    conn.close_if_idle(unread=True)
                continue
            reading = conn.reading_since
            if reading is not None and read_limit and now - reading >= read_limit:
                conn.time_out_reading(read_limit)
        if self.connections:
            self.watch_idle()

    def date(self) -> str:
        """The ``Date`` header value, formatted once per second."""
        now = int(time.time())
        if now != self._date_at:
            self._date_at = now
            self._date = email.utils.formatdate(now, usegmt=True)
        return self._date

    async def shutdown(self, timeout_s: float) -> None:
        """Close idle connections; wait up to ``timeout_s`` for requests in progress, then
        cancel them and close their connections; answers their clients have not read by
        then are dropped (their connections would stay open for as long as they wait)."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + timeout_s
        self.closing = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for conn in list(self.connections):
            conn.close_if_idle()
        tasks = [c.task for c in self.connections if c.task is not None]
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=timeout_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        for conn in list(self.connections):
            conn.close_if_idle()
        for _ in range(int(timeout_s / _UNREAD_POLL_S) + 1):  # answers still being read
            if not self.connections or loop.time() >= give_up:
                break
            await asyncio.sleep(_UNREAD_POLL_S)
        for conn in list(self.connections):  # what is left unread goes: it would hold them
            conn.close_if_idle(unread=True)
