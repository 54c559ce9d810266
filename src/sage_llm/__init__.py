"""sage-llm: the sageLLM control plane.

Public API (everything else is private and may change)::

    from sage_llm import (
        ControlPlaneManager, RequestMetadata, RequestPriority, ExecutionInstance, ...
    )
"""

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sage_llm.control_plane.manager import ControlPlaneManager
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
        ChoiceResult,
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

__version__ = "0.1.0"

_HOMES = ("sage_llm.types", "sage_llm.errors", "sage_llm.control_plane.manager")
"""The modules the public names live in, looked in in this order."""


def __getattr__(name: str) -> Any:
    """The public names, and the package's modules (``sage_llm.errors``, …), are imported
    when first asked for: importing the package (as every ``sage_llm.*`` module and the
    command line do) costs nothing, so a Ctrl-C while the command line starts lands where
    it is answered in one line."""
    if name in __all__ and name != "__version__":
        for home in _HOMES:
            module = importlib.import_module(home)
            if hasattr(module, name):
                return getattr(module, name)
    if name.isidentifier() and not name.startswith("_"):
        try:
            if importlib.util.find_spec(f"{__name__}.{name}") is not None:
                return importlib.import_module(f"{__name__}.{name}")
        except ImportError:
            pass
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public names with the module's own (``help(sage_llm)`` lists them)."""
    return sorted({*globals(), *__all__})


__all__ = [
    "AdmissionError",
    "ChoiceResult",
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
