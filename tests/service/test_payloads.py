"""Payload parsing: tasks, inputs (prompt, chat, batch, per-item options) and options."""

from __future__ import annotations

from typing import Any

import pytest

from sage_llm.errors import InvalidRequestError
from sage_llm.service.payloads import (
    GENERATE_OPTIONS,
    GenerateOptions,
    PromptInput,
    RequestDefaults,
    locate_error,
    parse_generate,
    parse_options,
    parse_payload,
    request_ids,
)
from sage_llm.types import RequestPriority

TASKS = {"generate": GENERATE_OPTIONS, "embed": ("normalize",), "show_models": ()}
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


def _bad(payload: Any, param: str, match: str | None = None) -> None:
    with pytest.raises(InvalidRequestError, match=match) as err:
        parse_payload(payload, TASKS)
    assert err.value.param == param


def _bad_inputs(inputs: Any, param: str, options: dict[str, Any] | None = None) -> None:
    with pytest.raises(InvalidRequestError) as err:
        parse_generate(inputs, options or {}, RequestDefaults())
    assert err.value.param == param


def test_task_defaults_to_generate_and_options_to_empty() -> None:
    req = parse_payload({"inputs": "hi"}, TASKS)
    assert (req.task, req.inputs, dict(req.options)) == ("generate", "hi", {})


def test_unknown_task_and_malformed_payloads_name_the_bad_part() -> None:
    _bad({"task": "generat", "inputs": "x"}, "task", "did you mean 'generate'")
    _bad({"task": 3}, "task", "supported tasks: embed, generate, show_models")
    _bad(["generate"], "payload", "must be a dict")
    _bad(None, "payload")
    _bad({"task": "generate", "options": ["max_tokens"]}, "options")
    _bad({"task": "generate", "inputz": "x"}, "inputz", "did you mean 'inputs'")


def test_seed_style_top_level_options_are_merged_and_must_not_conflict() -> None:
    req = parse_payload({"inputs": "x", "priority": "HIGH", "options": {"max_tokens": 5}}, TASKS)
    assert dict(req.options) == {"priority": "HIGH", "max_tokens": 5}
    same = parse_payload({"inputs": "x", "priority": 1, "options": {"priority": 1}}, TASKS)
    assert dict(same.options) == {"priority": 1}
    _bad({"inputs": "x", "priority": 1, "options": {"priority": 2}}, "priority", "both")


def test_a_prompt_a_chat_and_a_single_message_are_one_input_each() -> None:
    (prompt,) = parse_generate("Hello", {}, RequestDefaults())
    assert (prompt.prompt, prompt.messages) == ("Hello", None)
    (chat,) = parse_generate(CHAT, {}, RequestDefaults())
    assert chat.prompt is None and chat.messages == CHAT
    (single,) = parse_generate({"role": "user", "content": "Hi"}, {}, RequestDefaults())
    assert single.messages == [{"role": "user", "content": "Hi"}]


def test_a_batch_mixes_prompts_chats_and_request_dicts_with_their_own_options() -> None:
    items = parse_generate(
        ["a", CHAT, {"prompt": "b", "options": {"priority": "critical"}}, {"messages": CHAT}],
        {"priority": "LOW", "max_tokens": 7},
        RequestDefaults(),
    )
    assert [i.prompt for i in items] == ["a", None, "b", None]
    assert [i.options.priority for i in items] == [
        RequestPriority.LOW,
        RequestPriority.LOW,
        RequestPriority.CRITICAL,
        RequestPriority.LOW,
    ]
    assert {i.options.max_tokens for i in items} == {7}
    assert items[3].messages == CHAT


def test_a_batch_items_problem_names_the_item_in_its_message() -> None:
    """The message is all SAGE's call_service passes on: it names the input, as an engine's
    refusal of that input does; a problem of the shared options or of one chat does not."""
    cases = [
        (["ok", {"prompt": "x", "options": {"priority": "asap"}}], "inputs[1]: invalid priority"),
        (["ok", [{"role": "user", "content": 5}]], "inputs[1]: a chat message needs content"),
        (["ok", 3], "inputs[1]: each input must be"),
        ([{"role": "", "content": "x"}, {"role": "user", "content": "y"}], "a chat message"),
    ]
    for inputs, message in cases:
        with pytest.raises(InvalidRequestError) as err:
            parse_generate(inputs, {}, RequestDefaults())
        assert str(err.value).startswith(message), (inputs, str(err.value))
    with pytest.raises(InvalidRequestError) as err:
        parse_generate(["a", "b"], {"priority": "asap"}, RequestDefaults())
    assert str(err.value).startswith("invalid priority") and err.value.param == "options.priority"


