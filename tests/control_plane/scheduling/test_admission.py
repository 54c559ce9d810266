"""Shared admission checks: queue bound with a retry hint, deadline feasibility."""

from __future__ import annotations

from dataclasses import replace

import pytest

from sage_llm.control_plane.scheduling.admission import (
    QueueBound,
    best_predicted_e2e,
    check_deadline_feasible,
    check_queue_bound,
    eligible_instances,
    estimate_drain_s,
)
from sage_llm.control_plane.scheduling.base import ADMIT
from sage_llm.types import ExecutionInstanceType
from tests.factories import make_instance_view, make_request_info, make_snapshot


def test_queue_below_the_bound_is_admitted() -> None:
    assert check_queue_bound(9, 10, make_snapshot(2)) == ADMIT


def test_full_queue_is_refused_with_a_retry_estimate() -> None:
    snap = make_snapshot(2)
    verdict = check_queue_bound(10, 10, snap)
    assert not verdict.admitted
    assert "queue full" in verdict.reason
    assert verdict.retry_after_s is not None
    assert verdict.retry_after_s > 0
    further = check_queue_bound(500, 10, snap)
    assert further.retry_after_s is not None
    assert further.retry_after_s > verdict.retry_after_s


def test_a_queue_just_full_is_told_to_wait_for_one_request_to_start() -> None:
    """At the bound, one queued request must start before a slot frees: the retry hint is
    the drain of one request, not of none (the 0.1 s floor)."""
    snap = make_snapshot([make_instance_view("slow", max_concurrency=1, est_tpot_s=0.5)])
    one = estimate_drain_s(1, snap)
    assert one is not None and one > 10.0
    assert check_queue_bound(10, 10, snap).retry_after_s == pytest.approx(one)
    assert check_queue_bound(11, 10, snap).retry_after_s == pytest.approx(2 * one)


def test_retry_estimate_shrinks_with_a_bigger_fleet() -> None:
    small = estimate_drain_s(1000, make_snapshot(1))
    large = estimate_drain_s(1000, make_snapshot(8))
    assert small is not None
    assert large is not None
    assert large < small


def test_no_retry_estimate_without_a_live_instance() -> None:
    snap = make_snapshot([make_instance_view("down", healthy=False)])
    verdict = check_queue_bound(3, 3, snap)
    assert not verdict.admitted
    assert verdict.retry_after_s is None


def test_the_retry_estimate_counts_each_instances_concurrency() -> None:
    """The fleet's throughput is each instance's concurrency over its predicted e2e: twice
    the slots start the excess in half the time."""
    four = estimate_drain_s(100, make_snapshot([make_instance_view("a", max_concurrency=4)]))
    eight = estimate_drain_s(100, make_snapshot([make_instance_view("a", max_concurrency=8)]))
    assert four is not None and eight is not None
    assert eight == pytest.approx(four / 2)


def test_a_draining_instance_does_not_count_toward_the_retry_estimate() -> None:
    live = make_instance_view("a")
    draining = make_instance_view("b", accepting=False)
    alone = estimate_drain_s(100, make_snapshot([live]))
    assert alone is not None
    assert estimate_drain_s(100, make_snapshot([live, draining])) == pytest.approx(alone)
    assert estimate_drain_s(100, make_snapshot([draining])) is None
    assert check_queue_bound(3, 3, make_snapshot([draining])).retry_after_s is None


def test_queue_bound_object_and_bad_bound() -> None:
    bound = QueueBound(2)
    assert bound.check(1, make_snapshot(1)).admitted
    assert not bound.check(2, make_snapshot(1)).admitted
    with pytest.raises(ValueError, match="max_queue"):
        QueueBound(0)
    with pytest.raises(ValueError, match="max_queue"):
        check_queue_bound(0, 0, make_snapshot(1))


def test_eligible_ignores_load_but_not_health_model_role_or_exclusion() -> None:
    fleet = [
        make_instance_view("busy", in_flight=100),
        make_instance_view("sick", healthy=False),
        make_instance_view("other", model="other-model"),
        make_instance_view("failed-before"),
    ]
    req = make_request_info(excluded_instances=frozenset({"failed-before"}))
    assert [i.instance_id for i in eligible_instances(req, make_snapshot(fleet))] == ["busy"]


def test_best_predicted_e2e_picks_the_fastest_instance() -> None:
    fleet = [
        make_instance_view("slow", est_tpot_s=0.05),
        make_instance_view("fast", est_tpot_s=0.01),
        make_instance_view("fast-but-queued", est_tpot_s=0.01, queued_prefill_tokens=80_000),
    ]
    req = make_request_info(prompt_tokens=800, max_tokens=101)
    best = best_predicted_e2e(req, make_snapshot(fleet))
    assert best is not None
    inst, e2e = best
    assert inst.instance_id == "fast"
    assert e2e == pytest.approx(0.05 + 800 / 8000 + 100 * 0.01)


