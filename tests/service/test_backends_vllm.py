"""VLLMService's in-process engine (``vllm.LLM`` in this process), over a fake ``vllm``
module shaped as vLLM 0.32's (tests.service.fake_vllm): CI runs without vLLM."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from sage_llm.errors import (
    ConfigError,
    ControlPlaneNotRunningError,
    DeadlineExceededError,
    EngineError,
    EngineRequestRejectedError,
    InvalidRequestError,
    ModelNotFoundError,
)
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


def test_vllms_refusals_are_sage_errors_naming_the_input(
    svc: VLLMService, fake: fake_vllm.Fake
) -> None:
    """vLLM's VLLMValidationError / ValueError had leaked; they are the errors the HTTP
    services raise, naming the part of the payload (``inputs[i]`` in a batch)."""
    long = "word " * 200  # past the fake's 512-character context
    with pytest.raises(EngineRequestRejectedError, match="maximum context length") as one:
        _generate(svc, long, max_tokens=4)
    assert one.value.param == "inputs"
    with pytest.raises(InvalidRequestError) as batch:  # the one refused is found
        _generate(svc, ["hi", [{"role": "user", "content": "hey"}], long], max_tokens=4)
    assert isinstance(batch.value, EngineRequestRejectedError)
    assert batch.value.param == "inputs[2]" and str(batch.value).startswith("inputs[2]: ")
    with pytest.raises(EngineRequestRejectedError, match="top_k must be 0") as bad:
        _generate(svc, ["hi", {"prompt": "yo", "options": {"top_k": -5}}], max_tokens=4)
    assert bad.value.param == "inputs[1]"
    with pytest.raises(EngineRequestRejectedError, match=r"min_p must be in \[0, 1\]") as one:
        _generate(svc, "hi", min_p=3)
    assert one.value.param is None  # (vLLM names no field: as over HTTP)
    refusal = r"not served by an engine that supports embeddings .*only supported for pooling"
    with pytest.raises(InvalidRequestError, match=refusal) as embed:
        svc.process({"task": "embed", "inputs": "hello"})
    assert type(embed.value) is InvalidRequestError and embed.value.param is None
    with pytest.raises(InvalidRequestError) as named:
        svc.process({"task": "embed", "inputs": "hello", "options": {"model": "tiny"}})
    assert named.value.param == "options.model"
    (entry,) = _generate(svc, "still serving", max_tokens=1)  # the engine goes on
    assert entry["generations"][0]["text"] == "still"


def test_an_engine_failure_is_an_engine_error(svc: VLLMService, fake: fake_vllm.Fake) -> None:
    def dead(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("EngineCore encountered an issue")

    fake.llms[0].generate = dead  # type: ignore[method-assign]
    with pytest.raises(EngineError, match="RuntimeError: EngineCore encountered") as err:
        _generate(svc, "hi")
    assert not isinstance(err.value, InvalidRequestError)


def test_the_model_and_timeout_options_are_honoured(svc: VLLMService, fake: fake_vllm.Fake) -> None:
    """``model`` other than the service's is a ModelNotFoundError, and a call past its
    ``timeout`` a DeadlineExceededError, as over HTTP (both had been ignored); the engine
    takes the next call once the timed-out one has left it (one call at a time)."""
    with pytest.raises(ModelNotFoundError, match="serves 'tiny', not 'other'") as one:
        _generate(svc, "hi", model="other")
    assert one.value.param == "options.model"
    with pytest.raises(ModelNotFoundError) as batch:
        _generate(svc, ["hi", {"prompt": "yo", "options": {"model": "other"}}])
    assert batch.value.param == "inputs[1].options.model"
    assert fake.llms[0].calls == []  # refused before the engine was asked
    assert _generate(svc, "a b", model="tiny", max_tokens=1)[0]["generations"][0]["text"] == "a"

    llm = fake.llms[0]
    answer = llm.generate
    gate, entered = threading.Event(), threading.Semaphore(0)
    inside: list[int] = []

    def slow(*args: Any, **kwargs: Any) -> Any:
        inside.append(1)
        entered.release()
        try:
            assert len(inside) == 1, "two calls ran on the engine at once"
            gate.wait()
            return answer(*args, **kwargs)
        finally:
            inside.pop()

    llm.generate = slow  # type: ignore[method-assign]
    with pytest.raises(DeadlineExceededError, match=r"within the 0\.05 s timeout"):
        _generate(svc, "a b", timeout=0.05)
    with ThreadPoolExecutor(1) as pool:
        later = pool.submit(_generate, svc, "c d", max_tokens=1)
        assert entered.acquire(timeout=10)  # the timed-out call, still on the engine
        assert not entered.acquire(timeout=0.2)  # the next one waits for it to leave
        gate.set()
        assert later.result()[0]["generations"][0]["text"] == "c"


def test_engine_arguments_vllm_does_not_take_are_refused_when_the_service_is_built(
    fake: fake_vllm.Fake,
) -> None:
    """Each unknown argument is a ConfigError naming it (it had failed setup() with a raw
    TypeError); ``model`` is model_id's."""
    with pytest.raises(ConfigError) as err:
        VLLMService({"model_id": "tiny", "engine": {**ENGINE, "enforce_eagre": True},
                     "embedding_model_id": "e5", "embedding_engine": {"model": "x"}})  # fmt: skip
    keys = [e.key for e in err.value.each()]
    assert keys == ["engine.enforce_eagre", "embedding_engine.model"]
    assert "did you mean 'enforce_eager'?" in str(err.value)
    assert fake.llms == []


