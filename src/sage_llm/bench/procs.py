"""Local processes for benchmarks: ``sage-llm engine-sim`` fleets and peer routers.

Every process runs in its own process group, binds 127.0.0.1 only, and writes its output
to a log file under one directory (a fresh temporary one by default, removed again by a
clean ``aclose()``; pass ``log_dir`` to keep the logs); a start that fails raises
:class:`ProcessStartError` naming that log, which is kept, and quoting its end. Starting waits until
the process answers its health probe; ``aclose()`` (also on an exception, a cancellation or
Ctrl-C, through ``async with``) terminates the whole group, then kills what is left::

    async with await start_engine_sims(2, speed=50.0) as fleet:
        async with await start_peer_router("vllm-router", fleet.urls) as router:
            ...  # send traffic to router.url; read fleet.metrics() afterwards

All process handling is asynchronous; nothing here blocks the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

import aiohttp

from sage_llm.bench.peers import (
    PeerInstall,
    count_workers,
    ensure_peer,
    get_spec,
    is_ready,
    peer_env,
    router_argv,
)
from sage_llm.engines.metrics_scrape import Samples, parse_prometheus_text
from sage_llm.errors import ConfigError, SageLLMError
from sage_llm.orphans import dies_with_parent
from sage_llm.types import ExecutionInstance

HOST = "127.0.0.1"
ROLES = ("general", "prefill", "decode")
_POLL_S = 0.1
_PROBE_TIMEOUT_S = 2.0
_TAIL_CHARS = 3000


class ProcessStartError(SageLLMError):
    """A child process exited or did not become ready in time; ``log_path`` is its log."""

    def __init__(self, message: str, *, log_path: Path) -> None:
        super().__init__(f"{message} (log: {log_path})")
        self.log_path = log_path


def group_cpu_s(pgid: int) -> float:
    """User + system CPU seconds of the live processes of process group ``pgid`` (each with
    all its threads), from ``/proc/<pid>/stat`` as ``psutil`` reads them; Linux only. A
    process started by :func:`spawn` leads a group of its own (``pgid`` = its pid)."""
    ticks = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[2]) == pgid:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def free_ports(n: int, host: str = HOST) -> list[int]:
    """``n`` distinct ports that were free on ``host`` a moment ago (bound to port 0)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(sock)
            sock.bind((host, 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for sock in socks:
            sock.close()


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(OSError):  # already gone, or never became a group leader
        os.killpg(pid, sig)


def _open_log(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)


def _read_tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-_TAIL_CHARS:]
    except OSError:
        return ""


@dataclass(eq=False)
class ManagedProcess:
    """One child process (leader of its own process group) serving HTTP on ``port``."""

    name: str
    argv: tuple[str, ...]
    port: int
    log_path: Path
    proc: asyncio.subprocess.Process = field(repr=False)

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        """The process id (also its process-group id)."""
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        """The exit status once it has exited (negative: killed by that signal)."""
        return self.proc.returncode

    async def log_tail(self) -> str:
        """The last few thousand characters of the log."""
        return await asyncio.to_thread(_read_tail, self.log_path)

    async def stop(self, grace_s: float = 5.0) -> int:
        """SIGTERM the process group, wait up to ``grace_s`` s, then SIGKILL whatever is
        left of the group; the exit status. Safe to call more than once."""
        try:
            if self.proc.returncode is None:
                _signal_group(self.proc.pid, signal.SIGTERM)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.proc.wait(), grace_s)
        finally:
            _signal_group(self.proc.pid, signal.SIGKILL)
        return await self.proc.wait()

    async def wait_ready(
        self, path: str, ready: Callable[[int, bytes], bool], *, timeout_s: float
    ) -> None:
        """Poll ``GET url+path`` until ``ready(status, body)``; :class:`ProcessStartError`
        when the process exits first or ``timeout_s`` s pass."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        probe = aiohttp.ClientTimeout(total=_PROBE_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=probe) as session:
            while True:
                if self.proc.returncode is not None:
                    raise await self._start_error(f"exited with status {self.proc.returncode}")
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(self.url + path) as resp:
                        if ready(resp.status, await resp.read()):
                            return
                if loop.time() >= deadline:
                    raise await self._start_error(f"was not ready after {timeout_s:.0f} s")
                await asyncio.sleep(_POLL_S)

    async def _start_error(self, what: str) -> ProcessStartError:
        tail = await self.log_tail()
        message = f"{self.name} ({' '.join(self.argv)}) {what}"
        if tail:
            message += f"; end of its log:\n{tail}"
        return ProcessStartError(message, log_path=self.log_path)


async def spawn(
    name: str,
    argv: Sequence[str],
    *,
    port: int,
    log_path: Path,
    env: Mapping[str, str] | None = None,
) -> ManagedProcess:
    """Start ``argv`` in a new session (its own process group), output to ``log_path``.
    On Linux it is also signalled (SIGTERM) when this process dies, however it dies: a
    benchmark killed by SIGTERM or SIGKILL leaves no engine or router behind
    (:func:`~sage_llm.orphans.dies_with_parent`). Raises :class:`ProcessStartError` when
    the program cannot be executed."""
    fd = await asyncio.to_thread(_open_log, log_path)
    try:
        proc = await asyncio.create_subprocess_exec(
            *dies_with_parent(argv),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=fd,
            stderr=fd,
            env=None if env is None else dict(env),
            start_new_session=True,
        )
    except OSError as exc:
        raise ProcessStartError(f"cannot start {name}: {exc}", log_path=log_path) from exc
    finally:
        os.close(fd)
    return ManagedProcess(name, tuple(argv), port, log_path, proc)


@contextlib.asynccontextmanager
async def serving(
    name: str,
    argv: Sequence[str],
    *,
    port: int,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    timeout_s: float = 60.0,
) -> AsyncIterator[ManagedProcess]:
    """``argv`` started with :func:`spawn`, handed out once ``GET /health`` answers 200
    (:class:`ProcessStartError` when it does not within ``timeout_s`` s); stopped on exit."""
    proc = await spawn(name, argv, port=port, log_path=log_path, env=env)
    try:
        await proc.wait_ready("/health", lambda status, _body: status == 200, timeout_s=timeout_s)
        yield proc
    finally:
        await proc.stop()


async def scrape_metrics(url: str, *, timeout_s: float = 5.0) -> Samples:
    """``GET url/metrics`` parsed into samples (see
    :func:`~sage_llm.engines.metrics_scrape.parse_prometheus_text`)."""
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session,
        session.get(url + "/metrics") as resp,
    ):
        resp.raise_for_status()
        return parse_prometheus_text(await resp.text())


def counter_total(samples: Samples, name: str) -> float:
    """The sum of metric ``name`` over all its label sets (0 when absent)."""
    return sum(value for _labels, value in samples.get(name, ()))


async def _make_log_dir(log_dir: Path | None) -> Path:
    if log_dir is not None:
        await asyncio.to_thread(log_dir.mkdir, parents=True, exist_ok=True)
        return log_dir
    return Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="sage-llm-procs-"))


async def _stop_all(procs: Sequence[ManagedProcess]) -> None:
    await asyncio.gather(*(p.stop() for p in procs), return_exceptions=True)


async def _drop_temp_logs(directory: Path | None) -> None:
    if directory is not None:
        await asyncio.to_thread(shutil.rmtree, directory, ignore_errors=True)


@dataclass(eq=False)
class EngineFleet:
    """Running ``sage-llm engine-sim`` processes; ``roles[i]`` is the role of ``engines[i]``."""

    engines: tuple[ManagedProcess, ...]
    roles: tuple[str, ...]
    log_dir: Path
    temp_logs: bool = False
    """The log directory is a temporary one of its own, removed by a clean ``aclose()``."""

    @property
    def urls(self) -> tuple[str, ...]:
        """Base URLs of all engines, in start order."""
        return tuple(e.url for e in self.engines)

    def urls_for(self, role: str) -> tuple[str, ...]:
        """Base URLs of the engines with ``role`` (general, prefill or decode)."""
        return tuple(e.url for e, r in zip(self.engines, self.roles, strict=True) if r == role)

    async def metrics(self) -> dict[str, Samples]:
        """Each engine's current ``/metrics``, by URL."""
        scraped = await asyncio.gather(*(scrape_metrics(url) for url in self.urls))
        return dict(zip(self.urls, scraped, strict=True))

    async def aclose(self) -> None:
        """Stop every engine (idempotent)."""
        await _stop_all(self.engines)
        await _drop_temp_logs(self.log_dir if self.temp_logs else None)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


