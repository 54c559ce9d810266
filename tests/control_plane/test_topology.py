"""Topology parsing, queries and detection, driven by real ``nvidia-smi topo -m`` outputs."""

from __future__ import annotations

import asyncio
import json
import math
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from sage_llm.control_plane.topology import (
    NO_NVIDIA_SMI,
    GPUInfo,
    Link,
    LinkType,
    NICInfo,
    Runner,
    Topology,
    assign_instance_topology,
    detect_topology,
    detect_topology_async,
    format_cpu_list,
    parse_cpu_list,
    parse_nvidia_smi_topo,
    read_sys_numa,
    run_command,
)
from sage_llm.errors import ConfigError
from tests.factories import make_instance

FIXTURES = Path(__file__).parent.parent / "fixtures" / "topology"
ALL_FIXTURES = sorted(p.name for p in FIXTURES.glob("*.txt"))
TAB_FIXTURES = [n for n in ALL_FIXTURES if not n.endswith("-spaces.txt")]

H200 = "h200-hgx-8gpu-nv18-12nic.txt"
DGX_A100 = "a100-dgx-8gpu-nv12-mlx5-legacy.txt"
A100_PCIE = "a100-pcie-4gpu-nv12-pair-mlx5.txt"
A6000 = "rtxa6000-3gpu-nv4-pair-ansi.txt"
L40S = "l40s-4gpu-2numa-2nic-spaces.txt"
RTX5090 = "rtx5090-2gpu-phb.txt"
RTX4090 = "rtx4090-8gpu-sys-2nic.txt"
H100 = "h100-4gpu-nv6-8numa-4nic-spaces.txt"


def text(name: str) -> str:
    return (FIXTURES / name).read_text()


def topo(name: str) -> Topology:
    return parse_nvidia_smi_topo(text(name))


def pair_labels(t: Topology) -> set[str]:
    """Labels of every off-diagonal GPU pair."""
    return {t.link(a, b).label for a in t.gpu_indices for b in t.gpu_indices if a != b}


# --- fixtures, one test each -------------------------------------------------------------


def test_fixture_set_is_complete() -> None:
    assert len(ALL_FIXTURES) == 8
    assert "Copied byte-for-byte" in (FIXTURES / "README.md").read_text()


def test_h200_hgx_all_nv18_two_numa_nodes_twelve_nics() -> None:
    t = topo(H200)
    assert t.gpu_indices == tuple(range(8))
    assert pair_labels(t) == {"NV18"}
    assert t.link(0, 7) == Link(LinkType.NV, 18)
    assert t.nvlink_domains() == [frozenset(range(8))]
    assert t.numa_groups() == {0: (0, 1, 2, 3), 1: (4, 5, 6, 7)}
    assert t.gpu(0).cpu_affinity == (*range(56), *range(112, 168))
    assert t.gpu(0).gpu_numa_id is None  # "N/A", after an empty double-tab field
    assert [n.device for n in t.nics] == [f"mlx5_{k}" for k in range(12)]
    assert [n.name for n in t.nics][:2] == ["NIC0", "NIC1"]
    assert t.gpu_nic_links[0][0].type is LinkType.PXB
    assert t.gpu_nic_links[1][2].type is LinkType.NODE
    assert t.gpu_nic_links[0][6].type is LinkType.SYS
    assert t.nearest_nic(3) == NICInfo("NIC5", "mlx5_5")
    assert t.numa_nodes[1] == (*range(56, 112), *range(168, 224))


def test_dgx_a100_legacy_mlx5_columns_nv12_four_numa_nodes() -> None:
    t = topo(DGX_A100)
    assert len(t.gpus) == 8
    assert pair_labels(t) == {"NV12"}
    assert t.nvlink_domains() == [frozenset(range(8))]
    # Non-monotonic NUMA ids: GPU0-1 → 3, GPU2-3 → 1, GPU4-5 → 7, GPU6-7 → 5.
    assert [g.numa_node for g in t.gpus] == [3, 3, 1, 1, 7, 7, 5, 5]
    assert t.numa_groups() == {1: (2, 3), 3: (0, 1), 5: (6, 7), 7: (4, 5)}
    assert all(g.gpu_numa_id is None for g in t.gpus)  # no GPU NUMA ID column
    assert [n.name for n in t.nics] == [f"mlx5_{k}" for k in range(12)]
    assert all(n.name == n.device for n in t.nics)  # legacy: the column is the device
    assert t.nearest_nic(4) == NICInfo("mlx5_6", "mlx5_6")
    assert t.gpu_nic_links[0][4].type is LinkType.SYS  # mlx5_4/5 have no local GPU


def test_a100_pcie_one_nv12_pair_others_pcie() -> None:
    t = topo(A100_PCIE)
    assert len(t.gpus) == 4
    assert [n.name for n in t.nics] == ["mlx5_0", "mlx5_1"]
    assert t.link(0, 1) == Link(LinkType.NV, 12)
    assert t.link(2, 3).type is LinkType.NODE
    assert {t.link(a, b).type for a in (0, 1) for b in (2, 3)} == {LinkType.SYS}
    assert t.nvlink_domains() == [frozenset({0, 1})]
    assert t.numa_groups() == {0: (0, 1), 1: (2, 3)}


