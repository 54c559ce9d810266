"""Pipeline: candidate set, allowed / excluded, weighted combination, reason, hooks."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

import pytest

from sage_llm.control_plane.routing.base import Router, RoutingDecision
from sage_llm.control_plane.routing.filters import HealthyFilter, LoadCapFilter
from sage_llm.control_plane.routing.pickers import MaxPicker, WeightedRandomPicker
from sage_llm.control_plane.routing.pipeline import Pipeline
from sage_llm.control_plane.routing.registry import ROUTING_NAMES, build_router
from sage_llm.control_plane.routing.scorers import (
    KVUsageScorer,
    LeastOutstandingScorer,
    PreferredInstanceScorer,
)
from sage_llm.control_plane.snapshot import ClusterSnapshot, InstanceView, RequestInfo
from sage_llm.types import ExecutionInstanceType as Role
from tests.factories import make_instance_view, make_request_info, make_snapshot


class FixedScorer:
    """Scores from a table (a real scorer, just a trivial one)."""

    def __init__(self, name: str, table: dict[str, float]) -> None:
        self.name = name
        self.table = table

    def score(
        self, req: RequestInfo, candidates: Sequence[InstanceView], snap: ClusterSnapshot
    ) -> dict[str, float]:
        return {c.instance_id: self.table.get(c.instance_id, 0.0) for c in candidates}


class Recorder:
    """A stateful component: records every decision it is told about."""

    name = "recorder"

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def score(
        self, req: RequestInfo, candidates: Sequence[InstanceView], snap: ClusterSnapshot
    ) -> dict[str, float]:
        return {c.instance_id: 0.5 for c in candidates}

    def on_routed(self, req: RequestInfo, decision: RoutingDecision) -> None:
        self.seen.append((req.request_id, decision.instance_id))

    def describe(self) -> dict[str, object]:
        return {"decisions": len(self.seen)}


def lb(seed: int = 0) -> Pipeline:
    return Pipeline(
        "test",
        [HealthyFilter()],
        [(LeastOutstandingScorer(), 1.0), (KVUsageScorer(), 1.0)],
        MaxPicker(),
        random.Random(seed),
    )


def test_pipeline_is_a_router() -> None:
    assert isinstance(lb(), Router)


def test_never_routes_to_an_instance_of_another_model() -> None:
    snap = make_snapshot(
        [
            make_instance_view("mine", in_flight=90),
            make_instance_view("other-model", model="other"),
        ]
    )
    for seed in range(10):
        decision = lb(seed).route(make_request_info(), snap)
        assert decision is not None
        assert decision.instance_id == "mine"
    assert lb().route(make_request_info(model="nobody"), snap) is None


def test_only_runnable_instances_are_candidates() -> None:
    snap = make_snapshot(
        [
            make_instance_view("sick", healthy=False),
            make_instance_view("draining", accepting=False),
            make_instance_view("full", in_flight=4, max_concurrency=4),
            make_instance_view("prefill-only", role=Role.PREFILLING),
            make_instance_view("ok", in_flight=50),
        ]
    )
    decision = lb().route(make_request_info(), snap)
    assert decision is not None
    assert decision.instance_id == "ok"
    assert set(decision.scores) == {"ok"}


def test_allowed_restriction_is_honoured() -> None:
    snap = make_snapshot(
        [make_instance_view("i0"), *(make_instance_view(f"i{n}", in_flight=9) for n in (1, 2))]
    )
    for seed in range(10):
        decision = lb(seed).route(make_request_info(), snap, frozenset({"i1", "i2"}))
        assert decision is not None
        assert decision.instance_id in {"i1", "i2"}
    assert lb().route(make_request_info(), snap, frozenset()) is None
    assert lb().route(make_request_info(), snap, frozenset({"nope"})) is None


def test_excluded_instances_are_honoured() -> None:
    snap = make_snapshot(3)
    req = make_request_info(excluded_instances=frozenset({"i0", "i2"}))
    for seed in range(10):
        decision = lb(seed).route(req, snap)
        assert decision is not None
        assert decision.instance_id == "i1"
    everything = make_request_info(excluded_instances=frozenset({"i0", "i1", "i2"}))
    assert lb().route(everything, snap) is None


def test_returns_none_when_filters_leave_nothing() -> None:
    snap = make_snapshot(2)
    nothing = Pipeline("none", [LoadCapFilter(0.0), _DropAll()], [], MaxPicker())
    assert nothing.route(make_request_info(), snap) is None


class _DropAll:
    name = "drop_all"

    def filter(
        self, req: RequestInfo, candidates: Sequence[InstanceView], snap: ClusterSnapshot
    ) -> Sequence[InstanceView]:
        return []


def test_combined_score_is_the_weighted_mean() -> None:
    snap = make_snapshot(2)
    pipe = Pipeline(
        "weighted",
        [],
        [
            (FixedScorer("x", {"i0": 1.0, "i1": 0.0}), 1.0),
            (FixedScorer("y", {"i0": 0.0, "i1": 1.0}), 3.0),
        ],
        MaxPicker(),
        random.Random(0),
    )
    decision = pipe.route(make_request_info(), snap)
    assert decision is not None
    assert decision.scores == pytest.approx({"i0": 0.25, "i1": 0.75})
    assert decision.instance_id == "i1"
    assert decision.reason == "weighted: y=1.00 (2 candidates)"


def test_zero_weight_scorers_are_dropped_and_no_scorers_means_equal_scores() -> None:
    snap = make_snapshot(3)
    pipe = Pipeline(
        "flat", [], [(FixedScorer("x", {"i0": 1.0}), 0.0)], WeightedRandomPicker(), random.Random(1)
    )
    assert pipe.scorers == ()
    decision = pipe.route(make_request_info(), snap)
    assert decision is not None
    assert decision.scores == {"i0": 1.0, "i1": 1.0, "i2": 1.0}
    assert decision.reason == "flat: weighted_random (3 candidates)"


def test_reason_names_the_strategy_and_top_factor() -> None:
    snap = make_snapshot(2)
    pipe = Pipeline(
        "lb",
        [],
        [(LeastOutstandingScorer(), 1.0), (PreferredInstanceScorer(), 5.0)],
        MaxPicker(),
        random.Random(0),
    )
    decision = pipe.route(make_request_info(preferred_instance_id="i1"), snap)
    assert decision is not None
    assert decision.instance_id == "i1"
    assert decision.reason == "lb: preferred_instance=1.00 (2 candidates)"


def test_reason_names_the_first_scorer_on_a_tie() -> None:
    first, second = FixedScorer("first", {"i0": 1.0}), FixedScorer("second", {"i0": 1.0})
    for scorers, name in (([first, second], "first"), ([second, first], "second")):
        pipe = Pipeline("t", [], [(s, 1.0) for s in scorers], MaxPicker(), random.Random(0))
        decision = pipe.route(make_request_info(), make_snapshot(2))
        assert decision is not None
        assert decision.reason == f"t: {name}=1.00 (2 candidates)"


def test_a_scorer_breaking_the_contract_is_reported() -> None:
    snap = make_snapshot(2)
    bad = Pipeline("bad", [], [(FixedScorer("wild", {"i0": 1.5}), 1.0)], MaxPicker())
    with pytest.raises(ValueError, match="wild"):
        bad.route(make_request_info(), snap)

    class Partial(FixedScorer):
        def score(
            self, req: RequestInfo, candidates: Sequence[InstanceView], snap: ClusterSnapshot
        ) -> dict[str, float]:
            return {"i0": 0.5}

    partial = Pipeline("partial", [], [(Partial("partial", {}), 1.0)], MaxPicker())
    with pytest.raises(ValueError, match="every candidate"):
        partial.route(make_request_info(), snap)
    # beside another scorer (the weighted sum's own loop): named all the same
    two = [(FixedScorer("calm", {"i0": 0.5, "i1": 0.5}), 1.0), (Partial("partial", {}), 2.0)]
    mixed = Pipeline("mixed", [], two, MaxPicker())
    with pytest.raises(ValueError, match=r"^scorer 'partial' gave None for 'i1'; scores must be"):
        mixed.route(make_request_info(), snap)


def test_a_picker_choosing_no_candidate_is_reported() -> None:
    class Stray(MaxPicker):
        name = "stray"

        def pick(self, scores: Mapping[str, float], rng: random.Random) -> str:
            return "nowhere"

    pipe = Pipeline("p", [], [(FixedScorer("s", {"i0": 0.5}), 1.0)], Stray())
    assert repr(pipe) == "Pipeline('p')"
    with pytest.raises(ValueError, match=r"^picker 'stray' chose 'nowhere', not a candidate$"):
        pipe.route(make_request_info(), make_snapshot(2))


def test_constructor_validation() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        Pipeline("neg", [], [(KVUsageScorer(), -1.0)], MaxPicker())
    with pytest.raises(ValueError, match="name"):
        Pipeline("", [], [], MaxPicker())
    with pytest.raises(ValueError, match="leg"):
        Pipeline("x", [], [], MaxPicker(), leg="sideways")  # type: ignore[arg-type]


def test_on_routed_reaches_stateful_components() -> None:
    recorder = Recorder()
    pipe = Pipeline("rec", [], [(recorder, 1.0)], MaxPicker(), random.Random(0))
    snap = make_snapshot(2)
    first = pipe.route(make_request_info("a"), snap)
    second = pipe.route(make_request_info("b"), snap)
    assert first is not None
    assert second is not None
    assert recorder.seen == [("a", first.instance_id), ("b", second.instance_id)]
    assert pipe.describe()["state"] == {"recorder": {"decisions": 2}}


def test_prefill_and_decode_legs() -> None:
    snap = make_snapshot(
        [
            make_instance_view("p", role=Role.PREFILLING),
            make_instance_view("d", role=Role.DECODING),
        ]
    )
    req = make_request_info()
    assert lb().route(req, snap) is None
    for leg, expected in (("prefill", "p"), ("decode", "d")):
        pipe = Pipeline("leg", [], [(KVUsageScorer(), 1.0)], MaxPicker(), leg=leg)  # type: ignore[arg-type]
        decision = pipe.route(req, snap)
        assert decision is not None
        assert decision.instance_id == expected


def test_same_seed_same_decisions() -> None:
    snap = make_snapshot(6)

    def run(seed: int) -> list[str]:
        pipe = Pipeline("r", [], [], WeightedRandomPicker(), random.Random(seed))
        out = []
        for req in (make_request_info(f"r{n}") for n in range(30)):
            decision = pipe.route(req, snap)
            assert decision is not None
            out.append(decision.instance_id)
        return out

    assert run(42) == run(42)
    assert run(42) != run(43)


def test_describe() -> None:
    info = Pipeline(
        "d", [HealthyFilter()], [(KVUsageScorer(), 2.0)], MaxPicker(), params={"k": 1}
    ).describe()
    assert info == {
        "name": "d",
        "leg": "whole",
        "filters": ["healthy"],
        "scorers": [{"name": "kv_usage", "weight": 2.0}],
        "picker": "max",
        "params": {"k": 1},
    }


@pytest.mark.parametrize("name", ROUTING_NAMES)
def test_route_id_picks_what_route_picks(name: str) -> None:
    rng = random.Random(7)
    a, b = build_router(name, seed=3), build_router(name, seed=3)
    assert isinstance(a, Pipeline) and isinstance(b, Pipeline)
    for n in range(60):
        views = [
            make_instance_view(
                f"i{k}",
                in_flight=rng.randrange(0, 8),
                max_concurrency=8,
                queued_prefill_tokens=rng.randrange(0, 4000),
                kv_usage=rng.random(),
            )
            for k in range(rng.randrange(1, 9))
        ]
        snap = make_snapshot(views, now=float(n))
        req = make_request_info(f"r{n}", arrival=float(n))
        allowed = frozenset({"i0", "i2"}) if n % 3 == 0 else None
        decision = a.route(req, snap, allowed)
        assert b.route_id(req, snap, allowed) == (
            None if decision is None else decision.instance_id
        )


def test_route_id_tells_stateful_components() -> None:
    recorder = Recorder()
    pipe = Pipeline("r", [], [(recorder, 1.0)], MaxPicker(), random.Random(0))
    chosen = pipe.route_id(make_request_info("r1"), make_snapshot(3))
    assert chosen is not None and recorder.seen == [("r1", chosen)]
