"""The PD benchmark (``sage-llm bench pd``): colocated vs prefill/decode disaggregation.

One node of 8 H100-class GPUs (one NVLink domain, KV link 300 GB/s) serves Llama-3.1-8B as
8 TP1 instances, or Llama-3.1-70B as 2 TP4 instances (Llama-3-8B's and Llama-3-70B's
shapes with a 131,072-token context: a long prompt and its output go past their 8,192).
Each fleet layout is run on the same
workload, in process and on virtual time (:func:`sage_llm.bench.inprocess.replay` through a
:class:`ControlPlaneManager` in ``simulated`` mode):

* ``colocated``: all instances ``GENERAL``, chunked prefill, ``enable_pd_separation=False``;
* ``pd-P:D``: P ``PREFILLING`` + D ``DECODING`` instances, decider ``always``;
* ``adaptive-hybrid``: all instances ``HYBRID`` (either leg or whole requests), decider
  ``adaptive`` with the SLO's TTFT and TPOT as its targets;
* ``adaptive-P:D+G``: P prefill + D decode + G general instances, decider ``adaptive``.

Workloads: ``long_prompt`` (prompts uniform in [4096, 8192] tokens, outputs uniform in
[250, 350], Poisson arrivals) and ``chat`` (:func:`~sage_llm.bench.workloads.sharegpt_like`).

SLOs, in :mod:`sage_llm.bench.stats` semantics: :data:`SLO_ITL` (TTFT ≤ 2 s and the
request's *largest* inter-token gap ≤ 25 ms) is the headline; :data:`SLO_TPOT` (TTFT ≤ 2 s
and *mean* time per output token ≤ 25 ms, DistServe's form) is reported beside it.
Goodput is requests meeting the SLO per second of the run. The real-process runs (sage-llm's
gateway and vllm-router over engine-sim processes) live in :mod:`sage_llm.bench.pd_realtime`.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sage_llm import jsonutil
from sage_llm.bench.inprocess import replay
from sage_llm.bench.report import check_out_file, refuse_repeats
from sage_llm.bench.stats import SLO, BenchSummary, RequestMeasurement, summarize
from sage_llm.bench.workloads import Uniform, Workload, sharegpt_like, synthetic
from sage_llm.control_plane.manager import ControlPlaneManager
from sage_llm.errors import ConfigError
from sage_llm.sim.clock import run_virtual
from sage_llm.sim.cluster import ClusterSimulator
from sage_llm.sim.specs import get_model
from sage_llm.types import ExecutionInstance, ExecutionInstanceType, PDSeparationConfig

__all__ = [
    "DEFAULT_OUT",
    "MODEL_8B",
    "MODEL_70B",
    "REALTIME_FLEET",
    "REALTIME_SPEED",
    "SLO_ITL",
    "SLO_TPOT",
    "FleetSpec",
    "PDCase",
    "chat_workload",
    "check_realtime_fleet",
    "check_sizes",
    "default_fleets",
    "fleet_instances",
    "format_table",
    "long_prompt_workload",
    "pd_bench_main",
    "realtime_fleets",
    "run_case",
    "run_pd_bench",
    "select_fleets",
]

SLO_ITL = SLO(ttft_s=2.0, tpot_s=None, itl_s=0.025, name="ttft<=2s,max-itl<=25ms")
"""Headline SLO: TTFT ≤ 2 s and every inter-token gap of the request ≤ 25 ms."""
SLO_TPOT = SLO(ttft_s=2.0, tpot_s=0.025, name="ttft<=2s,tpot<=25ms")
"""Secondary SLO: TTFT ≤ 2 s and mean time per output token ≤ 25 ms."""
NODE = "node-0"
NVLINK_GBPS = 300.0
GPUS = 8
DEFAULT_OUT = Path("bench-out/pd/pd.json")
"""Where ``sage-llm bench pd`` writes its JSON report unless ``--out`` says otherwise."""
REALTIME_SPEED = 0.25
"""The real-time part's default time compression: the engines at a quarter of an H100's
speed. A proxy's CPU cost per request then weighs a quarter of what it would in real
time, as on a machine where the proxy has cores of its own; at speed 1 or more a 2-core
machine measures its own CPU more than PD (docs/benchmarks.md)."""
REALTIME_FLEET = "pd-3:5"
"""The layout of the real-time part when no ``--fleets`` are named."""


MODEL_8B = "llama-3.1-8b"
"""The 8B model the benchmark serves (Llama-3-8B's shape, a context its prompts fit in)."""
MODEL_70B = "llama-3.1-70b"
"""The 70B model the benchmark serves (Llama-3-70B's shape, likewise)."""


@dataclass(frozen=True)
class FleetSpec:
    """A layout of the 8-GPU node: instance counts per role, TP size, and the PD decider
    (None: colocated, PD disabled)."""

    name: str
    model: str = MODEL_8B
    tp: int = 1
    prefill: int = 0
    decode: int = 0
    general: int = 0
    hybrid: int = 0
    decider: str | None = None
    decider_params: tuple[tuple[str, Any], ...] = ()
    """Extra ``pd.metadata.decider_params`` (over the SLO targets), as (key, value) pairs."""
    pairing_params: tuple[tuple[str, Any], ...] = ()
    """``pd.metadata.pairing_params`` (:class:`~sage_llm.control_plane.pd.PairingParams`
    fields), as (key, value) pairs."""

    def __post_init__(self) -> None:
        counts = (self.prefill, self.decode, self.general, self.hybrid)
        if min(counts) < 0 or sum(counts) < 1 or self.tp < 1:
            raise ValueError(f"fleet {self.name}: bad instance counts or tp")
        if self.decider is None and (self.prefill or self.decode or self.hybrid):
            raise ValueError(f"fleet {self.name}: a PD layout needs a decider")

    @property
    def gpus(self) -> int:
        return self.tp * (self.prefill + self.decode + self.general + self.hybrid)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.model,
            "tp": self.tp,
            "prefill": self.prefill,
            "decode": self.decode,
            "general": self.general,
            "hybrid": self.hybrid,
            "decider": self.decider,
            "gpus": self.gpus,
            **({"pairing_params": dict(self.pairing_params)} if self.pairing_params else {}),
        }


