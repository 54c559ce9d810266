"""The named strategies, driven the way the dispatcher drives them."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from sage_llm.control_plane.routing.base import RoutingDecision
from sage_llm.control_plane.routing.pipeline import Pipeline
from sage_llm.control_plane.routing.prefix_index import PrefixIndex
from sage_llm.control_plane.routing.registry import ROUTING_NAMES, build_router
from sage_llm.control_plane.routing.scorers import SessionAffinityScorer, rendezvous_owner
from sage_llm.control_plane.routing.strategies import (
    AffinityParams,
    LoadBalancedParams,
    LocalityParams,
    RoundRobinCursor,
    TopologyAwareParams,
    affinity,
    load_balanced,
    locality,
    natural_key,
    power_of_two,
    random_choice,
    round_robin,
    router_wants,
    topology_aware,
)
from sage_llm.control_plane.snapshot import ClusterSnapshot, InstanceView, RequestInfo
from sage_llm.errors import ConfigError
from sage_llm.types import ExecutionInstanceType as Role
from tests.control_plane.routing.test_scorers import cluster_cases
from tests.factories import (
    make_instance_view,
    make_request_info,
    make_request_infos,
    make_snapshot,
    with_view,
)

ALL: list[Callable[..., Pipeline]] = [
    load_balanced,
    round_robin,
    random_choice,
    power_of_two,
    affinity,
    locality,
    topology_aware,
]


def route(router: Pipeline, req: RequestInfo, snap: ClusterSnapshot) -> RoutingDecision:
    decision = router.route(req, snap)
    assert decision is not None
    return decision


def dispatch(
    router: Pipeline,
    reqs: list[RequestInfo],
    snap: ClusterSnapshot,
    index: PrefixIndex | None = None,
) -> tuple[list[str], ClusterSnapshot]:
    """Route ``reqs`` one by one as the dispatcher does: account each decision on the
    successor snapshot (and in the prefix index) before the next one."""
    chosen = []
    for req in reqs:
        decision = route(router, req, snap)
        chosen.append(decision.instance_id)
        snap = snap.with_assignment(decision.instance_id, req)
        if index is not None:
            index.insert(decision.instance_id, req.block_hashes)
    return chosen, snap


# ---------------------------------------------------------------- load_balanced


@pytest.mark.parametrize("seed", range(5))
def test_load_balanced_spreads_a_batch(seed: int) -> None:
    chosen, _ = dispatch(
        load_balanced(rng=random.Random(seed)), make_request_infos(8), make_snapshot(4)
    )
    assert Counter(chosen) == {"i0": 2, "i1": 2, "i2": 2, "i3": 2}


def test_load_balanced_prefers_the_idle_instance() -> None:
    snap = make_snapshot(3, in_flight=10, queued_prefill_tokens=3000, kv_usage=0.5)
    snap = with_view(snap, "i1", in_flight=1, queued_prefill_tokens=0, kv_usage=0.1)
    decision = route(load_balanced(rng=random.Random(0)), make_request_info(), snap)
    assert decision.instance_id == "i1"
    assert decision.reason.startswith("load_balanced: ")


def test_load_balanced_avoids_kv_saturated_instances() -> None:
    snap = with_view(make_snapshot(2), "i0", kv_usage=0.99)
    snap = with_view(snap, "i1", in_flight=60)
    assert route(load_balanced(rng=random.Random(0)), make_request_info(), snap).instance_id == "i1"


def test_load_balanced_can_honour_a_preferred_instance() -> None:
    snap = with_view(make_snapshot(3), "i2", in_flight=5)
    req = make_request_info(preferred_instance_id="i2")
    plain = load_balanced(rng=random.Random(0))
    assert route(plain, req, snap).instance_id != "i2"
    keen = load_balanced(LoadBalancedParams(preferred_weight=10.0), rng=random.Random(0))
    assert route(keen, req, snap).instance_id == "i2"


def test_load_balanced_needs_a_load_weight_even_with_a_preferred_weight() -> None:
    loads = ("outstanding_weight", "queue_weight", "kv_weight", "latency_weight")
    with pytest.raises(ConfigError) as err:
        build_router("load_balanced", {**dict.fromkeys(loads, 0.0), "preferred_weight": 1.0})
    assert err.value.key == "outstanding_weight"
    assert all(name in str(err.value) for name in loads)


# ---------------------------------------------------------------- round_robin


def test_round_robin_cycles_in_instance_id_order() -> None:
    views = [make_instance_view(f"sim-{n}") for n in (10, 2, 1)]
    router = round_robin(rng=random.Random(0))
    chosen, _ = dispatch(router, make_request_infos(7), make_snapshot(views))
    assert chosen == ["sim-1", "sim-2", "sim-10", "sim-1", "sim-2", "sim-10", "sim-1"]
    assert router.describe()["state"] == {"round_robin": {"last": {"llama-3-8b": "sim-1"}}}


def test_round_robin_gives_ids_of_one_natural_key_each_a_turn() -> None:
    """``gpu-01`` and ``gpu-1`` sort alike by their numbers; neither is skipped."""
    views = [make_instance_view(i) for i in ("gpu-01", "gpu-1", "gpu-2")]
    chosen, _ = dispatch(round_robin(rng=random.Random(0)), make_request_infos(6),
                         make_snapshot(views))  # fmt: skip
    assert chosen == ["gpu-01", "gpu-1", "gpu-2"] * 2


def test_round_robin_keeps_its_order_across_many_models_and_instance_ids() -> None:
    """Instance ids and models that come and go (thousands of them) do not make its
    memos grow without bound, and a model's turn goes on in order once they were reset."""
    cursor = RoundRobinCursor()
    views = [make_instance_view(f"sim-{n}") for n in (10, 2, 1)]
    assert cursor.next_instance("m", views) == "sim-1"
    cursor.on_routed(make_request_info(model="m"), RoutingDecision("sim-2"))
    for k in range(5000):  # each a model of its own, on an instance of its own
        one = [make_instance_view(f"gone-{k}", model=f"m{k}")]
        assert cursor.next_instance(f"m{k}", one) == f"gone-{k}"
    assert len(cursor._keys) <= 4096 and len(cursor._order) <= 4096
    assert cursor.next_instance("m", views) == "sim-10"


