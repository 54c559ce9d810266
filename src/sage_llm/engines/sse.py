"""Server-sent events and OpenAI-style completion streams.

:class:`SSEDecoder` / :func:`encode_event` handle the event-stream framing;
:class:`StreamAssembler` turns the events of a ``/v1/completions`` or
``/v1/chat/completions`` stream into :class:`~sage_llm.engines.base.Chunk` objects.

The decoder follows the WHATWG event-stream rules that matter for LLM servers: lines end in
``\\n``, ``\\r\\n`` or ``\\r``; ``data:`` lines of one event are joined with ``\\n``; a blank
line ends the event; lines starting with ``:`` are comments; one space after the colon is
dropped; one byte-order mark at the start of the stream is dropped. Bytes may arrive split
anywhere, including inside a UTF-8 sequence or between ``\\r`` and ``\\n``. An ``error:``
field (llama.cpp's server sends a stream's error so) is an event named ``error`` with that
data, as ``event: error`` names one.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from sage_llm import jsonutil
from sage_llm.engines.base import Chunk, EngineRequest, Usage, fill_chunk, fill_usage
from sage_llm.errors import EngineError, EngineRequestRejectedError, EngineStreamError
from sage_llm.fastinit import field_filler
from sage_llm.tokens import chat_prompt_text, count_tokens

DONE = "[DONE]"
"""The ``data`` of the event that ends an OpenAI-style stream."""

DONE_EVENT = b"data: [DONE]\n\n"

REJECTED_CODES = frozenset({400, 413, 422})
"""Engine statuses (and error-event codes) that refuse the request itself: a bad field, a
body too large, a validation error."""


@dataclass(frozen=True, slots=True)
class SSEEvent:
    """One dispatched event: ``data`` (lines joined by ``\\n``), ``event`` name, ``id``."""

    data: str
    event: str = "message"
    id: str | None = None


_fill_event = field_filler(SSEEvent, ("data", "event", "id"))
"""``_fill_event(data, event, id)``: an :class:`SSEEvent` without its ``__init__`` (one is
made per event of every stream)."""


class SSEDecoder:
    """Turns a byte stream into :class:`SSEEvent` objects, fed in arbitrary pieces."""

    def __init__(self) -> None:
        # made only once a piece does not decode on its own (a UTF-8 sequence split
        # between pieces, or invalid bytes): most streams never need it
        self._utf8: codecs.IncrementalDecoder | None = None
        self._buf = ""
        self._data: list[str] = []
        self._event = ""
        self._id: str | None = None
        self._saw_field = False
        self._started = False
        """Some text has come (a byte-order mark is dropped only before any)."""

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Decode ``chunk`` and return the events it completed (possibly none)."""
        if self._utf8 is None:
            try:
                text = chunk.decode("utf-8")
            except UnicodeDecodeError:
                self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
                text = self._utf8.decode(chunk)
        else:
            text = self._utf8.decode(chunk)
        if not text:
            return []
        if not self._started:
            self._started = True
            if text[0] == "\ufeff":  # WHATWG: one leading byte-order mark is dropped
                text = text[1:]
        self._buf += text
        return self._drain(final=False)

    def close(self) -> list[SSEEvent]:
        """End of stream: decode what is left. An unterminated event is dispatched too."""
        if self._utf8 is not None:
            self._buf += self._utf8.decode(b"", final=True)
        events = self._drain(final=True)
        if self._buf:
            self._line(self._buf, events)
            self._buf = ""
        if self._saw_field:
            self._dispatch(events)
        return events

    @property
    def pending(self) -> bool:
        """True while part of an event (or an unterminated line) is buffered."""
        return bool(self._buf) or self._saw_field

    def _drain(self, *, final: bool) -> list[SSEEvent]:
        events: list[SSEEvent] = []
        buf = self._buf
        if "\r" not in buf:  # "\n" line endings only, as vLLM and SGLang send: split once
            end = buf.rfind("\n")
            if end < 0:
                return events
            self._buf = buf[end + 1 :]
            line = self._line
            for text in buf[:end].split("\n"):
                line(text, events)
            return events
        start = 0
        n = len(buf)
        while start < n:
            i_n = buf.find("\n", start)
            i_r = buf.find("\r", start)
            if i_n < 0 and i_r < 0:
                break
            if i_r < 0 or (0 <= i_n < i_r):
                end, nxt = i_n, i_n + 1
            elif i_r == n - 1 and not final:
                break  # a lone "\r" at the end: wait to see whether "\n" follows
            else:
                end = i_r
                nxt = i_r + 2 if i_r + 1 < n and buf[i_r + 1] == "\n" else i_r + 1
            self._line(buf[start:end], events)
            start = nxt
        self._buf = buf[start:]
        return events

    def _line(self, line: str, events: list[SSEEvent]) -> None:
        if line.startswith("data: "):  # nearly every line of a completion stream
            self._data.append(line[6:])
            self._saw_field = True
            return
        if not line:
            if self._saw_field:
                self._dispatch(events)
            return
        if line.startswith(":"):
            return
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            self._id = value
        elif name == "error":  # llama.cpp's stream error: an event named "error"
            self._data.append(value)
            self._event = "error"
        else:
            return  # "retry" and unknown fields are ignored
        self._saw_field = True

    def _dispatch(self, events: list[SSEEvent]) -> None:
        data = self._data
        if data:
            text = data[0] if len(data) == 1 else "\n".join(data)
            events.append(_fill_event(text, self._event or "message", self._id))
        self._data = []
        self._event = ""
        self._saw_field = False


