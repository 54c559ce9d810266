"""Seed-compatible data types.

These are the names that code written against the sageLLM control-plane proposal already
uses (``RequestMetadata``, ``ExecutionInstance``, ``RequestPriority`` …). Field names and
defaults follow the proposal; a few fields were added (``prompt``, ``messages``,
``price_per_gpu_hour`` …), always with defaults, so existing call sites keep working.

This module holds data only: no I/O and no logic beyond small derived properties.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any

from sage_llm.fastinit import field_filler


def host_port(host: str, port: int) -> str:
    """``host:port`` as a URL writes it: an IPv6 address in brackets (``[::1]:8000``)."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class RequestPriority(enum.IntEnum):
    """Request priority. Lower value = more urgent."""

    CRITICAL = 0
    HIGH = 1
    NORMAL = 2
    LOW = 3
    BACKGROUND = 4

    @classmethod
    def parse(cls, value: RequestPriority | int | str) -> RequestPriority:
        """Accept a member, its integer value or its name in any case (``"high"``)."""
        if isinstance(value, RequestPriority):
            return value
        if isinstance(value, bool):
            raise ValueError(f"invalid priority {value!r}")
        try:
            if isinstance(value, int):
                return cls(value)
            text = str(value).strip()
            if text.isascii() and text.lstrip("-").isdigit():
                return cls(int(text))
            return cls[text.upper()]
        except (KeyError, ValueError):
            names = ", ".join(m.name.lower() for m in cls)
            raise ValueError(
                f"invalid priority {value!r}; expected one of {names}, or 0-4"
            ) from None


class RequestStatus(enum.Enum):
    """Lifecycle of a request. Terminal: COMPLETED, FAILED, CANCELLED."""

    PENDING = "pending"
    QUEUED = "queued"
    SCHEDULED = "scheduled"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in (RequestStatus.COMPLETED, RequestStatus.FAILED, RequestStatus.CANCELLED)


class ExecutionInstanceType(enum.Enum):
    """The role an engine instance plays.

    GENERAL and HYBRID run whole requests and may also serve either PD leg; PREFILLING
    only runs prefill legs; DECODING only runs decode legs.
    """

    GENERAL = "general"
    PREFILLING = "prefilling"
    DECODING = "decoding"
    HYBRID = "hybrid"

    @classmethod
    def parse(cls, value: ExecutionInstanceType | str) -> ExecutionInstanceType:
        """Accept a member, its value (``"prefilling"``) or its name (``"PREFILLING"``)."""
        if isinstance(value, ExecutionInstanceType):
            return value
        text = str(value).strip()
        for member in cls:
            if text.lower() in (member.value, member.name.lower()):
                return member
        aliases = {"prefill": cls.PREFILLING, "decode": cls.DECODING, "mixed": cls.HYBRID}
        if text.lower() in aliases:
            return aliases[text.lower()]
        names = "general, prefilling (or prefill), decoding (or decode), hybrid (or mixed)"
        raise ValueError(f"invalid instance_type {value!r}; expected one of {names}")

    @property
    def runs_prefill(self) -> bool:
        return self is not ExecutionInstanceType.DECODING

    @property
    def runs_decode(self) -> bool:
        return self is not ExecutionInstanceType.PREFILLING

    @property
    def runs_whole_requests(self) -> bool:
        return self in (ExecutionInstanceType.GENERAL, ExecutionInstanceType.HYBRID)


