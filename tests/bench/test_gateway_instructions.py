"""Tests for ``benchmarks/gateway_instructions.py``: its workload still runs the gateway's
request path (valgrind itself is not needed here)."""

from __future__ import annotations

from types import ModuleType

import pytest

from tests.factories import load_benchmark


@pytest.fixture(scope="module")
def script() -> ModuleType:
    return load_benchmark("gateway_instructions")


@pytest.mark.parametrize("mode", ["plain", "stream"])
def test_the_counted_workload_runs_requests_to_their_end(script: ModuleType, mode: str) -> None:
    assert script.main(["--child", "5", "70", mode]) == 0  # raises unless every one is a 200


def test_it_refuses_too_few_requests(script: ModuleType) -> None:
    with pytest.raises(SystemExit):
        script.main(["--requests", "10"])


def test_time_mode_times_this_checkout_and_a_baseline(
    script: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    src = script.SRC
    assert script.main(["--time", "2", "--requests", "100", "--warm", "5",
                        "--baseline-src", str(src)]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "µs per non-streaming request" in out and "best and median of 2 runs" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert float(rows["this"][2]) > 0 and float(rows["baseline"][1]) > 0
    assert float(rows["ratio"][1]) > 0
