"""build_router: names, parameters, errors, seeds."""

from __future__ import annotations

from typing import Any

import pytest

from sage_llm.control_plane.routing.base import Router
from sage_llm.control_plane.routing.registry import (
    ROUTING_NAMES,
    STRATEGIES,
    build_router,
    get_strategy,
)
from sage_llm.errors import ConfigError, NotFoundError, StrategyNotFoundError
from tests.factories import make_request_info, make_snapshot


def test_routing_names() -> None:
    assert ROUTING_NAMES == (
        "load_balanced",
        "round_robin",
        "random",
        "power_of_two",
        "affinity",
        "locality",
        "topology_aware",
    )
    assert len({s.params_type for s in STRATEGIES}) == len(STRATEGIES)


@pytest.mark.parametrize("name", ROUTING_NAMES)
def test_every_name_builds_a_working_router(name: str) -> None:
    router = build_router(name, seed=1)
    assert isinstance(router, Router)
    assert router.name == name
    decision = router.route(make_request_info(user_id="u"), make_snapshot(3))
    assert decision is not None
    assert decision.reason.startswith(f"{name}: ")
    described = router.describe()
    assert described["name"] == name
    assert isinstance(described["params"], dict)


def test_names_are_forgiving_about_case_and_dashes() -> None:
    assert build_router("Load-Balanced").name == "load_balanced"
    assert get_strategy(" topology_aware ").name == "topology_aware"


def test_unknown_name_lists_the_valid_ones() -> None:
    with pytest.raises(StrategyNotFoundError) as err:
        build_router("fastest")
    assert isinstance(err.value, NotFoundError)
    assert err.value.http_status == 404
    for name in ROUTING_NAMES:
        assert name in err.value.message


def test_params_are_applied() -> None:
    router = build_router("locality", {"load_slack": 0.3, "prefix_weight": 5})
    assert router.params["load_slack"] == 0.3
    assert router.params["prefix_weight"] == 5.0
    assert isinstance(router.params["prefix_weight"], float)
    assert {"name": "prefix_match", "weight": 5.0} in router.describe()["scorers"]  # type: ignore[operator]


@pytest.mark.parametrize(
    ("name", "params", "key", "text"),
    [
        ("load_balanced", {"bogus": 1}, "bogus", "unknown parameter"),
        ("random", {"anything": 1}, "anything", "valid: none"),
        ("affinity", {"overload_threshold": "high"}, "overload_threshold", "number"),
        ("affinity", {"overload_threshold": True}, "overload_threshold", "number"),
        ("affinity", {"overload_threshold": 2.0}, "overload_threshold", "(0, 1]"),
        ("locality", {"load_slack": float("inf")}, "load_slack", "finite"),
        ("topology_aware", {"load_weight": -1}, "load_weight", ">= 0"),
        ("round_robin", {"kv_threshold": 0}, "kv_threshold", "(0, 1]"),
    ],
)
def test_bad_params_raise_config_error_with_the_key(
    name: str, params: dict[str, Any], key: str, text: str
) -> None:
    with pytest.raises(ConfigError) as err:
        build_router(name, params)
    assert err.value.key == key
    assert text in err.value.message
    assert err.value.http_status == 400


def test_params_must_be_a_table() -> None:
    with pytest.raises(ConfigError, match="table"):
        build_router("locality", [("load_slack", 0.2)])  # type: ignore[arg-type]


def test_seed_makes_routing_reproducible() -> None:
    snap = make_snapshot(8)

    def run(seed: int | None) -> list[str]:
        router = build_router("random", seed=seed)
        out = []
        for n in range(40):
            decision = router.route(make_request_info(f"r{n}"), snap)
            assert decision is not None
            out.append(decision.instance_id)
        return out

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_leg() -> None:
    assert build_router("load_balanced", leg="decode").leg == "decode"
    with pytest.raises(ConfigError) as err:
        build_router("load_balanced", leg="sideways")  # type: ignore[arg-type]
    assert err.value.key == "leg"


def test_each_build_is_independent() -> None:
    snap = make_snapshot(3)
    a = build_router("round_robin")
    b = build_router("round_robin")
    first = a.route(make_request_info(), snap)
    assert first is not None
    second = a.route(make_request_info(), snap)
    fresh = b.route(make_request_info(), snap)
    assert second is not None
    assert fresh is not None
    assert fresh.instance_id == first.instance_id != second.instance_id
