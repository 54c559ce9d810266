"""The lean HTTP/1.1 front (``sage_llm.gateway.lean``): what it serves itself, what it hands
to aiohttp, keep-alive, pipelining, disconnects and shutdown — over raw sockets, so the
bytes on the wire are what is checked."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from typing import Any

import aiohttp
import pytest

from sage_llm.config import GatewayConfig
from sage_llm.gateway.lean import LeanConnection, LeanRequest, LeanServer, LeanStream
from sage_llm.sim.clock import run_virtual
from sage_llm.types import RequestStatus
from tests.gateway.harness import completion_body, read_events, serve


def _post(path: str, body: Any, *extra: str) -> bytes:
    data = json.dumps(body).encode()
    head = [f"POST {path} HTTP/1.1", "Host: test", "Content-Type: application/json",
            f"Content-Length: {len(data)}", *extra]  # fmt: skip
    return ("\r\n".join(head) + "\r\n\r\n").encode() + data


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def _response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response (Content-Length or chunked body)."""
    status_line = await reader.readline()
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        return status, headers, await reader.readexactly(int(headers["content-length"]))
    body = b""
    while True:
        size = int((await reader.readline()).strip(), 16)
        chunk = await reader.readexactly(size + 2)
        if size == 0:
            return status, headers, body
        body += chunk[:-2]


async def test_keep_alive_serves_several_requests_on_one_connection() -> None:
    async with serve(1) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        for n in range(3):
            writer.write(_post("/v1/completions", completion_body(), f"x-request-id: ka-{n}"))
            status, headers, body = await _response(reader)
            assert status == 200
            assert headers["x-request-id"] == f"ka-{n}"
            assert headers["content-type"] == "application/json"
            assert "date" in headers and "connection" not in headers
            assert json.loads(body)["object"] == "text_completion"
        await _close(writer)


async def test_pipelined_requests_are_answered_in_order() -> None:
    async with serve(2) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(
            _post("/v1/completions", completion_body(max_tokens=12), "x-request-id: first")
            + _post("/v1/completions", completion_body(max_tokens=2), "x-request-id: second")
        )
        first = await _response(reader)
        second = await _response(reader)
        assert [first[1]["x-request-id"], second[1]["x-request-id"]] == ["first", "second"]
        assert json.loads(first[2])["usage"]["completion_tokens"] == 12
        assert json.loads(second[2])["usage"]["completion_tokens"] == 2
        await _close(writer)


async def test_other_routes_on_the_same_connection_are_handed_to_aiohttp() -> None:
    async with serve(1) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(_post("/v1/completions", completion_body()))
        assert (await _response(reader))[0] == 200
        writer.write(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
        status, headers, body = await _response(reader)
        assert status == 200 and json.loads(body) == {"status": "ok"}
        assert "x-request-id" in headers  # aiohttp's middleware answered it
        # the connection now belongs to aiohttp, which serves completions too
        writer.write(_post("/v1/completions", completion_body(), "x-request-id: after"))
        status, headers, _ = await _response(reader)
        assert status == 200 and headers["x-request-id"] == "after"
        await _close(writer)


async def test_a_head_with_bare_lf_line_ends_is_answered_at_once() -> None:
    """Not left waiting for a CRLF CRLF that never comes (it had been answered 408 after
    ``read_timeout_s``): aiohttp answers it, whatever it makes of it."""
    async with serve(1) as gw:
        for raw in (
            _post("/v1/completions", completion_body()).replace(b"\r\n", b"\n"),
            b"GET /v1/models HTTP/1.1\nHost: test\n\n",
            # a bare LF before the blank line's CRLF: no CRLF CRLF, no LF LF either
            _post("/v1/completions", completion_body()).replace(b"\r\n\r\n", b"\n\r\n"),
            b"GET /health HTTP/1.1\nHost: test\n\r\n",
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(raw)
            status, _, _ = await asyncio.wait_for(_response(reader), 5.0)
            assert status in (200, 400)
            await _close(writer)


async def test_a_pipelined_lean_request_and_a_handed_over_one_are_answered_in_order() -> None:
    # pipelined: the lean answer is written at the end of the turn in which the handler
    # ends, the same turn the connection is handed to aiohttp for the next request
    async with serve(1) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(
            _post("/v1/completions", completion_body(), "x-request-id: lean")
            + b"GET /health HTTP/1.1\r\nHost: test\r\nx-request-id: fallback\r\n\r\n"
        )
        status, headers, _ = await _response(reader)
        assert status == 200 and headers["x-request-id"] == "lean"
        status, headers, body = await _response(reader)
        assert status == 200 and headers["x-request-id"] == "fallback"
        assert json.loads(body) == {"status": "ok"}
        await _close(writer)


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        # a body over max_body_bytes (64 here): aiohttp's 413
        (_post("/v1/completions", completion_body(prompt="x" * 200)), 413),
        # a query string, an unknown route, another method: aiohttp's answers
        (_post("/v1/completions?x=1", completion_body()), 200),
        (_post("/v1/unknown", {}), 404),
        (b"GET /v1/completions HTTP/1.1\r\nHost: t\r\n\r\n", 405),
        # another method with a body the lean front could read: aiohttp's 405 too
        (_post("/v1/completions", completion_body()).replace(b"POST ", b"PUT ", 1), 405),
        # a chunked request body and HTTP/1.0 are served by aiohttp
        (
            b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: application/json\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
            400,
        ),
        (_post("/v1/completions", completion_body()).replace(b"HTTP/1.1", b"HTTP/1.0"), 200),
        # HTTP/1.1 without Host (RFC 9112 3.2): aiohttp's 400
        (_post("/v1/completions", completion_body()).replace(b"Host: test\r\n", b""), 400),
        # a control character in a header name: aiohttp's 400
        (_post("/v1/completions", completion_body()).replace(b"Host:", b"X\x01y: 1\r\nHost:"), 400),
        # a header line beyond aiohttp's 8,190 bytes: its 400 (the same head on both fronts)
        (_post("/v1/completions", completion_body(), "x-long: " + "a" * 9000), 400),
        # a request line beyond aiohttp's 8,190 bytes: its 400 too
        (_post("/v1/completions?q=" + "a" * 9000, completion_body()), 400),
        # more headers than aiohttp's 128: its 400; 128 are served
        (_post("/v1/completions", completion_body(), *[f"x-h{i}: v" for i in range(126)]), 400),
        (_post("/v1/completions", completion_body(), *[f"x-h{i}: v" for i in range(125)]), 200),
    ],
    ids=[
        "too-large",
        "query",
        "unknown-route",
        "get",
        "put-with-body",
        "chunked",
        "http10",
        "no-host",
        "control-char",
        "long-header",
        "long-request-line",
        "129-headers",
        "128-headers",
    ],
)
async def test_unusual_requests_get_aiohttps_answers(request_bytes: bytes, status: int) -> None:
    small = GatewayConfig(max_body_bytes=64 if b"xxxx" in request_bytes else 1 << 20)
    async with serve(1, settings=small) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(request_bytes)
        got, _, body = await _response(reader)
        assert got == status
        if status >= 400:
            assert "error" in json.loads(body)
        await _close(writer)


