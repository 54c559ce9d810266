"""Made-up logprobs for the simulated engine's tokens: what a request asks for, and their
shapes and plausibility."""

from __future__ import annotations

import math
from typing import Any

import pytest

from sage_llm.engines.base import EngineRequest
from sage_llm.errors import InvalidRequestError
from sage_llm.sim.logprobs import (
    MAX_LOGPROBS,
    PseudoLogprobs,
    requested_logprobs,
    requested_prompt_logprobs,
)
from sage_llm.sim.text import PseudoText

CHAT = [{"role": "user", "content": "hi"}]


def completion(**extra: Any) -> EngineRequest:
    return EngineRequest("r", "m", prompt="x", extra=extra)


def chat(**extra: Any) -> EngineRequest:
    return EngineRequest("r", "m", messages=CHAT, extra=extra)


@pytest.mark.parametrize(
    ("request_", "wanted"),
    [
        (completion(), None),
        (completion(logprobs=None), None),
        (completion(logprobs=0), 0),
        (completion(logprobs=MAX_LOGPROBS), MAX_LOGPROBS),
        (completion(logprobs=True), 1),  # as vLLM's pydantic model reads it
        (chat(), None),
        (chat(logprobs=False), None),
        (chat(logprobs=True), 0),
        (chat(logprobs=1, top_logprobs=5), 5),
        (chat(logprobs=False, top_logprobs=0), None),
    ],
)
def test_what_a_request_asks_for(request_: EngineRequest, wanted: int | None) -> None:
    assert requested_logprobs(request_) == wanted


def test_the_sampled_token_is_usually_but_not_always_the_most_likely() -> None:
    gen = PseudoLogprobs(2, chat=False, seed=0, request_id="r")
    pieces = PseudoText("0:r").next_pieces(2000)
    out = gen.next(pieces)
    top_hits = 0
    for piece, logprob, top in zip(out["tokens"], out["token_logprobs"], out["top_logprobs"],
                                   strict=True):  # fmt: skip
        assert top[piece] == logprob < 0
        top_hits += logprob == max(top.values())
        assert sum(math.exp(v) for v in top.values()) < 1.0
    assert 0.7 < top_hits / len(pieces) < 0.9


def test_greedy_sampling_always_takes_the_most_likely() -> None:
    """temperature 0: a model's logprobs never show a likelier token than the one taken."""
    gen = PseudoLogprobs(2, chat=False, seed=0, request_id="r", greedy=True)
    out = gen.next(PseudoText("0:r").next_pieces(500))
    for piece, logprob, top in zip(out["tokens"], out["token_logprobs"], out["top_logprobs"],
                                   strict=True):  # fmt: skip
        assert top[piece] == logprob == max(top.values())


def test_chunks_continue_each_other() -> None:
    pieces = PseudoText("3:r").next_pieces(6)
    whole = PseudoLogprobs(1, chat=False, seed=3, request_id="r").next(pieces)
    gen = PseudoLogprobs(1, chat=False, seed=3, request_id="r")
    parts = [gen.next(pieces[:2]), gen.next(pieces[2:5]), gen.next(pieces[5:])]
    assert {key: [v for p in parts for v in p[key]] for key in whole} == whole
    assert whole["text_offset"] == [sum(map(len, pieces[:i])) for i in range(6)]


def test_chat_entries_list_the_asked_alternatives_most_likely_first() -> None:
    (entry,) = PseudoLogprobs(4, chat=True, seed=0, request_id="r").next([" river"])["content"]
    assert entry["token"] == " river" and entry["bytes"] == list(b" river")
    logprobs = [t["logprob"] for t in entry["top_logprobs"]]
    assert len(logprobs) == 4 and logprobs == sorted(logprobs, reverse=True)
    assert len({t["token"] for t in entry["top_logprobs"]}) == 4


@pytest.mark.parametrize(
    ("request_", "param"),
    [
        (completion(logprobs=MAX_LOGPROBS + 1), "logprobs"),
        (completion(logprobs=-1), "logprobs"),
        (completion(logprobs="2"), "logprobs"),
        (chat(logprobs="yes"), "logprobs"),
        (chat(top_logprobs=3), "top_logprobs"),
        (chat(logprobs=True, top_logprobs=2.5), "top_logprobs"),
    ],
)
def test_bad_values_name_the_field(request_: EngineRequest, param: str) -> None:
    with pytest.raises(InvalidRequestError) as err:
        requested_logprobs(request_)
    assert err.value.param == param


@pytest.mark.parametrize("value", [True, False, "2", -1, MAX_LOGPROBS + 1])
def test_prompt_logprobs_of_a_bad_value_name_the_field(value: Any) -> None:
    """``prompt_logprobs`` is a count of alternatives: a boolean is refused, not read as
    0 or 1."""
    with pytest.raises(InvalidRequestError) as err:
        requested_prompt_logprobs({"prompt_logprobs": value}, stream=False)
    assert err.value.param == "prompt_logprobs"
    assert requested_prompt_logprobs({"prompt_logprobs": 2}, stream=False) == 2
