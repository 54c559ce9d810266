"""Turning OpenAI bodies and sage-llm headers into a Generation (pure parsing)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from sage_llm.config import GatewayConfig
from sage_llm.errors import InvalidRequestError, PermissionDeniedError
from sage_llm.gateway.openai import (
    CONSUMED_FIELDS,
    _plain_body,
    parse_generation,
    parse_generations,
    validate,
)
from sage_llm.gateway.relay import Generation
from sage_llm.gateway.schemas import ChatCompletionRequest, CompletionRequest
from sage_llm.gateway.settings import ResolvedGateway
from sage_llm.request_json import json_object
from sage_llm.types import RequestPriority
from tests.factories import MODEL

SETTINGS = ResolvedGateway.from_settings(
    GatewayConfig(request_timeout_s=60.0, max_tokens_limit=512), {}
)


def _parse(
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
    *,
    chat: bool = False,
    settings: ResolvedGateway = SETTINGS,
) -> Generation:
    return parse_generation(body, headers or {}, "rid-1", chat=chat, settings=settings)


def test_completion_fields_map_onto_request_metadata() -> None:
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 7, "temperature": 0.5,
            "top_p": 0.9, "stop": "END", "user": "u1"}  # fmt: skip
    gen = _parse(body)
    meta = gen.meta
    assert meta.request_id == "rid-1"
    assert (meta.prompt, meta.messages, meta.model_name) == ("Hello", None, MODEL)
    assert (meta.max_tokens, meta.temperature, meta.top_p) == (7, 0.5, 0.9)
    assert meta.stop == ["END"]
    assert (meta.user_id, meta.session_id) == ("u1", "u1")
    assert meta.priority is RequestPriority.NORMAL
    assert meta.extra_body == {"user": "u1"}  # passed on as well
    assert (gen.chat, gen.stream, gen.include_usage, gen.timeout_s) == (False, False, False, 60.0)


def test_defaults_are_left_to_the_engine() -> None:
    meta = _parse({"model": MODEL, "prompt": "Hi"}).meta
    assert (meta.max_tokens, meta.engine_max_tokens) == (None, True)  # as vLLM's server
    assert (meta.temperature, meta.top_p) == (None, None)  # the engine's own defaults
    assert meta.stop is None


def test_every_other_field_passes_through_unchanged() -> None:
    nested = {"deep": [1, {"x": None}]}
    body = {"model": MODEL, "prompt": "Hi", "n": 3, "logprobs": 2, "seed": 1, "echo": True,
            "custom": nested, "priority": 1, "slo_deadline_ms": 900.0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    meta = _parse(body).meta
    assert meta.extra_body == {"n": 3, "logprobs": 2, "seed": 1, "echo": True, "custom": nested}
    assert meta.extra_body["custom"] is nested
    assert not CONSUMED_FIELDS & set(meta.extra_body)


def test_user_is_the_session_and_is_passed_on_too() -> None:
    meta = _parse({"model": MODEL, "prompt": "Hi", "user": "u-7"}).meta
    assert (meta.user_id, meta.session_id) == ("u-7", "u-7")
    assert meta.extra_body == {"user": "u-7"}  # the engine gets it (OpenAI servers use it)


@pytest.mark.parametrize(
    ("value", "where", "expected"),
    [
        (-10, "body", RequestPriority.CRITICAL),
        (10, "body", RequestPriority.BACKGROUND),
        (3, "body", RequestPriority.LOW),
        ("-3", "header", RequestPriority.CRITICAL),
        ("7", "header", RequestPriority.BACKGROUND),
        # leading zeros past what int() reads (4,300 digits) are still the number
        ("-" + "0" * 5000 + "3", "header", RequestPriority.CRITICAL),
        ("0" * 5000 + "3", "body", RequestPriority.LOW),
    ],
)
def test_an_integer_priority_outside_0_to_4_is_the_nearest_end(
    value: int | str, where: str, expected: RequestPriority
) -> None:
    """vLLM's ``priority`` is any integer, lower sooner: the same order, not a 400."""
    body: dict[str, Any] = {"model": MODEL, "prompt": "Hi"}
    headers: dict[str, str] = {}
    if where == "body":
        body["priority"] = value
    else:
        headers["x-sage-priority"] = str(value)
    assert _parse(body, headers).meta.priority is expected


