"""Prefill attention: dense ``flash_attention`` and the packed paged prefill
(``launch_paged_prefill``, the T != N path of ``fusegen.codegen.attention.paged_attention``).
The masking rule and the paged layout are described in ``fusegen.codegen.attention``.

    flash_attention        Hopper: prefill_hopper._flash_hopper_kernel
                           FA2:    _flash_fwd_kernel, grid (query blocks, B, Hq)
    launch_paged_prefill   Hopper: prefill_hopper._paged_hopper_kernel
                           FA2:    _paged_prefill_kernel, grid paged_prefill_grid(T, N, BLOCK_M, Hq)

The FlashAttention-2 (FA2) kernels here run ``_flash_block`` on one block of query rows, on
any device; which kernel and tiles a call runs comes from ``config=`` through
``prefill_tuning.resolve_config`` (by default the Hopper kernel, tuned, on sm90+ in 16 bits).
"""

from __future__ import annotations

from typing import Union

import torch
import triton
import triton.language as tl
from torch import Tensor

from fusegen.codegen import prefill_hopper
from fusegen.codegen.attention_common import (_TL_DTYPES, _attend_tiles, _check_attention_dtype,
                                              _check_head_dim, _check_same_device, _device_guard,
                                              _dot_precision, _fail, _find_query_block, _key_stretches,
                                              _load_tile, _next_pow2, _scales, _tile_mask,
                                              _zero_unowned_rows, head_dim_pad)
from fusegen.codegen.prefill_tuning import resolve_config, tuning_key

