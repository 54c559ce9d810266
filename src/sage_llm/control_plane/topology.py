"""GPU topology of one machine: ``nvidia-smi topo -m`` and /sys NUMA into a :class:`Topology`.

The parser accepts the matrix as nvidia-smi writes it and as people paste it: tabs or tabs
expanded to spaces, ANSI underline escapes around the header, legacy ``mlx5_*`` NIC columns
or ``NIC#`` columns with a ``NIC Legend``, with or without the ``GPU NUMA ID`` column, CPU
affinities as ranges or comma lists, and a legend that is missing or cut short.

Routing uses the result through :func:`assign_instance_topology`, which gives each instance
its ``nvlink_domain``, ``numa_node`` and ``nvlink_peers`` (fields of
:class:`sage_llm.types.ExecutionInstance`). Bandwidths are nominal estimates, not measurements.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import itertools
import math
import os
import re
import signal
import subprocess
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypedDict

from sage_llm.config_fields import suggest
from sage_llm.errors import ConfigError

FALLBACK = "no GPU topology; routing falls back to machine/rack ids"
NO_NVIDIA_SMI = f"nvidia-smi not found: {FALLBACK}"

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_TAIL_COLUMNS = re.compile(r"CPU Affinity|NUMA Affinity|GPU NUMA ID|\S+")
_NIC_LEGEND = re.compile(r"\s*(NIC\d+)\s*:\s*(\S+)\s*")
_GPU_LABEL = re.compile(r"GPU(\d+)")
_NV = re.compile(r"NV(\d+)")
_CLOSENESS = ("X", "NV", "PIX", "PXB", "PHB", "NODE", "SYS")
_MAX_EXHAUSTIVE = 20_000
"""best_group tries every subset up to this many, and grows a group greedily beyond it."""


@functools.total_ordering
class LinkType(enum.Enum):
    """How two devices connect, as ``nvidia-smi topo -m`` names it. Ordered closest first."""

    SELF = "X"
    NV = "NV"
    PIX = "PIX"
    PXB = "PXB"
    PHB = "PHB"
    NODE = "NODE"
    SYS = "SYS"

    @property
    def rank(self) -> int:
        """0 for SELF, then NV, PIX, PXB, PHB, NODE, SYS (farthest)."""
        return _CLOSENESS.index(self.value)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, LinkType):
            return NotImplemented
        return self.rank < other.rank

    @property
    def nominal_gbps(self) -> float:
        """Estimated one-direction bandwidth in GB/s (for NV: per NVLink). Not measured."""
        match self:
            case LinkType.SELF:
                return math.inf
            case LinkType.NV | LinkType.PIX | LinkType.PXB:
                return 25.0
            case LinkType.PHB:
                return 20.0
            case LinkType.NODE:
                return 15.0
            case LinkType.SYS:
                return 10.0


@dataclass(frozen=True, slots=True)
class Link:
    """One matrix cell: a link type and, for NV, the number of bonded NVLinks (``NV18``)."""

    type: LinkType
    nvlinks: int = 0

    def __post_init__(self) -> None:
        if (self.type is LinkType.NV) != (self.nvlinks > 0) or self.nvlinks < 0:
            raise ValueError(f"invalid link {self.type.value} with nvlinks={self.nvlinks}")

    @classmethod
    def parse(cls, cell: str) -> Link:
        """``"NV12"``, ``" X "``, ``"PIX"`` … (``SOC``, the pre-``SYS`` name, reads as SYS)."""
        text = cell.strip().upper()
        if (m := _NV.fullmatch(text)) and int(m[1]) > 0:
            return cls(LinkType.NV, int(m[1]))
        try:
            return cls(LinkType.SYS if text == "SOC" else LinkType(text))
        except ValueError:
            expected = "X, NV#, PIX, PXB, PHB, NODE or SYS"
            raise ValueError(f"unknown link {cell.strip()!r}; expected {expected}") from None

    @property
    def label(self) -> str:
        return f"NV{self.nvlinks}" if self.type is LinkType.NV else self.type.value

    @property
    def is_nvlink(self) -> bool:
        return self.type is LinkType.NV

    @property
    def bandwidth_gbps(self) -> float:
        """Estimated one-direction bandwidth (NV: 25 GB/s per link); ``inf`` for SELF."""
        return self.type.nominal_gbps * (self.nvlinks if self.is_nvlink else 1)

    def __str__(self) -> str:
        return self.label


@dataclass(frozen=True, slots=True)
class GPUInfo:
    """One GPU: its index, the CPUs and NUMA node it is close to, and its own NUMA id."""

    index: int
    cpu_affinity: tuple[int, ...] = ()
    numa_node: int | None = None
    gpu_numa_id: int | None = None
    """The GPU memory's own NUMA node (Grace-Hopper and similar); usually None."""


