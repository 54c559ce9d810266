"""The embed task: inputs, options, OpenAI answers and the deterministic sim embedding."""

from __future__ import annotations

import math

import pytest

from sage_llm.errors import EngineStreamError, InvalidRequestError
from sage_llm.service.embeddings import (
    embed_result,
    parse_embed,
    sim_embedding,
    vectors_from_openai,
)


def test_parse_embed_accepts_a_string_or_a_list_of_strings() -> None:
    assert parse_embed("a", {}).texts == ["a"]
    req = parse_embed(["a", "b"], {"normalize": False, "batch_size": 8, "model": "e5"})
    assert (req.texts, req.normalize, req.model) == (["a", "b"], False, "e5")
    assert (req.timeout_s, parse_embed("a", {}, 3.0).timeout_s) == (None, 3.0)
    assert parse_embed("a", {"timeout": 1}, 3.0).timeout_s == 1.0


@pytest.mark.parametrize(
    ("inputs", "options", "param"),
    [
        (None, {}, "inputs"),
        ([], {}, "inputs"),
        (["a", 1], {}, "inputs"),
        ("", {}, "inputs"),
        (["a", "  "], {}, "inputs[1]"),
        ("a", {"normalize": "yes"}, "options.normalize"),
        ("a", {"model": ""}, "options.model"),
        ("a", {"timeout": 0}, "options.timeout"),
        ("a", {"dimensions": 8}, "options.dimensions"),
    ],
)
def test_parse_embed_rejects_bad_inputs(
    inputs: object, options: dict[str, object], param: str
) -> None:
    with pytest.raises(InvalidRequestError) as err:
        parse_embed(inputs, options)
    assert err.value.param == param


def test_vectors_from_openai_restores_input_order_and_checks_the_answer() -> None:
    answer = {"data": [{"index": 1, "embedding": [0, 1]}, {"index": 0, "embedding": [2, 0]}]}
    assert vectors_from_openai(answer, 2) == [[2.0, 0.0], [0.0, 1.0]]
    with pytest.raises(EngineStreamError):
        vectors_from_openai(answer, 3)
    with pytest.raises(EngineStreamError):
        vectors_from_openai({"data": [{"embedding": "x"}]}, 1)


def test_embed_result_normalises_when_asked() -> None:
    out = embed_result("m", [[3.0, 4.0], [0.0, 0.0]], normalize=True)
    assert out == {"model_id": "m", "vectors": [[0.6, 0.8], [0.0, 0.0]], "dimension": 2}
    assert embed_result("m", [[3.0, 4.0]], normalize=False)["vectors"] == [[3.0, 4.0]]


def test_sim_embedding_is_deterministic_and_similar_texts_are_closer() -> None:
    a = sim_embedding("The cat sat on the mat", 64)
    assert a == sim_embedding("The cat sat on the mat", 64)
    assert len(a) == 64

    def cos(x: list[float], y: list[float]) -> float:
        return sum(p * q for p, q in zip(x, y, strict=True)) / math.sqrt(
            sum(p * p for p in x) * sum(q * q for q in y)
        )

    near = sim_embedding("the cat sat on a mat", 64)
    far = sim_embedding("Quantum chromodynamics lecture notes", 64)
    assert cos(a, near) > cos(a, far)
    with pytest.raises(ValueError, match="dimension"):
        sim_embedding("x", 0)
