"""Peer routers from PyPI (``vllm-router``, ``sglang-router``): specs, installs, command lines.

Benchmarks run these routers side by side with the sage-llm gateway, in front of the same
``sage-llm engine-sim`` processes. Each peer is a Rust router shipped as a wheel; it is
installed into its **own** virtualenv under a cache directory, never into the project's
environment::

    $SAGE_LLM_PEERS_DIR/<name>      when the variable is set
    <repo>/.cache/peers/<name>      in a source checkout (ignored by git)
    ~/.cache/sage-llm/peers/<name>  otherwise

:func:`ensure_peer` installs a peer once (pinned version, ``python -m venv`` + ``pip``) and
afterwards only checks that the venv exists, holds that version and that the entry point
runs. :func:`router_argv` builds the exact command line that starts a peer;
:mod:`sage_llm.bench.procs` runs it. ``python -m sage_llm.bench.peers [NAME ...]`` (or
``scripts/install-peers.sh``) installs peers from a shell and prints install time and size.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Literal
from urllib.parse import urlsplit

from sage_llm.errors import ConfigError, NotFoundError, SageLLMError

PdProtocol = Literal["vllm-kv-transfer", "sglang-bootstrap"]
_MARKER = ".sage-llm-peer.json"
_LOCK_POLL_S = 0.1
_LOG_TAIL_CHARS = 2000
_LOOPBACK_NOTHING = "http://127.0.0.1:9"  # the discard port: nothing answers
LOG_LEVELS = ("debug", "info", "warning", "error")


class PeerError(SageLLMError):
    """A peer router could not be installed or run. ``log_path`` names the log to read."""

    def __init__(self, message: str, *, log_path: Path | None = None) -> None:
        super().__init__(message if log_path is None else f"{message} (log: {log_path})")
        self.log_path = log_path


class PeerInstallError(PeerError):
    """``pip`` could not install a peer (typically: no network to PyPI)."""


class UnknownPeerError(NotFoundError):
    """No peer router of that name is known."""


@dataclass(frozen=True, slots=True)
class PeerSpec:
    """What is known about one peer router: how to install it and how to start it.

    ``launch`` is the command after the venv's ``bin/`` directory (console script plus
    subcommand); ``ready_path`` is polled until it answers 200 (and, when its JSON body has
    ``healthy_workers``, until that count covers every worker).
    """

    name: str
    package: str
    version: str
    launch: tuple[str, ...]
    policies: frozenset[str]
    pd_flag: str
    pd_protocol: PdProtocol
    ready_path: str
    warning_level: str
    """How the peer's ``--log-level`` spells "warning"."""

    @property
    def requirement(self) -> str:
        """The pinned pip requirement, e.g. ``vllm-router==0.1.17``."""
        return f"{self.package}=={self.version}"

    def log_level(self, level: str) -> str:
        """``level`` (one of :data:`LOG_LEVELS`) as this peer's ``--log-level`` spells it."""
        if level not in LOG_LEVELS:
            known = ", ".join(LOG_LEVELS)
            raise ConfigError(f"unknown log level {level!r} (known: {known})", key="log_level")
        return self.warning_level if level == "warning" else level

    def check_policy(self, policy: str) -> None:
        """Raise :class:`ConfigError` unless this peer knows ``policy``."""
        if policy not in self.policies:
            known = ", ".join(sorted(self.policies))
            raise ConfigError(
                f"{self.name} has no policy {policy!r} (known: {known})", key="policy"
            )


_VLLM_POLICIES = "random round_robin cache_aware kv_aware power_of_two consistent_hash \
sticky_least_loaded"

PEERS: Mapping[str, PeerSpec] = MappingProxyType(
    {
        "vllm-router": PeerSpec(
            name="vllm-router",
            package="vllm-router",
            version="0.1.17",
            launch=("vllm-router",),
            policies=frozenset(_VLLM_POLICIES.split()),
            pd_flag="--vllm-pd-disaggregation",
            pd_protocol="vllm-kv-transfer",
            ready_path="/health",
            warning_level="warning",
        ),
        "sglang-router": PeerSpec(
            name="sglang-router",
            package="sglang-router",
            version="0.3.2",
            launch=("sglang-router", "launch"),
            policies=frozenset({"random", "round_robin", "cache_aware", "power_of_two"}),
            pd_flag="--pd-disaggregation",
            pd_protocol="sglang-bootstrap",
            ready_path="/readiness",
            warning_level="warn",
        ),
    }
)
"""The known peers by name (read-only)."""


