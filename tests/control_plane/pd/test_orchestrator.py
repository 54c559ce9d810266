"""PD pair selection: roles, transfer cost, per-phase load and the concurrency bound."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from sage_llm.control_plane.pd import build_pd
from sage_llm.control_plane.pd.decider import AdaptiveDecider
from sage_llm.control_plane.pd.orchestrator import (
    LinkModel,
    PairingParams,
    PDOrchestrator,
    PDPlan,
    isolation,
    pair_exists,
    phase_fit,
    predicted_e2e_s,
    prefill_gap_s,
    servable_view,
    unservable_reason,
    uses_pd,
    with_pd_assignment,
)
from sage_llm.control_plane.routing.prefix_index import PrefixIndex
from sage_llm.control_plane.snapshot import PAIR_VIEW_PREFIX, ClusterSnapshot
from sage_llm.errors import ConfigError
from sage_llm.types import ExecutionInstanceType as Role
from sage_llm.types import PDSeparationConfig
from tests.factories import make_instance_view, make_request_info, make_snapshot, with_view


def plan_of(orch: PDOrchestrator, snap: ClusterSnapshot, **req: object) -> PDPlan:
    plan = orch.plan(make_request_info(**req), snap)  # type: ignore[arg-type]
    assert plan is not None
    return plan


def test_roles_are_honoured() -> None:
    snap = make_snapshot(
        [
            make_instance_view("d0", role=Role.DECODING),
            make_instance_view("p0", role=Role.PREFILLING),
        ]
    )
    plan = plan_of(PDOrchestrator(seed=1), snap)
    assert (plan.prefill_id, plan.decode_id) == ("p0", "d0")
    assert plan.scores == {"p0->d0": pytest.approx(max(plan.scores.values()))}


def test_no_plan_without_both_roles_or_with_a_single_general_instance() -> None:
    orch = PDOrchestrator(seed=1)
    req = make_request_info()
    prefill_only = make_snapshot([make_instance_view(f"p{i}", role=Role.PREFILLING) for i in "01"])
    assert orch.plan(req, prefill_only) is None
    assert orch.plan(req, make_snapshot([make_instance_view("g0")])) is None
    # Two GENERAL instances can form a pair (they take either leg), but never with themselves.
    plan = plan_of(orch, make_snapshot([make_instance_view("g0"), make_instance_view("g1")]))
    assert plan.prefill_id != plan.decode_id


def test_dedicated_roles_are_preferred_over_general_instances() -> None:
    snap = make_snapshot(
        [
            make_instance_view("g0"),
            make_instance_view("g1"),
            make_instance_view("p0", role=Role.PREFILLING),
            make_instance_view("d0", role=Role.DECODING),
        ]
    )
    plan = plan_of(PDOrchestrator(seed=3), snap)
    assert (plan.prefill_id, plan.decode_id) == ("p0", "d0")


def test_general_legs_keep_prefill_away_from_running_decodes() -> None:
    # Two GENERAL instances: g-dec runs decodes, g-pre has a prompt queued. The pair that
    # keeps phases apart prefills on g-pre and decodes on g-dec, whatever the seed.
    snap = make_snapshot(
        [
            make_instance_view("g-dec", in_flight=2, outstanding_decode_tokens=400),
            make_instance_view("g-pre", in_flight=2, queued_prefill_tokens=3000),
        ]
    )
    for seed in range(5):
        plan = plan_of(PDOrchestrator(seed=seed), snap)
        assert (plan.prefill_id, plan.decode_id) == ("g-pre", "g-dec")
    assert isolation(snap.instances[1], snap.instances[0]) == 1.0
    assert isolation(snap.instances[0], snap.instances[1]) == 0.0
    # the prefill leg's fit counts in proportion to its relative prefill speed
    assert isolation(snap.instances[1], snap.instances[0], speed=0.25) == 0.625


def test_phase_fit_groups_general_instances_by_phase() -> None:
    idle = make_instance_view("g")
    prefilling = make_instance_view("g", queued_prefill_tokens=100)
    decoding = make_instance_view("g", outstanding_decode_tokens=100)
    both = make_instance_view("g", queued_prefill_tokens=100, outstanding_decode_tokens=100)
    assert [phase_fit(v, "prefill") for v in (idle, prefilling, decoding, both)] == [
        0.5, 1.0, 0.0, 0.0,
    ]  # fmt: skip
    assert [phase_fit(v, "decode") for v in (idle, prefilling, decoding, both)] == [
        0.5, 0.0, 1.0, 0.0,
    ]  # fmt: skip
    dedicated = make_instance_view("p", role=Role.PREFILLING, queued_prefill_tokens=0)
    assert phase_fit(dedicated, "prefill") == 1.0


def test_a_long_prefill_queue_loses_to_an_idle_instance() -> None:
    # The dedicated prefill instance has 60k tokens queued (seconds of TTFT); an idle
    # GENERAL instance prefills now. Prefill speed outweighs role fit.
    snap = make_snapshot(
        [
            make_instance_view("p0", role=Role.PREFILLING, queued_prefill_tokens=60_000),
            make_instance_view("g0"),
            make_instance_view("d0", role=Role.DECODING),
        ]
    )
    for seed in range(3):
        plan = plan_of(PDOrchestrator(seed=seed), snap, prompt_tokens=4000)
        assert (plan.prefill_id, plan.decode_id) == ("g0", "d0")
    # Without the speed term and the phase isolation (which the speed scales for the
    # prefill leg), role fit keeps the leg on p0.
    no_speed = PDOrchestrator(PairingParams(ttft_weight=0.0, isolation_weight=0.0), seed=0)
    assert plan_of(no_speed, snap, prompt_tokens=4000).prefill_id == "p0"
    # Phase isolation alone would too, at full fit for any queue: scaled by speed it
    # gives the leg to the idle instance.
    assert plan_of(PDOrchestrator(PairingParams(ttft_weight=0.0), seed=0), snap,
                   prompt_tokens=4000).prefill_id == "g0"  # fmt: skip


def test_a_prefill_instance_not_measured_yet_gets_legs_to_be_measured_by() -> None:
    """Its 8,000 tokens/s prior lost every pair to a measured 47,000: a new or added
    prefill instance took no leg (0 of 170), so it was never measured."""
    measured = make_instance_view("pB", role=Role.PREFILLING, est_prefill_tps=47_000.0,
                                  est_ttft_base_s=0.01)  # fmt: skip
    new = make_instance_view("pA", role=Role.PREFILLING, measured=False, rate_measured=False)
    decode = make_instance_view("d0", role=Role.DECODING)
    # after short legs only it counts as measured, its rate still the prior: the same
    short_only = make_instance_view("pA", role=Role.PREFILLING, rate_measured=False)
    for candidate in (new, short_only):
        snap = make_snapshot([measured, candidate, decode])
        picked = {plan_of(PDOrchestrator(seed=seed), snap, prompt_tokens=1500).prefill_id
                  for seed in range(8)}  # fmt: skip
        assert "pA" in picked
    # as fast as the fastest measured one, but on its own queue: a deep one still loses
    busy = with_view(make_snapshot([measured, new, decode]), "pA", queued_prefill_tokens=200_000)
    for seed in range(4):
        snap = busy
        assert plan_of(PDOrchestrator(seed=seed), snap, prompt_tokens=1500).prefill_id == "pB"


def test_a_hybrid_prefill_leg_fits_its_role_half_as_well_as_a_dedicated_one() -> None:
    # HYBRID and GENERAL prefill candidates, alike but for their roles: the pair through
    # the HYBRID one scores higher by its role fit of 0.5 (GENERAL: 0), both legs averaged
    snap = make_snapshot(
        [
            make_instance_view("h0", role=Role.HYBRID),
            make_instance_view("g0"),
            make_instance_view("d0", role=Role.DECODING),
        ]
    )
    p = PairingParams()
    total = 2.0 + p.transfer_weight + p.role_weight + p.isolation_weight + p.ttft_weight
    for seed in range(4):
        plan = plan_of(PDOrchestrator(p, seed=seed), snap)
        assert (plan.prefill_id, plan.decode_id) == ("h0", "d0")
        gain = plan.scores["h0->d0"] - plan.scores["g0->d0"]
        assert gain == pytest.approx(p.role_weight * 0.5 / 2.0 / total)


def test_an_unmeasured_general_prefill_candidate_is_predicted_at_its_own_rate() -> None:
    # only a PREFILLING instance not measured yet borrows the fastest measured rate; a
    # GENERAL one is measured by its other requests and predicted as it is
    ref = make_instance_view("p0", role=Role.PREFILLING, est_prefill_tps=50_000.0)
    general = make_instance_view("g0", est_prefill_tps=1000.0, rate_measured=False)
    new = make_instance_view("p1", role=Role.PREFILLING, est_prefill_tps=1000.0,
                             rate_measured=False)  # fmt: skip
    req = make_request_info(prompt_tokens=1000)
    ttfts = PDOrchestrator._prefill_ttfts(req, [ref, general, new])
    assert ttfts["g0"] == pytest.approx(general.predict_ttft_s(1000))
    assert ttfts["p1"] == pytest.approx(ref.est_ttft_base_s + 1000 / 50_000.0)
    assert ttfts["g0"] > 10 * ttfts["p1"]


def test_transfer_cost_prefers_the_nvlink_peer() -> None:
    snap = make_snapshot(
        [
            make_instance_view("d0", role=Role.DECODING, machine_id="m1", nvlink_domain="m1"),
            make_instance_view("p-far", role=Role.PREFILLING, machine_id="m2", rack_id="r2"),
            make_instance_view("p-near", role=Role.PREFILLING, machine_id="m1", nvlink_domain="m1"),
        ]
    )
    for seed in range(5):
        plan = plan_of(PDOrchestrator(seed=seed), snap, prompt_tokens=8000)
        assert plan.prefill_id == "p-near"
        assert plan.link == "nvlink"
        assert plan.scores["p-near->d0"] > plan.scores["p-far->d0"]


def test_link_model_orders_nvlink_machine_rack_network() -> None:
    links = LinkModel()
    d = make_instance_view("d", machine_id="m1", rack_id="r1", nvlink_domain="nv1")
    nv = make_instance_view("a", machine_id="m1", rack_id="r1", nvlink_domain="nv1")
    host = make_instance_view("b", machine_id="m1", rack_id="r1")
    rack = make_instance_view("c", machine_id="m2", rack_id="r1")
    far = make_instance_view("e", machine_id="m3", rack_id="r9")
    assert [links.kind(x, d) for x in (nv, host, rack, far)] == [
        "nvlink",
        "machine",
        "rack",
        "network",
    ]
    times = [links.transfer_s(1000, x, d) for x in (nv, host, rack, far)]
    assert times == sorted(times)
    assert times[0] < times[1] < times[2] < times[3]
    # 1000 tokens × 128 KiB over the 10 GB/s rack network
    assert times[2] == pytest.approx(1000 * 131072 / 10e9)
    assert links.transfer_s(1000, d, d) == 0.0
    assert math.isinf(links.bandwidth_gbps(d, d))
    # A fast declared network never makes the same machine look slower than the rack.
    fast = LinkModel(machine_gbps=5.0)
    a = make_instance_view("a", machine_id="m", network_bandwidth_gbps=50.0)
    b = make_instance_view("b", machine_id="m", network_bandwidth_gbps=50.0)
    assert fast.bandwidth_gbps(a, b) == 50.0


def test_prefill_profile_prefers_prefix_locality_and_decode_profile_kv_headroom() -> None:
    hashes = tuple(range(1, 33))
    index = PrefixIndex()
    index.insert("p1", hashes)
    snap = make_snapshot(
        [
            make_instance_view("p0", role=Role.PREFILLING),
            make_instance_view("p1", role=Role.PREFILLING),
            make_instance_view("d0", role=Role.DECODING, kv_usage=0.9),
            make_instance_view("d1", role=Role.DECODING, kv_usage=0.1),
        ],
        prefix=index,
    )
    plan = plan_of(PDOrchestrator(seed=0), snap, prompt_tokens=512, block_hashes=hashes)
    assert (plan.prefill_id, plan.decode_id) == ("p1", "d1")


def test_a_burst_spreads_over_both_roles_with_per_phase_load() -> None:
    orch = PDOrchestrator(seed=0)
    snap = make_snapshot(
        [make_instance_view(f"p{i}", role=Role.PREFILLING, max_concurrency=3) for i in range(2)]
        + [make_instance_view(f"d{i}", role=Role.DECODING, max_concurrency=3) for i in range(2)]
    )
    plans: list[PDPlan] = []
    for n in range(20):
        req = make_request_info(f"r{n}", prompt_tokens=1000, max_tokens=100)
        plan = orch.plan(req, snap)
        if plan is None:
            break
        plans.append(plan)
        snap = with_pd_assignment(snap, plan, req)
    # Both sides are bounded at 3 each: 6 pairs fit, then nothing has a free slot.
    assert len(plans) == 6
    for view in snap:
        assert view.in_flight == 3
        if view.role is Role.PREFILLING:
            assert (view.queued_prefill_tokens, view.outstanding_decode_tokens) == (3000, 0)
        else:
            assert (view.queued_prefill_tokens, view.outstanding_decode_tokens) == (0, 300)


def test_the_concurrency_bound_holds_for_each_leg() -> None:
    orch = PDOrchestrator(seed=0)
    snap = make_snapshot(
        [
            make_instance_view("p0", role=Role.PREFILLING, in_flight=4, max_concurrency=4),
            make_instance_view("p1", role=Role.PREFILLING, in_flight=3, max_concurrency=4),
            make_instance_view("d0", role=Role.DECODING, in_flight=4, max_concurrency=4),
        ]
    )
    assert orch.plan(make_request_info(), snap) is None  # the only decode instance is full
    snap = with_view(snap, "d0", in_flight=2)
    plan = plan_of(orch, snap)
    assert plan.prefill_id == "p1"  # p0 is full


def test_excluded_and_unhealthy_instances_are_skipped() -> None:
    snap = make_snapshot(
        [
            make_instance_view("p0", role=Role.PREFILLING),
            make_instance_view("p1", role=Role.PREFILLING, healthy=False),
            make_instance_view("p2", role=Role.PREFILLING),
            make_instance_view("d0", role=Role.DECODING),
        ]
    )
    plan = plan_of(PDOrchestrator(seed=0), snap, excluded_instances=frozenset({"p0"}))
    assert plan.prefill_id == "p2"


def test_named_strategies_can_rate_the_legs() -> None:
    orch = PDOrchestrator(PairingParams(prefill_strategy="round_robin"), seed=0)
    snap = make_snapshot(
        [make_instance_view(f"p{i}", role=Role.PREFILLING) for i in range(3)]
        + [make_instance_view("d0", role=Role.DECODING)]
    )
    chosen = [plan_of(orch, snap, request_id=f"r{n}").prefill_id for n in range(6)]
    assert chosen == ["p0", "p1", "p2", "p0", "p1", "p2"]
    assert orch.describe()["prefill_router"]["name"] == "round_robin"  # type: ignore[index]
    with pytest.raises(ConfigError, match="unknown routing strategy 'nope'") as info:
        PairingParams(decode_strategy="nope")  # a parameter's error, naming it
    assert info.value.key == "decode_strategy"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("top_k", 0), ("transfer_weight", -1.0), ("kv_threshold", 0.0), ("nvlink_gbps", 0.0),
        ("itl_slo_s", 0.0), ("itl_slo_s", math.inf), ("itl_slo_s", math.nan),
        ("max_batched_tokens", 0), ("prefill_reserve", -1), ("reserve_hold_s", 0.0),
        ("reserve_hold_s", math.inf),
    ],
)  # fmt: skip
def test_bad_params_raise_config_errors(field: str, value: float) -> None:
    with pytest.raises(ConfigError) as err:
        PairingParams(**{field: value})  # type: ignore[arg-type]
    assert err.value.key == field


@pytest.mark.parametrize(
    ("kwargs", "key", "message"),
    [
        ({"prefix_weight": 0.0, "queue_weight": 0.0}, "prefix_weight", "queue_weight must be > 0"),
        ({"kv_weight": 0.0, "batch_weight": 0.0}, "kv_weight", "batch_weight must be > 0"),
        ({"cross_rack_factor": 0.0}, "cross_rack_factor", "must be in (0, 1], got 0.0"),
        ({"cross_rack_factor": 1.5}, "cross_rack_factor", "must be in (0, 1], got 1.5"),
        ({"kv_bytes_per_token": 0}, "kv_bytes_per_token", "must be >= 1"),
    ],
)
def test_pairing_params_that_cannot_rate_a_leg_or_a_link_name_their_key(
    kwargs: dict[str, float], key: str, message: str
) -> None:
    """Both of a leg's weights at 0 (and no strategy to rate it instead) would leave every
    candidate tied at 0; the link figures are checked as the pairing's own keys."""
    with pytest.raises(ConfigError) as err:
        PairingParams(**kwargs)  # type: ignore[arg-type]
    assert err.value.key == key
    assert message in err.value.message


