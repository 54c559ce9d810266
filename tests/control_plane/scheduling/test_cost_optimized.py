"""Cost-optimized: cheapest instance that meets the SLO and the budget."""

from __future__ import annotations

from dataclasses import replace

import pytest

from sage_llm.control_plane.scheduling.cost_optimized import CostOptimizedPolicy
from sage_llm.control_plane.snapshot import ClusterSnapshot
from sage_llm.errors import ConfigError
from sage_llm.types import ExecutionInstanceType
from sage_llm.types import RequestPriority as P
from tests.factories import make_instance_view, make_request_info, make_snapshot, with_view

# Request of 100 prompt / 50 output tokens; ttft = 0.05 + 100/8000 = 0.0625 s.
# cheap_slow: e2e 0.0625 + 49*0.03  = 1.5325 s, cost 1.0/3600 * 1.5325 ≈ 0.000426
# mid:        e2e 0.0625 + 49*0.02  = 1.0425 s, cost 2.0/3600 * 1.0425 ≈ 0.000579
# fast:       e2e 0.0625 + 49*0.005 = 0.3075 s, cost 8.0/3600 * 0.3075 ≈ 0.000683
CHEAP_SLOW = make_instance_view("cheap_slow", price_per_gpu_hour=1.0, est_tpot_s=0.03)
MID = make_instance_view("mid", price_per_gpu_hour=2.0, est_tpot_s=0.02)
FAST = make_instance_view("fast", price_per_gpu_hour=8.0, est_tpot_s=0.005)


def fleet() -> ClusterSnapshot:
    return make_snapshot([FAST, MID, CHEAP_SLOW], now=0.0)


def test_cheapest_instance_without_slo_or_budget() -> None:
    policy = CostOptimizedPolicy()
    assert policy.constrain(make_request_info(), fleet()) == frozenset({"cheap_slow"})


def test_cheap_slow_instance_is_skipped_when_it_would_miss_the_deadline() -> None:
    policy = CostOptimizedPolicy()
    assert policy.constrain(make_request_info(slo_s=1.2), fleet()) == frozenset({"mid"})
    assert policy.constrain(make_request_info(slo_s=0.5), fleet()) == frozenset({"fast"})


def test_deadline_counts_from_the_snapshot_time() -> None:
    policy = CostOptimizedPolicy()
    req = make_request_info(arrival=0.0, slo_s=2.0)
    assert policy.constrain(req, fleet()) == frozenset({"cheap_slow"})
    later = make_snapshot([FAST, MID, CHEAP_SLOW], now=0.8)
    assert policy.constrain(req, later) == frozenset({"mid"})


def test_budget_excludes_instances_that_cost_too_much() -> None:
    policy = CostOptimizedPolicy()
    # Deadline 0.5 s needs fast (0.000683), budget 0.0006 forbids it: the SLO cannot be
    # met within budget, so the cheapest within budget is used.
    req = make_request_info(slo_s=0.5, cost_budget=0.0006)
    assert policy.constrain(req, fleet()) == frozenset({"cheap_slow"})
    # Deadline 1.2 s: mid meets it and fits the budget.
    req = make_request_info(slo_s=1.2, cost_budget=0.0006)
    assert policy.constrain(req, fleet()) == frozenset({"mid"})
    # Budget below mid's cost: mid is excluded although it meets the deadline.
    req = make_request_info(slo_s=1.2, cost_budget=0.0005)
    assert policy.constrain(req, fleet()) == frozenset({"cheap_slow"})


def test_a_cost_exactly_at_the_budget_is_within_it() -> None:
    # e2e 0.5 + 500/1000 = 1 s: 0.001 at 3.6 per GPU-hour, 3 % more (past the tolerance) at
    # 3.708; a budget of 0.001 allows the first only
    at = make_instance_view(
        "at_budget", price_per_gpu_hour=3.6, est_ttft_base_s=0.5, est_prefill_tps=1000.0
    )
    over = replace(at, instance_id="over_budget", price_per_gpu_hour=3.708)
    req = make_request_info(prompt_tokens=500, max_tokens=1, cost_budget=0.001)
    assert at.predict_cost(500, 1) == 0.001
    policy = CostOptimizedPolicy()
    assert policy.constrain(req, make_snapshot([at, over])) == frozenset({"at_budget"})
    state = policy.describe()["state"]
    assert isinstance(state, dict)
    assert state["over_budget"] == 0


def test_over_budget_everywhere_falls_back_to_the_cheapest() -> None:
    policy = CostOptimizedPolicy()
    req = make_request_info(cost_budget=1e-6)
    assert policy.constrain(req, fleet()) == frozenset({"cheap_slow"})
    state = policy.describe()["state"]
    assert isinstance(state, dict)
    assert state["over_budget"] == 1


