"""PrefixIndex: insert / match / evict / remove_instance and the LRU bound."""

from __future__ import annotations

import random
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from sage_llm.control_plane.routing import prefix_index
from sage_llm.control_plane.routing.prefix_index import PrefixIndex
from sage_llm.control_plane.snapshot import PrefixView
from sage_llm.tokens import block_hashes, tokenize


def test_is_a_prefix_view() -> None:
    index: PrefixView = PrefixIndex()
    assert index.match([1, 2, 3]) == {}


def test_match_counts_leading_blocks_per_instance() -> None:
    index = PrefixIndex()
    index.insert("a", [1, 2, 3, 4])
    index.insert("b", [1, 2])
    assert index.match([1, 2, 3, 4, 5]) == {"a": 4, "b": 2}
    assert index.match([1, 2, 9]) == {"a": 2, "b": 2}
    assert index.match([9, 1, 2]) == {}
    assert index.match([]) == {}
    assert len(index) == 6


def test_match_stops_at_a_gap() -> None:
    index = PrefixIndex()
    index.insert("a", [1, 3, 4])  # block 2 missing on a
    index.insert("b", [2])
    assert index.match([1, 2, 3, 4]) == {"a": 1}


def test_match_on_real_block_hashes_of_shared_prompts() -> None:
    system = "You are a helpful assistant. " * 20
    first = block_hashes(tokenize(system + "What is a GPU?"), 16)
    second = block_hashes(tokenize(system + "Explain NVLink to me, please."), 16)
    shared = next(n for n, (x, y) in enumerate(zip(first, second, strict=False)) if x != y)
    assert shared > 0
    index = PrefixIndex()
    index.insert("i0", first)
    assert index.match(second) == {"i0": shared}


def test_insert_is_idempotent() -> None:
    index = PrefixIndex()
    index.insert("a", [1, 2])
    index.insert("a", [1, 2])
    assert len(index) == 2
    assert index.blocks_of("a") == 2


def test_lru_bound_evicts_least_recently_inserted() -> None:
    index = PrefixIndex(capacity_blocks=3)
    index.insert("a", [1, 2, 3])
    index.insert("b", [4])  # 4 blocks: block 1 goes
    assert index.blocks == 3
    assert len(index) == 3
    assert (1, "a") not in index
    assert index.evictions == 1
    assert index.match([2, 3]) == {"a": 2}
    assert index.match([1, 2, 3]) == {}


def test_capacity_counts_blocks_not_holders() -> None:
    index = PrefixIndex(capacity_blocks=2)
    for i in range(10):
        index.insert(f"i{i}", [1, 2])
    assert (index.blocks, len(index), index.evictions) == (2, 20, 0)
    assert index.match([1, 2]) == {f"i{i}": 2 for i in range(10)}
    index.insert("z", [3])  # evicts block 1 with all ten holders
    assert (index.blocks, len(index), index.evictions) == (2, 11, 1)
    assert index.match([1, 2]) == {}
    assert index.blocks_of("i0") == 1


def test_an_instance_whose_blocks_all_left_frees_its_slot() -> None:
    index = PrefixIndex(capacity_blocks=2)
    index.insert("a", [1])
    index.insert("b", [2, 3])  # evicts block 1, a's only block
    assert index.instances() == ["b"]
    index.insert("c", [4])  # reuses a's slot without inheriting anything
    assert index.match([1]) == {}
    assert index.match([4]) == {"c": 1}
    assert (3, "b") in index
    assert (3, "c") not in index


def test_removed_instance_slot_is_reused_cleanly() -> None:
    index = PrefixIndex()
    index.insert("a", [1, 2])
    index.insert("b", [1])
    index.remove_instance("a")
    index.insert("c", [9])
    assert index.match([1, 2]) == {"b": 1}
    assert index.blocks_of("c") == 1
    assert ("x", "a") not in index
    assert "not a pair" not in index


def test_insert_refreshes_recency() -> None:
    index = PrefixIndex(capacity_blocks=3)
    index.insert("a", [1, 2, 3])
    index.insert("a", [1])  # refresh block 1; block 2 is now the oldest
    index.insert("b", [7])
    assert (1, "a") in index
    assert (2, "a") not in index
    assert index.match([1, 2, 3]) == {"a": 1}


