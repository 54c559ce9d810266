"""Step-time cost models for the simulated engine.

A cost model answers one question: how long does one engine step take, given the prefill
chunks and decode sequences in its batch? Two implementations share the :class:`CostModel`
protocol:

* :class:`RooflineCostModel` derives the time from a :class:`~sage_llm.sim.specs.GPUSpec`
  and a :class:`~sage_llm.sim.specs.ModelSpec`: compute time (FLOPs at a fraction of peak)
  and memory time (bytes at a fraction of HBM bandwidth), combined by a smooth maximum,
  plus a fixed per-step overhead, a tensor-parallel all-reduce term and a pipeline bubble.
* :class:`LinearStepModel` is the fitted model of llm-d's simulator,
  ``β0 + β1·prefill_tokens + β2·decode_tokens``; :func:`fit_linear_step_model` fits one to
  measured samples by least squares.

Outside the steps, :class:`FrontEndModel` describes an engine's front end (vLLM's API
server): a single server in front of the core that spends ``intake_s`` on each new request
before the core sees it and ``per_output_s`` on each output a step produces;
:class:`FrontEndQueue` is that server's FIFO timeline.

See ``docs/simulator.md`` for the formulas and the measured fidelity.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from sage_llm.errors import ConfigError
from sage_llm.sim.specs import GPUSpec, ModelSpec, get_gpu, get_model

log = logging.getLogger("sage_llm.sim.costmodel")

PrefillChunk = tuple[int, int]
"""``(new_tokens, context_len)``: tokens computed in this step, tokens already in the KV."""


@runtime_checkable
class CostModel(Protocol):
    """How long one engine step takes."""

    @property
    def name(self) -> str: ...

    def step_time(
        self, prefill_tokens: Sequence[PrefillChunk], decode_contexts: Sequence[int]
    ) -> float:
        """Seconds for one step computing ``prefill_tokens`` chunks and one token for each
        decode sequence (``decode_contexts`` are their current context lengths)."""
        ...

    def describe(self) -> dict[str, Any]:
        """The model's parameters, JSON-serialisable, for reports."""
        ...


def _soft_max(a: float, b: float, p: float) -> float:
    """``(a^p + b^p)^(1/p)``: the roofline's max, smoothed near the ridge point."""
    if math.isinf(p):
        return max(a, b)
    top = max(a, b)
    if top <= 0.0:
        return 0.0
    return float(top * ((a / top) ** p + (b / top) ** p) ** (1.0 / p))


