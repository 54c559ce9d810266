"""SLO-aware: least slack first with instance-dependent predictions, admission, constrain."""

from __future__ import annotations

from dataclasses import replace

import pytest

from sage_llm.control_plane.scheduling.admission import check_deadline_feasible
from sage_llm.control_plane.scheduling.slo_aware import SLOAwarePolicy
from sage_llm.control_plane.snapshot import ClusterSnapshot, CompletionRecord, RequestInfo
from sage_llm.errors import ConfigError
from sage_llm.types import RequestPriority
from tests.factories import (
    make_completion_record,
    make_instance_view,
    make_request_info,
    make_snapshot,
    with_view,
)

FAST = make_instance_view("fast", est_tpot_s=0.01)
SLOW = make_instance_view("slow", est_tpot_s=0.04)


def admit_and_push(policy: SLOAwarePolicy, req: RequestInfo, snap: ClusterSnapshot) -> None:
    """What the manager does: admit against the current snapshot, then push."""
    verdict = policy.admit(req, snap)
    assert verdict.admitted
    policy.push(req)


def pop_ids(policy: SLOAwarePolicy, snap: ClusterSnapshot) -> list[str]:
    out: list[str] = []
    while (req := policy.pop(snap)) is not None:
        out.append(req.request_id)
    return out


def test_earliest_deadline_first_for_equal_service_times() -> None:
    policy = SLOAwarePolicy()
    snap = make_snapshot([FAST])
    for rid, slo in [("d30", 30.0), ("d10", 10.0), ("d20", 20.0)]:
        admit_and_push(policy, make_request_info(rid, slo_s=slo), snap)
    assert pop_ids(policy, snap) == ["d10", "d20", "d30"]


def test_least_slack_first_depends_on_the_fleets_predictions() -> None:
    # long: deadline 12 s, 200 output tokens; short: deadline 10 s, 10 output tokens.
    long_req = make_request_info("long", slo_s=12.0, max_tokens=200)
    short_req = make_request_info("short", slo_s=10.0, max_tokens=10)

    on_fast = SLOAwarePolicy()
    fast_fleet = make_snapshot([FAST])
    for req in (long_req, short_req):
        admit_and_push(on_fast, req, fast_fleet)
    # fast: long needs ~2.05 s (slack ~9.95), short ~0.15 s (slack ~9.85): short first.
    assert pop_ids(on_fast, fast_fleet) == ["short", "long"]

    on_slow = SLOAwarePolicy()
    slow_fleet = make_snapshot([SLOW])
    for req in (long_req, short_req):
        admit_and_push(on_slow, req, slow_fleet)
    # slow: long needs ~8.02 s (slack ~3.98), short ~0.42 s (slack ~9.58): long first.
    assert pop_ids(on_slow, slow_fleet) == ["long", "short"]


def test_slack_uses_the_best_instance_of_a_mixed_fleet() -> None:
    policy = SLOAwarePolicy()
    snap = make_snapshot([SLOW, FAST])
    req = make_request_info("r", slo_s=12.0, max_tokens=200)
    slack = policy.slack_s(req, snap)
    assert slack == pytest.approx(12.0 - (0.05 + 100 / 8000 + 199 * 0.01))
    assert policy.slack_s(make_request_info("no-deadline"), snap) is None


def test_requests_without_deadline_come_after_deadline_ones_in_fifo_order() -> None:
    policy = SLOAwarePolicy()
    snap = make_snapshot([FAST], now=1.0)
    admit_and_push(policy, make_request_info("free-1", arrival=0.0), snap)
    admit_and_push(policy, make_request_info("slo-late", arrival=0.5, slo_s=50.0), snap)
    admit_and_push(policy, make_request_info("free-2", arrival=0.2), snap)
    admit_and_push(policy, make_request_info("slo-soon", arrival=0.9, slo_s=5.0), snap)
    assert pop_ids(policy, snap) == ["slo-soon", "slo-late", "free-1", "free-2"]


