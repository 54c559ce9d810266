"""Service payloads: ``{"task", "inputs", "options"}`` in, VLLMService-shaped results out.

``generate`` inputs are a prompt string, a chat message list (``[{"role", "content"}, …]``)
or a batch (a list) of either; a batch item may also be a request dict
``{"prompt" | "messages": …, "options": {…}}`` whose options override the call's for that
item (so one batch can mix priorities). Each parsed input becomes one
:class:`~sage_llm.types.RequestMetadata`; each result becomes one entry of the existing
VLLMService result list::

    {"generations": [{"text", "token_ids", "logprobs", "finish_reason"}],
     "usage": {"input_tokens", "output_tokens"}, "request_id"}

Requests and results are in :mod:`sage_llm.service.results`. Every malformed payload
raises :class:`~sage_llm.errors.InvalidRequestError` whose
``param`` names the offending part (``task``, ``inputs[2]``, ``options.priority`` …).
"""

from __future__ import annotations

import difflib
import json
import math
import numbers
import operator
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sage_llm.errors import InvalidRequestError, SageLLMError
from sage_llm.types import RequestPriority

T = TypeVar("T")

__all__ = [
    "GENERATE_OPTIONS",
    "PASSTHROUGH_OPTIONS",
    "GenerateOptions",
    "Payload",
    "PromptInput",
    "RequestDefaults",
    "locate_error",
    "parse_generate",
    "parse_options",
    "parse_payload",
    "reject_unknown",
    "request_ids",
    "suggest",
]

PASSTHROUGH_OPTIONS = frozenset(
    {
        "presence_penalty", "frequency_penalty", "repetition_penalty", "top_k", "min_p",
        "min_tokens", "seed", "ignore_eos", "n", "skip_special_tokens",
        "include_stop_str_in_output",
    }
)  # fmt: skip
"""Sampling options sent to the engine unchanged (vLLM ``SamplingParams`` names)."""

GENERATE_OPTIONS = frozenset(
    {
        "priority", "slo_deadline_ms", "max_tokens", "temperature", "top_p", "stop",
        "timeout", "user_id", "session_id", "request_id", "model", "model_name", "logprobs",
        "tags", "cost_budget", "preferred_instance_id",
    }
) | PASSTHROUGH_OPTIONS  # fmt: skip
"""Every option ``generate`` accepts."""

_PAYLOAD_KEYS = ("task", "inputs", "options")


@dataclass(frozen=True)
class Payload:
    """A parsed payload: the task, its raw inputs and its options (top-level option keys,
    the seed's style, merged in)."""

    task: str
    inputs: Any
    options: Mapping[str, Any]


@dataclass(frozen=True)
class RequestDefaults:
    """Values a service fills in when a request leaves them out (None: the engine's or the
    control plane's own default)."""

    priority: RequestPriority = RequestPriority.NORMAL
    slo_deadline_ms: float | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    timeout_s: float | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class GenerateOptions:
    """The options of one generation request, validated."""

    priority: RequestPriority = RequestPriority.NORMAL
    slo_deadline_ms: float | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    timeout_s: float | None = None
    user_id: str | None = None
    session_id: str | None = None
    request_id: str | None = None
    model: str | None = None
    logprobs: int | None = None
    """Top log-probabilities to return per token; None when not asked for."""
    tags: Mapping[str, Any] = field(default_factory=dict)
    cost_budget: float | None = None
    preferred_instance_id: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PromptInput:
    """One input of a ``generate`` call: a prompt or a chat, with its own options."""

    prompt: str | None
    messages: list[dict[str, Any]] | None
    options: GenerateOptions


def request_ids(items: Sequence[PromptInput]) -> list[str]:
    """Each input's ``request_id`` option, else a fresh id. An id several inputs share (one
    given for the whole batch) gets ``-<index>`` appended, and more (``-<index>-<k>``) when
    that is another input's own id: every id of a batch is its own."""
    ids = [i.options.request_id or uuid.uuid4().hex for i in items]
    counts = Counter(ids)
    taken = set(ids)
    out: list[str] = []
    for index, rid in enumerate(ids):
        if counts[rid] > 1:
            unique, k = f"{rid}-{index}", 0
            while unique in taken:
                k += 1
                unique = f"{rid}-{index}-{k}"
            taken.add(unique)
            rid = unique
        out.append(rid)
    return out


