"""Request intake: validate a RequestMetadata and derive what policies and engines need."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence, Set

from sage_llm import tokens
from sage_llm.chat_messages import message_problem
from sage_llm.config_fields import INT64_MAX, shown_value
from sage_llm.control_plane.snapshot import RequestInfo, fill_request_info
from sage_llm.engines.base import EngineRequest, fill_engine_request
from sage_llm.errors import InvalidRequestError, ModelNotFoundError
from sage_llm.jsonutil import whole
from sage_llm.types import ParallelismType, RequestMetadata, RequestPriority

_NO_EXCLUSIONS: frozenset[str] = frozenset()

COMPLETIONS_DEFAULT_MAX_TOKENS = 16
"""The ``max_tokens`` of a completions request that gives none, on vLLM (and OpenAI)."""


def resolve_model(meta: RequestMetadata, models: Set[str], adapters: Set[str] = frozenset()) -> str:
    """The model a request is for: its ``model_name``, or the only model served
    (``adapters``: the LoRA adapters served, named in the error for an unknown name)."""
    if meta.model_name:
        if meta.model_name not in models:
            served = ", ".join(sorted(models | adapters)) or "none"
            raise ModelNotFoundError(
                f"no instance serves model {meta.model_name!r} (served: {served})", param="model"
            )
        return meta.model_name
    if len(models) == 1:
        return next(iter(models))
    if not models:
        raise ModelNotFoundError("no instance is registered", param="model")
    raise InvalidRequestError(
        "model_name is required when several models are served", param="model_name"
    )


def _prompt_blocks(
    prompt: str | Sequence[int], block_size: int | None
) -> tuple[int, tuple[int, ...]]:
    """:func:`sage_llm.tokens.prompt_blocks`, or only the count when ``block_size`` is None
    (token ids are read as :func:`~sage_llm.tokens.prompt_blocks` reads them)."""
    if block_size is None:
        n = tokens.count_tokens(prompt) if isinstance(prompt, str) else len(tokens.tokenize(prompt))
        return n, ()
    return tokens.prompt_blocks(prompt, block_size)


def truncation(extra_body: Mapping[str, object]) -> int | None:
    """The tokens an engine keeps of a prompt given ``extra_body``'s
    ``truncate_prompt_tokens`` (vLLM's: the prompt's last k); None when it keeps all, or
    the value is one the engine reads otherwise (``-1``, its context) or refuses."""
    keep = whole(extra_body.get("truncate_prompt_tokens"))
    return keep if keep is not None and keep >= 1 else None


def _real(value: object) -> bool:
    """Whether ``value`` is a number (not a bool, not NaN): what a numeric field takes."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def _shown(value: object) -> str:
    """``value`` as an error message shows it (its type's name too when it is not a
    number)."""
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return text if _real(value) else f"{text} ({type(value).__name__})"


OWN_FIELDS = frozenset(
    {"model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature",
     "top_p", "stop", "stream", "kv_transfer_params", "priority"}
)  # fmt: skip
"""Engine body fields a request sets through its own fields (the control plane schedules on
them, or sets them itself): not taken in ``extra_body``, where they would override them."""

_OWN_FIELD_NAMES: dict[str, str | None] = {
    "model": "model_name", "max_completion_tokens": "max_tokens",
    "stream": None, "kv_transfer_params": None, "priority": "priority",
}  # fmt: skip

MAX_TOKENS_BOUND = INT64_MAX
"""The largest ``max_tokens`` taken (an engine's own context limit refuses far less)."""


