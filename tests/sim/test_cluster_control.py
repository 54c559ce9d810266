"""The simulator's control plane (``sage_llm.sim.cluster_control``): intake, dispatch and
completion accounting, one request at a time."""

from __future__ import annotations

import pytest

from sage_llm.bench.workloads import WorkloadRequest
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


def test_a_request_filling_the_context_exactly_runs_and_one_token_more_is_refused() -> None:
    sim = _simulator()
    limit = sim.fleet.slots[0].max_model_len
    fits = _request("fits", 0.0, prompt=limit - 16, max_tokens=16)
    over = _request("over", 1.0, prompt=limit - 15, max_tokens=16)
    by_id = {m.request_id: m for m in sim.run([fits, over]).measurements}
    assert by_id["fits"].ok and by_id["fits"].output_tokens == 16
    assert not by_id["over"].ok
    assert by_id["over"].error == (
        f"InvalidRequestError: this model's maximum context length is {limit} tokens; "
        f"you requested {limit + 1} ({limit - 15} in the prompt, 16 in the completion)"
    )


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
