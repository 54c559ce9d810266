"""Tests for ``benchmarks/engine_priority.py``: its workload and fleet, and a small run in
which the engines' order shows."""

from __future__ import annotations

from types import ModuleType

import pytest

from sage_llm.types import RequestPriority
from tests.factories import load_benchmark, usage_error


@pytest.fixture(scope="module")
def script() -> ModuleType:
    return load_benchmark("engine_priority")


def test_the_workload_mixes_three_priorities_seeded(script: ModuleType) -> None:
    load = script.workload(400, 5.0, 0)
    shares = {p: sum(r.priority is p for r in load.requests) / 400 for p in RequestPriority}
    assert 0.1 < shares[RequestPriority.CRITICAL] < 0.2
    assert shares[RequestPriority.NORMAL] > shares[RequestPriority.BACKGROUND] > 0.25
    assert load.requests == script.workload(400, 5.0, 0).requests


def test_the_fleet_carries_the_cap_and_the_engines_policy(script: ModuleType) -> None:
    fleet = script.fleet(2, 256, "priority")
    assert [(i.max_concurrent_requests, i.engine_scheduling_policy) for i in fleet] == [
        (256, "priority")
    ] * 2


def test_engines_that_schedule_by_priority_keep_critical_requests_first(
    script: ModuleType,
) -> None:
    """One L40S, requests queued in the engine: critical requests' median TTFT is far
    lower when the engine schedules by priority."""
    load = script.workload(300, 5.0, 0)  # (past what the engine serves)
    ttft = {}
    for policy in ("fcfs", "priority"):
        result = script.run(load, 1, 256, policy, 0)
        _, crit, _ = script.by_priority(result.measurements)[RequestPriority.CRITICAL]
        ttft[policy] = sorted(crit)[len(crit) // 2]
    assert ttft["priority"] * 3 < ttft["fcfs"]


def test_main_refuses_a_bad_rate(script: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    err = usage_error(script.main, ["--rate", "0"], capsys)
    assert "argument --rate: must be a finite number > 0, got 0" in err


def test_main_pools_the_seeds_requests(
    script: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    assert script.main(["--requests", "20", "--rate", "2", "--seeds", "2", "--seed", "4"]) == 0
    out = capsys.readouterr().out
    assert "seeds 4–5 (their requests together)" in out
    answered = [line.split(" | ")[2] for line in out.splitlines() if line.startswith("| cap ")]
    assert len(answered) >= 8  # four setups, each priority drawn
    for setup in range(4):
        rows = answered[setup * len(answered) // 4 : (setup + 1) * len(answered) // 4]
        assert sum(int(cell.split("/")[1]) for cell in rows) == 40
