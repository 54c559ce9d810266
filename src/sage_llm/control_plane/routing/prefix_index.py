"""Which instance likely caches which prompt-prefix blocks.

The control plane records, after routing a request, that the chosen instance now holds the
request's prefix blocks (:func:`sage_llm.tokens.block_hashes`: chained hashes, so equal
hashes mean equal prefixes), and forgets blocks the engine reports evicted or instances
that leave. Routers read it through the :class:`~sage_llm.control_plane.snapshot.PrefixView`
protocol (``match``).

The index is bounded: at most ``capacity_blocks`` distinct block hashes, the least recently
inserted or refreshed block (with all its holders) evicted first. ``match`` does not refresh
blocks — routing reads must not change state — only ``insert`` does.

Memory: one ordered-dict entry per block whose value is a bit mask of its holders (each
instance holding blocks gets a bit), so a block costs the same (about 140 bytes on CPython
3.11, the hash included) however many instances hold it; the default bound of 32,768 blocks
(about one H100's whole KV cache for an 8B model) is about 4.6 MB of objects, about 7.5 MB of
RSS once the full index has churned (the dict rebuilds its table at twice the size).
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Iterable, Sequence


class PrefixIndex:
    """A bounded LRU index of block hashes and the instances holding them.

    ``match`` costs O(number of matched blocks + instances in the result): it walks the
    prompt's blocks in order, intersecting holder masks, and stops at the first block nobody
    in the intersection holds. ``remove_instance`` scans every block (O(capacity), rare).
    """

    def __init__(self, capacity_blocks: int = 32_768) -> None:
        if isinstance(capacity_blocks, bool) or not isinstance(capacity_blocks, int):
            raise ValueError(f"capacity_blocks must be an integer, got {capacity_blocks!r}")
        if capacity_blocks <= 0:
            raise ValueError(f"capacity_blocks must be positive, got {capacity_blocks}")
        self.capacity_blocks = capacity_blocks
        # block hash → bit mask of the slots holding it, least recently inserted first
        self._blocks: OrderedDict[int, int] = OrderedDict()
        self._slot_of: dict[str, int] = {}
        self._ids: list[str | None] = []  # slot → instance id (None: free)
        self._counts: list[int] = []  # slot → blocks held
        self._free_slots: list[int] = []  # a heap: the lowest free slot is reused first
        self._entries = 0
        self.evictions = 0
        """Blocks dropped to stay within ``capacity_blocks`` (not counting ``evict``)."""

    def __len__(self) -> int:
        """(block hash, instance) entries: a block held by two instances counts twice."""
        return self._entries

    @property
    def blocks(self) -> int:
        """Distinct block hashes held (the bounded quantity)."""
        return len(self._blocks)

    def __contains__(self, entry: object) -> bool:
        """``(block_hash, instance_id) in index``."""
        if not isinstance(entry, tuple) or len(entry) != 2:
            return False
        h, instance_id = entry
        slot = self._slot_of.get(instance_id) if isinstance(instance_id, str) else None
        if slot is None:
            return False
        return bool(self._blocks.get(h, 0) >> slot & 1)

    def insert(self, instance_id: str, block_hashes: Iterable[int]) -> None:
        """Record that ``instance_id`` now caches ``block_hashes`` (refreshing known ones),
        then evict the least recently used blocks beyond the capacity."""
        slot = self._slot_of.get(instance_id)
        if slot is None:
            slot = self._take_slot(instance_id)
        bit = 1 << slot
        blocks = self._blocks
        added = 0
        for h in block_hashes:
            held = blocks.get(h)
            if held is None:
                blocks[h] = bit
                added += 1
            else:
                if not held & bit:
                    blocks[h] = held | bit
                    added += 1
                blocks.move_to_end(h)
        self._counts[slot] += added
        self._entries += added
        while len(blocks) > self.capacity_blocks:
            _, held = blocks.popitem(last=False)
            self._drop(held)
            self.evictions += 1
        if self._counts[slot] == 0 and self._ids[slot] == instance_id:
            self._release(slot)

    def match(self, block_hashes: Sequence[int]) -> dict[str, int]:
        """For each instance holding the first block, how many leading blocks of
        ``block_hashes`` it holds without a gap. Instances holding none are absent."""
        result: dict[str, int] = {}
        alive = 0
        depth = 0
        blocks = self._blocks
        for h in block_hashes:
            held = blocks.get(h)
            if held is None:
                break
            narrowed = held if depth == 0 else alive & held
            if not narrowed:
                break
            if depth and narrowed != alive:
                self._assign(alive & ~narrowed, depth, result)
            alive = narrowed
            depth += 1
        if depth:
            self._assign(alive, depth, result)
        return result

    def evict(self, instance_id: str, block_hashes: Iterable[int]) -> int:
        """Forget that ``instance_id`` caches ``block_hashes`` (an engine eviction event);
        returns how many entries were removed."""
        slot = self._slot_of.get(instance_id)
        if slot is None:
            return 0
        bit = 1 << slot
        blocks = self._blocks
        removed = 0
        for h in block_hashes:
            held = blocks.get(h)
            if held is None or not held & bit:
                continue
            if held == bit:
                del blocks[h]
            else:
                blocks[h] = held & ~bit  # assigning keeps the block's LRU position
            removed += 1
        self._counts[slot] -= removed
        self._entries -= removed
        if self._counts[slot] == 0:
            self._release(slot)
        return removed

    def remove_instance(self, instance_id: str) -> int:
        """Forget every block of ``instance_id`` (it left, restarted or cleared its cache);
        returns how many entries were removed. Scans every block."""
        slot = self._slot_of.get(instance_id)
        if slot is None:
            return 0
        bit = 1 << slot
        blocks = self._blocks
        held_by = [h for h, held in blocks.items() if held & bit]
        for h in held_by:
            held = blocks[h]
            if held == bit:
                del blocks[h]
            else:
                blocks[h] = held & ~bit
        self._entries -= len(held_by)
        self._counts[slot] = 0
        self._release(slot)
        return len(held_by)

    def blocks_of(self, instance_id: str) -> int:
        """How many blocks ``instance_id`` is recorded as caching."""
        slot = self._slot_of.get(instance_id)
        return 0 if slot is None else self._counts[slot]

    def instances(self) -> list[str]:
        """The instances with at least one recorded block, sorted."""
        return sorted(self._slot_of)

    def clear(self) -> None:
        """Forget everything."""
        self._blocks.clear()
        self._slot_of.clear()
        self._ids.clear()
        self._counts.clear()
        self._free_slots.clear()
        self._entries = 0

    def describe(self) -> dict[str, object]:
        """Size, bound and eviction count, for status pages."""
        return {
            "entries": self._entries,
            "blocks": len(self._blocks),
            "capacity_blocks": self.capacity_blocks,
            "instances": len(self._slot_of),
            "evictions": self.evictions,
        }

    def _take_slot(self, instance_id: str) -> int:
        if self._free_slots:
            slot = heapq.heappop(self._free_slots)
            self._ids[slot] = instance_id
        else:
            slot = len(self._ids)
            self._ids.append(instance_id)
            self._counts.append(0)
        self._slot_of[instance_id] = slot
        return slot

    def _release(self, slot: int) -> None:
        instance_id = self._ids[slot]
        if instance_id is None:
            return
        del self._slot_of[instance_id]
        self._ids[slot] = None
        heapq.heappush(self._free_slots, slot)

    def _drop(self, held: int) -> None:
        """A block held by the slots in ``held`` left the index."""
        while held:
            low = held & -held
            slot = low.bit_length() - 1
            held ^= low
            self._entries -= 1
            self._counts[slot] -= 1
            if self._counts[slot] == 0:
                self._release(slot)

    def _assign(self, mask: int, depth: int, result: dict[str, int]) -> None:
        ids = self._ids
        while mask:
            low = mask & -mask
            mask ^= low
            instance_id = ids[low.bit_length() - 1]
            if instance_id is not None:
                result[instance_id] = depth
