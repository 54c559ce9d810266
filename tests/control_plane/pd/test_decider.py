"""PD deciders: each mode on explicit snapshots, the registry and parameter checks."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest

from sage_llm.control_plane.pd.decider import (
    DECIDER_NAMES,
    AdaptiveDecider,
    AdaptiveParams,
    PathPrediction,
    PrefixAwareDecider,
    PrefixAwareParams,
    ThresholdDecider,
    ThresholdParams,
    build_decider,
)
from sage_llm.control_plane.routing.prefix_index import PrefixIndex
from sage_llm.control_plane.snapshot import ClusterSnapshot
from sage_llm.errors import ConfigError
from sage_llm.types import ExecutionInstanceType as Role
from tests.factories import make_instance_view, make_request_info, make_snapshot, with_view


def mixed_fleet(**general: object) -> ClusterSnapshot:
    """One GENERAL instance (colocated path) and a PREFILLING/DECODING pair."""
    return make_snapshot(
        [
            make_instance_view("g0", **general),  # type: ignore[arg-type]
            make_instance_view("p0", role=Role.PREFILLING),
            make_instance_view("d0", role=Role.DECODING),
        ]
    )


def test_always_and_never() -> None:
    req, snap = make_request_info(), mixed_fleet()
    assert build_decider("always").decide(req, snap).disaggregate is True
    assert build_decider("never").decide(req, snap).disaggregate is False


@pytest.mark.parametrize(
    ("prompt", "max_tokens", "expected"),
    [(799, 10, False), (800, 10, True), (4000, 2000, False), (4000, 1000, True)],
)
def test_threshold_on_prompt_length_and_ratio(prompt: int, max_tokens: int, expected: bool) -> None:
    decider = ThresholdDecider(ThresholdParams(min_prompt_tokens=800, min_ratio=4.0))
    req = make_request_info(prompt_tokens=prompt, max_tokens=max_tokens)
    decision = decider.decide(req, mixed_fleet())
    assert decision.disaggregate is expected
    assert decision.reason


def test_threshold_without_ratio_looks_at_length_only() -> None:
    decider = ThresholdDecider(ThresholdParams(min_prompt_tokens=100))
    req = make_request_info(prompt_tokens=100, max_tokens=5000)
    assert decider.decide(req, mixed_fleet()).disaggregate is True


def _prefix_snapshot(cached_blocks: int, *, total_blocks: int = 64) -> tuple[ClusterSnapshot, int]:
    hashes = tuple(range(1, total_blocks + 1))
    index = PrefixIndex()
    index.insert("g0", hashes[:cached_blocks])
    snap = make_snapshot(
        [
            make_instance_view("g0"),
            make_instance_view("p0", role=Role.PREFILLING),
            make_instance_view("d0", role=Role.DECODING),
        ],
        prefix=index,
    )
    return snap, total_blocks * 16


def test_prefix_aware_skips_prefill_when_the_local_instance_caches_most_of_the_prompt() -> None:
    decider = PrefixAwareDecider(PrefixAwareParams(min_uncached_tokens=256, block_size=16))
    snap, tokens = _prefix_snapshot(cached_blocks=60)
    req = make_request_info(prompt_tokens=tokens, block_hashes=tuple(range(1, 65)))
    decision = decider.decide(req, snap)
    assert decision.disaggregate is False
    assert "g0 caches 960" in decision.reason


def test_prefix_aware_disaggregates_a_mostly_uncached_prompt() -> None:
    decider = PrefixAwareDecider(PrefixAwareParams(min_uncached_tokens=256, block_size=16))
    snap, tokens = _prefix_snapshot(cached_blocks=8)
    req = make_request_info(prompt_tokens=tokens, block_hashes=tuple(range(1, 65)))
    assert decider.decide(req, snap).disaggregate is True


def test_prefix_aware_disaggregates_when_no_colocated_instance_is_free() -> None:
    decider = PrefixAwareDecider()
    snap, tokens = _prefix_snapshot(cached_blocks=64)
    full = make_snapshot(
        [
            make_instance_view("g0", in_flight=100),
            make_instance_view("p0", role=Role.PREFILLING),
            make_instance_view("d0", role=Role.DECODING),
        ],
        prefix=snap.prefix,
    )
    req = make_request_info(prompt_tokens=tokens, block_hashes=tuple(range(1, 65)))
    assert decider.decide(req, full).disaggregate is True


def test_adaptive_disaggregates_when_chunked_prefill_hurts_colocated_tpot() -> None:
    # The colocated instance has a long prefill backlog: its decodes would stall behind it.
    snap = mixed_fleet(queued_prefill_tokens=40_000)
    decider = AdaptiveDecider(AdaptiveParams(tpot_slo_s=0.05, ttft_slo_s=10.0))
    req = make_request_info(prompt_tokens=2000, max_tokens=200)
    decision = decider.decide(req, snap)
    assert decision.disaggregate is True
    assert "disaggregated predicted better" in decision.reason


def test_adaptive_stays_colocated_on_an_idle_fleet_with_a_slow_link() -> None:
    # Idle everywhere, and the pair sits on a slow network: the transfer is pure overhead.
    snap = make_snapshot(
        [
            make_instance_view("g0"),
            make_instance_view("p0", role=Role.PREFILLING, network_bandwidth_gbps=1.0),
            make_instance_view("d0", role=Role.DECODING, network_bandwidth_gbps=1.0),
        ]
    )
    decision = AdaptiveDecider().decide(make_request_info(prompt_tokens=4000), snap)
    assert decision.disaggregate is False
    assert "colocated predicted as good" in decision.reason


def test_adaptive_predictions_include_the_kv_transfer() -> None:
    decider = AdaptiveDecider(AdaptiveParams(cross_rack_factor=1.0))
    snap = make_snapshot(
        [
            make_instance_view("g0"),
            make_instance_view("p0", role=Role.PREFILLING, network_bandwidth_gbps=2.0),
            make_instance_view("d0", role=Role.DECODING, network_bandwidth_gbps=2.0),
        ]
    )
    req = make_request_info(prompt_tokens=1000, max_tokens=10)
    pred = decider.disaggregated(req, snap)
    assert pred is not None
    p0 = snap.get("p0")
    assert p0 is not None
    transfer = 1000 * 131072 / 2e9
    assert pred.ttft_s == pytest.approx(p0.predict_ttft_s(1000) + transfer + 0.02)


def test_adaptive_hysteresis_keeps_near_ties_colocated() -> None:
    # Colocated slightly worse than disaggregated (within 10 %): stay colocated.
    snap = make_snapshot(
        [
            make_instance_view("g0", est_tpot_s=0.0205),
            make_instance_view("p0", role=Role.PREFILLING, nvlink_domain="n"),
            make_instance_view("d0", role=Role.DECODING, nvlink_domain="n"),
        ]
    )
    req = make_request_info(prompt_tokens=100, max_tokens=500)
    assert AdaptiveDecider(AdaptiveParams(hysteresis=0.1)).decide(req, snap).disaggregate is False
    assert AdaptiveDecider(AdaptiveParams(hysteresis=0.0)).decide(req, snap).disaggregate is True


def test_adaptive_respects_the_transfer_limit() -> None:
    snap = mixed_fleet(queued_prefill_tokens=40_000)
    decider = AdaptiveDecider(AdaptiveParams(max_transfer_s=0.001))
    decision = decider.decide(make_request_info(prompt_tokens=2000, max_tokens=200), snap)
    assert decision.disaggregate is False
    assert "transfer limit" in decision.reason


def test_adaptive_uses_the_request_deadline() -> None:
    decider = AdaptiveDecider()
    snap = mixed_fleet(queued_prefill_tokens=40_000)
    req = make_request_info(prompt_tokens=2000, max_tokens=200, slo_s=20.0)
    colo = decider.colocated(req, snap)
    assert colo is not None
    assert colo.badness == pytest.approx(colo.e2e_s / 20.0)


def test_registry_names_and_errors() -> None:
    assert DECIDER_NAMES == ("always", "never", "threshold", "prefix_aware", "adaptive")
    assert build_decider("Prefix-Aware").name == "prefix_aware"
    with pytest.raises(ConfigError, match="unknown PD decider 'sometimes'"):
        build_decider("sometimes")
    with pytest.raises(ConfigError, match="unknown parameter"):
        build_decider("threshold", {"min_tokens": 5})
    with pytest.raises(ConfigError, match="must be an integer"):
        build_decider("threshold", {"min_prompt_tokens": 1.5})
    with pytest.raises(ConfigError, match="hysteresis"):
        build_decider("adaptive", {"hysteresis": 1.5})
    with pytest.raises(ConfigError, match="slack"):
        build_decider("adaptive", {"slack": 1.0})
    with pytest.raises(ConfigError, match="max_batched_tokens"):
        build_decider("adaptive", {"max_batched_tokens": 0})
    with pytest.raises(ConfigError, match="itl_slo_s"):
        build_decider("adaptive", {"itl_slo_s": -1.0})
    decider = build_decider("adaptive", {"ttft_slo_s": 2, "max_transfer_s": None})
    assert isinstance(decider, AdaptiveDecider)
    assert decider.params.ttft_slo_s == 2.0
    assert decider.describe()["name"] == "adaptive"


@pytest.mark.parametrize(
    ("name", "params", "key"),
    [
        ("threshold", {"min_ratio": -0.5}, "min_ratio"),
        ("threshold", {"min_ratio": math.inf}, "min_ratio"),
        ("prefix_aware", {"min_uncached_tokens": -1}, "min_uncached_tokens"),
        ("prefix_aware", {"block_size": 0}, "block_size"),
        ("adaptive", {"prefill_interference": -0.1}, "prefill_interference"),
        ("adaptive", {"prefill_interference": math.nan}, "prefill_interference"),
        ("adaptive", {"top_k": 0}, "top_k"),
    ],
)
def test_a_deciders_parameter_out_of_range_is_refused_naming_it(
    name: str, params: dict[str, float], key: str
) -> None:
    with pytest.raises(ConfigError) as err:
        build_decider(name, params)
    assert err.value.key == key


@pytest.mark.parametrize("name", DECIDER_NAMES)
def test_each_decider_describes_itself_with_its_parameters(name: str) -> None:
    described = build_decider(name).describe()
    assert described["name"] == name
    params = described["params"]
    assert isinstance(params, dict)
    if name in ("always", "never"):
        assert params == {}
    else:
        assert params and all(isinstance(k, str) for k in params)


def gap_fleet(**general: Any) -> ClusterSnapshot:
    """One GENERAL instance running decodes (8 ms steps, 40k prefill tokens/s) and an idle
    PREFILLING/DECODING pair on NVLink."""
    return make_snapshot(
        [
            make_instance_view(
                "g0", **{"est_tpot_s": 0.008, "est_prefill_tps": 40_000.0, "in_flight": 4,
                         "outstanding_decode_tokens": 800, **general},
            ),
            make_instance_view(
                "p0", role=Role.PREFILLING, est_tpot_s=0.008, est_prefill_tps=40_000.0,
                nvlink_domain="n",
            ),
            make_instance_view("d0", role=Role.DECODING, est_tpot_s=0.008, nvlink_domain="n"),
        ]
    )  # fmt: skip


GAP_TARGETS = AdaptiveParams(ttft_slo_s=2.0, tpot_slo_s=0.025, itl_slo_s=0.025)


def test_adaptive_predicts_the_stall_a_long_prefill_causes_on_running_decodes() -> None:
    decider = AdaptiveDecider(GAP_TARGETS)
    snap = gap_fleet()
    g0 = snap.get("g0")
    assert g0 is not None
    # the smoothed maximum of a decode step and the chunk's compute time, the chunk capped
    # at max_batched_tokens; without a chunk rate of its own, at the prefill rate
    assert decider.stall_s(g0, 4000) == pytest.approx(math.hypot(0.008, 4000 / 40_000))
    assert decider.stall_s(g0, 20_000) == pytest.approx(math.hypot(0.008, 8192 / 40_000))
    assert decider.stall_s(g0, 0) == pytest.approx(0.008)
    long_req = make_request_info(prompt_tokens=4000, max_tokens=300)
    colo = decider.colocated(long_req, snap)
    assert colo is not None and colo.gap_s == pytest.approx(math.hypot(0.008, 0.1))
    decision = decider.decide(long_req, snap)
    assert decision.disaggregate is True
    assert "gap=100ms" in decision.reason


def test_adaptive_stall_reads_the_rate_beside_decodes_not_the_ttft_rate() -> None:
    """Chat TTFTs read a prefill rate twice the compute-bound one (most prompts' steps are
    memory-bound); the gap is predicted at the rate a chunk runs beside decodes."""
    decider = AdaptiveDecider(GAP_TARGETS)
    snap = gap_fleet(est_prefill_tps=90_000.0, est_chunk_tps=40_000.0)
    g0 = snap.get("g0")
    assert g0 is not None
    assert decider.stall_s(g0, 1500) == pytest.approx(math.hypot(0.008, 1500 / 40_000))
    req = make_request_info(prompt_tokens=1500, max_tokens=200)
    colo = decider.colocated(req, snap)
    assert colo is not None and colo.gap_s > 0.025  # at 90k tokens/s it would be 0.018
    assert decider.decide(req, snap).disaggregate is True


def test_adaptive_keeps_short_prompts_colocated_when_every_target_holds_with_slack() -> None:
    decider = AdaptiveDecider(GAP_TARGETS)
    short = make_request_info(prompt_tokens=200, max_tokens=200)
    decision = decider.decide(short, gap_fleet())
    assert decision.disaggregate is False
    assert "with slack" in decision.reason
    # without slack the pair's smaller gap (8 ms against 13 ms) wins
    no_slack = AdaptiveDecider(dataclasses.replace(GAP_TARGETS, slack=0.0))
    assert no_slack.decide(short, gap_fleet()).disaggregate is True


def test_adaptive_sends_a_stalling_prompt_to_a_pair_with_slack() -> None:
    # An idle GENERAL instance: a long prompt stalls nobody there now, but it would leave
    # the instance decoding and unfit to prefill the next long prompt. With a pair that
    # meets every target with slack, it goes to the pair.
    decider = AdaptiveDecider(GAP_TARGETS)
    idle = gap_fleet(in_flight=0, outstanding_decode_tokens=0)
    long_req = make_request_info(prompt_tokens=6000, max_tokens=300)
    colo = decider.colocated(long_req, idle)
    assert colo is not None and colo.gap_s == pytest.approx(0.008)
    decision = decider.decide(long_req, idle)
    assert decision.disaggregate is True
    assert "stalls decodes" in decision.reason
    # a short prompt stalls nothing: it stays on the idle instance
    short = make_request_info(prompt_tokens=100, max_tokens=300)
    assert decider.decide(short, idle).disaggregate is False
    # when no pair has slack (a deep prefill queue, a slow decode instance), it stays local
    no_slack = with_view(
        with_view(idle, "d0", est_tpot_s=0.03), "p0", queued_prefill_tokens=100_000
    )
    assert decider.decide(long_req, no_slack).disaggregate is False


def test_adaptive_pairs_avoid_legs_that_would_break_the_gap_target() -> None:
    # Prefill candidates: a GENERAL instance with decodes running and faster prefill, and a
    # dedicated one. The pair prefills on the dedicated one: the other would stall decodes.
    decider = AdaptiveDecider(GAP_TARGETS)
    snap = make_snapshot(
        [
            make_instance_view(
                "g-busy", est_prefill_tps=80_000.0, in_flight=2, outstanding_decode_tokens=500,
                nvlink_domain="n",
            ),
            make_instance_view("p0", role=Role.PREFILLING, nvlink_domain="n"),
            make_instance_view("d0", role=Role.DECODING, nvlink_domain="n"),
        ]
    )  # fmt: skip
    pred = decider.disaggregated(make_request_info(prompt_tokens=5000, max_tokens=300), snap)
    assert pred is not None
    assert pred.where.startswith("p0->")
    assert decider.params.itl_slo_s is not None
    assert pred.gap_s <= decider.params.itl_slo_s


def test_prefix_aware_disaggregates_exactly_min_uncached_tokens() -> None:
    decider = PrefixAwareDecider(PrefixAwareParams(min_uncached_tokens=512))
    snap = make_snapshot([make_instance_view("g0")])
    assert decider.decide(make_request_info(prompt_tokens=512), snap).disaggregate is True
    assert decider.decide(make_request_info(prompt_tokens=511), snap).disaggregate is False


def test_adaptive_retry_plans_no_pair_through_an_excluded_instance() -> None:
    # p0 prefills fastest, but it failed this request: the retry's pair uses p1
    snap = make_snapshot(
        [
            make_instance_view("p0", role=Role.PREFILLING, est_prefill_tps=20_000.0),
            make_instance_view("p1", role=Role.PREFILLING),
            make_instance_view("d0", role=Role.DECODING),
        ]
    )
    decider = AdaptiveDecider()
    fresh = decider.disaggregated(make_request_info(prompt_tokens=1000), snap)
    assert fresh is not None and fresh.where == "p0->d0"
    retry = make_request_info(prompt_tokens=1000, excluded_instances=frozenset({"p0"}))
    pred = decider.disaggregated(retry, snap)
    assert pred is not None and pred.where == "p1->d0"


def test_adaptive_transfer_just_above_the_limit_stays_colocated() -> None:
    # a slow colocated instance: without the limit the pair wins
    snap = make_snapshot(
        [
            make_instance_view("g0", est_ttft_base_s=2.0),
            make_instance_view("p0", role=Role.PREFILLING),
            make_instance_view("d0", role=Role.DECODING),
        ]
    )
    req = make_request_info(prompt_tokens=600, max_tokens=50)
    p0, d0 = snap.get("p0"), snap.get("d0")
    assert p0 is not None and d0 is not None
    transfer = AdaptiveParams().link_model().transfer_s(600, p0, d0)
    at_limit = AdaptiveDecider(AdaptiveParams(max_transfer_s=transfer))
    assert at_limit.decide(req, snap).disaggregate is True
    above = AdaptiveDecider(AdaptiveParams(max_transfer_s=transfer / 1.2))
    decision = above.decide(req, snap)
    assert decision.disaggregate is False
    assert "transfer limit" in decision.reason


def test_adaptive_without_targets_compares_the_paths_with_no_slack_rule() -> None:
    # no SLO target and no deadline: badness is the predicted end-to-end time in seconds,
    # which a slack fraction does not bound; the faster pair wins
    snap = make_snapshot(
        [
            make_instance_view("g0", est_ttft_base_s=0.5),
            make_instance_view("p0", role=Role.PREFILLING, est_ttft_base_s=0.01, nvlink_domain="x"),
            make_instance_view("d0", role=Role.DECODING, nvlink_domain="x"),
        ]
    )
    req = make_request_info(prompt_tokens=100, max_tokens=5)
    decider = AdaptiveDecider()
    colo = decider.colocated(req, snap)
    assert colo is not None and colo.badness <= decider.params.slack
    decision = decider.decide(req, snap)
    assert decision.disaggregate is True
    assert "disaggregated predicted better" in decision.reason


def test_adaptive_tpot_target_does_not_count_for_a_single_output_token() -> None:
    # max_tokens=1: no inter-token time at all, however slow the decode step
    decider = AdaptiveDecider(AdaptiveParams(ttft_slo_s=1.0, tpot_slo_s=0.05))
    snap = make_snapshot([make_instance_view("g0", est_tpot_s=1.0)])
    colo = decider.colocated(make_request_info(prompt_tokens=100, max_tokens=1), snap)
    assert colo is not None
    assert colo.badness == pytest.approx(colo.ttft_s / 1.0)
    assert colo.badness < 1.0


@pytest.mark.parametrize("top_k", [1, 4])
def test_adaptive_predicts_pairs_of_top_k_plus_one_candidates_of_each_leg(top_k: int) -> None:
    """One more than ``top_k`` of each side, as the orchestrator pairs."""
    pairs: list[str] = []

    class Recording(AdaptiveDecider):
        def _predict(self, *args: Any, **kwargs: Any) -> PathPrediction:
            pred = super()._predict(*args, **kwargs)
            pairs.append(pred.where)
            return pred

    snap = make_snapshot(
        [make_instance_view(f"p{i}", role=Role.PREFILLING) for i in range(6)]
        + [make_instance_view(f"d{i}", role=Role.DECODING) for i in range(6)]
    )
    assert Recording(AdaptiveParams(top_k=top_k)).disaggregated(make_request_info(), snap)
    legs = [where.split("->") for where in pairs]
    assert len({p for p, _ in legs}) == len({d for _, d in legs}) == top_k + 1
    assert len(legs) == (top_k + 1) ** 2


def _decide_on(
    colocated: float, disaggregated: float, *, stalling: bool = False, **params: Any
) -> bool:
    """The adaptive decider's choice between two paths of the given badness."""
    decider = AdaptiveDecider(AdaptiveParams(**params))
    decider.colocated = lambda req, snap: PathPrediction(0.1, 0.01, 0.2, colocated, "g0")  # type: ignore[method-assign]
    decider.disaggregated = lambda req, snap: PathPrediction(  # type: ignore[method-assign]
        0.1, 0.01, 0.2, disaggregated, "p0->d0"
    )
    decider._stalling_prompt = lambda req, snap, colo: stalling  # type: ignore[method-assign]
    return decider.decide(make_request_info(), make_snapshot([])).disaggregate