def default_fleets(model: str = MODEL_8B) -> list[FleetSpec]:
    """The layouts compared on one 8-GPU node: TP1 for 8B, TP4 (two instances) for 70B."""
    if model == MODEL_70B:
        return [
            FleetSpec("colocated", model, tp=4, general=2),
            FleetSpec("pd-1:1", model, tp=4, prefill=1, decode=1, decider="always"),
            FleetSpec("adaptive-hybrid", model, tp=4, hybrid=2, decider="adaptive"),
        ]
    return [
        FleetSpec("colocated", model, general=8),
        FleetSpec("pd-2:6", model, prefill=2, decode=6, decider="always"),
        FleetSpec("pd-3:5", model, prefill=3, decode=5, decider="always"),
        FleetSpec("pd-4:4", model, prefill=4, decode=4, decider="always"),
        FleetSpec("adaptive-hybrid", model, hybrid=8, decider="adaptive"),
        FleetSpec("adaptive-2:2+4", model, prefill=2, decode=2, general=4, decider="adaptive"),
    ]


def select_fleets(names: Sequence[str], model: str = MODEL_8B) -> list[FleetSpec]:
    """The layouts of :func:`default_fleets` called ``names`` (in that order); ConfigError
    naming the valid ones for an unknown name."""
    known = {f.name: f for f in default_fleets(model)}
    if not names:
        raise ConfigError(f"no fleet named; valid: {', '.join(known)}", key="fleets")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(
            f"unknown fleet(s) {', '.join(unknown)}; valid: {', '.join(known)}", key="fleets"
        )
    refuse_repeats(names, "fleets")
    return [known[n] for n in names]


