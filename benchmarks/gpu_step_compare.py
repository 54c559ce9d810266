"""GPU step timings beside the simulator's cost model, as markdown tables.

Reads runs of ``benchmarks/gpu_step_profile.py`` (their ``gpu_steps.json``; by default the
H200 runs kept under ``benchmarks/recorded/h200-llama-3-8b/``) and prints what they hold,
as in docs/benchmarks.md ("GPU steps"): the card's own rates, one layer's projections and
MLP by tokens, whole steps against ``RooflineCostModel`` for ``--gpu`` and ``--model``
(the fused runs' median; the plain runs' beside it), attention alone, and LoRA's extra
step time with its fit. No GPU is needed::

    .venv/bin/python benchmarks/gpu_step_compare.py
    .venv/bin/python benchmarks/gpu_step_compare.py OUT/gpu_steps.json --gpu a100 --model llama-3-8b
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from dataclasses import replace
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
from sage_llm.errors import ConfigError
from sage_llm.sim.costmodel import RooflineCostModel

ROOT = Path(__file__).resolve().parents[1]
RECORDED = ROOT / "benchmarks/recorded/h200-llama-3-8b"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


def pct(x: float) -> str:
    return f"{x:+.1%}"


def table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def per_tokens(runs: Sequence[GpuRun], kind: str, model: RooflineCostModel) -> dict[int, float]:
    """A layer's measured seconds by tokens, the median over ``runs``."""
    times: dict[int, list[float]] = {}
    for run in runs:
        for tokens, measured, _ in per_layer(run, kind, model):
            times.setdefault(tokens, []).append(measured)
    return {t: statistics.median(v) for t, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "runs", nargs="*", type=Path, help="gpu_steps.json files (default: the H200 runs)"
    )
    ap.add_argument("--gpu", default="h200", help="the GPU spec to compare with (default h200)")
    ap.add_argument("--model", default="llama-3-8b", help="the model spec (default llama-3-8b)")
    args = ap.parse_args(argv)
    paths = args.runs or sorted(RECORDED.glob("*.json"))
    try:
        runs = [load_run(p) for p in paths]
        model = RooflineCostModel.from_names(args.gpu, args.model)
    except ConfigError as exc:
        print(f"gpu_step_compare: {exc}", file=sys.stderr)
        return 2
    fused_runs = [r for r in runs if r.fused]
    plain_runs = [r for r in runs if not r.fused]
    gpu_only = replace(model, overhead_s=0.0)

    rows = []
    for run in runs:
        ceil = {p["what"]: p for p in run.of_kind("ceiling")}
        if ceil:
            rows.append([
                run.name,
                str(run.info.get("name")),
                f"{ceil['matmul_bf16_8192']['tflops']:.0f}",
                f"{ceil['device_copy_2GiB']['tbps']:.2f}",
            ])  # fmt: skip
    if rows:
        print("## The card\n")
        print(table(["run", "GPU", "bf16 8192³ TFLOP/s", "copy TB/s (read + write)"], rows))

    gemm = per_tokens(runs, "gemm", model)
    fused = per_tokens(fused_runs, "linear", model)
    plain = per_tokens(plain_runs, "linear", model)
    tokens = sorted(gemm.keys() | fused.keys() | plain.keys())
    if tokens:
        print("\n## One layer's projections and MLP (ms)\n")
        rows = []
        for t in tokens:
            mod = model.per_layer_time_s(t)
            rows.append([
                str(t), *(ms(c[t]) if t in c else "–" for c in (gemm, fused, plain)), ms(mod),
                pct(mod / gemm[t] - 1) if t in gemm else "–",
            ])  # fmt: skip
        print(table(["tokens", "products", "+ fused element-wise", "+ plain element-wise",
                     "model", "model vs products"], rows))  # fmt: skip

    measured = median_steps(fused_runs or plain_runs)
    if measured:
        print("\n## Whole steps (ms): measured GPU time against the model\n")
        plain_steps = {(s.prefill, s.decode): s for s in median_steps(plain_runs)}
        rows_gpu = compare_steps(measured, gpu_only)
        rows = []
        for row, with_overhead in zip(rows_gpu, compare_steps(measured, model), strict=True):
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
        first = "fused" if fused_runs else "measured"
        print(table(["step", first, "plain", "model (GPU)", "error", "model + overhead_s"], rows))
        for what, part in (
            ("decode", [r for r in rows_gpu if not r.step.prefill]),
            ("with prefill", [r for r in rows_gpu if r.step.prefill]),
        ):
            if part:
                worst = max(abs(r.error) for r in part)
                print(f"\nmedian |error|, {what}: {median_abs_error(part):.1%} (worst {worst:.1%})")

    attention(runs, model)
    lora(runs)
    return 0


