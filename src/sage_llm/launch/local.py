"""Start planned engines as local processes, wait for health, register, stop cleanly.

Before starting anything, the launcher checks that every engine's port is free (nothing
answers on it, and it can be bound): a port another process holds would make the engine
fail while the stranger answered its health checks. Each engine runs as an asyncio
subprocess in its own process group (so a terminal's Ctrl-C reaches the launcher, which then
stops the engines in order), with stdout and stderr in ``<log_dir>/<instance_id>.log``
(truncated at each start, so it holds this run only, beginning with the command line).
The launcher polls ``GET /health`` until it answers 200 while the engine still runs (an
engine that has exited by then, or before the launch is done, fails the launch with the end
of its log) and, on Linux, holds the socket listening on its port (a stranger that took the
port after the check, say an engine of a launch started at the same time, fails the launch
instead of answering for an engine that could not bind), then registers an
:class:`~sage_llm.types.ExecutionInstance` per engine with the control plane, with the
``machine_id`` / ``nvlink_domain`` / ``numa_node`` that
:func:`~sage_llm.control_plane.topology.assign_instance_topology` gives its GPUs.

Once the fleet runs, an engine that exits is logged at once (a warning naming the instance,
its exit code and its log); it is not restarted, and health checks eject its instance.
:meth:`LaunchedFleet.aclose` unregisters the instances, sends SIGTERM to every process
group, waits ``stop_grace_s`` and sends SIGKILL to what is left. A failed or cancelled
launch (Ctrl-C) stops whatever it had started before it re-raises::

    async with ControlPlaneManager(mode="http") as cp:
        async with await launch_from_config("fleet.toml", manager=cp) as fleet:
            ...  # serve; leaving the block stops the engines
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Protocol
from urllib.parse import urlsplit

import aiohttp

from sage_llm.control_plane.manager import ControlPlaneManager
from sage_llm.control_plane.parallelism import Plan
from sage_llm.control_plane.topology import (
    InstanceTopology,
    Topology,
    assign_instance_topology,
    detect_topology_async,
)
from sage_llm.errors import ConfigError, EngineError, EngineTimeoutError, NotFoundError
from sage_llm.launch.plan_to_engines import (
    EngineLaunch,
    LaunchConfig,
    LaunchSettings,
    engines_from_plan,
    fleet_problem,
    load_launch_config,
    plan_settings_problem,
)
from sage_llm.orphans import dies_with_parent
from sage_llm.types import ExecutionInstance

__all__ = [
    "EngineProcess",
    "LaunchedFleet",
    "launch_engines",
    "launch_from_config",
    "log_tail",
    "wait_healthy",
]

log = logging.getLogger("sage_llm.launch")
_TAIL_BYTES = 4000


def _open_log(path: Path, header: str) -> IO[bytes]:
    """A fresh log (an earlier run's is truncated), starting with ``header``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = path.open("wb")
    fh.write(header.encode())
    fh.flush()
    return fh


def log_tail(path: Path) -> str:
    """The end of a log file (its last few KB, decoded leniently); "" when unreadable."""
    try:
        with path.open("rb") as fh:
            fh.seek(max(0, path.stat().st_size - _TAIL_BYTES))
            return fh.read().decode(errors="replace").strip()
    except OSError:
        return ""


async def wait_healthy(
    url: str,
    *,
    exited: Callable[[], Awaitable[int | None]],
    timeout_s: float,
    poll_s: float = 0.25,
    session: aiohttp.ClientSession | None = None,
    holds_port: Callable[[], Awaitable[bool | None]] | None = None,
) -> None:
    """Poll ``url`` (``…/health``) until it answers 200 while the engine still runs.
    ``exited`` returns the exit code once the engine has died (None while it runs): then
    EngineError, even when something answered at ``url``; after ``timeout_s``,
    EngineTimeoutError. ``holds_port`` tells, once ``url`` answered, whether the engine
    holds the socket listening on its port (None: cannot tell): False is an EngineError,
    another process answered."""
    own = session is None
    http = session or aiohttp.ClientSession()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    probe = aiohttp.ClientTimeout(total=max(poll_s * 4, 1.0))
    last = "no answer yet"
    try:
        while True:
            code = await exited()
            if code is not None:
                raise EngineError(f"exited with code {code} before it was healthy", retryable=False)
            healthy = False
            try:
                async with http.get(url, timeout=probe) as resp:
                    healthy = resp.status == 200
                    last = f"HTTP {resp.status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                last = " ".join(str(exc).split()) or type(exc).__name__
            if healthy:
                code = await exited()  # whoever answered, a dead engine is no engine
                if code is not None:
                    raise EngineError(
                        f"exited with code {code} before it was healthy", retryable=False
                    )
                if holds_port is not None and await holds_port() is False:
                    raise EngineError(
                        f"does not hold its port {urlsplit(url).port}: another process listens "
                        f"there and answered GET {url}",
                        retryable=False,
                    )
                return
            left = deadline - loop.time()
            if left <= 0:
                raise EngineTimeoutError(
                    f"not healthy after {timeout_s:g} s (GET {url}: {last})", retryable=False
                )
            await asyncio.sleep(min(poll_s, left))  # the deadline bounds the wait
    finally:
        if own:
            await http.close()


@dataclass
class EngineProcess:
    """One started engine: its launch record, process and log file."""

    launch: EngineLaunch
    process: asyncio.subprocess.Process
    log_path: Path
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    async def exited(self) -> int | None:
        """The exit code once the process has exited, even before the event loop has
        reaped it (None while it runs)."""
        if self.process.returncode is None and not _has_exited(self.process.pid):
            return None
        return await self.process.wait()

    async def holds_port(self) -> bool | None:
        """Whether this process, its process group or a descendant holds the socket
        listening on the engine's port (None: cannot tell, e.g. no ``/proc``)."""
        return await asyncio.to_thread(_holds_port, self.process.pid, self.launch.port)

    def log_tail(self) -> str:
        return log_tail(self.log_path)

    def _signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)

    async def stop(self, grace_s: float) -> int:
        """SIGTERM the process group, SIGKILL it after ``grace_s``; the exit code."""
        try:
            if self.process.returncode is None:
                self._signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(self.process.wait(), grace_s)
                except TimeoutError:
                    log.warning(
                        "%s ignored SIGTERM for %g s; killing", self.launch.instance_id, grace_s
                    )
            self._signal(signal.SIGKILL)  # also any child the engine left in its group
            return await self.process.wait()
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None


