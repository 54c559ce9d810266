"""Serving: start_gateway for tests, run_gateway with a graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import socket
from pathlib import Path

import aiohttp
import pytest

from sage_llm.config import GatewayConfig, TenantConfig
from sage_llm.gateway.app import ADMIN_KEY
from sage_llm.gateway.server import run_gateway, start_gateway
from sage_llm.sim.clock import run_virtual
from tests.gateway.harness import completion_body, make_manager, read_events, serve


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_start_gateway_can_own_the_manager_lifecycle() -> None:
    manager, _, _ = make_manager(1)
    runner, port = await start_gateway(manager, manage_lifecycle=True)
    try:
        assert manager.is_running
        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{port}/v1/completions"
            async with http.post(url, json=completion_body()) as r:
                assert r.status == 200
    finally:
        await runner.cleanup()
    assert not manager.is_running


async def test_start_gateway_leaves_a_caller_owned_manager_running() -> None:
    manager, _, _ = make_manager(1)
    async with manager:
        runner, port = await start_gateway(manager)
        assert port > 0
        await runner.cleanup()
        assert manager.is_running


@pytest.mark.parametrize("lean_server", [True, False])
async def test_run_gateway_finishes_in_flight_requests_then_stops_the_manager(
    lean_server: bool,
) -> None:
    manager, probes, _ = make_manager(1, hold=lambda rid: rid == "in-flight")
    port = _free_port()
    ready = asyncio.Event()
    settings = GatewayConfig(port=port, lean_server=lean_server)
    server = asyncio.create_task(run_gateway(manager, settings, ready=ready))
    await asyncio.wait_for(ready.wait(), 10)
    running_when_ready = manager.is_running
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as http:
        async with http.get(base + "/health") as r:
            assert r.status == 200
        headers = {"x-request-id": "in-flight"}
        async with http.post(
            base + "/v1/completions", json=completion_body(stream=True), headers=headers
        ) as stream:
            line = await stream.content.readline()
            assert json.loads(line[len(b"data: ") :])["choices"][0]["text"]
            server.cancel()
            probes["sim-0"].gate.set()
            events = await read_events(stream)
        with pytest.raises(asyncio.CancelledError):
            await server
        assert events[-1] == "[DONE]"
        assert events[-2]["choices"][0]["finish_reason"] == "length"
        assert (running_when_ready, manager.is_running) == (True, False)
        with pytest.raises(aiohttp.ClientConnectionError):
            async with http.get(base + "/health"):
                pass
    assert probes["sim-0"].aborted == []


async def test_run_gateway_stops_the_manager_when_binding_fails() -> None:
    manager, _, _ = make_manager(1)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = int(taken.getsockname()[1])
        with pytest.raises(OSError, match="in use"):
            await run_gateway(manager, GatewayConfig(), port=port)
    assert not manager.is_running


@pytest.mark.parametrize("lean_server", [True, False])
async def test_requests_left_at_the_shutdown_limit_end_with_a_reason(lean_server: bool) -> None:
    """Past ``shutdown_timeout_s`` what still runs is cancelled, and its client is told:
    a whole answer's 503, a stream's error event and ``[DONE]`` (not a dropped connection)."""
    manager, probes, _ = make_manager(1, hold=lambda rid: True, hold_after=1)
    port = _free_port()
    ready = asyncio.Event()
    settings = GatewayConfig(lean_server=lean_server, shutdown_timeout_s=0.2)
    server = asyncio.create_task(run_gateway(manager, settings, port=port, ready=ready))
    await asyncio.wait_for(ready.wait(), 10)
    url = f"http://127.0.0.1:{port}/v1/completions"
    async with aiohttp.ClientSession() as http:
        whole = asyncio.create_task(
            http.post(url, json=completion_body(), headers={"x-request-id": "stuck"})
        )
        async with http.post(
            url, json=completion_body(stream=True), headers={"x-request-id": "stuck-stream"}
        ) as stream:
            await stream.content.readline()  # its first chunk
            await asyncio.wait_for(probes["sim-0"].started_event.wait(), 5)
            server.cancel()
            rest = await stream.text()
        resp = await whole
        body = await resp.json()
        resp.release()
        with pytest.raises(asyncio.CancelledError):
            await server
    assert resp.status == 503 and "control plane stopped" in body["error"]["message"]
    *_, error, done = [e for e in rest.split("\n\n") if e.strip()]
    assert done.strip() == "data: [DONE]"
    assert "control plane stopped" in json.loads(error.strip()[len("data: ") :])["error"]["message"]
    assert not manager.is_running
    assert sorted(probes["sim-0"].aborted) == ["stuck", "stuck-stream"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
async def test_sigterm_or_sighup_shuts_the_gateway_down_gracefully(sig: signal.Signals) -> None:
    """SIGTERM, and SIGHUP (a closed terminal: its default action would cut every stream
    mid-body) as SIGTERM, drain the gateway; a second one is logged and ignored."""
    before = signal.signal(signal.SIGHUP, signal.SIG_DFL)  # even when run under nohup
    try:
        manager, probes, _ = make_manager(1, hold=lambda rid: rid == "in-flight")
        port = _free_port()
        ready = asyncio.Event()
        server = asyncio.create_task(run_gateway(manager, GatewayConfig(port=port), ready=ready))
        await asyncio.wait_for(ready.wait(), 10)
        # run_gateway watches the signal on the loop (never the default action: that would
        # kill the test run)
        assert signal.getsignal(sig) is not signal.SIG_DFL
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:
            headers = {"x-request-id": "in-flight"}
            async with http.post(
                base + "/v1/completions", json=completion_body(stream=True), headers=headers
            ) as stream:
                await stream.content.readline()
                os.kill(os.getpid(), sig)
                for _ in range(5):
                    await asyncio.sleep(0)
                # a second one while in-flight requests finish is logged and ignored (the
                # default action would end the process, and a launcher its engines with it)
                os.kill(os.getpid(), sig)
                await asyncio.sleep(0.05)
                assert not server.done()
                probes["sim-0"].gate.set()
                events = await read_events(stream)
            await asyncio.wait_for(server, 10)  # returns: a stop, not a cancellation
        assert events[-1] == "[DONE]"
        assert not manager.is_running
        assert signal.getsignal(sig) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGHUP, before)


async def test_an_ignored_sighup_stays_ignored() -> None:
    """Under nohup (SIGHUP ignored) the gateway leaves SIGHUP ignored."""
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        manager, _, _ = make_manager(1)
        ready = asyncio.Event()
        config = GatewayConfig(port=_free_port())
        server = asyncio.create_task(run_gateway(manager, config, ready=ready))
        await asyncio.wait_for(ready.wait(), 10)
        os.kill(os.getpid(), signal.SIGHUP)
        await asyncio.sleep(0.05)
        assert not server.done() and signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        server.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await server
    finally:
        signal.signal(signal.SIGHUP, before)


async def test_a_second_ctrl_c_ends_the_requests_in_flight_with_their_reason() -> None:
    # as in a terminal: a job started in the background of a script ignores Ctrl-C (SIG_IGN
    # from its shell), and the gateway leaves an ignored Ctrl-C ignored
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        await _two_ctrl_c()
    finally:
        signal.signal(signal.SIGINT, inherited)


async def _two_ctrl_c() -> None:
    manager, probes, _ = make_manager(1, hold=lambda rid: rid == "held")
    port = _free_port()
    ready = asyncio.Event()
    before = signal.getsignal(signal.SIGINT)
    settings = GatewayConfig(port=port, shutdown_timeout_s=60)
    server = asyncio.create_task(run_gateway(manager, settings, ready=ready))
    await asyncio.wait_for(ready.wait(), 10)
    assert signal.getsignal(signal.SIGINT) is not before  # taken over while it serves
    url = f"http://127.0.0.1:{port}/v1/completions"
    async with aiohttp.ClientSession() as http:
        async with http.post(
            url, json=completion_body(stream=True), headers={"x-request-id": "held"}
        ) as stream:
            await stream.content.readline()
            os.kill(os.getpid(), signal.SIGINT)  # the first: a graceful shutdown, which waits
            for _ in range(50):  # until the shutdown has begun (new requests refused)
                await asyncio.sleep(0.01)
                if not manager.is_accepting:
                    break
            assert not manager.is_accepting and not server.done()
            os.kill(os.getpid(), signal.SIGINT)  # the second: end it now, with its reason
            rest = await asyncio.wait_for(stream.text(), 10)
        await asyncio.wait_for(server, 10)  # well before the 60 s drain
    *_, error, done = [e for e in rest.split("\n\n") if e.strip()]
    assert done.strip() == "data: [DONE]"
    assert "control plane stopped" in json.loads(error.strip()[len("data: ") :])["error"]["message"]
    assert probes["sim-0"].aborted == ["held"]
    assert signal.getsignal(signal.SIGINT) is before  # asyncio's or pytest's own, back


_MALFORMED_HEADS = {
    "length-not-a-number": (
        b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Length: abc\r\n\r\n{}",
        "content-length",
    ),
    "negative-length": (
        b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Length: -1\r\n\r\n{}",
        "content-length",
    ),
    "two-lengths": (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n"
        b"Content-Length: 3\r\n\r\n{}",
        "content-length",
    ),
    "length-and-chunked": (
        b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "transfer-encoding",
    ),
    "garbage-method": (
        b"GARBAGE /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}",
        None,
    ),
    "garbage-method-on-a-probe": (b"GARBAGE /health HTTP/1.1\r\nHost: t\r\n\r\n", None),
    "bad-length-on-a-probe": (
        b"GET /health HTTP/1.1\r\nHost: t\r\nContent-Length: x\r\n\r\n",
        "content-length",
    ),
    "bad-version": (b"POST /v1/completions HTTP/9.9\r\nHost: t\r\n\r\n", None),
    "not-http": (b"hello\r\n\r\n", None),
    "long-header": (
        b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",
        None,
    ),
    "control-char-in-a-key": (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\n"
        b"Authorization: Bearer sk-SECRETKEY123\x01\r\nContent-Length: 2\r\n\r\n{}",
        "authorization",
    ),
}


async def _exchange(port: int, data: bytes) -> bytes:
    """Send ``data`` on a fresh connection; everything read until the server closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        return await asyncio.wait_for(reader.read(), 5)  # until EOF: the server closed
    finally:
        writer.close()