def test_deadline_feasibility() -> None:
    snap = make_snapshot([make_instance_view("i0", est_tpot_s=0.02)], now=0.0)
    # predicted e2e: 0.05 + 100/8000 + 49 * 0.02 = 1.0425 s
    assert check_deadline_feasible(make_request_info(slo_s=2.0), snap).admitted
    assert check_deadline_feasible(make_request_info(), snap).admitted
    late = check_deadline_feasible(make_request_info(slo_s=0.5), snap)
    assert not late.admitted
    assert "deadline" in late.reason
    assert "i0" in late.reason
    assert late.retry_after_s is None


def test_a_tpot_not_known_at_the_requests_batch_refuses_only_by_its_ttft() -> None:
    """A TPOT learnt only in bigger batches (a burst's), or still the prior, is no bound
    from below: a deadline refused for it was refused for good (a refused request never
    runs to correct it). Only what is known, the TTFT, refuses then."""
    known = make_instance_view("i0", est_tpot_s=0.02)  # 1.0425 s predicted, as above
    unknown = make_instance_view("i0", est_tpot_s=0.02, tpot_known=False)
    req = make_request_info(slo_s=0.5)
    assert not check_deadline_feasible(req, make_snapshot([known])).admitted
    assert check_deadline_feasible(req, make_snapshot([unknown])).admitted
    assert check_deadline_feasible(req, make_snapshot([known, unknown])).admitted
    # the time to first token alone (0.0625 s) is past the deadline: refused
    hopeless = check_deadline_feasible(make_request_info(slo_s=0.05), make_snapshot([unknown]))
    assert not hopeless.admitted and "1.042s" in hopeless.reason
    # the time to first token (0.5 + 500/1000 = 1.0 s) exactly at the deadline: admitted
    at = replace(unknown, est_ttft_base_s=0.5, est_prefill_tps=1000.0)
    just = make_request_info(prompt_tokens=500, max_tokens=50, slo_s=1.0)
    assert check_deadline_feasible(just, make_snapshot([at])).admitted
    pd = [replace(v, tpot_known=False) if v.role.runs_decode else v for v in PD_FLEET]
    pd_req = make_request_info(prompt_tokens=800, max_tokens=100, slo_s=0.5)
    assert not check_deadline_feasible(pd_req, make_snapshot(PD_FLEET)).admitted
    assert check_deadline_feasible(pd_req, make_snapshot(pd)).admitted
    # by the fastest prefill leg (p1's 0.15 s), not the slowest (p2's 1.1 s)
    slow = make_instance_view("p2", role=ExecutionInstanceType.PREFILLING, est_ttft_base_s=1.0)
    assert check_deadline_feasible(pd_req, make_snapshot([*pd, slow])).admitted


def test_deadline_counts_from_now_not_from_arrival() -> None:
    req = make_request_info(arrival=0.0, slo_s=2.0)
    assert check_deadline_feasible(req, make_snapshot(1, now=0.5)).admitted
    assert not check_deadline_feasible(req, make_snapshot(1, now=1.5)).admitted


def test_feasibility_cannot_be_judged_without_instances() -> None:
    req = make_request_info(slo_s=0.001)
    assert check_deadline_feasible(req, make_snapshot(0)).admitted


PD_FLEET = [
    make_instance_view("p0", role=ExecutionInstanceType.PREFILLING, est_prefill_tps=4000.0),
    make_instance_view("p1", role=ExecutionInstanceType.PREFILLING, est_prefill_tps=8000.0),
    make_instance_view("d0", role=ExecutionInstanceType.DECODING, est_tpot_s=0.02),
    make_instance_view("d1", role=ExecutionInstanceType.DECODING, est_tpot_s=0.01),
]


def test_a_fleet_of_pd_roles_is_judged_by_its_best_pd_pair() -> None:
    """Its requests run disaggregated: deadline refusals and the queue's retry estimate
    had been skipped there (no instance ran them whole)."""
    snap = make_snapshot(PD_FLEET, now=0.0)
    req = make_request_info(prompt_tokens=800, max_tokens=100, slo_s=0.5)
    assert eligible_instances(req, snap) == ()
    best = best_predicted_e2e(req, snap)
    assert best is not None
    # the fastest prefill (p1: 0.05 + 800/8000) then 100 tokens at d1's pace
    assert best[0].instance_id == "d1"
    assert best[1] == pytest.approx(0.15 + 100 * 0.01)
    late = check_deadline_feasible(req, snap)
    assert not late.admitted and "instance d1" in late.reason
    assert check_deadline_feasible(make_request_info(prompt_tokens=800, slo_s=60.0), snap).admitted
    verdict = check_queue_bound(5, 5, snap)
    assert verdict.retry_after_s is not None and verdict.retry_after_s > 0
    # one role missing: nothing can run it, nothing to judge by
    half = make_snapshot(PD_FLEET[:2], now=0.0)
    assert best_predicted_e2e(req, half) is None
    assert check_queue_bound(5, 5, half).retry_after_s is None
