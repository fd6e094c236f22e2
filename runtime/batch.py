"""The persistent, device-resident batch: one row per running request, and the step inputs
derived from it on the device.

    rows (device)            tokens [R + 1, max_len + 1]      block_table [R + 1, W]
    row 0  request 12        5 9 17 3 8 44 . . . . . | s      7 2 . . .
    row 1  request 15        7 2 11 . . . . . . . .  | s      0 . . . .
    ...
    row R  padding           0 . . .                 | s      0 . . . .     (never written)
                                                       ^ scratch column: where entries that
                                                         sample nothing put their token

The host writes a row's known tokens once, when its request is admitted, and block ids only
as they are appended (``write_tokens``, ``write_blocks``: one pinned staging buffer and one
asynchronous copy each). Sampled tokens are scattered into ``tokens`` on the device
(``record_sampled``; an all-greedy step's argmax and scatter are one launch where kernels
run, ``record_greedy``), so the next step's decode reads its input there without a round
trip. A step is described by four int32 numbers per entry, (row, start, count, samples):

    entries   (0, 5, 1, 1)  (1, 0, 3, 1)  (R, 0, 0, 0)  ...    T = 4 packed tokens (padded to Tp)
    query_start_loc   0, 1, 4, 4, ...
    token t -> entry e (searchsorted), position p = start[e] + t - qsl[e]
    input_ids[t] = tokens[row[e], p]     slot_mapping[t] = block_table[row[e], p // bs] * bs + p % bs

``step_inputs`` computes every graph input from those with no host sync, so it runs inside
a CUDA graph; tokens past qsl[N] are padding (slot -1). Where kernels run (CUDA, or
$FUSEGEN_KERNELS=1) that is one Triton launch (codegen/step_inputs.py); elsewhere, and as
its reference, a few vectorised ops (``reference_step_inputs``).
"""

from __future__ import annotations

import torch

from fusegen.fused_group import kernels_wanted
from fusegen.kv import PAGED_INPUTS
from fusegen.runtime.sampling import greedy_tokens


