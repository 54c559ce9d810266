"""The dispatcher: the single loop that turns queued requests into engine calls.

On every wake-up (a submission, a finished request, a new or recovered instance, a policy
switch) while requests are queued, it takes one snapshot of the fleet and, while some
instance has a free slot, asks the scheduling policy for the next request, asks the router
where it goes, accounts the load on the snapshot's successor (so a burst spreads), and
starts the engine call. The submissions of one turn of the event loop share a pass. A
caller that waits for a request's end (:meth:`ControlPlaneManager.collect`) and finds
nothing else queued runs the pass itself at once (:meth:`Dispatcher.start_here`) and, when
it starts the request on a whole-request instance, the engine call too, in its own task
(:meth:`Dispatcher.execute_here`). When the queue is empty and the policy's queue only
orders requests (``fifo``, ``priority``, ``cost_optimized``), a collected request or a
stream does not even enter it: the pass that would pop it straight back runs without the
queue (:meth:`Dispatcher._dispatch_lone`), and a request that cannot start yet is queued
as any other. A stream started that way on an HTTP engine is relayed from the engine by
the task that reads it (:meth:`Dispatcher.stream_here`), with no task of its own either.

Invariants it keeps:

* an instance never has more than ``max_concurrent_requests`` requests in flight (the
  counters it checks are the ones it changes, in the same synchronous step);
* a request runs at most once to completion: only a failure *before the first token* is
  retried, on another instance, at most ``max_retries`` times;
* every request ends in exactly one of COMPLETED, FAILED (with the reason) or CANCELLED.

PD (``pd`` given): for a model whose fleet is set up for PD (it has PREFILLING, DECODING or
HYBRID instances) the decider says whether a request is disaggregated, the orchestrator picks
the (prefill, decode) pair and the connector runs both legs. The decided path is a
preference: when it has no free slot and the other path has one, the other is taken. Load
is accounted per phase (see :mod:`sage_llm.control_plane.pd.orchestrator`). A failure
before the first token is retried like any other, on a colocated instance when the prefill
leg failed and ``fallback_to_colocated`` is set; the prefill side's KV is released when the
request is cancelled between the legs (the connector does it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Any, TypeGuard, TypeVar, cast

from sage_llm.control_plane.health import (
    HealthMonitor,
    counts_against_health,
    with_stream_timeouts,
)
from sage_llm.control_plane.instances import InstanceRegistry, InstanceState
from sage_llm.control_plane.metrics import ControlPlaneMetrics
from sage_llm.control_plane.pd import PDComponents, PDLegError, PDLegs, PDPlan
from sage_llm.control_plane.pd.connectors import samples_asked
from sage_llm.control_plane.pd.orchestrator import (
    Member,
    pair_exists,
    predicted_e2e_s,
    servable_view,
    unservable_reason,
    uses_pd,
    with_pd_assignment,
)
from sage_llm.control_plane.records import (
    STREAM_END,
    ChoiceParts,
    FinishedRecords,
    LastInstances,
    Placement,
    RequestRecord,
    add_output,
    choice_parts,
    choice_result,
)
from sage_llm.control_plane.routing.base import Router, route_id
from sage_llm.control_plane.routing.lora import LoraRoom
from sage_llm.control_plane.routing.prefix_index import PrefixIndex
from sage_llm.control_plane.scheduling._queue import (
    QueuedPolicy,
    admits_all,
    counting_only,
    queue_order_only,
    serves,
)
from sage_llm.control_plane.scheduling.admission import eligible_instances
from sage_llm.control_plane.scheduling.base import SchedulingPolicy, policy_label
from sage_llm.control_plane.snapshot import ClusterSnapshot, CompletionRecord, RequestInfo
from sage_llm.engines.base import (
    BatchingEngineClient,
    Chunk,
    EngineClient,
    EngineRequest,
    KVHandle,
    answered_whole,
    asks_prompt_logprobs,
)
from sage_llm.errors import (
    ControlPlaneNotRunningError,
    DeadlineExceededError,
    EngineError,
    EngineRequestRejectedError,
    EngineStreamError,
    EngineTimeoutError,
    InvalidRequestError,
    NoHealthyInstanceError,
    RequestCancelledError,
    SageLLMError,
)
from sage_llm.sim.clock import Clock
from sage_llm.types import (
    ChoiceResult,
    ExecutionInstance,
    ExecutionInstanceType,
    ParallelismType,
    RequestPriority,
    RequestResult,
    RequestStatus,
    fill_request_result,
)

_FULL_CREDIT = 1.0 - 1e-9
"""An instance's ``stream_credit`` at which its next non-streaming request streams (1, less
the rounding of adding a fraction such as 0.1 ten times)."""


def internal_error(exc: BaseException) -> str:
    """The reason of a request failed by a bug (a plugin's, or the control plane's): the
    exception's type and message, not its ``repr`` (which may hold the whole request);
    the traceback goes to the log."""
    return f"internal error: {type(exc).__name__}: {exc}"


STOPPED = "control plane stopped"
"""The reason of a request cancelled because the control plane stopped."""
CANCELLED_BY_CALLER = "cancelled by the caller"
"""The error of a request its caller cancelled (without a reason of its own)."""


def timed_out(timeout_s: float) -> str:
    """The error of a request cancelled because its time limit passed."""
    return f"timed out: its limit of {timeout_s:g} s passed"


log = logging.getLogger("sage_llm.dispatcher")


def _rid(rec: RequestRecord) -> dict[str, str]:
    """A log record's ``extra`` for ``rec``: its request id as a field of its own (as the
    gateway's lines about the request carry it)."""
    return {"request_id": rec.request_id}


_FAILED = object()
"""What :meth:`Dispatcher._route_and_start` returns for a request whose routing failed."""

_T = TypeVar("_T")

MAX_DEFERRED = 64
"""Popped requests that found no route, put back at the end of a pass; then the pass ends."""


def refusal_of(
    exc: BaseException, instance_id: str | None = None
) -> EngineRequestRejectedError | None:
    """The engine's refusal of the request itself that ``exc`` is or carries (a PD leg's
    error carries its engine's), as an :class:`EngineRequestRejectedError`; None when
    ``exc`` is another failure. An in-process engine refuses with
    :class:`InvalidRequestError` (``instance_id``: the engine's instance)."""
    if isinstance(exc, EngineRequestRejectedError):
        return exc
    if isinstance(exc, InvalidRequestError):
        where = f"{instance_id}: " if instance_id else ""
        return EngineRequestRejectedError(
            f"{where}rejected the request: {exc.message}",
            instance_id=instance_id,
            status=exc.http_status,
            param=exc.param,
        )
    if isinstance(exc, PDLegError):
        return refusal_of(exc.cause, exc.instance_id)
    return None


def refusal_reason(refusal: EngineRequestRejectedError) -> str:
    """How a request that an engine refused ends: its failure's reason (the cluster
    simulator reports its engines' refusals in the same words)."""
    return f"engine {refusal.message}"


_CONTEXT_REFUSALS = (
    "maximum context length",  # vLLM's (to 0.10; since, a prompt past it), SGLang's
    "longer than the maximum model length",  # vLLM 0.11+: a prompt that fills it
    "cannot be greater than max_model_len",  # vLLM 0.11+: max_tokens past it
    "max_tokens must be at least 1, got 0",  # vLLM 0.11+: a prompt that fills it (no room)
    "exceeds the available context size",  # llama.cpp's llama-server (a slot's context)
    "is larger than the max context size",  # llama.cpp's, older releases
)


def is_context_refusal(message: str) -> bool:
    """Whether an engine's refusal ``message`` says the request is longer than its context
    (its ``max_model_len``), in the words of the vLLM, SGLang and llama.cpp releases."""
    lowered = message.lower()
    return any(words in lowered for words in _CONTEXT_REFUSALS)


def failure_error(
    result: RequestResult, exception: BaseException | None, *, cancelled: bool = False
) -> SageLLMError | None:
    """The error a request that did not complete raises to whoever waits for it, from its
    result and the exception that failed it (None for a completed one): a deadline as
    :class:`DeadlineExceededError`, no instance as :class:`NoHealthyInstanceError`, an
    engine's refusal of the request as :class:`EngineRequestRejectedError` (a 400 naming the
    field), another engine failure as :class:`EngineError`. A cancelled request gives
    :class:`RequestCancelledError` (:class:`ControlPlaneNotRunningError` when the control
    plane's stop cancelled it) with ``cancelled``, else None."""
    if result.status is RequestStatus.COMPLETED:
        return None
    if result.status is RequestStatus.CANCELLED:
        if not cancelled:
            return None
        reason = result.error or "no reason given"
        message = f"request {result.request_id!r} was cancelled: {reason}"
        if reason == STOPPED:
            return ControlPlaneNotRunningError(message)
        return RequestCancelledError(message)
    if isinstance(exception, DeadlineExceededError):
        return DeadlineExceededError(result.error or exception.message)
    if isinstance(exception, NoHealthyInstanceError):
        return NoHealthyInstanceError(
            result.error or exception.message, retry_after_s=exception.retry_after_s
        )
    refusal = refusal_of(exception) if exception is not None else None
    if refusal is not None:  # the client's request was refused: a 400, not a 502
        return EngineRequestRejectedError(
            result.error or refusal.message,
            instance_id=refusal.instance_id,
            status=refusal.status,
            param=refusal.param,
        )
    if isinstance(exception, EngineError):
        return EngineError(
            result.error or exception.message,
            instance_id=exception.instance_id,
            status=exception.status,
            retryable=False,
        )
    return EngineError(
        result.error or "request failed", instance_id=result.instance_id, retryable=False
    )