def test_rtxa6000_ansi_header_nv4_pair_plus_pcie_gpu() -> None:
    raw = text(A6000)
    assert "\x1b[4m" in raw.splitlines()[0]  # the fixture really carries the escapes
    t = parse_nvidia_smi_topo(raw)
    assert len(t.gpus) == 3
    assert t.nics == ()
    assert t.link(0, 1) == Link(LinkType.NV, 4)
    assert t.link(0, 2).type is LinkType.NODE
    assert t.link(1, 2).type is LinkType.NODE
    assert t.nvlink_domains() == [frozenset({0, 1})]
    assert t.numa_groups() == {0: (0, 1, 2)}


def test_l40s_spaces_two_numa_nodes_no_nvlink() -> None:
    t = topo(L40S)
    assert len(t.gpus) == 4
    assert [(n.name, n.device) for n in t.nics] == [("NIC0", "mlx5_0"), ("NIC1", "mlx5_1")]
    assert t.nvlink_domains() == []
    assert not any(t.link(a, b).is_nvlink for a in range(4) for b in range(4))
    assert t.numa_groups() == {0: (0, 1), 1: (2, 3)}
    assert t.link(0, 1).type is LinkType.NODE
    assert t.link(1, 2).type is LinkType.SYS
    assert t.gpu(2).cpu_affinity == (*range(96, 192), *range(288, 384))
    assert t.gpu(3).gpu_numa_id is None


def test_rtx5090_two_gpus_phb() -> None:
    t = topo(RTX5090)
    assert t.gpu_indices == (0, 1)
    assert t.nics == ()
    assert t.nearest_nic(0) is None  # no NIC to be near
    assert t.link(0, 1).type is LinkType.PHB
    assert t.numa_groups() == {0: (0, 1)}
    assert t.gpu(1).cpu_affinity == tuple(range(64))


def test_rtx4090_all_sys_numa_only_from_affinity() -> None:
    t = topo(RTX4090)
    assert len(t.gpus) == 8
    assert len(t.nics) == 2
    assert all(n.device is None for n in t.nics)  # NIC columns, but no legend was posted
    assert pair_labels(t) == {"SYS"}
    assert t.numa_groups() == {0: (0, 1, 2, 3), 1: (4, 5, 6, 7)}
    assert t.gpu_nic_links[6] == (Link(LinkType.PHB), Link(LinkType.PHB))


def test_h100_spaces_nv6_comma_affinities_numa_3_1_7_5() -> None:
    t = topo(H100)
    assert len(t.gpus) == 4
    assert len(t.nics) == 4
    assert pair_labels(t) == {"NV6"}
    assert [g.numa_node for g in t.gpus] == [3, 1, 7, 5]
    assert t.gpu(0).cpu_affinity == (6, 14, 22, 30)
    assert t.gpu(1).cpu_affinity == (4, 12, 20, 28)
    assert [t.nearest_nic(g) for g in range(4)] == [NICInfo(f"NIC{g}") for g in range(4)]
    assert t.numa_nodes == {
        1: (4, 12, 20, 28),
        3: (6, 14, 22, 30),
        5: (5, 13, 21, 29),
        7: (7, 15, 23, 31),
    }


# --- formatting tolerance -----------------------------------------------------------------


@pytest.mark.parametrize("name", TAB_FIXTURES)
def test_tabs_and_expanded_spaces_parse_the_same(name: str) -> None:
    raw = text(name)
    assert "\t" in raw
    assert parse_nvidia_smi_topo(raw.expandtabs(8)) == parse_nvidia_smi_topo(raw)


def test_expanded_legacy_header_with_single_space_separators() -> None:
    # "mlx5_10" is 7 wide: expanded, it is followed by one space only.
    expanded = text(DGX_A100).expandtabs(8)
    assert "mlx5_10 mlx5_11 CPU Affinity" in expanded
    assert len(parse_nvidia_smi_topo(expanded).nics) == 12


@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_tolerates_crlf_trailing_fields_and_stripped_indent(name: str) -> None:
    expected = topo(name)
    lines = text(name).splitlines()
    # Raw output keeps empty trailing tab fields on NIC rows (NVIDIA/nccl#1264).
    padded = [ln + "\t\t\t\t" if ln[:1] not in ("", " ", "\t") else ln for ln in lines]
    assert parse_nvidia_smi_topo("\r\n".join(padded)) == expected
    stripped = [ln.lstrip() for ln in lines]
    assert parse_nvidia_smi_topo("\n".join(stripped)) == expected
    assert parse_nvidia_smi_topo("$ nvidia-smi topo -m\n" + text(name)) == expected


