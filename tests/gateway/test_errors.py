"""Every error path answers with an OpenAI-style JSON body and the right status."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from sage_llm.config import GatewayConfig
from sage_llm.errors import QueueFullError
from sage_llm.gateway.errors import error_middleware, retry_after_header, sage_error_response
from sage_llm.sim.clock import run_virtual
from sage_llm.types import RequestStatus
from tests.factories import MODEL, make_metadata
from tests.gateway.harness import chat_body, completion_body, serve


def _assert_error(body: Any, status: int, param: str | None = None) -> None:
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == status
    assert isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param


BAD_COMPLETIONS = [
    ({"prompt": "hi"}, "model"),
    ({"model": MODEL}, "prompt"),
    ({"model": MODEL, "prompt": 42}, "prompt"),
    ({"model": MODEL, "prompt": ["a", [1]]}, "prompt"),  # several, of mixed kinds
    ({"model": MODEL, "prompt": []}, "prompt"),
    ({"model": MODEL, "prompt": [""]}, "prompt"),
    ({"model": MODEL, "prompt": ["a", ""]}, "prompt"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": "8"}, "max_tokens"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 100_000}, "max_tokens"),
    ({"model": MODEL, "prompt": "hi", "temperature": 2.5}, "temperature"),
    ({"model": MODEL, "prompt": "hi", "temperature": "hot"}, "temperature"),
    ({"model": MODEL, "prompt": "hi", "top_p": 0}, "top_p"),
    ({"model": MODEL, "prompt": "hi", "top_p": 1.5}, "top_p"),
    ({"model": MODEL, "prompt": "hi", "n": 0}, "n"),
    ({"model": MODEL, "prompt": "hi", "stream": "yes"}, "stream"),
    ({"model": MODEL, "prompt": "hi", "stream": 1}, "stream"),
    ({"model": MODEL, "prompt": "hi", "stop": [1]}, "stop"),
    ({"model": MODEL, "prompt": "hi", "priority": "urgent"}, "priority"),
    ({"model": MODEL, "prompt": "hi", "slo_deadline_ms": -5}, "slo_deadline_ms"),
    ({"model": MODEL, "prompt": "word " * 200}, "prompt"),
    ({"model": MODEL, "prompt": "hi", "kv_transfer_params": {}}, "kv_transfer_params"),
]


async def test_bad_completion_fields_give_400_naming_the_field() -> None:
    settings = GatewayConfig(max_tokens_limit=1024, max_prompt_tokens=100)
    async with serve(1, settings=settings) as gw, aiohttp.ClientSession() as http:
        for body, param in BAD_COMPLETIONS:
            async with http.post(gw.url("/v1/completions"), json=body) as r:
                assert r.status == 400, body
                _assert_error(await r.json(), 400, param)
        assert gw.probes["sim-0"].requests == []


BAD_CHATS: list[tuple[dict[str, object], str]] = [
    ({"messages": []}, "messages"),
    ({"messages": "hello"}, "messages"),
    ({"messages": [{"content": "no role"}]}, "messages[0].role"),
    ({"messages": [{"role": "", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"text": "no type"}]}]}, "messages[0].content[0]"),
    ({"messages": None}, "messages"),
    ({"logprobs": 3}, "logprobs"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"max_tokens": None, "max_completion_tokens": 9000}, "max_completion_tokens"),
    ({"max_tokens": 8, "max_completion_tokens": 9000}, "max_completion_tokens"),
]


async def test_bad_chat_fields_give_400() -> None:
    settings = GatewayConfig(max_tokens_limit=8192)
    async with serve(1, settings=settings) as gw, aiohttp.ClientSession() as http:
        for fields, param in BAD_CHATS:
            async with http.post(gw.url("/v1/chat/completions"), json=chat_body(**fields)) as r:
                assert r.status == 400, fields
                body = await r.json()
                _assert_error(body, 400, param)
                assert body["error"]["message"].startswith(f"{param}: ")
        assert gw.probes["sim-0"].requests == []


async def test_malformed_bodies_give_400() -> None:
    async with serve(1) as gw, aiohttp.ClientSession() as http:
        for data in (b"{not json", b"[1, 2]", b""):
            async with http.post(gw.url("/v1/completions"), data=data) as r:
                assert r.status == 400
                _assert_error(await r.json(), 400)
        async with http.post(
            gw.url("/v1/completions"), json=completion_body(), headers={"x-sage-slo-ms": "soon"}
        ) as r:
            _assert_error(await r.json(), 400, "x-sage-slo-ms")
        async with http.post(
            gw.url("/v1/completions"), json=completion_body(), headers={"x-sage-priority": "asap"}
        ) as r:
            _assert_error(await r.json(), 400, "x-sage-priority")
        async with http.post(
            gw.url("/v1/completions"),
            json=completion_body(),
            headers={"x-request-id": "bad id with spaces"},
        ) as r:
            _assert_error(await r.json(), 400, "x-request-id")
            assert r.headers["x-request-id"] != "bad id with spaces"


async def test_unknown_model_is_404_and_unknown_route_is_json() -> None:
    async with serve(1) as gw, aiohttp.ClientSession() as http:
        async with http.post(
            gw.url("/v1/completions"), json=completion_body() | {"model": "x"}
        ) as r:
            assert r.status == 404
            body = await r.json()
            _assert_error(body, 404)
            assert body["error"]["param"] == "model"
        async with http.get(gw.url("/v1/nothing-here")) as r:
            assert r.status == 404
            assert r.content_type == "application/json"
            _assert_error(await r.json(), 404)
        async with http.get(gw.url("/v1/completions")) as r:
            assert r.status == 405
            _assert_error(await r.json(), 405)
            assert "POST" in r.headers["Allow"]
        async with _client(gw) as client:
            with pytest.raises(openai.NotFoundError):
                await client.completions.create(model="missing", prompt="hi", max_tokens=2)


def _client(gw: Any, api_key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.url("/v1"), api_key=api_key, max_retries=0)


async def test_oversized_body_is_413() -> None:
    settings = GatewayConfig(max_body_bytes=2048)
    async with serve(1, settings=settings) as gw, aiohttp.ClientSession() as http:
        body = completion_body(prompt="x" * 5000)
        async with http.post(gw.url("/v1/completions"), json=body) as r:
            assert r.status == 413
            _assert_error(await r.json(), 413)
        async with http.post(gw.url("/v1/completions"), json=completion_body()) as r:
            assert r.status == 200


async def test_api_keys_are_required_when_configured() -> None:
    settings = GatewayConfig(api_keys=("key-one", "key-two"))
    async with serve(1, settings=settings) as gw, aiohttp.ClientSession() as http:
        async with http.post(gw.url("/v1/completions"), json=completion_body()) as r:
            assert r.status == 401
            assert r.headers["WWW-Authenticate"] == "Bearer"
            _assert_error(await r.json(), 401)
        wrong = {"Authorization": "Bearer key-three"}
        async with http.post(gw.url("/v1/completions"), json=completion_body(), headers=wrong) as r:
            assert r.status == 401
        async with http.get(gw.url("/v1/models"), headers={"Authorization": "Basic a2V5"}) as r:
            assert r.status == 401
        right = {"Authorization": "Bearer key-two"}
        async with http.post(gw.url("/v1/completions"), json=completion_body(), headers=right) as r:
            assert r.status == 200
        async with http.get(gw.url("/health")) as r:
            assert r.status == 200
        async with http.get(gw.url("/metrics")) as r:
            assert r.status == 200
        async with _client(gw, "key-three") as client:
            with pytest.raises(openai.AuthenticationError):
                await client.models.list()
        async with _client(gw, "key-one") as client:
            assert [m.id for m in (await client.models.list()).data] == [MODEL]


async def test_api_keys_from_the_environment() -> None:
    settings = GatewayConfig(api_keys_env="SAGE_TEST_KEYS")
    async with serve(1) as gw:
        from sage_llm.gateway.server import start_gateway

        runner, port = await start_gateway(
            gw.manager, settings, environ={"SAGE_TEST_KEYS": "env-key, other"}
        )
        try:
            async with aiohttp.ClientSession() as http:
                url = f"http://127.0.0.1:{port}/v1/models"
                async with http.get(url) as r:
                    assert r.status == 401
                async with http.get(url, headers={"Authorization": "Bearer other"}) as r:
                    assert r.status == 200
        finally:
            await runner.cleanup()


async def test_admin_token_rules() -> None:
    settings = GatewayConfig(admin_token="admin-secret", api_keys=("user-key",))
    async with serve(1, settings=settings) as gw, aiohttp.ClientSession() as http:
        async with http.get(gw.url("/admin/status")) as r:
            assert r.status == 401
            _assert_error(await r.json(), 401)
        for token in ("wrong", "user-key"):
            headers = {"Authorization": f"Bearer {token}"}
            async with http.get(gw.url("/admin/status"), headers=headers) as r:
                assert r.status == 403
                _assert_error(await r.json(), 403)
        headers = {"Authorization": "Bearer admin-secret"}
        async with http.get(gw.url("/admin/status"), headers=headers) as r:
            assert r.status == 200
        async with http.get(gw.url("/v1/models"), headers=headers) as r:
            assert r.status == 401  # the admin token is not an API key


async def test_queue_full_is_429_with_retry_after() -> None:
    async with serve(
        1, bound=1, max_queue_size=1, hold=lambda rid: rid.startswith("hold"), hold_after=0
    ) as gw:
        cp = gw.manager
        running = await cp.submit_request(make_metadata("hold-running"))
        await asyncio.wait_for(gw.probes["sim-0"].started_event.wait(), 5)
        assert await cp.get_request_status(running) is RequestStatus.RUNNING
        await cp.submit_request(make_metadata("queued"))
        async with (
            aiohttp.ClientSession() as http,
            http.post(gw.url("/v1/completions"), json=completion_body()) as r,
        ):
            assert r.status == 429
            body = await r.json()
            retry = int(r.headers["Retry-After"])
        _assert_error(body, 429)
        assert body["error"]["type"] == "rate_limit_error"
        assert retry >= 1
        async with _client(gw) as client:
            with pytest.raises(openai.RateLimitError):
                await client.completions.create(model=MODEL, prompt="hi", max_tokens=2)


async def test_an_engines_refusal_of_the_output_limit_names_the_field_the_client_gave() -> None:
    """A chat's ``max_completion_tokens`` reaches the engine as ``max_tokens``; when the
    engine refuses it (past the model's context: 8,192 tokens), the client's error names
    ``max_completion_tokens``, whole or streamed, as vLLM's own answer would."""
    async with serve(1) as gw, aiohttp.ClientSession() as http:
        for field in ("max_completion_tokens", "max_tokens"):
            for stream in (False, True):
                body = chat_body(**{field: 9000}, stream=stream)
                if field == "max_completion_tokens":
                    body["max_tokens"] = 3  # the newer name wins, in the refusal too
                async with http.post(gw.url("/v1/chat/completions"), json=body) as r:
                    assert r.status == 400, body
                    error = (await r.json())["error"]
                _assert_error({"error": error}, 400, field)
                assert "rejected the request" in error["message"]
                other = {"max_tokens", "max_completion_tokens"} - {field}
                assert other.pop() not in error["message"]


async def test_a_request_the_engine_refuses_is_400_naming_the_field_and_not_retried() -> None:
    # the simulated engine refuses a negative min_tokens, which the gateway passes through
    # unchecked (as an HTTP engine answers 400 to a prompt longer than its context): the
    # client's error, not the engine's
    async with serve(2) as gw, aiohttp.ClientSession() as http:
        for path, body in (
            ("/v1/completions", completion_body(min_tokens=-1)),
            ("/v1/chat/completions", chat_body(min_tokens=-1, stream=True)),
        ):
            async with http.post(gw.url(path), json=body) as r:
                assert r.status == 400
                answer = await r.json()
                _assert_error(answer, 400, "min_tokens")
                assert answer["error"]["type"] == "invalid_request_error"
                assert (
                    "rejected the request: min_tokens must be an integer >= 0"
                    in (answer["error"]["message"])
                )
        async with _client(gw) as client:
            with pytest.raises(openai.BadRequestError, match="min_tokens must be"):
                await client.completions.create(
                    model=MODEL, prompt="hi", max_tokens=2, extra_body={"min_tokens": -1}
                )
        # each went to one instance once, and neither instance is marked down for it
        assert sum(len(p.requests) for p in gw.probes.values()) == 3
        # ... but each ended failed on its instance, as sage_llm_requests_total counts it
        metrics = [gw.manager.get_instance_metrics(i) for i in ("sim-0", "sim-1")]
        assert all(m["failed_calls"] == 0 and m["is_healthy"] for m in metrics)
        assert sum(m["failed_requests"] for m in metrics) == 3


@pytest.mark.parametrize("lean_server", [True, False])
async def test_no_healthy_instance_is_503_and_logged_with_its_reason(
    lean_server: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sage_llm.manager")
    caplog.set_level(logging.INFO, logger="sage_llm.gateway")
    settings = GatewayConfig(lean_server=lean_server)
    async with serve(2, settings=settings) as gw, aiohttp.ClientSession() as http:
        for iid in ("sim-0", "sim-1"):
            gw.manager.drain_instance(iid)
        for path, body in (
            ("/v1/completions", completion_body()),
            ("/v1/chat/completions", chat_body(stream=True)),
        ):
            headers = {"x-request-id": "nowhere"}
            async with http.post(gw.url(path), json=body, headers=headers) as r:
                assert r.status == 503
                _assert_error(await r.json(), 503)
    failed = [r for r in caplog.records if "failed (503" in r.getMessage()]
    assert failed and failed[0].getMessage().startswith(
        "request nowhere failed (503 service_unavailable): "
    )
    # at INFO: in an outage every request gets one (the outage is logged as it happens)
    assert {r.levelno for r in failed} == {logging.INFO}
    assert any("instance sim-0 draining" in r.getMessage() for r in caplog.records)


async def test_a_503_while_instances_cool_down_says_when_to_retry() -> None:
    async with serve(2) as gw, aiohttp.ClientSession() as http:
        now = gw.manager.clock.now()
        for iid, cooldown in (("sim-0", 2.5), ("sim-1", 7.0)):
            breaker = gw.manager._registry.get(iid).breaker
            breaker.force_open(now, "test", request=True)
            breaker.open_until = now + cooldown
            gw.manager._registry.get(iid).healthy = False
        embeddings = {"model": MODEL, "input": "x"}
        for path, body in (("/v1/completions", completion_body()), ("/v1/embeddings", embeddings)):
            async with http.post(gw.url(path), json=body) as r:
                assert r.status == 503
                assert r.headers["Retry-After"] == "3"  # the nearest cool-down, rounded up
        gw.manager.drain_instance("sim-0")
        gw.manager.drain_instance("sim-1")
        said = []
        for path, body in (("/v1/completions", completion_body()), ("/v1/embeddings", embeddings)):
            async with http.post(gw.url(path), json=body) as r:
                assert r.status == 503 and "Retry-After" not in r.headers  # draining: no hint
                said.append((await r.json())["error"]["message"])
        assert said[0] == said[1]  # the same reason on both routes


@pytest.mark.parametrize("batching", [False, True], ids=["task", "here"])
@pytest.mark.parametrize("stream", [False, True])
async def test_request_timeout_is_504_and_cancels_the_request(stream: bool, batching: bool) -> None:
    settings = GatewayConfig(request_timeout_s=0.2)
    held = serve(1, settings=settings, hold=lambda rid: True, hold_after=0, batching=batching)
    async with held as gw:
        async with aiohttp.ClientSession() as http:
            headers = {"x-request-id": "too-slow"}
            body = completion_body(stream=stream)
            async with http.post(gw.url("/v1/completions"), json=body, headers=headers) as r:
                assert r.status == 504
                _assert_error(await r.json(), 504)
        result = await gw.manager.wait_for_result("too-slow", timeout=5)
        assert result.status is RequestStatus.CANCELLED
        await asyncio.wait_for(gw.probes["sim-0"].aborted_event.wait(), 5)
        assert gw.probes["sim-0"].aborted == ["too-slow"]


async def test_slo_deadline_bounds_the_request_too() -> None:
    async with serve(1, hold=lambda rid: True, hold_after=0) as gw:
        async with aiohttp.ClientSession() as http:
            headers = {"x-request-id": "deadline", "x-sage-slo-ms": "150"}
            async with http.post(
                gw.url("/v1/completions"), json=completion_body(), headers=headers
            ) as r:
                assert r.status == 504
        result = await gw.manager.wait_for_result("deadline", timeout=5)
        assert result.status is RequestStatus.CANCELLED


async def test_unexpected_exceptions_are_500_without_internals() -> None:
    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("secret internal detail")

    app = web.Application(middlewares=[error_middleware])
    app.router.add_get("/boom", broken)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{port}/boom") as r,
        ):
            assert r.status == 500
            text = await r.text()
            _assert_error(await r.json(), 500)
        assert "secret" not in text
    finally:
        await runner.cleanup()


async def test_a_redirect_a_handler_raises_is_answered_as_a_redirect() -> None:
    """An ``HTTPException`` below 400 is no failure: the error middleware lets it through
    (aiohttp answers the redirect, its ``Location`` kept), where an error status is JSON."""

    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPFound("/v1/models")

    async def missing(request: web.Request) -> web.Response:
        raise web.HTTPNotFound()

    app = web.Application(middlewares=[error_middleware])
    app.router.add_get("/old", moved)
    app.router.add_get("/missing", missing)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{port}"
            async with http.get(url + "/old", allow_redirects=False) as r:
                assert r.status == 302
                assert r.headers["Location"] == "/v1/models"
            async with http.get(url + "/missing") as r:
                assert r.status == 404
                _assert_error(await r.json(), 404)
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    ("seconds", "header"), [(None, "1"), (0.0, "1"), (0.2, "1"), (1.0, "1"), (2.1, "3")]
)
def test_retry_after_is_a_whole_number_of_seconds(seconds: float | None, header: str) -> None:
    assert retry_after_header(seconds) == header
    resp = sage_error_response(QueueFullError("full", retry_after_s=seconds))
    assert resp.status == 429
    assert resp.headers["Retry-After"] == header


