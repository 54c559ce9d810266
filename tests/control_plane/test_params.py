"""One builder for every plugin's ``Params``: each problem of a table is reported."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import pytest

from sage_llm.control_plane.params import build_params
from sage_llm.control_plane.pd import build_decider
from sage_llm.control_plane.routing.registry import build_router
from sage_llm.control_plane.scheduling.registry import build_policy
from sage_llm.errors import ConfigError, ConfigErrors


@dataclass(frozen=True)
class Params:
    low: float = 1.0
    high: float = 10.0
    count: int = 3
    mode: Literal["a", "b"] = "a"
    cap: float | None = None
    on: bool = True

    def __post_init__(self) -> None:
        if self.low <= 0:
            raise ConfigError(f"must be > 0, got {self.low}", key="low")
        if self.count < 1:
            raise ConfigError(f"must be >= 1, got {self.count}", key="count")
        if self.high < self.low:
            raise ConfigError(f"must be >= low ({self.low})", key="high")


def test_a_good_table_builds_with_ints_read_as_floats() -> None:
    got = build_params(Params, {"low": 2, "cap": None, "mode": "b", "on": False})
    assert got == Params(low=2.0, mode="b", on=False)
    assert isinstance(got.low, float)
    assert build_params(Params, None) == Params()


def test_every_problem_is_reported_in_the_tables_order() -> None:
    with pytest.raises(ConfigErrors) as info:
        build_params(
            Params,
            {"count": 0, "mode": "c", "bogus": 1, "low": -1, "on": "yes", "high": 5},
            owner="thing 'x'",
        )
    errors = info.value.errors
    assert [e.key for e in errors] == ["count", "mode", "bogus", "low", "on"]
    assert "must be >= 1" in errors[0].message
    assert "must be one of 'a', 'b'" in errors[1].message
    assert "unknown parameter for thing 'x'; valid: low, high" in errors[2].message
    assert "must be > 0" in errors[3].message
    assert "must be true or false" in errors[4].message
    assert info.value.key == "count"


def test_one_problem_raises_that_error_alone() -> None:
    with pytest.raises(ConfigError) as info:
        build_params(Params, {"count": "3"})
    assert not isinstance(info.value, ConfigErrors)
    assert (info.value.key, info.value.message) == (
        "count",
        "count: must be an integer, got string '3'",
    )


def test_an_unknown_name_that_is_no_bare_key_is_quoted() -> None:
    """As a config file's key is written (``policy_params."a.b"``): a dot in the name is
    not read as a table's."""
    with pytest.raises(ConfigErrors) as info:
        build_params(Params, {"a.b": 1, "a b": 2, "c": 3})
    assert [e.key for e in info.value.errors] == ['"a.b"', '"a b"', "c"]


def test_a_problem_between_keys_is_reported_when_each_is_fine_alone() -> None:
    with pytest.raises(ConfigError) as info:
        build_params(Params, {"low": 5.0, "high": 2.0})
    assert not isinstance(info.value, ConfigErrors)
    assert info.value.key == "high"


def test_a_limit_set_by_another_key_is_shown_as_given_not_as_its_default() -> None:
    """``high`` alone fails against the default ``low`` (1.0); the table gives 0.7."""
    with pytest.raises(ConfigError) as info:
        build_params(Params, {"high": 0.5, "low": 0.7})
    assert (info.value.key, info.value.message) == ("high", "high: must be >= low (0.7)")
    with pytest.raises(ConfigError, match=r"must be below overload \(0.2\), got 0.5"):
        build_policy("adaptive", {"light_load": 0.5, "overload": 0.2})


def test_limits_are_checked_against_the_values_given_whatever_else_is_wrong() -> None:
    """With another key wrong too, a limit another key sets is still shown as given, and a
    conflict with a default is filed under the key the table gives, with every problem."""
    with pytest.raises(ConfigErrors) as info:
        build_policy("adaptive", {"overload": 0.2, "light_load": 0.3, "window": 0})
    assert [(e.key, e.message) for e in info.value.errors] == [
        ("light_load", "light_load: must be below overload (0.2), got 0.3"),
        ("window", "window: must be >= 1, got 0"),
    ]
    with pytest.raises(ConfigErrors) as info:
        build_policy("adaptive", {"overload": 0.01, "min_samples": 300})
    assert [e.key for e in info.value.errors] == ["overload", "min_samples"]
    assert info.value.errors[0].message == (
        "overload: conflicts with light_load at its default (0.05): light_load must be "
        "below overload (0.01), got 0.05"
    )
    # a key that fails only against another's default is fine beside the value given
    assert build_params(Params, {"high": 0.5, "low": 0.4}) == Params(low=0.4, high=0.5)
    # nor is it judged against the default of a key that was written but refused
    for table, refused in (
        ({"window": 500.0, "min_samples": 300}, "window"),
        ({"overload": "high", "light_load": 0.2}, "overload"),
    ):
        with pytest.raises(ConfigError) as one:
            build_policy("adaptive", table)
        assert not isinstance(one.value, ConfigErrors) and one.value.key == refused


