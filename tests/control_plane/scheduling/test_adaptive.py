"""Adaptive: switches under the documented conditions, with hysteresis, losing nothing."""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, Literal

import pytest

from sage_llm import ControlPlaneManager
from sage_llm.control_plane.scheduling.adaptive import AdaptivePolicy
from sage_llm.control_plane.scheduling.base import SchedulingPolicy
from sage_llm.control_plane.scheduling.fair import FairSharePolicy
from sage_llm.control_plane.snapshot import (
    PAIR_VIEW_PREFIX,
    ClusterSnapshot,
    RequestInfo,
)
from sage_llm.errors import ConfigError
from sage_llm.sim.clock import run_virtual
from sage_llm.types import ExecutionInstanceType, RequestPriority
from tests.factories import (
    MODEL,
    make_completion_record,
    make_instance,
    make_instance_view,
    make_metadata,
    make_request_info,
    make_snapshot,
)

SMALL_WINDOW = AdaptivePolicy.Params(
    window=20, min_samples=20, min_dwell_s=10.0, light_load=0.5, overload=1.0
)
"""A 20-completion window, with load bands wide enough that the few requests these tests
queue on a 20-slot fleet never count as queueing: the switches come from attainment."""


def full_fleet(now: float) -> ClusterSnapshot:
    """Two busy instances, 20 slots in all, none free: pop evaluates the rule but returns
    nothing, and every queued request counts as waiting."""
    views = [make_instance_view(f"i{n}", max_concurrency=10, in_flight=10) for n in range(2)]
    return make_snapshot(views, now=now)


def set_attainment(policy: AdaptivePolicy, met: int, of: int = 20) -> None:
    """Replace the (20-long) completion window with ``met`` successes out of ``of``."""
    for n in range(of):
        policy.on_complete(make_completion_record(f"done{n}", slo_met=n < met))


def tick(policy: AdaptivePolicy, start: float, end: float) -> None:
    """One pop per second on a full fleet, from ``start`` to ``end`` inclusive."""
    t = start
    while t <= end + 1e-9:
        assert policy.pop(full_fleet(t)) is None
        t += 1.0


def push_deadline_requests(policy: AdaptivePolicy, n: int, prefix: str = "d") -> set[str]:
    ids = set()
    for k in range(n):
        policy.push(make_request_info(f"{prefix}{k}", arrival=k * 0.01, slo_s=30.0))
        ids.add(f"{prefix}{k}")
    return ids


def test_adaptive_is_a_scheduling_policy_starting_with_fifo() -> None:
    policy = AdaptivePolicy()
    assert isinstance(policy, SchedulingPolicy)
    # the documented defaults: a queue of a tenth of the fleet's slots is "queueing"
    p = policy.params
    assert (p.overload, p.light_load, p.min_dwell_s) == (0.1, 0.05, 2.0)
    info = policy.describe()
    assert info["name"] == "adaptive"
    assert info["current"] == "fifo"
    assert info["switches"] == 0
    assert info["since"] is None
    assert isinstance(info["reason"], str)


def test_falling_attainment_with_deadlines_switches_to_slo_aware_after_dwell() -> None:
    policy = AdaptivePolicy(SMALL_WINDOW)
    queued = push_deadline_requests(policy, 5)
    set_attainment(policy, met=10)  # 50 %
    tick(policy, 0.0, 9.0)
    assert policy.current == "fifo"  # condition held only 9 s so far
    tick(policy, 10.0, 10.0)
    info = policy.describe()
    assert info["current"] == "slo_aware"
    assert info["switches"] == 1
    assert info["since"] == 10.0
    reason = str(info["reason"])
    assert "50.0%" in reason
    assert "95.0%" in reason
    assert "100% of recent requests carry a deadline" in reason
    # Every queued request moved to the new inner policy.
    assert len(policy) == 5
    assert {r.request_id for r in policy.drain()} == queued


def test_queued_requests_survive_a_switch_and_are_served_in_the_new_order() -> None:
    policy = AdaptivePolicy(SMALL_WINDOW)
    policy.push(make_request_info("late", arrival=0.0, slo_s=60.0))
    policy.push(make_request_info("soon", arrival=1.0, slo_s=5.0))
    set_attainment(policy, met=0)
    tick(policy, 0.0, 10.0)
    assert policy.current == "slo_aware"
    free = make_snapshot(1, now=10.5)
    first, second = policy.pop(free), policy.pop(free)
    assert first is not None
    assert second is not None
    assert [first.request_id, second.request_id] == ["soon", "late"]


