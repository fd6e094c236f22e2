"""The compile-time check: the compiled model against the model's own forward, before
``fusegen.compile`` hands it out.

    prefill   a left-padded batch [B, S]          compiled(ids, mask)   vs  model(ids, attention_mask=mask)
              (every real token's logits)
    decode    each row's prompt, then DECODE      one cached step each  vs  model(prompt + tokens)
              more tokens one at a time           (dense or paged KV)       (the row alone, unpadded)

Every compile runs it, so an architecture no test covers either computes what its model
computes, through the same runtime paths generation takes, or is refused with
UnsupportedModelError; it never runs unchecked. A pass that misreads a mask or positions,
or a cache read at the wrong slot, changes logits by about their own size, far past the
bound, which leaves room only for rounding (TF32 dots in the CUDA kernels, 16-bit types).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from fusegen.capture import (evaluating, example_inputs, mask_positions, max_error, model_class_name,
                             own_logits, takes_attention_mask)
from fusegen.errors import UnsupportedModelError
from fusegen.runtime.dense import DenseRunner
from fusegen.runtime.kv_manager import KVCacheManager
from fusegen.runtime.paged import Chunk, PagedRunner, packed_inputs

if TYPE_CHECKING:
    from fusegen.compiler import CompiledModel

ROWS = (7, 3)        # prompt lengths, left-padded to the longest
DECODE = 2           # tokens fed one decode step at a time after each prompt
TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}   # else (16-bit) 5e-2; times max(1, max |logit|)
WORKS = "preset=capture_only (the graph as captured and checked)"


@torch.no_grad()
def check_compiled(compiled: "CompiledModel", model: nn.Module) -> None:
    """Raise UnsupportedModelError when the compiled model's prefill or decode logits differ
    from the model's own (run in eval mode; the model's training flag is kept)."""
    with evaluating(model):
        _check(compiled, model)


def _check(compiled: "CompiledModel", model: nn.Module) -> None:
    ids, mask = _left_padded(model)
    want = own_logits(model, ids, mask)
    # Where the model's own forward gives no number (NaN leaking from a fully masked padding
    # query into real rows, as some hand-written decoders do) there is nothing to compare.
    real = mask.bool() & ~want.isnan().any(-1)
    _compare(compiled, model, compiled(ids, mask)[real], want[real],
             f"prefill of {'left-padded ' if not mask.all() else ''}rows of "
             f"{', '.join(map(str, mask.sum(1).tolist()))} tokens")
    if compiled.kind == "stateless":
        return
    prompts = [ids[b, mask[b].bool()].tolist() for b in range(ids.shape[0])]
    extra = example_inputs(model, batch=len(ROWS), seq=DECODE)[0].flip(0).tolist()
    steps = _paged_decode if compiled.kind == "paged" else _dense_decode
    got = steps(compiled, prompts, extra)
    for b, (prompt, more) in enumerate(zip(prompts, extra)):
        row = torch.tensor([prompt + more], dtype=ids.dtype, device=ids.device)
        _compare(compiled, model, got[b], own_logits(model, row, None)[0, -DECODE:],
                 f"{DECODE} decode steps after a {len(prompt)}-token prompt (row {b})")


def _left_padded(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ROWS real tokens, left-padded; unpadded for a model that takes no mask."""
    ids, mask, _ = example_inputs(model, batch=len(ROWS), seq=max(ROWS))
    if takes_attention_mask(model):
        for b, n in enumerate(ROWS):
            mask[b, :max(ROWS) - n] = 0
    return ids, mask


def _compare(compiled: "CompiledModel", model: nn.Module, got: torch.Tensor, want: torch.Tensor,
             what: str) -> None:
    tol = TOLERANCE.get(want.dtype, 5e-2)
    err = max_error(got, want, tol)
    if err is not None:
        raise UnsupportedModelError(model_class_name(model), f"compiled graph, config={compiled.config}",
                                    f"its logits differ from the model's own forward in the {what}: "
                                    f"max abs error {err:.3g}, more than {tol:g} x max(1, max |logit|); "
                                    f"compile with {WORKS} instead")


def _dense_decode(compiled: "CompiledModel", prompts: list[list[int]], extra: list[list[int]]) -> torch.Tensor:
    """[B, DECODE, V]: the left-padded prompts in one step, then one token per step."""
    width = max(len(p) for p in prompts)
    device = compiled.device
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    runner = DenseRunner(compiled.graph_module, compiled.facts["kv"], len(prompts), width + DECODE, device)
    positions = mask_positions(mask)
    runner.step(ids, mask, positions)
    out = []
    for j in range(DECODE):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        positions = positions[:, -1:] + 1
        token = torch.tensor([[e[j]] for e in extra], device=device)
        out.append(runner.step(token, mask, positions)[:, -1])
    return torch.stack(out, 1)


def _paged_decode(compiled: "CompiledModel", prompts: list[list[int]], extra: list[list[int]]) -> torch.Tensor:
    """[B, DECODE, V]: every prompt packed in one step, then every row's next token per step."""
    geometry = compiled.facts["kv"]
    blocks = sum(-(-(len(p) + DECODE) // geometry.block_size) for p in prompts)
    kv = KVCacheManager(blocks, geometry.block_size, enable_prefix_caching=False)
    runner = PagedRunner(compiled.graph_module, geometry, blocks, compiled.device)
    chunks = []
    for i, prompt in enumerate(prompts):
        kv.admit(i, prompt, len(prompt))
        chunks.append(Chunk(prompt, list(range(len(prompt))), 0, kv.blocks(i)))
    compiled.graph_module(**packed_inputs(runner, chunks, last_only=True))
    out = []
    for j in range(DECODE):
        chunks = []
        for i, (prompt, more) in enumerate(zip(prompts, extra)):
            start = len(prompt) + j
            kv.grow(i, start + 1)
            chunks.append(Chunk([more[j]], [start], start, kv.blocks(i)))
        out.append(compiled.graph_module(**packed_inputs(runner, chunks, last_only=True))[0])
    return torch.stack(out, 1)
