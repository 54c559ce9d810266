"""The OpenAPI document describes every route, and real answers match its schemas."""

from __future__ import annotations

import re
from typing import Any

import aiohttp
import pytest

from sage_llm.gateway.app import create_app
from sage_llm.gateway.openapi import build_openapi
from sage_llm.gateway.schemas import (
    ChatCompletionResponse,
    CompletionResponse,
    EmbeddingResponse,
    ErrorResponse,
    ModelList,
)
from tests.gateway.harness import chat_body, completion_body, make_manager, serve


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_every_route_is_documented_and_every_ref_resolves() -> None:
    manager, _, _ = make_manager(1)
    app = create_app(manager)
    doc = build_openapi()
    assert doc["openapi"] == "3.1.0"
    routes = {
        (r.method.lower(), r.resource.canonical.replace("{model:.+}", "{model}"))
        for r in app.router.routes()
        if r.method != "HEAD" and r.resource is not None
    }
    documented = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    assert routes == documented
    schemas = doc["components"]["schemas"]
    for ref in _refs(doc):
        assert ref.startswith("#/components/schemas/")
        assert ref.rsplit("/", 1)[1] in schemas, ref
    ids = [op["operationId"] for ops in doc["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids))
    for path, ops in doc["paths"].items():
        for op in ops.values():
            assert "200" in op["responses"] or "201" in op["responses"], path
            names = [p["name"] for p in op.get("parameters", []) if p["in"] == "path"]
            assert names == [seg[1:-1] for seg in path.split("/") if seg.startswith("{")]


def test_routes_with_a_body_list_what_the_body_may_be_refused_with() -> None:
    """415 (an unread Content-Encoding) and 417 (an unknown Expect) are sent on every route
    that reads a body, and 409 (a request id in progress) on embeddings too: a client
    generated from the document had not been told of them."""
    doc = build_openapi()
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert {"415", "417", "501"} <= set(op["responses"]), (method, path)  # any request's
            if "requestBody" in op:
                assert {"408", "413"} <= set(op["responses"]), (method, path)
    assert "409" in doc["paths"]["/v1/embeddings"]["post"]["responses"]


def test_request_schemas_allow_unknown_fields_and_name_required_ones() -> None:
    schemas = build_openapi()["components"]["schemas"]
    completion = schemas["CompletionRequest"]
    assert completion["additionalProperties"] is True
    assert set(completion["required"]) == {"model", "prompt"}
    assert set(schemas["ChatCompletionRequest"]["required"]) == {"model", "messages"}
    assert "priority" in completion["properties"]
    # a completion's 0 is for echo: true only (the prompt alone); a chat's is at least 1
    assert completion["properties"]["max_tokens"]["anyOf"][0]["minimum"] == 0
    chat = schemas["ChatCompletionRequest"]["properties"]["max_tokens"]
    assert chat["anyOf"][0]["minimum"] == 1


async def test_served_document_and_real_answers_match_the_schemas() -> None:
    async with serve(1) as gw, aiohttp.ClientSession() as http:
        async with http.get(gw.url("/openapi.json")) as r:
            assert r.status == 200
            assert await r.json() == build_openapi()
        async with http.post(gw.url("/v1/completions"), json=completion_body(n=1)) as r:
            CompletionResponse.model_validate(await r.json())
        async with http.post(gw.url("/v1/chat/completions"), json=chat_body()) as r:
            ChatCompletionResponse.model_validate(await r.json())
        async with http.post(
            gw.url("/v1/embeddings"), json={"model": "llama-3-8b", "input": "hi"}
        ) as r:
            EmbeddingResponse.model_validate(await r.json())
        async with http.get(gw.url("/v1/models")) as r:
            ModelList.model_validate(await r.json())
        async with http.post(gw.url("/v1/completions"), json={"prompt": "x"}) as r:
            ErrorResponse.model_validate(await r.json())


WEIRD_VALUES: list[Any] = [
    None,
    True,
    False,
    -1,
    0,
    1,
    2.5,
    1e308,
    "",
    "x",
    "9" * 600,
    [],
    [1],
    ["a"],
    [[1]],
    [None],
    {},
    {"a": 1},
    {"role": "user"},
    [{"role": "user", "content": "hi"}],
]

MUTATED = {
    "/v1/completions": completion_body(max_tokens=2),
    "/v1/chat/completions": chat_body(max_tokens=2),
    "/v1/embeddings": {"model": "llama-3-8b", "input": "hi"},
    "/admin/set_policy": {"policy": "fifo", "params": {}},
}


def _documented(doc: dict[str, Any], path: str, method: str) -> set[int]:
    return {int(code) for code in doc["paths"][path][method]["responses"]}


async def test_mutated_bodies_only_get_documented_statuses_and_never_500() -> None:
    doc = build_openapi()
    async with serve(1) as gw, aiohttp.ClientSession() as http:
        for path, valid in MUTATED.items():
            allowed = _documented(doc, path, "post")
            bodies: list[Any] = [valid, {}, *WEIRD_VALUES]
            for field in [*valid, "stream", "n", "stop", "priority", "unknown_field"]:
                bodies.append({k: v for k, v in valid.items() if k != field})
                bodies.extend({**valid, field: value} for value in WEIRD_VALUES)
            for body in bodies:
                async with http.post(gw.url(path), json=body) as r:
                    await r.read()
                    assert r.status in allowed, (path, body, r.status)
                    assert r.status != 500, (path, body)
                    if r.status >= 400:
                        ErrorResponse.model_validate(await r.json())


_SCHEMA_CASES: list[tuple[str, str, dict[str, Any], bool]] = [
    # (route, request schema, body, accepted by the gateway)
    ("/v1/completions", "CompletionRequest", {"prompt": "hi"}, True),
    ("/v1/completions", "CompletionRequest", {"prompt": ["a", "b"]}, True),
    ("/v1/completions", "CompletionRequest", {"prompt": [[1, 2], [3]]}, True),
    ("/v1/completions", "CompletionRequest", {"prompt": ""}, False),
    ("/v1/completions", "CompletionRequest", {"prompt": []}, False),
    ("/v1/completions", "CompletionRequest", {"prompt": ["a", ""]}, False),
    ("/v1/completions", "CompletionRequest", {"prompt": [[1], []]}, False),
    ("/v1/completions", "CompletionRequest", {"prompt": [-1]}, False),
    (
        "/v1/chat/completions",
        "ChatCompletionRequest",
        {"messages": [{"role": "user", "content": "x"}]},
        True,
    ),
    (
        "/v1/chat/completions",
        "ChatCompletionRequest",
        {"messages": [{"role": "assistant", "content": None}, {"role": "user", "content": "x"}]},
        True,
    ),
    (
        "/v1/chat/completions",
        "ChatCompletionRequest",
        {"messages": [{"role": "", "content": "x"}]},
        False,
    ),
    (
        "/v1/chat/completions",
        "ChatCompletionRequest",
        {"messages": [{"role": "user", "content": None}]},
        False,
    ),
    (
        "/v1/chat/completions",
        "ChatCompletionRequest",
        {"messages": [{"role": "user", "content": [{"text": "a"}]}]},  # a part without a type
        False,
    ),
    (
        "/v1/chat/completions",
        "ChatCompletionRequest",
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]},
        True,
    ),
    ("/v1/embeddings", "EmbeddingRequest", {"input": ["a", "b"]}, True),
    ("/v1/embeddings", "EmbeddingRequest", {"input": [5, 6]}, True),
    ("/v1/embeddings", "EmbeddingRequest", {"input": []}, False),
    ("/v1/embeddings", "EmbeddingRequest", {"input": [[]]}, False),
    ("/v1/embeddings", "EmbeddingRequest", {"input": [-5]}, False),
]


