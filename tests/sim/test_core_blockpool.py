"""The block pool against the reference pool (one OrderedDict queue), operation by operation.

:class:`~sage_llm.sim.core.BlockPool` keeps its free queue as two parts (uncached blocks,
then cached ones); every allocation, free, touch and cache must leave it in the state of
:class:`~tests.sim.reference_core.ReferenceBlockPool`, queue order included.
"""

from __future__ import annotations

import random

import pytest

from sage_llm.sim import core
from sage_llm.sim.core import BlockPool
from tests.sim.reference_core import ReferenceBlockPool


def _state(pool: BlockPool | ReferenceBlockPool) -> tuple[object, ...]:
    return (
        list(pool._free),
        pool._fresh,
        pool._ref,
        pool._hash_of,
        pool._by_hash,
        pool.evictions,
        pool.num_free,
        pool.num_cached(),
    )


@pytest.mark.parametrize("seed", range(20))
def test_block_pool_matches_the_reference_pool(seed: int) -> None:
    _drive(seed)


@pytest.mark.parametrize("seed", range(10))
def test_block_pool_matches_the_reference_pool_compacting_at_every_free(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No slack: the cached FIFO drops its dead entries whenever they outnumber the live ones.
    monkeypatch.setattr(core, "_LRU_SLACK", 0)
    _drive(seed)


def test_dead_fifo_entries_are_skipped_and_dropped() -> None:
    pool = BlockPool(4)
    blocks = pool.allocate(4)
    for n, b in enumerate(blocks):
        pool.cache(b, 100 + n)
    pool.free(blocks)  # all cached: the FIFO is 3, 2, 1, 0 (a sequence's tail first)
    assert pool._free == [3, 2, 1, 0]
    for _ in range(3):  # block 2 hit and freed again: it moves to the tail each time
        pool.touch([2])
        pool.free([2])
    assert pool._free == [3, 1, 0, 2]
    assert len(pool._lru) == 7 and pool.num_free == 4
    assert pool.allocate(3) == [3, 1, 0]  # dead entries of block 2 skipped
    assert pool._free == [2] and pool.evictions == 3
    for _ in range(80):  # many dead entries: dropped at once
        pool.touch([2])
        pool.free([2])
    assert pool._free == [2] and len(pool._lru) <= 2 + core._LRU_SLACK
    assert pool.allocate_one() == 2 and pool.allocate_one() == -1


def _drive(seed: int) -> None:
    rng = random.Random(seed)
    size = rng.choice([4, 16, 64])
    pool, ref = BlockPool(size), ReferenceBlockPool(size)
    held: list[list[int]] = []  # block lists, each holding one reference per block
    for _ in range(600):
        roll = rng.random()
        if roll < 0.3:
            n = rng.choice([0, 1, 1, 2, 3, rng.randrange(0, size + 2)])
            fits = pool.can_allocate(n)
            assert fits == ref.can_allocate(n)
            if n == 1 and rng.random() < 0.5:
                one = pool.allocate_one()
                assert (one >= 0) == fits
                if fits:
                    got = [one]
                    assert got == ref.allocate(1)
                    held.append(got)
            elif fits:
                got = pool.allocate(n)
                assert got == ref.allocate(n)
                held.append(got)
        elif roll < 0.55 and held:
            blocks = held.pop(rng.randrange(len(held)))
            pool.free(blocks)
            ref.free(blocks)
        elif roll < 0.75 and held:  # cache some held blocks (hashes collide now and then)
            blocks = rng.choice(held)
            for b in blocks:
                if rng.random() < 0.7:
                    h = rng.randrange(3 * size)
                    pool.cache(b, h)
                    ref.cache(b, h)
        elif roll < 0.9:  # a prefix hit: match, then take the blocks with new ones
            hashes = [rng.randrange(3 * size) for _ in range(rng.randrange(1, 5))]
            hits = pool.match(hashes)
            assert hits == ref.match(hashes)
            extra = rng.randrange(0, 3)
            fits = pool.can_allocate(extra, hits)
            assert fits == ref.can_allocate(extra, hits)
            if fits:
                pool.touch(hits)
                ref.touch(hits)
                got = pool.allocate(extra)
                assert got == ref.allocate(extra)
                held.append([*hits, *got])
        else:  # touch any free block, cached or not
            free = list(ref._free)
            if free:
                b = rng.choice(free)
                pool.touch([b])
                ref.touch([b])
                held.append([b])
        assert _state(pool) == _state(ref)
    while held:
        blocks = held.pop()
        pool.free(blocks)
        ref.free(blocks)
    assert _state(pool) == _state(ref)
    assert pool.num_free == size


def test_exhausting_the_pool_raises() -> None:
    pool = BlockPool(2)
    pool.allocate(2)
    with pytest.raises(RuntimeError, match="exhausted"):
        pool.allocate(1)
    assert pool.allocate_one() == -1
