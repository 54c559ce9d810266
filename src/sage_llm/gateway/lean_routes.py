"""The hot routes on the lean server: ``POST /v1/completions`` and ``/v1/chat/completions``.

The same request handling as the aiohttp app's (:class:`~sage_llm.gateway.openai.OpenAIRoutes`
behind :func:`~sage_llm.gateway.observe.gateway_middleware`), step for step: the
``x-request-id`` is honoured (or made) and echoed, the API key checked, the body parsed
and validated by :func:`~sage_llm.gateway.openai.parse_generation`, the request run through
:func:`~sage_llm.gateway.relay.complete` or relayed as server-sent events by
:func:`~sage_llm.gateway.relay.relay_stream`, failures answered with the same OpenAI-style
JSON errors and headers, and one access-log line written when that log is on. Only the
HTTP layer differs (:mod:`sage_llm.gateway.lean`).
"""

from __future__ import annotations

import asyncio
import logging
import time

from sage_llm import jsonutil
from sage_llm.control_plane.manager import ControlPlaneManager
from sage_llm.errors import SageLLMError
from sage_llm.gateway.auth import bearer_token, check_api_key
from sage_llm.gateway.errors import as_answered, error_body, log_failure, sage_error_headers
from sage_llm.gateway.lean import LeanConnection, LeanRequest, LeanStream
from sage_llm.gateway.observe import (
    REQUEST_ID_HEADER,
    RequestIds,
    access_log,
    bad_request_id_error,
    route_label,
    valid_request_id,
    write_access_log,
)
from sage_llm.gateway.openai import log_prompt, parse_generations
from sage_llm.gateway.relay import CLIENT_GONE, SSE_HEADERS, complete, complete_all, relay_stream
from sage_llm.gateway.settings import LiveSettings, ResolvedGateway, live_settings
from sage_llm.request_json import json_object

log = logging.getLogger("sage_llm.gateway")

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
LEAN_ROUTES = frozenset({COMPLETIONS_PATH, CHAT_PATH})
_JSON = "application/json"
_JSON_ERROR = "application/json; charset=utf-8"
_SSE_TYPE = SSE_HEADERS["Content-Type"]
_SSE_EXTRA = {k: v for k, v in SSE_HEADERS.items() if k != "Content-Type"}


class LeanRoutes:
    """The handler the lean server calls for each hot-route request."""

    def __init__(
        self, manager: ControlPlaneManager, settings: ResolvedGateway | LiveSettings
    ) -> None:
        self.manager = manager
        self.live = live_settings(settings)
        """Read once per request: its authentication and its parsing use one snapshot."""
        self._new_id = RequestIds()

    async def __call__(self, request: LeanRequest, conn: LeanConnection) -> None:
        started = time.perf_counter()
        given = request.headers.get("x-request-id", "").strip()
        valid = valid_request_id(given)
        rid = given if given and valid else self._new_id()
        headers = {REQUEST_ID_HEADER: rid}
        status = 500
        model: str | None = None
        try:
            if not valid:
                raise bad_request_id_error()
            settings = self.live.current
            if settings.api_keys:
                token = bearer_token(request.headers.get("authorization"))
                check_api_key(token, settings.api_keys)
            body = json_object(request.body)
            named = body.get("model")
            model = named if isinstance(named, str) else None
            status = await self._generate(request, conn, body, rid, headers, settings)
        except asyncio.CancelledError:
            status = 499  # the client went away
            raise
        except ConnectionResetError:
            status = 499
            log.info("client of request %s went away", rid, extra={"request_id": rid})
        except Exception as exc:
            status = self._error(conn, exc, request, rid, headers)
        finally:
            if status >= 400:
                self.manager.metrics.on_http_error(request.path, status)  # a served route
            if access_log.isEnabledFor(logging.INFO):
                latency_ms = (time.perf_counter() - started) * 1000.0
                write_access_log(rid, request.method, request.path, status, latency_ms, model)

    async def _generate(
        self,
        request: LeanRequest,
        conn: LeanConnection,
        body: dict[str, object],
        rid: str,
        headers: dict[str, str],
        settings: ResolvedGateway,
    ) -> int:
        chat = request.path == CHAT_PATH
        gens = parse_generations(body, request.headers, rid, chat=chat, settings=settings)
        for gen in gens:
            log_prompt(gen, settings)
        created = int(time.time())
        if gens[0].stream:

            async def open_stream() -> LeanStream:
                return conn.open_stream(
                    200, content_type=_SSE_TYPE, headers={**_SSE_EXTRA, **headers}
                )

            failed = await relay_stream(open_stream, self.manager, gens, created, rid)
            return 200 if failed is None else failed  # counted and logged as it ended
        if len(gens) == 1:  # no layer more for the common case
            body_out = await complete(self.manager, gens[0], created)
        else:
            body_out = await complete_all(self.manager, gens, created, rid)
        answer = jsonutil.dumps(body_out)
        conn.respond(200, answer, content_type=_JSON, headers=headers)
        return 200

    def read_timed_out(self, method: str, path: str, waited_s: float, given: str) -> str:
        """A request answered 408 by the lean server before it had all arrived: counted
        and logged as the aiohttp app counts and logs one; the request id of its answer
        (``given``, the id its head gave, when that is a valid one)."""
        rid = given if given and valid_request_id(given) else self._new_id()
        self.manager.metrics.on_http_error(route_label(path), 408)
        if access_log.isEnabledFor(logging.INFO):
            write_access_log(rid, method, path, 408, waited_s * 1000.0, None)
        return rid

    def client_gone_reading(self, method: str, path: str, waited_s: float, given: str) -> None:
        """A request whose client left while its body came: counted and logged as the
        aiohttp app counts and logs one (a 499)."""
        rid = given if given and valid_request_id(given) else self._new_id()
        self.manager.metrics.on_http_error(route_label(path), CLIENT_GONE)
        if access_log.isEnabledFor(logging.INFO):
            write_access_log(rid, method, path, CLIENT_GONE, waited_s * 1000.0, None)

    @staticmethod
    def _error(
        conn: LeanConnection,
        exc: Exception,
        request: LeanRequest,
        rid: str,
        headers: dict[str, str],
    ) -> int:
        """Answer ``exc`` as the error middleware would; the status sent."""
        if isinstance(exc, SageLLMError):
            log_failure(exc, rid)
            exc = as_answered(exc)
            status, payload = exc.http_status, exc.to_openai()
            headers = {**sage_error_headers(exc), **headers}
        else:
            log.error(
                "unhandled error in %s %s (request %s)",
                request.method, request.path, rid, exc_info=exc, extra={"request_id": rid},
            )  # fmt: skip
            status, payload = 500, error_body("internal server error", "internal_error", 500)
        if conn.answered:  # a stream already started: it ended itself
            return status
        try:
            conn.respond(status, jsonutil.dumps(payload), content_type=_JSON_ERROR, headers=headers)
        except ConnectionResetError:
            return 499
        return status