def _body_of_size(size: int) -> Any:
    """A completions body ``size`` bytes long as JSON."""
    body = completion_body(prompt="")
    body["prompt"] = "x" * (size - len(json.dumps(body)))
    return body


def _head_padded_to(size: int) -> bytes:
    """A completions request whose head, up to its blank line, is ``size`` bytes long."""
    end = _post("/v1/completions", completion_body()).index(b"\r\n\r\n")
    pads = ["x-p0: " + "a" * 4088] * 3  # 4,096 bytes each with its CRLF
    pads.append("x-p1: " + "a" * (size - end - 3 * 4096 - 8))
    return _post("/v1/completions", completion_body(), *pads)


@pytest.mark.parametrize(
    ("at_limit", "past_it"),
    [
        # the body: max_body_bytes (1,000 here) is served; one byte more is aiohttp's 413
        (_post("/v1/completions", _body_of_size(1000)),
         _post("/v1/completions", _body_of_size(1001))),
        # 128 header lines; a header line of 8,190 bytes; a head of 16 KiB
        (_post("/v1/completions", completion_body(), *[f"x-h{i}: v" for i in range(125)]),
         _post("/v1/completions", completion_body(), *[f"x-h{i}: v" for i in range(126)])),
        (_post("/v1/completions", completion_body(), "x-long: " + "a" * 8182),
         _post("/v1/completions", completion_body(), "x-long: " + "a" * 8183)),
        (_head_padded_to(16 * 1024), _head_padded_to(16 * 1024 + 1)),
    ],
    ids=["body", "headers", "line", "head"],
)  # fmt: skip
async def test_the_lean_front_serves_up_to_its_limits_and_aiohttp_past_them(
    at_limit: bytes, past_it: bytes
) -> None:
    async with serve(1, settings=GatewayConfig(max_body_bytes=1000)) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(at_limit)
        status, headers, _ = await asyncio.wait_for(_response(reader), 5)
        assert (status, headers["server"]) == (200, "sage-llm")
        writer.write(past_it)
        status, headers, body = await asyncio.wait_for(_response(reader), 5)
        assert headers["server"].startswith("Python"), (status, body)  # aiohttp's answer
        await _close(writer)


@pytest.mark.parametrize("lean_server", [True, False])
async def test_a_content_length_with_thousands_of_leading_zeros_is_read_as_its_value(
    lean_server: bool,
) -> None:
    """``int()`` refuses more than 4,300 digits, leading zeros included: such a length had
    dropped the connection with a traceback on the lean front, and been a 500 on
    aiohttp's. It is read as its value: served, or a 413 when above the limit (one beyond
    64 bits, whatever its zeros, is the parser's 400)."""
    settings = GatewayConfig(lean_server=lean_server, max_body_bytes=1000)
    zeros = "0" * 5000
    async with serve(1, settings=settings) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        request = _post("/v1/completions", completion_body())
        writer.write(request.replace(b"Content-Length: ", f"Content-Length: {zeros}".encode()))
        status, headers, _ = await asyncio.wait_for(_response(reader), 5)
        assert status == 200
        assert headers["server"].startswith("sage-llm" if lean_server else "Python")
        for length, expected in ((f"{zeros}1001", 413), (f"{zeros}1{'0' * 30}", 400)):
            head = (f"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Length: {length}"
                    "\r\nExpect: 100-continue\r\n\r\n")  # fmt: skip
            writer.write(head.encode())  # and no body
            status, _, body = await asyncio.wait_for(_response(reader), 5)
            assert (status, json.loads(body)["error"]["code"]) == (expected, expected), body
            await _close(writer)
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        await _close(writer)


async def test_errors_on_the_lean_path_are_openai_json() -> None:
    async with serve(1) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        cases = [
            (b"{not json", "request body is not valid JSON"),
            (b"[1, 2]", "request body must be a JSON object"),
            (  # no stack overflow, no 500
                b'{"model":"m","x":' + b"[" * 1100 + b"]" * 1100 + b"}",
                "request body is not valid JSON: arrays and objects nested deeper than 200 levels",
            ),
        ]
        for raw, message in cases:
            head = (f"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Length: {len(raw)}"
                    "\r\n\r\n").encode()  # fmt: skip
            writer.write(head + raw)
            status, headers, body = await _response(reader)
            assert status == 400 and json.loads(body)["error"]["message"] == message
            assert headers["content-type"] == "application/json; charset=utf-8"
            assert len(headers["x-request-id"]) == 32
        writer.write(_post("/v1/completions", completion_body(), "x-request-id: bad id!"))
        status, _, body = await _response(reader)
        assert status == 400 and json.loads(body)["error"]["param"] == "x-request-id"
        writer.write(_post("/v1/completions", completion_body(model="nope")))
        status, _, body = await _response(reader)
        assert status == 404 and json.loads(body)["error"]["type"] == "not_found_error"
        await _close(writer)


async def test_api_keys_are_checked_on_the_lean_path() -> None:
    async with serve(1, settings=GatewayConfig(api_keys=("k1",))) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(_post("/v1/completions", completion_body()))
        status, headers, _ = await _response(reader)
        assert status == 401 and headers["www-authenticate"] == "Bearer"
        writer.write(_post("/v1/completions", completion_body(), "Authorization: Bearer k1"))
        assert (await _response(reader))[0] == 200
        # a key that is not UTF-8: refused as any wrong key, on both fronts (was a 500)
        for path in ("/v1/completions", "/v1/models?x=1"):
            writer.write(_post(path, completion_body()).replace(
                b"Host: test", b"Host: test\r\nAuthorization: Bearer \xff"))  # fmt: skip
            assert (await _response(reader))[0] == 401
        await _close(writer)


