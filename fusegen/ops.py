"""The ``fusegen`` op namespace: the operations passes insert into graphs.

Each op is a ``torch.library`` custom op with a plain-PyTorch reference implementation
(runs on any device, and is the oracle every kernel is tested against) and a fake
implementation so shapes propagate symbolically through the graph.

Shapes use the letters B batch, Hq query heads, Hkv key/value heads (Hq % Hkv == 0),
S query length, L key length, D head dim, T packed tokens, N sequences.

Masking rule shared by every attention op — query ``i`` sits at key position
``p_i = L - S + i`` (queries are the last S positions of the context); key ``j`` is kept when

    (not causal or j <= p_i) and (window == 0 or p_i - j < window) and key_mask[j]

Rows with no key left produce zeros.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _attend(q: Tensor, k: Tensor, v: Tensor, keep: Tensor, scale: float, softcap: float) -> Tensor:
    """q [B,Hq,S,D], k/v [B,Hkv,L,D], keep broadcastable to [B,Hq,S,L] (bool)."""
    group = q.shape[1] // k.shape[1]
    acc = torch.promote_types(q.dtype, torch.float32)
    k = k.repeat_interleave(group, dim=1).to(acc)
    v = v.repeat_interleave(group, dim=1).to(acc)
    scores = torch.matmul(q.to(acc), k.transpose(-1, -2)) * scale
    if softcap > 0.0:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~keep, float("-inf"))
    any_key = keep.any(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~any_key, 0.0), dim=-1) * any_key  # empty rows -> 0
    return torch.matmul(probs, v).to(q.dtype)


def causal_keep(S: int, L: int, causal: bool, window: int, device) -> Tensor:
    """[S, L] bool: which keys each query may see (see the module docstring)."""
    p = torch.arange(L - S, L, device=device)[:, None]
    j = torch.arange(L, device=device)[None, :]
    keep = torch.ones(S, L, dtype=torch.bool, device=device)
    if causal:
        keep &= j <= p
    if window > 0:
        keep &= (p - j) < window
    return keep


def _check_heads(q: Tensor, k: Tensor, v: Tensor, op: str) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"fusegen.{op}: expected q [B,Hq,S,D] and k, v [B,Hkv,L,D], "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[1] % k.shape[1] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"fusegen.{op}: query heads must be a multiple of KV heads and head dims "
                         f"must match: q {tuple(q.shape)}, k {tuple(k.shape)}")


# --- attention over a full sequence (what fuse_attention inserts) -------------------------

@torch.library.custom_op("fusegen::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], scale: float,
              causal: bool, window: int, softcap: float) -> Tensor:
    """Scaled dot-product attention with GQA (k/v NOT expanded), causal / sliding window,
    optional tanh softcap and key padding mask ``key_mask`` [B, L] (nonzero = keep)."""
    _check_heads(q, k, v, "attention")
    if q.shape[2] > k.shape[2]:
        raise ValueError(f"fusegen.attention: {q.shape[2]} queries but only {k.shape[2]} keys")
    keep = causal_keep(q.shape[2], k.shape[2], causal, window, q.device)[None, None]
    if key_mask is not None:
        keep = keep & key_mask.bool()[:, None, None, :]
    return _attend(q, k, v, keep, scale, softcap)


@attention.register_fake
def _(q, k, v, key_mask, scale, causal, window, softcap):
    return torch.empty_like(q)


# --- dense KV cache (what insert_kv_cache inserts) ----------------------------------------
#
# kv_cache: [layers, 2, B, Hkv, Smax, D]. key_mask [B, L] covers the whole context so far;
# the S new tokens occupy positions L-S .. L-1 of every sequence.

@torch.library.custom_op("fusegen::dense_kv_write", mutates_args=("kv_cache",))
def dense_kv_write(kv_cache: Tensor, layer: int, k: Tensor, v: Tensor, key_mask: Tensor) -> None:
    """Write the new keys/values k, v [B,Hkv,S,D] at positions L-S..L-1 of ``layer``."""
    L, S = key_mask.shape[1], k.shape[2]
    if S > L:
        raise ValueError(f"fusegen.dense_kv_write: {S} new tokens but a context of only {L}")
    if L > kv_cache.shape[4]:
        raise ValueError(f"fusegen.dense_kv_write: context length {L} exceeds the cache's "
                         f"{kv_cache.shape[4]} positions")
    kv_cache[layer, 0, :, :, L - S:L] = k
    kv_cache[layer, 1, :, :, L - S:L] = v


@dense_kv_write.register_fake
def _(kv_cache, layer, k, v, key_mask):
    return None


@torch.library.custom_op("fusegen::dense_kv_attention", mutates_args=())
def dense_kv_attention(q: Tensor, kv_cache: Tensor, layer: int, key_mask: Tensor, scale: float,
                       causal: bool, window: int, softcap: float) -> Tensor:
    """Attention of q [B,Hq,S,D] over the first L = key_mask.shape[1] cached positions."""
    L = key_mask.shape[1]
    k = kv_cache[layer, 0, :, :, :L]
    v = kv_cache[layer, 1, :, :, :L]
    return attention(q, k, v, key_mask, scale, causal, window, softcap)


@dense_kv_attention.register_fake
def _(q, kv_cache, layer, key_mask, scale, causal, window, softcap):
    return torch.empty_like(q)


# --- paged KV pool (what insert_paged_blocks inserts) -------------------------------------
#
#   kv_pool [layers, 2, num_blocks, block_size, Hkv, D]
#
#   block_tables [N, max_blocks] int32      seq 0: [ 7 | 2 | 9 ]   -> tokens 0..15 in block 7,
#   seq_lens     [N]             int32                                 16..31 in block 2, ...
#   query_start_loc [N+1]        int32      packed queries of seq n: q[qsl[n]:qsl[n+1]]
#   slot_mapping [T]             int32      token t is written to block slot // bs, row slot % bs
#                                           (-1: not written, e.g. padding)
#
# Sequence n has seq_lens[n] tokens of context, the last qsl[n+1]-qsl[n] of them new.

@torch.library.custom_op("fusegen::paged_kv_write", mutates_args=("kv_pool",))
def paged_kv_write(kv_pool: Tensor, layer: int, k: Tensor, v: Tensor, slot_mapping: Tensor) -> None:
    """Scatter k, v [1,Hkv,T,D] (packed tokens) into their slots of ``layer``."""
    block_size = kv_pool.shape[3]
    k_tok = k.transpose(1, 2).reshape(-1, k.shape[1], k.shape[3])  # [T, Hkv, D]
    v_tok = v.transpose(1, 2).reshape(-1, v.shape[1], v.shape[3])
    if slot_mapping.numel() != k_tok.shape[0]:
        raise ValueError(f"fusegen.paged_kv_write: {k_tok.shape[0]} tokens but slot_mapping has "
                         f"{slot_mapping.numel()} entries")
    slots = slot_mapping.long()
    valid = slots >= 0
    slots, k_tok, v_tok = slots[valid], k_tok[valid], v_tok[valid]
    kv_pool[layer, 0, slots // block_size, slots % block_size] = k_tok.to(kv_pool.dtype)
    kv_pool[layer, 1, slots // block_size, slots % block_size] = v_tok.to(kv_pool.dtype)


@paged_kv_write.register_fake
def _(kv_pool, layer, k, v, slot_mapping):
    return None


def gather_paged(kv_pool: Tensor, layer: int, block_table: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Dense k, v [Hkv, length, D] of one sequence, read through its block table."""
    block_size = kv_pool.shape[3]
    n_blocks = (length + block_size - 1) // block_size
    blocks = block_table[:n_blocks].long()
    k = kv_pool[layer, 0, blocks].reshape(-1, *kv_pool.shape[4:])[:length]
    v = kv_pool[layer, 1, blocks].reshape(-1, *kv_pool.shape[4:])[:length]
    return k.transpose(0, 1), v.transpose(0, 1)


