"""Tests for the proxy speed benchmark: figures from results, and the closed-loop client."""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from rich.console import Console
from typer.testing import CliRunner

from sage_llm.bench import proxy_bench
from sage_llm.bench.proxy_bench import (
    C1_WARMUP,
    PROMPT,
    ClientResult,
    ProxyRow,
    bench_prompt,
    check_proxy_options,
    client_process,
    closed_loop,
    proxy_bench_main,
    render_rows,
    rows_from,
    run_proxy_bench,
    target_lines,
)
from sage_llm.errors import ConfigError
from sage_llm.sim.engine import SimEngine, SimEngineConfig
from sage_llm.sim.server import create_engine_app
from sage_llm.tokens import count_tokens
from tests.engines.fake_engine import start_app


def _result(latencies_ms: list[float], wall_s: float = 2.0, errors: int = 0) -> ClientResult:
    lat = [v / 1000 for v in latencies_ms]
    return ClientResult(len(lat) + errors, errors, wall_s, lat, [v / 2 for v in lat])


def test_client_result_figures() -> None:
    r = _result([1.0, 2.0, 3.0, 4.0], wall_s=2.0, errors=1)
    assert r.req_per_s == pytest.approx(2.0)  # 4 of 5 done in 2 s
    assert r.p50_ms() == pytest.approx(2.5)
    assert r.ttft_p50_ms() == pytest.approx(1.25)
    empty = ClientResult(0 + 1, 1, 1.0, [], [])
    assert empty.p50_ms() is None and empty.ttft_p50_ms() is None


def test_rows_added_latency_is_against_direct_of_the_same_mode() -> None:
    results = {
        ("direct", False): [(_result([10.0]), _result([10.0], wall_s=1.0))],
        ("proxy", False): [(_result([10.4]), _result([10.0, 10.0], wall_s=1.0))],
        ("direct", True): [(_result([20.0]), _result([20.0]))],
        ("proxy", True): [(_result([21.0]), _result([20.0]))],
    }
    rows = {(r.target, r.stream): r for r in rows_from(results)}
    assert rows[("direct", False)].added_ms is None
    assert rows[("proxy", False)].added_ms == pytest.approx(0.4)
    assert rows[("proxy", False)].req_per_s_c64 == pytest.approx(2.0)
    assert rows[("proxy", True)].added_ms == pytest.approx(1.0)
    assert rows[("proxy", True)].ttft_c1_ms == pytest.approx(10.5)
    assert rows[("proxy", False)].ttft_c1_ms is None
    console = Console(width=200, record=True)
    console.print(render_rows(list(rows.values())))
    text = console.export_text()
    assert "0.40" in text
    assert "c1 behind engine-sim --instant" in text
    console = Console(width=200, record=True)
    console.print(render_rows(list(rows.values()), c1_engine="sim"))
    assert "c1 behind engine-sim, c64" in console.export_text()


def test_target_lines_set_each_gateway_target_against_the_faster_rust_router() -> None:
    def row(target: str, stream: bool, added: float | None, rate: float) -> ProxyRow:
        return ProxyRow(target, stream, None, added, None, rate, 0)

    rows = [
        row("direct", False, None, 5000.0),
        row("sage-llm serve", False, 0.43, 3000.0),
        row("sage-llm serve, engine_stream=client", False, 0.42, 3300.0),
        row("vllm-router", False, 0.26, 4000.0),
        row("sglang-router", False, 0.27, 3800.0),
        row("python-forwarder", False, 0.20, 9000.0),  # not a Rust router
        row("sage-llm serve", True, 0.54, 2500.0),
        row("sglang-router", True, 43.6, 3000.0),
    ]
    assert target_lines(rows) == [
        "sage-llm serve, non-streaming: c64 0.75x vllm-router (not met: >= 0.8x); "
        "c1 added 0.43 ms (met: < 0.5 ms)",
        "sage-llm serve, engine_stream=client, non-streaming: c64 0.82x vllm-router "
        "(met: >= 0.8x); c1 added 0.42 ms (met: < 0.5 ms)",
        "sage-llm serve, streaming: c64 0.83x sglang-router (met: >= 0.8x); "
        "c1 added 0.54 ms (not met: < 0.5 ms)",
    ]
    # no Rust router ran: only the added latency
    assert target_lines([row("sage-llm serve", False, 0.6, 100.0)]) == [
        "sage-llm serve, non-streaming: c1 added 0.60 ms (not met: < 0.5 ms)"
    ]


