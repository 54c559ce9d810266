"""Request intake: the scheduling view and the engine request built from a RequestMetadata."""

from __future__ import annotations

from collections import OrderedDict

import pytest

from sage_llm.control_plane.intake import MAX_TOKENS_BOUND, build_request, resolve_model
from sage_llm.control_plane.snapshot import RequestInfo
from sage_llm.engines.base import EngineRequest
from sage_llm.errors import InvalidRequestError, ModelNotFoundError
from sage_llm.tokens import chat_prompt_text, last_tokens, prompt_blocks
from sage_llm.types import RequestPriority
from tests.factories import make_metadata


@pytest.mark.parametrize("chat", [False, True])
def test_build_request_fills_every_field_of_both(chat: bool) -> None:
    text = {"messages": [{"role": "user", "content": "Hello there"}]} if chat else {}
    meta = make_metadata(
        "r1", prompt=None if chat else "Hello there " * 4, max_tokens=7, temperature=0.5,
        top_p=0.9, stop=["END"], priority=RequestPriority.HIGH, slo_deadline_ms=250.0,
        user_id="u", session_id="s", cost_budget=0.5, preferred_instance_id="e1",
        tags={"t": 1}, extra_body={"n": 2}, **text,
    )  # fmt: skip
    info, req = build_request(meta, "m", now=10.0, stream=False, default_max_tokens=16,
                              block_size=4)  # fmt: skip
    tokens, hashes = prompt_blocks(meta.prompt or "", 4) if not chat else (info.prompt_tokens, ())
    assert info == RequestInfo(
        request_id="r1", model="m", arrival=10.0, prompt_tokens=tokens, max_tokens=7,
        priority=RequestPriority.HIGH, deadline=10.25, user_id="u", session_id="s",
        cost_budget=0.5, block_hashes=info.block_hashes if chat else hashes,
        preferred_instance_id="e1", tags={"t": 1},
    )  # fmt: skip
    assert req == EngineRequest(
        request_id="r1", model="m", prompt=None if chat else meta.prompt,
        messages=meta.messages, max_tokens=7, temperature=0.5, top_p=0.9, stop=("END",),
        stream=False, extra={"n": 2}, priority=int(RequestPriority.HIGH),
    )  # fmt: skip
    # copies, not the caller's objects
    assert info.tags is not meta.tags and req.extra is not meta.extra_body


def test_echo_with_max_tokens_0_is_the_prompt_alone_scheduled_as_one_token() -> None:
    # vLLM's answer to it (lm-eval's log-likelihood requests): the engine gets 0 and runs
    # one token, which the control plane's estimates count
    echo = make_metadata("r", max_tokens=0, extra_body={"echo": True, "logprobs": 1})
    info, req = build_request(echo, "m", now=0.0, stream=False, default_max_tokens=16,
                              block_size=16)  # fmt: skip
    assert (info.max_tokens, req.max_tokens, req.send_max_tokens) == (1, 0, True)
    for refused in (
        make_metadata("r", max_tokens=0),
        make_metadata("r", max_tokens=0, extra_body={"echo": "yes"}),
        make_metadata("r", max_tokens=False, extra_body={"echo": True}),
        make_metadata("r", prompt=None, messages=[{"role": "user", "content": "hi"}],
                      max_tokens=0, extra_body={"echo": True}),
    ):  # fmt: skip
        with pytest.raises(InvalidRequestError) as err:
            build_request(refused, "m", now=0.0, stream=False, default_max_tokens=16,
                          block_size=16)  # fmt: skip
        assert err.value.param == "max_tokens"