def test_malformed_inputs_name_the_offending_item() -> None:
    _bad_inputs(None, "inputs")
    _bad_inputs([], "inputs")
    _bad_inputs(42, "inputs")
    _bad_inputs("   ", "inputs")
    _bad_inputs(["ok", 3], "inputs[1]")
    _bad_inputs(["ok", ""], "inputs[1]")
    _bad_inputs(["ok", [{"role": "user", "content": 5}]], "inputs[1][0]")
    _bad_inputs([{"role": "", "content": "x"}, {"role": "user", "content": "y"}], "inputs[0]")
    _bad_inputs(["ok", {"prompt": "x", "messages": CHAT}], "inputs[1]")
    _bad_inputs(["ok", {"prompt": ""}], "inputs[1].prompt")
    _bad_inputs(["ok", {"prompt": "x", "extra": 1}], "inputs[1].extra")
    _bad_inputs(["ok", {"messages": []}], "inputs[1].messages")
    urgent = {"prompt": "x", "options": {"priority": "urgent"}}
    _bad_inputs(["ok", urgent], "inputs[1].options.priority")
    _bad_inputs(["ok", {"prompt": "x", "options": 3}], "inputs[1].options")
    _bad_inputs([[{"role": "user", "content": [1, 2]}]], "inputs[0][0]")
    _bad_inputs([[{"role": "user", "content": "x", "name": object()}]], "inputs[0][0]")
    _bad_inputs(["ok", {"messages": ["hi"]}], "inputs[1].messages[0]")


def test_numbers_of_other_libraries_are_read_as_pythons() -> None:
    np = pytest.importorskip("numpy")
    opts = parse_options(
        {"max_tokens": np.int64(3), "temperature": np.float32(0.5), "seed": np.int64(7)},
        RequestDefaults(),
        "options",
    )
    assert (opts.max_tokens, opts.temperature, opts.extra) == (3, 0.5, {"seed": 7})
    assert type(opts.max_tokens) is int and type(opts.extra["seed"]) is int
    opts = parse_options({"min_p": np.float32(0.5), "top_k": [4]}, RequestDefaults(), "options")
    assert opts.extra == {"min_p": 0.5, "top_k": [4]}  # (the engine judges the list)
    assert type(opts.extra["min_p"]) is float
    with pytest.raises(InvalidRequestError, match="cannot be sent as JSON") as err:
        parse_options({"seed": object()}, RequestDefaults(), "options")
    assert err.value.param == "options.seed"


def test_options_are_validated_and_defaults_filled_in() -> None:
    defaults = RequestDefaults(
        priority=RequestPriority.HIGH, max_tokens=64, temperature=0.7, top_p=0.9, timeout_s=30.0,
        extra={"presence_penalty": 0.5},
    )  # fmt: skip
    assert parse_options({}, defaults, "options") == GenerateOptions(
        priority=RequestPriority.HIGH, max_tokens=64, temperature=0.7, top_p=0.9, timeout_s=30.0,
        extra={"presence_penalty": 0.5},
    )  # fmt: skip
    opts = parse_options(
        {
            "priority": 0, "slo_deadline_ms": 500, "max_tokens": 8, "temperature": 0,
            "stop": "\n", "timeout": 2, "user_id": "u", "session_id": "s", "request_id": "r",
            "model": "m", "logprobs": True, "seed": 7, "tags": {"app": "qa"},
        },
        defaults,
        "options",
    )  # fmt: skip
    assert opts.priority is RequestPriority.CRITICAL
    assert (opts.slo_deadline_ms, opts.max_tokens, opts.temperature) == (500.0, 8, 0.0)
    assert (opts.stop, opts.timeout_s, opts.logprobs) == (("\n",), 2.0, 1)
    assert (opts.user_id, opts.session_id, opts.request_id, opts.model) == ("u", "s", "r", "m")
    assert opts.extra == {"presence_penalty": 0.5, "seed": 7}
    assert opts.tags == {"app": "qa"}


def test_a_pass_through_option_of_none_is_not_given() -> None:
    """``n = None`` had been refused (only n = 1), and ``seed = None`` sent to the engine as
    null: None means "not given", as it does for every other option."""
    defaults = RequestDefaults(extra={"seed": 3, "top_k": None})
    opts = parse_options({"n": None, "seed": None, "min_p": None}, defaults, "options")
    assert opts.extra == {"seed": 3}
    assert parse_options({"n": None, "seed": None}, RequestDefaults(), "options").extra == {}