def test_a_leg_rated_by_a_strategy_may_have_both_of_its_weights_at_0() -> None:
    params = PairingParams(
        prefix_weight=0.0, queue_weight=0.0, prefill_strategy="round_robin",
        kv_weight=0.0, batch_weight=0.0, decode_strategy="load_balanced",
    )  # fmt: skip
    assert (params.prefill_strategy, params.decode_strategy) == ("round_robin", "load_balanced")


def test_servable_view_stands_in_for_free_pairs_only() -> None:
    pd_only = make_snapshot(
        [
            make_instance_view("p0", role=Role.PREFILLING),
            make_instance_view("d0", role=Role.DECODING, est_tpot_s=0.01),
        ]
    )
    view = servable_view(pd_only, ["llama-3-8b"])
    stand_in = view.get(PAIR_VIEW_PREFIX + "llama-3-8b")
    assert stand_in is not None and stand_in.role.runs_whole_requests
    assert stand_in.est_tpot_s == 0.01
    assert view.can_serve(make_request_info())
    # A free whole-request instance, or a full decode side: nothing is added.
    mixed = make_snapshot([*pd_only.instances, make_instance_view("g0")])
    assert servable_view(mixed, ["llama-3-8b"]) is mixed
    full = with_view(pd_only, "d0", in_flight=100)
    assert servable_view(full, ["llama-3-8b"]) is full


