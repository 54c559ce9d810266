"""The simulated engine's synchronous core: a deterministic, vLLM-v1-like state machine.

:class:`SimEngineCore` holds the requests of one engine instance and, on each
:meth:`~SimEngineCore.step`, schedules one batch exactly as vLLM v1 does: running requests
first (one decode token each, or the next chunk of a partial prefill), then waiting
requests by arrival with chunked prefill, within ``max_num_batched_tokens`` and
``max_num_seqs``. KV cache lives in paged blocks (:class:`BlockPool`) with prefix caching;
when the cache is full the most recently admitted running request is preempted (its
blocks freed, recomputed later). The step's duration comes from a
:class:`~sage_llm.sim.costmodel.CostModel`.

Time is passed in (``step(now)``); nothing here sleeps or touches asyncio, so a cluster
simulator can drive thousands of cores from an event heap. The caller advances time by
``StepResult.duration_s``: tokens of a step exist at ``now + duration_s``.

LoRA adapters (``add_request(..., lora=NAME)``): as vLLM's ``--max-loras``, a batch holds
requests for at most ``max_loras`` adapters; a waiting request for another is passed over
(it keeps its place) while others behind it are admitted. An adapter that is not in one of
the engine's ``max_loras`` GPU slots is brought in when its first request is admitted (the
least recently used idle slot gives way), which makes that step ``lora_swap_s`` longer; a
step whose batch holds a LoRA request takes ``lora_step_s`` plus ``lora_token_s`` per token
longer (the adapters' own matrix products).

Priority (``scheduling_policy="priority"``, vLLM's ``--scheduling-policy priority``): the
waiting requests are taken by ``(priority, arrival, request id)``, lower first, a preempted
one going back among them in that order, and when a running request needs a KV block and
none is free, the running request last in that order is preempted (with ``fcfs``, the
last admitted).

PD legs (vLLM ``kv_transfer_params``): a request with ``do_remote_decode`` is a prefill leg
(one token, then its KV blocks stay pinned until :meth:`~SimEngineCore.release_kv`, abort or
``kv_pin_timeout_s``); one with ``do_remote_prefill`` is a decode leg (its KV arrives over
the link in ``tokens × kv_bytes_per_token / kv_link_gbps``, then it decodes).
"""

from __future__ import annotations

import math
import random
import sys
import zlib
from array import array
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from operator import attrgetter, itemgetter
from typing import Any

from sage_llm import tokens
from sage_llm.engines.base import EngineStats
from sage_llm.errors import ConfigError, ConflictError, InvalidRequestError
from sage_llm.sim.costmodel import (
    CostModel,
    FastStepTime,
    LinearStepModel,
    PrefillChunk,
    RooflineCostModel,
    fast_step_time,
)
from sage_llm.sim.roofline_step import roofline_step
from sage_llm.sim.specs import (
    GPUSpec,
    ModelSpec,
    kv_capacity_blocks,
    resolve_gpu,
    resolve_model,
    tp_problem,
)
from sage_llm.types import ExecutionInstanceType

__all__ = [
    "LORA_LAYER_STEP_S",
    "LORA_LAYER_TOKEN_S",
    "SCHEDULING_POLICIES",
    "STEP_FIELDS",
    "BlockPool",
    "FastStepTime",
    "PinnedKV",
    "SimEngineConfig",
    "SimEngineCore",
    "StepResult",
    "fast_step_time",
    "prompt_block_hashes",
]

SCHEDULING_POLICIES = ("fcfs", "priority")
"""vLLM's ``--scheduling-policy`` values."""

_WAITING, _TRANSFER, _RUNNING, _PINNED = range(4)
_EV_EXPLICIT, _EV_BLOCK, _EV_FINISH = range(3)
_SUM_ONLY_COST_MODELS = (RooflineCostModel, LinearStepModel)
"""Cost models that read only ``len`` and ``sum`` of the decode context lengths."""
_by_seq = attrgetter("seq")


def _priority_key(req: _Req) -> tuple[int, float, str]:
    """The ``priority`` policy's order of requests: lower first."""
    return req.priority, req.arrival, req.id


_first = itemgetter(0)
_LRU_SLACK = 64
"""Dead entries a block pool's cached-block FIFO may hold beyond as many as it has live."""


def prompt_block_hashes(token_ids: Sequence[int], block_size: int) -> tuple[int, ...]:
    """:func:`sage_llm.tokens.block_hashes`, the same values, for the engine's prompts.

    A copy of its loop in this module, which the accelerator compiles (``sage_llm.tokens``
    itself stays interpreted): a list of ints in ``[0, 2**32)`` on a little-endian host
    is hashed here, anything else by :func:`~sage_llm.tokens.block_hashes` itself.
    """
    if type(token_ids) is not list or block_size <= 0 or sys.byteorder != "little":
        return tokens.block_hashes(token_ids, block_size)
    n = len(token_ids)
    full = n - n % block_size
    if full == 0:
        return ()
    packed = array("I")
    try:
        packed.fromlist(token_ids)
    except (OverflowError, TypeError):
        return tokens.block_hashes(token_ids, block_size)
    raw = packed.tobytes()
    step = 4 * block_size
    crc32, adler32 = zlib.crc32, zlib.adler32
    hashes: list[int] = []
    parent = 0
    for start in range(0, 4 * full, step):
        data = parent.to_bytes(8, "little") + raw[start : start + step]
        parent = crc32(data) | (adler32(data) << 32)
        hashes.append(parent)
    return tuple(hashes)


DEFAULT_MAX_MODEL_LEN = 32768
"""``max_model_len`` of a model that states no context window (``ModelSpec.max_context``)."""


def stats_while_stepping(stats: EngineStats, res: StepResult | None) -> EngineStats:
    """``stats`` (:meth:`SimEngineCore.stats`) as an engine reports them while the step
    ``res`` runs (None: none runs). The core applies a step when it starts (its finished
    requests gone, its tokens counted), but until the step ends its requests still run and
    hold their KV, and its tokens do not exist yet (a prefill leg or a one-token request
    would never be seen running)."""
    if res is None:
        return stats
    return replace(
        stats,
        running=stats.running + len(res.finished),
        kv_usage=min(1.0, stats.kv_usage + res.kv_freed),
        prompt_tokens_total=stats.prompt_tokens_total - res.prompt_tokens_counted,
        generation_tokens_total=stats.generation_tokens_total - res.num_new_tokens,
    )


def _context_of(model: str | ModelSpec) -> int | None:
    """``model``'s context window; None when its spec states none or the name is unknown
    (reported where the model is first needed)."""
    try:
        return resolve_model(model).max_context
    except ConfigError:
        return None


def default_max_model_len(model: str | ModelSpec) -> int:
    """vLLM's default ``max_model_len`` for ``model``: its context window
    (``max_position_embeddings``), or :data:`DEFAULT_MAX_MODEL_LEN` when the spec states
    none or the name is unknown."""
    context = _context_of(model)
    return DEFAULT_MAX_MODEL_LEN if context is None else context


LORA_LAYER_STEP_S = 1.25e-3 / 32
"""What a step whose batch holds an adapter's request takes longer, per layer of the model
(measured on an H200 with Llama-3-8B's 32 layers and rank-16 adapters on every
projection: 1.245 ms a step; docs/benchmarks.md, "GPU steps")."""

LORA_LAYER_TOKEN_S = 1.5e-6 / 32
"""And per token the step computes, per layer (measured as above: 1.50 µs a token)."""


