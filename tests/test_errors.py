"""The exception types: their documented statuses and types, and what they carry (which
survives a round trip through pickle: a process pool, a SAGE worker in another process)."""

from __future__ import annotations

import pickle

import pytest

from sage_llm.errors import (
    AuthenticationError,
    ConfigError,
    ConfigErrors,
    ConflictError,
    ControlPlaneNotRunningError,
    DeadlineExceededError,
    EngineConnectionError,
    EngineError,
    EngineRequestRejectedError,
    EngineStreamError,
    EngineTimeoutError,
    InvalidRequestError,
    ModelNotFoundError,
    NoHealthyInstanceError,
    NotFoundError,
    OverBudgetError,
    PayloadTooLargeError,
    PermissionDeniedError,
    QueueFullError,
    RequestCancelledError,
    SageLLMError,
    SLOInfeasibleError,
    UnsupportedMediaTypeError,
)


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


# docs/gateway.md, "Errors" (the statuses and types table), and this module's tree
DOCUMENTED_STATUS_AND_TYPE: list[tuple[type[SageLLMError], int, str]] = [
    (SageLLMError, 500, "internal_error"),
    (ConfigError, 400, "invalid_config"),
    (InvalidRequestError, 400, "invalid_request_error"),
    (PayloadTooLargeError, 413, "invalid_request_error"),
    (UnsupportedMediaTypeError, 415, "invalid_request_error"),
    (AuthenticationError, 401, "authentication_error"),
    (PermissionDeniedError, 403, "permission_error"),
    (NotFoundError, 404, "not_found_error"),
    (ModelNotFoundError, 404, "not_found_error"),
    (ConflictError, 409, "conflict_error"),
    (QueueFullError, 429, "rate_limit_error"),
    (SLOInfeasibleError, 429, "slo_infeasible"),
    (OverBudgetError, 429, "rate_limit_error"),
    (RequestCancelledError, 499, "cancelled"),
    (NoHealthyInstanceError, 503, "service_unavailable"),
    (ControlPlaneNotRunningError, 503, "service_unavailable"),
    (DeadlineExceededError, 504, "timeout_error"),
    (EngineError, 502, "engine_error"),
    (EngineRequestRejectedError, 400, "invalid_request_error"),
    (EngineConnectionError, 502, "engine_error"),
    (EngineTimeoutError, 504, "engine_error"),
    (EngineStreamError, 502, "engine_error"),
]


@pytest.mark.parametrize(("cls", "status", "kind"), DOCUMENTED_STATUS_AND_TYPE)
def test_each_error_has_its_documented_status_and_type(
    cls: type[SageLLMError], status: int, kind: str
) -> None:
    body = cls("no").to_openai()["error"]
    assert (cls.http_status, cls.error_type) == (status, kind)
    assert (body["code"], body["type"]) == (status, kind)


def test_the_openai_body_names_the_field_in_param() -> None:
    body = InvalidRequestError("max_tokens: too many", param="max_tokens").to_openai()
    assert body == {
        "error": {
            "message": "max_tokens: too many",
            "type": "invalid_request_error",
            "param": "max_tokens",
            "code": 400,
        }
    }
    rejected = EngineRequestRejectedError("too long", instance_id="i", status=400, param="prompt")
    assert (rejected.param, rejected.retryable) == ("prompt", False)
    assert rejected.to_openai()["error"]["param"] == "prompt"
    assert ConfigError("must be > 0", key="gateway.port").to_openai()["error"]["param"] == (
        "gateway.port"
    )


def test_refusals_carry_their_retry_hint() -> None:
    assert QueueFullError("full", retry_after_s=1.5).retry_after_s == 1.5
    assert NoHealthyInstanceError("none", retry_after_s=3.0).retry_after_s == 3.0
    assert SLOInfeasibleError("late").retry_after_s is None
