"""Every metric the control plane exports, in one place.

Prometheus series live in a registry owned by one :class:`ControlPlaneMetrics` (one per
manager; nothing is registered globally). The same object keeps bounded in-memory windows
for ``ControlPlaneManager.get_metrics()``.

Label values are bounded: ``instance_id`` and ``model`` come from registered instances only,
``status``/``priority``/``reason`` from fixed enumerations.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    ProcessCollector,
    generate_latest,
)

from sage_llm.control_plane.params import NO_USER, OTHER_USERS
from sage_llm.control_plane.promlite import (
    LiteCounter,
    LiteGauge,
    LiteHistogram,
    LiteHistogramChild,
    LiteValue,
    PeakGauge,
)
from sage_llm.logqueue import DroppedRecords
from sage_llm.types import (
    PDMetrics,
    PerformanceMetrics,
    RequestPriority,
    RequestResult,
    RequestStatus,
    SchedulingMetrics,
)

LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
    1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip
"""Up to the gateway's default ``request_timeout_s`` (600 s): long answers are measured."""
TOKEN_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05,
    0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0,
)  # fmt: skip
DECISION_BUCKETS = (1e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3, 1e-2)

PREFIX = "sage_llm"


class _UserSeries(NamedTuple):
    """One (user, status)'s children of the ``user_*`` metrics."""

    requests: LiteValue
    prompt_tokens: LiteValue
    output_tokens: LiteValue
    queue_time: LiteHistogramChild


