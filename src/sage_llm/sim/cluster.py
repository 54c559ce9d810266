"""Discrete-event cluster simulation: the real policies and routers over simulated engines.

:class:`ClusterSimulator` runs a workload through a fleet of
:class:`~sage_llm.sim.core.SimEngineCore` instances on virtual time, with no asyncio and no
sockets: one event heap holds every engine's step completion (and wake-ups and periodic
stats refreshes); arrivals are read lazily from the workload, so a million requests need
not be in memory at once.

Between events it does what the control plane does, in the same order:

* **intake and admission** as ``ControlPlaneManager`` (queue bound, then ``policy.admit``;
  refused requests end as failed measurements with the manager's error class);
* **dispatch** as ``Dispatcher.dispatch_ready``: while the policy has requests and some
  instance has a free slot, ``policy.pop(snap)``, ``policy.constrain``,
  ``router.route(info, snap, allowed)`` (again unconstrained if that finds nothing; a
  :class:`~sage_llm.control_plane.routing.pipeline.Pipeline` is asked ``route_id``, the
  same pick without the decision record), the assignment accounted before the next
  decision, the prefix index updated; a request that finds no instance goes back into
  the queue at the end of the pass;
* **PD disaggregation** (``pd``, on by default as in the manager) for a model whose fleet
  has PREFILLING, DECODING or HYBRID instances: the policy pops with the dispatcher's
  stand-in view of a free pair, the PD decider and the pair orchestrator choose as the
  dispatcher asks them, and the request runs as vLLM's two legs. Its prefill leg (one
  token, its KV pinned) runs on the prefill engine; when it ends, the prefill instance is
  released with the dispatcher's accounting and the decode leg is queued on the decode
  engine, which pulls the KV over its ``kv_link_gbps`` link before it decodes; the pull
  releases the pinned KV on the prefill engine as the step that finished it starts. Only
  the ``vllm`` connector is simulated;
* **engines**: an idle instance that gets work starts a step at once; a step's tokens and
  finished requests take effect at its end, when the next step starts immediately;
* **accounting** with the registry's own :class:`~sage_llm.control_plane.instances.InstanceState`
  (load counters and its TTFT/TPOT EWMAs), and ``policy.on_complete`` for every request
  (``count_completion()`` where ``on_complete`` is ``QueuedPolicy``'s own, which only
  counts: no completion record is built for it).

**Snapshots.** Views are cached per instance and rebuilt only when that instance changed
(``InstanceSlot.build_view``: what ``InstanceState.view`` builds, filled field by field), so
a snapshot costs no per-instance work beyond the changes. The objects made once per request
or decision (views, ``RequestInfo``, snapshots, completion records, measurements) are
filled the same way, without their frozen dataclass ``__init__``
(``sage_llm.fastinit.field_filler``).

**Candidate sampling (large fleets).** A decision over every instance costs O(instances)
in the routers and policies; at 1,000 instances × 1M requests that is ~10⁹ Python steps.
For a model served by more than ``sample_above`` instances, each decision's snapshot holds
instead ``max_candidates`` instances drawn uniformly (seeded) from those with a free slot —
the power-of-d-choices idea — plus, once the request is known, the instances the router
would want regardless: its preferred instance, its sticky owner (session affinity, owner
over the whole model ring) and the prefix-index holders with a free slot. Policies and
routers are the real ones; they see a smaller fleet. Fleet-wide aggregates they compute
(``adaptive``'s load, ``slo_aware``'s best predicted finish) are then over the sample.
Fleets at or below the threshold are never sampled. A sampled model set up for PD is
sampled by role: ``max_candidates`` of its prefill-only, of its decode-only and of its
whole-request instances with a free slot, so that a decision always sees both legs'
candidates, plus the prefix holders (the pair orchestrator scores prefill instances by
prefix).
"""

from __future__ import annotations

