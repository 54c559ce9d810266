"""The engine core's promises on random workloads (hypothesis): every accepted request
finishes exactly once with the tokens it asked for, or is aborted; the token counters never
go negative and count what was generated; every KV block is free once the work is done and
the pinned prefill legs are released."""

from __future__ import annotations

from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sage_llm.errors import InvalidRequestError
from sage_llm.sim.core import SimEngineConfig, SimEngineCore

_REQUESTS = st.lists(
    st.tuples(
        st.integers(1, 300),  # prompt tokens
        st.integers(1, 60),  # max tokens
        st.floats(0, 0.5),  # arrival
        st.integers(0, 3),  # prompt family (shared prefixes)
        st.booleans(),  # a PD prefill leg (its KV pinned at the end)
    ),
    min_size=1,
    max_size=25,
)
_ABORTS = st.lists(st.tuples(st.integers(0, 40), st.integers(0, 24), st.integers(0, 5)), max_size=8)
_SETTINGS = settings(
    derandomize=True, max_examples=150, deadline=None, suppress_health_check=list(HealthCheck)
)


@_SETTINGS
@given(
    _REQUESTS,
    _ABORTS,
    st.integers(4, 200),
    st.integers(1, 8),
    st.integers(16, 512),
    st.booleans(),
    st.booleans(),
)
def test_every_request_ends_once_and_every_block_comes_back(
    requests: list[tuple[int, int, float, int, bool]],
    aborts: list[tuple[int, int, int]],
    blocks: int,
    max_seqs: int,
    budget: int,
    chunked: bool,
    prefix: bool,
) -> None:
    core = SimEngineCore(
        SimEngineConfig(
            num_gpu_blocks=blocks,
            max_num_seqs=max_seqs,
            max_num_batched_tokens=budget if chunked else max(budget, 32768),
            enable_chunked_prefill=chunked,
            enable_prefix_caching=prefix,
        )
    )
    pending = sorted((arrival, i) for i, (_, _, arrival, _, _) in enumerate(requests))
    abort_at = {step: (f"r{index}", delivered) for step, index, delivered in aborts}
    asked: dict[str, int] = {}
    aborted: set[str] = set()
    tokens: Counter[str] = Counter()
    finished: Counter[str] = Counter()
    pinned: set[str] = set()
    now, step = 0.0, 0
    while pending or core.has_work():
        while pending and pending[0][0] <= now:
            i = pending.pop(0)[1]
            n, max_tokens, _, family, prefill_leg = requests[i]
            try:
                core.add_request(
                    f"r{i}",
                    [family * 1000 + k for k in range(n)],
                    max_tokens,
                    arrival=now,
                    kv_transfer={"do_remote_decode": True} if prefill_leg else None,
                )
            except InvalidRequestError:  # longer than the KV cache: refused, never queued
                continue
            asked[f"r{i}"] = 1 if prefill_leg else max_tokens  # a prefill leg makes one
        if step in abort_at:
            rid, delivered = abort_at[step]
            if rid in asked and not finished[rid] and core.abort(rid, delivered=delivered):
                aborted.add(rid)
                tokens[rid] = min(tokens[rid], delivered)  # what vLLM's counters keep
        if not core.has_work():
            if pending:
                now = max(now, pending[0][0])
            step += 1
            continue
        result = core.step(now)
        assert result.duration_s >= 0
        for rid, n_new in result.new_tokens:
            tokens[rid] += n_new
        for rid, _ in result.finished:
            finished[rid] += 1
        pinned.update(p.request_id for p in result.kv_pinned)
        stats = core.stats()
        assert stats.generation_tokens_total >= 0 and stats.prompt_tokens_total >= 0
        now += result.duration_s
        step += 1
        assert step < 100_000
    assert set(finished) | aborted == set(asked)
    assert all(count == 1 for count in finished.values()), finished
    for rid in finished:
        assert rid not in aborted and tokens[rid] == asked[rid], (rid, tokens[rid], asked[rid])
    assert core.stats().generation_tokens_total == sum(tokens.values())
    for rid in pinned:
        core.release_kv(rid)
    assert core.kv_usage == 0.0