def test_no_deadline_requests_do_not_starve() -> None:
    policy = SLOAwarePolicy(SLOAwarePolicy.Params(no_deadline_max_wait_s=30.0))
    snap = make_snapshot([FAST], now=0.0)
    admit_and_push(policy, make_request_info("patient", arrival=0.0), snap)
    served_at = None
    for k in range(1, 100):
        now = float(k)
        tick = make_snapshot([FAST], now=now)
        admit_and_push(policy, make_request_info(f"slo{k}", arrival=now, slo_s=5.0), tick)
        popped = policy.pop(tick)
        assert popped is not None
        if popped.request_id == "patient":
            served_at = now
            break
    assert served_at == 30.0


def test_no_deadline_requests_past_their_max_wait_go_oldest_first() -> None:
    policy = SLOAwarePolicy()  # no_deadline_max_wait_s 30
    policy.push(make_request_info("b-waited-90s", model="b", arrival=10.0))
    policy.push(make_request_info("a-waited-100s", model="a", arrival=0.0))
    fleet = [make_instance_view("ia", model="a"), make_instance_view("ib", model="b")]
    assert pop_ids(policy, make_snapshot(fleet, now=100.0)) == ["a-waited-100s", "b-waited-90s"]


def test_a_demoted_request_never_goes_before_a_deadline_request() -> None:
    """Unlike a request without a deadline, a demoted one does not jump the deadline
    requests once it has waited ``no_deadline_max_wait_s``: it would push feasible requests
    past their deadlines (as the policy's docs promise it cannot)."""
    policy = SLOAwarePolicy(SLOAwarePolicy.Params(no_deadline_max_wait_s=2.0))
    snap = make_snapshot([SLOW], now=0.0)
    hopeless = make_request_info("hopeless", arrival=0.0, slo_s=0.5, max_tokens=100)
    assert policy.admit(hopeless, snap).priority is RequestPriority.BACKGROUND
    policy.push(hopeless)
    later = make_snapshot([SLOW], now=10.0)  # long past no_deadline_max_wait_s
    admit_and_push(policy, make_request_info("feasible", arrival=10.0, slo_s=600.0), later)
    admit_and_push(policy, make_request_info("patient", arrival=0.5), later)  # no deadline
    assert pop_ids(policy, later) == ["patient", "feasible", "hopeless"]


def _ended(request_id: str) -> CompletionRecord:
    return make_completion_record(request_id)


def test_a_demoted_request_pushed_back_is_still_demoted() -> None:
    """A popped request may come back (a retry, one a pass deferred): a demoted one goes
    back to the demoted lane, not ahead of the deadline requests once aged."""
    policy = SLOAwarePolicy(SLOAwarePolicy.Params(no_deadline_max_wait_s=2.0))
    snap = make_snapshot([SLOW], now=0.0)
    hopeless = make_request_info("hopeless", arrival=0.0, slo_s=0.5, max_tokens=100)
    verdict = policy.admit(hopeless, snap)
    demoted = replace(hopeless, priority=verdict.priority or hopeless.priority, deadline=None)
    policy.push(demoted)
    assert pop_ids(policy, snap) == ["hopeless"]
    policy.push(demoted)  # its retry
    later = make_snapshot([SLOW], now=10.0)
    admit_and_push(policy, make_request_info("feasible", arrival=10.0, slo_s=600.0), later)
    assert pop_ids(policy, later) == ["feasible", "hopeless"]


def test_a_demoted_request_removed_from_the_queue_is_forgotten() -> None:
    """Cancelled while queued: its id, used again by a feasible request, is not demoted."""
    policy = SLOAwarePolicy()
    snap = make_snapshot([FAST])
    hopeless = make_request_info("a", slo_s=0.01, max_tokens=100)
    assert policy.admit(hopeless, snap).priority is RequestPriority.BACKGROUND
    policy.push(hopeless)
    assert policy.remove("a") is not None
    assert not policy.is_demoted("a")
    admit_and_push(policy, make_request_info("b", slo_s=60.0), snap)
    admit_and_push(policy, make_request_info("a", slo_s=50.0), snap)
    assert pop_ids(policy, snap) == ["a", "b"]