_PAYLOAD_PARAMS = ("inputs", "options", "payload", "task")
_INPUT_PARAMS = frozenset({"prompt", "messages", "input", "input_text", "prompt_token_ids"})
"""Request fields a payload gives as its input, not as an option (vLLM names a prompt past
the context ``input_text``)."""
_OPTION_NAMES = {"model_name": "model"}
"""Request fields whose option has another name."""


def locate_error(exc: SageLLMError, where: str | None) -> None:
    """Name in ``exc`` the payload's part the engine or control plane refused: its
    ``param`` (a request field, ``temperature``) as the option it came from
    (``options.temperature``), and, in a batch, the input (``where``: ``inputs[2]``), in
    ``param`` and in the message (which is all SAGE's ``call_service`` passes on)."""
    param = exc.param
    if param is not None and (param == "body" or param.startswith("body.")):
        param = param.removeprefix("body").removeprefix(".") or None  # vLLM's pydantic loc
        exc.param = param
    if param in _OPTION_NAMES:
        exc.reword(exc.message.replace(param, _OPTION_NAMES[param], 1))
        param = _OPTION_NAMES[param]
    if param in _INPUT_PARAMS or (param or "").startswith("messages[") or (where and not param):
        exc.param = where or "inputs"
    elif param and not param.startswith(_PAYLOAD_PARAMS):
        exc.param = f"{where}.options.{param}" if where else f"options.{param}"
    if where:
        exc.reword(f"{where}: {exc.message}")


async def located(work: Callable[[], Awaitable[T]], *, gave_model: bool = True) -> T:
    """``work()``'s result; its error, naming the payload's part (:func:`locate_error`). An
    error about the ``model`` names none when the payload gave no model (``gave_model``
    false: the service chose it, and ``options.model`` was never sent). ``work`` is called
    when this runs: closed unrun (a service not set up), it leaves no coroutine unawaited."""
    try:
        return await work()
    except SageLLMError as exc:
        if not gave_model and exc.param in ("model", *_OPTION_NAMES):
            exc.param = None
        locate_error(exc, None)
        raise


# -- payload -------------------------------------------------------------------------------


def parse_payload(payload: object, tasks: Mapping[str, Collection[str]]) -> Payload:
    """Check the payload's shape and task (default ``generate``, as SAGE's VLLMService):
    ``tasks`` maps each task to the options it takes, which may also be given at the top
    level of the payload (the seed's style)."""
    if not isinstance(payload, Mapping):
        raise InvalidRequestError(
            f"payload must be a dict with task, inputs and options, got {type(payload).__name__}",
            param="payload",
        )
    task = payload.get("task", "generate")
    if not isinstance(task, str) or task not in tasks:
        raise InvalidRequestError(
            f"unknown task {task!r}{suggest(str(task), tasks)}; "
            f"supported tasks: {', '.join(sorted(tasks))}",
            param="task",
        )
    options = payload.get("options")
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise InvalidRequestError(
            f"options must be a dict, got {type(options).__name__}", param="options"
        )
    merged = dict(options)
    option_keys = tasks[task]
    for key, value in payload.items():
        if key in _PAYLOAD_KEYS:
            continue
        if key not in option_keys:
            raise InvalidRequestError(
                f"unknown payload key {key!r}{suggest(str(key), [*_PAYLOAD_KEYS, *option_keys])}",
                param=str(key),
            )
        if key in merged and merged[key] != value:
            raise InvalidRequestError(
                f"{key!r} is given both in the payload and in its options, with different values",
                param=str(key),
            )
        merged[key] = value
    return Payload(task, payload.get("inputs"), merged)


def reject_unknown(options: Mapping[str, Any], allowed: Collection[str], where: str) -> None:
    """Raise for the first key of ``options`` not in ``allowed``."""
    for key in options:
        if key not in allowed:
            raise InvalidRequestError(
                f"unknown option {key!r}{suggest(str(key), allowed)}", param=f"{where}.{key}"
            )


