"""Workload summaries."""

from __future__ import annotations

from sage_llm.bench.workloads import synthetic


def test_summary_counts_users_and_sessions_apart() -> None:
    workload = synthetic(20, 5.0, 8, 4, seed=1, n_users=3)
    users = {r.user_id for r in workload if r.user_id is not None}
    sessions = {r.session_id for r in workload if r.session_id is not None}
    assert len(users) == 3 and len(sessions) != 3
    summary = workload.summary()
    assert (summary["users"], summary["sessions"]) == (3, len(sessions))
