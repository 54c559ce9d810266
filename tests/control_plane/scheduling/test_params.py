"""The policies' parameter checks: the documented ranges, each refusal naming its key."""

from __future__ import annotations

import math

import pytest

from sage_llm.control_plane.scheduling._params import (
    check_count,
    check_fraction,
    check_non_negative,
    check_positive,
)
from sage_llm.control_plane.scheduling.adaptive import AdaptivePolicy
from sage_llm.errors import ConfigError


@pytest.mark.parametrize("value", [0.0, 1.0, 0, 1])
def test_a_fraction_of_0_or_1_is_in_0_1(value: float) -> None:
    check_fraction("share", value)


@pytest.mark.parametrize("value", [-0.01, 1.01])
def test_a_fraction_outside_0_1_names_the_key(value: float) -> None:
    with pytest.raises(ConfigError) as err:
        check_fraction("share", value)
    assert err.value.key == "share"


def test_a_count_at_its_minimum_or_maximum_is_taken() -> None:
    check_count("n", 1)
    check_count("n", 3, minimum=3, maximum=3)


@pytest.mark.parametrize(("value", "kwargs"), [(0, {}), (2, {"minimum": 3}), (4, {"maximum": 3})])
def test_a_count_out_of_range_names_the_key(value: int, kwargs: dict[str, int]) -> None:
    with pytest.raises(ConfigError) as err:
        check_count("n", value, **kwargs)
    assert err.value.key == "n"


@pytest.mark.parametrize("value", [True, 2.0])
def test_a_bool_or_a_float_is_not_a_count(value: object) -> None:
    with pytest.raises(ConfigError, match="must be an integer") as err:
        check_count("n", value)  # type: ignore[arg-type]
    assert err.value.key == "n"


def test_the_adaptive_window_is_at_most_1_000_000() -> None:
    assert AdaptivePolicy.Params(window=1_000_000).window == 1_000_000
    with pytest.raises(ConfigError) as err:
        AdaptivePolicy.Params(window=1_000_001)
    assert err.value.key == "window"


def test_infinity_is_positive_unless_a_finite_value_is_asked_for() -> None:
    check_positive("s", math.inf)
    with pytest.raises(ConfigError, match="finite") as err:
        check_positive("s", math.inf, allow_inf=False)
    assert err.value.key == "s"


def test_a_non_negative_value_must_be_finite() -> None:
    check_non_negative("s", 0.0)
    with pytest.raises(ConfigError, match="finite") as err:
        check_non_negative("s", math.inf)
    assert err.value.key == "s"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("slo_target", "high"),
        ("cost_share", math.nan),
        ("min_dwell_s", "5"),
        ("light_load", True),
        ("priority_share", None),
    ],
)
def test_a_fraction_or_duration_that_is_not_a_number_is_refused_naming_its_key(
    key: str, value: object
) -> None:
    """A code-built policy's parameter given as a string, a flag or NaN is refused with
    the value shown, not compared (a TypeError) or taken (NaN passes every bound)."""
    with pytest.raises(ConfigError, match=r"must be a number, got ") as err:
        AdaptivePolicy.Params(**{key: value})  # type: ignore[arg-type]
    assert err.value.key == key
    assert repr(value) in err.value.message
