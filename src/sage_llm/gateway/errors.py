"""OpenAI-style JSON error bodies for every failure the gateway answers.

:func:`error_middleware` turns

* a :class:`~sage_llm.errors.SageLLMError` into its ``http_status`` and ``to_openai()``
  body (429 answers carry ``Retry-After``, 401 answers ``WWW-Authenticate``);
* aiohttp's own ``HTTPException`` (404 unknown route, 405, 413 body too large …) into the
  same JSON shape;
* any other exception into a 500 whose body does not leak internals (the traceback is
  logged with the request id).

What fails before the app sees it (a request aiohttp cannot parse) gets the same shape from
:func:`protocol_error_body` (see :mod:`sage_llm.gateway.server`).
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from sage_llm.errors import (
    AdmissionError,
    AuthenticationError,
    ConflictError,
    NoHealthyInstanceError,
    OverBudgetError,
    SageLLMError,
    SLOInfeasibleError,
)

log = logging.getLogger("sage_llm.gateway")

REQUEST_ID_KEY = web.RequestKey("request_id", str)
"""The request id of an ``aiohttp.web.Request`` (``request[REQUEST_ID_KEY]``)."""

RESPONSE_HEADERS_KEY = web.RequestKey[dict[str, str]]("response_headers")
"""Headers every response to the request carries (request id, CORS); streaming handlers
add them before ``prepare()``, the outer middleware adds them to the others."""

MODEL_KEY = web.RequestKey("model", str)
"""The model a request asked for, for the access log."""

_HTTP_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


def error_body(message: str, error_type: str, status: int, param: str | None = None) -> Any:
    """The ``{"error": {...}}`` object of an OpenAI-style error."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": status}}


def retry_after_header(seconds: float | None) -> str:
    """``Retry-After`` value: whole seconds, at least 1."""
    if seconds is None or math.isnan(seconds) or seconds <= 0:
        return "1"
    return str(max(1, math.ceil(seconds)))


def sage_error_headers(exc: SageLLMError) -> dict[str, str]:
    """The headers an error's response carries: ``Retry-After`` on admission refusals
    (not on an infeasible deadline) and on a 503 while instances are cooling down,
    ``WWW-Authenticate`` on 401, and ``x-should-retry: false`` on the refusals that a retry
    would meet again though their status is one clients retry (an infeasible deadline's
    or a cost budget's 429, a conflict's 409): the OpenAI SDKs read it and do not retry."""
    headers: dict[str, str] = {}
    if isinstance(exc, (SLOInfeasibleError, OverBudgetError, ConflictError)):
        headers["x-should-retry"] = "false"
    elif isinstance(exc, AdmissionError):
        # an infeasible deadline is as infeasible later: no Retry-After invites a retry
        headers["Retry-After"] = retry_after_header(exc.retry_after_s)
    elif isinstance(exc, NoHealthyInstanceError) and exc.retry_after_s is not None:
        headers["Retry-After"] = retry_after_header(exc.retry_after_s)
    if isinstance(exc, AuthenticationError):
        headers["WWW-Authenticate"] = "Bearer"
    return headers


def as_answered(exc: SageLLMError) -> SageLLMError:
    """``exc`` as the gateway answers it: a request id already in progress is the
    ``x-request-id`` header's (the gateway's requests take their id from it), not the
    control plane's ``request_id`` argument."""
    if isinstance(exc, ConflictError) and exc.param == "request_id":
        exc.param = "x-request-id"
    return exc


def sage_error_response(exc: SageLLMError) -> web.Response:
    """The JSON response of a :class:`SageLLMError`."""
    exc = as_answered(exc)
    return web.json_response(
        exc.to_openai(), status=exc.http_status, headers=sage_error_headers(exc)
    )


def http_error_response(exc: web.HTTPException) -> web.Response:
    """A JSON body for one of aiohttp's HTTP errors (keeps its status and ``Allow``)."""
    status = exc.status
    if status == 404:
        message = "no such route"
    elif status == 405:
        message = f"method not allowed; allowed: {exc.headers.get('Allow', '')}".rstrip("; ")
    else:
        message = exc.text if exc.text and not exc.text.startswith(f"{status}:") else exc.reason
    headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
    body = error_body(message, _HTTP_TYPES.get(status, "internal_error"), status)
    resp = web.json_response(body, status=status, headers=headers)
    if status == 408:  # the rest of a stalled body may still come: nothing after it is a request
        resp.force_close()
    return resp


_QUOTED_HEADER = re.compile(r"""b['"]([!#$%&'*+.^_`|~0-9A-Za-z-]+):""")
"""The name of the header line aiohttp's parser quotes in its message (``b'Content-Length:
abc'``)."""


def protocol_error_body(status: int, message: str | None) -> Any:
    """The error body for a request aiohttp answered without the app: ``status`` 400 for a
    head it could not parse (``message`` is the parser's, which quotes the client's bytes:
    only its reason is kept, and ``param`` is the header it quotes, lower-cased, if any); 500
    for a failure outside the app."""
    if status >= 500:
        return error_body("internal server error", "internal_error", status)
    text = message or ""
    found = _QUOTED_HEADER.search(text)
    text = text.split("\n\n", 1)[0].split(": b'", 1)[0].split(': b"', 1)[0]
    lines = (line.strip().rstrip(":").rstrip() for line in text.splitlines())
    reason = ": ".join(line for line in lines if line) or "it could not be parsed"
    return error_body(
        f"malformed HTTP request: {reason}",
        _HTTP_TYPES.get(status, "invalid_request_error"),
        status,
        found.group(1).lower() if found else None,
    )


def internal_error_response() -> web.Response:
    body = error_body("internal server error", "internal_error", 500)
    return web.json_response(body, status=500)


def log_failure(exc: SageLLMError, request_id: str) -> None:
    """Log why a request failed (the access line gives only the status), with its id as
    the record's ``request_id`` (a field of its own in JSON logs): on the fleet's side (a
    5xx: an engine failed, a deadline passed, the control plane stopped) as a warning, as
    a stream's error event is logged; the client's (a 4xx: a bad field, an unknown model,
    an engine's refusal of the request …) at INFO, and so a 503 for want of a healthy
    instance: in an outage every request gets one, and the outage itself is logged once,
    as it happens (ejections, drains), and counted in
    ``sage_llm_requests_rejected_total``."""
    fleet = exc.http_status >= 500 and not isinstance(exc, NoHealthyInstanceError)
    level = logging.WARNING if fleet else logging.INFO
    if log.isEnabledFor(level):
        log.log(
            level, "request %s failed (%d %s): %s", request_id, exc.http_status,
            exc.error_type, exc, extra={"request_id": request_id},
        )  # fmt: skip


def error_response(request: web.Request, exc: Exception) -> web.Response:
    """The JSON response for ``exc`` raised while handling ``request`` (see the module
    docstring); an ``HTTPException`` below 400 (a redirect) is raised again."""
    if isinstance(exc, SageLLMError):
        log_failure(exc, request.get(REQUEST_ID_KEY, "-"))
        return sage_error_response(exc)
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            raise exc
        return http_error_response(exc)
    log.error(
        "unhandled error in %s %s (request %s)",
        request.method,
        request.path,
        request.get(REQUEST_ID_KEY, "-"),
        exc_info=exc,
        extra={"request_id": request.get(REQUEST_ID_KEY, "-")},
    )
    return internal_error_response()


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Convert every failure of ``handler`` into an OpenAI-style JSON response."""
    try:
        return await handler(request)
    except Exception as exc:
        return error_response(request, exc)
