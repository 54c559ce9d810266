"""build_policy: names, params from config mappings, and clear errors."""

from __future__ import annotations

import math
from typing import Any, cast

import pytest

from sage_llm.control_plane.scheduling.base import SchedulingPolicy
from sage_llm.control_plane.scheduling.priority import PriorityPolicy
from sage_llm.control_plane.scheduling.registry import (
    POLICY_NAMES,
    build_policy,
    may_read_block_hashes,
    params_class,
)
from sage_llm.control_plane.scheduling.slo_aware import SLOAwarePolicy
from sage_llm.errors import ConfigError, PolicyNotFoundError
from tests.factories import make_request_info, make_snapshot


def test_the_seeds_five_policy_names_then_fair() -> None:
    assert POLICY_NAMES == (
        "fifo", "priority", "slo_aware", "cost_optimized", "adaptive", "fair",
    )  # fmt: skip


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_every_policy_builds_with_defaults_and_queues(name: str) -> None:
    policy = build_policy(name)
    assert isinstance(policy, SchedulingPolicy)
    assert policy.name == name
    snap = make_snapshot(2, now=1.0)
    req = make_request_info("r", arrival=0.5)
    assert policy.admit(req, snap).admitted
    policy.push(req)
    assert len(policy) == 1
    assert policy.peek(snap) == req
    assert policy.pop(snap) == req
    assert len(policy) == 0
    info = policy.describe()
    assert info["name"] == name
    assert isinstance(info["params"], dict)
    assert isinstance(info["state"], dict)


def test_params_from_a_mapping() -> None:
    policy = build_policy("priority", {"aging_interval_s": 2, "max_wait_s": math.inf})
    assert isinstance(policy, PriorityPolicy)
    assert policy.params == PriorityPolicy.Params(aging_interval_s=2.0, max_wait_s=math.inf)
    assert isinstance(policy.params.aging_interval_s, float)
    slo = build_policy("slo_aware", {"infeasible_action": "reject"})
    assert isinstance(slo, SLOAwarePolicy)
    assert slo.params.infeasible_action == "reject"
    assert params_class("slo_aware") is SLOAwarePolicy.Params


def test_policy_names_are_case_insensitive_with_dashes_read_as_underscores() -> None:
    assert build_policy("SLO-Aware").name == "slo_aware"
    assert build_policy("Cost-Optimized").name == "cost_optimized"
    assert params_class("FIFO") is params_class("fifo")


def test_no_built_in_policy_reads_block_hashes_but_another_may() -> None:
    for name in POLICY_NAMES:
        assert not may_read_block_hashes(build_policy(name)), name
    assert may_read_block_hashes(cast(SchedulingPolicy, object()))


def test_unknown_policy_lists_the_valid_names() -> None:
    with pytest.raises(PolicyNotFoundError) as err:
        build_policy("round_robin")
    message = str(err.value)
    assert "round_robin" in message
    for name in POLICY_NAMES:
        assert name in message
    assert err.value.http_status == 404


@pytest.mark.parametrize(
    ("name", "params", "key"),
    [
        ("fifo", {"max_wait_s": 3.0}, "max_wait_s"),
        ("priority", {"aging": 3.0}, "aging"),
        ("priority", {"aging_interval_s": "fast"}, "aging_interval_s"),
        ("priority", {"aging_interval_s": True}, "aging_interval_s"),
        ("priority", {"max_wait_s": -5}, "max_wait_s"),
        ("slo_aware", {"infeasible_action": "drop"}, "infeasible_action"),
        ("cost_optimized", {"cost_tolerance": -0.5}, "cost_tolerance"),
        ("cost_optimized", {"order": 3}, "order"),
        ("adaptive", {"window": 2.5}, "window"),
        ("adaptive", {"min_dwell_s": None}, "min_dwell_s"),
        ("adaptive", {"light_load": 2.0}, "light_load"),
    ],
)
def test_bad_params_raise_config_error_naming_the_key(
    name: str, params: dict[str, Any], key: str
) -> None:
    with pytest.raises(ConfigError) as err:
        build_policy(name, params)
    assert err.value.key == key
    assert key in str(err.value)
