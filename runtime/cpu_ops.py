"""The ops the CPU step graph (cpu_graph.py) calls in place of the step graph's KV write,
paged attention and rotary embedding: the same values as fusegen.ops' references, in fewer
ops per layer. On the CPU a decode step's small ops cost their dispatch (2-10 us each), not
their arithmetic, so what all layers of a step share is worked out once per step:

    kv_slots(pool, slot_mapping)    the written tokens' pool rows (long), which tokens they
                                    are and every layer's rows as a view: once per step
    paged_kv_write(..., slots)      one index_copy_ each for K and V (bitwise the reference;
                                    an fp8 pool's rows quantised first, copied as bytes)
    step_plan(pool, bt, sl, qsl)    ops.paged_plan, plus the decode groups' masks and where
                                    their K and V are read (DecodeKV) when asked
    paged_attention(..., plan)      a decode group (one query per sequence): the reference's
                                    product-sums over K and V read in place from the pool
                                    (one sequence in consecutive blocks: views made once per
                                    step) or gathered by one index_select into a buffer of
                                    the step, without the reference's steps that change
                                    nothing (casts to the same dtype, masks of all-True);
                                    the masks negated once per step. Other groups (prefill,
                                    chunks, softcap): the reference. Bitwise the reference
                                    either way (an fp8 pool's K and V dequantised to fp32 as
                                    the reference does, for fp32 queries).
    paged_attention_tokens(...)     the same laid out [1, T, Hq * D], as the output
                                    projection reads it
    rotary(x, cos, signed_sin)      x * cos + rotate_half(x) * sin as three ops: the halves
                                    swapped by one flip, rotate_half's minus folded into sin
                                    once per step (bitwise the reference: -a * b == a * -b)
    rotary_heads(qkv, .., cos, s)   the rotary of q and k in one call, over their columns of the
                                    projection's output
    rms_norm(x, w, eps)             w * (x * rsqrt(mean(x ** 2) + eps)): the pattern's own ops
                                    in its order, its intermediates written in place

Writing an op's result into an intermediate nobody else holds (``a.add_(b)`` for ``a + b``)
gives the same values and saves the new tensor: in a decode step, where the linears have just
streamed megabytes of weights through the caches, each allocation and call costs several
times what it does in a loop.
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


@dataclass(frozen=True)
class DecodeKV:
    """Where a decode group's keys and values are read in every layer of a step, worked out
    once: ``layers[layer]`` its K and V [2, G, Hkv, 1, L, D], ``pairs[layer]`` the two apart.
    When the group is one sequence whose blocks follow each other in the pool (a pool's
    first sequence always), they are views of the pool itself, nothing gathered. Otherwise
    the same views of ``buffer`` [2, G * nb, block_size, Hkv, D], which ``read`` fills from
    the group's blocks of the layer (one index_select into it, the buffer shared by the
    layers: each is done with it before the next reads). The views have the strides of
    the gather's either way, so the products read K and V in the same order."""
    layers: tuple[Tensor, ...]
    pairs: tuple[tuple[Tensor, Tensor], ...]
    blocks: Tensor
    buffer: Optional[Tensor] = None

    def read(self, pool_layers: tuple[Tensor, ...], layer: int) -> None:
        if self.buffer is not None:
            torch.index_select(pool_layers[layer], 1, self.blocks, out=self.buffer)