def test_refresh_and_new_blocks_in_one_call_keep_the_call_order() -> None:
    index = PrefixIndex(capacity_blocks=5)
    index.insert("a", [1, 2, 3])
    index.insert("a", [1, 9])  # room for 9: no eviction; order now 2, 3, 1, 9
    index.insert("z", [100, 101])  # evicts 2 only
    assert [h for h in (1, 2, 3, 9) if index.match([h])] == [1, 3, 9]
    index.insert("b", [3, 7, 1])  # full: evicts 9, the oldest block not named (not 3)
    assert [h for h in (1, 3, 7, 9, 100, 101) if index.match([h])] == [1, 3, 7, 100, 101]
    index.insert("z", [102, 103])  # evicts 100 and 101
    assert [h for h in (1, 3, 7, 100, 101) if index.match([h])] == [1, 3, 7]
    assert index.match([3]) == {"a": 1, "b": 1}


def test_storage_does_not_grow_under_churn() -> None:
    """The index allocates its storage when built: filling it and then replacing every
    block many times over leaves its memory where the first fill put it."""
    index = PrefixIndex(capacity_blocks=2_048)
    hashes = block_hashes(list(range(16 * 60_000)), 16)
    # counted by the index's own allocations: the process's total also moves with what
    # other threads (left by earlier tests) allocate meanwhile
    own = [tracemalloc.Filter(True, prefix_index.__file__)]

    def held() -> int:
        snapshot = tracemalloc.take_snapshot().filter_traces(own)
        return sum(stat.size for stat in snapshot.statistics("filename"))

    tracemalloc.start()
    try:
        for k in range(0, 2_048, 4):
            index.insert(f"i{k % 3}", hashes[k : k + 4])
        filled = held()
        for k in range(2_048, len(hashes), 4):
            index.insert(f"i{k % 3}", hashes[k : k + 4])
        churned = held()
    finally:
        tracemalloc.stop()
    assert index.blocks == 2_048
    assert index.evictions == len(hashes) - 2_048
    assert churned - filled < 4_096  # bytes: nothing per block inserted


def test_match_does_not_refresh() -> None:
    index = PrefixIndex(capacity_blocks=2)
    index.insert("a", [1])
    index.insert("b", [2])
    index.match([1])
    index.insert("c", [3])
    assert (1, "a") not in index


def test_evict_removes_only_named_blocks() -> None:
    index = PrefixIndex()
    index.insert("a", [1, 2, 3])
    index.insert("b", [1, 2, 3])
    assert index.evict("a", [2, 3, 99]) == 2
    assert index.match([1, 2, 3]) == {"a": 1, "b": 3}
    assert len(index) == 4
    assert index.evict("zzz", [1]) == 0


def test_remove_instance_forgets_all_its_blocks() -> None:
    index = PrefixIndex()
    index.insert("a", [1, 2, 3])
    index.insert("b", [1, 2])
    assert index.remove_instance("a") == 3
    assert len(index) == 2
    assert index.match([1, 2, 3]) == {"b": 2}
    assert index.instances() == ["b"]
    assert index.remove_instance("a") == 0


def test_clear_and_describe() -> None:
    index = PrefixIndex(capacity_blocks=10)
    index.insert("a", [1, 2])
    assert index.describe() == {
        "entries": 2,
        "blocks": 2,
        "capacity_blocks": 10,
        "instances": 1,
        "evictions": 0,
    }
    index.clear()
    assert len(index) == 0
    assert index.match([1]) == {}


def test_clear_forgets_everything_and_the_index_keeps_working() -> None:
    index = PrefixIndex(capacity_blocks=10)
    index.insert("a", [1, 2])
    index.insert("b", [3])
    index.remove_instance("a")  # its slot is free when the index is cleared
    index.clear()
    assert index.instances() == []
    index.insert("c", [1, 2])
    index.insert("d", [1])
    assert index.match([1, 2]) == {"c": 2, "d": 1}
    assert index.instances() == ["c", "d"]