def select_named_fleets(
    names: Sequence[str], include_70b: bool
) -> tuple[list[FleetSpec], list[FleetSpec]]:
    """The Llama-3.1-8B layouts called ``names`` and, with ``include_70b``, the Llama-3.1-70B
    ones (``colocated``, ``pd-1:1``, ``adaptive-hybrid``); ConfigError for a name that is
    neither's, or for none."""
    known8 = {f.name: f for f in default_fleets()}
    known70 = {f.name: f for f in default_fleets(MODEL_70B)}
    valid = ", ".join(dict.fromkeys([*known8, *known70]))
    if not names:
        raise ConfigError(f"no fleet named; valid: {valid}", key="fleets")
    unknown = [n for n in names if n not in known8 and n not in known70]
    if unknown:
        raise ConfigError(f"unknown fleet(s) {', '.join(unknown)}; valid: {valid}", key="fleets")
    refuse_repeats(names, "fleets")
    eights = [known8[n] for n in names if n in known8]
    seventies = [known70[n] for n in names if n in known70] if include_70b else []
    left_out = [n for n in names if n not in known8 and not include_70b]
    if left_out:  # every name runs, or the run is refused: none is dropped without a word
        raise ConfigError(
            f"{', '.join(left_out)}: 70B layout(s) only, which this run leaves out (the 70B "
            "layouts are off)",
            key="fleets",
        )
    return eights, seventies


def check_sizes(n_long: int, long_rate: float, n_chat: int, chat_rate: float) -> None:
    """:class:`ConfigError` naming the argument unless the workloads' sizes and rates can
    run: counts >= 0 and not both 0, rates finite and > 0."""
    if n_long < 0 or n_chat < 0:
        raise ConfigError("must be >= 0", key="n_long" if n_long < 0 else "n_chat")
    if n_long + n_chat < 1:
        raise ConfigError("n_long and n_chat are both 0: there is no request to run")
    for key, value in (("long_rate", long_rate), ("chat_rate", chat_rate)):
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"must be a finite number > 0, got {value:g}", key=key)


def check_realtime_fleet(spec: FleetSpec) -> None:
    """:class:`ConfigError` (key ``fleets``) unless the real-time part can run ``spec``: a
    Llama-3.1-8B TP1 layout (the engine-sim processes are H100 TP1 engines)."""
    if spec.model != MODEL_8B or spec.tp != 1:
        raise ConfigError(
            f"{spec.name}: the real-time part runs only Llama-3.1-8B's TP1 layouts",
            key="fleets",
        )


def realtime_fleets(names: Sequence[str] | None) -> list[FleetSpec]:
    """The layouts the real-time part runs: :data:`REALTIME_FLEET` when ``names`` is None,
    else Llama-3.1-8B's layouts among ``names`` (the 70B TP4 ones have no engine-sim
    processes); :class:`ConfigError` when that leaves none."""
    if names is None:
        return select_fleets([REALTIME_FLEET])
    select_named_fleets(names, include_70b=True)  # an unknown name is reported as such
    layouts = default_fleets()
    chosen = [f for f in layouts if f.name in names]
    if not chosen:
        raise ConfigError(
            f"the real-time part (--realtime) runs Llama-3.1-8B's layouts "
            f"({', '.join(f.name for f in layouts)}); none is among {', '.join(names)}",
            key="fleets",
        )
    for spec in chosen:
        check_realtime_fleet(spec)
    return chosen


def fleet_instances(spec: FleetSpec, *, gpu: str = "h100") -> list[ExecutionInstance]:
    """The registered instances of ``spec``: one machine, one NVLink domain."""
    roles = (
        [ExecutionInstanceType.PREFILLING] * spec.prefill
        + [ExecutionInstanceType.DECODING] * spec.decode
        + [ExecutionInstanceType.GENERAL] * spec.general
        + [ExecutionInstanceType.HYBRID] * spec.hybrid
    )
    return [
        ExecutionInstance(
            instance_id=f"{role.value}-{i}",
            host="127.0.0.1",
            port=9000 + i,
            model_name=spec.model,
            tensor_parallel_size=spec.tp,
            gpu_count=spec.tp,
            instance_type=role,
            machine_id=NODE,
            nvlink_domain=NODE,
            max_concurrent_requests=256,
            metadata={"sim_gpu": gpu, "sim_model": spec.model, "sim_kv_link_gbps": NVLINK_GBPS},
        )
        for i, role in enumerate(roles)
    ]


