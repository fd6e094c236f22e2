"""Calibration tokens for the compiles that the CLI commands run.

A config with a pass that fits on real text — int4 weights with AWQ scales (``int4_awq``),
fewer KV heads (``gqa_kv_heads``), fp8 KV scales (``kv_dtype=fp8``) — is compiled with
``calibration_ids``: the bundled
``fusegen/data/calibration.txt`` (or the text of ``--calibration FILE``) tokenized with the
model's own tokenizer and cut into windows as ``fusegen-cli quality`` cuts it
(``fusegen.quality.calibration_ids``). Without them int4 would be plain int4,
convert_mha_to_gqa would refuse and the fp8 KV scales would come from random tokens.

    calibration = prepare(name, config, path)          # before loading: bad file, no tokenizer
    compiled = compile_calibrated(model, config, calibration, progress=True)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fusegen.progress import stage

if TYPE_CHECKING:
    import torch

    from fusegen.config import CompileConfig

BUNDLED = "fusegen/data/calibration.txt"
log = logging.getLogger("fusegen.calibration")


def needs_calibration(config: CompileConfig | None) -> str | None:
    """What in ``config`` is fit on calibration tokens, in words; None when nothing is."""
    if config is None:
        return None
    wanted = []
    if config.weights == "int4" and config.int4_awq:
        wanted.append("int4 AWQ scales")
    if config.gqa_kv_heads > 0:
        wanted.append(f"gqa_kv_heads={config.gqa_kv_heads}")
    if config.kv_dtype == "fp8":
        wanted.append("fp8 KV scales")
    return " and ".join(wanted) or None


def read_text(path: str) -> str:
    """The text of ``--calibration FILE``; a missing or empty file is a one-line error."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--calibration {path}: no such file")
    text = file.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"--calibration {path}: the file is empty")
    return text


@dataclass(frozen=True)
class Calibration:
    """What a compile's calibration tokens are made of: the text (None: the bundled one),
    the model's tokenizer, and why the config needs them."""
    reason: str
    source: str
    tokenizer: Any
    text: str | None = None

    def ids(self, model, config: CompileConfig) -> torch.Tensor:
        """[n, length] token ids, ``length`` as ``fusegen-cli quality``'s default, capped by
        the model's positions and ``config.max_seq_len``."""
        from fusegen.quality import calibration_ids, sequence_length

        length = sequence_length(model, [config])
        with stage(f"calibrating {self.reason} on {self.source} (windows of {length} tokens)"):
            try:
                return calibration_ids(self.tokenizer, length, self.text)
            except ValueError as exc:
                raise ValueError(f"calibration text {self.source}: {exc}") from None


def prepare(model_name: str, config: CompileConfig | None, path: str | None = None,
            tokenizer=None) -> Calibration | None:
    """Before the model loads: what ``config`` needs calibrated, from which text, with the
    model's tokenizer (``tokenizer``, else loaded); None when nothing needs it. A ``path``
    is read either way, so a mistyped one fails before the slow part."""
    text = None if path is None else read_text(path)
    reason = needs_calibration(config)
    if reason is None:
        if path is not None:
            log.info("note: --calibration %s is not used: config '%s' fits nothing on calibration text",
                     path, config or "default")
        return None
    if tokenizer is None:
        tokenizer = _tokenizer(model_name, reason, config)
        if tokenizer is None:
            return None
    return Calibration(reason, path or BUNDLED, tokenizer, text)


def _tokenizer(model_name: str, reason: str, config: CompileConfig):
    """The model's tokenizer; None where the model has none and only the fp8 KV scales, which
    have a fallback, wanted calibration text; otherwise a model without one is an error."""
    from fusegen.errors import ModelNotFoundError
    from fusegen.models import load_tokenizer

    try:
        return load_tokenizer(model_name)
    except ModelNotFoundError as exc:
        if "no tokenizer files" not in str(exc):
            raise
    if needs_calibration(config.replace(kv_dtype="auto")) is None:   # only the fp8 KV scales want it
        log.info("note: %s has no tokenizer files to tokenize calibration text; the fp8 KV scales come "
                 "from random token ids (passes/quantize_kv_cache.py)", model_name)
        return None
    way_out = "; int4_awq=0 compiles plain int4" if config.gqa_kv_heads == 0 else ""
    raise ValueError(f"{reason} needs calibration tokens, and {model_name} has no tokenizer files "
                     f"to make them from the calibration text{way_out}") from None


def compile_calibrated(model, config: CompileConfig | None, calibration: Calibration | None, **options):
    """``fusegen.compile(model, config, **options)``, with the calibration tokens when
    ``calibration`` is given."""
    import fusegen

    ids = None if calibration is None else calibration.ids(model, config)
    return fusegen.compile(model, config, calibration_ids=ids, **options)
