"""Runs a dense-cache step graph (``insert_kv_cache`` without paging): one cache slab per
sequence, left-padded batches, the attention mask covering the whole context."""

from __future__ import annotations

import torch
from torch import fx

from fusegen.kv import KVGeometry


class DenseRunner:
    def __init__(self, gm: fx.GraphModule, kv: KVGeometry, batch: int, max_len: int, device):
        self.gm = gm
        self.kv_cache = torch.zeros(kv.dense_shape(batch, max_len), dtype=kv.dtype, device=device)
        self.max_len = max_len

    @torch.no_grad()
    def step(self, input_ids, context_mask, position_ids) -> torch.Tensor:
        """input_ids/position_ids [B, S] new tokens, context_mask [B, L] (L = cached + S)."""
        if context_mask.shape[1] > self.max_len:
            raise ValueError(f"context of {context_mask.shape[1]} tokens exceeds the cache's {self.max_len}")
        return self.gm(input_ids, context_mask, position_ids, self.kv_cache)