async def _spawn(launch: EngineLaunch, log_dir: Path) -> EngineProcess:
    path = log_dir / f"{launch.instance_id}.log"
    try:
        fh = await asyncio.to_thread(_open_log, path, f"$ {launch.shell()}\n")
    except OSError as exc:
        raise EngineError(
            f"instance {launch.instance_id!r}: cannot write its log {path}: {exc.strerror or exc}",
            instance_id=launch.instance_id, retryable=False,
        ) from None  # fmt: skip
    try:
        env = {**os.environ, **launch.env}
        proc = await asyncio.create_subprocess_exec(
            # no engine is left behind if launch itself is killed
            *dies_with_parent(launch.argv, path=env.get("PATH", "")),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=fh,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            process_group=0,
        )
    except (OSError, ValueError) as exc:  # (ValueError: a NUL or '=' in env or argv)
        fh.close()
        raise EngineError(
            f"instance {launch.instance_id!r}: cannot start {launch.argv[0]!r}: {exc}",
            instance_id=launch.instance_id, retryable=False,
        ) from None  # fmt: skip
    log.info("started %s (pid %d): %s", launch.instance_id, proc.pid, launch.shell())
    return EngineProcess(launch, proc, path, fh)


@dataclass
class LaunchedFleet:
    """Running engines and the instances registered for them. ``aclose`` stops everything."""

    processes: list[EngineProcess] = field(default_factory=list)
    instances: list[ExecutionInstance] = field(default_factory=list)
    manager: ControlPlaneManager | None = None
    stop_grace_s: float = 10.0
    closed: bool = False
    _watchers: list[asyncio.Task[None]] = field(default_factory=list, repr=False)

    def watch(self) -> None:
        """Log a warning as soon as an engine exits before :meth:`aclose` (it is not
        restarted; health checks eject its instance)."""
        self._watchers += [
            asyncio.create_task(self._watch(p), name=f"watch {p.launch.instance_id}")
            for p in self.processes
        ]

    async def _watch(self, proc: EngineProcess) -> None:
        code = await proc.process.wait()
        if self.closed:
            return
        how = f"code {code}"
        if code < 0 and -code in signal.valid_signals():
            how += f" ({signal.Signals(-code).name})"
        log.warning(
            "engine %s (pid %d) exited with %s while serving; it is not restarted and health "
            "checks will eject it; its log: %s",
            proc.launch.instance_id, proc.pid, how, proc.log_path,
        )  # fmt: skip

    @property
    def base_urls(self) -> list[str]:
        return [p.launch.base_url for p in self.processes]

    def describe(self) -> str:
        return "\n".join(
            f"{p.launch.instance_id}: {p.launch.base_url} pid {p.pid} ({p.log_path})"
            for p in self.processes
        )

    async def aclose(self) -> None:
        """Unregister the instances, then stop every engine (TERM, then KILL after grace)."""
        if self.closed:
            return
        self.closed = True
        for task in self._watchers:
            task.cancel()
        if self.manager is not None:
            for inst in self.instances:
                with contextlib.suppress(NotFoundError):
                    self.manager.unregister_instance(inst.instance_id)
        codes = await asyncio.gather(*(p.stop(self.stop_grace_s) for p in self.processes))
        for p, code in zip(self.processes, codes, strict=True):
            log.info("stopped %s (exit code %s)", p.launch.instance_id, code)

    async def __aenter__(self) -> LaunchedFleet:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await shielded_close(self)