def test_demoted_ids_never_pushed_are_let_go_while_a_queued_one_stays_demoted() -> None:
    """Requests demoted at admission that never reach the queue (refused after it) do not
    pile up: the oldest are forgotten once there are thousands, but not one still queued,
    which keeps its place behind the deadline requests."""
    policy = SLOAwarePolicy()
    snap = make_snapshot([SLOW], now=0.0)
    hopeless = make_request_info("queued", arrival=0.0, slo_s=0.5, max_tokens=100)
    assert policy.admit(hopeless, snap).priority is RequestPriority.BACKGROUND
    policy.push(hopeless)
    for k in range(5000):
        gone = make_request_info(f"gone{k}", arrival=0.0, slo_s=0.5, max_tokens=100)
        assert policy.admit(gone, snap).priority is RequestPriority.BACKGROUND
    assert not policy.is_demoted("gone0")  # let go
    assert policy.is_demoted("gone4999")  # the latest are kept
    assert policy.is_demoted("queued")
    admit_and_push(policy, make_request_info("feasible", arrival=0.1, slo_s=60.0), snap)
    assert pop_ids(policy, snap) == ["feasible", "queued"]


def test_a_request_marked_demoted_is_demoted_for_any_slo_aware_policy() -> None:
    """The manager marks the request itself (``RequestInfo.demoted``): a policy object that
    never admitted it (a switch away and back, ``update_policy``) still keeps it behind
    the deadline requests however long it waits."""
    policy = SLOAwarePolicy(SLOAwarePolicy.Params(no_deadline_max_wait_s=2.0))
    hopeless = make_request_info("hopeless", arrival=0.0, max_tokens=100)
    policy.push(replace(hopeless, priority=RequestPriority.BACKGROUND, demoted=True))
    later = make_snapshot([SLOW], now=10.0)
    admit_and_push(policy, make_request_info("feasible", arrival=10.0, slo_s=600.0), later)
    admit_and_push(policy, make_request_info("patient", arrival=0.5), later)  # no deadline
    assert not policy.is_demoted("hopeless")  # not known to this object: marked on the request
    assert pop_ids(policy, later) == ["patient", "feasible", "hopeless"]


def test_infeasible_deadline_is_rejected_when_configured() -> None:
    policy = SLOAwarePolicy(SLOAwarePolicy.Params(infeasible_action="reject"))
    snap = make_snapshot([SLOW])
    verdict = policy.admit(make_request_info("hopeless", slo_s=0.5, max_tokens=100), snap)
    assert not verdict.admitted
    assert "deadline infeasible" in verdict.reason
    assert verdict.retry_after_s is None
    assert policy.admit(make_request_info("fine", slo_s=60.0), snap).admitted


def test_infeasible_deadline_is_demoted_by_default_and_queued_without_deadline() -> None:
    policy = SLOAwarePolicy()
    snap = make_snapshot([SLOW], now=0.0)
    hopeless = make_request_info("hopeless", arrival=0.0, slo_s=0.5, max_tokens=100)
    verdict = policy.admit(hopeless, snap)
    assert verdict.admitted
    assert verdict.priority is RequestPriority.BACKGROUND
    assert "demoted" in verdict.reason
    assert policy.is_demoted("hopeless")
    policy.push(hopeless)
    # A later, feasible deadline request goes first although its deadline is later.
    admit_and_push(policy, make_request_info("feasible", arrival=0.1, slo_s=60.0), snap)
    assert pop_ids(policy, snap) == ["feasible", "hopeless"]
    assert policy.is_demoted("hopeless")  # until it ends: a retry comes back demoted
    policy.on_complete(_ended("hopeless"))
    assert not policy.is_demoted("hopeless")
    state = policy.describe()["state"]
    assert isinstance(state, dict)
    assert state["demoted"] == 1


def test_demoted_request_pushed_with_background_priority_is_still_no_deadline() -> None:
    """The manager pushes the demoted request with its priority replaced."""
    policy = SLOAwarePolicy()
    snap = make_snapshot([SLOW])
    hopeless = make_request_info("hopeless", slo_s=0.5, max_tokens=100)
    verdict = policy.admit(hopeless, snap)
    assert verdict.priority is not None
    policy.push(replace(hopeless, priority=verdict.priority))
    state = policy.describe()["state"]
    assert isinstance(state, dict)
    assert state["queued_without_deadline"] == 1
    assert state["queued_with_deadline"] == 0


