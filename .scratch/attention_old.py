"""Triton attention kernels: paged KV write, paged prefill / decode attention, dense flash attention.

Every kernel computes exactly what its reference op in ``fusegen.ops`` computes (same masking
rule: query ``i`` of a sequence with ``L`` keys and ``S`` queries sits at ``p_i = L - S + i``
and sees key ``j`` when ``(not causal or j <= p_i) and (window == 0 or p_i - j < window)``;
rows that see no key are zeros). Nothing here reads a tensor's values on the host, so every
wrapper can be captured in a CUDA graph; kernels are chosen from shapes only.

    public wrapper        kernels                                   reference op
    paged_kv_write        _paged_kv_write_kernel                    fusegen::paged_kv_write
    paged_attention       T == N: _decode_split_kernel (+ _decode_reduce_kernel)
                          otherwise: _flash_fwd_kernel (PAGED)      fusegen::paged_attention
    flash_attention       _flash_fwd_kernel (dense)                 fusegen::attention (no key mask)

Keys are read a tile of ``BLOCK_N`` rows at a time, tiles starting at multiples of BLOCK_N; in
the paged layout row j lives in pool block ``table[j // block_size]``, row ``j % block_size``, so
a tile reads one block (block_size a multiple of BLOCK_N) or gathers its rows' blocks:

    keys   0 ........ 15 | 16 ....... 31 | 32 ... 47      block_table = [7, 2, 9]
    pool   block 7        | block 2        | block 9       one BLOCK_N=32 tile = rows of 7 and 2

``register()`` makes these wrappers the CUDA kernels of the ``fusegen`` ops.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Optional, Union

import torch
import triton
import triton.language as tl
from torch import Tensor

LOG2E = 1.4426950408889634

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}

# Tile configurations for _flash_fwd_kernel; a benchmark sweeps them through ``config=``.
PREFILL_CONFIGS = {
    "m128_n64_w8_s3": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
    "m128_n128_w8_s2": dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
    "m128_n32_w4_s4": dict(BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=4),
    "m64_n64_w4_s3": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    "m128_n64_w4_s3": dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
    "m64_n32_w4_s2": dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2),
    "interpret": dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1),
}

# Split-KV decode: a split gets at least this many keys, and the split count aims at a few
# programs per multiprocessor.
DECODE_MIN_KEYS_PER_SPLIT = 256
DECODE_MAX_SPLITS = 64
DECODE_PROGRAMS_PER_SM = 2


# ------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------

@triton.jit
def _paged_kv_write_kernel(K, V, KPool, VPool, SlotMapping,
                           stride_kh, stride_kt, stride_kd, stride_vh, stride_vt, stride_vd,
                           stride_pb, stride_pr, stride_ph, stride_pd, num_heads,
                           PAGE: tl.constexpr, HEADS_PAD: tl.constexpr, D_PAD: tl.constexpr,
                           HEAD_DIM: tl.constexpr):
    """Scatter one token's keys and values into the paged pool.

    pool[slot // PAGE, slot % PAGE, h, :] = k[h, t, :]  for every KV head h, when slot >= 0,
    with slot = slot_mapping[t] (the vLLM ``reshape_and_cache`` layout, Kwon et al. 2023).
    One program per token t.
    """
    tl.static_assert(HEADS_PAD >= 1 and D_PAD >= HEAD_DIM, "tile must cover all heads and dims")
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(SlotMapping + t).to(tl.int64)
    if slot < 0:
        return
    h = tl.arange(0, HEADS_PAD)
    d = tl.arange(0, D_PAD)
    mask = (h < num_heads)[:, None] & (d < HEAD_DIM)[None, :]
    k = tl.load(K + t * stride_kt + h[:, None] * stride_kh + d[None, :] * stride_kd, mask=mask)
    v = tl.load(V + t * stride_vt + h[:, None] * stride_vh + d[None, :] * stride_vd, mask=mask)
    dst = (slot // PAGE) * stride_pb + (slot % PAGE) * stride_pr \
        + h[:, None] * stride_ph + d[None, :] * stride_pd
    tl.store(KPool + dst, k.to(KPool.dtype.element_ty), mask=mask)
    tl.store(VPool + dst, v.to(VPool.dtype.element_ty), mask=mask)


@triton.jit
def _tanh(x):
    # tanh(x) = 1 - 2 / (exp(2x) + 1); exp2 overflowing to inf still gives +-1.
    return 1.0 - 2.0 / (tl.exp2(x * 2.8853900817779268) + 1.0)


@triton.jit
def _paged_rows(table, tile, j, key_end, stride_kb, stride_kr, stride_vb, stride_vr,
                PAGE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """Offsets of key rows j = tile + [0, BLOCK_N) in the K and V pools: row j is row j % PAGE
    of pool block table[j // PAGE]. Tiles start at multiples of BLOCK_N, so when PAGE is a
    multiple of BLOCK_N a tile lies in one block (one table entry, contiguous rows); otherwise
    each row's block is gathered (measured faster on H100 than loading BLOCK_N // PAGE entries
    and reshaping, which costs a layout conversion)."""
    if PAGE % BLOCK_N == 0:
        blk = tl.load(table + tile // PAGE).to(tl.int64)
        r = (tile % PAGE) + tl.arange(0, BLOCK_N)
        k_rows = blk * stride_kb + r * stride_kr
        v_rows = blk * stride_vb + r * stride_vr
    else:
        if MASKED:
            blk = tl.load(table + j // PAGE, mask=j < key_end, other=0).to(tl.int64)
        else:
            blk = tl.load(table + j // PAGE).to(tl.int64)
        k_rows = blk * stride_kb + (j % PAGE) * stride_kr
        v_rows = blk * stride_vb + (j % PAGE) * stride_vr
    return k_rows, v_rows


@triton.jit
def _attend_tiles(acc, l_i, m_i, q, pos, k_base, v_base, table, start, stop, key_end,
                  qk_scale, cap_scale, window,
                  stride_kb, stride_kr, stride_kd, stride_vb, stride_vr, stride_vd,
                  PAGE: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
                  CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr, PAGED: tl.constexpr,
                  MASKED: tl.constexpr, DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online-softmax update of (acc, l_i, m_i) with key tiles [start, stop) in BLOCK_N steps.

    Scores are in log2 units: s = q.k * qk_scale (qk_scale = scale * log2 e), or with a softcap
    s = tanh(q.k * qk_scale) * cap_scale (qk_scale = scale / softcap, cap_scale = softcap * log2 e).
    Per tile (FlashAttention-2, Dao 2023, Algorithm 1):
        m' = max(m, rowmax s);  p = 2^(s - m');  l = l 2^(m - m') + rowsum p;
        acc = acc 2^(m - m') + p V
    MASKED tiles apply the masking rule per row (query position ``pos``) and keep keys below
    ``key_end``; unmasked tiles must lie where every row sees every key.
    """
    offs_d = tl.arange(0, D)
    for tile in range(start, stop, BLOCK_N):
        j = tile + tl.arange(0, BLOCK_N)
        in_range = j < key_end
        if PAGED:
            k_rows, v_rows = _paged_rows(table, tile, j, key_end, stride_kb, stride_kr,
                                         stride_vb, stride_vr, PAGE, BLOCK_N, MASKED)
        else:
            k_rows = j.to(tl.int64) * stride_kr
            v_rows = j.to(tl.int64) * stride_vr
        k_ptrs = k_base + k_rows[:, None] + offs_d[None, :] * stride_kd
        v_ptrs = v_base + v_rows[:, None] + offs_d[None, :] * stride_vd
        if MASKED:
            k = tl.load(k_ptrs, mask=in_range[:, None], other=0.0).to(DTYPE)
        else:
            k = tl.load(k_ptrs).to(DTYPE)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if SOFTCAP:
            s = _tanh(s * qk_scale) * cap_scale
        else:
            s = s * qk_scale
        if MASKED:
            keep = in_range[None, :] & ((window == 0) | (pos[:, None] - j[None, :] < window))
            if CAUSAL:
                keep = keep & (j[None, :] <= pos[:, None])
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED:
            m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # row with no key yet
        else:
            m_new_safe = m_new
        alpha = tl.exp2(m_i - m_new_safe)
        p = tl.exp2(s - m_new_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(v_ptrs, mask=in_range[:, None], other=0.0).to(DTYPE)
        else:
            v = tl.load(v_ptrs).to(DTYPE)
        acc = tl.dot(p.to(DTYPE), v, acc=acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _zero_unowned_rows(out_head, QueryStartLoc, num_seqs, num_tokens, block_m, stride_ot,
                       stride_od, BLOCK_M: tl.constexpr, D: tl.constexpr):
    """Zero the packed rows t < query_start_loc[0] or t >= query_start_loc[N] of one head."""
    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    first = tl.load(QueryStartLoc)
    last = tl.load(QueryStartLoc + num_seqs)
    unowned = (rows < num_tokens) & ((rows < first) | (rows >= last))
    ptrs = out_head + rows.to(tl.int64)[:, None] * stride_ot + tl.arange(0, D)[None, :] * stride_od
    tl.store(ptrs, tl.zeros([BLOCK_M, D], dtype=out_head.dtype.element_ty), mask=unowned[:, None])


@triton.jit
def _flash_fwd_kernel(Q, K, V, Out, BlockTables, SeqLens, QueryStartLoc,
                      stride_qs, stride_qh, stride_qt, stride_qd,
                      stride_ks, stride_kh, stride_kb, stride_kr, stride_kd,
                      stride_vs, stride_vh, stride_vb, stride_vr, stride_vd,
                      stride_os, stride_oh, stride_ot, stride_od, stride_bt,
                      num_seqs, num_tokens, dense_q_len, dense_kv_len,
                      qk_scale, cap_scale, window,
                      GROUP: tl.constexpr, PAGE: tl.constexpr, D: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                      SOFTCAP: tl.constexpr, PAGED: tl.constexpr, DTYPE: tl.constexpr,
                      DOT_PRECISION: tl.constexpr):
    """FlashAttention-2 forward (Dao 2023) for one (query block, sequence, query head).

        O_i = sum_j softmax_j(s_ij) V_j,   s_ij = scale q_i.k_j (tanh-capped when SOFTCAP),
        over the keys j query i may see; rows without keys are 0.

    PAGED: queries are packed ([1, Hq, T, D], sequence n owns rows qsl[n]:qsl[n+1]) and keys
    are gathered through the block table; the grid's extra sequence index n == N zeroes the
    rows no sequence owns. Dense: sequence n is batch n with dense_q_len queries and
    dense_kv_len keys. Query head h reads KV head h // GROUP (GQA without expanding K/V).
    Key tiles run in three stretches: masked tiles at the window's start, unmasked tiles that
    every row of the block sees whole, masked tiles at the causal diagonal; tiles outside
    the union of the block's rows' ranges are skipped.
    """
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16, "tl.dot needs tiles of at least 16")
    tl.static_assert(D >= 16 and (D & (D - 1)) == 0, "head dim must be a power of two >= 16")
    block_m = tl.num_programs(0) - 1 - tl.program_id(0)  # longest causal rows first
    n = tl.program_id(1)
    h = tl.program_id(2)
    if n == num_seqs:
        if PAGED:
            _zero_unowned_rows(Out + h.to(tl.int64) * stride_oh, QueryStartLoc, num_seqs,
                               num_tokens, block_m, stride_ot, stride_od, BLOCK_M, D)
        return
    if PAGED:
        q_first = tl.load(QueryStartLoc + n)
        q_len = tl.load(QueryStartLoc + n + 1) - q_first
        kv_len = tl.load(SeqLens + n)
        table = BlockTables + n.to(tl.int64) * stride_bt
    else:
        q_first = 0
        q_len = dense_q_len
        kv_len = dense_kv_len
        table = BlockTables
    m0 = block_m * BLOCK_M
    if m0 >= q_len:
        return

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < q_len
    rows = (q_first + offs_m).to(tl.int64)
    q_ptrs = Q + n.to(tl.int64) * stride_qs + h.to(tl.int64) * stride_qh \
        + rows[:, None] * stride_qt + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0).to(DTYPE)

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

    kvh = (h // GROUP).to(tl.int64)
    k_base = K + n.to(tl.int64) * stride_ks + kvh * stride_kh
    v_base = V + n.to(tl.int64) * stride_vs + kvh * stride_vh
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    acc, l_i, m_i = _attend_tiles(acc, l_i, m_i, q, pos, k_base, v_base, table, lo, mid, kv_len,
                                  qk_scale, cap_scale, window, stride_kb, stride_kr, stride_kd,
                                  stride_vb, stride_vr, stride_vd, PAGE, BLOCK_N, D, CAUSAL,
                                  SOFTCAP, PAGED, True, DTYPE, DOT_PRECISION)
    acc, l_i, m_i = _attend_tiles(acc, l_i, m_i, q, pos, k_base, v_base, table, mid, tail, kv_len,
                                  qk_scale, cap_scale, window, stride_kb, stride_kr, stride_kd,
                                  stride_vb, stride_vr, stride_vd, PAGE, BLOCK_N, D, CAUSAL,
                                  SOFTCAP, PAGED, False, DTYPE, DOT_PRECISION)
    acc, l_i, m_i = _attend_tiles(acc, l_i, m_i, q, pos, k_base, v_base, table, tail, hi, kv_len,
                                  qk_scale, cap_scale, window, stride_kb, stride_kr, stride_kd,
                                  stride_vb, stride_vr, stride_vd, PAGE, BLOCK_N, D, CAUSAL,
                                  SOFTCAP, PAGED, True, DTYPE, DOT_PRECISION)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_ptrs = Out + n.to(tl.int64) * stride_os + h.to(tl.int64) * stride_oh \
        + rows[:, None] * stride_ot + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _decode_split_kernel(Q, KPool, VPool, Out, PartOut, PartLse, BlockTables, SeqLens,
                         QueryStartLoc,
                         stride_qh, stride_qt, stride_qd,
                         stride_kh, stride_kb, stride_kr, stride_kd,
                         stride_oh, stride_ot, stride_od,
                         stride_pt, stride_ph, stride_ps, stride_lt, stride_lh,
                         stride_bt, num_seqs, qk_scale, cap_scale, window,
                         GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, PAGE: tl.constexpr,
                         D: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
                         SEQS_PAD: tl.constexpr, CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr,
                         DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Flash-Decoding (Dao, Haziza, Massa, Sizov 2023), split step, for one (token t, KV head,
    split): the GROUP query heads sharing the KV head form the rows of one [GROUP_PAD, D] tile,
    so each K/V tile is read once for the whole group.

    The token's visible keys [lo, hi) (lo rounded down to a tile) are cut into NUM_SPLITS
    ranges of equal size (a multiple of BLOCK_N); this program writes, for its range R,
        o_s = sum_{j in R} 2^(s_j - m_s) V_j / l_s,   lse_s = m_s + log2 l_s  (log2 units),
    an empty range giving o_s = 0, lse_s = -inf. With NUM_SPLITS == 1 it writes O directly.
    Each packed token finds its own sequence (the n with qsl[n] <= t < qsl[n+1]) and its
    position, so any batch with T == N tokens is handled, not only one query per sequence;
    tokens no sequence owns come out as zeros.
    """
    tl.static_assert(GROUP_PAD >= 16 and GROUP_PAD >= GROUP, "query-head tile needs >= 16 rows")
    tl.static_assert(BLOCK_N >= 16, "tl.dot needs tiles of at least 16")
    tl.static_assert((NUM_SPLITS & (NUM_SPLITS - 1)) == 0, "split count must be a power of two")
    t = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)

    offs_n = tl.arange(0, SEQS_PAD)
    starts = tl.load(QueryStartLoc + offs_n, mask=offs_n <= num_seqs, other=2147483647)
    idx = tl.sum((starts <= t).to(tl.int32), 0) - 1
    owned = (idx >= 0) & (idx < num_seqs)
    n = tl.minimum(tl.maximum(idx, 0), num_seqs - 1)
    q_first = tl.load(QueryStartLoc + n)
    q_len = tl.load(QueryStartLoc + n + 1) - q_first
    kv_len = tl.load(SeqLens + n)
    p = kv_len - q_len + (t - q_first)

    lo = tl.where(window > 0, tl.maximum(p - window + 1, 0), 0)
    if CAUSAL:
        hi = tl.minimum(p + 1, kv_len)
    else:
        hi = kv_len
    hi = tl.where(owned, tl.maximum(hi, lo), lo)
    lo_tile = lo // BLOCK_N * BLOCK_N  # splits and tiles start at multiples of BLOCK_N
    per_split = tl.cdiv(tl.cdiv(hi - lo_tile, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = lo_tile + split * per_split
    stop = tl.minimum(start + per_split, hi)
    # masked: the tile holding lo (window start); unmasked: whole tiles; masked: the last one
    mid = start + tl.cdiv(tl.maximum(lo - start, 0), BLOCK_N) * BLOCK_N
    full_stop = mid + tl.maximum(stop - mid, 0) // BLOCK_N * BLOCK_N

    g = tl.arange(0, GROUP_PAD)
    heads = (kvh * GROUP + g).to(tl.int64)
    head_ok = g < GROUP
    offs_d = tl.arange(0, D)
    t64 = t.to(tl.int64)
    q = tl.load(Q + heads[:, None] * stride_qh + t64 * stride_qt + offs_d[None, :] * stride_qd,
                mask=head_ok[:, None], other=0.0).to(DTYPE)
    pos = tl.zeros([GROUP_PAD], dtype=tl.int32) + p
    table = BlockTables + n.to(tl.int64) * stride_bt
    k_base = KPool + kvh.to(tl.int64) * stride_kh
    v_base = VPool + kvh.to(tl.int64) * stride_kh
    acc = tl.zeros([GROUP_PAD, D], dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    acc, l_i, m_i = _attend_tiles(acc, l_i, m_i, q, pos, k_base, v_base, table, start, mid,
                                  stop, qk_scale, cap_scale, window, stride_kb, stride_kr,
                                  stride_kd, stride_kb, stride_kr, stride_kd, PAGE, BLOCK_N, D,
                                  CAUSAL, SOFTCAP, True, True, DTYPE, DOT_PRECISION)
    acc, l_i, m_i = _attend_tiles(acc, l_i, m_i, q, pos, k_base, v_base, table, mid, full_stop,
                                  stop, qk_scale, cap_scale, window, stride_kb, stride_kr,
                                  stride_kd, stride_kb, stride_kr, stride_kd, PAGE, BLOCK_N, D,
                                  CAUSAL, SOFTCAP, True, False, DTYPE, DOT_PRECISION)
    acc, l_i, m_i = _attend_tiles(acc, l_i, m_i, q, pos, k_base, v_base, table, full_stop, stop,
                                  stop, qk_scale, cap_scale, window, stride_kb, stride_kr,
                                  stride_kd, stride_kb, stride_kr, stride_kd, PAGE, BLOCK_N, D,
                                  CAUSAL, SOFTCAP, True, True, DTYPE, DOT_PRECISION)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    if NUM_SPLITS == 1:
        o_ptrs = Out + heads[:, None] * stride_oh + t64 * stride_ot + offs_d[None, :] * stride_od
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=head_ok[:, None])
    else:
        lse = tl.where(l_i > 0.0, m_i + tl.log2(tl.where(l_i > 0.0, l_i, 1.0)), float("-inf"))
        part = t64 * stride_pt + heads * stride_ph + split * stride_ps
        tl.store(PartOut + part[:, None] + offs_d[None, :], out, mask=head_ok[:, None])
        tl.store(PartLse + t64 * stride_lt + heads * stride_lh + split, lse, mask=head_ok)


@triton.jit
def _decode_reduce_kernel(PartOut, PartLse, Out, stride_pt, stride_ph, stride_ps,
                          stride_lt, stride_lh, stride_oh, stride_ot, stride_od,
                          NUM_SPLITS: tl.constexpr, D: tl.constexpr):
    """Flash-Decoding reduction (Dao et al. 2023) for one (token, query head):

        M = max_s lse_s,  w_s = 2^(lse_s - M),  O = sum_s w_s o_s / sum_s w_s
    (O = 0 when every split was empty, i.e. all lse_s = -inf).
    """
    tl.static_assert((NUM_SPLITS & (NUM_SPLITS - 1)) == 0, "split count must be a power of two")
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    s = tl.arange(0, NUM_SPLITS)
    offs_d = tl.arange(0, D)
    lse = tl.load(PartLse + t * stride_lt + h * stride_lh + s)
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)
    o = tl.load(PartOut + t * stride_pt + h * stride_ph + s[:, None] * stride_ps + offs_d[None, :])
    total = tl.sum(w, 0)
    out = tl.sum(o * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(Out + h * stride_oh + t * stride_ot + offs_d * stride_od, out.to(Out.dtype.element_ty))


# ------------------------------------------------------------------------------------------
# wrappers
# ------------------------------------------------------------------------------------------

def _fail(op: str, message: str) -> None:
    raise ValueError(f"fusegen.codegen.attention.{op}: {message}")


def _check_attention_dtype(op: str, name: str, t: Tensor) -> None:
    if t.dtype not in _TL_DTYPES:
        _fail(op, f"{name} has dtype {t.dtype}; the kernels take float16, bfloat16 or float32")


def _check_head_dim(op: str, D: int) -> None:
    if D < 16 or D & (D - 1):
        _fail(op, f"head dim {D} must be a power of two >= 16 (e.g. 64 or 128)")


def _check_same_device(op: str, **tensors: Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        _fail(op, f"tensors on different devices: {devices}")


def _device_guard(t: Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 models are compared against fp32 references: no TF32 rounding there.
    return "ieee" if dtype == torch.float32 else "tf32"


def _scales(scale: float, softcap: float) -> tuple[float, float]:
    """(qk_scale, cap_scale) in log2 units, see _attend_tiles."""
    if softcap > 0.0:
        return scale / softcap, softcap * LOG2E
    return scale * LOG2E, 1.0


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _prev_pow2(x: int) -> int:
    return 1 << max(0, int(x).bit_length() - 1)


def default_prefill_config(head_dim: int, on_cuda: bool) -> dict:
    """Hopper defaults for _flash_fwd_kernel; small tiles under the interpreter. Measured on
    H100, causal bf16 B4 H32 T4096: D128 ~395 TFLOP/s (m128_n64_w8_s3 the same, SDPA flash
    323), D64 ~340 (SDPA flash 285); paged B1 H32/8 T4096 D128: ~340 with block_size 64,
    ~255 with block_size 16 (rows gathered)."""
    if not on_cuda:
        return PREFILL_CONFIGS["interpret"]
    if head_dim <= 128:
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


def default_decode_config(head_dim: int, on_cuda: bool) -> dict:
    """Tiles of _decode_split_kernel. H100, bf16 GQA 32/8 D128, block_size 16, CUDA graph:
    B1 L8k 2.1 TB/s, B1 L32k 2.45, B32 L4k 2.9 (BLOCK_N 32/128 and 4 warps measured no faster)."""
    if not on_cuda:
        return dict(BLOCK_N=16, num_warps=1, num_stages=1)
    return dict(BLOCK_N=64 if head_dim <= 128 else 32, num_warps=2, num_stages=3)


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def decode_num_splits(num_tokens: int, kv_heads: int, max_keys: int, multiprocessors: int) -> int:
    """Split count from shapes only: about DECODE_PROGRAMS_PER_SM (token, KV head, split)
    programs per multiprocessor, no split shorter than DECODE_MIN_KEYS_PER_SPLIT keys of the
    longest possible context ``max_keys`` (block_tables width * block_size), rounded down to a
    power of two. (H100, GQA 32/8, D 128: B1 L8k -> 32, B1 L32k -> 32, B32 L4k -> 2.)"""
    want = triton.cdiv(DECODE_PROGRAMS_PER_SM * multiprocessors, max(1, num_tokens * kv_heads))
    by_length = triton.cdiv(max(1, max_keys), DECODE_MIN_KEYS_PER_SPLIT)
    return min(_prev_pow2(min(want, by_length)), DECODE_MAX_SPLITS)


def paged_kv_write(kv_pool: Tensor, layer: int, k: Tensor, v: Tensor, slot_mapping: Tensor) -> None:
    """Triton version of ``fusegen.ops.paged_kv_write``: k, v [1, Hkv, T, D] (any strides) go to
    ``kv_pool[layer, 0/1, slot // block_size, slot % block_size]``; slot -1 is skipped."""
    op = "paged_kv_write"
    if kv_pool.dim() != 6:
        _fail(op, f"kv_pool must be [layers, 2, blocks, block_size, Hkv, D], got {tuple(kv_pool.shape)}")
    _, two, _, page, hkv, D = kv_pool.shape
    if k.dim() != 4 or k.shape != v.shape or k.shape[0] != 1 or two != 2:
        _fail(op, f"k, v must be [1, Hkv, T, D] and equal in shape, got k {tuple(k.shape)}, "
                  f"v {tuple(v.shape)} (pool {tuple(kv_pool.shape)})")
    if k.shape[1] != hkv or k.shape[3] != D:
        _fail(op, f"k {tuple(k.shape)} does not fit the pool's {hkv} KV heads of dim {D} "
                  f"(pool {tuple(kv_pool.shape)})")
    if slot_mapping.dim() != 1 or slot_mapping.numel() != k.shape[2]:
        _fail(op, f"{k.shape[2]} tokens but slot_mapping has shape {tuple(slot_mapping.shape)}")
    if slot_mapping.dtype not in (torch.int32, torch.int64):
        _fail(op, f"slot_mapping must be int32 or int64, got {slot_mapping.dtype}")
    if not 0 <= layer < kv_pool.shape[0]:
        _fail(op, f"layer {layer} out of range for a pool of {kv_pool.shape[0]} layers")
    _check_same_device(op, kv_pool=kv_pool, k=k, v=v, slot_mapping=slot_mapping)
    T = k.shape[2]
    if T == 0:
        return
    k_pool, v_pool = kv_pool[layer, 0], kv_pool[layer, 1]
    with _device_guard(k):
        _paged_kv_write_kernel[(T,)](
            k, v, k_pool, v_pool, slot_mapping,
            k.stride(1), k.stride(2), k.stride(3), v.stride(1), v.stride(2), v.stride(3),
            *k_pool.stride(), hkv,
            PAGE=page, HEADS_PAD=_next_pow2(hkv), D_PAD=_next_pow2(D), HEAD_DIM=D,
            num_warps=4 if k.is_cuda else 1)


def _check_paged_inputs(q: Tensor, kv_pool: Tensor, layer: int, block_tables: Tensor,
                        seq_lens: Tensor, query_start_loc: Tensor) -> None:
    op = "paged_attention"
    if q.dim() != 4 or q.shape[0] != 1:
        _fail(op, f"queries must be packed as [1, Hq, T, D], got {tuple(q.shape)}")
    if kv_pool.dim() != 6 or kv_pool.shape[1] != 2:
        _fail(op, f"kv_pool must be [layers, 2, blocks, block_size, Hkv, D], got {tuple(kv_pool.shape)}")
    hkv, D = kv_pool.shape[4], kv_pool.shape[5]
    if q.shape[1] % hkv or q.shape[3] != D:
        _fail(op, f"q {tuple(q.shape)} does not fit the pool's {hkv} KV heads of dim {D} "
                  f"(pool {tuple(kv_pool.shape)})")
    _check_attention_dtype(op, "q", q)
    _check_attention_dtype(op, "kv_pool", kv_pool)
    _check_head_dim(op, D)
    if not 0 <= layer < kv_pool.shape[0]:
        _fail(op, f"layer {layer} out of range for a pool of {kv_pool.shape[0]} layers")
    N = seq_lens.numel()
    if block_tables.dim() != 2 or block_tables.shape[0] != N or seq_lens.dim() != 1:
        _fail(op, f"block_tables must be [N, max_blocks] and seq_lens [N], got block_tables "
                  f"{tuple(block_tables.shape)}, seq_lens {tuple(seq_lens.shape)}")
    if query_start_loc.shape != (N + 1,):
        _fail(op, f"query_start_loc must have N+1 = {N + 1} entries, got shape "
                  f"{tuple(query_start_loc.shape)}")
    for name, t in (("block_tables", block_tables), ("seq_lens", seq_lens),
                    ("query_start_loc", query_start_loc)):
        if t.dtype != torch.int32:
            _fail(op, f"{name} must be int32, got {t.dtype}")
    if block_tables.stride(1) != 1:
        _fail(op, f"block_tables rows must be contiguous, got strides {block_tables.stride()}")
    _check_same_device(op, q=q, kv_pool=kv_pool, block_tables=block_tables, seq_lens=seq_lens,
                       query_start_loc=query_start_loc)


def paged_attention(q: Tensor, kv_pool: Tensor, layer: int, block_tables: Tensor, seq_lens: Tensor,
                    query_start_loc: Tensor, scale: float, causal: bool, window: int, softcap: float,
                    *, num_splits: Optional[int] = None, config: Union[None, str, dict] = None) -> Tensor:
    """Triton version of ``fusegen.ops.paged_attention``: packed queries q [1, Hq, T, D] of N
    sequences over their paged context; returns [1, Hq, T, D] (q's strides), zeros for rows
    no sequence owns. T == N selects split-KV decode (``num_splits`` overrides the shape
    heuristic, a power of two), any other T the FlashAttention-2 kernel (``config`` picks its
    tiles, see PREFILL_CONFIGS). Sequence values are not validated (that would sync)."""
    _check_paged_inputs(q, kv_pool, layer, block_tables, seq_lens, query_start_loc)
    out = torch.empty_like(q)
    T, N = q.shape[2], seq_lens.numel()
    if T == 0:
        return out
    qk_scale, cap_scale = _scales(scale, softcap)
    with _device_guard(q):
        if T == N:
            _launch_decode(q, kv_pool, layer, block_tables, seq_lens, query_start_loc, out,
                           qk_scale, cap_scale, causal, window, softcap, num_splits)
        else:
            _launch_paged_prefill(q, kv_pool, layer, block_tables, seq_lens, query_start_loc, out,
                                  qk_scale, cap_scale, causal, window, softcap, config)
    return out


def _launch_paged_prefill(q, kv_pool, layer, block_tables, seq_lens, query_start_loc, out,
                          qk_scale, cap_scale, causal, window, softcap, config) -> None:
    Hq, T, D = q.shape[1], q.shape[2], q.shape[3]
    page, hkv = kv_pool.shape[3], kv_pool.shape[4]
    N = seq_lens.numel()
    cfg = _resolve_config("paged_attention", config, D, q.is_cuda)
    k_pool, v_pool = kv_pool[layer, 0], kv_pool[layer, 1]  # [blocks, block_size, Hkv, D]
    kb, kr, kh, kd = k_pool.stride()
    vb, vr, vh, vd = v_pool.stride()
    grid = (triton.cdiv(T, cfg["BLOCK_M"]), N + 1, Hq)
    _flash_fwd_kernel[grid](
        q, k_pool, v_pool, out, block_tables, seq_lens, query_start_loc,
        0, q.stride(1), q.stride(2), q.stride(3),
        0, kh, kb, kr, kd,
        0, vh, vb, vr, vd,
        0, out.stride(1), out.stride(2), out.stride(3), block_tables.stride(0),
        N, T, 0, 0, qk_scale, cap_scale, window,
        GROUP=Hq // hkv, PAGE=page, D=D, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        CAUSAL=bool(causal), SOFTCAP=softcap > 0.0, PAGED=True, DTYPE=_TL_DTYPES[q.dtype],
        DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def _launch_decode(q, kv_pool, layer, block_tables, seq_lens, query_start_loc, out,
                   qk_scale, cap_scale, causal, window, softcap, num_splits) -> None:
    Hq, T, D = q.shape[1], q.shape[2], q.shape[3]
    page, hkv = kv_pool.shape[3], kv_pool.shape[4]
    N = seq_lens.numel()
    group = Hq // hkv
    if num_splits is None:
        sms = _multiprocessors(q.device.index if q.device.index is not None
                               else torch.cuda.current_device()) if q.is_cuda else 4
        num_splits = decode_num_splits(T, hkv, block_tables.shape[1] * page, sms)
    if num_splits < 1 or num_splits & (num_splits - 1):
        _fail("paged_attention", f"num_splits must be a power of two, got {num_splits}")
    cfg = default_decode_config(D, q.is_cuda)
    k_pool, v_pool = kv_pool[layer, 0], kv_pool[layer, 1]
    kb, kr, kh, kd = k_pool.stride()
    if num_splits > 1:
        part_out = torch.empty((T, Hq, num_splits, D), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((T, Hq, num_splits), dtype=torch.float32, device=q.device)
    else:  # written straight to out; the pointers are unused
        part_out = part_lse = out
    _decode_split_kernel[(T, hkv, num_splits)](
        q, k_pool, v_pool, out, part_out, part_lse, block_tables, seq_lens, query_start_loc,
        q.stride(1), q.stride(2), q.stride(3),
        kh, kb, kr, kd,
        out.stride(1), out.stride(2), out.stride(3),
        Hq * num_splits * D, num_splits * D, D, Hq * num_splits, num_splits,
        block_tables.stride(0), N, qk_scale, cap_scale, window,
        GROUP=group, GROUP_PAD=max(16, _next_pow2(group)), PAGE=page, D=D,
        BLOCK_N=cfg["BLOCK_N"], NUM_SPLITS=num_splits, SEQS_PAD=_next_pow2(N + 1),
        CAUSAL=bool(causal), SOFTCAP=softcap > 0.0, DTYPE=_TL_DTYPES[q.dtype],
        DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if num_splits > 1:
        _decode_reduce_kernel[(T, Hq)](
            part_out, part_lse, out,
            Hq * num_splits * D, num_splits * D, D, Hq * num_splits, num_splits,
            out.stride(1), out.stride(2), out.stride(3),
            NUM_SPLITS=num_splits, D=D, num_warps=4 if q.is_cuda else 1)


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
            q, k, v, out, q, q, q,  # no block table / lengths in the dense layout
            *q.stride(),
            k.stride(0), k.stride(1), 0, k.stride(2), k.stride(3),
            v.stride(0), v.stride(1), 0, v.stride(2), v.stride(3),
            *out.stride(), 0,
            B, 0, S, L, qk_scale, cap_scale, window,
            GROUP=Hq // hkv, PAGE=1, D=D, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
            CAUSAL=bool(causal), SOFTCAP=softcap > 0.0, PAGED=False, DTYPE=_TL_DTYPES[q.dtype],
            DOT_PRECISION=_dot_precision(q.dtype),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


# ------------------------------------------------------------------------------------------
# registration as the CUDA kernels of the fusegen ops
# ------------------------------------------------------------------------------------------

_registered = False


def _kernel_supports(q: Tensor, head_dim: int, *others: Tensor) -> bool:
    return (all(t.dtype in _TL_DTYPES for t in (q, *others))
            and head_dim >= 16 and head_dim & (head_dim - 1) == 0)


def register() -> None:
    """Register the wrappers as the CUDA implementations of ``fusegen::attention`` (without a
    key mask), ``fusegen::paged_attention`` and ``fusegen::paged_kv_write``. Inputs the kernels
    do not take (a key mask, float64, a head dim that is not a power of two >= 16) go to the
    ops' reference implementations. Calling it again does nothing."""
    global _registered
    if _registered:
        return
    from fusegen import ops

    reference = {name: getattr(ops, name)._init_fn
                 for name in ("attention", "paged_attention", "paged_kv_write")}

    def attention_cuda(q, k, v, key_mask, scale, causal, window, softcap):
        if key_mask is None and q.shape[2] <= k.shape[2] and _kernel_supports(q, q.shape[-1], k, v):
            return flash_attention(q, k, v, scale, causal, window, softcap)
        return reference["attention"](q, k, v, key_mask, scale, causal, window, softcap)

    def paged_attention_cuda(q, kv_pool, layer, block_tables, seq_lens, query_start_loc, scale,
                             causal, window, softcap):
        if _kernel_supports(q, q.shape[-1], kv_pool):
            return paged_attention(q, kv_pool, layer, block_tables, seq_lens, query_start_loc,
                                   scale, causal, window, softcap)
        return reference["paged_attention"](q, kv_pool, layer, block_tables, seq_lens,
                                            query_start_loc, scale, causal, window, softcap)

    torch.library.register_kernel("fusegen::attention", "cuda", attention_cuda)
    torch.library.register_kernel("fusegen::paged_attention", "cuda", paged_attention_cuda)
    torch.library.register_kernel("fusegen::paged_kv_write", "cuda", paged_kv_write)
    _registered = True
