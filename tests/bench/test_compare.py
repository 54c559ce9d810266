"""Tests for ``bench compare``: workload shaping, calibration pieces, configs and a tiny run."""

from __future__ import annotations

import asyncio
import json
import math
import os
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from rich.console import Console

from sage_llm.bench import compare
from sage_llm.bench.compare import (
    TRACE_MODEL,
    CompareConfig,
    as_text_prompts,
    build_workload,
    calibrate_capacity,
    check_workload,
    compare_main,
    overload_compare,
    overload_main,
    overload_title,
    parse_preset,
    prefix_counters,
    prefix_hit_delta,
    prefix_hit_rates,
    rescale,
    run_compare,
    sage_config_toml,
    steady_throughput,
    toml_value,
    write_reports,
)
from sage_llm.bench.inprocess import Preset
from sage_llm.bench.peers import PeerError, ensure_peer_sync
from sage_llm.bench.report import Entry, target_check
from sage_llm.bench.stats import RequestMeasurement, summarize
from sage_llm.bench.workloads import Workload
from sage_llm.config import parse_config
from sage_llm.engines.metrics_scrape import parse_prometheus_text
from sage_llm.errors import ConfigError
from sage_llm.tokens import tokenize
from sage_llm.types import RequestPriority


def test_parse_preset() -> None:
    preset = parse_preset(" slo_aware + locality ")
    assert (preset.name, preset.policy, preset.routing) == (
        "slo_aware + locality",
        "slo_aware",
        "locality",
    )
    for bad in ("fifo", "fifo+", "a+b+c"):
        with pytest.raises(ConfigError):
            parse_preset(bad)


@pytest.mark.parametrize("kind", ["multi-turn", "sharegpt", "synthetic"])
def test_build_workload_offers_the_rate(kind: str) -> None:
    w = build_workload(kind, rate=5.0, duration_s=20.0, seed=1)
    assert w.summary()["rate_rps"] == pytest.approx(5.0)
    assert w == build_workload(kind, rate=5.0, duration_s=20.0, seed=1)


def test_a_trace_offers_the_rate_for_the_duration(tmp_path: Path) -> None:
    """The first rate × duration requests of the trace, rescaled to the rate (it had been
    replayed whole, an hour of the public traces, whatever the options said)."""
    trace = tmp_path / "t.jsonl"
    rows = [{"timestamp": 1000 * k, "input_length": 100 + k, "output_length": 8,
             "hash_ids": [k]} for k in range(500)]  # fmt: skip
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    w = build_workload(f"trace:{trace}", rate=4.0, duration_s=10.0, model=TRACE_MODEL)
    assert len(w.requests) == 40 and w.summary()["rate_rps"] == pytest.approx(4.0)
    assert [r.prompt_tokens for r in w.requests[:3]] == [100, 101, 102]
    assert {r.model for r in w.requests} == {TRACE_MODEL}


def test_a_trace_too_short_or_without_a_rate_is_refused(tmp_path: Path) -> None:
    """An empty trace ran "successfully" (0 of 0), and one whose rows share a timestamp
    was reported at the rate asked for while its requests all came at once."""
    empty, same = tmp_path / "empty.jsonl", tmp_path / "same.jsonl"
    empty.write_text("")
    row = {"timestamp": 0, "input_length": 10, "output_length": 5, "hash_ids": [1]}
    same.write_text((json.dumps(row) + "\n") * 10)
    with pytest.raises(ConfigError, match="has 0 request\\(s\\), fewer than the 20") as info:
        build_workload(f"trace:{empty}", rate=4.0, duration_s=5.0, model=TRACE_MODEL)
    assert info.value.key == "workload"
    with pytest.raises(ConfigError, match="has 10 request"):
        build_workload(f"trace:{same}", rate=4.0, duration_s=5.0, model=TRACE_MODEL)
    with pytest.raises(ConfigError, match="arrive at the same time"):
        build_workload(f"trace:{same}", rate=1.0, duration_s=5.0, model=TRACE_MODEL)


@pytest.mark.parametrize("key", ["input_length", "output_length"])
def test_a_trace_row_longer_than_any_context_is_refused_at_its_line(
    tmp_path: Path, key: str
) -> None:
    """A row of 10 billion prompt tokens had been built, token by token, until memory ran
    out."""
    trace = tmp_path / "huge.jsonl"
    rows = [{"timestamp": 100 * k, "input_length": 10, "output_length": 8} for k in range(30)]
    rows[3][key] = 10_000_000_000
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ConfigError, match=f"{key} must be at most 1048576 tokens") as info:
        build_workload(f"trace:{trace}", rate=2.0, duration_s=5.0, model=TRACE_MODEL)
    assert f"{trace}:4" in str(info.value)


