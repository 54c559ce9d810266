"""The demo's two parts, at a small size."""

from __future__ import annotations

from sage_llm.bench.demo import (
    DEMO_SLO,
    demo_fleet,
    demo_workload,
    gateway_demo,
    render_gateway,
    render_table,
)
from sage_llm.bench.inprocess import Preset, run_preset


async def test_gateway_demo_serves_every_request_over_http() -> None:
    result = await gateway_demo(requests=16, rate=50.0)
    assert result.summary.count == 16
    assert result.summary.ok == 16
    assert sum(result.per_instance.values()) == 16
    assert render_gateway(result).row_count >= 6


def test_presets_differ_under_overload() -> None:
    workload = demo_workload(sessions=40, rate=9.0)
    fifo = run_preset(Preset("f", "fifo", "load_balanced"), workload, demo_fleet, slo=DEMO_SLO)
    prio = run_preset(Preset("p", "priority", "load_balanced"), workload, demo_fleet, slo=DEMO_SLO)
    assert fifo.summary.ok == prio.summary.ok == len(workload)
    assert 0.0 < fifo.prefix_hit_rate <= 1.0
    assert render_table([fifo, prio]).row_count == 2


def test_the_default_policy_leaves_fifo_when_the_demo_queues() -> None:
    """``adaptive`` (the default) must not score what ``fifo`` does on the demo's queueing
    workload: it switches to ``slo_aware`` and gets most of that policy's goodput."""
    workload = demo_workload(sessions=120, rate=9.0)
    runs = {
        policy: run_preset(Preset(policy, policy, "locality"), workload, demo_fleet, slo=DEMO_SLO)
        for policy in ("fifo", "slo_aware", "adaptive")
    }
    goodput = {policy: run.summary.goodput for policy, run in runs.items()}
    assert goodput["adaptive"] >= 1.5 * goodput["fifo"]
    assert goodput["adaptive"] >= 0.9 * goodput["slo_aware"]
    state = runs["adaptive"].policy_state["state"]
    assert [h["to"] for h in state["history"]][:1] == ["slo_aware"]
