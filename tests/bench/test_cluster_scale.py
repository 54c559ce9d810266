"""Tests for ``benchmarks/cluster_scale.py``: its options are checked before it simulates."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest

from tests.factories import load_benchmark, usage_error


@pytest.fixture(scope="module")
def script() -> ModuleType:
    return load_benchmark("cluster_scale")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--instances", "0"], "argument --instances: must be >= 1, got 0"),
        (["--max-concurrency", "0"], "argument --max-concurrency: must be >= 1, got 0"),
        (["--shared-prefix", "-1"], "argument --shared-prefix: must be >= 0, got -1"),
        (["--policy", "nope"], "unknown scheduling policy 'nope'"),
        (["--routing", "nope"], "unknown routing strategy 'nope'"),
        (["--input-len", "foo"], "invalid length distribution 'foo'"),
        (["--shared-prefix", "9000"], "--input-len: 9512 prompt tokens leave no room in"),
        # a length spec's shortest too (it had been simulated, every request refused)
        (["--input-len", "fixed:100000"], "--input-len: 100000 prompt tokens leave no room"),
        (["--input-len", "uniform:9000,9500"], "--input-len: 9000 prompt tokens leave no room"),
        (["--input-len", "0"], "--input-len: fixed length must be >= 1, got 0"),
        (["--model", "nope"], "--model: unknown model 'nope'"),
        (["--model", "llama-3-70b"], "--model: Llama-3-70B does not fit on 1 × H100"),
        (["--seed", "-1"], "argument --seed: must be >= 0, got -1"),
        (["--pd", "1"], "argument --pd: must be P:D, two positive integers, got '1'"),
        (["--pd", "0:3"], "argument --pd: must be P:D, two positive integers, got '0:3'"),
        (["--pd", "1:1", "--instances", "1"], "--pd: a prefill/decode fleet needs at least 2"),
    ],
)
def test_a_bad_option_is_a_usage_error_before_any_simulating(
    script: ModuleType, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert message in usage_error(script.main, [*argv, "--requests", "10"], capsys)


def test_out_and_profile_must_be_files_in_existing_directories(
    script: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        script.main(["--profile", str(tmp_path / "no" / "p.prof"), "--requests", "10"])
    assert "not a file in an existing directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # tried before the run, not after it
        script.main(["--out", str(tmp_path), "--requests", "10"])
    assert f"--out: {tmp_path} is a folder, not a file" in capsys.readouterr().err


def test_a_small_run_reports_its_failures_reason(
    script: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    code = script.main(["--instances", "2", "--requests", "40", "--rate", "100",
                        "--input-len", "lognormal:8500,0.01", "--output-len", "200"])  # fmt: skip
    assert code == 1  # nothing completed
    captured = capsys.readouterr()
    out = captured.out
    assert "error: no request completed" in captured.err
    assert "failed 40" in out
    # 40 of one kind, though each message has its own figures
    assert "failures         40 failed: " in out and "maximum context length" in out


def test_a_pd_fleet_disaggregates_every_request(
    script: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "pd.json"
    code = script.main(["--instances", "5", "--pd", "2:3", "--requests", "60", "--rate", "40",
                        "--input-len", "uniform:64,1024", "--out", str(out)])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "2 prefill-only + 3 decode-only instances, 60 requests disaggregated" in printed
    report = json.loads(out.read_text())
    assert report["setup"]["pd"] == {"prefill": 2, "decode": 3}
    assert report["result"]["disaggregated"] == 60


def test_the_prefill_share_is_rounded_with_one_of_each_at_least(script: ModuleType) -> None:
    count = script.pd_prefill_count
    assert (count((1, 1), 1000), count((1, 3), 8), count((1, 100), 4), count((9, 1), 2)) == (
        500, 2, 1, 1,
    )  # fmt: skip