async def test_the_request_schemas_refuse_what_the_gateway_refuses() -> None:
    """A client generated from /openapi.json (or a validator) and the server agree on the
    bodies checked beyond their types: empty prompts, negative token ids, an empty role,
    a null content where it is required, empty embeddings inputs."""
    jsonschema_rs = pytest.importorskip("jsonschema_rs")  # comes with schemathesis
    doc = build_openapi()
    async with serve(1) as gw, aiohttp.ClientSession() as http:
        for route, name, fields, accepted in _SCHEMA_CASES:
            body = {"model": "llama-3-8b", "max_tokens": 2, **fields}
            if route == "/v1/embeddings":
                del body["max_tokens"]
            schema = {"$ref": f"#/components/schemas/{name}", "components": doc["components"]}
            assert jsonschema_rs.is_valid(schema, body) is accepted, (name, fields)
            async with http.post(gw.url(route), json=body) as r:
                assert (r.status == 200) is accepted, (fields, await r.text())


_HEADER_VALUES = {
    "x-sage-priority": [
        "high", "HIGH", "low", "3", "-5", "99", "", "urgent", "0", "1.5", "+3", "-0",
        "000000000000000000003", "9223372036854775807", "9223372036854775808",
        "-9223372036854775808", "-9223372036854775809", "99999999999999999999",
    ],
    "x-sage-slo-ms": [
        "1", "0", "0.0", "0e5", ".5", "+3", "-1", "1e3", "", "7", "abc", "1_0", "1e99",
        "1e-99", "1" + "0" * 150, "0." + "0" * 150 + "1", "-0", "1.", "1e", "e5",
        "0" * 101 + "5", "0" * 199 + "5",
    ],
    "x-sage-cost-budget": [
        "0", "1.5", "-1", "", "+0", "1e2", "x", "1_0", "-0", "-0.0", "-.0e5", "-0.1", "1e99",
    ],
}  # fmt: skip