def test_round_robin_skips_full_instances() -> None:
    snap = make_snapshot(4, max_concurrency=8)
    snap = with_view(snap, "i1", in_flight=8)
    chosen, _ = dispatch(round_robin(rng=random.Random(0)), make_request_infos(6), snap)
    assert chosen == ["i0", "i2", "i3", "i0", "i2", "i3"]


def test_round_robin_continues_after_an_instance_fills_up() -> None:
    snap = make_snapshot(3, max_concurrency=1)
    chosen, snap = dispatch(round_robin(rng=random.Random(0)), make_request_infos(3), snap)
    assert chosen == ["i0", "i1", "i2"]
    assert round_robin().route(make_request_info(), snap) is None


def test_round_robin_keeps_a_cursor_per_model() -> None:
    views = [
        *(make_instance_view(f"a{n}", model="A") for n in range(3)),
        *(make_instance_view(f"b{n}", model="B") for n in range(2)),
    ]
    snap = make_snapshot(views)
    router = round_robin(rng=random.Random(0))
    models = ["A", "B", "A", "B", "A", "B", "A"]
    chosen = [route(router, make_request_info(model=m), snap).instance_id for m in models]
    assert chosen == ["a0", "b0", "a1", "b1", "a2", "b0", "a0"]


def test_natural_key() -> None:
    assert sorted(["i10", "i9", "i1", "x"], key=natural_key) == ["i1", "i9", "i10", "x"]


# ---------------------------------------------------------------- random


def test_random_uses_every_runnable_instance() -> None:
    snap = with_view(make_snapshot(4), "i3", healthy=False)
    router = random_choice(rng=random.Random(9))
    counts = Counter(route(router, make_request_info(), snap).instance_id for _ in range(400))
    assert set(counts) == {"i0", "i1", "i2"}
    assert min(counts.values()) > 80


