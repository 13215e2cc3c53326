"""Block bookkeeping for the paged KV cache: ids and counts only, no tensors.

Invariants:
- a block is *used* while its refcount is > 0; full blocks are immutable and may be shared;
- a full block is registered under a hash of (parent block's hash, its token ids) so a later
  request with the same prefix reuses it; token ids are compared on a hit;
- a block whose refcount drops to 0 is free at once. If it holds a registered full block it
  goes to an LRU of cached blocks and is evicted only when the pool runs out of never-cached
  free blocks.
- every method checks capacity before it changes anything, so a failed call leaves the
  state as it was.
- ``prefix_caching=False`` finds no cached prefix (a server measured without reuse); blocks
  are still shared by forks.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from ttsearch.errors import KVCacheFullError

NO_HASH = None


def block_hash(parent_hash: int | None, tokens: tuple[int, ...]) -> int:
    """Identity of a full block: its tokens and everything before it."""
    return hash((parent_hash, tokens))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.ref_count = [0] * num_blocks
        self._free = deque(range(num_blocks))  # refcount 0, holding nothing reusable
        self._cached = OrderedDict()  # refcount 0, registered full blocks, oldest first
        self._hash_of: list[int | None] = [NO_HASH] * num_blocks
        self._tokens_of: list[tuple[int, ...] | None] = [None] * num_blocks
        self._block_of_hash: dict[int, int] = {}

    # ------------------------------------------------------------------ accounting
    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free) - len(self._cached)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    @property
    def num_available(self) -> int:
        """Blocks an allocation can take now (never-cached first, then evicting cached)."""
        return len(self._free) + len(self._cached)

    def require(self, needed: int, what: str) -> None:
        if needed > self.num_available:
            raise KVCacheFullError(
                f"KV pool full: {what} needs {needed} free blocks, {self.num_available} of "
                f"{self.num_blocks} are free (block_size {self.block_size}); free sequences or "
                f"give the engine a larger kv_cache_bytes"
            )

    # ------------------------------------------------------------------ allocation
    def allocate(self) -> int:
        """A fresh block with refcount 1. Callers check capacity first with ``require``."""
        if self._free:
            block = self._free.popleft()
        elif self._cached:
            block, _ = self._cached.popitem(last=False)
            self._unregister(block)
        else:  # pragma: no cover - guarded by require()
            raise KVCacheFullError("KV pool full")
        self.ref_count[block] = 1
        return block

    def retain(self, block: int, times: int = 1) -> None:
        if self.ref_count[block] == 0:
            self._cached.pop(block)  # a cached block comes back into use
        self.ref_count[block] += times

    def release(self, block: int) -> None:
        self.ref_count[block] -= 1
        assert self.ref_count[block] >= 0, f"block {block} released twice"
        if self.ref_count[block] == 0:
            if self._hash_of[block] is NO_HASH:
                self._free.append(block)
            else:
                self._cached[block] = None

    def release_all(self, blocks: list[int]) -> None:
        # Release the tail first so that, of a freed prefix chain, the deepest blocks are
        # the oldest in the LRU and get evicted before the shared ancestors.
        for block in reversed(blocks):
            self.release(block)

    # ------------------------------------------------------------------ prefix cache
    def match_prefix(self, token_ids: list[int]) -> tuple[list[int], list[int | None]]:
        """The longest chain of registered full blocks that spells a prefix of ``token_ids``.
        Returns the blocks and the hash of each matched block (no state changes)."""
        blocks, hashes = [], []
        parent = None
        bs = self.block_size
        if not self.prefix_caching:
            return blocks, hashes
        for start in range(0, len(token_ids) - bs + 1, bs):
            tokens = tuple(token_ids[start : start + bs])
            h = block_hash(parent, tokens)
            block = self._block_of_hash.get(h)
            if block is None or self._tokens_of[block] != tokens:
                break
            blocks.append(block)
            hashes.append(h)
            parent = h
        return blocks, hashes

    def register(self, block: int, parent_hash: int | None, tokens: tuple[int, ...]) -> int:
        """Register a block that just became full and return its hash (sequences keep the
        chain of their blocks' hashes). If another block already holds the same content,
        that one stays the cache entry and this block stays unregistered."""
        h = block_hash(parent_hash, tokens)
        if self._hash_of[block] is NO_HASH and h not in self._block_of_hash:
            self._hash_of[block] = h
            self._tokens_of[block] = tokens
            self._block_of_hash[h] = block
        return h

    def _unregister(self, block: int) -> None:
        h = self._hash_of[block]
        if h is not NO_HASH:
            del self._block_of_hash[h]
        self._hash_of[block] = NO_HASH
        self._tokens_of[block] = None

    def check_invariants(self) -> None:
        """Every block is in exactly one of: used, free, cached (used by tests)."""
        free, cached = set(self._free), set(self._cached)
        assert not free & cached
        for b in range(self.num_blocks):
            in_use = self.ref_count[b] > 0
            assert in_use + (b in free) + (b in cached) == 1, f"block {b} is in two states"
            if b in cached:
                assert self._hash_of[b] is not NO_HASH
