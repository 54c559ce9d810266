"""Exceptions raised by sage-llm.

Every exception carries an HTTP status and an OpenAI-style error ``type`` so the gateway
can turn it into a JSON error body without a lookup table::

    SageLLMError (500, internal_error)
    ├── ConfigError (400, invalid_config)            a bad config file, value or key
    │   └── ConfigErrors                             several at once (``errors``)
    ├── InvalidRequestError (400, invalid_request_error)  a bad request field (``param`` names it)
    │   ├── PayloadTooLargeError (413)
    │   └── UnsupportedMediaTypeError (415)       a body in an encoding it cannot read
    ├── AuthenticationError (401, authentication_error)
    ├── PermissionDeniedError (403, permission_error)
    ├── NotFoundError (404, not_found_error)
    │   ├── ModelNotFoundError                       no instance serves the model
    │   ├── RequestNotFoundError                     unknown (or expired) request id
    │   ├── InstanceNotFoundError
    │   └── PolicyNotFoundError / StrategyNotFoundError  unknown policy or routing name
    ├── ConflictError (409, conflict_error)          e.g. an instance id already registered
    ├── AdmissionError (429, rate_limit_error)       refused before queueing
    │   ├── QueueFullError                           carries ``retry_after_s``
    │   ├── SLOInfeasibleError (slo_infeasible)      the deadline cannot be met
    │   └── OverBudgetError                          no instance within the cost budget
    ├── RequestCancelledError (499, cancelled)
    ├── NoHealthyInstanceError (503, service_unavailable)
    ├── ControlPlaneNotRunningError (503, service_unavailable)
    ├── DeadlineExceededError (504, timeout_error)   a deadline or wait timeout passed
    └── EngineError (502, engine_error)              an engine call failed
        ├── EngineRequestRejectedError (400)         the engine refused the request itself
        │                                            (also an InvalidRequestError)
        ├── EngineConnectionError                    could not connect / connection dropped
        ├── EngineTimeoutError (504)
        └── EngineStreamError                        malformed or truncated stream

``EngineError.retryable`` tells the dispatcher whether another instance may be tried: only
failures before the first token are retried, so no request runs twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class SageLLMError(Exception):
    """Base class of every sage-llm error."""

    http_status: int = 500
    error_type: str = "internal_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def reword(self, message: str) -> None:
        """Say ``message`` instead (``str(exc)`` too), the error otherwise unchanged."""
        self.message = message
        self.args = (message, *self.args[1:])

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI-style error body: ``{"error": {"message", "type", "param", "code"}}``."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.http_status,
            }
        }


class ConfigError(SageLLMError):
    """A configuration problem. ``location`` is ``file:line`` when known, ``key`` the dotted key."""

    http_status = 400
    error_type = "invalid_config"

    def __init__(self, message: str, *, location: str | None = None, key: str | None = None):
        prefix = ""
        if location:
            prefix = f"{location}: "
        if key:
            prefix += f"{key}: "
        super().__init__(prefix + message, param=key)
        self.location = location
        self.key = key
        self.detail = message
        """The message without the location and key."""

    def each(self) -> tuple[ConfigError, ...]:
        """The problems this error stands for (:class:`ConfigErrors`: all of them)."""
        return (self,)

    def under(self, prefix: str) -> ConfigError:
        """The same problem with its key under ``prefix`` (``prefix.key``)."""
        key = prefix if self.key is None else f"{prefix}.{self.key}"
        return ConfigError(self.detail, location=self.location, key=key)


class ConfigErrors(ConfigError):
    """Several problems at once. ``errors`` holds each; ``location``/``key`` are the first's."""

    def __init__(self, errors: Sequence[ConfigError]) -> None:
        lines = "\n".join(str(e) for e in errors)
        super().__init__(f"{len(errors)} configuration problems:\n{lines}")
        self.errors = tuple(errors)
        self.location = errors[0].location
        self.key = self.param = errors[0].key

    def each(self) -> tuple[ConfigError, ...]:
        return self.errors

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.errors,))  # pickled with its problems, not its text


def raise_problems(errors: Sequence[ConfigError]) -> None:
    """Raise the one problem of ``errors`` itself, several as :class:`ConfigErrors`;
    nothing when there are none."""
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise ConfigErrors(errors)


class InvalidRequestError(SageLLMError):
    """A bad request: a field (``param`` names it) or a header with a value the control
    plane refuses (HTTP 400)."""

    http_status = 400
    error_type = "invalid_request_error"


class PayloadTooLargeError(InvalidRequestError):
    """A request body above the gateway's ``max_body_bytes`` (HTTP 413)."""

    http_status = 413


class UnsupportedMediaTypeError(InvalidRequestError):
    """A request body in a ``Content-Encoding`` the server does not read (HTTP 415)."""

    http_status = 415