def test_target_lines_meet_the_rate_target_at_0_8x_and_the_added_one_below_0_5_ms() -> None:
    rows = [
        ProxyRow("sage-llm serve", False, None, 0.5, None, 3200.0, 0),
        ProxyRow("vllm-router", False, None, 0.2, None, 4000.0, 0),
    ]
    assert target_lines(rows) == [
        "sage-llm serve, non-streaming: c64 0.80x vllm-router (met: >= 0.8x); "
        "c1 added 0.50 ms (not met: < 0.5 ms)"
    ]


def test_a_peer_given_twice_is_refused() -> None:
    with pytest.raises(ConfigError, match="vllm-router is given twice") as info:
        check_proxy_options(["vllm-router", "sglang-router", "vllm-router"], 8)
    assert info.value.key == "peers"


def test_run_rejects_an_unknown_c1_engine_before_starting_anything() -> None:
    with pytest.raises(ValueError, match="c1_engine"):
        asyncio.run(run_proxy_bench(c1_engine="gpu", peers=()))
    with pytest.raises(ValueError, match="c1_warmup"):
        asyncio.run(run_proxy_bench(c1_warmup=-1, peers=()))


def test_the_command_line_warms_up_as_the_bench_does_and_passes_its_count_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sage_llm import cli

    default = inspect.signature(cli.bench_proxy).parameters["c1_warmup"].default
    assert default == C1_WARMUP  # the command's default is the bench's
    seen: dict[str, object] = {}

    def bench(**kwargs: object) -> int:
        seen.update(kwargs)
        return 0

    monkeypatch.setattr(proxy_bench, "proxy_bench_main", bench)
    result = CliRunner().invoke(cli.app, ["bench", "proxy", "--c1-warmup", "7"])
    assert result.exit_code == 0, result.output
    assert seen["c1_warmup"] == 7


def test_the_client_process_sends_its_warmup_requests_before_the_measured_ones() -> None:
    async def main() -> tuple[ClientResult, float]:
        engine = SimEngine("sim-0", SimEngineConfig(speed=1000.0))
        runner, port = await start_app(create_engine_app(engine, model_name="llama-3-8b"))
        try:
            result = await client_process(f"http://127.0.0.1:{port}", 2, 4, False, warmup=3)
            # 4 tokens per request (max_tokens, ignore_eos): the requests it served
            return result, (await engine.stats()).generation_tokens_total / 4
        finally:
            await runner.cleanup()
            await engine.aclose()

    result, served = asyncio.run(main())
    assert result.errors == 0 and len(result.latencies_s) == 4  # only these are measured
    assert served == 4 + 3


def test_rounds_give_the_median_rate_and_pool_the_latencies() -> None:
    results = {
        ("direct", False): [(_result([10.0]), _result([1.0], wall_s=1.0))] * 3,
        ("proxy", False): [
            (_result([11.0]), _result([1.0] * 4, wall_s=1.0)),
            (_result([12.0, 14.0]), _result([1.0] * 9, wall_s=1.0)),
            (_result([13.0]), _result([1.0] * 6, wall_s=1.0)),
        ],
    }
    row = {r.target: r for r in rows_from(results)}["proxy"]
    assert row.req_per_s_c64_runs == (4.0, 9.0, 6.0)
    assert row.req_per_s_c64 == 6.0  # the median round
    assert row.p50_c1_ms == pytest.approx(12.5)  # over the four latencies of all rounds
    assert row.added_ms == pytest.approx(2.5)
    console = Console(width=200, record=True)
    console.print(render_rows(list(rows_from(results))))
    assert "4 / 9 / 6" in console.export_text()


def test_an_even_number_of_rounds_gives_the_lower_middle_rate() -> None:
    runs = [(_result([10.0]), _result([1.0] * n, wall_s=1.0)) for n in (4, 9, 6, 7)]
    (row,) = rows_from({("proxy", False): runs})
    assert row.req_per_s_c64_runs == (4.0, 9.0, 6.0, 7.0)
    assert row.req_per_s_c64 == 6.0  # a round's own figure: not 7, nor 6.5


