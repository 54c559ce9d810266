"""Tests for ``benchmarks/request_stages.py``: its probes still name real functions, and
its summary of the timestamps."""

from __future__ import annotations

import importlib
import inspect
from types import ModuleType

import pytest

from tests.factories import load_benchmark


@pytest.fixture(scope="module")
def stages() -> ModuleType:
    return load_benchmark("request_stages")


@pytest.mark.parametrize("probes", ["PROBES", "STREAM_PROBES"])
def test_every_probe_names_a_function_of_the_gateway(stages: ModuleType, probes: str) -> None:
    for module_name, qualname, _label in getattr(stages, probes):
        owner: object = importlib.import_module(module_name)
        *path, name = qualname.split(".")
        for part in path:
            owner = getattr(owner, part)
        assert callable(inspect.getattr_static(owner, name)), qualname


def test_summary_is_per_request_medians_from_the_first_event(stages: ModuleType) -> None:
    first = stages.FIRST
    events = []
    for i in range(9):  # requests 1 ms apart; "b" twice in each, "rare" in one only
        t0 = i * 1_000_000
        events += [(t0, first), (t0 + 10_000, "a"), (t0 + 20_000 + i, "b"), (t0 + 30_000, "b")]
        if i == 8:
            events.append((t0 + 40_000, "rare"))
    rows = stages.summarize(events, skip=1)
    assert [name for name, _ in rows] == [first, "a", "b", "b #2"]
    assert dict(rows)["a"] == pytest.approx(10.0)
    assert dict(rows)["b"] == pytest.approx(20.0045)  # the median of 20.001 … 20.008 µs
    table = stages.render(rows)
    assert table.splitlines()[2].split() == ["a", "10", "10"]