import gc
import heapq
import math
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from sage_llm.bench.stats import SLO
from sage_llm.bench.workloads import Workload, WorkloadRequest
from sage_llm.control_plane.pd import PDComponents, build_pd
from sage_llm.control_plane.pd.orchestrator import unservable_reason
from sage_llm.control_plane.routing.base import Router
from sage_llm.control_plane.routing.prefix_index import PrefixIndex
from sage_llm.control_plane.routing.registry import build_router
from sage_llm.control_plane.scheduling.base import SchedulingPolicy
from sage_llm.control_plane.scheduling.registry import build_policy, may_read_block_hashes
from sage_llm.errors import ConfigError, ConflictError, InvalidRequestError
from sage_llm.sim.cluster_control import SimControlPlane
from sage_llm.sim.cluster_fleet import (
    InstanceSlot,
    SimInstanceSpec,
    make_fleet,
)
from sage_llm.sim.cluster_results import ClusterResult, build_result, decision_stats
from sage_llm.sim.cluster_state import FleetState
from sage_llm.sim.core import StepResult, stats_while_stepping
from sage_llm.types import ExecutionInstance, PDSeparationConfig

__all__ = ["ClusterResult", "ClusterSimulator", "SimInstanceSpec", "make_fleet"]

_STEP, _WAKE, _STATS, _TICK = 0, 1, 2, 3