def _host(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``values`` in host memory, pinned when they are going to a CUDA device."""
    return torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda")


def staged(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``values`` on ``device`` through a pinned host buffer and an asynchronous copy. The
    caching host allocator keeps the buffer until the copy has run, so nothing syncs."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return _host(values, dtype, device).to(device, non_blocking=True)


class BatchState:
    def __init__(self, max_rows: int, max_model_len: int, block_size: int, device):
        if max_rows < 1 or max_model_len < 1:
            raise ValueError(f"BatchState needs max_rows >= 1 and max_model_len >= 1, got "
                             f"{max_rows} and {max_model_len}")
        self.device = torch.device(device)
        self.max_rows = max_rows
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.width = -(-max_model_len // block_size)
        self.padding_row = max_rows
        self.scratch = max_model_len
        rows = max_rows + 1
        self.tokens = torch.zeros(rows, max_model_len + 1, dtype=torch.long, device=self.device)
        self.block_table = torch.zeros(rows, self.width, dtype=torch.int32, device=self.device)
        # Per-row sampling parameters (see sampling.py), written at admission.
        self.temperature = torch.zeros(rows, dtype=torch.float32, device=self.device)
        self.top_k = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.top_p = torch.ones(rows, dtype=torch.float32, device=self.device)
        self.repetition_penalty = torch.ones(rows, dtype=torch.float32, device=self.device)
        self.seed = torch.zeros(rows, dtype=torch.long, device=self.device)

    # --- host -> device, incremental --------------------------------------------------

    def write_tokens(self, writes: list[tuple[int, int, list[int]]]) -> None:
        """``tokens[row, first:first + len(ids)] = ids`` for each (row, first, ids): one
        asynchronous copy per row, straight into its slice."""
        for row, first, ids in writes:
            if first + len(ids) > self.max_model_len:
                raise ValueError(f"row {row}: {first + len(ids)} tokens exceed max_model_len="
                                 f"{self.max_model_len}")
            self.tokens[row, first:first + len(ids)].copy_(_host(ids, torch.long, self.device),
                                                          non_blocking=True)

    def write_blocks(self, writes: list[tuple[int, int, list[int]]]) -> None:
        """``block_table[row, first:first + len(ids)] = ids`` for each (row, first, ids)."""
        if not writes:
            return
        rows, cols, flat = [], [], []
        for row, first, ids in writes:
            if first + len(ids) > self.width:
                raise ValueError(f"row {row}: {first + len(ids)} blocks exceed the table's "
                                 f"{self.width} columns")
            rows.extend([row] * len(ids))
            cols.extend(range(first, first + len(ids)))
            flat.extend(ids)
        packed = staged(rows + cols + flat, torch.int32, self.device).view(3, -1).long()
        self.block_table[packed[0], packed[1]] = packed[2].int()

    def write_sampling(self, rows: list[int], params: list) -> None:
        """Each row's sampling parameters (``SamplingParams`` with the request's seed)."""
        if not rows:
            return
        floats = staged([p.temperature if not p.greedy else 0.0 for p in params] + [p.top_p for p in params]
                        + [p.repetition_penalty for p in params], torch.float32, self.device).view(3, -1)
        ints = staged(rows + [p.top_k for p in params] + [p.seed for p in params], torch.long,
                      self.device).view(3, -1)
        index = ints[0]
        self.temperature[index], self.top_p[index], self.repetition_penalty[index] = floats
        self.top_k[index], self.seed[index] = ints[1], ints[2]

    # --- on the device ----------------------------------------------------------------

    def step_inputs(self, entries: torch.Tensor, num_tokens: int, kv_pool: torch.Tensor) -> dict:
        """Graph inputs for ``entries`` [4, N] int32 (row, start, count, samples) packed into
        ``num_tokens`` tokens (>= the counts' sum); logits of each entry's last token."""
        if kernels_wanted([entries]):
            from fusegen.codegen.step_inputs import step_inputs

            values = step_inputs(entries, num_tokens, self.tokens, self.block_table, self.block_size,
                                 self.padding_row)
            values["kv_pool"] = kv_pool
            return {name: values[name] for name in PAGED_INPUTS}
        return self.reference_step_inputs(entries, num_tokens, kv_pool)

    def reference_step_inputs(self, entries: torch.Tensor, num_tokens: int, kv_pool: torch.Tensor) -> dict:
        """``step_inputs`` in vectorised PyTorch ops (the CPU path and the kernel's reference)."""
        rows, starts, counts = entries[:3].long()
        qsl = torch.nn.functional.pad(counts.cumsum(0), (1, 0))
        t = torch.arange(num_tokens, device=self.device)
        entry = torch.searchsorted(qsl[1:], t, right=True)
        valid = entry < rows.shape[0]
        entry = entry.clamp(max=rows.shape[0] - 1)
        pos = torch.where(valid, starts[entry] + t - qsl[entry], 0)
        row = torch.where(valid, rows[entry], self.padding_row)
        block = self.block_table[row, pos // self.block_size].long()
        slots = torch.where(valid, block * self.block_size + pos % self.block_size, -1)
        values = {
            "input_ids": self.tokens[row, pos][None],
            "position_ids": pos[None],
            "kv_pool": kv_pool,
            "slot_mapping": slots.int(),
            "block_tables": self.block_table[rows],
            "seq_lens": (starts + counts).int(),
            "query_start_loc": qsl.int(),
            "logits_indices": (qsl[1:] - 1).clamp(min=0).int(),
        }
        return {name: values[name] for name in PAGED_INPUTS}

    def record_sampled(self, entries: torch.Tensor, sampled: torch.Tensor) -> None:
        """Put each sampling entry's token at its row's next position (the others into the
        scratch column), where the next step's input gather finds it."""
        rows, starts, counts, samples = entries.long()
        cols = torch.where(samples.bool(), starts + counts, self.scratch)
        self.tokens[rows, cols] = sampled[: rows.shape[0]]

    def record_greedy(self, entries: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """``record_sampled(entries, greedy_tokens(logits))``, returning the tokens ([B] long
        for [B, V] logits, B >= N). Where kernels run that is one launch
        (codegen/greedy.py); elsewhere, and as its reference, the two calls."""
        if kernels_wanted([logits]):
            from fusegen.codegen.greedy import record_greedy

            return record_greedy(logits, entries, self.tokens, self.scratch)
        sampled = greedy_tokens(logits)
        self.record_sampled(entries, sampled)
        return sampled

    def history(self, rows: torch.Tensor) -> torch.Tensor:
        """Every token of each row so far ([N, max_len]; read up to the entry's length)."""
        return self.tokens[rows.long(), : self.max_model_len]
