"""OpenAI-compatible routes: completions, chat completions, embeddings, models, probes.

Request bodies are validated with the models of :mod:`sage_llm.gateway.schemas` (400 with
``param`` naming the offending field) and turned into a
:class:`~sage_llm.types.RequestMetadata`. Fields the gateway does not consume (``n``,
``logprobs``, ``seed``, unknown ones …) reach the engine unchanged through
``RequestMetadata.extra_body``; the sage-llm fields ``priority``, ``slo_deadline_ms`` and
``cost_budget`` do not. Priority, SLO, cost budget, user and session may also come from
the ``x-sage-priority``, ``x-sage-slo-ms``, ``x-sage-cost-budget``, ``x-sage-user`` and
``x-session-id`` headers, which win over the body.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
from collections.abc import Mapping
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from sage_llm import jsonutil
from sage_llm.chat_messages import message_problem
from sage_llm.config_fields import INT64_MAX, as_float, beyond_int64, shown_value
from sage_llm.control_plane.intake import truncation
from sage_llm.control_plane.manager import ControlPlaneManager
from sage_llm.errors import (
    ControlPlaneNotRunningError,
    DeadlineExceededError,
    InvalidRequestError,
    ModelNotFoundError,
    NoHealthyInstanceError,
    PermissionDeniedError,
)
from sage_llm.gateway.auth import bearer_token, is_tenant, tenant_user
from sage_llm.gateway.errors import (
    MODEL_KEY,
    REQUEST_ID_KEY,
    RESPONSE_HEADERS_KEY,
    sage_error_response,
)
from sage_llm.gateway.observe import REQUEST_SETTINGS_KEY, new_request_id
from sage_llm.gateway.relay import (
    Generation,
    complete,
    complete_all,
    fill_generation,
    stream_response,
)
from sage_llm.gateway.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    GenerationFields,
)
from sage_llm.gateway.settings import LiveSettings, ResolvedGateway, live_settings
from sage_llm.request_json import json_object, leave_unread, read_raw
from sage_llm.tokens import chat_prompt_text, count_tokens
from sage_llm.types import ExecutionInstance, RequestMetadata, RequestPriority

log = logging.getLogger("sage_llm.gateway")

M = TypeVar("M", bound=BaseModel)

PRIORITY_HEADER = "x-sage-priority"
SLO_HEADER = "x-sage-slo-ms"
BUDGET_HEADER = "x-sage-cost-budget"
SESSION_HEADER = "x-session-id"
USER_HEADER = "x-sage-user"

CONSUMED_FIELDS = frozenset(
    {"model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature",
     "top_p", "stop", "stream", "stream_options", "priority", "slo_deadline_ms",
     "cost_budget", "kv_transfer_params"}
)  # fmt: skip
"""Body fields the gateway maps onto RequestMetadata (``kv_transfer_params``: refused
unless null); every other field is passed on (``user`` too: the engine gets it as well as
the control plane's session)."""


PART_MARK = "#"
"""Between a request's id and a prompt's index in the ids of a request with several
prompts: not a character of a client's ``x-request-id``, so a client's ``job-1`` is never
prompt 1 of ``job``."""

_USAGE_OPTIONS = frozenset({"include_usage", "continuous_usage_stats"})
"""``stream_options`` fields the gateway answers itself (the engine always reports usage)."""

_TYPE_HINTS = {
    "prompt": "must be a string, a list of token ids, or a list of those (several prompts)",
    "messages": "must be a non-empty list of messages",
    "stop": "must be a string or a list of strings",
    "stream": "must be a boolean",
    "priority": "must be a priority name or an integer (0-4; others are taken as the nearest)",
    "input": "must be a string, a list of strings, a list of token ids or a list of token-id lists",
}


_NOT_EMBEDDING_OPTIONS = frozenset({"model", "input", "priority", "slo_deadline_ms", "cost_budget"})
"""Fields of an embeddings request that do not reach the engine."""


_OBJECT_FIELDS = frozenset({"stream_options"})
"""Request fields that are objects of known fields, which a 400's ``param`` names."""


_BOUND_ERRORS = frozenset({"less_than_equal", "greater_than_equal"})


def _int64_overflow(value: object) -> str | None:
    """What is wrong with ``value`` when it is a whole number no 64-bit integer holds
    (:func:`~sage_llm.config_fields.beyond_int64`)."""
    if not beyond_int64(value):
        return None
    big = value if isinstance(value, float) else as_float(value)  # None: no float holds it
    shown = shown_value(value) if big is None else f"about {big:.3g}"
    return f"is out of range: integers must fit in 64 bits (got {shown})"


def validation_error(exc: ValidationError) -> InvalidRequestError:
    """The 400 error of a failed validation; ``param`` is the top-level field."""
    first = exc.errors()[0]
    loc = tuple(first.get("loc", ()))
    top = str(loc[0]) if loc else None
    # an object field's own field: stream_options.include_usage (other parts of the
    # location name union members or list items, not fields)
    param = top
    if top in _OBJECT_FIELDS and len(loc) > 1 and isinstance(loc[1], str):
        param = f"{top}.{loc[1]}"
    value = first.get("input")
    kind = str(first.get("type", ""))
    if kind == "missing":
        detail = "is required"
    elif (
        (kind.startswith("int_") and isinstance(value, float))
        or (kind in _BOUND_ERRORS and isinstance(value, int))
    ) and (overflow := _int64_overflow(value)):
        # (JSON read one beyond 2**64 as a float: its digits past the 17th are not the
        # client's; one below, as an integer)
        detail = overflow
    elif top in _TYPE_HINTS:
        detail = _TYPE_HINTS[top]
    else:
        where = "".join(f"[{p}]" for p in loc[1:] if isinstance(p, int))
        detail = f"{where} {first.get('msg', 'is invalid')}".strip()
    return InvalidRequestError(f"{param}: {detail}" if param else detail, param=param)


async def read_json(request: web.Request, timeout_s: float | None = None) -> dict[str, Any]:
    """The request body as a JSON object (413 beyond ``client_max_size``, else 400); 408
    when it has not all arrived within ``timeout_s`` (None: no limit)."""
    return json_object(await read_body(request, timeout_s))


async def read_body(request: web.Request, timeout_s: float | None = None) -> bytes:
    """The request body (413 beyond ``client_max_size``); 408 when it has not all arrived
    within ``timeout_s`` (None: no limit)."""
    try:
        async with asyncio.timeout(timeout_s):
            return await read_raw(request)
    except TimeoutError:
        # the connection closes after the 408: what more comes of the body is ignored
        leave_unread(request)
        raise web.HTTPRequestTimeout(
            text=f"the request body did not arrive within {timeout_s:g} s"
        ) from None


def validate(cls: type[M], body: Mapping[str, Any]) -> M:
    try:
        return cls.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc) from None