def test_a_conflict_between_two_keys_hides_no_other_problem() -> None:
    """A check raises its first problem: a conflict between two given keys had hidden a
    third key's own range, and a second conflict; each is found now, in one pass."""
    with pytest.raises(ConfigErrors) as info:
        build_policy("adaptive", {"window": 10, "min_samples": 20, "light_load": 0.3})
    assert [e.key for e in info.value.errors] == ["min_samples", "light_load"]
    with pytest.raises(ConfigErrors) as info:
        build_router("topology_aware",
                     {"machine_score": 0.2, "rack_score": 0.5, "kv_threshold": 0})  # fmt: skip
    assert [e.key for e in info.value.errors] == ["rack_score", "kv_threshold"]
    no_weight = dict.fromkeys(
        ("outstanding_weight", "queue_weight", "kv_weight", "latency_weight"), 0
    )
    with pytest.raises(ConfigErrors) as info:
        build_router("load_balanced", {**no_weight, "preferred_weight": -1})
    assert "preferred_weight" in [e.key for e in info.value.errors]
    with pytest.raises(ConfigErrors) as info:  # two conflicts between given keys
        build_policy(
            "adaptive", {"window": 10, "min_samples": 20, "overload": 0.2, "light_load": 0.3}
        )
    assert [e.message for e in info.value.errors] == [
        "min_samples: must be <= window (10), got 20",
        "light_load: must be below overload (0.2), got 0.3",
    ]


def test_choices_are_read_in_any_letter_case_and_a_bad_one_is_shown() -> None:
    assert build_params(Params, {"mode": " B"}).mode == "b"
    policy = build_policy("slo_aware", {"infeasible_action": "Reject"})
    assert policy.describe()["params"]["infeasible_action"] == "reject"  # type: ignore[index]
    # a policy named as scheduling_policy names one: "-" read as "_"
    for name in ("slo-aware", "Cost-Optimized", " SLO_AWARE"):
        adaptive = build_policy("adaptive", {"initial": name})
        initial = adaptive.describe()["params"]["initial"]  # type: ignore[index]
        assert initial == name.strip().lower().replace("-", "_")
    with pytest.raises(ConfigError, match="must be one of 'a', 'b', got string 'c'"):
        build_params(Params, {"mode": "c"})


def test_a_rack_rated_above_its_machine_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"must be at most machine_score \(0.1\), got 0.9"):
        build_router("topology_aware", {"machine_score": 0.1, "rack_score": 0.9})
    # against the default rack_score: filed under the key given, whatever else is given
    for raw in ({"machine_score": 0.2}, {"machine_score": 0.2, "load_slack": 0.5}):
        with pytest.raises(ConfigError) as info:
            build_router("topology_aware", raw)
        assert info.value.key == "machine_score"
        assert "conflicts with rack_score at its default (0.3)" in info.value.message


def test_finite_refuses_infinity_and_nan() -> None:
    assert build_params(Params, {"high": math.inf}).high == math.inf
    for value in (math.inf, math.nan):
        with pytest.raises(ConfigError, match="must be finite"):
            build_params(Params, {"high": value}, finite=True)


def test_an_integer_beyond_a_float_is_a_config_error_not_an_overflow() -> None:
    with pytest.raises(ConfigError, match="must be a number a float can hold, got integer of 401"):
        build_params(Params, {"high": 10**400})
    with pytest.raises(ConfigError) as info:
        build_router("load_balanced", {"outstanding_weight": -(10**400)})
    assert info.value.key == "outstanding_weight"


def test_an_integer_beyond_64_bits_is_refused() -> None:
    """An integer parameter goes into float arithmetic (a PD transfer time): one beyond a
    float had passed, then failed every disaggregated request."""
    with pytest.raises(ConfigError, match=r"count: must be at most 9223372036854775807"):
        build_params(Params, {"count": 10**400})
    with pytest.raises(ConfigError, match=r"at most 9223372036854775807 \(64 bits\)") as info:
        build_decider("adaptive", {"kv_bytes_per_token": 10**400})
    assert info.value.key == "kv_bytes_per_token"


