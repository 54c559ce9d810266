"""Building blocks of the cluster simulator (:mod:`sage_llm.sim.cluster`).

* :class:`SimInstanceSpec` / :func:`make_fleet`: what a simulated instance is — the
  :class:`~sage_llm.types.ExecutionInstance` the control plane registers and the
  :class:`~sage_llm.sim.core.SimEngineConfig` that runs it (by default exactly what the
  manager's simulated mode builds, :func:`sage_llm.sim.factory.sim_config_for`).
* :class:`InstanceSlot`: one instance while it runs — its engine core, the control plane's
  live :class:`~sage_llm.control_plane.instances.InstanceState` (load counters and the
  latency EWMAs, reused as is), and how to build its :class:`InstanceView`.
* :class:`FreeList`: the instances of one model with a free slot, sampled in O(k).
* :class:`SimRequest`: one request from arrival to its end.
* :func:`prefix_block_hashes`: :func:`sage_llm.tokens.block_hashes`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from sage_llm.bench.workloads import WorkloadRequest
from sage_llm.control_plane.instances import (
    MIN_S_PER_PREFILL_TOKEN,
    InstanceRegistry,
    InstanceState,
)
from sage_llm.control_plane.snapshot import InstanceView, RequestInfo
from sage_llm.errors import ConfigError
from sage_llm.fastinit import field_filler
from sage_llm.sim.core import SimEngineConfig, SimEngineCore
from sage_llm.sim.engine import SimEngine
from sage_llm.sim.factory import sim_config_for, sim_latency_priors
from sage_llm.tokens import block_hashes
from sage_llm.types import ExecutionInstance

__all__ = [
    "FreeList",
    "InstanceSlot",
    "SimInstanceSpec",
    "SimRequest",
    "make_fleet",
    "prefix_block_hashes",
]


@dataclass(frozen=True, slots=True)
class SimInstanceSpec:
    """One simulated instance: its registration and its simulated engine's settings.

    ``config`` None means what ``ControlPlaneManager(mode="simulated")`` would build for
    ``instance`` (GPU, model, TP/PP, speed and seed from the instance and its metadata).
    """

    instance: ExecutionInstance
    config: SimEngineConfig | None = None

    def engine_config(self) -> SimEngineConfig:
        """The engine settings this instance runs with."""
        return self.config if self.config is not None else sim_config_for(self.instance)


def make_fleet(
    n: int,
    *,
    model: str = "llama-3-8b",
    gpu: str = "h100",
    max_concurrency: int = 100,
    id_prefix: str = "sim",
    **engine_overrides: Any,
) -> list[SimInstanceSpec]:
    """``n`` identical simulated instances ``{id_prefix}-0`` … serving ``model`` on ``gpu``.

    ``engine_overrides`` are :class:`SimEngineConfig` fields (``max_num_seqs=128`` …).
    """
    if n < 1:
        raise ConfigError(f"a fleet needs at least one instance, got {n}", key="n")
    specs: list[SimInstanceSpec] = []
    for i in range(n):
        inst = ExecutionInstance(
            instance_id=f"{id_prefix}-{i}",
            host="127.0.0.1",
            port=8000 + i % 50_000,
            model_name=model,
            max_concurrent_requests=max_concurrency,
            engine="sim",
            metadata={"sim_gpu": gpu, "sim_model": model},
        )
        config = sim_config_for(inst, **engine_overrides) if engine_overrides else None
        specs.append(SimInstanceSpec(inst, config))
    return specs


_DYNAMIC_VIEW_FIELDS = (
    "in_flight",
    "queued_prefill_tokens",
    "outstanding_decode_tokens",
    "kv_usage",
    "engine_waiting",
    "est_ttft_base_s",
    "est_prefill_tps",
    "est_tpot_s",
    "est_chunk_tps",
    "rate_measured",
    "measured",
    "tpot_known",
)
"""The :class:`InstanceView` fields the simulation changes; the others stay as registered."""
_STATIC_VIEW_FIELDS = tuple(
    f.name for f in fields(InstanceView) if f.name not in _DYNAMIC_VIEW_FIELDS
)
_make_view = field_filler(InstanceView, _DYNAMIC_VIEW_FIELDS + _STATIC_VIEW_FIELDS)


def prefix_block_hashes(token_ids: Sequence[int], block_size: int) -> tuple[int, ...]:
    """:func:`sage_llm.tokens.block_hashes` (kept under this name for callers of the
    simulator; the reference function packs ids directly now)."""
    return block_hashes(token_ids, block_size)


class SimRequest:
    """One request inside the simulator, from arrival until it ends.

    It keeps of its :class:`WorkloadRequest` only what the client's measurement needs
    (its id, priority, user, prompt length and SLOs), not the request itself: the prompt
    goes to the engine at dispatch and is freed then, not when the request ends.
    """

    __slots__ = (
        "adapter",
        "batch_at_start",
        "cached_tokens",
        "disaggregated",
        "first_token_s",
        "info",
        "output",
        "pending_tokens",
        "predicted_e2e_s",
        "prefill_cost",
        "prefill_slot",
        "priority",
        "prompt_ids",
        "prompt_is_text",
        "prompt_tokens",
        "request_id",
        "scheduled_at",
        "slo_e2e_s",
        "slo_tpot_s",
        "slo_ttft_s",
        "slot",
        "token_times",
        "user_id",
    )

    def __init__(
        self,
        workload: WorkloadRequest,
        info: RequestInfo,
        prompt_ids: Sequence[int],
        adapter: str | None = None,
    ) -> None:
        self.request_id = workload.request_id
        self.priority = workload.priority
        """The workload's priority (the measurement's; admission may give ``info`` another)."""
        self.user_id = workload.user_id
        self.prompt_tokens = workload.prompt_tokens
        self.slo_ttft_s = workload.slo_ttft_s
        self.slo_tpot_s = workload.slo_tpot_s
        self.slo_e2e_s = workload.slo_e2e_s
        self.info = info
        self.adapter = adapter
        """The LoRA adapter it is for (None: its model, ``info.model``)."""
        self.prompt_ids: Sequence[int] | None = prompt_ids
        self.prompt_is_text = isinstance(workload.prompt, str)
        """Whether its prompt is text (a context refusal then counts it as vLLM's tokenizer
        does, to a token past the context)."""
        self.slot: InstanceSlot | None = None
        """Where it runs: its instance, or its decode instance when disaggregated."""
        self.disaggregated = False
        """Whether it runs as two PD legs (its prefill on ``prefill_slot``)."""
        self.prefill_slot: InstanceSlot | None = None
        """Its prefill instance while its PD prefill leg runs there (None otherwise)."""
        self.prefill_cost = 0.0
        """What its PD prefill leg cost (``cost_per_second`` × the leg's time)."""
        self.scheduled_at = 0.0
        self.pending_tokens = 0
        self.cached_tokens = 0
        """Its prompt tokens the engine found in its prefix cache (when it admitted it)."""
        self.batch_at_start = 0
        self.predicted_e2e_s: float | None = None
        self.first_token_s: float | None = None
        self.output = 0
        self.token_times: list[float] | None = None


class InstanceSlot:
    """One simulated instance while the simulation runs (see the module docstring)."""

    __slots__ = (
        "_static_view",
        "awaiting_first",
        "bound",
        "busy",
        "busy_s",
        "core",
        "cost_per_s",
        "in_flight_area",
        "in_flight_since",
        "index",
        "kick_pending",
        "max_in_flight",
        "max_model_len",
        "model",
        "result",
        "role",
        "sampled",
        "state",
        "steps",
        "tokens",
        "wake_gen",
    )

    def __init__(self, index: int, spec: SimInstanceSpec, registry: InstanceRegistry) -> None:
        inst = spec.instance
        config = spec.engine_config()
        role = inst.instance_type
        if config.role.runs_whole_requests != role.runs_whole_requests or (
            not role.runs_whole_requests and config.role is not role
        ):
            raise ConfigError(
                f"instance {inst.instance_id!r} is registered as {role.value} but its "
                f"engine runs as {config.role.value}",
                key="config.role",
            )
        # used synchronously: its loop never runs
        engine = SimEngine(inst.instance_id, config, lora_adapters=inst.lora_adapters)
        priors = sim_latency_priors(engine)
        assert priors is not None  # a SimEngine always has priors
        self.index = index
        self.state: InstanceState = registry.add(inst, engine, priors)
        self.core: SimEngineCore = engine.core
        self.max_model_len = config.max_model_len
        self.model = inst.model_name
        self.role = role
        """The instance's role (``PREFILLING``/``DECODING`` instances run PD legs only)."""
        self.bound = inst.max_concurrent_requests
        view = self.state.view()
        self.cost_per_s = view.cost_per_second
        self._static_view = tuple(getattr(view, name) for name in _STATIC_VIEW_FIELDS)
        """The values of the view fields the simulation never changes."""
        self.sampled = False
        self.busy = False
        self.kick_pending = False
        self.result: Any = None
        self.wake_gen = 0
        self.busy_s = 0.0
        self.steps = 0
        self.tokens = 0
        self.max_in_flight = 0
        self.in_flight_area = 0.0
        """∫ in_flight dt up to ``in_flight_since`` (for the time-averaged load)."""
        self.in_flight_since = 0.0
        self.awaiting_first: dict[str, SimRequest] = {}
        """Requests dispatched here whose first token has not come back yet."""

    @property
    def instance_id(self) -> str:
        return self.state.instance_id

    @property
    def has_capacity(self) -> bool:
        return self.state.in_flight < self.bound

    def build_view(self) -> InstanceView:
        """A new view equal to what ``InstanceState.view`` builds now.

        The fields the simulation changes (load counters, engine figures, latency
        estimates) are read live; the others (health, role, bounds, topology, price) are
        those of the registration, which nothing in the simulator changes. Filled by
        :func:`~sage_llm.fastinit.field_filler` (several times cheaper than the frozen
        ``__init__``; a view is rebuilt about twice per decision)."""
        state = self.state
        stats = state.last_stats
        tpot_s, tpot_known = state.tpot_at(state.in_flight + 1)
        return _make_view(
            state.in_flight,
            state.queued_prefill_tokens,
            state.outstanding_decode_tokens,
            stats.kv_usage if stats else 0.0,
            stats.waiting if stats else 0,
            state.est_ttft_base_s,
            1.0 / max(state.est_s_per_prefill_token, MIN_S_PER_PREFILL_TOKEN),
            tpot_s,
            1.0 / state.est_s_per_chunk_token,
            state.rate_samples > 0,
            state.measured,
            tpot_known,
            *self._static_view,
        )


class FreeList:
    """A set of instance indices with O(1) add/remove and O(k) random samples."""

    __slots__ = ("_pos", "items")

    def __init__(self) -> None:
        self.items: list[int] = []
        """The members, in no particular order (read-only for callers)."""
        self._pos: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.items)

    def __contains__(self, index: object) -> bool:
        return index in self._pos

    def add(self, index: int) -> None:
        if index not in self._pos:
            self._pos[index] = len(self.items)
            self.items.append(index)

    def discard(self, index: int) -> None:
        pos = self._pos.pop(index, None)
        if pos is None:
            return
        last = self.items.pop()
        if last != index:
            self.items[pos] = last
            self._pos[last] = pos

    def sample(self, rng: random.Random, k: int) -> list[int]:
        """About ``k`` distinct members drawn uniformly with ``rng``, in ascending order.

        All members when there are at most ``k``. From a large set (over ``4k``), ``k``
        draws with replacement, duplicates dropped (cheaper than ``random.sample``; the
        expected shortfall is under ``k²/2n`` < ``k/8``); otherwise exactly ``k``.
        """
        items = self.items
        n = len(items)
        if n <= k:
            return sorted(items)
        if n > 4 * k:
            draw = rng.random
            return sorted({items[int(draw() * n)] for _ in range(k)})
        return sorted(rng.sample(items, k))

    def skip(self, rng: random.Random, k: int) -> None:
        """Advance ``rng`` exactly as :meth:`sample` would, without building the sample."""
        n = len(self.items)
        if n <= k:
            return
        if n > 4 * k:
            draw = rng.random
            for _ in range(k):
                draw()
            return
        rng.sample(self.items, k)
