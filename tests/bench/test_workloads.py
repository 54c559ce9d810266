"""Tests of the benchmark workload generators."""

from __future__ import annotations

import itertools
import json
import math
import statistics
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from sage_llm.bench.sharegpt import DatasetNotFoundError
from sage_llm.bench.stats import SLO
from sage_llm.bench.workload_core import evolve
from sage_llm.bench.workloads import (
    TRACE_BLOCK_TOKENS,
    Empirical,
    Fixed,
    LogNormal,
    Uniform,
    Workload,
    WorkloadRequest,
    arrival_times,
    as_length_dist,
    multi_turn,
    scale_rate,
    sharegpt,
    sharegpt_like,
    synthetic,
    text_prompt,
    token_block,
    trace_replay,
    with_adapters,
    with_priorities,
)
from sage_llm.errors import ConfigError
from sage_llm.tokens import count_tokens, split
from sage_llm.types import RequestPriority

TRACES = Path("/work/shared/data/traces")
B = TRACE_BLOCK_TOKENS


def assert_well_formed(workload: Workload) -> None:
    arrivals = [r.arrival_s for r in workload]
    assert arrivals == sorted(arrivals)
    assert len({r.request_id for r in workload}) == len(workload)
    for r in workload:
        assert count_tokens(r.prompt) == r.prompt_tokens
        assert r.max_tokens >= 1


# --- prompts and length distributions -------------------------------------------------


def test_text_prompts_have_exact_token_counts() -> None:
    rng = np.random.default_rng(0)
    for n in [*range(40), 511, 512, 513, 4096]:
        text = text_prompt(rng, n)
        assert count_tokens(text) == n
    sample = text_prompt(rng, 200)
    assert all(len(piece.strip()) <= 8 for piece in split(sample))
    assert sample[0] != " "


def test_token_blocks_are_fixed_per_id_and_salt() -> None:
    assert token_block(0, [7]) == token_block(0, [7])
    assert token_block(0, [3, 7])[B:] == token_block(0, [7])
    assert token_block(0, [7]) != token_block(1, [7])
    assert token_block(0, [7]) != token_block(0, [8])
    ids = token_block(5, range(4))
    assert len(ids) == 4 * B
    assert min(ids) >= 256
    assert max(ids) < 32000


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (128, Fixed(128)),
        ("fixed:64", Fixed(64)),
        ("uniform:10,20", Uniform(10, 20)),
        ("lognormal:250,1.0", LogNormal(250, 1.0)),
        ("lognormal:250,1.0,4,4096", LogNormal(250, 1.0, 4, 4096)),
        ("empirical:3,1,2", Empirical((3, 1, 2))),
        ([5, 6], Empirical((5, 6))),
        (Uniform(1, 2), Uniform(1, 2)),
    ],
)
def test_length_dist_specs(spec: object, expected: object) -> None:
    assert as_length_dist(spec) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("spec", ["fixed", "uniform:5", "gauss:1,2", "fixed:x", 0, [], True])
def test_bad_length_dist_specs(spec: object) -> None:
    with pytest.raises(ConfigError, match="length"):
        as_length_dist(spec)  # type: ignore[arg-type]


def test_length_dist_samples() -> None:
    rng = np.random.default_rng(1)
    assert Fixed(9).sample(rng, 3) == [9, 9, 9]
    uniform = Uniform(3, 5).sample(rng, 3000)
    assert set(uniform) == {3, 4, 5}
    lognormal = LogNormal(250, 1.0, lo=4, hi=4096).sample(rng, 20000)
    assert min(lognormal) >= 4
    assert max(lognormal) == 4096  # the tail is clipped, not dropped
    assert statistics.median(lognormal) == pytest.approx(250, rel=0.05)
    assert set(Empirical((2, 7)).sample(rng, 100)) == {2, 7}
    with pytest.raises(ConfigError):
        Uniform(5, 3)
    with pytest.raises(ConfigError):
        LogNormal(100, 1.0, lo=10, hi=5)


