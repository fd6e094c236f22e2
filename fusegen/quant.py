"""Weight-only quantization formats: how a [N, K] linear weight is stored and recovered.

    int8   per output channel: q = round(w / s) in [-127, 127], s = max|w[n]| / 127
    fp8    per output channel: q = float8_e4m3fn(w / s), s = max|w[n]| / 448 (e4m3's largest)
    int4   per group of GROUP input channels: q = round(w / s) in [-8, 7], s = max|w[n, g]| / 7,
           stored as q + 8, two to a byte (even k in the low nibble)

Scales are fp32. ``dequantize(quantize(w))`` is what a quantized linear computes with, so a
model whose linear weights are replaced by it (``dequantized_linears``) is the exact
reference of a quantized graph. Every scale is per row, so quantizing a fused projection's
concatenated weight equals quantizing each of its parts.

AWQ (activation-aware weight quantization; Lin et al., "AWQ: Activation-aware Weight
Quantization for LLM Compression and Acceleration", MLSys 2024) for int4: the input channels
that carry large activations matter most, so the weight is stored as Q(W diag(s)) and the
activation enters as x / s, with s = mean_t |x[t, k]|^alpha (normalised, as in the paper, by
sqrt(max s * min s)) and alpha picked on a grid in [0, 1] to minimise the output error on
calibration activations (``awq_search``; alpha = 0 is plain int4, so the fit is never worse on
them). A linear then computes ``F.linear(x * r, dequantize(q) ...)`` with r = 1/s, where r is
folded into the op before it (an RMSNorm weight) or applied by the linear itself
(``act_scale``); ``effective_weight`` is the weight it multiplies x by either way.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

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


def effective_weight(data: Tensor, scale: Tensor, fmt: str, dtype: torch.dtype,
                     act_scale: Tensor | None = None) -> Tensor:
    """The [N, K] weight a quantized linear multiplies x by: ``dequantize(data, scale)``, its
    column k times ``act_scale[k]`` (the per-input-channel scale r of AWQ) if given."""
    if act_scale is None:
        return dequantize(data, scale, fmt, dtype)
    return (dequantize(data, scale, fmt, torch.float32) * act_scale).to(dtype)


def quantize_scaled(weight: Tensor, fmt: str, act_scale: Tensor | None) -> tuple[Tensor, Tensor]:
    """(data, scale) of ``weight`` for a linear whose input arrives multiplied by ``act_scale``
    r: Q(W / r), so that ``effective_weight`` is W again up to the quantization error."""
    if act_scale is None:
        return quantize(weight, fmt)
    return quantize(weight.detach().float() / act_scale, fmt)


AWQ_GRID = 20        # alpha in 0, 1/20, ..., 1
AWQ_ROWS = 512       # calibration rows the output error is measured on (mean |x| takes all)


@dataclass(frozen=True)
class AwqFit:
    scale: Tensor        # s [K] fp32: W is stored as Q(W * s), x enters as x / s
    alpha: float
    error: float         # relative squared output error on the calibration rows, with s
    plain_error: float   # the same for plain quantization (alpha = 0)


def awq_search(weight: Tensor, x: Tensor, fmt: str = "int4", grid: int = AWQ_GRID) -> AwqFit:
    """AWQ's per-input-channel scale for ``weight`` [N, K] given calibration inputs ``x``
    [T, K]: the alpha of ``grid + 1`` in [0, 1] whose s minimises
    ||x W^T - (x / s) Q(W s)^T||^2 / ||x W^T||^2 (see the module docstring)."""
    w = weight.detach().float()
    x = x.detach().float().reshape(-1, w.shape[1])
    mean_abs = x.abs().mean(0)
    rows = x[::max(1, -(-x.shape[0] // AWQ_ROWS))]
    want = rows @ w.T
    norm = want.pow(2).sum().clamp_min(_TINY)
    best, plain = None, None
    for step in range(grid + 1):
        alpha = step / grid if grid else 0.0
        s = mean_abs.pow(alpha).clamp_min(1e-4)
        s = s / (s.max() * s.min()).sqrt()
        got = rows @ effective_weight(*quantize_scaled(w, fmt, 1 / s), fmt, torch.float32, 1 / s).T
        error = float((got - want).pow(2).sum() / norm)
        if best is None or error < best[0]:
            best = (error, alpha, s)
        plain = error if plain is None else plain
    return AwqFit(best[2], best[1], best[0], plain)


def stored_bytes(data: Tensor, scale: Tensor) -> int:
    return data.numel() * data.element_size() + scale.numel() * scale.element_size()


@contextlib.contextmanager
def dequantized_linears(model: nn.Module, fmt: str, lm_head: bool, act_scales: dict | None = None):
    """``model`` with every nn.Linear weight the quantize_weights pass stores in ``fmt``
    replaced by its dequantized value (the output embedding only with ``lm_head``); the
    original Parameters come back on exit. The replacement is a new Parameter, so a weight
    tied to the input embedding changes only in the linear, as in the quantized graph.
    ``act_scales`` maps a weight's parameter name to the AWQ input scale r its linear was
    stored with: that weight is replaced by ``effective_weight`` of Q(W / r)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {}   # a tied weight has several names; any of them may be the graph's
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    act_scales = act_scales or {}
    saved = []
    try:
        for module in model.modules():
            if not isinstance(module, nn.Linear) or (module is head and not lm_head) \
                    or not supported(module.weight, fmt):
                continue
            w = module.weight
            saved.append((module, w))
            r = next((act_scales[n] for n in names.get(id(w), ()) if n in act_scales), None)
            r = None if r is None else r.to(w.device)
            module.weight = nn.Parameter(effective_weight(*quantize_scaled(w, fmt, r), fmt, w.dtype, r),
                                         requires_grad=False)
        yield model
    finally:
        for module, original in saved:
            module.weight = original
