"""Triton attention kernels: paged KV write, paged prefill / decode attention, dense flash attention.

This module is the public face of the attention kernels (their wrappers are re-exported
here, and ``register()`` makes them the ops' CUDA kernels); each family lives in its own file:

    kv_write.py            paged KV write
    prefill_attention.py   FlashAttention-2 prefill, dense and packed paged
    decode_attention.py    split-KV paged decode (Flash-Decoding)
    attention_common.py    the online-softmax tile loop, paged row addressing, input checks

Every kernel computes exactly what its reference op in ``fusegen.ops`` computes (same masking
rule: query ``i`` of a sequence with ``L`` keys and ``S`` queries sits at ``p_i = L - S + i``
and sees key ``j`` when ``(not causal or j <= p_i) and (window == 0 or p_i - j < window)``;
rows that see no key are zeros). Nothing here reads a tensor's values on the host, so every
wrapper can be captured in a CUDA graph; kernels are chosen from shapes only.

    public wrapper        kernels                                   reference op
    paged_kv_write        _paged_kv_write_kernel                    fusegen::paged_kv_write
    paged_attention       T == N: _decode_split_kernel (its splits combined by the last to
                          finish, or by _decode_reduce_kernel)
                          otherwise: _paged_prefill_kernel          fusegen::paged_attention
    flash_attention       _flash_fwd_kernel (dense)                 fusegen::attention (no key mask)

An fp8 pool (kv_dtype=fp8: float8_e4m3fn with ``kv_scales`` [layers, 2, Hkv], see
``fusegen.kv``) is written quantised (clamp(x / s, +-448), rounded to e4m3 in registers) and
read as e4m3 tiles converted exactly to the compute dtype; the KV head's K scale multiplies
the softmax scale and its V scale the output, so no tile is rescaled.

Head dims: every multiple of 8 from 8 to 256 (``check_head_dim``), computed in tiles padded
to the next power of two (see ``attention_common``).

Keys are read a tile of ``BLOCK_N`` rows at a time, tiles starting at multiples of BLOCK_N; in
the paged layout row j lives in pool block ``table[j // block_size]``, row ``j % block_size``, so
a tile reads one block (block_size a multiple of BLOCK_N) or gathers its rows' blocks:

    keys   0 ........ 15 | 16 ....... 31 | 32 ... 47      block_table = [7, 2, 9]
    pool   block 7        | block 2        | block 9       one BLOCK_N=32 tile = rows of 7 and 2

Paged prefill packs the query tiles of all sequences into one grid axis: sequence n owns
cdiv(q_len_n, BLOCK_M) consecutive tiles (a prefix sum each program computes from
query_start_loc), and the programs past the last owned tile zero the rows no sequence owns.
The grid, cdiv(T, BLOCK_M) + N tiles per head, covers both for any lengths, so a batch padded
to N = 64 sequences of which 3 are real launches few idle programs:

    q_len   [70, 0, 20, 0, ...]   BLOCK_M 32   tiles per sequence [3, 0, 1, 0, ...]
    tile    0      1      2      3      4 ....
    serves  n0 b2  n0 b1  n0 b0  n2 b0  unowned rows u = 0-31, then 32-63, ... (until none)

(``n0 b2``: sequence 0, query block 2; the unowned rows [0, qsl[0]) and [qsl[N], T) are
counted u = 0, 1, ... one after the other.)

``register()`` makes these wrappers the CUDA kernels of the ``fusegen`` ops.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from fusegen.codegen.attention_common import (_TL_DTYPES, _check_attention_dtype, _check_head_dim,
                                              _check_same_device, _device_guard, _fail, _scales,
                                              check_kv_scales)
# re-exported: the public names of the attention kernels live in this module
from fusegen.codegen.attention_common import (MAX_HEAD_DIM, check_head_dim,  # noqa: F401
                                              head_dim_supported)
from fusegen.codegen.decode_attention import (DECODE_MAX_SPLITS, DECODE_MIN_KEYS_PER_SPLIT,  # noqa: F401
                                              DECODE_PROGRAMS_PER_SM, decode_num_splits,
                                              default_decode_config, launch_decode)
from fusegen.codegen.kv_write import paged_kv_write  # noqa: F401
from fusegen.codegen.prefill_attention import (flash_attention, launch_paged_prefill,  # noqa: F401
                                               paged_prefill_grid)
from fusegen.codegen.prefill_tuning import PREFILL_CONFIGS, default_prefill_config  # noqa: F401
from fusegen.kv import FP8


def _check_paged_inputs(q: Tensor, kv_pool: Tensor, layer: int, block_tables: Tensor,
                        seq_lens: Tensor, query_start_loc: Tensor, kv_scales: Optional[Tensor]) -> None:
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
    if kv_pool.dtype == FP8:
        check_kv_scales(op, kv_pool, kv_scales)
    else:
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
                    kv_scales: Optional[Tensor] = None, *, num_splits: Optional[int] = None,
                    config: Union[None, str, dict] = None, fused_reduce: bool = True) -> Tensor:
    """Triton version of ``fusegen.ops.paged_attention``: packed queries q [1, Hq, T, D] of N
    sequences over their paged context; returns [1, Hq, T, D] (q's strides), zeros for rows
    no sequence owns. N and T may be padded (sequences with no queries, tokens past
    query_start_loc[N]). T == N selects split-KV decode (``num_splits`` overrides the shape
    heuristic, a power of two), any other T the FlashAttention-2 kernel (``config`` picks its
    tiles, see PREFILL_CONFIGS; ``fused_reduce`` False combines decode's splits in a second
    kernel). Sequence values are not validated (that would sync). An fp8
    pool (float8_e4m3fn) is dequantised in registers with ``kv_scales`` [layers, 2, Hkv];
    other pools ignore it."""
    _check_paged_inputs(q, kv_pool, layer, block_tables, seq_lens, query_start_loc, kv_scales)
    kv_scales = kv_scales if kv_pool.dtype == FP8 else None
    out = torch.empty_like(q)
    T, N = q.shape[2], seq_lens.numel()
    if T == 0:
        return out
    qk_scale, cap_scale = _scales(scale, softcap)
    with _device_guard(q):
        if T == N:
            launch_decode(q, kv_pool, layer, block_tables, seq_lens, query_start_loc, out,
                          qk_scale, cap_scale, causal, window, softcap, num_splits, kv_scales,
                          fused_reduce)
        else:
            launch_paged_prefill(q, kv_pool, layer, block_tables, seq_lens, query_start_loc, out,
                                 scale, qk_scale, cap_scale, causal, window, softcap, config, kv_scales)
    return out



# ------------------------------------------------------------------------------------------
# registration as the CUDA kernels of the fusegen ops
# ------------------------------------------------------------------------------------------

_registered = False


def _kernel_supports(head_dim: int, *tensors: Tensor) -> bool:
    return all(t.dtype in _TL_DTYPES for t in tensors) and head_dim_supported(head_dim)


def _pool_supported(head_dim: int, q: Tensor, kv_pool: Tensor) -> bool:
    """The paged kernels read pools of the kernels' dtypes and fp8 ones (with scales)."""
    return _kernel_supports(head_dim, q) and (kv_pool.dtype == FP8 or kv_pool.dtype in _TL_DTYPES)


def register() -> None:
    """Register the wrappers as the CUDA implementations of ``fusegen::attention`` (without a
    key mask), ``fusegen::paged_attention`` and ``fusegen::paged_kv_write``. Every head dim
    ``check_head_dim`` accepts runs in the kernels; only inputs they do not take (a key mask,
    float64, a head dim check_head_dim refuses) go to the ops' reference implementations,
    which read lengths on the host and so cannot be captured in a CUDA graph. Calling it
    again does nothing."""
    global _registered
    if _registered:
        return
    from fusegen import ops

    reference = {name: getattr(ops, name)._init_fn
                 for name in ("attention", "paged_attention", "paged_kv_write")}

    def attention_cuda(q, k, v, key_mask, scale, causal, window, softcap):
        if key_mask is None and q.shape[2] <= k.shape[2] and _kernel_supports(q.shape[-1], q, k, v):
            return flash_attention(q, k, v, scale, causal, window, softcap)
        return reference["attention"](q, k, v, key_mask, scale, causal, window, softcap)

    def paged_attention_cuda(q, kv_pool, layer, block_tables, seq_lens, query_start_loc, scale,
                             causal, window, softcap, kv_scales=None):
        if _pool_supported(q.shape[-1], q, kv_pool):
            return paged_attention(q, kv_pool, layer, block_tables, seq_lens, query_start_loc,
                                   scale, causal, window, softcap, kv_scales)
        return reference["paged_attention"](q, kv_pool, layer, block_tables, seq_lens,
                                            query_start_loc, scale, causal, window, softcap, kv_scales)

    torch.library.register_kernel("fusegen::attention", "cuda", attention_cuda)
    torch.library.register_kernel("fusegen::paged_attention", "cuda", paged_attention_cuda)
    torch.library.register_kernel("fusegen::paged_kv_write", "cuda", paged_kv_write)
    _registered = True
