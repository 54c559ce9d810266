"""The simulator's fleet state (``sage_llm.sim.cluster_state``): what a sampled snapshot is
augmented with for the request being routed."""

from __future__ import annotations

from typing import Any

from sage_llm.control_plane.routing.scorers import rendezvous_owner
from sage_llm.sim.cluster import ClusterSimulator, make_fleet
from sage_llm.sim.cluster_state import FleetState
from sage_llm.tokens import block_hashes
from tests.factories import make_request_info, make_snapshot


def _sampled_fleet(routing: str) -> FleetState:
    """Six instances of one slot each, sampled two at a time above one instance."""
    sim = ClusterSimulator(
        make_fleet(6, max_concurrency=1),
        policy="fifo",
        routing=routing,
        sample_above=1,
        max_candidates=2,
    )
    return sim.fleet


def _augmented(fleet: FleetState, **request: Any) -> list[str]:
    info = make_request_info("q", prompt_tokens=64, max_tokens=8, **request)
    snap = fleet.augment(make_snapshot([], prefix=fleet.prefix), info)
    return [v.instance_id for v in snap]


def test_the_preferred_and_previous_instances_are_added() -> None:
    fleet = _sampled_fleet("load_balanced")
    assert _augmented(fleet, previous_instance_id="sim-3") == ["sim-3"]
    assert _augmented(fleet, preferred_instance_id="sim-2", previous_instance_id="sim-3") == [
        "sim-2",
        "sim-3",
    ]


def test_only_prefix_holders_with_a_free_slot_are_added() -> None:
    fleet = _sampled_fleet("locality")
    hashes = block_hashes(list(range(1, 65)), 16)
    fleet.prefix.insert("sim-0", hashes)
    fleet.prefix.insert("sim-1", hashes)
    assert _augmented(fleet, block_hashes=hashes) == ["sim-0", "sim-1"]
    fleet.by_id["sim-0"].state.in_flight = 1  # its one slot taken
    assert _augmented(fleet, block_hashes=hashes) == ["sim-1"]


def test_the_sticky_owner_is_the_owner_over_the_whole_ring_even_when_full() -> None:
    fleet = _sampled_fleet("affinity")
    owner = rendezvous_owner("user-7", [f"sim-{i}" for i in range(6)])
    assert owner is not None
    fleet.by_id[owner].state.in_flight = 1  # its one slot taken before it is first asked
    assert _augmented(fleet, user_id="user-7") == [owner]


def _lora_fleet(max_loras: int = 2) -> FleetState:
    """Six instances of two concurrent requests and ``max_loras`` LoRA slots each,
    sampled two at a time; the first four serve adapters a and b, the last two only a."""
    specs = make_fleet(6, max_concurrency=2)
    for n, spec in enumerate(specs):
        spec.instance.lora_adapters = ["a", "b"] if n < 4 else ["a"]
        spec.instance.metadata["sim_max_loras"] = max_loras
    sim = ClusterSimulator(
        specs, policy="fifo", routing="load_balanced", sample_above=1, max_candidates=2
    )
    return sim.fleet


def test_adapters_resolve_to_their_model_and_the_instances_not_serving_them() -> None:
    fleet = _lora_fleet()
    assert fleet.adapter_model == {"a": "llama-3-8b", "b": "llama-3-8b"}
    assert fleet.without_adapter("llama-3-8b", "a") == frozenset()
    assert fleet.without_adapter("llama-3-8b", "b") == {"sim-4", "sim-5"}
    assert fleet.resolve("b") == ("llama-3-8b", "b")
    assert fleet.resolve("llama-3-8b") == ("llama-3-8b", None)
    assert fleet.resolve("llama-3-8b:b") == ("llama-3-8b", "b")  # SGLang's name
    assert fleet.resolve("llama-3-8b:z") is None and fleet.resolve("z") is None


def test_where_an_adapter_runs_with_a_free_slot_is_added() -> None:
    fleet = _lora_fleet()
    for iid in ("sim-1", "sim-3"):
        fleet.lora_call_started(fleet.by_id[iid], "a")
    fleet.by_id["sim-3"].state.in_flight = 2  # at its bound
    assert _augmented(fleet) == []
    info = make_request_info("q", prompt_tokens=64, max_tokens=8)
    snap = fleet.augment(make_snapshot([], prefix=fleet.prefix), info, "a")
    assert [v.instance_id for v in snap] == ["sim-1"]
    fleet.lora_call_ended(fleet.by_id["sim-1"], "a")
    fleet.lora_call_ended(fleet.by_id["sim-3"], "a")
    assert fleet.lora_runs == {}


def test_the_whole_models_free_lora_slots_follow_calls_and_stats() -> None:
    fleet = _lora_fleet(max_loras=2)
    assert fleet.lora_fleet("llama-3-8b") is None  # no stats read yet: slots not known
    for slot in fleet.slots:
        slot.state.last_stats = slot.core.stats()
    fleet.refresh_lora()
    totals = fleet.lora_fleet("llama-3-8b")
    assert totals is not None
    assert totals.free == 12 and set(totals.served) == {"a", "b"} and not totals.running
    s0 = fleet.by_id["sim-0"]
    fleet.lora_call_started(s0, "a")
    fleet.lora_call_started(s0, "a")  # the same adapter: one slot
    fleet.lora_call_started(s0, "b")
    totals = fleet.lora_fleet("llama-3-8b")
    assert totals is not None and totals.free == 10 and set(totals.running) == {"a", "b"}
    s0.state.lora_others = frozenset({"z"})  # another client's adapter, as stats say
    fleet.refresh_lora()
    totals = fleet.lora_fleet("llama-3-8b")
    assert totals is not None and totals.free == 10 and set(totals.running) == {"a", "b", "z"}
    for adapter in ("a", "a", "b"):
        fleet.lora_call_ended(s0, adapter)
    totals = fleet.lora_fleet("llama-3-8b")
    assert totals is not None and totals.free == 11  # z still holds one on sim-0
