"""Tests for ``benchmarks/lora_slots.py``: its workload, fleet and a small run of both
settings."""

from __future__ import annotations

from types import ModuleType

import pytest

from tests.factories import load_benchmark, usage_error


@pytest.fixture(scope="module")
def script() -> ModuleType:
    return load_benchmark("lora_slots")


def test_the_workload_asks_for_the_adapters_in_use_most_for_the_first(
    script: ModuleType,
) -> None:
    load = script.workload(4, 400, 10.0, 0)
    asked = [r.model for r in load.requests]
    assert set(asked) == {"lora-0", "lora-1", "lora-2", "lora-3"}
    counts = [asked.count(f"lora-{k}") for k in range(4)]
    assert counts[0] > counts[3] * 2  # 1 : 1/4 by the Zipf law
    assert load.requests == script.workload(4, 400, 10.0, 0).requests  # seeded


def test_the_fleet_serves_every_adapter_with_the_scenarios_slots(script: ModuleType) -> None:
    scenario = script.Scenario(4, 32, 2)
    fleet = script.fleet(3, scenario)
    assert [i.instance_id for i in fleet] == ["e0", "e1", "e2"]
    assert all(len(i.lora_adapters) == 32 for i in fleet)
    assert {i.metadata["sim_max_loras"] for i in fleet} == {2}


def test_routing_by_slots_keeps_requests_from_waiting_for_one(script: ModuleType) -> None:
    """8 adapters over 2 engines of one slot each: spread by who serves them, requests
    wait for slots; routed by slots, much less."""
    scenario = script.Scenario(8, 8, 1)
    load = script.workload(8, 120, 8.0, 1)
    blind = script.run(scenario, load, 2, False, 0)
    slots = script.run(scenario, load, 2, True, 0)
    assert blind.ok == slots.ok == 120
    assert slots.ttft.p50 < blind.ttft.p50


def test_the_cluster_simulator_runs_as_the_control_plane(script: ModuleType) -> None:
    scenario = script.Scenario(8, 8, 1)
    load = script.workload(8, 120, 8.0, 1)
    for slot_routing in (False, True):
        ours = script.run(scenario, load, 2, slot_routing, 0, cluster=True)
        reference = script.run(scenario, load, 2, slot_routing, 0)
        assert ours.ok == reference.ok == 120
        assert ours.request_throughput == pytest.approx(reference.request_throughput)
        for name in ("p50", "p90", "p99", "max"):
            for figure in ("ttft", "e2e"):
                mine, theirs = getattr(ours, figure), getattr(reference, figure)
                assert getattr(mine, name) == pytest.approx(getattr(theirs, name))


def test_main_runs_the_scenarios_asked_for(
    script: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--cluster", "--engines", "2", "--rate", "5", "--requests", "30"]
    assert script.main([*args, "--scenario", "2/4/1"]) == 0
    out = capsys.readouterr().out
    assert "on the cluster simulator" in out
    assert out.count("| 2/4 adapters, 1 slots, ") == 2


@pytest.mark.parametrize(
    ("bad", "said"),
    [
        (["--rate", "0"], "argument --rate: must be a finite number > 0, got 0"),
        (["--scenario", "8/4/2"], "need 1 <= USED <= SERVED and SLOTS >= 1: '8/4/2'"),
        (["--scenario", "2/4"], "expected USED/SERVED/SLOTS, got '2/4'"),
        (["--scenario", "x"], "expected USED/SERVED/SLOTS, got 'x'"),
    ],
)
def test_main_refuses_bad_arguments(
    script: ModuleType, bad: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert said in usage_error(script.main, bad, capsys)