class Closable(Protocol):
    """A fleet of launched engines: ``aclose()`` stops them."""

    async def aclose(self) -> None: ...


async def shielded_close(fleet: Closable) -> None:
    """Close even when the caller is cancelled again (a second Ctrl-C) while closing."""
    task = asyncio.ensure_future(fleet.aclose())
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise


def _topology_fields(
    engines: Sequence[EngineLaunch], topology: Topology, machine_id: str
) -> dict[str, InstanceTopology]:
    groups = {e.instance_id: list(e.gpu_ids) for e in engines}
    return assign_instance_topology(topology, groups, machine_id)


async def launch_engines(
    engines: Sequence[EngineLaunch],
    *,
    manager: ControlPlaneManager | None = None,
    settings: LaunchSettings | None = None,
    topology: Topology | None = None,
) -> LaunchedFleet:
    """Check that their ports are free, start ``engines``, wait until all are healthy,
    register them with ``manager``. EngineError (naming the instance) when a port is taken
    or an engine fails to start; what was started is stopped first."""
    settings = settings or LaunchSettings()
    fields = _topology_fields(engines, topology or Topology(), settings.machine_id)
    for launch in engines:
        problem = await asyncio.to_thread(_launch_problem, launch, settings.log_dir)
        if problem is not None:
            raise EngineError(
                f"instance {launch.instance_id!r}: {problem}",
                instance_id=launch.instance_id, retryable=False,
            )  # fmt: skip
    fleet = LaunchedFleet(manager=manager, stop_grace_s=settings.stop_grace_s)
    try:
        for launch in engines:
            fleet.processes.append(await _spawn(launch, settings.log_dir))
        async with aiohttp.ClientSession() as session, asyncio.TaskGroup() as tg:
            for proc in fleet.processes:
                tg.create_task(_healthy(proc, settings, session))
        for proc in fleet.processes:
            if await proc.exited() is not None:  # healthy once, dead before the others were
                tail = await asyncio.to_thread(proc.log_tail)
                raise EngineError(
                    f"instance {proc.launch.instance_id!r} exited with code {proc.returncode} "
                    f"during the launch; end of {proc.log_path}:\n{tail}",
                    instance_id=proc.launch.instance_id, retryable=False,
                )  # fmt: skip
        for proc in fleet.processes:
            inst = proc.launch.to_instance(
                fields[proc.launch.instance_id],
                max_concurrent_requests=settings.max_concurrent_requests,
                gpu_memory_gb=settings.gpu_memory_gb,
                metadata={"pid": proc.pid, "log": str(proc.log_path)},
            )
            if manager is not None:
                manager.register_instance(inst)
            fleet.instances.append(inst)
        fleet.watch()
    except BaseException as exc:
        await shielded_close(fleet)
        if isinstance(exc, BaseExceptionGroup):
            first = exc.exceptions[0]
            if isinstance(first, Exception):
                raise first from None
        raise
    return fleet


