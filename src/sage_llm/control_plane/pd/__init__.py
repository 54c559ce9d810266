"""Prefill/decode (PD) disaggregation: run a request's prefill on one instance and its decode
on another, handing the KV cache over between them.

Three parts, each replaceable:

* a **decider** (:mod:`~sage_llm.control_plane.pd.decider`) says whether a request is worth
  disaggregating;
* the **orchestrator** (:mod:`~sage_llm.control_plane.pd.orchestrator`) picks the
  (prefill, decode) pair, with the KV transfer cost in the pair's score;
* a **connector** (:mod:`~sage_llm.control_plane.pd.connectors`) carries the two legs out
  with the engines' own protocol (vLLM ``kv_transfer_params`` or SGLang bootstrap).

:func:`build_pd` builds all three from a :class:`~sage_llm.types.PDSeparationConfig`; the
dispatcher runs them. ``docs/pd.md`` is the operator's guide.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sage_llm.config_fields import INT64_MAX, described
from sage_llm.control_plane.params import Gathered, build_params
from sage_llm.control_plane.pd.connectors import (
    CONNECTOR_NAMES,
    PDConnector,
    PDLegError,
    PDLegs,
    SGLangConnector,
    VLLMConnector,
    build_connector,
)
from sage_llm.control_plane.pd.decider import (
    DECIDER_NAMES,
    AdaptiveDecider,
    Decider,
    PDDecision,
    build_decider,
    get_decider,
)
from sage_llm.control_plane.pd.orchestrator import (
    LinkModel,
    PairingParams,
    PDOrchestrator,
    PDPlan,
    with_pd_assignment,
)
from sage_llm.errors import ConfigError
from sage_llm.types import PDSeparationConfig

__all__ = [
    "CONNECTOR_NAMES",
    "DECIDER_NAMES",
    "Decider",
    "LinkModel",
    "PDComponents",
    "PDConnector",
    "PDDecision",
    "PDLegError",
    "PDLegs",
    "PDOrchestrator",
    "PDPlan",
    "PairingParams",
    "SGLangConnector",
    "VLLMConnector",
    "build_connector",
    "build_decider",
    "build_pd",
    "with_pd_assignment",
]

METADATA_KEYS = ("decider_params", "pairing_params", "connector_params", "kv_bytes_per_token")
"""Keys of ``PDSeparationConfig.metadata`` that :func:`build_pd` reads."""


@dataclass(frozen=True)
class PDComponents:
    """What the dispatcher needs to run PD: decider, pair selection, connector, and whether
    a failed prefill leg falls back to a colocated run."""

    decider: Decider
    orchestrator: PDOrchestrator
    connector: PDConnector
    fallback_to_colocated: bool = True

    def describe(self) -> dict[str, object]:
        return {
            "decider": self.decider.describe(),
            "pairing": self.orchestrator.describe(),
            "connector": self.connector.describe(),
            "fallback_to_colocated": self.fallback_to_colocated,
        }


def _table(meta: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = meta.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"must be a table, got {value!r}", key=f"metadata.{key}")
    return dict(value)


def build_pd(
    cfg: PDSeparationConfig, *, seed: int | None = None, block_size: int = 16
) -> PDComponents:
    """The PD components ``cfg`` describes.

    The decider is ``cfg.routing_policy``; ``threshold`` takes ``prefilling_threshold_input_
    tokens`` and ``prefilling_threshold_ratio``, ``prefix_aware`` the prefix ``block_size``,
    ``adaptive`` ``max_transfer_latency_ms`` (0: no limit). ``cfg.metadata`` may add
    ``decider_params``, ``pairing_params`` (:class:`PairingParams` fields) and
    ``connector_params`` tables, and ``kv_bytes_per_token`` for the model's KV size. The
    ``adaptive`` decider's ``itl_slo_s`` and ``max_batched_tokens`` are the pairing's too,
    unless ``pairing_params`` gives its own ``itl_slo_s``.
    Raises :class:`ConfigError` for an unknown name or parameter.
    """
    meta = cfg.metadata or {}
    parts = Gathered()
    kv_bytes = meta.get("kv_bytes_per_token")
    if kv_bytes is not None and (
        isinstance(kv_bytes, bool)
        or not isinstance(kv_bytes, int)
        or not 1 <= kv_bytes <= INT64_MAX
    ):  # checked here once: both the decider and the pairing would take it
        parts.errors.append(
            ConfigError(
                f"must be a positive integer of at most 64 bits, got {described(kv_bytes)}",
                key="metadata.kv_bytes_per_token",
            )
        )
        kv_bytes = None
    spec = get_decider(cfg.routing_policy)
    decider_params: dict[str, Any] = {}
    if spec.name == "threshold":
        decider_params = {
            "min_prompt_tokens": cfg.prefilling_threshold_input_tokens,
            "min_ratio": cfg.prefilling_threshold_ratio,
        }
    elif spec.name == "prefix_aware":
        decider_params = {"block_size": block_size}
    elif spec.name == "adaptive":
        limit = cfg.max_transfer_latency_ms
        decider_params = {"max_transfer_s": limit / 1000.0 if limit and limit > 0 else None}
        if kv_bytes is not None:
            decider_params["kv_bytes_per_token"] = kv_bytes
    # the config's names of the decider's parameters it sets (for its errors)
    named = {
        "min_prompt_tokens": "prefilling_threshold_input_tokens",
        "min_ratio": "prefilling_threshold_ratio",
        "max_transfer_s": "max_transfer_latency_ms",
    }
    given = parts.built(lambda: _table(meta, "decider_params"), lambda key: key or "") or {}
    decider_params.update(given)
    pairing = parts.built(lambda: _table(meta, "pairing_params"), lambda key: key or "") or {}
    if kv_bytes is not None:
        pairing.setdefault("kv_bytes_per_token", kv_bytes)
    connector_params = (
        parts.built(lambda: _table(meta, "connector_params"), lambda key: key or "") or {}
    )
    decider = parts.built(
        lambda: build_decider(spec.name, decider_params),
        lambda key: (
            named[key]
            if key in named and key not in given
            else f"metadata.decider_params.{key}"
            if key
            else "routing_policy"
        ),
    )
    # the pairing keeps prefill legs off decodes they would stall past the adaptive
    # decider's gap target, with the decider's chunk size
    adaptive = decider.params if isinstance(decider, AdaptiveDecider) else None
    if adaptive is not None and adaptive.itl_slo_s is not None and "itl_slo_s" not in pairing:
        pairing["itl_slo_s"] = adaptive.itl_slo_s
        pairing.setdefault("max_batched_tokens", adaptive.max_batched_tokens)
    orchestrator = parts.built(
        lambda: PDOrchestrator(build_params(PairingParams, pairing, owner="PD pairing"), seed=seed),
        lambda key: f"metadata.pairing_params.{key}" if key else "metadata.pairing_params",
    )
    connector = parts.built(
        lambda: build_connector(cfg.connector, connector_params, seed=seed),
        lambda key: f"metadata.connector_params.{key}" if key else "connector",
    )
    parts.raise_any()
    assert decider is not None
    assert orchestrator is not None
    assert connector is not None
    if isinstance(decider, AdaptiveDecider):  # its colocated path is where requests go
        decider.held_for_prefill = orchestrator.reserved
    return PDComponents(
        decider=decider,
        orchestrator=orchestrator,
        connector=connector,
        fallback_to_colocated=cfg.fallback_to_colocated,
    )