def test_compare_main_refuses_rate_and_rates_together(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^rate: give rate or rates, not both"):
        compare_main(rate=2.0, rates=[1.0, 2.0], peers=[], out=tmp_path)


def test_build_workload_rejects_bad_input() -> None:
    with pytest.raises(ConfigError):
        build_workload("nope", rate=1.0, duration_s=10.0)
    with pytest.raises(ConfigError):
        build_workload("synthetic", rate=0.0, duration_s=10.0)
    with pytest.raises(ConfigError):
        build_workload("synthetic", rate=1.0, duration_s=0.0)


def test_a_trace_must_be_a_file(tmp_path: Path) -> None:
    for path in (tmp_path, tmp_path / "missing.jsonl"):
        with pytest.raises(ConfigError, match="no trace file at") as info:
            check_workload(f"trace:{path}")
        assert info.value.key == "workload"


def test_build_workload_offers_rate_times_duration_requests_rounded() -> None:
    """The nearest whole number of requests to rate × duration, at least 2."""
    assert len(build_workload("synthetic", rate=2.9, duration_s=1.0)) == 3
    assert len(build_workload("synthetic", rate=2.2, duration_s=1.0)) == 2
    assert len(build_workload("synthetic", rate=0.5, duration_s=1.0)) == 2


def test_as_text_prompts_keeps_token_counts_and_shared_prefixes() -> None:
    w = build_workload("multi-turn", rate=2.0, duration_s=4.0)
    text = as_text_prompts(w)
    assert all(isinstance(r.prompt, str) for r in text)
    assert [r.prompt_tokens for r in text] == [r.prompt_tokens for r in w]
    first, second = text.requests[0], text.requests[1]
    assert isinstance(first.prompt, str) and isinstance(second.prompt, str)
    shared = tokenize(first.prompt)[:1024]
    assert tokenize(second.prompt)[:1024] == shared  # the system prompt stays shared


def test_rescale_multiplies_every_time() -> None:
    m = RequestMeasurement(
        request_id="r", priority=RequestPriority.HIGH, user_id=None, arrival_s=1.0,
        first_token_s=1.5, token_times_s=[1.5, 2.0], end_s=2.0, prompt_tokens=3,
        output_tokens=2,
    )  # fmt: skip
    (out,) = rescale([m], 4.0)
    assert (out.arrival_s, out.first_token_s, out.end_s) == (4.0, 6.0, 8.0)
    assert out.token_times_s == (6.0, 8.0)
    assert out.priority is RequestPriority.HIGH


def test_steady_throughput_leaves_out_ramp_and_drain() -> None:
    # 20 completions one second apart, then a long drain: the middle 16 take 16 s.
    ends = [float(i) for i in range(19)] + [100.0]
    assert steady_throughput(ends) == pytest.approx(1.0)
    assert steady_throughput([1.0, 2.0]) == 0.0


def test_sage_config_toml_is_a_valid_http_config() -> None:
    preset = Preset("p", "priority", "locality", policy_params={"max_wait_s": 30.0})
    text = sage_config_toml(
        preset, ["http://127.0.0.1:8001", "http://127.0.0.1:8002"], model="m", max_concurrent=8
    )
    cfg = parse_config(text)
    instances = cfg.execution_instances()
    assert [(i.port, i.max_concurrent_requests, i.model_name) for i in instances] == [
        (8001, 8, "m"),
        (8002, 8, "m"),
    ]
    kwargs = cfg.manager_kwargs()
    assert kwargs["scheduling_policy"] == "priority"
    assert kwargs["routing_strategy"] == "locality"
    assert kwargs["mode"] == "http"
    assert kwargs["engine_stream"] == "sampled"
    text = sage_config_toml(
        preset, ["http://127.0.0.1:8001"], model="m", max_concurrent=8, engine_stream="client"
    )
    assert parse_config(text).manager_kwargs()["engine_stream"] == "client"


def test_sage_config_toml_writes_tables_and_infinities_as_toml() -> None:
    """A parameter that is a table (``fair``'s ``user_weights``) or infinite (``priority``
    without aging) reaches the gateway's config as given."""
    params = {"aging_interval_s": math.inf, "max_wait_s": 1e9}
    text = sage_config_toml(
        Preset("p", "priority", "load_balanced", policy_params=params),
        ["http://127.0.0.1:8001"], model="m", max_concurrent=8,
    )  # fmt: skip
    assert parse_config(text).manager_kwargs()["policy_params"] == params
    weights = {"team a": 2.0, "": 0.5, 'q"uote': 3}
    text = sage_config_toml(
        Preset("p", "fair", "load_balanced", policy_params={"user_weights": weights}),
        ["http://127.0.0.1:8001"], model="m", max_concurrent=8,
    )  # fmt: skip
    kwargs = parse_config(text).manager_kwargs()
    assert kwargs["policy_params"] == {"user_weights": weights}
    assert toml_value([1, -math.inf, "x"]) == '[1, -inf, "x"]'


def test_compare_config_validates() -> None:
    with pytest.raises(ConfigError):
        CompareConfig(engines=0)
    with pytest.raises(ConfigError):
        CompareConfig(peers=("nginx",))
    with pytest.raises(ConfigError):
        CompareConfig(rates=(1.0, -1.0))
    # a peer or a peer policy given twice would run twice, reported under one name
    with pytest.raises(ConfigError, match="vllm-router is given twice") as info:
        CompareConfig(peers=("vllm-router", "vllm-router"))
    assert info.value.key == "peers"
    twice: dict[str, tuple[str, ...]] = {"vllm-router": ("round_robin", "round_robin")}
    with pytest.raises(ConfigError, match="round_robin is given twice") as info:
        CompareConfig(peers=("vllm-router",), peer_policies=twice)
    assert info.value.key == "peer_policies"


def test_lora_adapters_reach_the_workload_the_engines_and_the_gateways_config() -> None:
    cfg = CompareConfig(workload="synthetic", peers=(), lora_adapters=3, max_loras=2)
    assert cfg.adapter_names == ["lora-0", "lora-1", "lora-2"]
    workload = cfg.workload_at(10.0, 20.0)
    assert {r.model for r in workload} == {"lora-0", "lora-1", "lora-2"}
    assert cfg.engine_args() == [
        "--lora-modules=lora-0", "--lora-modules=lora-1", "--lora-modules=lora-2",
        "--max-loras=2",
    ]  # fmt: skip
    plain = CompareConfig(workload="synthetic", peers=())
    assert plain.engine_args() == [] and {r.model for r in plain.workload_at(10.0, 2.0)} == {
        plain.model
    }
    text = sage_config_toml(
        Preset("p", "fifo", "load_balanced"), ["http://127.0.0.1:8001"], model="m",
        max_concurrent=8, lora_adapters=cfg.adapter_names,
    )  # fmt: skip
    (instance,) = parse_config(text).execution_instances()
    assert instance.lora_adapters == ["lora-0", "lora-1", "lora-2"]
    for bad in ({"lora_adapters": -1}, {"max_loras": 0}):
        with pytest.raises(ConfigError) as info:
            CompareConfig(peers=(), **bad)  # type: ignore[arg-type]
        assert info.value.key == next(iter(bad))


def test_calibration_counts_the_engines_lora_slots() -> None:
    """With more adapters in use than a batch holds, the fleet serves fewer requests a
    second than for the model alone."""
    cfg = CompareConfig(workload="synthetic", peers=(), lora_adapters=8, max_loras=1)
    probe = cfg.workload_at(1.0, 300)
    plain = calibrate_capacity(
        replace(probe, requests=tuple(replace(r, model=None) for r in probe)), engines=2
    )
    lora = calibrate_capacity(probe, engines=2, lora_adapters=cfg.adapter_names, max_loras=1)
    assert 0 < lora < plain * 0.8


def test_a_rate_a_trace_cannot_supply_is_refused_before_any_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found after the earlier rates had run, it had thrown their results away."""
    trace = tmp_path / "t.jsonl"
    trace.write_text(
        "".join(
            json.dumps({"timestamp": i * 100, "input_length": 20, "output_length": 4}) + "\n"
            for i in range(10)
        )
    )
    started: list[int] = []

    async def no_engines(*args: object, **kwargs: object) -> None:
        started.append(1)
        raise AssertionError("an engine started")

    monkeypatch.setattr("sage_llm.bench.procs.start_engine_sims", no_engines)
    cfg = CompareConfig(
        workload=f"trace:{trace}", presets=(Preset("fifo + round_robin", "fifo", "round_robin"),),
        peers=(), engines=1, rates=(2.0, 100.0), duration_s=1.0, out=tmp_path,
    )  # fmt: skip
    with pytest.raises(ConfigError, match="fewer than the 100"):
        asyncio.run(run_compare(cfg))
    assert started == []


def test_run_compare_tiny_end_to_end(tmp_path: Path) -> None:
    """One preset over one engine-sim process through a `sage-llm serve` process."""
    cfg = CompareConfig(
        workload="synthetic",
        presets=(Preset("fifo + round_robin", "fifo", "round_robin"),),
        peers=(),
        engines=1,
        rates=(4.0,),
        duration_s=1.0,
        out=tmp_path,
    )
    messages: list[str] = []
    result = asyncio.run(run_compare(cfg, messages.append))
    (entry,) = result.entries
    assert entry.kind == "sage" and entry.rate_rps == 4.0
    assert entry.summary.count == 4 and entry.summary.ok == 4
    assert entry.summary.output_token_throughput > 0
    # the engines' prefix-cache counters over the run (engine-sim exports vLLM's)
    assert 0.0 <= entry.extra["prefix_hit_rate"] <= 1.0
    assert prefix_hit_rates(result.entries) == {entry.name: entry.extra["prefix_hit_rate"]}
    assert any("goodput" in m for m in messages)
    json_path, html_path = write_reports(result)
    data = json.loads(json_path.read_text())
    assert data["entries"][0]["summary"]["ok"] == 4
    assert data["config"]["rates_used"] == [4.0]
    assert html_path.exists()


def test_overload_compare_tiny_on_virtual_time() -> None:
    entries, capacity = overload_compare(
        engines=1, duration_s=6.0, max_concurrent=4, calibration_requests=40,
        presets=(Preset("priority + load_balanced", "priority", "load_balanced"),),
    )  # fmt: skip
    assert capacity > 0
    (entry,) = entries
    assert entry.rate_rps == pytest.approx(2.0 * capacity)
    assert entry.summary.count == entry.summary.ok > 0
    assert set(entry.summary.slo_attainment_by_priority) <= set(RequestPriority)


def _peers_required() -> bool:
    flag = os.environ.get("SAGE_LLM_REQUIRE_PEERS")
    if flag is None:
        flag = os.environ.get("CI", "")
    return flag.strip().lower() in {"1", "true", "yes"}


@pytest.mark.slow
def test_run_compare_with_lora_adapters_end_to_end(tmp_path: Path) -> None:
    """Two engine-sim processes serving 4 adapters (one a batch) behind `sage-llm serve`:
    every request, each for an adapter, completes."""
    cfg = CompareConfig(
        workload="synthetic", presets=(Preset("fifo + load_balanced", "fifo", "load_balanced"),),
        peers=(), engines=2, rates=(4.0,), duration_s=2.0, out=tmp_path, lora_adapters=4,
    )  # fmt: skip
    result = asyncio.run(run_compare(cfg))
    (entry,) = result.entries
    assert entry.summary.count == 8 and entry.summary.ok == 8, entry.summary.errors
    assert result.config.to_dict()["lora_adapters"] == 4


def test_run_compare_with_both_peers(tmp_path: Path) -> None:
    """Both peer routers (round_robin) over one engine-sim each: every request completes
    and the target check compares against the best of them (the one peer test; installs
    each peer into its own virtualenv on first use)."""
    for name in ("vllm-router", "sglang-router"):
        try:
            ensure_peer_sync(name)
        except PeerError as exc:
            if _peers_required():
                pytest.fail(f"{name} could not be installed: {exc.message}")
            pytest.skip(f"{name} could not be installed (no network to PyPI?): {exc.message}")
    cfg = CompareConfig(
        workload="multi-turn",
        presets=(),
        peers=("vllm-router", "sglang-router"),
        peer_policies={"vllm-router": ("round_robin",), "sglang-router": ("round_robin",)},
        engines=1,
        rates=(2.0,),
        duration_s=2.0,
        out=tmp_path,
    )
    result = asyncio.run(run_compare(cfg))
    assert [e.name for e in result.entries] == [
        "vllm-router round_robin",
        "sglang-router round_robin",
    ]
    for entry in result.entries:
        assert entry.kind == "peer"
        assert entry.summary.failed == 0, entry.summary.errors
        assert entry.summary.ok == entry.summary.count > 0


def test_parse_preset_knows_the_policies_and_strategies() -> None:
    with pytest.raises(ConfigError, match=r"^presets: preset 'fifo\+nosuch': unknown routing "):
        parse_preset("fifo+nosuch")
    with pytest.raises(ConfigError, match=r"preset 'nosuch\+locality': unknown scheduling policy"):
        parse_preset("nosuch+locality")


def test_compare_config_checks_every_field_with_a_clear_message(tmp_path: Path) -> None:
    bad: list[tuple[dict[str, object], str]] = [
        ({"engines": 0}, "engines: must be >= 1, got 0"),
        ({"speed": float("nan")}, "speed: must be a finite number > 0, got nan"),
        ({"load": 0.0}, "load: must be a finite number > 0, got 0"),
        ({"duration_s": -1.0}, "duration_s: must be a finite number > 0, got -1"),
        ({"rates": (1.0, float("inf"))}, "rates: must be a finite number > 0, got inf"),
        ({"max_concurrent": 0}, "max_concurrent: must be >= 1, got 0"),
        ({"workload": "nope"}, "workload: unknown workload 'nope' (known: multi-turn, "),
        ({"workload": f"trace:{tmp_path}/none.jsonl"}, "workload: no trace file at "),
        ({"peers": ("nginx",)}, "peers: unknown peer router 'nginx' (known: sglang-router, "),
        (
            {"peers": ("sglang-router",), "peer_policies": {"sglang-router": ("kv_aware",)}},
            "peer_policies: sglang-router has no policy 'kv_aware'",
        ),
    ]
    for kwargs, message in bad:
        with pytest.raises(ConfigError) as info:
            CompareConfig(**kwargs)  # type: ignore[arg-type]
        assert info.value.message.startswith(message), info.value.message


def test_compare_main_refuses_a_bad_preset_before_starting_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def never(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the comparison ran")

    monkeypatch.setattr("sage_llm.bench.compare.run_compare", never)
    with pytest.raises(ConfigError, match="unknown routing strategy 'nosuch'") as info:
        compare_main(presets=["fifo+nosuch"], peers=[], out=tmp_path)
    assert info.value.message.count("error") == 0
    assert not any(tmp_path.iterdir())


def test_one_engine_leaves_the_peers_power_of_two_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The peer routers refuse power_of_two over one worker: asked for, it is refused
    before anything starts; by default it is left out (it had failed the run at its end)."""
    ran: list[CompareConfig] = []

    async def record(cfg: CompareConfig, _status: object) -> None:
        ran.append(cfg)
        raise RuntimeError("stop here")

    monkeypatch.setattr("sage_llm.bench.compare.run_compare", record)
    with pytest.raises(ConfigError, match=r"^peer_policies: power_of_two needs at least 2"):
        compare_main(engines=1, peer_policies=["power_of_two"], out=tmp_path / "a")
    assert not ran
    with pytest.raises(RuntimeError, match="stop here"):
        compare_main(engines=1, out=tmp_path / "b")
    assert ran[0].peer_policies == {
        "vllm-router": ("round_robin", "cache_aware"),
        "sglang-router": ("round_robin", "cache_aware"),
    }
    with pytest.raises(RuntimeError, match="stop here"):  # no peers: no peer policies
        compare_main(engines=1, peers=(), out=tmp_path / "c")
    assert ran[1].peer_policies == {}


ENGINE_METRICS = """\
# HELP vllm:prefix_cache_queries_total Prefix-cache queries, in tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{{engine="0",model_name="m"}} {queries}
# HELP vllm:prefix_cache_hits_total Prefix-cache hits, in tokens.
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{{engine="0",model_name="m"}} {hits}
vllm:num_requests_running{{engine="0",model_name="m"}} 0.0
"""


def test_prefix_hit_rate_is_the_increase_of_the_engines_counters() -> None:
    def counters(queries: float, hits: float) -> tuple[float, float]:
        got = prefix_counters(
            parse_prometheus_text(ENGINE_METRICS.format(queries=queries, hits=hits))
        )
        assert got is not None
        return got

    assert counters(100.0, 40.0) == (100.0, 40.0)
    assert prefix_counters(parse_prometheus_text("vllm:num_requests_running 0\n")) is None
    older = parse_prometheus_text("vllm:prefix_cache_queries 8\nvllm:prefix_cache_hits 2\n")
    assert prefix_counters(older) == (8.0, 2.0)
    before = {"a": counters(100.0, 40.0), "b": counters(0.0, 0.0)}
    after = {"a": counters(1100.0, 540.0), "b": counters(1000.0, 700.0)}
    # (500 + 700) hits of (1000 + 1000) queries during the run; before it: left out
    assert prefix_hit_delta(before, after) == pytest.approx(0.6)
    assert prefix_hit_delta(None, after) is None
    assert prefix_hit_delta(before, before) is None  # no query in between
    # not the same engines (one left between the snapshots): no rate of theirs to compare
    assert prefix_hit_delta(before, {"a": after["a"]}) is None
    assert prefix_hit_delta(before, {**after, "c": counters(10.0, 5.0)}) is None


def test_prefix_hit_rates_come_from_the_entries_that_have_one() -> None:
    s = summarize([], 1.0)
    entries = [Entry("a", "sage", s, extra={"prefix_hit_rate": 0.25}), Entry("b", "peer", s)]
    assert prefix_hit_rates(entries) == {"a": 0.25}


def test_the_overload_title_names_the_offered_rate_and_the_capacity() -> None:
    title = overload_title(2.0, 20.16)
    assert title.startswith("offered 40.32 req/s = 2.0x capacity (20.16 req/s)")


def test_prefix_hit_rate_pools_the_engines_by_their_queries() -> None:
    before = {"a": (0.0, 0.0), "b": (0.0, 0.0)}
    after = {"a": (100.0, 10.0), "b": (900.0, 900.0)}
    # 910 hits of 1000 queries, not the mean of the engines' rates (0.55)
    assert prefix_hit_delta(before, after) == pytest.approx(0.91)


@pytest.mark.parametrize("kind", ["multi-turn", "sharegpt", "synthetic"])
def test_build_workload_is_seeded(kind: str) -> None:
    def make(seed: int) -> list[tuple[float, int, int]]:
        w = build_workload(kind, rate=4.0, duration_s=10.0, seed=seed)
        return [(r.arrival_s, r.prompt_tokens, r.max_tokens) for r in w]

    assert make(1) == make(1)
    assert make(1) != make(2)


def test_the_target_check_picks_the_best_by_goodput() -> None:
    base = summarize([], 1.0)
    more_done = replace(base, goodput=1.0, request_throughput=9.0)
    more_good = replace(base, goodput=2.0, request_throughput=3.0)
    entries = [
        Entry("done", "sage", more_done, rate_rps=1.0),
        Entry("good", "sage", more_good, rate_rps=1.0),
        Entry("peer", "peer", more_done, rate_rps=1.0),
    ]
    check = target_check(entries)
    assert check is not None
    assert check.best_sage == "good"
    assert check.goodput_ratio == pytest.approx(2.0)


def test_overload_compare_runs_every_preset_on_the_same_workload(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runs: list[tuple[str, int]] = []

    def fake_run(preset: Preset, workload: Workload, *args: Any, **kwargs: Any) -> Any:
        runs.append((preset.name, len(workload)))
        return SimpleNamespace(summary=summarize([], 1.0), measurements=[], prefix_hit_rate=0.0)

    monkeypatch.setattr(compare, "calibrate_capacity", lambda *a, **k: 2.0)
    monkeypatch.setattr(compare, "run_preset", fake_run)
    entries, capacity = overload_compare(duration_s=10.0)
    names = [p.name for p in compare.OVERLOAD_PRESETS]
    assert [e.name for e in entries] == names
    assert [name for name, _ in runs] == names
    assert len({n for _, n in runs}) == 1
    assert capacity == 2.0


def test_overload_main_prints_the_table_and_writes_both_reports(tmp_path: Path) -> None:
    """``sage-llm bench compare --overload``, end to end on virtual time at a small size:
    one row per preset under the title naming the offered rate, and the JSON report (with
    the calibrated capacity) and the HTML one written where it says."""
    console = Console(width=200, record=True)
    out = tmp_path / "overload"
    assert overload_main(engines=1, duration_s=4.0, max_concurrent=4, out=out, console=console) == 0
    flat = " ".join(console.export_text().split())
    data = json.loads((out / "overload.json").read_text())
    capacity = data["config"]["capacity_rps"]
    assert capacity > 0 and data["config"]["engines"] == 1
    assert " ".join(overload_title(2.0, capacity).split()) in flat
    names = [p.name for p in compare.OVERLOAD_PRESETS]
    assert [e["name"] for e in data["entries"]] == names
    for name in names:
        assert f"│ {name} │" in flat
    html = next(out.glob("*.html"))
    assert f"wrote {out / 'overload.json'} and {html}" in flat
