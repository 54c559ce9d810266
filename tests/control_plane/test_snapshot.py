"""ClusterSnapshot successors (with_assignment equals the field-by-field definition) and
InstanceView figures."""

from __future__ import annotations

from dataclasses import replace

from sage_llm.control_plane.snapshot import ClusterSnapshot, InstanceView, RequestInfo
from sage_llm.types import ExecutionInstanceType
from tests.factories import make_instance_view


def test_with_assignment_advances_only_the_chosen_view() -> None:
    views = tuple(
        InstanceView(
            instance_id=f"i{n}",
            model="m",
            role=ExecutionInstanceType.GENERAL,
            in_flight=n,
            queued_prefill_tokens=10 * n,
            outstanding_decode_tokens=7 * n,
            kv_usage=0.1 * n,
            nvlink_peers=frozenset({f"i{n + 1}"}),
            est_tpot_s=0.01 * (n + 1),
        )
        for n in range(3)
    )
    snap = ClusterSnapshot(now=5.0, instances=views)
    req = RequestInfo(request_id="r", model="m", arrival=1.0, prompt_tokens=33, max_tokens=9)
    after = snap.with_assignment("i1", req)
    expected = replace(
        views[1], in_flight=2, queued_prefill_tokens=43, outstanding_decode_tokens=16
    )
    assert after.instances == (views[0], expected, views[2])
    assert after.now == snap.now and after.prefix is snap.prefix
    assert snap.instances == views  # the snapshot itself is unchanged
    assert snap.with_assignment("absent", req).instances == views


def test_nvlink_peers_connect_both_ways() -> None:
    a = make_instance_view("a", nvlink_peers=frozenset({"b"}))
    b = make_instance_view("b")
    assert a.nvlink_connected(b) and b.nvlink_connected(a)
    assert not b.nvlink_connected(make_instance_view("c"))


def test_load_is_clipped_to_one() -> None:
    assert make_instance_view(in_flight=1, max_concurrency=4).load == 0.25
    # its bound lowered while more ran
    assert make_instance_view(in_flight=3, max_concurrency=2).load == 1.0
    assert make_instance_view(in_flight=0, max_concurrency=0).load == 1.0