class ControlPlaneMetrics:
    """Prometheus series plus bounded windows for aggregate figures."""

    def __init__(self, window: int = 10_000) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(registry=r)  # process_*: memory, CPU, open files (Linux)
        r.register(DroppedRecords())  # the log writer's dropped records
        self.requests = LiteCounter(
            f"{PREFIX}_requests",
            "Requests that ended, by final status.",
            ["status", "model", "policy", "instance_id"],
            registry=r,
        )
        self.rejected = Counter(
            f"{PREFIX}_requests_rejected",
            "Requests refused at admission, by reason.",
            ["reason", "model"],
            registry=r,
        )
        self.retries = Counter(
            f"{PREFIX}_request_retries", "Engine calls retried on another instance.", registry=r
        )
        self.embeddings = LiteCounter(
            f"{PREFIX}_embedding_requests",
            "Embedding calls that ended, by final status (not queued: not in requests_total).",
            ["status", "model", "instance_id"],
            registry=r,
        )
        self.lora_requests = LiteCounter(
            f"{PREFIX}_lora_requests",
            "Requests for a LoRA adapter that ended, by final status (each also counted in "
            "requests_total, under its model).",
            ["status", "model", "adapter"],
            registry=r,
        )
        self.ttft = LiteHistogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "Time from arrival to the first token.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = LiteHistogram(
            f"{PREFIX}_time_per_output_token_seconds",
            "Mean time between output tokens of a request.",
            ["model"],
            buckets=TOKEN_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = LiteHistogram(
            f"{PREFIX}_e2e_request_latency_seconds",
            "Time from arrival to the end of the request.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = LiteHistogram(
            f"{PREFIX}_request_queue_time_seconds",
            "Time a request waited in the control plane's queue.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.user_requests = LiteCounter(
            f"{PREFIX}_user_requests",
            "Requests that ended, by user (those named in the configuration: tenants, "
            f"user_weights; '{OTHER_USERS}' the rest, '{NO_USER}' requests naming none) "
            "and final status.",
            ["user", "status"],
            registry=r,
        )
        self.user_rejected = LiteCounter(
            f"{PREFIX}_user_requests_rejected",
            "Requests refused at admission, by user (as user_requests) and reason (as "
            "requests_rejected's: queue_full, user_queue_full, ...).",
            ["user", "reason"],
            registry=r,
        )
        self.user_prompt_tokens = LiteCounter(
            f"{PREFIX}_user_prompt_tokens",
            "Prompt tokens of the requests that ended, by user (as user_requests).",
            ["user"],
            registry=r,
        )
        self.user_output_tokens = LiteCounter(
            f"{PREFIX}_user_output_tokens",
            "Tokens generated for the requests that ended, by user (as user_requests).",
            ["user"],
            registry=r,
        )
        self.user_queue_time = LiteHistogram(
            f"{PREFIX}_user_queue_time_seconds",
            "Time a request that ended waited in the control plane's queue, by user (as "
            "user_requests).",
            ["user"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._tracked_users: set[str] = set()
        """The users with series of their own (:meth:`track_users`); none: no user series."""
        self._user_children: dict[tuple[str, str], _UserSeries] = {}
        self.queue_depth = PeakGauge(
            f"{PREFIX}_queue_depth", "Requests waiting in the queue.", registry=r
        )
        self.running = LiteGauge(
            f"{PREFIX}_requests_running", "Requests dispatched to engines.", registry=r
        )
        self.instance_in_flight = LiteGauge(
            f"{PREFIX}_instance_in_flight", "Requests in flight per instance.", ["instance_id"],
            registry=r,
        )  # fmt: skip
        self.instance_healthy = Gauge(
            f"{PREFIX}_instance_healthy", "1 when the instance is healthy.", ["instance_id"],
            registry=r,
        )  # fmt: skip
        self.instance_draining = Gauge(
            f"{PREFIX}_instance_draining",
            "1 while the instance is draining: it takes no new request (an operator's drain, "
            "or its removal).",
            ["instance_id"],
            registry=r,
        )
        self.circuit_state = Gauge(
            f"{PREFIX}_instance_circuit_state",
            "Circuit breaker state per instance: 0 closed, 1 half-open, 2 open.",
            ["instance_id"],
            registry=r,
        )
        self.circuit_transitions = Counter(
            f"{PREFIX}_instance_circuit_transitions",
            "Circuit breaker transitions per instance, by the state entered.",
            ["instance_id", "state"],
            registry=r,
        )
        self.instance_stalls = Counter(
            f"{PREFIX}_instance_stalls",
            "Ejections of an instance as stalled: its engine processed no token for "
            "stall_timeout_s with requests in flight.",
            ["instance_id"],
            registry=r,
        )
        self.instance_kv_usage = Gauge(
            f"{PREFIX}_instance_kv_cache_usage", "Engine KV cache usage, 0..1.", ["instance_id"],
            registry=r,
        )  # fmt: skip
        self.instance_lora_slots_free = Gauge(
            f"{PREFIX}_instance_lora_slots_free",
            "LoRA slots of the instance's engine (vLLM's --max-loras) that no adapter holds: "
            "not those of the calls in flight there, nor another client's (its stats). Only "
            "for engines that say how many they have.",
            ["instance_id"],
            registry=r,
        )
        self.http_errors = Counter(
            f"{PREFIX}_http_errors",
            "Requests the gateway answered with an error status, by route and status: 4xx "
            "the client's (a bad field, an unknown model, a wrong API key …, many refused "
            "before the control plane), 5xx the fleet's or the gateway's.",
            ["route", "status"],
            registry=r,
        )
        self.gateway_reloads = Counter(
            f"{PREFIX}_gateway_reloads",
            "Reloads of the gateway's settings (POST /admin/reload), by outcome: applied "
            "(the file was read and is in use, changed or not) or failed (the file has a "
            "problem; the settings before it stay in use).",
            ["outcome"],
            registry=r,
        )
        for outcome in ("applied", "failed"):  # both at 0 from the start: rates and alerts
            self.gateway_reloads.labels(outcome=outcome)  # see the first failure
        self.slo_requests = Counter(
            f"{PREFIX}_slo_requests", "Finished requests that had an SLO.", ["priority"],
            registry=r,
        )  # fmt: skip
        self.slo_met = Counter(
            f"{PREFIX}_slo_met", "Finished requests that met their SLO.", ["priority"],
            registry=r,
        )  # fmt: skip
        self.routing_seconds = LiteHistogram(
            f"{PREFIX}_routing_decision_seconds",
            "Time to take one scheduling + routing decision.",
            buckets=DECISION_BUCKETS,
            registry=r,
        )
        self.policy_info = Gauge(
            f"{PREFIX}_scheduling_policy", "1 for the active (inner) policy.", ["policy"],
            registry=r,
        )  # fmt: skip
        self.pd_requests = Counter(
            f"{PREFIX}_pd_requests",
            "Dispatches of requests for a PD-enabled model, by path (disaggregated/colocated).",
            ["path"],
            registry=r,
        )
        self.pd_prefill_leg = LiteHistogram(
            f"{PREFIX}_pd_prefill_leg_seconds",
            "Time from dispatch to the end of a PD request's prefill leg.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.pd_handoff = LiteHistogram(
            f"{PREFIX}_pd_handoff_seconds",
            "From the end of the prefill leg to the decode instance's first token: KV "
            "transfer, decode-side queueing and the first decode step.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.pd_transfer_predicted = LiteHistogram(
            f"{PREFIX}_pd_kv_transfer_predicted_seconds",
            "Predicted KV transfer time of dispatched PD requests (link model).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.pd_fallbacks = Counter(
            f"{PREFIX}_pd_fallbacks",
            "PD requests retried colocated after their prefill leg failed.",
            registry=r,
        )
        self.instance_prefill_reserved = Gauge(
            f"{PREFIX}_instance_prefill_reserved",
            "1 while PD's prefill reserve holds the instance for prefill legs (whole requests "
            "and decode legs keep off it while others are free), else 0.",
            ["instance_id"],
            registry=r,
        )
        self.pd_reserve_holds = Counter(
            f"{PREFIX}_pd_prefill_reserve_holds",
            "Times PD's prefill reserve took an instance in for prefill legs.",
            registry=r,
        )
        self._pd_reserve_holds_seen = 0
        self._pd_paths: dict[str, int] = {"disaggregated": 0, "colocated": 0}
        # Labelled children of the request counter, per instance then (status, model,
        # policy): looked up without prometheus_client's labels() on the hot path, and
        # dropped with the instance on unregister.
        self._request_series: dict[str, dict[tuple[str, str, str], LiteValue]] = {}
        # The embedding counter's (status, model) per instance, dropped alike.
        self._embedding_series: dict[str, set[tuple[str, str]]] = {}
        # Per-model histogram children (e2e, queue, ttft, tpot); models are bounded by the
        # registered fleet (unknown models are refused before any metric is labelled).
        self._model_children: dict[
            str,
            tuple[LiteHistogramChild, LiteHistogramChild, LiteHistogramChild, LiteHistogramChild],
        ] = {}
        self._in_flight_children: dict[str, LiteValue] = {}
        self._rejected_reasons: dict[str, set[str]] = {}
        """Per model, the reasons its requests were refused for (its rejected series)."""
        self._lora_series: dict[str, set[tuple[str, str]]] = {}
        """By model, the (status, adapter) label pairs ``lora_requests`` has series of."""
        self._pd_prefill_ms: deque[float] = deque(maxlen=window)
        self._pd_handoff_ms: deque[float] = deque(maxlen=window)
        self._pd_transfer_ms: deque[float] = deque(maxlen=window)
        self._pd_fallback_count = 0
        self._pd_prefill_legs = 0
        self._pd_decisions = 0
        self._pd_decision_s = 0.0
        self._pd_decode_ms: deque[float] = deque(maxlen=window)
        self.pd_prefill_tokens = 0
        self.pd_prefill_cost = 0.0
        self.pd_decode_tokens = 0
        self.pd_decode_cost = 0.0
        self._predictions: deque[tuple[float, float]] = deque(maxlen=window)
        """(predicted, measured) ms from placement to the end, of the latest completed
        requests that had a prediction."""
        self._queued_ms = 0.0
        """The queue waits of every request that ended (the area under the queue depth)."""
        self._slo_by_priority: dict[str, list[int]] = {}
        """Priority name: [requests with an SLO, those that met it]."""
        self._e2e_ms: deque[float] = deque(maxlen=window)
        self._ttft_ms: deque[float] = deque(maxlen=window)
        self._tpot_ms: deque[float] = deque(maxlen=window)
        self._queue_ms: deque[float] = deque(maxlen=window)
        self._counts: dict[RequestStatus, int] = dict.fromkeys(RequestStatus, 0)
        self._rejected_count = 0
        self._slo_total = 0
        self._slo_met_total = 0
        self._tokens = 0
        self._cost = 0.0
        self._submitted = 0

    # -- recording -------------------------------------------------------------------------

    def on_submitted(self) -> None:
        self._submitted += 1

    def on_rejected(self, reason: str, model: str) -> None:
        self._rejected_count += 1
        self._rejected_reasons.setdefault(model, set()).add(reason)
        self.rejected.labels(reason=reason, model=model).inc()

    def on_user_rejected(self, reason: str, user: str | None) -> None:
        """A generation request of ``user`` (its ``user_id``) was refused at admission,
        as :meth:`on_rejected` counts it: for the ``user_*`` metrics."""
        if self._tracked_users:
            self.user_rejected.labels(user=self._user_label(user), reason=reason).inc()

    def on_embedding(self, status: str, model: str, instance_id: str) -> None:
        """An embedding call on ``instance_id`` ended: ``completed``, ``failed`` or
        ``cancelled``."""
        self._embedding_series.setdefault(instance_id, set()).add((status, model))
        self.embeddings.labels(status=status, model=model, instance_id=instance_id).inc()

    def track_users(self, users: Iterable[str]) -> None:
        """Give ``users`` series of their own in the ``user_*`` metrics (``""``: the
        requests that name none); once any user is tracked, the others' requests are
        counted together. Users are added, never removed: the set is what the
        configuration names, bounded by it."""
        self._tracked_users.update(users)

    def _user_label(self, user: str | None) -> str:
        name = user or ""
        return (name or NO_USER) if name in self._tracked_users else OTHER_USERS

    def _on_user_finished(self, result: RequestResult, user: str | None) -> None:
        label = self._user_label(user)
        status = result.status.value
        series = self._user_children.get((label, status))
        if series is None:
            series = self._user_children[(label, status)] = _UserSeries(
                self.user_requests.labels(user=label, status=status),
                self.user_prompt_tokens.labels(user=label),
                self.user_output_tokens.labels(user=label),
                self.user_queue_time.labels(user=label),
            )
        series.requests.inc()
        series.prompt_tokens.inc(result.prompt_tokens)
        series.output_tokens.inc(result.completion_tokens)
        series.queue_time.observe(result.queue_wait_ms / 1000.0)

    def on_finished(
        self,
        result: RequestResult,
        *,
        model: str,
        policy: str,
        priority: RequestPriority,
        predicted_e2e_s: float | None = None,
        user: str | None = None,
    ) -> None:
        """A request ended: ``user`` is its ``user_id`` (for the ``user_*`` metrics)."""
        if self._tracked_users:
            self._on_user_finished(result, user)
        status = result.status
        self._counts[status] += 1
        self._queued_ms += result.queue_wait_ms
        instance = result.instance_id or "none"
        series = self._request_series.setdefault(instance, {})
        key = (status.value, model, policy)
        counter = series.get(key)
        if counter is None:
            counter = series[key] = self.requests.labels(
                status=status.value, model=model, policy=policy, instance_id=instance
            )
        counter.inc()
        if status is RequestStatus.COMPLETED:
            children = self._model_children.get(model)
            if children is None:
                children = self._model_children[model] = (
                    self.e2e.labels(model=model), self.queue_time.labels(model=model),
                    self.ttft.labels(model=model), self.tpot.labels(model=model),
                )  # fmt: skip
            e2e, queue_time, ttft, tpot = children
            self._e2e_ms.append(result.e2e_latency_ms)
            self._queue_ms.append(result.queue_wait_ms)
            e2e.observe(result.e2e_latency_ms / 1000.0)
            queue_time.observe(result.queue_wait_ms / 1000.0)
            if result.ttft_ms is not None:
                self._ttft_ms.append(result.ttft_ms)
                ttft.observe(result.ttft_ms / 1000.0)
            if result.tpot_ms is not None:
                self._tpot_ms.append(result.tpot_ms)
                tpot.observe(result.tpot_ms / 1000.0)
            self._tokens += result.completion_tokens
            self._cost += result.cost
            if predicted_e2e_s is not None:
                served_ms = result.e2e_latency_ms - result.queue_wait_ms
                self._predictions.append((predicted_e2e_s * 1000.0, served_ms))
        if result.slo_met is not None:
            name = priority.name.lower()
            self._slo_total += 1
            self.slo_requests.labels(priority=name).inc()
            met = self.slo_met.labels(priority=name)  # 0 from its first request: attainment
            counts = self._slo_by_priority.setdefault(name, [0, 0])  # of 0 is a ratio, too
            counts[0] += 1
            if result.slo_met:
                counts[1] += 1
                self._slo_met_total += 1
                met.inc()

    def on_pd_routed(self, path: str, predicted_transfer_s: float | None = None) -> None:
        """A request of a PD-enabled model was dispatched ``disaggregated`` or ``colocated``."""
        self._pd_paths[path] = self._pd_paths.get(path, 0) + 1
        self.pd_requests.labels(path=path).inc()
        if predicted_transfer_s is not None:
            self._pd_transfer_ms.append(predicted_transfer_s * 1000.0)
            self.pd_transfer_predicted.observe(predicted_transfer_s)

    def on_pd_prefill_leg(self, seconds: float, tokens: int = 0, cost: float = 0.0) -> None:
        """A PD request's prefill leg ended after ``seconds``, prefilling ``tokens`` at
        ``cost``."""
        self._pd_prefill_ms.append(seconds * 1000.0)
        self.pd_prefill_leg.observe(seconds)
        self._pd_prefill_legs += 1
        self.pd_prefill_tokens += tokens
        self.pd_prefill_cost += cost

    def on_pd_decision(self, seconds: float) -> None:
        """A request of a PD-enabled model was scheduled and routed (either way) in
        ``seconds``."""
        self._pd_decisions += 1
        self._pd_decision_s += seconds

    def on_pd_decode_leg(self, seconds: float, tokens: int, cost: float) -> None:
        """A disaggregated request completed ``seconds`` after its prefill leg ended,
        with ``tokens`` generated at ``cost`` on its decode instance."""
        self._pd_decode_ms.append(seconds * 1000.0)
        self.pd_decode_tokens += tokens
        self.pd_decode_cost += cost

    def on_pd_handoff(self, seconds: float) -> None:
        self._pd_handoff_ms.append(seconds * 1000.0)
        self.pd_handoff.observe(seconds)

    def on_pd_fallback(self) -> None:
        self._pd_fallback_count += 1
        self.pd_fallbacks.inc()

    def pd_summary(self) -> dict[str, float | int]:
        """PD figures since start: requests per path, colocated fallbacks, and mean / p99
        prefill-leg, hand-off and predicted KV transfer times in ms."""
        out: dict[str, float | int] = {
            "disaggregated_requests": self._pd_paths.get("disaggregated", 0),
            "colocated_requests": self._pd_paths.get("colocated", 0),
            "colocated_fallbacks": self._pd_fallback_count,
        }
        for name, window in (
            ("prefill_leg", self._pd_prefill_ms),
            ("handoff", self._pd_handoff_ms),
            ("kv_transfer_predicted", self._pd_transfer_ms),
        ):
            a = np.asarray(window, dtype=float)
            out[f"avg_{name}_ms"] = mean(a)
            out[f"p99_{name}_ms"] = percentile(a, 99)
        return out

    def set_policy(self, active: str, all_names: Iterable[str]) -> None:
        for name in all_names:
            self.policy_info.labels(policy=name).set(1.0 if name == active else 0.0)

    def on_http_error(self, route: str, status: int) -> None:
        """The gateway answered a request on ``route`` (one of a fixed set of labels) with
        an error ``status`` (>= 400; 499: the client went away)."""
        self.http_errors.labels(route=route, status=str(status)).inc()

    def on_gateway_reload(self, applied: bool) -> None:
        """A reload of the gateway's settings was applied, or failed."""
        self.gateway_reloads.labels(outcome="applied" if applied else "failed").inc()

    def forget_instance(self, instance_id: str) -> None:
        """Drop a removed instance's gauges (its counters: :meth:`forget_instance_counts`)."""
        for gauge in (
            self.instance_in_flight,
            self.instance_healthy,
            self.instance_draining,
            self.instance_kv_usage,
            self.instance_lora_slots_free,
            self.instance_prefill_reserved,
            self.circuit_state,
        ):
            with contextlib.suppress(KeyError):
                gauge.remove(instance_id)
        self._in_flight_children.pop(instance_id, None)

    def set_prefill_reserve(self, held: Mapping[str, bool], holds_started: int) -> None:
        """PD's prefill reserve as a scrape reads it: each instance's ``held`` flag, and
        the holds the orchestrator has started in all (a count that only grows)."""
        for iid, on in held.items():
            self.instance_prefill_reserved.labels(instance_id=iid).set(1.0 if on else 0.0)
        if holds_started > self._pd_reserve_holds_seen:
            self.pd_reserve_holds.inc(holds_started - self._pd_reserve_holds_seen)
            self._pd_reserve_holds_seen = holds_started

    def forget_instance_counts(self, instance_id: str, model: str | None = None) -> None:
        """Drop a removed instance's counters: its requests by status, its breaker's
        transitions, its stalls; with ``model``, only its requests of that model."""
        if model is None:
            with contextlib.suppress(KeyError):
                self.instance_stalls.remove(instance_id)
            for state in ("closed", "half-open", "open"):
                with contextlib.suppress(KeyError):
                    self.circuit_transitions.remove(instance_id, state)
        series = self._request_series.get(instance_id, {})
        for key in [key for key in series if model is None or key[1] == model]:
            del series[key]
            with contextlib.suppress(KeyError):
                self.requests.remove(key[0], key[1], key[2], instance_id)
        if not series:
            self._request_series.pop(instance_id, None)
        embedded = self._embedding_series.get(instance_id, set())
        for status, of in [key for key in embedded if model is None or key[1] == model]:
            embedded.discard((status, of))
            with contextlib.suppress(KeyError):
                self.embeddings.remove(status, of, instance_id)
        if not embedded:
            self._embedding_series.pop(instance_id, None)

    def on_lora_finished(self, status: RequestStatus, model: str, adapter: str) -> None:
        """A request for the LoRA ``adapter`` of ``model`` ended with ``status``."""
        self.lora_requests.labels(status=status.value, model=model, adapter=adapter).inc()
        self._lora_series.setdefault(model, set()).add((status.value, adapter))

    def forget_model(self, model: str) -> None:
        """Drop the series of a model no instance serves any more: its latency histograms,
        its refusals, and its requests (an instance id registered again with another model
        may still hold some)."""
        if self._model_children.pop(model, None) is not None:
            for histogram in (self.e2e, self.queue_time, self.ttft, self.tpot):
                with contextlib.suppress(KeyError):
                    histogram.remove(model)
        for reason in self._rejected_reasons.pop(model, ()):
            with contextlib.suppress(KeyError):
                self.rejected.remove(reason, model)
        for status, adapter in self._lora_series.pop(model, ()):
            with contextlib.suppress(KeyError):
                self.lora_requests.remove(status, model, adapter)
        for instance_id in {*self._request_series, *self._embedding_series}:
            self.forget_instance_counts(instance_id, model)

    def set_in_flight(self, instance_id: str, value: int) -> None:
        """The ``instance_in_flight`` gauge of one instance (child looked up once)."""
        child = self._in_flight_children.get(instance_id)
        if child is None:
            child = self._in_flight_children[instance_id] = self.instance_in_flight.labels(
                instance_id=instance_id
            )
        child.set(value)

    def set_lora_slots(self, instance_id: str, free: int | None) -> None:
        """The ``instance_lora_slots_free`` gauge of one instance (None: its engine does not
        say how many it has; the series goes)."""
        if free is None:
            with contextlib.suppress(KeyError):
                self.instance_lora_slots_free.remove(instance_id)
        else:
            self.instance_lora_slots_free.labels(instance_id=instance_id).set(free)

    # -- reading ---------------------------------------------------------------------------

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def performance(
        self, *, active: int, queued: int, elapsed_s: float, gpu_memory_gb: float
    ) -> PerformanceMetrics:
        completed = self._counts[RequestStatus.COMPLETED]
        failed = self._counts[RequestStatus.FAILED]
        e2e = np.asarray(self._e2e_ms, dtype=float)
        ttft = np.asarray(self._ttft_ms, dtype=float)
        tpot = np.asarray(self._tpot_ms, dtype=float)
        queue = np.asarray(self._queue_ms, dtype=float)
        per_s = 1.0 / elapsed_s if elapsed_s > 0 else 0.0
        return PerformanceMetrics(
            total_requests=self._submitted,
            completed_requests=completed,
            failed_requests=failed,
            cancelled_requests=self._counts[RequestStatus.CANCELLED],
            rejected_requests=self._rejected_count,
            active_requests=active,
            queued_requests=queued,
            avg_latency_ms=mean(e2e),
            p50_latency_ms=percentile(e2e, 50),
            p95_latency_ms=percentile(e2e, 95),
            p99_latency_ms=percentile(e2e, 99),
            avg_ttft_ms=mean(ttft),
            p99_ttft_ms=percentile(ttft, 99),
            avg_tpot_ms=mean(tpot),
            avg_queue_wait_ms=mean(queue),
            tokens_per_second=self._tokens * per_s,
            requests_per_second=completed * per_s,
            total_gpu_memory_gb=gpu_memory_gb,
            total_cost=self._cost,
            cost_per_token=self._cost / self._tokens if self._tokens else 0.0,
            slo_violations=self._slo_total - self._slo_met_total,
            slo_compliance_rate=(self._slo_met_total / self._slo_total) if self._slo_total else 1.0,
        )

    def scheduling(
        self, *, policy: str, elapsed_s: float, waiting_ms: float = 0.0
    ) -> SchedulingMetrics:
        """The scheduler's figures since start (the manager adds the fleet's load balance).

        * ``scheduling_latency_us``: the mean time of one scheduling + routing decision;
          ``scheduling_throughput``: decisions per second.
        * ``latency_prediction_error_*``: the absolute difference, in ms, between the time
          from a request's placement to its end that the chosen instance's estimate
          predicted (for ``max_tokens``) and the measured one, over the latest completed
          requests; ``prediction_accuracy_rate``: the share within 20% of the measured.
        * ``queue_wait_time_p*``: the queue waits of the latest completed requests, in ms;
          ``queue_length_avg``: the queue depth averaged over the running time (the time
          every request spent queued, ``waiting_ms`` of those not ended yet included,
          over the running seconds: Little's law, exactly);
          ``queue_length_max``: the highest queue depth seen.
        """
        decisions = self.routing_seconds.unlabelled
        count = decisions.count
        predictions = np.asarray(self._predictions, dtype=float).reshape(-1, 2)
        errors = np.abs(predictions[:, 0] - predictions[:, 1])
        within = errors <= 0.2 * predictions[:, 1]
        queue = np.asarray(self._queue_ms, dtype=float)
        per_s = 1.0 / elapsed_s if elapsed_s > 0 else 0.0
        return SchedulingMetrics(
            policy_name=policy,
            scheduling_latency_us=decisions.sum / count * 1e6 if count else 0.0,
            scheduling_throughput=count * per_s,
            latency_prediction_error_avg=mean(errors),
            latency_prediction_error_p95=percentile(errors, 95),
            prediction_accuracy_rate=float(within.mean()) if within.size else 1.0,
            slo_compliance_by_priority={
                name: met / total for name, (total, met) in self._slo_by_priority.items()
            },
            queue_wait_time_p50=percentile(queue, 50),
            queue_wait_time_p95=percentile(queue, 95),
            queue_wait_time_p99=percentile(queue, 99),
            queue_length_avg=(self._queued_ms + waiting_ms) / 1000.0 * per_s,
            queue_length_max=int(self.queue_depth.peak),
            metadata={"decisions": count, "predictions": len(self._predictions)},
        )

    def pd(self, *, elapsed_s: float) -> PDMetrics:
        """PD figures since start (the manager adds the instances' live ones).

        ``prefilling_latency_*``: the prefill legs; ``inter_cluster_transfer_latency_avg_ms``:
        the measured hand-off, from a prefill leg's end to the decode instance's first
        token (KV transfer, decode-side queueing, the first decode step); ``decoding_latency_*``:
        from a prefill leg's end to the request's end; ``requests_routed_to_prefilling``:
        disaggregated dispatches, ``_decoding``: those whose prefill leg ended, so that they
        went on to their decode instance (one whose prefill leg failed is retried, perhaps
        colocated), ``_hybrid``: requests of a PD model dispatched colocated; costs per
        token from the instances' prices. ``metadata`` has the PD summary and how many
        samples each latency is over (``*_samples``).
        ``avg_routing_decision_time_us`` is the mean time of the scheduling and routing
        decisions of requests of PD-enabled models (the PD decision and the pairing
        included).
        """
        prefill = np.asarray(self._pd_prefill_ms, dtype=float)
        decode = np.asarray(self._pd_decode_ms, dtype=float)
        handoff = np.asarray(self._pd_handoff_ms, dtype=float)
        disaggregated = self._pd_paths.get("disaggregated", 0)
        decisions = self._pd_decisions
        return PDMetrics(
            prefilling_throughput_tokens_per_sec=(
                self.pd_prefill_tokens / elapsed_s if elapsed_s > 0 else 0.0
            ),
            prefilling_latency_avg_ms=mean(prefill),
            prefilling_latency_p99_ms=percentile(prefill, 99),
            decoding_latency_avg_ms=mean(decode),
            decoding_latency_p99_ms=percentile(decode, 99),
            inter_cluster_transfer_latency_avg_ms=mean(handoff),
            prefilling_cost_per_token=(
                self.pd_prefill_cost / self.pd_prefill_tokens if self.pd_prefill_tokens else 0.0
            ),
            decoding_cost_per_token=(
                self.pd_decode_cost / self.pd_decode_tokens if self.pd_decode_tokens else 0.0
            ),
            requests_routed_to_prefilling=disaggregated,
            requests_routed_to_decoding=self._pd_prefill_legs,
            requests_routed_to_hybrid=self._pd_paths.get("colocated", 0),
            avg_routing_decision_time_us=(
                self._pd_decision_s / decisions * 1e6 if decisions else 0.0
            ),
            metadata={
                **self.pd_summary(),
                "prefill_leg_samples": prefill.size,
                "decode_leg_samples": decode.size,
                "handoff_samples": handoff.size,
            },
        )


def percentile(a: np.ndarray, q: float) -> float:
    """The ``q``-th percentile of ``a``; 0.0 for no samples."""
    return float(np.percentile(a, q)) if a.size else 0.0


def mean(a: np.ndarray) -> float:
    """The mean of ``a``; 0.0 for no samples."""
    return float(a.mean()) if a.size else 0.0
