"""Parsing the OpenAI request bodies the simulated engine server accepts (vLLM's fields), and
what the server may ask an engine about a finished request (:class:`ReportsStopReason`)."""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from sage_llm import tokens
from sage_llm.chat_messages import message_problem
from sage_llm.engines.base import EngineRequest, Usage
from sage_llm.errors import InvalidRequestError, ModelNotFoundError
from sage_llm.jsonutil import whole
from sage_llm.sim.logprobs import requested_prompt_logprobs

DEFAULT_MAX_TOKENS = 16
"""A completions request's ``max_tokens`` when it gives none (vLLM's, OpenAI's)."""
MAX_STOP_STRINGS = 4
"""The most ``stop`` strings a request may give (vLLM's ``VLLM_MAX_STOP_STRINGS``)."""
DEFAULT_CHAT_TOKENS = 128
"""A chat answer's length when the request caps it with nothing: vLLM lets a chat run to
its end-of-sequence token (or the context's end); the simulated model has none, and ends
its answers here (the control plane's ``default_max_tokens`` estimates them the same)."""


def generation_prompt(fields: Mapping[str, Any]) -> bool:
    """A chat request's ``add_generation_prompt`` (true when not given, as vLLM's chat
    template reads it): whether its prompt ends with the assistant's tag."""
    add = fields.get("add_generation_prompt")
    if add is not None and not isinstance(add, bool):
        raise InvalidRequestError(
            "add_generation_prompt must be a boolean", param="add_generation_prompt"
        )
    go_on = fields.get("continue_final_message")
    if go_on is not None and not isinstance(go_on, bool):
        raise InvalidRequestError(
            "continue_final_message must be a boolean", param="continue_final_message"
        )
    if go_on and add is not False:  # vLLM's refusal (the prompt would end with a new tag)
        raise InvalidRequestError(
            "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
            param="continue_final_message",
        )
    return add is not False


def _prompt_text(req: EngineRequest) -> str | None:
    """``req``'s prompt as text (its chat template's, for a chat); None for a prompt given
    as token ids."""
    if req.messages is not None:
        messages = [dict(m) for m in req.messages]
        return tokens.chat_prompt_text(messages, generation_prompt=generation_prompt(req.extra))
    prompt = req.prompt
    return prompt if isinstance(prompt, str) else None if prompt else ""


def prompt_token_ids(
    req: EngineRequest, learn: Callable[[str], list[int]] | None = None
) -> list[int]:
    """The token ids of ``req``'s prompt (its chat template's, for a chat), by the shared
    tokenizer the simulated engine counts with (not checked: see ``SimEngine``); a text
    prompt through ``learn`` when given (a server that remembers its pieces, to decode
    them again)."""
    text = _prompt_text(req)
    if text is None:
        return tokens.tokenize(req.prompt or [])
    return tokens.tokenize(text) if learn is None else learn(text)


def requested_echo(req: EngineRequest) -> str | None:
    """The prompt text a completion's ``echo`` leads its answer with, or None (no echo, or
    a chat: a chat's echo of its last message is not simulated). Raises
    :class:`InvalidRequestError` for a non-boolean ``echo`` and for a prompt given as token
    ids (the simulated engine has no vocabulary to decode them)."""
    echo = req.extra.get("echo")
    if echo not in (None, True, False):
        raise InvalidRequestError("echo must be a boolean", param="echo")
    if not echo or req.messages is not None:
        return None
    if not isinstance(req.prompt, str):
        raise InvalidRequestError(
            "the simulated engine cannot echo a prompt given as token ids (it has no "
            "vocabulary to decode them)",
            param="echo",
        )
    return req.prompt


def echo_only(req: EngineRequest) -> bool:
    """Whether ``req`` asks for its prompt alone: a completion with ``echo: true`` and
    ``max_tokens: 0``. vLLM answers it with the prompt (and its logprobs when asked for):
    it runs one token, which it leaves out of the text and counts in the usage."""
    return (
        type(req.max_tokens) is int
        and req.max_tokens == 0
        and req.messages is None
        and (req.extra.get("echo") is True)
    )


