"""FlashAttention-2 prefill kernels: dense ``flash_attention`` and the packed paged prefill
(``launch_paged_prefill``, the T != N path of ``fusegen.codegen.attention.paged_attention``).
The masking rule and the paged layout are described in ``fusegen.codegen.attention``.

    flash_attention        _flash_fwd_kernel, grid (query blocks, B, Hq)
    launch_paged_prefill   _paged_prefill_kernel, grid paged_prefill_grid(T, N, BLOCK_M, Hq)

Both run ``_flash_block`` on one block of query rows; the tiles come from ``config=``
(a PREFILL_CONFIGS name or a dict of the same keys) or ``default_prefill_config``.
"""

from __future__ import annotations

from typing import Union

import torch
import triton
import triton.language as tl
from torch import Tensor

from fusegen.codegen.attention_common import (_TL_DTYPES, _attend_tiles, _check_attention_dtype,
                                              _check_head_dim, _check_same_device, _device_guard,
                                              _dot_precision, _fail, _load_tile, _next_pow2,
                                              _scales, _tile_mask, head_dim_pad)

# Tile configurations for the prefill kernels; a benchmark sweeps them through ``config=``.
PREFILL_CONFIGS = {
    "m128_n64_w8_s3": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
    "m128_n128_w8_s2": dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
    "m128_n32_w4_s4": dict(BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=4),
    "m64_n64_w4_s3": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    "m128_n64_w4_s3": dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
    "m64_n32_w4_s2": dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2),
    "interpret": dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1),
}