@dataclass(frozen=True, slots=True)
class SimEngineConfig:
    """Settings of one simulated engine instance (vLLM's names where vLLM has one).

    ``model``/``gpu`` are built-in spec names (or specs). ``num_gpu_blocks`` defaults to
    what fits in ``gpu_memory_utilization`` of the TP×PP GPUs' memory after the weights.
    ``kv_link_gbps`` (GB/s) is the PD transfer link. ``speed`` is the time scale of
    everything the engine simulates: its steps, the PD KV transfer and its front end's work
    (2.0 = all of it twice as fast), so a run at speed ``K`` with its times multiplied by
    ``K`` is the run at speed 1. ``step_jitter`` is the relative standard deviation of
    random step-time noise (seeded by ``seed``; 0 = none). ``cost_model`` replaces the
    roofline model.

    LoRA (requests for an adapter only): ``max_loras`` is vLLM's ``--max-loras`` (the
    adapters one batch may hold, and the GPU slots that hold them); ``lora_swap_s`` the
    seconds a step takes longer for each adapter it brings into a slot (vLLM copies it from
    its pinned CPU cache); a step whose batch holds a request for an adapter takes
    ``lora_step_s`` plus ``lora_token_s`` per token it computes longer (the adapters'
    shrink and expand products over the batch), and ``lora_step_overhead`` times its
    length on top (0.1 = 10%; 0 by default). Measured on an H200 with Llama-3-8B's shape
    and rank 16 (docs/benchmarks.md, "GPU steps": 1.245 ms + 1.50 µs per token, swaps
    2.7–3.0 ms); each layer runs its own set of the adapters' products, so by default
    (None) the two are :data:`LORA_LAYER_STEP_S` and :data:`LORA_LAYER_TOKEN_S` times the
    model's layers (1.25 ms and 1.5 µs for its 32). vLLM's CPU build measured about 1.5× a
    step and next to nothing for a swap (docs/benchmarks.md, "LoRA slots").

    ``scheduling_policy`` is vLLM's ``--scheduling-policy``: ``fcfs``, or ``priority``
    (each request's ``priority`` orders the waiting requests and picks who is preempted).
    """

    model: str | ModelSpec = "llama-3-8b"
    gpu: str | GPUSpec = "h100"
    tp: int = 1
    pp: int = 1
    role: ExecutionInstanceType = ExecutionInstanceType.GENERAL
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks: int | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    kv_link_gbps: float = 50.0
    speed: float = 1.0
    seed: int = 0
    cost_model: CostModel | None = None
    max_model_len: int = 0
    kv_pin_timeout_s: float = 480.0
    step_jitter: float = 0.0
    kv_host: str = "127.0.0.1"
    kv_port: int = 5600
    max_loras: int = 1
    lora_swap_s: float = 0.003
    lora_step_s: float | None = None
    lora_token_s: float | None = None
    lora_step_overhead: float = 0.0
    scheduling_policy: str = "fcfs"

    def __post_init__(self) -> None:
        positive_ints = (
            "tp", "pp", "max_num_seqs", "max_num_batched_tokens", "block_size", "max_loras",
        )  # fmt: skip
        for key in positive_ints:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"must be an integer >= 1, got {value!r}", key=key)
        for key in ("max_model_len", "seed"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"must be an integer, got {value!r}", key=key)
        for key in ("enable_prefix_caching", "enable_chunked_prefill"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"must be true or false, got {getattr(self, key)!r}", key=key)
        if self.cost_model is not None and not isinstance(self.cost_model, CostModel):
            raise ConfigError(  # (else an AttributeError on the first request)
                "must be a cost model (with step_time and describe), got "
                f"{type(self.cost_model).__name__}",
                key="cost_model",
            )
        for key in ("kv_port",):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
                raise ConfigError(f"must be a port number (1-65535), got {value!r}", key=key)
        if self.max_model_len < 0:
            raise ConfigError("must be >= 1, or 0 for the model's context", key="max_model_len")
        if self.max_model_len == 0:
            object.__setattr__(self, "max_model_len", default_max_model_len(self.model))
        elif self.max_model_len > (context := _context_of(self.model) or self.max_model_len):
            raise ConfigError(
                f"{self.max_model_len} is above the model's context window ({context} tokens, "
                "its max_position_embeddings), which vLLM refuses; simulate a model with a "
                "longer context (e.g. llama-3.1-8b)",
                key="max_model_len",
            )
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ConfigError(  # as vLLM refuses it: it could not prefill a prompt it takes
                f"{self.max_num_batched_tokens} is smaller than max_model_len "
                f"({self.max_model_len}) with chunked prefill disabled, which would refuse "
                "the longer prompts max_model_len takes: raise it, lower max_model_len, or "
                "enable chunked prefill",
                key="max_num_batched_tokens",
            )
        if self.num_gpu_blocks is not None and self.num_gpu_blocks < 1:
            raise ConfigError("must be >= 1", key="num_gpu_blocks")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError("must be in (0, 1]", key="gpu_memory_utilization")
        for key in ("kv_link_gbps", "speed", "kv_pin_timeout_s"):
            if not 0 < getattr(self, key) < math.inf:  # (NaN fails it too)
                raise ConfigError(
                    f"must be a finite number > 0, got {getattr(self, key)!r}", key=key
                )
        for key in (
            "step_jitter",
            "lora_swap_s",
            "lora_step_s",
            "lora_token_s",
            "lora_step_overhead",
        ):
            if getattr(self, key) is None and key in ("lora_step_s", "lora_token_s"):
                continue  # the measured costs per layer, for the model's layers
            if not 0 <= getattr(self, key) < math.inf:  # inf had made a step last forever
                raise ConfigError(
                    f"must be a finite number >= 0, got {getattr(self, key)!r}", key=key
                )
        if not isinstance(self.role, ExecutionInstanceType):
            raise ConfigError("must be an ExecutionInstanceType", key="role")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ConfigError(
                f"must be one of {', '.join(SCHEDULING_POLICIES)}, got {self.scheduling_policy!r}",
                key="scheduling_policy",
            )
        if self.tp > 1:
            self._check_tp()

    def _check_tp(self) -> None:
        """Refuse a tensor-parallel size vLLM refuses (:func:`tp_problem`)."""
        try:
            model = resolve_model(self.model)
        except ConfigError:
            return  # an unknown model is reported where the model is first needed
        problem = tp_problem(model, self.tp)
        if problem is not None:
            raise ConfigError(problem, key="tp")

    def build_cost_model(self) -> CostModel:
        """The configured cost model, or the roofline model of ``gpu`` × ``model`` × TP/PP."""
        if self.cost_model is not None:
            return self.cost_model
        return RooflineCostModel(
            resolve_gpu(self.gpu), resolve_model(self.model), tp=self.tp, pp=self.pp
        )

    def capacity_blocks(self) -> int:
        """``num_gpu_blocks`` if set, else the KV blocks that fit in GPU memory."""
        if self.num_gpu_blocks is not None:
            return self.num_gpu_blocks
        return kv_capacity_blocks(
            resolve_model(self.model),
            resolve_gpu(self.gpu),
            tp=self.tp,
            pp=self.pp,
            block_size=self.block_size,
            gpu_memory_utilization=self.gpu_memory_utilization,
        )


