"""VLLMService's in-process engine (``vllm.LLM`` in this process), over a fake ``vllm``
module shaped as vLLM 0.32's (tests.service.fake_vllm): CI runs without vLLM."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from sage_llm.service import VLLMService
from sage_llm.service.runner import LoopThread
from tests.service import fake_vllm

ENGINE = {"max_model_len": 512, "dtype": "bfloat16", "enforce_eager": True}


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> fake_vllm.Fake:
    return fake_vllm.install(monkeypatch)


@pytest.fixture
def svc(fake: fake_vllm.Fake) -> Iterator[VLLMService]:
    with VLLMService({"model_id": "tiny", "engine": ENGINE}) as service:
        yield service


def _generate(svc: VLLMService, inputs: Any, **options: Any) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = svc.process({"inputs": inputs, "options": options})
    return result


def test_cleanup_shuts_the_engine_down_in_a_worker_thread(fake: fake_vllm.Fake) -> None:
    """cleanup() stops vLLM's engine (its processes had lived on until Python exited), the
    embedder's too, and a second setup() runs one engine, not two."""
    config = {"model_id": "tiny", "embedding_model_id": "e5", "engine": ENGINE,
              "embedding_engine": {"runner": "pooling"}}  # fmt: skip
    svc = VLLMService(config)
    svc.setup()
    assert svc.process({"task": "embed", "inputs": "a b"})["dimension"] == 2
    llm, embedder = fake.llms
    svc.cleanup()
    for engine in (llm, embedder):
        assert engine.shut_down
        core = engine.llm_engine.engine_core
        assert core.thread is not None and core.thread != "MainThread"
        assert not core.thread.startswith("sage-llm")  # not on the service loop either
    svc.setup()
    (entry,) = _generate(svc, "hello there", max_tokens=1)
    assert entry["generations"][0]["text"] == "hello"
    svc.cleanup()
    assert [e.shut_down for e in fake.llms] == [True, True, True]


def test_setup_waits_for_the_model_load_without_a_time_limit(
    fake: fake_vllm.Fake, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real model's load often takes longer than the 60 s a start had been given."""
    limits: list[float | None] = []
    start = LoopThread.start

    def recorded(self: LoopThread, init: Any = None, timeout: float | None = 60.0) -> None:
        limits.append(timeout)
        start(self, init, timeout)

    monkeypatch.setattr(LoopThread, "start", recorded)
    with VLLMService({"model_id": "tiny", "engine": ENGINE}) as svc:
        assert _generate(svc, "a b", max_tokens=1)[0]["generations"][0]["text"] == "a"
    assert limits == [None]