def test_build_request_refuses_bad_fields() -> None:
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        build_request(make_metadata("r", max_tokens=0), "m", now=0.0, stream=True,
                      default_max_tokens=16, block_size=16)  # fmt: skip
    nan = float("nan")
    for field, value in (
        ("temperature", 2.5), ("temperature", nan), ("temperature", "0.5"), ("top_p", 0.0),
        ("top_p", True), ("slo_deadline_ms", "100"), ("slo_deadline_ms", float("inf")),
        ("cost_budget", "x"), ("cost_budget", -1), ("cost_budget", nan), ("prompt", 5),
        ("prompt", ["a", "b"]), ("prompt", [[1, 2]]), ("prompt", []), ("stop", 3),
        ("stop", ["a", 1]), ("tags", None), ("extra_body", [1]), ("billing_tier", 5),
        ("billing_tier", ""),
    ):  # fmt: skip
        with pytest.raises(InvalidRequestError) as info:
            build_request(make_metadata("r", **{field: value}), "m", now=0.0, stream=True,
                          default_max_tokens=16, block_size=16)  # fmt: skip
        assert info.value.param == field, (field, value)


@pytest.mark.parametrize(
    ("key", "says"),
    [("max_tokens", "from the request's max_tokens"), ("model", "from the request's model_name"),
     ("max_completion_tokens", "from the request's max_tokens"), ("stream", "stream itself"),
     ("prompt", "from the request's prompt"), ("priority", "from the request's priority")],
)  # fmt: skip
def test_extra_body_may_not_set_what_the_request_sets(key: str, says: str) -> None:
    """The control plane schedules on these (a max_tokens there had made a 2-token
    estimate of a 300-token answer; a model there sent the request to another model)."""
    with pytest.raises(InvalidRequestError) as info:
        build_request(make_metadata("r", extra_body={key: 300, "seed": 1}), "m", now=0.0,
                      stream=True, default_max_tokens=16, block_size=16)  # fmt: skip
    assert info.value.param == f"extra_body.{key}"
    assert says in str(info.value)


def test_messages_are_checked_as_the_gateway_checks_them() -> None:
    for messages, param in (
        ([1], "messages[0]"),
        ([{"content": "no role"}], "messages[0].role"),
        ([{"role": "user", "content": "x"}, {"role": "user", "content": 5}], "messages[1].content"),
    ):  # fmt: skip
        with pytest.raises(InvalidRequestError) as info:
            build_request(make_metadata("r", messages=messages, prompt=None), "m", now=0.0,
                          stream=True, default_max_tokens=16, block_size=16)  # fmt: skip
        assert info.value.param == param
    mapping = OrderedDict(role="user", content="x")  # a library caller's Mapping: a message
    build_request(make_metadata("r", messages=[mapping], prompt=None), "m", now=0.0,
                  stream=True, default_max_tokens=16, block_size=16)  # fmt: skip
    both = make_metadata("r", messages=[{"role": "user", "content": "x"}], prompt="y")
    with pytest.raises(InvalidRequestError, match="not both") as info:
        build_request(both, "m", now=0.0, stream=True, default_max_tokens=16, block_size=16)
    assert info.value.param == "prompt"


def test_a_stop_string_is_one_stop_sequence() -> None:
    """As OpenAI's API takes ``stop``: a string is one sequence, not its characters."""
    _, req = build_request(make_metadata("r", stop="xyz"), "m", now=0.0, stream=True,
                           default_max_tokens=16, block_size=16)  # fmt: skip
    assert req.stop == ("xyz",)


@pytest.mark.parametrize(
    ("chat", "engine", "estimate", "sent"),
    [
        (False, False, 128, True),  # the library's: default_max_tokens, sent
        (True, False, 128, True),
        (False, True, 16, False),  # the gateway's: the engine's default (16 for completions)
        (True, True, 128, False),  # a chat's own length, estimated as default_max_tokens
    ],
)
def test_an_unset_max_tokens_is_the_control_planes_or_the_engines(
    chat: bool, engine: bool, estimate: int, sent: bool
) -> None:
    text = {"prompt": None, "messages": [{"role": "user", "content": "Hi"}]} if chat else {}
    meta = make_metadata("r", max_tokens=None, engine_max_tokens=engine, **text)
    info, req = build_request(meta, "m", now=0.0, stream=True, default_max_tokens=128,
                              block_size=16)  # fmt: skip
    assert (info.max_tokens, req.max_tokens, req.send_max_tokens) == (estimate, estimate, sent)
    given = make_metadata("g", max_tokens=5, engine_max_tokens=engine, **text)
    _, req = build_request(given, "m", now=0.0, stream=True, default_max_tokens=128,
                           block_size=16)  # fmt: skip
    assert (req.max_tokens, req.send_max_tokens) == (5, True)


