"""Parallelism planner: how to run model M on N GPUs of type G for a workload under SLOs.

:func:`plan` enumerates instance shapes (TP × PP, × EP for MoE models; DP = how many
instances) as colocated fleets and as prefill/decode (PD) splits, rejects those that cannot
work (with the reason: attention heads not divisible by TP, weights or the KV cache of the
needed concurrency not fitting ``memory × gpu_memory_utilization``), places every instance's
GPUs (inside an NVLink domain when one fits, :meth:`Topology.best_group`), estimates TTFT,
TPOT and goodput capacity with the simulator's roofline cost model and a queueing
approximation (:mod:`sage_llm.control_plane.parallelism_eval`), and picks the plan with the
highest goodput capacity under the SLO, explaining why it beat the alternatives::

    p = plan("llama-3-70b", 8, "h100", WorkloadProfile(1024, 256, rate=10), SLOTarget(2, 0.05))
    print(p.explanation)
    for inst in p.instances:
        print(inst.role, inst.tp, inst.gpu_ids)

:func:`plan_command` is ``sage-llm plan``: it parses ``"8xH100"``, ``"2s"``, ``"50ms"``
and renders the plan as text (or JSON for ``sage-llm launch``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sage_llm.control_plane.parallelism_eval import (
    DEFAULT_NODE_GPUS,
    EngineLimits,
    GPUAllocation,
    InstanceShape,
    RoleState,
    ShapeEval,
    SLOTarget,
    WorkloadProfile,
    capacity,
    parse_duration,
    parse_gpus,
)
from sage_llm.control_plane.topology import Topology, parse_nvidia_smi_topo
from sage_llm.errors import ConfigError
from sage_llm.sim.specs import GPUSpec, ModelSpec, resolve_gpu, resolve_model
from sage_llm.types import ExecutionInstanceType

__all__ = [
    "Alternative",
    "Candidate",
    "EngineLimits",
    "GPUAllocation",
    "InstanceShape",
    "Plan",
    "PlanEstimates",
    "PlannedInstance",
    "SLOTarget",
    "WorkloadProfile",
    "parse_duration",
    "parse_gpus",
    "plan",
    "plan_command",
]

TIE_TOLERANCE = 0.02
"""Plans whose capacity estimates are this close count as equal; more instances then win."""
NETWORK_GBPS = 25.0
"""KV hand-off bandwidth assumed between nodes (InfiniBand-class), GB/s."""
GENERAL, PREFILL, DECODE = (
    ExecutionInstanceType.GENERAL,
    ExecutionInstanceType.PREFILLING,
    ExecutionInstanceType.DECODING,
)


@dataclass(frozen=True)
class Candidate:
    """A fleet: ``count`` × ``shape`` colocated, or PD ``count`` prefill + ``decode_count``."""

    kind: Literal["colocated", "pd"]
    shape: InstanceShape
    count: int
    decode_shape: InstanceShape | None = None
    decode_count: int = 0

    @property
    def gpus(self) -> int:
        extra = self.decode_shape.gpus * self.decode_count if self.decode_shape else 0
        return self.shape.gpus * self.count + extra

    @property
    def label(self) -> str:
        if self.decode_shape is None:
            return f"{self.count} × {self.shape.label}"
        return (
            f"PD {self.count} × {self.shape.label} prefill + "
            f"{self.decode_count} × {self.decode_shape.label} decode"
        )


@dataclass(frozen=True)
class PlannedInstance:
    """One engine to start: its role, parallelism and GPUs (indices on machine ``node``)."""

    role: ExecutionInstanceType
    tp: int
    pp: int
    ep: int
    gpu_ids: tuple[int, ...]
    node: int = 0
    link_gbps: float = 0.0
    """TP/PP link bandwidth the estimate assumed (NVLink inside a domain, else PCIe)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "role": self.role.value,
            "tp": self.tp,
            "pp": self.pp,
            "ep": self.ep,
            "gpu_ids": list(self.gpu_ids),
            "node": self.node,
            "link_gbps": self.link_gbps,
        }


