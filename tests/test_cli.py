"""The ``sage-llm`` command line: every bad input is a clear error before any work starts
(never a traceback), and ``launch`` stops what it started whenever it is told to stop."""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.core import TyperGroup
from typer.testing import CliRunner

from sage_llm.cli import app
from sage_llm.control_plane.parallelism import plan_command
from sage_llm.errors import ConfigError, SageLLMError
from tests.factories import alive, free_ports

CLI = (sys.executable, "-m", "sage_llm.cli")


@pytest.fixture(autouse=True)
def _keep_logging_and_width(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Commands set the root logger's level; error panels wrap at the terminal's width."""
    monkeypatch.setenv("COLUMNS", "240")
    level = logging.getLogger().level
    yield
    logging.getLogger().setLevel(level)


def invoke(*argv: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(argv))
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


def run_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*CLI, *argv], capture_output=True, text=True, timeout=60, check=False)
    assert "Traceback" not in proc.stderr + proc.stdout
    return proc


@contextlib.contextmanager
def listening() -> Iterator[int]:
    """A port another process (this test) listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


# -- arguments are checked when they are parsed ------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["serve", "--port", "99999"], "Invalid value for '--port': must be a port number"),
        (["serve", "--port", "-1"], "must be a port number (1-65535, or 0: any free one), got -1"),
        (["serve", "--host", ""], "Invalid value for '--host': must not be empty (0.0.0.0 binds"),
        (["serve", "--host", " "], "Invalid value for '--host': must not be empty"),
        (["engine-sim", "--host", ""], "Invalid value for '--host': must not be empty"),
        (["launch", "fleet.toml", "--host", ""], "Invalid value for '--host': must not be empty"),
        (["serve", "--host", "http://x"], "must be a host name or address, got 'http://x'"),
        (["engine-sim", "--port", "0"], "Invalid value for '--port': must be a port number"),
        (["engine-sim", "--port", "65536"], "(1-65535), got 65536"),
        (["launch", "fleet.toml", "--port", "70000"], "Invalid value for '--port'"),
        (["launch", "plan.json", "--base-port", "0"], "Invalid value for '--base-port'"),
        (
            ["engine-sim", "--role", "weird"],
            "Invalid value for '--role': unknown role 'weird' "
            "(expected general, prefill or decode)",
        ),
        (["engine-sim", "--speed", "0"], "Invalid value for '--speed': must be a finite number"),
        (["engine-sim", "--tp", "0"], "Invalid value for '--tp': must be >= 1, got 0"),
        (["engine-sim", "--max-model-len", "0"], "'--max-model-len': must be >= 1, got 0"),
        (["engine-sim", "--max-loras", "0"], "'--max-loras': must be >= 1, got 0"),
        (["engine-sim", "--served-model-name", " "], "'--served-model-name': must not be empty"),
        (
            ["engine-sim", "--block-size", "24"],
            "'--block-size': must be one of 1, 8, 16, 32, 64, 128 (as vLLM's), got 24",
        ),
        (["demo", "--sessions", "0"], "Invalid value for '--sessions': must be >= 1, got 0"),
        (["demo", "--sessions", "-3"], "Invalid value for '--sessions': must be >= 1, got -3"),
        (["demo", "--rate", "0"], "Invalid value for '--rate': must be a finite number > 0, got 0"),
        (
            ["demo", "--rate", "nan"],
            "Invalid value for '--rate': must be a finite number > 0, got nan",
        ),
        (["demo", "--rate", "inf"], "got inf"),
        (["demo", "--seed", "-1"], "Invalid value for '--seed': must be >= 0, got -1"),
        (["bench", "pd", "--seed", "-1"], "Invalid value for '--seed': must be >= 0, got -1"),
        (["bench", "compare", "--seed", "-2"], "Invalid value for '--seed': must be >= 0"),
        (
            ["bench", "compare", "--lora-adapters", "-1"],
            "Invalid value for '--lora-adapters': must be >= 0",
        ),
        (["bench", "compare", "--max-loras", "0"], "Invalid value for '--max-loras'"),
        (
            ["bench", "compare", "--overload", "--lora-adapters", "4"],
            "--overload runs its own workload, presets and fleet: --lora-adapters does not apply",
        ),
        (["bench", "pd", "--speed", "-1"], "Invalid value for '--speed': must be a finite number"),
        (["bench", "pd", "--speed", "0"], "Invalid value for '--speed'"),
        (
            ["bench", "compare", "--rates", "a,b"],
            "Invalid value for '--rates': 'a' is not a number",
        ),
        (
            ["bench", "compare", "--rates", "1,-2"],
            "Invalid value for '--rates': must be finite numbers > 0, got -2",
        ),
        (["bench", "compare", "--rates", "2,1,2"], "Invalid value for '--rates': 2 is given twice"),
        (
            ["bench", "compare", "--presets", "fifo+round_robin,fifo + round_robin"],
            "Invalid value for '--presets': fifo + round_robin is given twice",
        ),
        (
            ["bench", "compare", "--presets", "fifo+round_robin,FIFO+round-robin"],
            "Invalid value for '--presets': FIFO+round-robin is given twice",
        ),
        (
            ["bench", "compare", "--presets", "fifo+nosuch"],
            "Invalid value for '--presets': "
            "preset 'fifo+nosuch': unknown routing strategy 'nosuch'",
        ),
        (
            ["bench", "compare", "--presets", "nosuch+locality"],
            "unknown scheduling policy 'nosuch'",
        ),
        (["bench", "compare", "--presets", "fifo"], "preset 'fifo' is not 'policy+routing'"),
        (
            ["bench", "compare", "--peers", "nginx"],
            "Invalid value for '--peers': unknown peer 'nginx'",
        ),
        (
            ["bench", "proxy", "--peers", "nginx"],
            "Invalid value for '--peers': unknown peer 'nginx' (known: python-forwarder, ",
        ),
        (["bench", "proxy", "--peers", "vllm-router,vllm-router"], "vllm-router is given twice"),
        (["bench", "proxy", "--c1-warmup", "-1"], "Invalid value for '--c1-warmup'"),
        (
            ["bench", "compare", "--workload", "nope"],
            "Invalid value for '--workload': unknown workload 'nope'",
        ),
        (["bench", "compare", "--engines", "0"], "Invalid value for '--engines': must be >= 1"),
        (
            ["bench", "compare", "--overload", "--rate", "3", "--speed", "0.5"],
            "--overload runs its own workload, presets and fleet: --rate, --speed do not apply",
        ),
        (["bench", "compare", "--duration-s", "0"], "Invalid value for '--duration-s'"),
        (
            ["launch", "fleet.toml", "--policy", "nosuch"],
            "Invalid value for '--policy': unknown scheduling policy 'nosuch'",
        ),
        (
            ["launch", "fleet.toml", "--routing", "nosuch"],
            "Invalid value for '--routing': unknown routing strategy 'nosuch'",
        ),
    ],
)
def test_bad_arguments_are_refused_when_parsed(
    argv: list[str], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def never(*_args: object, **_kwargs: object) -> int:
        raise AssertionError("the command ran")

    for module, name in (
        ("sage_llm.bench.demo", "run_demo"),
        ("sage_llm.bench.compare", "compare_main"),
        ("sage_llm.bench.compare", "overload_main"),
        ("sage_llm.bench.pd_bench", "pd_bench_main"),
        ("sage_llm.bench.proxy_bench", "proxy_bench_main"),
        ("sage_llm.launch", "launch_from_config"),
    ):
        monkeypatch.setattr(f"{module}.{name}", never)
    code, output = invoke(*argv)
    assert code == 2
    assert message in output


# -- what the arguments name is checked before any work -------------------------------------


@pytest.mark.parametrize(
    ("argv", "code", "said"),
    [
        # (then why, as the OS says it)
        (["--out", "/proc/x.json"], 1, "error: --out: cannot write /proc/x.json: "),
        # --speed compresses the real-time part only: without --realtime it would be ignored
        (["--speed", "4"], 2, "error: --speed: applies to the real-time part only: give --"),
    ],
)
def test_bench_pd_refuses_what_it_cannot_do_in_one_line_before_the_run(
    argv: list[str], code: int, said: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def never(**_kwargs: object) -> dict[str, object]:
        raise AssertionError("the benchmark ran")

    monkeypatch.setattr("sage_llm.bench.pd_bench.run_pd_bench", never)
    exit_code, output = invoke("bench", "pd", *argv)
    assert exit_code == code
    assert output.startswith(said)
    assert output.count("\n") == 1


def test_bench_pd_realtime_runs_at_the_librarys_default_speed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The command line and ``pd_bench_main`` agree on the real-time part's speed (0.25: at
    2, its old default, a 2-core machine measured its own CPU more than PD)."""
    from sage_llm.bench.pd_bench import REALTIME_SPEED, pd_bench_main
    from sage_llm.bench.pd_realtime import run_realtime

    seen: dict[str, object] = {}

    def record(**kwargs: object) -> int:
        seen.update(kwargs)
        return 0

    monkeypatch.setattr("sage_llm.bench.pd_bench.pd_bench_main", record)
    exit_code, output = invoke("bench", "pd", "--realtime", "--n-long", "0")
    assert exit_code == 0, output
    assert seen["speed"] == REALTIME_SPEED == 0.25
    for function in (pd_bench_main, run_realtime):
        assert inspect.signature(function).parameters["speed"].default == REALTIME_SPEED


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["bench", "compare", "--rate", "1", "--rates", "1,2"], "error: --rate: "),
        (["bench", "pd", "--fleets", "nope"], "error: --fleets: unknown fleet(s) nope"),
        (["bench", "proxy", "--prompt-tokens", "9000"], "error: --prompt-tokens: 9000 prompt"),
    ],
)
def test_bench_errors_name_the_option_as_typed(argv: list[str], said: str) -> None:
    """A bench command's refusal names the option (``--rate``), not the parameter."""
    code, output = invoke(*argv)
    assert code == 1
    assert output.startswith(said), output


def test_demo_help_says_which_part_the_sizes_apply_to() -> None:
    code, output = invoke("demo", "--help")
    assert code == 0
    text = " ".join(output.split())
    assert "Part 1 (the gateway over HTTP) always sends 120 requests" in text
    assert "--sessions and --rate size part 2" in text


def test_a_file_that_is_not_utf8_text_is_a_one_line_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xffGPU0\n")
    code, output = invoke("topo", "--file", str(bad))
    assert code == 1
    assert output == f"error: {bad}:1: not valid UTF-8 (byte 0xff, column 1)\n"
    code, output = invoke("plan", "--topology", str(bad))
    assert code == 1
    assert output == f"error: --topology: {bad}:1: not valid UTF-8 (byte 0xff, column 1)\n"
    toml = tmp_path / "fleet.toml"
    toml.write_bytes(b"[launch]\nmodel = '\xff'\n")
    code, output = invoke("launch", str(toml))
    assert code == 1
    assert output.endswith(f"error: {toml}:2: not valid UTF-8 (byte 0xff, column 10)\n")


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--prompt-len", "0", "--prompt-len: must be >= 1 token, got 0"),
        ("--output-len", "0", "--output-len: must be >= 1 token, got 0"),
        ("--slo-tpot", "5", "--slo-tpot: expected a duration such as 2s or 50ms, got '5'"),
        ("--gpus", "8xFOO", "--gpus: unknown GPU 'FOO'"),
        ("--model", "nosuch", "--model: unknown model 'nosuch'"),
    ],
)
def test_plan_errors_name_the_option(option: str, value: str, message: str) -> None:
    code, output = invoke("plan", "--model", "llama-3-8b", option, value)
    assert code == 1
    assert output.startswith(f"error: {message}")
    assert len(output.splitlines()) == 1


