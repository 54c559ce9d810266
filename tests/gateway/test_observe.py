"""Access logs, CORS and optional tracing."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import types
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from sage_llm.config import GatewayConfig
from sage_llm.gateway import observe
from sage_llm.gateway.observe import (
    RequestIds,
    Tracing,
    continue_or_refuse,
    gateway_middleware,
    load_tracer,
    observe_middleware,
    route_label,
    valid_request_id,
    write_access_log,
)
from sage_llm.gateway.settings import LiveSettings, ResolvedGateway
from sage_llm.sim.clock import run_virtual
from tests.gateway.harness import completion_body, serve

SECRET_PROMPT = "my very private prompt text"


async def test_access_log_has_request_id_status_and_model_but_no_secrets(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO", logger="sage_llm.gateway")
    settings = GatewayConfig(api_keys=("super-secret-key",))
    async with serve(1, settings=settings) as gw, aiohttp.ClientSession() as http:
        headers = {"Authorization": "Bearer super-secret-key", "x-request-id": "logged-1"}
        body = completion_body(prompt=SECRET_PROMPT)
        async with http.post(gw.url("/v1/completions"), json=body, headers=headers) as r:
            assert r.status == 200
        async with http.post(gw.url("/v1/completions"), json=body) as r:
            assert r.status == 401
    access = [r for r in caplog.records if r.name == "sage_llm.gateway.access"]
    ok = next(r for r in access if getattr(r, "request_id", None) == "logged-1")
    assert ok.status == 200  # type: ignore[attr-defined]
    assert ok.model == "llama-3-8b"  # type: ignore[attr-defined]
    assert ok.path == "/v1/completions"  # type: ignore[attr-defined]
    assert "request_id=logged-1" in ok.getMessage()
    assert any(getattr(r, "status", None) == 401 for r in access)
    everything = "\n".join(r.getMessage() for r in caplog.records)
    assert "super-secret-key" not in everything
    assert SECRET_PROMPT not in everything


async def test_a_client_cannot_forge_an_access_log_line(caplog: pytest.LogCaptureFixture) -> None:
    """A newline in the path (aiohttp's front decodes it) or the body's model (the lean
    front's) is quoted in the text line, not written as a line of its own."""
    caplog.set_level("INFO", logger="sage_llm.gateway")
    forged = "\n2026-12-01 00:00:00,000 INFO sage_llm.gateway.access: request_id=forged"
    async with serve(1) as gw, aiohttp.ClientSession() as http:
        async with http.get(gw.url("/v1/%0Arequest_id=forged%20status=200")) as r:
            assert r.status == 404
        body = completion_body()
        body["model"] = "x" + forged
        async with http.post(gw.url("/v1/completions"), json=body) as r:
            assert r.status == 404
    lines = [r.getMessage() for r in caplog.records if r.name == "sage_llm.gateway.access"]
    assert len(lines) == 2 and all("\n" not in line for line in lines), lines
    assert "path='/v1/\\nrequest_id=forged status=200'" in lines[0]
    assert lines[1].endswith(f"model={('x' + forged)!r}")


async def test_prompts_are_logged_only_when_asked(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="sage_llm.gateway")
    settings = GatewayConfig(log_prompts=True)
    async with (
        serve(1, settings=settings) as gw,
        aiohttp.ClientSession() as http,
        http.post(gw.url("/v1/completions"), json=completion_body(SECRET_PROMPT)) as r,
    ):
        assert r.status == 200
    assert any(SECRET_PROMPT in r.getMessage() for r in caplog.records)


async def test_cors_for_configured_origins() -> None:
    settings = GatewayConfig(cors_origins=("https://app.example",))
    async with serve(1, settings=settings) as gw, aiohttp.ClientSession() as http:
        origin = {"Origin": "https://app.example"}
        preflight = {**origin, "Access-Control-Request-Method": "POST"}
        async with http.options(gw.url("/v1/completions"), headers=preflight) as r:
            assert r.status == 204
            assert r.headers["Access-Control-Allow-Origin"] == "https://app.example"
            assert "POST" in r.headers["Access-Control-Allow-Methods"]
            assert "Authorization" in r.headers["Access-Control-Allow-Headers"]
            assert "X-Sage-Cost-Budget" in r.headers["Access-Control-Allow-Headers"]
        # the headers a preflight names are allowed (the OpenAI SDK's x-stainless-* too)
        asked = {**preflight, "Access-Control-Request-Headers": "authorization, x-stainless-os"}
        async with http.options(gw.url("/v1/completions"), headers=asked) as r:
            assert r.headers["Access-Control-Allow-Headers"] == "authorization, x-stainless-os"
            assert r.headers["Vary"] == "Origin, Access-Control-Request-Headers"
        async with http.post(
            gw.url("/v1/completions"), json=completion_body(), headers=origin
        ) as r:
            assert r.headers["Access-Control-Allow-Origin"] == "https://app.example"
            assert "X-Should-Retry" in r.headers["Access-Control-Expose-Headers"]
        body = completion_body(stream=True)
        async with http.post(gw.url("/v1/completions"), json=body, headers=origin) as r:
            assert r.headers["Access-Control-Allow-Origin"] == "https://app.example"
            await r.read()
        other = {"Origin": "https://evil.example"}
        async with http.post(gw.url("/v1/completions"), json=completion_body(), headers=other) as r:
            assert "Access-Control-Allow-Origin" not in r.headers
        async with http.options(gw.url("/v1/completions"), headers=other) as r:
            assert r.status == 405


async def test_a_request_without_an_origin_gets_no_cors_headers() -> None:
    """With ``cors_origins`` set, a request that names no ``Origin`` (a server-side client,
    not a browser's) is served as on a gateway without CORS: no CORS headers, and an
    ``OPTIONS`` without one is no preflight (405)."""
    settings = GatewayConfig(cors_origins=("https://app.example",))
    async with serve(1, settings=settings) as gw, aiohttp.ClientSession() as http:
        async with http.get(gw.url("/v1/models")) as r:
            assert r.status == 200
            assert not [h for h in r.headers if h.lower().startswith("access-control-")]
            assert "Vary" not in r.headers
        asked = {"Access-Control-Request-Method": "POST"}
        async with http.options(gw.url("/v1/completions"), headers=asked) as r:
            assert r.status == 405
            assert "Access-Control-Allow-Origin" not in r.headers


async def test_a_cors_request_on_a_new_connection_gets_the_cors_headers() -> None:
    """A POST with an Origin on a connection of its own (no preflight before it on that
    connection): the lean front hands it to aiohttp, whose CORS answers it."""
    settings = GatewayConfig(cors_origins=("https://app.example",))
    async with serve(1, settings=settings) as gw:
        for stream in (False, True):
            async with (
                aiohttp.ClientSession() as http,  # a new connection each time
                http.post(
                    gw.url("/v1/completions"),
                    json=completion_body(stream=stream),
                    headers={"Origin": "https://app.example"},
                ) as r,
            ):
                assert r.status == 200
                assert r.headers["Access-Control-Allow-Origin"] == "https://app.example"
                await r.read()


class _Span:
    def __init__(self, name: str, options: dict[str, Any]) -> None:
        self.name = name
        self.options = options
        self.attributes: dict[str, Any] = {}
        self.status: Any = None

    def set_attribute(self, key: str, value: Any) -> None:
        self.attributes[key] = value

    def set_status(self, status: Any) -> None:
        self.status = status


class _Tracer:
    """Records spans the way an OpenTelemetry tracer hands them out."""

    def __init__(self) -> None:
        self.spans: list[_Span] = []

    @contextmanager
    def start_as_current_span(self, name: str, **options: Any) -> Iterator[_Span]:
        span = _Span(name, options)
        self.spans.append(span)
        yield span


def test_tracing_spans_when_opentelemetry_is_importable(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sage_llm.gateway")
    tracer = _Tracer()
    trace_mod = types.ModuleType("opentelemetry.trace")
    trace_mod.get_tracer = lambda name: tracer  # type: ignore[attr-defined]
    trace_mod.SpanKind = types.SimpleNamespace(SERVER="server")  # type: ignore[attr-defined]
    trace_mod.StatusCode = types.SimpleNamespace(ERROR="error")  # type: ignore[attr-defined]
    trace_mod.Status = lambda code, text: (code, text)  # type: ignore[attr-defined]
    propagate = types.ModuleType("opentelemetry.propagate")
    propagate.extract = lambda carrier: {"parent": carrier.get("traceparent")}  # type: ignore[attr-defined]
    package = types.ModuleType("opentelemetry")
    package.trace = trace_mod  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "opentelemetry", package)
    monkeypatch.setitem(sys.modules, "opentelemetry.trace", trace_mod)
    monkeypatch.setitem(sys.modules, "opentelemetry.propagate", propagate)
    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    settings = GatewayConfig(tracing=True)

    async def main() -> None:
        async with serve(1, settings=settings) as gw, aiohttp.ClientSession() as http:
            headers = {"x-request-id": "traced", "Traceparent": parent}  # any case, as Go sends it
            async with http.post(
                gw.url("/v1/completions"), json=completion_body(), headers=headers
            ):
                pass
            # a stream that its deadline cuts short: a 200 status line, then a 504 error event
            cut = {"x-request-id": "cut", "x-sage-slo-ms": "50"}
            body = completion_body(stream=True, max_tokens=2000)  # ~0.3 s: never done first
            async with http.post(gw.url("/v1/completions"), json=body, headers=cut) as r:
                assert r.status == 200 and '"code":504' in await r.text()
            # a client that leaves mid-stream
            left = {"x-request-id": "left"}
            async with http.post(gw.url("/v1/completions"), json=body, headers=left) as r:
                await r.content.readany()
                r.close()
            result = await gw.manager.wait_for_result("left", timeout=10)
            assert result.status.value == "cancelled"
            # a client that leaves before a whole answer: the handler is cancelled
            with pytest.raises(asyncio.TimeoutError):
                await http.post(
                    gw.url("/v1/completions"), json={**body, "stream": False},
                    headers={"x-request-id": "gone"}, timeout=aiohttp.ClientTimeout(total=0.1),
                )  # fmt: skip
            result = await gw.manager.wait_for_result("gone", timeout=10)
            assert result.status.value == "cancelled"
            gw.manager.drain_instance("sim-0")
            async with http.post(gw.url("/v1/completions"), json=completion_body(),
                                 headers={"x-request-id": "refused"}):  # fmt: skip
                pass
            for path, rid in (("/v1/secret-token-abc/x", "unknown"), ("/admin/instances/z", "405")):
                async with http.get(gw.url(path), headers={"x-request-id": rid}) as r:
                    assert r.status in (404, 405)

    run_virtual(main())
    (span,) = [s for s in tracer.spans if s.attributes.get("sage.request_id") == "traced"]
    assert span.name == "POST /v1/completions"
    assert span.attributes["http.response.status_code"] == 200
    assert span.options == {"context": {"parent": parent}, "kind": "server"}  # the caller's trace
    assert span.attributes["gen_ai.request.model"] == "llama-3-8b" and span.status is None
    for rid in ("unknown", "405"):  # a path no route matched: named by the method alone
        (stray,) = [s for s in tracer.spans if s.attributes.get("sage.request_id") == rid]
        assert stray.name == "GET" and "http.route" not in stray.attributes
    (failed,) = [s for s in tracer.spans if s.attributes.get("sage.request_id") == "refused"]
    assert failed.status == ("error", "HTTP 503")
    (cut_span,) = [s for s in tracer.spans if s.attributes.get("sage.request_id") == "cut"]
    assert cut_span.attributes["http.response.status_code"] == 200
    assert cut_span.attributes["sage.stream_error_code"] == 504
    assert cut_span.status == ("error", "HTTP 504")
    (left_span,) = [s for s in tracer.spans if s.attributes.get("sage.request_id") == "left"]
    assert left_span.attributes["http.response.status_code"] == 499  # though 200 was sent
    assert "sage.stream_error_code" not in left_span.attributes and left_span.status is None
    (gone_span,) = [s for s in tracer.spans if s.attributes.get("sage.request_id") == "gone"]
    assert gone_span.attributes["http.response.status_code"] == 499
    assert gone_span.attributes["gen_ai.request.model"] == "llama-3-8b"  # set all the same
    # the lines about a request carry its id as a field (JSON logs show it); a client's
    # leaving is logged only when a write finds it gone (not when the handler is
    # cancelled first), so only the cut stream's line is certain
    assert any(
        r.getMessage().startswith("request cut failed (504 timeout_error): ")
        and r.getMessage().endswith("(after its 200: the stream ended with an error event)")
        and getattr(r, "request_id", None) == "cut"
        for r in caplog.records
    )
    assert all(
        getattr(r, "request_id", None) == "left"
        for r in caplog.records
        if "client of request left went away" in r.getMessage()
    )


def test_tracing_is_a_no_op_without_opentelemetry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    monkeypatch.setitem(sys.modules, "opentelemetry.trace", None)
    assert load_tracer(True) is None
    assert load_tracer(False) is None


def test_request_ids_are_fresh_random_hex_across_refills(monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[int] = []
    real = os.urandom

    def counting(n: int) -> bytes:
        reads.append(n)
        return real(n)

    monkeypatch.setattr(os, "urandom", counting)
    ids = RequestIds()
    made = [ids() for _ in range(600)]
    assert all(len(rid) == 32 and valid_request_id(rid) for rid in made)
    assert all(int(rid, 16) >= 0 for rid in made)
    assert len(set(made)) == 600  # 3 reads of 4 KiB: 256 ids each, none repeated
    assert reads == [4096, 4096, 4096]


@pytest.mark.parametrize("lean_server", [True, False])
async def test_probes_ignore_an_invalid_request_id_and_generation_routes_refuse_it(
    lean_server: bool,
) -> None:
    bad = "bad id with spaces"
    async with (
        serve(1, settings=GatewayConfig(lean_server=lean_server)) as gw,
        aiohttp.ClientSession() as http,
    ):
        for path in ("/health", "/ready", "/metrics"):
            for rid in (bad, "x" * 129, "é"):
                async with http.get(gw.url(path), headers={"x-request-id": rid}) as r:
                    assert r.status == 200, (path, rid)
                    fresh = r.headers["x-request-id"]
                    assert len(fresh) == 32 and int(fresh, 16) >= 0
            async with http.get(gw.url(path), headers={"x-request-id": "probe-1"}) as r:
                assert r.status == 200 and r.headers["x-request-id"] == "probe-1"
        for path in ("/v1/completions", "/v1/chat/completions"):
            async with http.post(
                gw.url(path), json=completion_body(), headers={"x-request-id": bad}
            ) as r:
                assert r.status == 400
                assert (await r.json())["error"]["param"] == "x-request-id"
        async with http.get(gw.url("/v1/models"), headers={"x-request-id": bad}) as r:
            assert r.status == 400


@pytest.mark.parametrize("lean_server", [True, False])
async def test_error_answers_draining_and_missed_slos_are_in_the_metrics(
    lean_server: bool, caplog: pytest.LogCaptureFixture
) -> None:
    settings = GatewayConfig(lean_server=lean_server, api_keys=("k",))
    auth = {"Authorization": "Bearer k"}
    async with serve(2, settings=settings) as gw, aiohttp.ClientSession() as http:
        url = gw.url("/v1/completions")
        async with http.post(url, json=completion_body(model="nope"), headers=auth) as r:
            assert r.status == 404
        async with http.post(url, json=completion_body(), headers={"Authorization": "Bearer x"}):
            pass
        async with http.get(gw.url("/no/such/path")):
            pass
        tight = {**auth, "x-sage-slo-ms": "1"}  # a deadline no answer of 64 tokens meets
        async with http.post(url, json=completion_body(max_tokens=64), headers=tight) as r:
            await r.read()
        for sim in ("sim-0", "sim-1"):
            gw.manager.drain_instance(sim)
        caplog.clear()
        with caplog.at_level(logging.INFO):
            async with http.get(gw.url("/ready")) as r:
                assert r.status == 503
        probed = [r for r in caplog.records if r.levelno >= logging.WARNING]
        async with http.get(gw.url("/metrics")) as r:
            text = await r.text()
    assert 'sage_llm_http_errors_total{route="/v1/completions",status="404"} 1.0' in text
    assert 'sage_llm_http_errors_total{route="/v1/completions",status="401"} 1.0' in text
    assert 'sage_llm_http_errors_total{route="other",status="404"} 1.0' in text
    assert 'sage_llm_instance_draining{instance_id="sim-1"} 1.0' in text
    assert 'sage_llm_slo_met_total{priority="normal"} 0.0' in text  # a ratio of 0, not none
    assert probed == []  # an outage's probes are answered, not logged as failures


@pytest.mark.parametrize("lean", [True, False])
def test_a_stream_ended_by_an_error_event_is_counted_and_logged_with_its_code(
    lean: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Its status line said 200; the error event's code is what an operator counts. (On
    the virtual clock: its first chunk comes within the 50 ms, its end does not, however
    loaded the machine.)"""
    caplog.set_level(logging.INFO, logger="sage_llm.gateway.access")

    async def main() -> str:
        async with serve(1, settings=GatewayConfig(lean_server=lean)) as gw:
            async with aiohttp.ClientSession() as http:
                body = completion_body(stream=True, max_tokens=2000)  # ~0.3 s: never done first
                cut = {"x-request-id": "cut", "x-sage-slo-ms": "50"}
                async with http.post(gw.url("/v1/completions"), json=body, headers=cut) as r:
                    assert r.status == 200 and '"code":504' in await r.text()
            return gw.manager.prometheus_metrics().decode()

    text = run_virtual(main())
    assert 'sage_llm_http_errors_total{route="/v1/completions",status="504"} 1.0' in text
    [line] = [r.getMessage() for r in caplog.records if "request_id=cut " in r.getMessage()]
    assert " status=504 " in line


@asynccontextmanager
async def _observed(cors_origins: tuple[str, ...] = ()) -> AsyncIterator[str]:
    """An app of one route behind the observing middleware; yields its base URL."""

    async def ok(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"ok": True})

    app = web.Application(middlewares=[observe_middleware(cors_origins, None)])
    app.router.add_route("*", "/v1/completions", ok)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_a_star_origin_allows_any_origin_as_a_star() -> None:
    async with _observed(("*",)) as base, aiohttp.ClientSession() as http:
        headers = {"Origin": "https://app.example"}
        async with http.post(base + "/v1/completions", json={}, headers=headers) as r:
            assert r.status == 200
            assert r.headers["Access-Control-Allow-Origin"] == "*"


async def test_a_preflight_naming_a_malformed_header_list_gets_the_default_list() -> None:
    async with _observed(("https://a.example",)) as base, aiohttp.ClientSession() as http:
        preflight = {
            "Origin": "https://a.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": 'x-a; evil="1", (y)',
        }
        async with http.options(base + "/v1/completions", headers=preflight) as r:
            assert r.status == 204
            allowed = r.headers["Access-Control-Allow-Headers"]
            assert "evil" not in allowed and "Authorization" in allowed


async def test_expect_100_continue_is_matched_in_any_case() -> None:
    async with _observed() as base, aiohttp.ClientSession() as http:
        headers = {"Expect": "100-Continue", "Content-Type": "application/json"}
        async with http.post(base + "/v1/completions", data=b"{}", headers=headers) as r:
            assert r.status == 200


async def test_a_chunked_transfer_coding_is_matched_in_any_case() -> None:
    async with _observed() as base:
        port = int(base.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: Chunked\r\n"
            b"Content-Type: application/json\r\nConnection: close\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
        )
        status = await reader.readline()
        writer.close()
        await writer.wait_closed()
    assert status.startswith(b"HTTP/1.1 200 "), status


@pytest.mark.parametrize(
    ("path", "label"),
    [("/v1/models/llama-3", "/v1/models/{model}"), ("/admin", "/admin"),
     ("/admin/instances", "/admin"), ("/administrator", "other"), ("/nope", "other")],
)  # fmt: skip
def test_route_labels_are_bounded(path: str, label: str) -> None:
    assert route_label(path) == label


def test_an_access_log_path_with_a_space_is_quoted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="sage_llm.gateway")
    write_access_log("r1", "GET", "/v1/x status=200 model=gpt-4", 404, 1.0, "a b")
    (line,) = [r.getMessage() for r in caplog.records if r.name == "sage_llm.gateway.access"]
    assert "path='/v1/x status=200 model=gpt-4' status=404" in line
    assert line.endswith("model='a b'")


async def test_access_log_latency_is_in_milliseconds(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="sage_llm.gateway")
    clock = iter([10.0, 10.25])
    monkeypatch.setattr(observe, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=200)

    middleware = observe_middleware((), None)
    await middleware(make_mocked_request("GET", "/health"), handler)
    (line,) = [r for r in caplog.records if r.name == "sage_llm.gateway.access"]
    assert line.latency_ms == 250.0  # type: ignore[attr-defined]
    assert "latency_ms=250.0" in line.getMessage()


async def test_a_request_whose_client_left_is_logged_with_499(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO", logger="sage_llm.gateway")

    async def handler(request: web.Request) -> web.StreamResponse:
        raise asyncio.CancelledError

    middleware = observe_middleware((), None)
    request = make_mocked_request("POST", "/v1/completions", headers={"x-request-id": "left"})
    with pytest.raises(asyncio.CancelledError):
        await middleware(request, handler)
    (line,) = [r for r in caplog.records if r.name == "sage_llm.gateway.access"]
    assert line.status == 499 and line.request_id == "left"  # type: ignore[attr-defined]


def test_only_a_5xx_marks_a_span_as_an_error() -> None:
    """A 4xx is the client's: its span keeps an unset status."""
    statuses: list[Any] = []
    trace = types.SimpleNamespace(
        get_tracer=lambda name: None,
        Status=lambda code, text: (code, text),
        StatusCode=types.SimpleNamespace(ERROR="error"),
    )
    span = types.SimpleNamespace(set_status=statuses.append)
    tracing = Tracing(trace, None)
    for status in (200, 400, 404, 429, 499):
        tracing.mark_error(span, status)
    assert statuses == []
    tracing.mark_error(span, 502)
    assert statuses == [("error", "HTTP 502")]


@pytest.mark.parametrize("invited", [True, False])
async def test_the_middleware_decides_by_the_keys_its_expect_handler_used(invited: bool) -> None:
    """A reload between a request's ``Expect: 100-continue`` and its handler changes
    nothing for it: the request the 100 invited goes on, and one refused without a 100
    stays refused (its client sends no body for a handler to wait for)."""
    before, after = (("k",), ("other",)) if invited else (("other",), ("k",))
    live = LiveSettings(ResolvedGateway(api_keys=before))
    request = make_mocked_request(
        "POST",
        "/v1/completions",
        headers={"Expect": "100-continue", "Authorization": "Bearer k", "Content-Length": "2"},
    )
    await continue_or_refuse(live)(request)
    live.reload(ResolvedGateway(api_keys=after))
    handled: list[bool] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        handled.append(True)
        return web.Response(status=200)

    resp = await gateway_middleware((), None, live)(request, handler)
    assert (resp.status, handled) == ((200, [True]) if invited else (401, []))