def test_servable_views_stand_in_knows_what_the_pair_knows() -> None:
    # a decode TPOT learnt only in bigger batches (or still the prior) is no more known
    # on the stand-in than on the decode instance (it refuses nothing by it)
    pd_only = make_snapshot(
        [
            make_instance_view("p0", role=Role.PREFILLING, rate_measured=False),
            make_instance_view("d0", role=Role.DECODING, tpot_known=False, measured=False),
        ]
    )
    stand_in = servable_view(pd_only, ["llama-3-8b"]).get(PAIR_VIEW_PREFIX + "llama-3-8b")
    assert stand_in is not None
    assert (stand_in.tpot_known, stand_in.measured, stand_in.rate_measured) == (
        False, False, False,
    )  # fmt: skip


def test_can_serve_counts_free_pairs() -> None:
    snap = make_snapshot(
        [
            make_instance_view("p0", role=Role.PREFILLING),
            make_instance_view("d0", role=Role.DECODING),
        ]
    )
    req = make_request_info()
    assert snap.can_serve(req)
    assert not snap.runnable(req)
    assert not with_view(snap, "d0", in_flight=100).can_serve(req)
    assert not snap.can_serve(make_request_info(excluded_instances=frozenset({"p0"})))


def test_uses_pd() -> None:
    assert not uses_pd([Role.GENERAL, Role.GENERAL])
    assert uses_pd([Role.GENERAL, Role.HYBRID])
    assert uses_pd([Role.DECODING])


