"""fair: a share per user by virtual token counters (charge, correction, rejoining, memory)."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import re

import pytest

from sage_llm import ControlPlaneManager
from sage_llm.control_plane.scheduling._lanes import QueueEntry
from sage_llm.control_plane.scheduling.admission import estimate_drain_s
from sage_llm.control_plane.scheduling.base import SchedulingPolicy
from sage_llm.control_plane.scheduling.fair import ANONYMOUS, TOP_USERS, FairSharePolicy
from sage_llm.control_plane.snapshot import ClusterSnapshot, RequestInfo
from sage_llm.errors import ConfigError, QueueFullError
from sage_llm.sim.clock import run_virtual
from sage_llm.types import RequestPriority, RequestStatus
from tests.factories import (
    MODEL,
    make_completion_record,
    make_instance,
    make_instance_view,
    make_metadata,
    make_request_info,
    make_snapshot,
)

SNAP = make_snapshot(1, now=100.0)


def pop_all(policy: SchedulingPolicy, snap: ClusterSnapshot = SNAP) -> list[str]:
    out: list[str] = []
    while (req := policy.pop(snap)) is not None:
        out.append(req.request_id)
    return out


def test_fair_is_a_scheduling_policy_named_fair() -> None:
    policy = FairSharePolicy()
    assert isinstance(policy, SchedulingPolicy)
    assert policy.name == "fair"
    assert policy.describe()["params"] == {
        "prompt_weight": 1.0, "output_weight": 2.0, "default_output_tokens": 256.0,
        "user_weights": {}, "max_queued_per_user": None,
    }  # fmt: skip


def test_a_light_users_request_starts_ahead_of_a_heavy_users_backlog() -> None:
    """FIFO would run the heavy user's eight first; here the light user's request, which
    came last, starts second: after one heavy request its counter is the lower one."""
    policy = FairSharePolicy()
    for n in range(8):
        policy.push(make_request_info(f"heavy{n}", arrival=n * 0.1, user_id="heavy"))
    policy.push(make_request_info("light", arrival=5.0, user_id="light"))
    assert pop_all(policy)[:3] == ["heavy0", "light", "heavy1"]


def test_two_users_with_equal_requests_take_turns_oldest_first_within_each() -> None:
    policy = FairSharePolicy()
    for n in range(3):
        policy.push(make_request_info(f"a{n}", arrival=n, user_id="a"))
    for n in range(3):
        policy.push(make_request_info(f"b{n}", arrival=10 + n, user_id="b"))
    assert pop_all(policy) == ["a0", "b0", "a1", "b1", "a2", "b2"]


def test_within_a_user_the_most_urgent_request_goes_first_never_before_anothers_turn() -> None:
    """A user's critical request, sent last, is its first to start; the other user's
    turn comes as it would (users alternate), and its own requests stay oldest first."""
    policy = FairSharePolicy()
    for n in range(3):
        policy.push(make_request_info(f"a{n}", arrival=n, user_id="a"))
    policy.push(make_request_info("b0", arrival=3, user_id="b"))
    policy.push(make_request_info("b1", arrival=4, user_id="b"))
    urgent = make_request_info("a-crit", arrival=5, priority=RequestPriority.CRITICAL, user_id="a")
    policy.push(urgent)
    late = make_request_info("a-low", arrival=0.5, priority=RequestPriority.LOW, user_id="a")
    policy.push(late)
    assert pop_all(policy) == ["a-crit", "b0", "a0", "b1", "a1", "a2", "a-low"]


def test_a_start_charges_prompt_and_expected_output_and_the_end_corrects_it() -> None:
    policy = FairSharePolicy(FairSharePolicy.Params(prompt_weight=1.0, output_weight=2.0))
    policy.push(make_request_info("r", prompt_tokens=100, max_tokens=50, user_id="u"))
    assert policy.pop(SNAP) is not None
    # expected output: min(max_tokens 50, default 256)
    assert policy.counters() == {"u": 100 + 2 * 50}
    policy.on_complete(make_completion_record("r", completion_tokens=20))
    assert policy.counters() == {"u": 100 + 2 * 20}
    # the user's next request is expected to generate what its last one did
    policy.push(make_request_info("s", prompt_tokens=10, max_tokens=500, user_id="u"))
    assert policy.pop(SNAP) is not None
    assert policy.counters() == {"u": 140 + 10 + 2 * 20}


def test_an_ended_request_that_never_started_changes_no_counter() -> None:
    policy = FairSharePolicy()
    policy.push(make_request_info("r", user_id="u"))
    assert policy.remove("r") is not None
    policy.on_complete(make_completion_record("r", status=RequestStatus.CANCELLED))
    assert policy.counters() == {"u": 0.0}
    assert policy.describe()["state"] == {
        "queued": 0, "ended": 1, "users": 1, "users_waiting": 0, "top_users": [],
    }  # fmt: skip


def test_the_status_shows_the_users_with_most_requests_queued_then_running() -> None:
    policy = FairSharePolicy(FairSharePolicy.Params(user_weights={"b": 2.0}))
    for n in range(3):
        policy.push(make_request_info(f"a{n}", arrival=n, user_id="a"))
    policy.push(make_request_info("b0", arrival=5, user_id="b"))
    policy.push(make_request_info("b1", arrival=6, user_id="b"))
    for n in range(TOP_USERS + 2):
        policy.push(make_request_info(f"c{n}", arrival=10 + n, user_id=f"c{n}"))
    assert policy.pop(SNAP) is not None  # a0: a keeps 2 queued, 1 running
    top = policy.describe()["state"]["top_users"]  # type: ignore[index]
    assert len(top) == TOP_USERS
    assert top[:2] == [
        {"user": "a", "queued": 2, "running": 1, "counter": 200.0, "weight": 1.0},
        {"user": "b", "queued": 2, "running": 0, "counter": 0.0, "weight": 2.0},
    ]
    assert all(u["queued"] == 1 for u in top[2:])


def test_a_request_put_back_is_given_its_charge_back() -> None:
    """A pass that pops a request and finds no instance for it pushes it back; so does a
    retry after a failed attempt. Neither may count twice against its user."""
    policy = FairSharePolicy()
    req = make_request_info("r", prompt_tokens=100, max_tokens=50, user_id="u")
    policy.push(req)
    assert policy.pop(SNAP) == req
    policy.push(req)
    assert policy.counters() == {"u": 0.0}
    assert policy.pop(SNAP) == req
    assert policy.counters() == {"u": 200.0}


@pytest.mark.parametrize("seed", range(5))
def test_requests_put_back_after_a_pass_leave_every_user_as_before(seed: int) -> None:
    """A dispatch pass may pop several requests, some of one user, and put them all back
    (in the order it popped them): counters, turns and the order to come are as before."""
    rng = random.Random(seed)
    policy = FairSharePolicy()
    policy.push(make_request_info("x0", user_id="x"))
    assert policy.pop(SNAP) is not None  # a start before: turns are not all 0
    for n in range(12):
        user = rng.choice("abc")
        policy.push(
            make_request_info(
                f"{user}{n}", arrival=n, prompt_tokens=rng.randint(1, 500), user_id=user
            )
        )
    before = ({u: f.counter for u, f in policy._flows.items()},
              {u: f.served for u, f in policy._flows.items()})  # fmt: skip
    popped = [policy.pop(SNAP) for _ in range(rng.randint(2, 8))]
    for req in popped:
        assert req is not None
        policy.push(req)
    after = ({u: f.counter for u, f in policy._flows.items()},
             {u: f.served for u, f in policy._flows.items()})  # fmt: skip
    assert after == before
    assert not policy._started or set(policy._started) == {"x0"}


def test_a_returning_user_gets_no_credit_for_its_time_away() -> None:
    """An idle user rejoins at the lowest counter of those waiting, not at its old one
    (which would let it run alone until it caught up)."""
    policy = FairSharePolicy()
    policy.push(make_request_info("a0", prompt_tokens=10, max_tokens=10, user_id="a"))
    assert pop_all(policy) == ["a0"]  # a's counter: 30
    for n in range(5):
        policy.push(
            make_request_info(f"b{n}", arrival=n, prompt_tokens=100, max_tokens=50, user_id="b")
        )
    assert policy.pop(SNAP) is not None  # b: 30 (it came when a had started, at 30) + 200
    assert policy.counters()["b"] == 230.0
    for n in (1, 2):
        policy.push(
            make_request_info(f"a{n}", arrival=8 + n, prompt_tokens=10, max_tokens=10, user_id="a")
        )
    assert policy.counters()["a"] == 230.0  # lifted to b's, the only one waiting, not 30
    # b1 wins the tie (a joined after it waited), then a1 (230) before a2 (260); from
    # 30, a would have run both of its requests first
    assert pop_all(policy)[:3] == ["b1", "a1", "a2"]


def test_a_returning_user_keeps_the_work_it_was_charged_for() -> None:
    """Lifting never lowers a counter: a user that just had a long request served waits
    behind one that was waiting meanwhile, even when its queue ran empty and it comes back."""
    policy = FairSharePolicy()
    policy.push(make_request_info("big", prompt_tokens=5000, max_tokens=10, user_id="a"))
    for n in range(3):
        policy.push(
            make_request_info(f"b{n}", arrival=1 + n, prompt_tokens=10, max_tokens=10, user_id="b")
        )
    assert policy.pop(SNAP) is not None  # big, the oldest at equal counters: a at 5,020
    policy.push(make_request_info("a1", arrival=5, prompt_tokens=10, max_tokens=10, user_id="a"))
    assert policy.counters() == {"a": 5020.0, "b": 0.0}
    assert pop_all(policy) == ["b0", "b1", "b2", "a1"]


def test_a_user_alone_is_not_lifted_above_its_own_corrected_counter() -> None:
    """When nobody else waits, a user rejoins where the last started request's user is
    now, corrections included (its own: a correction is not undone)."""
    policy = FairSharePolicy()
    policy.push(make_request_info("r", prompt_tokens=100, max_tokens=500, user_id="u"))
    assert policy.pop(SNAP) is not None  # charged 100 + 2 x 256
    policy.on_complete(make_completion_record("r", completion_tokens=0))
    assert policy.counters() == {"u": 100.0}
    policy.push(make_request_info("s", prompt_tokens=1, max_tokens=1, user_id="u"))
    assert policy.counters() == {"u": 100.0}


def test_requests_without_a_user_share_one_anonymous_user() -> None:
    policy = FairSharePolicy()
    for n in range(3):
        policy.push(make_request_info(f"anon{n}", arrival=n))
    policy.push(make_request_info("named", arrival=9.0, user_id="u"))
    assert pop_all(policy) == ["anon0", "named", "anon1", "anon2"]
    assert set(policy.counters()) == {ANONYMOUS, "u"}


def test_a_user_whose_model_cannot_start_does_not_hold_back_the_others() -> None:
    policy = FairSharePolicy()
    policy.push(make_request_info("other-model", model="other", arrival=0.0, user_id="a"))
    policy.push(make_request_info("ours", arrival=1.0, user_id="b"))
    assert pop_all(policy, make_snapshot([make_instance_view("i0")], now=2.0)) == ["ours"]
    assert len(policy) == 1


def test_drain_returns_every_queued_request_and_leaves_no_user_waiting() -> None:
    policy = FairSharePolicy()
    for n in range(2):
        policy.push(make_request_info(f"a{n}", arrival=n, user_id="a"))
        policy.push(make_request_info(f"b{n}", arrival=n + 0.5, user_id="b"))
    assert {r.request_id for r in policy.drain()} == {"a0", "a1", "b0", "b1"}
    assert len(policy) == 0
    assert policy.describe()["state"]["users_waiting"] == 0  # type: ignore[index]
    policy.push(make_request_info("again", user_id="a"))
    assert pop_all(policy) == ["again"]


@pytest.mark.parametrize("parked", [False, True])
def test_users_with_nothing_queued_or_running_are_forgotten(parked: bool) -> None:
    """Ten thousand one-off users leave a bounded number of counters behind, also while a
    request waits on a model with no free instance (its user's low counter does not hold
    the others)."""
    policy = FairSharePolicy()
    if parked:
        policy.push(make_request_info("parked", model="other", user_id="x"))
    for n in range(10_000):
        req = make_request_info(f"r{n}", arrival=float(n), user_id=f"user{n}")
        policy.push(req)
        assert policy.pop(SNAP) == req
        policy.on_complete(make_completion_record(f"r{n}", completion_tokens=50))
    assert len(policy.counters()) <= 130


@pytest.mark.parametrize("field", ["prompt_weight", "output_weight", "default_output_tokens"])
def test_weights_and_the_default_output_must_be_positive(field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        FairSharePolicy.Params(**{field: 0.0})  # type: ignore[arg-type]


def test_a_user_of_weight_two_is_charged_half_and_starts_twice_as_often() -> None:
    weights = {"gold": 2.0}
    policy = FairSharePolicy(FairSharePolicy.Params(user_weights=weights))
    for n in range(6):
        policy.push(make_request_info(f"g{n}", arrival=n, prompt_tokens=100, user_id="gold"))
    for n in range(6):
        policy.push(make_request_info(f"b{n}", arrival=n, prompt_tokens=100, user_id="base"))
    order = pop_all(policy)
    assert order[:6] == ["g0", "b0", "g1", "b1", "g2", "g3"]
    # each charged prompt 100 + 2 × expected 50 (max_tokens), gold's divided by 2
    counters = policy.counters()
    assert counters["gold"] == pytest.approx(6 * 200 / 2)
    assert counters["base"] == pytest.approx(6 * 200)
    # the end corrects by the same weight
    policy.on_complete(make_completion_record("g0", completion_tokens=6))
    assert policy.counters()["gold"] == pytest.approx(6 * 200 / 2 - 2 * 44 / 2)
    weights["gold"] = 9.0  # the params hold a copy
    assert policy.params.user_weights == {"gold": 2.0}


def test_the_anonymous_user_can_be_weighted_too() -> None:
    policy = FairSharePolicy(FairSharePolicy.Params(user_weights={ANONYMOUS: 0.5}))
    policy.push(make_request_info("anon", prompt_tokens=100))
    assert policy.pop(SNAP) is not None
    assert policy.counters() == {ANONYMOUS: pytest.approx((100 + 2 * 50) / 0.5)}


@pytest.mark.parametrize(
    ("weights", "said"),
    [
        ({"a": 0}, "'a': must be a finite number > 0, got 0"),
        (
            {"a": -1.0, "b": "x"},
            "'a': must be a finite number > 0, got -1.0; 'b': must be a number",
        ),
        ({"a": float("inf")}, "'a': must be a finite number > 0, got inf"),
        ({"a": True}, "'a': must be a number, got True"),
        ([1, 2], "must be a table of names to numbers"),
    ],
)
def test_user_weights_are_positive_numbers_by_name(weights: object, said: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(said)) as info:
        FairSharePolicy.Params(user_weights=weights)  # type: ignore[arg-type]
    assert info.value.key == "user_weights"


def test_through_the_control_plane_a_light_user_waits_behind_one_queued_heavy_request() -> None:
    """One instance that runs one request at a time; a heavy user's five requests queue,
    then a light user's one: under ``fair`` it joins at the heavy user's counter, and
    starts after the heavy request running and the one it ties with, not after all five
    (under ``fifo``, after all five)."""

    async def main(policy: str) -> list[str]:
        cp = ControlPlaneManager(scheduling_policy=policy, mode="simulated")
        cp.register_instance(make_instance("i0", max_concurrent_requests=1))
        ended: list[str] = []

        async def wait(request_id: str) -> RequestStatus:
            result = await cp.wait_for_result(request_id)
            ended.append(request_id)
            return result.status

        async with cp:
            ids = [
                await cp.submit_request(make_metadata(f"heavy{n}", user_id="heavy"))
                for n in range(5)
            ]
            await asyncio.sleep(0.001)
            ids.append(await cp.submit_request(make_metadata("light", user_id="light")))
            statuses = await asyncio.gather(*(wait(rid) for rid in ids))
        assert statuses == [RequestStatus.COMPLETED] * 6
        return ended

    assert run_virtual(main("fair"))[:3] == ["heavy0", "heavy1", "light"]
    assert run_virtual(main("fifo"))[-1] == "light"


def test_a_newcomer_joins_at_the_lowest_waiting_counter_not_at_the_last_started() -> None:
    """Right after a costly start, a new user joins where the users still waiting are,
    not at the heavy counter of the user just served."""
    policy = FairSharePolicy()
    policy.push(make_request_info("a-big", prompt_tokens=8000, max_tokens=10, user_id="a"))
    for n in range(5):
        policy.push(
            make_request_info(f"b{n}", arrival=1 + n, prompt_tokens=10, max_tokens=10, user_id="b")
        )
    assert policy.pop(SNAP) is not None  # a-big: a at 8,020, b waits at 0
    policy.push(make_request_info("new", arrival=9, prompt_tokens=10, max_tokens=10, user_id="n"))
    assert policy.counters()["n"] == 0.0
    assert pop_all(policy)[:4] == ["b0", "new", "b1", "b2"]


def test_a_stream_of_newcomers_cannot_keep_a_waiting_user_waiting() -> None:
    """Each newcomer joins at the waiting user's counter, after it: the waiting user's
    request starts next."""
    policy = FairSharePolicy()
    policy.push(make_request_info("w0", arrival=0, user_id="w"))
    policy.push(make_request_info("w1", arrival=0.5, user_id="w"))
    assert policy.pop(SNAP) is not None  # w0
    for n in range(20):
        policy.push(make_request_info(f"n{n}", arrival=1 + n, user_id=f"new{n}"))
        started = policy.pop(SNAP)
        assert started is not None
        if started.request_id == "w1":
            break
    else:
        pytest.fail("w1 never started")
    assert n <= 1


def test_a_user_waiting_on_a_model_that_cannot_start_does_not_set_the_level() -> None:
    """A request parked on a model with no free instance does not hold newcomers at its
    user's counter (they would get credit for all the work done since); its user keeps
    its counter, for that model's instances."""
    policy = FairSharePolicy()
    up = make_snapshot(1, now=1.0)  # serves MODEL only
    policy.push(make_request_info("parked", model="other", arrival=0, user_id="x"))
    for n in range(10):
        policy.push(make_request_info(f"b{n}", arrival=1 + n, prompt_tokens=100, user_id="b"))
    for _ in range(9):
        assert policy.pop(up) is not None  # b runs alone: b at 9 x 200 = 1,800
    policy.push(make_request_info("y0", arrival=20, user_id="y"))
    assert policy.counters()["y"] == 1800.0  # b's, the only startable user waiting: not x's 0
    assert policy.counters()["x"] == 0.0
    both = make_snapshot(
        [make_instance_view("i0"), make_instance_view("i1", model="other")], now=2.0
    )
    assert pop_all(policy, both) == ["parked", "b9", "y0"]


