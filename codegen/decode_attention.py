"""Split-KV paged decode attention (Flash-Decoding), the ``T == N`` path of
``fusegen.codegen.attention.paged_attention``.

    launch_decode         _decode_split_kernel, grid (T, Hkv, NUM_SPLITS); with NUM_SPLITS > 1
                          the last split of each (token, KV head) to finish combines the
                          partials (FUSED_REDUCE); without it _decode_reduce_kernel,
                          grid (T, Hq), combines them in a second launch

One program serves one token and one KV head: the GROUP query heads of that KV head are the
rows of its tile, so each K/V tile is read once per group. A token's visible keys are cut
into NUM_SPLITS ranges, each written as a partial (o_s, lse_s) to float32 buffers

    part_out [T, Hq, NUM_SPLITS, HEAD_DIM]    part_lse [T, Hq, NUM_SPLITS]

(real head dim, padded columns masked off) which the reduction combines. The split count
comes from shapes only (``decode_num_splits``), so the launch can be captured in a CUDA graph.

Fused reduction: a token's keys fill only the first n_used = cdiv(keys, per_split) splits
(one, for a short context under a graph captured for the longest). With n_used <= 1 split 0
writes O itself and nothing else is stored; otherwise every used split stores its partial and
takes a ticket from a per-(token, KV head) counter,

    Tickets [T, Hkv] int32        0 between launches: the last taker resets its own

and the program that draws ticket n_used - 1 (every other partial is stored by then) combines
the n_used partials into O. One launch per layer instead of two.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from fusegen.codegen.attention_common import (_TL_DTYPES, _attend_tiles, _dot_precision, _fail,
                                              _load_tile, _next_pow2, _prev_pow2, _tile_mask,
                                              head_dim_pad)
from fusegen.codegen.launch import pdl, ticket_counters

# Split-KV decode: a split gets at least this many keys (one BLOCK_N tile), and the split
# count aims at DECODE_PROGRAMS_PER_SM programs per multiprocessor while the (token, KV head)
# programs alone fill less than one wave, and at half as many once they fill one.
DECODE_MIN_KEYS_PER_SPLIT = 64
DECODE_MAX_SPLITS = 64
DECODE_PROGRAMS_PER_SM = 4
# The fused reduction reads a head's partials DECODE_SPLIT_CHUNK splits at a time.
DECODE_SPLIT_CHUNK = 16


@triton.jit
def _decode_split_kernel(Q, KPool, VPool, Out, PartOut, PartLse, Tickets, BlockTables, SeqLens,
                         QueryStartLoc, KScale, VScale,
                         stride_qh, stride_qt, stride_qd,
                         stride_kh, stride_kb, stride_kr, stride_kd,
                         stride_oh, stride_ot, stride_od,
                         stride_pt, stride_ph, stride_ps, stride_lt, stride_lh,
                         stride_bt, num_seqs, qk_scale, cap_scale, window,
                         GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, PAGE: tl.constexpr,
                         HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                         NUM_SPLITS: tl.constexpr, SEQS_PAD: tl.constexpr,
                         CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr, QUANT: tl.constexpr,
                         FUSED_REDUCE: tl.constexpr, SPLIT_CHUNK: tl.constexpr,
                         DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_GDC: tl.constexpr):
    """Flash-Decoding (Dao, Haziza, Massa, Sizov 2023), split step, for one (token t, KV head,
    split): the GROUP query heads sharing the KV head form the rows of one [GROUP_PAD, D_PAD]
    tile, so each K/V tile is read once for the whole group.

    The token's visible keys [lo, hi) (lo rounded down to a tile) are cut into NUM_SPLITS
    ranges of equal size (a multiple of BLOCK_N); this program writes, for its range R,
        o_s = sum_{j in R} 2^(s_j - m_s) V_j / l_s,   lse_s = m_s + log2 l_s  (log2 units),
    an empty range giving o_s = 0 (not stored), lse_s = -inf. With NUM_SPLITS == 1 it writes
    O directly. FUSED_REDUCE: only the n_used non-empty ranges store partials, the last of them
    to finish combines them (``_combine_splits``), and with n_used <= 1 split 0 writes O
    directly (zeros for a token with no keys).
    Each packed token finds its own sequence (the n with qsl[n] <= t < qsl[n+1]) and its
    position, so any batch with T == N tokens is handled, not only one query per sequence;
    tokens no sequence owns come out as zeros.

    QUANT (an fp8 pool): K and V tiles load as e4m3 and convert to DTYPE exactly; the KV
    head's K scale multiplies qk_scale (q.k = k_scale q.k8) and its V scale the output
    (sum_j p_j V_j = v_scale sum_j p_j V8_j), so nothing per element is rescaled.
    """
    if USE_GDC:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    tl.static_assert(GROUP_PAD >= 16 and GROUP_PAD >= GROUP, "query-head tile needs >= 16 rows")
    tl.static_assert(BLOCK_N >= 16, "tl.dot needs tiles of at least 16")
    tl.static_assert((NUM_SPLITS & (NUM_SPLITS - 1)) == 0, "split count must be a power of two")
    tl.static_assert(D_PAD >= 16 and (D_PAD & (D_PAD - 1)) == 0 and D_PAD >= HEAD_DIM,
                     "D_PAD must be a power of two >= 16 covering HEAD_DIM")
    t = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    if QUANT:
        qk_scale = qk_scale * tl.load(KScale + kvh)

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
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    t64 = t.to(tl.int64)
    q = _load_tile(Q + heads[:, None] * stride_qh + t64 * stride_qt + offs_d[None, :] * stride_qd,
                   head_ok, d_ok, True, HEAD_DIM < D_PAD).to(DTYPE)
    pos = tl.zeros([GROUP_PAD], dtype=tl.int32) + p
    table = BlockTables + n.to(tl.int64) * stride_bt
    k_base = KPool + kvh.to(tl.int64) * stride_kh
    v_base = VPool + kvh.to(tl.int64) * stride_kh
    acc = tl.zeros([GROUP_PAD, D_PAD], dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    acc, l_i, m_i = _attend_tiles(acc, l_i, m_i, q, pos, k_base, v_base, table, start, mid,
                                  stop, qk_scale, cap_scale, window, stride_kb, stride_kr,
                                  stride_kd, stride_kb, stride_kr, stride_kd, PAGE, BLOCK_N,
                                  HEAD_DIM, D_PAD, CAUSAL, SOFTCAP, True, True, DTYPE,
                                  DOT_PRECISION)
    acc, l_i, m_i = _attend_tiles(acc, l_i, m_i, q, pos, k_base, v_base, table, mid, full_stop,
                                  stop, qk_scale, cap_scale, window, stride_kb, stride_kr,
                                  stride_kd, stride_kb, stride_kr, stride_kd, PAGE, BLOCK_N,
                                  HEAD_DIM, D_PAD, CAUSAL, SOFTCAP, True, False, DTYPE,
                                  DOT_PRECISION)
    acc, l_i, m_i = _attend_tiles(acc, l_i, m_i, q, pos, k_base, v_base, table, full_stop, stop,
                                  stop, qk_scale, cap_scale, window, stride_kb, stride_kr,
                                  stride_kd, stride_kb, stride_kr, stride_kd, PAGE, BLOCK_N,
                                  HEAD_DIM, D_PAD, CAUSAL, SOFTCAP, True, True, DTYPE,
                                  DOT_PRECISION)

    if QUANT:
        acc = acc * tl.load(VScale + kvh)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    mask = _tile_mask(head_ok, d_ok, HEAD_DIM < D_PAD)
    o_ptrs = Out + heads[:, None] * stride_oh + t64 * stride_ot + offs_d[None, :] * stride_od
    lse = tl.where(l_i > 0.0, m_i + tl.log2(tl.where(l_i > 0.0, l_i, 1.0)), float("-inf"))
    part_ptrs = PartOut + t64 * stride_pt + heads[:, None] * stride_ph + split * stride_ps + offs_d[None, :]
    lse_ptrs = PartLse + t64 * stride_lt + heads * stride_lh + split
    if NUM_SPLITS == 1:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=mask)
    elif FUSED_REDUCE:
        n_used = tl.cdiv(hi - lo_tile, tl.maximum(per_split, 1))
        if n_used <= 1:
            if split == 0:
                tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=mask)
        elif split < n_used:
            tl.store(part_ptrs, out, mask=mask)
            tl.store(lse_ptrs, lse, mask=head_ok)
            tl.debug_barrier()  # every thread's partial is stored before the ticket is taken
            ticket_ptr = Tickets + t64 * tl.num_programs(1) + kvh
            ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel", scope="gpu")
            if ticket == n_used - 1:
                _combine_splits(PartOut + t64 * stride_pt, PartLse + t64 * stride_lt,
                                Out + t64 * stride_ot, kvh, n_used, stride_ph, stride_ps,
                                stride_lh, stride_oh, stride_od, GROUP, NUM_SPLITS, SPLIT_CHUNK,
                                HEAD_DIM, D_PAD)
                tl.atomic_xchg(ticket_ptr, 0)  # ready for the next launch
    else:
        # an empty range stores only its lse = -inf: the reduction does not read its o_s
        nonempty = (g * 0 + stop > start)[:, None]
        tl.store(part_ptrs, out, mask=mask & nonempty)
        tl.store(lse_ptrs, lse, mask=head_ok)


@triton.jit
def _combine_head(PartOut, PartLse, Out, head, n_used, stride_ph, stride_ps, stride_lh,
                  stride_oh, stride_od, NUM_SPLITS: tl.constexpr, SPLIT_CHUNK: tl.constexpr,
                  HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
    """O[head] = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M) over the n_used stored splits,
    M = max_s lse_s (every used split saw at least one key, so M is finite). Partials are
    read from L2 (``.cg``): other multiprocessors wrote them."""
    offs_s = tl.arange(0, NUM_SPLITS)
    offs_c = tl.arange(0, SPLIT_CHUNK)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    lse_head = PartLse + head * stride_lh
    lse = tl.load(lse_head + offs_s, mask=offs_s < n_used, other=float("-inf"), cache_modifier=".cg")
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    total = tl.sum(tl.exp2(lse - m), 0)
    acc = tl.zeros([D_PAD], dtype=tl.float32)
    for c in tl.static_range(NUM_SPLITS // SPLIT_CHUNK):
        s = c * SPLIT_CHUNK + offs_c
        used = s < n_used
        w = tl.exp2(tl.load(lse_head + s, mask=used, other=float("-inf"), cache_modifier=".cg") - m)
        o = tl.load(PartOut + head * stride_ph + s[:, None] * stride_ps + offs_d[None, :],
                    mask=used[:, None] & d_ok[None, :], other=0.0, cache_modifier=".cg")
        acc += tl.sum(o * w[:, None], 0)
    out = acc / tl.where(total == 0.0, 1.0, total)
    tl.store(Out + head * stride_oh + offs_d * stride_od, out.to(Out.dtype.element_ty), mask=d_ok)


@triton.jit
def _combine_splits(PartOut, PartLse, Out, kvh, n_used, stride_ph, stride_ps, stride_lh,
                    stride_oh, stride_od, GROUP: tl.constexpr, NUM_SPLITS: tl.constexpr,
                    SPLIT_CHUNK: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
    """The fused reduction of one (token, KV head): ``_combine_head`` for each of its GROUP
    query heads (pointers already at the token), unrolled up to 8 heads so that their loads
    are in flight together."""
    tl.static_assert(NUM_SPLITS % SPLIT_CHUNK == 0, "SPLIT_CHUNK must divide NUM_SPLITS")
    if GROUP <= 8:
        for g in tl.static_range(GROUP):
            _combine_head(PartOut, PartLse, Out, kvh * GROUP + g, n_used, stride_ph, stride_ps,
                          stride_lh, stride_oh, stride_od, NUM_SPLITS, SPLIT_CHUNK, HEAD_DIM, D_PAD)
    else:
        for g in range(GROUP):
            _combine_head(PartOut, PartLse, Out, kvh * GROUP + g, n_used, stride_ph, stride_ps,
                          stride_lh, stride_oh, stride_od, NUM_SPLITS, SPLIT_CHUNK, HEAD_DIM, D_PAD)


@triton.jit
def _decode_reduce_kernel(PartOut, PartLse, Out, stride_pt, stride_ph, stride_ps,
                          stride_lt, stride_lh, stride_oh, stride_ot, stride_od,
                          NUM_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                          USE_GDC: tl.constexpr):
    """Flash-Decoding reduction (Dao et al. 2023) for one (token, query head):

        M = max_s lse_s,  w_s = 2^(lse_s - M),  O = sum_s w_s o_s / sum_s w_s
    (O = 0 when every split was empty, i.e. all lse_s = -inf). Columns HEAD_DIM..D_PAD of
    the tile are padding: not read, not stored. o_s of an empty split (lse_s = -inf) is not
    read either: the split kernel did not store it, and its weight is 0.
    """
    if USE_GDC:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    tl.static_assert((NUM_SPLITS & (NUM_SPLITS - 1)) == 0, "split count must be a power of two")
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    s = tl.arange(0, NUM_SPLITS)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    lse = tl.load(PartLse + t * stride_lt + h * stride_lh + s)
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)
    part_ptrs = PartOut + t * stride_pt + h * stride_ph + s[:, None] * stride_ps + offs_d[None, :]
    # empty splits (lse = -inf, weight 0) stored no o_s: read as the 0 they stand for, so a
    # short context reads its few partials, not NUM_SPLITS of them
    used = (lse > float("-inf"))[:, None]
    o = tl.load(part_ptrs, mask=used & d_ok[None, :] if HEAD_DIM < D_PAD else used, other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(o * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    o_ptrs = Out + h * stride_oh + t * stride_ot + offs_d * stride_od
    if HEAD_DIM < D_PAD:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=d_ok)
    else:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty))


def default_decode_config(head_dim: int, on_cuda: bool) -> dict:
    """Tiles of _decode_split_kernel, chosen by the padded head dim (80 and 96 run as 128).
    H200, bf16 GQA 32/8 D128, block_size 16, CUDA graph: BLOCK_N 32/128 and 4/8 warps were
    within 3% of this everywhere but B32 L4k (BLOCK_N 128, 4 warps, no split: +1%)."""
    if not on_cuda:
        return dict(BLOCK_N=16, num_warps=1, num_stages=1)
    return dict(BLOCK_N=64 if head_dim_pad(head_dim) <= 128 else 32, num_warps=2, num_stages=3)


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def decode_num_splits(num_tokens: int, kv_heads: int, max_keys: int, multiprocessors: int) -> int:
    """Split count from shapes only, so the launch can be captured: about
    DECODE_PROGRAMS_PER_SM (token, KV head, split) programs per multiprocessor (half that
    when the tokens' KV heads already make one wave), no split shorter than
    DECODE_MIN_KEYS_PER_SPLIT keys of the longest possible context ``max_keys``
    (block_tables width * block_size), rounded down to a power of two.

    Chosen from a sweep on the H200 (132 SMs, bf16 GQA 32/8, block 16, CUDA-graph replays,
    splits 1..128 x BLOCK_N 32/64/128 x 2..8 warps): at batch 1 and short contexts the
    kernel is latency-bound (B1 L1024 D64 takes 10.9 us with 16 splits, 15.2 us with the
    earlier 256-keys minimum's 4), so short contexts split down to one tile. Against the
    earlier rule: B1 L4096 D64 14.7 us (was 16.3), B8 L1024 16.7 (17.9), B1 L32k D128 52.3
    (54.2), B1 L8k 24.4 (24.0); every shape swept is within 7% of the sweep's best point
    (bench/schedule_sweep.py, bench/results/schedule_sweep.json)."""
    programs = max(1, num_tokens * kv_heads)
    per_sm = DECODE_PROGRAMS_PER_SM if programs < multiprocessors else DECODE_PROGRAMS_PER_SM // 2
    want = triton.cdiv(per_sm * multiprocessors, programs)
    by_length = triton.cdiv(max(1, max_keys), DECODE_MIN_KEYS_PER_SPLIT)
    return min(_prev_pow2(min(want, by_length)), DECODE_MAX_SPLITS)


def launch_decode(q: Tensor, kv_pool: Tensor, layer: int, block_tables: Tensor, seq_lens: Tensor,
                  query_start_loc: Tensor, out: Tensor, qk_scale: float, cap_scale: float,
                  causal: bool, window: int, softcap: float, num_splits, kv_scales=None,
                  fused_reduce: bool = True) -> None:
    """Decode attention of T == N packed tokens into ``out``; inputs already checked by
    ``paged_attention`` (``kv_scales``: an fp8 pool's). ``num_splits`` None:
    ``decode_num_splits`` from the shapes. ``fused_reduce`` False: the partials are combined
    by ``_decode_reduce_kernel``, a second launch (kept to compare against)."""
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
    fused_reduce = fused_reduce and num_splits > 1
    tickets = ticket_counters(q.device, T * hkv) if fused_reduce else seq_lens
    quant = kv_scales is not None
    k_scale, v_scale = (kv_scales[layer, 0], kv_scales[layer, 1]) if quant else (seq_lens, seq_lens)
    _decode_split_kernel[(T, hkv, num_splits)](
        q, k_pool, v_pool, out, part_out, part_lse, tickets, block_tables, seq_lens, query_start_loc,
        k_scale, v_scale,
        q.stride(1), q.stride(2), q.stride(3),
        kh, kb, kr, kd,
        out.stride(1), out.stride(2), out.stride(3),
        Hq * num_splits * D, num_splits * D, D, Hq * num_splits, num_splits,
        block_tables.stride(0), N, qk_scale, cap_scale, window,
        GROUP=group, GROUP_PAD=max(16, _next_pow2(group)), PAGE=page, HEAD_DIM=D,
        D_PAD=head_dim_pad(D), BLOCK_N=cfg["BLOCK_N"], NUM_SPLITS=num_splits,
        SEQS_PAD=_next_pow2(N + 1), CAUSAL=bool(causal), SOFTCAP=softcap > 0.0, QUANT=quant,
        FUSED_REDUCE=fused_reduce, SPLIT_CHUNK=min(num_splits, DECODE_SPLIT_CHUNK),
        DTYPE=_TL_DTYPES[q.dtype], DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **pdl(q))
    if num_splits > 1 and not fused_reduce:
        _decode_reduce_kernel[(T, Hq)](
            part_out, part_lse, out,
            Hq * num_splits * D, num_splits * D, D, Hq * num_splits, num_splits,
            out.stride(1), out.stride(2), out.stride(3),
            NUM_SPLITS=num_splits, HEAD_DIM=D, D_PAD=head_dim_pad(D),
            num_warps=4 if q.is_cuda else 1, **pdl(q))
