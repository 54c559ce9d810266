"""Which instances have room for a LoRA adapter's request (``LoraRoom``), on its own: the
asyncio dispatcher's use of it is in ``tests/control_plane/test_manager_adapters.py``,
the cluster simulator's in ``tests/sim/test_cluster_lora.py``."""

from __future__ import annotations

from sage_llm.control_plane.instances import InstanceRegistry, InstanceState, LatencyPriors
from sage_llm.control_plane.routing.lora import LORA_DEMAND_WINDOW_S, LoraRoom
from sage_llm.engines.base import EngineStats
from tests.factories import make_instance, make_request_info, make_snapshot

ADAPTERS = ["a", "b", "c", "d"]


def _fleet(n: int, max_lora: int | None = 2) -> dict[str, InstanceState]:
    registry = InstanceRegistry()
    states = {}
    for i in range(n):
        inst = make_instance(f"i{i}", lora_adapters=list(ADAPTERS))
        state = registry.add(inst, None, LatencyPriors())  # type: ignore[arg-type]
        if max_lora is not None:
            state.last_stats = EngineStats(max_lora=max_lora)
        states[state.instance_id] = state
    return states


def _narrow(
    room: LoraRoom,
    states: dict[str, InstanceState],
    adapter: str,
    *,
    now: float = 0.0,
    allowed: frozenset[str] | None = None,
    excluded: frozenset[str] = frozenset(),
) -> tuple[frozenset[str] | None, frozenset[str] | None]:
    snap = make_snapshot(len(states))
    info = make_request_info("r", excluded_instances=excluded)
    return room.narrow(adapter, info, snap, allowed, now=now, find=states.get)


def test_room_is_where_the_adapter_runs_or_a_slot_is_free() -> None:
    states = _fleet(3)
    states["i0"].lora_call_started("a")
    states["i1"].lora_others = frozenset({"x", "y"})  # another client's: no slot free
    states["i2"].lora_call_started("b")
    states["i2"].lora_call_started("c")
    first, wider = _narrow(LoraRoom(), states, "a")
    assert first == frozenset({"i0"}) and wider is None
    first, wider = _narrow(LoraRoom(), states, "d")  # i0 has a slot left
    assert first == frozenset({"i0"}) and wider is None


def test_all_or_none_with_room_leaves_the_routers_choice_alone() -> None:
    states = _fleet(2)
    allowed = frozenset({"i0", "i1"})
    assert _narrow(LoraRoom(), states, "a", allowed=allowed) == (allowed, None)
    for state in states.values():
        state.lora_call_started("b")
        state.lora_call_started("c")
    assert _narrow(LoraRoom(), states, "a") == (None, None)


def test_an_engine_that_does_not_say_its_slots_has_room() -> None:
    states = _fleet(2)
    states["i0"].last_stats = EngineStats()  # no max_lora: not --enable-lora, or not vLLM
    states["i1"].lora_call_started("b")
    states["i1"].lora_call_started("c")
    assert _narrow(LoraRoom(), states, "a") == (frozenset({"i0"}), None)


def test_excluded_and_disallowed_instances_are_not_candidates() -> None:
    states = _fleet(3)
    states["i2"].lora_call_started("b")
    states["i2"].lora_call_started("c")
    first, _ = _narrow(LoraRoom(), states, "a", excluded=frozenset({"i0"}))
    assert first == frozenset({"i1"})
    first, _ = _narrow(LoraRoom(), states, "a", allowed=frozenset({"i0", "i2"}))
    assert first == frozenset({"i0"})


def test_packs_while_adapters_in_demand_outnumber_the_free_slots() -> None:
    """``a`` runs on i0 (one slot left there, two on i1). With b, c and d asked for
    lately and running nowhere, a request for ``a`` stays where ``a`` runs (the engines
    with room are tried next); once they are no longer in demand it may go to either."""
    states = _fleet(2)
    states["i0"].lora_call_started("a")
    room = LoraRoom()
    for name in ("b", "c", "d"):
        room.asked[name] = 0.0
    assert _narrow(room, states, "a", now=1.0) == (frozenset({"i0"}), frozenset({"i0", "i1"}))
    later = LORA_DEMAND_WINDOW_S + 2.0
    assert _narrow(room, states, "a", now=later) == (None, None)  # room on both
    assert list(room.asked) == ["a"]  # b, c and d forgotten


def test_demand_counts_only_adapters_these_instances_serve() -> None:
    states = _fleet(2)
    states["i0"].lora_call_started("a")
    room = LoraRoom()
    for name in ("p", "q", "r"):  # asked for, but served by none of these
        room.asked[name] = 0.0
    assert _narrow(room, states, "a", now=1.0) == (None, None)