def test_pair_exists_and_unservable_reasons() -> None:
    p, d, g = ("p0", Role.PREFILLING), ("d0", Role.DECODING), ("g0", Role.GENERAL)
    assert pair_exists([p, d])
    assert not pair_exists([p, ("p1", Role.PREFILLING)])
    assert not pair_exists([("h0", Role.HYBRID)])  # one instance cannot pair with itself
    assert pair_exists([("h0", Role.HYBRID), g])
    assert not pair_exists([g, ("g1", Role.GENERAL)])  # not set up for PD
    model = "m"
    assert unservable_reason(model, [g], pd_enabled=False) is None
    assert unservable_reason(model, [p, d], pd_enabled=True) is None
    assert unservable_reason(model, [], pd_enabled=True) == "no instance serves model 'm'"
    off = unservable_reason(model, [p, d], pd_enabled=False)
    assert off is not None and "PD disaggregation is disabled" in off
    assert "no decode-capable" in str(unservable_reason(model, [p], pd_enabled=True))
    assert "no prefill-capable" in str(unservable_reason(model, [d], pd_enabled=True))


@pytest.mark.parametrize("top_k", [1, 4])
def test_top_k_plus_one_candidates_of_each_leg_are_paired(top_k: int) -> None:
    """One more than ``top_k`` of each side (so each keeps ``top_k`` partners when an
    instance that runs either leg ranks on both sides: it cannot pair with itself)."""
    snap = make_snapshot(
        [make_instance_view(f"p{i}", role=Role.PREFILLING) for i in range(6)]
        + [make_instance_view(f"d{i}", role=Role.DECODING) for i in range(6)]
    )
    plan = plan_of(PDOrchestrator(PairingParams(top_k=top_k), seed=0), snap)
    pairs = [key.split("->") for key in plan.scores]
    assert len({p for p, _ in pairs}) == len({d for _, d in pairs}) == top_k + 1
    assert len(pairs) == (top_k + 1) ** 2


