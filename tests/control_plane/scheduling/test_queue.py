"""The shared lane queue, checked against a brute-force model under random operations."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from sage_llm.control_plane.scheduling._lanes import LaneQueue
from sage_llm.control_plane.scheduling.priority import PriorityPolicy, effective_priority
from sage_llm.control_plane.snapshot import ClusterSnapshot, RequestInfo
from sage_llm.types import RequestPriority
from tests.factories import make_instance_view, make_request_info, make_snapshot

MODELS = ("m0", "m1")
INSTANCES = ("a", "b", "c")  # a, b serve m0; c serves m1


@dataclass
class Reference:
    """Brute force: sort every servable queued request by the documented priority rule."""

    aging_interval_s: float
    max_wait_s: float
    queued: dict[str, tuple[int, RequestInfo]] = field(default_factory=dict)
    pushes: int = 0

    def push(self, req: RequestInfo) -> None:
        self.queued[req.request_id] = (self.pushes, req)
        self.pushes += 1

    def pop(self, snap: ClusterSnapshot) -> str | None:
        def rank(item: tuple[int, RequestInfo]) -> tuple[float, ...]:
            seq, req = item
            wait = snap.now - req.arrival
            if wait >= self.max_wait_s - 1e-9:
                return (0, 0, req.arrival, seq)
            eff = effective_priority(int(req.priority), wait, self.aging_interval_s)
            return (1, eff, req.arrival, seq)

        servable = [it for it in self.queued.values() if snap.can_serve(it[1])]
        if not servable:
            return None
        best = min(servable, key=rank)[1].request_id
        del self.queued[best]
        return best


def fleet(now: float, free: frozenset[str]) -> ClusterSnapshot:
    views = [
        make_instance_view(
            iid, model="m1" if iid == "c" else "m0", in_flight=0 if iid in free else 100
        )
        for iid in INSTANCES
    ]
    return make_snapshot(views, now=now)


request_st = st.builds(
    lambda model, prio, excl: (model, RequestPriority(prio), frozenset(excl)),
    st.sampled_from(MODELS),
    st.integers(0, 4),
    st.sets(st.sampled_from(INSTANCES), max_size=2),
)
op_st = st.one_of(
    st.tuples(st.just("push"), request_st),
    st.tuples(st.just("pop"), st.frozensets(st.sampled_from(INSTANCES))),
    st.tuples(st.just("remove"), st.integers(0, 60)),
)


@settings(max_examples=150, deadline=None)
@given(
    ops=st.lists(op_st, max_size=60),
    aging=st.sampled_from([0.5, 2.0, math.inf]),
    max_wait=st.sampled_from([3.0, 10.0, math.inf]),
)
def test_priority_queue_matches_brute_force(
    ops: list[tuple[str, Any]], aging: float, max_wait: float
) -> None:
    policy = PriorityPolicy(PriorityPolicy.Params(aging_interval_s=aging, max_wait_s=max_wait))
    ref = Reference(aging, max_wait)
    now = 0.0
    for n, (kind, arg) in enumerate(ops):
        now += 0.25 * (n % 3)
        if kind == "push":
            model, prio, excl = arg
            # Arrivals are not always monotone (retries are re-queued with their old arrival).
            req = make_request_info(
                f"q{n}",
                model=model,
                priority=prio,
                arrival=now - (n % 4),
                excluded_instances=excl,
            )
            policy.push(req)
            ref.push(req)
        elif kind == "pop":
            snap = fleet(now, arg)
            got = policy.pop(snap)
            assert (None if got is None else got.request_id) == ref.pop(snap)
        else:
            rid = f"q{arg}"
            removed = policy.remove(rid)
            expected = ref.queued.pop(rid, None)
            assert (removed is None) == (expected is None)
        assert len(policy) == len(ref.queued)
    drained = {r.request_id for r in policy.drain()}
    assert drained == set(ref.queued)


def test_drain_before_any_snapshot_orders_as_at_the_latest_arrival() -> None:
    """No snapshot seen (as after a policy switch): the latest time seen is the latest
    arrival, when the BACKGROUND request has waited 100 s and aged to the top."""
    policy = PriorityPolicy()
    policy.push(make_request_info("bg-old", priority=RequestPriority.BACKGROUND, arrival=0.0))
    policy.push(make_request_info("crit-new", priority=RequestPriority.CRITICAL, arrival=100.0))
    assert [r.request_id for r in policy.drain()] == ["bg-old", "crit-new"]


def test_model_counts_count_only_the_requests_still_queued() -> None:
    """A request removed from under its lane's head (left in the heap, marked dead) is no
    longer counted for its model."""
    queue = LaneQueue()
    for i in range(3):
        queue.push(make_request_info(f"a{i}", model="m0", arrival=i), 0, float(i))
    queue.push(make_request_info("b", model="m1"), 0, 0.0)
    assert queue.remove("a1") is not None
    assert queue.model_counts() == {"m0": 2, "m1": 1}


def test_a_policy_holds_a_request_from_its_push_until_its_pop_or_removal() -> None:
    policy = PriorityPolicy()
    snap = make_snapshot([make_instance_view("i0")])
    for rid in ("a", "b"):
        policy.push(make_request_info(rid))
    assert "a" in policy and "b" in policy and "a" in policy.queue
    popped = policy.pop(snap)
    assert popped is not None and popped.request_id == "a"
    assert "a" not in policy and "a" not in policy.queue
    assert policy.remove("b") is not None
    assert "b" not in policy and len(policy) == 0


def test_a_drained_policy_counts_no_request_by_priority() -> None:
    """``adaptive`` drains an inner policy on a switch and reuses it on a switch back: its
    ``queued_by_priority`` counts only what was pushed since."""
    policy = PriorityPolicy()
    policy.push(make_request_info("h", priority=RequestPriority.HIGH))
    policy.push(make_request_info("b", priority=RequestPriority.BACKGROUND))
    assert len(policy.drain()) == 2
    state = policy.describe()["state"]
    assert isinstance(state, dict) and state["queued_by_priority"] == {}
    policy.push(make_request_info("h2", priority=RequestPriority.HIGH))
    state = policy.describe()["state"]
    assert isinstance(state, dict) and state["queued_by_priority"] == {"HIGH": 1}