class ParallelismType(enum.Enum):
    TENSOR_PARALLEL = "tp"
    PIPELINE_PARALLEL = "pp"
    DATA_PARALLEL = "dp"
    EXPERT_PARALLEL = "ep"
    HYBRID = "hybrid"

    @classmethod
    def parse(cls, value: ParallelismType | str) -> ParallelismType:
        """Accept a member, its value (``"tp"``) or its name (``"TENSOR_PARALLEL"``), in
        any case."""
        if isinstance(value, ParallelismType):
            return value
        text = str(value).strip().lower()
        for member in cls:
            if text in (member.value, member.name.lower()):
                return member
        names = ", ".join(m.value for m in cls)
        raise ValueError(f"invalid parallelism {value!r}; expected one of {names}")

    @classmethod
    def of(cls, tensor: int = 1, pipeline: int = 1, data: int = 1) -> ParallelismType | None:
        """The parallelism of an instance of these sizes: the one kind above 1, HYBRID
        when several are, None when none is (one GPU, one replica). Each size must be an
        integer of at least 1 (else ValueError)."""
        for name, size in (("tensor", tensor), ("pipeline", pipeline), ("data", data)):
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ValueError(f"{name} parallel size must be an integer >= 1, got {size!r}")
        kinds = [
            kind
            for kind, size in ((cls.TENSOR_PARALLEL, tensor), (cls.PIPELINE_PARALLEL, pipeline),
                               (cls.DATA_PARALLEL, data))
            if size > 1
        ]  # fmt: skip
        if len(kinds) > 1:
            return cls.HYBRID
        return kinds[0] if kinds else None


@dataclass
class RequestMetadata:
    """One inference request as an application describes it.

    ``prompt`` (text, or a list of token ids) is used for completions; ``messages`` (OpenAI
    chat messages) for chat. ``slo_deadline_ms`` is the end-to-end latency target counted
    from arrival. The timing fields are filled in by the control plane. ``temperature`` or
    ``top_p`` None leaves it to the engine's own default (the gateway passes None for a
    field its client did not give).
    """

    request_id: str
    prompt: str | list[int] | None = None
    user_id: str | None = None
    priority: RequestPriority = RequestPriority.NORMAL
    slo_deadline_ms: float | None = None
    max_tokens: int | None = None
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    model_name: str | None = None

    arrival_time: datetime = field(default_factory=datetime.now)
    queue_time: datetime | None = None
    schedule_time: datetime | None = None
    start_time: datetime | None = None
    end_time: datetime | None = None

    preferred_instance_id: str | None = None
    parallelism_hint: ParallelismType | None = None

    cost_budget: float | None = None
    billing_tier: str = "standard"

    tags: dict[str, Any] = field(default_factory=dict)

    # Additions (all optional).
    messages: list[dict[str, Any]] | None = None
    stop: str | list[str] | None = None
    """Stop sequences; a string is one sequence (as in OpenAI's API)."""
    session_id: str | None = None
    stream: bool = False
    extra_body: dict[str, Any] = field(default_factory=dict)
    """Engine request fields passed through unchanged (``n``, ``logprobs``, ``seed`` …);
    not those the request's own fields set (``model``, ``max_tokens``, ``prompt`` …:
    :class:`InvalidRequestError` naming ``extra_body.<key>``)."""
    engine_max_tokens: bool = False
    """With ``max_tokens`` None, leave the answer's length to the engine's own default (as
    the gateway does for a client that gives none, as vLLM would) rather than sending the
    control plane's ``default_max_tokens``, which then is only the scheduler's estimate of
    the answer's length (16, vLLM's and OpenAI's default, for a completions request)."""
    session_from_user: bool = True
    """With no ``session_id``, whether ``user_id`` is the session (a user's requests one
    conversation, for affinity and topology-aware routing): True by default. The gateway
    sets it False for a tenant's request (``[[gateway.tenants]]``), whose user is a whole
    team's, not one conversation."""

    @property
    def latency_ms(self) -> float | None:
        if self.end_time is not None and self.arrival_time is not None:
            return (self.end_time - self.arrival_time).total_seconds() * 1000.0
        return None

    @property
    def queue_wait_ms(self) -> float | None:
        if self.schedule_time is not None and self.queue_time is not None:
            return (self.schedule_time - self.queue_time).total_seconds() * 1000.0
        return None


@dataclass
class PrefillingConfig:
    """Engine settings of a prefill-role instance."""

    target_batch_size: int = 4
    max_prefill_tokens: int = 8192
    chunk_size: int = 2048
    enable_chunked_prefill: bool = True
    kv_connector: str = "NixlConnector"


# The proposal's code spelled it this way; keep the name importable.
PreffillingConfig = PrefillingConfig


