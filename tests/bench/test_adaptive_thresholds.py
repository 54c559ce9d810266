"""Tests for ``benchmarks/adaptive_thresholds.py``: its parameters and contenders."""

from __future__ import annotations

from types import ModuleType

import pytest

from sage_llm.control_plane.scheduling.adaptive import AdaptivePolicy
from tests.factories import load_benchmark, usage_error


@pytest.fixture(scope="module")
def script() -> ModuleType:
    return load_benchmark("adaptive_thresholds")


def test_old_params_parse_into_valid_adaptive_params(script: ModuleType) -> None:
    params = script.parse_params("light_load=.5,overload=1,min_dwell_s=10")
    assert params == {"light_load": 0.5, "overload": 1.0, "min_dwell_s": 10.0}
    AdaptivePolicy.Params(**params)  # what the script passes on is accepted
    with pytest.raises(ValueError, match="key=value"):
        script.parse_params("overload")


def test_contenders_are_the_fixed_policies_and_adaptive(script: ModuleType) -> None:
    names = [label for label, _policy, _params in script.contenders(None)]
    assert names == ["fifo", "priority", "slo_aware", "adaptive"]
    with_old = script.contenders({"overload": 1.0})
    assert with_old[-1] == ("adaptive (--old)", "adaptive", {"overload": 1.0})


def test_main_rejects_bad_old_params(script: ModuleType) -> None:
    with pytest.raises(SystemExit):
        script.main(["--old", "nonsense"])


def test_old_params_are_checked_before_any_run(
    script: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    err = usage_error(script.main, ["--old", "bogus=1"], capsys)
    assert "--old: bogus: unknown parameter for scheduling policy 'adaptive'" in err