def test_copy_cut_short_after_the_gpu_rows() -> None:
    lines = text(H200).splitlines()
    cut = "\n".join(lines[:9])  # header + 8 GPU rows: no NIC rows, no legends
    t = parse_nvidia_smi_topo(cut)
    full = topo(H200)
    assert t.links == full.links
    assert t.gpu_nic_links == full.gpu_nic_links
    assert [n.name for n in t.nics] == [n.name for n in full.nics]
    assert all(n.device is None for n in t.nics)  # the NIC Legend was lost


def test_single_gpu_and_legend_without_blank_line() -> None:
    raw = "\tGPU0\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID\nGPU0\t X \t0-7\t0\t\t2\n"
    t = parse_nvidia_smi_topo(raw + "NIC Legend:\n\n  NIC0: mlx5_0\n")
    assert t.gpus == (GPUInfo(0, tuple(range(8)), 0, 2),)
    assert t.nvlink_domains() == []
    assert t.best_group(1) == (0,)
    assert t.best_group(2) is None


# --- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ("", "no header line"),
        ("hello world\nthis is not a matrix\n", "no header line"),
        ("| NVIDIA-SMI 550.54 Driver Version: 550.54 |\n| GPU  Name |\n", "no header line"),
        ("\tGPU0\tGPU1\nGPU0\t X \tNV4\n", "no row for GPU1"),
        ("\tGPU0\tNIC0\nGPU0\t X \tPIX\nNIC0\tSYS\t X\n", "not symmetric"),
        ("\tGPU0\tGPU1\nGPU0\t X \tNV4\nGPU1\tNV4\n", "row GPU1 has 1 cells"),
        ("\tGPU0\tGPU1\nGPU0\t X \tNV4\nGPU1\tNV2\t X \n", "not symmetric"),
        ("\tGPU0\tGPU1\nGPU0\t X \tPHB\nGPU1\tPHB\tPHB\n", "X on the diagonal"),
        ("\tGPU0\tGPU1\nGPU0\t X \tFOO\nGPU1\tFOO\t X \n", "unknown link 'FOO'"),
        ("\tGPU0\tGPU1\nGPU0\t X \tNV4\ngarbage\nGPU1\tNV4\t X \n", "unexpected line"),
        ("\tGPU0\tCPU Affinity\nGPU0\t X \t0-x\n", "bad CPU list"),
        ("\tGPU0\tCPU Affinity\tNUMA Affinity\nGPU0\t X \t0-3\tzero\n", "number or N/A"),
    ],
)
def test_garbage_raises_config_error(raw: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        parse_nvidia_smi_topo(raw)


def test_older_soc_name_reads_as_sys() -> None:
    t = parse_nvidia_smi_topo("\tGPU0\tGPU1\nGPU0\t X \tSOC\nGPU1\tSOC\t X \n")
    assert t.link(0, 1).type is LinkType.SYS
    assert t.gpu(0).numa_node is None
    assert t.numa_groups() == {}


# --- links and bandwidth ------------------------------------------------------------------


def test_link_types_ordered_by_closeness() -> None:
    order = [LinkType.SELF, LinkType.NV, LinkType.PIX, LinkType.PXB, LinkType.PHB]
    order += [LinkType.NODE, LinkType.SYS]
    shuffled = [order[k] for k in (6, 2, 0, 4, 1, 5, 3)]
    assert sorted(shuffled) == order
    assert LinkType.NV < LinkType.SYS
    assert LinkType.NODE >= LinkType.PHB
    with pytest.raises(TypeError):  # a link type is no string: not ordered against one
        assert LinkType.NV < "SYS"


def test_nominal_bandwidth_estimates() -> None:
    assert {lt: lt.nominal_gbps for lt in LinkType if lt is not LinkType.SELF} == {
        LinkType.NV: 25.0,
        LinkType.PIX: 25.0,
        LinkType.PXB: 25.0,
        LinkType.PHB: 20.0,
        LinkType.NODE: 15.0,
        LinkType.SYS: 10.0,
    }
    assert topo(H200).bandwidth_gbps(0, 5) == 450.0
    assert topo(A100_PCIE).bandwidth_gbps(0, 1) == 300.0
    assert topo(A100_PCIE).bandwidth_gbps(0, 2) == 10.0
    assert topo(A6000).bandwidth_gbps(1, 0) == 100.0
    assert math.isinf(topo(A6000).bandwidth_gbps(2, 2))


def test_link_parse_and_validation() -> None:
    assert Link.parse(" X ") == Link(LinkType.SELF)
    assert Link.parse("nv18").label == "NV18"
    assert str(Link(LinkType.PIX)) == "PIX"
    with pytest.raises(ValueError, match="unknown link"):
        Link.parse("NV0")
    with pytest.raises(ValueError, match="invalid link"):
        Link(LinkType.NV)
    with pytest.raises(ValueError, match="invalid link"):
        Link(LinkType.SYS, 2)


def test_unknown_gpu_index_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="GPU 9 is not in this topology"):
        topo(RTX5090).link(0, 9)