def _launch_problem(launch: EngineLaunch, log_dir: Path) -> str | None:
    """Why ``launch`` cannot start (None: nothing found): its log file cannot be written, or
    a port it binds (HTTP, NIXL side channel) is taken. Checked before any engine starts."""
    problem = _log_problem(log_dir / f"{launch.instance_id}.log")
    if problem is not None:
        return problem
    for port in (launch.port, *launch.side_channel_ports):
        problem = _port_problem(launch, port)
        if problem is not None:
            return problem if port == launch.port else f"NIXL side-channel {problem}"
    return None


def _log_problem(path: Path) -> str | None:
    """Why the log file ``path`` cannot be written (None: it can), found by making it, and
    its missing directories, and removing what was made."""
    made: list[Path] = []
    try:
        for parent in reversed(path.parents):
            if not parent.exists():
                parent.mkdir()
                made.append(parent)
        existed = path.exists()
        with path.open("ab"):
            pass
        if not existed:
            path.unlink()
    except OSError as exc:
        return f"cannot write its log {path}: {exc.strerror or exc}"
    finally:
        for parent in reversed(made):
            with contextlib.suppress(OSError):
                parent.rmdir()
    return None


def _port_problem(launch: EngineLaunch, port: int | None = None) -> str | None:
    """Why ``port`` (default: ``launch``'s) is not free (None: it looks free). Something
    that accepts connections where the health check goes would answer for an engine that
    failed to bind; a port that cannot be bound (EADDRINUSE) would make the engine fail."""
    port = launch.port if port is None else port
    taken = f"port {port} on {{}} is already in use (another process holds it)"
    with (
        contextlib.suppress(OSError),
        socket.create_connection((launch.host, port), timeout=1.0),
    ):
        return taken.format(launch.host)
    host = launch.host if launch.bind_host is None else launch.bind_host
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind
            sock.bind(address)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return taken.format(host or "*")
    return None


