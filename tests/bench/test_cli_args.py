"""The benchmark scripts' shared argument checks: refused before the run, not inside it."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from sage_llm.bench.cli_args import above, at_least, at_least_number, check_out, open_loop_args

ROOT = Path(__file__).resolve().parents[2]


def test_at_least_and_above_refuse_with_the_reason() -> None:
    assert at_least(1)("3") == 3
    for parse, text, message in (
        (at_least(1), "0", "must be >= 1, got 0"),
        (at_least(1), "x", "must be an integer, got 'x'"),
        (above(0), "0", "must be a finite number > 0, got 0"),
        (above(0), "inf", "must be a finite number > 0, got inf"),
        (above(0), "nan", "must be a finite number > 0, got nan"),
        (above(0), "fast", "must be a number, got 'fast'"),
        (at_least_number(0), "-1", "must be a finite number >= 0, got -1"),
        (at_least_number(0), "nan", "must be a finite number >= 0, got nan"),
    ):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            parse(text)
    assert above(0)("2.5") == 2.5
    assert at_least_number(0)("0") == 0.0


def test_check_out_exits_with_a_usage_error_before_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser(prog="bench")
    check_out(parser, "--out", None)
    check_out(parser, "--out", tmp_path / "new" / "report.json")  # made, and left empty
    assert not (tmp_path / "new" / "report.json").exists()
    with pytest.raises(SystemExit):
        check_out(parser, "--out", tmp_path)
    assert "bench: error: --out: " in capsys.readouterr().err


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [
        ("soak.py", ["--minutes", "0.1", "--warmup-minutes", "1"], "--warmup-minutes must be"),
        ("soak.py", ["--load", "0"], "argument --load: must be a finite number > 0"),
        ("failover_load.py", ["--requests", "0"], "argument --requests: must be >= 1"),
        ("failover_load.py", ["--out", "/proc/nope/x.json"], "--out: cannot write"),
        ("fault_drill.py", ["--engines", "1"], "argument --engines: must be >= 2"),
        ("fault_drill.py", ["--stall-timeout-s", "-1"], "--stall-timeout-s: must be a finite"),
        (  # it had been added to engine 0's start: a fault "begun" after its ejection
            "fault_drill.py",
            ["--fault", "gray", "--at", "1"],
            "--at: the gray fault runs from engine 0's start",
        ),
        (
            "failover_load.py",
            ["--requests", "10", "--rate", "10", "--kill-at", "4"],
            "--kill-at 4: the requests arrive within 1 s",
        ),
        ("cpu_budget.py", ["--peers", "nosuch"], "--peers: unknown peer 'nosuch'"),
        ("cpu_budget.py", ["--requests", "0"], "argument --requests: must be >= 1"),
        ("cpu_budget.py", ["--prompt-tokens", "99999"], "exceed the engines' context"),
        ("cpu_budget.py", ["--json", "/proc/nope/x.json"], "--json: cannot write"),
        ("gateway_cpu.py", ["--concurrency", "0"], "argument --concurrency: must be >= 1"),
        ("gateway_cpu.py", ["--json", "/proc/nope/x.json"], "--json: cannot write"),
        ("planner_vs_exhaustive.py", ["--json", "/proc/nope/x.json"], "--json: cannot write"),
        ("planner_vs_exhaustive.py", ["--jobs", "0"], "argument --jobs: must be >= 1"),
        ("planner_vs_exhaustive.py", ["--load", "nan"], "argument --load: must be a finite"),
        (  # each scenario named runs, or none does
            "planner_vs_exhaustive.py",
            ["--scenario", "nope", "--scenario", "llama-3-70b-8xh100-chat"],
            "unknown scenario 'nope'",
        ),
        ("gateway_cpu.py", ["--loop", "bogus"], "argument --loop: invalid choice: 'bogus'"),
        ("c1_latency.py", ["--pin", "0,4096"], "--pin 0,4096: CPU 4096 is not one"),
    ],
)
def test_the_scripts_refuse_bad_options_before_running(
    script: str, args: list[str], message: str
) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--n-long", "-1"], "error: --n-long: must be >= 0\n"),
        (["--long-rate", "0"], "error: --long-rate: must be a finite number > 0, got 0\n"),
        (["--fleets", "nope"], "error: --fleets: unknown fleet(s) nope; valid: "),
    ],
)
def test_pd_bench_names_the_option_it_refuses(
    tmp_path: Path, args: list[str], message: str
) -> None:
    out = tmp_path / "pd.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "pd_bench.py"), *args, "--no-70b",
         "--out", str(out)],
        capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(message)
    assert not out.exists()


def test_open_loop_args_give_the_defaults_and_refuse_bad_values() -> None:
    parser = argparse.ArgumentParser()
    open_loop_args(parser, engines=3, rate=5.0, requests=10)
    args = parser.parse_args([])
    assert (args.engines, args.rate, args.requests, args.seed) == (3, 5.0, 10, 0)
    for bad in (["--engines", "0"], ["--rate", "0"], ["--requests", "x"], ["--seed", "-1"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