def test_equally_cheap_instances_within_tolerance_are_all_allowed() -> None:
    twins = [
        make_instance_view("a", price_per_gpu_hour=1.0),
        make_instance_view("b", price_per_gpu_hour=1.0),
        make_instance_view("c", price_per_gpu_hour=1.03),
        make_instance_view("d", price_per_gpu_hour=1.2),
    ]
    snap = make_snapshot(twins)
    assert CostOptimizedPolicy().constrain(make_request_info(), snap) == frozenset({"a", "b", "c"})
    strict = CostOptimizedPolicy(CostOptimizedPolicy.Params(cost_tolerance=0.0))
    assert strict.constrain(make_request_info(), snap) == frozenset({"a", "b"})


def test_only_runnable_instances_are_candidates() -> None:
    policy = CostOptimizedPolicy()
    busy = with_view(fleet(), "cheap_slow", in_flight=100)
    assert policy.constrain(make_request_info(), busy) == frozenset({"mid"})
    req = make_request_info(excluded_instances=frozenset({"cheap_slow", "mid"}))
    assert policy.constrain(req, fleet()) == frozenset({"fast"})
    assert policy.constrain(make_request_info(model="unknown"), fleet()) is None


def test_load_raises_predicted_cost() -> None:
    # cheap_slow with a long prefill backlog becomes slower and dearer than mid.
    loaded = with_view(fleet(), "cheap_slow", queued_prefill_tokens=40_000)
    assert CostOptimizedPolicy().constrain(make_request_info(), loaded) == frozenset({"mid"})


def test_admission_rejects_an_impossible_budget_when_configured() -> None:
    policy = CostOptimizedPolicy(CostOptimizedPolicy.Params(over_budget_action="reject"))
    verdict = policy.admit(make_request_info(cost_budget=1e-6), fleet())
    assert not verdict.admitted
    assert "budget" in verdict.reason
    assert policy.admit(make_request_info(cost_budget=0.0005), fleet()).admitted
    assert policy.admit(make_request_info(), fleet()).admitted


def test_admission_refuses_by_a_tpot_not_known_at_the_batch_only_its_prefill() -> None:
    """A TPOT learnt only in a burst's batches (or the prior) priced an idle fleet out of
    budgets a solo request meets, for good: refused requests never ran to correct it."""
    policy = CostOptimizedPolicy(CostOptimizedPolicy.Params(over_budget_action="reject"))
    views = [replace(v, tpot_known=False) for v in fleet().instances]
    assert not policy.admit(make_request_info(cost_budget=1e-4), fleet()).admitted
    assert policy.admit(make_request_info(cost_budget=1e-4), make_snapshot(views)).admitted
    # what a prefill alone costs is known (cheap_slow's: 1.0/3600 * 0.0625 ≈ 1.7e-5): a
    # budget below it is still refused
    assert not policy.admit(make_request_info(cost_budget=1e-6), make_snapshot(views)).admitted


def test_an_idle_twin_whose_tpot_is_not_known_alone_gets_a_request_to_learn_it() -> None:
    """Its TPOT learnt only in a burst, an equally priced twin was priced out by the other,
    which had run a light request alone since, and took no light traffic again."""
    solo = make_instance_view("a", est_tpot_s=0.002)
    burst = make_instance_view("b", est_tpot_s=0.006, tpot_known=False)
    policy = CostOptimizedPolicy()
    req = make_request_info()
    assert policy.constrain(req, make_snapshot([solo, burst])) == frozenset({"a", "b"})
    busy = replace(burst, in_flight=1)  # one at a time
    assert policy.constrain(req, make_snapshot([solo, busy])) == frozenset({"a"})
    learnt = replace(burst, tpot_known=True)
    assert policy.constrain(req, make_snapshot([solo, learnt])) == frozenset({"a"})
    dear = replace(burst, price_per_gpu_hour=5.0)
    assert policy.constrain(req, make_snapshot([solo, dear])) == frozenset({"a"})


def test_admission_judges_a_fleet_of_pd_roles_by_its_cheapest_pair() -> None:
    """Its requests run disaggregated (no instance runs them whole): the budget had been
    admitted unchecked there. Prefill: 0.0625 s at 1.0/h; decode: 50 tokens x 0.02 s at
    2.0/h; about 0.000573 in all."""
    policy = CostOptimizedPolicy(CostOptimizedPolicy.Params(over_budget_action="reject"))
    pd = make_snapshot(
        [
            make_instance_view("p0", role=ExecutionInstanceType.PREFILLING, price_per_gpu_hour=1.0),
            make_instance_view("d0", role=ExecutionInstanceType.DECODING, est_tpot_s=0.02),
        ],
        now=0.0,
    )
    assert not policy.admit(make_request_info(cost_budget=0.0005), pd).admitted
    assert policy.admit(make_request_info(cost_budget=0.0006), pd).admitted