@triton.jit
def _flash_block(q_head, o_head, k_head, v_head, table, q_first, q_len, kv_len, m0,
                 stride_qt, stride_qd, stride_ot, stride_od,
                 stride_kb, stride_kr, stride_kd, stride_vb, stride_vr, stride_vd,
                 qk_scale, cap_scale, window,
                 PAGE: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                 SOFTCAP: tl.constexpr, PAGED: tl.constexpr, DTYPE: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """FlashAttention-2 forward (Dao 2023) of query rows m0 .. m0 + BLOCK_M of one sequence
    and one head (rows q_first + i of q_head / o_head, i < q_len; keys of k_head, v_head,
    through ``table`` when PAGED):

        O_i = sum_j softmax_j(s_ij) V_j,   s_ij = scale q_i.k_j (tanh-capped when SOFTCAP),
        over the keys j query i may see; rows without keys are 0.

    Key tiles run in three stretches: masked tiles at the window's start, unmasked tiles that
    every row of the block sees whole, masked tiles at the causal diagonal; tiles outside
    the union of the block's rows' ranges are skipped.
    """
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < q_len
    rows = (q_first + offs_m).to(tl.int64)
    q = _load_tile(q_head + rows[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                   row_ok, d_ok, True, HEAD_DIM < D_PAD).to(DTYPE)

    pos = kv_len - q_len + offs_m
    first_pos = kv_len - q_len + m0
    last_pos = kv_len - q_len + tl.minimum(m0 + BLOCK_M, q_len) - 1
    # keys some row sees: [lo, hi) (lo rounded down to a tile); keys every row sees:
    # [full_lo, full_hi). Every tile starts at a multiple of BLOCK_N.
    lo = tl.where(window > 0, tl.maximum(first_pos - window + 1, 0), 0) // BLOCK_N * BLOCK_N
    full_lo = tl.where(window > 0, tl.maximum(last_pos - window + 1, 0), 0)
    if CAUSAL:
        hi = tl.minimum(last_pos + 1, kv_len)
        full_hi = tl.minimum(first_pos + 1, kv_len)
    else:
        hi = kv_len
        full_hi = kv_len
    mid = lo + tl.cdiv(tl.maximum(full_lo - lo, 0), BLOCK_N) * BLOCK_N
    tail = mid + tl.maximum(full_hi - mid, 0) // BLOCK_N * BLOCK_N

    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    acc, l_i, m_i = _attend_tiles(acc, l_i, m_i, q, pos, k_head, v_head, table, lo, mid, kv_len,
                                  qk_scale, cap_scale, window, stride_kb, stride_kr, stride_kd,
                                  stride_vb, stride_vr, stride_vd, PAGE, BLOCK_N, HEAD_DIM, D_PAD,
                                  CAUSAL, SOFTCAP, PAGED, True, DTYPE, DOT_PRECISION)
    acc, l_i, m_i = _attend_tiles(acc, l_i, m_i, q, pos, k_head, v_head, table, mid, tail, kv_len,
                                  qk_scale, cap_scale, window, stride_kb, stride_kr, stride_kd,
                                  stride_vb, stride_vr, stride_vd, PAGE, BLOCK_N, HEAD_DIM, D_PAD,
                                  CAUSAL, SOFTCAP, PAGED, False, DTYPE, DOT_PRECISION)
    acc, l_i, m_i = _attend_tiles(acc, l_i, m_i, q, pos, k_head, v_head, table, tail, hi, kv_len,
                                  qk_scale, cap_scale, window, stride_kb, stride_kr, stride_kd,
                                  stride_vb, stride_vr, stride_vd, PAGE, BLOCK_N, HEAD_DIM, D_PAD,
                                  CAUSAL, SOFTCAP, PAGED, True, DTYPE, DOT_PRECISION)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_ptrs = o_head + rows[:, None] * stride_ot + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(o_head.dtype.element_ty), mask=_tile_mask(row_ok, d_ok, HEAD_DIM < D_PAD))


@triton.jit
def _flash_fwd_kernel(Q, K, V, Out,
                      stride_qz, stride_qh, stride_qt, stride_qd,
                      stride_kz, stride_kh, stride_kt, stride_kd,
                      stride_vz, stride_vh, stride_vt, stride_vd,
                      stride_oz, stride_oh, stride_ot, stride_od,
                      q_len, kv_len, qk_scale, cap_scale, window,
                      GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                      SOFTCAP: tl.constexpr, DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Dense attention, one program per (query block, batch z, query head h): ``_flash_block``
    over batch z's q_len queries and kv_len keys; query head h reads KV head h // GROUP (GQA
    without expanding K/V). Query blocks run last first: their causal rows are the longest.
    """
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16, "tl.dot needs tiles of at least 16")
    tl.static_assert(D_PAD >= 16 and (D_PAD & (D_PAD - 1)) == 0 and D_PAD >= HEAD_DIM,
                     "D_PAD must be a power of two >= 16 covering HEAD_DIM")
    block_m = tl.num_programs(0) - 1 - tl.program_id(0)
    z = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2).to(tl.int64)
    kvh = h // GROUP
    _flash_block(Q + z * stride_qz + h * stride_qh, Out + z * stride_oz + h * stride_oh,
                 K + z * stride_kz + kvh * stride_kh, V + z * stride_vz + kvh * stride_vh,
                 K, 0, q_len, kv_len, block_m * BLOCK_M,  # K: no block table in this layout
                 stride_qt, stride_qd, stride_ot, stride_od,
                 0, stride_kt, stride_kd, 0, stride_vt, stride_vd,
                 qk_scale, cap_scale, window, 1, HEAD_DIM, D_PAD, BLOCK_M, BLOCK_N, CAUSAL,
                 SOFTCAP, False, DTYPE, DOT_PRECISION)


@triton.jit
def _find_query_block(QueryStartLoc, num_seqs, tile, BLOCK_M: tl.constexpr,
                      SEQS_PAD: tl.constexpr):
    """(n, block_m, num_tiles) for packed tile ``tile``: sequence n owns
    c_n = cdiv(qsl[n+1] - qsl[n], BLOCK_M) tiles, laid end to end in sequence order
    (C_n = c_0 + ... + c_n, by tl.cumsum), so tile belongs to the n with C_{n-1} <= tile < C_n
    and is its query block block_m = c_n - 1 - (tile - C_{n-1}) (later blocks first: their
    causal rows are the longest). num_tiles = C_{N-1}; for tile >= num_tiles n is N."""
    offs = tl.arange(0, SEQS_PAD)
    ok = offs < num_seqs
    starts = tl.load(QueryStartLoc + offs, mask=ok, other=0)
    ends = tl.load(QueryStartLoc + offs + 1, mask=ok, other=0)
    tiles = tl.cdiv(tl.maximum(ends - starts, 0), BLOCK_M)
    upto = tl.cumsum(tiles, 0)
    n = tl.sum((upto <= tile).to(tl.int32), 0)
    this = offs == n
    before = tl.sum(tl.where(this, upto - tiles, 0), 0)
    count = tl.sum(tl.where(this, tiles, 0), 0)
    return n, count - 1 - (tile - before), tl.sum(tiles, 0)


@triton.jit
def _zero_unowned_rows(o_head, z, first, last, num_tokens, stride_ot, stride_od,
                       BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
    """Zero the z-th BLOCK_M of one head's unowned rows, the rows [0, first) then
    [last, num_tokens) counted u = 0, 1, ... (first = qsl[0], last = qsl[N])."""
    u = z * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = tl.where(u < first, u, last + (u - first))
    offs_d = tl.arange(0, D_PAD)
    ptrs = o_head + rows.to(tl.int64)[:, None] * stride_ot + offs_d[None, :] * stride_od
    mask = _tile_mask(rows < num_tokens, offs_d < HEAD_DIM, HEAD_DIM < D_PAD)
    tl.store(ptrs, tl.zeros([BLOCK_M, D_PAD], dtype=o_head.dtype.element_ty), mask=mask)


@triton.jit
def _paged_prefill_kernel(Q, KPool, VPool, Out, BlockTables, SeqLens, QueryStartLoc,
                          stride_qh, stride_qt, stride_qd,
                          stride_kh, stride_kb, stride_kr, stride_kd,
                          stride_vh, stride_vb, stride_vr, stride_vd,
                          stride_oh, stride_ot, stride_od, stride_bt,
                          num_seqs, num_tokens, qk_scale, cap_scale, window,
                          GROUP: tl.constexpr, PAGE: tl.constexpr, HEAD_DIM: tl.constexpr,
                          D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          SEQS_PAD: tl.constexpr, CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr,
                          DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Paged attention of packed queries ([1, Hq, T, D], sequence n owns rows
    qsl[n]:qsl[n+1]) over keys gathered through each sequence's block table, one program per
    (packed tile, query head h): an owned tile (``_find_query_block``) runs ``_flash_block``
    with KV head h // GROUP; a tile past the owned ones zeroes unowned rows instead.
    """
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16, "tl.dot needs tiles of at least 16")
    tl.static_assert(D_PAD >= 16 and (D_PAD & (D_PAD - 1)) == 0 and D_PAD >= HEAD_DIM,
                     "D_PAD must be a power of two >= 16 covering HEAD_DIM")
    tile = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    n, block_m, num_tiles = _find_query_block(QueryStartLoc, num_seqs, tile, BLOCK_M, SEQS_PAD)
    o_head = Out + h * stride_oh
    if tile >= num_tiles:
        _zero_unowned_rows(o_head, tile - num_tiles, tl.load(QueryStartLoc),
                           tl.load(QueryStartLoc + num_seqs), num_tokens, stride_ot, stride_od,
                           BLOCK_M, HEAD_DIM, D_PAD)
        return
    q_first = tl.load(QueryStartLoc + n)
    q_len = tl.load(QueryStartLoc + n + 1) - q_first
    kv_len = tl.load(SeqLens + n)
    kvh = h // GROUP
    _flash_block(Q + h * stride_qh, o_head, KPool + kvh * stride_kh, VPool + kvh * stride_vh,
                 BlockTables + n.to(tl.int64) * stride_bt, q_first, q_len, kv_len,
                 block_m * BLOCK_M, stride_qt, stride_qd, stride_ot, stride_od,
                 stride_kb, stride_kr, stride_kd, stride_vb, stride_vr, stride_vd,
                 qk_scale, cap_scale, window, PAGE, HEAD_DIM, D_PAD, BLOCK_M, BLOCK_N, CAUSAL,
                 SOFTCAP, True, DTYPE, DOT_PRECISION)