def test_only_completed_requests_teach_a_users_expected_output() -> None:
    policy = FairSharePolicy()
    policy.push(make_request_info("r", prompt_tokens=10, max_tokens=500, user_id="u"))
    assert policy.pop(SNAP) is not None  # expected 256
    policy.on_complete(
        make_completion_record("r", status=RequestStatus.CANCELLED, completion_tokens=0)
    )
    assert policy.counters() == {"u": 10.0}  # corrected to the tokens it generated: none
    policy.push(make_request_info("s", prompt_tokens=10, max_tokens=500, user_id="u"))
    assert policy.pop(SNAP) is not None
    assert policy.counters() == {"u": 20.0 + 2 * 256}  # still the default expectation


def test_a_parked_request_earns_its_user_no_credit_for_its_other_requests() -> None:
    """A user whose only queued request waits on a model with no free instance joins
    like a newcomer when it sends a request the fleet can start."""
    policy = FairSharePolicy()
    policy.push(make_request_info("parked", model="other", arrival=0, user_id="x"))
    for n in range(6):
        policy.push(make_request_info(f"b{n}", arrival=1 + n, prompt_tokens=100, user_id="b"))
    for _ in range(4):
        assert policy.pop(SNAP) is not None  # b at 800
    policy.push(make_request_info("x1", arrival=10, prompt_tokens=100, user_id="x"))
    assert policy.counters()["x"] == 800.0  # not 0
    assert pop_all(policy) == ["b4", "x1", "b5"]