def get_spec(name: str) -> PeerSpec:
    """The spec of peer ``name``; :class:`UnknownPeerError` (404) when there is none."""
    try:
        return PEERS[name]
    except KeyError:
        known = ", ".join(sorted(PEERS))
        raise UnknownPeerError(f"unknown peer router {name!r} (known: {known})") from None


@dataclass(frozen=True, slots=True)
class PeerInstall:
    """One installed peer: its venv, interpreter, console script and version.

    ``install_s`` is the time the install took (``None`` when the venv was already there);
    ``size_bytes`` the venv's size on disk, measured when it was installed.
    """

    spec: PeerSpec
    venv: Path
    version: str
    install_s: float | None
    size_bytes: int

    @property
    def python(self) -> Path:
        """The venv's interpreter."""
        return self.venv / "bin" / "python"

    @property
    def bin(self) -> Path:
        """The peer's console script."""
        return self.venv / "bin" / self.spec.launch[0]

    @property
    def command(self) -> tuple[str, ...]:
        """The start of every command line: console script plus subcommand."""
        return (str(self.bin), *self.spec.launch[1:])


def _repo_root(start: Path) -> Path | None:
    for parent in start.parents:
        if (parent / "pyproject.toml").is_file() and (parent / "src" / "sage_llm").is_dir():
            return parent
    return None


def peers_dir(env: Mapping[str, str] | None = None, *, module_file: Path | None = None) -> Path:
    """The directory that holds one venv per peer (see the module docstring for the order).

    ``env`` defaults to ``os.environ``; ``module_file`` (for tests) to this module's path.
    """
    env = os.environ if env is None else env
    configured = env.get("SAGE_LLM_PEERS_DIR")
    if configured:
        return Path(configured).expanduser()
    root = _repo_root((module_file or Path(__file__)).resolve())
    if root is not None:
        return root / ".cache" / "peers"
    return Path.home() / ".cache" / "sage-llm" / "peers"


def peer_env(hf_home: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a peer runs in: ``base`` (default ``os.environ``) with every
    Hugging Face lookup kept on this machine. sglang-router asks the Hugging Face hub for
    the tokenizer named by a worker's ``tokenizer_path``; ``HF_ENDPOINT`` points that
    request at a loopback port where nothing listens, so it fails at once."""
    env = dict(os.environ if base is None else base)
    env.update(
        HF_ENDPOINT=_LOOPBACK_NOTHING,
        HF_HUB_OFFLINE="1",
        HF_HOME=str(hf_home),
        NO_COLOR="1",
        PYTHONUNBUFFERED="1",
    )
    return env


def count_workers(workers: Sequence[str], pd: tuple[Sequence[str], Sequence[str]] | None) -> int:
    """How many engines a router is given; :class:`ConfigError` unless exactly one of
    ``workers`` (regular mode) and ``pd`` (prefill URLs, decode URLs; both non-empty) is."""
    if pd is None:
        if not workers:
            raise ConfigError("a router needs at least one worker URL", key="workers")
        return len(workers)
    if workers:
        raise ConfigError("give either workers or pd, not both", key="workers")
    if not pd[0] or not pd[1]:
        raise ConfigError("PD mode needs prefill and decode URLs", key="pd")
    return len(pd[0]) + len(pd[1])


def _url_port(url: str) -> int:
    port = urlsplit(url).port
    if port is None:
        raise ConfigError(f"prefill URL {url!r} has no port", key="pd")
    return port


def router_argv(
    install: PeerInstall,
    *,
    workers: Sequence[str] = (),
    pd: tuple[Sequence[str], Sequence[str]] | None = None,
    policy: str = "round_robin",
    host: str = "127.0.0.1",
    port: int,
    metrics_port: int,
    log_level: str = "warning",
    extra_args: Sequence[str] = (),
    bootstrap_ports: Sequence[int] | None = None,
) -> list[str]:
    """The command line that starts ``install``'s router on ``host:port``.

    Either ``workers`` (regular mode) or ``pd=(prefill_urls, decode_urls)`` (PD mode)
    names the engines. ``metrics_port`` is the router's own Prometheus port (both peers
    default to 29000, so two routers on one machine need distinct ones). In SGLang's PD
    mode each prefill server is named with its bootstrap port (``--prefill URL PORT``):
    ``bootstrap_ports``, one per prefill URL, or by default the URL's own port, which is
    where ``sage-llm engine-sim`` serves its bootstrap (real SGLang servers listen on
    ``--disaggregation-bootstrap-port``, 8998 unless set). Raises :class:`ConfigError`
    for an unknown policy or log level, or a bad worker set.
    """
    spec = install.spec
    spec.check_policy(policy)
    level = spec.log_level(log_level)
    argv = [*install.command, "--host", host, "--port", str(port)]
    count_workers(workers, pd)  # validates
    if pd is None:
        argv += ["--worker-urls", *workers]
    else:
        prefill, decode = pd
        argv.append(spec.pd_flag)
        if spec.pd_protocol == "sglang-bootstrap":
            ports = (
                list(bootstrap_ports)
                if bootstrap_ports is not None
                else [_url_port(url) for url in prefill]
            )
            if len(ports) != len(prefill):
                raise ConfigError("one bootstrap port per prefill URL", key="bootstrap_ports")
            for url, bport in zip(prefill, ports, strict=True):
                argv += ["--prefill", url, str(bport)]
        else:
            for url in prefill:
                argv += ["--prefill", url]
        for url in decode:
            argv += ["--decode", url]
    argv += [
        "--policy", policy,
        "--prometheus-host", host,
        "--prometheus-port", str(metrics_port),
        "--worker-startup-check-interval", "1",
        "--log-level", level,
    ]  # fmt: skip
    argv += extra_args
    return argv


def is_ready(status: int, body: bytes, n_workers: int) -> bool:
    """Whether a router's ready probe says it can route to all ``n_workers`` engines."""
    if status != 200:
        return False
    try:
        data = json.loads(body)
    except ValueError:
        return True  # vllm-router: plain text "All servers healthy"
    if isinstance(data, dict) and isinstance(data.get("healthy_workers"), int):
        return bool(data["healthy_workers"] >= n_workers)
    return True


