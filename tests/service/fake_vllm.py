"""A small stand-in for the parts of vLLM 0.32 that the in-process VLLMService backend
uses, put in ``sys.modules`` by :func:`install` (CI runs without vLLM).

Shaped as vLLM 0.32's are: ``vllm.LLM`` (``generate``, ``chat``, ``embed``, its engine core
client's ``shutdown`` under ``llm_engine.engine_core``), ``vllm.SamplingParams`` (which
checks its arguments as vLLM's does, raising ``VLLMValidationError``), ``vllm.EngineArgs``
(a dataclass whose fields are ``LLM``'s engine arguments), ``vllm.logprobs.Logprob`` and
``vllm.exceptions``. A prompt longer than ``max_model_len`` characters is refused as vLLM
refuses a prompt past the context (``parameter="input_text"``); the answer to a prompt is
its words, one token each.
"""

from __future__ import annotations

import sys
import threading
import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest


class VLLMError(Exception):
    pass


class VLLMClientError(VLLMError):
    pass


class VLLMValidationError(VLLMClientError):
    def __init__(self, message: str, *, parameter: str | None = None, value: Any = None):
        super().__init__(message)
        self.parameter = parameter
        self.value = value

    def __str__(self) -> str:
        base = super().__str__()
        extras = [f"{k}={v}" for k, v in (("parameter", self.parameter), ("value", self.value))
                  if v is not None]  # fmt: skip
        return f"{base} ({', '.join(extras)})" if extras else base


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class EngineArgs:
    model: str = ""
    dtype: str = "auto"
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    enforce_eager: bool = False
    max_num_seqs: int | None = None
    runner: str = "auto"


class SamplingParams:
    def __init__(self, **kwargs: Any) -> None:
        top_k = kwargs.get("top_k", 0)
        if top_k < 0:
            raise VLLMValidationError(f"top_k must be 0 (disable), or at least 1, got {top_k}.")
        min_p = kwargs.get("min_p", 0.0)
        if not 0.0 <= min_p <= 1.0:
            raise VLLMValidationError(f"min_p must be in [0, 1], got {min_p}.")
        self.kwargs = kwargs


@dataclass
class CompletionOutput:
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]


@dataclass
class EmbeddingOutput:
    embedding: list[float]


@dataclass
class EmbeddingRequestOutput:
    outputs: EmbeddingOutput


class EngineCoreClient:
    """``llm.llm_engine.engine_core``: its ``shutdown`` ends the engine's processes."""

    def __init__(self) -> None:
        self.shut_down = False
        self.thread: str | None = None

    def shutdown(self, timeout: float | None = None) -> None:
        self.shut_down = True
        self.thread = threading.current_thread().name