def test_instances_on_different_machines_without_a_rack_are_a_network_apart() -> None:
    a = make_instance_view("p0", machine_id="host-a")
    b = make_instance_view("d0", machine_id="host-b")
    links = LinkModel()
    assert links.kind(a, b) == "network"
    rack = [replace(v, rack_id="r1") for v in (a, b)]
    assert links.kind(*rack) == "rack"
    assert links.bandwidth_gbps(a, b) < links.bandwidth_gbps(*rack)


def test_plan_within_keeps_both_legs_in_the_first_room_with_a_free_pair() -> None:
    """A LoRA adapter's request: both legs where the adapter has room (the first room
    holding a pair; None skipped), else anywhere."""
    snap = make_snapshot(
        [
            make_instance_view("p0", role=Role.PREFILLING),
            make_instance_view("d0", role=Role.DECODING),
            make_instance_view("p1", role=Role.PREFILLING),
            make_instance_view("d1", role=Role.DECODING),
        ]
    )
    orch = PDOrchestrator(seed=1)
    req = make_request_info()
    for rooms, pair in [
        ((frozenset({"p1", "d1"}),), ("p1", "d1")),
        ((None, frozenset({"p0", "d0"})), ("p0", "d0")),
        ((frozenset({"p0", "p1"}), frozenset({"p1", "d0"})), ("p1", "d0")),  # no pair in the first
    ]:
        plan = orch.plan_within(req, snap, rooms)
        assert plan is not None
        assert (plan.prefill_id, plan.decode_id) == pair, rooms
    anywhere = orch.plan_within(req, snap, (frozenset({"p0"}), None))
    assert anywhere is not None  # no room holds a pair: the whole snapshot
    assert orch.plan_within(req, snap, ()) is not None