def test_topologies_compare_and_hash_by_value() -> None:
    assert topo(L40S) == topo(L40S)
    assert hash(topo(L40S)) == hash(topo(L40S))
    assert len({topo(L40S), topo(L40S), topo(H100), Topology()}) == 3


def test_topology_constructor_checks_shapes() -> None:
    gpu = GPUInfo(0)
    with pytest.raises(ValueError, match="1x1"):
        Topology(gpus=(gpu,))
    with pytest.raises(ValueError, match="unique"):
        Topology(gpus=(gpu, gpu), links=((Link(LinkType.SELF),) * 2,) * 2)
    with pytest.raises(ValueError, match="gpu_nic_links"):
        Topology(gpus=(gpu,), nics=(NICInfo("NIC0"),), links=((Link(LinkType.SELF),),))


# --- grouping -----------------------------------------------------------------------------


def test_best_group_tp2_on_a100_pcie_picks_the_nvlink_pair() -> None:
    t = topo(A100_PCIE)
    assert t.best_group(2) == (0, 1)
    assert t.best_group(3) == (0, 1, 2)  # the pair, plus one more
    assert t.best_group(4) == (0, 1, 2, 3)
    assert t.best_group(5) is None


def test_best_group_tp4_on_h200_stays_in_one_numa_node() -> None:
    t = topo(H200)
    group = t.best_group(4)
    assert group is not None
    assert len({t.gpu(g).numa_node for g in group}) == 1
    assert t.best_group(8) == tuple(range(8))
    assert t.best_group(9) is None


def test_best_group_without_nvlink_uses_numa() -> None:
    assert topo(RTX4090).best_group(4) == (0, 1, 2, 3)
    assert topo(L40S).best_group(2) == (0, 1)
    assert topo(A6000).best_group(2) == (0, 1)
    assert topo(DGX_A100).best_group(2) == (0, 1)  # same NUMA node, NV12


def test_best_group_edge_cases() -> None:
    assert Topology().best_group(1) is None
    with pytest.raises(ValueError, match=">= 1"):
        topo(H200).best_group(0)