def test_chat_messages_are_kept_as_sent() -> None:
    parts = [{"type": "text", "text": "Hi"}]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": parts, "name": "u"},
    ]
    gen = _parse({"model": MODEL, "messages": messages, "max_completion_tokens": 9}, chat=True)
    assert gen.meta.messages == messages
    assert gen.meta.prompt is None
    assert gen.meta.max_tokens == 9
    assert gen.chat


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [("text", "text"), (["one"], "one"), ([1, 2, 3], [1, 2, 3]), ([[4, 5]], [4, 5])],
)
def test_prompt_shapes(prompt: Any, expected: Any) -> None:
    assert _parse({"model": MODEL, "prompt": prompt}).meta.prompt == expected


@pytest.mark.parametrize("prompt", [[], ["a", "b"], [[1], [2]], [-1, 2]])
def test_unsupported_prompts(prompt: Any) -> None:
    with pytest.raises(InvalidRequestError) as err:
        _parse({"model": MODEL, "prompt": prompt})
    assert err.value.param == "prompt"


def test_a_list_of_one_prompt_is_one_request() -> None:
    """Not a batch of one: its request id is the request's own (no ``#0``)."""
    (gen,) = parse_generations({"model": MODEL, "prompt": ["hello"]}, {}, "rid-1", chat=False,
                               settings=SETTINGS)  # fmt: skip
    assert (gen.request_id, gen.meta.prompt) == ("rid-1", "hello")


def test_prompt_logprobs_are_passed_through_unless_streamed() -> None:
    """As vLLM: taken without ``stream``, refused with it."""
    gen = _parse({"model": MODEL, "prompt": "Hi", "prompt_logprobs": 1})
    assert gen.meta.extra_body == {"prompt_logprobs": 1}
    with pytest.raises(InvalidRequestError) as err:
        _parse({"model": MODEL, "prompt": "Hi", "prompt_logprobs": 1, "stream": True})
    assert err.value.param == "prompt_logprobs"


def test_headers_win_over_body_fields() -> None:
    body = {"model": MODEL, "prompt": "Hi", "priority": "low", "slo_deadline_ms": 5000,
            "user": "body-user"}  # fmt: skip
    headers = {"x-sage-priority": "HIGH", "x-sage-slo-ms": "250", "x-session-id": "sess-9"}
    meta = _parse(body, headers).meta
    assert meta.priority is RequestPriority.HIGH
    assert meta.slo_deadline_ms == 250.0
    assert meta.session_id == "sess-9"
    assert meta.user_id == "body-user"
    by_header = _parse(body, {"x-sage-user": " tenant-a "}).meta
    assert (by_header.user_id, by_header.session_id) == ("tenant-a", "tenant-a")
    assert by_header.extra_body["user"] == "body-user"  # the engine gets the client's own
    assert _parse(body, {"x-sage-user": ""}).meta.user_id == "body-user"
    body_only = _parse(body).meta
    assert body_only.priority is RequestPriority.LOW
    assert body_only.slo_deadline_ms == 5000
    assert body_only.session_id == "body-user"


def test_a_tenants_key_decides_the_user_not_the_session() -> None:
    settings = replace(SETTINGS, tenant_keys=(("sk-a", "team-a"),))
    body = {"model": MODEL, "prompt": "Hi", "user": "end-user-7"}
    tenant = {"authorization": "Bearer sk-a", "x-sage-user": "someone"}
    meta = _parse(body, tenant, settings=settings).meta
    assert (meta.user_id, meta.session_id) == ("team-a", "someone")
    meta = _parse(body, {"authorization": "Bearer sk-a"}, settings=settings).meta
    assert (meta.user_id, meta.session_id) == ("team-a", "end-user-7")
    assert meta.extra_body["user"] == "end-user-7"
    alone = _parse({"model": MODEL, "prompt": "Hi"}, {"authorization": "Bearer sk-a"},
                   settings=settings).meta  # fmt: skip
    assert (alone.user_id, alone.session_id, alone.session_from_user) == ("team-a", None, False)
    plain = _parse(body, {"authorization": "Bearer other"}, settings=settings).meta
    assert (plain.user_id, plain.session_id) == ("end-user-7", "end-user-7")
    assert plain.session_from_user


