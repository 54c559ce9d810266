"""Engine steps timed on a GPU against the simulator's cost model.

``benchmarks/gpu_step_profile.py`` times a Llama-shaped model's steps on a GPU (plain
PyTorch, random weights, CUDA graphs) and writes its measurements as JSON; the runs made
on an H200 with Llama-3-8B's shape are kept under ``benchmarks/recorded/``. This module
reads them (no PyTorch needed) and sets them beside the cost model:

* :func:`steps` gives each measured whole step as a :class:`MeasuredStep` (its prefill
  chunks and decode contexts, as :meth:`CostModel.step_time` takes them), and
  :func:`median_steps` each step's median over several runs;
* :func:`compare_steps` the model's time for each, and its error;
* :func:`per_layer` a layer's projections and MLP by tokens in the batch (the products
  alone, and with their element-wise work) beside
  :meth:`RooflineCostModel.per_layer_time_s`;
* :func:`lora_fit` the extra time of a step whose batch holds an adapter's requests, as
  seconds per step plus seconds per token (least squares), which
  :class:`~sage_llm.sim.core.SimEngineConfig`'s LoRA defaults come from;
* :func:`swap_seconds` the time to bring an adapter into a slot.

``benchmarks/gpu_step_compare.py`` prints the tables of docs/benchmarks.md ("GPU steps").
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sage_llm.errors import ConfigError
from sage_llm.sim.costmodel import CostModel, PrefillChunk, RooflineCostModel

__all__ = [
    "STEP_KINDS",
    "GpuRun",
    "LoraFit",
    "MeasuredStep",
    "StepRow",
    "compare_steps",
    "load_run",
    "lora_fit",
    "median_abs_error",
    "median_steps",
    "per_layer",
    "steps",
    "swap_seconds",
]

STEP_KINDS = ("prefill", "prefill_batch", "decode", "mixed")
"""The kinds of point that are whole steps timed for their own sake (``lora_base``, a step
timed beside its LoRA twin, is one too: ask for it by name)."""


@dataclass(frozen=True)
class GpuRun:
    """One run of the profiling script: the card, the model's shape, its points."""

    name: str
    info: Mapping[str, Any]
    dims: Mapping[str, int]
    fused: bool
    points: tuple[Mapping[str, Any], ...]
    lora_rank: int | None = None
    """The rank of the run's LoRA adapters."""

    def of_kind(self, *kinds: str) -> list[Mapping[str, Any]]:
        return [p for p in self.points if p["kind"] in kinds]


def load_run(path: str | Path) -> GpuRun:
    """Read one run's JSON (``ConfigError`` naming the file for one that is not)."""
    p = Path(path)
    try:
        raw = json.loads(p.read_text())
        run = GpuRun(
            name=p.stem,
            info=raw["info"],
            dims=raw["dims"],
            fused=bool(raw.get("fused", False)),
            points=tuple(raw["points"]),
            lora_rank=raw.get("lora_rank"),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"not a GPU step profile: {exc}", location=str(p)) from exc
    for i, point in enumerate(run.points):
        try:
            _check_point(point)
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"a point that is not one: {exc!r}", location=str(p),
                              key=f"points[{i}]") from exc  # fmt: skip
    return run


_READ = {"linear": ("tokens", "per_layer_s"), "gemm": ("tokens", "per_layer_s"),
         "lora_swap": ("pinned",)}  # fmt: skip
"""Keys the readers take from a point of each kind, beside ``s`` (steps: :func:`_step_of`)."""


def _check_point(point: Mapping[str, Any]) -> None:
    """Raise for a point the readers could not read (KeyError: a key it lacks)."""
    kind = point["kind"]
    if not math.isfinite(float(point["s"])) or float(point["s"]) < 0:
        raise ValueError(f"s = {point['s']!r}")
    if kind in STEP_KINDS or kind in ("lora_base", "lora_decode", "lora_prefill"):
        _step_of(point)
    for key in _READ.get(kind, ()):
        if key not in point:
            raise KeyError(key)


@dataclass(frozen=True)
class MeasuredStep:
    """A whole step as measured: what it ran and its median seconds."""

    kind: str
    prefill: tuple[PrefillChunk, ...]
    decode: tuple[int, ...]
    seconds: float

    @property
    def label(self) -> str:
        parts = []
        if self.prefill:
            new, ctx = self.prefill[0]
            count = f"{len(self.prefill)} × " if len(self.prefill) > 1 else ""
            parts.append(f"prefill {count}{new}" + (f" after {ctx}" if ctx else ""))
        if self.decode:
            parts.append(f"decode {len(self.decode)} × ctx {self.decode[0]}")
        return " + ".join(parts)


