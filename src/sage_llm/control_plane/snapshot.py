"""Immutable views that scheduling policies and routing strategies decide on.

Policies and routers are pure and synchronous: they read a :class:`ClusterSnapshot` and a
:class:`RequestInfo` and return a decision. The dispatcher accounts each decision on the
snapshot's successor (:meth:`ClusterSnapshot.with_assignment`) before the next one, so a
batch of decisions spreads over the fleet instead of piling onto the instance that looked
idlest at the start.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from operator import attrgetter
from typing import Protocol

from sage_llm.fastinit import field_filler
from sage_llm.types import ExecutionInstanceType, ParallelismType, RequestPriority, RequestStatus

PAIR_VIEW_PREFIX = "pd-pair:"
"""Id prefix of the stand-in views the dispatcher adds for free PD pairs
(:func:`sage_llm.control_plane.pd.orchestrator.servable_view`): not instances of their own."""


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """What policies and routers know about a request.

    Times are clock seconds (see :mod:`sage_llm.sim.clock`). ``deadline`` is absolute:
    arrival + SLO, or None. ``block_hashes`` are the prompt's prefix-block hashes
    (:func:`sage_llm.tokens.prompt_blocks`).
    """

    request_id: str
    model: str
    arrival: float
    prompt_tokens: int
    max_tokens: int
    priority: RequestPriority = RequestPriority.NORMAL
    deadline: float | None = None
    user_id: str | None = None
    session_id: str | None = None
    cost_budget: float | None = None
    block_hashes: tuple[int, ...] = ()
    preferred_instance_id: str | None = None
    previous_instance_id: str | None = None
    """Where this session's previous request ran (for topology-aware routing)."""
    excluded_instances: frozenset[str] = frozenset()
    """Instances that already failed this request (retries avoid them)."""
    attempt: int = 0
    tags: Mapping[str, object] = field(default_factory=dict)
    parallelism_hint: ParallelismType | None = None
    """The parallelism the application asked for (``RequestMetadata.parallelism_hint``):
    the dispatcher prefers instances of it (see ``Dispatcher``)."""
    billing_tier: str = "standard"
    """``RequestMetadata.billing_tier``, for custom policies and routers (the built-in
    ones do not read it)."""
    demoted: bool = False
    """Demoted at admission (an infeasible deadline under ``slo_aware``'s ``demote``): its
    deadline and priority were dropped, and it is never aged ahead of deadline requests,
    whichever policy queues it (one switched to later included)."""
    session_from_user: bool = True
    """``RequestMetadata.session_from_user``: with no ``session_id``, whether the user is
    the session (:attr:`sticky_key`)."""

    @property
    def slo_s(self) -> float | None:
        return None if self.deadline is None else self.deadline - self.arrival

    @property
    def sticky_key(self) -> str | None:
        """The session whose requests affinity keeps together: ``session_id``, else the
        user (unless ``session_from_user`` is False), else None."""
        return self.session_id or (self.user_id if self.session_from_user else None)


fill_request_info = field_filler(RequestInfo, tuple(f.name for f in fields(RequestInfo)))
"""``fill_request_info(*values)``: a :class:`RequestInfo` from all its field values in field
order (as ``RequestInfo(*values)``, several times faster: one is made per request)."""


