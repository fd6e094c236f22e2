"""Skinny GEMM over quantized weights: ``y = (x * a) @ W.T (+ bias)`` for M <= 64 packed tokens,
W stored as fusegen/quant.py stores it and read once, at its packed size.

    int8   q [N, K] int8,          s [N, 1]          W[n, k] = q[n, k] * s[n]
    fp8    q [N, K] float8_e4m3fn, s [N, 1]          W[n, k] = q[n, k] * s[n]
    int4   q [N, K/2] uint8,       s [N, K/128]      W[n, k] = (nibble(q, k) - 8) * s[n, k // 128]
           (even k in the low nibble)

Dequantisation happens in registers inside the K loop, products accumulate in fp32. For int8
and fp8 the per-channel scale multiplies the finished sum once (it does not depend on k);
for int4 each group's partial sum is scaled as the group ends: a K block is one group or a
whole number of them (``BLOCK_K`` divides 128 or 128 divides it). int4 unpacks without a
shuffle: the low nibbles meet x's even columns and the high nibbles its odd ones, as two
products over K/2. ``a`` [K] is an optional per-input-channel activation scale (AWQ's, where
it could not be folded into the op before; fusegen/quant.py), applied to x as it is loaded.
One row through the fma variant (BLOCK_M = 1, decode at batch 1) accumulates products
elementwise and sums over K once at the end, as the bf16 template does; for int4 the group
scale then multiplies each word's sum of eight products: q is read as int32 words of eight
nibbles, each nibble made a float 128 + nibble by one shift and one and-or (``Q_WORDS``),
and a bf16 x is read as 32-bit column
pairs (``X_PAIRS``), each half converted by one integer op, instead of two strided loads.
The tile helpers (unpacking, x loads, the product) are in quant_tiles.py.

The tiling, split-K and the fused deterministic reduction (and its workspace and tickets) are
the bf16 template's (skinny_gemm.py, ``_finish_tile``); the measured table is its
``GemmTable`` keyed by the weight format as well, against dequantize + cuBLAS (what
``fusegen::quantized_linear`` does). Prefill (M > 64) with fp8 weights runs cuBLAS's fp8
GEMM (``torch._scaled_mm``) with x quantized per row on the fly where the device has it (sm89+),
so prefill is then w8a8, not weight-only; the integer formats dequantize to x's dtype.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fusegen.codegen import launch, skinny_gemm
from fusegen.codegen.launch import pdl, prefetch_rows
from fusegen.codegen.quant_tiles import int4_words_row, load_bf16_pairs, load_x, mma, small_int_to_float
from fusegen.codegen.skinny_gemm import MAX_M, WORKSPACE, Choice, GemmConfig, _finish_tile, _prefetch, candidates
from fusegen.fused_group import kernels_wanted
from fusegen.quant import FORMATS, GROUP, dequantize

CODES = {"int8": 0, "fp8": 1, "int4": 2}
FP8_MAX = 448.0   # e4m3's largest finite value


@triton.jit
def _quant_gemm_kernel(x_ptr, q_ptr, s_ptr, a_ptr, bias_ptr, y_ptr, part_ptr, count_ptr,
                       M, N, K, stride_xm, stride_xk, stride_qn, stride_sn, stride_ym,
                       FMT: tl.constexpr, GROUP_K: tl.constexpr, SUB_K: tl.constexpr,
                       HAS_ACT: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       SPLIT_K: tl.constexpr, USE_DOT: tl.constexpr, EVEN_K: tl.constexpr,
                       USE_GDC: tl.constexpr, PREFETCH: tl.constexpr = 0, X_PAIRS: tl.constexpr = False,
                       Q_WORDS: tl.constexpr = False):
    """y[m, n] = sum_k x[m, k] a[k] W[n, k] + bias[n], W dequantized from q and s per FMT
    (0 int8, 1 fp8, 2 int4 in groups of GROUP_K, unpacked SUB_K = min(BLOCK_K, GROUP_K) at a
    time); IEEE keeps fp32 dots out of tf32. Q_WORDS (int4, one row through the fma path, rows
    of q 4-byte aligned): q is read as int32 words of 8 nibbles (``int4_words_row``). See the
    module docstring."""
    if FMT == 2:   # a K block lies in one group or is a whole number of groups
        tl.static_assert(BLOCK_K % SUB_K == 0, "int4: BLOCK_K must be a multiple of SUB_K")
        tl.static_assert(GROUP_K % SUB_K == 0, "int4: SUB_K must divide the group")
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn[:, None] < N
    k_chunk = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K   # each split's K range, whole BLOCK_Ks
    k_begin = pid_k * k_chunk
    if USE_GDC:
        if PREFETCH > 0:   # the packed weight is no kernel's output: prefetch it before the wait
            per_byte = 2 if FMT == 2 else 1   # weights per byte of q
            span = tl.minimum(k_chunk, K - k_begin) // per_byte
            prefetch_rows(q_ptr + rn * stride_qn + k_begin // per_byte, tl.minimum(span, PREFETCH) // 16 * 16, rn < N)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # one row (BLOCK_M == 1, fma): products accumulate elementwise, summed over K at the end
    acc_w = tl.zeros((BLOCK_N, BLOCK_K if FMT != 2 else SUB_K // (8 if Q_WORDS else 2)), dtype=tl.float32)
    ROW: tl.constexpr = BLOCK_M == 1 and not USE_DOT
    for k in range(k_begin, k_begin + k_chunk, BLOCK_K):
        if FMT == 2 and Q_WORDS:
            tl.static_assert(ROW, "int4 words: one row through the fma path")
            wi = tl.arange(0, SUB_K // 8)
            q_words = q_ptr.to(tl.pointer_type(tl.int32)) + rn[:, None] * (stride_qn // 4)
            for g in tl.static_range(BLOCK_K // SUB_K):
                k0 = k + g * SUB_K
                w_mask = n_ok if EVEN_K else n_ok & ((k0 + 8 * wi)[None, :] < K)
                words = tl.load(q_words + (k0 // 8 + wi)[None, :], mask=w_mask, other=0)
                group = rn * 0 + k0 // GROUP_K
                s_mask = (rn < N) if EVEN_K else (rn < N) & (group < K // GROUP_K)
                group_scale = tl.load(s_ptr + rn * stride_sn + group, mask=s_mask, other=0.0)
                acc_w += int4_words_row(x_ptr, a_ptr, words, k0, wi, K, stride_xk, HAS_ACT,
                                         not EVEN_K, X_PAIRS) * group_scale[:, None]
        elif FMT == 2:
            half = tl.arange(0, SUB_K // 2)
            for g in tl.static_range(BLOCK_K // SUB_K):
                k0 = k + g * SUB_K
                even = k0 + 2 * half
                w_mask = n_ok if EVEN_K else n_ok & (even[None, :] < K)
                packed = tl.load(q_ptr + rn[:, None] * stride_qn + (k0 // 2 + half)[None, :], mask=w_mask, other=0)
                low = small_int_to_float((packed & 0xF).to(tl.int32), 8)
                high = small_int_to_float((packed >> 4).to(tl.int32), 8)
                if USE_DOT:
                    low, high = low.to(x_ptr.dtype.element_ty), high.to(x_ptr.dtype.element_ty)
                if ROW and X_PAIRS:   # bf16 x: one 32-bit load per column pair
                    x_even, x_odd = load_bf16_pairs(x_ptr, a_ptr, k0, half, K, HAS_ACT, not EVEN_K)
                else:
                    x_even = load_x(x_ptr, a_ptr, rm, even, M, K, stride_xm, stride_xk, HAS_ACT, not EVEN_K)
                    x_odd = load_x(x_ptr, a_ptr, rm, even + 1, M, K, stride_xm, stride_xk, HAS_ACT, not EVEN_K)
                group = rn * 0 + k0 // GROUP_K
                s_mask = (rn < N) if EVEN_K else (rn < N) & (group < K // GROUP_K)
                group_scale = tl.load(s_ptr + rn * stride_sn + group, mask=s_mask, other=0.0)
                if ROW:
                    acc_w += (x_even.to(tl.float32) * low + x_odd.to(tl.float32) * high) * group_scale[:, None]
                else:
                    part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                    part = mma(part, x_even, low, USE_DOT, IEEE)
                    part = mma(part, x_odd, high, USE_DOT, IEEE)
                    acc += part * group_scale[None, :]
        else:
            cols = k + tl.arange(0, BLOCK_K)
            w_mask = n_ok if EVEN_K else n_ok & (cols[None, :] < K)
            w = tl.load(q_ptr + rn[:, None] * stride_qn + cols[None, :], mask=w_mask, other=0.0)
            a = load_x(x_ptr, a_ptr, rm, cols, M, K, stride_xm, stride_xk, HAS_ACT, not EVEN_K)
            if FMT == 0:
                w = small_int_to_float(w.to(tl.int32) + 128, 128)
            if USE_DOT or FMT == 1:
                w = w.to(x_ptr.dtype.element_ty if USE_DOT else tl.float32)
            if ROW:
                acc_w += a.to(tl.float32) * w
            else:
                acc = mma(acc, a, w, USE_DOT, IEEE)
    if ROW:
        acc = tl.sum(acc_w, axis=1)[None, :]
    # int8/fp8: the per-channel scale once, on the finished sum; int4 was scaled per group
    _finish_tile(acc, pid_n, pid_k, M, N, y_ptr, stride_ym, bias_ptr, s_ptr, part_ptr, count_ptr,
                 HAS_BIAS, FMT != 2, BLOCK_M, BLOCK_N, SPLIT_K)


def packed_k(data: torch.Tensor, fmt: str) -> int:
    """K (input channels) of a weight stored as ``data`` in ``fmt``."""
    return data.shape[1] * 2 if fmt == "int4" else data.shape[1]


def check_operands(x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, bias, fmt: str,
                   act_scale=None) -> tuple[int, int]:
    """(N, K) of a quantized linear whose operands are consistent; ValueError naming the
    mismatch otherwise."""
    if fmt not in FORMATS:
        raise ValueError(f"quantized GEMM: weight format must be one of {FORMATS}, got {fmt!r}")
    K, N = x.shape[-1], data.shape[0]
    want_dtype = {"int8": torch.int8, "fp8": torch.float8_e4m3fn, "int4": torch.uint8}[fmt]
    if fmt == "int4" and K % GROUP:
        raise ValueError(f"quantized GEMM: int4 weights come in groups of {GROUP} input channels; "
                         f"K = {K} is not a multiple of {GROUP}")
    want_data = (N, K // 2) if fmt == "int4" else (N, K)
    want_scale = (N, K // GROUP) if fmt == "int4" else (N, 1)
    if data.dtype != want_dtype or tuple(data.shape) != want_data or data.stride(-1) != 1:
        raise ValueError(f"quantized GEMM: {fmt} weight for x [..., {K}] must be {want_dtype} {want_data} "
                         f"with unit column stride, got {data.dtype} {tuple(data.shape)} stride {data.stride()}")
    if scale.dtype != torch.float32 or tuple(scale.shape) != want_scale or not scale.is_contiguous():
        raise ValueError(f"quantized GEMM: {fmt} scale must be contiguous float32 {want_scale}, "
                         f"got {scale.dtype} {tuple(scale.shape)}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"quantized GEMM: bias must be [{N}], got {tuple(bias.shape)}")
    if act_scale is not None and (act_scale.dtype != torch.float32 or tuple(act_scale.shape) != (K,)):
        raise ValueError(f"quantized GEMM: activation scale must be float32 [{K}], "
                         f"got {act_scale.dtype} {tuple(act_scale.shape)}")
    return N, K


def quant_linear(x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 fmt: str, config: GemmConfig, act_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``fusegen::quantized_linear(x, data, scale, bias, fmt, act_scale)`` by the template;
    x [..., K] with at most MAX_M rows."""
    N, K = check_operands(x, data, scale, bias, fmt, act_scale)
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    if M > MAX_M:
        raise ValueError(f"quant_linear serves at most {MAX_M} rows, got {M}")
    if fmt == "int4" and config.block_k % GROUP and GROUP % config.block_k:
        raise ValueError(f"quant_linear: int4 needs BLOCK_K dividing {GROUP} or a multiple of it, "
                         f"got {config.block_k}")
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    bm = config.block_m(M)
    tiles = triton.cdiv(N, config.block_n)
    part, count = WORKSPACE.get(x.device, tiles * config.split_k * bm * config.block_n, tiles) \
        if config.split_k > 1 else (y, y)
    even_k = K % (config.split_k * config.block_k) == 0
    _quant_gemm_kernel[(tiles, config.split_k)](
        x2, data, scale, act_scale if act_scale is not None else scale, bias if bias is not None else y,
        y, part, count, M, N, K, x2.stride(0), x2.stride(1), data.stride(0), scale.stride(0), y.stride(0),
        FMT=CODES[fmt], GROUP_K=GROUP, SUB_K=min(config.block_k, GROUP), HAS_ACT=act_scale is not None,
        HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32,
        BLOCK_M=bm, BLOCK_N=config.block_n, BLOCK_K=config.block_k, SPLIT_K=config.split_k,
        USE_DOT=config.dot, EVEN_K=even_k, X_PAIRS=_bf16_pairs(x2, fmt, bm, config),
        Q_WORDS=_int4_words(data, fmt, bm, config),
        num_warps=config.warps, num_stages=config.stages, **pdl(x), **_prefetch(data, config))
    return y.view(*x.shape[:-1], N)