def manager_kwargs(
    spec: FleetSpec, slo: SLO = SLO_ITL, secondary: SLO = SLO_TPOT
) -> dict[str, Any]:
    """ControlPlaneManager arguments for ``spec`` (PD off for the colocated layout). The
    adaptive decider targets both SLOs: TTFT, the largest inter-token gap (``slo``) and
    the mean TPOT (``secondary``)."""
    if spec.decider is None:
        return {"enable_pd_separation": False}
    meta: dict[str, Any] = {"kv_bytes_per_token": get_model(spec.model).kv_bytes_per_token}
    if spec.decider == "adaptive":
        targets = {
            "ttft_slo_s": slo.ttft_s,
            "tpot_slo_s": secondary.tpot_s,
            "itl_slo_s": slo.itl_s,
        }
        meta["decider_params"] = {k: v for k, v in targets.items() if v is not None}
        meta["decider_params"].update(dict(spec.decider_params))
    if spec.pairing_params:
        meta["pairing_params"] = dict(spec.pairing_params)
    cfg = PDSeparationConfig(
        routing_policy=spec.decider, max_transfer_latency_ms=0.0, metadata=meta
    )
    return {"enable_pd_separation": True, "pd_config": cfg}


def long_prompt_workload(n: int, rate: float, seed: int = 0, model: str | None = None) -> Workload:
    """Prompts uniform in [4096, 8192] tokens, outputs uniform in [250, 350], Poisson."""
    return synthetic(
        n, rate, Uniform(4096, 8192), Uniform(250, 350), seed=seed, model=model,
        name="long_prompt",
    )  # fmt: skip


def chat_workload(n: int, rate: float, seed: int = 0, model: str | None = None) -> Workload:
    """ShareGPT-like chat lengths (median prompt ~250, output ~200 tokens), Poisson."""
    return sharegpt_like(n, rate, seed=seed, model=model)


@dataclass(frozen=True)
class PDCase:
    """One fleet layout on one workload: summaries under both SLOs and the PD counters."""

    fleet: FleetSpec
    workload: str
    rate: float
    summary: BenchSummary
    summary_tpot: BenchSummary
    pd: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        s, t = self.summary, self.summary_tpot

        def pct(stats: Any, q: str) -> float | None:
            return None if stats is None else float(getattr(stats, q))

        return {
            "fleet": self.fleet.to_dict(),
            "workload": self.workload,
            "rate_rps": self.rate,
            "requests": s.count,
            "failed": s.failed,
            "duration_s": s.duration_s,
            "goodput_rps": s.goodput,
            "slo_attainment": s.slo_attainment,
            "goodput_tpot_rps": t.goodput,
            "slo_attainment_tpot": t.slo_attainment,
            "request_throughput_rps": s.request_throughput,
            "output_token_throughput": s.output_token_throughput,
            "ttft_p50_s": pct(s.ttft, "p50"),
            "ttft_p99_s": pct(s.ttft, "p99"),
            "itl_p50_s": pct(s.itl, "p50"),
            "itl_p99_s": pct(s.itl, "p99"),
            "tpot_p50_s": pct(s.tpot, "p50"),
            "tpot_p99_s": pct(s.tpot, "p99"),
            "pd": self.pd,
            "summary": s.to_dict(),
        }


def run_case(
    spec: FleetSpec, workload: Workload, *, seed: int = 0, cluster: bool = False
) -> PDCase:
    """Run ``workload`` on a fresh simulated ``spec`` fleet, on virtual time: through the
    control plane over in-process engines, or with ``cluster`` on the cluster simulator
    (:class:`~sage_llm.sim.cluster.ClusterSimulator`: the same decisions and the same
    figures, request for request, several times faster)."""
    if cluster:
        return _cluster_case(spec, workload, seed)

    async def main() -> PDCase:
        cp = ControlPlaneManager(
            scheduling_policy="fifo",
            routing_strategy="load_balanced",
            mode="simulated",
            seed=seed,
            **manager_kwargs(spec),
        )
        for inst in fleet_instances(spec):
            cp.register_instance(inst)
        async with cp:
            loop = asyncio.get_running_loop()
            start = loop.time()
            measurements = await replay(cp, workload)
            duration = max(loop.time() - start, 1e-9)
            pd = cp.get_status().get("pd") or {}
        keep = ("disaggregated_requests", "colocated_requests", "colocated_fallbacks")
        figures = pd.get("figures", pd) if isinstance(pd, dict) else {}
        kept = {k: figures[k] for k in keep if isinstance(figures, dict) and k in figures}
        return _case(spec, workload, measurements, duration, kept)

    return run_virtual(main())


