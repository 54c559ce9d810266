"""Policy names → classes, and :func:`build_policy`.

Adding a policy is one module plus one line in ``_POLICIES``. ``params`` come from config
files as plain mappings; they are checked against the policy's frozen ``Params``
dataclass (unknown keys, wrong types and out-of-range values all raise
:class:`~sage_llm.errors.ConfigError` naming the key).
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from typing import Any

from sage_llm.config_fields import name_key
from sage_llm.control_plane.params import build_params
from sage_llm.control_plane.scheduling._queue import QueuedPolicy
from sage_llm.control_plane.scheduling.adaptive import AdaptivePolicy
from sage_llm.control_plane.scheduling.base import SchedulingPolicy
from sage_llm.control_plane.scheduling.cost_optimized import CostOptimizedPolicy
from sage_llm.control_plane.scheduling.fair import FairSharePolicy
from sage_llm.control_plane.scheduling.fifo import FIFOPolicy
from sage_llm.control_plane.scheduling.priority import PriorityPolicy
from sage_llm.control_plane.scheduling.slo_aware import SLOAwarePolicy
from sage_llm.errors import PolicyNotFoundError

_POLICIES: Mapping[str, tuple[Callable[[Any], SchedulingPolicy], type[Any]]] = (
    types.MappingProxyType(
        {
            "fifo": (FIFOPolicy, FIFOPolicy.Params),
            "priority": (PriorityPolicy, PriorityPolicy.Params),
            "slo_aware": (SLOAwarePolicy, SLOAwarePolicy.Params),
            "cost_optimized": (CostOptimizedPolicy, CostOptimizedPolicy.Params),
            "adaptive": (AdaptivePolicy, AdaptivePolicy.Params),
            "fair": (FairSharePolicy, FairSharePolicy.Params),
        }
    )
)

POLICY_NAMES: tuple[str, ...] = tuple(_POLICIES)
"""``("fifo", "priority", "slo_aware", "cost_optimized", "adaptive", "fair")``: the seed's
five, then ``fair`` (a share per user)."""


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
    return cls(build_params(params_cls, params or {}, owner=f"scheduling policy {name!r}"))


def _lookup(name: str) -> tuple[Callable[[Any], SchedulingPolicy], type[Any]]:
    """The policy called ``name``: case-insensitive, ``-`` read as ``_`` (as config files
    and routing strategy names are read)."""
    try:
        return _POLICIES[name_key(name)]
    except KeyError:
        valid = ", ".join(POLICY_NAMES)
        raise PolicyNotFoundError(
            f"unknown scheduling policy {name!r}; valid: {valid}", param="scheduling_policy"
        ) from None
