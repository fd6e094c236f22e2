"""The ops the CPU step graph (cpu_graph.py) calls in place of the step graph's KV write,
paged attention and rotary embedding: the same values as fusegen.ops' references, in fewer
ops per layer. On the CPU a decode step's small ops cost their dispatch (2-10 us each), not
their arithmetic, so what all layers of a step share is worked out once per step:

    kv_slots(pool, slot_mapping)    the written tokens' pool rows (long), which tokens they
                                    are and every layer's rows as a view: once per step
    paged_kv_write(..., slots)      one index_copy_ each for K and V (bitwise the reference;
                                    an fp8 pool's rows quantised first, copied as bytes)
    step_plan(pool, bt, sl, qsl)    ops.paged_plan, plus the decode groups' masks when asked
    paged_attention(..., plan)      a decode group (one query per sequence): the reference's
                                    product-sums over K and V gathered by one index_select,
                                    without its steps that change nothing (casts to the same
                                    dtype, masks of all-True); the masks negated once per
                                    step. Other groups (prefill, chunks, softcap): the
                                    reference. Bitwise the reference either way (an fp8
                                    pool's K and V dequantised to fp32 as the reference
                                    does, for fp32 queries).
    rotary(x, cos, signed_sin)      x * cos + rotate_half(x) * sin as three ops: the halves
                                    swapped by one flip, rotate_half's minus folded into sin
                                    once per step (bitwise the reference: -a * b == a * -b)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from fusegen import ops
from fusegen.kv import FP8, byte_view, dequantize_kv, quantize_kv

_reference_kv_write = ops.reference(torch.ops.fusegen.paged_kv_write.default)


# --- KV write ------------------------------------------------------------------------------

@dataclass(frozen=True)
class KVSlots:
    """Where a step's packed tokens go, the same in every layer:

        slot_mapping [T] int32    7  -1  18          (-1: not written, e.g. padding)
        rows         [W] long     7      18          pool rows, block * block_size + offset
        tokens       [W] long     0      2           their packed tokens; None when all T are
                                                     written, in order
        targets      per (layer, K|V): the pool's [1, blocks * block_size, Hkv, D] rows as a
                     view, 2 * layer + kv; None when the pool cannot be viewed so
    """
    slot_mapping: Tensor
    rows: Tensor
    tokens: Optional[Tensor]
    targets: Optional[tuple[Tensor, ...]]

    @property
    def count(self) -> int:
        return self.slot_mapping.numel()


def kv_slots(kv_pool: Tensor, slot_mapping: Tensor) -> KVSlots:
    rows = slot_mapping.long()
    valid = rows >= 0
    targets = None
    if kv_pool.is_contiguous():
        targets = kv_pool.view(-1, 1, kv_pool.shape[2] * kv_pool.shape[3], *kv_pool.shape[4:]).unbind(0)
    if bool(valid.all()):
        return KVSlots(slot_mapping, rows, None, targets)
    tokens = valid.nonzero().view(-1)
    return KVSlots(slot_mapping, rows.index_select(0, tokens), tokens, targets)


def paged_kv_write(kv_pool: Tensor, layer: int, k: Tensor, v: Tensor, slots: KVSlots,
                   kv_scales: Optional[Tensor] = None) -> None:
    """``ops.paged_kv_write(kv_pool, layer, k, v, slots.slot_mapping, kv_scales)`` (k, v
    [1,Hkv,T,D]): one index_copy_ each into the layer's rows (made once per step in ``slots``)."""
    if slots.targets is None or k.shape[0] != 1:
        return _reference_kv_write(kv_pool, layer, k, v, slots.slot_mapping, kv_scales)
    if k.shape[2] != slots.count:
        raise ValueError(f"fusegen.paged_kv_write: {k.shape[2]} tokens but slot_mapping has "
                         f"{slots.count} entries")
    for kv, new in enumerate((k, v)):
        tokens = new.transpose(1, 2)                                   # [1, T, Hkv, D]
        if slots.tokens is not None:
            tokens = tokens.index_select(1, slots.tokens)
        if kv_pool.dtype == FP8:
            tokens = quantize_kv(tokens, ops._head_scales(kv_scales, kv_pool, layer, kv, "paged_kv_write")[:, None])
        elif tokens.dtype != kv_pool.dtype:
            tokens = tokens.to(kv_pool.dtype)
        byte_view(slots.targets[2 * layer + kv]).index_copy_(1, slots.rows, byte_view(tokens))
    return None


# --- paged attention -----------------------------------------------------------------------

@dataclass(frozen=True)
class DecodeMasks:
    """A decode group's masks (``PagedGroup.mask``) negated once per step, None where they
    mask nothing: ``hidden`` [G,1,1,L] keys a query does not see, ``outside`` [G,1,1,L,1]
    rows past a sequence's length (their keys and values are zeroed: a NaN in a stale slot
    must not reach the output)."""
    hidden: Optional[Tensor]
    outside: Optional[Tensor]


@dataclass
class StepPlan:
    """``ops.PagedPlan`` of a step, every layer's [2, blocks, block_size, Hkv, D] view of the
    pool (one unbind for the step), and its decode groups' masks, made at first use."""
    paged: ops.PagedPlan
    layers: tuple[Tensor, ...]
    _decode: dict = field(default_factory=dict)   # (id(group), causal, window) -> DecodeMasks

    def decode_masks(self, group: ops.PagedGroup, causal: bool, window: int) -> DecodeMasks:
        key = (id(group), causal, window)      # the plan holds its groups: ids stay theirs
        if key not in self._decode:
            keep, inside = group.mask(causal, window)
            self._decode[key] = DecodeMasks(None if bool(keep.all()) else ~keep,
                                            None if bool(inside.all()) else ~inside[:, :, None])
        return self._decode[key]

    @property
    def one_decode_group(self) -> Optional[ops.PagedGroup]:
        """The step's only group when it is every packed query, one per sequence."""
        groups = self.paged.groups
        return groups[0] if len(groups) == 1 and groups[0].whole and groups[0].queries == 1 else None


