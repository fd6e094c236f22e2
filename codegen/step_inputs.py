"""One Triton kernel for a paged step's graph inputs (``BatchState.step_inputs``).

The vectorised PyTorch version builds the inputs from the entries with about forty small
kernels (cumsum, searchsorted, gathers, wheres, casts); inside a decode CUDA graph those are
a sixth of the step's launches. This kernel computes the same values in one launch:

    program p < cdiv(T, BLOCK_T)   tokens [p * BLOCK_T, (p + 1) * BLOCK_T):
        entry e of token t = #{e : qsl[e + 1] <= t}   (a compare-and-count over the entries)
        pos = start[e] + t - qsl[e], row = rows[e]    (padding past qsl[N]: pos 0, the padding row, slot -1)
        input_ids[t] = tokens[row, pos], slot_mapping[t] = table[row, pos // bs] * bs + pos % bs
    program p < N                  row p of block_tables = table[rows[p]]
    program 0                      query_start_loc, seq_lens, logits_indices

The entries are few (at most max_num_seqs + padding), so every program holds all of them
and their prefix sum in registers. ``BatchState.step_inputs`` is the reference: the two
give identical tensors (tests/test_step_inputs.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusegen.codegen.launch import pdl


@triton.jit
def _step_inputs_kernel(entries, tokens, table, input_ids, positions, slots, tables_out,
                        seq_lens, qsl_out, logits_indices, N, T, W, tokens_stride, table_stride,
                        padding_row, PAGE: tl.constexpr, N_PAD: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr, USE_GDC: tl.constexpr):
    if USE_GDC:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    pid = tl.program_id(0)
    e = tl.arange(0, N_PAD)
    in_n = e < N
    rows = tl.load(entries + e, mask=in_n, other=0)
    starts = tl.load(entries + N + e, mask=in_n, other=0)
    counts = tl.load(entries + 2 * N + e, mask=in_n, other=0)
    ends = tl.cumsum(counts, 0)                       # qsl[e + 1]
    begins = ends - counts                            # qsl[e]

    t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    in_t = t < T
    before = (ends[None, :] <= t[:, None]) & in_n[None, :]
    entry = tl.sum(before.to(tl.int32), axis=1)       # searchsorted(qsl[1:], t, right=True)
    valid = entry < N
    pick = e[None, :] == entry[:, None]               # one-hot: gather an entry's values
    start_t = tl.sum(tl.where(pick, starts[None, :], 0), axis=1)
    begin_t = tl.sum(tl.where(pick, begins[None, :], 0), axis=1)
    row_t = tl.sum(tl.where(pick, rows[None, :], 0), axis=1)
    pos = tl.where(valid, start_t + t - begin_t, 0)
    row = tl.where(valid, row_t, padding_row).to(tl.int64)
    block = tl.load(table + row * table_stride + pos // PAGE, mask=in_t, other=0)
    slot = tl.where(valid, block * PAGE + pos % PAGE, -1)
    token = tl.load(tokens + row * tokens_stride + pos, mask=in_t, other=0)
    tl.store(input_ids + t, token, mask=in_t)
    tl.store(positions + t, pos.to(tl.int64), mask=in_t)
    tl.store(slots + t, slot, mask=in_t)

    if pid < N:                                       # this program's block-table row
        src = tl.load(entries + pid).to(tl.int64)
        for c in range(0, W, BLOCK_W):
            cols = c + tl.arange(0, BLOCK_W)
            keep = cols < W
            ids = tl.load(table + src * table_stride + cols, mask=keep, other=0)
            tl.store(tables_out + pid * W + cols, ids, mask=keep)
    if pid == 0:
        tl.store(qsl_out + e + 1, ends, mask=in_n)
        tl.store(qsl_out + e, 0, mask=e == 0)
        tl.store(seq_lens + e, starts + counts, mask=in_n)
        tl.store(logits_indices + e, tl.maximum(ends - 1, 0), mask=in_n)


def step_inputs(entries: torch.Tensor, num_tokens: int, tokens: torch.Tensor, table: torch.Tensor,
                block_size: int, padding_row: int) -> dict[str, torch.Tensor]:
    """The graph inputs of ``BatchState.step_inputs`` (all but kv_pool) for ``entries``
    [4, N] int32 on the device, in one launch: input_ids and position_ids [1, T] long,
    slot_mapping [T], block_tables [N, W], seq_lens [N], query_start_loc [N + 1] and
    logits_indices [N], int32."""
    if entries.dtype != torch.int32 or entries.dim() != 2 or entries.shape[0] < 3:
        raise ValueError(f"step_inputs: entries must be int32 [4, N], got {entries.dtype} "
                         f"{tuple(entries.shape)}")
    if tokens.stride(1) != 1 or table.stride(1) != 1:
        raise ValueError("step_inputs: the token and block tables need contiguous rows")
    entries = entries.contiguous()
    N, T, W = entries.shape[1], num_tokens, table.shape[1]
    device = entries.device
    out = {
        "input_ids": torch.empty((1, T), dtype=torch.long, device=device),
        "position_ids": torch.empty((1, T), dtype=torch.long, device=device),
        "slot_mapping": torch.empty(T, dtype=torch.int32, device=device),
        "block_tables": torch.empty((N, W), dtype=torch.int32, device=device),
        "seq_lens": torch.empty(N, dtype=torch.int32, device=device),
        "query_start_loc": torch.empty(N + 1, dtype=torch.int32, device=device),
        "logits_indices": torch.empty(N, dtype=torch.int32, device=device),
    }
    n_pad = triton.next_power_of_2(max(N, 1))
    block_t = max(16, min(128 if n_pad <= 128 else 32, triton.next_power_of_2(max(T, 1))))
    programs = max(triton.cdiv(T, block_t), N, 1)
    _step_inputs_kernel[(programs,)](
        entries, tokens, table, out["input_ids"], out["position_ids"], out["slot_mapping"],
        out["block_tables"], out["seq_lens"], out["query_start_loc"], out["logits_indices"],
        N, T, W, tokens.stride(0), table.stride(0), padding_row,
        PAGE=block_size, N_PAD=n_pad, BLOCK_T=block_t,
        BLOCK_W=min(256, triton.next_power_of_2(max(W, 1))), num_warps=4, **pdl(entries))
    return out