def test_plan_advice_for_idle_gpus_is_a_pool_that_could_serve() -> None:
    """The idle GPUs' --gpus keeps their layout per machine (an instance never spans two),
    and none is advised where one instance of the model could not fit."""
    code, output = invoke("plan", "--model", "llama-3-70b", "--gpus", "6xH100")
    assert code == 0 and "plan the rest on their own (--gpus 2xH100)" in output
    code, output = invoke("plan", "--model", "llama-3-70b", "--gpus", "2x3xH200")
    assert code == 0
    assert "too few on a machine (1) to hold Llama-3-70B on their own" in output


def test_launch_checks_every_engine_port_before_starting(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text("[launch]\nbase_port = 65535\n[[launch.instances]]\n[[launch.instances]]\n")
    code, output = invoke("launch", str(fleet), "--port", str(free_ports(1)))
    assert code == 1
    assert output.endswith(
        f"error: {fleet}:2: launch.base_port: 2 engines need ports 65535-65536, past 65535\n"
    )
    assert not (tmp_path / "sage-llm-logs").exists()


def test_launch_file_errors_name_the_line_and_the_expected_type(tmp_path: Path) -> None:
    fleet = tmp_path / "l.toml"
    fleet.write_text('[launch]\nbase_port = "8100"\n[[launch.instances]]\n')
    code, output = invoke("launch", str(fleet))
    assert code == 1
    assert output.endswith(
        f"error: {fleet}:2: launch.base_port: must be an integer, got string '8100'\n"
    )


def test_launch_options_for_a_plan_file_are_refused_with_a_launch_file(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text("[launch]\n[[launch.instances]]\n")
    for option in ("--base-port", "--node"):
        code, output = invoke("launch", str(fleet), option, "1")
        assert code == 1
        assert output.endswith(
            "error: --base-port, --log-dir and --node apply to a plan file (.json); "
            "a launch file sets base_port, log_dir and node\n"
        )


def test_a_plan_is_known_by_its_text_whatever_its_file_is_called(tmp_path: Path) -> None:
    """As config check knows it: a plan saved as plan.out had been read as TOML by launch."""
    plan = tmp_path / "plan.out"
    plan.write_text(plan_command("llama-3-8b", "2xH100", "2s", "50ms", as_json=True))
    code, output = invoke("config", "check", str(plan))
    assert code == 0 and "OK (2 engines on node 0)" in output
    code, output = invoke("launch", str(plan), "--node", "3")  # a plan's option: it is read
    assert code == 1 and f"{plan}: --node: " in output, output


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ("[services.llm_control_plane]\nenable_pd_separation = false\n", "enable_pd_separation"),
        ("[services.llm_control_plane.pd]\nenabled = false\n", "pd.enabled"),
    ],
)
def test_launching_pd_roles_with_pd_off_in_the_config_names_the_key_it_sets(
    tmp_path: Path, table: str, key: str
) -> None:
    plan = tmp_path / "pd.json"
    instances = [{"role": role, "tp": 1, "gpu_ids": [g], "node": 0}
                 for g, role in enumerate(("prefilling", "decoding"))]  # fmt: skip
    plan.write_text(json.dumps({"model": "llama-3-8b", "gpu": "H100", "instances": instances}))
    cfg = tmp_path / "nopd.toml"
    cfg.write_text(table)
    code, output = invoke("launch", str(plan), "--config", str(cfg), "--base-port", "18810")
    assert code == 1
    assert f"error: {cfg}:2: services.llm_control_plane.{key}: node 0" in output
    assert f"(the engines of {plan})" in output


