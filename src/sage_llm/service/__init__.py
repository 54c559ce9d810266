"""SAGE integration: LLM services for SAGE pipelines.

* :class:`ControlPlaneVLLMService` sends requests through a control plane (scheduling by
  priority and SLO, routing over a fleet, PD disaggregation).
* :class:`VLLMService` is SAGE's simple one-engine service with the same payloads; with
  ``use_control_plane = true`` it hands them to the control plane.

Both subclass ``sage.common.service.BaseService`` when SAGE (PyPI ``isage-common``, the
``sage`` extra) is installed, else :class:`LocalBaseService`; this package imports and
the services run without SAGE. Register them in a pipeline with
``env.register_service("llm", ControlPlaneVLLMService, config)`` and call them from
operators with ``self.call_service("llm", {"task": ..., "inputs": ..., "options": ...})``.
See ``docs/service.md``.
"""

from sage_llm.service.base import SAGE_AVAILABLE, LocalBaseService, ServiceBase
from sage_llm.service.config import ControlPlaneServiceConfig, VLLMServiceConfig
from sage_llm.service.control_plane_service import CONTROL_PLANE_TASKS, ControlPlaneVLLMService
from sage_llm.service.payloads import RequestDefaults
from sage_llm.service.runner import LoopThread
from sage_llm.service.vllm_service import VLLM_TASKS, VLLMService, register_vllm_service

__all__ = [
    "CONTROL_PLANE_TASKS",
    "SAGE_AVAILABLE",
    "VLLM_TASKS",
    "ControlPlaneServiceConfig",
    "ControlPlaneVLLMService",
    "LocalBaseService",
    "LoopThread",
    "RequestDefaults",
    "ServiceBase",
    "VLLMService",
    "VLLMServiceConfig",
    "register_vllm_service",
]