def loopback_instances(
    engines: Sequence[ManagedProcess], model: str, *, max_concurrent_requests: int = 64
) -> list[ExecutionInstance]:
    """One instance per engine process (``engine-<i>``, on its loopback port), ready to
    register with a control plane in HTTP mode."""
    return [
        ExecutionInstance(
            instance_id=f"engine-{i}",
            host="127.0.0.1",
            port=proc.port,
            model_name=model,
            max_concurrent_requests=max_concurrent_requests,
        )
        for i, proc in enumerate(engines)
    ]


def _roles(n: int, role: str | Sequence[str] | None) -> tuple[str, ...]:
    roles = (role or "general",) * n if role is None or isinstance(role, str) else tuple(role)
    if len(roles) != n:
        raise ConfigError(f"{len(roles)} roles given for {n} engines", key="role")
    for r in roles:
        if r not in ROLES:
            raise ConfigError(f"unknown role {r!r} (known: {', '.join(ROLES)})", key="role")
    return roles


def _ports(n: int, base_port: int | None, ports: Sequence[int] | None) -> list[int]:
    if base_port is not None and ports is not None:
        raise ConfigError("give base_port or ports, not both", key="ports")
    if ports is not None:
        if len(ports) != n or len(set(ports)) != n:
            raise ConfigError(f"need {n} distinct ports, got {list(ports)}", key="ports")
        chosen = list(ports)
    elif base_port is not None:
        chosen = [base_port + i for i in range(n)]
    else:
        return free_ports(n)
    if not all(0 < p < 65536 for p in chosen):
        raise ConfigError(f"ports must be in 1..65535, got {chosen}", key="ports")
    return chosen


