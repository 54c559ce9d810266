"""The lean HTTP/1.1 client against hand-written responses from a raw asyncio server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from sage_llm.engines.base import EngineRequest
from sage_llm.engines.fastclient import (
    _PAUSE_AT,
    EngineConnector,
    FastPool,
    FastResponse,
    UnsupportedEncodingError,
    _Conn,
)
from sage_llm.engines.http import HTTPEngineClient, make_session
from sage_llm.sim.clock import run_virtual
from tests.engines.fake_engine import closed_port
from tests.factories import make_instance

Reply = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    """Answers each request on a connection with the next ``reply``; counts connections
    and keeps the request heads it read."""

    def __init__(self) -> None:
        self.reply: Reply | None = None
        self.connections = 0
        self.heads: list[bytes] = []
        self.bodies: list[bytes] = []
        self.closed = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    break
                self.heads.append(head)
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                self.bodies.append(await reader.readexactly(length))
                assert self.reply is not None
                await self.reply(reader, writer)
                if writer.is_closing():
                    break
        finally:
            self.closed.set()
            writer.close()


@pytest.fixture
async def server() -> AsyncIterator[tuple[RawServer, int]]:
    raw = RawServer()
    srv = await asyncio.start_server(raw.handle, "127.0.0.1", 0)
    port = int(srv.sockets[0].getsockname()[1])
    yield raw, port
    srv.close()
    await srv.wait_closed()


@pytest.fixture
async def pool(server: tuple[RawServer, int]) -> AsyncIterator[FastPool]:
    p = FastPool("127.0.0.1", server[1])
    yield p
    p.close()


def send(*pieces: bytes, close: bool = False) -> Reply:
    async def reply(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
        if close:
            writer.close()

    return reply


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


async def body_of(resp: FastResponse) -> bytes:
    data = await resp.read()
    resp.release()
    return data


CHUNKED = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
    b"5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nX-Trailer: 1\r\n\r\n"
)


async def test_content_length_body_and_one_write_per_request(
    server: tuple[RawServer, int], pool: FastPool
) -> None:
    raw, _port = server
    raw.reply = send(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    )
    resp = await pool.request("POST", "/v1/completions", b'{"a":1}', "X-Request-Id: r1\r\n")
    assert (resp.status, resp.reason, resp.content_type) == (200, "OK", "application/json")
    assert await body_of(resp) == b"{}"
    head = raw.heads[0].decode()
    assert head.startswith("POST /v1/completions HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{pool.port}\r\n" in head
    assert "Content-Length: 7\r\n" in head and "X-Request-Id: r1\r\n" in head
    assert "Accept-Encoding: identity\r\n" in head  # the body as it is
    assert raw.bodies == [b'{"a":1}']


async def test_interim_answers_are_read_past_to_the_final_one(
    server: tuple[RawServer, int], pool: FastPool
) -> None:
    """RFC 9110: a client reads any 1xx heads (but 101) before the final answer."""
    raw, _port = server
    raw.reply = send(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    )
    resp = await pool.request("POST", "/v1/completions", b"{}")
    assert (resp.status, resp.content_type) == (200, "application/json")
    assert "link" not in resp.headers  # the interim answer's
    assert await body_of(resp) == b"{}"


async def test_a_compressed_body_is_refused_naming_its_encoding(
    server: tuple[RawServer, int], pool: FastPool
) -> None:
    raw, _port = server
    raw.reply = send(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 2\r\n\r\nxx")
    with pytest.raises(UnsupportedEncodingError, match="Content-Encoding 'gzip'") as info:
        await pool.request("POST", "/v1/completions", b"{}")
    assert not isinstance(info.value, ConnectionError)  # the answer, not the connection


async def test_response_headers_are_lower_cased_trimmed_and_repeats_joined(
    server: tuple[RawServer, int], pool: FastPool
) -> None:
    raw, _port = server
    raw.reply = send(
        b"HTTP/1.1 201 Created Here\r\nX-A:  one \r\nSet-Cookie: a=1\r\n Odd-Name :v\r\n"
        b"set-cookie: b=2\r\nX-Empty:\r\nContent-Length: 0\r\n\r\n"
    )
    resp = await pool.request("POST", "/x", b"")
    assert (resp.status, resp.reason) == (201, "Created Here")
    assert resp.headers == {
        "x-a": "one", "set-cookie": "a=1, b=2", "odd-name": "v", "x-empty": "",
        "content-length": "0",
    }  # fmt: skip
    assert await body_of(resp) == b""


async def test_chunked_body_split_into_single_bytes(
    server: tuple[RawServer, int], pool: FastPool
) -> None:
    raw, _port = server
    raw.reply = send(*bytewise(CHUNKED))
    resp = await pool.request("POST", "/x", b"")
    assert resp.content_type == "text/event-stream"
    assert await body_of(resp) == b"hello, world"
    assert pool.idle_connections == 1


async def test_keep_alive_reuses_one_connection(
    server: tuple[RawServer, int], pool: FastPool
) -> None:
    raw, _port = server
    raw.reply = send(CHUNKED)
    for _ in range(3):
        assert await body_of(await pool.request("POST", "/x", b"{}")) == b"hello, world"
    assert raw.connections == 1


async def test_connections_idle_too_long_are_closed(
    server: tuple[RawServer, int], pool: FastPool
) -> None:
    raw, _port = server
    raw.reply = send(CHUNKED)
    first = await pool.request("POST", "/x", b"")
    second = await pool.request("POST", "/x", b"")
    assert await body_of(first) == b"hello, world"
    pool._idle[0].idle_since -= pool.keepalive_s + 1  # as if it had waited that long
    assert await body_of(second) == b"hello, world"  # putting one back sweeps the old
    assert pool.idle_connections == 1
    pool._idle[0].idle_since -= pool.keepalive_s + 1
    assert await body_of(await pool.request("POST", "/x", b"")) == b"hello, world"
    assert raw.connections == 3  # the expired one was not reused


async def test_connection_close_and_unread_bodies_are_not_reused(
    server: tuple[RawServer, int], pool: FastPool
) -> None:
    raw, _port = server
    raw.reply = send(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx")
    assert await body_of(await pool.request("POST", "/x", b"")) == b"x"
    assert pool.idle_connections == 0
    raw.reply = send(CHUNKED)
    resp = await pool.request("POST", "/x", b"")
    resp.release()  # body not read: the connection cannot be reused
    assert pool.idle_connections == 0
    assert await body_of(await pool.request("POST", "/x", b"")) == b"hello, world"
    assert raw.connections == 3


async def test_body_until_close_without_length(
    server: tuple[RawServer, int], pool: FastPool
) -> None:
    raw, _port = server
    raw.reply = send(b"HTTP/1.0 200 OK\r\n\r\n", b"abc", b"def", close=True)
    assert await body_of(await pool.request("POST", "/x", b"")) == b"abcdef"
    assert pool.idle_connections == 0


async def test_a_connection_closed_by_the_server_is_not_reused(
    server: tuple[RawServer, int], pool: FastPool
) -> None:
    raw, _port = server
    raw.reply = send(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx", close=True)
    assert await body_of(await pool.request("POST", "/x", b"")) == b"x"
    await raw.closed.wait()
    raw.reply = send(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\ny")
    for _ in range(10):  # let the loop see the close
        await asyncio.sleep(0)
    assert await body_of(await pool.request("POST", "/x", b"")) == b"y"
    assert raw.connections == 2


async def test_truncated_bodies_raise_connection_error(
    server: tuple[RawServer, int], pool: FastPool
) -> None:
    raw, _port = server
    raw.reply = send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", close=True)
    resp = await pool.request("POST", "/x", b"")
    assert await resp.read_some() == b"abc"
    with pytest.raises(ConnectionError, match="inside the response body"):
        await resp.read_some()
    resp.close()
    raw.reply = send(CHUNKED[:-20], close=True)
    resp = await pool.request("POST", "/x", b"")
    with pytest.raises(ConnectionError):
        await resp.read()
    resp.close()


@pytest.mark.parametrize(
    "answer",
    [
        b"SSH-2.0-OpenSSH\r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    ],
)
async def test_malformed_heads_raise(
    server: tuple[RawServer, int], pool: FastPool, answer: bytes
) -> None:
    raw, _port = server
    raw.reply = send(answer)
    with pytest.raises(ConnectionError):
        await pool.request("POST", "/x", b"")
    assert pool.idle_connections == 0


async def test_bad_chunk_size_raises(server: tuple[RawServer, int], pool: FastPool) -> None:
    raw, _port = server
    raw.reply = send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n")
    resp = await pool.request("POST", "/x", b"")
    with pytest.raises(ConnectionError, match="chunk size"):
        await resp.read_some()
    resp.close()


async def test_a_chunk_not_followed_by_crlf_raises(
    server: tuple[RawServer, int], pool: FastPool
) -> None:
    """A chunk's data longer than its size said is not read as the next size line."""
    raw, _port = server
    raw.reply = send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n")
    resp = await pool.request("POST", "/x", b"")
    with pytest.raises(ConnectionError, match="malformed chunked body"):
        await resp.read()
    resp.close()
    assert pool.idle_connections == 0


