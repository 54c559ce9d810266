"""Hardware and model specifications for the simulator's cost model.

:class:`GPUSpec` and :class:`ModelSpec` are frozen dataclasses. Built-in specs are looked up
by case-insensitive name with aliases (``get_gpu("H100-SXM")``,
``get_model("meta-llama/Meta-Llama-3-8B")``); users add their own with
:func:`load_specs_toml`::

    [gpu.my-gpu]
    peak_tflops = 500.0       # dense BF16 TFLOP/s
    hbm_tbps = 2.0            # HBM bandwidth, TB/s
    memory_gb = 64            # GPU memory, GiB as the driver reports it
    nvlink_gbps = 0           # GB/s per direction, 0 = none
    pcie_gbps = 32            # GB/s per direction

    [model.my-llama]
    base = "llama-3-8b"       # optional: start from a built-in (or earlier) spec
    num_layers = 40

Units: ``*_tbps`` are terabytes per second, ``*_gbps`` gigabytes per second.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from sage_llm.config_locate import KeyLocator, Problems, read_toml, read_utf8
from sage_llm.errors import ConfigError

GIB = 1 << 30


@dataclass(frozen=True, slots=True)
class GPUSpec:
    """One accelerator: dense BF16 peak, HBM bandwidth, memory and interconnect."""

    name: str
    peak_tflops: float
    hbm_tbps: float
    memory_gb: float
    nvlink_gbps: float = 0.0
    pcie_gbps: float = 32.0

    def __post_init__(self) -> None:
        for attr in ("peak_tflops", "hbm_tbps", "memory_gb"):
            if not 0 < getattr(self, attr) < math.inf:
                raise ValueError(f"GPUSpec.{attr} must be a finite number > 0")
        if not (0 <= self.nvlink_gbps < math.inf and 0 <= self.pcie_gbps < math.inf):
            raise ValueError("GPUSpec link bandwidths must be finite numbers >= 0")

    @property
    def memory_bytes(self) -> float:
        return self.memory_gb * GIB

    @property
    def interconnect_gbps(self) -> float:
        """The GPU-to-GPU bandwidth used for TP/PP traffic: NVLink, else PCIe."""
        return self.nvlink_gbps if self.nvlink_gbps > 0 else max(self.pcie_gbps, 1.0)


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A decoder-only transformer. ``params_b`` is the total parameter count in billions."""

    name: str
    params_b: float
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    dtype_bytes: int = 2
    num_experts: int = 1
    experts_per_token: int = 1
    max_context: int | None = None
    """The longest sequence (prompt + output) the model was trained for, in tokens (its
    ``max_position_embeddings``); None: not known."""

    def __post_init__(self) -> None:
        if not 0 < self.params_b < math.inf:
            raise ValueError("ModelSpec.params_b must be a finite number > 0")
        if self.max_context is not None and self.max_context < 1:
            raise ValueError("ModelSpec.max_context must be >= 1")
        for attr in (
            "num_layers",
            "hidden_size",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "intermediate_size",
            "vocab_size",
            "dtype_bytes",
            "num_experts",
            "experts_per_token",
        ):
            if getattr(self, attr) < 1:
                raise ValueError(f"ModelSpec.{attr} must be >= 1")
        if self.experts_per_token > self.num_experts:
            raise ValueError("ModelSpec.experts_per_token must be <= num_experts")
        if self.num_heads % self.num_kv_heads:  # grouped-query attention shares K/V heads
            raise ValueError(
                f"ModelSpec.num_kv_heads must divide num_heads ({self.num_heads}), got "
                f"{self.num_kv_heads}"
            )

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of every layer for one token: 2 × layers × kv_heads × head_dim × dtype."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def weight_bytes(self) -> float:
        """Bytes of all weights (every expert of an MoE model)."""
        return self.params_b * 1e9 * self.dtype_bytes

    @property
    def attn_params_per_layer(self) -> int:
        """Q, K, V and output projections of one layer."""
        q_out = self.num_heads * self.head_dim
        kv_out = 2 * self.num_kv_heads * self.head_dim
        return self.hidden_size * (q_out + kv_out) + q_out * self.hidden_size

    @property
    def expert_params_per_layer(self) -> int:
        """One expert's gated MLP (gate, up and down projections)."""
        return 3 * self.hidden_size * self.intermediate_size

    @property
    def layer_params_active(self) -> int:
        """Parameters one token multiplies with in one layer (attention + active experts)."""
        return self.attn_params_per_layer + self.experts_per_token * self.expert_params_per_layer

    @property
    def active_params(self) -> float:
        """Parameters used per token: all of them for a dense model, active experts for MoE."""
        idle = self.num_experts - self.experts_per_token
        return self.params_b * 1e9 - idle * self.expert_params_per_layer * self.num_layers


