"""What a cluster simulation run reports (:class:`ClusterResult`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sage_llm.bench.stats import SLO, BenchSummary, RequestMeasurement, measure, summarize
from sage_llm.fastinit import field_filler
from sage_llm.sim.cluster_fleet import InstanceSlot, SimRequest

__all__ = [
    "ClusterResult",
    "DecisionStats",
    "InstanceUsage",
    "build_result",
    "decision_stats",
    "request_measurement",
]


@dataclass(frozen=True, slots=True)
class InstanceUsage:
    """How one instance was used over the run.

    ``utilization`` is the fraction of the simulated time the engine spent in steps (a
    continuously batching engine steps whenever it holds any request, so this is near 1
    under steady load); ``mean_in_flight`` the time-averaged number of requests dispatched
    and not finished, ``max_in_flight`` its high-water mark (never above
    ``max_concurrency``); ``prefix_hit_rate`` the engine's own prefix-cache hit rate
    (cached prompt tokens / prompt tokens looked up). ``role`` is the instance's
    (``general``, ``prefilling``, ``decoding`` or ``hybrid``); ``completed`` counts the PD
    prefill legs it ran with its requests, and ``prefilled_tokens`` those legs' prompt
    tokens.
    """

    instance_id: str
    busy_s: float
    utilization: float
    steps: int
    completed: int
    tokens_generated: int
    max_in_flight: int
    mean_in_flight: float
    max_concurrency: int
    prefix_hit_rate: float
    preemptions: int
    role: str = "general"
    prefilled_tokens: int = 0

    @property
    def load(self) -> float:
        """Time-averaged share of the concurrency bound in use."""
        return self.mean_in_flight / self.max_concurrency

    def to_dict(self) -> dict[str, Any]:
        return {
            "instance_id": self.instance_id,
            "busy_s": self.busy_s,
            "utilization": self.utilization,
            "steps": self.steps,
            "completed": self.completed,
            "tokens_generated": self.tokens_generated,
            "max_in_flight": self.max_in_flight,
            "mean_in_flight": self.mean_in_flight,
            "max_concurrency": self.max_concurrency,
            "prefix_hit_rate": self.prefix_hit_rate,
            "preemptions": self.preemptions,
            "role": self.role,
            "prefilled_tokens": self.prefilled_tokens,
        }


@dataclass(frozen=True, slots=True)
class DecisionStats:
    """Wall-clock cost of the dispatch decisions (snapshot + pop + constrain + route).

    ``sampled`` counts decisions taken on a candidate sample (large fleets);
    ``mean_candidates`` is the mean number of instances in a decision's snapshot.
    """

    count: int
    sampled: int
    mean_candidates: float
    mean_us: float
    p50_us: float
    p99_us: float
    max_us: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "sampled": self.sampled,
            "mean_candidates": self.mean_candidates,
            "mean_us": self.mean_us,
            "p50_us": self.p50_us,
            "p99_us": self.p99_us,
            "max_us": self.max_us,
        }


def decision_stats(seconds: Sequence[float], *, sampled: int, candidates: int) -> DecisionStats:
    """Summary of per-decision wall times (seconds) and snapshot sizes."""
    n = len(seconds)
    if n == 0:
        return DecisionStats(0, sampled, 0.0, 0.0, 0.0, 0.0, 0.0)
    us = np.asarray(seconds, dtype=np.float64) * 1e6
    p50, p99 = np.percentile(us, [50, 99])
    return DecisionStats(
        count=n,
        sampled=sampled,
        mean_candidates=candidates / n,
        mean_us=float(us.mean()),
        p50_us=float(p50),
        p99_us=float(p99),
        max_us=float(us.max()),
    )


@dataclass(frozen=True)
class ClusterResult:
    """The outcome of :meth:`~sage_llm.sim.cluster.ClusterSimulator.run`.

    ``summary`` is :func:`sage_llm.bench.stats.summarize` over ``measurements`` (one per
    request, in completion order) for the simulated duration ``sim_time_s`` (start to the
    last request's end). ``wall_s`` is the real time the run took, ``cpu_s`` this
    process's CPU time meanwhile (which does not depend on what else the machine runs),
    ``events`` the events it processed (arrivals, engine steps, wake-ups, stats refreshes),
    ``disaggregated`` the requests run as a PD pair (a prefill leg, then a decode leg),
    ``colocated`` those for a model set up for PD that ran whole on one instance.
    """

    summary: BenchSummary
    measurements: Sequence[RequestMeasurement]
    instances: Sequence[InstanceUsage]
    prefix_hit_rate: float
    decisions: DecisionStats
    sim_time_s: float
    wall_s: float
    cpu_s: float
    events: int
    steps: int
    rejected: int
    policy_state: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    disaggregated: int = 0
    colocated: int = 0

    @property
    def events_per_s(self) -> float:
        """Events processed per wall-clock second."""
        return self.events / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def requests_per_wall_s(self) -> float:
        """Requests simulated per wall-clock second."""
        return self.summary.count / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def mean_utilization(self) -> float:
        """Mean engine busy fraction over the instances."""
        if not self.instances:
            return 0.0
        return sum(i.utilization for i in self.instances) / len(self.instances)

    @property
    def mean_load(self) -> float:
        """Mean over the instances of their time-averaged share of the concurrency bound."""
        if not self.instances:
            return 0.0
        return sum(i.load for i in self.instances) / len(self.instances)

    def to_dict(self, *, per_instance: bool = False) -> dict[str, Any]:
        """A JSON-serialisable dict (per-instance rows only when asked)."""
        utils = [i.utilization for i in self.instances]
        out: dict[str, Any] = {
            "summary": self.summary.to_dict(),
            "prefix_hit_rate": self.prefix_hit_rate,
            "decisions": self.decisions.to_dict(),
            "sim_time_s": self.sim_time_s,
            "wall_s": self.wall_s,
            "cpu_s": self.cpu_s,
            "events": self.events,
            "events_per_s": self.events_per_s,
            "requests_per_wall_s": self.requests_per_wall_s,
            "steps": self.steps,
            "rejected": self.rejected,
            "disaggregated": self.disaggregated,
            "colocated": self.colocated,
            "utilization": {
                "mean": self.mean_utilization,
                "min": min(utils, default=0.0),
                "max": max(utils, default=0.0),
            },
            "max_in_flight": max((i.max_in_flight for i in self.instances), default=0),
            "mean_load": self.mean_load,
            "policy_state": self.policy_state,
            "settings": self.settings,
        }
        if per_instance:
            out["instances"] = [i.to_dict() for i in self.instances]
        return out


_fill_measurement = field_filler(
    RequestMeasurement,
    (
        "request_id", "priority", "user_id", "arrival_s", "first_token_s", "token_times_s",
        "end_s", "prompt_tokens", "output_tokens", "ok", "error", "slo_ttft_s",
        "slo_tpot_s", "slo_e2e_s",
    ),
)  # fmt: skip


def request_measurement(
    rec: SimRequest,
    arrival: float,
    first: float | None,
    end: float,
    output: int,
    error: str | None = None,
    times: Sequence[float] | None = None,
) -> RequestMeasurement:
    """:func:`~sage_llm.bench.stats.measure` of the request ``rec`` (what it kept of its
    workload request). Without token times it is built without ``RequestMeasurement``'s
    ``__init__`` (one per request): its ``__post_init__`` would only normalise the empty
    token times and check what holds by construction here (``arrival <= first <= end`` on
    the simulator's clock, counts >= 0)."""
    if times:
        return measure(rec, arrival, first, end, output, error, times)
    return _fill_measurement(
        rec.request_id,
        rec.priority,
        rec.user_id,
        arrival,
        first,
        (),
        end,
        rec.prompt_tokens,
        output,
        error is None,
        error,
        rec.slo_ttft_s,
        rec.slo_tpot_s,
        rec.slo_e2e_s,
    )


def instance_usage(slot: InstanceSlot, duration: float) -> InstanceUsage:
    """How ``slot`` was used over ``duration`` simulated seconds."""
    stats = slot.core.stats()
    queries = stats.prefix_cache_queries_total
    return InstanceUsage(
        instance_id=slot.instance_id,
        busy_s=slot.busy_s,
        utilization=min(1.0, slot.busy_s / duration),
        steps=slot.steps,
        completed=slot.state.completed,
        tokens_generated=slot.tokens,
        max_in_flight=slot.max_in_flight,
        mean_in_flight=slot.in_flight_area / duration,
        max_concurrency=slot.bound,
        prefix_hit_rate=stats.prefix_cache_hits_total / queries if queries else 0.0,
        preemptions=int(stats.preemptions_total),
        role=slot.role.value,
        prefilled_tokens=slot.state.prefilled_tokens,
    )


def build_result(
    slots: Sequence[InstanceSlot],
    measurements: Sequence[RequestMeasurement],
    slo: SLO | None,
    *,
    decisions: DecisionStats,
    wall_s: float,
    cpu_s: float,
    events: int,
    rejected: int,
    policy_state: dict[str, Any],
    settings: dict[str, Any],
    disaggregated: int = 0,
    colocated: int = 0,
) -> ClusterResult:
    """The report of a finished run (the simulated duration ends with the last request)."""
    sim_time = max((m.end_s for m in measurements), default=0.0)
    duration = max(sim_time, 1e-9)
    queries = hits = 0.0
    for slot in slots:
        stats = slot.core.stats()
        queries += stats.prefix_cache_queries_total
        hits += stats.prefix_cache_hits_total
    return ClusterResult(
        summary=summarize(measurements, duration, slo),
        measurements=measurements,
        instances=[instance_usage(slot, duration) for slot in slots],
        prefix_hit_rate=hits / queries if queries else 0.0,
        decisions=decisions,
        sim_time_s=sim_time,
        wall_s=wall_s,
        cpu_s=cpu_s,
        events=events,
        steps=sum(s.steps for s in slots),
        rejected=rejected,
        policy_state=policy_state,
        settings=settings,
        disaggregated=disaggregated,
        colocated=colocated,
    )
