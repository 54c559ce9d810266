"""Tests for ``benchmarks/fault_drill.py``: a short drill over real engine processes."""

from __future__ import annotations

import argparse
import asyncio
from types import ModuleType

import pytest

from tests.factories import load_benchmark


@pytest.fixture(scope="module")
def drill() -> ModuleType:
    return load_benchmark("fault_drill")


def test_the_faults_are_engine_sim_fault_specs(drill: ModuleType) -> None:
    assert drill.fault_spec("hang", 5.0) == "hang@5"
    assert drill.fault_spec("drop", 2.5) == "truncate=0@2.5"
    assert drill.fault_spec("gray", 5.0) == "error=500@p1"
    with pytest.raises(ValueError, match="unknown fault"):
        drill.fault_spec("flood", 1.0)


def test_a_hung_engines_calls_are_moved_and_every_request_completes(drill: ModuleType) -> None:
    """Over HTTP, end to end: engine 0 hangs 0.5 s in, its calls (answers sent whole) are
    moved when it is ejected, and no request waits for the client's 20 s limit."""
    args = argparse.Namespace(
        fault="hang", at=0.5, requests=40, engines=2, rate=20.0, speed=20.0, slots=16,
        max_tokens=8, stream=False, timeout_s=20.0, move_on_eject=True, stall_timeout_s=None,
    )  # fmt: skip
    report = asyncio.run(drill.run(args))
    assert report["outcomes"] == {"ok": 40}
    assert report["completed_s"]["max"] < 10.0
    assert report["first_open_s"] is not None
    low, high = report["fault_began_s"]  # from the load's start; the ejection came after
    assert low <= high and report["first_open_s"] > low
    assert report["engine0_circuit"]["opened_by"] == "probes"
