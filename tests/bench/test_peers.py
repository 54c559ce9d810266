"""Tests of the peer-router specs, command lines and the idempotent install (no network)."""

from __future__ import annotations

import asyncio
import fcntl
import json
import stat
import threading
from pathlib import Path

import pytest

from sage_llm.bench import peers as peers_module
from sage_llm.bench.peers import (
    PEERS,
    PeerInstall,
    PeerInstallError,
    UnknownPeerError,
    _DirLock,
    describe,
    ensure_peer,
    get_spec,
    is_ready,
    peer_env,
    peers_dir,
    router_argv,
)
from sage_llm.errors import ConfigError, NotFoundError


def _install(name: str, venv: Path = Path("/peers/x")) -> PeerInstall:
    return PeerInstall(get_spec(name), venv, get_spec(name).version, None, 0)


def _write_script(path: Path, body: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _fake_venv(root: Path, name: str, *, requirement: str, entry_status: int = 0) -> Path:
    """A venv-shaped directory whose console script exits with ``entry_status``."""
    venv = root / name
    _write_script(venv / "bin" / get_spec(name).launch[0], f"exit {entry_status}")
    _write_script(venv / "bin" / "python", "exit 0")
    marker = {"requirement": requirement, "install_s": 12.5, "size_bytes": 4096}
    (venv / ".sage-llm-peer.json").write_text(json.dumps(marker))
    return venv


# --- specs ---------------------------------------------------------------------------------


def test_known_peers_are_pinned() -> None:
    assert sorted(PEERS) == ["sglang-router", "vllm-router"]
    assert get_spec("vllm-router").requirement == "vllm-router==0.1.17"
    assert get_spec("sglang-router").requirement == "sglang-router==0.3.2"


def test_unknown_peer_is_a_not_found_error_naming_the_known_ones() -> None:
    with pytest.raises(UnknownPeerError, match="known: sglang-router, vllm-router") as info:
        get_spec("nginx")
    assert isinstance(info.value, NotFoundError)
    assert info.value.http_status == 404


def test_policies_are_checked_per_peer() -> None:
    get_spec("vllm-router").check_policy("kv_aware")
    with pytest.raises(ConfigError, match="sglang-router has no policy 'kv_aware'") as info:
        get_spec("sglang-router").check_policy("kv_aware")
    assert info.value.key == "policy"


# --- command lines ---------------------------------------------------------------------------


def test_vllm_router_regular_command_line() -> None:
    argv = router_argv(
        _install("vllm-router"),
        workers=["http://127.0.0.1:8001", "http://127.0.0.1:8002"],
        policy="cache_aware",
        port=30000,
        metrics_port=30001,
    )
    assert argv == [
        "/peers/x/bin/vllm-router", "--host", "127.0.0.1", "--port", "30000",
        "--worker-urls", "http://127.0.0.1:8001", "http://127.0.0.1:8002",
        "--policy", "cache_aware", "--prometheus-host", "127.0.0.1",
        "--prometheus-port", "30001", "--worker-startup-check-interval", "1",
        "--log-level", "warning",
    ]  # fmt: skip


def test_sglang_router_pd_command_line_uses_its_subcommand_and_flags() -> None:
    argv = router_argv(
        _install("sglang-router"),
        pd=(["http://p1:8101", "http://p2:8102"], ["http://d1:8103"]),
        port=1,
        metrics_port=2,
        extra_args=["--cache-threshold", "0.5"],
    )
    assert argv[:2] == ["/peers/x/bin/sglang-router", "launch"]
    i = argv.index("--pd-disaggregation")
    # each prefill server with its bootstrap port (engine-sim: its own HTTP port)
    assert argv[i + 1 :][:8] == ["--prefill", "http://p1:8101", "8101",
                                 "--prefill", "http://p2:8102", "8102",
                                 "--decode", "http://d1:8103"]  # fmt: skip
    assert "--worker-urls" not in argv
    assert argv[argv.index("--log-level") + 1] == "warn"
    assert argv[-2:] == ["--cache-threshold", "0.5"]


def test_sglang_router_pd_bootstrap_ports_can_be_given() -> None:
    argv = router_argv(_install("sglang-router"), pd=(["http://p:8000"], ["http://d:8001"]),
                       port=1, metrics_port=2, bootstrap_ports=[8998])  # fmt: skip
    i = argv.index("--prefill")
    assert argv[i : i + 3] == ["--prefill", "http://p:8000", "8998"]
    with pytest.raises(ConfigError, match="one bootstrap port per prefill URL"):
        router_argv(_install("sglang-router"), pd=(["http://p:8000"], ["http://d:8001"]),
                    port=1, metrics_port=2, bootstrap_ports=[1, 2])  # fmt: skip


def test_vllm_router_pd_flag() -> None:
    argv = router_argv(_install("vllm-router"), pd=(["http://p"], ["http://d"]), port=1,
                       metrics_port=2)  # fmt: skip
    assert "--vllm-pd-disaggregation" in argv


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({}, "workers"),
        ({"workers": ["http://a"], "pd": (["http://p"], ["http://d"])}, "workers"),
        ({"pd": ([], ["http://d"])}, "pd"),
        ({"workers": ["http://a"], "policy": "least_cost"}, "policy"),
        ({"workers": ["http://a"], "log_level": "loud"}, "log_level"),
    ],
)
def test_bad_router_arguments_raise_config_errors(kwargs: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        router_argv(_install("vllm-router"), port=1, metrics_port=2, **kwargs)  # type: ignore[arg-type]
    assert info.value.key == key


@pytest.mark.parametrize(
    ("status", "body", "n", "ready"),
    [
        (200, b"All servers healthy", 2, True),
        (503, b"No healthy workers", 2, False),
        (200, b'{"status":"ready","healthy_workers":1,"total_workers":2}', 2, False),
        (200, b'{"status":"ready","healthy_workers":2,"total_workers":2}', 2, True),
        (200, b'{"status":"ok"}', 2, True),
    ],
)
def test_is_ready(status: int, body: bytes, n: int, ready: bool) -> None:
    assert is_ready(status, body, n) is ready


def test_peer_env_keeps_hugging_face_lookups_on_loopback(tmp_path: Path) -> None:
    env = peer_env(tmp_path / "hf", {"PATH": "/usr/bin", "HF_ENDPOINT": "https://elsewhere"})
    assert env["PATH"] == "/usr/bin"
    assert env["HF_ENDPOINT"].startswith("http://127.0.0.1:")
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["HF_HOME"] == str(tmp_path / "hf")


def test_install_paths() -> None:
    install = _install("sglang-router", Path("/c/sglang-router"))
    assert install.python == Path("/c/sglang-router/bin/python")
    assert install.bin == Path("/c/sglang-router/bin/sglang-router")
    assert install.command == ("/c/sglang-router/bin/sglang-router", "launch")
    assert describe(install) == "sglang-router 0.3.2 at /c/sglang-router (cached, 0 MiB)"
    assert len({install, _install("sglang-router", Path("/c/sglang-router"))}) == 1  # hashable


# --- where installs live ---------------------------------------------------------------------


def test_peers_dir_prefers_the_environment_variable(tmp_path: Path) -> None:
    assert peers_dir({"SAGE_LLM_PEERS_DIR": str(tmp_path)}) == tmp_path


def test_peers_dir_is_under_the_checkout(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("")
    module = tmp_path / "src" / "sage_llm" / "bench" / "peers.py"
    module.parent.mkdir(parents=True)
    assert peers_dir({}, module_file=module) == tmp_path / ".cache" / "peers"


def test_peers_dir_falls_back_to_the_user_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    module = tmp_path / "site-packages" / "sage_llm" / "bench" / "peers.py"
    assert peers_dir({}, module_file=module) == tmp_path / "home/.cache/sage-llm/peers"


def test_this_checkout_keeps_peers_in_an_ignored_cache_dir() -> None:
    repo = Path(__file__).resolve().parents[2]
    assert peers_dir({}) == repo / ".cache" / "peers"
    assert ".cache/" in (repo / ".gitignore").read_text().split()


# --- ensure_peer ------------------------------------------------------------------------------


async def test_a_complete_install_is_reused_without_pip(tmp_path: Path) -> None:
    venv = _fake_venv(tmp_path, "vllm-router", requirement="vllm-router==0.1.17")
    first, second = await asyncio.gather(
        ensure_peer("vllm-router", root=tmp_path, base_python="/bin/false"),
        ensure_peer("vllm-router", root=tmp_path, base_python="/bin/false"),
    )
    assert first == second
    assert first.venv == venv
    assert first.install_s is None
    assert first.size_bytes == 4096


async def test_another_version_is_reinstalled(tmp_path: Path) -> None:
    _fake_venv(tmp_path, "vllm-router", requirement="vllm-router==0.0.1")
    with pytest.raises(PeerInstallError, match=r"vllm-router==0\.1\.17 failed \(exit 1\)") as info:
        await ensure_peer("vllm-router", root=tmp_path, base_python="/bin/false")
    assert info.value.log_path == tmp_path / "vllm-router.install.log"
    assert str(info.value.log_path) in info.value.message


async def test_an_entry_point_that_fails_forces_a_reinstall(tmp_path: Path) -> None:
    _fake_venv(tmp_path, "sglang-router", requirement="sglang-router==0.3.2", entry_status=3)
    with pytest.raises(PeerInstallError):
        await ensure_peer("sglang-router", root=tmp_path, base_python="/bin/false")


async def test_a_missing_interpreter_is_an_install_error(tmp_path: Path) -> None:
    with pytest.raises(PeerInstallError, match="cannot run /nonexistent/python"):
        await ensure_peer("vllm-router", root=tmp_path, base_python="/nonexistent/python")


async def test_pip_output_ends_up_in_the_error(tmp_path: Path) -> None:
    fake = tmp_path / "fake-python"
    _write_script(fake, 'echo "ERROR: No matching distribution found" >&2; exit 1')
    with pytest.raises(PeerInstallError, match="No matching distribution found"):
        await ensure_peer("sglang-router", root=tmp_path / "peers", base_python=str(fake))


async def test_unknown_peer_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(UnknownPeerError):
        await ensure_peer("haproxy", root=tmp_path / "peers")
    assert not (tmp_path / "peers").exists()


# --- the install lock ------------------------------------------------------------------------


def _open_fds() -> set[str]:
    return {p.name for p in Path("/proc/self/fd").iterdir()}


async def test_waiting_for_the_install_lock_cancelled_leaves_no_descriptor_open(
    tmp_path: Path,
) -> None:
    """Another process holds the install lock; a caller that gives up waiting (cancelled)
    closes the lock file it opened, and the lock is still the holder's alone."""
    lock = tmp_path / "vllm-router.lock"
    before = _open_fds()
    with lock.open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        opened = _open_fds()
        waiter = asyncio.create_task(_enter(_DirLock(lock)))
        for _ in range(5):  # polled: still waiting after several polls
            await asyncio.sleep(peers_module._LOCK_POLL_S)
        assert not waiter.done()
        assert len(_open_fds() - opened) == 1  # the waiter's lock file
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert _open_fds() == opened
    assert _open_fds() == before


async def _enter(lock: _DirLock) -> None:
    async with lock:
        pass


async def test_a_caller_cancelled_while_its_log_file_opens_leaves_no_descriptor_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled while the log file is being opened in its thread: the descriptor the open
    returns afterwards is closed."""
    started = threading.Event()
    proceed = threading.Event()
    real_open = peers_module._open_log

    def slow_open(path: Path, *, append: bool = True) -> int:
        started.set()
        proceed.wait(10)
        return real_open(path, append=append)

    monkeypatch.setattr(peers_module, "_open_log", slow_open)
    before = _open_fds()
    task = asyncio.create_task(peers_module._open_log_async(tmp_path / "x.log"))
    await asyncio.to_thread(started.wait, 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    proceed.set()
    for _ in range(100):  # the open finishes in its thread, then its descriptor is closed
        await asyncio.sleep(0.01)
        if _open_fds() == before:
            break
    assert _open_fds() == before
    assert (tmp_path / "x.log").exists()
