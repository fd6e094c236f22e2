"""The contract between the KV passes and the runtime: the cache's geometry and the names of
the paged step graph's inputs, defined once.

    dense cache  kv_cache [layers, 2, batch, kv_heads, max_len, head_dim]
    paged pool   kv_pool  [layers, 2, num_blocks, block_size, kv_heads, head_dim]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch


@dataclass(frozen=True)
class KVGeometry:
    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    query_heads: int
    block_size: int = 0          # 0: dense cache (no blocks)

    def __post_init__(self):
        for name in ("layers", "kv_heads", "head_dim", "query_heads", "block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "block_size" else 1):
                raise ValueError(f"KV geometry: {name} must be a positive integer, got {value!r}")
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"KV geometry: block_size must be a power of two, got {self.block_size}")
        if self.query_heads % self.kv_heads:
            raise ValueError(f"KV geometry: {self.query_heads} query heads are not a multiple of "
                             f"{self.kv_heads} KV heads")
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point:
            raise ValueError(f"KV geometry: dtype must be a floating-point torch dtype, got {self.dtype!r}")

    def with_blocks(self, block_size: int) -> "KVGeometry":
        return replace(self, block_size=block_size)

    @property
    def bytes_per_token(self) -> int:
        """K and V of one token in every layer."""
        return self.layers * 2 * self.kv_heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size()

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size

    def pool_shape(self, num_blocks: int) -> tuple[int, ...]:
        return (self.layers, 2, num_blocks, self.block_size, self.kv_heads, self.head_dim)

    def dense_shape(self, batch: int, max_len: int) -> tuple[int, ...]:
        return (self.layers, 2, batch, self.kv_heads, max_len, self.head_dim)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "KVGeometry":
        return cls(**data)


# The paged step graph's inputs, in signature order (see passes/insert_paged_blocks.py):
#   input_ids [1, T], position_ids [1, T], kv_pool, slot_mapping [T], block_tables [N, M],
#   seq_lens [N], query_start_loc [N + 1], logits_indices [R]
PAGED_INPUTS = ("input_ids", "position_ids", "kv_pool", "slot_mapping", "block_tables",
                "seq_lens", "query_start_loc", "logits_indices")