def validate_chat(body: Mapping[str, Any]) -> ChatCompletionRequest:
    """``body`` as a :class:`ChatCompletionRequest`; a bad message is named precisely
    (``param`` ``messages[1].role``, ``messages[0].content[2]`` …)."""
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        loc = exc.errors()[0].get("loc", ())
        if len(loc) > 1 and loc[0] == "messages" and type(messages := body["messages"]) is list:
            for index, message in enumerate(messages):
                problem = message_problem(message)
                if problem is not None:
                    param = f"messages[{index}]{problem[0]}"
                    raise InvalidRequestError(f"{param}: {problem[1]}", param=param) from None
        raise validation_error(exc) from None


def _priority(value: object, param: str) -> RequestPriority:
    """A priority by name or number; an integer outside 0-4 is taken as the nearest end
    (vLLM's ``priority`` is any integer, lower sooner: the same order)."""
    given = value
    if isinstance(value, str):
        text = value.strip(" \t")  # (an HTTP header's white space: not U+00A0, U+3000 …)
        if not text.isascii() or text != text.strip():  # not "²", "１", "2\u00a0" nor "7\n"
            raise _not_a_priority(given, param)
        if text.removeprefix("-").isdigit():
            digits = text.removeprefix("-").lstrip("0") or "0"  # (int() reads 4,300 at most)
            if len(digits) > 19:  # past 64 bits
                raise InvalidRequestError(
                    f"{param}: is out of range: integers must fit in 64 bits (got integer "
                    f"of {len(digits)} digits)",
                    param=param,
                )
            value = int(digits) * (-1 if text.startswith("-") else 1)
    if overflow := _int64_overflow(value):  # as any integer field's: not the nearest end
        raise InvalidRequestError(f"{param}: {overflow}", param=param)
    if isinstance(value, int) and not isinstance(value, bool):
        value = min(max(value, 0), len(RequestPriority) - 1)
    try:
        return RequestPriority.parse(value)  # type: ignore[arg-type]
    except (ValueError, TypeError):
        raise _not_a_priority(given, param) from None