def suggest(word: str, choices: Collection[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# -- generate inputs -----------------------------------------------------------------------


def parse_generate(
    inputs: object, options: Mapping[str, Any], defaults: RequestDefaults
) -> list[PromptInput]:
    """One :class:`PromptInput` per input; a single prompt or chat gives a list of one."""
    if inputs is None:
        raise InvalidRequestError("generate needs inputs (a prompt, a chat or a batch)",
                                  param="inputs")  # fmt: skip
    if isinstance(inputs, str | Mapping) or _is_chat(inputs):
        return [_item(inputs, options, defaults, "inputs")]
    if not isinstance(inputs, list):
        raise InvalidRequestError(
            "inputs must be a prompt string, a chat message list or a list of them, "
            f"got {type(inputs).__name__}",
            param="inputs",
        )
    if not inputs:
        raise InvalidRequestError("inputs must not be an empty list", param="inputs")
    return [_batch_item(x, options, defaults, f"inputs[{i}]") for i, x in enumerate(inputs)]


def _batch_item(
    value: object, options: Mapping[str, Any], defaults: RequestDefaults, where: str
) -> PromptInput:
    """:func:`_item` of a batch: a problem of this input names it in its message too (the
    message is all SAGE's ``call_service`` passes on), as an engine's refusal of it does."""
    try:
        return _item(value, options, defaults, where)
    except InvalidRequestError as exc:
        param = exc.param or ""
        if param == where or param.startswith((f"{where}.", f"{where}[")):
            exc.reword(f"{where}: {exc.message}")
        raise


def _is_chat(value: object) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(m, Mapping) and "role" in m for m in value)
    )


def _item(
    value: object, options: Mapping[str, Any], defaults: RequestDefaults, where: str
) -> PromptInput:
    if isinstance(value, str):
        if not value.strip():
            raise InvalidRequestError("a prompt must not be empty", param=where)
        return PromptInput(value, None, parse_options(options, defaults, "options"))
    if isinstance(value, Mapping) and "role" in value:
        messages = _messages([value], where, single=True)
        return PromptInput(None, messages, parse_options(options, defaults, "options"))
    if isinstance(value, Mapping):
        return _request_item(value, options, defaults, where)
    if _is_chat(value):
        assert isinstance(value, list)
        messages = _messages(value, where)
        return PromptInput(None, messages, parse_options(options, defaults, "options"))
    raise InvalidRequestError(
        "each input must be a prompt string, a chat message list, or a dict with "
        f"prompt or messages (and options), got {type(value).__name__}",
        param=where,
    )