@pytest.mark.parametrize("lean_server", [True, False])
def test_a_client_gone_while_its_body_came_is_counted_and_logged_as_499(
    lean_server: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """The lean front had dropped it unsaid (the aiohttp app counts and logs a 499)."""
    partial = (
        b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n"
        b'X-Request-Id: partial-1\r\nContent-Type: application/json\r\n\r\n{"model"'
    )

    async def main() -> None:
        async with serve(1, settings=GatewayConfig(lean_server=lean_server)) as gw:
            _reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(partial)
            await asyncio.sleep(0.3)
            writer.close()
            await writer.wait_closed()
            await asyncio.sleep(0.3)
            text = gw.manager.prometheus_metrics().decode()
        assert 'sage_llm_http_errors_total{route="/v1/completions",status="499"} 1.0' in text
        lines = [r.getMessage() for r in caplog.records if r.name == "sage_llm.gateway.access"]
        assert [line for line in lines if "partial-1" in line and "status=499" in line], lines

    with caplog.at_level(logging.INFO, logger="sage_llm.gateway.access"):
        run_virtual(main())


@pytest.mark.parametrize("lean_server", [True, False])
def test_a_body_that_stops_arriving_gets_a_408(
    lean_server: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Also a chunked body whose next chunk is malformed: aiohttp's parser stops feeding
    the body, and the handler would otherwise wait for it until the client leaves."""
    settings = GatewayConfig(read_timeout_s=5.0, lean_server=lean_server)
    chunked = (  # its bad chunk comes once the handler is reading the body
        b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: application/json\r\n\r\n2\r\n{}\r\n",
        b"ZZZ\r\n",
    )
    stalled = (
        b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n"
        b"X-Request-Id: stalled-1\r\nContent-Type: application/json\r\n\r\n{",
    )
    chunk_then_nothing = (  # a well-formed chunk, then silence: the rest may still come
        b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: application/json\r\n\r\n1\r\n{\r\n",
    )

    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with serve(1, settings=settings) as gw:
            admin = [  # the admin API's bodies are timed too
                (
                    f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: 50\r\n"
                    "Content-Type: application/json\r\n\r\n{"
                ).encode()
                for path in ("/admin/set_policy", "/admin/instances/i0/drain", "/admin/instances")
            ]
            for pieces in (chunked, stalled, chunk_then_nothing, *((p,) for p in admin)):
                reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
                started = loop.time()
                for piece in pieces:
                    writer.write(piece)
                    await asyncio.sleep(0.5)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60.0)
                assert head.startswith(b"HTTP/1.1 408"), head
                assert 5.0 <= loop.time() - started <= 6.0
                assert b"\r\nconnection: close\r\n" in head.lower()
                rest = await asyncio.wait_for(reader.read(), 10.0)  # closed after it
                assert b"timeout_error" in rest and b"did not arrive within 5 s" in rest
                assert b"x-request-id: " in head.lower()
                if pieces is stalled:  # the id its head gave, as on every answer
                    assert b"x-request-id: stalled-1\r\n" in head.lower()
                writer.close()
            text = gw.manager.prometheus_metrics().decode()
        # counted and logged alike by both fronts
        assert 'sage_llm_http_errors_total{route="/v1/completions",status="408"} 3.0' in text
        assert 'sage_llm_http_errors_total{route="/admin",status="408"} 3.0' in text
        lines = [r.getMessage() for r in caplog.records if r.name == "sage_llm.gateway.access"]
        assert sum("path=/v1/completions status=408" in line for line in lines) == 3, lines

    with caplog.at_level(logging.INFO, logger="sage_llm.gateway.access"):
        run_virtual(main())