def _not_a_priority(given: object, param: str) -> InvalidRequestError:
    """The 400 for ``given``, which names no priority."""
    names = ", ".join(p.name.lower() for p in RequestPriority)
    return InvalidRequestError(
        f"{param}: invalid priority {given!r}; use one of {names}, or an integer "
        "(0-4; others are taken as the nearest)",
        param=param,
    )


_HEADER_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
"""A number as a header gives it: ASCII digits, as JSON writes them (not ``float()``'s
``1_000`` or ``١``)."""


def _header_number(value: str) -> float:
    text = value.strip(" \t")  # (an HTTP header's white space: not U+00A0, U+3000 …)
    return float(text) if _HEADER_NUMBER.fullmatch(text) else math.nan


def _slo_header(value: str) -> float:
    slo = _header_number(value)
    if not math.isfinite(slo) or slo <= 0:
        raise InvalidRequestError(
            f"{SLO_HEADER} must be a positive number of milliseconds", param=SLO_HEADER
        )
    return slo


def _budget_header(value: str) -> float:
    budget = _header_number(value)
    if not math.isfinite(budget) or budget < 0:
        raise InvalidRequestError(
            f"{BUDGET_HEADER} must be a number >= 0 (the fleet's price unit)", param=BUDGET_HEADER
        )
    return budget