async def test_a_body_not_in_its_content_encoding_is_a_json_400() -> None:
    async with serve(1) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        for path in ("/v1/completions", "/v1/embeddings", "/admin/set_policy"):
            writer.write(_post(path, completion_body(), "Content-Encoding: gzip"))
            status, _, body = await _response(reader)
            error = json.loads(body)["error"]
            assert (status, error["type"]) == (400, "invalid_request_error"), body
            assert error["message"] == (
                "request body cannot be read: Can not decode content-encoding: gzip"
            )  # one line
            assert await reader.read() == b""  # the connection is closed after it
            await _close(writer)
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        await _close(writer)


@pytest.mark.parametrize("lean_server", [True, False])
@pytest.mark.parametrize("encoding", ["br", "zstd", "bogus", "gzip, bogus"])
async def test_a_body_in_an_encoding_not_read_is_a_json_415(
    encoding: str, lean_server: bool
) -> None:
    """Brotli (without its package) and zstd had been a 400 telling the client to install
    a package on the server; an unknown encoding had been read undecoded. On either front
    (aiohttp's answers it on its error path)."""
    async with serve(1, settings=GatewayConfig(lean_server=lean_server)) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(_post("/v1/completions", completion_body(), f"Content-Encoding: {encoding}"))
        status, _, body = await _response(reader)
        error = json.loads(body)["error"]
        assert (status, error["param"]) == (415, "content-encoding"), body
        assert error["message"].startswith("unsupported Content-Encoding: ")
        assert "install" not in error["message"]
        assert await reader.read() == b""  # closed: its body was not read
        await _close(writer)


@pytest.mark.parametrize("lean_server", [True, False])
@pytest.mark.parametrize("coding", ["gzip, chunked", "deflate,chunked", "x-mine , chunked"])
async def test_a_transfer_coding_other_than_chunked_is_a_json_501(
    coding: str, lean_server: bool
) -> None:
    """``gzip, chunked`` had been read as ``chunked``, the gzip ignored (RFC 9112 section
    6.1: a transfer coding the server does not know gets 501). One that does not end in
    ``chunked`` is aiohttp's parser's 400."""
    async with serve(1, settings=GatewayConfig(lean_server=lean_server)) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        body = json.dumps(completion_body()).encode()
        writer.write(
            b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: %b\r\n\r\n%x\r\n%b\r\n0\r\n\r\n"
            % (coding.encode(), len(body), body)
        )
        status, headers, raw = await _response(reader)
        error = json.loads(raw)["error"]
        assert (status, error["param"], error["code"]) == (501, "transfer-encoding", 501), raw
        assert error["message"] == f"unsupported Transfer-Encoding: {coding}"
        assert headers["connection"] == "close" and "x-request-id" in headers
        assert await reader.read() == b""  # closed: its body was not read
        await _close(writer)
        text = gw.manager.prometheus_metrics().decode()
        assert 'sage_llm_http_errors_total{route="/v1/completions",status="501"} 1.0' in text


@pytest.mark.parametrize("version", ["HTTP/2.0", "HTTP/0.9"])
async def test_an_http_version_other_than_1_0_or_1_1_is_a_json_400(version: str) -> None:
    async with serve(1) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(
            _post("/v1/completions", completion_body()).replace(b"HTTP/1.1", version.encode(), 1)
        )
        status, _, body = await _response(reader)
        error = json.loads(body)["error"]
        assert (status, error["type"]) == (400, "invalid_request_error")
        assert "unsupported HTTP version" in error["message"]
        await _close(writer)


async def test_an_unknown_expectation_is_a_json_417_counted_and_logged() -> None:
    async with serve(1) as gw:
        for path in ("/v1/completions", "/admin/set_policy"):
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(_post(path, completion_body(), "Expect: 200-ok"))
            status, headers, body = await _response(reader)
            error = json.loads(body)["error"]
            assert (status, error["code"]) == (417, 417), body
            assert "x-request-id" in headers
            await _close(writer)
        text = gw.manager.prometheus_metrics().decode()
        assert 'sage_llm_http_errors_total{route="/v1/completions",status="417"} 1.0' in text
        # 100-continue is still answered as aiohttp answers it
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(_post("/v1/completions", completion_body(), "Expect: 100-continue"))
        assert (await reader.readline()).startswith(b"HTTP/1.1 100")
        await reader.readline()
        assert (await _response(reader))[0] == 200
        await _close(writer)


async def test_a_client_gone_before_its_100_continue_is_a_499_not_a_500() -> None:
    """A client that leaves (a reset) right after an ``Expect: 100-continue`` head: the
    100 cannot be written; that had been a traceback and a 500 of route ``other`` under an
    id of the gateway's; it is the client's 499, under its id and route."""
    async with serve(1) as gw:
        for k in range(5):
            _, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            head = (
                "POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                f"Content-Length: 50\r\nExpect: 100-continue\r\nx-request-id: gone-{k}\r\n\r\n"
            )
            writer.write(head.encode())
            await writer.drain()
            writer.transport.abort()  # a reset, as a client that crashed
        gone = 'sage_llm_http_errors_total{route="/v1/completions",status="499"}'
        # (a reset that came before the head was read is no request at all: not every
        # one of the five need be counted)
        for _ in range(500):
            if gone in gw.manager.prometheus_metrics().decode():
                break
            await asyncio.sleep(0.01)
        assert gone in gw.manager.prometheus_metrics().decode()
        await asyncio.sleep(0.1)  # the others' ends
        assert 'status="500"' not in gw.manager.prometheus_metrics().decode()


async def test_a_body_too_large_is_refused_without_inviting_its_upload() -> None:
    """Expect: 100-continue with a Content-Length above max_body_bytes: the 413 comes at
    once, no 100 Continue first (the client would have sent the whole body for nothing),
    and the connection closes (the body was never read)."""
    async with serve(1, settings=GatewayConfig(max_body_bytes=1000)) as gw:
        for path in ("/v1/completions", "/admin/set_policy"):
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            head = (
                f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                "Content-Length: 10000000\r\nExpect: 100-continue\r\n\r\n"
            )
            writer.write(head.encode())  # and no body
            status, headers, body = await asyncio.wait_for(_response(reader), 5)
            assert status == 413, body
            assert json.loads(body)["error"]["code"] == 413
            assert headers["connection"] == "close"  # as the closing answers say
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed
            await _close(writer)


