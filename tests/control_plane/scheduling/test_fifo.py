"""FIFO: arrival order, model isolation, cancellation, drain."""

from __future__ import annotations

import pytest

from sage_llm.control_plane.scheduling.base import SchedulingPolicy
from sage_llm.control_plane.scheduling.fifo import FIFOPolicy
from sage_llm.control_plane.snapshot import ClusterSnapshot
from sage_llm.errors import ConflictError
from sage_llm.types import ExecutionInstanceType
from tests.factories import (
    make_instance_view,
    make_request_info,
    make_request_infos,
    make_snapshot,
    with_view,
)


def pop_all(policy: SchedulingPolicy, snap: ClusterSnapshot) -> list[str]:
    out: list[str] = []
    while (req := policy.pop(snap)) is not None:
        out.append(req.request_id)
    return out


def test_fifo_is_a_scheduling_policy_with_a_name() -> None:
    policy = FIFOPolicy()
    assert isinstance(policy, SchedulingPolicy)
    assert policy.name == "fifo"


def test_pops_in_arrival_order_whatever_the_push_order() -> None:
    policy = FIFOPolicy()
    for rid, arrival in [("c", 3.0), ("a", 1.0), ("d", 4.0), ("b", 2.0)]:
        policy.push(make_request_info(rid, arrival=arrival))
    assert len(policy) == 4
    assert pop_all(policy, make_snapshot(1, now=5.0)) == ["a", "b", "c", "d"]
    assert len(policy) == 0
    assert policy.pop(make_snapshot(1, now=5.0)) is None


def test_equal_arrivals_keep_push_order() -> None:
    policy = FIFOPolicy()
    for rid in ["x", "y", "z"]:
        policy.push(make_request_info(rid, arrival=1.0))
    assert pop_all(policy, make_snapshot(1)) == ["x", "y", "z"]


def test_equal_arrivals_of_two_models_keep_push_order() -> None:
    policy = FIFOPolicy()
    policy.push(make_request_info("a-old", model="a", arrival=0.0))
    policy.push(make_request_info("b-tie-first", model="b", arrival=1.0))
    policy.push(make_request_info("a-tie-second", model="a", arrival=1.0))
    fleet = make_snapshot(
        [make_instance_view("ia", model="a"), make_instance_view("ib", model="b")]
    )
    assert pop_all(policy, fleet) == ["a-old", "b-tie-first", "a-tie-second"]


def test_peek_does_not_remove() -> None:
    policy = FIFOPolicy()
    policy.push(make_request_info("a", arrival=1.0))
    snap = make_snapshot(1)
    peeked = policy.peek(snap)
    assert peeked is not None
    assert peeked.request_id == "a"
    assert len(policy) == 1
    assert policy.pop(snap) == peeked


def test_request_for_a_full_model_stays_queued_without_blocking_others() -> None:
    fleet = [
        make_instance_view("a0", model="model-a", in_flight=4, max_concurrency=4),
        make_instance_view("b0", model="model-b"),
    ]
    snap = make_snapshot(fleet, now=10.0)
    policy = FIFOPolicy()
    policy.push(make_request_info("old-a", model="model-a", arrival=1.0))
    policy.push(make_request_info("new-b", model="model-b", arrival=2.0))
    policy.push(make_request_info("orphan", model="no-such-model", arrival=0.5))
    assert pop_all(policy, snap) == ["new-b"]
    assert len(policy) == 2
    freed = with_view(snap, "a0", in_flight=3)
    assert pop_all(policy, freed) == ["old-a"]
    assert len(policy) == 1


def test_unhealthy_or_prefill_only_instances_do_not_count_as_capacity() -> None:
    fleet = [
        make_instance_view("sick", healthy=False),
        make_instance_view("p", role=ExecutionInstanceType.PREFILLING),
        make_instance_view("draining", accepting=False),
    ]
    policy = FIFOPolicy()
    policy.push(make_request_info("r"))
    assert policy.pop(make_snapshot(fleet)) is None
    assert len(policy) == 1


def test_a_retry_excluding_the_free_instance_waits_and_does_not_block() -> None:
    fleet = [make_instance_view("i0"), make_instance_view("i1", in_flight=100)]
    snap = make_snapshot(fleet)
    policy = FIFOPolicy()
    policy.push(make_request_info("retry", arrival=0.0, excluded_instances=frozenset({"i0"})))
    policy.push(make_request_info("fresh", arrival=1.0))
    assert pop_all(policy, snap) == ["fresh"]
    assert len(policy) == 1
    assert pop_all(policy, with_view(snap, "i1", in_flight=0)) == ["retry"]


def test_remove_cancels_a_queued_request() -> None:
    policy = FIFOPolicy()
    for req in make_request_infos(5):
        policy.push(req)
    removed = policy.remove("r2")
    assert removed is not None
    assert removed.request_id == "r2"
    assert policy.remove("r2") is None
    assert policy.remove("never-queued") is None
    assert len(policy) == 4
    assert pop_all(policy, make_snapshot(1)) == ["r0", "r1", "r3", "r4"]


def test_removing_the_head_exposes_the_next_one() -> None:
    policy = FIFOPolicy()
    for req in make_request_infos(3):
        policy.push(req)
    policy.remove("r0")
    head = policy.peek(make_snapshot(1))
    assert head is not None
    assert head.request_id == "r1"


def test_drain_returns_everything_in_order_and_empties() -> None:
    policy = FIFOPolicy()
    for rid, arrival in [("c", 3.0), ("a", 1.0), ("b", 2.0)]:
        policy.push(make_request_info(rid, arrival=arrival, model=f"m-{rid}"))
    assert [r.request_id for r in policy.drain()] == ["a", "b", "c"]
    assert len(policy) == 0
    assert policy.drain() == []


def test_a_request_id_can_be_queued_once() -> None:
    policy = FIFOPolicy()
    policy.push(make_request_info("dup"))
    with pytest.raises(ConflictError, match="dup"):
        policy.push(make_request_info("dup", arrival=5.0))
    assert policy.pop(make_snapshot(1)) is not None
    policy.push(make_request_info("dup", arrival=6.0))
    assert len(policy) == 1


def test_ten_thousand_requests_with_cancellations_keep_order() -> None:
    policy = FIFOPolicy()
    reqs = make_request_infos(10_000, gap=0.01)
    for req in reversed(reqs):
        policy.push(req)
    cancelled = {f"r{i}" for i in range(0, 10_000, 3)}
    for rid in cancelled:
        assert policy.remove(rid) is not None
    snap = make_snapshot(1, now=200.0)
    expected = [r.request_id for r in reqs if r.request_id not in cancelled]
    assert pop_all(policy, snap) == expected


def test_describe_names_params_and_state() -> None:
    policy = FIFOPolicy()
    policy.push(make_request_info())
    info = policy.describe()
    assert info["name"] == "fifo"
    assert info["params"] == {}
    assert info["state"] == {"queued": 1, "ended": 0}