@dataclass
class DecodingConfig:
    """Engine settings of a decode-role instance."""

    target_batch_size: int = 64
    max_num_seqs: int = 256
    kv_cache_memory_fraction: float = 0.9
    kv_connector: str = "NixlConnector"


@dataclass
class ExecutionInstance:
    """One engine instance (a vLLM / SGLang / OpenAI-compatible server, or a simulated one)."""

    instance_id: str
    host: str
    port: int
    model_name: str

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1

    instance_type: ExecutionInstanceType = ExecutionInstanceType.GENERAL
    prefilling_config: PrefillingConfig | None = None
    decoding_config: DecodingConfig | None = None

    gpu_count: int = 1
    gpu_memory_gb: float = 0.0
    gpu_utilization: float = 0.0

    is_available: bool = True
    is_healthy: bool = True
    current_load: float = 0.0

    avg_latency_ms: float = 0.0
    throughput_tokens_per_sec: float = 0.0

    active_requests: int = 0
    max_concurrent_requests: int = 100

    machine_id: str | None = None
    rack_id: str | None = None
    gpu_bus_id: str | None = None
    gpu_device_id: int | None = None
    nvlink_peers: list[str] = field(default_factory=list)
    numa_node: int | None = None
    network_bandwidth_gbps: float = 10.0
    network_latency_ms: float = 0.1

    metadata: dict[str, Any] = field(default_factory=dict)

    # Additions (all optional).
    engine: str = "vllm"
    """Engine dialect: ``vllm``, ``sglang``, ``openai`` (generic) or ``sim`` (in-process)."""
    price_per_gpu_hour: float = 2.0
    """Price of one GPU-hour in any currency unit; used by ``cost_optimized``."""
    nvlink_domain: str | None = None
    """Instances sharing an NVLink domain id are NVLink-connected (in addition to peers)."""
    api_key: str | None = field(default=None, repr=False)
    """Bearer token sent to the engine; never shown in ``repr`` (and so never in logs)."""
    scheme: str = "http"
    engine_scheduling_policy: str = "fcfs"
    """The engine's own scheduling policy (vLLM's ``--scheduling-policy``): with
    ``priority``, each request's priority (its :class:`RequestPriority` value, lower first,
    as vLLM orders it) is sent with it, so that the engine orders its waiting requests and
    chooses whom to preempt by it too (by default the latest arrival is preempted when the
    KV cache runs short). Not sent otherwise: vLLM's v1 engine ignores it under ``fcfs``,
    and its v0 engine refused it."""
    lora_adapters: list[str] = field(default_factory=list)
    """LoRA adapters the engine serves beside ``model_name`` (the names of vLLM's
    ``--lora-modules``): a request that names one goes to the instances serving it. The
    control plane also learns them from the engine's ``GET /v1/models`` (the cards whose
    ``parent`` is ``model_name``), at most a minute after the engine loads one."""

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{host_port(self.host, self.port)}"

    @property
    def available_capacity(self) -> float:
        return max(0.0, 1.0 - self.current_load)

    @property
    def can_accept_request(self) -> bool:
        return (
            self.is_available
            and self.is_healthy
            and self.active_requests < self.max_concurrent_requests
            and self.current_load < 0.95
        )

    def can_accept_prefilling_request(self) -> bool:
        return self.instance_type.runs_prefill and self.can_accept_request

    def can_accept_decoding_request(self) -> bool:
        return self.instance_type.runs_decode and self.can_accept_request

    def is_nvlink_connected(self, other: ExecutionInstance) -> bool:
        if other.instance_id in self.nvlink_peers or self.instance_id in other.nvlink_peers:
            return True
        return self.nvlink_domain is not None and self.nvlink_domain == other.nvlink_domain

    def get_affinity_score(self, other: ExecutionInstance) -> float:
        """Communication affinity in [0, 1]: 1.0 same machine over NVLink, 0.5 same
        machine, 0.1 same rack, 0.01 otherwise or unknown."""
        if self.is_local_to(other):
            return 1.0 if self.is_nvlink_connected(other) else 0.5
        if self.rack_id is not None and self.rack_id == other.rack_id:
            return 0.1
        return 0.01

    def is_local_to(self, other: ExecutionInstance) -> bool:
        return self.machine_id is not None and self.machine_id == other.machine_id


