"""Filters: healthy, model, role, capacity (KV threshold), load cap, leg candidates."""

from __future__ import annotations

import pytest

from sage_llm.control_plane.routing.base import Filter
from sage_llm.control_plane.routing.filters import (
    CapacityFilter,
    HealthyFilter,
    LoadCapFilter,
    ModelFilter,
    RoleFilter,
    leg_candidates,
    role_runs,
)
from sage_llm.types import ExecutionInstanceType as Role
from tests.factories import make_instance_view, make_request_info, make_snapshot


def ids(views: object) -> list[str]:
    return [v.instance_id for v in views]  # type: ignore[attr-defined]


def test_filters_follow_the_protocol() -> None:
    for f in (HealthyFilter(), ModelFilter(), RoleFilter(), CapacityFilter(), LoadCapFilter()):
        assert isinstance(f, Filter)


def test_healthy_filter_drops_unhealthy_and_draining() -> None:
    views = [
        make_instance_view("ok"),
        make_instance_view("sick", healthy=False),
        make_instance_view("draining", accepting=False),
    ]
    snap = make_snapshot(views)
    assert ids(HealthyFilter().filter(make_request_info(), views, snap)) == ["ok"]


def test_model_filter_keeps_only_the_request_model() -> None:
    views = [make_instance_view("a"), make_instance_view("b", model="other")]
    snap = make_snapshot(views)
    assert ids(ModelFilter().filter(make_request_info(), views, snap)) == ["a"]


def test_role_filter_by_leg_and_by_exact_role() -> None:
    views = [
        make_instance_view("g", role=Role.GENERAL),
        make_instance_view("p", role=Role.PREFILLING),
        make_instance_view("d", role=Role.DECODING),
        make_instance_view("h", role=Role.HYBRID),
    ]
    snap = make_snapshot(views)
    req = make_request_info()
    assert ids(RoleFilter("whole").filter(req, views, snap)) == ["g", "h"]
    assert ids(RoleFilter("prefill").filter(req, views, snap)) == ["g", "p", "h"]
    assert ids(RoleFilter("decode").filter(req, views, snap)) == ["g", "d", "h"]
    assert ids(RoleFilter("any").filter(req, views, snap)) == ["g", "p", "d", "h"]
    assert ids(RoleFilter(Role.DECODING).filter(req, views, snap)) == ["d"]


def test_role_filter_rejects_unknown_legs() -> None:
    with pytest.raises(ValueError, match="unknown leg"):
        RoleFilter("sideways")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown leg"):
        role_runs("sideways", Role.GENERAL)  # type: ignore[arg-type]


def test_capacity_filter_drops_full_instances() -> None:
    views = [make_instance_view("full", in_flight=4, max_concurrency=4), make_instance_view("ok")]
    snap = make_snapshot(views)
    assert ids(CapacityFilter().filter(make_request_info(), views, snap)) == ["ok"]


def test_capacity_filter_drops_kv_saturated_instances_while_others_have_room() -> None:
    views = [make_instance_view("hot", kv_usage=0.97), make_instance_view("cool", kv_usage=0.4)]
    snap = make_snapshot(views)
    req = make_request_info()
    assert ids(CapacityFilter(0.95).filter(req, views, snap)) == ["cool"]
    all_hot = [make_instance_view("x", kv_usage=0.99), make_instance_view("y", kv_usage=0.96)]
    assert ids(CapacityFilter(0.95).filter(req, all_hot, make_snapshot(all_hot))) == ["x", "y"]


def test_capacity_filter_drops_an_instance_exactly_at_the_kv_threshold() -> None:
    views = [make_instance_view("full", kv_usage=0.95), make_instance_view("ok", kv_usage=0.5)]
    assert ids(CapacityFilter(0.95).filter_runnable(views)) == ["ok"]
    req = make_request_info()
    assert ids(CapacityFilter(0.95).filter(req, views, make_snapshot(views))) == ["ok"]


def test_capacity_filter_rejects_a_bad_threshold() -> None:
    with pytest.raises(ValueError, match="kv_threshold"):
        CapacityFilter(0.0)


def test_load_cap_filter_keeps_instances_within_slack_of_the_least_loaded() -> None:
    views = [
        make_instance_view("a", in_flight=10),
        make_instance_view("b", in_flight=30),
        make_instance_view("c", in_flight=36),
    ]
    snap = make_snapshot(views)
    req = make_request_info()
    assert ids(LoadCapFilter(0.2).filter(req, views, snap)) == ["a", "b"]
    assert ids(LoadCapFilter(0.0).filter(req, views, snap)) == ["a"]
    assert LoadCapFilter().filter(req, [], snap) == []
    with pytest.raises(ValueError, match="slack"):
        LoadCapFilter(1.5)


def test_leg_candidates() -> None:
    views = [
        make_instance_view("g"),
        make_instance_view("p", role=Role.PREFILLING),
        make_instance_view("d", role=Role.DECODING),
        make_instance_view("d-full", role=Role.DECODING, in_flight=100),
        make_instance_view("other", model="other", role=Role.DECODING),
    ]
    snap = make_snapshot(views)
    req = make_request_info(excluded_instances=frozenset({"g"}))
    assert ids(leg_candidates(req, snap, "whole")) == []
    assert ids(leg_candidates(req, snap, "prefill")) == ["p"]
    assert ids(leg_candidates(req, snap, "decode")) == ["d"]
    assert ids(leg_candidates(req, snap, "any")) == ["p", "d"]
    assert ids(leg_candidates(make_request_info(), snap, "whole")) == ["g"]
