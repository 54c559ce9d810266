"""Parallelism planner: how to run model M on N GPUs of type G for a workload under SLOs.

:func:`plan` enumerates instance shapes (TP × PP, × EP for MoE models; DP = how many
instances) as colocated fleets and as prefill/decode (PD) splits, rejects those that cannot
work (with the reason: attention heads not divisible by TP, weights or the KV cache of the
needed concurrency not fitting ``memory × gpu_memory_utilization``, a goodput capacity of 0),
places every instance's GPUs (inside an NVLink domain when one fits,
:meth:`Topology.best_group`), estimates TTFT, TPOT and goodput capacity with the simulator's
cost model (roofline, or a packaged fitted profile) and a queueing approximation
(:mod:`sage_llm.control_plane.parallelism_eval`), and picks the plan with the highest goodput
capacity under the SLO, explaining why it beat the alternatives. Instances of one role, shape
and link are estimated once, placement works per node, and PD splits far from the balanced
one are skipped, so planning grows about linearly with the GPU count (at most
:data:`MAX_PLAN_GPUS`)::

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
from typing import TYPE_CHECKING, Any, Literal

from sage_llm.config_locate import read_utf8
from sage_llm.control_plane.parallelism_eval import (
    DEFAULT_NODE_GPUS,
    MAX_PLAN_GPUS,
    EngineLimits,
    GPUAllocation,
    InstanceShape,
    RoleState,
    ShapeEval,
    SLOTarget,
    WorkloadProfile,
    capacity,
    parse_duration,
    parse_gpu_text,
    parse_gpus,
)
from sage_llm.control_plane.topology import Topology, parse_nvidia_smi_topo
from sage_llm.errors import ConfigError
from sage_llm.sim.specs import (
    GPUSpec,
    ModelSpec,
    placement_problem,
    resolve_gpu,
    resolve_model,
    tp_problem,
)
from sage_llm.types import ExecutionInstanceType

if TYPE_CHECKING:
    from sage_llm.bench.fidelity import FittedProfile

__all__ = [
    "MAX_PLAN_GPUS",
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
    "parse_topology_text",
    "plan",
    "plan_command",
]

TIE_TOLERANCE = 0.02
"""Plans whose capacity estimates are this close count as equal; more instances then win."""
NETWORK_GBPS = 25.0
"""KV hand-off bandwidth assumed between nodes (InfiniBand-class), GB/s."""
PD_SPLITS = 8
"""PD splits tried per prefill/decode shape pair: all of them up to this many, else this many
around the balanced one."""
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
    """Estimates for one candidate. Latencies at ``rate_rps``: the workload's rate when the
    plan meets the SLO there, else (or without a rate) the plan's own capacity; ``meets_slo``
    says whether it meets the workload's rate. ``limit`` is what caps the capacity."""

    capacity_rps: float
    limit: str
    rate_rps: float
    ttft_s: float
    tpot_s: float | None
    """None when the workload's answers are one token (p90): no time per output token."""
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

    def shortfall(self) -> str | None:
        """What the plan cannot do that was asked of it (a rate no plan carries within the
        SLO), in a sentence with the best capacity found; None when it meets the SLO or no
        rate was asked for."""
        rate, est = self.workload.rate, self.estimates
        if rate is None or est.meets_slo:
            return None
        top = max(
            [(est.capacity_rps, self.candidate.label)]
            + [(a.estimates.capacity_rps, a.candidate.label) for a in self.alternatives]
        )
        return (
            f"no plan meets the SLO at {rate:g} req/s: the highest goodput capacity found is "
            f"{_rps(top[0])} req/s ({top[1]}); {self.candidate.label} is planned for the rate "
            "it can carry"
        )

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


# -- placement ------------------------------------------------------------------------------


@dataclass
class _Node:
    index: int
    ids: tuple[int, ...]
    topology: Topology | None
    nvlink_all: bool
    kind: int = 0
    """Nodes of one kind are identical (same GPUs, topology and links)."""


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


_Step = tuple[tuple[int, ...], float, tuple[int, ...]]
"""One group placed on a node: its GPUs, its link and the node's free GPUs after it."""
_Placed = tuple[int, tuple[int, ...], float]
"""Where one instance went: node, GPUs, link."""