async def test_a_request_refused_by_its_key_is_refused_without_inviting_its_upload() -> None:
    """Expect: 100-continue from a client the API keys or the admin token turn away: its
    401/403 comes at once, with no 100 Continue first, and the connection closes (its body
    was never read); with the right key the 100 comes and the request is served."""
    settings = GatewayConfig(api_keys=("k1",), admin_token="t1")
    refused = [
        ("/v1/completions", "", 401),
        ("/v1/completions", "Authorization: Bearer k2\r\n", 401),
        ("/v1/chat/completions", "Authorization: Bearer k2\r\n", 401),
        ("/v1/embeddings", "Authorization: Bearer k2\r\n", 401),  # aiohttp's routes too
        ("/admin/set_policy", "", 401),
        ("/admin/set_policy", "Authorization: Bearer k1\r\n", 403),
    ]
    async with serve(1, settings=settings) as gw:
        for path, auth, expected in refused:
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            head = (
                f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                f"Content-Length: 100\r\nExpect: 100-continue\r\n{auth}\r\n"
            )
            writer.write(head.encode())  # and no body
            status, _, body = await asyncio.wait_for(_response(reader), 5)
            assert status == expected, (path, auth, body)
            assert json.loads(body)["error"]["code"] == expected
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed
            await _close(writer)
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(_post("/v1/completions", completion_body(), "Expect: 100-continue",
                           "Authorization: Bearer k1"))  # fmt: skip
        assert (await reader.readline()).startswith(b"HTTP/1.1 100")
        await reader.readline()
        assert (await _response(reader))[0] == 200
        await _close(writer)


@pytest.mark.parametrize("value", ["close", "keep-alive, Close", "x-a ,close"])
async def test_connection_close_is_honoured(value: str) -> None:
    async with serve(1) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(_post("/v1/completions", completion_body(), f"Connection: {value}"))
        status, headers, _ = await _response(reader)
        assert status == 200 and headers["connection"] == "close"
        assert await reader.read() == b""  # the server closed it
        await _close(writer)


async def test_a_close_in_a_second_connection_header_is_honoured() -> None:
    """``Connection: keep-alive`` then ``Connection: close``: both count (aiohttp reads
    them all), not only the first."""
    async with serve(1) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(_post("/v1/completions", completion_body(), "Connection: keep-alive",
                           "Connection: close"))  # fmt: skip
        status, headers, _ = await asyncio.wait_for(_response(reader), 5)
        assert status == 200 and headers["connection"] == "close"
        assert await asyncio.wait_for(reader.read(), 5) == b""  # the server closed it
        await _close(writer)


async def test_two_differing_content_lengths_are_a_400_naming_the_header() -> None:
    """A body framed two ways (request smuggling's shape): refused, not read by the first
    length."""
    async with serve(1) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(_post("/v1/completions", completion_body(), "Content-Length: 1"))
        status, _, body = await asyncio.wait_for(_response(reader), 5)
        assert (status, json.loads(body)["error"]["param"]) == (400, "content-length"), body
        await _close(writer)


async def test_a_cors_request_gets_its_allow_origin_header() -> None:
    origin = "https://app.example"
    async with serve(1, settings=GatewayConfig(cors_origins=(origin,))) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(_post("/v1/completions", completion_body(), f"Origin: {origin}"))
        status, headers, _ = await asyncio.wait_for(_response(reader), 5)
        assert (status, headers["access-control-allow-origin"]) == (200, origin)
        await _close(writer)


async def test_a_connection_header_without_the_close_token_keeps_the_connection() -> None:
    """``Connection`` is a list of tokens: ``closed`` or ``x-noclose`` is not ``close`` (the
    lean front had closed on any value holding the word; aiohttp keeps them open)."""
    async with serve(1) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        for value in ("closed", "x-noclose", "keep-alive, x-close-later"):
            writer.write(_post("/v1/completions", completion_body(), f"Connection: {value}"))
            status, headers, _ = await _response(reader)
            assert status == 200 and "connection" not in headers, value
        await _close(writer)


async def test_streams_are_chunked_server_sent_events() -> None:
    async with serve(1) as gw, aiohttp.ClientSession() as session:
        body = completion_body(stream=True, stream_options={"include_usage": True})
        async with session.post(gw.url("/v1/completions"), json=body) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "text/event-stream"
            assert resp.headers["Transfer-Encoding"] == "chunked"
            events = await asyncio.wait_for(read_events(resp), 10)  # not a hang: a failure
        assert events[-1] == "[DONE]"
        assert events[-2]["usage"]["completion_tokens"] == 8


class _Sends:
    """Stands in for the connection under a LeanStream: records each send (a stream's
    are all sent at once, not at the end of the turn)."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, data: bytes, *, now: bool = False) -> None:
        assert now
        self.sent.append(data)

    async def drain(self) -> None:
        return None


@pytest.mark.parametrize(
    ("writes", "last", "expected"),
    [
        ([], b"", [b"HEAD0\r\n\r\n"]),
        ([], b"data: [DONE]\n\n", [b"HEADe\r\ndata: [DONE]\n\n\r\n0\r\n\r\n"]),
        ([b"ab"], b"c", [b"HEAD2\r\nab\r\n", b"1\r\nc\r\n0\r\n\r\n"]),
        ([b"", b"ab"], b"", [b"HEAD2\r\nab\r\n", b"0\r\n\r\n"]),
    ],
)
async def test_a_stream_ends_with_its_last_data_in_one_send(
    writes: list[bytes], last: bytes, expected: list[bytes]
) -> None:
    conn = _Sends()
    stream = LeanStream(conn, b"HEAD")  # type: ignore[arg-type]
    for data in writes:
        await stream.write(data)
    await stream.write_eof(last)
    assert conn.sent == expected


async def test_a_client_that_disconnects_cancels_its_request() -> None:
    async with serve(1, hold=lambda rid: rid == "gone") as gw:
        _, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(_post("/v1/completions", completion_body(), "x-request-id: gone"))
        (probe,) = gw.probes.values()
        await probe.started_event.wait()
        await _close(writer)
        result = await gw.manager.wait_for_result("gone", timeout=5)
        assert result.status is RequestStatus.CANCELLED
        await asyncio.wait_for(probe.aborted_event.wait(), 5)


@pytest.mark.parametrize("lean_server", [True, False])
async def test_a_half_close_cancels_the_request_as_a_close_does(lean_server: bool) -> None:
    """A half-close (``shutdown(SHUT_WR)``, as ``nc -N`` does) cannot be told from a close:
    on both fronts it cancels the request in progress (documented), so that a client that
    left stops its engine's work."""
    settings = GatewayConfig(lean_server=lean_server)
    async with serve(1, settings=settings, hold=lambda rid: rid == "half") as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(_post("/v1/completions", completion_body(), "x-request-id: half"))
        (probe,) = gw.probes.values()
        await probe.started_event.wait()
        writer.write_eof()
        result = await gw.manager.wait_for_result("half", timeout=5)
        assert result.status is RequestStatus.CANCELLED
        assert await asyncio.wait_for(reader.read(), 5) == b""  # no answer; closed
        await _close(writer)