def test_its_own_switch_into_slo_aware_orders_the_moved_requests_by_slack() -> None:
    """adaptive gives slo_aware the snapshot before moving the queue into it: a long
    request (8 s of work, deadline 10 s) goes before a short one due at 5 s (an operator's
    ``update_policy`` moves them by deadline alone)."""
    policy = AdaptivePolicy(AdaptivePolicy.Params(min_dwell_s=0.0))
    policy.push(make_request_info("short", max_tokens=2, slo_s=5.0))
    policy.push(make_request_info("long", max_tokens=400, slo_s=10.0))
    for k in range(30):  # 31 queued, 1 slot free: 0.3x, queueing
        policy.push(make_request_info(f"q{k}", slo_s=100.0))
    got = policy.pop(make_snapshot([make_instance_view(max_concurrency=100, in_flight=99)]))
    assert policy.current == "slo_aware"
    assert got is not None
    assert got.request_id == "long"


def test_alternating_attainment_does_not_flap() -> None:
    policy = AdaptivePolicy(SMALL_WINDOW)
    push_deadline_requests(policy, 3)
    for k in range(100):
        set_attainment(policy, met=0 if k % 2 == 0 else 20)
        tick(policy, float(k), float(k))
    assert policy.current == "fifo"
    assert policy.describe()["switches"] == 0


def test_attainment_inside_the_margin_band_keeps_slo_aware() -> None:
    policy = AdaptivePolicy(SMALL_WINDOW)  # target 0.95, margin 0.02: band [0.93, 0.97)
    push_deadline_requests(policy, 3)
    set_attainment(policy, met=0)
    tick(policy, 0.0, 10.0)
    assert policy.current == "slo_aware"
    set_attainment(policy, met=19)  # 95 %: recovered to target but not above target + margin
    tick(policy, 11.0, 60.0)
    assert policy.current == "slo_aware"
    reason = str(policy.describe()["reason"])  # the stay condition, not "below target"
    assert reason.startswith(
        "SLO attainment 95.0% over the last 20 deadline completions has not reached 97.0% "
        "(target 95.0% + margin): staying in slo_aware (entered below 93.0%)"
    )
    set_attainment(policy, met=20)  # 100 %, light load -> fifo after 10 s
    tick(policy, 61.0, 70.0)
    assert policy.current == "slo_aware"
    tick(policy, 71.0, 71.0)
    info = policy.describe()
    assert info["current"] == "fifo"
    assert info["switches"] == 2
    assert "light load" in str(info["reason"])


def test_no_switch_back_within_min_dwell_of_the_last_switch() -> None:
    policy = AdaptivePolicy(SMALL_WINDOW)  # min_dwell_s 10
    push_deadline_requests(policy, 3)
    set_attainment(policy, met=0)
    tick(policy, 0.0, 10.0)
    assert policy.current == "slo_aware"
    set_attainment(policy, met=20)
    tick(policy, 11.0, 20.0)  # fifo wanted since t=11: only 9 s
    assert policy.current == "slo_aware"
    tick(policy, 21.0, 21.0)
    assert policy.current == "fifo"


def push_mixed_priority(policy: AdaptivePolicy, n: int, start: int = 0) -> list[str]:
    ids = []
    for k in range(start, start + n):
        prio = RequestPriority.HIGH if k % 2 else RequestPriority.LOW
        policy.push(make_request_info(f"p{k}", arrival=k * 0.01, priority=prio))
        ids.append(f"p{k}")
    return ids


def test_deadlines_in_a_queue_switch_to_slo_aware_and_back_once_it_drains() -> None:
    policy = AdaptivePolicy()  # defaults: queueing at 0.1x, drained at 0.05x, 2 s dwell
    ids = push_deadline_requests(policy, 2)  # 2 queued / 20 slots = 0.1x; attainment unknown
    tick(policy, 0.0, 1.0)
    assert policy.current == "fifo"  # wanted for 1 s only
    tick(policy, 2.0, 2.0)
    info = policy.describe()
    assert info["current"] == "slo_aware"
    reason = str(info["reason"])
    assert "requests queue: queue at 0.10x fleet capacity (2 waiting / 20 slots; " in reason
    assert "2 queued, 0 slots free) >= 0.1" in reason
    assert "100% of recent requests carry a deadline" in str(info["reason"])
    tick(policy, 3.0, 20.0)  # still queued: stays
    assert policy.current == "slo_aware"
    assert policy.remove("d0") is not None  # 0.05x: drained, fifo after the dwell
    tick(policy, 21.0, 22.0)
    assert policy.current == "slo_aware"
    tick(policy, 23.0, 23.0)
    assert policy.current == "fifo"
    assert "light load" in str(policy.describe()["reason"])
    assert {r.request_id for r in policy.drain()} == ids - {"d0"}  # nothing lost


