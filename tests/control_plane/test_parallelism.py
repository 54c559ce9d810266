"""Planner decisions: memory rejections, NVLink-aware placement, EP, PD splits, parsing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from sage_llm.control_plane.parallelism import (
    Candidate,
    GPUAllocation,
    InstanceShape,
    Plan,
    PlannedInstance,
    SLOTarget,
    WorkloadProfile,
    parse_duration,
    parse_gpus,
    plan,
    plan_command,
)
from sage_llm.control_plane.parallelism_eval import ShapeEval, capacity, wait_quantile
from sage_llm.control_plane.topology import Topology, parse_nvidia_smi_topo
from sage_llm.errors import ConfigError
from sage_llm.sim.specs import get_gpu, get_model
from sage_llm.types import ExecutionInstanceType

FIXTURES = Path(__file__).parent.parent / "fixtures" / "topology"
A100_PCIE = FIXTURES / "a100-pcie-4gpu-nv12-pair-mlx5.txt"
RTXA6000 = FIXTURES / "rtxa6000-3gpu-nv4-pair-ansi.txt"
CHAT = WorkloadProfile(prompt_mean=1024, output_mean=256)
SLO = SLOTarget(ttft_s=2.0, tpot_s=0.05)
PREFILL, DECODE = ExecutionInstanceType.PREFILLING, ExecutionInstanceType.DECODING


def topo(path: Path) -> Topology:
    return parse_nvidia_smi_topo(path.read_text())


def every_plan(p: Plan) -> list[tuple[Candidate, tuple[PlannedInstance, ...]]]:
    return [(p.candidate, tuple(p.instances))] + [
        (a.candidate, a.instances) for a in p.alternatives
    ]


def find(p: Plan, label: str) -> tuple[PlannedInstance, ...]:
    return next(insts for cand, insts in every_plan(p) if cand.label == label)


# -- memory ------------------------------------------------------------------------------------


def test_llama70b_tp1_on_80gb_h100_is_rejected_with_the_weight_reason() -> None:
    p = plan("llama-3-70b", 8, "h100", CHAT, SLO)
    reasons = {c.label: r for c, r in p.rejected}
    assert "8 × TP1" in reasons
    assert "weights need 131.4 GiB per GPU" in reasons["8 × TP1"]
    assert "72.0 GiB is usable (80 GiB × 0.9)" in reasons["8 × TP1"]
    assert all(i.tp * i.pp > 1 for _, insts in every_plan(p) for i in insts)
    assert "8 × TP1: weights need" in p.explanation


def test_one_gpu_too_small_for_the_model_raises_with_the_reason() -> None:
    with pytest.raises(ConfigError, match=r"no feasible plan.*1 × TP1: weights need 131\.4 GiB"):
        plan("llama-3-70b", 1, "h100", CHAT, SLO)


def test_kv_cache_of_the_needed_concurrency_must_fit_at_the_workload_rate() -> None:
    busy = WorkloadProfile(prompt_mean=1024, output_mean=256, rate=10.0)
    p = plan("llama-3-70b", 8, "h100", busy, SLO)
    reasons = {c.label: r for c, r in p.rejected}
    assert reasons["4 × TP2"].startswith("KV cache for the needed concurrency")
    assert "GiB left after weights at 10 req/s" in reasons["4 × TP2"]
    # Without a rate the same shape is a (weak) alternative, capped by its KV cache.
    relaxed = plan("llama-3-70b", 8, "h100", CHAT, SLO)
    alt = next(a for a in relaxed.alternatives if a.candidate.label == "4 × TP2")
    assert alt.estimates.limit == "KV cache"


def test_a_request_longer_than_the_kv_cache_is_rejected() -> None:
    huge = WorkloadProfile(prompt_mean=1_000_000, output_mean=100)
    with pytest.raises(ConfigError, match="KV cache for one p90 request"):
        plan("llama-3-70b", 4, "a100", huge, SLOTarget(600.0, 1.0), allow_pd=False)


def test_heads_not_divisible_by_tp_are_rejected() -> None:
    p = plan("qwen2.5-7b", 8, "h100", CHAT, SLO, allow_pd=False)
    reasons = {c.label: r for c, r in p.rejected}
    assert reasons["1 × TP8"] == "28 attention heads are not divisible by TP8"


# -- topology-aware placement --------------------------------------------------------------------


def test_tp2_on_the_a100_pcie_box_uses_the_nvlink_pair() -> None:
    p = plan("llama-3-8b", 4, "a100", CHAT, SLO, topo(A100_PCIE))
    first, second = find(p, "2 × TP2")
    assert first.gpu_ids == (0, 1)
    assert first.link_gbps == 300  # NV12
    assert second.gpu_ids == (2, 3)
    assert second.link_gbps < 32  # across PCIe, NUMA-local
    assert "NVLink domains: 0,1" in p.explanation
    one = plan("llama-3-8b", 2, "a100", CHAT, SLO, topo(A100_PCIE), allow_pd=False)
    assert find(one, "1 × TP2")[0].gpu_ids == (0, 1)


def test_tp2_on_the_rtxa6000_box_uses_the_nvlink_pair() -> None:
    gpu = get_gpu("l40s")
    p = plan("llama-3-8b", 3, gpu, CHAT, SLO, topo(RTXA6000), allow_pd=False)
    (group,) = find(p, "1 × TP2")
    assert group.gpu_ids == (0, 1)


@pytest.mark.parametrize("fixture", sorted(p.name for p in FIXTURES.glob("*.txt")))
def test_tp_groups_stay_inside_an_nvlink_domain_when_one_fits(fixture: str) -> None:
    t = topo(FIXTURES / fixture)
    domains = t.nvlink_domains()
    p = plan("llama-3-8b", len(t.gpus), "h100", CHAT, SLO, t)
    for cand, insts in every_plan(p):
        size = max(i.tp * i.pp for i in insts)
        if size == 1 or not any(len(d) >= size for d in domains):
            continue
        # Placed largest first: the first group of the largest size gets a domain that fits.
        largest = [i for i in insts if i.tp * i.pp == size]
        assert any(any(set(i.gpu_ids) <= d for d in domains) for i in largest), cand.label


def test_empty_topology_assumption_is_stated() -> None:
    nv = plan("llama-3-8b", 4, "h100", CHAT, SLO)
    assert "assuming the 4 GPUs of each node are NVLink-connected" in nv.explanation
    assert all(i.link_gbps == 450 for _, insts in every_plan(nv) for i in insts if i.tp > 1)
    pcie = plan("llama-3-8b", 4, "l40s", CHAT, SLO)
    assert "L40S has no NVLink: TP traffic goes over PCIe (32 GB/s)" in pcie.explanation
    assert all(i.link_gbps == 32 for _, insts in every_plan(pcie) for i in insts if i.tp > 1)


def test_tp_over_pcie_is_estimated_slower_than_over_nvlink() -> None:
    model, gpu = get_model("llama-3-8b"), get_gpu("h100")
    nvlink = ShapeEval(model, gpu, 4, 1, 1, 450.0, CHAT)
    pcie = ShapeEval(model, gpu, 4, 1, 1, 10.0, CHAT)
    assert pcie.decode_step(32) > nvlink.decode_step(32)
    assert pcie.prefill_work(1024, 0) > nvlink.prefill_work(1024, 0)


def test_gpu_allocation_picks_the_best_connected_subset_of_a_topology() -> None:
    p = plan("llama-3-8b", GPUAllocation(1, 2), "a100", CHAT, SLO, topo(A100_PCIE), allow_pd=False)
    assert {g for i in p.instances for g in i.gpu_ids} == {0, 1}
    with pytest.raises(ConfigError, match="topology shows 4"):
        plan("llama-3-8b", GPUAllocation(1, 8), "a100", CHAT, SLO, topo(A100_PCIE))


def test_multi_node_plans_place_instances_on_each_node() -> None:
    alloc, gpu = parse_gpus("2x4xH100")
    p = plan("llama-3-70b", alloc, gpu, CHAT, SLO, allow_pd=False)
    assert {i.node for i in p.instances} == {0, 1}
    assert all(len(i.gpu_ids) <= 4 for i in p.instances)
    assert all(c.shape.gpus <= 4 for c, _ in every_plan(p))


def test_sixteen_gpus_without_topology_are_two_nodes_of_eight() -> None:
    p = plan("llama-3-70b", 16, "h100", CHAT, SLO, allow_pd=False)
    assert "16 GPUs taken as 2 nodes of 8." in p.explanation
    with pytest.raises(ConfigError, match="do not fill nodes of 8"):
        plan("llama-3-70b", 12, "h100", CHAT, SLO)


# -- EP, PD, ranking -----------------------------------------------------------------------------


def test_mixtral_enumerates_expert_parallel_shapes() -> None:
    p = plan("mixtral-8x7b", 8, "h100", CHAT, SLO)
    shapes = {c.shape for c, _ in every_plan(p)} | {c.shape for c, _ in p.rejected}
    for tp in (2, 4, 8):
        assert InstanceShape(tp, 1, tp) in shapes
        assert InstanceShape(tp, 1, 1) in shapes
    ep_plan = find(p, "4 × TP2·EP2")
    assert all(i.ep == 2 for i in ep_plan)
    dense = plan("llama-3-8b", 8, "h100", CHAT, SLO)
    assert all(c.shape.ep == 1 for c, _ in every_plan(dense))


def test_long_prompts_with_tight_tpot_get_a_pd_split() -> None:
    long = WorkloadProfile(prompt_mean=4000, output_mean=100)
    p = plan("llama-3-8b", 8, "h100", long, SLOTarget(ttft_s=2.0, tpot_s=0.015))
    assert p.candidate.kind == "pd"
    roles = [i.role for i in p.instances]
    assert PREFILL in roles and DECODE in roles
    assert p.explanation.splitlines()[5].startswith("Chosen: PD ")
    best_colocated = max(
        (a for a in p.alternatives if a.candidate.kind == "colocated"),
        key=lambda a: a.estimates.capacity_rps,
    )
    assert best_colocated.estimates.capacity_rps < p.estimates.capacity_rps
    colocated = plan("llama-3-8b", 8, "h100", long, SLOTarget(2.0, 0.015), allow_pd=False)
    assert all(c.kind == "colocated" for c, _ in every_plan(colocated))


def test_short_chat_prompts_stay_colocated() -> None:
    p = plan("llama-3-8b", 8, "h100", WorkloadProfile(512, 256), SLO)
    assert p.candidate.kind == "colocated"
    assert p.candidate.label == "8 × TP1"


def test_near_ties_go_to_the_plan_with_more_instances_and_say_so() -> None:
    p = plan("llama-3-70b", 8, "h100", CHAT, SLO)
    assert p.candidate.label == "2 × TP4"
    tp8 = next(a for a in p.alternatives if a.candidate.label == "1 × TP8")
    assert tp8.estimates.capacity_rps > p.estimates.capacity_rps * 0.98
    assert "within 2% of the chosen plan" in tp8.why
    assert "Why: within 2% of the highest estimate (1 × TP8" in p.explanation


def test_estimates_at_the_workload_rate() -> None:
    p = plan("llama-3-70b", 8, "h100", CHAT.with_rate(5.0), SLO)
    est = p.estimates
    assert est.rate_rps == 5.0 and est.meets_slo and est.goodput_rps == 5.0
    assert 0 < est.tpot_s < SLO.tpot_s and 0 < est.ttft_s < SLO.ttft_s
    over = plan("llama-3-70b", 8, "h100", CHAT.with_rate(100.0), SLO)
    assert not over.estimates.meets_slo
    assert over.estimates.goodput_rps == pytest.approx(over.estimates.capacity_rps)
    assert "no plan meets the SLO at 100 req/s" in over.explanation


def test_higher_load_means_longer_latencies() -> None:
    ev = ShapeEval(get_model("llama-3-8b"), get_gpu("h100"), 1, 1, 1, 450.0, CHAT)
    low, high = ev.colocated(2.0, 0.9), ev.colocated(20.0, 0.9)
    assert high.batch > low.batch and high.step_s > low.step_s and high.ttft_s > low.ttft_s
    assert low.limit is None
    assert ev.colocated(1000.0, 0.9).limit is not None


# -- pure helpers ------------------------------------------------------------------------------


def test_capacity_bisects_to_the_threshold_and_reports_the_limit() -> None:
    rate, limit = capacity(lambda r: None if r <= 7.5 else "TPOT")
    assert rate == pytest.approx(7.5, rel=1e-3) and limit == "TPOT"
    assert capacity(lambda r: "TTFT") == (0.0, "TTFT")


def test_wait_quantile_is_zero_below_the_tail_and_grows_with_load() -> None:
    assert wait_quantile(1.0, 0.05, 0.9) == 0.0
    assert wait_quantile(1.0, 0.5, 0.9) == pytest.approx(2 * math.log(5))
    assert wait_quantile(1.0, 0.9, 0.99) > wait_quantile(1.0, 0.9, 0.9)


def test_workload_profile_from_samples_and_validation() -> None:
    w = WorkloadProfile.from_samples([100, 200, 300, 400], [10, 20, 30, 40], rate=2.0)
    assert w.prompt_mean == 250 and w.output_mean == 25 and w.rate == 2.0
    assert w.p90_prompt == pytest.approx(370.0)
    assert w.prompt_sq_mean == pytest.approx((100**2 + 200**2 + 300**2 + 400**2) / 4)
    fixed = WorkloadProfile(512, 128)
    assert fixed.p90_prompt == 512 and fixed.prompt_cv2 == 0
    assert WorkloadProfile(512, 128, prompt_p90=1024).prompt_cv2 > 0
    with pytest.raises(ConfigError, match="rate"):
        WorkloadProfile(512, 128, rate=0)
    with pytest.raises(ConfigError, match="prompt_mean"):
        WorkloadProfile(0, 128)
    with pytest.raises(ConfigError, match="samples"):
        WorkloadProfile.from_samples([], [1])
    with pytest.raises(ConfigError, match="ttft_s"):
        SLOTarget(0, 0.05)
    with pytest.raises(ConfigError, match="attainment"):
        SLOTarget(1, 0.05, attainment=1.0)


# -- parsing and the command -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "nodes", "count", "gpu"),
    [("8xH100", 1, 8, "H100"), ("2x8xH100", 2, 8, "H100"), ("4 × a100", 1, 4, "A100-80G"),
     ("1*l40s", 1, 1, "L40S"), (" 8XH200 ", 1, 8, "H200")],
)  # fmt: skip
def test_parse_gpus(text: str, nodes: int, count: int, gpu: str) -> None:
    alloc, spec = parse_gpus(text)
    assert (alloc.nodes, alloc.gpus_per_node, spec.name) == (nodes, count, gpu)


@pytest.mark.parametrize(
    ("text", "message"),
    [("8H100", "expected COUNTxGPU such as 8xH100"), ("H100", "expected COUNTxGPU"),
     ("0xH100", "counts must be >= 1"), ("8xB200", "unknown GPU 'B200'"), ("", "COUNTxGPU")],
)  # fmt: skip
def test_parse_gpus_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_gpus(text)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("2s", 2.0), ("50ms", 0.05), ("200 ms", 0.2), ("1.5s", 1.5), ("500us", 5e-4),
     ("1m", 60.0), ("0.25S", 0.25), (0.3, 0.3)],
)  # fmt: skip
def test_parse_duration(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "message"),
    [("2", r"add a unit: s or ms"), ("fast", "expected a duration such as 2s or 50ms"),
     ("-1s", "expected a duration"), ("0ms", "must be a positive duration"),
     ("5 hours", "expected")],
)  # fmt: skip
def test_parse_duration_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse_duration(text, key="slo_tpot")
    assert info.value.key == "slo_tpot"


def test_plan_command_renders_the_explanation() -> None:
    out = plan_command(model="llama-3-70b", gpus="8xH100", slo_ttft="2s", slo_tpot="50ms")
    assert out.startswith("Plan for Llama-3-70B on 8 × H100 (80 GiB each)")
    assert "SLO: TTFT p90 ≤ 2.00 s, TPOT p90 ≤ 50 ms" in out
    assert "Chosen: 2 × TP4 (8 of 8 GPUs)" in out
    assert "Top alternatives" in out and "Rejected (1):" in out


def test_plan_command_json_and_topology_file() -> None:
    data = json.loads(
        plan_command("llama-3-8b", "2xA100", "1s", "40ms", topology_file=A100_PCIE, as_json=True)
    )
    assert data["model"] == "Llama-3-8B" and data["gpu"] == "A100-80G"
    assert data["instances"] and all(
        set(i) >= {"role", "tp", "pp", "ep", "gpu_ids"} for i in data["instances"]
    )
    assert data["estimates"]["capacity_rps"] > 0


def test_plan_command_errors_are_clear() -> None:
    with pytest.raises(ConfigError, match=r"slo_tpot.*add a unit"):
        plan_command(slo_tpot="50")
    with pytest.raises(ConfigError, match="unknown model 'gpt-9'"):
        plan_command(model="gpt-9")
    with pytest.raises(ConfigError, match="cannot read topology file"):
        plan_command(topology_file="/nonexistent/topo.txt")