async def test_lean_server_can_be_turned_off() -> None:
    async with serve(1, settings=GatewayConfig(lean_server=False)) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(_post("/v1/completions", completion_body()))
        status, headers, _ = await _response(reader)
        assert status == 200
        assert headers["server"].startswith("Python")  # aiohttp's
        await _close(writer)


# --- the server on its own (virtual clock) -------------------------------------------------


class _Fallback:
    """A stand-in for aiohttp's protocol factory: records what it was handed."""

    def __init__(self) -> None:
        self.data = b""
        self.got = asyncio.Event()

    def __call__(self) -> asyncio.Protocol:
        outer = self

        class Proto(asyncio.Protocol):
            def data_received(self, data: bytes) -> None:
                outer.data += data
                outer.got.set()

        return Proto()


def _lean_only(
    handler: Any, fallback: _Fallback, read_timeout_s: float | None = 30.0
) -> LeanServer:
    """A lean server for ``/v1/completions`` (30 s keep-alive)."""
    return LeanServer(
        handler, fallback, routes=frozenset({"/v1/completions"}), max_body_bytes=1024,
        keepalive_timeout_s=30.0, read_timeout_s=read_timeout_s,
    )  # fmt: skip


async def _lean_server(
    handler: Any, fallback: _Fallback, read_timeout_s: float | None = 30.0
) -> tuple[LeanServer, asyncio.Server, int]:
    """A lean server for ``/v1/completions`` (30 s keep-alive) on a loopback port."""
    lean = _lean_only(handler, fallback, read_timeout_s)
    server = await asyncio.get_running_loop().create_server(lean, "127.0.0.1", 0)
    return lean, server, server.sockets[0].getsockname()[1]


async def _paired_client(lean: LeanServer) -> socket.socket:
    """A non-blocking client socket whose other end (a Unix socket pair's) ``lean`` serves,
    for tests of whether a client reads its answers. What such a client has not read
    changes only when it reads; on loopback TCP the kernel also acknowledges, retransmits
    and updates windows in real time, which the virtual clock outruns (30 s of it pass in
    microseconds): such work landing between two idle sweeps made a client that never
    reads look like one reading now and then, and kept its connection open."""
    client, end = socket.socketpair()
    client.setblocking(False)
    await asyncio.get_running_loop().connect_accepted_socket(lean, end)
    return client


def test_idle_connections_close_after_the_keepalive_timeout_and_shutdown_waits() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        release = asyncio.Event()
        served: list[str] = []
        second = asyncio.Event()

        async def handler(request: LeanRequest, conn: LeanConnection) -> None:
            served.append(request.path)
            if len(served) == 2:
                second.set()
            if request.headers.get("x-hold"):
                await release.wait()
            conn.respond(200, b"ok", content_type="text/plain", headers={})

        fallback = _Fallback()
        lean, server, _ = await _lean_server(handler, fallback)
        # each client on a Unix socket pair (see _paired_client): on loopback TCP a loaded
        # machine's kernel may deliver the server's close late, which the virtual clock
        # counts as sweeps passed. Idle keep-alive: closed after 30 (virtual) seconds
        reader, writer = await asyncio.open_connection(sock=await _paired_client(lean))
        writer.write(_post("/v1/completions", {}))
        assert (await _response(reader))[0] == 200
        started = loop.time()
        assert await reader.read() == b""
        assert 30.0 <= loop.time() - started <= 33.0 + 0.01  # the sweep: at most 10% late
        await _close(writer)
        # handover: the fallback protocol receives the bytes read so far
        reader, writer = await asyncio.open_connection(sock=await _paired_client(lean))
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
        await writer.drain()
        await fallback.got.wait()
        assert fallback.data.startswith(b"GET /metrics")
        await _close(writer)
        # shutdown: the request in progress finishes, with Connection: close
        reader, writer = await asyncio.open_connection(sock=await _paired_client(lean))
        writer.write(_post("/v1/completions", {}, "x-hold: 1"))
        await second.wait()
        server.close()
        closing = asyncio.create_task(lean.shutdown(60.0))
        await asyncio.sleep(1.0)
        assert not closing.done()
        release.set()
        status, headers, _ = await _response(reader)
        assert status == 200 and headers["connection"] == "close"
        await closing
        await _close(writer)

    run_virtual(main())


def test_a_request_dropped_by_the_servers_shutdown_is_no_client_gone() -> None:
    """The server's own close of a request still arriving had been counted and logged as
    the client leaving (499); the client's own leaving is."""

    async def main() -> None:
        async def handler(request: LeanRequest, conn: LeanConnection) -> None:
            conn.respond(200, b"ok", content_type="text/plain", headers={})

        lean, server, port = await _lean_server(handler, _Fallback())
        gone: list[str] = []
        lean.on_client_gone = lambda method, path, waited_s, given: gone.append(given)
        whole = _post("/v1/completions", {"prompt": "x"}, "x-request-id: mine")
        head_end = whole.index(b"\r\n\r\n") + 4
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(whole[: head_end + 3])  # the head, part of the body; then it leaves
        await asyncio.sleep(0.5)
        await _close(writer)
        await asyncio.sleep(0.5)
        assert gone == ["mine"]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(whole[: head_end + 3])  # the same, then the server shuts down
        await asyncio.sleep(0.5)
        server.close()
        await lean.shutdown(1.0)
        assert await reader.read() == b""
        await _close(writer)
        assert gone == ["mine"]

    run_virtual(main())


