"""The engine core's ``priority`` scheduling policy, as vLLM's ``--scheduling-policy
priority``: waiting requests by ``(priority, arrival, id)``, and the running request last
in that order preempted when KV blocks run out."""

from __future__ import annotations

import pytest

from sage_llm.errors import ConfigError
from sage_llm.sim.core import SimEngineCore
from tests.sim.test_core import drive, make_core, prompt


def admitted_order(core: SimEngineCore) -> list[str]:
    trace = drive(core)
    return [rid for step in trace.steps for rid, _ in step.admitted]


def test_waiting_requests_are_taken_by_priority_then_arrival() -> None:
    core = make_core(scheduling_policy="priority", max_num_seqs=1)
    for rid, priority, at in [("low", 4, 0.0), ("normal", 2, 0.1), ("crit", 0, 0.2),
                              ("normal-2", 2, 0.05)]:  # fmt: skip
        core.add_request(rid, prompt(16, 1000 * (len(rid) + priority)), 2, arrival=at,
                         priority=priority)  # fmt: skip
    assert admitted_order(core) == ["crit", "normal-2", "normal", "low"]


def test_fcfs_takes_them_by_arrival_whatever_their_priority() -> None:
    core = make_core(max_num_seqs=1)
    for k, priority in enumerate([4, 2, 0]):
        core.add_request(f"r{k}", prompt(16, 1000 * (k + 1)), 2, arrival=0.0, priority=priority)
    assert admitted_order(core) == ["r0", "r1", "r2"]


def test_the_lowest_priority_running_request_is_preempted_when_blocks_run_out() -> None:
    """Three requests that outgrow the cache together: under ``fcfs`` the last admitted is
    preempted, under ``priority`` the least urgent, wherever it is in the batch."""
    preempted: dict[str, list[str]] = {}
    for policy in ("fcfs", "priority"):
        core = make_core(scheduling_policy=policy, num_gpu_blocks=10, block_size=16)
        for rid, priority in [("a", 2), ("b", 4), ("c", 0)]:
            core.add_request(rid, prompt(30, 1000 + ord(rid)), 40, arrival=0.0,
                             priority=priority)  # fmt: skip
        trace = drive(core)
        assert set(trace.finished) == {"a", "b", "c"}
        preempted[policy] = [rid for step in trace.steps for rid in step.preempted]
    assert preempted["fcfs"][0] == "c"  # the last admitted
    assert preempted["priority"][0] == "b"  # the least urgent, admitted second
    assert "c" not in preempted["priority"]


def test_a_preempted_request_goes_back_among_the_waiting_by_its_priority() -> None:
    """``bg`` and ``hi`` run (two slots) while ``mid`` waits; when blocks run out, ``bg``
    is preempted and goes back behind ``mid`` under ``priority`` (in front of it under
    ``fcfs``, which puts a preempted request first)."""
    after: dict[str, list[str]] = {}
    finished: dict[str, list[str]] = {}
    for policy in ("fcfs", "priority"):
        core = make_core(scheduling_policy=policy, num_gpu_blocks=8, block_size=16,
                         max_num_seqs=2)  # fmt: skip
        core.add_request("bg", prompt(30, 1000), 60, arrival=0.0, priority=4)
        res = core.step(0.0)
        core.add_request("hi", prompt(30, 2000), 60, arrival=0.0, priority=1)
        core.add_request("mid", prompt(30, 3000), 4, arrival=0.0, priority=2)
        trace = drive(core, res.duration_s)
        assert set(trace.finished) == {"bg", "hi", "mid"}
        preempted = [rid for step in trace.steps for rid in step.preempted]
        assert preempted[0] == ("bg" if policy == "priority" else "hi")
        after[policy] = [rid for step in trace.steps for rid, _ in step.admitted]
        finished[policy] = list(trace.finished)
    assert after["priority"] == ["hi", "mid"]  # (bg's second admission is not listed)
    assert finished["priority"][-1] == "bg"


def test_an_unknown_policy_is_refused() -> None:
    with pytest.raises(ConfigError) as err:
        make_core(scheduling_policy="sjf")
    assert err.value.key == "scheduling_policy"