def test_an_unset_temperature_and_top_p_reach_the_engine_request_unset() -> None:
    meta = make_metadata("r", temperature=None, top_p=None)
    _, req = build_request(meta, "m", now=0.0, stream=True, default_max_tokens=16,
                           block_size=16)  # fmt: skip
    assert (req.temperature, req.top_p) == (None, None)


@pytest.mark.parametrize("chat", [False, True])
def test_build_request_without_a_block_size_counts_the_prompt_and_hashes_nothing(
    chat: bool,
) -> None:
    text = {"messages": [{"role": "user", "content": "Hello there " * 40}]} if chat else {}
    meta = make_metadata("r1", prompt=None if chat else "Hello there " * 40, **text)
    hashed, _ = build_request(meta, "m", now=0.0, stream=False, default_max_tokens=16,
                              block_size=4)  # fmt: skip
    counted, _ = build_request(meta, "m", now=0.0, stream=False, default_max_tokens=16,
                               block_size=None)  # fmt: skip
    assert len(hashed.block_hashes) >= 20
    assert counted.block_hashes == ()
    assert counted.prompt_tokens == hashed.prompt_tokens
    ids = make_metadata("r2", prompt=[5, 6, 7, 8, 9])
    info, _ = build_request(ids, "m", now=0.0, stream=False, default_max_tokens=16,
                            block_size=None)  # fmt: skip
    assert (info.prompt_tokens, info.block_hashes) == (5, ())


@pytest.mark.parametrize("field", ["user_id", "session_id", "preferred_instance_id"])
@pytest.mark.parametrize("value", [5, ["a"], {"a": 1}, ""])
def test_ids_must_be_non_empty_strings(field: str, value: object) -> None:
    with pytest.raises(InvalidRequestError) as err:
        build_request(make_metadata("r", **{field: value}), "m", now=0.0, stream=True,
                      default_max_tokens=16, block_size=16)  # fmt: skip
    assert err.value.param == field and f"{field} must be a non-empty string" in str(err.value)


def test_a_max_tokens_beyond_64_bits_is_refused() -> None:
    """Its estimates' arithmetic (floats) failed on it, and with it every queued request."""
    for max_tokens in (2**63, 10**400):
        with pytest.raises(InvalidRequestError) as err:
            build_request(make_metadata("r", max_tokens=max_tokens), "m", now=0.0, stream=True,
                          default_max_tokens=16, block_size=16)  # fmt: skip
        assert err.value.param == "max_tokens"


@pytest.mark.parametrize("chat", [False, True])
def test_truncate_prompt_tokens_is_the_prompt_the_engine_runs(chat: bool) -> None:
    """vLLM keeps the prompt's last k tokens: the control plane schedules (context check,
    predictions, prefix affinity) on those, and passes the field on unchanged."""
    words = "Hello there " * 40
    text = {"messages": [{"role": "user", "content": words}]} if chat else {}
    prompt = None if chat else words
    whole_info, _ = build_request(make_metadata("r0", prompt=prompt, **text), "m", now=0.0,
                                  stream=False, default_max_tokens=16, block_size=4)  # fmt: skip
    meta = make_metadata("r1", prompt=prompt, extra_body={"truncate_prompt_tokens": 8.0}, **text)
    info, req = build_request(meta, "m", now=0.0, stream=False, default_max_tokens=16,
                              block_size=4)  # fmt: skip
    assert whole_info.prompt_tokens > 8
    assert info.prompt_tokens == 8
    source = chat_prompt_text(meta.messages) if meta.messages else words
    assert info.block_hashes == prompt_blocks(last_tokens(source, 8), 4)[1]  # the last 8's
    assert len(info.block_hashes) == 2
    assert req.extra == {"truncate_prompt_tokens": 8.0}
    for keep in (-1, 0, "8", True, 500):  # the engine's context, refused by it, or above
        other = make_metadata("r2", prompt=prompt, extra_body={"truncate_prompt_tokens": keep},
                              **text)  # fmt: skip
        kept, _ = build_request(other, "m", now=0.0, stream=False, default_max_tokens=16,
                                block_size=4)  # fmt: skip
        assert kept.prompt_tokens == whole_info.prompt_tokens
    ids = make_metadata(
        "r3", prompt=list(range(300, 320)), extra_body={"truncate_prompt_tokens": 5}
    )
    info, _ = build_request(ids, "m", now=0.0, stream=False, default_max_tokens=16, block_size=None)
    assert info.prompt_tokens == 5


