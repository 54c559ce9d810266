"""Request ids, structured access logs, CORS and optional OpenTelemetry tracing.

:func:`observe_middleware` is the outermost middleware of the app: it honours (or makes)
the ``x-request-id`` (an invalid one is a 400, except on the probes ``/health``, ``/ready``
and ``/metrics``, which get a fresh id), echoes it on the response, answers CORS preflights
for configured origins, wraps the request in a tracing span when tracing is on, and writes
one access-log line per request (logger ``sage_llm.gateway.access``) with the request id,
method, path, status, latency and model — never keys or prompts.

Tracing uses ``opentelemetry-api`` only if it is importable and tracing is enabled;
otherwise it is a no-op (the package is not a dependency).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

from aiohttp import HttpVersion, HttpVersion10, HttpVersion11, web
from aiohttp.typedefs import Handler, Middleware

from sage_llm.errors import InvalidRequestError, SageLLMError
from sage_llm.gateway.auth import authorize
from sage_llm.gateway.errors import (
    MODEL_KEY,
    REQUEST_ID_KEY,
    RESPONSE_HEADERS_KEY,
    error_body,
    error_response,
    sage_error_response,
)
from sage_llm.gateway.relay import CLIENT_GONE, SSEResponse
from sage_llm.gateway.settings import LiveSettings, ResolvedGateway
from sage_llm.request_json import LEFT_UNREAD, leave_unread, too_large_unsent, waits_to_send

access_log = logging.getLogger("sage_llm.gateway.access")
log = logging.getLogger("sage_llm.gateway")

REQUEST_ID_HEADER = "X-Request-Id"
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
PROBE_PATHS = frozenset({"/health", "/ready", "/metrics"})
"""Routes that ignore an invalid ``x-request-id`` (they get a fresh id) instead of answering
400: a load balancer's probe or a scrape must not fail on it."""
_CORS_ALLOW_HEADERS = (
    "Authorization, Content-Type, X-Request-Id, X-Sage-Priority, X-Sage-Slo-Ms, "
    "X-Sage-Cost-Budget, X-Sage-User, X-Session-Id"
)
"""The headers a preflight allows when it names none (those it names are allowed: the
OpenAI SDKs' own ``x-stainless-*`` included)."""
_HEADER_LIST = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+(\s*,\s*[!#$%&'*+.^_`|~0-9A-Za-z-]+)*")


class Tracing:
    """OpenTelemetry's pieces the gateway uses: a tracer, and, when the API has them, the
    propagator that reads a caller's ``traceparent`` and the span status of an error."""

    __slots__ = ("_error", "extract", "server_kind", "tracer")

    def __init__(self, trace: Any, propagate: Any) -> None:
        self.tracer = trace.get_tracer("sage_llm.gateway")
        self.extract = getattr(propagate, "extract", None)
        self.server_kind = getattr(getattr(trace, "SpanKind", None), "SERVER", None)
        status, code = getattr(trace, "Status", None), getattr(trace, "StatusCode", None)
        self._error = None if status is None or code is None else (status, code.ERROR)

    def mark_error(self, span: Any, status: int) -> None:
        """Set ``span``'s status to error for a 5xx answer (a 4xx is the client's)."""
        if status >= 500 and self._error is not None:
            make, error = self._error
            span.set_status(make(error, f"HTTP {status}"))


def load_tracer(enabled: bool) -> Tracing | None:
    """OpenTelemetry's pieces when ``enabled`` and ``opentelemetry-api`` is installed, else
    None."""
    if not enabled:
        return None
    try:
        trace = importlib.import_module("opentelemetry.trace")
    except ImportError:
        log.warning("gateway tracing is enabled but opentelemetry-api is not installed")
        return None
    try:
        propagate = importlib.import_module("opentelemetry.propagate")
    except ImportError:
        propagate = None
    return Tracing(trace, propagate)


@contextlib.contextmanager
def _span(tracing: Tracing, request: web.Request, rid: str) -> Iterator[Any]:
    """A server span for ``request``, a child of the caller's trace when its headers carry
    one (``traceparent``). Its name is the method and the route's template; a path no
    route matched is not trusted (a client could name spans at will, and put anything in
    them): its span is named by the method alone, ``http.route`` left unset, as
    OpenTelemetry's conventions ask."""
    route = request.match_info.route.resource
    name = route.canonical if route is not None else None
    options: dict[str, Any] = {}
    if tracing.extract is not None:
        options["context"] = tracing.extract(request.headers)  # any case: Traceparent too
    if tracing.server_kind is not None:
        options["kind"] = tracing.server_kind
    title = request.method if name is None else f"{request.method} {name}"
    with tracing.tracer.start_as_current_span(title, **options) as span:
        span.set_attribute("http.request.method", request.method)
        if name is not None:
            span.set_attribute("http.route", name)
        span.set_attribute("sage.request_id", rid)
        yield span


def _cors_origin(request: web.Request, origins: Sequence[str]) -> str | None:
    origin = request.headers.get("Origin")
    if not origin or not origins:
        return None
    if "*" in origins:
        return "*"
    return origin if origin in origins else None


def _response_headers(rid: str, cors: str | None) -> dict[str, str]:
    headers = {REQUEST_ID_HEADER: rid}
    if cors is not None:
        headers["Access-Control-Allow-Origin"] = cors
        headers["Access-Control-Expose-Headers"] = "X-Request-Id, Retry-After, X-Should-Retry"
        # (a preflight's answer depends on the headers it asks for too)
        vary = "Access-Control-Request-Headers"
        headers["Vary"] = vary if cors == "*" else f"Origin, {vary}"
    return headers


def _preflight(request: web.Request) -> web.Response:
    resp = web.Response(status=204)
    resp.headers["Access-Control-Allow-Methods"] = "GET, POST, DELETE, OPTIONS"
    asked = request.headers.get("Access-Control-Request-Headers", "").strip()
    allowed = asked if _HEADER_LIST.fullmatch(asked) else _CORS_ALLOW_HEADERS
    resp.headers["Access-Control-Allow-Headers"] = allowed
    resp.headers["Access-Control-Max-Age"] = "600"
    return resp


def new_request_id() -> str:
    """A fresh request id: 32 random hex digits (a version-4 UUID's length and alphabet)."""
    return os.urandom(16).hex()


class RequestIds:
    """:func:`new_request_id` for a hot route: the same ids (16 bytes of ``os.urandom``
    each, as hex), cut from one read of 4 KiB per 256 ids rather than a system call each."""

    __slots__ = ("_at", "_pool")

    def __init__(self) -> None:
        self._pool = b""
        self._at = 0

    def __call__(self) -> str:
        at = self._at
        if at >= len(self._pool):
            self._pool, at = os.urandom(4096), 0
        self._at = at + 16
        return self._pool[at : at + 16].hex()


def valid_request_id(given: str) -> bool:
    """Whether a client's ``x-request-id`` (stripped; empty when absent) may be used."""
    return not given or _REQUEST_ID_RE.fullmatch(given) is not None


def bad_request_id_error() -> InvalidRequestError:
    return InvalidRequestError(
        "x-request-id must be 1-128 characters of A-Z a-z 0-9 . _ : -", param="x-request-id"
    )


def _bad_request_id() -> web.Response:
    return sage_error_response(bad_request_id_error())


_VERSIONS = frozenset({HttpVersion10, HttpVersion11})


ExpectHandler = Callable[[web.Request], Awaitable[None]]
_NO_KEYS = ResolvedGateway()
REQUEST_SETTINGS_KEY = web.RequestKey("gateway_settings", ResolvedGateway)
"""Request key: the gateway settings the request was authorized by (its handler's)."""
_REFUSED_UNREAD = web.RequestKey("refused_unread", bool)
"""Request key: its ``Expect: 100-continue`` was answered with no 100 (it is refused)."""
_GONE_BEFORE_BODY = web.RequestKey("gone_before_body", bool)
"""Request key: its client went away before its ``100 Continue`` could be written."""


def continue_or_refuse(live: LiveSettings | None = None) -> ExpectHandler:
    """Every route's ``Expect`` handler: ``100-continue`` is answered as aiohttp answers it,
    unless the request is refused whatever its body (a body above the size limit; a request
    the API keys or the admin token (:func:`~sage_llm.gateway.auth.authorize`) turn away):
    then its 413, 401 or 403 comes at once, without the 100 that would invite the upload.
    Any other expectation goes on to the middleware, which answers it with a JSON 417
    (aiohttp's own handler answers plain text, unlogged and uncounted). ``live``: the
    keys and the admin token as they are when the request comes (None: none, so the admin
    API answers loopback clients only)."""

    async def expect(request: web.Request) -> None:
        if request.version == HttpVersion11 and waits_to_send(request):
            if too_large_unsent(request):
                return  # read_raw refuses it unread
            settings = _NO_KEYS
            if live is not None:  # the middleware decides by the same keys
                settings = request[REQUEST_SETTINGS_KEY] = live.current
            try:
                authorize(request, settings.api_keys, settings.admin_token)
            except SageLLMError:
                request[_REFUSED_UNREAD] = True  # the middleware refuses it unread
                return
            try:
                await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            except ConnectionError:  # the client left: the middleware says so (a 499)
                request[_GONE_BEFORE_BODY] = True
                return
            request.writer.output_size = 0  # the answer itself has not begun

    return expect


def _client_gone() -> web.Response:
    """The answer to a request whose client left before its ``100 Continue``: counted and
    logged as 499 under the client's request id and route; never sent (aiohttp's write to
    the closed connection fails quietly)."""
    resp = web.Response(status=499, reason="Client Closed Request")
    resp.force_close()
    return resp


def _expectation_failed(expect: str) -> web.Response:
    body = error_body(f"unknown expectation: Expect: {expect[:100]}", "invalid_request_error", 417)
    resp = web.json_response(body, status=417)
    resp.force_close()  # its body, if any, was not read
    return resp


def _unknown_coding(request: web.Request) -> str | None:
    """The request's ``Transfer-Encoding`` when it is not exactly ``chunked`` (aiohttp's
    parser reads ``gzip, chunked`` as chunked and ignores the gzip), else None."""
    codings = request.headers.getall("Transfer-Encoding", ())
    if not codings:
        return None
    value = ", ".join(codings)
    return None if value.strip().lower() == "chunked" else value


def _not_implemented_coding(coding: str) -> web.Response:
    """The 501 of a transfer coding the gateway does not read (RFC 9112 section 6.1); the
    connection closes (its body was not read)."""
    text = f"unsupported Transfer-Encoding: {coding[:100]}"
    body = error_body(text, "invalid_request_error", 501, "transfer-encoding")
    resp = web.json_response(body, status=501)
    resp.force_close()
    return resp


def _bad_version(version: HttpVersion) -> web.Response:
    """The 400 of a request line whose HTTP version is neither 1.0 nor 1.1 (aiohttp's
    parser reads ``HTTP/2.0`` and ``HTTP/0.9`` as versions); the connection closes."""
    text = f"malformed HTTP request: unsupported HTTP version {version.major}.{version.minor}"
    resp = web.json_response(error_body(text, "invalid_request_error", 400), status=400)
    resp.force_close()
    return resp


_ROUTES = frozenset(
    {"/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/models", "/health",
     "/ready", "/metrics", "/openapi.json"}
)  # fmt: skip


def route_label(path: str) -> str:
    """A request path as a bounded metric label: a served route, ``/v1/models/{model}``,
    ``/admin`` for the admin API, else ``other`` (an unknown path)."""
    if path in _ROUTES:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    if path == "/admin" or path.startswith("/admin/"):
        return "/admin"
    return "other"


ErrorCounter = Callable[[str, int], None]
"""Counts a request answered with an error status: ``(route label, status)``."""


def observe_middleware(cors_origins: Sequence[str], tracer: Tracing | None) -> Middleware:
    """The outermost middleware of one app (see the module docstring)."""
    return _observe(cors_origins, tracer, None)


def gateway_middleware(
    cors_origins: Sequence[str],
    tracer: Tracing | None,
    live: LiveSettings,
    count_error: ErrorCounter | None = None,
) -> Middleware:
    """:func:`observe_middleware`, :func:`~sage_llm.gateway.errors.error_middleware` and
    :func:`~sage_llm.gateway.auth.authorize`, in that order, as one middleware (one
    coroutine per request instead of three; the same responses); ``count_error`` counts
    each answer with an error status. A request is authorized by ``live``'s settings as
    they are when it comes, and its handler reads the same ones
    (:data:`REQUEST_SETTINGS_KEY`), whatever a reload changes meanwhile."""
    return _observe(cors_origins, tracer, live, count_error)


def _observe(
    cors_origins: Sequence[str],
    tracer: Tracing | None,
    guard: LiveSettings | None,
    count_error: ErrorCounter | None = None,
) -> Middleware:
    origins = tuple(cors_origins)

    async def run(request: web.Request, handler: Handler) -> web.StreamResponse:
        if guard is None:
            return await handler(request)
        # those its Expect: 100-continue was answered by, if any, so that the request the
        # 100 invited is not refused, nor one refused without a 100 waited for
        settings = request.get(REQUEST_SETTINGS_KEY) or guard.current
        request[REQUEST_SETTINGS_KEY] = settings
        try:
            authorize(request, settings.api_keys, settings.admin_token)
        except SageLLMError as exc:
            if request.get(_REFUSED_UNREAD):  # before its 100 Continue (continue_or_refuse)
                leave_unread(request)
            return error_response(request, exc)
        try:
            return await handler(request)
        except Exception as exc:
            return error_response(request, exc)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        given = request.headers.get(REQUEST_ID_HEADER, "").strip()
        valid = valid_request_id(given)
        rid = given if given and valid else new_request_id()
        if not valid and request.path in PROBE_PATHS:
            valid = True  # a probe is answered, under the fresh id
        cors = _cors_origin(request, origins) if origins else None
        headers = _response_headers(rid, cors)
        request[REQUEST_ID_KEY] = rid
        request[RESPONSE_HEADERS_KEY] = headers
        status = 500
        try:
            resp: web.StreamResponse
            if request.version not in _VERSIONS:
                resp = _bad_version(request.version)
            elif (expect := request.headers.get("Expect")) and expect.lower() != "100-continue":
                resp = _expectation_failed(expect)
            elif (coding := _unknown_coding(request)) is not None:
                resp = _not_implemented_coding(coding)
            elif request.get(_GONE_BEFORE_BODY):
                resp = _client_gone()
            elif not valid:
                resp = _bad_request_id()
            elif cors is not None and request.method == "OPTIONS":
                resp = _preflight(request)
            elif tracer is None:
                resp = await run(request, handler)
            else:
                with _span(tracer, request, rid) as span:
                    try:
                        resp = await run(request, handler)
                    except asyncio.CancelledError:
                        span.set_attribute("http.response.status_code", 499)  # client gone
                        raise
                    finally:  # the model, also of a request whose client went away
                        if model := request.get(MODEL_KEY):
                            span.set_attribute("gen_ai.request.model", model)
                    failed = resp.stream_error if isinstance(resp, SSEResponse) else None
                    gone = failed == CLIENT_GONE  # as when the handler is cancelled for it
                    span.set_attribute("http.response.status_code", failed if gone else resp.status)
                    if failed is not None and not gone:  # an error event after a 200
                        span.set_attribute("sage.stream_error_code", failed)
                    tracer.mark_error(span, failed or resp.status)
            status = resp.status
            if isinstance(resp, SSEResponse) and resp.stream_error is not None:
                status = resp.stream_error  # a stream ended by an error event (or client gone)
            if not resp.prepared:
                resp.headers.update(headers)
                if request.get(LEFT_UNREAD):  # the connection closes after it: said
                    resp.force_close()
            return resp
        except asyncio.CancelledError:
            status = 499  # the client went away
            raise
        finally:
            if status >= 400 and count_error is not None:
                count_error(route_label(request.path), status)
            if access_log.isEnabledFor(logging.INFO):
                _access(request, rid, status, (time.perf_counter() - started) * 1000.0)

    return middleware


def _access(request: web.Request, rid: str, status: int, latency_ms: float) -> None:
    model = request.get(MODEL_KEY)
    write_access_log(rid, request.method, request.path, status, latency_ms, model)


def _plain(text: str) -> bool:
    """Whether ``text`` stands in a ``key=value`` log line as it is."""
    return text.isprintable() and " " not in text


def write_access_log(
    rid: str, method: str, path: str, status: int, latency_ms: float, model: str | None
) -> None:
    """The one access-log line of a request (both HTTP fronts write it). The client's
    ``path`` and ``model`` are quoted in the text line when they hold a space or a
    control character (a newline would forge a line of its own)."""
    access_log.info(
        "request_id=%s method=%s path=%s status=%d latency_ms=%.1f model=%s",
        rid,
        method,
        path if _plain(path) else repr(path),
        status,
        latency_ms,
        "-" if not model else model if _plain(model) else repr(model),
        extra={
            "request_id": rid,
            "method": method,
            "path": path,
            "status": status,
            "latency_ms": round(latency_ms, 3),
            "model": model,
        },
    )
