"""The OpenAPI 3.1 document of the gateway (``GET /openapi.json``).

Schemas come from the pydantic models of :mod:`sage_llm.gateway.schemas`
(``model_json_schema``); every route the app serves is described here, with its request
body, its success response and the error responses it can give.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from sage_llm.config_fields import INT64_MAX
from sage_llm.gateway import schemas as s

_MODELS: tuple[type[BaseModel], ...] = (
    s.CompletionRequest,
    s.ChatCompletionRequest,
    s.EmbeddingRequest,
    s.CompletionResponse,
    s.ChatCompletionResponse,
    s.EmbeddingResponse,
    s.ModelCard,
    s.ModelList,
    s.ErrorResponse,
    s.HealthResponse,
    s.ReadyResponse,
    s.InstanceSpec,
    s.DrainRequest,
    s.ReloadRequest,
    s.SetPolicyRequest,
    s.LoadLoraAdapterRequest,
    s.UnloadLoraAdapterRequest,
    s.AdminObject,
)

_ERROR_TEXT = {
    "400": "Invalid request (``param`` names the field).",
    "401": "Missing or invalid API key / admin token.",
    "403": "Admin API: wrong admin token, or a non-loopback client without one configured; "
    "a generation naming a tenant's user (x-sage-user or user) without that tenant's key.",
    "404": "Unknown model, instance, policy or route.",
    "408": "The request did not arrive whole within read_timeout_s of its first byte.",
    "409": "Conflict: an instance id or request id in use, or an instance already being removed.",
    "413": "Request body too large.",
    "415": "A body in a Content-Encoding the gateway does not read (it reads gzip, deflate "
    "or none).",
    "417": "An Expect header other than 100-continue.",
    "501": "A Transfer-Encoding other than chunked.",
    "429": "Queue full or deadline infeasible; see the Retry-After header.",
    "500": "Internal error.",
    "502": "The engine failed.",
    "503": "No healthy instance (Retry-After, when one is cooling down), or the control "
    "plane is not running.",
    "504": "The request exceeded request_timeout_s or its deadline and was cancelled.",
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


_ANSWER_ID = {
    "X-Request-Id": {
        "description": "The request's id: the one the request gave, else a fresh one.",
        "schema": {"type": "string"},
    }
}
"""The header every answer carries."""


def _json(name: str, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "headers": dict(_ANSWER_ID),
        "content": {"application/json": {"schema": _ref(name)}},
    }


def _errors(*codes: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for code in codes:
        out[code] = _json("ErrorResponse", _ERROR_TEXT[code])
        if code in ("429", "503"):
            out[code]["headers"] = {
                **_ANSWER_ID,
                "Retry-After": {
                    "description": "Seconds to wait before retrying (integer >= 1).",
                    "schema": {"type": "integer", "minimum": 1},
                },
            }
    return out


_BODY_ERRORS = ("400", "401", "408", "413")
"""What a route that reads a body may answer before its own checks: a bad body or head,
no key, a slow or oversized upload (and, as every route, :data:`_HEAD_ERRORS`)."""
_HEAD_ERRORS = ("415", "417", "501")
"""What every route may answer for its request's head alone: a ``Content-Encoding`` the
gateway does not read, an ``Expect`` other than ``100-continue``, a ``Transfer-Encoding``
other than ``chunked``."""


def _header(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "in": "header",
        "required": False,
        "description": description,
        "schema": schema,
    }


_REQUEST_ID = _header(
    "x-request-id",
    "Request id (echoed back; generated when absent or empty; 400 when malformed).",
    {"type": "string", "pattern": "^[A-Za-z0-9._:\\-]{0,128}$"},
)
_PROBE_REQUEST_ID = _header(
    "x-request-id",
    "Request id, echoed back when well formed; a probe answers any other (or none) under a "
    "generated id, never with a 400.",
    {"type": "string"},
)
_NAMES = "|".join(
    "".join(f"[{c.upper()}{c}]" for c in name)
    for name in ("critical", "high", "normal", "low", "background")
)


def _at_most(bound: int) -> str:
    """A pattern of the decimal numbers 0 to ``bound``, leading zeros allowed."""
    digits = str(bound)
    n = len(digits)
    forms = [f"[0-9]{{1,{n - 1}}}"] if n > 1 else []
    for i, d in enumerate(digits):  # n digits: the bound's first i, then a smaller one
        if d != "0":
            forms.append(f"{digits[:i]}[0-{int(d) - 1}][0-9]{{{n - i - 1}}}")
    forms.append(digits)
    return f"0*({'|'.join(forms)})"


_INT64 = f"(-?{_at_most(INT64_MAX)}|-{_at_most(INT64_MAX + 1)})"
"""A whole number a 64-bit integer holds."""
_EXPONENT = "([eE][+-]?[0-9]{1,2})?"
_NUMBER = f"\\+?([0-9]{{1,200}}(\\.[0-9]{{0,200}})?|\\.[0-9]{{1,200}}){_EXPONENT}"
"""A number as a header gives it (ASCII digits, as JSON writes them), within the sizes
documented: up to 200 digits each side of the point, an exponent of one or two (always
finite, and never 0 but when written 0)."""
_POSITIVE = (
    f"\\+?(0{{0,199}}[1-9][0-9]{{0,199}}(\\.[0-9]{{0,200}})?"
    f"|0{{0,200}}\\.0{{0,199}}[1-9][0-9]{{0,200}}){_EXPONENT}"
)
"""One of them with a digit other than 0 before its exponent (> 0, as it is read)."""
_NEGATIVE_ZERO = f"-(0{{1,200}}(\\.0{{0,200}})?|\\.0{{1,200}}){_EXPONENT}"
"""Minus 0 (which is >= 0)."""
_GENERATION_HEADERS = [
    _REQUEST_ID,
    _header(
        "x-sage-priority",
        "Priority name (any case) or a 64-bit integer (0-4; others are taken as the nearest); wins "
        "over the body field. Read when given, even empty (a 400).",
        {"type": "string", "pattern": f"^({_INT64}|{_NAMES})$"},
    ),
    _header(
        "x-sage-slo-ms",
        "End-to-end latency target in ms, a number > 0 (the pattern bounds its digits, a few "
        "hundred, and its exponent, 1-2 digits; the gateway takes any finite number > 0); "
        "wins over the body field. Read when given, even empty (a 400).",
        {"type": "string", "pattern": f"^{_POSITIVE}$"},
    ),
    _header(
        "x-sage-cost-budget",
        "The most the request may cost (cost_optimized's budget), a number >= 0 (the pattern "
        "bounds its digits, 200 each side of the point, and its exponent, 1-2 digits; the "
        "gateway takes any finite number >= 0); wins over the body field. Read when given, "
        "even empty (a 400).",
        {"type": "string", "pattern": f"^({_NUMBER}|{_NEGATIVE_ZERO})$"},
    ),
    _header(
        "x-sage-user",
        "The user the fair policy shares the fleet among (and the session, without "
        "x-session-id); wins over the body's user, which still goes to the engine. A "
        "tenant's API key ([[gateway.tenants]]) decides the user instead; this header is "
        "then only the session.",
        {"type": "string"},
    ),
    _header(
        "x-session-id",
        "Session id for affinity routing (else x-sage-user, else the body's user; with "
        "neither, a tenant's requests have no session).",
        {"type": "string"},
    ),
]

Security = list[dict[str, list[str]]]
_USER: Security = [{"apiKey": []}, {}]
_ADMIN: Security = [{"adminToken": []}, {}]


def _generation(summary: str, request: str, response: str, op: str) -> dict[str, Any]:
    ok = _json(response, "The completion, or a text/event-stream when stream is true.")
    ok["content"]["text/event-stream"] = {
        "schema": {"type": "string", "description": "data: {chunk}\\n\\n … data: [DONE]\\n\\n"}
    }
    return {
        "post": {
            "operationId": op,
            "summary": summary,
            "tags": ["openai"],
            "security": _USER,
            "parameters": _GENERATION_HEADERS,
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref(request)}},
            },
            "responses": {
                "200": ok,
                **_errors(*_BODY_ERRORS, "403", "404", "409", "429", "500", "502", "503", "504"),
            },
        }
    }


def _get(
    op: str,
    summary: str,
    response: dict[str, Any],
    tags: list[str],
    security: Security | None,
    *errors: str,
    request_id: dict[str, Any] = _REQUEST_ID,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "operationId": op,
        "summary": summary,
        "tags": tags,
        "parameters": [request_id],
        "responses": {"200": response, **_errors(*errors)},
    }
    if security is not None:
        body["security"] = security
    return body


def _admin(
    method: str,
    op: str,
    summary: str,
    request: str | None,
    *errors: str,
    path_param: bool | str = False,
    ok: str = "200",
) -> dict[str, Any]:
    params: list[dict[str, Any]] = [_REQUEST_ID]
    if path_param:
        name = path_param if isinstance(path_param, str) else "instance_id"
        params.append({"name": name, "in": "path", "required": True, "schema": {"type": "string"}})
    out: dict[str, Any] = {
        "operationId": op,
        "summary": summary,
        "tags": ["admin"],
        "security": _ADMIN,
        "parameters": params,
        "responses": {
            ok: _json("AdminObject", "Done."),
            **_errors(*sorted({"400", "401", "403", *errors, *(_BODY_ERRORS if request else ())})),
        },
    }
    if request is not None:
        out["requestBody"] = {
            "required": method not in ("drain", "unload", "reload"),
            "content": {"application/json": {"schema": _ref(request)}},
        }
    return out


def build_openapi(version: str = "0.1.0") -> dict[str, Any]:
    """The OpenAPI 3.1 document of every gateway route."""
    _, top = models_json_schema(
        [(m, "validation") for m in _MODELS], ref_template="#/components/schemas/{model}"
    )
    text = {
        "description": "Prometheus text format 0.0.4.",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }
    paths: dict[str, Any] = {
        "/v1/completions": _generation(
            "Text completion", "CompletionRequest", "CompletionResponse", "createCompletion"
        ),
        "/v1/chat/completions": _generation(
            "Chat completion",
            "ChatCompletionRequest",
            "ChatCompletionResponse",
            "createChatCompletion",
        ),
        "/v1/embeddings": {
            "post": {
                "operationId": "createEmbedding",
                "summary": "Embeddings from an instance serving the model",
                "tags": ["openai"],
                "security": _USER,
                "parameters": [_REQUEST_ID],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("EmbeddingRequest")}},
                },
                "responses": {
                    "200": _json("EmbeddingResponse", "The embeddings."),
                    **_errors(*_BODY_ERRORS, "404", "409", "500", "502", "503", "504"),
                },
            }
        },
        "/v1/models": {
            "get": _get(
                "listModels",
                "Models served by the fleet",
                _json("ModelList", "One card per served model."),
                ["openai"],
                _USER,
                "400",
                "401",
            )
        },
        "/v1/models/{model}": {
            "get": {
                **_get(
                    "retrieveModel",
                    "One served model",
                    _json("ModelCard", "The card."),
                    ["openai"],
                    _USER,
                    "400",
                    "401",
                    "404",
                ),
                "parameters": [
                    _REQUEST_ID,
                    {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}},
                ],
            }
        },
        "/health": {
            "get": _get(
                "health",
                "Liveness: 200 while the control plane runs",
                _json("HealthResponse", "Running."),
                ["probes"],
                None,
                "503",
                request_id=_PROBE_REQUEST_ID,
            )
        },
        "/ready": {
            "get": _get(
                "ready",
                "Readiness: 200 when a request can run (a model has an instance, or a PD "
                "pair, that is healthy and accepting); 503 while draining to stop",
                _json("ReadyResponse", "Ready."),
                ["probes"],
                None,
                "503",
                request_id=_PROBE_REQUEST_ID,
            )
        },
        "/metrics": {
            "get": _get(
                "metrics",
                "Prometheus metrics",
                text,
                ["probes"],
                None,
                request_id=_PROBE_REQUEST_ID,
            )
        },
        "/openapi.json": {
            "get": _get(
                "openapi",
                "This document",
                {
                    "description": "OpenAPI 3.1 document.",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
                ["probes"],
                None,
                "400",  # a malformed x-request-id
            )
        },
        "/admin/instances": {
            "get": _admin("get", "listInstances", "Registered instances", None),
            "post": _admin(
                "post",
                "addInstance",
                "Register an instance",
                "InstanceSpec",
                "400",
                "408",
                "409",
                "413",
                ok="201",
            ),
        },
        "/admin/instances/{instance_id}/drain": {
            "post": _admin(
                "drain",
                "drainInstance",
                "Drain (or undrain) an instance",
                "DrainRequest",
                "400",
                "404",
                "408",
                "409",
                "413",
                path_param=True,
            ),
        },
        "/admin/instances/{instance_id}": {
            "delete": _admin(
                "delete",
                "removeInstance",
                "Remove an instance",
                None,
                "404",
                "409",
                path_param=True,
            ),
        },
        "/admin/lora_adapters": {
            "post": _admin(
                "post",
                "loadLoraAdapter",
                "Load a LoRA adapter on instances (vLLM's /v1/load_lora_adapter on each)",
                "LoadLoraAdapterRequest",
                "400",
                "404",
                "408",
                "413",
                "502",
            ),
        },
        "/admin/lora_adapters/{name}": {
            "delete": _admin(
                "unload",
                "unloadLoraAdapter",
                "Unload a LoRA adapter (vLLM's /v1/unload_lora_adapter on each instance)",
                "UnloadLoraAdapterRequest",
                "400",
                "404",
                "408",
                "413",
                "502",
                path_param="name",
            ),
        },
        "/admin/set_policy": {
            "post": _admin(
                "post",
                "setPolicy",
                "Switch the scheduling policy",
                "SetPolicyRequest",
                "400",
                "404",
                "408",
                "413",
            ),
        },
        "/admin/reload": {
            "post": _admin(
                "reload",
                "reload",
                "Read the [gateway] table of the config file again: keys, tenants, admin "
                "token and request limits change at once (400: the file has a problem and "
                "nothing changed; 409: no config file)",
                "ReloadRequest",
                "400",
                "408",
                "409",
                "413",
            ),
        },
        "/admin/status": {"get": _admin("get", "status", "Control plane status", None)},
        "/admin/metrics": {"get": _admin("get", "adminMetrics", "Aggregate metrics (JSON)", None)},
    }
    for ops in paths.values():  # the front refuses these before any route, bodies or not
        for op in ops.values():
            op["responses"].update(
                {code: body for code, body in _errors(*_HEAD_ERRORS).items()
                 if code not in op["responses"]}
            )  # fmt: skip
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "sage-llm gateway",
            "version": version,
            "description": "OpenAI-compatible API over a sage-llm control plane, plus its "
            "admin API.",
        },
        "paths": paths,
        "components": {
            "schemas": top.get("$defs", {}),
            "securitySchemes": {
                "apiKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key (when keys are configured).",
                },
                "adminToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The admin token (when configured).",
                },
            },
        },
    }
