"""The paged KV pool's allocator: fixed-size blocks, a free list, reference counts, and a
prefix cache of full blocks.

    pool tensor [layers, 2, num_blocks, block_size, Hkv, D]
                          ^ block ids handed out here

    ref_count[b] = sequences holding block b

    free list (LRU order, allocate takes from the left, free appends on the right):

        [ 5 | 6 | 9* | 2* | 7 ]        * = cached: its hash still finds it
          ^ next fresh block

A full block whose contents are known can be *cached* under the hash of its tokens (chained
with the previous block's hash, see ``prefix_cache.py``). When its last holder frees it,
a cached block joins the free list like any other but keeps its hash: a later request with
the same prefix takes it back (``share``) until ``allocate`` needs its id for fresh contents,
which evicts it from the cache. Blocks freed longest ago are evicted first.

Running out of blocks is a normal outcome (``allocate`` returns None); misuse (freeing a
block nobody holds, asking for a negative count) raises ValueError with the numbers.
"""

from __future__ import annotations

from collections import OrderedDict


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"BlockPool needs num_blocks >= 1 and block_size >= 1, "
                             f"got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # An ordered set: O(1) removal when a cached block is taken back from the middle.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._refs = [0] * num_blocks
        self._hash_of: dict[int, int] = {}      # block -> hash, cached blocks only
        self._block_of: dict[int, int] = {}     # hash -> block
        self.num_evicted = 0

    @property
    def num_free(self) -> int:
        """Blocks ``allocate`` can hand out, cached ones nobody holds included."""
        return len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._block_of)

    @property
    def num_evictable(self) -> int:
        """Cached blocks nobody holds: free, but still found by their hash."""
        return sum(1 for b in self._hash_of if self._refs[b] == 0)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, count: int) -> list[int] | None:
        """``count`` fresh blocks (ref count 1), or None when fewer are free."""
        if count < 0:
            raise ValueError(f"cannot allocate {count} blocks")
        if count > len(self._free):
            return None
        blocks = [self._free.popitem(last=False)[0] for _ in range(count)]
        for b in blocks:
            self._refs[b] = 1
            if b in self._hash_of:
                del self._block_of[self._hash_of.pop(b)]
                self.num_evicted += 1
        return blocks

    def share(self, blocks: list[int]) -> None:
        """One more holder for each block (prefix sharing). A cached block nobody holds is
        taken back from the free list."""
        for b in blocks:
            if not 0 <= b < self.num_blocks or (self._refs[b] == 0 and b not in self._hash_of):
                raise ValueError(f"cannot share block {b}: not held (pool of {self.num_blocks})")
            if self._refs[b] == 0:
                del self._free[b]
            self._refs[b] += 1

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            if not 0 <= b < self.num_blocks or self._refs[b] == 0:
                raise ValueError(f"cannot free block {b}: not held (pool of {self.num_blocks})")
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free[b] = None

    def ref_count(self, block: int) -> int:
        return self._refs[block]

    # --- prefix cache -------------------------------------------------------------------

    def cache(self, block: int, block_hash: int) -> bool:
        """Make a held, full block findable by ``block_hash``. False (and nothing changes)
        when another block already holds that hash or this block is cached already."""
        if not 0 <= block < self.num_blocks or self._refs[block] == 0:
            raise ValueError(f"cannot cache block {block}: not held (pool of {self.num_blocks})")
        if block_hash in self._block_of or block in self._hash_of:
            return False
        self._block_of[block_hash] = block
        self._hash_of[block] = block_hash
        return True

    def cached_block(self, block_hash: int) -> int | None:
        return self._block_of.get(block_hash)

    def is_cached(self, block: int) -> bool:
        return block in self._hash_of

    def reset_cache(self) -> int:
        """Forget every cached block (e.g. after new weights); returns how many."""
        count = len(self._block_of)
        self._block_of.clear()
        self._hash_of.clear()
        return count
