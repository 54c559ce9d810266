"""Priority: strict order, aging, and the max-wait starvation bound."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sage_llm.control_plane.scheduling.priority import PriorityPolicy, effective_priority
from sage_llm.control_plane.snapshot import ClusterSnapshot
from sage_llm.errors import ConfigError
from sage_llm.types import RequestPriority as P
from tests.factories import make_request_info, make_snapshot


def pop_ids(policy: PriorityPolicy, snap: ClusterSnapshot) -> list[str]:
    out: list[str] = []
    while (req := policy.pop(snap)) is not None:
        out.append(req.request_id)
    return out


def test_strict_priority_then_arrival() -> None:
    policy = PriorityPolicy()
    pushes = [
        ("bg", P.BACKGROUND, 0.0),
        ("n1", P.NORMAL, 0.1),
        ("c1", P.CRITICAL, 0.2),
        ("h1", P.HIGH, 0.3),
        ("n0", P.NORMAL, 0.05),
        ("c0", P.CRITICAL, 0.15),
        ("low", P.LOW, 0.0),
    ]
    for rid, prio, arrival in pushes:
        policy.push(make_request_info(rid, priority=prio, arrival=arrival))
    # At t=1 nobody has aged a full interval yet.
    assert pop_ids(policy, make_snapshot(1, now=1.0)) == [
        "c0", "c1", "h1", "n0", "n1", "low", "bg",
    ]  # fmt: skip


def test_effective_priority_gains_one_level_per_interval() -> None:
    assert effective_priority(4, 0.0, 5.0) == 4
    assert effective_priority(4, 4.99, 5.0) == 4
    assert effective_priority(4, 5.0, 5.0) == 3
    assert effective_priority(4, 12.0, 5.0) == 2
    assert effective_priority(4, 100.0, 5.0) == 0
    assert effective_priority(3, 100.0, math.inf) == 3


def test_an_aged_request_overtakes_newer_higher_priority_ones() -> None:
    policy = PriorityPolicy()  # aging 5 s per level
    policy.push(make_request_info("old-low", priority=P.LOW, arrival=0.0))
    policy.push(make_request_info("new-normal", priority=P.NORMAL, arrival=9.0))
    # At t=9.5 old-low waited 9.5 s: one level up (LOW -> NORMAL), and it is older.
    assert pop_ids(policy, make_snapshot(1, now=9.5)) == ["old-low", "new-normal"]


def test_aging_counts_a_wait_of_clock_steps_as_whole_intervals() -> None:
    """On a clock of 0.1 s steps, 9.1 - 4.1 is 4.999999999999999: one interval (5 s)."""
    policy = PriorityPolicy()
    policy.push(make_request_info("old-normal", priority=P.NORMAL, arrival=41 * 0.1))
    policy.push(make_request_info("new-high", priority=P.HIGH, arrival=60 * 0.1))
    assert pop_ids(policy, make_snapshot(1, now=91 * 0.1)) == ["old-normal", "new-high"]


def test_not_yet_aged_request_stays_behind() -> None:
    policy = PriorityPolicy()
    policy.push(make_request_info("old-low", priority=P.LOW, arrival=0.0))
    policy.push(make_request_info("new-high", priority=P.HIGH, arrival=9.0))
    # LOW aged one level to NORMAL; HIGH is still better.
    assert pop_ids(policy, make_snapshot(1, now=9.5)) == ["new-high", "old-low"]


def test_requests_over_max_wait_go_first_oldest_first() -> None:
    params = PriorityPolicy.Params(aging_interval_s=math.inf, max_wait_s=60.0)
    policy = PriorityPolicy(params)
    policy.push(make_request_info("bg-older", priority=P.BACKGROUND, arrival=0.0))
    policy.push(make_request_info("low-newer", priority=P.LOW, arrival=1.0))
    policy.push(make_request_info("crit", priority=P.CRITICAL, arrival=60.5))
    policy.push(make_request_info("bg-recent", priority=P.BACKGROUND, arrival=30.0))
    assert pop_ids(policy, make_snapshot(1, now=61.0)) == [
        "bg-older", "low-newer", "crit", "bg-recent",
    ]  # fmt: skip


def simulate_background_under_critical_flood(
    params: PriorityPolicy.Params, tick: float, bg_tick: int, ticks: int
) -> float | None:
    """One CRITICAL arrival and one pop per tick (at capacity); one BACKGROUND arrives at
    ``bg_tick``. Returns its wait when popped, or None if never popped."""
    policy = PriorityPolicy(params)
    bg_arrival = bg_tick * tick
    for k in range(ticks):
        now = k * tick
        policy.push(make_request_info(f"c{k}", priority=P.CRITICAL, arrival=now))
        if k == bg_tick:
            policy.push(make_request_info("bg", priority=P.BACKGROUND, arrival=now))
        popped = policy.pop(make_snapshot(1, now=now))
        assert popped is not None
        if popped.request_id == "bg":
            return now - bg_arrival
    return None


def test_aging_serves_background_after_four_intervals_under_a_critical_flood() -> None:
    wait = simulate_background_under_critical_flood(
        PriorityPolicy.Params(), tick=1.0, bg_tick=3, ticks=200
    )
    assert wait == pytest.approx(20.0)  # BACKGROUND -> CRITICAL after 4 x 5 s


def test_max_wait_bounds_background_when_aging_is_off() -> None:
    params = PriorityPolicy.Params(aging_interval_s=math.inf, max_wait_s=60.0)
    wait = simulate_background_under_critical_flood(params, tick=1.0, bg_tick=7, ticks=200)
    assert wait == pytest.approx(60.0)


def test_without_aging_or_max_wait_background_starves() -> None:
    params = PriorityPolicy.Params(aging_interval_s=math.inf, max_wait_s=math.inf)
    assert simulate_background_under_critical_flood(params, 1.0, 0, 200) is None


@settings(max_examples=200, deadline=None)
@given(
    tick=st.sampled_from([0.1, 0.25, 0.5, 1.0, 2.0]),
    max_wait_ticks=st.integers(1, 120),
    aging=st.one_of(st.just(math.inf), st.floats(0.05, 500.0)),
    bg_tick=st.integers(0, 50),
)
def test_background_never_waits_longer_than_max_wait(
    tick: float, max_wait_ticks: int, aging: float, bg_tick: int
) -> None:
    max_wait = max_wait_ticks * tick
    params = PriorityPolicy.Params(aging_interval_s=aging, max_wait_s=max_wait)
    wait = simulate_background_under_critical_flood(
        params, tick, bg_tick, ticks=bg_tick + max_wait_ticks + 2
    )
    assert wait is not None
    assert wait <= max_wait + 1e-9


@settings(max_examples=100, deadline=None)
@given(
    stream=st.lists(st.sampled_from([None, *P]), min_size=1, max_size=150),
    bg_tick=st.integers(0, 40),
    max_wait_ticks=st.integers(1, 80),
)
def test_bound_holds_for_any_mixed_stream_at_or_below_capacity(
    stream: list[P | None], bg_tick: int, max_wait_ticks: int
) -> None:
    """At most one arrival per tick (None = idle tick) plus the BACKGROUND request."""
    params = PriorityPolicy.Params(max_wait_s=float(max_wait_ticks))
    policy = PriorityPolicy(params)
    horizon = max(len(stream), bg_tick) + max_wait_ticks + 2
    for k in range(horizon):
        now = float(k)
        prio = stream[k] if k < len(stream) else P.CRITICAL
        if prio is not None:
            policy.push(make_request_info(f"s{k}", priority=prio, arrival=now))
        if k == bg_tick:
            policy.push(make_request_info("bg", priority=P.BACKGROUND, arrival=now))
        popped = policy.pop(make_snapshot(1, now=now))
        if popped is not None and popped.request_id == "bg":
            assert now - bg_tick <= max_wait_ticks
            return
    pytest.fail("the BACKGROUND request was never popped")


def test_describe_counts_by_priority() -> None:
    policy = PriorityPolicy()
    policy.push(make_request_info("a", priority=P.HIGH))
    policy.push(make_request_info("b", priority=P.HIGH))
    policy.push(make_request_info("c", priority=P.BACKGROUND))
    info = policy.describe()
    assert info["name"] == "priority"
    assert info["params"] == {"aging_interval_s": 5.0, "max_wait_s": 60.0}
    state = info["state"]
    assert isinstance(state, dict)
    assert state["queued_by_priority"] == {"HIGH": 2, "BACKGROUND": 1}


def test_describe_counts_only_the_requests_still_queued() -> None:
    policy = PriorityPolicy()
    for i in range(3):
        policy.push(make_request_info(f"h{i}", arrival=i, priority=P.HIGH))
    policy.push(make_request_info("b", arrival=3, priority=P.BACKGROUND))
    snap = make_snapshot(1, max_concurrency=8)
    popped = policy.pop(snap)
    assert popped is not None and popped.request_id == "h0"
    assert policy.remove("h1") is not None
    assert policy.remove("b") is not None
    state = policy.describe()["state"]
    assert isinstance(state, dict)
    assert state["queued_by_priority"] == {"HIGH": 1}


@pytest.mark.parametrize(
    ("key", "value"), [("aging_interval_s", 0.0), ("max_wait_s", -1.0), ("max_wait_s", math.nan)]
)
def test_invalid_params_name_the_key(key: str, value: float) -> None:
    with pytest.raises(ConfigError) as err:
        PriorityPolicy.Params(**{key: value})
    assert err.value.key == key