@triton.jit
def _flash_block(q_head, o_head, k_head, v_head, table, q_first, q_len, kv_len, m0,
                 stride_qt, stride_qd, stride_ot, stride_od,
                 stride_kb, stride_kr, stride_kd, stride_vb, stride_vr, stride_vd,
                 qk_scale, cap_scale, window, v_scale,
                 PAGE: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                 SOFTCAP: tl.constexpr, PAGED: tl.constexpr, QUANT: tl.constexpr, DTYPE: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """FlashAttention-2 forward (Dao 2023) of query rows m0 .. m0 + BLOCK_M of one sequence
    and one head (rows q_first + i of q_head / o_head, i < q_len; keys of k_head, v_head,
    through ``table`` when PAGED):

        O_i = sum_j softmax_j(s_ij) V_j,   s_ij = scale q_i.k_j (tanh-capped when SOFTCAP),
        over the keys j query i may see; rows without keys are 0.

    Key tiles run in the three stretches of ``_key_stretches``: masked tiles at the window's
    start, unmasked tiles that every row of the block sees whole, masked tiles at the causal
    diagonal; tiles outside the union of the block's rows' ranges are skipped. QUANT (an fp8
    pool): K and V load as e4m3, their K scale is already in qk_scale and ``v_scale``
    multiplies the output.
    """
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < q_len
    rows = (q_first + offs_m).to(tl.int64)
    q = _load_tile(q_head + rows[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                   row_ok, d_ok, True, HEAD_DIM < D_PAD).to(DTYPE)

    pos, lo, mid, tail, hi = _key_stretches(q_len, kv_len, m0, window, BLOCK_M, BLOCK_N, CAUSAL)

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

    if QUANT:
        acc = acc * v_scale
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
                 qk_scale, cap_scale, window, 1.0, 1, HEAD_DIM, D_PAD, BLOCK_M, BLOCK_N, CAUSAL,
                 SOFTCAP, False, False, DTYPE, DOT_PRECISION)


@triton.jit
def _paged_prefill_kernel(Q, KPool, VPool, Out, BlockTables, SeqLens, QueryStartLoc, KScale, VScale,
                          stride_qh, stride_qt, stride_qd,
                          stride_kh, stride_kb, stride_kr, stride_kd,
                          stride_vh, stride_vb, stride_vr, stride_vd,
                          stride_oh, stride_ot, stride_od, stride_bt,
                          num_seqs, num_tokens, qk_scale, cap_scale, window,
                          GROUP: tl.constexpr, PAGE: tl.constexpr, HEAD_DIM: tl.constexpr,
                          D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          SEQS_PAD: tl.constexpr, CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr,
                          QUANT: tl.constexpr, DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Paged attention of packed queries ([1, Hq, T, D], sequence n owns rows
    qsl[n]:qsl[n+1]) over keys gathered through each sequence's block table, one program per
    (packed tile, query head h): an owned tile (``_find_query_block``) runs ``_flash_block``
    with KV head h // GROUP; a tile past the owned ones zeroes unowned rows instead. QUANT:
    an fp8 pool, KScale / VScale [Hkv] its layer's scales (folded as in the decode kernel).
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
    v_scale = 1.0
    if QUANT:
        qk_scale = qk_scale * tl.load(KScale + kvh)
        v_scale = tl.load(VScale + kvh)
    _flash_block(Q + h * stride_qh, o_head, KPool + kvh * stride_kh, VPool + kvh * stride_vh,
                 BlockTables + n.to(tl.int64) * stride_bt, q_first, q_len, kv_len,
                 block_m * BLOCK_M, stride_qt, stride_qd, stride_ot, stride_od,
                 stride_kb, stride_kr, stride_kd, stride_vb, stride_vr, stride_vd,
                 qk_scale, cap_scale, window, v_scale, PAGE, HEAD_DIM, D_PAD, BLOCK_M, BLOCK_N, CAUSAL,
                 SOFTCAP, True, QUANT, DTYPE, DOT_PRECISION)


def paged_prefill_grid(num_tokens: int, num_seqs: int, block_m: int, q_heads: int) -> tuple:
    """(tiles, heads): sum_n cdiv(q_len_n, BLOCK_M) owned tiles plus the tiles of unowned rows
    never exceed cdiv(T, BLOCK_M) + N, as each of the N + 1 stretches (N sequences, unowned
    rows) rounds up by less than one tile."""
    return (triton.cdiv(num_tokens, block_m) + num_seqs, q_heads)


def launch_paged_prefill(q, kv_pool, layer, block_tables, seq_lens, query_start_loc, out, scale,
                         qk_scale, cap_scale, causal, window, softcap, config, kv_scales=None) -> None:
    """The T != N path of ``paged_attention`` on checked inputs: the Hopper kernel or
    ``_paged_prefill_kernel``, as ``prefill_tuning.resolve_config`` picks from ``config``
    (``kv_scales``: an fp8 pool's)."""
    Hq, T = q.shape[1], q.shape[2]
    page, hkv = kv_pool.shape[3], kv_pool.shape[4]
    N = seq_lens.numel()
    run_args = (q, kv_pool, layer, block_tables, seq_lens, query_start_loc, out, qk_scale,
                cap_scale, causal, window, softcap, kv_scales)

    def launch(cfg):
        grid_tiles = paged_prefill_grid(T, N, cfg["BLOCK_M"], Hq)[0]
        if cfg.get("kernel") == "hopper":
            prefill_hopper.launch_paged_hopper(*run_args, cfg, grid_tiles)
        else:
            _launch_paged_fa2(*run_args, cfg, grid_tiles)

    key = tuning_key("paged", q, Hq // hkv, causal, window, softcap, T, kv_pool.shape[2] * page, N, page)
    if kv_scales is not None:
        key += " kv-fp8"   # tiles tuned for another pool dtype are another choice
    launch(resolve_config("paged_attention", config, q, scale, (kv_pool,), key, launch))


def _launch_paged_fa2(q, kv_pool, layer, block_tables, seq_lens, query_start_loc, out, qk_scale,
                      cap_scale, causal, window, softcap, kv_scales, cfg, grid_tiles) -> None:
    Hq, T, D = q.shape[1], q.shape[2], q.shape[3]
    page, hkv = kv_pool.shape[3], kv_pool.shape[4]
    N = seq_lens.numel()
    k_pool, v_pool = kv_pool[layer, 0], kv_pool[layer, 1]  # [blocks, block_size, Hkv, D]
    kb, kr, kh, kd = k_pool.stride()
    vb, vr, vh, vd = v_pool.stride()
    quant = kv_scales is not None
    k_scale, v_scale = (kv_scales[layer, 0], kv_scales[layer, 1]) if quant else (seq_lens, seq_lens)
    _paged_prefill_kernel[(grid_tiles, Hq)](
        q, k_pool, v_pool, out, block_tables, seq_lens, query_start_loc, k_scale, v_scale,
        q.stride(1), q.stride(2), q.stride(3),
        kh, kb, kr, kd,
        vh, vb, vr, vd,
        out.stride(1), out.stride(2), out.stride(3), block_tables.stride(0),
        N, T, qk_scale, cap_scale, window,
        GROUP=Hq // hkv, PAGE=page, HEAD_DIM=D, D_PAD=head_dim_pad(D),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], SEQS_PAD=_next_pow2(max(N, 1)),
        CAUSAL=bool(causal), SOFTCAP=softcap > 0.0, QUANT=quant, DTYPE=_TL_DTYPES[q.dtype],
        DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def flash_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool, window: int = 0,
                    softcap: float = 0.0, *, config: Union[None, str, dict] = None) -> Tensor:
    """Dense attention of q [B, Hq, S, D] over k, v [B, Hkv, L, D] (S <= L, queries are the last
    S positions; GQA without expanding K/V); same result as ``fusegen.ops.attention`` with
    ``key_mask=None``. ``config``: None (the kernel and tiles ``prefill_tuning`` picks), "fa2",
    "hopper", a PREFILL_CONFIGS name or a dict of its keys."""
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
    qk_scale, cap_scale = _scales(scale, softcap)

    def launch(cfg):
        if cfg.get("kernel") == "hopper":
            prefill_hopper.launch_flash_hopper(q, k, v, out, qk_scale, cap_scale, causal, window,
                                               softcap, cfg)
        else:
            _launch_flash_fa2(q, k, v, out, qk_scale, cap_scale, causal, window, softcap, cfg)

    with _device_guard(q):
        key = tuning_key("dense", q, Hq // hkv, causal, window, softcap, S, L, B * Hq)
        launch(resolve_config(op, config, q, scale, (k, v), key, launch))
    return out


def _launch_flash_fa2(q, k, v, out, qk_scale, cap_scale, causal, window, softcap, cfg) -> None:
    B, Hq, S, D = q.shape
    grid = (triton.cdiv(S, cfg["BLOCK_M"]), B, Hq)
    _flash_fwd_kernel[grid](
        q, k, v, out, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        S, k.shape[2], qk_scale, cap_scale, window,
        GROUP=Hq // k.shape[1], HEAD_DIM=D, D_PAD=head_dim_pad(D), BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"], CAUSAL=bool(causal), SOFTCAP=softcap > 0.0,
        DTYPE=_TL_DTYPES[q.dtype], DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
