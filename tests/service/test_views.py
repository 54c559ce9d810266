"""Plain-dict views of a running control plane."""

from __future__ import annotations

import json
from typing import Any

from sage_llm import (
    ControlPlaneManager,
    RequestMetadata,
    RequestPriority,
    RequestResult,
    RequestStatus,
)
from sage_llm.service.views import instances_view, metrics_view, models_view, result_info
from sage_llm.sim.clock import run_virtual
from tests.factories import make_instances


def test_views_of_a_control_plane_after_one_request() -> None:
    async def main() -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
        cp = ControlPlaneManager(scheduling_policy="priority", mode="simulated")
        for inst in make_instances(2, max_concurrent_requests=3):
            cp.register_instance(inst)
        async with cp:
            meta = RequestMetadata("r1", prompt="hello", max_tokens=4, slo_deadline_ms=10_000,
                                   priority=RequestPriority.HIGH)  # fmt: skip
            result = await cp.generate(meta)
            assert result.status is RequestStatus.COMPLETED
            return instances_view(cp), metrics_view(cp), result_info(meta, result)

    instances, metrics, info = run_virtual(main())
    assert [i["instance_id"] for i in instances] == ["sim-0", "sim-1"]
    assert {i["max_concurrent_requests"] for i in instances} == {3}
    assert sum(int(i["completed_requests"]) for i in instances) == 1
    assert metrics["completed_requests"] == 1
    assert metrics["status"]["scheduling_policy"] == "priority"
    assert metrics["scheduling"]["slo_compliance_by_priority"] == {"high": 1.0}
    assert isinstance(metrics["scheduling"]["timestamp"], str)
    assert metrics["pd"]["requests_routed_to_prefilling"] == 0  # PD on, no PD instances
    json.dumps(metrics)  # plain data, as SAGE passes it on
    assert info["priority"] == "HIGH"
    assert info["status"] == "completed"
    assert info["slo_met"] is True
    assert info["instance_id"] in {"sim-0", "sim-1"}


def test_models_view_has_sages_model_info_keys() -> None:
    assert models_view(["b", "a", "b"], ["t"]) == [
        {"model_id": m, "path": None, "revision": None, "size_bytes": None, "size_mb": None,
         "last_used": None, "tags": ["t"]}
        for m in ("a", "b")
    ]  # fmt: skip


def test_result_info_gives_the_results_ttft_and_tpot_each_under_its_own_name() -> None:
    async def main() -> tuple[RequestResult, dict[str, Any]]:
        cp = ControlPlaneManager(scheduling_policy="fifo", mode="simulated")
        for inst in make_instances(1):
            cp.register_instance(inst)
        async with cp:
            meta = RequestMetadata("r1", prompt="Explain KV caches " * 50, max_tokens=64)
            result = await cp.generate(meta)
            return result, result_info(meta, result)

    result, info = run_virtual(main())
    assert result.ttft_ms is not None and result.tpot_ms is not None
    assert result.ttft_ms != result.tpot_ms  # a swap would show
    assert (info["ttft_ms"], info["tpot_ms"]) == (result.ttft_ms, result.tpot_ms)
