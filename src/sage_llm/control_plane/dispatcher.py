"""The dispatcher: the single loop that turns queued requests into engine calls.

On every wake-up (a submission, a finished request, a new or recovered instance, a policy
switch) it takes one snapshot of the fleet and, while some instance has a free slot, asks
the scheduling policy for the next request, asks the router where it goes, accounts the
load on the snapshot's successor (so a burst spreads), and starts the engine call.

Invariants it keeps:

* an instance never has more than ``max_concurrent_requests`` requests in flight (the
  counters it checks are the ones it changes, in the same synchronous step);
* a request runs at most once to completion: only a failure *before the first token* is
  retried, on another instance, at most ``max_retries`` times;
* every request ends in exactly one of COMPLETED, FAILED (with the reason) or CANCELLED.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import replace

from sage_llm.control_plane.instances import InstanceRegistry, InstanceState
from sage_llm.control_plane.metrics import ControlPlaneMetrics
from sage_llm.control_plane.records import STREAM_END, FinishedRecords, RequestRecord
from sage_llm.control_plane.routing.base import Router, RoutingDecision
from sage_llm.control_plane.routing.prefix_index import PrefixIndex
from sage_llm.control_plane.scheduling.base import SchedulingPolicy
from sage_llm.control_plane.snapshot import CompletionRecord
from sage_llm.engines.base import Chunk
from sage_llm.errors import EngineError, EngineStreamError
from sage_llm.sim.clock import Clock
from sage_llm.types import RequestResult, RequestStatus

log = logging.getLogger("sage_llm.dispatcher")


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
    ) -> None:
        self.registry = registry
        self.policy = policy
        self.router = router
        self.clock = clock
        self.metrics = metrics
        self.prefix_index = prefix_index
        self.finished = finished
        self.max_retries = max_retries
        self.retry_backoff_s = retry_backoff_s
        self.records: dict[str, RequestRecord] = {}
        self._on_instance_idle = on_instance_idle
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- loop ------------------------------------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                self.dispatch_ready()
            except Exception:  # a bug in a plugin must not kill the loop
                log.exception("dispatch pass failed")

    def dispatch_ready(self) -> None:
        """One pass: start as many queued requests as the fleet has room for."""
        snap = self.registry.snapshot(self.clock.now(), self.prefix_index)
        while len(self.policy) and snap.has_capacity():
            started = time.perf_counter()
            info = self.policy.pop(snap)
            if info is None:
                break
            rec = self.records.get(info.request_id)
            if rec is None or rec.status is not RequestStatus.QUEUED:
                continue
            rec.info = info  # the policy may have changed it (e.g. demoted)
            allowed = self.policy.constrain(info, snap)
            decision = self.router.route(info, snap, allowed)
            if decision is None and allowed is not None:
                decision = self.router.route(info, snap)
            if decision is None:  # inconsistent with pop(); keep the request and stop
                self.policy.push(info)
                log.warning("no route for %s although the policy popped it", info.request_id)
                break
            self.metrics.routing_seconds.observe(time.perf_counter() - started)
            view = snap.get(decision.instance_id)
            pending = (view.queued_prefill_tokens if view else 0) + info.prompt_tokens
            rec.predicted_e2e_s = (
                view.predict_e2e_s(info.prompt_tokens, info.max_tokens) if view else None
            )
            snap = snap.with_assignment(decision.instance_id, info)
            self._start(rec, decision, pending)
        self.metrics.queue_depth.set(len(self.policy))

    # -- execution -------------------------------------------------------------------------

    def _start(self, rec: RequestRecord, decision: RoutingDecision, pending: int) -> None:
        state = self.registry.get(decision.instance_id)
        info = rec.info
        state.in_flight += 1
        state.queued_prefill_tokens += info.prompt_tokens
        state.outstanding_decode_tokens += info.max_tokens
        now = self.clock.now()
        rec.status = RequestStatus.SCHEDULED
        rec.instance_id = state.instance_id
        rec.scheduled_at = now
        rec.attempts += 1
        rec.pending_tokens_at_dispatch = pending
        rec.meta.schedule_time = self.clock.to_datetime(now)
        self.prefix_index.insert(state.instance_id, info.block_hashes)
        self.metrics.instance_in_flight.labels(instance=state.instance_id).set(state.in_flight)
        self.metrics.running.inc()
        task = asyncio.create_task(self._execute(rec, state), name=f"req-{rec.request_id}")
        rec.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _execute(self, rec: RequestRecord, state: InstanceState) -> None:
        info = rec.info
        prefill_pending = True
        retry_error: EngineError | None = None
        try:
            rec.status = RequestStatus.RUNNING
            rec.meta.start_time = self.clock.to_datetime(self.clock.now())
            stream = state.client.generate(rec.engine_request)
            try:
                async for chunk in stream:
                    if prefill_pending:
                        prefill_pending = False
                        state.queued_prefill_tokens -= info.prompt_tokens
                        now = self.clock.now()
                        rec.first_token_at = now
                        state.observe_first_token(
                            now - (rec.scheduled_at or now), rec.pending_tokens_at_dispatch
                        )
                    self._absorb(rec, chunk)
            finally:
                await stream.aclose()  # type: ignore[attr-defined]
            if rec.finish_reason is None:
                raise EngineStreamError(
                    "engine stream ended without a finish reason",
                    instance_id=state.instance_id,
                    retryable=not rec.produced_output,
                )
            state.consecutive_failures = 0
            self._finish(rec, RequestStatus.COMPLETED, state=state)
        except asyncio.CancelledError:
            reason = "cancelled by the caller" if rec.cancel_requested else "control plane stopped"
            self._finish(rec, RequestStatus.CANCELLED, error=reason, state=state)
        except EngineError as exc:
            state.failed += 1
            state.consecutive_failures += 1
            if exc.retryable and not rec.produced_output and self._can_retry(rec, state):
                retry_error = exc
            else:
                self._finish(rec, RequestStatus.FAILED, error=self._reason(exc, state), state=state)
        except Exception as exc:
            log.exception("request %s failed inside the control plane", rec.request_id)
            self._finish(rec, RequestStatus.FAILED, error=f"internal error: {exc!r}", state=state)
        finally:
            state.in_flight -= 1
            if prefill_pending:
                state.queued_prefill_tokens -= info.prompt_tokens
            state.outstanding_decode_tokens -= info.max_tokens
            self.metrics.instance_in_flight.labels(instance=state.instance_id).set(state.in_flight)
            self.metrics.running.dec()
            if state.in_flight == 0 and self._on_instance_idle is not None:
                self._on_instance_idle(state)
            self.wake()
        if retry_error is not None:
            await self._requeue(rec, state, retry_error)

    def _absorb(self, rec: RequestRecord, chunk: Chunk) -> None:
        if chunk.text:
            rec.text_parts.append(chunk.text)
        if chunk.token_ids:
            rec.token_ids.extend(chunk.token_ids)
            rec.completion_tokens += len(chunk.token_ids)
        elif chunk.text:
            rec.completion_tokens += 1
        if chunk.logprobs is not None:
            rec.logprobs.append(chunk.logprobs)
        if chunk.usage is not None:
            rec.prompt_tokens = chunk.usage.prompt_tokens
            rec.completion_tokens = chunk.usage.completion_tokens
            rec.cached_tokens = chunk.usage.cached_tokens
        if chunk.finish_reason is not None:
            rec.finish_reason = chunk.finish_reason
        if rec.stream is not None:
            rec.stream.put_nowait(chunk)

    def _can_retry(self, rec: RequestRecord, state: InstanceState) -> bool:
        if rec.attempts > self.max_retries:
            return False
        excluded = rec.info.excluded_instances | {state.instance_id}
        return any(
            s.instance.model_name == rec.info.model
            and s.instance.instance_type.runs_whole_requests
            and not s.removed
            and s.instance_id not in excluded
            for s in self.registry
        )

    async def _requeue(self, rec: RequestRecord, state: InstanceState, exc: EngineError) -> None:
        self.metrics.retries.inc()
        log.info(
            "request %s: %s failed before the first token (%s); retrying elsewhere",
            rec.request_id,
            state.instance_id,
            exc.message,
        )
        rec.info = replace(
            rec.info,
            excluded_instances=rec.info.excluded_instances | {state.instance_id},
            attempt=rec.info.attempt + 1,
        )
        rec.status = RequestStatus.QUEUED
        rec.instance_id = None
        rec.task = None
        backoff = self.retry_backoff_s * (2 ** (rec.attempts - 1))
        if backoff > 0:
            await self.clock.sleep(min(backoff, 2.0))
        if rec.cancel_requested or rec.status is not RequestStatus.QUEUED:
            return
        self.policy.push(rec.info)
        self.wake()

    @staticmethod
    def _reason(exc: EngineError, state: InstanceState) -> str:
        where = exc.instance_id or state.instance_id
        status = f" (HTTP {exc.status})" if exc.status else ""
        return f"engine {where} failed{status}: {exc.message}"

    # -- endings ---------------------------------------------------------------------------

    def cancel(self, rec: RequestRecord) -> bool:
        """Cancel a queued or running request. Returns False when it already ended."""
        if rec.status.is_terminal:
            return False
        rec.cancel_requested = True
        if rec.task is not None and not rec.task.done():
            rec.task.cancel()
            return True
        self.policy.remove(rec.request_id)
        self._finish(rec, RequestStatus.CANCELLED, error="cancelled by the caller")
        self.metrics.queue_depth.set(len(self.policy))
        return True

    def fail_queued(self, rec: RequestRecord, reason: str) -> None:
        if rec.status is RequestStatus.QUEUED:
            self.policy.remove(rec.request_id)
            self._finish(rec, RequestStatus.FAILED, error=reason)

    def _finish(
        self,
        rec: RequestRecord,
        status: RequestStatus,
        *,
        error: str | None = None,
        state: InstanceState | None = None,
    ) -> None:
        if rec.status.is_terminal:
            return
        now = self.clock.now()
        info = rec.info
        rec.status = status
        rec.error = error
        rec.finished_at = now
        rec.meta.end_time = self.clock.to_datetime(now)
        e2e_s = now - info.arrival
        ttft_s = None if rec.first_token_at is None else rec.first_token_at - info.arrival
        tpot_s = None
        if rec.first_token_at is not None and rec.completion_tokens > 1:
            tpot_s = (now - rec.first_token_at) / (rec.completion_tokens - 1)
        slo_ms = rec.meta.slo_deadline_ms
        slo_met = None
        if slo_ms is not None and status is not RequestStatus.CANCELLED:
            slo_met = status is RequestStatus.COMPLETED and e2e_s * 1000.0 <= slo_ms
        queue_wait_s = (rec.scheduled_at if rec.scheduled_at is not None else now) - info.arrival
        cost = 0.0
        if state is not None and rec.scheduled_at is not None:
            cost = state.view().cost_per_second * (now - rec.scheduled_at)
        result = RequestResult(
            request_id=rec.request_id,
            status=status,
            text="".join(rec.text_parts),
            finish_reason=rec.finish_reason,
            prompt_tokens=rec.prompt_tokens or info.prompt_tokens,
            completion_tokens=rec.completion_tokens,
            cached_tokens=rec.cached_tokens,
            instance_id=rec.instance_id,
            prefill_instance_id=rec.prefill_instance_id,
            queue_wait_ms=queue_wait_s * 1000.0,
            ttft_ms=None if ttft_s is None else ttft_s * 1000.0,
            tpot_ms=None if tpot_s is None else tpot_s * 1000.0,
            e2e_latency_ms=e2e_s * 1000.0,
            slo_met=slo_met,
            error=error,
            attempts=rec.attempts,
            token_ids=list(rec.token_ids) if rec.token_ids else None,
            logprobs=list(rec.logprobs) if rec.logprobs else None,
            cost=cost,
        )
        rec.result = result
        if not rec.future.done():
            rec.future.set_result(result)
        if rec.stream is not None:
            rec.stream.put_nowait(STREAM_END)
        self.records.pop(rec.request_id, None)
        self.finished.add(result, now)
        if state is not None and status is RequestStatus.COMPLETED:
            state.completed += 1
            state.tokens_generated += rec.completion_tokens
            state.record_latency(result.e2e_latency_ms)
            if tpot_s is not None:
                state.observe_tpot(tpot_s)
        self.metrics.on_finished(
            result,
            model=info.model,
            policy=str(self.policy.describe().get("current", self.policy.name)),
            priority=info.priority,
        )
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
            self.policy.on_complete(record)
        except Exception:
            log.exception("policy %s failed in on_complete", self.policy.name)

    async def cancel_all_tasks(self) -> None:
        tasks = [t for t in self._tasks if not t.done()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
