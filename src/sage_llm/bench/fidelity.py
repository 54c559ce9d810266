"""Simulator fidelity against the real vLLM CPU engine (the tiny Llama of
``scripts/make_tiny_model.py``).

The benchmark measures the real engine, fits the simulator's step model and front end to
it, and reports how well the simulator then reproduces the engine's latencies:

1. **Measure.** Closed-loop workloads (``concurrency`` clients, each sending ``rounds``
   requests back to back, prompts of random token ids so nothing hits the prefix cache,
   ``ignore_eos`` so every request generates ``max_tokens``). The engine's own histograms
   give the means: ``vllm:time_to_first_token_seconds`` (TTFT) and
   ``vllm:inter_token_latency_seconds`` (TPOT, weighted by tokens), as deltas around each
   workload.
2. **Fit.** Calibration sweeps only: a prefill sweep at concurrency 1, a decode sweep
   (``B`` requests at once) and staggered clients. :func:`fit_step_and_intake` reads the
   first two as ``TTFT = intake + β0 + β1·prompt`` and ``TPOT = β0 + β2·B`` (least squares);
   :func:`fit_by_simulation` then adjusts the :class:`~sage_llm.sim.costmodel.LinearStepModel`
   and the :class:`~sage_llm.sim.costmodel.FrontEndModel` until replays of every sweep
   match the measured TTFTs and TPOTs best.
3. **Compare.** :func:`simulate` replays each evaluation workload on a
   :class:`~sage_llm.sim.core.SimEngineCore` behind the front end, with the fitted model and
   the real engine's scheduler limits (explicit time, no sleeping), and :func:`compare`
   reports TTFT and TPOT errors.

The fitted profile is stored as JSON under ``sage_llm/sim/profiles/`` and read back with
:func:`load_profile` (``load_profile("cpu", "tiny").sim_config()`` is a
:class:`~sage_llm.sim.core.SimEngineConfig` that mimics the real engine's core, and its
``front_end`` goes to :class:`~sage_llm.sim.engine.SimEngine`). This module is pure
(no I/O but reading a profile); the measuring half is :mod:`sage_llm.bench.fidelity_real`,
which needs the vLLM venv that ``scripts/setup-real-vllm.sh`` builds (docs/benchmarks.md).
"""

from __future__ import annotations

import heapq
import itertools
import json
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from sage_llm.errors import ConfigError, NotFoundError
from sage_llm.sim.core import SimEngineConfig, SimEngineCore, StepResult
from sage_llm.sim.costmodel import (
    CostModel,
    FrontEndModel,
    FrontEndQueue,
    LinearStepModel,
    fit_linear_step_model,
)
from sage_llm.sim.engine import SharedCore, SharedJob

__all__ = [
    "ComparisonRow",
    "EngineShape",
    "FittedProfile",
    "Observed",
    "Workload",
    "calibration_error",
    "compare",
    "fit_by_simulation",
    "fit_profile",
    "fit_step_and_intake",
    "load_profile",
    "max_error",
    "profile_path",
    "render_table",
    "simulate",
    "step_samples",
]

PROFILE_PACKAGE = "sage_llm.sim.profiles"


@dataclass(frozen=True, slots=True)
class Workload:
    """``concurrency`` closed-loop clients, each sending ``rounds`` requests of
    ``prompt_tokens`` prompt tokens and exactly ``max_tokens`` output tokens. Client ``c``
    starts ``c × stagger_s`` seconds late, so that the clients' requests interleave (prefills
    beside decodes) rather than run in lockstep."""

    concurrency: int
    prompt_tokens: int
    max_tokens: int
    rounds: int = 1
    stagger_s: float = 0.0

    def __post_init__(self) -> None:
        for key in ("concurrency", "prompt_tokens", "max_tokens", "rounds"):
            if getattr(self, key) < 1:
                raise ValueError(f"Workload.{key} must be >= 1")
        if not self.stagger_s >= 0:
            raise ValueError("Workload.stagger_s must be >= 0")

    @property
    def requests(self) -> int:
        return self.concurrency * self.rounds


