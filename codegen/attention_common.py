"""What the prefill (``prefill_attention.py``, ``prefill_hopper.py``) and decode
(``decode_attention.py``) kernels share: the online-softmax loop over key tiles, the key
stretches of a query block, paged row addressing, the packed-tile lookup of paged prefill,
head-dim padding, and the wrappers' input checks.

Head dims. A kernel takes the real head dim ``HEAD_DIM`` and a padded ``D_PAD`` (the next
power of two, at least 16, as ``tl.arange`` and ``tl.dot`` need). Loads of the padded columns
are masked to 0, so they add nothing to q.k and come out as zero columns of the output, which
are never stored:

    d       0 ............. 79 | 80 ...... 127       HEAD_DIM 80, D_PAD 128
    q, k, v loaded             | 0 (masked)
    out     stored             | 0, not stored

Served: every multiple of 8 from 8 to 256 (``check_head_dim``). Multiples of 8 keep every row
16-byte aligned in 16-bit dtypes, and the column mask constant over 8 columns, so loads stay
vectorised; above 256 the fp32 accumulator tile and the K/V tiles no longer fit one program.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor

from fusegen.kv import FP8

LOG2E = 1.4426950408889634

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}

HEAD_DIM_MULTIPLE = 8
MAX_HEAD_DIM = 256


# ------------------------------------------------------------------------------------------
# device functions
# ------------------------------------------------------------------------------------------

@triton.jit
def _tanh(x):
    # tanh(x) = 1 - 2 / (exp(2x) + 1); exp2 overflowing to inf still gives +-1.
    return 1.0 - 2.0 / (tl.exp2(x * 2.8853900817779268) + 1.0)


@triton.jit
def _load_tile(ptrs, rows_ok, cols_ok, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    """tl.load of a [rows, cols] tile, 0 where a masked row or column is out of range; the
    masks are constexpr-chosen so that a full tile (head dim a power of two) loads unmasked."""
    if MASK_ROWS and MASK_COLS:
        x = tl.load(ptrs, mask=rows_ok[:, None] & cols_ok[None, :], other=0.0)
    elif MASK_ROWS:
        x = tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
    elif MASK_COLS:
        x = tl.load(ptrs, mask=cols_ok[None, :], other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _tile_mask(rows_ok, cols_ok, MASK_COLS: tl.constexpr):
    """Store mask of a [rows, cols] tile: its rows, and its columns when they are padded."""
    if MASK_COLS:
        mask = rows_ok[:, None] & cols_ok[None, :]
    else:
        mask = rows_ok[:, None]
    return mask


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
def _key_stretches(q_len, kv_len, m0, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr):
    """(pos, lo, mid, tail, hi) for query rows m0 .. m0 + BLOCK_M of a sequence of q_len
    queries over kv_len keys: pos = the rows' positions, and the key tiles (starting at
    multiples of BLOCK_N) in three stretches, masked [lo, mid) at the window's start,
    unmasked [mid, tail) that every row sees whole, masked [tail, hi) at the causal diagonal.
    Keys outside [lo, hi) are seen by no row of the block.

        keys   lo ...... mid ................ tail ...... hi
               window edge   every row, no mask   diagonal
    """
    pos = kv_len - q_len + m0 + tl.arange(0, BLOCK_M)
    first_pos = kv_len - q_len + m0
    last_pos = kv_len - q_len + tl.minimum(m0 + BLOCK_M, q_len) - 1
    # keys some row sees: [lo, hi) (lo rounded down to a tile); keys every row sees:
    # [full_lo, full_hi).
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
    return pos, lo, mid, tail, hi


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
def _attend_tiles(acc, l_i, m_i, q, pos, k_base, v_base, table, start, stop, key_end,
                  qk_scale, cap_scale, window,
                  stride_kb, stride_kr, stride_kd, stride_vb, stride_vr, stride_vd,
                  PAGE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                  D_PAD: tl.constexpr, CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr,
                  PAGED: tl.constexpr, MASKED: tl.constexpr, DTYPE: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    """Online-softmax update of (acc, l_i, m_i) with key tiles [start, stop) in BLOCK_N steps.

    Scores are in log2 units: s = q.k * qk_scale (qk_scale = scale * log2 e), or with a softcap
    s = tanh(q.k * qk_scale) * cap_scale (qk_scale = scale / softcap, cap_scale = softcap * log2 e).
    Per tile (FlashAttention-2, Dao 2023, Algorithm 1):
        m' = max(m, rowmax s);  p = 2^(s - m');  l = l 2^(m - m') + rowsum p;
        acc = acc 2^(m - m') + p V
    MASKED tiles apply the masking rule per row (query position ``pos``) and keep keys below
    ``key_end``; unmasked tiles must lie where every row sees every key. K and V columns from
    HEAD_DIM to D_PAD load as 0 (q's must be 0 as well), so acc's padded columns stay 0.
    """
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
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
        k = _load_tile(k_ptrs, in_range, d_ok, MASKED, HEAD_DIM < D_PAD).to(DTYPE)
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
        v = _load_tile(v_ptrs, in_range, d_ok, MASKED, HEAD_DIM < D_PAD).to(DTYPE)
        acc = tl.dot(p.to(DTYPE), v, acc=acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


# ------------------------------------------------------------------------------------------
# host helpers
# ------------------------------------------------------------------------------------------

def _fail(op: str, message: str) -> None:
    raise ValueError(f"fusegen.codegen.attention.{op}: {message}")


def head_dim_supported(head_dim: int) -> bool:
    return HEAD_DIM_MULTIPLE <= head_dim <= MAX_HEAD_DIM and head_dim % HEAD_DIM_MULTIPLE == 0


def check_head_dim(head_dim: int) -> None:
    """Raise ``ValueError`` unless the attention kernels serve ``head_dim``: every multiple of
    8 from 8 to 256 (64, 80, 96, 112, 128, 256, ...), computed in a tile padded to D_PAD."""
    if not head_dim_supported(head_dim):
        raise ValueError(f"fusegen.codegen.attention: {_unsupported(head_dim)}")


def _check_head_dim(op: str, head_dim: int) -> None:
    if not head_dim_supported(head_dim):
        _fail(op, _unsupported(head_dim))


def _unsupported(head_dim: int) -> str:
    return (f"head dim {head_dim} is not supported by the Triton attention kernels, which take "
            f"multiples of {HEAD_DIM_MULTIPLE} from {HEAD_DIM_MULTIPLE} to {MAX_HEAD_DIM} "
            f"(e.g. 64, 80, 96, 128, 256)")


def head_dim_pad(head_dim: int) -> int:
    """D_PAD: the tile width a kernel computes head dim ``head_dim`` in."""
    return max(16, _next_pow2(head_dim))


def _check_attention_dtype(op: str, name: str, t: Tensor) -> None:
    if t.dtype not in _TL_DTYPES:
        _fail(op, f"{name} has dtype {t.dtype}; the kernels take float16, bfloat16 or float32")


def check_kv_scales(op: str, kv_pool: Tensor, kv_scales) -> None:
    """An fp8 pool's scales: float32 [layers, 2, Hkv], contiguous, on the pool's device."""
    shape = (kv_pool.shape[0], 2, kv_pool.shape[4])
    if not isinstance(kv_scales, Tensor) or tuple(kv_scales.shape) != shape or kv_scales.dtype != torch.float32 \
            or not kv_scales.is_contiguous() or kv_scales.device != kv_pool.device:
        got = "None" if not isinstance(kv_scales, Tensor) else \
            f"{kv_scales.dtype} {tuple(kv_scales.shape)} strides {kv_scales.stride()} on {kv_scales.device}"
        _fail(op, f"an fp8 pool {tuple(kv_pool.shape)} needs kv_scales, contiguous float32 [layers, 2, Hkv] = "
                  f"{list(shape)} on {kv_pool.device}, got {got}")


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