def test_predicted_e2e_is_the_prefill_ttft_the_transfer_and_the_decode_steps() -> None:
    snap = make_snapshot(
        [
            make_instance_view("p0", role=Role.PREFILLING),
            make_instance_view("d0", role=Role.DECODING, est_tpot_s=0.02),
        ]
    )
    req = make_request_info(prompt_tokens=1000, max_tokens=11)
    plan = PDPlan("p0", "d0", "test", transfer_s=0.05)
    ttft = snap.instances[0].predict_ttft_s(1000) + 0.05 + 0.02
    assert predicted_e2e_s(snap, plan, req) == pytest.approx(ttft + 10 * 0.02)
    assert predicted_e2e_s(snap, replace(plan, decode_id="gone"), req) is None


def _gap_fleet() -> ClusterSnapshot:
    """Two HYBRID instances that may prefill: ``busy`` decodes (8 ms steps, 40k tokens/s
    beside them) with nothing queued, the best by the prefill router's queue score;
    ``queued`` decodes nothing but has 20k tokens of prompt queued. And a decode instance."""
    return make_snapshot(
        [
            make_instance_view("busy", role=Role.HYBRID, in_flight=4, est_tpot_s=0.008,
                               est_prefill_tps=40_000.0, outstanding_decode_tokens=800),
            make_instance_view("queued", role=Role.HYBRID, in_flight=4,
                               est_prefill_tps=40_000.0, queued_prefill_tokens=20_000),
            make_instance_view("d0", role=Role.DECODING),
        ]
    )  # fmt: skip


def test_prefill_gap_is_the_stall_of_the_prompt_joining_the_queue_beside_decodes() -> None:
    busy = make_instance_view("v", est_tpot_s=0.008, est_prefill_tps=40_000.0,
                              queued_prefill_tokens=500, outstanding_decode_tokens=100)  # fmt: skip
    assert prefill_gap_s(busy, 1500) == pytest.approx(math.hypot(0.008, 2000 / 40_000))
    assert prefill_gap_s(busy, 20_000, 4096) == pytest.approx(math.hypot(0.008, 4096 / 40_000))
    assert prefill_gap_s(replace(busy, outstanding_decode_tokens=0), 20_000) == 0.0