def _batched(client: EngineClient) -> TypeGuard[BatchingEngineClient]:
    """Whether an engine client yields its chunks a read at a time (``generate_batches``,
    as :class:`~sage_llm.engines.http.HTTPEngineClient` does)."""
    return hasattr(client, "generate_batches")


@dataclass
class _PDRun:
    """Live state of one PD request's execution."""

    prefill: InstanceState
    decode: InstanceState
    prompt_tokens: int
    adapter: str | None = None
    """The LoRA adapter both legs run (None: the model)."""
    prefill_open: bool = True
    prefill_end: float | None = None
    prefill_cost: float = 0.0


class Dispatcher:
    """Owns the active request records and the dispatch loop."""

    def __init__(
        self,
        *,
        registry: InstanceRegistry,
        policy: SchedulingPolicy,
        router: Router,
        clock: Clock,
        metrics: ControlPlaneMetrics,
        prefix_index: PrefixIndex,
        finished: FinishedRecords,
        max_retries: int = 2,
        retry_backoff_s: float = 0.05,
        on_instance_idle: Callable[[InstanceState], None] | None = None,
        pd: PDComponents | None = None,
        health: HealthMonitor | None = None,
        first_token_timeout_s: float | None = None,
        idle_timeout_s: float | None = None,
        max_queue_wait_s: float | None = None,
        seed: int | None = None,
        stream_sample: float = 0.0,
        stream_sample_gap_s: float = 0.0,
        last_instances: LastInstances | None = None,
        lora_slot_routing: bool = True,
    ) -> None:
        self.registry = registry
        self.policy = policy
        self.order_only: QueuedPolicy | None = None
        self.counting: QueuedPolicy | None = None
        self.admits_all: QueuedPolicy | None = None
        self.set_policy(policy)
        self.router = router
        self.clock = clock
        self.metrics = metrics
        self.prefix_index = prefix_index
        self.finished = finished
        self.last_instances = last_instances
        """Where each session's completed requests ran (None: not kept)."""
        self.max_retries = max_retries
        self.retry_backoff_s = retry_backoff_s
        self.records: dict[str, RequestRecord] = {}
        self._on_instance_idle = on_instance_idle
        self.pd = pd
        self.health = health
        self.first_token_timeout_s = first_token_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.max_queue_wait_s = max_queue_wait_s
        self.stream_sample = stream_sample
        """The fraction of non-streaming requests whose engine call streams anyway
        (``engine_stream = "sampled"``; 0: none), spread evenly over each instance's."""
        self.stream_sample_gap_s = stream_sample_gap_s
        """The least time between two sampled streams on one instance (0: no limit)."""
        self._rng = random.Random(seed)  # retry backoff jitter
        self._backing_off: set[str] = set()
        """Requests waiting out a retry's backoff before they go back into the queue:
        queued all the same (:attr:`queued_depth`); one that ends meanwhile leaves it."""
        self._colocated_only: set[str] = set()
        """Retries after a failed prefill leg: run colocated while a whole-request instance
        can take them, as a pair again once none can (excluded, down or drained)."""
        self._pd_runs: dict[str, _PDRun] = {}  # the disaggregated requests running
        self.lora_slot_routing = lora_slot_routing
        """Whether a request for a LoRA adapter is routed by the engines' LoRA slots
        (:class:`~sage_llm.control_plane.routing.lora.LoraRoom`)."""
        self.lora_room = LoraRoom()
        """Which instances have room for a LoRA adapter's request; the adapters in demand."""
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._here: RequestRecord | None = None  # see start_here
        self._here_state: InstanceState | None = None
        self._here_streams = False
        self._stopping = False

    # -- loop ------------------------------------------------------------------------------

    def wake(self) -> None:
        """Ask for a dispatch pass (none is needed while nothing is queued)."""
        if len(self.policy):
            self._wake.set()

    async def run(self) -> None:
        expires_at: float | None = None  # when the first queued request goes over its limit
        while True:
            if expires_at is None:
                await self._wake.wait()
            else:  # wake up as the first queued request goes over max_queue_wait_s
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(expires_at - self.clock.now(), 1e-6)):
                        await self._wake.wait()
            self._wake.clear()
            try:
                expires_at = self.expire_queued()
                self.dispatch_ready()
            except Exception:  # a bug in a plugin must not kill the loop
                log.exception("dispatch pass failed")
                if expires_at is not None:  # not again at once
                    expires_at = max(expires_at, self.clock.now() + 0.05)

    def expire_queued(self) -> float | None:
        """Fail queued requests that waited longer than ``max_queue_wait_s`` (one that
        waited exactly that long stays). Returns when the first of those left goes over
        it (None: none queued, or no limit): a request queued later (the dispatcher is
        woken then) goes over it later."""
        limit = self.max_queue_wait_s
        if limit is None:
            return None
        now = self.clock.now()
        first: float | None = None
        for rec in list(self.records.values()):
            if rec.status is not RequestStatus.QUEUED:
                continue
            if now - rec.queued_at > limit:
                reason = f"queued longer than {limit:g} s (max_queue_wait_s)"
                rec.exception = DeadlineExceededError(reason)
                self.fail_queued(rec, reason)
                self.metrics.queue_depth.set(self.queued_depth)
            elif first is None or rec.queued_at < first:
                first = rec.queued_at
        return None if first is None else first + limit

    def dispatch_ready(self) -> None:
        """One pass: start as many queued requests as the fleet has room for."""
        if not len(self.policy):
            return  # nothing queued
        snap = self.registry.snapshot(self.clock.now(), self.prefix_index)
        pd_models = self._pd_models(snap)
        deferred: list[RequestInfo] = []
        broken: Exception | None = None
        try:
            self._dispatch(snap, pd_models, deferred)
        except Exception as exc:
            broken = exc
        finally:  # what was popped and kept queued goes back, whatever happened
            for info in deferred:
                self.policy.push(info)
        if broken is not None:
            # a bug (the policy's pop, a plugin's) that would fail every pass the same way:
            # no queued request would ever start
            log.error(
                "a dispatch pass failed (scheduling policy %s); failing the queued requests",
                self.policy.name, exc_info=broken,
            )  # fmt: skip
            reason = internal_error(broken)
            for rec in [r for r in self.records.values() if r.status is RequestStatus.QUEUED]:
                self.fail_queued(rec, reason)
        self.metrics.queue_depth.set(self.queued_depth)

    def _dispatch(
        self, snap: ClusterSnapshot, pd_models: tuple[str, ...], deferred: list[RequestInfo]
    ) -> None:
        """The loop of :meth:`dispatch_ready`: the requests it pops but cannot start now
        go into ``deferred``."""
        while len(self.policy) and snap.has_capacity():
            started = time.perf_counter()
            info = self.policy.pop(servable_view(snap, pd_models) if pd_models else snap)
            if info is None:
                break
            rec = self.records.get(info.request_id)
            if rec is None or rec.status is not RequestStatus.QUEUED:
                continue
            rec.info = info  # the policy may have changed it (e.g. demoted)
            plan = (
                self._pd_plan(info, snap, rec.engine_request)
                if info.model in pd_models and self.may_split(rec.engine_request)
                else None
            )
            if plan is not None:
                decided_s = time.perf_counter() - started
                self.metrics.routing_seconds.observe(decided_s)
                self.metrics.on_pd_decision(decided_s)
                rec.predicted_e2e_s = predicted_e2e_s(snap, plan, info)
                prefill_view = snap.get(plan.prefill_id)
                if prefill_view is not None:
                    rec.predicted_prefill_s = prefill_view.predict_ttft_s(info.prompt_tokens)
                snap = with_pd_assignment(snap, plan, info)
                self._start_pd(rec, plan)
                continue
            after = self._route_and_start(rec, info, snap, started, pd_models)
            if after is _FAILED:
                continue
            if after is None:  # nothing free for this one now; keep it queued
                deferred.append(info)
                log.debug("no route for %s now; it stays queued", info.request_id)
                if len(deferred) >= MAX_DEFERRED:
                    break
                continue
            snap = cast(ClusterSnapshot, after)

    def _route_and_start(
        self,
        rec: RequestRecord,
        info: RequestInfo,
        snap: ClusterSnapshot,
        started: float,
        pd_models: tuple[str, ...],
    ) -> ClusterSnapshot | object | None:
        """Route ``rec`` (its scheduling view ``info``, popped at ``started``) as a whole
        request on ``snap`` and start it; the snapshot the pass's next decision reads, or
        None when no instance can take it now (it is not started). A failure of the policy
        or the router (a plugin's bug) ends ``rec`` FAILED with the reason, and
        ``_FAILED`` is returned: it has left the queue, and nothing else would start or
        end it."""
        try:
            allowed = self.policy.constrain(info, snap)
            if self.pd is not None and info.model in pd_models:  # not where PD holds prefill
                allowed = self.pd.orchestrator.whole_allowed(info, snap, allowed)
            if info.parallelism_hint is not None:
                allowed = self._of_parallelism(info.parallelism_hint, snap, allowed)
            wider = None
            if (adapter := rec.adapter) is not None and self.lora_slot_routing:
                allowed, wider = self.lora_room.narrow(
                    adapter, info, snap, allowed, now=self.clock.now(), find=self.registry.find
                )
            chosen = route_id(self.router, info, snap, allowed)
            if chosen is None and wider is not None:  # where it runs: none free; with room
                chosen = route_id(self.router, info, snap, wider)
            if chosen is None and allowed is not None:
                chosen = route_id(self.router, info, snap)
        except Exception as exc:
            log.exception("routing request %s failed", rec.request_id, extra=_rid(rec))
            self._finish(rec, RequestStatus.FAILED, error=internal_error(exc))
            return _FAILED
        if chosen is None:
            return None
        decided_s = time.perf_counter() - started
        self.metrics.routing_seconds.observe(decided_s)
        if info.model in pd_models:
            self.metrics.on_pd_routed("colocated")
            self.metrics.on_pd_decision(decided_s)
        view = snap.get(chosen)
        pending = (view.queued_prefill_tokens if view else 0) + info.prompt_tokens
        rec.predicted_e2e_s = (
            view.predict_e2e_s(info.prompt_tokens, info.max_tokens) if view else None
        )
        if len(self.policy):  # the next decision of this pass sees this one
            snap = snap.with_assignment(chosen, info)
        self._start(rec, chosen, pending)
        return snap

    def _of_parallelism(
        self, hint: ParallelismType, snap: ClusterSnapshot, allowed: frozenset[str] | None
    ) -> frozenset[str] | None:
        """``allowed`` narrowed to the instances whose parallelism is ``hint``
        (:meth:`ParallelismType.of` their TP, PP and DP sizes); ``allowed`` itself when
        none is. A hint is a preference: when the router finds none of them able to take
        the request now, the request is routed without it (as without the policy's
        constraint)."""
        find = self.registry.find
        matching = frozenset(
            view.instance_id
            for view in snap
            if (allowed is None or view.instance_id in allowed)
            and (state := find(view.instance_id)) is not None
            and state.parallelism is hint
        )
        return matching or allowed

    def set_policy(self, policy: SchedulingPolicy) -> None:
        """Make ``policy`` the one that schedules from now on (switch it with this, not by
        assigning :attr:`policy`: what the per-request shortcuts may assume of it is
        worked out here, once, not per request):

        * :attr:`order_only`: ``policy`` when its queue only orders requests
          (:func:`~sage_llm.control_plane.scheduling._queue.queue_order_only`);
        * :attr:`counting`: ``policy`` when its ``on_complete`` only counts
          (:func:`~sage_llm.control_plane.scheduling._queue.counting_only`);
        * :attr:`admits_all`: ``policy`` when it admits every request
          (:func:`~sage_llm.control_plane.scheduling._queue.admits_all`).

        Each is None otherwise."""
        self.policy = policy
        self.order_only = queue_order_only(policy)
        self.counting = counting_only(policy)
        self.admits_all = admits_all(policy)

    def takes_lone(self) -> bool:
        """Whether a request submitted now may skip the queue (:meth:`start_here` with
        ``queued`` False): nothing is queued and the policy's queue only
        orders requests."""
        return self.order_only is not None and not len(self.policy)

    def _dispatch_lone(self, rec: RequestRecord) -> None:
        """The pass :meth:`dispatch_ready` would run for ``rec`` pushed alone onto the empty
        queue of a policy whose queue half is :class:`QueuedPolicy`'s own
        (:func:`~sage_llm.control_plane.scheduling._queue.queue_order_only`), without the
        push and the pop: that pass notes the snapshot (``observe``), pops ``rec`` when a
        whole-request instance of its model has a free slot, and routes and starts it.
        When it cannot start now (no free instance, no route, or a model set up for PD),
        it is pushed and waits in the queue like any other."""
        started = time.perf_counter()
        info = rec.info
        policy = self.policy
        order_only = self.order_only
        snap = self.registry.snapshot(self.clock.now(), self.prefix_index)
        pd_models = self._pd_models(snap)
        if order_only is not None:
            order_only.observe(snap)
            if (
                info.model not in pd_models
                and serves(snap, info.model)
                and self._route_and_start(rec, info, snap, started, pd_models) is not None
            ):
                return
        policy.push(info)
        self.metrics.queue_depth.set(self.queued_depth)

    # -- PD decisions ----------------------------------------------------------------------

    def _pd_models(self, snap: ClusterSnapshot) -> tuple[str, ...]:
        """Models of ``snap`` whose fleet is set up for PD (none when PD is off)."""
        if self.pd is None:
            return ()
        roles: dict[str, set[ExecutionInstanceType]] = {}
        for view in snap:
            roles.setdefault(view.model, set()).add(view.role)
        return tuple(m for m, r in roles.items() if uses_pd(r))

    def runs_whole(self, model: str) -> bool:
        """Whether an instance of ``model`` that runs whole requests is registered (up or
        not, draining or not)."""
        return any(role.runs_whole_requests for _, role in self._members(model, draining=True))

    def may_split(self, req: EngineRequest) -> bool:
        """Whether ``req`` may run disaggregated: not when it asks for several samples and
        the PD connector cannot split such a request (then it runs colocated)."""
        pd = self.pd
        return pd is None or pd.connector.splits_samples or samples_asked(req.extra) == 1

    def _pd_plan(
        self, info: RequestInfo, snap: ClusterSnapshot, req: EngineRequest
    ) -> PDPlan | None:
        """The pair to run ``info`` (``req``) disaggregated on, or None to run it colocated:
        so does a request whose prefill leg failed, or that asks for its prompt's logprobs
        when the connector gains nothing by splitting it (vLLM's decode engine computes such
        a prompt again), while a whole-request instance can take it."""
        pd = self.pd
        if pd is None:
            return None
        pd.orchestrator.observe(info, snap)
        if (
            info.request_id in self._colocated_only
            or (not pd.connector.splits_prompt_logprobs and asks_prompt_logprobs(req))
        ) and eligible_instances(info, snap):
            return None
        if snap.runnable(info):
            decision = pd.decider.decide(info, snap)
            if not decision.disaggregate:
                log.debug("request %s kept whole: %s", info.request_id, decision.reason)
                return None
            why = decision.reason
        else:
            why = "no whole-request instance is free"
        rooms: tuple[frozenset[str] | None, ...] = ()
        if req.model != info.model and self.lora_slot_routing:  # a LoRA adapter's request
            rooms = self.lora_room.narrow(
                req.model, info, snap, None, now=self.clock.now(), find=self.registry.find
            )
        plan = pd.orchestrator.plan_within(info, snap, rooms)
        return None if plan is None else replace(plan, reason=f"{why}; {plan.reason}")

    def _placement(
        self, rec: RequestRecord, state: InstanceState | None
    ) -> ExecutionInstance | Placement | None:
        """Where ``rec`` ran, for its scheduling decision: its instance, a
        :class:`Placement` for a disaggregated request, None when it never ran."""
        if state is None or rec.instance_id is None:
            return None
        if rec.prefill_instance_id is None:
            return state.instance
        prefill = self.registry.find(rec.prefill_instance_id)
        return Placement(
            state.instance,
            None if prefill is None else prefill.instance,
            rec.predicted_prefill_s,
        )

    def unservable_reason(
        self, model: str, excluded: frozenset[str] = frozenset(), *, adapter: str | None = None
    ) -> str | None:
        """Why no registered instance could run a request for ``model`` (None: some can,
        now or once they have a free slot or are healthy again). A draining instance does
        not count: it takes no new request until the operator says so. With ``excluded``
        (the instances a retried request failed on, and those that do not serve its LoRA
        ``adapter``) none of those counts either."""
        pd_enabled = self.pd is not None
        members = self._members(model)
        reason = unservable_reason(model, members, pd_enabled=pd_enabled)
        if reason is None:
            if excluded and unservable_reason(
                model, self._members(model, excluded), pd_enabled=pd_enabled
            ):
                if adapter is not None:
                    return (
                        f"no instance serving LoRA adapter {adapter!r} of model {model!r} "
                        "can run it now (those that serve it are draining or removed, or "
                        "it failed on them)"
                    )
                tried = ", ".join(sorted(excluded))
                return (
                    f"it failed on instance(s) {tried}, and no other instance serving model "
                    f"{model!r} can run it (the others are draining or removed)"
                )
            return None
        draining = sum(
            1
            for s in self.registry
            if s.instance.model_name == model and s.draining and not s.removed
        )
        if not draining:
            return reason
        if not members:
            return f"every instance serving model {model!r} is draining ({draining})"
        return f"{reason} (and {draining} draining)"

    def drained_out(self, model: str) -> bool:
        """Whether ``model`` is unservable only because instances are draining: with them
        it would be servable (the refusal's reason label is then ``draining``)."""
        members = self._members(model, draining=True)
        return unservable_reason(model, members, pd_enabled=self.pd is not None) is None

    def _members(
        self,
        model: str,
        excluded: frozenset[str] = frozenset(),
        *,
        now: bool = False,
        draining: bool = False,
    ) -> list[Member]:
        """The instances of ``model`` that may take its requests, now or later (not those
        removed or draining, nor ``excluded``); with ``now``, only those that may take one
        now (routable: not ejected); with ``draining``, draining ones too."""
        return [
            (s.instance_id, s.instance.instance_type)
            for s in self.registry
            if s.instance.model_name == model
            and not s.removed
            and (draining or not s.draining)
            and s.instance_id not in excluded
            and (not now or s.routable)
        ]

    # -- execution -------------------------------------------------------------------------

    def _start(self, rec: RequestRecord, instance_id: str, pending: int) -> None:
        state = self.registry.get(instance_id)
        info = rec.info
        state.in_flight += 1
        if (adapter := rec.adapter) is not None:
            self._lora_call(state, adapter, started=True)
        state.queued_prefill_tokens += info.prompt_tokens
        state.outstanding_decode_tokens += info.max_tokens
        now = self.clock.now()
        rec.queued_s = rec.queue_wait_s(now)  # its wait ends (while it is still QUEUED)
        rec.status = RequestStatus.SCHEDULED
        rec.instance_id = state.instance_id
        rec.scheduled_at = now
        rec.attempts += 1
        rec.pending_tokens_at_dispatch = pending
        rec.batch_at_start = state.in_flight
        rec.meta.schedule_time = self.clock.to_datetime(now)
        self.prefix_index.insert(state.instance_id, info.block_hashes)
        self.metrics.set_in_flight(state.instance_id, state.in_flight)
        self.metrics.running.inc()
        if rec is self._here and (not self._here_streams or _batched(state.client)):
            self._here_state = state  # its caller runs the engine call (start_here)
            rec.task = asyncio.current_task()
            return
        task = asyncio.create_task(self._execute(rec, state), name=f"req-{rec.request_id}")
        rec.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def start_here(
        self, rec: RequestRecord, *, queued: bool = True, stream: bool = False
    ) -> InstanceState | None:
        """Run a dispatch pass now, for a caller about to wait for ``rec`` (the only request
        queued, or, with ``queued`` False, one not pushed onto the empty queue of a policy
        that allows it: see :meth:`_dispatch_lone`): when the pass starts ``rec`` on a
        whole-request instance, its engine call is not given a task of its own but left to
        the caller, who runs it with :meth:`execute_here` (one task and three turns of the
        event loop fewer per request), or, with ``stream``, relays it with
        :meth:`stream_here` (only from an engine client that has ``generate_batches``; the
        others' get a task). Returns the instance it was started on; None when the pass did
        not start it there (it stays queued, or a task of its own runs it)."""
        self._here, self._here_state, self._here_streams = rec, None, stream
        try:
            if queued:
                self.dispatch_ready()
            else:
                self._dispatch_lone(rec)
            return self._here_state
        finally:
            self._here = self._here_state = None

    def execute_here(self, rec: RequestRecord, state: InstanceState) -> Coroutine[Any, Any, None]:
        """The engine call of a request :meth:`start_here` started, for the calling task to
        await (the coroutine itself, not one more layer around it). ``rec.task`` is that
        task: a cancellation of the request (:meth:`cancel`) ends it CANCELLED and returns;
        a cancellation of the caller ends it CANCELLED and goes on up to the caller."""
        return self._execute(rec, state, here=True)

    async def _execute(self, rec: RequestRecord, state: InstanceState, here: bool = False) -> None:
        prefill_pending = True
        retry_error: EngineError | None = None
        try:
            complete = getattr(state.client, "complete", None)
            req = self._begin(rec, state, one_piece=complete is not None)
            if req.stream:
                complete = None
            if complete is not None:  # the answer comes in one piece (no TTFT)
                chunks: list[Chunk] = await complete(req)
                if chunks:
                    prefill_pending = False
                    self._first_output(rec, state)
                for chunk in chunks:
                    self._absorb(rec, chunk)
            elif _batched(client := state.client):
                batches = self._timed(client.generate_batches(req), state, req.stream)
                try:
                    async for batch in batches:
                        self._absorb_batch(rec, state, batch, prefill_pending)
                        prefill_pending = False
                finally:
                    await batches.aclose()  # type: ignore[attr-defined]
            else:
                stream = self._timed(state.client.generate(req), state, req.stream)
                try:
                    async for chunk in stream:
                        if prefill_pending:
                            prefill_pending = False
                            self._first_output(rec, state)
                        self._absorb(rec, chunk)
                finally:
                    await stream.aclose()  # type: ignore[attr-defined]
            self._completed(rec, state)
        except (asyncio.CancelledError, Exception) as exc:
            retry_error = self._raised(rec, state, exc, here)
        finally:
            self._release(rec, state, prefill_pending)
        if retry_error is not None:
            await self._requeue(rec, state, retry_error)

    async def stream_here(
        self, rec: RequestRecord, state: InstanceState
    ) -> AsyncGenerator[list[Chunk], None]:
        """The engine call of a stream :meth:`start_here` started (with ``stream``), run by
        the task that relays it: each list of chunks as the engine client's
        ``generate_batches`` yields it, and no task of its own, so no turn of the event
        loop between a read from the engine and the relay's write. It ends, as
        :meth:`_execute` does, with the request ended (the caller reads how from ``rec``)
        or queued again for a retry elsewhere (``rec.status`` QUEUED: the stream then
        continues on ``rec.stream`` from the task that runs the retry).

        Cancellation: of the relaying task, while the engine call waits, ends the request
        CANCELLED and goes on up; of the request (:meth:`cancel`), the same and the
        iterator ends, or, while the relay has a batch, ends the request at once and the
        iterator at its next step; closing the iterator ends the request CANCELLED."""
        prefill_pending = True
        retry_error: EngineError | None = None
        channel, rec.stream = rec.stream, None  # the chunks go out from here, not through it
        try:
            req = self._begin(rec, state, one_piece=False)
            client = state.client
            assert _batched(client)  # start_here leaves only such streams to the caller
            batches = self._timed(client.generate_batches(req), state, req.stream)
            try:
                async for batch in batches:
                    self._absorb_batch(rec, state, batch, prefill_pending)
                    prefill_pending = False
                    rec.task = None  # while the relay has it, cancel() ends the request
                    yield batch
                    if rec.status.is_terminal:  # cancelled meanwhile
                        return
                    rec.task = asyncio.current_task()  # the next read's (it may differ)
            finally:
                await batches.aclose()  # type: ignore[attr-defined]
            self._completed(rec, state)
        except GeneratorExit:  # the relay closed it before the end
            reason = rec.cancel_reason or CANCELLED_BY_CALLER
            self._finish(rec, RequestStatus.CANCELLED, error=reason, state=state)
            raise
        except (asyncio.CancelledError, Exception) as exc:
            retry_error = self._raised(rec, state, exc, True)
        finally:
            self._release(rec, state, prefill_pending)
        if retry_error is not None:
            rec.stream = channel  # the retry's task relays through it
            await self._requeue(rec, state, retry_error)

    def _begin(self, rec: RequestRecord, state: InstanceState, *, one_piece: bool) -> EngineRequest:
        """``rec`` starts running on ``state``: its engine request (:meth:`_engine_request`)."""
        self._may_begin(rec)
        rec.status = RequestStatus.RUNNING
        rec.meta.start_time = self.clock.to_datetime(self.clock.now())
        return self._engine_request(rec, state, one_piece=one_piece)

    @staticmethod
    def _may_begin(rec: RequestRecord) -> None:
        """Raise what happened to ``rec`` between its start on an instance and its engine
        call's beginning (its task's first step): a cancellation (:meth:`cancel` leaves a
        task that has not run yet to end the request here, as cancelling the task itself
        would skip its body and lose the request), or the instance's ejection
        (:meth:`evict`)."""
        if rec.cancel_requested:
            raise asyncio.CancelledError
        if rec.evicted is not None:
            raise rec.evicted

    def _eviction(self, rec: RequestRecord) -> EngineError | None:
        """The eviction (:meth:`evict`) that a cancellation of ``rec``'s engine call was,
        taken back from the running task (the call is retried, not cancelled); None when
        the request itself was cancelled, or the control plane is stopping."""
        exc = rec.evicted
        if exc is None or rec.cancel_requested or self._stopping:
            return None
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        return exc

    def _completed(self, rec: RequestRecord, state: InstanceState, extra_cost: float = 0.0) -> None:
        """The engine's answer on ``state`` ended: the request completed (or, without a
        finish reason, failed, see :class:`EngineStreamError`)."""
        if rec.finish_reason is None:
            raise EngineStreamError(
                "engine stream ended without a finish reason",
                instance_id=state.instance_id,
                retryable=not rec.delivered,
            )
        self.on_call_success(state)
        self._finish(rec, RequestStatus.COMPLETED, state=state, extra_cost=extra_cost)

    def _raised(
        self,
        rec: RequestRecord,
        state: InstanceState,
        exc: asyncio.CancelledError | Exception,
        here: bool,
    ) -> EngineError | None:
        """The engine call raised ``exc``: the request ends (CANCELLED, or FAILED with the
        reason), or the error to retry it elsewhere with is returned. A cancellation that
        goes on up (see :meth:`_cancelled`) is raised again."""
        if isinstance(exc, asyncio.CancelledError):
            evicted = self._eviction(rec)
            if evicted is not None:
                return self._failed(rec, state, evicted)
            if self._cancelled(rec, state, here):
                raise exc
            return None
        if isinstance(exc, (EngineError, InvalidRequestError)):
            return self._failed(rec, state, exc)
        log.error(
            "request %s failed inside the control plane", rec.request_id,
            exc_info=exc, extra=_rid(rec),
        )  # fmt: skip
        self._finish(rec, RequestStatus.FAILED, error=internal_error(exc), state=state)
        return None

    def _cancelled(self, rec: RequestRecord, state: InstanceState, here: bool) -> bool:
        """The engine call was cancelled: the request ends CANCELLED. Returns whether the
        cancellation goes on up: in the caller's task (``here``), one that was not the
        request's (:meth:`cancel`); the request's is taken back (``uncancel``)."""
        by_caller = (rec.cancel_requested or here) and not self._stopping
        reason = (rec.cancel_reason or CANCELLED_BY_CALLER) if by_caller else STOPPED
        self._finish(rec, RequestStatus.CANCELLED, error=reason, state=state)
        if not here:
            return False
        task = asyncio.current_task()
        if not rec.cancel_requested or task is None:
            return True
        task.uncancel()
        return False

    def _failed(
        self, rec: RequestRecord, state: InstanceState, caught: EngineError | InvalidRequestError
    ) -> EngineError | None:
        """The engine call failed: the error to retry elsewhere with, or None when the
        request ended FAILED."""
        exc = refusal_of(caught, state.instance_id) or caught
        assert isinstance(exc, EngineError)
        # a refusal is the request's fault; an eviction, the instance's already counted one
        if not isinstance(exc, EngineRequestRejectedError) and exc is not rec.evicted:
            state.failed_calls += 1
            self.on_call_failure(state, exc)
        if self._retryable(rec, exc) and self._can_retry(rec, state):
            return exc
        if self._longer_context_elsewhere(rec, state, exc):  # too long for its context only
            shorter = self._as_short(state)  # none as short is tried: then one must be left
            excluded = rec.info.excluded_instances | shorter | {state.instance_id}
            if rec.attempts <= self.max_retries and self._servable_for(rec, excluded):
                rec.info = replace(
                    rec.info, excluded_instances=rec.info.excluded_instances | shorter
                )
                return exc
        rec.exception = exc
        self._finish(rec, RequestStatus.FAILED, error=self._reason(exc, state), state=state)
        return None

    def _as_short(self, state: InstanceState) -> frozenset[str]:
        """The instances of ``state``'s model whose known context is no longer than its
        (a retry of a request too long for it is kept off them: one routed to another
        short one had failed again)."""
        mine = state.context_length
        return frozenset(
            other.instance_id
            for other in self.registry
            if other.instance.model_name == state.instance.model_name
            and other.context_length is not None
            and mine is not None
            and other.context_length <= mine
        )

    def _longer_context_elsewhere(
        self, rec: RequestRecord, state: InstanceState, exc: EngineError
    ) -> bool:
        """Whether ``exc`` is an engine's refusal of a request longer than its context
        (its ``max_model_len``) while another instance of the model has a longer one (or
        one not known yet): a fleet of mixed contexts serves it there."""
        if rec.delivered or not isinstance(exc, EngineRequestRejectedError):
            return False
        if not is_context_refusal(str(exc)):
            return False
        mine = state.context_length
        if mine is None:  # its context unknown: nothing says another's is longer
            return False
        excluded = rec.info.excluded_instances
        return any(
            other is not state
            and other.instance.model_name == state.instance.model_name
            and other.instance_id not in excluded
            and other.up  # (a draining or ejected one takes nothing now)
            and (other.context_length is None or other.context_length > mine)
            for other in self.registry
        )

    @staticmethod
    def _retryable(rec: RequestRecord, exc: EngineError) -> bool:
        """Whether ``rec`` may be retried elsewhere after ``exc``: never once its consumer
        has seen output; before that, when the engine call may be tried again
        (``exc.retryable``: it failed before its first token), or when it failed after
        output that reached no one (a whole answer's engine call that streamed) for a
        reason of the instance's (:func:`counts_against_health`), not the request's."""
        if rec.delivered:
            return False
        if exc.retryable:
            return True
        return rec.produced_output and refusal_of(exc) is None and counts_against_health(exc)

    def _lora_call(self, state: InstanceState, adapter: str, *, started: bool) -> None:
        """An engine call for the LoRA ``adapter`` starts (or ends) on ``state``: it holds
        one of the engine's LoRA slots meanwhile (the gauge of its free ones follows)."""
        if started:
            state.lora_call_started(adapter)
        else:
            state.lora_call_ended(adapter)
        self.metrics.set_lora_slots(state.instance_id, state.lora_slots_left())

    def _release(self, rec: RequestRecord, state: InstanceState, prefill_pending: bool) -> None:
        """The engine call is over (however it ended): ``state`` stops carrying it."""
        info = rec.info
        state.in_flight -= 1
        if (adapter := rec.adapter) is not None:
            self._lora_call(state, adapter, started=False)
        if prefill_pending:
            state.queued_prefill_tokens -= info.prompt_tokens
        state.outstanding_decode_tokens -= info.max_tokens
        self.metrics.set_in_flight(state.instance_id, state.in_flight)
        self.metrics.running.dec()
        if state.in_flight == 0 and self._on_instance_idle is not None:
            self._on_instance_idle(state)
        self.wake()

    def _engine_request(
        self, rec: RequestRecord, state: InstanceState, *, one_piece: bool
    ) -> EngineRequest:
        """``rec``'s engine request as sent to ``state`` (its decode instance under PD),
        whose client can answer in one piece (``one_piece``: it has ``complete``) or not.
        With a :attr:`stream_sample`, a non-streaming one is made to stream (from now on,
        retries included) when the instance's :attr:`~InstanceState.stream_credit` comes
        round and at least :attr:`stream_sample_gap_s` has passed since the instance's last
        sampled stream (until then the credit waits, full), or at once when its engine's
        answer comes in pieces anyway (in-process engines), which costs nothing."""
        req = rec.engine_request
        sample = self.stream_sample
        if req.stream or not sample:
            return req
        if one_piece:
            credit = state.stream_credit
            if credit < _FULL_CREDIT:
                state.stream_credit = credit + sample
                return req
            if answered_whole(req.extra):  # checked only for the sample: it is one in ten
                return req  # the credit waits, full, for the next request
            now = self.clock.now()
            if now < state.stream_sample_due:
                return req
            state.stream_sample_due = now + self.stream_sample_gap_s
            state.stream_credit = credit - 1.0 + sample
        req = rec.engine_request = req.with_changes(stream=True)
        return req

    def _first_output(self, rec: RequestRecord, state: InstanceState) -> None:
        """The engine's first output for ``rec`` (a whole request on ``state``): its prefill
        is done. (When the engine streamed, its TTFT refines ``state``'s estimate once the
        request ends: :meth:`_observe_prefill`.)"""
        state.queued_prefill_tokens -= rec.info.prompt_tokens
        rec.first_token_at = self.clock.now()

    @staticmethod
    def _observe_prefill(rec: RequestRecord, state: InstanceState) -> None:
        """A completed whole request's TTFT refines ``state``'s prefill estimate, over the
        tokens it had to prefill: the pending ones at dispatch less those its engine found
        in its prefix cache (known from the usage at the end; counted, a cache hit made the
        instance look many times faster than it is for prompts that miss). An answer that
        came in one piece has no TTFT."""
        first, scheduled = rec.first_token_at, rec.scheduled_at
        if rec.engine_request.stream and first is not None and scheduled is not None:
            state.observe_first_token(
                first - scheduled, rec.pending_tokens_at_dispatch - (rec.cached_tokens or 0)
            )

    # -- PD execution ----------------------------------------------------------------------

    def _start_pd(self, rec: RequestRecord, plan: PDPlan) -> None:
        pstate = self.registry.get(plan.prefill_id)
        dstate = self.registry.get(plan.decode_id)
        info = rec.info
        rec.pending_tokens_at_dispatch = pstate.queued_prefill_tokens + info.prompt_tokens
        pstate.in_flight += 1
        pstate.queued_prefill_tokens += info.prompt_tokens
        dstate.in_flight += 1
        dstate.outstanding_decode_tokens += info.max_tokens
        if (adapter := rec.adapter) is not None:
            self._lora_call(pstate, adapter, started=True)
            self._lora_call(dstate, adapter, started=True)
        now = self.clock.now()
        rec.queued_s = rec.queue_wait_s(now)  # its wait ends (while it is still QUEUED)
        rec.status = RequestStatus.SCHEDULED
        rec.instance_id = dstate.instance_id
        rec.prefill_instance_id = pstate.instance_id
        rec.batch_at_start = dstate.in_flight
        rec.scheduled_at = now
        rec.attempts += 1
        rec.meta.schedule_time = self.clock.to_datetime(now)
        for state in (pstate, dstate):  # both end up holding the prompt's KV
            self.prefix_index.insert(state.instance_id, info.block_hashes)
            self.metrics.set_in_flight(state.instance_id, state.in_flight)
        self.metrics.running.inc()
        self.metrics.on_pd_routed("disaggregated", plan.transfer_s)
        log.debug("request %s disaggregated: %s", rec.request_id, plan.reason, extra=_rid(rec))
        run = self._pd_runs[rec.request_id] = _PDRun(pstate, dstate, info.prompt_tokens, adapter)
        task = asyncio.create_task(self._execute_pd(rec, run), name=f"req-{rec.request_id}")
        rec.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _release_prefill(self, run: _PDRun) -> None:
        """The prefill instance stops carrying the request (once)."""
        if not run.prefill_open:
            return
        run.prefill_open = False
        state = run.prefill
        state.in_flight -= 1
        if run.adapter is not None:
            self._lora_call(state, run.adapter, started=False)
        state.queued_prefill_tokens -= run.prompt_tokens
        self.metrics.set_in_flight(state.instance_id, state.in_flight)
        if state.in_flight == 0 and self._on_instance_idle is not None:
            self._on_instance_idle(state)
        self.wake()

    def _prefill_done(self, rec: RequestRecord, run: _PDRun, handle: KVHandle) -> None:
        now = self.clock.now()
        leg_s = now - (rec.scheduled_at if rec.scheduled_at is not None else now)
        run.prefill_end = now
        run.prefill_cost = run.prefill.cost_per_second * leg_s
        prefill = run.prefill
        prefill.observe_first_token(leg_s, rec.pending_tokens_at_dispatch - handle.cached_tokens)
        self.on_call_success(prefill)
        if handle.prompt_tokens:
            rec.prompt_tokens = handle.prompt_tokens
        prompt_tokens = rec.prompt_tokens or run.prompt_tokens
        prefill.completed += 1
        prefill.prefilled_tokens += prompt_tokens
        prefill.record_latency(leg_s * 1000.0)
        self.metrics.on_pd_prefill_leg(leg_s, prompt_tokens, run.prefill_cost)
        self._release_prefill(run)

    async def _execute_pd(self, rec: RequestRecord, run: _PDRun) -> None:
        assert self.pd is not None
        dstate = run.decode
        retry: tuple[EngineError, InstanceState, bool] | None = None
        legs = PDLegs(
            run.prefill.client, dstate.client, run.prefill.instance, dstate.instance,
            on_prefill_done=lambda handle: self._prefill_done(rec, run, handle),
            spare_decode=lambda: self._spare_decode(rec.info.model, dstate.instance_id),
            decode_down=lambda: dstate.removed or not dstate.routable,
        )  # fmt: skip
        try:
            self._may_begin(rec)
            rec.status = RequestStatus.RUNNING
            rec.meta.start_time = self.clock.to_datetime(self.clock.now())
            one_piece = getattr(dstate.client, "complete", None) is not None
            req = self._engine_request(rec, dstate, one_piece=one_piece)
            stream = self._timed(self.pd.connector.run(req, legs), dstate, req.stream)
            try:
                async for chunk in stream:
                    if rec.first_token_at is None:
                        rec.first_token_at = self.clock.now()
                        if run.prefill_end is not None and req.stream:
                            self.metrics.on_pd_handoff(rec.first_token_at - run.prefill_end)
                    self._absorb(rec, chunk)
            finally:
                await stream.aclose()  # type: ignore[attr-defined]
            self._completed(rec, dstate, run.prefill_cost)
            if run.prefill_end is not None and rec.result is not None:
                self.metrics.on_pd_decode_leg(
                    self.clock.now() - run.prefill_end,
                    rec.result.completion_tokens,
                    rec.result.cost - run.prefill_cost,
                )
        except asyncio.CancelledError:
            evicted = self._eviction(rec)
            if evicted is not None:
                retry = self._pd_failed(rec, run, evicted)
            else:
                reason = (
                    (rec.cancel_reason or CANCELLED_BY_CALLER) if rec.cancel_requested else STOPPED
                )
                ended_on = dstate
                if run.prefill_open and not rec.produced_output:
                    # in its prefill leg, nothing from the decode instance (under SGLang's
                    # concurrent legs, output came from it: it ran there)
                    ended_on = run.prefill
                    rec.instance_id = ended_on.instance_id
                self._finish(rec, RequestStatus.CANCELLED, error=reason, state=ended_on,
                             extra_cost=run.prefill_cost)  # fmt: skip
        except EngineError as exc:
            if (
                isinstance(exc, EngineTimeoutError)
                and not isinstance(exc, PDLegError)
                and run.prefill_open
                and rec.first_token_at is None  # (the first-token limit, not the idle one)
                and exc.instance_id == dstate.instance_id
            ):  # the first-token limit ran out in the prefill leg: the prefill instance's
                cause = EngineTimeoutError(
                    exc.message, instance_id=run.prefill.instance_id, retryable=exc.retryable
                )
                exc = PDLegError("prefill", cause, run.prefill.instance_id)
            retry = self._pd_failed(rec, run, exc)
        except Exception as exc:
            log.exception(
                "request %s failed inside the control plane", rec.request_id, extra=_rid(rec)
            )
            self._finish(rec, RequestStatus.FAILED, error=internal_error(exc), state=dstate)
        finally:
            self._pd_runs.pop(rec.request_id, None)
            self._release_prefill(run)
            dstate.in_flight -= 1
            if run.adapter is not None:
                self._lora_call(dstate, run.adapter, started=False)
            dstate.outstanding_decode_tokens -= rec.info.max_tokens
            self.metrics.set_in_flight(dstate.instance_id, dstate.in_flight)
            self.metrics.running.dec()
            if dstate.in_flight == 0 and self._on_instance_idle is not None:
                self._on_instance_idle(dstate)
            self.wake()
        if retry is not None:
            error, failed_state, colocated = retry
            if colocated:
                self._colocated_only.add(rec.request_id)
                self.metrics.on_pd_fallback()
            await self._requeue(rec, failed_state, error)

    def _spare_decode(self, model: str, failed_id: str) -> EngineClient | None:
        """The client of a healthy DECODING or HYBRID instance of ``model`` other than
        ``failed_id`` (a KV release's pull goes through it: one set up to pull KV), one
        that is not draining when there is one (a draining one only rather than leave the
        KV pinned until the engine gives up on it), or None."""
        draining: EngineClient | None = None
        for state in self.registry:
            if (
                state.instance_id != failed_id
                and state.instance.model_name == model
                and state.instance.instance_type
                in (ExecutionInstanceType.DECODING, ExecutionInstanceType.HYBRID)
                and not state.removed
                and state.routable
            ):
                if not state.draining:
                    return state.client
                draining = draining or state.client
        return draining

    def _pd_failed(
        self, rec: RequestRecord, run: _PDRun, exc: EngineError
    ) -> tuple[EngineError, InstanceState, bool] | None:
        """A disaggregated request failed with ``exc`` (or was moved off an ejected instance,
        ``exc`` its :attr:`~RequestRecord.evicted`): what to retry it with (the error, the
        instance that failed, whether to run it colocated), or None when it ended FAILED."""
        evicted = exc is rec.evicted
        if evicted:
            prefill_leg = exc.instance_id == run.prefill.instance_id and run.prefill_open
        else:
            prefill_leg = isinstance(exc, PDLegError) and exc.leg == "prefill"
        failed = run.prefill if prefill_leg else run.decode
        # the ejected instance has counted an eviction already; a refused request says
        # nothing about the instance
        if not evicted and refusal_of(exc) is None:
            failed.failed_calls += 1
            # the leg's engine error judges the instance (a refused connection ejects it
            # at once, as for a whole request), not the wrapper that names the leg
            cause = exc.cause if isinstance(exc, PDLegError) else exc
            self.on_call_failure(failed, cause if isinstance(cause, EngineError) else exc)
        refusal = refusal_of(exc, failed.instance_id)  # (a leg's error carries its engine's)
        too_long = refusal is not None and self._longer_context_elsewhere(rec, failed, refusal)
        shorter = self._as_short(failed) if too_long else frozenset()
        verdict = self._pd_retry(rec, exc, failed, prefill_leg, too_long=too_long, shorter=shorter)
        if verdict is not None:
            if shorter:
                rec.info = replace(
                    rec.info, excluded_instances=rec.info.excluded_instances | shorter
                )
            return exc, failed, verdict
        rec.exception = exc
        if prefill_leg and not rec.produced_output:
            # it ended on its prefill instance: nothing came from the decode one (under
            # SGLang's concurrent legs, output that did came from it: it ran there)
            rec.instance_id = failed.instance_id
        self._finish(rec, RequestStatus.FAILED, error=self._reason(exc, failed),
                     state=failed, extra_cost=run.prefill_cost)  # fmt: skip
        return None

    def _pd_retry(
        self,
        rec: RequestRecord,
        exc: EngineError,
        failed: InstanceState,
        prefill_leg: bool,
        *,
        too_long: bool = False,
        shorter: frozenset[str] = frozenset(),
    ) -> bool | None:
        """None: do not retry; True: retry colocated; False: retry anywhere. ``too_long``:
        a leg refused the request as longer than its instance's context, which another
        instance of the model has longer (:meth:`_longer_context_elsewhere`): it is run
        off the ``shorter`` instances, whole when one may take it, else on a longer pair."""
        assert self.pd is not None
        client_error = exc.status is not None and 400 <= exc.status < 500
        if rec.delivered or rec.attempts > self.max_retries:
            return None
        if too_long:
            excluded = rec.info.excluded_instances | shorter | {failed.instance_id}
            if self._servable(rec.info.model, excluded, whole_only=True):
                return True
            return False if self._servable(rec.info.model, excluded) else None
        if client_error and exc.status not in (408, 429):
            return None
        excluded = rec.info.excluded_instances | {failed.instance_id}
        whole = self._servable(rec.info.model, excluded, whole_only=True)
        if prefill_leg and self.pd.fallback_to_colocated and whole:
            return True
        if self._retryable(rec, exc) and self._servable(rec.info.model, excluded):
            return False
        return None

    def servable_now(self, model: str, excluded: frozenset[str] = frozenset()) -> bool:
        """Whether some instance, or PD pair, not in ``excluded`` may take a request for
        ``model`` now."""
        return self._servable(model, excluded)

    def _servable_for(self, rec: RequestRecord, excluded: frozenset[str]) -> bool:
        """:meth:`_servable` for ``rec``: on a whole-request instance only when it may not
        run disaggregated (:meth:`may_split`; it had waited in the queue for good)."""
        whole_only = not self.may_split(rec.engine_request)
        return self._servable(rec.info.model, excluded, whole_only=whole_only)

    def _servable(self, model: str, excluded: frozenset[str], *, whole_only: bool = False) -> bool:
        """Whether instances outside ``excluded`` could run a request for ``model`` (whole, or
        as a PD pair unless ``whole_only``) now: a retry or a moved call goes only where an
        instance may take it, not to the queue to wait for an ejected one to come back
        (a request failed over had waited there until its time limit, 600 s, when the only
        other instance was down)."""
        members = self._members(model, excluded, now=True)
        if any(role.runs_whole_requests for _, role in members):
            return True
        return not whole_only and self.pd is not None and pair_exists(members)

    def _absorb(self, rec: RequestRecord, chunk: Chunk) -> None:
        rec.pieces += 1
        # another sample's (n > 1) is kept apart: the record's own output is choice 0's
        add_output(self._choice_parts(rec, chunk.index) if chunk.index else rec, chunk)
        if chunk.token_ids:
            rec.completion_tokens += len(chunk.token_ids)
        elif chunk.text:
            rec.completion_tokens += 1
        if chunk.usage is not None:
            rec.prompt_tokens = chunk.usage.prompt_tokens
            rec.completion_tokens = chunk.usage.completion_tokens
            rec.cached_tokens = chunk.usage.cached_tokens
        if rec.stream is not None:
            rec.stream.put_nowait(chunk)
        elif rec.chunks is not None:
            rec.chunks.append(chunk)

    @staticmethod
    def _choice_parts(rec: RequestRecord, index: int) -> ChoiceParts:
        """Where sample ``index`` (> 0) of ``rec``'s is gathered."""
        others = rec.other_choices
        if others is None:
            others = rec.other_choices = {}
        return choice_parts(others, index)

    def _absorb_batch(
        self, rec: RequestRecord, state: InstanceState, batch: list[Chunk], first: bool
    ) -> None:
        """:meth:`_absorb` each chunk of ``batch``, the engine's ``first`` output."""
        if first:
            self._first_output(rec, state)
        for chunk in batch:
            self._absorb(rec, chunk)

    def _timed(
        self, stream: AsyncIterator[_T], state: InstanceState, streamed: bool
    ) -> AsyncIterator[_T]:
        """``stream`` under the first-token and idle limits (none for a request the engine
        answers at once, at its end)."""
        if not streamed or (self.first_token_timeout_s is None and self.idle_timeout_s is None):
            return stream
        return with_stream_timeouts(
            stream,
            first_token_s=self.first_token_timeout_s,
            idle_s=self.idle_timeout_s,
            instance_id=state.instance_id,
        )

    def on_call_success(self, state: InstanceState) -> None:
        """An engine call on ``state`` ended well (its health counts it)."""
        if self.health is not None:
            self.health.on_request_success(state)
        else:
            state.consecutive_failures = 0

    def on_call_failure(self, state: InstanceState, exc: EngineError) -> None:
        """An engine call on ``state`` failed with ``exc`` (its health counts it)."""
        if self.health is not None:
            self.health.on_request_failure(state, exc)
        else:
            state.consecutive_failures += 1

    def _can_retry(self, rec: RequestRecord, state: InstanceState) -> bool:
        if rec.attempts > self.max_retries:
            return False
        return self._servable_for(rec, rec.info.excluded_instances | {state.instance_id})

    @property
    def queued_depth(self) -> int:
        """Requests waiting to run: in the policy's queue, or in a retry's backoff."""
        return len(self.policy) + len(self._backing_off)

    async def _requeue(self, rec: RequestRecord, state: InstanceState, exc: EngineError) -> None:
        self.metrics.retries.inc()
        log.info(
            "request %s: %s failed before its output reached the client (%s); retrying elsewhere",
            rec.request_id,
            state.instance_id,
            exc.message,
            extra=_rid(rec),
        )
        rec.info = replace(
            rec.info,
            excluded_instances=rec.info.excluded_instances | {state.instance_id},
            attempt=rec.info.attempt + 1,
        )
        rec.status = RequestStatus.QUEUED
        rec.instance_id = None
        rec.prefill_instance_id = None
        rec.task = None
        rec.evicted = None
        if rec.produced_output:  # output that reached no one: the retry starts afresh
            rec.discard_output()
        # exponential backoff with jitter (seeded): base * 2^(attempt-1) * U[0.5, 1.5)
        backoff = self.retry_backoff_s * (2 ** (rec.attempts - 1)) * (0.5 + self._rng.random())
        backoff = min(backoff, 2.0)
        # max_queue_wait_s counts this wait in the queue from its start, after the backoff
        # (not from the request's arrival: a failover is not a wait in the queue)
        rec.queued_at = self.clock.now() + max(backoff, 0.0)
        if backoff > 0:
            self._backing_off.add(rec.request_id)
            self.metrics.queue_depth.set(self.queued_depth)
            # a request that ends meanwhile (cancelled, timed out, stopped) ends the wait:
            # a caller whose task runs it (execute_here) learns of its end at once
            sleeping = asyncio.ensure_future(self.clock.sleep(backoff))
            try:
                await asyncio.wait((sleeping, rec.future), return_when=asyncio.FIRST_COMPLETED)
            finally:
                sleeping.cancel()
                self._backing_off.discard(rec.request_id)
        if rec.cancel_requested or rec.status is not RequestStatus.QUEUED:
            self.metrics.queue_depth.set(self.queued_depth)
            return
        self.policy.push(rec.info)
        self.metrics.queue_depth.set(self.queued_depth)
        self.wake()

    @staticmethod
    def _reason(exc: EngineError, state: InstanceState) -> str:
        refusal = refusal_of(exc)
        if refusal is not None:
            return refusal_reason(refusal)
        where = exc.instance_id or state.instance_id
        status = f" (HTTP {exc.status})" if exc.status else ""
        return f"engine {where} failed{status}: {exc.message}"

    # -- endings ---------------------------------------------------------------------------

    def cancel(self, rec: RequestRecord) -> bool:
        """Cancel a queued or running request. Returns False when it already ended."""
        if rec.status.is_terminal:
            return False
        rec.cancel_requested = True
        task = rec.task
        if task is not None and not task.done():
            if rec.status is not RequestStatus.SCHEDULED:
                task.cancel()
            # else its engine call has not begun: it ends the request as it begins
            # (_may_begin); cancelling a task before its first step would skip its body
            return True
        reason = STOPPED if self._stopping else (rec.cancel_reason or CANCELLED_BY_CALLER)
        state = None
        if rec.status is RequestStatus.RUNNING and rec.instance_id is not None:
            # a stream whose relay holds a batch (see stream_here): it ends now
            state = self.registry.find(rec.instance_id)
        elif rec.status is RequestStatus.SCHEDULED:
            state = self._unstart(rec)  # its task was cancelled before it began (stop)
        else:
            self.policy.remove(rec.request_id)
        self._finish(rec, RequestStatus.CANCELLED, error=reason, state=state)
        self.metrics.queue_depth.set(self.queued_depth)
        return True

    def _unstart(self, rec: RequestRecord) -> InstanceState | None:
        """The instances ``rec`` was started on stop carrying it: its task was cancelled
        before its first step (:meth:`cancel_all_tasks`), so its engine call, which would
        have released them, never began. Returns its (decode) instance."""
        state = None if rec.instance_id is None else self.registry.find(rec.instance_id)
        run = self._pd_runs.pop(rec.request_id, None)
        if run is not None:
            self._release_prefill(run)
        if state is not None:
            self._release(rec, state, run is None)
        return state

    def evict(self, instance_id: str, why: str) -> int:
        """Move the engine calls on ``instance_id``, just ejected, whose output has reached
        no one: each is retried elsewhere as after a failure before its first token (its
        call is cancelled, the cancellation taken back; it counts against ``max_retries``,
        not again against the instance).

        One that cannot be moved (no retry left, or no other instance that may take it
        now) stays, as the instance may be back after its cool-down (probes that timed out
        for a moment, say); if it is ejected again without having closed in between (its
        trial failed: it is down, or hung) and the call has had no chunk meanwhile, the call
        fails with the ejection as its reason (a 502), rather than wait on that engine
        until the request's time limit (600 s by default). A call that has delivered
        output (a stream under way) is never moved, but is failed the same way: a stream
        on an engine that froze ends with an error event once the engine's trial after its
        cool-down fails, not at the request's time limit. One whose answer is whole stays,
        as does a disaggregated request whose prefill leg on ``instance_id`` is over.
        Returns how many calls were moved or failed."""
        current = asyncio.current_task()
        transitions = self.registry.get(instance_id).breaker.transitions
        moved = failed = 0
        for rec in list(self.records.values()):
            status = rec.status
            task = rec.task
            if (
                (status is not RequestStatus.RUNNING and status is not RequestStatus.SCHEDULED)
                or rec.finish_reason is not None  # its answer is whole: only its end is left
                or rec.cancel_requested
                or rec.evicted is not None
                or task is None  # a relay holds a batch of it: delivered
                or task is current  # the call whose failure ejected the instance
                or task.done()
            ):
                continue
            if rec.instance_id != instance_id:
                run = self._pd_runs.get(rec.request_id)
                if run is None or run.prefill.instance_id != instance_id or not run.prefill_open:
                    continue
            if (
                rec.delivered  # its consumer has output: it can only end here
                or rec.attempts > self.max_retries
                or not self._servable_for(rec, rec.info.excluded_instances | {instance_id})
            ):
                produced = rec.pieces
                # OPEN -> HALF_OPEN -> OPEN: two transitions, its trial failed; and nothing
                # came for the call meanwhile (a busy engine's probes may fail as it works)
                if rec.stranded != (instance_id, transitions - 2, produced):
                    rec.stranded = (instance_id, transitions, produced)  # it stays
                    continue
                failed += 1  # down past its cool-down: fail it (nowhere to move it to)
            else:
                moved += 1
            rec.evicted = EngineError(
                f"instance {instance_id} was ejected: {why}", instance_id=instance_id
            )
            if status is RequestStatus.RUNNING:
                task.cancel()
            # else its engine call has not begun: it sees the eviction as it begins
        if moved:
            log.warning("moving %d request(s) off ejected instance %s", moved, instance_id)
        if failed:
            log.warning(
                "failing %d request(s) on instance %s: ejected again after its cool-down, "
                "and they cannot move (streams under way, or no other instance can take "
                "them)", failed, instance_id,
            )  # fmt: skip
        return moved + failed

    def take_back_kept_off(self, rec: RequestRecord) -> bool:
        """Let the queued ``rec`` run on the instances kept off for their context
        (:attr:`RequestRecord.kept_off`) when no other instance could run it any more;
        whether that made it servable."""
        if not rec.kept_off or rec.status is not RequestStatus.QUEUED:
            return False
        excluded = rec.info.excluded_instances - rec.kept_off
        if self.unservable_reason(rec.info.model, excluded) is not None:
            return False
        queued = self.policy.remove(rec.request_id) is not None  # (none while backing off)
        rec.info = replace(rec.info, excluded_instances=excluded)
        rec.kept_off = frozenset()
        if queued:
            self.policy.push(rec.info)
        self.wake()
        return True

    def fail_queued(self, rec: RequestRecord, reason: str) -> None:
        """End ``rec`` FAILED with ``reason`` when it is still queued (it leaves the queue)."""
        if rec.status is RequestStatus.QUEUED:
            self.policy.remove(rec.request_id)
            self._finish(rec, RequestStatus.FAILED, error=reason)
            self.metrics.queue_depth.set(self.queued_depth)

    def _finish(
        self,
        rec: RequestRecord,
        status: RequestStatus,
        *,
        error: str | None = None,
        state: InstanceState | None = None,
        extra_cost: float = 0.0,
    ) -> None:
        """End ``rec`` with ``status``: its result, its waiters, its figures. A bug while
        doing so still ends it (failed, with the bug as its reason): no caller waits on a
        request that can no longer end."""
        try:
            self._end(rec, status, error=error, state=state, extra_cost=extra_cost)
        except Exception as exc:
            log.exception(
                "request %s could not be ended inside the control plane", rec.request_id,
                extra=_rid(rec),
            )  # fmt: skip
            if rec.result is None:  # (a bug after its result: that result stands)
                rec.status = RequestStatus.FAILED
                rec.error = internal_error(exc)
            failure = SageLLMError(internal_error(exc))
            for waiting in (rec.future, rec.waiter):
                if waiting is not None and not waiting.done():
                    waiting.set_exception(failure)
                    waiting.exception()  # said here; a caller awaiting it still gets it
            if rec.stream is not None:
                rec.stream.put_nowait(STREAM_END)
            self.records.pop(rec.request_id, None)

    @staticmethod
    def _choices(rec: RequestRecord, others: dict[int, ChoiceParts]) -> list[ChoiceResult]:
        """Every sample of ``rec`` (a request for several), by index."""
        return [choice_result(rec, 0), *(choice_result(others[i], i) for i in sorted(others))]

    def _end(
        self,
        rec: RequestRecord,
        status: RequestStatus,
        *,
        error: str | None,
        state: InstanceState | None,
        extra_cost: float,
    ) -> None:
        if rec.status.is_terminal:
            return
        self._colocated_only.discard(rec.request_id)
        self._backing_off.discard(rec.request_id)  # ended in its backoff: queued no more
        now = self.clock.now()
        info = rec.info
        queue_wait_s = rec.queue_wait_s(now)  # before its status changes
        rec.status = status
        rec.error = error
        rec.finished_at = now
        rec.meta.end_time = self.clock.to_datetime(now)
        e2e_s = now - info.arrival
        # TTFT and TPOT are known only when the engine streamed (engine_stream = "client"
        # asks for a non-streaming request's answer in one piece)
        first_at = rec.first_token_at if rec.engine_request.stream else None
        ttft_s = None if first_at is None else first_at - info.arrival
        tpot_s = None
        if first_at is not None and rec.completion_tokens > 1:
            tpot_s = (now - first_at) / (rec.completion_tokens - 1)
        slo_ms = rec.meta.slo_deadline_ms
        slo_met = None
        if slo_ms is not None:
            if status is not RequestStatus.CANCELLED:
                slo_met = status is RequestStatus.COMPLETED and e2e_s * 1000.0 <= slo_ms
            elif e2e_s * 1000.0 >= slo_ms:  # cut off at (or after) its deadline: missed
                slo_met = False
        cost = extra_cost
        if state is not None and rec.scheduled_at is not None:
            cost += state.cost_per_second * (now - rec.scheduled_at)
        result = fill_request_result(  # every field, in RequestResult's order
            rec.request_id,
            status,
            "".join(rec.text_parts),
            rec.finish_reason,
            rec.prompt_tokens or info.prompt_tokens,
            rec.completion_tokens,
            rec.cached_tokens,
            rec.instance_id,
            rec.prefill_instance_id,
            queue_wait_s * 1000.0,
            None if ttft_s is None else ttft_s * 1000.0,
            None if tpot_s is None else tpot_s * 1000.0,
            e2e_s * 1000.0,
            slo_met,
            error,
            rec.attempts,
            list(rec.token_ids) if rec.token_ids else None,
            list(rec.logprobs) if rec.logprobs else None,
            cost,
            None if rec.predicted_e2e_s is None else rec.predicted_e2e_s * 1000.0,
            None if rec.other_choices is None else self._choices(rec, rec.other_choices),
        )
        rec.result = result
        if not rec.future.done():
            rec.future.set_result(result)
        waiter = rec.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(result)
        if rec.stream is not None:
            rec.stream.put_nowait(STREAM_END)
        self.records.pop(rec.request_id, None)
        failed = failure_error(result, rec.exception) if status is RequestStatus.FAILED else None
        self.finished.add(result, now, self._placement(rec, state), failed)
        if state is not None and status is RequestStatus.FAILED:
            state.failed_requests += 1
        if state is not None and status is RequestStatus.COMPLETED:
            last, key = self.last_instances, info.sticky_key
            if last is not None and key is not None:
                last.note(key, state.instance_id)
            state.completed += 1
            state.tokens_generated += rec.completion_tokens
            state.record_latency(result.e2e_latency_ms)
            if rec.prefill_instance_id is None:  # a whole request (a PD prefill leg: its own)
                self._observe_prefill(rec, state)
            if tpot_s is not None:  # (its instance carries it until after this)
                state.observe_tpot(tpot_s, max(rec.batch_at_start, state.in_flight))
        if (adapter := rec.adapter) is not None:
            self.metrics.on_lora_finished(status, info.model, adapter)
        self.metrics.on_finished(
            result,
            model=info.model,
            policy=policy_label(self.policy),
            # SLO attainment is by the priority the application gave (not a demotion's)
            priority=info.priority if slo_met is None else RequestPriority.parse(rec.meta.priority),
            predicted_e2e_s=rec.predicted_e2e_s,
            user=info.user_id,
        )
        policy = self.policy
        counting = self.counting
        if counting is not None:
            counting.count_completion()  # all its on_complete does: no record to build
            return
        record = CompletionRecord(
            request_id=rec.request_id,
            status=status,
            priority=info.priority,
            instance_id=rec.instance_id,
            arrival=info.arrival,
            finished=now,
            queue_wait_s=queue_wait_s,
            ttft_s=ttft_s,
            tpot_s=tpot_s,
            e2e_s=e2e_s,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=rec.completion_tokens,
            slo_met=slo_met,
            predicted_e2e_s=rec.predicted_e2e_s,
            cost=cost,
        )
        try:
            policy.on_complete(record)
        except Exception:
            log.exception("policy %s failed in on_complete", policy.name)

    async def cancel_all_tasks(self) -> None:
        self._stopping = True
        tasks = [t for t in self._tasks if not t.done()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