def _bf16_pairs(x2: torch.Tensor, fmt: str, block_m: int, config: GemmConfig) -> bool:
    """Whether the int4 kernel reads one row of bf16 x as 32-bit column pairs (X_PAIRS): one
    row through the fma path, unit column stride, a 4-byte aligned row."""
    return (fmt == "int4" and block_m == 1 and not config.dot and x2.dtype == torch.bfloat16
            and x2.stride(1) == 1 and x2.data_ptr() % 4 == 0)


def _int4_words(data: torch.Tensor, fmt: str, block_m: int, config: GemmConfig) -> bool:
    """Whether the int4 kernel reads q as int32 words of 8 nibbles (Q_WORDS): one row through
    the fma path, 4-byte aligned rows."""
    return (fmt == "int4" and block_m == 1 and not config.dot and data.stride(0) % 4 == 0
            and data.data_ptr() % 4 == 0)


# --- prefill -----------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _has_fp8_gemm(device_index: int) -> bool:
    return hasattr(torch, "_scaled_mm") and torch.cuda.get_device_capability(device_index) >= (8, 9)


def scaled_mm_fits(x: torch.Tensor, data: torch.Tensor) -> bool:
    """Whether cuBLAS's fp8 GEMM with row-wise scales takes this product on this device."""
    N, K = data.shape
    return (x.is_cuda and x.dtype == torch.bfloat16 and data.dtype == torch.float8_e4m3fn
            and K % 16 == 0 and N % 16 == 0 and _has_fp8_gemm(x.device.index or 0))