# ---------------------------------------------------------------- power_of_two


def test_power_of_two_picks_the_less_loaded_of_the_pair() -> None:
    snap = make_snapshot(
        [make_instance_view("light", in_flight=1), make_instance_view("heavy", in_flight=20)]
    )
    router = power_of_two(rng=random.Random(0))
    for _ in range(20):
        assert route(router, make_request_info(), snap).instance_id == "light"


def test_power_of_two_never_picks_the_most_loaded() -> None:
    snap = make_snapshot([make_instance_view(f"i{n}", in_flight=n * 5) for n in range(5)])
    router = power_of_two(rng=random.Random(4))
    counts = Counter(route(router, make_request_info(), snap).instance_id for _ in range(1000))
    assert "i4" not in counts
    assert counts["i0"] > counts["i1"] > counts["i2"] > counts["i3"] > 0


# ---------------------------------------------------------------- affinity


def test_affinity_is_sticky_per_session_across_calls_and_load() -> None:
    router = affinity(rng=random.Random(0))
    snap = make_snapshot(5)
    for user in ("alice", "bob", "carol"):
        req = make_request_info(user_id=user)
        first = route(router, req, snap).instance_id
        later = snap
        for n in range(10):
            later = later.with_assignment(f"i{n % 5}", req)
            assert route(router, req, later).instance_id == first
        assert route(affinity(rng=random.Random(99)), req, snap).instance_id == first


def test_affinity_spreads_users() -> None:
    router = affinity(rng=random.Random(0))
    snap = make_snapshot(4)
    owners = {
        route(router, make_request_info(user_id=f"u{k}"), snap).instance_id for k in range(40)
    }
    assert owners == {"i0", "i1", "i2", "i3"}


def sticky_of(req: RequestInfo, snap: ClusterSnapshot) -> str:
    sticky = SessionAffinityScorer().sticky_instance(req, snap)
    assert sticky is not None
    return sticky


def test_affinity_moves_an_overloaded_sessions_turns_to_one_second_instance() -> None:
    snap = make_snapshot(4, in_flight=30)
    req = make_request_info(session_id="sess-7")
    sticky = sticky_of(req, snap)
    others = [i.instance_id for i in snap if i.instance_id != sticky]
    second = rendezvous_owner("sess-7", others)
    assert second is not None
    least = next(i for i in others if i != second)
    snap = with_view(snap, least, in_flight=10)
    router = affinity(AffinityParams(overload_threshold=0.8), rng=random.Random(0))
    assert route(router, req, snap).instance_id == sticky
    overloaded = with_view(snap, sticky, in_flight=80)
    # the key's next choice, not the least loaded: every turn lands on the same instance
    for _ in range(5):
        decision = route(router, req, overloaded)
        assert decision.instance_id == second
        assert decision.reason.startswith("affinity: session_affinity")
    relaxed = affinity(AffinityParams(overload_threshold=0.9), rng=random.Random(0))
    assert route(relaxed, req, overloaded).instance_id == sticky
    # every instance at or above the threshold: the least loaded
    fourth = next(i for i in others if i not in (second, least))
    loads = {sticky: 90, second: 85, least: 81, fourth: 95}
    full = make_snapshot([make_instance_view(i, in_flight=n) for i, n in loads.items()])
    decision = route(router, req, full)
    assert decision.instance_id == least
    assert decision.reason.startswith("affinity: least_outstanding")


@pytest.mark.parametrize(
    "change", [{"healthy": False}, {"accepting": False}, {"in_flight": 100}, {"kv_usage": 0.99}]
)
def test_affinity_falls_back_when_sticky_cannot_take_the_request(change: dict[str, object]) -> None:
    snap = make_snapshot(4)
    req = make_request_info(user_id="dave")
    sticky = sticky_of(req, snap)
    broken = with_view(snap, sticky, **change)
    decision = route(affinity(rng=random.Random(0)), req, broken)
    assert decision.instance_id != sticky
    # and comes back once the sticky instance recovers
    assert route(affinity(rng=random.Random(0)), req, snap).instance_id == sticky