@dataclass
class _Placer:
    """Places instances largest first, each on the best group of free GPUs
    (:meth:`Topology.best_group`) of the lowest-numbered node where one fits inside an NVLink
    domain, else of the lowest-numbered node where one fits at all. A PD split on several
    nodes is interleaved instead, so that each node gets both roles where the counts allow.

    Nodes of one kind with the same free GPUs behave the same, so what a node takes is
    worked out once per (kind, free GPUs, size) and a fleet is placed in time linear in its
    instances and nodes."""

    nodes: Sequence[_Node]
    gpu: GPUSpec
    _fills: dict[tuple[int, tuple[int, ...], int, bool], list[_Step]] = field(default_factory=dict)
    _placed: dict[tuple[tuple[int, int], ...], list[_Placed] | None] = field(default_factory=dict)
    _nodes_placed: dict[tuple[int, tuple[int, ...]], list[tuple[tuple[int, ...], float]] | None] = (
        field(default_factory=dict)
    )

    def _fill(self, node: _Node, free: tuple[int, ...], size: int, inside: bool) -> list[_Step]:
        """The groups of ``size`` a node with ``free`` GPUs takes one after another (only
        NVLink-inside ones when ``inside``)."""
        key = (node.kind, free, size, inside)
        steps = self._fills.get(key)
        if steps is None:
            steps, left = [], free
            while len(left) >= size:
                if node.topology is not None:
                    group = _sub_topology(node.topology, left).best_group(size) or ()
                else:
                    group = left[:size]
                within, link = _group_link(node, group, self.gpu)
                if inside and not within:
                    break
                left = tuple(g for g in left if g not in group)
                steps.append((tuple(sorted(group)), link, left))
            self._fills[key] = steps
        return steps

    def place(self, runs: tuple[tuple[int, int], ...]) -> list[_Placed] | None:
        """Node, GPUs and link of each instance of ``runs`` (``(size, count)`` in order), or
        None when they do not fit. Several runs (a PD split's roles) on several nodes are
        interleaved (:meth:`_mixed`) unless that fits worse than packing largest first."""
        if runs not in self._placed:
            packed = self._packed(runs)
            mixed = self._mixed(runs) if len(runs) > 1 and len(self.nodes) > 1 else None
            if mixed is not None and (
                packed is None or sum(m[2] for m in mixed) >= sum(p[2] for p in packed) - 1e-9
            ):
                packed = mixed
            self._placed[runs] = packed
        return self._placed[runs]

    def _mixed(self, runs: tuple[tuple[int, int], ...]) -> list[_Placed] | None:
        """Each node gets both roles where the counts allow, so a PD split's KV hand-offs stay
        inside a node and each node's engines can serve on their own: the instances, runs
        interleaved in proportion to their counts, go first-fit (by GPU count) to the nodes,
        then each node places its own largest first. None when a node cannot place its share."""
        counts = [c for _, c in runs]
        scale = math.prod(counts)
        done = [0] * len(runs)
        free = [len(n.ids) for n in self.nodes]
        smallest = min(s for s, _ in runs)
        fresh = list(range(len(self.nodes)))  # untouched nodes, in order
        open_: list[int] = []  # touched nodes with room left
        share: list[list[int]] = [[] for _ in self.nodes]  # instance indices per node
        starts = [sum(counts[:j]) for j in range(len(runs))]
        for _ in range(sum(counts)):
            j = min(
                (r for r in range(len(runs)) if done[r] < counts[r]),
                key=lambda r: ((done[r] + 1) * scale // counts[r], r),
            )
            size = runs[j][0]
            at = next((n for n in open_ if free[n] >= size), None)
            if at is None:
                at = next((n for n in fresh if free[n] >= size), None)
                if at is None:
                    return None
                fresh.remove(at)
                open_.append(at)
            share[at].append(starts[j] + done[j])
            done[j] += 1
            free[at] -= size
            if free[at] < smallest:
                open_.remove(at)
        sizes = [runs[j][0] for j, c in enumerate(counts) for _ in range(c)]
        out: list[_Placed | None] = [None] * len(sizes)
        for node, ks in zip(self.nodes, share, strict=True):
            ks = sorted(ks, key=lambda k: (-sizes[k], k))
            groups = self._node_groups(node, tuple(sizes[k] for k in ks))
            if groups is None:
                return None
            for k, (group, link) in zip(ks, groups, strict=True):
                out[k] = (node.index, group, link)
        return [o for o in out if o is not None]

    def _node_groups(
        self, node: _Node, sizes: tuple[int, ...]
    ) -> list[tuple[tuple[int, ...], float]] | None:
        """GPUs and link of groups of ``sizes`` (largest first) on one node, or None."""
        key = (node.kind, sizes)
        if key not in self._nodes_placed:
            out: list[tuple[tuple[int, ...], float]] | None = []
            free = node.ids
            for size in sorted(set(sizes), reverse=True):
                need = sizes.count(size)
                got: list[tuple[tuple[int, ...], float]] = []
                for inside in (True, False):
                    taken = self._fill(node, free, size, inside)[: need - len(got)]
                    got += [(group, link) for group, link, _ in taken]
                    if taken:
                        free = taken[-1][2]
                if len(got) < need:
                    out = None
                    break
                assert out is not None
                out += got
            self._nodes_placed[key] = out
        return self._nodes_placed[key]

    def _packed(self, runs: tuple[tuple[int, int], ...]) -> list[_Placed] | None:
        """Largest first, each on the lowest-numbered node where it fits."""
        starts = [sum(c for _, c in runs[:k]) for k in range(len(runs))]
        out: list[_Placed | None] = [None] * sum(c for _, c in runs)
        free = [n.ids for n in self.nodes]
        result: list[_Placed] | None = None
        for size in sorted({s for s, _ in runs}, reverse=True):
            ks = [k for (s, c), a in zip(runs, starts, strict=True) if s == size
                  for k in range(a, a + c)]  # fmt: skip
            pos = 0
            for inside in (True, False):
                for node in self.nodes:
                    if pos == len(ks):
                        break
                    taken = self._fill(node, free[node.index], size, inside)[: len(ks) - pos]
                    for group, link, _ in taken:
                        out[ks[pos]] = (node.index, group, link)
                        pos += 1
                    if taken:
                        free[node.index] = taken[-1][2]
            if pos < len(ks):
                break
        else:
            result = [o for o in out if o is not None]
        return result


# -- the planner ----------------------------------------------------------------------------


@dataclass
class _Outcome:
    """One candidate at one rate: the worst latencies over its instances."""

    rate: float
    ttft_s: float
    tpot_s: float
    meets: bool
    batch: float
    kv_usage: float
    states: list[tuple[ShapeEval, RoleState]]


@dataclass
class _Scored:
    cand: Candidate
    insts: list[PlannedInstance]
    est: PlanEstimates
    at_rate: _Outcome | None
    """At the workload's rate (None without one)."""
    lone: _Outcome | None
    """At a trickle of requests, for a plan with capacity 0 (None otherwise)."""


_Group = tuple[ExecutionInstanceType, InstanceShape, float]


@dataclass
class _Planner:
    model: ModelSpec
    gpu: GPUSpec
    alloc: GPUAllocation
    workload: WorkloadProfile
    slo: SLOTarget
    nodes: list[_Node]
    limits: EngineLimits
    profile: FittedProfile | None = None
    evals: dict[tuple[InstanceShape, float], ShapeEval] = field(default_factory=dict)
    caps: dict[tuple[_Group, float], tuple[float, str]] = field(default_factory=dict)
    placer: _Placer = field(init=False)

    def __post_init__(self) -> None:
        self.placer = _Placer(self.nodes, self.gpu)

    def shape_eval(self, shape: InstanceShape, link: float) -> ShapeEval:
        key = (shape, round(link, 3))
        if key not in self.evals:
            profile = self.profile if shape == InstanceShape(1) else None
            self.evals[key] = ShapeEval(
                self.model, self.gpu, shape.tp, shape.pp, shape.ep, link, self.workload,
                self.limits, profile,
            )  # fmt: skip
        return self.evals[key]

    def structural_problem(self, shape: InstanceShape) -> str | None:
        problem = _structural_problem(self.model, shape)
        if problem is None and self.profile is not None and shape != InstanceShape(1):
            p = self.profile
            problem = (
                f"the fitted {p.gpu} × {p.model} profile was measured on one device (TP1 PP1) "
                "and the roofline estimate for other shapes is not comparable with it"
            )
        return problem

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

    def capacity(self, group: _Group, kv_s: float) -> tuple[float, str]:
        """Goodput capacity of one instance of ``group`` (role, shape, link)."""
        role, shape, link = group
        key = ((role, shape, round(link, 3)), round(kv_s, 6))
        if key not in self.caps:
            ev = self.shape_eval(shape, link)
            self.caps[key] = capacity(lambda r: self.state(ev, role, r, kv_s).limit)
        return self.caps[key]

    def fits(self, cand: Candidate) -> bool:
        return self.placer.place(_runs(cand)) is not None

    def instances(self, cand: Candidate) -> list[PlannedInstance] | None:
        placed = self.placer.place(_runs(cand))
        if placed is None:
            return None
        roles = [(GENERAL if cand.kind == "colocated" else PREFILL, cand.shape)] * cand.count
        if cand.decode_shape is not None:
            roles += [(DECODE, cand.decode_shape)] * cand.decode_count
        return [
            PlannedInstance(role, s.tp, s.pp, s.ep, group, node, link)
            for (role, s), (node, group, link) in zip(roles, placed, strict=True)
        ]

    def kv_seconds(self, cand: Candidate, insts: Sequence[PlannedInstance]) -> float:
        """The p90 prompt's KV hand-off time of a PD fleet (0 for colocated)."""
        if cand.kind != "pd":
            return 0.0
        on: dict[int, list[PlannedInstance]] = {}
        for i in insts:
            on.setdefault(i.node, []).append(i)
        if all({i.role for i in here} == {PREFILL, DECODE} for here in on.values()):
            # Each node pairs its own prefill and decode instances: hand-offs stay inside it.
            groups = {
                (self.nodes[n].kind, tuple(sorted({g for i in here for g in i.gpu_ids}))): n
                for n, here in on.items()
            }
            link = min(_group_link(self.nodes[n], g, self.gpu)[1] for (_, g), n in groups.items())
        elif len(on) > 1:
            link = NETWORK_GBPS
        else:
            group = tuple(sorted({g for i in insts for g in i.gpu_ids}))
            link = _group_link(self.nodes[insts[0].node], group, self.gpu)[1]
        return self.workload.p90_prompt * self.model.kv_bytes_per_token / (link * 1e9)

    def evaluate(self, cand: Candidate, insts: list[PlannedInstance]) -> _Scored:
        """Capacity, estimates and outcomes of one placed candidate; instances that share a
        role, shape and link are evaluated once (a fleet costs what its distinct groups do)."""
        kv_s = self.kv_seconds(cand, insts)
        groups: dict[_Group, int] = {}
        for i in insts:
            key = (i.role, InstanceShape(i.tp, i.pp, i.ep), i.link_gbps)
            groups[key] = groups.get(key, 0) + 1
        caps = {g: self.capacity(g, kv_s) for g in groups}
        pool: dict[ExecutionInstanceType, float] = {}
        for g, n in groups.items():
            pool[g[0]] = pool.get(g[0], 0.0) + n * caps[g][0]
        bottleneck = min(pool, key=lambda r: pool[r])
        total = pool[bottleneck]
        limit = caps[min((g for g in groups if g[0] is bottleneck), key=lambda g: caps[g][0])][1]
        if cand.kind == "pd":
            limit = f"{'prefill' if bottleneck is PREFILL else 'decode'} {limit}"
        counts = {r: sum(n for g, n in groups.items() if g[0] is r) for r in pool}

        def at(rate: float) -> _Outcome:
            states = []
            for g in groups:
                role = g[0]
                share = caps[g][0] / pool[role] if pool[role] > 0 else 1 / counts[role]
                ev = self.shape_eval(g[1], g[2])
                states.append((ev, self.state(ev, role, rate * share, kv_s)))
            tpot = max((st.tpot_s for _, st in states if st.tpot_s > 0), default=0.0)
            ttft = max(st.ttft_s for _, st in states)
            if cand.kind == "pd":
                ttft += kv_s + tpot
            meets = all(st.limit is None for _, st in states) and ttft <= self.slo.ttft_s * 1.0001
            kv = max(st.kv_tokens_needed / ev.kv_tokens for ev, st in states)
            batch = max(st.batch for _, st in states)
            return _Outcome(rate, ttft, tpot, meets, batch, kv, states)

        wanted = self.workload.rate
        at_rate = at(wanted) if wanted is not None else None
        shown = at_rate if at_rate is not None and at_rate.meets else at(max(total, 1e-6))
        meets = at_rate.meets if at_rate is not None else shown.meets
        rate = wanted if wanted is not None else shown.rate
        est = PlanEstimates(
            capacity_rps=total,
            limit=limit,
            rate_rps=shown.rate,
            ttft_s=shown.ttft_s,
            tpot_s=shown.tpot_s if self.workload.p90_output > 1 else None,
            goodput_rps=rate if meets else min(rate, total),
            meets_slo=meets,
            batch_per_instance=shown.batch,
            kv_usage=shown.kv_usage,
            gpus_used=cand.gpus,
        )
        return _Scored(cand, insts, est, at_rate, at(1e-6) if total <= 0 else None)

    def pd_splits(self, sp: InstanceShape, sd: InstanceShape) -> list[int]:
        """Prefill counts to try for ``sp`` prefill + ``sd`` decode instances: all of them
        when there are at most :data:`PD_SPLITS`, else the :data:`PD_SPLITS` nearest the
        split whose prefill and decode capacities balance (estimated per instance); further
        from it one pool caps the fleet lower with no fewer GPUs."""
        total = self.alloc.total
        counts = list(range(1, total // sp.gpus))
        if len(counts) <= PD_SPLITS:
            return counts
        node = self.nodes[0]
        kv_link = NETWORK_GBPS if self.alloc.nodes > 1 else _group_link(node, node.ids, self.gpu)[1]
        kv_s = self.workload.p90_prompt * self.model.kv_bytes_per_token / (kv_link * 1e9)
        per = []
        for role, shape in ((PREFILL, sp), (DECODE, sd)):
            placed = self.placer.place(((shape.gpus, 1),))
            link = placed[0][2] if placed else 0.0
            per.append(self.capacity((role, shape, link), kv_s if role is PREFILL else 0.0)[0])

        def balanced(n_p: int) -> float:
            n_d = (total - n_p * sp.gpus) // sd.gpus
            return min(n_p * per[0], n_d * per[1]) if n_d >= 1 else -1.0

        best = max(counts, key=lambda n: (balanced(n), -n))
        return sorted(sorted(counts, key=lambda n: (abs(n - best), n))[:PD_SPLITS])


def _runs(cand: Candidate) -> tuple[tuple[int, int], ...]:
    runs: tuple[tuple[int, int], ...] = ((cand.shape.gpus, cand.count),)
    if cand.decode_shape is not None:
        runs += ((cand.decode_shape.gpus, cand.decode_count),)
    return runs


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
    problem = tp_problem(model, shape.tp)
    if problem is not None:
        return problem
    if shape.ep > 1 and model.num_experts % shape.ep:
        return f"{model.num_experts} experts are not divisible by EP{shape.ep}"
    return None


def _nodes(
    alloc: GPUAllocation, gpu: GPUSpec, topology: Topology | None, notes: list[str]
) -> list[_Node]:
    sizes = alloc.node_sizes
    if topology is None or not topology.gpus:
        ids = alloc.gpu_ids or tuple(range(alloc.gpus_per_node))
        nvlink = gpu.nvlink_gbps > 0
        if max(sizes) == 1:
            notes.append("No topology given: one GPU per node, so no GPU-to-GPU traffic.")
        elif nvlink:
            each = "the GPUs" if alloc.last_node_gpus else f"the {alloc.gpus_per_node} GPUs"
            notes.append(
                f"No topology given: assuming {each} of each node are NVLink-connected "
                f"({gpu.name} has NVLink, {gpu.nvlink_gbps:g} GB/s)."
            )
        else:
            notes.append(
                f"No topology given and {gpu.name} has no NVLink: TP traffic goes over PCIe "
                f"({gpu.pcie_gbps:g} GB/s)."
            )
        full = tuple(sorted(ids))
        return [
            _Node(n, full[:size], None, nvlink, int(size != len(full)))
            for n, size in enumerate(sizes)
        ]
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
    sub = _sub_topology(topology, ids)
    nodes = [_Node(n, tuple(sorted(ids)), sub, False) for n in range(alloc.nodes)]
    if alloc.last_node_gpus is not None:
        part = tuple(sorted(sub.best_group(alloc.last_node_gpus) or ()))
        nodes[-1] = _Node(alloc.nodes - 1, part, _sub_topology(sub, part), False, 1)
        notes.append(f"The last node uses GPUs {','.join(map(str, part))} of this topology.")
    if alloc.nodes > 1:
        notes.append(f"Assuming all {alloc.nodes} nodes have this topology.")
    return nodes


def _allocation(
    gpus: int | GPUAllocation, topology: Topology | None, notes: list[str]
) -> GPUAllocation:
    if isinstance(gpus, GPUAllocation):
        return gpus
    node = len(topology.gpus) if topology is not None and topology.gpus else DEFAULT_NODE_GPUS
    alloc = GPUAllocation.from_count(gpus, node)
    if alloc.nodes > 1:
        notes.append(f"{alloc.total} GPUs taken as {alloc.describe()}.")
    return alloc


def _fitted_profile(gpu: GPUSpec, model: ModelSpec) -> FittedProfile | None:
    from sage_llm.sim.factory import fitted_profile

    return fitted_profile(gpu.name, model.name)


def _profile_note(p: FittedProfile) -> str:
    b0, b1, b2 = p.betas_us
    s = p.shape
    return (
        f"Fitted profile of {p.gpu} × {p.model} (as engine-sim uses): a step takes "
        f"{b0 / 1e3:.2f} ms + {b1 / 1e3:.3f} ms per prefill token + {b2 / 1e3:.2f} ms per "
        f"decoding sequence, intake {p.front_end.intake_s * 1e3:.1f} ms; max_num_seqs "
        f"{s.max_num_seqs}, max_num_batched_tokens {s.max_num_batched_tokens}, max_model_len "
        f"{s.max_model_len}. It was measured on one device, so only TP1 PP1 instances are planned."
    )


_LISTED = 32
"""Instances a plan's text lists (the JSON form has them all)."""


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
    per_node: bool = False,
) -> Plan:
    """The best TP × PP × DP (× EP) fleet, colocated or PD, for ``workload`` under ``slo``.

    ``gpus``: a count (above the node size, nodes of 8 or of the topology's GPUs, the last
    one partial) or a :class:`GPUAllocation`; at most :data:`MAX_PLAN_GPUS`. ``per_node``
    keeps only plans each node of which can serve requests on its own (no node with one
    PD role only), as ``sage-llm launch`` runs a node with its own gateway. Raises
    ConfigError for bad inputs or when no candidate can serve the workload.
    """
    _check_plan_args(model, gpu, workload, slo, topology, limits)
    mspec, gspec = resolve_model(model), resolve_gpu(gpu)
    _check_context(mspec, workload)
    notes: list[str] = []
    alloc = _allocation(gpus, topology, notes)
    nodes = _nodes(alloc, gspec, topology, notes)
    profile = _fitted_profile(gspec, mspec)
    if profile is not None:
        notes.append(_profile_note(profile))
        if limits is None:
            limits = EngineLimits.from_profile(profile)
    pl = _Planner(mspec, gspec, alloc, workload, slo, nodes, limits or EngineLimits(), profile)
    rejected: list[tuple[Candidate, str]] = []
    feasible: list[InstanceShape] = []
    for shape in _shapes(mspec, alloc.gpus_per_node):
        cand = Candidate("colocated", shape, sum(n // shape.gpus for n in alloc.node_sizes))
        why = pl.structural_problem(shape) or pl.shape_eval(shape, 1.0).memory_problem()
        if why is None:
            feasible.append(shape)
        else:
            rejected.append((cand, why))
    cands = [
        Candidate("colocated", s, sum(n // s.gpus for n in alloc.node_sizes)) for s in feasible
    ]
    pd_shapes = [s for s in feasible if s.pp == 1]  # PP is not among NIXL PD's documented features
    if allow_pd:
        for sp in pd_shapes:
            for sd in pd_shapes:
                for n_p in pl.pd_splits(sp, sd):
                    n_d = (alloc.total - n_p * sp.gpus) // sd.gpus
                    while n_d >= 1 and not pl.fits(Candidate("pd", sp, n_p, sd, n_d)):
                        n_d -= 1
                    if n_d >= 1:
                        cands.append(Candidate("pd", sp, n_p, sd, n_d))
    scored: list[_Scored] = []
    kv_capped: list[tuple[_Scored, str]] = []  # miss the rate, for their KV cache
    for cand in cands:
        insts = pl.instances(cand)
        if insts is None:
            rejected.append((cand, "the instances do not fit on the nodes' GPUs"))
            continue
        if per_node and cand.kind == "pd" and alloc.nodes > 1 and _one_role_nodes(insts):
            rejected.append(
                (cand, f"{_one_role_nodes(insts)} only one role: not launchable per node")
            )
            continue
        sc = pl.evaluate(cand, insts)
        if sc.est.capacity_rps <= 0:
            rejected.append((cand, _nothing_reason(sc, slo)))
        elif sc.at_rate is not None and not sc.at_rate.meets and "KV" in sc.est.limit:
            kv_capped.append((sc, _kv_reason(sc.at_rate, sc.est)))
        else:
            scored.append(sc)
    if any(sc.at_rate is None or sc.at_rate.meets for sc in scored):
        rejected.extend((sc.cand, why) for sc, why in kv_capped)
    else:  # the rate is beyond every plan: each competes at its own capacity, whatever caps
        scored += [sc for sc, _ in kv_capped]  # it (a latency target, its KV cache)
    if not scored:
        shown = 6
        reasons = "; ".join(f"{c.label}: {r}" for c, r in rejected[:shown])
        if len(rejected) > shown:
            reasons += f"; … and {len(rejected) - shown} more"
        raise ConfigError(
            f"no feasible plan for {mspec.name} on {alloc.total} × {gspec.name}: {reasons}"
        )
    scored.sort(key=lambda t: _rank(t.cand, t.est))
    top_cap = scored[0].est.capacity_rps
    near = [t for t in scored if t.est.capacity_rps >= (1 - TIE_TOLERANCE) * top_cap]
    near.sort(key=lambda t: (-_count(t.cand), *_rank(t.cand, t.est)))
    scored = near + [t for t in scored if t not in near]
    best = scored[0]
    alternatives = [
        Alternative(t.cand, tuple(t.insts), t.est, _why_lost(t.cand, t.est, best.cand, best.est))
        for t in scored[1:]
    ]
    explanation = _explain(pl, best.cand, best.insts, best.est, alternatives, rejected, notes)
    return Plan(
        mspec, gspec, workload, slo, best.cand, best.insts, best.est, explanation,
        alternatives, rejected, notes,
    )  # fmt: skip


def _check_plan_args(
    model: object, gpu: object, workload: object, slo: object, topology: object, limits: object
) -> None:
    """:class:`ConfigError` naming the argument of :func:`plan` of the wrong type."""
    expected: tuple[tuple[str, object, type | tuple[type, ...], str], ...] = (
        ("model", model, (str, ModelSpec), "a model name or a ModelSpec"),
        ("gpu", gpu, (str, GPUSpec), "a GPU name or a GPUSpec"),
        ("workload", workload, WorkloadProfile, "a WorkloadProfile"),
        ("slo", slo, SLOTarget, "an SLOTarget"),
        ("topology", topology, (Topology, type(None)), "a Topology or None"),
        ("limits", limits, (EngineLimits, type(None)), "EngineLimits or None"),
    )
    for key, value, kind, what in expected:
        if not isinstance(value, kind):
            raise ConfigError(f"must be {what}, got {value!r}", key=key)


def _check_context(mspec: ModelSpec, workload: WorkloadProfile) -> None:
    """ConfigError when a p90 prompt and a p90 output together exceed the model's context,
    keyed by the length that tipped it over: the prompt's when it leaves no room for one
    output token, else the output's; its p90 where that is not its mean."""
    prompt, output = workload.p90_prompt, workload.p90_output
    if mspec.max_context is None or prompt + output <= mspec.max_context:
        return
    if prompt + 1 > mspec.max_context:
        key = "prompt_len" if workload.prompt_p90 == workload.prompt_mean else "prompt_p90"
    else:
        key = "output_len" if workload.output_p90 == workload.output_mean else "output_p90"
    raise ConfigError(
        f"one p90 request ({prompt + output:.0f} tokens: prompt {prompt:.0f} and output "
        f"{output:.0f}) is longer than {mspec.name}'s context window ({mspec.max_context:,} "
        "tokens); no engine would take it",
        key=key,
    )


def _count(cand: Candidate) -> int:
    return cand.count + cand.decode_count


def _rank(cand: Candidate, est: PlanEstimates) -> tuple[float, ...]:
    return (-round(est.capacity_rps, 6), cand.gpus, cand.kind != "colocated",
            cand.shape.gpus, cand.shape.pp)  # fmt: skip


def _rps(rate: float) -> str:
    return f"{rate:.2f}" if rate < 1e6 else f"{rate:.3g}"


def _nothing_reason(sc: _Scored, slo: SLOTarget) -> str:
    limit, lone = sc.est.limit, sc.lone
    why = f"serves nothing under the SLO: {limit} is missed even at a trickle of requests"
    if lone is None:
        return why
    checks = (("TPOT", lone.tpot_s, slo.tpot_s), ("TTFT", lone.ttft_s, slo.ttft_s))
    for name, value, target in checks:
        if name in limit and math.isfinite(value) and value > target:
            why += f" ({_above(value, target)})"
    return why


def _above(value: float, target: float) -> str:
    """``VALUE against TARGET`` (value above target) as :func:`_ms` writes them, with the
    digits that show the miss (``50.04 ms against 50.00 ms``, not ``50 ms against 50
    ms``)."""
    if _unit(value) != _unit(target):  # different units: the figures differ anyway
        return f"{_ms(value)} against {_ms(target)}"
    # _ms's own precision first (0 digits in µs and ms, 2 in s), more while the two read
    # the same
    unit, scale, digits = _unit(value)
    while f"{value * scale:.{digits}f}" == f"{target * scale:.{digits}f}" and digits < 6:
        digits += 1
    return f"{value * scale:.{digits}f}{unit} against {target * scale:.{digits}f}{unit}"


def _idle_advice(pl: _Planner, insts: Sequence[PlannedInstance]) -> str:
    """What to do with a plan's idle GPUs: the ``--gpus`` of a second pool of them (an
    instance never spans machines: their layout per machine), when one instance of the
    model fits there."""
    alloc = pl.alloc
    used: dict[int, int] = {}
    for inst in insts:
        used[inst.node] = used.get(inst.node, 0) + len(inst.gpu_ids)
    free = []
    for node in range(alloc.nodes):
        last = node == alloc.nodes - 1 and alloc.last_node_gpus is not None
        size = alloc.last_node_gpus if last and alloc.last_node_gpus else alloc.gpus_per_node
        if size - used.get(node, 0) > 0:
            free.append(size - used.get(node, 0))
    each = min(free)
    fits = any(
        placement_problem(pl.model.name, pl.gpu.name, tp=tp) is None
        for tp in range(1, each + 1)
        if each % tp == 0
    )
    if not fits:
        return f"too few on a machine ({each}) to hold {pl.model.name} on their own"
    if len(set(free)) > 1:
        return (
            f"plan them on their own, machine by machine ({', '.join(map(str, free))} free), "
            "for a second pool behind the same gateway"
        )
    layout = f"{len(free)}x{each}x" if len(free) > 1 else f"{each}x"
    return (
        f"plan the rest on their own (--gpus {layout}{pl.gpu.name}) for a second pool "
        "behind the same gateway"
    )


def _kv_reason(at_rate: _Outcome, est: PlanEstimates) -> str:
    ev, st = max(at_rate.states, key=lambda s: s[1].kv_tokens_needed / s[0].kv_tokens)
    need, room, rate = st.kv_tokens_needed, ev.kv_room_gib(), at_rate.rate
    if math.isfinite(need):
        peak = st.batch + 2 * math.sqrt(st.batch)  # what the tokens are counted for
        return (
            f"KV cache for the needed concurrency (~{st.batch:.0f} sequences on average, "
            f"~{peak:.0f} at its peak: {need:.0f} tokens = {ev.kv_gib(need):.1f} GiB per GPU) "
            f"exceeds the {room:.1f} GiB left after "
            f"weights at {rate:g} req/s (it holds {_rps(est.capacity_rps)} req/s at most)"
        )
    return (
        f"KV cache for the needed concurrency exceeds the {room:.1f} GiB left after weights "
        f"at {rate:g} req/s: it holds {_rps(est.capacity_rps)} req/s at most, and above that "
        "the batch keeps growing"
    )


def _ms(seconds: float) -> str:
    """A duration in µs below 1 ms, in ms below 1 s, else in s."""
    if math.isinf(seconds):
        return "∞"
    unit, scale, digits = _unit(seconds)
    return f"{seconds * scale:.{digits}f}{unit}"


def _unit(seconds: float) -> tuple[str, float, int]:
    """The unit :func:`_ms` writes ``seconds`` in: its name, scale and digits."""
    if seconds < 1e-3:
        return " µs", 1e6, 0
    return (" ms", 1e3, 0) if seconds < 1 else (" s", 1.0, 2)


def _instances(n: int) -> str:
    return f"{n} instance{'s' * (n != 1)}"


def _one_role_nodes(insts: Sequence[PlannedInstance]) -> str:
    """``"Node 3 holds"`` / ``"Nodes 3, 4, … (9 nodes) hold"`` for the nodes of a PD fleet
    that get only one role (their engines cannot serve alone); ``""`` when none."""
    roles: dict[int, set[ExecutionInstanceType]] = {}
    for i in insts:
        roles.setdefault(i.node, set()).add(i.role)
    lone = sorted(n for n, r in roles.items() if len(r) == 1)
    if not lone:
        return ""
    if len(lone) == 1:
        return f"Node {lone[0]} holds"
    listed = ", ".join(map(str, lone[:4])) + (f", … ({len(lone)} nodes)" if len(lone) > 4 else "")
    return f"Nodes {listed} hold"


def _why_lost(c: Candidate, e: PlanEstimates, best: Candidate, be: PlanEstimates) -> str:
    n, m = _count(c), _count(best)
    if e.capacity_rps >= (1 - TIE_TOLERANCE) * be.capacity_rps and n < m:
        spare = "no redundancy" if n == 1 else f"losing one costs 1/{n} of it instead of 1/{m}"
        return (
            f"{_rps(e.capacity_rps)} req/s, within {TIE_TOLERANCE:.0%} of the chosen plan, but "
            f"{_instances(n)} instead of {m}: fewer batch slots past capacity and {spare}"
        )
    if e.capacity_rps < be.capacity_rps:
        drop = 1 - e.capacity_rps / be.capacity_rps if be.capacity_rps else 0.0
        return f"{_rps(e.capacity_rps)} req/s (−{drop:.0%}), capped by {e.limit}"
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
    ]
    missed = w.rate is not None and not est.meets_slo
    if missed:
        caps = [(a.estimates.capacity_rps, a.candidate.label) for a in alternatives]
        top = max([(est.capacity_rps, cand.label), *caps])
        lines.append(
            f"No plan meets the SLO at {w.rate:g} req/s: the highest goodput capacity found is "
            f"{_rps(top[0])} req/s ({top[1]}). The best plan for the rate it can carry:"
        )
    lines.append(f"Chosen: {cand.label} ({est.gpus_used} of {total} GPUs)")
    for k, i in enumerate(insts[:_LISTED]):
        gpus = ",".join(map(str, i.gpu_ids))
        where = f"node {i.node} " if pl.alloc.nodes > 1 else ""
        lines.append(
            f"  {k}: {i.role.value:<10} TP{i.tp} PP{i.pp}{f' EP{i.ep}' if i.ep > 1 else ''} on "
            f"{where}GPU{'s' * (len(i.gpu_ids) > 1)} {gpus}"
            + (f" (link {i.link_gbps:g} GB/s)" if len(i.gpu_ids) > 1 else "")
        )
    if len(insts) > _LISTED:
        lines.append(f"  … and {len(insts) - _LISTED} more (--json lists every instance)")
    idle = total - est.gpus_used
    if idle > 0:
        lines.append(
            f"  {idle} of {total} GPUs left idle: the instances of a plan share one shape (a "
            f"PD plan's, one per role); {_idle_advice(pl, insts)}"
        )
    lone = _one_role_nodes(insts) if cand.kind == "pd" and pl.alloc.nodes > 1 else ""
    if lone:
        lines.append(
            f"  {lone} only one role (the counts allow no more mixing): serve every node behind "
            "one gateway; `sage-llm launch` of such a node alone refuses (--per-node plans "
            "only what each node can serve alone)"
        )
    if missed:
        lines.append(f"  at the workload's {w.rate:g} req/s: SLO NOT MET (above its capacity)")
    at = "at the workload's" if w.rate is not None and not missed else "at its capacity,"
    q = f"p{slo.attainment * 100:g}"
    lines.append(
        f"  {at} {_rps(est.rate_rps)} req/s: TTFT {q} ≈ {_ms(est.ttft_s)}, "
        + (
            "TPOT n/a (one-token answers)"
            if est.tpot_s is None
            else f"TPOT {q} ≈ {_ms(est.tpot_s)}"
        )
        + f", ~{est.batch_per_instance:.0f} sequences per instance, "
        f"KV cache {est.kv_usage:.0%} full"
    )
    lines.append(
        f"  goodput capacity ≈ {_rps(est.capacity_rps)} req/s under the SLO (then {est.limit} "
        "is the limit)"
    )
    among = f"among {len(alternatives) + 1} feasible plan{'s' * bool(alternatives)}"
    why = f"Why: highest estimated goodput under the SLO {among}"
    top_alt = max(alternatives, key=lambda a: a.estimates.capacity_rps, default=None)
    if top_alt is not None and top_alt.estimates.capacity_rps > est.capacity_rps:
        why = (
            f"Why: within {TIE_TOLERANCE:.0%} of the highest estimate ({top_alt.candidate.label}, "
            f"{_rps(top_alt.estimates.capacity_rps)} req/s) with more instances, {among}"
        )
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


def parse_topology_text(text: str) -> Topology:
    """A topology file: saved ``nvidia-smi topo -m`` output, or the JSON form of
    :meth:`Topology.to_dict` (text starting with ``{``). ConfigError when it is neither."""
    if not text.lstrip().startswith("{"):
        return parse_nvidia_smi_topo(text)
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"not valid JSON: {exc}", key="topology") from None
    return Topology.from_dict(data)


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
    per_node: bool = False,
) -> str:
    """What ``sage-llm plan`` prints: the explanation, or the plan as JSON (``as_json``).
    A ConfigError's key is the parameter at fault (``prompt_len``, ``gpus``, ``slo_ttft`` …;
    ``gpu`` for an unknown GPU type in ``gpus``)."""
    _check_plan_types(model, gpus, prompt_len, output_len, prompt_p90, output_p90, rate)
    if topology_file is not None and not isinstance(topology_file, str | Path):
        raise ConfigError(f"must be a path, got {topology_file!r}", key="topology")
    flags = (("allow_pd", allow_pd), ("as_json", as_json), ("per_node", per_node))
    for flag_name, flag in flags:
        if not isinstance(flag, bool):
            raise ConfigError(f"must be true or false, got {flag!r}", key=flag_name)
    nodes, count, gpu = parse_gpu_text(gpus)
    # A plain count is split into nodes by plan(): of the topology's size when one is given.
    alloc = count if nodes is None else GPUAllocation(nodes, count)
    topology = None
    if topology_file is not None:
        try:
            text = read_utf8(Path(topology_file), "topology file")
        except ConfigError as exc:
            raise ConfigError(f"{exc.location}: {exc.detail}", key="topology") from None
        try:
            topology = parse_topology_text(text)
        except ConfigError as exc:  # (its own key, when it has one, is this option's)
            raise ConfigError(f"{topology_file}: {exc.detail}", key="topology") from None
        if not topology.gpu_indices:  # e.g. `sage-llm topo --json` of a machine without GPUs
            raise ConfigError(f"{topology_file}: lists no GPUs", key="topology")
    try:
        workload = WorkloadProfile(
            prompt_len, output_len, rate=rate, prompt_p90=prompt_p90, output_p90=output_p90
        )
    except ConfigError as exc:  # named by this function's parameters
        key = {"prompt_mean": "prompt_len", "output_mean": "output_len"}.get(exc.key or "")
        raise ConfigError(exc.detail, key=key or exc.key) from None
    slo = SLOTarget(
        parse_duration(slo_ttft, key="slo_ttft"), parse_duration(slo_tpot, key="slo_tpot")
    )
    result = plan(model, alloc, gpu, workload, slo, topology, allow_pd=allow_pd, per_node=per_node)
    if as_json:
        # the name it was asked for is the one clients will send (sage-llm launch serves it)
        data = {"served_model_name": model, **result.to_dict()}
        return json.dumps(data, indent=2, default=_json_default)
    return result.explanation


def _check_plan_types(
    model: object, gpus: object, prompt_len: object, output_len: object,
    prompt_p90: object, output_p90: object, rate: object,
) -> None:  # fmt: skip
    """:class:`ConfigError` naming the parameter of :func:`plan_command` given a value of
    the wrong type (from Python: the command line's are strings it parses)."""
    for key, text in (("model", model), ("gpus", gpus)):
        if not isinstance(text, str):
            raise ConfigError(f"must be a string, got {text!r}", key=key)
    lengths = (
        ("prompt_len", prompt_len), ("output_len", output_len),
        ("prompt_p90", prompt_p90), ("output_p90", output_p90),
    )  # fmt: skip
    for key, value in lengths:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"must be an integer (tokens), got {value!r}", key=key)
    if rate is not None and (isinstance(rate, bool) or not isinstance(rate, int | float)):
        raise ConfigError(f"must be a number (requests per second), got {rate!r}", key="rate")


def _json_default(value: object) -> object:
    if isinstance(value, Mapping):
        return dict(value)
    return str(value)