def test_a_request_slow_to_arrive_gets_a_408_and_its_connection_closes() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()

        async def handler(request: LeanRequest, conn: LeanConnection) -> None:
            conn.respond(200, b"ok", content_type="text/plain", headers={})

        lean, server, port = await _lean_server(handler, _Fallback(), read_timeout_s=10.0)
        noted: list[tuple[str, str, float]] = []
        given_ids: list[str] = []

        def on_read_timeout(method: str, path: str, waited_s: float, given: str) -> str:
            noted.append((method, path, waited_s))
            given_ids.append(given)
            return f"late-{len(noted)}"

        lean.on_read_timeout = on_read_timeout
        whole = _post("/v1/completions", {"prompt": "x"})
        head_end = whole.index(b"\r\n\r\n") + 4
        # a body, a head, then a request line cut short
        for partial in (whole[: head_end + 3], whole[:26], whole[:6]):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(partial)
            started = loop.time()
            status, headers, body = await _response(reader)
            assert (status, headers["connection"]) == (408, "close")
            assert headers["x-request-id"] == f"late-{len(noted)}"
            assert json.loads(body)["error"]["type"] == "timeout_error"
            assert 10.0 <= loop.time() - started <= 11.0 + 0.01  # the sweep: at most 10% late
            assert 10.0 <= noted[-1][2] <= 11.0 + 0.01
            assert await reader.read() == b""
            await _close(writer)
        assert [(m, p) for m, p, _ in noted] == [
            ("POST", "/v1/completions"), ("POST", "/v1/completions"), ("POST", "-"),
        ]  # fmt: skip
        assert given_ids == ["", "", ""]  # the first head carried none
        # a request that arrives in pieces, within the limit, is served; the connection
        # stays open, and the limit counts from the next request's first byte
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for cut in (whole[:20], whole[20 : head_end + 3], whole[head_end + 3 :]):
            writer.write(cut)
            await asyncio.sleep(4.0)
        assert (await _response(reader))[0] == 200
        writer.write(whole[:20])
        await asyncio.sleep(9.0)
        writer.write(whole[20:])
        assert (await _response(reader))[0] == 200
        await _close(writer)
        server.close()
        await lean.shutdown(1.0)

    run_virtual(main())


def test_pipelined_requests_wait_while_their_client_reads_no_answer() -> None:
    """A client that pipelines requests and reads none of the answers: the next request
    waits until the answers before it have been taken (``resume_writing``), as a stream's
    writes do; it had been served at once, its answer piling up in the gateway's memory."""

    async def main() -> None:
        answer = b"x" * (256 * 1024)
        served: list[LeanRequest] = []

        async def handler(request: LeanRequest, conn: LeanConnection) -> None:
            served.append(request)
            conn.respond(200, answer, content_type="text/plain", headers={})

        _lean, server, port = await _lean_server(handler, _Fallback())
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=1024)
        count = 60  # 15 MiB of answers; the kernel's buffers hold at most about 4 MiB
        writer.write(_post("/v1/completions", {}) * count)
        await asyncio.sleep(5.0)
        assert len(served) < 30
        for _ in range(count):  # once read, every answer comes, in turn
            status, _, body = await _response(reader)
            assert (status, len(body)) == (200, len(answer))
        assert len(served) == count
        await _close(writer)
        server.close()

    run_virtual(main())


def test_a_client_that_never_reads_its_answers_is_closed_after_the_keepalive_timeout() -> None:
    """Pipelined requests held while their client reads nothing, and an answer left unread:
    the connection closes (its unread answers dropped) once the keep-alive timeout has
    passed twice without the client reading (a close alone would wait for the client to
    read); a client reading slowly keeps it."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        answer = b"x" * (256 * 1024)
        served: list[LeanRequest] = []

        async def handler(request: LeanRequest, conn: LeanConnection) -> None:
            served.append(request)
            sock = conn._transport.get_extra_info("socket") if conn._transport else None
            if sock is not None:  # the answers stay in the gateway, not in the kernel
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            conn.respond(200, answer, content_type="text/plain", headers={})

        lean = _lean_only(handler, _Fallback())
        for count in (60, 1):  # held requests; one answer left unread
            served.clear()
            sock = await _paired_client(lean)
            await loop.sock_sendall(sock, _post("/v1/completions", {}) * count)
            for _ in range(100):
                if served:
                    break
                await asyncio.sleep(0.01)
            started = loop.time()
            for _ in range(800):
                if not lean.connections:
                    break
                await asyncio.sleep(0.1)
            assert not lean.connections  # gone, though its client never read
            # the keep-alive timeout, twice when answers were left in the gateway's buffer
            assert 30.0 <= loop.time() - started <= 66.0 + 0.2
            assert len(served) < count or count == 1
            sock.close()
        # a client reading its answers slowly (4 KiB every 2 s: 3 answers over 400 s, well
        # past the keep-alive timeout) gets all of them, whole
        sock = await _paired_client(lean)
        await loop.sock_sendall(sock, _post("/v1/completions", {}) * 3)
        got = bytearray()
        while chunk := await loop.sock_recv(sock, 4096):
            got += chunk
            if got.count(answer) == 3:
                break
            await asyncio.sleep(2.0)
        assert got.count(answer) == 3
        sock.close()

    run_virtual(main())


def test_a_stream_left_unread_ends_as_its_client_gone_and_a_slow_reader_gets_it_all() -> None:
    """A stream whose client reads none of it for the keep-alive timeout, and again, is
    ended as a client gone (its connection aborted: the handler had waited for ever); a
    client reading slowly gets the whole stream."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        ended: list[BaseException | None] = []
        piece = b"y" * 16384

        async def handler(request: LeanRequest, conn: LeanConnection) -> None:
            sock = conn._transport.get_extra_info("socket") if conn._transport else None
            if sock is not None:  # what is written stays in the gateway, not in the kernel
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            stream = conn.open_stream(200, content_type="text/event-stream", headers={})
            try:
                for _ in range(40):
                    await stream.write(piece)
                await stream.write_eof()
            except ConnectionResetError as exc:
                ended.append(exc)
                raise
            ended.append(None)

        lean = _lean_only(handler, _Fallback())
        socks = []
        for _ in range(2):
            sock = await _paired_client(lean)
            await loop.sock_sendall(sock, _post("/v1/completions", {}))
            socks.append(sock)
        _never, slow = socks  # the first reads nothing
        got = bytearray()
        while chunk := await loop.sock_recv(slow, 4096):  # 4 KiB every 2 s: 320 s
            got += chunk
            if got.endswith(b"0\r\n\r\n"):
                break
            await asyncio.sleep(2.0)
        assert got.count(piece) == 40  # the slow reader's stream, whole
        for _ in range(300):
            if len(ended) == 2:
                break
            await asyncio.sleep(1.0)
        assert None in ended and any(isinstance(e, ConnectionResetError) for e in ended)
        for sock in socks:
            sock.close()

    run_virtual(main())