def _case(
    spec: FleetSpec,
    workload: Workload,
    measurements: Sequence[RequestMeasurement],
    duration: float,
    pd: dict[str, Any],
) -> PDCase:
    """The case of ``workload``'s ``measurements`` on ``spec`` over ``duration`` seconds,
    with the PD counters ``pd``."""
    rate = workload.params.get("rate", 0.0)
    return PDCase(
        fleet=spec,
        workload=workload.name,
        rate=float(rate) * float(workload.params.get("rate_scale", 1.0)),
        summary=summarize(measurements, duration, SLO_ITL),
        summary_tpot=summarize(measurements, duration, SLO_TPOT),
        pd=pd,
    )


def _cluster_case(spec: FleetSpec, workload: Workload, seed: int) -> PDCase:
    """:func:`run_case` on the cluster simulator (every token's time kept: the headline
    SLO reads the largest gap)."""
    kwargs = manager_kwargs(spec)
    pd = kwargs.get("pd_config") if kwargs["enable_pd_separation"] else None
    sim = ClusterSimulator(
        fleet_instances(spec), policy="fifo", routing="load_balanced", seed=seed,
        pd=pd if pd is not None else PDSeparationConfig(enabled=False),
        record_token_times=True,
    )  # fmt: skip
    result = sim.run(workload)
    figures: dict[str, Any] = {}
    if sim.pd is not None:  # as the manager's status counts them
        figures = {
            "disaggregated_requests": result.disaggregated,
            "colocated_requests": result.colocated,
            "colocated_fallbacks": 0,  # (no leg fails on its engine here)
        }
    return _case(spec, workload, result.measurements, max(result.sim_time_s, 1e-9), figures)


def _workloads(
    n_long: int, long_rate: float, n_chat: int, chat_rate: float, seed: int
) -> list[Workload]:
    out = []
    if n_long > 0:
        out.append(long_prompt_workload(n_long, long_rate, seed))
    if n_chat > 0:
        out.append(chat_workload(n_chat, chat_rate, seed))
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    return a / b if b > 0 else (None if a == 0 else float("inf"))


def evaluate_targets(cases: Sequence[dict[str, Any]], model: str = MODEL_8B) -> dict[str, Any]:
    """The brief's targets over the in-process cases of ``model``: best PD ratio ≥ 1.5×
    colocated goodput on ``long_prompt``; adaptive ≥ 0.95× colocated on ``sharegpt_like``."""

    def goodput(workload: str, pred: Any) -> dict[str, float]:
        return {
            c["fleet"]["name"]: c["goodput_rps"]
            for c in cases
            if c["workload"] == workload and c["fleet"]["model"] == model and pred(c["fleet"])
        }

    out: dict[str, Any] = {"model": model}
    colo_long = goodput("long_prompt", lambda f: f["decider"] is None)
    pd_long = goodput("long_prompt", lambda f: f["decider"] == "always")
    if colo_long and pd_long:
        best = max(pd_long, key=lambda k: pd_long[k])
        ratio = _ratio(pd_long[best], next(iter(colo_long.values())))
        out["long_prompt_best_pd"] = best
        out["long_prompt_best_pd_vs_colocated"] = ratio
        out["long_prompt_target_met"] = ratio is not None and ratio >= 1.5
    colo_chat = goodput("sharegpt_like", lambda f: f["decider"] is None)
    adaptive = goodput("sharegpt_like", lambda f: f["decider"] == "adaptive")
    if colo_chat and adaptive:
        ratios = {k: _ratio(v, next(iter(colo_chat.values()))) for k, v in adaptive.items()}
        out["chat_adaptive_vs_colocated"] = ratios
        out["chat_target_met"] = all(r is not None and r >= 0.95 for r in ratios.values())
    return out