# --- arrivals and synthetic -----------------------------------------------------------


def test_poisson_rate_within_statistical_tolerance() -> None:
    arrivals = arrival_times(20000, 8.0, np.random.default_rng(3))
    assert arrivals[0] == 0.0
    assert (len(arrivals) - 1) / arrivals[-1] == pytest.approx(8.0, rel=0.03)  # ~4 sigma
    gaps = np.diff(arrivals)
    assert np.std(gaps) / np.mean(gaps) == pytest.approx(1.0, rel=0.05)


def test_gamma_burstiness_is_the_gap_cv() -> None:
    arrivals = arrival_times(20000, 4.0, np.random.default_rng(4), arrival="gamma", burstiness=3)
    gaps = np.diff(arrivals)
    assert 1 / np.mean(gaps) == pytest.approx(4.0, rel=0.1)
    assert np.std(gaps) / np.mean(gaps) == pytest.approx(3.0, rel=0.15)


def test_uniform_closed_and_infinite_rate_arrivals() -> None:
    rng = np.random.default_rng(0)
    assert arrival_times(4, 2.0, rng, arrival="uniform") == [0.0, 0.5, 1.0, 1.5]
    assert arrival_times(3, 2.0, rng, arrival="closed") == [0.0, 0.0, 0.0]
    assert arrival_times(3, float("inf"), rng) == [0.0, 0.0, 0.0]
    assert arrival_times(0, 1.0, rng) == []
    with pytest.raises(ConfigError, match="arrival"):
        arrival_times(3, 1.0, rng, arrival="bursty")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="rate"):
        arrival_times(3, 0.0, rng)


def test_synthetic_shapes() -> None:
    workload = synthetic(500, 20.0, "uniform:16,64", 32, n_users=3, seed=1)
    assert len(workload) == 500
    assert_well_formed(workload)
    assert all(isinstance(r.prompt, str) for r in workload)
    assert {r.max_tokens for r in workload} == {32}
    assert all(16 <= r.prompt_tokens <= 64 for r in workload)
    assert {r.user_id for r in workload} == {"user-0", "user-1", "user-2"}
    assert workload.duration_s == workload.requests[-1].arrival_s
    assert workload.params["n"] == 500


def test_synthetic_is_deterministic_per_seed() -> None:
    first = synthetic(200, 5.0, "lognormal:100,1", "uniform:1,50", seed=7)
    assert first == synthetic(200, 5.0, "lognormal:100,1", "uniform:1,50", seed=7)
    other = synthetic(200, 5.0, "lognormal:100,1", "uniform:1,50", seed=8)
    assert [r.arrival_s for r in first] != [r.arrival_s for r in other]
    assert [r.prompt for r in first] != [r.prompt for r in other]


def test_sharegpt_like_lengths() -> None:
    workload = sharegpt_like(2000, 10.0, seed=2)
    assert_well_formed(workload)
    inputs = [r.prompt_tokens for r in workload]
    outputs = [r.max_tokens for r in workload]
    assert statistics.median(inputs) == pytest.approx(250, rel=0.1)
    assert max(inputs) <= 4096
    assert sum(i > 2000 for i in inputs) > 0  # a long tail
    assert statistics.median(outputs) == pytest.approx(200, rel=0.1)
    summary = workload.summary()
    assert summary["rate_rps"] == pytest.approx(10.0, rel=0.05)
    assert summary["prompt_tokens"]["p50"] == pytest.approx(statistics.median(inputs))


