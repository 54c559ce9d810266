"""Running one generation through the manager: a whole response, or an SSE relay.

A whole response waits for the request's end (:meth:`ControlPlaneManager.collect`); a
stream consumes :meth:`ControlPlaneManager.stream_batches`, and closing that iterator
cancels the request in the manager (a client that disconnects, a timeout). Choices are
rebuilt per ``Chunk.index`` (``n > 1``). Streams are relayed as chunks arrive, nothing
held back: the chunks that arrived together go out in one write; a failure after the
first chunk ends the stream with an ``{"error": …}`` event and ``[DONE]``, never a silent
truncation. A stream ends with the engine's last chunk: the client has ``[DONE]`` and the
body's end before the control plane records the request's end (its result, metrics and
the instance's accounting), not after.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import re
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, replace
from typing import Any, Protocol

from aiohttp import web

from sage_llm import jsonutil
from sage_llm.asyncmerge import merge_streams
from sage_llm.control_plane.dispatcher import STOPPED
from sage_llm.control_plane.manager import ControlPlaneManager
from sage_llm.engines.base import Chunk, Usage
from sage_llm.engines.sse import DONE_EVENT, ResponseFormat, encode_event, fill_format, usage_json
from sage_llm.errors import (
    ControlPlaneNotRunningError,
    DeadlineExceededError,
    EngineRequestRejectedError,
    RequestCancelledError,
    RequestNotFoundError,
    SageLLMError,
)
from sage_llm.fastinit import field_filler
from sage_llm.gateway.errors import error_body
from sage_llm.httpserve import tcp_nodelay
from sage_llm.types import RequestMetadata, RequestResult, RequestStatus

log = logging.getLogger("sage_llm.gateway")

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


class SSEResponse(web.StreamResponse):
    """A stream response whose status line and headers leave with its first event (one
    write, as ``web.Response`` does for its body) rather than on their own in
    ``prepare()``; the relay prepares it only once the first chunk is there."""

    _send_headers_immediately = False
    stream_error: int | None = None
    """How the stream ended when not well, for the trace span (its status line said 200):
    the code of the error event that ended it, or 499 when the client went away first;
    None when it ended well."""


CLIENT_GONE = 499
"""How a stream whose client went away before its end ended (nginx's status for it)."""


class StreamSink(Protocol):
    """Where a stream's bytes go: aiohttp's ``StreamResponse`` or the lean server's
    stream; both raise ``ConnectionResetError`` once the client is gone."""

    async def write(self, data: bytes) -> None: ...

    async def write_eof(self, data: bytes = b"") -> None:
        """Write ``data`` (if any) and end the body, in one write where the sink can."""


@dataclass(frozen=True, slots=True)
class Generation:
    """A validated completions / chat request, ready for the manager."""

    meta: RequestMetadata
    chat: bool
    model: str
    stream: bool
    include_usage: bool
    timeout_s: float | None
    """Whole-request limit: the smaller of ``request_timeout_s`` and the SLO deadline."""
    max_tokens_param: str
    """The field the client gave the output limit in (a chat's ``max_completion_tokens``
    reaches the engine as ``max_tokens``)."""

    @property
    def request_id(self) -> str:
        return self.meta.request_id


fill_generation = field_filler(
    Generation,
    ("meta", "chat", "model", "stream", "include_usage", "timeout_s", "max_tokens_param"),
)
"""``Generation(meta, chat, model, stream, include_usage, timeout_s, max_tokens_param)``,
faster (one is made per request)."""


class _Choices:
    """Per-index text, finish reason, logprobs and the engine's other fields of a
    generation (its deltas' ``fields`` merged as :func:`merge_delta` does), the fields of
    the engine's objects (``top``), and, with ``token_ids``, each choice's token ids."""

    __slots__ = ("extras", "fields", "finish", "ids", "logprobs", "text", "top", "usage")

    def __init__(self, *, token_ids: bool = False) -> None:
        self.text: dict[int, list[str]] = {}
        self.finish: dict[int, str | None] = {}
        self.logprobs: dict[int, list[Any]] = {}
        self.fields: dict[int, dict[str, Any]] = {}
        self.extras: dict[int, dict[str, Any]] = {}
        self.ids: dict[int, list[int]] | None = {} if token_ids else None
        self.top: dict[str, Any] | None = None
        self.usage: Usage | None = None

    def add(self, chunk: Chunk) -> None:
        idx = chunk.index
        self.text.setdefault(idx, []).append(chunk.text)
        self.finish.setdefault(idx, None)
        if chunk.finish_reason is not None:
            self.finish[idx] = chunk.finish_reason
        if chunk.logprobs is not None:
            self.logprobs.setdefault(idx, []).append(chunk.logprobs)
        if chunk.fields:
            merge_delta(self.fields.setdefault(idx, {}), chunk.fields)
        if chunk.extras:
            self.extras.setdefault(idx, {}).update(chunk.extras)
        if self.ids is not None:
            self.ids.setdefault(idx, []).extend(chunk.token_ids)
        if chunk.top:
            self.top = {**(self.top or {}), **chunk.top}
        if chunk.usage is not None:
            self.usage = chunk.usage

    def indices(self) -> list[int]:
        return sorted(self.text) or [0]


_STREAMED_TEXT = frozenset({"content", "arguments", "reasoning_content", "reasoning", "refusal"})
"""Delta fields whose pieces make one text (a tool call's ``arguments`` come in pieces)."""


def merge_delta(into: dict[str, Any], part: Mapping[str, Any]) -> None:
    """Add one stream delta's fields to those of the deltas before it, as a client
    assembles a message: the text fields of :data:`_STREAMED_TEXT` are concatenated,
    objects merged, lists of objects with an ``index`` (``tool_calls``) merged item by
    item, anything else replaced."""
    for key, value in part.items():
        old = into.get(key)
        if old is None:
            into[key] = copy.deepcopy(value)
        elif key in _STREAMED_TEXT and isinstance(old, str) and isinstance(value, str):
            into[key] = old + value
        elif isinstance(old, dict) and isinstance(value, Mapping):
            merge_delta(old, value)
        elif isinstance(old, list) and isinstance(value, list):
            by_index = {i.get("index"): i for i in old if isinstance(i, dict) and "index" in i}
            for item in value:
                same = by_index.get(item.get("index")) if isinstance(item, dict) else None
                if same is not None:
                    merge_delta(same, item)
                else:
                    old.append(copy.deepcopy(item))
        else:
            into[key] = copy.deepcopy(value)


def merge_logprobs(parts: list[Any] | None) -> Any:
    """Join the logprobs of a choice's chunks: lists are concatenated key by key (OpenAI
    ``{"content": [...]}`` or ``{"tokens": [...], "token_logprobs": [...], ...}``)."""
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    if all(isinstance(p, list) for p in parts):
        return [item for p in parts for item in p]
    if not all(isinstance(p, dict) for p in parts):
        return parts[-1]
    merged: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if isinstance(value, list) and isinstance(merged.get(key), list):
                merged[key] = merged[key] + value
            elif key not in merged or merged[key] is None:
                merged[key] = list(value) if isinstance(value, list) else value
    return merged


def tool_call_content(gen: Generation) -> str | None:
    """The ``content`` of a whole chat message that calls tools and has no text, as vLLM
    answers it: ``""`` when the request forced a call (``tool_choice`` ``"required"`` or a
    named function), null otherwise (calls its tool parser found)."""
    choice = gen.meta.extra_body.get("tool_choice")
    return "" if choice == "required" or isinstance(choice, dict) else None


def completion_body(
    fmt: ResponseFormat, choices: _Choices, usage: Usage, call_content: str | None = None
) -> dict[str, Any]:
    """A whole completion / chat completion with every choice, in vLLM's format
    (``call_content``: a chat message's content when it calls tools and has no text,
    :func:`tool_call_content`)."""
    out: list[dict[str, Any]] = []
    for idx in choices.indices():
        text = "".join(choices.text.get(idx, []))
        choice: dict[str, Any] = {"index": idx}
        fields = choices.fields.get(idx)
        if fmt.chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if fields:  # the engine's tool calls, reasoning, role …
                message.update(fields)
                calls = message.get("tool_calls")
                if calls and not text:
                    message["content"] = call_content
                for call in calls if isinstance(calls, list) else ():
                    if isinstance(call, dict):  # merged from deltas: a whole one has none
                        call.pop("index", None)
            choice["message"] = message
        else:
            choice["text"] = text
        choice["logprobs"] = merge_logprobs(choices.logprobs.get(idx))
        choice["finish_reason"] = choices.finish.get(idx) or "length"
        choice["stop_reason"] = None
        if choices.ids is not None and (ids := choices.ids.get(idx)):
            choice["token_ids"] = ids  # the engine gave them (without return_token_ids, none)
        extras = choices.extras.get(idx)
        if extras:
            choice.update(extras)
        out.append(choice)
    body = {
        "id": fmt.id,
        "object": "chat.completion" if fmt.chat else "text_completion",
        "created": fmt.created,
        "model": fmt.model,
        "choices": out,
        "usage": usage_json(usage),
    }
    if choices.top:
        body.update(choices.top)
    return body


def _client_gone(request_id: str) -> None:
    log.info(
        "client of request %s went away; cancelling it", request_id,
        extra={"request_id": request_id},
    )  # fmt: skip


def _timeout_error(gen: Generation, request_id: str) -> DeadlineExceededError:
    """``gen`` passed its time limit: said of ``request_id``, the client's (of a request
    with several prompts, the whole request, not the prompt's part)."""
    assert gen.timeout_s is not None
    return DeadlineExceededError.request_timed_out(request_id, gen.timeout_s)


def _usage_after(
    gen: Generation, result: RequestResult | None, seen: Usage | None, request_id: str
) -> Usage:
    """The usage to report once the request ended; raises if it was cancelled (said of
    ``request_id``, the client's request: of several prompts, not the prompt's part)."""
    if result is not None and result.status is RequestStatus.CANCELLED:
        message = f"request {request_id} was cancelled: {result.error or 'no reason given'}"
        if result.error == STOPPED:  # the gateway is shutting down: 503, as for new ones
            raise ControlPlaneNotRunningError(message)
        raise RequestCancelledError(message)
    if seen is not None:
        return seen
    if result is None:
        return Usage()
    return Usage(result.prompt_tokens, result.completion_tokens, result.cached_tokens)


async def _final_usage(
    manager: ControlPlaneManager, gen: Generation, seen: Usage | None, request_id: str
) -> Usage:
    """:func:`_usage_after` with the result the manager kept (none: no longer kept)."""
    try:
        result = await manager.get_result(gen.request_id)
    except RequestNotFoundError:
        result = None
    return _usage_after(gen, result, seen, request_id)


def _said_of_request(exc: BaseException, request_id: str) -> None:
    """Name the client's ``request_id`` in ``exc``'s message where it names a prompt's
    part of it (``<id>#k``, the manager's request of prompt ``k``): the client knows only
    its own id (``X-Request-Id``, the access log's)."""
    if not isinstance(exc, SageLLMError) or f"{request_id}#" not in exc.message:
        return
    exc.reword(re.sub(re.escape(request_id) + r"#\d+", request_id, exc.message))


def _as_the_client_named(exc: BaseException, gen: Generation) -> None:
    """Name the output limit in an engine's refusal of it as the client named it (a
    chat's ``max_completion_tokens``, which the engine got as ``max_tokens``)."""
    named = gen.max_tokens_param
    if (
        named == "max_tokens"
        or not isinstance(exc, EngineRequestRejectedError)
        or exc.param != "max_tokens"
    ):
        return
    exc.param = named
    exc.reword(re.sub(r"\bmax_tokens\b", named, exc.message))


async def complete(manager: ControlPlaneManager, gen: Generation, created: int) -> dict[str, Any]:
    """Run ``gen`` to the end and return the whole response body."""
    fmt = fill_format(gen.chat, gen.request_id, gen.model, created)
    try:
        chunks, result = await manager.collect(gen.meta, gen.timeout_s)
    except EngineRequestRejectedError as exc:
        _as_the_client_named(exc, gen)
        raise
    choices = _Choices(token_ids=bool(gen.meta.extra_body.get("return_token_ids")))
    for chunk in chunks:
        choices.add(chunk)
    usage = _usage_after(gen, result, choices.usage, gen.request_id)
    return completion_body(fmt, choices, usage, tool_call_content(gen) if gen.chat else None)


async def complete_all(
    manager: ControlPlaneManager, gens: Sequence[Generation], created: int, request_id: str
) -> dict[str, Any]:
    """Several prompts (one Generation each, see
    :func:`~sage_llm.gateway.openai.parse_generations`) one answer under ``request_id``, as
    vLLM gives it: prompt ``k``'s choice ``i`` is choice ``k·n + i``, and the usage is the
    sum. They run side by side; when one fails the others are cancelled and its error is
    the answer."""
    with manager.reserve_request_id(request_id):
        tasks = [asyncio.ensure_future(manager.collect(g.meta, g.timeout_s)) for g in gens]
        try:
            answers = await asyncio.gather(*tasks)
        except DeadlineExceededError as exc:  # said of the client's request, not a prompt's
            await _cancel_all(tasks)
            timeout = gens[0].timeout_s
            prompt_part = any(str(exc).startswith(f"request {g.request_id} ") for g in gens)
            if timeout is None or not prompt_part:
                raise
            raise DeadlineExceededError.request_timed_out(request_id, timeout) from exc
        except BaseException as exc:
            await _cancel_all(tasks)
            _said_of_request(exc, request_id)
            _as_the_client_named(exc, gens[0])
            raise
    gen = gens[0]
    n = _choices_per_prompt(gen)
    choices = _Choices(token_ids=bool(gen.meta.extra_body.get("return_token_ids")))
    usages: list[Usage] = []
    for k, (prompt_gen, (chunks, result)) in enumerate(zip(gens, answers, strict=True)):
        seen: Usage | None = None
        for chunk in chunks:
            seen = chunk.usage or seen
            choices.add(replace(chunk, index=k * n + chunk.index))
        usages.append(_usage_after(prompt_gen, result, seen, request_id))
    fmt = fill_format(gen.chat, request_id, gen.model, created)
    return completion_body(fmt, choices, sum_usage(usages))


async def _cancel_all(tasks: Sequence[asyncio.Future[Any]]) -> None:
    """Cancel ``tasks`` and wait until each has ended (whatever it raised)."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _choices_per_prompt(gen: Generation) -> int:
    n = gen.meta.extra_body.get("n")
    return n if isinstance(n, int) and n > 0 else 1


def sum_usage(usages: Iterable[Usage]) -> Usage:
    """The usage of several requests answered as one (the engine's other fields summed
    where they are numbers, see :func:`_sum_extra`)."""
    prompt = completion = 0
    cached: int | None = None  # the engines' cached tokens: None when none said
    extra: dict[str, Any] | None = None
    for usage in usages:
        prompt += usage.prompt_tokens
        completion += usage.completion_tokens
        if usage.cached_tokens is not None:
            cached = (cached or 0) + usage.cached_tokens
        if usage.extra:
            extra = _sum_extra(extra or {}, usage.extra)
    return Usage(prompt, completion, cached, extra)


def _sum_extra(total: dict[str, Any], more: Mapping[str, Any]) -> dict[str, Any]:
    """``total`` with ``more`` added in: numbers summed, objects merged alike, anything
    else kept from the first that had it."""
    for key, value in more.items():
        have = total.get(key)
        if jsonutil.is_number(have) and jsonutil.is_number(value):
            total[key] = have + value
        elif isinstance(have, dict) and isinstance(value, Mapping):
            total[key] = _sum_extra(dict(have), value)
        elif key not in total:
            total[key] = dict(value) if isinstance(value, Mapping) else value
    return total


async def merged_batches(
    manager: ControlPlaneManager, gens: Sequence[Generation], request_id: str
) -> AsyncGenerator[list[Chunk], None]:
    """The streams of several prompts' requests as one (vLLM's answer to a completions
    request with several prompts, ``request_id``, held while they run): batches as each
    request's come, prompt ``k``'s choice ``i`` renumbered ``k·n + i``; each request's
    last chunk keeps its finish reason but not its usage, and the last of them all carries
    the sum (so the stream ends once every prompt's answer is whole). A failure of one ends
    it (the others are cancelled); closing it cancels them all."""
    with manager.reserve_request_id(request_id):
        async with contextlib.aclosing(_merged(manager, gens)) as merged:
            try:
                async for batch in merged:
                    yield batch
            except SageLLMError as exc:
                _said_of_request(exc, request_id)
                raise


async def _merged(
    manager: ControlPlaneManager, gens: Sequence[Generation]
) -> AsyncGenerator[list[Chunk], None]:
    n = _choices_per_prompt(gens[0])
    # (bounded: while the client reads nothing the requests' streams wait; unbounded,
    # every token of every prompt had piled up in memory)
    usages: list[Usage] = []
    merged = merge_streams([manager.stream_batches(gen.meta) for gen in gens])
    async with contextlib.aclosing(merged):
        async for k, batch in merged:
            out: list[Chunk] = []
            for chunk in batch:
                usage = chunk.usage
                if usage is not None:
                    usages.append(usage)
                    usage = sum_usage(usages) if len(usages) == len(gens) else None
                out.append(replace(chunk, index=k * n + chunk.index, usage=usage))
            yield out


async def stream_response(
    request: web.Request,
    manager: ControlPlaneManager,
    gens: Sequence[Generation],
    created: int,
    headers: dict[str, str],
    request_id: str,
) -> web.StreamResponse:
    """Relay ``gens`` (one, or one per prompt) as server-sent events (:func:`relay_stream`
    onto aiohttp's response). Errors before the first chunk raise (the error middleware
    answers with a JSON status); later ones end the stream with an error event."""
    resp = SSEResponse(headers={**SSE_HEADERS, **headers})

    async def prepared() -> StreamSink | None:
        tcp_nodelay(request.transport)
        try:
            await resp.prepare(request)
        except ConnectionResetError:
            return None
        return resp

    resp.stream_error = await relay_stream(prepared, manager, gens, created, request_id)
    return resp


async def relay_stream(
    open_sink: Callable[[], Awaitable[StreamSink | None]],
    manager: ControlPlaneManager,
    gens: Sequence[Generation],
    created: int,
    request_id: str,
) -> int | None:
    """Relay ``gens`` (one, or one per prompt: :func:`merged_batches`) as server-sent
    events under ``request_id`` onto the sink ``open_sink()`` opens once the first chunk
    is there (a failure before it raises, so the client gets a JSON error status
    instead); None from it means the client already left, and the request is cancelled.
    The request's timeout covers both parts: before the first chunk it is a JSON 504,
    after it an error event that ends the stream. Returns how it ended when not well:
    the code of the error event that ended it, or 499 when the client went away first."""
    gen = gens[0]
    fmt = fill_format(gen.chat, request_id, gen.model, created)
    batches = (
        manager.stream_batches(gen.meta)
        if len(gens) == 1
        else merged_batches(manager, gens, request_id)
    )
    end = _Ending(request_id)
    timeout_s = gen.timeout_s

    def expired() -> None:  # the requests' errors say so when they are cancelled for it
        assert timeout_s is not None
        for g in gens:
            manager.note_timed_out(g.request_id, timeout_s)

    try:
        try:
            async with manager.time_limit(timeout_s, expired):
                first = await anext(batches, None)
                if first is None:
                    await _final_usage(manager, gen, None, request_id)  # raises if cancelled
                end.sink = await open_sink()
                if end.sink is None:  # the client left before its first byte
                    _client_gone(request_id)
                    return CLIENT_GONE  # closing the stream below cancels the request
                end.opened = True
                await _relay(end, batches, first, manager, gen, fmt)
        except TimeoutError:
            if not end.opened:  # nothing sent yet
                raise _timeout_error(gen, request_id) from None
            if end.sink is not None:
                end.fail(_timeout_error(gen, request_id).to_openai())
            else:  # the stream had ended (or its client had gone)
                log.warning(
                    "request %s passed its %s s limit after its stream had ended; cancelling it",
                    request_id,
                    gen.timeout_s,
                    extra={"request_id": request_id},
                )
        await end.finish()
    except EngineRequestRejectedError as exc:  # before the first chunk: a JSON 400
        _as_the_client_named(exc, gen)
        raise
    finally:
        await batches.aclose()  # a request not finished by then is cancelled
    return end.error


def _lead_role(role: dict[str, Any], top: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """Give the gateway's role chunk what vLLM's role event carries, when the engine sent
    its first chunk with text and no role event (in-process engines): the prompt's
    ``prompt_token_ids`` (taken from ``top``) and, with ``continuous_usage_stats``, the
    usage before any output. What is left of ``top`` goes with the text."""
    usage = top.get("usage")
    if isinstance(usage, Mapping) and isinstance(prompt := usage.get("prompt_tokens"), int):
        role["usage"] = {"prompt_tokens": prompt, "total_tokens": prompt, "completion_tokens": 0}
    if "prompt_token_ids" not in top:
        return top
    role["prompt_token_ids"] = top["prompt_token_ids"]
    return {k: v for k, v in top.items() if k != "prompt_token_ids"} or None


class _Ending:
    """A stream's sink while open, and what is still to be written when it ends: the
    request's last chunk (held back so it leaves with the usage chunk), error events."""

    __slots__ = ("error", "opened", "request_id", "sink", "tail")

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        """The client's id of the request (of one with several prompts: the whole's)."""
        self.sink: StreamSink | None = None
        self.opened = False
        """Whether the sink was opened (the client has the status line)."""
        self.tail = b""
        self.error: int | None = None
        """The code of the error event in the tail, or :data:`CLIENT_GONE`; None while
        all is well."""

    def fail(self, body: dict[str, Any]) -> None:
        """End the stream with the error event of ``body`` (logged as such)."""
        error = body["error"]
        code = error.get("code")
        self.error = code if isinstance(code, int) else 500
        rid = self.request_id
        log.warning(
            "request %s failed (%s %s): %s (after its 200: the stream ended with an error "
            "event)", rid, code, error.get("type"), error.get("message"),
            extra={"request_id": rid},
        )  # fmt: skip
        self.tail += encode_event(body)

    async def finish(self) -> None:
        """Write the tail and ``[DONE]``, and end the body (once; nothing when the sink
        is gone or was never opened)."""
        sink, self.sink = self.sink, None
        if sink is not None:
            with contextlib.suppress(ConnectionResetError):
                await sink.write_eof(self.tail + DONE_EVENT)  # one write


async def _relay(
    end: _Ending,
    batches: AsyncIterator[list[Chunk]],
    batch: list[Chunk] | None,
    manager: ControlPlaneManager,
    gen: Generation,
    fmt: ResponseFormat,
) -> None:
    """Write the events of each batch of chunks as they come; what ends the stream (the
    last chunk, the usage chunk, an error event) is left in ``end.tail``."""
    resp = end.sink
    assert resp is not None
    seen: set[int] = set()
    usage: Usage | None = None
    ids = bool(gen.meta.extra_body.get("return_token_ids"))  # vLLM's: each choice's token ids
    # The events of the chunks that arrived together are written at once, in one write;
    # a request's last chunk goes out together with the usage chunk and [DONE].
    try:
        while batch is not None:
            out: list[bytes] = []  # joined once: a backlog's batch is long
            last = False
            for chunk in batch:
                usage = chunk.usage or usage
                top = chunk.top
                fields = chunk.fields
                first = fmt.chat and chunk.index not in seen
                engine_role = None
                if first and fields is not None and "role" in fields:  # not the assistant's:
                    engine_role = fields["role"]  # the engine's, said in our role event
                    fields = {k: v for k, v in fields.items() if k != "role"} or None
                content = (
                    chunk.text or chunk.finish_reason or chunk.logprobs is not None
                    or fields or chunk.extras
                )  # fmt: skip
                if first:
                    role = fmt.role_chunk()
                    choice = role["choices"][0]
                    choice["index"] = chunk.index
                    if engine_role is not None:
                        choice["delta"]["role"] = engine_role
                    if top and not content:  # the engine's own role event: its fields go
                        role.update(top)  # with ours (the usage so far, prompt_token_ids)
                        top = None
                    elif top:  # an engine with no role event of its own (in-process)
                        top = _lead_role(role, top)
                    out.append(encode_event(role))
                    seen.add(chunk.index)
                if content or top:
                    event = fmt.chunk(
                        chunk.text, chunk.finish_reason, index=chunk.index,
                        logprobs=chunk.logprobs, fields=fields, extras=chunk.extras,
                        token_ids=chunk.token_ids if ids else (), top=top,
                    )  # fmt: skip
                    out.append(encode_event(event))
                if chunk.usage is not None:  # the engine's last chunk
                    end.tail += b"".join(out)  # with the rest of its batch, it goes out last
                    out = []
                    last = chunk.finish_reason is not None
            if out:
                await resp.write(b"".join(out))
            if last and usage is not None:
                await _end_early(end, batches, gen, fmt, usage)
                return
            batch = await anext(batches, None)
        final = await _final_usage(manager, gen, usage, end.request_id)
        if gen.include_usage:
            end.tail += encode_event(fmt.usage_chunk(final))
    except ConnectionResetError:
        _client_gone(end.request_id)
        end.sink = None  # nothing more can be written
        end.error = CLIENT_GONE
    except SageLLMError as exc:
        _as_the_client_named(exc, gen)
        end.fail(exc.to_openai())
    except Exception:
        rid = end.request_id
        log.exception("stream of request %s failed", rid, extra={"request_id": rid})
        end.fail(error_body("internal server error", "internal_error", 500))


async def _end_early(
    end: _Ending,
    batches: AsyncIterator[list[Chunk]],
    gen: Generation,
    fmt: ResponseFormat,
    usage: Usage,
) -> None:
    """The engine's answer is whole (its last chunk, with the finish reason and the usage,
    is in ``end.tail``): the stream ends now, and the request's own ending (its result,
    metrics, the instance's accounting: the rest of ``batches``) comes after the client
    has every byte, not before. An error in that ending is logged; the answer stands."""
    if gen.include_usage:
        end.tail += encode_event(fmt.usage_chunk(usage))
    await end.finish()
    try:
        while await anext(batches, None) is not None:
            pass
    except SageLLMError as exc:
        log.warning(
            "request %s failed after its whole answer was sent: %s", end.request_id, exc,
            extra={"request_id": end.request_id},
        )  # fmt: skip
