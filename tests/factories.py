"""Shared test factories for requests, instances and clusters (and the benchmark scripts,
which are not in the package)."""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from sage_llm.control_plane.snapshot import (
    EMPTY_PREFIX_VIEW,
    ClusterSnapshot,
    CompletionRecord,
    InstanceView,
    PrefixView,
    RequestInfo,
)
from sage_llm.types import (
    ExecutionInstance,
    ExecutionInstanceType,
    RequestMetadata,
    RequestPriority,
    RequestStatus,
)

MODEL = "llama-3-8b"


def make_request_info(
    request_id: str = "r0",
    *,
    model: str = MODEL,
    arrival: float = 0.0,
    prompt_tokens: int = 100,
    max_tokens: int = 50,
    priority: RequestPriority = RequestPriority.NORMAL,
    slo_s: float | None = None,
    **kwargs: Any,
) -> RequestInfo:
    deadline = None if slo_s is None else arrival + slo_s
    return RequestInfo(
        request_id=request_id,
        model=model,
        arrival=arrival,
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        priority=priority,
        deadline=deadline,
        **kwargs,
    )


def make_completion_record(request_id: str = "r0", **kwargs: Any) -> CompletionRecord:
    """A completed request's record as a policy's ``on_complete`` gets it (10 prompt and
    10 output tokens, its SLO missed) with ``kwargs`` changed."""
    fields: dict[str, Any] = {
        "status": RequestStatus.COMPLETED, "priority": RequestPriority.NORMAL,
        "instance_id": "i0", "arrival": 0.0, "finished": 1.0, "queue_wait_s": 0.0,
        "ttft_s": 0.1, "tpot_s": 0.01, "e2e_s": 1.0, "prompt_tokens": 10,
        "completion_tokens": 10, "slo_met": False,
    }  # fmt: skip
    return CompletionRecord(request_id=request_id, **{**fields, **kwargs})


def make_request_infos(
    n: int, *, start: float = 0.0, gap: float = 0.001, **kwargs: Any
) -> list[RequestInfo]:
    return [make_request_info(f"r{i}", arrival=start + i * gap, **kwargs) for i in range(n)]


def make_instance_view(
    instance_id: str = "i0", *, model: str = MODEL, **kwargs: Any
) -> InstanceView:
    return InstanceView(instance_id=instance_id, model=model, **kwargs)


def make_snapshot(
    instances: Sequence[InstanceView] | int = 4,
    *,
    now: float = 0.0,
    prefix: PrefixView = EMPTY_PREFIX_VIEW,
    **view_kwargs: Any,
) -> ClusterSnapshot:
    if isinstance(instances, int):
        instances = [make_instance_view(f"i{n}", **view_kwargs) for n in range(instances)]
    return ClusterSnapshot(now=now, instances=tuple(instances), prefix=prefix)


def with_view(snap: ClusterSnapshot, instance_id: str, **changes: Any) -> ClusterSnapshot:
    out = tuple(replace(i, **changes) if i.instance_id == instance_id else i for i in snap)
    return replace(snap, instances=out)


def make_instance(
    instance_id: str = "sim-0",
    *,
    port: int = 8000,
    model_name: str = MODEL,
    instance_type: ExecutionInstanceType = ExecutionInstanceType.GENERAL,
    host: str = "127.0.0.1",
    **kwargs: Any,
) -> ExecutionInstance:
    return ExecutionInstance(
        instance_id=instance_id,
        host=host,
        port=port,
        model_name=model_name,
        instance_type=instance_type,
        **kwargs,
    )


def make_instances(n: int, **kwargs: Any) -> list[ExecutionInstance]:
    return [make_instance(f"sim-{i}", port=8000 + i, **kwargs) for i in range(n)]


ROLE_LETTERS = {
    "P": ExecutionInstanceType.PREFILLING,
    "D": ExecutionInstanceType.DECODING,
    "G": ExecutionInstanceType.GENERAL,
    "H": ExecutionInstanceType.HYBRID,
}


def make_role_instances(roles: str, **kwargs: Any) -> list[ExecutionInstance]:
    """One instance per letter of ``roles`` (``P``refilling, ``D``ecoding, ``G``eneral,
    ``H``ybrid), ``sim-0`` … in that order: ``make_role_instances("PPDD")`` is two
    prefill and two decode instances."""
    return [
        make_instance(f"sim-{i}", port=8000 + i, instance_type=ROLE_LETTERS[letter], **kwargs)
        for i, letter in enumerate(roles)
    ]


def make_metadata(request_id: str = "req-0", **kwargs: Any) -> RequestMetadata:
    kwargs.setdefault("prompt", "Tell me about the control plane.")
    kwargs.setdefault("max_tokens", 16)
    kwargs.setdefault("model_name", MODEL)
    return RequestMetadata(request_id=request_id, **kwargs)


def load_benchmark(name: str) -> ModuleType:
    """The script ``benchmarks/<name>.py`` as a module (they are not in the package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def usage_error(
    main: Callable[[list[str]], object], argv: list[str], capsys: pytest.CaptureFixture[str]
) -> str:
    """What a benchmark script's ``main(argv)`` wrote to stderr as it exited with argparse's
    usage error (status 2), which it must."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


def free_ports(n: int) -> int:
    """A base port with ``n`` free consecutive loopback ports after it."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = int(s.getsockname()[1])
        if base + n > 65535:
            continue
        socks = [socket.socket() for _ in range(n)]
        try:
            for k, sock in enumerate(socks):
                sock.bind(("127.0.0.1", base + k))
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
        return base
    raise RuntimeError("no free ports")


def alive(pid: int) -> bool:
    """Whether process ``pid`` still runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
