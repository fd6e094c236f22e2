"""The one owner of KV blocks: which blocks each request holds, prefix sharing, and which
block ids the runner has not been told about yet.

    scheduler ──allocate / free / match──▶ KVCacheManager ──ids──▶ plan ──▶ runner's tables
                                              │
                                              └─ BlockPool (free list, ref counts, hashes)

Every method returns block ids or counts and nothing else; running out of blocks returns
None (a normal outcome the scheduler handles by preempting), misuse raises ValueError.

A request's blocks in token order, and the part of them already reported to the runner:

    blocks   [ 7 | 2 | 9 | 4 ]          take_new(rid) -> (2, [9, 4]): the runner writes
    reported   2 ───┘                   table[row, 2:4] = [9, 4] and nothing else
"""

from __future__ import annotations

from collections import Counter
from typing import NamedTuple

from fusegen.runtime.block_pool import BlockPool
from fusegen.runtime.prefix_cache import extend_hashes, match_prefix


class Admission(NamedTuple):
    """A request's first chunk: tokens [start, start + count) are computed next; ``copies``
    (src, dst) block copies must happen before (copy-on-write of a shared block)."""
    start: int
    count: int
    copies: list[tuple[int, int]]


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 stats: Counter | None = None):
        self.pool = BlockPool(num_blocks, block_size)
        self.enable_prefix_caching = enable_prefix_caching
        self.stats = stats if stats is not None else Counter()
        self._blocks: dict[int, list[int]] = {}
        self._hashes: dict[int, list[int]] = {}       # chained hashes of full blocks
        self._registered: dict[int, int] = {}         # leading blocks offered to the cache
        self._reported: dict[int, int] = {}           # leading blocks the runner knows

    @property
    def block_size(self) -> int:
        return self.pool.block_size

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return self.pool.blocks_for(num_tokens)

    def blocks(self, request_id: int) -> list[int]:
        """The request's blocks in token order (a copy)."""
        return list(self._blocks.get(request_id, ()))

    def holds(self, request_id: int) -> bool:
        return request_id in self._blocks

    # --- allocation ---------------------------------------------------------------------

    def admit(self, request_id: int, tokens: list[int], budget: int) -> Admission | None:
        """Blocks for a request's first chunk of at most ``budget`` tokens: the cached prefix
        it shares plus fresh blocks. None when the pool cannot provide them (nothing taken)."""
        if request_id in self._blocks:
            raise ValueError(f"request {request_id} already holds {len(self._blocks[request_id])} blocks")
        if budget < 1:
            raise ValueError(f"admit needs a budget >= 1 token, got {budget}")
        bs, hit, hashes = self.block_size, [], []
        if self.enable_prefix_caching:
            extend_hashes(hashes, tokens, bs, len(tokens))
            hit = match_prefix(self.pool, hashes)
        while True:
            start = min(len(hit) * bs, len(tokens) - 1)   # compute >= 1 token for logits
            cow = start < len(hit) * bs
            count = min(len(tokens) - start, budget)
            fresh = self.pool.blocks_for(start + count) - len(hit) + cow
            taken = sum(1 for b in hit if self.pool.ref_count(b) == 0)
            if fresh + taken <= self.pool.num_free:
                break
            if not cow:
                return None
            hit = hit[:-1]   # no room for the copy: recompute that block instead
        self.pool.share(hit)
        blocks, copies = list(hit), []
        if cow:
            (dst,) = self.pool.allocate(1)
            copies.append((hit[-1], dst))
            self.pool.free([hit[-1]])
            blocks[-1] = dst
            self.stats["cow_copies"] += 1
        self.stats["prefix_hit_blocks"] += len(hit)
        self.stats["prefix_hit_tokens"] += start
        self._blocks[request_id] = blocks
        self._hashes[request_id] = hashes
        self._registered[request_id] = len(hit) - cow
        self._reported[request_id] = 0
        if self.grow(request_id, start + count) is None:
            raise AssertionError("admit counted its blocks but could not allocate them")
        return Admission(start, count, copies)

    def grow(self, request_id: int, num_tokens: int) -> list[int] | None:
        """Make the request's blocks cover ``num_tokens`` tokens; the new block ids (maybe
        none), or None when the pool has too few free (nothing taken)."""
        blocks = self._held(request_id)
        need = self.pool.blocks_for(num_tokens) - len(blocks)
        if need <= 0:
            return []
        got = self.pool.allocate(need)
        if got is None:
            return None
        blocks.extend(got)
        self.stats["blocks_allocated"] += need
        return got

    def shrink(self, request_id: int, num_tokens: int) -> list[int]:
        """Keep only the blocks covering the first ``num_tokens`` tokens and free the rest (the
        slots of rejected speculative tokens); returns the freed ids. The runner is told the
        ids that replace them, from the first freed column on:

            blocks   [ 7 | 2 | 9 | 4 ]    shrink(rid, 6), block_size 4 -> frees [9, 4]
            after    [ 7 | 2 ]            the next grow's ids go to columns 2, 3, ...

        The freed blocks lie past every committed token, so none is shared or cached."""
        blocks = self._held(request_id)
        keep = self.pool.blocks_for(num_tokens)
        if num_tokens < 0 or keep > len(blocks):
            raise ValueError(f"request {request_id}: cannot shrink {len(blocks)} blocks of "
                             f"{self.block_size} tokens to {num_tokens} tokens")
        if keep < self._registered[request_id]:
            raise ValueError(f"request {request_id}: shrinking to {num_tokens} tokens would free "
                             f"{self._registered[request_id] - keep} blocks offered to the prefix cache")
        freed = blocks[keep:]
        del blocks[keep:]
        self.pool.free(freed[::-1])
        self._reported[request_id] = min(self._reported[request_id], keep)
        self.stats["blocks_rolled_back"] += len(freed)
        return freed

    def free(self, request_id: int) -> None:
        """Give back every block of the request. Tail first: the free list evicts least
        recently freed blocks first, and a prefix's head is the part others likeliest share."""
        blocks = self._blocks.pop(request_id, None)
        if blocks is None:
            raise ValueError(f"request {request_id} holds no blocks ({len(self._blocks)} requests do)")
        self.pool.free(blocks[::-1])
        for table in (self._hashes, self._registered, self._reported):
            table.pop(request_id, None)

    def take_new(self, request_id: int) -> tuple[int, list[int]]:
        """(first column, block ids) the runner has not been told about; marks them told."""
        blocks = self._held(request_id)
        first = self._reported[request_id]
        self._reported[request_id] = len(blocks)
        return first, blocks[first:]

    # --- prefix cache -------------------------------------------------------------------

    def commit(self, request_id: int, tokens: list[int], num_computed: int) -> None:
        """``tokens[:num_computed]`` are in the cache: offer its full blocks to the prefix
        cache (they never change afterwards)."""
        if not self.enable_prefix_caching or request_id not in self._blocks:
            return
        bs, blocks, hashes = self.block_size, self._blocks[request_id], self._hashes[request_id]
        full = min(num_computed // bs, len(blocks))
        extend_hashes(hashes, tokens, bs, full * bs)
        for i in range(self._registered[request_id], full):
            self.pool.cache(blocks[i], hashes[i])
        self._registered[request_id] = max(self._registered[request_id], full)

    def _held(self, request_id: int) -> list[int]:
        blocks = self._blocks.get(request_id)
        if blocks is None:
            raise ValueError(f"request {request_id} holds no blocks ({len(self._blocks)} requests do)")
        return blocks