def _two_islands(n: int) -> Topology:
    """2n GPUs: two NVLink islands of n on two NUMA nodes, SYS across."""
    gpus = tuple(GPUInfo(i, numa_node=i // n) for i in range(2 * n))

    def link(a: int, b: int) -> Link:
        if a == b:
            return Link(LinkType.SELF)
        return Link(LinkType.NV, 4) if a // n == b // n else Link(LinkType.SYS)

    return Topology(
        gpus, links=tuple(tuple(link(a, b) for b in range(2 * n)) for a in range(2 * n))
    )


def test_best_group_on_a_large_box_grows_greedily_within_an_island() -> None:
    t = _two_islands(12)  # C(24, 12) subsets: too many to try them all
    assert t.nvlink_domains() == [frozenset(range(12)), frozenset(range(12, 24))]
    assert t.best_group(12) == tuple(range(12))
    assert t.best_group(13) is not None


def _hand_topology(links: dict[tuple[int, int], Link], numa: Sequence[int]) -> Topology:
    """GPUs on the given NUMA nodes; ``links`` for pairs (a < b), SYS for the others."""
    n = len(numa)

    def link(a: int, b: int) -> Link:
        if a == b:
            return Link(LinkType.SELF)
        return links.get((min(a, b), max(a, b)), Link(LinkType.SYS))

    return Topology(
        tuple(GPUInfo(i, numa_node=numa[i]) for i in range(n)),
        links=tuple(tuple(link(a, b) for b in range(n)) for a in range(n)),
    )


def test_best_group_prefers_an_nvlink_pair_across_numa_nodes_to_a_pcie_pair_on_one() -> None:
    """GPU0 (NUMA 0) and GPU2 (NUMA 1) share NVLink; 0-1 and 2-3 are PIX pairs on one node."""
    pix = Link(LinkType.PIX)
    t = _hand_topology({(0, 2): Link(LinkType.NV, 4), (0, 1): pix, (2, 3): pix}, [0, 0, 1, 1])
    assert t.nvlink_domains() == [frozenset({0, 2})]
    assert t.best_group(2) == (0, 2)


def test_best_group_inside_one_nvlink_domain_keeps_to_one_numa_node() -> None:
    """All four GPUs NVLink-connected; GPUs 0 and 2 on NUMA node 0, 1 and 3 on node 1."""
    nv = Link(LinkType.NV, 18)
    t = _hand_topology({(a, b): nv for a in range(4) for b in range(a + 1, 4)}, [0, 1, 0, 1])
    assert t.best_group(2) == (0, 2)


def test_best_group_prefers_the_highest_weakest_pair_before_the_highest_total() -> None:
    """(0, 1, 2): PIX, PIX and one NODE pair, the higher total; (3, 4, 5): PHB throughout,
    the higher weakest pair. All on one NUMA node, no NVLink; SYS between the two."""
    links = {(0, 1): LinkType.PIX, (0, 2): LinkType.PIX, (1, 2): LinkType.NODE,
             (3, 4): LinkType.PHB, (3, 5): LinkType.PHB, (4, 5): LinkType.PHB}  # fmt: skip

    def link(a: int, b: int) -> Link:
        if a == b:
            return Link(LinkType.SELF)
        return Link(links.get((min(a, b), max(a, b)), LinkType.SYS))

    t = Topology(
        tuple(GPUInfo(i, numa_node=0) for i in range(6)),
        links=tuple(tuple(link(a, b) for b in range(6)) for a in range(6)),
    )
    first = [t.bandwidth_gbps(a, b) for a, b in ((0, 1), (0, 2), (1, 2))]
    second = [t.bandwidth_gbps(a, b) for a, b in ((3, 4), (3, 5), (4, 5))]
    assert min(first) < min(second) and sum(first) > sum(second)
    assert t.best_group(3) == (3, 4, 5)


# --- dict form and description ------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_to_dict_is_json_and_round_trips(name: str) -> None:
    t = topo(name)
    data = json.loads(json.dumps(t.to_dict()))
    assert Topology.from_dict(data) == t
    assert data["nvlink_domains"] == [sorted(d) for d in t.nvlink_domains()]


def test_from_dict_by_hand() -> None:
    t = Topology.from_dict(
        {
            "gpus": [
                {"index": 0, "cpu_affinity": "0-7", "numa_node": 0},
                {"index": 1, "cpu_affinity": [8, 9], "numa_node": 1},
            ],
            "links": [["X", "NV8"], ["NV8", "X"]],
        }
    )
    assert t.nvlink_domains() == [frozenset({0, 1})]
    assert t.gpu(1).cpu_affinity == (8, 9)
    assert t.nics == ()


@pytest.mark.parametrize(
    "data",
    [
        {"gpus": [{"cpu_affinity": "0"}], "links": [["X"]]},
        {"gpus": [{"index": 0}], "links": [["BOGUS"]]},
        {"gpus": [{"index": 0}]},
        {"gpus": [{"index": True}], "links": [["X"]]},
        {"gpus": [{"index": 0, "cpu_affinity": 5}], "links": [["X"]]},
        {"gpus": [{"index": -1}], "links": [["X"]]},  # CUDA_VISIBLE_DEVICES=-1 hides them all
        {"gpus": [{"index": 0, "numa_node": -3}], "links": [["X"]]},
        {"gpus": [{"index": 0, "numa_node": "zero"}], "links": [["X"]]},
    ],
)
def test_from_dict_rejects_bad_data(data: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match="invalid topology") as info:
        Topology.from_dict(data)
    assert info.value.key == "topology"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([{"index": 0}], "expected an object, got [{'index': 0}]"),  # the GPUs' list alone
        ({"gpus": [{"index": 0}], "links": ["X"]}, "links[0] must be a list of cells"),
        (
            {"gpus": [{"index": 0, "cpu_affinity": [0, 1 << 20]}], "links": [["X"]]},
            "CPU list [0, 1048576] is out of range",
        ),
    ],
)
def test_from_dict_says_what_is_wrong_where(data: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        Topology.from_dict(data)  # type: ignore[arg-type]
    assert info.value.key == "topology"
    assert message in info.value.message


def test_from_dict_names_a_missing_key() -> None:
    with pytest.raises(ConfigError, match=r"gpus\[0\]: missing key 'index'"):
        Topology.from_dict({"gpus": [{"numa_node": 0}], "links": [["X"]]})
    # {} or another JSON file (a plan) is no topology; a misspelt key is no absent one
    with pytest.raises(ConfigError, match="missing key 'gpus'"):
        Topology.from_dict({})
    # a NIC without its name: which one is said, as a GPU's is
    with pytest.raises(ConfigError, match=r"nics\[1\]: missing key 'name'") as info:
        Topology.from_dict({"gpus": [], "nics": [{"name": "NIC0"}, {"device": "mlx5_1"}]})
    assert info.value.key == "topology"
    with pytest.raises(ConfigError, match=r"instances: unknown key"):
        Topology.from_dict({"gpus": [], "instances": []})
    typo = {"gpus": [{"index": 0, "numa_nod": 0}], "links": [["X"]]}
    with pytest.raises(ConfigError, match=r"gpus\[0\]\.numa_nod: unknown key \(did you mean"):
        Topology.from_dict(typo)
    assert Topology.from_dict(Topology().to_dict()) == Topology()  # no GPUs: a valid one


def test_from_dict_requires_an_index_even_when_null() -> None:
    with pytest.raises(ConfigError) as info:
        Topology.from_dict({"gpus": [{"index": None}], "links": [["X"]]})
    assert (
        info.value.detail == "invalid topology: gpus[0].index: expected an integer >= 0, got None"
    )


def test_from_dict_names_the_bad_field() -> None:
    data = {
        "gpus": [{"index": 0}, {"index": 1, "numa_node": -3}],
        "links": [["X", "SYS"], ["SYS", "X"]],
    }
    with pytest.raises(ConfigError) as info:
        Topology.from_dict(data)
    assert info.value.detail == (
        "invalid topology: gpus[1].numa_node: expected an integer >= 0, got -3"
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"numa_nodes": {"a": "0-3"}}, "numa_nodes.a: "),
        ({"numa_nodes": {"0": "0-3", "1": "2-5"}}, "numa_nodes.1: CPU 2 is also in node 0's"),
        ({"nvlink_domains": [[0, 1]]}, "nvlink_domains [[0, 1]] disagree with the NV links"),
    ],
)
def test_from_dict_names_what_it_cannot_take(extra: dict[str, object], message: str) -> None:
    """A bad NUMA node is named; domains the links do not make are refused (they had been
    dropped without a word, as had overlapping NUMA CPU lists)."""
    data = {"gpus": [{"index": 0}, {"index": 1}], "links": [["X", "SYS"], ["SYS", "X"]]}
    with pytest.raises(ConfigError, match=re.escape(message)):
        Topology.from_dict({**data, **extra})
    linked = {**data, "links": [["X", "NV4"], ["NV4", "X"]], "nvlink_domains": [[0, 1]]}
    assert Topology.from_dict(linked).nvlink_domains() == [frozenset({0, 1})]


