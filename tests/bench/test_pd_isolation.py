"""Tests for ``benchmarks/pd_isolation.py``: the isolation weight sweep."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest

from tests.factories import load_benchmark, usage_error


@pytest.fixture(scope="module")
def script() -> ModuleType:
    return load_benchmark("pd_isolation")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--weights", "1,x"], "not a number: 'x'"),
        (["--weights", "-1"], "must be a finite number >= 0, got '-1'"),
        (["--weights", "2,2"], "a weight is given twice"),
        (["--n-long", "0", "--n-chat", "0"], "one of them > 0"),
        (["--chat-rate", "0"], "--long-rate and --chat-rate must be > 0"),
    ],
)
def test_a_bad_option_is_a_usage_error(
    script: ModuleType, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert message in usage_error(script.main, argv, capsys)


def test_a_small_sweep_runs_each_fleet_at_each_weight(
    script: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "iso.json"
    code = script.main(["--weights", "1,3", "--n-long", "6", "--n-chat", "0", "--out", str(out)])
    assert code == 0
    cases = json.loads(out.read_text())["cases"]
    assert [(c["fleet"]["name"], c["fleet"]["pairing_params"]) for c in cases] == [
        ("adaptive-hybrid", {"isolation_weight": 1.0}),
        ("adaptive-hybrid", {"isolation_weight": 3.0}),
        ("adaptive-2:2+4", {"isolation_weight": 1.0}),
        ("adaptive-2:2+4", {"isolation_weight": 3.0}),
    ]
    assert all(c["requests"] == 6 and c["failed"] == 0 for c in cases)
    assert "adaptive-2:2+4" in capsys.readouterr().out