async def test_closed_before_the_response(server: tuple[RawServer, int], pool: FastPool) -> None:
    raw, _port = server
    raw.reply = send(close=True)
    with pytest.raises(ConnectionError, match="before the response"):
        await pool.request("POST", "/x", b"")


async def test_connection_refused_is_worded_like_aiohttp() -> None:
    pool = FastPool("127.0.0.1", closed_port())
    with pytest.raises(ConnectionError, match="Cannot connect to host"):
        await pool.request("POST", "/x", b"")
    pool.close()
    with pytest.raises(ConnectionError, match="closed"):
        await pool.request("POST", "/x", b"")


async def test_cancelling_the_request_closes_the_connection(
    server: tuple[RawServer, int], pool: FastPool
) -> None:
    raw, _port = server
    never = asyncio.Event()
    started = asyncio.Event()

    async def hang(_reader: asyncio.StreamReader, _writer: asyncio.StreamWriter) -> None:
        started.set()
        await never.wait()

    raw.reply = hang
    task = asyncio.create_task(pool.request("POST", "/x", b""))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pool.idle_connections == 0
    never.set()
    await raw.closed.wait()


_STREAM_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"


def _gated_reply(go: asyncio.Event, rest: bytes | None, head: bytes = _STREAM_HEAD) -> Reply:
    """A chunked body's ``head`` (its status line, headers and first chunks), then, once
    ``go`` is set, ``rest`` (None: the connection closes instead)."""

    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(head)
        await writer.drain()
        gone = asyncio.ensure_future(reader.read())  # b"" once the client closes
        waiting = asyncio.ensure_future(go.wait())
        await asyncio.wait([gone, waiting], return_when=asyncio.FIRST_COMPLETED)
        closed = gone.done()
        for task in (gone, waiting):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if closed:
            writer.close()
            return
        if rest is None:
            writer.close()
            return
        writer.write(rest)
        await writer.drain()

    return reply


