"""quantize_weights (opt-in, lossy): linear weights stored as int8, fp8 or int4 (``fusegen.quant``).

Before:  y = linear(x, W, b)                                  W [N, K] bf16/fp32
After:   y = fusegen.quantized_linear(x, Wq, s, b, "int8")    Wq [N, K] int8, s [N, 1] fp32

Every ``aten.linear`` whose weight is a 2-D floating attribute is rewritten, after
fuse_projections, so a fused q/k/v or gate/up weight is stored once. The LM head (the linear
nearest the graph's output) keeps its dtype unless ``quantize_lm_head``; embeddings are not
linears and are never touched. int4 needs K divisible by its group size; a linear that is
not is left as it was (counter ``linears_skipped_group``).

Counters: ``linears_quantized``, ``lm_head_kept``, ``linears_skipped_group``, and the weight
bytes before and after (``weight_bytes_before``, ``weight_bytes_after``, the quantized
linears only). The compile-time check compares the result with the model whose linear
weights are replaced by their dequantized values (``fusegen.quant.dequantized_linears``):
the quantized graph must compute exactly that.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import fx

from fusegen import ops  # noqa: F401  (registers fusegen::quantized_linear)
from fusegen.passes.infra import PassContext, PassResult, add_buffer, erase_unused, getattr_path, graph_pass
from fusegen.quant import quantize, stored_bytes, supported

aten = torch.ops.aten
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
def _rewrite(gm: fx.GraphModule, node: fx.Node, weight: torch.Tensor, fmt: str, index: int) -> int:
    """Replace ``node`` by a quantized linear over new buffers; returns the stored bytes."""
    data, scale = quantize(weight, fmt)
    data_node = add_buffer(gm, f"{PREFIX}{index}_data", data, node)
    scale_node = add_buffer(gm, f"{PREFIX}{index}_scale", scale, node)
    bias = node.args[2] if len(node.args) > 2 else None
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(QUANTIZED_LINEAR, (node.args[0], data_node, scale_node, bias, fmt))
    new.meta.update({k: v for k, v in node.meta.items() if k in ("val", "nn_module_stack", "stack_trace")})
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return stored_bytes(data, scale)


@graph_pass("quantize_weights")
def quantize_weights(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    fmt, stats = ctx.config.weights, Counter()
    head = None if ctx.config.quantize_lm_head else lm_head(gm)
    index = 0
    for node in list(gm.graph.nodes):
        weight = _weight(gm, node)
        if weight is None:
            continue
        if node is head:
            stats["lm_head_kept"] += 1
            continue
        if not supported(weight, fmt):
            stats["linears_skipped_group"] += 1
            continue
        stats["weight_bytes_before"] += weight.numel() * weight.element_size()
        stats["weight_bytes_after"] += _rewrite(gm, node, weight, fmt, index)
        stats["linears_quantized"] += 1
        index += 1
    erase_unused(gm)
    ctx.facts["quantize_weights"] = {"format": fmt, "lm_head": ctx.config.quantize_lm_head}
    return PassResult(gm, stats["linears_quantized"] > 0, dict(+stats))