def attention(runs: Sequence[GpuRun], model: RooflineCostModel) -> None:
    """Attention alone: measured, the rate it reached, and the model's time at its rates."""
    spec = model.model
    flops_rate = model.gpu.peak_tflops * 1e12 * model.prefill_mfu
    bytes_rate = model.gpu.hbm_tbps * 1e12 * model.decode_bw_eff
    d_attn = spec.num_heads * spec.head_dim
    rows = []
    for run in runs:
        for p in run.of_kind("attn_prefill"):
            new, ctx = p["new"], p["ctx"]
            flops = 4.0 * spec.num_layers * d_attn * new * (ctx + new / 2.0)
            rows.append([
                f"prefill {new}" + (f" after {ctx}" if ctx else ""),
                ms(p["s"]),
                f"{flops / p['s'] / 1e12:.0f} TFLOP/s",
                ms(flops / flops_rate),
            ])  # fmt: skip
        for p in run.of_kind("attn_decode"):
            kv = p["batch"] * (p["ctx"] + 1) * spec.kv_bytes_per_token
            rows.append([
                f"decode {p['batch']} × ctx {p['ctx']}",
                ms(p["s"]),
                f"{kv / p['s'] / 1e12:.2f} TB/s",
                ms(kv / bytes_rate),
            ])  # fmt: skip
    if rows:
        print("\n## Attention alone, every layer (ms)\n")
        print(table(["attention", "measured", "rate reached", "model"], rows))


def lora(runs: Sequence[GpuRun]) -> None:
    """Each LoRA step beside its base step, the fit, and the adapter swaps."""
    for run in runs:
        if not run.of_kind("lora_base"):
            continue
        print(f"\n## LoRA (rank {run.lora_rank} on every projection): extra time of a step\n")
        base = {(s.prefill, s.decode): s.seconds for s in steps(run, ("lora_base",))}
        rows = []
        for p in run.of_kind("lora_decode", "lora_prefill"):
            (s,) = steps(replace(run, points=(p,)), (p["kind"],))
            b = base.get((s.prefill, s.decode))
            if b is None:
                continue
            rows.append([
                s.label, str(p["max_loras"]), str(p.get("adapters", 1)), ms(b), ms(s.seconds),
                ms(s.seconds - b), pct(s.seconds / b - 1),
            ])  # fmt: skip
        print(table(["step", "max_loras", "adapters", "base", "LoRA", "extra", "ratio"], rows))
        fit = lora_fit(run)
        print(
            f"\nfit (max_loras 1, one adapter): {fit.step_s * 1e3:.3f} ms per step + "
            f"{fit.token_s * 1e6:.3f} µs per token; "
            f"worst residual {fit.worst_residual_s() * 1e3:.3f} ms"
        )
    pinned = swap_seconds(runs)
    pageable = swap_seconds(runs, pinned=False)
    if pinned or pageable:
        print(
            f"adapter swap: {', '.join(ms(s) for s in pinned) or '–'} ms from pinned memory, "
            f"{', '.join(ms(s) for s in pageable) or '–'} ms from pageable"
        )


if __name__ == "__main__":
    sys.exit(main())
