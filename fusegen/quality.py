"""What a lossy configuration costs: held-out perplexity, KV-cache bytes per token and weight
bytes of the base model against the same model compiled with a config (``fusegen-cli
quality``, bench/gqa_quality.py).

    base       the model as loaded, run eagerly (the reference)
    compiled   fusegen.compile(model, config, calibration_ids=<calibration text>)

Both are measured on ``fusegen.data.heldout_text()`` cut into sequences of ``length``
tokens; the calibration sequences (``calibration_text()``, what lossy passes such as
convert_mha_to_gqa fit on) never enter the measurement.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

SEQUENCE_LENGTH = 256
BATCH = 2   # held-out sequences per forward: the logits of one batch are [BATCH, length, vocab]
# Calibration sequences start every length / CALIBRATION_OVERLAP tokens: overlapping windows
# show the refit the same text at other positions. SmolLM2 3->1 KV heads, refit, held-out
# perplexity: 43.5 with disjoint windows (8), 41.7 half-overlapping (16), 43.6 with 32 —
# within the run-to-run spread; more windows cost forward passes, not Adam steps.
CALIBRATION_OVERLAP = 4


@dataclass(frozen=True)
class QualityRow:
    name: str                     # "base" or the compile config's one-line form
    heldout_ppl: float
    kv_bytes_per_token: int
    weight_bytes: int
    compile_seconds: float = 0.0
    stats: dict = field(default_factory=dict)   # the lossy passes' own counters

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class QualityResult:
    model: str
    sequence_length: int
    calibration_tokens: int       # distinct tokens of the calibration text used
    calibration_sequences: int    # windows of ``sequence_length`` tokens over them
    heldout_tokens: int
    rows: tuple[QualityRow, ...]

    def to_dict(self) -> dict:
        return {**asdict(self), "rows": [r.to_dict() for r in self.rows]}

    def save(self, path) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")

    def table(self) -> str:
        base = self.rows[0]
        lines = [f"{self.model}: held-out perplexity on {self.heldout_tokens} tokens "
                 f"({self.heldout_tokens // self.sequence_length} x {self.sequence_length}), "
                 f"calibrated on {self.calibration_tokens} other tokens ({self.calibration_sequences} windows)",
                 f"{'model':40} {'held-out ppl':>12} {'x base':>7} {'KV bytes/token':>15} "
                 f"{'weight bytes':>13} {'compile s':>10}"]
        for r in self.rows:
            lines.append(f"{_clip(r.name, 40):40} {r.heldout_ppl:12.3f} {r.heldout_ppl / base.heldout_ppl:7.2f} "
                         f"{r.kv_bytes_per_token:15,} {r.weight_bytes:13,} {r.compile_seconds:10.1f}")
        return "\n".join(lines)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def sequence_length(model: nn.Module, configs, length: int = SEQUENCE_LENGTH) -> int:
    """``length`` capped by the model's positions and every config's ``max_seq_len``."""
    c = model.config
    positions = getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None)
    return min(length, positions or length, *(c.max_seq_len for c in configs))


def calibration_ids(tokenizer, length: int, text: str | None = None) -> torch.Tensor:
    """What lossy passes fit on: ``text`` (default ``fusegen.data.calibration_text()``) as
    [n, length] token ids, a window every ``length / CALIBRATION_OVERLAP`` tokens."""
    from fusegen.data import calibration_text

    return token_chunks(tokenizer, calibration_text() if text is None else text, length, _stride(length))


def _stride(length: int) -> int:
    return max(1, length // CALIBRATION_OVERLAP)


def token_chunks(tokenizer, text: str, length: int, stride: int | None = None) -> torch.Tensor:
    """``text`` as [n, length] token ids, one sequence every ``stride`` tokens (default
    ``length``: disjoint sequences; the tail that fills no sequence is dropped)."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if ids.numel() < length:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one sequence of {length}")
    return ids.unfold(0, length, stride or length).contiguous()