def test_adaptive_disaggregates_only_when_better_by_more_than_the_hysteresis() -> None:
    assert _decide_on(1.0, 0.75, hysteresis=0.25, slack=0.0) is False  # exactly 25 % better
    assert _decide_on(1.0, 0.74, hysteresis=0.25, slack=0.0) is True


def test_adaptive_keeps_colocated_a_request_whose_badness_is_at_most_the_slack() -> None:
    assert _decide_on(0.75, 0.1, slack=0.75, ttft_slo_s=1.0) is False  # at the slack
    assert _decide_on(0.76, 0.1, slack=0.75, ttft_slo_s=1.0) is True


def test_adaptive_sends_a_stalling_prompt_to_a_pair_whose_badness_is_at_most_the_slack() -> None:
    near: dict[str, Any] = {"slack": 0.75, "hysteresis": 0.5, "itl_slo_s": 0.05}
    assert _decide_on(1.0, 0.75, stalling=True, **near) is True  # at it (not 50 % better)
    assert _decide_on(1.0, 0.76, stalling=True, **near) is False


def test_adaptive_disaggregates_when_no_whole_request_instance_is_free() -> None:
    snap = with_view(mixed_fleet(), "g0", in_flight=100)  # full
    decision = AdaptiveDecider().decide(make_request_info(prompt_tokens=100), snap)
    assert (decision.disaggregate, decision.reason) == (True, "no colocated instance is free")


