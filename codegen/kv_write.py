"""Paged KV write: scatter one step's keys and values into the paged KV pool (the vLLM
``reshape_and_cache`` layout), the CUDA kernel of ``fusegen::paged_kv_write``.

    pool [layers, 2, blocks, block_size, Hkv, D]     slot s -> block s // block_size,
                                                      row   s % block_size

An fp8 pool (kv_dtype=fp8) stores e4m3(clamp(x / s, -448, 448)) with its head's scale s
(``fusegen.kv.quantize_kv``), converted in registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fusegen.codegen.attention_common import (_check_same_device, _device_guard, _fail, _next_pow2,
                                              check_kv_scales)
from fusegen.codegen.launch import pdl
from fusegen.kv import FP8, FP8_MAX


@triton.jit
def _paged_kv_write_kernel(K, V, KPool, VPool, SlotMapping, KScale, VScale,
                           stride_kh, stride_kt, stride_kd, stride_vh, stride_vt, stride_vd,
                           stride_pb, stride_pr, stride_ph, stride_pd, num_heads,
                           PAGE: tl.constexpr, HEADS_PAD: tl.constexpr, D_PAD: tl.constexpr,
                           HEAD_DIM: tl.constexpr, QUANT: tl.constexpr, FP8_MAX: tl.constexpr,
                           USE_GDC: tl.constexpr):
    """Scatter one token's keys and values into the paged pool.

    pool[slot // PAGE, slot % PAGE, h, :] = k[h, t, :]  for every KV head h, when slot >= 0,
    with slot = slot_mapping[t] (the vLLM ``reshape_and_cache`` layout, Kwon et al. 2023).
    QUANT (an fp8 pool): e4m3(clamp(k[h, t, :] / KScale[h], -FP8_MAX, FP8_MAX)), V alike.
    One program per token t.
    """
    tl.static_assert(HEADS_PAD >= 1 and D_PAD >= HEAD_DIM, "tile must cover all heads and dims")
    if USE_GDC:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
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
    if QUANT:
        ks = tl.load(KScale + h, mask=h < num_heads, other=1.0)
        vs = tl.load(VScale + h, mask=h < num_heads, other=1.0)
        k = tl.clamp(k.to(tl.float32) / ks[:, None], -FP8_MAX, FP8_MAX)
        v = tl.clamp(v.to(tl.float32) / vs[:, None], -FP8_MAX, FP8_MAX)
        k = k.to(KPool.dtype.element_ty, fp_downcast_rounding="rtne")   # as torch rounds
        v = v.to(VPool.dtype.element_ty, fp_downcast_rounding="rtne")
    tl.store(KPool + dst, k.to(KPool.dtype.element_ty), mask=mask)
    tl.store(VPool + dst, v.to(VPool.dtype.element_ty), mask=mask)



def paged_kv_write(kv_pool: Tensor, layer: int, k: Tensor, v: Tensor, slot_mapping: Tensor,
                   kv_scales: Tensor | None = None) -> None:
    """Triton version of ``fusegen.ops.paged_kv_write``: k, v [1, Hkv, T, D] (any strides) go to
    ``kv_pool[layer, 0/1, slot // block_size, slot % block_size]``; slot -1 is skipped. An fp8
    pool quantises them with ``kv_scales`` [layers, 2, Hkv] (fp32); other pools ignore it."""
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
    quant = kv_pool.dtype == FP8
    if quant:
        check_kv_scales(op, kv_pool, kv_scales)
    T = k.shape[2]
    if T == 0:
        return
    k_pool, v_pool = kv_pool[layer, 0], kv_pool[layer, 1]
    k_scale, v_scale = (kv_scales[layer, 0], kv_scales[layer, 1]) if quant else (slot_mapping, slot_mapping)
    with _device_guard(k):
        _paged_kv_write_kernel[(T,)](
            k, v, k_pool, v_pool, slot_mapping, k_scale, v_scale,
            k.stride(1), k.stride(2), k.stride(3), v.stride(1), v.stride(2), v.stride(3),
            *k_pool.stride(), hkv,
            PAGE=page, HEADS_PAD=_next_pow2(hkv), D_PAD=_next_pow2(D), HEAD_DIM=D, QUANT=quant,
            FP8_MAX=FP8_MAX, num_warps=4 if k.is_cuda else 1, **pdl(k))

