"""The control-plane half of the cluster simulator: intake, dispatch and accounting.

:class:`SimControlPlane` does, synchronously and at explicit times, what
``ControlPlaneManager._submit`` and ``Dispatcher`` do on the asyncio path (see
:mod:`sage_llm.sim.cluster`): admission with the queue bound and ``policy.admit``, dispatch
passes (``pop`` → ``constrain`` → ``route`` → accounting before the next decision, the
prefix index updated), the first-token and completion bookkeeping on the registry's
:class:`~sage_llm.control_plane.instances.InstanceState` (load counters, TTFT/TPOT EWMAs),
``policy.on_complete``, and the client-side measurements. A request for a LoRA adapter
runs on the instances serving it, routed by their LoRA slots as the dispatcher routes it
(:class:`~sage_llm.control_plane.routing.lora.LoraRoom`).
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Sequence, Sized
from dataclasses import replace

from sage_llm import tokens
from sage_llm.bench.stats import RequestMeasurement, measure
from sage_llm.bench.workloads import WorkloadRequest
from sage_llm.control_plane.dispatcher import MAX_DEFERRED, refusal_of, refusal_reason
from sage_llm.control_plane.pd import PDComponents, PDPlan
from sage_llm.control_plane.pd.orchestrator import predicted_e2e_s, servable_view
from sage_llm.control_plane.routing.base import Router
from sage_llm.control_plane.routing.lora import LoraRoom
from sage_llm.control_plane.routing.pipeline import Pipeline
from sage_llm.control_plane.scheduling._queue import QueuedPolicy, counting_only
from sage_llm.control_plane.scheduling.admission import check_queue_bound
from sage_llm.control_plane.scheduling.base import SchedulingPolicy
from sage_llm.control_plane.snapshot import (
    ClusterSnapshot,
    CompletionRecord,
    RequestInfo,
    fill_request_info,
    fill_snapshot,
)
from sage_llm.errors import ConflictError, InvalidRequestError
from sage_llm.fastinit import field_filler
from sage_llm.sim.cluster_fleet import InstanceSlot, SimRequest, prefix_block_hashes
from sage_llm.sim.cluster_results import request_measurement
from sage_llm.sim.cluster_state import FleetState
from sage_llm.sim.core import prompt_block_hashes
from sage_llm.sim.server_requests import context_max_tokens
from sage_llm.tokens import ADAPTER_SALT, salted_hashes
from sage_llm.types import RequestStatus

__all__ = ["SimControlPlane"]

# Built field by field (sage_llm.fastinit.field_filler): the simulator makes one of each per
# request, and these frozen dataclasses have neither defaults it relies on nor checks.
_completion_record = field_filler(
    CompletionRecord,
    (
        "request_id", "status", "priority", "instance_id", "arrival", "finished",
        "queue_wait_s", "ttft_s", "tpot_s", "e2e_s", "prompt_tokens", "completion_tokens",
        "slo_met", "predicted_e2e_s", "cost",
    ),
)  # fmt: skip
_NO_EXCLUSIONS: frozenset[str] = frozenset()
_COMPLETED, _FAILED = RequestStatus.COMPLETED, RequestStatus.FAILED
_ERRORS = {
    "queue_full": "QueueFullError",
    "user_queue_full": "QueueFullError",
    "slo_infeasible": "SLOInfeasibleError",
    "over_budget": "OverBudgetError",
    "policy": "AdmissionError",
}
"""The error a refusal of each :attr:`Admission.kind` raises in the control plane."""


class SimControlPlane:
    """Admission, dispatch and accounting over a :class:`FleetState` (see the module
    docstring). Instances that got work while idle are left in :attr:`kicks` for the
    simulator to start."""

    def __init__(
        self,
        policy: SchedulingPolicy,
        router: Router,
        fleet: FleetState,
        *,
        record_token_times: bool,
        track_prefixes: bool,
        max_queue_size: int,
        prefix_block_size: int,
        lora_slot_routing: bool = True,
        pd: PDComponents | None = None,
    ) -> None:
        self.policy = policy
        self.router = router
        self.fleet = fleet
        self.record_token_times = record_token_times
        self.track_prefixes = track_prefixes
        self.max_queue_size = max_queue_size
        self.prefix_block_size = prefix_block_size
        self.lora_slot_routing = lora_slot_routing
        """Whether a request for a LoRA adapter is routed by the engines' LoRA slots."""
        self.lora_room = LoraRoom()
        self.pd = pd
        self.pd_models: tuple[str, ...] = fleet.pd_models if pd is not None else ()
        """The models run disaggregated (none when PD is off)."""
        self.disaggregated = 0
        """Requests started as a PD pair."""
        self.colocated = 0
        """Requests for a model set up for PD started whole on one instance."""
        self.reqs: dict[str, SimRequest] = {}
        """Requests admitted and not ended, by id."""
        self.kicks: list[InstanceSlot] = []
        self.measurements: list[RequestMeasurement] = []
        self.decision_s = array("d")
        self.decision_sampled = 0
        self.decision_candidates = 0
        self.rejected = 0
        cls = type(policy)
        self._admit_reads_time_only = (
            issubclass(cls, QueuedPolicy)
            and cls.admit is QueuedPolicy.admit
            and cls.observe is QueuedPolicy.observe
        )
        """``policy.admit`` is :class:`QueuedPolicy`'s own: it reads only ``snap.now``."""
        self._counting: QueuedPolicy | None = counting_only(policy)
        """The policy when its ``on_complete`` is :class:`QueuedPolicy`'s own, which only
        counts: no completion record (nor the predicted E2E it carries) is built for it."""
        self.queued: Sized = (
            policy.queue
            if isinstance(policy, QueuedPolicy) and cls.__len__ is QueuedPolicy.__len__
            else policy
        )
        """What ``len(policy)`` counts: a :class:`QueuedPolicy`'s lane queue itself when
        its ``__len__`` is the class's own (asked after every event; the lane queue is
        compiled with the accelerator, the policy is not)."""
        self._only_model = next(iter(fleet.groups)) if len(fleet.groups) == 1 else None
        """The model a request without one gets (None when several are served)."""

    def arrive(self, wr: WorkloadRequest, now: float) -> None:
        """Intake and admission, as ``ControlPlaneManager._submit``."""
        model = wr.model
        fleet = self.fleet
        groups = fleet.groups
        adapter = None
        if model is None:
            model = self._only_model
        elif model not in groups and (named := fleet.resolve(model)) is not None:
            model, adapter = named  # a LoRA adapter: its instances of its model
        if model is None or model not in groups:
            what = "model_name is required when several models are served"
            if model is not None:
                what = f"no instance serves model {model!r}"
            self._reject(
                wr, now, f"{'ModelNotFoundError' if model else 'InvalidRequestError'}: {what}"
            )
            return
        if wr.request_id in self.reqs:
            self._reject(
                wr, now, f"ConflictError: request {wr.request_id!r} is already in progress"
            )
            return
        prompt = wr.prompt
        ids = prompt if isinstance(prompt, list) else tokens.tokenize(prompt)
        slo_e2e = wr.slo_e2e_s
        hashes: tuple[int, ...] = ()
        if self.track_prefixes:
            hashes = prefix_block_hashes(ids, self.prefix_block_size)
            if adapter is not None:  # its blocks are its own, as vLLM hashes them
                hashes = salted_hashes(hashes, ADAPTER_SALT + adapter)
        info = fill_request_info(
            wr.request_id,
            model,
            now,
            len(ids),
            wr.max_tokens,
            wr.priority,
            None if slo_e2e is None else now + slo_e2e,
            wr.user_id,
            wr.session_id,
            None,
            hashes,
            None,
            None,
            _NO_EXCLUSIONS if adapter is None else fleet.without_adapter(model, adapter),
            0,
            {},
            None,
            "standard",
            False,
            True,  # session_from_user
        )
        policy = self.policy
        queued = len(self.queued)
        if self._admit_reads_time_only and queued < self.max_queue_size:
            # The queue bound admits without reading the snapshot, and this policy's admit
            # reads only its time: the sample is drawn as usual, no view is built.
            if fleet.sampled_models:
                fleet.skip_snapshot()
            verdict = policy.admit(info, fill_snapshot(now, (), fleet.prefix))
        else:
            snap = fleet.snapshot(now)
            verdict = check_queue_bound(queued, self.max_queue_size, snap)
            if verdict.admitted:
                verdict = policy.admit(info, snap)
        if not verdict.admitted:
            self._reject(wr, now, f"{_ERRORS[verdict.kind]}: {verdict.reason}")
            return
        if verdict.priority is not None:  # demoted: as the manager schedules it
            info = replace(info, priority=verdict.priority, deadline=None, demoted=True)
        rec = SimRequest(wr, info, ids, adapter)
        if self.record_token_times:
            rec.token_times = []
        self.reqs[wr.request_id] = rec
        policy.push(info)

    def dispatch(self, now: float) -> None:
        """One pass of ``Dispatcher.dispatch_ready``: the requests it pops but cannot start
        now go back into the queue at its end (``MAX_DEFERRED`` of them end it)."""
        policy, router, fleet, perf = self.policy, self.router, self.fleet, time.perf_counter
        snapshot, pop, constrain, route = fleet.snapshot, policy.pop, policy.constrain, router.route
        reqs, by_id, record = self.reqs, fleet.by_id, self.decision_s.append
        sampled = bool(fleet.sampled_models)
        want_sticky, want_prefix = fleet.want_sticky, fleet.want_prefix
        counting = self._counting
        pipeline = router if type(router) is Pipeline else None
        by_slots = self.lora_slot_routing
        lora_room, find = self.lora_room, fleet.registry.find
        pd_models = self.pd_models
        decisions = candidates = 0
        queued = self.queued
        deferred: list[RequestInfo] = []
        while len(queued) and fleet.free_total:
            started = perf()
            snap = snapshot(now)
            info = pop(servable_view(snap, pd_models) if pd_models else snap)
            if info is None:
                break
            rec = reqs.get(info.request_id)
            if rec is None or rec.slot is not None:
                continue
            rec.info = info
            adapter = rec.adapter
            pd_model = bool(pd_models) and info.model in pd_models
            if sampled and (
                info.preferred_instance_id is not None
                or info.previous_instance_id is not None
                or (want_sticky and info.sticky_key is not None)
                or ((want_prefix or pd_model) and info.block_hashes)
                or adapter is not None
            ):  # otherwise fleet.augment has nothing to add (the same test as its own)
                snap = fleet.augment(snap, info, adapter, prefix=want_prefix or pd_model)
            if pd_model:
                plan = self._pd_plan(info, snap, adapter, now)
                if plan is not None:
                    record(perf() - started)
                    decisions += 1
                    candidates += len(snap.instances)
                    self._start_pd(rec, plan, snap, now)
                    continue
            allowed = constrain(info, snap)
            if pd_model:  # not where PD holds instances for prefill legs
                assert self.pd is not None
                allowed = self.pd.orchestrator.whole_allowed(info, snap, allowed)
            wider = None
            if adapter is not None and by_slots:
                allowed, wider = lora_room.narrow(
                    adapter, info, snap, allowed, now=now, find=find,
                    fleet=fleet.lora_fleet(info.model) if sampled else None,
                )  # fmt: skip
            if pipeline is not None:  # route(...).instance_id, without the decision record
                chosen = pipeline.route_id(info, snap, allowed)
                if chosen is None and wider is not None:  # where it runs: none free
                    chosen = pipeline.route_id(info, snap, wider)
                if chosen is None and allowed is not None:
                    chosen = pipeline.route_id(info, snap)
            else:
                decision = route(info, snap, allowed)
                if decision is None and wider is not None:
                    decision = route(info, snap, wider)
                if decision is None and allowed is not None:
                    decision = route(info, snap)
                chosen = None if decision is None else decision.instance_id
            if chosen is None:  # nothing free for this one now (a PD model's pair is
                deferred.append(info)  # taken, say): it goes back at the pass's end
                if len(deferred) >= MAX_DEFERRED:
                    break
                continue
            record(perf() - started)
            decisions += 1
            candidates += len(snap.instances)
            if pd_model:
                self.colocated += 1
            slot = by_id[chosen]
            view = fleet.fresh_view(slot)
            if counting is None:  # read only by the completion record
                rec.predicted_e2e_s = view.predict_e2e_s(info.prompt_tokens, info.max_tokens)
            self._start(rec, slot, view.queued_prefill_tokens + info.prompt_tokens, now)
        for info in deferred:
            policy.push(info)
        self.decision_candidates += candidates
        if sampled:
            self.decision_sampled += decisions

    # -- PD --------------------------------------------------------------------------------

    def _pd_plan(
        self, info: RequestInfo, snap: ClusterSnapshot, adapter: str | None, now: float
    ) -> PDPlan | None:
        """The pair to run ``info`` disaggregated on, or None to run it whole (as
        ``Dispatcher._pd_plan``: the decider asked while a whole-request instance can take
        it, the orchestrator asked first where a LoRA ``adapter`` has room)."""
        pd = self.pd
        assert pd is not None
        pd.orchestrator.observe(info, snap)
        if snap.runnable(info) and not pd.decider.decide(info, snap).disaggregate:
            return None
        rooms: tuple[frozenset[str] | None, ...] = ()
        if adapter is not None and self.lora_slot_routing:
            fleet = self.fleet
            rooms = self.lora_room.narrow(
                adapter, info, snap, None, now=now, find=fleet.registry.find,
                fleet=fleet.lora_fleet(info.model) if fleet.sampled_models else None,
            )  # fmt: skip
        return pd.orchestrator.plan_within(info, snap, rooms)

    def _start_pd(self, rec: SimRequest, plan: PDPlan, snap: ClusterSnapshot, now: float) -> None:
        """Start ``rec`` on ``plan``'s pair (``Dispatcher._start_pd``'s accounting: the
        prefill instance carries it until its leg ends, the decode instance until it
        ends) and queue its prefill leg."""
        fleet, info = self.fleet, rec.info
        prefill, decode = fleet.by_id[plan.prefill_id], fleet.by_id[plan.decode_id]
        if self._counting is None:  # read only by the completion record
            rec.predicted_e2e_s = predicted_e2e_s(snap, plan, info)
        pstate, dstate = prefill.state, decode.state
        adapter = rec.adapter
        rec.pending_tokens = pstate.queued_prefill_tokens + info.prompt_tokens
        self._occupy(prefill, adapter, now)
        pstate.queued_prefill_tokens += info.prompt_tokens
        rec.batch_at_start = self._occupy(decode, adapter, now)
        dstate.outstanding_decode_tokens += info.max_tokens
        rec.slot = decode
        rec.prefill_slot = prefill
        rec.disaggregated = True
        rec.scheduled_at = now
        self.disaggregated += 1
        if self.track_prefixes:  # both end up holding the prompt's KV
            fleet.prefix.insert(pstate.instance_id, info.block_hashes)
            fleet.prefix.insert(dstate.instance_id, info.block_hashes)
        fleet.mark(prefill)
        fleet.mark(decode)
        ids = rec.prompt_ids  # kept for the decode leg
        assert ids is not None
        # (the engine checks the prompt against its context, with one token to come)
        failure = self._queue(rec, prefill, ids, 1, now, {"do_remote_decode": True})
        if failure is not None:
            self._pd_failed(rec, prefill, now, *failure)

    def prefill_done(self, rec: SimRequest, slot: InstanceSlot, now: float) -> None:
        """``rec``'s prefill leg ended on ``slot`` at ``now`` (its KV pinned there):
        ``Dispatcher._prefill_done``'s accounting, the prefill instance released, and its
        decode leg queued on its decode instance, which pulls the KV."""
        info, state = rec.info, slot.state
        leg_s = now - rec.scheduled_at
        rec.prefill_cost = slot.cost_per_s * leg_s
        state.observe_first_token(leg_s, rec.pending_tokens - rec.cached_tokens)
        state.completed += 1
        state.prefilled_tokens += info.prompt_tokens
        state.record_latency(leg_s * 1000.0)
        self._release_prefill(rec, slot, now)
        decode = rec.slot
        ids = rec.prompt_ids
        assert decode is not None
        assert ids is not None
        rec.prompt_ids = None
        kv = {
            "do_remote_prefill": True,
            "remote_engine_id": slot.instance_id,
            "remote_request_id": info.request_id,
        }
        failure = self._queue(rec, decode, ids, info.max_tokens, now, kv)
        if failure is not None:  # the KV pinned for it is released (the connector does)
            slot.core.release_kv(info.request_id)
            self.kick(slot)
            self._pd_failed(rec, decode, now, *failure)
            return
        decode.awaiting_first[info.request_id] = rec

    def _release_prefill(self, rec: SimRequest, slot: InstanceSlot, now: float) -> None:
        """The prefill instance stops carrying ``rec`` (``Dispatcher._release_prefill``)."""
        rec.prefill_slot = None
        self._vacate(slot, rec.adapter, now)
        slot.state.queued_prefill_tokens -= rec.info.prompt_tokens
        self.fleet.mark(slot)

    def _pd_failed(
        self, rec: SimRequest, failed: InstanceSlot, now: float, error: str, refused: bool
    ) -> None:
        """``failed``'s engine would not take a leg of ``rec``: it ends FAILED there (as
        ``Dispatcher._pd_failed`` ends a request refused by an engine, which is not retried),
        both instances released."""
        prefill, decode = rec.prefill_slot, rec.slot
        assert decode is not None
        if prefill is not None:
            self._release_prefill(rec, prefill, now)
        del self.reqs[rec.info.request_id]
        self.complete(rec, decode, now, error=error, refused=refused, ended_on=failed)

    def kick(self, slot: InstanceSlot) -> None:
        """Have the simulator start a step on ``slot`` if it is idle (with work)."""
        if not slot.busy and not slot.kick_pending:
            slot.kick_pending = True
            self.kicks.append(slot)

    def _occupy(self, slot: InstanceSlot, adapter: str | None, now: float) -> int:
        """A call starts on ``slot`` (for the LoRA ``adapter``): its ``in_flight`` goes up
        (returned) and, at its bound, it leaves the free set (its view is marked stale by
        the caller)."""
        state, fleet = slot.state, self.fleet
        in_flight = state.in_flight
        # the load integrated up to now before in_flight goes up
        slot.in_flight_area += in_flight * (now - slot.in_flight_since)
        slot.in_flight_since = now
        state.in_flight = in_flight = in_flight + 1
        if adapter is not None:
            fleet.lora_call_started(slot, adapter)
        if in_flight > slot.max_in_flight:
            slot.max_in_flight = in_flight
        if in_flight == slot.bound:
            fleet.leave_free(slot)
        return in_flight

    def _vacate(self, slot: InstanceSlot, adapter: str | None, now: float) -> int:
        """A call on ``slot`` (for the LoRA ``adapter``) is over: its ``in_flight`` goes
        down and, from its bound, it is free again. Returns ``in_flight`` as it was."""
        state, fleet = slot.state, self.fleet
        in_flight = state.in_flight
        # the load integrated up to now before in_flight goes down
        slot.in_flight_area += in_flight * (now - slot.in_flight_since)
        slot.in_flight_since = now
        state.in_flight = in_flight - 1
        if adapter is not None:
            fleet.lora_call_ended(slot, adapter)
        if in_flight == slot.bound:
            fleet.join_free(slot)
        return in_flight

    def _start(self, rec: SimRequest, slot: InstanceSlot, pending: int, now: float) -> None:
        state, info, fleet = slot.state, rec.info, self.fleet
        adapter = rec.adapter
        rec.batch_at_start = self._occupy(slot, adapter, now)
        state.queued_prefill_tokens += info.prompt_tokens
        state.outstanding_decode_tokens += info.max_tokens
        rec.slot = slot
        rec.scheduled_at = now
        rec.pending_tokens = pending
        if self.track_prefixes:
            fleet.prefix.insert(state.instance_id, info.block_hashes)
        fleet.mark(slot)
        ids = rec.prompt_ids
        rec.prompt_ids = None
        assert ids is not None
        failure = self._queue(rec, slot, ids, info.max_tokens, now)
        if failure is not None:
            del self.reqs[info.request_id]
            self.complete(rec, slot, now, error=failure[0], refused=failure[1])
            return
        slot.awaiting_first[info.request_id] = rec

    def _queue(
        self,
        rec: SimRequest,
        slot: InstanceSlot,
        ids: Sequence[int],
        max_tokens: int,
        now: float,
        kv_transfer: dict[str, object] | None = None,
    ) -> tuple[str, bool] | None:
        """Queue ``rec`` (a whole request, or the PD leg ``kv_transfer`` says) on
        ``slot``'s engine, cut to its context as ``SimEngine`` cuts it, and have the
        instance kicked if it is idle. If the engine will not take it: the error, in the
        manager's words, and whether it was the engine's refusal of the request itself
        (which says nothing against the instance)."""
        info, core, adapter = rec.info, slot.core, rec.adapter
        hashes = None  # the engine hashes the prompt itself unless it has them already
        if self.track_prefixes and core.block_size == self.prefix_block_size:
            hashes = info.block_hashes
        elif adapter is not None and core.config.enable_prefix_caching:
            salt = ADAPTER_SALT + adapter  # an adapter's blocks are its own
            hashes = salted_hashes(prompt_block_hashes(ids, core.block_size), salt)
        try:  # cut to the context, or refused, as SimEngine does before queueing
            run = context_max_tokens(
                slot.max_model_len, len(ids), max_tokens, text=rec.prompt_is_text
            )
            core.add_request(
                info.request_id, ids, run, arrival=now, kv_transfer=kv_transfer,
                block_hashes=hashes, lora=adapter,
                priority=int(info.priority),  # (read by an engine that schedules by it)
            )  # fmt: skip
        except InvalidRequestError as exc:  # the engine refused the request itself
            refusal = refusal_of(exc, slot.instance_id)
            assert refusal is not None
            return f"{type(refusal).__name__}: {refusal_reason(refusal)}", True
        except ConflictError as exc:
            return f"{type(exc).__name__}: {exc.message}", False
        if not self.record_token_times and (
            kv_transfer is None or "do_remote_prefill" in kv_transfer
        ):  # what it will answer (counted token by token otherwise)
            rec.output = run
        self.kick(slot)
        return None

    def first_token(self, rec: SimRequest, slot: InstanceSlot, now: float) -> None:
        """The first token of ``rec`` came back at ``now``."""
        rec.first_token_s = now
        if not rec.disaggregated:  # (its decode instance was charged no prefill)
            slot.state.queued_prefill_tokens -= rec.info.prompt_tokens
            self.fleet.mark(slot)

    def complete(
        self,
        rec: SimRequest,
        slot: InstanceSlot,
        now: float,
        *,
        error: str | None = None,
        refused: bool = False,
        ended_on: InstanceSlot | None = None,
    ) -> None:
        """The request ended on ``slot`` (its decode instance when disaggregated), which
        stops carrying it: account it as ``Dispatcher._finish`` does (a failure with
        ``error``, counted on ``ended_on`` when that is another instance, its prefill
        instance; ``refused``: the engine refused the request itself, which says nothing
        against the instance)."""
        info, state = rec.info, slot.state
        ok = error is None
        first = rec.first_token_s
        output = rec.output if ok else 0
        arrival = info.arrival
        e2e_s = now - arrival
        tpot_s = (now - first) / (output - 1) if first is not None and output > 1 else None
        if first is None and not rec.disaggregated:
            state.queued_prefill_tokens -= info.prompt_tokens
        in_flight = self._vacate(slot, rec.adapter, now)
        state.outstanding_decode_tokens -= info.max_tokens
        fleet = self.fleet
        if ended_on is not None and ended_on is not slot:
            fleet.mark(slot)
            slot = ended_on
            state = slot.state
        if ok:
            state.completed += 1
            state.tokens_generated += output
            state.record_latency(e2e_s * 1000.0)
            if first is not None and not rec.disaggregated:
                # its TTFT over the tokens it prefilled refines the estimate (a PD request's
                # prefill leg refined its own instance's)
                ttft_s, prefilled = first - rec.scheduled_at, rec.pending_tokens - rec.cached_tokens
                state.observe_first_token(ttft_s, prefilled)
            if tpot_s is not None:
                state.observe_tpot(tpot_s, max(rec.batch_at_start, in_flight))
        else:
            state.failed_requests += 1
            if not refused:
                state.failed_calls += 1
        fleet.mark(slot)
        counting = self._counting
        if counting is not None:
            counting.count_completion()
        else:
            self._report_completion(rec, slot, now, ok, output, tpot_s, e2e_s)
        self.measurements.append(
            request_measurement(rec, arrival, first, now, output, error, rec.token_times)
        )

    def _report_completion(
        self,
        rec: SimRequest,
        slot: InstanceSlot,
        now: float,
        ok: bool,
        output: int,
        tpot_s: float | None,
        e2e_s: float,
    ) -> None:
        """``policy.on_complete`` with the request's :class:`CompletionRecord`."""
        info = rec.info
        arrival = info.arrival
        first = rec.first_token_s
        ttft_s = None if first is None else first - arrival
        slo_e2e = rec.slo_e2e_s
        slo_met = None if slo_e2e is None else ok and e2e_s <= slo_e2e
        scheduled_at = rec.scheduled_at
        cost = rec.prefill_cost + slot.cost_per_s * (now - scheduled_at)
        self.policy.on_complete(
            _completion_record(
                info.request_id,
                _COMPLETED if ok else _FAILED,
                info.priority,
                slot.instance_id,
                arrival,
                now,
                scheduled_at - arrival,
                ttft_s,
                tpot_s,
                e2e_s,
                info.prompt_tokens,
                output,
                slo_met,
                rec.predicted_e2e_s,
                cost,
            )
        )

    def _reject(self, wr: WorkloadRequest, now: float, error: str) -> None:
        self.rejected += 1
        self.measurements.append(measure(wr, now, None, now, 0, error))

    def abandon_leftovers(self, now: float) -> None:
        """Requests still queued when no event is left (nothing could ever serve them)."""
        for rec in list(self.reqs.values()):
            self.policy.remove(rec.info.request_id)
            self.measurements.append(
                request_measurement(rec, rec.info.arrival, None, now, 0, "never dispatched")
            )
        self.reqs.clear()
