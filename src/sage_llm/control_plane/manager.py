"""ControlPlaneManager: the one composition root of a control plane.

It builds the scheduling policy, router, prefix index, metrics and dispatcher from its
arguments, owns the engine clients of registered instances, and exposes the seed API::

    cp = ControlPlaneManager(scheduling_policy="adaptive", routing_strategy="load_balanced",
                             mode="simulated")
    cp.register_instance(ExecutionInstance("sim-0", "localhost", 8000, "llama-3-8b"))
    async with cp:
        rid = await cp.submit_request(RequestMetadata(request_id="r1", prompt="Hi", max_tokens=8))
        result = await cp.wait_for_result(rid)
        print(result.text)

``mode="http"`` talks to real engines over HTTP (vLLM, SGLang, OpenAI-compatible);
``mode="simulated"`` gives every registered instance an in-process simulated engine; an
instance with ``engine="sim"`` is simulated in either mode; ``engine_factory`` overrides both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import replace
from datetime import datetime
from types import TracebackType
from typing import Any

import aiohttp

from sage_llm.config import (
    PD_LEG_ROLES,
    check_instance,
    check_manager_arguments,
    pd_engine_problem,
    reached_key,
)
from sage_llm.config_fields import latency_prior, name_problem
from sage_llm.control_plane.deadlines import DeadlineTimers, TimeLimit, time_limit_arg
from sage_llm.control_plane.dispatcher import (
    Dispatcher,
    failure_error,
    internal_error,
    timed_out,
)
from sage_llm.control_plane.health import BreakerSettings, HealthMonitor, HealthSettings
from sage_llm.control_plane.instances import (
    InstanceRegistry,
    InstanceState,
    LatencyPriors,
    price_per_second,
)
from sage_llm.control_plane.intake import build_request, resolve_model
from sage_llm.control_plane.metrics import ControlPlaneMetrics
from sage_llm.control_plane.params import Gathered
from sage_llm.control_plane.pd import build_pd
from sage_llm.control_plane.pd.connectors import samples_asked
from sage_llm.control_plane.pd.orchestrator import PD_ROLES, pair_exists
from sage_llm.control_plane.records import (
    ChunkChannel,
    FinishedRecords,
    LastInstances,
    RequestRecord,
    StreamEnd,
)
from sage_llm.control_plane.routing.base import Router
from sage_llm.control_plane.routing.prefix_index import PrefixIndex
from sage_llm.control_plane.routing.registry import build_router, get_strategy
from sage_llm.control_plane.routing.strategies import router_wants
from sage_llm.control_plane.scheduling.admission import (
    check_deadline_feasible,
    check_queue_bound,
)
from sage_llm.control_plane.scheduling.base import SchedulingPolicy, policy_label
from sage_llm.control_plane.scheduling.fair import weighted_users
from sage_llm.control_plane.scheduling.registry import (
    POLICY_NAMES,
    build_policy,
    may_read_block_hashes,
)
from sage_llm.engines.base import (
    Chunk,
    EmbeddingEngineClient,
    EngineClient,
    EngineRequest,
    EngineStats,
    LoadsAdapters,
    answered_whole,
    embeddings_refusal,
    prompt_logprobs_asked,
)
from sage_llm.engines.http import HTTPTimeouts
from sage_llm.errors import (
    AdmissionError,
    ConfigError,
    ConflictError,
    ControlPlaneNotRunningError,
    DeadlineExceededError,
    EngineError,
    EngineRequestRejectedError,
    InstanceNotFoundError,
    InvalidRequestError,
    ModelNotFoundError,
    NoHealthyInstanceError,
    OverBudgetError,
    QueueFullError,
    RequestNotFoundError,
    SageLLMError,
    SLOInfeasibleError,
)
from sage_llm.sim.clock import Clock, RealClock, current_clock
from sage_llm.types import (
    ExecutionInstance,
    ExecutionInstanceType,
    InstanceMetrics,
    ParallelismType,
    PDMetrics,
    PDSeparationConfig,
    PerformanceMetrics,
    RequestMetadata,
    RequestResult,
    RequestStatus,
    SchedulingDecision,
    SchedulingMetrics,
)

log = logging.getLogger("sage_llm.manager")


EngineFactory = Callable[[ExecutionInstance], EngineClient]
MODES = ("http", "simulated")
REMOVED_COUNTS_KEEP_S = 300.0
"""How long a removed instance's counter series (``sage_llm_requests_total`` and its
breaker's and stall counters), and a model's series once no instance serves it (its
latency histograms, refusals), stay in ``/metrics`` after it went: its last requests end
as it goes, and a scrape must see them counted (five minutes: several scrape intervals)."""


def _embeds(state: InstanceState) -> bool:
    """Whether ``state``'s engine serves embeddings."""
    return isinstance(state.client, EmbeddingEngineClient)


