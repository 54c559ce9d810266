"""The HTTP load generator against a real simulated engine server on loopback."""

from __future__ import annotations

from sage_llm.bench.loadgen import errors_by_kind, run_http_workload
from sage_llm.bench.stats import summarize
from sage_llm.bench.workloads import Fixed, synthetic
from sage_llm.sim.engine import SimEngine, SimEngineConfig
from sage_llm.sim.server import start_engine_server

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
