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
  ``router.route(info, snap, allowed)`` (again unconstrained if that finds nothing), the
  assignment accounted before the next decision, the prefix index updated;
* **engines**: an idle instance that gets work starts a step at once; a step's tokens and
  finished requests take effect at its end, when the next step starts immediately;
* **accounting** with the registry's own :class:`~sage_llm.control_plane.instances.InstanceState`
  (load counters and its TTFT/TPOT EWMAs), and ``policy.on_complete`` for every request.

**Snapshots.** Views are cached per instance and rebuilt only when that instance changed
(``InstanceState.view``), so a snapshot costs no per-instance work beyond the changes.

**Candidate sampling (large fleets).** A decision over every instance costs O(instances)
in the routers and policies; at 1,000 instances × 1M requests that is ~10⁹ Python steps.
For a model served by more than ``sample_above`` instances, each decision's snapshot holds
instead ``max_candidates`` instances drawn uniformly (seeded) from those with a free slot —
the power-of-d-choices idea — plus, once the request is known, the instances the router
would want regardless: its preferred instance, its sticky owner (session affinity, owner
over the whole model ring) and the prefix-index holders with a free slot. Policies and
routers are the real ones; they see a smaller fleet. Fleet-wide aggregates they compute
(``adaptive``'s load, ``slo_aware``'s best predicted finish) are then over the sample.
Fleets at or below the threshold are never sampled.
"""

from __future__ import annotations

import heapq
import random
import time
from array import array
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from sage_llm import tokens
from sage_llm.bench.stats import SLO, RequestMeasurement, summarize
from sage_llm.bench.workloads import Workload, WorkloadRequest
from sage_llm.control_plane.instances import InstanceRegistry
from sage_llm.control_plane.routing.base import Router
from sage_llm.control_plane.routing.pipeline import Pipeline
from sage_llm.control_plane.routing.prefix_index import PrefixIndex
from sage_llm.control_plane.routing.registry import build_router
from sage_llm.control_plane.routing.scorers import (
    PrefixMatchScorer,
    SessionAffinityScorer,
    rendezvous_owner,
)
from sage_llm.control_plane.scheduling._queue import QueuedPolicy
from sage_llm.control_plane.scheduling.adaptive import AdaptivePolicy
from sage_llm.control_plane.scheduling.admission import check_queue_bound
from sage_llm.control_plane.scheduling.base import SchedulingPolicy
from sage_llm.control_plane.scheduling.registry import build_policy
from sage_llm.control_plane.snapshot import ClusterSnapshot, CompletionRecord, RequestInfo
from sage_llm.errors import ConfigError, ConflictError, InvalidRequestError
from sage_llm.sim.cluster_fleet import (
    FreeList,
    InstanceSlot,
    SimInstanceSpec,
    SimRequest,
    make_fleet,
    prefix_block_hashes,
)
from sage_llm.sim.cluster_results import ClusterResult, InstanceUsage, decision_stats
from sage_llm.types import ExecutionInstance, RequestStatus

__all__ = ["ClusterResult", "ClusterSimulator", "SimInstanceSpec", "make_fleet"]

_STEP, _WAKE, _STATS = 0, 1, 2
_STICKY_CACHE = 65_536
_BUILTIN_POLICIES = (QueuedPolicy, AdaptivePolicy)
"""Policies known not to read ``RequestInfo.block_hashes``."""


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
    read them — a router with a prefix scorer, or a router or policy that is not one of
    the built-in ones — since otherwise they cannot change any decision and cost about a
    third of the time per request.
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
        self._rng = random.Random(f"cluster-sampling-{seed}")
        self._registry = InstanceRegistry()
        self._slots: list[InstanceSlot] = []
        for spec in instances:
            if isinstance(spec, ExecutionInstance):
                spec = SimInstanceSpec(spec)
            if max_concurrent_per_instance is not None:
                inst = replace(spec.instance, max_concurrent_requests=max_concurrent_per_instance)
                spec = SimInstanceSpec(inst, spec.engine_config())
            self._slots.append(InstanceSlot(len(self._slots), spec, self._registry))
        self._by_id = {s.instance_id: s for s in self._slots}
        self._groups: dict[str, list[InstanceSlot]] = {}
        for s in self._slots:
            self._groups.setdefault(s.model, []).append(s)
        self._free: dict[str, FreeList] = {m: FreeList() for m in self._groups}
        for s in self._slots:
            s.sampled = len(self._groups[s.model]) > sample_above
            self._free[s.model].add(s.index)
        self._free_total = len(self._slots)
        self._sampled_models = [m for m, g in self._groups.items() if len(g) > sample_above]
        self._full_slots = [s for s in self._slots if not s.sampled]
        self._views = [s.view for s in self._full_slots]
        self._full_pos = {s.index: n for n, s in enumerate(self._full_slots)}
        self._dirty: set[int] = set()
        self._want_prefix, self._want_sticky = _router_wants(routing)
        if track_prefixes is None:
            track_prefixes = self._want_prefix or not isinstance(policy, _BUILTIN_POLICIES)
        self.track_prefixes = track_prefixes
        self._sticky: dict[tuple[str, str], InstanceSlot | None] = {}
        self._heap: list[tuple[float, int, int, int, int]] = []
        self._seq = 0
        self._now = 0.0
        self._reqs: dict[str, SimRequest] = {}
        self._kicks: list[InstanceSlot] = []
        self._measurements: list[RequestMeasurement] = []
        self._decision_s = array("d")
        self._decision_sampled = 0
        self._decision_candidates = 0
        self._events = 0
        self._rejected = 0
        self._ran = False

    # -- the event loop --------------------------------------------------------------------

    def run(
        self, workload: Workload | Iterable[WorkloadRequest], *, slo: SLO | None = None
    ) -> ClusterResult:
        """Simulate ``workload`` (requests in arrival order; arrival offsets from t=0) to the
        end and report. Raises :class:`InvalidRequestError` for out-of-order arrivals."""
        if self._ran:
            raise ConflictError("this ClusterSimulator has already run; build a new one")
        self._ran = True
        wall0 = time.perf_counter()
        requests = workload.requests if isinstance(workload, Workload) else workload
        arrivals = iter(requests)
        nxt = next(arrivals, None)
        heap, policy = self._heap, self.policy
        if self.stats_interval_s is not None:
            self._push(0.0, _STATS, 0)
        while True:
            if heap and (nxt is None or heap[0][0] <= nxt.arrival_s):
                at, _, kind, index, gen = heapq.heappop(heap)
                self._now = at
                slot = self._slots[index]
                if kind == _STEP:
                    self._end_step(slot)
                elif kind == _WAKE:
                    if gen == slot.wake_gen and not slot.busy:
                        self._kick(slot)
                else:
                    self._refresh_stats(more=nxt is not None)
            elif nxt is not None:
                if nxt.arrival_s < self._now:
                    raise InvalidRequestError(
                        f"request {nxt.request_id} arrives at {nxt.arrival_s} s, before the "
                        f"previous one ({self._now} s); requests must be in arrival order",
                        param="arrival_s",
                    )
                self._now = nxt.arrival_s
                self._arrive(nxt)
                nxt = next(arrivals, None)
            else:
                break
            self._events += 1
            if self._free_total and len(policy):
                self._dispatch()
            if self._kicks:
                for slot in self._kicks:
                    slot.kick_pending = False
                    self._kick(slot)
                self._kicks.clear()
        self._abandon_leftovers()
        return self._result(slo, time.perf_counter() - wall0)

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
        res = core.step(now)
        if res.idle:  # waiting for a KV transfer or pinned blocks (PD); retry then
            self._push(now + max(res.duration_s, 1e-9), _WAKE, slot.index, slot.wake_gen)
            return
        slot.busy = True
        slot.result = res
        slot.busy_s += res.duration_s
        self._push(now + res.duration_s, _STEP, slot.index)

    def _end_step(self, slot: InstanceSlot) -> None:
        """A step ended: the engine starts its next step, then its tokens take effect."""
        res = slot.result
        slot.result = None
        slot.busy = False
        slot.steps += 1
        slot.tokens += len(res.new_tokens)
        self._kick(slot)
        now = self._now
        if self.record_token_times:
            reqs = self._reqs
            for rid, n in res.new_tokens:
                rec = reqs.get(rid)
                if rec is None:
                    continue
                if rec.first_token_s is None:
                    self._first_token(slot.awaiting_first.pop(rid), slot)
                rec.output += n
                assert rec.token_times is not None
                rec.token_times.extend([now] * n)
        elif slot.awaiting_first:
            got = dict(res.new_tokens)
            for rid in [r for r in slot.awaiting_first if r in got]:
                self._first_token(slot.awaiting_first.pop(rid), slot)
        for rid, _reason in res.finished:
            rec = self._reqs.pop(rid, None)
            if rec is not None:
                self._complete(rec, slot)

    def _refresh_stats(self, *, more: bool) -> None:
        """The stats loop: every instance's engine figures into its view; re-arm while
        anything is left to happen."""
        for slot in self._slots:
            slot.state.last_stats = slot.core.stats()
            self._mark(slot)
        if more or self._heap:
            assert self.stats_interval_s is not None
            self._push(self._now + self.stats_interval_s, _STATS, 0)

    # -- control plane ---------------------------------------------------------------------

    def _mark(self, slot: InstanceSlot) -> None:
        slot.dirty = True
        if not slot.sampled:
            self._dirty.add(slot.index)

    def _snapshot(self) -> ClusterSnapshot:
        """The fleet as the next decision sees it (sampled groups: a fresh sample)."""
        if self._dirty:
            views, pos, slots = self._views, self._full_pos, self._slots
            for index in self._dirty:
                views[pos[index]] = slots[index].fresh_view()
            self._dirty.clear()
        if not self._sampled_models:
            return ClusterSnapshot(self._now, tuple(self._views), self.prefix_index)
        out = list(self._views)
        slots = self._slots
        for model in self._sampled_models:
            picked = self._free[model].sample(self._rng, self.max_candidates)
            out.extend(slots[i].fresh_view() for i in picked)
        return ClusterSnapshot(self._now, tuple(out), self.prefix_index)

    def _augment(self, snap: ClusterSnapshot, info: RequestInfo) -> ClusterSnapshot:
        """Add to a sampled snapshot the instances the router would look for anyway."""
        group = self._groups.get(info.model)
        if group is None or not group[0].sampled:
            return snap
        present = {v.instance_id for v in snap.instances}
        extra: list[InstanceSlot] = []

        def add(slot: InstanceSlot | None) -> None:
            if slot is not None and slot.instance_id not in present:
                present.add(slot.instance_id)
                extra.append(slot)

        for iid in (info.preferred_instance_id, info.previous_instance_id):
            if iid is not None:
                add(self._by_id.get(iid))
        key = info.sticky_key
        if self._want_sticky and key is not None:
            add(self._sticky_owner(info.model, key))
        if self._want_prefix and info.block_hashes:
            held = self.prefix_index.match(info.block_hashes)
            ranked = sorted(
                (-depth, s.index)
                for iid, depth in held.items()
                if (s := self._by_id.get(iid)) is not None and s.model == info.model
                and s.has_capacity
            )  # fmt: skip
            for _, index in ranked[: self.max_candidates]:
                add(self._slots[index])
        if not extra:
            return snap
        views = tuple(s.fresh_view() for s in extra)
        return ClusterSnapshot(snap.now, snap.instances + views, snap.prefix)

    def _sticky_owner(self, model: str, key: str) -> InstanceSlot | None:
        cache_key = (model, key)
        if cache_key not in self._sticky:
            if len(self._sticky) >= _STICKY_CACHE:
                self._sticky.clear()
            owner = rendezvous_owner(key, (s.instance_id for s in self._groups[model]))
            self._sticky[cache_key] = None if owner is None else self._by_id[owner]
        return self._sticky[cache_key]

    def _arrive(self, wr: WorkloadRequest) -> None:
        """Intake and admission, as ``ControlPlaneManager._submit``."""
        now = self._now
        model = wr.model
        if model is None and len(self._groups) == 1:
            model = next(iter(self._groups))
        if model is None or model not in self._groups:
            what = "model_name is required when several models are served"
            if model is not None:
                what = f"no instance serves model {model!r}"
            self._reject(wr, f"{'ModelNotFoundError' if model else 'InvalidRequestError'}: {what}")
            return
        if wr.request_id in self._reqs:
            self._reject(wr, f"ConflictError: request {wr.request_id!r} is already in progress")
            return
        prompt = wr.prompt
        ids = prompt if isinstance(prompt, list) else tokens.tokenize(prompt)
        slo_e2e = wr.slo_e2e_s
        info = RequestInfo(
            request_id=wr.request_id,
            model=model,
            arrival=now,
            prompt_tokens=len(ids),
            max_tokens=wr.max_tokens,
            priority=wr.priority,
            deadline=None if slo_e2e is None else now + slo_e2e,
            user_id=wr.user_id,
            session_id=wr.session_id,
            block_hashes=(
                prefix_block_hashes(ids, self.prefix_block_size) if self.track_prefixes else ()
            ),
        )
        queued = len(self.policy)
        snap = self._snapshot()
        verdict = check_queue_bound(queued, self.max_queue_size, snap)
        full = not verdict.admitted
        if verdict.admitted:
            verdict = self.policy.admit(info, snap)
        if not verdict.admitted:
            reason = verdict.reason
            kind = "AdmissionError"
            if full:
                kind = "QueueFullError"
            elif "slo" in reason.lower() or "deadline" in reason.lower():
                kind = "SLOInfeasibleError"
            self._reject(wr, f"{kind}: {reason}")
            return
        if verdict.priority is not None:
            info = replace(info, priority=verdict.priority)
        rec = SimRequest(wr, info, ids)
        if self.record_token_times:
            rec.token_times = []
        self._reqs[wr.request_id] = rec
        self.policy.push(info)

    def _dispatch(self) -> None:
        """One pass of ``Dispatcher.dispatch_ready``."""
        policy, router, perf = self.policy, self.router, time.perf_counter
        while len(policy) and self._free_total:
            started = perf()
            snap = self._snapshot()
            info = policy.pop(snap)
            if info is None:
                break
            rec = self._reqs.get(info.request_id)
            if rec is None or rec.slot is not None:
                continue
            rec.info = info
            snap = self._augment(snap, info) if self._sampled_models else snap
            allowed = policy.constrain(info, snap)
            decision = router.route(info, snap, allowed)
            if decision is None and allowed is not None:
                decision = router.route(info, snap)
            if decision is None:  # inconsistent with pop(); keep the request and stop
                policy.push(info)
                break
            self._decision_s.append(perf() - started)
            self._decision_candidates += len(snap)
            if self._sampled_models:
                self._decision_sampled += 1
            slot = self._by_id[decision.instance_id]
            view = slot.fresh_view()
            rec.predicted_e2e_s = view.predict_e2e_s(info.prompt_tokens, info.max_tokens)
            self._start(rec, slot, view.queued_prefill_tokens + info.prompt_tokens)

    def _start(self, rec: SimRequest, slot: InstanceSlot, pending: int) -> None:
        state, info, now = slot.state, rec.info, self._now
        slot.note_in_flight(now)
        state.in_flight += 1
        state.queued_prefill_tokens += info.prompt_tokens
        state.outstanding_decode_tokens += info.max_tokens
        slot.max_in_flight = max(slot.max_in_flight, state.in_flight)
        if state.in_flight >= slot.bound:
            self._free[slot.model].discard(slot.index)
            self._free_total -= 1
        rec.slot = slot
        rec.scheduled_at = now
        rec.pending_tokens = pending
        if self.track_prefixes:
            self.prefix_index.insert(state.instance_id, info.block_hashes)
        self._mark(slot)
        ids = rec.prompt_ids
        rec.prompt_ids = None
        assert ids is not None
        error = _engine_refusal(slot, len(ids), info.max_tokens)
        if error is None:
            try:
                slot.core.add_request(info.request_id, ids, info.max_tokens, arrival=now)
            except (InvalidRequestError, ConflictError) as exc:
                error = f"{type(exc).__name__}: {exc.message}"
        if error is not None:
            del self._reqs[info.request_id]
            self._complete(rec, slot, error=error)
            return
        slot.awaiting_first[info.request_id] = rec
        if not slot.busy and not slot.kick_pending:
            slot.kick_pending = True
            self._kicks.append(slot)

    def _first_token(self, rec: SimRequest, slot: InstanceSlot) -> None:
        now = self._now
        rec.first_token_s = now
        state = slot.state
        state.queued_prefill_tokens -= rec.info.prompt_tokens
        state.observe_first_token(now - rec.scheduled_at, rec.pending_tokens)
        self._mark(slot)

    def _complete(self, rec: SimRequest, slot: InstanceSlot, *, error: str | None = None) -> None:
        """The request ended on ``slot``: account it as ``Dispatcher._finish`` does."""
        now, info, state = self._now, rec.info, slot.state
        ok = error is None
        first = rec.first_token_s
        output = (rec.output if self.record_token_times else info.max_tokens) if ok else 0
        e2e_s = now - info.arrival
        ttft_s = None if first is None else first - info.arrival
        tpot_s = (now - first) / (output - 1) if first is not None and output > 1 else None
        slo_e2e = rec.workload.slo_e2e_s
        slo_met = None if slo_e2e is None else ok and e2e_s <= slo_e2e
        cost = slot.cost_per_s * (now - rec.scheduled_at)
        status = RequestStatus.COMPLETED if ok else RequestStatus.FAILED
        if first is None:
            state.queued_prefill_tokens -= info.prompt_tokens
        slot.note_in_flight(now)
        state.in_flight -= 1
        state.outstanding_decode_tokens -= info.max_tokens
        if state.in_flight == slot.bound - 1:
            self._free[slot.model].add(slot.index)
            self._free_total += 1
        if ok:
            state.completed += 1
            state.tokens_generated += output
            state.record_latency(e2e_s * 1000.0)
            if tpot_s is not None:
                state.observe_tpot(tpot_s)
        else:
            state.failed += 1
        self._mark(slot)
        self.policy.on_complete(
            CompletionRecord(
                request_id=info.request_id,
                status=status,
                priority=info.priority,
                instance_id=slot.instance_id,
                arrival=info.arrival,
                finished=now,
                queue_wait_s=rec.scheduled_at - info.arrival,
                ttft_s=ttft_s,
                tpot_s=tpot_s,
                e2e_s=e2e_s,
                prompt_tokens=info.prompt_tokens,
                completion_tokens=output,
                slo_met=slo_met,
                predicted_e2e_s=rec.predicted_e2e_s,
                cost=cost,
            )
        )
        self._measure(rec.workload, info.arrival, first, now, output, error, rec.token_times)

    def _reject(self, wr: WorkloadRequest, error: str) -> None:
        self._rejected += 1
        self._measure(wr, self._now, None, self._now, 0, error, None)

    def _measure(
        self,
        wr: WorkloadRequest,
        arrival: float,
        first: float | None,
        end: float,
        output: int,
        error: str | None,
        times: list[float] | None,
    ) -> None:
        self._measurements.append(
            RequestMeasurement(
                request_id=wr.request_id,
                priority=wr.priority,
                user_id=wr.user_id,
                arrival_s=arrival,
                first_token_s=first,
                token_times_s=times or (),
                end_s=end,
                prompt_tokens=wr.prompt_tokens,
                output_tokens=output,
                ok=error is None,
                error=error,
                slo_ttft_s=wr.slo_ttft_s,
                slo_tpot_s=wr.slo_tpot_s,
                slo_e2e_s=wr.slo_e2e_s,
            )
        )

    def _abandon_leftovers(self) -> None:
        """Requests still queued when no event is left (nothing could ever serve them)."""
        for rec in list(self._reqs.values()):
            self.policy.remove(rec.info.request_id)
            self._measure(
                rec.workload, rec.info.arrival, None, self._now, 0, "never dispatched", None
            )
        self._reqs.clear()

    # -- report ----------------------------------------------------------------------------

    def _result(self, slo: SLO | None, wall_s: float) -> ClusterResult:
        ms = self._measurements
        sim_time = max((m.end_s for m in ms), default=0.0)
        duration = max(sim_time, 1e-9)
        usage: list[InstanceUsage] = []
        queries = hits = 0.0
        for slot in self._slots:
            stats = slot.core.stats()
            queries += stats.prefix_cache_queries_total
            hits += stats.prefix_cache_hits_total
            q = stats.prefix_cache_queries_total
            usage.append(
                InstanceUsage(
                    instance_id=slot.instance_id,
                    busy_s=slot.busy_s,
                    utilization=min(1.0, slot.busy_s / duration),
                    steps=slot.steps,
                    completed=slot.state.completed,
                    tokens_generated=slot.tokens,
                    max_in_flight=slot.max_in_flight,
                    mean_in_flight=slot.in_flight_area / duration,
                    max_concurrency=slot.bound,
                    prefix_hit_rate=stats.prefix_cache_hits_total / q if q else 0.0,
                    preemptions=int(stats.preemptions_total),
                )
            )
        return ClusterResult(
            summary=summarize(ms, duration, slo),
            measurements=ms,
            instances=usage,
            prefix_hit_rate=hits / queries if queries else 0.0,
            decisions=decision_stats(
                self._decision_s,
                sampled=self._decision_sampled,
                candidates=self._decision_candidates,
            ),
            sim_time_s=sim_time,
            wall_s=wall_s,
            events=self._events,
            steps=sum(s.steps for s in self._slots),
            rejected=self._rejected,
            policy_state=dict(self.policy.describe()),
            settings={
                "instances": len(self._slots),
                "policy": self.policy.name,
                "routing": self.router.name,
                "seed": self._seed,
                "max_candidates": self.max_candidates,
                "sample_above": self.sample_above,
                "sampled_models": list(self._sampled_models),
                "stats_interval_s": self.stats_interval_s,
                "max_queue_size": self.max_queue_size,
            },
        )


def _router_wants(router: Router) -> tuple[bool, bool]:
    """Whether a sampled snapshot should add prefix holders / the sticky owner for it."""
    if not isinstance(router, Pipeline):
        return True, True
    scorers = [s for s, _ in router.scorers]
    return (
        any(isinstance(s, PrefixMatchScorer) for s in scorers),
        any(isinstance(s, SessionAffinityScorer) for s in scorers),
    )


def _engine_refusal(slot: InstanceSlot, n_prompt: int, max_tokens: int) -> str | None:
    """The context-length checks ``SimEngine.generate`` makes before queueing a request."""
    limit = slot.core.config.max_model_len
    if n_prompt + max_tokens > limit:
        return (
            f"InvalidRequestError: this model's maximum context length is {limit} tokens; "
            f"you requested {n_prompt + max_tokens} ({n_prompt} in the prompt, {max_tokens} "
            "in the completion)"
        )
    return None
