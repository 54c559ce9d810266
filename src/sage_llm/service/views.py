"""Plain-dict views of control-plane state, as the SAGE services return them."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from sage_llm.control_plane.manager import ControlPlaneManager
from sage_llm.types import RequestMetadata, RequestResult

__all__ = ["instances_view", "metrics_view", "models_view", "result_info"]


def instances_view(cp: ControlPlaneManager) -> list[dict[str, Any]]:
    """``show_instances``: every registered instance with its live figures."""
    out: list[dict[str, Any]] = []
    for inst in cp.get_instances():
        live = cp.get_instance_metrics(inst.instance_id)
        out.append(
            {
                "instance_id": inst.instance_id,
                "host": inst.host,
                "port": inst.port,
                "model_name": inst.model_name,
                "instance_type": inst.instance_type.name,
                "engine": inst.engine,
                "tensor_parallel_size": inst.tensor_parallel_size,
                "pipeline_parallel_size": inst.pipeline_parallel_size,
                "gpu_count": inst.gpu_count,
                "is_available": inst.is_available,
                "is_healthy": inst.is_healthy,
                "current_load": inst.current_load,
                "active_requests": inst.active_requests,
                "max_concurrent_requests": inst.max_concurrent_requests,
                "completed_requests": live["completed_requests"],
                "failed_requests": live["failed_requests"],
                "kv_cache_usage": live["kv_cache_usage"],
            }
        )
    return out


def metrics_view(cp: ControlPlaneManager) -> dict[str, Any]:
    """``get_metrics``: the PerformanceMetrics fields, plus the control plane's status and
    the scheduling and PD reports (``scheduling``, ``pd``: None with PD separation off)."""
    perf = _plain(cp.get_metrics())
    perf["status"] = cp.get_status()
    perf["scheduling"] = _plain(cp.get_scheduling_metrics())
    pd = cp.get_pd_metrics()
    perf["pd"] = None if pd is None else _plain(pd)
    return perf


def _plain(report: Any) -> dict[str, Any]:
    """A report dataclass as a dict, its timestamp as ISO 8601 text."""
    out: dict[str, Any] = dataclasses.asdict(report)
    out["timestamp"] = out["timestamp"].isoformat()
    return out


def models_view(models: Iterable[str], tags: Iterable[str] = ()) -> list[dict[str, Any]]:
    """``show_models`` in SAGE's VLLMService shape. Weights live on the engine hosts, so
    path, revision, size and last use are unknown here (None)."""
    return [
        {
            "model_id": model,
            "path": None,
            "revision": None,
            "size_bytes": None,
            "size_mb": None,
            "last_used": None,
            "tags": list(tags),
        }
        for model in sorted(set(models))
    ]


def result_info(meta: RequestMetadata, result: RequestResult) -> dict[str, Any]:
    """The control-plane facts of one request (the ``"sage"`` key of a result entry)."""
    return {
        "status": result.status.value,
        "priority": meta.priority.name,
        "instance_id": result.instance_id,
        "prefill_instance_id": result.prefill_instance_id,
        "queue_wait_ms": result.queue_wait_ms,
        "ttft_ms": result.ttft_ms,
        "tpot_ms": result.tpot_ms,
        "e2e_latency_ms": result.e2e_latency_ms,
        "slo_met": result.slo_met,
        "cached_tokens": result.cached_tokens,
        "attempts": result.attempts,
    }