@dataclass
class SchedulingDecision:
    """Where and why one request was placed. ``parallelism_strategy`` is the target
    instance's (:meth:`ParallelismType.of` its sizes); an instance on one GPU with one
    replica reports ``TENSOR_PARALLEL`` with ``tensor_parallel_size`` 1 (tensor parallelism
    of degree 1: the field is never None, as the seed API has it)."""

    request_id: str
    target_instance_id: str
    parallelism_strategy: ParallelismType
    estimated_latency_ms: float
    estimated_cost: float
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    decision_time: datetime = field(default_factory=datetime.now)
    reason: str = ""
    confidence: float = 1.0
    metadata: dict[str, Any] = field(default_factory=dict)
    prefill_instance_id: str | None = None


@dataclass
class PerformanceMetrics:
    """Aggregate figures of a control plane since start (``get_metrics()``)."""

    timestamp: datetime = field(default_factory=datetime.now)
    total_requests: int = 0
    completed_requests: int = 0
    failed_requests: int = 0
    active_requests: int = 0
    queued_requests: int = 0
    avg_latency_ms: float = 0.0
    p50_latency_ms: float = 0.0
    p95_latency_ms: float = 0.0
    p99_latency_ms: float = 0.0
    tokens_per_second: float = 0.0
    requests_per_second: float = 0.0
    avg_gpu_utilization: float = 0.0
    total_gpu_memory_gb: float = 0.0
    used_gpu_memory_gb: float = 0.0
    total_cost: float = 0.0
    cost_per_token: float = 0.0
    slo_violations: int = 0
    slo_compliance_rate: float = 1.0
    metadata: dict[str, Any] = field(default_factory=dict)
    # Additions.
    cancelled_requests: int = 0
    rejected_requests: int = 0
    avg_ttft_ms: float = 0.0
    p99_ttft_ms: float = 0.0
    avg_tpot_ms: float = 0.0
    avg_queue_wait_ms: float = 0.0


@dataclass
class SchedulingMetrics:
    timestamp: datetime = field(default_factory=datetime.now)
    policy_name: str = ""
    scheduling_latency_us: float = 0.0
    scheduling_throughput: float = 0.0
    latency_prediction_error_avg: float = 0.0
    latency_prediction_error_p95: float = 0.0
    prediction_accuracy_rate: float = 1.0
    load_balance_variance: float = 0.0
    load_balance_coefficient: float = 1.0
    slo_compliance_by_priority: dict[str, float] = field(default_factory=dict)
    queue_wait_time_p50: float = 0.0
    queue_wait_time_p95: float = 0.0
    queue_wait_time_p99: float = 0.0
    queue_length_avg: float = 0.0
    queue_length_max: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class InstanceMetrics:
    instance_id: str
    timestamp: datetime = field(default_factory=datetime.now)
    total_requests_processed: int = 0
    active_requests: int = 0
    failed_requests: int = 0
    avg_latency_ms: float = 0.0
    p50_latency_ms: float = 0.0
    p95_latency_ms: float = 0.0
    p99_latency_ms: float = 0.0
    throughput_tokens_per_sec: float = 0.0
    gpu_utilization: float = 0.0
    gpu_memory_used_gb: float = 0.0
    gpu_memory_total_gb: float = 0.0
    current_load: float = 0.0
    is_healthy: bool = True
    last_health_check: datetime | None = None
    consecutive_failures: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class PDSeparationConfig:
    """Prefill/decode disaggregation settings (``ControlPlaneManager(pd_config=…)``)."""

    enabled: bool = True
    enable_dynamic_scaling: bool = False
    prefilling_min_instances: int = 1
    prefilling_max_instances: int = 5
    decoding_min_instances: int = 1
    decoding_max_instances: int = 8
    routing_policy: str = "threshold"
    """Decider: ``always``, ``never``, ``threshold``, ``prefix_aware`` or ``adaptive``."""
    prefilling_threshold_input_tokens: int = 800
    prefilling_threshold_ratio: float = 4.0
    kv_cache_storage: str = "gpu"
    kv_cache_eviction_policy: str = "lru"
    kv_cache_memory_fraction: float = 0.85
    enable_kv_cache_transfer: bool = True
    kv_cache_transfer_buffer_mb: int = 2048
    max_transfer_latency_ms: float = 100.0
    collect_pd_metrics: bool = True
    pd_metrics_interval_sec: int = 10
    enable_pd_tracing: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)
    # Additions.
    connector: str = "vllm"
    """Hand-off protocol: ``vllm`` (sequential, kv_transfer_params) or ``sglang`` (bootstrap)."""
    fallback_to_colocated: bool = True


