"""Weight-only quantization formats: how a [N, K] linear weight is stored and recovered.

    int8   per output channel: q = round(w / s) in [-127, 127], s = max|w[n]| / 127
    fp8    per output channel: q = float8_e4m3fn(w / s), s = max|w[n]| / 448 (e4m3's largest)
    int4   per group of GROUP input channels: q = round(w / s) in [-8, 7], s = max|w[n, g]| / 7,
           stored as q + 8, two to a byte (even k in the low nibble)

Scales are fp32. ``dequantize(quantize(w))`` is what a quantized linear computes with, so a
model whose linear weights are replaced by it (``dequantized_linears``) is the exact
reference of a quantized graph. Every scale is per row, so quantizing a fused projection's
concatenated weight equals quantizing each of its parts.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from fusegen.config import WEIGHT_FORMATS

FORMATS = WEIGHT_FORMATS[1:]
GROUP = 128          # int4 group size along K
_TINY = 1e-12        # a zero row or group keeps scale > 0


def supported(weight: Tensor, fmt: str) -> bool:
    """Whether ``weight`` can be stored in ``fmt`` (int4 needs K divisible by GROUP)."""
    return weight.dim() == 2 and weight.is_floating_point() and (fmt != "int4" or weight.shape[1] % GROUP == 0)


def quantize(weight: Tensor, fmt: str) -> tuple[Tensor, Tensor]:
    """(data, scale) of a [N, K] weight in ``fmt``; see the module docstring for the layouts."""
    if fmt not in FORMATS:
        raise ValueError(f"weight format must be one of {FORMATS}, got {fmt!r}")
    if not supported(weight, fmt):
        raise ValueError(f"cannot store a {tuple(weight.shape)} {weight.dtype} weight as {fmt}"
                         + (f" (K must be a multiple of {GROUP})" if fmt == "int4" else ""))
    w = weight.detach().float()
    if fmt == "int4":
        groups = w.view(w.shape[0], -1, GROUP)
        scale = (groups.abs().amax(-1, keepdim=True) / 7).clamp_min(_TINY)
        q = (torch.round(groups / scale).clamp(-8, 7) + 8).to(torch.uint8).view(w.shape)
        return q[:, 0::2] | (q[:, 1::2] << 4), scale.squeeze(-1)
    top = 127.0 if fmt == "int8" else 448.0
    scale = (w.abs().amax(1, keepdim=True) / top).clamp_min(_TINY)
    if fmt == "int8":
        return torch.round(w / scale).clamp(-127, 127).to(torch.int8), scale
    return (w / scale).to(torch.float8_e4m3fn), scale


def dequantize(data: Tensor, scale: Tensor, fmt: str, dtype: torch.dtype) -> Tensor:
    """The [N, K] weight that (data, scale) stand for, in ``dtype``."""
    if fmt == "int4":
        low, high = (data & 0xF).float() - 8, (data >> 4).float() - 8
        q = torch.stack((low, high), dim=-1).view(data.shape[0], -1)
        w = q.view(q.shape[0], -1, GROUP) * scale[..., None]
        return w.view(q.shape).to(dtype)
    if fmt not in FORMATS:
        raise ValueError(f"weight format must be one of {FORMATS}, got {fmt!r}")
    return (data.float() * scale).to(dtype)


def stored_bytes(data: Tensor, scale: Tensor) -> int:
    return data.numel() * data.element_size() + scale.numel() * scale.element_size()


@contextlib.contextmanager
def dequantized_linears(model: nn.Module, fmt: str, lm_head: bool):
    """``model`` with every nn.Linear weight the quantize_weights pass stores in ``fmt``
    replaced by its dequantized value (the output embedding only with ``lm_head``); the
    original Parameters come back on exit. The replacement is a new Parameter, so a weight
    tied to the input embedding changes only in the linear, as in the quantized graph."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    saved = []
    try:
        for module in model.modules():
            if not isinstance(module, nn.Linear) or (module is head and not lm_head) \
                    or not supported(module.weight, fmt):
                continue
            w = module.weight
            saved.append((module, w))
            module.weight = nn.Parameter(dequantize(*quantize(w, fmt), fmt, w.dtype), requires_grad=False)
        yield model
    finally:
        for module, original in saved:
            module.weight = original