def test_shutdown_drops_answers_left_unread_within_its_timeout() -> None:
    """A connection whose client reads none of its answer does not outlive the shutdown:
    its answer goes once the shutdown's timeout has passed (a close alone would wait for
    the client for ever)."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        answer = b"x" * (256 * 1024)

        async def handler(request: LeanRequest, conn: LeanConnection) -> None:
            sock = conn._transport.get_extra_info("socket") if conn._transport else None
            if sock is not None:  # the answer stays in the gateway, not in the kernel
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            conn.respond(200, answer, content_type="text/plain", headers={})

        lean, server, port = await _lean_server(handler, _Fallback())
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, _post("/v1/completions", {}))
        for _ in range(100):
            if lean.connections and all(c.task is None for c in lean.connections):
                break
            await asyncio.sleep(0.01)
        server.close()
        started = loop.time()
        await lean.shutdown(5.0)
        assert 5.0 <= loop.time() - started <= 5.0 + 0.1
        await asyncio.sleep(0)  # the aborted connection's end is reported a turn later
        assert not lean.connections
        sock.close()

    run_virtual(main())


def test_a_stream_its_handler_leaves_unended_closes_the_connection() -> None:
    """A handler that returns with its chunked response not ended (``write_eof`` never
    reached) leaves the connection closed, not waiting for a next request the client
    could not tell apart from the rest of the body; an ended one keeps it open."""

    async def main() -> None:
        loop = asyncio.get_running_loop()

        async def handler(request: LeanRequest, conn: LeanConnection) -> None:
            stream = conn.open_stream(200, content_type="text/event-stream", headers={})
            await stream.write(b"data: 1\n\n")
            if not request.headers.get("x-unended"):
                await stream.write_eof()

        _lean, server, port = await _lean_server(handler, _Fallback())
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(_post("/v1/completions", {}))
        status, headers, body = await _response(reader)
        assert (status, headers["transfer-encoding"], body) == (200, "chunked", b"data: 1\n\n")
        writer.write(_post("/v1/completions", {}, "x-unended: 1"))  # the same connection
        started = loop.time()
        rest = await reader.read()  # to the end: the server closed it
        assert rest.startswith(b"HTTP/1.1 200 OK") and not rest.endswith(b"0\r\n\r\n")
        assert loop.time() - started < 1.0
        await _close(writer)
        server.close()

    run_virtual(main())


def _head_of(*lines: str) -> bytes:
    return "\r\n".join(["POST /v1/completions HTTP/1.1", *lines]).encode("latin-1")


async def _no_handler(request: LeanRequest, conn: LeanConnection) -> None:
    raise AssertionError("not called")


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (["Host: t", "Content-Length: 2"], {"host": "t", "content-length": "2"}),
        # names are lower-cased, values lose the blanks around them, empty values stay
        (["X-Sage-Priority:\thigh  ", "content-LENGTH:2", "X-Empty:", "host: t"],
         {"x-sage-priority": "high", "content-length": "2", "x-empty": "", "host": "t"}),
        # of a repeated header the first counts, as in aiohttp's request.headers[name]
        (["X-Sage-Priority: high", "Content-Length: 2", "x-sage-priority: bogus", "Host: t"],
         {"x-sage-priority": "high", "content-length": "2", "host": "t"}),
        # everything below is handed to aiohttp
        (["Host: t", " folded", "Content-Length: 2"], None),
        (["Host : t", "Content-Length: 2"], None),
        (["no colon here", "Content-Length: 2"], None),
        (["Content-Length: 2", "Content-Length: 2"], None),
        (["Host: t"], None),
        (["Content-Length: 2"], None),  # HTTP/1.1 without Host: aiohttp's 400
        (["Content-Length: two"], None),
        # read as its value (int() refuses more than 4,300 digits, leading zeros too)
        (["Host: t", "Content-Length: " + "0" * 5000 + "2"], {"host": "t", "content-length": "2"}),
        (["Host: t", "Content-Length: " + "0" * 5000 + "101"], None),  # above the limit
        (["Host: t", "Content-Length: 1" + "0" * 5000], None),
        (["Content-Length: 2", "Transfer-Encoding: chunked"], None),
        (["Content-Length: 2", "Content-Encoding: gzip"], None),
        (["Connection: keep-alive", "Content-Length: 2", "Connection: close"], None),
        (["Content-Length: 2", "X-Session-Id: caf\xe9"], None),  # aiohttp reads UTF-8
        (["X\x01Bad: 1", "Content-Length: 2"], None),
        (["X-Bad: a\x00b", "Content-Length: 2"], None),
        (["X-Bad: a\x7fb", "Content-Length: 2"], None),
        (["X-Bad: a\nb", "Content-Length: 2"], None),
        (["X(Bad): 1", "Content-Length: 2"], None),
        (["X Bad: 1", "Content-Length: 2"], None),
    ],
    ids=["plain", "blanks", "repeated", "folded", "space-before-colon", "no-colon",
         "repeated-length", "no-length", "no-host", "bad-length", "zeros", "zeros-over",
         "5001-digits", "chunked", "compressed",
         "two-connections", "non-ascii", "control-in-name", "nul-in-value", "del-in-value",
         "bare-lf", "separator-in-name", "space-in-name"],
)  # fmt: skip
def test_heads_are_parsed_or_handed_over(lines: list[str], expected: dict[str, str] | None) -> None:
    server = LeanServer(
        _no_handler, asyncio.Protocol, routes=frozenset({"/v1/completions"}), max_body_bytes=100
    )
    parsed = LeanConnection(server)._parse_head(_head_of(*lines))
    if expected is None:
        assert parsed is None
    else:
        assert parsed == ("POST", "/v1/completions", expected)
    other_route = _head_of(*lines).replace(b"/v1/completions", b"/v1/other", 1)
    assert LeanConnection(server)._parse_head(other_route) is None


async def test_the_lean_fronts_access_line_names_the_model(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One line per request, as the app writes it, with the body's model."""
    with caplog.at_level(logging.INFO, logger="sage_llm.gateway.access"):
        async with serve(1) as gw, aiohttp.ClientSession() as http:
            body = completion_body(max_tokens=2)
            async with http.post(gw.url("/v1/completions"), json=body) as resp:
                assert resp.status == 200
                await resp.read()
    lines = [r.getMessage() for r in caplog.records if r.name == "sage_llm.gateway.access"]
    (line,) = [line for line in lines if "path=/v1/completions" in line]
    assert line.endswith(f"model={body['model']}"), line


