"""Tests for ``benchmarks/fair_scale.py``: a start of each policy timed over a queue of
many users, side by side."""

from __future__ import annotations

from types import ModuleType

import pytest

from tests.factories import load_benchmark, usage_error


@pytest.fixture(scope="module")
def script() -> ModuleType:
    return load_benchmark("fair_scale")


def test_each_policy_starts_the_same_queue_and_the_table_has_a_row_per_user_count(
    script: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = script.main(["--users", "3,40", "--requests", "400", "--pops", "100"])
    assert [row["users"] for row in rows] == [3.0, 40.0]
    assert all(row["fifo"] > 0 and row["fair"] > 0 for row in rows)
    out = capsys.readouterr().out
    assert "| 40 |" in out and "fair / fifo" in out
    queued = script.requests(400, 40, 0)
    assert len({r.user_id for r in queued}) == 40


@pytest.mark.parametrize("users", ["ten", "0,5"])
def test_a_bad_user_count_is_a_usage_error(
    script: ModuleType, users: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert "--users" in usage_error(script.main, ["--users", users], capsys)


def test_with_blocked_a_request_no_free_instance_may_run_is_first_and_never_starts(
    script: ModuleType,
) -> None:
    queued = script.requests(50, 5, 0, blocked=True)
    assert queued[0].request_id == "blocked" and queued[0].excluded_instances
    policy = script.POLICIES["fair"]()
    script.time_pops(policy, queued, 1_000)
    assert len(policy) == 1 and "blocked" in policy.queue
