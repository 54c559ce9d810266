"""Policy names → classes, and :func:`build_policy`.

Adding a policy is one module plus one line in ``_POLICIES``. ``params`` come from config
files as plain mappings; they are checked against the policy's frozen ``Params``
dataclass (unknown keys, wrong types and out-of-range values all raise
:class:`~sage_llm.errors.ConfigError` naming the key).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

from sage_llm.control_plane.scheduling._queue import QueuedPolicy
from sage_llm.control_plane.scheduling.adaptive import AdaptivePolicy
from sage_llm.control_plane.scheduling.base import SchedulingPolicy
from sage_llm.control_plane.scheduling.cost_optimized import CostOptimizedPolicy
from sage_llm.control_plane.scheduling.fifo import FIFOPolicy
from sage_llm.control_plane.scheduling.priority import PriorityPolicy
from sage_llm.control_plane.scheduling.slo_aware import SLOAwarePolicy
from sage_llm.errors import ConfigError, PolicyNotFoundError

_POLICIES: Mapping[str, tuple[Callable[[Any], SchedulingPolicy], type[Any]]] = (
    types.MappingProxyType(
        {
            "fifo": (FIFOPolicy, FIFOPolicy.Params),
            "priority": (PriorityPolicy, PriorityPolicy.Params),
            "slo_aware": (SLOAwarePolicy, SLOAwarePolicy.Params),
            "cost_optimized": (CostOptimizedPolicy, CostOptimizedPolicy.Params),
            "adaptive": (AdaptivePolicy, AdaptivePolicy.Params),
        }
    )
)

POLICY_NAMES: tuple[str, ...] = tuple(_POLICIES)
"""``("fifo", "priority", "slo_aware", "cost_optimized", "adaptive")``."""


def may_read_block_hashes(policy: SchedulingPolicy) -> bool:
    """Whether ``policy`` may read ``RequestInfo.block_hashes``: the built-in policies (the
    queued ones and ``adaptive``) never do; any other may."""
    return not isinstance(policy, (QueuedPolicy, AdaptivePolicy))


def params_class(name: str) -> type[Any]:
    """The frozen ``Params`` dataclass of policy ``name``."""
    return _lookup(name)[1]


def build_policy(name: str, params: Mapping[str, Any] | None = None) -> SchedulingPolicy:
    """A new policy ``name`` (case-insensitive, ``-`` read as ``_``) configured by
    ``params`` (defaults for missing keys).

    Raises :class:`PolicyNotFoundError` for an unknown name and :class:`ConfigError`
    (``key`` = the parameter) for an unknown key or an invalid value.
    """
    cls, params_cls = _lookup(name)
    return cls(make_params(params_cls, params or {}))


def _lookup(name: str) -> tuple[Callable[[Any], SchedulingPolicy], type[Any]]:
    """The policy called ``name``: case-insensitive, ``-`` read as ``_`` (as config files
    and routing strategy names are read)."""
    try:
        return _POLICIES[str(name).strip().lower().replace("-", "_")]
    except KeyError:
        valid = ", ".join(POLICY_NAMES)
        raise PolicyNotFoundError(
            f"unknown scheduling policy {name!r}; valid: {valid}", param="scheduling_policy"
        ) from None


def make_params(params_cls: type[Any], values: Mapping[str, Any]) -> Any:
    """``params_cls(**values)`` with unknown keys and wrongly typed values refused."""
    hints = typing.get_type_hints(params_cls)
    fields = {f.name for f in dataclasses.fields(params_cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in fields:
            valid = ", ".join(sorted(fields)) or "none"
            raise ConfigError(f"unknown parameter (valid: {valid})", key=str(key))
        kwargs[key] = _coerce(key, value, hints[key])
    return params_cls(**kwargs)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    if typing.get_origin(hint) is typing.Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"must be one of {', '.join(map(repr, choices))}", key=key)
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"must be a number, got {value!r}", key=key)
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"must be an integer, got {value!r}", key=key)
        return value
    if hint is bool or hint is str:
        if not isinstance(value, hint):
            raise ConfigError(f"must be a {hint.__name__}, got {value!r}", key=key)
        return value
    return value