# --- installing ---------------------------------------------------------------------------


def _dir_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def _cached_install(spec: PeerSpec, venv: Path) -> PeerInstall | None:
    """The install its marker file describes, when it is of ``spec``'s version and its
    interpreter and console script exist."""
    try:
        marker = json.loads((venv / _MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("requirement") != spec.requirement:
        return None
    size = marker.get("size_bytes")
    install = PeerInstall(spec, venv, spec.version, None, size if isinstance(size, int) else 0)
    if not install.bin.is_file() or not install.python.is_file():
        return None
    return install


def _write_marker(venv: Path, data: Mapping[str, object]) -> None:
    (venv / _MARKER).write_text(json.dumps(dict(data), indent=2) + "\n")


def _tail(path: Path) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-_LOG_TAIL_CHARS:]


def _open_log(path: Path, *, append: bool = True) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = os.O_APPEND if append else os.O_TRUNC
    return os.open(path, os.O_WRONLY | os.O_CREAT | mode, 0o644)


def _close_opened(opening: asyncio.Future[int]) -> None:
    if not opening.cancelled() and opening.exception() is None:
        os.close(opening.result())


async def _open_log_async(path: Path, *, append: bool = True) -> int:
    """``_open_log`` off the event loop. Cancelled while the file is being opened, the
    descriptor the open still returns is closed, not left behind."""
    opening = asyncio.ensure_future(
        asyncio.to_thread(functools.partial(_open_log, path, append=append))
    )
    try:
        return await asyncio.shield(opening)
    except asyncio.CancelledError:
        opening.add_done_callback(_close_opened)
        raise


async def _run(argv: Sequence[str], log: Path, *, timeout_s: float, append: bool = True) -> int:
    """Run ``argv`` to completion with its output in ``log``; its exit status."""
    fd = await _open_log_async(log, append=append)
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=fd, stderr=fd
        )
    finally:
        os.close(fd)
    try:
        return await asyncio.wait_for(proc.wait(), timeout_s)
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await asyncio.shield(proc.wait())
        raise


