"""What a cluster simulation reports (``sage_llm.sim.cluster_results``): decision statistics,
per-instance usage and the result's figures over the fleet."""

from __future__ import annotations

import pytest

from sage_llm.bench.stats import summarize
from sage_llm.sim.cluster_results import ClusterResult, InstanceUsage, decision_stats


def _usage(
    instance_id: str, *, utilization: float, max_in_flight: int, mean_in_flight: float
) -> InstanceUsage:
    return InstanceUsage(
        instance_id=instance_id,
        busy_s=10.0 * utilization,
        utilization=utilization,
        steps=100,
        completed=10,
        tokens_generated=1000,
        max_in_flight=max_in_flight,
        mean_in_flight=mean_in_flight,
        max_concurrency=8,
        prefix_hit_rate=0.0,
        preemptions=0,
    )


def test_decision_stats_of_a_known_sequence() -> None:
    stats = decision_stats([i * 1e-6 for i in range(1, 101)], sampled=40, candidates=300)
    assert (stats.count, stats.sampled, stats.mean_candidates) == (100, 40, 3.0)
    assert stats.mean_us == pytest.approx(50.5)
    assert stats.p50_us == pytest.approx(50.5)
    assert stats.p99_us == pytest.approx(99.01)
    assert stats.max_us == pytest.approx(100.0)
    assert decision_stats([], sampled=0, candidates=0).p99_us == 0.0


def test_load_is_the_time_averaged_share_of_the_bound() -> None:
    usage = _usage("sim-0", utilization=0.5, max_in_flight=6, mean_in_flight=2.0)
    assert usage.load == 0.25  # 2 of 8 slots on average (the high-water mark: 6 of 8)


def _result(instances: list[InstanceUsage]) -> ClusterResult:
    return ClusterResult(
        summary=summarize([], 10.0),
        measurements=[],
        instances=instances,
        prefix_hit_rate=0.0,
        decisions=decision_stats([], sampled=0, candidates=0),
        sim_time_s=10.0,
        wall_s=1.0,
        cpu_s=1.0,
        events=0,
        steps=300,
        rejected=0,
    )


def test_a_result_without_instances_has_zero_fleet_figures() -> None:
    """A result built without instance rows (a caller's own) reads as an idle fleet."""
    result = _result([])
    assert (result.mean_utilization, result.mean_load) == (0.0, 0.0)
    data = result.to_dict(per_instance=True)
    assert data["utilization"] == {"mean": 0.0, "min": 0.0, "max": 0.0}
    assert (data["max_in_flight"], data["mean_load"], data["instances"]) == (0, 0.0, [])


def test_the_fleet_figures_of_an_uneven_fleet() -> None:
    instances = [
        _usage("sim-0", utilization=0.2, max_in_flight=3, mean_in_flight=1.0),
        _usage("sim-1", utilization=0.9, max_in_flight=7, mean_in_flight=4.0),
        _usage("sim-2", utilization=0.0, max_in_flight=0, mean_in_flight=0.0),
    ]
    result = _result(instances)
    assert result.mean_load == pytest.approx((1.0 + 4.0 + 0.0) / 8 / 3)
    data = result.to_dict()
    assert data["utilization"] == {"mean": pytest.approx(1.1 / 3), "min": 0.0, "max": 0.9}
    assert data["max_in_flight"] == 7
    assert data["mean_load"] == result.mean_load