@pytest.mark.parametrize(
    ("headers", "fields", "param"),
    [({"x-sage-user": "team-a"}, {}, "x-sage-user"), ({}, {"user": "team-a"}, "user")],
)
def test_a_tenants_user_named_without_its_key_is_refused(
    headers: dict[str, str], fields: dict[str, str], param: str
) -> None:
    """A tenant's user is its key's alone: another key naming it would spend its share,
    weight and queue bound (403, naming the field)."""
    settings = replace(SETTINGS, tenant_keys=(("sk-a", "team-a"),))
    body = {"model": MODEL, "prompt": "Hi", **fields}
    with pytest.raises(PermissionDeniedError, match="'team-a' is a tenant's") as caught:
        _parse(body, {"authorization": "Bearer plain", **headers}, settings=settings)
    assert caught.value.param == param
    mine = _parse(body, {"authorization": "Bearer sk-a", **headers}, settings=settings).meta
    assert mine.user_id == "team-a"


def test_timeout_is_the_tighter_of_request_timeout_and_slo() -> None:
    assert _parse({"model": MODEL, "prompt": "Hi", "slo_deadline_ms": 2000}).timeout_s == 2.0
    assert _parse({"model": MODEL, "prompt": "Hi", "slo_deadline_ms": 90_000}).timeout_s == 60.0
    open_ended = replace(SETTINGS, request_timeout_s=None)
    assert _parse({"model": MODEL, "prompt": "Hi"}, settings=open_ended).timeout_s is None
    gen = _parse({"model": MODEL, "prompt": "Hi"}, {"x-sage-slo-ms": "500"}, settings=open_ended)
    assert gen.timeout_s == 0.5


def test_stream_options_are_for_streams_only() -> None:
    """As OpenAI and vLLM answer: stream_options without stream is a 400 (null is none)."""
    options = {"include_usage": True}
    streamed = _parse({"model": MODEL, "prompt": "Hi", "stream": True, "stream_options": options})
    assert streamed.stream and streamed.include_usage
    with pytest.raises(InvalidRequestError, match="only allowed when stream is true") as err:
        _parse({"model": MODEL, "prompt": "Hi", "stream_options": options})
    assert err.value.param == "stream_options"
    whole = _parse({"model": MODEL, "prompt": "Hi", "stream_options": None})
    assert not whole.stream and not whole.include_usage
    assert not _parse({"model": MODEL, "prompt": "Hi", "stream_options": {}}).stream
    # its fields the gateway does not answer itself reach the engine unchanged
    usage_and_more = {"include_usage": True, "continuous_usage_stats": True, "foo": 1}
    gen = _parse({"model": MODEL, "prompt": "Hi", "stream": True,
                  "stream_options": usage_and_more})  # fmt: skip
    assert gen.meta.extra_body["stream_options"] == {"foo": 1, "continuous_usage_stats": True}
    assert "stream_options" not in streamed.meta.extra_body
    # kv_transfer_params null is none (it is the PD legs' own otherwise: a 400)
    gen = _parse({"model": MODEL, "prompt": "Hi", "kv_transfer_params": None})
    assert "kv_transfer_params" not in gen.meta.extra_body


