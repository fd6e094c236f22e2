"""Runs a paged step graph: packs sequences, owns their blocks, builds the int32 inputs.

A step takes, for each active sequence, the tokens not yet in the cache (a whole prompt,
a chunk of one, or one decoded token), packs them into one [1, T] batch and returns the
logits of every packed token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from fusegen.runtime.block_pool import BlockPool


@dataclass
class Sequence:
    tokens: list[int]                       # everything known: prompt + generated
    positions: list[int] = field(default_factory=list)   # position id of each token
    num_cached: int = 0                     # tokens whose K/V are in the pool
    blocks: list[int] = field(default_factory=list)

    def __post_init__(self):
        if not self.positions:
            self.positions = list(range(len(self.tokens)))

    def append(self, token: int) -> None:
        self.tokens.append(token)
        self.positions.append(self.positions[-1] + 1)


class PoolExhausted(RuntimeError):
    """Not enough free blocks for the step; the caller decides whom to preempt."""


class PagedRunner:
    def __init__(self, gm: fx.GraphModule, kv: dict, num_blocks: int, device, dtype=None):
        self.gm = gm
        self.kv = kv
        self.device = torch.device(device)
        self.pool = BlockPool(num_blocks, kv["block_size"])
        shape = (kv["layers"], 2, num_blocks, kv["block_size"], kv["kv_heads"], kv["head_dim"])
        self.kv_pool = torch.zeros(shape, dtype=dtype or kv["dtype"], device=self.device)

    def _reserve(self, seq: Sequence, total: int) -> None:
        need = self.pool.blocks_for(total) - len(seq.blocks)
        if need > 0:
            got = self.pool.allocate(need)
            if got is None:
                raise PoolExhausted(f"need {need} blocks, {self.pool.num_free} free")
            seq.blocks.extend(got)

    def release(self, seq: Sequence) -> None:
        self.pool.free(seq.blocks)
        seq.blocks, seq.num_cached = [], 0

    def step_inputs(self, seqs: list[Sequence], counts: list[int]) -> dict[str, torch.Tensor]:
        """Inputs for caching ``counts[i]`` more tokens of ``seqs[i]``."""
        bs = self.pool.block_size
        ids, pos, slots, lens, starts = [], [], [], [], [0]
        for seq, n in zip(seqs, counts):
            lo, hi = seq.num_cached, seq.num_cached + n
            self._reserve(seq, hi)
            ids.extend(seq.tokens[lo:hi])
            pos.extend(seq.positions[lo:hi])
            slots.extend(seq.blocks[i // bs] * bs + i % bs for i in range(lo, hi))
            lens.append(hi)
            starts.append(starts[-1] + n)
        width = max(len(s.blocks) for s in seqs)
        tables = [s.blocks + [0] * (width - len(s.blocks)) for s in seqs]
        dev, i32 = self.device, torch.int32
        return {
            "input_ids": torch.tensor([ids], dtype=torch.long, device=dev),
            "position_ids": torch.tensor([pos], dtype=torch.long, device=dev),
            "kv_pool": self.kv_pool,
            "slot_mapping": torch.tensor(slots, dtype=i32, device=dev),
            "block_tables": torch.tensor(tables, dtype=i32, device=dev),
            "seq_lens": torch.tensor(lens, dtype=i32, device=dev),
            "query_start_loc": torch.tensor(starts, dtype=i32, device=dev),
        }

    @torch.no_grad()
    def step(self, seqs: list[Sequence], counts: list[int]) -> torch.Tensor:
        """Cache ``counts[i]`` more tokens of each sequence; logits [T, V] of those tokens."""
        inputs = self.step_inputs(seqs, counts)
        logits = self.gm(**inputs)[0]
        for seq, n in zip(seqs, counts):
            seq.num_cached += n
        return logits
