"""The local launcher with real processes: simulated engines serving a real control plane,
engines that die or hang, SIGTERM → SIGKILL escalation and cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest
from aiohttp import web

from sage_llm.control_plane.manager import ControlPlaneManager
from sage_llm.control_plane.parallelism import PlannedInstance, SLOTarget, WorkloadProfile, plan
from sage_llm.errors import ConfigError, EngineError, EngineTimeoutError, InstanceNotFoundError
from sage_llm.launch import (
    EngineLaunch,
    LaunchConfig,
    LaunchSettings,
    launch_engines,
    launch_from_config,
    local,
    wait_healthy,
)
from sage_llm.launch.local import _log_problem
from sage_llm.types import ExecutionInstanceType, RequestMetadata, RequestStatus
from tests.factories import alive, free_ports

GENERAL = ExecutionInstanceType.GENERAL
PREFILL, DECODE = ExecutionInstanceType.PREFILLING, ExecutionInstanceType.DECODING

# A stand-in engine: answers /health, writes its pid, optionally ignores SIGTERM.
STUB = """
import http.server, os, signal, sys
port, pidfile, stubborn = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
if stubborn:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
    def log_message(self, *a):
        pass
srv = http.server.HTTPServer(("127.0.0.1", port), H)
open(pidfile, "w").write(str(os.getpid()))
print("stub ready", flush=True)
srv.serve_forever()
"""


def stub(tmp_path: Path, name: str, port: int, *, stubborn: bool = False) -> EngineLaunch:
    script = tmp_path / "stub.py"
    script.write_text(STUB)
    argv = (
        sys.executable,
        str(script),
        str(port),
        str(tmp_path / f"{name}.pid"),
        "1" if stubborn else "0",
    )
    return EngineLaunch(name, GENERAL, argv, {}, "127.0.0.1", port, (0,), model_name="m")


def script(name: str, code: str, port: int) -> EngineLaunch:
    return EngineLaunch(name, GENERAL, (sys.executable, "-c", code), {}, "127.0.0.1", port, (0,))


def settings(tmp_path: Path, **kw: object) -> LaunchSettings:
    values: dict[str, object] = {"log_dir": tmp_path / "logs", "health_poll_s": 0.05}
    values.update(kw)
    return LaunchSettings(**values)  # type: ignore[arg-type]


async def ask(
    cp: ControlPlaneManager, ids: Sequence[str]
) -> list[tuple[RequestStatus, str | None, int]]:
    results = await asyncio.gather(
        *(
            cp.generate(
                RequestMetadata(i, prompt="Plan the fleet.", max_tokens=6, model_name="llama-3-8b")
            )
            for i in ids
        )
    )
    return [(r.status, r.instance_id, r.completion_tokens) for r in results]


async def test_two_simulated_engines_launch_register_serve_and_stop(tmp_path: Path) -> None:
    base = free_ports(2)
    (tmp_path / "fleet.toml").write_text(
        f"""
        [launch]
        engine = "sim"
        model = "llama-3-8b"
        base_port = {base}
        machine_id = "box-1"
        log_dir = "logs"
        health_poll_s = 0.1
        stop_grace_s = 5
        max_concurrent_requests = 32
        [[launch.instances]]
        gpu_ids = [0]
        [[launch.instances]]
        gpu_ids = [1]
        """
    )
    async with ControlPlaneManager(scheduling_policy="fifo", routing_strategy="round_robin") as cp:
        fleet = await launch_from_config(tmp_path / "fleet.toml", manager=cp)
        async with fleet:
            ids = ["box-1-general-0", "box-1-general-1"]
            assert [i.instance_id for i in cp.get_instances()] == ids
            inst = cp.get_instances()[0]
            assert (inst.host, inst.port, inst.machine_id, inst.max_concurrent_requests) == (
                "127.0.0.1", base, "box-1", 32,
            )  # fmt: skip
            assert inst.metadata["pid"] == fleet.processes[0].pid
            results = await ask(cp, [f"r{k}" for k in range(4)])
            assert all(status is RequestStatus.COMPLETED and n == 6 for status, _, n in results)
            assert {iid for _, iid, _ in results} == set(ids)
            assert "engine-sim" in (tmp_path / "logs" / "box-1-general-0.log").read_text()
        assert cp.get_instances() == []
        assert all(p.returncode is not None for p in fleet.processes)
        assert not any(alive(p.pid) for p in fleet.processes)


async def test_an_engine_that_exits_fails_the_launch_and_stops_the_others(tmp_path: Path) -> None:
    base = free_ports(2)
    good = stub(tmp_path, "good", base)
    bad = script("bad", "import sys; print('model not found', flush=True); sys.exit(3)", base + 1)
    with pytest.raises(EngineError, match="'bad' exited with code 3 before it was healthy") as info:
        await launch_engines([good, bad], settings=settings(tmp_path, health_timeout_s=30))
    assert "model not found" in info.value.message
    assert info.value.instance_id == "bad"
    pid = int((tmp_path / "good.pid").read_text()) if (tmp_path / "good.pid").exists() else None
    assert pid is None or not alive(pid)


async def test_a_missing_program_is_a_clear_error(tmp_path: Path) -> None:
    missing = EngineLaunch("x", GENERAL, ("/nonexistent/vllm", "serve"), {}, "127.0.0.1", 1, (0,))
    with pytest.raises(EngineError, match="cannot start '/nonexistent/vllm'"):
        await launch_engines([missing], settings=settings(tmp_path))


async def test_health_timeout(tmp_path: Path) -> None:
    hang = script("hang", "import time; time.sleep(60)", free_ports(1))
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(EngineTimeoutError, match=r"'hang' not healthy after 0\.3 s") as info:
        # a poll interval beyond the timeout: the timeout still bounds the wait
        await launch_engines(
            [hang], settings=settings(tmp_path, health_timeout_s=0.3, health_poll_s=20.0)
        )
    assert loop.time() - started < 10.0
    assert "(GET http://127.0.0.1:" in str(info.value)  # what was polled, and its answer
    # the log records the command line that was run
    assert "time.sleep(60)" in (tmp_path / "logs" / "hang.log").read_text()


async def test_sigterm_then_sigkill_after_the_grace_period(tmp_path: Path) -> None:
    port = free_ports(1)
    manager = ControlPlaneManager()
    fleet = await launch_engines(
        [stub(tmp_path, "stubborn", port, stubborn=True)],
        manager=manager,
        settings=settings(tmp_path, stop_grace_s=0.3, machine_id="m"),
    )
    assert [i.instance_id for i in manager.get_instances()] == ["stubborn"]
    await fleet.aclose()
    assert fleet.processes[0].returncode == -9  # ignored SIGTERM, so it was killed
    with pytest.raises(InstanceNotFoundError):
        manager.unregister_instance("stubborn")
    await fleet.aclose()  # idempotent


async def test_a_polite_engine_stops_on_sigterm(tmp_path: Path) -> None:
    fleet = await launch_engines(
        [stub(tmp_path, "polite", free_ports(1))], settings=settings(tmp_path)
    )
    async with fleet:
        assert fleet.base_urls == [fleet.processes[0].launch.base_url]
        assert "polite" in fleet.describe()
    assert fleet.processes[0].returncode == -15


async def test_cancelling_a_launch_kills_what_it_started(tmp_path: Path) -> None:
    port = free_ports(1)
    # Writes its pid, then never opens the port: the launch waits for health until cancelled.
    pidfile = tmp_path / "slow.pid"
    code = f"import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    task = asyncio.create_task(
        launch_engines(
            [script("slow", code, port)], settings=settings(tmp_path, health_timeout_s=60)
        )
    )
    for _ in range(400):
        if pidfile.exists() and pidfile.read_text():
            break
        await asyncio.sleep(0.025)
    pid = int(pidfile.read_text())
    assert alive(pid)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not alive(pid)


async def test_wait_healthy_reports_an_exit() -> None:
    async def gone() -> int | None:
        return 1

    with pytest.raises(EngineError, match="exited with code 1"):
        await wait_healthy("http://127.0.0.1:1/health", exited=gone, timeout_s=5)


async def test_launch_from_config_rejects_other_sources() -> None:
    with pytest.raises(
        ConfigError, match="expected a launch file, plan file, Plan or LaunchConfig"
    ):
        await launch_from_config(42)  # type: ignore[arg-type]


async def test_a_port_another_process_holds_fails_the_launch_before_any_engine_starts(
    tmp_path: Path,
) -> None:
    base = free_ports(2)
    with socket.socket() as stranger:  # listening: it would answer the health checks
        stranger.bind(("127.0.0.1", base + 1))
        stranger.listen()
        engines = [stub(tmp_path, "first", base), stub(tmp_path, "second", base + 1)]
        with pytest.raises(
            EngineError,
            match=rf"^instance 'second': port {base + 1} on 127\.0\.0\.1 is already in use "
            r"\(another process holds it\)$",
        ) as info:
            await launch_engines(engines, settings=settings(tmp_path))
    assert info.value.instance_id == "second"
    assert not (tmp_path / "logs").exists()  # nothing was started
    assert not (tmp_path / "first.pid").exists()


async def test_a_taken_nixl_side_channel_port_fails_the_launch(tmp_path: Path) -> None:
    """A tp=2 PD engine binds one side-channel port per rank: the second one is checked."""
    base = free_ports(3)
    env = {"VLLM_NIXL_SIDE_CHANNEL_PORT": str(base + 1)}
    prefill = replace(script("pd-p0", "raise SystemExit(3)", base), role=PREFILL, env=env, tp=2)
    assert list(prefill.side_channel_ports) == [base + 1, base + 2]
    with socket.socket() as stranger:
        stranger.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        stranger.bind(("127.0.0.1", base + 2))
        stranger.listen()
        with pytest.raises(
            EngineError,
            match=rf"^instance 'pd-p0': NIXL side-channel port {base + 2} on 127\.0\.0\.1 is "
            r"already in use \(another process holds it\)$",
        ):
            await launch_engines([prefill], settings=settings(tmp_path))


async def test_a_port_taken_on_another_address_fails_a_launch_binding_every_address(
    tmp_path: Path,
) -> None:
    """Reached on 127.0.0.1 but bound on 0.0.0.0: a listener on 127.0.0.2 is in the way."""
    port = free_ports(1)
    with socket.socket() as stranger:
        stranger.bind(("127.0.0.2", port))
        stranger.listen()
        engine = replace(script("e0", "raise SystemExit(3)", port), bind_host="0.0.0.0")
        with pytest.raises(
            EngineError,
            match=rf"^instance 'e0': port {port} on 0\.0\.0\.0 is already in use "
            r"\(another process holds it\)$",
        ):
            await launch_engines([engine], settings=settings(tmp_path))


async def _health_server() -> tuple[web.AppRunner, int]:
    """An HTTP server in this process (no engine's) answering ``GET /health`` 200."""

    async def health(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/health", health)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, int(runner.addresses[0][1])


async def test_an_engine_that_exits_as_its_port_answers_is_a_failed_start() -> None:
    """Something else answers /health while the engine has died: not healthy."""
    runner, port = await _health_server()
    calls = 0

    async def dies_meanwhile() -> int | None:
        nonlocal calls
        calls += 1
        return None if calls == 1 else 1

    try:
        with pytest.raises(EngineError, match="exited with code 1 before it was healthy"):
            await wait_healthy(
                f"http://127.0.0.1:{port}/health", exited=dies_meanwhile, timeout_s=5
            )
    finally:
        await runner.cleanup()


async def test_each_run_starts_its_log_afresh(tmp_path: Path) -> None:
    port = free_ports(1)
    first = script("e", "import sys; print('first run failed', flush=True); sys.exit(3)", port)
    with pytest.raises(EngineError, match="first run failed"):
        await launch_engines([first], settings=settings(tmp_path, health_timeout_s=30))
    second = script("e", "import sys; print('second run failed', flush=True); sys.exit(4)", port)
    with pytest.raises(EngineError, match="exited with code 4") as info:
        await launch_engines([second], settings=settings(tmp_path, health_timeout_s=30))
    assert "first run" not in info.value.message
    text = (tmp_path / "logs" / "e.log").read_text()
    assert text.startswith("$ ") and "second run failed" in text and "first run" not in text


async def test_an_engine_that_exits_while_serving_is_logged_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base = free_ports(2)
    fleet = await launch_engines(
        [stub(tmp_path, "a", base), stub(tmp_path, "b", base + 1)], settings=settings(tmp_path)
    )
    async with fleet:
        with caplog.at_level("WARNING", logger="sage_llm.launch"):
            victim = fleet.processes[1]
            os.kill(victim.pid, signal.SIGKILL)
            await asyncio.wait_for(victim.process.wait(), 10)
            for _ in range(100):  # the watcher runs once the loop has seen the exit
                if caplog.records:
                    break
                await asyncio.sleep(0.01)
        assert [r.getMessage() for r in caplog.records] == [
            f"engine b (pid {victim.pid}) exited with code -9 (SIGKILL) while serving; it is "
            "not restarted and health checks will eject it; its log: "
            f"{tmp_path / 'logs' / 'b.log'}"
        ]
        caplog.clear()
    assert caplog.records == []  # stopping the fleet is no unexpected exit


async def test_launch_from_config_refuses_a_fleet_its_manager_could_never_serve(
    tmp_path: Path,
) -> None:
    pd = [PlannedInstance(PREFILL, 1, 1, 1, (0,)), PlannedInstance(DECODE, 1, 1, 1, (1,))]
    config = LaunchConfig(settings(tmp_path, model="llama-3-8b"), pd)
    cp = ControlPlaneManager(enable_pd_separation=False)
    with pytest.raises(ConfigError, match=r"only 1 prefill and 1 decode instances: .* disabled"):
        await launch_from_config(config, manager=cp)
    alone = LaunchConfig(config.settings, pd[:1])
    with pytest.raises(ConfigError, match="no decode-capable instance to pair with"):
        await launch_from_config(alone, manager=ControlPlaneManager())
    assert not (tmp_path / "logs").exists()


async def test_a_log_that_cannot_be_written_fails_the_launch_before_any_engine_starts(
    tmp_path: Path,
) -> None:
    (tmp_path / "afile").write_text("")
    base = free_ports(2)
    engines = [stub(tmp_path, "first", base), stub(tmp_path, "second", base + 1)]
    unusable = settings(tmp_path, log_dir=tmp_path / "afile" / "logs")
    with pytest.raises(EngineError, match=r"^instance 'first': cannot write its log .*afile"):
        await launch_engines(engines, settings=unusable)
    assert not (tmp_path / "first.pid").exists()  # nothing was started
    fine = settings(tmp_path)
    assert _log_problem(fine.log_dir / "x" / "first.log") is None
    assert not fine.log_dir.exists()  # the check left nothing behind


@pytest.mark.parametrize("engine", ["exits", "loads"])
async def test_a_stranger_answering_an_engines_port_fails_the_launch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: str
) -> None:
    """Two launches at once: both found the port free, the other one's engine took it."""
    monkeypatch.setattr(local, "_launch_problem", lambda launch, log_dir: None)
    runner, port = await _health_server()
    code = {
        "exits": f"import sys; print('port {port} is already in use', flush=True); sys.exit(1)",
        "loads": "import time; print('loading', flush=True); time.sleep(60)",
    }[engine]
    manager = ControlPlaneManager()
    try:
        with pytest.raises(
            EngineError,
            match=rf"^instance 'e' (does not hold its port {port}: another process listens "
            rf"there and answered GET http://127\.0\.0\.1:{port}/health|exited with code 1)",
        ) as info:
            await launch_engines(
                [replace(script("e", code, port), model_name="m")],
                manager=manager,
                settings=settings(tmp_path),
            )
    finally:
        await runner.cleanup()
    assert info.value.instance_id == "e"
    assert manager.get_instances() == []


async def test_an_engine_that_exited_is_noticed_before_the_loop_reaps_it(tmp_path: Path) -> None:
    launch = script("e", "import sys; sys.exit(3)", free_ports(1))
    proc = await local._spawn(launch, tmp_path)
    try:
        with contextlib.suppress(ChildProcessError):  # (the child watcher may reap it first)
            # blocks on purpose: the loop must not run (and see the exit) meanwhile
            os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # noqa: ASYNC222 - see above
        assert proc.returncode is None  # the loop has not seen the exit yet
        assert await proc.exited() == 3
    finally:
        await proc.stop(1.0)


async def test_the_fleet_waits_its_stop_grace_s_not_the_default(tmp_path: Path) -> None:
    fleet = await launch_engines(
        [stub(tmp_path, "stubborn", free_ports(1), stubborn=True)],
        settings=settings(tmp_path, stop_grace_s=0.2),
    )
    assert fleet.stop_grace_s == 0.2
    await asyncio.wait_for(fleet.aclose(), 5)  # the default grace would be 10 s
    assert fleet.processes[0].returncode == -9


async def test_an_engine_that_exits_before_the_launch_is_done_fails_it(tmp_path: Path) -> None:
    """Healthy once, then dead while another engine still loads: the launch fails."""
    base = free_ports(2)
    done = tmp_path / "a.done"
    first = f"""
import http.server, sys, time
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
    def log_message(self, *a):
        pass
srv = http.server.HTTPServer(("127.0.0.1", {base}), H)
srv.handle_request()
time.sleep(1.5)  # the launcher counts it healthy meanwhile
print("lost the GPU", flush=True)
open({str(done)!r}, "w").close()
sys.exit(5)
"""
    waits = (  # (and a while longer: the launcher must not see it healthy before a's exit)
        f"import os, time\nwhile not os.path.exists({str(done)!r}): time.sleep(0.02)\n"
        "time.sleep(0.5)\n"
    )
    second = stub(tmp_path, "b", base + 1)  # serves once the first has exited
    _, path, *args = second.argv
    second = replace(
        second, argv=(sys.executable, "-c", f"{waits}exec(open({path!r}).read())", *args)
    )
    with pytest.raises(EngineError, match="'a' exited with code 5 during the launch") as info:
        await launch_engines(
            [script("a", first, base), second], settings=settings(tmp_path, health_timeout_s=30)
        )
    assert "lost the GPU" in info.value.message
    assert not alive(int((tmp_path / "b.pid").read_text()))


async def test_a_failed_launch_reports_the_end_of_the_engines_log(tmp_path: Path) -> None:
    code = "print('early line\\n' * 2000, flush=True); print('last words', flush=True); exit(3)"
    with pytest.raises(EngineError, match="exited with code 3") as info:
        await launch_engines(
            [script("e", code, free_ports(1))], settings=settings(tmp_path, health_timeout_s=30)
        )
    tail = info.value.message.split("e.log:\n", 1)[1]
    assert tail.endswith("last words") and len(tail) <= 4000
    assert "$ " not in tail  # the command line heads the log, far from its end


@pytest.mark.parametrize("status", [204, 404, 503])
async def test_health_is_an_answer_200_not_any_answer(status: int) -> None:
    async def unavailable(_request: web.Request) -> web.Response:
        return web.Response(status=status)

    async def running() -> int | None:
        return None

    app = web.Application()
    app.router.add_get("/health", unavailable)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = int(runner.addresses[0][1])
    try:
        with pytest.raises(EngineTimeoutError, match=rf"GET .*/health: HTTP {status}\)"):
            await wait_healthy(
                f"http://127.0.0.1:{port}/health", exited=running, timeout_s=0.2, poll_s=0.05
            )
    finally:
        await runner.cleanup()


async def test_a_plan_is_launched_as_simulated_engines_of_its_model_and_gpu(
    tmp_path: Path,
) -> None:
    """A :class:`Plan` given as is: settings of another model than the plan's are refused
    before anything starts; without settings its model and GPU are simulated."""
    planned = plan("llama-3-8b", 1, "h100", WorkloadProfile(512, 64), SLOTarget(2.0, 0.05))
    other = settings(tmp_path, model="llama-3-70b", sim_gpu="H100")
    with pytest.raises(ConfigError, match="the plan is for the model 'Llama-3-8B'") as info:
        await launch_from_config(planned, settings=other)
    assert info.value.key == "settings"
    assert not (tmp_path / "logs").exists()  # nothing was started
    fleet = await launch_from_config(
        planned, settings=settings(tmp_path, model="llama-3-8b", base_port=free_ports(1))
    )
    async with fleet:
        assert [p.launch.model_name for p in fleet.processes] == ["llama-3-8b"]
        assert all(p.returncode is None for p in fleet.processes)
    assert all(p.returncode is not None for p in fleet.processes)


async def test_a_launch_files_plan_is_logged_with_what_it_cannot_carry(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``[launch.plan]`` plans at launch: what was planned is logged, and a rate no plan
    carries within the SLO is warned of (the fleet this hardware allows is served)."""
    (tmp_path / "fleet.toml").write_text(
        f'[launch]\nmodel = "llama-3-8b"\nbase_port = {free_ports(1)}\nlog_dir = "logs"\n'
        'health_poll_s = 0.05\n[launch.plan]\ngpus = "1xH100"\nslo_ttft = "2s"\n'
        'slo_tpot = "50ms"\nrate = 100000\n'
    )
    with caplog.at_level(logging.INFO, logger="sage_llm.launch"):
        fleet = await launch_from_config(tmp_path / "fleet.toml")
        async with fleet:
            assert len(fleet.processes) == 1
    assert "planned 1 × TP1 for Llama-3-8B on H100" in caplog.text
    warning = next(r for r in caplog.records if r.levelno == logging.WARNING)
    assert warning.getMessage().startswith(
        "[launch.plan]: no plan meets the SLO at 100000 req/s: the highest goodput capacity"
    )


async def test_a_close_cancelled_again_still_stops_the_fleet() -> None:
    """A second Ctrl-C while the fleet closes: the close runs to its end, then the
    cancellation goes on to the caller."""

    class SlowFleet:
        def __init__(self) -> None:
            self.closing = asyncio.Event()
            self.may_end = asyncio.Event()
            self.closed = False

        async def aclose(self) -> None:
            self.closing.set()
            await self.may_end.wait()
            self.closed = True

    fleet = SlowFleet()
    closer = asyncio.create_task(local.shielded_close(fleet))
    await fleet.closing.wait()
    closer.cancel()
    await asyncio.sleep(0)
    assert not closer.done() and not fleet.closed  # still closing
    fleet.may_end.set()
    with pytest.raises(asyncio.CancelledError):
        await closer
    assert fleet.closed


def test_the_tail_of_a_log_that_is_gone_is_empty(tmp_path: Path) -> None:
    assert local.log_tail(tmp_path / "gone.log") == ""