def test_a_user_with_max_queued_per_user_queued_is_refused_the_others_not() -> None:
    policy = FairSharePolicy(FairSharePolicy.Params(max_queued_per_user=2))
    snap = make_snapshot(1, now=100.0)
    for n in range(2):
        req = make_request_info(f"h{n}", arrival=n, user_id="heavy")
        assert policy.admit(req, snap).admitted
        policy.push(req)
    verdict = policy.admit(make_request_info("h2", arrival=3, user_id="heavy"), snap)
    assert not verdict.admitted
    assert verdict.kind == "user_queue_full"
    assert verdict.reason == "user 'heavy' has 2 requests queued (max_queued_per_user 2)"
    assert verdict.retry_after_s is not None and verdict.retry_after_s > 0
    assert policy.admit(make_request_info("l0", user_id="light"), snap).admitted
    assert policy.pop(SNAP) is not None  # one of heavy's starts: room for one more
    assert policy.admit(make_request_info("h2", arrival=3, user_id="heavy"), snap).admitted
    unbounded = FairSharePolicy()
    for n in range(50):
        unbounded.push(make_request_info(f"u{n}", user_id="heavy"))
    assert unbounded.admit(make_request_info("u50", user_id="heavy"), snap).admitted


def test_a_users_queued_batch_work_does_not_bar_its_urgent_request() -> None:
    """``max_queued_per_user`` counts the requests as urgent as the new one or more."""
    policy = FairSharePolicy(FairSharePolicy.Params(max_queued_per_user=2))
    snap = make_snapshot(1, now=100.0)
    low = RequestPriority.BACKGROUND
    for n in range(2):
        policy.push(make_request_info(f"b{n}", arrival=n, user_id="u", priority=low))
    assert not policy.admit(make_request_info("b2", user_id="u", priority=low), snap).admitted
    urgent = make_request_info("c0", arrival=5, user_id="u", priority=RequestPriority.CRITICAL)
    assert policy.admit(urgent, snap).admitted
    policy.push(urgent)
    policy.push(make_request_info("c1", arrival=6, user_id="u", priority=RequestPriority.CRITICAL))
    verdict = policy.admit(
        make_request_info("c2", user_id="u", priority=RequestPriority.CRITICAL), snap
    )
    assert verdict.reason == (
        "user 'u' has 2 requests queued at priority CRITICAL or above (max_queued_per_user 2)"
    )
    assert policy.remove("c0") is not None  # a cancel frees its level's room
    assert policy.admit(
        make_request_info("c2", user_id="u", priority=RequestPriority.HIGH), snap
    ).admitted
    assert pop_all(policy) == ["c1", "b0", "b1"]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_max_queued_per_user_is_a_count(bad: object) -> None:
    with pytest.raises(ConfigError, match="max_queued_per_user"):
        FairSharePolicy.Params(max_queued_per_user=bad)  # type: ignore[arg-type]