def _request_item(
    value: Mapping[str, Any], options: Mapping[str, Any], defaults: RequestDefaults, where: str
) -> PromptInput:
    reject_unknown(value, ("prompt", "messages", "options"), where)
    own = value.get("options") or {}
    if not isinstance(own, Mapping):
        raise InvalidRequestError("options must be a dict", param=f"{where}.options")
    opts = parse_options({**options, **own}, defaults, f"{where}.options")
    if ("prompt" in value) == ("messages" in value):
        raise InvalidRequestError("give exactly one of prompt and messages", param=where)
    if "prompt" in value:
        prompt = value["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidRequestError("prompt must be a non-empty string", param=f"{where}.prompt")
        return PromptInput(prompt, None, opts)
    messages = value["messages"]
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages must be a non-empty list", param=f"{where}.messages")
    return PromptInput(None, _messages(messages, f"{where}.messages"), opts)


def _messages(
    messages: Sequence[object], where: str, *, single: bool = False
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        param = where if single else f"{where}[{i}]"
        if not isinstance(message, Mapping):
            raise InvalidRequestError("a chat message must be a dict", param=param)
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise InvalidRequestError("a chat message needs a role string", param=param)
        content = message.get("content")
        parts = isinstance(content, list) and all(isinstance(c, Mapping) for c in content)
        if (
            not isinstance(content, str)
            and not parts
            and not (content is None and role == "assistant")
        ):
            raise InvalidRequestError(
                "a chat message needs content: a string or a list of content parts (dicts)",
                param=param,
            )
        try:
            json.dumps(message)
        except (TypeError, ValueError):
            raise InvalidRequestError(
                "a chat message must hold only JSON values (strings, numbers, lists, dicts)",
                param=param,
            ) from None
        out.append(dict(message))
    return out


# -- generate options ----------------------------------------------------------------------


def parse_options(raw: Mapping[str, Any], defaults: RequestDefaults, where: str) -> GenerateOptions:
    """Validate generation options, filling in ``defaults``."""
    reject_unknown(raw, GENERATE_OPTIONS, where)

    def param(key: str) -> str:
        return f"{where}.{key}"

    priority = defaults.priority
    if raw.get("priority") is not None:
        try:
            priority = RequestPriority.parse(raw["priority"])
        except ValueError as exc:
            raise InvalidRequestError(str(exc), param=param("priority")) from None
    stop = raw.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (
        not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop)
    ):
        raise InvalidRequestError("stop must be a string or a list of strings", param=param("stop"))
    if "model" in raw and "model_name" in raw:
        raise InvalidRequestError("give model or model_name, not both", param=param("model"))
    logprobs = raw.get("logprobs")
    if isinstance(logprobs, bool):
        logprobs = 1 if logprobs else None
    elif logprobs is not None:
        logprobs = _int(raw, "logprobs", None, where, low=0)
    extra = {  # None: not given, as for every other option (never sent as null)
        **{k: v for k, v in defaults.extra.items() if v is not None},
        **{k: _json_value(raw[k], param(k)) for k in PASSTHROUGH_OPTIONS if raw.get(k) is not None},
    }
    samples = extra.pop("n", None)  # sent only above 1 (the engine's default)
    if samples is not None and (
        isinstance(samples, bool) or not isinstance(samples, int) or samples < 1
    ):
        raise InvalidRequestError("n must be an integer >= 1", param=param("n"))
    if samples is not None and samples > 1:
        extra["n"] = samples  # each sample a generation of the input's entry
    tags = raw.get("tags") or {}
    if not isinstance(tags, Mapping):
        raise InvalidRequestError("tags must be a dict", param=param("tags"))
    return GenerateOptions(
        priority=priority,
        slo_deadline_ms=_number(raw, "slo_deadline_ms", defaults.slo_deadline_ms, where),
        max_tokens=_int(raw, "max_tokens", defaults.max_tokens, where, low=1),
        temperature=_number(raw, "temperature", defaults.temperature, where, low=0.0, zero=True),
        top_p=_number(raw, "top_p", defaults.top_p, where),
        stop=tuple(stop or ()),
        timeout_s=_number(raw, "timeout", defaults.timeout_s, where),
        user_id=_text(raw, "user_id", where),
        session_id=_text(raw, "session_id", where),
        request_id=_text(raw, "request_id", where),
        model=_text(raw, "model", where) or _text(raw, "model_name", where),
        logprobs=logprobs,
        tags=dict(tags),
        cost_budget=_number(raw, "cost_budget", None, where, low=0.0, zero=True),
        preferred_instance_id=_text(raw, "preferred_instance_id", where),
        extra=extra,
    )


def _json_value(value: Any, param: str) -> Any:
    """An option passed to the engine as it is: a number of another library (numpy's
    ``int64``) as Python's, anything else only when it can be sent as JSON."""
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        raise InvalidRequestError(
            f"{param.rsplit('.', 1)[-1]} cannot be sent as JSON ({type(value).__name__})",
            param=param,
        ) from None
    return value


def _number(
    raw: Mapping[str, Any],
    key: str,
    default: float | None,
    where: str,
    *,
    low: float = 0.0,
    zero: bool = False,
) -> float | None:
    value = raw.get(key)
    if value is None:
        return default
    if not isinstance(value, bool | int | float) and isinstance(value, numbers.Real):
        value = float(value)  # numpy's float32, a Fraction …
    bad = isinstance(value, bool) or not isinstance(value, int | float)
    if bad or math.isnan(value) or math.isinf(value) or value < low or (value == 0 and not zero):
        kind = "a non-negative" if zero else "a positive"
        raise InvalidRequestError(f"{key} must be {kind} number", param=f"{where}.{key}")
    return float(value)


def _int(
    raw: Mapping[str, Any], key: str, default: int | None, where: str, *, low: int
) -> int | None:
    value = raw.get(key)
    if value is None:
        return default
    if not isinstance(value, bool | int) and isinstance(value, numbers.Integral):
        value = operator.index(value)  # numpy's int64 …
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidRequestError(f"{key} must be an integer >= {low}", param=f"{where}.{key}")
    return value


def _text(raw: Mapping[str, Any], key: str, where: str) -> str | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise InvalidRequestError(f"{key} must be a non-empty string", param=f"{where}.{key}")
    return value