def _single_prompt(prompt: Any) -> str | list[int]:
    if not prompt:  # "", [], or [""]'s element
        raise InvalidRequestError("prompt: must not be empty", param="prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt[0], str | list):
        if len(prompt) != 1:
            raise InvalidRequestError(
                "prompt: several prompts must all be strings or all token-id lists",
                param="prompt",
            )
        return _single_prompt(prompt[0])
    if any(t < 0 for t in prompt):
        raise InvalidRequestError("prompt: token ids must be >= 0", param="prompt")
    return list(prompt)


_PLAIN_COMPLETION = frozenset(
    {"model", "prompt", "max_tokens", "temperature", "top_p", "stream", "user"}
)
_PLAIN_CHAT = frozenset(
    {"model", "messages", "max_tokens", "temperature", "top_p", "stream", "user"}
)
_DECLARED_COMPLETION = frozenset(CompletionRequest.model_fields)
_DECLARED_CHAT = frozenset(ChatCompletionRequest.model_fields)


def _plain_number(value: object, low: float, high: float, *, low_open: bool = False) -> bool:
    """``value`` is None or a finite int/float within [low, high] ((low, high] when
    ``low_open``), as the strict schema takes it."""
    if value is None:
        return True
    if type(value) is not float and type(value) is not int:
        return False
    return (low < value if low_open else low <= value) and value <= high  # NaN fails both


def _plain_body(
    body: Mapping[str, Any], chat: bool
) -> tuple[str, Any, int | None, float | None, float | None, bool, str | None] | None:
    """The fields of a body in the common plain shape, checked here as the schema would
    (the same values it accepts); None for any other body, which the schema then
    validates (every error message comes from there).

    Plain: besides fields the schema does not declare (passed through unchanged), only
    ``model``, ``prompt`` (a string; completions) or ``messages`` (a non-empty list of valid
    messages, :func:`~sage_llm.chat_messages.message_problem`; chat), ``max_tokens``,
    ``temperature``, ``top_p``, ``stream`` and ``user``, with plain JSON types. Returns
    (model, prompt or messages, max_tokens, temperature, top_p, stream, user)."""
    plain = _PLAIN_CHAT if chat else _PLAIN_COMPLETION
    declared = _DECLARED_CHAT if chat else _DECLARED_COMPLETION
    for key in body:
        if key in declared and key not in plain:
            return None
    get = body.get
    model = get("model")
    if type(model) is not str or not model:
        return None
    if chat:
        text = get("messages")
        if type(text) is not list or not text:
            return None
        for message in text:
            if message_problem(message) is not None:
                return None
    else:
        text = get("prompt")
        if type(text) is not str or not text:  # an empty one: the schema path says why
            return None
    max_tokens = get("max_tokens")
    if max_tokens is not None and (type(max_tokens) is not int or not 1 <= max_tokens <= INT64_MAX):
        return None
    temperature, top_p = get("temperature"), get("top_p")
    if not _plain_number(temperature, 0.0, 2.0) or not _plain_number(
        top_p, 0.0, 1.0, low_open=True
    ):
        return None
    stream, user = get("stream"), get("user")
    if (stream is not None and type(stream) is not bool) or (
        user is not None and type(user) is not str
    ):
        return None
    return model, text, max_tokens, temperature, top_p, bool(stream), user


def parse_generation(
    body: Mapping[str, Any],
    headers: Mapping[str, str],
    request_id: str,
    *,
    chat: bool,
    settings: ResolvedGateway,
) -> Generation:
    """Validate a completions (``chat=False``) or chat body; build its Generation."""
    prompt: str | list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    max_tokens: int | None
    max_tokens_param = "max_tokens"
    stop: str | list[str] | None = None
    priority_field: int | str | None = None
    slo_ms: float | None = None
    budget: float | None = None
    include_usage = continuous = False
    plain = _plain_body(body, chat)
    if plain is not None:  # the common shape, checked without the schema's machinery
        model, text, max_tokens, temperature, top_p, stream, user = plain
        if chat:
            messages = list(text)
        else:
            prompt = text
    else:
        fields: GenerationFields
        if chat:
            chat_req = validate_chat(body)
            fields, messages = chat_req, list(body["messages"])
            # max_completion_tokens, the newer name, wins (as in vLLM and OpenAI); the engine
            # gets the one that counts as max_tokens, which the control plane accounts
            max_tokens = chat_req.max_tokens
            if chat_req.max_completion_tokens is not None:
                max_tokens = chat_req.max_completion_tokens
                max_tokens_param = "max_completion_tokens"
        else:
            comp_req = validate(CompletionRequest, body)
            fields, prompt = comp_req, _single_prompt(comp_req.prompt)
            max_tokens = comp_req.max_tokens
            if max_tokens == 0 and not comp_req.echo:  # vLLM's: the prompt alone, echoed
                raise InvalidRequestError(
                    "max_tokens: must be at least 1 (0 only with echo: true)", param="max_tokens"
                )
        model, temperature, top_p = fields.model, fields.temperature, fields.top_p
        stream, stop, user = bool(fields.stream), fields.stop, fields.user
        priority_field, slo_ms = fields.priority, fields.slo_deadline_ms
        budget = fields.cost_budget
        options = fields.stream_options
        if body.get("stream_options") and not stream:  # as OpenAI and vLLM refuse it ({} not)
            raise InvalidRequestError(
                "stream_options: only allowed when stream is true", param="stream_options"
            )
        include_usage = bool(stream and options is not None and options.include_usage)
        continuous = include_usage and bool(options and options.continuous_usage_stats)
    if body.get("kv_transfer_params") is not None:  # the PD legs' own (docs/pd.md)
        raise InvalidRequestError(
            "kv_transfer_params: the control plane sets it for its PD legs; a client does not",
            param="kv_transfer_params",
        )
    if stream and body.get("prompt_logprobs") is not None:  # as vLLM refuses it
        raise InvalidRequestError(
            "`prompt_logprobs` are not available when `stream=True`.", param="prompt_logprobs"
        )
    prompt_param = "messages" if chat else "prompt"
    limit = settings.max_tokens_limit
    if max_tokens is not None and limit is not None and max_tokens > limit:
        raise InvalidRequestError(
            f"{max_tokens_param}: {max_tokens} is above this gateway's limit of {limit}",
            param=max_tokens_param,
        )
    prompt_limit = settings.max_prompt_tokens
    if prompt_limit is not None:
        text = prompt if messages is None else chat_prompt_text(messages)
        # a token is at least one character (or one id): a prompt no longer than the
        # limit is within it without being counted; an engine that keeps at most the
        # limit's tokens of it (truncate_prompt_tokens) runs it within the limit too
        if (
            len(text or ()) > prompt_limit
            and not ((keep := truncation(body)) is not None and keep <= prompt_limit)
            and (prompt_tokens := count_tokens(text)) > prompt_limit
        ):
            raise InvalidRequestError(
                f"{prompt_param}: the prompt has about {prompt_tokens} tokens by this "
                f"gateway's estimate (gateway.max_prompt_tokens: {prompt_limit})",
                param=prompt_param,
            )
    priority = RequestPriority.NORMAL
    if priority_field is not None:  # checked whether a header overrides it or not
        priority = _priority(priority_field, "priority")
    if (given := headers.get(PRIORITY_HEADER)) is not None:  # present, even empty: read
        priority = _priority(given, PRIORITY_HEADER)
    if (given := headers.get(SLO_HEADER)) is not None:
        slo_ms = _slo_header(given)
    if (given := headers.get(BUDGET_HEADER)) is not None:
        budget = _budget_header(given)
    # OpenAI takes an empty user: no user, no session; a proxy's header wins over the body,
    # and a tenant's key over both (but not as the session: a tenant's requests are not
    # one conversation, to be kept on one instance)
    by_header = headers.get(USER_HEADER, "").strip()
    named = by_header or user or None
    user, tenant = named, None
    if settings.tenant_keys:
        tenant = tenant_user(bearer_token(headers.get("authorization")), settings.tenant_keys)
        user = tenant or named
        if tenant is None and named is not None and is_tenant(named, settings.tenant_keys):
            # a tenant's user is its key's alone: no other key spends its share or quota
            raise PermissionDeniedError(
                f"user {named!r} is a tenant's: its requests must carry that tenant's API key",
                param=USER_HEADER if by_header else "user",
            )
    session = headers.get(SESSION_HEADER, "").strip() or named
    extra_body = {k: v for k, v in body.items() if k not in CONSUMED_FIELDS}
    if stream and (given := body.get("stream_options")):  # its other fields go on unchanged
        passed = {k: v for k, v in given.items() if k not in _USAGE_OPTIONS}
        if continuous:  # the engine puts the usage so far in every chunk; it reaches the client
            passed["continuous_usage_stats"] = True
        if passed:
            extra_body["stream_options"] = passed
    meta = RequestMetadata(
        request_id=request_id,
        prompt=prompt,
        messages=messages,
        model_name=model,
        max_tokens=max_tokens,
        temperature=temperature,  # None: the engine's default
        top_p=top_p,
        stop=[stop] if isinstance(stop, str) else stop,
        priority=priority,
        slo_deadline_ms=slo_ms,
        cost_budget=budget,
        user_id=user,
        session_id=session,
        session_from_user=tenant is None,
        stream=stream,
        extra_body=extra_body,
        tags={"source": "gateway"},
        # no max_tokens: the engine's default, as vLLM's own server would apply it (16 for
        # a completion; a chat runs to its end, within the engine's context length)
        engine_max_tokens=True,
    )
    timeout = settings.request_timeout_s
    if slo_ms is not None:
        timeout = slo_ms / 1000.0 if timeout is None else min(timeout, slo_ms / 1000.0)
    return fill_generation(meta, chat, model, stream, include_usage, timeout, max_tokens_param)


def several_prompts(body: Mapping[str, Any], chat: bool) -> list[Any] | None:
    """The prompts of a completions request that gives several (a list of strings, or of
    token-id lists, with more than one), as vLLM takes them; None for one prompt."""
    prompt = None if chat else body.get("prompt")
    if type(prompt) is not list or len(prompt) < 2:
        return None
    if all(isinstance(p, str) for p in prompt) or all(isinstance(p, list) for p in prompt):
        return prompt
    return None  # a list of token ids (one prompt), or a mix the schema refuses


def parse_generations(
    body: Mapping[str, Any],
    headers: Mapping[str, str],
    request_id: str,
    *,
    chat: bool,
    settings: ResolvedGateway,
) -> list[Generation]:
    """:func:`parse_generation`, or, for a completions request with several prompts, one
    Generation per prompt (request ids ``<id>#0``, ``<id>#1``, …: ``#`` is in no client's
    id, so no other request's id is one of them), each validated as a
    request of its own; they are answered as one (:func:`~sage_llm.gateway.relay.complete_all`,
    :func:`~sage_llm.gateway.relay.relay_stream` over
    :func:`~sage_llm.gateway.relay.merged_batches`)."""
    prompts = None if type(body.get("prompt")) is not list else several_prompts(body, chat)
    if prompts is None:
        return [parse_generation(body, headers, request_id, chat=chat, settings=settings)]
    return [
        parse_generation(
            {**body, "prompt": prompt},
            headers,
            f"{request_id}{PART_MARK}{k}",
            chat=chat,
            settings=settings,
        )
        for k, prompt in enumerate(prompts)
    ]


def log_prompt(gen: Generation, settings: ResolvedGateway) -> None:
    """Log the prompt of ``gen`` (first 4000 characters) when ``log_prompts`` is on."""
    if settings.log_prompts:
        shown = gen.meta.messages if gen.chat else gen.meta.prompt
        log.info(
            "request %s prompt: %s", gen.request_id, json.dumps(shown)[:4000],
            extra={"request_id": gen.request_id},
        )  # fmt: skip


def request_id_of(request: web.Request) -> str:
    """The id the outer middleware gave the request (a fresh one without it)."""
    rid = request.get(REQUEST_ID_KEY)
    return rid if rid else new_request_id()


class OpenAIRoutes:
    """Handlers of the OpenAI-compatible and probe routes, bound to one manager."""

    def __init__(
        self, manager: ControlPlaneManager, settings: ResolvedGateway | LiveSettings
    ) -> None:
        self.manager = manager
        self.live = live_settings(settings)
        self.created = int(time.time())

    def _settings(self, request: web.Request) -> ResolvedGateway:
        """The settings ``request`` was authorized by (the live ones without the gateway's
        middleware)."""
        return request.get(REQUEST_SETTINGS_KEY) or self.live.current

    # -- generation ----------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        settings = self._settings(request)
        body = await read_json(request, settings.read_timeout_s)
        if isinstance(body.get("model"), str):
            request[MODEL_KEY] = body["model"]
        rid = request_id_of(request)
        gens = parse_generations(body, request.headers, rid, chat=chat, settings=settings)
        for gen in gens:
            log_prompt(gen, settings)
        created = int(time.time())
        if gens[0].stream:
            headers = {"X-Request-Id": rid, **request.get(RESPONSE_HEADERS_KEY, {})}
            return await stream_response(request, self.manager, gens, created, headers, rid)
        if len(gens) == 1:
            body_out = await complete(self.manager, gens[0], created)
        else:
            body_out = await complete_all(self.manager, gens, created, rid)
        answer = jsonutil.dumps(body_out)
        return web.Response(body=answer, content_type="application/json")

    async def embeddings(self, request: web.Request) -> web.Response:
        settings = self._settings(request)
        body = await read_json(request, settings.read_timeout_s)
        if "input" not in body and "messages" in body:  # vLLM's chat form: said, not "required"
            raise InvalidRequestError(
                "messages: chat-form embeddings are not supported: send the rendered text as input",
                param="messages",
            )
        req = validate(EmbeddingRequest, body)
        request[MODEL_KEY] = req.model
        raw = req.input
        if isinstance(raw, str) or (raw and all(type(t) is int for t in raw)):
            inputs: Any = [raw]  # one text, or one token-id list
        else:
            inputs = list(raw)
        if not inputs:
            raise InvalidRequestError("input: must not be empty", param="input")
        # sage-llm's own fields are not the engine's (embeddings are not queued or scheduled)
        options = {
            k: v for k, v in body.items() if k not in _NOT_EMBEDDING_OPTIONS and v is not None
        }
        timeout = settings.request_timeout_s
        try:
            async with asyncio.timeout(timeout):
                result = await self.manager.embed(
                    req.model, inputs, options, request_id=request[REQUEST_ID_KEY]
                )
        except TimeoutError:
            raise DeadlineExceededError(f"embeddings did not finish within {timeout:g} s") from None
        out = dict(result)
        out.setdefault("object", "list")
        out.setdefault("model", req.model)
        # valid JSON whatever the engine sent (a NaN in a vector is written null)
        return web.Response(body=jsonutil.dumps(out), content_type="application/json")

    # -- models ----------------------------------------------------------------------------

    def _cards(self) -> dict[str, dict[str, Any]]:
        """A card per model served and per LoRA adapter served (``parent``: its model, as
        vLLM lists an adapter; a name served as a model is that model's card)."""
        cards: dict[str, dict[str, Any]] = {}
        adapters: dict[str, dict[str, Any]] = {}
        instances = self.manager.get_instances()
        for inst in instances:
            self._card_of(cards, inst.model_name, None, inst)
        for inst in instances:
            for name in inst.lora_adapters:
                if name not in cards:
                    self._card_of(adapters, name, inst.model_name, inst)
        cards.update(adapters)
        for card in cards.values():
            length = self.manager.context_length(card["parent"] or card["id"])
            if length is not None:  # as vLLM's card has it (the least of the fleet's)
                card["max_model_len"] = length
            card["permission"] = []
        return cards

    def _card_of(
        self,
        cards: dict[str, dict[str, Any]],
        name: str,
        parent: str | None,
        inst: ExecutionInstance,
    ) -> None:
        card = cards.get(name)
        if card is None:
            card = cards[name] = {
                "id": name,
                "object": "model",
                "created": self.created,
                "owned_by": "sage-llm",
                "root": name,
                "parent": parent,
                "sage": {"instances": [], "healthy_instances": 0},
            }
        elif card["parent"] != parent:  # an adapter's name under two models: the first's
            return
        card["sage"]["instances"].append(inst.instance_id)
        if inst.is_healthy and inst.is_available:
            card["sage"]["healthy_instances"] += 1

    async def models(self, request: web.Request) -> web.Response:
        cards = self._cards()
        return web.json_response({"object": "list", "data": [cards[m] for m in sorted(cards)]})

    async def model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        card = self._cards().get(name)
        if card is None:
            raise ModelNotFoundError(f"no instance serves model {name!r}", param="model")
        return web.json_response(card)

    # -- probes ----------------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        if not self.manager.is_running:
            raise ControlPlaneNotRunningError("the control plane is not running")
        return web.json_response({"status": "ok"})

    async def ready(self, request: web.Request) -> web.Response:
        """Readiness; its 503s are answered, not raised: a load balancer probing an
        outage every second would put a failed request in the log each time."""
        if not self.manager.is_accepting:  # stopped, or draining its requests to stop
            return sage_error_response(
                ControlPlaneNotRunningError("the control plane is not accepting requests")
            )
        healthy = sum(1 for i in self.manager.get_instances() if i.is_healthy and i.is_available)
        if healthy == 0:
            return sage_error_response(
                NoHealthyInstanceError("no healthy instance is accepting requests")
            )
        models = self.manager.servable_models()
        if not models:  # e.g. a PD fleet whose decode instances are all down
            return sage_error_response(
                NoHealthyInstanceError(
                    "no model can run a request: none has an instance, or a prefill/decode "
                    "pair, that is healthy and accepting requests"
                )
            )
        return web.json_response(
            {"status": "ready", "healthy_instances": healthy, "models": models}
        )

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.manager.prometheus_metrics(),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )
