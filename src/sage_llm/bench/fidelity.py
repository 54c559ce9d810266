"""Simulator fidelity against the real vLLM CPU engine (the tiny Llama of REFERENCE.md §4).

The benchmark measures the real engine, fits the simulator's step model to it, and reports
how well the simulator then reproduces the engine's latencies:

1. **Measure.** Closed-loop workloads (``concurrency`` clients, each sending ``rounds``
   requests back to back, prompts of random token ids so nothing hits the prefix cache,
   ``ignore_eos`` so every request generates ``max_tokens``). The engine's own histograms
   give the means: ``vllm:time_to_first_token_seconds`` (TTFT) and
   ``vllm:inter_token_latency_seconds`` (TPOT, weighted by tokens), as deltas around each
   workload.
2. **Fit.** A prefill sweep at concurrency 1 gives ``(prompt_tokens, 0, ttft)`` samples; a
   decode sweep (``B`` requests at once) gives ``(0, B, tpot)`` samples. They are fitted with
   :func:`~sage_llm.sim.costmodel.fit_linear_step_model` into a
   :class:`~sage_llm.sim.costmodel.LinearStepModel`.
3. **Compare.** :func:`simulate` replays each evaluation workload on a
   :class:`~sage_llm.sim.core.SimEngineCore` with that model and the real engine's scheduler
   limits (explicit time, no sleeping) and :func:`compare` reports TTFT and TPOT errors.

The fitted profile is stored as JSON under ``sage_llm/sim/profiles/`` and read back with
:func:`load_profile` (``load_profile("cpu", "tiny").sim_config()`` is a
:class:`~sage_llm.sim.core.SimEngineConfig` that mimics the real engine). This module is pure
(no I/O but reading a profile); the measuring half is :mod:`sage_llm.bench.fidelity_real`,
which needs the vLLM venv that ``scripts/setup-real-vllm.sh`` builds (docs/benchmarks.md).
"""

from __future__ import annotations

import heapq
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from sage_llm.errors import ConfigError, NotFoundError
from sage_llm.sim.core import SimEngineConfig, SimEngineCore
from sage_llm.sim.costmodel import CostModel, LinearStepModel, fit_linear_step_model

__all__ = [
    "ComparisonRow",
    "EngineShape",
    "FittedProfile",
    "Observed",
    "Workload",
    "compare",
    "fit_profile",
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
            return cls(workload, float(data["ttft_s"]), float(data["tpot_s"]))
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
    """A fitted step model for one ``gpu`` × ``model`` pair, with the engine shape it was
    measured on and where it came from (``source``: engine version, date, errors …)."""

    gpu: str
    model: str
    betas_us: tuple[float, float, float]
    shape: EngineShape = field(default_factory=EngineShape)
    source: Mapping[str, Any] = field(default_factory=dict)

    def cost_model(self) -> LinearStepModel:
        """The fitted :class:`LinearStepModel`."""
        b0, b1, b2 = self.betas_us
        return LinearStepModel(b0, b1, b2, label=f"linear:{self.model}/{self.gpu}/fitted")

    def sim_config(self, **overrides: Any) -> SimEngineConfig:
        """A :class:`SimEngineConfig` that mimics the measured engine (``overrides`` win)."""
        s = self.shape
        values: dict[str, Any] = {
            "model": self.model, "gpu": self.gpu, "cost_model": self.cost_model(),
            "max_num_seqs": s.max_num_seqs, "max_num_batched_tokens": s.max_num_batched_tokens,
            "block_size": s.block_size, "num_gpu_blocks": s.num_gpu_blocks,
            "max_model_len": s.max_model_len,
        }  # fmt: skip
        return SimEngineConfig(**{**values, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return {
            "gpu": self.gpu,
            "model": self.model,
            "betas_us": list(self.betas_us),
            "shape": asdict(self.shape),
            "source": dict(self.source),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FittedProfile:
        try:
            b0, b1, b2 = (float(b) for b in data["betas_us"])
            shape = EngineShape(**{k: int(v) for k, v in data.get("shape", {}).items()})
            return cls(str(data["gpu"]), str(data["model"]), (b0, b1, b2), shape,
                       dict(data.get("source", {})))  # fmt: skip
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


def fit_profile(
    prefill: Sequence[Observed],
    decode: Sequence[Observed],
    *,
    gpu: str = "cpu",
    model: str = "tiny",
    shape: EngineShape | None = None,
    source: Mapping[str, Any] | None = None,
) -> FittedProfile:
    """Fit a :class:`LinearStepModel` to a prefill sweep and a decode sweep."""
    fitted = fit_linear_step_model(step_samples(prefill, decode))
    return FittedProfile(gpu, model, fitted.betas_us, shape or EngineShape(), source or {})


# -- simulation ----------------------------------------------------------------------------------


def simulate(
    workload: Workload, cost_model: CostModel, shape: EngineShape, *, seed: int = 0
) -> Observed:
    """Replay ``workload`` on a simulated engine with ``cost_model`` and ``shape``.

    Each client sends its next request the moment its previous one finishes. TTFT is the
    first token's time minus arrival; TPOT is (finish − first token) over the tokens after the
    first, summed over requests (the engine's token-weighted inter-token latency).
    """
    config = SimEngineConfig(
        model="tiny", gpu="cpu", cost_model=cost_model, max_num_seqs=shape.max_num_seqs,
        max_num_batched_tokens=shape.max_num_batched_tokens, block_size=shape.block_size,
        num_gpu_blocks=shape.num_gpu_blocks, max_model_len=shape.max_model_len, seed=seed,
    )  # fmt: skip
    core = SimEngineCore(config)
    rng = random.Random(seed)
    stagger = workload.stagger_s
    arrivals = [(c * stagger, c, 0) for c in range(workload.concurrency)]
    owner: dict[str, tuple[int, int]] = {}
    arrived: dict[str, float] = {}
    first: dict[str, float] = {}
    ttft_sum = decode_time = 0.0
    now = 0.0
    while arrivals or core.has_work():
        while arrivals and arrivals[0][0] <= now:
            t, client, k = heapq.heappop(arrivals)
            rid = f"c{client}-{k}"
            ids = [rng.randrange(10, 30000) for _ in range(workload.prompt_tokens)]
            core.add_request(rid, ids, workload.max_tokens, arrival=t)
            owner[rid], arrived[rid] = (client, k), t
        if not core.has_work():
            now = arrivals[0][0]
            continue
        res = core.step(now)
        end = now + res.duration_s
        for rid, _ in res.new_tokens:
            if rid not in first:
                first[rid] = end
                ttft_sum += end - arrived[rid]
        for rid, _ in res.finished:
            decode_time += end - first[rid]
            client, k = owner[rid]
            if k + 1 < workload.rounds:
                heapq.heappush(arrivals, (end, client, k + 1))
        if res.idle and res.duration_s <= 0.0:
            now = arrivals[0][0] if arrivals else now
        else:
            now = end
    n = workload.requests
    gaps = n * (workload.max_tokens - 1)
    return Observed(workload, ttft_sum / n, decode_time / gaps if gaps else 0.0)


def compare(
    real: Sequence[Observed], cost_model: CostModel, shape: EngineShape
) -> list[ComparisonRow]:
    """Simulate every real workload and pair the figures."""
    rows = []
    for obs in real:
        sim = simulate(obs.workload, cost_model, shape)
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
