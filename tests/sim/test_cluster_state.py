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