@torch.library.custom_op("fusegen::paged_attention", mutates_args=())
def paged_attention(q: Tensor, kv_pool: Tensor, layer: int, block_tables: Tensor, seq_lens: Tensor,
                    query_start_loc: Tensor, scale: float, causal: bool, window: int,
                    softcap: float) -> Tensor:
    """Attention of packed queries q [1,Hq,T,D] of N sequences over their paged context.
    Covers packed varlen prefill (chunked or not) and batched decode (one query each)."""
    if q.shape[0] != 1:
        raise ValueError(f"fusegen.paged_attention: queries must be packed as [1,Hq,T,D], got {tuple(q.shape)}")
    if q.shape[1] % kv_pool.shape[4] or q.shape[3] != kv_pool.shape[5]:
        raise ValueError(f"fusegen.paged_attention: q {tuple(q.shape)} does not fit the pool's "
                         f"{kv_pool.shape[4]} KV heads of dim {kv_pool.shape[5]}")
    if query_start_loc.numel() != seq_lens.numel() + 1 or int(query_start_loc[-1]) > q.shape[2]:
        raise ValueError(f"fusegen.paged_attention: query_start_loc {query_start_loc.tolist()} must "
                         f"have N+1 = {seq_lens.numel() + 1} entries ending at most at T = {q.shape[2]}")
    out = torch.zeros_like(q)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for n, L in enumerate(lens):
        a, b = starts[n], starts[n + 1]
        if b == a:
            continue
        if b - a > L:
            raise ValueError(f"fusegen.paged_attention: sequence {n} has {b - a} queries but "
                             f"only {L} tokens of context")
        k, v = gather_paged(kv_pool, layer, block_tables[n], L)
        keep = causal_keep(b - a, L, causal, window, q.device)[None, None]
        out[:, :, a:b] = _attend(q[:, :, a:b], k[None].to(q.dtype), v[None].to(q.dtype), keep,
                                 scale, softcap)
    return out


@paged_attention.register_fake
def _(q, kv_pool, layer, block_tables, seq_lens, query_start_loc, scale, causal, window, softcap):
    return torch.empty_like(q)


# --- rotary embeddings ---------------------------------------------------------------------

@torch.library.custom_op("fusegen::rotate_half", mutates_args=())
def rotate_half(x: Tensor) -> Tensor:
    """cat(-x[..., D/2:], x[..., :D/2]): the rotation half of rotary embeddings (RoFormer,
    Su et al. 2021) in the "rotate_half" layout HF models use."""
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


@rotate_half.register_fake
def _(x):
    return torch.empty_like(x)


ATTENTION_OPS = (
    torch.ops.fusegen.attention.default,
    torch.ops.fusegen.dense_kv_attention.default,
    torch.ops.fusegen.paged_attention.default,
)
