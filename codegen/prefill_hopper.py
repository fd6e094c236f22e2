"""Hopper (sm90+) prefill attention: the FlashAttention-2 algorithm of ``prefill_attention``
with TMA tile loads, a pipelined key loop in masked and unmasked stretches, and a longest-first
tile order; dense and packed paged, the same masking rule (``fusegen.codegen.attention``).

    launch_flash_hopper   _flash_hopper_kernel: a 1-D grid over (query block, batch, head)
                          tiles, groups of 8 heads at a time and longest first in a group
                          (causal: the last query block sees the most keys);
                          ``persistent``: fewer programs, each striding over the tiles
    launch_paged_hopper   _paged_hopper_kernel: grid (G, packed tiles, Hq / G): G heads'
                          tiles at a time, each sequence's last (longest) block first

TMA. Q, O and K, V tiles are read through 2-D descriptors made in the kernel
(``tl.make_tensor_descriptor``, one per sequence and head), whose bounds do the masking a
pointer load would: rows past the sequence and the padded columns HEAD_DIM..D_PAD load as 0
and are not stored.

    Q / O   base q + h stride_h + q_first stride_t     shape [q_len, HEAD_DIM]   box [BLOCK_M, D_PAD]
    K / V   dense: base k + z stride_z + kvh stride_h  shape [kv_len, HEAD_DIM]  box [BLOCK_N, D_PAD]
            paged: base pool + kvh stride_h           shape [blocks * block_size, HEAD_DIM]
                   (stride_b == block_size * stride_r: the pool's rows are consecutive), the
                   tile at key j0 is row table[j0 // block_size] * block_size + j0 % block_size

A paged tile reads one block only when block_size is a multiple of BLOCK_N; smaller blocks
(16 with BLOCK_N 64) gather their rows with pointer loads (sm90's TMA has no row gather).
The same body runs with pointer loads for every tile (``TMA`` False) where a layout does not
allow descriptors (strides not multiples of 16 bytes, a last stride other than 1), which is
also how the interpreter tests both paths. An fp8 pool (kv_dtype=fp8) is read the same way,
its e4m3 tiles converted to the compute dtype in registers (``fusegen.codegen.attention``).
Descriptors made on the device need a global
scratch slot each, which Triton takes from ``triton.set_allocator`` at launch
(``_set_tma_allocator``).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from fusegen.codegen.attention_common import (_TL_DTYPES, _dot_precision, _find_query_block,
                                              _key_stretches, _load_tile, _next_pow2, _tanh,
                                              _tile_mask, _zero_unowned_rows, head_dim_pad)


# ------------------------------------------------------------------------------------------
# device functions
# ------------------------------------------------------------------------------------------

@triton.jit
def _rows_source(base, rows, stride_row, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
                 D_PAD: tl.constexpr, TMA: tl.constexpr):
    """What tiles of rows [0, rows) of ``base`` are read from: a descriptor when TMA, else
    the pointer itself."""
    if TMA:
        src = tl.make_tensor_descriptor(base, shape=[rows, HEAD_DIM], strides=[stride_row, 1],
                                        block_shape=[BLOCK, D_PAD])
    else:
        src = base
    return src


@triton.jit
def _kv_tile(k_src, v_src, table, tile, key_end, stride_kb, stride_kr, stride_vb, stride_vr,
             PAGE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
             D_PAD: tl.constexpr, PAGED: tl.constexpr, MASKED: tl.constexpr,
             KV_TMA: tl.constexpr, DTYPE: tl.constexpr):
    """K and V rows j = tile + [0, BLOCK_N) as [BLOCK_N, D_PAD] tiles. Through a descriptor
    (KV_TMA) a paged tile lies in one pool block, whose rows past the sequence hold stale
    values: a masked tile zeroes them in V (their scores are masked, but 0 * NaN is not 0),
    converted to DTYPE first (an fp8 pool's e4m3 has no arithmetic). Pointer loads take rows
    out of range as 0 (MASKED tiles only) as ``_attend_tiles`` does."""
    j = tile + tl.arange(0, BLOCK_N)
    if KV_TMA:
        if PAGED:
            row = tl.load(table + tile // PAGE) * PAGE + tile % PAGE
        else:
            row = tile
        k = k_src.load([row, 0])
        v = v_src.load([row, 0])
        if PAGED and MASKED:
            v = tl.where((j < key_end)[:, None], v.to(DTYPE), 0.0)
    else:
        offs_d = tl.arange(0, D_PAD)
        if PAGED:
            if PAGE % BLOCK_N == 0:
                blk = tl.load(table + tile // PAGE).to(tl.int64)
                r = tile % PAGE + tl.arange(0, BLOCK_N)
            else:
                if MASKED:
                    blk = tl.load(table + j // PAGE, mask=j < key_end, other=0).to(tl.int64)
                else:
                    blk = tl.load(table + j // PAGE).to(tl.int64)
                r = j % PAGE
            k_rows = blk * stride_kb + r * stride_kr
            v_rows = blk * stride_vb + r * stride_vr
        else:
            k_rows = j.to(tl.int64) * stride_kr
            v_rows = j.to(tl.int64) * stride_vr
        in_range = j < key_end
        d_ok = offs_d < HEAD_DIM
        k = _load_tile(k_src + k_rows[:, None] + offs_d[None, :], in_range, d_ok, MASKED,
                       HEAD_DIM < D_PAD)
        v = _load_tile(v_src + v_rows[:, None] + offs_d[None, :], in_range, d_ok, MASKED,
                       HEAD_DIM < D_PAD)
    return k, v


@triton.jit
def _hopper_tiles(acc, l_i, m_i, q, pos, k_src, v_src, table, start, stop, key_end,
                  qk_scale, cap_scale, window, stride_kb, stride_kr, stride_vb, stride_vr,
                  PAGE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                  D_PAD: tl.constexpr, CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr,
                  PAGED: tl.constexpr, MASKED: tl.constexpr, KV_TMA: tl.constexpr,
                  WARP_SPECIALIZE: tl.constexpr, DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The online-softmax update of ``attention_common._attend_tiles`` (log2 units,
    FlashAttention-2 Algorithm 1) over key tiles [start, stop), with the loop handed to
    Triton's software pipeliner (loads of the next tiles in flight during this tile's math)
    and, when WARP_SPECIALIZE, its warp specialisation. An unmasked tile without softcap
    takes the row max of the raw scores and scales it (qk_scale > 0), so each score costs
    one fused multiply-add before exp2."""
    for tile in tl.range(start, stop, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        tile = tl.multiple_of(tile, BLOCK_N)
        k, v = _kv_tile(k_src, v_src, table, tile, key_end, stride_kb, stride_kr, stride_vb,
                        stride_vr, PAGE, BLOCK_N, HEAD_DIM, D_PAD, PAGED, MASKED, KV_TMA, DTYPE)
        qk = tl.dot(q, tl.trans(k.to(DTYPE)), input_precision=DOT_PRECISION)
        if MASKED or SOFTCAP:
            if SOFTCAP:
                s = _tanh(qk * qk_scale) * cap_scale
            else:
                s = qk * qk_scale
            if MASKED:
                j = tile + tl.arange(0, BLOCK_N)
                keep = (j < key_end)[None, :] & ((window == 0) | (pos[:, None] - j[None, :] < window))
                if CAUSAL:
                    keep = keep & (j[None, :] <= pos[:, None])
                s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet
            p = tl.exp2(s - m_safe[:, None])
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_safe = m_new
            p = tl.exp2(qk * qk_scale - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(DTYPE), v.to(DTYPE), acc=acc * alpha[:, None],
                     input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _hopper_block(q_src, o_dst, k_src, v_src, table, q_len, kv_len, m0, stride_qt, stride_ot,
                  stride_kb, stride_kr, stride_vb, stride_vr, qk_scale, cap_scale, window, v_scale,
                  PAGE: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                  SOFTCAP: tl.constexpr, PAGED: tl.constexpr, Q_TMA: tl.constexpr,
                  KV_TMA: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, QUANT: tl.constexpr,
                  DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Attention of query rows m0 .. m0 + BLOCK_M of one sequence and head (the formula of
    ``prefill_attention._flash_block``): Q and O rows relative to the sequence's first row,
    key tiles in the stretches of ``_key_stretches``, masked ones only at the window's
    start and at the diagonal. QUANT (an fp8 pool): the K scale is in qk_scale, ``v_scale``
    multiplies the output."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    row_ok = offs_m < q_len
    d_ok = offs_d < HEAD_DIM
    if Q_TMA:
        q = q_src.load([m0, 0])
    else:
        q = _load_tile(q_src + offs_m.to(tl.int64)[:, None] * stride_qt + offs_d[None, :],
                       row_ok, d_ok, True, HEAD_DIM < D_PAD)
    q = q.to(DTYPE)
    pos, lo, mid, tail, hi = _key_stretches(q_len, kv_len, m0, window, BLOCK_M, BLOCK_N, CAUSAL)

    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    acc, l_i, m_i = _hopper_tiles(acc, l_i, m_i, q, pos, k_src, v_src, table, lo, mid, kv_len,
                                  qk_scale, cap_scale, window, stride_kb, stride_kr, stride_vb,
                                  stride_vr, PAGE, BLOCK_N, HEAD_DIM, D_PAD, CAUSAL, SOFTCAP,
                                  PAGED, True, KV_TMA, False, DTYPE, DOT_PRECISION)
    acc, l_i, m_i = _hopper_tiles(acc, l_i, m_i, q, pos, k_src, v_src, table, mid, tail, kv_len,
                                  qk_scale, cap_scale, window, stride_kb, stride_kr, stride_vb,
                                  stride_vr, PAGE, BLOCK_N, HEAD_DIM, D_PAD, CAUSAL, SOFTCAP,
                                  PAGED, False, KV_TMA, WARP_SPECIALIZE, DTYPE, DOT_PRECISION)
    acc, l_i, m_i = _hopper_tiles(acc, l_i, m_i, q, pos, k_src, v_src, table, tail, hi, kv_len,
                                  qk_scale, cap_scale, window, stride_kb, stride_kr, stride_vb,
                                  stride_vr, PAGE, BLOCK_N, HEAD_DIM, D_PAD, CAUSAL, SOFTCAP,
                                  PAGED, True, KV_TMA, False, DTYPE, DOT_PRECISION)

    if QUANT:
        acc = acc * v_scale
    out = (acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]).to(DTYPE)
    if Q_TMA:
        o_dst.store([m0, 0], out)
    else:
        o_ptrs = o_dst + offs_m.to(tl.int64)[:, None] * stride_ot + offs_d[None, :]
        tl.store(o_ptrs, out, mask=_tile_mask(row_ok, d_ok, HEAD_DIM < D_PAD))


@triton.jit
def _dense_tile(t, num_m, heads, HEAD_GROUP: tl.constexpr):
    """(query block, batch x head) of tile t. Heads go in groups of HEAD_GROUP (the last one
    smaller), one group's tiles after another, and within a group the longest causal blocks
    of all its heads first:

        group 0: (block M-1, head 0) (M-1, 1) ... (M-1, 7) (M-2, 0) ... (0, 7)   group 1: ...

    so the programs running at once read the K/V of a few heads (they stay in L2) while the
    short diagonal blocks fill the end of each group; heads sharing a KV head are adjacent."""
    first = t // (HEAD_GROUP * num_m) * HEAD_GROUP
    size = tl.minimum(HEAD_GROUP, heads - first)
    r = t - first * num_m
    return num_m - 1 - r // size, first + r % size


@triton.jit
def _flash_hopper_kernel(Q, K, V, Out,
                         stride_qz, stride_qh, stride_qt, stride_kz, stride_kh, stride_kt,
                         stride_vz, stride_vh, stride_vt, stride_oz, stride_oh, stride_ot,
                         batch, num_heads, q_len, kv_len, qk_scale, cap_scale, window,
                         GROUP: tl.constexpr, HEAD_GROUP: tl.constexpr,
                         HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                         SOFTCAP: tl.constexpr, TMA: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
                         DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Dense attention of q [B, Hq, S, D] over k, v [B, Hkv, L, D] (last strides 1), tile t of
    cdiv(S, BLOCK_M) * B * Hq served by program t mod P (P programs, P = tiles unless
    persistent), in the order of ``_dense_tile``. Query head h reads KV head h // GROUP."""
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16, "tl.dot needs tiles of at least 16")
    tl.static_assert(D_PAD >= 16 and (D_PAD & (D_PAD - 1)) == 0 and D_PAD >= HEAD_DIM,
                     "D_PAD must be a power of two >= 16 covering HEAD_DIM")
    heads = batch * num_heads
    num_m = tl.cdiv(q_len, BLOCK_M)
    for t in range(tl.program_id(0), num_m * heads, tl.num_programs(0)):
        block_m, bh = _dense_tile(t, num_m, heads, HEAD_GROUP)
        z = (bh // num_heads).to(tl.int64)
        h = (bh % num_heads).to(tl.int64)
        kvh = h // GROUP
        q_src = _rows_source(Q + z * stride_qz + h * stride_qh, q_len, stride_qt, HEAD_DIM,
                             BLOCK_M, D_PAD, TMA)
        o_dst = _rows_source(Out + z * stride_oz + h * stride_oh, q_len, stride_ot, HEAD_DIM,
                             BLOCK_M, D_PAD, TMA)
        k_src = _rows_source(K + z * stride_kz + kvh * stride_kh, kv_len, stride_kt, HEAD_DIM,
                             BLOCK_N, D_PAD, TMA)
        v_src = _rows_source(V + z * stride_vz + kvh * stride_vh, kv_len, stride_vt, HEAD_DIM,
                             BLOCK_N, D_PAD, TMA)
        _hopper_block(q_src, o_dst, k_src, v_src, K, q_len, kv_len, block_m * BLOCK_M,
                      stride_qt, stride_ot, 0, stride_kt, 0, stride_vt,  # K: no block table
                      qk_scale, cap_scale, window, 1.0, 1, HEAD_DIM, D_PAD, BLOCK_M, BLOCK_N, CAUSAL,
                      SOFTCAP, False, TMA, TMA, WARP_SPECIALIZE, False, DTYPE, DOT_PRECISION)


@triton.jit
def _paged_hopper_kernel(Q, KPool, VPool, Out, BlockTables, SeqLens, QueryStartLoc, KScale, VScale,
                         stride_qh, stride_qt, stride_kh, stride_kb, stride_kr,
                         stride_vh, stride_vb, stride_vr, stride_oh, stride_ot, stride_bt,
                         num_seqs, num_tokens, pool_rows, qk_scale, cap_scale, window,
                         GROUP: tl.constexpr, PAGE: tl.constexpr, HEAD_DIM: tl.constexpr,
                         D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         SEQS_PAD: tl.constexpr, CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr,
                         Q_TMA: tl.constexpr, KV_TMA: tl.constexpr,
                         WARP_SPECIALIZE: tl.constexpr, QUANT: tl.constexpr, DTYPE: tl.constexpr,
                         DOT_PRECISION: tl.constexpr):
    """Paged attention of packed queries ([1, Hq, T, D], sequence n owns rows
    qsl[n]:qsl[n+1]), one program per (query head h = z G + x, packed tile y) of the grid
    (G, tiles, Hq / G), which the GPU dispatches x fastest: G heads' tiles longest first,
    then the next G heads (their K/V stay in L2, as in ``_dense_tile``). The packed tiles of
    ``prefill_attention._paged_prefill_kernel`` (``_find_query_block``, unowned rows zeroed
    past the owned tiles), keys through the sequence's block table. KV_TMA needs
    block_size % BLOCK_N == 0 and consecutive pool rows (pool_rows = blocks * block_size).
    QUANT: an fp8 pool, KScale / VScale [Hkv] its layer's scales."""
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16, "tl.dot needs tiles of at least 16")
    tl.static_assert(D_PAD >= 16 and (D_PAD & (D_PAD - 1)) == 0 and D_PAD >= HEAD_DIM,
                     "D_PAD must be a power of two >= 16 covering HEAD_DIM")
    tl.static_assert(not KV_TMA or PAGE % BLOCK_N == 0, "a TMA key tile must lie in one block")
    h = (tl.program_id(2) * tl.num_programs(0) + tl.program_id(0)).to(tl.int64)
    tile = tl.program_id(1)
    n, block_m, num_tiles = _find_query_block(QueryStartLoc, num_seqs, tile, BLOCK_M, SEQS_PAD)
    if tile >= num_tiles:
        _zero_unowned_rows(Out + h * stride_oh, tile - num_tiles, tl.load(QueryStartLoc),
                           tl.load(QueryStartLoc + num_seqs), num_tokens, stride_ot, 1,
                           BLOCK_M, HEAD_DIM, D_PAD)
        return
    q_first = tl.load(QueryStartLoc + n).to(tl.int64)
    q_len = tl.load(QueryStartLoc + n + 1) - q_first.to(tl.int32)
    kv_len = tl.load(SeqLens + n)
    kvh = h // GROUP
    v_scale = 1.0
    if QUANT:
        qk_scale = qk_scale * tl.load(KScale + kvh)
        v_scale = tl.load(VScale + kvh)
    q_src = _rows_source(Q + h * stride_qh + q_first * stride_qt, q_len, stride_qt, HEAD_DIM,
                         BLOCK_M, D_PAD, Q_TMA)
    o_dst = _rows_source(Out + h * stride_oh + q_first * stride_ot, q_len, stride_ot, HEAD_DIM,
                         BLOCK_M, D_PAD, Q_TMA)
    k_src = _rows_source(KPool + kvh * stride_kh, pool_rows, stride_kr, HEAD_DIM, BLOCK_N, D_PAD,
                         KV_TMA)
    v_src = _rows_source(VPool + kvh * stride_vh, pool_rows, stride_vr, HEAD_DIM, BLOCK_N, D_PAD,
                         KV_TMA)
    _hopper_block(q_src, o_dst, k_src, v_src, BlockTables + n.to(tl.int64) * stride_bt,
                  q_len, kv_len, block_m * BLOCK_M, stride_qt, stride_ot,
                  stride_kb, stride_kr, stride_vb, stride_vr, qk_scale, cap_scale, window, v_scale,
                  PAGE, HEAD_DIM, D_PAD, BLOCK_M, BLOCK_N, CAUSAL, SOFTCAP, True, Q_TMA, KV_TMA,
                  WARP_SPECIALIZE, QUANT, DTYPE, DOT_PRECISION)


# ------------------------------------------------------------------------------------------
# launchers (inputs checked by the wrappers in prefill_attention.py)
# ------------------------------------------------------------------------------------------

# Query heads whose tiles run together (K/V reuse in L2 against longest-first order); the
# paged grid takes gcd(Hq, HEAD_GROUP).
HEAD_GROUP = 8
# Programs per multiprocessor of a persistent launch (one 8-warp 128-row program fills an SM).
PERSISTENT_PROGRAMS_PER_SM = 1
# Under the interpreter a persistent launch runs this many programs (to test the striding).
INTERPRET_PROGRAMS = 3


def tma_layout_ok(*tensors: Tensor) -> bool:
    """Whether 2-D descriptors over rows of these tensors are legal: 16-byte aligned base, last
    stride 1, every other stride (of a dim longer than 1) a multiple of 16 bytes, so the row
    bases the kernels add up stay aligned too."""
    for t in tensors:
        size = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16:
            return False
        if any(n > 1 and (s * size) % 16 for n, s in zip(t.shape[:-1], t.stride()[:-1])):
            return False
    return True


def _tma_scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _set_tma_allocator() -> None:
    """Give Triton an allocator for the descriptors' scratch unless one is set. Triton keeps
    it in a context variable (per thread), so this runs before every TMA launch rather than
    once at import. Allocations in a CUDA-graph capture come from the graph's pool."""
    from triton.runtime import _allocation

    current = getattr(_allocation, "_allocator", None)
    if current is None or isinstance(current.get(), _allocation.NullAllocator):
        triton.set_allocator(_tma_scratch)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _programs(tiles: int, persistent: bool, device: torch.device) -> int:
    if not persistent:
        return tiles
    if device.type != "cuda" or _interpreting():
        return min(tiles, INTERPRET_PROGRAMS)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return min(tiles, sms * PERSISTENT_PROGRAMS_PER_SM)


def _common(q: Tensor, cfg: dict, softcap: float, causal: bool) -> dict:
    D = q.shape[-1]
    return dict(HEAD_DIM=D, D_PAD=head_dim_pad(D), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                CAUSAL=bool(causal), SOFTCAP=softcap > 0.0,
                WARP_SPECIALIZE=bool(cfg.get("warp_specialize", False)),
                DTYPE=_TL_DTYPES[q.dtype], DOT_PRECISION=_dot_precision(q.dtype),
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def launch_flash_hopper(q: Tensor, k: Tensor, v: Tensor, out: Tensor, qk_scale: float,
                        cap_scale: float, causal: bool, window: int, softcap: float,
                        cfg: dict) -> None:
    """``_flash_hopper_kernel`` on checked inputs (last strides 1); ``cfg``: BLOCK_M, BLOCK_N,
    num_warps, num_stages, and optionally tma, persistent, warp_specialize."""
    B, Hq, S, _ = q.shape
    tma = cfg.get("tma", True) and tma_layout_ok(q, k, v, out)
    if tma and q.is_cuda:
        _set_tma_allocator()
    tiles = triton.cdiv(S, cfg["BLOCK_M"]) * B * Hq
    grid = (_programs(tiles, cfg.get("persistent", False), q.device),)
    _flash_hopper_kernel[grid](
        q, k, v, out, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        B, Hq, S, k.shape[2], qk_scale, cap_scale, window,
        GROUP=Hq // k.shape[1], HEAD_GROUP=HEAD_GROUP, TMA=tma, **_common(q, cfg, softcap, causal))


def launch_paged_hopper(q: Tensor, kv_pool: Tensor, layer: int, block_tables: Tensor,
                        seq_lens: Tensor, query_start_loc: Tensor, out: Tensor, qk_scale: float,
                        cap_scale: float, causal: bool, window: int, softcap: float,
                        kv_scales, cfg: dict, grid_tiles: int) -> None:
    """``_paged_hopper_kernel`` on checked inputs over ``grid_tiles`` packed tiles per head
    (``prefill_attention.paged_prefill_grid``); ``kv_scales``: an fp8 pool's, else None."""
    Hq, T = q.shape[1], q.shape[2]
    num_blocks, page, hkv = kv_pool.shape[2], kv_pool.shape[3], kv_pool.shape[4]
    N = seq_lens.numel()
    k_pool, v_pool = kv_pool[layer, 0], kv_pool[layer, 1]  # [blocks, block_size, Hkv, D]
    kb, kr, kh, _ = k_pool.stride()
    vb, vr, vh, _ = v_pool.stride()
    tma = cfg.get("tma", True)
    q_tma = tma and tma_layout_ok(q, out)
    kv_tma = (tma and page % cfg["BLOCK_N"] == 0 and kb == page * kr and vb == page * vr
              and tma_layout_ok(k_pool, v_pool))
    if (q_tma or kv_tma) and q.is_cuda:
        _set_tma_allocator()
    group = math.gcd(Hq, HEAD_GROUP)
    quant = kv_scales is not None
    k_scale, v_scale = (kv_scales[layer, 0], kv_scales[layer, 1]) if quant else (seq_lens, seq_lens)
    _paged_hopper_kernel[(group, grid_tiles, Hq // group)](
        q, k_pool, v_pool, out, block_tables, seq_lens, query_start_loc, k_scale, v_scale,
        q.stride(1), q.stride(2), kh, kb, kr, vh, vb, vr, out.stride(1), out.stride(2),
        block_tables.stride(0), N, T, num_blocks * page, qk_scale, cap_scale, window,
        GROUP=Hq // hkv, PAGE=page, SEQS_PAD=_next_pow2(max(N, 1)), Q_TMA=q_tma, KV_TMA=kv_tma,
        QUANT=quant, **_common(q, cfg, softcap, causal))