@dataclass(frozen=True, slots=True)
class InstanceView:
    """One instance as seen at decision time, with live load and latency estimates.

    ``in_flight`` counts requests dispatched and not finished; ``queued_prefill_tokens`` the
    prompt tokens dispatched whose first token has not come back yet;
    ``outstanding_decode_tokens`` the output tokens still expected from running requests.
    ``est_*`` are EWMA estimates from observed traffic (priors from the instance's declared
    figures until then); ``est_tpot_s`` is the one of a request joining now, in a batch of
    ``in_flight + 1`` (``tpot_known``).
    """

    instance_id: str
    model: str
    role: ExecutionInstanceType = ExecutionInstanceType.GENERAL
    healthy: bool = True
    accepting: bool = True
    """False while draining or administratively unavailable."""
    in_flight: int = 0
    max_concurrency: int = 100
    queued_prefill_tokens: int = 0
    outstanding_decode_tokens: int = 0
    kv_usage: float = 0.0
    engine_waiting: int = 0
    gpu_count: int = 1
    price_per_gpu_hour: float = 2.0
    machine_id: str | None = None
    rack_id: str | None = None
    numa_node: int | None = None
    nvlink_domain: str | None = None
    nvlink_peers: frozenset[str] = frozenset()
    network_bandwidth_gbps: float = 10.0
    est_ttft_base_s: float = 0.05
    est_prefill_tps: float = 8000.0
    est_tpot_s: float = 0.02
    est_chunk_tps: float | None = None
    """Prompt tokens a second in a step beside running decodes: the compute-bound rate
    (``InstanceState.est_s_per_chunk_token``), which the PD decider's stall model reads
    (None: ``est_prefill_tps``)."""
    rate_measured: bool = True
    """False while ``est_prefill_tps`` is still its prior: no prompt long enough to tell the
    rate (``RATE_FROM_TOKENS``) ran there yet, however many short ones did."""
    measured: bool = True
    """False until traffic has told enough of the instance (its ``est_*`` are priors, or
    the mean of fewer than five observations): a policy that ranks by them gives it
    requests to learn them (``cost_optimized``)."""
    tpot_known: bool = True
    """Whether ``est_tpot_s`` was learnt from requests that ran in a batch the size of the
    one a request joining now would run in (``in_flight + 1``), or a smaller one (a bound
    from below: decode steps are no faster in a bigger batch). False while it is the prior,
    or learnt only in bigger batches (a bound from above: a burst's): predictions from it
    do not refuse a request (``check_deadline_feasible``, ``cost_optimized``), whose
    result then tells it (see ``InstanceState.tpot_at``)."""

    @property
    def free_slots(self) -> int:
        return max(0, self.max_concurrency - self.in_flight)

    @property
    def has_capacity(self) -> bool:
        return self.healthy and self.accepting and self.in_flight < self.max_concurrency

    @property
    def load(self) -> float:
        """Fraction of the concurrency bound in use, 0..1."""
        return min(1.0, self.in_flight / self.max_concurrency) if self.max_concurrency else 1.0

    @property
    def cost_per_second(self) -> float:
        return self.price_per_gpu_hour * self.gpu_count / 3600.0

    def predict_ttft_s(self, prompt_tokens: int) -> float:
        """Predicted time to first token if a request of ``prompt_tokens`` came here now."""
        pending = self.queued_prefill_tokens + prompt_tokens
        return self.est_ttft_base_s + pending / max(self.est_prefill_tps, 1e-9)

    def predict_e2e_s(self, prompt_tokens: int, output_tokens: int) -> float:
        return self.predict_ttft_s(prompt_tokens) + max(0, output_tokens - 1) * self.est_tpot_s

    def predict_cost(self, prompt_tokens: int, output_tokens: int) -> float:
        """Price per GPU-hour × GPUs × predicted time (the cost_optimized objective)."""
        return self.cost_per_second * self.predict_e2e_s(prompt_tokens, output_tokens)

    def serves(self, model: str) -> bool:
        return self.model == model

    def same_machine(self, other: InstanceView) -> bool:
        return self.machine_id is not None and self.machine_id == other.machine_id

    def nvlink_connected(self, other: InstanceView) -> bool:
        if other.instance_id in self.nvlink_peers or self.instance_id in other.nvlink_peers:
            return True
        return self.nvlink_domain is not None and self.nvlink_domain == other.nvlink_domain


class PrefixView(Protocol):
    """Read-only view of the control plane's prefix index."""

    def match(self, block_hashes: Sequence[int]) -> Mapping[str, int]:
        """For each instance, how many leading blocks of ``block_hashes`` it likely caches."""
        ...


class _EmptyPrefixView:
    def match(self, block_hashes: Sequence[int]) -> Mapping[str, int]:
        return {}


