"""quantize_kv_cache (opt-in, lossy; ``kv_dtype=fp8``): the paged KV pool stored as fp8 e4m3
with one fp32 scale per (layer, K|V, KV head), half the bytes per token of bf16.

Before:  paged_kv_write(kv_pool, l, k, v, slots)                   kv_pool bf16 / fp32
         paged_attention(q, kv_pool, l, ..., softcap)
After:   s = get_attr fusegen_kv_scales                            [layers, 2, Hkv] fp32
         paged_kv_write(kv_pool, l, k, v, slots, s)                kv_pool float8_e4m3fn
         paged_attention(q, kv_pool, l, ..., softcap, s)

The write stores e4m3(clamp(x / s, -448, 448)) and attention computes with q * s
(``fusegen.kv.quantize_kv`` / ``dequantize_kv``; the CUDA kernels fold s into the softmax
scale for K and into the output for V). The same graph run with a pool in the model's dtype
stores and reads the values as they are: that is how the compile-time check compares it
with the model (fusegen/compiler.py), and how its own change is measured here.

Scales: s = margin * amax / 448, amax the largest |k| (|v|) of that head over the tokens
the graph runs on with the unquantised pool, read back from the pool's rows:

    calibration_ids given   up to CALIBRATION_WINDOWS of its windows, evenly spaced
                            (the CLI passes fusegen/data/calibration.txt), margin CALIBRATED_MARGIN
    none                    SAMPLE_SEQUENCES sequences of seeded random token ids of the
                            model's vocabulary, margin SAMPLE_MARGIN, and a log line that says so

Real text is the better fit (activation outliers come with real tokens); either way a value
past 448 s saturates, it never becomes inf or NaN.

Counters: ``kv_writes_quantized``, ``kv_reads_dequantized``, ``scales_calibrated`` (1: from
calibration text, 0: the random-token sample), ``scale_tokens``, ``kv_bytes_per_token_before``
and ``_after``, ``scale_min`` / ``scale_max``, and ``logit_error``: max |logits(fp8 pool) -
logits(unquantised pool)| / max(1, max |logit|) on the first of those sequences.
"""

from __future__ import annotations

import logging

import torch
from torch import fx

from fusegen.errors import PassError
from fusegen.kv import FP8, FP8_MAX, KVGeometry
from fusegen.passes.infra import (PassContext, PassResult, add_buffer, call_nodes, fresh_val, graph_pass,
                                  placeholders, val)

log = logging.getLogger("fusegen.passes")
ops = torch.ops.fusegen
NAME = "quantize_kv_cache"
SCALES = "fusegen_kv_scales"
CALIBRATION_WINDOWS = 8      # calibration windows run for the scales (SmolLM2: ~8 s on 2 CPU cores)
CALIBRATED_MARGIN = 1.25
SAMPLE_SEQUENCES, SAMPLE_LENGTH, SAMPLE_MARGIN, SAMPLE_SEED = 2, 64, 2.0, 0
_TINY = 1e-8                 # a head that is all zeros keeps a scale > 0


