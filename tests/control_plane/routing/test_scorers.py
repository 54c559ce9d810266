"""Scorers: each one's ordering, the [0, 1] contract, and consistent-hashing stability."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from sage_llm.control_plane.routing.base import Scorer
from sage_llm.control_plane.routing.prefix_index import PrefixIndex
from sage_llm.control_plane.routing.scorers import (
    KVUsageScorer,
    LatencyScorer,
    LeastOutstandingScorer,
    PreferredInstanceScorer,
    PrefixMatchScorer,
    QueueDepthScorer,
    SessionAffinityScorer,
    TopologyScorer,
    clamp01,
    rendezvous_owner,
)
from sage_llm.control_plane.routing.strategies import RoundRobinCursor
from sage_llm.control_plane.snapshot import ClusterSnapshot, InstanceView, RequestInfo
from sage_llm.types import ExecutionInstanceType as Role
from tests.factories import make_instance_view, make_request_info, make_snapshot

ALL_SCORERS: list[Scorer] = [
    LeastOutstandingScorer(),
    QueueDepthScorer(),
    KVUsageScorer(),
    PrefixMatchScorer(),
    PrefixMatchScorer(load_slack=0.1),
    SessionAffinityScorer(),
    TopologyScorer(),
    PreferredInstanceScorer(),
    LatencyScorer(),
    RoundRobinCursor(),
]


def score(scorer: Scorer, req: RequestInfo, snap: ClusterSnapshot) -> dict[str, float]:
    return scorer.score(req, snap.instances, snap)


def test_scorers_follow_the_protocol() -> None:
    for s in ALL_SCORERS:
        assert isinstance(s, Scorer)


def test_clamp01() -> None:
    assert clamp01(-1.0) == 0.0
    assert clamp01(2.0) == 1.0
    assert clamp01(float("nan")) == 0.0
    assert clamp01(0.25) == 0.25


def test_least_outstanding_prefers_less_work() -> None:
    snap = make_snapshot(
        [
            make_instance_view("idle"),
            make_instance_view("some", in_flight=2, outstanding_decode_tokens=100),
            make_instance_view("busy", in_flight=8, queued_prefill_tokens=4000),
        ]
    )
    s = score(LeastOutstandingScorer(), make_request_info(), snap)
    assert s["idle"] == 1.0
    assert s["idle"] > s["some"] > s["busy"]
    assert s["busy"] == 0.0


def test_least_outstanding_is_relative_to_capacity() -> None:
    snap = make_snapshot(
        [
            make_instance_view("big", in_flight=10, max_concurrency=100),
            make_instance_view("small", in_flight=5, max_concurrency=10),
        ]
    )
    s = score(LeastOutstandingScorer(), make_request_info(), snap)
    assert s["big"] > s["small"]


def test_equal_load_scores_equal() -> None:
    snap = make_snapshot(3, in_flight=3, queued_prefill_tokens=50)
    for scorer in (LeastOutstandingScorer(), QueueDepthScorer(), KVUsageScorer()):
        assert len(set(score(scorer, make_request_info(), snap).values())) == 1


def test_queue_depth_counts_queued_tokens_and_engine_waiting() -> None:
    snap = make_snapshot(
        [
            make_instance_view("a"),
            make_instance_view("b", engine_waiting=4),
            make_instance_view("c", queued_prefill_tokens=2000, engine_waiting=4),
        ]
    )
    s = score(QueueDepthScorer(), make_request_info(), snap)
    assert s["a"] == 1.0 > s["b"] > s["c"] == 0.0


def test_kv_usage() -> None:
    snap = make_snapshot([make_instance_view("a", kv_usage=0.25), make_instance_view("b")])
    assert score(KVUsageScorer(), make_request_info(), snap) == {"a": 0.75, "b": 1.0}


def test_prefix_match_is_the_matched_fraction() -> None:
    index = PrefixIndex()
    index.insert("a", [1, 2, 3])
    index.insert("b", [1])
    snap = make_snapshot(3, prefix=index)
    req = make_request_info(block_hashes=(1, 2, 3, 4))
    assert score(PrefixMatchScorer(), req, snap) == {"i0": 0.0, "i1": 0.0, "i2": 0.0}
    snap = make_snapshot([make_instance_view(i) for i in "abc"], prefix=index)
    assert score(PrefixMatchScorer(), req, snap) == {"a": 0.75, "b": 0.25, "c": 0.0}
    assert score(PrefixMatchScorer(), make_request_info(), snap) == {"a": 0, "b": 0, "c": 0}
    # a snapshot with no prefix index (none tracked): no instance is known to hold any
    bare = make_snapshot([make_instance_view(i) for i in "ab"])
    assert score(PrefixMatchScorer(), req, bare) == {"a": 0.0, "b": 0.0}


def test_prefix_match_bonus_only_within_load_slack() -> None:
    index = PrefixIndex()
    index.insert("a", [1, 2])
    snap = make_snapshot(
        [make_instance_view("a", in_flight=30), make_instance_view("b", in_flight=5)],
        prefix=index,
    )
    req = make_request_info(block_hashes=(1, 2))
    assert score(PrefixMatchScorer(load_slack=0.3), req, snap)["a"] == 1.0
    assert score(PrefixMatchScorer(load_slack=0.2), req, snap)["a"] == 0.0
    with pytest.raises(ValueError, match="load_slack"):
        PrefixMatchScorer(load_slack=2.0)


def test_prefix_match_bonus_reaches_a_load_at_the_edge_of_the_slack() -> None:
    """``load <= min load + load_slack``: with no slack, equally loaded candidates all get
    it; an instance exactly ``load_slack`` above the least loaded one gets it too."""
    index = PrefixIndex()
    index.insert("a", [1, 2])
    req = make_request_info(block_hashes=(1, 2))
    equal = make_snapshot(
        [make_instance_view(i, in_flight=2, max_concurrency=8) for i in "ab"], prefix=index
    )
    assert score(PrefixMatchScorer(load_slack=0.0), req, equal) == {"a": 1.0, "b": 0.0}
    edge = make_snapshot(
        [
            make_instance_view("a", in_flight=4, max_concurrency=8),
            make_instance_view("b", in_flight=2, max_concurrency=8),
        ],
        prefix=index,
    )
    assert score(PrefixMatchScorer(load_slack=0.25), req, edge)["a"] == 1.0


def test_session_affinity_marks_one_instance_per_key() -> None:
    snap = make_snapshot(5)
    scorer = SessionAffinityScorer()
    req = make_request_info(session_id="s-1")
    s = score(scorer, req, snap)
    assert sorted(s.values()) == [0.0, 0.0, 0.0, 0.0, 1.0]
    assert s[scorer.sticky_instance(req, snap) or ""] == 1.0
    assert set(score(scorer, make_request_info(), snap).values()) == {0.0}


def test_session_affinity_uses_the_user_when_there_is_no_session() -> None:
    snap = make_snapshot(8)
    scorer = SessionAffinityScorer()
    by_user = scorer.sticky_instance(make_request_info(user_id="u"), snap)
    same_session = scorer.sticky_instance(make_request_info(user_id="x", session_id="u"), snap)
    assert by_user == same_session is not None


def test_session_affinity_ring_spans_all_instances_of_the_model() -> None:
    views = [make_instance_view(f"i{n}") for n in range(6)]
    snap = make_snapshot(views)
    scorer = SessionAffinityScorer()
    req = make_request_info(user_id="alice")
    sticky = scorer.sticky_instance(req, snap)
    assert sticky is not None
    # the sticky instance unhealthy: still its key's owner; the bonus goes to the key's
    # next choice among the others, the same one every time
    sick = make_snapshot([*(v for v in views if v.instance_id != sticky)])
    sick = ClusterSnapshot(
        now=0,
        instances=(*sick.instances, make_instance_view(sticky, healthy=False)),
    )
    assert scorer.sticky_instance(req, sick) == sticky
    runnable = sick.runnable(req)
    second = rendezvous_owner("alice", [v.instance_id for v in runnable])
    assert second is not None and second != sticky
    scores = scorer.score(req, runnable, sick)
    assert {i for i, v in scores.items() if v} == {second} and scores[second] == 1.0
    # other models' and PD-only instances are not on the ring
    crowd = make_snapshot(
        [
            *views,
            *(make_instance_view(f"o{n}", model="other") for n in range(20)),
            *(make_instance_view(f"d{n}", role=Role.DECODING) for n in range(20)),
        ]
    )
    assert scorer.sticky_instance(req, crowd) == sticky


def test_session_affinity_bypasses_an_overloaded_sticky_instance() -> None:
    snap = make_snapshot(4)
    scorer = SessionAffinityScorer(overload_threshold=0.8)
    req = make_request_info(session_id="s")
    sticky = scorer.sticky_instance(req, snap)
    assert sticky is not None
    busy = make_snapshot(
        [
            make_instance_view(i.instance_id, in_flight=80 if i.instance_id == sticky else 0)
            for i in snap
        ]
    )
    scores = score(scorer, req, busy)
    second = rendezvous_owner("s", [i.instance_id for i in snap if i.instance_id != sticky])
    assert {i for i, v in scores.items() if v} == {second}
    # every instance at or above the threshold: no bonus anywhere
    full = make_snapshot([make_instance_view(i.instance_id, in_flight=80) for i in snap])
    assert set(score(scorer, req, full).values()) == {0.0}
    with pytest.raises(ValueError, match="overload_threshold"):
        SessionAffinityScorer(overload_threshold=0.0)
    with pytest.raises(ValueError, match="ring_leg"):
        SessionAffinityScorer(ring_leg="nope")  # type: ignore[arg-type]


def test_rendezvous_hashing_moves_few_keys_when_an_instance_is_added() -> None:
    ring = [f"inst-{n}" for n in range(10)]
    keys = [f"user-{k}" for k in range(1000)]
    before = {k: rendezvous_owner(k, ring) for k in keys}
    after = {k: rendezvous_owner(k, [*ring, "inst-new"]) for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert all(after[k] == "inst-new" for k in moved)  # keys only move to the newcomer
    assert 0.04 < len(moved) / len(keys) < 0.15  # about 1/11
    assert rendezvous_owner("k", []) is None


def test_rendezvous_hashing_spreads_keys() -> None:
    ring = [f"inst-{n}" for n in range(4)]
    owners = [rendezvous_owner(f"user-{k}", ring) for k in range(2000)]
    for iid in ring:
        assert 0.18 < owners.count(iid) / 2000 < 0.32


def test_topology_ranks_nvlink_over_machine_over_rack_over_other() -> None:
    views = [
        make_instance_view("prev", machine_id="m1", rack_id="r1", nvlink_domain="nv1"),
        make_instance_view("peer", machine_id="m1", rack_id="r1", nvlink_domain="nv1"),
        make_instance_view("listed", machine_id="m9", nvlink_peers=frozenset({"prev"})),
        make_instance_view("machine", machine_id="m1", rack_id="r1", nvlink_domain="nv2"),
        make_instance_view("rack", machine_id="m2", rack_id="r1"),
        make_instance_view("far", machine_id="m3", rack_id="r2"),
    ]
    snap = make_snapshot(views)
    s = score(TopologyScorer(), make_request_info(previous_instance_id="prev"), snap)
    assert s == {"prev": 1.0, "peer": 1.0, "listed": 1.0, "machine": 0.6, "rack": 0.3, "far": 0}
    by_pref = score(TopologyScorer(), make_request_info(preferred_instance_id="rack"), snap)
    assert by_pref["rack"] == 1.0
    assert by_pref["far"] == 0.0
    assert set(score(TopologyScorer(), make_request_info(), snap).values()) == {0.0}
    gone = make_request_info(previous_instance_id="gone", preferred_instance_id="far")
    assert score(TopologyScorer(), gone, snap)["far"] == 1.0
    with pytest.raises(ValueError, match="machine"):
        TopologyScorer(machine=1.5)


def test_topology_reference_is_the_previous_instance_before_the_preferred_one() -> None:
    snap = make_snapshot(
        [make_instance_view("a", machine_id="m1"), make_instance_view("b", machine_id="m2")]
    )
    both = make_request_info(previous_instance_id="a", preferred_instance_id="b")
    ref = TopologyScorer.reference(both, snap)
    assert ref is not None and ref.instance_id == "a"
    assert score(TopologyScorer(), both, snap) == {"a": 1.0, "b": 0.0}


def test_topology_breaks_a_tie_on_one_machine_by_numa_node() -> None:
    """``numa_node`` was documented to break such ties and read nowhere (a coin flip)."""
    views = [
        make_instance_view("prev", machine_id="m0", numa_node=0),
        make_instance_view("same-numa", machine_id="m0", numa_node=0),
        make_instance_view("other-numa", machine_id="m0", numa_node=1),
        make_instance_view("unknown", machine_id="m0"),
    ]
    s = score(
        TopologyScorer(), make_request_info(previous_instance_id="prev"), make_snapshot(views)
    )
    assert s["same-numa"] == pytest.approx(0.7)
    assert s["other-numa"] == s["unknown"] == 0.6


def test_preferred_instance() -> None:
    snap = make_snapshot(3)
    req = make_request_info(preferred_instance_id="i1")
    assert score(PreferredInstanceScorer(), req, snap) == {"i0": 0.0, "i1": 1.0, "i2": 0.0}


def test_latency_prefers_the_lowest_predicted_ttft() -> None:
    snap = make_snapshot(
        [
            make_instance_view("fast", est_prefill_tps=20000.0),
            make_instance_view("slow", est_prefill_tps=2000.0),
            make_instance_view("queued", est_prefill_tps=20000.0, queued_prefill_tokens=50000),
        ]
    )
    s = score(LatencyScorer(), make_request_info(prompt_tokens=1000), snap)
    assert s["fast"] == 1.0
    assert s["fast"] > s["slow"] > 0.0
    assert s["fast"] > s["queued"] > 0.0


# ---------------------------------------------------------------- the [0, 1] contract

_views = hs.builds(
    InstanceView,
    instance_id=hs.sampled_from([f"i{n}" for n in range(8)]),
    model=hs.sampled_from(["m", "m", "other"]),
    role=hs.sampled_from(list(Role)),
    healthy=hs.booleans(),
    accepting=hs.booleans(),
    in_flight=hs.integers(0, 300),
    max_concurrency=hs.integers(0, 200),
    queued_prefill_tokens=hs.integers(0, 10**6),
    outstanding_decode_tokens=hs.integers(0, 10**6),
    kv_usage=hs.floats(-0.5, 1.5, allow_nan=False),
    engine_waiting=hs.integers(0, 500),
    machine_id=hs.sampled_from([None, "m1", "m2"]),
    rack_id=hs.sampled_from([None, "r1"]),
    nvlink_domain=hs.sampled_from([None, "nv1"]),
    est_ttft_base_s=hs.floats(0.0, 2.0),
    est_prefill_tps=hs.floats(0.0, 1e5),
)


@hs.composite
def cluster_cases(draw: hs.DrawFn) -> tuple[RequestInfo, ClusterSnapshot, Sequence[InstanceView]]:
    views = draw(hs.lists(_views, min_size=1, max_size=8, unique_by=lambda v: v.instance_id))
    index = PrefixIndex(capacity_blocks=draw(hs.integers(1, 30)))
    for iid, hashes in draw(
        hs.lists(
            hs.tuples(hs.sampled_from([v.instance_id for v in views]), hs.lists(hs.integers(0, 9)))
        )
    ):
        index.insert(iid, hashes)
    names = [v.instance_id for v in views] + ["missing"]
    req = make_request_info(
        model="m",
        prompt_tokens=draw(hs.integers(0, 10**5)),
        block_hashes=tuple(draw(hs.lists(hs.integers(0, 9), max_size=10))),
        session_id=draw(hs.none() | hs.text(max_size=5)),
        user_id=draw(hs.none() | hs.text(max_size=5)),
        previous_instance_id=draw(hs.none() | hs.sampled_from(names)),
        preferred_instance_id=draw(hs.none() | hs.sampled_from(names)),
    )
    snap = make_snapshot(views, prefix=index)
    candidates = draw(hs.sampled_from([views, list(snap.runnable(req))]))
    return req, snap, candidates


@settings(max_examples=200, deadline=None)
@given(case=cluster_cases())
def test_every_scorer_scores_every_candidate_within_0_and_1(
    case: tuple[RequestInfo, ClusterSnapshot, Sequence[InstanceView]],
) -> None:
    req, snap, candidates = case
    for scorer in ALL_SCORERS:
        scores = scorer.score(req, candidates, snap)
        assert set(scores) == {c.instance_id for c in candidates}, scorer.name
        for value in scores.values():
            assert 0.0 <= value <= 1.0, scorer.name