def test_describe_counts_the_instances_holding_blocks() -> None:
    index = PrefixIndex(capacity_blocks=10)
    index.insert("a", [1, 2])
    index.insert("b", [3])
    index.remove_instance("a")
    index.evict("b", [3])
    index.insert("c", [4])
    assert index.describe()["instances"] == len(index.instances()) == 1


@pytest.mark.parametrize("capacity", [0, -5, 1.5, True])
def test_invalid_capacity(capacity: object) -> None:
    with pytest.raises(ValueError, match="capacity_blocks"):
        PrefixIndex(capacity_blocks=capacity)  # type: ignore[arg-type]


_ops = hs.lists(
    hs.tuples(
        hs.sampled_from(["insert", "evict", "remove"]),
        hs.sampled_from(["a", "b", "c"]),
        hs.lists(hs.integers(0, 12), max_size=6),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(ops=_ops, capacity=hs.integers(1, 15), query=hs.lists(hs.integers(0, 12), max_size=8))
def test_matches_a_naive_model_and_stays_bounded(
    ops: list[tuple[str, str, list[int]]], capacity: int, query: list[int]
) -> None:
    index = PrefixIndex(capacity_blocks=capacity)
    model: dict[int, set[str]] = {}  # block → holders, least recently inserted first
    evictions = 0
    for op, iid, hashes in ops:
        if op == "insert":
            index.insert(iid, hashes)
            for h in hashes:
                model[h] = model.pop(h, set()) | {iid}
            while len(model) > capacity:
                del model[next(iter(model))]
                evictions += 1
            assert index.evictions == evictions  # a call longer than the capacity too
        elif op == "evict":
            index.evict(iid, hashes)
            for h in set(hashes) & model.keys():
                model[h].discard(iid)
                if not model[h]:
                    del model[h]
        else:
            index.remove_instance(iid)
            for h in list(model):
                model[h].discard(iid)
                if not model[h]:
                    del model[h]
        assert index.blocks == len(model) <= capacity
        assert len(index) == sum(len(held) for held in model.values())
        holders = {i for held in model.values() for i in held}
        assert index.instances() == sorted(holders)
        for i in "abc":
            assert index.blocks_of(i) == sum(i in held for held in model.values())
    expected: dict[str, int] = {}
    for iid in {i for held in model.values() for i in held}:
        n = 0
        while n < len(query) and iid in model.get(query[n], ()):
            n += 1
        if n:
            expected[iid] = n
    assert index.match(query) == expected
    # the LRU order: fresh blocks push the model's blocks out, least recently used first
    order = list(model)
    room = capacity - len(order)
    for k in range(room + len(order)):
        index.insert("z", [1000 + k])
        gone = max(0, k + 1 - room)
        assert [h for h in order if index.match([h])] == order[gone:]


@pytest.mark.parametrize("seed", range(4))
def test_repeated_prefixes_keep_the_exact_lru_order(seed: int) -> None:
    # prompts sharing long prefixes, as a gateway sees them: known runs move in one splice
    rng = random.Random(seed)
    docs = [[d * 1000 + k for k in range(40)] for d in range(5)]
    capacity = 120
    index = PrefixIndex(capacity_blocks=capacity)
    model: dict[int, set[str]] = {}
    for _ in range(400):
        doc = rng.choice(docs)
        hashes = doc[: rng.randrange(1, 41)]
        if rng.random() < 0.3:  # a suffix of its own after the shared part
            hashes = hashes + [rng.randrange(10**6, 10**7) for _ in range(rng.randrange(1, 4))]
        iid = rng.choice("abc")
        index.insert(iid, hashes)
        for h in hashes:
            model[h] = model.pop(h, set()) | {iid}
        while len(model) > capacity:
            del model[next(iter(model))]
        assert index.blocks == len(model)
        assert len(index) == sum(len(held) for held in model.values())
    order = list(model)  # least recently used first: fresh blocks push them out in order
    room = capacity - len(order)
    for k in range(room + len(order)):
        index.insert("z", [10**8 + k])
        gone = max(0, k + 1 - room)
        assert [h for h in order if index.match([h])] == order[gone:]
