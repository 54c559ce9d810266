"""Pydantic models of the gateway's request and response bodies.

Request models validate strictly (no ``"1"`` for an integer, no ``1`` for a boolean) and
allow unknown fields, which are passed to the engine unchanged. Response models exist to
document the API (``/openapi.json``); responses are built as plain dicts.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

_REQUEST = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)
_RESPONSE = ConfigDict(extra="allow")

Prompt = str | list[str] | list[int] | list[list[int]]


class StreamOptions(BaseModel):
    """``stream_options``: ``include_usage`` adds a final usage chunk to a stream."""

    model_config = _REQUEST
    include_usage: bool | None = None


class GenerationFields(BaseModel):
    """Fields shared by completions and chat completions, plus the sage-llm extensions
    ``priority`` and ``slo_deadline_ms`` (never passed to the engine)."""

    model_config = _REQUEST
    model: str = Field(min_length=1, description="Served model name (see GET /v1/models).")
    max_tokens: int | None = Field(None, ge=1, description="Tokens to generate at most.")
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = Field(None, ge=1, description="Choices to generate (passed to the engine).")
    stream: bool | None = Field(None, description="Answer with server-sent events.")
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    user: str | None = Field(None, description="End-user id; also the session id.")
    priority: int | str | None = Field(
        None,
        description="sage-llm: critical, high, normal, low, background or 0-4 (0 most urgent).",
    )
    slo_deadline_ms: float | None = Field(
        None, gt=0.0, description="sage-llm: end-to-end latency target in milliseconds."
    )


class CompletionRequest(GenerationFields):
    """``POST /v1/completions``."""

    prompt: Prompt = Field(description="Text, or token ids; one prompt per request.")
    logprobs: int | None = Field(None, ge=0)
    echo: bool | None = None
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None


class ChatMessage(BaseModel):
    """One chat message; extra fields (``tool_calls`` …) pass through."""

    model_config = _REQUEST
    role: str = Field(min_length=1)
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(GenerationFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)


class EmbeddingRequest(BaseModel):
    """``POST /v1/embeddings``."""

    model_config = _REQUEST
    model: str = Field(min_length=1)
    input: str | list[str] = Field(description="A string or a non-empty list of strings.")
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


# --- responses ---------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    model_config = _RESPONSE
    cached_tokens: int


class UsageInfo(BaseModel):
    """Token counts of a request (``cached_tokens``: prompt tokens served from cache)."""

    model_config = _RESPONSE
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionChoice(BaseModel):
    model_config = _RESPONSE
    index: int
    text: str
    logprobs: Any = None
    finish_reason: str | None = None
    stop_reason: Any = None


class CompletionResponse(BaseModel):
    """A whole completion; ``id`` is ``cmpl-<request id>``."""

    model_config = _RESPONSE
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


class AssistantMessage(BaseModel):
    model_config = _RESPONSE
    role: Literal["assistant"]
    content: str | None = None


class ChatChoice(BaseModel):
    model_config = _RESPONSE
    index: int
    message: AssistantMessage
    logprobs: Any = None
    finish_reason: str | None = None
    stop_reason: Any = None


class ChatCompletionResponse(BaseModel):
    """A whole chat completion; ``id`` is ``chatcmpl-<request id>``."""

    model_config = _RESPONSE
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class EmbeddingData(BaseModel):
    model_config = _RESPONSE
    object: str = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingResponse(BaseModel):
    model_config = _RESPONSE
    object: str = "list"
    data: list[EmbeddingData]
    model: str | None = None
    usage: dict[str, Any] | None = None


class ModelSageInfo(BaseModel):
    """sage-llm extension of a model card: the instances serving it."""

    model_config = _RESPONSE
    instances: list[str]
    healthy_instances: int


class ModelCard(BaseModel):
    model_config = _RESPONSE
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str | None = None
    parent: str | None = None
    sage: ModelSageInfo


class ModelList(BaseModel):
    model_config = _RESPONSE
    object: Literal["list"]
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    model_config = _RESPONSE
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    """Every error answer: ``{"error": {"message", "type", "param", "code"}}``."""

    model_config = _RESPONSE
    error: ErrorDetail


class HealthResponse(BaseModel):
    model_config = _RESPONSE
    status: str


class ReadyResponse(BaseModel):
    model_config = _RESPONSE
    status: str
    healthy_instances: int


# --- admin -------------------------------------------------------------------------------


class InstanceSpec(BaseModel):
    """``POST /admin/instances``: ExecutionInstance fields (only the common ones listed;
    any other ExecutionInstance field is accepted too)."""

    model_config = ConfigDict(extra="allow")
    instance_id: str = Field(min_length=1)
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    model_name: str = Field(min_length=1)
    instance_type: str | None = Field(
        None, description="general, prefilling, decoding or hybrid (also prefill/decode)."
    )
    engine: str | None = Field(None, description="vllm, sglang, openai or sim.")
    max_concurrent_requests: int | None = Field(None, ge=1)
    tensor_parallel_size: int | None = Field(None, ge=1)
    metadata: dict[str, Any] | None = None


class DrainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    drain: bool = True


class SetPolicyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    policy: str = Field(min_length=1)
    params: dict[str, Any] | None = None


class AdminObject(BaseModel):
    """A JSON object (admin answers; see docs/gateway.md for their fields)."""

    model_config = _RESPONSE
