"""Tests for ``benchmarks/sse_parse.py``: it parses its stream and checks its arguments."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest

from tests.factories import load_benchmark


@pytest.fixture(scope="module")
def script() -> ModuleType:
    return load_benchmark("sse_parse")


def test_measure_parses_the_whole_stream(script: ModuleType) -> None:
    timings = script.measure(number=5)  # the asserts inside check the events and chunks
    assert set(timings) == {"decode", "assemble"}
    assert all(us > 0 for us in timings.values())


def test_baseline_without_a_package_is_refused(script: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        script.main(["--baseline-src", str(tmp_path)])
