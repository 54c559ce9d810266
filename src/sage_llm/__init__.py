"""sage-llm: the sageLLM control plane.

Public API (everything else is private and may change)::

    from sage_llm import (
        ControlPlaneManager, RequestMetadata, RequestPriority, ExecutionInstance, ...
    )
"""

from typing import TYPE_CHECKING, Any

from sage_llm.errors import (
    AdmissionError,
    ConfigError,
    EngineError,
    InvalidRequestError,
    ModelNotFoundError,
    OverBudgetError,
    QueueFullError,
    SageLLMError,
    SLOInfeasibleError,
)
from sage_llm.types import (
    DecodingConfig,
    ExecutionInstance,
    ExecutionInstanceType,
    InstanceMetrics,
    ParallelismType,
    PDMetrics,
    PDSeparationConfig,
    PerformanceMetrics,
    PreffillingConfig,
    PrefillingConfig,
    RequestMetadata,
    RequestPriority,
    RequestResult,
    RequestStatus,
    SchedulingDecision,
    SchedulingMetrics,
)

if TYPE_CHECKING:
    from sage_llm.control_plane.manager import ControlPlaneManager

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """``ControlPlaneManager`` is imported when first asked for: importing the package
    (as every ``sage_llm.*`` module and the command line do) stays quick."""
    if name == "ControlPlaneManager":
        from sage_llm.control_plane.manager import ControlPlaneManager

        return ControlPlaneManager
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AdmissionError",
    "ConfigError",
    "ControlPlaneManager",
    "DecodingConfig",
    "EngineError",
    "ExecutionInstance",
    "ExecutionInstanceType",
    "InstanceMetrics",
    "InvalidRequestError",
    "ModelNotFoundError",
    "OverBudgetError",
    "PDMetrics",
    "PDSeparationConfig",
    "ParallelismType",
    "PerformanceMetrics",
    "PreffillingConfig",
    "PrefillingConfig",
    "QueueFullError",
    "RequestMetadata",
    "RequestPriority",
    "RequestResult",
    "RequestStatus",
    "SLOInfeasibleError",
    "SageLLMError",
    "SchedulingDecision",
    "SchedulingMetrics",
    "__version__",
]
