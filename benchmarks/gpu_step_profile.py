"""Time a Llama-shaped model's engine steps on a GPU, to check the simulator's cost model.

No vLLM and no weights are needed: the script builds the model's tensors with random
values (Llama-3-8B's shape by default, bf16) in plain PyTorch, lays its KV cache out as
contiguous per-sequence blocks, and times whole engine steps as vLLM runs them: every
layer's projections and MLP over all the step's tokens, FlashAttention (PyTorch's
``scaled_dot_product_attention``) per sequence, the KV write, the LM head on each
sequence's last token and a greedy sample, captured in a CUDA graph and replayed (vLLM
replays CUDA graphs too), timed with CUDA events. Its sections (``--sections``, all by
default, in this order):

* ``ceiling``: a large bf16 matrix product and a device copy, the card's own rates;
* ``linear``: one layer's projections and MLP with their element-wise work, by tokens in
  the batch (the quantity ``RooflineCostModel.per_layer_time_s`` models), and ``gemm``:
  the four products alone;
* ``attention``: the attention kernels alone (the prefill and decode points below), and
  ``head``: the LM head and the sample, by sequences;
* ``steps``: whole steps: ``prefill`` (one prompt of N tokens; ``ctx`` > 0, a chunk after
  ``ctx`` cached tokens), ``prefill_batch`` (k prompts in one step), ``decode`` (B
  sequences of context C, one token each), ``mixed`` (a prefill chunk and B decodes);
* ``lora``: decode and prefill steps with rank-r LoRA on every projection, batched as
  vLLM's punica kernels batch it (one shrink and one expand product per projection group
  for the whole batch, over ``max_loras`` stacked slots), each beside the same step
  without (``lora_base``);
* ``swap``: bringing an adapter into a slot, one copy per layer, projection slice and
  matrix, from pinned host memory (vLLM keeps its CPU adapter cache pinned) and from
  pageable memory.

``--fused`` runs the element-wise work (residual add with RMS norm, SiLU with the
product, the rotary embedding) as fused kernels (``torch.compile``), as vLLM's own kernels
fuse it; without, one PyTorch kernel per operation. Results go to ``OUT/gpu_steps.json``
after every measurement, so a run cut short keeps what it measured; ``--budget-s`` stops
starting measurements once spent, and points whose KV cache does not fit the pool are
recorded as skipped. The recorded H200 runs and their comparison with the cost model are
in docs/benchmarks.md ("GPU steps"); ``benchmarks/gpu_step_compare.py`` prints it for any
run.

    python3 benchmarks/gpu_step_profile.py --out OUT --fused       # on a GPU machine
    python3 benchmarks/gpu_step_profile.py --shape tiny --device cpu --smoke --out /tmp/x
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

SHAPES: dict[str, dict[str, int]] = {  # the simulator's ModelSpecs of these names
    "llama-3-8b": {
        "layers": 32,
        "hidden": 4096,
        "heads": 32,
        "kv_heads": 8,
        "head_dim": 128,
        "mlp": 14336,
        "vocab": 128256,
    },
    "llama-2-7b": {
        "layers": 32,
        "hidden": 4096,
        "heads": 32,
        "kv_heads": 32,
        "head_dim": 128,
        "mlp": 11008,
        "vocab": 32000,
    },
    "llama-2-13b": {
        "layers": 40,
        "hidden": 5120,
        "heads": 40,
        "kv_heads": 40,
        "head_dim": 128,
        "mlp": 13824,
        "vocab": 32000,
    },
    "qwen2.5-7b": {
        "layers": 28,
        "hidden": 3584,
        "heads": 28,
        "kv_heads": 4,
        "head_dim": 128,
        "mlp": 18944,
        "vocab": 152064,
    },
    "tiny": {
        "layers": 2,
        "hidden": 128,
        "heads": 2,
        "kv_heads": 2,
        "head_dim": 64,
        "mlp": 512,
        "vocab": 32000,
    },
}


SECTIONS = ("ceiling", "linear", "gemm", "attention", "head", "steps", "lora", "swap")
"""What a run measures, in this order: the card's rates, a layer's projections and MLP
with and without their element-wise work, attention and the LM head alone, whole steps,
LoRA steps, adapter swaps."""


@dataclass(frozen=True)
class Step:
    """One engine step: prefill chunks ``(new, ctx)`` and decode contexts."""

    prefill: tuple[tuple[int, int], ...] = ()
    decode: tuple[int, ...] = ()

    def tokens(self) -> int:
        return sum(n for n, _ in self.prefill) + len(self.decode)

    def kv_tokens(self) -> int:
        """Cache slots the step touches: every sequence's context and new tokens."""
        return sum(n + c for n, c in self.prefill) + sum(c + 1 for c in self.decode)


def rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    v = x.float().pow(2).mean(-1, keepdim=True)
    return (x.float() * torch.rsqrt(v + 1e-5)).to(x.dtype) * weight


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    x = x + delta
    return x, rms_norm(x, weight)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    g, u = gate_up.chunk(2, dim=-1)
    return F.silu(g) * u


def rope(
    q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama's rotary embedding (halves rotated) of q and k, each [T, heads, hd]."""
    freqs = pos.float()[:, None] * inv_freq[None, :]
    cos = freqs.cos()[:, None, :]
    sin = freqs.sin()[:, None, :]

    def turn(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    return turn(q), turn(k)


class Model:
    """Llama's tensors, random, and a forward pass over one :class:`Step`."""

    def __init__(
        self, shape: dict[str, int], device: torch.device, pool_tokens: int, seed: int = 0
    ) -> None:
        torch.manual_seed(seed)
        self.s = shape
        self.device = device
        dt = torch.bfloat16
        h, hd, nh, kv = shape["hidden"], shape["head_dim"], shape["heads"], shape["kv_heads"]
        qkv_out = (nh + 2 * kv) * hd

        def w(*dims: int) -> torch.Tensor:
            return torch.randn(*dims, device=device, dtype=dt) * 0.02

        self.layers = [
            {
                "ln1": torch.ones(h, device=device, dtype=dt),
                "qkv": w(qkv_out, h),
                "o": w(h, nh * hd),
                "ln2": torch.ones(h, device=device, dtype=dt),
                "gate_up": w(2 * shape["mlp"], h),
                "down": w(h, shape["mlp"]),
            }
            for _ in range(shape["layers"])
        ]
        self.embed = w(shape["vocab"], h)
        self.norm = torch.ones(h, device=device, dtype=dt)
        self.lm_head = w(shape["vocab"], h)
        # one flat K and V pool per layer; a step views it as [seqs, kv_heads, len, hd]
        self.pool_tokens = pool_tokens
        self.k_pool = [
            torch.randn(pool_tokens * kv * hd, device=device, dtype=dt)
            for _ in range(shape["layers"])
        ]
        self.v_pool = [
            torch.randn(pool_tokens * kv * hd, device=device, dtype=dt)
            for _ in range(shape["layers"])
        ]
        inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, device=device).float() / hd))
        self.inv_freq = inv
        self.fused = False
        self.lora: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] | None = None
        self.lora_single: int | None = None
        self.lora_masks: dict[str, torch.Tensor] = {}

    # LoRA as vLLM's punica kernels batch it: every slot's A side by side (one shrink
    # product for the batch), each token's slots but its own zeroed, every slot's B
    # stacked (one expand product adds the token's own adapter's delta).
    def set_lora(self, rank: int, slots: int) -> None:
        s, dt, dev = self.s, torch.bfloat16, self.device
        h, hd, nh, kv, mlp = s["hidden"], s["head_dim"], s["heads"], s["kv_heads"], s["mlp"]
        groups = {
            "qkv": (h, [nh * hd, kv * hd, kv * hd]),
            "o": (nh * hd, [h]),
            "gate_up": (h, [mlp, mlp]),
            "down": (mlp, [h]),
        }
        self.lora = []
        for _ in range(s["layers"]):
            layer = {}
            for name, (d_in, outs) in groups.items():
                n_slices = len(outs)
                a = torch.randn(d_in, slots * n_slices * rank, device=dev, dtype=dt) * 0.01
                # B block-diagonal per slice: slice j's rank rows write slice j's columns
                b = torch.zeros(slots * n_slices * rank, sum(outs), device=dev, dtype=dt)
                for slot in range(slots):
                    col = 0
                    for j, out in enumerate(outs):
                        row = (slot * n_slices + j) * rank
                        b[row : row + rank, col : col + out] = (
                            torch.randn(rank, out, device=dev, dtype=dt) * 0.01
                        )
                        col += out
                layer[name] = (a, b)
            self.lora.append(layer)
        self.lora_rank = rank
        self.lora_slots = slots

    def lora_tokens(self, slot_of_token: list[int]) -> None:
        """The step's tokens' slots (-1: no adapter). A batch of one adapter takes two
        products per projection (shrink, expand), as vLLM's kernels do; a batch of several
        a third, the mask that zeroes each token's other slots (made once per step)."""
        assert self.lora is not None
        t = len(slot_of_token)
        per_slot = torch.zeros(t, self.lora_slots, device=self.device, dtype=torch.bfloat16)
        for i, slot in enumerate(slot_of_token):
            if slot >= 0:
                per_slot[i, slot] = 1
        slots = set(slot_of_token)
        self.lora_single = slots.pop() if len(slots) == 1 and min(slot_of_token) >= 0 else None
        self.lora_masks = {
            name: per_slot.repeat_interleave(a.shape[1] // self.lora_slots, dim=1)
            for name, (a, _) in self.lora[0].items()
        }

    def _lora(self, x: torch.Tensor, y: torch.Tensor, layer: int, name: str) -> None:
        assert self.lora is not None
        a, b = self.lora[layer][name]
        if self.lora_single is not None:
            width = a.shape[1] // self.lora_slots
            cols = slice(self.lora_single * width, (self.lora_single + 1) * width)
            y.addmm_(x @ a[:, cols], b[cols])
        else:
            y.addmm_((x @ a) * self.lora_masks[name], b)

    def gemms(self, x: torch.Tensor, attn: torch.Tensor, mlp: torch.Tensor) -> None:
        """Every layer's four products alone, on fixed inputs (no element-wise work)."""
        for layer in self.layers:
            F.linear(x, layer["qkv"])
            F.linear(attn, layer["o"])
            F.linear(x, layer["gate_up"])
            F.linear(mlp, layer["down"])

    def forward(
        self,
        step: Step,
        ids: torch.Tensor,
        pos: torch.Tensor,
        last: torch.Tensor,
        *,
        attention: bool = True,
        lora: bool = False,
    ) -> torch.Tensor:
        x = F.embedding(ids, self.embed)
        x = self.layers_forward(step, x, pos, attention=attention, lora=lora)
        x = rms_norm(x.index_select(0, last), self.norm)
        logits = F.linear(x, self.lm_head)
        return logits.argmax(-1)

    def layers_forward(
        self, step: Step, x: torch.Tensor, pos: torch.Tensor, *, attention: bool, lora: bool
    ) -> torch.Tensor:
        """Every layer over ``x``; without ``attention`` the query's part of the QKV
        product stands in for attention's output (the projections and MLP alone)."""
        nh_hd = self.s["heads"] * self.s["head_dim"]
        pending: torch.Tensor | None = None  # the last MLP's output, not yet added
        for i, layer in enumerate(self.layers):
            x, r = self.add_norm(x, pending, layer["ln1"])
            qkv = F.linear(r, layer["qkv"])
            if lora:
                self._lora(r, qkv, i, "qkv")
            if attention:
                att = self.attention(i, step, qkv, pos)
            else:
                att = qkv[:, :nh_hd]
            o = F.linear(att, layer["o"])
            if lora:
                self._lora(att, o, i, "o")
            x, r = self.add_norm(x, o, layer["ln2"])
            gu = F.linear(r, layer["gate_up"])
            if lora:
                self._lora(r, gu, i, "gate_up")
            m = self.fused_silu_mul(gu) if self.fused else silu_mul(gu)
            d = F.linear(m, layer["down"])
            if lora:
                self._lora(m, d, i, "down")
            pending = d
        return x if pending is None else x + pending

    def add_norm(
        self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual added (when there is one) and the RMS norm of the sum."""
        if self.fused:
            if delta is None:
                return x, self.fused_rms(x, weight)
            added: tuple[torch.Tensor, torch.Tensor] = self.fused_add_rms(x, delta, weight)
            return added
        if delta is not None:
            x = x + delta
        return x, rms_norm(x, weight)

    def fuse(self) -> None:
        """Element-wise work as fused kernels (torch.compile), as vLLM's own kernels fuse
        the residual add with the norm, SiLU with the product, and the rotary embedding."""
        self.fused = True
        self.fused_rms = torch.compile(rms_norm, dynamic=True, fullgraph=True)
        self.fused_add_rms = torch.compile(add_rms_norm, dynamic=True, fullgraph=True)
        self.fused_silu_mul = torch.compile(silu_mul, dynamic=True, fullgraph=True)
        self.fused_rope = torch.compile(rope, dynamic=True, fullgraph=True)

    def attention(
        self, layer: int, step: Step, qkv: torch.Tensor, pos: torch.Tensor, *, prepare: bool = True
    ) -> torch.Tensor:
        """One layer's attention over the step's sequences; with ``prepare`` the rotary
        embedding and the new tokens' KV written to the cache first (without: the
        attention kernels alone)."""
        s = self.s
        hd, nh, kv = s["head_dim"], s["heads"], s["kv_heads"]
        q = qkv[:, : nh * hd].view(-1, nh, hd)
        k = qkv[:, nh * hd : (nh + kv) * hd].view(-1, kv, hd)
        v = qkv[:, (nh + kv) * hd :].view(-1, kv, hd)
        if prepare:
            q, k = (self.fused_rope if self.fused else rope)(q, k, pos, self.inv_freq)
        outs = []
        k_pool, v_pool = self.k_pool[layer], self.v_pool[layer]
        token = 0
        slot = 0
        for new, ctx in step.prefill:
            span = ctx + new
            kc = k_pool[slot * kv * hd : (slot + span) * kv * hd].view(1, kv, span, hd)
            vc = v_pool[slot * kv * hd : (slot + span) * kv * hd].view(1, kv, span, hd)
            if prepare:
                kc[0, :, ctx:, :] = k[token : token + new].transpose(0, 1)
                vc[0, :, ctx:, :] = v[token : token + new].transpose(0, 1)
            qs = q[token : token + new].transpose(0, 1).unsqueeze(0)
            if ctx == 0:
                a = F.scaled_dot_product_attention(qs, kc, vc, is_causal=True, enable_gqa=True)
            else:
                from torch.nn.attention.bias import causal_lower_right

                bias = causal_lower_right(new, span)
                a = F.scaled_dot_product_attention(qs, kc, vc, attn_mask=bias, enable_gqa=True)
            outs.append(a[0].transpose(0, 1).reshape(new, nh * hd))
            token += new
            slot += span
        if step.decode:
            b = len(step.decode)
            c = step.decode[0]
            assert all(d == c for d in step.decode), "decode contexts must be equal"
            span = c + 1
            kc = k_pool[slot * kv * hd : (slot + b * span) * kv * hd].view(b, kv, span, hd)
            vc = v_pool[slot * kv * hd : (slot + b * span) * kv * hd].view(b, kv, span, hd)
            if prepare:
                kc[:, :, c, :] = k[token : token + b]
                vc[:, :, c, :] = v[token : token + b]
            qs = q[token : token + b].unsqueeze(2)
            a = F.scaled_dot_product_attention(qs, kc, vc, enable_gqa=True)
            outs.append(a[:, :, 0, :].reshape(b, nh * hd))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)

    def inputs(self, step: Step) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids: list[int] = []
        pos: list[int] = []
        last: list[int] = []
        for new, ctx in step.prefill:
            ids.extend(range(7, 7 + new))
            pos.extend(range(ctx, ctx + new))
            last.append(len(ids) - 1)
        for c in step.decode:
            ids.append(11)
            pos.append(c)
            last.append(len(ids) - 1)
        dev = self.device

        def t(v: list[int]) -> torch.Tensor:
            return torch.tensor(v, device=dev, dtype=torch.long)

        return t([i % self.s["vocab"] for i in ids]), t(pos), t(last)


class Timer:
    """Median seconds of a callable: CUDA graph replays timed with events on a GPU."""

    def __init__(self, device: torch.device, target_s: float, repeats: int) -> None:
        self.cuda = device.type == "cuda"
        self.target_s = target_s
        self.repeats = repeats

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn: Callable[[], object], *, graph: bool = True) -> dict[str, Any]:
        fn()
        fn()
        self.sync()
        run = fn
        graphed = False
        g = None
        if self.cuda and graph:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                fn()
            torch.cuda.current_stream().wait_stream(stream)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            run = g.replay
            graphed = True
        run()
        self.sync()
        t0 = time.perf_counter()
        run()
        self.sync()
        once = max(time.perf_counter() - t0, 1e-6)
        reps = max(3, min(200, int(self.target_s / once)))
        samples = []
        for _ in range(self.repeats):
            if self.cuda:
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(reps):
                    run()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end) / 1000.0 / reps)
            else:
                t0 = time.perf_counter()
                for _ in range(reps):
                    run()
                samples.append((time.perf_counter() - t0) / reps)
        del g
        return {
            "s": statistics.median(samples),
            "min_s": min(samples),
            "max_s": max(samples),
            "reps": reps,
            "graph": graphed,
        }


def default_pool(shape: dict[str, int], device: torch.device) -> int:
    """KV cache tokens that fit in the GPU's free memory beside the model's weights and
    16 GiB of room for activations (at most 270,000; 4,096 off a GPU)."""
    if device.type != "cuda":
        return 4096
    h, hd, nh, kv = shape["hidden"], shape["head_dim"], shape["heads"], shape["kv_heads"]
    per_layer = (nh + 2 * kv) * hd * h + nh * hd * h + 3 * shape["mlp"] * h
    weights = 2 * (shape["layers"] * per_layer + 2 * shape["vocab"] * h)
    kv_per_token = shape["layers"] * 2 * kv * hd * 2
    free, _ = torch.cuda.mem_get_info(device)
    return max(1024, min(270_000, int((free - weights - 16 * 2**30) // kv_per_token)))


def gpu_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info |= {
            "name": p.name,
            "memory_gib": round(p.total_memory / 2**30, 1),
            "sms": p.multi_processor_count,
            "cuda": torch.version.cuda,
        }
        try:
            q = subprocess.run(
                [
                    "nvidia-smi",
                    "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem,power.limit",
                    "--format=csv,noheader",
                ],
                capture_output=True,
                text=True,
                timeout=20,
            )
            info["nvidia_smi"] = q.stdout.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            info["nvidia_smi"] = f"unavailable: {exc}"
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-3-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--budget-s", type=float, default=330.0)
    ap.add_argument("--target-s", type=float, default=0.15, help="seconds per timed sample")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--pool-tokens",
        type=int,
        default=None,
        help="KV cache tokens (default: what the GPU's free memory holds beside the weights "
        "and 16 GiB of room, at most 270,000); decode points that need more are skipped",
    )
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--smoke", action="store_true", help="a few small points of each kind")
    ap.add_argument(
        "--fused",
        action="store_true",
        help="element-wise work as fused kernels (torch.compile), as vLLM runs it",
    )
    ap.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated, of {', '.join(SECTIONS)} (default: all)",
    )
    args = ap.parse_args(argv)
    sections = set(args.sections.split(","))
    if sections - set(SECTIONS):
        ap.error(f"unknown sections {sorted(sections - set(SECTIONS))}; known: {SECTIONS}")

    started = time.perf_counter()
    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    out_file = args.out / "gpu_steps.json"
    shape = SHAPES[args.shape]
    result: dict[str, Any] = {
        "shape": args.shape,
        "dims": shape,
        "info": gpu_info(device),
        "lora_rank": args.lora_rank,
        "points": [],
        "errors": [],
        "skipped": [],
    }

    def save() -> None:
        result["elapsed_s"] = round(time.perf_counter() - started, 1)
        out_file.write_text(json.dumps(result, indent=1))

    def left() -> bool:
        return bool(time.perf_counter() - started < args.budget_s)

    timer = Timer(device, args.target_s, args.repeats)

    def record(kind: str, fn: Callable[[], dict[str, Any]], **key: Any) -> None:
        if not left():
            result["skipped"].append({"kind": kind, **key})
            return
        try:
            point = {"kind": kind, **key, **fn()}
        except Exception as exc:  # one failed point must not lose the run
            result["errors"].append({"kind": kind, **key, "error": f"{type(exc).__name__}: {exc}"})
            print(f"error {kind} {key}: {exc}", flush=True)
        else:
            result["points"].append(point)
            print(f"{kind} {key} {point['s'] * 1e3:.3f} ms", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        save()

    save()
    # the card's own ceilings first
    if device.type == "cuda" and not args.smoke and "ceiling" in sections:
        n = 8192
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16)

        def matmul() -> dict[str, Any]:
            r = timer.time(lambda: a @ b, graph=False)
            r["tflops"] = 2 * n**3 / r["s"] / 1e12
            return r

        record("ceiling", matmul, what="matmul_bf16_8192")
        src = torch.empty(2**31, device=device, dtype=torch.uint8)
        dst = torch.empty_like(src)

        def copy() -> dict[str, Any]:
            r = timer.time(lambda: dst.copy_(src), graph=False)
            r["tbps"] = 2 * src.numel() / r["s"] / 1e12  # read + write
            return r

        record("ceiling", copy, what="device_copy_2GiB")
        del a, b, src, dst
        torch.cuda.empty_cache()

    pool = 4096 if args.smoke else args.pool_tokens or default_pool(shape, device)
    result["pool_tokens"] = pool
    model = Model(shape, device, pool)
    if args.fused:
        model.fuse()
    result["fused"] = args.fused
    result["model_s"] = round(time.perf_counter() - started, 1)

    def step_point(
        step: Step, *, attention: bool = True, lora: bool = False
    ) -> Callable[[], dict[str, Any]]:
        def run() -> dict[str, Any]:
            if step.kv_tokens() > pool:
                raise ValueError(f"{step.kv_tokens()} cache tokens over the pool's {pool}")
            ids, pos, last = model.inputs(step)
            with torch.inference_mode():
                r = timer.time(
                    lambda: model.forward(step, ids, pos, last, attention=attention, lora=lora)
                )
            r["tokens"] = step.tokens()
            return r

        return run

    if args.smoke:
        linear_tokens = [1, 16]
        prefills = [(16, 0), (16, 32)]
        batches = [(2, 16)]
        decodes = [(1, 32), (4, 64)]
        mixed = [((16, 0), 4, 64)]
        lora_decodes = [(4, 64)]
        lora_prefills = [32]
        head_seqs = [1, 4]
    else:
        head_seqs = [1, 16, 64, 256]
        linear_tokens = [1, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
        prefills = [(n, 0) for n in (32, 128, 256, 512, 1024, 2048, 4096, 8192)]
        prefills += [(512, 1024), (512, 4096), (2048, 2048), (2048, 6144)]
        batches = [(4, 512), (8, 256), (4, 2048)]
        decodes = [(b, c) for c in (128, 1024, 4096) for b in (1, 8, 16, 32, 64, 128, 256)]
        decodes += [(1, 8192), (16, 8192)]
        mixed = [
            ((512, 0), 16, 1024),
            ((512, 0), 64, 1024),
            ((512, 0), 128, 1024),
            ((2048, 0), 64, 1024),
        ]
        lora_decodes = [(1, 1024), (16, 1024), (64, 1024), (256, 1024)]
        lora_prefills = [512, 2048]

    # the points whose KV cache the pool does not hold are skipped, and say so (where a
    # section asked for them uses them)
    users = {"prefill": {"steps", "attention"}, "decode": {"steps", "attention"},
             "prefill_batch": {"steps"}, "mixed": {"steps"}, "lora_decode": {"lora"}}  # fmt: skip

    def fits(step: Step, kind: str, **key: Any) -> bool:
        if step.kv_tokens() <= pool:
            return True
        if users[kind] & sections:
            why = f"over the {pool}-token KV pool"
            result["skipped"].append({"kind": kind, **key, "why": why})
        return False

    prefills = [
        (n, c) for n, c in prefills if fits(Step(prefill=((n, c),)), "prefill", new=n, ctx=c)
    ]
    batches = [
        (k, n)
        for k, n in batches
        if fits(Step(prefill=((n, 0),) * k), "prefill_batch", seqs=k, new=n)
    ]
    decodes = [(b, c) for b, c in decodes if fits(Step(decode=(c,) * b), "decode", batch=b, ctx=c)]
    mixed = [
        ((n, c), b, dc)
        for (n, c), b, dc in mixed
        if fits(Step(prefill=((n, c),), decode=(dc,) * b), "mixed", new=n, ctx=c, batch=b, dctx=dc)
    ]
    lora_decodes = [
        (b, c)
        for b, c in lora_decodes
        if fits(Step(decode=(c,) * b), "lora_decode", batch=b, ctx=c)
    ]

    # one layer's projections and MLP: the layers alone (no embedding, attention or LM
    # head), divided by their number
    def linear_point(t: int) -> Callable[[], dict[str, Any]]:
        def run() -> dict[str, Any]:
            x = torch.randn(t, shape["hidden"], device=device, dtype=torch.bfloat16)
            pos = torch.zeros(t, device=device, dtype=torch.long)
            with torch.inference_mode():
                r = timer.time(
                    lambda: model.layers_forward(Step(), x, pos, attention=False, lora=False)
                )
            r["per_layer_s"] = r["s"] / shape["layers"]
            return r

        return run

    # the four products alone: what is left of "linear" is the element-wise work
    def gemm_point(t: int) -> Callable[[], dict[str, Any]]:
        def run() -> dict[str, Any]:
            def x(width: int) -> torch.Tensor:
                return torch.randn(t, width, device=device, dtype=torch.bfloat16)

            inputs = (x(shape["hidden"]), x(shape["heads"] * shape["head_dim"]), x(shape["mlp"]))
            with torch.inference_mode():
                r = timer.time(lambda: model.gemms(*inputs))
            r["per_layer_s"] = r["s"] / shape["layers"]
            return r

        return run

    # attention kernels alone, every layer's cache (no rotary embedding, no KV write)
    def attention_point(step: Step) -> Callable[[], dict[str, Any]]:
        def run() -> dict[str, Any]:
            if step.kv_tokens() > pool:
                raise ValueError(f"{step.kv_tokens()} cache tokens over the pool's {pool}")
            width = (shape["heads"] + 2 * shape["kv_heads"]) * shape["head_dim"]
            qkv = torch.randn(step.tokens(), width, device=device, dtype=torch.bfloat16)
            pos = torch.zeros(step.tokens(), device=device, dtype=torch.long)

            def attend() -> None:
                for i in range(shape["layers"]):
                    model.attention(i, step, qkv, pos, prepare=False)

            with torch.inference_mode():
                return timer.time(attend)

        return run

    # the LM head on each sequence's last token, and the greedy sample
    def head_point(seqs: int) -> Callable[[], dict[str, Any]]:
        def run() -> dict[str, Any]:
            x = torch.randn(seqs, shape["hidden"], device=device, dtype=torch.bfloat16)
            with torch.inference_mode():
                return timer.time(lambda: F.linear(x, model.lm_head).argmax(-1))

        return run

    if "linear" in sections:
        for t in linear_tokens:
            record("linear", linear_point(t), tokens=t)
    if "gemm" in sections:
        for t in linear_tokens:
            record("gemm", gemm_point(t), tokens=t)
    if "attention" in sections:
        for new, ctx in prefills:
            record("attn_prefill", attention_point(Step(prefill=((new, ctx),))), new=new, ctx=ctx)
        for b, c in decodes:
            record("attn_decode", attention_point(Step(decode=(c,) * b)), batch=b, ctx=c)
    if "head" in sections:
        for seqs in head_seqs:
            record("head", head_point(seqs), seqs=seqs)
    if "steps" not in sections:
        prefills, batches, decodes, mixed = [], [], [], []
    for new, ctx in prefills:
        record("prefill", step_point(Step(prefill=((new, ctx),))), new=new, ctx=ctx)
    for k, new in batches:
        record("prefill_batch", step_point(Step(prefill=((new, 0),) * k)), seqs=k, new=new)
    for b, c in decodes:
        record("decode", step_point(Step(decode=(c,) * b)), batch=b, ctx=c)
    for (new, ctx), b, c in mixed:
        step = Step(prefill=((new, ctx),), decode=(c,) * b)
        record("mixed", step_point(step), new=new, ctx=ctx, batch=b, dctx=c)

    # LoRA: the same steps with and without, side by side
    for slots in (1, 4) if "lora" in sections else ():
        model.set_lora(args.lora_rank, slots)
        for b, c in lora_decodes:
            step = Step(decode=(c,) * b)
            if slots == 1:
                record("lora_base", step_point(step), batch=b, ctx=c)
            for adapters in sorted({1, min(slots, b)}):
                model.lora_tokens([i % adapters for i in range(b)])
                record(
                    "lora_decode",
                    step_point(step, lora=True),
                    batch=b,
                    ctx=c,
                    max_loras=slots,
                    adapters=adapters,
                )
        for new in lora_prefills:
            step = Step(prefill=((new, 0),))
            if slots == 1:
                record("lora_base", step_point(step), new=new, ctx=0)
            model.lora_tokens([0] * new)
            record("lora_prefill", step_point(step, lora=True), new=new, max_loras=slots)
    model.lora = None

    # bringing an adapter into a slot: vLLM copies each layer's A and B per projection
    # slice from its pinned CPU cache into the slot's place in the stacked GPU tensors
    def swap(pinned: bool) -> Callable[[], dict[str, Any]]:
        def run() -> dict[str, Any]:
            s, r = shape, args.lora_rank
            h, hd, nh, kv, mlp = s["hidden"], s["head_dim"], s["heads"], s["kv_heads"], s["mlp"]
            pairs = [
                (h, nh * hd),
                (h, kv * hd),
                (h, kv * hd),
                (nh * hd, h),
                (h, mlp),
                (h, mlp),
                (mlp, h),
            ]
            host, gpu = [], []
            for _ in range(s["layers"]):
                for d_in, d_out in pairs:
                    for dims in ((d_in, r), (r, d_out)):
                        t = torch.randn(*dims, dtype=torch.bfloat16)
                        host.append(t.pin_memory() if pinned and device.type == "cuda" else t)
                        gpu.append(torch.empty(*dims, device=device, dtype=torch.bfloat16))

            def copy_all() -> None:
                for src, dst in zip(host, gpu, strict=True):
                    dst.copy_(src, non_blocking=pinned)

            out = timer.time(copy_all, graph=False)
            out["copies"] = len(host)
            out["bytes"] = sum(t.numel() * 2 for t in host)
            return out

        return run

    if "swap" in sections:
        record("lora_swap", swap(True), pinned=True)
        record("lora_swap", swap(False), pinned=False)
    save()
    print(
        f"done in {time.perf_counter() - started:.0f} s: {len(result['points'])} points, "
        f"{len(result['errors'])} errors, {len(result['skipped'])} skipped",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
