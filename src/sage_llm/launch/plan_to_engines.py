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

import json
import shlex
import sys
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from sage_llm.control_plane.parallelism import (
    GPUAllocation,
    Plan,
    PlannedInstance,
    SLOTarget,
    WorkloadProfile,
    parse_duration,
    parse_gpus,
    plan,
)
from sage_llm.control_plane.topology import InstanceTopology, Topology, parse_nvidia_smi_topo
from sage_llm.errors import ConfigError
from sage_llm.sim.specs import get_gpu
from sage_llm.types import ExecutionInstance, ExecutionInstanceType

__all__ = [
    "ENGINE_KINDS",
    "KV_TRANSFER_CONFIG",
    "EngineLaunch",
    "LaunchConfig",
    "LaunchSettings",
    "engine_sim_argv",
    "engines_from_plan",
    "load_launch_config",
    "load_plan_file",
    "planned_instances_from_dicts",
    "vllm_argv",
]

ENGINE_KINDS = ("vllm", "vllm-module", "sim")
KV_TRANSFER_CONFIG = json.dumps(
    {"kv_connector": "NixlConnector", "kv_role": "kv_both"}, separators=(",", ":")
)
"""The ``--kv-transfer-config`` value for PD roles (REFERENCE.md §2)."""
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
    served_model_name: str | None = None
    sim_model: str | None = None
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
        for key in ("base_port", "kv_base_port"):
            if not 1 <= getattr(self, key) <= 65535:
                raise ConfigError(f"must be a port (1-65535), got {getattr(self, key)}", key=key)
        for key in ("health_timeout_s", "health_poll_s", "sim_speed"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"must be > 0, got {getattr(self, key)}", key=key)
        if self.stop_grace_s < 0 or self.max_concurrent_requests < 1 or self.node < 0:
            raise ConfigError("stop_grace_s, node must be >= 0 and max_concurrent_requests >= 1")
        if not self.machine_id:
            raise ConfigError("must not be empty", key="machine_id")
        object.__setattr__(self, "env", MappingProxyType(dict(self.env)))
        object.__setattr__(self, "extra_args", tuple(self.extra_args))
        object.__setattr__(self, "log_dir", Path(self.log_dir))

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

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

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
        )


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
) -> list[str]:
    """A vLLM OpenAI server command line (``vllm serve`` or the API-server module)."""
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
        argv += ["--kv-transfer-config", KV_TRANSFER_CONFIG]
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
    """The engines of ``instances`` planned on machine ``settings.node``, in plan order."""
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
            )  # fmt: skip
            if role != "general":
                env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(kv_port)
                kv_port += inst.tp * inst.pp
        launch = EngineLaunch(
            iid, inst.role, tuple(argv), MappingProxyType({**settings.env, **env}),
            settings.reachable_host, port, inst.gpu_ids, inst.tp, inst.pp, inst.ep, inst.node,
            settings.name, settings.engine, sim_model, settings.sim_gpu if sim_model else None,
        )  # fmt: skip
        out.append(launch)
    if not out:
        raise ConfigError(f"the plan has no instance on node {settings.node}", key="node")
    return out


def _int_list(value: object, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError("must be a non-empty list of GPU indices", key=where)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise ConfigError(f"GPU indices must be integers >= 0, got {value!r}", key=where)
    return tuple(value)


def _count(entry: Mapping[str, Any], key: str, where: str, default: int) -> int:
    value = entry.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "node" else 1):
        raise ConfigError(
            f"must be an integer >= 1 (node >= 0), got {value!r}", key=f"{where}.{key}"
        )
    return value