def default_prefill_config(head_dim: int, on_cuda: bool) -> dict:
    """Hopper defaults for the prefill kernels, by the padded head dim (80 and 96 run as 128);
    small tiles under the interpreter. Measured on H100, causal bf16 B4 H32 T4096: D128 ~395
    TFLOP/s (m128_n64_w8_s3 the same, SDPA flash 323), D64 ~340 (SDPA flash 285); paged B1
    H32/8 T4096 D128: ~340 with block_size 64, ~255 with block_size 16 (rows gathered)."""
    if not on_cuda:
        return PREFILL_CONFIGS["interpret"]
    if head_dim_pad(head_dim) <= 128:
        return PREFILL_CONFIGS["m64_n64_w4_s3"]
    return PREFILL_CONFIGS["m64_n32_w4_s2"]


def _resolve_config(op: str, config: Union[None, str, dict], head_dim: int, on_cuda: bool) -> dict:
    if config is None:
        return default_prefill_config(head_dim, on_cuda)
    if isinstance(config, str):
        if config not in PREFILL_CONFIGS:
            _fail(op, f"unknown config {config!r}; known: {sorted(PREFILL_CONFIGS)}")
        return PREFILL_CONFIGS[config]
    return dict(config)



def paged_prefill_grid(num_tokens: int, num_seqs: int, block_m: int, q_heads: int) -> tuple:
    """(tiles, heads): sum_n cdiv(q_len_n, BLOCK_M) owned tiles plus the tiles of unowned rows
    never exceed cdiv(T, BLOCK_M) + N, as each of the N + 1 stretches (N sequences, unowned
    rows) rounds up by less than one tile."""
    return (triton.cdiv(num_tokens, block_m) + num_seqs, q_heads)