def decode_kv(kv_pool: Tensor, group: ops.PagedGroup) -> DecodeKV:
    G, L, (block_size, Hkv, D) = group.size, group.longest, kv_pool.shape[3:]
    blocks = group.blocks.tolist()
    rows = len(blocks) // G * block_size                        # N: the gathered rows of a sequence
    # [2, G, N, 1, Hkv, D][:, :, :L] permuted to [2, G, Hkv, 1, L, D], as a contiguous gather is
    sizes, strides = (2, G, Hkv, 1, L, D), (G * rows * Hkv * D, rows * Hkv * D, D, Hkv * D, Hkv * D, 1)
    in_place = G == 1 and kv_pool.is_contiguous() and blocks == list(range(blocks[0], blocks[0] + len(blocks)))
    if in_place:
        start = kv_pool.storage_offset() + blocks[0] * kv_pool.stride(2)
        every = kv_pool.as_strided((kv_pool.shape[0], *sizes), (kv_pool.stride(0), kv_pool.stride(1), *strides[1:]),
                                   start)
        layers, parts = every.unbind(0), every.flatten(0, 1).unbind(0)
        return DecodeKV(layers, tuple(zip(parts[0::2], parts[1::2])), group.blocks)
    buffer = torch.empty(2, len(blocks), *kv_pool.shape[3:], dtype=kv_pool.dtype, device=kv_pool.device)
    gathered = buffer.as_strided(sizes, strides)
    count = kv_pool.shape[0]
    return DecodeKV((gathered,) * count, (tuple(gathered.unbind(0)),) * count, group.blocks, buffer)


@dataclass
class StepPlan:
    """``ops.PagedPlan`` of a step, every layer's [2, blocks, block_size, Hkv, D] view of the
    pool (one unbind for the step), its decode groups' masks and where their keys and values
    are read (``DecodeKV``), made at first use."""
    paged: ops.PagedPlan
    pool: Tensor
    layers: tuple[Tensor, ...]
    _decode: dict = field(default_factory=dict)   # (id(group), causal, window) -> DecodeMasks
    _kv: dict = field(default_factory=dict)       # id(group) -> DecodeKV

    def decode_masks(self, group: ops.PagedGroup, causal: bool, window: int) -> DecodeMasks:
        key = (id(group), causal, window)      # the plan holds its groups: ids stay theirs
        if key not in self._decode:
            keep, inside = group.mask(causal, window)
            self._decode[key] = DecodeMasks(None if bool(keep.all()) else ~keep,
                                            None if bool(inside.all()) else ~inside[:, :, None])
        return self._decode[key]

    def decode_kv(self, group: ops.PagedGroup) -> DecodeKV:
        if id(group) not in self._kv:
            self._kv[id(group)] = decode_kv(self.pool, group)
        return self._kv[id(group)]

    @property
    def one_decode_group(self) -> Optional[ops.PagedGroup]:
        """The step's only group when it is every packed query, one per sequence."""
        groups = self.paged.groups
        return groups[0] if len(groups) == 1 and groups[0].whole and groups[0].queries == 1 else None


def step_plan(kv_pool: Tensor, block_tables: Tensor, seq_lens: Tensor, query_start_loc: Tensor) -> StepPlan:
    return StepPlan(ops.paged_plan(kv_pool, block_tables, seq_lens, query_start_loc), kv_pool, kv_pool.unbind(0))


def paged_attention(q: Tensor, kv_pool: Tensor, layer: int, plan: StepPlan, scale: float, causal: bool,
                    window: int, softcap: float, kv_scales: Optional[Tensor] = None) -> Tensor:
    """``ops.paged_attention_planned`` over ``plan.paged``, bitwise: decode groups without the
    reference's no-op steps, the others through the reference."""
    return _paged_attention(q, kv_pool, layer, plan, scale, causal, window, softcap, kv_scales, False)


def paged_attention_tokens(q: Tensor, kv_pool: Tensor, layer: int, plan: StepPlan, scale: float, causal: bool,
                           window: int, softcap: float, kv_scales: Optional[Tensor] = None) -> Tensor:
    """``paged_attention(...)`` [1, Hq, T, D] laid out by token, ``.transpose(1, 2).reshape(1, T,
    Hq * D)``: what the output projection reads (cpu_rewrites.attention_tokens). A decode
    step's attention comes out in that layout; only the other steps move it."""
    return _paged_attention(q, kv_pool, layer, plan, scale, causal, window, softcap, kv_scales, True)