@pytest.mark.parametrize("lean_server", [True, False])
@pytest.mark.parametrize("case", sorted(_MALFORMED_HEADS))
async def test_a_malformed_request_head_gets_a_json_400_and_a_closed_connection(
    case: str, lean_server: bool, caplog: pytest.LogCaptureFixture
) -> None:
    data, param = _MALFORMED_HEADS[case]
    manager, _, _ = make_manager(1)
    await manager.start()
    runner, port = await start_gateway(manager, GatewayConfig(lean_server=lean_server))
    try:
        with caplog.at_level(logging.DEBUG):
            raw = await _exchange(port, data)
        text = manager.prometheus_metrics().decode()
    finally:
        await runner.cleanup()
        await manager.stop()
    # counted, and access-logged under its answer's id, as the app's own error answers
    assert 'sage_llm_http_errors_total{route="other",status="400"} 1.0' in text
    access = [r.getMessage() for r in caplog.records if r.name == "sage_llm.gateway.access"]
    assert len(access) == 1 and " status=400 " in access[0], access
    logged = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
    assert "SECRETKEY" not in logged and not any(r.exc_info for r in caplog.records)
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].split(" ", 2)[1] == "400", raw
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    assert headers["content-type"].startswith("application/json")
    assert headers["connection"].lower() == "close"
    assert len(headers["x-request-id"]) == 32
    error = json.loads(body[: int(headers["content-length"])])["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", 400, param)
    assert error["message"].startswith("malformed HTTP request: ")
    assert "b'" not in error["message"]  # the client's bytes are not echoed back
    assert headers["x-request-id"] in logged  # the answer's id, in one line of the log
    assert f"request_id={headers['x-request-id']} " in access[0]


