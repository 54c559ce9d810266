"""Tests for the proxy bench's minimal forwarder (the floor of a Python proxy)."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from sage_llm.bench.forwarder import Forwarder, forwarder_main
from sage_llm.bench.proxy_bench import DEFAULT_PEERS, FORWARDER, closed_loop, python_forwarder
from sage_llm.cli import bench_proxy
from sage_llm.sim.engine import SimEngine, SimEngineConfig
from sage_llm.sim.server import create_engine_app
from tests.engines.fake_engine import closed_port, start_app


def _upstream(name: str) -> web.Application:
    """An engine stand-in that answers with its name, the body it got, or a stream."""

    async def echo(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if request.query.get("stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for i in range(3):
                await resp.write(f"data: {name}-{i}\n\n".encode())
            await resp.write_eof()
            return resp
        status = int(request.query.get("status", "200"))
        payload = {"engine": name, "body": body.decode(), "path": request.path}
        return web.json_response(payload, status=status)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


@contextlib.asynccontextmanager
async def _forwarding(upstreams: list[str]) -> AsyncIterator[str]:
    """A :class:`Forwarder` over ``upstreams`` on a loopback port; its URL."""
    forwarder = Forwarder(upstreams)
    server = await asyncio.get_running_loop().create_server(forwarder.protocol, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        forwarder.close()


async def _with_forwarder(check: Callable[[str], Awaitable[None]], n: int = 2) -> None:
    runners = []
    for i in range(n):
        runners.append(await start_app(_upstream(f"e{i}")))
    try:
        async with _forwarding([f"http://127.0.0.1:{port}" for _, port in runners]) as url:
            await check(url)
    finally:
        for runner, _ in runners:
            await runner.cleanup()


def test_requests_pass_through_unchanged_in_round_robin() -> None:
    async def check(url: str) -> None:
        async with aiohttp.ClientSession() as session:
            seen = []
            for i in range(4):
                async with session.post(f"{url}/v1/completions", data=f'{{"n":{i}}}') as r:
                    assert r.status == 200
                    assert r.headers["Content-Type"].startswith("application/json")
                    data = await r.json()
                seen.append(data["engine"])
                assert data["body"] == f'{{"n":{i}}}' and data["path"] == "/v1/completions"
            assert seen == ["e0", "e1", "e0", "e1"]
            async with session.post(f"{url}/v1/completions?status=429", data=b"{}") as r:
                assert r.status == 429  # the engine's status, passed on
            async with session.get(f"{url}/health") as r:
                assert r.status == 200 and await r.text() == "ok"  # answered by the forwarder

    asyncio.run(_with_forwarder(check))


def test_streams_are_relayed_piece_by_piece() -> None:
    async def check(url: str) -> None:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{url}/v1/completions?stream=1", data=b"{}") as r:
                assert r.status == 200
                assert r.headers["Content-Type"] == "text/event-stream"
                text = (await r.read()).decode()
            assert text == "".join(f"data: e0-{i}\n\n" for i in range(3))

    asyncio.run(_with_forwarder(check, n=1))


async def _raw(url: str, payload: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(payload)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5.0)  # until the forwarder closes
    writer.close()
    return data


def test_pipelined_requests_are_answered_in_order_and_close_is_honoured() -> None:
    def request(body: bytes, *, close: bool = False) -> bytes:
        extra = b"Connection: close\r\n" if close else b""
        head = b"POST /v1/x HTTP/1.1\r\nHost: f\r\nContent-Length: %d\r\n%b\r\n"
        return head % (len(body), extra) + body

    async def check(url: str) -> None:
        answer = await _raw(url, request(b"first") + request(b"second", close=True))
        first, second = answer.index(b'"first"'), answer.index(b'"second"')
        assert answer.startswith(b"HTTP/1.1 200") and first < second

    asyncio.run(_with_forwarder(check))


def test_requests_before_an_unreadable_one_are_answered_before_its_error() -> None:
    """Pipelined: a valid request, then one that cannot be read. The first is forwarded and
    answered, then the second gets its error and the connection closes."""
    good = b"POST /v1/x HTTP/1.1\r\nHost: f\r\nContent-Length: 5\r\n\r\nfirst"
    bad = b"POST /v1/x HTTP/1.1\r\nContent-Length: many\r\n\r\n"

    async def check(url: str) -> None:
        answer = await _raw(url, good + bad)
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
        first, error = answer.index(b'"first"'), answer.index(b"HTTP/1.1 400 Bad Request\r\n")
        assert first < error
        assert answer.count(b"HTTP/1.1 ") == 2

    asyncio.run(_with_forwarder(check, n=1))


@pytest.mark.parametrize(
    ("payload", "status"),
    [
        (
            b"POST /v1/x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"411 Length Required",
        ),
        (b"POST /v1/x HTTP/1.1\r\nContent-Length: many\r\n\r\n", b"400 Bad Request"),
        (b"NONSENSE\r\n\r\n", b"400 Bad Request"),
        (
            b"POST /v1/x HTTP/1.1\r\nX-Pad: " + b"a" * 70_000,
            b"431 Request Header Fields Too Large",
        ),
    ],
)
def test_unreadable_requests_get_an_error_and_a_close(payload: bytes, status: bytes) -> None:
    """Each is answered with its own status line (code and reason) and a JSON error."""

    async def check(url: str) -> None:
        answer = await _raw(url, payload)
        assert answer.startswith(b"HTTP/1.1 " + status + b"\r\n")
        body = json.loads(answer.partition(b"\r\n\r\n")[2])
        assert body["error"]["code"] == int(status[:3])

    asyncio.run(_with_forwarder(check, n=1))


def test_an_unreachable_engine_is_answered_with_502() -> None:
    async def main() -> None:
        async with (
            _forwarding([f"http://127.0.0.1:{closed_port()}"]) as url,
            aiohttp.ClientSession() as session,
            session.post(f"{url}/v1/completions", data=b"{}") as r,
        ):
            assert r.status == 502
            assert "upstream failed" in (await r.json())["error"]["message"]

    asyncio.run(main())


async def _cut_upstream(answer: bytes) -> tuple[asyncio.Server, str]:
    """An upstream that reads one request head, sends ``answer`` and closes."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