def _noting_put_back(pool: FastPool) -> asyncio.Event:
    """An event set each time ``pool`` puts a connection back."""
    back = asyncio.Event()
    put_back = pool.put_back

    def noting(conn: Any) -> None:
        put_back(conn)
        back.set()

    pool.put_back = noting  # type: ignore[method-assign]
    return back


async def _released_early(pool: FastPool, timeout_s: float = 60.0) -> asyncio.Event:
    """A request whose reader takes the first chunk and releases the response with the
    rest of its body still to come; the event is set when a connection is put back."""
    back = _noting_put_back(pool)
    resp = await pool.request("POST", "/x", b"")
    assert await resp.read_some() == b"hello"
    resp.release_later(timeout_s)
    return back


async def test_a_body_released_before_its_end_is_dropped_as_it_arrives_then_reused(
    server: tuple[RawServer, int], pool: FastPool
) -> None:
    raw, _port = server
    go = asyncio.Event()
    raw.reply = _gated_reply(go, b"3\r\nabc\r\n0\r\n\r\n")
    back = await _released_early(pool)
    assert pool.idle_connections == 0  # its end has not come yet
    go.set()
    await asyncio.wait_for(back.wait(), 5)
    assert pool.idle_connections == 1
    raw.reply = send(CHUNKED)
    assert await body_of(await pool.request("POST", "/x", b"")) == b"hello, world"
    assert raw.connections == 1  # reused