@pytest.mark.parametrize("header", sorted(_HEADER_VALUES))
async def test_the_documented_header_patterns_are_what_the_gateway_takes(header: str) -> None:
    """A value matches the header's pattern exactly when the gateway takes it (a 400
    otherwise, even empty: a header given is read), within the sizes the document gives
    (a number's pattern bounds its digits and exponent: past them the gateway may take
    more, but nothing the pattern matches is refused)."""
    (schema,) = [
        p["schema"]
        for p in build_openapi()["paths"]["/v1/completions"]["post"]["parameters"]
        if p["name"] == header
    ]
    async with serve(1) as gw, aiohttp.ClientSession() as http:
        for value in _HEADER_VALUES[header]:
            body = completion_body(max_tokens=1)
            async with http.post(
                gw.url("/v1/completions"), json=body, headers={header: value}
            ) as resp:
                taken = resp.status != 400  # (a 1 ms SLO is taken, then a 504)
            documented = re.search(schema["pattern"], value) is not None
            assert taken == documented, (header, value, resp.status)


async def test_probes_answer_any_request_id_as_documented() -> None:
    doc = build_openapi()
    for path in ("/health", "/ready", "/metrics"):
        (param,) = doc["paths"][path]["get"]["parameters"]
        assert param["name"] == "x-request-id" and "pattern" not in param["schema"]
    assert "400" in doc["paths"]["/openapi.json"]["get"]["responses"]
    async with serve(1) as gw, aiohttp.ClientSession() as http:
        for path in ("/health", "/ready", "/metrics"):
            async with http.get(gw.url(path), headers={"x-request-id": "bad id"}) as resp:
                assert resp.status == 200 and resp.headers["x-request-id"] != "bad id"
        async with http.get(gw.url("/openapi.json"), headers={"x-request-id": "bad id"}) as r:
            assert r.status == 400


def test_every_429_and_503_documents_its_retry_after_header() -> None:
    doc = build_openapi()
    answers = [
        (path, code, answer)
        for path, ops in doc["paths"].items()
        for op in ops.values()
        for code, answer in op["responses"].items()
        if code in ("429", "503")
    ]
    assert {code for _, code, _ in answers} == {"429", "503"}
    for path, code, answer in answers:
        assert "Retry-After" in answer.get("headers", {}), (path, code)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_generation_routes_document_the_optional_sage_headers(path: str) -> None:
    params = build_openapi()["paths"][path]["post"]["parameters"]
    headers = {p["name"]: p for p in params if p["in"] == "header"}
    for name in ("x-request-id", "x-sage-priority", "x-sage-slo-ms", "x-sage-user", "x-session-id"):
        assert headers[name]["required"] is False, name