@pytest.mark.parametrize(
    ("body", "headers", "param"),
    [
        ({"prompt": "x"}, {}, "model"),
        ({"model": "", "prompt": "x"}, {}, "model"),
        ({"model": MODEL, "prompt": "x", "max_tokens": 513}, {}, "max_tokens"),
        ({"model": MODEL, "prompt": "x", "max_tokens": True}, {}, "max_tokens"),
        ({"model": MODEL, "prompt": "x", "temperature": float("nan")}, {}, "temperature"),
        ({"model": MODEL, "prompt": "x", "n": 1.5}, {}, "n"),
        ({"model": MODEL, "prompt": "x", "stream_options": {"include_usage": "yes"}}, {},
         "stream_options.include_usage"),
        ({"model": MODEL, "prompt": "x"}, {"x-sage-priority": "soon"}, "x-sage-priority"),
        ({"model": MODEL, "prompt": "x"}, {"x-sage-slo-ms": "-3"}, "x-sage-slo-ms"),
        ({"model": MODEL, "prompt": "x"}, {"x-sage-slo-ms": "0"}, "x-sage-slo-ms"),
        ({"model": MODEL, "prompt": "x"}, {"x-sage-slo-ms": "inf"}, "x-sage-slo-ms"),
        ({"model": MODEL, "prompt": "x", "priority": "soon"}, {}, "priority"),
        ({"model": MODEL, "prompt": "x", "priority": 1.5}, {}, "priority"),
        # digits int() refuses (or that are not ASCII) are no number: not a crash, a 400
        ({"model": MODEL, "prompt": "x", "priority": "\u00b3"}, {}, "priority"),
        ({"model": MODEL, "prompt": "x", "priority": "\uff11"}, {}, "priority"),
        ({"model": MODEL, "prompt": "x"}, {"x-sage-priority": "\u00b2"}, "x-sage-priority"),
        # a header given is read, even empty; its number as JSON writes one (not float()'s)
        ({"model": MODEL, "prompt": "x"}, {"x-sage-priority": ""}, "x-sage-priority"),
        ({"model": MODEL, "prompt": "x"}, {"x-sage-slo-ms": ""}, "x-sage-slo-ms"),
        ({"model": MODEL, "prompt": "x"}, {"x-sage-slo-ms": "1_000"}, "x-sage-slo-ms"),
        ({"model": MODEL, "prompt": "x"}, {"x-sage-slo-ms": "\u0661\u0660"}, "x-sage-slo-ms"),
        ({"model": MODEL, "prompt": "x"}, {"x-sage-cost-budget": "1_0"}, "x-sage-cost-budget"),
        # white space other than an HTTP header's (U+00A0, U+3000) is no part of a priority
        ({"model": MODEL, "prompt": "x"}, {"x-sage-priority": "1\u00a0"}, "x-sage-priority"),
        ({"model": MODEL, "prompt": "x", "priority": "\u30002"}, {}, "priority"),
        ({"model": MODEL, "prompt": "x", "priority": "2\n"}, {}, "priority"),
        ({"model": MODEL, "prompt": "x", "priority": "\x0b7"}, {}, "priority"),
        ({"model": MODEL, "prompt": "x", "priority": "high\r"}, {}, "priority"),
        ({"model": MODEL, "prompt": "x"}, {"x-sage-slo-ms": "100\u00a0"}, "x-sage-slo-ms"),
        # past what int() reads (4,300 digits): out of range, not a crash
        ({"model": MODEL, "prompt": "x"}, {"x-sage-priority": "1" * 4301}, "x-sage-priority"),
        ({"model": MODEL, "prompt": "x", "priority": "-" + "1" * 5000}, {}, "priority"),
    ],
)  # fmt: skip
def test_invalid_fields_name_their_param(
    body: dict[str, Any], headers: dict[str, str], param: str
) -> None:
    with pytest.raises(InvalidRequestError) as err:
        _parse(body, headers)
    assert err.value.param == param
    assert err.value.http_status == 400
    assert err.value.message.startswith(param)


def test_max_tokens_0_is_taken_with_echo_on_a_completion_only() -> None:
    """vLLM answers a completion with ``echo: true`` and ``max_tokens: 0`` with its prompt
    alone (lm-eval's log-likelihood requests); without echo, or on a chat, 0 is refused."""
    body = {"model": MODEL, "prompt": "x", "max_tokens": 0, "echo": True, "logprobs": 1}
    gen = _parse(body)
    assert gen.meta.max_tokens == 0 and gen.meta.extra_body == {"echo": True, "logprobs": 1}
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "echo": True}
    for refused in ({**body, "echo": False}, {**chat, "max_tokens": 0}):
        with pytest.raises(InvalidRequestError) as err:
            _parse(refused, chat="messages" in refused)
        assert err.value.param == "max_tokens" and err.value.message.startswith("max_tokens")


def test_values_at_their_limits_are_accepted() -> None:
    """A ``max_tokens`` equal to the gateway's limit (512 here; 513 is refused above) and a
    cost budget of 0 (nothing may be spent: a number >= 0) are taken."""
    assert _parse({"model": MODEL, "prompt": "x", "max_tokens": 512}).meta.max_tokens == 512
    meta = _parse({"model": MODEL, "prompt": "x"}, {"x-sage-cost-budget": "0"}).meta
    assert meta.cost_budget == 0.0


