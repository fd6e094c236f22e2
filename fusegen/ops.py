"""The ``fusegen`` op namespace: the operations passes insert into graphs.

Each op is a ``torch.library`` custom op with a plain-PyTorch reference implementation
(runs on any device, and is the oracle every kernel is tested against) and a fake
implementation so shapes propagate symbolically through the graph.

Shapes use the letters B batch, Hq query heads, Hkv key/value heads (Hq % Hkv == 0),
S query length, L key length, D head dim, T packed tokens, N sequences.

Masking rule shared by every attention op — query ``i`` sits at key position
``p_i = L - S + i`` (queries are the last S positions of the context); key ``j`` is kept when

    (not causal or j <= p_i) and (window == 0 or p_i - j < window) and key_mask[j]

Rows with no key left produce zeros.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

from fusegen.kv import FP8, byte_view, dequantize_kv, quantize_kv


def _attend(q: Tensor, k: Tensor, v: Tensor, keep: Tensor, scale: float, softcap: float) -> Tensor:
    """q [B,Hq,S,D], k/v [B,Hkv,L,D], keep broadcastable to [B,Hq,S,L] (bool)."""
    dtype, acc = q.dtype, torch.promote_types(q.dtype, torch.float32)
    q, k, v = q.to(acc), k.to(acc), v.to(acc)
    # One query per row on the CPU (decode): product-sums and a written-out softmax, which
    # stay on the calling thread at these sizes. torch.matmul hands a few thousand
    # multiply-adds to the BLAS thread pool and torch.softmax always splits its rows over
    # ATen's; on a busy 2-core machine waking a second thread costs milliseconds.
    single = q.shape[2] == 1 and q.device.type == "cpu"
    scores = _single_query_scores(q, k) if single else torch.matmul(q, _expand_heads(k, q).transpose(-1, -2))
    scores = scores * scale
    if softcap > 0.0:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~keep, float("-inf"))
    any_key = keep.any(-1, keepdim=True)
    scores = scores.masked_fill(~any_key, 0.0)
    probs = (_softmax_on_thread(scores) if single else torch.softmax(scores, dim=-1)) * any_key  # empty rows -> 0
    out = _single_query_mix(probs, v) if single else torch.matmul(probs, _expand_heads(v, q))
    return out.to(dtype)


def _expand_heads(kv: Tensor, q: Tensor) -> Tensor:
    """k or v [B,Hkv,L,D] repeated to the query heads (head h reads KV head h // group)."""
    return kv.repeat_interleave(q.shape[1] // kv.shape[1], dim=1)


def _single_query_scores(q: Tensor, k: Tensor) -> Tensor:
    """q [B,Hq,1,D] . k [B,Hkv,L,D] -> [B,Hq,1,L], without copying k per query head."""
    B, Hq, _, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    grouped = q.view(B, Hkv, Hq // Hkv, 1, D)
    return (grouped * k[:, :, None]).sum(-1).view(B, Hq, 1, L)


def _single_query_mix(probs: Tensor, v: Tensor) -> Tensor:
    """probs [B,Hq,1,L] . v [B,Hkv,L,D] -> [B,Hq,1,D]."""
    B, Hq, _, L = probs.shape
    Hkv, D = v.shape[1], v.shape[3]
    grouped = probs.reshape(B, Hkv, Hq // Hkv, L, 1)
    return (grouped * v[:, :, None]).sum(-2).view(B, Hq, 1, D)


def _softmax_on_thread(x: Tensor) -> Tensor:
    """softmax over the last dim from elementwise ops and reductions (within 1e-6 of
    torch.softmax). exp2, not exp: exp goes through MKL's vector library and its threads."""
    e = ((x - x.amax(-1, keepdim=True)) * _LOG2_E).exp2()
    return e / e.sum(-1, keepdim=True)


_LOG2_E = 1.4426950408889634


def causal_keep(S: int, L: int, causal: bool, window: int, device) -> Tensor:
    """[S, L] bool: which keys each query may see (see the module docstring)."""
    p = torch.arange(L - S, L, device=device)[:, None]
    j = torch.arange(L, device=device)[None, :]
    keep = torch.ones(S, L, dtype=torch.bool, device=device)
    if causal:
        keep &= j <= p
    if window > 0:
        keep &= (p - j) < window
    return keep


def _check_heads(q: Tensor, k: Tensor, v: Tensor, op: str) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"fusegen.{op}: expected q [B,Hq,S,D] and k, v [B,Hkv,L,D], "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[1] % k.shape[1] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"fusegen.{op}: query heads must be a multiple of KV heads and head dims "
                         f"must match: q {tuple(q.shape)}, k {tuple(k.shape)}")


# --- attention over a full sequence (what fuse_attention inserts) -------------------------

@torch.library.custom_op("fusegen::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], scale: float,
              causal: bool, window: int, softcap: float) -> Tensor:
    """Scaled dot-product attention with GQA (k/v NOT expanded), causal / sliding window,
    optional tanh softcap and key padding mask ``key_mask`` [B, L] (nonzero = keep)."""
    return attention_reference(q, k, v, key_mask, scale, causal, window, softcap)


def attention_reference(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], scale: float,
                        causal: bool, window: int, softcap: float) -> Tensor:
    """``fusegen::attention``'s body as plain PyTorch, which autograd follows (the op has no
    autograd formula; passes/gqa_distill.py differentiates through this)."""
    _check_heads(q, k, v, "attention")
    if q.shape[2] > k.shape[2]:
        raise ValueError(f"fusegen.attention: {q.shape[2]} queries but only {k.shape[2]} keys")
    keep = causal_keep(q.shape[2], k.shape[2], causal, window, q.device)[None, None]
    if key_mask is not None:
        keep = keep & key_mask.bool()[:, None, None, :]
    return _attend(q, k, v, keep, scale, softcap)


@attention.register_fake
def _(q, k, v, key_mask, scale, causal, window, softcap):
    return torch.empty_like(q)


# --- dense KV cache (what insert_kv_cache inserts) ----------------------------------------
#
# kv_cache: [layers, 2, B, Hkv, Smax, D]. key_mask [B, L] covers the whole context so far;
# the S new tokens occupy positions L-S .. L-1 of every sequence.

@torch.library.custom_op("fusegen::dense_kv_write", mutates_args=("kv_cache",))
def dense_kv_write(kv_cache: Tensor, layer: int, k: Tensor, v: Tensor, key_mask: Tensor) -> None:
    """Write the new keys/values k, v [B,Hkv,S,D] at positions L-S..L-1 of ``layer``."""
    L, S = key_mask.shape[1], k.shape[2]
    if S > L:
        raise ValueError(f"fusegen.dense_kv_write: {S} new tokens but a context of only {L}")
    if L > kv_cache.shape[4]:
        raise ValueError(f"fusegen.dense_kv_write: context length {L} exceeds the cache's "
                         f"{kv_cache.shape[4]} positions")
    kv_cache[layer, 0, :, :, L - S:L] = k
    kv_cache[layer, 1, :, :, L - S:L] = v


@dense_kv_write.register_fake
def _(kv_cache, layer, k, v, key_mask):
    return None


@torch.library.custom_op("fusegen::dense_kv_attention", mutates_args=())
def dense_kv_attention(q: Tensor, kv_cache: Tensor, layer: int, key_mask: Tensor, scale: float,
                       causal: bool, window: int, softcap: float) -> Tensor:
    """Attention of q [B,Hq,S,D] over the first L = key_mask.shape[1] cached positions."""
    L = key_mask.shape[1]
    k = kv_cache[layer, 0, :, :, :L]
    v = kv_cache[layer, 1, :, :, :L]
    return attention(q, k, v, key_mask, scale, causal, window, softcap)


@dense_kv_attention.register_fake
def _(q, kv_cache, layer, key_mask, scale, causal, window, softcap):
    return torch.empty_like(q)


# --- paged KV pool (what insert_paged_blocks inserts) -------------------------------------
#
#   kv_pool [layers, 2, num_blocks, block_size, Hkv, D]
#
#   block_tables [N, max_blocks] int32      seq 0: [ 7 | 2 | 9 ]   -> tokens 0..15 in block 7,
#   seq_lens     [N]             int32                                 16..31 in block 2, ...
#   query_start_loc [N+1]        int32      packed queries of seq n: q[qsl[n]:qsl[n+1]]
#   slot_mapping [T]             int32      token t is written to block slot // bs, row slot % bs
#                                           (-1: not written, e.g. padding)
#
# Sequence n has seq_lens[n] tokens of context, the last qsl[n+1]-qsl[n] of them new.

@torch.library.custom_op("fusegen::paged_kv_write", mutates_args=("kv_pool",))
def paged_kv_write(kv_pool: Tensor, layer: int, k: Tensor, v: Tensor, slot_mapping: Tensor,
                   kv_scales: Optional[Tensor] = None) -> None:
    """Scatter k, v [1,Hkv,T,D] (packed tokens) into their slots of ``layer``. An fp8 pool
    stores ``quantize_kv(x, kv_scales[layer, K|V, head])`` (``fusegen.kv``); a pool of any
    other dtype stores the values as they are (``kv_scales`` unused)."""
    k_tok = k.transpose(1, 2).reshape(-1, k.shape[1], k.shape[3])  # [T, Hkv, D]
    v_tok = v.transpose(1, 2).reshape(-1, v.shape[1], v.shape[3])
    if slot_mapping.numel() != k_tok.shape[0]:
        raise ValueError(f"fusegen.paged_kv_write: {k_tok.shape[0]} tokens but slot_mapping has "
                         f"{slot_mapping.numel()} entries")
    slots = slot_mapping.long()
    valid = slots >= 0
    if not bool(valid.all()):
        slots, k_tok, v_tok = slots[valid], k_tok[valid], v_tok[valid]
    # index_copy_ into the layer's [slots, Hkv, D] rows where the pool allows that view:
    # advanced-index assignment costs time in proportion to the whole pool on the CPU.
    block_size = kv_pool.shape[3]
    for kv, tokens in ((0, k_tok), (1, v_tok)):
        stored = byte_view(_to_pool(tokens, kv_pool, kv_scales, layer, kv, "paged_kv_write"))
        rows = byte_view(kv_pool[layer, kv])
        if rows.is_contiguous():
            rows.view(-1, *kv_pool.shape[4:]).index_copy_(0, slots, stored)
        else:
            rows[slots // block_size, slots % block_size] = stored


def _to_pool(tokens: Tensor, kv_pool: Tensor, kv_scales: Optional[Tensor], layer: int, kv: int, op: str) -> Tensor:
    """Rows [..., Hkv, D] as the pool stores them: quantised with their heads' scales in an fp8
    pool, else cast to the pool's dtype."""
    if kv_pool.dtype != FP8:
        return tokens.to(kv_pool.dtype)
    return quantize_kv(tokens, _head_scales(kv_scales, kv_pool, layer, kv, op)[:, None])


def _head_scales(kv_scales: Optional[Tensor], kv_pool: Tensor, layer: int, kv: int, op: str) -> Tensor:
    """kv_scales[layer, kv] [Hkv] (fp32) of an fp8 pool, checked."""
    shape = (kv_pool.shape[0], 2, kv_pool.shape[4])
    if kv_scales is None or tuple(kv_scales.shape) != shape or kv_scales.dtype != torch.float32:
        got = None if kv_scales is None else f"{kv_scales.dtype} {tuple(kv_scales.shape)}"
        raise ValueError(f"fusegen.{op}: an fp8 pool {tuple(kv_pool.shape)} needs kv_scales, float32 "
                         f"[layers, 2, Hkv] = {list(shape)}, got {got}")
    return kv_scales[layer, kv]


@paged_kv_write.register_fake
def _(kv_pool, layer, k, v, slot_mapping, kv_scales=None):
    return None


def gather_paged(kv_pool: Tensor, layer: int, blocks: Tensor, num_seqs: int, length: int) -> tuple[Tensor, Tensor]:
    """Dense k, v [N, Hkv, length, D] of N sequences whose first blocks are ``blocks``
    ([N * nb] long, sequence-major). Positions past a sequence's own length hold whatever
    its blocks hold there."""
    shape = (num_seqs, -1, *kv_pool.shape[4:])
    # index_select, not pool[layer, 0, blocks]: advanced indexing reads the whole pool on CPU.
    k = kv_pool[layer, 0].index_select(0, blocks).view(shape)[:, :length]
    v = kv_pool[layer, 1].index_select(0, blocks).view(shape)[:, :length]
    return k.transpose(1, 2), v.transpose(1, 2)


@dataclass
class PagedGroup:
    """The sequences of a step that have the same number of queries, attended as one padded
    batch: G sequences, S queries each, contexts of at most ``longest`` tokens."""
    tokens: Tensor      # [G * S] long: their rows of the packed queries, sequence-major
    blocks: Tensor      # [G * nb] long: the blocks holding their first ``longest`` positions
    lens: Tensor        # [G, 1, 1] long: their context lengths
    size: int
    queries: int
    longest: int
    whole: bool         # tokens are 0..T-1 in order: the group is the whole step
    masks: dict = field(default_factory=dict)

    def mask(self, causal: bool, window: int) -> tuple[Tensor, Tensor]:
        """(keep [G,1,S,L], inside [G,1,L,1]): which keys each query sees (the module
        docstring's rule), and which key rows lie inside their sequence."""
        if (causal, window) not in self.masks:
            S, device = self.queries, self.lens.device
            j = torch.arange(self.longest, device=device)[None, None, :]         # key positions
            p = self.lens - S + torch.arange(S, device=device)[None, :, None]   # query positions
            inside = j < self.lens                                              # [G, 1, L]
            keep = inside & (j <= p) if causal else inside.expand(-1, S, -1)
            if window > 0:
                keep = keep & ((p - j) < window)
            self.masks[causal, window] = keep[:, None], inside[..., None]
        return self.masks[causal, window]


@dataclass
class PagedPlan:
    """What the paged attention of every layer in one step shares, worked out once from the
    step's metadata: its sequences grouped by query count (a decode step is one group)."""
    groups: list[PagedGroup]
    starts: list[int]     # query_start_loc on the host


def paged_plan(kv_pool: Tensor, block_tables: Tensor, seq_lens: Tensor, query_start_loc: Tensor) -> PagedPlan:
    """The plan of one step (see ``paged_attention`` for the inputs)."""
    if query_start_loc.numel() != seq_lens.numel() + 1:
        raise ValueError(f"fusegen.paged_attention: query_start_loc {query_start_loc.tolist()} must "
                         f"have N+1 = {seq_lens.numel() + 1} entries")
    starts, lens = query_start_loc.tolist(), seq_lens.tolist()
    by_count: dict[int, list[int]] = {}
    for n, L in enumerate(lens):
        count = starts[n + 1] - starts[n]
        if count > L:
            raise ValueError(f"fusegen.paged_attention: sequence {n} has {count} queries but "
                             f"only {L} tokens of context")
        if count > 0:
            by_count.setdefault(count, []).append(n)
    block_size, groups = kv_pool.shape[3], []
    for count, seqs in by_count.items():
        tokens = [starts[n] + i for n in seqs for i in range(count)]
        longest = max(lens[n] for n in seqs)
        rows = block_tables.index_select(0, torch.tensor(seqs, device=block_tables.device))
        groups.append(PagedGroup(
            tokens=torch.tensor(tokens, device=kv_pool.device),
            blocks=rows[:, :-(-longest // block_size)].reshape(-1).long(),
            lens=torch.tensor([lens[n] for n in seqs], device=kv_pool.device)[:, None, None],
            size=len(seqs), queries=count, longest=longest,
            whole=tokens == list(range(starts[-1]))))
    return PagedPlan(groups, starts)


@torch.library.custom_op("fusegen::paged_attention", mutates_args=())
def paged_attention(q: Tensor, kv_pool: Tensor, layer: int, block_tables: Tensor, seq_lens: Tensor,
                    query_start_loc: Tensor, scale: float, causal: bool, window: int,
                    softcap: float, kv_scales: Optional[Tensor] = None) -> Tensor:
    """Attention of packed queries q [1,Hq,T,D] of N sequences over their paged context.
    Covers packed varlen prefill (chunked or not) and batched decode (one query each). An
    fp8 pool is read as ``dequantize_kv(pool, kv_scales[layer, K|V, head])`` (in fp32)."""
    _check_paged_queries(q, kv_pool)
    plan = paged_plan(kv_pool, block_tables, seq_lens, query_start_loc)
    return paged_attention_planned(q, kv_pool, layer, plan, scale, causal, window, softcap, kv_scales)


def paged_attention_planned(q: Tensor, kv_pool: Tensor, layer: int, plan: PagedPlan, scale: float,
                            causal: bool, window: int, softcap: float,
                            kv_scales: Optional[Tensor] = None) -> Tensor:
    """``paged_attention`` with the step's plan made already (the CPU step graph makes it
    once for all layers).

    Each group of sequences with the same query count runs as one padded batch: keys past
    a sequence's length are masked and their values zeroed, so padding (or a NaN left in a
    stale slot) never reaches the output."""
    _check_paged_queries(q, kv_pool)
    if plan.starts[-1] > q.shape[2]:
        raise ValueError(f"fusegen.paged_attention: query_start_loc {plan.starts} must end at "
                         f"most at T = {q.shape[2]}")
    return attend_by_group(q, plan, lambda group, group_q: _attend_group(
        group_q, kv_pool, layer, group, scale, causal, window, softcap, kv_scales))


def attend_by_group(q: Tensor, plan: PagedPlan, attend: Callable[[PagedGroup, Tensor], Tensor]) -> Tensor:
    """Packed queries q [1,Hq,T,D] attended one query-count group at a time:
    ``attend(group, group_q)`` maps a group's queries [G,Hq,S,D] to its outputs (same shape).
    Rows of no group (padding) are zeros."""
    Hq, D = q.shape[1], q.shape[3]
    if len(plan.groups) == 1 and plan.groups[0].whole and plan.starts[-1] == q.shape[2]:
        group = plan.groups[0]
        attended = attend(group, q[0].view(Hq, group.size, group.queries, D).transpose(0, 1))
        return attended.transpose(0, 1).reshape(q.shape)
    out = torch.zeros_like(q)
    for group in plan.groups:
        group_q = q[0].index_select(1, group.tokens).view(Hq, group.size, group.queries, D)
        attended = attend(group, group_q.transpose(0, 1))
        out[0].index_copy_(1, group.tokens, attended.transpose(0, 1).reshape(Hq, -1, D))
    return out


def _check_paged_queries(q: Tensor, kv_pool: Tensor) -> None:
    if q.shape[0] != 1:
        raise ValueError(f"fusegen.paged_attention: queries must be packed as [1,Hq,T,D], got {tuple(q.shape)}")
    if q.shape[1] % kv_pool.shape[4] or q.shape[3] != kv_pool.shape[5]:
        raise ValueError(f"fusegen.paged_attention: q {tuple(q.shape)} does not fit the pool's "
                         f"{kv_pool.shape[4]} KV heads of dim {kv_pool.shape[5]}")


def _attend_group(q: Tensor, kv_pool: Tensor, layer: int, group: PagedGroup, scale: float,
                  causal: bool, window: int, softcap: float, kv_scales: Optional[Tensor] = None) -> Tensor:
    """Attention of a group's queries q [G,Hq,S,D] over its paged keys and values (an fp8
    pool's dequantised in fp32, which ``_attend`` computes in anyway)."""
    k, v = gather_paged(kv_pool, layer, group.blocks, group.size, group.longest)
    if kv_pool.dtype == FP8:
        k = dequantize_kv(k, _head_scales(kv_scales, kv_pool, layer, 0, "paged_attention")[:, None, None])
        v = dequantize_kv(v, _head_scales(kv_scales, kv_pool, layer, 1, "paged_attention")[:, None, None])
    else:
        k, v = k.to(q.dtype), v.to(q.dtype)
    keep, inside = group.mask(causal, window)
    v = v.masked_fill(~inside, 0.0)
    return _attend(q, k, v, keep, scale, softcap)


@paged_attention.register_fake
def _(q, kv_pool, layer, block_tables, seq_lens, query_start_loc, scale, causal, window, softcap,
      kv_scales=None):
    return torch.empty_like(q)


# --- rotary embeddings ---------------------------------------------------------------------

@torch.library.custom_op("fusegen::rotate_half", mutates_args=())
def rotate_half(x: Tensor) -> Tensor:
    """cat(-x[..., D/2:], x[..., :D/2]): the rotation half of rotary embeddings (RoFormer,
    Su et al. 2021) in the "rotate_half" layout HF models use."""
    return rotate_half_reference(x)


def rotate_half_reference(x: Tensor) -> Tensor:
    """``fusegen::rotate_half``'s body as plain PyTorch (autograd follows it)."""
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


@rotate_half.register_fake
def _(x):
    return torch.empty_like(x)


# --- weight-only quantized linear ------------------------------------------------------------

@torch.library.custom_op("fusegen::quantized_linear", mutates_args=())
def quantized_linear(x: Tensor, data: Tensor, scale: Tensor, bias: Optional[Tensor], weight_format: str,
                     act_scale: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x * act_scale, W, bias)`` with W stored by ``fusegen.quant`` in
    ``weight_format`` (int8, fp8, int4): the weight is dequantized (and, with the per input
    channel ``act_scale`` of AWQ, scaled by it: ``W[:, k] * act_scale[k]``) to x's dtype,
    then multiplied. See ``fusegen.quant.effective_weight``."""
    from fusegen.quant import effective_weight

    return torch.nn.functional.linear(x, effective_weight(data, scale, weight_format, x.dtype, act_scale), bias)


@quantized_linear.register_fake
def _(x, data, scale, bias, weight_format, act_scale=None):
    return x.new_empty((*x.shape[:-1], scale.shape[0]))


def reference(op) -> Optional[Callable]:
    """The plain Python function behind a ``torch.ops.fusegen`` overload (calling it skips the
    dispatcher: what the CPU step graph does), or None for any other op."""
    if isinstance(op, torch._ops.OpOverload) and op.namespace == "fusegen":
        return globals()[op._opname]._init_fn
    return None


ATTENTION_OPS = (
    torch.ops.fusegen.attention.default,
    torch.ops.fusegen.dense_kv_attention.default,
    torch.ops.fusegen.paged_attention.default,
)