class _Clock:
    """The closed-loop client's clock (``time`` in the module), moved only by the test's
    server; an event is set whenever the client reads it."""

    def __init__(self) -> None:
        self.now = 0.0
        self.cpu = 0.0
        self.read = asyncio.Event()

    def perf_counter(self) -> float:
        self.read.set()
        return self.now

    def process_time(self) -> float:
        return self.cpu


async def _closed_loop_on(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    *,
    stream: bool,
    requests: int,
    warmup: int,
) -> ClientResult:
    app = web.Application()
    app.router.add_post("/v1/completions", handler)
    runner, port = await start_app(app)
    try:
        return await closed_loop(
            f"http://127.0.0.1:{port}", concurrency=1, requests=requests, stream=stream,
            warmup=warmup,
        )  # fmt: skip
    finally:
        await runner.cleanup()


def test_warmup_requests_are_not_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(proxy_bench, "time", clock)
    served = 0

    async def answer(request: web.Request) -> web.Response:
        nonlocal served
        served += 1
        step = 100.0 if served <= 2 else 1.0  # the two warm-up requests take long
        clock.now += step
        clock.cpu += step
        return web.Response(text="{}")

    result = asyncio.run(_closed_loop_on(answer, stream=False, requests=3, warmup=2))
    assert served == 5
    assert result.latencies_s == [1.0, 1.0, 1.0]
    assert result.wall_s == pytest.approx(3.0)
    assert result.cpu_s == pytest.approx(3.0)
    assert result.req_per_s == pytest.approx(1.0)


def test_ttft_is_the_time_to_the_first_streamed_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(proxy_bench, "time", clock)

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        clock.read.clear()
        await resp.write(b"data: first\n\n")
        # the client notes the first chunk's time before the rest comes, 5 s later
        await asyncio.wait_for(clock.read.wait(), 10.0)
        clock.now += 5.0
        await resp.write(b"data: last\n\n")
        await resp.write_eof()
        return resp

    result = asyncio.run(_closed_loop_on(stream, stream=True, requests=2, warmup=0))
    assert result.errors == 0
    assert result.ttfts_s == [0.0, 0.0]
    assert result.latencies_s == [5.0, 5.0]


def test_a_request_answered_with_an_error_status_is_failed_not_completed() -> None:
    async def refuse(request: web.Request) -> web.Response:
        return web.Response(status=503, text="overloaded")

    result = asyncio.run(_closed_loop_on(refuse, stream=False, requests=4, warmup=1))
    assert result.errors == 4
    assert result.latencies_s == []
    assert result.req_per_s == 0.0  # completed requests per second


@pytest.mark.parametrize("stream", [False, True])
def test_closed_loop_against_a_simulated_engine(stream: bool) -> None:
    async def main() -> ClientResult:
        engine = SimEngine("sim-0", SimEngineConfig(speed=1000.0))
        runner, port = await start_app(create_engine_app(engine, model_name="llama-3-8b"))
        try:
            return await closed_loop(
                f"http://127.0.0.1:{port}", concurrency=4, requests=12, stream=stream, warmup=1
            )
        finally:
            await runner.cleanup()
            await engine.aclose()

    result = asyncio.run(main())
    assert result.errors == 0
    assert len(result.latencies_s) == 12
    assert len(result.ttfts_s) == (12 if stream else 0)
    assert result.cpu_s > 0.0  # the client's CPU over the measured requests
    assert all(t <= lat for t, lat in zip(result.ttfts_s, result.latencies_s, strict=False))
    assert result.req_per_s > 0


def test_closed_loop_spreads_its_slots_over_several_urls() -> None:
    async def main() -> tuple[ClientResult, list[float]]:
        engines = [SimEngine(f"sim-{i}", SimEngineConfig(speed=1000.0)) for i in range(2)]
        started = [await start_app(create_engine_app(e, model_name="llama-3-8b")) for e in engines]
        try:
            result = await closed_loop(
                [f"http://127.0.0.1:{port}/" for _, port in started],
                concurrency=4, requests=20, stream=False, warmup=1,
            )  # fmt: skip
            # 4 tokens per request (max_tokens, ignore_eos): the requests each one served
            return result, [(await e.stats()).generation_tokens_total / 4 for e in engines]
        finally:
            for runner, _ in started:
                await runner.cleanup()
            for e in engines:
                await e.aclose()

    result, finished = asyncio.run(main())
    assert result.errors == 0 and len(result.latencies_s) == 20
    assert sum(finished) == 20 + 2  # and one warm-up request each
    assert min(finished) >= 1 + 4  # each URL served its slots' share, not only the warm-up


