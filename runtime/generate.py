"""Greedy generation over the dense-cache runner (the paged runner is driven by the
engine: runtime/engine.py)."""

from __future__ import annotations

import torch

from fusegen.runtime.dense import DenseRunner


def _finished(token: int, produced: int, max_new_tokens: int, eos: set[int]) -> bool:
    return token in eos or produced >= max_new_tokens


def greedy_dense(runner: DenseRunner, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 max_new_tokens: int, eos: set[int]) -> list[list[int]]:
    """HF-style left-padded batch: positions count real tokens only."""
    B = input_ids.shape[0]
    mask = attention_mask.long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = runner.step(input_ids, mask, positions)
    new, done = [[] for _ in range(B)], [False] * B
    for _ in range(max_new_tokens):
        tokens = logits[:, -1].argmax(-1)
        for b in range(B):
            if not done[b]:
                new[b].append(int(tokens[b]))
                done[b] = _finished(int(tokens[b]), len(new[b]), max_new_tokens, eos)
        if all(done):
            break
        mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=mask.device)], dim=1)
        positions = positions[:, -1:] + 1
        logits = runner.step(tokens[:, None], mask, positions)
    return new