def test_describe_summarises_the_machine() -> None:
    out = topo(A100_PCIE).describe()
    assert out.splitlines()[0] == "4 GPUs, 2 NICs, 2 NUMA node(s)"
    assert "  nv0: GPUs 0,1 (NV12, ~300+ GB/s)" in out
    assert "  node 1: GPUs 2,3; CPUs 28-55,84-111" in out
    assert "  GPU0  X     NV12  SYS   SYS" in out
    assert "  mlx5_0: nearest GPUs 0,1 (NODE)" in out
    assert "NVLink domains: none" in topo(L40S).describe()
    assert "  NIC5 (mlx5_5): nearest GPUs 3 (PXB)" in topo(H200).describe()
    assert Topology().describe() == "no GPUs detected"


def test_cpu_lists() -> None:
    assert parse_cpu_list("0-2,5,7-8\n") == (0, 1, 2, 5, 7, 8)
    assert parse_cpu_list("N/A") == ()
    assert parse_cpu_list("") == ()
    assert format_cpu_list((8, 7, 0, 1, 2, 5)) == "0-2,5,7-8"
    assert format_cpu_list(()) == ""
    for bad in ("3-1", "a", "1,,2", "1-", "\u00b2", "0-\u00b9"):  # ² is isdigit(), not int()
        with pytest.raises(ValueError, match="bad CPU list"):
            parse_cpu_list(bad)
    # a range far past any machine's CPUs: refused at once (expanded, it took all memory)
    assert len(parse_cpu_list("0-65535")) == 65536
    for huge in ("0-9999999999", "65536"):
        with pytest.raises(ValueError, match="is out of range"):
            parse_cpu_list(huge)


# --- /sys NUMA ----------------------------------------------------------------------------


def _fake_sys(root: Path, nodes: dict[str, str]) -> Path:
    base = root / "devices" / "system" / "node"
    base.mkdir(parents=True)
    (base / "possible").write_text("0-1\n")
    for name, cpulist in nodes.items():
        (base / name).mkdir()
        (base / name / "cpulist").write_text(cpulist)
    (base / "power").mkdir()
    return root


def test_read_sys_numa_from_a_fake_tree(tmp_path: Path) -> None:
    root = _fake_sys(tmp_path, {"node1": "4-7\n", "node0": "0-3,8-11\n", "node2": "\n"})
    assert read_sys_numa(root) == {0: (0, 1, 2, 3, 8, 9, 10, 11), 1: (4, 5, 6, 7), 2: ()}
    assert read_sys_numa(tmp_path / "missing") == {}


def test_read_sys_numa_bad_cpulist(tmp_path: Path) -> None:
    root = _fake_sys(tmp_path, {"node0": "zero\n"})
    with pytest.raises(ConfigError, match="node0/cpulist"):
        read_sys_numa(root)


def test_sys_numa_places_gpus_the_matrix_left_unplaced(tmp_path: Path) -> None:
    raw = text(RTX4090).replace("\t0\t\tN/A", "\tN/A\t\tN/A").replace("\t1\t\tN/A", "\tN/A\t\tN/A")
    t = parse_nvidia_smi_topo(raw)
    assert t.numa_groups() == {}
    root = _fake_sys(tmp_path, {"node0": "0-55,112-167", "node1": "56-111,168-223"})
    placed = t.with_numa_nodes(read_sys_numa(root))
    assert placed.numa_groups() == {0: (0, 1, 2, 3), 1: (4, 5, 6, 7)}
    assert placed.numa_nodes[1] == (*range(56, 112), *range(168, 224))


# --- detection ----------------------------------------------------------------------------


def _runner_returning(out: str) -> Runner:
    async def runner(argv: Sequence[str], timeout_s: float) -> str:
        assert list(argv[1:]) == ["topo", "-m"]
        return out

    return runner