class LLM:
    instances: ClassVar[list[LLM]] = []
    """Every LLM built (the test fixture empties it)."""
    load_started: ClassVar[threading.Event | None] = None
    load_gate: ClassVar[threading.Event | None] = None
    """When set, a load waits for it (a slow model load)."""

    def __init__(self, **kwargs: Any) -> None:
        if LLM.load_started is not None:
            LLM.load_started.set()
        if LLM.load_gate is not None:
            LLM.load_gate.wait()
        args = EngineArgs(**kwargs)  # a raw TypeError for an unknown argument, as vLLM's
        if args.max_model_len is not None and args.max_model_len > 2048:
            raise ValueError(
                f"1 validation error for ModelConfig\n  Value error, User-specified "
                f"max_model_len ({args.max_model_len}) is greater than the derived "
                f"max_model_len (max_position_embeddings=2048)"
            )
        self.kwargs = kwargs
        self.max_model_len = args.max_model_len or 2048
        runner = "pooling" if args.runner == "pooling" else "generate"
        self.model_config = types.SimpleNamespace(runner_type=runner)
        self.llm_engine = types.SimpleNamespace(engine_core=EngineCoreClient())
        self.calls: list[list[Any]] = []
        LLM.instances.append(self)

    @property
    def shut_down(self) -> bool:
        return bool(self.llm_engine.engine_core.shut_down)

    def _check(self, prompts: Sequence[str]) -> None:
        for prompt in prompts:
            if len(prompt) > self.max_model_len:
                raise VLLMValidationError(
                    f"This model's maximum context length is {self.max_model_len} tokens. "
                    f"However, your prompt contains {len(prompt)} characters. Please reduce "
                    "the length of the input prompt.",
                    parameter="input_text",
                    value=len(prompt),
                )

    def _answer(self, prompt: str, params: SamplingParams) -> RequestOutput:
        kw = params.kwargs
        words = prompt.split()
        wanted = min(int(kw.get("max_tokens", 16)), len(words))
        ids = [100 + i for i in range(wanted)]
        pieces = [f" {w}" if i else w for i, w in enumerate(words[:wanted])]
        logprobs = None
        if kw.get("logprobs") is not None:
            logprobs = []
            for i, (tid, piece) in enumerate(zip(ids, pieces, strict=True)):
                # the sampled token first (rank 2 here), then the top ``logprobs`` ranks
                step = {tid: Logprob(-1.5 - i, 2, piece)}
                for rank in range(1, int(kw["logprobs"]) + 1):
                    step[900 + rank] = Logprob(-1.0 * rank, rank, f"<{rank}>")
                logprobs.append(step)
        finish = "length" if wanted < len(words) else "stop"
        samples = [  # n: sample i's text marked with i after the first (vLLM's differ)
            CompletionOutput("".join(pieces) + (f" #{i}" if i else ""), ids, logprobs, finish)
            for i in range(int(kw.get("n", 1)))
        ]
        return RequestOutput(list(range(len(words))), samples)

    def generate(
        self, prompts: Sequence[str], params: Sequence[SamplingParams], *, use_tqdm: bool = True
    ) -> list[RequestOutput]:
        self.calls.append(list(prompts))
        if self.model_config.runner_type != "generate":
            raise ValueError("LLM.generate() is only supported for generative models.")
        self._check(prompts)
        return [self._answer(p, s) for p, s in zip(prompts, params, strict=True)]

    def chat(
        self,
        conversations: Sequence[list[dict[str, Any]]],
        params: Sequence[SamplingParams],
        *,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        texts = [" ".join(str(m["content"]) for m in c) for c in conversations]
        self.calls.append(list(conversations))
        self._check(texts)
        return [self._answer(t, s) for t, s in zip(texts, params, strict=True)]

    def embed(self, texts: Sequence[str], *, use_tqdm: bool = True) -> list[Any]:
        if self.model_config.runner_type != "pooling":
            raise ValueError(
                "LLM.encode() is only supported for pooling models. Try passing "
                "`--runner pooling` to use the model as a pooling model."
            )
        self._check(texts)
        return [EmbeddingRequestOutput(EmbeddingOutput([float(len(t)), 1.0])) for t in texts]


@dataclass
class Fake:
    """The installed fake: its module and the LLMs built."""

    module: types.ModuleType
    llms: list[LLM] = field(default_factory=lambda: LLM.instances)


def install(monkeypatch: pytest.MonkeyPatch) -> Fake:
    """Put the fake ``vllm`` (and its submodules) in ``sys.modules``."""
    LLM.instances = []
    LLM.load_gate = LLM.load_started = None
    vllm = types.ModuleType("vllm")
    exceptions = types.ModuleType("vllm.exceptions")
    logprobs = types.ModuleType("vllm.logprobs")
    members: dict[types.ModuleType, dict[str, object]] = {
        exceptions: {"VLLMError": VLLMError, "VLLMClientError": VLLMClientError,
                     "VLLMValidationError": VLLMValidationError},
        logprobs: {"Logprob": Logprob},
        vllm: {"LLM": LLM, "SamplingParams": SamplingParams, "EngineArgs": EngineArgs},
    }  # fmt: skip
    for module, names in members.items():
        for name, value in names.items():
            setattr(module, name, value)
    vllm.exceptions = exceptions  # type: ignore[attr-defined]
    vllm.logprobs = logprobs  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.exceptions", exceptions)
    monkeypatch.setitem(sys.modules, "vllm.logprobs", logprobs)
    return Fake(vllm)