def engine_sim_argv(
    port: int,
    *,
    model: str = "llama-3-8b",
    gpu: str = "h100",
    speed: float = 1.0,
    role: str = "general",
    served_model_name: str | None = None,
    seed: int = 0,
    python: str | None = None,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The command line of one ``sage-llm engine-sim`` on 127.0.0.1:``port``."""
    argv = [
        python or sys.executable, "-m", "sage_llm.cli", "engine-sim",
        "--model", model, "--gpu", gpu, "--host", HOST, "--port", str(port),
        "--speed", repr(float(speed)), "--role", role, "--seed", str(seed),
    ]  # fmt: skip
    if served_model_name:
        argv += ["--served-model-name", served_model_name]
    return argv + list(extra_args)


async def start_engine_sims(
    n: int,
    *,
    model: str = "llama-3-8b",
    gpu: str = "h100",
    speed: float = 1.0,
    base_port: int | None = None,
    ports: Sequence[int] | None = None,
    role: str | Sequence[str] | None = None,
    served_model_name: str | None = None,
    log_dir: Path | None = None,
    startup_timeout_s: float = 60.0,
    python: str | None = None,
    extra_args: Sequence[str] = (),
) -> EngineFleet:
    """Start ``n`` simulated engines and wait until each answers ``/health``.

    Ports are ``ports``, or ``base_port + i``, or free ones. ``role`` is one role for all
    engines or one per engine. Engine ``i`` gets seed ``i``. Logs go to
    ``log_dir/engine-sim-<port>.log``. On any failure every engine already started is
    stopped and :class:`ProcessStartError` is raised; bad arguments raise
    :class:`ConfigError`.
    """
    if n < 1:
        raise ConfigError("start at least one engine", key="n")
    if speed <= 0:
        raise ConfigError("speed must be positive", key="speed")
    roles = _roles(n, role)
    chosen = _ports(n, base_port, ports)
    directory = await _make_log_dir(log_dir)
    started: list[ManagedProcess] = []
    try:
        for i, (port, r) in enumerate(zip(chosen, roles, strict=True)):
            argv = engine_sim_argv(
                port, model=model, gpu=gpu, speed=speed, role=r,
                served_model_name=served_model_name, seed=i, python=python,
                extra_args=extra_args,
            )  # fmt: skip
            name = f"engine-sim-{port}"
            started.append(await spawn(name, argv, port=port, log_path=directory / f"{name}.log"))
        await asyncio.gather(
            *(p.wait_ready("/health", _is_ok, timeout_s=startup_timeout_s) for p in started)
        )
    except BaseException:
        await _stop_all(started)
        raise
    return EngineFleet(tuple(started), roles, directory, temp_logs=log_dir is None)


def _is_ok(status: int, body: bytes) -> bool:
    return status == 200


@dataclass(eq=False)
class PeerProcess:
    """A running peer router in front of some engines; send traffic to ``url``."""

    install: PeerInstall
    process: ManagedProcess
    policy: str
    metrics_port: int
    pd: bool
    temp_logs: bool = False
    """The log directory is a temporary one of its own, removed by a clean ``aclose()``."""

    @property
    def name(self) -> str:
        """The peer's name (``vllm-router``, ``sglang-router``)."""
        return self.install.spec.name

    @property
    def url(self) -> str:
        """The router's base URL (OpenAI API under ``/v1``)."""
        return self.process.url

    @property
    def argv(self) -> tuple[str, ...]:
        """The exact command line it runs."""
        return self.process.argv

    async def aclose(self) -> None:
        """Stop the router (idempotent)."""
        await self.process.stop()
        await _drop_temp_logs(self.process.log_path.parent if self.temp_logs else None)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


async def start_peer_router(
    name: str,
    workers: Sequence[str] = (),
    *,
    policy: str = "round_robin",
    port: int | None = None,
    pd: tuple[Sequence[str], Sequence[str]] | None = None,
    install: PeerInstall | None = None,
    log_dir: Path | None = None,
    log_level: str = "warning",
    startup_timeout_s: float = 60.0,
    extra_args: Sequence[str] = (),
) -> PeerProcess:
    """Start peer router ``name`` over ``workers`` (or ``pd=(prefill_urls, decode_urls)``)
    on 127.0.0.1:``port`` (a free port by default) and wait until it routes to all of them.

    The peer is installed first when ``install`` is not given (see
    :func:`~sage_llm.bench.peers.ensure_peer`). Its log is ``log_dir/<name>-<port>.log``.
    Raises :class:`ConfigError` for bad arguments, :class:`ProcessStartError` when the
    router exits or is not ready within ``startup_timeout_s`` s.
    """
    spec = get_spec(name)
    spec.check_policy(policy)
    n_workers = count_workers(workers, pd)
    if install is None:
        install = await ensure_peer(name)
    elif install.spec != spec:
        raise ConfigError(f"install is {install.spec.name}, not {name}", key="install")
    chosen_port, metrics_port = free_ports(2)
    if port is not None:
        chosen_port = port
    argv = router_argv(
        install, workers=workers, pd=pd, policy=policy, host=HOST, port=chosen_port,
        metrics_port=metrics_port, log_level=log_level, extra_args=extra_args,
    )  # fmt: skip
    directory = await _make_log_dir(log_dir)
    label = f"{name}-{chosen_port}"
    env = peer_env(directory / f"{label}-hf")
    proc = await spawn(
        label, argv, port=chosen_port, log_path=directory / f"{label}.log", env=env
    )  # fmt: skip
    try:
        await proc.wait_ready(
            spec.ready_path,
            lambda status, body: is_ready(status, body, n_workers),
            timeout_s=startup_timeout_s,
        )
    except BaseException:
        await proc.stop()
        raise
    return PeerProcess(install, proc, policy, metrics_port, pd is not None, log_dir is None)