def fp8_prefill(x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, bias) -> torch.Tensor:
    """x @ (data * scale).T + bias by ``torch._scaled_mm``: x quantized to e4m3 per row
    (scale max|x[m]| / 448), fp32 accumulation, bf16 out."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    row_scale = (x2.abs().amax(-1, keepdim=True).float() / FP8_MAX).clamp_min(1e-12)
    xq = (x2.float() / row_scale).to(torch.float8_e4m3fn)
    y = torch._scaled_mm(xq, data.t(), scale_a=row_scale, scale_b=scale.view(1, -1), out_dtype=x.dtype)
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], data.shape[0])


# --- the routed op and its table entries -----------------------------------------------------

def reference(x, data, scale, bias, weight_format, act_scale=None):
    """What ``fusegen::quantized_linear`` computes (fusegen/ops.py): dequantize, then F.linear."""
    return torch.ops.fusegen.quantized_linear(x, data, scale, bias, weight_format, act_scale)


def linear(x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
           weight_format: str, act_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``fusegen::quantized_linear`` through the measured table: the template at M <= 64 where
    it won for this shape; fp8's GEMM for prefill where the device has one; else the op
    (dequantize + F.linear). Off CUDA only with $FUSEGEN_KERNELS=1 (Triton's interpreter)."""
    if kernels_wanted([x]):
        M = x.numel() // x.shape[-1]
        if M <= MAX_M:
            config = skinny_gemm.TABLE.lookup(M, data.shape[0], packed_k(data, weight_format), x.dtype, bias is not None,
                                  weight_format)
            if config is not None:
                return quant_linear(x, data, scale, bias, weight_format, config, act_scale)
        elif weight_format == "fp8" and act_scale is None and scaled_mm_fits(x, data):
            return fp8_prefill(x, data, scale, bias)
    return reference(x, data, scale, bias, weight_format, act_scale)


