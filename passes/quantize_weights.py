"""quantize_weights (opt-in, lossy): linear weights stored as int8, fp8 or int4 (``fusegen.quant``).

Before:  y = linear(x, W, b)                                  W [N, K] bf16/fp32
After:   y = fusegen.quantized_linear(x, Wq, s, b, "int8")    Wq [N, K] int8, s [N, 1] fp32

Every ``aten.linear`` whose weight is a 2-D floating attribute is rewritten, after
fuse_projections, so a fused q/k/v or gate/up weight is stored once. The LM head (the linear
nearest the graph's output) keeps its dtype unless ``quantize_lm_head``; embeddings are not
linears and are never touched. int4 needs K divisible by its group size; a linear that is
not is left as it was (counter ``linears_skipped_group``).

int4 with AWQ (``int4_awq``, on by default; needs ``calibration_ids``): the graph runs once on
the calibration tokens, each linear's inputs give its per-input-channel scale s
(``fusegen.quant.awq_search``), and the weight is stored as Q(W / r) with r = 1/s:

    h = mul(g, n); y = linear(h, W)     ->   h = mul(g * r, n); y = quantized_linear(h, Q(W / r), ...)
    y = linear(x, W)   (any other x)    ->   y = quantized_linear(x, Q(W / r), ..., act_scale=r)

r folds into an RMSNorm weight g (mul of a 1-D attribute, feeding only this linear: the
q/k/v and gate/up projections); elsewhere (o, down) the linear applies it to x itself. The
folded r is the one the rounded g * r realises.

Counters: ``linears_quantized``, ``lm_head_kept``, ``linears_skipped_group``, the weight bytes
before and after (``weight_bytes_before``, ``weight_bytes_after``, the quantized linears
only), and with AWQ ``awq_linears``, ``awq_folded`` (into a norm), ``awq_act_scales`` and the
mean relative output error on the calibration inputs with and without it
(``awq_output_error``, ``plain_output_error``). The compile-time check compares the result
with the model whose linear weights are replaced by their dequantized values (and, with AWQ,
their effective weights: ``fusegen.quant.dequantized_linears`` with the scales this pass
leaves in ``ctx.reference_changes``): the quantized graph must compute exactly that.
"""

from __future__ import annotations

import logging
from collections import Counter

import torch
from torch import fx

from fusegen import ops  # noqa: F401  (registers fusegen::quantized_linear)
from fusegen.passes.infra import PassContext, PassResult, add_buffer, erase_unused, getattr_path, graph_pass
from fusegen.quant import awq_search, quantize_scaled, stored_bytes, supported

aten = torch.ops.aten
log = logging.getLogger("fusegen.passes")
PREFIX = "fusegen_quant_"
QUANTIZED_LINEAR = torch.ops.fusegen.quantized_linear.default
# Ops a logits tensor may pass through on its way out (softcap, casts, a slice of positions).
_TO_OUTPUT = {aten.div.Tensor, aten.mul.Tensor, aten.tanh.default, aten.to.dtype, aten._to_copy.default,
              aten.slice.Tensor, aten.select.int, aten.index_select.default, aten.view.default,
              aten.reshape.default, aten.contiguous.default}