def run_pd_bench(
    *,
    n_long: int = 120,
    long_rate: float = 12.0,
    n_chat: int = 300,
    chat_rate: float = 20.0,
    fleets: Sequence[FleetSpec] | None = None,
    include_70b: bool = True,
    rate_70b_factor: float = 0.25,
    seed: int = 0,
    fleets_70b: Sequence[FleetSpec] | None = None,
    cluster: bool = False,
) -> dict[str, Any]:
    """The in-process (virtual time) part of the PD benchmark; returns the JSON report.

    ``fleets`` defaults to :func:`default_fleets` for Llama-3.1-8B, plus, when
    ``include_70b``, ``fleets_70b`` at ``rate_70b_factor`` of the rates (default: the TP4 70B
    layouts when ``fleets`` is None too, else none). ``cluster`` runs the cases on the
    cluster simulator (:func:`run_case`).
    """
    check_sizes(n_long, long_rate, n_chat, chat_rate)
    if not (math.isfinite(rate_70b_factor) and rate_70b_factor > 0):
        raise ConfigError(
            f"must be a finite number > 0, got {rate_70b_factor:g}", key="rate_70b_factor"
        )
    plan: list[tuple[FleetSpec, Workload]] = []
    for w in _workloads(n_long, long_rate, n_chat, chat_rate, seed):
        plan.extend((f, w) for f in (fleets if fleets is not None else default_fleets()))
    if include_70b and (fleets is None or fleets_70b is not None):  # chosen 8B: 70B as named
        f70 = list(fleets_70b) if fleets_70b is not None else default_fleets(MODEL_70B)
        r = rate_70b_factor
        for w in _workloads(n_long, long_rate * r, n_chat, chat_rate * r, seed):
            plan.extend((f, w) for f in f70)
    cases = [run_case(f, w, seed=seed, cluster=cluster).to_dict() for f, w in plan]
    models = sorted({c["fleet"]["model"] for c in cases})
    return {
        "benchmark": "pd",
        "node": {"gpus": GPUS, "gpu": "h100", "kv_link_gbps": NVLINK_GBPS, "nvlink_domain": NODE},
        "slo": SLO_ITL.to_dict(),
        "slo_secondary": SLO_TPOT.to_dict(),
        "slo_semantics": (
            "meets SLO: completed, TTFT <= ttft_s, largest inter-chunk gap <= itl_s "
            "(headline); secondary: mean TPOT <= tpot_s. goodput = requests meeting it / "
            "run duration (virtual seconds)"
        ),
        "params": {
            "n_long": n_long,
            "long_rate": long_rate,
            "n_chat": n_chat,
            "chat_rate": chat_rate,
            "rate_70b_factor": rate_70b_factor,
            "seed": seed,
            "scheduling_policy": "fifo",
            "routing_strategy": "load_balanced",
            "simulator": "cluster" if cluster else "control_plane",
        },
        "cases": cases,
        "targets": [evaluate_targets(cases, m) for m in models],
    }


def _ms(v: Any) -> str:
    return "-" if v is None else f"{v * 1000:.0f}"


_COLUMNS: tuple[tuple[str, bool], ...] = (
    ("workload", False), ("model", False), ("fleet", False), ("requests", True),
    ("failed", True), ("rate", True), ("goodput", True), ("good-tpot", True), ("thru", True),
    ("ttft50", True), ("ttft99", True), ("itl50", True), ("itl99", True),
)  # fmt: skip
"""The table's columns: (header, right-aligned)."""


def _row(c: dict[str, Any]) -> list[str]:
    return [
        str(c["workload"]), str(c["fleet"]["model"]), str(c["fleet"]["name"]),
        str(c["requests"]), str(c["failed"]), f"{c['rate_rps']:.1f}", f"{c['goodput_rps']:.2f}",
        f"{c['goodput_tpot_rps']:.2f}", f"{c['request_throughput_rps']:.2f}",
        _ms(c["ttft_p50_s"]), _ms(c["ttft_p99_s"]), _ms(c["itl_p50_s"]), _ms(c["itl_p99_s"]),
    ]  # fmt: skip


