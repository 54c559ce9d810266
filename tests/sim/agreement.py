"""Comparing a cluster simulator run with the asyncio control plane's run of the same
workload: request for request (both run the same events in the same order)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from sage_llm.bench.stats import RequestMeasurement


def assert_same_requests(
    ours: Sequence[RequestMeasurement], theirs: Sequence[RequestMeasurement]
) -> None:
    """Every request ended the same way at the same time, its first token too."""
    mine = {m.request_id: m for m in ours}
    assert mine.keys() == {m.request_id for m in theirs}
    for ref in theirs:
        got = mine[ref.request_id]
        assert (got.ok, got.error, got.output_tokens) == (ref.ok, ref.error, ref.output_tokens)
        assert got.end_s == pytest.approx(ref.end_s, rel=1e-9, abs=1e-9), ref.request_id
        if ref.first_token_s is None:
            assert got.first_token_s is None, ref.request_id
        else:
            assert got.first_token_s == pytest.approx(ref.first_token_s, rel=1e-9, abs=1e-9)