def test_affinity_adding_an_instance_moves_few_keys() -> None:
    router = affinity(rng=random.Random(0))
    small = make_snapshot(8)
    big = make_snapshot(9)
    users = [make_request_info(user_id=f"user-{k}") for k in range(1000)]
    before = [route(router, r, small).instance_id for r in users]
    after = [route(router, r, big).instance_id for r in users]
    moved = [(b, a) for b, a in zip(before, after, strict=True) if b != a]
    assert all(a == "i8" for _b, a in moved)
    assert len(moved) < 200  # about 1000 / 9


def test_affinity_ring_holds_the_instances_that_run_the_pipelines_leg() -> None:
    snap = make_snapshot(
        [
            make_instance_view("general-0"),
            make_instance_view("prefill-0", role=Role.PREFILLING),
            make_instance_view("prefill-1", role=Role.PREFILLING),
            make_instance_view("decode-0", role=Role.DECODING),
        ]
    )
    router = affinity(rng=random.Random(0), leg="prefill")
    for k in range(20):
        key = f"sess-{k}"
        owner = rendezvous_owner(key, ["general-0", "prefill-0", "prefill-1"])
        assert owner is not None
        # the owner busier than the others (below the threshold): stickiness, not load, wins
        busy = with_view(snap, owner, in_flight=50)
        decision = route(router, make_request_info(session_id=key), busy)
        assert decision.instance_id == owner
        assert decision.reason.startswith("affinity: session_affinity")


def test_affinity_without_a_key_is_least_loaded() -> None:
    snap = with_view(make_snapshot(3, in_flight=20), "i2", in_flight=0)
    assert route(affinity(rng=random.Random(0)), make_request_info(), snap).instance_id == "i2"


# ---------------------------------------------------------------- locality


def test_locality_prefers_the_instance_caching_the_prefix() -> None:
    index = PrefixIndex()
    index.insert("i2", [11, 12, 13, 14])
    snap = make_snapshot(4, prefix=index)
    snap = with_view(snap, "i2", in_flight=5)  # a little busier, within the slack
    req = make_request_info(block_hashes=(11, 12, 13, 14, 15))
    decision = route(locality(rng=random.Random(0)), req, snap)
    assert decision.instance_id == "i2"
    assert decision.reason.startswith("locality: prefix_match=0.80")


def test_locality_ignores_the_prefix_holder_when_overloaded_beyond_the_slack() -> None:
    index = PrefixIndex()
    index.insert("i2", [11, 12, 13, 14])
    snap = with_view(make_snapshot(4, prefix=index), "i2", in_flight=25)
    req = make_request_info(block_hashes=(11, 12, 13, 14))
    assert route(locality(rng=random.Random(0)), req, snap).instance_id != "i2"
    wide = locality(LocalityParams(load_slack=0.3), rng=random.Random(0))
    assert route(wide, req, snap).instance_id == "i2"


@pytest.mark.parametrize(
    ("idle", "excluded"),
    [
        (make_instance_view("idle", model="other"), frozenset[str]()),
        (make_instance_view("idle", healthy=False), frozenset[str]()),
        (make_instance_view("idle"), frozenset({"idle"})),
    ],
    ids=["other-model", "unhealthy", "excluded"],
)
def test_locality_slack_is_measured_from_the_least_loaded_candidate(
    idle: InstanceView, excluded: frozenset[str]
) -> None:
    index = PrefixIndex()
    index.insert("holder", [1, 2, 3, 4])
    holder = make_instance_view("holder", in_flight=3, max_concurrency=10)
    other = make_instance_view("other", in_flight=2, max_concurrency=10)
    req = make_request_info(block_hashes=(1, 2, 3, 4), excluded_instances=excluded)
    router = locality(rng=random.Random(0))
    for views in ([holder, other], [holder, other, idle]):  # the idle one changes nothing
        decision = route(router, req, make_snapshot(views, prefix=index))
        assert decision.instance_id == "holder"
        assert decision.reason == "locality: prefix_match=1.00 (2 candidates)"