def test_max_prompt_tokens_counts_chat_prompts_too() -> None:
    settings = ResolvedGateway.from_settings(GatewayConfig(max_prompt_tokens=5), {})
    messages = [{"role": "user", "content": "one two three four five six"}]
    with pytest.raises(InvalidRequestError) as err:
        _parse({"model": MODEL, "messages": messages}, chat=True, settings=settings)
    assert err.value.param == "messages"


@pytest.mark.parametrize(
    ("prompt", "ok"),
    [
        (" alpha" * 5, True),  # 5 tokens in 30 characters: counted, within the limit
        (" alpha" * 6, False),
        ("abcde", True),  # no longer than the limit: within it uncounted
        ([1, 2, 3, 4, 5], True),
        ([1, 2, 3, 4, 5, 6], False),
    ],
)
def test_max_prompt_tokens_is_exact_at_the_limit(prompt: str | list[int], ok: bool) -> None:
    settings = ResolvedGateway.from_settings(GatewayConfig(max_prompt_tokens=5), {})
    body = {"model": MODEL, "prompt": prompt}
    if ok:
        assert _parse(body, settings=settings).meta.prompt == prompt
        return
    with pytest.raises(InvalidRequestError, match="the prompt has about 6 tokens by this") as err:
        _parse(body, settings=settings)
    assert err.value.param == "prompt"


def test_max_prompt_tokens_counts_what_truncate_prompt_tokens_keeps() -> None:
    """The engine runs the prompt's last k tokens: a k within the limit takes any prompt."""
    settings = ResolvedGateway.from_settings(GatewayConfig(max_prompt_tokens=5), {})
    body = {"model": MODEL, "prompt": " alpha" * 50, "truncate_prompt_tokens": 5}
    assert _parse(body, settings=settings).meta.extra_body == {"truncate_prompt_tokens": 5}
    for keep in (6, -1, 0, "5"):  # more than the limit, the context, or refused by the engine
        with pytest.raises(InvalidRequestError, match="about 50 tokens") as err:
            _parse({**body, "truncate_prompt_tokens": keep}, settings=settings)
        assert err.value.param == "prompt"


# --- the plain-body check agrees with the schema ------------------------------------------

_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 5),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 1.0, 2.0, 2.5, 1e-9, -0.0]),
    st.text(max_size=3),
    st.lists(st.integers(0, 9), max_size=2),
    st.lists(st.text(max_size=2), max_size=2),
    st.dictionaries(st.sampled_from(["role", "content", "name", "x"]), st.text(max_size=2)),
)
_MESSAGES = st.lists(
    st.dictionaries(
        st.sampled_from(["role", "content", "name", "tool_calls"]),
        st.one_of(st.none(), st.text(max_size=3), st.integers(0, 2), st.lists(st.none()),
                  st.sampled_from(["user", "assistant", "system", "tool", "wizard"])),
    ),
    max_size=3,
)  # fmt: skip
_KEYS = ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "stream",
         "user", "n", "stop", "seed", "logprobs", "priority", "max_completion_tokens",
         "mystery"]  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(
    chat=st.booleans(),
    body=st.dictionaries(st.sampled_from(_KEYS), _VALUES, max_size=7),
    model=st.one_of(st.none(), st.sampled_from([MODEL, ""])),
    messages=st.one_of(st.none(), _MESSAGES),
)
def test_the_plain_body_check_accepts_only_what_the_schema_accepts_with_the_same_values(
    chat: bool, body: dict[str, Any], model: str | None, messages: list[Any] | None
) -> None:
    if model is not None:
        body["model"] = model
    if messages is not None:
        body["messages"] = messages
    plain = _plain_body(body, chat)
    schema = ChatCompletionRequest if chat else CompletionRequest
    try:
        checked = schema.model_validate(body)
    except ValidationError:
        assert plain is None
        return
    if plain is None:
        return  # a shape left to the schema
    got_model, text, max_tokens, temperature, top_p, stream, user = plain
    assert got_model == checked.model
    assert text == (body["messages"] if chat else checked.prompt)  # type: ignore[union-attr]
    assert (max_tokens, temperature, top_p) == (checked.max_tokens, checked.temperature,
                                                checked.top_p)  # fmt: skip
    assert (stream, user) == (bool(checked.stream), checked.user)