def test_through_the_control_plane_a_flooding_user_is_refused_before_the_queue_fills() -> None:
    """One slot; a queue of 6; a user bounded to 3 queued: its fourth waiting request gets
    a QueueFullError naming it, and a light user's request is still taken and served."""

    async def main() -> None:
        params = {"max_queued_per_user": 3}
        cp = ControlPlaneManager(
            scheduling_policy="fair", policy_params=params, mode="simulated", max_queue_size=6
        )
        cp.register_instance(make_instance("i0", max_concurrent_requests=1))
        async with cp:
            ids = [await cp.submit_request(make_metadata("h0", user_id="heavy", max_tokens=50))]
            await asyncio.sleep(0.001)  # it runs; three more queue
            for n in range(1, 4):
                ids.append(await cp.submit_request(make_metadata(f"h{n}", user_id="heavy")))
            with pytest.raises(QueueFullError, match="user 'heavy' has 3 requests queued"):
                await cp.submit_request(make_metadata("h4", user_id="heavy"))
            ids.append(await cp.submit_request(make_metadata("light", user_id="light")))
            results = [await cp.wait_for_result(rid) for rid in ids]
        assert [r.status for r in results] == [RequestStatus.COMPLETED] * 5
        rejected = cp.metrics.rejected.labels(reason="user_queue_full", model=MODEL)
        assert rejected._value.get() == 1.0

    run_virtual(main())