def _runner_raising(exc: BaseException) -> Runner:
    async def runner(argv: Sequence[str], timeout_s: float) -> str:
        raise exc

    return runner


async def test_absent_nvidia_smi_gives_empty_topology_and_message() -> None:
    found = await detect_topology_async(_runner_raising(FileNotFoundError("nvidia-smi")))
    assert found.topology == Topology()
    assert not found.available
    assert found.message == NO_NVIDIA_SMI
    assert "routing falls back to machine/rack ids" in NO_NVIDIA_SMI


@pytest.mark.parametrize(
    ("exc", "needle"),
    [
        (subprocess.CalledProcessError(9, ["nvidia-smi"], "", "NVML: driver not loaded\n"), "9"),
        (TimeoutError(), "timed out after 10 s"),
        (PermissionError("permission denied"), "permission denied"),
    ],
)
async def test_failing_nvidia_smi_gives_empty_topology_and_message(
    exc: BaseException, needle: str
) -> None:
    found = await detect_topology_async(_runner_raising(exc))
    assert found.topology == Topology()
    assert found.message is not None
    assert needle in found.message
    assert found.message.startswith("nvidia-smi topo -m failed")


async def test_unparseable_output_gives_empty_topology_and_message() -> None:
    found = await detect_topology_async(_runner_returning("No devices were found\n"))
    assert not found.available
    assert found.message is not None
    assert "cannot parse" in found.message
    assert found.raw == "No devices were found\n"


async def test_detection_merges_sys_numa(tmp_path: Path) -> None:
    root = _fake_sys(tmp_path, {"node0": "0-27,56-83", "node1": "28-55,84-111"})
    found = await detect_topology_async(_runner_returning(text(A100_PCIE)), sys_root=root)
    assert found.available
    assert found.message is None
    assert found.topology.nvlink_domains() == [frozenset({0, 1})]
    assert found.topology.numa_nodes[0] == (*range(28), *range(56, 84))


async def test_bad_sys_numa_keeps_the_gpu_topology(tmp_path: Path) -> None:
    root = _fake_sys(tmp_path, {"node0": "bad"})
    found = await detect_topology_async(_runner_returning(text(L40S)), sys_root=root)
    assert found.topology == topo(L40S)
    assert found.message is not None
    assert "NUMA layout from /sys ignored" in found.message