def launch_paged_prefill(q, kv_pool, layer, block_tables, seq_lens, query_start_loc, out,
                          qk_scale, cap_scale, causal, window, softcap, config) -> None:
    Hq, T, D = q.shape[1], q.shape[2], q.shape[3]
    page, hkv = kv_pool.shape[3], kv_pool.shape[4]
    N = seq_lens.numel()
    cfg = _resolve_config("paged_attention", config, D, q.is_cuda)
    k_pool, v_pool = kv_pool[layer, 0], kv_pool[layer, 1]  # [blocks, block_size, Hkv, D]
    kb, kr, kh, kd = k_pool.stride()
    vb, vr, vh, vd = v_pool.stride()
    _paged_prefill_kernel[paged_prefill_grid(T, N, cfg["BLOCK_M"], Hq)](
        q, k_pool, v_pool, out, block_tables, seq_lens, query_start_loc,
        q.stride(1), q.stride(2), q.stride(3),
        kh, kb, kr, kd,
        vh, vb, vr, vd,
        out.stride(1), out.stride(2), out.stride(3), block_tables.stride(0),
        N, T, qk_scale, cap_scale, window,
        GROUP=Hq // hkv, PAGE=page, HEAD_DIM=D, D_PAD=head_dim_pad(D),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], SEQS_PAD=_next_pow2(max(N, 1)),
        CAUSAL=bool(causal), SOFTCAP=softcap > 0.0, DTYPE=_TL_DTYPES[q.dtype],
        DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])



def flash_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool, window: int = 0,
                    softcap: float = 0.0, *, config: Union[None, str, dict] = None) -> Tensor:
    """Dense attention of q [B, Hq, S, D] over k, v [B, Hkv, L, D] (S <= L, queries are the last
    S positions; GQA without expanding K/V); same result as ``fusegen.ops.attention`` with
    ``key_mask=None``. ``config``: a PREFILL_CONFIGS name or a dict of the same keys."""
    op = "flash_attention"
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        _fail(op, f"expected q [B,Hq,S,D] and k, v [B,Hkv,L,D], got q {tuple(q.shape)}, "
                  f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    B, Hq, S, D = q.shape
    L, hkv = k.shape[2], k.shape[1]
    if k.shape[0] != B or Hq % hkv or k.shape[3] != D:
        _fail(op, f"q {tuple(q.shape)} and k {tuple(k.shape)} must share batch and head dim, "
                  f"with query heads a multiple of KV heads")
    if S > L:
        _fail(op, f"{S} queries but only {L} keys (q {tuple(q.shape)}, k {tuple(k.shape)})")
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_attention_dtype(op, name, t)
    _check_head_dim(op, D)
    _check_same_device(op, q=q, k=k, v=v)
    out = torch.empty_like(q)
    if out.numel() == 0:
        return out
    cfg = _resolve_config(op, config, D, q.is_cuda)
    qk_scale, cap_scale = _scales(scale, softcap)
    grid = (triton.cdiv(S, cfg["BLOCK_M"]), B, Hq)
    with _device_guard(q):
        _flash_fwd_kernel[grid](
            q, k, v, out, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            S, L, qk_scale, cap_scale, window,
            GROUP=Hq // hkv, HEAD_DIM=D, D_PAD=head_dim_pad(D), BLOCK_M=cfg["BLOCK_M"],
            BLOCK_N=cfg["BLOCK_N"], CAUSAL=bool(causal), SOFTCAP=softcap > 0.0,
            DTYPE=_TL_DTYPES[q.dtype], DOT_PRECISION=_dot_precision(q.dtype),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out