EMPTY_PREFIX_VIEW: PrefixView = _EmptyPrefixView()


_VIEW_FIELDS = tuple(f.name for f in fields(InstanceView))
_view_values = attrgetter(*_VIEW_FIELDS)
fill_view = field_filler(InstanceView, _VIEW_FIELDS)
"""``fill_view(*values)``: an :class:`InstanceView` from all its field values in field
order (what ``InstanceView(*values)`` builds, several times faster; a view is rebuilt per
request and instance)."""
_IN_FLIGHT = _VIEW_FIELDS.index("in_flight")
_QUEUED_PREFILL = _VIEW_FIELDS.index("queued_prefill_tokens")
_OUTSTANDING_DECODE = _VIEW_FIELDS.index("outstanding_decode_tokens")


@dataclass(frozen=True, slots=True)
class ClusterSnapshot:
    """The fleet at one instant. Cheap to derive successors from."""

    now: float
    instances: tuple[InstanceView, ...]
    prefix: PrefixView = EMPTY_PREFIX_VIEW

    def __iter__(self) -> Iterator[InstanceView]:
        return iter(self.instances)

    def __len__(self) -> int:
        return len(self.instances)

    def get(self, instance_id: str) -> InstanceView | None:
        for inst in self.instances:
            if inst.instance_id == instance_id:
                return inst
        return None

    def for_model(self, model: str) -> tuple[InstanceView, ...]:
        return tuple(i for i in self.instances if i.model == model)

    def runnable(self, req: RequestInfo) -> tuple[InstanceView, ...]:
        """Instances that could start ``req`` as a whole request right now."""
        return tuple(
            i
            for i in self.instances
            if i.model == req.model
            and i.role.runs_whole_requests
            and i.has_capacity
            and i.instance_id not in req.excluded_instances
        )

    def can_serve(self, req: RequestInfo) -> bool:
        """Whether ``req`` could start now: a whole-request instance has a free slot, or a
        PREFILLING and a DECODING instance both have one (a PD pair; whether PD is enabled
        is the dispatcher's business)."""
        prefill = decode = False
        for i in self.instances:
            if (
                i.model != req.model
                or not i.has_capacity
                or i.instance_id in req.excluded_instances
            ):
                continue
            if i.role.runs_whole_requests:
                return True
            prefill = prefill or i.role.runs_prefill
            decode = decode or i.role.runs_decode
        return prefill and decode

    def has_capacity(self) -> bool:
        return any(i.has_capacity for i in self.instances)

    def with_assignment(self, instance_id: str, req: RequestInfo) -> ClusterSnapshot:
        """The successor snapshot after ``req`` was sent to ``instance_id``."""
        out = list(self.instances)
        for n, inst in enumerate(out):
            if inst.instance_id == instance_id:
                # the view's fields in order, three of them advanced (what ``replace``
                # does, without its per-call field walk: one is made per decision)
                values = list(_view_values(inst))
                values[_IN_FLIGHT] += 1
                values[_QUEUED_PREFILL] += req.prompt_tokens
                values[_OUTSTANDING_DECODE] += req.max_tokens
                out[n] = fill_view(*values)
                break
        return fill_snapshot(self.now, tuple(out), self.prefix)


fill_snapshot = field_filler(ClusterSnapshot, ("now", "instances", "prefix"))
"""``fill_snapshot(now, instances, prefix)``: a :class:`ClusterSnapshot` (as its
constructor builds it, faster: one is taken per decision)."""


@dataclass(frozen=True, slots=True)
class CompletionRecord:
    """Feedback given to the scheduling policy when a request ends (``on_complete``)."""

    request_id: str
    status: RequestStatus
    priority: RequestPriority
    instance_id: str | None
    arrival: float
    finished: float
    queue_wait_s: float
    ttft_s: float | None
    tpot_s: float | None
    e2e_s: float
    prompt_tokens: int
    completion_tokens: int
    slo_met: bool | None
    predicted_e2e_s: float | None = None
    cost: float = 0.0