def test_adaptive_predicts_colocated_where_whole_requests_go_not_on_held_instances() -> None:
    """An idle g-idle held for prefill legs is left out of the colocated prediction (whole
    requests keep off it) while another whole-request instance is free."""
    snap = make_snapshot(
        [
            make_instance_view("g-idle"),
            make_instance_view("g-busy", in_flight=8, queued_prefill_tokens=40_000),
        ]
    )
    req = make_request_info(prompt_tokens=100)
    held: dict[str, frozenset[str]] = {"llama-3-8b": frozenset({"g-idle"})}
    decider = AdaptiveDecider(held_for_prefill=lambda m: held.get(m, frozenset()))
    colo = decider.colocated(req, snap)
    assert colo is not None and colo.where == "g-busy"
    assert AdaptiveDecider().colocated(req, snap).where == "g-idle"  # type: ignore[union-attr]
    # with no other free, the held one is still predicted (the request would go there)
    lone = with_view(snap, "g-busy", healthy=False)
    assert decider.colocated(req, lone).where == "g-idle"  # type: ignore[union-attr]


def test_adaptive_predicts_the_decode_leg_off_held_instances_as_the_orchestrator_pairs() -> None:
    """A decode leg is predicted where the orchestrator puts it: not on an idle instance
    held for prefill legs while another decode instance is free."""
    snap = make_snapshot(
        [
            make_instance_view("p0", role=Role.PREFILLING),
            make_instance_view("h-idle", role=Role.HYBRID),
            make_instance_view("h-busy", role=Role.HYBRID, in_flight=6, est_tpot_s=0.05),
        ]
    )
    req = make_request_info(prompt_tokens=2_000, max_tokens=64)
    held: dict[str, frozenset[str]] = {"llama-3-8b": frozenset({"h-idle"})}
    decider = AdaptiveDecider(held_for_prefill=lambda m: held.get(m, frozenset()))
    pred = decider.disaggregated(req, snap)
    assert pred is not None and pred.where.endswith("->h-busy")
    free = AdaptiveDecider().disaggregated(req, snap)
    assert free is not None and free.where.endswith("->h-idle")
    # with no other decode instance free, the held one is still predicted
    lone = with_view(snap, "h-busy", healthy=False)
    alone = decider.disaggregated(req, lone)
    assert alone is not None and alone.where.endswith("->h-idle")