def test_a_newcomer_joins_at_its_models_level_not_a_smaller_models_lagging_one() -> None:
    """Counters are compared among one model's users: z's on a one-slot model lag h's on
    a four-slot one, and a newcomer to h's model joining at z's would start ahead of h's
    backlog until it caught up."""

    def snap(other_free: bool, now: float) -> ClusterSnapshot:
        views = [
            make_instance_view("i0", max_concurrency=4, in_flight=3),
            make_instance_view(
                "j0", model="other", max_concurrency=1, in_flight=0 if other_free else 1
            ),
        ]
        return make_snapshot(views, now=now)

    policy = FairSharePolicy()
    for n in range(100):
        policy.push(make_request_info(f"h{n}", arrival=n, prompt_tokens=100, user_id="h"))
        policy.push(
            make_request_info(f"z{n}", model="other", arrival=n, prompt_tokens=100, user_id="z")
        )
    for k in range(21):  # 'other' has a free slot every fifth decision, and at the last
        assert policy.pop(snap(other_free=k % 5 == 0, now=k)) is not None
    counters = policy.counters()
    assert counters["z"] < counters["h"]
    for n in range(4):
        policy.push(make_request_info(f"n{n}", arrival=200 + n, prompt_tokens=100, user_id="n"))
    assert policy.counters()["n"] == counters["h"]
    order = [policy.pop(snap(other_free=False, now=300 + k)) for k in range(4)]
    assert [r.request_id[0] for r in order if r is not None] == ["h", "n", "h", "n"]