def encode_event(data: str | Mapping[str, Any], *, event: str | None = None) -> bytes:
    """One SSE event. A mapping is JSON-encoded compactly (as vLLM does)."""
    head = b"" if event is None else f"event: {event}\n".encode()
    if not isinstance(data, str):
        # compact JSON never contains a raw newline: one data line
        return head + b"data: " + jsonutil.dumps(data) + b"\n\n"
    out = "".join(f"data: {line}\n" for line in data.split("\n"))
    return head + (out + "\n").encode("utf-8")


# --- OpenAI-style completion streams ------------------------------------------------------


def _as_int(value: Any) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return 0


def parse_usage(obj: Any) -> Usage | None:
    """A :class:`Usage` from an OpenAI ``usage`` object (``None`` when there is none);
    ``cached_tokens`` comes from ``prompt_tokens_details.cached_tokens`` (None when the
    engine gave no number there)."""
    if not isinstance(obj, Mapping):
        return None
    details = obj.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, Mapping) else None
    if cached is not None and not jsonutil.is_number(cached):
        cached = None
    extra = None
    known = ("prompt_tokens" in obj) + ("completion_tokens" in obj) + ("total_tokens" in obj)
    if len(obj) > known + ("prompt_tokens_details" in obj):  # others: reasoning tokens, …
        extra = {k: v for k, v in obj.items() if k not in _USAGE_FIELDS} or None
    return fill_usage(
        _as_int(obj.get("prompt_tokens")),
        _as_int(obj.get("completion_tokens")),
        None if cached is None else _as_int(cached),
        extra,
    )


_USAGE_FIELDS = frozenset(
    {"prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details"}
)
"""The ``usage`` fields :class:`Usage` holds (or derives) itself."""


def stream_error(obj: Mapping[str, Any]) -> tuple[str, int | None] | None:
    """``(message, code)`` when a JSON object from an engine is an error, else ``None``.

    Recognises ``{"error": {...}}`` / ``{"error": "text"}`` (OpenAI, vLLM streams) and
    ``{"object": "error", "message": ...}`` (vLLM's ErrorResponse)."""
    err = obj.get("error")
    if err is not None:  # nearly every object has none: no (slow) Mapping check then
        if isinstance(err, Mapping):
            code = err.get("code")
            return str(err.get("message") or err), code if isinstance(code, int) else None
        if isinstance(err, str) and err:
            return err, None
    if obj.get("object") == "error":
        code = obj.get("code")
        return str(obj.get("message") or "error"), code if isinstance(code, int) else None
    return None


