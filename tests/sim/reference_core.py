"""The simulated engine core as it was before the decode fast path: every step walks every
running request token by token. Tests drive it side by side with
:class:`~sage_llm.sim.core.SimEngineCore` and require identical results.
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from typing import Any

from sage_llm.engines.base import EngineStats
from sage_llm.errors import ConflictError, InvalidRequestError
from sage_llm.sim.core import PinnedKV, SimEngineConfig, StepResult
from sage_llm.sim.costmodel import CostModel, PrefillChunk
from sage_llm.sim.specs import ModelSpec, resolve_model
from sage_llm.tokens import block_hashes

_WAITING, _TRANSFER, _RUNNING, _PINNED = range(4)


class ReferenceBlockPool:
    """The block pool as it was before the decode fast path (vLLM v1's free-block queue).

    Free blocks form one LRU queue: freed blocks with a cached hash join the tail, blocks
    without one the head; allocation takes never-used and uncached blocks first, then
    evicts the least recently freed cached block. A cached block with ref count 0 stays
    reusable by hash until it is evicted. Never-used blocks are not materialised.
    """

    __slots__ = ("_by_hash", "_free", "_fresh", "_hash_of", "_ref", "evictions", "num_blocks")

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._fresh = 0
        self._free: OrderedDict[int, None] = OrderedDict()
        self._ref: dict[int, int] = {}
        self._hash_of: dict[int, int] = {}
        self._by_hash: dict[int, int] = {}
        self.evictions = 0

    @property
    def num_free(self) -> int:
        return self.num_blocks - self._fresh + len(self._free)

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
            n += sum(1 for b in touching if b not in self._ref)
        return n <= self.num_free

    def touch(self, blocks: Sequence[int]) -> None:
        for b in blocks:
            count = self._ref.get(b, 0)
            if count == 0:
                del self._free[b]
            self._ref[b] = count + 1

    def allocate(self, n: int) -> list[int]:
        out: list[int] = []
        for _ in range(n):
            head = next(iter(self._free), None)
            if head is not None and head not in self._hash_of:
                del self._free[head]
                block = head
            elif self._fresh < self.num_blocks:
                block = self._fresh
                self._fresh += 1
            elif head is not None:
                del self._free[head]
                block = head
                self._by_hash.pop(self._hash_of.pop(head))
                self.evictions += 1
            else:
                raise RuntimeError("KV block pool exhausted")
            self._ref[block] = 1
            out.append(block)
        return out

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block; the tail of a sequence is evicted first."""
        for b in reversed(blocks):
            count = self._ref[b] - 1
            if count:
                self._ref[b] = count
                continue
            del self._ref[b]
            self._free[b] = None
            if b not in self._hash_of:
                self._free.move_to_end(b, last=False)

    def cache(self, block: int, block_hash: int) -> None:
        """Register a full block under its chained hash (first writer wins)."""
        if block_hash not in self._by_hash and block not in self._hash_of:
            self._by_hash[block_hash] = block
            self._hash_of[block] = block_hash


class _Req:
    __slots__ = (
        "arrival",
        "blocks",
        "hashes",
        "id",
        "max_tokens",
        "num_cached",
        "num_computed",
        "num_output",
        "num_prompt",
        "prefill_leg",
        "ready_at",
        "remote",
        "remote_pending",
        "seen",
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
        self.remote: tuple[str | None, str] | None = None
        self.remote_pending = False
        self.ready_at = 0.0
        self.seen = False

    @property
    def total(self) -> int:
        return self.num_prompt + self.num_output


class ReferenceCore:
    """The per-step engine core as it was before the decode fast path (the oracle)."""

    def __init__(self, config: SimEngineConfig | None = None) -> None:
        self.config = config or SimEngineConfig()
        cfg = self.config
        self.model: ModelSpec = resolve_model(cfg.model)
        self.cost_model: CostModel = cfg.build_cost_model()
        self.num_gpu_blocks = cfg.capacity_blocks()
        self.block_size = cfg.block_size
        self.speed = cfg.speed
        self._pool = ReferenceBlockPool(self.num_gpu_blocks)
        self._rng = random.Random(cfg.seed)
        self._reqs: dict[str, _Req] = {}
        self._waiting: deque[_Req] = deque()
        self._running: list[_Req] = []
        self._transfers: list[_Req] = []
        self._pinned: dict[str, tuple[_Req, float]] = {}
        self._queries = 0
        self._hits = 0
        self._preemptions = 0
        self._prompt_total = 0
        self._gen_total = 0

    # -- requests ------------------------------------------------------------------

    def add_request(
        self,
        req_id: str,
        prompt_token_ids: Sequence[int],
        max_tokens: int,
        *,
        arrival: float,
        kv_transfer: Mapping[str, Any] | None = None,
    ) -> None:
        """Queue a request. ``kv_transfer`` is vLLM's ``kv_transfer_params`` on PD legs.

        A request id still held by a finished prefill leg's pinned KV releases that KV first
        (its blocks stay cached), so both legs may run on one engine.
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
        if kv_transfer and kv_transfer.get("do_remote_prefill"):
            engine = kv_transfer.get("remote_engine_id")
            remote_id = kv_transfer.get("remote_request_id") or req_id
            req.remote = (None if engine is None else str(engine), str(remote_id))
            req.remote_pending = True
        if cfg.enable_prefix_caching:
            req.hashes = block_hashes(prompt_token_ids, self.block_size)
        self._reqs[req_id] = req
        self._waiting.append(req)

    def abort(self, req_id: str) -> bool:
        """Drop a request wherever it is and free its KV blocks. False if unknown."""
        req = self._reqs.pop(req_id, None)
        if req is None:
            return False
        if req.state == _WAITING:
            self._waiting.remove(req)
        elif req.state == _RUNNING:
            self._running.remove(req)
        elif req.state == _TRANSFER:
            self._transfers.remove(req)
        else:
            del self._pinned[req_id]
        self._pool.free(req.blocks)
        req.blocks = []
        return True

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
        )

    # -- the step ------------------------------------------------------------------

    def step(self, now: float) -> StepResult:
        """Schedule and run one batch starting at ``now``; state is updated immediately."""
        res = StepResult()
        self._expire_pins(now)
        self._finish_transfers(now, res)
        budget = self.config.max_num_batched_tokens
        scheduled: list[tuple[_Req, int]] = []
        budget = self._schedule_running(budget, scheduled, res)
        if not res.preempted or not scheduled:
            self._schedule_waiting(now, budget, scheduled, res)
        if not scheduled:
            res.idle = True
            res.duration_s = self._idle_wait(now)
            return res
        prefill: list[PrefillChunk] = []
        decode: list[int] = []
        for req, n in scheduled:
            if n == 1 and req.total - req.num_computed == 1:
                decode.append(req.num_computed)
            else:
                prefill.append((n, req.num_computed))
                res.num_prefill_tokens += n
        res.num_decode_tokens = len(decode)
        duration = self.cost_model.step_time(prefill, decode)
        if self.config.step_jitter > 0:
            duration *= max(0.05, 1.0 + self._rng.gauss(0.0, self.config.step_jitter))
        res.duration_s = duration / self.speed
        self._commit(now + res.duration_s, scheduled, res)
        return res

    def _schedule_running(
        self, budget: int, scheduled: list[tuple[_Req, int]], res: StepResult
    ) -> int:
        running = self._running
        pool = self._pool
        bs = self.block_size
        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            n = min(req.total - req.num_computed, budget)
            need = -(-(req.num_computed + n) // bs) - len(req.blocks)
            if need > 0:
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

    def _schedule_waiting(
        self, now: float, budget: int, scheduled: list[tuple[_Req, int]], res: StepResult
    ) -> None:
        cfg = self.config
        waiting = self._waiting
        while waiting and budget > 0 and len(self._running) < cfg.max_num_seqs:
            req = waiting[0]
            if req.remote_pending:
                if not self._start_transfer(req, now, res):
                    break
                waiting.popleft()
                continue
            hits: list[int] = []
            if not req.blocks and req.hashes:
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
            self._running.append(req)
            scheduled.append((req, n))
            budget -= n

    def _note_admission(self, req: _Req, cached: int, res: StepResult) -> None:
        if self.config.enable_prefix_caching and req.remote is None:
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
        """Seconds to pull ``tokens`` tokens of KV over the PD link (``kv_link_gbps`` GB/s)."""
        return max(0, tokens) * self.model.kv_bytes_per_token / (self.config.kv_link_gbps * 1e9)

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
            self._waiting.appendleft(req)
        for req in done:
            assert req.remote is not None
            res.kv_pulled.append(req.remote)

    def _preempt(self, req: _Req, res: StepResult) -> None:
        self._pool.free(req.blocks)
        req.blocks = []
        req.num_computed = 0
        req.state = _WAITING
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

    def _commit(self, end: float, scheduled: list[tuple[_Req, int]], res: StepResult) -> None:
        bs = self.block_size
        any_finished = False
        for req, n in scheduled:
            before = req.num_computed
            req.num_computed += n
            if req.hashes and before < req.num_prompt:
                for i in range(before // bs, min(req.num_computed, req.num_prompt) // bs):
                    self._pool.cache(req.blocks[i], req.hashes[i])
            if req.num_computed < req.total:
                continue
            req.num_output += 1
            self._gen_total += 1
            if req.num_output == 1:
                self._prompt_total += req.num_prompt
            res.new_tokens.append((req.id, 1))
            if req.num_output >= req.max_tokens:
                any_finished = True
                res.finished.append((req.id, "length"))
                self._finish(req, end, res)
        if any_finished:
            self._running = [r for r in self._running if r.state == _RUNNING]

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