@dataclass(frozen=True, slots=True)
class RooflineCostModel:
    """Roofline step time for ``model`` on ``tp × pp`` GPUs of type ``gpu``.

    * FLOPs = 2 × active parameters of the layers × tokens + 2 × LM head × sequences
      + attention (prefill ``4·L·d·new·(context + new/2)``, decode ``4·L·d·context``).
    * Bytes = weights touched (all dense weights; for MoE only the experts the batch can
      reach) + KV cache read for the contexts + KV written for the new tokens.
    * time = softmax_p(FLOPs / (peak·MFU·tp), bytes / (bandwidth·eff·tp)) + overhead,
      with ``sharpness`` p (``math.inf`` gives the strict roofline max; the default 2 fits
      measured per-layer times near the ridge point, see docs/simulator.md).
    * TP > 1 adds two ring all-reduces of the activations per layer over NVLink (or PCIe),
      on the critical path (not overlapped with compute).
    * PP > 1 splits the batch into ``m ≤ min(pp, sequences)`` micro-batches (the ``m`` with
      the shortest step) that flow through ``pp`` stages on a GPipe schedule:
      ``m + pp − 1`` stage slots, each the roofline time of one micro-batch on one stage.
    """

    gpu: GPUSpec
    model: ModelSpec
    tp: int = 1
    pp: int = 1
    prefill_mfu: float = 0.62
    decode_bw_eff: float = 0.7
    overhead_s: float = 0.001
    sharpness: float = 2.0
    allreduce_latency_s: float = 5e-6

    def __post_init__(self) -> None:
        if self.tp < 1 or self.pp < 1:
            raise ValueError("tp and pp must be >= 1")
        if self.pp > self.model.num_layers:
            raise ConfigError(  # placement_problem's words
                f"pipeline-parallel size {self.pp} is more than {self.model.name}'s "
                f"{self.model.num_layers} layers (a stage needs one at least)",
                key="pp",
            )
        if not 0 < self.prefill_mfu <= 1 or not 0 < self.decode_bw_eff <= 1:
            raise ValueError("prefill_mfu and decode_bw_eff must be in (0, 1]")
        if self.overhead_s < 0 or self.allreduce_latency_s < 0:
            raise ValueError("overheads must be >= 0")
        if not self.sharpness >= 1:
            raise ValueError("sharpness must be >= 1")

    @classmethod
    def from_names(cls, gpu: str, model: str, **kwargs: Any) -> RooflineCostModel:
        """Build from built-in spec names, e.g. ``from_names("h100", "llama-3-8b", tp=2)``."""
        return cls(get_gpu(gpu), get_model(model), **kwargs)

    @property
    def name(self) -> str:
        return "roofline"

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "gpu": self.gpu.name,
            "model": self.model.name,
            "tp": self.tp,
            "pp": self.pp,
            "prefill_mfu": self.prefill_mfu,
            "decode_bw_eff": self.decode_bw_eff,
            "overhead_s": self.overhead_s,
            "sharpness": self.sharpness,
        }

    # -- building blocks -------------------------------------------------------------

    def _flops_rate(self) -> float:
        return self.gpu.peak_tflops * 1e12 * self.prefill_mfu * self.tp

    def _bytes_rate(self) -> float:
        return self.gpu.hbm_tbps * 1e12 * self.decode_bw_eff * self.tp

    def _experts_reached(self, tokens: int) -> int:
        """Experts per layer a batch of ``tokens`` can touch (1 for a dense model)."""
        m = self.model
        return min(m.num_experts, max(1, tokens) * m.experts_per_token)

    def _weight_bytes_touched(self, tokens: int) -> float:
        """Weights read by a batch: MoE batches read only the experts they can reach."""
        m = self.model
        idle = m.num_experts - self._experts_reached(tokens)
        return m.weight_bytes - idle * m.expert_params_per_layer * m.num_layers * m.dtype_bytes

    def _allreduce_s(self, tokens: int, layers: int) -> float:
        """Two ring all-reduces of the activations per layer when ``tp > 1``."""
        if self.tp == 1 or tokens <= 0:
            return 0.0
        m = self.model
        payload = tokens * m.hidden_size * m.dtype_bytes
        per_call = 2 * (self.tp - 1) / self.tp * payload / (self.gpu.interconnect_gbps * 1e9)
        return 2 * layers * (per_call + self.allreduce_latency_s)

    def _pipeline_s(
        self, flops: float, weights: float, kv_bytes: float, tokens: int, micro: int
    ) -> float:
        """The batch split into ``micro`` micro-batches flowing through ``pp`` stages."""
        pp = self.pp
        slot_compute = flops / (pp * micro) / self._flops_rate()
        slot_memory = (weights / pp + kv_bytes / (pp * micro)) / self._bytes_rate()
        total = (micro + pp - 1) * _soft_max(slot_compute, slot_memory, self.sharpness)
        if pp > 1:
            hop = tokens / micro * self.model.hidden_size * self.model.dtype_bytes
            total += (pp - 1) * micro * hop / (self.gpu.interconnect_gbps * 1e9)
        return total

    def per_layer_time_s(self, tokens_in_batch: int) -> float:
        """Time of the non-attention part of one layer (projections and MLP) for a batch of
        ``tokens_in_batch`` tokens, on this model's TP group."""
        if tokens_in_batch < 0:
            raise ValueError("tokens_in_batch must be >= 0")
        if tokens_in_batch == 0:
            return 0.0
        m = self.model
        experts = self._experts_reached(tokens_in_batch)
        params = m.attn_params_per_layer + experts * m.expert_params_per_layer
        compute = 2.0 * tokens_in_batch * m.layer_params_active / self._flops_rate()
        memory = params * m.dtype_bytes / self._bytes_rate()
        return _soft_max(compute, memory, self.sharpness) + self._allreduce_s(tokens_in_batch, 1)

    def step_time(
        self, prefill_tokens: Sequence[PrefillChunk], decode_contexts: Sequence[int]
    ) -> float:
        m = self.model
        new_tokens = 0
        seqs = len(prefill_tokens) + len(decode_contexts)
        if seqs == 0:
            return 0.0
        attn_flops = 0.0
        kv_read_tokens = 0
        d_attn = m.num_heads * m.head_dim
        for new, ctx in prefill_tokens:
            new_tokens += new
            attn_flops += 4.0 * m.num_layers * d_attn * new * (ctx + new / 2.0)
            kv_read_tokens += ctx
        ctx_total = sum(decode_contexts)
        attn_flops += 4.0 * m.num_layers * d_attn * ctx_total
        kv_read_tokens += ctx_total
        tokens = new_tokens + len(decode_contexts)
        linear_flops = 2.0 * tokens * m.num_layers * m.layer_params_active
        head_flops = 2.0 * seqs * m.vocab_size * m.hidden_size
        flops = linear_flops + head_flops + attn_flops
        weights = self._weight_bytes_touched(tokens)
        kv_bytes = float(kv_read_tokens + tokens) * m.kv_bytes_per_token

        pipeline = min(
            self._pipeline_s(flops, weights, kv_bytes, tokens, micro)
            for micro in range(1, min(self.pp, seqs) + 1)
        )
        return pipeline + self._allreduce_s(tokens, m.num_layers) + self.overhead_s


