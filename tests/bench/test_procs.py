"""Tests of the local process helpers: real child processes, real engine-sim fleets."""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from sage_llm.bench.peers import PeerInstall, get_spec
from sage_llm.bench.procs import (
    ProcessStartError,
    counter_total,
    engine_sim_argv,
    free_ports,
    group_cpu_s,
    serving,
    spawn,
    start_engine_sims,
    start_peer_router,
)
from sage_llm.errors import ConfigError


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for a reaper counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _pids_with_port(port: int) -> list[int]:
    """Processes whose command line contains ``--port <port>``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a == b"--port" and b == str(port).encode() for a, b in itertools.pairwise(argv)):
            found.append(int(entry.name))
    return [pid for pid in found if _alive(pid)]


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _read(path: Path) -> str:
    return path.read_text()


async def _eventually(condition: Callable[[], bool]) -> None:
    """Wait (at most a few seconds) for an operating-system event to show."""
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the condition never became true")


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = free_ports(5)
    assert len(set(ports)) == 5
    assert all(1024 <= p < 65536 for p in ports)


def test_engine_sim_command_line() -> None:
    argv = engine_sim_argv(8001, model="llama-3-70b", gpu="h200", speed=4, role="decode",
                           served_model_name="big", seed=3, python="/py")  # fmt: skip
    assert argv == [
        "/py", "-m", "sage_llm.cli", "engine-sim", "--model", "llama-3-70b", "--gpu", "h200",
        "--host", "127.0.0.1", "--port", "8001", "--speed", "4.0", "--role", "decode",
        "--seed", "3", "--served-model-name", "big",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"n": 0}, "n"),
        ({"n": 1, "speed": 0.0}, "speed"),
        ({"n": 2, "role": ["prefill"]}, "role"),
        ({"n": 1, "role": "encoder"}, "role"),
        ({"n": 2, "ports": [9000, 9000]}, "ports"),
        ({"n": 1, "ports": [9000], "base_port": 9000}, "ports"),
        ({"n": 1, "base_port": 70000}, "ports"),
    ],
)
async def test_bad_fleet_arguments_fail_before_anything_starts(
    kwargs: dict[str, object], key: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError) as info:
        await start_engine_sims(log_dir=tmp_path, **kwargs)  # type: ignore[arg-type]
    assert info.value.key == key
    assert _names(tmp_path) == []


async def test_bad_router_arguments_fail_before_anything_starts() -> None:
    with pytest.raises(ConfigError, match="no policy 'kv_aware'"):
        await start_peer_router("sglang-router", ["http://127.0.0.1:1"], policy="kv_aware")
    with pytest.raises(ConfigError, match="PD mode needs prefill and decode URLs"):
        await start_peer_router("vllm-router", pd=(["http://127.0.0.1:1"], []))


async def test_stop_kills_the_whole_process_group(tmp_path: Path) -> None:
    log = tmp_path / "group.log"
    script = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen(['sh', '-c', 'trap \"\" TERM; sleep 60'])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = await spawn("group", [sys.executable, "-c", script], port=0, log_path=log)
    await _eventually(lambda: bool(log.read_text().strip()))
    child = int(log.read_text().split()[0])
    assert _alive(child)
    status = await proc.stop(grace_s=5.0)
    assert status < 0  # ended by a signal
    # it ignored SIGTERM, so only the group's SIGKILL (which lands asynchronously) ends it
    await _eventually(lambda: not _alive(child))
    assert await proc.stop() == status  # idempotent


async def test_a_process_that_exits_reports_its_log(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "import sys; print('bad flag --frobnicate'); sys.exit(3)"]
    proc = await spawn("broken", argv, port=free_ports(1)[0], log_path=tmp_path / "b.log")
    with pytest.raises(ProcessStartError, match="exited with status 3") as info:
        await proc.wait_ready("/health", lambda s, b: s == 200, timeout_s=30.0)
    assert info.value.log_path == tmp_path / "b.log"
    assert "bad flag --frobnicate" in info.value.message


async def test_a_process_that_never_answers_is_not_ready(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "import time; time.sleep(60)"]
    proc = await spawn("silent", argv, port=free_ports(1)[0], log_path=tmp_path / "s.log")
    try:
        with pytest.raises(ProcessStartError, match="was not ready after 0 s"):
            await proc.wait_ready("/health", lambda s, b: s == 200, timeout_s=0.0)
    finally:
        await proc.stop()


def _leaves_a_child(pid_file: Path) -> str:
    """A shell script that starts a child in its process group, notes its pid in
    ``pid_file`` and exits with status 3 (a start-up that fails)."""
    return f"sleep 60 & echo $! > {pid_file}; exit 3"


async def test_a_peer_router_that_fails_to_start_is_stopped_with_its_group(
    tmp_path: Path,
) -> None:
    spec = get_spec("vllm-router")
    venv = tmp_path / "venv"
    script = venv / "bin" / spec.launch[0]
    script.parent.mkdir(parents=True)
    script.write_text(f"#!/bin/sh\n{_leaves_a_child(tmp_path / 'child.pid')}\n")
    script.chmod(0o755)
    install = PeerInstall(spec, venv, spec.version, None, 0)
    with pytest.raises(ProcessStartError, match="exited with status 3"):
        await start_peer_router(
            "vllm-router", ["http://127.0.0.1:1"], install=install, log_dir=tmp_path / "logs"
        )
    child = int((tmp_path / "child.pid").read_text())
    await _eventually(lambda: not _alive(child))


async def test_a_served_process_that_fails_to_start_is_stopped_with_its_group(
    tmp_path: Path,
) -> None:
    argv = ["sh", "-c", _leaves_a_child(tmp_path / "child.pid")]
    with pytest.raises(ProcessStartError, match="exited with status 3"):
        async with serving("broken", argv, port=free_ports(1)[0], log_path=tmp_path / "b.log"):
            raise AssertionError("it never became ready")
    child = int((tmp_path / "child.pid").read_text())
    await _eventually(lambda: not _alive(child))


async def test_a_missing_program_is_a_start_error(tmp_path: Path) -> None:
    with pytest.raises(ProcessStartError, match="cannot start nothing"):
        await spawn("nothing", ["/nonexistent/bin"], port=1, log_path=tmp_path / "n.log")


async def test_engine_sims_serve_health_and_metrics_then_stop() -> None:
    fleet = await start_engine_sims(2, speed=50.0, role=["prefill", "decode"])
    async with fleet:
        assert len(set(fleet.urls)) == 2
        assert fleet.urls_for("prefill") == fleet.urls[:1]
        assert fleet.urls_for("decode") == fleet.urls[1:]
        metrics = await fleet.metrics()
        for samples in metrics.values():
            assert counter_total(samples, "vllm:prompt_tokens_total") == 0.0
            assert "vllm:num_requests_running" in samples
        pids = [e.pid for e in fleet.engines]
        assert _names(fleet.log_dir) == sorted(f"engine-sim-{e.port}.log" for e in fleet.engines)
    assert all(e.returncode is not None for e in fleet.engines)
    assert not any(_alive(pid) for pid in pids)
    assert not fleet.log_dir.exists()  # a temporary log directory goes with a clean close


async def test_an_engine_that_cannot_start_names_its_log() -> None:
    with pytest.raises(ProcessStartError) as info:
        await start_engine_sims(1, gpu="abacus")
    assert "abacus" in info.value.message
    assert "abacus" in _read(info.value.log_path)  # kept for reading
    shutil.rmtree(info.value.log_path.parent)


async def test_cancelling_a_start_leaves_no_engine_behind(tmp_path: Path) -> None:
    ports = free_ports(2)
    task = asyncio.create_task(start_engine_sims(2, ports=ports, log_dir=tmp_path))
    # both spawned (engine-sim takes over a second to import, so neither is ready yet)
    await _eventually(lambda: all(_pids_with_port(p) for p in ports))
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [_pids_with_port(p) for p in ports] == [[], []]


def test_this_is_linux() -> None:
    """The helpers rely on process groups and /proc, as CI and benchmark hosts have."""
    assert sys.platform.startswith("linux")
    assert os.getpgid(0) > 0


def test_group_cpu_counts_this_process() -> None:
    spent = time.process_time()
    # every live process of this test's group, this one included (10 ms clock ticks)
    assert group_cpu_s(os.getpgrp()) >= spent - 0.05
    assert group_cpu_s(2**22 + 12345) == 0.0  # no such group
