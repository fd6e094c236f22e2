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
        self.graphs = None  # DecodeGraphs once enable_cuda_graphs ran

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

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """``kv_pool[:, :, dst] = kv_pool[:, :, src]`` for each (src, dst) pair, every layer,
        K and V (copy-on-write of shared blocks). All sources are read before any write."""
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], dtype=torch.long, device=self.device)
        dst = torch.tensor([d for _, d in copies], dtype=torch.long, device=self.device)
        self.kv_pool.index_copy_(2, dst, self.kv_pool.index_select(2, src))

    def _host_inputs(self, seqs: list[Sequence], counts: list[int]) -> dict[str, list]:
        """The step's inputs as Python lists (blocks reserved as needed)."""
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
        return {"input_ids": ids, "position_ids": pos, "slot_mapping": slots, "seq_lens": lens,
                "query_start_loc": starts, "block_tables": [list(s.blocks) for s in seqs]}

    def step_inputs(self, seqs: list[Sequence], counts: list[int],
                    last_only: bool = False) -> dict[str, torch.Tensor]:
        """Inputs for caching ``counts[i]`` more tokens of ``seqs[i]``; logits of every packed
        token, or with ``last_only`` of each sequence's last one."""
        return self._tensors(self._host_inputs(seqs, counts), last_only)

    def _tensors(self, host: dict[str, list], last_only: bool) -> dict[str, torch.Tensor]:
        starts = host["query_start_loc"]
        width = max(len(t) for t in host["block_tables"])
        tables = [t + [0] * (width - len(t)) for t in host["block_tables"]]
        dev, i32 = self.device, torch.int32
        return {
            "input_ids": torch.tensor([host["input_ids"]], dtype=torch.long, device=dev),
            "position_ids": torch.tensor([host["position_ids"]], dtype=torch.long, device=dev),
            "kv_pool": self.kv_pool,
            "slot_mapping": torch.tensor(host["slot_mapping"], dtype=i32, device=dev),
            "block_tables": torch.tensor(tables, dtype=i32, device=dev),
            "seq_lens": torch.tensor(host["seq_lens"], dtype=i32, device=dev),
            "query_start_loc": torch.tensor(starts, dtype=i32, device=dev),
            "logits_indices": torch.tensor([e - 1 for e in starts[1:]] if last_only else range(starts[-1]),
                                           dtype=i32, device=dev),
        }

    def enable_cuda_graphs(self, max_seq_len: int, buckets=None) -> None:
        """Capture decode graphs for batch-size buckets (once; see cuda_graphs.py)."""
        from fusegen.runtime.cuda_graphs import DEFAULT_BUCKETS, DecodeGraphs

        width = self.pool.blocks_for(max_seq_len)
        self.graphs = DecodeGraphs(self, width, buckets or DEFAULT_BUCKETS)

    @torch.no_grad()
    def step(self, seqs: list[Sequence], counts: list[int], last_only: bool = False) -> torch.Tensor:
        """Cache ``counts[i]`` more tokens of each sequence; logits [T, V] of those tokens, or
        [N, V] of each sequence's last token with ``last_only``."""
        host = self._host_inputs(seqs, counts)
        graphs = self.graphs
        if graphs is not None and last_only and all(n == 1 for n in counts) \
                and graphs.fits(len(seqs), max(len(t) for t in host["block_tables"])):
            logits = graphs.run(host)
        else:
            logits = self.gm(**self._tensors(host, last_only))[0]
        for seq, n in zip(seqs, counts):
            seq.num_cached += n
        return logits