def test_summary_contents() -> None:
    workload = with_priorities(synthetic(10, 1.0, 8, 4, arrival="uniform", seed=0), {"high": 1.0})
    summary = workload.summary()
    assert summary["requests"] == 10
    assert summary["duration_s"] == pytest.approx(9.0)
    assert summary["rate_rps"] == pytest.approx(1.0)
    assert summary["prompt_tokens"] == {
        "mean": 8.0,
        "p50": 8.0,
        "p90": 8.0,
        "p99": 8.0,
        "max": 8,
        "total": 80,
    }
    assert summary["priorities"] == {"high": 10}
    assert summary["text_prompts"] == 10
    assert Workload("empty", ()).summary()["rate_rps"] is None


# --- multi-turn -----------------------------------------------------------------------


def test_multi_turn_prefix_growth_and_shared_system_prompt() -> None:
    workload = multi_turn(6, 4, 0.5, think_time_s=2.0, system_prompt_tokens=100, seed=5)
    assert len(workload) == 24
    assert_well_formed(workload)
    by_session: dict[str, list[WorkloadRequest]] = {}
    for r in workload:
        assert isinstance(r.prompt, list)
        by_session.setdefault(r.session_id or "", []).append(r)
    system = workload.requests[0].prompt[:100]
    for turns in by_session.values():
        turns.sort(key=lambda r: r.turn)
        assert [r.turn for r in turns] == [0, 1, 2, 3]
        assert len({r.user_id for r in turns}) == 1
        for prev, cur in itertools.pairwise(turns):
            # Turn k's prompt = turn k-1's prompt + its reply (max_tokens long) + a new message.
            assert cur.prompt[: prev.prompt_tokens] == prev.prompt
            assert cur.prompt_tokens > prev.prompt_tokens + prev.max_tokens
            expected = 0.25 + prev.max_tokens * 0.03 + 2.0
            assert cur.arrival_s - prev.arrival_s == pytest.approx(expected)
        assert turns[0].prompt[:100] == system
    # After the system prompt, sessions diverge.
    first_turns = [turns[0].prompt for turns in by_session.values()]
    assert len({tuple(p[100:]) for p in first_turns}) == len(first_turns)


def test_multi_turn_determinism_and_cap() -> None:
    kwargs: dict[str, object] = {"system_prompt_tokens": 32, "seed": 11}
    first = multi_turn(5, "uniform:2,6", 1.0, **kwargs)  # type: ignore[arg-type]
    assert first == multi_turn(5, "uniform:2,6", 1.0, **kwargs)  # type: ignore[arg-type]
    assert first != multi_turn(5, "uniform:2,6", 1.0, system_prompt_tokens=32, seed=12)
    for cap in (260, 250):  # a prompt of exactly the cap is kept
        capped = multi_turn(
            5,
            10,
            1.0,
            user_turn_tokens=50,
            output_tokens=50,
            system_prompt_tokens=0,
            max_prompt_tokens=cap,
            seed=1,
        )
        # Prompts: 50, 150, 250, (350 > cap stops the session).
        assert Counter(r.turn for r in capped) == {0: 5, 1: 5, 2: 5}
        assert max(r.prompt_tokens for r in capped) == 250


# --- trace replay ---------------------------------------------------------------------


def write_mooncake(tmp_path: Path, rows: list[dict[str, object]], name: str) -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


MOONCAKE_ROWS: list[dict[str, object]] = [
    {"timestamp": 0, "input_length": 1300, "output_length": 20, "hash_ids": [0, 1, 2]},
    {"timestamp": 1000, "input_length": 1100, "output_length": 5, "hash_ids": [0, 1, 3]},
    {"timestamp": 2500, "input_length": 100, "output_length": 0, "hash_ids": [4]},
    {"timestamp": 2500, "input_length": 1500, "output_length": 7, "hash_ids": [0, 5]},
]