@dataclass
class PDMetrics:
    timestamp: datetime = field(default_factory=datetime.now)
    prefilling_throughput_tokens_per_sec: float = 0.0
    prefilling_latency_avg_ms: float = 0.0
    prefilling_latency_p99_ms: float = 0.0
    prefilling_gpu_util: float = 0.0
    prefilling_active_requests: int = 0
    decoding_latency_avg_ms: float = 0.0
    decoding_latency_p99_ms: float = 0.0
    decoding_gpu_util: float = 0.0
    decoding_active_requests: int = 0
    kv_cache_hit_rate: float = 0.0
    inter_cluster_transfer_latency_avg_ms: float = 0.0
    kv_cache_evictions_per_sec: float = 0.0
    prefilling_cost_per_token: float = 0.0
    decoding_cost_per_token: float = 0.0
    total_cost_optimization_percent: float = 0.0
    requests_routed_to_prefilling: int = 0
    requests_routed_to_decoding: int = 0
    requests_routed_to_hybrid: int = 0
    avg_routing_decision_time_us: float = 0.0
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ChoiceResult:
    """One sample of a request for several (``n`` > 1 in its ``extra_body``), by the
    ``index`` the engine gave it: its text, why it ended, and, when the engine gave them,
    its token ids and logprobs (the chunks', in order)."""

    index: int
    text: str
    finish_reason: str | None = None
    token_ids: list[int] | None = None
    logprobs: list[Any] | None = None


@dataclass(frozen=True, slots=True)
class RequestResult:
    """The outcome of one request (``wait_for_result``).

    Latencies are in milliseconds; ``ttft_ms``/``tpot_ms`` are None when no token was produced
    or when the engine answered in one piece (see the manager's ``engine_stream``).
    ``cached_tokens`` (prompt tokens the engine served from its prefix cache) is None when
    the engine did not report them (vLLM without ``--enable-prompt-tokens-details``).
    ``slo_met`` is True for a completed request whose ``e2e_latency_ms`` is at most its
    ``slo_deadline_ms`` (equal to it included), False for one later, one that failed, or
    one cut off at or after its deadline; None when the request had no SLO, or was
    cancelled before its deadline.
    """

    request_id: str
    status: RequestStatus
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int | None = 0
    instance_id: str | None = None
    prefill_instance_id: str | None = None
    queue_wait_ms: float = 0.0
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_latency_ms: float = 0.0
    slo_met: bool | None = None
    error: str | None = None
    attempts: int = 0
    token_ids: list[int] | None = None
    logprobs: list[Any] | None = None
    cost: float = 0.0
    predicted_e2e_ms: float | None = None
    """The time from placement to the end that the control plane predicted when it
    placed the request (the chosen instance's estimate for ``max_tokens``; compare it with
    ``e2e_latency_ms - queue_wait_ms``), None when it was never placed."""
    choices: list[ChoiceResult] | None = None
    """Every sample of a request for several (``n`` > 1), by index; None for one. The
    result's own ``text``, ``finish_reason``, ``token_ids`` and ``logprobs`` are choice
    0's, and ``completion_tokens`` counts the tokens of them all."""

    @property
    def ok(self) -> bool:
        return self.status is RequestStatus.COMPLETED


fill_request_result = field_filler(RequestResult, tuple(f.name for f in fields(RequestResult)))
"""``fill_request_result(*values)``: a :class:`RequestResult` from all its field values in
field order (as ``RequestResult(*values)``, several times faster: one is made per request)."""