def test_one_queued_request_is_not_queueing() -> None:
    policy = AdaptivePolicy()
    push_deadline_requests(policy, 1)  # 1 queued / 20 slots = 0.05x
    tick(policy, 0.0, 30.0)
    assert policy.current == "fifo"
    assert policy.describe()["switches"] == 0


def test_mixed_priorities_under_overload_switch_to_priority() -> None:
    policy = AdaptivePolicy()
    ids = push_mixed_priority(policy, 30)  # 30 queued / 20 slots = 1.5x
    tick(policy, 0.0, 1.0)
    assert policy.current == "fifo"
    tick(policy, 2.0, 2.0)
    info = policy.describe()
    assert info["current"] == "priority"
    assert "1.50x" in str(info["reason"])
    assert "(30 waiting / 20 slots; 30 queued, 0 slots free)" in str(info["reason"])
    assert {r.request_id for r in policy.drain()} == set(ids)


def push_flood(policy: AdaptivePolicy, heavy: int, light: int) -> list[str]:
    """``heavy`` requests of one user, then ``light`` of ``light`` other users."""
    ids = []
    for k in range(heavy):
        policy.push(make_request_info(f"h{k}", arrival=k * 0.01, user_id="heavy"))
        ids.append(f"h{k}")
    for k in range(light):
        policy.push(make_request_info(f"l{k}", arrival=1.0 + k * 0.01, user_id=f"light{k}"))
        ids.append(f"l{k}")
    return ids


def test_one_users_flood_under_overload_switches_to_fair_and_back_once_it_drains() -> None:
    policy = AdaptivePolicy()
    ids = push_flood(policy, 24, 6)  # 30 queued / 20 slots; one user sent 80%
    tick(policy, 0.0, 2.0)
    info = policy.describe()
    assert info["current"] == "fair"
    assert "one user sent 80% of the recent requests (of 7 users)" in str(info["reason"])
    signals = info["state"]["signals"]  # type: ignore[index]
    assert (signals["top_user_share"], signals["users"]) == (0.8, 7)
    # the light users' requests start first: each user's counter is 0, the heavy one's
    # grows with each start
    started = [policy.pop(make_snapshot(2, now=3.0)) for _ in range(8)]
    assert [r.request_id for r in started if r is not None][:7] == [
        "h0", "l0", "l1", "l2", "l3", "l4", "l5",
    ]  # fmt: skip
    rest = {r.request_id for r in policy.drain()}
    assert rest | {r.request_id for r in started if r is not None} == set(ids)
    tick(policy, 4.0, 7.0)  # nothing queued: light load
    assert policy.current == "fifo"


def test_many_users_alike_or_a_single_user_do_not_switch_to_fair() -> None:
    """A flood needs others to hold back: one user alone (every request its own) or
    users sending alike keep arrival order."""
    alone = AdaptivePolicy()
    for k in range(30):
        alone.push(make_request_info(f"r{k}", arrival=k * 0.01, user_id="only"))
    tick(alone, 0.0, 3.0)
    assert alone.current == "fifo"
    alike = AdaptivePolicy()
    for k in range(30):
        alike.push(make_request_info(f"r{k}", arrival=k * 0.01, user_id=f"u{k % 2}"))
    tick(alike, 0.0, 3.0)
    assert alike.current == "fifo"
    assert alike.describe()["state"]["signals"]["top_user_share"] == 0.5  # type: ignore[index]


def test_its_fair_shares_by_the_user_weights_it_was_given() -> None:
    """The heavy user, weighted 8, is charged an eighth of its requests' work."""
    policy = AdaptivePolicy(
        AdaptivePolicy.Params(user_weights={"heavy": 8.0}, max_queued_per_user=100)
    )
    assert policy.describe()["params"]["user_weights"] == {"heavy": 8.0}  # type: ignore[index]
    push_flood(policy, 24, 6)
    tick(policy, 0.0, 2.0)
    assert policy.current == "fair"
    started = [policy.pop(make_snapshot(2, now=3.0)) for _ in range(8)]
    assert [r.request_id for r in started if r is not None] == [
        "h0", "l0", "l1", "l2", "l3", "l4", "l5", "h1",
    ]  # fmt: skip
    fair = policy._inner["fair"]
    assert isinstance(fair, FairSharePolicy)
    assert fair.params.max_queued_per_user == 100
    # two starts of prompt 100 + 2 × 50 expected output, each divided by 8; a light user's 200
    assert fair.counters()["heavy"] == pytest.approx(2 * 200 / 8)
    assert fair.counters()["light0"] == pytest.approx(200)