def test_a_non_table_is_refused() -> None:
    with pytest.raises(ConfigError, match="parameters for thing must be a table, got 3"):
        build_params(Params, 3, owner="thing")  # type: ignore[arg-type]


def test_policies_strategies_and_deciders_report_every_problem() -> None:
    with pytest.raises(ConfigErrors) as info:
        build_policy("priority", {"aging_interval_s": "soon", "max_wait_s": -1.0})
    assert [e.key for e in info.value.errors] == ["aging_interval_s", "max_wait_s"]
    with pytest.raises(ConfigErrors) as info:
        build_router("affinity", {"bogus": 1, "bogus2": 2})
    assert "routing strategy 'affinity'" in info.value.errors[0].message
    with pytest.raises(ConfigErrors) as info:
        build_decider("threshold", {"a": 1, "b": 2})
    assert "PD decider 'threshold'" in info.value.errors[0].message


@dataclass(frozen=True)
class Named:
    label: str = "x"
    size: int = 1
    rate: float = 1.0
    first: float = 0.0
    last: float = 1.0

    def __post_init__(self) -> None:
        if self.first > self.last:
            raise ValueError("first must not be after last")


def test_a_boolean_is_no_number_and_a_string_field_takes_only_a_string() -> None:
    for key, value, says in (
        ("size", True, "must be an integer"),
        ("rate", False, "must be a number"),
        ("label", 3, "must be a string"),
    ):
        with pytest.raises(ConfigError, match=says) as info:
            build_params(Named, {key: value})
        assert info.value.key == key


def test_a_problem_between_keys_comes_after_each_keys_own() -> None:
    """The problems in the table's order, then one between keys (named by no key)."""
    with pytest.raises(ConfigErrors) as info:
        build_params(Named, {"first": 0.5, "last": 0.2, "size": "big"})
    assert [e.key for e in info.value.errors] == ["size", None]
    assert "first must not be after last" in info.value.errors[1].message


@dataclass(frozen=True)
class Ordered:
    """``low``'s check reads ``high`` and runs before ``high``'s own (``high`` even)."""

    low: int = 1
    high: int = 10

    def __post_init__(self) -> None:
        if self.low > self.high:
            raise ConfigError(f"must be <= high ({self.high})", key="low")
        if self.high % 2:
            raise ConfigError(f"must be even, got {self.high}", key="high")


def test_a_keys_own_problem_is_shown_though_another_keys_check_fails_first_beside_it() -> None:
    """``high = 3`` is odd (its own problem); beside ``low = 5`` the check of ``low``,
    run first, fails against it: ``high``'s own problem is still the one reported (not
    ``low``'s, which is judged against a value that is refused anyway)."""
    with pytest.raises(ConfigError) as info:
        build_params(Ordered, {"low": 5, "high": 3})
    assert not isinstance(info.value, ConfigErrors)
    assert (info.value.key, info.value.detail) == ("high", "must be even, got 3")


@dataclass(frozen=True)
class Budget:
    """Three shares that must fit in ``total`` (whose check is filed under it)."""

    a: float = 1.0
    b: float = 1.0
    c: float = 1.0
    total: float = 10.0

    def __post_init__(self) -> None:
        if self.a + self.b + self.c > self.total:
            raise ConfigError(f"must be >= a + b + c ({self.a + self.b + self.c:g})", key="total")


def test_a_default_that_several_given_keys_conflict_with_is_named_at_its_own_key() -> None:
    """Two given keys that overflow a default: leaving out the first clears it, so the
    conflict is filed under that key, saying so; three whose every pair overflows it: no
    one key is to blame, and the check's own key and words stand."""
    with pytest.raises(ConfigError) as info:
        build_params(Budget, {"a": 6, "b": 6})
    assert (info.value.key, info.value.detail) == (
        "a",
        "conflicts with total at its default (10.0): total must be >= a + b + c (13)",
    )
    with pytest.raises(ConfigError) as info:
        build_params(Budget, {"a": 6, "b": 6, "c": 6})
    assert (info.value.key, info.value.detail) == ("total", "must be >= a + b + c (18)")


@dataclass(frozen=True)
class Raising:
    """Parameters whose check raises ValueError (not ConfigError), with a field of a type
    the builder does not read (passed on as given)."""

    size: int = 1
    names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"size must be >= 1, got {self.size}")


def test_a_value_error_of_a_check_is_a_config_error_at_its_key() -> None:
    with pytest.raises(ConfigError) as info:
        build_params(Raising, {"size": 0})
    assert (info.value.key, info.value.detail) == ("size", "size must be >= 1, got 0")
    assert build_params(Raising, {"names": ("x", "y")}) == Raising(names=("x", "y"))