class QuantizedWeight:
    """The table's operand (skinny_gemm.PlainWeight) for weights stored in ``fmt``: random
    weights quantized, the template against dequantize + cuBLAS."""

    def __init__(self, fmt: str):
        self.fmt = fmt

    def weight(self, N: int, K: int, dtype, device, gen) -> tuple:
        from fusegen.quant import quantize

        return quantize(torch.randn(N, K, device=device, generator=gen) * K ** -0.5, self.fmt)

    def weight_bytes(self, N: int, K: int, dtype=None) -> int:
        if self.fmt == "int4":
            return N * K // 2 + N * (K // GROUP) * 4
        return N * K + N * 4

    def candidates(self, M: int, N: int, K: int, sms: int) -> list[GemmConfig]:
        """The bf16 template's configurations (every depth there divides 128 or is a multiple
        of it), and for the fma variant deeper K blocks: a packed row holds fewer bytes per
        BLOCK_K, so as many bytes in flight need a deeper block. int4 multiplies 128 columns
        at a time, so only its weight tile grows with the depth."""
        base = candidates(M, N, K, sms)
        deeper = (1024, 2048) if self.fmt == "int4" else (1024,)
        extra = []
        for c in base:
            if c.dot or c.block_k != 512:
                continue
            for bk in deeper:
                split = max(1, c.split_k * 512 // bk)
                fits = self.fmt == "int4" or c.block_m(M) * c.block_n * bk <= 32768
                if fits and split * bk <= K:
                    extra.append(GemmConfig(c.block_n, bk, split, False, c.warps, c.stages))
        return list(dict.fromkeys(base + extra))

    def template(self, x, weight: tuple, bias, config: GemmConfig):
        return quant_linear(x, *weight, bias, self.fmt, config)

    def baseline(self, x, weight: tuple, bias):
        return reference(x, *weight, bias, self.fmt)

    def exact(self, x, weight: tuple, bias):
        w = dequantize(*weight, self.fmt, torch.float32)
        return torch.nn.functional.linear(x.float(), w, None if bias is None else bias.float())


OPERANDS = {fmt: QuantizedWeight(fmt) for fmt in FORMATS}


def route_quantized(routed, ms, device) -> list[Choice]:
    """Point ``routed``'s ``fusegen::quantized_linear`` nodes (in place: a graph
    skinny_gemm.route_linears has just copied) at ``linear``, measure the table for their
    shapes at every M in ``ms`` on a CUDA ``device``, and return the choices for them."""
    op = torch.ops.fusegen.quantized_linear.default
    shapes = set()
    for node in routed.graph.nodes:
        if node.op != "call_function" or node.target is not op:
            continue
        data, scale = (functools.reduce(getattr, a.target.split("."), routed) for a in node.args[1:3])
        fmt, has_bias = node.args[4], node.args[3] is not None
        node.target = linear
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):   # x's dtype; without it the op runs as it was
            shapes.add((fmt, val.dtype, scale.shape[0], packed_k(data, fmt), has_bias))
    routed.recompile()
    if not ms or torch.device(device).type != "cuda":
        return []
    for fmt, dtype in sorted({s[:2] for s in shapes}, key=str):
        skinny_gemm.TABLE.measure(sorted(s[2:] for s in shapes if s[:2] == (fmt, dtype)), ms, dtype, device,
                      operand=OPERANDS[fmt])
    return [c for key, c in skinny_gemm.TABLE.choices.items()
            if c.fmt != "none" and c.M in ms and (c.fmt, key[3], c.N, c.K, key[4]) in shapes
            and (key[-1] == "pdl") == launch.enabled()]