def _gpus() -> Mapping[str, GPUSpec]:
    specs = (
        GPUSpec("H100", 989.0, 3.35, 80, nvlink_gbps=450, pcie_gbps=64),
        GPUSpec("H200", 989.0, 4.8, 141, nvlink_gbps=450, pcie_gbps=64),
        GPUSpec("A100-80G", 312.0, 2.04, 80, nvlink_gbps=300, pcie_gbps=32),
        GPUSpec("L40S", 362.0, 0.864, 48, nvlink_gbps=0, pcie_gbps=32),
        GPUSpec("cpu", 1.0, 0.05, 16, nvlink_gbps=0, pcie_gbps=10),
    )
    return MappingProxyType({s.name.lower(): s for s in specs})


def _models() -> Mapping[str, ModelSpec]:
    specs = (
        # max_context: each model's max_position_embeddings (Llama-3.1 and 3.3: 131,072).
        ModelSpec("Llama-2-7B", 6.738, 32, 4096, 32, 32, 128, 11008, 32000, max_context=4096),
        ModelSpec("Llama-2-13B", 13.016, 40, 5120, 40, 40, 128, 13824, 32000, max_context=4096),
        ModelSpec("Llama-2-70B", 68.977, 80, 8192, 64, 8, 128, 28672, 32000, max_context=4096),
        ModelSpec("Llama-3-8B", 8.030261248, 32, 4096, 32, 8, 128, 14336, 128256, max_context=8192),
        ModelSpec("Llama-3-70B", 70.554, 80, 8192, 64, 8, 128, 28672, 128256, max_context=8192),
        ModelSpec(
            "Llama-3.1-8B", 8.030261248, 32, 4096, 32, 8, 128, 14336, 128256, max_context=131072
        ),
        ModelSpec("Llama-3.1-70B", 70.554, 80, 8192, 64, 8, 128, 28672, 128256, max_context=131072),
        ModelSpec("Qwen2.5-7B", 7.616, 28, 3584, 28, 4, 128, 18944, 152064, max_context=32768),
        ModelSpec("Qwen2.5-72B", 72.706, 80, 8192, 64, 8, 128, 29568, 152064, max_context=32768),
        ModelSpec(
            "Mixtral-8x7B", 46.703, 32, 4096, 32, 8, 128, 14336, 32000, 2, 8, 2, max_context=32768
        ),
        # The tiny random-weight Llama served by the CPU vLLM build (scripts/make_tiny_model.py).
        ModelSpec("tiny", 0.008716, 2, 128, 2, 2, 64, 512, 32000),
    )
    return MappingProxyType({s.name.lower(): s for s in specs})


BUILTIN_GPUS: Mapping[str, GPUSpec] = _gpus()
BUILTIN_MODELS: Mapping[str, ModelSpec] = _models()

_GPU_ALIASES: Mapping[str, str] = MappingProxyType(
    {
        "h100-sxm": "h100",
        "h100-sxm5": "h100",
        "h100-80g": "h100",
        "h100-80gb": "h100",
        "h100-80gb-hbm3": "h100",
        "h200-sxm": "h200",
        "h200-141g": "h200",
        "h200-141gb-hbm3e": "h200",
        "a100": "a100-80g",
        "a100-80gb": "a100-80g",
        "a100-sxm": "a100-80g",
        "a100-sxm4-80gb": "a100-80g",
        "l40s-48g": "l40s",
        "host": "cpu",
    }
)