def test_leaving_fair_forgets_its_running_requests() -> None:
    """Requests started under ``fair`` end under the next policy: ``fair`` keeps no charge
    of them waiting for an end it will not be told of."""
    policy = AdaptivePolicy()
    push_flood(policy, 24, 6)
    tick(policy, 0.0, 2.0)
    assert policy.current == "fair"
    fair = policy._inner["fair"]
    assert isinstance(fair, FairSharePolicy)
    while policy.pop(make_snapshot(2, now=2.5)) is not None:
        pass
    assert fair.describe()["state"]["queued"] == 0  # type: ignore[index]
    tick(policy, 3.0, 6.0)  # nothing queued: light load
    assert policy.current == "fifo"
    assert not fair._started


def test_priority_stays_while_load_oscillates_inside_the_band() -> None:
    policy = AdaptivePolicy(SMALL_WINDOW)  # light_load 0.5, overload 1.0
    ids = push_mixed_priority(policy, 30)
    tick(policy, 0.0, 10.0)
    assert policy.current == "priority"
    extra = ids[12:]  # removing these leaves 12 queued = 0.6x, above light_load 0.5
    for k in range(11, 60):
        if k % 2:
            for rid in extra:
                assert policy.remove(rid) is not None
        else:
            push_mixed_priority(policy, len(extra), start=12)
        tick(policy, float(k), float(k))
    assert policy.current == "priority"
    assert policy.describe()["switches"] == 1


@pytest.mark.parametrize(
    ("initial", "kwargs", "stay"),
    [
        ("slo_aware", {"slo_s": 100.0}, "above light_load 0.05: staying in slo_aware "
         "(entered at >= 0.1) and 100% of recent requests carry a deadline"),
        ("priority", {"priority": RequestPriority.HIGH}, "above light_load 0.05: staying in "
         "priority (entered at >= 0.1) and 100% of recent requests have a non-NORMAL priority"),
        ("cost_optimized", {"cost_budget": 1.0}, "below overload 0.1: staying in "
         "cost_optimized (entered at <= 0.05) and 100% of recent requests carry a cost budget"),
    ],
)  # fmt: skip
def test_the_reason_inside_the_load_band_gives_the_stay_condition(
    initial: Literal["slo_aware", "priority", "cost_optimized"], kwargs: dict[str, Any], stay: str
) -> None:
    """Load 0.07, between light_load and overload: the policy in charge stays, and its
    reason says so (it had said "... >= 0.1" or "... <= 0.05" of a 0.07 load)."""
    policy = AdaptivePolicy(AdaptivePolicy.Params(initial=initial))
    for k in range(7):
        policy.push(make_request_info(f"r{k}", **kwargs))
    policy.tick(make_snapshot([make_instance_view(max_concurrency=100, in_flight=100)]))
    assert policy.current == initial
    assert str(policy.describe()["reason"]) == (
        "queue at 0.07x fleet capacity (7 waiting / 100 slots; 7 queued, 0 slots free), " + stay
    )


def test_cost_budgets_under_light_load_switch_to_cost_optimized() -> None:
    policy = AdaptivePolicy(SMALL_WINDOW)  # 4 queued / 20 = 0.2x <= light_load 0.5
    for k in range(4):
        policy.push(make_request_info(f"c{k}", cost_budget=0.01))
    tick(policy, 0.0, 10.0)
    info = policy.describe()
    assert info["current"] == "cost_optimized"
    assert "cost budget" in str(info["reason"])
    cheap = make_instance_view("cheap", price_per_gpu_hour=1.0)
    dear = make_instance_view("dear", price_per_gpu_hour=9.0)
    req = make_request_info("x", cost_budget=0.01)
    assert policy.constrain(req, make_snapshot([cheap, dear])) == frozenset({"cheap"})


def test_the_rule_is_evaluated_at_most_once_per_interval() -> None:
    policy = AdaptivePolicy(AdaptivePolicy.Params(eval_interval_s=5.0))
    seen = []
    for t in range(12):
        policy.pop(full_fleet(float(t)))
        state = policy.describe()["state"]
        assert isinstance(state, dict)
        signals = state["signals"]
        assert isinstance(signals, dict)
        seen.append(signals["now"])
    assert seen == [0.0] * 5 + [5.0] * 5 + [10.0] * 2


def test_admission_and_completion_go_to_the_current_policy() -> None:
    policy = AdaptivePolicy(AdaptivePolicy.Params(window=20, min_samples=20, initial="slo_aware"))
    slow = make_snapshot([make_instance_view("slow", est_tpot_s=0.05)])
    verdict = policy.admit(make_request_info("hopeless", slo_s=0.5, max_tokens=100), slow)
    assert verdict.admitted
    assert verdict.priority is RequestPriority.BACKGROUND
    set_attainment(policy, met=20)
    state = policy.describe()["state"]
    assert isinstance(state, dict)
    inner = state["inner"]
    assert isinstance(inner, dict)
    assert inner["name"] == "slo_aware"
    inner_state = inner["state"]
    assert isinstance(inner_state, dict)
    assert inner_state["ended"] == 20
    assert (state["queued"], state["ended"]) == (0, 20)  # as every policy reports them