def lm_head(gm: fx.GraphModule) -> fx.Node | None:
    """The linear whose result is the graph's first output, through softcap, casts and
    slicing; None when there is none (the logits come from a matmul, say)."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    node = output.args[0]
    node = node[0] if isinstance(node, (tuple, list)) else node
    while isinstance(node, fx.Node) and node.op == "call_function":
        if node.target is aten.linear.default:
            return node
        if node.target not in _TO_OUTPUT:
            return None
        node = node.args[0]
    return None


def _weight(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor | None:
    if node.op != "call_function" or node.target is not aten.linear.default or node.kwargs:
        return None
    weight = node.args[1]
    if not isinstance(weight, fx.Node) or weight.op != "get_attr":
        return None
    tensor = getattr_path(gm, weight.target)
    return tensor if tensor.dim() == 2 and tensor.is_floating_point() else None


@torch.no_grad()
def _rewrite(gm: fx.GraphModule, node: fx.Node, weight: torch.Tensor, fmt: str, index: int,
             r: torch.Tensor | None = None, act_scale: bool = False) -> int:
    """Replace ``node`` by a quantized linear over new buffers, its weight stored for an input
    multiplied by ``r`` (AWQ; the linear applies r itself with ``act_scale``); returns the
    stored bytes."""
    data, scale = quantize_scaled(weight, fmt, r)
    data_node = add_buffer(gm, f"{PREFIX}{index}_data", data, node)
    scale_node = add_buffer(gm, f"{PREFIX}{index}_scale", scale, node)
    bias = node.args[2] if len(node.args) > 2 else None
    args = (node.args[0], data_node, scale_node, bias, fmt)
    if act_scale:
        args += (add_buffer(gm, f"{PREFIX}{index}_act_scale", r, node),)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(QUANTIZED_LINEAR, args)
    new.meta.update({k: v for k, v in node.meta.items() if k in ("val", "nn_module_stack", "stack_trace")})
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return stored_bytes(data, scale) + (r.numel() * 4 if act_scale else 0)


# --- AWQ -------------------------------------------------------------------------------------

class _InputRecorder(fx.Interpreter):
    """Runs the graph on calibration tokens and fits AWQ's scale for each of ``linears`` from
    its input as the run reaches it (only the fit is kept, not the activations)."""

    def __init__(self, gm: fx.GraphModule, linears: dict):
        super().__init__(gm)
        self.linears, self.fits = linears, {}

    def run_node(self, n: fx.Node):
        if n in self.linears:
            x = self.env[n.args[0]]
            self.fits[n] = awq_search(self.linears[n], x.reshape(-1, x.shape[-1]), "int4")
        return super().run_node(n)


def _awq_fits(gm: fx.GraphModule, linears: dict, ids: torch.Tensor) -> dict:
    B, S = ids.shape
    recorder = _InputRecorder(gm, linears)
    with torch.no_grad():
        recorder.run(ids, torch.ones_like(ids), torch.arange(S, device=ids.device).expand(B, S))
    return recorder.fits


def _norm_weight(gm: fx.GraphModule, node: fx.Node, K: int) -> fx.Node | None:
    """The get_attr of the 1-D weight g [K] in ``x = mul(g, n)`` when x is the linear's input
    and feeds nothing else, and g is read nowhere else (so scaling g changes only this linear)."""
    x = node.args[0]
    if not isinstance(x, fx.Node) or x.target is not aten.mul.Tensor or len(x.users) != 1:
        return None
    for g in x.args:
        if isinstance(g, fx.Node) and g.op == "get_attr" and len(g.users) == 1:
            value = getattr_path(gm, g.target)
            readers = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == g.target]
            if value.dim() == 1 and value.is_floating_point() and value.shape[0] == K and len(readers) == 1:
                return g
    return None


@torch.no_grad()
def _fold(gm: fx.GraphModule, node: fx.Node, g_node: fx.Node, r: torch.Tensor, index: int) -> torch.Tensor:
    """Scale the norm weight feeding ``node`` by r (a new buffer; the model keeps its own);
    returns the r the rounded weight realises."""
    g = getattr_path(gm, g_node.target)
    scaled = (g.float() * r).to(g.dtype)
    realised = torch.where(g != 0, scaled.float() / g.float(), r)
    new = add_buffer(gm, f"{PREFIX}{index}_norm_weight", scaled, g_node)
    g_node.replace_all_uses_with(new)
    gm.graph.erase_node(g_node)
    return realised


def _model_names(ctx: PassContext, target: str) -> list[str]:
    """The user's model's parameter names behind a graph weight (a fused one's parts)."""
    sources = ctx.facts.get("fuse_projections.groups", {}).get(target, [target])
    return [name[2:] if name.startswith("m.") else name for name in sources]


def _awq_wanted(ctx: PassContext, fmt: str) -> bool:
    if fmt != "int4" or not ctx.config.int4_awq:
        return False
    if ctx.calibration_ids is None:
        log.info("quantize_weights: int4 without AWQ: no calibration_ids were given "
                 "(fusegen.data.calibration_text() is text to tokenize for them)")
        return False
    return True


@graph_pass("quantize_weights")
def quantize_weights(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    fmt, stats = ctx.config.weights, Counter()
    head = None if ctx.config.quantize_lm_head else lm_head(gm)
    chosen = {}
    for node in list(gm.graph.nodes):
        weight = _weight(gm, node)
        if weight is None:
            continue
        if node is head:
            stats["lm_head_kept"] += 1
        elif not supported(weight, fmt):
            stats["linears_skipped_group"] += 1
        else:
            chosen[node] = weight
    fits = _awq_fits(gm, chosen, ctx.calibration_ids) if _awq_wanted(ctx, fmt) and chosen else {}
    errors = []
    for index, (node, weight) in enumerate(chosen.items()):
        r, act_scale = None, False
        if node in fits:
            r = 1.0 / fits[node].scale
            errors.append((fits[node].error, fits[node].plain_error))
            norm = _norm_weight(gm, node, weight.shape[1])
            if norm is not None:
                r = _fold(gm, node, norm, r, index)
            act_scale = norm is None
            stats["awq_folded" if norm is not None else "awq_act_scales"] += 1
            for name in _model_names(ctx, node.args[1].target):
                ctx.reference_changes[name] = r
        stats["weight_bytes_before"] += weight.numel() * weight.element_size()
        stats["weight_bytes_after"] += _rewrite(gm, node, weight, fmt, index, r, act_scale)
        stats["linears_quantized"] += 1
    erase_unused(gm)
    out = dict(+stats)
    if errors:
        out["awq_linears"] = len(errors)
        out["awq_output_error"] = round(sum(e for e, _ in errors) / len(errors), 6)
        out["plain_output_error"] = round(sum(p for _, p in errors) / len(errors), 6)
    ctx.facts["quantize_weights"] = {"format": fmt, "lm_head": ctx.config.quantize_lm_head, "awq": bool(errors)}
    return PassResult(gm, stats["linears_quantized"] > 0, out)
