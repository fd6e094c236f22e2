"""Greedy generation loops over the step runners (sampling and continuous batching build
on the same runners)."""

from __future__ import annotations

import torch

from fusegen.runtime.dense import DenseRunner
from fusegen.runtime.paged import PagedRunner, Sequence


def _finished(token: int, produced: int, max_new_tokens: int, eos: set[int]) -> bool:
    return token in eos or produced >= max_new_tokens


def greedy_paged(runner: PagedRunner, prompts: list[list[int]], max_new_tokens: int,
                 eos: set[int]) -> list[list[int]]:
    """Prefill every prompt in one packed step, then decode the unfinished ones together."""
    seqs = [Sequence(list(p)) for p in prompts]
    new = [[] for _ in prompts]
    active = list(range(len(seqs)))
    counts = [len(p) for p in prompts]
    try:
        logits = runner.step(seqs, counts)
        last = torch.tensor(counts).cumsum(0) - 1
        tokens = logits[last.to(logits.device)].argmax(-1).tolist()
        while True:
            still = []
            for i, tok in zip(active, tokens):
                new[i].append(tok)
                if not _finished(tok, len(new[i]), max_new_tokens, eos):
                    seqs[i].append(tok)
                    still.append(i)
            active = still
            if not active:
                return new
            logits = runner.step([seqs[i] for i in active], [1] * len(active))
            tokens = logits.argmax(-1).tolist()
    finally:
        for seq in seqs:
            runner.release(seq)


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
