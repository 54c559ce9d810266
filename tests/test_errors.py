"""The exception types: what they carry survives a round trip through pickle (a process
pool, a SAGE worker in another process)."""

from __future__ import annotations

import pickle

from sage_llm.errors import ConfigError, ConfigErrors, EngineError, InvalidRequestError


def test_config_errors_unpickle_with_each_problem() -> None:
    errors = ConfigErrors(
        [ConfigError("must be > 0", location="a.toml:3", key="k"), ConfigError("bad", key="j")]
    )
    back = pickle.loads(pickle.dumps(errors))
    assert type(back) is ConfigErrors
    assert str(back) == str(errors)
    assert [(e.location, e.key, e.detail) for e in back.each()] == [
        ("a.toml:3", "k", "must be > 0"),
        (None, "j", "bad"),
    ]


def test_errors_unpickle_with_their_fields() -> None:
    config = pickle.loads(pickle.dumps(ConfigError("must be > 0", location="f:1", key="k")))
    assert (str(config), config.location, config.key, config.detail) == (
        "f:1: k: must be > 0",
        "f:1",
        "k",
        "must be > 0",
    )
    request = pickle.loads(pickle.dumps(InvalidRequestError("bad", param="x")))
    assert (request.message, request.param) == ("bad", "x")
    engine = pickle.loads(pickle.dumps(EngineError("down", instance_id="i", retryable=True)))
    assert (engine.instance_id, engine.retryable) == ("i", True)


def test_reword_changes_what_the_error_says_and_nothing_else() -> None:
    exc = InvalidRequestError("max_tokens: too many", param="max_tokens")
    exc.reword("inputs[1]: max_tokens: too many")
    assert (str(exc), exc.message, exc.param) == (
        "inputs[1]: max_tokens: too many",
        "inputs[1]: max_tokens: too many",
        "max_tokens",
    )
    assert exc.to_openai()["error"]["message"] == "inputs[1]: max_tokens: too many"
