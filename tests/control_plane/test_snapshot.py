"""ClusterSnapshot successors (with_assignment equals the field-by-field definition) and
InstanceView figures."""

from __future__ import annotations

from dataclasses import replace

import pytest

from sage_llm.control_plane.snapshot import ClusterSnapshot, InstanceView, RequestInfo
from sage_llm.types import ExecutionInstanceType
from tests.factories import make_instance_view, make_request_info, make_snapshot


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


def test_a_request_info_reads_its_slo_from_its_absolute_deadline_and_its_sticky_key() -> None:
    """``deadline`` is arrival + SLO; the sticky key is the session, else the user."""
    req = make_request_info(arrival=10.0, slo_s=0.25, user_id="u", session_id="s")
    assert req.slo_s == 0.25 and make_request_info().slo_s is None
    assert req.sticky_key == "s"
    assert make_request_info(user_id="u").sticky_key == "u"
    assert make_request_info(user_id="u", session_from_user=False).sticky_key is None
    assert make_request_info(user_id="u", session_id="s", session_from_user=False).sticky_key == "s"


def test_instances_that_failed_a_request_or_are_full_cannot_start_it() -> None:
    """``runnable`` and ``can_serve`` leave out the instances a retry avoids
    (``excluded_instances``) and those with no free slot."""
    full = make_instance_view("full", in_flight=2, max_concurrency=2)
    failed, free = make_instance_view("failed"), make_instance_view("free")
    snap = make_snapshot([full, failed, free])
    retry = make_request_info(excluded_instances=frozenset({"failed"}))
    assert [i.instance_id for i in snap.runnable(retry)] == ["free"]
    assert not make_snapshot([full, failed]).can_serve(retry)
    assert make_snapshot([full, failed]).can_serve(make_request_info())


def test_predictions_count_decode_steps_after_the_first_token_and_every_gpu() -> None:
    """E2E: TTFT and one TPOT per output token after the first; cost: price per GPU-hour
    × GPUs × predicted time."""
    view = make_instance_view(est_ttft_base_s=0.1, est_prefill_tps=1000.0, est_tpot_s=0.02,
                              gpu_count=4, price_per_gpu_hour=3.6)  # fmt: skip
    assert view.predict_e2e_s(100, 11) == pytest.approx(0.1 + 0.1 + 10 * 0.02)
    assert view.predict_e2e_s(100, 0) == pytest.approx(0.2)
    assert view.predict_cost(100, 11) == pytest.approx(4 * 0.001 * 0.4)
