"""The services' base class: SAGE's BaseService when installed, else the local twin."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from sage_llm.errors import SageLLMError
from sage_llm.service import (
    SAGE_AVAILABLE,
    ControlPlaneVLLMService,
    LocalBaseService,
    ServiceBase,
    VLLMService,
)
from sage_llm.service.base import sage_base_service


class _Echo(LocalBaseService):
    def process(self, payload: Any) -> Any:
        return payload


class _Context:
    """What a SAGE runtime injects as ``ctx``: a name, a logger and call_service."""

    def __init__(self) -> None:
        self.name = "llm"
        self.logger = logging.getLogger("ctx-logger")
        self.calls: list[tuple[Any, ...]] = []

    def call_service(self, name: str, *args: Any, timeout: float | None, method: str | None) -> Any:
        self.calls.append((name, args, timeout, method))
        return f"{name} answered"

    def call_service_async(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return ("future", name, args)


def test_local_base_has_the_sage_surface_without_a_runtime() -> None:
    svc = _Echo()
    assert svc.ctx is None
    assert svc.name == "_Echo"
    assert isinstance(svc.logger, logging.Logger)
    assert svc.logger.name == "_Echo"
    for hook in (svc.setup, svc.start, svc.stop, svc.cleanup):
        assert hook() is None
    with pytest.raises(SageLLMError, match=r"call_service\(\) needs the SAGE runtime"):
        svc.call_service("other", {"task": "generate"})
    with pytest.raises(SageLLMError, match="register_service"):
        svc.call_service_async("other", 1)


def test_local_base_uses_an_injected_context_like_sage_does() -> None:
    ctx = _Context()
    svc = _Echo.__new__(_Echo)
    svc.ctx = ctx  # SAGE injects ctx before __init__ runs
    svc.__init__()  # type: ignore[misc]
    assert svc.ctx is ctx
    assert svc.name == "llm"
    assert svc.logger is ctx.logger
    assert svc.call_service("kv", "key", timeout=3.0, method="get") == "kv answered"
    assert ctx.calls == [("kv", ("key",), 3.0, "get")]
    assert svc.call_service_async("kv", 1) == ("future", "kv", (1,))


def test_services_subclass_sage_base_service_when_sage_is_installed() -> None:
    sage_base = sage_base_service()
    assert (sage_base is not None) == SAGE_AVAILABLE
    expected = sage_base if sage_base is not None else LocalBaseService
    assert ServiceBase is expected
    assert issubclass(ControlPlaneVLLMService, expected)
    assert issubclass(VLLMService, expected)


def test_without_sage_the_package_imports_and_the_services_run() -> None:
    script = textwrap.dedent(
        """
        import sys
        sys.modules["sage"] = None  # make `import sage...` fail as if not installed
        from sage_llm.service import SAGE_AVAILABLE, LocalBaseService, VLLMService
        assert not SAGE_AVAILABLE
        assert issubclass(VLLMService, LocalBaseService)
        svc = VLLMService({"model_id": "llama-3-8b", "engine": "sim", "sim": {"speed": 100}})
        with svc:
            out = svc.process({"task": "generate", "inputs": "hi", "options": {"max_tokens": 3}})
        assert out[0]["usage"]["output_tokens"] == 3, out
        try:
            svc.call_service("other", {})
        except Exception as exc:
            print("call_service:", exc)
        print("ok")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "SAGE is not installed (see docs/service.md: `make install` does it)" in proc.stdout
    assert proc.stdout.strip().endswith("ok")