def test_mooncake_replay_shares_prefix_blocks(tmp_path: Path) -> None:
    workload = trace_replay(write_mooncake(tmp_path, MOONCAKE_ROWS, "t.jsonl"))
    assert_well_formed(workload)
    a, b, c, d = workload.requests
    assert [r.arrival_s for r in workload] == [0.0, 1.0, 2.5, 2.5]
    assert [r.prompt_tokens for r in workload] == [1300, 1100, 100, 1500]
    assert [r.max_tokens for r in workload] == [20, 5, 1, 7]  # a zero length becomes 1
    assert a.prompt[: 2 * B] == b.prompt[: 2 * B]  # hash ids 0, 1 shared
    assert a.prompt[2 * B : 3 * B] != b.prompt[2 * B : 3 * B]  # 2 vs 3
    assert a.prompt[:B] == d.prompt[:B]
    assert d.prompt[B : 2 * B] != a.prompt[B : 2 * B]
    assert c.prompt[:50] != a.prompt[:50]
    # Fewer ids than blocks: the rest is padded with blocks no other request has.
    assert len(d.prompt) == 1500
    assert workload.params["format"] == "mooncake"


def test_mooncake_replay_options(tmp_path: Path) -> None:
    path = write_mooncake(tmp_path, MOONCAKE_ROWS, "trace")  # no extension: sniffed
    full = trace_replay(path)
    fast = trace_replay(path, time_scale=0.5, limit=3, max_input_tokens=600)
    assert [r.arrival_s for r in fast] == [0.0, 0.5, 1.25]
    assert [r.prompt_tokens for r in fast] == [600, 600, 100]
    assert fast.requests[0].prompt == full.requests[0].prompt[:600]
    assert trace_replay(path, seed=0) == full
    salted = trace_replay(path, seed=1)
    assert salted.requests[0].prompt != full.requests[0].prompt
    assert salted.requests[0].prompt[:B] == salted.requests[1].prompt[:B]


def test_mooncake_rows_are_ordered_by_time(tmp_path: Path) -> None:
    rows = [dict(MOONCAKE_ROWS[1], timestamp=3000), MOONCAKE_ROWS[0]]
    workload = trace_replay(write_mooncake(tmp_path, rows, "t.jsonl"))
    assert [r.arrival_s for r in workload] == [0.0, 3.0]
    assert [r.prompt_tokens for r in workload] == [1300, 1100]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "invalid JSON"),
        ('{"timestamp": 0, "input_length": 5}', "missing output_length"),
        ('{"timestamp": 0, "input_length": -5, "output_length": 1}', "input_length"),
        ('{"timestamp": "x", "input_length": 5, "output_length": 1}', "timestamp"),
        ('{"timestamp": NaN, "input_length": 5, "output_length": 1}', "finite number, got nan"),
        ('{"timestamp": Infinity, "input_length": 5, "output_length": 1}', "got inf"),
        ('{"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": [0.5]}', "hash"),
    ],
)
def test_bad_mooncake_lines_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(MOONCAKE_ROWS[0]) + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=message) as info:
        trace_replay(path)
    assert info.value.location == f"{path}:2"


AZURE_CSV = (
    "TIMESTAMP,ContextTokens,GeneratedTokens\n"
    "2023-11-16 18:15:46.6805900,374,44\n"
    "2023-11-16 18:15:50.9951690,396,109\n"
    "2023-11-16 18:15:48.1805900,20,0"  # out of order, no trailing newline
)


def test_azure_replay(tmp_path: Path) -> None:
    path = tmp_path / "azure.csv"
    path.write_text(AZURE_CSV, encoding="utf-8")
    workload = trace_replay(path, seed=3)
    assert_well_formed(workload)
    assert [r.arrival_s for r in workload] == pytest.approx([0.0, 1.5, 4.314579])
    assert [r.prompt_tokens for r in workload] == [374, 20, 396]
    assert [r.max_tokens for r in workload] == [44, 1, 109]
    assert all(isinstance(r.prompt, str) for r in workload)
    assert workload == trace_replay(path, seed=3)
    assert workload.requests[0].prompt != trace_replay(path, seed=4).requests[0].prompt
    assert workload.params["format"] == "azure"


