"""PrefixIndex: insert / match / evict / remove_instance and the LRU bound."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

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
    index = PrefixIndex(capacity_blocks=4)
    index.insert("a", [1, 2, 3])
    index.insert("b", [1, 2])  # 5 entries: (1, a) goes
    assert len(index) == 4
    assert (1, "a") not in index
    assert index.evictions == 1
    assert index.match([1, 2, 3]) == {"b": 2}


def test_insert_refreshes_recency() -> None:
    index = PrefixIndex(capacity_blocks=3)
    index.insert("a", [1, 2, 3])
    index.insert("a", [1])  # refresh block 1; block 2 is now the oldest
    index.insert("b", [7])
    assert (1, "a") in index
    assert (2, "a") not in index
    assert index.match([1, 2, 3]) == {"a": 1}


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
        "capacity_blocks": 10,
        "instances": 1,
        "evictions": 0,
    }
    index.clear()
    assert len(index) == 0
    assert index.match([1]) == {}


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


@settings(max_examples=150, deadline=None)
@given(ops=_ops, capacity=hs.integers(1, 15), query=hs.lists(hs.integers(0, 12), max_size=8))
def test_matches_a_naive_model_and_stays_bounded(
    ops: list[tuple[str, str, list[int]]], capacity: int, query: list[int]
) -> None:
    index = PrefixIndex(capacity_blocks=capacity)
    model: list[tuple[int, str]] = []  # entries, least recently used first
    for op, iid, hashes in ops:
        if op == "insert":
            index.insert(iid, hashes)
            for h in hashes:
                if (h, iid) in model:
                    model.remove((h, iid))
                model.append((h, iid))
            del model[: max(0, len(model) - capacity)]
        elif op == "evict":
            index.evict(iid, hashes)
            model = [e for e in model if not (e[1] == iid and e[0] in hashes)]
        else:
            index.remove_instance(iid)
            model = [e for e in model if e[1] != iid]
        assert len(index) == len(model) <= capacity
    expected: dict[str, int] = {}
    for iid in {e[1] for e in model}:
        n = 0
        while n < len(query) and (query[n], iid) in model:
            n += 1
        if n:
            expected[iid] = n
    assert index.match(query) == expected