def test_pipelined_requests_past_what_the_buffer_holds_stop_being_read_until_served() -> None:
    """Requests pipelined behind one in progress are read only up to a whole request's
    worth (``max_body_bytes`` and a head): reading pauses there, so the client's sending
    waits, and goes on once the request in progress has ended; every request is answered,
    in order."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        release = asyncio.Event()
        started = asyncio.Event()
        served: list[str] = []

        async def handler(request: LeanRequest, conn: LeanConnection) -> None:
            served.append(request.headers["x-n"])
            if request.headers["x-n"] == "0":
                started.set()
                await release.wait()
            conn.respond(200, b"ok", content_type="text/plain", headers={})

        lean = _lean_only(handler, _Fallback())  # reads at most 1 KiB + 16 KiB ahead
        sock = await _paired_client(lean)
        await loop.sock_sendall(sock, _post("/v1/completions", {}, "x-n: 0"))
        await started.wait()
        count = 2000  # about 2 MB: more than the kernel's buffers hold
        rest = b"".join(
            _post("/v1/completions", {"prompt": "x" * 900}, f"x-n: {n}") for n in range(1, count)
        )
        sending = asyncio.ensure_future(loop.sock_sendall(sock, rest))
        await asyncio.sleep(5.0)
        assert not sending.done()  # not read: the client waits, not the gateway's memory
        assert served == ["0"]
        release.set()
        got = bytearray()
        while got.count(b"HTTP/1.1 200 OK") < count:
            chunk = await loop.sock_recv(sock, 65536)
            assert chunk, "closed early"
            got += chunk
        await asyncio.wait_for(sending, 5.0)
        assert served == [str(n) for n in range(count)]
        sock.close()

    run_virtual(main())


def test_a_request_sent_after_an_answer_left_unread_waits_until_it_is_read() -> None:
    """A client that sends its next request without reading the answer before: the request
    is not served (its answer would pile up behind the unread one) until the client has
    read that answer; then it is."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        answer = b"x" * (1024 * 1024)
        served: list[str] = []
        first_written = asyncio.Event()

        async def handler(request: LeanRequest, conn: LeanConnection) -> None:
            served.append(request.headers["x-n"])
            conn.respond(200, answer, content_type="text/plain", headers={})
            first_written.set()

        lean = _lean_only(handler, _Fallback())
        sock = await _paired_client(lean)
        await loop.sock_sendall(sock, _post("/v1/completions", {}, "x-n: 1"))
        await first_written.wait()
        await asyncio.sleep(0.5)  # the answer has left for the kernel: the rest waits
        await loop.sock_sendall(sock, _post("/v1/completions", {}, "x-n: 2"))
        await asyncio.sleep(5.0)
        assert served == ["1"]  # held, unread answer before it
        got = bytearray()
        while got.count(answer) < 2:
            chunk = await loop.sock_recv(sock, 65536)
            assert chunk, "closed early"
            got += chunk
        assert served == ["1", "2"]
        assert got.count(b"HTTP/1.1 200 OK") == 2
        sock.close()

    run_virtual(main())


def test_without_a_keepalive_timeout_a_stream_waits_on_its_client_for_as_long_as_it_takes() -> None:
    """With ``keepalive_timeout_s = 0`` nothing ends a stream whose client reads slowly or
    not at all for a while: it is written as the client reads, whole."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        piece = b"y" * 16384
        ended: list[BaseException | None] = []

        async def handler(request: LeanRequest, conn: LeanConnection) -> None:
            stream = conn.open_stream(200, content_type="text/event-stream", headers={})
            try:
                for _ in range(40):
                    await stream.write(piece)
                await stream.write_eof()
            except BaseException as exc:
                ended.append(exc)
                raise
            ended.append(None)

        lean = LeanServer(
            handler, _Fallback(), routes=frozenset({"/v1/completions"}), max_body_bytes=1024,
            keepalive_timeout_s=0, read_timeout_s=None,
        )  # fmt: skip
        sock = await _paired_client(lean)
        await loop.sock_sendall(sock, _post("/v1/completions", {}))
        await asyncio.sleep(300.0)  # the client reads nothing for 5 minutes
        assert ended == []  # still waiting on its client
        got = bytearray()
        while not got.endswith(b"0\r\n\r\n"):
            chunk = await loop.sock_recv(sock, 65536)
            assert chunk, "closed early"
            got += chunk
        assert got.count(piece) == 40
        for _ in range(100):
            if ended:
                break
            await asyncio.sleep(0.01)
        assert ended == [None]
        sock.close()

    run_virtual(main())


def test_a_handler_answering_after_its_client_left_gets_connection_reset(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A handler that, cancelled by its client's leaving, still tries to answer gets
    ``ConnectionResetError`` (as aiohttp's writer raises); the connection is gone, and
    nothing else is tried on it or logged as a failure."""

    async def main() -> None:
        started = asyncio.Event()
        tried: list[BaseException] = []
        finished = asyncio.Event()

        async def handler(request: LeanRequest, conn: LeanConnection) -> None:
            started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                try:
                    conn.respond(499, b"gone", content_type="text/plain", headers={})
                except ConnectionResetError as exc:
                    tried.append(exc)
            finally:
                finished.set()

        lean = _lean_only(handler, _Fallback())
        sock = await _paired_client(lean)
        await asyncio.get_running_loop().sock_sendall(sock, _post("/v1/completions", {}))
        await started.wait()
        sock.close()
        await asyncio.wait_for(finished.wait(), 5.0)
        await asyncio.sleep(0.1)
        (exc,) = tried
        assert isinstance(exc, ConnectionResetError)
        assert str(exc) == "the client closed the connection"
        assert not lean.connections

    with caplog.at_level(logging.DEBUG, logger="sage_llm.gateway"):
        run_virtual(main())
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
