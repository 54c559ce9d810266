"""The hot routes' handler on the lean front (``sage_llm.gateway.lean_routes``): what it
counts and logs when its client is gone before the answer, and a failure after a stream
began."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, cast

import pytest

from sage_llm.gateway import lean_routes
from sage_llm.gateway.lean import LeanConnection, LeanRequest
from sage_llm.gateway.lean_routes import COMPLETIONS_PATH, LeanRoutes
from sage_llm.gateway.settings import ResolvedGateway
from tests.gateway.harness import completion_body, make_manager, serve


class _GoneConnection:
    """A connection whose client went away before its answer could leave (its transport
    closing, its loss not yet seen): writing the answer raises, as the lean front's does."""

    answered = False

    def respond(
        self, status: int, body: bytes, *, content_type: str, headers: Mapping[str, str]
    ) -> None:
        self.answered = True
        raise ConnectionResetError("the client closed the connection")


@pytest.mark.parametrize(
    "body", [json.dumps(completion_body()).encode(), b"{"], ids=["answer", "error"]
)
async def test_an_answer_its_client_left_before_is_counted_and_logged_as_a_499(
    body: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """A whole answer (or an error answer) that finds its client gone is a 499, as a
    client gone while the request ran: counted and access-logged so."""
    manager, _, _ = make_manager(1)
    routes = LeanRoutes(manager, ResolvedGateway())
    request = LeanRequest("POST", COMPLETIONS_PATH, {"x-request-id": "gone-1"}, body)
    async with manager:
        with caplog.at_level(logging.INFO, logger="sage_llm.gateway.access"):
            await routes(request, cast(LeanConnection, _GoneConnection()))
        text = manager.prometheus_metrics().decode()
    assert 'sage_llm_http_errors_total{route="/v1/completions",status="499"} 1.0' in text
    lines = [r.getMessage() for r in caplog.records if r.name == "sage_llm.gateway.access"]
    assert len(lines) == 1 and "request_id=gone-1 " in lines[0], lines
    assert " status=499 " in lines[0], lines


async def test_a_failure_after_a_stream_began_writes_no_second_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stream's 200 has left: a failure after it is counted as a 500, and the stream
    ends (its connection closes) without an error answer written into its body."""

    async def relay_then_fail(open_sink: Callable[[], Awaitable[Any]], *args: object) -> int | None:
        sink = await open_sink()
        await sink.write(b'data: {"id": "x"}\n\n')
        raise RuntimeError("failed after the stream began")

    monkeypatch.setattr(lean_routes, "relay_stream", relay_then_fail)
    data = json.dumps(completion_body(stream=True)).encode()
    async with serve(1) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        try:
            writer.write(
                b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%b" % (len(data), data)
            )
            raw = await asyncio.wait_for(reader.read(), 10)  # until closed: it is unended
        finally:
            writer.close()
        text = gw.manager.prometheus_metrics().decode()
    assert raw.startswith(b"HTTP/1.1 200 "), raw
    assert raw.count(b"HTTP/1.1 ") == 1 and b"internal_error" not in raw, raw
    assert 'sage_llm_http_errors_total{route="/v1/completions",status="500"} 1.0' in text


async def test_an_error_answered_on_the_lean_front_is_counted() -> None:
    """A 400 (the lowest error status) counts in ``sage_llm_http_errors_total``."""
    async with serve(1) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        try:
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\n\r\n{")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        finally:
            writer.close()
        text = gw.manager.prometheus_metrics().decode()
    assert head.startswith(b"HTTP/1.1 400 ") and b"Server: sage-llm" in head, head
    assert 'sage_llm_http_errors_total{route="/v1/completions",status="400"} 1.0' in text