@pytest.mark.parametrize(
    ("options", "param"),
    [
        ({"priority": "urgent"}, "options.priority"),
        ({"priority": 9}, "options.priority"),
        ({"max_tokens": 0}, "options.max_tokens"),
        ({"max_tokens": 2.5}, "options.max_tokens"),
        ({"max_tokens": True}, "options.max_tokens"),
        ({"temperature": -1}, "options.temperature"),
        ({"top_p": 0}, "options.top_p"),
        ({"slo_deadline_ms": "soon"}, "options.slo_deadline_ms"),
        ({"timeout": float("nan")}, "options.timeout"),
        ({"stop": [1]}, "options.stop"),
        ({"user_id": 5}, "options.user_id"),
        ({"n": 0}, "options.n"),
        ({"n": 1.5}, "options.n"),
        ({"tags": ["a"]}, "options.tags"),
        ({"model": "a", "model_name": "b"}, "options.model"),
        ({"max_token": 5}, "options.max_token"),
    ],
)
def test_bad_options_raise_with_the_option_named(options: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequestError) as err:
        parse_options(options, RequestDefaults(), "options")
    assert err.value.param == param


def test_an_unknown_option_suggests_the_close_one() -> None:
    with pytest.raises(InvalidRequestError, match="did you mean 'max_tokens'"):
        parse_options({"max_token": 5}, RequestDefaults(), "options")


def test_every_request_id_of_a_batch_is_its_own() -> None:
    def ids(*given: str | None) -> list[str]:
        items = [
            PromptInput("p", None, GenerateOptions(request_id=rid, max_tokens=1)) for rid in given
        ]
        return request_ids(items)

    assert ids("r", "r", "x") == ["r-0", "r-1", "x"]
    # the suffix would be another input's own id
    assert ids("r", "r", "r-1") == ["r-0", "r-1-1", "r-1"]
    assert ids("r", "r", "r-1", "r-1-1") == ["r-0", "r-1-2", "r-1", "r-1-1"]
    fresh = ids(None, None)
    assert len(set(fresh)) == 2 and all(len(rid) == 32 for rid in fresh)


def test_a_message_problem_is_named_by_the_input_not_an_option() -> None:
    """The control plane names a chat message's problem ``messages[0]…``: the messages
    are an input (they had been named ``inputs[1].options.messages[0]…``)."""
    err = InvalidRequestError("messages[0].name: must be a string", param="messages[0].name")
    locate_error(err, "inputs[1]")
    assert err.param == "inputs[1]" and str(err).startswith("inputs[1]: messages[0].name")


def test_a_request_fields_error_is_named_by_the_option_it_came_from() -> None:
    """The control plane's ``model_name`` is the payload's ``model`` option."""
    err = InvalidRequestError(
        "model_name is required when several models are served", param="model_name"
    )
    locate_error(err, "inputs[1]")
    assert err.param == "inputs[1].options.model"
    assert str(err) == "inputs[1]: model is required when several models are served"


@pytest.mark.parametrize(
    ("param", "where", "named"),
    [
        ("input_text", None, "inputs"),  # vLLM 0.32: a prompt past the context
        ("input_text", "inputs[1]", "inputs[1]"),
        ("prompt_token_ids", None, "inputs"),
        ("body.stop", None, "options.stop"),  # vLLM's pydantic errors: loc body.<field>
        ("body.stop", "inputs[1]", "inputs[1].options.stop"),
        ("body.prompt", "inputs[0]", "inputs[0]"),
        ("body.messages[0].content", None, "inputs"),
        ("body", None, None),
    ],
)
def test_an_engines_names_for_the_input_and_its_request_body_name_the_payloads_part(
    param: str, where: str | None, named: str | None
) -> None:
    """vLLM's ``input_text`` / ``prompt_token_ids`` are the input, and its ``body.<field>``
    the field (they had become ``options.input_text``, ``options.body.stop``)."""
    err = InvalidRequestError("refused", param=param)
    locate_error(err, where)
    assert err.param == named


def test_top_level_options_are_those_of_the_payloads_task() -> None:
    """Only generate's option names had been taken at the top level: embed's normalize,
    set_policy's params, drain_instance's drain were unknown payload keys there."""
    req = parse_payload({"task": "embed", "inputs": "x", "normalize": False}, TASKS)
    assert dict(req.options) == {"normalize": False}
    _bad({"task": "embed", "inputs": "x", "priority": 1}, "priority", "unknown payload key")
    _bad({"task": "show_models", "max_tokens": 1}, "max_tokens", "unknown payload key")