@pytest.mark.parametrize("chat", [False, True])
def test_a_plain_body_and_the_schema_path_give_the_same_generation(chat: bool) -> None:
    text: dict[str, Any] = (
        {"messages": [{"role": "user", "content": "Hi"}]} if chat else {"prompt": "Hi"}
    )
    body = {"model": MODEL, **text, "max_tokens": 5, "temperature": 0, "top_p": 0.5,
            "stream": True, "user": "u9", "mystery": [1]}  # fmt: skip
    assert _plain_body(body, chat) is not None
    with_schema = {**body, "n": 1}  # a declared field the plain check leaves to the schema
    assert _plain_body(with_schema, chat) is None
    fast, slow = _parse(body, chat=chat), _parse(with_schema, chat=chat)
    assert slow.meta.extra_body == {**fast.meta.extra_body, "n": 1}
    at = fast.meta.arrival_time
    assert replace(slow.meta, extra_body={}, arrival_time=at) == replace(fast.meta, extra_body={})
    assert replace(slow, meta=fast.meta) == fast


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize(
    ("field", "value", "taken"),
    [("top_p", 0, False), ("top_p", 0.0, False), ("top_p", 1e-9, True), ("top_p", 1.0, True),
     ("temperature", 0, True), ("temperature", 2.0, True), ("temperature", 2.5, False),
     ("max_tokens", 0, False), ("max_tokens", 1, True)],
)  # fmt: skip
def test_the_plain_body_check_keeps_the_schemas_bounds(
    chat: bool, field: str, value: float, taken: bool
) -> None:
    """At the bounds the property test above seldom draws together: top_p in (0, 1],
    temperature in [0, 2], max_tokens at least 1 (0 is the schema path's, which says why)."""
    text: dict[str, Any] = {"messages": _HI} if chat else {"prompt": "Hi"}
    body = {"model": MODEL, **text, field: value}
    plain = _plain_body(body, chat)
    if taken:
        assert plain is not None and value in plain[2:5]
        return
    assert plain is None
    with pytest.raises(InvalidRequestError) as err:
        _parse(body, chat=chat)
    assert err.value.param == field


# --- max_completion_tokens and chat messages ----------------------------------------------

_HI = [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"max_tokens": 50, "max_completion_tokens": 3}, 3),
        ({"max_completion_tokens": 3, "max_tokens": 50}, 3),
        ({"max_completion_tokens": 9}, 9),
        ({"max_tokens": 50}, 50),
        ({"max_tokens": 50, "max_completion_tokens": None}, 50),
        # the field that is ignored is not held to the limit (512 here), as vLLM ignores it
        ({"max_tokens": 9000, "max_completion_tokens": 5}, 5),
    ],
)
def test_max_completion_tokens_wins_over_max_tokens_as_in_vllm(
    fields: dict[str, Any], expected: int
) -> None:
    meta = _parse({"model": MODEL, "messages": _HI, **fields}, chat=True).meta
    assert meta.max_tokens == expected
    assert "max_tokens" not in meta.extra_body
    assert "max_completion_tokens" not in meta.extra_body


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_completion_tokens": 513}, "max_completion_tokens"),
        ({"max_tokens": 5, "max_completion_tokens": 513}, "max_completion_tokens"),
        ({"max_tokens": 513}, "max_tokens"),
    ],
)
def test_the_limit_error_names_the_field_that_counts(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequestError) as err:
        _parse({"model": MODEL, "messages": _HI, **fields}, chat=True)
    assert err.value.param == param
    assert err.value.message == f"{param}: 513 is above this gateway's limit of 512"


_CONTENT_ERROR = (
    "must be a string, a list of content parts (objects with a 'type') or, outside a system, "
    "developer, user or tool message, null"
)
_ROLES_ERROR = (
    "must be a non-empty string ('system', 'developer', 'user', 'assistant', 'tool', 'function' …)"
)


