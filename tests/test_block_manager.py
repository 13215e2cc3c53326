"""The block manager on its own: refcounts, prefix hashing, the LRU of cached blocks."""

import pytest

from ttsearch.engine.block_manager import BlockManager
from ttsearch.errors import KVCacheFullError


def fill(bm: BlockManager, tokens: list[int]) -> tuple[list[int], list[int]]:
    """Allocate and register blocks for ``tokens`` (full blocks only), like a prefill."""
    blocks, hashes, parent = [], [], None
    for start in range(0, len(tokens), bm.block_size):
        block = bm.allocate()
        blocks.append(block)
        chunk = tuple(tokens[start : start + bm.block_size])
        if len(chunk) == bm.block_size:
            parent = bm.register(block, parent, chunk)
            hashes.append(parent)
    return blocks, hashes


def test_allocate_release_accounting():
    bm = BlockManager(4, 2)
    a, b = bm.allocate(), bm.allocate()
    assert (bm.num_used, bm.num_available) == (2, 2)
    bm.retain(a)
    bm.release(a)
    assert bm.num_used == 2
    bm.release(a)
    bm.release(b)
    assert (bm.num_used, bm.num_cached, bm.num_available) == (0, 0, 4)
    bm.check_invariants()


def test_freed_full_blocks_stay_cached_and_match():
    bm = BlockManager(8, 4)
    tokens = list(range(10))
    blocks, hashes = fill(bm, tokens)
    bm.release_all(blocks)
    assert bm.num_used == 0 and bm.num_cached == 2  # two full blocks; the partial one is plain free
    matched, matched_hashes = bm.match_prefix(tokens)
    assert matched == blocks[:2] and matched_hashes == hashes
    # a different token anywhere in a block breaks the chain from there on
    assert bm.match_prefix([0, 1, 2, 3, 4, 5, 6, 99, 8])[0] == blocks[:1]
    assert bm.match_prefix([9] + tokens[1:])[0] == []
    bm.check_invariants()


def test_lru_evicts_cached_blocks_only_when_needed_and_oldest_first():
    bm = BlockManager(4, 2)
    old, _ = fill(bm, [1, 2])
    new, _ = fill(bm, [3, 4])
    bm.release_all(old)
    bm.release_all(new)
    assert bm.num_cached == 2
    bm.allocate(), bm.allocate()  # the two never-used blocks go first
    assert bm.num_cached == 2
    bm.allocate()  # now the oldest cached block is evicted
    assert bm.match_prefix([1, 2])[0] == [] and bm.match_prefix([3, 4])[0] == new
    bm.check_invariants()


def test_retain_revives_a_cached_block():
    bm = BlockManager(2, 2)
    blocks, _ = fill(bm, [5, 6])
    bm.release_all(blocks)
    bm.retain(blocks[0])
    assert bm.num_cached == 0 and bm.num_used == 1
    bm.check_invariants()


def test_require_raises_and_changes_nothing():
    bm = BlockManager(3, 16)
    bm.allocate()
    with pytest.raises(KVCacheFullError, match=r"needs 3 free blocks, 2 of 3 are free"):
        bm.require(3, "a test")
    assert bm.num_used == 1 and bm.num_available == 2


def test_duplicate_content_keeps_the_first_cache_entry():
    bm = BlockManager(4, 2)
    first, _ = fill(bm, [7, 8])
    second, _ = fill(bm, [7, 8])
    bm.release_all(second)  # unregistered duplicate: plain free, not cached
    assert bm.num_cached == 0
    assert bm.match_prefix([7, 8])[0] == first
    bm.check_invariants()


def test_bad_sizes():
    with pytest.raises(ValueError, match="num_blocks=0"):
        BlockManager(0, 16)