def test_locality_hot_prefix_does_not_pile_onto_one_instance() -> None:
    index = PrefixIndex()
    snap = make_snapshot(4, max_concurrency=10, prefix=index)
    reqs = make_request_infos(24, block_hashes=(1, 2, 3, 4))
    chosen, final = dispatch(locality(rng=random.Random(0)), reqs, snap, index)
    loads = [i.in_flight for i in final]
    assert max(loads) - min(loads) <= 2
    assert Counter(chosen)[chosen[0]] < 24


def test_locality_follows_distinct_prefixes_to_their_holders() -> None:
    index = PrefixIndex()
    snap = make_snapshot(4, prefix=index, max_concurrency=100)
    router = locality(rng=random.Random(0))
    groups = {g: tuple(range(g * 10, g * 10 + 4)) for g in range(4)}
    first = {}
    for g, hashes in groups.items():
        first[g] = route(router, make_request_info(block_hashes=hashes), snap).instance_id
        snap = snap.with_assignment(first[g], make_request_info())
        index.insert(first[g], hashes)
    for g, hashes in groups.items():
        decision = route(router, make_request_info(block_hashes=hashes), snap)
        assert decision.instance_id == first[g]


def test_locality_weighs_kv_usage_by_kv_weight() -> None:
    def weights(router: Pipeline) -> dict[object, object]:
        scorers = router.describe()["scorers"]
        assert isinstance(scorers, list)
        return {s["name"]: s["weight"] for s in scorers}

    assert weights(locality()) == {"prefix_match": 3.0, "least_outstanding": 1.0}
    tuned = locality(LocalityParams(prefix_weight=2.0, load_weight=0.5, kv_weight=4.0))
    assert weights(tuned) == {"prefix_match": 2.0, "least_outstanding": 0.5, "kv_usage": 4.0}


# ---------------------------------------------------------------- topology_aware


def topo_snapshot() -> ClusterSnapshot:
    return make_snapshot(
        [
            make_instance_view("prev", machine_id="m1", nvlink_domain="nv1", in_flight=100),
            make_instance_view("other", machine_id="m3", rack_id="r2"),
            make_instance_view("machine", machine_id="m1", nvlink_domain="nv2"),
            make_instance_view("peer", machine_id="m1", nvlink_domain="nv1"),
        ]
    )


def test_topology_prefers_nvlink_peer_then_machine_then_other() -> None:
    router = topology_aware(rng=random.Random(0))
    req = make_request_info(previous_instance_id="prev")
    snap = topo_snapshot()
    assert route(router, req, snap).instance_id == "peer"
    snap = with_view(snap, "peer", healthy=False)
    assert route(router, req, snap).instance_id == "machine"
    snap = with_view(snap, "machine", accepting=False)
    assert route(router, req, snap).instance_id == "other"


def test_topology_uses_the_preferred_instance_without_a_previous_one() -> None:
    req = make_request_info(preferred_instance_id="prev")
    assert route(topology_aware(rng=random.Random(0)), req, topo_snapshot()).instance_id == "peer"


def test_topology_is_balanced_with_load() -> None:
    snap = with_view(topo_snapshot(), "peer", in_flight=40)
    req = make_request_info(previous_instance_id="prev")
    assert route(topology_aware(rng=random.Random(0)), req, snap).instance_id == "machine"
    loose = topology_aware(TopologyAwareParams(load_slack=0.5), rng=random.Random(0))
    assert route(loose, req, snap).instance_id == "peer"