def test_infeasible_deadline_can_be_admitted_unchanged() -> None:
    policy = SLOAwarePolicy(SLOAwarePolicy.Params(infeasible_action="admit"))
    snap = make_snapshot([SLOW])
    verdict = policy.admit(make_request_info("hopeless", slo_s=0.5, max_tokens=100), snap)
    assert verdict.admitted
    assert verdict.priority is None
    assert not policy.is_demoted("hopeless")


def test_constrain_keeps_only_instances_that_meet_the_deadline() -> None:
    policy = SLOAwarePolicy()
    snap = make_snapshot([FAST, SLOW, make_instance_view("fast2", est_tpot_s=0.01)])
    # 100 output tokens: fast ~1.05 s, slow ~4.02 s.
    req = make_request_info("r", slo_s=2.0, max_tokens=100)
    assert policy.constrain(req, snap) == frozenset({"fast", "fast2"})
    full = with_view(snap, "fast2", in_flight=100)
    assert policy.constrain(req, full) == frozenset({"fast"})


def test_constrain_keeps_an_instance_predicted_to_finish_exactly_at_the_deadline() -> None:
    """As admission does (predicted e2e <= time left)."""
    fast = make_instance_view("fast", est_ttft_base_s=0.5, est_prefill_tps=1000.0)  # e2e 1 s
    slow = make_instance_view("slow", est_ttft_base_s=1.5, est_prefill_tps=1000.0)  # e2e 2 s
    snap = make_snapshot([fast, slow])
    req = make_request_info("r", prompt_tokens=500, max_tokens=1, slo_s=1.0)
    assert check_deadline_feasible(req, snap).admitted
    assert SLOAwarePolicy().constrain(req, snap) == frozenset({"fast"})


def test_constrain_leaves_the_choice_open_without_deadline_or_feasible_instance() -> None:
    policy = SLOAwarePolicy()
    snap = make_snapshot([FAST, SLOW])
    assert policy.constrain(make_request_info("free"), snap) is None
    assert policy.constrain(make_request_info("hopeless", slo_s=0.1, max_tokens=100), snap) is None


def test_pop_skips_deadline_requests_of_a_full_model() -> None:
    fleet = [
        make_instance_view("a", model="model-a", in_flight=100),
        make_instance_view("b", model="model-b"),
    ]
    snap = make_snapshot(fleet)
    policy = SLOAwarePolicy()
    admit_and_push(policy, make_request_info("urgent-a", model="model-a", slo_s=5.0), snap)
    admit_and_push(policy, make_request_info("relaxed-b", model="model-b", slo_s=90.0), snap)
    assert pop_ids(policy, snap) == ["relaxed-b"]
    assert len(policy) == 1
    assert pop_ids(policy, with_view(snap, "a", in_flight=0)) == ["urgent-a"]


def test_remove_and_drain() -> None:
    policy = SLOAwarePolicy()
    snap = make_snapshot([FAST])
    admit_and_push(policy, make_request_info("free", arrival=0.0), snap)
    admit_and_push(policy, make_request_info("late", arrival=0.1, slo_s=50.0), snap)
    admit_and_push(policy, make_request_info("soon", arrival=0.2, slo_s=5.0), snap)
    removed = policy.remove("late")
    assert removed is not None
    assert removed.request_id == "late"
    assert policy.remove("late") is None
    assert [r.request_id for r in policy.drain()] == ["soon", "free"]
    assert len(policy) == 0


def test_push_without_a_snapshot_orders_by_deadline() -> None:
    """After a policy switch the queue is pushed before any snapshot was seen."""
    policy = SLOAwarePolicy()
    policy.push(make_request_info("b", slo_s=20.0))
    policy.push(make_request_info("a", slo_s=10.0))
    assert pop_ids(policy, make_snapshot([FAST])) == ["a", "b"]


def test_invalid_infeasible_action() -> None:
    with pytest.raises(ConfigError) as err:
        SLOAwarePolicy.Params(infeasible_action="ignore")  # type: ignore[arg-type]
    assert err.value.key == "infeasible_action"
