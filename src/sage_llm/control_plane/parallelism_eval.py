"""Analytic latency and goodput estimates for one engine shape (the planner's inner model).

:class:`ShapeEval` answers, for one instance shape (model on ``tp × pp`` GPUs of one type,
optionally with expert parallelism, over a TP link of a given bandwidth): at an arrival
rate of ``λ`` requests/s per instance, what are the TPOT, the TTFT quantile and the KV
cache needed, and what is the highest ``λ`` meeting the SLO (the instance's *goodput
capacity*). Step times come from :class:`~sage_llm.sim.costmodel.RooflineCostModel`, the
simulator's cost model; queueing is approximated, not simulated:

* **decode**: ``B = λ·Ō·s`` sequences in the batch (Little's law), ``s`` the step time;
* **colocated** (chunked prefill mixed into decode steps): prefill work ``w(P)`` is the time
  a prompt adds to the steps it rides on, ``ρ = λ·E[w]`` the share of GPU time it takes, so
  ``s = decode_step(B) / (1 − ρ)`` (a fixed point in ``B`` and ``s``);
* **TTFT**: an M/G/1 wait for prefill work (Pollaczek–Khinchine mean, exponential tail
  ``P(W > t) ≈ ρ·e^{−ρt/W̄}``) plus the prompt's own prefill work and half a step;
* **memory**: the KV of ``B + 2√B`` sequences (the mean plus two standard deviations of a
  Poisson count) of ``P̄ + Ō/2`` tokens must fit the blocks left beside the weights
  (``kv_capacity_blocks``), and ``B + 2√B`` must stay within ``max_num_seqs``;
* **fitted profiles**: when the simulator has a fitted profile of a real engine for the
  GPU × model on one device (``cpu`` × ``tiny``, :func:`sage_llm.sim.factory.fitted_profile`),
  a TP1 PP1 shape uses its step model, engine limits, KV blocks, ``max_model_len`` and
  front-end intake instead of the roofline, as ``sage-llm engine-sim`` does;
* **EP** (MoE): the experts' all-reduce becomes two all-to-alls of ``k`` × the activations,
  and the busiest rank carries ``1 + √(2·ln(ep)·(ep−1)/(T·k))`` × the mean expert load.

The planner's inputs live here too: :class:`WorkloadProfile`, :class:`SLOTarget`,
:class:`GPUAllocation` and the parsers of ``"8xH100"`` and ``"50ms"``.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from statistics import NormalDist
from types import MappingProxyType
from typing import TYPE_CHECKING

from sage_llm.errors import ConfigError
from sage_llm.sim.costmodel import CostModel, RooflineCostModel
from sage_llm.sim.specs import GPUSpec, ModelSpec, get_gpu, kv_capacity_blocks

if TYPE_CHECKING:
    from sage_llm.bench.fidelity import FittedProfile

DEFAULT_NODE_GPUS = 8
"""GPUs per machine assumed when neither a topology nor ``NODESxCOUNT`` says otherwise."""
MAX_PLAN_GPUS = 4096
"""The most GPUs one plan may cover (larger counts are refused, not searched)."""
_Z90 = 1.2815515655446004  # standard normal 90% quantile
_MAX_ITER = 400
_SEQS = "max_num_seqs (batch full)"
_PREFILL = "prefill throughput"
_SATURATED = "throughput (the batch never settles)"


def _quantile(values: Sequence[float], q: float) -> float:
    data = sorted(values)
    pos = (len(data) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def _numbers(obj: object, required: tuple[str, ...], optional: tuple[str, ...]) -> None:
    """Raise ``ConfigError`` naming the first of ``obj``'s fields that is no number
    (``optional`` ones may be None): a string had met a bare ``TypeError`` of ``>``."""
    for key in (*required, *optional):
        value = getattr(obj, key)
        if value is None and key in optional:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numpy's too
            raise ConfigError(f"must be a number, got {value!r}", key=key)


@dataclass(frozen=True)
class WorkloadProfile:
    """Request lengths (tokens) and arrival rate (requests/s) the plan must serve.

    ``prompt_p90``/``output_p90`` default to the means (fixed lengths); ``prompt_sq_mean``
    (``E[P²]``) defaults to a log-normal fitted to the mean and p90. ``rate=None`` asks the
    planner for the plan with the highest goodput capacity, each judged at its capacity.
    """

    prompt_mean: float
    output_mean: float
    rate: float | None = None
    prompt_p90: float | None = None
    output_p90: float | None = None
    prompt_sq_mean: float | None = None

    def __post_init__(self) -> None:
        _numbers(self, ("prompt_mean", "output_mean"), ("rate", "prompt_p90", "output_p90",
                                                          "prompt_sq_mean"))  # fmt: skip
        for key in ("prompt_mean", "output_mean"):
            if not getattr(self, key) >= 1:
                raise ConfigError(f"must be >= 1 token, got {getattr(self, key)}", key=key)
        if self.rate is not None and not (self.rate > 0 and math.isfinite(self.rate)):
            raise ConfigError(
                f"must be a positive number of requests/s, got {self.rate}", key="rate"
            )
        for key, mean in (("prompt_p90", self.prompt_mean), ("output_p90", self.output_mean)):
            value = getattr(self, key)
            if value is None:
                object.__setattr__(self, key, float(mean))
            elif not value >= 1:
                raise ConfigError(f"must be >= 1 token, got {value}", key=key)
        if self.prompt_sq_mean is None:
            object.__setattr__(self, "prompt_sq_mean", self._lognormal_sq())
        elif not self.prompt_sq_mean >= self.prompt_mean**2 * (1 - 1e-9):
            raise ConfigError("must be >= prompt_mean² (E[P²] ≥ E[P]²)", key="prompt_sq_mean")

    def _lognormal_sq(self) -> float:
        """``E[P²]`` of a log-normal with this mean and p90 (sigma from ``ln(p90/mean)``)."""
        ratio = float(self.prompt_p90 or self.prompt_mean) / self.prompt_mean
        if ratio <= 1.0:
            return self.prompt_mean**2
        disc = _Z90**2 - 2 * math.log(ratio)
        sigma = _Z90 - math.sqrt(disc) if disc > 0 else _Z90
        return self.prompt_mean**2 * math.exp(sigma**2)

    @property
    def p90_prompt(self) -> float:
        return float(self.prompt_p90 or self.prompt_mean)

    @property
    def p90_output(self) -> float:
        return float(self.output_p90 or self.output_mean)

    @property
    def prompt_cv2(self) -> float:
        """Squared coefficient of variation of prompt lengths."""
        return max(0.0, float(self.prompt_sq_mean or 0.0) / self.prompt_mean**2 - 1.0)

    @classmethod
    def from_samples(
        cls, prompt_tokens: Sequence[int], output_tokens: Sequence[int], rate: float | None = None
    ) -> WorkloadProfile:
        """Profile measured lengths (e.g. a benchmark workload or a trace)."""
        if not prompt_tokens or not output_tokens:
            raise ConfigError("need at least one prompt and one output length", key="samples")
        return cls(
            prompt_mean=sum(prompt_tokens) / len(prompt_tokens),
            output_mean=sum(output_tokens) / len(output_tokens),
            rate=rate,
            prompt_p90=_quantile([float(p) for p in prompt_tokens], 0.9),
            output_p90=_quantile([float(o) for o in output_tokens], 0.9),
            prompt_sq_mean=sum(float(p) ** 2 for p in prompt_tokens) / len(prompt_tokens),
        )

    def with_rate(self, rate: float | None) -> WorkloadProfile:
        return replace(self, rate=rate)

    def describe(self) -> str:
        rate = "max goodput" if self.rate is None else f"{self.rate:g} req/s"
        return (
            f"prompt mean {self.prompt_mean:.0f} (p90 {self.p90_prompt:.0f}) tokens, "
            f"output mean {self.output_mean:.0f} (p90 {self.p90_output:.0f}) tokens, {rate}"
        )


@dataclass(frozen=True)
class SLOTarget:
    """Latency targets in seconds: TTFT and per-request TPOT (time per output token after
    the first), both at the ``attainment`` quantile of requests."""

    ttft_s: float
    tpot_s: float
    attainment: float = 0.9

    def __post_init__(self) -> None:
        _numbers(self, ("ttft_s", "tpot_s", "attainment"), ())
        for key in ("ttft_s", "tpot_s"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"must be > 0 seconds, got {getattr(self, key)}", key=key)
        if not 0.5 <= self.attainment < 1:
            raise ConfigError(f"must be in [0.5, 1), got {self.attainment}", key="attainment")

    def describe(self) -> str:
        q = f"p{self.attainment * 100:g}"
        return f"TTFT {q} ≤ {_fmt_s(self.ttft_s)}, TPOT {q} ≤ {_fmt_s(self.tpot_s)}"


def _fmt_s(seconds: float) -> str:
    if seconds < 1e-3:  # a sub-millisecond target is not "0 ms"
        return f"{seconds * 1e6:.0f} µs"
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


@dataclass(frozen=True)
class GPUAllocation:
    """``nodes`` identical machines with ``gpus_per_node`` GPUs each, except that the last
    one has ``last_node_gpus`` when set (a plain count that does not fill whole nodes);
    ``gpu_ids`` picks the GPUs of each machine to use (default: the best-connected ones).
    At most :data:`MAX_PLAN_GPUS` GPUs in all."""

    nodes: int = 1
    gpus_per_node: int = DEFAULT_NODE_GPUS
    gpu_ids: tuple[int, ...] | None = None
    last_node_gpus: int | None = None

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ConfigError("nodes and gpus_per_node must be >= 1", key="gpus")
        last = self.last_node_gpus
        if last is not None and not 1 <= last <= self.gpus_per_node:
            raise ConfigError("last_node_gpus must be between 1 and gpus_per_node", key="gpus")
        if last == self.gpus_per_node:
            object.__setattr__(self, "last_node_gpus", None)
        if self.gpu_ids is not None and (
            len(self.gpu_ids) != self.gpus_per_node or len(set(self.gpu_ids)) != len(self.gpu_ids)
        ):
            raise ConfigError("gpu_ids must list gpus_per_node distinct GPUs", key="gpus")
        if self.total > MAX_PLAN_GPUS:
            raise ConfigError(
                f"at most {MAX_PLAN_GPUS} GPUs can be planned, got {self.total}", key="gpus"
            )

    @classmethod
    def from_count(cls, count: int, node_gpus: int = DEFAULT_NODE_GPUS) -> GPUAllocation:
        """``count`` GPUs on nodes of ``node_gpus``: one node when they fit, else
        ⌈count / node_gpus⌉ nodes, the last one partial (9 on nodes of 8: 8 + 1)."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ConfigError(f"GPU count must be a positive integer, got {count!r}", key="gpus")
        if count > MAX_PLAN_GPUS:
            raise ConfigError(
                f"at most {MAX_PLAN_GPUS} GPUs can be planned, got {count}", key="gpus"
            )
        if count <= node_gpus:
            return cls(1, count)
        nodes, rest = -(-count // node_gpus), count % node_gpus
        return cls(nodes, node_gpus, last_node_gpus=rest or None)

    @property
    def node_sizes(self) -> tuple[int, ...]:
        """GPUs on each node, in node order."""
        last = self.last_node_gpus or self.gpus_per_node
        return (self.gpus_per_node,) * (self.nodes - 1) + (last,)

    @property
    def total(self) -> int:
        return (self.nodes - 1) * self.gpus_per_node + (self.last_node_gpus or self.gpus_per_node)

    def describe(self) -> str:
        """``"2 nodes of 8"``, ``"2 nodes: 8 + 1"``, ``"13 nodes: 12 × 8 + 4"``."""
        if self.last_node_gpus is None:
            return f"{self.nodes} node{'s' * (self.nodes > 1)} of {self.gpus_per_node}"
        full = self.nodes - 1
        head = f"{self.gpus_per_node}" if full == 1 else f"{full} × {self.gpus_per_node}"
        return f"{self.nodes} nodes: {head} + {self.last_node_gpus}"


@dataclass(frozen=True, order=True)
class InstanceShape:
    """One engine instance: tensor × pipeline parallel GPUs, expert parallel over the TP
    group (``ep = tp``) or not (``ep = 1``)."""

    tp: int
    pp: int = 1
    ep: int = 1

    @property
    def gpus(self) -> int:
        return self.tp * self.pp

    @property
    def label(self) -> str:
        parts = (
            [f"TP{self.tp}"] + [f"PP{self.pp}"] * (self.pp > 1) + [f"EP{self.ep}"] * (self.ep > 1)
        )
        return "·".join(parts)


# -- parsing --------------------------------------------------------------------------------

_GPUS_RE = re.compile(r"^(?:(\d+)\s*[x×*]\s*)?(\d+)\s*[x×*]\s*([a-z][\w.\-]*)$", re.IGNORECASE)
_DURATION_RE = re.compile(r"^(-?[0-9]*\.?[0-9]+(?:e[+-]?\d+)?)\s*(ms|s|us|µs|m|min)?$")
_UNITS: Mapping[str, float] = MappingProxyType(
    {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "m": 60.0, "min": 60.0}
)


def parse_gpu_text(text: str) -> tuple[int | None, int, GPUSpec]:
    """``"2x8xH100"`` → ``(2, 8, H100)``; ``"16xH100"`` → ``(None, 16, H100)`` (a plain
    count, which the planner splits into nodes)."""
    m = _GPUS_RE.match(text.strip())
    if m is None:
        raise ConfigError(
            f"expected COUNTxGPU such as 8xH100, or NODESxCOUNTxGPU such as 2x8xH100; got {text!r}",
            key="gpus",
        )
    if any(len(d.lstrip("0")) > 7 for d in (m[1] or "", m[2])):
        raise ConfigError(
            f"at most {MAX_PLAN_GPUS} GPUs can be planned, got {text.strip()[:24]!r}…", key="gpus"
        )
    nodes, count = (int(m[1]) if m[1] else None), int(m[2])
    if (nodes is not None and nodes < 1) or count < 1:
        raise ConfigError(f"GPU and node counts must be >= 1 in {text!r}", key="gpus")
    if (nodes or 1) * count > MAX_PLAN_GPUS:
        raise ConfigError(
            f"at most {MAX_PLAN_GPUS} GPUs can be planned, got {(nodes or 1) * count}", key="gpus"
        )
    return nodes, count, get_gpu(m[3])


def parse_gpus(text: str) -> tuple[GPUAllocation, GPUSpec]:
    """``"8xH100"`` (one machine), ``"2x8xH100"`` (machines × GPUs each), ``"4×a100"``; a
    plain count above :data:`DEFAULT_NODE_GPUS` is nodes of 8, the last one partial
    (``"9xH100"``: 8 + 1). At most :data:`MAX_PLAN_GPUS` GPUs."""
    nodes, count, gpu = parse_gpu_text(text)
    if nodes is None:
        return GPUAllocation.from_count(count), gpu
    return GPUAllocation(nodes=nodes, gpus_per_node=count), gpu


def parse_duration(text: str | float, *, key: str = "duration") -> float:
    """``"2s"``, ``"50ms"``, ``"200 ms"``, ``"1.5s"``, ``"500us"`` → seconds (a bare number
    is refused as ambiguous; a float passes through)."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        value = float(text)
    else:
        m = _DURATION_RE.match(str(text).strip().lower())
        if m is None or m[2] is None:
            hint = " (add a unit: s or ms)" if m is not None else ""
            raise ConfigError(
                f"expected a duration such as 2s or 50ms, got {text!r}{hint}", key=key
            )
        value = float(m[1]) * _UNITS[m[2]]
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"must be a positive duration, got {text!r}", key=key)
    return value


@dataclass(frozen=True)
class EngineLimits:
    """The engine settings the estimate assumes (vLLM's defaults, as the simulator's)."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    block_size: int = 16
    gpu_memory_utilization: float = 0.9

    @classmethod
    def from_profile(cls, profile: FittedProfile) -> EngineLimits:
        """The limits of the engine a fitted profile was measured on."""
        s = profile.shape
        return cls(s.max_num_seqs, s.max_num_batched_tokens, s.block_size)


@dataclass(frozen=True)
class RoleState:
    """One instance at one arrival rate. ``limit`` names what failed (None: SLO met)."""

    rate: float
    batch: float
    step_s: float
    """Mean step time: the mean TPOT."""
    ttft_s: float
    kv_tokens_needed: float
    utilization: float
    limit: str | None
    tpot_s: float = math.inf
    """Per-request TPOT at the attainment quantile (the mean step time plus the spread
    prefill chunks cause over a request's decode steps)."""


def wait_quantile(mean_wait: float, rho: float, q: float) -> float:
    """The ``q`` quantile of an M/G/1 wait with mean ``mean_wait`` at utilisation ``rho``."""
    if rho <= 1 - q or mean_wait <= 0:
        return 0.0
    return mean_wait / rho * math.log(rho / (1 - q))


@dataclass
class ShapeEval:
    """Estimates for one instance shape; memoised per planner run (not shared)."""

    model: ModelSpec
    gpu: GPUSpec
    tp: int
    pp: int
    ep: int
    link_gbps: float
    workload: WorkloadProfile
    limits: EngineLimits = field(default_factory=EngineLimits)
    profile: FittedProfile | None = None
    """A fitted profile of a real engine on one device (TP1 PP1): its step model, KV blocks,
    ``max_model_len`` and front-end intake replace the roofline's (``limits`` should be
    :meth:`EngineLimits.from_profile` unless set explicitly)."""
    cost: CostModel = field(init=False, repr=False)
    ctx: int = field(init=False, repr=False)
    kv_tokens: int = field(init=False)
    """KV cache tokens one instance of this shape holds."""
    front_s: float = field(init=False, default=0.0)
    """Front-end intake added to every TTFT (fitted profiles only)."""
    _allreduce_s: float = field(init=False, default=0.0, repr=False)
    _decode: dict[int, float] = field(default_factory=dict, repr=False)
    _prefill: dict[tuple[int, int], float] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.ctx = int(self.workload.prompt_mean + self.workload.output_mean / 2)
        if self.profile is not None:
            if self.tp != 1 or self.pp != 1 or self.ep != 1:
                raise ValueError("a fitted profile describes one device (TP1 PP1) only")
            self.cost = self.profile.cost_model()
            self.kv_tokens = self.profile.shape.num_gpu_blocks * self.profile.shape.block_size
            self.front_s = self.profile.front_end.intake_s
            return
        linked = replace(self.gpu, nvlink_gbps=self.link_gbps)
        roofline = RooflineCostModel(linked, self.model, tp=self.tp, pp=self.pp)
        self.cost, self._allreduce_s = roofline, roofline.allreduce_latency_s
        try:
            blocks = kv_capacity_blocks(
                self.model,
                self.gpu,
                tp=self.tp,
                pp=self.pp,
                block_size=self.limits.block_size,
                gpu_memory_utilization=self.limits.gpu_memory_utilization,
            )
        except ConfigError:
            blocks = 0
        self.kv_tokens = blocks * self.limits.block_size

    # -- memory ---------------------------------------------------------------------------

    @property
    def gpus(self) -> int:
        return self.tp * self.pp

    def weights_gib_per_gpu(self) -> float:
        return self.model.weight_bytes / self.gpus / 2**30

    def usable_gib_per_gpu(self) -> float:
        return self.gpu.memory_gb * self.limits.gpu_memory_utilization

    def kv_gib(self, tokens: float) -> float:
        """GiB per GPU for ``tokens`` tokens of KV on this shape."""
        kv_heads = max(1.0, self.model.num_kv_heads / self.tp)
        layers = math.ceil(self.model.num_layers / self.pp)
        per_token = 2 * layers * kv_heads * self.model.head_dim * self.model.dtype_bytes
        return tokens * per_token / 2**30

    def kv_room_gib(self) -> float:
        """GiB per GPU left for the KV cache (after weights; a fitted profile's KV blocks)."""
        if self.profile is not None:
            return self.kv_gib(self.kv_tokens)
        return self.usable_gib_per_gpu() - self.weights_gib_per_gpu()

    def memory_problem(self) -> str | None:
        """Why this shape cannot hold the weights and one p90 request, or None."""
        weights, usable = self.weights_gib_per_gpu(), self.usable_gib_per_gpu()
        util = self.limits.gpu_memory_utilization
        longest = self.workload.p90_prompt + self.workload.p90_output
        if self.profile is not None and longest > self.profile.shape.max_model_len:
            p = self.profile
            return (
                f"one p90 request ({longest:.0f} tokens) is longer than max_model_len "
                f"{p.shape.max_model_len} of the fitted {p.gpu} × {p.model} profile"
            )
        if self.kv_tokens == 0:
            return (
                f"weights need {weights:.1f} GiB per GPU (TP{self.tp}×PP{self.pp}) but only "
                f"{usable:.1f} GiB is usable ({self.gpu.memory_gb:g} GiB × {util:g})"
            )
        if longest > self.kv_tokens:
            return (
                f"KV cache for one p90 request ({longest:.0f} tokens, "
                f"{self.kv_gib(longest):.1f} GiB) exceeds the {self.kv_room_gib():.1f} GiB per "
                "GPU left after weights"
            )
        return None

    # -- step times ------------------------------------------------------------------------

    def _ep_adjust(self, step: float, tokens: int) -> float:
        """Step time with expert parallelism instead of TP for the MoE layers."""
        if self.ep <= 1 or tokens <= 0:
            return step
        m = self.model
        k = m.experts_per_token
        payload = tokens * m.hidden_size * m.dtype_bytes
        bw = self.link_gbps * 1e9
        allreduce = 2 * (self.tp - 1) / self.tp * payload / bw + self._allreduce_s
        all_to_all = 2 * k * (self.ep - 1) / self.ep * payload / bw
        comm = m.num_layers * (all_to_all + 2 * self._allreduce_s - allreduce)
        share = k * m.expert_params_per_layer / m.layer_params_active
        imbalance = min(
            float(self.ep), 1 + math.sqrt(2 * math.log(self.ep) * (self.ep - 1) / (tokens * k))
        )
        return step * (1 + share * (imbalance - 1)) + comm

    def decode_step(self, batch: float) -> float:
        """Seconds per step of a pure decode batch of ``batch`` sequences (interpolated)."""
        b = max(1.0, batch)
        lo = math.floor(b)
        t_lo = self._decode_int(lo)
        if b == lo:
            return t_lo
        return t_lo + (self._decode_int(lo + 1) - t_lo) * (b - lo)

    def _decode_int(self, batch: int) -> float:
        cached = self._decode.get(batch)
        if cached is None:
            cached = self._ep_adjust(self.cost.step_time([], [self.ctx] * batch), batch)
            self._decode[batch] = cached
        return cached

    def prefill_work(self, prompt: float, batch: float) -> float:
        """Seconds a prompt of ``prompt`` tokens adds to the steps it is chunked into, next to
        ``batch`` decoding sequences (``batch = 0``: a prefill-only instance)."""
        key = (max(1, round(prompt)), math.ceil(batch) if batch > 0 else 0)
        cached = self._prefill.get(key)
        if cached is None:
            p, b = key
            budget = max(1, self.limits.max_num_batched_tokens - b)
            decodes = [self.ctx] * b
            base = self._decode_int(b) if b else 0.0
            total, done = 0.0, 0
            while done < p:
                chunk = min(budget, p - done)
                step = self.cost.step_time([(chunk, done)], decodes)
                total += self._ep_adjust(step, chunk + b) - base
                done += chunk
            cached = total
            self._prefill[key] = cached
        return cached

    def chunks(self, prompt: float, batch: float) -> int:
        budget = max(1, self.limits.max_num_batched_tokens - math.ceil(batch))
        return max(1, math.ceil(prompt / budget))

    # -- roles at a rate -------------------------------------------------------------------

    def _kv_needed(self, batch: float) -> float:
        w = self.workload
        return (batch + 2 * math.sqrt(batch)) * (w.prompt_mean + w.output_mean / 2)

    def _ttft(self, rate: float, batch: float, rho: float, q: float, step: float) -> float:
        w = self.workload
        work = self.prefill_work(w.prompt_mean, batch)
        second = work**2 * (1 + w.prompt_cv2)
        mean_wait = rate * second / (2 * (1 - rho))
        own = self.prefill_work(w.p90_prompt, batch) + self.chunks(w.p90_prompt, batch) * (
            self.decode_step(batch) if batch > 0 else 0.0
        )
        return wait_quantile(mean_wait, rho, q) + own + step / 2 + self.front_s

    def colocated(self, rate: float, q: float) -> RoleState:
        """A GENERAL instance: chunked prefill mixed into the decode batches."""
        out = self.workload.output_mean
        step = self.decode_step(1)
        for _ in range(_MAX_ITER):
            batch = rate * out * step
            if batch > self.limits.max_num_seqs:
                return RoleState(rate, batch, step, math.inf, math.inf, 1.0, _SEQS)
            rho = rate * self.prefill_work(self.workload.prompt_mean, batch)
            if rho >= 1:
                return RoleState(rate, batch, math.inf, math.inf, math.inf, 1.0, _PREFILL)
            new = self.decode_step(batch) / (1 - rho)
            if abs(new - step) <= 1e-9 + 1e-7 * step:
                step = new
                break
            step = new
        else:
            return RoleState(rate, rate * out * step, step, math.inf, math.inf, 1.0, _SATURATED)
        batch = rate * out * step
        ttft = self._ttft(rate, batch, rho, q, step)
        busy = min(1.0, rho + (1 - rho) * min(1.0, batch / self.limits.max_num_seqs))
        work = self.prefill_work(self.workload.prompt_mean, batch)
        spread = math.sqrt(rate * step * work**2 * (1 + self.workload.prompt_cv2) / out)
        tpot = step + NormalDist().inv_cdf(q) * spread
        kv = self._kv_needed(batch)
        return RoleState(rate, batch, step, ttft, kv, busy, None, tpot)

    def prefill_only(self, rate: float, q: float) -> RoleState:
        """A PREFILLING instance: one prompt after another, KV handed off at once."""
        rho = rate * self.prefill_work(self.workload.prompt_mean, 0)
        if rho >= 1:
            return RoleState(rate, 0.0, 0.0, math.inf, 0.0, 1.0, _PREFILL, 0.0)
        ttft = self._ttft(rate, 0.0, rho, q, 0.0)
        return RoleState(rate, 0.0, 0.0, ttft, self.workload.p90_prompt, rho, None, 0.0)

    def decode_only(self, rate: float) -> RoleState:
        """A DECODING instance: the batch is whatever the arrival rate keeps in flight."""
        out = self.workload.output_mean
        step = self.decode_step(1)
        for _ in range(_MAX_ITER):
            batch = rate * out * step
            if batch > self.limits.max_num_seqs:
                return RoleState(rate, batch, step, 0.0, math.inf, 1.0, _SEQS)
            new = self.decode_step(batch)
            if abs(new - step) <= 1e-9 + 1e-7 * step:
                step = new
                break
            step = new
        else:
            return RoleState(rate, rate * out * step, step, 0.0, math.inf, 1.0, _SATURATED)
        batch = rate * out * step
        busy = min(1.0, batch / self.limits.max_num_seqs)
        return RoleState(rate, batch, step, 0.0, self._kv_needed(batch), busy, None, step)

    # -- checks and capacity ----------------------------------------------------------------

    def check(self, state: RoleState, *, ttft_s: float | None, tpot_s: float | None) -> RoleState:
        """``state`` with ``limit`` set to the first target it misses."""
        if state.limit is not None:
            return state
        limit: str | None = None
        if state.kv_tokens_needed > self.kv_tokens:
            limit = "KV cache"
        elif state.batch + 2 * math.sqrt(state.batch) > self.limits.max_num_seqs:
            limit = _SEQS
        elif tpot_s is not None and state.tpot_s > tpot_s and self.workload.p90_output > 1:
            limit = "TPOT"  # (a one-token answer has no time per output token after it)
        elif ttft_s is not None and state.ttft_s > ttft_s:
            limit = "TTFT"
        return replace(state, limit=limit)


def capacity(ok: Callable[[float], str | None], *, start: float = 1.0) -> tuple[float, str]:
    """The highest rate for which ``ok(rate)`` returns None (no limit hit), by doubling then
    bisection, and the limit hit just above it. Rate 0 when even a trickle misses."""
    probe = max(start, 1e-6)
    floor_limit = ok(1e-6)
    if floor_limit is not None:
        return 0.0, floor_limit
    lo, hi = 0.0, probe
    limit = ok(hi)
    while limit is None:
        lo, hi = hi, hi * 2
        if hi > 1e7:
            return lo, _SATURATED
        limit = ok(hi)
    top_limit = limit
    for _ in range(40):
        mid = (lo + hi) / 2
        hit = ok(mid)
        if hit is None:
            lo = mid
        else:
            hi, top_limit = mid, hit
        if hi - lo <= 1e-4 * hi:
            break
    return lo, top_limit