def test_with_a_gap_target_prefill_legs_stay_off_decodes_they_would_stall() -> None:
    snap = _gap_fleet()
    # Without a target, at phase isolation weight 1, the instance with no prefill queue
    # wins, and its decodes stall for hypot(8 ms, 2000 / 40k) = 50 ms.
    light = PairingParams(isolation_weight=1.0)
    for seed in range(3):
        plan = plan_of(PDOrchestrator(light, seed=seed), snap, prompt_tokens=2000)
        assert (plan.prefill_id, plan.decode_id) == ("busy", "d0")
    # With a 25 ms target, the prompt waits behind the queue where no decode runs.
    gap = replace(light, itl_slo_s=0.025)
    for seed in range(3):
        plan = plan_of(PDOrchestrator(gap, seed=seed), snap, prompt_tokens=2000)
        assert (plan.prefill_id, plan.decode_id) == ("queued", "d0")
        assert "busy->d0" not in plan.scores
    # A short prompt stalls them 8.9 ms: within the target, the best pair again.
    assert plan_of(PDOrchestrator(gap, seed=0), snap, prompt_tokens=160).prefill_id == "busy"
    # A chunk is at most max_batched_tokens: 512 tokens stall them 15 ms.
    small = PDOrchestrator(replace(gap, max_batched_tokens=512), seed=0)
    assert plan_of(small, snap, prompt_tokens=2000).prefill_id == "busy"


def test_with_a_gap_target_a_stalling_prefill_leg_is_taken_when_nothing_else_is_free() -> None:
    snap = with_view(_gap_fleet(), "queued", healthy=False)
    plan = plan_of(PDOrchestrator(PairingParams(itl_slo_s=0.025), seed=0), snap, prompt_tokens=2000)
    assert (plan.prefill_id, plan.decode_id) == ("busy", "d0")


def test_build_pd_gives_the_pairing_the_adaptive_deciders_gap_target() -> None:
    def pairing(routing_policy: str, **meta: object) -> PairingParams:
        cfg = PDSeparationConfig(routing_policy=routing_policy, metadata=meta)
        return build_pd(cfg).orchestrator.params

    params = pairing("adaptive", decider_params={"itl_slo_s": 0.03, "max_batched_tokens": 2048})
    assert (params.itl_slo_s, params.max_batched_tokens) == (0.03, 2048)
    # the adaptive decider predicts colocated runs where whole requests go
    built = build_pd(PDSeparationConfig(routing_policy="adaptive"))
    assert isinstance(built.decider, AdaptiveDecider)
    assert built.decider.held_for_prefill == built.orchestrator.reserved
    assert pairing("adaptive", decider_params={"tpot_slo_s": 0.03}).itl_slo_s is None
    assert pairing("threshold").itl_slo_s is None
    # the pairing's own target wins, with its own chunk size
    own = pairing(
        "adaptive",
        decider_params={"itl_slo_s": 0.03, "max_batched_tokens": 2048},
        pairing_params={"itl_slo_s": 0.05},
    )
    assert (own.itl_slo_s, own.max_batched_tokens) == (0.05, 8192)
    with pytest.raises(ConfigError) as err:
        pairing("adaptive", decider_params={"itl_slo_s": 0.03}, pairing_params={"itl_slo_s": -1})
    assert err.value.key == "metadata.pairing_params.itl_slo_s"


def _decoding_hybrids(*work: int, now: float = 0.0) -> ClusterSnapshot:
    """HYBRID instances h0, h1, ... all running decodes (``work`` decode tokens left each;
    8 ms steps, 40k prompt tokens/s beside them)."""
    return make_snapshot(
        [
            make_instance_view(f"h{i}", role=Role.HYBRID, in_flight=2, est_tpot_s=0.008,
                               est_prefill_tps=40_000.0, outstanding_decode_tokens=w)
            for i, w in enumerate(work)
        ],
        now=now,
    )  # fmt: skip


RESERVE = PairingParams(itl_slo_s=0.025)