class AuthenticationError(SageLLMError):
    """A missing or wrong API key or admin token (HTTP 401)."""

    http_status = 401
    error_type = "authentication_error"


class PermissionDeniedError(SageLLMError):
    """The admin API refused: a wrong admin token, or a client that is not on loopback
    when no admin token is configured; or a request that names a tenant's user without
    that tenant's API key (HTTP 403)."""

    http_status = 403
    error_type = "permission_error"


class NotFoundError(SageLLMError):
    """Something named in the request does not exist (HTTP 404); the subclasses say
    what."""

    http_status = 404
    error_type = "not_found_error"


class ModelNotFoundError(NotFoundError):
    """No registered instance serves the requested model."""


class RequestNotFoundError(NotFoundError):
    """No request with this id is in progress or kept among the finished ones."""


class InstanceNotFoundError(NotFoundError):
    """No instance is registered with this id."""


class PolicyNotFoundError(NotFoundError):
    """No scheduling policy has this name."""


class StrategyNotFoundError(NotFoundError):
    """No routing strategy has this name."""


class ConflictError(SageLLMError):
    """An id already in use (a request id in progress, an instance id or address), or an
    instance already being removed (HTTP 409)."""

    http_status = 409
    error_type = "conflict_error"


class AdmissionError(SageLLMError):
    """The request was refused before it was queued. ``retry_after_s`` hints when to retry."""

    http_status = 429
    error_type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class QueueFullError(AdmissionError):
    """Refused at admission: the queue holds ``max_queue_size`` requests (HTTP 429;
    ``retry_after_s`` estimates when a place frees up)."""


class SLOInfeasibleError(AdmissionError):
    """Refused at admission: no instance is predicted to meet the request's deadline
    (HTTP 429, no retry hint: a fixed deadline only gets harder to meet)."""

    error_type = "slo_infeasible"


class OverBudgetError(AdmissionError):
    """Refused at admission: even the cheapest instance would cost more than the request's
    ``cost_budget`` (HTTP 429, no retry hint: the price does not drop a second later)."""


class RequestCancelledError(SageLLMError):
    """The request was cancelled (by its caller, or its client went away) before it
    completed."""

    http_status = 499
    error_type = "cancelled"


class NoHealthyInstanceError(SageLLMError):
    """No instance can take the request now. ``retry_after_s`` hints when one may (the end
    of the nearest cool-down of an ejected instance); None when nothing says."""

    http_status = 503
    error_type = "service_unavailable"

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ControlPlaneNotRunningError(SageLLMError):
    """The control plane is not running (not started yet, or stopped) (HTTP 503)."""

    http_status = 503
    error_type = "service_unavailable"


class DeadlineExceededError(SageLLMError):
    """A request, or a wait for one, passed its time limit (HTTP 504)."""

    http_status = 504
    error_type = "timeout_error"

    @classmethod
    def request_timed_out(cls, request_id: str, timeout_s: float) -> DeadlineExceededError:
        """A request cancelled because it ran past its time limit."""
        return cls(f"request {request_id} did not finish within {timeout_s:g} s and was cancelled")


class EngineError(SageLLMError):
    """An engine call failed.

    ``retryable`` is True when nothing was produced yet and another instance may be tried;
    ``status`` is the engine's HTTP status when it answered with one.
    """

    http_status = 502
    error_type = "engine_error"

    def __init__(
        self,
        message: str,
        *,
        instance_id: str | None = None,
        status: int | None = None,
        retryable: bool = True,
    ) -> None:
        super().__init__(message)
        self.instance_id = instance_id
        self.status = status
        self.retryable = retryable


class EngineRequestRejectedError(EngineError, InvalidRequestError):
    """An engine refused the request itself: an HTTP 400, 413 or 422 answer (vLLM's answer
    to a prompt longer than the model's context, for instance), or an in-process engine's
    :class:`InvalidRequestError`. The same request would be refused on any instance, so it
    is not retried and does not count against the instance's health; the client gets a
    400 with the engine's message (and the field it names, when it names one). It is an
    :class:`InvalidRequestError` too: ``except InvalidRequestError`` catches a bad request
    whether the control plane or an engine found it."""

    http_status = 400
    error_type = "invalid_request_error"

    def __init__(
        self,
        message: str,
        *,
        instance_id: str | None = None,
        status: int | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message, instance_id=instance_id, status=status, retryable=False)
        self.param = param


class EngineConnectionError(EngineError):
    """The engine could not be reached, or the connection broke (HTTP 502)."""


class EngineTimeoutError(EngineError):
    """The engine did not answer in time: its first token, or the next chunk (HTTP 504)."""

    http_status = 504


class EngineStreamError(EngineError):
    """The engine's stream was malformed or ended with an error event (HTTP 502)."""
