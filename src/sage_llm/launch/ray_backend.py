"""Place planned engines on a Ray cluster (optional extra ``ray``; imported only when used).

Every engine instance gets its own placement group: one CPU bundle for the launcher actor
plus one bundle per GPU of its TP group (``tp × pp`` GPUs), with ``STRICT_PACK`` so the
whole group lands on one node. One probe task per GPU bundle reads the GPU id Ray assigned
(``ray.get_gpu_ids()``); the actor then starts the same command line as the local launcher
on that node with ``CUDA_VISIBLE_DEVICES`` set to those ids, and the driver waits for
``/health`` and registers the instance under the node's IP. Simulated engines need no GPU:
``use_gpus=False`` drops the GPU bundles. A placement group Ray cannot place within
``health_timeout_s`` (the cluster lacks the GPUs, say) fails the launch. A failed or
cancelled launch (Ctrl-C, a second one included) stops what it had started before it
re-raises.

:func:`placement_group_specs` is pure (no Ray needed) so the placement is testable anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp

from sage_llm.control_plane.manager import ControlPlaneManager
from sage_llm.control_plane.topology import InstanceTopology
from sage_llm.errors import ConfigError, EngineError, EngineTimeoutError, NotFoundError
from sage_llm.launch.local import log_tail, shielded_close, wait_healthy
from sage_llm.launch.plan_to_engines import EngineLaunch, LaunchSettings
from sage_llm.types import ExecutionInstance

__all__ = ["PlacementGroupSpec", "RayFleet", "launch_with_ray", "placement_group_specs"]

log = logging.getLogger("sage_llm.launch.ray")


@dataclass(frozen=True)
class PlacementGroupSpec:
    """The Ray placement group of one engine instance: bundle 0 holds the launcher actor's
    CPU, bundles 1… one GPU each (none with ``use_gpus=False``)."""

    name: str
    bundles: tuple[Mapping[str, float], ...]
    strategy: str = "STRICT_PACK"

    @property
    def gpu_bundles(self) -> tuple[int, ...]:
        return tuple(k for k, b in enumerate(self.bundles) if b.get("GPU", 0) > 0)


def placement_group_specs(
    engines: Sequence[EngineLaunch], *, use_gpus: bool = True, cpus_per_engine: float = 1.0
) -> list[PlacementGroupSpec]:
    """One ``STRICT_PACK`` placement group per engine (its TP group on one node)."""
    if cpus_per_engine <= 0:
        raise ConfigError("must be > 0", key="cpus_per_engine")
    specs = []
    for e in engines:
        gpus = tuple({"GPU": 1.0} for _ in range(e.tp * e.pp)) if use_gpus else ()
        specs.append(
            PlacementGroupSpec(f"sage-llm-{e.instance_id}", ({"CPU": cpus_per_engine}, *gpus))
        )
    return specs


class _EngineActor:
    """Runs one engine process on the node Ray placed it on (wrapped by ``ray.remote``)."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = ""

    def start(self, argv: list[str], env: dict[str, str], log_path: str) -> dict[str, Any]:
        path = Path(log_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as fh:  # this run's log only
            self.proc = subprocess.Popen(
                argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **env}, process_group=0,
            )  # fmt: skip
        self.log_path = log_path
        return {"pid": self.proc.pid, "host": _node_ip()}

    def poll(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def log_tail(self) -> str:
        return log_tail(Path(self.log_path))

    def stop(self, grace_s: float) -> int | None:
        if self.proc is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.wait()


def _node_ip() -> str:
    try:
        ray = importlib.import_module("ray")
        return str(ray.util.get_node_ip_address())
    except Exception:
        return socket.gethostbyname(socket.gethostname())


def _gpu_ids() -> list[str]:
    ray = importlib.import_module("ray")
    return [str(g) for g in ray.get_gpu_ids()]


def _import_ray() -> Any:
    try:
        return importlib.import_module("ray")
    except ImportError:
        raise ConfigError(
            "the Ray backend needs the 'ray' extra: pip install 'sage-llm[ray]'", key="backend"
        ) from None


@dataclass
class RayFleet:
    """Engines running as Ray actors; ``aclose`` stops them and frees their placement groups."""

    ray: Any
    actors: list[Any] = field(default_factory=list)
    groups: list[Any] = field(default_factory=list)
    launches: list[EngineLaunch] = field(default_factory=list)
    instances: list[ExecutionInstance] = field(default_factory=list)
    manager: ControlPlaneManager | None = None
    stop_grace_s: float = 10.0
    closed: bool = False

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.manager is not None:
            for inst in self.instances:
                with contextlib.suppress(NotFoundError):
                    self.manager.unregister_instance(inst.instance_id)
        refs = [a.stop.remote(self.stop_grace_s) for a in self.actors]
        with contextlib.suppress(Exception):
            await asyncio.gather(*refs)
        for actor in self.actors:
            with contextlib.suppress(Exception):
                self.ray.kill(actor)
        for pg in self.groups:
            with contextlib.suppress(Exception):
                self.ray.util.remove_placement_group(pg)

    async def __aenter__(self) -> RayFleet:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await shielded_close(self)


async def launch_with_ray(
    engines: Sequence[EngineLaunch],
    *,
    manager: ControlPlaneManager | None = None,
    settings: LaunchSettings | None = None,
    use_gpus: bool = True,
    address: str | None = None,
) -> RayFleet:
    """Start ``engines`` as Ray actors (connecting to ``address`` or the running Ray, or
    starting a local one), wait for health, register with ``manager``."""
    ray = _import_ray()
    settings = settings or LaunchSettings()
    if not ray.is_initialized():
        await asyncio.to_thread(
            ray.init, address=address, include_dashboard=False, log_to_driver=False
        )
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    actor_cls = ray.remote(num_cpus=0)(_EngineActor)
    probe = ray.remote(num_gpus=1, num_cpus=0)(_gpu_ids)
    fleet = RayFleet(ray, manager=manager, stop_grace_s=settings.stop_grace_s)
    try:
        async with aiohttp.ClientSession() as session:
            for spec, launch in zip(
                placement_group_specs(engines, use_gpus=use_gpus), engines, strict=True
            ):
                pg = placement_group(
                    [dict(b) for b in spec.bundles], strategy=spec.strategy, name=spec.name
                )
                fleet.groups.append(pg)
                try:
                    async with asyncio.timeout(settings.health_timeout_s):
                        await pg.ready()
                except TimeoutError:  # Ray waits for resources the cluster may never have
                    need = " + ".join(f"{k} {v:g}" for b in spec.bundles for k, v in b.items())
                    have = ray.cluster_resources()
                    has = ", ".join(f"{k} {have.get(k, 0):g}" for k in ("CPU", "GPU"))
                    raise EngineTimeoutError(
                        f"instance {launch.instance_id!r}: Ray could not place its placement "
                        f"group ({need}, {spec.strategy}) within {settings.health_timeout_s:g} s; "
                        f"the cluster has {has} in all (use_gpus=False for simulated engines)",
                        instance_id=launch.instance_id, retryable=False,
                    ) from None  # fmt: skip
                env = dict(launch.env)
                if spec.gpu_bundles:
                    on = [PlacementGroupSchedulingStrategy(pg, k) for k in spec.gpu_bundles]
                    ids = await asyncio.gather(
                        *(probe.options(scheduling_strategy=s).remote() for s in on)
                    )
                    env["CUDA_VISIBLE_DEVICES"] = ",".join(i for found in ids for i in found)
                actor = actor_cls.options(
                    scheduling_strategy=PlacementGroupSchedulingStrategy(pg, 0), num_cpus=0
                ).remote()
                fleet.actors.append(actor)
                log_path = str((settings.log_dir / f"{launch.instance_id}.log").resolve())
                info = await actor.start.remote(list(launch.argv), env, log_path)
                # A wildcard bind is reached at the node's IP; a loopback one only locally.
                # Either way the instance runs on that node (its machine_id).
                node_ip = str(info["host"])
                host = node_ip if settings.host in ("0.0.0.0", "::", "") else launch.host
                placed = replace(launch, host=host, env=env)
                fleet.launches.append(placed)

                async def exited(a: Any = actor) -> int | None:
                    code: int | None = await a.poll.remote()
                    return code

                try:
                    await wait_healthy(
                        f"{placed.base_url}/health", exited=exited, session=session,
                        timeout_s=settings.health_timeout_s, poll_s=settings.health_poll_s,
                    )  # fmt: skip
                except EngineError as exc:  # the log is on the engine's node: the actor reads it
                    tail = await actor.log_tail.remote()
                    raise type(exc)(
                        f"instance {launch.instance_id!r} {exc.message}; end of {log_path} on "
                        f"{node_ip}:\n{tail}",
                        instance_id=launch.instance_id, retryable=False,
                    ) from None  # fmt: skip
                inst = placed.to_instance(
                    InstanceTopology(
                        machine_id=node_ip, nvlink_domain=None, numa_node=None, nvlink_peers=[]
                    ),
                    max_concurrent_requests=settings.max_concurrent_requests,
                    gpu_memory_gb=settings.gpu_memory_gb,
                    metadata={"pid": info["pid"], "log": log_path, "backend": "ray"},
                )
                if manager is not None:
                    manager.register_instance(inst)
                fleet.instances.append(inst)
    except BaseException:
        await shielded_close(fleet)
        raise
    return fleet
