"""The HTTP load generator against a real simulated engine server on loopback."""

from __future__ import annotations

from aiohttp import web

from sage_llm.bench.loadgen import errors_by_kind, run_http_workload
from sage_llm.bench.procs import free_ports
from sage_llm.bench.stats import summarize
from sage_llm.bench.workload_core import Workload, WorkloadRequest
from sage_llm.bench.workloads import Fixed, synthetic
from sage_llm.sim.engine import SimEngine, SimEngineConfig
from sage_llm.sim.server import start_engine_server
from sage_llm.types import RequestPriority
from tests.engines.fake_engine import start_app

MODEL = "llama-3-8b"


async def test_measures_every_streamed_token_and_reports_errors() -> None:
    engine = SimEngine("e0", SimEngineConfig(model=MODEL, speed=20.0))
    runner, port = await start_engine_server(engine, model_name=MODEL)
    try:
        workload = synthetic(12, 200.0, input_dist=Fixed(40), output_dist=Fixed(7), seed=3)
        report = await run_http_workload(
            f"http://127.0.0.1:{port}", workload, model=MODEL, sage_headers=False
        )
        bad = await run_http_workload(
            f"http://127.0.0.1:{port}", workload, model="other-model", sage_headers=False
        )
    finally:
        await runner.cleanup()
        await engine.aclose()
    ms = report.measurements
    assert len(ms) == 12
    assert all(m.ok for m in ms)
    assert all(m.output_tokens == 7 for m in ms)
    assert all(len(m.token_times_s) == 7 for m in ms)
    assert all(m.first_token_s is not None and m.first_token_s >= m.arrival_s for m in ms)
    summary = summarize(ms, report.duration_s)
    assert summary.ok == 12
    assert summary.tpot is not None
    assert report.max_send_lag_s >= report.mean_send_lag_s >= 0.0
    assert not any(m.ok for m in bad.measurements)
    assert errors_by_kind(bad.measurements) == {"HTTP 404": 12}


def _sse_app(*events: bytes, headers_seen: list[dict[str, str]] | None = None) -> web.Application:
    """A completions endpoint that streams ``events`` (each a ``data:`` payload), then
    ``[DONE]``; each request's headers (lower-cased) go to ``headers_seen``."""

    async def stream(request: web.Request) -> web.StreamResponse:
        if headers_seen is not None:
            headers_seen.append({k.lower(): v for k, v in request.headers.items()})
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for event in (*events, b"[DONE]"):
            await resp.write(b"data: " + event + b"\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/completions", stream)
    return app


async def test_a_stream_that_ends_in_an_error_event_is_a_failed_request() -> None:
    app = _sse_app(b'{"choices": [{"text": "Hi"}]}', b'{"error": {"message": "engine died"}}')
    runner, port = await start_app(app)
    try:
        workload = synthetic(1, 10.0, input_dist=Fixed(8), output_dist=Fixed(4), seed=0)
        report = await run_http_workload(
            f"http://127.0.0.1:{port}", workload, model=MODEL, sage_headers=False
        )
    finally:
        await runner.cleanup()
    (m,) = report.measurements
    assert not m.ok
    assert m.error == "engine died"
    assert summarize(report.measurements, report.duration_s).failed == 1


async def test_a_target_that_cannot_be_reached_fails_every_request_with_the_reason() -> None:
    """A run against a port nobody listens on ends with every request failed (the
    connection error named), not with an exception out of the run."""
    (port,) = free_ports(1)
    workload = synthetic(3, 100.0, input_dist=Fixed(8), output_dist=Fixed(2), seed=0)
    report = await run_http_workload(
        f"http://127.0.0.1:{port}", workload, model=MODEL, sage_headers=False, timeout_s=5.0
    )
    assert len(report.measurements) == 3
    assert errors_by_kind(report.measurements) == {"ClientConnectorError": 3}
    assert summarize(report.measurements, report.duration_s).failed == 3


async def test_the_sage_headers_and_the_api_key_go_with_every_request() -> None:
    """``sage_headers`` sends each request's priority, end-to-end SLO (in ms), session and
    user as ``x-sage-*`` headers; ``api_key`` a bearer token; a stream's usage event gives its
    output token count."""
    seen: list[dict[str, str]] = []
    app = _sse_app(
        b'{"choices": [{"text": "Hi"}]}',
        b'{"choices": [], "usage": {"completion_tokens": 5}}',
        headers_seen=seen,
    )
    runner, port = await start_app(app)
    requests = (
        WorkloadRequest("a", 0.0, "hello", 1, 4, RequestPriority.HIGH, slo_e2e_s=2.5,
                        session_id="s-1", user_id="u-1"),
        WorkloadRequest("b", 0.0, "hello", 1, 4, RequestPriority.LOW),
    )  # fmt: skip
    try:
        report = await run_http_workload(
            f"http://127.0.0.1:{port}", Workload("w", requests), model=MODEL, api_key="k-1"
        )
    finally:
        await runner.cleanup()
    by_id = {h["x-request-id"]: h for h in seen}
    assert by_id["a"]["authorization"] == "Bearer k-1"
    assert (by_id["a"]["x-sage-priority"], by_id["a"]["x-sage-slo-ms"]) == ("high", "2500")
    assert (by_id["a"]["x-session-id"], by_id["a"]["x-sage-user"]) == ("s-1", "u-1")
    assert by_id["b"]["x-sage-priority"] == "low"
    assert not {"x-sage-slo-ms", "x-session-id", "x-sage-user"} & set(by_id["b"])
    assert [m.output_tokens for m in report.measurements] == [5, 5]
