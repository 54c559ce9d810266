"""The HTTP engine client: vLLM, SGLang or any OpenAI-compatible server.

One :class:`HTTPEngineClient` per instance, all sharing one ``aiohttp.ClientSession``
(made with :func:`make_session` and owned by whoever made it). A request whose
:attr:`~sage_llm.engines.base.EngineRequest.stream` is set (the control plane's default
for every request) is streamed from the engine (``stream: true`` with
``stream_options.include_usage``), so the control plane sees tokens as they come; one
without it is sent with ``stream: false`` and its answer turned into chunks at the end (the
first-token and idle limits do not apply to it: nothing comes before the end). Either way a
cancelled consumer closes the connection, which is how vLLM and SGLang learn to abort a
request.

Errors (all :class:`~sage_llm.errors.EngineError`; ``retryable`` is True only while the
engine has produced nothing for the request):

* cannot connect, or the connection drops → :class:`~sage_llm.errors.EngineConnectionError`
* HTTP status ≥ 400 → ``EngineError(status=...)``, retryable for 401, 403, 404, 408, 429
  and 5xx (the instance's fault, or overload), except the engine's refusals of the request
  itself: 400, 413 and 422, and a 404 or 405 without an error object from a generation route
  (no such route: its model is not served for it) →
  :class:`~sage_llm.errors.EngineRequestRejectedError`, not retryable
* a malformed stream, or one that ends without ``finish_reason`` →
  :class:`~sage_llm.errors.EngineStreamError`
* an ``error`` object inside the stream → ``EngineError``
* a :class:`HTTPTimeouts` limit passed → :class:`~sage_llm.errors.EngineTimeoutError`
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast, get_args

import aiohttp

from sage_llm import jsonutil
from sage_llm.engines.base import Chunk, EngineRequest, EngineStats, KVHandle
from sage_llm.engines.fastclient import (
    EngineConnector,
    FastPool,
    FastResponse,
    UnsupportedEncodingError,
)
from sage_llm.engines.metrics_scrape import scrape_text_to_stats
from sage_llm.engines.sse import (
    REJECTED_CODES,
    SSEDecoder,
    StreamAssembler,
    chunks_from_completion,
    error_from_body,
    error_param_from_body,
    parse_usage,
    stream_error,
)
from sage_llm.errors import (
    EngineConnectionError,
    EngineError,
    EngineRequestRejectedError,
    EngineStreamError,
    EngineTimeoutError,
    InvalidRequestError,
)
from sage_llm.types import ExecutionInstance

Dialect = Literal["vllm", "sglang", "openai"]
_DIALECTS: tuple[str, ...] = get_args(Dialect)

PD_INSTRUCTIONS = (
    'start vLLM with --kv-transfer-config \'{"kv_connector":"NixlConnector","kv_role":"kv_both"}\''
)


def prefill_kv_transfer_params() -> dict[str, Any]:
    """The ``kv_transfer_params`` a vLLM PD prefill leg sends (a fresh dict each call)."""
    return {
        "do_remote_decode": True,
        "do_remote_prefill": False,
        "remote_engine_id": None,
        "remote_block_ids": None,
        "remote_host": None,
        "remote_port": None,
    }


@dataclass(frozen=True, slots=True)
class HTTPTimeouts:
    """Limits, in seconds; ``None`` means no limit.

    ``connect_s`` bounds opening the TCP connection; ``first_token_s`` the time from sending
    a request to its first output (and the whole of a PD prefill leg); ``idle_s`` the gap
    between two reads of a stream once output has started; ``health_s`` a health probe;
    ``request_s`` the other non-streaming calls (metrics, models, embeddings).
    """

    connect_s: float | None = 5.0
    first_token_s: float | None = None
    idle_s: float | None = None
    health_s: float = 2.0
    request_s: float | None = 30.0

    def __post_init__(self) -> None:
        for name in ("connect_s", "first_token_s", "idle_s", "health_s", "request_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"HTTPTimeouts.{name} must be positive or None, got {value!r}")


def make_session(limit: int = 0, *, keepalive_s: float = 75.0) -> aiohttp.ClientSession:
    """A client session for engine traffic: keep-alive connection pool (``limit`` connections
    in all, 0 = unbounded), no total timeout (streams last as long as generation does),
    TCP_NODELAY (aiohttp sets it on every connection). Its connector also holds the lean
    connection pools that :meth:`HTTPEngineClient.generate` uses for ``http://`` engines
    when ``limit`` is 0 (:mod:`sage_llm.engines.fastclient`). Call it inside a running event
    loop; the caller owns the session and closes it (which closes both pools)."""
    if limit < 0:
        raise ValueError("limit must be >= 0")
    connector = EngineConnector(
        limit=limit, limit_per_host=0, keepalive_timeout=keepalive_s, ttl_dns_cache=300
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None),
        read_bufsize=1 << 18,
        trust_env=False,
    )


CARDS_REUSE_S = 1.0
"""How long :meth:`HTTPEngineClient.context_length` and
:meth:`~HTTPEngineClient.lora_adapters` reuse the model cards that one of them read."""

_GENERATION_ROUTES = frozenset({"POST /v1/completions", "POST /v1/chat/completions"})


def _error_object(raw: bytes) -> bool:
    """Whether an error answer's body is an OpenAI-style error object (vLLM's own errors),
    not a web framework's answer for a route it does not have (``{"detail": "Not Found"}``)."""
    try:
        parsed = jsonutil.loads(raw)
    except ValueError:
        return False
    return isinstance(parsed, Mapping) and stream_error(parsed) is not None