@pytest.mark.parametrize(
    ("messages", "param", "message"),
    [
        ([{"content": "no role"}], "messages[0].role", "messages[0].role: is required"),
        ([{"role": "", "content": "x"}], "messages[0].role",
         f"messages[0].role: {_ROLES_ERROR}"),
        ([{"role": 5, "content": "x"}], "messages[0].role", f"messages[0].role: {_ROLES_ERROR}"),
        ([{"role": "user", "content": 5}], "messages[0].content",
         f"messages[0].content: {_CONTENT_ERROR}"),
        ([{"role": "user", "content": {"type": "text"}}], "messages[0].content",
         f"messages[0].content: {_CONTENT_ERROR}"),
        ([{"role": "system", "content": "x"}, {"role": "user", "content": None}],
         "messages[1].content",
         f"messages[1].content: {_CONTENT_ERROR}"),
        ([{"role": "user", "content": [{"type": "text", "text": "a"}, "b"]}],
         "messages[0].content[1]",
         "messages[0].content[1]: must be an object with a string 'type'"),
        ([{"role": "user", "content": [{"text": "a"}]}], "messages[0].content[0]",
         "messages[0].content[0]: must be an object with a string 'type'"),
        ([{"role": "user", "content": [{"type": 3, "text": "a"}]}], "messages[0].content[0]",
         "messages[0].content[0]: must be an object with a string 'type'"),
        ([{"role": "user", "content": "x", "name": 7}], "messages[0].name",
         "messages[0].name: must be a string"),
        ([_HI[0], "hello"], "messages[1]", "messages[1]: must be an object with a 'role'"),
        ([_HI[0], None], "messages[1]", "messages[1]: must be an object with a 'role'"),
        ([], "messages", "messages: must be a non-empty list of messages"),
        ("hello", "messages", "messages: must be a non-empty list of messages"),
    ],
)  # fmt: skip
def test_chat_message_errors_name_the_field_and_the_problem(
    messages: Any, param: str, message: str
) -> None:
    with pytest.raises(InvalidRequestError) as err:
        _parse({"model": MODEL, "messages": messages}, chat=True)
    assert (err.value.param, err.value.message) == (param, message)


def test_chat_message_shapes_that_vllm_accepts_are_accepted() -> None:
    call = {"id": "call-1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "system", "content": [{"type": "text", "text": "Be kind."}]},
        {"role": "user", "content": [{"type": "text", "text": "Look"},
                                     {"type": "image_url", "image_url": {"url": "data:,"}}],
         "name": "u"},
        # vLLM's type-less part forms
        {"role": "user", "content": [{"image_url": "data:,"}, {"audio_url": "data:,"},
                                     {"video_url": "data:,"}, {"input_audio": {"data": ""}}]},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "assistant"},
        {"role": "tool", "content": "42", "tool_call_id": "call-1"},
        {"role": "function", "content": None, "name": "f"},
        {"role": "user", "content": [], "custom": {"kept": True}},
        {"role": "user", "content": "again", "name": None},
        # custom roles (vLLM's CustomChatCompletionMessageParam): Llama 3.1's ipython, a
        # chat template's own
        {"role": "ipython", "content": "{\"result\": 42}"},
        {"role": "wizard", "content": None},
    ]  # fmt: skip
    assert _parse({"model": MODEL, "messages": messages}, chat=True).meta.messages == messages


_ROLE_VALUES = st.one_of(
    st.sampled_from(["user", "assistant", "system", "tool", "developer", "function", "wizard"]),
    st.none(),
    st.integers(0, 2),
    st.text(max_size=3),
)
_PARTS = st.lists(
    st.one_of(
        st.dictionaries(
            st.sampled_from(["type", "text", "image_url", "audio_url", "x"]),
            st.one_of(st.none(), st.sampled_from(["text", "u"]), st.integers(0, 2)),
        ),
        st.text(max_size=2),
        st.none(),
    ),
    max_size=3,
)
_CONTENT_VALUES = st.one_of(st.none(), st.text(max_size=3), st.integers(0, 2), _PARTS)
_ONE_MESSAGE = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "role": _ROLE_VALUES,
            "content": _CONTENT_VALUES,
            "name": st.one_of(st.none(), st.text(max_size=2), st.integers(0, 2)),
            "tool_calls": st.lists(st.none(), max_size=1),
        },
    ),
    st.none(),
    st.text(max_size=2),
)


