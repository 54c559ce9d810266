"""Routing a LoRA adapter's request by its engines' LoRA slots.

A vLLM engine started with ``--enable-lora --max-loras N`` holds requests for at most N
adapters in one batch: a request for another waits until one of them has no request
left, while the requests behind it go past. :class:`LoraRoom` narrows the instances a
request for an adapter may go to, to those whose engine can take it into its batch at
once. The dispatcher of the asyncio control plane and the cluster simulator's control
plane (:mod:`sage_llm.sim.cluster_control`) both ask it, each with its own registry of
:class:`~sage_llm.control_plane.instances.InstanceState` (what is known of each engine's
slots: its stats' ``max_lora``, the calls in flight there by adapter, another client's
adapters).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, NamedTuple

from sage_llm.control_plane.snapshot import ClusterSnapshot, RequestInfo

if TYPE_CHECKING:
    from sage_llm.control_plane.instances import InstanceState

__all__ = ["LORA_DEMAND_WINDOW_S", "LoraFleet", "LoraRoom"]

LORA_DEMAND_WINDOW_S = 30.0
"""How long a LoRA adapter counts as in demand after a request for it: while the adapters
in demand that no engine runs outnumber the free LoRA slots, a request for an adapter
that runs somewhere goes where it runs (see :meth:`LoraRoom.narrow`)."""


class LoraFleet(NamedTuple):
    """What all the instances of a model hold, for a decision whose snapshot holds only a
    sample of them (the cluster simulator's large fleets): their free LoRA slots, the
    adapters running there, and the adapters they serve."""

    free: int
    running: Collection[str]
    served: Collection[str]


class LoraRoom:
    """Which instances have room for a LoRA adapter's request, and which adapters are in
    demand (:attr:`asked`)."""

    __slots__ = ("asked",)

    def __init__(self) -> None:
        self.asked: dict[str, float] = {}
        """LoRA adapters by when a request for one was last routed, oldest first (those
        asked for within :data:`LORA_DEMAND_WINDOW_S` of the latest, and that one)."""

    def narrow(
        self,
        adapter: str,
        info: RequestInfo,
        snap: ClusterSnapshot,
        allowed: frozenset[str] | None,
        *,
        now: float,
        find: Callable[[str], InstanceState | None],
        fleet: LoraFleet | None = None,
    ) -> tuple[frozenset[str] | None, frozenset[str] | None]:
        """``allowed`` narrowed, for a request (``info``) for the LoRA ``adapter`` routed
        at ``now``, to the instances of its model (not excluded from it) whose engine can
        take it into its batch at once: it runs the adapter already, or has one of its
        LoRA slots (vLLM's ``--max-loras``) free (:meth:`InstanceState.lora_slots_left`;
        ``find`` gives an instance's state by id). On the others it would wait for a slot.

        A free slot taken by one adapter is one fewer for the next. When the adapters in
        demand (asked for in the last :data:`LORA_DEMAND_WINDOW_S`, served here) that run
        on no engine here outnumber the free slots left beside the one this request would
        take, a request for an adapter that runs somewhere goes where it runs, leaving the
        free slots to them; otherwise it may go to any engine with room, which spreads a
        busy adapter's load.

        ``allowed`` itself when no engine can take it at once, or all can. A preference,
        as a parallelism hint is: when the router finds none of them able to take the
        request now, it is routed without it. Returned with the engines with room when the
        first set is those where it runs (tried next, when none of those can take it now:
        at their concurrency bound), else with None.

        ``fleet``: when ``snap`` holds a sample of the model's instances, what all of them
        hold; the free slots and the adapters in demand are then counted over all of them
        (over the sample, packing would be decided on a few engines' free slots)."""
        asked = self.asked
        asked.pop(adapter, None)
        asked[adapter] = now  # (last: the dict stays ordered by time)
        horizon = now - LORA_DEMAND_WINDOW_S
        while (oldest := next(iter(asked))) != adapter and asked[oldest] < horizon:
            del asked[oldest]
        runs: list[str] = []
        room: list[str] = []
        full: list[str] = []
        free = 0
        counted = True  # every engine says how many slots it has
        running: set[str] = set()
        served: set[str] = set()
        model, excluded = info.model, info.excluded_instances
        for view in snap:
            iid = view.instance_id
            if (allowed is not None and iid not in allowed) or view.model != model:
                continue
            if iid in excluded:  # (those that do not serve the adapter among them)
                continue
            state = find(iid)
            left = None if state is None else state.lora_slots_left()
            if state is None or left is None:
                counted = False
                room.append(iid)
                continue
            calls, others = state.lora_in_flight, state.lora_others
            running.update(calls)
            running.update(others)
            served.update(state.adapters)
            free += left
            if adapter in calls or adapter in others:
                runs.append(iid)
            else:
                (room if left > 0 else full).append(iid)
        if runs and (room or full) and counted:
            known: Collection[str] = served
            elsewhere: Collection[str] = ()  # running on instances outside the snapshot
            if fleet is not None:
                free, known, elsewhere = fleet.free, fleet.served, fleet.running
            waiting = sum(
                1
                for name, when in asked.items()
                if when >= horizon
                and name in known
                and name != adapter
                and name not in running
                and name not in elsewhere
            )
            if free - 1 < waiting:
                return frozenset(runs), frozenset(room + runs) if room else None
        room.extend(runs)
        return (frozenset(room) if room and full else allowed), None