def test_a_request_pushed_straight_back_keeps_its_users_place() -> None:
    """The dispatcher takes a queued request out and pushes it back changed (to run where
    it was kept off for its context): its user does not join again behind the others."""
    policy = FairSharePolicy()
    policy.push(make_request_info("a0", arrival=0, prompt_tokens=100, user_id="a"))
    for n in range(4):
        policy.push(make_request_info(f"b{n}", arrival=1 + n, prompt_tokens=100, user_id="b"))
    assert [policy.pop(SNAP) is not None for _ in range(2)] == [True, True]  # a0, b0
    policy.push(make_request_info("a1", arrival=10, prompt_tokens=100, user_id="a"))
    assert policy.pop(SNAP) is not None  # b1: b at 400, a waits at 200
    taken = policy.remove("a1")
    assert taken is not None
    policy.push(dataclasses.replace(taken, excluded_instances=frozenset({"i9"})))
    assert policy.counters() == {"a": 200.0, "b": 400.0}
    assert pop_all(policy) == ["a1", "b2", "b3"]


def test_a_users_retry_hint_counts_the_starts_owed_to_the_users_below_it() -> None:
    """``Retry-After`` for ``user_queue_full``: the users waiting below the user's counter
    start first, so its hint grows with them (the fleet's time to start that many)."""
    snap = make_snapshot(1, now=100.0)
    params = FairSharePolicy.Params(max_queued_per_user=2, user_weights={"heavy": 0.1})

    def hint(light_users: int) -> float:
        policy = FairSharePolicy(params)
        for n in range(3):
            policy.push(make_request_info(f"h{n}", arrival=n, user_id="heavy"))
        for u in range(light_users):
            for n in range(3):
                policy.push(make_request_info(f"l{u}-{n}", arrival=5, user_id=f"light{u}"))
        assert policy.pop(snap).request_id == "h0"  # type: ignore[union-attr]
        # heavy at 10 x 200 = 2,000; a light request is expected to cost 512 + 2 x 256
        verdict = policy.admit(make_request_info("h3", user_id="heavy"), snap)
        assert verdict.kind == "user_queue_full" and verdict.retry_after_s is not None
        return verdict.retry_after_s

    # 1 start alone; 1 + 2 x 2 behind them
    assert hint(0) == estimate_drain_s(1, snap)
    assert hint(2) == estimate_drain_s(5, snap) > estimate_drain_s(1, snap)  # type: ignore[operator]