def prompt_pieces(req: EngineRequest) -> tuple[list[str], list[int]]:
    """The text of each token of ``req``'s prompt (its chat template's, for a chat) and
    its id; a prompt given as token ids has no text (empty pieces: the simulated engine
    has no vocabulary to decode them)."""
    text = _prompt_text(req)
    if text is None:
        ids = tokens.tokenize(req.prompt or [])
        return [""] * len(ids), ids
    pieces = tokens.split(text)
    return pieces, [tokens.token_id(p) for p in pieces]


def engine_default_max_tokens(chat: bool, prompt_tokens: int, max_model_len: int | None) -> int:
    """The simulated engine's answer length for a request that gives no ``max_tokens``:
    :data:`DEFAULT_MAX_TOKENS` for a completion, :data:`DEFAULT_CHAT_TOKENS` for a chat, no
    further than the context allows."""
    if not chat:
        return DEFAULT_MAX_TOKENS
    if max_model_len is None:
        return DEFAULT_CHAT_TOKENS
    return max(1, min(DEFAULT_CHAT_TOKENS, max_model_len - prompt_tokens))


_CONSUMED = frozenset(
    {"model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature",
     "top_p", "stop", "stream", "stream_options", "kv_transfer_params", "priority",
     "truncate_prompt_tokens"}
)  # fmt: skip
"""Body fields :func:`parse_request` applies itself (``truncate_prompt_tokens`` too: the
engine is given the cut prompt, not the field to cut it again). ``n`` is checked here and
carried out by the engine."""


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    """A validated completions / chat request, as the engine will see it."""

    req: EngineRequest
    stream: bool
    include_usage: bool
    pd_role: Literal["prefill", "decode"] | None
    prompt_tokens: int
    continuous_usage: bool = False
    """``stream_options.continuous_usage_stats`` (with ``include_usage``): every chunk of
    the stream carries the usage so far, as vLLM's do."""
    token_ids: bool = False
    """``return_token_ids``: each choice carries its ``token_ids``, and the answer its
    ``prompt_token_ids`` (a completion's in its choice, a chat's in the object), as
    vLLM's do."""

    def estimate_usage(self, chunks: int) -> Usage:
        """Usage for an engine that reported none: one token per chunk."""
        return Usage(self.prompt_tokens, chunks)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def context_max_tokens(
    limit: int,
    prompt_tokens: int,
    max_tokens: int,
    param: str | None = "max_tokens",
    *,
    text: bool = False,
) -> int:
    """``max_tokens`` as vLLM 0.32 runs it under a ``max_model_len`` of ``limit`` tokens:
    cut to what the context holds after the prompt (the answer then ends with finish reason
    ``length``). Refused, in vLLM's words (each one the control plane's
    ``is_context_refusal`` knows, but for a prompt that fills the context exactly): a
    ``max_tokens`` above the context (``param``: the field the client gave it in; None
    when the engine chose it), a prompt longer than the context (``param``
    ``input_tokens``; a ``text`` prompt is counted, as vLLM's tokenizer cuts it, to one
    token past the context at most: "at least"), and one that leaves no room for a token
    (``max_tokens`` 0, an echo of the prompt alone, only then in the words of its engine).
    """
    if param is not None and max_tokens > limit:
        raise InvalidRequestError(
            f"{param}={max_tokens} cannot be greater than max_model_len={limit}. Please "
            f"request fewer output tokens. (parameter={param}, value={max_tokens})",
            param=param,
        )
    if prompt_tokens > limit:
        count = min(prompt_tokens, limit + 1) if text else prompt_tokens
        qualifier = "at least " if count == limit + 1 else ""
        raise InvalidRequestError(
            f"This model's maximum context length is {limit} tokens. However, your prompt "
            f"contains {qualifier}{count} input tokens, which exceeds this limit even "
            "without any output tokens. Please reduce the length of the input prompt. "
            f"(parameter=input_tokens, value={count})",
            param="input_tokens",
        )
    if max_tokens == 0 and prompt_tokens == limit:  # the prompt alone (echo): its engine's
        raise InvalidRequestError(
            f"The decoder prompt (length {prompt_tokens}) plus the number of requested "
            f"output tokens (at least 1) is longer than the maximum model length of "
            f"{limit}. Make sure that `max_model_len` is no smaller than the number of "
            "text tokens (prompt + requested output tokens)."
        )
    cut = min(max_tokens, limit - prompt_tokens)
    if max_tokens > 0 and cut < 1:
        raise InvalidRequestError(
            f"max_tokens must be at least 1, got {cut}. (parameter=max_tokens, value={cut})",
            param="max_tokens",
        )
    return cut


