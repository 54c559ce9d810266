"""Which instance likely caches which prompt-prefix blocks.

The control plane records, after routing a request, that the chosen instance now holds the
request's prefix blocks (:func:`sage_llm.tokens.prompt_blocks`: each block's hash covers
the prompt up to its end, so equal hashes mean equal prefixes), and forgets blocks the
engine reports evicted or instances that leave. Routers read it through the
:class:`~sage_llm.control_plane.snapshot.PrefixView` protocol (``match``).

The index is bounded: at most ``capacity_blocks`` distinct block hashes, the least recently
inserted or refreshed block (with all its holders) evicted first. ``match`` does not refresh
blocks — routing reads must not change state — only ``insert`` does.

Memory is allocated once, when the index is built, and never reallocated: a fixed pool of
``capacity_blocks`` entries (block hash, bit mask of its holders — each instance holding
blocks gets a bit —, and the links of the LRU list) and an open-addressing hash table of at
least twice as many slots (linear probing, deletion by backward shift: no tombstones, no
rebuilds). A block costs the same however many instances hold it. A dict would rebuild its
table, at up to twice the size, whenever deletions under churn have filled it with dead
slots: steps of megabytes in a long-running gateway's resident memory, long after start-up.
This layout keeps the index's memory flat from its first request. For the default bound of
32,768 blocks: 1.3 MB of arrays and lists when built, plus the block hashes themselves
(integers, 1.2 MB when full). The price is CPU: about 4 µs per new block (match and insert,
with an eviction) and 1 µs per known one, against 1.2 and 0.4–0.7 µs with a dict. A call
whose blocks are all known (a repeated prefix) refreshes them in runs, a run of blocks
already linked in the call's order in one splice: about 0.3 µs a block.
"""

from __future__ import annotations

import heapq
from array import array
from collections.abc import Iterable, Sequence

_FREE = -1