@dataclass(frozen=True, slots=True)
class Observed:
    """Mean TTFT and token-weighted mean TPOT (seconds) of one workload, real or simulated."""

    workload: Workload
    ttft_s: float
    tpot_s: float

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self.workload), "ttft_s": self.ttft_s, "tpot_s": self.tpot_s}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Observed:
        try:
            workload = Workload(
                int(data["concurrency"]),
                int(data["prompt_tokens"]),
                int(data["max_tokens"]),
                int(data["rounds"]),
                float(data.get("stagger_s", 0.0)),
            )
            ttft_s, tpot_s = float(data["ttft_s"]), float(data["tpot_s"])
            if not (0 < ttft_s < math.inf and 0 <= tpot_s < math.inf):
                raise ValueError("ttft_s must be a finite time > 0, tpot_s one >= 0")
            return cls(workload, ttft_s, tpot_s)
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"bad observation {dict(data)!r}: {exc}") from None


@dataclass(frozen=True, slots=True)
class EngineShape:
    """The real engine's scheduler and KV-cache limits, given to the simulated engine."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    num_gpu_blocks: int = 4096
    max_model_len: int = 512

    def __post_init__(self) -> None:
        for key in ("max_num_seqs", "max_num_batched_tokens", "block_size", "num_gpu_blocks"):
            if getattr(self, key) < 1:
                raise ValueError(f"EngineShape.{key} must be >= 1")


@dataclass(frozen=True, slots=True)
class ComparisonRow:
    """Real against simulated latency of one workload; errors are relative (0.1 = 10 %)."""

    concurrency: int
    real_ttft_s: float
    sim_ttft_s: float
    real_tpot_s: float
    sim_tpot_s: float

    @property
    def ttft_error(self) -> float:
        return abs(self.sim_ttft_s - self.real_ttft_s) / self.real_ttft_s

    @property
    def tpot_error(self) -> float:
        return abs(self.sim_tpot_s - self.real_tpot_s) / self.real_tpot_s

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ttft_error": self.ttft_error, "tpot_error": self.tpot_error}


@dataclass(frozen=True, slots=True)
class FittedProfile:
    """A fitted step model for one ``gpu`` × ``model`` pair, with the front end in front of
    the core (none by default), the engine shape it was measured on and where it came from
    (``source``: engine version, date, errors …)."""

    gpu: str
    model: str
    betas_us: tuple[float, float, float]
    shape: EngineShape = field(default_factory=EngineShape)
    source: Mapping[str, Any] = field(default_factory=dict)
    front_end: FrontEndModel = field(default_factory=FrontEndModel)

    def cost_model(self) -> LinearStepModel:
        """The fitted :class:`LinearStepModel`."""
        b0, b1, b2 = self.betas_us
        return LinearStepModel(b0, b1, b2, label=f"linear:{self.model}/{self.gpu}/fitted")

    def sim_config(self, **overrides: Any) -> SimEngineConfig:
        """A :class:`SimEngineConfig` that mimics the measured engine (``overrides`` win).
        Another ``block_size`` alone keeps the KV cache's size in tokens (the measured
        engine's memory), not its count of blocks."""
        s = self.shape
        blocks = s.num_gpu_blocks
        block_size = overrides.get("block_size")
        if isinstance(block_size, int) and block_size > 0 and "num_gpu_blocks" not in overrides:
            blocks = max(1, s.num_gpu_blocks * s.block_size // block_size)
        values: dict[str, Any] = {
            "model": self.model, "gpu": self.gpu, "cost_model": self.cost_model(),
            "max_num_seqs": s.max_num_seqs, "max_num_batched_tokens": s.max_num_batched_tokens,
            "block_size": s.block_size, "num_gpu_blocks": blocks,
            "max_model_len": s.max_model_len,
        }  # fmt: skip
        return SimEngineConfig(**{**values, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return {
            "gpu": self.gpu,
            "model": self.model,
            "betas_us": list(self.betas_us),
            "front_end": self.front_end.describe(),
            "shape": asdict(self.shape),
            "source": dict(self.source),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FittedProfile:
        """The inverse of :meth:`to_dict`; a profile without ``front_end`` has none."""
        try:
            b0, b1, b2 = (float(b) for b in data["betas_us"])
            shape = EngineShape(**{k: int(v) for k, v in data.get("shape", {}).items()})
            front = FrontEndModel(**{k: float(v) for k, v in data.get("front_end", {}).items()})
            return cls(str(data["gpu"]), str(data["model"]), (b0, b1, b2), shape,
                       dict(data.get("source", {})), front)  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"bad fitted profile: {exc}") from None


# -- fitting -----------------------------------------------------------------------------------


def step_samples(
    prefill: Sequence[Observed], decode: Sequence[Observed]
) -> list[tuple[float, float, float]]:
    """Step-time samples for the fit: a concurrency-1 request's TTFT is one prefill step of
    its prompt; the TPOT of ``B`` requests decoding together is one decode step of ``B``."""
    out: list[tuple[float, float, float]] = []
    for obs in prefill:
        if obs.workload.concurrency != 1:
            raise ValueError("prefill samples must be measured at concurrency 1")
        out.append((float(obs.workload.prompt_tokens), 0.0, obs.ttft_s))
    out.extend((0.0, float(obs.workload.concurrency), obs.tpot_s) for obs in decode)
    return out


def fit_step_and_intake(
    prefill: Sequence[Observed], decode: Sequence[Observed]
) -> tuple[LinearStepModel, float]:
    """Least-squares fit of the step model and the front end's intake time together.

    A concurrency-1 request's TTFT is its intake plus one prefill step of its prompt
    (``intake + β0 + β1·prompt``); the TPOT of ``B`` requests decoding together is one
    decode step of ``B`` (``β0 + β2·B``), which the front end does not enter. The two sweeps
    share ``β0``, so the fixed cost that only TTFT carries lands in the intake. A negative
    coefficient (noise) is refitted as zero.
    """
    rows: list[tuple[float, float, float, float]] = []
    times: list[float] = []
    for obs in prefill:
        if obs.workload.concurrency != 1:
            raise ValueError("prefill samples must be measured at concurrency 1")
        rows.append((1.0, 1.0, float(obs.workload.prompt_tokens), 0.0))
        times.append(obs.ttft_s * 1e6)
    for obs in decode:
        rows.append((0.0, 1.0, 0.0, float(obs.workload.concurrency)))
        times.append(obs.tpot_s * 1e6)
    design = np.asarray(rows, dtype=float).reshape(-1, 4)
    y = np.asarray(times, dtype=float)
    if not np.all(np.isfinite(design)) or not np.all(np.isfinite(y)):
        raise ValueError("samples must be finite")
    keep = [0, 1, 2, 3]
    while True:
        coef, _, rank, _ = np.linalg.lstsq(design[:, keep], y, rcond=None)
        if rank < len(keep):
            raise ValueError("samples do not vary enough in prefill and decode tokens to fit")
        negative = [k for k, c in zip(keep, coef, strict=True) if c < 0 and k != 1]
        if not negative:
            break
        keep.remove(negative[0])
    full = dict(zip(keep, (float(c) for c in coef), strict=True))
    model = LinearStepModel(full[1], full.get(2, 0.0), full.get(3, 0.0), label="linear:fitted")
    return model, full.get(0, 0.0) * 1e-6


def calibration_error(
    samples: Sequence[Observed],
    cost_model: CostModel,
    shape: EngineShape,
    front_end: FrontEndModel | None = None,
) -> float:
    """Root-mean-square of ``log(simulated / real)`` over the TTFTs and TPOTs of
    ``samples`` (a TPOT of 0, a one-token workload's, is left out)."""
    total, n = 0.0, 0
    for obs in samples:
        sim = simulate(obs.workload, cost_model, shape, front_end=front_end)
        pairs = [(sim.ttft_s, obs.ttft_s)]
        if obs.tpot_s > 0:
            pairs.append((sim.tpot_s, obs.tpot_s))
        for got, want in pairs:
            total += math.log(max(got, 1e-9) / max(want, 1e-9)) ** 2
            n += 1
    return math.sqrt(total / n) if n else 0.0


def fit_by_simulation(
    samples: Sequence[Observed],
    shape: EngineShape,
    start: tuple[LinearStepModel, FrontEndModel],
    *,
    relative_tolerance: float = 0.02,
    max_evaluations: int = 400,
    shared_core: bool = False,
) -> tuple[LinearStepModel, FrontEndModel]:
    """The step model and front end whose replays best match ``samples``
    (:func:`calibration_error`), from ``start``.

    A deterministic compass search over ``(β0, β1, β2, intake_s, per_output_s)``, and
    ``shared_step_s`` with ``shared_core``: try each parameter a step up, then down, and
    take the first move that improves (doubling that parameter's step); halve every step
    after a sweep in which nothing helped; stop when every step is below
    ``relative_tolerance`` of its starting size or after ``max_evaluations`` replays of the
    samples. Replays are needed because a front end changes what the sweeps see: requests
    that arrive together are taken in one after the other, so they neither prefill nor
    decode in lockstep, and with a shared core the front end's work stretches the steps.
    Without ``shared_core`` the start's ``shared_step_s`` is kept as it is.
    """
    step0, front0 = start
    # β0, β1, β2, intake, per-output[, shared step part], all in µs
    point: tuple[float, ...] = (*step0.betas_us, front0.intake_s * 1e6, front0.per_output_s * 1e6)
    floor: tuple[float, ...] = (1.0, 0.1, 1.0, 10.0, max(point[2] / 4, 10.0))
    if shared_core:
        point = (*point, front0.shared_step_s * 1e6)
        floor = (*floor, max(point[0] / 4, 100.0))
    steps = [max(abs(v) / 4, f) for v, f in zip(point, floor, strict=True)]
    done = [s * relative_tolerance for s in steps]
    scores: dict[tuple[float, ...], float] = {}

    def build(p: tuple[float, ...]) -> tuple[LinearStepModel, FrontEndModel]:
        shared = p[5] * 1e-6 if shared_core else front0.shared_step_s
        return (
            LinearStepModel(p[0], p[1], p[2], label=step0.label),
            FrontEndModel(p[3] * 1e-6, p[4] * 1e-6, shared),
        )

    def score(p: tuple[float, ...]) -> float:
        if p not in scores:
            try:
                step, front = build(p)
            except ConfigError:  # no such model (every step free, say): never the best
                scores[p] = math.inf
            else:
                scores[p] = calibration_error(samples, step, shape, front)
        return scores[p]

    best = score(point)
    while len(scores) < max_evaluations and any(s > d for s, d in zip(steps, done, strict=True)):
        moved_any = False
        for axis, size in enumerate(steps):
            if size <= done[axis]:
                continue
            for sign in (1.0, -1.0):
                trial = list(point)
                trial[axis] = max(0.0, trial[axis] + sign * size)
                candidate = tuple(trial)
                if score(candidate) < best - 1e-12:
                    point, best = candidate, score(candidate)
                    steps[axis] = size * 2  # a move that helps is tried again, further
                    moved_any = True
                    break
        if not moved_any:
            steps = [s / 2 for s in steps]
    return build(point)


def fit_profile(
    prefill: Sequence[Observed],
    decode: Sequence[Observed],
    front: Sequence[Observed] = (),
    *,
    gpu: str = "cpu",
    model: str = "tiny",
    shape: EngineShape | None = None,
    source: Mapping[str, Any] | None = None,
    front_end: bool = True,
    shared_core: bool = True,
) -> FittedProfile:
    """Fit the step model and the front end to the calibration sweeps.

    With ``front_end`` (the default): :func:`fit_step_and_intake` on the prefill and decode
    sweeps gives a start, :func:`fit_by_simulation` on every sweep (``front`` holds extra
    calibration workloads, e.g. staggered clients whose requests arrive beside running
    decodes) the fit; with ``shared_core`` (the default) two more searches from that fit
    add the front end's ``shared_step_s`` (starting at β0/2 and β0) and the best of the
    three fits is kept (``source["fit"]["without_shared_core"]`` records the first); else
    ``shared_step_s`` stays 0. Without ``front_end``: a plain
    :class:`LinearStepModel` fit of :func:`step_samples` and no front end.
    """
    shape = shape or EngineShape()
    if not front_end:
        fitted = fit_linear_step_model(step_samples(prefill, decode))
        return FittedProfile(gpu, model, fitted.betas_us, shape, source or {})
    step, intake = fit_step_and_intake(prefill, decode)
    samples = [*prefill, *decode, *front]
    start = (step, FrontEndModel(intake, 0.0))
    step, fe = fit_by_simulation(samples, shape, start)
    error = calibration_error(samples, step, shape, fe)
    fit: dict[str, Any] = {}
    if shared_core:
        fit["without_shared_core"] = {
            "betas_us": list(step.betas_us),
            **fe.describe(),
            "log_rms_error": error,
        }
        # Second searches from the fit without a shared core, its shared part starting at
        # half and at all of β0 (one compass search moves one parameter at a time and
        # cannot trade the intake for the shared part); the best fit of the three wins.
        base = (step, fe)
        for share in (0.5, 1.0):
            beta0_s = max(base[0].betas_us[0], 0.0) * 1e-6  # noise can make β0 negative
            seed = replace(base[1], shared_step_s=beta0_s * share)
            cand = fit_by_simulation(samples, shape, (base[0], seed), shared_core=True)
            cand_error = calibration_error(samples, cand[0], shape, cand[1])
            if cand_error < error:
                (step, fe), error = cand, cand_error
    fit = {
        "log_rms_error": error,
        **fit,
        "start_log_rms_error": calibration_error(samples, start[0], shape, start[1]),
        "start_betas_us": list(start[0].betas_us),
        "start_intake_s": intake,
    }
    return FittedProfile(gpu, model, step.betas_us, shape, {**(source or {}), "fit": fit}, fe)


# -- simulation ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Arrive:
    client: int
    k: int


@dataclass(frozen=True, slots=True)
class _Admit:
    rid: str
    ids: list[int]


@dataclass(frozen=True, slots=True)
class _StepDone:
    result: StepResult


@dataclass(frozen=True, slots=True)
class _Outputs:
    result: StepResult
    first: list[str]  # requests whose first token this step produced


_Event = _Arrive | _Admit | _StepDone


def simulate(
    workload: Workload,
    cost_model: CostModel,
    shape: EngineShape,
    *,
    seed: int = 0,
    front_end: FrontEndModel | None = None,
) -> Observed:
    """Replay ``workload`` on a simulated engine with ``cost_model`` and ``shape``, behind
    ``front_end`` (none by default).

    Each client sends its next request the moment its previous one is handed back. A
    request reaches the core when the front end has taken it in; a step's outputs are
    processed by the front end after the step, in arrival order with the intakes
    (:class:`~sage_llm.sim.costmodel.FrontEndQueue`). The figures are measured as vLLM's
    histograms measure them: TTFT from the request's arrival to the moment the front end
    starts processing the step that produced its first token; TPOT from the core's step
    times, (last token − first token) over the tokens after the first, summed over
    requests (the engine's token-weighted inter-token latency).

    With :attr:`FrontEndModel.shared_step_s` the end of every step runs on the front end's
    CPU core (:class:`~sage_llm.sim.engine.SharedCore`), so the two slow each other down.
    """
    config = SimEngineConfig(
        model="tiny", gpu="cpu", cost_model=cost_model, max_num_seqs=shape.max_num_seqs,
        max_num_batched_tokens=shape.max_num_batched_tokens, block_size=shape.block_size,
        num_gpu_blocks=shape.num_gpu_blocks, max_model_len=shape.max_model_len, seed=seed,
    )  # fmt: skip
    core = SimEngineCore(config)
    front = front_end or FrontEndModel()
    if front.shared_step_s > 0 and not front.is_zero:
        return _simulate_shared(workload, core, SharedCore(front), random.Random(seed))
    server = FrontEndQueue(front)
    rng = random.Random(seed)
    events: list[tuple[float, int, _Event]] = []
    order = itertools.count()

    def push(t: float, event: _Event) -> None:
        heapq.heappush(events, (t, next(order), event))

    for c in range(workload.concurrency):
        push(c * workload.stagger_s, _Arrive(c, 0))
    arrived: dict[str, float] = {}
    first: dict[str, float] = {}  # core time of the first token
    ttft_sum = decode_time = 0.0
    stepping = False
    while events:
        now = events[0][0]
        while events and events[0][0] <= now:
            event = heapq.heappop(events)[2]
            if isinstance(event, _Arrive):
                rid = f"c{event.client}-{event.k}"
                arrived[rid] = now
                ids = [rng.randrange(10, 30000) for _ in range(workload.prompt_tokens)]
                push(server.intake(now)[1], _Admit(rid, ids))
            elif isinstance(event, _Admit):
                core.add_request(event.rid, event.ids, workload.max_tokens, arrival=now)
            else:
                stepping = False
                res = event.result
                if not res.new_tokens:
                    continue
                start, end = server.outputs(now, len(res.new_tokens))
                for rid, _ in res.new_tokens:
                    if rid not in first:
                        first[rid] = now
                        ttft_sum += start - arrived[rid]
                for rid, _ in res.finished:
                    decode_time += now - first[rid]
                    client, k = rid[1:].split("-")
                    if int(k) + 1 < workload.rounds:
                        push(end, _Arrive(int(client), int(k) + 1))
        if not stepping and core.has_work():
            res = core.step(now)
            if res.duration_s > 0.0 or not res.idle:
                push(now + res.duration_s, _StepDone(res))
                stepping = True
    n = workload.requests
    gaps = n * (workload.max_tokens - 1)
    return Observed(workload, ttft_sum / n, decode_time / gaps if gaps else 0.0)


def _simulate_shared(
    workload: Workload, core: SimEngineCore, line: SharedCore, rng: random.Random
) -> Observed:
    """:func:`simulate` with the front end and the steps' ends on one shared core: the
    front end's jobs and the steps' shared parts end when the timeline says so."""
    events: list[tuple[float, int, _Arrive | _StepDone]] = []
    order = itertools.count()
    waiting: dict[SharedJob, _Admit | _StepDone | _Outputs] = {}
    arrived: dict[str, float] = {}
    first: dict[str, float] = {}  # core time of the first token
    ttft_sum = decode_time = 0.0
    stepping = False

    def arrive(now: float, client: int, k: int) -> None:
        rid = f"c{client}-{k}"
        arrived[rid] = now
        ids = [rng.randrange(10, 30000) for _ in range(workload.prompt_tokens)]
        waiting[line.intake(now)] = _Admit(rid, ids)

    def step_done(now: float, res: StepResult) -> None:
        nonlocal decode_time
        if not res.new_tokens:
            return
        new = [rid for rid, _ in res.new_tokens if rid not in first]
        for rid in new:
            first[rid] = now
        for rid, _ in res.finished:
            decode_time += now - first[rid]
        waiting[line.outputs(now, len(res.new_tokens))] = _Outputs(res, new)

    for c in range(workload.concurrency):
        heapq.heappush(events, (c * workload.stagger_s, next(order), _Arrive(c, 0)))
    while True:
        now = min(events[0][0] if events else math.inf, line.next_change())
        if math.isinf(now):
            break
        for job in line.advance(now):
            what = waiting.pop(job)
            if isinstance(what, _Admit):
                core.add_request(what.rid, what.ids, workload.max_tokens, arrival=now)
            elif isinstance(what, _StepDone):
                stepping = False
                step_done(now, what.result)
            else:
                ttft_sum += sum(job.start - arrived[rid] for rid in what.first)
                for rid, _ in what.result.finished:
                    client, k = rid[1:].split("-")
                    if int(k) + 1 < workload.rounds:
                        arrive(now, int(client), int(k) + 1)
        while events and events[0][0] <= now:
            event = heapq.heappop(events)[2]
            if isinstance(event, _Arrive):
                arrive(now, event.client, event.k)
                continue
            part = line.shared_part_s(event.result.duration_s) if not event.result.idle else 0.0
            if part > 0:  # the worker's part is over; the shared part begins
                waiting[line.step_part(now, part)] = event
            else:
                stepping = False
                step_done(now, event.result)
        if not stepping and core.has_work():
            res = core.step(now)
            if res.duration_s > 0.0 or not res.idle:
                part = line.shared_part_s(res.duration_s) if not res.idle else 0.0
                heapq.heappush(events, (now + res.duration_s - part, next(order), _StepDone(res)))
                stepping = True
    n = workload.requests
    gaps = n * (workload.max_tokens - 1)
    return Observed(workload, ttft_sum / n, decode_time / gaps if gaps else 0.0)


def compare(
    real: Sequence[Observed],
    cost_model: CostModel,
    shape: EngineShape,
    front_end: FrontEndModel | None = None,
) -> list[ComparisonRow]:
    """Simulate every real workload and pair the figures."""
    rows = []
    for obs in real:
        sim = simulate(obs.workload, cost_model, shape, front_end=front_end)
        rows.append(
            ComparisonRow(obs.workload.concurrency, obs.ttft_s, sim.ttft_s, obs.tpot_s, sim.tpot_s)
        )
    return rows


def max_error(rows: Sequence[ComparisonRow]) -> float:
    """The largest TTFT or TPOT error of ``rows``."""
    return max((max(r.ttft_error, r.tpot_error) for r in rows), default=0.0)


def render_table(rows: Sequence[ComparisonRow]) -> str:
    """A Markdown table of real and simulated TTFT/TPOT (ms) and the errors."""
    lines = [
        "| concurrency | real TTFT ms | sim TTFT ms | TTFT error | real TPOT ms | sim TPOT ms "
        "| TPOT error |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.concurrency} | {r.real_ttft_s * 1e3:.2f} | {r.sim_ttft_s * 1e3:.2f} "
            f"| {r.ttft_error:.1%} | {r.real_tpot_s * 1e3:.2f} | {r.sim_tpot_s * 1e3:.2f} "
            f"| {r.tpot_error:.1%} |"
        )
    return "\n".join(lines)


# -- stored profiles -----------------------------------------------------------------------------


def profile_path(gpu: str, model: str) -> Path:
    """Where the packaged profile of ``gpu`` × ``model`` lives (``<gpu>-<model>.json``)."""
    name = f"{gpu.strip().lower()}-{model.strip().lower()}.json"
    return Path(str(resources.files(PROFILE_PACKAGE).joinpath(name)))


def load_profile(
    gpu: str = "cpu", model: str = "tiny", path: str | Path | None = None
) -> FittedProfile:
    """A fitted profile: the packaged one of ``gpu`` × ``model``, or the JSON at ``path``.

    Raises :class:`NotFoundError` when there is none and :class:`ConfigError` when the file is
    not a valid profile.
    """
    file = Path(path) if path is not None else profile_path(gpu, model)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NotFoundError(f"no fitted profile for {gpu} × {model} ({file})") from None
    except OSError as exc:
        raise ConfigError(f"cannot read fitted profile: {exc}", location=str(file)) from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"invalid JSON: {exc}", location=str(file)) from None
    if not isinstance(data, dict):
        raise ConfigError("a fitted profile is a JSON object", location=str(file))
    return FittedProfile.from_dict(data.get("profile", data))