def test_a_stalling_prompt_with_nowhere_to_prefill_holds_an_instance_for_prefill() -> None:
    orch = PDOrchestrator(RESERVE, seed=0)
    snap = _decoding_hybrids(900, 300, 600, 800)
    orch.observe(make_request_info(prompt_tokens=160), snap)  # stalls them 8.9 ms: no hold
    assert orch.reserved("llama-3-8b") == frozenset()
    orch.observe(make_request_info(prompt_tokens=2000), snap)  # 50 ms: the least work left
    assert orch.reserved("llama-3-8b") == {"h1"}
    orch.observe(make_request_info(prompt_tokens=2000), snap)  # h1 still decodes: another
    assert orch.reserved("llama-3-8b") == {"h1", "h2"}
    orch.observe(make_request_info(prompt_tokens=2000), snap)  # prefill_reserve = 2
    assert orch.reserved("llama-3-8b") == {"h1", "h2"}
    assert orch.holds_started == 2
    assert orch.describe()["held_for_prefill"] == {"llama-3-8b": ["h1", "h2"]}
    assert orch.describe()["prefill_reserve_holds"] == 2
    # whole requests and decode legs keep off them while others are free
    req = make_request_info()
    assert orch.whole_allowed(req, snap, None) == frozenset({"h0", "h3"})
    assert orch.whole_allowed(req, snap, frozenset({"h0", "h1"})) == frozenset({"h0"})
    assert orch.whole_allowed(make_request_info(model="other"), snap, None) is None
    for seed in range(3):
        plan = plan_of(orch, with_view(snap, "h1", outstanding_decode_tokens=0), prompt_tokens=2000)
        assert plan.prefill_id == "h1" and plan.decode_id in ("h0", "h3"), seed


def test_a_prefill_reserve_is_renewed_by_stalling_prompts_and_ends_after_its_hold() -> None:
    orch = PDOrchestrator(replace(RESERVE, prefill_reserve=1), seed=0)
    long = make_request_info(prompt_tokens=2000)
    orch.observe(long, _decoding_hybrids(900, 300, now=10.0))
    # drained, h1 takes such prompts: no second hold, and each renews the first
    drained = with_view(_decoding_hybrids(900, 300, now=14.0), "h1", outstanding_decode_tokens=0)
    orch.observe(long, drained)
    assert orch.reserved("llama-3-8b") == {"h1"}
    orch.observe(make_request_info(prompt_tokens=160), replace(drained, now=18.5))
    assert orch.reserved("llama-3-8b") == {"h1"}  # held 4.5 s after the last renewal
    orch.observe(make_request_info(prompt_tokens=160), replace(drained, now=19.5))
    assert orch.reserved("llama-3-8b") == frozenset()
    assert orch.whole_allowed(long, drained, None) is None


def test_no_prefill_reserve_without_a_gap_target_or_where_a_prefill_fits() -> None:
    snap = _decoding_hybrids(900, 300, 600)
    long = make_request_info(prompt_tokens=2000)
    for orch in (
        PDOrchestrator(seed=0),  # no target
        PDOrchestrator(replace(RESERVE, prefill_reserve=0), seed=0),
    ):
        orch.observe(long, snap)
        assert orch.reserved("llama-3-8b") == frozenset()
    # a dedicated prefill instance (no decodes there) takes such prompts
    with_prefill = make_snapshot([*snap, make_instance_view("p0", role=Role.PREFILLING)])
    orch = PDOrchestrator(RESERVE, seed=0)
    orch.observe(long, with_prefill)
    assert orch.reserved("llama-3-8b") == frozenset()
    # never the model's last whole-request instance
    orch.observe(long, _decoding_hybrids(900, 300))
    orch.observe(long, _decoding_hybrids(900, 300))
    assert orch.reserved("llama-3-8b") == {"h1"}


def test_no_prefill_reserve_while_its_prompts_need_more_than_it_may_hold() -> None:
    """Two instances (one may be held) at 40k prompt tokens/s, planned at 70%: 28k tokens
    of stalling prompts a second fit one held instance; 40k do not, and the hold ends."""
    orch = PDOrchestrator(RESERVE, seed=0)
    snap = _decoding_hybrids(900, 300)
    prompt = make_request_info(prompt_tokens=8000)
    orch.observe(prompt, snap)
    assert orch.reserved("llama-3-8b") == {"h1"}
    for _ in range(3):  # 16k, 24k, then 32k tokens within a second: over 28k
        orch.observe(prompt, snap)
    assert orch.reserved("llama-3-8b") == frozenset()
    assert orch.holds_started == 1
    # past reserve_hold_s (5 s) only the new prompts count: 8k, held again
    later = replace(snap, now=6.0)
    orch.observe(prompt, later)
    assert orch.reserved("llama-3-8b") == {"h1"}
    assert orch.holds_started == 2