def test_bad_azure_files(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_text("TIMESTAMP,Tokens\n2023-11-16 18:15:46,3\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="missing columns ContextTokens, GeneratedTokens"):
        trace_replay(path)
    path.write_text(AZURE_CSV.replace("2023-11-16 18:15:50.9951690", "yesterday"))
    with pytest.raises(ConfigError, match="bad TIMESTAMP") as info:
        trace_replay(path)
    assert info.value.location == f"{path}:3"
    mixed = "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46+00:00,374,44\n"
    path.write_text(mixed + "2023-11-16 18:15:50,396,109\n")  # one zone, then none
    with pytest.raises(ConfigError, match="has no time zone where the first row's has one"):
        trace_replay(path)
    with pytest.raises(DatasetNotFoundError):
        trace_replay(tmp_path / "absent.jsonl")
    odd = tmp_path / "odd.txt"
    odd.write_text("hello\n")
    with pytest.raises(ConfigError, match="unknown trace format"):
        trace_replay(odd)


def chained_block_keys(prompt: list[int]) -> list[int]:
    """One key per full block that identifies the whole prefix up to the block's end."""
    keys, parent = [], 0
    for start in range(0, len(prompt) - len(prompt) % B, B):
        parent = hash((parent, tuple(prompt[start : start + B])))
        keys.append(parent)
    return keys


@pytest.mark.skipif(not TRACES.is_dir(), reason="shared trace data not available")
def test_real_mooncake_trace_prefix_reuse() -> None:
    path = TRACES / "conversation_trace.jsonl"
    workload = trace_replay(path, limit=1000)
    assert len(workload) == 1000
    assert all(r.prompt_tokens == len(r.prompt) for r in workload)
    # Reuse = share of full-block references seen in an earlier request, computed once
    # from the token ids and once from the trace's hash ids: equal ids gave equal prefixes.
    seen_keys: set[int] = set()
    seen_ids: set[int] = set()
    refs = reused_by_tokens = reused_by_ids = 0
    with path.open(encoding="utf-8") as f:
        rows = [json.loads(next(f)) for _ in range(1000)]
    for request, row in zip(workload, rows, strict=True):
        assert request.prompt_tokens == row["input_length"]
        assert isinstance(request.prompt, list)
        keys = chained_block_keys(request.prompt)
        ids = row["hash_ids"][: len(keys)]
        refs += len(keys)
        reused_by_tokens += sum(k in seen_keys for k in keys)
        reused_by_ids += sum(i in seen_ids for i in ids)
        seen_keys.update(keys)
        seen_ids.update(ids)
    assert reused_by_tokens == reused_by_ids
    assert reused_by_tokens / refs > 0.1  # the README reports 0.366 over the whole file


# --- ShareGPT workload ----------------------------------------------------------------


def test_sharegpt_workload_from_a_file(tmp_path: Path) -> None:
    conversations = [
        {
            "id": f"c{i}",
            "conversations": [
                {"from": "human", "value": f"question number {i} about caches and routing"},
                {"from": "gpt", "value": "an answer " * (i + 2)},
            ],
        }
        for i in range(6)
    ] + [
        {
            "id": "short",
            "conversations": [
                {"from": "human", "value": "hi"},
                {"from": "gpt", "value": "a long enough reply here"},
            ],
        }
    ]
    path = tmp_path / "sg.json"
    cut = {"id": "cut", "conversations": [{"from": "human", "value": "a truncated question"}]}
    path.write_text(json.dumps([*conversations, cut])[:-20], encoding="utf-8")
    workload = sharegpt(path, 6, 2.0, seed=1)
    assert_well_formed(workload)
    texts = {c["conversations"][0]["value"]: c for c in conversations}  # type: ignore[index]
    for r in workload:
        assert isinstance(r.prompt, str)
        source = texts[r.prompt]
        assert r.max_tokens == count_tokens(source["conversations"][1]["value"])  # type: ignore[index]
    assert workload == sharegpt(path, 6, 2.0, seed=1)
    assert [r.prompt for r in workload] != [r.prompt for r in sharegpt(path, 6, 2.0, seed=2)]
    with pytest.raises(ConfigError, match="only 6 usable"):  # "hi" is under 4 tokens
        sharegpt(path, 7, 2.0)
    with pytest.raises(DatasetNotFoundError):
        sharegpt(tmp_path / "absent.json", 1, 1.0)


# --- priorities and rate scaling ------------------------------------------------------


def test_with_priorities_mix_and_slos() -> None:
    base = synthetic(4000, 50.0, 8, 4, seed=3)
    workload = with_priorities(
        base,
        {RequestPriority.HIGH: 1, "normal": 3},
        {"high": (0.5, 0.05, None), RequestPriority.NORMAL: SLO(2.0, 0.1, e2e_s=30.0)},
        seed=9,
    )
    counts = Counter(r.priority for r in workload)
    assert counts[RequestPriority.HIGH] / len(workload) == pytest.approx(0.25, abs=0.03)
    for r in workload:
        if r.priority is RequestPriority.HIGH:
            assert (r.slo_ttft_s, r.slo_tpot_s, r.slo_e2e_s) == (0.5, 0.05, None)
        else:
            assert (r.slo_ttft_s, r.slo_tpot_s, r.slo_e2e_s) == (2.0, 0.1, 30.0)
    assert [r.prompt for r in workload] == [r.prompt for r in base]
    assert workload == with_priorities(
        base,
        {"high": 1, "normal": 3},
        {"high": (0.5, 0.05, None), "normal": (2.0, 0.1, 30.0)},
        seed=9,
    )
    assert workload.params["priority_mix"] == {"high": 1.0, "normal": 3.0}


def test_with_priorities_keeps_sessions_together() -> None:
    workload = with_priorities(multi_turn(40, 3, 2.0, seed=1), {"high": 1, "low": 1}, seed=2)
    by_session: dict[str | None, set[RequestPriority]] = {}
    for r in workload:
        by_session.setdefault(r.session_id, set()).add(r.priority)
    assert all(len(p) == 1 for p in by_session.values())
    assert {p for ps in by_session.values() for p in ps} == {
        RequestPriority.HIGH,
        RequestPriority.LOW,
    }


def test_with_priorities_keeps_the_targets_of_priorities_without_an_entry() -> None:
    base = synthetic(6, 5.0, 8, 4, seed=1)
    base = Workload(base.name, tuple(evolve(r, slo_ttft_s=2.0, slo_e2e_s=9.0) for r in base))
    workload = with_priorities(base, {"high": 1, "low": 1}, {"high": (0.5, None, 3.0)}, seed=3)
    targets = {(r.priority, r.slo_ttft_s, r.slo_tpot_s, r.slo_e2e_s) for r in workload}
    assert targets == {
        (RequestPriority.HIGH, 0.5, None, 3.0),
        (RequestPriority.LOW, 2.0, None, 9.0),
    }


@pytest.mark.parametrize(
    ("mix", "slos"),
    [
        ({}, None),
        ({"urgent": 1.0}, None),
        ({"high": -1.0}, None),
        ({"high": 0.0}, None),
        ({"high": 1.0}, {"high": (0.5, 0.1)}),
        ({"high": 1.0}, {"high": (0.0, None, None)}),
    ],
)
def test_with_priorities_bad_input(mix: dict[str, float], slos: object) -> None:
    with pytest.raises(ConfigError):
        with_priorities(synthetic(3, 1.0, seed=0), mix, slos)  # type: ignore[arg-type]


def test_with_adapters_asks_for_them_by_zipfs_law() -> None:
    names = ["a", "b", "c", "d"]
    workload = with_adapters(synthetic(4000, 50.0, 8, 4, seed=1), names, seed=2)
    counts = Counter(r.model for r in workload)
    assert set(counts) == set(names)
    assert counts["a"] / counts["d"] == pytest.approx(4.0, rel=0.2)  # 1 : 1/4
    flat = Counter(r.model for r in with_adapters(workload, names, zipf=0.0, seed=2))
    assert max(flat.values()) / min(flat.values()) < 1.2
    assert workload.params["adapters"] == 4 and workload.params["adapter_zipf"] == 1.0
    assert [r.prompt for r in workload] == [r.prompt for r in synthetic(4000, 50.0, 8, 4, seed=1)]


def test_with_adapters_keeps_sessions_together_and_some_on_the_model() -> None:
    base = multi_turn(60, 3, 2.0, seed=1, model="m")
    workload = with_adapters(base, ["x", "y"], share=0.5, seed=3)
    by_session: dict[str | None, set[str | None]] = {}
    for r in workload:
        by_session.setdefault(r.session_id, set()).add(r.model)
    assert all(len(m) == 1 for m in by_session.values())
    models = Counter(next(iter(m)) for m in by_session.values())
    assert set(models) == {"m", "x", "y"} and 15 < models["m"] < 45
    assert with_adapters(base, ["x"], seed=3) == with_adapters(base, ["x"], seed=3)


@pytest.mark.parametrize(
    ("adapters", "zipf", "share"),
    [([], 1.0, 1.0), (["a", "a"], 1.0, 1.0), ([""], 1.0, 1.0), (["a"], -1.0, 1.0),
     (["a"], math.nan, 1.0), (["a"], 1.0, 1.5)],
)  # fmt: skip
def test_with_adapters_bad_input(adapters: list[str], zipf: float, share: float) -> None:
    with pytest.raises(ConfigError):
        with_adapters(synthetic(3, 1.0, seed=0), adapters, zipf=zipf, share=share)


def test_scale_rate() -> None:
    base = synthetic(1000, 4.0, 8, 4, seed=6)
    faster = scale_rate(base, 2.0)
    assert [r.arrival_s for r in faster] == pytest.approx([r.arrival_s / 2 for r in base])
    assert faster.summary()["rate_rps"] == pytest.approx(2 * base.summary()["rate_rps"])
    assert [r.prompt for r in faster] == [r.prompt for r in base]
    assert scale_rate(faster, 0.25).params["rate_scale"] == 0.5
    for factor in (0.0, math.inf, math.nan):
        with pytest.raises(ConfigError, match="factor"):
            scale_rate(base, factor)


# --- validation -----------------------------------------------------------------------


def test_request_and_workload_validation() -> None:
    good = WorkloadRequest("r0", 0.0, "one two three", 3, 4)
    with pytest.raises(ValueError, match="has 3 tokens"):
        WorkloadRequest("r1", 0.0, "one two three", 4, 4)
    with pytest.raises(ValueError, match="arrival_s"):
        WorkloadRequest("r1", -1.0, [1, 2], 2, 4)
    with pytest.raises(ValueError, match="max_tokens"):
        WorkloadRequest("r1", 0.0, [1, 2], 2, 0)
    late = WorkloadRequest("r1", 5.0, [300, 301], 2, 1)
    with pytest.raises(ValueError, match="ordered"):
        Workload("w", (late, good))
    with pytest.raises(ValueError, match="unique"):
        Workload("w", (good, good))
    workload = Workload("w", (good, late))
    assert len(workload) == 2
    assert list(workload) == [good, late]
    assert workload.duration_s == 5.0


def test_with_priorities_draws_by_its_seed() -> None:
    base = synthetic(200, 10.0, 8, 4, seed=0)
    mix: dict[RequestPriority | int | str, float] = {"high": 1.0, "normal": 1.0}

    def drawn(seed: int) -> list[RequestPriority]:
        return [r.priority for r in with_priorities(base, mix, seed=seed)]

    assert drawn(5) == drawn(5)
    assert drawn(5) != drawn(6)