def _retryable_status(status: int) -> bool:
    """Whether another instance may take a request this answer failed: overload, the
    instance's own fault (5xx; 401, 403, 404: its credentials, model or engine are not
    what it was registered with); not a refusal of the request itself."""
    return status in (401, 403, 404, 408, 429) or status >= 500


def _header_safe(value: str) -> bool:
    """True when ``value`` can go into a header line as it is (printable ASCII)."""
    return value.isascii() and value.isprintable()


class HTTPEngineClient:
    """:class:`~sage_llm.engines.base.EngineClient` over HTTP for one engine instance.

    ``dialect`` is ``vllm``, ``sglang`` or ``openai``; by default it is the instance's
    ``engine`` field when that names one of them, else ``vllm``. Only the vLLM dialect runs
    PD prefill legs (``kv_transfer_params``); SGLang PD passes its bootstrap fields in
    ``EngineRequest.extra``.
    """

    def __init__(
        self,
        instance: ExecutionInstance,
        session: aiohttp.ClientSession,
        *,
        dialect: str | None = None,
        timeouts: HTTPTimeouts | None = None,
    ) -> None:
        chosen = dialect if dialect is not None else instance.engine
        if chosen not in _DIALECTS:
            if dialect is not None:
                raise ValueError(f"unknown dialect {dialect!r}; expected one of {_DIALECTS}")
            chosen = "vllm"
        self._instance = instance
        self._session = session
        self._dialect = cast(Dialect, chosen)
        self._sends_priority = chosen == "vllm" and instance.engine_scheduling_policy == "priority"
        """Whether a request's priority goes with it (to a vLLM engine that schedules by
        it: ``engine_scheduling_policy``)."""
        self._timeouts = timeouts or HTTPTimeouts()
        self._base = instance.base_url.rstrip("/")
        self._sock_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self._timeouts.connect_s
        )
        self._fast_pool: FastPool | None = None
        self._connector: EngineConnector | None = None
        """Whose pool :attr:`_fast_pool` is (given back by :meth:`aclose`)."""
        self.health_error: str | None = None
        """Why the last :meth:`health` probe failed (None: it passed, or none ran yet)."""
        self._cards: tuple[float, list[dict[str, Any]]] | None = None
        """The last model cards read, with when (``time.monotonic()``): see
        :meth:`_recent_cards`."""
        connector = getattr(session, "connector", None)
        self._fast_headers = "Content-Type: application/json\r\n"
        if instance.api_key:
            self._fast_headers += f"Authorization: Bearer {instance.api_key}\r\n"
        if (
            instance.scheme == "http"
            and isinstance(connector, EngineConnector)
            and connector.limit == 0
            and (not instance.api_key or _header_safe(instance.api_key))  # else aiohttp
        ):  # rejects it, as it always did
            self._fast_pool = connector.fast_pool(instance.host, int(instance.port))
            self._connector = connector

    @property
    def instance_id(self) -> str:
        return self._instance.instance_id

    @property
    def instance(self) -> ExecutionInstance:
        return self._instance

    @property
    def dialect(self) -> Dialect:
        return self._dialect

    @property
    def timeouts(self) -> HTTPTimeouts:
        return self._timeouts

    # --- request bodies ------------------------------------------------------------------

    def request_body(self, req: EngineRequest, *, stream: bool = True) -> dict[str, Any]:
        """The JSON body sent for ``req``: the sampling fields, ``req.extra`` unchanged, then
        ``stream`` (with ``stream_options.include_usage`` when streaming) and
        ``kv_transfer_params`` when set."""
        base = self._instance.model_name
        body: dict[str, Any] = {"model": req.model or base}
        if self._dialect == "sglang" and body["model"] != base:
            # a LoRA adapter: SGLang takes its name in lora_path, on the base model's name
            # (its "model:adapter" form is newer than the field)
            body = {"model": base, "lora_path": body["model"]}
        if req.messages is not None:
            body["messages"] = [dict(m) for m in req.messages]
        elif isinstance(req.prompt, str):
            body["prompt"] = req.prompt
        elif req.prompt is not None:
            body["prompt"] = [int(t) for t in req.prompt]
        else:
            raise InvalidRequestError("request has neither prompt nor messages", param="prompt")
        if req.send_max_tokens:  # else the engine's default
            body["max_tokens"] = req.max_tokens
        if req.temperature is not None:  # else the engine's default
            body["temperature"] = req.temperature
        if req.top_p is not None:
            body["top_p"] = req.top_p
        if req.stop:
            body["stop"] = list(req.stop)
        body.update(req.extra)
        body["stream"] = stream
        if stream:
            options = body.get("stream_options")
            merged = dict(options) if isinstance(options, Mapping) else {}
            merged["include_usage"] = True
            body["stream_options"] = merged
        else:
            body.pop("stream_options", None)
        if req.kv_transfer_params is not None:
            body["kv_transfer_params"] = dict(req.kv_transfer_params)
        if self._sends_priority:  # (vLLM v1 ignores it under fcfs; v0 refused it)
            body["priority"] = req.priority
        return body

    def prefill_body(self, req: EngineRequest) -> dict[str, Any]:
        """The body of a vLLM PD prefill leg (docs/pd.md)."""
        body = self.request_body(req.with_changes(kv_transfer_params=None), stream=False)
        body["max_tokens"] = 1
        if "max_completion_tokens" in body:
            body["max_completion_tokens"] = 1
        body.pop("min_tokens", None)
        body["kv_transfer_params"] = prefill_kv_transfer_params()
        return body

    def _headers(self, request_id: str | None = None) -> dict[str, str]:
        headers: dict[str, str] = {}
        if request_id:
            headers["X-Request-Id"] = request_id
        if self._instance.api_key:
            headers["Authorization"] = f"Bearer {self._instance.api_key}"
        return headers

    @staticmethod
    def _path(req: EngineRequest) -> str:
        return "/v1/chat/completions" if req.api == "chat" else "/v1/completions"

    # --- transport -----------------------------------------------------------------------

    def _error(self, cls: type[EngineError], message: str, **kw: Any) -> EngineError:
        return cls(f"{self.instance_id}: {message}", instance_id=self.instance_id, **kw)

    def _status_error(self, status: int, reason: str | None, raw: bytes, what: str) -> EngineError:
        """The error for an engine's 4xx/5xx answer to ``what`` (``"POST /v1/…"``), with the
        message of its body when it has one: :class:`EngineRequestRejectedError` when the
        engine refused the request itself (400, 413, 422)."""
        message = error_from_body(raw) or reason or "error"
        if status in (404, 405) and what in _GENERATION_ROUTES and not _error_object(raw):
            # not vLLM's "model does not exist" (an error object) but no such route: an
            # engine whose model does not generate (a pooling model's server has no
            # /v1/completions). The request's fault, as an embeddings request to a model
            # that does not embed: not the instance's, so it is not ejected for it.
            return self._error(
                EngineRequestRejectedError,
                f"rejected the request (HTTP {status} from {what}: {message}): its model is "
                f"not served for {what.partition(' ')[2]} by this engine",
                status=status,
                param="model",
            )
        if status in REJECTED_CODES:
            return self._error(
                EngineRequestRejectedError,
                f"rejected the request (HTTP {status} from {what}): {message}",
                status=status,
                param=error_param_from_body(raw),
            )
        return self._error(
            EngineError,
            f"HTTP {status} from {what}: {message}",
            status=status,
            retryable=_retryable_status(status),
        )

    def _stream_error(self, produced: bool, exc: BaseException | None = None) -> EngineError:
        """A stream read that timed out (no ``exc``) or broke: retryable before any token."""
        if exc is None:
            what = "between stream reads" if produced else "waiting for the first token"
            return self._error(EngineTimeoutError, f"timed out {what}", retryable=not produced)
        return self._error(EngineConnectionError, f"stream broken: {exc}", retryable=not produced)

    def _deadline(self, seconds: float | None) -> float | None:
        return None if seconds is None else asyncio.get_running_loop().time() + seconds

    def _first_deadline(self, req: EngineRequest) -> float | None:
        """The first-token deadline of ``req``; none when it is not streamed."""
        return self._deadline(self._timeouts.first_token_s) if req.stream else None

    async def _send(
        self,
        method: str,
        path: str,
        *,
        body: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        deadline: float | None = None,
    ) -> aiohttp.ClientResponse:
        """Send a request; return the response once its status is known to be < 400."""
        url = self._base + path
        data = None
        if body is not None:
            data = jsonutil.dumps(body)
            headers = {**(headers or {}), "Content-Type": "application/json"}
        try:
            async with asyncio.timeout_at(deadline):
                resp = await self._session.request(
                    method, url, data=data, headers=headers, timeout=self._sock_timeout
                )
        except TimeoutError:
            raise self._error(EngineTimeoutError, f"{method} {path} timed out") from None
        except aiohttp.ClientError as exc:
            raise self._error(EngineConnectionError, f"{method} {path} failed: {exc}") from exc
        except OSError as exc:
            raise self._error(EngineConnectionError, f"{method} {path} failed: {exc}") from exc
        if resp.status < 400:
            return resp
        try:
            async with asyncio.timeout_at(deadline):
                raw = await resp.read()
        except (TimeoutError, aiohttp.ClientError, OSError):
            raw = b""
        finally:
            resp.release()
        raise self._status_error(resp.status, resp.reason, raw, f"{method} {path}")

    async def _read(
        self, resp: aiohttp.ClientResponse, deadline: float | None, *, produced: bool
    ) -> bytes:
        try:
            async with asyncio.timeout_at(deadline):
                return await resp.content.readany()
        except TimeoutError:
            raise self._stream_error(produced) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise self._stream_error(produced, exc) from exc

    async def _request_bytes(
        self,
        method: str,
        path: str,
        *,
        body: Mapping[str, Any] | None = None,
        request_id: str | None = None,
        timeout_s: float | None,
    ) -> bytes:
        deadline = self._deadline(timeout_s)
        resp = await self._send(
            method, path, body=body, headers=self._headers(request_id), deadline=deadline
        )
        try:
            async with asyncio.timeout_at(deadline):
                return await resp.read()
        except TimeoutError:
            raise self._error(EngineTimeoutError, f"{method} {path} timed out") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise self._error(EngineConnectionError, f"{method} {path} failed: {exc}") from exc
        finally:
            resp.release()

    async def _request_json(
        self,
        method: str,
        path: str,
        *,
        body: Mapping[str, Any] | None = None,
        request_id: str | None = None,
        timeout_s: float | None,
    ) -> Any:
        raw = await self._request_bytes(
            method, path, body=body, request_id=request_id, timeout_s=timeout_s
        )
        try:
            return jsonutil.loads(raw)
        except ValueError:
            raise self._error(
                EngineStreamError, f"{method} {path} returned invalid JSON", retryable=False
            ) from None

    # --- EngineClient --------------------------------------------------------------------

    async def generate(self, req: EngineRequest) -> AsyncGenerator[Chunk, None]:
        """Stream ``req`` from the engine, one chunk at a time (the lists of
        :meth:`generate_batches`, flattened). Close the iterator (``aclose``, or cancel the
        task awaiting it) to abort: the HTTP connection is closed and the engine aborts."""
        async with contextlib.aclosing(self.generate_batches(req)) as batches:
            async for batch in batches:
                for chunk in batch:
                    yield chunk

    def generate_batches(self, req: EngineRequest) -> AsyncGenerator[list[Chunk], None]:
        """What :meth:`generate` yields, a list at a time: the chunks of each read from the
        engine (never an empty list), so a consumer handles what arrived together at
        once. Closing it aborts the request as closing :meth:`generate` does.

        ``http://`` engines are called through the lean client of
        :mod:`sage_llm.engines.fastclient` (same behaviour, a fraction of the CPU);
        ``https://`` ones, or a session not made by :func:`make_session`, through aiohttp.
        The iterator is the transport's own (no generator in between)."""
        if self._fast_pool is not None and (not req.request_id or _header_safe(req.request_id)):
            return self._generate_fast(self._fast_pool, req)
        return self._generate_aiohttp(req)

    async def _generate_aiohttp(self, req: EngineRequest) -> AsyncGenerator[list[Chunk], None]:
        body = self.request_body(req, stream=req.stream)
        first_deadline = self._first_deadline(req)
        resp = await self._send(
            "POST", self._path(req), body=body, headers=self._headers(req.request_id),
            deadline=first_deadline,
        )  # fmt: skip
        clean = False
        asm = StreamAssembler(req, self.instance_id)
        try:
            if resp.content_type == "application/json":
                raw = await self._read_all(resp, first_deadline)
                chunks = chunks_from_completion(self._parse_json(raw), req, self.instance_id)
                clean = True  # read to the end: reusable whether or not all is consumed
                if chunks:
                    yield chunks
                return

            async def read(deadline: float | None, produced: bool) -> bytes:
                return await self._read(resp, deadline, produced=produced)

            async with contextlib.aclosing(self._relay(asm, read, first_deadline)) as relay:
                async for batch in relay:
                    yield batch
            clean = await self._drain(resp)
        finally:
            if clean:
                resp.release()
            else:
                resp.close()

    async def _relay(
        self,
        asm: StreamAssembler,
        read: Callable[[float | None, bool], Awaitable[bytes]],
        first_deadline: float | None,
    ) -> AsyncGenerator[list[Chunk], None]:
        """The stream loop of both transports: SSE events to chunks, one list per read
        (none when a read completes no chunk; the stream's last chunk, with the finish
        reason and the usage, is in the list of the read that ended the stream, so that
        an answer read at once is relayed in one write), reading with the first-token
        deadline until a token came and the idle timeout after it; ``read`` returns
        ``b""`` at the end of the body."""
        loop = asyncio.get_running_loop()
        decoder = SSEDecoder()
        idle = self._timeouts.idle_s
        while True:
            produced = asm.produced
            if not produced:
                deadline = first_deadline
            elif idle is None:
                deadline = None
            else:
                deadline = loop.time() + idle
            data = await read(deadline, produced)
            events = decoder.feed(data) if data else decoder.close()
            batch: list[Chunk] = []
            try:
                for event in events:
                    batch += asm.on_event(event.data, event.event)
                ended = asm.done or not data
                if ended:  # the last chunk goes with the read that ended the stream
                    batch += asm.finish()
            except Exception:
                if batch:  # the chunks before the bad event go out first
                    yield batch
                raise
            if batch:
                yield batch
            if ended:
                return

    # --- the lean hot path -----------------------------------------------------------

    async def _fast_send(
        self, pool: FastPool, path: str, data: bytes, request_id: str, deadline: float | None
    ) -> FastResponse:
        """POST ``data``; the response once its status is known to be < 400."""
        headers = self._fast_headers
        if request_id:
            headers += f"X-Request-Id: {request_id}\r\n"
        connect_s = self._timeouts.connect_s
        try:
            if deadline is None:
                resp = await pool.request("POST", path, data, headers, connect_timeout_s=connect_s)
            else:
                async with asyncio.timeout_at(deadline):
                    resp = await pool.request(
                        "POST", path, data, headers, connect_timeout_s=connect_s
                    )
        except TimeoutError:
            raise self._error(EngineTimeoutError, f"POST {path} timed out") from None
        except UnsupportedEncodingError as exc:  # an answer unusable, not a broken connection
            raise self._error(EngineStreamError, f"POST {path}: {exc}", retryable=True) from exc
        except OSError as exc:
            raise self._error(EngineConnectionError, f"POST {path} failed: {exc}") from exc
        if resp.status < 400:
            return resp
        try:
            async with asyncio.timeout_at(deadline):
                raw = await resp.read()
        except (TimeoutError, OSError):
            raw = b""
        finally:
            resp.release()
        raise self._status_error(resp.status, resp.reason, raw, f"POST {path}")

    async def _fast_read(
        self, resp: FastResponse, deadline: float | None, *, produced: bool
    ) -> bytes:
        try:
            if deadline is None:
                return await resp.read_some()
            async with asyncio.timeout_at(deadline):
                return await resp.read_some()
        except TimeoutError:
            raise self._stream_error(produced) from None
        except OSError as exc:
            raise self._stream_error(produced, exc) from exc

    async def complete(self, req: EngineRequest) -> list[Chunk]:
        """Every chunk of ``req``, at its end: what :meth:`generate` yields, for a request
        the engine answers in one piece (``req.stream`` false), without an async generator
        on the lean path. Cancelling it aborts the request as closing ``generate`` does."""
        pool = self._fast_pool
        if req.stream or pool is None or (req.request_id and not _header_safe(req.request_id)):
            async with contextlib.aclosing(self.generate(req)) as chunks:
                return [chunk async for chunk in chunks]
        first_deadline = self._first_deadline(req)
        resp = await self._fast_send(
            pool, self._path(req), jsonutil.dumps(self.request_body(req, stream=False)),
            req.request_id, first_deadline,
        )  # fmt: skip
        clean = released = False
        try:
            if resp.content_type == "application/json":
                answer = await self._fast_json(resp, req, first_deadline)
                clean = True
                return answer
            # the engine streamed anyway
            async with contextlib.aclosing(self._fast_events(resp, req, first_deadline)) as relay:
                streamed = [chunk async for batch in relay for chunk in batch]
            self._fast_release(resp)
            released = True
            return streamed
        finally:
            if clean:
                resp.release()
            elif not released:  # (once released, the rest of the body is its drainer's)
                resp.close()

    def _fast_events(
        self, resp: FastResponse, req: EngineRequest, first_deadline: float | None
    ) -> AsyncGenerator[list[Chunk], None]:
        """The chunks of a server-sent-events answer on the lean transport, a list per
        read (:meth:`_relay` over ``resp``)."""

        async def read(deadline: float | None, produced: bool) -> bytes:
            return await self._fast_read(resp, deadline, produced=produced)

        return self._relay(StreamAssembler(req, self.instance_id), read, first_deadline)

    async def _fast_json(
        self, resp: FastResponse, req: EngineRequest, deadline: float | None
    ) -> list[Chunk]:
        """The chunks of a JSON (non-streamed) answer, read to its end."""
        parts = []
        while piece := await self._fast_read(resp, deadline, produced=False):
            parts.append(piece)
        return chunks_from_completion(self._parse_json(b"".join(parts)), req, self.instance_id)

    async def _generate_fast(
        self, pool: FastPool, req: EngineRequest
    ) -> AsyncGenerator[list[Chunk], None]:
        data = jsonutil.dumps(self.request_body(req, stream=req.stream))
        first_deadline = self._first_deadline(req)
        path = self._path(req)
        resp = await self._fast_send(pool, path, data, req.request_id, first_deadline)
        clean = released = False
        try:
            if resp.content_type == "application/json":
                chunks = await self._fast_json(resp, req, first_deadline)
                clean = True  # read to the end: reusable whether or not all is consumed
                if chunks:
                    yield chunks
                return
            async with contextlib.aclosing(self._fast_events(resp, req, first_deadline)) as relay:
                async for batch in relay:
                    yield batch
            self._fast_release(resp)
            released = True
        finally:
            if clean:
                resp.release()
            elif not released:  # (once released, the rest of the body is its drainer's)
                resp.close()

    def _fast_release(self, resp: FastResponse) -> None:
        """After ``[DONE]``: the rest of the body (its last chunk) is read as it arrives,
        without waiting for it here, and the connection reused (see
        :meth:`FastResponse.release_later`)."""
        resp.release_later(self._timeouts.idle_s or self._timeouts.health_s)

    async def _read_all(self, resp: aiohttp.ClientResponse, deadline: float | None) -> bytes:
        chunks: list[bytes] = []
        while data := await self._read(resp, deadline, produced=False):
            chunks.append(data)
        return b"".join(chunks)

    def _parse_json(self, raw: bytes) -> Any:
        try:
            return jsonutil.loads(raw)
        except ValueError:
            raise self._error(EngineStreamError, "response is not valid JSON") from None

    async def _drain(self, resp: aiohttp.ClientResponse) -> bool:
        """After ``[DONE]``: read to the end so the connection can be reused."""
        if resp.content.at_eof():
            return True
        deadline = self._deadline(self._timeouts.idle_s or self._timeouts.health_s)
        try:
            async with asyncio.timeout_at(deadline):
                while await resp.content.readany():
                    pass
        except (TimeoutError, aiohttp.ClientError, OSError):
            return False
        return True

    async def prefill(self, req: EngineRequest) -> KVHandle:
        """Run the prefill leg of a vLLM PD request (docs/pd.md); the handle's ``params``
        are what the decode leg sends as ``kv_transfer_params``."""
        if self._dialect != "vllm":
            raise self._error(
                EngineError,
                f"the {self._dialect} dialect has no kv_transfer_params prefill leg",
                retryable=False,
            )
        obj = await self._request_json(
            "POST",
            self._path(req),
            body=self.prefill_body(req),
            request_id=req.request_id,
            timeout_s=self._timeouts.first_token_s,
        )
        if not isinstance(obj, dict):
            raise self._error(EngineStreamError, "prefill response is not a JSON object")
        err = error_from_body(obj)
        if err is not None and "choices" not in obj:
            raise self._error(EngineError, f"prefill failed: {err}", retryable=True)
        # either is the instance's failure (as an engine's refusal of the field is): the
        # request may run on another pair
        params = obj.get("kv_transfer_params")
        if params is None:
            raise self._error(
                EngineError,
                "prefill response has no kv_transfer_params: the engine is not configured "
                f"for PD ({PD_INSTRUCTIONS})",
            )
        if not isinstance(params, dict):
            raise self._error(
                EngineStreamError,
                f"prefill response's kv_transfer_params is not an object: {params!r:.80}",
            )
        usage = parse_usage(obj.get("usage"))
        chunks = chunks_from_completion(obj, req, self.instance_id)
        first = chunks[0] if chunks else None
        return KVHandle(
            instance_id=self.instance_id,
            params=params,
            prompt_tokens=usage.prompt_tokens if usage else 0,
            cached_tokens=(usage.cached_tokens or 0) if usage else 0,
            first_token=first,
        )

    async def health(self) -> bool:
        """True when ``GET /health`` answers 200 within ``timeouts.health_s``; never raises.
        Why the last probe failed is in :attr:`health_error` (None after one that passed)."""
        try:
            async with asyncio.timeout(self._timeouts.health_s):
                async with self._session.get(
                    self._base + "/health", headers=self._headers(), timeout=self._sock_timeout
                ) as resp:
                    await resp.read()
                    ok = resp.status == 200
                    self.health_error = None if ok else f"GET /health answered HTTP {resp.status}"
                    return ok
        except TimeoutError:
            self.health_error = f"GET /health timed out after {self._timeouts.health_s:g} s"
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            self.health_error = f"GET /health failed: {exc or type(exc).__name__}"
        return False

    async def stats(self) -> EngineStats:
        """Scrape ``GET /metrics`` into :class:`EngineStats`; failures raise EngineError."""
        raw = await self._request_bytes("GET", "/metrics", timeout_s=self._timeouts.request_s)
        return scrape_text_to_stats(raw.decode("utf-8", errors="replace"))

    async def embed(
        self,
        model: str,
        inputs: list[str] | list[list[int]],
        options: Mapping[str, Any] | None = None,
        *,
        request_id: str | None = None,
    ) -> dict[str, Any]:
        """``POST /v1/embeddings`` with ``options`` (``encoding_format``, ``dimensions`` …)
        as further fields (``request_id``: its ``X-Request-Id``); the engine's JSON answer."""
        body = {**(options or {}), "model": model or self._instance.model_name}
        body["input"] = list(inputs)
        obj = await self._request_json(
            "POST", "/v1/embeddings", body=body, request_id=request_id,
            timeout_s=self._timeouts.request_s,
        )  # fmt: skip
        if not isinstance(obj, dict):
            raise self._error(EngineStreamError, "embeddings response is not a JSON object")
        data = obj.get("data")
        if not isinstance(data, list):  # the OpenAI SDKs cannot read such an answer
            raise self._error(EngineStreamError, "embeddings response has no data list")
        if len(data) != len(body["input"]):
            raise self._error(
                EngineStreamError,
                f"embeddings response has {len(data)} embeddings for {len(inputs)} inputs",
            )
        return obj

    async def _model_cards(self) -> list[dict[str, Any]]:
        """The engine's model cards (``GET /v1/models``)."""
        obj = await self._request_json("GET", "/v1/models", timeout_s=self._timeouts.request_s)
        data = obj.get("data") if isinstance(obj, dict) else None
        if not isinstance(data, list):
            raise self._error(EngineStreamError, "models response has no data list")
        cards = [card for card in data if isinstance(card, dict)]
        self._cards = (time.monotonic(), cards)
        return cards

    async def _recent_cards(self) -> list[dict[str, Any]]:
        """The model cards read in the last :data:`CARDS_REUSE_S` seconds, or read now: the
        health loop asks :meth:`context_length` and then :meth:`lora_adapters`, and the
        engine is asked for its cards once for both. A load or unload through this client
        reads them again next time."""
        kept = self._cards
        if kept is not None and time.monotonic() - kept[0] < CARDS_REUSE_S:
            return kept[1]
        return await self._model_cards()

    async def models(self) -> list[str]:
        """Model ids the engine serves (``GET /v1/models``)."""
        return [str(card["id"]) for card in await self._model_cards() if "id" in card]

    async def load_lora_adapter(self, name: str, path: str) -> None:
        """vLLM's ``POST /v1/load_lora_adapter`` (an engine started with
        ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``: others answer 404)."""
        await self._lora_call("load", {"lora_name": name, "lora_path": path})

    async def unload_lora_adapter(self, name: str) -> None:
        """vLLM's ``POST /v1/unload_lora_adapter``."""
        await self._lora_call("unload", {"lora_name": name})

    async def _lora_call(self, verb: str, body: Mapping[str, Any]) -> None:
        path = f"/v1/{verb}_lora_adapter"
        self._cards = None  # the cards change
        try:
            await self._request_bytes("POST", path, body=body, timeout_s=self._timeouts.request_s)
        except EngineError as exc:
            if exc.status == 404 and exc.message.endswith(": Not Found"):  # no such route
                raise self._error(
                    type(exc),
                    f"POST {path}: the engine does not {verb} LoRA adapters at run time "
                    "(start vLLM with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)",
                ) from exc
            raise

    async def lora_adapters(self) -> list[str] | None:
        """The LoRA adapters the engine serves on the instance's model: the ids of its
        model cards (``GET /v1/models``) whose ``parent`` is ``model_name``, as vLLM lists
        its ``--lora-modules`` and those loaded at run time; None when no card has a
        ``parent`` field (an engine that does not say)."""
        cards = await self._recent_cards()
        if not any("parent" in card for card in cards):
            return None
        model = self._instance.model_name
        return [
            card["id"]
            for card in cards
            if card.get("parent") == model and isinstance(card.get("id"), str) and card["id"]
        ]

    async def context_length(self) -> int | None:
        """``max_model_len`` of the instance's model card (``GET /v1/models``; the only
        card when none has its name), or llama.cpp's ``meta.n_ctx`` (a slot's context,
        which is what holds a request); None when the engine's cards have neither."""
        cards = await self._recent_cards()
        named = [c for c in cards if c.get("id") == self._instance.model_name]
        card = named[0] if named else cards[0] if len(cards) == 1 else None
        if card is None:
            return None
        value = card.get("max_model_len")
        meta = card.get("meta")
        if value is None and isinstance(meta, dict):  # llama.cpp's llama-server
            value = meta.get("n_ctx")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    async def aclose(self) -> None:
        """Give back the engine's connection pool (the last client of an address closes
        its idle connections; calls in flight end first); the shared session belongs to
        its creator."""
        connector, self._connector, self._fast_pool = self._connector, None, None
        if connector is not None:
            connector.release_pool(self._instance.host, int(self._instance.port))
