"""The services inside real SAGE pipelines (isage-kernel's LocalEnvironment).

Operators call the services with ``self.call_service`` from SAGE's worker threads; SAGE
runs each service's calls on that service's own request thread. Skipped only when SAGE
(isage-common / isage-kernel) is not installed.
"""

from __future__ import annotations

import queue
import threading
import time
import warnings
from typing import Any

import pytest

from sage_llm.service import SAGE_AVAILABLE, ControlPlaneVLLMService, VLLMService
from sage_llm.sim.clock import VirtualEventLoop
from tests.service.fleets import MODEL, sim_fleet

with warnings.catch_warnings():
    warnings.simplefilter("ignore", ImportWarning)  # isage-common 0.2.5 packaging warning
    pytest.importorskip(
        "sage.kernel.api.local_environment",
        reason="SAGE is not installed (isage-common, isage-kernel: see docs/service.md)",
    )
    # isage-common ships no type information (no py.typed marker): these classes are Any to
    # mypy, so the operators below subclass them under a narrow ignore[misc].
    from sage.common.core.functions import MapFunction, SinkFunction
    from sage.kernel.api.local_environment import LocalEnvironment

CALL_TIMEOUT_S = 120.0  # SAGE's own default is 10 s


@pytest.fixture(scope="module", autouse=True)
def _job_manager_without_daemon() -> None:
    """SAGE's JobManager (a process-wide singleton that every LocalEnvironment uses) made
    first without its TCP daemon: the daemon serves SAGE's command line on the fixed port
    19001, which these tests do not use, and when another process holds that port its
    failed start left an unbound socket open until the interpreter exited (a
    ResourceWarning after the run)."""
    from sage.kernel.runtime.job_manager import JobManager

    JobManager(enable_daemon=False)


class AskLLM(MapFunction):  # type: ignore[misc]
    """Send the record's payload to the ``llm`` service; errors become data."""

    def execute(self, record: dict[str, Any]) -> dict[str, Any]:
        try:
            answer = self.call_service("llm", record["payload"], timeout=CALL_TIMEOUT_S)
        except Exception as exc:  # SAGE re-raises service errors as RuntimeError
            return {"name": record["name"], "error": f"{type(exc).__name__}: {exc}"}
        return {"name": record["name"], "answer": answer, "operator": self.name}


class Collect(SinkFunction):  # type: ignore[misc]
    def __init__(self, out: queue.Queue[dict[str, Any]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.out = out

    def execute(self, data: dict[str, Any]) -> None:
        self.out.put(data)


def _run(service: type[Any], config: dict[str, Any], records: list[dict[str, Any]],
         parallelism: int) -> dict[str, dict[str, Any]]:  # fmt: skip
    out: queue.Queue[dict[str, Any]] = queue.Queue()
    env = LocalEnvironment("sage-llm-test")
    env.register_service("llm", service, config, loop_factory=VirtualEventLoop)
    env.from_batch(records).map(AskLLM, parallelism=parallelism).sink(Collect, out)
    env.submit(autostop=True)
    _join_pipeline_threads()
    results: dict[str, dict[str, Any]] = {}
    while not out.empty():
        item = out.get_nowait()
        results[item["name"]] = item
    return results


_PIPELINE_THREADS = ("sage-llm-service", "AskLLM", "QueueListener", "ServiceResponseListener")
"""Threads of a pipeline's service and workers, which outlive ``submit(autostop=True)`` a
moment while they shut down."""


def _join_pipeline_threads(timeout_s: float = 30.0) -> None:
    """Wait until the pipeline's threads have ended, so none runs into the next test."""
    deadline = time.monotonic() + timeout_s
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and thread.name.startswith(_PIPELINE_THREADS):
            thread.join(max(0.0, deadline - time.monotonic()))


def _generate(name: str, inputs: Any, **options: Any) -> dict[str, Any]:
    return {"name": name, "payload": {"task": "generate", "inputs": inputs, "options": options}}


def test_sage_base_class_is_in_use() -> None:
    assert SAGE_AVAILABLE


def test_control_plane_service_in_a_pipeline_with_concurrent_operators() -> None:
    records = [_generate(f"q{i}", f"Question {i}?", max_tokens=6, priority=i % 5) for i in range(8)]
    records += [
        _generate(
            "batch", [{"prompt": "a", "options": {"priority": "CRITICAL"}}, "b", "c"], max_tokens=3
        ),
        {"name": "instances", "payload": {"task": "show_instances"}},
        {"name": "bad-task", "payload": {"task": "summarize", "inputs": "x"}},
        _generate("bad-option", "x", priority="asap"),
    ]
    results = _run(ControlPlaneVLLMService, sim_fleet(), records, parallelism=4)

    assert set(results) == {r["name"] for r in records}
    operators = set()
    for i in range(8):
        (entry,) = results[f"q{i}"]["answer"]
        assert set(entry) == {"generations", "usage", "request_id", "sage"}
        assert entry["usage"]["output_tokens"] == 6
        assert entry["generations"][0]["text"].strip()
        assert entry["sage"]["status"] == "completed"
        operators.add(results[f"q{i}"]["operator"])
    assert len(operators) > 1  # several operator instances called the service
    batch = results["batch"]["answer"]
    assert [e["sage"]["priority"] for e in batch] == ["CRITICAL", "NORMAL", "NORMAL"]
    assert [i["instance_id"] for i in results["instances"]["answer"]] == ["sim-0", "sim-1"]
    assert "unknown task 'summarize'" in results["bad-task"]["error"]
    assert "invalid priority 'asap'" in results["bad-option"]["error"]


def test_vllm_service_existing_payloads_in_a_pipeline() -> None:
    config = {"model_id": MODEL, "engine": "sim", "sampling": {"max_tokens": 4}}
    records = [
        _generate("one", "Hello"),
        _generate("many", ["a", "b", "c"], max_tokens=2),
        {"name": "embed", "payload": {"task": "embed", "inputs": ["x", "y"]}},
        {"name": "models", "payload": {"task": "show_models"}},
        {"name": "download", "payload": {"task": "download_model", "inputs": MODEL}},
    ]
    results = _run(VLLMService, config, records, parallelism=2)

    (one,) = results["one"]["answer"]
    assert set(one) == {"generations", "usage", "request_id"}
    assert one["usage"]["output_tokens"] == 4
    assert [e["usage"]["output_tokens"] for e in results["many"]["answer"]] == [2, 2, 2]
    assert results["embed"]["answer"]["dimension"] == 64
    assert len(results["embed"]["answer"]["vectors"]) == 2
    assert results["models"]["answer"][0]["model_id"] == MODEL
    assert "not supported by sage-llm" in results["download"]["error"]