@pytest.mark.parametrize("rest", [b"zz\r\n", None], ids=["malformed", "closed"])
async def test_a_body_released_before_its_end_that_goes_wrong_is_not_reused(
    server: tuple[RawServer, int], pool: FastPool, rest: bytes | None
) -> None:
    raw, _port = server
    go = asyncio.Event()
    raw.reply = _gated_reply(go, rest)
    back = await _released_early(pool)
    go.set()
    await asyncio.wait_for(raw.closed.wait(), 5)
    for _ in range(10):  # let the loop see what came
        await asyncio.sleep(0)
    assert not back.is_set() and pool.idle_connections == 0


async def test_closing_the_pool_closes_a_connection_whose_answer_is_still_being_dropped(
    server: tuple[RawServer, int], pool: FastPool
) -> None:
    """A connection handed to the drainer is held by no task: the pool's close closes it
    (it had stayed open until the body ended, and for ever once the loop had stopped),
    and one released for draining after the close is closed at once."""
    raw, _port = server
    go = asyncio.Event()
    raw.reply = _gated_reply(go, b"3\r\nabc\r\n0\r\n\r\n")
    back = await _released_early(pool)
    resp = next(iter(pool._draining))
    transport = resp._conn.transport if resp._conn is not None else None
    assert transport is not None and not transport.is_closing()
    pool.close()
    assert transport.is_closing() and not pool._draining
    await asyncio.wait_for(raw.closed.wait(), 5)  # the engine sees the connection close
    go.set()
    for _ in range(10):
        await asyncio.sleep(0)
    assert not back.is_set() and pool.idle_connections == 0

    late_pool = FastPool("127.0.0.1", _port)
    raw.reply = _gated_reply(asyncio.Event(), None)
    late = await late_pool.request("POST", "/x", b"")
    assert await late.read_some() == b"hello"
    late_transport = late._conn.transport if late._conn is not None else None
    late_pool.close()
    late.release_later(60.0)
    assert late_transport is not None and late_transport.is_closing()
    assert not late_pool._draining


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


_SSE_TO_DONE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    + _chunk(b'data: {"choices":[{"index":0,"text":"hi","finish_reason":"stop"}]}\n\n')
    + _chunk(b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}}\n\n')
    + _chunk(b"data: [DONE]\n\n")
)
"""A stream up to its ``[DONE]`` event, the body's last chunk not sent yet."""


