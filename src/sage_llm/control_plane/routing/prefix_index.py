"""Which instance likely caches which prompt-prefix blocks.

The control plane records, after routing a request, that the chosen instance now holds the
request's prefix blocks (:func:`sage_llm.tokens.block_hashes`: chained hashes, so equal
hashes mean equal prefixes), and forgets blocks the engine reports evicted or instances
that leave. Routers read it through the :class:`~sage_llm.control_plane.snapshot.PrefixView`
protocol (``match``).

The index is bounded: at most ``capacity_blocks`` (block hash, instance) entries, the least
recently inserted or refreshed evicted first. ``match`` does not refresh entries — routing
reads must not change state — only ``insert`` does.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence


class PrefixIndex:
    """A bounded LRU index of (block hash, instance) entries.

    ``match`` costs O(number of matched blocks × instances holding them): it walks the
    prompt's blocks in order, keeps the instances that hold every block so far, and stops
    at the first block nobody in that set holds.
    """

    def __init__(self, capacity_blocks: int = 100_000) -> None:
        if isinstance(capacity_blocks, bool) or not isinstance(capacity_blocks, int):
            raise ValueError(f"capacity_blocks must be an integer, got {capacity_blocks!r}")
        if capacity_blocks <= 0:
            raise ValueError(f"capacity_blocks must be positive, got {capacity_blocks}")
        self.capacity_blocks = capacity_blocks
        self._lru: OrderedDict[tuple[int, str], None] = OrderedDict()
        # block hash → its holder, or a set of holders when there are several: most blocks
        # have one holder, and a 1-element set costs ~200 bytes more than the bare id
        self._holders: dict[int, str | set[str]] = {}
        self._by_instance: dict[str, set[int]] = {}
        self.evictions = 0
        """Entries dropped to stay within ``capacity_blocks`` (not counting ``evict``)."""

    def __len__(self) -> int:
        return len(self._lru)

    def __contains__(self, entry: object) -> bool:
        """``(block_hash, instance_id) in index``."""
        return entry in self._lru

    def insert(self, instance_id: str, block_hashes: Iterable[int]) -> None:
        """Record that ``instance_id`` now caches ``block_hashes`` (refreshing known ones),
        then evict the least recently used entries beyond the capacity."""
        lru = self._lru
        for h in block_hashes:
            key = (h, instance_id)
            if key in lru:
                lru.move_to_end(key)
                continue
            lru[key] = None
            held = self._holders.get(h)
            if held is None:
                self._holders[h] = instance_id
            elif isinstance(held, str):
                self._holders[h] = {held, instance_id}
            else:
                held.add(instance_id)
            self._by_instance.setdefault(instance_id, set()).add(h)
        while len(lru) > self.capacity_blocks:
            (h, iid), _ = lru.popitem(last=False)
            self._forget(h, iid)
            self.evictions += 1

    def match(self, block_hashes: Sequence[int]) -> dict[str, int]:
        """For each instance holding the first block, how many leading blocks of
        ``block_hashes`` it holds without a gap. Instances holding none are absent."""
        result: dict[str, int] = {}
        alive: set[str] | None = None
        for depth, h in enumerate(block_hashes, start=1):
            held = self._holders.get(h)
            if held is None:
                break
            if isinstance(held, str):
                if alive is not None and held not in alive:
                    break
                alive = {held}
            else:
                alive = set(held) if alive is None else alive & held
                if not alive:
                    break
            for iid in alive:
                result[iid] = depth
        return result

    def evict(self, instance_id: str, block_hashes: Iterable[int]) -> int:
        """Forget that ``instance_id`` caches ``block_hashes`` (an engine eviction event);
        returns how many entries were removed."""
        removed = 0
        for h in block_hashes:
            key = (h, instance_id)
            if key in self._lru:
                del self._lru[key]
                self._forget(h, instance_id)
                removed += 1
        return removed

    def remove_instance(self, instance_id: str) -> int:
        """Forget every block of ``instance_id`` (it left, restarted or cleared its cache);
        returns how many entries were removed."""
        hashes = self._by_instance.pop(instance_id, set())
        for h in hashes:
            del self._lru[(h, instance_id)]
            self._drop_holder(h, instance_id)
        return len(hashes)

    def blocks_of(self, instance_id: str) -> int:
        """How many blocks ``instance_id`` is recorded as caching."""
        return len(self._by_instance.get(instance_id, ()))

    def instances(self) -> list[str]:
        """The instances with at least one recorded block, sorted."""
        return sorted(self._by_instance)

    def clear(self) -> None:
        """Forget everything."""
        self._lru.clear()
        self._holders.clear()
        self._by_instance.clear()

    def _drop_holder(self, h: int, instance_id: str) -> None:
        held = self._holders.get(h)
        if held is None:
            return
        if isinstance(held, str):
            if held == instance_id:
                del self._holders[h]
            return
        held.discard(instance_id)
        if len(held) == 1:
            self._holders[h] = next(iter(held))
        elif not held:
            del self._holders[h]

    def _forget(self, h: int, instance_id: str) -> None:
        self._drop_holder(h, instance_id)
        blocks = self._by_instance.get(instance_id)
        if blocks is not None:
            blocks.discard(h)
            if not blocks:
                del self._by_instance[instance_id]

    def describe(self) -> dict[str, object]:
        """Size, bound and eviction count, for status pages."""
        return {
            "entries": len(self._lru),
            "capacity_blocks": self.capacity_blocks,
            "instances": len(self._by_instance),
            "evictions": self.evictions,
        }