async def test_an_applications_own_ctrl_c_handler_is_left_alone() -> None:
    from sage_llm.gateway.server import _watch_signals

    loop = asyncio.get_running_loop()
    seen: list[str] = []
    loop.add_signal_handler(signal.SIGINT, lambda: seen.append("mine"))
    try:
        undo = _watch_signals(asyncio.Event(), asyncio.Event(), asyncio.Event())
        assert undo is not None
        os.kill(os.getpid(), signal.SIGINT)
        await asyncio.sleep(0.05)
        undo()
        os.kill(os.getpid(), signal.SIGINT)
        await asyncio.sleep(0.05)
        assert seen == ["mine", "mine"]  # before and after: still the application's
    finally:
        loop.remove_signal_handler(signal.SIGINT)


async def test_an_ignored_ctrl_c_stays_ignored() -> None:
    """A gateway started with Ctrl-C ignored (nohup, a script's background job) keeps it
    ignored: it stops on SIGTERM, as such jobs are stopped."""
    from sage_llm.gateway.server import _watch_signals

    inherited = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        undo = _watch_signals(asyncio.Event(), asyncio.Event(), asyncio.Event())
        assert undo is not None
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        undo()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, inherited)


_LONG_HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: t\r\n" + b"".join(
    b"X-H%d: %b\r\n" % (n, b"a" * 170) for n in range(100)
)
"""An unfinished head longer than the lean front reads itself (it hands it to aiohttp)."""