class _DirLock:
    """An exclusive ``flock`` on ``path``, polled so that waiting never blocks the loop."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    async def __aenter__(self) -> None:
        fd = await _open_log_async(self.path)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    await asyncio.sleep(_LOCK_POLL_S)
                    continue
                self._fd = fd
                return
        except BaseException:  # cancelled while waiting, too: the descriptor is closed
            os.close(fd)
            raise

    async def __aexit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the lock
            self._fd = None


async def _verify(spec: PeerSpec, venv: Path, log: Path) -> PeerInstall | None:
    """The install in ``venv`` when it is complete and its entry point runs."""
    install = await asyncio.to_thread(_cached_install, spec, venv)
    if install is None:
        return None
    status = await _run([*install.command, "--help"], log, timeout_s=60.0, append=False)
    return install if status == 0 else None


async def ensure_peer(
    name: str,
    *,
    root: Path | None = None,
    base_python: str | None = None,
    timeout_s: float = 900.0,
) -> PeerInstall:
    """Install peer ``name`` into ``<root>/<name>`` unless it is there and runs; idempotent.

    ``root`` defaults to :func:`peers_dir`, ``base_python`` (the interpreter that creates
    the venv) to this one. Concurrent callers, in one process or several, wait for one
    install. Raises :class:`UnknownPeerError` for an unknown name and
    :class:`PeerInstallError` (naming the log) when the install fails.
    """
    spec = get_spec(name)
    root = peers_dir() if root is None else root
    venv = root / name
    log = root / f"{name}.install.log"
    async with _DirLock(root / f"{name}.lock"):
        found = await _verify(spec, venv, root / f"{name}.check.log")
        if found is not None:
            return found
        return await _install(spec, venv, log, base_python or sys.executable, timeout_s)


async def _install(
    spec: PeerSpec, venv: Path, log: Path, base_python: str, timeout_s: float
) -> PeerInstall:
    started = time.monotonic()
    steps = (
        [base_python, "-m", "venv", "--clear", str(venv)],
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
         "--disable-pip-version-check", spec.requirement],
    )  # fmt: skip
    for i, argv in enumerate(steps):
        left = timeout_s - (time.monotonic() - started)
        try:
            status = await _run(argv, log, timeout_s=max(left, 1.0), append=i > 0)
        except TimeoutError:
            raise PeerInstallError(
                f"installing {spec.requirement} took longer than {timeout_s:.0f} s", log_path=log
            ) from None
        except OSError as exc:
            raise PeerInstallError(f"cannot run {argv[0]}: {exc}", log_path=log) from exc
        if status != 0:
            tail = await asyncio.to_thread(_tail, log)
            raise PeerInstallError(
                f"installing {spec.requirement} failed (exit {status}):\n{tail}", log_path=log
            )
    install_s = time.monotonic() - started
    size = await asyncio.to_thread(_dir_size, venv)
    install = PeerInstall(spec, venv, spec.version, install_s, size)
    if await _run([*install.command, "--help"], log, timeout_s=60.0) != 0:
        raise PeerInstallError(f"{spec.name} installed but does not start", log_path=log)
    await asyncio.to_thread(
        _write_marker,
        venv,
        {"requirement": spec.requirement, "install_s": round(install_s, 1), "size_bytes": size},
    )
    return install


def ensure_peer_sync(name: str, *, root: Path | None = None) -> PeerInstall:
    """:func:`ensure_peer` for code without a running event loop (CLI, pytest fixtures)."""
    return asyncio.run(ensure_peer(name, root=root))


def describe(install: PeerInstall) -> str:
    """One line about an install: name, version, path, install time and size."""
    how = "cached" if install.install_s is None else f"installed in {install.install_s:.1f} s"
    size = f"{install.size_bytes / (1 << 20):.0f} MiB"
    return f"{install.spec.name} {install.version} at {install.venv} ({how}, {size})"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m sage_llm.bench.peers [NAME ...]``: install peers (default: all)."""
    names = list(sys.argv[1:] if argv is None else argv) or sorted(PEERS)
    if any(name in ("-h", "--help") for name in names):
        print(
            "usage: python -m sage_llm.bench.peers [NAME ...]: install the peer routers "
            f"(default: all of {', '.join(sorted(PEERS))}) into their cached virtualenvs"
        )
        return 0
    status = 0
    for name in names:
        try:
            install = ensure_peer_sync(name)
        except SageLLMError as exc:
            print(f"error: {exc.message}", file=sys.stderr)
            status = 1
            continue
        print(describe(install))
    return status


if __name__ == "__main__":
    sys.exit(main())