@settings(max_examples=400, deadline=None)
@given(messages=st.one_of(st.lists(_ONE_MESSAGE, max_size=3), _CONTENT_VALUES))
def test_chat_messages_are_refused_exactly_when_the_schema_refuses_them(messages: Any) -> None:
    body = {"model": MODEL, "messages": messages}
    try:
        ChatCompletionRequest.model_validate(body)
    except ValidationError:
        with pytest.raises(InvalidRequestError) as err:
            _parse(body, chat=True)
        assert err.value.param is not None and err.value.param.startswith("messages")
        assert err.value.message.startswith(err.value.param + ": ")
        return
    assert _parse(body, chat=True).meta.messages == messages


def test_an_integer_beyond_64_bits_is_out_of_range_not_a_non_integer() -> None:
    """JSON parsing reads it as a float; the 400 says what is wrong with it."""
    body = json_object(b'{"model": "m", "prompt": "x", "seed": 18446744073709551616}')
    with pytest.raises(InvalidRequestError) as err:
        validate(CompletionRequest, body)
    assert err.value.param == "seed"
    assert str(err.value) == (
        "seed: is out of range: integers must fit in 64 bits (got about 1.84e+19)"
    )
    # a float field's own range, not the integers'
    big = json_object(b'{"model": "m", "prompt": "x", "temperature": 1e20}')
    with pytest.raises(InvalidRequestError) as err:
        validate(CompletionRequest, big)
    assert "64 bits" not in str(err.value) and err.value.param == "temperature"


@pytest.mark.parametrize(
    ("field", "value", "chat"),
    [
        ("seed", "9223372036854775808", False),  # read as an integer: 2**63
        ("seed", "-9223372036854775809", False),
        ("n", "18446744073709551615", False),
        ("logprobs", "9223372036854775808", False),
        ("max_completion_tokens", "18446744073709551615", True),
        ("top_logprobs", "9223372036854775808", True),
        ("priority", "18446744073709551615", False),  # not the nearest end: out of range
        ("max_tokens", "9223372036854775808", False),  # a plain body (had its own message)
        ("max_tokens", "9223372036854775808", True),
    ],
)
def test_integers_from_2_63_to_2_64_are_out_of_range_as_larger_ones(
    field: str, value: str, chat: bool
) -> None:
    """JSON reads them as integers (not floats): the same 400 as beyond, naming the field."""
    head = '"messages": [{"role": "user", "content": "x"}]' if chat else '"prompt": "x"'
    body = json_object(f'{{"model": "m", {head}, "{field}": {value}}}'.encode())
    with pytest.raises(InvalidRequestError) as err:
        _parse(body, chat=chat)
    assert err.value.param == field
    assert str(err.value).startswith(f"{field}: is out of range: integers must fit in 64 bits")
    low = json_object(b'{"model": "m", "prompt": "x", "seed": -9223372036854775808}')
    assert _parse(low).meta.extra_body["seed"] == -(2**63)
    with pytest.raises(InvalidRequestError, match="got integer of 400 digits"):  # no float
        _parse({"model": "m", "prompt": "x", "priority": "9" * 400})


def test_a_body_priority_is_checked_when_a_header_overrides_it() -> None:
    """As every other sage-llm field with its header: a typo is a 400 either way."""
    body = {"model": "m", "prompt": "x", "priority": "bogus"}
    with pytest.raises(InvalidRequestError) as err:
        _parse(body, {"x-sage-priority": "high"})
    assert err.value.param == "priority"
    meta = _parse({**body, "priority": "low"}, {"x-sage-priority": "high"}).meta
    assert meta.priority is RequestPriority.HIGH  # the header wins


def test_max_completion_tokens_of_a_completion_is_ignored() -> None:
    """It is a chat field: a completion ignores it, as vLLM's do (passed on, the control
    plane would refuse it: it owns the budget the engine gets)."""
    gen = _parse({"model": "m", "prompt": "x", "max_tokens": 2, "max_completion_tokens": 101})
    assert gen.meta.max_tokens == 2
    assert gen.meta.extra_body == {}


def test_an_empty_user_is_no_user_and_no_session() -> None:
    """OpenAI takes ``"user": ""``; the control plane refuses an empty id."""
    meta = _parse({"model": "m", "prompt": "x", "user": ""}).meta
    assert (meta.user_id, meta.session_id) == (None, None)
    meta = _parse({"model": "m", "prompt": "x", "user": ""}, {"x-session-id": "s"}).meta
    assert (meta.user_id, meta.session_id) == (None, "s")