def test_a_failed_load_is_a_typed_error_with_vllms_message(
    fake: fake_vllm.Fake, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default max_model_len (4096) gives way to a model with a shorter context (it
    had failed setup()); an argument vLLM refuses is a ConfigError with its message, any
    other failure an EngineError (they had been raw pydantic / vLLM errors)."""
    with VLLMService({"model_id": "tiny"}) as svc:  # the default engine table
        assert "max_model_len" not in fake.llms[-1].kwargs
        assert fake.llms[-1].kwargs["gpu_memory_utilization"] == 0.9
        assert _generate(svc, "a b", max_tokens=1)[0]["generations"][0]["text"] == "a"
    assert "its own" in caplog.text
    svc = VLLMService({"model_id": "tiny", "engine": {"max_model_len": 3000}})
    with pytest.raises(ConfigError, match=r"(?s)engine: vLLM could not load .tiny.: ValueError: .*"
                       r"max_model_len \(3000\) is greater than the derived") as err:  # fmt: skip
        svc.setup()
    assert err.value.key == "engine"
    with pytest.raises(ControlPlaneNotRunningError):  # not set up
        _generate(svc, "hi")

    def broken(**kwargs: Any) -> None:
        raise RuntimeError("Engine core initialization failed")

    monkeypatch.setattr(fake.module, "LLM", broken)
    with pytest.raises(EngineError, match="could not load 'tiny': RuntimeError: Engine core"):
        VLLMService({"model_id": "tiny", "engine": ENGINE}).setup()


def test_logprobs_come_in_openais_format_as_over_http(svc: VLLMService) -> None:
    """vLLM's ``{token_id: Logprob}`` per token (not JSON) becomes the pieces the HTTP path
    gives: a prompt's completion format, with the top ``count + 1``; a chat's content
    format, with ``count``."""
    (entry,) = _generate(svc, "a b c", max_tokens=2, logprobs=2)
    pieces = entry["generations"][0]["logprobs"]
    assert pieces == [
        {"text_offset": [0], "token_logprobs": [-1.5], "tokens": ["a"],
         "top_logprobs": [{"a": -1.5, "<1>": -1.0, "<2>": -2.0}]},
        {"text_offset": [1], "token_logprobs": [-2.5], "tokens": [" b"],
         "top_logprobs": [{" b": -2.5, "<1>": -1.0, "<2>": -2.0}]},
    ]  # fmt: skip
    chat = [{"role": "user", "content": "a b c"}]
    (entry,) = _generate(svc, chat, max_tokens=1, logprobs=True)
    assert entry["generations"][0]["logprobs"] == [
        {"content": [{"token": "a", "logprob": -1.5, "bytes": [97],
                      "top_logprobs": [{"token": "a", "logprob": -1.5, "bytes": [97]}]}]}
    ]  # fmt: skip
    (entry,) = _generate(svc, chat, max_tokens=1, logprobs=0)
    assert entry["generations"][0]["logprobs"][0]["content"][0]["top_logprobs"] == []
    json.dumps(entry)
    (entry,) = _generate(svc, "a b c", max_tokens=1)
    assert entry["generations"][0]["logprobs"] is None


def test_show_models_lists_the_model_and_the_embedding_model(fake: fake_vllm.Fake) -> None:
    config = {"model_id": "tiny", "embedding_model_id": "e5", "engine": ENGINE, "tags": ["x"]}
    with VLLMService(config) as svc:
        models = svc.process({"task": "show_models"})
    assert sorted((m["model_id"], m["tags"]) for m in models) == [("e5", ["x"]), ("tiny", ["x"])]


def test_n_samples_are_the_generations_of_their_input(svc: VLLMService) -> None:
    """``n`` (it had been refused: "send a batch instead") reaches vLLM's SamplingParams,
    and each of its outputs is a generation of the input's entry; the usage counts them."""
    (entry,) = _generate(svc, "one two three four", max_tokens=2, n=3)
    texts = [g["text"] for g in entry["generations"]]
    assert texts == ["one two", "one two #1", "one two #2"]
    assert entry["usage"]["output_tokens"] == 6
    (single,) = _generate(svc, "one two three four", max_tokens=2)
    assert len(single["generations"]) == 1