@dataclass(frozen=True, slots=True)
class LinearStepModel:
    """llm-d's fitted step model: ``β0 + β1·prefill tokens + β2·decode tokens`` (µs).

    ``prefill tokens`` are the uncached prompt tokens computed in the step; the context
    length does not enter the model.
    """

    beta0_us: float
    beta1_us_per_prefill_token: float
    beta2_us_per_decode_token: float
    label: str = "linear"

    def __post_init__(self) -> None:
        if not math.isfinite(self.beta0_us):
            raise ConfigError(f"must be finite, got {self.beta0_us!r}", key="beta0_us")
        for key in ("beta1_us_per_prefill_token", "beta2_us_per_decode_token"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= 0):  # more tokens never take less
                raise ConfigError(f"must be a finite number >= 0, got {value!r}", key=key)
        # β0 may be negative (a fit's intercept under noise), as long as steps take time
        if self.beta0_us <= 0 and not (
            self.beta1_us_per_prefill_token > 0 or self.beta2_us_per_decode_token > 0
        ):
            raise ConfigError(
                f"every step would take no time (β0 {self.beta0_us:g} µs and no per-token cost)",
                key="beta0_us",
            )

    @classmethod
    def llama31_8b_h100(cls) -> LinearStepModel:
        """llm-d's published fit for Llama-3.1-8B on one H100 (TP1)."""
        return cls(5752.7, 17.25, 6.00, label="linear:llama-3.1-8b/h100/tp1")

    @property
    def name(self) -> str:
        return self.label

    @property
    def betas_us(self) -> tuple[float, float, float]:
        return (self.beta0_us, self.beta1_us_per_prefill_token, self.beta2_us_per_decode_token)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "betas_us": list(self.betas_us)}

    def step_time(
        self, prefill_tokens: Sequence[PrefillChunk], decode_contexts: Sequence[int]
    ) -> float:
        if not prefill_tokens and not decode_contexts:
            return 0.0
        prefill = sum(new for new, _ in prefill_tokens)
        us = (
            self.beta0_us
            + self.beta1_us_per_prefill_token * prefill
            + self.beta2_us_per_decode_token * len(decode_contexts)
        )
        return max(0.0, us) * 1e-6


def fit_linear_step_model(
    samples: Sequence[tuple[float, float, float]], *, label: str = "linear:fitted"
) -> LinearStepModel:
    """Least-squares fit of ``seconds ≈ β0 + β1·prefill_tokens + β2·decode_tokens``.

    ``samples`` are ``(prefill_tokens, decode_tokens, seconds)`` measurements; at least three,
    and varied enough in both token counts to determine all three coefficients.
    """
    if len(samples) < 3:
        raise ValueError("need at least 3 samples to fit a linear step model")
    data = np.asarray(samples, dtype=float)
    if data.ndim != 2 or data.shape[1] != 3 or not np.all(np.isfinite(data)):
        raise ValueError("samples must be finite (prefill_tokens, decode_tokens, seconds) rows")
    if np.any(data < 0) or np.any(data[:, 2] == 0):
        raise ValueError("samples must have token counts >= 0 and step times > 0")
    design = np.column_stack([np.ones(len(data)), data[:, 0], data[:, 1]])
    y = data[:, 2] * 1e6
    keep = [0, 1, 2]
    while True:
        coef, _, rank, _ = np.linalg.lstsq(design[:, keep], y, rcond=None)
        if rank < len(keep):
            raise ValueError("samples do not vary enough in prefill and decode tokens to fit")
        negative = [(k, c) for k, c in zip(keep, coef, strict=True) if c < 0 and k != 0]
        if not negative:
            break
        k, c = negative[0]  # a step cannot get faster with more tokens: that term is 0
        log.warning(
            "%s: the fit gives %s = %.4g µs a token; refitted with it 0", label, _BETAS[k], c
        )
        keep.remove(k)
    full = dict(zip(keep, (float(c) for c in coef), strict=True))
    return LinearStepModel(full[0], full.get(1, 0.0), full.get(2, 0.0), label=label)