@pytest.mark.parametrize("tokens", [1, 5, 14, 15, 300, 4000])
def test_bench_prompt_has_exactly_the_tokens_asked_for(tokens: int) -> None:
    prompt = bench_prompt(tokens)
    assert count_tokens(prompt) == tokens
    assert prompt.endswith(PROMPT[-len(prompt) :])
    assert bench_prompt(0) == PROMPT
    with pytest.raises(ValueError, match="prompt_tokens"):
        bench_prompt(-1)


def test_closed_loop_sends_the_prompt_length_asked_for() -> None:
    async def main() -> tuple[ClientResult, float]:
        engine = SimEngine("sim-0", SimEngineConfig(speed=1000.0))
        runner, port = await start_app(create_engine_app(engine, model_name="llama-3-8b"))
        try:
            result = await closed_loop(
                f"http://127.0.0.1:{port}", concurrency=2, requests=4, stream=False, warmup=1,
                prompt_tokens=300,
            )  # fmt: skip
            return result, (await engine.stats()).prompt_tokens_total
        finally:
            await runner.cleanup()
            await engine.aclose()

    result, prompt_tokens = asyncio.run(main())
    assert result.errors == 0
    assert prompt_tokens == 300 * (4 + 1)  # and the warm-up request


def test_closed_loop_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="concurrency"):
        asyncio.run(closed_loop("http://127.0.0.1:1", concurrency=0, requests=1, stream=False))
    with pytest.raises(ValueError, match="base URL"):
        asyncio.run(closed_loop([], concurrency=1, requests=1, stream=False))


def test_bad_peers_and_prompts_are_refused_before_anything_starts(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="known: python-forwarder, sglang-router") as info:
        proxy_bench_main(peers=["bogus"], out=tmp_path)
    assert info.value.key == "peers"
    # every request would be refused by the engines (they ran, and "passed")
    with pytest.raises(ConfigError, match="exceed the engines' context of 8192") as info:
        proxy_bench_main(peers=[], out=tmp_path, prompt_tokens=9000)
    assert info.value.key == "prompt_tokens"


@pytest.mark.parametrize(("argv", "code"), [(["--help"], 0), (["-h"], 0), (["--rounds", "3"], 2)])
def test_the_module_refuses_options_it_does_not_take(
    argv: list[str], code: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``python -m sage_llm.bench.proxy_bench --help`` (or any option but ``client``) says
    how to run it; it does not start the bench with its defaults."""

    def bench() -> int:
        raise AssertionError("the bench ran")

    monkeypatch.setattr(proxy_bench, "proxy_bench_main", bench)
    assert proxy_bench._module_main(argv) == code
    assert "sage-llm bench proxy --help" in capsys.readouterr().err


@pytest.mark.slow
def test_the_bench_end_to_end_measures_every_target_in_both_modes(tmp_path: Path) -> None:
    """``sage-llm bench proxy`` at a tiny size, with the Python forwarder as its one peer:
    engine-sim processes, both gateway targets, the load client's processes; every target
    measured in both modes without an error, the table printed, ``proxy.json`` written."""
    console = Console(width=200, record=True)
    out = tmp_path / "proxy"
    code = proxy_bench.proxy_bench_main(
        peers=["python-forwarder"], requests_c1=5, requests_c64=64, c1_warmup=5, out=out,
        console=console,
    )  # fmt: skip
    assert code == 0
    rows = json.loads((out / "proxy.json").read_text())
    names = ["direct", *(name for _, name in proxy_bench.SAGE_TARGETS), "python-forwarder"]
    assert [(r["target"], r["stream"]) for r in rows] == [
        (name, stream) for stream in (False, True) for name in names
    ]
    for row in rows:
        assert row["errors"] == 0 and row["req_per_s_c64"] > 0, row
        assert (row["added_ms"] is None) == (row["target"] == "direct"), row
        assert (row["ttft_c1_ms"] is None) == (not row["stream"]), row
    flat = " ".join(console.export_text().split())
    for name in names:
        assert f"│ {name} │ plain │" in flat and f"│ {name} │ stream │" in flat
    assert f"wrote {out / 'proxy.json'}" in flat