def _fake_nvidia_smi(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "nvidia-smi"
    script.write_text(f"#!{sys.executable}\n{body}\n")
    script.chmod(0o755)
    return script


async def test_real_subprocess_path_with_a_fake_nvidia_smi(tmp_path: Path) -> None:
    fixture = FIXTURES / H200
    script = _fake_nvidia_smi(
        tmp_path,
        "import sys\n"
        "assert sys.argv[1:] == ['topo', '-m'], sys.argv\n"
        f"sys.stdout.write(open({str(fixture)!r}).read())",
    )
    found = await detect_topology_async(nvidia_smi=str(script), sys_root=None)
    assert found.message is None
    assert found.topology == topo(H200)


async def test_real_subprocess_failure_and_absence(tmp_path: Path) -> None:
    script = _fake_nvidia_smi(
        tmp_path, "import sys\nsys.stderr.write('NVML failed\\n')\nsys.exit(9)"
    )
    failed = await detect_topology_async(nvidia_smi=str(script), sys_root=None)
    assert failed.message is not None
    assert "exit status 9: NVML failed" in failed.message
    absent = await detect_topology_async(nvidia_smi=str(tmp_path / "no-such-nvidia-smi"))
    assert absent.message == NO_NVIDIA_SMI


async def test_run_command_returns_stdout_and_raises_on_failure() -> None:
    assert await run_command([sys.executable, "-c", "print('hi')"]) == "hi\n"
    with pytest.raises(subprocess.CalledProcessError) as info:
        await run_command([sys.executable, "-c", "import sys; sys.exit(3)"])
    assert info.value.returncode == 3


async def test_run_command_kills_the_process_on_timeout() -> None:
    # timeout 0 expires at once; a process left running would make proc.wait() hang here.
    with pytest.raises(TimeoutError):
        await run_command([sys.executable, "-c", "import signal; signal.pause()"], timeout_s=0)


async def test_run_command_kills_a_wrappers_children_on_timeout(tmp_path: Path) -> None:
    """A wrapper script (nvidia-smi over ssh) whose child keeps the pipes open: the call
    returns at its timeout, not when the child ends (it had waited out a 30 s sleep)."""
    wrapper = tmp_path / "smi"
    wrapper.write_text("#!/bin/sh\nsleep 30\n")
    wrapper.chmod(0o755)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        await run_command([str(wrapper)], timeout_s=0.5)
    assert loop.time() - started < 10


def test_sync_wrapper_for_the_cli() -> None:
    found = detect_topology(_runner_returning(text(RTX5090)), sys_root=None)
    assert found.topology == topo(RTX5090)
    absent = detect_topology(_runner_raising(FileNotFoundError()))
    assert absent.message == NO_NVIDIA_SMI


# --- instance assignment ------------------------------------------------------------------


def test_assign_on_h200_one_domain_two_numa_nodes() -> None:
    groups = {"tp2-a": [0, 1], "tp2-b": [2, 3], "tp2-c": [4, 5], "tp2-d": [6, 7]}
    out = assign_instance_topology(topo(H200), groups, "node-a")
    assert {v["nvlink_domain"] for v in out.values()} == {"node-a/nv0"}
    assert [out[i]["numa_node"] for i in groups] == [0, 0, 1, 1]
    assert out["tp2-a"]["nvlink_peers"] == ["tp2-b", "tp2-c", "tp2-d"]
    assert out["tp2-a"]["machine_id"] == "node-a"


def test_assign_on_a100_pcie_pairs_and_pcie_only_gpus() -> None:
    groups = {"a": [0], "b": [1], "c": [2], "d": [3], "across": [1, 2]}
    out = assign_instance_topology(topo(A100_PCIE), groups, "m1")
    assert out["a"] == {
        "machine_id": "m1",
        "nvlink_domain": "m1/nv0",
        "numa_node": 0,
        "nvlink_peers": ["b"],
    }
    assert out["c"]["nvlink_domain"] is None
    assert out["c"]["nvlink_peers"] == []
    assert out["c"]["numa_node"] == 1
    assert out["across"]["nvlink_domain"] is None
    assert out["across"]["numa_node"] is None  # spans two NUMA nodes


def test_assigned_fields_drive_execution_instance_affinity() -> None:
    out = assign_instance_topology(topo(A100_PCIE), {"p": [0], "d": [1], "x": [2]}, "m1")
    inst = {iid: replace(make_instance(iid), **fields) for iid, fields in out.items()}
    assert inst["p"].is_nvlink_connected(inst["d"])
    assert inst["p"].get_affinity_score(inst["d"]) == 1.0
    assert inst["p"].get_affinity_score(inst["x"]) == 0.5  # same machine, no NVLink


def test_assign_with_empty_topology_sets_machine_only() -> None:
    out = assign_instance_topology(Topology(), {"a": [0, 1], "b": [2]}, "m2")
    assert out["a"] == {
        "machine_id": "m2",
        "nvlink_domain": None,
        "numa_node": None,
        "nvlink_peers": [],
    }


@pytest.mark.parametrize(
    ("groups", "machine", "needle"),
    [
        ({"a": [8]}, "m", "GPU\\(s\\) 8, not on machine 'm'"),
        ({"a": []}, "m", "non-empty list"),
        ({"a": [-1]}, "m", "non-empty list"),
        ({"a": [0]}, "", "machine_id"),
    ],
)
def test_assign_rejects_bad_gpu_lists(
    groups: dict[str, list[int]], machine: str, needle: str
) -> None:
    with pytest.raises(ConfigError, match=needle):
        assign_instance_topology(topo(H200), groups, machine)


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (
            {"gpus": [{"index": 0}, {"index": 1}], "links": [["X", "NV12"], ["SYS", "X"]]},
            "not symmetric with X on the diagonal at GPU0/GPU1: NV12 vs SYS",
        ),
        ({"gpus": [{"index": 0}], "links": [["NV12"]]}, "X on the diagonal at GPU0/GPU0: NV12"),
        (
            {"gpus": [{"index": 0}, {"index": 1}], "links": [["X", "X"], ["X", "X"]]},
            "X on the diagonal at GPU0/GPU1",
        ),
        ({"gpus": ["0", "1"], "links": [["X"]]}, r"gpus\[0\] must be an object, got '0'"),
        ({"gpus": {"index": 0}, "links": [["X"]]}, "gpus must be a list of objects"),
        ({"gpus": [{"index": 0}], "links": "X"}, "links must be a list of rows"),
        ({"gpus": [{"index": 0}], "links": [["X"]], "nics": ["NIC0"]}, r"nics\[0\] must be"),
        ({"gpus": [{"index": 0}], "links": [["X"]], "numa_nodes": [0]}, "numa_nodes must be"),
    ],
)
def test_from_dict_rejects_malformed_matrices_clearly(data: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle) as info:
        Topology.from_dict(data)
    assert info.value.key == "topology"
    assert str(info.value).startswith("topology: invalid topology: ")
    assert "string indices" not in str(info.value)


def test_the_constructor_and_the_parser_share_the_matrix_check() -> None:
    gpus = (GPUInfo(0), GPUInfo(1))
    asym = ((Link(LinkType.SELF), Link(LinkType.NV, 12)), (Link(LinkType.SYS), Link(LinkType.SELF)))
    with pytest.raises(ValueError, match="not symmetric with X on the diagonal at GPU0/GPU1"):
        Topology(gpus=gpus, links=asym)
    raw = "\tGPU0\tGPU1\nGPU0\t X \tNV12\nGPU1\tSYS\t X \n"
    with pytest.raises(ConfigError, match="not symmetric with X on the diagonal at GPU0/GPU1"):
        parse_nvidia_smi_topo(raw)
