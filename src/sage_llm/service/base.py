"""The base class of the SAGE services: SAGE's own when it is installed, else a local twin.

SAGE (PyPI ``isage-common``) defines ``sage.common.service.BaseService``: lifecycle hooks
``setup`` / ``cleanup`` / ``start`` / ``stop`` (the runtime calls ``setup`` when it creates
the service, ``start`` when the job starts, then ``stop`` and ``cleanup`` when it ends), a
``logger`` and a ``name`` (from the injected ``ctx`` when there is one), and
``call_service`` to call other services through ``ctx``. The services of this package
subclass it when it can be imported (the ``sage`` extra); otherwise they subclass
:class:`LocalBaseService`, which has the same surface, so ``import sage_llm.service`` and
the services themselves work without SAGE: only ``call_service`` needs the SAGE runtime.
"""

from __future__ import annotations

import logging
import warnings
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from sage_llm.errors import ControlPlaneNotRunningError, SageLLMError

__all__ = [
    "SAGE_AVAILABLE",
    "LocalBaseService",
    "ManagedService",
    "ServiceBase",
    "sage_base_service",
]

_NO_RUNTIME = (
    "{name}.{method}() needs the SAGE runtime: the service is not running inside a SAGE "
    "environment{why}. Register it with env.register_service(...) in a pipeline"
)


class LocalBaseService:
    """Stand-in for ``sage.common.service.BaseService`` when SAGE is not installed.

    Same surface: no-op lifecycle hooks, ``logger``, ``name`` and ``ctx`` (a runtime
    context a SAGE-like runtime may inject before ``__init__`` runs). ``call_service``
    delegates to ``ctx`` when one was injected and otherwise raises a clear error.
    """

    ctx: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if not hasattr(self, "ctx"):
            self.ctx = None
        self._logger: logging.Logger | None = None

    @property
    def logger(self) -> Any:
        """The context's logger when running under a runtime, else a standard logger."""
        if getattr(self, "_logger", None) is None:
            ctx = getattr(self, "ctx", None)
            self._logger = ctx.logger if ctx is not None else logging.getLogger(type(self).__name__)
        return self._logger

    @property
    def name(self) -> str:
        """The service name given by the runtime, else the class name."""
        ctx = getattr(self, "ctx", None)
        if ctx is not None:
            return str(ctx.name)
        return type(self).__name__

    def call_service(
        self,
        service_name: str,
        *args: Any,
        timeout: float | None = None,
        method: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """Call another service of the same SAGE environment (needs the SAGE runtime)."""
        ctx = self._require_ctx("call_service")
        return ctx.call_service(service_name, *args, timeout=timeout, method=method, **kwargs)

    def call_service_async(
        self,
        service_name: str,
        *args: Any,
        timeout: float | None = None,
        method: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """Like :meth:`call_service`, returning a future (needs the SAGE runtime)."""
        ctx = self._require_ctx("call_service_async")
        return ctx.call_service_async(service_name, *args, timeout=timeout, method=method, **kwargs)

    def setup(self) -> None:
        """Called once when the service is created."""

    def cleanup(self) -> None:
        """Called once when the service is discarded."""

    def start(self) -> None:
        """Called when the job that owns the service starts."""

    def stop(self) -> None:
        """Called when the job that owns the service stops."""

    def _require_ctx(self, method: str) -> Any:
        ctx = getattr(self, "ctx", None)
        if ctx is None:
            why = (
                ""
                if SAGE_AVAILABLE
                else " and SAGE is not installed (see docs/service.md: `make install` does it)"
            )
            raise SageLLMError(_NO_RUNTIME.format(name=type(self).__name__, method=method, why=why))
        return ctx


def sage_base_service() -> type[Any] | None:
    """``sage.common.service.BaseService`` when SAGE is importable, else None.

    isage-common 0.2.5 warns (ImportWarning) about a component it no longer ships when its
    package is imported; that warning is about SAGE's packaging and is silenced here.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ImportWarning)
            from sage.common.service import BaseService
    except ImportError:
        return None
    base: type[Any] = BaseService
    return base


_SAGE_BASE = sage_base_service()
SAGE_AVAILABLE: bool = _SAGE_BASE is not None
"""Whether the services subclass SAGE's own ``BaseService``."""

if TYPE_CHECKING:
    ServiceBase = LocalBaseService
else:
    ServiceBase = _SAGE_BASE if _SAGE_BASE is not None else LocalBaseService


class ManagedService(ServiceBase):
    """The lifecycle both services share. SAGE calls ``start()`` when the job starts and
    ``stop()`` then ``cleanup()`` when it ends; ``setup``/``cleanup`` do the work (both are
    idempotent), and a service also works as a context manager. Both also have SAGE's
    VLLMService methods (``generate``, ``embed``, ``show_models``, and ``download_model``,
    ``delete_model``, ``fine_tune``, which raise), for callers that used them directly."""

    def process(self, payload: Any) -> Any:
        """Run one ``{"task", "inputs", "options"}`` payload and return its result."""
        raise NotImplementedError

    def _not_set_up(self) -> ControlPlaneNotRunningError:
        """The error of a call made before :meth:`setup` (or after :meth:`cleanup`)."""
        return ControlPlaneNotRunningError(
            f"{self.name} is not set up: call setup() first (SAGE calls it when the "
            "pipeline starts) or use the service as a context manager"
        )

    def generate(self, prompts: Any, **options: Any) -> list[dict[str, Any]]:
        """``process({"task": "generate", "inputs": prompts, "options": options})``."""
        result: list[dict[str, Any]] = self.process(
            {"task": "generate", "inputs": prompts, "options": options}
        )
        return result

    def embed(self, texts: Any, **options: Any) -> dict[str, Any]:
        """``process({"task": "embed", "inputs": texts, "options": options})``."""
        result: dict[str, Any] = self.process(
            {"task": "embed", "inputs": texts, "options": options}
        )
        return result

    def show_models(self) -> list[dict[str, Any]]:
        """The models served, in SAGE's VLLMService shape."""
        result: list[dict[str, Any]] = self.process({"task": "show_models"})
        return result

    def download_model(self, *args: Any, **kwargs: Any) -> Any:
        """SAGE's VLLMService method: raises ``InvalidRequestError`` (weights are managed on
        the engine hosts), as ``process({"task": "download_model"})`` does."""
        return self.process({"task": "download_model"})

    def delete_model(self, *args: Any, **kwargs: Any) -> Any:
        """SAGE's VLLMService method: raises ``InvalidRequestError``, as
        :meth:`download_model` does."""
        return self.process({"task": "delete_model"})

    def fine_tune(self, *args: Any, **kwargs: Any) -> Any:
        """SAGE's VLLMService method: raises ``InvalidRequestError``, as
        :meth:`download_model` does."""
        return self.process({"task": "fine_tune"})

    def start(self) -> None:
        """SAGE calls this when the job starts: make sure the service is set up."""
        self.setup()

    def stop(self) -> None:
        """SAGE calls this when the job stops (then ``cleanup``)."""
        self.cleanup()

    def __enter__(self) -> Self:
        self.setup()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()