@dataclass(frozen=True)
class PlanEstimates:
    """Estimates for one candidate. Latencies at ``rate_rps`` (the workload's rate, or the
    plan's own capacity when the workload gave none); ``limit`` is what caps the capacity."""

    capacity_rps: float
    limit: str
    rate_rps: float
    ttft_s: float
    tpot_s: float
    goodput_rps: float
    meets_slo: bool
    batch_per_instance: float
    kv_usage: float
    gpus_used: int

    def to_dict(self) -> dict[str, Any]:
        return {
            k: (None if isinstance(v, float) and math.isinf(v) else v)
            for k, v in vars(self).items()
        }


@dataclass(frozen=True)
class Alternative:
    """A feasible candidate that was not chosen, and why it lost."""

    candidate: Candidate
    instances: tuple[PlannedInstance, ...]
    estimates: PlanEstimates
    why: str


@dataclass(frozen=True)
class Plan:
    """The planner's answer: the instances to start, their estimates and the reasoning."""

    model: ModelSpec
    gpu: GPUSpec
    workload: WorkloadProfile
    slo: SLOTarget
    candidate: Candidate
    instances: list[PlannedInstance]
    estimates: PlanEstimates
    explanation: str
    alternatives: list[Alternative]
    rejected: list[tuple[Candidate, str]]
    assumptions: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON form; ``sage-llm launch`` reads ``model``, ``gpu`` and ``instances``."""
        return {
            "model": self.model.name,
            "gpu": self.gpu.name,
            "plan": self.candidate.label,
            "instances": [i.to_dict() for i in self.instances],
            "estimates": self.estimates.to_dict(),
            "workload": vars(self.workload),
            "slo": vars(self.slo),
            "assumptions": list(self.assumptions),
            "alternatives": [
                {"plan": a.candidate.label, "capacity_rps": a.estimates.capacity_rps, "why": a.why}
                for a in self.alternatives
            ],
            "rejected": [{"plan": c.label, "reason": r} for c, r in self.rejected],
            "explanation": self.explanation,
        }


# -- the planner ----------------------------------------------------------------------------


@dataclass
class _Node:
    index: int
    ids: tuple[int, ...]
    topology: Topology | None
    nvlink_all: bool


def _sub_topology(topo: Topology, keep: Sequence[int]) -> Topology:
    pos = [topo.gpu_indices.index(i) for i in sorted(keep)]
    return Topology(
        gpus=tuple(topo.gpus[p] for p in pos),
        nics=topo.nics,
        links=tuple(tuple(topo.links[a][b] for b in pos) for a in pos),
        gpu_nic_links=tuple(topo.gpu_nic_links[p] for p in pos),
        numa_nodes=topo.numa_nodes,
    )


def _group_link(node: _Node, group: tuple[int, ...], gpu: GPUSpec) -> tuple[bool, float]:
    """Whether ``group`` is inside one NVLink domain, and the TP link bandwidth to assume."""
    if len(group) == 1:
        return True, gpu.interconnect_gbps
    topo = node.topology
    if topo is None:
        return (True, gpu.nvlink_gbps) if node.nvlink_all else (False, gpu.pcie_gbps)
    inside = any(set(group) <= d for d in topo.nvlink_domains())
    weakest = min(topo.bandwidth_gbps(a, b) for a in group for b in group if a != b)
    if inside:
        return True, min(weakest, gpu.nvlink_gbps) if gpu.nvlink_gbps > 0 else weakest
    return False, min(weakest, gpu.pcie_gbps)


def _place(
    sizes: tuple[int, ...], nodes: Sequence[_Node], gpu: GPUSpec
) -> list[tuple[int, tuple[int, ...], float]] | None:
    """Node, GPUs and link for groups of ``sizes`` (placed largest first; NVLink domains
    preferred), in the order given; None when they do not fit."""
    free = {n.index: list(n.ids) for n in nodes}
    out: dict[int, tuple[int, tuple[int, ...], float]] = {}
    for k in sorted(range(len(sizes)), key=lambda k: -sizes[k]):
        size, options = sizes[k], []
        for node in nodes:
            if len(free[node.index]) < size:
                continue
            if node.topology is not None:
                sub = _sub_topology(node.topology, free[node.index])
                group = sub.best_group(size) or ()
            else:
                group = tuple(sorted(free[node.index])[:size])
            inside, link = _group_link(node, group, gpu)
            options.append((not inside, node.index, group, link))
        if not options:
            return None
        _, where, group, link = min(options, key=lambda o: (o[0], o[1]))
        free[where] = [g for g in free[where] if g not in group]
        out[k] = (where, tuple(sorted(group)), link)
    return [out[k] for k in range(len(sizes))]


@dataclass
class _Planner:
    model: ModelSpec
    gpu: GPUSpec
    alloc: GPUAllocation
    workload: WorkloadProfile
    slo: SLOTarget
    nodes: list[_Node]
    limits: EngineLimits
    evals: dict[tuple[InstanceShape, float], ShapeEval] = field(default_factory=dict)
    caps: dict[tuple[InstanceShape, float, str], tuple[float, str]] = field(default_factory=dict)
    places: dict[tuple[int, ...], list[tuple[int, tuple[int, ...], float]] | None] = field(
        default_factory=dict
    )

    def shape_eval(self, shape: InstanceShape, link: float) -> ShapeEval:
        key = (shape, round(link, 3))
        if key not in self.evals:
            self.evals[key] = ShapeEval(
                self.model, self.gpu, shape.tp, shape.pp, shape.ep, link, self.workload, self.limits
            )
        return self.evals[key]

    def kv_link(self, instances: Sequence[PlannedInstance]) -> float:
        if len({i.node for i in instances}) > 1:
            return NETWORK_GBPS
        node = self.nodes[instances[0].node]
        group = tuple(sorted({g for i in instances for g in i.gpu_ids}))
        return _group_link(node, group, self.gpu)[1]

    def state(
        self, ev: ShapeEval, role: ExecutionInstanceType, rate: float, kv_s: float
    ) -> RoleState:
        q, slo = self.slo.attainment, self.slo
        if role is GENERAL:
            return ev.check(ev.colocated(rate, q), ttft_s=slo.ttft_s, tpot_s=slo.tpot_s)
        if role is PREFILL:
            budget = slo.ttft_s - kv_s - slo.tpot_s
            return ev.check(ev.prefill_only(rate, q), ttft_s=budget, tpot_s=None)
        return ev.check(ev.decode_only(rate), ttft_s=None, tpot_s=slo.tpot_s)

    def capacity(self, inst: PlannedInstance, kv_s: float) -> tuple[float, str]:
        shape = InstanceShape(inst.tp, inst.pp, inst.ep)
        key = (shape, round(inst.link_gbps, 3), f"{inst.role.value}:{kv_s:.6f}")
        if key not in self.caps:
            ev = self.shape_eval(shape, inst.link_gbps)
            self.caps[key] = capacity(lambda r: self.state(ev, inst.role, r, kv_s).limit)
        return self.caps[key]

    def instances(self, cand: Candidate) -> list[PlannedInstance] | None:
        roles = [(GENERAL if cand.kind == "colocated" else PREFILL, cand.shape)] * cand.count
        if cand.decode_shape is not None:
            roles += [(DECODE, cand.decode_shape)] * cand.decode_count
        sizes = tuple(s.gpus for _, s in roles)
        if sizes not in self.places:
            self.places[sizes] = _place(sizes, self.nodes, self.gpu)
        placed = self.places[sizes]
        if placed is None:
            return None
        return [
            PlannedInstance(role, s.tp, s.pp, s.ep, group, node, link)
            for (role, s), (node, group, link) in zip(roles, placed, strict=True)
        ]

    def evaluate(
        self, cand: Candidate, insts: list[PlannedInstance]
    ) -> tuple[PlanEstimates, list[tuple[ShapeEval, RoleState]]]:
        kv_s = 0.0
        if cand.kind == "pd":
            per_token = self.model.kv_bytes_per_token
            kv_s = self.workload.p90_prompt * per_token / (self.kv_link(insts) * 1e9)
        caps = [self.capacity(i, kv_s) for i in insts]
        pools: dict[ExecutionInstanceType, list[int]] = {}
        for k, inst in enumerate(insts):
            pools.setdefault(inst.role, []).append(k)
        pool_cap = {r: sum(caps[k][0] for k in ks) for r, ks in pools.items()}
        bottleneck = min(pool_cap, key=lambda r: pool_cap[r])
        total = pool_cap[bottleneck]
        limit = caps[min(pools[bottleneck], key=lambda k: caps[k][0])][1]
        if cand.kind == "pd":
            limit = f"{'prefill' if bottleneck is PREFILL else 'decode'} {limit}"
        rate = self.workload.rate if self.workload.rate is not None else max(total, 1e-6)
        states = []
        for k, inst in enumerate(insts):
            ks = pools[inst.role]
            share = caps[k][0] / pool_cap[inst.role] if pool_cap[inst.role] > 0 else 1 / len(ks)
            ev = self.shape_eval(InstanceShape(inst.tp, inst.pp, inst.ep), inst.link_gbps)
            states.append((ev, self.state(ev, inst.role, rate * share, kv_s)))
        decode_steps = [st.tpot_s for _, st in states if st.tpot_s > 0]
        tpot = max(decode_steps, default=0.0)
        ttft = max(st.ttft_s for _, st in states)
        if cand.kind == "pd":
            ttft += kv_s + tpot
        meets = all(st.limit is None for _, st in states) and ttft <= self.slo.ttft_s * 1.0001
        return PlanEstimates(
            capacity_rps=total,
            limit=limit,
            rate_rps=rate,
            ttft_s=ttft,
            tpot_s=tpot,
            goodput_rps=rate if meets else min(rate, total),
            meets_slo=meets,
            batch_per_instance=max(st.batch for _, st in states),
            kv_usage=max(st.kv_tokens_needed / ev.kv_tokens for ev, st in states),
            gpus_used=cand.gpus,
        ), states


def _shapes(model: ModelSpec, per_node: int) -> list[InstanceShape]:
    powers = [2**k for k in range(per_node.bit_length()) if 2**k <= per_node]
    out = []
    for tp in powers:
        for pp in powers:
            if tp * pp > per_node or pp > model.num_layers:
                continue
            out.append(InstanceShape(tp, pp))
            if model.num_experts > 1 and tp > 1:
                out.append(InstanceShape(tp, pp, tp))
    return out


def _structural_problem(model: ModelSpec, shape: InstanceShape) -> str | None:
    if model.num_heads % shape.tp:
        return f"{model.num_heads} attention heads are not divisible by TP{shape.tp}"
    if shape.ep > 1 and model.num_experts % shape.ep:
        return f"{model.num_experts} experts are not divisible by EP{shape.ep}"
    return None


def _nodes(
    alloc: GPUAllocation, gpu: GPUSpec, topology: Topology | None, notes: list[str]
) -> list[_Node]:
    if topology is None or not topology.gpus:
        ids = alloc.gpu_ids or tuple(range(alloc.gpus_per_node))
        nvlink = gpu.nvlink_gbps > 0
        if nvlink:
            notes.append(
                f"No topology given: assuming the {alloc.gpus_per_node} GPUs of each node are "
                f"NVLink-connected ({gpu.name} has NVLink, {gpu.nvlink_gbps:g} GB/s)."
            )
        else:
            notes.append(
                f"No topology given and {gpu.name} has no NVLink: TP traffic goes over PCIe "
                f"({gpu.pcie_gbps:g} GB/s)."
            )
        return [_Node(n, ids, None, nvlink) for n in range(alloc.nodes)]
    if alloc.gpus_per_node > len(topology.gpus):
        raise ConfigError(
            f"{alloc.gpus_per_node} GPUs per node requested but the topology shows "
            f"{len(topology.gpus)}",
            key="gpus",
        )
    ids = alloc.gpu_ids or topology.best_group(alloc.gpus_per_node) or ()
    unknown = set(ids) - set(topology.gpu_indices)
    if unknown:
        raise ConfigError(f"GPUs {sorted(unknown)} are not in the topology", key="gpus")
    domains = [sorted(d & set(ids)) for d in topology.nvlink_domains() if len(d & set(ids)) > 1]
    desc = "; ".join(",".join(map(str, d)) for d in domains) or "none"
    notes.append(f"Topology: GPUs {','.join(map(str, sorted(ids)))}; NVLink domains: {desc}.")
    if alloc.nodes > 1:
        notes.append(f"Assuming all {alloc.nodes} nodes have this topology.")
    sub = _sub_topology(topology, ids)
    return [_Node(n, tuple(sorted(ids)), sub, False) for n in range(alloc.nodes)]


def _allocation(
    gpus: int | GPUAllocation, topology: Topology | None, notes: list[str]
) -> GPUAllocation:
    if isinstance(gpus, GPUAllocation):
        return gpus
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise ConfigError(f"GPU count must be a positive integer, got {gpus!r}", key="gpus")
    node = len(topology.gpus) if topology is not None and topology.gpus else DEFAULT_NODE_GPUS
    if gpus <= node:
        return GPUAllocation(1, gpus)
    if gpus % node:
        raise ConfigError(
            f"{gpus} GPUs do not fill nodes of {node}; give NODESxCOUNT (e.g. 2x8xH100)",
            key="gpus",
        )
    notes.append(f"{gpus} GPUs taken as {gpus // node} nodes of {node}.")
    return GPUAllocation(gpus // node, node)


def plan(
    model: str | ModelSpec,
    gpus: int | GPUAllocation,
    gpu: str | GPUSpec,
    workload: WorkloadProfile,
    slo: SLOTarget,
    topology: Topology | None = None,
    *,
    allow_pd: bool = True,
    limits: EngineLimits | None = None,
) -> Plan:
    """The best TP × PP × DP (× EP) fleet, colocated or PD, for ``workload`` under ``slo``.

    Raises ConfigError for bad inputs or when no candidate fits in memory.
    """
    mspec, gspec = resolve_model(model), resolve_gpu(gpu)
    notes: list[str] = []
    alloc = _allocation(gpus, topology, notes)
    nodes = _nodes(alloc, gspec, topology, notes)
    pl = _Planner(mspec, gspec, alloc, workload, slo, nodes, limits or EngineLimits())
    rejected: list[tuple[Candidate, str]] = []
    feasible: list[InstanceShape] = []
    per_node = alloc.gpus_per_node
    for shape in _shapes(mspec, per_node):
        cand = Candidate("colocated", shape, alloc.nodes * (per_node // shape.gpus))
        why = _structural_problem(mspec, shape) or pl.shape_eval(shape, 1.0).memory_problem()
        if why is None:
            feasible.append(shape)
        else:
            rejected.append((cand, why))
    cands = [Candidate("colocated", s, alloc.nodes * (per_node // s.gpus)) for s in feasible]
    pd_shapes = [s for s in feasible if s.pp == 1]  # PP is not among NIXL PD's documented features
    if allow_pd:
        for sp in pd_shapes:
            for sd in pd_shapes:
                for n_p in range(1, alloc.total // sp.gpus):
                    n_d = (alloc.total - n_p * sp.gpus) // sd.gpus
                    while n_d >= 1 and pl.instances(Candidate("pd", sp, n_p, sd, n_d)) is None:
                        n_d -= 1
                    if n_d >= 1:
                        cands.append(Candidate("pd", sp, n_p, sd, n_d))
    scored: list[tuple[Candidate, list[PlannedInstance], PlanEstimates]] = []
    for cand in cands:
        insts = pl.instances(cand)
        if insts is None:
            rejected.append((cand, "the instances do not fit on the nodes' GPUs"))
            continue
        est, states = pl.evaluate(cand, insts)
        if (
            workload.rate is not None
            and not est.meets_slo
            and est.kv_usage > 1
            and (est.capacity_rps >= workload.rate or "KV" in est.limit)
        ):
            rejected.append((cand, _kv_reason(states, est.rate_rps)))
            continue
        scored.append((cand, insts, est))
    if not scored:
        reasons = "; ".join(f"{c.label}: {r}" for c, r in rejected[:6])
        raise ConfigError(
            f"no feasible plan for {mspec.name} on {alloc.total} × {gspec.name}: {reasons}"
        )
    scored.sort(key=lambda t: _rank(t[0], t[2], slo))
    top_cap = scored[0][2].capacity_rps
    near = [t for t in scored if t[2].capacity_rps >= (1 - TIE_TOLERANCE) * top_cap]
    near.sort(key=lambda t: (-_count(t[0]), *_rank(t[0], t[2], slo)))
    scored = near + [t for t in scored if t not in near]
    best_cand, best_insts, best_est = scored[0]
    alternatives = [
        Alternative(c, tuple(i), e, _why_lost(c, e, best_cand, best_est)) for c, i, e in scored[1:]
    ]
    explanation = _explain(pl, best_cand, best_insts, best_est, alternatives, rejected, notes)
    return Plan(
        mspec, gspec, workload, slo, best_cand, best_insts, best_est, explanation,
        alternatives, rejected, notes,
    )  # fmt: skip


def _count(cand: Candidate) -> int:
    return cand.count + cand.decode_count


def _rank(cand: Candidate, est: PlanEstimates, slo: SLOTarget) -> tuple[float, ...]:
    slack = max(est.ttft_s / slo.ttft_s, est.tpot_s / slo.tpot_s)
    return (-round(est.capacity_rps, 6), slack if est.capacity_rps == 0 else 0.0,
            cand.gpus, cand.kind != "colocated", cand.shape.gpus, cand.shape.pp)  # fmt: skip


def _kv_reason(states: Sequence[tuple[ShapeEval, RoleState]], rate: float) -> str:
    ev, st = max(states, key=lambda s: s[1].kv_tokens_needed / s[0].kv_tokens)
    need = st.kv_tokens_needed
    left = ev.usable_gib_per_gpu() - ev.weights_gib_per_gpu()
    return (
        f"KV cache for the needed concurrency (~{st.batch:.0f} sequences, {need:.0f} tokens "
        f"= {ev.kv_gib(need):.1f} GiB per GPU) exceeds the {left:.1f} GiB left after weights "
        f"at {rate:g} req/s"
    )


def _ms(seconds: float) -> str:
    if math.isinf(seconds):
        return "∞"
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _why_lost(c: Candidate, e: PlanEstimates, best: Candidate, be: PlanEstimates) -> str:
    if e.capacity_rps >= (1 - TIE_TOLERANCE) * be.capacity_rps and _count(c) < _count(best):
        return (
            f"{e.capacity_rps:.2f} req/s, within {TIE_TOLERANCE:.0%} of the chosen plan, but "
            f"{_count(c)} instance(s) instead of {_count(best)}: fewer batch slots past "
            "capacity and no redundancy"
        )
    if e.capacity_rps < be.capacity_rps:
        drop = 1 - e.capacity_rps / be.capacity_rps if be.capacity_rps else 0.0
        return f"{e.capacity_rps:.2f} req/s (−{drop:.0%}), capped by {e.limit}"
    if e.gpus_used > be.gpus_used:
        return f"same goodput with {e.gpus_used} GPUs instead of {be.gpus_used}"
    return "equal estimate; the simpler or smaller-instance plan is preferred"


def _explain(
    pl: _Planner,
    cand: Candidate,
    insts: Sequence[PlannedInstance],
    est: PlanEstimates,
    alternatives: Sequence[Alternative],
    rejected: Sequence[tuple[Candidate, str]],
    notes: Sequence[str],
    shown: int = 5,
) -> str:
    w, slo = pl.workload, pl.slo
    total = pl.alloc.total
    lines = [
        f"Plan for {pl.model.name} on {total} × {pl.gpu.name} ({pl.gpu.memory_gb:g} GiB each)",
        f"Workload: {w.describe()}",
        f"SLO: {slo.describe()}",
        *notes,
        "",
        f"Chosen: {cand.label} ({est.gpus_used} of {total} GPUs)",
    ]
    for k, i in enumerate(insts):
        gpus = ",".join(map(str, i.gpu_ids))
        where = f"node {i.node} " if pl.alloc.nodes > 1 else ""
        lines.append(
            f"  {k}: {i.role.value:<10} TP{i.tp} PP{i.pp}{f' EP{i.ep}' if i.ep > 1 else ''} on "
            f"{where}GPUs {gpus}" + (f" (link {i.link_gbps:g} GB/s)" if len(i.gpu_ids) > 1 else "")
        )
    at = "at the workload's" if w.rate is not None else "at its capacity,"
    q = f"p{slo.attainment * 100:g}"
    lines.append(
        f"  {at} {est.rate_rps:.2f} req/s: TTFT {q} ≈ {_ms(est.ttft_s)}, TPOT {q} ≈ "
        f"{_ms(est.tpot_s)}, ~{est.batch_per_instance:.0f} sequences per instance, "
        f"KV cache {min(est.kv_usage, 9.99):.0%} full" + ("" if est.meets_slo else " — SLO NOT MET")
    )
    lines.append(
        f"  goodput capacity ≈ {est.capacity_rps:.2f} req/s under the SLO (then {est.limit} "
        "is the limit)"
    )
    why = (
        f"Why: highest estimated goodput under the SLO among {len(alternatives) + 1} feasible plans"
    )
    top = max(alternatives, key=lambda a: a.estimates.capacity_rps, default=None)
    if top is not None and top.estimates.capacity_rps > est.capacity_rps:
        why = (
            f"Why: within {TIE_TOLERANCE:.0%} of the highest estimate ({top.candidate.label}, "
            f"{top.estimates.capacity_rps:.2f} req/s) with more instances, among "
            f"{len(alternatives) + 1} feasible plans"
        )
    if w.rate is not None and not est.meets_slo:
        why += f"; no plan meets the SLO at {w.rate:g} req/s, this one sustains the most"
    lines.append(why + ".")
    if alternatives:
        lines.append(f"Top alternatives (of {len(alternatives)}):")
        lines += [f"  {a.candidate.label}: {a.why}" for a in alternatives[:shown]]
    if rejected:
        lines.append(f"Rejected ({len(rejected)}):")
        lines += [f"  {c.label}: {r}" for c, r in rejected[:shown]]
        if len(rejected) > shown:
            lines.append(f"  … and {len(rejected) - shown} more")
    return "\n".join(lines)


def plan_command(
    model: str = "llama-3-70b",
    gpus: str = "8xH100",
    slo_ttft: str | float = "2s",
    slo_tpot: str | float = "50ms",
    *,
    prompt_len: int = 1024,
    output_len: int = 256,
    prompt_p90: int | None = None,
    output_p90: int | None = None,
    rate: float | None = None,
    topology_file: str | Path | None = None,
    allow_pd: bool = True,
    as_json: bool = False,
) -> str:
    """What ``sage-llm plan`` prints: the explanation, or the plan as JSON (``as_json``)."""
    alloc, gpu = parse_gpus(gpus)
    topology = None
    if topology_file is not None:
        try:
            text = Path(topology_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read topology file: {exc}", key="topology") from None
        topology = parse_nvidia_smi_topo(text)
    workload = WorkloadProfile(
        prompt_len, output_len, rate=rate, prompt_p90=prompt_p90, output_p90=output_p90
    )
    slo = SLOTarget(
        parse_duration(slo_ttft, key="slo_ttft"), parse_duration(slo_tpot, key="slo_tpot")
    )
    result = plan(model, alloc, gpu, workload, slo, topology, allow_pd=allow_pd)
    if as_json:
        return json.dumps(result.to_dict(), indent=2, default=_json_default)
    return result.explanation


def _json_default(value: object) -> object:
    if isinstance(value, Mapping):
        return dict(value)
    return str(value)
