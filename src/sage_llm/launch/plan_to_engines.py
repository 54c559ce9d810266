"""From a plan to engine command lines: ``vllm serve``, vLLM's API-server module, engine-sim.

:func:`engines_from_plan` turns planned instances (:class:`PlannedInstance`, from
:func:`sage_llm.control_plane.parallelism.plan` or a ``sage-llm plan --json`` file) into
:class:`EngineLaunch` records: argv, the environment to add (``CUDA_VISIBLE_DEVICES`` for
the instance's GPUs, ``VLLM_NIXL_SIDE_CHANNEL_PORT`` for PD roles), host and port. They are
plain data; :mod:`sage_llm.launch.local` and :mod:`sage_llm.launch.ray_backend` start them.

Engine kinds (:data:`ENGINE_KINDS`):

* ``vllm``: ``vllm serve MODEL --host H --port P --served-model-name N
  --tensor-parallel-size T --pipeline-parallel-size P [--enable-expert-parallel]
  [--kv-transfer-config '{"kv_connector":"NixlConnector","kv_role":"kv_both"}'] …``
* ``vllm-module``: the same options after ``PYTHON -m vllm.entrypoints.openai.api_server
  --model MODEL`` (the CPU build's entry point, whose ``vllm`` console script does not start);
* ``sim``: ``PYTHON -m sage_llm.cli engine-sim --model M --gpu G --host H --port P
  --served-model-name N --tp T [--pp P] --role general|prefill|decode --seed S``
  (``sim_entry="script"`` writes ``sage-llm engine-sim …`` instead).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import shlex
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from sage_llm.config_fields import name_problem, opt, read_dataclass, rule
from sage_llm.config_locate import (
    TOO_DEEP,
    JsonKeyLocator,
    KeyLocator,
    KeyPath,
    Problems,
    format_key,
    read_toml,
    read_utf8,
)
from sage_llm.control_plane.parallelism import (
    GPUAllocation,
    Plan,
    PlannedInstance,
    SLOTarget,
    WorkloadProfile,
    parse_duration,
    parse_topology_text,
    plan,
)
from sage_llm.control_plane.parallelism_eval import parse_gpu_text
from sage_llm.control_plane.pd.orchestrator import Member, unservable_reason
from sage_llm.control_plane.topology import InstanceTopology, Topology
from sage_llm.errors import ConfigError, raise_problems
from sage_llm.sim.specs import get_gpu, get_model, placement_problem
from sage_llm.types import ExecutionInstance, ExecutionInstanceType, host_port

__all__ = [
    "ENGINE_KINDS",
    "KV_TRANSFER_CONFIG",
    "EngineLaunch",
    "LaunchConfig",
    "LaunchSettings",
    "engine_sim_argv",
    "engines_from_plan",
    "fleet_problem",
    "load_launch_config",
    "load_plan_file",
    "planned_instances_from_dicts",
    "vllm_argv",
]

log = logging.getLogger("sage_llm.launch")

ENGINE_KINDS = ("vllm", "vllm-module", "sim")
_KV_TRANSFER: Mapping[str, str] = MappingProxyType(
    {"kv_connector": "NixlConnector", "kv_role": "kv_both"}
)
KV_TRANSFER_CONFIG = json.dumps(dict(_KV_TRANSFER), separators=(",", ":"))
"""The ``--kv-transfer-config`` value for PD roles (vLLM's NIXL connector, docs/pd.md), to
which :attr:`LaunchSettings.kv_transfer_config` adds its entries."""
VLLM_MODULE = "vllm.entrypoints.openai.api_server"
_SIM_ROLE: Mapping[ExecutionInstanceType, str] = MappingProxyType(
    {
        ExecutionInstanceType.GENERAL: "general",
        ExecutionInstanceType.HYBRID: "general",
        ExecutionInstanceType.PREFILLING: "prefill",
        ExecutionInstanceType.DECODING: "decode",
    }
)
_WILDCARD_HOSTS = ("0.0.0.0", "::", "")
_PD_ROLES = (ExecutionInstanceType.PREFILLING, ExecutionInstanceType.DECODING)


_INT_SETTINGS = ("base_port", "kv_base_port", "node", "max_concurrent_requests")
_NUMBER_SETTINGS = ("sim_speed", "health_timeout_s", "health_poll_s", "stop_grace_s",
                    "gpu_memory_gb")  # fmt: skip


def _memory_share(extra_args: Sequence[str]) -> float:
    """The share of each GPU's memory a simulated engine's KV cache may fill beside the
    weights, by its ``extra_args``: the last ``--gpu-memory-utilization`` (as its argument
    parser reads it), else vLLM's 0.9. The whole memory (1.0: the weights must still fit)
    when the engine is given its KV size (``--num-gpu-blocks-override``), or a share that
    is not a number in (0, 1]: the engine refuses that itself, in its own words."""
    share = 0.9
    args = list(extra_args)
    for i, arg in enumerate(args):
        name, eq, value = arg.partition("=")
        if name == "--num-gpu-blocks-override":
            return 1.0
        if name != "--gpu-memory-utilization":
            continue
        text = value if eq else (args[i + 1] if i + 1 < len(args) else "")
        try:
            share = float(text)
        except ValueError:
            share = 1.0
        if not 0 < share <= 1:
            share = 1.0
    return share


@dataclass(frozen=True)
class LaunchSettings:
    """How to start the engines of a plan on one machine.

    ``model`` is what vLLM loads (a directory or Hugging Face id) and, for ``sim``
    engines, the simulated model (``sim_model`` overrides it); ``served_model_name`` is the
    name clients send (default: ``model``). Ports are ``base_port``, ``base_port + 1`` … in
    plan order; PD NIXL side channels ``kv_base_port`` + the GPUs of earlier instances.
    Only instances planned on machine ``node`` are started here.
    """

    engine: Literal["vllm", "vllm-module", "sim"] = "sim"
    model: str = "llama-3-8b"
    served_model_name: str | None = opt(None, rule(nonempty=True, check=name_problem))
    sim_model: str | None = opt(None, rule(nonempty=True, check=name_problem))
    sim_gpu: str = "h100"
    sim_speed: float = 1.0
    sim_entry: Literal["module", "script"] = "module"
    host: str = "127.0.0.1"
    advertise_host: str | None = None
    base_port: int = 8100
    kv_base_port: int = 5600
    machine_id: str = "local"
    node: int = 0
    python: str = sys.executable
    extra_args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    log_dir: Path = Path("sage-llm-logs")
    health_timeout_s: float = 600.0
    health_poll_s: float = 0.25
    stop_grace_s: float = 10.0
    max_concurrent_requests: int = 256
    gpu_memory_gb: float = 0.0
    kv_transfer_config: Mapping[str, Any] = field(default_factory=dict)
    """Entries added to a vLLM prefill or decode engine's ``--kv-transfer-config``
    (:data:`KV_TRANSFER_CONFIG`), e.g. ``{"kv_buffer_device": "cpu"}`` for vLLM's CPU
    build or ``kv_connector_extra_config``; not ``kv_connector`` nor ``kv_role``, which
    the launcher sets (the control plane's ``vllm`` connector speaks NIXL's protocol)."""

    def __post_init__(self) -> None:
        if self.engine not in ENGINE_KINDS:
            raise ConfigError(
                f"unknown engine {self.engine!r}; expected one of {', '.join(ENGINE_KINDS)}",
                key="engine",
            )
        if self.sim_entry not in ("module", "script"):
            raise ConfigError("must be 'module' or 'script'", key="sim_entry")
        if not self.model:
            raise ConfigError("must not be empty", key="model")
        numbers = (
            *((k, int, "an integer") for k in _INT_SETTINGS),
            *((k, int | float, "a number") for k in _NUMBER_SETTINGS),
        )
        for key, kind, what in numbers:  # (from Python, a string would fail a comparison)
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, kind):
                raise ConfigError(f"must be {what}, got {value!r}", key=key)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"must be a finite number, got {value!r}", key=key)
        texts = ("model", "sim_gpu", "host", "machine_id", "python")
        for key in (*texts, "served_model_name", "sim_model", "advertise_host"):
            value = getattr(self, key)
            if not isinstance(value, str) and (key in texts or value is not None):
                raise ConfigError(f"must be a string, got {value!r}", key=key)
        if not isinstance(self.log_dir, str | Path):
            raise ConfigError(f"must be a path, got {self.log_dir!r}", key="log_dir")
        if not isinstance(self.env, Mapping):
            raise ConfigError(f"must be a mapping of names to values, got {self.env!r}", key="env")
        args: object = self.extra_args  # as given: the annotation is not checked
        if not isinstance(args, Iterable) or isinstance(args, str | bytes):  # (a string's
            # characters would be the arguments)
            raise ConfigError(f"must be a list of strings, got {args!r}", key="extra_args")
        object.__setattr__(self, "extra_args", given_args := tuple(args))  # (a generator too)
        for i, arg in enumerate(given_args):
            if not isinstance(arg, str):
                raise ConfigError(f"must be a string, got {arg!r}", key=f"extra_args[{i}]")
        for name, value in self.env.items():
            if not isinstance(name, str) or not isinstance(value, str):
                raise ConfigError(
                    f"must be a string, got {value!r}", key=format_key(("env", str(name)))
                )
        for key in ("python", "sim_gpu", "machine_id"):
            if not getattr(self, key).strip():
                raise ConfigError("must not be empty", key=key)
        if not self.gpu_memory_gb >= 0:
            raise ConfigError(f"must be >= 0, got {self.gpu_memory_gb}", key="gpu_memory_gb")
        for key in ("base_port", "kv_base_port"):
            if not 1 <= getattr(self, key) <= 65535:
                raise ConfigError(f"must be a port (1-65535), got {getattr(self, key)}", key=key)
        for key in ("health_timeout_s", "health_poll_s", "sim_speed"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"must be > 0, got {getattr(self, key)}", key=key)
        for key, low in (("stop_grace_s", 0), ("node", 0), ("max_concurrent_requests", 1)):
            if getattr(self, key) < low:
                raise ConfigError(f"must be >= {low}, got {getattr(self, key)}", key=key)
        for key in ("host", "advertise_host"):
            value = getattr(self, key)
            if value is not None and not value.strip():
                raise ConfigError("must not be empty", key=key)
        for where, problem in process_problems(self.env, self.extra_args, self.engine):
            raise ConfigError(problem, key=".".join(map(str, where)))
        object.__setattr__(self, "env", MappingProxyType(dict(self.env)))
        object.__setattr__(self, "log_dir", Path(self.log_dir))
        object.__setattr__(
            self, "kv_transfer_config", MappingProxyType(_kv_transfer(self.kv_transfer_config))
        )

    @property
    def name(self) -> str:
        """The model name clients use."""
        return self.served_model_name or self.model

    @property
    def reachable_host(self) -> str:
        """The address the control plane (and health checks) use to reach the engines."""
        if self.advertise_host:
            return self.advertise_host
        return "127.0.0.1" if self.host in _WILDCARD_HOSTS else self.host


@dataclass(frozen=True)
class EngineLaunch:
    """One engine process to start: what to run, with which extra environment, where."""

    instance_id: str
    role: ExecutionInstanceType
    argv: tuple[str, ...]
    env: Mapping[str, str]
    host: str
    port: int
    gpu_ids: tuple[int, ...]
    tp: int = 1
    pp: int = 1
    ep: int = 1
    node: int = 0
    model_name: str = ""
    engine: str = "sim"
    sim_model: str | None = None
    sim_gpu: str | None = None
    bind_host: str | None = None
    """The address the engine binds (``host`` is how it is reached); None: ``host``."""

    @property
    def base_url(self) -> str:
        return f"http://{host_port(self.host, self.port)}"

    @property
    def side_channel_ports(self) -> range:
        """The NIXL side-channel ports a PD vLLM engine binds (one per GPU rank, from
        ``VLLM_NIXL_SIDE_CHANNEL_PORT``); empty for the others."""
        first = self.env.get("VLLM_NIXL_SIDE_CHANNEL_PORT")
        if first is None or not (first.isascii() and first.isdigit()):
            return range(0)
        return range(int(first), int(first) + self.tp * self.pp)

    def shell(self) -> str:
        """The command as one shell line, environment first (for logs and docs)."""
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        return f"{env} {shlex.join(self.argv)}".strip()

    def to_instance(
        self,
        topology: InstanceTopology | None = None,
        *,
        max_concurrent_requests: int = 256,
        gpu_memory_gb: float = 0.0,
        metadata: Mapping[str, Any] | None = None,
    ) -> ExecutionInstance:
        """The :class:`ExecutionInstance` to register for this engine once it is healthy."""
        meta: dict[str, Any] = {"gpu_ids": list(self.gpu_ids), "launched_by": "sage-llm"}
        if self.sim_model:
            meta.update(sim_model=self.sim_model, sim_gpu=self.sim_gpu)
        meta.update(metadata or {})
        topo = topology or InstanceTopology(
            machine_id="", nvlink_domain=None, numa_node=None, nvlink_peers=[]
        )
        return ExecutionInstance(
            instance_id=self.instance_id,
            host=self.host,
            port=self.port,
            model_name=self.model_name,
            tensor_parallel_size=self.tp,
            pipeline_parallel_size=self.pp,
            instance_type=self.role,
            gpu_count=self.tp * self.pp,
            gpu_memory_gb=gpu_memory_gb,
            max_concurrent_requests=max_concurrent_requests,
            machine_id=topo["machine_id"] or None,
            nvlink_domain=topo["nvlink_domain"],
            numa_node=topo["numa_node"],
            nvlink_peers=list(topo["nvlink_peers"]),
            gpu_device_id=self.gpu_ids[0] if self.gpu_ids else None,
            engine="vllm",
            metadata=meta,
            engine_scheduling_policy=scheduling_policy_of(self.argv),
        )


def scheduling_policy_of(argv: Sequence[str]) -> str:
    """The ``--scheduling-policy`` a vLLM command line gives (the last one, as argparse
    reads it): ``priority``, or ``fcfs`` (vLLM's default) for anything else."""
    policy = "fcfs"
    for k, arg in enumerate(argv):
        if arg == "--scheduling-policy" and k + 1 < len(argv):
            policy = argv[k + 1]
        elif arg.startswith("--scheduling-policy="):
            policy = arg.partition("=")[2]
    return "priority" if policy == "priority" else "fcfs"


def _kv_transfer(given: object) -> dict[str, Any]:
    """``given`` as :attr:`LaunchSettings.kv_transfer_config`: a mapping of names to
    values JSON can write; ConfigError naming the entry otherwise."""
    key = "kv_transfer_config"
    if not isinstance(given, Mapping):
        raise ConfigError(f"must be a table of names to values, got {given!r}", key=key)
    out: dict[str, Any] = {}
    for name, value in given.items():
        where = format_key((key, str(name)))
        if not isinstance(name, str) or not name:
            raise ConfigError(f"must be named by a non-empty string, got {name!r}", key=key)
        if name in _KV_TRANSFER:
            raise ConfigError(
                f"the launcher sets {name} itself ({_KV_TRANSFER[name]!r}: the control "
                "plane's vllm connector speaks NIXL's protocol, docs/pd.md)",
                key=where,
            )
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            raise ConfigError(
                f"must be a value JSON can hold (a string, number, boolean, list or table), "
                f"got {value!r}",
                key=where,
            ) from None
        out[name] = value
    return out


def vllm_argv(
    model: str,
    *,
    served_model_name: str,
    host: str,
    port: int,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    role: ExecutionInstanceType = ExecutionInstanceType.GENERAL,
    entry: Literal["vllm", "vllm-module"] = "vllm",
    python: str = sys.executable,
    extra_args: Sequence[str] = (),
    kv_transfer_config: Mapping[str, Any] | None = None,
) -> list[str]:
    """A vLLM OpenAI server command line (``vllm serve`` or the API-server module); a
    prefill or decode one's ``--kv-transfer-config`` is :data:`KV_TRANSFER_CONFIG` with
    ``kv_transfer_config``'s entries added (checked as :class:`LaunchSettings` checks it)."""
    head = (
        ["vllm", "serve", model]
        if entry == "vllm"
        else [python, "-m", VLLM_MODULE, "--model", model]
    )
    argv = [
        *head,
        "--host", host,
        "--port", str(port),
        "--served-model-name", served_model_name,
        "--tensor-parallel-size", str(tp),
        "--pipeline-parallel-size", str(pp),
    ]  # fmt: skip
    if ep > 1:
        argv.append("--enable-expert-parallel")
    if role in (ExecutionInstanceType.PREFILLING, ExecutionInstanceType.DECODING):
        config = KV_TRANSFER_CONFIG
        if kv_transfer_config:
            added = _kv_transfer(kv_transfer_config)
            config = json.dumps({**_KV_TRANSFER, **added}, separators=(",", ":"))
        argv += ["--kv-transfer-config", config]
    return argv + list(extra_args)


def engine_sim_argv(
    model: str,
    gpu: str,
    *,
    served_model_name: str,
    host: str,
    port: int,
    tp: int = 1,
    pp: int = 1,
    role: ExecutionInstanceType = ExecutionInstanceType.GENERAL,
    seed: int = 0,
    speed: float = 1.0,
    entry: Literal["module", "script"] = "module",
    python: str = sys.executable,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """A ``sage-llm engine-sim`` command line (``--pp`` only when PP > 1)."""
    head = (
        [python, "-m", "sage_llm.cli", "engine-sim"]
        if entry == "module"
        else ["sage-llm", "engine-sim"]
    )
    argv = [
        *head,
        "--model", model,
        "--gpu", gpu,
        "--host", host,
        "--port", str(port),
        "--served-model-name", served_model_name,
        "--tp", str(tp),
    ]  # fmt: skip
    if pp > 1:
        argv += ["--pp", str(pp)]
    argv += ["--role", _SIM_ROLE[role], "--seed", str(seed)]
    if speed != 1.0:
        argv += ["--speed", f"{speed:g}"]
    return argv + list(extra_args)


def engines_from_plan(
    instances: Sequence[PlannedInstance], settings: LaunchSettings
) -> list[EngineLaunch]:
    """The engines of ``instances`` planned on machine ``settings.node``, in plan order.

    ConfigError (key ``base_port`` / ``kv_base_port``) when their ports would pass 65535."""
    _check_port_ranges(instances, settings)
    out: list[EngineLaunch] = []
    kv_port = settings.kv_base_port
    counts: dict[str, int] = {}
    for k, inst in enumerate(instances):
        if inst.node != settings.node:
            continue
        role = _SIM_ROLE[inst.role]
        iid = f"{settings.machine_id}-{role}-{counts.get(role, 0)}"
        counts[role] = counts.get(role, 0) + 1
        port = settings.base_port + len(out)
        env = {"CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in inst.gpu_ids)}
        sim_model = None
        if settings.engine == "sim":
            sim_model = settings.sim_model or settings.model
            argv = engine_sim_argv(
                sim_model, settings.sim_gpu, served_model_name=settings.name,
                host=settings.host, port=port, tp=inst.tp, pp=inst.pp, role=inst.role, seed=k,
                speed=settings.sim_speed, entry=settings.sim_entry, python=settings.python,
                extra_args=settings.extra_args,
            )  # fmt: skip
        else:
            argv = vllm_argv(
                settings.model, served_model_name=settings.name, host=settings.host, port=port,
                tp=inst.tp, pp=inst.pp, ep=inst.ep, role=inst.role, entry=settings.engine,
                python=settings.python, extra_args=settings.extra_args,
                kv_transfer_config=settings.kv_transfer_config,
            )  # fmt: skip
            if role != "general":
                env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(kv_port)
                kv_port += inst.tp * inst.pp
        launch = EngineLaunch(
            iid, inst.role, tuple(argv), MappingProxyType({**settings.env, **env}),
            settings.reachable_host, port, inst.gpu_ids, inst.tp, inst.pp, inst.ep, inst.node,
            settings.name, settings.engine, sim_model, settings.sim_gpu if sim_model else None,
            settings.host,
        )  # fmt: skip
        out.append(launch)
    if not out:
        nodes = ", ".join(map(str, sorted({inst.node for inst in instances})))
        raise ConfigError(
            f"the plan has no instance on node {settings.node} (its nodes: {nodes})", key="node"
        )
    return out


def fleet_problem(
    engines: Sequence[EngineLaunch], *, pd_enabled: bool = True, others: Sequence[Member] = ()
) -> str | None:
    """Why the engines one launch starts (on one node), with the ``others`` already serving
    their model, could never run a request, or None: PD roles need a prefill and a decode
    instance side by side (:func:`~sage_llm.control_plane.pd.orchestrator.unservable_reason`)."""
    if not engines:
        return None
    members = [(e.instance_id, e.role) for e in engines] + list(others)
    reason = unservable_reason(engines[0].model_name, members, pd_enabled=pd_enabled)
    if reason is None:
        return None
    roles: dict[str, int] = {}
    for e in engines:
        roles[_SIM_ROLE[e.role]] = roles.get(_SIM_ROLE[e.role], 0) + 1
    what = " and ".join(f"{n} {role}" for role, n in roles.items())
    return (
        f"node {engines[0].node} would start only {what} instance{'s' * (len(engines) > 1)}: "
        f"{reason}, so its gateway could never serve a request"
    )


def _check_port_ranges(instances: Sequence[PlannedInstance], settings: LaunchSettings) -> None:
    here = [inst for inst in instances if inst.node == settings.node]
    last = settings.base_port + len(here) - 1
    if last > 65535:
        raise ConfigError(
            f"{len(here)} engines need ports {settings.base_port}-{last}, past 65535",
            key="base_port",
        )
    if settings.engine == "sim":
        return
    kv = sum(i.tp * i.pp for i in here if _SIM_ROLE[i.role] != "general")
    last = settings.kv_base_port + kv - 1
    if kv and last > 65535:
        raise ConfigError(
            f"the PD engines need NIXL side-channel ports {settings.kv_base_port}-{last}, "
            "past 65535",
            key="kv_base_port",
        )
    http = range(settings.base_port, settings.base_port + len(here))
    side = range(settings.kv_base_port, settings.kv_base_port + kv)
    shared = sorted(set(http) & set(side))
    if shared:
        raise ConfigError(
            f"the PD engines' NIXL side-channel ports {side.start}-{side.stop - 1} overlap the "
            f"engines' HTTP ports {http.start}-{http.stop - 1} (port {shared[0]}); move "
            "kv_base_port or base_port",
            key="kv_base_port",
        )


# -- planned instances ---------------------------------------------------------------------

_ROLES = "general, prefill or decode; or prefilling, decoding, hybrid, as plans write them"


def _role_problem(text: str) -> str | None:
    try:
        ExecutionInstanceType.parse(text)
    except ValueError:
        return f"unknown role {text!r} (expected {_ROLES})"
    return None


@dataclass(frozen=True)
class _InstanceEntry:
    """One planned instance as a file writes it (``[[launch.instances]]``, a plan's
    ``instances``); ``link_gbps`` is the link bandwidth ``sage-llm plan --json`` assumed."""

    role: str = opt("general", rule(check=_role_problem))
    tp: int = opt(1, rule(ge=1))
    pp: int = opt(1, rule(ge=1))
    ep: int = opt(1, rule(ge=1))
    gpu_ids: tuple[int, ...] | None = opt(None, rule(ge=0))
    node: int = opt(0, rule(ge=0))
    link_gbps: float = opt(0.0, rule(ge=0))


def _read_instances(entries: object, path: KeyPath, p: Problems) -> list[PlannedInstance] | None:
    """The planned instances of ``entries``; every problem goes to ``p`` (then None)."""
    if isinstance(entries, str | bytes) or not isinstance(entries, Sequence):
        p.add(path, f"must be an array of tables, got {_kind(entries)}")
        return None
    if not entries:
        p.add(path, "has no instances")
        return None
    before = len(p.errors)
    out: list[PlannedInstance] = []
    used = _listed_gpus(entries)  # per machine: the GPUs instances list (or were given)
    for k, entry in enumerate(entries):
        here = (*path, k)
        if not isinstance(entry, Mapping):
            p.add(here, f"must be a table, got {_kind(entry)}")
            continue
        entry_before = len(p.errors)
        read = read_dataclass(_InstanceEntry, entry, here, p)
        if read is None or len(p.errors) > entry_before:
            continue
        taken = used.setdefault(read.node, set())
        gpus = read.gpu_ids
        if gpus is None:  # the machine's lowest GPUs no instance lists (or was given)
            free = (g for g in itertools.count() if g not in taken)
            gpus = tuple(itertools.islice(free, read.tp * read.pp))
        taken.update(gpus)
        if read.ep not in (1, read.tp):
            p.add(
                (*here, "ep"),
                f"must be 1 or tp ({read.tp}), got {read.ep}: vLLM's expert parallelism "
                "spans the instance's tensor-parallel group (EP = TP)",
            )
        elif not gpus:
            p.add((*here, "gpu_ids"), "must be a non-empty list of GPU indices")
        elif len(gpus) != read.tp * read.pp:
            p.add((*here, "gpu_ids"), f"lists {len(gpus)} GPUs but tp × pp = {read.tp * read.pp}")
        elif len(set(gpus)) != len(gpus):
            p.add((*here, "gpu_ids"), f"lists a GPU more than once: {list(gpus)}")
        elif len(p.errors) == before:
            role = ExecutionInstanceType.parse(read.role)
            out.append(
                PlannedInstance(role, read.tp, read.pp, read.ep, gpus, read.node, read.link_gbps)
            )
    return out if len(p.errors) == before else None


def _listed_gpus(entries: Sequence[object]) -> dict[int, set[int]]:
    """The GPUs the entries list explicitly, per machine (``node``): instances without
    ``gpu_ids`` are given others."""
    listed: dict[int, set[int]] = {}
    for entry in entries:
        if not isinstance(entry, Mapping):
            continue
        node, gpus = entry.get("node", 0), entry.get("gpu_ids")
        if isinstance(node, int) and isinstance(gpus, list | tuple):
            listed.setdefault(node, set()).update(g for g in gpus if isinstance(g, int))
    return listed


def planned_instances_from_dicts(
    entries: Sequence[Mapping[str, Any]], *, where: str = "instances"
) -> list[PlannedInstance]:
    """Planned instances from ``{"role", "tp", "pp", "ep", "gpu_ids", "node"}`` tables (the
    plan JSON's ``instances`` or a launch file's ``[[launch.instances]]``). A problem raises
    :class:`ConfigError` whose key is the entry's (``instances[1].tp``); several raise
    :class:`~sage_llm.config.ConfigErrors`."""
    p = Problems("")
    instances = _read_instances(entries, tuple(where.split(".")), p)
    _raise(p)
    assert instances is not None
    return instances


def load_plan_file(path: str | Path) -> tuple[dict[str, Any], list[PlannedInstance]]:
    """A ``sage-llm plan --json`` file: its top-level fields and its planned instances."""
    data, instances, _ = _read_plan_file(Path(path))
    return data, instances


def is_plan_text(text: str) -> bool:
    """Whether a file's ``text`` is a plan (JSON, an object) rather than a TOML launch file
    (for a file without a ``.json`` suffix: one given through a pipe)."""
    return text.removeprefix("\ufeff").lstrip().startswith("{")


def _read_plan_file(
    path: Path, text: str | None = None
) -> tuple[dict[str, Any], list[PlannedInstance], Problems]:
    """:func:`load_plan_file` (of ``text`` when read already), and a :class:`Problems` that
    locates the file's keys (for the problems found later, each at its line)."""
    if text is None:
        text = read_utf8(path, "plan")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:  # at its line, as a TOML file's syntax error
        raise ConfigError(f"invalid JSON: {exc.msg} (column {exc.colno})",
                          location=f"{path}:{exc.lineno}") from None  # fmt: skip
    except ValueError as exc:
        raise ConfigError(f"cannot read plan: {exc}", location=str(path)) from None
    except RecursionError:
        raise ConfigError(f"cannot read plan: {TOO_DEEP}", location=str(path)) from None
    if not isinstance(data, dict) or not isinstance(data.get("instances"), list):
        raise ConfigError("a plan needs an 'instances' list", location=str(path))
    p = Problems(str(path), JsonKeyLocator(text))
    instances = _read_instances(data["instances"], ("instances",), p)
    _raise(p)
    assert instances is not None
    _warn_shared_gpus(instances, ("instances",), p)
    return data, instances, p


def _raise(p: Problems) -> None:
    raise_problems(p.sorted())


def _kind(value: object) -> str:
    """How a file value is named in messages (``integer 1``, ``string '80'``, ``table``)."""
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    for typ, name in ((int, "integer"), (float, "float"), (str, "string")):
        if isinstance(value, typ):
            text = repr(value)
            return f"{name} {text[:40]}…" if len(text) > 40 else f"{name} {text}"
    if isinstance(value, list | tuple):
        return "array"
    return "table" if isinstance(value, Mapping) else type(value).__name__


def _warn_shared_gpus(instances: Sequence[PlannedInstance], path: KeyPath, p: Problems) -> None:
    """Log a warning for each instance listing GPUs of an earlier instance on its machine."""
    owners: dict[tuple[int, int], int] = {}
    for k, inst in enumerate(instances):
        shared: dict[int, list[int]] = {}
        for gpu in inst.gpu_ids:
            first = owners.setdefault((inst.node, gpu), k)
            if first != k:
                shared.setdefault(first, []).append(gpu)
        for first, gpus in shared.items():
            key = (*path, k, "gpu_ids")
            line = p.locator.line_of(key) if p.locator is not None else None
            where = p.source if line is None else f"{p.source}:{line}"
            listed = ", ".join(map(str, gpus))
            what = f"GPU {listed} is" if len(gpus) == 1 else f"GPUs {listed} are"
            log.warning(
                "%s: %s: %s also in %s (node %d): the two engines would share it",
                where, format_key(key), what, format_key((*path, first)), inst.node,
            )  # fmt: skip


# -- launch files ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _LaunchTable:
    """The ``[launch]`` keys that become :class:`LaunchSettings` (``gpu`` is ``sim_gpu``);
    the defaults here are unused: only keys the file gives are passed on."""

    engine: str = opt("sim", rule(choices=ENGINE_KINDS))
    model: str = opt("llama-3-8b", rule(nonempty=True, check=name_problem))
    served_model_name: str | None = opt(None, rule(nonempty=True, check=name_problem))
    sim_model: str | None = opt(None, rule(nonempty=True, check=name_problem))
    gpu: str = opt("h100", rule(nonempty=True))
    sim_speed: float = opt(1.0, rule(gt=0))
    sim_entry: str = opt("module", rule(choices=("module", "script")))
    host: str = opt("127.0.0.1", rule(nonempty=True))
    advertise_host: str | None = opt(None, rule(nonempty=True))
    base_port: int = opt(8100, rule(ge=1, le=65535))
    kv_base_port: int = opt(5600, rule(ge=1, le=65535))
    machine_id: str = opt("local", rule(nonempty=True))
    node: int = opt(0, rule(ge=0))
    python: str = opt("python", rule(nonempty=True))
    extra_args: tuple[str, ...] = ()
    env: dict[str, Any] = field(default_factory=dict)  # values checked: strings
    log_dir: str = opt("sage-llm-logs", rule(nonempty=True))
    health_timeout_s: float = opt(600.0, rule(gt=0))
    health_poll_s: float = opt(0.25, rule(gt=0))
    stop_grace_s: float = opt(10.0, rule(ge=0))
    max_concurrent_requests: int = opt(256, rule(ge=1))
    gpu_memory_gb: float = opt(0.0, rule(ge=0))
    kv_transfer_config: dict[str, Any] = field(default_factory=dict)  # checked by the settings


@dataclass(frozen=True)
class _PlanTable:
    """``[launch.plan]``: the planner's inputs (``gpus``: ``"8xH100"`` or a GPU count)."""

    gpus: Any
    slo_ttft: Any = "2s"  # as sage-llm plan's
    slo_tpot: Any = "50ms"
    prompt_len: int = opt(1024, rule(ge=1))
    output_len: int = opt(256, rule(ge=1))
    prompt_p90: int | None = opt(None, rule(ge=1))
    output_p90: int | None = opt(None, rule(ge=1))
    rate: float | None = opt(None, rule(gt=0))
    allow_pd: bool = True
    per_node: bool = True
    """Only plans each node of which can serve alone: a launch runs one node."""


_SOURCE_KEYS = ("topology_file", "plan_file", "plan", "instances")
_LAUNCH = ("launch",)
_PLAN_GPUS = "launch.plan.gpus"


@dataclass(frozen=True)
class LaunchConfig:
    """What to launch: settings, the planned instances, and the topology and plan if known."""

    settings: LaunchSettings
    instances: list[PlannedInstance]
    topology: Topology | None = None
    plan: Plan | None = None


def process_problems(
    env: object, extra_args: object, engine: object = "sim"
) -> list[tuple[KeyPath, str]]:
    """(key path, problem) of each ``env`` name or value and ``extra_args`` string that an
    engine's process could not be started with (an ``=`` in a name, none, a NUL
    character: the start would fail with a ValueError), or that gives again a variable the
    launcher sets (:data:`MANAGED_ENV`) or a flag it sets on ``engine``'s command line
    (:data:`MANAGED_FLAGS`)."""
    managed = MANAGED_FLAGS["sim" if engine == "sim" else "vllm"]
    found: list[tuple[KeyPath, str]] = []
    if isinstance(env, Mapping):
        for name, value in env.items():
            if not isinstance(name, str) or not name or "=" in name or "\0" in name:
                found.append(
                    (("env",), f"{name!r} is not an environment variable name (no '=', not empty)")
                )
            elif isinstance(value, str) and "\0" in value:
                found.append((("env", name), "must not hold a NUL character"))
            elif name in MANAGED_ENV:
                found.append(
                    (("env", name), f"the launcher sets {name} itself ({MANAGED_ENV[name]})")
                )
    if isinstance(extra_args, list | tuple):
        for index, arg in enumerate(extra_args):
            if isinstance(arg, str) and "\0" in arg:
                found.append((("extra_args", index), f"{arg!r} holds a NUL character"))
            elif isinstance(arg, str) and (flag := _flag(arg)) in managed:
                found.append(
                    (
                        ("extra_args", index),
                        f"{arg!r}: the launcher sets {flag} itself (from the plan and the "
                        "launch settings); given again, the engine would not be the one it "
                        "registers and waits for",
                    )
                )
    return found


MANAGED_ENV: dict[str, str] = {
    "CUDA_VISIBLE_DEVICES": "each engine's planned GPUs, its gpu_ids",
    "VLLM_NIXL_SIDE_CHANNEL_PORT": "a PD engine's, counted from kv_base_port",
}
"""Environment variables the launcher sets on an engine's process: one in ``env`` would be
replaced without a word."""

MANAGED_FLAGS: dict[str, frozenset[str]] = {
    "vllm": frozenset({
        "--host", "--port", "--model", "--served-model-name", "--tensor-parallel-size",
        "-tp", "--pipeline-parallel-size", "-pp",
    }),
    "sim": frozenset({
        "--host", "--port", "--model", "--served-model-name", "--gpu", "--tp", "--pp",
        "--role", "--seed",
    }),
}  # fmt: skip
"""The flags the launcher sets on each kind of engine's command line (:func:`vllm_argv`,
:func:`engine_sim_argv`; a PD role's ``--kv-transfer-config`` is the plan's, and may be
given for a whole-request one): an ``extra_args`` entry may not give them again (vLLM
and engine-sim take the last one)."""


def _flag(arg: str) -> str:
    """``arg``'s option name as the engines read it (``--served_model_name=x`` is
    ``--served-model-name``: vLLM's parser reads ``_`` as ``-``)."""
    name = arg.split("=", 1)[0]
    return name[:2] + name[2:].replace("_", "-") if name.startswith("--") else name


def _add(p: Problems, path: KeyPath, exc: ConfigError) -> None:
    """``exc`` located under ``path`` (plus its key, when it has one and no location)."""
    if exc.location or not exc.key:
        p.add(path, exc.message)
    else:
        p.add((*path, *exc.key.split(".")), exc.message.removeprefix(f"{exc.key}: "))


def _read_settings(table: Mapping[str, Any], base_dir: Path, p: Problems) -> LaunchSettings | None:
    before = len(p.errors)
    engine = table.get("engine", "sim")
    for where, problem in process_problems(table.get("env"), table.get("extra_args"), engine):
        p.add((*_LAUNCH, *where), problem)  # each, whatever else the table's problems
    read = read_dataclass(_LaunchTable, table, _LAUNCH, p, extra_keys=_SOURCE_KEYS)
    if read is None:
        return None
    for name, value in read.env.items():
        if not isinstance(value, str):
            p.add(("launch", "env", name), f"must be a string, got {_kind(value)}")
    if len(p.errors) > before:
        return None
    if read.engine != "sim" and "model" not in table:
        p.add(
            ("launch", "model"),
            f"is required with engine = {read.engine!r}: the model vLLM loads (a Hugging "
            "Face repo id or a local path)",
        )
        return None
    values = {k: getattr(read, k) for k in table if k not in _SOURCE_KEYS}
    if "gpu" in values:
        values["sim_gpu"] = values.pop("gpu")
    # relative to the file, the default as a given one
    values["log_dir"] = base_dir / values.get("log_dir", LaunchSettings.log_dir)
    try:
        return LaunchSettings(**values)
    except ConfigError as exc:
        _add(p, _LAUNCH, exc)
        return None


def _read_topology(table: Mapping[str, Any], base_dir: Path, p: Problems) -> Topology | None:
    if "topology_file" not in table:
        return None
    path = ("launch", "topology_file")
    name = table["topology_file"]
    if not isinstance(name, str):
        p.add(path, f"must be a string, got {_kind(name)}")
        return None
    try:
        topology = parse_topology_text(read_utf8(base_dir / name, "topology file"))
    except ConfigError as exc:
        p.add(path, exc.message)
        return None
    if not topology.gpu_indices:  # e.g. `sage-llm topo --json` of a machine without GPUs
        p.add(path, f"{name} lists no GPUs")
        return None
    return topology


def _read_plan(
    table: object,
    settings: LaunchSettings | None,
    topology: Topology | None,
    p: Problems,
) -> Plan | None:
    """The plan of ``[launch.plan]``; its keys are checked in any case, the planner runs
    only when the file has no problem so far (``settings`` None: ``[launch]`` had some)."""
    plan_now = settings is not None and not p.errors
    path = ("launch", "plan")
    if not isinstance(table, Mapping):
        p.add(path, f"must be a table, got {_kind(table)}")
        return None
    before = len(p.errors)
    read = read_dataclass(_PlanTable, table, path, p)
    if read is None:
        return None
    # As `sage-llm plan`: a plain count is split into nodes by plan() (of the topology's size).
    alloc: int | GPUAllocation
    try:
        if isinstance(read.gpus, str):
            nodes, count, gpu = parse_gpu_text(read.gpus)
            alloc = count if nodes is None else GPUAllocation(nodes, count)
        elif isinstance(read.gpus, int) and not isinstance(read.gpus, bool) and read.gpus >= 1:
            alloc = read.gpus
            if settings is not None:
                try:
                    gpu = get_gpu(settings.sim_gpu)
                except ConfigError as exc:
                    _add(p, _LAUNCH, exc)
        else:
            p.add(
                (*path, "gpus"),
                f"must be COUNTxGPU such as 8xH100, or a GPU count, got {_kind(read.gpus)}",
            )
    except ConfigError as exc:  # the text of `gpus` (its GPU's name among it): said there
        p.add((*path, "gpus"), exc.detail)
    slo: list[float] = []
    for key in ("slo_ttft", "slo_tpot"):
        value = getattr(read, key)
        if not isinstance(value, str):  # a bare number: seconds or milliseconds?
            p.add(
                (*path, key),
                f'must be a duration with its unit such as "2s" or "50ms", got {value!r}',
            )
            continue
        try:
            slo.append(parse_duration(value, key=key))
        except ConfigError as exc:
            _add(p, path, exc)
    if len(p.errors) > before or not plan_now or settings is None:
        return None
    workload = WorkloadProfile(
        read.prompt_len, read.output_len, rate=read.rate, prompt_p90=read.prompt_p90,
        output_p90=read.output_p90,
    )  # fmt: skip
    model = settings.sim_model or settings.model
    try:
        return plan(
            model, alloc, gpu, workload, SLOTarget(*slo), topology, allow_pd=read.allow_pd,
            per_node=read.per_node,
        )  # fmt: skip
    except ConfigError as exc:
        if exc.key == "model" and settings.sim_model is None and settings.engine != "sim":
            # (vLLM loads any model: the plan needs the shape of one the planner knows)
            exc = ConfigError(
                f"{exc.detail}; [launch.plan] plans with a built-in model's shape: set "
                "sim_model to the built-in model closest to it",
                key="model",
            )
        in_plan = exc.key is not None and exc.key in {f.name for f in fields(_PlanTable)}
        _add(p, path if in_plan or exc.key is None else _LAUNCH, exc)
        return None


def plan_settings_problem(settings: LaunchSettings, model: object, gpu: object) -> str | None:
    """What keeps simulated engines of ``settings`` from standing in for a plan made for
    ``model`` on ``gpu`` (another model, or GPU, than the plan's: their shapes were chosen
    for it), or None. A vLLM engine's ``model`` is a path: not compared."""
    if settings.engine != "sim":
        return None
    for what, planned, given, get in (
        ("model", model, settings.sim_model or settings.model, get_model),
        ("GPU", gpu, settings.sim_gpu, get_gpu),
    ):
        if not isinstance(planned, str):
            continue
        try:
            same = get(planned).name == get(given).name
        except ConfigError:
            continue  # an unknown name is said where it is read
        if not same:
            return (
                f"the plan is for the {what} {planned!r} but the launch settings simulate "
                f"{given!r}: give settings of the plan's {what}, or leave them out"
            )
    return None


def load_launch_config(
    path: str | Path,
    settings: LaunchSettings | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    text: str | None = None,
) -> LaunchConfig:
    """Read a launch file (``.toml``, see docs/deployment.md) or a plan file (``.json``);
    ``text``: a launch file's text read already (from a pipe, which reads only once).

    A launch file's ``[launch]`` table holds :class:`LaunchSettings` keys (``gpu`` for
    ``sim_gpu``) and one of ``plan_file``, ``[launch.plan]`` (planner inputs) or
    ``[[launch.instances]]``; ``topology_file`` is saved ``nvidia-smi topo -m`` output. Every
    key is checked as ``sage-llm config check`` checks a cluster file: each problem is a
    :class:`ConfigError` located at ``file:line`` with its dotted key; one raises that
    error, several raise :class:`~sage_llm.config.ConfigErrors`.

    ``settings`` is used for a plan file (default: simulated engines of its model and GPU),
    with ``overrides`` (:class:`LaunchSettings` fields such as ``base_port`` or ``log_dir``)
    replacing its values; a launch file gives those keys itself.
    """
    path = Path(path)
    plan = path.suffix.lower() == ".json" or (text is not None and is_plan_text(text))
    if plan:
        data, instances, located = _read_plan_file(path, text)
        served = data.get("served_model_name")  # the name `sage-llm plan` was given
        if served is None:
            problem = None
        elif isinstance(served, str) and served.strip():
            problem = name_problem(served)
        else:
            problem = f"must be a non-empty string, got {_kind(served)}"
        if problem is not None:  # else dropped, and the engines served under another name
            raise ConfigError(
                problem, location=located.location(("served_model_name",)), key="served_model_name"
            )
        values: dict[str, Any] = dict(overrides or {})
        unknown = sorted(set(values) - {f.name for f in fields(LaunchSettings)})
        if unknown:
            raise ConfigError(f"not LaunchSettings fields: {', '.join(unknown)}", key="overrides")
        if settings is None:
            for key in ("model", "gpu"):  # simulated engines of what the plan was made for
                if not isinstance(data.get(key), str) or not data[key]:
                    raise ConfigError(
                        f"the plan names no {key} (a string); make it again with "
                        "sage-llm plan --json",
                        location=located.location((key,)),
                        key=key,
                    )
            for key, get in (("model", get_model), ("gpu", get_gpu)):
                try:
                    get(data[key])
                except ConfigError as exc:
                    where = located.location((key,))
                    raise ConfigError(exc.detail, location=where, key=key) from None
            values.setdefault("model", data["model"])
            values.setdefault("sim_gpu", data["gpu"])
            served = data.get("served_model_name")  # the name `sage-llm plan` was given
            if isinstance(served, str) and served:
                values.setdefault("served_model_name", served)
            settings = LaunchSettings(**values)
        elif values:
            settings = replace(settings, **values)
        if problem := plan_settings_problem(settings, data.get("model"), data.get("gpu")):
            raise ConfigError(problem, location=str(path), key="model")
        if settings.engine == "sim":  # said now, each shape once, not when the engines exit
            said: set[str] = set()
            model = settings.sim_model or settings.model
            share = _memory_share(settings.extra_args)
            for k, inst in enumerate(instances):
                misfit = placement_problem(
                    model, settings.sim_gpu, tp=inst.tp, pp=inst.pp, gpu_memory_utilization=share
                )
                if misfit is not None and misfit not in said:
                    said.add(misfit)
                    located.add(
                        ("instances", k, "tp"), f"its simulated engine cannot start: {misfit}"
                    )
            _raise(located)
        try:
            engines = engines_from_plan(instances, settings)  # the ports, this node's instances
        except ConfigError as exc:
            raise ConfigError(exc.detail, location=str(path), key=exc.key) from None
        problem = fleet_problem(engines)
        if problem is not None:
            raise ConfigError(
                f"{problem}; plan again with --per-node (each node a fleet of its own, both "
                "roles on every node where the counts allow) or serve every node behind one "
                "gateway",
                location=str(path),
            )
        return LaunchConfig(settings, instances)
    if overrides:
        raise ConfigError(
            "overrides apply to a plan file (.json); a launch file sets these keys itself",
            location=str(path),
        )
    if text is None:
        text = read_utf8(path, "launch file")
    text = text.removeprefix("\ufeff")
    doc = read_toml(text, str(path))
    try:
        locator = KeyLocator(text)
    except RecursionError:
        raise ConfigError(TOO_DEEP, location=str(path)) from None
    p = Problems(str(path), locator)
    config = _from_document(doc, path.parent, p)
    _raise(p)
    assert config is not None
    return config


def _plans_model(
    settings: LaunchSettings, table: Mapping[str, Any], data: Mapping[str, Any], name: str,
    p: Problems,
) -> LaunchSettings:  # fmt: skip
    """Simulated engines of a ``plan_file``'s model: the plan's ``model`` (and the name it
    was planned under, ``served_model_name``) when the launch file gives none; a problem
    at the key when it gives another."""
    planned = data.get("model")
    if not isinstance(planned, str) or not planned:
        return settings
    key = "sim_model" if "sim_model" in table else "model" if "model" in table else None
    if key is None:
        served = data.get("served_model_name")
        name_given = "served_model_name" in table or not isinstance(served, str) or not served
        return replace(
            settings,
            model=planned,
            served_model_name=settings.served_model_name if name_given else served,
        )
    given = settings.sim_model or settings.model
    try:
        same = get_model(given).name == get_model(planned).name
    except ConfigError:  # an unknown name is reported where it is read
        return settings
    if not same:
        p.add(("launch", key), f"{given!r} conflicts with {name}'s model ({planned})")
    return settings


def _check_same_gpu(given: str, planned: str, source: str, p: Problems) -> None:
    """A problem at ``launch.gpu`` when ``given`` is not the GPU the plan is for."""
    try:
        same = get_gpu(given).name == get_gpu(planned).name
    except ConfigError:
        same = given.strip().lower() == planned.strip().lower()
    if not same:
        p.add(("launch", "gpu"), f"{given!r} conflicts with {source} ({planned})")


def _check_sim_specs(table: Mapping[str, Any], settings: LaunchSettings, p: Problems) -> None:
    """Simulated engines need a built-in model and GPU: check them now, not when the first
    engine exits."""
    key = "sim_model" if "sim_model" in table else "model"
    for name, path, get in (
        (settings.sim_model or settings.model, ("launch", key), get_model),
        (settings.sim_gpu, ("launch", "gpu"), get_gpu),
    ):
        try:
            get(name)
        except ConfigError as exc:
            p.add(path, exc.detail)


def _from_document(doc: Mapping[str, Any], base_dir: Path, p: Problems) -> LaunchConfig | None:
    for key in sorted(set(doc) - {"launch"}):
        p.add((key,), "unknown table: a launch file has one [launch] table")
    table = doc.get("launch")
    if not isinstance(table, dict):
        if "launch" in doc:
            p.add(_LAUNCH, f"must be a table, got {_kind(table)}")
        elif len(doc) == 0:
            p.add((), "a launch file has one [launch] table")
        return None
    settings = _read_settings(table, base_dir, p)
    topology = _read_topology(table, base_dir, p)
    if settings is not None and settings.engine == "sim":
        _check_sim_specs(table, settings, p)
    sources = [k for k in ("plan_file", "plan", "instances") if k in table]
    if len(sources) != 1:
        p.add(_LAUNCH, "give exactly one of plan_file, [launch.plan] or [[launch.instances]]")
        return None
    instances: list[PlannedInstance] | None = None
    planned: Plan | None = None
    if sources == ["instances"]:
        instances = _read_instances(table["instances"], ("launch", "instances"), p)
        if instances is not None:
            _warn_shared_gpus(instances, ("launch", "instances"), p)
    elif sources == ["plan_file"]:
        name = table["plan_file"]
        if not isinstance(name, str):
            p.add(("launch", "plan_file"), f"must be a string, got {_kind(name)}")
        else:
            try:
                data, instances = load_plan_file(base_dir / name)
            except ConfigError as exc:
                p.add(("launch", "plan_file"), exc.message)
            else:
                planned_gpu = data.get("gpu")
                if isinstance(planned_gpu, str) and settings is not None:
                    if "gpu" in table:
                        _check_same_gpu(settings.sim_gpu, planned_gpu, f"{name}'s gpu", p)
                    else:  # simulated engines simulate the GPU the plan is for
                        settings = replace(settings, sim_gpu=planned_gpu)
                if settings is not None and settings.engine == "sim":
                    settings = _plans_model(settings, table, data, name, p)
    if sources == ["plan"] and settings is not None and "gpu" in table:
        gpus = table["plan"].get("gpus") if isinstance(table["plan"], Mapping) else None
        with contextlib.suppress(ConfigError):  # a bad gpus is reported where it is read
            if isinstance(gpus, str):
                _check_same_gpu(settings.sim_gpu, parse_gpu_text(gpus)[2].name, _PLAN_GPUS, p)
    if sources == ["plan"]:
        planned = _read_plan(table["plan"], settings, topology, p)
        instances = None if planned is None else list(planned.instances)
        if planned is not None and settings is not None and "gpu" not in table:
            settings = replace(settings, sim_gpu=planned.gpu.name)
    if settings is None or instances is None or p.errors:
        return None
    try:
        engines = engines_from_plan(instances, settings)  # the ports, this machine's instances
    except ConfigError as exc:
        _add(p, _LAUNCH, exc)
    else:
        problem = fleet_problem(engines)
        if problem is not None:
            p.add(("launch", sources[0]), problem)
    _check_shapes(instances, settings, topology, sources[0], p)  # reported beside the ports'
    if p.errors:
        return None
    return LaunchConfig(settings, instances, topology, planned)


def _check_shapes(
    instances: Sequence[PlannedInstance],
    settings: LaunchSettings,
    topology: Topology | None,
    source: str,
    p: Problems,
) -> None:
    """What would stop an engine once started, said now: a simulated engine's model that
    does not fit its GPUs (or a TP size vLLM refuses), a PD instance of vLLM with pipeline
    stages (NIXL does not support them), GPUs this machine's ``topology_file`` lacks. For
    ``[[launch.instances]]`` each at its entry; for a plan, once per shape."""
    said: set[str] = set()

    def add(k: int, key: str, message: str) -> None:
        if source == "instances":
            p.add(("launch", "instances", k, key), message)
        elif message not in said:  # a plan's instances share their shapes
            said.add(message)
            p.add(("launch", source), f"instances[{k}].{key}: {message}")

    known = set(topology.gpu_indices) if topology is not None else set()
    model = settings.sim_model or settings.model
    share = _memory_share(settings.extra_args)
    for k, inst in enumerate(instances):
        if settings.engine == "sim":
            problem = placement_problem(
                model, settings.sim_gpu, tp=inst.tp, pp=inst.pp, gpu_memory_utilization=share
            )
            if problem is not None:
                add(k, "tp", f"its simulated engine cannot start: {problem}")
        elif inst.pp > 1 and inst.role in _PD_ROLES:
            add(
                k,
                "pp",
                f"a {_SIM_ROLE[inst.role]} instance runs with pp = 1: pipeline parallelism is "
                "not among what vLLM's NixlConnector supports",
            )
        unknown = sorted(set(inst.gpu_ids) - known) if known and inst.node == settings.node else []
        if unknown:
            add(
                k,
                "gpu_ids",
                f"GPU(s) {', '.join(map(str, unknown))} are not in topology_file "
                f"(its GPUs: {', '.join(map(str, sorted(known)))})",
            )