@dataclass(frozen=True, slots=True)
class NICInfo:
    """One NIC column: its matrix name (``NIC0`` or legacy ``mlx5_0``) and device name."""

    name: str
    device: str | None = None
    """``mlx5_0`` from the NIC Legend (or the legacy column name); None when not shown."""


@dataclass(frozen=True)
class Topology:
    """GPU/NIC links and NUMA layout of one machine. ``Topology()`` is the empty topology.

    ``links[i][j]`` is the link between ``gpus[i]`` and ``gpus[j]``; ``gpu_nic_links[i][k]``
    between ``gpus[i]`` and ``nics[k]``; ``numa_nodes`` maps NUMA node → CPUs. Methods take
    GPU *indices* (``GPUInfo.index``), not positions.
    """

    gpus: tuple[GPUInfo, ...] = ()
    nics: tuple[NICInfo, ...] = ()
    links: tuple[tuple[Link, ...], ...] = ()
    gpu_nic_links: tuple[tuple[Link, ...], ...] = ()
    numa_nodes: Mapping[int, tuple[int, ...]] = field(default_factory=dict)
    _pos: Mapping[int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = len(self.gpus)
        if len(self.links) != n or any(len(row) != n for row in self.links):
            raise ValueError(f"links must be a {n}x{n} matrix")
        if not self.gpu_nic_links and n and not self.nics:
            object.__setattr__(self, "gpu_nic_links", ((),) * n)
        if len(self.gpu_nic_links) != n or any(
            len(r) != len(self.nics) for r in self.gpu_nic_links
        ):
            raise ValueError(f"gpu_nic_links must be a {n}x{len(self.nics)} matrix")
        pos = {g.index: p for p, g in enumerate(self.gpus)}
        if len(pos) != n:
            raise ValueError("GPU indices must be unique")
        labels = [f"GPU{g.index}" for g in self.gpus]
        for i, row in enumerate(self.links):
            for j, cell in enumerate(row):
                problem = matrix_problem(labels[i], labels[j], cell, self.links[j][i], i == j)
                if problem is not None:
                    raise ValueError(problem)
        object.__setattr__(self, "_pos", MappingProxyType(pos))
        object.__setattr__(self, "numa_nodes", MappingProxyType(dict(self.numa_nodes)))

    def __hash__(self) -> int:
        numa = tuple(self.numa_nodes.items())
        return hash((self.gpus, self.nics, self.links, self.gpu_nic_links, numa))

    @property
    def gpu_indices(self) -> tuple[int, ...]:
        return tuple(g.index for g in self.gpus)

    def _position(self, index: int) -> int:
        try:
            return self._pos[index]
        except KeyError:
            raise ValueError(f"GPU {index} is not in this topology {self.gpu_indices}") from None

    def gpu(self, index: int) -> GPUInfo:
        """The GPU with this index (ValueError if absent)."""
        return self.gpus[self._position(index)]

    def link(self, a: int, b: int) -> Link:
        """The link between GPUs ``a`` and ``b`` (SELF when equal)."""
        return self.links[self._position(a)][self._position(b)]

    def bandwidth_gbps(self, a: int, b: int) -> float:
        """Estimated one-direction GB/s between two GPUs (see :meth:`LinkType.nominal_gbps`)."""
        return self.link(a, b).bandwidth_gbps

    def nvlink_domains(self) -> list[frozenset[int]]:
        """Connected components (2+ GPUs) of the NV links, ordered by their lowest GPU."""
        seen: set[int] = set()
        domains: list[frozenset[int]] = []
        for start in range(len(self.gpus)):
            if start in seen:
                continue
            seen.add(start)
            component, stack = {start}, [start]
            while stack:
                p = stack.pop()
                for q, lk in enumerate(self.links[p]):
                    if lk.is_nvlink and q not in seen:
                        seen.add(q)
                        component.add(q)
                        stack.append(q)
            if len(component) > 1:
                domains.append(frozenset(self.gpus[p].index for p in component))
        return domains

    def numa_groups(self) -> dict[int, tuple[int, ...]]:
        """NUMA node → GPU indices on it (GPUs with an unknown node are left out)."""
        groups: dict[int, list[int]] = {}
        for g in self.gpus:
            if g.numa_node is not None:
                groups.setdefault(g.numa_node, []).append(g.index)
        return {node: tuple(groups[node]) for node in sorted(groups)}

    def best_group(self, size: int) -> tuple[int, ...] | None:
        """``size`` GPUs for one TP group, or None when the machine has fewer.

        Preference: all inside one NVLink domain, then spanning the fewest NUMA nodes, then
        the highest weakest-pair bandwidth, then the highest total; ties go to lower indices.
        """
        if size < 1:
            raise ValueError(f"group size must be >= 1, got {size}")
        if size > len(self.gpus):
            return None
        domains = self.nvlink_domains()
        bw = {(a, b): self.bandwidth_gbps(a, b) for a in self._pos for b in self._pos}

        def key(group: tuple[int, ...]) -> tuple[bool, int, float, float]:
            nodes = {self.gpu(i).numa_node for i in group}
            span = len(group) + 1 if None in nodes else len(nodes)
            pair_bw = [bw[a, b] for a, b in itertools.combinations(group, 2)]
            in_domain = any(set(group) <= d for d in domains)
            return in_domain, -span, min(pair_bw, default=0.0), sum(pair_bw)

        indices = self.gpu_indices
        if math.comb(len(indices), size) <= _MAX_EXHAUSTIVE:
            best: tuple[int, ...] = max(itertools.combinations(indices, size), key=key)
            return best
        pair: tuple[int, ...] = max(itertools.combinations(indices, 2), key=key)
        group = list(pair)
        while len(group) < size:
            rest = (i for i in indices if i not in group)
            group.append(max(rest, key=lambda i: key(tuple(sorted([*group, i])))))
        return tuple(sorted(group))

    def nearest_nic(self, gpu: int) -> NICInfo | None:
        """The NIC closest to a GPU (first one on ties), or None without NICs."""
        row = self.gpu_nic_links[self._position(gpu)]
        if not row:
            return None
        return self.nics[min(range(len(row)), key=lambda k: row[k].type.rank)]

    def with_numa_nodes(self, numa: Mapping[int, Sequence[int]]) -> Topology:
        """A copy using ``numa`` (e.g. from :func:`read_sys_numa`) as node → CPUs, and
        placing GPUs whose NUMA node was not reported on the node sharing most CPUs."""
        nodes = {node: tuple(sorted(cpus)) for node, cpus in numa.items()}

        def place(g: GPUInfo) -> GPUInfo:
            if g.numa_node is not None or not g.cpu_affinity or not nodes:
                return g
            shared = {n: len(set(g.cpu_affinity) & set(c)) for n, c in nodes.items()}
            best = max(sorted(shared), key=lambda n: shared[n])
            return replace(g, numa_node=best) if shared[best] else g

        return replace(self, gpus=tuple(place(g) for g in self.gpus), numa_nodes=nodes)

    def describe(self) -> str:
        """A readable multi-line summary (``sage-llm topo``)."""
        if not self.gpus:
            return "no GPUs detected"
        groups = self.numa_groups()
        lines = [f"{len(self.gpus)} GPUs, {len(self.nics)} NICs, {len(groups)} NUMA node(s)"]
        domains = self.nvlink_domains()
        lines.append("NVLink domains:" + ("" if domains else " none"))
        for k, dom in enumerate(domains):
            links = {self.link(a, b) for a in dom for b in dom if a != b}
            kinds = sorted(links, key=lambda lk: lk.nvlinks)
            gbps = kinds[0].bandwidth_gbps
            labels = "/".join(lk.label for lk in kinds)
            lines.append(f"  nv{k}: GPUs {_join(sorted(dom))} ({labels}, ~{gbps:.0f}+ GB/s)")
        lines.append("NUMA nodes:" + ("" if groups else " unknown"))
        for node, gpus in groups.items():
            cpus = format_cpu_list(self.numa_nodes.get(node, ()))
            lines.append(f"  node {node}: GPUs {_join(gpus)}" + (f"; CPUs {cpus}" if cpus else ""))
        names = [f"GPU{i}" for i in self.gpu_indices]
        width = max(len(n) for n in names) + 2
        lines.append(
            "GPU links (est. GB/s per direction: NV# 25/link, PIX/PXB 25, PHB 20, NODE 15, SYS 10):"
        )
        lines.append(" " * (width + 2) + "".join(n.ljust(width) for n in names).rstrip())
        for name, row in zip(names, self.links, strict=True):
            lines.append(f"  {name.ljust(width)}{''.join(lk.label.ljust(width) for lk in row)}")
        lines.append("NICs:" + ("" if self.nics else " none"))
        for k, nic in enumerate(self.nics):
            col = [row[k] for row in self.gpu_nic_links]
            best = min(col, key=lambda lk: lk.type.rank)
            near = [g.index for g, lk in zip(self.gpus, col, strict=True) if lk == best]
            dev = f" ({nic.device})" if nic.device and nic.device != nic.name else ""
            lines.append(f"  {nic.name}{dev}: nearest GPUs {_join(near)} ({best.label})")
        return "\n".join(line.rstrip() for line in lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form; :meth:`from_dict` reads it back."""
        return {
            "gpus": [
                {
                    "index": g.index,
                    "cpu_affinity": format_cpu_list(g.cpu_affinity),
                    "numa_node": g.numa_node,
                    "gpu_numa_id": g.gpu_numa_id,
                }
                for g in self.gpus
            ],
            "nics": [{"name": n.name, "device": n.device} for n in self.nics],
            "links": [[lk.label for lk in row] for row in self.links],
            "gpu_nic_links": [[lk.label for lk in row] for row in self.gpu_nic_links],
            "numa_nodes": {str(n): format_cpu_list(c) for n, c in self.numa_nodes.items()},
            "nvlink_domains": [sorted(d) for d in self.nvlink_domains()],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Topology:
        """Build from :meth:`to_dict` output or a hand-written equivalent (ConfigError if bad).

        ``cpu_affinity`` and ``numa_nodes`` values may be ``"0-3,8"`` strings or int lists;
        ``links`` is required for GPUs, ``nics``/``gpu_nic_links``/``numa_nodes`` optional.
        """
        try:
            if not isinstance(data, Mapping):
                raise ValueError(f"expected an object, got {_show(data)}")
            _known_keys(data, _TOPOLOGY_KEYS, "")
            if "gpus" not in data:  # {} or another JSON file: not an empty topology
                raise ValueError("missing key 'gpus' (an empty list for a machine without GPUs)")
            gpus = tuple(_gpu_info(k, g) for k, g in enumerate(_objects(data, "gpus")))
            nic_objects = _objects(data, "nics")
            for k, n in enumerate(nic_objects):
                _known_keys(n, ("name", "device"), f"nics[{k}].")
                if "name" not in n:
                    raise ValueError(f"nics[{k}]: missing key 'name'")
            nics = tuple(NICInfo(str(n["name"]), n.get("device")) for n in nic_objects)
            links = _link_rows(data, "links")
            nic_links = _link_rows(data, "gpu_nic_links")
            numa_nodes = data.get("numa_nodes", {})
            if not isinstance(numa_nodes, Mapping):
                got = _show(numa_nodes)
                raise ValueError(f"numa_nodes must be an object of node: CPUs, got {got}")
            numa: dict[int, tuple[int, ...]] = {}
            for k, v in numa_nodes.items():
                try:
                    node, cpus = _as_int(k), _as_cpus(v)
                except (TypeError, ValueError) as exc:
                    raise ValueError(f"numa_nodes.{k}: {exc}") from None
                for other, taken in numa.items():
                    if shared := sorted(set(cpus) & set(taken)):
                        raise ValueError(
                            f"numa_nodes.{k}: CPU {shared[0]} is also in node {other}'s "
                            "(a CPU is on one NUMA node)"
                        )
                numa[node] = cpus
            topology = cls(gpus, nics, links, nic_links, numa)
            if "nvlink_domains" in data:  # written by to_dict, read from the links: they agree
                given = data["nvlink_domains"]
                derived = [sorted(d) for d in topology.nvlink_domains()]
                if given != derived:
                    raise ValueError(
                        f"nvlink_domains {_show(given)} disagree with the NV links of "
                        f"'links', whose domains are {derived} (the domains are read from "
                        "the links: leave nvlink_domains out, or write NV# links)"
                    )
            return topology
        except KeyError as exc:
            raise ConfigError(f"invalid topology: missing key {exc}", key="topology") from None
        except (TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(f"invalid topology: {exc}", key="topology") from None


def _gpu_info(k: int, g: Mapping[str, Any]) -> GPUInfo:
    """``gpus[k]`` of a topology object; a bad field's ValueError names it
    (``gpus[0].numa_node``)."""
    if "index" not in g:
        raise ValueError(f"gpus[{k}]: missing key 'index'")
    _known_keys(g, _GPU_KEYS, f"gpus[{k}].")
    values: dict[str, Any] = {}
    for key, read in (
        ("index", _as_int),
        ("cpu_affinity", _as_cpus),
        ("numa_node", _as_int),
        ("gpu_numa_id", _as_int),
    ):
        if g.get(key) is None and key != "index":  # the index is required
            continue
        try:
            values[key] = read(g[key])
        except (TypeError, ValueError) as exc:
            raise ValueError(f"gpus[{k}].{key}: {exc}") from None
    return GPUInfo(**values)


_TOPOLOGY_KEYS = ("gpus", "nics", "links", "gpu_nic_links", "numa_nodes", "nvlink_domains")
"""The keys of a topology object (``nvlink_domains``, which :meth:`Topology.to_dict`
writes, is read from the links: given, it must agree with them)."""
_GPU_KEYS = ("index", "cpu_affinity", "numa_node", "gpu_numa_id")


def _known_keys(table: Mapping[str, Any], known: Sequence[str], where: str) -> None:
    """ValueError for the first key of ``table`` not in ``known`` (a misspelt key would
    be read as absent: a GPU on no NUMA node, say)."""
    for key in table:
        if key not in known:
            raise ValueError(f"{where}{key}: unknown key{suggest(str(key), known)}")


def matrix_problem(a: str, b: str, cell: Link, mirror: Link, diagonal: bool) -> str | None:
    """Why cell ``a``/``b`` (with ``mirror`` at ``b``/``a``) breaks a topology matrix, or None:
    X is on the diagonal and nowhere else, and the matrix is symmetric. Shared by the parser
    and :class:`Topology` (so :meth:`Topology.from_dict` checks the same)."""
    if (cell.type is LinkType.SELF) == diagonal and cell == mirror:
        return None
    other = "" if cell == mirror else f" vs {mirror}"
    return f"topology matrix is not symmetric with X on the diagonal at {a}/{b}: {cell}{other}"


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _list(data: Mapping[str, Any], key: str, what: str) -> Sequence[Any]:
    value = data.get(key, ())
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ValueError(f"{key} must be a list of {what}, got {_show(value)}")
    return value


def _objects(data: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
    items = _list(data, key, "objects")
    for k, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise ValueError(f"{key}[{k}] must be an object, got {_show(item)}")
    return list(items)


def _link_rows(data: Mapping[str, Any], key: str) -> tuple[tuple[Link, ...], ...]:
    rows = _list(data, key, "rows")
    for k, row in enumerate(rows):
        if isinstance(row, str) or not isinstance(row, Sequence):
            raise ValueError(f"{key}[{k}] must be a list of cells, got {_show(row)}")
    return tuple(tuple(Link.parse(str(c)) for c in row) for row in rows)


def _join(items: Sequence[int]) -> str:
    return ",".join(str(i) for i in items)


def _as_int(value: object) -> int:
    """A GPU index, NUMA node or CPU id: an integer >= 0 (or its digits)."""
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer >= 0, got {value!r}")
    if value < 0:
        raise ValueError(f"expected an integer >= 0, got {value}")
    return value


def _as_cpus(value: object) -> tuple[int, ...]:
    if isinstance(value, str):
        return parse_cpu_list(value)
    if not isinstance(value, Sequence):
        raise ValueError(f"expected a CPU list, got {value!r}")
    cpus = {_as_int(v) for v in value}
    if any(c < 0 or c > MAX_CPU_ID for c in cpus):
        raise ValueError(f"CPU list {list(value)!r} is out of range (CPU ids 0-{MAX_CPU_ID})")
    return tuple(sorted(cpus))


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """``"0-55,112-167"`` or ``"6,14,22,30"`` → sorted CPU ids; ``""``/``"N/A"`` → ().

    Raises ValueError for anything else.
    """
    text = text.strip()
    if text.upper() in ("", "N/A"):
        return ()
    cpus: set[int] = set()
    for item in text.split(","):
        lo, sep, hi = item.strip().partition("-")
        if not _digits(lo) or (sep and not _digits(hi)) or (sep and int(hi) < int(lo)):
            raise ValueError(f"bad CPU list {text!r}")
        if int(hi if sep else lo) > MAX_CPU_ID:  # (expanded, a typo would take all memory)
            raise ValueError(f"CPU list {text!r} is out of range (CPU ids 0-{MAX_CPU_ID})")
        cpus.update(range(int(lo), int(hi if sep else lo) + 1))
    return tuple(sorted(cpus))


MAX_CPU_ID = 65535
"""The largest CPU id a CPU list may name (Linux builds for at most 8192 CPUs)."""


def _digits(text: str) -> bool:
    """Whether ``text`` is ASCII digits (``int()`` refuses some that ``isdigit()`` takes)."""
    return text.isascii() and text.isdigit()


def format_cpu_list(cpus: Sequence[int]) -> str:
    """Sorted CPU ids → the compact ``"0-55,112-167"`` form."""
    parts: list[str] = []
    ordered = sorted(set(cpus))
    for _, run in itertools.groupby(enumerate(ordered), key=lambda t: t[1] - t[0]):
        ids = [c for _, c in run]
        parts.append(str(ids[0]) if len(ids) == 1 else f"{ids[0]}-{ids[-1]}")
    return ",".join(parts)


def _optional_int(text: str | None) -> int | None:
    if text is None or text.upper() == "N/A":
        return None
    if not _digits(text):
        raise ValueError(f"expected a number or N/A, got {text!r}")
    return int(text)


def parse_nvidia_smi_topo(text: str) -> Topology:
    """Parse ``nvidia-smi topo -m`` output (tabs or spaces); ConfigError if it is not one."""
    lines = [_ANSI.sub("", ln).rstrip() for ln in text.splitlines()]
    # The header is the first line starting with GPU<n> whose next cell is not the X diagonal.
    start = next(
        (n for n, ln in enumerate(lines) if _is_header(ln.split())),
        None,
    )
    if start is None:
        raise ConfigError("not an `nvidia-smi topo -m` matrix: no header line starting with GPU0")
    header = lines[start].split()
    cut = next((k for k, t in enumerate(header) if t in ("CPU", "NUMA", "GPU")), len(header))
    columns, tail_names = header[:cut], _TAIL_COLUMNS.findall(" ".join(header[cut:]))
    rows: dict[str, list[str]] = {}
    for ln in lines[start + 1 :]:
        tokens = ln.split()
        if not tokens or "Legend" in ln:
            break
        if tokens[0] not in columns or tokens[0] in rows:
            raise ConfigError(f"unexpected line in the topology matrix: {ln.strip()!r}")
        rows[tokens[0]] = tokens[1:]
    # GPU rows are required; NIC rows only confirm the matrix (posted copies get cut short).
    missing = [c for c in columns if c not in rows and _GPU_LABEL.fullmatch(c)]
    if missing:
        raise ConfigError(f"topology matrix has no row for {', '.join(missing)}")
    matrix: dict[str, list[Link]] = {}
    for label in rows:
        cells = rows[label][: len(columns)]
        if len(cells) < len(columns):
            raise ConfigError(f"row {label} has {len(cells)} cells, expected {len(columns)}")
        try:
            matrix[label] = [Link.parse(c) for c in cells]
        except ValueError as exc:
            raise ConfigError(f"row {label}: {exc}") from None
    for a in matrix:
        i = columns.index(a)
        for j, b in enumerate(columns):
            mirror = matrix[b][i] if b in matrix else matrix[a][j]
            problem = matrix_problem(a, b, matrix[a][j], mirror, i == j)
            if problem is not None:
                raise ConfigError(problem)
    legend = {m[1]: m[2] for ln in lines if (m := _NIC_LEGEND.fullmatch(ln))}
    gpu_cols = [k for k, c in enumerate(columns) if _GPU_LABEL.fullmatch(c)]
    nic_cols = [k for k, c in enumerate(columns) if not _GPU_LABEL.fullmatch(c)]
    gpus: list[GPUInfo] = []
    for k in gpu_cols:
        label = columns[k]
        values = dict(zip(tail_names, rows[label][len(columns) :], strict=False))
        try:
            gpus.append(
                GPUInfo(
                    index=int(label[3:]),
                    cpu_affinity=parse_cpu_list(values.get("CPU Affinity", "")),
                    numa_node=_optional_int(values.get("NUMA Affinity")),
                    gpu_numa_id=_optional_int(values.get("GPU NUMA ID")),
                )
            )
        except ValueError as exc:
            raise ConfigError(f"row {label}: {exc}") from None
    nics = [
        NICInfo(columns[k], legend.get(columns[k]) if columns[k].startswith("NIC") else columns[k])
        for k in nic_cols
    ]
    numa: dict[int, set[int]] = {}
    for g in gpus:
        if g.numa_node is not None:
            numa.setdefault(g.numa_node, set()).update(g.cpu_affinity)
    return Topology(
        gpus=tuple(gpus),
        nics=tuple(nics),
        links=tuple(tuple(matrix[columns[i]][j] for j in gpu_cols) for i in gpu_cols),
        gpu_nic_links=tuple(tuple(matrix[columns[i]][j] for j in nic_cols) for i in gpu_cols),
        numa_nodes={n: tuple(sorted(c)) for n, c in sorted(numa.items())},
    )


def _is_header(tokens: Sequence[str]) -> bool:
    return bool(tokens) and _GPU_LABEL.fullmatch(tokens[0]) is not None and tokens[1:2] != ["X"]


def read_sys_numa(root: Path = Path("/sys")) -> dict[int, tuple[int, ...]]:
    """NUMA node → CPUs from ``<root>/devices/system/node/node*/cpulist``; {} if absent.

    Blocking file reads: from async code call it through ``asyncio.to_thread``.
    """
    base = root / "devices" / "system" / "node"
    nodes: dict[int, tuple[int, ...]] = {}
    if not base.is_dir():
        return nodes
    for entry in base.iterdir():
        m = re.fullmatch(r"node(\d+)", entry.name)
        cpulist = entry / "cpulist"
        if m is None or not cpulist.is_file():
            continue
        try:
            nodes[int(m[1])] = parse_cpu_list(cpulist.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read NUMA cpulist: {exc}", location=str(cpulist)) from None
    return dict(sorted(nodes.items()))


Runner = Callable[[Sequence[str], float], Awaitable[str]]
"""Runs ``argv`` with a timeout and returns stdout; see :func:`run_command`."""


async def run_command(argv: Sequence[str], timeout_s: float = 10.0) -> str:
    """Run a program without blocking the loop and return its stdout.

    Raises FileNotFoundError when it is absent, ``subprocess.CalledProcessError`` when it
    exits non-zero and TimeoutError after ``timeout_s`` (the process is killed).
    """
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        start_new_session=True,  # a group of its own: a wrapper's children are killed too
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except BaseException:  # timeout or cancellation: leave no process behind
        # the whole group: a wrapper script's child (ssh …) would keep the pipes open, and
        # the wait for the wrapper with them, until it ended of itself
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        raise
    if proc.returncode:
        raise subprocess.CalledProcessError(
            proc.returncode, list(argv), out.decode(errors="replace"), err.decode(errors="replace")
        )
    return out.decode(errors="replace")


@dataclass(frozen=True, slots=True)
class DetectedTopology:
    """What detection found: the topology (possibly empty) and why it is empty or partial."""

    topology: Topology
    message: str | None = None
    raw: str = ""
    """The ``nvidia-smi topo -m`` text as read (empty when the command did not run)."""

    @property
    def available(self) -> bool:
        return bool(self.topology.gpus)


async def detect_topology_async(
    runner: Runner = run_command,
    *,
    nvidia_smi: str = "nvidia-smi",
    sys_root: Path | None = Path("/sys"),
    timeout_s: float = 10.0,
) -> DetectedTopology:
    """Run ``nvidia-smi topo -m`` and read /sys NUMA. Never raises for a missing or failing
    nvidia-smi: it returns an empty Topology with a message instead."""
    try:
        raw = await runner((nvidia_smi, "topo", "-m"), timeout_s)
    except FileNotFoundError:
        return DetectedTopology(Topology(), NO_NVIDIA_SMI)
    except subprocess.CalledProcessError as exc:
        detail = str(exc.stderr or exc.output or "").strip().splitlines()[:1]
        why = f"exit status {exc.returncode}" + "".join(f": {d}" for d in detail)
        return DetectedTopology(Topology(), f"nvidia-smi topo -m failed ({why}); {FALLBACK}")
    except (TimeoutError, OSError) as exc:
        why = f"timed out after {timeout_s:g} s" if isinstance(exc, TimeoutError) else str(exc)
        return DetectedTopology(Topology(), f"nvidia-smi topo -m failed ({why}); {FALLBACK}")
    try:
        topology = parse_nvidia_smi_topo(raw)
    except ConfigError as exc:
        msg = f"cannot parse nvidia-smi topo -m output ({exc.message}); {FALLBACK}"
        return DetectedTopology(Topology(), msg, raw)
    if sys_root is not None:
        try:
            numa = await asyncio.to_thread(read_sys_numa, sys_root)
        except ConfigError as exc:
            return DetectedTopology(topology, f"NUMA layout from /sys ignored: {exc.message}", raw)
        if numa:
            topology = topology.with_numa_nodes(numa)
    return DetectedTopology(topology, None, raw)


def detect_topology(
    runner: Runner = run_command,
    *,
    nvidia_smi: str = "nvidia-smi",
    sys_root: Path | None = Path("/sys"),
    timeout_s: float = 10.0,
) -> DetectedTopology:
    """Synchronous :func:`detect_topology_async` for the CLI (not from inside an event loop)."""
    return asyncio.run(
        detect_topology_async(runner, nvidia_smi=nvidia_smi, sys_root=sys_root, timeout_s=timeout_s)
    )


class InstanceTopology(TypedDict):
    """Topology fields of one :class:`~sage_llm.types.ExecutionInstance` (same names)."""

    machine_id: str
    nvlink_domain: str | None
    numa_node: int | None
    nvlink_peers: list[str]


def assign_instance_topology(
    topology: Topology, gpu_groups: Mapping[str, Sequence[int]], machine_id: str
) -> dict[str, InstanceTopology]:
    """Topology fields for each instance on one machine, from the GPUs it runs on.

    ``nvlink_domain`` is ``"<machine_id>/nv<k>"`` when all the instance's GPUs are in NVLink
    domain k of :meth:`Topology.nvlink_domains`; ``numa_node`` is set when they share one
    node; ``nvlink_peers`` lists the other instances with the same domain. With an empty
    topology (no nvidia-smi) only ``machine_id`` is set. ConfigError for bad GPU lists.
    """
    if not machine_id:
        raise ConfigError("machine_id must be a non-empty string")
    domains = topology.nvlink_domains()
    known = set(topology.gpu_indices)
    placed: dict[str, tuple[str | None, int | None]] = {}
    for iid, gpus in gpu_groups.items():
        if not gpus or not all(_is_index(g) for g in gpus):
            raise ConfigError(f"instance {iid!r}: GPUs must be a non-empty list of indices")
        if not known:
            placed[iid] = (None, None)
            continue
        unknown = sorted(set(gpus) - known)
        if unknown:
            raise ConfigError(
                f"instance {iid!r} uses GPU(s) {_join(unknown)}, not on machine "
                f"{machine_id!r} (GPUs {_join(sorted(known))})"
            )
        domain = next((k for k, d in enumerate(domains) if set(gpus) <= d), None)
        nodes = {topology.gpu(g).numa_node for g in gpus}
        placed[iid] = (
            None if domain is None else f"{machine_id}/nv{domain}",
            nodes.pop() if len(nodes) == 1 else None,
        )
    return {
        iid: InstanceTopology(
            machine_id=machine_id,
            nvlink_domain=dom,
            numa_node=node,
            nvlink_peers=[o for o, (d, _) in placed.items() if dom and d == dom and o != iid],
        )
        for iid, (dom, node) in placed.items()
    }


def _is_index(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