@torch.no_grad()
def perplexity(forward, ids: torch.Tensor) -> float:
    """exp(mean next-token cross entropy) of ``forward(ids) -> logits`` over every sequence."""
    total, count = 0.0, 0
    for batch in ids.split(BATCH):
        logits = forward(batch)
        total += nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                             batch[:, 1:].reshape(-1), reduction="sum").item()
        count += batch[:, 1:].numel()
    return math.exp(total / count)


def _unique_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.shape)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def model_weight_bytes(model: nn.Module) -> int:
    """Parameters and buffers of an nn.Module (a tied embedding counted once)."""
    return _unique_bytes([*model.parameters(), *model.buffers()])


def compiled_weight_bytes(compiled) -> int:
    """Every tensor the compiled graph reads as a constant (weights, scales, rotary tables)."""
    from fusegen.passes.infra import getattr_path

    gm = compiled.graph_module
    return _unique_bytes([getattr_path(gm, n.target) for n in gm.graph.nodes
                          if n.op == "get_attr" and isinstance(getattr_path(gm, n.target), torch.Tensor)])


def model_kv_bytes_per_token(model: nn.Module) -> int:
    """K and V of one token in every layer, in the model's own dtype (its HF config's geometry)."""
    c = model.config
    heads = getattr(c, "num_attention_heads", None) or c.n_head
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or (getattr(c, "hidden_size", None) or c.n_embd) // heads
    layers = getattr(c, "num_hidden_layers", None) or c.n_layer
    return 2 * layers * kv_heads * head_dim * next(model.parameters()).element_size()


def _kv_bytes(compiled, base: QualityRow) -> int:
    """The compiled cache's geometry; a stateless graph caches nothing but would cache what
    its attention reads (the base's heads unless convert_mha_to_gqa merged them)."""
    if compiled.facts.get("kv") is not None:
        return compiled.facts["kv"].bytes_per_token
    return compiled.report.counters.get("convert_mha_to_gqa.kv_bytes_per_token_after", base.kv_bytes_per_token)


def _lossy_stats(compiled) -> dict:
    lossy = ("convert_mha_to_gqa", "quantize_weights", "quantize_kv_cache")
    return {f"{r.name}.{k}": v for r in compiled.report.records if r.name in lossy
            for k, v in {**r.stats, "seconds": round(r.seconds, 2)}.items()}


def measure(model_name: str, configs, length: int = SEQUENCE_LENGTH, model=None, tokenizer=None,
            calibration: str | None = None) -> QualityResult:
    """The base model's row, then one row per config in ``configs`` (CompileConfig or its
    string form). ``model``/``tokenizer`` default to loading ``model_name``; ``calibration``
    is the text lossy passes fit on (default ``calibration_text()``)."""
    from fusegen.compiler import compile as compile_model
    from fusegen.config import CompileConfig
    from fusegen.data import heldout_text
    from fusegen.models import load_model, load_tokenizer

    configs = [CompileConfig.from_string(c) if isinstance(c, str) else c for c in configs]  # fail before loading
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_name)
    model = model if model is not None else load_model(model_name)
    length = sequence_length(model, configs, length)
    windows = calibration_ids(tokenizer, length, calibration)
    heldout = token_chunks(tokenizer, heldout_text(), length)
    rows = [QualityRow("base", perplexity(lambda ids: model(ids).logits, heldout),
                       model_kv_bytes_per_token(model), model_weight_bytes(model))]
    for config in configs:
        start = time.perf_counter()
        compiled = compile_model(model, config, calibration_ids=windows)
        seconds = time.perf_counter() - start
        rows.append(QualityRow(str(config), perplexity(compiled, heldout), _kv_bytes(compiled, rows[0]),
                               compiled_weight_bytes(compiled), round(seconds, 2), _lossy_stats(compiled)))
    distinct = (windows.shape[0] - 1) * _stride(length) + length
    return QualityResult(model_name, length, distinct, windows.shape[0], heldout.numel(), tuple(rows))
