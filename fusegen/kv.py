"""The contract between the KV passes and the runtime: the cache's geometry, the names of
the paged step graph's inputs, and the fp8 storage of a quantised pool, defined once.

    dense cache  kv_cache  [layers, 2, batch, kv_heads, max_len, head_dim]
    paged pool   kv_pool   [layers, 2, num_blocks, block_size, kv_heads, head_dim]
    fp8 scales   kv_scales [layers, 2, kv_heads] float32          (kv_dtype=fp8 only)

An fp8 pool (``float8_e4m3fn``) stores ``q = e4m3(clamp(x / s, -448, 448))`` with one scale
``s`` per (layer, K|V, KV head); readers compute with ``q * s`` (``quantize_kv`` /
``dequantize_kv``, the reference every kernel is tested against). Values beyond 448 s
saturate at +-448 s instead of becoming NaN (e4m3fn has no infinity).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

FP8 = torch.float8_e4m3fn   # the storage of kv_dtype=fp8 (config.KV_DTYPES; "auto": the model's dtype)
FP8_MAX = 448.0          # e4m3's largest finite value


@dataclass(frozen=True)
class KVGeometry:
    """What the KV cache holds. ``dtype`` is the storage dtype: the model's, or float8_e4m3fn
    for a quantised pool (``quantized``), which then has ``kv_scales`` beside it."""
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

    def with_dtype(self, dtype: torch.dtype) -> "KVGeometry":
        return replace(self, dtype=dtype)

    @property
    def quantized(self) -> bool:
        """Stored as fp8 with per-head scales (``kv_scales``)."""
        return self.dtype == FP8

    @property
    def bytes_per_token(self) -> int:
        """K and V of one token in every layer, in the storage dtype (the scales are per
        head, not per token, and are not counted)."""
        return self.layers * 2 * self.kv_heads * self.head_dim * self.dtype.itemsize

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size

    def pool_shape(self, num_blocks: int) -> tuple[int, ...]:
        return (self.layers, 2, num_blocks, self.block_size, self.kv_heads, self.head_dim)

    def dense_shape(self, batch: int, max_len: int) -> tuple[int, ...]:
        return (self.layers, 2, batch, self.kv_heads, max_len, self.head_dim)

    def scales_shape(self) -> tuple[int, ...]:
        return (self.layers, 2, self.kv_heads)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "KVGeometry":
        return cls(**data)


def quantize_kv(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp8 e4m3 of ``x / scale`` (fp32 arithmetic), saturated at +-FP8_MAX; ``scale``
    broadcasts against ``x`` (one per KV head)."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 ``q * scale``: the values an fp8 pool stands for."""
    return q.float() * scale


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or for an fp8 tensor its bytes as uint8 (same shape and strides): the
    CPU has no index_copy_ / masked_fill for float8 types, copies of bytes are the same."""
    return t.view(torch.uint8) if t.dtype == FP8 else t


# The paged step graph's inputs, in signature order (see passes/insert_paged_blocks.py):
#   input_ids [1, T], position_ids [1, T], kv_pool, slot_mapping [T], block_tables [N, M],
#   seq_lens [N], query_start_loc [N + 1], logits_indices [R]
PAGED_INPUTS = ("input_ids", "position_ids", "kv_pool", "slot_mapping", "block_tables",
                "seq_lens", "query_start_loc", "logits_indices")