@pytest.mark.parametrize("stream", [True, False], ids=["generate", "complete"])
async def test_a_stream_whose_body_ends_after_its_done_event_reuses_the_connection(
    server: tuple[RawServer, int], stream: bool
) -> None:
    """The engine client hands the rest of the body to the pool's drainer after
    ``[DONE]`` (in ``generate``, and in ``complete`` when the engine streams anyway): the
    connection goes back to the pool once the last chunk comes, not closed meanwhile."""
    raw, port = server
    go = asyncio.Event()
    raw.reply = _gated_reply(go, b"0\r\n\r\n", head=_SSE_TO_DONE)
    session = make_session()
    try:
        client = HTTPEngineClient(make_instance("e0", port=port), session)
        pool = client._fast_pool
        assert pool is not None
        back = _noting_put_back(pool)
        req = EngineRequest(request_id="r0", prompt="x", max_tokens=1, model="m", stream=stream)
        chunks = await asyncio.wait_for(client.complete(req), 10)
        assert [c.text for c in chunks] == ["hi"] and chunks[-1].finish_reason == "stop"
        go.set()
        waits = [asyncio.ensure_future(back.wait()), asyncio.ensure_future(raw.closed.wait())]
        await asyncio.wait(waits, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        for task in waits:
            task.cancel()
        await asyncio.gather(*waits, return_exceptions=True)
        assert back.is_set() and not raw.closed.is_set()  # put back, not closed
        assert pool.idle_connections == 1
        raw.reply = send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        assert await body_of(await pool.request("POST", "/x", b"{}")) == b"ok"
        assert raw.connections == 1
    finally:
        await session.close()


def test_a_body_released_before_its_end_that_never_comes_is_closed_in_time() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        raw = RawServer()
        never = asyncio.Event()
        raw.reply = _gated_reply(never, None)
        srv = await asyncio.start_server(raw.handle, "127.0.0.1", 0)
        pool = FastPool("127.0.0.1", int(srv.sockets[0].getsockname()[1]))
        back = await _released_early(pool, timeout_s=2.0)
        started = loop.time()
        while not raw.closed.is_set():  # the client closes it once the 2 s have passed
            assert loop.time() - started <= 2.0 + 0.01
            await asyncio.sleep(0.1)
        assert loop.time() - started >= 2.0
        assert not back.is_set() and pool.idle_connections == 0
        never.set()
        pool.close()
        srv.close()
        await srv.wait_closed()

    run_virtual(main())


async def test_session_close_closes_the_fast_pools(server: tuple[RawServer, int]) -> None:
    raw, port = server
    raw.reply = send(CHUNKED)
    session = make_session()
    connector = session.connector
    assert isinstance(connector, EngineConnector)
    p = connector.fast_pool("127.0.0.1", port)
    assert p is not None and connector.fast_pool("127.0.0.1", port) is p
    assert await body_of(await p.request("POST", "/x", b"")) == b"hello, world"
    assert p.idle_connections == 1
    await session.close()
    assert p.idle_connections == 0
    assert connector.fast_pool("127.0.0.1", port) is None
    await raw.closed.wait()


async def test_the_last_client_of_an_address_closes_its_pool(
    server: tuple[RawServer, int],
) -> None:
    """A removed instance's client gives its pool back: the last one of the address
    closes its idle connections and the connector forgets the pool; a client of the same
    address made before that keeps the pool it shares."""
    raw, port = server
    raw.reply = send(CHUNKED)
    session = make_session()
    connector = session.connector
    assert isinstance(connector, EngineConnector)
    try:
        first = HTTPEngineClient(make_instance("a", port=port), session)
        second = HTTPEngineClient(make_instance("b", port=port), session)
        pool = first._fast_pool
        assert pool is not None and second._fast_pool is pool
        assert await body_of(await pool.request("POST", "/x", b"")) == b"hello, world"
        await first.aclose()
        await first.aclose()  # once only
        assert first._fast_pool is None and pool.idle_connections == 1
        assert connector.fast_pool("127.0.0.1", port) is pool
        connector.release_pool("127.0.0.1", port)
        await second.aclose()
        assert pool.idle_connections == 0
        await raw.closed.wait()  # the engine saw its connection close
        again = connector.fast_pool("127.0.0.1", port)
        assert again is not None and again is not pool
    finally:
        await session.close()


async def test_engine_client_uses_the_fast_path_only_where_it_can() -> None:
    session = make_session()
    limited = make_session(limit=8)
    try:
        plain = HTTPEngineClient(make_instance("a", port=1), session)
        assert plain._fast_pool is not None
        tls = HTTPEngineClient(make_instance("b", port=1, scheme="https"), session)
        assert tls._fast_pool is None
        assert HTTPEngineClient(make_instance("c", port=1), limited)._fast_pool is None
    finally:
        await session.close()
        await limited.close()


@pytest.mark.parametrize(
    "head",
    [
        # RFC 9110 15.4.5: a 304's Content-Length describes the representation, not a body
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\n\r\n",  # 15.3.5: none, without a Content-Length
    ],
    ids=["304-with-length", "204-without-length"],
)
async def test_a_304_or_204_has_no_body_and_its_connection_is_reused(
    server: tuple[RawServer, int], pool: FastPool, head: bytes
) -> None:
    raw, _port = server
    raw.reply = send(head)
    resp = await pool.request("POST", "/x", b"{}")
    assert resp.status == int(head[9:12])
    assert await asyncio.wait_for(body_of(resp), 10) == b""
    assert pool.idle_connections == 1
    raw.reply = send(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
    assert await body_of(await pool.request("POST", "/x", b"{}")) == b"hello"
    assert raw.connections == 1


async def test_a_101_is_the_answer_not_an_interim_one(
    server: tuple[RawServer, int], pool: FastPool
) -> None:
    raw, _port = server
    raw.reply = send(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n"
    )
    resp = await asyncio.wait_for(pool.request("POST", "/x", b"{}"), 10)
    assert (resp.status, resp.headers["upgrade"]) == (101, "h2c")
    resp.close()


@pytest.mark.parametrize(("connection", "kept"), [(b"", 0), (b"Connection: Keep-Alive\r\n", 1)])
async def test_an_http10_connection_is_kept_only_when_asked(
    server: tuple[RawServer, int], pool: FastPool, connection: bytes, kept: int
) -> None:
    raw, _port = server
    raw.reply = send(b"HTTP/1.0 200 OK\r\n" + connection + b"Content-Length: 2\r\n\r\nok")
    assert await body_of(await pool.request("POST", "/x", b"{}")) == b"ok"
    assert pool.idle_connections == kept


async def test_a_connection_released_to_a_closed_pool_is_closed(
    server: tuple[RawServer, int], pool: FastPool
) -> None:
    raw, _port = server
    raw.reply = send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    resp = await pool.request("POST", "/x", b"{}")
    assert await resp.read() == b"ok"
    pool.close()  # connections in use close when released
    resp.release()
    assert pool.idle_connections == 0
    await asyncio.wait_for(raw.closed.wait(), 10)


async def test_the_most_recently_used_idle_connection_is_reused_first(
    server: tuple[RawServer, int], pool: FastPool
) -> None:
    raw, _port = server
    raw.reply = send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    first = await pool.request("POST", "/x", b"{}")
    second = await pool.request("POST", "/x", b"{}")
    recent = second._conn
    assert await first.read() == await second.read() == b"ok"
    first.release()
    second.release()
    third = await pool.request("POST", "/x", b"{}")
    assert third._conn is recent
    assert await body_of(third) == b"ok"
    assert raw.connections == 2


async def test_reading_pauses_while_a_large_body_is_not_read(
    server: tuple[RawServer, int], pool: FastPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw, _port = server
    size = 8 << 20
    raw.reply = send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size, b"x" * size)
    full = asyncio.Event()
    receive = _Conn.data_received

    def data_received(conn: _Conn, data: bytes) -> None:
        receive(conn, data)
        if len(conn.buf) > _PAUSE_AT:
            full.set()

    monkeypatch.setattr(_Conn, "data_received", data_received)
    resp = await pool.request("POST", "/x", b"{}")
    await asyncio.wait_for(full.wait(), 10)  # nobody reads: the buffer grows to its bound
    assert resp._conn is not None and resp._conn.paused
    assert len(await body_of(resp)) == size  # and reading resumes


async def test_an_error_answer_released_before_its_body_ended_is_not_reused(
    server: tuple[RawServer, int], pool: FastPool
) -> None:
    """A 500 of Content-Length 10 released after its first 5 bytes (nothing left in the
    buffer): the rest is still to come on that connection, so it is closed, not pooled."""
    raw, _port = server
    go = asyncio.Event()
    head = b"HTTP/1.1 500 Oops\r\nContent-Length: 10\r\n\r\nhello"
    raw.reply = _gated_reply(go, b"world", head=head)
    resp = await pool.request("POST", "/x", b"")
    assert resp.status == 500 and await resp.read_some() == b"hello"
    resp.release()
    assert pool.idle_connections == 0
    go.set()
    raw.reply = send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert await body_of(await pool.request("POST", "/x", b"")) == b"ok"
    assert raw.connections == 2


def test_the_connect_timeout_applies_on_the_lean_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    async def slow_connect(_pool: FastPool) -> _Conn:
        await asyncio.sleep(3600)
        raise ConnectionError("unreachable")

    monkeypatch.setattr(FastPool, "_connect", slow_connect)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        pool = FastPool("127.0.0.1", closed_port())
        started = loop.time()
        with pytest.raises(TimeoutError):
            await pool.request("POST", "/x", b"", connect_timeout_s=0.5)
        assert loop.time() - started == pytest.approx(0.5, abs=0.01)
        pool.close()

    run_virtual(main())


@pytest.mark.parametrize(
    ("answer", "said"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n", "bad Content-Length 'ten'"),
        (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (70 * 1024), "response head too large"),
    ],
)
async def test_an_unusable_head_is_refused_saying_why(
    server: tuple[RawServer, int], pool: FastPool, answer: bytes, said: str
) -> None:
    raw, _port = server
    raw.reply = send(answer)
    with pytest.raises(ConnectionError, match=f"^{said}$"):
        await pool.request("POST", "/x", b"")
    assert pool.idle_connections == 0


async def test_a_chunk_size_line_that_never_ends_is_refused(
    server: tuple[RawServer, int], pool: FastPool
) -> None:
    raw, _port = server
    raw.reply = send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1" * 2000)
    resp = await pool.request("POST", "/x", b"")
    with pytest.raises(ConnectionError, match="malformed chunk size line"):
        await resp.read()
    resp.close()
    assert pool.idle_connections == 0


@pytest.mark.parametrize(
    ("first", "rest"),
    [(b"0\r\nX-T: 1\r\n", b"\r\n"), (b"0", b"\r\n\r\n")],
    ids=["trailers", "size-line"],
)
async def test_a_last_chunk_that_comes_in_pieces_is_waited_for(
    server: tuple[RawServer, int], pool: FastPool, first: bytes, rest: bytes
) -> None:
    raw, _port = server
    go = asyncio.Event()
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n" + first
    raw.reply = _gated_reply(go, rest, head=head)
    resp = await pool.request("POST", "/x", b"")
    reading = asyncio.ensure_future(resp.read())
    for _ in range(20):  # every byte before the body's end is read
        await asyncio.sleep(0)
    assert not reading.done()
    ended_before = resp.at_eof
    go.set()
    assert await asyncio.wait_for(reading, 5) == b"ok"
    assert (ended_before, resp.at_eof) == (False, True)
    resp.release()
    assert pool.idle_connections == 1


async def test_a_response_given_back_is_done_with(
    server: tuple[RawServer, int], pool: FastPool
) -> None:
    """Reading a response closed raises; releasing or closing it again does nothing."""
    raw, _port = server
    raw.reply = send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    resp = await pool.request("POST", "/x", b"")
    assert await resp.read() == b"ok"
    resp.release()
    resp.release()
    resp.release_later(1.0)
    resp.close()
    assert pool.idle_connections == 1  # put back once, not closed after
    raw.reply = send(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\npart")
    resp = await pool.request("POST", "/x", b"")
    assert await resp.read_some() == b"part"
    resp.close()
    with pytest.raises(ConnectionError, match="response closed"):
        await resp.read_some()
    assert raw.connections == 1


async def test_a_response_closed_while_its_rest_is_dropped_is_not_reused(
    server: tuple[RawServer, int], pool: FastPool
) -> None:
    raw, _port = server
    go = asyncio.Event()
    raw.reply = _gated_reply(go, b"3\r\nabc\r\n0\r\n\r\n")
    back = _noting_put_back(pool)
    resp = await pool.request("POST", "/x", b"")
    assert await resp.read_some() == b"hello"
    resp.release_later(60.0)
    resp.close()  # the caller changed its mind: the connection is dropped
    await asyncio.wait_for(raw.closed.wait(), 5)
    go.set()
    for _ in range(10):
        await asyncio.sleep(0)
    assert not back.is_set() and pool.idle_connections == 0