def _number(body: Mapping[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        bounds = f">= {lo}" if hi == math.inf else f"in [{lo}, {hi}]"
        raise InvalidRequestError(f"{key} must be a number {bounds}", param=key)
    return float(value)


def _prompt(body: Mapping[str, Any], chat: bool) -> tuple[Any, Any, int]:
    """(prompt, messages, prompt token count) of a request body."""
    if chat:
        messages = checked_messages(body.get("messages"))
        text = tokens.chat_prompt_text(messages, generation_prompt=generation_prompt(body))
        return None, messages, tokens.count_tokens(text)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one prompt (text or token ids) is that prompt
    if isinstance(prompt, str) and prompt:
        return prompt, None, tokens.count_tokens(prompt)
    if isinstance(prompt, list) and prompt and all(is_int(t) and t >= 0 for t in prompt):
        return list(prompt), None, len(prompt)
    raise InvalidRequestError(
        "prompt must be a non-empty string or list of token ids (one prompt per request)",
        param="prompt",
    )


def checked_messages(messages: Any) -> list[Any]:
    """A request's chat ``messages``, checked as vLLM's request validation checks them (a
    400, ``param`` ``messages``, naming the message and its field)."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages must be a non-empty list", param="messages")
    for index, message in enumerate(messages):
        problem = message_problem(message)
        if problem is not None:
            where, detail = problem
            raise InvalidRequestError(f"messages[{index}]{where}: {detail}", param="messages")
    return messages


def checked_samples(n: Any) -> int:
    """The samples (choices) a request's ``n`` asks for, as vLLM reads it: null is the
    default, 1; a whole number >= 1 (``2.0`` too), else refused in vLLM's words. The HTTP
    server and the in-process engine both read it here."""
    if n is None or n == 1:
        return 1
    count = whole(n)
    if count is None or count < 1:
        raise InvalidRequestError(f"n must be an integer >= 1, got {n!r}", param="n")
    return count


def running_usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """A chunk's usage so far under ``continuous_usage_stats``, as vLLM's."""
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
    }


def continuous_usage(extra: Mapping[str, Any]) -> bool:
    """Whether a request's ``stream_options`` ask for the usage so far in every chunk
    (``continuous_usage_stats``; the gateway passes it on only with ``include_usage``)."""
    options = extra.get("stream_options")
    return isinstance(options, Mapping) and options.get("continuous_usage_stats") is True


def check_stop(stop: Sequence[str], suffix: Any = None) -> None:
    """Refuse what vLLM 0.32 refuses of a request's ``stop`` strings (more than
    :data:`MAX_STOP_STRINGS`, an empty one) and a completion's ``suffix`` (None for a chat:
    its suffix is ignored), in its words. The HTTP server and the in-process engine both
    check them here."""
    if len(stop) > MAX_STOP_STRINGS:  # (its request model's check)
        k, most = len(stop), MAX_STOP_STRINGS
        raise InvalidRequestError(
            "2 validation errors:\n"
            f"  {{'type': 'string_type', 'loc': 'body.stop', 'msg': 'Input should be a valid "
            f"string', 'input': '<list of {k} items>'}}\n"
            f"  {{'type': 'too_long', 'loc': 'body.stop', 'msg': 'List should have at most "
            f"{most} items after validation, not {k}', 'input': '<list of {k} items>', 'ctx': "
            f"{{'field_type': 'List', 'max_length': {most}, 'actual_length': {k}}}}}",
            param="body.stop",
        )
    if "" in stop:
        raise InvalidRequestError("stop cannot contain an empty string.", param="stop")
    if suffix is not None:
        raise InvalidRequestError("suffix is not currently supported", param="suffix")


def check_model(model: Any, model_name: str, adapters: Collection[str] = ()) -> None:
    """404 (:class:`ModelNotFoundError`) unless ``model`` is absent, empty (the served
    model, as vLLM reads it), the served name or one of the LoRA ``adapters`` served."""
    if model is not None and model != "" and model != model_name and model not in adapters:
        raise ModelNotFoundError(f"The model `{model}` does not exist.", param="model")


def _truncated(
    body: Mapping[str, Any],
    prompt: Any,
    messages: Any,
    prompt_tokens: int,
    max_model_len: int | None,
) -> tuple[Any, Any, int]:
    """(prompt, messages, prompt token count) after vLLM's ``truncate_prompt_tokens``: the
    last k tokens of the prompt (a chat's as its template renders it, then given as that
    text), k = -1 meaning the model's context less a token (room for the answer, as vLLM
    0.32 keeps it); text stays text (echoed, its tokens decoded), token ids stay ids."""
    given = body.get("truncate_prompt_tokens")
    if given is None:
        return prompt, messages, prompt_tokens
    keep = whole(given)
    if keep is None or keep < -1 or keep == 0:
        raise InvalidRequestError(
            f"truncate_prompt_tokens must be -1 or an integer >= 1, got {given!r}",
            param="truncate_prompt_tokens",
        )
    if keep == -1:
        if max_model_len is None:
            return prompt, messages, prompt_tokens
        keep = max(1, max_model_len - 1)
    elif max_model_len is not None and keep > max_model_len:  # in vLLM's words
        raise InvalidRequestError(
            f"truncate_prompt_tokens value ({keep}) is greater than max_model_len "
            f"({max_model_len}). Please, select a smaller truncation size.",
            param="truncate_prompt_tokens",
        )
    if prompt_tokens <= keep:
        return prompt, messages, prompt_tokens
    if messages is not None:
        prompt = tokens.chat_prompt_text(messages, generation_prompt=generation_prompt(body))
    return tokens.last_tokens(prompt, keep), None, keep


def truncated_request(req: EngineRequest, max_model_len: int) -> EngineRequest:
    """``req`` as the engine runs it under its ``truncate_prompt_tokens`` (the HTTP server
    cuts a body's prompt in :func:`parse_request`; an in-process engine's request is cut
    here, by the same rule): the prompt's last k tokens, a chat's as its template's text
    (its ``echo`` then ignored, as over HTTP). ``req`` itself when nothing is cut."""
    if req.extra.get("truncate_prompt_tokens") is None:
        return req
    prompt, messages = req.prompt, req.messages
    count = len(prompt_token_ids(req)) if messages is not None or prompt is not None else 0
    cut, cut_messages, _ = _truncated(req.extra, prompt, messages, count, max_model_len)
    if cut is prompt and cut_messages is messages:
        return req
    extra = req.extra
    if messages is not None and cut_messages is None:  # a cut chat runs as a prompt
        extra = {k: v for k, v in extra.items() if k != "echo"}
    return req.with_changes(prompt=cut, messages=cut_messages, extra=extra)


def parse_request(
    body: Mapping[str, Any],
    *,
    chat: bool,
    model_name: str,
    max_model_len: int | None = None,
    request_id: str = "",
    adapters: Collection[str] = (),
) -> ParsedRequest:
    """Validate an OpenAI completions (``chat=False``) or chat body (for ``model_name`` or
    one of the LoRA ``adapters`` served, which the engine request then names). Raises
    :class:`InvalidRequestError` (400) or :class:`ModelNotFoundError` (404)."""
    named = body.get("model")
    check_model(named, model_name, adapters)
    prompt, messages, prompt_tokens = _truncated(body, *_prompt(body, chat), max_model_len)
    cut_chat = chat and messages is None  # its cut template text runs as a prompt
    max_tokens = body.get("max_tokens")
    param = "max_tokens"
    if chat and body.get("max_completion_tokens") is not None:  # the newer name wins
        max_tokens, param = body.get("max_completion_tokens"), "max_completion_tokens"
    asked = max_tokens is not None
    if max_tokens is None:
        max_tokens = engine_default_max_tokens(chat, prompt_tokens, max_model_len)
        at_least = whole(body.get("min_tokens"))
        if chat and at_least is not None and at_least > max_tokens:  # vLLM's chat default
            # is what the context leaves, which a min_tokens within the context never passes
            room = max_model_len - prompt_tokens if max_model_len is not None else at_least
            max_tokens = max(max_tokens, min(at_least, room))
    if isinstance(max_tokens, float) and max_tokens.is_integer():  # vLLM's pydantic takes 2.0
        max_tokens = int(max_tokens)
    least = 0 if not chat and body.get("echo") is True else 1  # 0: the prompt alone
    if not is_int(max_tokens) or max_tokens < least:
        raise InvalidRequestError(f"{param} must be a positive integer", param=param)
    if max_model_len is not None:  # cut to the context, or refused, as vLLM 0.32 does
        max_tokens = context_max_tokens(
            max_model_len, prompt_tokens, max_tokens, param if asked else None,
            text=not isinstance(prompt, list),
        )  # fmt: skip
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is None:
        stop = []
    if not isinstance(stop, list) or not all(isinstance(x, str) for x in stop):
        raise InvalidRequestError("stop must be a string or a list of strings", param="stop")
    check_stop(stop, None if chat else body.get("suffix"))
    checked_samples(body.get("n"))  # (carried out by the engine)
    stream = body.get("stream") or False  # null: not streamed
    options = body.get("stream_options")
    if not isinstance(stream, bool):
        raise InvalidRequestError("stream must be a boolean", param="stream")
    if not isinstance(options, dict | None):
        raise InvalidRequestError("stream_options must be an object", param="stream_options")
    if options and not stream:  # in vLLM's words
        raise InvalidRequestError(
            "Stream options can only be defined when `stream=True`.", param="stream_options"
        )
    given = body.get("priority")
    priority = 0 if given is None else whole(given)  # vLLM's default: 0
    if priority is None:
        raise InvalidRequestError("priority must be an integer", param="priority")
    kv = body.get("kv_transfer_params")
    if not isinstance(kv, dict | None):
        raise InvalidRequestError(
            "kv_transfer_params must be an object", param="kv_transfer_params"
        )
    role: Literal["prefill", "decode"] | None = None
    if kv and kv.get("do_remote_decode"):
        role = "prefill"
    elif kv and kv.get("do_remote_prefill"):
        role = "decode"
    req = EngineRequest(
        request_id=request_id or uuid.uuid4().hex,
        model=named if isinstance(named, str) and named in adapters else model_name,
        prompt=prompt,
        messages=messages,
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, math.inf),  # vLLM: >= 0
        top_p=_number(body, "top_p", 1.0, 1e-9, 1.0),
        stop=tuple(stop),
        stream=stream,
        extra={
            k: v
            for k, v in body.items()
            if k not in _CONSUMED and not (cut_chat and k == "echo")  # (a chat's: ignored)
        },
        kv_transfer_params=kv if role == "decode" else None,
        priority=priority,  # read by an engine that schedules by it; FCFS ignores it, as
    )  # vLLM 0.32 does
    include_usage = request_flag(options, "include_usage", "stream_options.")
    continuous = (
        request_flag(options, "continuous_usage_stats", "stream_options.") and include_usage
    )
    token_ids = request_flag(body, "return_token_ids")
    requested_echo(req)  # checked here: a 400 before the stream starts
    requested_prompt_logprobs(req.extra, stream=stream)
    return ParsedRequest(req, stream, include_usage, role, prompt_tokens, continuous, token_ids)


def request_flag(table: Mapping[str, Any] | None, key: str, prefix: str = "") -> bool:
    """``table[key]`` as a flag: absent or null is false; a value that is not a boolean is
    a 400 naming it (``prefix`` + ``key``: "false" is no boolean, never true)."""
    value = None if table is None else table.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidRequestError(
            f"{prefix}{key} must be a boolean, got {value!r}", param=f"{prefix}{key}"
        )
    return value


@runtime_checkable
class ReportsStopReason(Protocol):
    """Optional engine extension: the stop string or stop token id that ended a finished
    request (``None`` when none did, or when unknown). The server answers it as the choice's
    ``stop_reason``, as vLLM does."""

    def stop_reason(self, request_id: str) -> str | int | None: ...
