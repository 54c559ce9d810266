"""The cluster simulator's promises on random workloads (hypothesis), for every
scheduling policy and routing strategy: one measurement per request, a completed one with
its tokens and ordered times, a failed one with its reason; percentiles in order; the
throughput as documented; every instance's work, bound and KV cache accounted back to
zero."""

from __future__ import annotations

import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sage_llm.bench.stats import SLO
from sage_llm.bench.workload_core import Workload, WorkloadRequest
from sage_llm.control_plane.routing.registry import ROUTING_NAMES
from sage_llm.control_plane.scheduling.registry import POLICY_NAMES
from sage_llm.sim.cluster import ClusterSimulator, make_fleet
from sage_llm.types import RequestPriority

_REQUEST = st.tuples(
    st.integers(1, 3000),  # prompt tokens (some beyond a small KV cache)
    st.integers(1, 300),  # max tokens
    st.floats(0, 0.3),  # gap to the previous arrival
    st.sampled_from(list(RequestPriority)),
    st.integers(0, 3),  # user (and session, and shared prefix)
    st.one_of(st.none(), st.floats(0.001, 2)),  # TTFT SLO
)
_Request = tuple[int, int, float, RequestPriority, int, float | None]


def _workload(requests: list[_Request]) -> Workload:
    out, t = [], 0.0
    for i, (n, max_tokens, gap, priority, user, slo) in enumerate(requests):
        t += gap
        out.append(
            WorkloadRequest(
                f"r{i}",
                t,
                [user * 7919 + k for k in range(n)],
                n,
                max_tokens,
                priority=priority,
                user_id=f"u{user}",
                session_id=f"s{user}",
                slo_ttft_s=slo,
            )
        )
    return Workload("properties", tuple(out))


@settings(derandomize=True, max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.lists(_REQUEST, min_size=1, max_size=30),
    st.integers(1, 4),
    st.sampled_from(POLICY_NAMES),
    st.sampled_from(ROUTING_NAMES),
    st.integers(1, 6),
    st.integers(40, 400),
    st.integers(1, 20),
    st.sampled_from([None, 0.05, 1.0]),
)
def test_every_request_is_measured_once_and_every_instance_ends_empty(
    requests: list[_Request],
    instances: int,
    policy: str,
    routing: str,
    bound: int,
    blocks: int,
    queue_size: int,
    stats_interval_s: float | None,
) -> None:
    workload = _workload(requests)
    fleet = make_fleet(instances, max_concurrency=bound, num_gpu_blocks=blocks, max_num_seqs=4)
    sim = ClusterSimulator(
        fleet,
        policy=policy,
        routing=routing,
        max_queue_size=queue_size,
        stats_interval_s=stats_interval_s,
    )
    result = sim.run(workload, slo=SLO(ttft_s=0.5, tpot_s=None))
    by_id = {r.request_id: r for r in workload}
    assert sorted(m.request_id for m in result.measurements) == sorted(by_id)
    for m in result.measurements:
        asked = by_id[m.request_id]
        assert m.arrival_s == asked.arrival_s
        if m.ok:
            assert m.error is None and m.output_tokens == asked.max_tokens
            assert m.first_token_s is not None
            assert m.arrival_s <= m.first_token_s <= m.end_s
        else:
            assert m.error
    summary = result.summary
    assert summary.count == len(workload) and summary.ok + summary.failed == summary.count
    for stats in (summary.ttft, summary.tpot, summary.e2e, summary.itl):
        if stats is not None:
            assert stats.p50 <= stats.p90 <= stats.p99 <= stats.max
    if summary.ok:
        assert math.isclose(summary.request_throughput, summary.ok / result.sim_time_s)
    assert sum(u.completed for u in result.instances) == summary.ok
    generated = sum(m.output_tokens for m in result.measurements if m.ok)
    assert sum(u.tokens_generated for u in result.instances) == generated
    for u in result.instances:
        assert 0 <= u.utilization <= 1 and u.max_in_flight <= u.max_concurrency
    for slot in sim._slots:  # everything accounted back to zero
        assert (slot.state.in_flight, slot.state.queued_prefill_tokens) == (0, 0)
        assert slot.state.outstanding_decode_tokens == 0
        assert not slot.core.has_work() and slot.core.kv_usage == 0.0
