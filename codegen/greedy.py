"""One Triton launch for an all-greedy step's tokens: each entry's argmax over its logits row,
scattered into the batch's token rows (``BatchState.record_greedy``).

In PyTorch that is a chunked argmax (``sampling.greedy_tokens``, two or three kernels) and
the scatter of ``BatchState.record_sampled`` (five more: casts, an add, a where, an
index_put), about seven tiny launches after a batch-1 decode step's graph. Here it is one
launch, for B >= N logits rows and N entries (row, start, count, samples):

    grid (B, C)         C = cdiv(V, BLOCK_V) chunks of a row
                        +------------+------------+-----+------------+
    logits row b        |  chunk 0   |  chunk 1   | ... | chunk C-1  |
                        +------------+------------+-----+------------+
    program (b, c)      (max, first index of the max) of chunk c -> partials [B, C],
                        then one ticket from the row's counter
    last taker of row b the first maximum over the C partials -> sampled[b], and for b < N
                        tokens[row, start + count if samples else scratch] = sampled[b];
                        its counter back to 0

The counters are ``launch.ticket_counters`` (zeros between launches, the same
buffer the fused decode reduction uses, in stream order). The choice is ``torch.argmax``'s:
the first index of the maximum, NaN counted above every number (the first NaN wins).
Everything is sized from shapes, so a CUDA graph can capture the launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusegen.codegen.launch import pdl, ticket_counters

# A row is cut into about this many chunks (each at least MIN_BLOCK_V columns), so a
# 128k-column batch-1 row spreads over a wave of programs; the combine holds the partials
# of a row in one block, at most MAX_CHUNKS of them.
TARGET_CHUNKS = 128
MIN_BLOCK_V = 1024
MAX_CHUNKS = 4096
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_NO_INDEX = tl.constexpr(2**31 - 1)  # above every column index


@triton.jit
def _first_max(values, index, valid):
    """(m, i) over the ``valid`` lanes: m = max values, i = min {index : values == m}, with
    NaN above every number (torch.argmax): where a lane is NaN, m = NaN and i is the least
    index of a NaN lane."""
    nan = (values != values) & valid
    any_nan = tl.max(nan.to(tl.int32), 0) > 0
    best = tl.max(tl.where(valid & ~nan, values, float("-inf")), 0)
    hit = tl.where(any_nan, nan, valid & (values == best))
    first = tl.min(tl.where(hit, index, _NO_INDEX), 0)
    return tl.where(any_nan, float("nan"), best), first


@triton.jit
def _greedy_kernel(logits, entries, tokens, sampled, part_max, part_index, tickets,
                   V, N, num_chunks, logits_stride, entries_stride, entry_stride, tokens_stride,
                   scratch, BLOCK_V: tl.constexpr, CHUNKS_PAD: tl.constexpr,
                   USE_GDC: tl.constexpr):
    """sampled[b] = argmax_v logits[b, v] (first maximum, NaN highest), the two-level
    argmax of a split reduction: chunk c's (max, first index) partial, then the first
    maximum over the partials by the row's last program (ticket C - 1). For b < N, with
    (row, start, count, samples) = entries[:, b]:
    tokens[row, start + count if samples != 0 else scratch] = sampled[b]."""
    tl.static_assert(BLOCK_V & (BLOCK_V - 1) == 0, "BLOCK_V must be a power of two")
    if USE_GDC:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    b = tl.program_id(0)
    c = tl.program_id(1)
    cols = c * BLOCK_V + tl.arange(0, BLOCK_V)
    in_v = cols < V
    x = tl.load(logits + b.to(tl.int64) * logits_stride + cols, mask=in_v, other=float("-inf"))
    best, first = _first_max(x.to(tl.float32), cols, in_v)
    part = b * num_chunks + c
    tl.store(part_max + part, best)
    tl.store(part_index + part, first)
    tl.debug_barrier()  # the partial is stored before the ticket is taken
    ticket = tl.atomic_add(tickets + b, 1, sem="acq_rel", scope="gpu")
    if ticket == num_chunks - 1:
        k = tl.arange(0, CHUNKS_PAD)
        used = k < num_chunks
        # other programs stored these: read them from L2 (.cg), past this SM's L1
        maxima = tl.load(part_max + b * num_chunks + k, mask=used, other=float("-inf"), cache_modifier=".cg")
        index = tl.load(part_index + b * num_chunks + k, mask=used, other=_NO_INDEX, cache_modifier=".cg")
        token = _first_max(maxima, index, used)[1].to(tl.int64)
        tl.store(sampled + b, token)
        if b < N:
            entry = entries + b * entry_stride
            row = tl.load(entry).to(tl.int64)
            start = tl.load(entry + entries_stride)
            count = tl.load(entry + 2 * entries_stride)
            samples = tl.load(entry + 3 * entries_stride)
            col = tl.where(samples != 0, start + count, scratch)
            tl.store(tokens + row * tokens_stride + col, token)
        tl.atomic_xchg(tickets + b, 0)  # ready for the next launch


def greedy_block_v(V: int) -> int:
    """Columns per program for a vocabulary of V: about TARGET_CHUNKS chunks, each a power of
    two of at least MIN_BLOCK_V columns (a row of at most that is one program)."""
    return max(MIN_BLOCK_V, triton.next_power_of_2(triton.cdiv(V, TARGET_CHUNKS)))


def _check(logits: torch.Tensor, entries: torch.Tensor, tokens: torch.Tensor, scratch: int) -> None:
    if logits.dim() != 2 or logits.dtype not in _DTYPES or logits.shape[1] < 1:
        raise ValueError(f"record_greedy: logits must be [B, V >= 1] float32, float16 or bfloat16, got "
                         f"{logits.dtype} {tuple(logits.shape)}")
    if logits.stride(1) != 1:
        raise ValueError(f"record_greedy: logits need contiguous rows, got strides {logits.stride()}")
    if entries.dtype != torch.int32 or entries.dim() != 2 or entries.shape[0] != 4:
        raise ValueError(f"record_greedy: entries must be int32 [4, N], got {entries.dtype} "
                         f"{tuple(entries.shape)}")
    if entries.shape[1] > logits.shape[0]:
        raise ValueError(f"record_greedy: {entries.shape[1]} entries but logits for only "
                         f"{logits.shape[0]} rows")
    if tokens.dtype != torch.long or tokens.dim() != 2 or tokens.stride(1) != 1:
        raise ValueError(f"record_greedy: tokens must be int64 [rows, len] with contiguous rows, got "
                         f"{tokens.dtype} {tuple(tokens.shape)} strides {tokens.stride()}")
    if not 0 <= scratch < tokens.shape[1]:
        raise ValueError(f"record_greedy: scratch column {scratch} outside tokens' {tokens.shape[1]} columns")
    if not (logits.device == entries.device == tokens.device):
        raise ValueError(f"record_greedy: logits, entries and tokens on {logits.device}, "
                         f"{entries.device} and {tokens.device}")


def record_greedy(logits: torch.Tensor, entries: torch.Tensor, tokens: torch.Tensor, scratch: int,
                  block_v: int | None = None) -> torch.Tensor:
    """``logits.argmax(-1)`` ([B] int64, returned) for [B, V] logits, each of the first N
    entries' token also written into ``tokens`` as ``BatchState.record_sampled(entries,
    sampled)`` does (``entries`` [4, N] int32 (row, start, count, samples), N <= B;
    ``scratch``: the column of entries that sample nothing). One launch, no host sync.
    ``block_v`` (a power of two) overrides ``greedy_block_v(V)``."""
    _check(logits, entries, tokens, scratch)
    B, V = logits.shape
    sampled = torch.empty(B, dtype=torch.long, device=logits.device)
    if B == 0:
        return sampled
    block_v = greedy_block_v(V) if block_v is None else block_v
    if block_v < 1 or block_v & (block_v - 1):
        raise ValueError(f"record_greedy: block_v must be a power of two, got {block_v}")
    chunks = triton.cdiv(V, block_v)
    if chunks > MAX_CHUNKS:
        raise ValueError(f"record_greedy: {chunks} chunks of {block_v} columns for V={V}, at most "
                         f"{MAX_CHUNKS}")
    part_max = torch.empty(B * chunks, dtype=torch.float32, device=logits.device)
    part_index = torch.empty(B * chunks, dtype=torch.int32, device=logits.device)
    tickets = ticket_counters(logits.device, B)
    _greedy_kernel[(B, chunks)](
        logits, entries, tokens, sampled, part_max, part_index, tickets,
        V, entries.shape[1], chunks, logits.stride(0), entries.stride(0), entries.stride(1),
        tokens.stride(0), scratch, BLOCK_V=block_v, CHUNKS_PAD=triton.next_power_of_2(chunks),
        num_warps=4, **pdl(logits))
    return sampled
