"""Tests for ``benchmarks/gateway_instructions.py``: its workload still runs the gateway's
request path (valgrind itself is not needed here)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gateway_instructions.py"


@pytest.fixture(scope="module")
def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gateway_instructions", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("mode", ["plain", "stream"])
def test_the_counted_workload_runs_requests_to_their_end(script: ModuleType, mode: str) -> None:
    assert script.main(["--child", "5", "70", mode]) == 0  # raises unless every one is a 200


def test_it_refuses_too_few_requests(script: ModuleType) -> None:
    with pytest.raises(SystemExit):
        script.main(["--requests", "10"])