_BETAS = ("β0", "β1 (prefill tokens)", "β2 (decode tokens)")


@dataclass(frozen=True, slots=True)
class FrontEndModel:
    """The engine's front end: one server (vLLM's API-server thread) in front of the core.

    * ``intake_s``: front-end time per new request (HTTP handling, input processing, the
      hop to the engine core); the core sees the request only when its intake is done.
    * ``per_output_s``: front-end time per request per step that produced a token for it
      (output processing, detokenizing, the hop back); a step's outputs are one job.

    * ``shared_step_s``: seconds at the end of each engine step that run on the CPU core the
      front end runs on (vLLM's CPU build: the engine-core process beside the API server);
      while both are busy each runs at half speed (:class:`sage_llm.sim.engine.SharedCore`).
      0 (the default): the front end and the core never slow each other.

    Jobs are served one at a time in arrival order, so under concurrency a new request's
    intake waits behind the output processing of the running ones. All zero (the default)
    is no front end: requests reach the core at once and tokens are handed out as each step
    ends.
    """

    intake_s: float = 0.0
    per_output_s: float = 0.0
    shared_step_s: float = 0.0

    def __post_init__(self) -> None:
        for key in ("intake_s", "per_output_s", "shared_step_s"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= 0.0):
                raise ValueError(f"FrontEndModel.{key} must be finite and >= 0")

    @property
    def is_zero(self) -> bool:
        """True when the front end costs nothing (the engine behaves as without one)."""
        return self.intake_s == 0.0 and self.per_output_s == 0.0

    def outputs_s(self, outputs: int) -> float:
        """Front-end time of one step's ``outputs`` (requests that got tokens)."""
        return self.per_output_s * outputs

    def at_speed(self, speed: float) -> FrontEndModel:
        """This front end on an engine ``speed`` times as fast (every time / ``speed``)."""
        if speed == 1.0:
            return self
        return FrontEndModel(
            self.intake_s / speed, self.per_output_s / speed, self.shared_step_s / speed
        )

    def describe(self) -> dict[str, Any]:
        return {
            "intake_s": self.intake_s,
            "per_output_s": self.per_output_s,
            "shared_step_s": self.shared_step_s,
        }


class FrontEndQueue:
    """The FIFO timeline of a :class:`FrontEndModel`'s single server.

    Submit jobs in time order (``now`` never decreasing); each starts when it arrives or
    when the previous job ends, whichever is later.
    """

    __slots__ = ("busy_s", "free_at", "model")

    def __init__(self, model: FrontEndModel) -> None:
        self.model = model
        self.free_at = -math.inf
        self.busy_s = 0.0

    def submit(self, now: float, cost_s: float) -> tuple[float, float]:
        """Queue a job of ``cost_s`` arriving at ``now``; its ``(start, end)`` times."""
        start = max(now, self.free_at)
        self.free_at = start + cost_s
        self.busy_s += cost_s
        return start, self.free_at

    def intake(self, now: float) -> tuple[float, float]:
        """Queue a new request's intake."""
        return self.submit(now, self.model.intake_s)

    def outputs(self, now: float, outputs: int) -> tuple[float, float]:
        """Queue the processing of one step's ``outputs``."""
        return self.submit(now, self.model.outputs_s(outputs))


FastStepTime = Callable[[Sequence[PrefillChunk], int, int], float]
"""``(prefill chunks, decode count, decode context sum) -> seconds``."""


def fast_step_time(model: CostModel) -> FastStepTime | None:
    """``model.step_time`` as a function of the prefill chunks and the decode contexts'
    count and sum, for the built-in models that read only those (None for others).

    The same arithmetic, in the same order, on the same values — only the model's constant
    sub-expressions are computed once and the per-token-count weight bytes remembered — so
    every result equals ``model.step_time`` bit for bit (tests/sim/test_core_fastpath.py
    checks it). The roofline's is :class:`sage_llm.sim.roofline_step.RooflineStep`. Models
    with tensor or pipeline parallelism keep their own method."""
    if type(model) is LinearStepModel:
        b0, b1, b2 = model.betas_us

        def linear(prefill: Sequence[PrefillChunk], n_decode: int, ctx_sum: int) -> float:
            if not prefill and not n_decode:
                return 0.0
            us = b0 + b1 * sum(new for new, _ in prefill) + b2 * n_decode
            return max(0.0, us) * 1e-6

        return linear
    if type(model) is not RooflineCostModel or model.tp != 1 or model.pp != 1:
        return None
    # in a module of its own, which the opt-in accelerator compiles (it imports this one)
    from sage_llm.sim.roofline_step import RooflineStep

    return RooflineStep(model).time