class ControlPlaneManager:
    """Schedules and routes requests over registered engine instances."""

    def __init__(
        self,
        scheduling_policy: str = "adaptive",
        routing_strategy: str = "load_balanced",
        enable_auto_scaling: bool = False,
        enable_monitoring: bool = True,
        enable_pd_separation: bool = True,
        pd_config: PDSeparationConfig | None = None,
        mode: str = "http",
        *,
        policy_params: Mapping[str, Any] | None = None,
        routing_params: Mapping[str, Any] | None = None,
        engine_factory: EngineFactory | None = None,
        clock: Clock | None = None,
        max_queue_size: int = 10_000,
        max_retries: int = 2,
        default_max_tokens: int = 128,
        result_retention: int = 2_000,
        result_ttl_s: float = 600.0,
        stats_interval_s: float = 1.0,
        health_interval_s: float = 5.0,
        prefix_block_size: int = 16,
        prefix_index_capacity: int = 32_768,
        seed: int | None = None,
        health: HealthSettings | None = None,
        engine_timeouts: HTTPTimeouts | None = None,
        max_queue_wait_s: float | None = None,
        reject_infeasible_slo: bool = False,
        engine_stream: str = "sampled",
        engine_stream_sample: float = 0.1,
        engine_stream_sample_max_per_s: float = 20.0,
        lora_slot_routing: bool = True,
    ) -> None:
        """``health`` sets probes and the circuit breaker (default: probes every
        ``health_interval_s``); ``engine_timeouts`` the connect / first-token / idle limits
        of engine calls (first-token and idle are enforced for every engine client, the
        others by HTTP clients); ``max_queue_wait_s`` fails requests queued longer;
        ``reject_infeasible_slo`` refuses requests whose deadline no instance can meet;
        ``engine_stream`` is ``"sampled"`` (an engine call streams when its client streams,
        and a fraction ``engine_stream_sample`` of the other requests on each instance
        stream too, at most ``engine_stream_sample_max_per_s`` a second on each (0: no
        limit), so TTFT, TPOT and the instances' latency estimates stay measured while most
        non-streaming requests cost no more than a plain proxy's), ``"always"`` (every
        engine call streams: TTFT and TPOT measured for every request) or ``"client"``
        (only when the client streams: no TTFT or TPOT for non-streaming requests).
        Engines whose answer comes in pieces anyway (in-process simulated ones) stream
        every request unless ``engine_stream`` is ``"client"``. ``lora_slot_routing``
        (default on) routes a request for a LoRA adapter by the engines' LoRA slots (vLLM's
        ``--max-loras``; :class:`~sage_llm.control_plane.routing.lora.LoraRoom`); off,
        only by which engines serve the adapter.

        Policy and routing names are read as config files read them (case-insensitive,
        ``-`` read as ``_``). The arguments a config file also has are checked by its rules
        (types and ranges, :func:`~sage_llm.config.check_manager_arguments`): a bad one
        raises :class:`ConfigError` naming it, several raise :class:`ConfigErrors`. None is
        no value for them (only ``seed`` and ``max_queue_wait_s`` may be None), and
        ``pd_config``, ``health``, ``engine_timeouts`` and ``clock`` must be of their
        types (or None, for their defaults)."""
        check_manager_arguments(
            mode=mode, enable_auto_scaling=enable_auto_scaling,
            enable_monitoring=enable_monitoring, enable_pd_separation=enable_pd_separation,
            max_queue_size=max_queue_size, max_retries=max_retries,
            default_max_tokens=default_max_tokens, engine_stream=engine_stream,
            engine_stream_sample=engine_stream_sample,
            engine_stream_sample_max_per_s=engine_stream_sample_max_per_s,
            lora_slot_routing=lora_slot_routing, result_retention=result_retention,
            result_ttl_s=result_ttl_s,
            stats_interval_s=stats_interval_s, health_interval_s=health_interval_s,
            prefix_block_size=prefix_block_size, prefix_index_capacity=prefix_index_capacity,
            seed=seed, max_queue_wait_s=max_queue_wait_s,
            reject_infeasible_slo=reject_infeasible_slo,
        )  # fmt: skip
        for name, given, kind in (
            ("pd_config", pd_config, PDSeparationConfig),
            ("health", health, HealthSettings),
            ("engine_timeouts", engine_timeouts, HTTPTimeouts),
            ("clock", clock, Clock),
        ):
            if given is not None and not isinstance(given, kind):
                raise ConfigError(
                    f"must be a {kind.__name__} (or None), got {type(given).__name__}", key=name
                )
        if engine_factory is not None and not callable(engine_factory):
            raise ConfigError(
                f"must be a callable (or None), got {type(engine_factory).__name__}",
                key="engine_factory",
            )
        mode = mode.strip().lower()
        mode = {"sim": "simulated", "local": "simulated"}.get(mode, mode)
        engine_stream = engine_stream.lower()
        self.mode = mode
        self.enable_auto_scaling = enable_auto_scaling
        self.enable_monitoring = enable_monitoring
        self.enable_pd_separation = enable_pd_separation
        self.pd_config = pd_config or PDSeparationConfig(enabled=enable_pd_separation)
        pd_on = enable_pd_separation and self.pd_config.enabled
        for name, table in (("policy_params", policy_params), ("routing_params", routing_params)):
            if table is not None and not isinstance(table, Mapping):
                raise ConfigError(f"must be a table (a mapping), got {table!r}", key=name)
        plugins = Gathered()  # every plugin's problems, raised at once
        self._pd = (
            plugins.built(
                lambda: build_pd(self.pd_config, seed=seed, block_size=prefix_block_size),
                "pd_config",
            )
            if pd_on
            else None
        )
        self.max_queue_size = max_queue_size
        self.default_max_tokens = default_max_tokens
        self.stats_interval_s = stats_interval_s
        self.health_interval_s = health_interval_s
        self.prefix_block_size = prefix_block_size
        self._policy_params = dict(policy_params or {})
        self._routing_name = routing_strategy
        self._engine_factory = engine_factory
        self._clock = clock
        self._seed = seed
        self.health_settings = health or HealthSettings(
            interval_s=health_interval_s,
            stats_interval_s=stats_interval_s,
            breaker=BreakerSettings(base_cooldown_s=min(1.0, health_interval_s)),
        )
        self.engine_timeouts = engine_timeouts or HTTPTimeouts(
            health_s=self.health_settings.timeout_s
        )
        self.max_queue_wait_s = max_queue_wait_s
        self.reject_infeasible_slo = reject_infeasible_slo
        self.engine_stream = engine_stream
        self.engine_stream_sample = engine_stream_sample
        self.engine_stream_sample_max_per_s = engine_stream_sample_max_per_s
        self.lora_slot_routing = lora_slot_routing
        self._registry = InstanceRegistry()
        self._metrics = ControlPlaneMetrics()
        self._health: HealthMonitor | None = None
        self._prefix = PrefixIndex(capacity_blocks=prefix_index_capacity)
        self._finished = FinishedRecords(result_retention, result_ttl_s)
        self._last_instances = LastInstances()
        policy = plugins.built(
            lambda: build_policy(scheduling_policy, self._policy_params), "policy_params"
        )
        router = plugins.built(
            lambda: build_router(routing_strategy, routing_params, seed=seed), "routing_params"
        )
        plugins.raise_any()
        assert policy is not None
        assert router is not None
        self._metrics.track_users(weighted_users(policy))
        self._dispatcher: Dispatcher | None = None
        self._pending_policy = policy
        self._pending_router = router
        self._tracks_prefixes = False
        self._update_prefix_tracking()
        self._max_retries = max_retries
        self._session: aiohttp.ClientSession | None = None
        self._kv_hub: Any = None  # sim.engine.KVTransferHub, created with the first sim engine
        self._loops: list[asyncio.Task[None]] = []
        self._policy_changed = asyncio.Event()
        """Set when the policy is switched (the tick loop waits for one with a ``tick``)."""
        self._closing: set[asyncio.Task[None]] = set()  # clients of removed instances
        self._forget_counts: dict[tuple[str, str], asyncio.TimerHandle] = {}
        """Removed instances' counter series that go later (:data:`REMOVED_COUNTS_KEEP_S`),
        by instance id and the model it served then."""
        self._forget_models: dict[str, asyncio.TimerHandle] = {}
        """Models no instance serves any more, whose series go later (the same delay)."""
        self._embeds: set[asyncio.Task[dict[str, Any]]] = set()
        """Embedding calls in flight (not requests: :meth:`stop` drains them beside)."""
        self._deadlines: DeadlineTimers | None = None
        self._instance_tasks: dict[str, list[asyncio.Task[None]]] = {}
        self._given_clients: set[str] = set()
        """Instances whose engine client was given to :meth:`register_instance`."""
        self._reserved_ids: set[str] = set()
        """Request ids held by :meth:`reserve_request_id`."""
        self._closed_given: set[str] = set()
        """Of those, the ones whose client :meth:`stop` closed (start() refuses them)."""
        self._running = False
        self._accepting = False
        self._started_at = 0.0
        self._run_s = 0.0
        """Seconds the control plane ran before its current run (rates are per running
        second, over every run since it was made, as its counts are)."""
        self._stopped: datetime | None = None
        """When it last stopped: the timestamp of figures read while it is stopped."""
        self._metrics.set_policy(policy_label(policy), POLICY_NAMES)

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def clock(self) -> Clock:
        """The clock given, else that of the loop it runs on (virtual on a virtual loop).
        Read outside any loop (figures asked for before the first start), the process's
        monotonic clock, which a real loop would use too; the choice waits for a loop."""
        if self._clock is None:
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                return RealClock()
            self._clock = current_clock()
        return self._clock

    @property
    def is_running(self) -> bool:
        return self._running

    @property
    def is_accepting(self) -> bool:
        """Running and taking new requests (False once :meth:`stop` began: while it drains
        the requests in flight, new ones are refused)."""
        return self._running and self._accepting

    async def start(self) -> None:
        """Start the dispatch loop and the per-instance health/stats loops. After
        :meth:`stop` it starts again, with new engine clients for the instances whose
        clients it made; an instance registered with a client of the caller's, which
        ``stop()`` closed, must be registered again with a new one first
        (:class:`ConflictError` otherwise)."""
        if self._running:
            return
        closed = sorted(i for i in self._closed_given if i in self._registry)
        if closed:
            raise ConflictError(
                f"the engine client given for instance(s) {', '.join(closed)} was closed when "
                "the control plane stopped: unregister_instance() and register_instance() them "
                "again with a new client before start()"
            )
        for state in self._registry:  # first: a failing engine_factory starts nothing
            self._ensure_client(state)
        clock = self.clock
        # without the probe loops nothing would bring an ejected instance back: requests'
        # failures are then retried elsewhere but eject nothing
        health = self._monitor() if self.enable_monitoring else None
        timeouts = self.engine_timeouts
        self._dispatcher = Dispatcher(
            registry=self._registry,
            policy=self._pending_policy,
            router=self._pending_router,
            clock=clock,
            metrics=self._metrics,
            prefix_index=self._prefix,
            finished=self._finished,
            last_instances=self._last_instances,
            max_retries=self._max_retries,
            on_instance_idle=self._on_instance_idle,
            pd=self._pd,
            health=health,
            first_token_timeout_s=timeouts.first_token_s,
            idle_timeout_s=timeouts.idle_s,
            max_queue_wait_s=self.max_queue_wait_s,
            seed=self._seed,
            stream_sample=self.engine_stream_sample if self.engine_stream == "sampled" else 0.0,
            stream_sample_gap_s=(
                1.0 / self.engine_stream_sample_max_per_s
                if self.engine_stream_sample_max_per_s
                else 0.0
            ),
            lora_slot_routing=self.lora_slot_routing,
        )
        self._started_at = clock.now()
        self._deadlines = DeadlineTimers(asyncio.get_running_loop())
        self._running = True
        self._accepting = True
        self._loops.append(asyncio.create_task(self._dispatcher.run(), name="sage-dispatch"))
        self._policy_changed = asyncio.Event()  # of this loop (a manager may be restarted)
        self._loops.append(asyncio.create_task(self._policy_ticks(), name="sage-policy-tick"))
        for state in self._registry:
            self._start_instance_loops(state)
        self._dispatcher.wake()
        simulated = sum(1 for state in self._registry if self.simulates(state.instance))
        log.info(
            "control plane started: policy=%s routing=%s instances=%d (%d simulated in this "
            "process) mode=%s",
            self._pending_policy.name,
            self._routing_name,
            len(self._registry),
            simulated,
            self.mode,
        )

    async def stop(
        self, drain_timeout_s: float = 0.0, *, hurry: asyncio.Event | None = None
    ) -> None:
        """Stop accepting, optionally let queued and running requests finish for up to
        ``drain_timeout_s`` (or until ``hurry`` is set), then cancel whatever is left (each
        request ends CANCELLED with the reason "control plane stopped") and close engine
        clients."""
        if not self._running:
            return
        self._accepting = False
        dispatcher = self._require_dispatcher()
        draining: list[asyncio.Future[Any]] = [r.future for r in dispatcher.records.values()]
        draining += self._embeds
        if drain_timeout_s > 0 and draining and not (hurry and hurry.is_set()):
            waits: asyncio.Future[Any] = asyncio.gather(
                *(asyncio.shield(f) for f in draining), return_exceptions=True
            )
            hurried = asyncio.ensure_future(hurry.wait()) if hurry is not None else None
            watched: list[asyncio.Future[Any]] = [waits] if hurried is None else [waits, hurried]
            try:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(drain_timeout_s):
                        await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if hurried is not None:
                    hurried.cancel()
                if not waits.done():
                    waits.cancel()  # the shields: the requests themselves go on
                with contextlib.suppress(asyncio.CancelledError):
                    await waits
        for task in self._loops:
            task.cancel()
        for tasks in self._instance_tasks.values():
            for task in tasks:
                task.cancel()
        await dispatcher.cancel_all_tasks()
        for rec in list(dispatcher.records.values()):
            dispatcher.cancel(rec)
        for call in self._embeds:  # its caller is told the control plane stopped
            call.cancel()
        all_tasks: list[asyncio.Future[Any]] = [*self._loops]
        all_tasks += (t for ts in self._instance_tasks.values() for t in ts)
        all_tasks += self._closing  # removed instances' clients, closing
        all_tasks += self._embeds
        await asyncio.gather(*all_tasks, return_exceptions=True)
        while closing := [task for task in self._closing if not task.done()]:
            # removed instances whose last call ended just now (a cancelled embeddings
            # call's): their clients close too
            await asyncio.gather(*closing, return_exceptions=True)
        for (instance_id, model), handle in self._forget_counts.items():
            handle.cancel()  # a removed instance's series of the model it served then go,
            self._metrics.forget_instance_counts(instance_id, model)  # and, its id not
            if self._registry.find(instance_id) is None:  # registered again, the rest
                self._metrics.forget_instance_counts(instance_id)
        self._forget_counts.clear()
        for model, handle in self._forget_models.items():
            handle.cancel()
            self._metrics.forget_model(model)
        self._forget_models.clear()
        self._loops.clear()
        self._instance_tasks.clear()
        if self._deadlines is not None:
            self._deadlines.close()
            self._deadlines = None
        released = getattr(self._pd.connector, "wait_released", None) if self._pd else None
        if released is not None:  # KV releases of cancelled PD requests, through the clients
            await released()
        for state in self._registry:
            with contextlib.suppress(Exception):
                await state.client.aclose()
            if state.instance_id in self._given_clients:
                self._closed_given.add(state.instance_id)
            else:  # made again by the next start()
                state.client = _UnconnectedClient(state.instance)
        if self._session is not None:
            await self._session.close()
            self._session = None
        now = self.clock.now()
        self._run_s += now - self._started_at
        self._stopped = self.clock.to_datetime(now)
        self._running = False
        log.info("control plane stopped")

    async def __aenter__(self) -> ControlPlaneManager:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- instances -------------------------------------------------------------------------

    def register_instance(
        self, instance: ExecutionInstance, client: EngineClient | None = None
    ) -> None:
        """Add an instance (before or after start). ``client`` overrides how it is reached;
        such a client is the caller's: :meth:`stop` closes it, and the instance must be
        registered again with a new one before the next :meth:`start`. Raises
        :class:`ConflictError` for an id in use, also by an instance still being removed
        (its requests in flight finish first), and, for an instance reached at its address
        (no ``client`` given; not simulated mode nor ``engine = "sim"``), for the
        ``host:port`` of another such instance (one engine would count as two).

        The instance is first checked as a config file's instance entry is
        (:func:`sage_llm.config.check_instance`): a bad field raises :class:`ConfigError`
        naming the field and the instance, and an ``instance_type`` given as a string
        (``"PREFILLING"``, ``"prefill"``) is parsed and stored on the instance.
        ``is_healthy`` false is not kept (health is measured: probes eject an instance that
        is down), and ``is_available`` false registers it drained (:meth:`drain_instance`
        with false lets it take requests): as flags of their own they would keep it from
        every request for good, whatever its probes said."""
        check_instance(instance)
        known = self._registry.find(instance.instance_id)
        if known is not None and known.removed:
            raise ConflictError(
                f"instance {instance.instance_id!r} is being removed: its "
                f"{known.in_flight} request(s) in flight finish first; register it again after"
            )
        if known is not None:
            raise ConflictError(f"instance {instance.instance_id!r} is already registered")
        if self._reached_at_address(instance, client is not None):  # one engine as two
            address = (reached_key(instance.host), instance.port)
            theirs = self._given_clients
            for other in self._registry:
                if (reached_key(other.instance.host), other.instance.port) == address and (
                    self._reached_at_address(other.instance, other.instance_id in theirs)
                ):
                    raise ConflictError(
                        f"{instance.host}:{instance.port} is already the address of instance "
                        f"{other.instance_id!r}"
                    )
        if self._pd is not None and not self.nominal(instance):
            self._check_pd_engine(instance)
        given = client is not None
        if client is None and self.simulates(instance):
            client = self._make_sim_client(instance)
        made = None  # running: its client first, so that nothing is registered if that fails
        if client is None and self._running:
            made = self._new_client(instance)
        if given:
            self._given_clients.add(instance.instance_id)
        priors = self._priors(instance, client)
        state = self._registry.add(instance, client or made or _UnconnectedClient(instance), priors)
        counted = self._forget_counts.pop((instance.instance_id, instance.model_name), None)
        if counted is not None:  # registered again: its counters go on from where they were
            counted.cancel()  # (those of another model it served go when their time is up)
        served = self._forget_models.pop(instance.model_name, None)
        if served is not None:
            served.cancel()
        state.registered_at = self._elapsed()
        if not instance.is_available:
            instance.is_available, state.draining = True, True
        instance.is_healthy = True
        self._monitor().attach(state)
        self._update_prefix_tracking()
        if self._running:
            self._ensure_client(state)
            self._start_instance_loops(state)
            self._require_dispatcher().wake()
        log.info("registered instance %s (%s)", instance.instance_id, instance.model_name)

    def _check_pd_engine(self, instance: ExecutionInstance) -> None:
        """As a config file's instances are checked (``pd.connector`` against each engine
        of a model served disaggregated): :class:`ConfigError` naming ``engine`` when the
        instance, or another of its model on an engine of its own, could not take the PD
        connector's hand-off once it is registered."""
        assert self._pd is not None
        connector = self._pd.connector.name
        model = instance.model_name
        peers = [
            s.instance for s in self._registry if not s.removed and s.instance.model_name == model
        ]
        if not any(i.instance_type in PD_LEG_ROLES for i in (instance, *peers)):
            return  # its model's requests run whole
        peers = [i for i in peers if not self.nominal(i)]  # (simulated ones speak both)
        problem = pd_engine_problem(instance.instance_type, instance.engine, connector)
        where = f"instance {instance.instance_id!r}"
        if problem is None and instance.instance_type in PD_LEG_ROLES:  # others take legs now
            for other in peers:
                found = pd_engine_problem(other.instance_type, other.engine, connector)
                if found is not None:
                    problem = f"instance {other.instance_id!r} of its model: {found}"
                    break
        if problem is not None:
            raise ConfigError(problem, location=where, key="engine")

    def _reached_at_address(self, instance: ExecutionInstance, given: bool) -> bool:
        """Whether ``instance`` is reached at its ``host:port``: not through a client of
        the caller's (``given``), and its address not nominal (simulated mode or engine,
        whoever makes its client: ``engine_factory`` too)."""
        return not given and not self.nominal(instance)

    def nominal(self, instance: ExecutionInstance) -> bool:
        """Whether ``instance``'s address and engine are nominal: simulated mode or an
        ``engine = "sim"`` instance, as a config file's check reads them (an
        ``engine_factory`` may make their clients)."""
        return self.mode == "simulated" or instance.engine == "sim"

    def unregister_instance(self, instance_id: str) -> None:
        """Remove an instance: it gets no new requests; requests in flight finish first.
        Raises :class:`InstanceNotFoundError` for an unknown id and :class:`ConflictError`
        for an instance already being removed (its requests in flight still running)."""
        state = self._registry.get(instance_id)
        if state.removed:
            raise ConflictError(
                f"instance {instance_id!r} is already being removed: its {state.in_flight} "
                "request(s) in flight finish first"
            )
        state.removed = True
        log.info(
            "removing instance %s (%d requests in flight finish first)",
            instance_id,
            state.in_flight,
        )
        self._update_prefix_tracking()
        self._prefix.remove_instance(instance_id)
        # its probes go on while requests are in flight on it: a hung engine is still
        # ejected and its calls moved, not left to the requests' time limits
        if state.in_flight == 0:
            self._discard(state)
        if self._running and self._dispatcher is not None:
            self._fail_unservable()
            self._dispatcher.wake()

    def drain_instance(self, instance_id: str, draining: bool = True) -> None:
        """Stop (or resume) sending new requests to an instance; in-flight ones finish."""
        if not isinstance(draining, bool):
            raise ConfigError(f"must be true or false, got {draining!r}", key="draining")
        state = self._registry.get(instance_id)
        if state.removed:
            raise ConflictError(
                f"instance {instance_id!r} is being removed: its {state.in_flight} "
                "request(s) in flight finish first"
            )
        if state.draining != draining:
            log.info(
                "instance %s %s (%d requests in flight)",
                instance_id, "draining" if draining else "no longer draining", state.in_flight,
            )  # fmt: skip
        state.draining = draining
        if self._dispatcher is not None:
            if draining and self._running:
                self._fail_unservable()  # queued ones no instance will take now
            self._dispatcher.wake()

    def get_instances(self, *, removing: bool = False) -> list[ExecutionInstance]:
        """The registered instances, with their live figures; with ``removing``, also
        those being removed (:meth:`unregister_instance`) whose requests in flight have
        not finished yet."""
        elapsed = self._elapsed()
        return [
            s.public_instance(elapsed - s.registered_at)
            for s in self._registry
            if removing or not s.removed
        ]

    def servable_models(self) -> list[str]:
        """The models a request could run for now: an instance that runs whole requests is
        up (healthy and accepting), or, for a PD fleet, a prefill and a decode instance."""
        registry, out = self._registry, []
        pd = self.enable_pd_separation and self.pd_config.enabled
        for model in sorted(registry.models()):
            _, whole = registry.up_kinds(model)
            if whole or (pd and pair_exists(registry.up_members(model))):
                out.append(model)
        return out

    async def check_health(self) -> dict[str, bool]:
        """Probe every instance now, as the health loop does (each outcome counts with the
        instance's circuit breaker: an instance never seen healthy that fails is ejected at
        once), and return which answered healthy. Probes run side by side, each bounded by
        the health ``timeout_s``. Before its first probe an instance counts as healthy in
        :meth:`get_instances`; this asks. With ``enable_monitoring`` off it only asks: no
        answer ejects an instance, as no probe loop would bring it back."""
        self._require_dispatcher()
        monitor = self._monitor()
        states = [s for s in self._registry if not s.removed]
        if not self.enable_monitoring:
            asked = await asyncio.gather(*(monitor.ask(s) for s in states))
            return {s.instance_id: ok for s, (ok, _) in zip(states, asked, strict=True)}
        answers = await asyncio.gather(*(monitor.probe(s) for s in states))
        return {s.instance_id: ok for s, ok in zip(states, answers, strict=True)}

    def context_length(self, model: str) -> int | None:
        """The longest context (``max_model_len``, tokens) every instance of ``model`` that
        has said serves: the least of theirs; None when none has said."""
        known = [
            s.context_length
            for s in self._registry
            if not s.removed and s.instance.model_name == model and s.context_length
        ]
        return min(known) if known else None

    async def engine_stats(self, instance_id: str) -> EngineStats:
        """Fresh load figures straight from an instance's engine."""
        return await self._registry.get(instance_id).client.stats()

    def get_instance_metrics(self, instance_id: str) -> dict[str, Any]:
        """One instance's live state as a dict (the admin API's ``live`` figures); see
        :meth:`get_instance_report` for the typed report. Its LoRA slots: ``max_lora``
        (the engine's ``--max-loras``, None when it does not say), ``lora_slots_left``,
        the calls in flight by adapter, and the adapters of another client's requests the
        engine's stats listed (see :meth:`InstanceState.lora_slots_left`). Raises
        :class:`InstanceNotFoundError` for an unknown id."""
        state = self._registry.get(instance_id)
        stats = state.last_stats
        return {
            "instance_id": instance_id,
            "model": state.instance.model_name,
            "role": state.instance.instance_type.value,
            "is_healthy": state.routable,
            "draining": state.draining or state.removed,
            "removing": state.removed,
            "active_requests": state.in_flight,
            "max_concurrent_requests": state.instance.max_concurrent_requests,
            "current_load": state.in_flight / state.instance.max_concurrent_requests,
            "completed_requests": state.completed,
            "failed_requests": state.failed_requests,
            "failed_calls": state.failed_calls,
            "tokens_generated": state.tokens_generated,
            "kv_cache_usage": stats.kv_usage if stats else None,
            "engine_running": stats.running if stats else None,
            "engine_waiting": stats.waiting if stats else None,
            "prefix_cache_hit_rate": stats.prefix_hit_rate if stats else None,
            "est_tpot_ms": state.est_tpot_s * 1000.0,
            "est_prefill_tokens_per_s": 1.0 / state.est_s_per_prefill_token,
            "est_chunk_tokens_per_s": 1.0 / state.est_s_per_chunk_token,
            "circuit": state.breaker.describe(self.clock.now()),
            "max_lora": stats.max_lora if stats and stats.max_lora else None,
            "lora_slots_left": state.lora_slots_left(),
            "lora_calls_in_flight": dict(sorted(state.lora_in_flight.items())),
            "lora_other_adapters": sorted(state.lora_others),
        }

    # -- requests --------------------------------------------------------------------------

    async def submit_request(self, request: RequestMetadata) -> str:
        """Validate, admit and queue a request; returns its id. Raises on refusal."""
        return self._submit(request, stream=False).request_id

    @contextlib.contextmanager
    def reserve_request_id(self, request_id: str) -> Iterator[None]:
        """Hold ``request_id`` for a request its caller runs as several under other ids (the
        gateway runs a completions request with several prompts as ``{id}#0``, ``{id}#1``…),
        or outside the queue (an embeddings call):
        while it is held, a request submitted with it, or a second reservation, is a
        :class:`ConflictError`, as for a request in progress."""
        dispatcher = self._require_dispatcher()
        if request_id in dispatcher.records or request_id in self._reserved_ids:
            raise ConflictError(
                f"request {request_id!r} is already in progress", param="request_id"
            )
        self._reserved_ids.add(request_id)
        try:
            yield
        finally:
            self._reserved_ids.discard(request_id)

    async def wait_for_result(
        self,
        request_id: str,
        timeout: float | None = None,  # noqa: ASYNC109 - the seed API takes a timeout
        *,
        raise_failure: bool = False,
    ) -> RequestResult:
        """Wait until the request ends and return its result (also when it failed or was
        cancelled: check ``result.status``). Raises DeadlineExceededError on ``timeout``;
        the request itself goes on.

        With ``raise_failure`` a request that did not complete raises instead, as
        :meth:`collect` does: an engine's refusal of the request as
        :class:`~sage_llm.errors.EngineRequestRejectedError` (an ``InvalidRequestError``
        naming the field), a deadline as ``DeadlineExceededError``, another failure as
        ``EngineError``, a cancellation as ``RequestCancelledError``
        (``ControlPlaneNotRunningError`` when :meth:`stop` cancelled it)."""
        timeout = time_limit_arg(timeout, "timeout")
        rec = self._in_progress().get(request_id)
        if rec is None:
            now = self.clock.now()
            done = self._finished.get(request_id, now)
            if done is None:
                raise RequestNotFoundError(f"no request {request_id!r} (unknown or expired)")
            if raise_failure:
                error = self._finished.failure(request_id) or failure_error(
                    done, None, cancelled=True
                )
                if error is not None:
                    raise error
            return done
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
            # of the caller that races with the result
            async with asyncio.timeout(timeout):
                result = await asyncio.shield(rec.future)
        except TimeoutError:
            raise DeadlineExceededError(
                f"request {request_id!r} did not finish within {timeout} s"
            ) from None
        if raise_failure:
            self._raise_failure(rec, cancelled=True)
        return result

    async def generate(self, request: RequestMetadata) -> RequestResult:
        """Submit and wait: the result of one request."""
        rid = await self.submit_request(request)
        return await self.wait_for_result(rid)

    async def stream(self, request: RequestMetadata) -> AsyncIterator[Chunk]:
        """Submit a request and yield its chunks as the engine produces them. Closing the
        iterator early cancels the request. A failure raises after the last chunk, and so
        does a cancellation from elsewhere: :class:`RequestCancelledError` after
        :meth:`cancel_request`, :class:`ControlPlaneNotRunningError` after :meth:`stop`.

        When nothing else is queued and the policy lets the request skip the queue
        (``fifo``, ``priority``, ``cost_optimized``), and it starts on an engine whose
        client yields its chunks a read at a time (the HTTP client: ``generate_batches``),
        the engine is read by the task iterating this stream, as it asks for the next
        chunks, with no task of its own: chunks are not read ahead of the consumer, and
        cancelling the iterating task cancels the request. Otherwise a task of its own
        reads the engine, and its chunks wait here for the consumer."""
        async with contextlib.aclosing(self.stream_batches(request)) as batches:
            async for batch in batches:
                for chunk in batch:
                    yield chunk

    async def stream_batches(self, request: RequestMetadata) -> AsyncGenerator[list[Chunk], None]:
        """:meth:`stream`, but each item is every chunk that had arrived by then (at least
        one), in order: a relay writes what is there in one go and waits for nothing."""
        dispatcher = self._require_dispatcher()
        lone = dispatcher.takes_lone()  # then started here, not by the dispatcher's next pass
        rec = self._submit(request, stream=True, wake=not lone, queue=not lone)
        state = None
        if lone:
            try:
                state = dispatcher.start_here(rec, queued=False, stream=True)
            except Exception as exc:  # a plugin's bug: the request ends, with the reason
                dispatcher.fail_queued(rec, internal_error(exc))
                raise
            if rec.status is RequestStatus.QUEUED:
                dispatcher.wake()
        channel = rec.stream
        assert channel is not None
        finished = False
        try:
            if state is not None:  # the engine call runs in this task
                async with contextlib.aclosing(dispatcher.stream_here(rec, state)) as here:
                    async for chunks in here:
                        yield chunks
                finished = rec.status.is_terminal  # else queued again, for a retry
            while not finished:
                batch: list[Chunk] = []
                for item in await channel.take():
                    if isinstance(item, StreamEnd):
                        finished = True
                        break
                    batch.append(item)
                if batch:
                    yield batch
            self._raise_failure(rec, cancelled=True)
        finally:
            if not finished:  # (after stop() it has ended: cancel says so, and raises not)
                dispatcher.cancel(rec)

    def time_limit(
        self, timeout_s: float | None, on_expire: Callable[[], object] | None = None
    ) -> TimeLimit:
        """``async with manager.time_limit(timeout_s):`` raises :class:`TimeoutError` out
        of a block that runs longer than ``timeout_s`` (None: no limit), as
        :func:`asyncio.timeout` does, on the deadline timers the manager's requests share
        (at most 0.1% or 1 ms late; see :mod:`~sage_llm.control_plane.deadlines`);
        ``on_expire()`` is called as the limit passes, before the block is cancelled. The
        gateway bounds a stream's relay with it."""
        return TimeLimit(self._deadlines, time_limit_arg(timeout_s, "timeout_s"), on_expire)

    async def collect(
        self, request: RequestMetadata, timeout_s: float | None = None
    ) -> tuple[list[Chunk], RequestResult]:
        """Submit a request and wait for its end: every chunk the engine produced, in
        order, and the result. A failure raises, as at the end of :meth:`stream`: a
        cancellation (:meth:`cancel_request`) as :class:`RequestCancelledError`, one by
        :meth:`stop` as :class:`ControlPlaneNotRunningError`, never as a partial answer;
        cancelling the caller cancels the request. Cheaper than draining :meth:`stream`
        when nothing is relayed before the end (one wake-up, not one per batch).

        When nothing else is queued it is dispatched at once, and when that starts it on a
        whole-request instance its engine call runs in the caller's task
        (:meth:`Dispatcher.start_here`). ``timeout_s`` limits the whole request: once it
        passes (at most 0.1% or 1 ms later, see :mod:`~sage_llm.control_plane.deadlines`)
        the request is cancelled and :class:`DeadlineExceededError` raised."""
        timeout_s = time_limit_arg(timeout_s, "timeout_s")  # before the request is taken
        dispatcher = self._require_dispatcher()
        lone = dispatcher.takes_lone()  # then started without the queue's round trip
        rec = self._submit(request, stream=False, collect=True, wake=False, queue=not lone)
        waiter = rec.waiter = asyncio.get_running_loop().create_future()
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            assert timeout_s is not None
            rec.cancel_reason = timed_out(timeout_s)
            dispatcher.cancel(rec)

        deadlines = self._deadlines
        at = None if timeout_s is None or deadlines is None else deadlines.add(timeout_s, expire)
        try:
            if lone:
                state = dispatcher.start_here(rec, queued=False)
            else:
                state = dispatcher.start_here(rec) if len(dispatcher.policy) == 1 else None
            if state is None:
                dispatcher.wake()
            else:
                await dispatcher.execute_here(rec, state)
            result = await waiter  # already there when the call ran here (and did not retry)
        except BaseException:
            if not rec.future.done():
                dispatcher.cancel(rec)
            raise
        finally:
            if at is not None:
                deadlines.discard(at, expire)  # type: ignore[union-attr]
        if expired and result.status is RequestStatus.CANCELLED:
            assert timeout_s is not None
            raise DeadlineExceededError.request_timed_out(rec.request_id, timeout_s)
        self._raise_failure(rec, cancelled=True)  # its chunks are not a whole answer
        return rec.chunks or [], result

    @staticmethod
    def _raise_failure(rec: RequestRecord, *, cancelled: bool = False) -> None:
        """At the end of a stream (or of :meth:`collect`): raise the request's failure, if
        it failed, and with ``cancelled`` :class:`RequestCancelledError` if it was
        cancelled by :meth:`cancel_request` (:class:`ControlPlaneNotRunningError` by
        :meth:`stop`; not when its consumer closed the stream): a stream cut short never
        ends as if it were whole (see :func:`failure_error`)."""
        result = rec.result
        if result is None:
            if rec.status is RequestStatus.FAILED:  # a bug ended it before its result
                raise SageLLMError(rec.error or "internal error")
            return
        error = failure_error(result, rec.exception, cancelled=cancelled)
        if error is not None:
            raise error from rec.exception

    async def load_lora_adapter(
        self,
        name: str,
        path: str,
        *,
        model: str | None = None,
        instances: Sequence[str] | None = None,
    ) -> dict[str, str | None]:
        """Load the LoRA adapter at ``path`` as ``name`` on the ``instances`` given, or on
        every instance of ``model`` (by default the only model served), side by side
        (vLLM's ``POST /v1/load_lora_adapter``); each that loads it serves it from then on.
        Returns, by instance, None where it loaded, else why not (its engine's refusal, or
        an engine that cannot load adapters at run time). A bad name, path, model or
        instance is an :class:`InvalidRequestError` (unknown ones, 404s), before any call."""
        self._require_dispatcher()
        for value, param in ((name, "lora_name"), (path, "lora_path")):
            if type(value) is not str or not value:
                raise InvalidRequestError(f"{param} must be a non-empty string", param=param)
        if (problem := name_problem(name)) is not None:
            raise InvalidRequestError(f"lora_name {problem}", param="lora_name")
        registry = self._registry
        if registry.serves(name):
            raise InvalidRequestError(
                f"lora_name {name!r} is a model served here, not an adapter", param="lora_name"
            )
        if instances is None:
            models = registry.models()
            if model is None and len(models) > 1:
                raise InvalidRequestError(
                    "give the model (or the instances) to load it on: several models are "
                    f"served ({', '.join(sorted(models))})",
                    param="model",
                )
            chosen = resolve_model(RequestMetadata(request_id="lora", model_name=model), models)
            states = [s for s in registry if s.instance.model_name == chosen and not s.removed]
        else:
            states = self._lora_targets(instances)
        base = registry.adapter_base(name)
        if base is not None and any(s.instance.model_name != base for s in states):
            raise InvalidRequestError(
                f"LoRA adapter {name!r} is served on model {base!r}: load it on that model's "
                "instances only",
                param="instances" if instances is not None else "model",
            )

        def loaded(state: InstanceState) -> None:
            state.adapters = state.adapters | {name}

        return await self._lora_calls(states, lambda c: c.load_lora_adapter(name, path), loaded)

    async def unload_lora_adapter(
        self, name: str, *, instances: Sequence[str] | None = None
    ) -> dict[str, str | None]:
        """Unload the LoRA adapter ``name`` from the ``instances`` given, or from every
        instance serving it (vLLM's ``POST /v1/unload_lora_adapter``); each that unloads it
        no longer serves it (nor keeps it among its ``lora_adapters``). Returns, by
        instance, None where it was unloaded, else why not;
        :class:`~sage_llm.errors.ModelNotFoundError` when no instance serves it."""
        self._require_dispatcher()
        if type(name) is not str or not name:
            raise InvalidRequestError("lora_name must be a non-empty string", param="lora_name")
        registry = self._registry
        if instances is None:
            states = [s for s in registry if name in s.adapters and not s.removed]
            if not states:
                raise ModelNotFoundError(f"no instance serves LoRA adapter {name!r}",
                                         param="lora_name")  # fmt: skip
        else:
            states = self._lora_targets(instances)

        def unloaded(state: InstanceState) -> None:
            state.adapters = state.adapters - {name}
            if name in state.instance.lora_adapters:  # else the next reading brings it back
                state.instance.lora_adapters.remove(name)

        return await self._lora_calls(states, lambda c: c.unload_lora_adapter(name), unloaded)

    def _lora_targets(self, instances: Sequence[str]) -> list[InstanceState]:
        if isinstance(instances, str) or not all(type(i) is str for i in instances):
            raise InvalidRequestError("instances must be a list of instance ids",
                                      param="instances")  # fmt: skip
        if not instances:
            raise InvalidRequestError("instances must not be empty", param="instances")
        states = []
        for iid in dict.fromkeys(instances):
            state = self._registry.find(iid)
            if state is None or state.removed:
                raise InstanceNotFoundError(f"no instance {iid!r} is registered")
            states.append(state)
        return states

    async def _lora_calls(
        self,
        states: Sequence[InstanceState],
        call: Callable[[LoadsAdapters], Awaitable[None]],
        done: Callable[[InstanceState], None],
    ) -> dict[str, str | None]:
        """``call`` on each instance's engine client side by side; ``done(state)`` for each
        that succeeded, whose stats are then read again (its LoRA slots changed); by
        instance, None or the reason it did not."""

        async def one(state: InstanceState) -> str | None:
            client = state.client
            if not isinstance(client, LoadsAdapters):
                return f"engine {state.instance.engine!r} cannot load LoRA adapters at run time"
            try:
                async with asyncio.timeout(self.health_settings.timeout_s * 10):
                    await call(client)
            except TimeoutError:
                return "the engine did not answer in time"
            except SageLLMError as exc:
                return exc.message
            done(state)
            if self._health is not None:
                await self._health.read_stats(state)
            return None

        outcomes = await asyncio.gather(*(one(s) for s in states))
        return {s.instance_id: outcome for s, outcome in zip(states, outcomes, strict=True)}

    async def embed(
        self,
        model: str | None,
        inputs: list[str] | list[list[int]],
        options: Mapping[str, Any] | None = None,
        *,
        request_id: str | None = None,
    ) -> dict[str, Any]:
        """Embeddings from an instance serving ``model`` (the least busy healthy one), of
        ``inputs``: texts, or token-id lists; ``options`` are the request's other fields
        (``encoding_format``, ``dimensions`` …), passed to the engine as they are;
        ``request_id`` goes to the engine (an HTTP engine's ``X-Request-Id``), and is in use while
        the call runs (:class:`ConflictError` for one in use by a request or a call).

        Returns the engine's OpenAI-style JSON (``{"data": [{"embedding": [...]}], ...}``).
        While :meth:`stop` drains, new calls are refused and those in flight get its drain
        time, as requests do; one still running after it raises
        :class:`ControlPlaneNotRunningError`.
        """
        self._require_dispatcher()
        if not self._accepting:
            raise ControlPlaneNotRunningError("the control plane is shutting down")
        if not isinstance(inputs, list) or not inputs or not all(map(_embeddable, inputs)):
            negative = isinstance(inputs, list) and any(
                isinstance(item, list) and any(isinstance(t, int) and t < 0 for t in item)
                for item in inputs
            )
            raise InvalidRequestError(
                "input: token ids must be >= 0"
                if negative
                else "input must be a non-empty list of strings or of non-empty token-id lists",
                param="input",
            )
        name = resolve_model(
            RequestMetadata(request_id="embed", model_name=model), self._registry.models()
        )
        with contextlib.ExitStack() as held:  # its id, as a request's, is in use while it runs
            if request_id is not None:
                held.enter_context(self.reserve_request_id(request_id))  # ConflictError if not
            # the whole call (its retries too) in a task of its own, which stop() drains as
            # it drains requests, and cancels once the drain time is over
            call = asyncio.ensure_future(self._embed_retried(name, inputs, options, request_id))
            self._embeds.add(call)
            try:
                return await call
            except asyncio.CancelledError:
                caller = asyncio.current_task()
                if call.cancelled() and not (caller and caller.cancelling()):
                    raise ControlPlaneNotRunningError("control plane stopped") from None
                raise  # the caller's own cancellation (which cancelled the call too)
            finally:
                self._embeds.discard(call)

    async def _embed_retried(
        self,
        name: str,
        inputs: list[str] | list[list[int]],
        options: Mapping[str, Any] | None,
        request_id: str | None,
    ) -> dict[str, Any]:
        """:meth:`embed` on the least busy healthy instance of ``name``; a failure of the
        instance's (a connection error, a 5xx, 408 or 429: ``retryable``) counts against
        its health and is retried on another, at most ``max_retries`` times, as a
        request's engine call is. Each call's outcome is counted on the instance that
        ended it."""
        dispatcher = self._require_dispatcher()
        tried: set[str] = set()
        failure: EngineError | None = None
        while True:
            state = self._embedder(name, tried)
            if state is None:
                if failure is not None:  # no other instance to try: the last failure
                    raise failure
                serving = [
                    _embeds(s) for s in self._registry
                    if s.instance.model_name == name and not s.removed
                ]  # fmt: skip
                if not any(serving):
                    raise InvalidRequestError(
                        f"model {name!r} is not served by an engine that supports embeddings",
                        param="model",
                    )
                # those that serve them are all down: as a generation request is refused
                # (said of them alone when the model has others)
                what = None if all(serving) else f"embeddings of {name!r}"
                label, why = self._registry.down(name, _embeds, what=what)
                self._metrics.on_rejected(label, name)
                raise NoHealthyInstanceError(
                    why, retry_after_s=self._registry.back_in(name, self.clock.now(), _embeds)
                )
            outcome = "failed"
            try:
                answer = await self._embed_on(state, name, inputs, options, request_id)
                outcome = "completed"
                return answer
            except EngineError as exc:
                if exc.retryable and len(tried) < dispatcher.max_retries:
                    tried.add(state.instance_id)
                    if self._embedder(name, tried) is not None:
                        outcome = ""  # not the call's end: it goes on elsewhere
                        failure = exc
                        self._metrics.retries.inc()
                        log.warning(
                            "embeddings call on %s failed (%s); retrying on another instance",
                            state.instance_id, exc,
                        )  # fmt: skip
                        continue
                raise
            except (asyncio.CancelledError, ControlPlaneNotRunningError):
                outcome = "cancelled"
                raise
            finally:
                if outcome:
                    self._metrics.on_embedding(outcome, name, state.instance_id)

    def _embedder(self, name: str, tried: set[str]) -> InstanceState | None:
        """The least busy instance of ``name`` up now (healthy, accepting, not removed)
        whose engine serves embeddings, but those in ``tried`` (None if there is none)."""
        able = [
            s for s in self._registry
            if s.instance.model_name == name and s.healthy and s.accepting
            and not s.removed and s.instance_id not in tried and _embeds(s)
        ]  # fmt: skip
        return min(
            able, key=lambda s: s.in_flight / s.instance.max_concurrent_requests, default=None
        )

    async def _embed_on(
        self,
        state: InstanceState,
        name: str,
        inputs: list[str] | list[list[int]],
        options: Mapping[str, Any] | None,
        request_id: str | None,
    ) -> dict[str, Any]:
        """One embeddings call on ``state``'s engine; its failure counts against the
        instance (as a request's engine call's), not an engine's refusal of the request."""
        client = state.client
        assert isinstance(client, EmbeddingEngineClient)
        dispatcher = self._require_dispatcher()
        state.in_flight += 1
        self._metrics.set_in_flight(state.instance_id, state.in_flight)
        try:  # (its count is given back whatever the call does, a bad client's too)
            answer = await client.embed(name, inputs, options or None, request_id=request_id)
            dispatcher.on_call_success(state)  # (before a removed instance goes, below)
            return answer
        except EngineError as exc:
            refusal = embeddings_refusal(exc, name, f"instance {state.instance_id}")
            if refusal is not None:
                raise refusal from exc
            if isinstance(exc, EngineRequestRejectedError):  # the request's own fault
                exc.reword(f"engine {exc.message}")  # said as a generation's refusal is
            else:
                state.failed_calls += 1
                dispatcher.on_call_failure(state, exc)
            raise
        finally:  # as a generation's call ends: a removed instance goes with its last call
            state.in_flight -= 1
            self._metrics.set_in_flight(state.instance_id, state.in_flight)
            if state.in_flight == 0:
                self._on_instance_idle(state)
            self._wake()

    async def get_request_status(self, request_id: str) -> RequestStatus:
        rec = self._in_progress().get(request_id)
        if rec is not None:
            return rec.status
        done = self._finished.get(request_id, self.clock.now())
        if done is None:
            raise RequestNotFoundError(f"no request {request_id!r} (unknown or expired)")
        return done.status

    async def get_result(self, request_id: str) -> RequestResult | None:
        """The result when the request has ended; None while it is in progress. Raises
        :class:`RequestNotFoundError` for an id it does not know (never submitted, or
        its result is no longer kept: ``result_retention``, ``result_ttl_s``)."""
        if request_id in self._in_progress():
            return None
        done = self._finished.get(request_id, self.clock.now())
        if done is None:
            raise RequestNotFoundError(f"no request {request_id!r} (unknown or expired)")
        return done

    def get_scheduling_decision(self, request_id: str) -> SchedulingDecision | None:
        """Where a placed request went and what the control plane expected of it, as the
        seed's :class:`~sage_llm.types.SchedulingDecision`; None while it is queued, or
        when it ended without running (cancelled, or failed, in the queue).

        ``target_instance_id`` is the instance that ran it (the decode instance of a
        disaggregated request, whose prefill instance is ``prefill_instance_id``), on its
        last attempt (``metadata["attempts"]``); ``estimated_latency_ms`` the predicted
        time from placement to the end (:attr:`RequestResult.predicted_e2e_ms`);
        ``estimated_cost`` that time at the instance's price, plus the predicted prefill
        leg at the prefill instance's price; the parallelism is the instance's, as it was
        when the request ran (TENSOR_PARALLEL of size 1 for one GPU); ``decision_time``
        when it was placed. ``confidence`` is not measured. Raises
        :class:`RequestNotFoundError` for an unknown or expired id (a request refused at
        admission never had one) and :class:`ControlPlaneNotRunningError` before the
        control plane has first started (after :meth:`stop` the results kept stay readable)."""
        now = self.clock.now()
        rec = self._in_progress().get(request_id)
        prefill: ExecutionInstance | None = None
        prefill_s: float | None = None
        if rec is not None:
            if rec.instance_id is None or rec.scheduled_at is None:
                return None
            state = self._registry.get(rec.instance_id)
            inst: ExecutionInstance = state.instance
            prefill_id, placed_at = rec.prefill_instance_id, rec.scheduled_at
            predicted_s, attempts = rec.predicted_e2e_s, rec.attempts
            if prefill_id is not None:
                found = self._registry.find(prefill_id)
                prefill = None if found is None else found.instance
                prefill_s = rec.predicted_prefill_s
        else:
            done = self._finished.get_timed(request_id, now)
            if done is None:
                raise RequestNotFoundError(f"no request {request_id!r} (unknown or expired)")
            finished_at, result, placed = done
            if placed is None:
                return None
            if isinstance(placed, ExecutionInstance):
                inst = placed
            else:
                inst, prefill, prefill_s = (
                    placed.instance,
                    placed.prefill_instance,
                    placed.predicted_prefill_s,
                )
            prefill_id = result.prefill_instance_id
            served_s = (result.e2e_latency_ms - result.queue_wait_ms) / 1000.0
            placed_at, attempts = finished_at - served_s, result.attempts
            predicted = result.predicted_e2e_ms
            predicted_s = None if predicted is None else predicted / 1000.0
        tp, pp, dp = inst.tensor_parallel_size, inst.pipeline_parallel_size, inst.data_parallel_size
        cost = 0.0
        if predicted_s is not None:
            cost = predicted_s * price_per_second(inst)
            if prefill is not None and prefill_s is not None:
                cost += prefill_s * price_per_second(prefill)
        where = (
            f"prefill on {prefill_id}, decode on {inst.instance_id}"
            if prefill_id is not None
            else f"the whole request on {inst.instance_id}"
        )
        return SchedulingDecision(
            request_id=request_id,
            target_instance_id=inst.instance_id,
            parallelism_strategy=ParallelismType.of(tp, pp, dp) or ParallelismType.TENSOR_PARALLEL,
            estimated_latency_ms=0.0 if predicted_s is None else predicted_s * 1000.0,
            estimated_cost=cost,
            tensor_parallel_size=tp,
            pipeline_parallel_size=pp,
            decision_time=self.clock.to_datetime(placed_at),
            reason=where,
            metadata={"attempts": attempts, "data_parallel_size": dp},
            prefill_instance_id=prefill_id,
        )

    async def cancel_request(self, request_id: str) -> bool:
        """Cancel a queued or running request (a running one's engine call is aborted).
        Returns False when the request had already ended (after :meth:`stop` every one
        has); raises :class:`RequestNotFoundError` for an id it does not know (never
        given, or ended so long ago that its result was let go)."""
        rec = self._in_progress().get(request_id)
        if rec is None:
            if self._finished.get(request_id, self.clock.now()) is not None:
                return False
            raise RequestNotFoundError(f"no request {request_id!r} (unknown or expired)")
        return self._require_dispatcher().cancel(rec)

    def note_timed_out(self, request_id: str, timeout_s: float) -> None:
        """Record that ``request_id`` passed its time limit: when its caller then cancels
        it (a relay closing its stream), its error says so rather than "cancelled by the
        caller". Nothing for a request that has ended."""
        dispatcher = self._dispatcher
        rec = None if dispatcher is None else dispatcher.records.get(request_id)
        if rec is not None and not rec.status.is_terminal:
            rec.cancel_reason = timed_out(timeout_s)

    # -- policy ----------------------------------------------------------------------------

    def update_policy(self, name: str, params: Mapping[str, Any] | None = None) -> None:
        """Switch the scheduling policy at run time; queued requests move to the new one."""
        new = build_policy(name, params)
        self._metrics.track_users(weighted_users(new))
        old = self._dispatcher.policy if self._dispatcher else self._pending_policy
        moved = old.drain()  # in the old policy's order: pushed in the order they came,
        if self._dispatcher is not None:  # so that the new one breaks its ties as it would
            submitted = {rid: k for k, rid in enumerate(self._dispatcher.records)}
            moved.sort(key=lambda info: submitted.get(info.request_id, len(submitted)))
        for info in moved:
            new.push(info)
        self._pending_policy = new
        if self._dispatcher is not None:
            self._dispatcher.set_policy(new)
            self._dispatcher.wake()
        self._update_prefix_tracking()
        self._metrics.set_policy(policy_label(new), POLICY_NAMES)
        self._policy_changed.set()
        log.info("scheduling policy switched from %s to %s", old.name, new.name)

    def update_routing(self, name: str, params: Mapping[str, Any] | None = None) -> None:
        """Switch the routing strategy at run time (names as in config files:
        case-insensitive, ``-`` read as ``_``); its random choices follow ``seed``."""
        router = build_router(name, params, seed=self._seed)
        self._routing_name = get_strategy(name).name
        self._pending_router = router
        if self._dispatcher is not None:
            self._dispatcher.router = router
        self._update_prefix_tracking()

    def _router(self) -> Router:
        return self._dispatcher.router if self._dispatcher else self._pending_router

    def _update_prefix_tracking(self) -> None:
        """Decide again whether anything may read requests' prefix-block hashes and the
        prefix index: a router with a prefix scorer (or one that cannot be inspected), a
        policy other than the built-in ones, or PD with a prefill or decode instance
        registered (its decider weighs cached prefixes). When nothing does, requests get no
        block hashes (their prompt is only counted) and the index is not kept: about a
        microsecond per prompt block saved twice, to hash it and to record it, where
        neither could change a decision. Called whenever one of those changes."""
        pd_fleet = self._pd is not None and any(
            s.instance.instance_type in PD_ROLES for s in self._registry if not s.removed
        )
        tracks = pd_fleet or router_wants(self._router())[0] or may_read_block_hashes(self.policy)
        if tracks != self._tracks_prefixes:
            # switched off, what it holds goes stale (requests admitted before still add to
            # it): one switched on starts empty
            self._prefix.clear()
        self._tracks_prefixes = tracks

    @property
    def policy(self) -> SchedulingPolicy:
        return self._dispatcher.policy if self._dispatcher else self._pending_policy

    async def _policy_ticks(self) -> None:
        """Call ``tick(snapshot)`` on the policy in use every ``tick_interval_s``, when it
        has one (``adaptive``: its switch rule follows the fleet while the queue is idle).
        While the policy has none, no timer is set: the loop waits for a switch (a loop on
        virtual time, as a service's can be, then idles rather than jump through them)."""
        while True:
            policy = self.policy
            tick = getattr(policy, "tick", None)
            if tick is None:
                self._policy_changed.clear()
                await self._policy_changed.wait()
                continue
            await asyncio.sleep(getattr(policy, "tick_interval_s", 1.0))
            if policy is self.policy:
                tick(self._registry.snapshot(self.clock.now(), self._prefix))

    # -- observability ---------------------------------------------------------------------

    def get_metrics(self) -> PerformanceMetrics:
        """The seed's :class:`~sage_llm.types.PerformanceMetrics`: request counts since
        start, latency averages and percentiles, SLO compliance, throughput, queue and
        running counts (PD figures in ``metadata["pd"]`` with PD separation on)."""
        disp = self._dispatcher
        queued = disp.queued_depth if disp else len(self._pending_policy)
        active = int(self._metrics.running.value)  # a PD request holds two instances' slots
        states = [s for s in self._registry if not s.removed]
        memory = sum(s.instance.gpu_memory_gb * s.gpu_count for s in states)
        perf = self._metrics.performance(
            active=active, queued=queued, elapsed_s=self._elapsed(), gpu_memory_gb=memory
        )
        usage = [s.last_stats.kv_usage for s in states if s.last_stats is not None]
        perf.avg_gpu_utilization = sum(usage) / len(usage) if usage else 0.0
        perf.timestamp = self._timestamp()
        if self._pd is not None:
            perf.metadata["pd"] = self._metrics.pd_summary()
        return perf

    def get_instance_report(self, instance_id: str) -> InstanceMetrics:
        """One instance's figures as the seed's :class:`~sage_llm.types.InstanceMetrics`:
        requests processed since it was registered (completed here, or ended failed here,
        as ``sage_llm_requests_total`` counts them; cancelled ones are not counted; the
        engine calls that failed here, retried ones included, are ``failed_calls`` in
        ``metadata``), latency percentiles over its latest 512 completed
        requests (arrival to end, the control plane's queue included; a PREFILLING
        instance's are its prefill legs), tokens per second over the time the control
        plane has run since it was registered, load, health, and the engine's latest
        scraped figures in ``metadata``. ``gpu_utilization`` is the
        engine's KV cache usage (engines export no GPU utilization); ``gpu_memory_used_gb``
        is not measured. :meth:`get_instance_metrics` gives the same state as a dict, with
        the latency estimates and the circuit breaker's details. Raises
        :class:`InstanceNotFoundError` for an unknown id."""
        state = self._registry.get(instance_id)
        return state.report(
            running_s=self._elapsed() - state.registered_at,
            timestamp=self._timestamp(),
            to_datetime=self.clock.to_datetime,
        )

    def get_scheduling_metrics(self) -> SchedulingMetrics:
        """The scheduler's figures since start (:meth:`ControlPlaneMetrics.scheduling`
        says what each is): decision time and rate, how far latency predictions were from
        the measured latency, SLO attainment by priority, queue wait percentiles and queue
        length; and how evenly the fleet is loaded now. ``load_balance_variance`` is the
        variance of the up instances' loads (in-flight requests over their
        ``max_concurrent_requests``), ``load_balance_coefficient`` Jain's fairness index
        of the same loads: 1.0 when even, ``1/n`` when one instance of ``n`` carries all."""
        disp = self._dispatcher
        waiting_ms = 0.0  # the queue waits of the requests not ended yet, so far
        if disp is not None and self._running:
            now = self.clock.now()
            for rec in disp.records.values():  # as a result's queue_wait_ms counts it
                waiting_ms += rec.queue_wait_s(now) * 1000.0
        report = self._metrics.scheduling(
            policy=self.policy.name, elapsed_s=self._elapsed(), waiting_ms=waiting_ms
        )
        loads = [
            s.in_flight / max(s.instance.max_concurrent_requests, 1) for s in self._registry if s.up
        ]
        if loads:
            mean = sum(loads) / len(loads)
            report.load_balance_variance = sum((x - mean) ** 2 for x in loads) / len(loads)
            squares = sum(x * x for x in loads)
            report.load_balance_coefficient = (
                sum(loads) ** 2 / (len(loads) * squares) if squares else 1.0
            )
        report.metadata["routing_strategy"] = self._routing_name
        disp = self._dispatcher
        report.metadata["queued_now"] = disp.queued_depth if disp else len(self.policy)
        report.timestamp = self._timestamp()
        return report

    def get_pd_metrics(self) -> PDMetrics | None:
        """Prefill/decode separation figures since start, or None when PD separation is
        off (:meth:`ControlPlaneMetrics.pd` says what each is). The live ones (active
        requests, KV cache usage as ``*_gpu_util``, the prefix cache hit rate) are read
        from the PREFILLING and DECODING instances now."""
        if self._pd is None:
            return None
        report = self._metrics.pd(elapsed_s=self._elapsed())
        prefilling = self._role_load(ExecutionInstanceType.PREFILLING)
        decoding = self._role_load(ExecutionInstanceType.DECODING)
        report.prefilling_active_requests, report.prefilling_gpu_util = prefilling[:2]
        report.decoding_active_requests, report.decoding_gpu_util = decoding[:2]
        queries, hits = prefilling[2] + decoding[2], prefilling[3] + decoding[3]
        report.kv_cache_hit_rate = hits / queries if queries > 0 else 0.0
        report.timestamp = self._timestamp()
        return report

    def _elapsed(self) -> float:
        """Seconds the control plane has run, over all its runs (the rates' divisor)."""
        if not self._running:
            return self._run_s
        return self._run_s + self.clock.now() - self._started_at

    def _timestamp(self) -> datetime:
        """When figures read now were taken: now while running, else when it last
        stopped (the figures have not moved since), else the wall clock."""
        if self._running:
            return self.clock.to_datetime(self.clock.now())
        return self._stopped if self._stopped is not None else datetime.now()

    def _role_load(self, role: ExecutionInstanceType) -> tuple[int, float, float, float]:
        """The instances of ``role`` now: requests in flight, mean KV cache usage, and
        their engines' prefix cache queries and hits."""
        states = [s for s in self._registry if not s.removed and s.instance.instance_type is role]
        stats = [s.last_stats for s in states if s.last_stats is not None]
        return (
            sum(s.in_flight for s in states),
            sum(st.kv_usage for st in stats) / len(stats) if stats else 0.0,
            sum(st.prefix_cache_queries_total for st in stats),
            sum(st.prefix_cache_hits_total for st in stats),
        )

    def get_status(self) -> dict[str, Any]:
        """The control plane's state as a dict: running and accepting, mode, the policy
        (and the adaptive policy's choice and reason), routing, instance and request
        counts, circuits, PD and engine-stream settings (what ``GET /admin/status``
        shows)."""
        policy = self.policy
        states = [s for s in self._registry if not s.removed]
        return {
            "running": self._running,
            "accepting": self._accepting,
            "mode": self.mode,
            "scheduling_policy": policy.name,
            "policy": policy.describe(),
            "routing_strategy": self._routing_name,
            "engine_stream": self.engine_stream,
            "engine_stream_sample": self.engine_stream_sample,
            "engine_stream_sample_max_per_s": self.engine_stream_sample_max_per_s,
            "pd_separation": self.enable_pd_separation,
            "pd": self._pd_status(),
            "pending_requests": (
                self._dispatcher.queued_depth if self._dispatcher else len(policy)
            ),
            "running_requests": int(self._metrics.running.value),
            "registered_instances": len(states),
            "simulated_instances": sum(1 for s in states if self.simulates(s.instance)),
            "available_instances": sum(1 for s in states if s.up),
            "models": sorted(self._registry.models()),
            "lora_adapters": dict(sorted(self._registry.adapters().items())),
            "prefix_index_entries": len(self._prefix),
            "prefix_tracking": self._tracks_prefixes,
            "circuits": {s.instance_id: s.breaker.state.label for s in states},
        }

    def _pd_status(self) -> dict[str, Any]:
        """PD settings and figures for ``get_status()["pd"]``."""
        if self._pd is None:
            return {"enabled": False}
        return {"enabled": True, **self._pd.describe(), **self._metrics.pd_summary()}

    def prometheus_metrics(self) -> bytes:
        """The Prometheus exposition text of this control plane's metrics."""
        # the policy in charge: adaptive switches its inner policy on its own
        self._metrics.set_policy(policy_label(self.policy), POLICY_NAMES)
        metrics = self._metrics
        for state in self._registry:
            iid = state.instance_id
            metrics.instance_healthy.labels(instance_id=iid).set(1.0 if state.healthy else 0.0)
            draining = state.draining or state.removed
            metrics.instance_draining.labels(instance_id=iid).set(1.0 if draining else 0.0)
            metrics.set_in_flight(iid, state.in_flight)  # a series from its registration on
        if self._pd is not None:
            orchestrator = self._pd.orchestrator
            held = {
                s.instance_id: s.instance_id in orchestrator.reserved(s.instance.model_name)
                for s in self._registry
            }
            metrics.set_prefill_reserve(held, orchestrator.holds_started)
        return metrics.exposition()

    @property
    def metrics(self) -> ControlPlaneMetrics:
        return self._metrics

    # -- internals -------------------------------------------------------------------------

    def _in_progress(self) -> Mapping[str, RequestRecord]:
        """The requests in progress, to look one up: none once stopped (every request has
        ended then, and the results kept stay readable: a drain's too);
        :class:`ControlPlaneNotRunningError` before the first :meth:`start`."""
        if self._dispatcher is None:
            raise ControlPlaneNotRunningError("the control plane is not running; call start()")
        return self._dispatcher.records if self._running else {}

    def _require_dispatcher(self) -> Dispatcher:
        if self._dispatcher is None or not self._running:
            raise ControlPlaneNotRunningError("the control plane is not running; call start()")
        return self._dispatcher

    def _submit(
        self,
        meta: RequestMetadata,
        *,
        stream: bool,
        collect: bool = False,
        wake: bool = True,
        queue: bool = True,
    ) -> RequestRecord:
        """Validate and admit ``meta`` and record it; it is pushed onto the policy's queue
        unless ``queue`` is False (the caller then starts it: ``Dispatcher.start_here``)."""
        dispatcher = self._require_dispatcher()
        if not self._accepting:
            raise ControlPlaneNotRunningError("the control plane is shutting down")
        if not isinstance(meta, RequestMetadata):
            raise InvalidRequestError(
                f"a request is a RequestMetadata, got {type(meta).__name__}", param="request"
            )
        rid = meta.request_id
        if not isinstance(rid, str) or not rid:
            raise InvalidRequestError(
                f"request_id must be a non-empty string, got {rid!r}", param="request_id"
            )
        if rid in dispatcher.records or (self._reserved_ids and rid in self._reserved_ids):
            raise ConflictError(
                f"request {meta.request_id!r} is already in progress", param="request_id"
            )
        registry = self._registry
        named = meta.model_name
        adapter: str | None = None
        by_lora_path = False
        if named and registry.serves(named):
            model = named
            extra = meta.extra_body  # (its type is checked below, with the request's)
            path = extra.get("lora_path") if extra and isinstance(extra, Mapping) else None
            if type(path) is str and registry.adapter_named(named, path):
                adapter, by_lora_path = path, True  # SGLang's field
        elif named and type(named) is str and (base := registry.adapter_base(named)) is not None:
            model, adapter = base, named  # a LoRA adapter: its instances of its model
        elif named and type(named) is str and (split := registry.split_adapter(named)):
            model, adapter = split  # SGLang's MODEL:ADAPTER
        else:  # no model named, or one nobody serves: the answer or the error
            model = resolve_model(meta, registry.models(), registry.adapters().keys())
        session = meta.session_id or (meta.user_id if meta.session_from_user else None)
        info, engine_req = build_request(
            meta,
            model,
            now=self.clock.now(),
            stream=stream
            or (self.engine_stream == "always" and not answered_whole(meta.extra_body)),
            default_max_tokens=self.default_max_tokens,
            # no hashes for a prompt whose logprobs are asked: vLLM reads no prefix cache
            # for it, so where its blocks are cached does not matter to where it runs
            block_size=self.prefix_block_size
            if self._tracks_prefixes
            and not prompt_logprobs_asked(meta.extra_body, chat=meta.messages is not None)
            else None,
            # (a session id that is not a string is refused by build_request)
            previous_instance_id=self._last_instances.get(session)
            if type(session) is str
            else None,
            adapter=adapter,
        )
        if by_lora_path:  # the engine is asked for the adapter by its own means
            extra = {k: v for k, v in engine_req.extra.items() if k != "lora_path"}
            engine_req = engine_req.with_changes(extra=extra)
        among: Callable[[InstanceState], bool] | None = None
        what: str | None = None
        if adapter is not None:  # only on the instances serving it
            among, what = _serving(adapter), f"LoRA adapter {adapter!r} of model {model!r}"
            if others := registry.without_adapter(model, adapter):
                info = replace(info, excluded_instances=info.excluded_instances | others)
        kept_off: frozenset[str] = frozenset()
        if engine_req.send_max_tokens:  # its whole answer: on an instance whose context holds it
            short = registry.too_short(model, info.prompt_tokens + info.max_tokens)
            if short:  # (kept on them when nothing else may take it now)
                excluded = info.excluded_instances | short
                if dispatcher.servable_now(model, excluded):
                    kept_off = short - info.excluded_instances
                    info = replace(info, excluded_instances=excluded)
        now = info.arrival
        policy = dispatcher.policy
        queued = dispatcher.queued_depth
        if queued >= self.max_queue_size:  # at its bound: first start what can start now
            dispatcher.dispatch_ready()  # (a burst of submits, each queued before a pass)
            queued = dispatcher.queued_depth
        if among is None:
            some_up, whole = registry.up_kinds(model)
        else:
            up = registry.up_members(model, among)
            some_up = bool(up)
            whole = any(kind.runs_whole_requests for _, kind in up)
        if not some_up:
            label, why = registry.down(model, among, what=what)
            self._refused(label, model, info.user_id)
            raise NoHealthyInstanceError(why, retry_after_s=registry.back_in(model, now, among))
        # an instance that runs whole requests serves the model: then nothing is unservable
        unservable = (
            None
            if whole
            else dispatcher.unservable_reason(model)
            if adapter is None
            else dispatcher.unservable_reason(model, info.excluded_instances, adapter=adapter)
        )
        if unservable is not None:  # e.g. a PD fleet whose prefill instances all drain
            drained = dispatcher.drained_out(model)
            self._refused("draining" if drained else "no_healthy_instance", model, info.user_id)
            raise NoHealthyInstanceError(unservable)
        if not whole and not pair_exists(registry.up_members(model, among)):
            # a PD fleet with one role's instances all down (ejected, or not accepting):
            # no request can run until one is back, as when every instance is down
            self._refused("no_healthy_instance", model, info.user_id)
            raise NoHealthyInstanceError(
                registry.pair_down_reason(model, among, what=what),
                retry_after_s=registry.back_in(model, now, among),
            )
        unsplittable = None if whole else self._unsplittable_reason(engine_req, model)
        if unsplittable is not None:
            raise InvalidRequestError(unsplittable, param="n")
        simple = dispatcher.admits_all
        if simple is not None and queued < self.max_queue_size and not self.reject_infeasible_slo:
            verdict = simple.admit_at(now)  # the same verdict, without a snapshot
        else:
            snap = self._registry.snapshot(now, self._prefix)
            verdict = check_queue_bound(queued, self.max_queue_size, snap)
            if verdict.admitted and self.reject_infeasible_slo:
                verdict = check_deadline_feasible(info, snap)
            if verdict.admitted:
                verdict = policy.admit(info, snap)
            if verdict.kind == "user_queue_full":
                # a user's burst, each queued before a pass: first start what can start now
                dispatcher.dispatch_ready()
                verdict = policy.admit(info, self._registry.snapshot(now, self._prefix))
        if not verdict.admitted:
            reason = verdict.reason
            user = info.user_id
            if verdict.kind in ("queue_full", "user_queue_full"):
                self._refused(verdict.kind, model, user)
                raise QueueFullError(reason, retry_after_s=verdict.retry_after_s)
            if verdict.kind == "slo_infeasible":
                self._refused("slo_infeasible", model, user)
                # no retry hint: the same deadline is as infeasible a second later
                raise SLOInfeasibleError(reason, retry_after_s=None)
            if verdict.kind == "over_budget":
                self._refused("over_budget", model, user)
                raise OverBudgetError(reason)  # as over budget a second later
            self._refused("policy", model, user)
            raise AdmissionError(reason, retry_after_s=verdict.retry_after_s)
        if verdict.priority is not None:  # demoted: scheduled without its deadline from now on
            info = replace(info, priority=verdict.priority, deadline=None, demoted=True)
        loop = asyncio.get_running_loop()
        rec = RequestRecord(
            meta=meta,
            info=info,
            engine_request=engine_req,
            future=loop.create_future(),
            stream=ChunkChannel() if stream else None,
            relayed=stream,
            chunks=[] if collect else None,
            queued_at=now,
            kept_off=kept_off,
        )
        meta.model_name = model if adapter is None else adapter
        meta.arrival_time = meta.queue_time = self.clock.to_datetime(now)
        dispatcher.records[meta.request_id] = rec
        self._metrics.on_submitted()
        if queue:
            policy.push(info)
            self._metrics.queue_depth.set(dispatcher.queued_depth)
        if wake:
            dispatcher.wake()
        return rec

    def _refused(self, reason: str, model: str, user: str | None) -> None:
        """Count a generation request of ``user`` refused at admission for ``reason``."""
        self._metrics.on_rejected(reason, model)
        self._metrics.on_user_rejected(reason, user)

    def simulates(self, instance: ExecutionInstance) -> bool:
        """Whether ``instance`` runs on an in-process simulated engine (its address is
        nominal: no server listens there)."""
        return self._engine_factory is None and self.nominal(instance)

    def _make_sim_client(self, instance: ExecutionInstance) -> EngineClient:
        from sage_llm.sim.factory import make_sim_engine

        if self._kv_hub is None:
            from sage_llm.sim.engine import KVTransferHub

            self._kv_hub = KVTransferHub()
        return make_sim_engine(instance, clock=self._clock, kv_hub=self._kv_hub)

    def _priors(self, instance: ExecutionInstance, client: EngineClient | None) -> LatencyPriors:
        from sage_llm.sim.factory import sim_latency_priors

        priors = sim_latency_priors(client) if client is not None else None
        if priors is not None:
            return priors
        meta = instance.metadata  # checked by check_instance at registration
        tpot = latency_prior(meta, "tpot_ms") / 1000.0
        prefill = latency_prior(meta, "prefill_tokens_per_s")
        base = latency_prior(meta, "ttft_base_ms") / 1000.0
        return LatencyPriors(ttft_base_s=base, prefill_tokens_per_s=prefill, tpot_s=tpot)

    def _ensure_client(self, state: InstanceState) -> None:
        if isinstance(state.client, _UnconnectedClient):
            state.client = self._new_client(state.instance)

    def _new_client(self, instance: ExecutionInstance) -> EngineClient:
        """The client :meth:`start` makes for ``instance`` (simulated, ``engine_factory``'s,
        else HTTP). An ``engine_factory`` that raises (other than a sage-llm error, raised as
        it is) or returns no client is a :class:`ConfigError` naming the instance."""
        if self.simulates(instance):  # again, after a stop()
            return self._make_sim_client(instance)
        if self._engine_factory is not None:
            iid = instance.instance_id
            try:
                client = self._engine_factory(instance)
            except SageLLMError:
                raise
            except Exception as exc:
                raise ConfigError(
                    f"instance {iid!r}: engine_factory failed: {type(exc).__name__}: {exc}",
                    key="engine_factory",
                ) from exc
            if not isinstance(client, EngineClient):
                raise ConfigError(
                    f"instance {iid!r}: engine_factory returned {type(client).__name__}, "
                    "not an EngineClient",
                    key="engine_factory",
                )
            return client
        from sage_llm.engines.http import HTTPEngineClient, make_session

        if self._session is None:
            self._session = make_session()
        dialect = instance.engine if instance.engine in ("sglang", "openai") else "vllm"
        return HTTPEngineClient(
            instance, self._session, dialect=dialect, timeouts=self.engine_timeouts
        )

    def _monitor(self) -> HealthMonitor:
        if self._health is None:
            self._health = HealthMonitor(
                self.health_settings,
                clock=lambda: self.clock,
                metrics=self._metrics,
                on_change=self._wake,
                on_eject=self._evict,
            )
        return self._health

    def _wake(self) -> None:
        if self._dispatcher is not None:
            self._dispatcher.wake()

    def _evict(self, state: InstanceState, why: str) -> None:
        """An instance ejected: its engine calls that delivered nothing move elsewhere
        (with ``move_on_eject``), and its model's queue fails when the fleet is down."""
        dispatcher = self._dispatcher
        if dispatcher is None:
            return
        if self.health_settings.move_on_eject:
            dispatcher.evict(state.instance_id, why)
        if state.breaker.trial_failed:  # ejected again from its trial: it is down
            self._fail_stranded_queue(state.instance.model_name, why)

    def _fail_stranded_queue(self, model: str, why: str) -> None:
        """Fail the queued requests of ``model`` when none of its instances may take a
        request now and one has just failed its trial after a cool-down: the fleet is down,
        not briefly out, and they would wait until their own limits
        (:class:`NoHealthyInstanceError`, a 503 with ``Retry-After`` over HTTP)."""
        dispatcher = self._require_dispatcher()
        now = self.clock.now()
        if not dispatcher.servable_now(model):
            retry_after = self._registry.back_in(model, now)
            reason = (
                f"no instance of model {model!r} can take requests: they are ejected, and "
                f"one failed its trial after its cool-down ({why})"
            )
            for rec in list(dispatcher.records.values()):
                if rec.status is RequestStatus.QUEUED and rec.info.model == model:
                    rec.exception = NoHealthyInstanceError(reason, retry_after_s=retry_after)
                    dispatcher.fail_queued(rec, reason)
            return
        for rec in list(dispatcher.records.values()):  # a LoRA adapter's instances all down
            adapter = rec.adapter
            if (
                adapter is None
                or rec.status is not RequestStatus.QUEUED
                or rec.info.model != model
                or dispatcher.servable_now(model, rec.info.excluded_instances)
            ):
                continue
            reason = (
                f"no instance serving LoRA adapter {adapter!r} of model {model!r} can take "
                f"requests: they are ejected, and one failed its trial after its cool-down "
                f"({why})"
            )
            retry_after = self._registry.back_in(model, now, _serving(adapter))
            rec.exception = NoHealthyInstanceError(reason, retry_after_s=retry_after)
            dispatcher.fail_queued(rec, reason)

    def _start_instance_loops(self, state: InstanceState) -> None:
        if not self.enable_monitoring:
            return
        self._instance_tasks[state.instance_id] = self._monitor().start(state)

    def _on_instance_idle(self, state: InstanceState) -> None:
        if state.removed:
            self._discard(state)

    def _discard(self, state: InstanceState) -> None:
        if self._registry.discard(state.instance_id) is None:
            return
        for task in self._instance_tasks.pop(state.instance_id, []):
            task.cancel()
        if self._health is not None:
            self._health.forget(state.instance_id)
        self._given_clients.discard(state.instance_id)
        self._closed_given.discard(state.instance_id)
        self._metrics.forget_instance(state.instance_id)
        model = state.instance.model_name
        gone = all(other.instance.model_name != model for other in self._registry)
        if self._running:  # its counters stay until scrapes have seen its last requests
            loop = asyncio.get_running_loop()
            key = (state.instance_id, model)
            self._forget_counts[key] = loop.call_later(
                REMOVED_COUNTS_KEEP_S, self._forget_instance_counts, key
            )
            if gone and model not in self._forget_models:
                self._forget_models[model] = loop.call_later(
                    REMOVED_COUNTS_KEEP_S, self._forget_model, model
                )
        else:
            self._metrics.forget_instance_counts(state.instance_id)
            if gone:
                self._metrics.forget_model(model)
        if self._running:
            task = asyncio.get_running_loop().create_task(
                state.client.aclose(), name=f"close-{state.instance_id}"
            )
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def _forget_instance_counts(self, key: tuple[str, str]) -> None:
        """A removed instance's time is up: its requests of the model it served then go,
        and, unless its id is registered again (or has other models' series waiting), its
        other counters (its breaker's transitions, its stalls)."""
        del self._forget_counts[key]
        instance_id, model = key
        self._metrics.forget_instance_counts(instance_id, model)
        if self._registry.find(instance_id) is None and not any(
            other == instance_id for other, _ in self._forget_counts
        ):
            self._metrics.forget_instance_counts(instance_id)

    def _forget_model(self, model: str) -> None:
        del self._forget_models[model]
        self._metrics.forget_model(model)

    def _unsplittable_reason(self, req: EngineRequest, model: str) -> str | None:
        """Why ``req`` cannot run on ``model``'s fleet: it asks for several samples, its PD
        connector cannot split such a request, and no instance of the model that runs
        whole requests is registered (None: it may run)."""
        dispatcher = self._require_dispatcher()
        if dispatcher.may_split(req) or dispatcher.runs_whole(model):
            return None
        pd = dispatcher.pd
        assert pd is not None  # (may_split is True without PD)
        return (
            f"n={samples_asked(req.extra)} cannot run on model {model!r}: its PD "
            f"connector {pd.connector.name!r} cannot split a request for several samples "
            "between a prefill and a decode instance, and none of the model's instances "
            "runs whole requests (register a hybrid or general one, or ask for n=1)"
        )

    def _fail_unservable(self) -> None:
        """Fail queued requests whose model no instance serves any more, or none that is
        not draining, or none but those a retried request already failed on, or, for a
        request for several samples that its PD connector cannot split, none that runs
        whole requests (:class:`NoHealthyInstanceError`, a 503 over HTTP)."""
        dispatcher = self._require_dispatcher()
        models = self._registry.models()
        for rec in list(dispatcher.records.values()):
            if rec.status is not RequestStatus.QUEUED:
                continue
            if rec.info.model not in models:
                reason: str | None = f"no instance serves model {rec.info.model!r} any more"
            else:
                reason = dispatcher.unservable_reason(
                    rec.info.model, rec.info.excluded_instances, adapter=rec.adapter
                )
                if reason is not None and dispatcher.take_back_kept_off(rec):
                    continue  # a shorter context serves it now, cut as its engine answers
                if reason is None:  # (its last whole-request instance was removed)
                    reason = self._unsplittable_reason(rec.engine_request, rec.info.model)
            if reason is not None:
                rec.exception = NoHealthyInstanceError(reason)
                dispatcher.fail_queued(rec, reason)


def _serving(adapter: str) -> Callable[[InstanceState], bool]:
    """Whether an instance serves the LoRA adapter ``adapter``."""
    return lambda state: adapter in state.adapters


def _embeddable(item: object) -> bool:
    """A text, or a non-empty list of token ids."""
    if isinstance(item, str):
        return True
    return (
        isinstance(item, list)
        and bool(item)
        and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in item)
    )


class _UnconnectedClient:
    """Placeholder client of an instance registered before start() (HTTP mode)."""

    def __init__(self, instance: ExecutionInstance) -> None:
        self._id = instance.instance_id

    @property
    def instance_id(self) -> str:
        return self._id

    def generate(self, req: EngineRequest) -> AsyncIterator[Chunk]:
        raise ControlPlaneNotRunningError("the control plane is not running")

    async def prefill(self, req: EngineRequest) -> Any:
        raise ControlPlaneNotRunningError("the control plane is not running")

    async def health(self) -> bool:
        return False

    async def stats(self) -> Any:
        raise ControlPlaneNotRunningError("the control plane is not running")

    async def aclose(self) -> None:
        return None