@pytest.mark.parametrize(
    ("answer", "status"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{", 502),
        (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n7\r\ndata: 1\r\n",
            200,
        ),
        # a compressed answer the lean transport does not decode: unusable, a 502
        (b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 2\r\n\r\nxx", 502),
    ],
    ids=["before-the-first-byte", "inside-a-stream", "compressed"],
)
def test_an_answer_that_breaks_off(answer: bytes, status: int) -> None:
    """Before anything was relayed: a 502. Inside a relayed stream: the client's
    connection ends (its body is cut short)."""

    async def main() -> None:
        upstream, upstream_url = await _cut_upstream(answer)
        try:
            async with (
                _forwarding([upstream_url]) as url,
                aiohttp.ClientSession() as session,
                session.post(f"{url}/v1/completions", data=b"{}") as r,
            ):
                assert r.status == status
                if status == 200:
                    with pytest.raises(aiohttp.ClientPayloadError):
                        await r.read()
        finally:
            upstream.close()

    asyncio.run(main())


def test_bad_upstreams_are_refused() -> None:
    with pytest.raises(ValueError, match="at least one"):
        Forwarder([])
    with pytest.raises(ValueError, match="http://host:port"):
        Forwarder(["https://127.0.0.1:8000"])
    with pytest.raises(SystemExit):
        forwarder_main(["--port", "1", "127.0.0.1:8000"])


def test_it_is_a_default_peer_of_the_bench() -> None:
    assert FORWARDER in DEFAULT_PEERS
    cli_default = inspect.signature(bench_proxy).parameters["peers"].default
    assert cli_default == ",".join(DEFAULT_PEERS)  # `sage-llm bench proxy` spells them out


@pytest.mark.parametrize("stream", [False, True])
def test_the_forwarder_process_serves_the_bench_client(tmp_path: Path, stream: bool) -> None:
    async def main() -> None:
        engine = SimEngine("sim-0", SimEngineConfig(speed=1000.0))
        runner, port = await start_app(create_engine_app(engine, model_name="llama-3-8b"))
        try:
            async with python_forwarder([f"http://127.0.0.1:{port}"], tmp_path) as proc:
                result = await closed_loop(
                    proc.url, concurrency=4, requests=12, stream=stream, warmup=1
                )
            assert proc.returncode is not None  # stopped on exit
        finally:
            await runner.cleanup()
            await engine.aclose()
        assert result.errors == 0 and len(result.latencies_s) == 12
        assert len(result.ttfts_s) == (12 if stream else 0)

    asyncio.run(main())


def test_a_stream_is_relayed_as_it_comes_and_a_client_that_leaves_ends_it() -> None:
    """The first piece reaches the client while the engine still streams; the client's
    going away closes the forwarder's request to the engine."""

    async def main() -> None:
        upstream_done = asyncio.Event()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n8\r\ndata: 1\n\r\n")  # fmt: skip
            await writer.drain()
            await reader.read()  # until the forwarder closes its request
            upstream_done.set()
            writer.close()

        upstream = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = upstream.sockets[0].getsockname()[1]
        try:
            async with _forwarding([f"http://127.0.0.1:{port}"]) as url:
                host, fport = url.removeprefix("http://").split(":")
                reader, writer = await asyncio.open_connection(host, int(fport))
                writer.write(b"POST /v1/x HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}")
                got = b""
                while b"data: 1" not in got:
                    got += await asyncio.wait_for(reader.read(1024), 5.0)
                assert got.startswith(b"HTTP/1.1 200")
                writer.close()
                await asyncio.wait_for(upstream_done.wait(), 5.0)
        finally:
            upstream.close()

    asyncio.run(main())