def error_param_from_body(body: bytes) -> str | None:
    """The request field an HTTP error body names (``param`` of an OpenAI error object or of
    vLLM's ErrorResponse), if it names one."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    if not isinstance(parsed, Mapping):
        return None
    err = parsed.get("error")
    where = err if isinstance(err, Mapping) else parsed
    param = where.get("param")
    return param if isinstance(param, str) and param else None


def error_from_body(body: bytes | str | Mapping[str, Any]) -> str | None:
    """The message in an HTTP error body: an OpenAI error object, FastAPI's ``detail``,
    a ``message`` field, or the text itself (truncated)."""
    if isinstance(body, bytes | str):
        text = body.decode("utf-8", errors="replace") if isinstance(body, bytes) else body
        try:
            parsed = json.loads(text)
        except ValueError:
            return text.strip()[:500] or None
        if not isinstance(parsed, Mapping):
            return text.strip()[:500] or None
        body = parsed
    found = stream_error(body)
    if found is not None:
        return found[0]
    for key in ("detail", "message"):
        value = body.get(key)
        if value:
            return value if isinstance(value, str) else json.dumps(value)[:500]
    return None


def _choice_text(choice: Mapping[str, Any]) -> str:
    text = choice.get("text")
    if text is None:
        for key in ("delta", "message"):
            part = choice.get(key)
            if isinstance(part, Mapping):
                text = part.get("content")
                break
    return text if isinstance(text, str) else ""


_CHOICE_KEYS = frozenset(
    {"index", "text", "delta", "message", "logprobs", "finish_reason", "stop_reason", "token_ids"}
)
"""The fields of a choice a :class:`Chunk` has a place for (others go to its ``extras``)."""
_PLAIN_PART = frozenset({"role", "content"})
"""The fields of a delta or message a :class:`Chunk` has a place for (others: ``fields``,
and a role other than the assistant's)."""


def _bad_token_ids(ids: Any) -> EngineStreamError:
    """The error for a choice whose ``token_ids`` is not a list of integers (the callers
    reword it with their instance)."""
    return EngineStreamError(f"choice's 'token_ids' is not a list of integers: {ids!r:.80}")


def _choice_chunk(choice: Mapping[str, Any]) -> Chunk:
    """One choice's chunk; :class:`EngineStreamError` for ``token_ids`` that are not a list
    of integers."""
    get = choice.get
    finish = get("finish_reason")
    ids = get("token_ids")
    if ids is None:
        ids = ()
    elif type(ids) is list and all(type(t) is int for t in ids):
        ids = tuple(ids)
    else:
        raise _bad_token_ids(ids)
    text = get("text")
    index = get("index")
    fields = extras = None
    if text is None:  # chat: what the delta or message holds beyond its text
        part = get("delta")
        if part is None:
            part = get("message")
        if type(part) is dict:
            if not part.keys() <= _PLAIN_PART:
                fields = _set_fields(part, _PLAIN_PART)
            role = part.get("role")
            if role is not None and role != "assistant":  # add_generation_prompt: false
                fields = {**(fields or {}), "role": role}  # (vLLM: the last message's)
    stop = get("stop_reason")
    if stop is not None or not choice.keys() <= _CHOICE_KEYS:
        extras = _set_fields(choice, _CHOICE_KEYS)
        if stop is not None:
            extras = {**(extras or {}), "stop_reason": stop}
    return fill_chunk(  # every field, in Chunk's order
        text if type(text) is str else _choice_text(choice),
        ids,
        str(finish) if finish else None,
        None,
        get("logprobs"),
        index if type(index) is int else _as_int(index),
        fields,
        extras,
        None,
    )


_OBJECT_KEYS = frozenset(
    {"id", "object", "created", "model", "choices", "usage", "kv_transfer_params"}
)
"""The fields of an engine's response object the gateway writes itself (or keeps to
itself: ``kv_transfer_params`` is between the engines of a PD pair); the others go to the
first chunk's ``top``."""


def _set_fields(obj: Mapping[str, Any], known: frozenset[str]) -> dict[str, Any] | None:
    """The fields of ``obj`` outside ``known`` that hold something (not null, not empty)."""
    found = {k: v for k, v in obj.items() if k not in known and v is not None and v != []}
    return found or None


def estimate_prompt_tokens(req: EngineRequest) -> int:
    """Prompt length by the shared tokenizer (for engines that report no usage)."""
    if req.messages is not None:
        return count_tokens(chat_prompt_text(list(req.messages)))
    return count_tokens(req.prompt)


class StreamAssembler:
    """Turns the ``data`` of OpenAI-style stream events into :class:`Chunk` objects.

    One chunk per choice delta, in order. The chunk carrying a ``finish_reason`` is held
    back until the next event, because the usage chunk (``choices: []``) follows it: the
    last chunk handed out carries both ``finish_reason`` and ``usage``. Engines that send
    no usage get an estimate (prompt by the shared tokenizer, one token per text chunk).
    Errors: :class:`EngineStreamError` for malformed data, :class:`EngineError` for an
    ``error`` event; ``retryable`` only while nothing was produced.
    """

    def __init__(self, req: EngineRequest, instance_id: str | None = None) -> None:
        self._req = req
        self._instance_id = instance_id
        self.produced = False
        """True once any choice delta arrived."""
        self.done = False
        """True once ``[DONE]`` arrived."""
        self._held: Chunk | None = None
        self._usage: Usage | None = None
        self._last_finish: tuple[str, int] | None = None
        self._unfinished: set[int] = set()
        """Choices (``index``) seen without their ``finish_reason`` yet."""
        self._text_chunks = 0
        options = req.extra.get("stream_options")
        self._continuous = isinstance(options, Mapping) and bool(
            options.get("continuous_usage_stats")
        )
        """The request asked for the usage so far in every chunk: it goes on with each
        event's first chunk (``top``), as the engine gave it."""

    def _fail(self, cls: type[EngineError], message: str, status: int | None = None) -> EngineError:
        prefix = f"{self._instance_id}: " if self._instance_id else ""
        return cls(
            prefix + message,
            instance_id=self._instance_id,
            status=status,
            retryable=not self.produced,
        )

    def on_event(self, data: str, kind: str = "message") -> list[Chunk]:
        """Chunks completed by one event's ``data`` (possibly none); ``kind``: the event's
        name (an ``error`` event's data is the error, with or without ``{"error": …}``
        around it)."""
        if self.done:
            return []
        if kind == "error":
            self._event_error(data)
        if data == DONE or (data[:1] != "{" and data.strip() == DONE):
            self.done = True
            return []
        try:
            obj = jsonutil.loads(data)
        except ValueError:
            raise self._fail(
                EngineStreamError, f"malformed JSON in stream: {data[:200]!r}"
            ) from None
        if type(obj) is not dict:
            raise self._fail(EngineStreamError, f"stream event is not an object: {data[:200]!r}")
        err = stream_error(obj)
        if err is not None:
            self._raise_error(obj, err)
        get = obj.get
        raw_usage = get("usage")
        if raw_usage is not None:
            usage = parse_usage(raw_usage)
            if usage is not None:
                self._usage = usage
        choices = get("choices")
        if choices is None:
            return []
        if type(choices) is not list:
            raise self._fail(EngineStreamError, "stream event 'choices' is not a list")
        out: list[Chunk] = []
        top = None if obj.keys() <= _OBJECT_KEYS else _set_fields(obj, _OBJECT_KEYS)
        if not choices:  # the usage event: vLLM's last words (system_fingerprint) go with
            held = self._held  # the last chunk, which waits for the usage
            if top is not None and held is not None:
                self._held = held.with_top({**(held.top or {}), **top})
            return out
        if self._continuous and raw_usage is not None:
            top = {**(top or {}), "usage": raw_usage}
        for choice in choices:
            if type(choice) is not dict:  # JSON objects parse to dicts
                raise self._fail(EngineStreamError, "stream choice is not an object")
            try:
                chunk = _choice_chunk(choice)
            except EngineStreamError as exc:
                raise self._fail(EngineStreamError, str(exc)) from None
            if top is not None:  # on the event's first chunk
                chunk, top = chunk.with_top(top), None
            self.produced = True
            if chunk.text:
                self._text_chunks += 1
            if self._held is not None:
                out.append(self._held)
                self._held = None
            if chunk.finish_reason is not None:
                self._held = chunk
                self._last_finish = (chunk.finish_reason, chunk.index)
                self._unfinished.discard(chunk.index)
            else:
                self._unfinished.add(chunk.index)
                out.append(chunk)
        return out

    def _event_error(self, data: str) -> None:
        """Raise the error an ``error`` event carries."""
        try:
            obj = jsonutil.loads(data)
        except ValueError:
            obj = None
        if type(obj) is not dict:
            raise self._fail(EngineError, f"engine error in stream: {data[:500] or 'no reason'}")
        err = stream_error(obj)
        if err is None:  # llama.cpp's: the error object itself
            obj = {"error": obj}
            err = stream_error(obj)
        assert err is not None
        self._raise_error(obj, err)

    def _raise_error(self, obj: Mapping[str, Any], err: tuple[str, int | None]) -> NoReturn:
        """Raise an engine's error event: a refusal of the request (a 400, 413 or 422 that
        names the field, before any token) as :class:`EngineRequestRejectedError`, as the
        same answer with that HTTP status is; any other as :class:`EngineError` (vLLM says
        400 of any failure inside a stream, so a code alone tells nothing)."""
        message, code = err
        inner = obj.get("error")
        where = inner if isinstance(inner, Mapping) else obj
        param = where.get("param")
        if code in REJECTED_CODES and isinstance(param, str) and param and not self.produced:
            prefix = f"{self._instance_id}: " if self._instance_id else ""
            said = f"rejected the request (error event, code {code}, in its stream): {message}"
            raise EngineRequestRejectedError(
                prefix + said, instance_id=self._instance_id, status=code, param=param
            )
        raise self._fail(EngineError, f"engine error in stream: {message}", code)

    def finish(self) -> list[Chunk]:
        """At the end of the stream: the final chunk, with ``finish_reason`` and ``usage``."""
        if self._last_finish is None:
            raise self._fail(EngineStreamError, "stream ended without a finish_reason")
        if self._unfinished:  # with n > 1: every choice ends with its own
            raise self._fail(
                EngineStreamError,
                f"stream ended without a finish_reason for choice {min(self._unfinished)}",
            )
        usage = self._usage or Usage(estimate_prompt_tokens(self._req), self._text_chunks)
        held, self._held = self._held, None
        if held is not None:
            return [held.with_usage(usage)]
        reason, index = self._last_finish
        return [Chunk(text="", finish_reason=reason, usage=usage, index=index)]


def chunks_from_completion(
    obj: Any, req: EngineRequest, instance_id: str | None = None
) -> list[Chunk]:
    """The chunks of a non-streaming completion / chat completion object, one per choice;
    the last carries ``usage``."""
    prefix = f"{instance_id}: " if instance_id else ""
    if not isinstance(obj, Mapping):
        raise EngineStreamError(prefix + "completion is not a JSON object", instance_id=instance_id)
    err = stream_error(obj)
    if err is not None and "choices" not in obj:
        raise EngineError(prefix + err[0], instance_id=instance_id, status=err[1])
    choices = obj.get("choices")
    if not isinstance(choices, list) or not choices:
        raise EngineStreamError(prefix + "completion has no choices", instance_id=instance_id)
    try:
        chunks = [_choice_chunk(c) for c in choices if isinstance(c, Mapping)]
    except EngineStreamError as exc:
        raise EngineStreamError(prefix + str(exc), instance_id=instance_id) from None
    if len(chunks) != len(choices) or any(c.finish_reason is None for c in chunks):
        raise EngineStreamError(  # (every choice: an answer in one piece is not cut short)
            prefix + "completion choices are malformed or unfinished", instance_id=instance_id
        )
    usage = parse_usage(obj.get("usage")) or Usage(
        estimate_prompt_tokens(req), sum(count_tokens(c.text) for c in chunks)
    )
    chunks[-1] = chunks[-1].with_usage(usage)
    top = _set_fields(obj, _OBJECT_KEYS)
    if top is not None:
        chunks[0] = chunks[0].with_top(top)
    return chunks


# --- encoding: vLLM's response objects -----------------------------------------------------


def usage_json(usage: Usage) -> dict[str, Any]:
    """An OpenAI ``usage`` object, with ``prompt_tokens_details.cached_tokens`` (null
    details when the engine did not say, as vLLM writes them) and the engine's other fields
    (:attr:`Usage.extra`)."""
    cached = usage.cached_tokens
    out = {
        "prompt_tokens": usage.prompt_tokens,
        "total_tokens": usage.total_tokens,
        "completion_tokens": usage.completion_tokens,
        "prompt_tokens_details": None if cached is None else {"cached_tokens": cached},
    }
    if usage.extra:
        out.update(usage.extra)
    return out


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    """Builds the JSON objects vLLM answers one request with (``cmpl-…`` / ``chatcmpl-…``)."""

    chat: bool
    request_id: str
    model: str
    created: int

    @property
    def id(self) -> str:
        return ("chatcmpl-" if self.chat else "cmpl-") + self.request_id

    def _head(self, *, final: bool) -> dict[str, Any]:
        if self.chat:
            kind = "chat.completion" if final else "chat.completion.chunk"
        else:
            kind = "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def role_chunk(self) -> dict[str, Any]:
        """The first chunk of a chat stream: the assistant role, empty content."""
        head = self._head(final=False)
        delta = {"role": "assistant", "content": ""}
        head["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]
        return head

    def chunk(
        self,
        text: str,
        finish_reason: str | None,
        *,
        index: int = 0,
        logprobs: Any = None,
        fields: Mapping[str, Any] | None = None,
        extras: Mapping[str, Any] | None = None,
        token_ids: Sequence[int] = (),
        top: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """One stream chunk carrying ``text`` (and ``finish_reason`` on the last one), with
        the engine's other delta ``fields`` (``tool_calls`` …), choice ``extras``
        (``stop_reason`` …) and object fields ``top`` as :class:`Chunk` holds them, and
        the choice's ``token_ids`` when given."""
        head = self._head(final=False)
        choice: dict[str, Any] = {"index": index}
        if self.chat:
            delta = {"content": text} if text or (finish_reason is None and not fields) else {}
            if fields:
                delta.update(fields)
            choice["delta"] = delta
        else:
            choice["text"] = text
        choice["logprobs"] = logprobs
        choice["finish_reason"] = finish_reason
        choice["stop_reason"] = None
        if token_ids:
            choice["token_ids"] = list(token_ids)
        if extras:
            choice.update(extras)
        head["choices"] = [choice]
        if top:
            head.update(top)
        return head

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        """The chunk sent after the last one when ``stream_options.include_usage`` is set."""
        head = self._head(final=False)
        head["choices"] = []
        head["usage"] = usage_json(usage)
        return head

    def completion(self, text: str, finish_reason: str, usage: Usage) -> dict[str, Any]:
        """A whole (non-streaming) completion or chat completion."""
        head = self._head(final=True)
        choice: dict[str, Any] = {"index": 0}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice["logprobs"] = None
        choice["finish_reason"] = finish_reason
        choice["stop_reason"] = None
        head["choices"] = [choice]
        head["usage"] = usage_json(usage)
        head["kv_transfer_params"] = None
        return head


fill_format = field_filler(ResponseFormat, ("chat", "request_id", "model", "created"))
"""``ResponseFormat(chat, request_id, model, created)``, faster (one is made per request)."""