def _step_of(point: Mapping[str, Any]) -> MeasuredStep:
    kind = point["kind"]
    prefill: tuple[PrefillChunk, ...] = ()
    decode: tuple[int, ...] = ()
    if kind in ("prefill", "lora_prefill") or (kind == "lora_base" and "new" in point):
        prefill = ((point["new"], point.get("ctx", 0)),)
    elif kind == "prefill_batch":
        prefill = ((point["new"], 0),) * point["seqs"]
    elif kind in ("decode", "lora_decode", "lora_base"):
        decode = (point["ctx"],) * point["batch"]
    elif kind == "mixed":
        prefill = ((point["new"], point["ctx"]),)
        decode = (point["dctx"],) * point["batch"]
    else:
        raise ValueError(f"not a step: {kind!r}")
    return MeasuredStep(kind, prefill, decode, float(point["s"]))


def steps(run: GpuRun, kinds: Iterable[str] = STEP_KINDS) -> list[MeasuredStep]:
    """The run's whole steps of ``kinds``, in the order measured."""
    return [_step_of(p) for p in run.of_kind(*kinds)]


def median_steps(runs: Iterable[GpuRun], kinds: Iterable[str] = STEP_KINDS) -> list[MeasuredStep]:
    """Each step measured in any of ``runs``, at the median of its times, in the order
    first measured (runs on two machines of one kind differ by a few percent)."""
    kinds = tuple(kinds)
    times: dict[tuple[str, tuple[PrefillChunk, ...], tuple[int, ...]], list[float]] = {}
    for run in runs:
        for s in steps(run, kinds):
            times.setdefault((s.kind, s.prefill, s.decode), []).append(s.seconds)
    return [MeasuredStep(k, p, d, statistics.median(t)) for (k, p, d), t in times.items()]


@dataclass(frozen=True)
class StepRow:
    step: MeasuredStep
    model_s: float

    @property
    def error(self) -> float:
        """The model's relative error (+0.1: the model says 10% longer)."""
        return self.model_s / self.step.seconds - 1.0


def compare_steps(measured: Sequence[MeasuredStep], model: CostModel) -> list[StepRow]:
    """Each measured step beside ``model``'s time for it."""
    return [StepRow(s, model.step_time(list(s.prefill), list(s.decode))) for s in measured]


def per_layer(run: GpuRun, kind: str, model: RooflineCostModel) -> list[tuple[int, float, float]]:
    """``(tokens, measured s, model s)`` for one layer's projections and MLP: ``kind``
    ``"gemm"`` for the four products alone, ``"linear"`` with their element-wise work."""
    return [
        (int(p["tokens"]), float(p["per_layer_s"]), model.per_layer_time_s(int(p["tokens"])))
        for p in run.of_kind(kind)
    ]


@dataclass(frozen=True)
class LoraFit:
    """A LoRA batch's extra step time as ``step_s + token_s × tokens``, fitted."""

    step_s: float
    token_s: float
    points: tuple[tuple[int, float], ...]
    """(tokens in the step, measured extra seconds) of the fit."""

    def extra_s(self, tokens: int) -> float:
        return self.step_s + self.token_s * tokens

    def worst_residual_s(self) -> float:
        return max(abs(self.extra_s(t) - extra) for t, extra in self.points)


def lora_fit(run: GpuRun, *, max_loras: int = 1) -> LoraFit:
    """Fit the extra time of steps whose batch holds one adapter's requests, each against
    the same step without LoRA measured beside it (``lora_base``)."""
    base = {(s.prefill, s.decode): s.seconds for s in steps(run, ("lora_base",))}
    pairs: list[tuple[int, float]] = []
    for p in run.of_kind("lora_decode", "lora_prefill"):
        if p["max_loras"] != max_loras or p.get("adapters", 1) != 1:
            continue
        s = _step_of(p)
        if (s.prefill, s.decode) in base:
            tokens = sum(n for n, _ in s.prefill) + len(s.decode)
            pairs.append((tokens, s.seconds - base[s.prefill, s.decode]))
    if len(pairs) < 2:
        raise ValueError("a LoRA fit needs two steps with their base steps at least")
    n = len(pairs)
    mean_t = sum(t for t, _ in pairs) / n
    mean_e = sum(e for _, e in pairs) / n
    var = sum((t - mean_t) ** 2 for t, _ in pairs)
    slope = sum((t - mean_t) * (e - mean_e) for t, e in pairs) / var if var else 0.0
    slope = max(0.0, slope)
    return LoraFit(step_s=mean_e - slope * mean_t, token_s=slope, points=tuple(pairs))


def swap_seconds(runs: Iterable[GpuRun], *, pinned: bool = True) -> list[float]:
    """Every recorded time to copy one adapter into a slot (from pinned host memory, or
    from pageable memory with ``pinned=False``)."""
    return [
        float(p["s"]) for run in runs for p in run.of_kind("lora_swap") if p["pinned"] is pinned
    ]


def median_abs_error(rows: Sequence[StepRow]) -> float:
    """The median of the rows' absolute relative errors (NaN for none)."""
    return statistics.median(abs(r.error) for r in rows) if rows else math.nan