def _paged_attention(q: Tensor, kv_pool: Tensor, layer: int, plan: StepPlan, scale: float, causal: bool,
                     window: int, softcap: float, kv_scales: Optional[Tensor], tokens: bool) -> Tensor:
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
    Hq, T, D, Hkv = q.shape[1], q.shape[2], q.shape[3], kv_pool.shape[4]
    decode = plan.one_decode_group
    if on_thread and decode is not None and plan.paged.starts[-1] == T:
        # [1, Hq, T, D] -> [T, Hkv, Hq / Hkv, 1, D] and back: views, as attend_by_group's are
        grouped = q.view(Hkv, Hq // Hkv, T, 1, D).permute(2, 0, 1, 3, 4)
        out = _decode_attention(grouped, plan, layer, decode, plan.decode_masks(decode, causal, window),
                                scale, scales)
        return out.view(1, T, Hq * D) if tokens else out.view(1, T, Hq, D).transpose(1, 2)

    def attend(group: ops.PagedGroup, group_q: Tensor) -> Tensor:
        if group.queries == 1 and on_thread:
            grouped = group_q.view(group.size, Hkv, Hq // Hkv, 1, D)
            out = _decode_attention(grouped, plan, layer, group, plan.decode_masks(group, causal, window),
                                    scale, scales)
            return out.view(group.size, Hq, 1, D)
        return ops._attend_group(group_q, kv_pool, layer, group, scale, causal, window, softcap, kv_scales)

    out = ops.attend_by_group(q, plan.paged, attend)
    return out.transpose(1, 2).reshape(1, T, Hq * D) if tokens else out


def _decode_attention(q: Tensor, plan: StepPlan, layer: int, group: ops.PagedGroup, masks: DecodeMasks,
                      scale: float, scales: Optional[Tensor] = None) -> Tensor:
    """q [G,Hkv,g,1,D] (g query heads per KV head) over the group's paged keys -> [G,Hkv,g,D],
    as ``ops._attend`` computes it on the CPU (on-thread product-sums and softmax: an op that
    splits over threads waits milliseconds for a busy second core), less its steps that
    change nothing here: casts to the dtype the tensors have, masks that mask nothing, the
    empty-row guard (a decode query always sees its own key). K and V [G,Hkv,1,L,D] as
    ``plan.decode_kv`` has them (views of the pool, or gathered by one index_select);
    ``scales`` [2,1,Hkv,1,1,1] dequantise an fp8 pool's."""
    source = plan.decode_kv(group)
    source.read(plan.layers, layer)
    if scales is not None:   # an fp8 pool: K and V in fp32, as ops._attend_group reads them
        k, v = dequantize_kv(source.layers[layer], scales).unbind(0)
    else:
        k, v = source.pairs[layer]                                       # [G, Hkv, 1, L, D] each
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
    """x * cos + rotate_half(x) * sin, with ``signed = signed_sin(sin)``; the second product
    and the sum in place where the three share a dtype (flip's copy is new, and each
    product has x's shape: the rewrite checks that the result does)."""
    swapped = x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)
    if not x.dtype == cos.dtype == signed.dtype:
        return x * cos + swapped * signed
    return (x * cos).add_(swapped.mul_(signed))


def rotary_heads(x: Tensor, offset: int, heads: list[int], D: int, cos: Tensor, signed: Tensor) -> tuple[Tensor, ...]:
    """``rotary`` over the ``sum(heads)`` heads of D columns each that start at column ``offset``
    of x [B, T, C] (a projection's output: q's and k's heads side by side), split back into
    [B, heads[i], T, D] per piece: one call for the rotary of q and of k."""
    both = x.narrow(-1, offset, sum(heads) * D).unflatten(-1, (-1, D)).transpose(1, 2)
    return rotary(both, cos, signed).split(heads, 1)


# --- RMSNorm -------------------------------------------------------------------------------

def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``weight * (x * rsqrt(mean(x ** 2, [-1], keepdim=True) + eps))`` (x, weight of one
    float dtype, weight [D]): the pattern's ops in its order, bit for bit, each after the
    first two in place. ATen's rms_norm computes the same on the CPU in twice the dispatches
    (casts, type_as, the mean's sum and division); in a SmolLM2-135M decode step its 61 calls
    took 0.6 ms more than these."""
    inv = x.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()
    return x.mul(inv).mul_(weight)