def _has_exited(pid: int) -> bool:
    """Whether child ``pid`` has exited, looked at without reaping it (the event loop's child
    watcher does that, and sets the returncode only when the loop next runs)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # reaped already: the returncode is on its way
        return True
    except (AttributeError, OSError):  # no waitid here
        return False


def _holds_port(pid: int, port: int) -> bool | None:
    """Whether a socket listening on TCP ``port`` is open in process ``pid``, a process of
    its group or a descendant (None: cannot tell: no ``/proc/net/tcp``, or nothing listens
    on ``port``), from the socket inodes in ``/proc/net/tcp{,6}`` and ``/proc/PID/fd``."""
    listening: set[str] = set()
    readable = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        readable = True
        for line in lines:
            cols = line.split()  # sl local_address rem_address st … uid timeout inode
            if len(cols) > 9 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                listening.add(f"socket:[{cols[9]}]")
    if not readable or not listening:
        return None
    for member in _process_family(pid):
        fd_dir = f"/proc/{member}/fd"
        with contextlib.suppress(OSError):  # gone meanwhile, or not ours to look at
            for fd in os.listdir(fd_dir):
                with contextlib.suppress(OSError):
                    if os.readlink(f"{fd_dir}/{fd}") in listening:
                        return True
    return False


def _process_family(pid: int) -> set[int]:
    """``pid``, the processes of its process group and its descendants, from ``/proc``."""
    parents: dict[int, int] = {}
    family = {pid}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            ppid, pgrp = (int(v) for v in stat[stat.rindex(")") + 2 :].split()[1:3])
            parents[int(entry)] = ppid
            if pgrp == pid:
                family.add(int(entry))
    grown = True
    while grown:
        more = {child for child, parent in parents.items() if parent in family} - family
        family |= more
        grown = bool(more)
    return family


async def _healthy(
    proc: EngineProcess, settings: LaunchSettings, session: aiohttp.ClientSession
) -> None:
    try:
        await wait_healthy(
            f"{proc.launch.base_url}/health", exited=proc.exited, session=session,
            timeout_s=settings.health_timeout_s, poll_s=settings.health_poll_s,
            holds_port=proc.holds_port,
        )  # fmt: skip
    except EngineError as exc:
        tail = await asyncio.to_thread(proc.log_tail)
        raise type(exc)(
            f"instance {proc.launch.instance_id!r} {exc.message}; end of {proc.log_path}:\n{tail}",
            instance_id=proc.launch.instance_id, retryable=False,
        ) from None  # fmt: skip


async def launch_from_config(
    config_path_or_plan: str | Path | Plan | LaunchConfig,
    *,
    manager: ControlPlaneManager | None = None,
    settings: LaunchSettings | None = None,
) -> LaunchedFleet:
    """Start the fleet a launch file (``.toml``), a ``sage-llm plan --json`` file (``.json``),
    a :class:`Plan` or a :class:`LaunchConfig` describes, and register it with ``manager``.

    ``settings`` applies to a Plan or a plan file (default: simulated engines of the plan's
    model and GPU). The topology comes from the launch file's ``topology_file``, else from
    ``nvidia-smi`` for real engines, else none (simulated engines use no GPUs).
    """
    # Reading files and planning take a while: keep them off the event loop.
    config = await asyncio.to_thread(_as_config, config_path_or_plan, settings)
    topology = config.topology
    if topology is None and config.settings.engine != "sim":
        detected = await detect_topology_async()
        if detected.message:
            log.info("%s", detected.message)
        topology = detected.topology
    engines = engines_from_plan(config.instances, config.settings)
    pd_enabled, others = True, []
    if manager is not None:
        pd_enabled = manager.enable_pd_separation and manager.pd_config.enabled
        others = [
            (i.instance_id, i.instance_type)
            for i in manager.get_instances()
            if i.model_name == config.settings.name
        ]
    problem = fleet_problem(engines, pd_enabled=pd_enabled, others=others)
    if problem is not None:
        raise ConfigError(problem)
    if config.plan is not None:  # [launch.plan]: planned now
        log.info(
            "planned %s for %s on %s", config.plan.candidate.label, config.plan.model.name,
            config.plan.gpu.name,
        )  # fmt: skip
        shortfall = config.plan.shortfall()
        if shortfall is not None:  # served all the same: the fleet this hardware allows
            log.warning("[launch.plan]: %s", shortfall)
    return await launch_engines(
        engines, manager=manager, settings=config.settings, topology=topology
    )


def _as_config(source: Any, settings: LaunchSettings | None) -> LaunchConfig:
    if isinstance(source, LaunchConfig):
        return source
    if isinstance(source, Plan):
        base = settings or LaunchSettings(model=source.model.name, sim_gpu=source.gpu.name)
        problem = plan_settings_problem(base, source.model.name, source.gpu.name)
        if problem is not None:
            raise ConfigError(problem, key="settings")
        return LaunchConfig(base, list(source.instances))
    if isinstance(source, str | Path):
        return load_launch_config(source, settings)
    raise ConfigError(
        f"expected a launch file, plan file, Plan or LaunchConfig, got {type(source).__name__}"
    )