def test_a_cancelled_requests_id_used_again_by_another_user_is_a_join() -> None:
    """Only the same request of the same user, pushed straight back, skips the join: a
    client may reuse an id (``x-request-id``) once its request was cancelled."""
    policy = FairSharePolicy()
    for n in range(3):
        policy.push(make_request_info(f"a{n}", arrival=n, prompt_tokens=100, user_id="a"))
    assert policy.pop(SNAP) is not None  # a at 200
    policy.push(make_request_info("x", arrival=5, user_id="a"))
    assert policy.remove("x") is not None  # cancelled
    policy.push(make_request_info("x", arrival=6, prompt_tokens=100, user_id="b"))
    assert policy.counters()["b"] == 200.0  # joined at a's level, not left at -inf
    assert pop_all(policy) == ["a1", "x", "a2"]


def test_a_user_waiting_on_one_model_joins_another_at_its_level() -> None:
    """A request the fleet could start on model A does not spare its user the join when
    it sends to model B: it would carry A's lower counter onto B as credit."""
    policy = FairSharePolicy()
    both = make_snapshot(
        [make_instance_view("i0", max_concurrency=1), make_instance_view("j0", model="other")]
    )
    policy.push(make_request_info("w0", model="other", prompt_tokens=100, user_id="w"))
    assert policy.pop(both) is not None  # w at 200 on other
    for n in range(4):
        policy.push(make_request_info(f"x{n}", arrival=n, prompt_tokens=100, user_id="x"))
    for _ in range(2):
        assert policy.pop(both) is not None  # x at 600 on MODEL
    policy.push(make_request_info("u0", model="other", arrival=5, user_id="u"))
    assert policy.counters()["u"] == 200.0  # other's level: w's
    assert policy.peek(both) is not None  # a decision: u's request could start on other
    policy.push(make_request_info("u1", arrival=6, prompt_tokens=100, user_id="u"))
    assert policy.counters()["u"] == 600.0  # MODEL's level: x's


