"""Any :class:`~sage_llm.engines.base.EngineClient` served over HTTP, speaking vLLM's API.

The simulated engine runs behind this server so that the control plane, real routers and
benchmark tools can measure it exactly as they measure vLLM: OpenAI completions and chat
(SSE streams in vLLM's chunk format, usage chunk, ``[DONE]``), the vLLM PD protocol
(``kv_transfer_params`` prefill and decode legs), ``/metrics`` with vLLM's metric names,
and the probe endpoints other routers call (``/get_load``, ``/get_server_info``,
``/get_model_info``, ``/server_info``, ``/model_info``, ``/tokenize``, ``…/render``).

A client that disconnects mid-stream closes the engine's iterator, so the engine aborts.

As vLLM's server: an engine error carrying the HTTP status the engine answered with
(``EngineError.status``, e.g. an injected ``error=503`` fault) is answered with that status
and vLLM's error body for it; an engine stream that ends without a finish reason (the
``truncate`` fault: a connection dropped mid-answer) drops the client's connection there,
without the rest of the response (with no response at all when nothing was sent yet);
``/health`` answers 503 while the engine reports itself unhealthy; ``max_model_len``
(``/v1/models``, ``/tokenize``, the probes) is the engine's own limit unless one is given;
a choice ended by a stop string carries it as ``stop_reason``
(:class:`~sage_llm.sim.server_requests.ReportsStopReason`); chunks' logprobs are passed
on, and joined for a non-streaming answer; an unknown path or method is answered as
FastAPI answers it for vLLM, ``{"detail": "Not Found"}`` (404) or
``{"detail": "Method Not Allowed"}`` (405, with ``Allow``).

Cross-process PD KV release: ``POST /sim/kv/release {"request_id": ...}`` unpins a finished
prefill leg's KV. A simulated engine served here gets an :class:`HTTPKVReleaser`, so after
its decode leg pulled KV from ``remote_host:remote_port`` it posts there (in the background,
never delaying the decode), as NIXL notifies the producer.

SGLang's PD protocol (what sglang-router's PD mode sends): the router sends one body with
``bootstrap_host``, ``bootstrap_port`` and ``bootstrap_room`` to a prefill server and a
decode server at once. Served by a prefill-role engine, such a request is a prefill leg:
the engine computes the prompt and one token, pins the KV and files the leg's
``kv_transfer_params`` under the room (:class:`BootstrapRooms`). Served by a decode-role
engine, it first fetches the room from the prefill server,
``GET http://bootstrap_host:bootstrap_port/sim/bootstrap/<room>`` (a long poll that waits
for the leg), then decodes as a vLLM decode leg with those parameters (KV transfer time,
then decode, then ``/sim/kv/release`` to the prefill server). engine-sim serves the
bootstrap endpoint on its HTTP port, so that port is the prefill server's bootstrap port
(``--prefill http://host:PORT PORT`` for sglang-router). A general-role engine ignores the
bootstrap fields and runs the whole request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import replace
from http import HTTPStatus
from typing import Any

import aiohttp
from aiohttp import web

from sage_llm import tokens
from sage_llm.engines.base import Chunk, EngineClient, LoadsAdapters, Usage
from sage_llm.engines.sse import DONE_EVENT, ResponseFormat, encode_event
from sage_llm.errors import (
    EngineError,
    InvalidRequestError,
    ModelNotFoundError,
    PayloadTooLargeError,
    SageLLMError,
)
from sage_llm.httpserve import start_site, tcp_nodelay
from sage_llm.request_json import json_object, read_raw
from sage_llm.sim.clock import Clock, current_clock
from sage_llm.sim.faults import InjectedCrash
from sage_llm.sim.server_metrics import ReportsLoRARequests, ReportsQueueTime, ServerMetrics
from sage_llm.sim.server_pd import (
    BOOTSTRAP_PATH,
    BOOTSTRAP_WAIT_S,
    KV_RELEASE_PATH,
    Bootstrap,
    BootstrapRooms,
    HTTPKVReleaser,
    NotifiesRemoteKV,
    ReleasesKV,
    parse_bootstrap,
)
from sage_llm.sim.server_requests import (
    ParsedRequest,
    ReportsStopReason,
    check_model,
    checked_messages,
    checked_samples,
    generation_prompt,
    parse_request,
    prompt_token_ids,
    running_usage,
)
from sage_llm.sim.text import WORDS
from sage_llm.types import ExecutionInstanceType, host_port

_log = logging.getLogger(__name__)
_PIECE_CACHE_LIMIT = 1 << 16


MAX_BODY_BYTES = 64 << 20
"""The largest request body an engine-sim server reads (a larger one is a JSON 413)."""


_VLLM_ERROR_TYPES = {
    400: "BadRequestError",
    404: "NotFoundError",
    422: "UnprocessableEntityError",
    500: "InternalServerError",
    501: "NotImplementedError",
    503: "ServiceUnavailableError",
}
"""The error ``type`` vLLM 0.32's error handler writes for a status
(``create_error_response``); any other status gets its phrase, as its HTTPException
handler writes it (OpenAI's ``invalid_request_error`` & co. are the gateway's, not vLLM's)."""


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _error_body(exc: SageLLMError, status: int | None = None) -> dict[str, Any]:
    """vLLM's error body for ``exc``, answered with its ``http_status`` (or ``status``, the
    one an engine answered with, typed by its phrase as vLLM's HTTPException handler
    writes it)."""
    if status is None:
        status = exc.http_status
        kind = _VLLM_ERROR_TYPES.get(status) or _phrase(status)
    else:
        kind = _phrase(status)
    return {"error": {"message": exc.message, "type": kind, "param": exc.param, "code": status}}


def _error(exc: SageLLMError) -> web.Response:
    """The JSON error answer to ``exc``, in the body vLLM's server sends for it: an engine
    error with the HTTP status the engine answered (``EngineError.status``) gets that
    status (the type is the status's phrase, as vLLM's HTTPException handler writes it)."""
    status = exc.status if isinstance(exc, EngineError) else None
    if status is None or not 400 <= status < 600 or status == exc.http_status:
        return web.json_response(_error_body(exc), status=exc.http_status)
    return web.json_response(_error_body(exc, status), status=status)


def _failed(request: web.Request, exc: SageLLMError) -> web.Response:
    """The answer to a call that failed before any output: ``exc`` as vLLM's error body, or
    for an injected crash (``--faults "crash@pP"``) no answer at all (the connection drops,
    as a crashed engine's does)."""
    if isinstance(exc, InjectedCrash):
        _drop_connection(request)
        return web.Response()
    return _error(exc)


def _drop_connection(request: web.Request) -> None:
    """Close the client's connection as it is: what was written goes out, nothing more
    (a streamed body stays unterminated; a request answered with nothing gets nothing)."""
    transport = request.transport
    if transport is not None:
        transport.close()


class _Choice:
    """One choice of a whole answer, as its chunks make it."""

    __slots__ = ("extras", "finish", "ids", "logprobs", "texts")

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.ids: list[int] = []
        self.logprobs: list[Any] = []
        self.extras: dict[str, Any] = {}
        self.finish: str | None = None

    def add(self, chunk: Chunk) -> None:
        self.texts.append(chunk.text)
        self.ids.extend(chunk.token_ids)
        if chunk.logprobs is not None:
            self.logprobs.append(chunk.logprobs)
        if chunk.extras:
            self.extras.update(chunk.extras)
        self.finish = chunk.finish_reason or self.finish


def _join_logprobs(parts: list[Any]) -> Any:
    """A whole answer's logprobs from its chunks': their lists joined key by key."""
    if not parts:
        return None
    joined: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            joined.setdefault(key, []).extend(value)
    return joined


@web.middleware
async def _route_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """An unknown path (404) or method (405) answered as vLLM's FastAPI app answers it:
    ``{"detail": <the status's phrase>}``, with the ``Allow`` header of a 405."""
    exc = request.match_info.http_exception
    if exc is None:
        return await handler(request)
    headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
    return web.json_response({"detail": exc.reason}, status=exc.status, headers=headers)


async def _no_chunks() -> AsyncIterator[Chunk]:
    return
    yield  # pragma: no cover - makes this an async generator


def _layers(engine: EngineClient) -> tuple[object, ...]:
    """``engine`` and the engine a wrapper such as the fault injector wraps (its ``inner``):
    where a simulated engine's settings and PD extensions are found."""
    inner = getattr(engine, "inner", None)
    return (engine,) if inner is None else (engine, inner)


def _kv_engine(engine: EngineClient) -> ReleasesKV | None:
    """What unpins ``engine``'s prefill KV (through a wrapper), or None if it pins none."""
    return next((e for e in _layers(engine) if isinstance(e, ReleasesKV)), None)


def _engine_setting(engine: EngineClient, name: str) -> int | None:
    """An integer setting of a simulated engine's config (through wrappers such as the
    fault injector), or None for an engine without one."""
    for candidate in _layers(engine):
        value = getattr(getattr(candidate, "config", None), name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _engine_role(engine: EngineClient) -> ExecutionInstanceType | None:
    """A simulated engine's PD role (through wrappers such as the fault injector), or None
    for a general or unknown engine."""
    for candidate in _layers(engine):
        role = getattr(getattr(candidate, "config", None), "role", None)
        if isinstance(role, ExecutionInstanceType) and role in _PD_ROLES:
            return role
    return None


_PD_ROLES = (ExecutionInstanceType.PREFILLING, ExecutionInstanceType.DECODING)
_ROLE_MODE = {ExecutionInstanceType.PREFILLING: "prefill", ExecutionInstanceType.DECODING: "decode"}


async def _aclose(it: AsyncIterator[Chunk]) -> None:
    close = getattr(it, "aclose", None)
    if close is not None:
        await close()


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sage-llm")
    except PackageNotFoundError:
        return "0.0.0"


class _EngineServer:
    """Route handlers bound to one engine; ``create_engine_app`` wires them."""

    def __init__(
        self,
        engine: EngineClient,
        model_name: str,
        clock: Clock | None,
        max_model_len: int | None,
        model_root: str | None = None,
        lora_modules: Mapping[str, str] | None = None,
    ) -> None:
        self.engine = engine
        self.model_name = model_name
        self.model_root = model_root or model_name
        """The model itself (vLLM's ``--model``), which ``/v1/models`` gives as ``root``
        beside the served name."""
        self.lora_modules = dict(lora_modules or {})
        """The LoRA adapters served beside the model (vLLM's ``--lora-modules``): name →
        path (``root`` in their ``/v1/models`` cards)."""
        if max_model_len is None:
            max_model_len = _engine_setting(engine, "max_model_len")
        self.max_model_len = max_model_len
        self.tp_size = _engine_setting(engine, "tp") or 1
        self._clock = clock
        self.metrics = ServerMetrics(model_name)
        self.version = _package_version()
        self._pieces: dict[int, str] = {}
        """Pieces of text tokenized here (recent ones: the cache is bounded)."""
        pieces = getattr(engine, "generated_pieces", None) or [f" {w}" for w in WORDS]
        self._generated = {tokens.token_id(piece): piece for piece in pieces}
        """Every piece the simulated engine generates, so its output detokenizes."""
        self._queue_source = engine if isinstance(engine, ReportsQueueTime) else None
        self._stop_source = engine if isinstance(engine, ReportsStopReason) else None
        self.role = _engine_role(engine)
        self.rooms = BootstrapRooms(on_expire=self._release_expired)
        self.bootstrap_wait_s = BOOTSTRAP_WAIT_S
        self._session: aiohttp.ClientSession | None = None
        self._kv = _kv_engine(engine)
        self._live: dict[str, int] = {}
        """Request ids in flight here, by how many requests carry each."""

    def _release_expired(self, params: Mapping[str, Any]) -> None:
        request_id = params.get("remote_request_id")
        if self._kv is not None and isinstance(request_id, str):
            self._kv.release_kv(request_id)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def clock(self) -> Clock:
        if self._clock is None:
            self._clock = current_clock()
        return self._clock

    def _created(self) -> int:
        clock = self.clock
        return int(clock.to_datetime(clock.now()).timestamp())

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            raw = await read_raw(request)  # as the gateway reads one
        except web.HTTPRequestEntityTooLarge:
            raise PayloadTooLargeError(
                f"request body larger than {request.client_max_size} bytes"
            ) from None
        return json_object(raw)

    # --- generation ----------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        arrival = self.clock.now()
        try:
            body = await self._body(request)
            parsed = parse_request(
                body,
                chat=chat,
                model_name=self.model_name,
                max_model_len=self.max_model_len,
                request_id=request.headers.get("X-Request-Id") or uuid.uuid4().hex,
                adapters=self.lora_modules,
            )
            boot = parse_bootstrap(body) if self.role is not None else None
        except SageLLMError as exc:
            return _error(exc)
        fmt = ResponseFormat(
            chat=chat, request_id=parsed.req.request_id, model=parsed.req.model,
            created=self._created(),
        )  # fmt: skip
        given = parsed.req.request_id
        live = self._live
        if given in live:  # as vLLM: a client's id need not be unique, the engine's is
            unique = f"{given}-{uuid.uuid4().hex[:8]}"
            parsed = replace(parsed, req=replace(parsed.req, request_id=unique))
        live[given] = live.get(given, 0) + 1
        try:
            return await self._serve(request, parsed, fmt, arrival, boot)
        finally:
            if live[given] == 1:
                del live[given]
            else:
                live[given] -= 1

    async def _serve(
        self,
        request: web.Request,
        parsed: ParsedRequest,
        fmt: ResponseFormat,
        arrival: float,
        boot: Bootstrap | None,
    ) -> web.StreamResponse:
        if boot is not None and self.role is ExecutionInstanceType.PREFILLING:
            return await self._sglang_prefill(request, parsed, fmt, arrival, boot)
        if boot is not None and parsed.pd_role is None:  # a DECODING engine
            try:
                params = await self._fetch_room(boot)
            except SageLLMError as exc:
                return _error(exc)
            parsed = replace(parsed, req=replace(parsed.req, kv_transfer_params=params))
        if parsed.pd_role == "prefill":
            if parsed.stream:  # its kv_transfer_params come with a whole answer only
                return _error(
                    InvalidRequestError(
                        "a PD prefill leg (kv_transfer_params.do_remote_decode) is answered "
                        "in one piece, with the kv_transfer_params for the decode leg: send "
                        "it with stream: false",
                        param="stream",
                    )
                )
            return await self._prefill(request, parsed, fmt, arrival)
        if parsed.stream:
            return await self._stream(request, parsed, fmt, arrival)
        return await self._complete(request, parsed, fmt, arrival)

    async def _prefill(
        self, request: web.Request, parsed: ParsedRequest, fmt: ResponseFormat, arrival: float
    ) -> web.StreamResponse:
        """A PD prefill leg: always a non-streaming answer of one token plus the engine's
        ``kv_transfer_params`` (what vLLM's proxy sends and expects)."""
        try:
            handle = await self.engine.prefill(parsed.req)
        except SageLLMError as exc:
            return _failed(request, exc)
        now = self.metrics.observe_token(arrival, None, self.clock.now())
        first = handle.first_token
        usage = Usage(handle.prompt_tokens, 1, handle.cached_tokens)
        self._observe(parsed, arrival, [now], "length", usage)
        body = fmt.completion(first.text if first else "", "length", usage)
        body["kv_transfer_params"] = dict(handle.params)
        return web.json_response(body)

    async def _sglang_prefill(
        self,
        request: web.Request,
        parsed: ParsedRequest,
        fmt: ResponseFormat,
        arrival: float,
        boot: Bootstrap,
    ) -> web.StreamResponse:
        """An SGLang prefill leg: compute the prompt and one token, pin the KV and file the
        leg's parameters under its room; answer with that one token (streamed when asked)."""
        try:
            handle = await self.engine.prefill(parsed.req)
        except SageLLMError as exc:
            self.rooms.fail(boot.room, exc.message)
            return _failed(request, exc)
        except asyncio.CancelledError:
            self.rooms.fail(boot.room, "the prefill leg was aborted")
            raise
        self.rooms.publish(boot.room, handle.params)
        usage = Usage(handle.prompt_tokens, 1, handle.cached_tokens)
        first = handle.first_token or Chunk("", (), "length", usage)
        if not parsed.stream:
            now = self.metrics.observe_token(arrival, None, self.clock.now())
            self._observe(parsed, arrival, [now], "length", usage)
            return web.json_response(fmt.completion(first.text, "length", usage))
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        tcp_nodelay(request.transport)
        await resp.prepare(request)
        await self._relay(request, resp, _no_chunks(), first, parsed, fmt, arrival)
        return resp

    async def _fetch_room(self, boot: Bootstrap) -> dict[str, Any]:
        """A decode leg's ``kv_transfer_params``, from the prefill server's bootstrap room."""
        if boot.host is None or boot.port is None:
            raise InvalidRequestError(
                "an SGLang decode leg needs bootstrap_host and bootstrap_port (engine-sim "
                "serves the bootstrap on its HTTP port: give sglang-router "
                "--prefill http://HOST:PORT PORT)",
                param="bootstrap_port",
            )
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.bootstrap_wait_s + 10.0)
            )
        path = BOOTSTRAP_PATH.format(room=boot.room)
        url = f"http://{host_port(boot.host, boot.port)}{path}"
        try:
            async with self._session.get(
                url, params={"timeout_s": repr(self.bootstrap_wait_s)}
            ) as resp:
                body = await resp.json(content_type=None)
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise EngineError(f"bootstrap server {url} failed: {exc!r}") from None
        params = body.get("kv_transfer_params") if isinstance(body, dict) else None
        if status != 200 or not isinstance(params, dict):
            error = body.get("error") if isinstance(body, dict) else None
            message = error.get("message") if isinstance(error, dict) else None
            raise EngineError(
                f"bootstrap room {boot.room} at {url}: HTTP {status}: {message or repr(body)}"
            )
        return params

    async def bootstrap(self, request: web.Request) -> web.Response:
        """``GET /sim/bootstrap/<room>[?timeout_s=S]``: wait for the room's prefill leg and
        hand its ``kv_transfer_params`` to the decode server (once)."""
        try:
            raw = request.match_info["room"]
            if not (raw.isascii() and raw.isdigit()) or int(raw) >= 1 << 64:
                raise InvalidRequestError("room must be an integer in [0, 2^64)", param="room")
            try:
                timeout = float(request.query.get("timeout_s", self.bootstrap_wait_s))
            except ValueError:
                raise InvalidRequestError("timeout_s must be a number") from None
            if not 0 < timeout <= 600:
                raise InvalidRequestError("timeout_s must be in (0, 600]", param="timeout_s")
            params = await self.rooms.take(int(raw), timeout)
        except SageLLMError as exc:
            return _error(exc)
        return web.json_response({"room": int(raw), "kv_transfer_params": params})

    async def _complete(
        self, request: web.Request, parsed: ParsedRequest, fmt: ResponseFormat, arrival: float
    ) -> web.Response:
        choices: dict[int, _Choice] = {}  # by index (n > 1: one per sample)
        times: list[float] = []
        top: dict[str, Any] = {}
        finish: str | None = None
        usage: Usage | None = None
        it = self.engine.generate(parsed.req)
        try:
            async for chunk in it:
                last = times[-1] if times else None
                times.append(self.metrics.observe_token(arrival, last, self.clock.now()))
                got = choices.get(chunk.index)
                if got is None:
                    got = choices[chunk.index] = _Choice()
                got.add(chunk)
                top.update(chunk.top or {})
                finish = chunk.finish_reason or finish
                usage = chunk.usage or usage
        except SageLLMError as exc:
            return _failed(request, exc)
        finally:  # (a client gone: the engine aborts it, not counted, as vLLM counts none)
            await _aclose(it)
        if finish is None:  # the engine's stream broke off: so does the connection
            _drop_connection(request)
            return web.Response()
        usage = usage or parsed.estimate_usage(len(times))
        self._observe(parsed, arrival, times, finish, usage)
        body = fmt.completion("", finish, usage)
        (template,) = body["choices"]
        body["choices"] = []
        body.update(top)
        for index in sorted(choices):
            got = choices[index]
            choice = {**template, "index": index}
            if fmt.chat:
                choice["message"] = {**template["message"], "content": "".join(got.texts)}
            else:
                choice["text"] = "".join(got.texts)
            choice["logprobs"] = _join_logprobs(got.logprobs)
            choice["finish_reason"] = got.finish or finish
            choice.update(got.extras)  # the engine's other choice fields (prompt_logprobs)
            # the stop string or token that ended it: as the engine's chunk says it, or, for
            # an answer of one choice, as it says of the request (engines that keep it apart)
            stop = got.extras.get("stop_reason")
            if stop is None and len(choices) == 1:
                stop = self._stop_reason(parsed, finish)
            choice["stop_reason"] = stop
            if parsed.token_ids:
                choice["token_ids"] = got.ids
                if not fmt.chat:
                    choice["prompt_token_ids"] = prompt_token_ids(parsed.req, self._learn)
            body["choices"].append(choice)
        if parsed.token_ids and fmt.chat:
            body["prompt_token_ids"] = prompt_token_ids(parsed.req, self._learn)
        return web.json_response(body)

    async def _stream(
        self, request: web.Request, parsed: ParsedRequest, fmt: ResponseFormat, arrival: float
    ) -> web.StreamResponse:
        it = self.engine.generate(parsed.req)
        try:
            try:
                chunk: Chunk | None = await anext(it)
            except StopAsyncIteration:  # broke off before any output: so does the connection
                _drop_connection(request)
                return web.Response()
            except SageLLMError as exc:
                return _failed(request, exc)
            resp = web.StreamResponse(
                headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
            )
            tcp_nodelay(request.transport)
            try:
                await resp.prepare(request)
            except ConnectionResetError:
                # the client went before the answer began: its connection was closed in
                # the same turn of the loop as the first chunk came (the cancellation
                # of this handler, which would have come next, is the usual way)
                return resp
            await self._relay(request, resp, it, chunk, parsed, fmt, arrival)
            return resp
        finally:  # (a client gone: the engine aborts it, not counted, as vLLM counts none)
            await _aclose(it)

    async def _relay(
        self,
        request: web.Request,
        resp: web.StreamResponse,
        it: AsyncIterator[Chunk],
        chunk: Chunk | None,
        parsed: ParsedRequest,
        fmt: ResponseFormat,
        arrival: float,
    ) -> None:
        times: list[float] = []
        finish: str | None = None
        usage: Usage | None = None
        produced = 0
        try:
            started: set[int] = set()  # the choices whose first chunk went out
            if fmt.chat:  # a role chunk for each choice, as vLLM starts a chat stream
                for index in range(checked_samples(parsed.req.extra.get("n"))):
                    role = fmt.role_chunk()
                    role["choices"][0]["index"] = index
                    if parsed.continuous_usage:
                        role["usage"] = running_usage(parsed.prompt_tokens, 0)
                    if parsed.token_ids and index == 0:
                        role["prompt_token_ids"] = prompt_token_ids(parsed.req, self._learn)
                    await resp.write(encode_event(role))
                    started.add(index)
            while chunk is not None:
                last = times[-1] if times else None
                times.append(self.metrics.observe_token(arrival, last, self.clock.now()))
                finish = chunk.finish_reason or finish
                usage = chunk.usage or usage
                produced += len(chunk.token_ids) or 1
                index = chunk.index
                body = fmt.chunk(
                    chunk.text, chunk.finish_reason, index=index, logprobs=chunk.logprobs
                )
                choice = body["choices"][0]
                if chunk.finish_reason is not None:
                    stop = (chunk.extras or {}).get("stop_reason")
                    if stop is None and not index:  # (choice 0's: the request's own)
                        stop = self._stop_reason(parsed, chunk.finish_reason)
                    choice["stop_reason"] = stop
                if parsed.continuous_usage:
                    body["usage"] = running_usage(parsed.prompt_tokens, produced)
                if parsed.token_ids:
                    choice["token_ids"] = list(chunk.token_ids)
                    if index not in started:  # a completion's first chunk of a choice
                        choice["prompt_token_ids"] = prompt_token_ids(parsed.req, self._learn)
                started.add(index)
                await resp.write(encode_event(body))
                try:
                    chunk = await anext(it)
                except StopAsyncIteration:
                    chunk = None
            if finish is None:  # the engine's stream broke off: so does the connection
                _drop_connection(request)
                return
            usage = usage or parsed.estimate_usage(len(times))
            if parsed.include_usage:
                await resp.write(encode_event(fmt.usage_chunk(usage)))
        except SageLLMError as exc:  # after the first chunk: report it in the stream
            with contextlib.suppress(ConnectionResetError):
                await resp.write(encode_event(_error_body(exc)))
        except ConnectionResetError:  # the client went away; the caller closes the iterator
            return
        else:
            self._observe(parsed, arrival, times, finish, usage)
        with contextlib.suppress(ConnectionResetError):
            await resp.write(DONE_EVENT)
            await resp.write_eof()

    def _observe(
        self,
        parsed: ParsedRequest,
        arrival: float,
        times: list[float],
        finish: str,
        usage: Usage,
    ) -> None:
        source = self._queue_source
        queue = None if source is None else source.queue_time_s(parsed.req.request_id)
        self.metrics.observe_request(arrival, times, finish, usage, queue_s=queue)

    def _stop_reason(self, parsed: ParsedRequest, finish: str | None) -> str | int | None:
        """The stop string or token id that ended the request, for a choice's
        ``stop_reason``."""
        source = self._stop_source
        if finish != "stop" or source is None:
            return None
        return source.stop_reason(parsed.req.request_id)

    async def kv_release(self, request: web.Request) -> web.Response:
        """``POST /sim/kv/release {"request_id"}``: unpin a prefill leg's KV."""
        try:
            body = await self._body(request)
            request_id = body.get("request_id")
            if not isinstance(request_id, str) or not request_id:
                raise InvalidRequestError(
                    "request_id must be a non-empty string", param="request_id"
                )
            if (kv := self._kv) is None:
                raise InvalidRequestError("this engine does not pin KV for PD")
        except SageLLMError as exc:
            return _error(exc)
        released = kv.release_kv(request_id)
        return web.json_response({"request_id": request_id, "released": released})

    # --- information endpoints -----------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        """200 while the engine reports itself healthy, else 503 (as vLLM's ``/health``)."""
        try:
            healthy = await self.engine.health()
        except SageLLMError:
            healthy = False
        return web.Response(status=200 if healthy else 503)

    async def version_info(self, request: web.Request) -> web.Response:
        return web.json_response({"version": self.version})

    async def models(self, request: web.Request) -> web.Response:
        created = self._created()
        cards = [self._card(self.model_name, self.model_root, None, created)]
        cards += [  # as vLLM lists its --lora-modules: parent, and no max_model_len
            self._card(name, path, self.model_name, created)
            for name, path in self.lora_modules.items()
        ]
        return web.json_response({"object": "list", "data": cards})

    def _card(self, name: str, root: str, parent: str | None, created: int) -> dict[str, Any]:
        return {  # vLLM's ModelCard, field for field (its one ModelPermission included)
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "vllm",
            "root": root,
            "parent": parent,
            "max_model_len": self.max_model_len if parent is None else None,
            "permission": [
                {
                    "id": f"modelperm-{uuid.uuid4().hex}",
                    "object": "model_permission",
                    "created": created,
                    "allow_create_engine": False,
                    "allow_sampling": True,
                    "allow_logprobs": True,
                    "allow_search_indices": False,
                    "allow_view": True,
                    "allow_fine_tuning": False,
                    "organization": "*",
                    "group": None,
                    "is_blocking": False,
                }
            ],
        }

    async def load_lora_adapter(self, request: web.Request) -> web.Response:
        """vLLM's ``POST /v1/load_lora_adapter`` (served as if started with
        ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``), with its refusals."""
        try:
            body = await self._body(request)
            name, path = body.get("lora_name"), body.get("lora_path")
            if not name or not path or not isinstance(name, str) or not isinstance(path, str):
                raise InvalidRequestError(
                    "Both 'lora_name' and 'lora_path' must be provided.", param="lora_name"
                )
            if name == self.model_name:
                raise InvalidRequestError(
                    f"The lora adapter '{name}' conflicts with the served model name.",
                    param="lora_name",
                )
            if name in self.lora_modules:
                raise InvalidRequestError(
                    f"The lora adapter '{name}' has already been loaded.", param="lora_name"
                )
            engine = self._adapter_engine()
            if engine is not None:
                await engine.load_lora_adapter(name, path)
        except SageLLMError as exc:
            return _error(exc)
        self.lora_modules[name] = path
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_lora_adapter(self, request: web.Request) -> web.Response:
        """vLLM's ``POST /v1/unload_lora_adapter``, with its refusals."""
        try:
            body = await self._body(request)
            name = body.get("lora_name")
            if not name or not isinstance(name, str):
                raise InvalidRequestError(
                    "'lora_name' needs to be provided to unload a LoRA adapter.",
                    param="lora_name",
                )
            if name not in self.lora_modules:
                raise ModelNotFoundError(
                    f"The lora adapter '{name}' cannot be found.", param="lora_name"
                )
            engine = self._adapter_engine()
            if engine is not None:
                await engine.unload_lora_adapter(name)
        except SageLLMError as exc:
            return _error(exc)
        del self.lora_modules[name]
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")

    def _adapter_engine(self) -> LoadsAdapters | None:
        return next((e for e in _layers(self.engine) if isinstance(e, LoadsAdapters)), None)

    async def metrics_text(self, request: web.Request) -> web.Response:
        try:
            stats = await self.engine.stats()
        except SageLLMError as exc:
            return _error(exc)
        source = next((e for e in _layers(self.engine) if isinstance(e, ReportsLoRARequests)), None)
        lora = None if source is None else source.lora_requests()
        return web.Response(
            body=self.metrics.render(stats, lora),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )

    async def _load(self) -> tuple[int, int, int]:
        stats = await self.engine.stats()
        used = 0
        if stats.num_gpu_blocks and stats.block_size:
            used = round(stats.kv_usage * stats.num_gpu_blocks * stats.block_size)
        return stats.running, stats.waiting, used

    async def get_load(self, request: web.Request) -> web.Response:
        try:
            running, waiting, used = await self._load()
        except SageLLMError as exc:
            return _error(exc)
        entry = {
            "dp_rank": 0,
            "num_reqs": running + waiting,
            "num_waiting_reqs": waiting,
            "num_tokens": used,
            "load": running + waiting,
        }
        return web.json_response([entry])

    async def load(self, request: web.Request) -> web.Response:
        try:
            running, waiting, _ = await self._load()
        except SageLLMError as exc:
            return _error(exc)
        return web.json_response({"server_load": running + waiting})

    def _model_info(self) -> dict[str, Any]:
        return {
            "model_path": self.model_root,
            "tokenizer_path": self.model_name,
            "served_model_name": self.model_name,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": "default",
            "has_image_understanding": False,
            "has_audio_understanding": False,
            "model_type": "sage-sim",
            "architectures": ["SimulatedForCausalLM"],
            "max_model_len": self.max_model_len,
        }

    async def model_info(self, request: web.Request) -> web.Response:
        return web.json_response(self._model_info())

    async def server_info(self, request: web.Request) -> web.Response:
        try:
            stats = await self.engine.stats()
        except SageLLMError as exc:
            return _error(exc)
        capacity = (stats.num_gpu_blocks or 0) * (stats.block_size or 0)
        info = {
            "model_path": self.model_root,
            "served_model_name": self.model_name,
            "tokenizer_path": self.model_name,
            "version": self.version,
            "dp_size": 1,
            "tp_size": self.tp_size,
            "context_length": self.max_model_len,
            "max_total_num_tokens": capacity,
            "max_total_tokens": capacity,
            "page_size": stats.block_size or 1,
            # SGLang's words: "prefill" / "decode" for a PD role, else "null"
            "disaggregation_mode": "null" if self.role is None else _ROLE_MODE[self.role],
            "internal_states": [{"load": stats.running + stats.waiting}],
            "engine": "sage-llm-sim",
            "vllm_config": f"model={self.model_name!r}, max_model_len={self.max_model_len}",
        }
        return web.json_response(info)

    # --- tokenizer endpoints -------------------------------------------------------------

    def _learn(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in tokens.split(text):
            tid = tokens.token_id(piece)
            ids.append(tid)
            if tid not in self._pieces:
                if len(self._pieces) >= _PIECE_CACHE_LIMIT:
                    del self._pieces[next(iter(self._pieces))]
                self._pieces[tid] = piece
        return ids

    def _prompt_text(self, body: Mapping[str, Any]) -> str | list[int]:
        check_model(body.get("model"), self.model_name, self.lora_modules)
        if "messages" in body:  # checked as a chat request's are
            return tokens.chat_prompt_text(
                checked_messages(body["messages"]), generation_prompt=generation_prompt(body)
            )
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            return prompt
        if isinstance(prompt, list) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            return [int(t) for t in prompt]
        raise InvalidRequestError("prompt must be a string or a list of token ids", param="prompt")

    async def tokenize(self, request: web.Request) -> web.Response:
        try:
            body = await self._body(request)
            prompt = self._prompt_text(body)
        except SageLLMError as exc:
            return _error(exc)
        ids = self._learn(prompt) if isinstance(prompt, str) else prompt
        out: dict[str, Any] = {
            "count": len(ids),
            "max_model_len": self.max_model_len,
            "tokens": ids,
            "token_strs": None,
        }
        if body.get("return_token_strs") and isinstance(prompt, str):
            out["token_strs"] = tokens.split(prompt)
        return web.json_response(out)

    async def detokenize(self, request: web.Request) -> web.Response:
        try:
            body = await self._body(request)
            if body.get("model") is not None:
                check_model(body.get("model"), self.model_name, self.lora_modules)
            ids = body.get("tokens")
            if not isinstance(ids, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in ids
            ):
                raise InvalidRequestError("tokens must be a list of integers", param="tokens")
            pieces = [self._pieces.get(t) or self._generated.get(t) for t in ids]
            unknown = [t for t, piece in zip(ids, pieces, strict=True) if piece is None]
            if unknown:
                raise InvalidRequestError(
                    f"token ids {unknown[:5]} are unknown: the simulated tokenizer can only "
                    "detokenize the ids it generates and those of text this server has "
                    "tokenized",
                    param="tokens",
                )
        except SageLLMError as exc:
            return _error(exc)
        return web.json_response({"prompt": "".join(p for p in pieces if p is not None)})

    async def render(self, request: web.Request) -> web.Response:
        try:
            body = await self._body(request)
            prompt = self._prompt_text(body)
        except SageLLMError as exc:
            return _error(exc)
        ids = self._learn(prompt) if isinstance(prompt, str) else prompt
        text = prompt if isinstance(prompt, str) else None
        return web.json_response(
            {"model": self.model_name, "prompt": text, "token_ids": ids, "features": None}
        )


def create_engine_app(
    engine: EngineClient,
    *,
    model_name: str,
    clock: Clock | None = None,
    max_model_len: int | None = None,
    model_root: str | None = None,
    lora_modules: Mapping[str, str] | None = None,
) -> web.Application:
    """An aiohttp application serving ``engine`` as model ``model_name`` with vLLM's API.

    ``clock`` times the latency histograms (default: the clock of the running loop);
    ``max_model_len`` bounds prompt + max_tokens and is the limit the server reports
    (default: the engine's ``config.max_model_len`` when it has one, else unbounded);
    ``model_root`` is the model itself, ``root`` in ``/v1/models`` (default: the name);
    ``lora_modules`` the LoRA adapters served beside it (name → path, as vLLM's
    ``--lora-modules``): a request may name one, and the engine is asked for it.
    """
    if not model_name:
        raise ValueError("model_name must not be empty")
    if max_model_len is not None and max_model_len <= 0:
        raise ValueError("max_model_len must be positive")
    if lora_modules and model_name in lora_modules:
        raise ValueError(f"LoRA adapter {model_name!r} has the model's own name")
    srv = _EngineServer(engine, model_name, clock, max_model_len, model_root, lora_modules)
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_route_errors])
    app.router.add_post("/v1/completions", srv.completions)
    app.router.add_post("/v1/chat/completions", srv.chat)
    app.router.add_post("/v1/completions/render", srv.render)
    app.router.add_post("/v1/chat/completions/render", srv.render)
    app.router.add_get("/v1/models", srv.models)
    app.router.add_post("/v1/load_lora_adapter", srv.load_lora_adapter)
    app.router.add_post("/v1/unload_lora_adapter", srv.unload_lora_adapter)
    app.router.add_get("/health", srv.health)
    app.router.add_get("/ping", srv.health)  # vLLM's SageMaker-style probe, GET and POST
    app.router.add_post("/ping", srv.health)
    app.router.add_get("/version", srv.version_info)
    app.router.add_get("/metrics", srv.metrics_text)
    app.router.add_post("/tokenize", srv.tokenize)
    app.router.add_post("/detokenize", srv.detokenize)
    app.router.add_get("/get_load", srv.get_load)
    app.router.add_get("/load", srv.load)
    app.router.add_post(KV_RELEASE_PATH, srv.kv_release)
    app.router.add_get(BOOTSTRAP_PATH, srv.bootstrap)

    async def _close_server(_: web.Application) -> None:
        await srv.aclose()

    app.on_cleanup.append(_close_server)
    notifier = next((e for e in _layers(engine) if isinstance(e, NotifiesRemoteKV)), None)
    if notifier is not None and notifier.remote_releaser is None:
        releaser = HTTPKVReleaser()
        notifier.remote_releaser = releaser

        async def _close_releaser(_: web.Application) -> None:
            await releaser.aclose()
            if notifier.remote_releaser is releaser:
                notifier.remote_releaser = None

        app.on_cleanup.append(_close_releaser)
    for path in ("/get_server_info", "/server_info"):
        app.router.add_get(path, srv.server_info)
    for path in ("/get_model_info", "/model_info"):
        app.router.add_get(path, srv.model_info)
    return app


