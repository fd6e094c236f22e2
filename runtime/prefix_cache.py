"""Finding a sequence's leading full blocks in the pool's prefix cache.

A full block is named by a hash chained with its predecessor's, so equal hashes mean equal
*prefixes*, not just equal blocks:

    tokens   [ 1 2 3 4 | 5 6 7 8 | 9 ]          block_size 4
    hash     h0 = H(None, (1,2,3,4))
             h1 = H(h0,   (5,6,7,8))            the partial block [9] has no hash

    a second prompt [ 1 2 3 4 | 5 6 7 8 | 2 2 ] finds h0 and h1: blocks shared, 8 tokens
    of K/V not recomputed.

H is Python's hash of a tuple of ints: deterministic across processes (no string salting)
and 64-bit, so an accidental collision, which would silently share wrong K/V, needs about
2**32 cached blocks to become likely.
"""

from __future__ import annotations

from fusegen.runtime.block_pool import BlockPool


def block_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    return hash((parent, tokens))


def extend_hashes(hashes: list[int], tokens: list[int], block_size: int, upto: int) -> None:
    """Append the hashes of the full blocks of ``tokens[:upto]`` not hashed yet."""
    for i in range(len(hashes), upto // block_size):
        parent = hashes[-1] if hashes else None
        hashes.append(block_hash(parent, tuple(tokens[i * block_size:(i + 1) * block_size])))


def match_prefix(pool: BlockPool, hashes: list[int]) -> list[int]:
    """The cached blocks of the longest run of leading hashes found (nothing is taken)."""
    blocks = []
    for h in hashes:
        b = pool.cached_block(h)
        if b is None:
            break
        blocks.append(b)
    return blocks