def test_serve_refuses_a_json_file_as_config_check_does(tmp_path: Path) -> None:
    """config check reads a .json file as a plan: serve had run it as TOML all the same."""
    as_json = tmp_path / "cluster.json"
    as_json.write_text("[services.llm_control_plane]\n")
    code, output = invoke("serve", "--config", str(as_json))
    assert code == 1 and "a .json file is a plan (sage-llm launch starts its engines)" in output
    code, output = invoke("config", "check", str(as_json))
    assert code == 1


def split_plan(tmp_path: Path) -> Path:
    """A plan file as older planners wrote it: prefill on node 0, decode on node 1."""
    plan = tmp_path / "split.json"
    instances = [
        {"role": role, "tp": 1, "gpu_ids": [g], "node": node}
        for node, role in ((0, "prefilling"), (1, "decoding"))
        for g in range(2)
    ]
    plan.write_text(json.dumps({"model": "llama-3-8b", "gpu": "L40S", "instances": instances}))
    return plan


def test_launching_a_node_that_could_never_serve_is_refused_before_starting(
    tmp_path: Path,
) -> None:
    plan = split_plan(tmp_path)
    for node, has, missing in (("0", "2 prefill", "decode"), ("1", "2 decode", "prefill")):
        code, output = invoke(
            "launch", str(plan), "--node", node, "--port", str(free_ports(1)),
            "--log-dir", str(tmp_path / "logs"),
        )  # fmt: skip
        assert code == 1
        assert output.startswith(
            f"error: {plan}: node {node} would start only {has} instances: model 'llama-3-8b' "
            f"has no {missing}-capable instance to pair with, so its gateway could never serve "
            "a request; plan again with --per-node"
        )
        assert len(output.splitlines()) == 1
    assert not (tmp_path / "logs").exists()


def test_node_chooses_the_plans_node_and_is_named_when_it_has_none(tmp_path: Path) -> None:
    plan = tmp_path / "node1.json"
    instances = [{"role": "general", "gpu_ids": [0], "node": 1}]
    plan.write_text(json.dumps({"model": "llama-3-8b", "gpu": "H100", "instances": instances}))
    code, output = invoke("launch", str(plan), "--port", str(free_ports(1)))
    assert code == 1
    assert output.endswith(
        f"error: {plan}: --node: the plan has no instance on node 0 (its nodes: 1)\n"
    )
    code, output = invoke("launch", str(plan), "--node", "-1")
    assert code == 2 and "Invalid value for '--node'" in output
    with listening() as port:  # node 1 is accepted: the launch goes on to the gateway's port
        code, output = invoke("launch", str(plan), "--node", "1", "--port", str(port))
    assert output.endswith(f"port {port} is already in use\n")


def test_the_gateway_port_must_be_free_before_engines_start(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(f"[launch]\nbase_port = {free_ports(1)}\n[[launch.instances]]\n")
    with listening() as port:
        code, output = invoke("launch", str(fleet), "--port", str(port))
    assert code == 1
    assert output.endswith(
        f"error: --port: cannot listen on 127.0.0.1:{port}: port {port} is already in use\n"
    )
    assert not (tmp_path / "sage-llm-logs").exists()


@pytest.mark.parametrize("command", ["engine-sim", "serve"])
def test_a_port_in_use_is_a_one_line_error(command: str) -> None:
    with listening() as port:
        proc = run_cli(command, "--port", str(port))
    assert proc.returncode == 1
    option = "--port: " if command == "serve" else ""  # (serve names where it came from)
    assert proc.stderr.splitlines()[-1] == (
        f"error: {option}cannot listen on 127.0.0.1:{port}: port {port} is already in use"
    )


def test_an_address_that_does_not_resolve_is_a_one_line_error() -> None:
    proc = run_cli("engine-sim", "--host", "999.1.1.1", "--port", str(free_ports(1)))
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1].startswith("error: --host: cannot resolve '999.1.1.1'")


def test_a_host_with_an_empty_label_is_a_one_line_error() -> None:
    """It had crashed serve with a traceback (UnicodeError from the IDNA codec)."""
    proc = run_cli("serve", "--host", "a..b", "--port", str(free_ports(1)))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "dot-separated labels are 1-63 characters long" in proc.stderr


def test_a_file_host_that_does_not_resolve_is_located(tmp_path: Path) -> None:
    config = tmp_path / "cluster.toml"
    config.write_text('[services.llm_control_plane.gateway]\nhost = "999.1.1.1"\n')
    proc = run_cli("serve", "--config", str(config), "--port", str(free_ports(1)))
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1].startswith(
        f"error: {config}:2: services.llm_control_plane.gateway.host: cannot resolve '999.1.1.1'"
    )


# -- help text ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["serve"], ["demo"], ["engine-sim"], ["topo"], ["plan"], ["launch"],
        ["config", "check"], ["bench", "compare"], ["bench", "pd"], ["bench", "proxy"],
    ],
)  # fmt: skip
def test_help_has_no_rst_markup_and_no_hard_line_breaks(argv: list[str]) -> None:
    code, output = invoke(*argv, "--help")
    assert code == 0
    assert "``" not in output
    command = typer.main.get_command(app)
    for name in argv:
        assert isinstance(command, TyperGroup)
        found = command.get_command(typer.Context(command), name)
        assert found is not None
        command = found
    # typer prints a paragraph's line breaks as they are: each paragraph is one line
    paragraphs = inspect.cleandoc(command.help or "").split("\n\n")
    assert [p for p in paragraphs if "\n" in p] == []
    if argv == ["engine-sim"]:
        assert "(--gpu cpu --model tiny: vLLM's CPU build) uses the profile's" in output


# -- launch stops what it started -------------------------------------------------------------

# Stands in for an engine: records its pid and never becomes healthy.
SLOW_ENGINE = """#!{python}
import os, sys, time
open(os.path.join(os.environ["STUB_DIR"], f"{{os.getpid()}}.pid"), "w").close()
time.sleep(120)
"""


def _pids(directory: Path) -> list[int]:
    return sorted(int(p.stem) for p in directory.glob("*.pid"))