_MODEL_ALIASES: Mapping[str, str] = MappingProxyType(
    {
        "llama3-8b": "llama-3-8b",
        "llama-3.3-70b": "llama-3.1-70b",
        "llama3-70b": "llama-3-70b",
        "llama2-7b": "llama-2-7b",
        "llama2-13b": "llama-2-13b",
        "llama2-70b": "llama-2-70b",
        "qwen2.5-7b": "qwen2.5-7b",
        "mixtral-8x7b": "mixtral-8x7b",
        "tiny-llama": "tiny",
    }
)

_MODEL_SUFFIX_RE = re.compile(r"(-(instruct|chat|hf|it|base|v\d+(\.\d+)*))+$")


def _gpu_key(name: str) -> str:
    key = name.strip().lower().replace("_", "-").replace(" ", "-")
    key = key.removeprefix("nvidia-")
    return _GPU_ALIASES.get(key, key)


def _model_key(name: str) -> str:
    key = name.strip().lower().rsplit("/", 1)[-1].replace("_", "-").replace(" ", "-")
    key = key.removeprefix("meta-")
    key = _MODEL_SUFFIX_RE.sub("", key)
    return _MODEL_ALIASES.get(key, key)


def get_gpu(name: str, extra: Mapping[str, GPUSpec] | None = None) -> GPUSpec:
    """A GPU spec by name (case-insensitive, aliases allowed); ``extra`` is searched first."""
    for spec_name, own in (extra or {}).items():
        if spec_name.lower() == name.strip().lower():
            return own
    spec = BUILTIN_GPUS.get(_gpu_key(name))
    if spec is None:
        known = ", ".join(s.name for s in BUILTIN_GPUS.values())
        raise ConfigError(f"unknown GPU {name!r}; built-in GPUs: {known}", key="gpu")
    return spec


def get_model(name: str, extra: Mapping[str, ModelSpec] | None = None) -> ModelSpec:
    """A model spec by name or Hugging Face id (``meta-llama/Meta-Llama-3-8B``)."""
    for spec_name, own in (extra or {}).items():
        if spec_name.lower() == name.strip().lower():
            return own
    spec = BUILTIN_MODELS.get(_model_key(name))
    if spec is None:
        known = ", ".join(s.name for s in BUILTIN_MODELS.values())
        raise ConfigError(f"unknown model {name!r}; built-in models: {known}", key="model")
    return spec


def resolve_gpu(gpu: str | GPUSpec) -> GPUSpec:
    return gpu if isinstance(gpu, GPUSpec) else get_gpu(gpu)


def resolve_model(model: str | ModelSpec) -> ModelSpec:
    return model if isinstance(model, ModelSpec) else get_model(model)