class PrefixIndex:
    """A bounded LRU index of block hashes and the instances holding them.

    ``match`` costs O(number of matched blocks + instances in the result): it walks the
    prompt's blocks in order, intersecting holder masks, and stops at the first block nobody
    in the intersection holds. ``insert`` and ``evict`` cost O(blocks given).
    ``remove_instance`` scans every entry (O(capacity), rare).
    """

    def __init__(self, capacity_blocks: int = 32_768) -> None:
        if isinstance(capacity_blocks, bool) or not isinstance(capacity_blocks, int):
            raise ValueError(f"capacity_blocks must be an integer, got {capacity_blocks!r}")
        if capacity_blocks <= 0:
            raise ValueError(f"capacity_blocks must be positive, got {capacity_blocks}")
        self.capacity_blocks = capacity_blocks
        cap = capacity_blocks
        size = 1 << max(3, (2 * cap - 1).bit_length())  # a power of two >= 2 × capacity
        self._mask = size - 1
        # hash table: slot → entry id (_FREE: empty)
        self._table = array("i", [_FREE]) * size
        # entry pool, indexed by entry id
        self._key: list[int] = [0] * cap  # the block hash
        self._home = array("i", [0]) * cap  # the entry's home slot in the table
        self._held: list[int] = [0] * cap  # bit mask of the slots holding it; 0: entry free
        self._prev = array("i", [_FREE]) * cap  # LRU list, oldest first
        self._next = array("i", [_FREE]) * cap
        self._free = array("i", range(cap - 1, -1, -1))  # free entry ids, a stack
        self._head = _FREE  # least recently inserted or refreshed
        self._tail = _FREE  # most recently
        self._size = 0  # entries in use (distinct blocks)
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
        return self._size

    def __contains__(self, entry: object) -> bool:
        """``(block_hash, instance_id) in index``."""
        if not isinstance(entry, tuple) or len(entry) != 2:
            return False
        h, instance_id = entry
        slot = self._slot_of.get(instance_id) if isinstance(instance_id, str) else None
        if slot is None or not isinstance(h, int):
            return False
        e = self._find(h)
        return e != _FREE and bool(self._held[e] >> slot & 1)

    def insert(self, instance_id: str, block_hashes: Iterable[int]) -> None:
        """Record that ``instance_id`` now caches ``block_hashes`` (refreshing known ones),
        then evict the least recently used blocks beyond the capacity.

        The result is that of recording every block, in order, and then evicting from the
        old end: the blocks not in this call go first, oldest first. (Of a call naming
        more distinct blocks than the capacity only the last ``capacity_blocks`` are
        recorded; the others are evicted at once, and counted in ``evictions``.)"""
        hashes = block_hashes if isinstance(block_hashes, list) else list(block_hashes)
        if not hashes:  # a prompt shorter than one block: nothing to record
            return
        if len(set(hashes)) != len(hashes):  # keep each block at its last position
            hashes = list(dict.fromkeys(reversed(hashes)))[::-1]
        if len(hashes) > self.capacity_blocks:
            cut = len(hashes) - self.capacity_blocks
            for h in hashes[:cut]:  # recorded and evicted at once: those known leave too
                e = self._find(h)
                if e != _FREE:
                    self._drop(self._held[e])
                    self._remove(e)
            self.evictions += cut
            hashes = hashes[cut:]
        slot = self._slot_of.get(instance_id)
        if slot is None:
            slot = self._take_slot(instance_id)
        table, keys, mask = self._table, self._key, self._mask
        found: list[int] = []
        append = found.append
        for h in hashes:  # self._find, inlined (a long prompt has hundreds of blocks)
            i = h & mask
            e = table[i]
            while e != _FREE and keys[e] != h:
                i = (i + 1) & mask
                e = table[i]
            append(e)
        new_blocks = found.count(_FREE)
        if not new_blocks:  # every block known (a repeated prefix): refresh them, in order
            self._refresh(found)
            self._hold(found, slot)
            return
        to_recent = self._to_recent
        moved = new_blocks > len(self._free)
        if moved:
            # evictions ahead: the known blocks of this call go to the recent end first,
            # so that those evictions take only blocks this call does not name
            for e in found:
                if e != _FREE:
                    to_recent(e)
        bit = 1 << slot
        held, counts = self._held, self._counts
        added_new = False  # known blocks after a new one must move behind it
        for h, e in zip(hashes, found, strict=True):
            if e == _FREE:  # a new block, placed at the recent end of the LRU list
                if self._free:
                    e = self._add(h)
                else:
                    e = self._recycle_oldest(h)
                    if self._ids[slot] != instance_id:
                        # that eviction took this instance's last block and freed its slot
                        slot = self._take_slot(instance_id)
                        bit = 1 << slot
                held[e] = bit
                added_new = True
            else:
                if added_new or not moved:
                    to_recent(e)
                if held[e] & bit:
                    continue
                held[e] |= bit
            counts[slot] += 1
            self._entries += 1
        if counts[slot] == 0:
            self._release(slot)

    def match(self, block_hashes: Sequence[int]) -> dict[str, int]:
        """For each instance holding the first block, how many leading blocks of
        ``block_hashes`` it holds without a gap. Instances holding none are absent."""
        result: dict[str, int] = {}
        if not self._size:
            return result
        alive = 0
        depth = 0
        held, table, keys, mask = self._held, self._table, self._key, self._mask
        for h in block_hashes:
            i = h & mask
            e = table[i]
            while e != _FREE and keys[e] != h:
                i = (i + 1) & mask
                e = table[i]
            if e == _FREE:
                break
            narrowed = held[e] if depth == 0 else alive & held[e]
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
        returns how many entries were removed. A block other instances still hold keeps
        its place in the LRU order."""
        slot = self._slot_of.get(instance_id)
        if slot is None:
            return 0
        bit = 1 << slot
        held = self._held
        removed = 0
        for h in block_hashes:
            e = self._find(h)
            if e == _FREE or not held[e] & bit:
                continue
            held[e] &= ~bit
            if not held[e]:
                self._remove(e)
            removed += 1
        self._counts[slot] -= removed
        self._entries -= removed
        if self._counts[slot] == 0:
            self._release(slot)
        return removed

    def remove_instance(self, instance_id: str) -> int:
        """Forget every block of ``instance_id`` (it left, restarted or cleared its cache);
        returns how many entries were removed. Scans every entry."""
        slot = self._slot_of.get(instance_id)
        if slot is None:
            return 0
        bit = 1 << slot
        held = self._held
        removed = 0
        for e in range(self.capacity_blocks):
            if held[e] & bit:
                held[e] &= ~bit
                if not held[e]:
                    self._remove(e)
                removed += 1
        self._entries -= removed
        self._counts[slot] = 0
        self._release(slot)
        return removed

    def blocks_of(self, instance_id: str) -> int:
        """How many blocks ``instance_id`` is recorded as caching."""
        slot = self._slot_of.get(instance_id)
        return 0 if slot is None else self._counts[slot]

    def instances(self) -> list[str]:
        """The instances with at least one recorded block, sorted."""
        return sorted(self._slot_of)

    def clear(self) -> None:
        """Forget everything (the storage is kept)."""
        e = self._head
        while e != _FREE:
            nxt = self._next[e]
            self._remove(e)
            e = nxt
        self._slot_of.clear()
        self._ids.clear()
        self._counts.clear()
        self._free_slots.clear()
        self._entries = 0

    def describe(self) -> dict[str, object]:
        """Size, bound and eviction count, for status pages."""
        return {
            "entries": self._entries,
            "blocks": self._size,
            "capacity_blocks": self.capacity_blocks,
            "instances": len(self._slot_of),
            "evictions": self.evictions,
        }

    # -- the hash table and the LRU list -------------------------------------------------

    def _find(self, h: int) -> int:
        """The entry id of block ``h``, or ``_FREE``."""
        table, keys, mask = self._table, self._key, self._mask
        i = h & mask
        e = table[i]
        while e != _FREE and keys[e] != h:
            i = (i + 1) & mask
            e = table[i]
        return e

    def _add(self, h: int) -> int:
        """Take a free entry for the new block ``h`` (not in the table) and put it in the
        table and at the recent end of the LRU list; its holder mask is the caller's."""
        e = self._free.pop()
        self._put(e, h)
        self._append(e)
        self._size += 1
        return e

    def _recycle_oldest(self, h: int) -> int:
        """Evict the least recently used block and reuse its entry for the new block
        ``h`` (not in the table), at the recent end of the LRU list."""
        e = self._head
        mask = self._held[e]
        if mask & (mask - 1):
            self._drop(mask)
        else:  # one holder, the usual case
            slot = mask.bit_length() - 1
            self._entries -= 1
            self._counts[slot] -= 1
            if self._counts[slot] == 0:
                self._release(slot)
        self._untable(e)
        nxt = self._next
        n = nxt[e]
        if n != _FREE:  # from the old end to the recent end
            prev = self._prev
            self._head = n
            prev[n] = _FREE
            tail = self._tail
            prev[e] = tail
            nxt[tail] = e
            nxt[e] = _FREE
            self._tail = e
        self._put(e, h)
        self.evictions += 1
        return e

    def _put(self, e: int, h: int) -> None:
        """Enter entry ``e`` in the table as block ``h``."""
        table, mask = self._table, self._mask
        i = h & mask
        self._key[e] = h
        self._home[e] = i
        while table[i] != _FREE:
            i = (i + 1) & mask
        table[i] = e

    def _untable(self, e: int) -> None:
        """Take entry ``e`` out of the table by backward shift: later entries of its probe
        run move into the hole when it lies between their home slot and where they sit."""
        table, home, mask = self._table, self._home, self._mask
        i = home[e]
        while table[i] != e:
            i = (i + 1) & mask
        j = i
        while True:
            j = (j + 1) & mask
            f = table[j]
            if f == _FREE:
                break
            if (j - home[f]) & mask >= (j - i) & mask:
                table[i] = f
                i = j
        table[i] = _FREE

    def _remove(self, e: int) -> None:
        """Take entry ``e`` out of the table and the LRU list and free it."""
        self._untable(e)
        self._unlink(e)
        self._held[e] = 0
        self._key[e] = 0
        self._free.append(e)
        self._size -= 1

    def _to_recent(self, e: int) -> None:
        """Move entry ``e`` to the recent end of the LRU list."""
        tail = self._tail
        if e == tail:
            return
        prev, nxt = self._prev, self._next
        p, n = prev[e], nxt[e]
        if p == _FREE:
            self._head = n
        else:
            nxt[p] = n
        prev[n] = p  # n exists: e is not the tail
        prev[e] = tail
        nxt[e] = _FREE
        nxt[tail] = e
        self._tail = e

    def _refresh(self, entries: list[int]) -> None:
        """Move ``entries`` (distinct, all in the list) to the recent end, in this order, as
        :meth:`_to_recent` of each in turn would; a run of them already linked in this
        order (the blocks of a prefix inserted before) moves in one splice."""
        nxt = self._next
        n = len(entries)
        start = 0
        while start < n:
            end = start
            while end + 1 < n and nxt[entries[end]] == entries[end + 1]:
                end += 1
            self._splice_to_recent(entries[start], entries[end])
            start = end + 1

    def _splice_to_recent(self, first: int, last: int) -> None:
        """Move the linked run ``first`` … ``last`` to the recent end of the LRU list."""
        tail = self._tail
        if last == tail:
            return
        prev, nxt = self._prev, self._next
        p, n = prev[first], nxt[last]  # n exists: last is not the tail
        if p == _FREE:
            self._head = n
        else:
            nxt[p] = n
        prev[n] = p
        prev[first] = tail
        nxt[tail] = first
        nxt[last] = _FREE
        self._tail = last

    def _hold(self, entries: list[int], slot: int) -> None:
        """Mark ``entries`` (known blocks) as held by ``slot`` too."""
        bit = 1 << slot
        held = self._held
        added = 0
        for e in entries:
            if not held[e] & bit:
                held[e] |= bit
                added += 1
        self._counts[slot] += added
        self._entries += added
        if self._counts[slot] == 0:
            self._release(slot)

    def _unlink(self, e: int) -> None:
        prev, nxt = self._prev, self._next
        p, n = prev[e], nxt[e]
        if p == _FREE:
            self._head = n
        else:
            nxt[p] = n
        if n == _FREE:
            self._tail = p
        else:
            prev[n] = p

    def _append(self, e: int) -> None:
        tail = self._tail
        self._prev[e] = tail
        self._next[e] = _FREE
        if tail == _FREE:
            self._head = e
        else:
            self._next[tail] = e
        self._tail = e

    # -- instance slots ----------------------------------------------------------------------

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