@pytest.mark.parametrize(
    ("field", "value"),
    [("slo_deadline_ms", 0), ("slo_deadline_ms", -100.0), ("cost_budget", float("inf")),
     ("priority", "urgent"), ("priority", 7), ("temperature", -0.5), ("top_p", 1.5)],
)  # fmt: skip
def test_a_value_outside_its_documented_range_is_refused_naming_its_field(
    field: str, value: object
) -> None:
    """An SLO must be positive (a 0 ms one is no target), a budget finite and >= 0, a
    priority one of the five; the error names the field."""
    with pytest.raises(InvalidRequestError) as err:
        build_request(make_metadata("r", **{field: value}), "m", now=0.0, stream=True,
                      default_max_tokens=16, block_size=16)  # fmt: skip
    assert err.value.param == field


def test_the_bounds_of_each_documented_range_are_taken() -> None:
    """temperature within [0, 2], top_p within (0, 1], cost_budget >= 0 and max_tokens up
    to MAX_TOKENS_BOUND: each bound itself is a value taken."""
    for changes in (
        {"temperature": 0.0}, {"temperature": 2.0}, {"top_p": 1.0}, {"cost_budget": 0},
        {"max_tokens": MAX_TOKENS_BOUND}, {"priority": "background"}, {"priority": 0},
    ):  # fmt: skip
        info, _ = build_request(make_metadata("r", **changes), "m", now=0.0, stream=True,
                                default_max_tokens=16, block_size=16)  # fmt: skip
        assert info.max_tokens == changes.get("max_tokens", 16)


def test_truncate_prompt_tokens_of_one_keeps_the_last_token() -> None:
    """Any ``truncate_prompt_tokens`` >= 1 is the prompt's last k tokens, 1 included."""
    meta = make_metadata(
        "r", prompt=list(range(300, 320)), extra_body={"truncate_prompt_tokens": 1}
    )
    info, _ = build_request(
        meta, "m", now=0.0, stream=False, default_max_tokens=16, block_size=None
    )
    assert info.prompt_tokens == 1


def test_an_unresolvable_model_is_refused_naming_the_field() -> None:
    """Several models served: the request must name one (``model_name``); one no instance
    serves is the API's unknown ``model``."""
    with pytest.raises(InvalidRequestError) as err:
        resolve_model(make_metadata("r", model_name=None), {"a", "b"})
    assert err.value.param == "model_name"
    with pytest.raises(ModelNotFoundError) as missing:
        resolve_model(make_metadata("r", model_name="c"), {"a", "b"})
    assert missing.value.param == "model"
    assert resolve_model(make_metadata("r", model_name=None), {"a"}) == "a"
    with pytest.raises(ModelNotFoundError, match="no instance is registered") as none:
        resolve_model(make_metadata("r", model_name=None), set())
    assert none.value.param == "model"
    with pytest.raises(ModelNotFoundError, match=r"'a' \(served: none\)") as named:
        resolve_model(make_metadata("r", model_name="a"), set())
    assert named.value.param == "model"


@pytest.mark.parametrize("messages", [[], (), {"role": "user", "content": "x"}, "hi"])
def test_messages_that_are_not_a_non_empty_list_are_refused(messages: object) -> None:
    meta = make_metadata("r", messages=messages, prompt=None)
    with pytest.raises(InvalidRequestError, match="messages must be a non-empty list") as info:
        build_request(meta, "m", now=0.0, stream=True, default_max_tokens=16, block_size=16)
    assert info.value.param == "messages"
