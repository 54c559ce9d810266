"""Tests for replaying a workload against an in-process control plane on virtual time."""

from __future__ import annotations

from dataclasses import replace

from sage_llm.bench.demo import DEMO_SLO, demo_fleet, demo_workload
from sage_llm.bench.inprocess import Preset, run_preset
from sage_llm.bench.workload_core import evolve


def test_every_request_is_measured_and_a_failed_one_is_counted_as_an_error() -> None:
    workload = demo_workload(sessions=2)
    requests = list(workload.requests)
    requests[1] = evolve(requests[1], model="no-such-model")
    workload = replace(workload, requests=tuple(requests))
    run = run_preset(
        Preset("f", "fifo", "load_balanced"), workload, lambda: demo_fleet(2), slo=DEMO_SLO
    )
    assert [m.request_id for m in run.measurements] == [r.request_id for r in workload]
    assert (run.summary.count, run.summary.ok, run.summary.failed) == (8, 7, 1)
    (failed,) = [m for m in run.measurements if not m.ok]
    assert failed.request_id == requests[1].request_id
    assert failed.error is not None and failed.error.startswith("ModelNotFoundError: ")
    assert list(run.summary.errors.values()) == [1]