def test_topology_drops_kv_saturated_instances_before_capping_load() -> None:
    router = topology_aware(rng=random.Random(0))
    assert router.describe()["filters"] == ["capacity", "load_cap"]
    snap = make_snapshot(
        [
            make_instance_view("full-kv", max_concurrency=10, kv_usage=0.99),
            make_instance_view("roomy", in_flight=5, max_concurrency=10, kv_usage=0.1),
        ]
    )
    assert route(router, make_request_info(), snap).instance_id == "roomy"


def test_topology_accepts_a_rack_score_up_to_the_machine_score() -> None:
    router = build_router("topology_aware", {"machine_score": 0.5, "rack_score": 0.5})
    assert (router.params["machine_score"], router.params["rack_score"]) == (0.5, 0.5)
    with pytest.raises(ConfigError) as err:
        build_router("topology_aware", {"machine_score": 0.5, "rack_score": 0.6})
    assert err.value.key == "rack_score"


@pytest.mark.parametrize("name", ["locality", "topology_aware"])
@pytest.mark.parametrize("slack", [0.0, 1.0])
def test_load_slack_accepts_0_and_1(name: str, slack: float) -> None:
    assert build_router(name, {"load_slack": slack}).params["load_slack"] == slack


# ---------------------------------------------------------------- all strategies


@pytest.mark.parametrize("make", ALL)
def test_strategies_never_cross_models_roles_or_exclusions(make: Callable[..., Pipeline]) -> None:
    snap = make_snapshot(
        [
            make_instance_view("ok-1"),
            make_instance_view("ok-2", in_flight=3),
            make_instance_view("other", model="other"),
            make_instance_view("decode", role=Role.DECODING),
            make_instance_view("excluded"),
        ]
    )
    router = make(rng=random.Random(1))
    for n in range(30):
        req = make_request_info(
            f"r{n}",
            user_id=f"u{n}",
            excluded_instances=frozenset({"excluded"}),
            previous_instance_id="other",
        )
        decision = route(router, req, snap)
        assert decision.instance_id in {"ok-1", "ok-2"}
        limited = router.route(req, snap, frozenset({"ok-2", "other"}))
        assert limited is not None
        assert limited.instance_id == "ok-2"
        assert all(0.0 <= v <= 1.0 for v in decision.scores.values())
    assert router.route(make_request_info(model="none"), snap) is None


@pytest.mark.parametrize("name", [n for n in ROUTING_NAMES if n != "random"])
def test_strategies_but_random_avoid_instances_at_their_kv_threshold(name: str) -> None:
    index = PrefixIndex()
    index.insert("full-kv", [1, 2, 3, 4])
    snap = make_snapshot(
        [
            make_instance_view("full-kv", max_concurrency=10, kv_usage=0.6),
            make_instance_view("roomy", in_flight=2, max_concurrency=10, kv_usage=0.1),
        ],
        prefix=index,
    )
    reqs = [
        make_request_info(
            f"r{n}", user_id=f"u{n}", block_hashes=(1, 2, 3, 4), previous_instance_id="full-kv"
        )
        for n in range(20)
    ]

    def chosen(params: dict[str, float]) -> set[str]:
        router = build_router(name, params, seed=0)
        filters = router.describe()["filters"]
        assert isinstance(filters, list) and filters[0] == "capacity"
        return {route(router, req, snap).instance_id for req in reqs}

    assert "full-kv" in chosen({})  # below the default threshold, it is attractive
    assert chosen({"kv_threshold": 0.5}) == {"roomy"}


def test_default_params_are_the_documented_ones() -> None:
    doc = (Path(__file__).parents[3] / "docs" / "routing.md").read_text()
    table = doc.split("### Parameters at a glance", 1)[1].split("\n## ", 1)[0]
    documented: dict[str, dict[str, float]] = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != 2 or not cells[0].startswith("`"):
            continue
        pairs = [] if cells[1] == "none" else cells[1].strip("`").split(", ")
        documented[cells[0].strip("`")] = {
            key: float(value) for key, value in (pair.split("=") for pair in pairs)
        }
    assert list(documented) == list(ROUTING_NAMES)
    for name, defaults in documented.items():
        assert build_router(name).params == defaults, name


