"""The routing hot paths against the plain definitions they replace.

``leg_candidates``, ``CapacityFilter`` (and its runnable-candidates shortcut in
``Pipeline.candidates``), ``LeastOutstandingScorer``, a single-scorer ``Pipeline.scores``
and the power-of-two pair draw have inlined versions (they run for every decision); over
random fleets each must give exactly what the plain formulas give.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import pytest

from sage_llm.control_plane.routing.filters import CapacityFilter, leg_candidates
from sage_llm.control_plane.routing.pickers import (
    MaxPicker,
    PowerOfTwoPicker,
    best_of,
    sample_two,
)
from sage_llm.control_plane.routing.pipeline import Pipeline
from sage_llm.control_plane.routing.scorers import (
    KVUsageScorer,
    LeastOutstandingScorer,
    _inverse_load,
)
from sage_llm.control_plane.routing.strategies import RoundRobinCursor
from sage_llm.control_plane.snapshot import ClusterSnapshot, InstanceView, RequestInfo
from sage_llm.types import ExecutionInstanceType as Role
from tests.factories import make_instance_view, make_request_info, make_snapshot


def _random_views(rng: random.Random, n: int) -> list[InstanceView]:
    views = []
    for k in range(n):
        bound = rng.choice([1, 4, 100])
        views.append(
            make_instance_view(
                f"i{k}",
                model=rng.choice(["m", "m", "other"]),
                role=rng.choice(list(Role)),
                healthy=rng.random() < 0.9,
                accepting=rng.random() < 0.9,
                in_flight=rng.randrange(0, bound + 2),
                max_concurrency=bound,
                queued_prefill_tokens=rng.choice([0, rng.randrange(0, 5000)]),
                outstanding_decode_tokens=rng.choice([0, rng.randrange(0, 5000)]),
                kv_usage=rng.choice([0.0, 0.5, 0.96, 1.0]),
            )
        )
    return views


def _request(rng: random.Random, views: list[InstanceView]) -> RequestInfo:
    excluded = frozenset(v.instance_id for v in views if rng.random() < 0.2)
    return make_request_info(model="m", excluded_instances=excluded)


def _random_case(
    rng: random.Random, most: int
) -> tuple[ClusterSnapshot, RequestInfo, frozenset[str] | None]:
    """The snapshot of a random fleet of fewer than ``most`` views, a request, and (three
    times in ten) a random ``allowed`` set."""
    views = _random_views(rng, rng.randrange(0, most))
    allowed = None
    if rng.random() < 0.3:
        allowed = frozenset(v.instance_id for v in views if rng.random() < 0.5)
    return make_snapshot(views), _request(rng, views), allowed


def test_whole_leg_candidates_are_exactly_runnable() -> None:
    rng = random.Random(1)
    for _ in range(300):
        views = _random_views(rng, rng.randrange(0, 30))
        snap = make_snapshot(views)
        req = _request(rng, views)
        assert leg_candidates(req, snap, "whole") == list(snap.runnable(req))


def test_capacity_filter_is_the_plain_definition() -> None:
    rng = random.Random(2)
    flt = CapacityFilter(0.95)
    for _ in range(300):
        views = _random_views(rng, rng.randrange(0, 30))
        free = [c for c in views if c.has_capacity]
        roomy = [c for c in free if c.kv_usage < 0.95]
        assert list(flt.filter(make_request_info(), views, make_snapshot(views))) == (roomy or free)


def test_least_outstanding_is_the_inverse_load_formula() -> None:
    rng = random.Random(3)
    scorer = LeastOutstandingScorer()
    for _ in range(300):
        views = _random_views(rng, rng.randrange(1, 30))
        util = [c.in_flight / max(c.max_concurrency, 1) for c in views]
        tokens = [float(c.queued_prefill_tokens + c.outstanding_decode_tokens) for c in views]
        expected = _inverse_load(views, util, tokens)
        got = scorer.score(make_request_info(), views, make_snapshot(views))
        assert got == expected
        assert list(got) == list(expected)


def _plain_scores(pipe: Pipeline, req: RequestInfo, cands: list[InstanceView]) -> dict[str, float]:
    snap = make_snapshot(cands)
    combined = dict.fromkeys((c.instance_id for c in cands), 0.0)
    for scorer, weight in pipe.scorers:
        raw = scorer.score(req, cands, snap)
        for c in cands:
            combined[c.instance_id] += weight * raw[c.instance_id]
    total = sum(w for _, w in pipe.scorers)
    return {iid: min(1.0, v / total) for iid, v in combined.items()}


def test_single_scorer_pipeline_scores_as_the_weighted_mean() -> None:
    rng = random.Random(4)
    for weight in (1.0, 0.3, 7.0):
        pipe = Pipeline("t", [], [(LeastOutstandingScorer(), weight)], MaxPicker())
        for _ in range(100):
            cands = _random_views(rng, rng.randrange(1, 20))
            req = make_request_info()
            combined, per_scorer = pipe.scores(req, cands, make_snapshot(cands))
            assert combined == _plain_scores(pipe, req, cands)
            assert len(per_scorer) == 1


def test_repeated_candidates_add_up_as_before() -> None:
    view = make_instance_view("a", kv_usage=0.5)
    other = make_instance_view("b", kv_usage=0.0)
    cands = [view, other, view]
    pipe = Pipeline("t", [], [(KVUsageScorer(), 1.0)], MaxPicker())
    combined, _ = pipe.scores(make_request_info(), cands, ClusterSnapshot(0.0, tuple(cands)))
    assert combined == {"a": 1.0, "b": 1.0}  # 0.5 twice, then capped at 1
    assert combined == _plain_scores(pipe, make_request_info(), cands)


def test_power_of_two_picks_as_best_of_a_sorted_pair() -> None:
    rng = random.Random(6)
    picker = PowerOfTwoPicker()
    for _ in range(500):
        n = rng.randrange(2, 20)
        scores = {f"i{k}": rng.choice([0.0, 0.5, 0.5 + 1e-10, 1.0, rng.random()]) for k in range(n)}
        seed = rng.randrange(1 << 30)
        expected_rng = random.Random(seed)
        pair = sorted(expected_rng.sample(sorted(scores), 2))
        expected = best_of(pair, scores, expected_rng)
        got_rng = random.Random(seed)
        assert picker.pick(scores, got_rng) == expected
        assert got_rng.random() == expected_rng.random()


def test_sample_two_draws_as_random_sample() -> None:
    rng = random.Random(7)
    for n in [2, 3, 5, 16, 20, 21, 22, 23, 40, 300]:
        ids = [f"i{k}" for k in range(n)]
        for _ in range(40):
            seed = rng.randrange(1 << 30)
            expected_rng, got_rng = random.Random(seed), random.Random(seed)
            assert sample_two(ids, got_rng) == tuple(expected_rng.sample(ids, 2))
            assert got_rng.random() == expected_rng.random()


class _OtherRandom(random.Random):
    def sample(self, population: Any, k: int, *, counts: Any = None) -> list[Any]:
        return list(reversed(population))[:k]


def test_sample_two_asks_other_generators() -> None:
    assert sample_two(["a", "b", "c"], _OtherRandom(0)) == ("c", "b")


def test_capacity_filter_of_runnable_candidates_is_the_plain_filter() -> None:
    rng = random.Random(8)
    flt = CapacityFilter(0.95)
    for _ in range(300):
        views = [v for v in _random_views(rng, rng.randrange(0, 30)) if v.has_capacity]
        plain = flt.filter(make_request_info(), views, make_snapshot(views))
        assert list(flt.filter_runnable(views)) == list(plain)


def test_pipeline_candidates_are_the_plain_definition() -> None:
    rng = random.Random(9)
    pipe = Pipeline("t", [CapacityFilter(0.95)], [(LeastOutstandingScorer(), 1.0)], MaxPicker())
    for _ in range(300):
        snap, req, allowed = _random_case(rng, 30)
        plain: list[InstanceView] = list(snap.runnable(req))
        if allowed is not None:
            plain = [c for c in plain if c.instance_id in allowed]
        if plain:
            plain = list(CapacityFilter(0.95).filter(req, plain, snap))
        assert list(pipe.candidates(req, snap, allowed)) == plain


class _FixedScorer:
    name = "fixed"

    def __init__(self, raw: dict[str, float]) -> None:
        self.raw = raw

    def score(
        self, req: RequestInfo, candidates: Sequence[InstanceView], snap: ClusterSnapshot
    ) -> dict[str, float]:
        return dict(self.raw)


def test_weight_one_scores_keep_every_check_and_the_sign_of_zero() -> None:
    cands = [make_instance_view(iid) for iid in ("a", "b", "c")]
    snap, req = make_snapshot(cands), make_request_info()

    def scores(raw: dict[str, float]) -> dict[str, float]:
        pipe = Pipeline("t", [], [(_FixedScorer(raw), 1.0)], MaxPicker())
        return pipe.scores(req, cands, snap)[0]

    got = scores({"a": -0.0, "b": 0.5, "c": 1.0})
    assert got == {"a": 0.0, "b": 0.5, "c": 1.0} and math.copysign(1.0, got["a"]) == 1.0
    assert list(scores({"c": 0.2, "a": 0.1, "b": 0.3})) == ["a", "b", "c"]  # candidate order
    assert scores({"a": 0.1, "b": 0.2, "c": 0.3, "x": 5.0}) == {"a": 0.1, "b": 0.2, "c": 0.3}
    for bad in ({"a": 0.1, "b": math.nan, "c": 0.3}, {"a": 0.1, "b": 1.5, "c": 0.3},
                {"a": -0.1, "b": 0.2, "c": 0.3}, {"a": 0.1, "b": 0.2}):  # fmt: skip
        with pytest.raises(ValueError, match="scores must be in"):
            scores(bad)


class _Scores:
    """A scorer's scores only (no ``winner``): the pipeline's general path."""

    def __init__(self, inner: RoundRobinCursor) -> None:
        self.inner = inner
        self.name = inner.name

    def score(
        self, req: RequestInfo, candidates: Sequence[InstanceView], snap: ClusterSnapshot
    ) -> dict[str, float]:
        return self.inner.score(req, candidates, snap)


@pytest.mark.parametrize("weight", [1.0, 0.4])
def test_one_hot_scorer_decides_as_scores_and_max_picker(weight: float) -> None:
    """The round-robin cursor under the max picker names its winner directly: the same
    choices, scores, reasons and cursor moves as scoring every candidate and picking."""
    rng = random.Random(7)
    fast_cursor, plain_cursor = RoundRobinCursor(), RoundRobinCursor()
    fast = Pipeline("rr", [CapacityFilter()], [(fast_cursor, weight)], MaxPicker())
    plain = Pipeline("rr", [CapacityFilter()], [(_Scores(plain_cursor), weight)], MaxPicker())
    assert fast._one_hot is fast_cursor and plain._one_hot is None
    plain._observers = (plain_cursor,)
    for n in range(400):
        snap, req, allowed = _random_case(rng, 12)
        if n % 2:
            assert fast.route_id(req, snap, allowed) == plain.route_id(req, snap, allowed)
        else:
            got, want = fast.route(req, snap, allowed), plain.route(req, snap, allowed)
            assert got == want
        assert fast_cursor._last == plain_cursor._last


def test_one_hot_winner_must_be_a_candidate() -> None:
    class Stray(RoundRobinCursor):
        def winner(self, req: RequestInfo, candidates: Sequence[InstanceView]) -> str:
            return "nowhere"

    pipe = Pipeline("rr", [], [(Stray(), 1.0)], MaxPicker())
    views = [make_instance_view("a")]
    with pytest.raises(ValueError, match="'nowhere', not a candidate"):
        pipe.route(make_request_info(), make_snapshot(views))