def planned_instances_from_dicts(
    entries: Sequence[Mapping[str, Any]], *, where: str = "instances"
) -> list[PlannedInstance]:
    """Planned instances from ``{"role", "tp", "pp", "ep", "gpu_ids", "node"}`` tables (the
    plan JSON's ``instances`` or a launch file's ``[[launch.instances]]``)."""
    allowed = {"role", "tp", "pp", "ep", "gpu_ids", "node", "link_gbps"}
    out: list[PlannedInstance] = []
    for k, entry in enumerate(entries):
        here = f"{where}[{k}]"
        if not isinstance(entry, Mapping):
            raise ConfigError("must be a table", key=here)
        unknown = sorted(set(entry) - allowed)
        if unknown:
            raise ConfigError(
                f"unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})",
                key=here,
            )
        try:
            role = ExecutionInstanceType.parse(str(entry.get("role", "general")))
        except ValueError as exc:
            raise ConfigError(str(exc), key=f"{here}.role") from None
        tp, pp = _count(entry, "tp", here, 1), _count(entry, "pp", here, 1)
        gpus = _int_list(entry.get("gpu_ids", list(range(tp * pp))), f"{here}.gpu_ids")
        if len(gpus) != tp * pp:
            raise ConfigError(
                f"lists {len(gpus)} GPUs but tp × pp = {tp * pp}", key=f"{here}.gpu_ids"
            )
        out.append(
            PlannedInstance(
                role, tp, pp, _count(entry, "ep", here, 1), gpus, _count(entry, "node", here, 0)
            )
        )
    if not out:
        raise ConfigError("no instances", key=where)
    return out


