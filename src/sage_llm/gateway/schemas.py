"""Pydantic models of the gateway's request and response bodies.

Request models validate strictly (no ``"1"`` for an integer, no ``1`` for a boolean) and
allow unknown fields, which are passed to the engine unchanged. Response models exist to
document the API (``/openapi.json``); responses are built as plain dicts.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, WithJsonSchema, model_validator

from sage_llm.chat_messages import (
    CONTENT_REQUIRED_ROLES,
    PART_DETAIL,
    TYPELESS_PART_KEYS,
    is_content_part,
    message_problem,
)
from sage_llm.config_fields import INT64_MAX

_REQUEST = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)
_RESPONSE = ConfigDict(extra="allow")


def _list(items: dict[str, Any]) -> dict[str, Any]:
    return {"type": "array", "items": items, "minItems": 1}


_TOKEN_ID: dict[str, Any] = {"type": "integer", "minimum": 0}
_TEXT: dict[str, Any] = {"type": "string", "minLength": 1}

# The published schemas state what the gateway's own checks refuse beyond the types (an
# empty prompt, a negative token id …), so that a client generated from /openapi.json and
# the server agree; the checks themselves, and their messages, stay in the handlers.
Prompt = Annotated[
    str | list[str] | list[int] | list[list[int]],
    WithJsonSchema(
        {
            "anyOf": [_TEXT, _list(_TEXT), _list(_TOKEN_ID), _list(_list(_TOKEN_ID))],
            "description": "Text or token ids, or several prompts (one answer, k·n + i "
            "choices); none empty, token ids >= 0.",
        }
    ),
]
EmbeddingInput = Annotated[
    str | list[str] | list[int] | list[list[int]],
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string"},
                _list({"type": "string"}),
                _list(_TOKEN_ID),
                _list(_list(_TOKEN_ID)),
            ],
            "description": "A string, a non-empty list of strings, a list of token ids, or "
            "a list of token-id lists (token ids >= 0).",
        }
    ),
]
Role = Annotated[
    str,
    WithJsonSchema(
        {
            **_TEXT,
            "description": "system, developer, user, assistant, tool, function, or a custom "
            "role; content may not be null in system, developer, user and tool messages.",
        }
    ),
]


class StreamOptions(BaseModel):
    """``stream_options``: ``include_usage`` adds a final usage chunk to a stream;
    ``continuous_usage_stats`` (vLLM's, with ``include_usage``) the usage so far to every
    chunk, as the engine reports it."""

    model_config = _REQUEST
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


class GenerationFields(BaseModel):
    """Fields shared by completions and chat completions, plus the sage-llm extensions
    ``priority``, ``slo_deadline_ms`` and ``cost_budget`` (never passed to the engine)."""

    model_config = _REQUEST
    model: str = Field(min_length=1, description="Served model name (see GET /v1/models).")
    max_tokens: int | None = Field(
        None, ge=1, le=INT64_MAX, description="Tokens to generate at most."
    )
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = Field(
        None, ge=1, le=INT64_MAX, description="Choices to generate (passed to the engine)."
    )
    stream: bool | None = Field(None, description="Answer with server-sent events.")
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-INT64_MAX - 1, le=INT64_MAX)
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
    cost_budget: float | None = Field(
        None,
        ge=0.0,
        description="sage-llm: the most this request may cost, in the fleet's price unit "
        "(the cost_optimized policy's budget).",
    )


class CompletionRequest(GenerationFields):
    """``POST /v1/completions``."""

    prompt: Prompt
    max_tokens: int | None = Field(
        None,
        ge=0,
        le=INT64_MAX,
        description="Tokens to generate at most; 0 only with echo: true (the prompt alone, "
        "as vLLM answers it).",
    )
    logprobs: int | None = Field(None, ge=0, le=INT64_MAX)
    echo: bool | None = None
    best_of: int | None = Field(None, ge=1, le=INT64_MAX)
    suffix: str | None = None


def _part_form(key: str, schema: JsonValue) -> JsonValue:
    return {"required": [key], "properties": {key: schema}}


_PART_FORMS: list[JsonValue] = [
    _part_form("type", {"type": "string"}),
    *(_part_form(key, {"not": {"type": "null"}}) for key in TYPELESS_PART_KEYS),
]
"""The forms of a content part the gateway takes: a string ``type``, or a type-less
form's field (not null)."""


class ContentPart(BaseModel):
    """One part of a message's ``content`` (``{"type": "text", "text": …}``,
    ``{"type": "image_url", "image_url": …}`` …): an object with a string ``type``, or one of
    vLLM's type-less forms ``{"image_url": …}``, ``{"audio_url": …}``, ``{"video_url": …}``,
    ``{"input_audio": …}``. Its fields pass through."""

    model_config = ConfigDict(
        **_REQUEST,
        json_schema_extra={"anyOf": _PART_FORMS},  # as is_content_part
    )
    type: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _typed(cls, data: Any) -> Any:
        if not is_content_part(data):
            raise ValueError(PART_DETAIL)
        return data


class ChatMessage(BaseModel):
    """One chat message (see :func:`message_problem`); extra fields (``tool_calls``,
    ``tool_call_id`` …) pass through. ``content`` may be left out, and may be null in any
    role but those of :data:`CONTENT_REQUIRED_ROLES` (an assistant message with
    ``tool_calls``, a custom role)."""

    model_config = ConfigDict(
        **_REQUEST,
        json_schema_extra={  # content null only where the check allows it
            "if": {
                "properties": {"role": {"enum": [*sorted(CONTENT_REQUIRED_ROLES)]}},
                "required": ["role"],
            },
            "then": {"properties": {"content": {"not": {"type": "null"}}}},
        },
    )
    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _valid(cls, data: Any) -> Any:
        problem = message_problem(data)
        if problem is not None:
            where, detail = problem
            raise ValueError(f"{where.lstrip('.') or 'message'}: {detail}")
        return data


class ChatCompletionRequest(GenerationFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=INT64_MAX)  # and the engine's --max-logprobs


class EmbeddingRequest(BaseModel):
    """``POST /v1/embeddings``."""

    model_config = _REQUEST
    model: str = Field(min_length=1)
    input: EmbeddingInput
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(None, ge=1, le=INT64_MAX)
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
    models: list[str]
    """The models a request can run for now."""


# --- admin -------------------------------------------------------------------------------


class InstanceSpec(BaseModel):
    """``POST /admin/instances``: ExecutionInstance fields (only the common ones listed;
    any other ExecutionInstance field is accepted too)."""

    model_config = ConfigDict(extra="allow")
    instance_id: str = Field(min_length=1)
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    model_name: str = Field(min_length=1)
    instance_type: str = Field(
        "general", description="general, prefilling, decoding or hybrid (also prefill/decode)."
    )
    engine: str = Field("vllm", description="vllm, sglang, openai or sim.")
    max_concurrent_requests: int = Field(100, ge=1)
    tensor_parallel_size: int = Field(1, ge=1)
    metadata: dict[str, Any] = Field(default_factory=dict)


class DrainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    drain: bool = True


class ReloadRequest(BaseModel):
    """``POST /admin/reload``: no fields (the body may be absent or ``{}``)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class LoadLoraAdapterRequest(BaseModel):
    """``POST /admin/lora_adapters``: a LoRA adapter to load on the instances given, or on
    every instance of ``model`` (by default the only model served)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)
    model: str | None = Field(None, min_length=1)
    instances: list[str] | None = None


class UnloadLoraAdapterRequest(BaseModel):
    """``DELETE /admin/lora_adapters/{name}`` (its body optional): the instances to unload
    it from, by default every one serving it."""

    model_config = ConfigDict(extra="forbid", strict=True)
    instances: list[str] | None = None


class SetPolicyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    policy: str = Field(min_length=1)
    params: dict[str, Any] | None = None


class AdminObject(BaseModel):
    """A JSON object (admin answers; see docs/gateway.md for their fields)."""

    model_config = _RESPONSE