def test_an_empty_fleet_does_not_break_the_rule() -> None:
    policy = AdaptivePolicy()
    policy.push(make_request_info("r"))
    for t in range(20):
        assert policy.pop(make_snapshot(0, now=float(t))) is None
    state = policy.describe()["state"]
    assert isinstance(state, dict)
    signals = state["signals"]
    assert isinstance(signals, dict)
    assert signals["load"] == math.inf
    assert policy.current == "fifo"
    assert len(policy) == 1


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"light_load": 1.0, "overload": 1.0}, "light_load"),
        ({"window": 10, "min_samples": 11}, "min_samples"),
        ({"slo_target": 1.5}, "slo_target"),
        ({"initial": "adaptive"}, "initial"),
        ({"eval_interval_s": 0.0}, "eval_interval_s"),
        ({"eval_interval_s": 1e-9}, "eval_interval_s"),  # its tick had spun a core
    ],
)
def test_invalid_params_name_the_key(values: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        AdaptivePolicy.Params(**values)  # type: ignore[arg-type]
    assert err.value.key == key


# -- small fleets: the request being dispatched is not waiting --------------------------


class MiniDispatcher:
    """The dispatcher's pass in miniature, on explicit (virtual) times: at each step the
    requests that finished free their slots, the arrivals are pushed, and requests are
    popped while the fleet has a free slot (as ``Dispatcher.dispatch_ready`` does), each
    placed on the least busy instance the policy allows and running for ``run_s``."""

    def __init__(
        self, policy: AdaptivePolicy, fleet: Sequence[tuple[str, int, float]], run_s: float
    ) -> None:
        self.policy = policy
        self.fleet = fleet  # (instance id, slots, price per GPU-hour)
        self.run_s = run_s
        self.running: dict[str, list[float]] = {iid: [] for iid, _, _ in fleet}
        self.placed: Counter[str] = Counter()

    def snapshot(self, now: float) -> ClusterSnapshot:
        views = [
            make_instance_view(
                iid,
                max_concurrency=slots,
                in_flight=len(self.running[iid]),
                price_per_gpu_hour=price,
            )
            for iid, slots, price in self.fleet
        ]
        return make_snapshot(views, now=now)

    def step(self, now: float, arrivals: Sequence[RequestInfo] = ()) -> None:
        for iid, ends in self.running.items():
            self.running[iid] = [end for end in ends if end > now + 1e-9]
        for req in arrivals:
            self.policy.push(req)
        while len(self.policy):
            snap = self.snapshot(now)
            if not snap.has_capacity():
                break
            info = self.policy.pop(snap)
            if info is None:
                break
            allowed = self.policy.constrain(info, snap)
            free = [i for i in snap.runnable(info) if allowed is None or i.instance_id in allowed]
            chosen = min(free, key=lambda i: i.in_flight).instance_id
            self.running[chosen].append(now + self.run_s)
            self.placed[chosen] += 1

    def run(self, start: int, end: int, arrivals: Callable[[int], list[RequestInfo]]) -> None:
        """One step per second from ``start`` to ``end`` inclusive."""
        for t in range(start, end + 1):
            self.step(float(t), arrivals(t))


def last_signals(policy: AdaptivePolicy) -> dict[str, object]:
    state = policy.describe()["state"]
    assert isinstance(state, dict)
    signals = state["signals"]
    assert isinstance(signals, dict)
    return signals


def test_signals_count_only_requests_that_wait_for_a_slot() -> None:
    policy = AdaptivePolicy()
    for k in range(5):
        policy.push(make_request_info(f"r{k}"))
    views = [
        make_instance_view("a", max_concurrency=4, in_flight=2),  # 2 free
        make_instance_view("b", max_concurrency=4, in_flight=3),  # 1 free
        make_instance_view("sick", max_concurrency=4, healthy=False),  # none it can use
        make_instance_view("draining", max_concurrency=4, accepting=False),
    ]
    sig = policy.signals(make_snapshot(views))
    assert (sig.queued, sig.free_slots, sig.waiting, sig.capacity) == (5, 3, 2, 16)
    assert sig.load == 2 / 16
    # nothing queued beyond the free slots: nothing waits
    assert policy.signals(make_snapshot(2, max_concurrency=4)).load == 0.0
    # another model's free slots take none of them
    other = make_instance_view("other", model="qwen", max_concurrency=64)
    sig = policy.signals(make_snapshot([*views, other]))
    assert (sig.queued, sig.free_slots, sig.waiting, sig.capacity) == (5, 67, 2, 80)
    policy.push(make_request_info("q0", model="qwen"))  # one it has a slot for
    assert policy.signals(make_snapshot([*views, other])).waiting == 2


def test_light_load_on_a_small_fleet_switches_to_cost_optimized() -> None:
    """8 slots, one request a second with a cost budget: every request starts at once, so
    the load is 0, not 1/8 (the request being dispatched used to count as queued, above
    ``light_load`` on any fleet of fewer than 20 slots)."""
    policy = AdaptivePolicy()
    fleet = MiniDispatcher(policy, [("dear", 4, 5.0), ("cheap", 4, 1.0)], run_s=2.5)
    fleet.run(0, 29, lambda t: [make_request_info(f"r{t}", arrival=float(t), cost_budget=1.0)])
    info = policy.describe()
    assert info["current"] == "cost_optimized"
    assert info["since"] == 2.0  # the rule named it at t=0, held for min_dwell_s
    reason = str(info["reason"])
    assert reason.startswith("light load: queue at 0.00x fleet capacity (0 waiting / 8 slots")
    assert "100% of recent requests carry a cost budget" in reason
    signals = last_signals(policy)
    assert (signals["queued"], signals["waiting"], signals["capacity"]) == (1, 0, 8)
    assert signals["load"] == 0.0
    # under fifo (t=0, 1) the least busy instance: dear, then cheap; then only cheap
    assert fleet.placed == {"dear": 1, "cheap": 29}


def test_a_tiny_fleet_returns_from_slo_aware_to_fifo_once_the_queue_drains() -> None:
    """2 slots: 3 deadline requests a second for 10 s queue up (slo_aware), then one every
    2 s starts at once; the load falls to 0 and the rule goes back to fifo."""
    policy = AdaptivePolicy()
    fleet = MiniDispatcher(policy, [("i0", 2, 2.0)], run_s=1.0)

    def arrivals(t: int) -> list[RequestInfo]:
        n = 3 if t < 10 else int(t % 2 == 0)
        return [make_request_info(f"d{t}.{k}", arrival=float(t), slo_s=30.0) for k in range(n)]

    fleet.run(0, 9, arrivals)
    info = policy.describe()
    assert info["current"] == "slo_aware"
    assert info["since"] == 2.0
    # the reason is the rule's at its last evaluation (t = 9 s), with those numbers
    assert "queue at 5.00x fleet capacity (10 waiting / 2 slots; 12 queued, 2 slots free)" in (
        str(info["reason"])
    )
    fleet.run(10, 60, arrivals)
    info = policy.describe()
    assert info["current"] == "fifo"
    assert info["switches"] == 2
    assert str(info["reason"]).startswith("light load: queue at 0.00x fleet capacity")
    signals = last_signals(policy)
    assert (signals["queued"], signals["waiting"], signals["load"]) == (1, 0, 0.0)
    assert len(policy) == 0


def test_the_control_plane_on_a_small_fleet_places_budgeted_requests_on_the_cheap_one() -> None:
    """The reviewer's case end to end, on virtual time: 2 instances x 4 slots (prices 1
    and 5), one request a second with a cost budget, for 30 s."""

    async def main() -> tuple[dict[str, object], Counter[str], str]:
        cp = ControlPlaneManager(scheduling_policy="adaptive", mode="simulated")
        for n, (iid, price) in enumerate([("cheap", 1.0), ("dear", 5.0)]):
            cp.register_instance(
                make_instance(
                    iid, port=8000 + n, max_concurrent_requests=4, price_per_gpu_hour=price
                )
            )
        placed: Counter[str] = Counter()
        async with cp:
            ids = []
            for k in range(30):
                ids.append(await cp.submit_request(make_metadata(f"r{k}", cost_budget=1.0)))
                await asyncio.sleep(1.0)
            for rid in ids:
                result = await cp.wait_for_result(rid)
                assert result.instance_id is not None
                placed[result.instance_id] += 1
            policy = cp.policy
            assert isinstance(policy, AdaptivePolicy)
            return policy.describe(), placed, cp.prometheus_metrics().decode()

    info, placed, text = run_virtual(main())
    assert info["current"] == "cost_optimized"
    # the gauge follows the policy in charge (it had stayed at the first one, fifo)
    assert 'sage_llm_scheduling_policy{policy="cost_optimized"} 1.0' in text
    assert 'sage_llm_scheduling_policy{policy="fifo"} 0.0' in text
    assert "light load" in str(info["reason"])
    assert placed["cheap"] >= 27  # all but the ones fifo placed before the switch


def test_a_demoted_request_counts_in_the_mix_as_it_came() -> None:
    """``slo_aware`` demotes an infeasible deadline (the manager then pushes it without its
    deadline, at BACKGROUND): the mix still counts a NORMAL request with a deadline, so
    adaptive's own demotions do not move it off ``slo_aware``."""
    policy = AdaptivePolicy(AdaptivePolicy.Params(initial="slo_aware"))
    snap = make_snapshot([make_instance_view("i0", est_tpot_s=0.02)])
    for k in range(10):
        req = make_request_info(f"r{k}", slo_s=0.1)  # 1.04 s of work: infeasible
        verdict = policy.admit(req, snap)
        assert verdict.priority is RequestPriority.BACKGROUND
        policy.push(replace(req, priority=verdict.priority, deadline=None))
    signals = policy.signals(snap)
    assert (signals.deadline_share, signals.priority_share) == (1.0, 0.0)


def test_the_mix_of_demoted_requests_never_pushed_is_let_go() -> None:
    """Demoted requests that never reach the queue (refused after admission) are not kept
    for ever: past a few thousand, the oldest is forgotten, and pushed after all it counts
    as it is pushed (no deadline); a recent one still counts as it came."""
    policy = AdaptivePolicy(AdaptivePolicy.Params(initial="slo_aware"))
    snap = make_snapshot([make_instance_view("i0", est_tpot_s=0.02)])
    demoted: list[RequestInfo] = []
    for k in range(5000):
        req = make_request_info(f"r{k}", slo_s=0.1)  # 1.04 s of work: infeasible
        assert policy.admit(req, snap).priority is RequestPriority.BACKGROUND
        demoted.append(replace(req, priority=RequestPriority.BACKGROUND, deadline=None))
    policy.push(demoted[0])  # forgotten: counted as pushed
    assert (policy.signals(snap).deadline_share, policy.signals(snap).priority_share) == (0, 1)
    policy.push(demoted[-1])  # remembered: counted as it came
    assert policy.signals(snap).deadline_share == pytest.approx(1 / 2)


def test_a_request_pushed_again_counts_once_in_the_mix() -> None:
    """A retry or a request put back is pushed again: the mix counts it once."""
    policy = AdaptivePolicy()
    snap = make_snapshot([make_instance_view("i0")])
    for k in range(4):
        policy.push(make_request_info(f"r{k}"))
    urgent = make_request_info("u", priority=RequestPriority.HIGH)
    for _ in range(4):  # pushed, popped for a retry, pushed again …
        policy.push(urgent)
        assert policy.remove("u") is not None
    assert policy.signals(snap).priority_share == pytest.approx(1 / 5)


def test_the_reason_follows_the_rule_between_switches() -> None:
    """Not "no load observed yet" once the rule has been evaluated; a switch the rule
    names but min_dwell_s holds back is said so."""
    policy = AdaptivePolicy()
    fleet = MiniDispatcher(policy, [("i0", 2, 2.0)], run_s=1.0)

    def arrivals(t: int) -> list[RequestInfo]:
        return [make_request_info(f"d{t}.{k}", arrival=float(t), slo_s=30.0) for k in range(3)]

    fleet.run(0, 0, arrivals)
    reason = str(policy.describe()["reason"])
    assert "no load observed yet" not in reason
    assert reason.startswith("keeping fifo until the rule has named slo_aware for min_dwell_s")


def test_an_idle_fleet_of_any_roles_is_idle() -> None:
    """Nothing queued or running: fifo, also on a PD fleet or with an instance drained
    (the rule had compared the free slots of whole-request instances with every slot)."""
    policy = AdaptivePolicy(SMALL_WINDOW)
    set_attainment(policy, met=0)
    pd = [make_instance_view("p", role=ExecutionInstanceType.PREFILLING),
          make_instance_view("d", role=ExecutionInstanceType.DECODING),
          make_instance_view("g", accepting=False)]  # fmt: skip
    target, why = policy.desired(policy.signals(make_snapshot(pd, now=1.0)))
    assert (target, why.split(":")[0]) == ("fifo", "idle")
    busy = [*pd[:2], make_instance_view("g", in_flight=1)]
    assert policy.signals(make_snapshot(busy, now=1.0)).running == 1


def test_a_pd_only_fleet_counts_its_own_slots_and_its_free_pairs() -> None:
    """The dispatcher's stand-in view of a free pair had been counted as an instance (12
    slots on a fleet of 8), and the timer's evaluation, without it, saw no free slot on a
    PD-only fleet: both now see 8 slots, and a free pair's decode slots as free."""
    policy = AdaptivePolicy()
    for k in range(5):
        policy.push(make_request_info(f"r{k}"))
    pd = [
        make_instance_view("p", role=ExecutionInstanceType.PREFILLING, max_concurrency=4),
        make_instance_view("d", role=ExecutionInstanceType.DECODING, max_concurrency=4,
                           in_flight=1),
    ]  # fmt: skip
    stand_in = make_instance_view(PAIR_VIEW_PREFIX + MODEL, max_concurrency=3)
    alone = policy.signals(make_snapshot(pd))
    assert (alone.capacity, alone.free_slots, alone.waiting) == (8, 3, 2)
    assert policy.signals(make_snapshot([*pd, stand_in])) == alone
    # no prefill instance free: no pair, so no free slot
    busy = [replace(pd[0], in_flight=4), pd[1]]
    assert policy.signals(make_snapshot(busy)).free_slots == 0


def test_the_dwell_restarts_when_the_rule_names_another_policy() -> None:
    """slo_aware named at t=0, priority from t=1: at t=2 priority has been named for 1 s
    only, short of min_dwell_s (2 s), so no switch until t=3."""
    policy = AdaptivePolicy()
    push_deadline_requests(policy, 30)
    tick(policy, 0.0, 0.0)
    push_mixed_priority(policy, 200)  # the mix window (200): no deadlines any more
    tick(policy, 1.0, 2.0)
    state = policy.describe()["state"]
    assert isinstance(state, dict)
    assert (policy.current, state["pending"]) == ("fifo", ["priority", 1.0])
    tick(policy, 3.0, 3.0)
    assert policy.current == "priority"


def test_requests_running_with_none_queued_is_not_idle() -> None:
    policy = AdaptivePolicy()
    for k in range(5):
        policy.push(make_request_info(f"c{k}", cost_budget=1.0))
    policy.drain()  # all five started
    sig = policy.signals(make_snapshot([make_instance_view(in_flight=5)]))
    assert (sig.queued, sig.running) == (0, 5)
    target, why = policy.desired(sig)
    assert (target, why.split(":")[0]) == ("cost_optimized", "light load")


def test_a_switch_keeps_submission_order_for_equal_arrivals() -> None:
    """priority -> fifo: a LOW request submitted before a HIGH one at the same arrival
    goes first under fifo (moved in the order they came, not in priority's)."""
    policy = AdaptivePolicy(AdaptivePolicy.Params(initial="priority", min_dwell_s=0.0))
    policy.push(make_request_info("first", priority=RequestPriority.LOW))
    policy.push(make_request_info("second", priority=RequestPriority.HIGH))
    got = policy.pop(make_snapshot([make_instance_view(in_flight=1)]))
    assert policy.current == "fifo"
    assert got is not None
    assert got.request_id == "first"


def test_a_deadline_share_exactly_at_its_threshold_counts() -> None:
    policy = AdaptivePolicy(AdaptivePolicy.Params(min_dwell_s=0.0))  # deadline_share 0.3
    for k in range(20):
        policy.push(make_request_info(f"r{k}", slo_s=100.0 if k < 6 else None))  # 30 %
    tick(policy, 0.0, 0.0)
    assert policy.current == "slo_aware"


@pytest.mark.parametrize(
    ("initial", "met", "target"),
    [
        ("fifo", 4, "slo_aware"),  # 20 %: below slo_target - slo_margin (25 %)
        ("fifo", 5, "fifo"),  # exactly 25 %: not below it
        ("slo_aware", 14, "slo_aware"),  # 70 %: below slo_target + slo_margin (75 %)
        ("slo_aware", 15, "fifo"),  # exactly 75 %: reached, slo_aware is left
    ],
)
def test_attainment_exactly_at_a_threshold_is_not_below_it(
    initial: Literal["fifo", "slo_aware"], met: int, target: str
) -> None:
    params = AdaptivePolicy.Params(initial=initial, slo_target=0.5, slo_margin=0.25)
    policy = AdaptivePolicy(params)
    set_attainment(policy, met=met)
    push_deadline_requests(policy, 1)  # on a fleet with a slot for it: load 0
    sig = policy.signals(make_snapshot([make_instance_view(in_flight=1)]))
    assert policy.desired(sig)[0] == target


def test_since_is_null_until_the_first_switch() -> None:
    policy = AdaptivePolicy()
    policy.push(make_request_info())
    policy.tick(make_snapshot([make_instance_view(in_flight=1)], now=7.0))
    info = policy.describe()
    assert (info["current"], info["switches"], info["since"]) == ("fifo", 0, None)


def test_an_interval_of_clock_steps_is_a_whole_interval() -> None:
    """On a clock of 0.1 s steps, 4.3 - 3.3000000000000003 is a second (eval_interval_s)."""
    policy = AdaptivePolicy()
    policy.push(make_request_info())
    for step in (33, 43):
        policy.tick(make_snapshot([make_instance_view(in_flight=1)], now=step * 0.1))
    assert last_signals(policy)["now"] == 43 * 0.1