def test_admission_judges_the_budget_on_an_empty_queue() -> None:
    policy = CostOptimizedPolicy(CostOptimizedPolicy.Params(over_budget_action="reject"))
    snap = with_view(fleet(), "cheap_slow", queued_prefill_tokens=40_000)
    assert policy.admit(make_request_info(cost_budget=0.0005), snap).admitted


def test_admission_admits_over_budget_by_default() -> None:
    assert CostOptimizedPolicy().admit(make_request_info(cost_budget=1e-6), fleet()).admitted


def test_queue_order_is_fifo_or_priority() -> None:
    snap = make_snapshot(1, now=1.0)
    reqs = [
        make_request_info("bg", priority=P.BACKGROUND, arrival=0.0),
        make_request_info("crit", priority=P.CRITICAL, arrival=0.5),
    ]
    fifo = CostOptimizedPolicy()
    by_priority = CostOptimizedPolicy(CostOptimizedPolicy.Params(order="priority"))
    for req in reqs:
        fifo.push(req)
        by_priority.push(req)
    assert [r.request_id for r in fifo.drain()] == ["bg", "crit"]
    first = by_priority.pop(snap)
    assert first is not None
    assert first.request_id == "crit"
    assert len(by_priority) == 1


@pytest.mark.parametrize(
    ("key", "value"),
    [("order", "lifo"), ("cost_tolerance", -0.1), ("over_budget_action", "ignore")],
)
def test_invalid_params(key: str, value: object) -> None:
    with pytest.raises(ConfigError) as err:
        CostOptimizedPolicy.Params(**{key: value})  # type: ignore[arg-type]
    assert err.value.key == key


def test_fifo_order_across_models_is_by_arrival_not_push_order() -> None:
    """A retry is pushed back with its first arrival: it goes before a newer request."""
    policy = CostOptimizedPolicy()
    policy.push(make_request_info("b-new", model="b", arrival=4.0))
    policy.push(make_request_info("a-retry", model="a", arrival=1.0, attempt=1))
    fleet = [make_instance_view("ia", model="a"), make_instance_view("ib", model="b")]
    first = policy.pop(make_snapshot(fleet, now=5.0))
    assert first is not None
    assert first.request_id == "a-retry"


def test_an_instance_not_measured_yet_gets_one_request_at_a_time_to_learn() -> None:
    """Priced by its pessimistic priors, a new instance was never chosen, so never measured,
    and took no request while its twins ran full."""
    measured = make_instance_view("a", est_tpot_s=0.008)
    new = make_instance_view("new", est_tpot_s=0.02, measured=False)
    policy = CostOptimizedPolicy()
    req = make_request_info()
    assert policy.constrain(req, make_snapshot([measured, new])) == frozenset({"a", "new"})
    busy = make_instance_view("new", est_tpot_s=0.02, measured=False, in_flight=1)
    assert policy.constrain(req, make_snapshot([measured, busy])) == frozenset({"a"})
    learned = make_instance_view("new", est_tpot_s=0.02)
    assert policy.constrain(req, make_snapshot([measured, learned])) == frozenset({"a"})
    # not one whose GPUs cost more: it would win only by being faster, nothing says it is
    dear = make_instance_view("new", est_tpot_s=0.02, measured=False, price_per_gpu_hour=5.0)
    cheap = make_instance_view("a", est_tpot_s=0.008, price_per_gpu_hour=1.0)
    assert policy.constrain(req, make_snapshot([cheap, dear])) == frozenset({"a"})


def test_a_new_twin_learns_beside_a_slower_gpu_cheaper_per_hour() -> None:
    """Its price was compared with the cheapest per hour in the fleet (a slower A100), not
    with the cheapest candidate's: the shipped simulated example's new H100 got 0 of 200."""
    h0 = make_instance_view("h100-0", est_tpot_s=0.00831, measured=False)
    h1 = make_instance_view("h100-1", est_tpot_s=0.00785)
    a0 = make_instance_view("a100-0", est_tpot_s=0.01361, price_per_gpu_hour=1.2)
    allowed = CostOptimizedPolicy().constrain(make_request_info(), make_snapshot([h0, h1, a0]))
    assert allowed is not None and {"h100-0", "h100-1"} <= allowed
