"""The simulator's control plane (``sage_llm.sim.cluster_control``): intake, dispatch and
completion accounting, one request at a time."""

from __future__ import annotations

from dataclasses import replace

import pytest

from sage_llm.bench.workloads import WorkloadRequest
from sage_llm.control_plane.instances import batch_bucket
from sage_llm.sim.cluster import ClusterSimulator, make_fleet


def _request(
    request_id: str, at: float, *, prompt: int = 64, max_tokens: int = 32
) -> WorkloadRequest:
    return WorkloadRequest(request_id, at, list(range(1, prompt + 1)), prompt, max_tokens)


def _simulator(n: int = 1, *, max_concurrency: int = 100) -> ClusterSimulator:
    fleet = make_fleet(n, max_concurrency=max_concurrency)
    return ClusterSimulator(fleet, policy="fifo", routing="load_balanced")


def test_a_second_request_with_an_id_in_progress_is_refused_as_a_conflict() -> None:
    result = _simulator().run([_request("dup", 0.0, max_tokens=200), _request("dup", 0.01)])
    assert len(result.measurements) == 2 and result.rejected == 1
    refused, served = sorted(result.measurements, key=lambda m: m.ok)
    assert refused.error == "ConflictError: request 'dup' is already in progress"
    assert refused.arrival_s == 0.01 and served.ok and served.output_tokens == 200


@pytest.mark.parametrize("token_times", [False, True])
def test_a_request_past_the_context_runs_cut_and_one_past_it_alone_is_refused(
    token_times: bool,
) -> None:
    """As SimEngine and vLLM 0.32: max_tokens cut to what the context holds after the
    prompt; refused for max_tokens above the context, or a prompt that fills it, in the
    manager's words (tests/sim/test_cluster.py compares them with the control plane's); a
    refusal is the request's fault, not the instance's."""
    fleet = make_fleet(1, max_concurrency=100)
    sim = ClusterSimulator(fleet, policy="fifo", routing="load_balanced",
                           record_token_times=token_times)  # fmt: skip
    limit = sim.fleet.slots[0].max_model_len
    fits = _request("fits", 0.0, prompt=limit - 16, max_tokens=16)
    cut = _request("cut", 1.0, prompt=limit - 15, max_tokens=16)
    over = _request("over", 2.0, prompt=8, max_tokens=limit + 1)
    full = _request("full", 3.0, prompt=limit, max_tokens=1)
    by_id = {m.request_id: m for m in sim.run([fits, cut, over, full]).measurements}
    assert by_id["fits"].ok and by_id["fits"].output_tokens == 16
    assert by_id["cut"].ok and by_id["cut"].output_tokens == 15
    refused = "EngineRequestRejectedError: engine sim-0: rejected the request: "
    assert by_id["over"].error == (
        f"{refused}max_tokens={limit + 1} cannot be greater than "
        f"max_model_len={limit}. Please request fewer output tokens. "
        f"(parameter=max_tokens, value={limit + 1})"
    )
    assert by_id["full"].error == (
        f"{refused}max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)"
    )
    state = sim.fleet.slots[0].state
    assert (state.failed_requests, state.failed_calls, state.completed) == (2, 0, 2)


def test_max_in_flight_is_the_high_water_mark() -> None:
    lone = _simulator(3).run([_request("r0", 0.0)])
    assert sorted(u.max_in_flight for u in lone.instances) == [0, 0, 1]
    burst = [_request(f"r{i}", 0.0) for i in range(10)]
    saturated = _simulator(2, max_concurrency=3).run(burst)
    assert [u.max_in_flight for u in saturated.instances] == [3, 3]


def test_the_registry_learns_the_tpot_a_lone_request_measured() -> None:
    sim = _simulator()
    (m,) = sim.run([_request("r0", 0.0, max_tokens=5)]).measurements
    assert m.ok and m.first_token_s is not None and m.output_tokens == 5
    state = sim.fleet.slots[0].state
    assert state.tpot_samples == 1
    assert state.est_tpot_s == pytest.approx((m.end_s - m.first_token_s) / 4)


def test_the_registry_learns_the_tpot_of_the_batch_a_request_ran_in() -> None:
    """As the dispatcher does: the batch is the larger of the instance's in-flight counts
    when the request started and when it ended (itself included). A lone request teaches
    batch 1. Three started together on one instance, the shortest first: the first ends
    beside the other two (3), the second started second and ends beside the third (2),
    the third started third (3); none teaches batch 1."""
    sim = _simulator()
    sim.run([_request("r0", 0.0, max_tokens=5)])
    state = sim.fleet.slots[0].state
    assert state.tpot_batch_samples[batch_bucket(1)] == 1
    assert state.tpot_at(1)[0] == pytest.approx(state.est_tpot_s) and state.tpot_at(1)[1]
    burst = _simulator(1, max_concurrency=3)
    burst.run([_request(f"b{i}", 0.0, max_tokens=5 + 10 * i) for i in range(3)])
    state = burst.fleet.slots[0].state
    assert state.tpot_batch_samples[:3] == [0, 1, 2]
    assert state.tpot_at(1)[1] is False  # nothing learnt alone: a bound from above
    assert state.tpot_at(3)[1] is True


def test_a_request_its_deadline_cannot_meet_is_served_demoted_as_the_manager_does() -> None:
    """``slo_aware`` demotes at admission a request whose deadline no instance can meet:
    it is still served to its end (not refused), behind the requests that can meet theirs."""
    fleet = make_fleet(1, max_concurrency=100)
    sim = ClusterSimulator(fleet, policy="slo_aware", routing="load_balanced")
    hopeless = replace(_request("hopeless", 0.0, prompt=2000, max_tokens=64), slo_e2e_s=1e-4)
    easy = _request("easy", 0.0, max_tokens=8)
    result = sim.run([hopeless, easy])
    by_id = {m.request_id: m for m in result.measurements}
    assert result.rejected == 0
    assert by_id["hopeless"].ok and by_id["hopeless"].output_tokens == 64
    assert by_id["easy"].ok and by_id["easy"].output_tokens == 8
    strict = ClusterSimulator(
        make_fleet(1, max_concurrency=100), policy="slo_aware", routing="load_balanced",
        policy_params={"infeasible_action": "reject"},
    )  # fmt: skip
    refused = {m.request_id: m for m in strict.run([hopeless, easy]).measurements}
    assert not refused["hopeless"].ok and refused["easy"].ok  # the deadline was out of reach
