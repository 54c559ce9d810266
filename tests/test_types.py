"""The seed's data types: what they show of themselves."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from sage_llm.types import (
    ExecutionInstance,
    ExecutionInstanceType,
    ParallelismType,
    RequestMetadata,
    RequestPriority,
    RequestStatus,
    SchedulingDecision,
    host_port,
)
from tests.factories import make_instance


def test_engine_api_key_never_appears_in_repr() -> None:
    inst = ExecutionInstance(
        instance_id="a", host="127.0.0.1", port=8000, model_name="m", api_key="sk-very-secret"
    )
    assert "sk-very-secret" not in repr(inst)
    assert "sk-very-secret" not in str(inst)
    assert inst.api_key == "sk-very-secret"


def test_a_priority_parses_from_a_member_a_number_or_a_name() -> None:
    assert RequestPriority.parse("high") is RequestPriority.HIGH
    assert RequestPriority.parse(" 3 ") is RequestPriority.LOW
    assert RequestPriority.parse(0) is RequestPriority.CRITICAL
    for bad in ("\u00b2", "\uff11", "-1", "5", -1, 5, True, "soon"):  # "²" is isdigit(), not int()
        with pytest.raises(ValueError, match="invalid priority"):
            RequestPriority.parse(bad)


def test_the_seed_defaults_of_an_instance_a_request_and_a_decision() -> None:
    inst = ExecutionInstance(instance_id="a", host="h", port=1, model_name="m")
    sizes = (inst.tensor_parallel_size, inst.pipeline_parallel_size, inst.data_parallel_size)
    assert sizes == (1, 1, 1)
    assert inst.instance_type is ExecutionInstanceType.GENERAL
    assert (inst.gpu_count, inst.max_concurrent_requests) == (1, 100)
    assert inst.is_available and inst.is_healthy and inst.nvlink_peers == []
    meta = RequestMetadata(request_id="r")
    assert meta.priority is RequestPriority.NORMAL
    assert (meta.temperature, meta.top_p, meta.billing_tier) == (1.0, 1.0, "standard")
    assert meta.tags == {} and meta.latency_ms is None and meta.queue_wait_ms is None
    decision = SchedulingDecision("r", "a", ParallelismType.TENSOR_PARALLEL, 1.0, 0.0)
    assert (decision.tensor_parallel_size, decision.pipeline_parallel_size) == (1, 1)


def test_host_port_brackets_an_ipv6_address_once() -> None:
    assert host_port("127.0.0.1", 8000) == "127.0.0.1:8000"
    assert host_port("::1", 8000) == "[::1]:8000"
    assert host_port("[::1]", 8000) == "[::1]:8000"
    assert make_instance(host="fe80::2", port=9).base_url == "http://[fe80::2]:9"


def test_parallelism_of_sizes_is_the_one_kind_above_one_or_hybrid() -> None:
    assert ParallelismType.of() is None
    assert ParallelismType.of(tensor=2) is ParallelismType.TENSOR_PARALLEL
    assert ParallelismType.of(pipeline=2) is ParallelismType.PIPELINE_PARALLEL
    assert ParallelismType.of(data=4) is ParallelismType.DATA_PARALLEL
    assert ParallelismType.of(2, 2) is ParallelismType.HYBRID
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match=r"^tensor parallel size must be an integer >= 1"):
            ParallelismType.of(tensor=bad)  # type: ignore[arg-type]
    for name in ("pipeline", "data"):  # the error names the size that is wrong
        with pytest.raises(ValueError, match=f"^{name} parallel size must be an integer >= 1"):
            ParallelismType.of(**{name: 0})


def test_terminal_statuses_are_completed_failed_and_cancelled() -> None:
    terminal = {s for s in RequestStatus if s.is_terminal}
    assert terminal == {RequestStatus.COMPLETED, RequestStatus.FAILED, RequestStatus.CANCELLED}


def test_instance_roles_parse_with_aliases_and_say_which_legs_they_run() -> None:
    kinds = ExecutionInstanceType
    assert kinds.parse("prefill") is kinds.PREFILLING
    assert kinds.parse("DECODE") is kinds.DECODING
    assert kinds.parse(" mixed ") is kinds.HYBRID
    assert kinds.parse("GENERAL") is kinds.GENERAL
    with pytest.raises(ValueError, match="invalid instance_type"):
        kinds.parse("both")
    assert {k for k in kinds if k.runs_prefill} == {kinds.GENERAL, kinds.HYBRID, kinds.PREFILLING}
    assert {k for k in kinds if k.runs_decode} == {kinds.GENERAL, kinds.HYBRID, kinds.DECODING}
    assert {k for k in kinds if k.runs_whole_requests} == {kinds.GENERAL, kinds.HYBRID}


def test_affinity_score_by_machine_nvlink_and_rack() -> None:
    a = make_instance("a", machine_id="m1", rack_id="r1", nvlink_peers=["b"])
    b = make_instance("b", machine_id="m1", rack_id="r1")
    c = make_instance("c", machine_id="m1", rack_id="r1")
    d = make_instance("d", machine_id="m2", rack_id="r1")
    e = make_instance("e", machine_id="m3", rack_id="r2")
    assert b.get_affinity_score(a) == 1.0  # a lists b as its NVLink peer
    assert a.get_affinity_score(c) == 0.5
    assert a.get_affinity_score(d) == 0.1
    assert a.get_affinity_score(e) == 0.01
    assert make_instance("x").get_affinity_score(make_instance("y")) == 0.01  # unknown


def test_the_seeds_capacity_checks_of_an_instance() -> None:
    kinds = ExecutionInstanceType
    prefill = make_instance("p", instance_type=kinds.PREFILLING, current_load=0.25)
    decode = make_instance("d", instance_type=kinds.DECODING)
    assert prefill.available_capacity == 0.75
    assert make_instance(current_load=1.5).available_capacity == 0.0
    assert prefill.can_accept_prefilling_request() and not prefill.can_accept_decoding_request()
    assert decode.can_accept_decoding_request() and not decode.can_accept_prefilling_request()
    refused = (
        make_instance(is_available=False),
        make_instance(is_healthy=False),
        make_instance(active_requests=2, max_concurrent_requests=2),
        make_instance(current_load=0.95),
    )
    assert [i.can_accept_request for i in refused] == [False, False, False, False]
    assert make_instance(active_requests=1, max_concurrent_requests=2).can_accept_request


def test_queue_wait_is_from_queued_to_scheduled_and_a_parallelism_parses_as_itself() -> None:
    queued = datetime(2026, 1, 1, 12, 0, 0)
    meta = RequestMetadata(
        request_id="r", queue_time=queued, schedule_time=queued + timedelta(milliseconds=250)
    )
    assert meta.queue_wait_ms == 250.0
    assert ParallelismType.parse(ParallelismType.HYBRID) is ParallelismType.HYBRID
    assert ParallelismType.parse("TENSOR_PARALLEL") is ParallelismType.TENSOR_PARALLEL
