"""Tiles of a quantized weight and of x, as the quantized skinny GEMM (quant_gemm.py) reads
them: integer codes made floats without an int-to-float conversion, int4 nibbles unpacked
from bytes or from 32-bit words, bf16 x read as column pairs, and the product of two tiles.
Each helper's docstring gives its exact result; the GEMM's tests check them through it.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def mma(acc, a, b, USE_DOT: tl.constexpr, IEEE: tl.constexpr):
    """acc + a @ b.T for a [BM, BK], b [BN, BK] of one dtype (fp32 products, fp32 sum)."""
    if USE_DOT:
        if IEEE:
            acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(b), acc)
    else:
        acc += tl.sum(a.to(tl.float32)[:, None, :] * b.to(tl.float32)[None, :, :], axis=2)
    return acc


@triton.jit
def small_int_to_float(u, OFFSET: tl.constexpr):
    """float(u - OFFSET) for int32 0 <= u < 2^23 without an int-to-float conversion (a
    quarter-rate instruction on NVIDIA GPUs, which would bound the weight stream): u's bits
    under the exponent of 2^23 make the float 2^23 + u exactly."""
    return (u | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + OFFSET)


@triton.jit
def nibble_plus_128(words, j: tl.constexpr):
    """float32 128 + (nibble j of each int32 word, bits 4j..4j+3), in one shift and one
    and-or: 128's mantissa bits 16..22 count ones, so the nibble moved there is added
    exactly."""
    if j < 4:
        bits = words << (16 - 4 * j)
    elif j > 4:
        bits = words >> (4 * j - 16)   # the bits shifted in from above are masked off
    else:
        bits = words
    return ((bits & 0x000F0000) | 0x43000000).to(tl.float32, bitcast=True)


@triton.jit
def int4_words_row(x_ptr, a_ptr, words, k0, wi, K, stride_xk, HAS_ACT: tl.constexpr,
                    MASK_K: tl.constexpr, X_PAIRS: tl.constexpr):
    """sum_j x[k0 + 8 wi + j] (nibble_j - 8) for each int32 word of 8 nibbles (tile
    [BLOCK_N, len(wi)], nibble j = column k0 + 8 wi + j), for one row of x: a nibble becomes
    (128 + nibble) - 136 in one shift, one and-or and one add, exactly. Static sm90 SASS
    (16 x 512 tile, 4 warps) has 0.46 warp instructions per weight byte in the K loop against
    0.52 unpacking bytes one nibble at a time, and 48 registers against 70. X_PAIRS: a bf16
    x is read as 32-bit column pairs."""
    rm = tl.arange(0, 1)
    acc = tl.zeros(words.shape, dtype=tl.float32)
    for p in tl.static_range(4):
        if X_PAIRS:
            x_even, x_odd = load_bf16_pairs(x_ptr, a_ptr, k0 + 2 * p, 4 * wi, K, HAS_ACT, MASK_K)
        else:
            even = k0 + 8 * wi + 2 * p
            x_even = load_x(x_ptr, a_ptr, rm, even, 1, K, 0, stride_xk, HAS_ACT, MASK_K).to(tl.float32)
            x_odd = load_x(x_ptr, a_ptr, rm, even + 1, 1, K, 0, stride_xk, HAS_ACT, MASK_K).to(tl.float32)
        acc += x_even * (nibble_plus_128(words, 2 * p) - 136.0)
        acc += x_odd * (nibble_plus_128(words, 2 * p + 1) - 136.0)
    return acc


@triton.jit
def load_x(x_ptr, a_ptr, rm, cols, M, K, stride_xm, stride_xk, HAS_ACT: tl.constexpr, MASK_K: tl.constexpr):
    """x[rm, cols] (times the activation scale a[cols]) in x's dtype; zero outside."""
    mask = rm[:, None] < M
    if MASK_K:
        mask = mask & (cols[None, :] < K)
    a = tl.load(x_ptr + rm[:, None] * stride_xm + cols[None, :] * stride_xk, mask=mask, other=0.0)
    if HAS_ACT:
        act = tl.load(a_ptr + cols, mask=cols < K, other=0.0)
        a = (a.to(tl.float32) * act[None, :]).to(x_ptr.dtype.element_ty)
    return a


@triton.jit
def load_bf16_pairs(x_ptr, a_ptr, k0, half, K, HAS_ACT: tl.constexpr, MASK_K: tl.constexpr):
    """Row 0 of a bf16 x at the columns even = k0 + 2 * half and even + 1 as two [1, len(half)]
    fp32 tensors, from one 32-bit load per pair (x's address and k0 are even): a bf16's
    float32 value is its bits shifted up by 16, so both halves of the word convert by one
    integer op each (times the activation scale a, with HAS_ACT)."""
    even = k0 + 2 * half
    words = x_ptr.to(tl.pointer_type(tl.int32)) + (k0 // 2 + half)[None, :]
    if MASK_K:
        pairs = tl.load(words, mask=(even < K)[None, :], other=0)
    else:
        pairs = tl.load(words)
    x_even = (pairs << 16).to(tl.float32, bitcast=True)
    x_odd = (pairs & -65536).to(tl.float32, bitcast=True)
    if HAS_ACT:
        x_even = x_even * tl.load(a_ptr + even, mask=even < K, other=0.0)[None, :]
        x_odd = x_odd * tl.load(a_ptr + even + 1, mask=even < K, other=0.0)[None, :]
    return x_even, x_odd
