"""The recorded GPU step timings beside the simulator's cost model, as markdown tables.

Reads the runs of ``benchmarks/gpu_step_profile.py`` kept under
``benchmarks/recorded/h200-llama-3-8b/`` (or ``--dir``) and prints the tables of
docs/benchmarks.md ("GPU steps"): the card's own rates, one layer's projections and MLP by
tokens, whole steps (fused and plain element-wise work) against
``RooflineCostModel`` for the same GPU and model, attention alone, and LoRA's extra step
time with its fit. No GPU is needed::

    .venv/bin/python benchmarks/gpu_step_compare.py
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from sage_llm.bench.gpu_steps import (
    GpuRun,
    compare_steps,
    load_run,
    lora_fit,
    median_abs_error,
    median_steps,
    per_layer,
    steps,
    swap_seconds,
)
from sage_llm.sim.costmodel import RooflineCostModel

ROOT = Path(__file__).resolve().parents[1]
RUNS = ("plain", "parts", "fused", "fused-2", "lora")


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


def pct(x: float) -> str:
    return f"{x:+.1%}"


def table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=ROOT / "benchmarks/recorded/h200-llama-3-8b")
    ap.add_argument("--gpu", default="h200")
    ap.add_argument("--model", default="llama-3-8b")
    args = ap.parse_args(argv)
    runs = {name: load_run(args.dir / f"{name}.json") for name in RUNS}
    model = RooflineCostModel.from_names(args.gpu, args.model)
    gpu_only = RooflineCostModel.from_names(args.gpu, args.model, overhead_s=0.0)

    print("## The card\n")
    rows = []
    for run in runs.values():
        ceil = {p["what"]: p for p in run.of_kind("ceiling")}
        if ceil:
            rows.append([
                run.name,
                str(run.info.get("name")),
                f"{ceil['matmul_bf16_8192']['tflops']:.0f}",
                f"{ceil['device_copy_2GiB']['tbps']:.2f}",
            ])  # fmt: skip
    print(table(["run", "GPU", "bf16 8192³ TFLOP/s", "copy TB/s (read + write)"], rows))

    print("\n## One layer's projections and MLP (ms)\n")
    gemm = {t: m for t, m, _ in per_layer(runs["parts"], "gemm", model)}
    plain = {t: m for t, m, _ in per_layer(runs["parts"], "linear", model)}
    fused = {t: (m, mod) for t, m, mod in per_layer(runs["fused"], "linear", model)}
    rows = [
        [str(t), ms(gemm[t]), ms(fused[t][0]), ms(plain[t]), ms(fused[t][1]),
         pct(fused[t][1] / gemm[t] - 1)]
        for t in sorted(gemm)
    ]  # fmt: skip
    print(table(["tokens", "products", "+ fused element-wise", "+ plain element-wise",
                 "model", "model vs products"], rows))  # fmt: skip

    print("\n## Whole steps (ms): measured GPU time against the model\n")
    measured = median_steps([runs["fused"], runs["fused-2"]])
    plain_steps = {(s.prefill, s.decode): s for s in median_steps([runs["plain"], runs["parts"]])}
    rows = []
    for row, with_overhead in zip(
        compare_steps(measured, gpu_only), compare_steps(measured, model), strict=True
    ):
        s = row.step
        unfused = plain_steps.get((s.prefill, s.decode))
        rows.append([
            s.label,
            ms(s.seconds),
            ms(unfused.seconds) if unfused else "–",
            ms(row.model_s),
            pct(row.error),
            ms(with_overhead.model_s),
        ])  # fmt: skip
    print(table(["step", "fused", "plain", "model (GPU)", "error", "model + overhead_s"], rows))
    rows_gpu = compare_steps(measured, gpu_only)
    decode = [r for r in rows_gpu if not r.step.prefill]
    prefill = [r for r in rows_gpu if r.step.prefill]
    print(
        f"\nmedian |error|: decode {median_abs_error(decode):.1%} "
        f"(worst {max(abs(r.error) for r in decode):.1%}), with prefill "
        f"{median_abs_error(prefill):.1%} (worst {max(abs(r.error) for r in prefill):.1%})"
    )

    print("\n## Attention alone, every layer (ms)\n")
    spec = model.model
    flops_rate = model.gpu.peak_tflops * 1e12 * model.prefill_mfu
    bytes_rate = model.gpu.hbm_tbps * 1e12 * model.decode_bw_eff
    d_attn = spec.num_heads * spec.head_dim
    rows = []
    for p in runs["parts"].of_kind("attn_prefill"):
        new, ctx = p["new"], p["ctx"]
        flops = 4.0 * spec.num_layers * d_attn * new * (ctx + new / 2.0)
        rows.append([
            f"prefill {new}" + (f" after {ctx}" if ctx else ""),
            ms(p["s"]),
            f"{flops / p['s'] / 1e12:.0f} TFLOP/s",
            ms(flops / flops_rate),
        ])  # fmt: skip
    for p in runs["parts"].of_kind("attn_decode"):
        kv = p["batch"] * (p["ctx"] + 1) * spec.kv_bytes_per_token
        rows.append([
            f"decode {p['batch']} × ctx {p['ctx']}",
            ms(p["s"]),
            f"{kv / p['s'] / 1e12:.2f} TB/s",
            ms(kv / bytes_rate),
        ])  # fmt: skip
    print(table(["attention", "measured", "rate reached", "model"], rows))

    print("\n## LoRA (rank 16 on every projection): extra time of a step\n")
    lora = runs["lora"]
    fit = lora_fit(lora)
    base = {(s.prefill, s.decode): s.seconds for s in steps(lora, ("lora_base",))}
    rows = []
    for p in lora.of_kind("lora_decode", "lora_prefill"):
        (s,) = steps(GpuRun("one", {}, {}, True, (p,)), (p["kind"],))
        b = base[s.prefill, s.decode]
        rows.append([
            s.label, str(p["max_loras"]), str(p.get("adapters", 1)), ms(b), ms(s.seconds),
            ms(s.seconds - b), pct(s.seconds / b - 1),
        ])  # fmt: skip
    print(table(["step", "max_loras", "adapters", "base", "LoRA", "extra", "ratio"], rows))
    print(
        f"\nfit (max_loras 1, one adapter): {fit.step_s * 1e3:.3f} ms per step + "
        f"{fit.token_s * 1e6:.3f} µs per token; "
        f"worst residual {fit.worst_residual_s() * 1e3:.3f} ms"
    )
    pinned = swap_seconds(runs.values())
    pageable = swap_seconds(runs.values(), pinned=False)
    print(
        f"adapter swap: {', '.join(ms(s) for s in pinned)} ms from pinned memory, "
        f"{', '.join(ms(s) for s in pageable)} ms from pageable"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
