"""The roofline cost model's step time on the simulator's hot path.

:func:`sage_llm.sim.costmodel.fast_step_time` hands out :class:`RooflineStep` for a
roofline model without tensor or pipeline parallelism, and the engine core calls it once
per step. It has a module of its own so that the opt-in accelerator
(:mod:`sage_llm.sim.accel`) compiles it with the core while the cost model module stays
interpreted (mypyc does not take its ``runtime_checkable`` protocol); a change to the
formula in :class:`~sage_llm.sim.costmodel.RooflineCostModel` must be made here too (the
test above fails until it is).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from sage_llm.sim.costmodel import CostModel, PrefillChunk, RooflineCostModel

__all__ = ["RooflineStep", "roofline_step"]


class RooflineStep:
    """:meth:`RooflineCostModel.step_time` of a model with tp = pp = 1 as a function of the
    prefill chunks and the decode contexts' count and sum (:meth:`time`).

    The same arithmetic in the same order on the same values, only the model's constant
    sub-expressions computed once and the weight bytes per token count remembered, so every
    result equals ``step_time`` bit for bit (tests/sim/test_core_fastpath.py)."""

    __slots__ = (
        "attn",
        "bytes_rate",
        "fixed_weights",
        "flops_rate",
        "hidden",
        "inv_p",
        "kv_per_token",
        "num_layers",
        "overhead",
        "p",
        "params_active",
        "strict",
        "vocab",
        "weight_bytes",
        "weights_by_tokens",
    )

    def __init__(self, model: RooflineCostModel) -> None:
        m = model.model
        # ints as floats where the closure multiplies them into a float (the same value)
        self.num_layers = float(m.num_layers)
        self.attn = 4.0 * m.num_layers * (m.num_heads * m.head_dim)
        self.params_active = float(m.layer_params_active)
        self.vocab = float(m.vocab_size)
        self.hidden = float(m.hidden_size)
        self.kv_per_token = float(m.kv_bytes_per_token)
        self.flops_rate = model._flops_rate()
        self.bytes_rate = model._bytes_rate()
        self.p = float(model.sharpness)
        self.inv_p = 1.0 / self.p
        self.strict = math.isinf(self.p)
        self.overhead = float(model.overhead_s)
        self.weight_bytes = model._weight_bytes_touched
        self.weights_by_tokens: dict[int, float] = {}
        # Every batch reads all the weights when each token reaches every expert (a dense
        # model: one expert of one): _weight_bytes_touched is then the same for any count.
        self.fixed_weights: float | None = (
            float(model._weight_bytes_touched(1)) if m.experts_per_token >= m.num_experts else None
        )

    def time(self, prefill: Sequence[PrefillChunk], n_decode: int, ctx_sum: int) -> float:
        seqs = len(prefill) + n_decode
        if seqs == 0:
            return 0.0
        attn = self.attn
        new_tokens = 0
        attn_flops = 0.0
        kv_read_tokens = 0
        for new, ctx in prefill:
            new_tokens += new
            attn_flops += attn * new * (ctx + new / 2.0)
            kv_read_tokens += ctx
        attn_flops += attn * ctx_sum
        kv_read_tokens += ctx_sum
        tokens = new_tokens + n_decode
        flops = (
            2.0 * tokens * self.num_layers * self.params_active
            + 2.0 * seqs * self.vocab * self.hidden
            + attn_flops
        )
        weights = self.fixed_weights
        if weights is None:
            weights = self.weights_by_tokens.get(tokens)
            if weights is None:
                weights = self.weights_by_tokens[tokens] = float(self.weight_bytes(tokens))
        kv_bytes = float(kv_read_tokens + tokens) * self.kv_per_token
        a = flops / self.flops_rate
        b = (weights + kv_bytes) / self.bytes_rate
        top = a if a >= b else b
        if self.strict:
            slot = top
        elif top <= 0.0:
            slot = 0.0
        else:
            p = self.p
            slot = float(top * ((a / top) ** p + (b / top) ** p) ** self.inv_p)
        return slot + 0.0 + self.overhead


def roofline_step(model: CostModel) -> RooflineStep | None:
    """The fast step time of ``model`` when it is a roofline model with tp = pp = 1."""
    if type(model) is RooflineCostModel and model.tp == 1 and model.pp == 1:
        return RooflineStep(model)
    return None
