"""The fleet as the simulated control plane tracks it, and the snapshots decisions see.

:class:`FleetState` keeps the instances by id and by model, which of them have a free
slot, and each instance's cached view; it builds the
:class:`~sage_llm.control_plane.snapshot.ClusterSnapshot` of every decision, sampling the
candidates of large model groups (see :mod:`sage_llm.sim.cluster`).
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence

from sage_llm.control_plane.instances import InstanceRegistry
from sage_llm.control_plane.pd.orchestrator import uses_pd
from sage_llm.control_plane.routing.base import Router
from sage_llm.control_plane.routing.lora import LoraFleet
from sage_llm.control_plane.routing.prefix_index import PrefixIndex
from sage_llm.control_plane.routing.scorers import rendezvous_owner
from sage_llm.control_plane.routing.strategies import router_wants
from sage_llm.control_plane.snapshot import (
    ClusterSnapshot,
    InstanceView,
    RequestInfo,
    fill_snapshot,
)
from sage_llm.sim.cluster_fleet import FreeList, InstanceSlot, SimInstanceSpec
from sage_llm.types import ExecutionInstanceType

__all__ = ["FleetState", "router_wants"]

_STICKY_CACHE = 65_536


def _role_kind(role: ExecutionInstanceType) -> int:
    """Which of a sampled PD model's free lists holds an instance of ``role``: 0 prefill-only,
    1 decode-only, 2 whole-request (``GENERAL``/``HYBRID``)."""
    if role is ExecutionInstanceType.PREFILLING:
        return 0
    return 1 if role is ExecutionInstanceType.DECODING else 2


class FleetState:
    """Instances, free slots, cached views and per-decision snapshots.

    A model served by more than ``sample_above`` instances is *sampled*: its part of a
    snapshot is about ``max_candidates`` instances with a free slot drawn with ``rng``;
    :meth:`augment` then adds the instances the router looks for by identity.
    """

    def __init__(
        self,
        specs: Sequence[SimInstanceSpec],
        *,
        prefix: PrefixIndex,
        max_candidates: int,
        sample_above: int,
        rng: random.Random,
        router: Router,
    ) -> None:
        self.registry = InstanceRegistry()
        self.slots = [InstanceSlot(n, spec, self.registry) for n, spec in enumerate(specs)]
        self.by_id = {s.instance_id: s for s in self.slots}
        self.groups: dict[str, list[InstanceSlot]] = {}
        for s in self.slots:
            self.groups.setdefault(s.model, []).append(s)
        self.free = {m: FreeList() for m in self.groups}
        for s in self.slots:
            s.sampled = len(self.groups[s.model]) > sample_above
            self.free[s.model].add(s.index)
        self.free_total = len(self.slots)
        """Instances with a free slot, over all models."""
        self.sampled_models = [m for m, g in self.groups.items() if len(g) > sample_above]
        self.pd_models = tuple(m for m, g in self.groups.items() if uses_pd(s.role for s in g))
        """The models whose fleet is set up for PD (an instance of theirs is PREFILLING,
        DECODING or HYBRID): run disaggregated when PD is on."""
        self.role_free: dict[str, dict[int, FreeList]] = {}
        """For a sampled PD model: its instances with a free slot by kind of role
        (:func:`_role_kind`), each sampled on its own, so that a sample holds both legs'
        candidates where the model has them."""
        for model in self.sampled_models:
            if model in self.pd_models:
                lists: dict[int, FreeList] = {}
                for s in sorted(self.groups[model], key=lambda s: _role_kind(s.role)):
                    lists.setdefault(_role_kind(s.role), FreeList()).add(s.index)
                self.role_free[model] = lists
        self.prefix = prefix
        self.max_candidates = max_candidates
        self.want_prefix, self.want_sticky = router_wants(router)
        self._rng = rng
        self.view_of: list[InstanceView] = [s.build_view() for s in self.slots]
        """Each instance's view, by index, as of when it was last read (see ``stale``)."""
        self.stale = bytearray(len(self.slots))
        """1 where the instance changed since its view was built (rebuilt when read)."""
        self._full = [s for s in self.slots if not s.sampled]
        self._views: list[InstanceView] = [self.view_of[s.index] for s in self._full]
        self._full_pos = {s.index: n for n, s in enumerate(self._full)}
        self._dirty: set[int] = set()
        self._sticky: dict[tuple[str, str], InstanceSlot | None] = {}
        self.adapter_model: dict[str, str] = {}
        """The LoRA adapters served, with their model: that of the first instance serving
        one (as ``InstanceRegistry.adapter_base``), not a name a model is served under."""
        for s in self.slots:
            for name in sorted(s.state.adapters):
                if name not in self.groups:
                    self.adapter_model.setdefault(name, s.model)
        self._without: dict[tuple[str, str], frozenset[str]] = {}
        """The instances of a model that do not serve one of its adapters, by both."""
        self._named: dict[str, tuple[str, str | None] | None] = {}
        """What other names requests asked for resolved to (:meth:`resolve`)."""
        self.lora_runs: dict[str, dict[int, None]] = {}
        """The instances (by index) with a call for a LoRA adapter in flight, by adapter
        (added to a sampled model's snapshot for that adapter's requests)."""
        self._lora_served = {
            m: frozenset(name for s in self.groups[m] for name in s.state.adapters)
            for m in self.sampled_models
        }
        """The adapters each sampled model's instances serve."""
        self._lora_free: dict[str, int | None] = {}
        """Each sampled model's free LoRA slots over all its instances (None while one of
        them does not say how many it has); see :meth:`refresh_lora`."""
        self._lora_others: set[str] = set()
        """The adapters of another client's requests on some instance, as the stats said."""

    # -- changes ---------------------------------------------------------------------------

    def leave_free(self, slot: InstanceSlot) -> None:
        """``slot`` reached its concurrency bound: it has no free slot."""
        self.free[slot.model].discard(slot.index)
        self.free_total -= 1
        lists = self.role_free.get(slot.model)
        if lists is not None:
            lists[_role_kind(slot.role)].discard(slot.index)

    def join_free(self, slot: InstanceSlot) -> None:
        """``slot`` was at its bound and has a free slot again."""
        self.free[slot.model].add(slot.index)
        self.free_total += 1
        lists = self.role_free.get(slot.model)
        if lists is not None:
            lists[_role_kind(slot.role)].add(slot.index)

    def mark(self, slot: InstanceSlot) -> None:
        """``slot``'s live state changed: rebuild its view before it is next read."""
        self.stale[slot.index] = 1
        if not slot.sampled:
            self._dirty.add(slot.index)

    def lora_call_started(self, slot: InstanceSlot, adapter: str) -> None:
        """A call for the LoRA ``adapter`` starts on ``slot`` (as the dispatcher counts it)."""
        state = slot.state
        before = state.lora_slots_left()
        state.lora_call_started(adapter)
        if state.lora_in_flight[adapter] == 1:
            self.lora_runs.setdefault(adapter, {})[slot.index] = None
            if slot.sampled:
                self._slots_changed(slot, before)

    def lora_call_ended(self, slot: InstanceSlot, adapter: str) -> None:
        """A call for the LoRA ``adapter`` on ``slot`` is over."""
        state = slot.state
        before = state.lora_slots_left()
        state.lora_call_ended(adapter)
        if adapter not in state.lora_in_flight:
            runs = self.lora_runs[adapter]
            del runs[slot.index]
            if not runs:
                del self.lora_runs[adapter]
            if slot.sampled:
                self._slots_changed(slot, before)

    def _slots_changed(self, slot: InstanceSlot, before: int | None) -> None:
        """``slot`` (of a sampled model) had ``before`` LoRA slots free: its model's total
        follows its change."""
        total = self._lora_free.get(slot.model)
        after = slot.state.lora_slots_left()
        if total is not None and before is not None and after is not None:
            self._lora_free[slot.model] = total + after - before

    def refresh_lora(self) -> None:
        """Count the sampled models' free LoRA slots again (after their stats were read:
        ``max_lora`` and another client's adapters come from them)."""
        others: set[str] = set()
        for model in self.sampled_models:
            total: int | None = 0
            for slot in self.groups[model]:
                state = slot.state
                others.update(state.lora_others)
                left = state.lora_slots_left()
                if left is None:
                    total = None
                elif total is not None:
                    total += left
            self._lora_free[model] = total
        self._lora_others = others

    def lora_fleet(self, model: str) -> LoraFleet | None:
        """What all the instances of the sampled ``model`` hold for LoRA slot routing (None
        for a model that is not sampled, or one of whose instances does not say how many
        slots it has)."""
        free = self._lora_free.get(model)
        if free is None:
            return None
        running: Collection[str] = self.lora_runs
        if self._lora_others:
            running = self._lora_others.union(running)
        return LoraFleet(free, running, self._lora_served[model])

    def without_adapter(self, model: str, adapter: str) -> frozenset[str]:
        """The instances of ``model`` that do not serve its LoRA ``adapter``."""
        out = self._without.get((model, adapter))
        if out is None:
            group = self.groups[model]
            out = frozenset(s.instance_id for s in group if adapter not in s.state.adapters)
            self._without[(model, adapter)] = out
        return out

    def resolve(self, name: str) -> tuple[str, str | None] | None:
        """What a request's ``model`` names, as the control plane reads it: (the model,
        None) for a model served here; (its model, the adapter) for a LoRA adapter served
        here, by its name or SGLang's ``MODEL:ADAPTER``; None for neither."""
        if name in self.groups:
            return name, None
        base = self.adapter_model.get(name)
        if base is not None:
            return base, name
        if name not in self._named:  # (once per name: the registry reads every instance)
            if len(self._named) >= _STICKY_CACHE:
                self._named.clear()
            self._named[name] = self.registry.split_adapter(name)
        return self._named[name]

    # -- snapshots -------------------------------------------------------------------------

    def fresh_view(self, slot: InstanceSlot) -> InstanceView:
        """``slot``'s view now (rebuilt if it changed since it was last read)."""
        index = slot.index
        if self.stale[index]:
            self.view_of[index] = view = slot.build_view()
            self.stale[index] = 0
            return view
        return self.view_of[index]

    def snapshot(self, now: float) -> ClusterSnapshot:
        """The fleet for the next decision: every instance of unsampled models, a fresh
        sample of each sampled one."""
        if self._dirty:
            views, pos, slots = self._views, self._full_pos, self.slots
            for index in self._dirty:
                views[pos[index]] = self.fresh_view(slots[index])
            self._dirty.clear()
        if not self.sampled_models:
            return fill_snapshot(now, tuple(self._views), self.prefix)
        out = list(self._views)
        append = out.append
        slots, k = self.slots, self.max_candidates
        view_of, stale = self.view_of, self.stale
        draw = self._rng.random
        role_free = self.role_free
        for model in self.sampled_models:
            lists = role_free.get(model)
            for free in (self.free[model],) if lists is None else lists.values():
                # free.sample(self._rng, k), inlined for the large-set case: this runs for
                # every decision (the same draws, the same members, the same order)
                items = free.items
                n = len(items)
                if n > 4 * k:
                    picked = sorted({items[int(draw() * n)] for _ in range(k)})
                else:
                    picked = free.sample(self._rng, k)
                for i in picked:  # self.fresh_view(slots[i]), inlined: no slot read unless
                    if stale[i]:  # it is stale
                        view_of[i] = slots[i].build_view()
                        stale[i] = 0
                    append(view_of[i])
        return fill_snapshot(now, tuple(out), self.prefix)

    def skip_snapshot(self) -> None:
        """Advance the sampling exactly as :meth:`snapshot` would, for a caller that needs
        no instance views (views are rebuilt lazily, so skipping them changes nothing)."""
        rng, k = self._rng, self.max_candidates
        for model in self.sampled_models:
            lists = self.role_free.get(model)
            for free in (self.free[model],) if lists is None else lists.values():
                free.skip(rng, k)

    def augment(
        self,
        snap: ClusterSnapshot,
        info: RequestInfo,
        adapter: str | None = None,
        *,
        prefix: bool | None = None,
    ) -> ClusterSnapshot:
        """``snap`` plus, for a sampled model, the request's preferred and previous
        instances, its sticky owner and the prefix holders with a free slot (when the
        router reads them, or ``prefix`` says so: a PD pair's prefill leg is scored by its
        prefix), and for a request for the LoRA ``adapter`` up to ``max_candidates``
        instances with a free slot where it runs (those the LoRA slot routing prefers)."""
        group = self.groups.get(info.model)
        if group is None or not group[0].sampled:
            return snap
        want_prefix = self.want_prefix if prefix is None else prefix
        runs = None if adapter is None else self.lora_runs.get(adapter)
        if (
            info.preferred_instance_id is None
            and info.previous_instance_id is None
            and not (self.want_sticky and info.sticky_key is not None)
            and not (want_prefix and info.block_hashes)
            and not runs
        ):
            return snap  # nothing to add (the common case)
        present = {v.instance_id for v in snap.instances}
        extra: list[InstanceSlot] = []

        def add(slot: InstanceSlot | None) -> None:
            if slot is not None and slot.instance_id not in present:
                present.add(slot.instance_id)
                extra.append(slot)

        for iid in (info.preferred_instance_id, info.previous_instance_id):
            if iid is not None:
                add(self.by_id.get(iid))
        key = info.sticky_key
        if self.want_sticky and key is not None:
            add(self._sticky_owner(info.model, key))
        if want_prefix and info.block_hashes:
            ranked = sorted(
                (-depth, s.index)
                for iid, depth in self.prefix.match(info.block_hashes).items()
                if (s := self.by_id.get(iid)) is not None
                and s.model == info.model
                and s.has_capacity
            )
            for _, index in ranked[: self.max_candidates]:
                add(self.slots[index])
        if runs:
            found = 0
            for index in runs:
                slot = self.slots[index]
                if slot.has_capacity:
                    add(slot)
                    found += 1
                    if found == self.max_candidates:
                        break
        if not extra:
            return snap
        views = tuple(self.fresh_view(s) for s in extra)
        return fill_snapshot(snap.now, snap.instances + views, snap.prefix)

    def _sticky_owner(self, model: str, key: str) -> InstanceSlot | None:
        """The session-affinity owner of ``key`` over the whole model ring (cached)."""
        cache_key = (model, key)
        if cache_key not in self._sticky:
            if len(self._sticky) >= _STICKY_CACHE:
                self._sticky.clear()
            owner = rendezvous_owner(key, (s.instance_id for s in self.groups[model]))
            self._sticky[cache_key] = None if owner is None else self.by_id[owner]
        return self._sticky[cache_key]