def _prefill_inputs(ids: torch.Tensor, geometry: KVGeometry, pool_dtype: torch.dtype, device) -> dict:
    """The paged step graph's inputs for one sequence ``ids`` [L] prefilled from position 0
    into blocks 0, 1, ... of a fresh pool; logits of every token."""
    L, bs = ids.numel(), geometry.block_size
    blocks = -(-L // bs)
    i32 = dict(dtype=torch.int32, device=device)
    return {"input_ids": ids.view(1, L).to(device), "position_ids": torch.arange(L, device=device).view(1, L),
            "kv_pool": torch.zeros(geometry.pool_shape(blocks), dtype=pool_dtype, device=device),
            "slot_mapping": torch.arange(L, **i32), "block_tables": torch.arange(blocks, **i32).view(1, blocks),
            "seq_lens": torch.tensor([L], **i32), "query_start_loc": torch.tensor([0, L], **i32),
            "logits_indices": torch.arange(L, **i32)}


def _sequences(ctx: PassContext) -> tuple[list[torch.Tensor], float, bool]:
    """(sequences to measure on, margin, whether they are calibration text)."""
    ids = ctx.calibration_ids
    if ids is not None:
        ids = ids.view(-1, ids.shape[-1]) if ids.dim() > 1 else ids.view(1, -1)
        picks = torch.linspace(0, ids.shape[0] - 1, min(CALIBRATION_WINDOWS, ids.shape[0])).round().long()
        return [ids[i] for i in picks.unique().tolist()], CALIBRATED_MARGIN, True
    vocab = ctx.facts.get("vocab_size")
    if not vocab:
        raise PassError(NAME, "kv_dtype=fp8 needs calibration_ids (token ids of real text) or a model "
                              "config with vocab_size to sample token ids from")
    length = min(SAMPLE_LENGTH, ctx.config.max_seq_len)
    g = torch.Generator().manual_seed(SAMPLE_SEED)
    sample = torch.randint(vocab, (SAMPLE_SEQUENCES, length), generator=g)
    log.info("quantize_kv_cache: no calibration_ids; fp8 KV scales from %d sequences of %d random token ids "
             "(margin %.2g); calibration text fits them on real activations", SAMPLE_SEQUENCES, length,
             SAMPLE_MARGIN)
    return list(sample), SAMPLE_MARGIN, False


@torch.no_grad()
def _amax(gm: fx.GraphModule, sequences, geometry: KVGeometry, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(amax [layers, 2, Hkv] over every sequence's cached keys and values, the first
    sequence's logits), the graph run with a pool in the model's dtype."""
    amax, first = torch.zeros(geometry.scales_shape(), device=device), None
    for ids in sequences:
        inputs = _prefill_inputs(ids, geometry, geometry.dtype, device)
        logits = gm(**inputs)[0]
        first = logits if first is None else first
        amax = torch.maximum(amax, inputs["kv_pool"].abs().float().amax(dim=(2, 3, 5)))
    return amax, first


@torch.no_grad()
def _logit_error(gm: fx.GraphModule, ids: torch.Tensor, want: torch.Tensor, geometry: KVGeometry, device) -> float:
    got = gm(**_prefill_inputs(ids, geometry, FP8, device))[0].float()
    want = want.float()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1.0))


@graph_pass(NAME, ensures=lambda gm, ctx: _ensures(gm))
def quantize_kv_cache(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    writes = call_nodes(gm, ops.paged_kv_write.default)
    reads = call_nodes(gm, ops.paged_attention.default)
    pool = placeholders(gm).get("kv_pool")
    geometry = ctx.facts.get("kv")
    if pool is None or not reads or geometry is None or geometry.block_size < 1:
        raise PassError(NAME, "kv_dtype=fp8 quantises the paged KV pool: run insert_paged_blocks first")
    if geometry.quantized:
        return PassResult(gm, False, {})
    device = ctx.facts.get("device", val(pool).device)
    sequences, margin, calibrated = _sequences(ctx)
    amax, logits = _amax(gm, sequences, geometry, device)
    scales = (amax * margin / FP8_MAX).clamp_min(_TINY).float()
    node = add_buffer(gm, SCALES, scales, min(writes + reads, key=_order(gm)))
    for write in writes:
        write.args = tuple(write.args[:5]) + (node,)
    for read in reads:
        read.args = tuple(read.args[:10]) + (node,)
    pool.meta["val"] = fresh_val(gm, val(pool).shape, FP8)
    ctx.facts["kv"] = geometry.with_dtype(FP8)
    gm.recompile()
    stats = {"kv_writes_quantized": len(writes), "kv_reads_dequantized": len(reads),
             "scales_calibrated": int(calibrated), "scale_tokens": sum(s.numel() for s in sequences),
             "kv_bytes_per_token_before": geometry.bytes_per_token,
             "kv_bytes_per_token_after": ctx.facts["kv"].bytes_per_token,
             "scale_min": float(scales.min()), "scale_max": float(scales.max()),
             "logit_error": round(_logit_error(gm, sequences[0], logits, geometry, device), 6)}
    return PassResult(gm, True, stats)


def _order(gm: fx.GraphModule):
    index = {n: i for i, n in enumerate(gm.graph.nodes)}
    return lambda n: index[n]


def _ensures(gm: fx.GraphModule) -> list[str]:
    problems = []
    pool = placeholders(gm).get("kv_pool")
    if pool is None or val(pool).dtype != FP8:
        problems.append(f"kv_pool is {None if pool is None else val(pool).dtype}, expected {FP8}")
    for node in call_nodes(gm, ops.paged_kv_write.default, ops.paged_attention.default):
        scales = node.args[-1]
        if not (isinstance(scales, fx.Node) and scales.op == "get_attr" and scales.target == SCALES):
            problems.append(f"{node.name} does not read {SCALES}")
    return problems
