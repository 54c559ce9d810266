"""Tests for ``benchmarks/fair_share.py``: its workload, and a small overloaded run in which
the light users' requests start ahead of the heavy user's backlog under ``fair``."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import pytest

from tests.factories import load_benchmark, usage_error


@pytest.fixture(scope="module")
def script() -> ModuleType:
    return load_benchmark("fair_share")


def test_the_workload_has_one_heavy_user_and_eight_light_ones_by_arrival(
    script: ModuleType,
) -> None:
    load = script.workload(4.0, 2.0, 10.0, 0)
    users = [r.user_id for r in load.requests]
    assert users.count("heavy") == 40
    light = {u for u in users if u != "heavy"}
    assert len(light) == 8 and all(u.startswith("light-") for u in light)
    assert len(users) == 60
    arrivals = [r.arrival_s for r in load.requests]
    assert arrivals == sorted(arrivals)
    assert load.requests == script.workload(4.0, 2.0, 10.0, 0).requests


def test_under_overload_fair_starts_the_light_users_requests_first(script: ModuleType) -> None:
    """One L40S running 24 requests at once, a heavy user at twice what it serves: the
    light users' median TTFT is far lower under ``fair`` than under ``fifo``, and the
    heavy user's output rate about the same."""
    load = script.workload(4.0, 1.0, 20.0, 0)
    light_ttft: dict[str, float] = {}
    heavy_tokens: dict[str, int] = {}
    for policy in ("fifo", "fair"):
        ms = script.run(policy, load, 1, 24, 0)
        assert all(m.ok for m in ms)
        ttft = sorted(
            m.first_token_s - m.arrival_s
            for m in ms
            if m.user_id != "heavy" and m.first_token_s is not None
        )
        light_ttft[policy] = ttft[len(ttft) // 2]
        heavy_tokens[policy] = sum(m.output_tokens for m in ms if m.user_id == "heavy")
    assert light_ttft["fair"] * 5 < light_ttft["fifo"]
    assert heavy_tokens["fair"] == heavy_tokens["fifo"]  # every request answered in full


def printed_runs(
    script: ModuleType, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> list[list[str]]:
    """The setup and user cells of each table row ``main(argv)`` prints."""
    assert script.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    return [line.split(" | ")[:2] for line in out if line.startswith(("| f", "| a"))]


def test_main_prints_four_setups_for_both_user_classes(
    script: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--duration-s", "3", "--heavy-rate", "2", "--cap", "4", "--open-cap", "8"]
    assert printed_runs(script, argv, capsys) == [
        ["| fifo, cap 8", "light"], ["| fifo, cap 8", "heavy"],
        ["| fifo, cap 4", "light"], ["| fifo, cap 4", "heavy"],
        ["| fair, cap 4", "light"], ["| fair, cap 4", "heavy"],
        ["| adaptive, cap 4", "light"], ["| adaptive, cap 4", "heavy"],
    ]  # fmt: skip


def test_main_refuses_a_bad_rate(script: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    err = usage_error(script.main, ["--heavy-rate", "0"], capsys)
    assert "argument --heavy-rate: must be a finite number > 0, got 0" in err


def test_the_second_half_is_counted_from_the_first_arrival(script: ModuleType) -> None:
    """Over HTTP the measured times have another origin than the workload's."""
    load = script.batch_workload(4.0, 10.0, 0)
    ms = script.run("fair", load, 1, 8, 0)
    shifted = [replace(m, arrival_s=m.arrival_s + 1e4, first_token_s=(m.first_token_s or 0) + 1e4,
                       end_s=m.end_s + 1e4) for m in ms]  # fmt: skip
    ids = {u: [m.request_id for m in v] for u, v in script.second_half(ms, 10.0).items()}
    assert sum(map(len, ids.values())) > 0
    again = script.second_half(shifted, 10.0)
    assert {u: [m.request_id for m in v] for u, v in again.items()} == ids


def test_over_http_a_setup_runs_on_engine_sim_processes_behind_the_gateway(
    script: ModuleType, tmp_path: Path
) -> None:
    """``--http``: the same workload over a gateway process and engine-sim processes,
    every request answered, its user kept, its times in simulated seconds."""
    load = script.workload(2.0, 2.0, 2.0, 0)
    weights = {"user_weights": {"heavy": 0.5}}  # (a table reaches the gateway's config)
    ms = asyncio.run(script.run_http("fair", load, 1, 4, 0, 20.0, tmp_path, weights))
    assert len(ms) == len(load) == 8
    assert all(m.ok for m in ms), [m.error for m in ms]
    assert {m.user_id for m in ms} == {r.user_id for r in load.requests}
    spread = max(m.arrival_s for m in ms) - min(m.arrival_s for m in ms)
    assert spread == pytest.approx(load.duration_s, abs=1.0)  # simulated, not wall, seconds


def test_the_batch_workload_has_two_users_sending_alike(script: ModuleType) -> None:
    load = script.batch_workload(4.0, 10.0, 0)
    users = [r.user_id for r in load.requests]
    assert users.count("batch-a") == users.count("batch-b") == 40
    assert [r.arrival_s for r in load.requests] == sorted(r.arrival_s for r in load.requests)


def test_a_user_weighted_two_gets_about_twice_the_work_started_under_overload(
    script: ModuleType,
) -> None:
    """Two batch users at four times what one L40S serves: under ``fair`` alike, they
    start about the same work in the second half of the arrivals; with ``batch-a``
    weighted 2, ``batch-a`` starts about twice ``batch-b``'s."""
    load = script.batch_workload(4.0, 30.0, 0)
    share: dict[str, float] = {}
    for name, params in (("alike", {}), ("weighted", {"user_weights": {"batch-a": 2.0}})):
        ms = script.run("fair", load, 1, 24, 0, params)
        assert all(m.ok for m in ms)
        tokens = {
            user: sum(m.output_tokens for m in started)
            for user, started in script.second_half(ms, 30.0).items()
        }
        share[name] = tokens["batch-a"] / (tokens["batch-a"] + tokens["batch-b"])
    assert 0.4 < share["alike"] < 0.6
    assert 0.6 < share["weighted"] < 0.75


def test_main_with_a_weight_prints_three_setups_for_both_batch_users(
    script: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--weight", "3", "--duration-s", "3", "--heavy-rate", "2", "--cap", "4"]
    assert printed_runs(script, argv, capsys) == [
        ["| fifo, cap 4", "batch-a"], ["| fifo, cap 4", "batch-b"],
        ["| fair, cap 4", "batch-a"], ["| fair, cap 4", "batch-b"],
        ["| fair, batch-a weight 3, cap 4", "batch-a"],
        ["| fair, batch-a weight 3, cap 4", "batch-b"],
    ]  # fmt: skip