def kv_capacity_blocks(
    model: ModelSpec,
    gpu: GPUSpec,
    *,
    tp: int = 1,
    pp: int = 1,
    block_size: int = 16,
    gpu_memory_utilization: float = 0.9,
) -> int:
    """KV cache blocks that fit beside the weights on ``tp × pp`` GPUs.

    Each GPU holds ``1/(tp·pp)`` of the weights and the KV of ``layers/pp`` layers and
    ``max(1, kv_heads/tp)`` KV heads (heads are replicated when ``tp > kv_heads``). Memory is
    taken in GiB, as the driver reports it; activation memory is not reserved. This gives
    llm-d's 29,205 blocks for Llama-3.1-8B on one H100.

    Raises :class:`ConfigError` with key ``gpu_memory_utilization`` when the weights and one
    KV block fit in a GPU's memory but not in that share of it, else with key ``model`` when
    they do not fit in the GPUs at all.
    """
    weights = model.weight_bytes / (tp * pp)
    per_gpu = gpu.memory_bytes * gpu_memory_utilization - weights
    kv_heads = max(1.0, model.num_kv_heads / tp)
    layers = math.ceil(model.num_layers / pp)
    per_token = 2 * layers * kv_heads * model.head_dim * model.dtype_bytes
    block_bytes = per_token * block_size
    blocks = int(per_gpu // block_bytes)
    if blocks < 1 and gpu.memory_bytes - weights >= block_bytes:  # the share is too small
        needed = weights + block_bytes
        least = min(1.0, math.ceil(needed / gpu.memory_bytes * 100) / 100)
        raise ConfigError(
            f"{gpu_memory_utilization:g} of each {gpu.name}'s {gpu.memory_gb:g} GiB is "
            f"{gpu.memory_bytes * gpu_memory_utilization / GIB:.1f} GiB, but {model.name} on "
            f"{tp * pp} × {gpu.name} needs {needed / GIB:.1f} GiB per GPU (its weights and "
            f"one KV block), a share of at least {least:g}",
            key="gpu_memory_utilization",
        )
    if blocks < 1:
        raise ConfigError(
            f"{model.name} does not fit on {tp * pp} × {gpu.name} "
            f"(weights {model.weight_bytes / GIB:.1f} GiB)",
            key="model",
        )
    return blocks


def tp_problem(model: ModelSpec, tp: int) -> str | None:
    """Why vLLM refuses tensor-parallel size ``tp`` for ``model``, or None: it must divide
    the attention heads, and divide the KV heads or be a multiple of them (KV heads are
    replicated then)."""
    heads, kv = model.num_heads, model.num_kv_heads
    if heads % tp:
        return (
            f"tensor-parallel size {tp} does not divide {model.name}'s {heads} attention "
            "heads (vLLM refuses it)"
        )
    if (kv % tp) if tp <= kv else (tp % kv):
        return (
            f"tensor-parallel size {tp} neither divides nor is a multiple of "
            f"{model.name}'s {kv} KV heads (vLLM refuses it)"
        )
    return None


def placement_problem(
    model: str, gpu: str, *, tp: int = 1, pp: int = 1, gpu_memory_utilization: float = 0.9
) -> str | None:
    """Why a simulated engine of ``model`` on ``tp × pp`` ``gpu``s cannot start (an unknown
    name, a TP size vLLM refuses, more pipeline stages than layers, weights that leave no
    room for the KV cache in ``gpu_memory_utilization`` of each GPU), or None."""
    try:
        spec = get_model(model)
        problem = tp_problem(spec, tp)
        if problem is None and pp > spec.num_layers:
            problem = (
                f"pipeline-parallel size {pp} is more than {spec.name}'s {spec.num_layers} "
                "layers (a stage needs one at least)"
            )
        if problem is None:
            kv_capacity_blocks(
                spec, get_gpu(gpu), tp=tp, pp=pp, gpu_memory_utilization=gpu_memory_utilization
            )
    except ConfigError as exc:
        return exc.detail
    return problem


def load_specs_toml(path: str | Path) -> tuple[dict[str, GPUSpec], dict[str, ModelSpec]]:
    """Read ``[gpu.<name>]`` and ``[model.<name>]`` tables from a TOML file.

    Keys are checked strictly: an unknown table or field, a missing field, or a value of the
    wrong type raises :class:`ConfigError` naming the file (and line when found) and the key.
    A table may start from another spec with ``base = "<name>"``.
    """
    path = Path(path)
    text = read_utf8(path, "spec file")
    data = read_toml(text, str(path))
    locator = KeyLocator(text)
    for key in data:
        if key not in ("gpu", "model"):
            raise ConfigError(
                "unknown table (expected [gpu.<name>] or [model.<name>])",
                location=_where(path, locator, key),
                key=key,
            )
    gpus: dict[str, GPUSpec] = {}
    models: dict[str, ModelSpec] = {}
    for name, table in _tables(path, locator, data, "gpu"):
        base = _base(path, locator, table, f"gpu.{name}", gpus, BUILTIN_GPUS, get_gpu)
        gpus[name] = _build(path, locator, GPUSpec, f"gpu.{name}", name, table, base)
    for name, table in _tables(path, locator, data, "model"):
        mbase = _base(path, locator, table, f"model.{name}", models, BUILTIN_MODELS, get_model)
        models[name] = _build(path, locator, ModelSpec, f"model.{name}", name, table, mbase)
    return gpus, models


def _tables(
    path: Path, locator: KeyLocator, data: Mapping[str, Any], kind: str
) -> list[tuple[str, Mapping[str, Any]]]:
    section = data.get(kind, {})
    if not isinstance(section, dict):  # [[gpu]], or gpu = "b200"
        got = "an array" if isinstance(section, list) else "a value"
        raise ConfigError(
            f"expected tables [{kind}.<name>], got {got}",
            location=_where(path, locator, kind),
            key=kind,
        )
    out: list[tuple[str, Mapping[str, Any]]] = []
    for name, table in section.items():
        if not isinstance(table, dict):
            raise ConfigError(
                f"expected a table [{kind}.{name}]",
                location=_where(path, locator, kind, name),
                key=f"{kind}.{name}",
            )
        out.append((name, table))
    return out


def _base(
    path: Path,
    locator: KeyLocator,
    table: Mapping[str, Any],
    dotted: str,
    earlier: Mapping[str, Any],
    builtins: Mapping[str, Any],
    lookup: Any,
) -> Any:
    base = table.get("base")
    if base is None:
        return None
    if not isinstance(base, str):
        raise ConfigError(
            "base must be a string",
            location=_where(path, locator, *_parts(dotted), "base"),
            key=dotted,
        )
    if base in earlier:
        return earlier[base]
    try:
        return lookup(base)
    except ConfigError as exc:
        raise ConfigError(
            exc.message,
            location=_where(path, locator, *_parts(dotted), "base"),
            key=f"{dotted}.base",
        ) from exc


def _build(
    path: Path,
    locator: KeyLocator,
    cls: Any,
    dotted: str,
    name: str,
    table: Mapping[str, Any],
    base: Any,
) -> Any:
    spec_fields = {f.name: f for f in fields(cls) if f.name != "name"}
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key == "base":
            continue
        if key not in spec_fields:
            allowed = ", ".join(["base", *spec_fields])
            raise ConfigError(
                f"unknown key (allowed: {allowed})",
                location=_where(path, locator, *_parts(dotted), key),
                key=f"{dotted}.{key}",
            )
        want_int = spec_fields[key].type in ("int", int, "int | None")  # (max_context)
        ok = isinstance(value, int) if want_int else isinstance(value, int | float)
        if isinstance(value, bool) or not ok:
            kind = "an integer" if want_int else "a number"
            raise ConfigError(
                f"must be {kind}, got {value!r}",
                location=_where(path, locator, *_parts(dotted), key),
                key=f"{dotted}.{key}",
            )
        values[key] = float(value) if not want_int else value
    try:
        if base is not None:
            return replace(base, name=name, **values)
        # a GPU's link bandwidths too: left out, they had read as no NVLink (TP all-reduces
        # over 32 GB/s PCIe, a TP4 prefill 5x too slow), unsaid
        missing = [
            k
            for k, f in spec_fields.items()
            if k not in values and (f.default is MISSING or cls is GPUSpec)
        ]
        if missing:
            raise ConfigError(
                f"missing keys: {', '.join(missing)}",
                location=_where(path, locator, *_parts(dotted)),
                key=dotted,
            )
        return cls(name=name, **values)
    except ValueError as exc:
        # "GPUSpec.peak_tflops must be positive": at that key's line, when the file gives it
        named = re.match(rf"{cls.__name__}\.(\w+) (.*)", str(exc), re.S)
        if named is not None and named.group(1) in values:
            key = named.group(1)
            raise ConfigError(
                named.group(2),
                location=_where(path, locator, *_parts(dotted), key),
                key=f"{dotted}.{key}",
            ) from exc
        raise ConfigError(
            str(exc), location=_where(path, locator, *_parts(dotted)), key=dotted
        ) from exc


def _where(path: Path, locator: KeyLocator, *parts: str) -> str:
    """``file:line`` of the key ``parts`` (``("gpu", "x", "peak_tflops")``), or of its
    nearest written ancestor; the file alone when none is written."""
    return Problems(str(path), locator).location(parts)


def _parts(dotted: str) -> tuple[str, str]:
    """``("model", name)`` of ``"model.<name>"`` (a name may hold dots: ``llama-3.1-8b``)."""
    kind, _, name = dotted.partition(".")
    return kind, name