class _CheckedFair(FairSharePolicy):
    """``fair`` whose every choice from its heaps is checked against comparing the first
    startable request of every lane (what ``fair`` did before it kept heaps), and whose
    heaps against the queue: one current item per lane, at its head's rank."""

    def _select(self, snap: ClusterSnapshot) -> QueueEntry | None:
        got = super()._select(snap)
        cands = self.queue.candidates(snap)
        ref = min(cands, key=lambda e: self._rank(e, snap.now), default=None)
        assert got is ref, (got, ref)
        current = {
            (model, item[5]): item
            for model, heap in self._tops.items()
            for item in heap
            if self._versions.get((model, item[5])) == item[6]
        }
        lanes = {(e.req.model, e.lane) for e in self.queue.entries()}
        assert set(current) == lanes
        for (model, lane), item in current.items():
            head = self.queue.head(model, lane)
            assert head is not None and item[:5] == self._rank(head, snap.now)
        return got


@pytest.mark.parametrize("seed", range(12))
def test_the_heaps_choose_as_comparing_every_lane_would(seed: int) -> None:
    rng = random.Random(seed)
    models = (MODEL, "other")
    policy = _CheckedFair(FairSharePolicy.Params(user_weights={"u0": 2.0}))
    started: list[RequestInfo] = []
    now, n = 0.0, 0
    for _ in range(600):
        now += 0.01
        op = rng.random()
        if op < 0.45:
            policy.push(make_request_info(
                f"r{n}", model=rng.choice(models), arrival=now,
                prompt_tokens=rng.randrange(10, 500), max_tokens=rng.randrange(1, 300),
                user_id=f"u{rng.randrange(12)}", priority=RequestPriority(rng.randrange(5)),
                excluded_instances=frozenset({"i1"}) if rng.random() < 0.05 else frozenset(),
            ))  # fmt: skip
            n += 1
        elif op < 0.8:
            views = [
                make_instance_view(f"i{k}", model=m, max_concurrency=8,
                                   in_flight=0 if rng.random() < 0.7 else 8)
                for k, m in enumerate(models)
            ]  # fmt: skip
            if (req := policy.pop(make_snapshot(views, now=now))) is not None:
                started.append(req)
        elif op < 0.9 and started:
            req = started.pop(rng.randrange(len(started)))
            if rng.random() < 0.2:
                policy.push(req)  # put back
            else:
                tokens = rng.randrange(0, 300)
                policy.on_complete(make_completion_record(req.request_id, completion_tokens=tokens))
        else:
            policy.remove(f"r{rng.randrange(max(n, 1))}")


def test_a_user_who_cannot_start_sets_no_newcomers_level() -> None:
    """x's request may run only on the full i1 (a retry's, a LoRA adapter's): it keeps
    the lowest counter, but newcomers join at the level of the users who can start."""
    policy = FairSharePolicy()
    snap = make_snapshot([
        make_instance_view("i0", max_concurrency=100),
        make_instance_view("i1", max_concurrency=1, in_flight=1),
    ])  # fmt: skip
    policy.push(make_request_info("x0", user_id="x", excluded_instances=frozenset({"i0"})))
    for user in ("w1", "w2"):
        for n in range(6):
            policy.push(
                make_request_info(f"{user}-{n}", arrival=1 + n, prompt_tokens=100, user_id=user)
            )
    assert [policy.pop(snap).request_id for _ in range(4)] == ["w1-0", "w2-0", "w1-1", "w2-1"]  # type: ignore[union-attr]
    for k in range(2):
        policy.push(make_request_info(f"n{k}", arrival=10 + k, prompt_tokens=100, user_id=f"n{k}"))
    counters = policy.counters()
    assert (counters["x"], counters["n0"], counters["n1"]) == (0.0, 400.0, 400.0)
    assert [policy.pop(snap).request_id for _ in range(4)] == ["w1-2", "w2-2", "n0", "n1"]  # type: ignore[union-attr]
    # once i1 has room, x's request is first (its counter is the lowest)
    free = make_snapshot([make_instance_view("i0"), make_instance_view("i1")])
    assert policy.pop(free).request_id == "x0"  # type: ignore[union-attr]


def test_a_lane_whose_head_cannot_start_offers_its_next_request_at_its_place() -> None:
    policy = FairSharePolicy()
    snap = make_snapshot(
        [make_instance_view("i0"), make_instance_view("i1", max_concurrency=1, in_flight=1)]
    )
    policy.push(make_request_info("x0", user_id="x", excluded_instances=frozenset({"i0"})))
    policy.push(make_request_info("x1", arrival=1, user_id="x"))
    policy.push(make_request_info("y0", arrival=2, user_id="y"))
    assert pop_all(policy, snap) == ["x1", "y0"]