def build_request(
    meta: RequestMetadata,
    model: str,
    *,
    now: float,
    stream: bool,
    default_max_tokens: int,
    block_size: int | None,
    previous_instance_id: str | None = None,
    adapter: str | None = None,
) -> tuple[RequestInfo, EngineRequest]:
    """Validate ``meta`` and build the scheduling view and the engine request of it; the
    prompt's block hashes with ``block_size`` tokens a block (None: no hashes, only the
    prompt's length); ``previous_instance_id`` the instance that served its session last;
    ``adapter`` the LoRA adapter of ``model`` it is for (the model the engine is asked
    for; its blocks are its own, as vLLM hashes an adapter's blocks apart)."""
    prompt = meta.prompt
    if meta.messages is not None:
        if not isinstance(meta.messages, list) or not meta.messages:
            raise InvalidRequestError("messages must be a non-empty list", param="messages")
        if prompt is not None:
            raise InvalidRequestError("give a prompt or messages, not both", param="prompt")
        for i, message in enumerate(meta.messages):  # as the gateway and vLLM check them
            if type(message) is not dict and isinstance(message, Mapping):
                message = dict(message)  # a library caller's mapping (an OrderedDict …)
            if (problem := message_problem(message)) is not None:
                where, detail = problem
                raise InvalidRequestError(
                    f"messages[{i}]{where}: {detail}", param=f"messages[{i}]{where}"
                )
        try:
            if not all(isinstance(m, Mapping) for m in meta.messages):
                raise TypeError(meta.messages)
            text = tokens.chat_prompt_text(meta.messages)
        except (TypeError, ValueError, AttributeError, KeyError):
            raise InvalidRequestError(
                "messages must be a list of {'role': ..., 'content': ...} objects",
                param="messages",
            ) from None
        prompt_tokens, hashes = _prompt_blocks(text, block_size)
        source: str | Sequence[int] = text
    elif prompt is not None and (not isinstance(prompt, str) or prompt):
        try:
            if type(prompt) is not str and not isinstance(prompt, (list, tuple)):
                raise TypeError(prompt)
            prompt_tokens, hashes = _prompt_blocks(prompt, block_size)
            source = prompt
        except (TypeError, ValueError):
            raise InvalidRequestError(
                f"prompt must be a string or a list of token ids, got {_shown(prompt)}",
                param="prompt",
            ) from None
        if not prompt_tokens:
            raise InvalidRequestError("prompt must not be empty", param="prompt")
    else:
        raise InvalidRequestError("a prompt or messages is required", param="prompt")
    max_tokens = meta.max_tokens
    send_max_tokens = True
    if max_tokens is None:
        send_max_tokens = not meta.engine_max_tokens
        # the engine's default for a completion is 16 (vLLM's, OpenAI's); for a chat its
        # answer's own length, estimated as the control plane's default
        engine_default = not send_max_tokens and meta.messages is None
        max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS if engine_default else default_max_tokens
    engine_max_tokens = max_tokens
    if (
        type(max_tokens) is int
        and max_tokens == 0
        and meta.messages is None
        and meta.extra_body.get("echo") is True
    ):
        # the prompt alone (vLLM's answer): the engine runs one token and leaves it out
        max_tokens = 1
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise InvalidRequestError(
            "max_tokens must be a positive integer (0 only with echo: true, on a completion)",
            param="max_tokens",
        )
    if max_tokens > MAX_TOKENS_BOUND:  # an estimate's arithmetic must hold it (a float)
        raise InvalidRequestError(
            f"max_tokens must be at most {MAX_TOKENS_BOUND}, got {shown_value(max_tokens)}",
            param="max_tokens",
        )
    temperature, top_p = meta.temperature, meta.top_p  # None: the engine's default
    if temperature is not None and not (_real(temperature) and 0.0 <= temperature <= 2.0):
        raise InvalidRequestError(
            f"temperature must be a number within [0, 2], got {_shown(temperature)}",
            param="temperature",
        )
    if top_p is not None and not (_real(top_p) and 0.0 < top_p <= 1.0):
        raise InvalidRequestError(
            f"top_p must be a number within (0, 1], got {_shown(top_p)}", param="top_p"
        )
    slo_ms = meta.slo_deadline_ms
    if slo_ms is not None and not (_real(slo_ms) and 0 < slo_ms < math.inf):
        raise InvalidRequestError(
            f"slo_deadline_ms must be a positive number, got {_shown(slo_ms)}",
            param="slo_deadline_ms",
        )
    budget = meta.cost_budget
    if budget is not None and not (_real(budget) and 0 <= budget < math.inf):
        raise InvalidRequestError(
            f"cost_budget must be a number >= 0, got {_shown(budget)}", param="cost_budget"
        )
    stop = meta.stop
    if stop:
        if isinstance(stop, str):  # one stop string, as OpenAI's API takes it
            stop = [stop]
        elif not isinstance(stop, (list, tuple)) or not all(isinstance(x, str) for x in stop):
            raise InvalidRequestError(
                f"stop must be a string or a list of strings, got {_shown(stop)}", param="stop"
            )
    if type(meta.tags) is not dict or type(meta.extra_body) is not dict:  # else, dicts
        for name, value in (("tags", meta.tags), ("extra_body", meta.extra_body)):
            if not isinstance(value, Mapping):
                raise InvalidRequestError(f"{name} must be a dict, got {_shown(value)}", param=name)
    if owned := OWN_FIELDS.intersection(meta.extra_body):
        key = min(owned)
        field_name = _OWN_FIELD_NAMES.get(key, key)
        source = "itself" if field_name is None else f"from the request's {field_name}"
        raise InvalidRequestError(
            f"extra_body.{key}: the control plane sets {key} {source}; extra_body is for "
            "the engine fields it does not read",
            param=f"extra_body.{key}",
        )
    if (
        meta.extra_body
        and (keep := truncation(meta.extra_body)) is not None
        and prompt_tokens > keep
    ):
        # the engine keeps the last `keep` tokens: what it runs, and what its cache holds
        kept = tokens.last_tokens(source, keep)
        prompt_tokens, hashes = _prompt_blocks(kept, block_size)
    if hashes and meta.extra_body and type(salt := meta.extra_body.get("cache_salt")) is str:
        hashes = tokens.salted_hashes(hashes, salt)  # vLLM shares no block across salts
    if hashes and adapter is not None:
        hashes = tokens.salted_hashes(hashes, tokens.ADAPTER_SALT + adapter)
    ids: tuple[tuple[str, object], ...] = (
        ("user_id", meta.user_id),
        ("session_id", meta.session_id),
        ("preferred_instance_id", meta.preferred_instance_id),
    )
    for id_name, id_value in ids:
        if id_value is not None and (type(id_value) is not str or not id_value):
            raise InvalidRequestError(
                f"{id_name} must be a non-empty string, got {_shown(id_value)}", param=id_name
            )
    try:
        priority = RequestPriority.parse(meta.priority)
    except ValueError as exc:
        raise InvalidRequestError(str(exc), param="priority") from None
    if type(meta.billing_tier) is not str or not meta.billing_tier:
        raise InvalidRequestError(
            f"billing_tier must be a non-empty string, got {_shown(meta.billing_tier)}",
            param="billing_tier",
        )
    hint = meta.parallelism_hint
    if hint is not None and type(hint) is not ParallelismType:
        try:
            hint = ParallelismType.parse(hint)
        except ValueError as exc:
            raise InvalidRequestError(str(exc), param="parallelism_hint") from None
    if hint is ParallelismType.EXPERT_PARALLEL:
        raise InvalidRequestError(
            "parallelism_hint: no instance declares expert parallelism, so an 'ep' hint "
            "could never be followed; use tp, pp, dp or hybrid",
            param="parallelism_hint",
        )
    # every field in declaration order (make_*: one of each per request, built directly)
    info = fill_request_info(
        meta.request_id,
        model,
        now,  # arrival
        prompt_tokens,
        max_tokens,
        priority,
        None if slo_ms is None else now + slo_ms / 1000.0,  # deadline
        meta.user_id,
        meta.session_id,
        meta.cost_budget,
        hashes,
        meta.preferred_instance_id,
        previous_instance_id,
        _NO_EXCLUSIONS,
        0,  # attempt
        dict(meta.tags),
        hint,
        meta.billing_tier,
        False,  # demoted
        meta.session_from_user,
    )
    engine_req = fill_engine_request(
        meta.request_id,
        model if adapter is None else adapter,
        meta.prompt if meta.messages is None else None,
        meta.messages,
        engine_max_tokens,
        meta.temperature,
        meta.top_p,
        tuple(stop or ()),
        stream,
        dict(meta.extra_body),
        None,  # kv_transfer_params
        int(priority),
        send_max_tokens,
    )
    return info, engine_req