def _stop(proc: subprocess.Popen[str], pids: Sequence[int]) -> None:
    """Leave nothing behind, whatever the test found: the launcher, the engines whose pids
    the test saw and those the launcher printed (``<id>: <url> pid <pid> (<log>)``)."""
    if proc.poll() is None:
        proc.kill()
    out, _ = proc.communicate(timeout=30)
    printed = [int(m) for m in re.findall(r" pid (\d+) \(", out or "")]
    for pid in [*pids, *printed]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--gpu-memory-utilization", "1.5"], "error: --gpu-memory-utilization: must be in (0, 1]"),
        (["--tp", "3"], "error: --tp: tensor-parallel size 3 does not divide Llama-3-8B's 32"),
        (["--model", "nope"], "error: --model: unknown model 'nope'"),
        (["--gpu", "nope"], "error: --gpu: unknown GPU 'nope'"),
        (["--model", "llama-3-70b"], "error: --model: Llama-3-70B does not fit on 1 × H100"),
        (["--faults", "bogus"], "error: --faults: unknown fault 'bogus' (one of: crash"),
        (["--faults", "crash@5+5"], "error: --faults: crash@5+5: the process exits at 5 s"),
        (["--lora-modules", "=/p"], "error: --lora-modules: '=/p': the adapter's name is empty"),
        (
            ["--lora-modules", "sql", "--lora-modules", "sql=/p"],
            "error: --lora-modules: 'sql=/p': 'sql' is named twice",
        ),
        (
            ["--served-model-name", "m", "--lora-modules", "m"],
            "error: --lora-modules: 'm': 'm' is the served model's name",
        ),
        (["--lora-modules", " a"], "error: --lora-modules: ' a': the adapter's name must not"),
    ],
)
def test_engine_sim_names_the_option_a_bad_engine_setting_came_from(
    argv: list[str], message: str
) -> None:
    code, out = invoke("engine-sim", "--port", "18999", *argv)
    assert code == 1
    assert out.startswith(message), out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_during_startup_stops_every_engine_started(
    sig: signal.Signals, tmp_path: Path
) -> None:
    stub = tmp_path / "engine"
    stub.write_text(SLOW_ENGINE.format(python=sys.executable))
    stub.chmod(0o755)
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(
        f"""
        [launch]
        engine = "sim"
        python = "{stub}"
        base_port = {free_ports(2)}
        log_dir = "logs"
        health_poll_s = 0.05
        stop_grace_s = 5
        env = {{ STUB_DIR = "{tmp_path}" }}
        [[launch.instances]]
        gpu_ids = [0]
        [[launch.instances]]
        gpu_ids = [1]
        """
    )
    argv = [*CLI, "launch", str(fleet), "--port", str(free_ports(1)), "--log-level", "warning"]
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # SIGHUP's default action (the case where the launch takes it), even under nohup
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL),
    )
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while len(pids) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
            pids = _pids(tmp_path)
        assert len(pids) == 2, proc.communicate(timeout=30)
        assert all(alive(pid) for pid in pids)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 128 + sig
        assert err.splitlines()[-1] == (
            f"error: {sig.name} before the launch finished: stopped the engines it had started"
        )
        assert "Traceback" not in err
        assert not any(alive(pid) for pid in pids)
    finally:
        _stop(proc, pids)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            '[[services.llm_control_plane.instances]]\ninstance_id = "x"\nhost = "h"\n'
            'port = 9\nmodel_name = "m"\n',
            "services.llm_control_plane.instances: sage-llm launch registers the engines it "
            "starts; leave the instances out of a --config file",
        ),
        (
            '[services.llm_control_plane]\nmode = "simulated"\n',
            "services.llm_control_plane.mode: sage-llm launch reaches its engines over HTTP; "
            "mode 'simulated' does not",
        ),
    ],
)
def test_a_launch_config_file_without_instances_over_http(
    tmp_path: Path, settings: str, message: str
) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text(plan_command("llama-3-8b", "2xH100", "2s", "50ms", as_json=True))
    config = tmp_path / "gateway.toml"
    config.write_text(settings)
    code, output = invoke("launch", str(plan), "--config", str(config))
    assert code == 1
    line = 2 if settings.startswith("[services") else 1
    assert output == f"error: {config}:{line}: {message}\n"


def test_a_launch_gateway_port_of_the_file_that_an_engine_has_is_located(tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text(plan_command("llama-3-8b", "2xH100", "2s", "50ms", as_json=True))
    config = tmp_path / "gateway.toml"
    config.write_text("[gateway]\nport = 8100\n")
    code, output = invoke("launch", str(plan), "--config", str(config))
    assert code == 1
    assert output.startswith(
        f"error: {config}:2: gateway.port: 8100 is also the port of engine 'local-"
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_launch_a_plan_file_on_chosen_ports_and_log_dir_then_sigterm(
    sig: signal.Signals, tmp_path: Path
) -> None:
    """With a --config file for the gateway (an API key, an admin token, a policy): the
    launched gateway had none of these, and --host 0.0.0.0 exposed it unauthenticated.
    SIGHUP, as SIGTERM, shuts the serving gateway down, then the engines (the launch had
    kept SIGHUP from the gateway, and ignored it while it served)."""
    plan = tmp_path / "plan.json"
    plan.write_text(plan_command("llama-3-8b", "2xH100", "2s", "50ms", as_json=True))
    # one block of three: a second call could hand the gateway the second engine's port
    base = free_ports(3)
    gateway = base + 2
    settings = tmp_path / "gateway.toml"
    settings.write_text(
        '[services.llm_control_plane]\nscheduling_policy = "priority"\n'
        '[gateway]\napi_keys = ["key-1"]\nadmin_token = "admin-1"\n'
    )
    argv = [*CLI, "launch", str(plan), "--port", str(gateway), "--base-port", str(base),
            "--log-dir", "engine-logs", "--log-level", "warning",
            "--config", str(settings)]  # fmt: skip
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL),  # even under nohup
    )
    pids: list[int] = []

    def get(path: str, token: str | None) -> Any:
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        request = urllib.request.Request(f"http://127.0.0.1:{gateway}{path}", headers=headers)
        with urllib.request.urlopen(request, timeout=2) as resp:
            return json.loads(resp.read())

    try:
        deadline = time.monotonic() + 60
        models: dict[str, object] = {}
        while not models and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
            with contextlib.suppress(OSError):
                models = get("/v1/models", "key-1")
        assert models, proc.communicate(timeout=30)
        with pytest.raises(urllib.error.HTTPError) as refused:
            get("/v1/models", None)
        refused.value.close()
        assert refused.value.code == 401
        assert get("/admin/status", "admin-1")["scheduling_policy"] == "priority"
        for port in (base, base + 1):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                assert resp.status == 200
        logs = sorted(p.name for p in (tmp_path / "engine-logs").iterdir())
        assert logs == ["local-general-0.log", "local-general-1.log"]
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
        pids = [int(m) for m in re.findall(r" pid (\d+) \(", out)]
        assert proc.returncode == 0, err
        assert f"http://127.0.0.1:{base + 1}" in out
        assert len(pids) == 2 and not any(alive(pid) for pid in pids)
        for port in (base, base + 1):
            with (
                pytest.raises(ConnectionRefusedError),
                socket.create_connection(("127.0.0.1", port), 1),
            ):
                pass
    finally:
        _stop(proc, pids)


def test_serve_port_0_picks_a_free_port_as_the_files_key_does() -> None:
    from sage_llm.cli import _listen_port

    assert _listen_port(0) == 0
    assert _listen_port(8080) == 8080
    with pytest.raises(typer.BadParameter, match="1-65535"):
        _listen_port(-1)


def test_launch_port_0_is_taken_as_serves_is(tmp_path: Path) -> None:
    missing = tmp_path / "fleet.toml"
    code, output = invoke("launch", str(missing), "--port", "0")
    assert code == 1
    assert "--port" not in output and output.startswith(f"error: {missing}: cannot read")


def test_topo_and_plan_read_the_json_topology_form(tmp_path: Path) -> None:
    from sage_llm.control_plane.topology import parse_nvidia_smi_topo

    saved = Path(__file__).parent / "fixtures" / "topology" / "a100-pcie-4gpu-nv12-pair-mlx5.txt"
    topology = parse_nvidia_smi_topo(saved.read_text())
    as_json = tmp_path / "topo.json"
    code, written = invoke("topo", "--file", str(saved), "--json")  # the form to save
    assert code == 0 and json.loads(written) == topology.to_dict()
    as_json.write_text(written)
    code, output = invoke("topo", "--file", str(as_json))
    assert code == 0 and output == topology.describe() + "\n"
    code, output = invoke("plan", "--model", "llama-3-8b", "--gpus", "4xA100", "--topology",
                          str(as_json))  # fmt: skip
    assert code == 0 and "NVLink domains: 0,1." in output
    as_json.write_text('{"gpus": 3}')
    code, output = invoke("topo", "--file", str(as_json))
    assert code == 1
    assert output == (
        f"error: {as_json}: topology: invalid topology: gpus must be a list of objects, got 3\n"
    )


def test_serve_refuses_a_port_given_on_the_command_line_that_an_instance_has(
    tmp_path: Path,
) -> None:
    cfg = tmp_path / "cluster.toml"
    cfg.write_text(
        "[services.llm_control_plane]\n[[services.llm_control_plane.instances]]\n"
        'instance_id = "a"\nhost = "localhost"\nport = 19206\nmodel_name = "m"\n'
    )
    code, output = invoke("serve", "--config", str(cfg), "--port", "19206")
    assert code == 1
    assert output == (  # at the instance's port, with its line and key
        f"error: {cfg}:5: services.llm_control_plane.instances[0].port: localhost:19206 is "
        "the address the gateway would listen on (127.0.0.1:19206): its requests would come "
        "back to the gateway\n"
    )
    # the default port of a file that gives none is checked too; 0.0.0.0 reaches loopback
    cfg.write_text(cfg.read_text().replace('"localhost"', '"0.0.0.0"').replace("19206", "8080"))
    code, output = invoke("serve", "--config", str(cfg))
    assert code == 1
    assert "0.0.0.0:8080 is the address the gateway would listen on (127.0.0.1:8080)" in output


def test_an_ipv4_mapped_host_is_a_one_line_error_not_a_traceback() -> None:
    """The check bound without IPV6_V6ONLY (so it passed) and asyncio's bind failed."""
    proc = run_cli("serve", "--host", "::ffff:127.0.0.1", "--port", str(free_ports(1)))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("error: --host: cannot listen on ")


def test_a_file_address_that_cannot_be_listened_on_is_said_at_its_key(tmp_path: Path) -> None:
    """A gateway.host that cannot be bound, or a busy gateway.port, had no file or line."""
    cfg = tmp_path / "g.toml"
    cfg.write_text('[gateway]\nhost = "10.9.9.9"\n')
    proc = run_cli("serve", "--config", str(cfg), "--port", str(free_ports(1)))
    assert proc.stderr.splitlines()[-1].startswith(
        f"error: {cfg}:2: gateway.host: cannot listen on 10.9.9.9:"
    )
    with listening() as port:
        cfg.write_text(f"[gateway]\nport = {port}\n")
        proc = run_cli("serve", "--config", str(cfg))
    assert proc.stderr.splitlines()[-1] == (
        f"error: {cfg}:2: gateway.port: cannot listen on 127.0.0.1:{port}: port {port} is "
        "already in use"
    )


def test_config_check_print_writes_the_json_alone_on_stdout(tmp_path: Path) -> None:
    cfg = tmp_path / "cluster.toml"
    cfg.write_text(
        '[services.llm_control_plane]\nscheduling_policy = "priority"\n'
        "policy_params = { aging_interval_s = inf }\n"
    )
    proc = run_cli("config", "check", "--print", str(cfg))
    assert proc.returncode == 0

    def strict(constant: str) -> None:  # Infinity and NaN are not JSON
        raise AssertionError(f"{constant} in the output")

    plane = json.loads(proc.stdout, parse_constant=strict)["services"]["llm_control_plane"]
    assert plane["scheduling_policy"] == "priority"
    assert plane["policy_params"] == {"aging_interval_s": math.inf}  # written 1e999
    assert proc.stderr == f"{cfg}: OK\n"


def _checked_ok(path: Path, text: str) -> str:
    """``config check`` of ``text`` written at ``path``: its output, the check passed."""
    path.write_text(text)
    code, output = invoke("config", "check", str(path))
    assert code == 0, output
    return output


def test_config_check_notes_a_launch_plan_that_cannot_carry_its_rate(tmp_path: Path) -> None:
    """The launch serves the fleet the hardware allows, and says what it cannot carry (it
    had said nothing of a rate 50 times the fleet's capacity)."""
    output = _checked_ok(
        tmp_path / "fleet.toml",
        '[launch]\nengine = "sim"\nmodel = "llama-3-70b"\nbase_port = 23400\n'
        '[launch.plan]\ngpus = "8xH100"\nrate = 1000\n',
    )
    assert "note: [launch.plan]: no plan meets the SLO at 1000 req/s: the highest goodput " in (
        output
    )


def test_config_check_notes_seed_pd_settings_not_acted_on(tmp_path: Path) -> None:
    """They are accepted (the seed's API) but change nothing: said, at their lines."""
    path = tmp_path / "pd.toml"
    output = _checked_ok(
        path,
        "[services.llm_control_plane.pd]\nenable_pd_tracing = true\n"
        'kv_cache_storage = "gpu"\ncollect_pd_metrics = false\n',
    )
    notes = [line for line in output.splitlines() if line.startswith("note:")]
    assert notes == [
        f"note: {path}:{line}: services.llm_control_plane.pd.{key}: a seed setting this "
        "version accepts but does not act on (see docs/config.md)"
        for key, line in (("collect_pd_metrics", 4), ("enable_pd_tracing", 2))
    ]  # (kv_cache_storage at its default: nothing to say)


def test_config_check_reads_a_pipe_once() -> None:
    """``config check /dev/stdin`` (or ``<(…)``): the file read once, its problems said
    (it had been read three times, so found empty: OK)."""
    text = '[services.llm_control_plane]\nscheduling_policy = "nope"\n[gateway]\nport = 70000\n'
    proc = subprocess.run(
        [*CLI, "config", "check", "/dev/stdin"], input=text, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.splitlines()
    assert [line.split(": ")[1] for line in lines] == [
        "services.llm_control_plane.scheduling_policy",
        "gateway.port",
    ], lines
    launch = '[launch]\nengine = "sim"\nbase_port = 23390\n[[launch.instances]]\ngpu_ids = [0]\n'
    proc = subprocess.run(
        [*CLI, "config", "check", "/dev/stdin"], input=launch, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert (proc.returncode, proc.stdout) == (0, "/dev/stdin: OK (1 engine on node 0)\n"), proc
    plan = json.dumps({"model": "llama-3-8b", "gpu": "h100", "instances": [
        {"role": "general", "tp": 1, "pp": 1, "gpu_ids": [0], "node": 0}]})  # fmt: skip
    proc = subprocess.run(
        [*CLI, "config", "check", "/dev/stdin"], input=plan, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert proc.stdout.startswith("/dev/stdin: OK (1 engine"), proc  # a plan, not TOML


def test_config_check_checks_a_launch_file_and_shows_its_engines(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(
        '[launch]\nbase_port = 23380\n[[launch.instances]]\nrole = "general"\ngpu_ids = [0]\n'
    )
    code, output = invoke("config", "check", "--print", str(fleet))
    assert code == 0
    first, engine = output.splitlines()
    assert first == f"{fleet}: OK (1 engine on node 0)"
    assert engine.startswith("local-general-0 (http://127.0.0.1:23380): CUDA_VISIBLE_DEVICES=0 ")
    fleet.write_text('[launch]\nbase_port = "x"\n[launch.plan]\ngpus = "2xH100"\nslo_tpot = 5\n')
    code, output = invoke("config", "check", str(fleet))
    assert code == 1
    assert output.splitlines() == [
        f"{fleet}:2: launch.base_port: must be an integer, got string 'x'",
        f'{fleet}:5: launch.plan.slo_tpot: must be a duration with its unit such as "2s" or '
        '"50ms", got 5',
    ]


def test_engine_sim_takes_vllms_engine_shape_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    """The flags a launch file passes to vLLM shape the simulated engine alike."""
    served: list[Any] = []

    async def serve(engine: Any, **_kwargs: object) -> None:
        served.append(engine)

    monkeypatch.setattr("sage_llm.sim.server.serve_engine", serve)
    monkeypatch.setattr("sage_llm.cli._check_listen", lambda host, port: None)
    code, out = invoke(
        "engine-sim", "--port", "18999", "--max-num-batched-tokens", "2048",
        "--gpu-memory-utilization", "0.5", "--block-size", "32",
        "--num-gpu-blocks-override", "400", "--no-enable-chunked-prefill",
        "--no-enable-prefix-caching", "--max-model-len", "2048",
    )  # fmt: skip
    assert code == 0, out
    config = served[0].config
    assert (config.max_num_batched_tokens, config.gpu_memory_utilization) == (2048, 0.5)
    assert (config.block_size, config.num_gpu_blocks) == (32, 400)
    assert not config.enable_chunked_prefill and not config.enable_prefix_caching
    assert config.max_model_len == 2048
    # without chunked prefill and no budget given, the budget is the context, as vLLM's
    for extra, budget in (
        (["--model", "llama-3.1-8b"], 131072),
        (["--max-model-len", "4096"], 8192),
    ):
        served.clear()
        code, out = invoke("engine-sim", "--port", "18999", "--no-enable-chunked-prefill", *extra)
        assert code == 0, out
        assert served[0].config.max_num_batched_tokens == budget


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_engine_sim_stops_at_once_ending_its_streams(sig: signal.Signals) -> None:
    """SIGTERM stops engine-sim as Ctrl-C does, and neither waits for the streams in
    flight: each ends with an error event and [DONE] (Ctrl-C had waited about 10 s, then
    cut them; SIGTERM had killed the process)."""
    port = free_ports(1)
    argv = [*CLI, "engine-sim", "--port", str(port), "--speed", "0.05", "--log-level", "warning"]
    if sig is signal.SIGTERM:
        argv += ["--log-format", "json"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"{url}/health", timeout=1).close()
                break
            time.sleep(0.1)
        body = {"model": "llama-3-8b", "prompt": "hi", "max_tokens": 5000, "stream": True}
        request = urllib.request.Request(
            f"{url}/v1/completions", json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=30) as stream:
            stream.readline()  # the stream has started
            proc.send_signal(sig)
            started = time.monotonic()
            rest = stream.read().decode()
        proc.wait(timeout=30)
        assert time.monotonic() - started < 5
        assert proc.returncode == 0
        assert '"message":"engine closed"' in rest
        assert rest.rstrip().endswith("data: [DONE]")
        _, err = proc.communicate(timeout=5)
        assert "stopped; requests in flight were ended" in err and "Traceback" not in err
        if sig is signal.SIGTERM:  # a log record, as JSON as every other line
            assert all(json.loads(line)["level"] for line in err.splitlines()), err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)


def test_a_file_of_other_services_only_is_refused_by_serve_and_noted_by_check(
    tmp_path: Path,
) -> None:
    """A SAGE services.toml holding a VLLMService only: serving it would have served the
    embedded simulated fleet, the endpoint it names ignored."""
    cfg = tmp_path / "services.toml"
    cfg.write_text('[services.llm]\ntype = "VLLMService"\nmodel_id = "m"\nengine = "sim"\n')
    code, output = invoke("serve", "--config", str(cfg))
    assert code == 1
    assert output == (
        f"error: {cfg}:1: services: no control-plane service table "
        '(type = "ControlPlaneVLLMService") among llm (VLLMService): add '
        "[services.llm_control_plane], or give no file for the "
        "embedded simulated fleet\n"
    )
    proc = run_cli("config", "check", str(cfg))
    assert proc.returncode == 0  # valid for the VLLMService it holds
    assert (proc.stdout, proc.stderr) == (
        f"{cfg}: OK\n",
        "note: no control-plane service table (services: llm (VLLMService)); "
        "sage-llm serve and ControlPlaneVLLMService refuse this file\n",
    )


def test_bench_lists_are_read_alike_and_an_empty_preset_list_is_refused(tmp_path: Path) -> None:
    """`--fleets "a, b"` had been refused for ' b' (the space unseen), `--presets ''` had
    run the default five."""
    code, output = invoke(
        "bench", "pd", "--n-long", "1", "--n-chat", "0", "--no-include-70b",
        "--fleets", "colocated, pd-3:5", "--out", str(tmp_path / "pd.json"),
    )  # fmt: skip
    assert code == 0, output
    code, output = invoke("bench", "compare", "--presets", "", "--peers", "")
    assert code == 2 and "no preset named" in output
    proc = subprocess.run(
        [sys.executable, "-m", "sage_llm.bench.peers", "--help"], capture_output=True, text=True
    )
    assert proc.returncode == 0 and proc.stdout.startswith("usage:")


def test_the_package_and_the_command_line_import_without_the_control_plane() -> None:
    """Importing ``sage_llm`` (as the ``sage-llm`` script does first) is quick: the manager
    comes when asked for, so a Ctrl-C at start lands in the command, not in an import."""
    code = (
        "import sys, sage_llm.cli; "
        "print('sage_llm.control_plane.manager' in sys.modules); "
        "from sage_llm import ControlPlaneManager; print(ControlPlaneManager.__name__)"
    )
    assert _printed_by(code) == ["False", "ControlPlaneManager"]


def _printed_by(code: str) -> list[str]:
    """The words a fresh interpreter running ``code`` prints."""
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()


def test_the_lazy_package_still_offers_its_modules_and_lists_its_names() -> None:
    code = (
        "import sage_llm, pydoc; "
        "print(sage_llm.errors.ConfigError.__module__, sage_llm.types.__name__); "
        "print(all(n in dir(sage_llm) for n in sage_llm.__all__)); "
        "print('class RequestMetadata' in pydoc.render_doc(sage_llm, renderer=pydoc.plaintext)); "
        "print(hasattr(sage_llm, 'no_such_name'), hasattr(sage_llm, 'cli.x'), "
        "hasattr(sage_llm, 'gateway.server'))"
    )
    assert _printed_by(code) == [
        "sage_llm.errors", "sage_llm.types", "True", "True", "False", "False", "False"
    ]  # fmt: skip


def test_an_interrupt_before_a_command_runs_is_one_line_and_status_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import sage_llm.cli as cli

    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "app", interrupted)
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 130
    assert capsys.readouterr().err == "error: interrupted (SIGINT)\n"


def test_an_interrupt_while_the_command_line_loads_is_one_line_and_status_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The ``sage-llm`` script loads the command line under its own Ctrl-C answer (its
    imports had printed a traceback)."""
    import types

    from sage_llm.__main__ import main

    class Loading(types.ModuleType):
        def __getattr__(self, name: str) -> Any:
            raise KeyboardInterrupt

    monkeypatch.setitem(sys.modules, "sage_llm.cli", Loading("sage_llm.cli"))
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 130
    assert capsys.readouterr().err == "error: interrupted (SIGINT)\n"


def test_python_dash_m_sage_llm_runs_the_command_line() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "sage_llm", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "sageLLM control plane" in out


# -- what the help and the docs promise of each command ---------------------------------------


def test_config_check_print_keeps_its_notes_off_stdout(tmp_path: Path) -> None:
    """``config check --print``: the resolved config as JSON on stdout, OK and every note on
    stderr (docs/config.md), so that the JSON parses."""
    cfg = tmp_path / "pd.toml"
    cfg.write_text("[services.llm_control_plane.pd]\nenable_pd_tracing = true\n")
    proc = run_cli("config", "check", "--print", str(cfg))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["services"]["llm_control_plane"]["pd"]["enable_pd_tracing"]
    ok, note = proc.stderr.splitlines()
    assert (ok, note.split(": ")[0]) == (f"{cfg}: OK", "note")


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--log-level", "nope"], "--log-level: unknown log level 'nope' (known: debug, "),
        (["--log-format", "xml"], "--log-format: unknown log format 'xml' (known: text, json)"),
    ],
)
@pytest.mark.parametrize("command", [["serve"], ["engine-sim"], ["launch", "fleet.toml"]])
def test_a_bad_log_option_is_a_one_line_error(
    command: list[str], argv: list[str], said: str
) -> None:
    code, output = invoke(*command, *argv)
    assert (code, output.count("\n")) == (1, 1)
    assert output.startswith(f"error: {said}"), output


def test_serve_refuses_an_unknown_event_loop_in_one_line() -> None:
    code, output = invoke("serve", "--loop", "nope", "--port", "0")
    assert (code, output) == (
        1,
        "error: --loop: unknown event loop 'nope'; use one of auto, uvloop, asyncio\n",
    )


def test_serve_listens_where_host_and_port_say_over_the_file_at_its_log_level(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--host``/``--port`` override the file's ``[gateway]`` host and port (serve --help),
    and ``--log-level`` is the level the gateway logs at; the gateway reads the same file
    again for ``POST /admin/reload``."""
    seen: list[tuple[str, int, int]] = []
    rereads: list[Callable[[], Any]] = []

    async def run_gateway(
        manager: object,
        gateway: Any,
        *,
        host: str | None = None,
        port: int | None = None,
        reload_from: Callable[[], Any] | None = None,
    ) -> None:
        where = (host or gateway.host, gateway.port if port is None else port)
        seen.append((*where, logging.getLogger().getEffectiveLevel()))
        assert reload_from is not None
        rereads.append(reload_from)

    monkeypatch.setattr("sage_llm.gateway.server.run_gateway", run_gateway)
    monkeypatch.setattr("sage_llm.eventloop.tune_collector_for_serving", lambda: None)
    port = free_ports(2)
    cfg = tmp_path / "cluster.toml"
    cfg.write_text(f'[gateway]\nhost = "localhost"\nport = {port}\n')
    assert invoke("serve", "-c", str(cfg), "--log-level", "warning") == (0, "")
    code, _ = invoke("serve", "-c", str(cfg), "--host", "127.0.0.1", "--port", str(port + 1))
    assert code == 0
    assert seen == [("localhost", port, logging.WARNING), ("127.0.0.1", port + 1, logging.INFO)]
    cfg.write_text('[gateway]\napi_keys = ["k"]\n')
    assert rereads[0]().api_keys == ("k",)
    cfg.write_text("[gateway]\nport = -1\n")
    with pytest.raises(ConfigError, match=r"cluster.toml:2: gateway.port: must be >= 0"):
        rereads[1]()


def test_launch_gateway_address_is_the_options_else_the_files_else_127_0_0_1_8080(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As launch --help and docs/deployment.md say (the default 127.0.0.1:8080); with a
    ``--config`` file the gateway reads it again for ``POST /admin/reload``."""
    seen: list[tuple[str, int]] = []
    rereads: list[Callable[[], Any] | None] = []

    def run_launch(
        *_args: object, host: str, port: int, reload_from: Callable[[], Any] | None
    ) -> None:
        seen.append((host, port))
        rereads.append(reload_from)

    monkeypatch.setattr("sage_llm.cli._run_launch", run_launch)
    monkeypatch.setattr("sage_llm.cli._check_listen", lambda *_args: None)  # (8080 may be busy)
    plan = tmp_path / "plan.json"
    instance = {"role": "general", "tp": 1, "pp": 1, "gpu_ids": [0], "node": 0}
    plan.write_text(json.dumps({"model": "llama-3-8b", "gpu": "h100", "instances": [instance]}))
    base = free_ports(3)
    gateway = tmp_path / "gateway.toml"
    gateway.write_text(f'[gateway]\nhost = "localhost"\nport = {base + 2}\n')
    for argv in (
        [],
        ["--config", str(gateway)],
        ["--config", str(gateway), "--host", "127.0.0.1", "--port", str(base + 1)],
    ):
        code, output = invoke("launch", str(plan), "--base-port", str(base), *argv)
        assert code == 0, output
    assert seen == [("127.0.0.1", 8080), ("localhost", base + 2), ("127.0.0.1", base + 1)]
    assert rereads[0] is None
    gateway.write_text('[gateway]\nadmin_token = "t"\n')
    assert [reread().admin_token for reread in rereads[1:] if reread is not None] == ["t", "t"]


def test_plan_json_names_the_model_as_asked_and_the_slo_in_seconds() -> None:
    """docs/deployment.md's plan.json: its served_model_name is the --model given."""
    code, output = invoke(
        "plan", "--model", "llama-3-8b", "--gpus", "4xH100", "--slo-ttft", "1s",
        "--slo-tpot", "40ms", "--json",
    )  # fmt: skip
    assert code == 0, output
    data = json.loads(output)
    assert (data["served_model_name"], data["model"], data["gpu"]) == (
        "llama-3-8b",
        "Llama-3-8B",
        "H100",
    )
    assert data["slo"]["ttft_s"] == 1.0
    assert data["slo"]["tpot_s"] == pytest.approx(0.04)


def test_engine_sim_instant_with_a_pd_role_is_a_one_line_error() -> None:
    code, output = invoke("engine-sim", "--instant", "--role", "decode")
    assert (code, output) == (1, "error: --instant runs whole requests only: use --role general\n")


def test_a_demo_that_fails_says_why_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    def fails(**_kwargs: object) -> None:
        raise SageLLMError("the simulated fleet could not start")

    monkeypatch.setattr("sage_llm.bench.demo.run_demo", fails)
    assert invoke("demo") == (1, "error: the simulated fleet could not start\n")


def test_an_error_a_command_lets_through_is_one_line_and_status_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The module's promise: each problem is one line, never a traceback."""
    import sage_llm.cli as cli

    def fails(*_args: object, **_kwargs: object) -> str:
        raise SageLLMError("no plan for you")

    monkeypatch.setattr("sage_llm.control_plane.parallelism.plan_command", fails)
    monkeypatch.setattr(sys, "argv", ["sage-llm", "plan"])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 1
    assert capsys.readouterr().err == "error: no plan for you\n"


@pytest.mark.parametrize("configured", [False, True])
def test_serve_says_in_its_first_log_lines_what_fleet_it_serves(
    configured: bool, tmp_path: Path
) -> None:
    """Issue #4: without a config, ``serve`` starts the embedded default and says so in its
    first log lines; with one, it names the file and how many instances it has."""
    port = free_ports(1)
    argv = [*CLI, "serve", "--port", str(port)]
    if configured:
        cfg = tmp_path / "cluster.toml"
        engines = free_ports(2)
        cfg.write_text(
            "[services.llm_control_plane]\n"
            + "".join(
                f'[[services.llm_control_plane.instances]]\ninstance_id = "e{i}"\n'
                f'host = "127.0.0.1"\nport = {engines + i}\nmodel_name = "llama-3-8b"\n'
                for i in range(2)
            )
        )
        argv += ["--config", str(cfg)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).close()
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    first = err.splitlines()[0]
    if configured:
        assert f"config {cfg}: 2 instances" in first, err
    else:
        assert (
            "no instances configured: the gateway serves an embedded fleet of 4 simulated "
            "h100 engines of llama-3-8b, in this process" in first.lower()
        ), err
    assert f"gateway listening on http://127.0.0.1:{port}" in err


def test_config_check_of_a_plan_named_json_says_it_is_ok(tmp_path: Path) -> None:
    output = _checked_ok(
        tmp_path / "plan.json", plan_command("llama-3-8b", "2xH100", "2s", "50ms", as_json=True)
    )
    assert "OK (2 engines on node 0)" in output


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"\xff\xfe bad", ":1: not valid UTF-8 (byte 0xff, column 1)"),
        (b"[launch]\nx = [1\n", ":3: invalid TOML: Unclosed array (at end of file)"),
        (b"not = [toml\n", ":1: invalid TOML: Invalid value (column 8)"),
    ],
)
def test_config_check_of_a_file_it_cannot_read_names_the_file_and_line(
    tmp_path: Path, content: bytes, problem: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(content)
    code, output = invoke("config", "check", str(path))
    assert (code, output) == (1, f"{path}{problem}\n")
    code, output = invoke("config", "check", str(tmp_path))
    assert (code, output) == (1, f"{tmp_path}: cannot read config file: Is a directory\n")


def test_launch_with_a_config_it_cannot_read_names_the_file_and_line(tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text(plan_command("llama-3-8b", "2xH100", "2s", "50ms", as_json=True))
    cfg = tmp_path / "bad.toml"
    cfg.write_text("not = [toml\n")
    code, output = invoke("launch", str(plan), "--config", str(cfg))
    assert (code, output) == (1, f"error: {cfg}:1: invalid TOML: Invalid value (column 8)\n")


def test_topo_without_a_file_shows_this_machines_topology(monkeypatch: pytest.MonkeyPatch) -> None:
    from sage_llm.control_plane import topology

    found = topology.Topology()
    detected = topology.DetectedTopology(found, "nvidia-smi not found: no GPU topology")
    monkeypatch.setattr(topology, "detect_topology", lambda: detected)
    result = CliRunner().invoke(app, ["topo", "--json"])
    assert result.exit_code == 0
    assert json.loads(result.stdout) == found.to_dict()  # stdout is the document alone
    assert result.stderr == "nvidia-smi not found: no GPU topology\n"
    code, output = invoke("topo")
    assert code == 0 and output.startswith("nvidia-smi not found: no GPU topology\n")
    assert found.describe() in output


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (OSError(98, "Address already in use"), "port {port} is already in use"),
        (socket.gaierror(-2, "Name or service not known"), "Name or service not known"),
    ],
)
def test_serve_whose_port_is_taken_after_its_check_says_so_in_one_line(
    monkeypatch: pytest.MonkeyPatch, error: OSError, reason: str
) -> None:
    """Another process may take the port between the check and the gateway's bind."""
    from sage_llm.gateway import server

    async def taken(*args: Any, **kwargs: Any) -> None:
        raise error

    monkeypatch.setattr(server, "run_gateway", taken)
    port = free_ports(1)
    code, output = invoke("serve", "--host", "127.0.0.1", "--port", str(port))
    assert code == 1
    assert output.endswith(f"cannot listen on 127.0.0.1:{port}: {reason.format(port=port)}\n")


def test_the_gateway_reads_again_only_a_regular_config_file_and_not_an_empty_one(
    tmp_path: Path,
) -> None:
    """``--config <(…)`` (a pipe) cannot be read twice: the gateway gets no reader (its
    reload answers 409). A file found empty at a reload (being written) is a problem, not
    a configuration without keys."""
    from sage_llm.cli import _gateway_reader

    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    assert _gateway_reader(fifo) is None
    cfg = tmp_path / "cluster.toml"
    cfg.write_text('[gateway]\napi_keys = ["k"]\n')
    reader = _gateway_reader(cfg)
    assert reader is not None and reader().api_keys == ("k",)
    cfg.write_text("\ufeff \n")
    with pytest.raises(ConfigError, match=r"cluster\.toml: the config file is empty now"):
        reader()