@pytest.mark.parametrize("case", ["long-head", "after-handover", "aiohttp-only"])
def test_a_head_slow_to_arrive_gets_a_408_on_either_front(
    case: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``read_timeout_s`` times heads on connections aiohttp owns too (it had timed only
    bodies there): a head handed over unfinished by the lean front (counted from its first
    byte), a head after another request on a connection aiohttp took over, and any head
    with ``lean_server = false``."""
    settings = GatewayConfig(read_timeout_s=5.0, lean_server=case != "aiohttp-only")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with serve(1, settings=settings) as gw:
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            if case == "after-handover":
                writer.write(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200 ")
                await reader.readexactly(int(head.lower().split(b"content-length: ")[1][:2]))
            started = loop.time()
            if case == "aiohttp-only":  # the request line in two reads: both go to the log
                writer.write(b"POST /v1/com")
                await asyncio.sleep(0.3)
                writer.write(b"pletions HTTP/1.1\r\n")
            else:
                writer.write(
                    _LONG_HEAD if case == "long-head" else b"POST /v1/completions HTTP/1.1\r\n"
                )
            answer = asyncio.ensure_future(reader.read())  # all of it, until closed
            for n in range(4):  # a line a second, no end of head
                await asyncio.sleep(1.0)
                writer.write(b"X-Z%d: 1\r\n" % n)
            raw = await asyncio.wait_for(answer, 60.0)
            waited = loop.time() - started
            writer.close()
            text = gw.manager.prometheus_metrics().decode()
        assert raw.startswith(b"HTTP/1.1 408 "), raw
        assert 5.0 <= waited <= 5.5 + 0.01  # the sweep: at most 10% late
        head, _, body = raw.partition(b"\r\n\r\n")
        assert b"\r\nconnection: close" in head.lower() and b"\r\nx-request-id: " in head.lower()
        error = json.loads(body)["error"]
        assert (error["type"], error["code"]) == ("timeout_error", 408)
        assert error["message"] == "the request did not arrive within 5 s"
        assert 'sage_llm_http_errors_total{route="/v1/completions",status="408"} 1.0' in text
        lines = [r.getMessage() for r in caplog.records if r.name == "sage_llm.gateway.access"]
        assert sum("path=/v1/completions status=408" in line for line in lines) == 1, lines

    with caplog.at_level(logging.INFO, logger="sage_llm.gateway.access"):
        run_virtual(main())


def test_a_timed_out_head_of_an_unknown_path_is_counted_under_route_other() -> None:
    """A 408's route label is bounded as every other's: the head's path is no label."""

    async def main() -> None:
        settings = GatewayConfig(read_timeout_s=1.0, lean_server=False)
        async with serve(1, settings=settings) as gw:
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(b"GET /scan-0 HTTP/1.1\r\n")  # the head never ends
            raw = await asyncio.wait_for(reader.read(), 30.0)
            writer.close()
            text = gw.manager.prometheus_metrics().decode()
        assert raw.startswith(b"HTTP/1.1 408 "), raw
        assert 'sage_llm_http_errors_total{route="other",status="408"} 1.0' in text
        assert "/scan-0" not in text

    run_virtual(main())


def test_a_lean_408_answers_under_a_fresh_id_when_the_head_gave_a_bad_one() -> None:
    async def main() -> None:
        async with serve(1, settings=GatewayConfig(read_timeout_s=1.0)) as gw:
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(
                b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nx-request-id: bad id<s>\r\n"
                b"Content-Length: 50\r\n\r\n{"
            )  # the body never ends
            raw = await asyncio.wait_for(reader.read(), 30.0)
            writer.close()
        head = raw.partition(b"\r\n\r\n")[0].decode().lower()
        assert head.startswith("http/1.1 408 "), raw
        (rid,) = [line[len("x-request-id: ") :] for line in head.split("\r\n")
                  if line.startswith("x-request-id: ")]  # fmt: skip
        assert re.fullmatch("[0-9a-f]{32}", rid), rid

    run_virtual(main())


@pytest.mark.parametrize("lean_server", [True, False])
def test_a_head_in_pieces_within_the_limit_is_served_and_idle_time_is_not_timed(
    lean_server: bool,
) -> None:
    async def main() -> None:
        settings = GatewayConfig(read_timeout_s=5.0, lean_server=lean_server)
        async with serve(1, settings=settings) as gw:
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            for piece in (b"GET /health HTTP/1.1\r\n", b"Host: t\r\n", b"\r\n"):
                writer.write(piece)  # the whole head within 4 s of its first byte
                await asyncio.sleep(2.0)
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 "), head
            await reader.readexactly(int(head.lower().split(b"content-length: ")[1][:2]))
            with pytest.raises(TimeoutError):  # idle, kept alive: no 408
                await asyncio.wait_for(reader.read(1), 20.0)
            writer.write(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
            writer.close()

    run_virtual(main())


def test_heads_go_untimed_with_a_warning_on_an_aiohttp_without_the_handler_state(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The head timer reads aiohttp's connection handler state between requests; an
    aiohttp that keeps it otherwise gets no head timing (and a warning), not a broken
    connection handler."""
    from aiohttp import web

    from sage_llm.gateway.server import json_error_protocols

    async def main() -> None:
        server = web.Server(lambda request: web.Response())  # type: ignore[arg-type,return-value]
        timed = json_error_protocols(server, None, 5.0)()
        assert type(timed).heads is not None  # type: ignore[attr-defined]
        monkeypatch.setattr(web.RequestHandler, "__slots__", ("_other",))
        untimed = json_error_protocols(server, None, 5.0)()
        assert type(untimed).heads is None  # type: ignore[attr-defined]

    with caplog.at_level(logging.WARNING, logger="sage_llm.gateway"):
        run_virtual(main())
    assert any("are not timed" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1", True),
        ("LOCALHOST", True),
        ("::1", True),
        ("0.0.0.0", False),
        ("", False),
    ],
)
def test_the_open_gateway_warning_knows_loopback_hosts_however_written(
    host: str, loopback: bool
) -> None:
    from sage_llm.gateway.server import _loopback_only

    assert asyncio.run(_loopback_only(host)) is loopback


@pytest.mark.parametrize("route", ["health", "completions"])
@pytest.mark.parametrize("lean_server", [True, False])
async def test_answers_on_kept_alive_connections_say_close_once_the_gateway_stops(
    lean_server: bool, route: str
) -> None:
    """From ``stop_accepting`` on, every answer says ``Connection: close``, the aiohttp
    front's (every route but the lean ones, or all of them) as the lean front's."""
    manager, _, _ = make_manager(1)
    site, port = await start_gateway(
        manager, GatewayConfig(lean_server=lean_server), manage_lifecycle=True
    )
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        request = b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n"
        if route == "completions":  # on the lean front when it is on
            body = json.dumps(completion_body(max_tokens=2)).encode()
            request = (
                b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json"
                b"\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)
            )
        for stopping in (False, True):
            if stopping:
                site.stop_accepting()
            writer.write(request)
            head = (await reader.readuntil(b"\r\n\r\n")).lower()
            assert head.startswith(b"http/1.1 200 "), head
            assert (b"\r\nconnection: close" in head) is stopping, head
            await reader.readexactly(int(head.split(b"content-length: ")[1].split(b"\r\n")[0]))
        assert await reader.read() == b""  # closed after the answer
        writer.close()
    finally:
        await site.cleanup()


async def test_a_caller_given_stop_event_shuts_the_gateway_down_and_keeps_its_signals() -> None:
    """With ``stop``, the caller (a launcher) keeps SIGTERM and SIGHUP: the gateway never
    touches them (their handlers stay in place, never left to the default action between
    the caller's and the gateway's), and setting ``stop`` drains it as SIGTERM would."""
    loop = asyncio.get_running_loop()
    noted: list[str] = []
    loop.add_signal_handler(signal.SIGTERM, noted.append, "term")
    try:
        before = signal.getsignal(signal.SIGTERM)
        manager, probes, _ = make_manager(1, hold=lambda rid: rid == "in-flight")
        port, ready, stop = _free_port(), asyncio.Event(), asyncio.Event()
        config = GatewayConfig(port=port)
        server = asyncio.create_task(run_gateway(manager, config, ready=ready, stop=stop))
        await asyncio.wait_for(ready.wait(), 10)
        assert signal.getsignal(signal.SIGTERM) is before
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"http://127.0.0.1:{port}/v1/completions",
                json=completion_body(stream=True),
                headers={"x-request-id": "in-flight"},
            ) as stream:
                await stream.content.readline()
                os.kill(os.getpid(), signal.SIGTERM)  # the caller's: noted, no shutdown
                await asyncio.sleep(0.05)
                assert noted == ["term"] and not server.done()
                stop.set()
                await asyncio.sleep(0.05)
                assert not server.done()  # draining: the stream goes on
                probes["sim-0"].gate.set()
                events = await read_events(stream)
            await asyncio.wait_for(server, 10)
        assert events[-1] == "[DONE]" and not manager.is_running
        assert signal.getsignal(signal.SIGTERM) is before
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def test_a_pipelined_heads_408_names_no_method_it_did_not_see(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A head begun in the read that ended the request before it (its first bytes out of
    the timer's sight) is timed from its next read, and its 408 is logged with ``-`` for
    the method and path, not with a fragment of that read."""
    settings = GatewayConfig(read_timeout_s=2.0, lean_server=False)

    async def main() -> None:
        async with serve(1, settings=settings) as gw:
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\nPOST /v1/comp")
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 ")
            await asyncio.sleep(1.0)
            writer.write(b"letions HTTP/1.1\r\n")
            raw = await asyncio.wait_for(reader.read(), 60.0)
            writer.close()
        assert b"HTTP/1.1 408 " in raw, raw
        lines = [r.getMessage() for r in caplog.records if r.name == "sage_llm.gateway.access"]
        assert any("method=- path=- status=408" in line for line in lines), lines

    with caplog.at_level(logging.INFO, logger="sage_llm.gateway.access"):
        run_virtual(main())


def test_an_error_outside_the_app_is_a_logged_json_500_that_closes_its_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """What fails outside the app's middlewares gets the JSON 500, is logged at ERROR with
    its traceback and counted, and its connection closes (as its ``Connection: close``
    says), the request being well formed and kept alive or not."""
    from aiohttp import web

    from sage_llm.gateway.server import json_error_protocols

    async def broken(request: web.BaseRequest) -> web.StreamResponse:
        raise RuntimeError("broken outside the app")

    counted: list[tuple[str, int]] = []

    async def main() -> None:
        server = web.Server(broken)
        protocol = json_error_protocols(
            server, lambda route, status: counted.append((route, status))
        )
        listener = await asyncio.get_running_loop().create_server(protocol, "127.0.0.1", 0)
        port = int(listener.sockets[0].getsockname()[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
            raw = await asyncio.wait_for(reader.read(), 30.0)  # until closed (kept alive: never)
        finally:
            writer.close()
            listener.close()
            await server.shutdown(1.0)
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 500 "), raw
        assert b"\r\nconnection: close" in head.lower()
        error = json.loads(body)["error"]
        assert (error["type"], error["code"]) == ("internal_error", 500)

    with caplog.at_level(logging.INFO, logger="sage_llm.gateway"):
        run_virtual(main())
    assert counted == [("other", 500)]
    (failed,) = [r for r in caplog.records if "failed outside the app" in r.getMessage()]
    assert failed.levelno == logging.ERROR and failed.exc_info is not None


@pytest.mark.parametrize(
    ("addresses", "loopback"),
    [(["127.0.0.1", "::1"], True), (["127.0.0.1", "192.0.2.7"], False), ([], False)],
)
async def test_a_host_name_is_loopback_only_when_every_address_it_binds_is(
    addresses: list[str], loopback: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A name that resolves to a loopback address and another binds both: the gateway
    can be reached from beyond this machine."""
    from sage_llm.gateway.server import _loopback_only

    async def resolve(host: str, port: object, **kwargs: object) -> list[tuple[object, ...]]:
        assert host == "gateway.test"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, 0)) for a in addresses]

    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", resolve)
    assert await _loopback_only("gateway.test") is loopback


async def test_a_host_name_that_does_not_resolve_is_not_taken_for_loopback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sage_llm.gateway.server import _loopback_only

    async def resolve(host: str, port: object, **kwargs: object) -> list[tuple[object, ...]]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", resolve)
    assert await _loopback_only("gateway.test") is False  # the open-gateway warning is given


@pytest.mark.parametrize("keys", ["none", "file", "env", "keys_file", "tenant"])
async def test_a_gateway_open_beyond_loopback_is_warned_of_unless_it_has_api_keys(
    keys: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The warning that anyone may use the gateway is logged only without API keys, from
    the file (``gateway.api_keys``), the environment (``gateway.api_keys_env``), a keys
    file (``gateway.api_keys_file``) or a tenant."""
    from sage_llm.gateway import server as server_module

    async def reachable(host: str) -> bool:
        return False  # as a bind beyond loopback, without binding one in a test

    monkeypatch.setattr(server_module, "_loopback_only", reachable)
    monkeypatch.setenv("SAGE_TEST_KEYS", "k1")
    keys_file = tmp_path / "keys"
    keys_file.write_text("k1\n")
    config = GatewayConfig(
        port=_free_port(),
        api_keys=("k1",) if keys == "file" else (),
        api_keys_env="SAGE_TEST_KEYS" if keys == "env" else None,
        api_keys_file=str(keys_file) if keys == "keys_file" else None,
        tenants=(TenantConfig("t", api_key="kt"),) if keys == "tenant" else (),
    )
    manager, _, _ = make_manager(1)
    ready, stop = asyncio.Event(), asyncio.Event()
    with caplog.at_level(logging.WARNING, logger="sage_llm.gateway"):
        server = asyncio.create_task(run_gateway(manager, config, ready=ready, stop=stop))
        await asyncio.wait_for(ready.wait(), 10)
        stop.set()
        await asyncio.wait_for(server, 10)
    warned = any("has no API key" in r.getMessage() for r in caplog.records)
    assert warned is (keys == "none")


async def test_the_gateway_binds_127_0_0_1_unless_told_otherwise() -> None:
    manager, _, _ = make_manager(1)
    site, port = await start_gateway(manager, manage_lifecycle=True)
    try:
        assert site.runner.app[ADMIN_KEY].listening == ("127.0.0.1", port)
    finally:
        await site.cleanup()


async def test_run_gateway_listens_where_host_and_port_say_over_the_settings(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``host``/``port`` override the settings' (192.0.2.1 is no address of this machine)."""
    manager, _, _ = make_manager(1)
    port = _free_port()
    ready = asyncio.Event()
    settings = GatewayConfig(host="192.0.2.1", port=port + 1)
    caplog.set_level(logging.INFO, "sage_llm.gateway")
    server = asyncio.create_task(
        run_gateway(manager, settings, host="127.0.0.1", port=port, ready=ready)
    )
    waiting = asyncio.create_task(ready.wait())
    await asyncio.wait((server, waiting), timeout=10, return_when=asyncio.FIRST_COMPLETED)
    try:
        assert ready.is_set(), server.exception() if server.done() else "not listening"
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{port}/health") as r,
        ):
            assert r.status == 200
    finally:
        waiting.cancel()
        server.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await server
    assert f"gateway listening on http://127.0.0.1:{port}" in caplog.messages


async def test_the_settings_shutdown_timeout_bounds_how_long_a_shutdown_waits() -> None:
    """``gateway.shutdown_timeout_s``: how long in-flight requests may take to finish (then
    what is left ends with a 503), not run_gateway's 30 s default."""
    manager, probes, _ = make_manager(1, hold=lambda rid: True, hold_after=1)
    port = _free_port()
    ready = asyncio.Event()
    settings = GatewayConfig(shutdown_timeout_s=0.2)
    server = asyncio.create_task(run_gateway(manager, settings, port=port, ready=ready))
    await asyncio.wait_for(ready.wait(), 10)
    async with aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{port}/v1/completions"
        whole = asyncio.create_task(http.post(url, json=completion_body()))
        await asyncio.wait_for(probes["sim-0"].started_event.wait(), 5)
        server.cancel()
        started = asyncio.get_running_loop().time()
        async with await whole as resp:
            assert resp.status == 503
        with pytest.raises(asyncio.CancelledError):
            await server
        assert asyncio.get_running_loop().time() - started < 10  # 0.2 s, far from 30 s


@pytest.mark.parametrize("lean_server", [True, False])
async def test_start_gateway_cleanup_lets_in_flight_requests_finish(lean_server: bool) -> None:
    """``await site.cleanup()`` stops the same graceful way (docs/gateway.md): a stream in
    flight on either front runs to its end."""
    manager, probes, _ = make_manager(1, hold=lambda rid: rid == "in-flight")
    settings = GatewayConfig(lean_server=lean_server)
    site, port = await start_gateway(manager, settings, manage_lifecycle=True)
    assert site.lean is lean_server
    url = f"http://127.0.0.1:{port}/v1/completions"
    async with aiohttp.ClientSession() as http:
        headers = {"x-request-id": "in-flight"}
        async with http.post(url, json=completion_body(stream=True), headers=headers) as stream:
            await stream.content.readline()  # its first chunk
            cleanup = asyncio.create_task(site.cleanup())
            await asyncio.sleep(0)  # (the cleanup has begun)
            probes["sim-0"].gate.set()
            events = await read_events(stream)
        await cleanup
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert probes["sim-0"].aborted == [] and not manager.is_running


@pytest.mark.parametrize("speed", [10.0, 1000.0])  # running at the deadline, or done
@pytest.mark.parametrize("lean_server", [True, False])
async def test_a_shutdown_with_streams_left_unread_takes_the_shutdown_timeout_once(
    lean_server: bool, speed: float, caplog: pytest.LogCaptureFixture
) -> None:
    """docs/operations.md: the whole shutdown takes the drain timeout at most (plus a
    moment), on either front, even when clients stopped reading their streams; the streams
    it cuts are logged as cancelled by the shutdown, and nothing is logged as unretrieved."""
    manager, _, _ = make_manager(1, speed=speed)
    port = _free_port()
    ready, stop = asyncio.Event(), asyncio.Event()
    settings = GatewayConfig(shutdown_timeout_s=2.0, lean_server=lean_server)
    caplog.set_level(logging.INFO)
    server = asyncio.create_task(run_gateway(manager, settings, port=port, ready=ready, stop=stop))
    await asyncio.wait_for(ready.wait(), 10)
    loop = asyncio.get_running_loop()
    body = json.dumps(
        completion_body(max_tokens=7000, ignore_eos=True, logprobs=5, stream=True)
    ).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    clients = []
    try:
        for _ in range(2):  # each reads nothing of its stream
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", port))
            await loop.sock_sendall(sock, head + body)
            clients.append(sock)
        await asyncio.sleep(0.5)  # (their answers fill the buffers)
        stop.set()
        started = loop.time()
        await asyncio.wait_for(server, 30)
        took = loop.time() - started
    finally:
        for sock in clients:
            sock.close()
    assert took < 3.5, f"shutdown took {took:.1f} s for a 2 s drain timeout"
    text = caplog.text
    assert "Future exception was never retrieved" not in text
    assert "call start()" not in text


async def test_more_than_one_worker_is_warned_of_and_one_process_serves(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = GatewayConfig(port=_free_port(), workers=4)
    manager, _, _ = make_manager(1)
    ready, stop = asyncio.Event(), asyncio.Event()
    with caplog.at_level(logging.WARNING, logger="sage_llm.gateway"):
        server = asyncio.create_task(run_gateway(manager, config, ready=ready, stop=stop))
        await asyncio.wait_for(ready.wait(), 10)
        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{config.port}/v1/completions"
            async with http.post(url, json=completion_body()) as r:
                assert r.status == 200
        stop.set()
        await asyncio.wait_for(server, 10)
    said = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert said == [
        "gateway.workers = 4 ignored: one process serves one control plane "
        "(its queue and fleet state are not shared between processes)"
    ]


def test_ctrl_c_while_the_gateway_starts_interrupts_it_and_stops_the_manager(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ctrl-C before the gateway listens is Python's own way out (``KeyboardInterrupt``),
    as it always was; the manager already started is stopped on the way, and Ctrl-C is
    Python's own again after."""
    from sage_llm.gateway import server as server_module

    manager, _, _ = make_manager(1)
    real_serve_app = server_module.serve_app

    async def serve_app_interrupted(*args: object, **kwargs: object) -> object:
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the gateway binds its socket
        await asyncio.sleep(1.0)
        return await real_serve_app(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(server_module, "serve_app", serve_app_interrupted)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            asyncio.run(run_gateway(manager, GatewayConfig(port=_free_port())))
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, inherited)
    assert not manager.is_running


def test_a_third_ctrl_c_exits_at_once_ending_the_requests_in_flight(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Ctrl-C three times: a shutdown, the requests in flight ended now, then Python's own
    way out (``KeyboardInterrupt``), logged; the manager is stopped on the way, ending the
    request still in flight (the engine's work aborted)."""
    manager, probes, _ = make_manager(1, hold=lambda rid: rid == "held")
    port = _free_port()

    async def main() -> None:
        ready = asyncio.Event()
        settings = GatewayConfig(port=port, shutdown_timeout_s=60)
        server = asyncio.create_task(run_gateway(manager, settings, ready=ready))
        await asyncio.wait_for(ready.wait(), 10)
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"http://127.0.0.1:{port}/v1/completions",
                json=completion_body(stream=True),
                headers={"x-request-id": "held"},
            ) as stream,
        ):
            await stream.content.readline()
            for _ in range(3):
                os.kill(os.getpid(), signal.SIGINT)
            await asyncio.wait_for(server, 10)

    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with (
            caplog.at_level(logging.INFO, logger="sage_llm.gateway"),
            pytest.raises(KeyboardInterrupt),
        ):
            asyncio.run(main())
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, inherited)
    messages = [r.getMessage() for r in caplog.records if r.name == "sage_llm.gateway"]
    assert "Ctrl-C a third time: exiting now" in messages
    assert not manager.is_running
    assert probes["sim-0"].aborted == ["held"]


def test_run_gateway_serves_from_a_thread_other_than_the_main_one() -> None:
    """Signals can be watched only on the main thread: run from another (an application's
    own thread), the gateway serves, leaves the process's signal handling as it was, and
    stops when cancelled."""
    import threading

    manager, _, _ = make_manager(1)
    port = _free_port()
    signals = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]
    before = [signal.getsignal(s) for s in signals]
    statuses: list[int] = []
    failures: list[BaseException] = []

    async def main() -> None:
        ready = asyncio.Event()
        server = asyncio.create_task(run_gateway(manager, GatewayConfig(port=port), ready=ready))
        await asyncio.wait_for(ready.wait(), 10)
        assert [signal.getsignal(s) for s in signals] == before
        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{port}/v1/completions"
            async with http.post(url, json=completion_body()) as resp:
                statuses.append(resp.status)
        server.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await server

    def in_thread() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join(30)
    assert not thread.is_alive()
    assert failures == []
    assert statuses == [200]
    assert not manager.is_running
    assert [signal.getsignal(s) for s in signals] == before


def test_an_error_outside_the_app_after_its_answer_began_closes_the_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A failure outside the app's middlewares once the answer's head has left cannot be
    answered with a second response: the client gets what was written, then the connection
    closes (no JSON 500 glued to the body); it is logged and counted."""
    from aiohttp import web

    from sage_llm.gateway.server import json_error_protocols

    async def broken(request: web.BaseRequest) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await resp.prepare(request)
        await resp.write(b"partial")
        raise RuntimeError("broken after its answer began")

    counted: list[tuple[str, int]] = []

    async def main() -> bytes:
        server = web.Server(broken)
        protocol = json_error_protocols(
            server, lambda route, status: counted.append((route, status))
        )
        listener = await asyncio.get_running_loop().create_server(protocol, "127.0.0.1", 0)
        port = int(listener.sockets[0].getsockname()[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
            return await asyncio.wait_for(reader.read(), 30.0)  # until closed
        finally:
            writer.close()
            listener.close()
            await server.shutdown(1.0)

    with caplog.at_level(logging.INFO, logger="sage_llm.gateway"):
        raw = run_virtual(main())
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), raw
    assert raw.count(b"HTTP/1.1 ") == 1 and b"internal_error" not in raw
    assert b"partial" in body
    assert counted == [("other", 500)]
    (failed,) = [r for r in caplog.records if "failed outside the app" in r.getMessage()]
    assert failed.levelno == logging.ERROR and failed.exc_info is not None


def test_a_head_handed_over_in_the_turn_a_sweep_runs_is_still_timed() -> None:
    """A head the lean front hands to aiohttp unfinished is timed from its first byte, even
    when a sweep of the heads runs before aiohttp's connection handler has begun to wait
    for it (the same turn of the loop): it had been taken for a request being served,
    dropped from the timing, and left open for as long as aiohttp's keep-alive."""
    from aiohttp import web

    from sage_llm.gateway.lean import LeanServer
    from sage_llm.gateway.server import json_error_protocols

    async def never(request: web.BaseRequest) -> web.StreamResponse:
        raise AssertionError("no request is served")

    async def main() -> tuple[bytes, float]:
        loop = asyncio.get_running_loop()
        server = web.Server(never)
        fallback = json_error_protocols(server, None, read_timeout_s=5.0)

        def handed_over() -> asyncio.Protocol:
            protocol = fallback()
            heads = type(protocol).heads  # type: ignore[attr-defined]
            loop.call_soon(heads._look)  # a sweep, due in this turn, runs first
            return protocol

        async def no_handler(request: object, conn: object) -> None:
            raise AssertionError("not a lean request")

        lean = LeanServer(
            no_handler, handed_over, routes=frozenset({"/v1/completions"}),
            max_body_bytes=1024, read_timeout_s=5.0,
        )  # fmt: skip
        client, end = socket.socketpair()
        client.setblocking(False)
        await loop.connect_accepted_socket(lean, end)
        reader, writer = await asyncio.open_connection(sock=client)
        started = loop.time()
        writer.write(_LONG_HEAD)  # longer than the lean front reads: handed over unfinished
        try:
            raw = await asyncio.wait_for(reader.read(), 200.0)
        finally:
            writer.close()
            await server.shutdown(1.0)
        return raw, loop.time() - started

    raw, waited = run_virtual(main())
    assert raw.startswith(b"HTTP/1.1 408 "), raw
    assert 5.0 <= waited <= 5.5 + 0.01