def format_table(report: dict[str, Any]) -> str:
    """A short text table of the report's cases (and real-time runs, when present): one row
    per run with the number of requests it ran, columns as wide as their longest cell."""
    realtime = report.get("realtime") or {}
    cases = list(report.get("cases", [])) + list(realtime.get("cases", []))
    cells = [[h for h, _ in _COLUMNS]] + [_row(c) for c in cases]
    widths = [max(len(row[i]) for row in cells) for i in range(len(_COLUMNS))]
    lines = [
        f"goodput: req/s meeting {SLO_ITL.name} (good-tpot: {SLO_TPOT.name}); thru: req/s; "
        "times in ms; requests: how many requests the row ran, failed: how many of them failed"
    ]
    if realtime.get("cases"):
        lines.append(
            f"rt: rows: engine-sim processes in real time at speed {realtime.get('speed')}, "
            "through each proxy over HTTP; times in simulated seconds"
        )
    for row in cells:
        lines.append(
            " ".join(
                cell.rjust(w) if right else cell.ljust(w)
                for cell, w, (_, right) in zip(row, widths, _COLUMNS, strict=True)
            ).rstrip()
        )
    for target in report.get("targets", []):
        lines.append(f"targets: {json.dumps(target, default=str)}")
    return "\n".join(lines)


def pd_bench_main(
    *,
    out: Path | None = DEFAULT_OUT,
    n_long: int = 120,
    long_rate: float = 12.0,
    n_chat: int = 300,
    chat_rate: float = 20.0,
    include_70b: bool = True,
    realtime: bool = False,
    speed: float = REALTIME_SPEED,
    seed: int = 0,
    fleet_names: Sequence[str] | None = None,
    cluster: bool = False,
) -> int:
    """``sage-llm bench pd``: run the benchmark, print the table, write the JSON report to
    ``out`` (default :data:`DEFAULT_OUT`; None: no file). ``realtime`` adds the runs
    over engine-sim processes through sage-llm's gateway and vllm-router
    (:mod:`~sage_llm.bench.pd_realtime`) at ``speed``× time compression, with the same sizes
    and rates, on :func:`realtime_fleets` of ``fleet_names``.
    ``fleet_names`` keeps only the layouts of :func:`default_fleets` with those names:
    Llama-3.1-8B's and, with ``include_70b``, Llama-3.1-70B's. ``cluster`` runs the
    in-process cases on the cluster simulator (the same figures, faster). Returns the exit
    status.
    Arguments, and that ``out`` can be written, are checked (:class:`ConfigError`) before
    anything runs."""
    if not (math.isfinite(speed) and speed > 0):
        raise ConfigError(f"must be a finite number > 0, got {speed:g}", key="speed")
    if seed < 0:
        raise ConfigError(f"must be >= 0, got {seed}", key="seed")
    fleets: list[FleetSpec] | None = None
    fleets_70b: list[FleetSpec] | None = None
    if fleet_names is not None:
        fleets, fleets_70b = select_named_fleets(fleet_names, include_70b)
    rt_fleets = realtime_fleets(fleet_names) if realtime else []
    if out is not None:
        check_out_file(out)
    report = run_pd_bench(
        n_long=n_long, long_rate=long_rate, n_chat=n_chat, chat_rate=chat_rate,
        fleets=fleets, include_70b=include_70b, seed=seed, fleets_70b=fleets_70b,
        cluster=cluster,
    )  # fmt: skip
    if realtime:
        from sage_llm.bench.pd_realtime import run_realtime

        rt = run_realtime(
            fleets=rt_fleets, speed=speed, n_long=n_long, long_rate=long_rate,
            n_chat=n_chat, chat_rate=chat_rate, seed=seed,
        )  # fmt: skip
        report["realtime"] = asyncio.run(rt)
    print(format_table(report))
    if out is not None:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(jsonutil.dumps_pretty(report) + "\n")  # (an infinite ratio: 1e999)
        except OSError as exc:
            raise ConfigError(f"cannot write {out}: {exc.strerror or exc}", key="out") from None
        print(f"report written to {out}")
    return 0