class _Opaque:
    """A router that is not a Pipeline."""

    name = "opaque"

    def route(
        self, req: RequestInfo, snap: ClusterSnapshot, allowed: frozenset[str] | None = None
    ) -> RoutingDecision | None:
        return None

    def describe(self) -> dict[str, object]:
        return {}


def test_router_wants_reports_what_a_router_may_read() -> None:
    assert router_wants(_Opaque()) == (True, True)  # cannot be inspected: it may read both
    assert router_wants(locality()) == (True, False)
    assert router_wants(affinity()) == (False, True)
    assert router_wants(load_balanced()) == (False, False)


@pytest.mark.parametrize("make", ALL)
def test_strategies_are_deterministic_under_a_seed(make: Callable[..., Pipeline]) -> None:
    def run(seed: int) -> list[str]:
        index = PrefixIndex()
        snap = make_snapshot(6, prefix=index, max_concurrency=8)
        reqs = [
            make_request_info(f"r{n}", user_id=f"u{n % 5}", block_hashes=(n % 3, 7))
            for n in range(30)
        ]
        chosen, _ = dispatch(make(rng=random.Random(seed)), reqs, snap, index)
        return chosen

    assert run(7) == run(7)


@settings(max_examples=100, deadline=None)
@given(case=cluster_cases(), seed=hs.integers(0, 2**32))
def test_every_strategy_returns_a_runnable_instance_and_scores_within_0_and_1(
    case: tuple[RequestInfo, ClusterSnapshot, object], seed: int
) -> None:
    req, snap, _candidates = case
    runnable = {i.instance_id for i in snap.runnable(req)}
    for make in ALL:
        decision = make(rng=random.Random(seed)).route(req, snap)
        if not runnable:
            assert decision is None
            continue
        assert decision is not None
        assert decision.instance_id in runnable
        assert set(decision.scores) <= runnable
        assert all(0.0 <= v <= 1.0 for v in decision.scores.values())


@pytest.mark.parametrize(
    ("params", "key"),
    [
        (lambda: LoadBalancedParams(kv_threshold=0.0), "kv_threshold"),
        (lambda: LoadBalancedParams(outstanding_weight=-1), "outstanding_weight"),
        (
            lambda: LoadBalancedParams(
                outstanding_weight=0, queue_weight=0, kv_weight=0, latency_weight=0
            ),
            "outstanding_weight",
        ),
        (lambda: AffinityParams(overload_threshold=1.5), "overload_threshold"),
        (lambda: LocalityParams(load_slack=-0.1), "load_slack"),
        (lambda: TopologyAwareParams(machine_score=float("nan")), "machine_score"),
    ],
)
def test_params_validate(params: Callable[[], object], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        params()
    assert err.value.key == key


def _reference_next(last: str | None, ids: list[str]) -> str:
    """The round-robin order's definition: candidates sorted by ``(natural_key, id)``; the
    first past the last one routed to in that order, else the first."""
    ordered = sorted((natural_key(i), i) for i in ids)
    if last is not None:
        for key, iid in ordered:
            if (key, iid) > (natural_key(last), last):
                return iid
    return ordered[0][1]


@pytest.mark.parametrize("seed", range(4))
def test_round_robin_cursor_matches_its_definition(seed: int) -> None:
    rng = random.Random(seed)
    names = [f"engine-{k}" for k in range(12)] + [
        "a01",
        "a1",
        "b",
        "node-2-gpu-10",
        "node-10-gpu-2",
    ]
    cursor = RoundRobinCursor()
    ids = names
    for _ in range(400):
        if rng.random() < 0.4:  # new candidates (else the same as before: the order kept)
            ids = rng.sample(names, rng.randrange(1, len(names)))
        views = [make_instance_view(i) for i in ids]
        last = cursor._last.get("m")
        chosen = cursor.next_instance("m", views)
        assert chosen == _reference_next(last, ids)
        if rng.random() < 0.8:
            cursor._last["m"] = chosen