class BlockPool:
    """Paged KV blocks with prefix caching (vLLM v1's free-block queue).

    Free blocks form one LRU queue: freed blocks with a cached hash join the tail, blocks
    without one the head; allocation takes never-used and uncached blocks first, then
    evicts the least recently freed cached block. A cached block with ref count 0 stays
    reusable by hash until it is evicted. Never-used blocks are not materialised.

    A free block's hash never changes while it is free, so the queue is always its
    uncached blocks (head) followed by its cached ones: it is kept as those two parts, a
    stack of uncached blocks (its top the head of the queue) and a FIFO of cached ones.
    The FIFO is a deque of block ids with lazy removal: a prefix hit leaves its block's
    entry behind, and a block freed again gets a new entry at the tail, so an entry is
    live only when its block is free, cached, and it is that block's last entry (each
    block's count of entries is kept); dead entries are dropped when they reach the head,
    or all at once when they outnumber the live ones. Same order as an ``OrderedDict``,
    in a fraction of its memory (at 1,000 engines the cached blocks number in the tens of
    millions). Block ids are dense (``0 .. num_blocks - 1``, handed out in order the
    first time), so each block's ref count, hash and entry count live in lists indexed
    by block id, grown as blocks are first used (``_ref`` and ``_hash_of`` give them as
    dicts).
    """

    __slots__ = (
        "_by_hash",
        "_fresh",
        "_hashes",
        "_lru",
        "_n_cached",
        "_queued",
        "_refs",
        "_uncached",
        "evictions",
        "num_blocks",
    )

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._fresh = 0
        self._uncached: list[int] = []
        """Free blocks without a hash, the head of the queue last."""
        self._lru: deque[int] = deque()
        """Free blocks with a hash, least recently freed first, with dead entries."""
        self._queued: list[int] = []
        """Each used block's number of entries in ``_lru``, by block id."""
        self._n_cached = 0
        """Free blocks with a hash (the live entries of ``_lru``)."""
        self._refs: list[int] = []
        """Each used block's ref count, by block id."""
        self._hashes: list[int | None] = []
        """Each used block's hash (None: not cached), by block id."""
        self._by_hash: dict[int, int] = {}
        self.evictions = 0

    @property
    def _free(self) -> list[int]:
        """The free-block queue, head first."""
        return [*reversed(self._uncached), *self._live()]

    def _live(self) -> list[int]:
        """The free cached blocks, least recently freed first."""
        refs, hashes = self._refs, self._hashes
        seen: set[int] = set()
        live: list[int] = []
        for b in reversed(self._lru):
            if b not in seen:
                seen.add(b)
                if not refs[b] and hashes[b] is not None:
                    live.append(b)
        live.reverse()
        return live

    def _compact(self) -> None:
        """Drop every dead entry of ``_lru`` (the same live ones, in the same order)."""
        live = self._live()
        lru, queued = self._lru, self._queued
        for b in lru:
            queued[b] = 0
        for b in live:
            queued[b] = 1
        lru.clear()
        lru.extend(live)

    @property
    def _ref(self) -> dict[int, int]:
        """Ref counts of the blocks in use, by block id."""
        return {b: count for b, count in enumerate(self._refs) if count}

    @property
    def _hash_of(self) -> dict[int, int]:
        """Hashes of the cached blocks, by block id."""
        return {b: h for b, h in enumerate(self._hashes) if h is not None}

    @property
    def num_free(self) -> int:
        return self.num_blocks - self._fresh + len(self._uncached) + self._n_cached

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def num_cached(self) -> int:
        return len(self._by_hash)

    def match(self, hashes: Sequence[int]) -> list[int]:
        """Blocks holding the longest cached prefix of ``hashes``."""
        out: list[int] = []
        for h in hashes:
            block = self._by_hash.get(h)
            if block is None:
                break
            out.append(block)
        return out

    def can_allocate(self, n: int, touching: Sequence[int] = ()) -> bool:
        """Whether ``n`` new blocks fit after taking ``touching`` cached blocks."""
        if touching:
            refs = self._refs
            n += sum(1 for b in touching if not refs[b])
        return n <= self.num_free

    def touch(self, blocks: Sequence[int]) -> None:
        """Take a reference to each of ``blocks`` (free ones leave the queue)."""
        refs, hashes = self._refs, self._hashes
        for b in blocks:
            count = refs[b]
            if count == 0:
                if hashes[b] is not None:  # a prefix hit: its queue entry is dead now
                    self._n_cached -= 1
                else:
                    self._uncached.remove(b)
            refs[b] = count + 1

    def _evict(self) -> int:
        """Take the least recently freed cached block (one is free): its hash is dropped."""
        lru, queued, refs = self._lru, self._queued, self._refs
        while True:
            block = lru.popleft()
            left = queued[block] = queued[block] - 1
            if not left and not refs[block]:
                break  # its live entry (a dead one has a later entry, or a user)
        hashes = self._hashes
        evicted = hashes[block]
        assert evicted is not None  # a free block with an entry has a hash
        del self._by_hash[evicted]
        hashes[block] = None
        refs[block] = 1
        self._n_cached -= 1
        self.evictions += 1
        return block

    def allocate(self, n: int) -> list[int]:
        uncached, refs = self._uncached, self._refs
        if uncached and n:  # the uncached free blocks, from the head of the queue
            if n >= len(uncached):
                out = uncached[::-1]
                uncached.clear()
            else:
                out = uncached[: -n - 1 : -1]
                del uncached[-n:]
            n -= len(out)
            for block in out:
                refs[block] = 1
        else:
            out = []
        if n:
            fresh = min(n, self.num_blocks - self._fresh)
            if fresh:
                out.extend(range(self._fresh, self._fresh + fresh))
                self._fresh += fresh
                refs.extend([1] * fresh)
                self._hashes.extend([None] * fresh)
                self._queued.extend([0] * fresh)
                n -= fresh
        if n:
            if n > self._n_cached:
                raise RuntimeError("KV block pool exhausted")
            popleft, queued = self._lru.popleft, self._queued
            by_hash, hashes = self._by_hash, self._hashes
            for _ in range(n):  # then evict the least recently freed cached blocks
                while True:  # self._evict(), inlined
                    block = popleft()
                    left = queued[block] = queued[block] - 1
                    if not left and not refs[block]:
                        break
                evicted = hashes[block]
                assert evicted is not None  # a free block with an entry has a hash
                del by_hash[evicted]
                hashes[block] = None
                refs[block] = 1
                out.append(block)
            self._n_cached -= n
            self.evictions += n
        return out

    def allocate_one(self) -> int:
        """``allocate(1)[0]``, or -1 (nothing done) when no block is free."""
        uncached = self._uncached
        if uncached:
            block = uncached.pop()
            self._refs[block] = 1
        elif self._fresh < self.num_blocks:
            block = self._fresh
            self._fresh = block + 1
            self._refs.append(1)
            self._hashes.append(None)
            self._queued.append(0)
        elif self._n_cached:
            block = self._evict()
        else:
            return -1
        return block

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block; the tail of a sequence is evicted first."""
        refs, hashes, queued = self._refs, self._hashes, self._queued
        uncached = self._uncached
        lru = self._lru
        queue = lru.append
        cached = 0
        for b in reversed(blocks):
            count = refs[b] - 1
            if count < 0:
                raise KeyError(b)
            refs[b] = count
            if count:
                continue
            if hashes[b] is None:
                uncached.append(b)
            else:
                queue(b)
                queued[b] += 1
                cached += 1
        if cached:
            self._n_cached = n_cached = self._n_cached + cached
            if len(lru) > 2 * n_cached + _LRU_SLACK:
                self._compact()

    def cache(self, block: int, block_hash: int) -> None:
        """Register a full block under its chained hash (first writer wins)."""
        hashes = self._hashes
        if block_hash not in self._by_hash and hashes[block] is None:
            self._by_hash[block_hash] = block
            hashes[block] = block_hash

    def cache_blocks(self, blocks: Sequence[int], hashes: Sequence[int], lo: int, hi: int) -> None:
        """:meth:`cache` ``blocks[i]`` under ``hashes[i]`` for ``lo <= i < hi``."""
        by_hash, hash_of = self._by_hash, self._hashes
        for i in range(lo, hi):
            block_hash, block = hashes[i], blocks[i]
            if block_hash not in by_hash and hash_of[block] is None:
                by_hash[block_hash] = block
                hash_of[block] = block_hash


@dataclass(frozen=True, slots=True)
class PinnedKV:
    """KV blocks a finished prefill leg keeps for the decode side to pull."""

    request_id: str
    block_ids: tuple[int, ...]
    num_tokens: int
    expires_at: float


STEP_FIELDS = (
    "duration_s",
    "idle",
    "new_tokens",
    "finished",
    "preempted",
    "admitted",
    "num_prefill_tokens",
    "num_decode_tokens",
    "num_cached_tokens",
    "kv_pinned",
    "kv_pulled",
    "num_new_tokens",
    "first_tokens",
)
""":class:`StepResult`'s public fields, in the order of its constructor's parameters."""


class StepResult:
    """What one step did. Tokens and finishes take effect at ``now + duration_s``.

    ``idle`` steps computed nothing: the core is waiting for a KV transfer or for pinned
    blocks to be released, and ``duration_s`` is the time until that happens on its own
    (a driver may step again earlier when something arrives).

    The seven lists are made when first read or appended to (a step usually fills one
    or two of them, and a cluster simulation makes millions of steps): ``res.finished``
    is always a list, empty or not; :meth:`has_firsts_or_finishes` asks without making
    any.
    """

    __slots__ = (
        "_admitted",
        "_finished",
        "_first_tokens",
        "_kv_pinned",
        "_kv_pulled",
        "_new_tokens",
        "_preempted",
        "duration_s",
        "idle",
        "kv_freed",
        "num_cached_tokens",
        "num_decode_tokens",
        "num_new_tokens",
        "num_prefill_tokens",
        "prompt_tokens_counted",
    )

    def __init__(
        self,
        duration_s: float = 0.0,
        idle: bool = False,
        new_tokens: list[tuple[str, int]] | None = None,
        finished: list[tuple[str, str]] | None = None,
        preempted: list[str] | None = None,
        admitted: list[tuple[str, int]] | None = None,
        num_prefill_tokens: int = 0,
        num_decode_tokens: int = 0,
        num_cached_tokens: int = 0,
        kv_pinned: list[PinnedKV] | None = None,
        kv_pulled: list[tuple[str | None, str]] | None = None,
        num_new_tokens: int = 0,
        first_tokens: list[str] | None = None,
    ) -> None:
        self.duration_s = duration_s
        self.idle = idle
        self._new_tokens = new_tokens
        self._finished = finished
        self._preempted = preempted
        self._admitted = admitted
        self.num_prefill_tokens = num_prefill_tokens
        self.num_decode_tokens = num_decode_tokens
        self.num_cached_tokens = num_cached_tokens
        self._kv_pinned = kv_pinned
        self._kv_pulled = kv_pulled
        self.num_new_tokens = num_new_tokens
        """Tokens produced this step (``len(new_tokens)`` when the step lists them)."""
        self._first_tokens = first_tokens
        self.kv_freed = 0.0
        """The share of the KV cache the requests that finished this step freed."""
        self.prompt_tokens_counted = 0
        """Prompt tokens counted this step (those of the requests whose first token came)."""

    @property
    def new_tokens(self) -> list[tuple[str, int]]:
        """``(request_id, tokens)`` produced this step (empty unless the step lists them)."""
        out = self._new_tokens
        if out is None:
            out = self._new_tokens = []
        return out

    @new_tokens.setter
    def new_tokens(self, value: list[tuple[str, int]]) -> None:
        self._new_tokens = value

    @property
    def finished(self) -> list[tuple[str, str]]:
        """``(request_id, finish_reason)`` of the requests that finished this step."""
        out = self._finished
        if out is None:
            out = self._finished = []
        return out

    @finished.setter
    def finished(self, value: list[tuple[str, str]]) -> None:
        self._finished = value

    @property
    def preempted(self) -> list[str]:
        """Requests preempted this step (their KV blocks freed; recomputed later)."""
        out = self._preempted
        if out is None:
            out = self._preempted = []
        return out

    @preempted.setter
    def preempted(self, value: list[str]) -> None:
        self._preempted = value

    @property
    def admitted(self) -> list[tuple[str, int]]:
        """Requests first scheduled this step, with their prefix-cache hit in tokens."""
        out = self._admitted
        if out is None:
            out = self._admitted = []
        return out

    @admitted.setter
    def admitted(self, value: list[tuple[str, int]]) -> None:
        self._admitted = value

    @property
    def kv_pinned(self) -> list[PinnedKV]:
        """KV blocks finished prefill legs keep for their decode side."""
        out = self._kv_pinned
        if out is None:
            out = self._kv_pinned = []
        return out

    @kv_pinned.setter
    def kv_pinned(self, value: list[PinnedKV]) -> None:
        self._kv_pinned = value

    @property
    def kv_pulled(self) -> list[tuple[str | None, str]]:
        """Decode legs whose KV transfer completed: ``(remote_engine_id, remote_request_id)``."""
        out = self._kv_pulled
        if out is None:
            out = self._kv_pulled = []
        return out

    @kv_pulled.setter
    def kv_pulled(self, value: list[tuple[str | None, str]]) -> None:
        self._kv_pulled = value

    @property
    def first_tokens(self) -> list[str]:
        """Requests whose first output token this step produced, in batch order."""
        out = self._first_tokens
        if out is None:
            out = self._first_tokens = []
        return out

    @first_tokens.setter
    def first_tokens(self, value: list[str]) -> None:
        self._first_tokens = value

    def has_firsts_or_finishes(self) -> bool:
        """``bool(self.first_tokens or self.finished)``, without making either list."""
        return bool(self._first_tokens or self._finished)

    def has_admissions(self) -> bool:
        """``bool(self.admitted)``, without making the list."""
        return bool(self._admitted)

    def has_pulls(self) -> bool:
        """``bool(self.kv_pulled)``, without making the list."""
        return bool(self._kv_pulled)

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in STEP_FIELDS)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StepResult):
            return NotImplemented
        return self._values() == other._values()

    def __repr__(self) -> str:
        inner = ", ".join(f"{name}={getattr(self, name)!r}" for name in STEP_FIELDS)
        return f"StepResult({inner})"


class _Req:
    __slots__ = (
        "arrival",
        "base",
        "blocks",
        "due",
        "event",
        "fin",
        "hashes",
        "id",
        "lazy",
        "lora",
        "made_at",
        "max_tokens",
        "num_cached",
        "num_computed",
        "num_output",
        "num_prompt",
        "prefill_leg",
        "priority",
        "read_cache",
        "ready_at",
        "remote",
        "remote_pending",
        "seen",
        "seq",
        "state",
    )

    def __init__(self, req_id: str, num_prompt: int, max_tokens: int, arrival: float) -> None:
        self.id = req_id
        self.num_prompt = num_prompt
        self.max_tokens = max_tokens
        self.arrival = arrival
        self.hashes: tuple[int, ...] = ()
        self.blocks: list[int] = []
        self.num_computed = 0
        self.num_output = 0
        self.num_cached = 0
        self.state = _WAITING
        self.prefill_leg = False
        self.lora: str | None = None
        """The LoRA adapter it is for (None: the model itself)."""
        self.priority = 0
        """Its priority, lower first (read under the ``priority`` scheduling policy)."""
        self.read_cache = True
        """False: the prompt is computed whole, nothing read from the prefix cache or
        another engine (vLLM's ``skip_reading_prefix_cache``: prompt logprobs asked)."""
        self.remote: tuple[str | None, str] | None = None
        self.remote_pending = False
        self.ready_at = 0.0
        self.seen = False
        self.seq = 0
        """Position in the running batch (requests run in increasing ``seq``)."""
        self.lazy = False
        """A decode advanced implicitly: its counters are as of step ``base``."""
        self.base = 0
        self.due = 0
        """The step at which a lazy decode needs a block or finishes."""
        self.fin = 0
        """The step at which a lazy decode produces its last token."""
        self.event = _EV_EXPLICIT
        """What happens to a lazy decode at step ``due``: it needs a new KV block
        (``_EV_BLOCK``: the step allocates it and the decode stays lazy), it produces its
        last token (``_EV_FINISH``: it finishes after the step without becoming explicit),
        or both (``_EV_EXPLICIT``: it is made explicit for the step)."""
        self.made_at = 0
        """The last step in which this request, explicit, produced a token."""

    @property
    def total(self) -> int:
        return self.num_prompt + self.num_output


class SimEngineCore:
    """One simulated engine instance, stepped explicitly. Deterministic for a given seed.

    **Decode fast path.** A running request in steady decode (one token per step) is not
    walked every step: it is *lazy*, its counters stored as of the step it was last touched
    and advanced implicitly, and it is filed under the step of its next event — the step
    that needs a new KV block or produces its last token. A step then costs the work of the
    requests with an event (and of prefill chunks and admissions), not one unit per running
    request. When the batch could preempt or run out of token budget, every request is made
    explicit and the step runs the plain per-request schedule. The schedule, block
    allocation order, step times, tokens and finishes are exactly those of walking every
    request each step.
    """

    def __init__(self, config: SimEngineConfig | None = None) -> None:
        self.config = config or SimEngineConfig()
        cfg = self.config
        self.model: ModelSpec = resolve_model(cfg.model)
        self.cost_model: CostModel = cfg.build_cost_model()
        self._roofline = roofline_step(self.cost_model)
        # the roofline's is that object's method (not a second one from fast_step_time)
        self._fast_step_time = (
            self._roofline.time if self._roofline is not None else fast_step_time(self.cost_model)
        )
        self._fast_for = self.cost_model
        """The model ``_fast_step_time`` computes (a replaced ``cost_model`` is called)."""
        self._token_budget = cfg.max_num_batched_tokens
        self._jitter = cfg.step_jitter
        layers = self.model.num_layers
        self._lora_step_s = (
            LORA_LAYER_STEP_S * layers if cfg.lora_step_s is None else cfg.lora_step_s
        )
        """What a step whose batch holds an adapter's request takes longer, and per token
        (``_lora_token_s``): by default the measured costs per layer, for the model's."""
        self._lora_token_s = (
            LORA_LAYER_TOKEN_S * layers if cfg.lora_token_s is None else cfg.lora_token_s
        )
        self.num_gpu_blocks = cfg.capacity_blocks()
        self.block_size = cfg.block_size
        self.speed = cfg.speed
        self._pool = BlockPool(self.num_gpu_blocks)
        self._rng = random.Random(cfg.seed)
        self._reqs: dict[str, _Req] = {}
        self._waiting: deque[_Req] = deque()
        self._running: dict[int, _Req] = {}
        """The running batch by ``seq`` (insertion order is batch order)."""
        self._explicit: dict[int, _Req] = {}
        """Running requests that are not lazy (prefilling, or with an event this step)."""
        self._transfers: list[_Req] = []
        self._pinned: dict[str, tuple[_Req, float]] = {}
        self._queries = 0
        self._hits = 0
        self._preemptions = 0
        self._prompt_total = 0
        self._gen_total = 0
        self._seq = 0
        self._tick = 0
        """Non-idle steps run so far."""
        self._due: dict[int, list[_Req]] = {}
        """Lazy decodes by the step of their next event (stale entries are skipped)."""
        self._n_lazy = 0
        self._lazy_ctx = 0
        """Sum of the lazy decodes' context lengths as of step ``_tick``."""
        self._by_priority = cfg.scheduling_policy == "priority"
        self.lora_enabled = False
        """Whether the engine serves LoRA adapters (set by the first request for one, or
        by its owner): only then does it report ``max_lora`` in its stats."""
        self._lora_running: dict[str, int] = {}
        """Running requests by LoRA adapter (only adapters with some)."""
        self._lora_slots: dict[str, None] = {}
        """The adapters in the engine's ``max_loras`` GPU slots, least recently used first."""
        self._lora_swaps = 0
        """Adapters brought into a slot by the step being scheduled."""

    # -- requests ------------------------------------------------------------------

    def add_request(
        self,
        req_id: str,
        prompt_token_ids: Sequence[int],
        max_tokens: int,
        *,
        arrival: float,
        kv_transfer: Mapping[str, Any] | None = None,
        block_hashes: Sequence[int] | None = None,
        read_cache: bool = True,
        lora: str | None = None,
        priority: int = 0,
    ) -> None:
        """Queue a request (for the LoRA adapter ``lora``; None: for the model; of
        ``priority``, lower first, which the ``priority`` scheduling policy reads).
        ``kv_transfer`` is vLLM's ``kv_transfer_params`` on PD legs. ``read_cache`` False
        (a request for its prompt's logprobs, on vLLM): its prompt is computed whole,
        reading neither the prefix cache (nor counted in its queries) nor the KV a prefill
        engine holds for it, which stays pinned there until released or
        its lease runs out.

        A request id still held by a finished prefill leg's pinned KV releases that KV first
        (its blocks stay cached), so both legs may run on one engine. ``block_hashes`` are
        the prompt's :func:`sage_llm.tokens.block_hashes` at this engine's block size when
        the caller has them already (not checked).
        """
        cfg = self.config
        if req_id in self._pinned:
            self.release_kv(req_id)
        if req_id in self._reqs:
            raise ConflictError(f"request {req_id!r} is already in the engine")
        if not prompt_token_ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        if max_tokens < 1:
            raise InvalidRequestError("max_tokens must be at least 1", param="max_tokens")
        prefill_leg = bool(kv_transfer and kv_transfer.get("do_remote_decode"))
        if prefill_leg:
            max_tokens = 1
        n = len(prompt_token_ids)
        if math.ceil((n + max_tokens) / self.block_size) > self.num_gpu_blocks:
            raise InvalidRequestError(
                f"{n} prompt + {max_tokens} output tokens exceed the KV cache "
                f"({self.num_gpu_blocks} blocks of {self.block_size})",
                param="max_tokens",
            )
        if not cfg.enable_chunked_prefill and n + max_tokens > cfg.max_num_batched_tokens:
            raise InvalidRequestError(
                f"{n + max_tokens} tokens exceed max_num_batched_tokens "
                f"({cfg.max_num_batched_tokens}) with chunked prefill disabled",
                param="prompt",
            )
        self._expire_pins(arrival)
        req = _Req(req_id, n, max_tokens, arrival)
        req.prefill_leg = prefill_leg
        req.read_cache = read_cache
        if lora is not None:
            req.lora = lora
            self.lora_enabled = True
        req.priority = priority
        if read_cache and kv_transfer and kv_transfer.get("do_remote_prefill"):
            engine = kv_transfer.get("remote_engine_id")
            remote_id = kv_transfer.get("remote_request_id") or req_id
            req.remote = (None if engine is None else str(engine), str(remote_id))
            req.remote_pending = True
        if cfg.enable_prefix_caching:
            if block_hashes is None:
                req.hashes = prompt_block_hashes(prompt_token_ids, self.block_size)
            else:
                req.hashes = tuple(block_hashes)
        self._reqs[req_id] = req
        if self._by_priority:
            self._enqueue(req)
        else:
            self._waiting.append(req)

    def abort(self, req_id: str, *, delivered: int | None = None) -> bool:
        """Drop a request wherever it is and free its KV blocks. False if unknown.
        ``delivered``: the tokens its client was given (a stop ended it there, or the client
        went away); those generated past them are not counted in ``generation_tokens_total``
        (vLLM drops them with the finished or aborted request), nor, when none was given,
        its prompt in ``prompt_tokens_total``."""
        req = self._reqs.pop(req_id, None)
        if req is None:
            return False
        if req.state == _WAITING:
            self._waiting.remove(req)
        elif req.state == _RUNNING:
            self._leave_running(req)  # a lazy decode's counters brought up to date
        elif req.state == _TRANSFER:
            self._transfers.remove(req)
        else:
            del self._pinned[req_id]
        if delivered is not None and req.num_output > delivered:
            self._gen_total -= req.num_output - delivered
            if delivered == 0:  # vLLM counts a prompt with the first token it hands out
                self._prompt_total -= req.num_prompt
        self._pool.free(req.blocks)
        req.blocks = []
        return True

    def prompt_tokens(self, req_id: str) -> int | None:
        """The prompt tokens of request ``req_id`` while it is here; None otherwise."""
        req = self._reqs.get(req_id)
        return None if req is None else req.num_prompt

    def release_kv(self, req_id: str) -> bool:
        """The decode side pulled a prefill leg's KV: unpin its blocks (they stay cached)."""
        if req_id not in self._pinned:
            return False
        return self.abort(req_id)

    def has_work(self) -> bool:
        """True while any request is queued, transferring KV or running."""
        return bool(self._running or self._waiting or self._transfers)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_pinned(self) -> int:
        """Finished prefill legs whose KV is pinned here for their decode side."""
        return len(self._pinned)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting) + len(self._transfers)

    @property
    def kv_usage(self) -> float:
        return self._pool.usage

    def stats(self) -> EngineStats:
        """Live figures in vLLM's terms (token-based prefix-cache counters)."""
        return EngineStats(
            running=self.num_running,
            waiting=self.num_waiting,
            kv_usage=self._pool.usage,
            prefix_cache_queries_total=float(self._queries),
            prefix_cache_hits_total=float(self._hits),
            preemptions_total=float(self._preemptions),
            prompt_tokens_total=float(self._prompt_total),
            generation_tokens_total=float(self._gen_total),
            num_gpu_blocks=self.num_gpu_blocks,
            block_size=self.block_size,
            source="sim",
            counts_tokens=True,
            max_lora=self.config.max_loras if self.lora_enabled else 0,
            lora_adapters=frozenset().union(*self.lora_requests())
            if self.lora_enabled
            else frozenset(),
        )

    # -- lazy decodes ----------------------------------------------------------------

    def _lazify(self, req: _Req) -> None:
        """``req`` (explicit, counters as of step ``_tick``) now decodes implicitly."""
        tick = self._tick
        req.lazy = True
        req.base = tick
        del self._explicit[req.seq]
        self._n_lazy += 1
        computed = req.num_computed
        self._lazy_ctx += computed
        block_at = tick + len(req.blocks) * self.block_size - computed + 1
        fin = req.fin = tick + req.max_tokens - req.num_output
        if block_at < fin:
            req.event = _EV_BLOCK
        else:
            req.event = _EV_FINISH if fin < block_at else _EV_EXPLICIT
            block_at = fin
        req.due = block_at
        bucket = self._due.get(block_at)
        if bucket is None:
            self._due[block_at] = [req]
        else:
            bucket.append(req)

    def _refile(self, grow: list[_Req], step_no: int) -> None:
        """File lazy decodes that just got their next KV block under their next event:
        the next block is due ``block_size`` steps later (counters as of ``base`` are
        unchanged, so ``fin`` is too)."""
        due_map = self._due
        at0 = step_no + self.block_size
        for req in grow:
            at = at0
            fin = req.fin
            if at >= fin:
                req.event = _EV_FINISH if fin < at else _EV_EXPLICIT
                at = fin
            req.due = at
            bucket = due_map.get(at)
            if bucket is None:
                due_map[at] = [req]
            else:
                bucket.append(req)

    def _unlazy(self, req: _Req) -> None:
        """Bring a lazy decode's counters to step ``_tick`` and make it explicit."""
        k = self._tick - req.base
        req.num_computed += k
        req.num_output += k
        req.lazy = False
        self._n_lazy -= 1
        self._lazy_ctx -= req.num_computed
        self._explicit[req.seq] = req

    def _leave_running(self, req: _Req) -> None:
        if req.lazy:
            self._unlazy(req)
        del self._running[req.seq]
        del self._explicit[req.seq]
        if req.lora is not None:
            self._lora_leave(req.lora)

    def _enqueue(self, req: _Req) -> None:
        """Put ``req`` among the waiting requests in ``(priority, arrival, id)`` order
        (the ``priority`` policy's queue, vLLM's heap of requests)."""
        waiting = self._waiting
        key = _priority_key(req)
        i = len(waiting)
        while i > 0 and key < _priority_key(waiting[i - 1]):
            i -= 1
        waiting.insert(i, req)

    # -- LoRA adapters -----------------------------------------------------------------

    def _lora_enter(self, lora: str) -> None:
        """A request for ``lora`` joins the batch: its adapter is brought into a GPU slot
        unless one holds it (counted in :attr:`_lora_swaps`; the least recently used slot
        whose adapter no running request uses gives way)."""
        running = self._lora_running
        n = running.get(lora)
        if n is not None:
            running[lora] = n + 1
            return
        running[lora] = 1
        slots = self._lora_slots
        if lora in slots:
            del slots[lora]  # most recently used
            slots[lora] = None
            return
        if len(slots) >= self.config.max_loras:
            idle = next((name for name in slots if name not in running), None)
            if idle is not None:  # (always: the batch holds fewer than max_loras others)
                del slots[idle]
        slots[lora] = None
        self._lora_swaps += 1

    def _lora_leave(self, lora: str) -> None:
        running = self._lora_running
        n = running[lora] - 1
        if n:
            running[lora] = n
            return
        del running[lora]
        slots = self._lora_slots
        if lora in slots:  # last used now
            del slots[lora]
            slots[lora] = None

    def lora_requests(self) -> tuple[frozenset[str], frozenset[str]]:
        """The LoRA adapters of the running requests and of the waiting ones (those whose
        KV is on its way included), as vLLM's ``vllm:lora_requests_info`` lists them."""
        waiting = {r.lora for r in self._waiting if r.lora is not None}
        waiting.update(r.lora for r in self._transfers if r.lora is not None)
        return frozenset(self._lora_running), frozenset(waiting)

    # -- the step ------------------------------------------------------------------

    def step(self, now: float, *, list_tokens: bool = True) -> StepResult:
        """Schedule and run one batch starting at ``now``; state is updated immediately.

        With ``list_tokens`` False the result leaves ``new_tokens`` empty (each running
        request produces a token per step; listing them costs one entry each) and reports
        only ``num_new_tokens`` and ``first_tokens``.
        """
        res = StepResult()
        if self._pinned:
            self._expire_pins(now)
        if self._transfers:
            self._finish_transfers(now, res)
        step_no = self._tick + 1
        due = self._due.pop(step_no, None)
        grow: list[_Req] = []
        fins: list[_Req] = []
        if due is not None:
            for req in due:
                if req.lazy and req.due == step_no:
                    req.due = 0  # a second entry in this bucket is stale
                    event = req.event
                    if event == _EV_BLOCK:
                        grow.append(req)
                    elif event == _EV_FINISH:
                        fins.append(req)
                    else:
                        self._unlazy(req)
        budget = self._token_budget
        scheduled: list[tuple[_Req, int]] = []
        implicit = self._schedule_fast(budget, scheduled, grow)
        if implicit < 0:
            for req in self._running.values():
                if req.lazy:
                    self._unlazy(req)
            implicit = 0
            fins = []
            budget = self._schedule_running(budget, scheduled, res)
        elif scheduled:
            budget -= implicit + sum(n for _, n in scheduled)
        else:
            budget -= implicit
        if self._waiting and (not res._preempted or not scheduled):
            self._schedule_waiting(now, budget, scheduled, res)
        fast = self._fast_step_time
        prefill_tokens = 0
        if scheduled:
            prefill: list[PrefillChunk] = []
            decode: list[int] = []
            for req, n in scheduled:
                computed = req.num_computed
                if n == 1 and req.num_prompt + req.num_output - computed == 1:
                    decode.append(computed)
                else:
                    prefill.append((n, computed))
                    prefill_tokens += n
            res.num_prefill_tokens += prefill_tokens
            n_decode = implicit + len(decode)
            if fast is not None and self.cost_model is self._fast_for:
                ctx_sum = sum(decode)
                if implicit:
                    ctx_sum += self._lazy_ctx
                roofline = self._roofline
                if roofline is not None:
                    duration = roofline.time(prefill, n_decode, ctx_sum)
                else:
                    duration = fast(prefill, n_decode, ctx_sum)
            else:
                if implicit:
                    decode = self._decode_contexts(implicit, decode, scheduled)
                duration = self.cost_model.step_time(prefill, decode)
        elif implicit:
            n_decode = implicit
            if fast is not None and self.cost_model is self._fast_for:
                roofline = self._roofline
                if roofline is not None:
                    duration = roofline.time((), implicit, self._lazy_ctx)
                else:
                    duration = fast((), implicit, self._lazy_ctx)
            else:
                duration = self.cost_model.step_time([], self._decode_contexts(implicit, [], []))
        else:
            res.idle = True
            res.duration_s = self._idle_wait(now)
            return res
        res.num_decode_tokens = n_decode
        if self._lora_running:  # the batch holds a request for an adapter
            duration = (
                duration * (1.0 + self.config.lora_step_overhead)
                + self._lora_step_s
                + self._lora_token_s * (prefill_tokens + n_decode)
            )
            if self._lora_swaps:
                duration += self._lora_swaps * self.config.lora_swap_s
                self._lora_swaps = 0
        if self._jitter > 0:
            duration *= max(0.05, 1.0 + self._rng.gauss(0.0, self._jitter))
        res.duration_s = duration = duration / self.speed
        if list_tokens:
            batch = [(r, r.lazy) for r in self._running.values()]
        self._tick = step_no
        if implicit:
            self._gen_total += implicit
            self._lazy_ctx += implicit
        if scheduled or fins:
            res.num_new_tokens = implicit + self._commit(now + duration, scheduled, fins, res)
        else:
            res.num_new_tokens = implicit
        if list_tokens:
            res.new_tokens = [(r.id, 1) for r, lazy in batch if lazy or r.made_at == step_no]
        return res

    def _schedule_fast(
        self, budget: int, scheduled: list[tuple[_Req, int]], grow: list[_Req]
    ) -> int:
        """Schedule the running batch when it fits whole: every explicit request gets all
        its remaining tokens, every lazy decode one token, no block allocation fails.
        ``grow`` are lazy decodes that need their next KV block this step: they get it
        and stay lazy. Returns the number of lazy decodes, or -1 (nothing done) when it
        does not fit."""
        explicit = self._explicit
        demand = self._n_lazy
        pool = self._pool
        if not explicit:
            if demand > budget:
                return -1
            if grow:
                if len(grow) == 1:
                    block = pool.allocate_one()
                    if block < 0:
                        return -1
                    grow[0].blocks.append(block)
                else:
                    if len(grow) > pool.num_free:
                        return -1
                    grow.sort(key=_by_seq)
                    for req, block in zip(grow, pool.allocate(len(grow)), strict=True):
                        req.blocks.append(block)
                self._refile(grow, self._tick + 1)
            return demand
        bs = self.block_size
        order = (
            [explicit[k] for k in sorted(explicit)] if len(explicit) > 1 else [*explicit.values()]
        )
        blocks = len(grow)
        work: list[tuple[_Req, int, int]] = []
        for req in order:
            total = req.num_prompt + req.num_output
            rest = total - req.num_computed
            need = -(-total // bs) - len(req.blocks)
            demand += rest
            if need > 0:
                blocks += need
            work.append((req, rest, need))
        if demand > budget or blocks > pool.num_free:
            return -1
        if grow:  # blocks go out in batch order, lazy decodes' among the explicit ones'
            takers = [(req.seq, req, need) for req, _, need in work if need > 0]
            takers.extend((req.seq, req, 1) for req in grow)
            takers.sort(key=_first)
            got = pool.allocate(blocks)
            at = 0
            for _, req, need in takers:
                if need == 1:
                    req.blocks.append(got[at])
                else:
                    req.blocks.extend(got[at : at + need])
                at += need
            scheduled.extend((req, rest) for req, rest, _ in work)
            self._refile(grow, self._tick + 1)
        elif blocks:  # one allocation hands out the same blocks, in the same order, as several
            got = pool.allocate(blocks)
            at = 0
            for req, rest, need in work:
                if need > 0:
                    req.blocks.extend(got[at : at + need])
                    at += need
                scheduled.append((req, rest))
        else:
            scheduled.extend((req, rest) for req, rest, _ in work)
        return self._n_lazy

    def _decode_contexts(
        self, implicit: int, explicit: list[int], scheduled: list[tuple[_Req, int]]
    ) -> list[int]:
        """The step's decode context lengths for the cost model, lazy decodes included.

        The built-in cost models read only their count and sum, which one entry carrying
        the sum (and zeros) gives exactly; any other model gets them in batch order."""
        if type(self.cost_model) in _SUM_ONLY_COST_MODELS:
            return [self._lazy_ctx + sum(explicit), *([0] * (implicit + len(explicit) - 1))]
        ctx = {
            req.seq: req.num_computed
            for req, n in scheduled
            if n == 1 and req.total - req.num_computed == 1
        }
        tick = self._tick
        out: list[int] = []
        for req in self._running.values():
            if req.lazy:
                out.append(req.num_computed + tick - req.base)
            elif req.seq in ctx:
                out.append(ctx[req.seq])
        return out

    def _schedule_running(
        self, budget: int, scheduled: list[tuple[_Req, int]], res: StepResult
    ) -> int:
        """vLLM's running-first schedule, one request at a time, preempting from the tail
        of the batch when blocks run out (every running request is explicit here); under
        the ``priority`` policy, the running request last by ``(priority, arrival, id)``
        (:meth:`_preempt_by_priority`)."""
        running = list(self._running.values())
        pool = self._pool
        bs = self.block_size
        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            n = min(req.total - req.num_computed, budget)
            need = -(-(req.num_computed + n) // bs) - len(req.blocks)
            if need > 0:
                if self._by_priority:
                    i, budget, stopped = self._preempt_by_priority(
                        running, i, need, budget, scheduled, res
                    )
                    if stopped:
                        break
                else:
                    while not pool.can_allocate(need) and running[-1] is not req:
                        self._preempt(running.pop(), res)
                    if not pool.can_allocate(need):
                        self._preempt(running.pop(), res)
                        break
                req.blocks.extend(pool.allocate(need))
            scheduled.append((req, n))
            budget -= n
            i += 1
        return budget

    def _preempt_by_priority(
        self,
        running: list[_Req],
        i: int,
        need: int,
        budget: int,
        scheduled: list[tuple[_Req, int]],
        res: StepResult,
    ) -> tuple[int, int, bool]:
        """Free ``need`` blocks for ``running[i]`` as vLLM's ``priority`` policy does:
        preempt the running request last by ``(priority, arrival, id)`` until they fit,
        one scheduled earlier in this step giving its tokens back. Returns the request's
        new index, the budget, and whether the request itself was preempted (the step
        schedules no more running requests then)."""
        req = running[i]
        pool = self._pool
        while not pool.can_allocate(need):
            victim = max(running, key=_priority_key)
            at = running.index(victim)
            del running[at]
            for k, (done, n) in enumerate(scheduled):
                if done is victim:  # scheduled earlier in this step: its tokens come back
                    del scheduled[k]
                    budget += n
                    break
            self._preempt(victim, res)
            if victim is req:
                return i, budget, True
            if at < i:
                i -= 1
        return i, budget, False

    def _schedule_waiting(
        self, now: float, budget: int, scheduled: list[tuple[_Req, int]], res: StepResult
    ) -> None:
        cfg = self.config
        waiting = self._waiting
        loras = self._lora_running
        passed: list[_Req] = []
        while waiting and budget > 0 and len(self._running) < cfg.max_num_seqs:
            req = waiting[0]
            if req.remote_pending:
                if not self._start_transfer(req, now, res):
                    break
                waiting.popleft()
                continue
            lora = req.lora
            if lora is not None and lora not in loras and len(loras) >= cfg.max_loras:
                passed.append(waiting.popleft())  # vLLM: no slot for its adapter; it
                continue  # keeps its place, and those behind it may go
            hits: list[int] = []
            if not req.blocks and req.hashes and req.read_cache:
                limit = (req.total - 1) // self.block_size
                hits = self._pool.match(req.hashes[:limit])
            computed = req.num_computed + len(hits) * self.block_size
            n = req.total - computed
            if not cfg.enable_chunked_prefill and n > budget:
                break
            n = min(n, budget)
            need = math.ceil((computed + n) / self.block_size) - len(req.blocks) - len(hits)
            if not self._pool.can_allocate(need, hits):
                break
            self._pool.touch(hits)
            req.blocks.extend(hits)
            req.blocks.extend(self._pool.allocate(need))
            self._note_admission(req, len(hits) * self.block_size, res)
            req.num_computed = computed
            req.state = _RUNNING
            waiting.popleft()
            req.seq = self._seq
            self._seq += 1
            self._running[req.seq] = req
            self._explicit[req.seq] = req
            scheduled.append((req, n))
            budget -= n
            if lora is not None:
                self._lora_enter(lora)
        if passed:
            waiting.extendleft(reversed(passed))

    def _note_admission(self, req: _Req, cached: int, res: StepResult) -> None:
        if self.config.enable_prefix_caching and req.remote is None and req.read_cache:
            self._queries += req.total
            self._hits += cached
        if not req.seen:
            req.seen = True
            if req.remote is None:
                req.num_cached = cached
            res.admitted.append((req.id, req.num_cached))
            res.num_cached_tokens += req.num_cached

    def _start_transfer(self, req: _Req, now: float, res: StepResult) -> bool:
        """Allocate a decode leg's blocks and start pulling its KV over the link."""
        limit = (req.num_prompt - 1) // self.block_size
        hits = self._pool.match(req.hashes[:limit]) if req.hashes else []
        need = math.ceil(req.num_prompt / self.block_size) - len(hits)
        if not self._pool.can_allocate(need, hits):
            return False
        self._pool.touch(hits)
        req.blocks = [*hits, *self._pool.allocate(need)]
        cached = len(hits) * self.block_size
        if self.config.enable_prefix_caching:
            self._queries += req.num_prompt
            self._hits += cached
        req.num_cached = cached
        req.num_computed = cached
        req.state = _TRANSFER
        req.ready_at = now + self.transfer_time_s(req.num_prompt - 1 - cached)
        self._transfers.append(req)
        return True

    def transfer_time_s(self, tokens: int) -> float:
        """Seconds to pull ``tokens`` tokens of KV over the PD link (``kv_link_gbps`` GB/s),
        on the engine's time scale (``speed``, as its steps)."""
        link = self.config.kv_link_gbps * 1e9
        return max(0, tokens) * self.model.kv_bytes_per_token / link / self.speed

    def _finish_transfers(self, now: float, res: StepResult) -> None:
        done = [r for r in self._transfers if r.ready_at <= now]
        if not done:
            return
        self._transfers = [r for r in self._transfers if r.ready_at > now]
        done.sort(key=lambda r: r.ready_at)
        for req in reversed(done):
            req.num_computed = req.num_prompt - 1
            req.remote_pending = False
            req.state = _WAITING
            for i in range(req.num_computed // self.block_size):
                if i < len(req.hashes):
                    self._pool.cache(req.blocks[i], req.hashes[i])
            if self._by_priority:
                self._enqueue(req)
            else:
                self._waiting.appendleft(req)
        for req in done:
            assert req.remote is not None
            res.kv_pulled.append(req.remote)

    def _preempt(self, req: _Req, res: StepResult) -> None:
        self._leave_running(req)
        self._pool.free(req.blocks)
        req.blocks = []
        req.num_computed = 0
        req.state = _WAITING
        if self._by_priority:
            self._enqueue(req)
        else:
            self._waiting.appendleft(req)
        self._preemptions += 1
        res.preempted.append(req.id)

    def _idle_wait(self, now: float) -> float:
        events = [r.ready_at for r in self._transfers]
        if self._waiting:
            events.extend(expiry for _, expiry in self._pinned.values())
        if not events:
            if self.has_work():
                raise RuntimeError("simulated engine stalled with queued requests")
            return 0.0
        return max(0.0, min(events) - now)

    def _expire_pins(self, now: float) -> None:
        if self._pinned:
            for req_id in [k for k, (_, exp) in self._pinned.items() if exp <= now]:
                self.abort(req_id)

    def _commit(
        self, end: float, scheduled: list[tuple[_Req, int]], fins: list[_Req], res: StepResult
    ) -> int:
        """Apply the explicit requests' work; returns the tokens they produced. A request
        that finishes its prefill and keeps decoding becomes lazy. Requests that finish
        (explicit ones, and ``fins``: lazy decodes whose last token this step produced)
        leave the batch last, in batch order."""
        bs = self.block_size
        pool = self._pool
        step_no = self._tick
        produced = 0
        done = fins
        if scheduled:
            done = []
            for req, n in scheduled:
                before = req.num_computed
                computed = req.num_computed = before + n
                prompt = req.num_prompt
                if before < prompt and req.hashes:
                    hi = (computed if computed < prompt else prompt) // bs
                    pool.cache_blocks(req.blocks, req.hashes, before // bs, hi)
                if computed < prompt + req.num_output:
                    continue
                req.num_output += 1
                req.made_at = step_no
                produced += 1
                if req.num_output == 1:
                    self._prompt_total += req.num_prompt
                    res.prompt_tokens_counted += req.num_prompt
                    res.first_tokens.append(req.id)
                if req.num_output >= req.max_tokens:
                    done.append(req)
                else:
                    self._lazify(req)
            self._gen_total += produced
            if fins:
                done.extend(fins)
                done.sort(key=_by_seq)
        elif len(done) > 1:
            done.sort(key=_by_seq)
        if not done:
            return produced
        finished = res.finished
        usage = self._pool.usage
        for req in done:
            finished.append((req.id, "length"))
            self._leave_running(req)
            self._finish(req, end, res)
        res.kv_freed = usage - self._pool.usage
        return produced

    def _finish(self, req: _Req, end: float, res: StepResult) -> None:
        if req.prefill_leg:
            req.state = _PINNED
            expires = end + self.config.kv_pin_timeout_s
            self._pinned[req.id] = (req, expires)
            res.kv_pinned.append(PinnedKV(req.id, tuple(req.blocks), req.num_prompt, expires))
            return
        req.state = -1
        del self._reqs[req.id]
        self._pool.free(req.blocks)
        req.blocks = []