def step_plan(kv_pool: Tensor, block_tables: Tensor, seq_lens: Tensor, query_start_loc: Tensor) -> StepPlan:
    return StepPlan(ops.paged_plan(kv_pool, block_tables, seq_lens, query_start_loc), kv_pool.unbind(0))


def paged_attention(q: Tensor, kv_pool: Tensor, layer: int, plan: StepPlan, scale: float, causal: bool,
                    window: int, softcap: float, kv_scales: Optional[Tensor] = None) -> Tensor:
    """``ops.paged_attention_planned`` over ``plan.paged``, bitwise: decode groups without the
    reference's no-op steps, the others through the reference."""
    ops._check_paged_queries(q, kv_pool)
    if plan.paged.starts[-1] > q.shape[2]:
        raise ValueError(f"fusegen.paged_attention: query_start_loc {plan.paged.starts} must end at "
                         f"most at T = {q.shape[2]}")
    quantized = kv_pool.dtype == FP8
    on_thread = softcap == 0.0 and q.device.type == "cpu" and (
        q.dtype == torch.float32 if quantized else q.dtype == kv_pool.dtype)
    scales = None
    if on_thread and quantized:   # [2, 1, Hkv, 1, 1, 1]: K and V of the [2, G, Hkv, 1, L, D] gather
        ops._head_scales(kv_scales, kv_pool, layer, 0, "paged_attention")   # checked
        scales = kv_scales[layer].view(2, 1, -1, 1, 1, 1)
    Hq, D, Hkv = q.shape[1], q.shape[3], kv_pool.shape[4]
    decode = plan.one_decode_group
    if on_thread and decode is not None and plan.paged.starts[-1] == q.shape[2]:
        # [1, Hq, T, D] -> [T, Hkv, Hq / Hkv, 1, D] and back: views, as attend_by_group's are
        grouped = q.view(Hkv, Hq // Hkv, decode.size, 1, D).permute(2, 0, 1, 3, 4)
        out = _decode_attention(grouped, plan.layers[layer], decode, plan.decode_masks(decode, causal, window),
                                scale, scales)
        return out.view(1, decode.size, Hq, D).transpose(1, 2)

    def attend(group: ops.PagedGroup, group_q: Tensor) -> Tensor:
        if group.queries == 1 and on_thread:
            grouped = group_q.view(group.size, Hkv, Hq // Hkv, 1, D)
            out = _decode_attention(grouped, plan.layers[layer], group, plan.decode_masks(group, causal, window),
                                    scale, scales)
            return out.view(group.size, Hq, 1, D)
        return ops._attend_group(group_q, kv_pool, layer, group, scale, causal, window, softcap, kv_scales)

    return ops.attend_by_group(q, plan.paged, attend)


def _decode_attention(q: Tensor, pool_layer: Tensor, group: ops.PagedGroup, masks: DecodeMasks,
                      scale: float, scales: Optional[Tensor] = None) -> Tensor:
    """q [G,Hkv,g,1,D] (g query heads per KV head) over the group's paged keys -> [G,Hkv,g,D],
    as ``ops._attend`` computes it on the CPU (on-thread product-sums and softmax: an op that
    splits over threads waits milliseconds for a busy second core), less its steps that
    change nothing here: casts to the dtype the tensors have, masks that mask nothing, the
    empty-row guard (a decode query always sees its own key). K and V of every block come
    from one index_select, viewed as [G,Hkv,1,L,D] for the products; ``scales`` [2,1,Hkv,1,1,1]
    dequantise an fp8 pool's."""
    kv = pool_layer.index_select(1, group.blocks).view(2, group.size, -1, 1, *pool_layer.shape[3:])
    if kv.shape[2] != group.longest:
        kv = kv[:, :, :group.longest]
    kv = kv.permute(0, 1, 4, 3, 2, 5)                                    # [2, G, Hkv, 1, L, D]
    if scales is not None:   # an fp8 pool: K and V in fp32, as ops._attend_group reads them
        kv = dequantize_kv(kv, scales)
    k, v = kv.unbind(0)                                                  # [G, Hkv, 1, L, D] each
    if masks.outside is not None:
        k, v = k.masked_fill(masks.outside, 0.0), v.masked_fill(masks.outside, 0.0)
    scores = (q * k).sum(-1) * scale                                     # [G, Hkv, g, L]
    if masks.hidden is not None:
        scores = scores.masked_fill(masks.hidden, float("-inf"))
    return (ops._softmax_on_thread(scores)[..., None] * v).sum(-2)


# --- rotary embeddings ---------------------------------------------------------------------

def signed_sin(sin: Tensor) -> Tensor:
    """sin with its first half negated: rotate_half(x) * sin == swap_halves(x) * signed_sin."""
    half = sin.shape[-1] // 2
    return torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


def rotary(x: Tensor, cos: Tensor, signed: Tensor) -> Tensor:
    """x * cos + rotate_half(x) * sin, with ``signed = signed_sin(sin)``."""
    swapped = x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)
    return x * cos + swapped * signed