def load_plan_file(path: str | Path) -> tuple[dict[str, Any], list[PlannedInstance]]:
    """A ``sage-llm plan --json`` file: its top-level fields and its planned instances."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read plan: {exc}", location=str(path)) from None
    if not isinstance(data, dict) or not isinstance(data.get("instances"), list):
        raise ConfigError("a plan needs an 'instances' list", location=str(path))
    try:
        return data, planned_instances_from_dicts(data["instances"])
    except ConfigError as exc:
        raise ConfigError(exc.message, location=str(path)) from None


# -- launch files ------------------------------------------------------------------------------

_SETTING_TYPES: Mapping[str, type | tuple[type, ...]] = MappingProxyType({
    "engine": str, "model": str, "served_model_name": str, "sim_model": str, "gpu": str,
    "sim_speed": (int, float), "sim_entry": str, "host": str, "advertise_host": str,
    "base_port": int, "kv_base_port": int, "machine_id": str, "node": int, "python": str,
    "extra_args": list, "env": dict, "log_dir": str, "health_timeout_s": (int, float),
    "health_poll_s": (int, float), "stop_grace_s": (int, float),
    "max_concurrent_requests": int, "gpu_memory_gb": (int, float),
})  # fmt: skip
_PLAN_KEYS: Mapping[str, type | tuple[type, ...]] = MappingProxyType({
    "gpus": (str, int), "slo_ttft": (str, int, float), "slo_tpot": (str, int, float),
    "prompt_len": int, "output_len": int, "prompt_p90": int, "output_p90": int,
    "rate": (int, float), "allow_pd": bool,
})  # fmt: skip
_FILE_KEYS = ("topology_file", "plan_file", "plan", "instances")


@dataclass(frozen=True)
class LaunchConfig:
    """What to launch: settings, the planned instances, and the topology and plan if known."""

    settings: LaunchSettings
    instances: list[PlannedInstance]
    topology: Topology | None = None
    plan: Plan | None = None


def _check_type(table: Mapping[str, Any], types: Mapping[str, Any], where: str) -> None:
    for key, value in table.items():
        if key not in types:
            allowed = ", ".join(sorted(types))
            raise ConfigError(f"unknown key (allowed: {allowed})", key=f"{where}.{key}")
        want = types[key]
        bad_bool = isinstance(value, bool) and want is not bool
        if bad_bool or not isinstance(value, want):
            raise ConfigError(f"wrong type {type(value).__name__}", key=f"{where}.{key}")


def _settings(table: Mapping[str, Any], base_dir: Path) -> LaunchSettings:
    _check_type({k: v for k, v in table.items() if k not in _FILE_KEYS}, _SETTING_TYPES, "launch")
    values = {k: v for k, v in table.items() if k in _SETTING_TYPES}
    if "gpu" in values:
        values["sim_gpu"] = values.pop("gpu")
    if "extra_args" in values:
        args = values["extra_args"]
        if not all(isinstance(a, str) for a in args):
            raise ConfigError("must be a list of strings", key="launch.extra_args")
        values["extra_args"] = tuple(args)
    if "env" in values and not all(isinstance(v, str) for v in values["env"].values()):
        raise ConfigError("values must be strings", key="launch.env")
    if "log_dir" in values:
        values["log_dir"] = base_dir / values["log_dir"]
    try:
        return LaunchSettings(**values)
    except ConfigError as exc:
        raise ConfigError(
            exc.message.removeprefix(f"{exc.key}: "), key=f"launch.{exc.key}"
        ) from None


def _planned(table: Mapping[str, Any], settings: LaunchSettings, topology: Topology | None) -> Plan:
    _check_type(table, _PLAN_KEYS, "launch.plan")
    for key in ("gpus", "slo_ttft", "slo_tpot"):
        if key not in table:
            raise ConfigError("required to plan the fleet", key=f"launch.plan.{key}")
    gpus = table["gpus"]
    if isinstance(gpus, str):
        alloc, gpu = parse_gpus(gpus)
    else:
        alloc, gpu = GPUAllocation(1, gpus), get_gpu(settings.sim_gpu)
    workload = WorkloadProfile(
        table.get("prompt_len", 1024), table.get("output_len", 256), rate=table.get("rate"),
        prompt_p90=table.get("prompt_p90"), output_p90=table.get("output_p90"),
    )  # fmt: skip
    slo = SLOTarget(
        parse_duration(table["slo_ttft"], key="launch.plan.slo_ttft"),
        parse_duration(table["slo_tpot"], key="launch.plan.slo_tpot"),
    )
    model = settings.sim_model or settings.model
    return plan(model, alloc, gpu, workload, slo, topology, allow_pd=table.get("allow_pd", True))


def load_launch_config(path: str | Path, settings: LaunchSettings | None = None) -> LaunchConfig:
    """Read a launch file (``.toml``, see docs/deployment.md) or a plan file (``.json``).

    A launch file's ``[launch]`` table holds :class:`LaunchSettings` keys (``gpu`` for
    ``sim_gpu``) and one of ``plan_file``, ``[launch.plan]`` (planner inputs) or
    ``[[launch.instances]]``; ``topology_file`` is saved ``nvidia-smi topo -m`` output.
    ``settings`` is used for a plan file (default: simulated engines of its model and GPU).
    """
    path = Path(path)
    if path.suffix == ".json":
        data, instances = load_plan_file(path)
        base = settings or LaunchSettings(
            model=str(data.get("model", "llama-3-8b")), sim_gpu=str(data.get("gpu", "h100"))
        )
        return LaunchConfig(base, instances)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read launch file: {exc}", location=str(path)) from None
    try:
        return _from_document(doc, path.parent)
    except ConfigError as exc:
        raise ConfigError(exc.message, location=str(path)) from None


def _from_document(doc: Mapping[str, Any], base_dir: Path) -> LaunchConfig:
    extra = sorted(set(doc) - {"launch"})
    if extra or not isinstance(doc.get("launch"), dict):
        raise ConfigError("a launch file has one [launch] table", key=",".join(extra) or "launch")
    table = doc["launch"]
    settings = _settings(table, base_dir)
    topology = None
    if "topology_file" in table:
        topo_path = base_dir / str(table["topology_file"])
        try:
            topology = parse_nvidia_smi_topo(topo_path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read: {exc}", key="launch.topology_file") from None
    sources = [k for k in ("plan_file", "plan", "instances") if k in table]
    if len(sources) != 1:
        raise ConfigError(
            "give exactly one of plan_file, [launch.plan] or [[launch.instances]]", key="launch"
        )
    if sources == ["plan_file"]:
        _, instances = load_plan_file(base_dir / str(table["plan_file"]))
        return LaunchConfig(settings, instances, topology)
    if sources == ["instances"]:
        entries = table["instances"]
        if not isinstance(entries, list):
            raise ConfigError("must be an array of tables", key="launch.instances")
        return LaunchConfig(
            settings, planned_instances_from_dicts(entries, where="launch.instances"), topology
        )
    if not isinstance(table["plan"], dict):
        raise ConfigError("must be a table", key="launch.plan")
    result = _planned(table["plan"], settings, topology)
    return LaunchConfig(settings, list(result.instances), topology, result)