class ClusterSimulator:
    """A fleet of simulated engines behind the real scheduling policy and router.

    ``instances`` are specs or plain registrations (simulated as the manager would).
    ``policy`` / ``routing`` are names (built with ``policy_params`` / ``routing_params``,
    the router seeded with ``seed``) or ready objects. ``max_concurrent_per_instance``
    overrides every instance's ``max_concurrent_requests``. With ``record_token_times`` each
    measurement carries every token's time (ITL statistics; more memory). Other settings
    mirror ``ControlPlaneManager``'s defaults. A simulator runs once.

    ``max_candidates`` / ``sample_above``: candidate sampling (module docstring).
    ``track_prefixes``: whether requests get prefix-block hashes and the prefix index is
    kept, as the dispatcher always does. None (default) keeps them only when something may
    read them — a router with a prefix scorer, a router or policy that is not one of the
    built-in ones, or PD (the pair orchestrator scores prefill instances by prefix) — since
    otherwise they cannot change any decision and cost about a third of the time per
    request.

    A workload request whose ``model`` is a LoRA adapter an instance serves (its
    ``lora_adapters``; the engines' slots are its metadata's ``sim_max_loras``), by its
    name or SGLang's ``MODEL:ADAPTER``, runs on the instances of its model serving it.
    ``lora_slot_routing`` routes it by their LoRA slots, as the control plane's setting of
    that name does.

    ``pd`` is the PD setting, as ``ControlPlaneManager``'s ``pd_config`` (None: its default
    :class:`~sage_llm.types.PDSeparationConfig`, the ``threshold`` decider; ``enabled``
    False turns PD off), or ready :class:`~sage_llm.control_plane.pd.PDComponents`. A
    model no instance or PD pair could ever serve is refused (:class:`ConfigError`, key
    ``instances``), as is the ``sglang`` connector.
    """

    def __init__(
        self,
        instances: Sequence[SimInstanceSpec | ExecutionInstance],
        *,
        policy: str | SchedulingPolicy,
        routing: str | Router,
        policy_params: Mapping[str, Any] | None = None,
        routing_params: Mapping[str, Any] | None = None,
        seed: int = 0,
        max_concurrent_per_instance: int | None = None,
        record_token_times: bool = False,
        max_candidates: int = 16,
        sample_above: int = 256,
        track_prefixes: bool | None = None,
        stats_interval_s: float | None = 1.0,
        max_queue_size: int = 10_000,
        prefix_block_size: int = 16,
        prefix_index_capacity: int = 200_000,
        lora_slot_routing: bool = True,
        pd: PDSeparationConfig | PDComponents | None = None,
    ) -> None:
        if not instances:
            raise ConfigError("the cluster simulator needs at least one instance", key="instances")
        if max_concurrent_per_instance is not None and max_concurrent_per_instance < 1:
            raise ConfigError("must be >= 1", key="max_concurrent_per_instance")
        if max_candidates < 2 or sample_above < 1:
            raise ConfigError("max_candidates must be >= 2, sample_above >= 1", key="sampling")
        if stats_interval_s is not None and not stats_interval_s > 0:
            raise ConfigError("must be > 0 (or None for no refresh)", key="stats_interval_s")
        if max_queue_size < 1 or prefix_block_size < 1:
            raise ConfigError("max_queue_size and prefix_block_size must be >= 1", key="limits")
        if isinstance(policy, str):
            policy = build_policy(policy, policy_params)
        elif policy_params:
            raise ConfigError("policy_params need a policy name", key="policy_params")
        if isinstance(routing, str):
            routing = build_router(routing, routing_params, seed=seed)
        elif routing_params:
            raise ConfigError("routing_params need a routing name", key="routing_params")
        self.policy: SchedulingPolicy = policy
        self.router: Router = routing
        self.prefix_index = PrefixIndex(prefix_index_capacity)
        self.record_token_times = record_token_times
        self.max_candidates = max_candidates
        self.sample_above = sample_above
        self.stats_interval_s = stats_interval_s
        self.max_queue_size = max_queue_size
        self.prefix_block_size = prefix_block_size
        self._seed = seed
        specs: list[SimInstanceSpec] = []
        for spec in instances:
            if isinstance(spec, ExecutionInstance):
                spec = SimInstanceSpec(spec)
            if max_concurrent_per_instance is not None:
                inst = replace(spec.instance, max_concurrent_requests=max_concurrent_per_instance)
                spec = SimInstanceSpec(inst, spec.engine_config())
            specs.append(spec)
        self.fleet = FleetState(
            specs,
            prefix=self.prefix_index,
            max_candidates=max_candidates,
            sample_above=sample_above,
            rng=random.Random(f"cluster-sampling-{seed}"),
            router=routing,
        )
        self._slots = self.fleet.slots
        self.pd = self._pd_components(pd, seed)
        if track_prefixes is None:  # (the PD pair's prefill leg is scored by its prefix)
            track_prefixes = (
                self.fleet.want_prefix
                or may_read_block_hashes(policy)
                or (self.pd is not None and bool(self.fleet.pd_models))
            )
        self.track_prefixes = track_prefixes
        self._heap: list[tuple[float, int, int, int, int]] = []
        self._seq = 0
        self._now = 0.0
        self.control = SimControlPlane(
            policy,
            routing,
            self.fleet,
            record_token_times=record_token_times,
            track_prefixes=track_prefixes,
            max_queue_size=max_queue_size,
            prefix_block_size=prefix_block_size,
            lora_slot_routing=lora_slot_routing,
            pd=self.pd,
        )
        self._events = 0
        self._ran = False

    def _pd_components(
        self, pd: PDSeparationConfig | PDComponents | None, seed: int
    ) -> PDComponents | None:
        """The PD components (as the manager builds them: ``pd`` None is its default
        :class:`PDSeparationConfig`), or None when PD is off; a model no instance or PD
        pair could ever serve is refused."""
        if isinstance(pd, PDComponents):
            components: PDComponents | None = pd
        elif pd is not None and not isinstance(pd, PDSeparationConfig):
            raise ConfigError(
                f"must be a PDSeparationConfig, PDComponents or None, got {type(pd).__name__}",
                key="pd",
            )
        else:
            cfg = pd if pd is not None else PDSeparationConfig()
            components = (
                build_pd(cfg, seed=seed, block_size=self.prefix_block_size) if cfg.enabled else None
            )
        for model, group in self.fleet.groups.items():
            members = [(s.instance_id, s.role) for s in group]
            why = unservable_reason(model, members, pd_enabled=components is not None)
            if why is not None:
                raise ConfigError(why, key="instances")
        if components is None or not self.fleet.pd_models:
            return components
        if components.connector.name != "vllm":
            raise ConfigError(
                f"the cluster simulator runs PD legs with the vllm connector only, not "
                f"{components.connector.name!r}",
                key="pd.connector",
            )
        return components

    # -- the event loop --------------------------------------------------------------------

    def run(
        self, workload: Workload | Iterable[WorkloadRequest], *, slo: SLO | None = None
    ) -> ClusterResult:
        """Simulate ``workload`` (requests in arrival order; arrival offsets from t=0) to the
        end and report. Raises :class:`InvalidRequestError` for out-of-order arrivals."""
        if self._ran:
            raise ConflictError("this ClusterSimulator has already run; build a new one")
        self._ran = True
        # A run allocates millions of objects that reference counting frees, while
        # millions of long-lived ones (engine block tables, measurements) stay; the
        # collector would trace the long-lived ones over and over (~10% of the run with
        # the default thresholds, 3-5% with rarer collections) and find nothing: the
        # simulation makes no reference cycles. It is off for the run and back as it
        # was after (a cycle made meanwhile is collected then).
        enabled = gc.isenabled()
        gc.disable()
        try:
            return self._run(workload, slo)
        finally:
            if enabled:
                gc.enable()

    def _run(
        self, workload: Workload | Iterable[WorkloadRequest], slo: SLO | None
    ) -> ClusterResult:
        wall0, cpu0 = time.perf_counter(), time.process_time()
        requests = workload.requests if isinstance(workload, Workload) else workload
        arrivals = iter(requests)
        nxt = next(arrivals, None)
        heap, control = self._heap, self.control
        queued = control.queued  # len(self.policy), asked of its queue where that is the same
        fleet, slots, kicks = self.fleet, self._slots, control.kicks
        heappop, heappush, kick = heapq.heappop, heapq.heappush, self._kick
        step_effects, arrive, dispatch = self._step_effects, control.arrive, control.dispatch
        list_tokens = self.record_token_times
        if self.stats_interval_s is not None:
            self._push(0.0, _STATS, 0)
        tick = getattr(self.policy, "tick", None)  # adaptive's: as the manager's loop calls it
        tick_s = float(getattr(self.policy, "tick_interval_s", 1.0))
        if tick is not None:
            self._push(tick_s, _TICK, 0)
        events = 0
        nxt_at = math.inf if nxt is None else nxt.arrival_s
        while True:
            if heap and heap[0][0] <= nxt_at:
                now, _, kind, index, gen = heappop(heap)
                self._now = now
                slot = slots[index]
                if kind == _STEP:
                    # A step ended: the engine starts its next step (self._kick, inlined:
                    # this runs for every engine step), then the tokens take effect.
                    res = slot.result
                    slot.result = None
                    slot.steps += 1
                    slot.tokens += res.num_new_tokens
                    core = slot.core
                    if core.has_work():
                        slot.wake_gen += 1
                        nres = core.step(now, list_tokens=list_tokens)
                        if nres.has_pulls():
                            self._release_pulled(nres)
                        if nres.idle:
                            slot.busy = False
                            self._push(
                                now + max(nres.duration_s, 1e-9), _WAKE, index, slot.wake_gen
                            )
                        else:
                            slot.result = nres
                            slot.busy_s += nres.duration_s
                            self._seq += 1
                            heappush(heap, (now + nres.duration_s, self._seq, _STEP, index, 0))
                    else:
                        slot.busy = False
                    if list_tokens or res.has_firsts_or_finishes() or res.has_admissions():
                        step_effects(slot, res, now)
                elif kind == _WAKE:
                    if gen == slot.wake_gen and not slot.busy:
                        kick(slot)
                elif kind == _STATS:
                    self._refresh_stats(more=nxt is not None)
                else:  # the policy's tick, which wakes no dispatch pass (nor does the manager's)
                    assert tick is not None
                    tick(fleet.snapshot(now))
                    if nxt is not None or control.reqs:  # (not the stats loop: it re-arms
                        self._push(now + tick_s, _TICK, 0)  # while this one is pending)
                    events += 1
                    continue
            elif nxt is not None:
                if nxt_at < self._now:
                    raise InvalidRequestError(
                        f"request {nxt.request_id} arrives at {nxt_at} s, before the "
                        f"previous one ({self._now} s); requests must be in arrival order",
                        param="arrival_s",
                    )
                self._now = nxt_at
                arrive(nxt, nxt_at)
                nxt = next(arrivals, None)
                nxt_at = math.inf if nxt is None else nxt.arrival_s
            else:
                break
            events += 1
            if fleet.free_total and len(queued):
                dispatch(self._now)
            if kicks:
                for slot in kicks:
                    slot.kick_pending = False
                    kick(slot)
                kicks.clear()
        self._events = events
        control.abandon_leftovers(self._now)
        return self._result(slo, time.perf_counter() - wall0, time.process_time() - cpu0)

    def _push(self, at: float, kind: int, index: int, gen: int = 0) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (at, self._seq, kind, index, gen))

    def _kick(self, slot: InstanceSlot) -> None:
        """Start a step on an idle instance that has work (what the engine loop does)."""
        core = slot.core
        if slot.busy or not core.has_work():
            return
        slot.wake_gen += 1
        now = self._now
        res = core.step(now, list_tokens=self.record_token_times)
        if res.has_pulls():
            self._release_pulled(res)
        if res.idle:  # waiting for a KV transfer or pinned blocks (PD); retry then
            self._push(now + max(res.duration_s, 1e-9), _WAKE, slot.index, slot.wake_gen)
            return
        slot.busy = True
        slot.result = res
        slot.busy_s += res.duration_s
        self._seq += 1  # self._push, inlined
        heapq.heappush(self._heap, (now + res.duration_s, self._seq, _STEP, slot.index, 0))

    def _release_pulled(self, res: StepResult) -> None:
        """The KV the decode legs of a step pulled is released on their prefill engines
        (as ``SimEngine`` tells them when the step starts): those now idle with work are
        kicked (they may have been waiting for the blocks)."""
        by_id, kick = self.fleet.by_id, self.control.kick
        for engine_id, request_id in res.kv_pulled:
            slot = by_id.get(engine_id) if engine_id is not None else None
            if slot is not None and slot.core.release_kv(request_id):
                kick(slot)

    def _step_effects(self, slot: InstanceSlot, res: StepResult, now: float) -> None:
        """The admissions, tokens and finished requests of a step that ended at ``now``."""
        control = self.control
        if res.has_admissions():  # what each found in the prefix cache (read at its end)
            reqs = control.reqs
            for rid, cached in res.admitted:
                if (rec := reqs.get(rid)) is not None:
                    rec.cached_tokens = cached
        if self.record_token_times:
            reqs = control.reqs
            for rid, n in res.new_tokens:
                rec = reqs.get(rid)
                if rec is None or rec.slot is not slot:  # (a PD prefill leg's token)
                    continue
                if rec.first_token_s is None:
                    control.first_token(slot.awaiting_first.pop(rid), slot, now)
                rec.output += n
                assert rec.token_times is not None
                rec.token_times.extend([now] * n)
        elif res.first_tokens:
            awaiting = slot.awaiting_first
            firsts = res.first_tokens
            if len(firsts) > 1:  # in dispatch order, as the dispatcher sees them
                got = set(firsts)
                firsts = [rid for rid in awaiting if rid in got]
            for rid in firsts:
                rec = awaiting.pop(rid, None)
                if rec is not None:
                    control.first_token(rec, slot, now)
        if res.finished:
            reqs = control.reqs
            for rid, _reason in res.finished:
                rec = reqs.get(rid)
                if rec is None:
                    continue
                if rec.slot is slot:
                    del reqs[rid]
                    control.complete(rec, slot, now)
                elif rec.prefill_slot is slot:  # its PD prefill leg: its decode leg next
                    control.prefill_done(rec, slot, now)

    def _refresh_stats(self, *, more: bool) -> None:
        """The stats loop: every instance's engine figures into its view; re-arm while
        anything is left to happen."""
        for slot in self._slots:
            slot.state.note_stats(stats_while_stepping(slot.core.stats(), slot.result))
            self.fleet.mark(slot)
        if self.fleet.sampled_models and self.fleet.adapter_model:
            self.fleet.refresh_lora()
        if more or self._heap:
            assert self.stats_interval_s is not None
            self._push(self._now + self.stats_interval_s, _STATS, 0)

    # -- report ----------------------------------------------------------------------------

    def _result(self, slo: SLO | None, wall_s: float, cpu_s: float) -> ClusterResult:
        fleet, control = self.fleet, self.control
        return build_result(
            self._slots,
            control.measurements,
            slo,
            decisions=decision_stats(
                control.decision_s,
                sampled=control.decision_sampled,
                candidates=control.decision_candidates,
            ),
            wall_s=wall_s,
            cpu_s=cpu_s,
            events=self._events,
            rejected=control.rejected,
            policy_state=dict(self.policy.describe()),
            settings={
                "instances": len(self._slots),
                "policy": self.policy.name,
                "routing": self.router.name,
                "seed": self._seed,
                "max_candidates": fleet.max_candidates,
                "sample_above": self.sample_above,
                "sampled_models": list(fleet.sampled_models),
                "track_prefixes": self.track_prefixes,
                "stats_interval_s": self.stats_interval_s,
                "max_queue_size": self.max_queue_size,
                "lora_slot_routing": self.control.lora_slot_routing,
                "pd": None if self.pd is None else self.pd.describe(),
                "pd_models": list(control.pd_models),
            },
            disaggregated=control.disaggregated,
            colocated=control.colocated,
        )