async def start_engine_server(
    engine: EngineClient,
    *,
    model_name: str,
    host: str = "127.0.0.1",
    port: int = 0,
    clock: Clock | None = None,
    max_model_len: int | None = None,
    shutdown_timeout: float = 5.0,
    model_root: str | None = None,
    lora_modules: Mapping[str, str] | None = None,
) -> tuple[web.AppRunner, int]:
    """Start serving; returns the runner (``await runner.cleanup()`` to stop) and the bound
    port (``port=0`` picks a free one). Handlers are cancelled when their client goes."""
    app = create_engine_app(
        engine, model_name=model_name, clock=clock, max_model_len=max_model_len,
        model_root=model_root, lora_modules=lora_modules,
    )  # fmt: skip
    return await start_site(app, host, port, shutdown_timeout_s=shutdown_timeout)


async def serve_engine(
    engine: EngineClient,
    *,
    model_name: str,
    host: str = "127.0.0.1",
    port: int = 8001,
    clock: Clock | None = None,
    max_model_len: int | None = None,
    close_engine: bool = False,
    model_root: str | None = None,
    lora_modules: Mapping[str, str] | None = None,
) -> None:
    """Serve ``engine`` until the calling task is cancelled. With ``close_engine`` the
    engine is closed first then, so that the requests in flight end at once (a stream with
    an error event and ``[DONE]``) rather than the server waiting for them."""
    runner, _ = await start_engine_server(
        engine, model_name=model_name, host=host, port=port, clock=clock,
        max_model_len=max_model_len, model_root=model_root, lora_modules=lora_modules,
    )  # fmt: skip
    try:
        await asyncio.Event().wait()
    finally:
        if close_engine:
            await engine.aclose()
        await runner.cleanup()


__all__ = [
    "BOOTSTRAP_PATH",
    "KV_RELEASE_PATH",
    "Bootstrap",
    "BootstrapRooms",
    "HTTPKVReleaser",
    "NotifiesRemoteKV",
    "ReleasesKV",
    "ReportsQueueTime",
    "ReportsStopReason",
    "create_engine_app",
    "parse_bootstrap",
    "serve_engine",
    "start_engine_server",
]
